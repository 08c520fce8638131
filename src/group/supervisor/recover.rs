//! Recovery of a group (`snap run --recover`, `snap recover NAME`;
//! docs/groups.md "Recovery"): when the program dies abnormally, or when
//! asked, the supervisor kills whatever is left of the group and restores
//! the newest checkpoint that verifies completely, as its own children in
//! the group's cgroup, with the saved PIDs. The group then goes on: the
//! next checkpoint is incremental against the one restored, without
//! tracking (the restored processes are new processes: their memory is
//! read in full, and only pages the chain does not hold are stored).
//!
//! The restore itself is `snap restore -d --json` run as our child inside
//! the cgroup: everything it forks is a member from its first
//! instruction, its guards kill what it made if it fails, and with `-d`
//! the roots are handed to us (the nearest child subreaper) when its
//! intermediate process exits.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::{reap_any, warn, write_info, Supervisor};
use crate::sys::process::SpawnOpts;
use crate::types::Pid;

/// `--max-recoveries` when not given.
pub const DEFAULT_MAX_RECOVERIES: u32 = 5;
/// `--recovery-window` when not given.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// How long the killed group's processes may take to be gone (cgroup
/// empty, zombies reaped).
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// One recovery, for `ps` and `snap recover`.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub unix_time: u64,
    /// The checkpoint restored.
    pub from: PathBuf,
    /// Why: the program's death, or `snap recover`.
    pub reason: String,
    pub automatic: bool,
    /// The program as restored (the same pid it had).
    pub program_pid: i32,
    /// Every process restored.
    pub pids: Vec<i32>,
    /// Newer checkpoints that did not verify, newest first, and why.
    pub skipped: Vec<Skipped>,
    /// From the decision to the group running again.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub dir: PathBuf,
    pub error: String,
}

/// The checkpoint chosen: its directory, roots and pids.
struct Chosen {
    dir: PathBuf,
    pids: Vec<i32>,
    skipped: Vec<Skipped>,
}

impl Supervisor {
    /// Called by the main loop after each reap: if the program died, decide.
    /// `None`: the group goes on (recovered, or not ours to recover: exit 0,
    /// no --recover, no checkpoint yet). `Some(code)`: the group was killed
    /// and ends with `code` (the program's status).
    pub(super) fn after_death(&mut self) -> Option<i32> {
        let st = self.died.take()?;
        if !self.recover {
            return None;
        }
        let what = format!("the program (pid {}) ended with status {st}", self.child.0);
        if st == 0 {
            self.note(&format!("{what}: a clean exit, no recovery"));
            return None;
        }
        if self.taken.is_empty() {
            self.note(&format!("{what}; no checkpoint yet, nothing to recover from: the group goes on without it"));
            return None;
        }
        let now = Instant::now();
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > self.recovery_window) {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.max_recoveries as usize {
            let m = format!(
                "{what}; {} recoveries within the last {:?} already (--max-recoveries {}): giving up, ending the group",
                self.recent.len(),
                self.recovery_window,
                self.max_recoveries
            );
            self.end_group(&m);
            return Some(st);
        }
        self.recent.push_back(now);
        match self.recover_now(&what, true) {
            Ok(_) => None,
            Err(e) => {
                self.end_group(&format!("{what}; recovery failed: {e:#}; ending the group"));
                Some(st)
            }
        }
    }

    /// `snap recover`: the reply, or an error and, if the group had to be
    /// ended, its exit code. With no usable checkpoint nothing is touched.
    pub(super) fn asked_recovery(&mut self) -> std::result::Result<serde_json::Value, (String, Option<i32>)> {
        let reason = "asked (snap recover)";
        let chosen = self.choose().map_err(|e| (format!("group {}: {e:#}", self.name), None))?;
        match self.restore_chosen(chosen, reason, false) {
            Ok(r) => Ok(serde_json::to_value(r).unwrap_or_default()),
            Err(e) => {
                let m = format!("recovery asked by snap recover failed: {e:#}; ending the group");
                self.end_group(&m);
                Err((format!("group {}: {m}", self.name), Some(1)))
            }
        }
    }

