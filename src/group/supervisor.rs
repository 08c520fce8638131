//! The group supervisor: the parent of the group's program, the keeper of
//! its cgroup and of the dirty tracking between its checkpoints.
//!
//! Threads:
//! * the **main thread** does everything that touches processes: it starts
//!   the program, reaps children (it is a child subreaper, so orphans of the
//!   group come to it rather than to a slow pid 1), takes checkpoints (the
//!   dump ptraces the members, and ptrace belongs to the thread that
//!   seized), and handles SIGTERM/SIGINT/SIGHUP through a signalfd. It
//!   sleeps in `poll` on the signalfd, a wake-up socket and the cgroup's
//!   `cgroup.events`, or until the next scheduled checkpoint.
//! * the **control thread** accepts connections on the control socket, one
//!   short-lived thread per connection. `ps` is answered there from the
//!   shared status (so `snap ps` answers during a long checkpoint); `dump`
//!   is handed to the main thread over a channel and the connection waits
//!   for its result.
//!
//! A checkpoint freezes the cgroup (DESIGN §1: nothing forks or exits
//! mid-seize), lists the members, dumps the trees under the members whose
//! parent is not a member, thaws as soon as every thread is seized (a
//! frozen task cannot run the parasite's system calls, a seized one stays
//! stopped when thawed), and keeps the tracking the dump returns for the
//! next one.
//!
//! With `--recover` (and on `snap recover`), the main thread also brings
//! the group back from its newest verified checkpoint when the program
//! dies abnormally (`supervisor/recover.rs`).

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use serde::Serialize;

use super::cgroup::GroupCgroup;
use super::proto::{self, Request};
use super::{Info, INFO_NAME, SOCKET_NAME, STATE_ROOT};

mod recover;
pub use recover::Recovery;
use crate::cli::{DumpArgs, RunArgs};
use crate::sys::process::SpawnOpts;
use crate::track::TrackSet;
use crate::types::Pid;

/// How long a freeze may take before the checkpoint goes on without it.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest sleep of the main loop: bounds a missed cgroup.events wake-up.
const MAX_SLEEP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `snap run`: stdio shared with the program, exits with its status.
    Foreground,
    /// `snap run -d`: reports on stdout once the program runs, then logs.
    Detached,
}

/// The last checkpoint, for `ps`.
#[derive(Debug, Clone, Serialize)]
pub struct LastCheckpoint {
    pub dir: PathBuf,
    pub id: String,
    pub unix_time: u64,
    pub seconds: f64,
    pub backend: String,
}

/// What the control thread reports to `ps`; the main thread updates it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub supervisor_pid: i32,
    pub cgroup: PathBuf,
    pub state_dir: PathBuf,
    pub images_root: PathBuf,
    pub interval_ms: Option<u64>,
    pub keep: u64,
    pub program: Vec<String>,
    pub program_pid: i32,
    /// With --pidns: the namespace's init (host pid), our child.
    pub pidns_init: Option<i32>,
    /// The program's exit status once it ended (other members may remain).
    /// With --pidns: once the init ended, with the program's status.
    pub program_exit: Option<i32>,
    pub started_unix: u64,
    /// Checkpoints taken successfully.
    pub checkpoints: u64,
    pub last_checkpoint: Option<LastCheckpoint>,
    /// The last checkpoint or prune that failed, and why.
    pub last_error: Option<String>,
    /// Set while a checkpoint runs: its directory.
    pub checkpointing: Option<PathBuf>,
    pub log: Option<PathBuf>,
    /// `--recover`: the program's abnormal death restores the group.
    pub recover: bool,
    /// Recoveries done (automatic and `snap recover`).
    pub recoveries: u64,
    pub last_recovery: Option<Recovery>,
    /// Set while a recovery runs: the checkpoint being restored.
    pub recovering: Option<PathBuf>,
}

