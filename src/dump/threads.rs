//! Per-thread state read from outside with ptrace: registers (adjusted so an
//! interrupted system call is re-issued), XSAVE area, signal mask, pending
//! signals, robust futex list, rseq registration and name.

use crate::images::records::{to_hex, Rseq, SigInfo, ThreadImage};
use crate::sys::ptrace as pt;
use crate::types::{Pid, Tid};
use anyhow::{Context, Result};

pub const ERESTARTSYS: i64 = -512;
pub const ERESTARTNOINTR: i64 = -513;
pub const ERESTARTNOHAND: i64 = -514;
pub const ERESTART_RESTARTBLOCK: i64 = -516;
const EINTR: i64 = -4;

/// `user_regs_struct` as the 27 words of the image, in kernel order.
pub fn regs_to_words(r: &libc::user_regs_struct) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx, r.rsi,
        r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds, r.es, r.fs, r.gs,
    ]
}

pub fn words_to_regs(w: &[u64]) -> Result<libc::user_regs_struct> {
    anyhow::ensure!(w.len() == 27, "register set has {} words, expected 27", w.len());
    Ok(libc::user_regs_struct {
        r15: w[0], r14: w[1], r13: w[2], r12: w[3], rbp: w[4], rbx: w[5], r11: w[6], r10: w[7],
        r9: w[8], r8: w[9], rax: w[10], rcx: w[11], rdx: w[12], rsi: w[13], rdi: w[14], orig_rax: w[15],
        rip: w[16], cs: w[17], eflags: w[18], rsp: w[19], ss: w[20], fs_base: w[21], gs_base: w[22],
        ds: w[23], es: w[24], fs: w[25], gs: w[26],
    })
}

/// What the kernel would do on return to user space for a thread stopped
/// inside a system call, done now so the saved registers re-issue the call.
/// `rem` reads the `struct timespec` a sleeping call left its remaining time in.
///
/// - ERESTARTSYS / ERESTARTNOINTR / ERESTARTNOHAND: rewind `rip` over the
///   2-byte `syscall` and put the call number back in `rax`.
/// - ERESTART_RESTARTBLOCK: the kernel's restart block does not survive a
///   restore. `nanosleep` and relative `clock_nanosleep` with a `rem`
///   pointer are re-issued with the remaining time (the kernel wrote it
///   there), absolute `clock_nanosleep`, `poll` and `futex` as they were
///   (a relative timeout starts again: a late wake-up); any other call returns
///   `-EINTR`, which callers of such calls must handle anyway.
/// `for_restore` false gives the adjustment for resuming in place, where the
/// restart block is intact: `restart_syscall` is re-issued.
pub fn adjust_restart(r: &mut libc::user_regs_struct, for_restore: bool) {
    if (r.orig_rax as i64) < 0 {
        return;
    }
    let ax = r.rax as i64;
    match ax {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK if !for_restore => {
            r.rax = libc::SYS_restart_syscall as u64;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => {
            let nr = r.orig_rax as i64;
            if nr == libc::SYS_nanosleep && r.rsi != 0 {
                // nanosleep(req, rem): sleep for what is left.
                r.rdi = r.rsi;
                r.rax = r.orig_rax;
                r.rip -= 2;
            } else if nr == libc::SYS_clock_nanosleep && (r.rsi & libc::TIMER_ABSTIME as u64) != 0 {
                r.rax = r.orig_rax;
                r.rip -= 2;
            } else if nr == libc::SYS_clock_nanosleep && r.r10 != 0 {
                // clock_nanosleep(clk, 0, req, rem)
                r.rdx = r.r10;
                r.rax = r.orig_rax;
                r.rip -= 2;
            } else if nr == libc::SYS_poll || nr == libc::SYS_futex {
                // Their arguments are intact in the registers; the timeout
                // starts again, which both calls allow (a late wake-up).
                r.rax = r.orig_rax;
                r.rip -= 2;
            } else {
                r.rax = EINTR as u64;
            }
        }
        _ => {}
    }
    r.orig_rax = u64::MAX;
}

fn siginfos(v: Vec<[u8; 128]>) -> Vec<SigInfo> {
    v.into_iter()
        .map(|b| SigInfo { signo: i32::from_ne_bytes([b[0], b[1], b[2], b[3]]), raw_hex: to_hex(&b) })
        .collect()
}

/// Process-directed pending signals (read through any thread).
pub fn shared_pending(tid: Tid) -> Result<Vec<SigInfo>> {
    Ok(siginfos(pt::peek_siginfo(tid, true).with_context(|| format!("{tid}: PTRACE_PEEKSIGINFO shared"))?))
}

/// Everything of one thread that ptrace can read; sigaltstack and
/// clear-child-tid come from the parasite and are filled in by the caller.
pub fn dump_thread(pid: Pid, tid: Tid) -> Result<ThreadImage> {
    let ctx = || format!("{pid} {tid}");
    let mut regs = pt::get_regs(tid).with_context(ctx)?;
    adjust_restart(&mut regs, true);
    let xsave = pt::get_xstate(tid).with_context(ctx)?;
    let sigmask = pt::get_sigmask(tid).with_context(ctx)?;
    let pending = siginfos(pt::peek_siginfo(tid, false).with_context(ctx)?);
    let (robust_list, robust_list_len) = pt::get_robust_list(tid).with_context(ctx)?;
    let rseq = pt::rseq_config(tid).with_context(ctx)?;
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{}/comm", pid.0, tid.0))
        .with_context(|| format!("{pid} {tid}: reading comm"))?
        .trim_end_matches('\n')
        .to_string();
    Ok(ThreadImage {
        tid: tid.0,
        comm,
        regs: regs_to_words(&regs),
        xsave_hex: to_hex(&xsave),
        sigmask,
        pending,
        robust_list,
        robust_list_len,
        rseq: rseq.map(|r: Rseq| r),
        sigaltstack: Default::default(),
        clear_child_tid: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn regs() -> libc::user_regs_struct {
        words_to_regs(&[0; 27]).unwrap()
    }
    #[test]
    fn restart_rewinds() {
        let mut r = regs();
        r.orig_rax = 0; // read
        r.rax = ERESTARTSYS as u64;
        r.rip = 0x1002;
        adjust_restart(&mut r, true);
        assert_eq!((r.rax, r.rip, r.orig_rax), (0, 0x1000, u64::MAX));
    }
    #[test]
    fn nanosleep_reissued_with_remaining() {
        let mut r = regs();
        r.orig_rax = libc::SYS_nanosleep as u64;
        r.rax = ERESTART_RESTARTBLOCK as u64;
        r.rdi = 0x10;
        r.rsi = 0x20;
        r.rip = 0x1002;
        adjust_restart(&mut r, true);
        assert_eq!((r.rax, r.rdi, r.rip), (libc::SYS_nanosleep as u64, 0x20, 0x1000));
    }
    #[test]
    fn other_restartblock_gets_eintr() {
        let mut r = regs();
        r.orig_rax = libc::SYS_ppoll as u64;
        r.rax = ERESTART_RESTARTBLOCK as u64;
        r.rip = 0x1002;
        adjust_restart(&mut r, true);
        assert_eq!((r.rax as i64, r.rip), (EINTR, 0x1002));
    }
    #[test]
    fn not_in_syscall_untouched() {
        let mut r = regs();
        r.orig_rax = u64::MAX;
        r.rax = 5;
        r.rip = 0x1002;
        adjust_restart(&mut r, true);
        assert_eq!((r.rax, r.rip), (5, 0x1002));
    }
}
