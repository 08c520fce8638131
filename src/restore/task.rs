//! Threads, signals, timers, credentials and registers of a restored
//! process, put back with remote system calls and ptrace.

use super::pool::Pool;
use super::remote::Remote;
use crate::dump::threads::words_to_regs;
use crate::images::records::{from_hex, Creds, ProcessImage, SigInfo, ThreadImage};
use crate::sys::ptrace as pt;
use crate::types::Tid;
use anyhow::{bail, Context, Result};

/// Seize a thread of a restored process and bring it to a ptrace stop.
pub fn seize(tid: Tid) -> Result<()> {
    crate::dump::seize::seize_one(tid)?;
    // Block every signal while we drive the thread: a timer armed during
    // restore must not be delivered into half-restored state (it stays
    // pending, with its siginfo, until the saved mask is put back at the
    // very end).
    pt::set_sigmask(tid, u64::MAX).with_context(|| format!("{tid}: blocking signals"))?;
    Ok(())
}

fn host_tids(host: i32) -> Result<Vec<i32>> {
    crate::dump::proc::numeric_entries(&format!("/proc/{host}/task"))
}

/// Create the other threads with their exact TIDs (remote clone3 with
/// set_tid on the leader). Each new thread spins on the control area's
/// `jmp .` until it is seized here.
pub fn create_threads(r: &mut Remote, p: &ProcessImage, pool: &Pool) -> Result<Vec<Tid>> {
    let mut out = vec![r.tid];
    for t in p.threads.iter().skip(1) {
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        let set_tid = pool.scratch() + 512;
        let args: [u64; 11] = [flags, 0, 0, 0, 0, 0, 0, 0, set_tid, 1, 0];
        let bytes: Vec<u8> = args.iter().flat_map(|x| x.to_ne_bytes()).collect();
        r.write(pool.scratch(), &bytes)?;
        r.write(set_tid, &t.tid.to_ne_bytes())?;
        let before = host_tids(r.host)?;
        r.call(libc::SYS_clone3, [pool.scratch(), bytes.len() as u64, 0, 0, 0, 0])
            .with_context(|| format!("pid {}: creating thread {}", p.pid, t.tid))?;
        // clone3 answers in the process's pid namespace; ptrace wants the
        // host's number (they differ under --pidns).
        let fresh: Vec<i32> = host_tids(r.host)?.into_iter().filter(|x| !before.contains(x)).collect();
        let [new] = fresh[..] else {
            bail!("pid {}: expected one new thread after creating {}, found {:?}", p.pid, t.tid, fresh);
        };
        let tid = Tid(new);
        seize(tid).with_context(|| format!("pid {}: seizing new thread {}", p.pid, t.tid))?;
        out.push(tid);
    }
    Ok(out)
}

/// Signal handlers and interval timers (process-wide).
pub fn process_signals(r: &mut Remote, p: &ProcessImage, pool: &Pool) -> Result<()> {
    // The process is a fork of snap: only dispositions that differ from
    // snap's own need a (slow, remote) rt_sigaction.
    let inherited = crate::sys::process::own_sigactions();
    for (i, a) in p.sigactions.iter().enumerate() {
        let sig = i as u64 + 1;
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        if inherited.get(i) == Some(&[a.handler, a.flags, a.restorer, a.mask]) {
            continue;
        }
        let b: Vec<u8> = [a.handler, a.flags, a.restorer, a.mask].iter().flat_map(|x| x.to_ne_bytes()).collect();
        r.write(pool.scratch(), &b)?;
        r.call(libc::SYS_rt_sigaction, [sig, pool.scratch(), 0, 8, 0, 0])
            .with_context(|| format!("pid {}: restoring the handler of signal {sig}", p.pid))?;
    }
    let it = &p.itimers;
    for (which, v) in [(libc::ITIMER_REAL, it.real), (libc::ITIMER_VIRTUAL, it.virt), (libc::ITIMER_PROF, it.prof)] {
        if v.value_us == 0 && v.interval_us == 0 {
            continue;
        }
        // A periodic timer that had just expired reads as value 0 until its
        // signal (saved as pending) is dequeued and re-arms it; setitimer
        // with value 0 would disarm it instead. Arm it one interval out.
        let value = if v.value_us == 0 { v.interval_us } else { v.value_us };
        let w = [v.interval_us / 1_000_000, v.interval_us % 1_000_000, value / 1_000_000, value % 1_000_000];
        let b: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        r.write(pool.scratch(), &b)?;
        r.call(libc::SYS_setitimer, [which as u64, pool.scratch(), 0, 0, 0, 0])
            .with_context(|| format!("pid {}: setitimer {which}", p.pid))?;
    }
    Ok(())
}