impl Status {
    /// The `ps` reply: the status and the members as they are now.
    fn ps(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        let members: Vec<serde_json::Value> = super::cgroup::members_at(&self.cgroup)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let st = crate::dump::proc::Stat::read(p.0);
                serde_json::json!({
                    "pid": p.0,
                    "ppid": st.as_ref().and_then(|s| s.field::<i32>(4).ok()),
                    "comm": st.as_ref().map(|s| s.comm.clone()),
                })
            })
            .collect();
        v["members"] = members.into();
        v
    }
}

/// Work for the main thread asked for over the control socket.
struct Job {
    kind: JobKind,
    reply: mpsc::Sender<std::result::Result<serde_json::Value, String>>,
}

enum JobKind {
    /// A checkpoint now.
    Dump { dir: Option<PathBuf>, compress: bool },
    /// `snap recover`: back to the last good checkpoint now.
    Recover,
}

/// The group's state directory; removed (with everything in it) on drop.
struct StateDir {
    path: PathBuf,
}

impl StateDir {
    fn create(name: &str) -> Result<StateDir> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(STATE_ROOT)
            .with_context(|| format!("creating {STATE_ROOT}"))?;
        let path = super::state_dir(name);
        // 0700: the socket makes the supervisor dump wherever it is told.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("group {name}: creating state dir {}", path.display()))?;
        Ok(StateDir { path })
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            warn(&format!("removing state dir {}: {e}", self.path.display()));
        }
    }
}

/// A warning on stderr (the terminal, or the supervisor log with -d); a
/// closed stderr must not bring the supervisor down.
fn warn(msg: &str) {
    let _ = writeln!(std::io::stderr(), "snap: warning: {msg}");
}

fn already_exists(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|i| i.kind() == std::io::ErrorKind::AlreadyExists))
}

/// Take a name: its state dir and its cgroup, both made here, so a name is
/// never shared. An explicit name that is taken is an error naming who
/// holds it; a default name gets a number instead (`bash-2`).
fn claim(a: &RunArgs) -> Result<(String, StateDir, GroupCgroup)> {
    let explicit = a.name.is_some();
    let base = match &a.name {
        Some(n) => n.clone(),
        None => super::default_name(&a.program[0]),
    };
    super::validate_name(&base)?;
    for n in 1..=1000 {
        let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
        let sd = match StateDir::create(&name) {
            Ok(sd) => sd,
            Err(e) if already_exists(&e) && !explicit => continue,
            Err(e) if already_exists(&e) => {
                let d = super::state_dir(&name);
                return Err(e.context(format!(
                    "group {name} exists (state dir {}; `snap ps` tells whether its supervisor runs, remove the directory if it is stale)",
                    d.display()
                )));
            }
            Err(e) => return Err(e),
        };
        match GroupCgroup::create(&name) {
            Ok(cg) => return Ok((name, sd, cg)),
            Err(e) if already_exists(&e) && !explicit => continue,
            Err(e) if already_exists(&e) => {
                return Err(e.context(format!(
                    "group {name}: its cgroup exists already and was not made by this supervisor; it is left alone"
                )))
            }
            Err(e) => return Err(e),
        }
    }
    anyhow::bail!("no free group name from {base} to {base}-1000")
}

/// Reap every child that has ended; return (pid, status) of each.
fn reap() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, c)) => out.push((p.as_raw(), c)),
            Ok(WaitStatus::Signaled(p, s, _)) => out.push((p.as_raw(), 128 + s as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(_) => {}
        }
    }
}

/// Reap whatever has ended (for cleanup paths that only need no zombies).
pub fn reap_any() {
    reap();
}

fn start_time_of(pid: i32) -> u64 {
    crate::dump::proc::Stat::read(pid).and_then(|s| s.field::<u64>(22).ok()).unwrap_or(0)
}

