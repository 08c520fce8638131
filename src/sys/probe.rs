//! Feature probes for `snap check`: each really exercises the feature (on
//! this process, or on a short-lived child it makes) rather than trusting
//! version numbers. Raw system calls without a `nix` wrapper live here, in
//! small `unsafe` blocks, with the rest of the system-call layer.
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

pub type Probe = std::result::Result<String, String>;

fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

fn have_cap(c: caps::Capability) -> bool {
    caps::has_cap(None, caps::CapSet::Effective, c).unwrap_or(false)
}

/// A child that just sleeps, killed and reaped on drop.
struct Sleeper(std::process::Child);
impl Sleeper {
    fn new() -> std::result::Result<Self, String> {
        Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map(Sleeper)
            .map_err(|e| format!("cannot start a test child (sleep): {e}"))
    }
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }
}
impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PTRACE_SEIZE + PTRACE_INTERRUPT, then PTRACE_GET_RSEQ_CONFIGURATION on
/// the stopped child.
pub fn probe_ptrace() -> (Probe, Probe) {
    use nix::sys::ptrace;
    use nix::sys::wait::{waitpid, WaitStatus};
    let child = match Sleeper::new() {
        Ok(c) => c,
        Err(e) => return (Err(e.clone()), Err(e)),
    };
    // Give glibc in the child time to register rseq.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let pid = child.pid();
    if let Err(e) = ptrace::seize(pid, ptrace::Options::empty()) {
        let m = format!("PTRACE_SEIZE failed: {e}");
        return (Err(m.clone()), Err(m));
    }
    let seize = match ptrace::interrupt(pid).map_err(|e| e.to_string()).and_then(|_| {
        waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL)).map_err(|e| e.to_string())
    }) {
        Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::Stopped(..)) => Ok("seized and interrupted a child".to_string()),
        Ok(s) => Err(format!("unexpected wait status after PTRACE_INTERRUPT: {s:?}")),
        Err(e) => Err(format!("PTRACE_INTERRUPT: {e}")),
    };
    // struct ptrace_rseq_configuration: u64 addr; u32 len, sig, flags, pad.
    let mut conf = [0u64; 3];
    const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
    // SAFETY: the request writes at most size_of_val(&conf) bytes (passed as
    // `addr`) into `conf`, which lives across the call.
    let r = unsafe {
        libc::ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid.as_raw(), std::mem::size_of_val(&conf), conf.as_mut_ptr())
    };
    let rseq = if r >= 0 {
        if conf[0] != 0 {
            Ok(format!("child's rseq area at {:#x}, {} bytes", conf[0], conf[1] as u32))
        } else {
            Ok("works (the child has no rseq registered)".to_string())
        }
    } else {
        Err(format!("PTRACE_GET_RSEQ_CONFIGURATION: {}", errno_str()))
    };
    let _ = ptrace::detach(pid, None);
    drop(child);
    (seize, rseq)
}

/// clone3 with set_tid: make a child with a chosen free PID that exits at once.
pub fn probe_clone3_set_tid() -> Probe {
    let cap = have_cap(caps::Capability::CAP_CHECKPOINT_RESTORE) || have_cap(caps::Capability::CAP_SYS_ADMIN);
    if !cap {
        return Err("needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN".into());
    }
    let last: i64 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1000);
    let max: i64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let mut last_err = String::from("no free PID found to try");
    for k in 0..20i64 {
        let want = (last + 500 + k * 37) % max.max(400);
        if want < 300 || std::path::Path::new(&format!("/proc/{want}")).exists() {
            continue;
        }
        let tids = [want as libc::pid_t];
        // struct clone_args (11 u64 words, CLONE_ARGS_SIZE_VER2).
        let mut args = [0u64; 11];
        args[4] = libc::SIGCHLD as u64; // exit_signal
        args[8] = tids.as_ptr() as u64; // set_tid
        args[9] = 1; // set_tid_size
        // SAFETY: a fork-like clone3 (no CLONE_VM): the child runs on its own
        // copy of memory and only calls exit_group; `args` and `tids` outlive
        // the call in the parent.
        let r = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), std::mem::size_of_val(&args)) };
        if r == 0 {
            // SAFETY: in the child: leave at once without running any Rust code.
            unsafe { libc::syscall(libc::SYS_exit_group, 0) };
        }
        if r > 0 {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(r as i32), None);
            return if r == want {
                Ok(format!("made a child with chosen PID {want}"))
            } else {
                Err(format!("asked for PID {want}, got {r}"))
            };
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            last_err = format!("PID {want} was taken meanwhile");
            continue;
        }
        return Err(format!("clone3 with set_tid: {e}"));
    }
    Err(last_err)
}

