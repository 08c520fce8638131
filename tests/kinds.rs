//! Integration tests of /proc reading, memory mappings and descriptor kinds
//! on real processes. No ptrace: `pidfd_getfd` stands in for the parasite.
#![allow(clippy::unnecessary_cast)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snap::dump::{mm, proc};
use snap::images::records::{FileKind, ProcState, VmaKind};
use snap::kinds::{self, DumpCtx};
use snap::types::{Pid, RemoteFd};

/// Kills and reaps the child on drop.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Guard {
    fn pid(&self) -> Pid {
        Pid(self.0.id() as i32)
    }
}

/// Run a python3 script that prints one JSON line when ready, then sleeps.
fn python(script: &str) -> (Guard, serde_json::Value) {
    let full = format!("import os, sys, json, time, fcntl, mmap, ctypes, socket\n{script}\nsys.stdout.flush()\ntime.sleep(100)\n");
    let mut c = Command::new("python3")
        .arg("-c")
        .arg(full)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let out = c.stdout.take().unwrap();
    let g = Guard(c);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
    (g, v)
}

fn tmpdir(name: &str) -> String {
    let d = format!("/tmp/snap-kinds-test-{}-{name}", std::process::id());
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The parasite's stand-in: copies of the target's descriptors.
fn take_fds(pid: Pid, fds: &[i32]) -> Vec<(RemoteFd, OwnedFd)> {
    // SAFETY: test-only raw syscalls with integer arguments.
    let pidfd = unsafe { libc::syscall(434, pid.0, 0) };
    assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: pidfd_open returned a new descriptor that we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    fds.iter()
        .map(|&n| {
            // SAFETY: integer arguments only.
            let r = unsafe { libc::syscall(438, pidfd.as_raw_fd(), n, 0) };
            assert!(r >= 0, "pidfd_getfd {n}: {}", std::io::Error::last_os_error());
            // SAFETY: pidfd_getfd returned a new descriptor that we own.
            (RemoteFd(n), unsafe { OwnedFd::from_raw_fd(r as i32) })
        })
        .collect()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until `pid` has exec'd `comm` completely: comm changes early in
/// exec, the mm fields (arg_start..) only once the ELF is loaded.
fn wait_exec(pid: Pid, comm: &str) {
    wait_for("exec", || {
        proc::thread_comm(pid, snap::types::Tid(pid.0)).unwrap() == comm
            && proc::read_process(pid).is_ok_and(|p| p.mm.arg_end > p.mm.arg_start)
    });
}

fn getfl(fd: &OwnedFd) -> i32 {
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap()
}
fn tell(fd: &OwnedFd) -> i64 {
    nix::unistd::lseek(fd.as_raw_fd(), 0, nix::unistd::Whence::SeekCur).unwrap()
}

#[test]
fn read_process_sleep() {
    let g = Guard(Command::new("sleep").arg("100").spawn().unwrap());
    let pid = g.pid();
    wait_exec(pid, "sleep");
    let p = proc::read_process(pid).unwrap();
    assert_eq!(p.pid, pid.0);
    assert_eq!(p.ppid, std::process::id() as i32);
    assert_eq!(p.state, ProcState::Alive);
    assert_eq!(p.comm, "sleep");
    assert!(p.exe.ends_with("sleep"), "exe {}", p.exe);
    assert_eq!(p.cwd, std::env::current_dir().unwrap().to_string_lossy());
    assert_eq!(p.root, "/");
    assert_eq!(p.creds.uid, [0; 4]);
    assert_eq!(p.rlimits.len(), 16);
    // Inherited from us.
    let (s, h) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let nofile = p.rlimits.iter().find(|r| r.resource == libc::RLIMIT_NOFILE as u32).unwrap();
    assert_eq!((nofile.soft, nofile.hard), (s, h));
    assert!(p.mm.start_code < p.mm.end_code && p.mm.arg_start < p.mm.arg_end);
    assert!(p.mm.auxv.iter().any(|&(k, v)| k == libc::AT_PAGESZ && v == 4096));
    assert_eq!(proc::thread_ids(pid).unwrap(), vec![snap::types::Tid(pid.0)]);
    let me = proc::read_process(Pid(std::process::id() as i32)).unwrap();
    assert!(me.children.contains(&pid.0));
}

#[test]
fn read_process_nobody_with_limits() {
    let g = Guard(
        Command::new("prlimit")
            .args(["--nofile=123:456", "--core=0:unlimited", "--"])
            .args(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "100"])
            .spawn()
            .unwrap(),
    );
    let pid = g.pid();
    wait_exec(pid, "sleep");
    let p = proc::read_process(pid).unwrap();
    assert_eq!(p.creds.uid, [65534; 4]);
    assert_eq!(p.creds.gid, [65534; 4]);
    assert!(p.creds.groups.is_empty());
    assert_eq!(p.creds.cap_eff, 0);
    let lim = |r: i32| p.rlimits.iter().find(|x| x.resource == r as u32).map(|x| (x.soft, x.hard)).unwrap();
    assert_eq!(lim(libc::RLIMIT_NOFILE as i32), (123, 456));
    assert_eq!(lim(libc::RLIMIT_CORE as i32), (0, u64::MAX));
}

#[test]
fn read_process_zombie() {
    let mut c = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
    let pid = Pid(c.id() as i32);
    wait_for("zombie", || {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.0)).unwrap().contains(") Z ")
    });
    let p = proc::read_process(pid).unwrap();
    assert_eq!(p.state, ProcState::Zombie { wait_status: 3 << 8 });
    assert_eq!(p.exe, "");
    c.wait().unwrap();
}

