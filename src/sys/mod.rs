//! Thin system-call wrappers: the only place besides the parasite with `unsafe`.
pub mod clone;
pub mod ipc;
pub mod mapping;
pub mod probe;
pub mod process;
pub mod ptrace;
pub mod uffd;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

use crate::types::{Pid, RemoteFd};

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: Pid) -> Result<OwnedFd> {
    // SAFETY: integer syscall; on success the kernel returns a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pidfd_open {pid}"));
    }
    // SAFETY: `r` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// `pidfd_getfd`: a duplicate (close-on-exec) of another process's fd.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: RemoteFd) -> Result<OwnedFd> {
    // SAFETY: integer syscall; on success the kernel returns a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd.0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pidfd_getfd {fd}"));
    }
    // SAFETY: `r` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

pub fn set_nonblock(fd: &OwnedFd) -> Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error()).context("fcntl O_NONBLOCK");
    }
    Ok(())
}

/// `accept4(SOCK_CLOEXEC)` on a listening socket.
pub fn accept(l: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd> {
    let c = nix::sys::socket::accept4(l.as_raw_fd(), nix::sys::socket::SockFlag::SOCK_CLOEXEC).context("accept")?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(c) })
}

/// Send one message of `data` (not empty) carrying `fds` (SCM_RIGHTS).
pub fn send_fds(sock: std::os::fd::BorrowedFd<'_>, data: &[u8], fds: &[std::os::fd::RawFd]) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [io::IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cm: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cm, MsgFlags::empty(), None)
        .with_context(|| format!("sendmsg with {} descriptors", fds.len()))?;
    Ok(())
}

/// Receive one message carrying up to `max` descriptors (SCM_RIGHTS).
pub fn recv_fds(sock: &OwnedFd, max: usize) -> Result<Vec<OwnedFd>> {
    recv_msg(sock, 16, max).map(|(_, fds)| fds)
}

/// Receive one message of at most `cap` bytes carrying up to `max`
/// descriptors (SCM_RIGHTS): its bytes and the descriptors.
pub fn recv_msg(sock: &OwnedFd, cap: usize, max: usize) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; cap];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr() as *mut _, iov_len: data.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((max * 4) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut _;
    msg.msg_controllen = space;
    let got = loop {
        // SAFETY: msg points to live buffers of the sizes given.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e).context("recvmsg SCM_RIGHTS");
        }
    };
    let mut out = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc
    // CMSG macros that stay within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                let p = libc::CMSG_DATA(c) as *const i32;
                for i in 0..n {
                    out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        anyhow::bail!("recvmsg: control data truncated (more than {max} fds)");
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        anyhow::bail!("recvmsg: message longer than {cap} bytes");
    }
    data.truncate(got);
    Ok((data, out))
}

/// A borrowed view of a descriptor this process owns and keeps open for at
/// least as long as the view is used.
pub fn borrow_fd(fd: std::os::fd::RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: callers pass descriptors they own and do not close while the
    // borrow lives (the restore pool keeps them open until the end).
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// A duplicate of `fd` at the lowest free number >= `min` (F_DUPFD).
pub fn dup_at_least(fd: std::os::fd::BorrowedFd<'_>, min: std::os::fd::RawFd) -> Result<OwnedFd> {
    let n = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD(min))
        .with_context(|| format!("moving a descriptor to {min} or above"))?;
    // SAFETY: F_DUPFD returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}
