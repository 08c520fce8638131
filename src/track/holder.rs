//! The holder: keeps the dirty tracking of a plain `snap dump -t` alive
//! until the next dump takes it.
//!
//! A uffd's write-protection lasts only as long as someone holds the uffd.
//! After `snap dump --track-mem`, a small `snap __track-holder` process
//! holds them: it is no child of the dumped processes, shares nothing with
//! them and leaves no descriptor or mapping in them, so the program cannot
//! see it. It listens on `/run/snap/track/<image id>.sock`; the next dump
//! with `--prev-images-dir` of that image connects, takes the tracking and
//! the holder exits. It also exits when every tracked process is gone.
//!
//! Messages are SOCK_SEQPACKET records: a JSON header, descriptors attached.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};

use super::{ProcTrack, TrackSet};
use crate::types::Pid;

/// Directory of the holders' sockets.
pub const DIR: &str = "/run/snap/track";
/// Largest header accepted.
const MAX_MSG: usize = 1 << 20;
/// Most descriptors one record carries (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;

#[derive(Serialize, Deserialize)]
struct Header {
    backend: String,
    generation: String,
    /// (pid, start time, has a uffd), in the order of the attached fds.
    procs: Vec<(i32, u64, bool)>,
}

/// Socket of the holder of tracking armed by image `id`.
pub fn socket_path(id: &str) -> PathBuf {
    Path::new(DIR).join(format!("{id}.sock"))
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).context("seqpacket socket")
}

/// Send a set: the header, then the descriptors in messages of at most
/// [`MAX_FDS`] each (the kernel's limit per message), so a tree of any size
/// keeps its tracking.
fn send_set(sock: std::os::fd::BorrowedFd<'_>, set: &TrackSet) -> Result<()> {
    let h = Header {
        backend: set.backend.clone(),
        generation: set.generation.clone(),
        procs: set.procs.iter().map(|(p, t)| (p.0, t.start_time, t.uffd.is_some())).collect(),
    };
    let fds: Vec<RawFd> = set.procs.values().filter_map(|t| t.uffd.as_ref().map(|f| f.as_raw_fd())).collect();
    crate::sys::send_fds(sock, &serde_json::to_vec(&h)?, &[])?;
    for chunk in fds.chunks(MAX_FDS) {
        crate::sys::send_fds(sock, b"fds", chunk)?;
    }
    Ok(())
}

fn recv_set(sock: &OwnedFd) -> Result<TrackSet> {
    let (data, _) = crate::sys::recv_msg(sock, MAX_MSG, 0)?;
    ensure!(!data.is_empty(), "the tracking holder closed the connection");
    let h: Header = serde_json::from_slice(&data).context("tracking holder message")?;
    let want = h.procs.iter().filter(|p| p.2).count();
    let mut fds = Vec::with_capacity(want);
    while fds.len() < want {
        let (data, more) = crate::sys::recv_msg(sock, 16, MAX_FDS)?;
        ensure!(data == b"fds" && !more.is_empty(), "tracking holder message: {} of {want} descriptors came", fds.len());
        fds.extend(more);
    }
    let mut fds = fds.into_iter();
    let mut procs = BTreeMap::new();
    for (pid, start_time, has) in h.procs {
        let uffd = if has { Some(fds.next().context("tracking holder message: a descriptor is missing")?) } else { None };
        procs.insert(Pid(pid), ProcTrack { start_time, uffd });
    }
    Ok(TrackSet { backend: h.backend, generation: h.generation, procs })
}

/// Start a holder for `set` and wait until it listens. Returns its socket.
pub fn spawn(set: &TrackSet) -> Result<PathBuf> {
    start(&set.generation)?.hand(set)
}

/// A holder started ahead of the dump whose tracking it will hold (for
/// the image `generation`), so that its start (exec, loading snap) runs
/// beside the dump instead of after it. It waits for its set on a socket
/// pair; dropped without [`Starting::hand`], it is killed and reaped.
pub struct Starting {
    sock: OwnedFd,
    child: Option<std::process::Child>,
    generation: String,
}

