//! End-to-end tests of image chains: `snap image merge` and `snap image
//! prune` on chains of incremental dumps (`--leave-running --track-mem
//! --prev-images-dir PREV`) of a real python process, whose restored
//! state is checked against what it reported at each dump.
//!
//! The workload keeps 2 MiB whose content alternates between two patterns
//! (odd steps A, even steps B) and 64 KiB that are new at every step: the
//! dump of step 5 uses the A pages that only the first image stores, which
//! the 4th image (B) does not use. Pruning down to the last two images must
//! carry them into the rewritten 4th image for the 5th.

#[macro_use]
mod common;
use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const WORKLOAD: &str = r#"
import hashlib, json, os, signal, sys, time
d = sys.argv[1]
PAGES = 512
buf = bytearray(PAGES * 4096)   # alternates between two contents
uniq = bytearray(16 * 4096)     # new content at every step
step = 0
counter = 0

def fill(s):
    pat = b'A'[0] if s % 2 else b'B'[0]
    for i in range(PAGES):
        buf[i * 4096:(i + 1) * 4096] = (b'%c%07d' % (pat, i)) * 512
    for i in range(16):
        uniq[i * 4096:(i + 1) * 4096] = (b'S%03dP%03d' % (s, i)) * 512

def report(name):
    h = hashlib.sha256(buf)
    h.update(uniq)
    tmp = os.path.join(d, name + '.tmp')
    with open(tmp, 'w') as f:
        json.dump({"ok": True, "step": step, "sum": h.hexdigest(), "counter": counter}, f)
    os.rename(tmp, os.path.join(d, name))

def next_step(sig, frame):
    global step
    step += 1
    fill(step)
    report("state")

signal.signal(signal.SIGUSR1, next_step)
signal.signal(signal.SIGUSR2, lambda sig, frame: report("state"))
fill(0)
report("ready")
while True:
    counter += 1
    time.sleep(0.005)
"#;

/// What the workload reported right before a dump.
#[derive(Debug, Clone)]
struct Point {
    dir: PathBuf,
    step: u64,
    sum: String,
    counter: u64,
}

struct Chain {
    pid: i32,
    state: PathBuf,
    points: Vec<Point>,
}

fn report(state: &Path, pid: i32, sig: i32) -> serde_json::Value {
    let s = signal_and_result(state, pid, sig, "state", secs(30));
    let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad state {s:?}: {e}"));
    assert_eq!(v["ok"], true, "{s}");
    v
}

/// Start the workload and dump it `n` times into ROOT/c1..cN, each dump
/// incremental against the one before, the process left running.
fn make_chain(t: &TempDir, r: &Reaper, root: &Path, n: usize) -> Option<Chain> {
    let py = python3()?;
    let script = t.join("workload.py");
    fs::write(&script, WORKLOAD).unwrap();
    let state = t.sub("state");
    let pid = spawn(r, Command::new(py).arg(&script).arg(&state), &t.join("log"));
    wait_ready(&state, pid, secs(30));
    let mut points: Vec<Point> = Vec::new();
    for k in 1..=n {
        let v = report(&state, pid, libc::SIGUSR1);
        assert_eq!(v["step"], k as u64);
        let dir = root.join(format!("c{k}"));
        let prev = points.last().map(|p| p.dir.to_string_lossy().into_owned());
        let mut extra = vec!["--leave-running", "--track-mem"];
        if let Some(p) = &prev {
            extra.extend(["--prev-images-dir", p.as_str()]);
        }
        dump_ok(&[pid], &dir, &extra);
        points.push(Point {
            dir,
            step: k as u64,
            sum: v["sum"].as_str().unwrap().to_string(),
            counter: v["counter"].as_u64().unwrap(),
        });
    }
    Some(Chain { pid, state, points })
}

fn show(dir: &Path) -> serde_json::Value {
    let run = snap(&["image", "show", "--json", &dir.to_string_lossy()]);
    assert!(run.ok(), "image show {}: {}", dir.display(), run.describe());
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("image show --json: {e}: {}", run.stdout))
}

/// Disk space of a directory tree.
fn du(p: &Path) -> u64 {
    let md = fs::symlink_metadata(p).unwrap();
    let mut n = md.blocks() * 512;
    if md.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            n += du(&e.unwrap().path());
        }
    }
    n
}

