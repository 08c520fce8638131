//! Receive queues of Unix sockets: read at dump without consuming them,
//! written back at restore through a sending socket.
//!
//! Dump: SO_PEEK_OFF set to 0 on snap's copy, recvmsg(MSG_PEEK) message by
//! message (with the sender's address), SO_PEEK_OFF put back to the
//! target's value. Restore: each message is sent again, from a socket with
//! the right address where the sender had one (`unix_named.rs`).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::errno::Errno;

use super::sys;
use super::DumpShared;
use crate::images::records::{FileKind, ScmFiles};

/// A receive queue as read at dump.
#[derive(Debug, Default)]
pub struct Queue {
    pub data: Vec<u8>,
    /// Message lengths (datagram and seqpacket sockets), in order.
    pub msgs: Vec<u64>,
    /// The sender of each message of a datagram socket: raw sun_path bytes,
    /// empty for an unnamed sender.
    pub senders: Vec<Vec<u8>>,
    /// Files in flight (SCM_RIGHTS), snap's duplicates, by message index
    /// (on a stream, `msgs` then holds the lengths of the runs read).
    pub fds: Vec<(usize, Vec<OwnedFd>)>,
}

/// The receive queue of our copy of a socket, left in place.
pub fn read_queue(fd: BorrowedFd<'_>, ty: i32, orig_peek_off: i64) -> Result<Queue> {
    let total = sys::fionread(fd).context("FIONREAD")?;
    // A datagram socket's FIONREAD is the first message's length only.
    if total == 0 && ty != libc::SOCK_DGRAM {
        return Ok(Queue::default());
    }
    sys::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).context("setting SO_PEEK_OFF to 0")?;
    let r = peek_all(fd, ty, total);
    let back = sys::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, orig_peek_off as i32)
        .with_context(|| format!("putting SO_PEEK_OFF back to {orig_peek_off}"));
    let out = r?;
    back?;
    Ok(out)
}

/// More messages than this in one queue: something is wrong (a message we
/// cannot peek past).
const MAX_MSGS: usize = 1 << 20;

fn peek_all(fd: BorrowedFd<'_>, ty: i32, total: usize) -> Result<Queue> {
    let stream = ty == libc::SOCK_STREAM;
    let cap = if ty == libc::SOCK_DGRAM { 4 << 20 } else { total };
    let mut buf = vec![0u8; cap];
    let mut q = Queue::default();
    loop {
        if stream && q.data.len() >= total {
            break;
        }
        ensure!(q.msgs.len() < MAX_MSGS, "more than {MAX_MSGS} queued messages");
        let p = match sys::peek(fd, &mut buf) {
            Ok(v) => v,
            Err(Errno::EAGAIN) => break,
            Err(e) => return Err(e).context("recvmsg(MSG_PEEK)"),
        };
        if p.other {
            bail!("a queued message carries control data other than descriptors and credentials: not supported");
        }
        if let Some(c) = p.creds {
            bail!(
                "a queued message carries its sender's credentials (SCM_CREDENTIALS, pid {} uid {} gid {}; SO_PASSCRED is on): not supported",
                c.pid,
                c.uid,
                c.gid
            );
        }
        ensure!(!p.trunc, "a queued message is larger than {} bytes", buf.len());
        if p.len == 0 {
            if stream {
                break;
            }
            bail!("a zero-length message is queued: not supported");
        }
        q.data.extend_from_slice(&buf[..p.len]);
        if !p.fds.is_empty() {
            q.fds.push((q.msgs.len(), p.fds));
        }
        q.msgs.push(p.len as u64);
        if ty == libc::SOCK_DGRAM {
            q.senders.push(super::unix_named::trim(&p.addr));
        }
        if ty == libc::SOCK_SEQPACKET && q.data.len() >= total {
            break;
        }
    }
    if stream && q.fds.is_empty() {
        q.msgs.clear(); // one run of bytes
    }
    if ty != libc::SOCK_DGRAM {
        ensure!(
            q.data.len() == total,
            "read {} of the {total} queued bytes (out-of-band data or a message boundary we cannot read through)",
            q.data.len()
        );
    }
    Ok(q)
}

/// Raise `tx`'s send buffer so `bytes` in `msgs` messages fit at once (skb
/// overhead included); the sender's own SO_SNDBUF is set afterwards.
pub fn make_room(tx: BorrowedFd<'_>, bytes: usize, msgs: usize) -> Result<()> {
    let room = bytes * 2 + msgs * 2048 + (1 << 20);
    super::unix_diag::set_buf(tx, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, room as u64 * 2).context("raising SO_SNDBUF to fill")?;
    Ok(())
}

