//! Unix-domain sockets: connected pairs with both ends in the dump,
//! listeners (with the connections waiting in their backlog), sockets
//! neither connected nor listening (fresh, or bound datagram sockets with
//! their queued datagrams and senders), files in flight in queues, and with
//! `--ext-unix-sk` connections to a named socket outside the dump.
//!
//! Dump: sock_diag (`unix_diag.rs`) gives the type, state, name, peer
//! inode, shutdown bits and, for a listener, its backlog and the clients
//! whose connections wait in it. A connected socket's peer must be held
//! only by processes of the dump (processes snap has seized: their
//! TracerPid is snap), or be in flight in a queue of the dump; otherwise the
//! dump is refused naming the peer's inode and name, unless `--ext-unix-sk`
//! saves a stream connection by its outside peer's name. A client whose
//! connection waits in a backlog has no peer inode (the server end has no
//! file yet): the listener is found by a sock_diag dump of every Unix
//! socket. Receive queues are read without consuming them
//! (`unix_queue.rs`); the files in flight with a message (SCM_RIGHTS) come
//! out of the peek as snap's own duplicates and are described by the other
//! kinds like any open file (`DumpShared::inflight`, `DumpCtx`), so one also
//! held by a process stays one description. Options kept: SO_PASSCRED,
//! SO_PASSSEC, SO_PASSPIDFD, SO_SNDBUF, SO_RCVBUF, SO_RCVTIMEO, SO_SNDTIMEO,
//! SO_PEEK_OFF, and O_NONBLOCK.
//!
//! Restore runs in three passes (`restore_pass`): (0) connected pairs, (1)
//! listeners and lone sockets, (2) the rest, clients waiting in a backlog
//! and connections to outside servers among them. A pair of unnamed ends
//! is a socketpair(); a stream or seqpacket pair with a name is connected
//! through a temporary listener so the accepted end carries the listener's
//! name and the other end its own (`unix_named.rs`: path names are bound in
//! a private root, so nothing shows at the real path; abstract names before
//! any listener takes them: hence pass 0). A datagram pair is a
//! socketpair whose named ends are then bound for real. A listener is
//! bound again (a stale socket file at its path is removed first; anything
//! else there is an error), given its file's mode and owner, and
//! listen()s; the clients waiting in its backlog connect to it right away,
//! in order, and are handed to their descriptions in pass 2. A lone socket
//! is bound to its name like a listener. Once every open file of the image
//! exists, the queues are written back (`Restoring::finish`): each message
//! through the peer's end, or for a lone socket from a socket with its
//! sender's name, with its files in flight; then options and shutdown bits
//! are set.
//!
//! Not handled (refused): a connection whose peer is closed, or outside
//! the dump (without `--ext-unix-sk`, or with it when the peer has no name,
//! is a datagram socket, or sent data still queued); a client in a backlog
//! that already sent data (it sits in the server end, which cannot be read
//! without accepting it) or is bound to a path; a datagram socket connected
//! one way; queued credentials (SCM_CREDENTIALS: restore could only send
//! them for a pid that already exists) and other control messages; an
//! epoll instance in flight; zero-length messages; listeners and lone
//! sockets bound to relative paths; a bound socket whose file is gone.
//! Approximate: on a stream, files in flight are sent again with the whole
//! run of bytes one peek returned (bytes queued just before them without
//! files included), so a reader with a small buffer may see them a little
//! earlier than before.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{socket, socketpair, AddressFamily, SockFlag, SockType};

use super::sys;
use super::unix_diag::{self as diag, read_opts, set_opts, UnixDiag, TCP_ESTABLISHED, TCP_LISTEN};
use super::unix_named::{self as named, show};
use super::unix_queue::{self as queue, files_of, take_files, Queue};
pub use super::unix_queue::{check_inflight, resolve_inflight};
use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile, PendingConn, SockFile, UnixOpts};

pub const KIND: Kind = Kind { name: "unix", dump };

pub fn blob_name(ino: u64) -> String {
    format!("unix-{ino}.rcvq")
}

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFSOCK {
        return None;
    }
    match sys::get_int(p.ours, libc::SOL_SOCKET, libc::SO_DOMAIN) {
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
    if p.pid.0 == std::process::id() as i32 {
        // Our own copy of a socket in flight in a queue of the dump.
        sh.unix_inflight.insert(d.ino);
    }
    let r = if d.state == TCP_LISTEN {
        dump_listen(p, sh, &d)
    } else if d.state == TCP_ESTABLISHED || d.peer != 0 {
        dump_peer(p, sh, &d)
    } else {
        dump_lone(p, sh, &d)
    };
    Some(r.with_context(|| p.what()))
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
    show(&raw_of(n))
}

