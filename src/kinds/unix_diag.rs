//! sock_diag for AF_UNIX (NETLINK_SOCK_DIAG, `unix_diag_req`), and the few
//! raw socket calls `unix.rs` needs. `ss -xp` shows the same data.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{bail, ensure, Context, Result};
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

/// Query sock_diag about the Unix socket with inode `ino` (in snap's own
/// network namespace). `Ok(None)`: no such Unix socket there.
pub fn query(ino: u64) -> Result<Option<UnixDiag>> {
    let ino32 = u32::try_from(ino).with_context(|| format!("socket inode {ino} does not fit unix_diag's u32"))?;
    // SAFETY: plain socket(2) call with integer arguments; the result is
    // checked and owned right away.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    let nl = unsafe { OwnedFd::from_raw_fd(Errno::result(raw).context("socket(NETLINK_SOCK_DIAG)")?) };
    // nlmsghdr (16) + unix_diag_req (24).
    let mut req = [0u8; 40];
    req[0..4].copy_from_slice(&40u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req[24..28].copy_from_slice(&ino32.to_ne_bytes());
    let show = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN;
    req[28..32].copy_from_slice(&show.to_ne_bytes());
    req[32..40].copy_from_slice(&[0xff; 8]); // no cookie check
    // SAFETY: `req` is a valid buffer of the length passed.
    let n = unsafe { libc::send(nl.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    Errno::result(n).context("send(sock_diag request)")?;
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
    let m = &b[16..len];
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
    ensure!(d.ino == ino, "sock_diag answered about inode {} instead of {ino}", d.ino);
    Ok(Some(d))
}

/// getsockopt of one int.
pub fn get_int(fd: BorrowedFd<'_>, level: i32, opt: i32) -> nix::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes; the kernel writes at most `len` bytes.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    Errno::result(r).map(|_| v)
}

/// setsockopt of one int.
pub fn set_int(fd: BorrowedFd<'_>, level: i32, opt: i32, v: i32) -> nix::Result<()> {
    // SAFETY: `v` is a valid c_int for the length passed.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, opt, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    Errno::result(r).map(|_| ())
}

/// One recvmsg(MSG_PEEK): (bytes, truncated, control messages present).
/// Descriptors passed in SCM_RIGHTS arrive close-on-exec and are closed.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<(usize, bool, bool)> {
    let mut cbuf = [0u64; 64];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cbuf);
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC;
    // SAFETY: `mh` points at `iov` (to `buf`) and `cbuf`, alive for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, flags) };
    let n = Errno::result(n)? as usize;
    let mut cmsgs = false;
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            cmsgs = true;
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let cnt = ((*c).cmsg_len as usize - (data as usize - c as usize)) / std::mem::size_of::<libc::c_int>();
                for i in 0..cnt {
                    libc::close(std::ptr::read_unaligned(data.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    let trunc = n > buf.len() || mh.msg_flags & libc::MSG_TRUNC != 0;
    Ok((n.min(buf.len()), trunc, cmsgs || mh.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Bind `fd` to a sun_path (raw bytes; abstract if it starts with NUL).
pub fn bind(fd: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
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
    // SAFETY: `sa` is a valid sockaddr_un; `len` is within its size.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_un).cast(), len as libc::socklen_t) };
    Errno::result(r).map(|_| ())
}
