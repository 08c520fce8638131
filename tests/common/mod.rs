//! Shared harness for the end-to-end tests (tests/e2e.rs).
//!
//! * finds snap: env SNAP_BIN, else the binary cargo built for this test;
//! * serializes tests with an flock on $TMPDIR/snap-e2e.lock, held for the
//!   whole test: every restore needs its exact PIDs free, so no other test
//!   may fork in between (flock also serializes separate test processes);
//! * makes the test process a child subreaper so restored trees (whose
//!   parent, snap, exits) reparent to us and can be reaped and killed;
//! * builds the C fixtures once with `gcc -O1 -pthread` into
//!   target/.../snap-fixtures (rebuilt when the source is newer);
//! * `Reaper` kills every process a test started or restored (and all their
//!   descendants) in Drop, also on panic, and reaps the ones that are ours.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const SNAP_TIMEOUT: Duration = Duration::from_secs(300);

pub fn snap_bin() -> PathBuf {
    match std::env::var_os("SNAP_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_snap")),
    }
}

pub fn tmp_root() -> PathBuf {
    std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Print a skip line that the summary (and a human) can find. A skipped test
/// returns early; its name is printed so it is never mistaken for a pass.
/// It is also appended to target/tmp/skipped.txt, which ./test.sh prints in
/// its summary, so a skip is reported as such and never hides among passes.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED: {test}: {reason}");
    let list = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped.txt");
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(list) {
        use std::io::Write;
        let _ = writeln!(f, "{test}: {reason}");
    }
}

/// `need!(option, "test name", "why")`: the value, or report the test as
/// skipped with the reason and return.
#[macro_export]
macro_rules! need {
    ($e:expr, $test:expr, $why:expr) => {
        match $e {
            Some(v) => v,
            None => {
                skip($test, $why);
                return;
            }
        }
    };
}

// ---------------------------------------------------------------- locking

/// Exclusive lock for one whole test (flock on a file; released on drop,
/// including on panic, because the fd is closed).
pub struct TestLock {
    _f: fs::File,
}

pub fn lock() -> TestLock {
    let path = tmp_root().join("snap-e2e.lock");
    let f = fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).expect("open lock file");
    // SAFETY: flock on an fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock {}", path.display());
    set_subreaper();
    TestLock { _f: f }
}

pub fn set_subreaper() {
    // SAFETY: plain prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

// ---------------------------------------------------------------- temp dirs

pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        static N: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut g = N.lock().unwrap_or_else(|e| e.into_inner());
            *g += 1;
            *g
        };
        let path = tmp_root().join(format!("snap-e2e-{}-{}-{}", test, std::process::id(), n));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        TempDir { path }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
    /// A fresh subdirectory (e.g. an image dir or a fixture state dir).
    pub fn sub(&self, p: &str) -> PathBuf {
        let d = self.path.join(p);
        fs::create_dir_all(&d).unwrap();
        d
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SNAP_E2E_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------- fixtures

pub fn have_gcc() -> bool {
    Command::new("gcc").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

pub fn fixtures_src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixtures_bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("snap-fixtures")
}

/// Build fixtures/NAME.c (cached; rebuilt when any fixture source is newer)
/// and return the binary's path, or None without gcc.
pub fn fixture(name: &str) -> Option<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if !have_gcc() {
        return None;
    }
    let src_dir = fixtures_src();
    let out_dir = fixtures_bin_dir();
    fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(name);
    let newest_src = fs::read_dir(&src_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().map(|x| x == "c" || x == "h").unwrap_or(false))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .unwrap();
    let fresh = fs::metadata(&out).and_then(|m| m.modified()).map(|t| t >= newest_src).unwrap_or(false);
    if !fresh {
        let tmp = out_dir.join(format!(".{}.{}", name, std::process::id()));
        let o = Command::new("gcc")
            .args(["-O1", "-pthread", "-Wall", "-o"])
            .arg(&tmp)
            .arg(src_dir.join(format!("{name}.c")))
            .arg("-lm")
            .output()
            .expect("run gcc");
        assert!(o.status.success(), "gcc {name}.c failed:\n{}", String::from_utf8_lossy(&o.stderr));
        fs::rename(&tmp, &out).unwrap();
    }
    Some(out)
}