    fn recover_now(&mut self, reason: &str, automatic: bool) -> Result<Recovery> {
        let chosen = self.choose()?;
        self.restore_chosen(chosen, reason, automatic)
    }

    /// The newest checkpoint this supervisor took that verifies completely
    /// (`restore::verify`: the chain, manifests, every page pack, the
    /// records) and holds the program as its first root. Those that fail
    /// are logged with the reason and dropped from the candidates.
    fn choose(&mut self) -> Result<Chosen> {
        let mut skipped = Vec::new();
        while let Some(dir) = self.taken.last().cloned() {
            match check(&dir, self.child) {
                Ok(pids) => {
                    return Ok(Chosen { dir, pids, skipped });
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    self.loud(&format!("checkpoint {} is not usable for recovery: {error}; trying the one before", dir.display()));
                    // Never the parent of the next checkpoint either.
                    if self.last.as_ref() == Some(&dir) {
                        self.last = None;
                        self.held = None;
                    }
                    skipped.push(Skipped { dir, error });
                    self.taken.pop();
                }
            }
        }
        if skipped.is_empty() {
            bail!("no checkpoint to recover from");
        }
        let list: Vec<String> = skipped.iter().map(|s| s.dir.display().to_string()).collect();
        bail!("no usable checkpoint: {} (each failed verification, see above)", list.join(", "))
    }

    /// Kill the group, restore `c` under us in the cgroup, and take the
    /// restored program as the group's program. On failure nothing of the
    /// restore is left running (its own guards, then the cgroup is killed).
    fn restore_chosen(&mut self, c: Chosen, reason: &str, automatic: bool) -> Result<Recovery> {
        let t0 = Instant::now();
        self.note(&format!("{reason}: restoring checkpoint {}", c.dir.display()));
        self.status().recovering = Some(c.dir.clone());
        let r = self.replace_group(&c);
        self.status().recovering = None;
        let (program, pids) = match r {
            Ok(x) => x,
            Err(e) => {
                self.kill_group();
                return Err(e.context(format!("restoring checkpoint {}", c.dir.display())));
            }
        };
        // The restored processes are new: the next checkpoint reads their
        // memory in full against this one (never through old tracking).
        self.held = None;
        self.last = Some(c.dir.clone());
        self.child = Pid(program);
        self.program_status = None;
        self.died = None;
        let rec = Recovery {
            unix_time: crate::group::now_unix(),
            from: c.dir.clone(),
            reason: reason.to_string(),
            automatic,
            program_pid: program,
            pids,
            skipped: c.skipped,
            seconds: t0.elapsed().as_secs_f64(),
        };
        {
            let mut st = self.status();
            st.program_pid = program;
            st.program_exit = None;
            st.recoveries += 1;
            st.last_recovery = Some(rec.clone());
        }
        self.info.program_pid = program;
        if let Err(e) = write_info(&self.state_dir, &self.info) {
            warn(&format!("group {}: {e:#}", self.name));
        }
        self.loud(&format!(
            "recovered from checkpoint {} in {:.3}s: program pid {program}, pids {:?}",
            c.dir.display(),
            rec.seconds,
            rec.pids
        ));
        Ok(rec)
    }

    /// Kill every member, wait until the checkpoint's pids are free, run
    /// the restore. Returns the program's pid and every restored pid.
    fn replace_group(&mut self, c: &Chosen) -> Result<(i32, Vec<i32>)> {
        self.kill_group();
        let left = self.cg.members()?;
        ensure!(
            left.is_empty(),
            "cgroup {} still holds pids {:?} after killing the group",
            self.cg.path().display(),
            left.iter().map(|p| p.0).collect::<Vec<_>>()
        );
        wait_pids_free(&c.pids)?;
        let v = self.run_restore(&c.dir)?;
        let roots: Vec<i32> = v["roots"].as_array().into_iter().flatten().filter_map(|x| x.as_i64()).map(|x| x as i32).collect();
        let pids: Vec<i32> = v["pids"].as_array().into_iter().flatten().filter_map(|x| x.as_i64()).map(|x| x as i32).collect();
        let saved = *roots.first().context("snap restore reported no roots")?;
        let program = v["host_pids"][saved.to_string()].as_i64().map_or(saved, |h| h as i32);
        let me = std::process::id() as i32;
        let ppid = crate::dump::proc::Stat::read(program).and_then(|s| s.field::<i32>(4).ok());
        ensure!(
            ppid == Some(me),
            "the restored program, pid {program}, has parent {ppid:?}, not the supervisor ({me})"
        );
        Ok((program, pids))
    }

