//! `snap restore`: rebuild the trees with their exact PIDs and put every
//! process's state back. The stages, in order, and why there:
//!
//! 1. Load and validate the image (before anything is created).
//! 2. Wait for the saved PIDs to be free (a just-dumped tree's zombies are
//!    reaped slowly here); fail naming a PID that stays taken.
//! 2b. SysV IPC objects (`ipc/sysv.rs`): a new IPC namespace if the tree had
//!    its own, every object made or reused with its saved id.
//! 3. Build the pool: open file descriptions, mapped files, shared memory,
//!    the control area — in snap, so every fork inherits them.
//! 4. Fork the trees (`tree.rs`): parents before children, each with clone3
//!    set_tid; each sets up its session, fds, cwd, limits, and waits.
//! 5. Seize every process; process groups (leaders first, all exist now).
//!    5b. SysV state whose last-user pid is a restored process, written
//!    from inside that process.
//! 6. Per process, remotely: address space (`memory.rs`), threads, signal
//!    handlers and timers, per-thread state, pending signals, credentials
//!    (last: they drop the privileges the earlier steps need), pool fds
//!    closed, control area unmapped, registers.
//! 7. Release everything together.
//! A failure at any stage kills every process created so far (the guard):
//! nothing is left half-restored.

pub mod memory;
pub mod pool;
pub mod remote;
pub mod task;
pub mod tree;

use crate::cli::RestoreArgs;
use crate::images::records::{FilesImage, ProcState, ProcessImage};
use crate::dump::proc::Stat;
use crate::images::ImageReader;
use crate::types::Tid;
use anyhow::{bail, Context, Result};
use nix::sys::wait::{waitpid, WaitStatus};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub struct Plan {
    pub procs: BTreeMap<i32, ProcessImage>,
    pub files: FilesImage,
    pub roots: Vec<i32>,
    /// `--pidns` with an image that holds pid 1: the saved init is the new
    /// namespace's init, and makes its private /proc (`tree::setup`).
    pub own_init: bool,
    /// Then, for the other roots: the init's mount namespace, which they
    /// join (`tree::spawn`) so that they see the namespace's /proc too.
    pub init_mnt: Option<std::os::fd::RawFd>,
}

/// Kills every process this restore created unless disarmed: a plan PID
/// whose process started after `since` (clock ticks since boot), so a
/// process that merely holds a saved PID is never touched.
struct Created {
    pids: Vec<i32>,
    since: u64,
    armed: bool,
}

fn start_ticks(pid: i32) -> Option<u64> {
    Stat::read(pid)?.field(22).ok() // starttime
}

fn now_ticks() -> u64 {
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    ((up * hz) as u64).saturating_sub(1)
}

