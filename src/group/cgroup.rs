//! The group's own cgroup v2 (`<cgroup2 mount>/snap/<NAME>`).
//!
//! The supervisor creates it, puts the program in it, reads membership from
//! it, freezes it for the seize of a checkpoint and removes it at the end.
//! It never uses a cgroup it did not create (an existing directory of that
//! name is an error) and never writes to any other cgroup: `snap join`
//! writes its own pid into this one, which is the same kind of move.

use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::types::Pid;

/// Directory under the cgroup2 mount that holds every group's cgroup. It is
/// left in place when empty: another supervisor may be creating its group
/// in it at that moment.
pub const PARENT: &str = "snap";

/// The cgroup directory of group `name` (whether or not it exists).
pub fn path_of(name: &str) -> Result<PathBuf> {
    let mnt = crate::sys::probe::cgroup2_mount()
        .with_context(|| format!("group {name}: no cgroup2 mount in /proc/self/mountinfo (snap run needs cgroup v2)"))?;
    Ok(Path::new(&mnt).join(PARENT).join(name))
}

/// The pids listed in `cgroup.procs` of the cgroup at `path`.
pub fn members_at(path: &Path) -> Result<Vec<Pid>> {
    let f = path.join("cgroup.procs");
    let s = fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    let mut v: Vec<Pid> = s.split_whitespace().filter_map(|x| x.parse().ok()).map(Pid).collect();
    v.sort();
    Ok(v)
}

/// `key value` of `cgroup.events` (`populated`, `frozen`).
fn event(path: &Path, key: &str) -> Result<bool> {
    let f = path.join("cgroup.events");
    let s = fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    parse_event(&s, key).with_context(|| format!("{}: no `{key}` line", f.display()))
}

fn parse_event(text: &str, key: &str) -> Option<bool> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim() == "1")
    })
}

/// The cgroup of one group, created by this supervisor. Dropping it kills
/// whatever is still inside and removes it, so a supervisor that fails
/// leaves no cgroup behind.
pub struct GroupCgroup {
    name: String,
    path: PathBuf,
    removed: bool,
}

impl GroupCgroup {
    /// Create the cgroup of group `name`. Fails with `AlreadyExists` in the
    /// error chain when the directory is there: then it is someone else's.
    pub fn create(name: &str) -> Result<GroupCgroup> {
        let path = path_of(name)?;
        let parent = path.parent().context("cgroup path has no parent")?;
        match fs::create_dir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("group {name}: creating cgroup {}", parent.display())),
        }
        fs::create_dir(&path).with_context(|| format!("group {name}: creating cgroup {}", path.display()))?;
        Ok(GroupCgroup { name: name.to_string(), path, removed: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, opened for writing: a process that writes `0` to it
    /// moves itself in.
    pub fn procs_for_writing(&self) -> Result<fs::File> {
        let f = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .with_context(|| format!("group {}: opening {}", self.name, f.display()))
    }

    /// `cgroup.events`, to poll (POLLPRI) for `populated` and `frozen`
    /// changes.
    pub fn events_file(&self) -> Result<fs::File> {
        let f = self.path.join("cgroup.events");
        fs::File::open(&f).with_context(|| format!("group {}: opening {}", self.name, f.display()))
    }

    pub fn members(&self) -> Result<Vec<Pid>> {
        members_at(&self.path).with_context(|| format!("group {}: members", self.name))
    }

    /// Whether any process is left in the cgroup.
    pub fn populated(&self) -> Result<bool> {
        event(&self.path, "populated").with_context(|| format!("group {}", self.name))
    }

    /// Freeze the cgroup (see [`freeze_at`]).
    pub fn freeze(&self, timeout: Duration) -> Result<Frozen> {
        freeze_at(&self.path, timeout).with_context(|| format!("group {}", self.name))
    }

    /// Kill every process in the cgroup: `cgroup.kill` where the kernel has
    /// it (one atomic step that also catches processes forking meanwhile),
    /// else SIGKILL to each member until none is left.
    pub fn kill_all(&self) {
        if fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for _ in 0..100 {
            let Ok(m) = members_at(&self.path) else { return };
            if m.is_empty() {
                return;
            }
            for p in m {
                let _ = nix::sys::signal::kill(p.nix(), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Wait until no process is left (reaping children with `reap` meanwhile,
    /// so that our own dying children do not linger as zombies).
    pub fn wait_empty(&self, timeout: Duration, reap: &mut dyn FnMut()) -> Result<()> {
        let ev = self.events_file()?;
        let t0 = Instant::now();
        loop {
            reap();
            if !self.populated()? {
                return Ok(());
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                bail!(
                    "group {}: cgroup {} still holds {:?} after {timeout:?}",
                    self.name,
                    self.path.display(),
                    members_at(&self.path).unwrap_or_default().iter().map(|p| p.0).collect::<Vec<_>>()
                );
            }
            wait_events(&ev, left.min(Duration::from_millis(20)));
        }
    }

    /// Kill what is left, wait for it to go, remove the cgroup.
    pub fn remove(&mut self, reap: &mut dyn FnMut()) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        if self.populated().unwrap_or(true) {
            self.kill_all();
            self.wait_empty(Duration::from_secs(10), reap)?;
        }
        // Unfreeze first: a frozen cgroup can be removed, but a thawed one is
        // what the next user of the name expects.
        let _ = fs::write(self.path.join("cgroup.freeze"), "0");
        fs::remove_dir(&self.path).with_context(|| format!("group {}: removing cgroup {}", self.name, self.path.display()))?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for GroupCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove(&mut || crate::group::supervisor::reap_any()) {
            eprintln!("snap: warning: {e:#}");
        }
    }
}

/// Freeze the cgroup at `path` (and every cgroup below it) and wait until
/// the kernel says every member is frozen. The returned guard thaws it
/// when dropped. Errors (no `cgroup.freeze`, a member that does not freeze
/// in `timeout`) leave the cgroup thawed.
pub fn freeze_at(path: &Path, timeout: Duration) -> Result<Frozen> {
    let f = path.join("cgroup.freeze");
    fs::write(&f, "1").with_context(|| format!("writing 1 to {}", f.display()))?;
    let guard = Frozen { path: f };
    let evf = path.join("cgroup.events");
    let ev = fs::File::open(&evf).with_context(|| format!("opening {}", evf.display()))?;
    let t0 = Instant::now();
    loop {
        if event(path, "frozen")? {
            return Ok(guard);
        }
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            bail!("cgroup {} not frozen after {timeout:?}", path.display());
        }
        // cgroup.events signals every change with POLLPRI; the short cap
        // only bounds a missed wake-up.
        wait_events(&ev, left.min(Duration::from_millis(20)));
    }
}

/// Block up to `d` for a change of `cgroup.events`.
fn wait_events(ev: &fs::File, d: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // Reading re-arms the notification: kernfs reports POLLPRI for changes
    // after the last read.
    let mut buf = [0u8; 256];
    let _ = (&*ev).read(&mut buf);
    let _ = std::io::Seek::seek(&mut &*ev, std::io::SeekFrom::Start(0));
    let ms = d.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(ev.as_fd(), PollFlags::POLLPRI)];
    let _ = poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::ZERO));
}

/// A frozen cgroup; dropping the guard thaws it.
pub struct Frozen {
    path: PathBuf,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, "0") {
            eprintln!("snap: warning: thawing: writing 0 to {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let t = "populated 1\nfrozen 0\n";
        assert_eq!(parse_event(t, "populated"), Some(true));
        assert_eq!(parse_event(t, "frozen"), Some(false));
        assert_eq!(parse_event(t, "other"), None);
    }
}
