//! Dirty-page tracking between dumps (DESIGN §1, "Dirty tracking";
//! docs/incremental.md).
//!
//! An incremental dump reads only the pages written since its parent and
//! takes every other page's hash from the parent's page map. Which pages
//! were written comes from one of two kernel mechanisms:
//!
//! * **uffd-wp** (these machines): a userfaultfd made inside the target by
//!   the parasite and taken by snap registers the process's private
//!   mappings for asynchronous write-protection. `PAGEMAP_SCAN` then lists
//!   the pages written since (by user code or by the kernel) and protects
//!   them again in the same walk. Someone must hold the uffd between dumps:
//!   a `snap run` supervisor, or for plain `-t` dumps a small holder process
//!   (`holder.rs`) that the program cannot see.
//! * **soft-dirty**: `4` written to `/proc/PID/clear_refs` after a dump, the
//!   soft-dirty category of `PAGEMAP_SCAN` at the next. Nothing to hold.
//!
//! Where neither applies (a new process, a process that exec'd, a mapping
//! created or moved since, shared memory, tracking consumed by another dump)
//! every page is read and hashed, and only pages the chain does not hold
//! yet are stored: correct, only slower. A page counts as unchanged only if
//! tracking covers it, says it was not written, it is not the shared zero
//! page, and the parent has it at the same address: anything else is read.

pub mod holder;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};

use crate::images::records::{Vma, VmaKind};
use crate::images::PageHash;
use crate::parasite::Parasite;
use crate::sys::uffd;
use crate::types::{Pid, PAGE_SIZE};

pub const UFFD_WP: &str = "uffd-wp";
pub const SOFT_DIRTY: &str = "soft-dirty";
/// Top of the user address space on x86_64 (4-level paging: TASK_SIZE).
const USER_END: u64 = (1 << 47) - crate::types::PAGE_SIZE as u64;
/// `PAGEMAP_SCAN` category of soft-dirty pages.
const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// The tracking of one process, kept between dumps.
pub struct ProcTrack {
    /// /proc/PID/stat start time: the same pid later is another process.
    pub start_time: u64,
    /// The uffd (uffd-wp backend).
    pub uffd: Option<OwnedFd>,
}

/// The tracking of every process of a dump, handed from one dump to the
/// next (through a holder or a supervisor).
pub struct TrackSet {
    /// `UFFD_WP` or `SOFT_DIRTY`.
    pub backend: String,
    /// The id of the image whose dump armed it: the next dump trusts it only
    /// against that image as its parent.
    pub generation: String,
    pub procs: BTreeMap<Pid, ProcTrack>,
}

/// The tracking backend this kernel offers, soft-dirty first (nothing to
/// hold), probed once.
pub fn backend() -> Option<&'static str> {
    use std::sync::OnceLock;
    static B: OnceLock<Option<&'static str>> = OnceLock::new();
    *B.get_or_init(|| {
        if crate::sys::probe::probe_soft_dirty().is_ok() && crate::sys::probe::probe_uffd_pagemap_scan().is_ok() {
            Some(SOFT_DIRTY)
        } else if crate::sys::probe::probe_uffd_pagemap_scan().is_ok() {
            Some(UFFD_WP)
        } else {
            None
        }
    })
}

fn pagemap(pid: Pid) -> Result<std::fs::File> {
    let path = format!("/proc/{}/pagemap", pid.0);
    std::fs::File::open(&path).with_context(|| format!("{pid}: opening {path}"))
}

/// What tracking tells about a process's pages since the dump that armed
/// it (sorted, disjoint ranges).
#[derive(Debug, Default)]
pub struct Dirt {
    /// Pages not written since: the parent's copy is current.
    pub unchanged: Vec<(u64, u64)>,
    /// Pages mapped to the shared zero page (read, never written): zero,
    /// nothing to read or store.
    pub zero: Vec<(u64, u64)>,
}