impl Drop for Created {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for &p in &self.pids {
            if start_ticks(p).is_some_and(|t| t >= self.since) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

fn load(img: &ImageReader) -> Result<Plan> {
    let inv = img.inventory();
    let mut procs = BTreeMap::new();
    for &pid in &inv.pids {
        let p: ProcessImage = img.read_json(&format!("proc-{pid}.json"))?;
        if p.pid != pid {
            bail!("proc-{pid}.json describes pid {} (damaged image)", p.pid);
        }
        procs.insert(pid, p);
    }
    for p in procs.values() {
        for c in &p.children {
            if !procs.contains_key(c) {
                bail!("pid {}: child {c} has no record in the image", p.pid);
            }
        }
        if let ProcState::Alive = p.state {
            if p.threads.is_empty() {
                bail!("pid {}: no threads in the image", p.pid);
            }
        }
    }
    check_trees(&procs, &inv.roots)?;
    let files: FilesImage = img.read_json("files.json")?;
    Ok(Plan { procs, files, roots: inv.roots.clone(), own_init: false, init_mnt: None })
}

/// Check that the image in `dir` could be restored as far as its files go:
/// the whole chain opens (versions, manifests, every listed file's size and
/// checksum), every page pack of the chain matches its manifest checksum
/// and every page its name, and the process records load and form trees.
/// Returns the roots and every pid of the image. For a supervisor choosing
/// which checkpoint to recover from (`group::supervisor::recover`).
pub fn verify(dir: &std::path::Path) -> Result<(Vec<i32>, Vec<i32>)> {
    let img = ImageReader::open(dir)?;
    img.verify_pack()?;
    let mut link = img.parent();
    while let Some(i) = link {
        i.verify_pack()
            .with_context(|| format!("image {} is incremental: its parent {} is damaged", dir.display(), i.dir().display()))?;
        link = i.parent();
    }
    let plan = load(&img).with_context(|| format!("image {}", dir.display()))?;
    Ok((plan.roots, plan.procs.keys().copied().collect()))
}

/// The image's processes must form trees under its roots, each process
/// reached once: a damaged or hostile image naming a cycle, or a child
/// under two parents, would otherwise make the fork code loop or fork it
/// twice.
fn check_trees(procs: &BTreeMap<i32, ProcessImage>, roots: &[i32]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<i32> = Vec::new();
    for &r in roots {
        if !procs.contains_key(&r) {
            bail!("root pid {r} has no record in the image (damaged image)");
        }
        stack.push(r);
    }
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            bail!("pid {p} is reached twice in the image's process trees: a cycle, or a child of two parents (damaged image)");
        }
        stack.extend(&procs[&p].children);
    }
    if let Some(p) = procs.keys().find(|p| !seen.contains(*p)) {
        bail!("pid {p} is under none of the image's roots (damaged image)");
    }
    Ok(())
}

fn current_pgid(pid: i32) -> Option<i32> {
    Stat::read(pid)?.field(5).ok()
}

fn pid_owner(pid: i32) -> Option<String> {
    let s = Stat::read(pid)?;
    Some(format!("{}, state {}", s.comm, s.field_str(3).unwrap_or("?")))
}

/// A killed tree's PIDs stay taken until its zombies are reaped.
fn wait_pids_free(plan: &Plan) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &pid in plan.procs.keys() {
        loop {
            match pid_owner(pid) {
                None => break,
                Some(who) if Instant::now() > deadline => {
                    bail!("pid {pid} is still taken on this host by another process ({who}); use --pidns to restore into a new pid namespace")
                }
                Some(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    Ok(())
}

fn wait_ready(pool: &pool::Pool, n: usize) -> Result<()> {
    let mut got = 0;
    let mut buf = [0u8; tree::RECORD];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < n {
        let mut fds = [nix::poll::PollFd::new(
            crate::sys::borrow_fd(pool.ready_r),
            nix::poll::PollFlags::POLLIN,
        )];
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("restored processes did not get ready within 60 s ({got} of {n})");
        }
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX))
            .context("waiting for restored processes")?;
        match nix::unistd::read(pool.ready_r, &mut buf) {
            Ok(0) => bail!("every restored process exited before getting ready ({got} of {n} ready)"),
            Ok(k) if k == tree::RECORD => {
                let (pid, status, msg) = tree::decode(&buf);
                if status != 0 {
                    bail!("restoring pid {pid}: {msg}");
                }
                got += 1;
            }
            Ok(k) => bail!("short record ({k} bytes) on the ready pipe"),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => bail!("reading the ready pipe: {e}"),
        }
    }
    Ok(())
}

/// Host PIDs of the restored processes in a new pid namespace: the
/// processes whose NSpid ends with the saved PID and whose pid namespace is
/// that of our namespace init.
fn host_pids(init: i32, saved: &[i32]) -> Result<BTreeMap<i32, i32>> {
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).context("reading the new pid namespace")?;
    let mut map = BTreeMap::new();
    for h in crate::dump::proc::numeric_entries("/proc")? {
        if std::fs::read_link(format!("/proc/{h}/ns/pid")).ok().as_ref() != Some(&ns) {
            continue;
        }
        let Ok(st) = std::fs::read_to_string(format!("/proc/{h}/status")) else { continue };
        let inner = st
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last()?.parse::<i32>().ok());
        if let Some(n) = inner.filter(|n| saved.contains(n)) {
            map.insert(n, h);
        }
    }
    for s in saved {
        if !map.contains_key(s) {
            bail!("pid {s}: not found in the new pid namespace after creating it");
        }
    }
    Ok(map)
}

