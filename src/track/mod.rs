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
use crate::parasite::Parasite;
use crate::spans::{self, intersect, subtract, union, window};
pub use crate::spans::Spans;
use crate::sys::uffd;
use crate::types::Pid;

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


/// What tracking tells about a process's pages since the dump that armed
/// it (sorted, disjoint spans).
#[derive(Debug, Default)]
pub struct Dirt {
    /// Pages not written since: the parent's copy is current.
    pub unchanged: Spans,
    /// Pages mapped to the shared zero page (read, never written): zero,
    /// nothing to read or store.
    pub zero: Spans,
    /// uffd-wp: the registered ranges, and within them the pages present,
    /// swapped and written, as the same walk saw them (so the dump need not
    /// walk the page tables of these mappings again). Empty for soft-dirty.
    pub covered: Spans,
    present: Spans,
    /// Swapped (or a pte marker: the walk cannot tell) and written since.
    swapped_written: Spans,
    /// Swapped or a pte marker, not written since.
    swapped_clean: Spans,
}

/// Ask the kernel which pages changed since the dump that armed tracking,
/// and reset the tracking for the next dump (uffd-wp: written pages are
/// protected again in the same walk). Call with the process stopped, before
/// anything (the parasite) writes to its memory.
pub fn dirt(pid: Pid, backend: &str) -> Result<Dirt> {
    let pm = crate::dump::mm::open_pagemap(pid)?;
    let ctx = || format!("{pid}: dirty pages ({backend})");
    let z = uffd::PAGE_IS_PFNZERO;
    if backend == SOFT_DIRTY {
        // Present or swapped pages, with their soft-dirty bit. Mappings made
        // since the last clear are soft-dirty as a whole.
        let any = uffd::PAGE_IS_PRESENT | uffd::PAGE_IS_SWAPPED;
        let regs = uffd::scan(pm.as_fd(), 0, USER_END, 0, 0, any, PAGE_IS_SOFT_DIRTY | z).with_context(ctx)?;
        let pick = |want: &dyn Fn(u64) -> bool| regs.iter().filter(|r| want(r.2)).map(|r| (r.0, r.1)).collect();
        return Ok(Dirt { unchanged: pick(&|c| c == 0), zero: pick(&|c| c & z != 0), ..Dirt::default() });
    }
    // A walk over every page of the mappings registered for async
    // write-protection, holes included: each run with its written,
    // zero-page, present and swapped bits (so the dump need not walk these
    // mappings' page tables again); then a second walk protects the written
    // pages again. Both in one walk (PM_SCAN_WP_MATCHING with these
    // categories) was tried and lost writes: a thread's later writes to
    // pages it had written before went unseen (tests/e2e_incr.rs, step 10),
    // while the kernel's dedicated written-only walk used here does not.
    use uffd::{PAGE_IS_PRESENT as P, PAGE_IS_SWAPPED as S, PAGE_IS_WPALLOWED as A, PAGE_IS_WRITTEN as W};
    let regs = uffd::scan(pm.as_fd(), 0, USER_END, 0, 0, A, A | W | z | P | S).with_context(ctx)?;
    uffd::scan(pm.as_fd(), 0, USER_END, uffd::PM_SCAN_WP_MATCHING, W, 0, W).with_context(ctx)?;
    let pick = |want: &dyn Fn(u64) -> bool| -> Spans {
        let mut out: Spans = Vec::new();
        for r in regs.iter().filter(|r| want(r.2)) {
            spans::push(&mut out, r.0, r.1);
        }
        out
    };
    Ok(Dirt {
        unchanged: pick(&|c| c & (W | z) == 0),
        zero: pick(&|c| c & z != 0),
        covered: pick(&|_| true),
        present: pick(&|c| c & P != 0),
        swapped_written: pick(&|c| c & S != 0 && c & W != 0),
        swapped_clean: pick(&|c| c & S != 0 && c & W == 0),
    })
}

/// Bytes of tracked memory written so far (no protection changed): what an
/// incremental dump will read at least, asked before the processes stop.
pub fn written_bytes(pid: Pid) -> Result<u64> {
    let pm = crate::dump::mm::open_pagemap(pid)?;
    let w = uffd::PAGE_IS_WPALLOWED | uffd::PAGE_IS_WRITTEN;
    let regs = uffd::scan(pm.as_fd(), 0, USER_END, 0, w, 0, w).with_context(|| format!("{pid}: written pages"))?;
    Ok(regs.iter().map(|r| r.1 - r.0).sum())
}

impl Dirt {
    /// The pages of `vma` that hold content, from the tracking walk alone,
    /// when `vma` is private anonymous memory that tracking covers whole
    /// (else `None`: ask [`crate::dump::mm::dump_ranges`]). Present pages
    /// and swapped pages written since count; a swapped entry not written
    /// since is either a page swapped out unchanged or a pte marker left
    /// where a protected page was zapped (`MADV_DONTNEED`): it is looked up
    /// in the pagemap, only where the parent has a page to give.
    pub fn present_runs(&self, pm: &std::fs::File, vma: &Vma, parent: &[(u64, u64)]) -> Result<Option<Vec<(u64, usize)>>> {
        if vma.shared || !matches!(vma.kind, VmaKind::Anon) {
            return Ok(None);
        }
        let (lo, hi) = (vma.start, vma.end);
        if subtract(&[(lo, hi)], window(&self.covered, lo, hi)).first().is_some() {
            return Ok(None);
        }
        let clip = |l: &[(u64, u64)]| intersect(&[(lo, hi)], window(l, lo, hi));
        let mut spans = clip(&self.present);
        spans = union(&spans, &clip(&self.swapped_written));
        let maybe = intersect(&clip(&self.swapped_clean), window(parent, lo, hi));
        let mut found = Vec::new();
        for &(s, e) in &maybe {
            crate::dump::mm::content_runs(pm, s, e, &mut found)?;
        }
        spans = union(&spans, &spans::from_runs(&found));
        Ok(Some(spans::to_runs(&spans)))
    }
}

