//! Application groups (DESIGN §1 "Seizing", §3 `snap run|join|ps`,
//! docs/groups.md).
//!
//! `snap run` starts a program as a group: a cgroup v2 of its own, and a
//! supervisor process (`supervisor.rs`) that is the program's parent,
//! checkpoints the group on a schedule or when asked, and holds the dirty
//! tracking between checkpoints so that each one reads only the pages
//! written since the last. The group's members are the processes in its
//! cgroup; `snap join` adds one by moving itself into the cgroup and
//! exec'ing. With `--pidns` the group also has a pid namespace, whose
//! pid 1 is snap's small init (`init.rs`), and `snap join` forks the
//! program inside it (docs/groups.md, "Pid namespace"). Each supervisor listens on a unix socket in its state
//! directory (`proto.rs`); `snap ps`, `snap dump --group` and `snap join`
//! talk to it there.
//!
//! Where things live:
//! * `/run/snap/groups/NAME/`: `control.sock`, `info.json` (removed when the
//!   group ends);
//! * `<cgroup2 mount>/snap/NAME`: the cgroup (removed when the group ends);
//! * the images root (default `/var/lib/snap/groups/NAME`): checkpoints
//!   `0001`, `0002`, …, and with `-d` the program's `output.log` and the
//!   supervisor's `supervisor.log`, which outlive the group because
//!   checkpoints refer to the log by path.

pub mod cgroup;
pub mod init;
pub mod proto;
pub mod supervisor;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cli::{DumpArgs, RunArgs};
use proto::Request;

/// Where each group's state directory is made.
pub const STATE_ROOT: &str = "/run/snap/groups";
/// Parent of a group's default images root.
pub const DEFAULT_IMAGES_ROOT: &str = "/var/lib/snap/groups";
/// Name of the control socket in the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Name of the info file in the state directory.
pub const INFO_NAME: &str = "info.json";
/// How long `snap ps` and `snap join` wait for a supervisor's answer to
/// `ps` (answered by its control thread, also during a checkpoint).
const PS_TIMEOUT: Duration = Duration::from_secs(10);

/// What the supervisor writes to `info.json` once the program runs: enough
/// for `snap ps` to describe a group whose supervisor is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub supervisor_pid: i32,
    /// /proc/PID/stat start time of the supervisor: tells a live supervisor
    /// from a later process that got its pid.
    pub supervisor_start_time: u64,
    pub cgroup: PathBuf,
    pub images_root: PathBuf,
    pub socket: PathBuf,
    pub program: Vec<String>,
    pub program_pid: i32,
    /// With --pidns: the namespace's init (host pid).
    #[serde(default)]
    pub pidns_init: Option<i32>,
    pub started_unix: u64,
}

pub fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

pub fn socket_path(name: &str) -> PathBuf {
    state_dir(name).join(SOCKET_NAME)
}

/// Group names end up in paths and cgroup names: letters, digits, `.`, `_`
/// and `-`, not starting with `.` or `-`, at most 64 characters.
pub fn validate_name(name: &str) -> Result<()> {
    ensure!(!name.is_empty() && name.len() <= 64, "group name {name:?}: must be 1 to 64 characters");
    ensure!(
        name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "group name {name:?}: only letters, digits, '.', '_' and '-' are allowed"
    );
    ensure!(!name.starts_with('.') && !name.starts_with('-'), "group name {name:?}: must not start with '.' or '-'");
    Ok(())
}

/// The default name of a group running `program`: its basename, made a
/// valid name.
pub fn default_name(program: &str) -> String {
    let base = Path::new(program).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut n: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).take(56).collect();
    if n.is_empty() || n.starts_with('.') || n.starts_with('-') {
        n.insert_str(0, "group");
    }
    n
}

