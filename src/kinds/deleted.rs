//! Files unlinked while open: their content is saved in a blob, and restore
//! recreates an unlinked file with it next to where the original was (under
//! the original name while the descriptions are opened, so they show it).

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::{open_with_flags, restore_pos, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "deleted", dump };

const SUFFIX: &str = " (deleted)";

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFREG || !p.link.ends_with(SUFFIX) || p.st.st_nlink != 0 {
        return None;
    }
    Some(dump_inner(p, sh).with_context(|| format!("{}: saving the deleted file's content", p.what())))
}

/// The whole content of the file behind a descriptor, read through a fresh
/// read-only description of the same inode (our copy may be write-only or
/// O_PATH, and its position is the target's).
pub(super) fn read_content(p: &Probe) -> Result<Vec<u8>> {
    let ours = format!("/proc/self/fd/{}", p.ours.as_raw_fd());
    let f = File::open(&ours).with_context(|| format!("reopening {ours} read-only"))?;
    let size = p.st.st_size as usize;
    let mut data = vec![0u8; size];
    let mut off = 0;
    while off < size {
        let n = f.read_at(&mut data[off..], off as u64).with_context(|| format!("pread at {off}"))?;
        if n == 0 {
            data.truncate(off); // shrank meanwhile; keep what is there
            break;
        }
        off += n;
    }
    Ok(data)
}

fn dump_inner(p: &Probe, sh: &mut DumpShared) -> Result<FileKind> {
    let data = read_content(p)?;
    // The blob is named after the description's id, which DumpCtx assigns
    // next; use the inode so two descriptions of one file share the blob.
    let blob = format!("deleted-{}-{}.data", p.st.st_dev, p.st.st_ino);
    if sh.saved.insert(blob.clone()) {
        sh.blobs.push((blob.clone(), data));
    }
    Ok(FileKind::Deleted {
        path: p.link.clone(),
        pos: p.pos,
        mode: p.st.st_mode & 0o7777,
        blob,
    })
}

/// A recreated deleted file, held while the descriptions of one image are
/// opened. `link`: a temporary name at the original path, removed on drop.
pub struct Held {
    file: File,
    link: Option<std::path::PathBuf>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(l) = self.link.take() {
            let _ = fs::remove_file(l);
        }
    }
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Deleted { path, pos, mode, blob } = &of.kind else { bail!("not a deleted file") };
    let orig = path.strip_suffix(SUFFIX).unwrap_or(path);
    let dir = Path::new(orig).parent().ok_or_else(|| anyhow!("{path}: no parent directory"))?;
    // One inode per dumped inode: every description of it (opened twice
    // before the unlink, or in several processes) sees the same content.
    if !ctx.deleted.contains_key(blob) {
        let data = (ctx.read_blob)(blob).with_context(|| format!("{path}: reading blob {blob}"))?;
        let tmp = create_unlinked(dir, *mode)
            .with_context(|| format!("{path}: creating an unlinked file in {}", dir.display()))?;
        tmp.write_all_at(&data, 0).with_context(|| format!("{path}: writing {} bytes", data.len()))?;
        // The umask may have narrowed the mode at creation.
        tmp.set_permissions(fs::Permissions::from_mode(*mode))
            .with_context(|| format!("{path}: chmod {mode:o}"))?;
        // Where the original name is free, give the file that name until
        // every description is open (the link is removed when the restore
        // context is dropped), so /proc/PID/fd shows "ORIG (deleted)" as at
        // dump time. Where it is taken, the descriptions are opened through
        // the anonymous file and show its name instead.
        let proc_path = format!("/proc/self/fd/{}", tmp.as_raw_fd());
        let link = nix::unistd::linkat(None, proc_path.as_str(), None, orig, nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW)
            .ok()
            .map(|_| std::path::PathBuf::from(orig));
        ctx.deleted.insert(blob.clone(), Held { file: tmp, link });
    }
    let held = &ctx.deleted[blob];
    let via = match &held.link {
        Some(l) => l.display().to_string(),
        None => format!("/proc/self/fd/{}", held.file.as_raw_fd()),
    };
    // A new description with the saved flags (possibly read-only or append).
    let fd = open_with_flags(&via, of.flags)
        .with_context(|| format!("{path}: reopening the recreated file ({via}) with flags {:#o}", of.flags))?;
    restore_pos(fd.as_fd(), of.flags, *pos).with_context(|| format!("{path}: seeking to {pos}"))?;
    Ok(fd)
}

/// An anonymous regular file in `dir`: O_TMPFILE where the filesystem has
/// it, else a uniquely named file that is unlinked at once.
fn create_unlinked(dir: &Path, mode: u32) -> Result<File> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(mode & 0o777)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(f) => return Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)) => {}
        Err(e) => return Err(e).context("open(O_TMPFILE)"),
    }
    for i in 0..100u32 {
        let name = dir.join(format!(".snap-deleted-{}-{i}", std::process::id()));
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .custom_flags(libc::O_CLOEXEC)
            .open(&name)
        {
            Ok(f) => {
                fs::remove_file(&name).with_context(|| format!("unlinking {}", name.display()))?;
                return Ok(f);
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", name.display())),
        }
    }
    bail!("no free temporary name in {}", dir.display())
}
