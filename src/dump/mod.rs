//! `snap dump`: seize the trees, collect every kind of state, write the image.
//!
//! Stages, in order:
//! 1. seize every thread of every process (the barrier, `seize.rs`);
//! 2. per process: /proc state, thread registers, then the parasite for what
//!    only the process can tell (signal handlers, timers, fds, memory);
//! 3. write the records and the inventory (last, so an interrupted dump has
//!    no inventory and can never be restored by mistake);
//! 4. kill the processes, or with `--leave-running` let them go.
//! Any error before stage 4 drops the `Seized` guard, which detaches every
//! thread: the processes continue untouched.

pub mod cgroup;
pub mod mm;
pub mod pidns;
pub mod proc;
pub mod seize;
pub mod threads;
pub mod timers;

use crate::cli::DumpArgs;
use crate::images::records::*;
use crate::images::{ImageReader, ImageWriter, PageHash};
use crate::track::{self, TrackSet};
use std::path::Path;
use crate::kinds::{self, DumpCtx};
use crate::parasite::{remote, Parasite};
use crate::progress::Progress;
use crate::types::{Pid, RemoteAddr, PAGE_SIZE};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// Shared anonymous objects, keyed by shmem id: object offset -> page hash.
type ShmemPages = BTreeMap<u64, BTreeMap<u64, PageHash>>;

/// `snap dump`: with `--prev-images-dir`, the tracking the parent's dump
/// armed is taken from its holder; with `--track-mem`, the tracking armed by
/// this dump is left to a new holder for the next one.
pub fn run(a: &DumpArgs) -> Result<()> {
    let held = match &a.prev_images_dir {
        Some(d) => take_tracking(d),
        None => None,
    };
    // The holder of the tracking this dump will arm is started first, so
    // that its start runs beside the dump (the image's id, which names its
    // socket, is drawn now for it). Not for --cgroup: snap may sit in the
    // cgroup it is about to freeze, and moves out of it first.
    let early = if a.track_mem && a.leave_running && a.cgroup.is_none() && track::backend().is_some() {
        let id = new_image_id()?;
        track::holder::start(&id).ok().map(|h| (id, h))
    } else {
        None
    };
    let out = match &a.cgroup {
        Some(path) => {
            let (args, frozen) = cgroup::freeze_members(a, path)?;
            run_frozen(&args, held, Some(frozen))?
        }
        None => run_inner(a, held, None, early.as_ref().map(|e| e.0.clone()))?,
    };
    if let Some(set) = out.tracking {
        let kept = match early {
            Some((id, h)) if id == set.generation => h.hand(&set),
            _ => track::holder::spawn(&set),
        };
        if let Err(e) = kept {
            eprintln!("snap: warning: dirty tracking not kept ({e:#}); the next incremental dump reads every page");
        }
    }
    if a.json {
        crate::outln!("{}", out.summary)?;
    }
    Ok(())
}

/// The tracking armed by the dump of image `dir`, if its holder still has
/// it. Problems only cost speed (every page is read), so they are reported
/// and the dump goes on.
fn take_tracking(dir: &Path) -> Option<TrackSet> {
    let inv: Inventory = std::fs::read(dir.join(crate::images::dir::INVENTORY_NAME))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())?;
    let t = inv.tracking?;
    match track::holder::take(&t.generation) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("snap: warning: {e:#}; every page is read");
            None
        }
    }
}

/// What a dump leaves to its caller.
pub struct DumpOutcome {
    /// The `--json` summary.
    pub summary: serde_json::Value,
    /// With `--track-mem`: the tracking for the next dump, to be held.
    pub tracking: Option<TrackSet>,
}

/// A dump that takes the tracking armed by the parent's dump from the
/// caller (`held`) and returns the one it arms: for callers that hold it
/// themselves (`snap run`'s supervisor).
pub fn run_with(a: &DumpArgs, held: Option<TrackSet>) -> Result<DumpOutcome> {
    run_frozen(a, held, None)
}