#[test]
fn vmas_and_ranges() {
    let (g, v) = python(
        "b = bytearray(16 << 20)\n\
         for i in range(0, len(b), 4096): b[i] = 1\n\
         m = mmap.mmap(-1, 1 << 20)\n\
         m[0:4096] = b'x' * 4096\n\
         if os.fork() == 0:\n    m[8192] = 1\n    os._exit(0)\n\
         os.wait()\n\
         ba = ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b))\n\
         ma = ctypes.addressof(ctypes.c_char.from_buffer(m))\n\
         print(json.dumps({'b': ba, 'm': ma}))",
    );
    let pid = g.pid();
    let (ba, ma) = (v["b"].as_u64().unwrap(), v["m"].as_u64().unwrap());
    let vmas = mm::read_vmas(pid, None).unwrap();
    let find = |a: u64| vmas.iter().find(|x| x.start <= a && a < x.end).unwrap();

    let bv = find(ba);
    assert_eq!(bv.kind, VmaKind::Anon);
    let r = mm::dump_ranges(pid, &mm::open_pagemap(pid).unwrap(), bv).unwrap();
    let page = ba & !4095;
    let end = (ba + (16 << 20)) & !4095;
    assert!(
        r.iter().any(|&(s, l)| s <= page && s + l as u64 >= end),
        "16 MiB bytearray at {ba:#x} not in one saved run: {r:x?}"
    );

    let mv = find(ma);
    assert!(mv.shared);
    match mv.kind {
        VmaKind::SharedAnon { size, .. } => assert_eq!(size, 1 << 20),
        ref k => panic!("mmap(-1) is {k:?}"),
    }
    let r = mm::dump_ranges(pid, &mm::open_pagemap(pid).unwrap(), mv).unwrap();
    // Page 2 was written by a child only: still found, through the object.
    assert_eq!(r, vec![(ma, 4096), (ma + 8192, 4096)]);

    assert!(vmas.iter().any(|x| x.kind == VmaKind::Special { name: "[vdso]".into() }));
    assert!(vmas.iter().any(|x| x.growsdown));
    // A private file mapping that was never written has nothing to save.
    let lib = vmas
        .iter()
        .find(|x| matches!(&x.kind, VmaKind::File { file } if file.path.contains("libc")) && x.prot & 2 == 0)
        .unwrap();
    assert!(mm::dump_ranges(pid, &mm::open_pagemap(pid).unwrap(), lib).unwrap().is_empty());
    assert!(!mm::unreadable(bv));
}