fn raw_of(n: &[u8]) -> Vec<u8> {
    named::trim(n)
}

/// Name as stored: "/path" or "@abstract"; refuses what cannot round-trip.
fn stored_name(n: &[u8]) -> Result<String> {
    let r = raw_of(n);
    if r.is_empty() {
        return Ok(String::new());
    }
    if r[0] == 0 {
        let s = std::str::from_utf8(&r[1..]).map_err(|_| anyhow!("abstract name {:?} is not UTF-8", show(&r)))?;
        return Ok(format!("@{s}"));
    }
    let s = std::str::from_utf8(&r).map_err(|_| anyhow!("path {:?} is not UTF-8", show(&r)))?;
    ensure!(!s.starts_with('@'), "relative path name {s:?} starts with '@' (it would read as an abstract name)");
    Ok(s.to_string())
}

/// Mode and owner of the socket file of a socket bound to the path `name`,
/// checked to be that socket's file (`vfs` from sock_diag).
fn sock_file(name: &str, vfs: Option<(u64, u64)>) -> Result<SockFile> {
    ensure!(name.starts_with('/'), "bound to a relative path {name:?}: not supported");
    let (vino, vdev) = vfs.ok_or_else(|| anyhow!("sock_diag gives no inode for the socket file {name}"))?;
    let md = fs::symlink_metadata(name).with_context(|| format!("socket file {name} is gone: not supported"))?;
    // unix_diag gives the inode and a 32-bit kernel dev_t (MAJOR << 20 | MINOR).
    let kdev = ((libc::major(md.dev()) as u64) << 20) | libc::minor(md.dev()) as u64;
    ensure!(
        md.ino() == vino && kdev == vdev,
        "{name} is not the socket's file any more (inode {} there, the socket's is {vino}): not supported",
        md.ino()
    );
    Ok(SockFile { mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid() })
}

