//! sock_diag for AF_UNIX (NETLINK_SOCK_DIAG, `unix_diag_req`), and the
//! socket options restore sets again. `ss -xp` shows the same data. The raw
//! socket calls (bind, connect, peek, send_msg...) are in `super::sys`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{bail, ensure, Context, Result};

use super::sys::{self, get_int, get_timeo, set_int, set_timeo};
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
    sys::netlink_socket(libc::NETLINK_SOCK_DIAG).context("socket(NETLINK_SOCK_DIAG)")
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
    sys::send(nl.as_fd(), &req).context("send(sock_diag request)")?;
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
    let n = sys::recv(nl.as_fd(), &mut buf).context("recv(sock_diag answer)")?;
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
        let n = sys::recv(nl.as_fd(), &mut buf).context("recv(sock_diag dump)")?;
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

