//! Everything the restoring snap process opens before forking the tree, so
//! that every restored process inherits it at the same descriptor numbers:
//! open file descriptions (shared ones stay shared), mapped files, shared
//! anonymous memory (memfds filled from the image), the executables, the
//! ready/go pipes and the control area (a page with `syscall; jmp .` and
//! scratch space) through which restored processes are driven remotely.

use super::Plan;
use crate::images::records::{FileId, VmaKind};
use crate::images::{ChainStore, ImageReader};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};

/// Size of the control area reserved in every restored process.
pub const CTL_LEN: u64 = 16 << 20;
/// What is mapped of it: code page + scratch.
pub const CTL_MAPPED: usize = 64 << 10;
/// `syscall; jmp .` — a thread created by a remote clone spins on the jmp
/// until it is seized.
pub const CTL_CODE: [u8; 4] = [0x0f, 0x05, 0xeb, 0xfe];

pub struct Pool {
    /// Lowest descriptor number of the pool in every process.
    pub base: RawFd,
    pub ready_r: RawFd,
    pub ready_w: RawFd,
    pub go_r: RawFd,
    pub ctl: u64,
    files: HashMap<u32, RawFd>,
    maps: HashMap<(String, bool), RawFd>,
    shmem: HashMap<u64, RawFd>,
    /// Session leader's pid -> a slave of the pseudo-terminal that is its
    /// controlling terminal (TIOCSCTTY, TIOCSPGRP).
    ctty: HashMap<i32, RawFd>,
    owned: Vec<OwnedFd>,
    /// Sizes of the SysV segments (`ipc.json`), by id, for the attachments.
    pub sysv_sizes: BTreeMap<i32, u64>,
}

impl Pool {
    pub fn file_fd(&self, id: u32) -> Option<RawFd> {
        self.files.get(&id).copied()
    }
    pub fn map_fd(&self, path: &str, write: bool) -> Option<RawFd> {
        self.maps.get(&(path.to_string(), write)).copied()
    }
    pub fn shmem_fd(&self, id: u64) -> Option<RawFd> {
        self.shmem.get(&id).copied()
    }
    /// A slave of the controlling terminal of the session led by `sid`.
    pub fn ctty_fd(&self, sid: i32) -> Option<RawFd> {
        self.ctty.get(&sid).copied()
    }
    /// Scratch space inside the control area.
    pub fn scratch(&self) -> u64 {
        self.ctl + 4096
    }
    pub fn scratch_len(&self) -> usize {
        CTL_MAPPED - 4096
    }

    /// Move `fd` into the pool range and keep it open for the forks.
    /// snap's own copy of open file `id` of the image.
    pub fn file(&self, id: u32) -> Option<BorrowedFd<'_>> {
        let n = *self.files.get(&id)?;
        self.owned.iter().find(|f| f.as_raw_fd() == n).map(|f| f.as_fd())
    }

    fn adopt(&mut self, fd: OwnedFd) -> Result<RawFd> {
        let owned = crate::sys::dup_at_least(fd.as_fd(), self.base)?;
        let n = owned.as_raw_fd();
        self.owned.push(owned);
        Ok(n)
    }
}

/// Refuse a mapped file that is not the one that was dumped.
pub fn check_file(pid: i32, f: &FileId) -> Result<()> {
    let path = f.path.trim_end_matches(" (deleted)");
    let m = std::fs::metadata(path).with_context(|| format!("pid {pid}: mapped file {path} is missing"))?;
    let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    let mut why = Vec::new();
    if m.ino() != f.ino || m.dev() != f.dev {
        why.push(format!("inode {}:{} became {}:{}", f.dev, f.ino, m.dev(), m.ino()));
    }
    if m.size() != f.size {
        why.push(format!("size {} became {}", f.size, m.size()));
    }
    if mtime != f.mtime_ns {
        why.push("modification time changed".to_string());
    }
    if !why.is_empty() {
        bail!("pid {pid}: mapped file {path} changed since the dump ({}); refusing to restore", why.join(", "));
    }
    Ok(())
}

fn pick_control_area(plan: &Plan) -> Result<u64> {
    let mut busy: Vec<(u64, u64)> = Vec::new();
    for p in plan.procs.values() {
        busy.extend(p.vmas.iter().map(|v| (v.start, v.end)));
    }
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    for l in maps.lines().filter(|l| !l.trim().is_empty()) {
        let m = crate::dump::mm::parse_maps_line(l).context("/proc/self/maps")?;
        busy.push((m.start, m.end));
    }
    // Try 16 MiB slots from 1 TiB upwards: far from typical heaps and libraries.
    let mut cand: u64 = 1 << 40;
    while cand < (0x7ff0u64 << 32) {
        let end = cand + CTL_LEN;
        if busy.iter().all(|&(a, b)| b <= cand || a >= end) {
            return Ok(cand);
        }
        cand += CTL_LEN;
    }
    bail!("no free 16 MiB area for the restore control page in the saved address spaces")
}

