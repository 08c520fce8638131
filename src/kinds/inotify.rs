//! inotify: each watch from fdinfo (`inotify wd:HEX ino:HEX sdev:HEX
//! mask:HEX ignored_mask:.. fhandle-bytes:.. fhandle-type:.. f_handle:HEX`).
//!
//! Dump resolves each watch to a path: `open_by_handle_at` with the saved
//! file handle and a directory of a mount of that device (from snap's
//! mountinfo), then `readlink /proc/self/fd/N`; the inode is checked. A
//! watched inode that has no path any more is refused. Restore adds the
//! watches in wd order with `inotify_add_watch(path, mask)`; a gap in the
//! wds is skipped by adding and removing a watch on a scratch directory
//! (wds are allocated cyclically) and the `IN_IGNORED` events that leaves
//! are drained; a wd that still does not come out as saved is refused.
//!
//! **Unread events.** The kernel cannot show queued events without
//! consuming them, so when `FIONREAD` says some are queued, snap reads them
//! from its copy of the descriptor and **replays** each one, in order, into
//! the process's own instance at once (so the process, left running or
//! resumed after a failed dump, still has them) and into the restored
//! instance after its watches are in place. Replaying one event: every
//! watch of the instance is narrowed to `IN_DELETE_SELF` (a quiet mask:
//! `inotify_add_watch` replaces the mask; `IN_MASK_ADD` is never used), the
//! event's watch to exactly the event's bit, and an action with no lasting
//! effect on the object (the watched inode, or the child `name` of a
//! watched directory) is done through `/proc/self/fd/N` of an `O_PATH`
//! descriptor of that very inode; `FIONREAD` must then have grown by the
//! event's size. Afterwards every watch gets its saved mask back. Actions:
//!
//! | event | action |
//! |---|---|
//! | `IN_OPEN`, `IN_CLOSE_NOWRITE` | open read-only (`O_NOATIME`) and close |
//! | `IN_ACCESS` | read 1 byte with `pread` (`O_NOATIME`); a directory: read its entries |
//! | `IN_ATTRIB` | `chmod` to the mode it has (the ctime changes) |
//! | `IN_CLOSE_WRITE` | open write-only (no `O_TRUNC`) and close (files only) |
//! | `IN_MODIFY` | `fallocate(FALLOC_FL_KEEP_SIZE)` of byte 0 of a non-empty file: content and size unchanged (a hole there gets allocated; the mtime may change) |
//!
//! Refused **before anything is read** (the queue stays intact): events
//! queued while a watch's mask holds other events (`IN_CREATE`,
//! `IN_DELETE`, `IN_MOVED_*`, `IN_DELETE_SELF`, `IN_MOVE_SELF`: replaying
//! them would change a directory, and a move's cookie cannot be chosen),
//! or so many bytes queued that the queue may have overflowed
//! (`IN_Q_OVERFLOW`, judged from `max_queued_events` now). Refused
//! **after reading** (the error names pid, fd, wd and event, and says these
//! events were lost to the process; every other event is put back in
//! order): an `IN_IGNORED` (a watch removed since the process last read:
//! its wd cannot be allocated again in a live instance), `IN_UNMOUNT`, an
//! event with two event bits, or one whose object cannot be acted on (a
//! child gone, an empty file for `IN_MODIFY`, a filesystem without
//! `fallocate`, a FIFO or device). Other inotify or fanotify watchers of the
//! same inodes (in the dump or not) see the replay actions too, and events
//! other processes cause on those inodes while the masks are narrowed are
//! not reported.
//!
//! Limits: `IN_ONLYDIR`, `IN_DONT_FOLLOW` and `IN_MASK_ADD` are not kept by
//! the kernel and not restored; `IN_ONESHOT` and `IN_EXCL_UNLINK` only where
//! fdinfo shows them (this kernel does); paths are resolved in snap's mount
//! namespace.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::eventfd::fdinfo_text;
use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "inotify", dump };

/// One watch of an inotify instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InotifyWatch {
    pub wd: i32,
    pub path: String,
    pub mask: u32,
}

