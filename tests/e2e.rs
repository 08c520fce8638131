//! End-to-end tests: real programs and self-checking fixtures are started,
//! dumped, killed, restored and checked. See tests/common for the harness
//! (serialization, subreaper, cleanup) and fixtures/ for the workloads.
//!
//! Run the whole suite with `./test.sh` (= `cargo test --release -- --test-threads=1`).

#[macro_use]
mod common;
use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};


fn fx(name: &str) -> Option<std::path::PathBuf> {
    fixture(name)
}

fn sh(reaper: &Reaper, t: &TempDir, script: &str) -> i32 {
    spawn(reaper, Command::new("bash").arg("-c").arg(script), &t.join("log"))
}

/// Check ok-results: "ok..." passes, anything else fails with its text.
fn assert_ok(res: &str, what: &str) {
    assert!(res.starts_with("ok"), "{what}: {}", res.trim());
}

// ------------------------------------------------------------------ bash

/// A bash pipeline (loop | cat >> FILE): after restore the numbers continue
/// with no gap and no repeat, and the tree (bash, subshell, cat, sleep)
/// comes back with the same pids.
#[test]
fn bash_pipeline_counter_continues() {
    let _l = lock();
    let t = TempDir::new("bashpipe");
    let r = Reaper::new();
    let file = t.join("out");
    let pid = sh(&r, &t, &format!("i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done | cat >> {}", file.display()));
    wait_counter_past(&file, 0, 10, secs(30));
    let before = tree(pid);
    assert!(before.len() >= 3, "expected bash, loop subshell and cat: {before:?}");
    // The long-lived ones: bash and its children (loop subshell, cat). The
    // `sleep 0.05` are the loop's children; one just forked still shows
    // bash's command line, so the command line cannot tell them apart.
    let long_lived: Vec<i32> = before.iter().copied().filter(|&p| p == pid || ppid(p) == Some(pid)).collect();
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    let at_dump = last_number(&file).unwrap();
    restore_ok(&img, &r, &[pid]);
    wait_counter_past(&file, at_dump, 20, secs(30));
    let nums = numbers(&file);
    assert_eq!(nums[0], 0);
    assert_consecutive(&nums, "counter file after restore");
    // `sleep 0.05` children come and go; the long-lived ones must be back.
    let after = tree(pid);
    for p in &long_lived {
        assert!(after.contains(p), "pid {p} of the pipeline missing after restore: before {before:?}, after {after:?}");
    }
}

// ------------------------------------------------------------------ python

fn py_state(dir: &Path, pid: i32) -> serde_json::Value {
    let s = signal_and_result(dir, pid, libc::SIGUSR1, "state", secs(30));
    let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad state json {s:?}: {e}"));
    assert_eq!(v["ok"], true, "python workload reports: {s}");
    v
}