/// `30s`, `500ms`, `2m`, `1h`, or a number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected a number and a unit (500ms, 30s, 2m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs >= 0.001 && secs < 1e9) {
        return Err(format!("{s:?}: must be between 1ms and 30 years"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `snap run`: the process itself supervises, or with `-d` a detached copy
/// does and this one returns once the program runs.
pub fn run(mut a: RunArgs) -> Result<i32> {
    ensure!(!a.program.is_empty(), "snap run: no program given (snap run [OPTIONS] -- PROGRAM [ARGS...])");
    if let Some(n) = &a.name {
        validate_name(n)?;
    }
    // The program of a --pidns group is the child of the namespace's init,
    // which reaps it and outlives it while anything else is left in the
    // namespace: the supervisor does not see it die (docs/groups.md).
    ensure!(!(a.recover && a.pidns), "snap run: --recover does not work with --pidns yet (the supervisor is not the program's parent there)");
    if let Some(r) = &a.images_root {
        a.images_root = Some(std::path::absolute(r).with_context(|| format!("--images-root {}", r.display()))?);
    }
    if a.detach {
        return start_detached(&a);
    }
    supervisor::run(a, supervisor::Mode::Foreground)
}

/// `snap run -d`: start `snap __supervise` in a session of its own and wait
/// for its report on its stdout (one JSON line once the program runs) or
/// its error on stderr.
fn start_detached(a: &RunArgs) -> Result<i32> {
    let spec = serde_json::to_string(a)?;
    let exe = std::env::current_exe().context("finding snap's own binary")?;
    let mut child = Command::new(&exe)
        .arg("__supervise")
        .arg(spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the supervisor ({})", exe.display()))?;
    let mut out = child.stdout.take().context("supervisor stdout")?;
    let mut err = child.stderr.take().context("supervisor stderr")?;
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Both pipes reach EOF when the supervisor has reported (it then points
    // its stdio at its log) or died.
    let mut report = String::new();
    let _ = out.read_to_string(&mut report);
    let errs = errs.join().unwrap_or_default();
    eprint!("{errs}");
    let Some(line) = report.lines().find(|l| !l.trim().is_empty()) else {
        let st = child.wait().context("waiting for the supervisor")?;
        if errs.trim().is_empty() {
            bail!("the supervisor exited ({st}) without starting the program");
        }
        return Ok(st.code().filter(|&c| c != 0).unwrap_or(1));
    };
    // Not waited for: it outlives us.
    drop(child);
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("the supervisor's report {line:?}"))?;
    if a.json {
        crate::outln!("{v}")?;
    } else {
        crate::outln!(
            "group {}: supervisor {}, program {} (cgroup {}, checkpoints in {})",
            v["name"].as_str().unwrap_or("?"),
            v["supervisor_pid"],
            v["program_pid"],
            v["cgroup"].as_str().unwrap_or("?"),
            v["images_root"].as_str().unwrap_or("?"),
        )?;
    }
    Ok(0)
}

/// `snap __supervise SPEC`: the detached supervisor.
pub fn supervise_detached(spec: &str) -> Result<i32> {
    // Its own session: no terminal, no signals meant for the caller's job.
    nix::unistd::setsid().context("setsid")?;
    let a: RunArgs = serde_json::from_str(spec).context("supervisor arguments")?;
    supervisor::run(a, supervisor::Mode::Detached)
}

/// `snap dump --group NAME [-D DIR] [--json]`: the supervisor dumps.
pub fn dump(a: &DumpArgs) -> Result<()> {
    let name = a.group.as_deref().context("no --group")?;
    validate_name(name)?;
    let dir = if a.dir.as_os_str().is_empty() {
        None
    } else {
        // The supervisor has its own working directory.
        Some(std::path::absolute(&a.dir).with_context(|| format!("-D {}", a.dir.display()))?)
    };
    let sock = existing_socket(name)?;
    // The supervisor's errors name the group already; transport errors
    // name the socket, which does too.
    let v = proto::request(&sock, &Request::Dump { dir, compress: a.compress }, None)?;
    if a.json {
        crate::outln!("{v}")?;
    }
    Ok(())
}

/// `snap recover NAME [--json]`: the supervisor kills the group and
/// restores its last good checkpoint now.
pub fn recover(name: &str, json: bool) -> Result<()> {
    validate_name(name)?;
    let sock = existing_socket(name)?;
    let v = proto::request(&sock, &Request::Recover, None)?;
    if json {
        crate::outln!("{v}")?;
    } else {
        crate::outln!(
            "group {name}: restored from {} (program pid {}, {} processes)",
            v["from"].as_str().unwrap_or("?"),
            v["program_pid"],
            v["pids"].as_array().map_or(0, |a| a.len()),
        )?;
        for s in v["skipped"].as_array().into_iter().flatten() {
            crate::outln!("  skipped {}: {}", s["dir"].as_str().unwrap_or("?"), s["error"].as_str().unwrap_or("?"))?;
        }
    }
    Ok(())
}

/// The control socket of a group whose state directory exists.
fn existing_socket(name: &str) -> Result<PathBuf> {
    let d = state_dir(name);
    ensure!(d.is_dir(), "group {name}: no such group ({} does not exist; see snap ps)", d.display());
    Ok(d.join(SOCKET_NAME))
}

/// `snap join NAME -- PROGRAM…`: move this process into the group's cgroup
/// and exec the program, which keeps our stdio, parent and session (like
/// `cgexec`). Returns only on failure.
pub fn join(name: &str, program: &[String]) -> Result<i32> {
    validate_name(name)?;
    let Some((prog, args)) = program.split_first() else { bail!("snap join {name}: no program given") };
    let sock = existing_socket(name)?;
    // Asking the supervisor proves the group is alive and gives its cgroup.
    let v = proto::request(&sock, &Request::Ps, Some(PS_TIMEOUT))
        .with_context(|| format!("group {name}: asking its supervisor"))?;
    let cg = PathBuf::from(v["cgroup"].as_str().with_context(|| format!("group {name}: the supervisor named no cgroup"))?);
    let expected = cgroup::path_of(name)?;
    ensure!(
        cg == expected,
        "group {name}: the supervisor names cgroup {}, not the group's {}; refusing to join it",
        cg.display(),
        expected.display()
    );
    // glibc's own signals first: see below.
    for sig in crate::sys::process::LIBC_INTERNAL_SIGNALS {
        crate::sys::process::default_disposition(sig)
            .with_context(|| format!("group {name}: resetting signal {sig} before exec"))?;
    }
    if let Some(init) = v["pidns_init"].as_i64() {
        return join_pidns(name, &cg, init as i32, prog, args);
    }
    let procs = cg.join("cgroup.procs");
    std::fs::write(&procs, "0")
        .with_context(|| format!("group {name}: moving pid {} into {}", std::process::id(), procs.display()))?;
    // The caller's blocked and ignored signals are the program's, as with
    // any exec (`nohup snap join …` keeps SIGHUP ignored), except glibc's
    // own 32 and 33 (reset above), which are ignored only because a glibc
    // posix_spawn started some ancestor.
    use std::os::unix::process::CommandExt;
    let e = Command::new(prog).args(args).exec();
    Err(e).with_context(|| format!("group {name}: executing {prog} in the group (pid {})", std::process::id()))
}

/// `snap join` of a `--pidns` group: enter the namespace of its init (pid
/// and mount: the group's /proc), then fork the program there, moved into
/// the cgroup before it execs. A process cannot enter a pid namespace
/// itself, only its children do, so the program is our child (`nsenter`
/// works the same way): we wait for it, pass on the signals sent to us, and
/// exit with its status. In the namespace its parent is outside (getppid()
/// is 0), as a program joined to a plain group has its parent outside the
/// group; checkpoints have it as a root of its own.
fn join_pidns(name: &str, cg: &Path, init: i32, prog: &str, args: &[String]) -> Result<i32> {
    use std::os::fd::AsRawFd;
    use nix::sched::{setns, CloneFlags};
    // Everything about the init through one directory descriptor: if the
    // pid is reused meanwhile, reads through it fail instead of describing
    // another process.
    let dir = std::fs::File::open(format!("/proc/{init}")).with_context(|| format!("group {name}: its init, pid {init}, is gone"))?;
    let at = |f: &str| format!("/proc/self/fd/{}/{f}", dir.as_raw_fd());
    let members = cgroup::members_at(cg).with_context(|| format!("group {name}: members"))?;
    let status = std::fs::read_to_string(at("status")).with_context(|| format!("group {name}: its init, pid {init}, is gone"))?;
    let nspid: Vec<&str> =
        status.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| v.split_whitespace().collect()).unwrap_or_default();
    ensure!(
        members.contains(&crate::types::Pid(init)) && nspid.len() >= 2 && nspid.last() == Some(&"1"),
        "group {name}: pid {init} is not the init of the group's pid namespace (NSpid {nspid:?}); refusing to join"
    );
    let pidns = std::fs::File::open(at("ns/pid")).with_context(|| format!("group {name}: opening {}", at("ns/pid")))?;
    let mntns = std::fs::File::open(at("ns/mnt")).with_context(|| format!("group {name}: opening {}", at("ns/mnt")))?;
    let cwd = std::env::current_dir().context("our working directory")?;
    setns(&pidns, CloneFlags::CLONE_NEWPID).with_context(|| format!("group {name}: entering the pid namespace of pid {init}"))?;
    setns(&mntns, CloneFlags::CLONE_NEWNS).with_context(|| format!("group {name}: entering the mount namespace of pid {init}"))?;
    // Entering a mount namespace moves us to its root.
    std::env::set_current_dir(&cwd)
        .with_context(|| format!("group {name}: working directory {} in the group's mount namespace", cwd.display()))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.join("cgroup.procs"))
        .with_context(|| format!("group {name}: opening {}", cg.join("cgroup.procs").display()))?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let opts = crate::sys::process::SpawnOpts::default();
    let child = crate::sys::process::spawn_in_cgroup(&mut cmd, std::os::fd::AsFd::as_fd(&procs), opts)
        .with_context(|| format!("group {name}: executing {prog} in the group's pid namespace"))?;
    drop(procs);
    Ok(wait_forwarding(child.id() as i32))
}

/// Wait for our child `pid` and return its status (128+N if signal N
/// killed it), passing on to it the signals a process sends us (HUP, INT,
/// QUIT, TERM, USR1, USR2). A terminal's signals are not passed on: the
/// child, in our process group, has its own.
fn wait_forwarding(pid: i32) -> i32 {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut set = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGCHLD] {
        set.add(s);
    }
    let _ = set.thread_block();
    let child = nix::unistd::Pid::from_raw(pid);
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Err(nix::errno::Errno::ECHILD) => return 1,
            _ => {}
        }
        // The timeout bounds a missed SIGCHLD (it came before the block).
        if let Ok(Some(info)) = crate::sys::process::sigtimedwait(&set, Some(Duration::from_secs(1))) {
            if info.si_signo != libc::SIGCHLD && info.si_code <= 0 {
                let _ = crate::sys::process::kill_raw(pid, info.si_signo);
            }
        }
    }
}