/// Per-thread kernel state only the thread can set on itself.
pub fn thread_state(r: &mut Remote, th: &ThreadImage, pool: &Pool) -> Result<()> {
    let who = format!("tid {}", th.tid);
    // Always set, even to nothing: the thread otherwise keeps what snap's
    // copy had registered (Rust's alternate signal stack, glibc's robust
    // list), pointing into memory that is gone.
    r.call(libc::SYS_set_robust_list, [th.robust_list, th.robust_list_len.max(24), 0, 0, 0, 0])
        .with_context(|| format!("{who}: set_robust_list"))?;
    if let Some(rs) = &th.rseq {
        r.call(libc::SYS_rseq, [rs.ptr, rs.len as u64, 0, rs.sig as u64, 0, 0]).with_context(|| format!("{who}: rseq"))?;
    }
    r.call(libc::SYS_set_tid_address, [th.clear_child_tid, 0, 0, 0, 0, 0])
        .with_context(|| format!("{who}: set_tid_address"))?;
    let ss = &th.sigaltstack;
    let (sp, flags, size) = if ss.flags & libc::SS_DISABLE != 0 || ss.size == 0 {
        (0, libc::SS_DISABLE as u64, 0)
    } else {
        (ss.sp, (ss.flags & !libc::SS_ONSTACK) as u64, ss.size)
    };
    let b: Vec<u8> = [sp, flags, size].iter().flat_map(|x| x.to_ne_bytes()).collect();
    r.write(pool.scratch(), &b)?;
    r.call(libc::SYS_sigaltstack, [pool.scratch(), 0, 0, 0, 0, 0]).with_context(|| format!("{who}: sigaltstack"))?;
    let mut name = th.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    r.write(pool.scratch(), &name)?;
    r.call(libc::SYS_prctl, [libc::PR_SET_NAME as u64, pool.scratch(), 0, 0, 0, 0])
        .with_context(|| format!("{who}: setting the name {:?}", th.comm))?;
    Ok(())
}

fn queue(r: &mut Remote, pool: &Pool, tgid: i32, tid: Option<i32>, s: &SigInfo) -> Result<()> {
    let raw = from_hex(&s.raw_hex)?;
    if raw.len() != 128 {
        bail!("siginfo of signal {} has {} bytes, expected 128", s.signo, raw.len());
    }
    r.write(pool.scratch(), &raw)?;
    match tid {
        Some(t) => r.call(libc::SYS_rt_tgsigqueueinfo, [tgid as u64, t as u64, s.signo as u64, pool.scratch(), 0, 0]),
        None => r.call(libc::SYS_rt_sigqueueinfo, [tgid as u64, s.signo as u64, pool.scratch(), 0, 0, 0]),
    }
    .with_context(|| format!("pid {tgid}: queueing pending signal {}", s.signo))?;
    Ok(())
}

/// Pending signals, queued from inside so their siginfo is kept as is.
pub fn pending(r: &mut Remote, p: &ProcessImage, pool: &Pool) -> Result<()> {
    for s in &p.shared_pending {
        queue(r, pool, p.pid, None, s)?;
    }
    for th in &p.threads {
        for s in &th.pending {
            queue(r, pool, p.pid, Some(th.tid), s)?;
        }
    }
    Ok(())
}

/// Credentials of one thread, in the only order that works: bounding set
/// (needs CAP_SETPCAP), groups and gids, uids keeping capabilities, fs ids,
/// then the capability sets themselves and the ambient set.
pub fn creds(r: &mut Remote, c: &Creds, no_new_privs: bool, pool: &Pool) -> Result<()> {
    let last_cap: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last_cap {
        if c.cap_bnd & (1 << cap) == 0 {
            r.call(libc::SYS_prctl, [libc::PR_CAPBSET_DROP as u64, cap, 0, 0, 0, 0])
                .with_context(|| format!("dropping capability {cap} from the bounding set"))?;
        }
    }
    let g: Vec<u8> = c.groups.iter().flat_map(|x| x.to_ne_bytes()).collect();
    r.write(pool.scratch(), &g)?;
    r.call(libc::SYS_setgroups, [c.groups.len() as u64, pool.scratch(), 0, 0, 0, 0]).context("setgroups")?;
    r.call(libc::SYS_setresgid, [c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64, 0, 0, 0]).context("setresgid")?;
    r.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0, 0]).context("PR_SET_KEEPCAPS")?;
    r.call(libc::SYS_setresuid, [c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64, 0, 0, 0]).context("setresuid")?;
    r.call(libc::SYS_setfsgid, [c.gid[3] as u64, 0, 0, 0, 0, 0]).context("setfsgid")?;
    r.call(libc::SYS_setfsuid, [c.uid[3] as u64, 0, 0, 0, 0, 0]).context("setfsuid")?;
    // capset: header {version 3, pid 0}, then two {effective, permitted, inheritable} words.
    let mut b = Vec::new();
    b.extend(0x2008_0522u32.to_ne_bytes());
    b.extend(0i32.to_ne_bytes());
    for half in [0, 32] {
        for v in [c.cap_eff, c.cap_prm, c.cap_inh] {
            b.extend(((v >> half) as u32).to_ne_bytes());
        }
    }
    r.write(pool.scratch(), &b)?;
    r.call(libc::SYS_capset, [pool.scratch(), pool.scratch() + 8, 0, 0, 0, 0]).context("capset")?;
    r.call(libc::SYS_prctl, [libc::PR_SET_KEEPCAPS as u64, 0, 0, 0, 0, 0]).context("PR_SET_KEEPCAPS")?;
    for cap in 0..=last_cap {
        if c.cap_amb & (1 << cap) != 0 {
            r.call(libc::SYS_prctl, [libc::PR_CAP_AMBIENT as u64, libc::PR_CAP_AMBIENT_RAISE as u64, cap, 0, 0, 0])
                .with_context(|| format!("raising ambient capability {cap}"))?;
        }
    }
    if no_new_privs {
        r.call(libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0]).context("PR_SET_NO_NEW_PRIVS")?;
    }
    Ok(())
}