fn counters(v: &serde_json::Value) -> Vec<u64> {
    v["counters"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// python3 with 4 threads: after restore every thread's counter continues
/// from where it was (not reset), the shared total is consistent, and the
/// threads keep the same TIDs.
#[test]
fn python_threads_continue() {
    let _l = lock();
    let py = need!(python3(), "python_threads_continue", "no python3");
    let t = TempDir::new("pythreads");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_threads.py")).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let s1 = py_state(&d, pid);
    let tids_before = tids(pid);
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    assert_eq!(tids(pid), tids_before, "thread ids changed");
    let s2 = py_state(&d, pid);
    let (c1, c2) = (counters(&s1), counters(&s2));
    for i in 0..4 {
        assert!(c2[i] >= c1[i], "thread {i} counter went back: {} -> {}", c1[i], c2[i]);
    }
    assert_eq!(s1["tids"], s2["tids"], "python's native thread ids changed");
    // Still running: every counter advances after the restore.
    let c2b = c2.clone();
    wait_for("all python counters to advance", secs(30), || {
        let s3 = py_state(&d, pid);
        let c3 = counters(&s3);
        (0..4).all(|i| c3[i] > c2b[i] + 2).then_some(())
    });
}

// ------------------------------------------------------------------ sleep

/// `sleep 1000`: same pid, same cmdline, still sleeping, and SIGTERM still
/// ends it (a restored process must keep default signal dispositions).
#[test]
fn sleep_restored_and_terminates() {
    let _l = lock();
    let t = TempDir::new("sleep");
    let r = Reaper::new();
    let pid = spawn(&r, Command::new("sleep").arg("1000"), &t.join("log"));
    wait_in_syscall(pid, pid, &[35, 230], secs(10));
    let cmd = cmdline(pid);
    let cpus = status_field(pid, "Cpus_allowed_list");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    assert_eq!(cmdline(pid), cmd, "cmdline differs");
    // snap pins itself to one CPU while it restores; the process must not keep that.
    assert_eq!(status_field(pid, "Cpus_allowed_list"), cpus, "CPU affinity differs");
    assert_eq!(fs::read_link(format!("/proc/{pid}/exe")).ok(), Some(fs::canonicalize(which("sleep")).unwrap()));
    // Still asleep (not exited, not spinning): blocked in nanosleep again.
    wait_in_syscall(pid, pid, &[35, 230], secs(10));
    assert!(kill(pid, libc::SIGTERM));
    wait_gone(&[pid], secs(10)).expect("sleep did not exit on SIGTERM");
}

fn which(prog: &str) -> std::path::PathBuf {
    let o = Command::new("sh").arg("-c").arg(format!("command -v {prog}")).output().unwrap();
    std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// Restore without -d: snap stays the parent and exits with the root's status.
#[test]
fn restore_attached_exits_with_status() {
    let _l = lock();
    let t = TempDir::new("attached");
    let r = Reaper::new();
    let go = t.join("go");
    let pid = sh(&r, &t, &format!("while [ ! -e {} ]; do sleep 0.05; done; exit 5", go.display()));
    wait_for("bash loop", secs(10), || (tree(pid).len() >= 2 || proc_state(pid) == Some('S')).then_some(()));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    r.add(pid);
    fs::write(&go, "").unwrap();
    let run = snap(&["restore", "-D", img.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(5), "snap restore (attached) should exit with the root's status 5: {}", run.describe());
}

// ------------------------------------------------------------------ C trees

/// A tree (parent, 2 children, a grandchild; one child fork+exec'd) joined
/// by full pipes: after restore the queued bytes are unchanged and every
/// record arrives exactly once and in order; all children exit 0.
#[test]
fn pipe_tree_data_in_flight() {
    let _l = lock();
    let bin = need!(fx("pipes_tree"), "pipe_tree_data_in_flight", "gcc not found");
    need!(fx("pipe_writer"), "pipe_tree_data_in_flight", "gcc not found");
    let t = TempDir::new("pipetree");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg("200000"), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(60));
    let before = tree(pid);
    assert_eq!(before.len(), 4, "expected 4 processes: {before:?}");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &before);
    assert_eq!(tree(pid), before, "restored tree differs");
    let exe_c2 = fs::read_link(format!("/proc/{}/exe", ready.split_whitespace().nth(2).unwrap())).unwrap();
    assert!(exe_c2.ends_with("pipe_writer"), "exec'd child has exe {exe_c2:?}");
    fs::write(d.join("go"), "").unwrap();
    let res = wait_file(&d, "result", secs(60));
    assert!(read_opt(&d.join("result.c1")).is_none(), "C1: {:?}", read_opt(&d.join("result.c1")));
    assert_ok(&res, "pipes_tree");
}

/// 64 threads: TLS, names, masks, altstacks, rounding modes, ymm/r12-15
/// live in registers; same TIDs after restore.
#[test]
fn threads64_registers_tls_masks() {
    let _l = lock();
    let bin = need!(fx("threads64"), "threads64_registers_tls_masks", "gcc not found");
    let t = TempDir::new("threads64");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg("64"), &t.join("log"));
    wait_ready(&d, pid, secs(60));
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(90)), "before dump");
    let tids_before = tids(pid);
    assert_eq!(tids_before.len(), 65);
    let names_before: Vec<String> = tids_before.iter().map(|t| fs::read_to_string(format!("/proc/{pid}/task/{t}/comm")).unwrap()).collect();
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    assert_eq!(tids(pid), tids_before, "TIDs differ after restore");
    let names_after: Vec<String> = tids_before.iter().map(|t| fs::read_to_string(format!("/proc/{pid}/task/{t}/comm")).unwrap_or_default()).collect();
    assert_eq!(names_after, names_before);
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(90)), "after restore");
}

