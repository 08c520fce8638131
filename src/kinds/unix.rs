//! Unix-domain sockets: connected pairs with both ends in the dump, and
//! listeners bound to a path or an abstract name.
//!
//! Dump: sock_diag (`unix_diag.rs`) gives the type, state, name, peer
//! inode, shutdown bits and, for a listener, its backlog and the
//! connections waiting in it. A connected socket's peer must be held only by
//! processes of the dump (processes snap has seized: their TracerPid is
//! snap); otherwise the dump is refused naming the peer's inode and name.
//! The receive queue of each end is read without consuming it: SO_PEEK_OFF
//! set to 0 on our copy, recvmsg(MSG_PEEK) message by message, SO_PEEK_OFF
//! put back to the target's value. Queues carrying control messages
//! (SCM_RIGHTS, credentials) are refused.
//!
//! Restore: the first end of a pair seen creates a socketpair(), the second
//! takes the other end; each end's saved receive queue is written into its
//! peer's end (message by message for datagrams/seqpackets), then options
//! and shutdown bits are set. A listener is bound again (a stale socket file
//! at its path is removed first; anything else there is an error), given
//! its file's mode and owner, and listen()s with its backlog.
//!
//! Not handled (refused): unconnected or unbound sockets that are not
//! listening (the generic "not supported yet"), bound datagram sockets, a
//! connection whose peer is closed or outside the dump, listeners with
//! connections in their backlog, queued control messages, zero-length
//! messages, relative path names. An accepted socket's local name (the
//! listener's) is not given back: after restore getsockname() is empty.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{socket, socketpair, AddressFamily, SockFlag, SockType};

use super::unix_diag::{self as diag, UnixDiag, TCP_ESTABLISHED, TCP_LISTEN};
use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile, UnixOpts};

pub const KIND: Kind = Kind { name: "unix", dump };

pub fn blob_name(ino: u64) -> String {
    format!("unix-{ino}.rcvq")
}

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFSOCK {
        return None;
    }
    match diag::get_int(p.ours, libc::SOL_SOCKET, libc::SO_DOMAIN) {
        Ok(libc::AF_UNIX) => {}
        _ => return None,
    }
    let d = match diag::query(p.st.st_ino) {
        Ok(Some(d)) => d,
        Ok(None) => {
            return Some(Err(anyhow!(
                "{}: sock_diag does not know this Unix socket (another network namespace?)",
                p.what()
            )))
        }
        Err(e) => return Some(Err(e.context(p.what()))),
    };
    if d.state == TCP_LISTEN {
        return Some(dump_listen(p, &d).with_context(|| p.what()));
    }
    if d.state == TCP_ESTABLISHED || d.peer != 0 {
        return Some(dump_peer(p, sh, &d).with_context(|| p.what()));
    }
    if !d.name.is_empty() {
        return Some(Err(anyhow!(
            "{}: Unix {} socket bound to {} and not connected: not supported yet",
            p.what(),
            type_name(d.sock_type),
            show_name(&d.name)
        )));
    }
    // Unbound and unconnected: the generic refusal.
    None
}

fn type_name(t: u32) -> &'static str {
    match t as i32 {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown-type",
    }
}

/// "/path", "@abstract" or "(unnamed)".
fn show_name(n: &[u8]) -> String {
    if n.is_empty() {
        "(unnamed)".into()
    } else if n[0] == 0 {
        format!("@{}", String::from_utf8_lossy(&n[1..]))
    } else {
        String::from_utf8_lossy(path_bytes(n)).into_owned()
    }
}

/// A path name without its trailing NULs.
fn path_bytes(n: &[u8]) -> &[u8] {
    let end = n.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    &n[..end]
}

/// Name as stored: "/path" or "@abstract"; refuses what cannot round-trip.
fn stored_name(n: &[u8]) -> Result<String> {
    if n.is_empty() {
        return Ok(String::new());
    }
    if n[0] == 0 {
        let s = std::str::from_utf8(&n[1..]).map_err(|_| anyhow!("abstract name {:?} is not UTF-8", show_name(n)))?;
        return Ok(format!("@{s}"));
    }
    let s = std::str::from_utf8(path_bytes(n)).map_err(|_| anyhow!("path {:?} is not UTF-8", show_name(n)))?;
    Ok(s.to_string())
}

