//! End-to-end tests for TCP and UDP sockets: a python3 server with a
//! listener and an established connection to a client outside the tree
//! (the test itself), with data in flight both ways at the dump (IPv4 and
//! IPv6); both ends of a loopback connection inside the tree; redis-server
//! keeping a client's connection across dump and restore; a dump with
//! --leave-running nobody notices; a failed dump and a failed restore (the
//! lock table removed / kept); the refusals (no --tcp-established, a
//! listener with unaccepted connections); a connected UDP socket, and
//! queued datagrams dropped with a warning.
//!
//! Run: `cargo test --release --test e2e_inet -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// What every test here needs: python3, TCP repair and nft (the network
/// lock for peers outside the dump). None (skipped) when missing.
fn needs(test: &str) -> Option<PathBuf> {
    let Some(py) = python3() else {
        skip(test, "no python3");
        return None;
    };
    let c = snap(&["check", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&c.stdout).unwrap_or_default();
    let present = |n: &str| {
        v["features"].as_array().into_iter().flatten().any(|f| f["name"] == n && f["present"] == true)
    };
    if !present("tcp-repair") {
        skip(test, "TCP_REPAIR is not available (snap check)");
        return None;
    }
    if !present("network-lock") {
        skip(test, "no network lock: nft missing or cannot create a table (apt-get install nftables)");
        return None;
    }
    Some(py)
}

fn pat(seed: u32, n: usize, mul: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(mul).wrapping_add(seed) & 0xff) as u8).collect()
}

