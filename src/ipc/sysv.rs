//! SysV IPC: shared memory segments, semaphore sets and message queues,
//! dump and restore side by side. Record: `ipc.json` (`records::IpcImage`),
//! segment contents in page maps `pagemap-sysvshm-<id>.bin` (page store),
//! message texts in blobs `sysv-msg-<id>.data`.
//!
//! **Which objects.** If the dumped processes have an IPC namespace of their
//! own (not snap's), the whole namespace is saved: every object, read from
//! inside it (snap's thread joins it with `setns` for the reading), and its
//! limits (`kernel.shmmax`, `msgmnb`, ...). Every dumped process must be in
//! that one namespace and no other process may be (dump refuses, naming it).
//! Restore makes a new IPC namespace for the restored tree and recreates
//! every object with its id (`/proc/sys/kernel/{shm,sem,msg}_next_id`).
//!
//! In snap's (the host's) namespace, only the objects the processes use:
//! the segments they have attached, the semaphore sets one of whose
//! semaphores was last operated on by a dumped process (`semctl GETPID`),
//! the queues whose last sender or receiver is a dumped process. At restore
//! each object is looked up by its saved id:
//! - missing: created with its id, key, mode, owner and creator (the
//!   creator by creating it from a thread running with that euid/egid);
//! - present with the same key (and size / number of semaphores): reused,
//!   its saved state written back, unless something outside the restore
//!   uses it: a segment with `shm_nattch > 0`, a semaphore set with waiters
//!   or whose last-operation pid is a live process, a queue whose last
//!   sender or receiver is a live process. Then restore refuses, naming the
//!   object and the user (the dumped tree itself, dumped with
//!   `--leave-running` and still running, is such a user);
//! - present with another key or size: refused, naming both.
//! Objects created by a restore that fails are removed again.
//!
//! **What is kept.** Per object id, key, permission bits, uid/gid,
//! cuid/cgid. Segment: size, content (read through the segment's own file,
//! `/proc/PID/map_files/…` of an attaching process, which changes none of
//! its times or counters; a segment no dumped process attaches, in an own
//! namespace, is attached read-only by snap for the reading, which updates
//! its `shm_atime`/`shm_dtime`/`shm_lpid`), `SHM_DEST` (restored by
//! removing it again once the restored processes attached it), `SHM_LOCKED`.
//! Each attachment (`VmaKind::SysvShm`: address, `SHM_RDONLY`) is restored
//! with a `shmat` at its address in the restored process, so `shm_nattch`,
//! `shmdt` and `IPC_STAT` work as before. Semaphores: each value; the
//! last-operation pid is restored for a semaphore last operated on by a
//! restored process (its value is set again from inside that process with
//! `SETVAL`), else it becomes snap's pid. Queues: every message (type and
//! text, read in place with `MSG_COPY`), in order, and `msg_qbytes`; the
//! last sender and receiver are restored when they are restored processes
//! (the messages are sent again from inside the sender; the receiver takes
//! one empty message of its own), else they become snap's pid.
//!
//! **Not kept.** Times (`shm_atime`, `sem_otime`, `msg_stime`, ...), which
//! no system call sets; `semncnt`/`semzcnt` (the waiters re-issue their
//! `semop` after restore); SEM_UNDO adjustments: the kernel keeps them per
//! process and shows them nowhere, so they cannot be seen at dump (snap
//! cannot even tell whether a process has any) and a restored process has
//! none: its pending adjustments are not applied when it exits.
//! `SHM_HUGETLB` segments are refused.

use crate::images::records::{IpcImage, IpcPerm, Msg, MsgQueue, SemSet, ShmSegment, Vma, VmaKind};
use crate::images::{ChainStore, ImageReader, ImageWriter, PageHash};
use crate::sys::ipc as sys;
use crate::types::{Pid, PAGE_SIZE};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};

pub const IMAGE_NAME: &str = "ipc.json";

/// Namespace limits saved with an own namespace and set again in the new one
/// (`shm_rmid_forced` last: set earlier it would destroy the unattached
/// segments snap just created).
const SYSCTLS: &[&str] = &["shmmax", "shmall", "shmmni", "msgmax", "msgmnb", "msgmni", "sem", "shm_rmid_forced"];

