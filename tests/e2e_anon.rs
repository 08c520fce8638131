//! End-to-end tests for anonymous-inode descriptors: eventfd, timerfd,
//! signalfd, epoll, inotify; and POSIX message queues. Each workload (fixtures/anon_*.c) sets the
//! object up, writes "ready PID", and on SIGUSR1 checks the state it
//! expects after a restore and writes "ok" or "FAIL: what".
//!
//! Run: `cargo test --release --test e2e_anon -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;


fn check(d: &Path, pid: i32, what: &str) {
    let res = signal_and_result(d, pid, libc::SIGUSR1, "result", secs(30));
    assert!(res.starts_with("ok"), "{what}: {}", res.trim());
}

/// Lines of /proc/PID/fdinfo/FD that start with one of `keys`.
fn fdinfo_lines(pid: i32, fd: i32, keys: &[&str]) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter(|l| keys.iter().any(|k| l.starts_with(k)))
        .map(str::to_string)
        .collect()
}

fn link(pid: i32, fd: i32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).map(|p| p.display().to_string()).unwrap_or_default()
}

/// Start fixture `name`, wait for "ready", return (reaper, tempdir, state dir, pid).
fn start(name: &str, test: &str) -> Option<(Reaper, TempDir, std::path::PathBuf, i32)> {
    let bin = fixture(name)?;
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    assert_eq!(ready.split_whitespace().next(), Some(pid.to_string().as_str()), "ready: {ready}");
    Some((r, t, d, pid))
}

fn dump_restore(t: &TempDir, r: &Reaper, pid: i32) {
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, r, &[pid]);
}

// ------------------------------------------------------------------ eventfd

/// Counter (5, shared by a dup), semaphore mode (3) and O_NONBLOCK survive:
/// after restore 5 + a new write of 2 reads as 7, and the semaphore gives
/// 1 three times.
#[test]
fn eventfd_counter_and_semaphore() {
    let _l = lock();
    let (r, t, d, pid) = need!(start("anon_eventfd", "eventfd"), "eventfd_counter_and_semaphore", "gcc not found");
    let keys = ["eventfd-count", "eventfd-semaphore", "flags"];
    let before: Vec<_> = [10, 11].iter().map(|&fd| fdinfo_lines(pid, fd, &keys)).collect();
    dump_restore(&t, &r, pid);
    let after: Vec<_> = [10, 11].iter().map(|&fd| fdinfo_lines(pid, fd, &keys)).collect();
    assert_eq!(before, after, "eventfd fdinfo differs after restore");
    assert_eq!(link(pid, 12), "anon_inode:[eventfd]");
    check(&d, pid, "after restore");
}

// ------------------------------------------------------------------ timerfd

/// A periodic timer keeps firing at its interval, an absolute realtime
/// deadline stays where it was, a relative boottime timer keeps its time
/// left and interval, an expired unread one-shot reads 1, and a periodic
/// timer with 10 unread expirations reads exactly 10 (TFD_IOC_SET_TICKS).
#[test]
fn timerfd_rearmed() {
    let _l = lock();
    let (r, t, d, pid) = need!(start("anon_timerfd", "timerfd"), "timerfd_rearmed", "gcc not found");
    let keys = ["clockid", "settime flags", "flags", "it_interval"];
    let before: Vec<_> = (10..15).map(|fd| fdinfo_lines(pid, fd, &keys)).collect();
    assert!(fdinfo_lines(pid, 12, &["ticks"]) == ["ticks: 1"], "fixture fd 12: {:?}", fdinfo_lines(pid, 12, &["ticks"]));
    let ticks14 = fdinfo_lines(pid, 14, &["ticks"]);
    assert!(ticks14 == ["ticks: 10"], "fixture fd 14: {ticks14:?}");
    dump_restore(&t, &r, pid);
    let after: Vec<_> = (10..15).map(|fd| fdinfo_lines(pid, fd, &keys)).collect();
    assert_eq!(before, after, "timerfd fdinfo differs after restore");
    assert_eq!(fdinfo_lines(pid, 14, &["ticks"]), ticks14, "fd 14: unread expirations after restore");
    check(&d, pid, "after restore");
}

// ------------------------------------------------------------------ signalfd

/// The masks and O_NONBLOCK survive; a signal queued before the dump and
/// one sent after the restore are read from the signalfd.
#[test]
fn signalfd_mask() {
    let _l = lock();
    let (r, t, d, pid) = need!(start("anon_signalfd", "signalfd"), "signalfd_mask", "gcc not found");
    let keys = ["sigmask", "flags"];
    let before: Vec<_> = [10, 11].iter().map(|&fd| fdinfo_lines(pid, fd, &keys)).collect();
    dump_restore(&t, &r, pid);
    let after: Vec<_> = [10, 11].iter().map(|&fd| fdinfo_lines(pid, fd, &keys)).collect();
    assert_eq!(before, after, "signalfd fdinfo differs after restore");
    check(&d, pid, "after restore");
}

