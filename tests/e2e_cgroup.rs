//! End-to-end tests for `snap dump --cgroup` and `snap restore --cgroup`:
//! a cgroup v2 as a service manager sees a service (docs/systemd.md).
//!
//! systemd itself does not run on these machines, so the tests do what a
//! unit's hooks do: the "service" is started inside its cgroup and
//! daemonizes (double fork: its main process has init as parent); the dump
//! runs from inside that cgroup, as `ExecStop=` does; the restore runs
//! from inside a cgroup with `-d --pidfile`, as `ExecStart=` of a
//! `Type=forking` unit does.
//!
//! Run: `cargo test --release --test e2e_cgroup -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A cgroup subtree made for one test, `<mount>/snap-e2e-<test pid>-<tag>`;
/// dropping it kills what is left in it and removes it.
struct TestCgroup {
    top: PathBuf,
}

impl TestCgroup {
    fn new(mnt: &Path, tag: &str) -> TestCgroup {
        let top = mnt.join(format!("snap-e2e-{}-{tag}", std::process::id()));
        let _ = fs::create_dir(&top);
        TestCgroup { top }
    }
    /// A cgroup below the top one (made), absolute.
    fn child(&self, rel: &str) -> PathBuf {
        let p = self.top.join(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let mut dirs: Vec<PathBuf> = Vec::new();
        collect_dirs(&self.top, &mut dirs);
        for d in &dirs {
            for p in members(d) {
                kill(p, libc::SIGKILL);
            }
        }
        let all: Vec<i32> = dirs.iter().flat_map(|d| members(d)).collect();
        let _ = wait_gone(&all, secs(20));
        // Deepest first.
        for d in dirs.iter().rev() {
            let _ = fs::write(d.join("cgroup.freeze"), "0");
            let _ = fs::remove_dir(d);
        }
    }
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn members(cg: &Path) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    v.sort();
    v
}

/// The process's cgroup v2 path relative to the mount, e.g. "/a/b".
fn cgroup_of(pid: i32) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("?").to_string()
}

/// `cmd` started inside cgroup `cg` (it moves itself in before exec).
fn in_cgroup(cmd: &mut Command, cg: &Path) {
    let procs = std::ffi::CString::new(cg.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: open/write/close are async-signal-safe; the buffer and path
    // outlive the call (moved into the closure).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
}

/// Start PROG ARGS inside cgroup `cg` (registered with the reaper).
fn start_in(r: &Reaper, cg: &Path, prog: &Path, args: &[&str]) -> i32 {
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null());
    in_cgroup(&mut cmd, cg);
    let pid = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", prog.display())).id() as i32;
    r.add(pid);
    pid
}

/// Run snap from inside cgroup `cg`, as a unit's ExecStart=/ExecStop= runs.
/// Its stdout and stderr go to files, not pipes: a program that `snap
/// service start` starts afresh inherits them (as it would the journal)
/// and would keep a pipe open.
fn snap_in(cg: &Path, args: &[&str]) -> SnapRun {
    let t0 = std::time::Instant::now();
    let dir = tmp_root();
    fs::create_dir_all(&dir).unwrap();
    let (o, e) = (dir.join(format!("snap-in-{}.out", std::process::id())), dir.join(format!("snap-in-{}.err", std::process::id())));
    let mut cmd = Command::new(snap_bin());
    cmd.args(args).stdin(Stdio::null()).stdout(fs::File::create(&o).unwrap()).stderr(fs::File::create(&e).unwrap());
    in_cgroup(&mut cmd, cg);
    let status = cmd.status().unwrap_or_else(|e| panic!("run snap {args:?}: {e}"));
    let r = SnapRun {
        status,
        stdout: fs::read_to_string(&o).unwrap_or_default(),
        stderr: fs::read_to_string(&e).unwrap_or_default(),
        elapsed: t0.elapsed(),
    };
    eprintln!("snap {} (in {}) -> {:?}\n  stderr: {}", args.join(" "), cg.display(), r.status, r.stderr.trim_end());
    r
}

/// A daemon in the manner of a classic service: the launcher forks, the
/// child calls setsid and forks again, both parents exit; the daemon forks
/// a worker that sends consecutive numbers through a pipe, and the daemon
/// appends each to OUT. Numbers arrive only while both run.
const DAEMON: &str = r#"
import os, sys, time
out = sys.argv[1]
if os.fork(): os._exit(0)
os.setsid()
if os.fork(): os._exit(0)
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    n = 0
    while True:
        n += 1
        os.write(w, b"%d\n" % n)
        time.sleep(0.005)