/// One unread event, as read(2) gives it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InotifyEvent {
    pub wd: i32,
    pub mask: u32,
    pub cookie: u32,
    /// The child's name for an event on a watched directory's entry; empty
    /// for an event on the watched inode itself.
    pub name: String,
}

impl InotifyEvent {
    /// Bytes it takes in the queue (header + name padded by the kernel).
    fn size(&self) -> usize {
        16 + if self.name.is_empty() { 0 } else { (self.name.len() + 1).div_ceil(16) * 16 }
    }
    fn describe(&self) -> String {
        let name = if self.name.is_empty() { String::new() } else { format!(" name {:?}", self.name) };
        format!("wd {} event {}{name}", self.wd, mask_names(self.mask))
    }
}

/// Events snap can replay (see the module comment).
const REPLAYABLE: u32 = libc::IN_ACCESS | libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE | libc::IN_OPEN;
/// The mask of the other watches while one event is replayed.
const QUIET: u32 = libc::IN_DELETE_SELF;

fn mask_names(mask: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (libc::IN_ACCESS, "IN_ACCESS"),
        (libc::IN_MODIFY, "IN_MODIFY"),
        (libc::IN_ATTRIB, "IN_ATTRIB"),
        (libc::IN_CLOSE_WRITE, "IN_CLOSE_WRITE"),
        (libc::IN_CLOSE_NOWRITE, "IN_CLOSE_NOWRITE"),
        (libc::IN_OPEN, "IN_OPEN"),
        (libc::IN_MOVED_FROM, "IN_MOVED_FROM"),
        (libc::IN_MOVED_TO, "IN_MOVED_TO"),
        (libc::IN_CREATE, "IN_CREATE"),
        (libc::IN_DELETE, "IN_DELETE"),
        (libc::IN_DELETE_SELF, "IN_DELETE_SELF"),
        (libc::IN_MOVE_SELF, "IN_MOVE_SELF"),
        (libc::IN_UNMOUNT, "IN_UNMOUNT"),
        (libc::IN_Q_OVERFLOW, "IN_Q_OVERFLOW"),
        (libc::IN_IGNORED, "IN_IGNORED"),
        (libc::IN_ISDIR, "IN_ISDIR"),
    ];
    let v: Vec<&str> = NAMES.iter().filter(|(b, _)| mask & b != 0).map(|(_, n)| *n).collect();
    let rest = mask & !NAMES.iter().fold(0, |a, (b, _)| a | b);
    let mut s = v.join("|");
    if rest != 0 {
        s += &format!("{}{rest:#x}", if s.is_empty() { "" } else { "|" });
    }
    s
}

/// Events from what read(2) gave.
fn parse_events(buf: &[u8]) -> Result<Vec<InotifyEvent>> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        ensure!(rest.len() >= 16, "truncated inotify event");
        let u = |i: usize| u32::from_ne_bytes(rest[i..i + 4].try_into().unwrap());
        let len = u(12) as usize;
        ensure!(rest.len() >= 16 + len, "truncated inotify event name");
        let raw = &rest[16..16 + len];
        let name = raw.split(|&b| b == 0).next().unwrap_or_default();
        let name = String::from_utf8(name.to_vec()).context("an inotify event names a file whose name is not UTF-8")?;
        out.push(InotifyEvent { wd: u(0) as i32, mask: u(4), cookie: u(8), name });
        rest = &rest[16 + len..];
    }
    Ok(out)
}

/// A watch with an O_PATH descriptor of its very inode (paths through
/// `/proc/self/fd/N` cannot reach another inode).
struct Live<'a> {
    w: &'a InotifyWatch,
    opath: OwnedFd,
}

impl Live<'_> {
    fn path(&self) -> String {
        format!("/proc/self/fd/{}", self.opath.as_raw_fd())
    }
}

fn set_mask(inst: BorrowedFd<'_>, l: &Live, mask: u32) -> Result<()> {
    let got = add(inst, &l.path(), mask).with_context(|| format!("inotify_add_watch(wd {} {}, {mask:#x})", l.w.wd, l.w.path))?;
    ensure!(got == l.w.wd, "inotify_add_watch on {} gave wd {got}, expected {}", l.w.path, l.w.wd);
    Ok(())
}