/// Whatever holds the dumped processes still until the dump has seized
/// them (the frozen cgroup of a group, `group::cgroup::Frozen`), dropped
/// right after the seize: a task in a frozen cgroup cannot run the
/// parasite's system calls, while a seized one stays in its ptrace stop
/// once the cgroup thaws.
pub type Barrier = Box<dyn std::any::Any>;

/// `run_with` for processes the caller froze: `barrier` is released once
/// every thread is seized (or when the dump fails before).
pub fn run_frozen(a: &DumpArgs, held: Option<TrackSet>, barrier: Option<Barrier>) -> Result<DumpOutcome> {
    run_inner(a, held, barrier, None)
}

/// `run_frozen` writing an image with the given id (else a fresh one).
fn run_inner(a: &DumpArgs, held: Option<TrackSet>, barrier: Option<Barrier>, id: Option<String>) -> Result<DumpOutcome> {
    let existed = a.dir.exists();
    // A directory that already holds something is refused by the writer;
    // its files are the user's, never cleaned up here.
    let ours = !existed || std::fs::read_dir(&a.dir).is_ok_and(|mut rd| rd.next().is_none());
    let r = dump(a, held, barrier, id);
    if r.is_err() && ours {
        // Never leave a half-written image behind: it would only mislead.
        remove_partial(&a.dir, existed);
    }
    r
}

