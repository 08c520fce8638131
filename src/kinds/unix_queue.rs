//! Receive queues of Unix sockets: read at dump without consuming them,
//! written back at restore through a sending socket.
//!
//! Dump: SO_PEEK_OFF set to 0 on snap's copy, recvmsg(MSG_PEEK) message by
//! message (with the sender's address), SO_PEEK_OFF put back to the
//! target's value. Restore: each message is sent again, from a socket with
//! the right address where the sender had one (`unix_named.rs`).

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{bail, ensure, Context, Result};
use nix::errno::Errno;

use super::unix_diag as diag;

/// A receive queue as read at dump.
#[derive(Debug, Default)]
pub struct Queue {
    pub data: Vec<u8>,
    /// Message lengths (datagram and seqpacket sockets), in order.
    pub msgs: Vec<u64>,
    /// The sender of each message of a datagram socket: raw sun_path bytes,
    /// empty for an unnamed sender.
    pub senders: Vec<Vec<u8>>,
}

/// The receive queue of our copy of a socket, left in place.
pub fn read_queue(fd: BorrowedFd<'_>, ty: i32, orig_peek_off: i64) -> Result<Queue> {
    let total = super::sys::fionread(fd).context("FIONREAD")?;
    // A datagram socket's FIONREAD is the first message's length only.
    if total == 0 && ty != libc::SOCK_DGRAM {
        return Ok(Queue::default());
    }
    diag::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).context("setting SO_PEEK_OFF to 0")?;
    let r = peek_all(fd, ty, total);
    let back = diag::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, orig_peek_off as i32)
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
        let p = match diag::peek(fd, &mut buf) {
            Ok(v) => v,
            Err(Errno::EAGAIN) => break,
            Err(e) => return Err(e).context("recvmsg(MSG_PEEK)"),
        };
        if !p.fds.is_empty() {
            bail!("a queued message carries {} file descriptor(s) in flight (SCM_RIGHTS): not supported", p.fds.len());
        }
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
        if !stream {
            q.msgs.push(p.len as u64);
        }
        if ty == libc::SOCK_DGRAM {
            q.senders.push(super::unix_named::trim(&p.addr));
        }
        if ty == libc::SOCK_SEQPACKET && q.data.len() >= total {
            break;
        }
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
    super::unix::set_buf(tx, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, room as u64 * 2).context("raising SO_SNDBUF to fill")?;
    Ok(())
}

/// Message lengths of a saved queue, checked against its bytes.
pub fn lengths(data: &[u8], msgs: &[u64], stream: bool) -> Result<Vec<usize>> {
    let lens: Vec<usize> = if stream { vec![data.len()] } else { msgs.iter().map(|&m| m as usize).collect() };
    ensure!(lens.iter().sum::<usize>() == data.len(), "message lengths do not add up to the {} saved bytes", data.len());
    Ok(lens)
}

/// Write a saved receive queue into the sending end `tx` of a connection.
pub fn fill(tx: BorrowedFd<'_>, data: &[u8], msgs: &[u64], stream: bool) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    make_room(tx, data.len(), msgs.len())?;
    let mut off = 0;
    for len in lengths(data, msgs, stream)? {
        send_one(tx, &data[off..off + len], None, stream).with_context(|| format!("writing {} queued bytes (at {off})", data.len()))?;
        off += len;
    }
    Ok(())
}

/// Send one message (or, on a stream, all of `msg`) without blocking.
pub fn send_one(tx: BorrowedFd<'_>, msg: &[u8], to: Option<&[u8]>, stream: bool) -> Result<()> {
    let mut off = 0;
    while off < msg.len() {
        match diag::send_msg(tx, &msg[off..], &[], to, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
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