/// Self-test: the threads64 checker does detect a corrupted TLS value (so a
/// passing restore test means something).
#[test]
fn threads64_checker_detects_corruption() {
    let _l = lock();
    let bin = need!(fx("threads64"), "threads64_checker_detects_corruption", "gcc not found");
    let t = TempDir::new("t64self");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg("8"), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(60)), "clean");
    kill(pid, libc::SIGUSR2);
    let res = signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(60));
    assert!(res.starts_with("FAIL") && res.contains("TLS"), "corruption not detected: {res}");
}

fn bigmem_roundtrip(name: &str, mib: u32, extra: &[&str]) {
    let _l = lock();
    let bin = need!(fx("bigmem"), name, "gcc not found");
    let t = TempDir::new(name);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg(mib.to_string()), &t.join("log"));
    wait_ready(&d, pid, secs(120));
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(120)), "before dump");
    let img = t.sub("img");
    let (run, _) = dump_kill(&[pid], &img, extra);
    eprintln!("{name}: dump of {mib} MiB took {:?}", run.elapsed);
    let rr = restore_ok(&img, &r, &[pid]);
    eprintln!("{name}: restore took {:?}", rr.elapsed);
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(120)), "after restore");
}

/// 1 GiB of anonymous memory (pattern by address, untouched and explicitly
/// zeroed pages): every page verified after restore. Slow (~GBs of I/O).
#[test]
fn bigmem_1gib_every_page() {
    bigmem_roundtrip("bigmem_1gib", 1024, &[]);
}

/// Same on 64 MiB with --compress.
#[test]
fn bigmem_64mib_compressed() {
    bigmem_roundtrip("bigmem_64mib_z", 64, &["--compress"]);
}

/// Self-test: the bigmem checker detects a single flipped bit.
#[test]
fn bigmem_checker_detects_corruption() {
    let _l = lock();
    let bin = need!(fx("bigmem"), "bigmem_checker_detects_corruption", "gcc not found");
    let t = TempDir::new("bmself");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg("16"), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30)), "clean");
    kill(pid, libc::SIGUSR2);
    let res = signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30));
    assert!(res.starts_with("FAIL"), "corruption not detected: {res}");
}

/// MAP_SHARED|MAP_ANONYMOUS between parent and child stays one shared
/// region: a write by the child after restore is seen by the parent and
/// the parent's ack by the child.
#[test]
fn shared_anon_memory_stays_shared() {
    let _l = lock();
    let bin = need!(fx("shm_shared"), "shared_anon_memory_stays_shared", "gcc not found");
    let t = TempDir::new("shm");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let child: i32 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(signal_and_result(&d, child, libc::SIGUSR1, "result", secs(30)).trim(), "seen 1");
    wait_for("child ack 1", secs(30), || read_opt(&d.join("child_result")).filter(|s| s.trim() == "acked 1"));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid, child]);
    fs::remove_file(d.join("child_result")).unwrap();
    assert_eq!(signal_and_result(&d, child, libc::SIGUSR1, "result", secs(30)).trim(), "seen 2", "parent did not see the child's write");
    let cr = wait_file(&d, "child_result", secs(40));
    assert_eq!(cr.trim(), "acked 2", "child did not see the parent's ack");
}

// ------------------------------------------------------------------ interrupted calls

/// Start `interrupted MODE`, wait until it is blocked in one of `nrs`,
/// dump, restore, trigger, and expect "ok".
fn interrupted(mode: &str, nrs: &[i64]) {
    let _l = lock();
    let test = format!("interrupted_{mode}");
    let bin = need!(fx("interrupted"), &test, "gcc not found");
    let t = TempDir::new(&test);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg(mode), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let child: Option<i32> = ready.split_whitespace().nth(1).map(|s| s.parse().unwrap());
    wait_in_syscall(pid, pid, nrs, secs(10));
    if let Some(c) = child {
        wait_in_syscall(c, c, &[128], secs(10)); // rt_sigtimedwait (sigwait)
    }
    let img = t.sub("img");
    let t_dump = Instant::now();
    dump_kill(&[pid], &img, &[]);
    let mut expect = vec![pid];
    expect.extend(child);
    restore_ok(&img, &r, &expect);
    let downtime = t_dump.elapsed();
    // Still blocked in the same call after restore (not returned with garbage).
    if mode != "sleep" {
        wait_in_syscall(pid, pid, nrs, secs(10));
        assert!(read_opt(&d.join("result")).is_none(), "{mode}: returned before being woken: {:?}", read_opt(&d.join("result")));
    }
    match mode {
        "read" => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(d.join("fifo")).expect("open fifo for writing");
            f.write_all(b"hello-after-restore\n").unwrap();
        }
        "futex" => assert!(kill(pid, libc::SIGUSR1)),
        "sleep" => {}
        _ => assert!(kill(child.unwrap(), libc::SIGUSR1)),
    }
    let res = wait_file(&d, "result", secs(30));
    assert_ok(&res, mode);
    if mode == "sleep" {
        let ms: f64 = res.split_whitespace().nth(2).unwrap().parse().unwrap();
        let max = 4000.0 + downtime.as_secs_f64() * 1000.0 + 3000.0;
        assert!(ms <= max, "nanosleep(4 s) took {ms} ms, more than 4 s + downtime {downtime:?} + 3 s");
    }
}

