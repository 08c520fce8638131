//! ptrace wrappers used by dump, restore and the parasite.
//!
//! Every function takes the thread it acts on and names it in its errors.
//! The raw `errno` stays reachable through `std::io::Error` in the chain.

use std::io;

use anyhow::{bail, Context, Result};

use crate::images::records::Rseq;
use crate::types::Tid;

pub const PTRACE_GETREGSET: libc::c_uint = 0x4204;
pub const PTRACE_SETREGSET: libc::c_uint = 0x4205;
pub const PTRACE_SEIZE: libc::c_uint = 0x4206;
pub const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
pub const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
pub const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
pub const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
pub const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
pub const NT_PRSTATUS: usize = 1;
pub const NT_X86_XSTATE: usize = 0x202;
pub const PTRACE_EVENT_STOP: i32 = 128;

/// Raw ptrace request; returns the kernel's return value or the errno.
fn raw(req: libc::c_uint, tid: Tid, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: ptrace with integer/pointer arguments; every pointer passed by
    // the callers below points to a live buffer of the size the request needs.
    let r = unsafe { libc::ptrace(req, tid.0 as libc::pid_t, addr, data) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(0) {
            return Err(e);
        }
    }
    Ok(r)
}

/// `PTRACE_SEIZE` with `PTRACE_O_TRACESYSGOOD` (remote syscalls rely on it
/// to tell syscall stops from SIGTRAPs).
pub fn seize(tid: Tid) -> Result<()> {
    raw(PTRACE_SEIZE, tid, 0, libc::PTRACE_O_TRACESYSGOOD as usize)
        .with_context(|| format!("PTRACE_SEIZE {tid}"))?;
    Ok(())
}

pub fn interrupt(tid: Tid) -> Result<()> {
    raw(PTRACE_INTERRUPT, tid, 0, 0).with_context(|| format!("PTRACE_INTERRUPT {tid}"))?;
    Ok(())
}

pub fn detach(tid: Tid) -> Result<()> {
    raw(libc::PTRACE_DETACH, tid, 0, 0).with_context(|| format!("PTRACE_DETACH {tid}"))?;
    Ok(())
}

/// `PTRACE_CONT`, delivering `sig` (0 for none).
pub fn cont(tid: Tid, sig: i32) -> Result<()> {
    raw(libc::PTRACE_CONT, tid, 0, sig as usize)
        .with_context(|| format!("PTRACE_CONT {tid} signal {sig}"))?;
    Ok(())
}

/// `PTRACE_SYSCALL`, delivering `sig` (0 for none).
pub fn syscall(tid: Tid, sig: i32) -> Result<()> {
    raw(libc::PTRACE_SYSCALL, tid, 0, sig as usize)
        .with_context(|| format!("PTRACE_SYSCALL {tid} signal {sig}"))?;
    Ok(())
}

/// A ptrace stop as reported by `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop(pub i32);

impl Stop {
    /// WSTOPSIG (with the 0x80 bit of a syscall stop).
    pub fn sig(self) -> i32 {
        (self.0 >> 8) & 0xff
    }
    /// The PTRACE_EVENT_* number (0 if none).
    pub fn event(self) -> i32 {
        (self.0 >> 16) & 0xffff
    }
    /// A syscall-enter or -exit stop (needs PTRACE_O_TRACESYSGOOD).
    pub fn is_syscall(self) -> bool {
        self.event() == 0 && self.sig() == (libc::SIGTRAP | 0x80)
    }
    /// `PTRACE_EVENT_STOP`: after PTRACE_INTERRUPT, or a group-stop
    /// (then `sig()` is the stopping signal).
    pub fn is_event_stop(self) -> bool {
        self.event() == PTRACE_EVENT_STOP
    }
    /// A signal-delivery-stop for a signal other than a syscall stop.
    pub fn is_signal(self) -> bool {
        self.event() == 0 && self.sig() & 0x80 == 0
    }
}

/// Wait for the next stop of `tid` (`__WALL`). Fails if it exited.
pub fn wait_stop(tid: Tid) -> Result<Stop> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid writes only to `status`, a live local.
        let r = unsafe { libc::waitpid(tid.0, &mut status, libc::__WALL) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e).with_context(|| format!("waitpid {tid}"));
        }
        break;
    }
    if libc::WIFEXITED(status) {
        bail!("{tid} exited with status {} while traced", libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        bail!("{tid} was killed by signal {} while traced", libc::WTERMSIG(status));
    }
    if !libc::WIFSTOPPED(status) {
        bail!("{tid}: unexpected wait status {status:#x}");
    }
    Ok(Stop(status))
}

/// Non-blocking variant: `None` if the thread has not stopped yet.
pub fn try_wait_stop(tid: Tid) -> Result<Option<Stop>> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes only to `status`, a live local.
    let r = unsafe { libc::waitpid(tid.0, &mut status, libc::__WALL | libc::WNOHANG) };
    if r == -1 {
        return Err(io::Error::last_os_error()).with_context(|| format!("waitpid {tid}"));
    }
    if r == 0 {
        return Ok(None);
    }
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        bail!("{tid} exited or was killed (status {status:#x}) while traced");
    }
    Ok(Some(Stop(status)))
}

