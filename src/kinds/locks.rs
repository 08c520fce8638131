//! File locks: flock(2), fcntl POSIX record locks and OFD locks.
//!
//! Dump (`dump`, once per process after its descriptors): flock and OFD
//! locks belong to an open file description; they are found in the `lock:`
//! lines of /proc/PID/fdinfo/N (which list the locks taken through that
//! description) and recorded on the first descriptor of the process that
//! refers to the description. POSIX locks belong to the process: they come
//! from /proc/locks (pid = the process) and are recorded on a descriptor of
//! the process for the same file opened with a fitting access mode.
//! Refused: leases; a flock held through a description no dumped process
//! has; a POSIX lock on a file the process has no usable descriptor for or
//! also maps (see below); a blocked waiter (`->` in /proc/locks) of the
//! process, unless one of its threads is blocked in fcntl(F_SETLKW /
//! F_OFD_SETLKW) or flock() without LOCK_NB on that file — that call is
//! re-issued after restore and waits again.
//!
//! Restore (`after_fd_table`, inside each restored process once its fd
//! table is in place): every lock is taken again with a non-blocking call on
//! the process's own descriptor. flock/OFD locks follow the description, so
//! snap's pool copy closing later does not release them. POSIX locks,
//! though, are dropped by the kernel when the owning process closes *any*
//! descriptor of the file, and the restore later closes the pool's copies
//! inside the process (`close_range(base, ~0)`): so the pool descriptors of
//! a POSIX-locked file are closed here first. That is why a POSIX lock on a
//! file the process also maps, or on its executable, is refused at dump
//! (the pool descriptor is still needed for the mapping).
//!
//! The locks of each process reach the forked copies through `prepare`,
//! called in snap before forking (a copy finds its own by its PID, which is
//! the saved PID, also with `--pidns`).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use crate::images::records::{FdEntry, FileLock, FileLockKind, FilesImage, ProcessImage, Vma, VmaKind};
use crate::types::{Pid, RemoteFd};

/// One line of /proc/locks or an fdinfo `lock:` line.
#[derive(Debug, Clone, PartialEq)]
pub struct LockLine {
    pub waiter: bool,
    /// POSIX, FLOCK, OFDLCK, LEASE, DELEG, ACCESS, ...
    pub class: String,
    pub write: bool,
    pub pid: i32,
    pub major: u64,
    pub minor: u64,
    pub ino: u64,
    pub start: u64,
    pub end: Option<u64>,
}

impl LockLine {
    pub fn dev_ino(&self) -> (u64, u64) {
        (libc::makedev(self.major as u32, self.minor as u32), self.ino)
    }
    fn describe(&self) -> String {
        let end = self.end.map(|e| e.to_string()).unwrap_or_else(|| "EOF".into());
        format!(
            "{} {} lock on {:02x}:{:02x}:{} bytes {}-{}",
            self.class,
            if self.write { "WRITE" } else { "READ" },
            self.major,
            self.minor,
            self.ino,
            self.start,
            end
        )
    }
}

/// Parse one line of /proc/locks (or the part of an fdinfo `lock:` line
/// after the tag). `None` for lines without an inode (`<none>`).
pub fn parse_line(line: &str) -> Result<Option<LockLine>> {
    let mut t = line.split_whitespace().peekable();
    let _id = t.next().ok_or_else(|| anyhow!("empty lock line"))?;
    let waiter = t.peek() == Some(&"->");
    if waiter {
        t.next();
    }
    let class = t.next().ok_or_else(|| anyhow!("lock line without class: {line:?}"))?.to_string();
    let mut rest: Vec<&str> = t.collect();
    // Leases have an extra word or two before the mode; the mode is the
    // first of READ/WRITE/UNLCK.
    let mi = rest
        .iter()
        .position(|w| matches!(*w, "READ" | "WRITE" | "UNLCK"))
        .ok_or_else(|| anyhow!("lock line without mode: {line:?}"))?;
    let write = rest[mi] == "WRITE";
    rest.drain(..=mi);
    if rest.len() < 4 {
        bail!("short lock line: {line:?}");
    }
    let pid: i32 = rest[0].parse().with_context(|| format!("lock line pid: {line:?}"))?;
    if rest[1].starts_with("<none>") {
        return Ok(None);
    }
    let mut di = rest[1].split(':');
    let mut hex = |what: &str| -> Result<u64> {
        let s = di.next().ok_or_else(|| anyhow!("lock line {what}: {line:?}"))?;
        u64::from_str_radix(s, 16).with_context(|| format!("lock line {what}: {line:?}"))
    };
    let major = hex("major")?;
    let minor = hex("minor")?;
    let ino: u64 = di.next().ok_or_else(|| anyhow!("lock line inode: {line:?}"))?.parse().with_context(|| format!("lock line inode: {line:?}"))?;
    let start: u64 = rest[2].parse().with_context(|| format!("lock line start: {line:?}"))?;
    let end = if rest[3] == "EOF" { None } else { Some(rest[3].parse().with_context(|| format!("lock line end: {line:?}"))?) };
    Ok(Some(LockLine { waiter, class, write, pid, major, minor, ino, start, end }))
}

