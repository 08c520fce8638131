//! Remote system calls and memory access for a ptrace-stopped thread.
//!
//! A remote system call puts the syscall number and arguments in the
//! thread's registers, points `rip` at a `syscall` instruction that already
//! exists in the target (in its vDSO, which we never modify) and steps the
//! thread with `PTRACE_SYSCALL` to the syscall-entry and -exit stops.
//! `orig_rax = -1` keeps the kernel's syscall-restart logic away from the
//! injected registers when the thread was interrupted inside a system call.
//!
//! The threads must have been seized with [`crate::sys::ptrace::seize`]
//! (it sets `PTRACE_O_TRACESYSGOOD`, which tells syscall stops apart).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};

use crate::sys::ptrace::{self, Stop};
use crate::types::{Pid, RemoteAddr, Tid};

const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
const SYSCALL_INFO_ENTRY: u8 = 1;
const SYSCALL_INFO_EXIT: u8 = 2;

/// An address of the bytes `0f 05` (`syscall`) in the target's vDSO.
pub fn find_syscall_insn(pid: Pid) -> Result<RemoteAddr> {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", pid.0))
        .with_context(|| format!("{pid}: reading /proc/{}/maps", pid.0))?;
    for line in maps.lines() {
        if !line.ends_with("[vdso]") {
            continue;
        }
        let range = line.split_whitespace().next().unwrap_or("");
        let (a, b) = range.split_once('-').unwrap_or(("", ""));
        let start = u64::from_str_radix(a, 16)
            .with_context(|| format!("{pid}: bad [vdso] line in maps: {line}"))?;
        let end = u64::from_str_radix(b, 16)
            .with_context(|| format!("{pid}: bad [vdso] line in maps: {line}"))?;
        let mut buf = vec![0u8; (end - start) as usize];
        read_mem(pid, RemoteAddr(start), &mut buf)?;
        if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(RemoteAddr(start + i as u64));
        }
        bail!("{pid}: no syscall instruction (0f 05) in its [vdso] at {start:#x}-{end:#x}");
    }
    bail!("{pid} has no [vdso] mapping to find a syscall instruction in")
}

fn open_mem(pid: Pid, write: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(format!("/proc/{}/mem", pid.0))
        .with_context(|| format!("{pid}: opening /proc/{}/mem", pid.0))
}

/// Read `buf.len()` bytes at `addr` through /proc/PID/mem (works on pages
/// the target cannot read itself).
pub fn read_mem(pid: Pid, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
    open_mem(pid, false)?
        .read_exact_at(buf, addr.0)
        .with_context(|| format!("{pid}: reading {} bytes at {addr}", buf.len()))
}

/// Write `data` at `addr` through /proc/PID/mem (works on read-only pages).
pub fn write_mem(pid: Pid, addr: RemoteAddr, data: &[u8]) -> Result<()> {
    open_mem(pid, true)?
        .write_all_at(data, addr.0)
        .with_context(|| format!("{pid}: writing {} bytes at {addr}", data.len()))
}

/// Remote iovecs per `process_vm_readv` (the kernel's UIO_MAXIOV).
const READV_IOVS: usize = 1024;

/// Append the page-aligned `ranges` of `pid` (readable by it) to `out`, in
/// order, with `process_vm_readv`: one system call per 1024 ranges,
/// straight into `out`'s spare capacity. For many small ranges (the pages
/// written since the last dump) this costs far less than the parasite's
/// pipe, which needs a round trip between the target and snap per
/// pipe-full.
pub fn read_ranges_into(pid: Pid, ranges: &[(u64, usize)], out: &mut Vec<u8>) -> Result<()> {
    for batch in ranges.chunks(READV_IOVS) {
        let total: usize = batch.iter().map(|r| r.1).sum();
        let remote: Vec<libc::iovec> =
            batch.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l }).collect();
        out.reserve(total);
        let dst = out.spare_capacity_mut();
        let local = libc::iovec { iov_base: dst.as_mut_ptr() as *mut libc::c_void, iov_len: total };
        // SAFETY: the local iovec covers `total` bytes of `out`'s spare
        // capacity (reserved above); the remote ones are only interpreted by
        // the kernel in the target's address space.
        let n = unsafe { libc::process_vm_readv(pid.0, &local, 1, remote.as_ptr(), remote.len() as libc::c_ulong, 0) };
        if n < 0 || n as usize != total {
            let e = io::Error::last_os_error();
            // A short read stops at the first range it could not read.
            let mut at = n.max(0) as usize;
            let bad = batch.iter().find(|r| if at < r.1 { true } else { at -= r.1; false }).copied().unwrap_or(batch[0]);
            let why = if n < 0 { e.to_string() } else { format!("read {n} of {total} bytes") };
            bail!("{pid}: process_vm_readv of {:#x}-{:#x}: {why}", bad.0, bad.0 + bad.1 as u64);
        }
        // SAFETY: the kernel wrote all `total` bytes after the old length.
        unsafe { out.set_len(out.len() + total) };
    }
    Ok(())
}

