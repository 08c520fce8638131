//! Replacing a restored process's address space, driven from outside with
//! remote system calls through the control area: unmap everything snap left
//! there, move the vDSO and vvar to their saved addresses, map every saved
//! mapping, fill memory from the page store, put protections back, then the
//! mm fields with PR_SET_MM_MAP.

use super::pool::{Pool, CTL_LEN};
use super::remote::Remote;
use crate::dump::mm::parse_maps_line;
use crate::images::records::{ProcessImage, VmaKind};
use crate::images::{ChainStore, ImageReader};
use crate::types::PAGE_SIZE;
use anyhow::{bail, Context, Result};

struct CurVma {
    start: u64,
    end: u64,
    name: String,
}

fn current_maps(pid: i32) -> Result<Vec<CurVma>> {
    let path = format!("/proc/{pid}/maps");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let m = parse_maps_line(l).with_context(|| path.clone())?;
            Ok(CurVma { start: m.start, end: m.end, name: m.path })
        })
        .collect()
}

fn is_special(name: &str) -> bool {
    matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]")
}

pub fn replace(r: &mut Remote, p: &ProcessImage, pool: &Pool, img: &ImageReader, store: &ChainStore) -> Result<()> {
    let pid = p.pid;
    let cur = current_maps(r.host)?;

    // 0. The rseq area snap's copy registered lives in memory about to be
    //    unmapped; the kernel would fault on it at every return to user.
    if let Some(rs) = crate::sys::ptrace::rseq_config(r.tid)? {
        r.call(libc::SYS_rseq, [rs.ptr, rs.len as u64, 1 /* RSEQ_FLAG_UNREGISTER */, rs.sig as u64, 0, 0])
            .with_context(|| format!("pid {pid}: unregistering snap's rseq area"))?;
    }

    // 1. Unmap everything but the control area, the kernel's special
    //    mappings (moved below) and [vsyscall] (fixed, cannot be unmapped):
    //    one munmap per run of neighbouring mappings, not one per mapping
    //    (each remote call is a ptrace round trip).
    let keep = |v: &CurVma| v.start >= pool.ctl && v.end <= pool.ctl + CTL_LEN || is_special(&v.name) || v.name == "[vsyscall]";
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut open: Option<(u64, u64)> = None;
    for v in &cur {
        if keep(v) {
            runs.extend(open.take());
        } else {
            open = Some(match open {
                Some((s, _)) => (s, v.end),
                None => (v.start, v.end),
            });
        }
    }
    runs.extend(open);
    for (s, e) in runs {
        r.call(libc::SYS_munmap, [s, e - s, 0, 0, 0, 0])
            .with_context(|| format!("pid {pid}: unmapping {s:#x}-{e:#x}"))?;
    }

    // 2. vDSO and vvar: same kernel, same layout; move each to its saved
    //    address, through a parking place in the control area so moves
    //    cannot overlap each other.
    let saved: Vec<_> = p
        .vmas
        .iter()
        .filter_map(|v| match &v.kind {
            VmaKind::Special { name } => Some((name.clone(), v.start, v.end)),
            _ => None,
        })
        .collect();
    let mut parked = Vec::new();
    let mut park = pool.ctl + (1 << 20);
    for v in cur.iter().filter(|v| is_special(&v.name)) {
        let Some(&(_, s, e)) = saved.iter().find(|x| x.0 == v.name) else {
            bail!(
                "pid {pid}: this kernel has {} but the image does not (dumped on another kernel; vDSO relocation is not supported yet)",
                v.name
            );
        };
        if e - s != v.end - v.start {
            bail!(
                "pid {pid}: {} is {} bytes here but {} in the image (another kernel's vDSO layout; not supported yet)",
                v.name,
                v.end - v.start,
                e - s
            );
        }
        r.call(libc::SYS_mremap, [v.start, v.end - v.start, v.end - v.start, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, park, 0])
            .with_context(|| format!("pid {pid}: moving {}", v.name))?;
        parked.push((park, s, e, v.name.clone()));
        park += v.end - v.start;
    }
    for (name, _, _) in &saved {
        if !parked.iter().any(|x| &x.3 == name) {
            bail!("pid {pid}: the image has {name} but this kernel does not (another kernel; not supported yet)");
        }
    }

    // 3. Every saved mapping, writable for now where pages must be written.
    let map = img.pagemap(&format!("pagemap-{pid}.bin"))?;
    let has_pages = |s: u64, e: u64| {
        let i = map.partition_point(|x| x.0 < s);
        i < map.len() && map[i].0 < e
    };
    sysv_attach(r, p, pool)?;
    let mut reprotect = Vec::new();
    for v in &p.vmas {
        let len = v.end - v.start;
        let mut prot = v.prot as u64;
        let (flags, fd, off) = match &v.kind {
            VmaKind::Special { .. } | VmaKind::Vsyscall | VmaKind::SysvShm { .. } => continue,
            VmaKind::Anon => {
                let mut f = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
                if v.growsdown {
                    f |= libc::MAP_GROWSDOWN;
                }
                (f, u64::MAX, 0)
            }
            VmaKind::File { file } => {
                let write = v.shared && v.prot & libc::PROT_WRITE as u32 != 0;
                let fd = pool
                    .map_fd(&file.path, write)
                    .with_context(|| format!("pid {pid}: {} not opened for mapping", file.path))?;
                let sh = if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                (sh | libc::MAP_FIXED, fd as u64, v.pgoff)
            }
            VmaKind::SharedAnon { shmem_id, .. } => {
                let fd = pool.shmem_fd(*shmem_id).with_context(|| format!("pid {pid}: shared memory {shmem_id} missing"))?;
                (libc::MAP_SHARED | libc::MAP_FIXED, fd as u64, v.pgoff)
            }
        };
        if !v.shared && prot & libc::PROT_WRITE as u64 == 0 && has_pages(v.start, v.end) {
            prot |= (libc::PROT_WRITE | libc::PROT_READ) as u64;
            reprotect.push((v.start, len, v.prot as u64));
        }
        r.call(libc::SYS_mmap, [v.start, len, prot, flags as u64, fd, off]).with_context(|| {
            format!("pid {pid}: mapping {:#x}-{:#x} ({:?})", v.start, v.end, v.kind)
        })?;
    }
    // Parked specials to their saved homes (their old place is free now).
    for (from, s, e, name) in parked {
        if from != s {
            r.call(libc::SYS_mremap, [from, e - s, e - s, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, s, 0])
                .with_context(|| format!("pid {pid}: moving {name} to {s:#x}"))?;
        }
    }

    // 4. Memory contents, in runs that are contiguous both in the target and
    //    in the page store (a fresh dump stores pages in address order).
    crate::images::dir::timing("memory: mapped");
    let mut runs: Vec<Run> = Vec::new();
    for &(addr, h) in &map {
        let (si, off) = store.locate(h).with_context(|| format!("pid {pid}: page at {addr:#x}"))?;
        if let Some(last) = runs.last_mut() {
            if last.addr + last.len as u64 == addr && last.store == si && last.off + last.len == off {
                last.len += PAGE_SIZE;
                continue;
            }
        }
        runs.push(Run { addr, store: si, off, len: PAGE_SIZE });
    }
    //    Each batch of pages is checked against its names (the pack's
    //    integrity check) right before it is written, while in cache.
    write_runs(r.host, store, &runs).with_context(|| format!("pid {pid}: writing {} pages of memory", map.len()))?;

    crate::images::dir::timing("memory: written");
    // 5. Protections as they were.
    for (s, len, prot) in reprotect {
        r.call(libc::SYS_mprotect, [s, len, prot, 0, 0, 0]).with_context(|| format!("pid {pid}: mprotect {s:#x}"))?;
    }

    // 6. The mm fields: code/data/brk/stack/arg/env boundaries, auxv, exe.
    let m = &p.mm;
    let mut auxv: Vec<u64> = m.auxv.iter().flat_map(|&(k, v)| [k, v]).collect();
    auxv.extend([0, 0]);
    let aux_bytes: Vec<u8> = auxv.iter().flat_map(|x| x.to_ne_bytes()).collect();
    let exe_fd = pool.map_fd(&p.exe, false).map(|f| f as u32).unwrap_or(u32::MAX);
    let words = [
        m.start_code, m.end_code, m.start_data, m.end_data, m.start_brk, m.brk, m.start_stack, m.arg_start, m.arg_end,
        m.env_start, m.env_end,
    ];
    let auxv_addr = pool.scratch() + 1024;
    let mut st: Vec<u8> = words.iter().flat_map(|x| x.to_ne_bytes()).collect();
    st.extend(auxv_addr.to_ne_bytes());
    st.extend((aux_bytes.len() as u32).to_ne_bytes());
    st.extend(exe_fd.to_ne_bytes());
    r.write(pool.scratch(), &st)?;
    r.write(auxv_addr, &aux_bytes)?;
    r.call(libc::SYS_prctl, [libc::PR_SET_MM as u64, libc::PR_SET_MM_MAP as u64, pool.scratch(), st.len() as u64, 0, 0])
        .with_context(|| format!("pid {pid}: PR_SET_MM_MAP (brk {:#x}, exe {})", m.brk, p.exe))?;
    Ok(())
}

