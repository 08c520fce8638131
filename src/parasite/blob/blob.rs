//! The parasite blob: a tiny position-independent no_std program that runs
//! inside the dumped process. Built by build.rs as a static-pie ELF; the
//! loader in `src/parasite/blob.rs` maps and relocates it.
//!
//! Protocol (one-shot): the tracer writes an `Args` block, sets
//! rip=_start, rsp=parasite stack, rdi=&Args and PTRACE_CONTs the thread.
//! The blob does one command, stores the result in `Args::ret` and stops
//! on `int3`; the tracer then puts the thread's registers back.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

global_asm!(
    ".globl _start",
    "_start:",
    "and rsp, -16",
    "call {main}",
    "2:",
    "int3",
    "jmp 2b",
    main = sym parasite_main,
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        // SAFETY: stops the thread for the tracer; never returns.
        unsafe { asm!("int3") }
    }
}

/// Must match `src/parasite/mod.rs` (`Args`).
#[repr(C)]
pub struct Args {
    cmd: u64,
    ret: i64,
    a: [u64; 6],
}

const CMD_VMSPLICE: u64 = 1;
const CMD_SENDFDS: u64 = 2;
const CMD_SIGACTIONS: u64 = 3;

const NR_RT_SIGACTION: u64 = 13;
const NR_SENDMSG: u64 = 46;
const NR_VMSPLICE: u64 = 278;
const EINTR: i64 = 4;
const EAGAIN: i64 = 11;

#[inline(always)]
unsafe fn sys4(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    let ret: i64;
    asm!("syscall", inlateout("rax") nr as i64 => ret, in("rdi") a1, in("rsi") a2,
         in("rdx") a3, in("r10") a4, lateout("rcx") _, lateout("r11") _,
         options(nostack));
    ret
}

#[repr(C)]
struct IoVec {
    base: u64,
    len: u64,
}

/// vmsplice every iovec into the pipe, in order, retrying partial writes.
unsafe fn vmsplice_all(fd: u64, iov: *mut IoVec, n: u64) -> i64 {
    let mut i = 0u64;
    let mut total = 0i64;
    while i < n {
        let cur = iov.add(i as usize);
        if (*cur).len == 0 {
            i += 1;
            continue;
        }
        let cnt = core::cmp::min(n - i, 512);
        let r = sys4(NR_VMSPLICE, fd, cur as u64, cnt, 0);
        if r == -EINTR || r == -EAGAIN {
            continue;
        }
        if r < 0 {
            return r;
        }
        total += r;
        let mut left = r as u64;
        while left > 0 && i < n {
            let c = iov.add(i as usize);
            if (*c).len <= left {
                left -= (*c).len;
                (*c).len = 0;
                i += 1;
            } else {
                (*c).base += left;
                (*c).len -= left;
                left = 0;
            }
        }
    }
    total
}

#[repr(C)]
struct MsgHdr {
    name: u64,
    namelen: u32,
    _pad0: u32,
    iov: u64,
    iovlen: u64,
    control: u64,
    controllen: u64,
    flags: i32,
    _pad1: i32,
}

/// sendmsg(SCM_RIGHTS) up to 16 fds with one data byte.
unsafe fn send_fds(sock: u64, fds: *const i32, n: u64) -> i64 {
    if n > 16 {
        return -22;
    }
    // cmsghdr: len u64, level i32, type i32, then data; 16 + 16*4 = 80 bytes.
    let mut cbuf = [0u64; 10];
    let clen = 16 + n * 4;
    let cb = cbuf.as_mut_ptr() as *mut u8;
    *(cb as *mut u64) = clen;
    *(cb.add(8) as *mut i32) = 1; // SOL_SOCKET
    *(cb.add(12) as *mut i32) = 1; // SCM_RIGHTS
    let mut k = 0;
    while k < n as usize {
        *(cb.add(16 + 4 * k) as *mut i32) = *fds.add(k);
        k += 1;
    }
    let mut byte = [0u8; 1];
    let iov = IoVec { base: byte.as_mut_ptr() as u64, len: 1 };
    let msg = MsgHdr {
        name: 0,
        namelen: 0,
        _pad0: 0,
        iov: &iov as *const IoVec as u64,
        iovlen: 1,
        control: cb as u64,
        controllen: (clen + 7) & !7,
        flags: 0,
        _pad1: 0,
    };
    loop {
        let r = sys4(NR_SENDMSG, sock, &msg as *const MsgHdr as u64, 0, 0);
        if r != -EINTR {
            return r;
        }
    }
}

/// rt_sigaction(sig, NULL, &out[sig-1], 8) for 1..=64; out holds 4 u64 each.
unsafe fn sigactions(out: *mut u64) -> i64 {
    let mut sig = 1u64;
    while sig <= 64 {
        let p = out.add(((sig - 1) * 4) as usize);
        let r = sys4(NR_RT_SIGACTION, sig, 0, p as u64, 8);
        if r < 0 {
            *p = 0;
            *p.add(1) = 0;
            *p.add(2) = 0;
            *p.add(3) = 0;
        }
        sig += 1;
    }
    0
}

#[no_mangle]
unsafe extern "C" fn parasite_main(args: *mut Args) {
    let a = &mut *args;
    a.ret = match a.cmd {
        CMD_VMSPLICE => vmsplice_all(a.a[0], a.a[1] as *mut IoVec, a.a[2]),
        CMD_SENDFDS => send_fds(a.a[0], a.a[1] as *const i32, a.a[2]),
        CMD_SIGACTIONS => sigactions(a.a[0] as *mut u64),
        _ => -38,
    };
}

// The compiler may emit calls to these; `rep` string instructions cannot be
// turned back into calls to themselves.
#[no_mangle]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rdi") d => _, inout("rsi") s => _, inout("rcx") n => _,
         options(nostack, preserves_flags));
    d
}

#[no_mangle]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rdi") d => _, inout("rcx") n => _, in("al") c as u8,
         options(nostack, preserves_flags));
    d
}
