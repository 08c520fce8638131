//! End-to-end tests with real programs (issue 4, "Real programs that must
//! come back"): redis-server on a Unix socket with 1000 keys, a python3
//! asyncio server with a `cat` subprocess, nginx (master + 2 workers) on a
//! Unix socket. Each is dumped (and killed), restored detached, and must
//! serve its old state and keep working. A program that is not installed
//! is reported as skipped (./test.sh installs them).
//!
//! Run: `cargo test --release --test e2e_servers -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// An executable on PATH or in the sbin directories.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Run `prog args…` with `input` on stdin; its stdout (panics on failure).
fn run_with_input(prog: &Path, args: &[&str], input: &str) -> String {
    let mut c = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", prog.display()));
    let mut stdin = c.stdin.take().unwrap();
    let input = input.to_string();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let o = c.wait_with_output().unwrap();
    w.join().unwrap();
    assert!(o.status.success(), "{} {args:?}: {:?}\n{}", prog.display(), o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---------------------------------------------------------------- redis

fn cli(cli: &Path, sock: &Path, cmds: &str) -> String {
    run_with_input(cli, &["-s", sock.to_str().unwrap()], cmds)
}

/// redis-server listening only on a Unix socket, 1000 keys loaded with
/// redis-cli: after dump (kill) and restore every key reads back, and it
/// keeps taking writes.
#[test]
fn redis_unix_socket_keys_survive() {
    const T: &str = "redis_unix_socket_keys_survive";
    let _l = lock();
    let server = need!(which("redis-server"), T, "redis-server not installed (apt-get install redis-server)");
    let rcli = need!(which("redis-cli"), T, "redis-cli not installed (apt-get install redis-tools)");
    let t = TempDir::new("redis");
    let r = Reaper::new();
    let sock = t.join("redis.sock");
    let dir = t.sub("data");
    let pid = spawn(
        &r,
        Command::new(&server)
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no", "--supervised", "no", "--dir"])
            .arg(&dir)
            .current_dir(&dir),
        &t.join("log"),
    );
    wait_for("redis PING", secs(30), || {
        assert!(alive(pid) && proc_state(pid) != Some('Z'), "redis-server died: {}", read_opt(&t.join("log")).unwrap_or_default());
        if !sock.exists() {
            return None;
        }
        let o = Command::new(&rcli).arg("-s").arg(&sock).arg("PING").output().ok()?;
        (String::from_utf8_lossy(&o.stdout).trim() == "PONG").then_some(())
    });
    let sets: String = (1..=1000).map(|i| format!("SET key:{i} value-{i}-{}\n", "x".repeat(i % 50))).collect();
    let out = cli(&rcli, &sock, &sets);
    assert_eq!(out.lines().filter(|l| *l == "OK").count(), 1000, "SETs: {out}");
    assert_eq!(cli(&rcli, &sock, "DBSIZE\n").trim(), "1000");

    let img = t.sub("img");
    let (_, all) = dump_kill(&[pid], &img, &[]);
    assert_eq!(all, vec![pid]);
    assert!(!sock.exists() || UnixStream::connect(&sock).is_err(), "redis still answers after the dump");
    restore_ok(&img, &r, &[pid]);

    assert_eq!(cli(&rcli, &sock, "DBSIZE\n").trim(), "1000", "key count after restore");
    let gets: String = (1..=1000).map(|i| format!("GET key:{i}\n")).collect();
    let out = cli(&rcli, &sock, &gets);
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), 1000, "GET answers: {out}");
    for (i, v) in (1..=1000).zip(&got) {
        assert_eq!(*v, format!("value-{i}-{}", "x".repeat(i % 50)), "key:{i} after restore");
    }
    // Keeps writing: new keys, overwrites, a counter.
    let more: String = (1..=200).map(|i| format!("SET new:{i} n{i}\nINCR counter\n")).collect::<String>() + "SET key:1 changed\n";
    let out = cli(&rcli, &sock, &more);
    assert!(out.lines().any(|l| l == "200"), "INCR after restore: {out}");
    assert_eq!(cli(&rcli, &sock, "GET new:200\nGET key:1\nGET counter\nDBSIZE\n").lines().collect::<Vec<_>>(), ["n200", "changed", "200", "1201"]);
    assert!(alive(pid));
}