/// Step 3a: SysV shm attachments (`ipc/sysv.rs` made the segments), one
/// `shmat` per attachment (the saved VMAs of one segment at one base) at its
/// address, before the other mappings: shmat maps the whole segment, so the
/// parts the process had unmapped are unmapped again and protections changed
/// with mprotect are put back. The kernel counts the attachment
/// (`shm_nattch`) as it did for the original.
fn sysv_attach(r: &mut Remote, p: &ProcessImage, pool: &Pool) -> Result<()> {
    let pid = p.pid;
    let ps = PAGE_SIZE as u64;
    let mut groups: std::collections::BTreeMap<(i32, u64), Vec<&crate::images::records::Vma>> = Default::default();
    for v in &p.vmas {
        if let VmaKind::SysvShm { shmid, .. } = v.kind {
            let base = v.start.checked_sub(v.pgoff).with_context(|| {
                format!("pid {pid}: SysV segment {shmid} mapped at {:#x} with offset {:#x} (damaged image)", v.start, v.pgoff)
            })?;
            groups.entry((shmid, base)).or_default().push(v);
        }
    }
    for ((shmid, base), vs) in groups {
        let size = *pool
            .sysv_sizes
            .get(&shmid)
            .with_context(|| format!("pid {pid}: SysV segment {shmid} attached at {base:#x} is not in ipc.json (damaged image)"))?;
        let len = size.div_ceil(ps) * ps;
        let rdonly = vs.iter().any(|v| matches!(v.kind, VmaKind::SysvShm { rdonly: true, .. }));
        let exec = vs.iter().any(|v| v.prot & libc::PROT_EXEC as u32 != 0);
        let mut flags = 0u64;
        if rdonly {
            flags |= libc::SHM_RDONLY as u64;
        }
        if exec {
            flags |= crate::sys::ipc::SHM_EXEC as u64;
        }
        let got = r
            .call(libc::SYS_shmat, [shmid as u64, base, flags, 0, 0, 0])
            .with_context(|| format!("pid {pid}: attaching SysV segment {shmid} ({size} bytes) at {base:#x}"))?;
        if got != base {
            bail!("pid {pid}: SysV segment {shmid} attached at {got:#x} instead of {base:#x}");
        }
        let mut at = base;
        for v in &vs {
            if v.start > at {
                r.call(libc::SYS_munmap, [at, v.start - at, 0, 0, 0, 0])
                    .with_context(|| format!("pid {pid}: unmapping {at:#x}-{:#x} of SysV segment {shmid}", v.start))?;
            }
            at = at.max(v.end);
        }
        if at < base + len {
            r.call(libc::SYS_munmap, [at, base + len - at, 0, 0, 0, 0])
                .with_context(|| format!("pid {pid}: unmapping {at:#x}-{:#x} of SysV segment {shmid}", base + len))?;
        }
        let mut def = libc::PROT_READ as u32;
        if !rdonly {
            def |= libc::PROT_WRITE as u32;
        }
        if exec {
            def |= libc::PROT_EXEC as u32;
        }
        for v in vs.iter().filter(|v| v.prot != def) {
            r.call(libc::SYS_mprotect, [v.start, v.end - v.start, v.prot as u64, 0, 0, 0])
                .with_context(|| format!("pid {pid}: mprotect {:#x} of SysV segment {shmid}", v.start))?;
        }
    }
    Ok(())
}