// ------------------------------------------------------------------ epoll

/// Watches (events, data) come back, added by the process at its own fd
/// numbers; an epoll watching an epoll works; the event pending at the
/// dump (a pipe with unread bytes) is reported after restore with its data.
#[test]
fn epoll_watches_and_pending_event() {
    let _l = lock();
    let (r, t, d, pid) = need!(start("anon_epoll", "epoll"), "epoll_watches_and_pending_event", "gcc not found");
    let watches = |pid| -> Vec<Vec<String>> {
        [13, 14]
            .iter()
            .map(|&fd| {
                let mut v: Vec<String> = fdinfo_lines(pid, fd, &["tfd:", "flags"])
                    .iter()
                    .map(|l| l.split(" pos:").next().unwrap().to_string())
                    .collect();
                v.sort();
                v
            })
            .collect()
    };
    let before = watches(pid);
    assert_eq!(before[0].len(), 3, "fixture: {before:?}");
    dump_restore(&t, &r, pid);
    assert_eq!(before, watches(pid), "epoll watches differ after restore");
    check(&d, pid, "after restore");
}

/// A watch whose descriptor was closed after it was added (the file lives
/// on at another number) cannot be re-added: the dump is refused naming
/// pid, the epoll fd and the watched fd, and the process keeps running.
#[test]
fn epoll_watch_of_closed_fd_refused() {
    let _l = lock();
    let bin = need!(fixture("anon_epoll"), "epoll_watch_of_closed_fd_refused", "gcc not found");
    let t = TempDir::new("epoll_closed");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg("closed"), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let run = dump_raw(&[pid], &t.sub("img"), &[]);
    assert!(!run.ok(), "dump should have been refused: {}", run.describe());
    for w in [format!("pid {pid} fd 15"), "fd 16".into(), "closed".into()] {
        assert!(run.stderr.contains(&w), "error does not contain {w:?}: {}", run.stderr);
    }
    assert!(!run.stderr.contains("panicked"));
    assert!(alive(pid) && status_field(pid, "TracerPid").as_deref() == Some("0"), "not left running untraced");
    check(&d, pid, "after the refused dump");
}

// ------------------------------------------------------------------ inotify

/// Watches come back on the same paths with the same masks and the same
/// watch descriptors (wd 1 and 3, with the gap of a removed wd 2), and
/// report new events (no event is queued at the dump).
#[test]
fn inotify_watches_same_wds() {
    let _l = lock();
    let (r, t, d, pid) = need!(start("anon_inotify", "inotify"), "inotify_watches_same_wds", "gcc not found");
    let watches = |pid| -> Vec<String> {
        fdinfo_lines(pid, 10, &["inotify", "flags"])
            .iter()
            .map(|l| l.split(" ignored_mask").next().unwrap().to_string())
            .collect()
    };
    let before = watches(pid);
    assert_eq!(before.len(), 3, "fixture: {before:?}");
    dump_restore(&t, &r, pid);
    assert_eq!(before, watches(pid), "inotify watches differ after restore");
    check(&d, pid, "after restore");
}

// ------------------------------------------------------------------ mqueue

/// Unlinks the fixture's named queues (they outlive the processes).
struct MqNames(String);
impl Drop for MqNames {
    fn drop(&mut self) {
        for s in ["a", "b", "c"] {
            let _ = snap::kinds::sys::mq_unlink(&std::ffi::CString::new(format!("/{}-{s}", self.0)).unwrap());
        }
    }
}

fn start_mqueue(test: &str, extra: &[&str]) -> Option<(Reaper, TempDir, std::path::PathBuf, i32, MqNames)> {
    let bin = fixture("anon_mqueue")?;
    let tag = format!("snap-e2e-{}-{test}", std::process::id());
    let names = MqNames(tag.clone());
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg(&tag).args(extra), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    assert_eq!(ready.split_whitespace().next(), Some(pid.to_string().as_str()), "ready: {ready}");
    Some((r, t, d, pid, names))
}

