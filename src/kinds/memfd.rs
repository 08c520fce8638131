//! memfd descriptors (`/memfd:NAME (deleted)`): name, content and seals.
//! Restore makes one memfd per dumped inode (every description of it, and a
//! shared mapping of it, see the same memory: `restore/pool.rs` maps the
//! same memfd for `SharedAnon` mappings of that inode).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::{open_with_flags, restore_pos, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, FilesImage, OpenFile};

pub const KIND: Kind = Kind { name: "memfd", dump };

const PREFIX: &str = "/memfd:";
const SUFFIX: &str = " (deleted)";

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFREG || !p.link.starts_with(PREFIX) {
        return None;
    }
    Some(dump_inner(p, sh).with_context(|| format!("{}: saving the memfd", p.what())))
}

fn dump_inner(p: &Probe, sh: &mut DumpShared) -> Result<FileKind> {
    let name = p.link.strip_prefix(PREFIX).unwrap_or(&p.link);
    let name = name.strip_suffix(SUFFIX).unwrap_or(name).to_string();
    let seals = match fcntl(p.ours.as_raw_fd(), FcntlArg::F_GET_SEALS) {
        Ok(s) => s as u32,
        Err(nix::errno::Errno::EINVAL) => u32::MAX, // created without MFD_ALLOW_SEALING
        Err(e) => return Err(e).context("F_GET_SEALS"),
    };
    let blob = format!("memfd-{}-{}.data", p.st.st_dev, p.st.st_ino);
    if sh.saved.insert(blob.clone()) {
        sh.blobs.push((blob.clone(), super::deleted::read_content(p)?));
    }
    Ok(FileKind::Memfd { name, ino: p.st.st_ino, pos: p.pos, seals, blob })
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Memfd { name, pos, seals, blob, .. } = &of.kind else { bail!("not a memfd") };
    if !ctx.memfds.contains_key(blob) {
        let data = (ctx.read_blob)(blob).with_context(|| format!("memfd {name}: reading blob {blob}"))?;
        let sealing = *seals != u32::MAX;
        let mut fl = MemFdCreateFlag::MFD_CLOEXEC;
        if sealing {
            fl |= MemFdCreateFlag::MFD_ALLOW_SEALING;
        }
        let cname = CString::new(name.as_str()).with_context(|| format!("memfd name {name:?}"))?;
        let fd = memfd_create(&cname, fl).with_context(|| format!("memfd_create {name:?}"))?;
        let f = std::fs::File::from(fd);
        f.write_all_at(&data, 0).with_context(|| format!("memfd {name}: writing {} bytes", data.len()))?;
        if sealing && *seals != 0 {
            let s = SealFlag::from_bits_truncate(*seals as i32);
            fcntl(f.as_raw_fd(), FcntlArg::F_ADD_SEALS(s)).with_context(|| format!("memfd {name}: seals {seals:#x}"))?;
        }
        ctx.memfds.insert(blob.clone(), f.into());
    }
    let via = format!("/proc/self/fd/{}", ctx.memfds[blob].as_raw_fd());
    let fd = open_with_flags(&via, of.flags).with_context(|| format!("memfd {name}: reopening with flags {:#o}", of.flags))?;
    restore_pos(fd.as_fd(), of.flags, *pos).with_context(|| format!("memfd {name}: seeking to {pos}"))?;
    Ok(fd)
}

/// Restored memfds by inode number of the dump, for shared mappings of them.
pub fn by_inode(files: &FilesImage, restored: &HashMap<u32, OwnedFd>) -> HashMap<u64, u32> {
    let mut m = HashMap::new();
    for of in &files.files {
        if let FileKind::Memfd { ino, .. } = of.kind {
            if restored.contains_key(&of.id) {
                m.entry(ino).or_insert(of.id);
            }
        }
    }
    m
}