pub fn probe_kcmp() -> Probe {
    let me = std::process::id() as libc::pid_t;
    let f = std::fs::File::open("/proc/self/stat").map_err(|e| e.to_string())?;
    const KCMP_FILE: libc::c_int = 0;
    let fd = f.as_raw_fd() as libc::c_ulong;
    // SAFETY: kcmp compares kernel objects by id; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, me, me, KCMP_FILE, fd, fd) };
    match r {
        0 => Ok("compared a file with itself".into()),
        r if r > 0 => Err(format!("kcmp said a file differs from itself ({r})")),
        _ => Err(format!("kcmp: {}", errno_str())),
    }
}

pub fn probe_process_vm_readv() -> Probe {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    let src = vec![0x5au8; 4096];
    let mut dst = vec![0u8; 4096];
    let remote = [RemoteIoVec { base: src.as_ptr() as usize, len: src.len() }];
    let mut local = [std::io::IoSliceMut::new(&mut dst)];
    match process_vm_readv(nix::unistd::getpid(), &mut local, &remote) {
        Ok(4096) if dst == src => Ok("read 4 KiB of this process".into()),
        Ok(n) => Err(format!("short or wrong read ({n} bytes)")),
        Err(e) => Err(format!("process_vm_readv: {e}")),
    }
}

pub fn probe_vmsplice() -> Probe {
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let buf = vec![7u8; 4096];
    let iov = [std::io::IoSlice::new(&buf)];
    let n = nix::fcntl::vmsplice(&w, &iov, nix::fcntl::SpliceFFlags::empty()).map_err(|e| format!("vmsplice: {e}"))?;
    let mut out = vec![0u8; 4096];
    let m = nix::unistd::read(r.as_raw_fd(), &mut out).map_err(|e| format!("read back: {e}"))?;
    if n == 4096 && m == 4096 && out == buf {
        Ok("spliced 4 KiB into a pipe".into())
    } else {
        Err(format!("vmsplice moved {n} bytes, read {m}"))
    }
}

/// userfaultfd (user-mode only) with WP_ASYNC + WP_UNPOPULATED, then one
/// PAGEMAP_SCAN ioctl on /proc/self/pagemap.
pub fn probe_uffd_pagemap_scan() -> Probe {
    use super::uffd;
    // SAFETY: plain system call; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC as u64 | uffd::UFFD_USER_MODE_ONLY) };
    if fd < 0 {
        return Err(format!("userfaultfd(UFFD_USER_MODE_ONLY): {}", errno_str()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    uffd::api_wp_async(fd.as_fd()).map_err(|e| format!("{e:#}"))?;
    let pm = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let buf = vec![1u8; 4 * 4096];
    let start = (buf.as_ptr() as u64 + 4095) & !4095;
    let r = uffd::scan(pm.as_fd(), start, start + 2 * 4096, 0, 0, 0, uffd::PAGE_IS_PRESENT);
    drop(buf);
    let r = r.map_err(|e| format!("{e:#}"))?;
    Ok(format!("uffd WP_ASYNC accepted; PAGEMAP_SCAN returned {} region(s)", r.len()))
}

/// CONFIG_MEM_SOFT_DIRTY: clear, write a page, look for bit 55.
pub fn probe_soft_dirty() -> Probe {
    use std::io::{Read, Seek, SeekFrom};
    std::fs::write("/proc/self/clear_refs", "4").map_err(|e| format!("writing 4 to /proc/self/clear_refs: {e}"))?;
    let mut page = vec![0u8; 8192];
    let addr = (page.as_ptr() as usize + 4095) & !4095;
    let off = addr - page.as_ptr() as usize;
    page[off] = 1;
    std::hint::black_box(&page);
    let mut f = std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
    f.seek(SeekFrom::Start((addr / 4096 * 8) as u64)).map_err(|e| e.to_string())?;
    let mut e = [0u8; 8];
    f.read_exact(&mut e).map_err(|e| e.to_string())?;
    let entry = u64::from_le_bytes(e);
    if entry & (1 << 55) != 0 {
        Ok("pagemap bit 55 set after a write".into())
    } else {
        Err("pagemap bit 55 stays clear after a write (CONFIG_MEM_SOFT_DIRTY off)".into())
    }
}

pub fn probe_pidfd() -> Probe {
    // SAFETY: plain system call returning a new fd or -1.
    let pfd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id() as libc::pid_t, 0) };
    if pfd < 0 {
        return Err(format!("pidfd_open: {}", errno_str()));
    }
    // SAFETY: fresh fd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pfd as i32) };
    // SAFETY: plain system call; duplicates our own pidfd, returns an fd or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), pidfd.as_raw_fd(), 0) };
    if got < 0 {
        return Err(format!("pidfd_getfd: {}", errno_str()));
    }
    // SAFETY: fresh fd we own; closed on drop.
    drop(unsafe { OwnedFd::from_raw_fd(got as i32) });
    Ok("pidfd_open and pidfd_getfd work".into())
}

pub fn probe_prctl_mm_map() -> Probe {
    const PR_SET_MM: libc::c_int = 35;
    const PR_SET_MM_MAP_SIZE: libc::c_ulong = 15;
    let mut size: libc::c_uint = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes one unsigned int at the pointer.
    let r = unsafe { libc::prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, &mut size as *mut libc::c_uint, 0, 0) };
    if r == 0 {
        Ok(format!("struct prctl_mm_map is {size} bytes"))
    } else {
        Err(format!("prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE): {}", errno_str()))
    }
}