fn dump_listen(p: &Probe, sh: &mut DumpShared, d: &UnixDiag) -> Result<FileKind> {
    let name = stored_name(&d.name)?;
    ensure!(!name.is_empty(), "listening Unix socket without a name: not supported yet");
    let (_, backlog) = d.rqlen.ok_or_else(|| anyhow!("sock_diag gave no backlog"))?;
    let mut pending = Vec::new();
    for &c in &d.icons {
        let what = format!("listening Unix socket {}: a connection waiting in its backlog", show_name(&d.name));
        ensure!(c != 0, "{what} comes from a client that has closed: not supported");
        let cd = diag::query(c)?.ok_or_else(|| anyhow!("{what}, from socket inode {c}, is unknown to sock_diag"))?;
        check_in_dump(sh, c, &format!("its client, Unix socket inode {c} ({})", show_name(&cd.name)))
            .with_context(|| what.clone())?;
        pending.push(PendingConn { ino: c, name: stored_name(&cd.name).with_context(|| what.clone())? });
    }
    let f = if name.starts_with('@') { SockFile { mode: 0o777, uid: 0, gid: 0 } } else { sock_file(&name, d.vfs)? };
    Ok(FileKind::UnixListen {
        ino: d.ino,
        sock_type: d.sock_type,
        name,
        backlog: backlog as u64,
        mode: f.mode,
        uid: f.uid,
        gid: f.gid,
        opts: read_opts(p.ours)?,
        pending,
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

/// The socket `ino` (described as `desc`) must be held by processes of the
/// dump and by nobody else.
/// Held by nobody: it may be in flight in a queue of the dump, which
/// `check_inflight` tells at the end.
fn check_in_dump(sh: &mut DumpShared, ino: u64, desc: &str) -> Result<()> {
    let all = holders(ino);
    let outside: Vec<String> = all.iter().filter(|&&h| !in_dump(h)).map(|h| h.to_string()).collect();
    if !outside.is_empty() {
        bail!("{desc} is held by process(es) outside the dump ({}): refusing", outside.join(", "));
    }
    if all.is_empty() {
        sh.unix_unheld.push((ino, desc.to_string()));
    }
    Ok(())
}

/// Save a receive queue as the blob of socket `ino`.
fn save_queue(sh: &mut DumpShared, ino: u64, data: Vec<u8>) {
    if !data.is_empty() {
        let blob = blob_name(ino);
        if sh.saved.insert(blob.clone()) {
            sh.blobs.push((blob, data));
        }
    }
}

fn dump_peer(p: &Probe, sh: &mut DumpShared, d: &UnixDiag) -> Result<FileKind> {
    let opts = read_opts(p.ours)?;
    let name = stored_name(&d.name)?;
    if d.peer == 0 {
        return dump_pending(p, sh, d, name, opts);
    }
    let pd = diag::query(d.peer)?.ok_or_else(|| anyhow!("its peer, Unix socket inode {}, is unknown to sock_diag", d.peer))?;
    let desc = format!("its peer Unix socket inode {} ({})", d.peer, show_name(&pd.name));
    let outside: Vec<String> = holders(d.peer).into_iter().filter(|&h| !in_dump(h)).map(|h| h.to_string()).collect();
    if !outside.is_empty() {
        if sh.ext_unix_sk {
            return dump_ext(p, d, &desc, name, stored_name(&pd.name).context("its peer's name")?, opts);
        }
        bail!(
            "{desc} is held by process(es) outside the dump ({}): refusing (with --ext-unix-sk a stream connection to a named socket outside is saved by that name and connected again at restore)",
            outside.join(", ")
        );
    }
    check_in_dump(sh, d.peer, &desc)?;
    if pd.peer != d.ino {
        bail!("its peer, Unix socket inode {}, is not connected back to it (a datagram socket connect()ed one way): not supported yet", d.peer);
    }
    let q = queue::read_queue(p.ours, d.sock_type as i32, opts.peek_off).context("reading the receive queue")?;
    let peer_raw = raw_of(&pd.name);
    if let Some(s) = q.senders.iter().find(|s| **s != peer_raw) {
        bail!("a datagram from {}, not its peer {}, is queued: not supported", show(s), show(&peer_raw));
    }
    let dgram = d.sock_type as i32 == libc::SOCK_DGRAM;
    let file = if dgram && name.starts_with('/') { Some(sock_file(&name, d.vfs)?) } else { None };
    let rcvq = q.data.len() as u64;
    save_queue(sh, d.ino, q.data);
    let scm = take_files(sh, q.fds);
    Ok(FileKind::UnixPeer {
        ino: d.ino,
        peer: d.peer,
        sock_type: d.sock_type,
        name,
        peer_name: stored_name(&pd.name).context("its peer's name")?,
        listener: 0,
        rcvq,
        msgs: q.msgs,
        shutdown: d.shutdown,
        opts,
        file,
        scm,
        ext: false,
    })
}

/// A connected socket without a peer inode: a client whose connection
/// waits in a listener's backlog (the server end has no inode yet), or one
/// whose peer has closed.
fn dump_pending(p: &Probe, sh: &mut DumpShared, d: &UnixDiag, name: String, opts: UnixOpts) -> Result<FileKind> {
    let ty = type_name(d.sock_type);
    let all = diag::query_all().context("listing Unix sockets")?;
    let Some(l) = all.iter().find(|l| l.state == TCP_LISTEN && l.icons.contains(&d.ino)) else {
        bail!("connected Unix {ty} socket whose peer is closed: not supported yet");
    };
    let what = format!("its connection waits in the backlog of the listener {} (inode {})", show_name(&l.name), l.ino);
    let ldesc = format!("the listener {} (inode {})", show_name(&l.name), l.ino);
    if sh.ext_unix_sk && holders(l.ino).iter().any(|&h| !in_dump(h)) {
        return dump_ext(p, d, &ldesc, name, stored_name(&l.name)?, opts);
    }
    check_in_dump(sh, l.ino, &ldesc).with_context(|| what.clone())?;
    let (inq, outq) = d.rqlen.unwrap_or((0, 0));
    if outq > 0 {
        bail!("{what} and it already sent data there (about {outq} bytes): the server end cannot be read without accepting it; not supported");
    }
    ensure!(inq == 0, "{what}, yet {inq} bytes are queued to it");
    ensure!(!name.starts_with('/'), "{what} and it is bound to the path {name}: not supported");
    Ok(FileKind::UnixPeer {
        ino: d.ino,
        peer: 0,
        sock_type: d.sock_type,
        name,
        peer_name: stored_name(&l.name)?,
        listener: l.ino,
        rcvq: 0,
        msgs: Vec::new(),
        shutdown: d.shutdown,
        opts,
        file: None,
        scm: Vec::new(),
        ext: false,
    })
}

/// `--ext-unix-sk`: a connection to `peer_name`, a named socket outside the
/// dump (`desc`), saved by that name to be connected to again at restore.
fn dump_ext(p: &Probe, d: &UnixDiag, desc: &str, name: String, peer_name: String, opts: UnixOpts) -> Result<FileKind> {
    let what = format!("{desc} is outside the dump (--ext-unix-sk)");
    ensure!(d.sock_type as i32 != libc::SOCK_DGRAM, "{what}: only stream and seqpacket connections are connected again");
    ensure!(!peer_name.is_empty(), "{what}, and unnamed: nothing to connect to at restore; refusing");
    ensure!(!name.starts_with('/'), "{what}, and this socket is bound to the path {name}: not supported");
    let q = queue::read_queue(p.ours, d.sock_type as i32, opts.peek_off).context("reading the receive queue")?;
    ensure!(
        q.data.is_empty(),
        "{what}, and {} bytes it sent are queued to this socket: they cannot be put back on a new connection; refusing",
        q.data.len()
    );
    Ok(FileKind::UnixPeer {
        ino: d.ino,
        peer: d.peer,
        sock_type: d.sock_type,
        name,
        peer_name,
        listener: 0,
        rcvq: 0,
        msgs: Vec::new(),
        shutdown: d.shutdown,
        opts,
        file: None,
        scm: Vec::new(),
        ext: true,
    })
}

/// Neither connected nor listening: fresh, or bound (a datagram socket
/// receiving on its name).
fn dump_lone(p: &Probe, sh: &mut DumpShared, d: &UnixDiag) -> Result<FileKind> {
    let name = stored_name(&d.name)?;
    let file = if name.is_empty() || name.starts_with('@') { None } else { Some(sock_file(&name, d.vfs)?) };
    let opts = read_opts(p.ours)?;
    let q = queue::read_queue(p.ours, d.sock_type as i32, opts.peek_off).context("reading the receive queue")?;
    ensure!(
        q.data.is_empty() || !name.is_empty(),
        "an unnamed, unconnected Unix socket has {} bytes queued (from a peer since gone): not supported",
        q.data.len()
    );
    let Queue { data, msgs, senders, fds } = q;
    let scm = take_files(sh, fds);
    let senders = senders.iter().map(|s| stored_name(s).context("a queued datagram's sender")).collect::<Result<Vec<_>>>()?;
    let rcvq = data.len() as u64;
    save_queue(sh, d.ino, data);
    Ok(FileKind::UnixLone { ino: d.ino, sock_type: d.sock_type, name, file, rcvq, msgs, senders, shutdown: d.shutdown, opts, scm })
}

// ------------------------------------------------------------------ restore

/// The end of a pair created for the first end seen, kept for its peer's
/// description.
pub struct Held {
    /// The peer's end, handed out when its description is restored.
    end: OwnedFd,
    /// A duplicate of the first end: the peer's queue is written into it.
    first: OwnedFd,
}

/// Writing a saved queue back, given the restored files (by id) and the
/// restored named datagram sockets.
type Fill = Box<dyn FnOnce(&HashMap<u32, OwnedFd>, &HashMap<Vec<u8>, OwnedFd>) -> Result<()>>;

/// Unix sockets made ahead of their descriptions during one restore, and
/// the work left for the end.
#[derive(Default)]
pub struct Restoring {
    /// Ends of pairs waiting for their description, by socket inode.
    held: HashMap<u64, Held>,
    /// Clients connected into a restored listener's backlog, by inode.
    pending: HashMap<u64, OwnedFd>,
    /// Restored datagram sockets bound to a name (raw bytes): saved
    /// datagrams from that name are sent from them.
    bound: HashMap<Vec<u8>, OwnedFd>,
    /// Queues to write back once every file exists (files in flight go
    /// with them), in order.
    fills: Vec<Fill>,
    /// Options and shutdown bits, set after every queue is written (a
    /// filled sender's buffer was raised; a shut-down end cannot send).
    settles: Vec<Box<dyn FnOnce() -> Result<()>>>,
}

impl Restoring {
    /// Every socket made ahead was claimed by its description.
    pub fn check_done(&self) -> Result<()> {
        if let Some(ino) = self.held.keys().next() {
            bail!("files image has no description for Unix socket inode {ino}, the peer of a restored socket");
        }
        if let Some(ino) = self.pending.keys().next() {
            bail!("files image has no description for Unix socket inode {ino}, waiting in a restored listener's backlog");
        }
        Ok(())
    }

    /// Write every saved queue back, then set options and shutdown bits.
    /// `files`: every restored open file, by id.
    pub fn finish(&mut self, files: &HashMap<u32, OwnedFd>) -> Result<()> {
        self.check_done()?;
        for f in self.fills.drain(..) {
            f(files, &self.bound)?;
        }
        for s in self.settles.drain(..) {
            s()?;
        }
        Ok(())
    }

    fn settle(&mut self, what: String, fd: &OwnedFd, opts: &UnixOpts, sd: u32) -> Result<()> {
        let fd = fd.try_clone().with_context(|| format!("{what}: dup"))?;
        let opts = opts.clone();
        self.settles.push(Box::new(move || {
            set_opts(fd.as_fd(), &opts).with_context(|| format!("{what}: options"))?;
            shutdown(fd.as_fd(), sd).with_context(|| format!("{what}: shutdown state"))
        }));
        Ok(())
    }
}

/// Which restore pass a description belongs to (see the module comment).
pub fn restore_pass(of: &OpenFile) -> u8 {
    match &of.kind {
        FileKind::UnixPeer { listener: 0, ext: false, .. } => 0,
        FileKind::UnixListen { .. } | FileKind::UnixLone { .. } => 1,
        _ => 2,
    }
}

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

fn shutdown(fd: BorrowedFd<'_>, bits: u32) -> Result<()> {
    let how = match bits & 3 {
        0 => return Ok(()),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    sys::shutdown(fd, how).with_context(|| format!("shutdown({how})"))?;
    Ok(())
}

/// Bind `fd` to its own name for real: a stale socket file at a path is
/// removed first (anything else there is an error), then the file gets its
/// saved mode and owner.
fn bind_real(fd: BorrowedFd<'_>, name: &str, file: Option<&SockFile>) -> Result<()> {
    if !name.starts_with('@') {
        ensure!(name.starts_with('/'), "{name}: not an absolute path");
        match fs::symlink_metadata(name) {
            Ok(md) if md.file_type().is_socket() => fs::remove_file(name).context("removing the stale socket file")?,
            Ok(_) => bail!("{name} exists and is not a socket; not replacing it"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("stat {name}")),
        }
    }
    sys::bind(fd, &named::raw(name)).with_context(|| format!("bind to {name}"))?;
    if let (false, Some(f)) = (name.starts_with('@'), file) {
        fs::set_permissions(name, fs::Permissions::from_mode(f.mode)).with_context(|| format!("chmod {:o} {name}", f.mode))?;
        std::os::unix::fs::lchown(name, Some(f.uid), Some(f.gid)).with_context(|| format!("chown {}:{} {name}", f.uid, f.gid))?;
    }
    Ok(())
}

fn read_queue_blob(ctx: &RestoreCtx, ino: u64, rcvq: u64) -> Result<Vec<u8>> {
    let data = if rcvq > 0 {
        let b = blob_name(ino);
        (ctx.read_blob)(&b).with_context(|| format!("reading blob {b}"))?
    } else {
        Vec::new()
    };
    ensure!(data.len() as u64 == rcvq, "blob has {} bytes, the image says {rcvq}", data.len());
    Ok(data)
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    match &of.kind {
        FileKind::UnixListen { .. } => restore_listen(of, ctx),
        FileKind::UnixPeer { ext: true, .. } => restore_ext(of, ctx),
        FileKind::UnixPeer { listener: 0, .. } => restore_peer(of, ctx),
        FileKind::UnixPeer { .. } => restore_pending(of, ctx),
        FileKind::UnixLone { .. } => restore_lone(of, ctx),
        _ => bail!("not a Unix socket"),
    }
}

/// The two ends of a new connection between this socket (named `name`)
/// and its peer (`peer_name`): (this end, peer's end).
fn make_pair(t: u32, name: &str, peer_name: &str, file: Option<&SockFile>) -> Result<(OwnedFd, OwnedFd)> {
    let ty = sock_type(t)?;
    if name.is_empty() && peer_name.is_empty() {
        return socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC).context("socketpair");
    }
    if ty == SockType::Datagram {
        // Datagram names are the sockets' own: bound for real, after the
        // pair is made. (The peer's socket file is set by its own
        // description; only the name is needed here.)
        let (a, b) = socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC).context("socketpair")?;
        if !name.is_empty() {
            bind_real(a.as_fd(), name, file)?;
        }
        if !peer_name.is_empty() {
            bind_real(b.as_fd(), peer_name, None)?;
        }
        return Ok((a, b));
    }
    // One end took its name from a listener (it was accepted); the other,
    // if named, bound it itself. Either choice gives both their names.
    if !name.is_empty() {
        named::named_pair(ty, &named::raw(name), &named::raw(peer_name))
    } else {
        let (acc, con) = named::named_pair(ty, &named::raw(peer_name), &[])?;
        Ok((con, acc))
    }
}

fn restore_peer(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::UnixPeer { ino, peer, sock_type: t, name, peer_name, rcvq, msgs, shutdown: sd, opts, file, scm, .. } = &of.kind else {
        bail!("not a connected Unix socket")
    };
    let what = format!("Unix socket inode {ino} (peer {peer})");
    let data = read_queue_blob(ctx, *ino, *rcvq).with_context(|| what.clone())?;
    let stream = *t as i32 == libc::SOCK_STREAM;
    let (fd, tx) = if let Some(h) = ctx.unix.held.remove(ino) {
        // The pair exists: our queue goes in through the first end.
        if let (Some(f), false) = (file, name.starts_with('@')) {
            fs::set_permissions(name, fs::Permissions::from_mode(f.mode)).with_context(|| format!("{what}: chmod {:o} {name}", f.mode))?;
            std::os::unix::fs::lchown(name, Some(f.uid), Some(f.gid)).with_context(|| format!("{what}: chown {name}"))?;
        }
        (h.end, h.first)
    } else {
        let (a, b) = make_pair(*t, name, peer_name, file.as_ref())
            .with_context(|| format!("{what}: connecting {} to {}", show(&named::raw(name)), show(&named::raw(peer_name))))?;
        if *t as i32 == libc::SOCK_DGRAM {
            for (n, f) in [(name, &a), (peer_name, &b)] {
                if !n.is_empty() {
                    ctx.unix.bound.insert(named::raw(n), f.try_clone().with_context(|| format!("{what}: dup"))?);
                }
            }
        }
        let tx = b.try_clone().with_context(|| format!("{what}: dup"))?;
        let first = a.try_clone().with_context(|| format!("{what}: dup"))?;
        ctx.unix.held.insert(*peer, Held { end: b, first });
        (a, tx)
    };
    if !data.is_empty() {
        let (msgs, scm, w) = (msgs.clone(), scm.clone(), what.clone());
        ctx.unix.fills.push(Box::new(move |out, _| {
            let files = files_of(&scm, out).with_context(|| w.clone())?;
            queue::fill(tx.as_fd(), &data, &msgs, stream, &files).with_context(|| w.clone())
        }));
    }
    ctx.unix.settle(what.clone(), &fd, opts, *sd)?;
    set_flags(fd.as_fd(), of.flags).with_context(|| what.clone())?;
    Ok(fd)
}

/// A connection to a server outside the image (`--ext-unix-sk`): a new
/// socket connects to its name.
fn restore_ext(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::UnixPeer { ino, sock_type: t, name, peer_name, shutdown: sd, opts, .. } = &of.kind else {
        bail!("not a connected Unix socket")
    };
    let what = format!("Unix socket inode {ino}, connected to {peer_name} outside the image");
    ensure!(ctx.ext_unix_sk, "{what}: restore with --ext-unix-sk to connect it again (the outside server must be listening)");
    let fd = socket(AddressFamily::Unix, sock_type(*t)?, SockFlag::SOCK_CLOEXEC, None).with_context(|| format!("{what}: socket"))?;
    if !name.is_empty() {
        ensure!(name.starts_with('@'), "{what}: bound to a path: not supported");
        sys::bind(fd.as_fd(), &named::raw(name)).with_context(|| format!("{what}: bind to {name}"))?;
    }
    sys::connect(fd.as_fd(), &named::raw(peer_name)).with_context(|| format!("{what}: connecting to {peer_name} (is the server running?)"))?;
    ctx.unix.settle(what.clone(), &fd, opts, *sd)?;
    set_flags(fd.as_fd(), of.flags).with_context(|| what.clone())?;
    Ok(fd)
}

/// A client whose connection waits in a listener's backlog: connected by
/// the listener's restore already.
fn restore_pending(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::UnixPeer { ino, listener, peer_name, shutdown: sd, opts, .. } = &of.kind else {
        bail!("not a connected Unix socket")
    };
    let what = format!("Unix socket inode {ino}, waiting in the backlog of {peer_name} (inode {listener})");
    let fd = ctx.unix.pending.remove(ino).ok_or_else(|| anyhow!("{what}: the files image has no such listener with it"))?;
    ctx.unix.settle(what.clone(), &fd, opts, *sd)?;
    set_flags(fd.as_fd(), of.flags).with_context(|| what.clone())?;
    Ok(fd)
}

fn restore_listen(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::UnixListen { ino, sock_type: t, name, backlog, mode, uid, gid, opts, pending } = &of.kind else {
        bail!("not a listening Unix socket")
    };
    let what = format!("listening Unix socket {name} (inode {ino})");
    let ty = sock_type(*t)?;
    let fd = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).with_context(|| format!("{what}: socket"))?;
    let f = SockFile { mode: *mode, uid: *uid, gid: *gid };
    bind_real(fd.as_fd(), name, Some(&f)).with_context(|| what.clone())?;
    set_opts(fd.as_fd(), opts).with_context(|| what.clone())?;
    let bl = i32::try_from(*backlog).unwrap_or(i32::MAX);
    // Room for the waiting connections first, then the saved backlog.
    let room = bl.max(pending.len() as i32);
    sys::listen(fd.as_fd(), room).with_context(|| format!("{what}: listen({room})"))?;
    for c in pending {
        let cw = format!("{what}: client inode {} waiting in its backlog", c.ino);
        let s = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).with_context(|| format!("{cw}: socket"))?;
        if !c.name.is_empty() {
            ensure!(c.name.starts_with('@'), "{cw}: bound to a path: not supported");
            sys::bind(s.as_fd(), &named::raw(&c.name)).with_context(|| format!("{cw}: bind to {}", c.name))?;
        }
        sys::connect(s.as_fd(), &named::raw(name)).with_context(|| format!("{cw}: connect"))?;
        ensure!(ctx.unix.pending.insert(c.ino, s).is_none(), "{cw}: listed twice");
    }
    if room != bl {
        sys::listen(fd.as_fd(), bl).with_context(|| format!("{what}: listen({bl})"))?;
    }
    set_flags(fd.as_fd(), of.flags).with_context(|| what.clone())?;
    Ok(fd)
}

