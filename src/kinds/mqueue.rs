//! POSIX message queues (`mq_open`).
//!
//! **Claim**: a regular-file descriptor on the mqueue filesystem
//! (`fstatfs` magic `MQUEUE_MAGIC`), whatever its name. The queue must be
//! in snap's IPC namespace (names are per namespace); otherwise refused.
//!
//! **Dump**, once per open file description:
//! - name from `readlink /proc/PID/fd/N` (`/name`, with ` (deleted)` when
//!   unlinked); `linked` = the queue inode still has a link (`st_nlink`);
//! - `mq_maxmsg`, `mq_msgsize` (`mq_getattr`), mode, uid and gid of the
//!   queue inode; `O_NONBLOCK` and the access mode are the description's
//!   status flags (`OpenFile::flags`);
//! - the `mq_notify` registration from the queue's status text (`QSIZE`,
//!   `NOTIFY`, `SIGNO`, `NOTIFY_PID`, read with `pread` on a description of
//!   snap's own, so the target's position is untouched). It is kept only if
//!   the registering process is part of the dump; `SIGEV_THREAD` (a netlink
//!   socket) is refused. The kernel does not show a `SIGEV_SIGNAL`
//!   registration's `sigev_value`: it comes back as 0.
//! - the messages, once per queue (blob `mqueue-<ino>.msgs`): the kernel
//!   has no way to read a message without taking it, so snap opens its own
//!   read-write description of the queue (through `/proc/self/fd/N`; the
//!   target's flags are untouched), takes every message and at once sends
//!   them all back in the order received, while the dumped processes are
//!   stopped. Receive order is priority then age, and a send goes behind
//!   the messages of equal priority, so the queue ends as it was. If a send
//!   back fails (an outside process filled the queue meanwhile, and no room
//!   came within 5 s), the dump fails and the messages not sent back are
//!   written to a file in the temporary directory, named in the error.
//!   Refused before anything is taken: a queue with messages *and* a
//!   notification registration (sending the first message back into the
//!   emptied queue would fire it). Processes outside the dump that use the
//!   queue during the dump see it empty for that moment.
//!
//! **Restore**, per queue (the first description of it), then one
//! `mq_open` per description with its saved access mode and `O_NONBLOCK`:
//! - linked at dump, and a queue of that name exists now: it is used as it
//!   is, like a regular file (after `snap dump` killed the processes the
//!   queue still holds its messages; those of the image are not added), but
//!   refused if its `mq_maxmsg` or `mq_msgsize` differ from the image's.
//!   Its mode and owner are left as they are now;
//! - linked at dump and no such queue now: created (`O_EXCL`) with the
//!   saved attributes, mode, owner and messages. If that fails half way the
//!   queue is unlinked again; once created it stays, also if a later stage
//!   of the restore fails (a second restore then finds it with the image's
//!   messages);
//! - unlinked at dump: created the same way under a unique temporary name
//!   (`/.snap-mq-<snap pid>-<ino>`), every description of it opened, then
//!   the name is unlinked;
//! - the notification is registered again inside the registering process
//!   once its fd table is in place ([`after_fd_table`]); that process first
//!   closes the copies of the queue's descriptors it inherited from snap
//!   (the kernel drops a registration when its owner closes any descriptor
//!   of the queue). A queue that has a registration now (an existing queue
//!   whose owner still runs) makes the restore fail (`EBUSY`).
//!
//! Creating a queue with more than `/proc/sys/fs/mqueue/msg_max` messages
//! or `msgsize_max` bytes needs `CAP_SYS_RESOURCE`; without it the restore
//! fails naming the queue.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{bail, ensure, Context, Result};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use super::sys::{self, MqAttr};
use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FdEntry, FileKind, FilesImage, OpenFile};

pub const KIND: Kind = Kind { name: "mqueue", dump };

const MQUEUE_MAGIC: i64 = 0x1980_0202;
/// How long a send back (dump) may wait for room in the queue.
const SEND_BACK_WAIT_NS: u64 = 5_000_000_000;

/// The `mq_notify` registration of a queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MqNotify {
    /// The registering process (a dumped one).
    pub pid: i32,
    /// `SIGEV_SIGNAL` (0) or `SIGEV_NONE` (1).
    pub sigev_notify: i32,
    /// The signal, for `SIGEV_SIGNAL`.
    pub signo: i32,
}

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFREG {
        return None;
    }
    let fs = nix::sys::statfs::fstatfs(p.ours).ok()?;
    if fs.filesystem_type().0 as i64 != MQUEUE_MAGIC {
        return None;
    }
    Some(dump_inner(p, sh).with_context(|| format!("{}: POSIX message queue", p.what())))
}