/// Ask the kernel which pages changed since the dump that armed tracking,
/// and reset the tracking for the next dump (uffd-wp: written pages are
/// protected again in the same walk). Call with the process stopped, before
/// anything (the parasite) writes to its memory.
pub fn dirt(pid: Pid, backend: &str) -> Result<Dirt> {
    let pm = pagemap(pid)?;
    let ctx = || format!("{pid}: dirty pages ({backend})");
    let z = uffd::PAGE_IS_PFNZERO;
    let (regs, clean) = if backend == SOFT_DIRTY {
        // Present or swapped pages, with their soft-dirty bit. Mappings made
        // since the last clear are soft-dirty as a whole.
        let any = uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED;
        (uffd::scan(pm.as_fd(), 0, USER_END, 0, 0, any, PAGE_IS_SOFT_DIRTY | z).with_context(ctx)?, 0)
    } else {
        // Every page in a mapping registered for async write-protection,
        // holes included, with its written and zero-page bits; then the
        // written ones are protected again.
        let ret = uffd::PAGE_IS_WPALLOWED | uffd::PAGE_IS_WRITTEN | z;
        let regs = uffd::scan(pm.as_fd(), 0, USER_END, 0, 0, uffd::PAGE_IS_WPALLOWED, ret).with_context(ctx)?;
        let w = uffd::PAGE_IS_WRITTEN;
        uffd::scan(pm.as_fd(), 0, USER_END, uffd::PM_SCAN_WP_MATCHING, w, 0, w).with_context(ctx)?;
        (regs, uffd::PAGE_IS_WPALLOWED)
    };
    let pick = |want: &dyn Fn(u64) -> bool| regs.iter().filter(|r| want(r.2)).map(|r| (r.0, r.1)).collect();
    Ok(Dirt { unchanged: pick(&|c| c == clean), zero: pick(&|c| c & z != 0) })
}

/// Mappings whose pages tracking follows: private memory whose contents
/// snap saves (anonymous, and the written pages of private file mappings).
fn trackable(v: &Vma) -> bool {
    !v.shared && matches!(v.kind, VmaKind::Anon | VmaKind::File { .. })
}

/// Arm tracking of `pid` for the next dump, with the parasite still in
/// (uffd-wp makes its uffd inside the process). `old` is the tracking this
/// dump used, if any (kept when the process did not exec since).
pub fn arm(pid: Pid, par: &mut Parasite, vmas: &[Vma], backend: &str, start_time: u64, old: Option<ProcTrack>) -> Result<ProcTrack> {
    if backend == SOFT_DIRTY {
        let path = format!("/proc/{}/clear_refs", pid.0);
        std::fs::write(&path, "4").with_context(|| format!("{pid}: clearing soft-dirty bits ({path})"))?;
        return Ok(ProcTrack { start_time, uffd: None });
    }
    let fd = match old.and_then(|o| o.uffd) {
        Some(fd) => fd,
        None => new_uffd(pid, par)?,
    };
    // Mappings already covered keep their protection (the scan renewed it);
    // the others (new, moved, or never registered) are registered and
    // protected as a whole.
    let pm = pagemap(pid)?;
    let covered = uffd::scan(pm.as_fd(), 0, USER_END, 0, 0, uffd::PAGE_IS_WPALLOWED, uffd::PAGE_IS_WPALLOWED)
        .with_context(|| format!("{pid}: mappings under tracking"))?;
    for v in vmas.iter().filter(|v| trackable(v)) {
        if covered.iter().any(|c| c.0 <= v.start && v.end <= c.1) {
            continue;
        }
        // A mapping another uffd already has (EBUSY) or the kernel refuses
        // stays untracked: its pages are read in full at every dump.
        if uffd::register_wp(fd.as_fd(), v.start, v.end).is_ok() {
            uffd::write_protect(fd.as_fd(), v.start, v.end)
                .with_context(|| format!("{pid}: write-protecting {:#x}-{:#x}", v.start, v.end))?;
        }
    }
    Ok(ProcTrack { start_time, uffd: Some(fd) })
}