#[test]
fn dump_and_restore_fds() {
    let dir = tmpdir("fds");
    let script = format!(
        "d = {dir:?}\n\
         f = open(d + '/regular', 'w+'); f.write('a' * 5000); f.flush(); os.lseek(f.fileno(), 1234, 0)\n\
         r, w = os.pipe(); fcntl.fcntl(w, 1031, 256 * 1024)\n\
         os.write(w, bytes(i % 251 for i in range(100 * 1024)))\n\
         os.set_blocking(r, False)\n\
         null = os.open('/dev/null', os.O_WRONLY | os.O_APPEND)\n\
         dl = open(d + '/deleted', 'w+'); dl.write('deleted content'); dl.flush(); os.lseek(dl.fileno(), 3, 0); os.unlink(d + '/deleted')\n\
         os.mkfifo(d + '/fifo'); ff = os.open(d + '/fifo', os.O_RDWR | os.O_NONBLOCK); os.write(ff, b'0123456789')\n\
         dn = os.open(d, os.O_RDONLY | os.O_DIRECTORY)\n\
         print(json.dumps([f.fileno(), r, w, null, dl.fileno(), ff, dn]))"
    );
    let (g, v) = python(&script);
    let pid = g.pid();
    let nums: Vec<i32> = v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
    let [freg, fr, fw, fnull, fdel, ffifo, fdir] = nums[..] else { panic!() };
    assert!(kinds::list_fds(pid).unwrap().contains(&RemoteFd(fdel)));

    let taken = take_fds(pid, &nums);
    let mut ctx = DumpCtx::new(false);
    let entries = ctx.dump_fds(pid, &taken).unwrap();
    let (image, blobs) = ctx.finish().unwrap();
    assert_eq!(entries.len(), 7);
    assert_eq!(image.files.len(), 7);
    let kind_of = |fd: i32| {
        let e = entries.iter().find(|e| e.fd == fd).unwrap();
        &image.files[e.file as usize]
    };
    assert!(entries.iter().all(|e| e.cloexec || e.fd == fnull || e.fd == ffifo || e.fd == fdir));
    match &kind_of(freg).kind {
        FileKind::Regular { file, pos } => {
            assert_eq!(*pos, 1234);
            assert_eq!(file.size, 5000);
            assert!(file.path.ends_with("/regular"));
        }
        k => panic!("{k:?}"),
    }
    assert!(matches!(kind_of(fdir).kind, FileKind::Regular { .. }));
    let pipe_id = match kind_of(fr).kind {
        FileKind::Pipe { pipe_id, write_end: false, buffered: 102400, pipe_size: 262144 } => pipe_id,
        ref k => panic!("{k:?}"),
    };
    assert!(matches!(kind_of(fw).kind, FileKind::Pipe { write_end: true, .. }));
    assert!(kind_of(fr).flags & libc::O_NONBLOCK as u32 != 0);
    assert!(matches!(&kind_of(fnull).kind, FileKind::CharDev { path, .. } if path == "/dev/null"));
    assert_eq!(kind_of(fnull).flags & (libc::O_ACCMODE | libc::O_APPEND) as u32, (libc::O_WRONLY | libc::O_APPEND) as u32);
    let del_blob = match &kind_of(fdel).kind {
        FileKind::Deleted { path, pos: 3, mode, blob } => {
            assert!(path.ends_with("/deleted (deleted)"));
            assert_eq!(*mode, 0o644);
            blob.clone()
        }
        k => panic!("{k:?}"),
    };
    assert!(matches!(&kind_of(ffifo).kind, FileKind::Fifo { buffered: 10, .. }));

    let blobs: HashMap<String, Vec<u8>> = blobs.into_iter().collect();
    let want: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(blobs[&format!("pipe-{pipe_id}.data")], want);
    assert_eq!(blobs[&del_blob], b"deleted content");
    // tee did not consume: the target's pipe still holds everything, and
    // the target's file positions are untouched.
    assert_eq!(snap::kinds::sys::fionread(std::os::fd::AsFd::as_fd(&taken[1].1)).unwrap(), 102400);
    assert_eq!(tell(&taken[0].1), 1234);
    assert_eq!(tell(&taken[4].1), 3);

    // Restore after the original is gone (the FIFO's buffer with it).
    drop(taken);
    drop(g);
    // No JSON round trip here: see `files_image_json_roundtrip` (i128 in a
    // tagged enum does not deserialize).
    let read_blob = |name: &str| blobs.get(name).cloned().ok_or_else(|| anyhow::anyhow!("no blob {name}"));
    let fds = kinds::restore_files(&image, &read_blob, false, false).unwrap();
    let by_fd = |fd: i32| &fds[&entries.iter().find(|e| e.fd == fd).unwrap().file];

    let reg = by_fd(freg);
    assert_eq!(tell(reg), 1234);
    assert_eq!(getfl(reg) & libc::O_ACCMODE, libc::O_RDWR);

    let (r, w) = (by_fd(fr), by_fd(fw));
    assert!(getfl(r) & libc::O_NONBLOCK != 0);
    assert!(getfl(w) & libc::O_NONBLOCK == 0);
    assert_eq!(getfl(w) & libc::O_ACCMODE, libc::O_WRONLY);
    assert_eq!(nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap(), 262144);
    let mut got = vec![0u8; 200 * 1024];
    let n = nix::unistd::read(r.as_raw_fd(), &mut got).unwrap();
    assert_eq!(&got[..n], &want[..], "pipe data differs");

    let null = by_fd(fnull);
    assert_eq!(getfl(null) & (libc::O_ACCMODE | libc::O_APPEND), libc::O_WRONLY | libc::O_APPEND);

    let del = by_fd(fdel);
    assert_eq!(tell(del), 3);
    let st = nix::sys::stat::fstat(del.as_raw_fd()).unwrap();
    assert_eq!((st.st_nlink, st.st_mode & 0o777, st.st_size), (0, 0o644, 15));
    let mut s = String::new();
    std::fs::File::open(format!("/proc/self/fd/{}", del.as_raw_fd())).unwrap().read_to_string(&mut s).unwrap();
    assert_eq!(s, "deleted content");

    let fifo = by_fd(ffifo);
    let mut buf = [0u8; 64];
    let n = nix::unistd::read(fifo.as_raw_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"0123456789");

    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shared_description_between_parent_and_child() {
    let dir = tmpdir("shared");
    let script = format!(
        "f = os.open({dir:?} + '/f', os.O_RDWR | os.O_CREAT); os.write(f, b'x' * 100)\n\
         d = os.dup(f)\n\
         pid = os.fork()\n\
         if pid == 0:\n    g = os.open({dir:?} + '/f', os.O_RDONLY)\n    print(json.dumps([os.getpid(), f, d, g])); sys.stdout.flush(); time.sleep(100)\n\
         else:\n    time.sleep(100)\n"
    );
    let (g, v) = python(&script);
    let parent = g.pid();
    let a: Vec<i32> = v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
    let child = Pid(a[0]);
    let _kill_child = scopeguard(child);
    let (f, d, other) = (a[1], a[2], a[3]);

    let mut ctx = DumpCtx::new(false);
    let pe = ctx.dump_fds(parent, &take_fds(parent, &[f, d])).unwrap();
    let ce = ctx.dump_fds(child, &take_fds(child, &[f, d, other])).unwrap();
    let (image, _) = ctx.finish().unwrap();
    assert_eq!(image.files.len(), 2, "{image:?}");
    let id = pe[0].file;
    assert!(pe.iter().chain(&ce[..2]).all(|e| e.file == id));
    assert_ne!(ce[2].file, id);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills a process we did not spawn directly (a grandchild) on drop.
struct KillOnDrop(Pid);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0.nix(), nix::sys::signal::Signal::SIGKILL);
    }
}
fn scopeguard(p: Pid) -> KillOnDrop {
    KillOnDrop(p)
}