os.close(w)
f = open(out, "ab", buffering=0)
buf = b""
while True:
    buf += os.read(r, 4096)
    *lines, buf = buf.split(b"\n")
    for l in lines:
        f.write(l + b"\n")
"#;

/// A service cgroup (nested, as `system.slice/web.service`) holding a
/// double-forked daemon with its worker and an independent `sleep`:
/// dumped from inside by `--cgroup` with its relative path, restored from
/// inside with `-d --pidfile`. Every process comes back with its pid in the
/// cgroup, and the numbers go on without a gap or a repeat.
#[test]
fn service_dumped_from_inside_and_restored_into_it() {
    let _l = lock();
    let name = "service_dumped_from_inside_and_restored_into_it";
    let mnt = need!(cgroup2_mount(), name, "no cgroup v2 mount");
    let py = need!(python3(), name, "no python3");
    let t = TempDir::new("cg-svc");
    let r = Reaper::new();
    let cgs = TestCgroup::new(&mnt, "svc");
    let svc = cgs.child("system.slice/web.service");
    let rel = svc.strip_prefix(&mnt).unwrap().to_str().unwrap().to_string();
    let out = t.join("numbers");

    let mut launch = Command::new(&py);
    launch.args(["-c", DAEMON, out.to_str().unwrap()]).stdin(Stdio::null());
    in_cgroup(&mut launch, &svc);
    assert!(launch.status().unwrap().success(), "launcher failed");
    let sleep_pid = start_in(&r, &svc, Path::new("/bin/sleep"), &["1000"]);
    // daemon + worker + sleep; the launcher and its first child are gone.
    let before: Vec<i32> = wait_for("daemon, worker and sleep in the service cgroup", secs(30), || {
        let m = members(&svc);
        (m.len() == 3 && m.iter().all(|&p| proc_state(p).is_some_and(|s| s != 'Z'))).then_some(m)
    });
    r.add_all(&before);
    // The daemon: the member other than sleep whose parent is not a member.
    let daemon = *before
        .iter()
        .find(|&&p| p != sleep_pid && !before.contains(&ppid(p).unwrap_or(0)))
        .expect("a daemon whose parent is outside the cgroup");
    wait_counter_past(&out, 0, 20, secs(30));

    let img = t.sub("img");
    let run = snap_in(&svc, &["dump", "--cgroup", &rel, "-D", img.to_str().unwrap()]);
    assert!(run.ok(), "dump --cgroup from inside: {}", run.describe());
    assert!(run.stderr.contains("moving out of cgroup"), "{}", run.stderr);
    wait_gone(&before, secs(30)).unwrap();
    assert!(members(&svc).is_empty(), "the cgroup is empty after the dump: {:?}", members(&svc));
    let stopped_at = last_number(&out).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&fs::read_to_string(img.join("inventory.json")).unwrap()).unwrap();
    assert_eq!(inv["cgroup"], rel.as_str(), "{inv}");
    let roots: BTreeSet<i64> = inv["roots"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(roots, [daemon as i64, sleep_pid as i64].into_iter().collect(), "roots: the daemon and sleep");
    let show = snap(&["image", "show", img.to_str().unwrap()]);
    assert!(show.stdout.contains(&format!("cgroup         {rel}")), "{}", show.stdout);

    let pidfile = t.join("pid");
    let run = snap_in(&svc, &["restore", "-D", img.to_str().unwrap(), "-d", "--pidfile", pidfile.to_str().unwrap()]);
    assert!(run.ok(), "restore from inside: {}", run.describe());
    assert_eq!(members(&svc), before, "every process back in the service cgroup with its pid");
    for &p in &before {
        assert_eq!(cgroup_of(p), format!("/{rel}"), "pid {p}");
    }
    let main: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(roots.contains(&(main as i64)), "pidfile names a root: {main}");
    wait_counter_past(&out, stopped_at, 50, secs(30));
    assert_consecutive(&numbers(&out), "daemon output across dump and restore");
}