pub fn probe_tcp_repair() -> Probe {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let s = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|e| format!("socket: {e}"))?;
    const TCP_REPAIR: libc::c_int = 19;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int from `one`.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok("TCP_REPAIR set on a fresh socket".into())
    } else {
        Err(format!("setsockopt(TCP_REPAIR): {} (needs CAP_NET_ADMIN)", errno_str()))
    }
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in mi.lines() {
        // ... mount_point ... - fstype source options
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next() == Some("cgroup2") {
            return pre.split_whitespace().nth(4).map(str::to_string);
        }
    }
    None
}

pub fn probe_cgroup2() -> Probe {
    let mnt = cgroup2_mount().ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
    // cgroup.freeze exists in every non-root cgroup: look in ours, then in
    // the mount's first-level children.
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
    let mut candidates = Vec::new();
    if let Some(p) = own.filter(|p| p != "/") {
        candidates.push(format!("{mnt}{p}"));
    }
    if let Ok(rd) = std::fs::read_dir(&mnt) {
        candidates.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path().display().to_string()));
    }
    let freezer = candidates.iter().any(|c| std::path::Path::new(&format!("{c}/cgroup.freeze")).exists());
    if freezer {
        Ok(format!("cgroup v2 at {mnt}, with cgroup.freeze"))
    } else if candidates.is_empty() {
        Ok(format!("cgroup v2 at {mnt} (no child cgroup to confirm cgroup.freeze)"))
    } else {
        Err(format!("cgroup v2 at {mnt} but no cgroup.freeze (kernel < 5.2?)"))
    }
}

pub fn probe_namespaces() -> Probe {
    use nix::sched::CloneFlags;
    use nix::sys::wait::{waitpid, WaitStatus};
    // SAFETY: the child only calls unshare and _exit (async-signal-safe),
    // so forking a multi-threaded process is fine.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let ok = nix::sched::unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNET).is_ok();
            // SAFETY: leave the forked child without running destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok("unshare(CLONE_NEWPID|CLONE_NEWNET) works in a child".into()),
            Ok(s) => Err(format!("unshare(CLONE_NEWPID|CLONE_NEWNET) failed in a child ({s:?})")),
            Err(e) => Err(format!("waitpid: {e}")),
        },
        Err(e) => Err(format!("fork: {e}")),
    }
}

pub fn probe_sys_resource() -> Probe {
    if have_cap(caps::Capability::CAP_SYS_RESOURCE) {
        Ok("CAP_SYS_RESOURCE is in the effective set".into())
    } else {
        Err("CAP_SYS_RESOURCE absent: prlimit on other users' processes fails; snap reads /proc/PID/limits instead".into())
    }
}


/// `/proc/sys/kernel/{shm,sem,msg}_next_id` (CONFIG_CHECKPOINT_RESTORE),
/// used as restore uses them: on a thread of its own in a new IPC namespace
/// (so nothing here changes), each is set to an id and an object of that
/// kind is created, which must get exactly that id. Without the right to
/// make an IPC namespace, the files are only opened for writing (this
/// kernel refuses to write -1, their idle value, and any other value would
/// choose the id of the next object someone else creates).
pub fn probe_sysv_next_id() -> Probe {
    use super::ipc;
    const ID: i32 = 4242;
    let made = std::thread::spawn(|| -> Probe {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC) {
            return Err(format!("unshare(CLONE_NEWIPC): {e}"));
        }
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;
        for kind in ["shm", "sem", "msg"] {
            let path = format!("/proc/sys/kernel/{kind}_next_id");
            std::fs::write(&path, ID.to_string()).map_err(|e| format!("writing {ID} to {path} in a new IPC namespace: {e}"))?;
            let id = match kind {
                "shm" => ipc::shmget(libc::IPC_PRIVATE, 4096, flags),
                "sem" => ipc::semget(libc::IPC_PRIVATE, 1, flags),
                _ => ipc::msgget(libc::IPC_PRIVATE, flags),
            }
            .map_err(|e| format!("creating a {kind} object with next_id {ID}: {e}"))?;
            let _ = match kind {
                "shm" => ipc::shm_cmd(id, libc::IPC_RMID),
                "sem" => ipc::sem_int(id, 0, libc::IPC_RMID, 0).map(drop),
                _ => ipc::msg_rmid(id),
            };
            if id != ID {
                return Err(format!("{path} set to {ID}, the {kind} object got id {id}"));
            }
        }
        Ok(format!("shm, sem and msg objects created with chosen id {ID} (in a new IPC namespace)"))
    })
    .join()
    .unwrap_or_else(|_| Err("the probe thread panicked".into()));
    match made {
        Err(e) if e.starts_with("unshare") => {
            for kind in ["shm", "sem", "msg"] {
                let path = format!("/proc/sys/kernel/{kind}_next_id");
                std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| format!("opening {path} for writing: {e}"))?;
            }
            Ok(format!("shm_next_id, sem_next_id and msg_next_id open for writing (not tried: {e})"))
        }
        r => r,
    }
}