#[test]
fn socket_refused_naming_pid_and_fd() {
    let (g, v) = python("s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nprint(json.dumps(s.fileno()))");
    let pid = g.pid();
    let fd = v.as_i64().unwrap() as i32;
    let mut ctx = DumpCtx::new(false);
    let err = ctx.dump_fds(pid, &take_fds(pid, &[fd])).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("pid {} fd {fd} (socket:[", pid.0)), "{msg}");
    assert!(msg.contains("sockets of family AF_NETLINK are not supported yet"), "{msg}");
}

/// A fresh Unix socket (socket() and nothing else) is described as a lone
/// socket with its type and options.
#[test]
fn fresh_unix_socket_is_lone() {
    let (g, v) = python("s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\ns.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)\nprint(json.dumps(s.fileno()))");
    let pid = g.pid();
    let fd = v.as_i64().unwrap() as i32;
    let mut ctx = DumpCtx::new(false);
    ctx.dump_fds(pid, &take_fds(pid, &[fd])).unwrap();
    let (image, _) = ctx.finish().unwrap();
    match &image.files[0].kind {
        FileKind::UnixLone { sock_type, name, rcvq, opts, .. } => {
            assert_eq!(*sock_type, libc::SOCK_SEQPACKET as u32);
            assert!(name.is_empty() && *rcvq == 0 && opts.passcred, "{image:?}");
        }
        k => panic!("{k:?}"),
    }
}