/// Replay `events` in order into `inst`, whose watches are `live`; then
/// give every watch its saved mask back. Returns the events that could not
/// be replayed, with the reason.
fn replay(inst: BorrowedFd<'_>, live: &[Live], events: &[InotifyEvent]) -> Vec<String> {
    let mut failed = Vec::new();
    let quiet = live.iter().try_for_each(|l| set_mask(inst, l, QUIET));
    match quiet {
        Ok(()) => {
            for e in events {
                if let Err(err) = replay_one(inst, live, e) {
                    failed.push(format!("{}: {err:#}", e.describe()));
                }
            }
        }
        Err(err) => failed.extend(events.iter().map(|e| format!("{}: {err:#}", e.describe()))),
    }
    for l in live {
        if let Err(err) = set_mask(inst, l, l.w.mask) {
            failed.push(format!("putting back the mask of wd {}: {err:#}", l.w.wd));
        }
    }
    failed
}

fn replay_one(inst: BorrowedFd<'_>, live: &[Live], e: &InotifyEvent) -> Result<()> {
    let bit = e.mask & !libc::IN_ISDIR;
    ensure!(bit.count_ones() == 1 && bit & REPLAYABLE != 0, "snap cannot replay this event");
    let l = live.iter().find(|l| l.w.wd == e.wd).context("no such watch now")?;
    let target = if e.name.is_empty() { l.path() } else { format!("{}/{}", l.path(), e.name) };
    ensure!(!e.name.contains('/') && e.name != "." && e.name != "..", "odd name");
    let md = std::fs::metadata(&target).with_context(|| format!("stat {target}"))?;
    ensure!(md.is_dir() == (e.mask & libc::IN_ISDIR != 0), "the object is not of the same type as at the event");
    ensure!(md.is_dir() || md.is_file(), "the object is neither a file nor a directory");
    set_mask(inst, l, bit)?;
    let before = super::sys::fionread(inst).context("FIONREAD")?;
    let acted = act(&target, bit, &md);
    let after = super::sys::fionread(inst).context("FIONREAD");
    set_mask(inst, l, QUIET)?;
    acted?;
    let after = after?;
    ensure!(after == before + e.size(), "the replayed event did not come out as expected ({before} -> {after} bytes queued)");
    Ok(())
}

/// The action that makes the kernel report `bit` on `target`.
fn act(target: &str, bit: u32, md: &std::fs::Metadata) -> Result<()> {
    let read_only = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOATIME)
            .open(target)
            .with_context(|| format!("opening {target} read-only"))
    };
    let write_only = || -> Result<std::fs::File> {
        ensure!(md.is_file(), "a directory cannot be opened for writing");
        std::fs::OpenOptions::new().write(true).open(target).with_context(|| format!("opening {target} write-only"))
    };
    match bit {
        libc::IN_OPEN | libc::IN_CLOSE_NOWRITE => drop(read_only()?),
        libc::IN_CLOSE_WRITE => drop(write_only()?),
        libc::IN_ACCESS if md.is_dir() => {
            let f = read_only()?;
            super::sys::read_dir_once(f.as_fd()).context("getdents64")?;
        }
        libc::IN_ACCESS => {
            let f = read_only()?;
            let mut b = [0u8; 1];
            let n = nix::sys::uio::pread(&f, &mut b, 0).context("pread")?;
            ensure!(n == 1, "the file is empty");
        }
        libc::IN_ATTRIB => {
            let mode = std::fs::Permissions::from(std::os::unix::fs::PermissionsExt::from_mode(md.mode() & 0o7777));
            std::fs::set_permissions(target, mode).with_context(|| format!("chmod {target}"))?;
        }
        libc::IN_MODIFY => {
            ensure!(md.len() > 0, "the file is empty");
            let f = write_only()?;
            nix::fcntl::fallocate(f.as_raw_fd(), nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 1).context("fallocate")?;
        }
        _ => bail!("snap cannot replay this event"),
    }
    Ok(())
}

fn dump(p: &Probe, _: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.link != "anon_inode:inotify" {
        return None;
    }
    Some(dump_inner(p).with_context(|| p.what()))
}

struct Raw {
    wd: i32,
    ino: u64,
    sdev: u64,
    mask: u32,
    htype: i32,
    handle: Vec<u8>,
}