fn read_opts(fd: BorrowedFd<'_>) -> Result<UnixOpts> {
    let g = |opt, what| diag::get_int(fd, libc::SOL_SOCKET, opt).with_context(|| format!("getsockopt({what})"));
    Ok(UnixOpts {
        passcred: g(libc::SO_PASSCRED, "SO_PASSCRED")? != 0,
        sndbuf: g(libc::SO_SNDBUF, "SO_SNDBUF")? as u64,
        rcvbuf: g(libc::SO_RCVBUF, "SO_RCVBUF")? as u64,
        peek_off: g(libc::SO_PEEK_OFF, "SO_PEEK_OFF")? as i64,
    })
}

fn dump_listen(p: &Probe, d: &UnixDiag) -> Result<FileKind> {
    let name = stored_name(&d.name)?;
    ensure!(!name.is_empty(), "listening Unix socket without a name: not supported yet");
    let (pending, backlog) = d.rqlen.ok_or_else(|| anyhow!("sock_diag gave no backlog"))?;
    if pending > 0 || !d.icons.is_empty() {
        let inos: Vec<String> = d.icons.iter().map(|i| i.to_string()).collect();
        bail!(
            "listening Unix socket {} has {} connection(s) in its backlog not accepted yet (socket inodes {}): not supported",
            show_name(&d.name),
            pending.max(d.icons.len() as u32),
            inos.join(", ")
        );
    }
    let (mut mode, mut uid, mut gid) = (0o777, 0, 0);
    if !name.starts_with('@') {
        ensure!(name.starts_with('/'), "listening socket bound to a relative path {name:?}: not supported");
        let (vino, vdev) = d.vfs.ok_or_else(|| anyhow!("sock_diag gives no inode for the socket file {name}"))?;
        let md = fs::symlink_metadata(&name).with_context(|| format!("socket file {name} of the listener is gone"))?;
        // unix_diag gives the inode and a 32-bit kernel dev_t (MAJOR << 20 | MINOR).
        let kdev = ((libc::major(md.dev()) as u64) << 20) | libc::minor(md.dev()) as u64;
        ensure!(
            md.ino() == vino && kdev == vdev,
            "{name} is not the listener's socket file any more (inode {} there, the socket's is {vino})",
            md.ino()
        );
        mode = md.mode() & 0o7777;
        uid = md.uid();
        gid = md.gid();
    }
    Ok(FileKind::UnixListen {
        ino: d.ino,
        sock_type: d.sock_type,
        name,
        backlog: backlog as u64,
        mode,
        uid,
        gid,
        opts: read_opts(p.ours)?,
    })
}

/// Processes holding `socket:[ino]`, snap itself left out.
fn holders(ino: u64) -> Vec<i32> {
    let want = format!("socket:[{ino}]");
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue; // our own copies of the dumped descriptors
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        if fds.flatten().any(|f| fs::read_link(f.path()).map(|l| l.as_os_str().as_bytes() == want.as_bytes()).unwrap_or(false)) {
            out.push(pid);
        }
    }
    out
}

/// Is `pid` seized by this snap (so part of the dump)?
fn in_dump(pid: i32) -> bool {
    let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let Some(tracer) = st.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse::<i32>().ok()) else {
        return false;
    };
    tracer != 0 && fs::metadata(format!("/proc/self/task/{tracer}")).is_ok()
}