#[test]
fn interrupted_read_pipe() {
    interrupted("read", &[0]);
}
#[test]
fn interrupted_nanosleep() {
    interrupted("sleep", &[35, 230]);
}
#[test]
fn interrupted_waitpid() {
    interrupted("waitpid", &[61, 247]);
}
#[test]
fn interrupted_futex_cond_wait() {
    interrupted("futex", &[202]);
}
#[test]
fn interrupted_poll() {
    interrupted("poll", &[7, 271]);
}
#[test]
fn interrupted_select() {
    interrupted("select", &[23, 270]);
}

// ------------------------------------------------------------------ groups

/// Two unrelated trees dumped together with -t A -t B; both come back.
#[test]
fn multi_root_dump() {
    let _l = lock();
    let t = TempDir::new("multiroot");
    let r = Reaper::new();
    let fa = t.join("a");
    let a = sh(&r, &t, &format!("i=0; while :; do echo $i >> {}; i=$((i+1)); sleep 0.05; done", fa.display()));
    let b = spawn(&r, Command::new("sleep").arg("1000"), &t.join("logb"));
    wait_counter_past(&fa, 0, 5, secs(30));
    wait_in_syscall(b, b, &[35, 230], secs(10));
    let img = t.sub("img");
    dump_kill(&[a, b], &img, &[]);
    let at = last_number(&fa).unwrap();
    restore_ok(&img, &r, &[a, b]);
    assert_eq!(cmdline(b), b"sleep\x001000\x00");
    wait_counter_past(&fa, at, 10, secs(30));
    assert_consecutive(&numbers(&fa), "root A counter");
    wait_in_syscall(b, b, &[35, 230], secs(10));
}

/// Refusal: an established TCP connection (here both ends in the process)
/// is not dumped without --tcp-established; the error names the pid, the
/// fd and "socket", and the process keeps running and answering.
#[test]
fn refuses_tcp_listener_and_leaves_it_running() {
    let _l = lock();
    let py = need!(python3(), "refuses_tcp_listener_and_leaves_it_running", "no python3");
    let t = TempDir::new("tcpref");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_tcp_listen.py")).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let v: Vec<i64> = ready.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let (port, fd) = (v[1], v[2]);
    let count = d.join("count");
    wait_counter_past(&count, 0, 3, secs(30));
    let img = t.sub("img");
    let run = dump_raw(&[pid], &img, &[]);
    assert!(!run.ok(), "dump of an established TCP connection without --tcp-established should fail: {}", run.describe());
    assert!(run.stderr.contains("--tcp-established"), "error does not name the flag: {}", run.stderr);
    let e = run.stderr.to_lowercase();
    assert!(e.contains(&pid.to_string()), "error does not name pid {pid}: {}", run.stderr);
    assert!(e.contains(&format!("fd {fd}")) || e.contains(&format!("fd{fd}")) || e.contains(&format!("fd={fd}")) || e.contains(&format!("fd: {fd}")), "error does not name fd {fd}: {}", run.stderr);
    assert!(e.contains("socket"), "error does not say 'socket': {}", run.stderr);
    // Untouched and running: not stopped/traced, counter advances, answers.
    let st = proc_state(pid).unwrap();
    assert!(st == 'S' || st == 'R', "state {st} after failed dump");
    assert_eq!(status_field(pid, "TracerPid").as_deref(), Some("0"), "still traced");
    let at = last_number(&count).unwrap();
    wait_counter_past(&count, at, 5, secs(10));
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port as u16)).expect("connect to listener after failed dump");
    s.set_read_timeout(Some(secs(10))).unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    assert!(buf.starts_with("pong "), "reply {buf:?}");
}