/// Kills the namespace init (and with it the whole namespace) on failure.
struct NsGuard(Option<i32>);

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            // Reap every child, not only the init: a dying init waits until
            // every process of its namespace is reaped, and the other roots
            // of a namespace image are our children.
            loop {
                match waitpid(None, None) {
                    Ok(st) if st.pid() == Some(nix::unistd::Pid::from_raw(p)) => break,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => break,
                }
            }
        }
    }
}

/// snap's CPU affinity before restore pinned it to one CPU.
pub static ORIGINAL_CPUS: std::sync::OnceLock<nix::sched::CpuSet> = std::sync::OnceLock::new();

/// Pin snap (and so every process it forks) to the CPU it runs on: each
/// remote system call is a ptrace round trip between snap and the restored
/// process, and a wake-up on another, idle vCPU can cost milliseconds on a
/// VM. Measured here: `sleep` restores in 6–7 ms pinned, 6–90 ms unpinned.
/// The restored threads get snap's original affinity back before they run.
fn pin_to_this_cpu() {
    use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
    let me = nix::unistd::Pid::from_raw(0);
    let (Ok(orig), Ok(cpu)) = (sched_getaffinity(me), sched_getcpu()) else { return };
    let mut one = CpuSet::new();
    if one.set(cpu).is_ok() && sched_setaffinity(me, &one).is_ok() {
        let _ = ORIGINAL_CPUS.set(orig);
    }
}

/// Give a thread (or ourselves, tid 0) snap's affinity from before pinning.
pub fn unpin(tid: i32) {
    if let Some(orig) = ORIGINAL_CPUS.get() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), orig);
    }
}

pub fn run(a: &RestoreArgs) -> Result<i32> {
    let t0 = Instant::now();
    pin_to_this_cpu();
    let r = restore(a, t0);
    unpin(0);
    r
}