/// Largest segment an image may describe (the page store could not hold more anyway).
const MAX_SHM: u64 = 1 << 40;
/// SEMMSL: most semaphores a set can have.
const MAX_NSEMS: usize = 32000;
const SEMVMX: u16 = 32767;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

fn perm(id: i32, p: &sys::Perm) -> IpcPerm {
    IpcPerm { id, key: p.key, mode: p.mode & 0o777, uid: p.uid, gid: p.gid, cuid: p.cuid, cgid: p.cgid }
}

fn ns_id(path: &str) -> Result<(u64, u64)> {
    let m = std::fs::metadata(path).with_context(|| format!("stat {path}"))?;
    Ok((m.dev(), m.ino()))
}

/// Ids listed in /proc/sysvipc/NAME (objects of the calling thread's
/// namespace; the id is the second column).
fn list_ids(name: &str) -> Result<Vec<i32>> {
    let path = format!("/proc/sysvipc/{name}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|x| x.parse().ok())
                .with_context(|| format!("{path}: malformed line {l:?}"))
        })
        .collect()
}

/// snap's thread inside another IPC namespace until dropped.
struct InNamespace {
    back: File,
}

impl InNamespace {
    fn enter(pid: Pid) -> Result<Self> {
        let back = File::open("/proc/thread-self/ns/ipc").context("opening snap's IPC namespace")?;
        let path = format!("/proc/{}/ns/ipc", pid.0);
        let target = File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWIPC)
            .with_context(|| format!("{pid}: entering its IPC namespace (setns)"))?;
        Ok(InNamespace { back })
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(self.back.as_fd(), nix::sched::CloneFlags::CLONE_NEWIPC) {
            eprintln!("snap: warning: returning to snap's IPC namespace: {e}");
        }
    }
}

// ------------------------------------------------------------------ dump

/// Save the SysV objects of the dumped processes `pids` (all stopped) into
/// `w`: `ipc.json` and the contents. `vmas`: every process's mappings (its
/// `SysvShm` ones tell which segments it attaches and where to read them).
/// Nothing is written when the processes share snap's namespace and use no
/// object.
/// `image_pid`: a pid as the image records it (for a whole-namespace image,
/// the namespace's: `dump/pidns.rs`), `None` to keep it; last-operation
/// pids go through it.
pub fn dump(
    pids: &[Pid],
    vmas: &[(Pid, Vec<Vma>)],
    w: &mut ImageWriter,
    image_pid: &dyn Fn(i32) -> Option<i32>,
) -> Result<()> {
    let mine = ns_id("/proc/thread-self/ns/ipc")?;
    let mut ns: Option<(Pid, (u64, u64))> = None;
    for &p in pids {
        let Ok(n) = ns_id(&format!("/proc/{}/ns/ipc", p.0)) else { continue }; // a zombie
        match ns {
            None => ns = Some((p, n)),
            Some((q, m)) if m != n => {
                bail!("{p} and {q} are in different IPC namespaces: dumping several IPC namespaces is not supported")
            }
            _ => {}
        }
    }
    let Some((first, ns)) = ns else { return Ok(()) };
    let own = ns != mine;
    // Segment id -> a mapping of it in a dumped process (to read it through).
    let mut attached: BTreeMap<i32, (Pid, u64, u64)> = BTreeMap::new();
    for (pid, vs) in vmas {
        for v in vs {
            if let VmaKind::SysvShm { shmid, .. } = v.kind {
                attached.entry(shmid).or_insert((*pid, v.start, v.end));
            }
        }
    }
    let mut img = IpcImage { own_namespace: own, ..Default::default() };
    let mut blobs = Vec::new();
    let mut maps = Vec::new();
    {
        let _inside = if own {
            refuse_others_in_namespace(pids, ns)?;
            Some(InNamespace::enter(first)?)
        } else {
            None
        };
        let dumped: BTreeSet<i32> = pids.iter().map(|p| p.0).collect();
        if own {
            for name in SYSCTLS {
                let path = format!("/proc/sys/kernel/{name}");
                let v = std::fs::read_to_string(&path).with_context(|| format!("reading {path} of the IPC namespace"))?;
                img.sysctls.insert(name.to_string(), v.trim().to_string());
            }
        }
        for id in list_ids("shm")? {
            let via = attached.get(&id).copied();
            if !own && via.is_none() {
                continue;
            }
            let (seg, map) = dump_shm(id, via, w).with_context(|| format!("SysV shared memory segment {id}"))?;
            img.shm.push(seg);
            maps.push(map);
        }
        for (&id, &(pid, s, e)) in &attached {
            ensure!(
                img.shm.iter().any(|x| x.perm.id == id),
                "{pid}: mapping {s:#x}-{e:#x} attaches SysV segment {id}, which its namespace does not list"
            );
        }
        for id in list_ids("sem")? {
            let set = dump_sem(id).with_context(|| format!("SysV semaphore set {id}"))?;
            if own || set.pids.iter().any(|p| dumped.contains(p)) {
                img.sem.push(set);
            }
        }
        for id in list_ids("msg")? {
            let st = match sys::msg_stat(id) {
                Ok(s) => s,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EIDRM) => continue,
                Err(e) => return Err(e).with_context(|| format!("SysV message queue {id}: IPC_STAT")),
            };
            if own || dumped.contains(&st.lspid) || dumped.contains(&st.lrpid) {
                let (q, blob) = dump_msg(id, &st).with_context(|| format!("SysV message queue {id}"))?;
                img.msg.push(q);
                blobs.push(blob);
            }
        }
    }
    if !own && img.shm.is_empty() && img.sem.is_empty() && img.msg.is_empty() {
        return Ok(());
    }
    // Last users in the image's numbering.
    let map = |p: &mut i32| {
        if let Some(n) = image_pid(*p) {
            *p = n;
        }
    };
    for set in &mut img.sem {
        set.pids.iter_mut().for_each(map);
    }
    for q in &mut img.msg {
        map(&mut q.lspid);
        map(&mut q.lrpid);
    }
    for (seg, map) in img.shm.iter().zip(&maps) {
        w.write_pagemap(&seg.pagemap, map)?;
    }
    for (q, blob) in img.msg.iter().zip(&blobs) {
        w.write_bytes(&q.blob, blob)?;
    }
    w.write_json(IMAGE_NAME, &img)
}