// ---------------------------------------------------------------- asyncio

/// One request to the asyncio server: send LINE, read the whole answer.
fn ask(path: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    s.set_read_timeout(Some(secs(20))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut b = String::new();
    s.read_to_string(&mut b).unwrap();
    b
}

/// A python3 asyncio loop (epoll, self-pipe socketpair, signal wakeup fd,
/// the child watcher's thread in waitpid) serving on a Unix socket, with a
/// `cat` subprocess on pipes. A client outside the tree is served and gone
/// before the dump; after restore a new client gets the next request
/// number, cat still echoes, a signal handler still runs, and the loop
/// still sees cat exit.
///
/// Python 3.11 (Debian 12's) watches children with a thread in waitpid().
/// Python 3.12+ uses a pidfd instead, which snap refuses today ("pid N fd 6
/// (anon_inode:[pidfd]): anonymous inodes ([pidfd]) are not supported
/// yet"): with such a python3 this test fails on that refusal, on purpose.
#[test]
fn python_asyncio_server_and_subprocess() {
    const T: &str = "python_asyncio_server_and_subprocess";
    let _l = lock();
    let py = need!(python3(), T, "no python3");
    need!(which("cat"), T, "no cat");
    let t = TempDir::new("asyncio");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("srv_asyncio.py")).arg(&d), &t.join("log"));
    let ready: Vec<i32> = wait_ready(&d, pid, secs(30)).split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(ready[0], pid);
    let cat = ready[1];
    let path = d.join("srv.sock");
    assert_eq!(ask(&path, "before-1"), format!("n=1 cat=before-1 pid={pid} usr1=0\n"));
    assert_eq!(ask(&path, "before-2"), format!("n=2 cat=before-2 pid={pid} usr1=0\n"));
    // The server has closed its side of both connections.
    wait_for("served 2", secs(10), || (read_opt(&d.join("served"))?.trim() == "2").then_some(()));

    let img = t.sub("img");
    let (_, all) = dump_kill(&[pid], &img, &[]);
    assert!(all.contains(&cat), "cat {cat} not in the dumped tree {all:?}");
    restore_ok(&img, &r, &[pid, cat]);
    assert_eq!(ppid(cat), Some(pid));

    assert_eq!(ask(&path, "after-1"), format!("n=3 cat=after-1 pid={pid} usr1=0\n"), "log: {}", read_opt(&t.join("log")).unwrap_or_default());
    assert!(kill(pid, libc::SIGUSR1));
    wait_for("SIGUSR1 handled", secs(10), || ask(&path, "x").contains("usr1=1").then_some(()));
    assert!(ask(&path, "after-2").starts_with("n=5 cat=after-2 "));
    // The loop's child watcher (a thread blocked in waitpid at the dump)
    // sees cat die.
    assert!(kill(cat, libc::SIGTERM));
    assert_eq!(ask(&path, "status"), "rc=-15\n");
    assert!(alive(pid) && proc_state(pid) != Some('Z'));
}

// ---------------------------------------------------------------- nginx

