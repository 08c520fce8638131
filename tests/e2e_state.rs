//! End-to-end tests for the process state of issue 2 that tests/e2e.rs does
//! not cover: attributes, descriptors, signals, sessions, memory layouts,
//! refusals and damaged images, --shell-job. Each workload (fixtures/st_*.c)
//! checks its own state when sent SIGUSR1 and writes "ok" or "FAIL: what";
//! the tests also compare what /proc shows before the dump and after the
//! restore.
//!
//! Run: `cargo test --release --test e2e_state -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;


fn assert_ok(res: &str, what: &str) {
    assert!(res.starts_with("ok"), "{what}: {}", res.trim());
}

fn check(d: &Path, pid: i32, what: &str) {
    assert_ok(&signal_and_result(d, pid, libc::SIGUSR1, "result", secs(30)), what);
}

fn pids_of(ready: &str) -> Vec<i32> {
    ready.split_whitespace().map(|s| s.parse().unwrap()).collect()
}

/// Fields of /proc/PID/stat after the comm, numbered as in proc(5) (3 = state).
fn stat_field(pid: i32, n: usize) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let r = s.rfind(')').unwrap_or(0);
    s[r + 2..].split_whitespace().nth(n - 3).unwrap_or("").to_string()
}

fn limits_line(pid: i32, name: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default().lines().find(|l| l.starts_with(name)).unwrap_or("").to_string()
}

fn no_panic(run: &SnapRun) {
    assert!(!run.stderr.contains("panicked"), "snap panicked: {}", run.describe());
}

// ------------------------------------------------------------------ 1 attributes

fn attrs_snapshot(pid: i32) -> Vec<(&'static str, String)> {
    vec![
        ("cwd", fs::read_link(format!("/proc/{pid}/cwd")).map(|p| p.display().to_string()).unwrap_or_default()),
        ("umask", status_field(pid, "Umask").unwrap_or_default()),
        ("NOFILE", limits_line(pid, "Max open files")),
        ("STACK", limits_line(pid, "Max stack size")),
        ("nice", stat_field(pid, 19)),
        ("policy", stat_field(pid, 41)),
        ("personality", fs::read_to_string(format!("/proc/{pid}/personality")).unwrap_or_default()),
        ("comm", fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default()),
        ("NoNewPrivs", status_field(pid, "NoNewPrivs").unwrap_or_default()),
    ]
}

/// cwd, umask 027, RLIMIT_NOFILE 200/4096, RLIMIT_STACK soft 6 MiB, nice 5,
/// ADDR_NO_RANDOMIZE, PR_SET_NAME, no_new_privs, dumpable 0, SCHED_BATCH:
/// all the same after restore (seen from /proc and by the process).
#[test]
fn attributes_restored() {
    let _l = lock();
    let bin = need!(fixture("st_attrs"), "attributes_restored", "gcc not found");
    let t = TempDir::new("attrs");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    check(&d, pid, "before dump");
    let before = attrs_snapshot(pid);
    assert_eq!(before[5].1, "3", "fixture did not get SCHED_BATCH");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    let after = attrs_snapshot(pid);
    for (b, a) in before.iter().zip(after.iter()) {
        assert_eq!(b, a, "{} differs after restore", b.0);
    }
    check(&d, pid, "after restore");
}

// ------------------------------------------------------------------ 2 descriptors

/// fd -> (link target, pos, flags) of every descriptor of pid.
fn fd_table(pid: i32) -> FdTable {
    let mut m = BTreeMap::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let fd: i32 = e.file_name().to_string_lossy().parse().unwrap();
        let link = fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default();
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let get = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("").trim().to_string();
        m.insert(fd, (link, get("pos:"), get("flags:")));
    }
    m
}

type FdTable = BTreeMap<i32, (String, String, String)>;

/// Replace the inode numbers of "pipe:[N]" (new after a restore) with their
/// order of first appearance over both tables, keeping which fds share one.
fn anon_ids((a, b): (FdTable, FdTable)) -> (FdTable, FdTable) {
    let mut seen: Vec<String> = Vec::new();
    let mut norm = |t: FdTable| -> FdTable {
        t.into_iter()
            .map(|(fd, (link, pos, fl))| {
                let link = if link.starts_with("pipe:[") {
                    let i = seen.iter().position(|x| *x == link).unwrap_or_else(|| {
                        seen.push(link.clone());
                        seen.len() - 1
                    });
                    format!("pipe#{i}")
                } else {
                    link
                };
                (fd, (link, pos, fl))
            })
            .collect()
    };
    let a = norm(a);
    let b = norm(b);
    (a, b)
}

