//! Parasite integration tests: real programs, seized, injected, cured.
//! Run as root: `cargo test --test parasite -- --nocapture`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use snap::parasite::{remote, Parasite};
use snap::sys::ptrace;
use snap::types::{Pid, RemoteAddr, RemoteFd, Tid};

/// Kills and reaps the program on drop, even when a test fails.
struct Proc {
    child: Child,
    out: Option<BufReader<ChildStdout>>,
    inp: Option<ChildStdin>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn");
        let out = child.stdout.take().map(BufReader::new);
        let inp = child.stdin.take();
        Proc { child, out, inp }
    }
    fn pid(&self) -> Pid {
        Pid(self.child.id() as i32)
    }
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.as_mut().unwrap().read_line(&mut s).expect("read line");
        s.trim_end().to_string()
    }
    fn send(&mut self, s: &str) {
        let i = self.inp.as_mut().unwrap();
        i.write_all(s.as_bytes()).unwrap();
        i.flush().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tids_of(pid: Pid) -> Vec<Tid> {
    let mut v: Vec<Tid> = std::fs::read_dir(format!("/proc/{}/task", pid.0))
        .unwrap()
        .map(|e| Tid(e.unwrap().file_name().to_str().unwrap().parse().unwrap()))
        .collect();
    v.sort();
    // Leader first.
    v.sort_by_key(|t| t.0 != pid.0);
    v
}

/// Seize and interrupt every thread; wait until each is in its event stop.
fn seize_all(pid: Pid) -> Vec<Tid> {
    let tids = tids_of(pid);
    for &t in &tids {
        ptrace::seize(t).unwrap();
        ptrace::interrupt(t).unwrap();
    }
    for &t in &tids {
        let st = ptrace::wait_stop(t).unwrap();
        assert!(st.is_event_stop(), "{t:?}: stop {:#x}", st.0);
    }
    tids
}

fn detach_all(tids: &[Tid]) {
    for &t in tids {
        ptrace::detach(t).unwrap();
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    maps: String,
    fds: BTreeMap<String, String>,
    regs: Vec<(i32, String)>,
    masks: Vec<(i32, u64)>,
}

fn snapshot(pid: Pid, tids: &[Tid]) -> Snapshot {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", pid.0)).unwrap();
    let mut fds = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{}/fd", pid.0)).unwrap() {
        let e = e.unwrap();
        let l = std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default();
        fds.insert(e.file_name().to_str().unwrap().to_string(), l);
    }
    let regs = tids.iter().map(|&t| (t.0, format!("{:?}", ptrace::get_regs(t).unwrap()))).collect();
    let masks = tids.iter().map(|&t| (t.0, ptrace::get_sigmask(t).unwrap())).collect();
    Snapshot { maps, fds, regs, masks }
}

const PY: &str = r#"
import os, signal, sys, threading, time
def h(s, f): pass
signal.signal(signal.SIGUSR1, h)
r, w = os.pipe()
def reader():
    d = os.read(r, 100)
    print("got", d.decode(), flush=True)
threading.Thread(target=reader).start()
threading.Thread(target=lambda: time.sleep(1000), daemon=True).start()
size = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 24
big = bytearray(os.urandom(1 << 16)) * (size >> 16)
f = open("/proc/self/status")
print("ready", r, w, f.fileno(), flush=True)
for line in sys.stdin:
    print("echo", line.strip(), flush=True)
"#;

fn python(size: usize) -> (Proc, i32, i32, i32) {
    let mut p = Proc::spawn(Command::new("python3").args(["-c", PY, &size.to_string()]));
    let l = p.line();
    let v: Vec<&str> = l.split_whitespace().collect();
    assert_eq!(v[0], "ready", "{l}");
    // Let the threads reach their blocking calls.
    std::thread::sleep(Duration::from_millis(300));
    (p, v[1].parse().unwrap(), v[2].parse().unwrap(), v[3].parse().unwrap())
}

/// Readable private anonymous ranges, split into runs of present pages.
fn present_anon_ranges(pid: Pid) -> Vec<(RemoteAddr, usize)> {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", pid.0)).unwrap();
    let pagemap = std::fs::File::open(format!("/proc/{}/pagemap", pid.0)).unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let perms = f[1];
        let name = f.get(5).copied().unwrap_or("");
        if !perms.starts_with('r') || !perms.ends_with('p') {
            continue;
        }
        if !(name.is_empty() || name == "[heap]" || name == "[stack]") {
            continue;
        }
        let (a, b) = f[0].split_once('-').unwrap();
        let (a, b) = (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
        let n = ((b - a) / 4096) as usize;
        let mut pm = vec![0u8; n * 8];
        use std::os::unix::fs::FileExt;
        pagemap.read_exact_at(&mut pm, a / 4096 * 8).unwrap();
        let mut run: Option<u64> = None;
        for i in 0..=n {
            let present = i < n && u64::from_ne_bytes(pm[i * 8..i * 8 + 8].try_into().unwrap()) >> 63 == 1;
            let addr = a + i as u64 * 4096;
            match (present, run) {
                (true, None) => run = Some(addr),
                (false, Some(s)) => {
                    out.push((RemoteAddr(s), (addr - s) as usize));
                    run = None;
                }
                _ => {}
            }
        }
    }
    out
}

#[test]
fn python_inject_dump_fds_sigactions_cure() {
    let (mut p, pipe_r, _pipe_w, status_fd) = python(16 << 20);
    let pid = p.pid();
    let tids = seize_all(pid);
    assert!(tids.len() >= 3, "expected python's threads, got {tids:?}");
    let before = snapshot(pid, &tids);
    let ranges = present_anon_ranges(pid);

    let mut par = Parasite::inject(pid, &tids).unwrap();

    // (a) pages equal /proc/PID/mem.
    let mut got = Vec::new();
    par.dump_pages(&ranges, &mut |b| {
        assert_eq!(b.len() % 4096, 0);
        got.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    let mut want = Vec::new();
    for &(a, l) in &ranges {
        let mut b = vec![0u8; l];
        remote::read_mem(pid, a, &mut b).unwrap();
        want.extend_from_slice(&b);
    }
    assert_eq!(got.len(), want.len());
    assert!(got == want, "dumped pages differ from /proc/PID/mem");
    assert!(got.len() >= 16 << 20);

    // (b) fds refer to the same files.
    let fds = [RemoteFd(0), RemoteFd(1), RemoteFd(pipe_r), RemoteFd(status_fd)];
    let ours = par.take_fds(&fds).unwrap();
    assert_eq!(ours.len(), fds.len());
    for (rf, of) in fds.iter().zip(&ours) {
        let theirs = std::fs::metadata(format!("/proc/{}/fd/{}", pid.0, rf.0)).unwrap();
        let mine = std::fs::metadata(format!("/proc/self/fd/{}", of.as_raw_fd())).unwrap();
        assert_eq!((theirs.dev(), theirs.ino()), (mine.dev(), mine.ino()), "fd {}", rf.0);
    }
    // More than one batch of 16.
    let many: Vec<RemoteFd> = (0..40).map(|i| fds[i % fds.len()]).collect();
    assert_eq!(par.take_fds(&many).unwrap().len(), 40);
    assert!(par.take_fds(&[RemoteFd(999)]).is_err());
    drop(ours);

    // (c) handlers: SIGUSR1 and SIGINT are Python's; SIGTERM default.
    let acts = par.sigactions().unwrap();
    assert_eq!(acts.len(), 64);
    assert!(acts[libc::SIGUSR1 as usize - 1].handler > 1);
    assert!(acts[libc::SIGINT as usize - 1].handler > 1);
    assert_eq!(acts[libc::SIGTERM as usize - 1].handler, 0);
    assert_eq!(acts[libc::SIGPIPE as usize - 1].handler, 1); // python ignores SIGPIPE

    // A signal sent while the parasite is in stays pending (all blocked),
    // and the parasite keeps working.
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid.0, libc::SIGUSR1) }, 0);
    assert_eq!(par.sigactions().unwrap().len(), 64);

    // Misc state.
    let it = par.itimers().unwrap();
    assert_eq!(it.real.value_us, 0);
    for &t in &tids {
        let (ss, ctid) = par.thread_misc(t).unwrap();
        assert!(ctid != 0, "{t:?} clear_child_tid");
        let _ = ss;
    }
    let brk = par.syscall(tids[1], libc::SYS_brk, [0; 6]).unwrap();
    assert!(brk > 0);
    let dumpable = par.syscall(tids[0], libc::SYS_prctl, [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!(dumpable, 1);
    let (s, l) = par.scratch();
    assert!(s.0 != 0 && l >= 65536);

    // (d) no trace after cure.
    par.cure().unwrap();
    let after = snapshot(pid, &tids);
    assert_eq!(before, after);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.0)).unwrap();
    let shd = status.lines().find_map(|l| l.strip_prefix("ShdPnd:")).unwrap().trim();
    assert_ne!(u64::from_str_radix(shd, 16).unwrap() & (1 << (libc::SIGUSR1 - 1)), 0, "SIGUSR1 pending");
    detach_all(&tids);

    // Still alive: main thread answers, and (e) the reader thread blocked in
    // read() on the pipe gets the data.
    p.send("hello\n");
    assert_eq!(p.line(), "echo hello");
    let mut w = std::fs::OpenOptions::new().write(true).open(format!("/proc/{}/fd/{}", pid.0, _pipe_w)).unwrap();
    w.write_all(b"ping").unwrap();
    assert_eq!(p.line(), "got ping");
}