    /// `snap restore -D DIR -d --json --shell-job` as our child in the
    /// cgroup; its JSON summary.
    fn run_restore(&self, dir: &Path) -> Result<serde_json::Value> {
        // /proc/self/exe: the binary we run, even if its path was replaced.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg("restore").arg("-D").arg(dir).args(["-d", "--json", "--shell-job"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let procs = self.cg.procs_for_writing()?;
        // Same session and process group as the supervisor (a foreground
        // group stays on its terminal), default signals.
        let opts = SpawnOpts { new_session: false, default_signals: true, keep_fd: None };
        let child = crate::sys::process::spawn_in_cgroup(&mut cmd, procs.as_fd(), opts)
            .with_context(|| format!("starting snap restore in cgroup {}", self.cg.path().display()))?;
        drop(procs);
        let out = child.wait_with_output().context("waiting for snap restore")?;
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        if !out.status.success() {
            bail!("snap restore failed ({}): {}", out.status, if err.is_empty() { "no message" } else { err });
        }
        if !err.is_empty() {
            warn(&format!("group {}: snap restore: {err}", self.name));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
        serde_json::from_str(line).with_context(|| format!("snap restore's summary {:?}", text.trim()))
    }

    /// Kill every member and wait (reaping) until the cgroup is empty.
    fn kill_group(&mut self) {
        self.cg.kill_all();
        let mut r = || reap_any();
        if let Err(e) = self.cg.wait_empty(KILL_TIMEOUT, &mut r) {
            warn(&format!("{e:#}"));
        }
        reap_any();
    }

    /// The group cannot go on: say why (always, also in the foreground),
    /// keep it for `ps` until we exit, kill what is left.
    fn end_group(&mut self, msg: &str) {
        self.loud(msg);
        self.status().last_error = Some(msg.to_string());
        self.kill_group();
    }

    /// A message that must be seen: the supervisor log with -d, else the
    /// terminal.
    fn loud(&self, msg: &str) {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("snap: group {}: {msg}\n", self.name).as_bytes());
    }
}

/// Verify the checkpoint in `dir` for a recovery of the program `program`;
/// its pids.
fn check(dir: &Path, program: Pid) -> Result<Vec<i32>> {
    let (roots, pids) = crate::restore::verify(dir)?;
    ensure!(
        roots.first() == Some(&program.0),
        "image {}: its first root is {:?}, not the group's program (pid {})",
        dir.display(),
        roots.first(),
        program.0
    );
    Ok(pids)
}

/// Reap until none of `pids` exists any more (the killed group's zombies
/// are our children once their parents are gone), at most KILL_TIMEOUT.
fn wait_pids_free(pids: &[i32]) -> Result<()> {
    let t0 = Instant::now();
    loop {
        reap_any();
        let taken: Vec<i32> = pids.iter().copied().filter(|&p| Path::new(&format!("/proc/{p}")).exists()).collect();
        if taken.is_empty() {
            return Ok(());
        }
        if t0.elapsed() > KILL_TIMEOUT {
            let who: Vec<String> = taken
                .iter()
                .map(|&p| match crate::dump::proc::Stat::read(p) {
                    Some(s) if s.field_str(3).ok() == Some("Z") => format!(
                        "{p} ({}, a zombie its parent, pid {}, has not reaped)",
                        s.comm,
                        s.field::<i32>(4).unwrap_or(0)
                    ),
                    Some(s) => format!("{p} ({}, state {})", s.comm, s.field_str(3).unwrap_or("?")),
                    None => format!("{p} (gone since)"),
                })
                .collect();
            bail!("the checkpoint's pids are still taken after {KILL_TIMEOUT:?}: {}", who.join(", "));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