pub fn get_regs(tid: Tid) -> Result<libc::user_regs_struct> {
    // SAFETY: user_regs_struct is plain integers; all-zero is valid.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: &mut regs as *mut _ as *mut libc::c_void,
        iov_len: std::mem::size_of::<libc::user_regs_struct>(),
    };
    raw(PTRACE_GETREGSET, tid, NT_PRSTATUS, &mut iov as *mut _ as usize)
        .with_context(|| format!("PTRACE_GETREGSET NT_PRSTATUS {tid}"))?;
    Ok(regs)
}

pub fn set_regs(tid: Tid, regs: &libc::user_regs_struct) -> Result<()> {
    let mut iov = libc::iovec {
        iov_base: regs as *const _ as *mut libc::c_void,
        iov_len: std::mem::size_of::<libc::user_regs_struct>(),
    };
    raw(PTRACE_SETREGSET, tid, NT_PRSTATUS, &mut iov as *mut _ as usize)
        .with_context(|| format!("PTRACE_SETREGSET NT_PRSTATUS {tid}"))?;
    Ok(())
}

/// Size of the XSAVE area for the features enabled in XCR0 (CPUID 0xD.0 EBX).
pub fn xstate_size() -> usize {
    // CPUID leaf 0xD exists on every x86_64 CPU with XSAVE; no side effects.
    let r = std::arch::x86_64::__cpuid_count(0xd, 0);
    (r.ebx as usize).max(4096)
}

/// The full XSAVE area of `tid` (length as returned by the kernel).
pub fn get_xstate(tid: Tid) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; xstate_size()];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut _, iov_len: buf.len() };
    raw(PTRACE_GETREGSET, tid, NT_X86_XSTATE, &mut iov as *mut _ as usize)
        .with_context(|| format!("PTRACE_GETREGSET NT_X86_XSTATE {tid}"))?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(tid: Tid, xstate: &[u8]) -> Result<()> {
    let mut iov = libc::iovec { iov_base: xstate.as_ptr() as *mut _, iov_len: xstate.len() };
    raw(PTRACE_SETREGSET, tid, NT_X86_XSTATE, &mut iov as *mut _ as usize)
        .with_context(|| format!("PTRACE_SETREGSET NT_X86_XSTATE {tid} ({} bytes)", xstate.len()))?;
    Ok(())
}

pub fn get_sigmask(tid: Tid) -> Result<u64> {
    let mut mask: u64 = 0;
    raw(PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize)
        .with_context(|| format!("PTRACE_GETSIGMASK {tid}"))?;
    Ok(mask)
}

pub fn set_sigmask(tid: Tid, mask: u64) -> Result<()> {
    raw(PTRACE_SETSIGMASK, tid, 8, &mask as *const u64 as usize)
        .with_context(|| format!("PTRACE_SETSIGMASK {tid} {mask:#x}"))?;
    Ok(())
}

/// The raw siginfo of `tid`'s current signal-delivery- or syscall-stop.
pub fn get_siginfo(tid: Tid) -> Result<[u8; 128]> {
    let mut si = [0u8; 128];
    raw(libc::PTRACE_GETSIGINFO, tid, 0, si.as_mut_ptr() as usize)
        .with_context(|| format!("PTRACE_GETSIGINFO {tid}"))?;
    Ok(si)
}

/// Queued signals without dequeuing them: the thread's own queue, or with
/// `shared` the process-wide queue. Each entry is a raw 128-byte siginfo.
pub fn peek_siginfo(tid: Tid, shared: bool) -> Result<Vec<[u8; 128]>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    const BATCH: usize = 32;
    let mut out = Vec::new();
    let mut buf = vec![[0u8; 128]; BATCH];
    loop {
        let args = Args {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        let n = raw(
            PTRACE_PEEKSIGINFO,
            tid,
            &args as *const Args as usize,
            buf.as_mut_ptr() as usize,
        )
        .with_context(|| format!("PTRACE_PEEKSIGINFO {tid} shared={shared}"))? as usize;
        out.extend_from_slice(&buf[..n.min(BATCH)]);
        if n < BATCH {
            return Ok(out);
        }
    }
}

/// The rseq area registered by `tid`, if any.
pub fn rseq_config(tid: Tid) -> Result<Option<Rseq>> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        ptr: u64,
        size: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    raw(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<Conf>(),
        &mut c as *mut Conf as usize,
    )
    .with_context(|| format!("PTRACE_GET_RSEQ_CONFIGURATION {tid}"))?;
    if c.ptr == 0 {
        return Ok(None);
    }
    Ok(Some(Rseq { ptr: c.ptr, len: c.size, sig: c.sig }))
}

/// `get_robust_list(tid)`: (head address, length).
pub fn get_robust_list(tid: Tid) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: the kernel writes one pointer-sized value to each of the two
    // live locals.
    let r = unsafe {
        libc::syscall(libc::SYS_get_robust_list, tid.0, &mut head as *mut u64, &mut len as *mut usize)
    };
    if r != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("get_robust_list {tid}"));
    }
    Ok((head, len as u64))
}

/// `tgkill(pid, tid, sig)`.
pub fn tgkill(pid: i32, tid: Tid, sig: i32) -> Result<()> {
    // SAFETY: plain integer syscall.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid.0, sig) };
    if r != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("tgkill pid {pid} {tid} signal {sig}"));
    }
    Ok(())
}
