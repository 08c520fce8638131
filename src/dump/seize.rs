//! The barrier: seize every thread of every process in the trees, interrupt
//! it, and re-read the trees until nothing new appears. From then on nothing
//! runs until the dump ends, so the image is one consistent cut.
//!
//! `Seized` is a guard: dropping it detaches every thread, so any failure
//! after seizing resumes the processes as they were.

use crate::types::{Pid, Tid};
use anyhow::{bail, Context, Result};
use nix::sys::ptrace;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use std::collections::{BTreeMap, BTreeSet};

pub struct Seized {
    /// Every process, parents before children (roots in order).
    pub pids: Vec<Pid>,
    /// Threads of each live process, leader first.
    pub threads: BTreeMap<Pid, Vec<Tid>>,
    /// Processes that are zombies: not seized, dumped from /proc only.
    pub zombies: BTreeSet<Pid>,
    /// Processes whose threads were in a job-control stop when seized.
    pub stopped: BTreeSet<Pid>,
    attached: Vec<Tid>,
    /// Set once the processes were killed: nothing to detach.
    released: bool,
}

fn children_of(pid: Pid) -> Result<Vec<Pid>> {
    let mut out = Vec::new();
    let dir = format!("/proc/{}/task", pid.0);
    for t in std::fs::read_dir(&dir).with_context(|| format!("{pid}: reading {dir}"))? {
        let t = t?;
        let p = t.path().join("children");
        // A thread that exits while we read has no children file any more.
        let Ok(s) = std::fs::read_to_string(&p) else { continue };
        out.extend(s.split_whitespace().filter_map(|x| x.parse().ok()).map(Pid));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn is_zombie(pid: Pid) -> bool {
    super::proc::Stat::read(pid.0).is_some_and(|s| s.field_str(3).ok() == Some("Z"))
}

/// Attach to one thread and bring it to a ptrace stop. A signal that was
/// about to be delivered is delivered as it would have been. Returns true
/// when the thread was in a job-control stop (SIGSTOP and the like).
pub fn seize_one(tid: Tid) -> Result<bool> {
    ptrace::seize(tid.nix(), ptrace::Options::PTRACE_O_TRACESYSGOOD)
        .with_context(|| format!("{tid}: PTRACE_SEIZE"))?;
    ptrace::interrupt(tid.nix()).with_context(|| format!("{tid}: PTRACE_INTERRUPT"))?;
    loop {
        match waitpid(tid.nix(), Some(WaitPidFlag::__WALL)).with_context(|| format!("{tid}: waitpid"))? {
            WaitStatus::PtraceEvent(_, sig, _) => {
                use nix::sys::signal::Signal::*;
                return Ok(matches!(sig, SIGSTOP | SIGTSTP | SIGTTIN | SIGTTOU));
            }
            WaitStatus::Stopped(_, sig) => {
                // Signal-delivery-stop: let the signal go on its way; the
                // interrupt stays pending and traps right after.
                ptrace::cont(tid.nix(), Some(sig)).with_context(|| format!("{tid}: PTRACE_CONT {sig}"))?;
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => bail!("{tid} exited while being seized"),
            other => bail!("{tid}: unexpected wait status {other:?} while seizing"),
        }
    }
}

impl Seized {
    pub fn trees(roots: &[Pid]) -> Result<Seized> {
        let mut s = Seized {
            pids: Vec::new(),
            threads: BTreeMap::new(),
            zombies: BTreeSet::new(),
            stopped: BTreeSet::new(),
            attached: Vec::new(),
            released: false,
        };
        let mut seen: BTreeSet<Tid> = BTreeSet::new();
        for round in 0.. {
            if round > 100 {
                bail!("the process tree keeps changing (forks or clones faster than it can be seized)");
            }
            let mut pids = Vec::new();
            let mut queue: std::collections::VecDeque<Pid> = roots.iter().copied().collect();
            let mut in_tree = BTreeSet::new();
            while let Some(p) = queue.pop_front() {
                if !in_tree.insert(p) {
                    continue;
                }
                if !std::path::Path::new(&format!("/proc/{}", p.0)).exists() {
                    if roots.contains(&p) {
                        bail!("{p}: no such process");
                    }
                    continue; // exited before we stopped its parent
                }
                pids.push(p);
                if is_zombie(p) {
                    s.zombies.insert(p);
                    continue;
                }
                queue.extend(children_of(p)?);
            }
            let mut new = false;
            let mut threads = BTreeMap::new();
            for &p in &pids {
                if s.zombies.contains(&p) {
                    continue;
                }
                let ts = super::proc::thread_ids(p)?;
                for &t in &ts {
                    if seen.insert(t) {
                        new = true;
                        match seize_one(t) {
                            Ok(stopped) => {
                                s.attached.push(t);
                                if stopped {
                                    s.stopped.insert(p);
                                }
                            }
                            // A thread may exit between listing and seizing.
                            Err(_) if !std::path::Path::new(&format!("/proc/{}/task/{}", p.0, t.0)).exists() => {}
                            Err(e) => return Err(e.context(format!("seizing {p}"))),
                        }
                    }
                }
                threads.insert(p, ts);
            }
            s.pids = pids;
            s.threads = threads;
            if !new {
                break;
            }
        }
        // Threads that exited during seizing are gone from the final lists.
        let attached: BTreeSet<Tid> = s.attached.iter().copied().collect();
        for ts in s.threads.values_mut() {
            ts.retain(|t| attached.contains(t));
        }
        Ok(s)
    }

    /// Kill every seized process (dump without --leave-running).
    pub fn kill_all(&mut self) {
        for &p in &self.pids {
            let _ = nix::sys::signal::kill(p.nix(), nix::sys::signal::Signal::SIGKILL);
        }
        self.released = true;
    }
}

impl Drop for Seized {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        for &t in &self.attached {
            let _ = ptrace::detach(t.nix(), None);
        }
    }
}
