//! sock_diag for AF_UNIX (NETLINK_SOCK_DIAG, `unix_diag_req`), and the few
//! raw socket calls `unix.rs` needs. `ss -xp` shows the same data.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};


use anyhow::{bail, ensure, Context, Result};

use crate::images::records::UnixOpts;
use nix::errno::Errno;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_LISTEN: u8 = 10;

/// What sock_diag says about one Unix socket.
#[derive(Debug, Default, Clone)]
pub struct UnixDiag {
    pub ino: u64,
    pub sock_type: u32,
    pub state: u8,
    /// Raw sun_path bytes (abstract names start with NUL); empty if unbound.
    pub name: Vec<u8>,
    /// (inode, device) of the socket file of a path name.
    pub vfs: Option<(u64, u64)>,
    /// Peer inode, 0 if none (or the peer is closed).
    pub peer: u64,
    /// Inodes of connections waiting in a listener's backlog.
    pub icons: Vec<u64>,
    /// (rqueue, wqueue): for a listener, (pending, backlog); else bytes
    /// queued to read (the first datagram's length for SOCK_DGRAM).
    pub rqlen: Option<(u32, u32)>,
    pub shutdown: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn nl_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call with integer arguments; the result is
    // checked and owned right away.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    // SAFETY: a descriptor just returned by socket(2), owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(Errno::result(raw).context("socket(NETLINK_SOCK_DIAG)")?) })
}