/// (QSIZE, NOTIFY, SIGNO, NOTIFY_PID) from the text a read of a queue gives.
fn parse_status(text: &str) -> Result<(u64, i32, i32, i32)> {
    let get = |k: &str| -> Result<i64> {
        let v = text.split_whitespace().find_map(|t| t.strip_prefix(k)).with_context(|| format!("no {k} in {text:?}"))?;
        v.parse().with_context(|| format!("{k}{v} in {text:?}"))
    };
    Ok((get("QSIZE:")? as u64, get("NOTIFY:")? as i32, get("SIGNO:")? as i32, get("NOTIFY_PID:")? as i32))
}

fn dump_inner(p: &Probe, sh: &mut DumpShared) -> Result<FileKind> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/ipc")).with_context(|| format!("readlink /proc/{pid}/ns/ipc"));
    ensure!(ns(&p.pid.0.to_string())? == ns("self")?, "the queue is in another IPC namespace than snap");
    let linked = p.st.st_nlink > 0;
    let name = p.link.strip_suffix(" (deleted)").unwrap_or(&p.link).to_string();
    ensure!(name.starts_with('/') && !name[1..].contains('/'), "unexpected queue name {name:?}");

    // A description of our own: the target's position and flags stay as they are.
    let path = format!("/proc/self/fd/{}", p.ours.as_raw_fd());
    let q: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the queue again through {path}"))?
        .into();
    let a = sys::mq_getattr(q.as_fd()).context("mq_getattr")?;
    let mut text = [0u8; 256];
    let n = nix::sys::uio::pread(&q, &mut text, 0).context("reading the queue status")?;
    let (_qsize, how, signo, npid) = parse_status(&String::from_utf8_lossy(&text[..n]))?;
    let notify = if npid == 0 {
        None
    } else {
        ensure!(
            sh.dumped.iter().any(|d| d.0 == npid),
            "mq_notify registration of pid {npid}, which is not part of the dump"
        );
        match how {
            libc::SIGEV_SIGNAL | libc::SIGEV_NONE => {}
            libc::SIGEV_THREAD => bail!("mq_notify registration of pid {npid} with SIGEV_THREAD (a netlink socket) is not supported"),
            _ => bail!("mq_notify registration of pid {npid} of unknown kind {how}"),
        }
        Some(MqNotify { pid: npid, sigev_notify: how, signo })
    };

    let blob = if a.curmsgs > 0 { format!("mqueue-{}.msgs", p.st.st_ino) } else { String::new() };
    if !blob.is_empty() && !sh.saved.contains(&blob) {
        if let Some(n) = &notify {
            bail!(
                "the queue holds {} message(s) and has an mq_notify registration of pid {}: taking the messages \
                 and sending them back would fire it; not supported",
                a.curmsgs,
                n.pid
            );
        }
        let data = take_and_put_back(q.as_fd(), a, &name, p.st.st_ino)?;
        sh.blobs.push((blob.clone(), data));
        sh.saved.insert(blob.clone());
    }
    Ok(FileKind::Mqueue {
        name,
        linked,
        ino: p.st.st_ino,
        maxmsg: a.maxmsg as u64,
        msgsize: a.msgsize as u64,
        mode: p.st.st_mode & 0o7777,
        uid: p.st.st_uid,
        gid: p.st.st_gid,
        messages: a.curmsgs as u64,
        blob,
        notify,
    })
}

