//! `snap __pidns-init`: pid 1 of a `snap run --pidns` group's namespace.
//!
//! Why an init of its own rather than the program as pid 1: pid 1 of a
//! namespace is special. The kernel drops the signals it has no handler
//! for (a program written for an ordinary pid could not be stopped with
//! SIGTERM), orphans of the namespace are reparented to it (and must be
//! reaped), and when it exits every other process of the namespace is
//! killed (programs joined with `snap join` would die with the program).
//! This init:
//!
//! * makes a mount namespace of its own with the namespace's /proc, so the
//!   group sees its own pids there too (as `unshare --mount-proc` does);
//! * starts the program as its child (pid 2), with no signal blocked or
//!   ignored, and reports the program's pid, or why it did not start, on
//!   `--report-fd`, which it then closes;
//! * blocks every signal and waits for them with `sigtimedwait`: it reaps
//!   every child, and passes a signal sent to it by a process (`kill`) on
//!   to the program; signals from a terminal (`SI_KERNEL`) are not passed
//!   on, the program, in the same process group, has its own copy;
//! * exits with the program's status once the program has exited and no
//!   other process is left in the namespace (a joined program keeps it).
//!
//! It holds nothing but its stdio, so checkpoints save it as an ordinary
//! process, and `snap restore --pidns` makes it the new namespace's init
//! again (`dump/pidns.rs`); `sigtimedwait` interrupted by the dump returns
//! `EINTR`, which the loop takes as a wake-up.

use std::os::fd::RawFd;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::SigSet;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid as NixPid;

/// How often the init looks for other processes once the program is gone.
const LINGER_POLL: Duration = Duration::from_millis(200);

/// `snap __pidns-init --report-fd FD -- PROGRAM…`. Never returns while the
/// namespace has processes.
pub fn main(report_fd: RawFd, program: &[String]) -> Result<i32> {
    // Not for the program: it would hold the supervisor's pipe open.
    let _ = nix::fcntl::fcntl(report_fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    let started = start(program);
    let line = match &started {
        Ok(pid) => format!("ok {pid}\n"),
        Err(e) => format!("error {e:#}\n"),
    };
    // A supervisor that is gone cannot be told; the program runs anyway.
    let _ = crate::sys::process::write_raw(report_fd, line.as_bytes());
    let _ = nix::unistd::close(report_fd);
    let program = started?;
    Ok(reap_until_alone(program))
}

/// Pid 1 checks, /proc, signals blocked, the program started.
fn start(program: &[String]) -> Result<i32> {
    let me = std::process::id();
    ensure!(me == 1, "snap __pidns-init runs as pid 1 of a new pid namespace (snap run --pidns starts it), not as pid {me}");
    let (prog, args) = program.split_first().context("no program given")?;
    crate::restore::tree::private_proc().context("setting up /proc for the group's pid namespace")?;
    SigSet::all().thread_block().context("blocking signals")?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    crate::sys::process::reset_signals_at_exec(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("executing {prog}"))?;
    Ok(child.id() as i32)
}

/// The init's life: reap, pass signals on, and leave with the program's
/// status once nothing else is left.
fn reap_until_alone(program: i32) -> i32 {
    let all = SigSet::all();
    let mut status: Option<i32> = None;
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) if p.as_raw() == program => status = Some(c),
                Ok(WaitStatus::Signaled(p, s, _)) if p.as_raw() == program => status = Some(128 + s as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if let Some(code) = status {
            // kill(-1, 0) reaches every other process of the namespace.
            if nix::sys::signal::kill(NixPid::from_raw(-1), None) == Err(nix::errno::Errno::ESRCH) {
                return code;
            }
        }
        let timeout = status.map(|_| LINGER_POLL);
        let Ok(Some(info)) = crate::sys::process::sigtimedwait(&all, timeout) else { continue };
        let sig = info.si_signo;
        // si_code <= 0: sent by a process (kill, sigqueue, tgkill).
        if sig != libc::SIGCHLD && info.si_code <= 0 && status.is_none() {
            let _ = crate::sys::process::kill_raw(program, sig);
        }
    }
}