/// An anonymous inode no kind handles (a pidfd) is refused, naming it.
#[test]
fn pidfd_refused() {
    let (g, v) = python("fd = os.pidfd_open(os.getpid())\nprint(json.dumps(fd))");
    let pid = g.pid();
    let fd = v.as_i64().unwrap() as i32;
    let err = DumpCtx::new(false).dump_fds(pid, &take_fds(pid, &[fd])).unwrap_err();
    let msg = format!("{err:#}");
    // A pidfd is dumped only when its process is in the dump too (this
    // DumpCtx was told of no dumped process).
    assert!(msg.contains("anon_inode:[pidfd]") && msg.contains("not in the dump"), "{msg}");
}

/// records.rs has `FileId.mtime_ns: i128` inside internally tagged enums
/// (`FileKind`, `VmaKind`); serde buffers those through `Content`, which has
/// no i128, so such images serialize but do not load. Needs a shared-type fix
/// (e.g. `mtime_ns: i64`) by the owner of records.rs.
#[test]
fn files_image_json_roundtrip() {
    let st = nix::sys::stat::stat("/").unwrap();
    let image = snap::images::records::FilesImage {
        files: vec![snap::images::records::OpenFile {
            id: 0,
            flags: 0,
            kind: FileKind::Regular { file: snap::kinds::regular::file_id("/", &st), pos: 0 },
        }],
    };
    let json = serde_json::to_string(&image).unwrap();
    let back: snap::images::records::FilesImage = serde_json::from_str(&json).unwrap();
    assert_eq!(back, image);
}

/// Messages of a queue description, taken in receive order (consumes them).
fn mq_drain(fd: &OwnedFd) -> Vec<(u32, Vec<u8>)> {
    let a = snap::kinds::sys::mq_getattr(std::os::fd::AsFd::as_fd(fd)).unwrap();
    let mut buf = vec![0u8; a.msgsize as usize];
    let mut out = Vec::new();
    loop {
        match snap::kinds::sys::mq_receive_now(std::os::fd::AsFd::as_fd(fd), &mut buf) {
            Ok((n, prio)) => out.push((prio, buf[..n].to_vec())),
            Err(nix::errno::Errno::ETIMEDOUT) | Err(nix::errno::Errno::EAGAIN) => return out,
            Err(e) => panic!("mq_timedreceive: {e}"),
        }
    }
}