fn parse(text: &str) -> Result<Vec<Raw>> {
    let mut out = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("inotify ")) {
        let get = |k: &str| {
            line.split_whitespace().find_map(|t| t.strip_prefix(k)).with_context(|| format!("fdinfo line {line:?}: no {k}"))
        };
        let hex = |k: &str| -> Result<u64> { u64::from_str_radix(get(k)?, 16).with_context(|| format!("fdinfo line {line:?}: {k}")) };
        let h = get("f_handle:")?;
        ensure!(h.len() % 2 == 0, "fdinfo line {line:?}: odd f_handle");
        let handle = (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()?;
        ensure!(hex("fhandle-bytes:")? as usize == handle.len(), "fdinfo line {line:?}: handle length");
        out.push(Raw {
            wd: hex("wd:")? as i32,
            ino: hex("ino:")?,
            sdev: hex("sdev:")?,
            mask: hex("mask:")? as u32,
            htype: hex("fhandle-type:")? as i32,
            handle,
        });
    }
    Ok(out)
}

/// A mount point of the device `sdev` (kernel dev_t: major << 20 | minor).
fn mount_of(sdev: u64) -> Result<String> {
    let want = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let mi = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for l in mi.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && f[2] == want {
            return Ok(f[4].replace("\\040", " "));
        }
    }
    bail!("no mount of device {want} in snap's mount namespace")
}

fn resolve(r: &Raw) -> Result<(String, OwnedFd)> {
    let mnt = mount_of(r.sdev)?;
    let m = std::fs::File::open(&mnt).with_context(|| format!("opening mount {mnt}"))?;
    let fd = super::sys::open_by_handle_at(m.as_fd(), r.htype, &r.handle, libc::O_PATH | libc::O_CLOEXEC)
        .with_context(|| format!("open_by_handle_at on {mnt}"))?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).context("fstat")?;
    ensure!(st.st_ino == r.ino, "the handle opened inode {}, the watch is on {}", st.st_ino, r.ino);
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).context("readlink")?;
    let path = path.to_string_lossy().into_owned();
    ensure!(path.starts_with('/') && !path.ends_with(" (deleted)"), "the watched inode has no path ({path})");
    let now = std::fs::metadata(&path).with_context(|| format!("stat {path}"))?;
    ensure!(now.ino() == r.ino, "{path} is not the watched inode");
    Ok((path, fd))
}

fn dump_inner(p: &Probe) -> Result<FileKind> {
    let text = fdinfo_text(p)?;
    let mut watches = Vec::new();
    let mut opaths = Vec::new();
    for r in parse(&text)? {
        let (path, fd) = resolve(&r).with_context(|| format!("inotify watch wd {} (inode {:#x} on device {:#x})", r.wd, r.ino, r.sdev))?;
        watches.push(InotifyWatch { wd: r.wd, path, mask: r.mask });
        opaths.push((r.wd, fd));
    }
    watches.sort_by_key(|w| w.wd);
    let queued = super::sys::fionread(p.ours).context("FIONREAD")?;
    let mut events = Vec::new();
    if queued > 0 {
        // Decide what can be decided before anything is consumed.
        for w in &watches {
            let other = w.mask & libc::IN_ALL_EVENTS & !REPLAYABLE;
            ensure!(
                other == 0,
                "{queued} bytes of unread events are queued and watch wd {} ({}) reports {}, which snap cannot replay",
                w.wd,
                w.path,
                mask_names(other)
            );
        }
        let max = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(16384);
        ensure!(queued / 16 < max, "{queued} bytes of unread events are queued: the queue may have overflowed (max_queued_events {max})");
        let mut buf = vec![0u8; queued];
        let mut got = 0;
        while got < queued {
            let n = nix::unistd::read(p.ours.as_raw_fd(), &mut buf[got..]).context("reading the queued events")?;
            ensure!(n > 0, "the queued events ended early");
            got += n;
        }
        events = parse_events(&buf)?;
        // Put them back into the process's own instance at once.
        let live: Vec<Live> = watches
            .iter()
            .map(|w| {
                let i = opaths.iter().position(|(wd, _)| *wd == w.wd).unwrap();
                Live { w, opath: opaths.swap_remove(i).1 }
            })
            .collect();
        let failed = replay(p.ours, &live, &events);
        if !failed.is_empty() {
            bail!(
                "these unread events cannot be replayed and are lost to the process (every other one was put back in order): {}",
                failed.join("; ")
            );
        }
    }
    Ok(FileKind::Inotify { watches, events })
}

