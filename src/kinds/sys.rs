//! The few system calls the kinds need that neither std nor nix wraps.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use crate::types::{Pid, RemoteFd};

const SYS_KCMP: libc::c_long = 312;
const KCMP_FILE: libc::c_long = 0;

/// Do `fd1` of `pid1` and `fd2` of `pid2` refer to the same open file
/// description? (kcmp(KCMP_FILE); needs ptrace read access to both.)
pub fn same_description(pid1: Pid, fd1: RemoteFd, pid2: Pid, fd2: RemoteFd) -> nix::Result<bool> {
    // SAFETY: kcmp takes only integer arguments; no memory is passed or returned.
    let r = unsafe {
        libc::syscall(
            SYS_KCMP,
            pid1.0 as libc::c_long,
            pid2.0 as libc::c_long,
            KCMP_FILE,
            fd1.0 as libc::c_long,
            fd2.0 as libc::c_long,
        )
    };
    Errno::result(r).map(|r| r == 0)
}

/// Bytes buffered in a pipe or FIFO (ioctl FIONREAD), on either end.
pub fn fionread(fd: BorrowedFd<'_>) -> nix::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points to `n`,
    // alive for the whole call; `fd` is a valid descriptor by construction.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    Errno::result(r).map(|_| n.max(0) as usize)
}

/// The `struct mq_attr` numbers of a POSIX message queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MqAttr {
    /// O_NONBLOCK of the description, or 0.
    pub flags: i64,
    pub maxmsg: i64,
    pub msgsize: i64,
    pub curmsgs: i64,
}

/// mq_open(name, oflag) without O_CREAT, or with O_CREAT and the given
/// mode and attributes (`create`: (mode, maxmsg, msgsize)).
pub fn mq_open(name: &std::ffi::CStr, oflag: i32, create: Option<(u32, i64, i64)>) -> nix::Result<OwnedFd> {
    let r = match create {
        None => {
            // SAFETY: `name` is NUL-terminated and alive for the call; without
            // O_CREAT the variadic mode/attr arguments are not read.
            unsafe { libc::mq_open(name.as_ptr(), oflag & !libc::O_CREAT) }
        }
        Some((mode, maxmsg, msgsize)) => {
            // SAFETY: zeroed mq_attr is a valid value; the fields are set below.
            let mut a: libc::mq_attr = unsafe { std::mem::zeroed() };
            a.mq_maxmsg = maxmsg;
            a.mq_msgsize = msgsize;
            // SAFETY: `name` and `a` are alive for the call; with O_CREAT
            // mq_open reads a mode_t and a pointer to an mq_attr, as passed.
            unsafe { libc::mq_open(name.as_ptr(), oflag | libc::O_CREAT, mode as libc::mode_t, &a as *const libc::mq_attr) }
        }
    };
    // SAFETY: on success mq_open returns a new descriptor (mqd_t is an fd
    // on Linux) that nothing else owns.
    Errno::result(r).map(|r| unsafe { OwnedFd::from_raw_fd(r) })
}

pub fn mq_unlink(name: &std::ffi::CStr) -> nix::Result<()> {
    // SAFETY: `name` is NUL-terminated and alive for the call.
    Errno::result(unsafe { libc::mq_unlink(name.as_ptr()) }).map(drop)
}

pub fn mq_getattr(fd: BorrowedFd<'_>) -> nix::Result<MqAttr> {
    // SAFETY: zeroed mq_attr is a valid value.
    let mut a: libc::mq_attr = unsafe { std::mem::zeroed() };
    // SAFETY: mq_getattr writes one mq_attr to `a`, alive for the call.
    Errno::result(unsafe { libc::mq_getattr(fd.as_raw_fd(), &mut a) })?;
    Ok(MqAttr { flags: a.mq_flags, maxmsg: a.mq_maxmsg, msgsize: a.mq_msgsize, curmsgs: a.mq_curmsgs })
}

fn realtime_ts(ns_from_now: Option<u64>) -> libc::timespec {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    if let Some(d) = ns_from_now {
        // SAFETY: `ts` is a valid timespec for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        let t = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 + d;
        ts = libc::timespec { tv_sec: (t / 1_000_000_000) as libc::time_t, tv_nsec: (t % 1_000_000_000) as libc::c_long };
    }
    ts
}

/// Take the first message (highest priority, oldest) without waiting:
/// `Err(ETIMEDOUT)` (or `EAGAIN` on a non-blocking description) when empty.
/// `buf` must hold mq_msgsize bytes. Returns (length, priority).
pub fn mq_receive_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<(usize, u32)> {
    let ts = realtime_ts(None);
    let mut prio: libc::c_uint = 0;
    // SAFETY: `buf`, `prio` and `ts` are alive for the call; the kernel
    // writes at most buf.len() bytes to `buf` and one c_uint to `prio`.
    let r = unsafe {
        libc::mq_timedreceive(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_char, buf.len(), &mut prio, &ts)
    };
    Errno::result(r).map(|n| (n as usize, prio))
}

