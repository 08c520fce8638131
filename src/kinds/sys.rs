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