/// An own namespace is saved whole and given to the restored tree alone: a
/// process outside the dump that shares it would lose sight of it.
fn refuse_others_in_namespace(pids: &[Pid], ns: (u64, u64)) -> Result<()> {
    for p in crate::dump::proc::numeric_entries("/proc")? {
        if pids.iter().any(|d| d.0 == p) {
            continue;
        }
        if ns_id(&format!("/proc/{p}/ns/ipc")).is_ok_and(|n| n == ns) {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            bail!(
                "pid {p} ({}) shares the dumped processes' IPC namespace but is not dumped: a namespace is saved whole, with all its processes",
                comm.trim()
            );
        }
    }
    Ok(())
}

fn dump_shm(id: i32, via: Option<(Pid, u64, u64)>, w: &mut ImageWriter) -> Result<(ShmSegment, Vec<(u64, PageHash)>)> {
    let st = sys::shm_stat(id).context("IPC_STAT")?;
    // Read through the segment's own file: a dumped process's mapping of it
    // when there is one (no counter or time changes), else a read-only
    // attachment in snap for the time of the reading.
    let (_attach, path) = match via {
        Some((pid, s, e)) => (None, format!("/proc/{}/map_files/{s:x}-{e:x}", pid.0)),
        None => {
            let a = sys::shm_attach(id, st.size, true).context("attaching it read-only to read it")?;
            let path = format!("/proc/self/map_files/{:x}-{:x}", a.addr, a.addr + a.len);
            (Some(a), path)
        }
    };
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    let fs = nix::sys::statfs::fstatfs(&f).with_context(|| format!("statfs {path}"))?;
    if fs.filesystem_type().0 as i64 == HUGETLBFS_MAGIC {
        bail!("SHM_HUGETLB segments are not supported yet");
    }
    let map = read_content(&f, st.size, w).with_context(|| format!("reading {} bytes through {path}", st.size))?;
    let seg = ShmSegment {
        perm: perm(id, &st.perm),
        size: st.size,
        dest: st.perm.mode & sys::SHM_DEST != 0,
        locked: st.perm.mode & sys::SHM_LOCKED != 0,
        pagemap: format!("pagemap-sysvshm-{id}.bin"),
    };
    Ok((seg, map))
}

