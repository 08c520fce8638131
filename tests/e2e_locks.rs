//! End-to-end tests for file locks (flock, POSIX record locks, OFD locks):
//! held again after restore, seen from another process, released when the
//! restored holder dies; a process blocked in F_SETLKW waits again after
//! restore; leases and POSIX locks on mapped files are refused at dump.
//!
//! Run: `cargo test --release --test e2e_locks -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Probe the locks of fixtures/locks_hold (hold mode) from another process:
/// "A B1019 B3039 C" as 1 (conflicts) / 0 (free) / OFD type for C.
const PROBE: &str = r#"
import fcntl, os, struct, sys, subprocess
d = sys.argv[1]
out = []
# flock -n on A: fails (exit 1) while the fixture holds its flock.
r = subprocess.run(["flock", "-n", os.path.join(d, "A"), "true"])
out.append("A=" + ("locked" if r.returncode != 0 else "free"))
with open(os.path.join(d, "B"), "r+b") as f:
    for lo in (10, 30):
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, lo, 0)
            fcntl.lockf(f, fcntl.LOCK_UN, 10, lo, 0)
            out.append("B%d=free" % lo)
        except OSError:
            out.append("B%d=locked" % lo)
fd = os.open(os.path.join(d, "C"), os.O_RDWR)
fl = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, 0, 0, 0, 0)
res = fcntl.fcntl(fd, 36, fl)  # F_OFD_GETLK
t = struct.unpack("hhxxxxqqixxxx", res)[0]
out.append("C=" + {fcntl.F_RDLCK: "read", fcntl.F_WRLCK: "write", fcntl.F_UNLCK: "free"}[t])
print(" ".join(out))
"#;

fn probe(py: &Path, d: &Path) -> String {
    let o = Command::new(py).arg("-c").arg(PROBE).arg(d).output().expect("run python3");
    assert!(o.status.success(), "probe failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

const HELD: &str = "A=locked B10=locked B30=free C=read";
const FREE: &str = "A=free B10=free B30=free C=free";

#[test]
fn locks_held_again_after_restore() {
    let _l = lock();
    let bin = need!(fixture("locks_hold"), "locks_held_again_after_restore", "gcc not found");
    let py = need!(python3(), "locks_held_again_after_restore", "python3 not found");
    let t = TempDir::new("locks_hold");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg("hold"), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    assert_eq!(probe(&py, &d), HELD, "before dump");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    assert_eq!(probe(&py, &d), FREE, "after dump (holder killed)");
    restore_ok(&img, &r, &[pid]);
    assert_eq!(probe(&py, &d), HELD, "after restore");
    let res = signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30));
    assert!(res.starts_with("ok"), "fixture's own check: {res}");
    kill(pid, libc::SIGKILL);
    wait_gone(&[pid], secs(30)).unwrap();
    assert_eq!(probe(&py, &d), FREE, "after the restored holder was killed");
}

#[test]
fn blocked_in_setlkw_waits_again() {
    blocked_waits_again("wait", libc::SYS_fcntl);
}

#[test]
fn blocked_in_flock_waits_again() {
    blocked_waits_again("fwait", libc::SYS_flock);
}

/// The holder and, as its child, a waiter blocked in F_SETLKW / flock():
/// after restore the waiter still waits, and gets the lock when the holder
/// lets go.
fn blocked_waits_again(mode: &str, nr: i64) {
    let _l = lock();
    let bin = need!(fixture("locks_hold"), mode, "gcc not found");
    let t = TempDir::new(&format!("locks_{mode}"));
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg(mode), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let child: i32 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    r.add(child);
    wait_in_syscall(child, child, &[nr], secs(30));
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    assert!(locks.lines().any(|l| l.contains("->") && l.contains(&format!(" {child} "))), "child not a waiter:\n{locks}");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid, child]);
    // Still waiting after restore (the call was re-issued), not given the lock.
    wait_in_syscall(child, child, &[nr], secs(30));
    std::thread::sleep(secs(1) / 2);
    assert!(!d.join("got").exists(), "the waiter got the lock while the holder still had it");
    let res = signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30));
    assert!(res.starts_with("ok"), "holder: {res}");
    assert_eq!(wait_file(&d, "got", secs(30)).trim(), "ok");
}

fn refused(mode: &str, want: &[&str]) {
    let _l = lock();
    let bin = need!(fixture("locks_hold"), mode, "gcc not found");
    let t = TempDir::new(&format!("locks_{mode}"));
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg(mode), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let img = t.sub("img");
    let run = dump_raw(&[pid], &img, &[]);
    assert!(!run.ok(), "dump of {mode} should be refused: {}", run.describe());
    assert!(!run.stderr.contains("panicked"), "{}", run.describe());
    assert!(run.stderr.contains(&pid.to_string()), "error does not name the pid: {}", run.stderr);
    for w in want {
        assert!(run.stderr.contains(w), "error lacks {w:?}: {}", run.stderr);
    }
    assert!(alive(pid) && proc_state(pid) != Some('Z'), "refused dump must leave the process running");
    assert!(!img.join("inventory.json").exists());
}

#[test]
fn lease_refused() {
    refused("lease", &["LEASE", "not supported"]);
}

#[test]
fn posix_lock_on_mapped_file_refused() {
    refused("mapped", &["fd 3", "maps", "not supported"]);
}