fn encode(msgs: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (prio, m) in msgs {
        out.extend_from_slice(&prio.to_le_bytes());
        out.extend_from_slice(&(m.len() as u32).to_le_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// The messages of a blob, checked against the queue's limits.
fn decode(data: &[u8], maxmsg: u64, msgsize: u64) -> Result<Vec<(u32, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        ensure!(rest.len() >= 8, "truncated message header");
        let prio = u32::from_le_bytes(rest[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
        ensure!(len as u64 <= msgsize, "a message of {len} bytes in a queue of mq_msgsize {msgsize}");
        ensure!(rest.len() - 8 >= len, "truncated message");
        out.push((prio, &rest[8..8 + len]));
        rest = &rest[8 + len..];
        ensure!(out.len() as u64 <= maxmsg, "more messages than mq_maxmsg {maxmsg}");
    }
    Ok(out)
}

/// Take every message from the queue and send them straight back in the
/// same order; returns them encoded. `q` is snap's own blocking read-write
/// description.
fn take_and_put_back(q: BorrowedFd<'_>, a: MqAttr, name: &str, ino: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; a.msgsize.max(1) as usize];
    let mut msgs: Vec<(u32, Vec<u8>)> = Vec::with_capacity(a.curmsgs as usize);
    let mut failed = None;
    loop {
        match sys::mq_receive_now(q, &mut buf) {
            Ok((n, prio)) => msgs.push((prio, buf[..n].to_vec())),
            Err(Errno::ETIMEDOUT) | Err(Errno::EAGAIN) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                failed = Some(anyhow::Error::new(e).context(format!("mq_timedreceive (message {})", msgs.len() + 1)));
                break;
            }
        }
    }
    for (i, (prio, m)) in msgs.iter().enumerate() {
        let r = loop {
            match sys::mq_send_wait(q, m, *prio, SEND_BACK_WAIT_NS) {
                Err(Errno::EINTR) => continue,
                r => break r,
            }
        };
        if let Err(e) = r {
            let left = &msgs[i..];
            let file = std::env::temp_dir().join(format!(
                "snap-mqueue-unsent-{}-{ino}-{}.msgs",
                name.trim_start_matches('/'),
                std::process::id()
            ));
            let saved = match std::fs::write(&file, encode(left)) {
                Ok(()) => format!("they are saved in {} (each: priority u32 LE, length u32 LE, bytes)", file.display()),
                Err(w) => format!("and saving them in {} failed too ({w}): THEY ARE LOST", file.display()),
            };
            bail!(
                "sending message {} of {} back to queue {name} failed ({e}); {} message(s) are no longer in the queue: {saved}",
                i + 1,
                msgs.len(),
                left.len()
            );
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(encode(&msgs))
}

/// A queue recreated or found at restore, shared by its descriptions.
pub struct Held {
    /// The name its descriptions are opened by.
    name: CString,
    /// Its inode now (checked for every description).
    ino: u64,
    /// Unlinked at dump: `name` is a temporary name, unlinked on drop.
    temp: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.temp {
            let _ = sys::mq_unlink(&self.name);
        }
    }
}

fn cname(name: &str) -> Result<CString> {
    ensure!(
        name.len() > 1 && name.len() <= 255 && name.starts_with('/') && !name[1..].contains('/'),
        "invalid queue name {name:?}"
    );
    CString::new(name).with_context(|| format!("invalid queue name {name:?}"))
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Mqueue { name, ino, .. } = &of.kind else { bail!("not a message queue") };
    let what = || format!("POSIX message queue {name} (inode {ino} at dump)");
    if !ctx.mqueues.contains_key(ino) {
        let h = prepare(of, ctx).with_context(what)?;
        ctx.mqueues.insert(*ino, h);
    }
    let h = &ctx.mqueues[ino];
    let acc = of.flags as i32 & libc::O_ACCMODE;
    let nb = of.flags as i32 & libc::O_NONBLOCK;
    let fd = sys::mq_open(&h.name, acc | nb | libc::O_CLOEXEC, None)
        .with_context(|| format!("{}: mq_open({:?}, {:#o})", what(), h.name, acc | nb))?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).with_context(what)?;
    ensure!(st.st_ino == h.ino, "{}: the queue {:?} was replaced during the restore", what(), h.name);
    Ok(fd)
}

/// Find or create the queue of a description (its first one).
fn prepare(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<Held> {
    let FileKind::Mqueue { name, linked, ino, maxmsg, msgsize, mode, uid, gid, messages, blob, .. } = &of.kind else {
        bail!("not a message queue")
    };
    let rw = libc::O_RDWR | libc::O_CLOEXEC;
    let (maxmsg, msgsize) = (i64::try_from(*maxmsg)?, i64::try_from(*msgsize)?);
    let name_c = cname(name)?;
    if *linked {
        match sys::mq_open(&name_c, rw | libc::O_NONBLOCK, None) {
            Ok(q) => {
                let a = sys::mq_getattr(q.as_fd()).context("mq_getattr of the existing queue")?;
                ensure!(
                    a.maxmsg == maxmsg && a.msgsize == msgsize,
                    "a queue of that name exists with mq_maxmsg {} and mq_msgsize {}, the image has {maxmsg} and {msgsize}",
                    a.maxmsg,
                    a.msgsize
                );
                let st = nix::sys::stat::fstat(q.as_raw_fd()).context("fstat")?;
                return Ok(Held { name: name_c, ino: st.st_ino, temp: false });
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e).context("mq_open of the existing queue"),
        }
    }
    let (open_name, temp) = if *linked {
        (name_c, false)
    } else {
        (cname(&format!("/.snap-mq-{}-{ino}", std::process::id()))?, true)
    };
    let q = sys::mq_open(&open_name, rw | libc::O_EXCL, Some((0o600, maxmsg, msgsize))).map_err(|e| {
        let hint = if e == Errno::EINVAL || e == Errno::EPERM {
            " (more than /proc/sys/fs/mqueue/msg_max messages or msgsize_max bytes needs CAP_SYS_RESOURCE)"
        } else {
            ""
        };
        anyhow::anyhow!("creating queue {open_name:?} with mq_maxmsg {maxmsg}, mq_msgsize {msgsize}: {e}{hint}")
    })?;
    // From here on a failure removes the queue again.
    let st = nix::sys::stat::fstat(q.as_raw_fd()).context("fstat")?;
    let held = Held { name: open_name, ino: st.st_ino, temp: true };
    let data = if blob.is_empty() { Vec::new() } else { (ctx.read_blob)(blob)? };
    let msgs = decode(&data, maxmsg as u64, msgsize as u64).with_context(|| format!("blob {blob}"))?;
    ensure!(msgs.len() as u64 == *messages, "blob {blob:?} holds {} messages, the record says {messages}", msgs.len());
    for (i, (prio, m)) in msgs.iter().enumerate() {
        sys::mq_send_wait(q.as_fd(), m, *prio, 0).with_context(|| format!("mq_send of message {} of {}", i + 1, msgs.len()))?;
    }
    nix::unistd::fchown(q.as_raw_fd(), Some((*uid).into()), Some((*gid).into()))
        .with_context(|| format!("fchown to {uid}:{gid}"))?;
    nix::sys::stat::fchmod(q.as_raw_fd(), nix::sys::stat::Mode::from_bits_truncate(*mode)).with_context(|| format!("fchmod {mode:o}"))?;
    let mut held = held;
    held.temp = temp;
    Ok(held)
}

/// Inside a restored process once its fd table is in place: register again
/// the notifications this process had.
pub fn after_fd_table(fds: &[FdEntry], files: &FilesImage) -> Result<()> {
    let me = std::process::id() as i32;
    let mut done = HashSet::new();
    for f in fds {
        let Some(of) = files.files.iter().find(|o| o.id == f.file) else { continue };
        let FileKind::Mqueue { name, ino, notify: Some(n), .. } = &of.kind else { continue };
        if n.pid != me || !done.insert(*ino) {
            continue;
        }
        let what = || format!("fd {}: mq_notify registration on queue {name}", f.fd);
        close_inherited_copies(fds, f.fd).with_context(what)?;
        // f.fd is a descriptor of this process's table, open for the call.
        let fd = crate::sys::borrow_fd(f.fd);
        sys::mq_notify(fd, n.sigev_notify, n.signo).with_context(what)?;
    }
    Ok(())
}

/// Close the descriptors of this process that are not in its table and
/// refer to the same queue as `fd` (copies inherited from snap's pool):
/// closing one later would drop the registration.
fn close_inherited_copies(fds: &[FdEntry], fd: i32) -> Result<()> {
    let want = nix::sys::stat::fstat(fd).context("fstat")?;
    let mine: HashSet<i32> = fds.iter().map(|f| f.fd).collect();
    let mut others = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
        if let Some(n) = e.ok().and_then(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
            if !mine.contains(&n) {
                others.push(n);
            }
        }
    }
    for n in others {
        if let Ok(st) = nix::sys::stat::fstat(n) {
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino) {
                let _ = nix::unistd::close(n);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text() {
        let t = "QSIZE:4          NOTIFY:1     SIGNO:0     NOTIFY_PID:11199 \n";
        assert_eq!(parse_status(t).unwrap(), (4, 1, 0, 11199));
        assert!(parse_status("QSIZE:4").is_err());
    }

    #[test]
    fn blob_roundtrip_and_limits() {
        let m = vec![(5, b"hi".to_vec()), (0, Vec::new()), (1, b"abc".to_vec())];
        let e = encode(&m);
        let d = decode(&e, 3, 3).unwrap();
        assert_eq!(d, vec![(5, &b"hi"[..]), (0, &b""[..]), (1, &b"abc"[..])]);
        assert!(decode(&e, 2, 3).is_err(), "more than maxmsg");
        assert!(decode(&e, 3, 2).is_err(), "longer than msgsize");
        assert!(decode(&e[..e.len() - 1], 3, 3).is_err(), "truncated");
    }
}
