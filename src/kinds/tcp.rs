//! Established TCP connections, with TCP repair (`dump --tcp-established`).
//!
//! Dump, on snap's copy of the socket (same socket as the target's): the
//! network lock (`inet::NetLock`) already drops the connection's packets;
//! TCP_REPAIR on, which freezes the connection: nothing is sent, and close
//! sends neither FIN nor RST. Then read both queues' sequence numbers
//! (TCP_REPAIR_QUEUE + TCP_QUEUE_SEQ), their bytes (recv MSG_PEEK per queue
//! in repair mode; sizes from SIOCINQ / SIOCOUTQ, unsent part SIOCOUTQNSD),
//! MSS, the options negotiated at the handshake (TCP_INFO), the windows
//! (TCP_REPAIR_WINDOW) and the timestamp clock (TCP_TIMESTAMP). snap keeps
//! its copy in repair mode (`Repaired`) until the processes are killed; with
//! --leave-running, or when the dump fails, repair mode is left again.
//!
//! Restore, in snap's own process: a socket in repair mode, bound to the
//! saved local address (repair mode forces address reuse), both queues'
//! sequence numbers set, connect (no SYN in repair mode), the options, the
//! receive queue and the sent-but-unacknowledged part of the send queue
//! refilled, the windows. The socket stays in repair mode until every
//! process is ready (`leave_repair`): only then is it live, the unsent
//! bytes queued normally, and the network lock removed.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Context, Result};

use super::{inet, sys, DumpShared, Probe, RestoreCtx};
use crate::images::records::{FileKind, FilesImage, InetOpts, OpenFile, TcpRepair};

const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCP_REPAIR_ON: i32 = 1;
const TCP_REPAIR_OFF: i32 = 0;
const SIOCINQ: libc::Ioctl = libc::FIONREAD;
const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;
const SIOCOUTQNSD: libc::Ioctl = 0x894B;
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u64 = 1;
const TCPI_OPT_SACK: u64 = 2;
const TCPI_OPT_WSCALE: u64 = 4;

/// snap's copies of the dumped connections, in repair mode. Dropped as is,
/// each leaves repair mode again (and gets its SO_REUSEADDR back, which
/// leaving repair mode clears): the dump failed or the processes go on.
/// `forget` closes them still in repair mode: nothing is sent.
#[derive(Default)]
pub struct Repaired(Vec<(OwnedFd, bool)>);