fn dump_peer(p: &Probe, sh: &mut DumpShared, d: &UnixDiag) -> Result<FileKind> {
    let ty = type_name(d.sock_type);
    if d.peer == 0 {
        bail!("connected Unix {ty} socket whose peer is closed: not supported yet");
    }
    let pd = diag::query(d.peer)?.ok_or_else(|| anyhow!("its peer, Unix socket inode {}, is unknown to sock_diag", d.peer))?;
    let outside: Vec<i32> = holders(d.peer).into_iter().filter(|&h| !in_dump(h)).collect();
    let peer_desc = format!("Unix socket inode {} ({})", d.peer, show_name(&pd.name));
    if !outside.is_empty() {
        let ps: Vec<String> = outside.iter().map(|h| h.to_string()).collect();
        bail!("its peer {peer_desc} is held by process(es) outside the dump ({}): refusing", ps.join(", "));
    }
    if holders(d.peer).is_empty() {
        bail!("its peer {peer_desc} is not held by any process of the dump (in flight in SCM_RIGHTS, or outside): refusing");
    }
    if pd.peer != d.ino {
        bail!("its peer {peer_desc} is not connected back to it (a datagram socket connect()ed one way): not supported yet");
    }
    let opts = read_opts(p.ours)?;
    let (data, msgs) = read_queue(p.ours, d.sock_type as i32, opts.peek_off).context("reading the receive queue")?;
    if !data.is_empty() && opts.passcred {
        bail!("{} queued bytes would need their senders' credentials (SO_PASSCRED is on): not supported", data.len());
    }
    let rcvq = data.len() as u64;
    if !data.is_empty() {
        let blob = blob_name(d.ino);
        if sh.saved.insert(blob.clone()) {
            sh.blobs.push((blob, data));
        }
    }
    Ok(FileKind::UnixPeer {
        ino: d.ino,
        peer: d.peer,
        sock_type: d.sock_type,
        name: stored_name(&d.name).unwrap_or_else(|_| show_name(&d.name)),
        rcvq,
        msgs,
        shutdown: d.shutdown,
        opts,
    })
}

/// The receive queue of our copy of a socket, left in place: (bytes,
/// message lengths for datagram/seqpacket sockets).
fn read_queue(fd: BorrowedFd<'_>, ty: i32, orig_peek_off: i64) -> Result<(Vec<u8>, Vec<u64>)> {
    let total = super::sys::fionread(fd).context("FIONREAD")?;
    if total == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    diag::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).context("setting SO_PEEK_OFF to 0")?;
    let r = peek_all(fd, ty, total);
    let back = diag::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, orig_peek_off as i32)
        .with_context(|| format!("putting SO_PEEK_OFF back to {orig_peek_off}"));
    let out = r?;
    back?;
    Ok(out)
}

fn peek_all(fd: BorrowedFd<'_>, ty: i32, total: usize) -> Result<(Vec<u8>, Vec<u64>)> {
    let stream = ty == libc::SOCK_STREAM;
    // A datagram's FIONREAD is the first message's length only.
    let cap = if ty == libc::SOCK_DGRAM { 4 << 20 } else { total };
    let mut buf = vec![0u8; cap];
    let mut data = Vec::new();
    let mut msgs = Vec::new();
    loop {
        if stream && data.len() >= total {
            break;
        }
        let (n, trunc, cmsg) = match diag::peek(fd, &mut buf) {
            Ok(v) => v,
            Err(Errno::EAGAIN) => break,
            Err(e) => return Err(e).context("recvmsg(MSG_PEEK)"),
        };
        if cmsg {
            bail!("a queued message carries control data (SCM_RIGHTS descriptors or credentials): not supported");
        }
        ensure!(!trunc, "a queued message is larger than {} bytes", buf.len());
        if n == 0 {
            if stream {
                break;
            }
            bail!("a zero-length message is queued: not supported");
        }
        data.extend_from_slice(&buf[..n]);
        if !stream {
            msgs.push(n as u64);
        }
        if !stream && ty == libc::SOCK_SEQPACKET && data.len() >= total {
            break;
        }
    }
    if ty != libc::SOCK_DGRAM {
        ensure!(
            data.len() == total,
            "read {} of the {total} queued bytes (out-of-band data or a message boundary we cannot read through)",
            data.len()
        );
    }
    Ok((data, msgs))
}