/// [`read_ranges_into`] through a bounded buffer: each piece (at most
/// 1 MiB) goes to `f(address, bytes)` in order.
pub fn read_ranges(pid: Pid, ranges: &[(u64, usize)], buf: &mut Vec<u8>, f: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
    const PIECE: usize = 1 << 20;
    let mut pieces: Vec<(u64, usize)> = Vec::new();
    for &(a, l) in ranges {
        let mut done = 0;
        while done < l {
            let take = (l - done).min(PIECE);
            pieces.push((a + done as u64, take));
            done += take;
        }
    }
    let mut i = 0;
    while i < pieces.len() {
        // As many pieces as fit in one buffer-full.
        let (mut j, mut bytes) = (i, 0);
        while j < pieces.len() && j - i < READV_IOVS && bytes + pieces[j].1 <= PIECE {
            bytes += pieces[j].1;
            j += 1;
        }
        buf.clear();
        read_ranges_into(pid, &pieces[i..j], buf)?;
        let mut off = 0;
        for &(a, l) in &pieces[i..j] {
            f(a, &buf[off..off + l])?;
            off += l;
        }
        i = j;
    }
    Ok(())
}

/// Bulk writes with `process_vm_writev` (the target pages must be writable).
pub fn write_mem_iov(pid: Pid, parts: &[(RemoteAddr, &[u8])]) -> Result<()> {
    for chunk in parts.chunks(512) {
        for &(addr, data) in chunk {
            let mut done = 0usize;
            while done < data.len() {
                let local = libc::iovec {
                    iov_base: data[done..].as_ptr() as *mut libc::c_void,
                    iov_len: data.len() - done,
                };
                let remote = libc::iovec {
                    iov_base: (addr.0 + done as u64) as *mut libc::c_void,
                    iov_len: data.len() - done,
                };
                // SAFETY: one local iovec over a live slice; the remote one
                // is only interpreted by the kernel in the target.
                let n = unsafe { libc::process_vm_writev(pid.0, &local, 1, &remote, 1, 0) };
                if n <= 0 {
                    let e = io::Error::last_os_error();
                    return Err(e).with_context(|| {
                        format!("{pid}: process_vm_writev {} bytes at {:#x}", data.len() - done, addr.0 + done as u64)
                    });
                }
                done += n as usize;
            }
        }
    }
    Ok(())
}

fn syscall_info_op(tid: Tid) -> Result<u8> {
    let mut info = [0u8; 96];
    // SAFETY: the kernel writes at most `info.len()` bytes into `info`.
    let r = unsafe {
        libc::ptrace(PTRACE_GET_SYSCALL_INFO, tid.0, info.len(), info.as_mut_ptr())
    };
    if r < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("PTRACE_GET_SYSCALL_INFO {tid}"));
    }
    Ok(info[0])
}

fn tgid_of(tid: Tid) -> Result<i32> {
    let s = std::fs::read_to_string(format!("/proc/{}/status", tid.0))
        .with_context(|| format!("{tid}: reading /proc/{}/status", tid.0))?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("{tid}: no Tgid in /proc/{}/status", tid.0))
}

/// Signals that arrived while we were driving a thread: suppressed then,
/// sent again with `tgkill` once the thread has its registers back.
pub(crate) fn requeue(tid: Tid, sigs: &[i32]) -> Result<()> {
    if sigs.is_empty() {
        return Ok(());
    }
    let tgid = tgid_of(tid)?;
    for &s in sigs {
        ptrace::tgkill(tgid, tid, s)?;
    }
    Ok(())
}

/// Does this register set stand for a system call the kernel will restart
/// (rewind `rip`) when the thread next passes through its signal path?
pub fn needs_restart(r: &libc::user_regs_struct) -> bool {
    (r.orig_rax as i64) >= 0 && matches!(r.rax as i64, -512 | -513 | -514 | -516)
}

/// After putting back registers of a thread that was interrupted inside a
/// restartable system call while it sits in a syscall-exit stop, make it
/// pass through `get_signal()` again: there the kernel's restart logic sees
/// the registers and the thread stops in a `PTRACE_EVENT_STOP`, as after
/// the original PTRACE_INTERRUPT. From a syscall-exit stop the kernel would
/// otherwise return `-ERESTARTSYS` to user space.
///
/// Restore can use [`park`] after setting a thread's final registers in a
/// syscall-exit stop when [`needs_restart`] says so.
pub fn park(tid: Tid) -> Result<()> {
    let mut stash = Vec::new();
    repark(tid, &mut stash)?;
    requeue(tid, &stash)
}