/// Write `info.json` atomically.
fn write_info(dir: &Path, info: &Info) -> Result<()> {
    let tmp = dir.join(format!(".{INFO_NAME}.tmp"));
    let path = dir.join(INFO_NAME);
    fs::write(&tmp, serde_json::to_vec_pretty(info)?).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn open_append(p: &Path) -> Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening {}", p.display()))
}

/// The roots of a dump of `members`: the members whose parent is not one
/// (the program, joined programs, orphans the supervisor adopted). The
/// program comes first: restore without -d exits with the first root's
/// status, as the group did with the program's.
pub fn roots_of(members: &[Pid], program: Pid) -> Vec<i32> {
    let mut roots: Vec<i32> = members
        .iter()
        .filter(|p| {
            let pp = crate::dump::proc::Stat::read(p.0).and_then(|s| s.field::<i32>(4).ok());
            !pp.is_some_and(|pp| members.contains(&Pid(pp)))
        })
        .map(|p| p.0)
        .collect();
    roots.sort_by_key(|&p| (p != program.0, p));
    roots
}

/// The next checkpoint directory under `root`: one past the highest
/// numbered one (numbers keep growing while old ones are pruned).
fn next_dir(root: &Path) -> Result<PathBuf> {
    let mut max = 0u64;
    for e in fs::read_dir(root).with_context(|| format!("reading images root {}", root.display()))?.flatten() {
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
            max = max.max(n);
        }
    }
    Ok(root.join(format!("{:04}", max + 1)))
}

/// `snap run`'s supervisor. Returns the program's exit status once every
/// member has exited, or 128+signal after SIGTERM/SIGINT/SIGHUP (the group
/// is killed then).
pub fn run(a: RunArgs, mode: Mode) -> Result<i32> {
    let (name, state, cg) = claim(&a)?;
    let images_root = match &a.images_root {
        Some(r) => r.clone(),
        None => Path::new(super::DEFAULT_IMAGES_ROOT).join(&name),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&images_root)
        .with_context(|| format!("group {name}: creating images root {}", images_root.display()))?;
    let sock_path = state.path.join(SOCKET_NAME);
    let listener = UnixListener::bind(&sock_path).with_context(|| format!("group {name}: binding {}", sock_path.display()))?;

    // Signals arrive through a signalfd, read by the main thread only: the
    // mask is set before any thread starts so that every thread inherits it
    // (the program does not: spawn_in_cgroup unblocks every signal and puts
    // every disposition back to default before exec).
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
        mask.add(s);
    }
    mask.thread_block().context("blocking signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).context("signalfd")?;
    // Orphans of the group become our children: reaped at once, and still
    // under a non-member parent, so they are roots of the next dump.
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;

    let log = (mode == Mode::Detached).then(|| images_root.join("output.log"));
    let opts = SpawnOpts { new_session: mode == Mode::Detached, default_signals: true, keep_fd: None };
    // `child`: our child (the program, or with --pidns the namespace's
    // init); `program`: the program itself.
    let (child, program) = if a.pidns {
        start_in_pidns(&name, &a.program, &cg, opts, log.as_deref(), &images_root)?
    } else {
        let mut cmd = std::process::Command::new(&a.program[0]);
        cmd.args(&a.program[1..]);
        program_stdio(&mut cmd, log.as_deref()).with_context(|| format!("group {name}: program log"))?;
        let procs = cg.procs_for_writing()?;
        let c = crate::sys::process::spawn_in_cgroup(&mut cmd, procs.as_fd(), opts)
            .with_context(|| format!("group {name}: starting {:?} in cgroup {}", a.program[0], cg.path().display()))?;
        // Reaped with waitpid(-1) by the main loop, not through this handle.
        (Pid(c.id() as i32), Pid(c.id() as i32))
    };
    let pidns_init = a.pidns.then_some(child.0);

    let me = std::process::id() as i32;
    let started = super::now_unix();
    let info = Info {
        name: name.clone(),
        supervisor_pid: me,
        supervisor_start_time: start_time_of(me),
        cgroup: cg.path().to_path_buf(),
        images_root: images_root.clone(),
        socket: sock_path.clone(),
        program: a.program.clone(),
        program_pid: program.0,
        pidns_init,
        started_unix: started,
    };
    write_info(&state.path, &info).with_context(|| format!("group {name}"))?;
    let status = Arc::new(Mutex::new(Status {
        name: name.clone(),
        supervisor_pid: me,
        cgroup: cg.path().to_path_buf(),
        state_dir: state.path.clone(),
        images_root: images_root.clone(),
        interval_ms: a.checkpoint_every.map(|d| d.as_millis() as u64),
        keep: a.keep,
        program: a.program.clone(),
        program_pid: program.0,
        pidns_init,
        program_exit: None,
        started_unix: started,
        checkpoints: 0,
        last_checkpoint: None,
        last_error: None,
        checkpointing: None,
        log: log.clone(),
        recover: a.recover,
        recoveries: 0,
        last_recovery: None,
        recovering: None,
    }));

    let (wake_tx, wake_rx) = UnixStream::pair().context("socketpair for waking the supervisor")?;
    wake_rx.set_nonblocking(true).context("wake-up socket")?;
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    {
        let status = status.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control(listener, status, jobs_tx, wake_tx))
            .context("starting the control thread")?;
    }

    if mode == Mode::Detached {
        report_and_detach(&info, &images_root)?;
    }

    let mut sup = Supervisor {
        name,
        cg,
        images_root,
        keep: a.keep,
        interval: a.checkpoint_every,
        child,
        program_status: None,
        held: None,
        last: None,
        status,
        detached: mode == Mode::Detached,
        recover: a.recover,
        max_recoveries: a.max_recoveries.unwrap_or(recover::DEFAULT_MAX_RECOVERIES),
        recovery_window: a.recovery_window.unwrap_or(recover::DEFAULT_WINDOW),
        died: None,
        recent: std::collections::VecDeque::new(),
        taken: Vec::new(),
        state_dir: state.path.clone(),
        info,
    };
    let code = sup.main_loop(&sfd, &wake_rx, &jobs_rx);
    // The socket goes first, so that no client waits on a supervisor that
    // is leaving; the cgroup then the state dir by their guards.
    let _ = fs::remove_file(&sock_path);
    let code = code?;
    let mut reap_all = || reap_any();
    sup.cg.remove(&mut reap_all)?;
    drop(state);
    Ok(code)
}

