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
//! Limits: **unread events are lost**; the kernel shows only the event bits
//! of a mask, so `IN_ONESHOT`, `IN_EXCL_UNLINK`, `IN_ONLYDIR`,
//! `IN_DONT_FOLLOW` and `IN_MASK_ADD` are not restored; paths are resolved
//! in snap's mount namespace.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

fn resolve(r: &Raw) -> Result<String> {
    let mnt = mount_of(r.sdev)?;
    let m = std::fs::File::open(&mnt).with_context(|| format!("opening mount {mnt}"))?;
    // struct file_handle { u32 handle_bytes; int handle_type; u8 f_handle[]; }
    let mut fh = Vec::with_capacity(8 + r.handle.len());
    fh.extend_from_slice(&(r.handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&r.htype.to_ne_bytes());
    fh.extend_from_slice(&r.handle);
    // SAFETY: `fh` is a complete file_handle (header + handle_bytes bytes),
    // alive for the call; the call returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_by_handle_at, m.as_raw_fd(), fh.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("open_by_handle_at on {mnt}"));
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).context("fstat")?;
    ensure!(st.st_ino == r.ino, "the handle opened inode {}, the watch is on {}", st.st_ino, r.ino);
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).context("readlink")?;
    let path = path.to_string_lossy().into_owned();
    ensure!(path.starts_with('/') && !path.ends_with(" (deleted)"), "the watched inode has no path ({path})");
    let now = std::fs::metadata(&path).with_context(|| format!("stat {path}"))?;
    ensure!(std::os::unix::fs::MetadataExt::ino(&now) == r.ino, "{path} is not the watched inode");
    Ok(path)
}

fn dump_inner(p: &Probe) -> Result<FileKind> {
    let text = fdinfo_text(p)?;
    let mut watches = Vec::new();
    for r in parse(&text)? {
        let path = resolve(&r).with_context(|| format!("inotify watch wd {} (inode {:#x} on device {:#x})", r.wd, r.ino, r.sdev))?;
        watches.push(InotifyWatch { wd: r.wd, path, mask: r.mask });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(FileKind::Inotify { watches })
}

fn add(fd: &OwnedFd, path: &str, mask: u32) -> std::io::Result<i32> {
    let c = std::ffi::CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a NUL-terminated string alive for the call.
    let r = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

pub fn restore(of: &OpenFile, _: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Inotify { watches } = &of.kind else { bail!("not an inotify") };
    // SAFETY: integer argument; returns a new descriptor or -1.
    let r = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("inotify_init1");
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(r) };
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
                let got = add(&fd, &scratch.to_string_lossy(), libc::IN_ATTRIB).context("skipping a wd")?;
                // SAFETY: integers only.
                unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), got) };
                next = got + 1;
            }
            let got = add(&fd, &w.path, w.mask).with_context(|| format!("inotify_add_watch({}, {:#x})", w.path, w.mask))?;
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
    let fl = nix::fcntl::OFlag::from_bits_truncate((of.flags & libc::O_NONBLOCK as u32) as i32);
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).context("F_SETFL")?;
    Ok(fd)
}
