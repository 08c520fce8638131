//! Small process-attribute wrappers used inside restored processes.

use nix::errno::Errno;
use std::os::fd::RawFd;

fn check(r: libc::c_long) -> nix::Result<libc::c_long> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// setrlimit on ourselves (prlimit64 with pid 0).
pub fn prlimit_self(resource: u32, lim: &libc::rlimit64) -> nix::Result<()> {
    // SAFETY: `lim` is a valid rlimit64 for the duration of the call; the old
    // limit pointer is NULL.
    check(unsafe { libc::syscall(libc::SYS_prlimit64, 0, resource, lim as *const libc::rlimit64, 0usize) })?;
    Ok(())
}

pub fn set_personality(p: u32) -> nix::Result<()> {
    // SAFETY: personality takes a plain integer.
    check(unsafe { libc::syscall(libc::SYS_personality, p as libc::c_ulong) })?;
    Ok(())
}

pub fn set_nice(nice: i32) -> nix::Result<()> {
    // SAFETY: plain integers.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } as libc::c_long)?;
    Ok(())
}

pub fn set_sched(policy: u32, prio: u32) -> nix::Result<()> {
    let param = libc::sched_param { sched_priority: prio as i32 };
    // SAFETY: `param` outlives the call.
    check(unsafe { libc::sched_setscheduler(0, policy as i32, &param) } as libc::c_long)?;
    Ok(())
}

/// write(2) on a raw descriptor the caller knows is open.
pub fn write_raw(fd: RawFd, b: &[u8]) -> nix::Result<usize> {
    // SAFETY: `b` is a valid buffer of b.len() bytes.
    check(unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) } as libc::c_long).map(|n| n as usize)
}

/// Leave now, without running anything of the snap process we were forked from.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no user-space state.
    unsafe { libc::_exit(code) }
}

/// Reset a signal to its default action (used by a process about to die).
pub fn default_signal(sig: i32) {
    // SAFETY: SIG_DFL installs no handler of ours.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// Close every descriptor from `fd` up.
pub fn close_from(fd: RawFd) {
    // SAFETY: close_range takes integers; closing descriptors this process
    // will not use again.
    unsafe { libc::syscall(libc::SYS_close_range, fd as libc::c_uint, libc::c_uint::MAX, 0) };
}

/// This process's disposition of every signal 1..=64 in the kernel's
/// `struct sigaction` layout (handler, flags, restorer, mask), as a forked
/// copy inherits it.
pub fn own_sigactions() -> Vec<[u64; 4]> {
    (1..=64u64)
        .map(|sig| {
            let mut a = [0u64; 4];
            // SAFETY: rt_sigaction with a NULL new action only writes the
            // old one into `a`, which has the kernel's 32-byte layout.
            let r = unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, std::ptr::null::<u8>(), a.as_mut_ptr(), 8) };
            if r < 0 {
                a = [u64::MAX; 4]; // never equal to a saved disposition
            }
            a
        })
        .collect()
}

/// Signals 32 and 33: glibc keeps them for itself (thread cancellation and
/// set*id across threads) and its `posix_spawn` leaves them ignored in the
/// child, a state that survives exec.
pub const LIBC_INTERNAL_SIGNALS: [i32; 2] = [32, 33];

/// Put signal `sig` back to its default action if it is ignored or
/// handled. Raw system calls only: async-signal-safe (usable between fork
/// and exec), and past glibc, which refuses to touch signals 32 and 33.
pub fn default_disposition(sig: i32) -> std::io::Result<()> {
    let mut old = [0u64; 4];
    // SAFETY: rt_sigaction with a NULL new action only writes the old one
    // into `old`, which has the kernel's 32-byte layout.
    if unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, std::ptr::null::<u8>(), old.as_mut_ptr(), 8) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if old[0] == libc::SIG_DFL as u64 {
        return Ok(());
    }
    let dfl = [libc::SIG_DFL as u64, 0, 0, 0];
    // SAFETY: `dfl` is a kernel `struct sigaction` (handler SIG_DFL, no
    // flags, no restorer, empty mask) that outlives the call.
    if unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, dfl.as_ptr(), std::ptr::null_mut::<u8>(), 8) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The signal state a freshly started program expects: every signal at its
/// default action (1..=64 but SIGKILL and SIGSTOP, which cannot change) and
/// none blocked. A forked copy of a supervisor inherits the supervisor's
/// blocked mask (its signalfd's signals) and ignored signals, and both
/// survive exec. Async-signal-safe: for the step between fork and exec.
pub fn reset_signals() -> std::io::Result<()> {
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            default_disposition(sig)?;
        }
    }
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask reads one 8-byte mask from `empty`, which
    // outlives the call; the old mask is not asked for.
    if unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &empty as *const u64, std::ptr::null_mut::<u64>(), 8) }
        < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make the child of `cmd` call `reset_signals` between fork and exec.