fn remove_partial(dir: &std::path::Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(dir);
    } else if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn dump(a: &DumpArgs, mut held: Option<TrackSet>, barrier: Option<Barrier>, id: Option<String>) -> Result<DumpOutcome> {
    let t0 = Instant::now();
    let roots: Vec<Pid> = a.tree.iter().map(|&p| Pid(p)).collect();
    if roots.iter().any(|p| p.0 == std::process::id() as i32) {
        bail!("refusing to dump snap itself");
    }
    // Everything the parent can tell is loaded before the processes stop:
    // the parent chain is opened and checked (a broken chain fails here,
    // before the processes are touched), its processes' records and page
    // map spans read, in a thread of its own; another faults in the staging
    // buffer, and this one reads the roots' VmFlags. None depends on the
    // others, and all cost wall time only.
    let (parent, mut parent_procs, mut early_flags, mut staging) = std::thread::scope(|s| -> Result<_> {
        let chain = a.prev_images_dir.as_deref().map(|d| {
            std::thread::Builder::new()
                .name("snap-parent".into())
                .spawn_scoped(s, move || -> Result<(ImageReader, ParentProcs)> {
                    let r = ImageReader::open(d).with_context(|| format!("--prev-images-dir {}", d.display()))?;
                    let procs = parent_processes(&r)?;
                    crate::images::dir::timing("dump: parent's processes read");
                    Ok((r, procs))
                })
                .context("starting the thread that opens the parent image")
        });
        // Staging for the pages an incremental dump with tracking copies out
        // while the processes are stopped (hashed and stored once they run
        // again), touched now, while they still run: faulting in fresh
        // memory is slow on these VMs. Sized from the pages written so far.
        let stage = match (a.leave_running, &held, &a.prev_images_dir) {
            (true, Some(h), Some(_)) if h.backend == track::UFFD_WP => {
                let pids: Vec<Pid> = h.procs.keys().copied().collect();
                let t = std::thread::Builder::new().name("snap-staging".into()).spawn_scoped(s, move || {
                    let est: u64 = pids.iter().map(|&p| track::written_bytes(p).unwrap_or(0)).sum();
                    let v = prefaulted(((est + est / 4) as usize + (1 << 20)).min(STAGE_MAX));
                    crate::images::dir::timing("dump: staging faulted in");
                    v
                });
                Some(t.context("starting the thread that prepares the staging buffer"))
            }
            _ => None,
        };
        // VmFlags of the roots (see `mm::vm_flags`), while they still run.
        let flags: BTreeMap<Pid, mm::VmFlags> =
            roots.iter().filter_map(|&p| mm::vm_flags(p).ok().map(|f| (p, f))).collect();
        crate::images::dir::timing("dump: roots' VmFlags read");
        let staging = match stage {
            Some(t) => t?.join().map_err(|_| anyhow::anyhow!("the thread preparing the staging buffer panicked"))?,
            None => Vec::new(),
        };
        let (parent, procs) = match chain {
            Some(t) => {
                let (r, procs) = t?.join().map_err(|_| anyhow::anyhow!("the thread opening the parent image panicked"))??;
                (Some(r), procs)
            }
            None => (None, BTreeMap::new()),
        };
        Ok((parent, procs, flags, staging))
    })?;
    if let (Some(h), Some(p)) = (&held, &parent) {
        if h.generation != p.inventory().id {
            // Armed by another dump: it says nothing about this parent.
            held = None;
            staging = Vec::new();
        }
    }
    let track_backend = match (a.track_mem, a.leave_running) {
        (true, true) => track::backend(),
        (true, false) => {
            eprintln!("snap: warning: --track-mem without --leave-running: the processes end, nothing to track");
            None
        }
        _ => None,
    };
    let mut armed = BTreeMap::new();
    let stopped_for;
    let stored;
    let mut w = ImageWriter::create(&a.dir, a.compress)?;
    if let Some(r) = &parent {
        // The chain's page indexes, shared: its pages are not stored again.
        w.pages().know(&r.pages()?);
    }
    let mut pending: Vec<ProcDone> = Vec::new();
    crate::images::dir::timing("dump: parent loaded");
    // The processes are stopped from here until they are resumed or killed.
    let t_seize = Instant::now();
    let mut seized = seize::Seized::trees(&roots)?;
    crate::images::dir::timing("dump: seized");
    // Every thread is held by ptrace now: the caller's freeze can go.
    drop(barrier);
    let mut counts = Counts::default();
    // Established TCP connections: refused without --tcp-established; with
    // it their packets are dropped from now until restore (or until this
    // dump fails or lets the processes go: dropping `net` removes the
    // table, after `fctx`, dropped first, has taken the sockets out of
    // repair mode).
    let net = kinds::inet::NetLock::prepare(&seized.pids, a.tcp_established)?;
    let mut fctx = DumpCtx::new(a.shell_job);
    fctx.set_ext_unix_sk(a.ext_unix_sk);
    fctx.set_tcp_established(a.tcp_established, &net);
    fctx.set_dumped(&seized.pids);
    // A whole pid namespace (its init included) is recorded with the
    // namespace's pids; everything else with host pids.
    let ns = pidns::NsPids::detect(&seized.pids, &seized.threads)?;
    // The pid a process has in the image.
    let image_pid = |p: Pid| -> Pid { Pid(ns.as_ref().and_then(|n| n.pid(p.0)).unwrap_or(p.0)) };
    let mut shmem: ShmemPages = BTreeMap::new();
    let mut total_pages: u64 = 0;
    let mut xsave_mask = 0u64;
    let mut xsave_size = 0u32;
    // Every process's SysV shm attachments, for `ipc::sysv::dump`.
    let mut sysv_maps: Vec<(Pid, Vec<Vma>)> = Vec::new();

    for &pid in &seized.pids.clone() {
        let mut p = proc::read_process(pid).with_context(|| format!("dumping {pid}"))?;
        let ipid = image_pid(pid);
        if seized.zombies.contains(&pid) {
            p.state = ProcState::Zombie { wait_status: zombie_status(&p) };
            if let Some(n) = &ns {
                n.process(&mut p)?;
            }
            w.write_json(&format!("proc-{}.json", ipid.0), &p)?;
            continue;
        }
        p.stopped = seized.stopped.contains(&pid);
        if p.seccomp != 0 {
            bail!("{pid} ({}): seccomp filters are not supported yet (Seccomp mode {})", p.comm, p.seccomp);
        }
        let tids = seized.threads.get(&pid).cloned().unwrap_or_default();
        let mut ths = Vec::with_capacity(tids.len());
        for &t in &tids {
            ths.push(threads::dump_thread(pid, t)?);
        }
        if let Some(first) = ths.first() {
            let xs = from_hex(&first.xsave_hex)?;
            xsave_size = xs.len() as u32;
            if xs.len() >= 480 {
                let m = u64::from_ne_bytes(xs[472..480].try_into().expect("8 bytes"));
                xsave_mask |= m;
            }
        }
        p.shared_pending = threads::shared_pending(tids[0])?;
        p.vmas = mm::read_vmas(pid, early_flags.remove(&pid)).with_context(|| format!("{pid}: reading mappings"))?;
        sysv_maps.push((pid, p.vmas.iter().filter(|v| matches!(v.kind, VmaKind::SysvShm { .. })).cloned().collect()));
        // Incremental: what the parent holds of this same process, and which
        // pages tracking says are unchanged since (asked before the parasite
        // writes anything into the process).
        // The same process (pid and start time) in the parent.
        let prev = parent_procs.remove(&ipid).filter(|(pp, _)| pp.start_time == p.start_time && p.start_time != 0);
        let mut trk = held.as_mut().and_then(|h| h.procs.remove(&pid)).filter(|t| t.start_time == p.start_time);
        if prev.as_ref().is_some_and(|(pp, _)| pp.mm.auxv != p.mm.auxv) {
            // exec'd since: a new address space the old uffd knows nothing of.
            trk = None;
        }
        crate::images::dir::timing("dump: /proc read");
        let dirt = match (&trk, &prev, &held) {
            (Some(_), Some(_), Some(h)) => Some(track::dirt(pid, &h.backend)?),
            _ => None,
        };
        crate::images::dir::timing("dump: dirty pages asked");

        // Listed before the parasite adds its own transport descriptors.
        let fds = kinds::list_fds(pid)?;
        let mut par = Parasite::inject(pid, &tids).with_context(|| format!("{pid}: injecting the parasite"))?;
        p.sigactions = par.sigactions().with_context(|| format!("{pid}: reading signal handlers"))?;
        p.itimers = par.itimers().with_context(|| format!("{pid}: reading itimers"))?;
        p.posix_timers = timers::dump(pid, tids[0], &mut par)?;
        for (th, &t) in ths.iter_mut().zip(&tids) {
            let (ss, ctid) = par.thread_misc(t).with_context(|| format!("{pid} {t}: sigaltstack/tid address"))?;
            th.sigaltstack = ss;
            th.clear_child_tid = ctid;
        }
        p.mm.brk = par.syscall(tids[0], libc::SYS_brk, [0; 6])? as u64;
        p.dumpable = par.syscall(tids[0], libc::SYS_prctl, [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0])? as i32;
        p.threads = ths;
        crate::images::dir::timing("dump: parasite in, task state read");

        // Descriptors: taken over SCM_RIGHTS, described kind by kind.
        let taken = par.take_fds(&fds).with_context(|| format!("{pid}: taking descriptors"))?;
        let pairs: Vec<_> = fds.into_iter().zip(taken).collect();
        p.fds = fctx.dump_fds(pid, &pairs)?;
        p.file_locks = kinds::locks::dump(pid, &pairs, &p, &seized.pids)?;
        drop(pairs);
        crate::images::dir::timing("dump: descriptors");

        // Memory.
        let mut map: Vec<(u64, PageHash)> = Vec::new();
        let mut plan = Vec::new();
        // Runs of pages whose entries this image takes from the parent's
        // page map of the same process.
        let mut inherit: Vec<(u64, usize)> = Vec::new();
        let before = (counts.present, counts.read, counts.reused);
        let pm = mm::open_pagemap(pid)?;
        for vma in &p.vmas {
            let from_walk = match (&dirt, &prev) {
                (Some(d), Some((_, pspans))) => d.present_runs(&pm, vma, pspans).with_context(|| format!("{pid}: pages of {:#x}-{:#x}", vma.start, vma.end))?,
                _ => None,
            };
            let mut ranges = match from_walk {
                Some(r) => r,
                None => mm::dump_ranges(pid, &pm, vma)?,
            };
            counts.present += ranges.iter().map(|r| (r.1 / PAGE_SIZE) as u64).sum::<u64>();
            let shared = matches!(vma.kind, VmaKind::SharedAnon { .. });
            if let (Some(d), Some((_, pmap)), false) = (&dirt, &prev, shared) {
                // Shared memory is always read: writes through a file or
                // another process's mapping pass no page table of this one.
                ranges = track::split(&ranges, d, pmap, &mut inherit);
            }
            if !ranges.is_empty() {
                plan.push((vma, ranges));
            }
        }
        counts.reused += (inherit.iter().map(|r| r.1).sum::<usize>() / PAGE_SIZE) as u64;
        crate::images::dir::timing("dump: page ranges listed");
        let bytes: usize = plan.iter().flat_map(|(_, r)| r.iter().map(|x| x.1)).sum();
        total_pages += (bytes / PAGE_SIZE) as u64;
        w.pages().reserve(bytes / PAGE_SIZE);
        // Sized up front: growing these by doubling touches fresh memory
        // again and again, which is what costs on this VM.
        map.reserve(bytes / PAGE_SIZE);
        let mut shm_out: Vec<(u64, PageHash)> = Vec::new();
        let mut prog = Progress::new("dump", bytes as u64);
        let mut readv_buf = Vec::new();
        let stage_from = staging.len();
        let mut staged: Vec<(u64, usize)> = Vec::new();
        for (vma, ranges) in plan {
            let shared = matches!(vma.kind, VmaKind::SharedAnon { .. });
            // Private memory goes straight into the page map.
            let out: &mut Vec<(u64, PageHash)> = if shared { &mut shm_out } else { &mut map };
            let total: usize = ranges.iter().map(|r| r.1).sum();
            let mean = total / ranges.len().max(1);
            if vma.prot & libc::PROT_READ as u32 == 0 {
                read_via_mem(pid, &ranges, &mut |addr, data| w.pages().add_pages(addr, data, out))?;
            } else if mean < SCATTERED && a.leave_running && !shared && staging.len() + total <= STAGE_MAX {
                // Scattered pages (typically those written since the last
                // dump), read from outside a thousand ranges per call and
                // only copied while the processes are stopped.
                remote::read_ranges_into(pid, &ranges, &mut staging)?;
                staged.extend_from_slice(&ranges);
                prog.add(total as u64);
            } else if mean < SCATTERED {
                let pages = w.pages();
                remote::read_ranges(pid, &ranges, &mut readv_buf, &mut |addr, data| {
                    prog.add(data.len() as u64);
                    pages.add_pages(addr, data, out)
                })?;
            } else {
                let mut cur = RangeCursor::new(&ranges);
                let pages = w.pages();
                par.dump_pages(
                    &ranges.iter().map(|&(a, l)| (RemoteAddr(a), l)).collect::<Vec<_>>(),
                    &mut |chunk: &[u8]| {
                        let mut off = 0;
                        while off < chunk.len() {
                            let (addr, take) = cur.next(chunk.len() - off)?;
                            pages.add_pages(addr, &chunk[off..off + take], out)?;
                            off += take;
                            prog.add(take as u64);
                        }
                        Ok(())
                    },
                )
                .with_context(|| format!("{pid}: reading memory {:#x}-{:#x}", vma.start, vma.end))?;
            }
            if let VmaKind::SharedAnon { shmem_id, .. } = vma.kind {
                let obj = shmem.entry(shmem_id).or_default();
                for (addr, h) in shm_out.drain(..) {
                    obj.insert(vma.pgoff + (addr - vma.start), h);
                }
            }
        }
        prog.finish();
        crate::images::dir::timing("dump: memory read");
        counts.read += (bytes / PAGE_SIZE) as u64;
        total_pages += counts.reused - before.2;
        counts.per_process.push(serde_json::json!({
            "pid": ipid.0,
            "memory": if dirt.is_some() { "tracked" } else if prev.is_some() { "hashed" } else { "full" },
            "pages_present": counts.present - before.0,
            "pages_read": counts.read - before.1,
            "pages_reused": counts.reused - before.2,
        }));
        if ns.is_some() {
            if let Some(last) = counts.per_process.last_mut() {
                last["host_pid"] = pid.0.into();
            }
        }
        if let Some(b) = track_backend {
            match track::arm(pid, &mut par, &p.vmas, b, p.start_time, trk.take(), dirt.as_ref().map(|d| &d.covered[..])) {
                Ok(t) => {
                    armed.insert(pid, t);
                }
                Err(e) => eprintln!("snap: warning: {pid}: dirty tracking not armed ({e:#}); its next dump reads every page"),
            }
        }
        crate::images::dir::timing("dump: tracking armed");
        par.cure().with_context(|| format!("{pid}: removing the parasite"))?;
        crate::images::dir::timing("dump: parasite out");
        if let Some(n) = &ns {
            n.process(&mut p)?;
        }
        let done = ProcDone { p, map, inherit, staged, stage_from };
        if done.staged.is_empty() {
            done.write(&mut w, &staging)?;
        } else {
            pending.push(done);
        }
    }

    // SysV objects, while every process is still stopped.
    // In a whole-namespace image, a last user outside the namespace is 0
    // (none), as the namespace would see it.
    let ipc_pid = |h: i32| match &ns {
        Some(n) => Some(n.pid(h).unwrap_or(0)),
        None => Some(h),
    };
    crate::ipc::sysv::dump(&seized.pids, &sysv_maps, &mut w, &ipc_pid)?;
    for (id, obj) in &shmem {
        let v: Vec<(u64, PageHash)> = obj.iter().map(|(&o, &h)| (o, h)).collect();
        w.write_pagemap(&format!("pagemap-shmem-{id}.bin"), &v)?;
    }
    fctx.check_done()?;
    // snap's copies of the connections in repair mode: kept until the
    // processes are dead (closed in repair mode, they send nothing), or
    // taken out of repair mode before the processes go on.
    let repair = fctx.take_repair();
    let (mut files, blobs) = fctx.finish()?;
    if let Some(n) = &ns {
        n.files(&mut files)?;
    }
    w.write_json("files.json", &files)?;
    for (name, data) in blobs {
        w.write_bytes(&name, &data)?;
    }
    let id = match id {
        Some(id) => id,
        None => new_image_id()?,
    };
    let backend = match (&parent, &held) {
        (None, _) => "full",
        (Some(_), None) => "hash",
        (Some(_), Some(h)) => h.backend.as_str(),
    };
    let tracking = track_backend.filter(|_| !armed.is_empty()).map(|b| TrackSet {
        backend: b.to_string(),
        generation: id.clone(),
        procs: armed,
    });
    let mut features = vec!["parasite".to_string()];
    if a.compress {
        features.push("zstd".into());
    }
    if a.shell_job {
        features.push("shell-job".into());
    }
    let inv = Inventory {
        format_version: FORMAT_VERSION,
        arch: "x86_64".into(),
        kernel: nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        xsave_mask,
        xsave_size,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        roots: roots.iter().map(|&p| image_pid(p).0).collect(),
        pids: seized.pids.iter().map(|&p| image_pid(p).0).collect(),
        features,
        memory_bytes: total_pages * PAGE_SIZE as u64,
        id: id.clone(),
        parent: match (&parent, &a.prev_images_dir) {
            (Some(_), Some(d)) => Some(relative_to(&a.dir, d)?),
            _ => None,
        },
        parent_id: parent.as_ref().map(|p| p.inventory().id.clone()),
        memory_backend: backend.to_string(),
        tracking: tracking.as_ref().map(|t| Tracking {
            backend: t.backend.clone(),
            holder: Some(track::holder::socket_path(&t.generation).display().to_string()),
            generation: t.generation.clone(),
        }),
        pidns: ns.as_ref().map(|n| n.info()),
        net_lock: if a.leave_running { None } else { net.name() },
        cgroup: a.cgroup.as_ref().map(|c| c.display().to_string()),
    };
    let pids: Vec<i32> = seized.pids.iter().map(|&p| image_pid(p).0).collect();
    if a.leave_running {
        // Everything is read: the processes go on while the image is
        // finished (a failure from here on leaves them running anyway).
        crate::images::dir::timing("dump: read all");
        // The connections go live again, then their packets pass again.
        drop(repair);
        drop(net);
        resume_in_place(&seized)?;
        drop(seized);
        let stopped = t_seize.elapsed();
        crate::images::dir::timing("dump: resumed");
        for done in pending.drain(..) {
            done.write(&mut w, &staging)?;
        }
        stored = w.pages().stats().stored_pages;
        w.finish(inv)?;
        stopped_for = stopped;
    } else {
        // Killed only once the image is complete on disk.
        stored = w.pages().stats().stored_pages;
        w.finish(inv)?;
        seized.kill_all();
        drop(seized);
        // Closed still in repair mode: the peers see nothing; the lock
        // stays for restore to remove.
        repair.forget();
        net.keep();
        stopped_for = t_seize.elapsed();
    }
    let summary = serde_json::json!({
        "images_dir": a.dir,
        "id": id,
        "parent": a.prev_images_dir,
        "pids": pids,
        "memory_bytes": total_pages * PAGE_SIZE as u64,
        "backend": backend,
        "pages_present": counts.present,
        "pages_read": counts.read,
        "pages_reused": counts.reused,
        "pages_stored": stored,
        "processes": counts.per_process,
        "tracking": tracking.as_ref().map(|t| t.backend.clone()),
        "seconds": t0.elapsed().as_secs_f64(),
        "stopped_seconds": stopped_for.as_secs_f64(),
        "left_running": a.leave_running,
    });
    let mut summary = summary;
    if let Some(n) = &ns {
        // "pids" are the image's (the namespace's); these say which host
        // process each one was.
        summary["pidns"] = serde_json::to_value(n.info()).unwrap_or_default();
    }
    Ok(DumpOutcome { summary, tracking })
}