fn read_proc_locks() -> Result<Vec<LockLine>> {
    let text = fs::read_to_string("/proc/locks").context("reading /proc/locks")?;
    let mut out = Vec::new();
    for l in text.lines() {
        if let Some(x) = parse_line(l).with_context(|| "/proc/locks")? {
            out.push(x);
        }
    }
    Ok(out)
}

/// The `lock:` lines of /proc/PID/fdinfo/N: the locks taken through that
/// open file description (flock, OFD) or by the process through it (POSIX).
fn fdinfo_locks(pid: Pid, fd: i32) -> Result<Vec<LockLine>> {
    let path = format!("/proc/{}/fdinfo/{}", pid.0, fd);
    let text = fs::read_to_string(&path).with_context(|| format!("{pid} fd {fd}: reading {path}"))?;
    let mut out = Vec::new();
    for l in text.lines() {
        if let Some(r) = l.strip_prefix("lock:") {
            if let Some(x) = parse_line(r).with_context(|| format!("{pid} fd {fd}: {path}"))? {
                out.push(x);
            }
        }
    }
    Ok(out)
}

struct FdFacts {
    fd: i32,
    file: u32,
    dev: u64,
    ino: u64,
    /// O_ACCMODE bits, or None for O_PATH.
    acc: Option<u32>,
    /// Target of /proc/PID/fd/N, for messages.
    link: String,
}

/// Is one of the process's threads about to re-issue a blocking lock call
/// on a descriptor of (dev, ino)? (Its saved registers were adjusted so an
/// interrupted call is re-issued: rax = call number, rip at `syscall`.)
fn waiting_in_lock_call(pid: Pid, p: &ProcessImage, facts: &[FdFacts], key: (u64, u64)) -> bool {
    let mem = fs::File::open(format!("/proc/{}/mem", pid.0)).ok();
    p.threads.iter().any(|t| {
        let r = &t.regs;
        if r.len() < 17 {
            return false;
        }
        let (nr, fd, arg) = (r[10] as i64, r[14] as i64 as i32, r[13]);
        let lock_call = (nr == libc::SYS_fcntl && (arg == libc::F_SETLKW as u64 || arg == libc::F_OFD_SETLKW as u64))
            || (nr == libc::SYS_flock && arg & libc::LOCK_NB as u64 == 0 && arg & (libc::LOCK_SH | libc::LOCK_EX) as u64 != 0);
        if !lock_call || !facts.iter().any(|f| f.fd == fd && (f.dev, f.ino) == key) {
            return false;
        }
        // And the thread really sits on a `syscall` instruction.
        let mut b = [0u8; 2];
        use std::os::unix::fs::FileExt;
        mem.as_ref().map(|m| m.read_exact_at(&mut b, r[16]).is_ok() && b == [0x0f, 0x05]).unwrap_or(false)
    })
}