/// POSIX message queues: a named queue (two descriptions, O_NONBLOCK on
/// one), an unlinked write-only one; the dump leaves every message in
/// place in order, restore recreates both (the named one after it was
/// unlinked) with attributes, mode and messages in order.
#[test]
fn mqueue_roundtrip() {
    let tag = format!("snap-kt-{}", std::process::id());
    let (na, nb) = (format!("/{tag}-a"), format!("/{tag}-b"));
    let script = format!(
        "libc = ctypes.CDLL(None, use_errno=True)\n\
         class A(ctypes.Structure): _fields_ = [('f', ctypes.c_long), ('max', ctypes.c_long), ('size', ctypes.c_long), ('cur', ctypes.c_long), ('pad', ctypes.c_long * 4)]\n\
         def mq(name, fl, mode=0, mx=0, sz=0):\n\
         \x20   a = A(0, mx, sz, 0)\n\
         \x20   q = libc.mq_open(name.encode(), ctypes.c_int(fl), ctypes.c_uint(mode), ctypes.byref(a))\n\
         \x20   assert q >= 0, os.strerror(ctypes.get_errno())\n\
         \x20   return q\n\
         def send(q, m, p): assert libc.mq_send(q, m, ctypes.c_size_t(len(m)), ctypes.c_uint(p)) == 0, os.strerror(ctypes.get_errno())\n\
         os.umask(0)\n\
         a = mq({na:?}, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o640, 5, 32)\n\
         for m, p in [(b'one', 1), (b'two', 3), (b'three', 1), (b'', 0), (b'five', 3)]: send(a, m, p)\n\
         a2 = mq({na:?}, os.O_RDONLY)\n\
         b = mq({nb:?}, os.O_WRONLY | os.O_CREAT, 0o600, 3, 8)\n\
         send(b, b'x', 2); send(b, b'y', 2)\n\
         libc.mq_unlink({nb:?}.encode())\n\
         print(json.dumps([a, a2, b]))"
    );
    let (g, v) = python(&script);
    let pid = g.pid();
    let nums: Vec<i32> = v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
    let taken = take_fds(pid, &nums);
    let mut ctx = DumpCtx::new(false);
    ctx.set_dumped(&[pid]);
    let entries = ctx.dump_fds(pid, &taken).unwrap();
    let (image, blobs) = ctx.finish().unwrap();
    assert_eq!(image.files.len(), 3, "{image:?}");
    match &image.files[entries[0].file as usize].kind {
        FileKind::Mqueue { name, linked: true, maxmsg: 5, msgsize: 32, mode: 0o640, uid: 0, messages: 5, notify: None, .. } => {
            assert_eq!(name, &na)
        }
        k => panic!("{k:?}"),
    }
    match &image.files[entries[2].file as usize].kind {
        FileKind::Mqueue { name, linked: false, maxmsg: 3, msgsize: 8, mode: 0o600, messages: 2, .. } => assert_eq!(name, &nb),
        k => panic!("{k:?}"),
    }
    assert_eq!(blobs.len(), 2, "one blob per queue");
    // The target's descriptions are untouched (flags) and the queue still
    // holds its messages, checked at the end.
    assert!(getfl(&taken[0].1) & libc::O_NONBLOCK != 0);
    assert!(getfl(&taken[1].1) & libc::O_NONBLOCK == 0);

    // The name is gone at restore: the queue is created from the image.
    let cna = std::ffi::CString::new(na.clone()).unwrap();
    snap::kinds::sys::mq_unlink(&cna).unwrap();
    let blobs: HashMap<String, Vec<u8>> = blobs.into_iter().collect();
    let read_blob = |name: &str| blobs.get(name).cloned().ok_or_else(|| anyhow::anyhow!("no blob {name}"));
    let fds = kinds::restore_files(&image, &read_blob, false, false).unwrap();
    let by = |i: usize| &fds[&entries[i].file];
    let (ra, ra2, rb) = (by(0), by(1), by(2));
    assert_eq!(getfl(ra) & (libc::O_ACCMODE | libc::O_NONBLOCK), libc::O_RDWR | libc::O_NONBLOCK);
    assert_eq!(getfl(ra2) & (libc::O_ACCMODE | libc::O_NONBLOCK), libc::O_RDONLY);
    assert_eq!(getfl(rb) & (libc::O_ACCMODE | libc::O_NONBLOCK), libc::O_WRONLY);
    let st = |fd: &OwnedFd| nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
    assert_eq!(st(ra).st_ino, st(ra2).st_ino, "one queue, two descriptions");
    assert_eq!((st(ra).st_mode & 0o7777, st(ra).st_nlink), (0o640, 1));
    assert_eq!((st(rb).st_mode & 0o7777, st(rb).st_nlink), (0o600, 0), "unlinked again");
    let a = snap::kinds::sys::mq_getattr(std::os::fd::AsFd::as_fd(ra)).unwrap();
    assert_eq!((a.maxmsg, a.msgsize, a.curmsgs), (5, 32, 5));
    let want_a: Vec<(u32, Vec<u8>)> =
        [(3, "two"), (3, "five"), (1, "one"), (1, "three"), (0, "")].iter().map(|(p, m)| (*p, m.as_bytes().to_vec())).collect();
    assert_eq!(mq_drain(ra2), want_a, "restored named queue");
    let rb_read: OwnedFd =
        std::fs::File::open(format!("/proc/self/fd/{}", rb.as_raw_fd())).unwrap().into();
    assert_eq!(mq_drain(&rb_read), vec![(2, b"x".to_vec()), (2, b"y".to_vec())], "restored unlinked queue");
    // And the original still has everything, in order.
    assert_eq!(mq_drain(&taken[0].1), want_a, "original named queue after the dump");
    let orig_b: OwnedFd =
        std::fs::File::open(format!("/proc/self/fd/{}", taken[2].1.as_raw_fd())).unwrap().into();
    assert_eq!(mq_drain(&orig_b), vec![(2, b"x".to_vec()), (2, b"y".to_vec())], "original unlinked queue");
    drop(fds);
    let _ = snap::kinds::sys::mq_unlink(&cna);
}