/// Pages contiguous in the target and in one pack of the chain.
struct Run {
    addr: u64,
    /// Which store of the chain.
    store: usize,
    /// Byte offset in that store's pack.
    off: usize,
    len: usize,
}

/// Bytes per `process_vm_writev` batch: small enough that the pages just
/// hashed are still in cache when the kernel copies them.
const WRITE_BATCH: usize = 1 << 20;
/// Below this much memory one thread writes it all.
const PARALLEL_MIN: usize = 16 << 20;

/// Step 4: write `runs` (target address, pack offset, length) into process
/// `host` from the page store, in batches of up to 1 MiB and 1024 iovecs
/// per `process_vm_writev`, each batch verified page by page first. Most of
/// the time goes into faulting in the target's fresh pages (inside the
/// kernel, in the calling thread), so big processes are written by one
/// thread per CPU (at most 4), each taking the next batch.
fn write_runs(host: i32, store: &ChainStore, runs: &[Run]) -> Result<()> {
    // Cut the runs into batches: (first run, offset in it, last run, end offset in it).
    let mut batches: Vec<(usize, usize, usize, usize)> = Vec::new();
    let (mut i, mut off, mut total) = (0usize, 0usize, 0usize);
    let mut start = (0usize, 0usize);
    let mut count = 0usize;
    while i < runs.len() {
        let l = runs[i].len;
        let take = (l - off).min(WRITE_BATCH - count);
        off += take;
        count += take;
        total += take;
        let end = (i, off);
        if off == l {
            i += 1;
            off = 0;
        }
        if count == WRITE_BATCH || i == runs.len() || (i - start.0) >= 1024 {
            batches.push((start.0, start.1, end.0, end.1));
            start = (i, off);
            count = 0;
        }
    }
    let threads = if total < PARALLEL_MIN {
        1
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4)
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> Result<()> {
        loop {
            let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(r0, o0, r1, o1)) = batches.get(b) else { return Ok(()) };
            if let Err(e) = write_batch(host, store, runs, (r0, o0), (r1, o1)) {
                // Stop the other threads too.
                next.store(batches.len(), std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
        }
    };
    if threads == 1 {
        return work();
    }
    std::thread::scope(|sc| {
        let hs: Vec<_> = (1..threads).map(|_| sc.spawn(work)).collect();
        let mut r = work();
        for h in hs {
            let x = h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("memory writer thread panicked")));
            if r.is_ok() {
                r = x;
            }
        }
        r
    })
}

