//! Remote system calls and the injected parasite blob.
//!
//! [`Parasite::inject`] maps one anonymous area in the stopped target
//! (remote `mmap(NULL)`), writes the relocated blob there and sets up the
//! transport: the target makes a pipe (pages) and a `SOCK_SEQPACKET`
//! socketpair (descriptors) with remote system calls; we take the read end
//! and one socket end with `pidfd_getfd` and close them in the target. Blob
//! commands are one-shot: we write an [`Args`] block, point the leader at
//! the blob entry and `PTRACE_CONT`; the blob ends on `int3`.
//!
//! While the parasite is in, every thread blocks every signal but SIGTRAP
//! (so no handler runs and no signal stop interferes; SIGTRAP must stay
//! unblocked, else the kernel resets its disposition on our `int3`), and
//! [`Parasite::cure`] puts back masks, registers, fds and mappings.

pub mod blob;
pub mod remote;

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

use crate::images::records::{ITimerVal, ITimers, SigAction, SigAltStack};
use crate::sys::ptrace;
use crate::types::{Pid, RemoteAddr, RemoteFd, Tid, PAGE_SIZE};

/// Command block shared with the blob (see `blob/blob.rs`).
const CMD_VMSPLICE: u64 = 1;
const CMD_SENDFDS: u64 = 2;
const CMD_SIGACTIONS: u64 = 3;
const RET_UNSET: i64 = i64::MIN;

/// Layout of the parasite area after the blob.
const ARGS_LEN: usize = PAGE_SIZE; // Args at +0, sigactions at +256, fds at +2560
const ARGS_SIGACT: u64 = 256;
const ARGS_FDS: u64 = 2560;
const IOV_LEN: usize = 64 * 1024;
const MAX_IOVS: usize = IOV_LEN / 16;
const SCRATCH_LEN: usize = 64 * 1024;
const STACK_LEN: usize = 64 * 1024;
const PIPE_SIZE: i32 = 1 << 20;
const FD_BATCH: usize = 16;

const NR_MMAP: i64 = 9;
const NR_MUNMAP: i64 = 11;
const NR_RT_SIGACTION: i64 = 13;
const NR_CLOSE: i64 = 3;
const NR_GETITIMER: i64 = 36;
const NR_SOCKETPAIR: i64 = 53;
const NR_SIGALTSTACK: i64 = 131;
const NR_PRCTL: i64 = 157;
const NR_PIPE2: i64 = 293;
const PR_GET_TID_ADDRESS: u64 = 40;

fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// A raw syscall result that is an error (-4095..-1).
fn is_err(r: i64) -> bool {
    (-4095..0).contains(&r)
}

fn errno_str(r: i64) -> String {
    std::io::Error::from_raw_os_error((-r) as i32).to_string()
}

struct SavedThread {
    tid: Tid,
    regs: libc::user_regs_struct,
    mask: u64,
}

/// The parasite inside one stopped process.
pub struct Parasite {
    pid: Pid,
    /// Thread that runs the blob (the first of `tids`).
    leader: Tid,
    saved: Vec<SavedThread>,
    syscall_at: RemoteAddr,
    /// Parasite area (None until mapped, and after unmapping).
    area: Option<(RemoteAddr, usize)>,
    blob_len: usize,
    entry: RemoteAddr,
    /// SIGTRAP's disposition if it is SIG_IGN: put back after each blob run
    /// (the kernel resets an ignored SIGTRAP to default when our int3 hits).
    trap_act: Option<[u8; 32]>,
    pipe_r: Option<OwnedFd>,
    pipe_w_remote: Option<RemoteFd>,
    sock: Option<OwnedFd>,
    sock_remote: Option<RemoteFd>,
    /// Signals that arrived while we drove a thread, to send again at cure.
    stash: Vec<(Tid, i32)>,
    buf: Vec<u8>,
}