/// Send one unix_diag_req: about inode `ino`, or (`dump`) about every Unix
/// socket of the namespace.
fn request(nl: &OwnedFd, ino: u32, dump: bool, show: u32) -> Result<()> {
    // nlmsghdr (16) + unix_diag_req (24).
    let mut req = [0u8; 40];
    req[0..4].copy_from_slice(&40u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = libc::NLM_F_REQUEST | if dump { libc::NLM_F_DUMP } else { 0 };
    req[6..8].copy_from_slice(&(flags as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req[24..28].copy_from_slice(&ino.to_ne_bytes());
    req[28..32].copy_from_slice(&show.to_ne_bytes());
    req[32..40].copy_from_slice(&[0xff; 8]); // no cookie check
    // SAFETY: `req` is a valid buffer of the length passed.
    let n = unsafe { libc::send(nl.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    Errno::result(n).context("send(sock_diag request)")?;
    Ok(())
}

/// One unix_diag_msg (after its nlmsghdr) with its attributes.
fn parse_msg(m: &[u8]) -> Result<UnixDiag> {
    ensure!(m.len() >= 16, "sock_diag: short message ({} bytes)", m.len());
    let mut d = UnixDiag { sock_type: m[1] as u32, state: m[2], ino: u32_at(m, 4) as u64, ..Default::default() };
    let mut off = 16;
    while off + 4 <= m.len() {
        let alen = u16::from_ne_bytes([m[off], m[off + 1]]) as usize;
        let aty = u16::from_ne_bytes([m[off + 2], m[off + 3]]) & 0x3fff;
        if alen < 4 || off + alen > m.len() {
            bail!("sock_diag: bad attribute length {alen}");
        }
        let p = &m[off + 4..off + alen];
        match aty {
            UNIX_DIAG_NAME => d.name = p.to_vec(),
            UNIX_DIAG_VFS if p.len() >= 8 => d.vfs = Some((u32_at(p, 0) as u64, u32_at(p, 4) as u64)),
            UNIX_DIAG_PEER if p.len() >= 4 => d.peer = u32_at(p, 0) as u64,
            UNIX_DIAG_ICONS => d.icons = p.chunks_exact(4).map(|c| u32_at(c, 0) as u64).collect(),
            UNIX_DIAG_RQLEN if p.len() >= 8 => d.rqlen = Some((u32_at(p, 0), u32_at(p, 4))),
            UNIX_DIAG_SHUTDOWN if !p.is_empty() => d.shutdown = p[0] as u32,
            _ => {}
        }
        off += (alen + 3) & !3;
    }
    Ok(d)
}

const SHOW_ALL: u32 = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN;

/// Query sock_diag about the Unix socket with inode `ino` (in snap's own
/// network namespace). `Ok(None)`: no such Unix socket there.
pub fn query(ino: u64) -> Result<Option<UnixDiag>> {
    let ino32 = u32::try_from(ino).with_context(|| format!("socket inode {ino} does not fit unix_diag's u32"))?;
    let nl = nl_socket()?;
    request(&nl, ino32, false, SHOW_ALL)?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = Errno::result(n).context("recv(sock_diag answer)")? as usize;
    let b = &buf[..n];
    ensure!(b.len() >= 16, "sock_diag: short answer ({n} bytes)");
    let len = (u32_at(b, 0) as usize).min(b.len());
    let ty = u16::from_ne_bytes([b[4], b[5]]);
    if ty == libc::NLMSG_ERROR as u16 {
        let err = -(u32_at(b, 16) as i32);
        if err == libc::ENOENT {
            return Ok(None);
        }
        return Err(Errno::from_raw(err)).context("sock_diag");
    }
    ensure!(ty == SOCK_DIAG_BY_FAMILY && len >= 16 + 16, "sock_diag: unexpected answer type {ty}");
    let d = parse_msg(&b[16..len])?;
    ensure!(d.ino == ino, "sock_diag answered about inode {} instead of {ino}", d.ino);
    Ok(Some(d))
}

/// Every Unix socket of snap's network namespace (name, peer, backlog
/// connections): to find the listener a pending connection waits on.
pub fn query_all() -> Result<Vec<UnixDiag>> {
    let nl = nl_socket()?;
    request(&nl, 0, true, UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut out = Vec::new();
    loop {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = Errno::result(n).context("recv(sock_diag dump)")? as usize;
        ensure!(n > 0, "sock_diag dump ended without NLMSG_DONE");
        let mut off = 0;
        while off + 16 <= n {
            let b = &buf[off..n];
            let len = u32_at(b, 0) as usize;
            ensure!(len >= 16 && len <= b.len(), "sock_diag dump: bad message length {len}");
            let ty = u16::from_ne_bytes([b[4], b[5]]);
            if ty == libc::NLMSG_DONE as u16 {
                return Ok(out);
            }
            if ty == libc::NLMSG_ERROR as u16 {
                let err = if len >= 20 { -(u32_at(b, 16) as i32) } else { libc::EIO };
                return Err(Errno::from_raw(err)).context("sock_diag dump");
            }
            ensure!(ty == SOCK_DIAG_BY_FAMILY, "sock_diag dump: unexpected message type {ty}");
            out.push(parse_msg(&b[16..len])?);
            off += (len + 3) & !3;
        }
    }
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

// ------------------------------------------------------------- options

/// The options restore sets again.
pub fn read_opts(fd: BorrowedFd<'_>) -> Result<UnixOpts> {
    let g = |opt, what| get_int(fd, libc::SOL_SOCKET, opt).with_context(|| format!("getsockopt({what})"));
    Ok(UnixOpts {
        passcred: g(libc::SO_PASSCRED, "SO_PASSCRED")? != 0,
        sndbuf: g(libc::SO_SNDBUF, "SO_SNDBUF")? as u64,
        rcvbuf: g(libc::SO_RCVBUF, "SO_RCVBUF")? as u64,
        peek_off: g(libc::SO_PEEK_OFF, "SO_PEEK_OFF")? as i64,
        passsec: g(libc::SO_PASSSEC, "SO_PASSSEC")? != 0,
        passpidfd: match get_int(fd, libc::SOL_SOCKET, SO_PASSPIDFD) {
            Ok(v) => v != 0,
            Err(Errno::ENOPROTOOPT) => false,
            Err(e) => return Err(e).context("getsockopt(SO_PASSPIDFD)"),
        },
        rcvtimeo_us: get_timeo(fd, libc::SO_RCVTIMEO).context("getsockopt(SO_RCVTIMEO)")?,
        sndtimeo_us: get_timeo(fd, libc::SO_SNDTIMEO).context("getsockopt(SO_SNDTIMEO)")?,
    })
}

/// Not in every libc crate yet (Linux 6.5+).
const SO_PASSPIDFD: i32 = 76;

/// Set a buffer size given as getsockopt shows it (doubled), past the
/// sysctl limits if we may.
pub fn set_buf(fd: BorrowedFd<'_>, force: i32, plain: i32, doubled: u64) -> nix::Result<()> {
    let v = i32::try_from(doubled / 2).unwrap_or(i32::MAX);
    set_int(fd, libc::SOL_SOCKET, force, v).or_else(|_| set_int(fd, libc::SOL_SOCKET, plain, v))
}

pub fn set_opts(fd: BorrowedFd<'_>, o: &UnixOpts) -> Result<()> {
    set_buf(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, o.sndbuf).context("SO_SNDBUF")?;
    set_buf(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, o.rcvbuf).context("SO_RCVBUF")?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_PASSCRED, o.passcred as i32).context("SO_PASSCRED")?;
    if o.peek_off >= 0 {
        set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, o.peek_off as i32).context("SO_PEEK_OFF")?;
    }
    set_int(fd, libc::SOL_SOCKET, libc::SO_PASSSEC, o.passsec as i32).context("SO_PASSSEC")?;
    if o.passpidfd {
        set_int(fd, libc::SOL_SOCKET, SO_PASSPIDFD, 1).context("SO_PASSPIDFD")?;
    }
    set_timeo(fd, libc::SO_RCVTIMEO, o.rcvtimeo_us).context("SO_RCVTIMEO")?;
    set_timeo(fd, libc::SO_SNDTIMEO, o.sndtimeo_us).context("SO_SNDTIMEO")?;
    Ok(())
}