// ------------------------------------------------------------------ restore

/// The end of a socketpair created for the first end of a pair seen, kept
/// for its peer's description.
pub struct Held {
    /// The peer's end, handed out when its description is restored.
    end: OwnedFd,
    /// A duplicate of the first end: the peer's queue is written into it.
    first: OwnedFd,
    first_opts: UnixOpts,
    first_shutdown: u32,
}

/// Held ends of socketpairs, keyed by the inode of the socket still to come.
pub type HeldMap = HashMap<u64, Held>;

fn sock_type(t: u32) -> Result<SockType> {
    Ok(match t as i32 {
        libc::SOCK_STREAM => SockType::Stream,
        libc::SOCK_DGRAM => SockType::Datagram,
        libc::SOCK_SEQPACKET => SockType::SeqPacket,
        _ => bail!("unknown Unix socket type {t}"),
    })
}

fn set_flags(fd: BorrowedFd<'_>, flags: u32) -> Result<()> {
    let fl = OFlag::from_bits_truncate((flags & libc::O_NONBLOCK as u32) as i32);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl)).with_context(|| format!("F_SETFL {flags:#o}"))?;
    Ok(())
}

fn set_buf(fd: BorrowedFd<'_>, force: i32, plain: i32, doubled: u64) -> nix::Result<()> {
    let v = i32::try_from(doubled / 2).unwrap_or(i32::MAX);
    diag::set_int(fd, libc::SOL_SOCKET, force, v).or_else(|_| diag::set_int(fd, libc::SOL_SOCKET, plain, v))
}

fn set_opts(fd: BorrowedFd<'_>, o: &UnixOpts) -> Result<()> {
    set_buf(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, o.sndbuf).context("SO_SNDBUF")?;
    set_buf(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, o.rcvbuf).context("SO_RCVBUF")?;
    diag::set_int(fd, libc::SOL_SOCKET, libc::SO_PASSCRED, o.passcred as i32).context("SO_PASSCRED")?;
    if o.peek_off >= 0 {
        diag::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, o.peek_off as i32).context("SO_PEEK_OFF")?;
    }
    Ok(())
}

fn shutdown(fd: BorrowedFd<'_>, bits: u32) -> Result<()> {
    let how = match bits & 3 {
        0 => return Ok(()),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) with integer arguments on a valid socket.
    Errno::result(unsafe { libc::shutdown(fd.as_raw_fd(), how) }).with_context(|| format!("shutdown({how})"))?;
    Ok(())
}