impl Repaired {
    pub fn forget(mut self) {
        self.0.clear();
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Repaired {
    fn drop(&mut self) {
        for (fd, reuse) in self.0.drain(..) {
            let b = fd.as_fd();
            if let Err(e) = sys::set_int(b, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_OFF) {
                eprintln!("snap: warning: a dumped TCP connection did not leave repair mode: {e}");
            }
            if reuse {
                let _ = sys::set_int(b, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
            }
        }
    }
}

fn set(fd: BorrowedFd<'_>, opt: i32, v: i32, name: &str) -> Result<()> {
    sys::set_int(fd, libc::IPPROTO_TCP, opt, v).with_context(|| format!("setsockopt {name} {v}"))
}

fn get(fd: BorrowedFd<'_>, opt: i32, name: &str) -> Result<i32> {
    sys::get_int(fd, libc::IPPROTO_TCP, opt).with_context(|| format!("getsockopt {name}"))
}

/// Exactly `len` bytes of the queue selected with TCP_REPAIR_QUEUE.
fn peek_queue(fd: BorrowedFd<'_>, len: usize, which: &str) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len + 1];
    let n = sys::recv_peek(fd, &mut buf).with_context(|| format!("reading the {which} queue (recv MSG_PEEK in repair mode)"))?;
    if n != len {
        bail!("the {which} queue holds {len} bytes but {n} could be read");
    }
    buf.truncate(n);
    Ok(buf)
}

pub fn dump(p: &Probe, sh: &mut DumpShared, family: i32, local: SocketAddr, peer: SocketAddr, opts: InetOpts) -> Result<FileKind> {
    if !sh.tcp_established {
        bail!("established TCP connection {local} -> {peer}: dumping it needs --tcp-established");
    }
    if !sh.tcp_locked.contains(&(local, peer)) {
        bail!("TCP connection {local} -> {peer} was not established when the dump began (or is in flight in a Unix socket's queue): it is not covered by the network lock; dump again");
    }
    let fd = p.ours.try_clone_to_owned().context("dup")?;
    set(fd.as_fd(), libc::TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR")?;
    sh.repair.0.push((fd, opts.reuseaddr));
    let fd = sh.repair.0.last().expect("just pushed").0.as_fd();
    let ti = inet::tcp_info(fd).context("TCP_INFO")?;
    if ti.state != inet::TCP_ESTABLISHED {
        bail!("TCP connection {local} -> {peer} left ESTABLISHED ({}) while being dumped", inet::tcp_state_name(ti.state));
    }
    let mss = get(fd, libc::TCP_MAXSEG, "TCP_MAXSEG")?;

    set(fd, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    let rcv_seq = get(fd, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (receive)")? as u32;
    let inq = sys::ioctl_get_int(fd, SIOCINQ).context("SIOCINQ")?.max(0) as usize;
    let inq_data = peek_queue(fd, inq, "receive")?;

    set(fd, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    let snd_seq = get(fd, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ (send)")? as u32;
    let outq = sys::ioctl_get_int(fd, SIOCOUTQ).context("SIOCOUTQ")?.max(0) as usize;
    let unsent = sys::ioctl_get_int(fd, SIOCOUTQNSD).context("SIOCOUTQNSD")?.max(0) as usize;
    let outq_data = peek_queue(fd, outq, "send")?;
    set(fd, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")?;

    let timestamp = get(fd, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")? as u32;
    let mut wb = [0u8; 20];
    let window = match sys::get_bytes(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &mut wb) {
        Ok(20) => {
            let w = |i: usize| u32::from_ne_bytes(wb[i * 4..i * 4 + 4].try_into().expect("4")) as u64;
            Some([w(0), w(1), w(2), w(3), w(4)])
        }
        _ => None,
    };
    let sndbuf = sys::get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).context("SO_SNDBUF")?.max(0) as u64;
    let rcvbuf = sys::get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).context("SO_RCVBUF")?.max(0) as u64;
    let ino = p.st.st_ino;
    for (data, ext) in [(inq_data, "inq"), (outq_data, "outq")] {
        if !data.is_empty() {
            sh.blobs.push((format!("tcp-{ino}.{ext}"), data));
        }
    }
    Ok(FileKind::TcpConn {
        family: family as u32,
        local: local.to_string(),
        peer: peer.to_string(),
        opts,
        tcp: TcpRepair {
            ino,
            snd_seq: snd_seq as u64,
            rcv_seq: rcv_seq as u64,
            inq: inq as u64,
            outq: outq as u64,
            unsent: unsent.min(outq) as u64,
            mss: mss as u64,
            options: ti.options as u64,
            snd_wscale: ti.snd_wscale as u64,
            rcv_wscale: ti.rcv_wscale as u64,
            timestamp: timestamp as u64,
            window,
            sndbuf,
            rcvbuf,
        },
    })
}

fn blob(ctx: &RestoreCtx, ino: u64, ext: &str, len: u64) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let name = format!("tcp-{ino}.{ext}");
    let d = (ctx.read_blob)(&name)?;
    anyhow::ensure!(d.len() as u64 == len, "blob {name} has {} bytes, the record says {len}", d.len());
    Ok(d)
}

/// Send all of `data` on the queue selected (repair mode) or normally.
fn send_all(fd: BorrowedFd<'_>, data: &[u8], flags: i32, which: &str) -> Result<()> {
    let mut off = 0;
    while off < data.len() {
        let end = (off + 64 * 1024).min(data.len());
        let n = sys::send_flags(fd, &data[off..end], flags).with_context(|| format!("refilling the {which} queue at byte {off}"))?;
        anyhow::ensure!(n > 0, "refilling the {which} queue: send returned 0 at byte {off}");
        off += n;
    }
    Ok(())
}

fn grow_buf(fd: BorrowedFd<'_>, opt: i32, force: i32, queued: u64, saved: u64) -> Result<()> {
    let now = sys::get_int(fd, libc::SOL_SOCKET, opt).context("getsockopt buffer size")?.max(0) as u64;
    if queued == 0 || queued * 2 <= now {
        return Ok(());
    }
    let v = (saved / 2).max(queued).min(i32::MAX as u64 / 2) as i32;
    sys::set_int(fd, libc::SOL_SOCKET, force, v).with_context(|| format!("setting a buffer of {v} bytes for a queue of {queued}"))
}

/// Recreate one established connection, left in repair mode.
pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::TcpConn { family, local, peer, opts, tcp: t } = &of.kind else { bail!("not a TCP connection") };
    let what = format!("TCP connection {local} -> {peer}");
    restore_inner(of, ctx, *family, local, peer, opts, t).with_context(|| what)
}

fn restore_inner(of: &OpenFile, ctx: &mut RestoreCtx, family: u32, local: &str, peer: &str, opts: &InetOpts, t: &TcpRepair) -> Result<OwnedFd> {
    let la = inet::parse_addr(local, family)?;
    let pa = inet::parse_addr(peer, family)?;
    anyhow::ensure!(t.inq <= 1 << 30 && t.outq <= 1 << 30 && t.unsent <= t.outq, "queue sizes out of range");
    let inq = blob(ctx, t.ino, "inq", t.inq)?;
    let outq = blob(ctx, t.ino, "outq", t.outq)?;
    let fd = inet::new_socket(family, true)?;
    let b = fd.as_fd();
    set(b, libc::TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR")?;
    if family == libc::AF_INET6 as u32 {
        sys::set_int(b, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, opts.v6only as i32).context("IPV6_V6ONLY")?;
    }
    inet::bind(b, &la)?;
    // Sequence numbers of the first byte of each queue as it will be refilled.
    set(b, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    set(b, libc::TCP_QUEUE_SEQ, (t.rcv_seq as u32).wrapping_sub(t.inq as u32) as i32, "TCP_QUEUE_SEQ (receive)")?;
    set(b, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    set(b, libc::TCP_QUEUE_SEQ, (t.snd_seq as u32).wrapping_sub(t.outq as u32) as i32, "TCP_QUEUE_SEQ (send)")?;
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        set(b, libc::TCP_TIMESTAMP, t.timestamp as u32 as i32, "TCP_TIMESTAMP")?;
    }
    // In repair mode connect sends no SYN: the socket is ESTABLISHED at once.
    inet::connect(b, &pa)?;
    let mut o: Vec<(u32, u32)> = vec![(TCPOPT_MSS, t.mss as u32)];
    if t.options & TCPI_OPT_WSCALE != 0 {
        o.push((TCPOPT_WINDOW, (t.snd_wscale as u32) | ((t.rcv_wscale as u32) << 16)));
    }
    if t.options & TCPI_OPT_SACK != 0 {
        o.push((TCPOPT_SACK_PERM, 0));
    }
    if t.options & TCPI_OPT_TIMESTAMPS != 0 {
        o.push((TCPOPT_TIMESTAMP, 0));
    }
    let bytes: Vec<u8> = o.iter().flat_map(|(c, v)| c.to_ne_bytes().into_iter().chain(v.to_ne_bytes())).collect();
    sys::set_bytes(b, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, &bytes).context("TCP_REPAIR_OPTIONS")?;
    // Queues that the new socket's default buffers would not hold get the
    // buffer sizes they had (which turns off the kernel's autotuning for
    // that buffer of this socket).
    grow_buf(b, libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, t.outq, t.sndbuf)?;
    grow_buf(b, libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, t.inq, t.rcvbuf)?;
    set(b, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    send_all(b, &inq, 0, "receive")?;
    // The part of the send queue the peer may have seen goes back as sent
    // (repair mode); the unsent rest is queued once the socket is live.
    set(b, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    send_all(b, &outq[..(t.outq - t.unsent) as usize], 0, "send")?;
    set(b, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    if let Some(w) = t.window {
        let wb: Vec<u8> = w.iter().flat_map(|&x| (x as u32).to_ne_bytes()).collect();
        sys::set_bytes(b, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &wb).context("TCP_REPAIR_WINDOW")?;
    }
    inet::set_opts(b, family, true, opts)?;
    inet::set_nonblock(b, of.flags)?;
    Ok(fd)
}

/// Restore, once every process is ready: the connections leave repair
/// mode (from here on they are live), get back the unsent bytes of their
/// send queues and SO_REUSEADDR. `fd_of`: snap's descriptor of an open
/// file, by id.
pub fn leave_repair<'a>(files: &FilesImage, fd_of: &dyn Fn(u32) -> Option<BorrowedFd<'a>>, read_blob: &dyn Fn(&str) -> Result<Vec<u8>>) -> Result<()> {
    for of in &files.files {
        let FileKind::TcpConn { local, peer, opts, tcp: t, .. } = &of.kind else { continue };
        let what = format!("open file {}: TCP connection {local} -> {peer}", of.id);
        let fd = fd_of(of.id).with_context(|| format!("{what}: not restored"))?;
        set(fd, libc::TCP_REPAIR, TCP_REPAIR_OFF, "TCP_REPAIR").with_context(|| what.clone())?;
        if t.unsent > 0 {
            let all = read_blob(&format!("tcp-{}.outq", t.ino))?;
            anyhow::ensure!(all.len() as u64 == t.outq, "{what}: send queue blob has {} bytes, the record says {}", all.len(), t.outq);
            send_all(fd, &all[(t.outq - t.unsent) as usize..], libc::MSG_DONTWAIT, "send (unsent part)").with_context(|| what.clone())?;
        }
        if opts.reuseaddr {
            sys::set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).with_context(|| format!("{what}: SO_REUSEADDR"))?;
        }
    }
    Ok(())
}
