//! signalfd: the accepted signal set (fdinfo `sigmask:`, hexadecimal) and
//! `O_NONBLOCK`. Signals pending when the dump was taken belong to the
//! process, not to the signalfd, and are restored with the process; the
//! restored signalfd reads them as the original would.

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};

use super::eventfd::{fdinfo_text, field};
use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "signalfd", dump };

fn dump(p: &Probe, _: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.link != "anon_inode:[signalfd]" {
        return None;
    }
    Some(dump_inner(p).with_context(|| p.what()))
}

fn dump_inner(p: &Probe) -> Result<FileKind> {
    let text = fdinfo_text(p)?;
    let m = field(&text, "sigmask:").context("fdinfo has no sigmask")?;
    let sigmask = u64::from_str_radix(m, 16).with_context(|| format!("sigmask {m:?}"))?;
    Ok(FileKind::Signalfd { sigmask })
}

pub fn restore(of: &OpenFile, _: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Signalfd { sigmask } = &of.kind else { bail!("not a signalfd") };
    let mut fl = libc::SFD_CLOEXEC;
    if of.flags & libc::O_NONBLOCK as u32 != 0 {
        fl |= libc::SFD_NONBLOCK;
    }
    super::sys::signalfd(*sigmask, fl).with_context(|| format!("signalfd(mask {sigmask:#x})"))
}