/// Write a saved receive queue into the sending end `tx`.
fn fill(tx: BorrowedFd<'_>, data: &[u8], msgs: &[u64], stream: bool) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    // Room for all of it at once (skb overhead included); the sender's own
    // SO_SNDBUF is set afterwards.
    let room = data.len() * 2 + msgs.len() * 2048 + (1 << 20);
    set_buf(tx, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, room as u64 * 2).context("raising SO_SNDBUF to fill")?;
    let lens: Vec<usize> = if stream { vec![data.len()] } else { msgs.iter().map(|&m| m as usize).collect() };
    ensure!(lens.iter().sum::<usize>() == data.len(), "message lengths do not add up to the {} saved bytes", data.len());
    let mut off = 0;
    for len in lens {
        let end = off + len;
        while off < end {
            // SAFETY: the slice data[off..end] is valid for reads.
            let n = unsafe { libc::send(tx.as_raw_fd(), data[off..end].as_ptr().cast(), end - off, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            match Errno::result(n) {
                Ok(n) => {
                    ensure!(stream || n as usize == len, "sent {n} of a {len}-byte message");
                    off += n as usize;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).with_context(|| format!("writing {} queued bytes (at {off})", data.len())),
            }
        }
    }
    Ok(())
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    match &of.kind {
        FileKind::UnixListen { .. } => restore_listen(of),
        FileKind::UnixPeer { .. } => restore_peer(of, ctx),
        _ => bail!("not a Unix socket"),
    }
}

fn restore_peer(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::UnixPeer { ino, peer, sock_type: t, rcvq, msgs, shutdown: sd, opts, .. } = &of.kind else {
        bail!("not a connected Unix socket")
    };
    let what = format!("Unix socket inode {ino} (peer {peer})");
    let data = if *rcvq > 0 {
        let b = blob_name(*ino);
        (ctx.read_blob)(&b).with_context(|| format!("{what}: reading blob {b}"))?
    } else {
        Vec::new()
    };
    ensure!(data.len() as u64 == *rcvq, "{what}: blob has {} bytes, the image says {rcvq}", data.len());
    let stream = *t as i32 == libc::SOCK_STREAM;
    let fd = if let Some(h) = ctx.unix.remove(ino) {
        // The pair exists: our queue goes in through the first end.
        fill(h.first.as_fd(), &data, msgs, stream).with_context(|| what.clone())?;
        set_opts(h.first.as_fd(), &h.first_opts).with_context(|| format!("{what}: options of its peer"))?;
        set_opts(h.end.as_fd(), opts).with_context(|| format!("{what}: options"))?;
        shutdown(h.first.as_fd(), h.first_shutdown).with_context(|| format!("{what}: peer's shutdown state"))?;
        shutdown(h.end.as_fd(), *sd).with_context(|| format!("{what}: shutdown state"))?;
        h.end
    } else {
        let (a, b) = socketpair(AddressFamily::Unix, sock_type(*t)?, None, SockFlag::SOCK_CLOEXEC)
            .with_context(|| format!("{what}: socketpair"))?;
        fill(b.as_fd(), &data, msgs, stream).with_context(|| what.clone())?;
        let first = a.try_clone().with_context(|| format!("{what}: dup"))?;
        ctx.unix.insert(*peer, Held { end: b, first, first_opts: opts.clone(), first_shutdown: *sd });
        a
    };
    set_flags(fd.as_fd(), of.flags).with_context(|| what.clone())?;
    Ok(fd)
}

fn restore_listen(of: &OpenFile) -> Result<OwnedFd> {
    let FileKind::UnixListen { ino, sock_type: t, name, backlog, mode, uid, gid, opts } = &of.kind else {
        bail!("not a listening Unix socket")
    };
    let what = format!("listening Unix socket {name} (inode {ino})");
    let fd = socket(AddressFamily::Unix, sock_type(*t)?, SockFlag::SOCK_CLOEXEC, None).with_context(|| format!("{what}: socket"))?;
    let raw: Vec<u8> = if let Some(abs) = name.strip_prefix('@') {
        std::iter::once(0).chain(abs.bytes()).collect()
    } else {
        ensure!(name.starts_with('/'), "{what}: not an absolute path");
        match fs::symlink_metadata(name) {
            Ok(md) if md.file_type().is_socket() => {
                fs::remove_file(name).with_context(|| format!("{what}: removing the stale socket file"))?
            }
            Ok(_) => bail!("{what}: {name} exists and is not a socket; not replacing it"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("{what}: stat {name}")),
        }
        name.as_bytes().to_vec()
    };
    diag::bind(fd.as_fd(), &raw).with_context(|| format!("{what}: bind"))?;
    if !name.starts_with('@') {
        fs::set_permissions(name, fs::Permissions::from_mode(*mode)).with_context(|| format!("{what}: chmod {mode:o}"))?;
        std::os::unix::fs::lchown(name, Some(*uid), Some(*gid)).with_context(|| format!("{what}: chown {uid}:{gid}"))?;
    }
    set_opts(fd.as_fd(), opts).with_context(|| what.clone())?;
    let bl = i32::try_from(*backlog).unwrap_or(i32::MAX);
    // SAFETY: listen(2) with integer arguments on our socket.
    Errno::result(unsafe { libc::listen(fd.as_raw_fd(), bl) }).with_context(|| format!("{what}: listen({bl})"))?;
    set_flags(fd.as_fd(), of.flags).with_context(|| what.clone())?;
    Ok(fd)
}