fn curl(curl: &Path, sock: &Path, url: &str) -> String {
    let o = Command::new(curl)
        .args(["-sS", "-m", "10", "--unix-socket"])
        .arg(sock)
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("run curl: {e}"));
    assert!(o.status.success(), "curl {url}: {:?} {}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// "pid=N conn=M" answered by /n: the worker's pid.
fn worker_of(answer: &str) -> i32 {
    answer.strip_prefix("pid=").and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad answer {answer:?}"))
}

/// nginx, master and 2 workers (running as nobody), serving on a Unix
/// socket: after restore it serves the same file and the same workers
/// answer; a reload (SIGHUP) starts new workers through the restored
/// master and retires the old ones over the restored channel socketpairs;
/// a graceful quit (SIGQUIT) ends everything and removes the socket.
#[test]
fn nginx_master_workers_unix_socket() {
    const T: &str = "nginx_master_workers_unix_socket";
    let _l = lock();
    let nginx = need!(which("nginx"), T, "nginx not installed (apt-get install nginx-light)");
    let curl_bin = need!(which("curl"), T, "curl not installed");
    let t = TempDir::new("nginx");
    let r = Reaper::new();
    let p = |n: &str| t.join(n).to_str().unwrap().to_string();
    let sock = t.join("nginx.sock");
    std::fs::create_dir_all(t.join("html")).unwrap();
    std::fs::write(t.join("html/index.html"), "hello from nginx\n").unwrap();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {pid};\nerror_log {err};\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n\
         fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
         server {{\n    listen unix:{sock};\n    root {tmp}/html;\n\
         location /n {{ return 200 \"pid=$pid conn=$connection\\n\"; }}\n  }}\n}}\n",
        pid = p("nginx.pid"),
        err = p("err.log"),
        tmp = t.path.to_str().unwrap(),
        sock = sock.to_str().unwrap(),
    );
    std::fs::write(t.join("nginx.conf"), conf).unwrap();
    let master = spawn(
        &r,
        Command::new(&nginx).arg("-p").arg(&t.path).arg("-c").arg(t.join("nginx.conf")).arg("-e").arg(t.join("err.log")),
        &t.join("log"),
    );
    let log = || format!("log: {}\nerr.log: {}", read_opt(&t.join("log")).unwrap_or_default(), read_opt(&t.join("err.log")).unwrap_or_default());
    let workers = wait_for("nginx master with 2 workers", secs(30), || {
        assert!(alive(master) && proc_state(master) != Some('Z'), "nginx died: {}", log());
        let w = descendants(master);
        (w.len() == 2 && sock.exists() && read_opt(&t.join("nginx.pid")).is_some()).then_some(w)
    });
    assert_eq!(read_opt(&t.join("nginx.pid")).unwrap().trim(), master.to_string());
    assert_eq!(curl(&curl_bin, &sock, "http://x/"), "hello from nginx\n");
    assert!(workers.contains(&worker_of(&curl(&curl_bin, &sock, "http://x/n"))));

    let img = t.sub("img");
    let (_, all) = dump_kill(&[master], &img, &[]);
    assert_eq!(all.len(), 3, "{all:?}");
    restore_ok(&img, &r, &all);
    for &w in &workers {
        assert_eq!(ppid(w), Some(master));
        assert_eq!(status_field(w, "Uid").unwrap().split_whitespace().next(), Some("65534"), "worker {w} uid");
    }
    for _ in 0..10 {
        assert_eq!(curl(&curl_bin, &sock, "http://x/"), "hello from nginx\n", "{}", log());
        let w = worker_of(&curl(&curl_bin, &sock, "http://x/n"));
        assert!(workers.contains(&w), "answered by {w}, not one of {workers:?}");
    }

    // Reload: new workers, the old ones told to quit over their channels.
    assert!(kill(master, libc::SIGHUP));
    let fresh = wait_for("new workers after SIGHUP", secs(30), || {
        let w = descendants(master);
        (w.len() == 2 && w.iter().all(|p| !workers.contains(p))).then_some(w)
    });
    wait_gone(&workers, secs(10)).unwrap();
    let w = worker_of(&curl(&curl_bin, &sock, "http://x/n"));
    assert!(fresh.contains(&w), "answered by {w}, not one of {fresh:?}");

    // Graceful quit: everything exits, the socket file is removed.
    assert!(kill(master, libc::SIGQUIT));
    let mut all_now = fresh.clone();
    all_now.push(master);
    wait_gone(&all_now, secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", log()));
    assert!(!sock.exists(), "nginx left its socket file");
    let err = read_opt(&t.join("err.log")).unwrap_or_default();
    assert!(!["[alert]", "[emerg]", "[crit]"].iter().any(|l| err.contains(l)), "err.log: {err}");
}
