//! userfaultfd write-protection and the `PAGEMAP_SCAN` ioctl: the dirty
//! tracking backend of kernels without soft-dirty (DESIGN §1, §2).
//!
//! A uffd created inside the target (by the parasite) and taken with
//! `pidfd_getfd` acts on the target's address space from any process that
//! holds it: registering, write-protecting and scanning all work from snap.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{Context, Result};

pub const UFFD_API: u64 = 0xAA;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `userfaultfd()` flag: only faults from user mode (allowed unprivileged).
pub const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F; // _IOWR(0xAA, 0x3F, 24 bytes)
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00; // _IOWR(0xAA, 0x00, 32 bytes)
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06; // _IOWR(0xAA, 0x06, 24 bytes)
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610; // _IOWR('f', 16, 96 bytes)

/// `PAGEMAP_SCAN` flags.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PAGEMAP_SCAN` page categories.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `UFFDIO_API` asking for asynchronous write-protection that also covers
/// pages never touched.
pub fn api_wp_async(uffd: BorrowedFd<'_>) -> Result<()> {
    // struct uffdio_api { u64 api, features, ioctls }
    let mut api = [UFFD_API, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, 0];
    // SAFETY: UFFDIO_API reads and writes exactly this 24-byte struct.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error()).context("UFFDIO_API with WP_ASYNC|WP_UNPOPULATED");
    }
    Ok(())
}

/// Register `[start, end)` of the uffd's address space for write-protection.
/// The errno stays reachable: EBUSY means another uffd has the range.
pub fn register_wp(uffd: BorrowedFd<'_>, start: u64, end: u64) -> io::Result<()> {
    // struct uffdio_register { struct uffdio_range { start, len }; mode; ioctls }
    let mut reg = [start, end - start, UFFDIO_REGISTER_MODE_WP, 0];
    // SAFETY: UFFDIO_REGISTER reads and writes exactly this 32-byte struct.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, reg.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Write-protect `[start, end)` (registered before).
pub fn write_protect(uffd: BorrowedFd<'_>, start: u64, end: u64) -> io::Result<()> {
    // struct uffdio_writeprotect { struct uffdio_range { start, len }; mode }
    let mut wp = [start, end - start, UFFDIO_WRITEPROTECT_MODE_WP];
    // SAFETY: UFFDIO_WRITEPROTECT reads exactly this 24-byte struct.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, wp.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `PAGEMAP_SCAN` query over `[start, end)` of the process whose
/// `/proc/PID/pagemap` is `pagemap`: the ranges of pages whose categories
/// have every bit of `all` and any bit of `any` (0: no condition), each with
/// its categories masked by `ret`. With `PM_SCAN_WP_MATCHING` in `flags` the
/// matching pages are write-protected again in the same walk.
pub fn scan(pagemap: BorrowedFd<'_>, start: u64, end: u64, flags: u64, all: u64, any: u64, ret: u64) -> Result<Vec<(u64, u64, u64)>> {
    scan_raw(pagemap, start, end, flags, all, any, ret).with_context(|| format!("PAGEMAP_SCAN {start:#x}-{end:#x}"))
}

/// [`scan`], with the kernel's error as is (ENOTTY: no `PAGEMAP_SCAN`).
pub fn scan_raw(pagemap: BorrowedFd<'_>, start: u64, end: u64, flags: u64, all: u64, any: u64, ret: u64) -> io::Result<Vec<(u64, u64, u64)>> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut regions = vec![[0u64; 3]; 1024]; // struct page_region { start, end, categories }
    let mut from = start;
    while from < end {
        // struct pm_scan_arg (12 u64 words)
        let mut arg: [u64; 12] = [
            96, flags, from, end, 0, regions.as_mut_ptr() as u64, regions.len() as u64, 0, 0, all, any, ret,
        ];
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len regions
        // into `regions` and walk_end into `arg`; both live across the call.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, arg.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for r in &regions[..n as usize] {
            match out.last_mut() {
                Some(l) if l.1 == r[0] && l.2 == r[2] => l.1 = r[1],
                _ => out.push((r[0], r[1], r[2])),
            }
        }
        let walk_end = arg[4];
        if walk_end <= from {
            break;
        }
        from = walk_end;
    }
    Ok(out)
}