/// O_APPEND file, a file at an offset with close-on-exec, one description
/// shared by parent and child (a write by the child moves the parent's
/// offset), a deleted-but-open file, /dev/null, /dev/zero, /dev/urandom, a
/// FIFO with buffered bytes: same fd numbers, links, offsets and flags, and
/// the fixture's own checks pass.
#[test]
fn descriptors_restored() {
    let _l = lock();
    let bin = need!(fixture("st_fds"), "descriptors_restored", "gcc not found");
    let t = TempDir::new("fds");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    let p = pids_of(&wait_ready(&d, pid, secs(30)));
    let child = p[1];
    check(&d, pid, "before dump");
    let before = (fd_table(pid), fd_table(child));
    assert!(before.0.contains_key(&18) && before.0[&13].0.ends_with("(deleted)"), "fixture fds: {:?}", before.0);
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid, child]);
    let after = (fd_table(pid), fd_table(child));
    let (before, after) = (anon_ids(before), anon_ids(after));
    assert_eq!(before.0, after.0, "parent's fd table (link, pos, flags) differs");
    assert_eq!(before.1, after.1, "child's fd table (link, pos, flags) differs");
    assert!(!d.join("deleted.txt").exists(), "restore left the deleted file linked in the directory");
    check(&d, pid, "after restore");
}

// ------------------------------------------------------------------ 3 signals

fn sig_snapshot(pid: i32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for tid in tids(pid) {
        let st = format!("/proc/{pid}/task/{tid}/status");
        for f in ["SigPnd", "ShdPnd", "SigBlk", "SigCgt", "SigIgn"] {
            v.push((format!("task {tid} {f}"), status_field_of(&st, f).unwrap_or_default()));
        }
    }
    v
}

/// Pending signals (process-directed, twice with values; thread-directed
/// with a value) survive and are delivered with their si_value; handlers
/// keep SA_SIGINFO|SA_RESTART and sa_mask; ITIMER_REAL keeps firing.
#[test]
fn signals_pending_handlers_itimer() {
    let _l = lock();
    let bin = need!(fixture("st_signals"), "signals_pending_handlers_itimer", "gcc not found");
    let t = TempDir::new("signals");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    let p = pids_of(&wait_ready(&d, pid, secs(30)));
    check(&d, pid, "before dump");
    let before = sig_snapshot(pid);
    let thr = p[1];
    assert!(before.iter().any(|(k, v)| k == &format!("task {thr} SigPnd") && v != "0000000000000000"), "thread-directed signal not pending before dump: {before:?}");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    let after = sig_snapshot(pid);
    // The self-check delivers the signals: run it before failing on /proc,
    // so a failure shows both views.
    let res = signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30));
    assert_eq!(before, after, "signal state in /proc differs after restore (fixture says: {})", res.trim());
    assert_ok(&res, "after restore");
}

// ------------------------------------------------------------------ 4 sessions

fn ids(pid: i32) -> (String, String, String) {
    (stat_field(pid, 4), stat_field(pid, 5), stat_field(pid, 6))
}

/// Session leader root; a child with its own group that a grandchild and a
/// sibling joined; a child with its own session with a grandchild in its
/// own group; a child in the root's group: ppid/pgid/sid of each the same.
#[test]
fn sessions_and_process_groups() {
    let _l = lock();
    let bin = need!(fixture("st_sessions"), "sessions_and_process_groups", "gcc not found");
    let t = TempDir::new("sessions");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    let all = pids_of(&wait_ready(&d, pid, secs(30)));
    assert_eq!(all.len(), 8);
    check(&d, pid, "before dump");
    let before: Vec<_> = all.iter().map(|&p| (p, ids(p))).collect();
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &all);
    let after: Vec<_> = all.iter().map(|&p| (p, ids(p))).collect();
    for (b, a) in before.iter().zip(after.iter()) {
        assert_eq!(b, a, "pid {}: (ppid, pgid, sid) differ", b.0);
    }
    check(&d, pid, "after restore");
}

// ------------------------------------------------------------------ 5 memory

fn maps_layout(pid: i32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // range, perms, offset, path (dev/inode left out)
            format!("{} {} {} {}", f[0], f[1], f[2], f.get(5).copied().unwrap_or(""))
        })
        .collect()
}

/// Private file mapping with COW pages (file unchanged on disk), MAP_SHARED
/// file mapping still shared with the file, a PROT_NONE page with content,
/// a heap grown with sbrk that can shrink and grow after restore, a
/// mremap'ed region; /proc/PID/maps identical.
#[test]
fn memory_layouts_restored() {
    let _l = lock();
    let bin = need!(fixture("st_mem"), "memory_layouts_restored", "gcc not found");
    let t = TempDir::new("mem");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    check(&d, pid, "before dump");
    let priv_before = fs::read(d.join("priv.bin")).unwrap();
    let maps_before = maps_layout(pid);
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    assert_eq!(maps_layout(pid), maps_before, "/proc/PID/maps differs after restore");
    check(&d, pid, "after restore");
    assert_eq!(fs::read(d.join("priv.bin")).unwrap(), priv_before, "priv.bin changed on disk");
}