/// TFD_IOC_SET_TICKS on a fresh timerfd, read back with read(2).
pub fn probe_timerfd_set_ticks() -> Probe {
    use crate::kinds::sys::{timerfd_create, timerfd_set_ticks};
    let fd = timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK).map_err(|e| format!("timerfd_create: {e}"))?;
    match timerfd_set_ticks(fd.as_fd(), 3) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOTTY) => return Err("TFD_IOC_SET_TICKS: ENOTTY (kernel without CONFIG_CHECKPOINT_RESTORE)".into()),
        Err(e) => return Err(format!("TFD_IOC_SET_TICKS: {e}")),
    }
    let mut b = [0u8; 8];
    let n = nix::unistd::read(fd.as_raw_fd(), &mut b).map_err(|e| format!("reading the timerfd back: {e}"))?;
    match (n, u64::from_ne_bytes(b)) {
        (8, 3) => Ok("a fresh timerfd set to 3 expirations reads back 3".into()),
        (n, v) => Err(format!("a timerfd set to 3 expirations read back {v} ({n} bytes)")),
    }
}

/// msgrcv(MSG_COPY | IPC_NOWAIT) on a fresh private queue holding one
/// message: the copy matches and the message stays queued. The queue is
/// removed after.
pub fn probe_msg_copy() -> Probe {
    use super::ipc;
    let id = ipc::msgget(libc::IPC_PRIVATE, libc::IPC_CREAT | 0o600).map_err(|e| format!("msgget(IPC_PRIVATE): {e}"))?;
    let r = (|| {
        ipc::msgsnd(id, 7, b"snap").map_err(|e| format!("msgsnd: {e}"))?;
        let (mtype, text) = ipc::msg_copy(id, 0, 16).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS) => "msgrcv(MSG_COPY): ENOSYS (kernel without CONFIG_CHECKPOINT_RESTORE)".to_string(),
            _ => format!("msgrcv(MSG_COPY): {e}"),
        })?;
        if mtype != 7 || text != b"snap" {
            return Err(format!("MSG_COPY returned type {mtype}, {} bytes: not the message sent", text.len()));
        }
        let left = ipc::msg_stat(id).map_err(|e| format!("msgctl(IPC_STAT): {e}"))?;
        if left.qnum != 1 {
            return Err(format!("after MSG_COPY the queue holds {} messages, not 1", left.qnum));
        }
        Ok("copied a message of a private queue, which kept it".to_string())
    })();
    let _ = ipc::msg_rmid(id);
    r
}

/// PAGEMAP_SCAN (Linux 6.7+) over two pages of this process, one written:
/// the written page is reported present.
pub fn probe_pagemap_scan() -> Probe {
    let pm = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut buf = vec![0u8; 3 * 4096];
    let start = (buf.as_ptr() as u64 + 4095) & !4095;
    let off = (start - buf.as_ptr() as u64) as usize;
    buf[off] = 1;
    std::hint::black_box(&buf);
    let r = super::uffd::scan_raw(pm.as_fd(), start, start + 4096, 0, 0, 0, super::uffd::PAGE_IS_PRESENT);
    drop(buf);
    match r {
        Ok(regs) if regs.iter().any(|r| r.0 <= start && start < r.1 && r.2 & super::uffd::PAGE_IS_PRESENT != 0) => {
            Ok("PAGEMAP_SCAN reports a written page present".into())
        }
        Ok(regs) => Err(format!("PAGEMAP_SCAN did not report a written page present ({} region(s))", regs.len())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Err("PAGEMAP_SCAN: ENOTTY (Linux < 6.7)".into()),
        Err(e) => Err(format!("PAGEMAP_SCAN: {e}")),
    }
}
