//! Memory mappings: /proc/PID/maps (+ smaps VmFlags) into `Vma`s, and the
//! page ranges of each VMA that must be saved, from /proc/PID/pagemap.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};

use anyhow::{anyhow, bail, Context, Result};

use crate::images::records::{FileId, Vma, VmaKind};
use crate::types::{Pid, PAGE_SIZE};

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;
/// Swap type (bits 0-4 of a swapped entry) of a pte marker: the kernel keeps
/// the top type for it. A marker (left by uffd write-protection on a page
/// never touched) holds no content.
const SWP_PTE_MARKER: u64 = 31;

/// Present, or swapped out for real (not a pte marker).
fn has_content(e: u64) -> bool {
    e & PM_PRESENT != 0 || (e & PM_SWAPPED != 0 && e & 0x1f != SWP_PTE_MARKER)
}
/// Pagemap entries read per pread: 2 MiB of entries covers 1 GiB of memory.
const PAGEMAP_CHUNK: usize = 262_144;

/// One parsed line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq)]
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    pub pgoff: u64,
    pub inode: u64,
    /// Major number of the device (0 for the kernel's internal mounts).
    pub dev_major: u32,
    /// Everything after the inode, leading blanks removed ("" if none).
    pub path: String,
}

/// Split off the next whitespace-delimited token.
fn token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    let end = s.find(' ').unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

pub fn parse_maps_line(line: &str) -> Result<MapsLine> {
    let bad = || anyhow!("malformed maps line {line:?}");
    let (range, r) = token(line).ok_or_else(bad)?;
    let (perms, r) = token(r).ok_or_else(bad)?;
    let (off, r) = token(r).ok_or_else(bad)?;
    let (dev, r) = token(r).ok_or_else(bad)?;
    let (ino, r) = token(r).ok_or_else(bad)?;
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(bad());
    }
    let mut prot = 0u32;
    if p[0] == b'r' {
        prot |= libc::PROT_READ as u32;
    }
    if p[1] == b'w' {
        prot |= libc::PROT_WRITE as u32;
    }
    if p[2] == b'x' {
        prot |= libc::PROT_EXEC as u32;
    }
    Ok(MapsLine {
        start: u64::from_str_radix(s, 16).map_err(|_| bad())?,
        end: u64::from_str_radix(e, 16).map_err(|_| bad())?,
        prot,
        shared: p[3] == b's',
        pgoff: u64::from_str_radix(off, 16).map_err(|_| bad())?,
        inode: ino.parse().map_err(|_| bad())?,
        dev_major: u32::from_str_radix(dev.split_once(':').ok_or_else(bad)?.0, 16).map_err(|_| bad())?,
        path: r.trim_start_matches(' ').to_string(),
    })
}

/// What /proc/PID/smaps says about VmFlags: the start of every VMA, and of
/// those with VM_GROWSDOWN ("gd"). smaps walks every page table to count
/// RSS, which costs tens of milliseconds for a big process: a dump reads it
/// before stopping the process, and again only if the mappings changed.
#[derive(Debug, Clone, Default)]
pub struct VmFlags {
    /// The maps line of every VMA, as smaps heads its entry.
    lines: std::collections::HashSet<String>,
    growsdown: Vec<u64>,
    /// Starts of the VMAs without VM_MAYWRITE ("mw"): a SysV segment
    /// attached with SHM_RDONLY.
    no_maywrite: Vec<u64>,
}

pub fn vm_flags(pid: Pid) -> Result<VmFlags> {
    let path = format!("/proc/{}/smaps", pid.0);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut cur = None;
    let mut out = VmFlags::default();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = cur {
                if flags.split_whitespace().any(|f| f == "gd") {
                    out.growsdown.push(start);
                }
                if !flags.split_whitespace().any(|f| f == "mw") {
                    out.no_maywrite.push(start);
                }
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, _)) = range.split_once('-') {
                if let Ok(a) = u64::from_str_radix(s, 16) {
                    cur = Some(a);
                    out.lines.insert(line.to_string());
                }
            }
        }
    }
    Ok(out)
}

