//! pidfd descriptors (`pidfd_open`, `clone(CLONE_PIDFD)`; Python 3.12's
//! asyncio watches its children with them). The pid comes from fdinfo
//! (`Pid:`) and must be a process of the dump: its restored copy is what
//! the new pidfd refers to. It cannot be opened in snap before the tree
//! exists, so restore puts a placeholder (/dev/null) at the descriptor's
//! number and, once every process exists, each holder opens the real pidfd
//! itself (`restore::task::pidfds`, a remote `pidfd_open` + `dup3`). A pidfd
//! shared by several processes becomes one per process; one of a process
//! that has exited (`Pid: -1`) is refused.

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};

use super::eventfd::{fdinfo_text, field};
use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "pidfd", dump };

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.link != "anon_inode:[pidfd]" && !p.link.starts_with("pidfd:") {
        return None;
    }
    Some(dump_inner(p, sh).with_context(|| p.what()))
}

fn dump_inner(p: &Probe, sh: &DumpShared) -> Result<FileKind> {
    let text = fdinfo_text(p)?;
    let v = field(&text, "Pid:").context("fdinfo has no Pid")?;
    let pid: i32 = v.split_whitespace().next().unwrap_or("").parse().with_context(|| format!("Pid {v:?}"))?;
    if pid <= 0 {
        bail!("a pidfd of a process that has exited is not supported yet");
    }
    if !sh.dumped.iter().any(|d| d.0 == pid) {
        bail!("a pidfd of pid {pid}, which is not in the dump: dump it too (-t) or close the pidfd");
    }
    Ok(FileKind::Pidfd { pid })
}

/// The placeholder that holds the descriptor's number until the holder
/// opens the real pidfd.
pub fn restore(of: &OpenFile, _ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Pidfd { pid } = of.kind else { bail!("not a pidfd") };
    let f = std::fs::File::open("/dev/null").with_context(|| format!("placeholder for the pidfd of pid {pid}"))?;
    Ok(f.into())
}