/// `--cgroup` with an absolute path dumps from outside; `restore --cgroup`
/// into a cgroup that does not exist yet makes it and starts every process
/// there, not in snap's own cgroup.
#[test]
fn restore_into_a_new_cgroup() {
    let _l = lock();
    let name = "restore_into_a_new_cgroup";
    let mnt = need!(cgroup2_mount(), name, "no cgroup v2 mount");
    let t = TempDir::new("cg-move");
    let r = Reaper::new();
    let cgs = TestCgroup::new(&mnt, "move");
    let a = cgs.child("a");
    start_in(&r, &a, Path::new("/bin/sh"), &["-c", "sleep 1000 & sleep 1000; wait"]);
    let before = wait_for("sh and two sleeps", secs(30), || {
        let m = members(&a);
        (m.len() == 3).then_some(m)
    });
    let img = t.sub("img");
    let run = snap(&["dump", "--cgroup", a.to_str().unwrap(), "-D", img.to_str().unwrap()]);
    assert!(run.ok(), "{}", run.describe());
    assert!(!run.stderr.contains("moving out"), "snap was not inside: {}", run.stderr);
    // sh is our child: reap it so that its pid is free.
    wait_gone(&before, secs(30)).unwrap();
    let b = cgs.top.join("b/c");
    assert!(!b.exists());
    let rel_b = b.strip_prefix(&mnt).unwrap().to_str().unwrap().to_string();
    r.add_all(&before);
    let run = snap(&["restore", "-D", img.to_str().unwrap(), "-d", "--cgroup", &rel_b]);
    assert!(run.ok(), "{}", run.describe());
    assert_eq!(members(&b), before, "restored into the new cgroup");
    assert!(members(&a).is_empty());
    assert_ne!(cgroup_of(std::process::id() as i32), format!("/{rel_b}"), "the test itself did not move");
}

/// Wrong paths are refused naming them; a dump that fails after the freeze
/// (a netlink socket is not supported) thaws the cgroup, and its process
/// runs on.
#[test]
fn refusals_name_the_cgroup_and_thaw_it() {
    let _l = lock();
    let name = "refusals_name_the_cgroup_and_thaw_it";
    let mnt = need!(cgroup2_mount(), name, "no cgroup v2 mount");
    let py = need!(python3(), name, "no python3");
    let t = TempDir::new("cg-refuse");
    let r = Reaper::new();
    let cgs = TestCgroup::new(&mnt, "refuse");
    let d = t.join("img").to_str().unwrap().to_string();

    let missing = cgs.top.join("nope");
    let run = snap(&["dump", "--cgroup", missing.to_str().unwrap(), "-D", &d]);
    assert!(!run.ok() && run.stderr.contains(missing.to_str().unwrap()) && run.stderr.contains("no such cgroup"), "{}", run.describe());
    let run = snap(&["dump", "--cgroup", "/tmp", "-D", &d]);
    assert!(!run.ok() && run.stderr.contains("not under the cgroup v2 mount"), "{}", run.describe());
    let run = snap(&["dump", "--cgroup", mnt.to_str().unwrap(), "-D", &d]);
    assert!(!run.ok() && run.stderr.contains("root cgroup"), "{}", run.describe());
    let run = snap(&["dump", "--cgroup", "x/../y", "-D", &d]);
    assert!(!run.ok() && run.stderr.contains(".."), "{}", run.describe());
    let empty = cgs.child("empty");
    let run = snap(&["dump", "--cgroup", empty.to_str().unwrap(), "-D", &d]);
    assert!(!run.ok() && run.stderr.contains("no process"), "{}", run.describe());
    assert_eq!(fs::read_to_string(empty.join("cgroup.freeze")).unwrap().trim(), "0", "thawed after the refusal");
    assert!(!Path::new(&d).exists(), "no image left behind");

    let bad = cgs.child("bad");
    let counter = "import socket, sys, time\ns = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nn = 0\nwhile True:\n    n += 1\n    open(sys.argv[1], 'w').write(str(n))\n    time.sleep(0.01)\n";
    let pid = start_in(&r, &bad, &py, &["-c", counter, t.join("n").to_str().unwrap()]);
    wait_for("the netlink holder's first number", secs(30), || read_opt(&t.join("n")).filter(|s| !s.is_empty()));
    let run = snap(&["dump", "--cgroup", bad.to_str().unwrap(), "-D", &d]);
    assert!(!run.ok(), "{}", run.describe());
    assert!(run.stderr.contains(&format!("pid {pid}")), "names the process: {}", run.stderr);
    assert_eq!(fs::read_to_string(bad.join("cgroup.freeze")).unwrap().trim(), "0", "thawed after the failed dump");
    let n0: u64 = read_opt(&t.join("n")).unwrap_or_default().trim().parse().unwrap_or(0);
    wait_for("the process to go on counting", secs(30), || {
        let n: u64 = read_opt(&t.join("n")).unwrap_or_default().trim().parse().unwrap_or(0);
        (n > n0 + 5).then_some(())
    });
    assert!(!Path::new(&d).exists(), "no image left behind");
}