/// A workload running as nobody: restored with uid/gid 65534, no groups.
#[test]
fn nobody_user_restored_with_creds() {
    let _l = lock();
    if Command::new("setpriv").arg("--version").output().is_err() {
        skip("nobody_user_restored_with_creds", "setpriv not found");
        return;
    }
    let t = TempDir::new("nobody");
    let r = Reaper::new();
    let d = t.sub("st");
    fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let f = d.join("count");
    let pid = spawn(
        &r,
        Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c"]).arg(format!("i=0; while :; do echo $i >> {}; i=$((i+1)); sleep 0.05; done", f.display())),
        &t.join("log"),
    );
    wait_counter_past(&f, 0, 5, secs(30));
    assert_eq!(status_field(pid, "Uid").as_deref(), Some("65534\t65534\t65534\t65534"));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    let at = last_number(&f).unwrap();
    restore_ok(&img, &r, &[pid]);
    assert_eq!(status_field(pid, "Uid").as_deref(), Some("65534\t65534\t65534\t65534"));
    assert_eq!(status_field(pid, "Gid").as_deref(), Some("65534\t65534\t65534\t65534"));
    assert_eq!(status_field(pid, "Groups").as_deref(), Some(""));
    assert_eq!(status_field(pid, "CapEff").as_deref(), Some("0000000000000000"), "restored nobody process has capabilities");
    wait_counter_past(&f, at, 10, secs(30));
    assert_consecutive(&numbers(&f), "nobody counter");
}

fn trace_snapshot(pid: i32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    v.push(("maps".into(), fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()));
    let mut fds: Vec<(String, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.flatten().map(|e| (e.file_name().to_string_lossy().to_string(), fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default())).collect())
        .unwrap_or_default();
    fds.sort();
    v.push(("fds".into(), format!("{fds:?}")));
    for tid in tids(pid) {
        let st = format!("/proc/{pid}/task/{tid}/status");
        for f in ["SigBlk", "SigCgt", "SigIgn", "SigPnd", "ShdPnd", "TracerPid", "NoNewPrivs", "Seccomp"] {
            v.push((format!("task {tid} {f}"), status_field_of(&st, f).unwrap_or_default()));
        }
        v.push((format!("task {tid} state"), proc_state_task(pid, tid)));
        v.push((format!("task {tid} comm"), fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default()));
    }
    v
}

fn proc_state_task(pid: i32, tid: i32) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    s.rfind(')').map(|r| s[r + 2..r + 3].to_string()).unwrap_or_default()
}

/// `dump --leave-running` leaves no trace: maps, fds, signal state,
/// thread states and names are as before, and the program keeps running.
#[test]
fn leave_running_leaves_no_trace() {
    let _l = lock();
    let bin = need!(fx("counter"), "leave_running_leaves_no_trace", "gcc not found");
    let t = TempDir::new("leaverun");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let count = d.join("count");
    wait_counter_past(&count, 0, 3, secs(30));
    let before = trace_snapshot(pid);
    let img = t.sub("img");
    dump_ok(&[pid], &img, &["--leave-running"]);
    assert!(alive(pid) && proc_state(pid) != Some('Z'), "process gone after --leave-running");
    // Thread states may flicker between S and R: compare until equal.
    let t0 = Instant::now();
    let mut after = trace_snapshot(pid);
    while after != before && t0.elapsed() < secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        after = trace_snapshot(pid);
    }
    for (b, a) in before.iter().zip(after.iter()) {
        assert_eq!(b, a, "{} changed by dump --leave-running", b.0);
    }
    assert_eq!(before.len(), after.len(), "number of threads changed");
    let at = last_number(&count).unwrap();
    wait_counter_past(&count, at, 10, secs(10));
    assert_consecutive(&numbers(&count), "counter");
    // And the image is usable: kill, restore, continue.
    let tr = tree(pid);
    kill(pid, libc::SIGKILL);
    wait_gone(&tr, secs(30)).unwrap();
    let at = last_number(&count).unwrap();
    restore_ok(&img, &r, &[pid]);
    wait_counter_past(&count, at, 5, secs(30));
}