/// One process's record and page map, written once its staged pages (if
/// any) are hashed and stored.
struct ProcDone {
    p: ProcessImage,
    map: Vec<(u64, PageHash)>,
    inherit: Vec<(u64, usize)>,
    /// Ranges whose bytes sit in the staging buffer from `stage_from` on.
    staged: Vec<(u64, usize)>,
    stage_from: usize,
}

impl ProcDone {
    fn write(mut self, w: &mut ImageWriter, staging: &[u8]) -> Result<()> {
        let pid = Pid(self.p.pid);
        let mut off = self.stage_from;
        for &(addr, len) in &self.staged {
            w.pages().add_pages(addr, &staging[off..off + len], &mut self.map).with_context(|| format!("{pid}: storing pages"))?;
            off += len;
        }
        self.map.sort_by_key(|e| e.0);
        let name = format!("pagemap-{}.bin", pid.0);
        w.write_pagemap(&name, &self.map)?;
        if !self.inherit.is_empty() {
            w.write_inherited(&name, &self.inherit)?;
        }
        w.write_json(&format!("proc-{}.json", pid.0), &self.p)
    }
}

/// A buffer of `n` bytes' capacity whose pages are already faulted in.
fn prefaulted(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0u8);
    std::hint::black_box(&mut v);
    v.clear();
    v
}