/// Send one message, waiting at most `wait_ns` for room (blocking
/// descriptions only).
pub fn mq_send_wait(fd: BorrowedFd<'_>, msg: &[u8], prio: u32, wait_ns: u64) -> nix::Result<()> {
    let ts = realtime_ts(Some(wait_ns));
    // SAFETY: `msg` and `ts` are alive for the call and only read.
    let r = unsafe { libc::mq_timedsend(fd.as_raw_fd(), msg.as_ptr() as *const libc::c_char, msg.len(), prio, &ts) };
    Errno::result(r).map(drop)
}

/// mq_notify(fd, sigevent) for SIGEV_SIGNAL (with a zero value) or
/// SIGEV_NONE.
pub fn mq_notify(fd: BorrowedFd<'_>, sigev_notify: i32, signo: i32) -> nix::Result<()> {
    // SAFETY: zeroed sigevent is a valid value; the fields are set below.
    let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
    ev.sigev_notify = sigev_notify;
    ev.sigev_signo = signo;
    // SAFETY: `ev` is a complete struct sigevent, alive for the call and only read.
    Errno::result(unsafe { libc::syscall(libc::SYS_mq_notify, fd.as_raw_fd(), &ev as *const libc::sigevent) }).map(drop)
}

/// TFD_IOC_SET_TICKS: set a timerfd's count of unread expirations (needs
/// CONFIG_CHECKPOINT_RESTORE; ENOTTY without it).
pub fn timerfd_set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> nix::Result<()> {
    // _IOW('T', 0, u64)
    const TFD_IOC_SET_TICKS: libc::c_ulong = (1 << 30) | (8 << 16) | ((b'T' as libc::c_ulong) << 8);
    // SAFETY: the ioctl reads one u64 from the pointer, which points to `ticks`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS as _, &ticks as *const u64) };
    Errno::result(r).map(drop)
}

/// One getdents64 call on a directory (for the access it reports).
pub fn read_dir_once(fd: BorrowedFd<'_>) -> nix::Result<usize> {
    let mut buf = [0u8; 1024];
    // SAFETY: the kernel writes at most buf.len() bytes to `buf`, alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    Errno::result(r).map(|n| n as usize)
}

/// An ioctl that writes one `c_int` (TIOCGPTN, TIOCGPKT, TIOCGPTLCK,
/// TIOCGEXCL, TIOCGSID, TIOCGPGRP, FIONREAD, TIOCOUTQ).
pub fn ioctl_get_int(fd: BorrowedFd<'_>, req: libc::Ioctl) -> nix::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: these requests write one c_int to the pointer, which points to
    // `n`, alive for the whole call; `fd` is a valid descriptor.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut n as *mut libc::c_int) };
    Errno::result(r).map(|_| n)
}

/// An ioctl that reads one `c_int` through a pointer (TIOCPKT, TIOCSPTLCK).
pub fn ioctl_set_int(fd: BorrowedFd<'_>, req: libc::Ioctl, v: i32) -> nix::Result<()> {
    let n: libc::c_int = v;
    // SAFETY: these requests only read one c_int from the pointer, which
    // points to `n`, alive for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &n as *const libc::c_int) };
    Errno::result(r).map(|_| ())
}

/// An ioctl whose argument is a plain integer, no memory (TIOCSCTTY,
/// TIOCEXCL, TIOCGPTPEER); returns the ioctl's result.
pub fn ioctl_arg(fd: BorrowedFd<'_>, req: libc::Ioctl, arg: libc::c_ulong) -> nix::Result<i32> {
    // SAFETY: the argument is an integer the kernel does not dereference.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    Errno::result(r)
}

/// Terminal settings with exact speeds (TCGETS2).
pub fn tcgets2(fd: BorrowedFd<'_>) -> nix::Result<libc::termios2> {
    // SAFETY: termios2 is plain integers and arrays; all-zero is a valid value.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one termios2 to the pointer, which points to `t`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, &mut t as *mut libc::termios2) };
    Errno::result(r).map(|_| t)
}

/// Set terminal settings with exact speeds (TCSETS2: at once).
pub fn tcsets2(fd: BorrowedFd<'_>, t: &libc::termios2) -> nix::Result<()> {
    // SAFETY: TCSETS2 only reads one termios2 from the pointer, which points to `t`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCSETS2, t as *const libc::termios2) };
    Errno::result(r).map(|_| ())
}

/// Window size (TIOCGWINSZ).
pub fn get_winsize(fd: BorrowedFd<'_>) -> nix::Result<libc::winsize> {
    let mut w = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which points to `w`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut w as *mut libc::winsize) };
    Errno::result(r).map(|_| w)
}

/// Set the window size (TIOCSWINSZ).
pub fn set_winsize(fd: BorrowedFd<'_>, w: &libc::winsize) -> nix::Result<()> {
    // SAFETY: TIOCSWINSZ only reads one winsize from the pointer, which points to `w`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, w as *const libc::winsize) };
    Errno::result(r).map(|_| ())
}

/// Open the slave side of the pseudo-terminal whose master is `master`
/// (TIOCGPTPEER, Linux 4.13+), with open flags `flags`.
pub fn open_pty_peer(master: BorrowedFd<'_>, flags: i32) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: TIOCGPTPEER takes its open flags as an integer and returns a
    // new descriptor, which nothing else owns.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags as libc::c_ulong) };
    let fd = Errno::result(r)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