/// `snap ps [--json]`: every group under /run/snap/groups, as its
/// supervisor describes it; a group whose supervisor does not answer is
/// reported as dead (or not answering) with its stale state directory.
pub fn ps(json: bool) -> Result<i32> {
    let mut names: Vec<String> = match std::fs::read_dir(STATE_ROOT) {
        Ok(rd) => rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {STATE_ROOT}")),
    };
    names.sort();
    let groups: Vec<serde_json::Value> = names.iter().map(|n| describe(n)).collect();
    if json {
        crate::outln!("{}", serde_json::json!({ "groups": groups }))?;
        return Ok(0);
    }
    if groups.is_empty() {
        crate::outln!("no groups (nothing in {STATE_ROOT})")?;
    }
    for g in &groups {
        print_group(g)?;
    }
    Ok(0)
}

/// One group for `snap ps`.
fn describe(name: &str) -> serde_json::Value {
    let dir = state_dir(name);
    match proto::request(&dir.join(SOCKET_NAME), &Request::Ps, Some(PS_TIMEOUT)) {
        Ok(mut v) => {
            v["state"] = "running".into();
            v
        }
        Err(e) => {
            let info: Option<Info> =
                std::fs::read(dir.join(INFO_NAME)).ok().and_then(|b| serde_json::from_slice(&b).ok());
            // The same process (start time), and not a zombie waiting for
            // its parent to reap it.
            let alive = info.as_ref().is_some_and(|i| {
                crate::dump::proc::Stat::read(i.supervisor_pid).is_some_and(|s| {
                    s.field::<u64>(22).ok() == Some(i.supervisor_start_time) && s.field_str(3).ok() != Some("Z")
                })
            });
            // A supervisor writes info.json right after starting the
            // program: a young directory without it is one starting up.
            let young = || {
                std::fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|e| e < Duration::from_secs(10)))
            };
            let state = match (&info, alive) {
                (_, true) => "not-answering",
                (None, false) if young() => "starting",
                _ => "dead",
            };
            serde_json::json!({
                "name": name,
                "state": state,
                "state_dir": dir,
                "stale_state_dir": (state == "dead").then(|| dir.clone()),
                "error": format!("{e:#}"),
                "supervisor_pid": info.as_ref().map(|i| i.supervisor_pid),
                "cgroup": info.as_ref().map(|i| i.cgroup.clone()),
                "images_root": info.as_ref().map(|i| i.images_root.clone()),
            })
        }
    }
}