/// Two named queues (one with messages of several priorities, shared by an
/// O_NONBLOCK and an O_WRONLY description; one empty with an mq_notify
/// SIGEV_SIGNAL registration) and an unlinked queue with messages. Restored
/// twice: once finding the named queues still there (after the dump killed
/// the process), once after they were unlinked (created from the image).
/// Each time the process finds flags, attributes, mode, link counts, every
/// message in order and a notification that fires.
#[test]
fn mqueue_messages_and_notification() {
    let _l = lock();
    let (r, t, d, pid, names) = need!(start_mqueue("mqueue", &[]), "mqueue_messages_and_notification", "gcc not found");
    let img = t.sub("img");
    dump_kill(&[pid], &img, &[]);
    restore_ok(&img, &r, &[pid]);
    check(&d, pid, "after restore onto the existing queues");
    let img2 = t.sub("img2");
    dump_kill(&[pid], &img2, &[]);
    let tag = names.0.clone();
    drop(names);
    let _names = MqNames(tag);
    restore_ok(&img2, &r, &[pid]);
    check(&d, pid, "after restore with the queues created from the image");
}

/// With --leave-running the process keeps every message, in order, and its
/// notification registration.
#[test]
fn mqueue_leave_running() {
    let _l = lock();
    let (_r, t, d, pid, _names) = need!(start_mqueue("mqueue_lr", &[]), "mqueue_leave_running", "gcc not found");
    dump_ok(&[pid], &t.sub("img"), &["--leave-running"]);
    check(&d, pid, "after dump --leave-running");
}

/// A queue holding messages with an mq_notify registration is refused
/// (taking the messages and sending them back would fire it), naming pid,
/// fd and the reason; the process keeps its messages.
#[test]
fn mqueue_notify_with_messages_refused() {
    let _l = lock();
    let (_r, t, d, pid, _names) = need!(start_mqueue("mqueue_ref", &["refuse"]), "mqueue_notify_with_messages_refused", "gcc not found");
    let run = dump_raw(&[pid], &t.sub("img"), &[]);
    assert!(!run.ok(), "dump should have been refused: {}", run.describe());
    for w in [format!("pid {pid} fd 10"), "mq_notify".into()] {
        assert!(run.stderr.contains(&w), "error does not contain {w:?}: {}", run.stderr);
    }
    assert!(alive(pid) && status_field(pid, "TracerPid").as_deref() == Some("0"), "not left running untraced");
    check(&d, pid, "after the refused dump");
}

/// The watches of inotify fd 10 as fdinfo shows them (wd, inode, mask).
fn inotify_watches(pid: i32) -> Vec<String> {
    fdinfo_lines(pid, 10, &["inotify", "flags"]).iter().map(|l| l.split(" ignored_mask").next().unwrap().to_string()).collect()
}

/// Unread events of every replayable kind (open, access, close-nowrite,
/// close-write, modify, attrib; on a directory, its entries and a file
/// watched both itself and through its directory) come back in order after
/// dump and restore, with the watches' masks as they were.
#[test]
fn inotify_unread_events_restored() {
    let _l = lock();
    let (r, t, d, pid) = need!(start("anon_inotify_ev", "inotify_ev"), "inotify_unread_events_restored", "gcc not found");
    let before = inotify_watches(pid);
    assert_eq!(before.len(), 4, "fixture: {before:?}");
    dump_restore(&t, &r, pid);
    assert_eq!(before, inotify_watches(pid), "inotify watches differ after restore");
    check(&d, pid, "after restore");
}

/// With --leave-running the process still has every unread event, in order,
/// and its watches' masks.
#[test]
fn inotify_unread_events_leave_running() {
    let _l = lock();
    let (_r, t, d, pid) = need!(start("anon_inotify_ev", "inotify_ev_lr"), "inotify_unread_events_leave_running", "gcc not found");
    let before = inotify_watches(pid);
    dump_ok(&[pid], &t.sub("img"), &["--leave-running"]);
    assert_eq!(before, inotify_watches(pid), "inotify watches changed by the dump");
    check(&d, pid, "after dump --leave-running");
}

/// Events queued while a watch reports IN_CREATE (not replayable) are
/// refused before anything is read: the error names pid, fd, wd and the
/// event, and the process keeps its queue.
#[test]
fn inotify_unreplayable_events_refused() {
    let _l = lock();
    let bin = need!(fixture("anon_inotify_ev"), "inotify_unreplayable_events_refused", "gcc not found");
    let t = TempDir::new("inotify_ev_ref");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, Command::new(&bin).arg(&d).arg("refuse"), &t.join("log"));
    wait_ready(&d, pid, secs(30));
    let run = dump_raw(&[pid], &t.sub("img"), &[]);
    assert!(!run.ok(), "dump should have been refused: {}", run.describe());
    for w in [format!("pid {pid} fd 10"), "wd 1".into(), "IN_CREATE".into()] {
        assert!(run.stderr.contains(&w), "error does not contain {w:?}: {}", run.stderr);
    }
    assert!(alive(pid) && status_field(pid, "TracerPid").as_deref() == Some("0"), "not left running untraced");
    check(&d, pid, "after the refused dump");
}