fn kill_wait(pid: i32) {
    kill(pid, libc::SIGKILL);
    wait_gone(&[pid], secs(30)).unwrap_or_else(|e| panic!("{e}"));
}

/// Restore `p` (the process's pid must be free) and check that the process
/// is back with the memory it had at that dump, then goes on running.
fn restore_and_check(r: &Reaper, c: &Chain, dir: &Path, p: &Point) {
    restore_ok(dir, r, &[c.pid]);
    let v = report(&c.state, c.pid, libc::SIGUSR2);
    assert_eq!(v["step"], p.step, "{}: restored step", dir.display());
    assert_eq!(v["sum"].as_str(), Some(p.sum.as_str()), "{}: restored memory differs from dump {}", dir.display(), p.step);
    let at = v["counter"].as_u64().unwrap();
    assert!(at >= p.counter, "{}: counter went back from {} to {at}", dir.display(), p.counter);
    wait_for("the restored loop to run on", secs(30), || {
        let v = report(&c.state, c.pid, libc::SIGUSR2);
        (v["counter"].as_u64().unwrap() > at).then_some(())
    });
}

/// Merge the 3rd image of a chain of 5 into a standalone image: it has no
/// parent, the same id, exactly the pages it uses, and restores the
/// process at step 3 after the original chain's first two images are
/// deleted.
#[test]
fn merge_middle_of_chain_restores_standalone() {
    let _l = lock();
    let t = TempDir::new("chain-merge");
    let r = Reaper::new();
    let root = t.sub("chain");
    let c = need!(make_chain(&t, &r, &root, 5), "merge_middle_of_chain_restores_standalone", "no python3");
    let p3 = c.points[2].clone();
    let s3 = show(&p3.dir);
    assert_eq!(s3["parent"], "../c2", "{s3}");
    assert_eq!(s3["chain"].as_array().unwrap().len(), 2, "{s3}");
    assert!(s3["pages"]["from_parents"].as_u64().unwrap() > 0, "an incremental image uses its parents' pages: {s3}");
    assert_ne!(s3["memory_backend"], "full", "{s3}");

    let m3 = t.join("m3");
    let run = snap(&["image", "merge", &p3.dir.to_string_lossy(), "-o", &m3.to_string_lossy(), "--json"]);
    assert!(run.ok(), "merge: {}", run.describe());
    let rep: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(rep["chain_len"], 3, "{rep}");
    let sm = show(&m3);
    assert_eq!(sm["parent"], serde_json::Value::Null, "{sm}");
    assert_eq!(sm["parent_id"], serde_json::Value::Null, "{sm}");
    assert_eq!(sm["chain"].as_array().unwrap().len(), 0, "{sm}");
    assert_eq!(sm["id"], s3["id"], "same checkpoint, same id");
    assert_eq!(sm["memory_backend"], s3["memory_backend"]);
    assert_eq!(sm["pages"]["from_parents"], 0, "{sm}");
    assert_eq!(sm["pages"]["stored_here"], sm["pages"]["referenced"], "{sm}");
    assert_eq!(sm["page_store"]["distinct_pages"], sm["pages"]["referenced"], "a store of exactly the pages used: {sm}");
    assert_eq!(sm["pages"]["referenced"], s3["pages"]["referenced"], "{sm} vs {s3}");

    kill_wait(c.pid);
    for k in ["c1", "c2"] {
        fs::remove_dir_all(root.join(k)).unwrap();
    }
    assert!(!snap(&["image", "show", &p3.dir.to_string_lossy()]).ok(), "c3 opens without its parents?");
    restore_and_check(&r, &c, &m3, &p3);
}

