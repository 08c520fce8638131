//! End-to-end tests for SysV IPC (src/ipc/sysv.rs): shared memory segments,
//! semaphore sets and message queues of a parent and its child
//! (fixtures/sysv_ipc.c), in the host's IPC namespace and in one of their
//! own. The fixture checks its own objects on SIGUSR1 and writes "ok" or
//! "FAIL: what" (see its header comment).
//!
//! Run: `cargo test --release --test e2e_ipc -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

/// The fixture's tree and object ids.
struct Tree {
    parent: i32,
    child: i32,
    shm_a: i32,
    shm_b: i32,
    shm_c: i32,
    sem: i32,
    msg: i32,
}

/// Removes the host namespace objects a test made (SysV objects outlive
/// their processes). Errors are ignored: the object may be gone already.
struct Ipcrm(Vec<(&'static str, i32)>);

impl Drop for Ipcrm {
    fn drop(&mut self) {
        for (flag, id) in &self.0 {
            let _ = Command::new("ipcrm").arg(flag).arg(id.to_string()).stderr(std::process::Stdio::null()).status();
        }
    }
}

fn have_ipcrm() -> bool {
    Command::new("ipcrm").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn start(test: &str, own_ns: bool) -> Option<(Reaper, TempDir, std::path::PathBuf, Tree, Ipcrm)> {
    let bin = fixture("sysv_ipc")?;
    if !have_ipcrm() {
        return None;
    }
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let mut cmd = if own_ns {
        let mut c = Command::new("unshare");
        c.arg("--ipc").arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let pid = spawn(&r, cmd.arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let v: Vec<i32> = ready.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(v.len(), 7, "ready: {ready}");
    assert_eq!(v[0], pid, "ready: {ready}");
    let tree = Tree { parent: v[0], child: v[1], shm_a: v[2], shm_b: v[3], shm_c: v[4], sem: v[5], msg: v[6] };
    let rm = if own_ns {
        Ipcrm(Vec::new())
    } else {
        Ipcrm(vec![("-m", tree.shm_a), ("-m", tree.shm_b), ("-m", tree.shm_c), ("-s", tree.sem), ("-q", tree.msg)])
    };
    Some((r, t, d, tree, rm))
}

fn check(d: &Path, pid: i32, what: &str) {
    let res = signal_and_result(d, pid, libc::SIGUSR1, "result", secs(30));
    assert!(res.starts_with("ok"), "{what}: {}", res.trim());
}

fn ipc_ns(pid: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/ipc")).unwrap().display().to_string()
}

/// Ids listed in /proc/sysvipc/NAME of the test's namespace.
fn host_ids(name: &str) -> Vec<i32> {
    fs::read_to_string(format!("/proc/sysvipc/{name}"))
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

/// Host namespace, objects still there after the dump killed the tree: the
/// segment, semaphore set and queue are reused with their saved state
/// written back, the removed-while-attached segment (gone with its last
/// user) is made again with its id; ids, addresses, contents, counters,
/// last pids and messages are as before.
#[test]
fn sysv_host_objects_reused() {
    let _l = lock();
    let (r, t, d, tr, _rm) = need!(start("sysv_reuse", false), "sysv_host_objects_reused", "gcc or ipcrm not found");
    let img = t.sub("img");
    dump_kill(&[tr.parent], &img, &[]);
    assert!(!host_ids("shm").contains(&tr.shm_b), "segment B outlived its users");
    assert!(host_ids("shm").contains(&tr.shm_a));
    restore_ok(&img, &r, &[tr.parent, tr.child]);
    assert!(host_ids("shm").contains(&tr.shm_b), "segment B not made again with id {}", tr.shm_b);
    check(&d, tr.parent, "after restore");
}

/// Host namespace, objects removed between dump and restore (a reboot, or
/// another host): every object is made again with its id, key and state.
#[test]
fn sysv_host_objects_recreated() {
    let _l = lock();
    let (r, t, d, tr, rm) = need!(start("sysv_recreate", false), "sysv_host_objects_recreated", "gcc or ipcrm not found");
    let img = t.sub("img");
    dump_kill(&[tr.parent], &img, &[]);
    // Everything the dump saved goes (C was never attached: not saved, kept).
    let saved: Vec<_> = rm.0.iter().filter(|(f, id)| !(*f == "-m" && *id == tr.shm_c)).cloned().collect();
    drop(Ipcrm(saved));
    assert!(!host_ids("shm").contains(&tr.shm_a) && !host_ids("sem").contains(&tr.sem) && !host_ids("msg").contains(&tr.msg));
    restore_ok(&img, &r, &[tr.parent, tr.child]);
    assert!(host_ids("shm").contains(&tr.shm_a) && host_ids("sem").contains(&tr.sem) && host_ids("msg").contains(&tr.msg));
    check(&d, tr.parent, "after restore");
}

/// The tree in an IPC namespace of its own: the whole namespace is saved
/// (also segment C, which nobody attaches) and restore makes a new
/// namespace holding the same ids.
#[test]
fn sysv_own_namespace() {
    let _l = lock();
    let (r, t, d, tr, _rm) = need!(start("sysv_ns", true), "sysv_own_namespace", "gcc or ipcrm not found");
    let p = tr.parent.to_string();
    assert_ne!(ipc_ns(&p), ipc_ns("self"), "the fixture is not in its own IPC namespace");
    let img = t.sub("img");
    dump_kill(&[tr.parent], &img, &[]);
    let ipc: serde_json::Value = serde_json::from_slice(&fs::read(img.join("ipc.json")).unwrap()).unwrap();
    assert_eq!(ipc["own_namespace"], true);
    assert_eq!(ipc["shm"].as_array().unwrap().len(), 3, "every segment of the namespace: {ipc}");
    restore_ok(&img, &r, &[tr.parent, tr.child]);
    assert_ne!(ipc_ns(&p), ipc_ns("self"), "restored into the host's IPC namespace");
    assert_eq!(ipc_ns(&p), ipc_ns(&tr.child.to_string()), "parent and child in different IPC namespaces");
    check(&d, tr.parent, "after restore");
}

/// --leave-running: the tree goes on with its objects untouched (checked by
/// the fixture: values, messages, attachments). A restore next to it is
/// refused, naming the segment it still attaches, and changes nothing.
#[test]
fn sysv_leave_running_and_refused_restore() {
    let _l = lock();
    let (r, t, d, tr, _rm) = need!(start("sysv_leave", false), "sysv_leave_running_and_refused_restore", "gcc or ipcrm not found");
    let img = t.sub("img");
    dump_ok(&[tr.parent], &img, &["--leave-running"]);
    let s = img.to_string_lossy().to_string();
    let run = snap(&["restore", "-D", &s, "-d", "--pidns"]);
    assert!(!run.ok(), "restore next to the running original succeeded: {}", run.describe());
    assert!(
        run.stderr.contains(&format!("segment {}", tr.shm_a)) && run.stderr.contains("attached"),
        "error does not name the attached segment: {}",
        run.stderr
    );
    assert_eq!(host_ids("shm").iter().filter(|&&i| i == tr.shm_b).count(), 1);
    check(&d, tr.parent, "original after dump --leave-running and a refused restore");
    drop(r);
}

fn copy_image(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn restore_fails(img: &Path, tr: &Tree, want: &[&str]) {
    let s = img.to_string_lossy().to_string();
    let run = snap(&["restore", "-D", &s, "-d"]);
    assert!(!run.ok(), "damaged image restored: {}", run.describe());
    for w in want {
        assert!(run.stderr.contains(w), "error does not say {w:?}: {}", run.stderr);
    }
    assert!(!alive(tr.parent) && !alive(tr.child), "a failed restore left processes");
}

/// Damaged images: an absurd segment size, a queue whose message blob is
/// missing, a segment id taken by another segment: clear errors, nothing
/// left running.
#[test]
fn sysv_damaged_image_and_taken_id() {
    let _l = lock();
    let (r, t, _d, tr, _rm) = need!(start("sysv_damaged", false), "sysv_damaged_image_and_taken_id", "gcc or ipcrm not found");
    let img = t.sub("img");
    dump_kill(&[tr.parent], &img, &[]);

    let big = t.join("big");
    copy_image(&img, &big);
    edit(&big, "ipc.json", |v| v["shm"][0]["size"] = serde_json::json!(1u64 << 50));
    restore_fails(&big, &tr, &["ipc.json", "absurd size"]);

    let noblob = t.join("noblob");
    copy_image(&img, &noblob);
    let blob = format!("sysv-msg-{}.data", tr.msg);
    fs::remove_file(noblob.join(&blob)).unwrap();
    edit_manifest(&noblob, |files| files.retain(|e| e["name"] != blob.as_str()));
    restore_fails(&noblob, &tr, &[&format!("message queue {}", tr.msg), &blob]);

    // Segment B's id (gone with its users) taken by another segment.
    fs::write("/proc/sys/kernel/shm_next_id", tr.shm_b.to_string()).unwrap();
    // SAFETY: shmget with integer arguments.
    let other = unsafe { libc::shmget(libc::IPC_PRIVATE, 4096, 0o600) };
    let _ = fs::write("/proc/sys/kernel/shm_next_id", "-1");
    let _rm_other = Ipcrm(vec![("-m", other)]);
    assert_eq!(other, tr.shm_b, "could not place a segment at id {}", tr.shm_b);
    restore_fails(&img, &tr, &[&format!("id {} is taken by another segment", tr.shm_b)]);
    drop(r);
}

// ---------------------------------------------------------------- PostgreSQL

/// `prog args…` as user postgres (runuser), its stdout; panics on failure.
fn as_postgres(prog: &Path, args: &[&str]) -> String {
    let o = Command::new("runuser").args(["-u", "postgres", "--"]).arg(prog).args(args).output().unwrap();
    assert!(o.status.success(), "{} {args:?}: {:?}\n{}", prog.display(), o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// PostgreSQL (postmaster, its 5 auxiliary processes, the SysV interlock
/// segment they all attach, shared anonymous memory) on a Unix socket only,
/// with a psql session connected: both dumped together, killed, restored.
/// The session goes on (same backend), new connections work, the segment
/// is attached by every restored process, and `pg_ctl stop` shuts the
/// server down cleanly.
#[test]
fn postgres_with_session_survives() {
    const T: &str = "postgres_with_session_survives";
    let _l = lock();
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|rd| rd.flatten().map(|e| e.path().join("bin")).find(|b| b.join("initdb").is_file()));
    let bin = need!(bin, T, "PostgreSQL not installed (/usr/lib/postgresql/*/bin)");
    let have_user = Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success());
    need!(have_user.then_some(()), T, "no user postgres");
    need!(Command::new("runuser").arg("--help").output().ok().filter(|o| o.status.success()), T, "runuser not found");
    let t = TempDir::new("pg");
    let r = Reaper::new();
    let pg = t.sub("pg");
    let sock = t.sub("pg/sock");
    let data = pg.join("data");
    assert!(Command::new("chown").args(["-R", "postgres"]).arg(&pg).status().unwrap().success());
    as_postgres(&bin.join("initdb"), &["-D", data.to_str().unwrap(), "-A", "trust", "--no-sync"]);
    let mut conf = fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
    use std::io::Write;
    writeln!(conf, "listen_addresses = ''\nunix_socket_directories = '{}'\nfsync = off", sock.display()).unwrap();
    drop(conf);
    let log = pg.join("log");
    as_postgres(&bin.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "start"]);
    let pm: i32 = read_opt(&data.join("postmaster.pid")).unwrap().lines().next().unwrap().trim().parse().unwrap();
    r.add(pm);
    // Its interlock segment outlives it if the test fails half-way.
    let segs: Vec<_> = fs::read_to_string("/proc/sysvipc/shm")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4)?.parse::<i32>().ok()? == pm).then(|| ("-m", f[1].parse::<i32>().unwrap()))
        })
        .collect();
    assert_eq!(segs.len(), 1, "postmaster {pm} made {} SysV segments", segs.len());
    let shmid = segs[0].1;
    let _rm = Ipcrm(segs);
    let s = sock.to_str().unwrap().to_string();
    let psql = bin.join("psql");
    let q = |sql: &str| as_postgres(&psql, &["-h", &s, "-Atc", sql, "postgres"]).trim().to_string();
    q("create table t (x int); insert into t select generate_series(1, 1000)");

    // A session kept open: psql reading statements from a FIFO, writing to a file.
    let fifo = pg.join("in");
    let out = pg.join("out");
    assert!(Command::new("mkfifo").args(["-m", "666"]).arg(&fifo).status().unwrap().success());
    let mut session = Command::new("runuser");
    session.args(["-u", "postgres", "--", "sh", "-c"]).arg(format!(
        "exec {} -h {s} -At postgres < {} > {} 2>&1",
        psql.display(),
        fifo.display(),
        out.display()
    ));
    let runuser = spawn(&r, &mut session, &t.join("session.log"));
    let mut feed = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writeln!(feed, "select 'backend ' || pg_backend_pid();").unwrap();
    let backend = wait_for("the session's first answer", secs(30), || {
        read_opt(&out).and_then(|o| o.lines().find_map(|l| l.strip_prefix("backend ").map(str::to_string)))
    });
    let client = wait_for("psql", secs(10), || descendants(runuser).into_iter().find(|&p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "psql")));
    let mut pids = tree(pm);
    pids.push(client);

    let img = t.sub("img");
    dump_kill(&[pm, client], &img, &[]);
    restore_ok(&img, &r, &pids);
    r.add(client);
    let nattch = fs::read_to_string("/proc/sysvipc/shm")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1)?.parse::<i32>().ok()? == shmid).then(|| f[6].parse::<usize>().unwrap())
        });
    assert_eq!(nattch, Some(tree(pm).len()), "segment {shmid}: nattch after restore (tree {:?})", tree(pm));
    // The old session: same backend, sees the old rows, takes a write.
    writeln!(feed, "insert into t values (1001); select 'count ' || count(*) || ' ' || pg_backend_pid() from t;").unwrap();
    let answer = wait_for("the session's answer after restore", secs(30), || {
        read_opt(&out).and_then(|o| o.lines().find_map(|l| l.strip_prefix("count ").map(str::to_string)))
    });
    assert_eq!(answer, format!("1001 {backend}"), "session after restore");
    // New connections, and a clean shutdown.
    assert_eq!(q("select sum(x) from t"), (500_500 + 1001).to_string());
    drop(feed);
    as_postgres(&bin.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-w", "-m", "fast", "stop"]);
    wait_gone(&[pm], secs(30)).unwrap();
    let logged = read_opt(&log).unwrap_or_default();
    assert!(logged.contains("database system is shut down"), "no clean shutdown in the log:\n{logged}");
}