/// Most bytes of pages copied aside while the processes are stopped (the
/// rest is hashed and stored as it is read, as in a full dump): memory
/// snap takes for itself must stay small beside the machine's.
const STAGE_MAX: usize = 256 << 20;

/// Mean run length (bytes) under which a mapping's pages are read with
/// `process_vm_readv` rather than through the parasite's pipe.
const SCATTERED: usize = 64 * 1024;

/// Pages counted over the whole dump, for the summary.
#[derive(Default)]
struct Counts {
    /// Pages with content in the processes.
    present: u64,
    /// Pages read from the processes.
    read: u64,
    /// Pages taken from the parent image unread.
    reused: u64,
    /// The same per process, with how its memory was read: "tracked" (only
    /// written pages), "hashed" (all, against the parent) or "full".
    per_process: Vec<serde_json::Value>,
}

/// Every process of the parent image with its page map.
/// Per process of the parent: its record and the addresses its page map covers.
type ParentProcs = BTreeMap<Pid, (ProcessImage, track::Spans)>;

fn parent_processes(r: &ImageReader) -> Result<ParentProcs> {
    let mut out = BTreeMap::new();
    for &pid in &r.inventory().pids {
        let pp: ProcessImage = r.read_json(&format!("proc-{pid}.json"))?;
        let pm = format!("pagemap-{pid}.bin");
        let spans = if r.has(&pm) { r.pagemap_spans(&pm)? } else { Vec::new() };
        out.insert(Pid(pid), (pp, spans));
    }
    Ok(out)
}