/// python3 from the system (not a pyenv shim: shims live under /root and
/// fork a shell first; the system one works for any uid).
pub fn python3() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PYTHON3") {
        return Some(PathBuf::from(p));
    }
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// The cgroup2 mount, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mi = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

// ---------------------------------------------------------------- processes

pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Process state letter from /proc/PID/stat (None when gone).
pub fn proc_state(pid: i32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let r = s.rfind(')')?;
    s[r + 2..].chars().next()
}

pub fn ppid(pid: i32) -> Option<i32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let r = s.rfind(')')?;
    s[r + 2..].split_whitespace().nth(1)?.parse().ok()
}

/// All descendants of `root` (not including it), by scanning /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                if let Some(pp) = ppid(pid) {
                    parent_of.push((pid, pp));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p && !out.contains(&c) && c != root {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// root plus its descendants, sorted.
pub fn tree(root: i32) -> Vec<i32> {
    let mut v = descendants(root);
    v.push(root);
    v.sort();
    v
}

pub fn tids(pid: i32) -> BTreeSet<i32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_string_lossy().parse().ok()).collect())
        .unwrap_or_default()
}

pub fn kill(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) with plain integers.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Reap `pid` if it is our (zombie) child; returns its raw status.
pub fn try_reap(pid: i32) -> Option<i32> {
    let mut st = 0;
    // SAFETY: waitpid on a specific pid with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
    if r == pid {
        Some(st)
    } else {
        None
    }
}

