//! Character devices: the memory devices (/dev/null, zero, full, random,
//! urandom), and terminals, which only a `--shell-job` dump and restore
//! take (restore gives the restored processes its own terminal).
//! Pseudo-terminal pairs held inside the tree are `pty.rs`'s; a slave whose
//! master is outside comes back here as `FileKind::Tty` (`pty::check`).

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::sys::stat::{major, minor};

use super::{open_with_flags, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "chardev", dump };

/// Major 1 minors of the memory devices that carry no state.
const MEM_MINORS: &[u64] = &[3 /* null */, 5 /* zero */, 7 /* full */, 8 /* random */, 9 /* urandom */];

/// Terminals: 4 (tty0-63, ttyS), 5 (/dev/tty, console, ptmx), 136-143 (pts).
pub fn is_tty_major(maj: u64) -> bool {
    maj == 4 || maj == 5 || (136..=143).contains(&maj)
}

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFCHR {
        return None;
    }
    let (maj, min) = (major(p.st.st_rdev), minor(p.st.st_rdev));
    if is_tty_major(maj) {
        if !sh.shell_job {
            return Some(Err(anyhow::anyhow!("{}: a terminal; use --shell-job", p.what())));
        }
        return Some(Ok(FileKind::Tty { path: p.link.clone() }));
    }
    if maj == 1 && MEM_MINORS.contains(&min) {
        return Some(Ok(FileKind::CharDev { path: p.link.clone(), rdev: p.st.st_rdev }));
    }
    Some(Err(anyhow::anyhow!(
        "{}: character device {maj}:{min} is not supported yet",
        p.what()
    )))
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    match &of.kind {
        FileKind::CharDev { path, rdev } => {
            let fd = open_with_flags(path, of.flags)
                .with_context(|| format!("opening device {path} with flags {:#o}", of.flags))?;
            let st = nix::sys::stat::fstat(fd.as_raw_fd()).with_context(|| format!("fstat {path}"))?;
            if st.st_mode & libc::S_IFMT != libc::S_IFCHR || st.st_rdev != *rdev {
                bail!(
                    "{path}: is device {}:{} here, was {}:{} at dump time",
                    major(st.st_rdev),
                    minor(st.st_rdev),
                    major(*rdev),
                    minor(*rdev)
                );
            }
            Ok(fd)
        }
        FileKind::Tty { path } => {
            if !ctx.shell_job {
                bail!("{path}: the image holds a terminal; restore with --shell-job");
            }
            // Our own terminal: the first of stdin, stdout, stderr that is one,
            // reopened so the description gets the saved flags.
            let Some(n) = (0..=2).find(|&n| nix::unistd::isatty(n).unwrap_or(false)) else {
                bail!("{path}: --shell-job needs a terminal on stdin, stdout or stderr of snap");
            };
            let ours = format!("/proc/self/fd/{n}");
            open_with_flags(&ours, of.flags)
                .with_context(|| format!("reopening our terminal ({ours}) in place of {path}"))
        }
        _ => bail!("not a character device"),
    }
}