/// A file mapped by the process changes between dump and restore: restore
/// refuses, names the file, creates no process, does not panic.
#[test]
fn restore_refuses_changed_mapped_file() {
    let _l = lock();
    let bin = need!(fixture("st_mem"), "restore_refuses_changed_mapped_file", "gcc not found");
    let t = TempDir::new("memchg");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    // Same size, other content and mtime.
    let f = d.join("priv.bin");
    let mut b = fs::read(&f).unwrap();
    b[0] ^= 0xff;
    std::thread::sleep(std::time::Duration::from_millis(20)); // let mtime tick (coarse clocks)
    fs::write(&f, &b).unwrap();
    r.add(pid);
    let run = snap(&["restore", "-D", img.to_str().unwrap(), "-d"]);
    no_panic(&run);
    assert!(!run.ok(), "restore with a changed mapped file succeeded: {}", run.describe());
    assert!(run.stderr.contains("priv.bin"), "error does not name priv.bin: {}", run.stderr);
    wait_gone(&[pid], secs(10)).unwrap_or_else(|e| panic!("failed restore left the process behind: {e}"));
}

// ------------------------------------------------------------------ 6 errors

/// Dump `sleep`, damage a copy of the image with `damage`, restore: must
/// fail naming `names`, exit non-zero, no panic, no process.
fn damaged_image(test: &str, names: &dyn Fn(i32) -> String, damage: &dyn Fn(&Path, i32)) {
    let _l = lock();
    let t = TempDir::new(test);
    let r = Reaper::new();
    let pid = spawn(&r, Command::new("sleep").arg("1000"), &t.join("log"));
    wait_in_syscall(pid, pid, &[35, 230], secs(10));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    damage(&img, pid);
    r.add(pid);
    let run = snap(&["restore", "-D", img.to_str().unwrap(), "-d"]);
    no_panic(&run);
    assert!(!run.ok(), "restore of a damaged image succeeded: {}", run.describe());
    let want = names(pid);
    assert!(run.stderr.contains(&want), "error does not name {want}: {}", run.stderr);
    assert!(!alive(pid), "failed restore created pid {pid}");
}