/// Prune a chain of 5 down to the last 2: c1..c3 go, c4 is rewritten as
/// standalone holding the pages c5 needs from the removed images, disk use
/// goes down, and both kept images restore.
#[test]
fn prune_keep_two_of_chain_restores_both() {
    let _l = lock();
    let t = TempDir::new("chain-prune");
    let r = Reaper::new();
    let root = t.sub("chain");
    let c = need!(make_chain(&t, &r, &root, 5), "prune_keep_two_of_chain_restores_both", "no python3");
    fs::create_dir(root.join("incoming")).unwrap();
    let c4_id = show(&c.points[3].dir)["id"].clone();
    let before = du(&root);

    let run = snap(&["image", "prune", &root.to_string_lossy(), "--keep", "2", "--json"]);
    assert!(run.ok(), "prune: {}", run.describe());
    let rep: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(rep["removed"], serde_json::json!(["c1", "c2", "c3"]), "{rep}");
    assert_eq!(rep["rebased"], serde_json::json!(["c4"]), "{rep}");
    assert_eq!(rep["kept"], serde_json::json!(["c4", "c5"]), "{rep}");
    assert!(rep["skipped"][0].as_str().unwrap().starts_with("incoming"), "{rep}");
    let after = du(&root);
    assert!(after < before, "disk use {before} -> {after}");
    assert!(rep["bytes_freed"].as_u64().unwrap() > 0, "{rep}");
    for k in ["c1", "c2", "c3"] {
        assert!(!root.join(k).exists(), "{k} not removed");
    }
    let mut left: Vec<String> = fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["c4", "c5", "incoming"]);

    let s4 = show(&c.points[3].dir);
    assert_eq!(s4["parent"], serde_json::Value::Null, "{s4}");
    assert_eq!(s4["id"], c4_id);
    assert!(
        s4["page_store"]["distinct_pages"].as_u64() > s4["pages"]["referenced"].as_u64(),
        "c4 holds pages for c5 that it does not use itself: {s4}"
    );
    let s5 = show(&c.points[4].dir);
    assert_eq!(s5["parent"], "../c4", "{s5}");
    assert_eq!(s5["parent_id"], c4_id, "{s5}");

    kill_wait(c.pid);
    for p in &c.points[3..] {
        restore_and_check(&r, &c, &p.dir, p);
        kill_wait(c.pid);
    }
}

/// `prune --remove` of a parent still needed is refused, naming the image
/// that needs it, and deletes nothing; removing the newest image works.
#[test]
fn prune_remove_of_needed_parent_is_refused() {
    let _l = lock();
    let t = TempDir::new("chain-remove");
    let r = Reaper::new();
    let root = t.sub("chain");
    let c = need!(make_chain(&t, &r, &root, 3), "prune_remove_of_needed_parent_is_refused", "no python3");
    kill_wait(c.pid);
    let before = du(&root);
    let run = snap(&["image", "prune", &root.to_string_lossy(), "--remove", "c2"]);
    assert!(!run.ok(), "removing a needed parent succeeded: {}", run.describe());
    assert!(run.stderr.contains("image c3 needs c2"), "{}", run.stderr);
    assert!(run.stderr.contains("nothing was removed"), "{}", run.stderr);
    assert_eq!(du(&root), before, "something changed");
    for p in &c.points {
        show(&p.dir);
    }
    let run = snap(&["image", "prune", &root.to_string_lossy(), "--remove", "c3", "--json"]);
    assert!(run.ok(), "{}", run.describe());
    let rep: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(rep["removed"], serde_json::json!(["c3"]), "{rep}");
    assert!(!root.join("c3").exists());
    restore_and_check(&r, &c, &c.points[1].dir, &c.points[1]);
}

/// Merging an image whose parent is gone fails, naming the parent
/// directory, and leaves no output behind.
#[test]
fn merge_with_missing_parent_fails_naming_it() {
    let _l = lock();
    let t = TempDir::new("chain-missing");
    let r = Reaper::new();
    let root = t.sub("chain");
    let c = need!(make_chain(&t, &r, &root, 2), "merge_with_missing_parent_fails_naming_it", "no python3");
    kill_wait(c.pid);
    fs::rename(root.join("c1"), t.join("moved")).unwrap();
    let out = t.join("out");
    let run = snap(&["image", "merge", &c.points[1].dir.to_string_lossy(), "-o", &out.to_string_lossy()]);
    assert!(!run.ok(), "merge without the parent succeeded: {}", run.describe());
    let parent = c.points[1].dir.join("../c1");
    assert!(run.stderr.contains(&*parent.to_string_lossy()), "error does not name {}: {}", parent.display(), run.stderr);
    assert!(!out.exists(), "{} left behind", out.display());
}
