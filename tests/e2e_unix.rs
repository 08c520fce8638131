//! End-to-end tests for Unix-domain sockets: socketpairs between a parent
//! and its child (stream, datagram, seqpacket) with data queued both ways,
//! a listener on a path with an accepted connection to a client in the
//! tree, and the refusals (peer outside the dump, pending backlog).
//!
//! Run: `cargo test --release --test e2e_unix -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;


fn pids_of(ready: &str) -> Vec<i32> {
    ready.split_whitespace().map(|s| s.parse().unwrap()).collect()
}

fn start(r: &Reaper, t: &TempDir, script: &str) -> (std::path::PathBuf, Vec<i32>) {
    let py = python3().unwrap();
    let d = t.sub("st");
    let pid = spawn(r, Command::new(&py).arg(fixtures_src().join(script)).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    (d, pids_of(&ready))
}

fn result(d: &Path, pid: i32) -> String {
    signal_and_result(d, pid, libc::SIGUSR1, "result", secs(30))
}

/// Stream, datagram and seqpacket socketpairs between parent and child,
/// data queued both ways, a pair inside one process with one end shut for
/// writing, O_NONBLOCK, SO_PASSCRED, SO_SNDBUF: all the same after restore,
/// and the pair still carries new data.
#[test]
fn socketpairs_with_queued_data() {
    let _l = lock();
    need!(python3(), "socketpairs_with_queued_data", "no python3");
    let t = TempDir::new("unixpair");
    let r = Reaper::new();
    let (d, pids) = start(&r, &t, "py_unix_pair.py");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let img = t.sub("img");
    let (_, all) = dump_kill(&[pids[0]], &img, &[]);
    assert!(all.contains(&pids[1]));
    let files = std::fs::read_to_string(img.join("files.json")).unwrap();
    assert!(files.contains("unix_peer"), "{files}");
    restore_ok(&img, &r, &pids);
    let res = result(&d, pids[0]);
    assert!(res.starts_with("ok"), "{}", res.trim());
}

/// The dump leaves the queues in place (--leave-running): the workload
/// still reads everything afterwards.
#[test]
fn socketpair_dump_leaves_queues() {
    let _l = lock();
    need!(python3(), "socketpair_dump_leaves_queues", "no python3");
    let t = TempDir::new("unixleave");
    let r = Reaper::new();
    let (d, pids) = start(&r, &t, "py_unix_pair.py");
    std::thread::sleep(std::time::Duration::from_millis(200));
    dump_ok(&[pids[0]], &t.sub("img"), &["--leave-running"]);
    let res = result(&d, pids[0]);
    assert!(res.starts_with("ok"), "{}", res.trim());
}

/// A server listening on a path, with an idle client in the tree whose
/// connection has data queued both ways: after restore the socket file has
/// its mode, a new client connects and gets an answer, and the old
/// connection still works.
#[test]
fn listener_and_client_in_tree() {
    let _l = lock();
    need!(python3(), "listener_and_client_in_tree", "no python3");
    let t = TempDir::new("unixsrv");
    let r = Reaper::new();
    let (d, pids) = start(&r, &t, "py_unix_server.py");
    let path = d.join("srv.sock");
    let ask = || {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(secs(10))).unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    };
    assert!(ask().starts_with("pong 1"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let img = t.sub("img");
    dump_kill(&[pids[0]], &img, &[]);
    let files = std::fs::read_to_string(img.join("files.json")).unwrap();
    assert!(files.contains("unix_listen") && files.contains("\"backlog\": 7"), "{files}");
    restore_ok(&img, &r, &pids[..2]);
    assert!(ask().starts_with("pong 2"), "no answer after restore");
    let res = result(&d, pids[0]);
    assert!(res.starts_with("ok"), "{}", res.trim());
}

/// A client connected to a listener of the test (outside the dump): the
/// dump is refused naming the pid, the fd, the peer's inode and path, and
/// the workload keeps running untraced.
#[test]
fn refuses_peer_outside() {
    let _l = lock();
    let py = need!(python3(), "refuses_peer_outside", "no python3");
    let t = TempDir::new("unixout");
    let r = Reaper::new();
    let path = t.join("outside.sock");
    let l = UnixListener::bind(&path).unwrap();
    let d = t.sub("st");
    let code = format!(
        "import socket,os,time\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\nopen({:?},'w').write('%d %d' % (os.getpid(), s.fileno()))\nos.rename({:?},{:?})\ntime.sleep(1000)\n",
        path.to_str().unwrap(),
        d.join("r.tmp").to_str().unwrap(),
        d.join("r.tmp").to_str().unwrap(),
        d.join("ready").to_str().unwrap()
    );
    let pid = spawn(&r, Command::new(&py).arg("-c").arg(code), &t.join("log"));
    let v = pids_of(&wait_ready(&d, pid, secs(30)));
    let (_acc, _) = l.accept().unwrap();
    let run = dump_raw(&[pid], &t.sub("img"), &[]);
    assert!(!run.ok(), "dump should be refused: {}", run.describe());
    let e = &run.stderr;
    assert!(e.contains(&format!("pid {pid} fd {}", v[1])), "{e}");
    assert!(e.contains("outside the dump") && e.contains(path.to_str().unwrap()) && e.contains("inode"), "{e}");
    assert_eq!(status_field(pid, "TracerPid").as_deref(), Some("0"));
    assert!(alive(pid));
}

/// A listener with a connection in its backlog not accepted yet: refused.
#[test]
fn refuses_pending_backlog() {
    let _l = lock();
    let py = need!(python3(), "refuses_pending_backlog", "no python3");
    let t = TempDir::new("unixbl");
    let r = Reaper::new();
    let d = t.sub("st");
    let path = d.join("l.sock");
    let code = format!(
        "import socket,os,time\ns=socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen(3)\nopen({:?},'w').write('%d' % os.getpid())\nos.rename({:?},{:?})\ntime.sleep(1000)\n",
        path.to_str().unwrap(),
        d.join("r.tmp").to_str().unwrap(),
        d.join("r.tmp").to_str().unwrap(),
        d.join("ready").to_str().unwrap()
    );
    let pid = spawn(&r, Command::new(&py).arg("-c").arg(code), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let _c = UnixStream::connect(&path).unwrap();
    let run = dump_raw(&[pid], &t.sub("img"), &[]);
    assert!(!run.ok(), "dump should be refused: {}", run.describe());
    assert!(run.stderr.contains("backlog") && run.stderr.contains(&format!("pid {pid}")), "{}", run.stderr);
    assert!(alive(pid));
}

/// Credentials queued (SO_PASSCRED on the receiver, so every message
/// carries its sender's pid, uid and gid): refused naming them, and the
/// workload keeps its queue.
#[test]
fn refuses_queued_credentials() {
    let _l = lock();
    let py = need!(python3(), "refuses_queued_credentials", "no python3");
    let t = TempDir::new("unixcred");
    let r = Reaper::new();
    let d = t.sub("st");
    let code = format!(
        "import socket,os,time\na,b=socket.socketpair()\nb.setsockopt(socket.SOL_SOCKET,socket.SO_PASSCRED,1)\na.send(b'x')\nopen({:?},'w').write('%d' % os.getpid())\nos.rename({:?},{:?})\ntime.sleep(1)\nm,anc,fl,ad=b.recvmsg(10,socket.CMSG_SPACE(12))\nopen({:?},'w').write('ok' if m==b'x' and anc else 'FAIL')\nos.rename({:?},{:?})\ntime.sleep(1000)\n",
        d.join("r.tmp").to_str().unwrap(),
        d.join("r.tmp").to_str().unwrap(),
        d.join("ready").to_str().unwrap(),
        d.join("r.tmp").to_str().unwrap(),
        d.join("r.tmp").to_str().unwrap(),
        d.join("result").to_str().unwrap()
    );
    let pid = spawn(&r, Command::new(&py).arg("-c").arg(code), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let run = dump_raw(&[pid], &t.sub("img"), &[]);
    assert!(!run.ok(), "dump should be refused: {}", run.describe());
    let e = &run.stderr;
    assert!(e.contains("SCM_CREDENTIALS") && e.contains(&format!("pid {pid}")) && e.contains(&format!("pid {pid} uid")), "{e}");
    let res = wait_file(&d, "result", secs(30));
    assert_eq!(res, "ok");
}

/// Files in flight (SCM_RIGHTS) in stream, datagram and bound-datagram
/// queues (fixtures/py_unix_scm.py): a file shared with the process, files
/// open only in flight, pipe ends, a socket, a socket in its own queue; and
/// socket options (timeouts, SO_PASSSEC, buffers): all received and working
/// after restore.
#[test]
fn files_in_flight_and_options() {
    let _l = lock();
    need!(python3(), "files_in_flight_and_options", "no python3");
    let t = TempDir::new("unixscm");
    let r = Reaper::new();
    let (d, pids) = start(&r, &t, "py_unix_scm.py");
    let img = t.sub("img");
    dump_kill(&[pids[0]], &img, &[]);
    let files = std::fs::read_to_string(img.join("files.json")).unwrap();
    assert!(files.contains("\"scm\": [") && files.contains("rcvtimeo_us\": 2500000"), "{files}");
    restore_ok(&img, &r, &pids);
    let res = result(&d, pids[0]);
    assert!(res.starts_with("ok"), "{}", res.trim());
}

/// With --leave-running the files in flight stay in the queues untouched.
#[test]
fn files_in_flight_dump_leaves_queues() {
    let _l = lock();
    need!(python3(), "files_in_flight_dump_leaves_queues", "no python3");
    let t = TempDir::new("unixscmleave");
    let r = Reaper::new();
    let (d, pids) = start(&r, &t, "py_unix_scm.py");
    dump_ok(&[pids[0]], &t.sub("img"), &["--leave-running"]);
    let res = result(&d, pids[0]);
    assert!(res.starts_with("ok"), "{}", res.trim());
}

/// A client of an outside server (py_unix_ext_server.py, not dumped):
/// refused without --ext-unix-sk (naming the --ext-unix-sk way); dumped
/// with it; restore without it fails and leaves nothing running; restore
/// with it connects to the server again, and the client talks to it on
/// the same descriptor.
#[test]
fn ext_unix_sk_reconnects_to_outside_server() {
    let _l = lock();
    let py = need!(python3(), "ext_unix_sk_reconnects_to_outside_server", "no python3");
    let t = TempDir::new("unixext");
    let r = Reaper::new();
    let sd = t.sub("srv");
    let srv = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_unix_ext_server.py")).arg(&sd), &t.join("srvlog"));
    wait_ready(&sd, srv, secs(30));
    let path = sd.join("ext.sock");
    let d = t.sub("st");
    let cli = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_unix_ext.py")).arg(&d).arg(&path), &t.join("log"));
    wait_ready(&d, cli, secs(30));

    let run = dump_raw(&[cli], &t.sub("img0"), &[]);
    assert!(!run.ok(), "dump should be refused: {}", run.describe());
    assert!(run.stderr.contains("--ext-unix-sk") && run.stderr.contains(path.to_str().unwrap()), "{}", run.stderr);
    assert!(alive(cli));

    let img = t.sub("img");
    dump_kill(&[cli], &img, &["--ext-unix-sk"]);
    let dir = img.to_str().unwrap();
    let no = snap(&["restore", "-D", dir, "-d"]);
    assert!(!no.ok() && no.stderr.contains("--ext-unix-sk"), "{}", no.describe());
    wait_gone(&[cli], secs(10)).unwrap();

    r.add(cli);
    let ok = snap(&["restore", "-D", dir, "-d", "--ext-unix-sk"]);
    assert!(ok.ok(), "{}", ok.describe());
    let res = result(&d, cli);
    assert!(res.starts_with("ok"), "{}", res.trim());
    assert_eq!(numbers(&sd.join("conns")), vec![1, 2], "the server should have seen a second connection");
    assert!(alive(srv));
}

/// Names, backlogs and lone sockets (fixtures/py_unix_names.py): accepted
/// connections keep their listener's name (path and abstract) and the
/// clients see it as their peer's; connections waiting in a backlog come
/// back from accept(); bound datagram sockets keep their queued datagrams
/// with each sender's address; fresh sockets and a named datagram pair come
/// back too.
#[test]
fn names_backlogs_and_lone_sockets() {
    let _l = lock();
    need!(python3(), "names_backlogs_and_lone_sockets", "no python3");
    let t = TempDir::new("unixnames");
    let r = Reaper::new();
    let (d, pids) = start(&r, &t, "py_unix_names.py");
    let img = t.sub("img");
    dump_kill(&[pids[0]], &img, &[]);
    let files = std::fs::read_to_string(img.join("files.json")).unwrap();
    assert!(files.contains("unix_lone") && files.contains("\"pending\": [") && files.contains("\"listener\": "), "{files}");
    restore_ok(&img, &r, &pids);
    let res = result(&d, pids[0]);
    assert!(res.starts_with("ok"), "{}", res.trim());
}

/// The same workload dumped with --leave-running notices nothing: queues,
/// backlogs and senders are all still there.
#[test]
fn names_dump_leaves_everything() {
    let _l = lock();
    need!(python3(), "names_dump_leaves_everything", "no python3");
    let t = TempDir::new("unixnamesleave");
    let r = Reaper::new();
    let (d, pids) = start(&r, &t, "py_unix_names.py");
    dump_ok(&[pids[0]], &t.sub("img"), &["--leave-running"]);
    let res = result(&d, pids[0]);
    assert!(res.starts_with("ok"), "{}", res.trim());
}

/// A client of the dump waiting in a backlog that already sent data: the
/// data sits in the server end, which cannot be read without accepting
/// it: refused naming the listener, and the workload still gets it.
#[test]
fn refuses_backlog_client_with_data() {
    let _l = lock();
    let py = need!(python3(), "refuses_backlog_client_with_data", "no python3");
    let t = TempDir::new("unixbldata");
    let r = Reaper::new();
    let d = t.sub("st");
    let path = d.join("l.sock");
    let code = format!(
        "import socket,os,time\ns=socket.socket(socket.AF_UNIX)\ns.bind({p:?})\ns.listen(3)\nc=socket.socket(socket.AF_UNIX)\nc.connect({p:?})\nc.sendall(b'early')\nopen({t:?},'w').write('%d' % os.getpid())\nos.rename({t:?},{r:?})\ntime.sleep(1)\na,_=s.accept()\nopen({t:?},'w').write('ok' if a.recv(10)==b'early' else 'FAIL')\nos.rename({t:?},{res:?})\ntime.sleep(1000)\n",
        p = path.to_str().unwrap(),
        t = d.join("r.tmp").to_str().unwrap(),
        r = d.join("ready").to_str().unwrap(),
        res = d.join("result").to_str().unwrap()
    );
    let pid = spawn(&r, Command::new(&py).arg("-c").arg(code), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let run = dump_raw(&[pid], &t.sub("img"), &[]);
    assert!(!run.ok(), "dump should be refused: {}", run.describe());
    let e = &run.stderr;
    assert!(e.contains("backlog") && e.contains("already sent data") && e.contains(path.to_str().unwrap()) && e.contains(&format!("pid {pid}")), "{e}");
    assert_eq!(wait_file(&d, "result", secs(30)), "ok");
}