/// Dump: the locks process `pid` holds, each on one of its descriptors.
/// `fds`: its descriptors as received (our copies); `p`: its image so far
/// (fds, threads, vmas, exe); `all`: every process of the dump.
pub fn dump(pid: Pid, fds: &[(RemoteFd, OwnedFd)], p: &ProcessImage, all: &[Pid]) -> Result<Vec<FileLock>> {
    // fdinfo lists every lock on a file (any owner, waiters too): no lock
    // line on any descriptor means no lock to save and none waited for, and
    // /proc/locks (slow to read here: ~15 ms) is not needed.
    let mut any = false;
    for (rfd, _) in fds {
        let path = format!("/proc/{}/fdinfo/{}", pid.0, rfd.0);
        let text = fs::read_to_string(&path).with_context(|| format!("{pid} {rfd}: reading {path}"))?;
        if text.lines().any(|l| l.starts_with("lock:")) {
            any = true;
            break;
        }
    }
    if !any {
        return Ok(Vec::new());
    }
    let proc_locks = read_proc_locks()?;
    let mut facts = Vec::with_capacity(fds.len());
    for ((rfd, ours), e) in fds.iter().zip(&p.fds) {
        let st = nix::sys::stat::fstat(ours.as_raw_fd()).with_context(|| format!("{pid} {rfd}: fstat"))?;
        let info = super::read_fdinfo(pid, *rfd)?;
        let acc = (info.flags & libc::O_PATH as u32 == 0).then_some(info.flags & libc::O_ACCMODE as u32);
        let link = fs::read_link(format!("/proc/{}/fd/{}", pid.0, rfd.0)).map(|l| l.display().to_string()).unwrap_or_default();
        facts.push(FdFacts { fd: e.fd, file: e.file, dev: st.st_dev, ino: st.st_ino, acc, link });
    }
    let mut out = Vec::new();

    // Description locks (flock, OFD), once per description.
    let mut seen_files = HashSet::new();
    let mut desc_locks: HashSet<(u64, u64, bool, bool)> = HashSet::new();
    for f in &facts {
        if !seen_files.insert(f.file) {
            continue;
        }
        for l in fdinfo_locks(pid, f.fd)? {
            let kind = match l.class.as_str() {
                "FLOCK" => FileLockKind::Flock,
                "OFDLCK" => FileLockKind::Ofd,
                "POSIX" => continue, // from /proc/locks below
                other => bail!("{pid} fd {} ({}): {other} locks (leases, delegations) are not supported yet ({})", f.fd, f.link, l.describe()),
            };
            if kind == FileLockKind::Flock {
                desc_locks.insert((f.dev, f.ino, l.write, true));
            }
            out.push(FileLock { kind, write: l.write, start: l.start, end: l.end, fd: f.fd, dev: f.dev, ino: f.ino });
        }
    }

    let mapped: HashSet<(u64, u64)> = p
        .vmas
        .iter()
        .filter_map(|v: &Vma| match &v.kind {
            VmaKind::File { file } => Some((file.dev, file.ino)),
            _ => None,
        })
        .collect();
    let exe = nix::sys::stat::stat(format!("/proc/{}/exe", pid.0).as_str()).ok().map(|s| (s.st_dev, s.st_ino));

    for l in proc_locks.iter().filter(|l| l.pid == pid.0 || (l.waiter && l.pid == -1)) {
        let key = l.dev_ino();
        let on_file = facts.iter().any(|f| (f.dev, f.ino) == key);
        if l.waiter {
            if l.pid == -1 && !on_file {
                continue; // an OFD waiter on a file this process does not have open
            }
            if waiting_in_lock_call(pid, p, &facts, key) {
                continue; // re-issued after restore, waits again
            }
            if l.pid == -1 {
                bail!(
                    "{pid}: someone (OFD locks show no pid) is blocked waiting for an {} on a file this process has open, \
                     and no thread of {pid} is blocked in fcntl(F_OFD_SETLKW) on it; blocked lock waiters are not supported yet",
                    l.describe()
                );
            }
            bail!(
                "{pid}: blocked waiting for a {}, but not in a blocking fcntl/flock call that can be re-issued; \
                 blocked lock waiters are not supported yet",
                l.describe()
            );
        }
        match l.class.as_str() {
            "POSIX" => {
                let fit = facts.iter().find(|f| {
                    (f.dev, f.ino) == key
                        && match f.acc {
                            Some(a) if l.write => a == libc::O_WRONLY as u32 || a == libc::O_RDWR as u32,
                            Some(a) => a == libc::O_RDONLY as u32 || a == libc::O_RDWR as u32,
                            None => false,
                        }
                });
                let Some(f) = fit else {
                    bail!(
                        "{pid}: holds a {} but has no descriptor of that file open for {}; not supported",
                        l.describe(),
                        if l.write { "writing" } else { "reading" }
                    );
                };
                if mapped.contains(&key) || exe == Some(key) {
                    bail!(
                        "{pid} fd {} ({}): holds a {} on a file it also maps (or runs); POSIX locks on mapped files are not supported yet",
                        f.fd,
                        f.link,
                        l.describe()
                    );
                }
                out.push(FileLock {
                    kind: FileLockKind::Posix,
                    write: l.write,
                    start: l.start,
                    end: l.end,
                    fd: f.fd,
                    dev: f.dev,
                    ino: f.ino,
                });
            }
            "FLOCK" => {
                // Recorded through a description of this process, or of
                // another dumped process (inherited, passed)?
                if desc_locks.contains(&(key.0, key.1, l.write, true)) {
                    continue;
                }
                if !held_by_some(all, pid, key, l.write)? {
                    bail!(
                        "{pid}: holds a {} through an open file description no dumped process has open \
                         (closed here, left with a process outside the dump); not supported",
                        l.describe()
                    );
                }
            }
            "OFDLCK" => {}
            other => bail!("{pid}: {other} locks (leases, delegations) are not supported yet ({})", l.describe()),
        }
    }
    Ok(out)
}