/// Wait until every pid is gone from /proc, reaping those that are ours.
/// (Zombies that are not ours are reaped by pid 1, which is slow here.)
pub fn wait_gone(pids: &[i32], timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let mut left = Vec::new();
        for &p in pids {
            try_reap(p);
            if alive(p) {
                left.push(p);
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            return Err(format!("pids still present after {:?}: {:?} (states {:?})", timeout, left, left.iter().map(|&p| proc_state(p)).collect::<Vec<_>>()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills (SIGKILL) every registered process and its descendants on drop,
/// then reaps and waits for them to vanish. Register both the originally
/// started roots and the restored pids.
#[derive(Default)]
pub struct Reaper {
    pids: Mutex<Vec<i32>>,
}

impl Reaper {
    pub fn new() -> Reaper {
        Reaper::default()
    }
    pub fn add(&self, pid: i32) {
        self.pids.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    }
    pub fn add_all(&self, pids: &[i32]) {
        for &p in pids {
            self.add(p)
        }
    }
    pub fn kill_all(&self) {
        let roots: Vec<i32> = self.pids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut all = Vec::new();
        for &r in &roots {
            if r <= 1 {
                continue;
            }
            for p in tree(r) {
                if !all.contains(&p) {
                    all.push(p);
                }
            }
        }
        for &p in &all {
            kill(p, libc::SIGKILL);
        }
        if let Err(e) = wait_gone(&all, Duration::from_secs(20)) {
            eprintln!("warning: cleanup: {e}");
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Start a workload: its own session (so it is a session leader inside the
/// dumped tree, not a member of the test's session), stdin /dev/null,
/// stdout+stderr to LOG. Returns its pid (registered with the reaper).
pub fn spawn(reaper: &Reaper, cmd: &mut Command, log: &Path) -> i32 {
    let out = fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    // SAFETY: setsid is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id() as i32;
    reaper.add(pid);
    // The Child handle is dropped without waiting; we reap by pid ourselves.
    drop(child);
    pid
}

// ---------------------------------------------------------------- polling

/// Poll `f` every 10 ms until it returns Some, or panic after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t0.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read_opt(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok()
}

/// Wait for STATE_DIR/NAME to exist and return its content.
pub fn wait_file(dir: &Path, name: &str, timeout: Duration) -> String {
    let p = dir.join(name);
    wait_for(&format!("{}", p.display()), timeout, || read_opt(&p))
}

/// Wait for the workload's "ready" file, failing early if `pid` died.
pub fn wait_ready(dir: &Path, pid: i32, timeout: Duration) -> String {
    let p = dir.join("ready");
    wait_for(&format!("{} (pid {pid})", p.display()), timeout, || {
        if let Some(s) = read_opt(&p) {
            return Some(s);
        }
        if !alive(pid) || proc_state(pid) == Some('Z') {
            let res = read_opt(&dir.join("result")).unwrap_or_default();
            panic!("workload {pid} died before ready; result: {res}");
        }
        None
    })
}

/// Remove RESULT, send SIG to PID, wait for a new RESULT.
pub fn signal_and_result(dir: &Path, pid: i32, sig: i32, result: &str, timeout: Duration) -> String {
    let _ = fs::remove_file(dir.join(result));
    assert!(kill(pid, sig), "kill({pid}, {sig}) failed: process gone?");
    wait_file(dir, result, timeout)
}

/// Numbers of a file with one integer per line (incomplete last line ignored).
pub fn numbers(p: &Path) -> Vec<u64> {
    let s = read_opt(p).unwrap_or_default();
    let complete = match s.rfind('\n') {
        Some(i) => &s[..i],
        None => "",
    };
    complete.lines().map(|l| l.trim().parse::<u64>().unwrap_or_else(|_| panic!("{}: bad line {l:?}", p.display()))).collect()
}

pub fn last_number(p: &Path) -> Option<u64> {
    numbers(p).last().copied()
}

/// Wait until the counter file's last number exceeds `than` by `by`.
pub fn wait_counter_past(p: &Path, than: u64, by: u64, timeout: Duration) -> u64 {
    wait_for(&format!("{} to pass {}", p.display(), than + by), timeout, || last_number(p).filter(|&n| n >= than + by))
}

/// The numbers must be consecutive: no gap, no repeat, no reordering.
pub fn assert_consecutive(nums: &[u64], what: &str) {
    for w in nums.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: {} followed by {} (gap, repeat or reorder) in {:?}…", w[0], w[1], &nums[..nums.len().min(5)]);
    }
}

/// Wait until the thread `tid` of `pid` is blocked in one of `nrs`
/// (first field of /proc/PID/task/TID/syscall).
pub fn wait_in_syscall(pid: i32, tid: i32, nrs: &[i64], timeout: Duration) {
    let p = format!("/proc/{pid}/task/{tid}/syscall");
    wait_for(&format!("{p} in one of {nrs:?}"), timeout, || {
        let s = read_opt(Path::new(&p))?;
        let nr: i64 = s.split_whitespace().next()?.parse().ok()?;
        nrs.contains(&nr).then_some(())
    })
}

// ---------------------------------------------------------------- snap

pub struct SnapRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl SnapRun {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn describe(&self) -> String {
        format!("status {:?}\n--- stdout\n{}\n--- stderr\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Run snap with a timeout (killed after SNAP_TIMEOUT).
pub fn snap(args: &[&str]) -> SnapRun {
    let t0 = Instant::now();
    let mut child = Command::new(snap_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", snap_bin().display()));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > SNAP_TIMEOUT {
            let _ = child.kill();
            let st = child.wait().unwrap();
            panic!("snap {args:?} timed out after {SNAP_TIMEOUT:?} ({st:?}); stderr so far: {}", te.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = t0.elapsed();
    let stdout = to.join().unwrap_or_default();
    let stderr = te.join().unwrap_or_default();
    eprintln!("snap {} -> {:?} in {:?}{}", args.join(" "), status, elapsed, if stderr.is_empty() { String::new() } else { format!("\n  stderr: {}", stderr.trim_end().replace('\n', "\n  ")) });
    SnapRun { status, stdout, stderr, elapsed }
}

fn dump_args<'a>(pids: &'a [String], dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["dump"];
    for p in pids {
        a.push("-t");
        a.push(p);
    }
    a.push("-D");
    a.push(dir);
    a.extend_from_slice(extra);
    a
}

/// `snap dump -t ROOT… -D DIR EXTRA…`, asserting success and empty stdout.
pub fn dump_ok(roots: &[i32], dir: &Path, extra: &[&str]) -> SnapRun {
    let ps: Vec<String> = roots.iter().map(|p| p.to_string()).collect();
    let d = dir.to_string_lossy().to_string();
    let r = snap(&dump_args(&ps, &d, extra));
    assert!(r.ok(), "snap dump failed: {}", r.describe());
    assert!(r.stdout.trim().is_empty(), "snap dump printed on stdout: {:?}", r.stdout);
    r
}

pub fn dump_raw(roots: &[i32], dir: &Path, extra: &[&str]) -> SnapRun {
    let ps: Vec<String> = roots.iter().map(|p| p.to_string()).collect();
    let d = dir.to_string_lossy().to_string();
    snap(&dump_args(&ps, &d, extra))
}

/// Dump (killing the tree), then check every pid of the trees is gone
/// (reaping those that are our children) so that restore can reuse them.
pub fn dump_kill(roots: &[i32], dir: &Path, extra: &[&str]) -> (SnapRun, Vec<i32>) {
    let mut all = Vec::new();
    for &r in roots {
        all.extend(tree(r));
    }
    let run = dump_ok(roots, dir, extra);
    wait_gone(&all, Duration::from_secs(30)).unwrap_or_else(|e| panic!("after dump without --leave-running: {e}"));
    (run, all)
}

/// `snap restore -D DIR -d`; registers `expect_pids` (and their trees,
/// found at cleanup) with the reaper and checks they all run afterwards.
pub fn restore_ok(dir: &Path, reaper: &Reaper, expect_pids: &[i32]) -> SnapRun {
    reaper.add_all(expect_pids);
    let d = dir.to_string_lossy().to_string();
    let r = snap(&["restore", "-D", &d, "-d"]);
    assert!(r.ok(), "snap restore failed: {}", r.describe());
    for &p in expect_pids {
        assert!(alive(p), "pid {p} not present after restore");
        assert_ne!(proc_state(p), Some('Z'), "pid {p} is a zombie right after restore");
    }
    r
}

/// Field of /proc/PID/status (e.g. "Uid").
pub fn status_field(pid: i32, field: &str) -> Option<String> {
    status_field_of(&format!("/proc/{pid}/status"), field)
}

pub fn status_field_of(path: &str, field: &str) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()))
}

pub fn cmdline(pid: i32) -> Vec<u8> {
    fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

pub const SEC: Duration = Duration::from_secs(1);
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Rewrite JSON file `name` of image `dir` with `f` and re-sign it in the
/// manifest (size and checksum), as a hostile image would.
pub fn edit(dir: &Path, name: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(name);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    let data = serde_json::to_vec(&v).unwrap();
    fs::write(&p, &data).unwrap();
    edit_manifest(dir, |files| {
        for e in files.iter_mut().filter(|e| e["name"] == name) {
            e["size"] = serde_json::json!(data.len());
            e["xxh3"] = serde_json::json!(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data)));
        }
    });
}

/// Edit the manifest's list of files of image `dir`.
pub fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Vec<serde_json::Value>)) {
    let inv = dir.join("inventory.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&inv).unwrap()).unwrap();
    f(v.pointer_mut("/manifest/files").unwrap().as_array_mut().unwrap());
    fs::write(&inv, serde_json::to_vec(&v).unwrap()).unwrap();
}