fn print_group(g: &serde_json::Value) -> Result<()> {
    let s = |k: &str| g[k].as_str().map(str::to_string).unwrap_or_else(|| g[k].to_string());
    match g["state"].as_str() {
        Some("running") => {
            let last = match g["last_checkpoint"]["dir"].as_str() {
                Some(d) => {
                    let ago = g["last_checkpoint"]["unix_time"].as_u64().map(|t| now_unix().saturating_sub(t));
                    format!("{d} ({}s ago)", ago.map_or("?".into(), |a| a.to_string()))
                }
                None => "none".into(),
            };
            crate::outln!(
                "{}  supervisor {}  checkpoints {}  last {}  every {}  cgroup {}",
                s("name"),
                s("supervisor_pid"),
                s("checkpoints"),
                last,
                g["interval_ms"].as_u64().map_or("-".into(), |m| format!("{m}ms")),
                s("cgroup"),
            )?;
            if g["recover"] == true || g["recoveries"].as_u64().unwrap_or(0) > 0 {
                let last = &g["last_recovery"];
                let when = match last["unix_time"].as_u64() {
                    Some(t) => format!(
                        ", last {}s ago from {}",
                        now_unix().saturating_sub(t),
                        last["from"].as_str().unwrap_or("?")
                    ),
                    None => String::new(),
                };
                crate::outln!(
                    "  recoveries {}{when}{}",
                    g["recoveries"].as_u64().unwrap_or(0),
                    if g["recover"] == true { "" } else { " (automatic recovery off)" }
                )?;
            }
            if let Some(init) = g["pidns_init"].as_i64() {
                crate::outln!("  own pid namespace, init {init} (host pids below)")?;
            }
            crate::outln!("  {:>7} {:>7}  COMM", "PID", "PPID")?;
            for m in g["members"].as_array().into_iter().flatten() {
                crate::outln!("  {:>7} {:>7}  {}", m["pid"], m["ppid"], m["comm"].as_str().unwrap_or("?"))?;
            }
            if let Some(e) = g["last_error"].as_str() {
                crate::outln!("  last error: {e}")?;
            }
        }
        Some(st) => crate::outln!("{}  {st}: stale state dir {} ({})", s("name"), s("state_dir"), s("error"))?,
        None => crate::outln!("{}  ?", s("name"))?,
    }
    Ok(())
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("web-1.a_b").is_ok());
        for bad in ["", ".x", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(default_name("/usr/bin/python3"), "python3");
        assert_eq!(default_name("./my prog"), "my_prog");
        assert_eq!(default_name(".hidden"), "group.hidden");
        assert!(validate_name(&default_name(&"y".repeat(200))).is_ok());
    }
}
