//! End-to-end tests of application groups (`snap run`, `snap dump --group`,
//! `snap join`, `snap ps`; docs/groups.md). Real supervisors, real
//! programs, real cgroups; every group is torn down by a `GroupGuard`
//! (supervisor, members, cgroup, state dir) even when a test fails.
//!
//! Run with `cargo test --release --test e2e_group -- --test-threads=1`
//! as root.

#[macro_use]
mod common;
use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const STATE_ROOT: &str = "/run/snap/groups";

fn cgroup_of(name: &str) -> PathBuf {
    cgroup2_mount().expect("cgroup2 mount").join("snap").join(name)
}

fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

/// A name no other test (or earlier run) uses.
fn unique(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

/// Whether this machine can run groups at all (root, cgroup v2 with a
/// freezer we may create children in).
fn groups_supported(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root");
        return false;
    }
    if cgroup2_mount().is_none() {
        skip(test, "no cgroup2 mount");
        return false;
    }
    true
}

fn cgroup_members(cg: &Path) -> Vec<i32> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// Tears a group down: the supervisor (SIGKILL, so it does nothing more),
/// every member (cgroup.kill), the cgroup and the state directory; reaps
/// whatever became our child (we are a subreaper).
struct GroupGuard {
    name: String,
    supervisor: i32,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let cg = cgroup_of(&self.name);
        let mut pids = cgroup_members(&cg);
        if self.supervisor > 1 && alive(self.supervisor) {
            kill(self.supervisor, libc::SIGKILL);
            pids.push(self.supervisor);
        }
        if cg.exists() {
            let _ = fs::write(cg.join("cgroup.freeze"), "0");
            if fs::write(cg.join("cgroup.kill"), "1").is_err() {
                for &p in &pids {
                    kill(p, libc::SIGKILL);
                }
            }
        }
        if let Err(e) = wait_gone(&pids, secs(20)) {
            eprintln!("warning: group {} cleanup: {e}", self.name);
        }
        if cg.exists() {
            let t0 = Instant::now();
            while !cgroup_members(&cg).is_empty() && t0.elapsed() < secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = fs::remove_dir(&cg) {
                eprintln!("warning: group {}: removing {}: {e}", self.name, cg.display());
            }
        }
        let _ = fs::remove_dir_all(state_dir(&self.name));
    }
}

/// `snap run -d --json --name NAME --images-root ROOT EXTRA… -- PROGRAM…`;
/// returns the guard and the report.
fn start_group(name: &str, root: &Path, extra: &[&str], program: &[&str]) -> (GroupGuard, Value) {
    let r = root.to_string_lossy().to_string();
    let mut args = vec!["run", "-d", "--json", "--name", name, "--images-root", &r];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(program);
    let run = snap(&args);
    assert!(run.ok(), "snap run -d failed: {}", run.describe());
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("snap run -d --json printed {:?}: {e}", run.stdout));
    let sup = v["supervisor_pid"].as_i64().expect("supervisor_pid") as i32;
    assert_eq!(v["name"], name);
    assert!(alive(sup), "supervisor {sup} is not running after snap run -d");
    (GroupGuard { name: name.to_string(), supervisor: sup }, v)
}

/// `snap ps --json`: the entry of group `name`, if listed.
fn ps_group(name: &str) -> Option<Value> {
    let r = snap(&["ps", "--json"]);
    assert!(r.ok(), "snap ps --json failed: {}", r.describe());
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("snap ps --json printed {:?}: {e}", r.stdout));
    v["groups"].as_array().expect("groups array").iter().find(|g| g["name"] == name).cloned()
}

fn member_pids(g: &Value) -> Vec<i32> {
    g["members"].as_array().map(|a| a.iter().filter_map(|m| m["pid"].as_i64()).map(|p| p as i32).collect()).unwrap_or_default()
}

/// `snap dump --group NAME [-D DIR] --json`, asserting success.
fn group_dump(name: &str, dir: Option<&Path>) -> Value {
    let d = dir.map(|d| d.to_string_lossy().to_string());
    let mut args = vec!["dump", "--group", name, "--json"];
    if let Some(d) = &d {
        args.push("-D");
        args.push(d);
    }
    let r = snap(&args);
    assert!(r.ok(), "snap dump --group {name} failed: {}", r.describe());
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("dump --json printed {:?}: {e}", r.stdout))
}

/// The uffd-wp backend as `snap check --json` reports it.
fn uffd_wp_present() -> bool {
    let r = snap(&["check", "--json"]);
    assert!(r.ok(), "snap check failed: {}", r.describe());
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    v["features"].as_array().unwrap().iter().any(|f| f["name"] == "uffd-wp-async-pagemap-scan" && f["present"] == true)
}

fn proc_memory(summary: &Value, pid: i32) -> String {
    summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} not in the dump's processes: {summary}"))["memory"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Numbered image directories under `root`.