#[test]
fn sleep_cure_leaves_no_trace_and_drop_cures() {
    let p = Proc::spawn(Command::new("sleep").arg("1000"));
    std::thread::sleep(Duration::from_millis(200));
    let pid = p.pid();
    let tids = seize_all(pid);
    let before = snapshot(pid, &tids);
    let mut par = Parasite::inject(pid, &tids).unwrap();
    let acts = par.sigactions().unwrap();
    assert!(acts.iter().all(|a| a.handler <= 1));
    let ranges = present_anon_ranges(pid);
    let mut n = 0;
    par.dump_pages(&ranges, &mut |b| {
        n += b.len();
        Ok(())
    })
    .unwrap();
    assert_eq!(n, ranges.iter().map(|r| r.1).sum::<usize>());
    drop(par); // Drop cures too.
    assert_eq!(before, snapshot(pid, &tids));
    detach_all(&tids);
    std::thread::sleep(Duration::from_millis(200));
    let st = std::fs::read_to_string(format!("/proc/{}/stat", pid.0)).unwrap();
    assert!(st.contains(") S "), "sleep should sleep on: {st}");
}

#[test]
fn remote_syscall_in_blocked_thread() {
    let p = Proc::spawn(Command::new("sleep").arg("1000"));
    std::thread::sleep(Duration::from_millis(200));
    let pid = p.pid();
    let tids = seize_all(pid);
    let t = tids[0];
    let regs = ptrace::get_regs(t).unwrap();
    let at = remote::find_syscall_insn(pid).unwrap();
    let r = remote::syscall_in(t, at, libc::SYS_getpid, [0; 6]).unwrap();
    assert_eq!(r, pid.0 as i64);
    let r = remote::syscall_in(t, at, libc::SYS_close, [9999, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!(r, -libc::EBADF as i64);
    assert_eq!(format!("{:?}", regs), format!("{:?}", ptrace::get_regs(t).unwrap()));
    // From a syscall-exit stop (as restore uses it).
    let r = remote::syscall_in_keep(t, at, libc::SYS_getpid, [0; 6]).unwrap();
    assert_eq!(r, pid.0 as i64);
    let r = remote::syscall_in(t, at, libc::SYS_getppid, [0; 6]).unwrap();
    assert_eq!(r, std::process::id() as i64);
    ptrace::set_regs(t, &regs).unwrap();
    assert!(remote::needs_restart(&regs), "sleep should be in an interrupted nanosleep");
    remote::park(t).unwrap();
    assert_eq!(format!("{:?}", regs), format!("{:?}", ptrace::get_regs(t).unwrap()));
    assert!(ptrace::get_xstate(t).unwrap().len() >= 512);
    assert!(ptrace::peek_siginfo(t, true).unwrap().is_empty());
    let _ = ptrace::rseq_config(t).unwrap();
    let _ = ptrace::get_robust_list(t).unwrap();
    detach_all(&tids);
    std::thread::sleep(Duration::from_millis(200));
    let st = std::fs::read_to_string(format!("/proc/{}/stat", pid.0)).unwrap();
    assert!(st.contains(") S "), "sleep should sleep on: {st}");
}

#[test]
fn dump_pages_throughput() {
    let size: usize = std::env::var("SNAP_BENCH_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024) << 20;
    let (_p, _, _, _) = python(size);
    let pid = _p.pid();
    let tids = seize_all(pid);
    let ranges = present_anon_ranges(pid);
    let total: usize = ranges.iter().map(|r| r.1).sum();
    let mut par = Parasite::inject(pid, &tids).unwrap();
    let mut sum = 0u64;
    let mut n = 0usize;
    let t0 = Instant::now();
    par.dump_pages(&ranges, &mut |b| {
        n += b.len();
        for c in b.chunks_exact(8) {
            sum = sum.wrapping_add(u64::from_ne_bytes(c.try_into().unwrap()));
        }
        Ok(())
    })
    .unwrap();
    let dt = t0.elapsed();
    assert_eq!(n, total);
    eprintln!(
        "dump_pages: {} MiB in {} ranges in {:.3}s = {:.2} GB/s (sum {sum:x})",
        total >> 20,
        ranges.len(),
        dt.as_secs_f64(),
        total as f64 / dt.as_secs_f64() / 1e9
    );
    // Many small ranges: one page each.
    let pages: Vec<(RemoteAddr, usize)> =
        ranges.iter().flat_map(|&(a, l)| (0..l / 4096).map(move |i| (RemoteAddr(a.0 + i as u64 * 4096), 4096))).take(20000).collect();
    let t0 = Instant::now();
    let mut m = 0;
    par.dump_pages(&pages, &mut |b| {
        m += b.len();
        Ok(())
    })
    .unwrap();
    assert_eq!(m, pages.len() * 4096);
    eprintln!("dump_pages: {} single-page ranges in {:.3}s", pages.len(), t0.elapsed().as_secs_f64());
    par.cure().unwrap();
    detach_all(&tids);
}

#[test]
fn sigtrap_ignored_and_blocked_is_left_alone() {
    let code = "import signal,time\nsignal.signal(signal.SIGTRAP, signal.SIG_IGN)\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTRAP])\nprint('ready', 0, 0, 0, flush=True)\ntime.sleep(1000)\n";
    let mut p = Proc::spawn(Command::new("python3").args(["-c", code]));
    assert!(p.line().starts_with("ready"));
    std::thread::sleep(Duration::from_millis(200));
    let pid = p.pid();
    let tids = seize_all(pid);
    let before = snapshot(pid, &tids);
    let ign = |pid: Pid| {
        let s = std::fs::read_to_string(format!("/proc/{}/status", pid.0)).unwrap();
        s.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap().trim().to_string()
    };
    let ign_before = ign(pid);
    let mut par = Parasite::inject(pid, &tids).unwrap();
    let acts = par.sigactions().unwrap();
    assert_eq!(acts[libc::SIGTRAP as usize - 1].handler, 1);
    let acts = par.sigactions().unwrap();
    assert_eq!(acts[libc::SIGTRAP as usize - 1].handler, 1);
    par.cure().unwrap();
    assert_eq!(before, snapshot(pid, &tids));
    assert_eq!(ign_before, ign(pid));
    detach_all(&tids);
}