/// Is this the name of a shared memory object with no file of its own
/// (shared anonymous memory, /dev/zero, SysV shm)?
fn is_shmem_name(path: &str) -> bool {
    path == "/dev/zero (deleted)"
        || path.starts_with("/SYSV")
        || path.starts_with("[anon_shmem:")
}

/// stat() of the file behind a mapping, through map_files so it works for
/// deleted and unreachable files too.
fn map_file_meta(pid: Pid, l: &MapsLine) -> Result<fs::Metadata> {
    let mf = format!("/proc/{}/map_files/{:x}-{:x}", pid.0, l.start, l.end);
    fs::metadata(&mf).with_context(|| format!("stat {mf} ({})", l.path))
}

/// Is this an attachment of a SysV shared memory segment? Its name is
/// `/SYSV` and the key in 8 hex digits, on the kernel's internal shm mount
/// (device 0:x), and its inode number is the segment's id.
pub fn is_sysv_shm(l: &MapsLine) -> bool {
    let Some(key) = l.path.strip_prefix("/SYSV").and_then(|r| r.strip_suffix(" (deleted)")) else {
        return false;
    };
    l.shared && l.dev_major == 0 && key.len() == 8 && key.bytes().all(|b| b.is_ascii_hexdigit()) && l.inode <= i32::MAX as u64
}