pub fn reset_signals_at_exec(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: reset_signals makes only async-signal-safe system calls.
    unsafe { cmd.pre_exec(reset_signals) }
}

/// process_vm_writev(pid, local, remote, 0): copy the bytes the `local`
/// iovecs describe to the addresses of `remote` in process `pid` (another
/// process: EINVAL for this one). Returns the bytes written, which may be
/// fewer than asked (then the caller resumes after them).
pub fn vm_writev(pid: i32, local: &[libc::iovec], remote: &[libc::iovec]) -> std::io::Result<usize> {
    if pid == std::process::id() as i32 {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the kernel only reads the local iovecs' memory (a bad address
    // gives EFAULT, not a write here) and writes only in the address space
    // of `pid`, which is not ours; both arrays are alive for the call.
    let n = unsafe { libc::process_vm_writev(pid, local.as_ptr(), local.len() as _, remote.as_ptr(), remote.len() as _, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// How `spawn_in_cgroup` prepares the child before exec.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpawnOpts {
    /// `setsid` (a detached group's program is a session of its own, like
    /// a daemon).
    pub new_session: bool,
    /// `reset_signals`: nothing blocked, every signal at its default
    /// action, whatever the caller blocked or ignored.
    pub default_signals: bool,
    /// A descriptor of the caller's (close-on-exec there) that the program
    /// keeps open across exec.
    pub keep_fd: Option<RawFd>,
}

/// Start `cmd` with its process moved into the cgroup whose `cgroup.procs`
/// is open (for writing) as `procs` before it execs, so that the program and
/// everything it starts belong to the cgroup from their first instruction
/// (moving it after `spawn` returns would race with its first fork). See
/// `SpawnOpts` for the rest.
pub fn spawn_in_cgroup(
    cmd: &mut std::process::Command,
    procs: std::os::fd::BorrowedFd<'_>,
    opts: SpawnOpts,
) -> std::io::Result<std::process::Child> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (rt_sigaction, rt_sigprocmask,
    // setsid, fcntl, write) on integers, stack buffers and a static buffer;
    // `fd` stays open until exec (close-on-exec closes it there) because the
    // parent keeps `procs` borrowed across `spawn`, and `keep_fd` is the
    // caller's to keep open until `spawn` returns.
    unsafe {
        cmd.pre_exec(move || {
            if opts.default_signals {
                reset_signals()?;
            }
            if opts.new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(k) = opts.keep_fd {
                if libc::fcntl(k, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // "0" names the writing process itself.
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Run `f`, which forks once, with this thread's children going into a new
/// pid namespace: the process `f` forks is that namespace's init (pid 1).
/// Children forked afterwards go into this thread's own namespace again.
/// Only this thread is affected (other threads of a supervisor go on
/// forking into their own namespace).
pub fn in_new_pidns<T>(f: impl FnOnce() -> T) -> anyhow::Result<T> {
    use anyhow::Context;
    let own = std::fs::File::open("/proc/thread-self/ns/pid").context("opening /proc/thread-self/ns/pid")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).context("unshare(CLONE_NEWPID)")?;
    let r = f();
    // Back to our own namespace for children (allowed: it is the active one).
    nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWPID)
        .context("setns back to our own pid namespace for later children")?;
    Ok(r)
}

/// kill(2) with any signal number, real-time ones included (nix's `Signal`
/// has no names for those).
pub fn kill_raw(pid: i32, sig: i32) -> nix::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, sig) } as libc::c_long)?;
    Ok(())
}

/// Wait for one of the signals of `set` (which the caller blocks), at most
/// `timeout` (`None`: as long as it takes). `Ok(None)` on timeout or when
/// interrupted (a ptrace stop, a signal outside `set`).
pub fn sigtimedwait(set: &nix::sys::signal::SigSet, timeout: Option<std::time::Duration>) -> nix::Result<Option<libc::siginfo_t>> {
    let ts = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as libc::c_long });
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `set`, `info` and `ts` outlive the call; the kernel writes
    // only `info`.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), &mut info, tsp) };
    if r >= 0 {
        return Ok(Some(info));
    }
    match Errno::last() {
        Errno::EAGAIN | Errno::EINTR => Ok(None),
        e => Err(e),
    }
}