fn restore_lone(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::UnixLone { ino, sock_type: t, name, file, rcvq, msgs, senders, shutdown: sd, opts, scm } = &of.kind else {
        bail!("not an unconnected Unix socket")
    };
    let what = format!("Unix socket inode {ino} ({})", show(&named::raw(name)));
    let fd = socket(AddressFamily::Unix, sock_type(*t)?, SockFlag::SOCK_CLOEXEC, None).with_context(|| format!("{what}: socket"))?;
    if !name.is_empty() {
        bind_real(fd.as_fd(), name, file.as_ref()).with_context(|| what.clone())?;
    }
    let data = read_queue_blob(ctx, *ino, *rcvq).with_context(|| what.clone())?;
    if !data.is_empty() {
        ensure!(!name.is_empty(), "{what}: queued data but no name to send it to");
        let senders: Vec<Vec<u8>> = senders.iter().map(|s| named::raw(s)).collect();
        let (to, msgs, scm, w) = (named::raw(name), msgs.clone(), scm.clone(), what.clone());
        ctx.unix.fills.push(Box::new(move |out, bound| {
            let files = files_of(&scm, out).with_context(|| w.clone())?;
            named::send_datagrams(&to, &data, &msgs, &senders, bound, &files)
                .with_context(|| format!("{w}: refilling its {} queued datagrams", msgs.len()))
        }));
    }
    ctx.unix.settle(what.clone(), &fd, opts, *sd)?;
    if *t as i32 == libc::SOCK_DGRAM && !name.is_empty() {
        ctx.unix.bound.insert(named::raw(name), fd.try_clone().with_context(|| format!("{what}: dup"))?);
    }
    set_flags(fd.as_fd(), of.flags).with_context(|| what.clone())?;
    Ok(fd)
}