/// One batch: from offset `o0` of run `r0` to end offset `o1` of run `r1`
/// (inclusive run index).
fn write_batch(
    host: i32,
    store: &ChainStore,
    runs: &[Run],
    (r0, o0): (usize, usize),
    (r1, o1): (usize, usize),
) -> Result<()> {
    let mut local: Vec<libc::iovec> = Vec::with_capacity(r1 - r0 + 1);
    let mut remote: Vec<libc::iovec> = Vec::with_capacity(r1 - r0 + 1);
    for (j, run) in runs[r0..=r1].iter().enumerate() {
        let (a, l) = (run.addr, run.len);
        let from = if j == 0 { o0 } else { 0 };
        let to = if r0 + j == r1 { o1 } else { l };
        let data = store.verified(run.store, run.off + from, to - from)?;
        local.push(libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: to - from });
        remote.push(libc::iovec { iov_base: (a + from as u64) as *mut libc::c_void, iov_len: to - from });
    }
    let mut k = 0; // first iovec not completely written
    while k < local.len() {
        // The local iovecs point into the page store's mapping, alive for the call.
        let at = remote[k].iov_base as u64;
        let mut n = match crate::sys::process::vm_writev(host, &local[k..], &remote[k..]) {
            Ok(0) => Err(std::io::Error::last_os_error()),
            r => r,
        }
        .with_context(|| format!("process_vm_writev {} bytes at {at:#x}", remote[k].iov_len))?;
        // Partial write: skip what was done, resume inside an iovec.
        while n > 0 {
            let d = n.min(local[k].iov_len);
            local[k].iov_base = (local[k].iov_base as usize + d) as *mut libc::c_void;
            local[k].iov_len -= d;
            remote[k].iov_base = (remote[k].iov_base as usize + d) as *mut libc::c_void;
            remote[k].iov_len -= d;
            n -= d;
            if local[k].iov_len == 0 {
                k += 1;
            }
        }
    }
    Ok(())
}