/// One image restored twice: each restore continues from the dump point.
#[test]
fn restore_same_image_twice() {
    let _l = lock();
    let t = TempDir::new("twice");
    let r = Reaper::new();
    let f = t.join("count");
    let pid = sh(&r, &t, &format!("i=0; while :; do echo $i >> {}; i=$((i+1)); sleep 0.05; done", f.display()));
    wait_counter_past(&f, 0, 5, secs(30));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    let at = last_number(&f).unwrap();
    for round in 1..=2 {
        let len_before = numbers(&f).len();
        restore_ok(&img, &r, &[pid]);
        wait_for(&format!("round {round}: counter output"), secs(30), || (numbers(&f).len() >= len_before + 5).then_some(()));
        let new = numbers(&f)[len_before..].to_vec();
        assert_eq!(new[0], at + 1, "round {round}: restored loop did not continue from the dump point: {new:?}");
        assert_consecutive(&new, &format!("round {round}"));
        let tr = tree(pid);
        for p in &tr {
            kill(*p, libc::SIGKILL);
        }
        wait_gone(&tr, secs(30)).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

/// A zombie child (exit 7) survives dump/restore as a zombie of the same
/// parent, which then reaps it with status 7.
#[test]
fn zombie_child_kept_and_reaped_with_status() {
    let _l = lock();
    let bin = need!(fx("zombie"), "zombie_child_kept_and_reaped_with_status", "gcc not found");
    let t = TempDir::new("zombie");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let child: i32 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(proc_state(child), Some('Z'));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    r.add(pid);
    let d2 = img.to_string_lossy().to_string();
    let run = snap(&["restore", "-D", &d2, "-d"]);
    assert!(run.ok(), "restore failed: {}", run.describe());
    assert_eq!(proc_state(child), Some('Z'), "child is not a zombie after restore");
    assert_eq!(ppid(child), Some(pid), "zombie's parent changed");
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30)), "zombie reap");
    wait_gone(&[child], secs(10)).unwrap();
}

// ------------------------------------------------------------------ inspection

/// `snap image show --json` parses and lists every dumped pid;
/// `snap check --json` parses.
#[test]
fn image_show_and_check_json() {
    let _l = lock();
    let t = TempDir::new("show");
    let r = Reaper::new();
    let pid = sh(&r, &t, "sleep 1000 & sleep 1001 & wait");
    wait_for("two children", secs(10), || (tree(pid).len() == 3).then_some(()));
    let all = tree(pid);
    let img = t.sub("img");
    dump_ok(&[pid], &img, &["--leave-running"]);
    let run = snap(&["image", "show", img.to_str().unwrap(), "--json"]);
    assert!(run.ok(), "{}", run.describe());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("image show --json is not JSON ({e}): {}", run.stdout));
    let mut nums = Vec::new();
    collect_ints(&v, &mut nums);
    for p in &all {
        assert!(nums.contains(&(*p as i64)), "pid {p} not listed in image show --json: {}", run.stdout);
    }
    let human = snap(&["image", "show", img.to_str().unwrap()]);
    assert!(human.ok() && human.stdout.contains(&pid.to_string()), "image show: {}", human.describe());
    // A reader that went away (`| head`) ends the output quietly: exit 0,
    // nothing on stderr (it used to panic on the broken pipe).
    let show = ["image", "show", img.to_str().unwrap()];
    for args in [&show[..], &[show[0], show[1], show[2], "--json"], &["check"], &["ps"]] {
        let (rd, wr) = nix::unistd::pipe().unwrap();
        drop(rd);
        let mut c = Command::new(snap_bin());
        c.args(args).stdout(Stdio::from(wr)).stderr(Stdio::piped());
        let o = c.output().unwrap();
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "snap {args:?} into a closed pipe: {:?}, stderr {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let c = snap(&["check", "--json"]);
    assert!(c.ok(), "{}", c.describe());
    let cv: serde_json::Value = serde_json::from_str(&c.stdout).unwrap_or_else(|e| panic!("check --json is not JSON ({e}): {}", c.stdout));
    assert!(cv.is_object() || cv.is_array(), "check --json: {}", c.stdout);
    // Every probe is listed with its result, a detail and what it enables,
    // present or not; the ones this kernel has also say so in the text form.
    let features = cv["features"].as_array().unwrap_or_else(|| panic!("check --json has no features: {}", c.stdout));
    let human = snap(&["check"]);
    assert!(human.ok(), "{}", human.describe());
    for name in ["sysv-next-id", "timerfd-set-ticks", "msg-copy", "pagemap-scan", "uffd-wp-async-pagemap-scan"] {
        let f = features.iter().find(|f| f["name"] == name).unwrap_or_else(|| panic!("check --json lists no {name}: {}", c.stdout));
        assert!(f["present"].is_boolean(), "{name}: present is not a boolean: {f}");
        for k in ["detail", "enables"] {
            assert!(f[k].as_str().is_some_and(|d| !d.is_empty()), "{name}: empty {k}: {f}");
        }
        let line = human.stdout.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
        let line = line.unwrap_or_else(|| panic!("snap check prints no {name} line: {}", human.stdout));
        let state = if f["present"] == true { "present" } else { "absent" };
        assert!(line.contains(state), "snap check says {line:?}, --json says {state}");
    }
}