/// Message lengths of a saved queue, checked against its bytes.
pub fn lengths(data: &[u8], msgs: &[u64], stream: bool) -> Result<Vec<usize>> {
    let lens: Vec<usize> = if stream && msgs.is_empty() { vec![data.len()] } else { msgs.iter().map(|&m| m as usize).collect() };
    ensure!(lens.iter().sum::<usize>() == data.len(), "message lengths do not add up to the {} saved bytes", data.len());
    Ok(lens)
}

/// Files to send with message `i` of a queue.
pub type FilesOf<'a> = dyn Fn(usize) -> Vec<BorrowedFd<'a>> + 'a;

/// Write a saved receive queue into the sending end `tx` of a connection,
/// with the files in flight of each message.
pub fn fill(tx: BorrowedFd<'_>, data: &[u8], msgs: &[u64], stream: bool, files: &FilesOf<'_>) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    make_room(tx, data.len(), msgs.len())?;
    let mut off = 0;
    for (i, len) in lengths(data, msgs, stream)?.into_iter().enumerate() {
        send_one(tx, &data[off..off + len], None, stream, &files(i))
            .with_context(|| format!("writing {} queued bytes (at {off})", data.len()))?;
        off += len;
    }
    Ok(())
}

/// Send one message (or, on a stream, all of `msg`) without blocking; the
/// files go with its first byte.
pub fn send_one(tx: BorrowedFd<'_>, msg: &[u8], to: Option<&[u8]>, stream: bool, files: &[BorrowedFd<'_>]) -> Result<()> {
    let mut off = 0;
    while off < msg.len() {
        let f = if off == 0 { files } else { &[] };
        match sys::send_msg(tx, &msg[off..], f, to, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(n) => {
                ensure!(stream || n == msg.len(), "sent {n} of a {}-byte message", msg.len());
                off += n;
            }
            Err(Errno::EAGAIN) => bail!("the receiving queue is full (fd {})", tx.as_raw_fd()),
            Err(e) => return Err(e).context("sendmsg"),
        }
    }
    Ok(())
}

// ------------------------------------------------------- files in flight

/// At the end of a dump: every socket held by no process must have been
/// found in flight in a queue of the dump.
pub fn check_inflight(sh: &DumpShared) -> Result<()> {
    for (ino, desc) in &sh.unix_unheld {
        if !sh.unix_inflight.contains(ino) {
            bail!("{desc} is not held by any process of the dump nor in flight in its queues (outside the dump?): refusing");
        }
    }
    Ok(())
}

/// Hand the files in flight of a queue to the dump (`DumpShared::inflight`)
/// and describe them by their slots there; `resolve_inflight` turns the
/// slots into open file ids.
pub fn take_files(sh: &mut DumpShared, fds: Vec<(usize, Vec<OwnedFd>)>) -> Vec<ScmFiles> {
    let mut out = Vec::new();
    for (msg, v) in fds {
        let mut files = Vec::new();
        for f in v {
            files.push(sh.inflight.len() as u32);
            sh.inflight.push(f);
        }
        out.push(ScmFiles { msg: msg as u32, files });
    }
    out
}

/// Replace the slots of `take_files` by the ids of the open files.
pub fn resolve_inflight(kind: &mut FileKind, ids: &[u32]) -> Result<()> {
    if let FileKind::UnixPeer { scm, .. } | FileKind::UnixLone { scm, .. } = kind {
        for f in scm.iter_mut().flat_map(|s| s.files.iter_mut()) {
            *f = *ids.get(*f as usize).ok_or_else(|| anyhow!("file in flight slot {f} out of range"))?;
        }
    }
    Ok(())
}

/// The files in flight with each message, as restored files.
pub fn files_of<'a>(scm: &'a [ScmFiles], out: &'a HashMap<u32, OwnedFd>) -> Result<impl Fn(usize) -> Vec<BorrowedFd<'a>> + 'a> {
    for id in scm.iter().flat_map(|s| &s.files) {
        ensure!(out.contains_key(id), "open file {id}, in flight in the queue, is not in the files image");
    }
    Ok(move |i: usize| scm.iter().filter(|s| s.msg as usize == i).flat_map(|s| s.files.iter().map(|id| out[id].as_fd())).collect())
}