/// The pages of a shmem file with data (SEEK_DATA/SEEK_HOLE), into the page
/// store: (offset, hash) for every non-zero page.
fn read_content(f: &File, size: u64, w: &mut ImageWriter) -> Result<Vec<(u64, PageHash)>> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let ps = PAGE_SIZE as u64;
    let mut map = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let d = match lseek(f.as_raw_fd(), off as i64, Whence::SeekData) {
            Ok(d) => d as u64 / ps * ps,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).with_context(|| format!("SEEK_DATA at {off}")),
        };
        if d >= size {
            break;
        }
        let h = (lseek(f.as_raw_fd(), d as i64, Whence::SeekHole).with_context(|| format!("SEEK_HOLE at {d}"))? as u64)
            .min(size)
            .div_ceil(ps)
            * ps;
        let mut at = d;
        while at < h {
            let n = ((h - at) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            chunk.fill(0);
            let want = (size - at).min(n as u64) as usize; // the last page may be partial
            f.read_exact_at(&mut chunk[..want], at).with_context(|| format!("reading at {at}"))?;
            w.pages().add_pages(at, chunk, &mut map)?;
            at += n as u64;
        }
        off = h.max(off + ps);
    }
    Ok(map)
}

fn dump_sem(id: i32) -> Result<SemSet> {
    let (p, n) = sys::sem_stat(id).context("IPC_STAT")?;
    let values = sys::sem_getall(id, n).context("GETALL")?;
    let pids = (0..n)
        .map(|i| sys::sem_int(id, i as i32, libc::GETPID, 0).with_context(|| format!("GETPID of semaphore {i}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(SemSet { perm: perm(id, &p), values, pids })
}

fn dump_msg(id: i32, st: &sys::MsgStat) -> Result<(MsgQueue, Vec<u8>)> {
    let mut blob = Vec::with_capacity(st.cbytes as usize);
    let mut messages = Vec::with_capacity(st.qnum as usize);
    for i in 0..st.qnum {
        // No message is longer than all of them together.
        let (mtype, text) = sys::msg_copy(id, i, st.cbytes as usize).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS) => anyhow::anyhow!("reading messages in place (MSG_COPY) needs a kernel with CONFIG_CHECKPOINT_RESTORE"),
            Some(libc::ENOMSG) | Some(libc::E2BIG) => {
                anyhow::anyhow!("the queue changed while it was read (used by a process outside the dump?): {e}")
            }
            _ => anyhow::Error::new(e),
        })
        .with_context(|| format!("copying message {i} of {}", st.qnum))?;
        messages.push(Msg { mtype, len: text.len() as u64 });
        blob.extend_from_slice(&text);
    }
    let q = MsgQueue {
        perm: perm(id, &st.perm),
        qbytes: st.qbytes,
        lspid: st.lspid,
        lrpid: st.lrpid,
        messages,
        blob: format!("sysv-msg-{id}.data"),
    };
    Ok((q, blob))
}

// ------------------------------------------------------------------ restore

/// `ipc.json` of the image, checked before anything is created: ids,
/// sizes, counts and the files it names. The message texts are read here.
pub struct Loaded {
    pub image: IpcImage,
    texts: BTreeMap<i32, Vec<Vec<u8>>>,
}