impl Parasite {
    /// All `tids` of `pid` are seized (with [`ptrace::seize`]) and in a
    /// ptrace stop. Maps the area, loads the blob, makes the transport.
    pub fn inject(pid: Pid, tids: &[Tid]) -> Result<Parasite> {
        let leader = *tids.first().with_context(|| format!("{pid}: no threads given to inject into"))?;
        let syscall_at = remote::find_syscall_insn(pid)?;
        let mut p = Parasite {
            pid,
            leader,
            saved: Vec::new(),
            syscall_at,
            area: None,
            blob_len: 0,
            entry: RemoteAddr(0),
            trap_act: None,
            pipe_r: None,
            pipe_w_remote: None,
            sock: None,
            sock_remote: None,
            stash: Vec::new(),
            buf: Vec::new(),
        };
        // On any error below, Drop undoes what was done so far.
        for &tid in tids {
            let regs = ptrace::get_regs(tid).with_context(|| format!("{pid}: saving registers"))?;
            let mask = ptrace::get_sigmask(tid).with_context(|| format!("{pid}: saving signal mask"))?;
            p.saved.push(SavedThread { tid, regs, mask });
            ptrace::set_sigmask(tid, !sigbit(libc::SIGTRAP))?;
        }
        p.map_area().with_context(|| format!("{pid}: injecting the parasite"))?;
        p.make_transport().with_context(|| format!("{pid}: setting up the parasite transport"))?;
        Ok(p)
    }

    fn area(&self) -> Result<(RemoteAddr, usize)> {
        self.area.with_context(|| format!("{}: parasite area is not mapped", self.pid))
    }
    fn args_addr(&self) -> Result<u64> {
        Ok(self.area()?.0 .0 + self.blob_len as u64)
    }
    fn iov_addr(&self) -> Result<u64> {
        Ok(self.args_addr()? + ARGS_LEN as u64)
    }
    fn scratch_addr(&self) -> Result<u64> {
        Ok(self.iov_addr()? + IOV_LEN as u64)
    }
    fn stack_top(&self) -> Result<u64> {
        let (a, l) = self.area()?;
        Ok(a.0 + l as u64)
    }

    fn rsys(&mut self, tid: Tid, nr: i64, args: [u64; 6]) -> Result<i64> {
        remote::syscall_in(tid, self.syscall_at, nr, args)
    }

    fn map_area(&mut self) -> Result<()> {
        self.blob_len = blob::span()?;
        let len = self.blob_len + ARGS_LEN + IOV_LEN + SCRATCH_LEN + STACK_LEN;
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let r = self.rsys(self.leader, NR_MMAP, [0, len as u64, prot, flags, u64::MAX, 0])?;
        if is_err(r) {
            bail!("{}: remote mmap of {len} bytes failed: {}", self.pid, errno_str(r));
        }
        self.area = Some((RemoteAddr(r as u64), len));
        let loaded = blob::load(r as u64)?;
        self.entry = RemoteAddr(r as u64 + loaded.entry);
        remote::write_mem(self.pid, RemoteAddr(r as u64), &loaded.image)?;

        // SIGTRAP disposition: remember it if ignored (see `trap_act`).
        let s = self.scratch_addr()?;
        let r = self.rsys(self.leader, NR_RT_SIGACTION, [libc::SIGTRAP as u64, 0, s, 8, 0, 0])?;
        if is_err(r) {
            bail!("{}: remote rt_sigaction(SIGTRAP) failed: {}", self.pid, errno_str(r));
        }
        let mut act = [0u8; 32];
        remote::read_mem(self.pid, RemoteAddr(s), &mut act)?;
        if u64::from_ne_bytes(act[..8].try_into()?) == libc::SIG_IGN as u64 {
            self.trap_act = Some(act);
        }
        Ok(())
    }

    fn remote_pair(&mut self, nr: i64, args: [u64; 6], what: &str) -> Result<(RemoteFd, RemoteFd)> {
        let r = self.rsys(self.leader, nr, args)?;
        if is_err(r) {
            bail!("{}: remote {what} failed: {}", self.pid, errno_str(r));
        }
        let mut b = [0u8; 8];
        remote::read_mem(self.pid, RemoteAddr(self.scratch_addr()?), &mut b)?;
        Ok((
            RemoteFd(i32::from_ne_bytes(b[..4].try_into()?)),
            RemoteFd(i32::from_ne_bytes(b[4..].try_into()?)),
        ))
    }

    fn close_remote(&mut self, fd: RemoteFd) -> Result<()> {
        let r = self.rsys(self.leader, NR_CLOSE, [fd.0 as u64, 0, 0, 0, 0, 0])?;
        if is_err(r) {
            bail!("{}: remote close({}) failed: {}", self.pid, fd.0, errno_str(r));
        }
        Ok(())
    }

