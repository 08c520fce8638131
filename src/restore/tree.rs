//! Replaying the tree: code that runs inside every restored process while it
//! is still a forked copy of snap. Each process sets up what is easiest from
//! inside (session, children with their exact PIDs, fd table, cwd, umask,
//! rlimits, personality, scheduling), reports ready and waits to be seized;
//! its address space, threads and registers are replaced remotely afterwards
//! (`memory.rs`, `task.rs`).

use super::pool::Pool;
use super::Plan;
use crate::images::records::{ProcState, ProcessImage};
use crate::sys::clone::fork_with_pid;
use anyhow::{bail, Context, Result};
use std::os::fd::RawFd;

/// One record on the ready pipe: fixed size, so writes are atomic.
pub const RECORD: usize = 512;

pub fn encode(pid: i32, status: i32, msg: &str) -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[0..4].copy_from_slice(&pid.to_ne_bytes());
    b[8..12].copy_from_slice(&status.to_ne_bytes());
    let m = msg.as_bytes();
    let n = m.len().min(RECORD - 12);
    b[12..12 + n].copy_from_slice(&m[..n]);
    b
}

pub fn decode(b: &[u8]) -> (i32, i32, String) {
    let i = |o: usize| i32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let msg = String::from_utf8_lossy(&b[12..]).trim_end_matches('\0').to_string();
    (i(0), i(8), msg)
}

fn report(fd: RawFd, rec: &[u8; RECORD]) {
    // A short write cannot happen for <= PIPE_BUF bytes on a blocking pipe.
    let _ = crate::sys::process::write_raw(fd, rec);
}

/// Create process `pid` of the image as a child of the calling process.
/// Returns in the parent with the child's PID (in our namespace).
pub fn spawn(plan: &Plan, pool: &Pool, pid: i32) -> Result<i32> {
    let p = plan.procs.get(&pid).with_context(|| format!("pid {pid}: no record in the image"))?;
    let child = fork_with_pid(pid).map_err(|e| match e {
        nix::errno::Errno::EEXIST => anyhow::anyhow!("pid {pid} ({}): the PID is taken on this host", p.comm),
        e => anyhow::anyhow!("pid {pid} ({}): clone3 with set_tid failed: {e}", p.comm),
    })?;
    if child != 0 {
        return Ok(child);
    }
    // In the child from here on: never return.
    if let Some(fd) = plan.init_mnt {
        // A root of a namespace whose init is restored: into the init's
        // mount namespace, with the namespace's /proc (cwd and root are
        // set again in `setup`).
        if let Err(e) = nix::sched::setns(crate::sys::borrow_fd(fd), nix::sched::CloneFlags::CLONE_NEWNS) {
            report(pool.ready_w, &encode(pid, 1, &format!("pid {pid}: joining the namespace init's mount namespace: {e}")));
            crate::sys::process::exit_now(1);
        }
    }
    let code = match &p.state {
        ProcState::Zombie { wait_status } => become_zombie(*wait_status),
        ProcState::Alive => match setup(plan, pool, p) {
            Ok(()) => {
                report(pool.ready_w, &encode(pid, 0, ""));
                wait_forever(pool.go_r);
                0
            }
            Err(e) => {
                report(pool.ready_w, &encode(pid, 1, &format!("{e:#}")));
                1
            }
        },
    };
    crate::sys::process::exit_now(code)
}

/// Exit with the saved wait status so the parent finds the same zombie.
fn become_zombie(status: i32) -> i32 {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // No core file from a replayed death.
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
        if let Ok(s) = nix::sys::signal::Signal::try_from(sig) {
            crate::sys::process::default_signal(sig);
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(s);
            let _ = set.thread_unblock();
            let _ = nix::sys::signal::raise(s);
        }
        127
    } else {
        libc::WEXITSTATUS(status)
    }
}

fn wait_forever(fd: RawFd) {
    let mut b = [0u8; 1];
    loop {
        // Nobody writes: we are seized and interrupted here.
        match nix::unistd::read(fd, &mut b) {
            Err(nix::errno::Errno::EINTR) => continue,
            _ => return,
        }
    }
}