fn image_dirs(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn counter_script(file: &Path) -> String {
    format!("i=0; while :; do echo $i >> {}; i=$((i+1)); sleep 0.05; done", file.display())
}

/// Python counter appended line by line to `file`.
fn py_counter(file: &Path) -> String {
    format!(
        "import time\nn = 0\nwhile True:\n    with open({:?}, 'a') as f:\n        f.write('%d\\n' % n)\n    n += 1\n    time.sleep(0.05)\n",
        file.display().to_string()
    )
}

/// Wait until the supervisor (our child since `snap run -d` exited: we are
/// a subreaper) has exited, and return its exit code.
fn wait_supervisor_exit(sup: i32, timeout: Duration) -> i32 {
    wait_for(&format!("supervisor {sup} to exit"), timeout, || {
        let st = try_reap(sup)?;
        assert!(libc::WIFEXITED(st), "supervisor {sup} did not exit normally (raw status {st:#x})");
        Some(libc::WEXITSTATUS(st))
    })
}

// ------------------------------------------------------------------ (a)

/// A group checkpoints on schedule, keeps only --keep checkpoints, and
/// `snap ps --json` lists it with its members.
#[test]
fn scheduled_checkpoints_are_pruned_and_listed() {
    let test = "scheduled_checkpoints_are_pruned_and_listed";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let t = TempDir::new("grp-sched");
    let name = unique("sched");
    let root = t.join("imgs");
    let file = t.join("counter");
    let script = counter_script(&file);
    let (g, v) = start_group(&name, &root, &["--checkpoint-every", "1s", "--keep", "3"], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    assert_eq!(ppid(program), Some(g.supervisor), "the program's parent is not the supervisor");
    let cg = cgroup_of(&name);
    assert!(cgroup_members(&cg).contains(&program), "program {program} not in {}", cg.display());
    wait_counter_past(&file, 0, 5, secs(30));

    // At least 4 checkpoints, with the images root read at a moment no
    // checkpoint was running (same count and none in progress before and
    // after listing).
    let (ps, dirs) = wait_for("4 checkpoints, seen between two checkpoints", secs(90), || {
        let a = ps_group(&name)?;
        if a["checkpoints"].as_u64()? < 4 || !a["checkpointing"].is_null() {
            return None;
        }
        let dirs = image_dirs(&root);
        let b = ps_group(&name)?;
        (b["checkpoints"] == a["checkpoints"] && b["checkpointing"].is_null()).then_some((b, dirs))
    });
    assert_eq!(ps["state"], "running");
    assert_eq!(ps["supervisor_pid"], g.supervisor);
    assert_eq!(ps["interval_ms"], 1000);
    assert_eq!(ps["images_root"], root.to_string_lossy().as_ref());
    assert_eq!(ps["cgroup"], cg.to_string_lossy().as_ref());
    let last = ps["last_checkpoint"]["dir"].as_str().expect("last checkpoint dir").to_string();
    assert!(last.starts_with(root.to_string_lossy().as_ref()), "last checkpoint {last} not under {}", root.display());
    assert_eq!(dirs.len(), 3, "--keep 3 after {} checkpoints, but the images root holds {dirs:?} (last error: {})", ps["checkpoints"], ps["last_error"]);
    assert_eq!(Path::new(&last).file_name().unwrap().to_string_lossy(), *dirs.last().unwrap(), "the newest checkpoint was not kept");
    // Members: the program (parent: the supervisor), with its comm.
    let m = ps["members"].as_array().expect("members");
    let me = m.iter().find(|x| x["pid"] == program).unwrap_or_else(|| panic!("program {program} not among members {m:?}"));
    assert_eq!(me["ppid"], g.supervisor);
    assert_eq!(me["comm"], "bash");
    // The counter kept running through every checkpoint.
    let n = last_number(&file).unwrap();
    wait_counter_past(&file, n, 5, secs(30));
    assert_consecutive(&numbers(&file), "counter across scheduled checkpoints");
    drop(g);
}

/// SigBlk and SigIgn of `pid` (hex masks from /proc/PID/status).
fn blocked_ignored(pid: i32) -> (String, String) {
    (status_field(pid, "SigBlk").unwrap_or_default(), status_field(pid, "SigIgn").unwrap_or_default())
}

/// Wait until `pid` runs `exe` (it exec'd), then check that it blocks and
/// ignores no signal.
fn assert_clean_signals(pid: i32, exe: &str, what: &str) {
    wait_for(&format!("{what} (pid {pid}) to run {exe}"), secs(30), || {
        fs::read_link(format!("/proc/{pid}/exe")).ok()?.to_string_lossy().contains(exe).then_some(())
    });
    let (blk, ign) = blocked_ignored(pid);
    assert_eq!(u64::from_str_radix(&blk, 16), Ok(0), "{what} (pid {pid}) starts with signals blocked: SigBlk {blk}");
    assert_eq!(u64::from_str_radix(&ign, 16), Ok(0), "{what} (pid {pid}) starts with signals ignored: SigIgn {ign}");
}

/// Programs started by a supervisor (detached or foreground) or by `snap
/// join` do not inherit the supervisor's blocked signals (its signalfd's)
/// nor ignored ones (glibc's 32 and 33 after a posix_spawn): what a
/// checkpoint saves is the program's own signal state.
#[test]
fn programs_start_with_default_signals() {
    let test = "programs_start_with_default_signals";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let t = TempDir::new("grp-sig");
    let r = Reaper::new();
    let name = unique("sig");
    let root = t.join("imgs");
    let (g, v) = start_group(&name, &root, &[], &["sleep", "1000"]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    // The supervisor does block its signals: the test means something.
    let sup_blk = u64::from_str_radix(&blocked_ignored(g.supervisor).0, 16).unwrap();
    assert_ne!(sup_blk & (1 << (libc::SIGTERM - 1)), 0, "the supervisor does not block SIGTERM (SigBlk {sup_blk:x})");
    assert_clean_signals(program, "sleep", "program of snap run -d");
    let joined = spawn(&r, Command::new(snap_bin()).args(["join", &name, "--", "sleep", "1000"]), &t.join("join.log"));
    assert_clean_signals(joined, "sleep", "program of snap join");
    assert!(cgroup_members(&cgroup_of(&name)).contains(&joined));
    drop(g);

    // A foreground supervisor (snap run without -d).
    let fg = unique("sigfg");
    let sup = spawn(
        &r,
        Command::new(snap_bin()).args(["run", "--name", &fg, "--images-root", &root.to_string_lossy(), "--", "sleep", "1000"]),
        &t.join("fg.log"),
    );
    let g2 = GroupGuard { name: fg.clone(), supervisor: sup };
    let prog = wait_for("the foreground group's program", secs(30), || ps_group(&fg)?["program_pid"].as_i64()) as i32;
    assert_clean_signals(prog, "sleep", "program of snap run");
    drop(g2);
    drop(r);
}

// ------------------------------------------------------------------ (b)

/// `snap dump --group` checkpoints on demand, incrementally against the
/// group's last checkpoint, and supervisor errors are snap errors.
#[test]
fn dump_group_is_incremental() {
    let test = "dump_group_is_incremental";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let t = TempDir::new("grp-dump");
    let name = unique("dump");
    let root = t.join("imgs");
    let file = t.join("counter");
    let script = counter_script(&file);
    let (g, v) = start_group(&name, &root, &[], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    wait_counter_past(&file, 0, 5, secs(30));
    let freezer = cgroup_of(&name).join("cgroup.freeze").exists();

    let d1 = t.join("d1");
    let s1 = group_dump(&name, Some(&d1));
    assert_eq!(s1["backend"], "full", "the group's first checkpoint must be full: {s1}");
    assert!(s1["parent"].is_null());
    assert!(d1.join("inventory.json").exists());
    assert!(s1["pids"].as_array().unwrap().contains(&program.into()), "program {program} not dumped: {s1}");
    assert_eq!(s1["roots"][0], program, "the program is not the first root: {s1}");
    assert_eq!(s1["left_running"], true);
    if freezer {
        assert_eq!(s1["frozen"], true, "the cgroup has cgroup.freeze but the dump did not freeze it: {s1}");
    }
    let n = last_number(&file).unwrap();
    wait_counter_past(&file, n, 3, secs(30));

    let d2 = t.join("d2");
    let s2 = group_dump(&name, Some(&d2));
    assert_eq!(s2["parent"], d1.to_string_lossy().as_ref(), "not incremental against the last checkpoint: {s2}");
    let inv: Value = serde_json::from_slice(&fs::read(d2.join("inventory.json")).unwrap()).unwrap();
    assert!(inv["parent"].is_string(), "inventory names no parent: {inv}");
    if uffd_wp_present() {
        assert_eq!(s2["backend"], "uffd-wp", "{s2}");
        assert_eq!(proc_memory(&s2, program), "tracked", "{s2}");
        assert!(s2["pages_reused"].as_u64().unwrap() > 0, "nothing reused from the parent: {s2}");
        assert!(s2["pages_read"].as_u64().unwrap() < s2["pages_present"].as_u64().unwrap(), "{s2}");
    } else {
        assert_eq!(s2["backend"], "hash", "{s2}");
        skip(test, "uffd-wp + PAGEMAP_SCAN absent (snap check): tracked-memory assertion skipped");
    }

    // Without -D: the next numbered directory under the images root, with
    // the on-demand one as parent.
    let s3 = group_dump(&name, None);
    let d3 = PathBuf::from(s3["images_dir"].as_str().unwrap());
    assert_eq!(d3.parent(), Some(root.as_path()), "{s3}");
    assert_eq!(s3["parent"], d2.to_string_lossy().as_ref(), "{s3}");
    let ps = ps_group(&name).expect("group listed");
    assert_eq!(ps["checkpoints"], 3);
    assert_eq!(ps["last_checkpoint"]["dir"], d3.to_string_lossy().as_ref());

    // The supervisor's error is a snap error; the user's files stay.
    let busy = t.sub("busy");
    fs::write(busy.join("keep-me"), "x").unwrap();
    let r = snap(&["dump", "--group", &name, "-D", &busy.to_string_lossy(), "--json"]);
    assert!(!r.ok(), "dump into a non-empty directory succeeded: {}", r.describe());
    assert!(r.stderr.contains("snap: error:") && r.stderr.contains(&name) && r.stderr.contains("not empty"), "{}", r.describe());
    assert!(r.stdout.trim().is_empty(), "{}", r.describe());
    assert_eq!(fs::read_to_string(busy.join("keep-me")).unwrap(), "x", "a failed dump touched the user's file");
    // And the group is still fine: the next checkpoint works.
    let s4 = group_dump(&name, None);
    assert_eq!(s4["parent"], d3.to_string_lossy().as_ref(), "{s4}");
    let r = snap(&["dump", "--group", "no-such-group-here", "--json"]);
    assert!(!r.ok() && r.stderr.contains("no such group"), "{}", r.describe());
    assert_consecutive(&numbers(&file), "counter across on-demand checkpoints");
    drop(g);
}

// ------------------------------------------------------------------ (c)

/// A program started with `snap join` is a member, an extra root of the
/// next checkpoint, read in full there, while the original is tracked.
#[test]
fn joined_program_is_in_next_checkpoint() {
    let test = "joined_program_is_in_next_checkpoint";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let py = need!(python3(), test, "no python3");
    let t = TempDir::new("grp-join");
    let r = Reaper::new();
    let name = unique("join");
    let root = t.join("imgs");
    let (fa, fb) = (t.join("a"), t.join("b"));
    let script = counter_script(&fa);
    let (g, v) = start_group(&name, &root, &[], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    wait_counter_past(&fa, 0, 5, secs(30));
    let s1 = group_dump(&name, None);
    assert_eq!(s1["backend"], "full");

    let joined = spawn(&r, Command::new(snap_bin()).args(["join", &name, "--"]).arg(&py).arg("-c").arg(py_counter(&fb)), &t.join("join.log"));
    wait_counter_past(&fb, 0, 5, secs(30));
    // `snap join` exec'd the program: same pid, now python, in the cgroup,
    // still the child of whoever ran snap join (us).
    assert!(fs::read_link(format!("/proc/{joined}/exe")).unwrap().to_string_lossy().contains("python"), "pid {joined} is not python");
    assert!(cgroup_members(&cgroup_of(&name)).contains(&joined), "joined pid {joined} not in the group's cgroup");
    assert_eq!(ppid(joined), Some(std::process::id() as i32));
    let ps = ps_group(&name).unwrap();
    assert!(member_pids(&ps).contains(&joined), "ps does not list the joined pid {joined}: {ps}");

    let s2 = group_dump(&name, None);
    let d2 = PathBuf::from(s2["images_dir"].as_str().unwrap());
    let inv: Value = serde_json::from_slice(&fs::read(d2.join("inventory.json")).unwrap()).unwrap();
    let pids: Vec<i64> = inv["pids"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
    assert!(pids.contains(&(joined as i64)), "joined pid {joined} not in the inventory's pids {pids:?}");
    assert!(pids.contains(&(program as i64)));
    let roots: Vec<i64> = inv["roots"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
    assert_eq!(roots.first(), Some(&(program as i64)), "the program is not the first root: {roots:?}");
    assert!(roots.contains(&(joined as i64)), "the joined program is not a root: {roots:?}");
    let jm = proc_memory(&s2, joined);
    assert!(jm == "full" || jm == "hashed", "joined program's memory was {jm:?}, not read in full: {s2}");
    if uffd_wp_present() {
        assert_eq!(proc_memory(&s2, program), "tracked", "{s2}");
        // One more: now the joined program is tracked too.
        let s3 = group_dump(&name, None);
        assert_eq!(proc_memory(&s3, joined), "tracked", "{s3}");
        assert_eq!(proc_memory(&s3, program), "tracked", "{s3}");
    } else {
        skip(test, "uffd-wp + PAGEMAP_SCAN absent (snap check): tracked-memory assertions skipped");
    }

    // Joining a group that does not exist fails before running anything.
    let out = t.join("should-not-exist");
    let rr = snap(&["join", "no-such-group-here", "--", "touch", &out.to_string_lossy()]);
    assert!(!rr.ok() && rr.stderr.contains("no such group"), "{}", rr.describe());
    assert!(!out.exists(), "snap join ran the program without a group");
    drop(g);
    drop(r);
}

// ------------------------------------------------------------------ (d)

/// SIGTERM ends the group (members killed, cgroup and state dir removed);
/// its last checkpoint restores both programs with their PIDs, and their
/// counters go on from the checkpoint.
#[test]
fn stopped_group_restores_from_last_checkpoint() {
    let test = "stopped_group_restores_from_last_checkpoint";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let py = need!(python3(), test, "no python3");
    let t = TempDir::new("grp-restore");
    let r = Reaper::new();
    let name = unique("restore");
    let root = t.join("imgs");
    let (fa, fb) = (t.join("a"), t.join("b"));
    let script = counter_script(&fa);
    let (g, v) = start_group(&name, &root, &[], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    wait_counter_past(&fa, 0, 5, secs(30));
    group_dump(&name, None);
    let joined = spawn(&r, Command::new(snap_bin()).args(["join", &name, "--"]).arg(&py).arg("-c").arg(py_counter(&fb)), &t.join("join.log"));
    wait_counter_past(&fb, 0, 5, secs(30));
    let (a0, b0) = (last_number(&fa).unwrap(), last_number(&fb).unwrap());
    let s = group_dump(&name, None);
    let last = PathBuf::from(s["images_dir"].as_str().unwrap());
    // Some progress after the checkpoint, to be sure the restore goes back.
    wait_counter_past(&fa, a0, 10, secs(30));
    wait_counter_past(&fb, b0, 10, secs(30));

    let cg = cgroup_of(&name);
    let members = cgroup_members(&cg);
    assert!(kill(g.supervisor, libc::SIGTERM));
    let code = wait_supervisor_exit(g.supervisor, secs(30));
    assert_eq!(code, 128 + libc::SIGTERM, "supervisor's exit code after SIGTERM");
    wait_gone(&members, secs(20)).expect("members still there after the supervisor's SIGTERM cleanup");
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    assert!(!state_dir(&name).exists(), "state dir left behind");
    let (la, lb) = (numbers(&fa).len(), numbers(&fb).len());
    let (ka, kb) = (last_number(&fa).unwrap(), last_number(&fb).unwrap());

    restore_ok(&last, &r, &[program, joined]);
    assert!(fs::read_link(format!("/proc/{joined}/exe")).unwrap().to_string_lossy().contains("python"));
    wait_counter_past(&fa, ka, 10, secs(30));
    wait_counter_past(&fb, kb, 10, secs(30));
    // What was written after the restore continues from the checkpoint:
    // consecutive, starting past the value read just before it.
    for (f, len, before, what) in [(&fa, la, a0, "bash"), (&fb, lb, b0, "python")] {
        let nums = numbers(f);
        let after = &nums[len..];
        assert!(after[0] > before && after[0] <= nums[len - 1] + 1, "{what}: restored counter starts at {} (before checkpoint {before}, at kill {})", after[0], nums[len - 1]);
        assert_consecutive(after, &format!("{what} counter after restore"));
    }
    drop(g);
    drop(r);
}

// ------------------------------------------------------------------ (d2)

/// The pid namespace `pid` is in (/proc/PID/ns/pid).
fn pid_ns(pid: i32) -> String {
    fs::read_link(format!("/proc/{pid}/ns/pid")).map(|l| l.display().to_string()).unwrap_or_default()
}

/// `pid`'s pid in its innermost pid namespace (last field of NSpid).
fn ns_pid(pid: i32) -> Option<i32> {
    status_field(pid, "NSpid")?.split_whitespace().last()?.parse().ok()
}

/// The first line of `p` as a number, once it is there.
fn first_number(p: &Path) -> i32 {
    wait_for(&format!("a pid in {}", p.display()), secs(30), || read_opt(p)?.lines().next()?.trim().parse().ok())
}

/// `snap run --pidns`: the program runs under the group's init (pid 1 of
/// a new pid namespace) with a low pid and the namespace's /proc; `snap
/// join` puts a second program into the same namespace; a checkpoint
/// records the namespace's pids, and after the group is stopped `snap
/// restore --pidns` brings back the init, the program and the joined
/// program with those pids in one new namespace, their counters going on
/// from the checkpoint.
#[test]
fn pidns_group_restores_with_namespace_pids() {
    let test = "pidns_group_restores_with_namespace_pids";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let py = need!(python3(), test, "no python3");
    let t = TempDir::new("grp-pidns");
    let r = Reaper::new();
    let name = unique("pidns");
    let root = t.join("imgs");
    let (fa, fb, ida, idb) = (t.join("a"), t.join("b"), t.join("a.id"), t.join("b.id"));
    // The pid bash sees for itself, then what its /proc says of it.
    let script = format!(
        "echo $$ > {id}; grep NSpid /proc/$$/status >> {id}; {counter}",
        id = ida.display(),
        counter = counter_script(&fa)
    );
    let (g, v) = start_group(&name, &root, &["--pidns"], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    let init = v["pidns_init"].as_i64().expect("pidns_init in the report") as i32;
    assert_eq!(ppid(init), Some(g.supervisor), "the init's parent is not the supervisor");
    assert_eq!(ppid(program), Some(init), "the program's parent is not the namespace's init");
    assert_eq!(ns_pid(init), Some(1), "the init is not pid 1 in its namespace");
    let ns = pid_ns(init);
    assert_ne!(ns, pid_ns(std::process::id() as i32), "the group runs in our own pid namespace");
    assert_eq!(pid_ns(program), ns);
    wait_counter_past(&fa, 0, 5, secs(30));
    let a_pid = first_number(&ida);
    assert_eq!(Some(a_pid), ns_pid(program), "bash's $$ is not its pid in the namespace");
    assert!(a_pid < 10, "bash sees itself as pid {a_pid}, not a low pid of a new namespace");
    // Its /proc is the namespace's: one level of NSpid, the same pid.
    let proc_line = read_opt(&ida).unwrap().lines().nth(1).unwrap_or_default().to_string();
    assert_eq!(proc_line.split_whitespace().collect::<Vec<_>>(), ["NSpid:", &a_pid.to_string()], "/proc inside the group is not the namespace's");
    let cg = cgroup_of(&name);
    assert!(cgroup_members(&cg).contains(&init) && cgroup_members(&cg).contains(&program));

    // A second program joins: our grandchild, through snap join, in the
    // same namespace and cgroup.
    let py_script = format!(
        "import os\nopen({:?}, 'w').write('%d\\n' % os.getpid())\n{}",
        idb.display().to_string(),
        py_counter(&fb)
    );
    let jsnap = spawn(&r, Command::new(snap_bin()).args(["join", &name, "--"]).arg(&py).arg("-c").arg(&py_script), &t.join("join.log"));
    wait_counter_past(&fb, 0, 5, secs(30));
    let joined = wait_for("the joined program, child of snap join", secs(30), || {
        descendants(jsnap).into_iter().find(|&c| fs::read_link(format!("/proc/{c}/exe")).is_ok_and(|e| e.to_string_lossy().contains("python")))
    });
    assert_eq!(ppid(joined), Some(jsnap), "the joined program's parent is not snap join");
    assert_eq!(pid_ns(joined), ns, "the joined program is not in the group's pid namespace");
    let b_pid = first_number(&idb);
    assert_eq!(Some(b_pid), ns_pid(joined), "python's os.getpid() is not its pid in the namespace");
    assert!(cgroup_members(&cg).contains(&joined), "joined pid {joined} not in {}", cg.display());
    assert!(!cgroup_members(&cg).contains(&jsnap), "snap join itself moved into the group's cgroup");

    // A checkpoint in the namespace's pids.
    let (a0, b0) = (last_number(&fa).unwrap(), last_number(&fb).unwrap());
    let d = t.join("ckpt");
    let s = group_dump(&name, Some(&d));
    let inv: Value = serde_json::from_slice(&fs::read(d.join("inventory.json")).unwrap()).unwrap();
    let pids: Vec<i64> = inv["pids"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
    for want in [1, a_pid as i64, b_pid as i64] {
        assert!(pids.contains(&want), "namespace pid {want} not in the image's pids {pids:?}");
    }
    assert_eq!(inv["roots"], serde_json::json!([1, b_pid]), "roots: the init, then the joined program: {inv}");
    assert_eq!(inv["pidns"]["host_pids"]["1"], init, "{inv}");
    assert_eq!(inv["pidns"]["host_pids"][a_pid.to_string()], program, "{inv}");
    assert_eq!(s["pids"], inv["pids"], "{s}");
    wait_counter_past(&fa, a0, 10, secs(30));
    wait_counter_past(&fb, b0, 10, secs(30));

    // Stop the group: init, program and joined program are gone.
    let members = cgroup_members(&cg);
    assert!(kill(g.supervisor, libc::SIGTERM));
    assert_eq!(wait_supervisor_exit(g.supervisor, secs(30)), 128 + libc::SIGTERM);
    wait_gone(&members, secs(20)).expect("members still there after the supervisor's SIGTERM cleanup");
    wait_for("snap join to end with its program", secs(30), || try_reap(jsnap));
    let (la, lb) = (numbers(&fa).len(), numbers(&fb).len());
    let (ka, kb) = (last_number(&fa).unwrap(), last_number(&fb).unwrap());

    // Without --pidns the image is refused, naming the way.
    let dd = d.to_string_lossy().to_string();
    let no = snap(&["restore", "-D", &dd, "-d"]);
    assert!(!no.ok() && no.stderr.contains("--pidns"), "{}", no.describe());

    let res = snap(&["restore", "--pidns", "-D", &dd, "-d", "--json"]);
    let out: Value = serde_json::from_str(res.stdout.trim()).unwrap_or_else(|e| panic!("restore --json: {e}: {}", res.describe()));
    let host = |n: i32| out["host_pids"][n.to_string()].as_i64().unwrap_or_else(|| panic!("pid {n} not restored: {out}")) as i32;
    let (h1, ha, hb) = (host(1), host(a_pid), host(b_pid));
    r.add_all(&[h1, ha, hb]);
    assert!(res.ok(), "snap restore --pidns failed: {}", res.describe());
    let new_ns = pid_ns(h1);
    assert_ne!(new_ns, pid_ns(std::process::id() as i32));
    for (h, n, what) in [(h1, 1, "init"), (ha, a_pid, "bash"), (hb, b_pid, "python")] {
        assert!(alive(h) && proc_state(h) != Some('Z'), "{what} (host pid {h}) not running after restore");
        assert_eq!(ns_pid(h), Some(n), "{what}: not pid {n} in its namespace after restore");
        assert_eq!(pid_ns(h), new_ns, "{what}: not in the restored namespace");
    }
    assert_eq!(ppid(ha), Some(h1), "bash's parent is not the restored init");
    assert!(fs::read_link(format!("/proc/{h1}/exe")).unwrap().starts_with(&root), "the init does not run from its copy in the images root");
    wait_counter_past(&fa, ka, 10, secs(30));
    wait_counter_past(&fb, kb, 10, secs(30));
    for (f, len, before, what) in [(&fa, la, a0, "bash"), (&fb, lb, b0, "python")] {
        let nums = numbers(f);
        let after = &nums[len..];
        assert!(after[0] > before && after[0] <= nums[len - 1] + 1, "{what}: restored counter starts at {} (before checkpoint {before}, at stop {})", after[0], nums[len - 1]);
        assert_consecutive(after, &format!("{what} counter after restore"));
    }
    drop(g);
    drop(r);
}

// ------------------------------------------------------------------ (e)

/// The supervisor stays while any member runs, exits with the program's
/// status when the last one is gone, and removes its cgroup and state dir.
#[test]
fn supervisor_exits_with_program_and_cleans_up() {
    let test = "supervisor_exits_with_program_and_cleans_up";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let t = TempDir::new("grp-exit");
    let name = unique("exit");
    let root = t.join("imgs");
    let (f1, f2) = (t.join("f1"), t.join("f2"));
    // A background child outlives the program (exit 5).
    let script = format!(
        "(while [ ! -e {f2} ]; do sleep 0.05; done) & while [ ! -e {f1} ]; do sleep 0.05; done; exit 5",
        f1 = f1.display(),
        f2 = f2.display()
    );
    let (g, v) = start_group(&name, &root, &["--checkpoint-every", "500ms"], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    let cg = cgroup_of(&name);
    assert!(cg.is_dir() && state_dir(&name).join("control.sock").exists() && state_dir(&name).join("info.json").exists());
    wait_for("a checkpoint", secs(30), || (ps_group(&name)?["checkpoints"].as_u64()? >= 1).then_some(()));
    fs::write(&f1, "").unwrap();
    let ps = wait_for("the program's exit in ps", secs(30), || {
        let p = ps_group(&name)?;
        (p["program_exit"] == 5).then_some(p)
    });
    assert!(!alive(program) || proc_state(program) == Some('Z'));
    assert!(!member_pids(&ps).is_empty(), "no member left, yet the supervisor runs: {ps}");
    assert!(try_reap(g.supervisor).is_none() && alive(g.supervisor), "the supervisor left while a member runs");
    fs::write(&f2, "").unwrap();
    assert_eq!(wait_supervisor_exit(g.supervisor, secs(30)), 5, "supervisor's exit code is not the program's");
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    assert!(!state_dir(&name).exists(), "state dir left behind");
    assert!(ps_group(&name).is_none(), "snap ps still lists the group");

    // In the foreground: snap run is the supervisor and exits with the
    // program's status (and a signal's as 128+N).
    let fg = unique("fg");
    let r1 = snap(&["run", "--name", &fg, "--images-root", &root.to_string_lossy(), "--", "bash", "-c", "exit 7"]);
    assert_eq!(r1.status.code(), Some(7), "{}", r1.describe());
    let r2 = snap(&["run", "--name", &fg, "--images-root", &root.to_string_lossy(), "--", "bash", "-c", "kill -9 $$"]);
    assert_eq!(r2.status.code(), Some(128 + 9), "{}", r2.describe());
    assert!(!cgroup_of(&fg).exists() && !state_dir(&fg).exists(), "foreground group left its cgroup or state dir");
    drop(GroupGuard { name: fg, supervisor: 0 });
    drop(g);
}

// ------------------------------------------------------------------ (f)

/// A group whose supervisor died is reported dead with its stale state
/// dir; its name is not reused silently.
#[test]
fn ps_reports_dead_supervisor() {
    let test = "ps_reports_dead_supervisor";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let t = TempDir::new("grp-dead");
    let name = unique("dead");
    let root = t.join("imgs");
    let (g, _) = start_group(&name, &root, &[], &["sleep", "1000"]);
    let again = snap(&["run", "-d", "--name", &name, "--images-root", &root.to_string_lossy(), "--", "sleep", "1000"]);
    assert!(!again.ok() && again.stderr.contains("exists"), "a second group of the same name: {}", again.describe());
    assert!(kill(g.supervisor, libc::SIGKILL));
    wait_supervisor_exit_signaled(g.supervisor);
    let ps = ps_group(&name).expect("dead group listed");
    assert_eq!(ps["state"], "dead", "{ps}");
    assert_eq!(ps["stale_state_dir"], state_dir(&name).to_string_lossy().as_ref(), "{ps}");
    assert_eq!(ps["supervisor_pid"], g.supervisor);
    let r = snap(&["dump", "--group", &name]);
    assert!(!r.ok() && r.stderr.contains("snap: error:"), "{}", r.describe());
    drop(g);
}

fn wait_supervisor_exit_signaled(sup: i32) {
    wait_for(&format!("supervisor {sup} to die"), secs(30), || try_reap(sup).map(|_| ()));
}

// ------------------------------------------------------------------ (g)

/// A checkpoint that fails (a member holds a netlink socket, refused) leaves
/// the group running, thawed and untraced, and the next one works against
/// the last good checkpoint.
#[test]
fn failed_checkpoint_leaves_group_running() {
    let test = "failed_checkpoint_leaves_group_running";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let py = need!(python3(), test, "no python3");
    let t = TempDir::new("grp-fail");
    let r = Reaper::new();
    let name = unique("fail");
    let root = t.join("imgs");
    let file = t.join("counter");
    let script = counter_script(&file);
    let (g, v) = start_group(&name, &root, &[], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    wait_counter_past(&file, 0, 5, secs(30));
    let good = group_dump(&name, None);
    let st = t.sub("py");
    let listener = spawn(
        &r,
        Command::new(snap_bin()).args(["join", &name, "--"]).arg(&py).arg("-c").arg(format!(
            "import socket, time\ns = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nopen({:?}, 'w').write('ok')\ntime.sleep(1000)\n",
            st.join("ready").display().to_string()
        )),
        &t.join("join.log"),
    );
    wait_ready(&st, listener, secs(30));

    let res = snap(&["dump", "--group", &name, "--json"]);
    assert!(!res.ok(), "a dump of a netlink socket succeeded: {}", res.describe());
    assert!(res.stderr.contains("snap: error:") && res.stderr.contains(&listener.to_string()), "error does not name the process: {}", res.describe());
    let cg = cgroup_of(&name);
    if cg.join("cgroup.freeze").exists() {
        assert_eq!(fs::read_to_string(cg.join("cgroup.freeze")).unwrap().trim(), "0", "cgroup left frozen");
        assert!(fs::read_to_string(cg.join("cgroup.events")).unwrap().contains("frozen 0"), "cgroup left frozen");
    }
    for p in cgroup_members(&cg) {
        assert_eq!(status_field(p, "TracerPid").as_deref(), Some("0"), "pid {p} still traced after the failed checkpoint");
    }
    let n = last_number(&file).unwrap();
    wait_counter_past(&file, n, 5, secs(30));
    let ps = ps_group(&name).unwrap();
    assert!(ps["last_error"].as_str().is_some_and(|e| e.contains(&listener.to_string())), "ps shows no error: {ps}");
    assert_eq!(ps["checkpoints"], 1);

    kill(listener, libc::SIGKILL);
    wait_gone(&[listener], secs(20)).unwrap();
    let next = group_dump(&name, None);
    assert_eq!(next["parent"], good["images_dir"], "not against the last good checkpoint: {next}");
    assert!(next["pids"].as_array().unwrap().contains(&program.into()));
    assert_consecutive(&numbers(&file), "counter across a failed checkpoint");
    drop(g);
    drop(r);
}

// ------------------------------------------------------------ recovery

/// Indices where a counter file goes back (a restore from a checkpoint):
/// `nums[i] <= nums[i - 1]`.
fn restarts(nums: &[u64]) -> Vec<usize> {
    (1..nums.len()).filter(|&i| nums[i] <= nums[i - 1]).collect()
}

/// Wait until `snap ps` says the group has recovered `n` times; its entry.
fn wait_recoveries(name: &str, n: u64) -> Value {
    wait_for(&format!("group {name} to have recovered {n} time(s)"), secs(60), || {
        let g = ps_group(name)?;
        (g["recoveries"].as_u64()? >= n && g["recovering"].is_null()).then_some(g)
    })
}

/// The value a counter restarted from after its `k`-th restore (1-based)
/// must lie in `[lo, hi]`: `lo` read before the checkpoint was asked for,
/// `hi` one past the value read right after it returned. Also checks that
/// the counter is consecutive between restarts.
fn assert_restart(f: &Path, k: usize, lo: u64, hi: u64, what: &str) {
    let nums = wait_for(&format!("{what}: restart {k} in {}", f.display()), secs(30), || {
        let nums = numbers(f);
        let r = restarts(&nums);
        // A few numbers after the restart, so that it is not a torn write.
        (r.len() >= k && nums.len() > r[k - 1] + 3).then_some(nums)
    });
    let r = restarts(&nums);
    assert_eq!(r.len(), k, "{what}: {k} restore(s) expected, the counter went back {} times: {nums:?}", r.len());
    let i = r[k - 1];
    assert!(
        (lo..=hi).contains(&nums[i]),
        "{what}: restore {k} restarted the counter at {} (killed at {}); the checkpoint's value was in [{lo}, {hi}]",
        nums[i],
        nums[i - 1]
    );
    let mut bounds = vec![0];
    bounds.extend(&r);
    bounds.push(nums.len());
    for w in bounds.windows(2) {
        assert_consecutive(&nums[w[0]..w[1]], &format!("{what} between restores"));
    }
}

/// A checkpoint with the counter's value bounded: (dir, lo, hi).
fn bounded_dump(name: &str, f: &Path) -> (PathBuf, u64, u64, Value) {
    let lo = last_number(f).unwrap();
    let s = group_dump(name, None);
    let hi = last_number(f).unwrap() + 1;
    (PathBuf::from(s["images_dir"].as_str().unwrap()), lo, hi, s)
}

/// `--recover`: kill -9 of the program restores the group's newest
/// checkpoint under the supervisor, with the same pid, the counter going
/// on from the checkpoint's value; twice more, each time from the newest
/// checkpoint, which after a recovery is first read in full and then
/// tracked again (a wrong incremental image would restore a wrong value);
/// then once more with `snap recover`.
#[test]
fn recover_restores_program_after_kill() {
    let test = "recover_restores_program_after_kill";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let py = need!(python3(), test, "no python3");
    let t = TempDir::new("grp-recover");
    let name = unique("recover");
    let root = t.join("imgs");
    let f = t.join("n");
    let py = py.to_string_lossy().to_string();
    let (g, v) = start_group(&name, &root, &["--recover"], &[&py, "-c", &py_counter(&f)]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    wait_counter_past(&f, 0, 5, secs(30));
    let tracked = uffd_wp_present();
    for round in 1..=3u64 {
        // Two checkpoints: the second is incremental against the first
        // (after a recovery the first is read in full: new processes).
        let (_, _, _, sa) = bounded_dump(&name, &f);
        if round > 1 {
            assert!(["full", "hashed"].contains(&proc_memory(&sa, program).as_str()), "round {round}: first checkpoint after a recovery: {sa}");
        }
        let n = last_number(&f).unwrap();
        wait_counter_past(&f, n, 5, secs(30));
        let (dir, lo, hi, sb) = bounded_dump(&name, &f);
        assert_eq!(sb["parent"], sa["images_dir"], "round {round}: {sb}");
        if tracked {
            assert_eq!(proc_memory(&sb, program), "tracked", "round {round}: {sb}");
        }
        // Well past the checkpoint, so that going back shows.
        wait_counter_past(&f, hi, 10, secs(30));
        assert!(kill(program, libc::SIGKILL));
        let ps = wait_recoveries(&name, round);
        assert_eq!(ps["recoveries"], round);
        assert_eq!(ps["last_recovery"]["from"], dir.to_string_lossy().as_ref(), "round {round}: {ps}");
        assert!(ps["last_recovery"]["unix_time"].as_u64().is_some(), "{ps}");
        assert_eq!(ps["program_pid"], program, "round {round}: the program has another pid: {ps}");
        assert!(ps["program_exit"].is_null(), "{ps}");
        assert_eq!(ppid(program), Some(g.supervisor), "round {round}: the restored program is not the supervisor's child");
        assert!(cgroup_members(&cgroup_of(&name)).contains(&program), "round {round}: restored program not in the cgroup");
        assert_restart(&f, round as usize, lo, hi, &format!("round {round}"));
    }
    // `snap recover`: the same on demand, the program still running.
    let (dir, lo, hi, _) = bounded_dump(&name, &f);
    wait_counter_past(&f, hi, 10, secs(30));
    let r = snap(&["recover", &name, "--json"]);
    assert!(r.ok(), "snap recover failed: {}", r.describe());
    let rec: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(rec["from"], dir.to_string_lossy().as_ref(), "{rec}");
    assert_eq!(rec["program_pid"], program, "{rec}");
    assert_eq!(rec["automatic"], false, "{rec}");
    assert_eq!(ppid(program), Some(g.supervisor));
    assert_restart(&f, 4, lo, hi, "snap recover");
    let r = snap(&["ps"]);
    assert!(r.stdout.contains("recoveries 4"), "snap ps does not show the recoveries: {}", r.describe());
    if !tracked {
        skip(test, "uffd-wp + PAGEMAP_SCAN absent (snap check): tracked-memory assertions skipped");
    }
    drop(g);
}

/// Killing the program of a group with a forked child and a joined
/// program kills both and brings all three back from the checkpoint at
/// the same instant, with their pids.
#[test]
fn recover_brings_back_child_and_joined_program() {
    let test = "recover_brings_back_child_and_joined_program";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let py = need!(python3(), test, "no python3");
    let t = TempDir::new("grp-recover-all");
    let r = Reaper::new();
    let name = unique("recall");
    let root = t.join("imgs");
    let (fa, fc, fb) = (t.join("a"), t.join("c"), t.join("b"));
    let script = format!("( {} ) & {}", counter_script(&fc), counter_script(&fa));
    let (g, v) = start_group(&name, &root, &["--recover"], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    // The joined program's parent is a shell that reaps it, as an
    // interactive one does: its pid is free again once it is killed.
    let shell = spawn(
        &r,
        Command::new("bash").arg("-c").arg("\"$@\"; true").arg("bash").arg(snap_bin()).args(["join", &name, "--"]).arg(&py).arg("-c").arg(py_counter(&fb)),
        &t.join("join.log"),
    );
    let joined = wait_for("the joined python", secs(30), || {
        descendants(shell).into_iter().find(|&p| fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.to_string_lossy().contains("python")))
    });
    for f in [&fa, &fb, &fc] {
        wait_counter_past(f, 0, 5, secs(30));
    }
    let child = wait_for("the forked subshell", secs(30), || {
        descendants(program).into_iter().find(|&p| ppid(p) == Some(program) && status_field(p, "Name").as_deref() == Some("bash"))
    });
    let lo: Vec<u64> = [&fa, &fb, &fc].iter().map(|f| last_number(f).unwrap()).collect();
    let s = group_dump(&name, None);
    let hi: Vec<u64> = [&fa, &fb, &fc].iter().map(|f| last_number(f).unwrap() + 1).collect();
    for p in [program, joined, child] {
        assert!(s["pids"].as_array().unwrap().contains(&p.into()), "pid {p} not in the checkpoint: {s}");
    }
    for (f, h) in [(&fa, hi[0]), (&fb, hi[1]), (&fc, hi[2])] {
        wait_counter_past(f, h, 10, secs(30));
    }
    assert!(kill(program, libc::SIGKILL));
    let ps = wait_recoveries(&name, 1);
    let members = member_pids(&ps);
    for (p, what) in [(program, "program"), (joined, "joined python"), (child, "forked subshell")] {
        assert!(members.contains(&p), "{what} (pid {p}) not back in the group: members {members:?}");
    }
    assert_eq!(ppid(program), Some(g.supervisor));
    assert_eq!(ppid(child), Some(program), "the subshell's parent is not the program again");
    assert!(fs::read_link(format!("/proc/{joined}/exe")).unwrap().to_string_lossy().contains("python"));
    // Every counter went back to the checkpoint: all were killed and restored.
    for (i, (f, what)) in [(&fa, "program"), (&fb, "joined python"), (&fc, "subshell")].into_iter().enumerate() {
        assert_restart(f, 1, lo[i], hi[i], what);
    }
    drop(g);
    drop(r);
}

/// The newest checkpoint's page pack is damaged: the recovery skips it,
/// says so in the supervisor log (naming the file), and restores the one
/// before; the damaged one is never a parent again.
#[test]
fn recover_falls_back_past_damaged_checkpoint() {
    let test = "recover_falls_back_past_damaged_checkpoint";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let py = need!(python3(), test, "no python3");
    let t = TempDir::new("grp-recover-bad");
    let name = unique("recbad");
    let root = t.join("imgs");
    let f = t.join("n");
    let py = py.to_string_lossy().to_string();
    let (g, v) = start_group(&name, &root, &["--recover"], &[&py, "-c", &py_counter(&f)]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    wait_counter_past(&f, 0, 5, secs(30));
    let (d1, lo, hi, _) = bounded_dump(&name, &f);
    wait_counter_past(&f, hi, 10, secs(30));
    let (d2, _, hi2, _) = bounded_dump(&name, &f);
    let pack = d2.join("pages.pack");
    let mut bytes = fs::read(&pack).unwrap();
    assert!(!bytes.is_empty(), "{} is empty: nothing to damage", pack.display());
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&pack, &bytes).unwrap();
    wait_counter_past(&f, hi2, 10, secs(30));
    assert!(kill(program, libc::SIGKILL));
    let ps = wait_recoveries(&name, 1);
    assert_eq!(ps["last_recovery"]["from"], d1.to_string_lossy().as_ref(), "{ps}");
    let skipped = &ps["last_recovery"]["skipped"][0];
    assert_eq!(skipped["dir"], d2.to_string_lossy().as_ref(), "{ps}");
    assert!(skipped["error"].as_str().unwrap().contains("pages.pack"), "{ps}");
    assert_restart(&f, 1, lo, hi, "fallback");
    let log = fs::read_to_string(root.join("supervisor.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains(&d2.to_string_lossy().to_string()) && l.contains("pages.pack") && l.contains("not usable")),
        "supervisor.log does not name the damaged checkpoint and file:\n{log}"
    );
    // The next checkpoint builds on the one restored, not the damaged one.
    let s = group_dump(&name, None);
    assert_eq!(s["parent"], d1.to_string_lossy().as_ref(), "{s}");
    let d3 = PathBuf::from(s["images_dir"].as_str().unwrap());

    // Now damage d1 too: d3 is intact but its chain is not, and nothing
    // is left to recover from. The group ends, saying why, nothing runs.
    let pack = d1.join("pages.pack");
    let mut bytes = fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&pack, &bytes).unwrap();
    let cg = cgroup_of(&name);
    let members = cgroup_members(&cg);
    assert!(kill(program, libc::SIGKILL));
    assert_eq!(wait_supervisor_exit(g.supervisor, secs(60)), 128 + libc::SIGKILL);
    let log = fs::read_to_string(root.join("supervisor.log")).unwrap();
    let d3s = d3.to_string_lossy().to_string();
    assert!(
        log.lines().any(|l| l.contains(&format!("checkpoint {d3s} is not usable")) && l.contains("its parent") && l.contains("0001: image file pages.pack")),
        "the log does not say that {d3s} is unusable because of its parent:\n{log}"
    );
    assert!(log.contains("recovery failed: no usable checkpoint"), "{log}");
    wait_gone(&members, secs(20)).expect("members left running after a failed recovery");
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    drop(g);
}

/// Exit 0 ends a --recover group as without it; a non-zero exit recovers;
/// the death after --max-recoveries ends the group with a message;
/// --recover with --pidns is refused, saying why.
#[test]
fn recover_clean_exit_and_limit() {
    let test = "recover_clean_exit_and_limit";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let t = TempDir::new("grp-recover-end");
    let r = snap(&["run", "-d", "--recover", "--pidns", "--name", &unique("recpidns"), "--", "sleep", "100"]);
    assert!(!r.ok() && r.stderr.contains("--recover does not work with --pidns"), "{}", r.describe());
    let stop = t.join("stop");
    let script = format!("while [ ! -e {0} ]; do sleep 0.05; done; code=$(cat {0}); rm {0}; exit $code", stop.display());

    // Exit 0: the group ends, no recovery.
    let name = unique("recexit");
    let root = t.join("imgs0");
    let (g, _) = start_group(&name, &root, &["--recover"], &["bash", "-c", &script]);
    group_dump(&name, None);
    fs::write(&stop, "0").unwrap();
    assert_eq!(wait_supervisor_exit(g.supervisor, secs(30)), 0);
    let log = fs::read_to_string(root.join("supervisor.log")).unwrap();
    assert!(log.contains("clean exit, no recovery") && !log.contains("restoring"), "{log}");
    drop(g);

    // Exit 3 recovers; the next death is one too many.
    let name = unique("reclimit");
    let root = t.join("imgs1");
    let (g, v) = start_group(&name, &root, &["--recover", "--max-recoveries", "1"], &["bash", "-c", &script]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    group_dump(&name, None);
    fs::write(&stop, "3").unwrap();
    let ps = wait_recoveries(&name, 1);
    assert_eq!(ps["program_pid"], program);
    assert!(alive(program) && ppid(program) == Some(g.supervisor), "program not restored under the supervisor");
    let cg = cgroup_of(&name);
    assert!(kill(program, libc::SIGKILL));
    assert_eq!(wait_supervisor_exit(g.supervisor, secs(30)), 128 + libc::SIGKILL);
    let log = fs::read_to_string(root.join("supervisor.log")).unwrap();
    assert!(log.contains("ended with status 3: restoring checkpoint"), "{log}");
    assert!(log.contains("--max-recoveries 1") && log.contains("giving up"), "{log}");
    wait_gone(&[program], secs(20)).expect("program left running");
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    drop(g);
}

/// A recovery whose restore cannot happen (a joined program's parent, here
/// the test, does not reap it, so its pid stays taken by a zombie) ends
/// the group with an error naming the checkpoint and the zombie, and
/// leaves nothing running.
#[test]
fn recover_failure_ends_group_cleanly() {
    let test = "recover_failure_ends_group_cleanly";
    let _l = lock();
    if !groups_supported(test) {
        return;
    }
    let t = TempDir::new("grp-recover-fail");
    let r = Reaper::new();
    let name = unique("recfail");
    let root = t.join("imgs");
    let f = t.join("a");
    let (g, v) = start_group(&name, &root, &["--recover"], &["bash", "-c", &counter_script(&f)]);
    let program = v["program_pid"].as_i64().unwrap() as i32;
    // Our child, which we do not reap until the end.
    let joined = spawn(&r, Command::new(snap_bin()).args(["join", &name, "--", "sleep", "1000"]), &t.join("join.log"));
    wait_for("the joined sleep in the group", secs(30), || cgroup_members(&cgroup_of(&name)).contains(&joined).then_some(()));
    wait_counter_past(&f, 0, 5, secs(30));
    let s = group_dump(&name, None);
    let dir = s["images_dir"].as_str().unwrap().to_string();
    assert!(s["pids"].as_array().unwrap().contains(&joined.into()), "{s}");
    let cg = cgroup_of(&name);
    let members = cgroup_members(&cg);
    assert!(kill(program, libc::SIGKILL));
    assert_eq!(wait_supervisor_exit(g.supervisor, secs(60)), 128 + libc::SIGKILL);
    let log = fs::read_to_string(root.join("supervisor.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("recovery failed")
            && l.contains(&format!("restoring checkpoint {dir}"))
            && l.contains(&format!("{joined} (sleep, a zombie"))),
        "the log does not name the checkpoint and the zombie {joined}:\n{log}"
    );
    assert_eq!(proc_state(joined), Some('Z'), "the joined sleep should be our unreaped zombie");
    let others: Vec<i32> = members.into_iter().filter(|&p| p != joined).collect();
    wait_gone(&others, secs(20)).expect("members left running after a failed recovery");
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    drop(g);
    drop(r);
}