fn restore(a: &RestoreArgs, t0: Instant) -> Result<i32> {
    // 1. Load and validate.
    crate::images::dir::timing("restore: start");
    let img = ImageReader::open(&a.dir)?;
    let mut plan = load(&img)?;
    let store = img.pages()?;
    if plan.procs.contains_key(&1) && !a.pidns {
        bail!(
            "the image is a whole pid namespace (it holds that namespace's init, pid 1{}): restore it with --pidns",
            img.inventory().pidns.as_ref().map(|n| format!(", dumped from {}", n.ns)).unwrap_or_default()
        );
    }
    let ipc = crate::ipc::sysv::load(&img)?;
    // 2. PIDs (in a new pid namespace every PID is free).
    if !a.pidns {
        wait_pids_free(&plan)?;
    }
    crate::images::dir::timing("restore: image loaded, PIDs free");
    // 2b. SysV IPC objects, before the trees are forked: a new IPC
    //     namespace (joined by snap, so every fork is in it) where the
    //     processes had their own, and every segment, semaphore set and
    //     queue made (or reused) with its saved id, so that the processes
    //     can attach the segments in stage 6. Removed again if the restore
    //     fails (the guard in `Restored`).
    let alive: std::collections::BTreeSet<i32> =
        plan.procs.values().filter(|p| matches!(p.state, ProcState::Alive)).map(|p| p.pid).collect();
    let mut ipc = match ipc {
        Some(l) => Some(crate::ipc::sysv::prepare(l, &img, &store, &alive)?),
        None => None,
    };
    // 3. Pool.
    let mut pool = pool::build(&plan, &img, &store, a.shell_job, a.ext_unix_sk)?;
    if let Some(i) = &ipc {
        pool.sysv_sizes = i.shm_sizes();
    }
    // 4. Fork the trees (in the cgroup asked for: snap moves there first).
    if let Some(cg) = &a.cgroup {
        crate::dump::cgroup::enter_for_restore(cg)?;
    }
    let mut created = Created { pids: plan.procs.keys().copied().collect(), since: now_ticks(), armed: !a.pidns };
    let live: Vec<i32> =
        plan.procs.values().filter(|p| matches!(p.state, ProcState::Alive)).map(|p| p.pid).collect();
    let mut middle = None;
    let mut ns_init = NsGuard(None);
    // Processes that reported ready before the last roots were forked.
    let mut ready_early = 0;
    if a.pidns && plan.procs.contains_key(&1) {
        // The image is a whole namespace: the saved pid 1, forked first
        // into the new namespace, is its init; the other roots (programs
        // whose parent was outside the namespace) are forked after it by
        // snap, also into the namespace, and join the mount namespace the
        // init makes for its /proc. Every root is a child of snap, as each
        // was a child of something outside the namespace.
        if !plan.roots.contains(&1) {
            bail!("pid 1 is in the image but not among its roots (damaged image)");
        }
        plan.own_init = true;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).context("unshare(CLONE_NEWPID)")?;
        let init = tree::spawn(&plan, &pool, 1).context("pid 1: forking the namespace's init")?;
        ns_init.0 = Some(init);
        let others: Vec<i32> = plan.roots.iter().copied().filter(|&r| r != 1).collect();
        if !others.is_empty() {
            // The init's mount namespace exists once its tree is ready.
            let n = tree::live_in_tree(&plan, 1);
            wait_ready(&pool, n).context("waiting for the namespace's init")?;
            ready_early = n;
            let path = format!("/proc/{init}/ns/mnt");
            let mnt = std::fs::File::open(&path).with_context(|| format!("pid 1 (host pid {init}): opening {path}"))?;
            plan.init_mnt = Some(std::os::fd::AsRawFd::as_raw_fd(&mnt));
            for r in others {
                tree::spawn(&plan, &pool, r)?;
            }
            plan.init_mnt = None;
            drop(mnt);
        }
    } else if a.pidns {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).context("unshare(CLONE_NEWPID)")?;
        let m = crate::sys::clone::fork_with_pid(0).context("forking the namespace init")?;
        if m == 0 {
            tree::ns_init(&plan, &pool);
        }
        ns_init.0 = Some(m);
    } else if a.detached {
        // An intermediate process creates the roots and exits, so they are
        // reparented to init (or our subreaper) like daemons.
        let m = crate::sys::clone::fork_with_pid(0).context("fork")?;
        if m == 0 {
            let mut code = 0;
            for &r in &plan.roots {
                if let Err(e) = tree::spawn(&plan, &pool, r) {
                    let msg = tree::encode(r, 1, &format!("{e:#}"));
                    let _ = crate::sys::process::write_raw(pool.ready_w, &msg);
                    code = 1;
                    break;
                }
            }
            crate::sys::process::exit_now(code);
        }
        middle = Some(m);
    } else {
        for &r in &plan.roots {
            tree::spawn(&plan, &pool, r)?;
        }
    }
    crate::images::dir::timing("restore: trees forked");
    pool.close_ready_writer();
    let ready = wait_ready(&pool, live.len() - ready_early);
    if let Some(m) = middle {
        let _ = waitpid(nix::unistd::Pid::from_raw(m), None);
    }
    ready?;
    crate::images::dir::timing("restore: all ready");
    // Saved PID -> PID as this host sees it (for ptrace and /proc).
    let host: BTreeMap<i32, i32> = match ns_init.0 {
        Some(init) => host_pids(init, &live)?,
        None => live.iter().map(|&p| (p, p)).collect(),
    };

    // 5. Seize; process groups.
    let mut attached: Vec<Tid> = Vec::new();
    let detach_all = |v: &Vec<Tid>| {
        for &t in v {
            let _ = nix::sys::ptrace::detach(t.nix(), None);
        }
    };
    let res = (|| -> Result<()> {
        for &pid in &live {
            task::seize(Tid(host[&pid])).with_context(|| format!("pid {pid}: seizing the restored process"))?;
            attached.push(Tid(host[&pid]));
        }
        let mut order: Vec<&ProcessImage> = live.iter().map(|p| &plan.procs[p]).collect();
        order.sort_by_key(|p| p.pgid != p.pid);
        for p in order {
            let h = host[&p.pid];
            if !plan.procs.contains_key(&p.pgid) || p.sid == p.pid || (!a.pidns && current_pgid(h) == Some(p.pgid)) {
                // A group outside the image keeps the inherited one; a
                // session leader already leads its own group.
                continue;
            }
            let mut r = remote::Remote { host: h, tid: Tid(h), ctl: pool.ctl };
            r.call(libc::SYS_setpgid, [0, p.pgid as u64, 0, 0, 0, 0])
                .with_context(|| format!("pid {}: joining process group {}", p.pid, p.pgid))?;
        }
        // 5b. SysV state whose last-user pid should be a restored process,
        //     written from inside it (needs every process seized, before
        //     any loses its control area in stage 6).
        if let Some(i) = &ipc {
            i.from_inside(&host, pool.ctl, pool.scratch(), pool.scratch_len())?;
        }
        // Foreground groups of the restored controlling terminals, set by
        // the session leader (only a member of the session may).
        for (sid, fg) in crate::kinds::pty::foreground(&plan.files) {
            let (Some(fd), Some(&h)) = (pool.ctty_fd(sid), host.get(&sid)) else {
                bail!("pid {sid}: session leader with a pseudo-terminal, not restored alive");
            };
            if fg == 0 || fg == sid {
                continue; // the leader's own group is the foreground already
            }
            if !live.iter().any(|p| plan.procs[p].pgid == fg) {
                eprintln!("snap: warning: session {sid}: foreground process group {fg} has no process in the image; the leader's group stays in the foreground");
                continue;
            }
            let mut r = remote::Remote { host: h, tid: Tid(h), ctl: pool.ctl };
            r.write(pool.scratch(), &fg.to_ne_bytes())?;
            r.call(libc::SYS_ioctl, [fd as u64, libc::TIOCSPGRP, pool.scratch(), 0, 0, 0])
                .with_context(|| format!("pid {sid}: setting the foreground process group {fg} (TIOCSPGRP)"))?;
        }
        // 6. Each process.
        for &pid in &live {
            let p = &plan.procs[&pid];
            let h = host[&pid];
            let mut r = remote::Remote { host: h, tid: Tid(h), ctl: pool.ctl };
            crate::images::dir::timing("restore: seized, groups set");
            task::pidfds(&mut r, p, &plan.files)?;
            memory::replace(&mut r, p, &pool, &img, &store)?;
            crate::images::dir::timing("restore: memory replaced");
            let tids = task::create_threads(&mut r, p, &pool)?;
            attached.extend(tids.iter().skip(1));
            task::process_signals(&mut r, p, &pool)?;
            task::posix_timers(&mut r, p, &pool)?;
            for (th, &t) in p.threads.iter().zip(&tids) {
                let mut rt = r.on(t);
                task::thread_state(&mut rt, th, &pool)?;
            }
            task::pending(&mut r, p, &pool)?;
            crate::images::dir::timing("restore: threads, signals, timers");
            for &t in &tids {
                let mut rt = r.on(t);
                task::creds(&mut rt, &p.creds, p.no_new_privs, &pool)
                    .with_context(|| format!("pid {pid} tid {}: credentials", t.0))?;
            }
            r.call(libc::SYS_close_range, [pool.base as u64, u32::MAX as u64, 0, 0, 0, 0])
                .with_context(|| format!("pid {pid}: closing snap's descriptors"))?;
            r.call(libc::SYS_prctl, [libc::PR_SET_DUMPABLE as u64, p.dumpable.max(0) as u64, 0, 0, 0, 0])
                .with_context(|| format!("pid {pid}: PR_SET_DUMPABLE"))?;
            for (th, &t) in p.threads.iter().zip(&tids).skip(1) {
                task::final_regs(t, th)?;
            }
            r.call_keep(libc::SYS_munmap, [pool.ctl, pool::CTL_MAPPED as u64, 0, 0, 0, 0])
                .with_context(|| format!("pid {pid}: unmapping the control area"))?;
            task::final_regs(Tid(h), &p.threads[0])?;
        }
        // Segments removed while attached are removed again, now that the
        // restored processes attach them.
        if let Some(i) = ipc.take() {
            i.finish()?;
        }
        Ok(())
    })();
    // 6b. TCP connections leave repair mode only now that every process
    //     is ready: a restore that failed before closed them still in
    //     repair mode, which the peers never see.
    let res = res.and_then(|()| {
        crate::kinds::tcp::leave_repair(&plan.files, &|id| pool.file(id), &|name| img.read_bytes(name))
            .context("TCP connections leaving repair mode")
    });
    if let Err(e) = res {
        detach_all(&attached);
        return Err(e);
    }
    crate::images::dir::timing("restore: credentials, registers");
    // 7. Release everything together.
    created.armed = false;
    for t in &attached {
        unpin(t.0);
    }
    // Processes that were stopped by job control stop again: a SIGSTOP
    // queued now is taken before they run any of their own code.
    for p in live.iter().map(|p| &plan.procs[p]).filter(|p| p.stopped) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(host[&p.pid]), nix::sys::signal::Signal::SIGSTOP);
    }
    detach_all(&attached);
    drop(pool);
    // The connections are back: their packets may pass again.
    if let Some(t) = &img.inventory().net_lock {
        if let Err(e) = crate::kinds::inet::unlock(t) {
            eprintln!("snap: warning: {e:#}");
        }
    }
    let init = ns_init.0.take();

    let root_host = host.get(&plan.roots[0]).copied().unwrap_or(plan.roots[0]);
    if let Some(f) = &a.pidfile {
        std::fs::write(f, format!("{root_host}\n")).with_context(|| format!("writing {}", f.display()))?;
    }
    if a.json {
        crate::outln!(
            "{}",
            serde_json::json!({
                "pids": plan.procs.keys().collect::<Vec<_>>(),
                "roots": plan.roots,
                "host_pids": host,
                "pidns_init": init,
                "seconds": t0.elapsed().as_secs_f64(),
            })
        )?;
    }
    if a.detached {
        return Ok(0);
    }
    // Stay the parent of the roots (or of the namespace init, which exits
    // with the first root's status); exit with the first root's status.
    let waited: Vec<i32> = match init {
        Some(i) if !plan.own_init => vec![i],
        // The saved init first (it is a root), by the pids snap sees.
        Some(_) => {
            let mut r: Vec<i32> = plan.roots.iter().filter_map(|r| host.get(r).copied()).collect();
            r.sort_by_key(|&h| Some(&h) != host.get(&1));
            r
        }
        None => plan.roots.clone(),
    };
    // Any child, in whatever order they end: the init of a namespace
    // image cannot finish exiting while another root, a zombie in its
    // namespace, waits for us to reap it.
    let mut left: Vec<i32> = waited.clone();
    let mut code = 0;
    while !left.is_empty() {
        let st = match waitpid(None, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(st) => st,
        };
        let (p, c) = match st {
            WaitStatus::Exited(p, c) => (p.as_raw(), c),
            WaitStatus::Signaled(p, s, _) => (p.as_raw(), 128 + s as i32),
            _ => continue,
        };
        if waited.first() == Some(&p) {
            code = c;
        }
        left.retain(|&x| x != p);
    }
    Ok(code)
}