/// Start the holder of the tracking a dump of image `generation` will arm.
pub fn start(generation: &str) -> Result<Starting> {
    std::fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    let path = socket_path(generation);
    let (ours, theirs) = socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .context("socketpair for the tracking holder")?;
    let exe = std::env::current_exe().context("finding snap's own binary")?;
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new(&exe)
        .arg("__track-holder")
        .arg(&path)
        .stdin(std::process::Stdio::from(theirs))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the tracking holder ({})", exe.display()))?;
    Ok(Starting { sock: ours, child: Some(child), generation: generation.to_string() })
}

impl Starting {
    /// Hand `set` over and wait until the holder listens. Returns its socket.
    pub fn hand(mut self, set: &TrackSet) -> Result<PathBuf> {
        ensure!(
            set.generation == self.generation,
            "tracking of image {} handed to the holder started for image {}",
            set.generation,
            self.generation
        );
        send_set(self.sock.as_fd(), set)?;
        let (reply, _) = crate::sys::recv_msg(&self.sock, 256, 0)?;
        if reply != b"ok" {
            bail!("the tracking holder did not start: {}", String::from_utf8_lossy(&reply));
        }
        // Not waited for: it outlives this dump (reparented to init).
        self.child = None;
        Ok(socket_path(&self.generation))
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Take the tracking from the holder of image `generation`, if it is still
/// there. `None`: no holder (its processes exited, or another dump took it).
pub fn take(generation: &str) -> Result<Option<TrackSet>> {
    let path = socket_path(generation);
    let s = seqpacket()?;
    let addr = UnixAddr::new(&path).with_context(|| format!("socket path {}", path.display()))?;
    match socket::connect(s.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("connecting to the tracking holder {}", path.display())),
    }
    crate::sys::send_fds(s.as_fd(), b"take", &[])?;
    let set = recv_set(&s).with_context(|| format!("tracking holder {}", path.display()))?;
    ensure!(
        set.generation == generation,
        "tracking holder {} holds tracking of image {}, not {generation}",
        path.display(),
        set.generation
    );
    Ok(Some(set))
}

/// `snap __track-holder SOCKET`: the holder itself. Receives the set on
/// stdin, listens, hands the set to the first dump that asks, and exits then
/// or when every tracked process has exited.
pub fn serve(path: &Path) -> Result<()> {
    let stdin: OwnedFd = std::io::stdin().as_fd().try_clone_to_owned().context("stdin")?;
    let set = recv_set(&stdin)?;
    let _ = std::fs::remove_file(path);
    let l = seqpacket()?;
    let addr = UnixAddr::new(path).with_context(|| format!("socket path {}", path.display()))?;
    let r = socket::bind(l.as_raw_fd(), &addr)
        .with_context(|| format!("binding {}", path.display()))
        .and_then(|_| socket::listen(&l, socket::Backlog::new(4)?).context("listen"));
    if let Err(e) = r {
        crate::sys::send_fds(stdin.as_fd(), format!("{e:#}").as_bytes(), &[])?;
        return Err(e);
    }
    let _unlink = Unlink(path.to_path_buf());
    // The tracked processes: once all are gone, nothing is left to hold.
    let pidfds: Vec<OwnedFd> = set.procs.keys().filter_map(|&p| crate::sys::pidfd_open(p).ok()).collect();
    crate::sys::send_fds(stdin.as_fd(), b"ok", &[])?;
    drop(stdin);
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = vec![PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        fds.extend(pidfds.iter().map(|p| PollFd::new(p.as_fd(), PollFlags::POLLIN)));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll"),
        }
        let exited = fds[1..].iter().filter(|f| f.revents().is_some_and(|r| !r.is_empty())).count();
        if !pidfds.is_empty() && exited == pidfds.len() {
            return Ok(());
        }
        if fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
            let c = crate::sys::accept(l.as_fd())?;
            let (req, _) = crate::sys::recv_msg(&c, 64, 0)?;
            if req == b"take" {
                send_set(c.as_fd(), &set)?;
                return Ok(());
            }
        }
    }
}

/// Removes the holder's socket when it exits.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