/// Does some other dumped process show this flock in an fdinfo `lock:` line?
fn held_by_some(all: &[Pid], me: Pid, key: (u64, u64), write: bool) -> Result<bool> {
    for &q in all {
        if q == me {
            continue;
        }
        let Ok(fds) = super::list_fds(q) else { continue };
        for fd in fds {
            for l in fdinfo_locks(q, fd.0).unwrap_or_default() {
                if l.class == "FLOCK" && l.write == write && l.dev_ino() == key {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

static PLAN: OnceLock<HashMap<i32, Vec<FileLock>>> = OnceLock::new();

/// Restore, in snap before forking: remember every process's locks so the
/// forked copies find theirs in `after_fd_table`.
pub fn prepare<'a>(procs: impl IntoIterator<Item = &'a ProcessImage>) {
    let m = procs.into_iter().filter(|p| !p.file_locks.is_empty()).map(|p| (p.pid, p.file_locks.clone())).collect();
    let _ = PLAN.set(m);
}

/// Restore, inside the restored process (its fd table in place): take
/// every lock again through its descriptor.
pub fn after_fd_table(fds: &[FdEntry], _files: &FilesImage) -> Result<()> {
    let me = std::process::id() as i32;
    let Some(locks) = PLAN.get().and_then(|m| m.get(&me)) else { return Ok(()) };
    restore_locks(fds, locks).with_context(|| format!("pid {me}: file locks"))
}

fn restore_locks(fds: &[FdEntry], locks: &[FileLock]) -> Result<()> {
    // Closing any descriptor of a file drops the POSIX locks the process
    // holds on it: close the inherited pool copies of those files now,
    // before taking the locks (the restore would close them later).
    let posix: HashSet<(u64, u64)> =
        locks.iter().filter(|l| l.kind == FileLockKind::Posix).map(|l| (l.dev, l.ino)).collect();
    if !posix.is_empty() {
        let mine: HashSet<i32> = fds.iter().map(|f| f.fd).collect();
        let mut others = Vec::new();
        for e in fs::read_dir("/proc/self/fd").context("listing /proc/self/fd")? {
            if let Some(n) = e.ok().and_then(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
                if !mine.contains(&n) {
                    others.push(n);
                }
            }
        }
        for n in others {
            if let Ok(st) = nix::sys::stat::fstat(n) {
                if posix.contains(&(st.st_dev, st.st_ino)) {
                    let _ = nix::unistd::close(n);
                }
            }
        }
    }
    for l in locks {
        let what = || {
            format!(
                "fd {}: {:?} {} lock on {}:{} bytes {}-{}",
                l.fd,
                l.kind,
                if l.write { "write" } else { "read" },
                l.dev,
                l.ino,
                l.start,
                l.end.map(|e| e.to_string()).unwrap_or_else(|| "EOF".into())
            )
        };
        let r = match l.kind {
            FileLockKind::Flock => {
                let op = if l.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
                super::sys::flock(l.fd, op)
            }
            FileLockKind::Posix | FileLockKind::Ofd => {
                let len = match l.end {
                    Some(e) => (e - l.start + 1) as i64,
                    None => 0,
                };
                let cmd = if l.kind == FileLockKind::Ofd { libc::F_OFD_SETLK } else { libc::F_SETLK };
                super::sys::fcntl_setlk(l.fd, cmd, l.write, l.start as i64, len)
            }
        };
        if let Err(e) = r {
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                bail!("{}: the file is locked by another process now", what());
            }
            return Err(e).with_context(what);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn lines() {
        let l = parse_line("1: POSIX  ADVISORY  WRITE 412 08:01:1234 10 19").unwrap().unwrap();
        assert_eq!((l.waiter, l.class.as_str(), l.write, l.pid, l.major, l.minor, l.ino, l.start, l.end), (false, "POSIX", true, 412, 8, 1, 1234, 10, Some(19)));
        let l = parse_line("2: -> FLOCK  ADVISORY  READ 7 00:1f:99 0 EOF").unwrap().unwrap();
        assert!(l.waiter && !l.write && l.end.is_none() && l.minor == 0x1f);
        let l = parse_line("\t3: OFDLCK ADVISORY  READ  -1 103:02:5 0 EOF").unwrap().unwrap();
        assert_eq!((l.pid, l.major, l.minor), (-1, 0x103, 2));
        let l = parse_line("4: LEASE  ACTIVE    READ 9 00:1f:5 0 EOF").unwrap().unwrap();
        assert_eq!(l.class, "LEASE");
    }
}