/// The program's stdio: with -d, stdin from /dev/null, stdout and stderr
/// appended to the log; else ours.
fn program_stdio(cmd: &mut std::process::Command, log: Option<&Path>) -> Result<()> {
    if let Some(l) = log {
        let f = open_append(l)?;
        let f2 = f.try_clone().context("duplicating the log descriptor")?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    }
    Ok(())
}

/// `--pidns`: start `snap __pidns-init -- PROGRAM…` as pid 1 of a new pid
/// namespace, in the cgroup, and wait for its report (`init.rs`). Returns
/// the init and the program, as host pids.
fn start_in_pidns(
    name: &str,
    program: &[String],
    cg: &GroupCgroup,
    opts: SpawnOpts,
    log: Option<&Path>,
    images_root: &Path,
) -> Result<(Pid, Pid)> {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let exe = init_binary(images_root).with_context(|| format!("group {name}: the init's binary"))?;
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe for the init's report")?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("__pidns-init").arg("--report-fd").arg(wr.as_raw_fd().to_string()).arg("--").args(program);
    program_stdio(&mut cmd, log).with_context(|| format!("group {name}: program log"))?;
    let procs = cg.procs_for_writing()?;
    let opts = SpawnOpts { keep_fd: Some(wr.as_raw_fd()), ..opts };
    let init = crate::sys::process::in_new_pidns(|| crate::sys::process::spawn_in_cgroup(&mut cmd, procs.as_fd(), opts))
        .with_context(|| format!("group {name}: a new pid namespace"))?
        .with_context(|| format!("group {name}: starting the namespace's init ({}) in cgroup {}", exe.display(), cg.path().display()))?;
    let init = Pid(init.id() as i32);
    drop(wr);
    // One line (or EOF: the init died).
    let mut report = String::new();
    std::io::BufReader::new(std::fs::File::from(rd))
        .read_line(&mut report)
        .with_context(|| format!("group {name}: reading the init's report"))?;
    let report = report.trim();
    let ns_pid: i32 = match report.split_once(' ') {
        Some(("ok", n)) => n.parse().with_context(|| format!("group {name}: the init reported {report:?}"))?,
        Some(("error", e)) => anyhow::bail!("group {name}: starting {:?} in its pid namespace: {e}", program[0]),
        _ => anyhow::bail!("group {name}: the namespace's init (pid {init}) ended without starting {:?} ({report:?})", program[0]),
    };
    // The program as the host sees it: the init's child with that pid there.
    let children = fs::read_to_string(format!("/proc/{}/task/{}/children", init.0, init.0)).unwrap_or_default();
    let host = children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .find(|&c| {
            fs::read_to_string(format!("/proc/{c}/status"))
                .ok()
                .and_then(|s| s.lines().find_map(|l| l.strip_prefix("NSpid:")).and_then(|v| v.split_whitespace().last()?.parse::<i32>().ok()))
                == Some(ns_pid)
        })
        .with_context(|| format!("group {name}: the program (pid {ns_pid} in its namespace) is not a child of the init {init} any more"))?;
    Ok((init, Pid(host)))
}