/// Mappings whose pages tracking follows: private memory whose contents
/// snap saves (anonymous, and the written pages of private file mappings).
fn trackable(v: &Vma) -> bool {
    !v.shared && matches!(v.kind, VmaKind::Anon | VmaKind::File { .. })
}

/// Arm tracking of `pid` for the next dump, with the parasite still in
/// (uffd-wp makes its uffd inside the process). `old` is the tracking this
/// dump used, if any (kept when the process did not exec since).
/// `covered`: the registered ranges if this dump's [`dirt`] walk saw them
/// (saves another walk while the process is stopped).
pub fn arm(
    pid: Pid,
    par: &mut Parasite,
    vmas: &[Vma],
    backend: &str,
    start_time: u64,
    old: Option<ProcTrack>,
    covered: Option<&[(u64, u64)]>,
) -> Result<ProcTrack> {
    if backend == SOFT_DIRTY {
        let path = format!("/proc/{}/clear_refs", pid.0);
        std::fs::write(&path, "4").with_context(|| format!("{pid}: clearing soft-dirty bits ({path})"))?;
        return Ok(ProcTrack { start_time, uffd: None });
    }
    let (fd, fd_was_old) = match old.and_then(|o| o.uffd) {
        Some(fd) => (fd, true),
        None => (new_uffd(pid, par)?, false),
    };
    // Mappings already covered keep their protection (the scan renewed it);
    // the others (new, moved, or never registered) are registered and
    // protected as a whole.
    let walked;
    let covered: &[(u64, u64)] = match (covered, &fd_was_old) {
        (Some(c), true) => c,
        _ => {
            let pm = crate::dump::mm::open_pagemap(pid)?;
            let regs = uffd::scan(pm.as_fd(), 0, USER_END, 0, 0, uffd::PAGE_IS_WPALLOWED, uffd::PAGE_IS_WPALLOWED)
                .with_context(|| format!("{pid}: mappings under tracking"))?;
            walked = regs.into_iter().map(|r| (r.0, r.1)).collect::<Spans>();
            &walked
        }
    };
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

/// Split the present pages `runs` (sorted `(address, length)`) of one
/// mapping into the ranges to read and the runs to take from the parent
/// (appended to `reuse`): a page is taken only if it is unchanged and the
/// parent's page map has it (`parent`: its spans, `ImageReader::pagemap_spans`); a zero page is
/// neither. Works on runs: a 1 GiB mapping with a few thousand written
/// pages costs a few thousand steps, not a quarter million.
pub fn split(runs: &[(u64, usize)], dirt: &Dirt, parent: &[(u64, u64)], reuse: &mut Vec<(u64, usize)>) -> Vec<(u64, usize)> {
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Vec::new();
    };
    let (lo, hi) = (first.0, last.0 + last.1 as u64);
    let present = spans::from_runs(runs);
    let nonzero = subtract(&present, window(&dirt.zero, lo, hi));
    let take = intersect(&intersect(&nonzero, window(&dirt.unchanged, lo, hi)), window(parent, lo, hi));
    for &(s, e) in &take {
        match reuse.last_mut() {
            Some((rs, rl)) if *rs + *rl as u64 == s => *rl += (e - s) as usize,
            _ => reuse.push((s, (e - s) as usize)),
        }
    }
    spans::to_runs(&subtract(&nonzero, &take))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::PageHash;
    use crate::types::PAGE_SIZE;

/// The addresses a page map covers, as spans.
fn spans_of(map: &[(u64, PageHash)]) -> Spans {
    let mut out: Spans = Vec::new();
    for &(a, _) in map {
        spans::push(&mut out, a, a + PAGE_SIZE as u64);
    }
    out
}

    #[test]
    fn split_takes_only_clean_pages_the_parent_has() {
        let p = PAGE_SIZE as u64;
        // Pages 0..8 present; 2..6 unchanged; 7 the zero page; the parent
        // has 1, 2, 3, 5.
        let runs = [(0, 8 * PAGE_SIZE)];
        let dirt = Dirt { unchanged: vec![(2 * p, 6 * p)], zero: vec![(7 * p, 8 * p)], ..Dirt::default() };
        let parent = spans_of(&[(p, 11), (2 * p, 12), (3 * p, 13), (5 * p, 15)]);
        let mut reuse = Vec::new();
        let read = split(&runs, &dirt, &parent, &mut reuse);
        assert_eq!(reuse, vec![(2 * p, 2 * PAGE_SIZE), (5 * p, PAGE_SIZE)]);
        assert_eq!(read, vec![(0, 2 * PAGE_SIZE), (4 * p, PAGE_SIZE), (6 * p, PAGE_SIZE)]);
    }
}