/// The saved signal mask, FPU/vector state and registers: the very last
/// thing before the thread is let go.
pub fn final_regs(tid: Tid, th: &ThreadImage) -> Result<()> {
    pt::set_sigmask(tid, th.sigmask).with_context(|| format!("{tid}: signal mask"))?;
    let xs = from_hex(&th.xsave_hex)?;
    pt::set_xstate(tid, &xs).with_context(|| format!("{tid}: XSAVE area ({} bytes)", xs.len()))?;
    let mut regs = words_to_regs(&th.regs)?;
    regs.orig_rax = u64::MAX;
    pt::set_regs(tid, &regs).with_context(|| format!("{tid}: registers"))?;
    Ok(())
}

const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

/// POSIX timers with their saved ids (PR_TIMER_CREATE_RESTORE_IDS makes
/// timer_create take the id it is given), armed with the time that was left.
/// Threads must exist already: a timer may notify one of them.
pub fn posix_timers(r: &mut Remote, p: &ProcessImage, pool: &Pool) -> Result<()> {
    if p.posix_timers.is_empty() {
        return Ok(());
    }
    r.call(libc::SYS_prctl, [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0])
        .with_context(|| format!("pid {}: PR_TIMER_CREATE_RESTORE_IDS (needs Linux 6.15 or later)", p.pid))?;
    // /proc lists timers newest first: create them oldest first so the
    // process's timer list comes back in the same order.
    for t in p.posix_timers.iter().rev() {
        let mut ev = [0u8; 64];
        ev[0..8].copy_from_slice(&t.sigval.to_ne_bytes());
        ev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
        ev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
        ev[16..20].copy_from_slice(&t.notify_tid.to_ne_bytes());
        r.write(pool.scratch(), &ev)?;
        r.write(pool.scratch() + 64, &t.id.to_ne_bytes())?;
        r.call(libc::SYS_timer_create, [t.clock as u64, pool.scratch(), pool.scratch() + 64, 0, 0, 0])
            .with_context(|| format!("pid {}: creating POSIX timer {} (clock {})", p.pid, t.id, t.clock))?;
    }
    r.call(libc::SYS_prctl, [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0])?;
    for t in p.posix_timers.iter().filter(|t| t.value_ns != 0) {
        let w = [t.interval_ns / 1_000_000_000, t.interval_ns % 1_000_000_000, t.value_ns / 1_000_000_000, t.value_ns % 1_000_000_000];
        let b: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        r.write(pool.scratch(), &b)?;
        r.call(libc::SYS_timer_settime, [t.id as u64, 0, pool.scratch(), 0, 0, 0])
            .with_context(|| format!("pid {}: arming POSIX timer {}", p.pid, t.id))?;
    }
    Ok(())
}

/// pidfds: each holder opens its own, now that every process exists
/// (the placeholder at the descriptor's number is replaced with dup3).
/// Runs while the process is still snap's copy, in the process's pid
/// namespace, so the saved PID is the right one.
pub fn pidfds(r: &mut Remote, p: &ProcessImage, files: &crate::images::records::FilesImage) -> Result<()> {
    use crate::images::records::FileKind;
    for f in &p.fds {
        let Some(of) = files.files.iter().find(|o| o.id == f.file) else { continue };
        let FileKind::Pidfd { pid } = of.kind else { continue };
        let nonblock = if of.flags & libc::O_NONBLOCK as u32 != 0 { libc::O_NONBLOCK as u64 } else { 0 };
        let k = r
            .call(libc::SYS_pidfd_open, [pid as u64, nonblock, 0, 0, 0, 0])
            .with_context(|| format!("pid {} fd {}: pidfd_open({pid})", p.pid, f.fd))?;
        let cloexec = if f.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        r.call(libc::SYS_dup3, [k, f.fd as u64, cloexec, 0, 0, 0])
            .with_context(|| format!("pid {} fd {}: putting the pidfd of {pid} in place", p.pid, f.fd))?;
        r.call(libc::SYS_close, [k, 0, 0, 0, 0, 0])?;
    }
    Ok(())
}