/// A pseudo-terminal pair held by one process (master, two slave
/// descriptions): termios, window size, packet mode and TIOCEXCL come back
/// on a new pair, whose slaves reach the new master.
#[test]
fn pty_pair_roundtrip() {
    use snap::kinds::sys;
    use std::os::fd::AsFd;
    let script = "import termios, struct\n\
         m, s = os.openpty()\n\
         s2 = os.open(os.ttyname(s), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)\n\
         a = termios.tcgetattr(s); a[3] &= ~termios.ECHO; a[6][termios.VINTR] = 7; termios.tcsetattr(s, termios.TCSANOW, a)\n\
         fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack('HHHH', 33, 111, 0, 0))\n\
         fcntl.ioctl(m, termios.TIOCPKT, struct.pack('i', 1))\n\
         fcntl.ioctl(s, termios.TIOCEXCL)\n\
         print(json.dumps([m, s, s2]))";
    let (g, v) = python(script);
    let pid = g.pid();
    let nums: Vec<i32> = v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
    let taken = take_fds(pid, &nums);
    let lflag = sys::tcgets2(taken[1].1.as_fd()).unwrap().c_lflag;
    let mut ctx = DumpCtx::new(false);
    ctx.set_dumped(&[pid]);
    let entries = ctx.dump_fds(pid, &taken).unwrap();
    let (image, _) = ctx.finish().unwrap();
    assert_eq!(image.files.len(), 3, "{image:?}");
    let FileKind::PtyMaster { index, state, .. } = &image.files[entries[0].file as usize].kind else { panic!("{image:?}") };
    assert_eq!((state.winsize.rows, state.winsize.cols), (33, 111));
    assert!(state.packet && !state.locked);
    assert_eq!(state.session, 0);
    assert_eq!(state.termios.lflag, lflag);
    for e in &entries[1..] {
        assert!(matches!(&image.files[e.file as usize].kind, FileKind::PtySlave { index: i, exclusive: true, .. } if i == index));
    }
    // The target's pair is untouched.
    assert_eq!(sys::ioctl_get_int(taken[0].1.as_fd(), libc::TIOCGPKT).unwrap(), 1);
    drop(taken);
    drop(g);

    let fds = kinds::restore_files(&image, &|_| unreachable!("no blobs"), false, false).unwrap();
    let (m, s, s2) = (&fds[&entries[0].file], &fds[&entries[1].file], &fds[&entries[2].file]);
    let t = sys::tcgets2(s.as_fd()).unwrap();
    assert_eq!(t.c_lflag, lflag);
    assert_eq!(t.c_lflag & libc::ECHO, 0);
    assert_eq!(t.c_cc[libc::VINTR], 7);
    let w = sys::get_winsize(s.as_fd()).unwrap();
    assert_eq!((w.ws_row, w.ws_col), (33, 111));
    assert_eq!(sys::ioctl_get_int(m.as_fd(), libc::TIOCGPKT).unwrap(), 1);
    assert_eq!(sys::ioctl_get_int(s.as_fd(), libc::TIOCGEXCL).unwrap(), 1);
    assert_ne!(getfl(s2) & libc::O_NONBLOCK, 0);
    assert_eq!(getfl(s) & libc::O_NONBLOCK, 0);
    // Data from a slave reaches the master (packet mode: a 0 byte first).
    nix::unistd::write(s2, b"hi").unwrap();
    let mut buf = [0u8; 16];
    let n = nix::unistd::read(m.as_raw_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"\0hi");
}