/// The binary the namespace's init runs: a copy of snap's own, kept in the
/// images root under a name made of its content (`pidns-init-<xxh3>`).
/// Checkpoints map the init's executable by path and refuse a file that
/// changed since the dump; run from snap's own path, a rebuilt or upgraded
/// snap would make every checkpoint of the group unrestorable. A copy, not
/// a hard link: installing a new snap with `cp` rewrites the old inode in
/// place. Prune leaves it alone (it removes image directories only).
fn init_binary(images_root: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    // The very file we run, even if its path was replaced since.
    let bytes = fs::read("/proc/self/exe").context("reading /proc/self/exe")?;
    let path = images_root.join(format!("pidns-init-{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)));
    if fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    let tmp = images_root.join(format!(".pidns-init-{}.tmp", std::process::id()));
    fs::write(&tmp, &bytes).with_context(|| format!("copying snap's binary to {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).with_context(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(path)
}

/// `-d`: the report `snap run -d` waits for, then stdio to the log (which
/// closes the pipes, so `snap run -d` sees EOF and returns).
fn report_and_detach(info: &Info, images_root: &Path) -> Result<()> {
    let v = serde_json::json!({
        "name": info.name,
        "supervisor_pid": info.supervisor_pid,
        "program_pid": info.program_pid,
        "pidns_init": info.pidns_init,
        "cgroup": info.cgroup,
        "state_dir": super::state_dir(&info.name),
        "socket": info.socket,
        "images_root": info.images_root,
        "log": images_root.join("output.log"),
        "supervisor_log": images_root.join("supervisor.log"),
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").and_then(|_| out.flush()).context("reporting to snap run -d")?;
    drop(out);
    let log = open_append(&images_root.join("supervisor.log"))?;
    let null = fs::File::open("/dev/null").context("opening /dev/null")?;
    use std::os::fd::AsRawFd;
    nix::unistd::dup2(null.as_raw_fd(), 0).context("dup2 /dev/null to stdin")?;
    nix::unistd::dup2(log.as_raw_fd(), 1).context("dup2 the supervisor log to stdout")?;
    nix::unistd::dup2(log.as_raw_fd(), 2).context("dup2 the supervisor log to stderr")?;
    Ok(())
}

/// The control thread: one handler thread per connection.
fn control(l: UnixListener, status: Arc<Mutex<Status>>, jobs: mpsc::Sender<Job>, wake: UnixStream) {
    let wake = Arc::new(wake);
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let (status, jobs, wake) = (status.clone(), jobs.clone(), wake.clone());
        let r = std::thread::Builder::new().name("client".into()).spawn(move || {
            let reply = serve(&c, &status, &jobs, &wake);
            if let Err(e) = proto::write_reply(&c, reply) {
                warn(&format!("control socket: {e:#}"));
            }
        });
        if let Err(e) = r {
            warn(&format!("control socket: cannot start a thread for a client: {e}"));
        }
    }
}

fn serve(
    c: &UnixStream,
    status: &Mutex<Status>,
    jobs: &mpsc::Sender<Job>,
    wake: &UnixStream,
) -> std::result::Result<serde_json::Value, String> {
    if !proto::peer_allowed(c).map_err(|e| format!("{e:#}"))? {
        return Err("permission denied: only root and the supervisor's user may use this socket".into());
    }
    let kind = match proto::read_request(c).map_err(|e| format!("{e:#}"))? {
        Request::Ps => return Ok(status.lock().unwrap_or_else(|e| e.into_inner()).ps()),
        Request::Dump { dir, compress } => {
            if let Some(d) = &dir {
                if !d.is_absolute() {
                    return Err(format!("dump: {} is not an absolute path", d.display()));
                }
            }
            JobKind::Dump { dir, compress }
        }
        Request::Recover => JobKind::Recover,
    };
    let (tx, rx) = mpsc::channel();
    jobs.send(Job { kind, reply: tx }).map_err(|_| "the supervisor is stopping".to_string())?;
    let _ = (&*wake).write(&[1]);
    rx.recv().unwrap_or_else(|_| Err("the supervisor stopped before doing it".into()))
}

struct Supervisor {
    name: String,
    cg: GroupCgroup,
    images_root: PathBuf,
    keep: u64,
    interval: Option<Duration>,
    /// Our child: the program, or with --pidns the namespace's init (which
    /// exits with the program's status).
    child: Pid,
    program_status: Option<i32>,
    /// The tracking armed by the last checkpoint, for the next.
    held: Option<TrackSet>,
    /// The last checkpoint: the parent of the next.
    last: Option<PathBuf>,
    status: Arc<Mutex<Status>>,
    detached: bool,
    /// `--recover` and its limits.
    recover: bool,
    max_recoveries: u32,
    recovery_window: Duration,
    /// The status of our child (the program) when it died, until the main
    /// loop has decided whether to recover.
    died: Option<i32>,
    /// When the recent automatic recoveries were (within the window).
    recent: std::collections::VecDeque<Instant>,
    /// The checkpoints this supervisor took (or recovered from), oldest
    /// first: the candidates of a recovery. Never the images root's other
    /// directories, which may be another group's (an images root reused).
    taken: Vec<PathBuf>,
    state_dir: PathBuf,
    info: Info,
}

impl Supervisor {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap(&mut self) {
        for (pid, st) in reap() {
            if pid == self.child.0 {
                self.program_status = Some(st);
                self.died = Some(st);
                self.status().program_exit = Some(st);
            }
        }
    }

    /// Wait (a few seconds at most: someone may have moved it out of the
    /// cgroup instead) until the program, our child, can be reaped.
    fn wait_program(&mut self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if let Ok(pfd) = crate::sys::pidfd_open(self.child) {
            // Readable once the program has exited and can be reaped.
            let mut fds = [PollFd::new(pfd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(5000u16));
        }
        self.reap();
    }

    /// Until every member has exited (the program's status) or a signal
    /// says stop (128+signal, after killing the group).
    fn main_loop(&mut self, sfd: &SignalFd, wake: &UnixStream, jobs: &mpsc::Receiver<Job>) -> Result<i32> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let events = self.cg.events_file()?;
        let mut next = self.interval.map(|d| Instant::now() + d);
        let mut wake_open = true;
        loop {
            self.reap();
            let mut stop = None;
            while let Ok(Some(si)) = sfd.read_signal() {
                let s = si.ssi_signo as i32;
                if s != libc::SIGCHLD {
                    stop = Some(s);
                }
            }
            if let Some(s) = stop {
                self.note(&format!("signal {s}: killing the group"));
                self.cg.kill_all();
                let mut r = || reap_any();
                self.cg.wait_empty(Duration::from_secs(10), &mut r)?;
                return Ok(128 + s);
            }
            // The program died: with --recover and an abnormal status, the
            // group comes back from its last good checkpoint, or ends.
            if let Some(code) = self.after_death() {
                return Ok(code);
            }
            if !self.cg.populated()? {
                // A task leaves its cgroup before it becomes a zombie its
                // parent can reap: wait for the program's status.
                if self.program_status.is_none() {
                    self.wait_program();
                    if let Some(code) = self.after_death() {
                        return Ok(code);
                    }
                    if self.program_status.is_none() {
                        // Recovered: the group runs again.
                        continue;
                    }
                }
                let code = self.program_status.unwrap_or(0);
                self.note(&format!("every member has exited; the program's status was {code}"));
                return Ok(code);
            }
            let mut buf = [0u8; 64];
            loop {
                match std::io::Read::read(&mut &*wake, &mut buf) {
                    Ok(0) => {
                        // The control thread is gone: nothing will wake us
                        // there again, and EOF would keep poll busy.
                        wake_open = false;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                match job.kind {
                    JobKind::Dump { dir, compress } => {
                        let r = self.checkpoint(dir, compress).map_err(|e| format!("{e:#}"));
                        let _ = job.reply.send(r);
                    }
                    JobKind::Recover => match self.asked_recovery() {
                        Ok(v) => {
                            let _ = job.reply.send(Ok(v));
                        }
                        Err((e, end)) => {
                            let _ = job.reply.send(Err(e));
                            if let Some(code) = end {
                                return Ok(code);
                            }
                        }
                    },
                }
            }
            if let (Some(due), Some(every)) = (next, self.interval) {
                if Instant::now() >= due {
                    if let Err(e) = self.checkpoint(None, false) {
                        warn(&format!("{e:#}"));
                    }
                    // Overdue (a checkpoint longer than the interval): the
                    // next one a whole interval after this one ended.
                    next = Some((due + every).max(Instant::now()));
                    continue;
                }
            }
            let sleep = next.map_or(MAX_SLEEP, |d| d.saturating_duration_since(Instant::now()).min(MAX_SLEEP));
            let mut fds =
                vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN), PollFd::new(events.as_fd(), PollFlags::POLLPRI)];
            if wake_open {
                fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
            }
            // Reading cgroup.events re-arms its POLLPRI.
            let _ = std::io::Read::read(&mut &events, &mut [0u8; 256]);
            let _ = std::io::Seek::seek(&mut &events, std::io::SeekFrom::Start(0));
            match poll(&mut fds, PollTimeout::try_from(sleep.as_millis().max(1) as i32).unwrap_or(PollTimeout::ZERO)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll"),
            }
        }
    }

    /// A message in the supervisor log (only with -d: in the foreground
    /// the terminal belongs to the program).
    fn note(&self, msg: &str) {
        if self.detached {
            let _ = writeln!(std::io::stderr(), "snap: group {}: {msg}", self.name);
        }
    }

    /// A checkpoint now into `dir` (default: the next numbered one),
    /// incremental against the last, then prune the images root.
    fn checkpoint(&mut self, dir: Option<PathBuf>, compress: bool) -> Result<serde_json::Value> {
        let dir = match dir {
            Some(d) => d,
            None => next_dir(&self.images_root).with_context(|| format!("group {}", self.name))?,
        };
        self.status().checkpointing = Some(dir.clone());
        let r = self.checkpoint_into(&dir, compress);
        let mut st = self.status();
        st.checkpointing = None;
        match &r {
            Ok(_) => self.note(&format!("checkpoint {} taken", dir.display())),
            Err(e) => st.last_error = Some(format!("{e:#}")),
        }
        r
    }

    fn checkpoint_into(&mut self, dir: &Path, compress: bool) -> Result<serde_json::Value> {
        let name = self.name.clone();
        // The parent: the last checkpoint, if it still opens (it may have
        // been removed, or its own parent pruned away); else a full dump.
        let prev = self.last.clone().filter(|d| match crate::images::ImageReader::open(d) {
            Ok(_) => true,
            Err(e) => {
                warn(&format!("group {name}: last checkpoint {} unusable ({e:#}); this one is full", d.display()));
                false
            }
        });
        if prev.is_none() {
            self.held = None;
        }
        let frozen = match self.cg.freeze(FREEZE_TIMEOUT) {
            Ok(f) => Some(f),
            Err(e) => {
                warn(&format!("{e:#}; checkpointing without freezing"));
                None
            }
        };
        let was_frozen = frozen.is_some();
        let members = self.cg.members()?;
        ensure!(!members.is_empty(), "group {name}: no process left in cgroup {}", self.cg.path().display());
        let roots = roots_of(&members, self.child);
        let args = DumpArgs {
            tree: roots.clone(),
            dir: dir.to_path_buf(),
            leave_running: true,
            // A member with a terminal (the foreground program, a program
            // joined from a shell) must not make every checkpoint fail;
            // restoring such an image needs --shell-job.
            shell_job: true,
            ext_unix_sk: false,
            tcp_established: false,
            compress,
            track_mem: true,
            prev_images_dir: prev,
            json: false,
            group: None,
            cgroup: None,
        };
        let barrier = frozen.map(|f| Box::new(f) as crate::dump::Barrier);
        let out = crate::dump::run_frozen(&args, self.held.take(), barrier)
            .with_context(|| format!("group {name}: checkpoint of pids {roots:?} into {}", dir.display()))?;
        self.held = out.tracking;
        self.last = Some(dir.to_path_buf());
        self.taken.retain(|d| d != dir);
        self.taken.push(dir.to_path_buf());
        let mut summary = out.summary;
        summary["group"] = name.clone().into();
        summary["frozen"] = was_frozen.into();
        summary["roots"] = roots.into();
        let prune = crate::images::prune::prune(&self.images_root, self.keep as usize);
        // Pruned checkpoints are no recovery candidates any more.
        self.taken.retain(|d| d.exists());
        let mut st = self.status();
        match prune {
            Ok(rep) => summary["pruned"] = serde_json::to_value(rep).unwrap_or_default(),
            Err(e) => {
                let m = format!("group {name}: pruning {} to {}: {e:#}", self.images_root.display(), self.keep);
                warn(&m);
                summary["prune_error"] = m.clone().into();
                st.last_error = Some(m);
            }
        }
        // Counted after the prune, so that `ps` never shows a count whose
        // prune has not happened yet.
        st.checkpoints += 1;
        st.last_checkpoint = Some(LastCheckpoint {
            dir: dir.to_path_buf(),
            id: summary["id"].as_str().unwrap_or_default().to_string(),
            unix_time: super::now_unix(),
            seconds: summary["seconds"].as_f64().unwrap_or(0.0),
            backend: summary["backend"].as_str().unwrap_or_default().to_string(),
        });
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_dir_is_one_past_the_highest() {
        let d = std::env::temp_dir().join(format!("snap-nextdir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("0003")).unwrap();
        fs::create_dir_all(d.join("0012")).unwrap();
        fs::create_dir_all(d.join("other")).unwrap();
        fs::write(d.join("output.log"), "").unwrap();
        assert_eq!(next_dir(&d).unwrap(), d.join("0013"));
        fs::remove_dir_all(&d).unwrap();
    }
}