fn add(fd: BorrowedFd<'_>, path: &str, mask: u32) -> std::io::Result<i32> {
    let c = std::ffi::CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    super::sys::inotify_add_watch(fd, &c, mask)
}

pub fn restore(of: &OpenFile, _: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Inotify { watches, events } = &of.kind else { bail!("not an inotify") };
    let fd = super::sys::inotify_init(libc::IN_CLOEXEC | libc::IN_NONBLOCK).context("inotify_init1")?;
    let scratch = std::env::temp_dir().join(format!(".snap-inotify-{}", std::process::id()));
    let mut made_scratch = false;
    let mut next = 1;
    let res = (|| -> Result<()> {
        for w in watches {
            ensure!(w.wd >= next, "inotify watches out of order or repeated (wd {})", w.wd);
            while next < w.wd {
                if !made_scratch {
                    std::fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
                    made_scratch = true;
                }
                let got = add(fd.as_fd(), &scratch.to_string_lossy(), libc::IN_ATTRIB).context("skipping a wd")?;
                let _ = super::sys::inotify_rm_watch(fd.as_fd(), got);
                next = got + 1;
            }
            let got = add(fd.as_fd(), &w.path, w.mask).with_context(|| format!("inotify_add_watch({}, {:#x})", w.path, w.mask))?;
            ensure!(got == w.wd, "inotify_add_watch({}) gave wd {got}, the process had wd {}", w.path, w.wd);
            next = got + 1;
        }
        Ok(())
    })();
    if made_scratch {
        let _ = std::fs::remove_dir(&scratch);
    }
    res?;
    // Drop the IN_IGNORED events of the skipped wds.
    let mut f = std::fs::File::from(fd);
    let mut buf = [0u8; 4096];
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    let fd = OwnedFd::from(f);
    if !events.is_empty() {
        let live = watches
            .iter()
            .map(|w| {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH)
                    .open(&w.path)
                    .with_context(|| format!("opening {} (O_PATH)", w.path))?;
                Ok(Live { w, opath: f.into() })
            })
            .collect::<Result<Vec<_>>>()?;
        let failed = replay(fd.as_fd(), &live, events);
        ensure!(failed.is_empty(), "replaying the unread events: {}", failed.join("; "));
    }
    let fl = nix::fcntl::OFlag::from_bits_truncate((of.flags & libc::O_NONBLOCK as u32) as i32);
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).context("F_SETFL")?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parsed_with_sizes() {
        let mut buf = Vec::new();
        for (wd, mask, name) in [(1i32, libc::IN_OPEN, &b"f.txt"[..]), (2, libc::IN_ACCESS | libc::IN_ISDIR, &b""[..])] {
            let len = if name.is_empty() { 0 } else { (name.len() + 1).div_ceil(16) * 16 };
            buf.extend_from_slice(&wd.to_ne_bytes());
            buf.extend_from_slice(&mask.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&(len as u32).to_ne_bytes());
            let mut n = name.to_vec();
            n.resize(len, 0);
            buf.extend_from_slice(&n);
        }
        let ev = parse_events(&buf).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].wd, ev[0].mask, ev[0].name.as_str(), ev[0].size()), (1, libc::IN_OPEN, "f.txt", 32));
        assert_eq!((ev[1].name.as_str(), ev[1].size()), ("", 16));
        assert_eq!(ev.iter().map(InotifyEvent::size).sum::<usize>(), buf.len());
        assert!(parse_events(&buf[..buf.len() - 1]).is_err());
        assert_eq!(mask_names(libc::IN_ACCESS | libc::IN_ISDIR), "IN_ACCESS|IN_ISDIR");
        assert_eq!(mask_names(libc::IN_CREATE | 0x0400_0000), "IN_CREATE|0x4000000");
    }
}