fn classify(pid: Pid, l: &MapsLine) -> Result<VmaKind> {
    let p = l.path.as_str();
    if p == "[vsyscall]" {
        return Ok(VmaKind::Vsyscall);
    }
    if is_sysv_shm(l) {
        // `rdonly` is filled in from VmFlags by the caller.
        return Ok(VmaKind::SysvShm { shmid: l.inode as i32, rdonly: false });
    }
    if l.shared && is_shmem_name(p) {
        let m = map_file_meta(pid, l)?;
        return Ok(VmaKind::SharedAnon { shmem_id: m.ino(), size: m.size() });
    }
    if p.is_empty()
        || p == "[heap]"
        || p.starts_with("[stack")
        || p.starts_with("[anon:")
        || (!l.shared && (p == "/dev/zero" || p == "/dev/zero (deleted)"))
    {
        if l.shared {
            // A shared mapping with no name: describe the object behind it.
            let m = map_file_meta(pid, l)?;
            return Ok(VmaKind::SharedAnon { shmem_id: m.ino(), size: m.size() });
        }
        return Ok(VmaKind::Anon);
    }
    if p.starts_with('[') && p.ends_with(']') {
        return Ok(VmaKind::Special { name: p.to_string() });
    }
    if l.shared && p.starts_with("/memfd:") {
        // A memfd is shared memory with a name: saved and restored like
        // shared anonymous memory (its name and seals are not kept).
        let m = map_file_meta(pid, l)?;
        return Ok(VmaKind::SharedAnon { shmem_id: m.ino(), size: m.size() });
    }
    if p.starts_with("/memfd:") || p.ends_with(" (deleted)") {
        bail!(
            "{pid}: mapping {:#x}-{:#x} of {p}: {} mappings of deleted files and memfds are not supported yet",
            l.start,
            l.end,
            if l.shared { "shared" } else { "private" }
        );
    }
    let m = map_file_meta(pid, l)?;
    Ok(VmaKind::File {
        file: FileId {
            path: p.to_string(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        },
    })
}

/// Every mapping of `pid`, classified. `early`: VmFlags read before the
/// process stopped, used if it lists every mapping there is now (VMAs
/// never gain or lose VM_GROWSDOWN).
pub fn read_vmas(pid: Pid, early: Option<VmFlags>) -> Result<Vec<Vma>> {
    let path = format!("/proc/{}/maps", pid.0);
    let text = fs::read_to_string(&path).with_context(|| format!("{pid}: reading {path}"))?;
    let raw: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let lines = raw
        .iter()
        .map(|line| parse_maps_line(line).with_context(|| format!("{pid}: {path}")))
        .collect::<Result<Vec<_>>>()?;
    let flags = match early {
        Some(f) if raw.iter().all(|l| f.lines.contains(*l)) => f,
        _ => vm_flags(pid).with_context(|| format!("{pid}: VmFlags"))?,
    };
    let gd = flags.growsdown;
    let mut out = Vec::new();
    for l in lines {
        let mut kind = classify(pid, &l).with_context(|| {
            format!("{pid}: mapping {:#x}-{:#x} ({})", l.start, l.end, l.path)
        })?;
        if let VmaKind::SysvShm { rdonly, .. } = &mut kind {
            *rdonly = flags.no_maywrite.contains(&l.start);
        }
        out.push(Vma {
            start: l.start,
            end: l.end,
            prot: l.prot,
            shared: l.shared,
            pgoff: l.pgoff,
            kind,
            growsdown: gd.contains(&l.start),
        });
    }
    Ok(out)
}

/// Which pagemap entries of this VMA hold content that must be saved.
fn page_filter(vma: &Vma) -> Option<fn(u64) -> bool> {
    match (&vma.kind, vma.shared) {
        (VmaKind::Anon, _) | (VmaKind::SharedAnon { .. }, _) => Some(has_content),
        // Private file mapping: only the copy-on-write copies (anonymous
        // pages, bit 61 clear), present or swapped out.
        (VmaKind::File { .. }, false) => Some(|e| has_content(e) && (e & PM_PRESENT == 0 || e & PM_FILE_OR_SHARED == 0)),
        _ => None,
    }
}

/// Turn pagemap entries (first one at `base`) into maximal runs, appended
/// to `out` (merged with its last run when adjacent).
pub fn runs_from_entries(
    base: u64,
    entries: &[u64],
    keep: impl Fn(u64) -> bool,
    out: &mut Vec<(u64, usize)>,
) {
    for (i, &e) in entries.iter().enumerate() {
        if !keep(e) {
            continue;
        }
        let addr = base + (i * PAGE_SIZE) as u64;
        match out.last_mut() {
            Some((s, len)) if *s + *len as u64 == addr => *len += PAGE_SIZE,
            _ => out.push((addr, PAGE_SIZE)),
        }
    }
}

/// The pagemap of a process, opened once for all its mappings.
pub fn open_pagemap(pid: Pid) -> Result<File> {
    let path = format!("/proc/{}/pagemap", pid.0);
    File::open(&path).with_context(|| format!("{pid}: opening {path}"))
}

/// Maximal runs `(address, length in bytes)` of pages of `vma` that must be
/// saved. Private anonymous memory: present or swapped pages; private file
/// mappings: their copy-on-write pages; shared anonymous memory: its pages
/// as seen by this process (call it for any process mapping the object);
/// [vdso]/[vvar]/[vsyscall] and shared file mappings: none. `pm` is the
/// process's pagemap ([`open_pagemap`]).
pub fn dump_ranges(pid: Pid, pm: &File, vma: &Vma) -> Result<Vec<(u64, usize)>> {
    let Some(keep) = page_filter(vma) else {
        return Ok(Vec::new());
    };
    let ctx = || format!("{pid}: /proc/{}/pagemap for {:#x}-{:#x}", pid.0, vma.start, vma.end);
    let mut out = match scan_runs(pm, vma, keep) {
        Ok(Some(out)) => out,
        Ok(None) => {
            let mut out = Vec::new();
            entry_runs(pm, vma.start, vma.end, keep, &mut out).with_context(ctx)?;
            out
        }
        Err(e) => return Err(e).with_context(ctx),
    };
    if let VmaKind::SharedAnon { .. } = vma.kind {
        // Pages of the object that only other processes touched have no
        // entry in this process's page table: ask the object itself.
        let data = shmem_data_ranges(pid, vma)
            .with_context(|| format!("{pid}: shared memory {:#x}-{:#x}", vma.start, vma.end))?;
        out = crate::spans::to_runs(&crate::spans::union(&crate::spans::from_runs(&out), &crate::spans::from_runs(&data)));
    }
    Ok(out)
}

/// Runs of `[start, end)` that hold content (present, or swapped out for
/// real, not a pte marker), read entry by entry, appended to `out`.
pub fn content_runs(pm: &File, start: u64, end: u64, out: &mut Vec<(u64, usize)>) -> Result<()> {
    entry_runs(pm, start, end, has_content, out).with_context(|| format!("pagemap for {start:#x}-{end:#x}"))
}

/// Runs of `[start, end)` whose pagemap entries pass `keep`, read entry by
/// entry (8 bytes per page), appended to `out`.
fn entry_runs(pm: &File, start: u64, end: u64, keep: fn(u64) -> bool, out: &mut Vec<(u64, usize)>) -> Result<()> {
    let pages = ((end - start) / PAGE_SIZE as u64) as usize;
    let mut buf = vec![0u8; PAGEMAP_CHUNK.min(pages.max(1)) * 8];
    let mut done = 0usize;
    while done < pages {
        let n = PAGEMAP_CHUNK.min(pages - done);
        let addr = start + (done * PAGE_SIZE) as u64;
        let bytes = &mut buf[..n * 8];
        pm.read_exact_at(bytes, addr / PAGE_SIZE as u64 * 8)?;
        let entries: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        runs_from_entries(addr, &entries, keep, out);
        done += n;
    }
    Ok(())
}

/// The same runs as [`entry_runs`] over the whole VMA, but from one
/// `PAGEMAP_SCAN` walk that returns runs of pages with equal categories
/// instead of an entry per page (a fully populated 1 GiB mapping is one
/// run, not 2 MiB of entries to read and parse). The scan cannot tell a
/// page swapped out from a pte marker (uffd write-protection leaves one on
/// every untouched page it protects), so swapped runs are looked up entry
/// by entry. `None` where the kernel has no `PAGEMAP_SCAN` (before 6.7).
fn scan_runs(pm: &File, vma: &Vma, keep: fn(u64) -> bool) -> Result<Option<Vec<(u64, usize)>>> {
    use crate::sys::uffd::{PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
    use std::os::fd::AsFd;
    let any = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    let regions = match crate::sys::uffd::scan_raw(pm.as_fd(), vma.start, vma.end, 0, 0, any, any | PAGE_IS_FILE) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    // Present pages of a private file mapping count only as copies made on
    // write (anonymous, not the file's page cache).
    let private_file = matches!(vma.kind, VmaKind::File { .. });
    let mut out: Vec<(u64, usize)> = Vec::new();
    for (s, e, cat) in regions {
        if cat & PAGE_IS_PRESENT != 0 {
            if private_file && cat & PAGE_IS_FILE != 0 {
                continue;
            }
            match out.last_mut() {
                Some((ls, ll)) if *ls + *ll as u64 == s => *ll += (e - s) as usize,
                _ => out.push((s, (e - s) as usize)),
            }
        } else {
            entry_runs(pm, s, e, keep, &mut out)?;
        }
    }
    Ok(Some(out))
}

/// Ranges (as addresses in `vma`) where the shmem object behind a shared
/// anonymous mapping has pages, from SEEK_DATA/SEEK_HOLE on map_files.
fn shmem_data_ranges(pid: Pid, vma: &Vma) -> Result<Vec<(u64, usize)>> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let mf = format!("/proc/{}/map_files/{:x}-{:x}", pid.0, vma.start, vma.end);
    let f = File::open(&mf).with_context(|| format!("opening {mf}"))?;
    let fd = f.as_raw_fd();
    let (lo, hi) = (vma.pgoff, vma.pgoff + (vma.end - vma.start));
    let mut out = Vec::new();
    let mut off = lo;
    while off < hi {
        let d = match lseek(fd, off as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break, // no data after off
            Err(e) => return Err(e).with_context(|| format!("SEEK_DATA {mf} at {off}")),
        };
        if d >= hi {
            break;
        }
        let h = (lseek(fd, d as i64, Whence::SeekHole).with_context(|| format!("SEEK_HOLE {mf} at {d}"))? as u64).min(hi);
        let ps = PAGE_SIZE as u64;
        let (s, e) = (d / ps * ps, h.div_ceil(ps) * ps);
        out.push((vma.start + (s - lo), (e - s) as usize));
        off = e.max(off + ps);
    }
    Ok(out)
}

/// A VMA whose pages the parasite cannot read in place (no PROT_READ) but
/// which may hold content: the caller reads it through /proc/PID/mem.
pub fn unreadable(vma: &Vma) -> bool {
    vma.prot & libc::PROT_READ as u32 == 0 && page_filter(vma).is_some()
}

/// Group the shared anonymous VMAs of several processes by object, so each
/// object's content is saved once: shmem_id -> [(pid, vma index)].
pub fn shmem_users(procs: &[(Pid, &[Vma])]) -> HashMap<u64, Vec<(Pid, usize)>> {
    let mut m: HashMap<u64, Vec<(Pid, usize)>> = HashMap::new();
    for (pid, vmas) in procs {
        for (i, v) in vmas.iter().enumerate() {
            if let VmaKind::SharedAnon { shmem_id, .. } = v.kind {
                m.entry(shmem_id).or_default().push((*pid, i));
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let l = parse_maps_line(
            "7f0000000000-7f0000001000 r-xp 00002000 08:01 1234    /usr/lib/a b (deleted)",
        )
        .unwrap();
        assert_eq!((l.start, l.end, l.pgoff, l.inode), (0x7f0000000000, 0x7f0000001000, 0x2000, 1234));
        assert_eq!(l.prot, (libc::PROT_READ | libc::PROT_EXEC) as u32);
        assert!(!l.shared);
        assert_eq!(l.path, "/usr/lib/a b (deleted)");
        let l = parse_maps_line("1000-2000 ---s 00000000 00:00 0 ").unwrap();
        assert_eq!((l.prot, l.shared, l.path.as_str()), (0, true, ""));
        assert!(parse_maps_line("1000-2000 rw").is_err());
    }

    #[test]
    fn sysv_names() {
        let l = parse_maps_line("7f5b49a79000-7f5b49a7d000 rw-s 00000000 00:01 7    /SYSV1234abcd (deleted)").unwrap();
        assert!(is_sysv_shm(&l));
        assert_eq!((l.inode, l.dev_major), (7, 0));
        // A real file of that name, a private mapping, a malformed key: not SysV.
        let f = parse_maps_line("1000-2000 rw-s 00000000 fe:00 7    /SYSV1234abcd (deleted)").unwrap();
        assert!(!is_sysv_shm(&f));
        let p = parse_maps_line("1000-2000 rw-p 00000000 00:01 7    /SYSV1234abcd (deleted)").unwrap();
        assert!(!is_sysv_shm(&p));
        let k = parse_maps_line("1000-2000 rw-s 00000000 00:01 7    /SYSV12 (deleted)").unwrap();
        assert!(!is_sysv_shm(&k));
    }

    #[test]
    fn runs() {
        let e = [PM_PRESENT, PM_PRESENT, 0, PM_SWAPPED, PM_PRESENT | PM_FILE_OR_SHARED];
        let mut out = vec![];
        runs_from_entries(0x1000, &e, |x| x & (PM_PRESENT | PM_SWAPPED) != 0, &mut out);
        assert_eq!(out, vec![(0x1000, 0x2000), (0x4000, 0x2000)]);
        // Continues a run across chunk boundaries.
        runs_from_entries(0x6000, &[PM_PRESENT], |x| x != 0, &mut out);
        assert_eq!(out.last(), Some(&(0x4000, 0x3000)));
    }

    #[test]
    fn union() {
        let runs = |r: &[(u64, usize)]| crate::spans::from_runs(r);
        let u = crate::spans::to_runs(&crate::spans::union(&runs(&[(0x1000, 0x1000), (0x5000, 0x1000)]), &runs(&[(0x2000, 0x1000), (0x4000, 0x3000)])));
        assert_eq!(u, vec![(0x1000, 0x2000), (0x4000, 0x3000)]);
    }

    #[test]
    fn own_vmas() {
        let me = Pid(std::process::id() as i32);
        let v = read_vmas(me, None).unwrap();
        assert!(v.iter().any(|v| v.kind == VmaKind::Special { name: "[vdso]".into() }));
        assert!(v.iter().any(|v| matches!(v.kind, VmaKind::File { .. })));
        let stack = v.iter().find(|v| v.growsdown).expect("main stack is growsdown");
        let pm = open_pagemap(me).unwrap();
        assert!(!dump_ranges(me, &pm, stack).unwrap().is_empty());
    }

    /// The PAGEMAP_SCAN walk finds exactly the pages the entry-by-entry
    /// read finds: written anonymous pages (not untouched or zapped ones,
    /// and the zero page counts as present), and in a private file mapping
    /// only the pages copied on write.
    #[test]
    fn scan_runs_match_entry_runs() {
        use std::os::fd::AsRawFd;
        let me = Pid(std::process::id() as i32);
        let ps = PAGE_SIZE;
        let anon = nix_mmap(64 * ps, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        for p in (0..10).chain([20]).chain(30..40) {
            // SAFETY: inside the 64-page mapping made above.
            unsafe { *anon.add(p * ps) = 1 };
        }
        // SAFETY: reads inside the mapping (maps the shared zero page).
        let _ = unsafe { std::ptr::read_volatile(anon.add(50 * ps)) };
        // SAFETY: a range of the mapping made above.
        assert_eq!(unsafe { libc::madvise(anon.add(32 * ps) as *mut libc::c_void, 2 * ps, libc::MADV_DONTNEED) }, 0);
        let exe = File::open("/proc/self/exe").unwrap();
        let file = nix_mmap(4 * ps, libc::MAP_PRIVATE, exe.as_raw_fd());
        // SAFETY: inside the 4-page file mapping: page 0 read, page 1 copied.
        unsafe {
            let _ = std::ptr::read_volatile(file);
            *file.add(ps) ^= 0xff;
        }
        let vmas = read_vmas(me, None).unwrap();
        let pm = open_pagemap(me).unwrap();
        for (at, want) in [
            (anon as u64, vec![(0u64, 10usize), (20, 1), (30, 2), (34, 6), (50, 1)]),
            (file as u64, vec![(1, 1)]),
        ] {
            let v = vmas.iter().find(|v| v.start <= at && at < v.end).expect("the test mapping");
            let keep = page_filter(v).expect("content to save");
            let mut by_entry = Vec::new();
            entry_runs(&pm, v.start, v.end, keep, &mut by_entry).unwrap();
            let by_scan = scan_runs(&pm, v, keep).unwrap().expect("PAGEMAP_SCAN (Linux 6.7+)");
            let rel = |r: &[(u64, usize)]| -> Vec<(u64, usize)> {
                r.iter().filter(|x| x.0 >= at).map(|&(a, l)| ((a - at) / ps as u64, l / ps)).collect()
            };
            assert_eq!(rel(&by_entry), want, "entry by entry");
            assert_eq!(rel(&by_scan), want, "PAGEMAP_SCAN");
        }
    }

    fn nix_mmap(len: usize, flags: i32, fd: i32) -> *mut u8 {
        // SAFETY: a fresh mapping chosen by the kernel; never unmapped (the
        // test process ends).
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        p as *mut u8
    }
}