/// A userfaultfd of `pid`'s address space, made inside it and taken out.
fn new_uffd(pid: Pid, par: &mut Parasite) -> Result<OwnedFd> {
    let tid = crate::types::Tid(pid.0);
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = match par.create_fd(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])? {
        Ok(fd) => fd,
        // Unprivileged processes may only track user-mode faults, which is
        // all asynchronous write-protection needs.
        Err(libc::EPERM) => par
            .create_fd(libc::SYS_userfaultfd, [flags | uffd::UFFD_USER_MODE_ONLY, 0, 0, 0, 0, 0])?
            .map_err(|e| anyhow::anyhow!("{pid}: userfaultfd(UFFD_USER_MODE_ONLY): errno {e}"))?,
        Err(e) => anyhow::bail!("{pid} ({tid}): userfaultfd: {}", std::io::Error::from_raw_os_error(e)),
    };
    uffd::api_wp_async(fd.as_fd()).with_context(|| format!("{pid}: userfaultfd"))?;
    Ok(fd)
}

/// Append page `a` to sorted runs `(address, length)`, merging.
fn push_page(runs: &mut Vec<(u64, usize)>, a: u64) {
    match runs.last_mut() {
        Some((s, l)) if *s + *l as u64 == a => *l += PAGE_SIZE,
        _ => runs.push((a, PAGE_SIZE)),
    }
}

/// A cursor over sorted disjoint ranges, for addresses asked in increasing
/// order.
struct InRanges<'a> {
    r: &'a [(u64, u64)],
    i: usize,
}

impl InRanges<'_> {
    fn contains(&mut self, a: u64) -> bool {
        while self.i < self.r.len() && self.r[self.i].1 <= a {
            self.i += 1;
        }
        self.i < self.r.len() && self.r[self.i].0 <= a
    }
}

/// Split the present pages `runs` (sorted `(address, length)`) of one
/// mapping into the ranges to read and the pages to take from the parent
/// (appended to `reuse` as runs): a page is taken only if it is unchanged
/// and the parent page map (sorted) has it; a zero page is neither.
/// `parent_at` is a cursor into `parent` kept across calls (mappings come
/// in address order).
pub fn split(
    runs: &[(u64, usize)],
    dirt: &Dirt,
    parent: &[(u64, PageHash)],
    parent_at: &mut usize,
    reuse: &mut Vec<(u64, usize)>,
) -> Vec<(u64, usize)> {
    let mut read: Vec<(u64, usize)> = Vec::new();
    let first = runs.first().map_or(0, |r| r.0);
    let mut clean = InRanges { r: &dirt.unchanged, i: dirt.unchanged.partition_point(|r| r.1 <= first) };
    let mut zero = InRanges { r: &dirt.zero, i: dirt.zero.partition_point(|r| r.1 <= first) };
    for &(start, len) in runs {
        for a in (start..start + len as u64).step_by(PAGE_SIZE) {
            if zero.contains(a) {
                continue;
            }
            while *parent_at < parent.len() && parent[*parent_at].0 < a {
                *parent_at += 1;
            }
            match parent.get(*parent_at) {
                Some(&(pa, _)) if pa == a && clean.contains(a) => push_page(reuse, a),
                _ => push_page(&mut read, a),
            }
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_takes_only_clean_pages_the_parent_has() {
        let p = PAGE_SIZE as u64;
        // Pages 0..8 present; 2..6 unchanged; 7 the zero page; the parent
        // has 1, 2, 3, 5.
        let runs = [(0, 8 * PAGE_SIZE)];
        let dirt = Dirt { unchanged: vec![(2 * p, 6 * p)], zero: vec![(7 * p, 8 * p)] };
        let parent = [(p, 11), (2 * p, 12), (3 * p, 13), (5 * p, 15)];
        let (mut at, mut reuse) = (0, Vec::new());
        let read = split(&runs, &dirt, &parent, &mut at, &mut reuse);
        assert_eq!(reuse, vec![(2 * p, 2 * PAGE_SIZE), (5 * p, PAGE_SIZE)]);
        assert_eq!(read, vec![(0, 2 * PAGE_SIZE), (4 * p, PAGE_SIZE), (6 * p, PAGE_SIZE)]);
    }
}