/// A fresh image id: 32 random hex digits.
fn new_image_id() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom for the image id")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `to` as seen from directory `from` (both existing): a relative path, so
/// a chain of images can be moved as a whole.
fn relative_to(from: &Path, to: &Path) -> Result<String> {
    let f = from.canonicalize().with_context(|| format!("resolving {}", from.display()))?;
    let t = to.canonicalize().with_context(|| format!("resolving {}", to.display()))?;
    let fc: Vec<_> = f.components().collect();
    let tc: Vec<_> = t.components().collect();
    let common = fc.iter().zip(&tc).take_while(|(a, b)| a == b).count();
    let mut rel = std::path::PathBuf::new();
    for _ in common..fc.len() {
        rel.push("..");
    }
    for c in &tc[common..] {
        rel.push(c);
    }
    Ok(rel.display().to_string())
}

/// The wait status a zombie's parent will read: /proc/PID/stat exit_code.
fn zombie_status(p: &ProcessImage) -> i32 {
    match p.state {
        ProcState::Zombie { wait_status } => wait_status,
        ProcState::Alive => 0,
    }
}

/// Before detaching, redo what the kernel would have done for a thread
/// stopped inside a system call: the parasite's last system call leaves the
/// thread in a syscall-exit stop, from which the kernel does not restart.
fn resume_in_place(s: &seize::Seized) -> Result<()> {
    for ts in s.threads.values() {
        for &t in ts {
            let mut r = crate::sys::ptrace::get_regs(t)?;
            let before = (r.rax, r.rip);
            threads::adjust_restart(&mut r, false);
            if (r.rax, r.rip) != before {
                crate::sys::ptrace::set_regs(t, &r)?;
            }
        }
    }
    Ok(())
}

