//! epoll: the instance and each of its watches (fdinfo lines
//! `tfd: N events: HEX data: HEX pos:.. ino:.. sdev:..`).
//!
//! The kernel keys a watch by the watched *file* and the descriptor number
//! the process passed to epoll_ctl, so a watch can only be re-added from
//! inside a process that holds that file at that number. At dump each watch
//! is checked with kcmp(KCMP_EPOLL_TFD) against the dumping process's own
//! fd `tfd`; a watch whose descriptor was closed (or reused for another
//! file) after it was added is refused, naming pid, fd and the watched fd.
//! Restore creates an empty instance in snap ([`restore`]); the process
//! that was checked (`owner`) adds every watch itself once its fd table is
//! in place ([`add_watches`], from `kinds::after_fd_table`). An epoll
//! watching another epoll works the same way.
//!
//! Events pending at the dump come back because the watched objects keep
//! their state (a pipe's bytes, an eventfd's counter): a level-triggered
//! watch reports them again. Limits: an edge-triggered (`EPOLLET`) watch
//! whose object was already ready reports it once more after restore (the
//! new watch sees it as a fresh edge); an `EPOLLONESHOT` watch that has
//! fired stays disabled, as it was.

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::eventfd::fdinfo_text;
use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FdEntry, FileKind, FilesImage, OpenFile};

pub const KIND: Kind = Kind { name: "epoll", dump };

/// One watch of an epoll instance.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EpollWatch {
    /// Descriptor number of the watched file in the owner process.
    pub tfd: i32,
    /// `EPOLLIN`, ... and `EPOLLET`, `EPOLLONESHOT`, ... as the kernel shows them.
    pub events: u32,
    pub data: u64,
}

fn dump(p: &Probe, _: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.link != "anon_inode:[eventpoll]" {
        return None;
    }
    Some(dump_inner(p).with_context(|| p.what()))
}

/// The watches listed in an epoll fdinfo text.
pub fn parse_watches(text: &str) -> Result<Vec<EpollWatch>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let toks: Vec<&str> = line.split_whitespace().collect();
        let after = |k: &str| {
            toks.iter().position(|t| *t == k).and_then(|i| toks.get(i + 1)).copied().with_context(|| format!("fdinfo line {line:?}: no {k}"))
        };
        let tfd: i32 = after("tfd:")?.parse().with_context(|| format!("fdinfo line {line:?}"))?;
        let events = u32::from_str_radix(after("events:")?, 16).with_context(|| format!("fdinfo line {line:?}"))?;
        let data = u64::from_str_radix(after("data:")?, 16).with_context(|| format!("fdinfo line {line:?}"))?;
        out.push(EpollWatch { tfd, events, data });
    }
    Ok(out)
}

fn dump_inner(p: &Probe) -> Result<FileKind> {
    let text = fdinfo_text(p)?;
    let watches = parse_watches(&text)?;
    let mut seen = HashSet::new();
    for w in &watches {
        ensure!(
            seen.insert(w.tfd),
            "two watches name fd {} (one was added before that descriptor was closed and reused); \
             such a watch cannot be restored",
            w.tfd
        );
        let why = match super::sys::kcmp_epoll_tfd(p.pid.0, p.fd.0, w.tfd) {
            Ok(true) => continue,
            Ok(false) => "the process's fd now refers to another file".to_string(),
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => "the process has closed that fd".to_string(),
            Err(e) => format!("kcmp(KCMP_EPOLL_TFD): {e}"),
        };
        bail!(
            "the watch of fd {} (events {:#x}) cannot be restored: {why} \
             (the kernel keeps the watch while the file lives elsewhere)",
            w.tfd,
            w.events
        );
    }
    Ok(FileKind::Epoll { owner: p.pid.0, watches })
}

/// An empty epoll instance; the watches are added by the owner process.
pub fn restore(of: &OpenFile, _: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Epoll { .. } = &of.kind else { bail!("not an epoll") };
    super::sys::epoll_create().context("epoll_create1")
}

/// Inside a restored process, fd table in place: add the watches of every
/// epoll instance this process owns (once per instance, at the first of
/// its descriptors).
pub fn add_watches(fds: &[FdEntry], files: &FilesImage) -> Result<()> {
    let me = std::process::id() as i32;
    let mut done = HashSet::new();
    for e in fds {
        let Some(of) = files.files.iter().find(|f| f.id == e.file) else { continue };
        let FileKind::Epoll { owner, watches } = &of.kind else { continue };
        if *owner != me || !done.insert(of.id) {
            continue;
        }
        for w in watches {
            if let Err(err) = super::sys::epoll_add(e.fd, w.tfd, w.events, w.data) {
                return Err(err).with_context(|| {
                    format!("epoll fd {}: epoll_ctl(ADD, fd {}, events {:#x}, data {:#x})", e.fd, w.tfd, w.events, w.data)
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let t = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1039\n\
                 tfd:        8 events:       19 data:             1234  pos:0 ino:20a07 sdev:f\n\
                 tfd:        3 events: 80000019 data:     deadbeefcafe  pos:0 ino:40f sdev:10\n";
        let w = parse_watches(t).unwrap();
        assert_eq!(w, vec![
            EpollWatch { tfd: 8, events: 0x19, data: 0x1234 },
            EpollWatch { tfd: 3, events: 0x8000_0019, data: 0xdead_beef_cafe },
        ]);
    }
}