pub(crate) fn repark(tid: Tid, stash: &mut Vec<i32>) -> Result<()> {
    ptrace::interrupt(tid)?;
    ptrace::cont(tid, 0)?;
    loop {
        let st = ptrace::wait_stop(tid)?;
        if st.is_event_stop() {
            return Ok(());
        }
        if st.is_signal() {
            stash.push(st.sig());
        }
        ptrace::cont(tid, 0)?;
    }
}

/// Drive `tid` from whatever stop it is in to the exit of the injected
/// system call. Returns the result (rax) and leaves it in the exit stop.
fn run_injected(tid: Tid, stash: &mut Vec<i32>) -> Result<i64> {
    ptrace::syscall(tid, 0)?;
    let mut entered = false;
    loop {
        let st: Stop = ptrace::wait_stop(tid)?;
        if st.is_syscall() {
            match syscall_info_op(tid)? {
                SYSCALL_INFO_ENTRY => entered = true,
                SYSCALL_INFO_EXIT if entered => {
                    let regs = ptrace::get_regs(tid)?;
                    return Ok(regs.rax as i64);
                }
                _ => {}
            }
        } else if st.is_event_stop() {
            // A group-stop or a stray PTRACE_INTERRUPT: just go on.
        } else if st.is_signal() {
            let sig = st.sig();
            if sig == libc::SIGTRAP {
                let si = ptrace::get_siginfo(tid)?;
                let code = i32::from_ne_bytes([si[8], si[9], si[10], si[11]]);
                if code == libc::SIGTRAP {
                    bail!("{tid} was not seized with PTRACE_O_TRACESYSGOOD (use sys::ptrace::seize)");
                }
            }
            if matches!(sig, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE) {
                // A fault of the injected code itself would repeat forever.
                let si = ptrace::get_siginfo(tid)?;
                let addr = u64::from_ne_bytes(si[16..24].try_into().expect("8 bytes"));
                let rip = ptrace::get_regs(tid).map(|r| r.rip).unwrap_or(0);
                bail!("{tid}: signal {sig} (fault address {addr:#x}, rip {rip:#x}) during a remote system call");
            }
            // Suppress now, send again once the thread is ours no more.
            stash.push(sig);
        } else {
            bail!("{tid}: unexpected stop {:#x} during a remote system call", st.0);
        }
        ptrace::syscall(tid, 0)?;
    }
}

fn injected_regs(saved: &libc::user_regs_struct, at: RemoteAddr, nr: i64, args: [u64; 6]) -> libc::user_regs_struct {
    let mut r = *saved;
    r.rip = at.0;
    r.rax = nr as u64;
    r.orig_rax = u64::MAX; // -1: no syscall restart on the injected registers
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = args[4];
    r.r9 = args[5];
    r
}

/// Run system call `nr` in the stopped thread `tid` using the `syscall`
/// instruction at `at`; put back every register afterwards. Returns the raw
/// result (negative errno on failure).
pub fn syscall_in(tid: Tid, at: RemoteAddr, nr: i64, args: [u64; 6]) -> Result<i64> {
    let saved = ptrace::get_regs(tid)?;
    let mut stash = Vec::new();
    let res = (|| {
        ptrace::set_regs(tid, &injected_regs(&saved, at, nr, args))?;
        run_injected(tid, &mut stash)
    })();
    // Put the registers back whatever happened (unless the thread is gone).
    let back = ptrace::set_regs(tid, &saved).and_then(|_| {
        if needs_restart(&saved) {
            repark(tid, &mut stash)?;
        }
        requeue(tid, &stash)
    });
    let r = res.with_context(|| format!("remote syscall {nr} in {tid} at {at}"))?;
    back.with_context(|| format!("{tid}: putting back registers after remote syscall {nr}"))?;
    Ok(r)
}

/// As [`syscall_in`] but leaves the thread in the syscall-exit stop with the
/// registers the system call left (restore uses it for its last munmap and
/// then sets the final registers itself).
pub fn syscall_in_keep(tid: Tid, at: RemoteAddr, nr: i64, args: [u64; 6]) -> Result<i64> {
    let saved = ptrace::get_regs(tid)?;
    let mut stash = Vec::new();
    ptrace::set_regs(tid, &injected_regs(&saved, at, nr, args))?;
    let r = run_injected(tid, &mut stash).with_context(|| format!("remote syscall {nr} in {tid} at {at}"))?;
    requeue(tid, &stash)?;
    Ok(r)
}