pub fn load(img: &ImageReader) -> Result<Option<Loaded>> {
    if !img.has(IMAGE_NAME) {
        return Ok(None);
    }
    let image: IpcImage = img.read_json(IMAGE_NAME)?;
    let ctx = |what: String| format!("{IMAGE_NAME}: {what} (damaged image)");
    for (name, v) in &image.sysctls {
        ensure!(SYSCTLS.contains(&name.as_str()), ctx(format!("unknown namespace setting kernel.{name}")));
        ensure!(v.len() < 100 && v.bytes().all(|b| b.is_ascii_digit() || b == b' ' || b == b'\t' || b == b'-'), ctx(format!("kernel.{name} = {v:?}")));
    }
    let mut seen = BTreeSet::new();
    for s in &image.shm {
        let id = s.perm.id;
        ensure!(id >= 0 && seen.insert(id), ctx(format!("shm id {id} negative or listed twice")));
        ensure!(s.size > 0 && s.size <= MAX_SHM, ctx(format!("shm id {id}: absurd size {}", s.size)));
        ensure!(
            s.pagemap == format!("pagemap-sysvshm-{id}.bin") && img.has(&s.pagemap),
            ctx(format!("shm id {id}: its page map {:?} is not in the image", s.pagemap))
        );
    }
    seen.clear();
    for s in &image.sem {
        let id = s.perm.id;
        ensure!(id >= 0 && seen.insert(id), ctx(format!("semaphore set {id} negative or listed twice")));
        ensure!(
            !s.values.is_empty() && s.values.len() <= MAX_NSEMS && s.values.len() == s.pids.len(),
            ctx(format!("semaphore set {id}: {} values and {} pids", s.values.len(), s.pids.len()))
        );
        ensure!(s.values.iter().all(|&v| v <= SEMVMX), ctx(format!("semaphore set {id}: a value above {SEMVMX}")));
    }
    seen.clear();
    let mut texts = BTreeMap::new();
    for q in &image.msg {
        let id = q.perm.id;
        ensure!(id >= 0 && seen.insert(id), ctx(format!("message queue {id} negative or listed twice")));
        ensure!(q.blob == format!("sysv-msg-{id}.data"), ctx(format!("message queue {id}: blob {:?}", q.blob)));
        ensure!(q.messages.iter().all(|m| m.mtype > 0), ctx(format!("message queue {id}: a message type below 1")));
        let blob = img.read_bytes(&q.blob).with_context(|| format!("message queue {id}: its messages"))?;
        let total = q.messages.iter().try_fold(0u64, |a, m| a.checked_add(m.len));
        ensure!(
            total == Some(blob.len() as u64),
            ctx(format!("message queue {id}: the messages add up to {total:?} bytes but {} holds {}", q.blob, blob.len()))
        );
        let mut at = 0usize;
        let mut v = Vec::with_capacity(q.messages.len());
        for m in &q.messages {
            v.push(blob[at..at + m.len as usize].to_vec());
            at += m.len as usize;
        }
        texts.insert(id, v);
    }
    Ok(Some(Loaded { image, texts }))
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Shm,
    Sem,
    Msg,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Shm => "shm",
            Kind::Sem => "sem",
            Kind::Msg => "msg",
        }
    }
}

/// The restored objects; removes the ones it created unless `finish`ed.
pub struct Restored {
    loaded: Loaded,
    created: Vec<(Kind, i32)>,
    /// Queues whose messages are sent from inside restored processes.
    deferred: Vec<i32>,
    armed: bool,
}

fn live_elsewhere(pid: i32) -> Option<String> {
    if pid <= 0 {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(format!("pid {pid} ({})", comm.trim()))
}

fn write_next_id(kind: Kind, id: i32) -> Result<()> {
    let path = format!("/proc/sys/kernel/{}_next_id", kind.name());
    std::fs::write(&path, id.to_string()).with_context(|| format!("writing {id} to {path} (needs CONFIG_CHECKPOINT_RESTORE)"))
}

/// Create an object of `kind` with exactly `id`, as creator `p.cuid/cgid`.
fn create_with_id(kind: Kind, p: &IpcPerm, get: impl FnOnce() -> std::io::Result<i32> + Send) -> Result<()> {
    write_next_id(kind, p.id)?;
    let got = if p.cuid == 0 && p.cgid == 0 { get() } else { sys::as_creator(p.cuid, p.cgid, get).and_then(|r| r) };
    // A successful creation consumes the id asked for; after a failed one
    // it would stay set and hand itself to whatever object anyone makes
    // next (this kernel refuses writing -1 back), so a throwaway private
    // object takes it.
    if got.is_err() {
        consume_next_id(kind);
    }
    let got = got.with_context(|| format!("creating {} id {} (key {:#x})", kind.name(), p.id, p.key))?;
    if got != p.id {
        let _ = remove(kind, got);
        bail!("creating {} id {} (key {:#x}): the kernel gave id {got} (is the index taken?)", kind.name(), p.id, p.key);
    }
    Ok(())
}

/// Use up a pending `*_next_id` with a private object, removed at once.
fn consume_next_id(kind: Kind) {
    let made = match kind {
        Kind::Shm => sys::shmget(libc::IPC_PRIVATE, 4096, 0o600),
        Kind::Sem => sys::semget(libc::IPC_PRIVATE, 1, 0o600),
        Kind::Msg => sys::msgget(libc::IPC_PRIVATE, 0o600),
    };
    if let Ok(id) = made {
        let _ = remove(kind, id);
    }
}

fn remove(kind: Kind, id: i32) -> std::io::Result<()> {
    match kind {
        Kind::Shm => sys::shm_cmd(id, libc::IPC_RMID),
        Kind::Sem => sys::sem_int(id, 0, libc::IPC_RMID, 0).map(|_| ()),
        Kind::Msg => sys::msg_rmid(id),
    }
}

fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EIDRM))
}

