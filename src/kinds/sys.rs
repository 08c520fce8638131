//! The few system calls the kinds need that neither std nor nix wraps.

use std::os::fd::{AsRawFd, BorrowedFd};

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
