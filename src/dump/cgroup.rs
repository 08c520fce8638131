//! `snap dump --cgroup PATH` and `snap restore --cgroup PATH`: a cgroup v2
//! subtree as the set of processes, as a service manager sees a service
//! (docs/systemd.md).
//!
//! A dump freezes the subtree (nothing forks or exits mid-seize, DESIGN
//! §1), lists every process in it, and dumps the trees under those whose
//! parent is not in it (a daemon that double-forked has init as its
//! parent: it is a root like the service's main process). snap may itself
//! run inside that cgroup (a systemd `ExecStop=` hook does): it moves
//! itself to the root cgroup first, or it would freeze itself.
//!
//! A restore moves itself into the cgroup (made if missing) before it forks
//! the trees, so every restored process starts in it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::cli::DumpArgs;
use crate::group::cgroup::{freeze_at, members_at};
use crate::types::Pid;

/// How long the members may take to freeze.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cgroup v2 mount.
pub fn mount() -> Result<PathBuf> {
    crate::sys::probe::cgroup2_mount()
        .map(PathBuf::from)
        .context("no cgroup2 mount in /proc/self/mountinfo (--cgroup needs cgroup v2)")
}

/// `path` as a directory under the cgroup v2 mount: absolute paths must be
/// under it, others are taken relative to it (`system.slice/web.service`).
/// Returns (absolute path, path relative to the mount).
pub fn resolve(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let mnt = mount()?;
    let rel = if path.is_absolute() {
        match path.strip_prefix(&mnt) {
            Ok(r) => r.to_path_buf(),
            Err(_) => bail!("cgroup {}: not under the cgroup v2 mount {}", path.display(), mnt.display()),
        }
    } else {
        path.to_path_buf()
    };
    ensure!(
        rel.components().all(|c| matches!(c, std::path::Component::Normal(_))),
        "cgroup {}: the path must name a cgroup below {} without `..`",
        path.display(),
        mnt.display()
    );
    Ok((mnt.join(&rel), rel))
}

/// Every process in the cgroup at `top` and in the cgroups below it.
fn members_below(top: &Path) -> Result<Vec<Pid>> {
    let mut all = members_at(top)?;
    for e in fs::read_dir(top).with_context(|| format!("reading cgroup {}", top.display()))?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            all.extend(members_below(&e.path())?);
        }
    }
    all.sort();
    Ok(all)
}

/// This process's cgroup v2, as an absolute path.
pub fn own_cgroup(mnt: &Path) -> Result<PathBuf> {
    let s = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = s.lines().find_map(|l| l.strip_prefix("0::")).context("/proc/self/cgroup has no cgroup v2 line")?;
    Ok(mnt.join(rel.trim_start_matches('/')))
}

/// Move this process into the cgroup at `path`.
fn enter(path: &Path) -> Result<()> {
    let f = path.join("cgroup.procs");
    fs::write(&f, "0").with_context(|| format!("moving snap into cgroup {} (writing {})", path.display(), f.display()))
}

/// `snap dump --cgroup PATH`: freeze the subtree and name its roots. The
/// returned arguments are `a` with those roots as `-t`; the barrier keeps
/// the subtree frozen until the dump has seized it.
pub fn freeze_members(a: &DumpArgs, path: &Path) -> Result<(DumpArgs, super::Barrier)> {
    let (top, rel) = resolve(path)?;
    ensure!(!rel.as_os_str().is_empty(), "--cgroup {}: refusing to dump the root cgroup (every process of the host)", path.display());
    ensure!(top.join("cgroup.procs").exists(), "cgroup {}: no such cgroup ({} is missing)", path.display(), top.join("cgroup.procs").display());
    let mnt = mount()?;
    if own_cgroup(&mnt)?.starts_with(&top) {
        // A frozen snap could not finish its own dump. The root cgroup is
        // the one place any process may move to (no "no internal
        // processes" rule there).
        eprintln!("snap: moving out of cgroup {} to freeze it (as an ExecStop= hook runs inside it)", top.display());
        enter(&mnt)?;
    }
    let frozen = freeze_at(&top, FREEZE_TIMEOUT).with_context(|| format!("--cgroup {}", path.display()))?;
    let members = members_below(&top)?;
    if members.is_empty() {
        bail!("cgroup {}: no process in it to dump", top.display());
    }
    let roots = crate::group::supervisor::roots_of(&members, Pid(0));
    let mut args = a.clone();
    args.tree = roots;
    args.cgroup = Some(rel);
    Ok((args, Box::new(frozen)))
}

/// `snap restore --cgroup PATH`: this process (and so everything it forks)
/// moves into the cgroup, made if missing.
pub fn enter_for_restore(path: &Path) -> Result<()> {
    let (abs, rel) = resolve(path)?;
    if !rel.as_os_str().is_empty() && !abs.join("cgroup.procs").exists() {
        fs::create_dir_all(&abs).with_context(|| format!("--cgroup: creating cgroup {}", abs.display()))?;
    }
    enter(&abs)
}