/// Stage 2b of restore, before the tree is forked: a new IPC namespace for
/// an own one (snap's thread joins it, so every fork is in it), then every
/// object created or reused with its saved state, from snap. `restored`:
/// the live processes of the image (whose pids can stand as last users).
pub fn prepare(loaded: Loaded, img: &ImageReader, store: &ChainStore, restored: &BTreeSet<i32>) -> Result<Restored> {
    let mut r = Restored { loaded, created: Vec::new(), deferred: Vec::new(), armed: true };
    let own = r.loaded.image.own_namespace;
    if own {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC).context("unshare(CLONE_NEWIPC) for the restored tree")?;
        for (name, v) in r.loaded.image.sysctls.iter().filter(|(n, _)| n.as_str() != "shm_rmid_forced") {
            let path = format!("/proc/sys/kernel/{name}");
            std::fs::write(&path, v).with_context(|| format!("setting {path} to {v} in the new IPC namespace"))?;
        }
    }
    let image = r.loaded.image.clone();
    for s in &image.shm {
        r.shm(s, img, store).with_context(|| format!("restoring SysV shared memory segment {} (key {:#x})", s.perm.id, s.perm.key))?;
    }
    for s in &image.sem {
        r.sem(s).with_context(|| format!("restoring SysV semaphore set {} (key {:#x})", s.perm.id, s.perm.key))?;
    }
    for q in &image.msg {
        r.msg(q, restored).with_context(|| format!("restoring SysV message queue {} (key {:#x})", q.perm.id, q.perm.key))?;
    }
    if let Some(v) = image.sysctls.get("shm_rmid_forced").filter(|_| own) {
        std::fs::write("/proc/sys/kernel/shm_rmid_forced", v).context("setting kernel.shm_rmid_forced in the new IPC namespace")?;
    }
    Ok(r)
}

impl Restored {
    /// Segment sizes by id, for the attachments (`restore/memory.rs`).
    pub fn shm_sizes(&self) -> BTreeMap<i32, u64> {
        self.loaded.image.shm.iter().map(|s| (s.perm.id, s.size)).collect()
    }