/// Everything a process sets up itself, in this order: session (before
/// children, who inherit it), children (parents before children), then the
/// per-process attributes, fd table last (it may replace our stdio).
fn setup(plan: &Plan, pool: &Pool, p: &ProcessImage) -> Result<()> {
    let pid = p.pid;
    if plan.own_init && pid == 1 {
        // The namespace's init: a /proc of the namespace, for it and
        // everything forked below it (the other roots join it later).
        private_proc().context("pid 1: setting up /proc for the new pid namespace")?;
    }
    if p.sid == p.pid {
        nix::unistd::setsid().with_context(|| format!("pid {pid}: setsid"))?;
        // Its controlling terminal, before the children: they inherit it.
        if let Some(fd) = pool.ctty_fd(pid) {
            crate::kinds::sys::ioctl_arg(crate::sys::borrow_fd(fd), libc::TIOCSCTTY, 0)
                .with_context(|| format!("pid {pid}: taking its pseudo-terminal back as controlling terminal (TIOCSCTTY)"))?;
        }
    }
    let my_sid = nix::unistd::getsid(None).map(|s| s.as_raw()).unwrap_or(0);
    for &c in &p.children {
        let cp = plan.procs.get(&c).with_context(|| format!("pid {c}: child of {pid} missing from the image"))?;
        if cp.sid != cp.pid && cp.sid != my_sid && plan.procs.contains_key(&cp.sid) {
            bail!(
                "pid {c}: session {} differs from its parent's ({my_sid}) and it is not a session leader; \
                 this session layout is not supported yet",
                cp.sid
            );
        }
        spawn(plan, pool, c)?;
    }
    let ctx = |what: &str| format!("pid {pid} ({}): {what}", p.comm);
    // Root first: chroot, then cwd relative to it.
    if p.root != "/" {
        nix::unistd::chroot(p.root.as_str()).with_context(|| ctx(&format!("chroot {}", p.root)))?;
    }
    nix::unistd::chdir(p.cwd.as_str()).with_context(|| ctx(&format!("chdir {}", p.cwd)))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(p.umask));
    crate::sys::process::set_personality(p.personality).with_context(|| ctx("personality"))?;
    crate::sys::process::set_nice(p.nice).with_context(|| ctx("setpriority"))?;
    crate::sys::process::set_sched(p.sched.policy, p.sched.priority).with_context(|| ctx("sched_setscheduler"))?;
    // The fd table: every descriptor at its number, inherited from the pool.
    let mut keep = vec![false; pool.base as usize];
    for f in &p.fds {
        let src = pool.file_fd(f.file).with_context(|| ctx(&format!("fd {}: file {} not in the image", f.fd, f.file)))?;
        nix::unistd::dup2(src, f.fd).with_context(|| ctx(&format!("dup2 onto fd {}", f.fd)))?;
        let fl = if f.cloexec { nix::fcntl::FdFlag::FD_CLOEXEC } else { nix::fcntl::FdFlag::empty() };
        nix::fcntl::fcntl(f.fd, nix::fcntl::FcntlArg::F_SETFD(fl)).with_context(|| ctx(&format!("fd {} flags", f.fd)))?;
        if (f.fd as usize) < keep.len() {
            keep[f.fd as usize] = true;
        }
    }
    for (fd, k) in keep.iter().enumerate() {
        if !k {
            let _ = nix::unistd::close(fd as RawFd);
        }
    }
    crate::kinds::after_fd_table(&p.fds, &plan.files).with_context(|| ctx("descriptor state"))?;
    // Limits after the fd table: a lowered RLIMIT_NOFILE below a
    // descriptor the process holds would make dup2 onto it fail.
    for r in &p.rlimits {
        let lim = libc::rlimit64 { rlim_cur: r.soft, rlim_max: r.hard };
        crate::sys::process::prlimit_self(r.resource, &lim)
            .with_context(|| ctx(&format!("setrlimit {} to {}/{}", r.resource, r.soft, r.hard)))?;
    }
    Ok(())
}

/// How many live processes the tree under `pid` (included) has: the ready
/// records to wait for once it is forked.
pub fn live_in_tree(plan: &Plan, pid: i32) -> usize {
    // Iterative, each pid once: a damaged image may hold a cycle.
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![pid];
    let mut n = 0;
    while let Some(q) = todo.pop() {
        let Some(p) = plan.procs.get(&q).filter(|_| seen.insert(q)) else { continue };
        n += usize::from(matches!(p.state, ProcState::Alive));
        todo.extend(&p.children);
    }
    n
}

/// The init of a new pid namespace (`--pidns`): a private mount namespace
/// with its own /proc (so restored programs see their own PIDs there too),
/// the roots as its children, then it reaps until the namespace is empty
/// and exits with the first root's status.
pub fn ns_init(plan: &Plan, pool: &Pool) -> ! {
    let fail = |e: anyhow::Error| -> ! {
        report(pool.ready_w, &encode(plan.roots[0], 1, &format!("{e:#}")));
        crate::sys::process::exit_now(1)
    };
    if let Err(e) = private_proc() {
        fail(e.context("setting up /proc for the new pid namespace"));
    }
    let mut roots = Vec::new();
    for &r in &plan.roots {
        match spawn(plan, pool, r) {
            Ok(p) => roots.push(p),
            Err(e) => fail(e),
        }
    }
    super::unpin(0);
    // Hold none of the restored tree's descriptors (a pipe end held here
    // would keep its reader from ever seeing end-of-file).
    crate::sys::process::close_from(pool.base);
    // Nor snap's stdio: whoever reads snap's output must see it end.
    if let Ok(null) = nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty()) {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(null, fd);
        }
        if null > 2 {
            let _ = nix::unistd::close(null);
        }
    }
    let mut code = 0;
    loop {
        match nix::sys::wait::waitpid(None, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(p, c)) if Some(&p.as_raw()) == roots.first() => code = c,
            Ok(nix::sys::wait::WaitStatus::Signaled(p, s, _)) if Some(&p.as_raw()) == roots.first() => code = 128 + s as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    crate::sys::process::exit_now(code)
}

/// A mount namespace of our own (private, so nothing propagates back to
/// the host) with a /proc of our pid namespace.
pub fn private_proc() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("making / private")?;
    mount(Some("proc"), "/proc", Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None::<&str>)
        .context("mounting /proc")?;
    Ok(())
}
