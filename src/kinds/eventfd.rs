//! eventfd: a 64-bit counter and the `EFD_SEMAPHORE` mode, both read from
//! fdinfo (`eventfd-count:` is hexadecimal; `eventfd-semaphore:` exists
//! since Linux 6.5 and a kernel without it is refused rather than guessed).
//! The descriptor itself is never read: that would consume the counter in
//! the target. Restore creates an eventfd with the counter at zero and
//! writes the saved count (the initial value of eventfd() is only 32 bits;
//! one write takes up to 0xffff_ffff_ffff_fffe). `O_NONBLOCK` is an ordinary
//! status flag, kept in `OpenFile::flags`.

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};

use super::{DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "eventfd", dump };

/// The text of /proc/PID/fdinfo/N of a probe.
pub(crate) fn fdinfo_text(p: &Probe) -> Result<String> {
    let path = format!("/proc/{}/fdinfo/{}", p.pid.0, p.fd.0);
    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}

/// The value of the first fdinfo line starting with `key`, trimmed.
pub(crate) fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

fn dump(p: &Probe, _: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.link != "anon_inode:[eventfd]" {
        return None;
    }
    Some(dump_inner(p).with_context(|| p.what()))
}

fn dump_inner(p: &Probe) -> Result<FileKind> {
    let text = fdinfo_text(p)?;
    let c = field(&text, "eventfd-count:").context("fdinfo has no eventfd-count")?;
    let count = u64::from_str_radix(c, 16).with_context(|| format!("eventfd-count {c:?}"))?;
    let semaphore = match field(&text, "eventfd-semaphore:") {
        Some(v) => v == "1",
        None => bail!("this kernel does not show eventfd-semaphore in fdinfo (needs Linux 6.5+)"),
    };
    Ok(FileKind::Eventfd { count, semaphore })
}

pub fn restore(of: &OpenFile, _: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Eventfd { count, semaphore } = &of.kind else { bail!("not an eventfd") };
    let mut fl = libc::EFD_CLOEXEC;
    if *semaphore {
        fl |= libc::EFD_SEMAPHORE;
    }
    if of.flags & libc::O_NONBLOCK as u32 != 0 {
        fl |= libc::EFD_NONBLOCK;
    }
    let fd = super::sys::eventfd(fl).context("eventfd")?;
    if *count > 0 {
        nix::unistd::write(&fd, &count.to_ne_bytes())
            .with_context(|| format!("eventfd: setting the counter to {count}"))?;
    }
    Ok(fd)
}