pub fn build(plan: &Plan, img: &ImageReader, store: &ChainStore, shell_job: bool, ext_unix_sk: bool) -> Result<Pool> {
    // Raise our descriptor limit: the pool sits above every saved fd.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let max_fd = plan.procs.values().flat_map(|p| p.fds.iter().map(|f| f.fd)).max().unwrap_or(2);
    let base = (max_fd + 1).max(16);
    let ctl = pick_control_area(plan)?;
    let mut pool = Pool {
        base,
        ready_r: -1,
        ready_w: -1,
        go_r: -1,
        ctl,
        files: HashMap::new(),
        maps: HashMap::new(),
        shmem: HashMap::new(),
        ctty: HashMap::new(),
        owned: Vec::new(),
        sysv_sizes: BTreeMap::new(),
    };

    let files = crate::kinds::restore_files(&plan.files, &|name| img.read_bytes(name), shell_job, ext_unix_sk)?;
    crate::kinds::locks::prepare(plan.procs.values());
    let memfds = crate::kinds::memfd::by_inode(&plan.files, &files);
    for (sid, fd) in crate::kinds::pty::ctty_fds(&plan.files, &files)? {
        let n = pool.adopt(fd)?;
        pool.ctty.insert(sid, n);
    }
    for (id, fd) in files {
        let n = pool.adopt(fd)?;
        pool.files.insert(id, n);
    }

    // Mapped files and shared anonymous objects.
    let mut shm_size: BTreeMap<u64, u64> = BTreeMap::new();
    for p in plan.procs.values() {
        for v in &p.vmas {
            match &v.kind {
                VmaKind::File { file } => {
                    let write = v.shared && v.prot & libc::PROT_WRITE as u32 != 0;
                    let key = (file.path.clone(), write);
                    if pool.maps.contains_key(&key) {
                        continue;
                    }
                    check_file(p.pid, file)?;
                    let path = file.path.trim_end_matches(" (deleted)");
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(write)
                        .open(path)
                        .with_context(|| format!("pid {}: opening mapped file {path}", p.pid))?;
                    let n = pool.adopt(f.into())?;
                    pool.maps.insert(key, n);
                }
                VmaKind::SharedAnon { shmem_id, size } => {
                    let need = (*size).max(v.pgoff + (v.end - v.start));
                    let e = shm_size.entry(*shmem_id).or_insert(0);
                    *e = (*e).max(need);
                }
                _ => {}
            }
        }
        let key = (p.exe.clone(), false);
        if !p.exe.is_empty() && !pool.maps.contains_key(&key) {
            if let Ok(f) = std::fs::File::open(p.exe.trim_end_matches(" (deleted)")) {
                let n = pool.adopt(f.into())?;
                pool.maps.insert(key, n);
            }
        }
    }
    for (id, size) in shm_size {
        if let Some(n) = memfds.get(&id).and_then(|f| pool.files.get(f)) {
            // A mapping of a memfd the process also holds: the same memfd
            // (restored whole from its content), opened read-write here.
            let via = format!("/proc/self/fd/{n}");
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&via)
                .or_else(|_| std::fs::File::open(&via))
                .with_context(|| format!("reopening memfd {via} for shared memory object {id}"))?;
            let n = pool.adopt(f.into())?;
            pool.shmem.insert(id, n);
            continue;
        }
        let fd = nix::sys::memfd::memfd_create(
            &std::ffi::CString::new(format!("snap-shmem-{id}")).expect("no NUL"),
            nix::sys::memfd::MemFdCreateFlag::empty(),
        )
        .with_context(|| format!("memfd for shared memory object {id}"))?;
        let f = std::fs::File::from(fd);
        f.set_len(size).with_context(|| format!("sizing shared memory object {id} to {size}"))?;
        let name = format!("pagemap-shmem-{id}.bin");
        for (off, h) in img.pagemap(&name)? {
            f.write_all_at(store.page(h)?, off).with_context(|| format!("filling shared memory object {id}"))?;
        }
        let n = pool.adopt(f.into())?;
        pool.shmem.insert(id, n);
    }

    let (rr, rw) = nix::unistd::pipe().context("ready pipe")?;
    let (gr, gw) = nix::unistd::pipe().context("go pipe")?;
    pool.ready_r = pool.adopt(rr)?;
    pool.ready_w = pool.adopt(rw)?;
    pool.go_r = pool.adopt(gr)?;
    pool.adopt(gw)?;

    crate::sys::clone::map_control_area(ctl, CTL_MAPPED)
        .with_context(|| format!("mapping the control area at {ctl:#x}"))?;
    crate::sys::clone::write_control_code(ctl, &CTL_CODE);
    Ok(pool)
}

impl Pool {
    /// Close the write end of the ready pipe in snap, so a dead tree shows
    /// as end-of-file rather than a hang.
    pub fn close_ready_writer(&mut self) {
        let w = self.ready_w;
        self.owned.retain(|f| f.as_raw_fd() != w);
    }
}
