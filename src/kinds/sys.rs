//! The system calls the kinds need that neither std nor nix wraps: the only
//! `unsafe` of `src/kinds/`, each block with its SAFETY reason.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

// ------------------------------------------------------ descriptor kinds

/// `struct kcmp_epoll_slot`.
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// Is fd `tfd` of `pid` the file watched as `tfd` by epoll `efd` of `pid`?
/// (kcmp(KCMP_EPOLL_TFD)). Err(errno) when `tfd` is not open.
pub fn kcmp_epoll_tfd(pid: i32, efd: i32, tfd: i32) -> std::io::Result<bool> {
    const KCMP_EPOLL_TFD: libc::c_long = 7;
    let slot = KcmpEpollSlot { efd: efd as u32, tfd: tfd as u32, toff: 0 };
    // SAFETY: the last argument points to `slot`, a valid kcmp_epoll_slot
    // for the whole call; the rest are integers.
    let r = unsafe {
        libc::syscall(SYS_KCMP, pid as libc::c_long, pid as libc::c_long, KCMP_EPOLL_TFD, tfd as libc::c_long, &slot as *const KcmpEpollSlot)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r == 0)
}

/// A new descriptor returned by a system call (`r` >= 0), or the error.
fn new_fd(r: libc::c_long) -> std::io::Result<OwnedFd> {
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: callers pass only what a descriptor-creating call just
    // returned: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// epoll_create1(EPOLL_CLOEXEC): an empty epoll instance.
pub fn epoll_create() -> std::io::Result<OwnedFd> {
    // SAFETY: integer argument; returns a new descriptor or -1.
    new_fd(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as libc::c_long)
}

/// epoll_ctl(EPOLL_CTL_ADD): watch `fd` with `events`, reporting `data`.
pub fn epoll_add(epfd: RawFd, fd: RawFd, events: u32, data: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid epoll_event for the whole call.
    let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// eventfd(0, flags).
pub fn eventfd(flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes integers only and returns a new descriptor or -1.
    new_fd(unsafe { libc::eventfd(0, flags) } as libc::c_long)
}

/// signalfd4(-1, mask, flags): a new signalfd for the 8-byte kernel mask.
pub fn signalfd(sigmask: u64, flags: i32) -> std::io::Result<OwnedFd> {
    // The kernel's mask is 8 bytes: pass it as such (sigset_t is larger,
    // and glibc's signalfd() passes _NSIG/8 = 8 as well).
    // SAFETY: the pointer is to `sigmask`, 8 readable bytes, for the whole
    // call; the call returns a new descriptor or -1.
    new_fd(unsafe { libc::syscall(libc::SYS_signalfd4, -1, &sigmask as *const u64, 8usize, flags) })
}

/// The time of clock `clockid` now (clock_gettime).
pub fn clock_now(clockid: i32) -> std::io::Result<libc::timespec> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the whole call.
    let r = unsafe { libc::clock_gettime(clockid, &mut ts) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ts)
}

/// timerfd_create(clockid, flags).
pub fn timerfd_create(clockid: i32, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: integers only; returns a new descriptor or -1.
    new_fd(unsafe { libc::timerfd_create(clockid, flags) } as libc::c_long)
}

/// timerfd_settime(fd, flags, its, NULL).
pub fn timerfd_settime(fd: BorrowedFd<'_>, flags: i32, its: &libc::itimerspec) -> std::io::Result<()> {
    // SAFETY: `its` is valid for the call; the old-value pointer is NULL.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, its, std::ptr::null_mut()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// inotify_init1(flags).
pub fn inotify_init(flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: integer argument; returns a new descriptor or -1.
    new_fd(unsafe { libc::inotify_init1(flags) } as libc::c_long)
}

/// inotify_add_watch: the watch descriptor.
pub fn inotify_add_watch(fd: BorrowedFd<'_>, path: &std::ffi::CStr, mask: u32) -> std::io::Result<i32> {
    // SAFETY: `path` is a NUL-terminated string alive for the call.
    let r = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// inotify_rm_watch.
pub fn inotify_rm_watch(fd: BorrowedFd<'_>, wd: i32) -> std::io::Result<()> {
    // SAFETY: integers only.
    let r = unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// open_by_handle_at(mount, handle of type `htype`, flags): the file a
/// file handle (as name_to_handle_at or fdinfo shows it) names.
pub fn open_by_handle_at(mount: BorrowedFd<'_>, htype: i32, handle: &[u8], flags: i32) -> std::io::Result<OwnedFd> {
    let bytes = u32::try_from(handle.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // struct file_handle { u32 handle_bytes; int handle_type; u8 f_handle[]; }
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&bytes.to_ne_bytes());
    fh.extend_from_slice(&htype.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: `fh` is a complete file_handle (header + handle_bytes bytes),
    // alive for the call; the call returns a new descriptor or -1.
    new_fd(unsafe { libc::syscall(libc::SYS_open_by_handle_at, mount.as_raw_fd(), fh.as_ptr(), flags) })
}

/// flock(fd, op) on a descriptor number of this process.
pub fn flock(fd: RawFd, op: i32) -> std::io::Result<()> {
    // SAFETY: plain system call on a descriptor number.
    if unsafe { libc::flock(fd, op) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// fcntl(fd, cmd, &flock) with F_SETLK or F_OFD_SETLK: take a read or
/// write lock on bytes `start`.. (`len` 0: to the end of the file).
pub fn fcntl_setlk(fd: RawFd, cmd: i32, write: bool, start: i64, len: i64) -> std::io::Result<()> {
    // SAFETY: zeroed flock is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl with a pointer to a live flock.
    if unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// ------------------------------------------------------------- sockets

/// socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, protocol).
pub fn netlink_socket(protocol: i32) -> nix::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with integer arguments.
    let raw = Errno::result(unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: a descriptor just returned by socket(2), owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// send(fd, buf, 0): bytes sent.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> nix::Result<usize> {
    // SAFETY: `buf` is a valid buffer of the length passed.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    Errno::result(n).map(|n| n as usize)
}

/// recv(fd, buf, 0): bytes received.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<usize> {
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    Errno::result(n).map(|n| n as usize)
}

/// shutdown(2) (`how`: SHUT_RD, SHUT_WR or SHUT_RDWR).
pub fn shutdown(fd: BorrowedFd<'_>, how: i32) -> nix::Result<()> {
    // SAFETY: shutdown(2) with integer arguments on a valid socket.
    Errno::result(unsafe { libc::shutdown(fd.as_raw_fd(), how) }).map(drop)
}

/// getsockopt of one int.
pub fn get_int(fd: BorrowedFd<'_>, level: i32, opt: i32) -> nix::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes; the kernel writes at most `len` bytes.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    Errno::result(r).map(|_| v)
}

/// getsockopt of a struct timeval, in microseconds.
pub fn get_timeo(fd: BorrowedFd<'_>, opt: i32) -> nix::Result<u64> {
    let mut v = libc::timeval { tv_sec: 0, tv_usec: 0 };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes; the kernel writes at most `len` bytes.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&mut v as *mut libc::timeval).cast(), &mut len) };
    Errno::result(r).map(|_| v.tv_sec.max(0) as u64 * 1_000_000 + v.tv_usec.max(0) as u64)
}

/// setsockopt of a struct timeval given in microseconds.
pub fn set_timeo(fd: BorrowedFd<'_>, opt: i32, us: u64) -> nix::Result<()> {
    let v = libc::timeval { tv_sec: (us / 1_000_000) as libc::time_t, tv_usec: (us % 1_000_000) as libc::suseconds_t };
    // SAFETY: `v` is a valid timeval for the length passed.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&v as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as libc::socklen_t)
    };
    Errno::result(r).map(|_| ())
}

/// setsockopt of one int.
pub fn set_int(fd: BorrowedFd<'_>, level: i32, opt: i32, v: i32) -> nix::Result<()> {
    // SAFETY: `v` is a valid c_int for the length passed.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, opt, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    Errno::result(r).map(|_| ())
}

/// One message (or, on a stream, a run of bytes) peeked at the head of a
/// receive queue.
#[derive(Debug, Default)]
pub struct Peeked {
    pub len: usize,
    pub trunc: bool,
    /// The sender's address (raw sun_path bytes; empty: unnamed).
    pub addr: Vec<u8>,
    /// Files in flight with it (SCM_RIGHTS): snap's own duplicates.
    pub fds: Vec<OwnedFd>,
    /// SCM_CREDENTIALS attached to it.
    pub creds: Option<libc::ucred>,
    /// Control data of another kind, or control data cut short.
    pub other: bool,
}

/// One recvmsg(MSG_PEEK) into `buf`. Descriptors passed in SCM_RIGHTS
/// arrive close-on-exec and are returned as owned fds.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<Peeked> {
    let mut cbuf = [0u64; 512];
    // SAFETY: sockaddr_un is plain data; zeroed is a valid empty value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_name = (&mut sa as *mut libc::sockaddr_un).cast();
    mh.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cbuf);
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC;
    // SAFETY: `mh` points at `sa`, `iov` (to `buf`) and `cbuf`, alive for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, flags) };
    let n = Errno::result(n)? as usize;
    let mut out = Peeked { len: n.min(buf.len()), trunc: n > buf.len() || mh.msg_flags & libc::MSG_TRUNC != 0, ..Default::default() };
    let off = std::mem::size_of::<libc::sa_family_t>();
    let namelen = (mh.msg_namelen as usize).min(std::mem::size_of::<libc::sockaddr_un>());
    if namelen > off {
        out.addr = sa.sun_path[..namelen - off].iter().map(|&c| c as u8).collect();
    }
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within
    // msg_controllen; every SCM_RIGHTS entry is a descriptor the kernel just
    // installed in our table, owned by nobody else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            let dlen = (*c).cmsg_len as usize - (data as usize - c as usize);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    let p = data as *const libc::c_int;
                    for i in 0..dlen / std::mem::size_of::<libc::c_int>() {
                        out.fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if dlen >= std::mem::size_of::<libc::ucred>() => {
                    out.creds = Some(std::ptr::read_unaligned(data as *const libc::ucred));
                }
                _ => out.other = true,
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if mh.msg_flags & libc::MSG_CTRUNC != 0 {
        out.other = true;
    }
    Ok(out)
}

/// sendmsg of one message with optional files (SCM_RIGHTS) and destination.
pub fn send_msg(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>], to: Option<&[u8]>, flags: i32) -> nix::Result<usize> {
    let mut cbuf = [0u64; 512];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    let dest = match to {
        Some(n) => Some(sockaddr(n)?),
        None => None,
    };
    if let Some((sa, len)) = &dest {
        mh.msg_name = (sa as *const libc::sockaddr_un) as *mut libc::c_void;
        mh.msg_namelen = *len;
    }
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        if space > std::mem::size_of_val(&cbuf) {
            return Err(Errno::EMSGSIZE);
        }
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = space;
        // SAFETY: the control buffer holds `space` bytes, room for one
        // header and `fds.len()` ints.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let p = libc::CMSG_DATA(c) as *mut libc::c_int;
            for (i, f) in fds.iter().enumerate() {
                std::ptr::write_unaligned(p.add(i), f.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `mh` points at `iov` (to `data`), the address and the
        // control buffer, all alive for the call.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &mh, flags) };
        match Errno::result(n) {
            Err(Errno::EINTR) => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

fn sockaddr(name: &[u8]) -> nix::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() > sa.sun_path.len() {
        return Err(Errno::ENAMETOOLONG);
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + name.len();
    Ok((sa, len as libc::socklen_t))
}

/// Bind `fd` to a sun_path (raw bytes; abstract if it starts with NUL).
pub fn bind(fd: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    let (sa, len) = sockaddr(name)?;
    // SAFETY: `sa` is a valid sockaddr_un; `len` is within its size.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_un).cast(), len) };
    Errno::result(r).map(|_| ())
}

/// Connect `fd` to a sun_path (raw bytes; abstract if it starts with NUL).
pub fn connect(fd: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    let (sa, len) = sockaddr(name)?;
    loop {
        // SAFETY: `sa` is a valid sockaddr_un; `len` is within its size.
        let r = unsafe { libc::connect(fd.as_raw_fd(), (&sa as *const libc::sockaddr_un).cast(), len) };
        match Errno::result(r) {
            Err(Errno::EINTR) => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// accept4 with SOCK_CLOEXEC.
pub fn accept(fd: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    // SAFETY: accept4 with null address pointers; the result is a new
    // descriptor owned by nobody else.
    let r = Errno::result(unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) })?;
    // SAFETY: a descriptor just returned by accept4, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// listen(2).
pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> nix::Result<()> {
    // SAFETY: listen(2) with integer arguments.
    Errno::result(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(|_| ())
}


// ---------------------------------------------------------------- inet

/// getsockopt into a byte buffer; returns the length the kernel wrote.
pub fn get_bytes(fd: BorrowedFd<'_>, level: i32, opt: i32, buf: &mut [u8]) -> nix::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes; the kernel writes at most `len`.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, buf.as_mut_ptr().cast(), &mut len) };
    Errno::result(r).map(|_| len as usize)
}

/// setsockopt from a byte buffer.
pub fn set_bytes(fd: BorrowedFd<'_>, level: i32, opt: i32, buf: &[u8]) -> nix::Result<()> {
    // SAFETY: `buf` is readable for the length passed.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, opt, buf.as_ptr().cast(), buf.len() as libc::socklen_t) };
    Errno::result(r).map(|_| ())
}

/// recv(MSG_PEEK | MSG_DONTWAIT) into `buf`: bytes copied.
pub fn recv_peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<usize> {
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    Errno::result(n).map(|n| n as usize)
}

/// send(fd, buf, flags): bytes sent, retried on EINTR.
pub fn send_flags(fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> nix::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid buffer of the length passed.
        let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
        match Errno::result(n) {
            Err(Errno::EINTR) => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

/// fcntl(F_GETFL) / fcntl(F_SETFL).
pub fn set_status_flags(fd: BorrowedFd<'_>, flags: i32) -> nix::Result<()> {
    // SAFETY: fcntl with integer arguments on a valid descriptor.
    Errno::result(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) }).map(drop)
}