/// Walks the ranges to tell the address of each byte of the stream the
/// parasite sends, which carries the ranges back to back.
struct RangeCursor<'a> {
    ranges: &'a [(u64, usize)],
    i: usize,
    off: usize,
}

impl<'a> RangeCursor<'a> {
    fn new(ranges: &'a [(u64, usize)]) -> Self {
        RangeCursor { ranges, i: 0, off: 0 }
    }
    /// Address of the next byte and how many bytes (<= max) are contiguous.
    fn next(&mut self, max: usize) -> Result<(u64, usize)> {
        while self.i < self.ranges.len() && self.off == self.ranges[self.i].1 {
            self.i += 1;
            self.off = 0;
        }
        let Some(&(a, l)) = self.ranges.get(self.i) else {
            bail!("the parasite sent more memory than was asked for");
        };
        let take = max.min(l - self.off);
        let addr = a + self.off as u64;
        self.off += take;
        Ok((addr, take))
    }
}

/// Pages of mappings the process cannot read itself (PROT_NONE and the
/// like) come through /proc/PID/mem, which may read them.
fn read_via_mem(pid: Pid, ranges: &[(u64, usize)], f: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
    let path = format!("/proc/{}/mem", pid.0);
    let mem = std::fs::File::open(&path).with_context(|| format!("{pid}: opening {path}"))?;
    let mut buf = vec![0u8; 1 << 20];
    for &(a, l) in ranges {
        let mut off = 0;
        while off < l {
            let n = (l - off).min(buf.len());
            mem.read_exact_at(&mut buf[..n], a + off as u64)
                .with_context(|| format!("{pid}: reading {:#x} through {path}", a + off as u64))?;
            f(a + off as u64, &buf[..n])?;
            off += n;
        }
    }
    Ok(())
}