#[test]
fn damaged_image_truncated_pages_pack() {
    damaged_image("dmg_pack", &|_| "pages.pack".into(), &|img, _| {
        let p = img.join("pages.pack");
        let len = fs::metadata(&p).unwrap().len();
        assert!(len >= 8192, "pages.pack only {len} bytes");
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn damaged_image_flipped_byte_in_proc_json() {
    damaged_image("dmg_proc", &|pid| format!("proc-{pid}.json"), &|img, pid| {
        let p = img.join(format!("proc-{pid}.json"));
        let mut b = fs::read(&p).unwrap();
        // A digit inside the JSON: still valid JSON, wrong content.
        let i = b.iter().enumerate().skip(b.len() / 2).find(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).unwrap();
        b[i] = if b[i] == b'9' { b'1' } else { b[i] + 1 };
        fs::write(&p, &b).unwrap();
    });
}

#[test]
fn damaged_image_format_version() {
    damaged_image("dmg_ver", &|_| "inventory.json".into(), &|img, _| {
        let p = img.join("inventory.json");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        v["format_version"] = serde_json::json!(99);
        fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    });
}

/// A hostile image whose process names itself as its own child (a cycle in
/// the tree, checksums made to match): refused before anything is forked.
#[test]
fn damaged_image_process_tree_cycle() {
    damaged_image("dmg_cycle", &|pid| format!("pid {pid}"), &|img, pid| {
        edit(img, &format!("proc-{pid}.json"), |v| v["children"] = serde_json::json!([pid]));
    });
}

/// Start st_refuse MODE, dump: must be refused with an error containing
/// `words` (plus the pid), and the process must keep running untraced.
fn refused(test: &str, mode: &str, words: &dyn Fn(i32, i32) -> Vec<String>) {
    let _l = lock();
    let bin = need!(fixture("st_refuse"), test, "gcc not found");
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg(mode), &t.join("log"));
    let p = pids_of(&wait_ready(&d, pid, secs(30)));
    let count = d.join("count");
    wait_counter_past(&count, 0, 3, secs(30));
    let img = t.sub("img");
    let run = dump_raw(&[pid], &img, &[]);
    no_panic(&run);
    assert!(!run.ok(), "dump should have been refused: {}", run.describe());
    let e = run.stderr.to_lowercase();
    for w in std::iter::once(pid.to_string()).chain(words(pid, p[1])) {
        assert!(e.contains(&w.to_lowercase()), "error does not contain {w:?}: {}", run.stderr);
    }
    let st = proc_state(pid).unwrap();
    assert!(st == 'S' || st == 'R', "state {st} after refused dump");
    assert_eq!(status_field(pid, "TracerPid").as_deref(), Some("0"), "still traced");
    let at = last_number(&count).unwrap();
    wait_counter_past(&count, at, 5, secs(10));
    assert_consecutive(&numbers(&count), "counter");
}

#[test]
fn refuses_seccomp_and_leaves_it_running() {
    refused("refuse_seccomp", "seccomp", &|_, _| vec!["seccomp".into()]);
}

#[test]
fn refuses_userfaultfd_and_leaves_it_running() {
    refused("refuse_uffd", "uffd", &|_, fd| vec![format!("fd {fd}"), "userfaultfd".into()]);
}

// ------------------------------------------------------------------ 7 --shell-job

struct Pty {
    master: fs::File,
    slave: fs::File,
    name: PathBuf,
}

fn open_pty() -> Result<Pty, String> {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty with valid out-pointers; name/termios/winsize null.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if rc != 0 {
        return Err(format!("openpty: {}", std::io::Error::last_os_error()));
    }
    use std::os::fd::FromRawFd;
    // SAFETY: openpty returned two fresh fds that we now own.
    let (master, slave) = unsafe { (fs::File::from_raw_fd(m), fs::File::from_raw_fd(s)) };
    let name = fs::read_link(format!("/proc/self/fd/{s}")).map_err(|e| e.to_string())?;
    Ok(Pty { master, slave, name })
}

/// Collect everything the master side receives, in a thread.
fn drain(master: &fs::File) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::io::Read;
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (b2, mut m) = (buf.clone(), master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = m.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b2.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// A bash loop on a pty (its controlling terminal) dumped with --shell-job
/// and restored with --shell-job under another pty: it continues and writes
/// to the new terminal. Without --shell-job the dump is refused.
#[test]
fn shell_job_on_a_pty() {
    let _l = lock();
    let test = "shell_job_on_a_pty";
    let pty1 = match open_pty() {
        Ok(p) => p,
        Err(e) => return skip(test, &format!("no pty: {e}")),
    };
    let t = TempDir::new("shelljob");
    let r = Reaper::new();
    let count = t.join("count");
    let out1 = drain(&pty1.master);
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!("i=0; while :; do echo $i >> {}; echo tick$i; i=$((i+1)); sleep 0.05; done", count.display()));
    cmd.stdin(pty1.slave.try_clone().unwrap()).stdout(pty1.slave.try_clone().unwrap()).stderr(pty1.slave.try_clone().unwrap());
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    drop(child);
    r.add(pid);
    wait_counter_past(&count, 0, 5, secs(30));
    assert!(String::from_utf8_lossy(&out1.lock().unwrap()).contains("tick"), "no output on pty 1");
    let img = t.sub("img");
    let refused = dump_raw(&[pid], &img, &["--leave-running"]);
    assert!(!refused.ok() && refused.stderr.contains("shell-job"), "dump of a pty job without --shell-job: {}", refused.describe());
    let img = t.sub("img2");
    dump_kill(&[pid], &img, &["--shell-job"]);
    let at = last_number(&count).unwrap();
    drop(pty1);
    let pty2 = open_pty().unwrap();
    let out2 = drain(&pty2.master);
    r.add(pid);
    let o = Command::new(snap_bin())
        .args(["restore", "-D", img.to_str().unwrap(), "-d", "--shell-job"])
        .stdin(pty2.slave.try_clone().unwrap())
        .stdout(pty2.slave.try_clone().unwrap())
        .stderr(pty2.slave.try_clone().unwrap())
        .status()
        .unwrap();
    let so_far = String::from_utf8_lossy(&out2.lock().unwrap()).to_string();
    assert!(o.success(), "snap restore --shell-job failed: {o:?}; terminal: {so_far}");
    assert!(!so_far.contains("panicked"), "{so_far}");
    wait_counter_past(&count, at, 10, secs(30));
    assert_consecutive(&numbers(&count), "counter");
    for fd in 0..=2 {
        assert_eq!(fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap(), pty2.name, "fd {fd} of the restored job is not the new terminal");
    }
    let want = format!("tick{}", at + 5);
    wait_for("ticks on the new terminal", secs(30), || String::from_utf8_lossy(&out2.lock().unwrap()).contains(&want).then_some(()));
}