fn nft_tables() -> String {
    let nft = which("nft").expect("nft");
    let o = Command::new(nft).args(["list", "tables"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn net_lock(img: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(img.join("inventory.json")).unwrap()).unwrap();
    v["net_lock"].as_str().map(str::to_string)
}

/// The py_tcp_conn.py server on HOST with the test as its client: the
/// client's bytes are written, the server's have started to arrive.
struct Conn {
    d: PathBuf,
    pid: i32,
    port: u16,
    conn_fd: i32,
    s: TcpStream,
}

fn start_conn(r: &Reaper, t: &TempDir, py: &Path, host: &str) -> Conn {
    start_conn_with(r, t, py, host, &[])
}

fn start_conn_with(r: &Reaper, t: &TempDir, py: &Path, host: &str, extra: &[&str]) -> Conn {
    let d = t.sub("st");
    let pid = spawn(r, Command::new(py).arg(fixtures_src().join("py_tcp_conn.py")).arg(&d).arg(host).args(extra), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let port: u16 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut s = TcpStream::connect((host, port)).expect("connect to the server");
    s.write_all(&pat(2, 65536, 7)).unwrap();
    let conn_fd: i32 = wait_file(&d, "conn", secs(30)).trim().parse().unwrap();
    // Some of the server's megabyte has arrived (and most waits in its
    // send queue: nobody reads it yet).
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(secs(30))).unwrap();
    assert_eq!(s.peek(&mut b).unwrap(), 1);
    Conn { d, pid, port, conn_fd, s }
}

/// After the dump (or in place): release the server, then check that every
/// byte arrives exactly once and in order both ways.
fn finish_conn(c: &mut Conn) {
    c.s.write_all(TAIL).unwrap();
    finish_conn_sent(c);
}

const TAIL: &[u8] = b"tail after restore\n";

/// `finish_conn` once the client has sent TAIL.
fn finish_conn_sent(c: &mut Conn) {
    fs::write(c.d.join("release"), "1").unwrap();
    c.s.set_read_timeout(Some(secs(120))).unwrap();
    let want = [pat(1, 1 << 20, 7), b"done ok\n".to_vec()].concat();
    let mut got = vec![0u8; want.len()];
    c.s.read_exact(&mut got).unwrap_or_else(|e| panic!("reading the server's bytes: {e}; server result: {:?}", read_opt(&c.d.join("result"))));
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the server's bytes differ at {first_diff:?}; server result {:?}", read_opt(&c.d.join("result")));
    assert_eq!(wait_file(&c.d, "result", secs(30)).trim(), "ok");
}

fn pong(host: &str, port: u16) {
    let mut n = TcpStream::connect((host, port)).expect("a new connection to the restored listener");
    n.set_read_timeout(Some(secs(30))).unwrap();
    let mut s = String::new();
    n.read_to_string(&mut s).unwrap();
    assert_eq!(s, "pong\n");
}

fn established_survives(test: &str, host: &str) {
    let _l = lock();
    let Some(py) = needs(test) else { return };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let mut c = start_conn(&r, &t, &py, host);
    let img = t.sub("img");
    dump_kill(&[c.pid], &img, &["--tcp-established"]);
    let table = net_lock(&img).expect("the image names its network lock");
    assert!(nft_tables().contains(&table), "lock table {table} not installed after the dump");
    // The client sends while the server is gone: without the lock the
    // kernel would answer RST and the connection would die.
    c.s.write_all(TAIL).unwrap();
    restore_ok(&img, &r, &[c.pid]);
    assert!(!nft_tables().contains(&table), "lock table {table} still there after restore");
    finish_conn_sent(&mut c);
    pong(host, c.port);
}

/// IPv4: a server with a listener and an established connection to the
/// test, data in flight both ways; after kill and restore the same
/// connection carries every byte once, in order; the listener accepts.
#[test]
fn tcp_established_v4_survives() {
    established_survives("tcp_established_v4_survives", "127.0.0.1");
}

/// The same over IPv6 (::1, IPV6_V6ONLY listener).
#[test]
fn tcp_established_v6_survives() {
    if !Path::new("/proc/net/if_inet6").exists() {
        skip("tcp_established_v6_survives", "no IPv6");
        return;
    }
    established_survives("tcp_established_v6_survives", "::1");
}

/// A restore that fails (the server's port is taken by someone else)
/// keeps the lock table, and the image restores once the port is free:
/// the connection still carries every byte.
#[test]
fn tcp_failed_restore_keeps_lock() {
    let test = "tcp_failed_restore_keeps_lock";
    let _l = lock();
    let Some(py) = needs(test) else { return };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let mut c = start_conn(&r, &t, &py, "127.0.0.1");
    let img = t.sub("img");
    dump_kill(&[c.pid], &img, &["--tcp-established"]);
    let table = net_lock(&img).expect("the image names its network lock");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", c.port)).expect("taking the server's port");
    let d = img.to_string_lossy().to_string();
    let run = snap(&["restore", "-D", &d, "-d"]);
    assert!(!run.ok(), "restore succeeded with the listener's port taken");
    assert!(run.stderr.contains(&format!("127.0.0.1:{}", c.port)), "error does not name the address: {}", run.stderr);
    assert!(!alive(c.pid), "a failed restore left pid {} running", c.pid);
    assert!(nft_tables().contains(&table), "a failed restore removed the lock table");
    drop(squatter);
    restore_ok(&img, &r, &[c.pid]);
    assert!(!nft_tables().contains(&table), "lock table {table} still there after restore");
    finish_conn(&mut c);
    pong("127.0.0.1", c.port);
}

/// Without --tcp-established an established connection is refused, naming
/// the pid, the fd, both addresses and the flag; the server goes on
/// untouched and the connection still works.
#[test]
fn tcp_established_refused_without_flag() {
    let test = "tcp_established_refused_without_flag";
    let _l = lock();
    let Some(py) = needs(test) else { return };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let mut c = start_conn(&r, &t, &py, "127.0.0.1");
    let img = t.sub("img");
    let run = dump_raw(&[c.pid], &img, &[]);
    assert!(!run.ok(), "dump of an established connection without the flag succeeded");
    let e = &run.stderr;
    let local = format!("127.0.0.1:{}", c.port);
    let peer = c.s.local_addr().unwrap().to_string();
    for want in [format!("pid {}", c.pid), format!("fd {}", c.conn_fd), local, peer, "--tcp-established".into()] {
        assert!(e.contains(&want), "error does not name {want:?}: {e}");
    }
    assert_eq!(status_field(c.pid, "TracerPid").as_deref(), Some("0"), "still traced");
    assert!(!img.join("inventory.json").exists());
    finish_conn(&mut c);
    pong("127.0.0.1", c.port);
}

/// --leave-running: the connection leaves repair mode, the lock goes, and
/// neither the server nor the client notices anything.
#[test]
fn tcp_established_leave_running() {
    let test = "tcp_established_leave_running";
    let _l = lock();
    let Some(py) = needs(test) else { return };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let mut c = start_conn(&r, &t, &py, "127.0.0.1");
    let img = t.sub("img");
    // (Tables of images not restored yet may exist: only new ones count.)
    let before = nft_tables();
    dump_ok(&[c.pid], &img, &["--tcp-established", "--leave-running"]);
    assert_eq!(net_lock(&img), None);
    let after = nft_tables();
    assert!(after.lines().all(|l| before.contains(l)), "a lock table is left: {after}");
    assert_eq!(status_field(c.pid, "TracerPid").as_deref(), Some("0"));
    finish_conn(&mut c);
    pong("127.0.0.1", c.port);
}

/// A dump that fails after the connection went into repair mode (a netlink
/// socket after it is refused): the connection leaves repair mode, the
/// lock table goes, and both sides carry on as if nothing happened.
#[test]
fn tcp_failed_dump_leaves_connection_working() {
    let test = "tcp_failed_dump_leaves_connection_working";
    let _l = lock();
    let Some(py) = needs(test) else { return };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let mut c = start_conn_with(&r, &t, &py, "127.0.0.1", &["netlink"]);
    let img = t.sub("img");
    let before = nft_tables();
    let run = dump_raw(&[c.pid], &img, &["--tcp-established"]);
    assert!(!run.ok(), "dump with a netlink socket succeeded");
    assert!(run.stderr.contains("AF_NETLINK") && run.stderr.contains(&format!("pid {}", c.pid)), "{}", run.stderr);
    let after = nft_tables();
    assert!(after.lines().all(|l| before.contains(l)), "a lock table is left: {after}");
    assert_eq!(status_field(c.pid, "TracerPid").as_deref(), Some("0"), "still traced");
    finish_conn(&mut c);
    pong("127.0.0.1", c.port);
}

/// A listener with a connection in its accept queue (not accepted yet) is
/// refused, naming pid, fd, address and count; the server goes on and
/// accepts it afterwards.
#[test]
fn tcp_listener_accept_queue_refused() {
    let test = "tcp_listener_accept_queue_refused";
    let _l = lock();
    let Some(py) = python3() else {
        skip(test, "no python3");
        return;
    };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let script = "import os, socket, sys, time\nd = sys.argv[1]\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen(4)\nopen(d + '/ready.tmp', 'w').write('%d %d' % (s.getsockname()[1], s.fileno()))\nos.rename(d + '/ready.tmp', d + '/ready')\nwhile not os.path.exists(d + '/release'):\n    time.sleep(0.01)\nc, _ = s.accept()\nc.sendall(b'late\\n')\ntime.sleep(1000)\n";
    let pid = spawn(&r, Command::new(&py).arg("-c").arg(script).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let v: Vec<u32> = ready.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let mut s = TcpStream::connect(("127.0.0.1", v[0] as u16)).unwrap();
    let img = t.sub("img");
    let run = dump_raw(&[pid], &img, &["--tcp-established"]);
    assert!(!run.ok(), "dump of a listener with a pending connection succeeded");
    let e = &run.stderr;
    for want in [format!("pid {pid}"), format!("fd {}", v[1]), format!("127.0.0.1:{}", v[0]), "1 connection".into()] {
        assert!(e.contains(&want), "error does not name {want:?}: {e}");
    }
    assert_eq!(status_field(pid, "TracerPid").as_deref(), Some("0"), "still traced");
    fs::write(d.join("release"), "1").unwrap();
    s.set_read_timeout(Some(secs(30))).unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"late\n");
}

/// Both ends of a loopback connection in the dumped tree (parent and
/// child), unread data both ways: after kill and restore both read it all.
#[test]
fn tcp_loopback_pair_in_tree() {
    let test = "tcp_loopback_pair_in_tree";
    let _l = lock();
    let Some(py) = needs(test) else { return };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_tcp_pair.py")).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let ps: Vec<i32> = ready.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let img = t.sub("img");
    let (_, all) = dump_kill(&[pid], &img, &["--tcp-established"]);
    assert!(all.contains(&ps[1]));
    restore_ok(&img, &r, &ps);
    fs::write(d.join("release"), "1").unwrap();
    assert_eq!(wait_file(&d, "parent", secs(60)).trim(), "ok");
    assert_eq!(wait_file(&d, "child", secs(60)).trim(), "ok");
    if let Some(tb) = net_lock(&img) {
        assert!(!nft_tables().contains(&tb), "lock table left after restore");
    }
}

fn resp(s: &mut TcpStream, cmd: &[&str]) -> String {
    let mut m = format!("*{}\r\n", cmd.len());
    for a in cmd {
        m += &format!("${}\r\n{a}\r\n", a.len());
    }
    s.write_all(m.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    // One line, or a bulk string's two.
    loop {
        s.read_exact(&mut b).unwrap();
        out.push(b[0]);
        if out.ends_with(b"\r\n") {
            if out[0] == b'$' && out.iter().filter(|&&c| c == b'\n').count() < 2 && !out.starts_with(b"$-1") {
                continue;
            }
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// redis-server on 127.0.0.1 with one persistent client connection from
/// the test (raw RESP): SET before the dump, GET on the same connection
/// after kill and restore; redis-cli connects anew.
#[test]
fn redis_tcp_client_connection_survives() {
    let test = "redis_tcp_client_connection_survives";
    let _l = lock();
    if needs(test).is_none() {
        return;
    }
    let server = need!(which("redis-server"), test, "redis-server not installed (apt-get install redis-server)");
    let rcli = need!(which("redis-cli"), test, "redis-cli not installed (apt-get install redis-tools)");
    let t = TempDir::new(test);
    let r = Reaper::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = t.sub("data");
    let pid = spawn(
        &r,
        Command::new(&server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no", "--supervised", "no", "--dir"])
            .arg(&dir)
            .current_dir(&dir),
        &t.join("log"),
    );
    let mut s = wait_for("redis to accept", secs(30), || {
        assert!(alive(pid) && proc_state(pid) != Some('Z'), "redis-server died: {}", read_opt(&t.join("log")).unwrap_or_default());
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    s.set_read_timeout(Some(secs(60))).unwrap();
    assert_eq!(resp(&mut s, &["PING"]), "+PONG\r\n");
    assert_eq!(resp(&mut s, &["SET", "greeting", "kept across restore"]), "+OK\r\n");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &["--tcp-established"]);
    restore_ok(&img, &r, &[pid]);
    assert_eq!(resp(&mut s, &["GET", "greeting"]), "$19\r\nkept across restore\r\n");
    assert_eq!(resp(&mut s, &["INCR", "n"]), ":1\r\n");
    let o = Command::new(&rcli).args(["-p", &port.to_string(), "-h", "127.0.0.1", "GET", "greeting"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "kept across restore");
    assert_eq!(resp(&mut s, &["GET", "n"]), "$1\r\n1\r\n");
}

/// A UDP socket bound and connected to the test's socket, SO_BROADCAST
/// set: it answers before the dump and, restored, answers again from the
/// same address with its option and its count.
#[test]
fn udp_connected_round_trip() {
    let test = "udp_connected_round_trip";
    let _l = lock();
    let Some(py) = python3() else {
        skip(test, "no python3");
        return;
    };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let me = UdpSocket::bind("127.0.0.1:0").unwrap();
    me.set_read_timeout(Some(std::time::Duration::from_millis(500))).unwrap();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_udp.py")).arg(&d).arg(me.local_addr().unwrap().port().to_string()), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let port: u16 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ask = |msg: &str| -> String {
        wait_for("a UDP answer", secs(30), || {
            me.send_to(msg.as_bytes(), ("127.0.0.1", port)).unwrap();
            let mut b = [0u8; 256];
            let (n, from) = me.recv_from(&mut b).ok()?;
            assert_eq!(from.port(), port, "answer from another port");
            Some(String::from_utf8_lossy(&b[..n]).into_owned())
        })
    };
    assert_eq!(ask("one"), "echo:1:1:one");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    assert_eq!(ask("two"), "echo:2:1:two");
}

/// Datagrams queued on a UDP socket at the dump are dropped with a warning
/// naming pid, fd and size (docs/architecture.md says why); the restored
/// socket keeps its port and gets the datagrams sent after.
#[test]
fn udp_queued_datagrams_dropped_with_warning() {
    let test = "udp_queued_datagrams_dropped_with_warning";
    let _l = lock();
    let Some(py) = python3() else {
        skip(test, "no python3");
        return;
    };
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let script = "import os, socket, sys, time\nd = sys.argv[1]\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('127.0.0.1', 0))\nopen(d + '/ready.tmp', 'w').write('%d %d' % (s.getsockname()[1], s.fileno()))\nos.rename(d + '/ready.tmp', d + '/ready')\nwhile not os.path.exists(d + '/release'):\n    time.sleep(0.01)\nm = s.recv(100)\nopen(d + '/got.tmp', 'wb').write(m)\nos.rename(d + '/got.tmp', d + '/got')\ntime.sleep(1000)\n";
    let pid = spawn(&r, Command::new(&py).arg("-c").arg(script).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let v: Vec<u16> = ready.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let me = UdpSocket::bind("127.0.0.1:0").unwrap();
    me.send_to(b"before-1", ("127.0.0.1", v[0])).unwrap();
    me.send_to(b"before-2", ("127.0.0.1", v[0])).unwrap();
    let img = t.sub("img");
    let (run, _) = dump_kill(&[pid], &img, &[]);
    for want in [format!("pid {pid}"), format!("fd {}", v[1]), "8 bytes".into(), "dropped".into()] {
        assert!(run.stderr.contains(&want), "warning does not name {want:?}: {}", run.stderr);
    }
    restore_ok(&img, &r, &[pid]);
    me.send_to(b"after", ("127.0.0.1", v[0])).unwrap();
    fs::write(d.join("release"), "1").unwrap();
    assert_eq!(wait_file(&d, "got", secs(30)), "after");
}
