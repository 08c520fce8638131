//! Regular files and directories, reopened by path.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{bail, Context, Result};

use super::{open_with_flags, restore_pos, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileId, FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "regular", dump };

pub fn file_id(path: &str, st: &nix::sys::stat::FileStat) -> FileId {
    FileId {
        path: path.to_string(),
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
    }
}

fn dump(p: &Probe, _: &mut DumpShared) -> Option<Result<FileKind>> {
    let t = p.file_type();
    if (t != libc::S_IFREG && t != libc::S_IFDIR) || !p.link.starts_with('/') {
        return None;
    }
    if p.link.ends_with(" (deleted)") {
        // Unlinked here but linked elsewhere (nlink > 0): no path reaches it.
        return Some(Err(anyhow::anyhow!(
            "{}: the file was unlinked from this path but has {} other link(s); not supported yet",
            p.what(),
            p.st.st_nlink
        )));
    }
    Some(Ok(FileKind::Regular { file: file_id(&p.link, &p.st), pos: p.pos }))
}

pub fn restore(of: &OpenFile, _: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Regular { file, pos } = &of.kind else { bail!("not a regular file") };
    let fd = match open_with_flags(&file.path, of.flags) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: the file is missing (it was open at dump time, inode {})", file.path, file.ino)
        }
        Err(e) => return Err(e).with_context(|| format!("opening {} with flags {:#o}", file.path, of.flags)),
    };
    restore_pos(fd.as_fd(), of.flags, *pos)
        .with_context(|| format!("{}: seeking to {pos}", file.path))?;
    Ok(fd)
}