/// Appends consecutive numbers to argv[1], one every 5 ms.
const COUNTER: &str = "import sys, time\nf = open(sys.argv[1], 'ab', buffering=0)\nn = 0\nwhile True:\n    n += 1\n    f.write(b'%d\\n' % n)\n    time.sleep(0.005)\n";

/// `snap service start` / `snap service stop` as a unit's ExecStart= and
/// ExecStop= run them (inside the service's cgroup): the first start has no
/// checkpoint and starts the program afresh; stop checkpoints the cgroup
/// into ROOT/current; the next start restores it (same pid, the count goes
/// on without a gap); a second stop keeps the first checkpoint as
/// ROOT/previous; a damaged current checkpoint makes start fall back to a
/// fresh program, saying why.
#[test]
fn service_hooks_stop_and_start() {
    let _l = lock();
    let name = "service_hooks_stop_and_start";
    let mnt = need!(cgroup2_mount(), name, "no cgroup v2 mount");
    let py = need!(python3(), name, "no python3");
    let t = TempDir::new("cg-hooks");
    let r = Reaper::new();
    let cgs = TestCgroup::new(&mnt, "hooks");
    let svc = cgs.child("system.slice/count.service");
    let root = t.join("ckpt");
    let (root_s, pidfile) = (root.to_str().unwrap().to_string(), t.join("pid"));
    let out = t.join("numbers");
    let start = || {
        let run = snap_in(
            &svc,
            &["service", "start", "-D", &root_s, "--pidfile", pidfile.to_str().unwrap(), "--", py.to_str().unwrap(), "-c", COUNTER, out.to_str().unwrap()],
        );
        assert!(run.ok(), "service start: {}", run.describe());
        let pid: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        r.add(pid);
        assert_eq!(members(&svc), vec![pid], "the service runs in its cgroup");
        (run, pid)
    };
    let stop = || {
        let run = snap_in(&svc, &["service", "stop", "-D", &root_s]);
        assert!(run.ok(), "service stop: {}", run.describe());
        wait_for("the service cgroup to empty", secs(30), || members(&svc).is_empty().then_some(()));
        assert!(!root.join("next").exists());
        last_number(&out).unwrap()
    };

    let (run, pid) = start();
    assert!(run.stderr.contains("afresh"), "{}", run.stderr);
    wait_counter_past(&out, 0, 20, secs(30));
    let at = stop();
    assert!(root.join("current/inventory.json").exists());
    wait_gone(&[pid], secs(30)).unwrap();

    let (run, pid2) = start();
    assert!(run.stderr.contains("restored"), "{}", run.stderr);
    assert_eq!(pid2, pid, "the same process came back");
    wait_counter_past(&out, at, 20, secs(30));
    assert_consecutive(&numbers(&out), "count across stop and start");
    let at2 = stop();
    assert!(at2 > at);
    assert!(root.join("previous/inventory.json").exists() && root.join("current/inventory.json").exists());
    wait_gone(&[pid], secs(30)).unwrap();

    // One flipped byte in the current checkpoint's page pack: the restore
    // is refused and the service starts afresh (counting from 1 again).
    let pack = root.join("current/pages.pack");
    let mut b = fs::read(&pack).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    fs::write(&pack, b).unwrap();
    fs::write(&out, b"").unwrap();
    let (run, _) = start();
    assert!(run.stderr.contains("starting the program afresh") && run.stderr.contains("page store damaged"), "{}", run.stderr);
    wait_for("a fresh count", secs(30), || numbers(&out).first().filter(|&&n| n == 1).map(|_| ()));
}

/// The unit shipped in docs/systemd/ passes `systemd-analyze verify` (with
/// snap's path replaced by the one under test), and its two hooks are the
/// `snap service` commands tested above.
#[test]
fn shipped_unit_verifies() {
    let _l = lock();
    let name = "shipped_unit_verifies";
    let analyze = need!(["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].iter().map(Path::new).find(|p| p.exists()), name, "no systemd-analyze");
    let t = TempDir::new("cg-unit");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/systemd/counter.service");
    let text = fs::read_to_string(&src).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/snap service start") && text.contains("ExecStop=/usr/local/bin/snap service stop"), "{text}");
    let unit = t.join("counter.service");
    fs::write(&unit, text.replace("/usr/local/bin/snap", snap_bin().to_str().unwrap())).unwrap();
    let o = Command::new(analyze).arg("verify").arg(&unit).output().unwrap();
    assert!(o.status.success(), "systemd-analyze verify {}: {}{}", unit.display(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}
