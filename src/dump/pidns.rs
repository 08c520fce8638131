//! Dumping a whole pid namespace.
//!
//! When every dumped process lives in one pid namespace that is not snap's
//! own, and that namespace's init (its pid 1) is dumped too, the image
//! records every pid and tid as the namespace sees them (the last field of
//! `NSpid:` in /proc/PID/status), so that `snap restore --pidns` rebuilds
//! the namespace with the saved init as its pid 1 and every process at its
//! saved number. The host pids are kept in the inventory (`pidns`), for
//! information. Any other dump (processes in snap's namespace, in several
//! namespaces, or in a namespace whose init is not dumped) records host
//! pids, as it always did.
//!
//! The dump itself works with host pids throughout (ptrace, /proc); the
//! records are translated just before they are written (`NsPids::process`,
//! `NsPids::files`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::images::records::{FileKind, FilesImage, PidNsInfo, ProcessImage};
use crate::types::{Pid, Tid};

/// Host pid (or tid) -> the same in the dumped namespace.
pub struct NsPids {
    map: BTreeMap<i32, i32>,
    /// The processes' pids (not threads'), host -> namespace.
    procs: BTreeMap<i32, i32>,
    /// The namespace, as /proc/PID/ns/pid names it (`pid:[4026532…]`).
    ns: String,
}

fn ns_of(pid: i32) -> Result<PathBuf> {
    let p = format!("/proc/{pid}/ns/pid");
    std::fs::read_link(&p).with_context(|| format!("pid {pid}: readlink {p}"))
}

/// The innermost pid in a /proc/…/status text (last field of `NSpid:`).
fn innermost(status: &str) -> Option<i32> {
    status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().last()?.parse().ok()
}

fn innermost_of(path: &str) -> Result<i32> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    innermost(&s).with_context(|| format!("{path}: no NSpid line"))
}

impl NsPids {
    /// The namespace-level pids of `pids` (every thread in `threads`), if
    /// they all share one pid namespace other than ours whose init is among
    /// them; `None` for a dump that keeps host pids.
    pub fn detect(pids: &[Pid], threads: &BTreeMap<Pid, Vec<Tid>>) -> Result<Option<NsPids>> {
        let ours = std::fs::read_link("/proc/self/ns/pid").context("readlink /proc/self/ns/pid")?;
        let Some(first) = pids.first() else { return Ok(None) };
        let ns = ns_of(first.0)?;
        if ns == ours {
            return Ok(None);
        }
        for p in pids {
            if ns_of(p.0)? != ns {
                return Ok(None);
            }
        }
        let mut map = BTreeMap::new();
        let mut procs = BTreeMap::new();
        for p in pids {
            let n = innermost_of(&format!("/proc/{}/status", p.0)).with_context(|| format!("{p}: its pid in its namespace"))?;
            map.insert(p.0, n);
            procs.insert(p.0, n);
            for t in threads.get(p).into_iter().flatten().filter(|t| t.0 != p.0) {
                let n = innermost_of(&format!("/proc/{}/task/{}/status", p.0, t.0))
                    .with_context(|| format!("{p} {t}: its tid in its namespace"))?;
                map.insert(t.0, n);
            }
        }
        if !procs.values().any(|&n| n == 1) {
            // The namespace's init is not dumped: it cannot be rebuilt.
            return Ok(None);
        }
        Ok(Some(NsPids { map, procs, ns: ns.display().to_string() }))
    }

    /// A dumped pid or tid as the namespace sees it.
    pub fn pid(&self, host: i32) -> Option<i32> {
        self.map.get(&host).copied()
    }

    /// A pid that may be outside the dump (a parent, a process group, a
    /// session): what the namespace sees, 0 for a process it cannot see
    /// (as getppid() returns 0 there for a parent outside it). A process
    /// group or session of the namespace whose leader is gone is 0 too:
    /// restore treats both like a group whose leader is not in the image.
    fn seen(&self, host: i32) -> i32 {
        self.pid(host).unwrap_or(0)
    }

    /// Put `p`'s pids into the namespace's numbering.
    pub fn process(&self, p: &mut ProcessImage) -> Result<()> {
        let host = p.pid;
        p.pid = self.pid(host).with_context(|| format!("pid {host}: not in the dumped namespace"))?;
        p.ppid = self.seen(p.ppid);
        p.pgid = self.seen(p.pgid);
        p.sid = self.seen(p.sid);
        for c in &mut p.children {
            *c = self.pid(*c).with_context(|| format!("pid {host}: child {c} is not in the dumped namespace"))?;
        }
        for t in &mut p.threads {
            t.tid = self.pid(t.tid).with_context(|| format!("pid {host}: thread {} not in the dumped namespace", t.tid))?;
        }
        for tm in &mut p.posix_timers {
            if tm.notify == libc::SIGEV_THREAD_ID {
                tm.notify_tid = self
                    .pid(tm.notify_tid)
                    .with_context(|| format!("pid {host}: timer {} notifies thread {}, not in the dump", tm.id, tm.notify_tid))?;
            }
        }
        Ok(())
    }

    /// Put the pids in the shared file records (pidfd targets, epoll
    /// owners) into the namespace's numbering.
    pub fn files(&self, f: &mut FilesImage) -> Result<()> {
        for of in &mut f.files {
            match &mut of.kind {
                FileKind::Pidfd { pid } => {
                    *pid = self.pid(*pid).with_context(|| format!("file {}: pidfd of {pid}, not in the dump", of.id))?;
                }
                FileKind::Epoll { owner, .. } => {
                    *owner = self.pid(*owner).with_context(|| format!("file {}: epoll owner {owner} not in the dump", of.id))?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// What the inventory says about the namespace.
    pub fn info(&self) -> PidNsInfo {
        PidNsInfo { ns: self.ns.clone(), host_pids: self.procs.iter().map(|(&h, &n)| (n.to_string(), h)).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn innermost_is_the_last_nspid() {
        assert_eq!(innermost("Name:\tx\nNSpid:\t4102\t1\nNSpgid:\t1\n"), Some(1));
        assert_eq!(innermost("NSpid:\t77\n"), Some(77));
        assert_eq!(innermost("Name:\tx\n"), None);
    }
}