fn collect_ints(v: &serde_json::Value, out: &mut Vec<i64>) {
    match v {
        serde_json::Value::Number(n) => out.extend(n.as_i64()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_ints(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_ints(x, out)),
        _ => {}
    }
}

/// A failed restore (PIDs taken) must fail naming the PID and leave nothing.
#[test]
fn restore_fails_when_pid_taken() {
    let _l = lock();
    let t = TempDir::new("pidtaken");
    let r = Reaper::new();
    let pid = spawn(&r, Command::new("sleep").arg("1000"), &t.join("log"));
    wait_in_syscall(pid, pid, &[35, 230], secs(10));
    let img = t.sub("img");
    dump_ok(&[pid], &img, &["--leave-running"]);
    // The original still runs, so its pid is taken: restore must refuse
    // (after waiting briefly) and name the pid.
    let run = snap(&["restore", "-D", img.to_str().unwrap(), "-d"]);
    assert!(!run.ok(), "restore over a live pid succeeded: {}", run.describe());
    assert!(run.stderr.contains(&pid.to_string()), "error does not name pid {pid}: {}", run.stderr);
    assert_eq!(tree(pid), vec![pid], "failed restore left processes behind");
    assert_eq!(cmdline(pid), b"sleep\x001000\x00");
}

// ------------------------------------------------------------------ timers

fn timer_ids(pid: i32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/timers"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("ID:") || l.starts_with("signal:") || l.starts_with("ClockID:"))
        .map(str::to_string)
        .collect()
}

fn timer_counts(d: &Path, pid: i32) -> (u64, u64) {
    let res = signal_and_result(d, pid, libc::SIGUSR1, "result", secs(30));
    assert_ok(&res, "timers");
    let mut it = res.split_whitespace().skip(1).map(|x| x.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// POSIX timers keep their ids, clocks, signal and si_value, the armed one
/// keeps firing at its interval and the disarmed one stays disarmed; the
/// ITIMER_REAL interval timer keeps firing too.
#[test]
fn posix_timers_and_itimer_continue() {
    let _l = lock();
    let bin = need!(fx("timers"), "posix_timers_and_itimer_continue", "gcc not found");
    let t = TempDir::new("timers");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let ids_before = timer_ids(pid);
    assert_eq!(ids_before.iter().filter(|l| l.starts_with("ID:")).count(), 2, "{ids_before:?}");
    let (p1, i1) = timer_counts(&d, pid);
    let _ = fs::remove_file(d.join("result"));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    assert_eq!(timer_ids(pid), ids_before, "POSIX timers differ after restore");
    let (p2, i2) = wait_for("both timers to fire after restore", secs(30), || {
        let _ = fs::remove_file(d.join("result"));
        let (p, i) = timer_counts(&d, pid);
        (p > p1 + 5 && i > i1 + 5).then_some((p, i))
    });
    assert!(p2 > p1 && i2 > i1);
}

// ------------------------------------------------------------------ pid namespace

/// `--pidns`: the image restores into a new pid namespace while the
/// original still runs with the same PIDs; inside, the program has its
/// saved PID and TIDs (NSpid), and its /proc shows them too.
#[test]
fn pidns_restore_beside_the_original() {
    let _l = lock();
    let py = need!(python3(), "pidns_restore_beside_the_original", "no python3");
    let t = TempDir::new("pidns");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_threads.py")).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let tids_before = tids(pid);
    let img = t.sub("img");
    dump_ok(&[pid], &img, &["--leave-running"]);
    let run = snap(&["restore", "-D", &img.to_string_lossy(), "-d", "--pidns", "--json"]);
    assert!(run.ok(), "snap restore --pidns failed: {}", run.describe());
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("restore --json output");
    let init = v["pidns_init"].as_i64().expect("pidns_init") as i32;
    let host = v["host_pids"][pid.to_string()].as_i64().expect("host pid of the root") as i32;
    r.add_all(&[init, host]);
    assert_ne!(host, pid, "the copy must have another host PID");
    assert!(alive(pid), "the original must keep running");
    let nspid = status_field(host, "NSpid").unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some(pid.to_string().as_str()), "NSpid {nspid}");
    // The threads have their saved TIDs inside the namespace.
    let inner: BTreeSet<i32> = fs::read_dir(format!("/proc/{host}/task"))
        .unwrap()
        .map(|e| {
            let tid = e.unwrap().file_name().to_string_lossy().to_string();
            let ns = status_field_of(&format!("/proc/{host}/task/{tid}/status"), "NSpid").unwrap();
            ns.split_whitespace().last().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(inner, tids_before, "TIDs inside the namespace");
    // Its own /proc is the namespace's: /proc/self is the saved PID.
    let st = fs::read_to_string(format!("/proc/{host}/root/proc/{pid}/status"))
        .expect("the namespace's /proc shows the saved PID");
    assert!(st.lines().any(|l| l == format!("NSpid:\t{pid}")), "namespace /proc: {st}");
    // And it works: both the copy and the original answer.
    let _ = fs::remove_file(d.join("state"));
    let s = signal_and_result(&d, host, libc::SIGUSR1, "state", secs(30));
    assert!(s.contains("\"ok\": true"), "restored copy: {s}");
    let _ = fs::remove_file(d.join("state"));
    let s = signal_and_result(&d, pid, libc::SIGUSR1, "state", secs(30));
    assert!(s.contains("\"ok\": true"), "original: {s}");
}

// ------------------------------------------------------------------ job control

/// A process stopped by SIGSTOP is dumped as it is and comes back stopped;
/// SIGCONT then lets it run (it is still sleeping, not exited).
#[test]
fn stopped_process_comes_back_stopped() {
    let _l = lock();
    let t = TempDir::new("stopped");
    let r = Reaper::new();
    let pid = spawn(&r, Command::new("sleep").arg("1000"), &t.join("log"));
    wait_in_syscall(pid, pid, &[35, 230], secs(10));
    assert!(kill(pid, libc::SIGSTOP));
    wait_for("the process to stop", secs(10), || (proc_state(pid) == Some('T')).then_some(()));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    wait_for("the restored process to be stopped", secs(10), || (proc_state(pid) == Some('T')).then_some(()));
    assert!(kill(pid, libc::SIGCONT));
    wait_in_syscall(pid, pid, &[35, 230], secs(10));
    assert_eq!(proc_state(pid), Some('S'));
}

// ------------------------------------------------------------------ memfd

/// A sealed memfd that is also mapped shared comes back as one memfd: same
/// name, seals and content, and the descriptor and the mapping still share
/// memory.
#[test]
fn memfd_fd_and_mapping_stay_one_object() {
    let _l = lock();
    let py = need!(python3(), "memfd_fd_and_mapping_stay_one_object", "no python3");
    let t = TempDir::new("memfd");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_memfd.py")).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30)), "memfd before");
    let _ = fs::remove_file(d.join("result"));
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30)), "memfd after restore");
}

/// A pidfd of a child in the tree comes back referring to the restored
/// child: a signal sent through it reaches that child, and it becomes
/// readable when the child dies.
#[test]
fn pidfd_of_a_child_follows_the_child() {
    let _l = lock();
    let py = need!(python3(), "pidfd_of_a_child_follows_the_child", "no python3");
    let t = TempDir::new("pidfd");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&py).arg(fixtures_src().join("py_pidfd.py")).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let child: i32 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid, child]);
    let link = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
        .any(|l| l.to_string_lossy().contains("pidfd"));
    assert!(link, "no pidfd among the restored descriptors");
    assert_ok(&signal_and_result(&d, pid, libc::SIGUSR1, "result", secs(30)), "pidfd after restore");
}