    fn shm(&mut self, s: &ShmSegment, img: &ImageReader, store: &ChainStore) -> Result<()> {
        let (id, p) = (s.perm.id, &s.perm);
        let reused = match sys::shm_stat(id) {
            Ok(st) => {
                if st.perm.key != p.key || st.size != s.size {
                    bail!(
                        "id {id} is taken by another segment (key {:#x}, {} bytes; the image has key {:#x}, {} bytes)",
                        st.perm.key,
                        st.size,
                        p.key,
                        s.size
                    );
                }
                if st.nattch > 0 {
                    bail!(
                        "it still exists and is attached by {} process(es) outside this restore (last by pid {}): refusing to overwrite it",
                        st.nattch,
                        st.lpid
                    );
                }
                true
            }
            Err(e) if gone(&e) => {
                let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
                let (key, size) = (p.key, s.size);
                create_with_id(Kind::Shm, p, move || sys::shmget(key, size, flags))?;
                self.created.push((Kind::Shm, id));
                false
            }
            Err(e) => return Err(e).context("IPC_STAT"),
        };
        sys::shm_set(id, p.uid, p.gid, p.mode).context("IPC_SET (owner and mode)")?;
        // Content, written through the segment's file while snap attaches it.
        let a = sys::shm_attach(id, s.size, false).context("attaching it to write its content")?;
        let path = format!("/proc/self/map_files/{:x}-{:x}", a.addr, a.addr + a.len);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).with_context(|| format!("opening {path}"))?;
        if reused {
            nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                0,
                s.size as i64,
            )
            .context("clearing the old content")?;
        }
        for (off, h) in img.pagemap(&s.pagemap)? {
            ensure!(off < s.size, "{}: page at offset {off:#x} is past the segment's {} bytes (damaged image)", s.pagemap, s.size);
            let page = store.page(h)?;
            let n = (s.size - off).min(PAGE_SIZE as u64) as usize;
            f.write_all_at(&page[..n], off).with_context(|| format!("writing its page at offset {off:#x}"))?;
        }
        drop(f);
        drop(a);
        if s.locked {
            sys::shm_cmd(id, libc::SHM_LOCK).context("SHM_LOCK")?;
        } else if reused {
            sys::shm_cmd(id, libc::SHM_UNLOCK).context("SHM_UNLOCK")?;
        }
        Ok(())
    }

    fn sem(&mut self, s: &SemSet) -> Result<()> {
        let (id, p) = (s.perm.id, &s.perm);
        let n = s.values.len();
        let fresh = match sys::sem_stat(id) {
            Ok((cur, cn)) => {
                if cur.key != p.key || cn != n {
                    bail!("id {id} is taken by another set (key {:#x}, {cn} semaphores; the image has key {:#x}, {n})", cur.key, p.key);
                }
                for i in 0..n as i32 {
                    let waiting = sys::sem_int(id, i, libc::GETNCNT, 0)? + sys::sem_int(id, i, libc::GETZCNT, 0)?;
                    if waiting > 0 {
                        bail!("it still exists and {waiting} process(es) wait on semaphore {i}: refusing to overwrite it");
                    }
                    let last = sys::sem_int(id, i, libc::GETPID, 0)?;
                    if let Some(who) = live_elsewhere(last) {
                        bail!("it still exists and semaphore {i} was last used by {who}, which still runs: refusing to overwrite it");
                    }
                }
                false
            }
            Err(e) if gone(&e) => {
                let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
                let key = p.key;
                create_with_id(Kind::Sem, p, move || sys::semget(key, n as i32, flags))?;
                self.created.push((Kind::Sem, id));
                true
            }
            Err(e) => return Err(e).context("IPC_STAT"),
        };
        sys::sem_set(id, p.uid, p.gid, p.mode).context("IPC_SET (owner and mode)")?;
        // A new set is all zeros with no last pid: SETALL only if needed
        // (it makes snap the last user of every semaphore).
        if !fresh || s.values.iter().any(|&v| v != 0) {
            sys::sem_setall(id, &s.values).context("SETALL")?;
        }
        Ok(())
    }

    fn msg(&mut self, q: &MsgQueue, restored: &BTreeSet<i32>) -> Result<()> {
        let (id, p) = (q.perm.id, &q.perm);
        match sys::msg_stat(id) {
            Ok(st) => {
                if st.perm.key != p.key {
                    bail!("id {id} is taken by another queue (key {:#x}; the image has key {:#x})", st.perm.key, p.key);
                }
                for (role, pid) in [("sender", st.lspid), ("receiver", st.lrpid)] {
                    if let Some(who) = live_elsewhere(pid) {
                        bail!("it still exists and its last {role} {who} still runs: refusing to overwrite it");
                    }
                }
                let mut n = 0u64;
                while sys::msg_drop_one(id).context("emptying it")? {
                    n += 1;
                    ensure!(n <= st.qnum + 1_000_000, "emptying it: messages keep coming");
                }
            }
            Err(e) if gone(&e) => {
                let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
                let key = p.key;
                create_with_id(Kind::Msg, p, move || sys::msgget(key, flags))?;
                self.created.push((Kind::Msg, id));
            }
            Err(e) => return Err(e).context("IPC_STAT"),
        }
        sys::msg_set(id, p.uid, p.gid, p.mode, q.qbytes).map_err(|e| {
            if e.raw_os_error() == Some(libc::EPERM) {
                anyhow::anyhow!("IPC_SET: msg_qbytes {} is above kernel.msgmnb here and snap lacks CAP_SYS_RESOURCE", q.qbytes)
            } else {
                anyhow::Error::new(e).context("IPC_SET (owner, mode, msg_qbytes)")
            }
        })?;
        if restored.contains(&q.lspid) || restored.contains(&q.lrpid) {
            // Sent from inside the restored processes (`from_inside`), so
            // the last sender and receiver are theirs.
            self.deferred.push(id);
            return Ok(());
        }
        for (i, (m, text)) in q.messages.iter().zip(&self.loaded.texts[&id]).enumerate() {
            sys::msgsnd(id, m.mtype, text).with_context(|| format!("sending message {i} ({} bytes)", text.len()))?;
        }
        Ok(())
    }

    /// Stage 5b of restore: with every restored process seized (and still
    /// able to run remote system calls at the control area), the state whose
    /// "last user" pid should be a restored process is written from inside
    /// it: semaphore values (SETVAL) and deferred queues. `host`: saved pid
    /// -> pid as snap sees it.
    pub fn from_inside(&self, host: &BTreeMap<i32, i32>, ctl: u64, scratch: u64, scratch_len: usize) -> Result<()> {
        use crate::restore::remote::Remote;
        use crate::types::Tid;
        let remote = |pid: i32| host.get(&pid).map(|&h| Remote { host: h, tid: Tid(h), ctl });
        for s in &self.loaded.image.sem {
            for (i, (&v, &pid)) in s.values.iter().zip(&s.pids).enumerate() {
                if let Some(mut r) = remote(pid) {
                    r.call(libc::SYS_semctl, [s.perm.id as u64, i as u64, libc::SETVAL as u64, v as u64, 0, 0])
                        .with_context(|| format!("pid {pid}: SETVAL of semaphore {i} of set {}", s.perm.id))?;
                }
            }
        }
        for q in self.loaded.image.msg.iter().filter(|q| self.deferred.contains(&q.perm.id)) {
            let id = q.perm.id as u64;
            let ctx = || format!("message queue {} (key {:#x})", q.perm.id, q.perm.key);
            let nowait = libc::IPC_NOWAIT as u64;
            // msgbuf with type 1 and no text, in the scratch area.
            let empty = 1i64.to_ne_bytes();
            let send_empty = |r: &mut Remote| -> Result<()> {
                r.write(scratch, &empty)?;
                r.call(libc::SYS_msgsnd, [id, scratch, 0, nowait, 0, 0]).map(|_| ())
            };
            let receive_one = |r: &mut Remote| -> Result<()> {
                r.call(libc::SYS_msgrcv, [id, scratch, 0, 0, nowait | libc::MSG_NOERROR as u64, 0]).map(|_| ())
            };
            let texts = &self.loaded.texts[&q.perm.id];
            if q.messages.is_empty() {
                // Sender sends one empty message, receiver (or snap) takes it.
                match remote(q.lspid) {
                    Some(mut r) => send_empty(&mut r).with_context(|| format!("pid {}: {}: as last sender", q.lspid, ctx()))?,
                    None => sys::msgsnd(q.perm.id, 1, &[]).with_context(ctx)?,
                }
                match remote(q.lrpid) {
                    Some(mut r) => receive_one(&mut r).with_context(|| format!("pid {}: {}: as last receiver", q.lrpid, ctx()))?,
                    None => {
                        sys::msg_drop_one(q.perm.id).with_context(ctx)?;
                    }
                }
                continue;
            }
            if let Some(mut r) = remote(q.lrpid) {
                send_empty(&mut r).and_then(|_| receive_one(&mut r)).with_context(|| format!("pid {}: {}: as last receiver", q.lrpid, ctx()))?;
            }
            let mut sender = remote(q.lspid);
            for (i, (m, text)) in q.messages.iter().zip(texts).enumerate() {
                match &mut sender {
                    Some(r) if 8 + text.len() <= scratch_len => {
                        let mut buf = m.mtype.to_ne_bytes().to_vec();
                        buf.extend_from_slice(text);
                        r.write(scratch, &buf)?;
                        r.call(libc::SYS_msgsnd, [id, scratch, text.len() as u64, nowait, 0, 0])
                            .with_context(|| format!("pid {}: {}: sending message {i}", q.lspid, ctx()))?;
                    }
                    _ => sys::msgsnd(q.perm.id, m.mtype, text).with_context(|| format!("{}: sending message {i}", ctx()))?,
                }
            }
        }
        Ok(())
    }

    /// Last restore step for IPC, once every process attached its segments:
    /// segments that were removed while attached are removed again.
    pub fn finish(mut self) -> Result<()> {
        for s in self.loaded.image.shm.iter().filter(|s| s.dest) {
            sys::shm_cmd(s.perm.id, libc::IPC_RMID)
                .with_context(|| format!("SysV segment {} (removed while attached): IPC_RMID", s.perm.id))?;
        }
        self.armed = false;
        Ok(())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if self.armed {
            for &(k, id) in &self.created {
                let _ = remove(k, id);
            }
        }
    }
}