    fn make_transport(&mut self) -> Result<()> {
        let pidfd = crate::sys::pidfd_open(self.pid)?;
        let s = self.scratch_addr()?;
        let (r, w) = self.remote_pair(NR_PIPE2, [s, libc::O_CLOEXEC as u64, 0, 0, 0, 0], "pipe2")?;
        self.pipe_w_remote = Some(w);
        let got = crate::sys::pidfd_getfd(&pidfd, r);
        self.close_remote(r)?;
        let ours = got?;
        crate::sys::set_nonblock(&ours)?;
        // The pipe's size is a property of the pipe: set it from our end.
        // SAFETY: fcntl on a descriptor we own; no pointers.
        let mut sz = PIPE_SIZE;
        while sz >= 65536 && unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETPIPE_SZ, sz) } < 0 {
            sz /= 2;
        }
        self.pipe_r = Some(ours);

        let ty = (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64;
        let (a, b) = self.remote_pair(NR_SOCKETPAIR, [libc::AF_UNIX as u64, ty, 0, s, 0, 0], "socketpair")?;
        self.sock_remote = Some(a);
        let got = crate::sys::pidfd_getfd(&pidfd, b);
        self.close_remote(b)?;
        self.sock = Some(got?);
        Ok(())
    }

    /// Start one blob command on the leader (does not wait).
    fn start_blob(&mut self, cmd: u64, a: [u64; 6]) -> Result<()> {
        let args = self.args_addr()?;
        let mut block = Vec::with_capacity(64);
        block.extend_from_slice(&cmd.to_ne_bytes());
        block.extend_from_slice(&RET_UNSET.to_ne_bytes());
        for v in a {
            block.extend_from_slice(&v.to_ne_bytes());
        }
        remote::write_mem_iov(self.pid, &[(RemoteAddr(args), &block)])?;
        let saved = self.saved_regs(self.leader)?;
        let mut r = saved;
        r.rip = self.entry.0;
        r.rsp = self.stack_top()? - 64;
        r.rdi = args;
        r.rax = 0;
        r.orig_rax = u64::MAX;
        r.eflags &= !0x400; // DF clear, as the ABI requires
        ptrace::set_regs(self.leader, &r)?;
        ptrace::cont(self.leader, 0)?;
        Ok(())
    }

    fn saved_regs(&self, tid: Tid) -> Result<libc::user_regs_struct> {
        self.saved
            .iter()
            .find(|s| s.tid == tid)
            .map(|s| s.regs)
            .with_context(|| format!("{}: {tid} is not one of the parasite's threads", self.pid))
    }

    /// Handle one stop of the leader while the blob runs. Ok(true) when the
    /// blob has finished (its int3).
    fn blob_stop(&mut self, st: ptrace::Stop) -> Result<bool> {
        let tid = self.leader;
        if st.is_signal() {
            let sig = st.sig();
            let regs = ptrace::get_regs(tid)?;
            let (a, _) = self.area()?;
            let in_blob = regs.rip >= a.0 && regs.rip < a.0 + self.blob_len as u64;
            if sig == libc::SIGTRAP && in_blob {
                let si = ptrace::get_siginfo(tid)?;
                let code = i32::from_ne_bytes(si[8..12].try_into()?);
                if code == libc::SI_KERNEL {
                    return Ok(true);
                }
            }
            if in_blob && matches!(sig, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE) {
                bail!("{}: parasite blob faulted with signal {sig} at rip {:#x}", self.pid, regs.rip);
            }
            self.stash.push((tid, sig));
        } else if !st.is_event_stop() {
            bail!("{}: unexpected stop {:#x} of {tid} while the parasite ran", self.pid, st.0);
        }
        ptrace::cont(tid, 0)?;
        Ok(false)
    }

    /// Put the leader back after the blob stopped; return the command's result.
    fn end_blob(&mut self) -> Result<i64> {
        let saved = self.saved_regs(self.leader)?;
        ptrace::set_regs(self.leader, &saved)?;
        if let Some(act) = self.trap_act {
            let s = self.scratch_addr()?;
            remote::write_mem(self.pid, RemoteAddr(s), &act)?;
            let r = self.rsys(self.leader, NR_RT_SIGACTION, [libc::SIGTRAP as u64, s, 0, 8, 0, 0])?;
            if is_err(r) {
                bail!("{}: putting back SIGTRAP's disposition failed: {}", self.pid, errno_str(r));
            }
        }
        let mut b = [0u8; 8];
        remote::read_mem(self.pid, RemoteAddr(self.args_addr()? + 8), &mut b)?;
        let ret = i64::from_ne_bytes(b);
        if ret == RET_UNSET {
            bail!("{}: parasite blob stopped without a result (panicked?)", self.pid);
        }
        Ok(ret)
    }

    fn wait_blob(&mut self) -> Result<i64> {
        loop {
            let st = ptrace::wait_stop(self.leader)?;
            if self.blob_stop(st)? {
                return self.end_blob();
            }
        }
    }

    fn run_blob(&mut self, cmd: u64, a: [u64; 6]) -> Result<i64> {
        self.start_blob(cmd, a)?;
        match self.wait_blob() {
            Ok(r) => Ok(r),
            Err(e) => {
                // Leave the leader with its own registers whatever happened.
                if let Ok(saved) = self.saved_regs(self.leader) {
                    let _ = ptrace::set_regs(self.leader, &saved);
                }
                Err(e)
            }
        }
    }

    /// A system call on any thread of the process.
    pub fn syscall(&mut self, tid: Tid, nr: i64, args: [u64; 6]) -> Result<i64> {
        self.saved_regs(tid)?;
        self.rsys(tid, nr, args)
    }

    /// Run a system call that makes a new descriptor in the target and take
    /// it: snap keeps its own copy and closes the target's, which is left
    /// with no trace of it. The error (negative errno) is returned as is
    /// for the caller to branch on.
    pub fn create_fd(&mut self, nr: i64, args: [u64; 6]) -> Result<std::result::Result<OwnedFd, i32>> {
        let r = self.rsys(self.leader, nr, args)?;
        if is_err(r) {
            return Ok(Err(-r as i32));
        }
        let fd = RemoteFd(r as i32);
        let pidfd = crate::sys::pidfd_open(self.pid)?;
        let got = crate::sys::pidfd_getfd(&pidfd, fd);
        self.close_remote(fd)?;
        Ok(Ok(got?))
    }

    /// A scratch area (64 KiB) inside the parasite mapping for syscall buffers.
    pub fn scratch(&self) -> (RemoteAddr, usize) {
        (RemoteAddr(self.scratch_addr().unwrap_or(0)), SCRATCH_LEN)
    }

    /// The pages of `ranges` (page-aligned, readable), in order, into `sink`
    /// in chunks that are multiples of 4096 bytes (at most 1 MiB).
    pub fn dump_pages(
        &mut self,
        ranges: &[(RemoteAddr, usize)],
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        for &(a, l) in ranges {
            if a.0 % PAGE_SIZE as u64 != 0 || l % PAGE_SIZE != 0 {
                bail!("{}: dump_pages range {a}+{l:#x} is not page aligned", self.pid);
            }
        }
        let cap = PIPE_SIZE as usize;
        if self.buf.len() != cap {
            self.buf = vec![0u8; cap];
        }
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.dump_pages_inner(ranges, sink, &mut buf);
        self.buf = buf;
        r
    }

    fn dump_pages_inner(
        &mut self,
        ranges: &[(RemoteAddr, usize)],
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
        buf: &mut [u8],
    ) -> Result<()> {
        let pid = self.pid;
        let pipe_w = self.pipe_w_remote.with_context(|| format!("{pid}: no parasite pipe"))?;
        let iov_addr = self.iov_addr()?;
        for batch in ranges.chunks(MAX_IOVS) {
            let mut iovs = Vec::with_capacity(batch.len() * 16);
            let mut total = 0usize;
            for &(a, l) in batch {
                iovs.extend_from_slice(&a.0.to_ne_bytes());
                iovs.extend_from_slice(&(l as u64).to_ne_bytes());
                total += l;
            }
            if total == 0 {
                continue;
            }
            remote::write_mem_iov(pid, &[(RemoteAddr(iov_addr), &iovs)])?;
            self.start_blob(CMD_VMSPLICE, [pipe_w.0 as u64, iov_addr, batch.len() as u64, 0, 0, 0])?;
            let drained = self.drain(total, buf, sink);
            let done = match drained {
                Ok(d) => d,
                Err(e) => {
                    // Stop the blob and put the leader back before failing.
                    let _ = ptrace::interrupt(self.leader);
                    if let Ok(saved) = self.saved_regs(self.leader) {
                        let _ = ptrace::wait_stop(self.leader);
                        let _ = ptrace::set_regs(self.leader, &saved);
                    }
                    return Err(e);
                }
            };
            let ret = if done { self.end_blob()? } else { self.wait_blob()? };
            if ret != total as i64 {
                let first = batch[0].0;
                if ret < 0 {
                    bail!("{pid}: parasite vmsplice of {} ranges from {first} failed: {}", batch.len(), errno_str(ret));
                }
                bail!("{pid}: parasite vmspliced {ret} of {total} bytes ({} ranges from {first})", batch.len());
            }
        }
        Ok(())
    }

    /// Read `total` bytes from the pipe into `sink`. Ok(true) if the blob
    /// already hit its final int3 while we drained.
    fn drain(&mut self, total: usize, buf: &mut [u8], sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<bool> {
        let pid = self.pid;
        let fd = self.pipe_r.as_ref().with_context(|| format!("{pid}: no parasite pipe"))?.as_raw_fd();
        let mut remaining = total;
        let mut fill = 0usize;
        let mut finished = false;
        while remaining > 0 {
            let want = (buf.len() - fill).min(remaining);
            // SAFETY: reads at most `want` bytes into the live buffer tail.
            let n = unsafe { libc::read(fd, buf[fill..].as_mut_ptr() as *mut libc::c_void, want) };
            if n > 0 {
                fill += n as usize;
                remaining -= n as usize;
                if fill == buf.len() {
                    sink(buf)?;
                    fill = 0;
                }
                continue;
            }
            let e = std::io::Error::last_os_error();
            if n == 0 {
                bail!("{pid}: parasite pipe closed with {remaining} bytes still expected");
            }
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {}
                _ => return Err(e).with_context(|| format!("{pid}: reading the parasite pipe")),
            }
            if finished {
                bail!("{pid}: parasite finished with {remaining} bytes not sent");
            }
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd.
            let pr = unsafe { libc::poll(&mut pfd, 1, 20) };
            if pr == 0 {
                if let Some(st) = ptrace::try_wait_stop(self.leader)? {
                    if self.blob_stop(st)? {
                        finished = true;
                    }
                }
            }
        }
        if fill > 0 {
            sink(&buf[..fill])?;
        }
        Ok(finished)
    }

    /// Duplicates of the target's descriptors `fds`, in the same order.
    pub fn take_fds(&mut self, fds: &[RemoteFd]) -> Result<Vec<OwnedFd>> {
        let mut out = Vec::with_capacity(fds.len());
        for batch in fds.chunks(FD_BATCH) {
            let at = self.args_addr()? + ARGS_FDS;
            let raw: Vec<u8> = batch.iter().flat_map(|f| f.0.to_ne_bytes()).collect();
            remote::write_mem_iov(self.pid, &[(RemoteAddr(at), &raw)])?;
            let sock_r = self.sock_remote.with_context(|| format!("{}: no parasite socket", self.pid))?;
            let r = self.run_blob(CMD_SENDFDS, [sock_r.0 as u64, at, batch.len() as u64, 0, 0, 0])?;
            let names = || batch.iter().map(|f| f.0.to_string()).collect::<Vec<_>>().join(",");
            if r < 0 {
                bail!("{}: parasite could not send fds {}: {}", self.pid, names(), errno_str(r));
            }
            let sock = self.sock.as_ref().with_context(|| format!("{}: no parasite socket", self.pid))?;
            let got = crate::sys::recv_fds(sock, FD_BATCH)
                .with_context(|| format!("{}: receiving fds {}", self.pid, names()))?;
            if got.len() != batch.len() {
                bail!("{}: asked for fds {} and received {} descriptors", self.pid, names(), got.len());
            }
            out.extend(got);
        }
        Ok(out)
    }

    /// Dispositions of signals 1..=64.
    pub fn sigactions(&mut self) -> Result<Vec<SigAction>> {
        let at = self.args_addr()? + ARGS_SIGACT;
        let r = self.run_blob(CMD_SIGACTIONS, [at, 0, 0, 0, 0, 0])?;
        if r < 0 {
            bail!("{}: parasite could not read signal dispositions: {}", self.pid, errno_str(r));
        }
        let mut raw = vec![0u8; 64 * 32];
        remote::read_mem(self.pid, RemoteAddr(at), &mut raw)?;
        let w = |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let mut v: Vec<SigAction> = (0..64)
            .map(|s| SigAction { handler: w(s * 4), flags: w(s * 4 + 1), restorer: w(s * 4 + 2), mask: w(s * 4 + 3) })
            .collect();
        v[libc::SIGKILL as usize - 1] = SigAction::default();
        v[libc::SIGSTOP as usize - 1] = SigAction::default();
        Ok(v)
    }

    /// ITIMER_REAL, _VIRTUAL and _PROF.
    pub fn itimers(&mut self) -> Result<ITimers> {
        let s = self.scratch_addr()?;
        let mut vals = [ITimerVal::default(); 3];
        for (which, v) in vals.iter_mut().enumerate() {
            let r = self.rsys(self.leader, NR_GETITIMER, [which as u64, s, 0, 0, 0, 0])?;
            if is_err(r) {
                bail!("{}: remote getitimer({which}) failed: {}", self.pid, errno_str(r));
            }
            let mut b = [0u8; 32];
            remote::read_mem(self.pid, RemoteAddr(s), &mut b)?;
            let q = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            *v = ITimerVal { interval_us: q(0) * 1_000_000 + q(1), value_us: q(2) * 1_000_000 + q(3) };
        }
        Ok(ITimers { real: vals[0], virt: vals[1], prof: vals[2] })
    }

    /// The thread's sigaltstack and clear-child-tid address.
    pub fn thread_misc(&mut self, tid: Tid) -> Result<(SigAltStack, u64)> {
        self.saved_regs(tid)?;
        let s = self.scratch_addr()?;
        let r = self.rsys(tid, NR_SIGALTSTACK, [0, s, 0, 0, 0, 0])?;
        if is_err(r) {
            bail!("{}: remote sigaltstack in {tid} failed: {}", self.pid, errno_str(r));
        }
        let r = self.rsys(tid, NR_PRCTL, [PR_GET_TID_ADDRESS, s + 64, 0, 0, 0, 0])?;
        if is_err(r) {
            bail!("{}: remote prctl(PR_GET_TID_ADDRESS) in {tid} failed: {}", self.pid, errno_str(r));
        }
        let mut b = [0u8; 72];
        remote::read_mem(self.pid, RemoteAddr(s), &mut b)?;
        let q = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let ss = SigAltStack { sp: q(0), flags: i32::from_ne_bytes(b[8..12].try_into()?), size: q(16) };
        Ok((ss, q(64)))
    }

    /// Remove every trace: transport fds, the area, then registers and
    /// signal masks of every thread.
    pub fn cure(mut self) -> Result<()> {
        self.cure_inner()
    }

    fn cure_inner(&mut self) -> Result<()> {
        let mut first_err: Option<anyhow::Error> = None;
        let mut keep = |r: Result<()>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        self.pipe_r = None;
        self.sock = None;
        if let Some(fd) = self.pipe_w_remote.take() {
            keep(self.close_remote(fd));
        }
        if let Some(fd) = self.sock_remote.take() {
            keep(self.close_remote(fd));
        }
        if let Some((a, l)) = self.area.take() {
            let r = self.rsys(self.leader, NR_MUNMAP, [a.0, l as u64, 0, 0, 0, 0]);
            keep(r.and_then(|r| {
                if is_err(r) {
                    bail!("{}: remote munmap of the parasite at {a} failed: {}", self.pid, errno_str(r));
                }
                Ok(())
            }));
        }
        for s in std::mem::take(&mut self.saved) {
            keep(ptrace::set_regs(s.tid, &s.regs));
            keep(ptrace::set_sigmask(s.tid, s.mask));
        }
        for (tid, sig) in std::mem::take(&mut self.stash) {
            keep(remote::requeue(tid, &[sig]));
        }
        match first_err {
            Some(e) => Err(e.context(format!("{}: curing the parasite", self.pid))),
            None => Ok(()),
        }
    }
}

impl Drop for Parasite {
    fn drop(&mut self) {
        if !self.saved.is_empty() {
            let _ = self.cure_inner();
        }
    }
}
