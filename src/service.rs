//! `snap service start|stop`: the two hooks of a systemd unit whose service
//! comes back where it stopped (docs/systemd.md).
//!
//! Both run inside the service's cgroup, as systemd runs `ExecStart=` and
//! `ExecStop=`. Checkpoints live under one directory ROOT:
//! `ROOT/current` (the one the next start restores), `ROOT/previous` (the
//! one before) and, while a stop dumps, `ROOT/next`.
//!
//! * `start` restores `ROOT/current` with `-d --pidfile` if it exists;
//!   without one, or if that restore fails (said on stderr, for the
//!   journal), it starts the program afresh, detached in a session of its
//!   own, and writes its pid. Either way it returns once the service runs,
//!   as `Type=forking` expects.
//! * `stop` dumps the cgroup it runs in (the service's) into `ROOT/next`,
//!   and only once that succeeded rotates `current` to `previous` and `next`
//!   to `current`: a failed dump never costs the last good checkpoint.

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::cli::{DumpArgs, RestoreArgs};
use crate::images::dir::INVENTORY_NAME;

/// `snap service start -D ROOT [--pidfile F] -- PROGRAM…`.
pub fn start(root: &Path, pidfile: Option<&Path>, program: &[String]) -> Result<i32> {
    let current = root.join("current");
    if current.join(INVENTORY_NAME).exists() {
        let a = RestoreArgs {
            dir: current.clone(),
            detached: true,
            pidns: false,
            shell_job: false,
            ext_unix_sk: false,
            pidfile: pidfile.map(Path::to_path_buf),
            cgroup: None,
            json: false,
        };
        match crate::restore::run(&a) {
            Ok(code) => {
                eprintln!("snap: service restored from {}", current.display());
                return Ok(code);
            }
            Err(e) => eprintln!("snap: warning: restoring {}: {e:#}; starting the program afresh", current.display()),
        }
    }
    let (prog, args) = program.split_first().context("snap service start: no program after --")?;
    let mnt = crate::dump::cgroup::mount()?;
    let own = crate::dump::cgroup::own_cgroup(&mnt)?;
    let procs_path = own.join("cgroup.procs");
    let procs = fs::OpenOptions::new().write(true).open(&procs_path).with_context(|| format!("opening {}", procs_path.display()))?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args).stdin(std::process::Stdio::null());
    let opts = crate::sys::process::SpawnOpts { new_session: true, default_signals: true, keep_fd: None };
    let child = crate::sys::process::spawn_in_cgroup(&mut cmd, procs.as_fd(), opts)
        .with_context(|| format!("starting {prog}"))?;
    let pid = child.id();
    if let Some(f) = pidfile {
        fs::write(f, format!("{pid}\n")).with_context(|| format!("writing pid file {}", f.display()))?;
    }
    eprintln!("snap: no checkpoint to restore in {}: started {prog} afresh as pid {pid}", root.display());
    Ok(0)
}

/// `snap service stop -D ROOT [dump options]`: `dump` holds the options
/// given (its tree and directory are set here).
pub fn stop(root: &Path, dump: &DumpArgs) -> Result<()> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let mnt = crate::dump::cgroup::mount()?;
    let own = crate::dump::cgroup::own_cgroup(&mnt)?;
    if own == mnt {
        bail!("snap service stop runs in the root cgroup: it must run inside the service's cgroup (as ExecStop= does)");
    }
    let next = root.join("next");
    if next.exists() {
        // Left by a stop that failed half-way: never a checkpoint (the dump
        // removes its partial image), so it can go.
        fs::remove_dir_all(&next).with_context(|| format!("removing the unfinished {}", next.display()))?;
    }
    let mut a = dump.clone();
    a.cgroup = Some(own.clone());
    a.dir = next.clone();
    crate::dump::run(&a).with_context(|| format!("checkpointing cgroup {} into {}", own.display(), next.display()))?;
    let current = root.join("current");
    let previous = root.join("previous");
    if current.exists() {
        if previous.exists() {
            fs::remove_dir_all(&previous).with_context(|| format!("removing {}", previous.display()))?;
        }
        fs::rename(&current, &previous).with_context(|| format!("renaming {} to {}", current.display(), previous.display()))?;
    }
    fs::rename(&next, &current).with_context(|| format!("renaming {} to {}", next.display(), current.display()))?;
    eprintln!("snap: service checkpointed into {}", current.display());
    Ok(())
}
