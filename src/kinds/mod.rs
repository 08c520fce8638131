//! One module per kind of file descriptor, dump and restore side by side.
//!
//! Dump: the parasite hands us the target's descriptors as our own fds; for
//! each one we gather a [`Probe`] (link target, fstat, fdinfo) and offer it
//! to the kinds of [`REGISTRY`] in order; the first that claims it describes
//! it as a [`FileKind`]. Descriptors that share one open file description
//! (checked with kcmp(KCMP_FILE)) become one [`OpenFile`] referenced by
//! several [`FdEntry`]s, across processes too.
//!
//! Restore: [`restore_files`] recreates every open file description in our
//! own process; the restored processes inherit them and dup2() each to its
//! number.
//!
//! Adding a kind: a module with a `KIND: Kind` for dump and a `restore`
//! function, one line in `REGISTRY` and one arm in `restore_one`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{anyhow, Context, Result};
use nix::sys::stat::FileStat;

use crate::images::records::{FdEntry, FileKind, FilesImage, OpenFile};
use crate::types::{Pid, RemoteFd};

pub mod chardev;
pub mod deleted;
pub mod epoll;
pub mod eventfd;
pub mod inet;
pub mod inotify;
pub mod locks;
pub mod memfd;
pub mod mqueue;
pub mod pidfd;
pub mod pipe;
pub mod pty;
pub mod regular;
pub mod signalfd;
pub mod sys;
pub mod tcp;
pub mod timerfd;
pub mod unix;
pub mod unix_diag;
pub mod unix_named;
pub mod unix_queue;

/// Everything known about one descriptor before a kind looks at it.
pub struct Probe<'a> {
    pub pid: Pid,
    pub fd: RemoteFd,
    /// Our copy of the descriptor (same open file description).
    pub ours: BorrowedFd<'a>,
    /// Target of /proc/PID/fd/N as the target sees it.
    pub link: String,
    pub st: FileStat,
    /// O_* status flags from fdinfo, without O_CLOEXEC.
    pub flags: u32,
    pub pos: u64,
}

impl Probe<'_> {
    /// "pid 412 fd 7 (pipe:[8812])", for error messages.
    pub fn what(&self) -> String {
        format!("{} {} ({})", self.pid, self.fd, self.link)
    }
    pub fn file_type(&self) -> u32 {
        self.st.st_mode & libc::S_IFMT
    }
}

/// Dump-side state shared by all processes: blobs and what was saved once.
pub struct DumpShared {
    pub shell_job: bool,
    pub blobs: Vec<(String, Vec<u8>)>,
    /// Names of blobs already produced (a pipe's data is stored once).
    pub saved: HashSet<String>,
    /// Every process of the dump (a pidfd must refer to one of them).
    pub dumped: Vec<Pid>,
    /// Pseudo-terminal descriptors seen, checked against each other at the end.
    pub ptys: Vec<pty::Seen>,
    /// Files in flight in a Unix socket's queue (SCM_RIGHTS) just read by
    /// a kind: described right after it, as files of no process.
    pub inflight: Vec<OwnedFd>,
    /// Unix sockets found in flight, and sockets held by no process that
    /// must be among them (checked at the end).
    pub unix_inflight: HashSet<u64>,
    pub unix_unheld: Vec<(u64, String)>,
    /// `--ext-unix-sk`: a stream connection to a listener outside the dump
    /// is recorded by the listener's path, and connected again at restore.
    pub ext_unix_sk: bool,
    /// `--tcp-established`: established TCP connections are dumped (in
    /// repair mode), else refused.
    pub tcp_established: bool,
    /// snap's copies of the dumped TCP connections, in repair mode.
    pub repair: tcp::Repaired,
    /// (local, remote) of the connections found when the dump began, whose
    /// traffic the network lock holds where needed.
    pub tcp_locked: HashSet<(std::net::SocketAddr, std::net::SocketAddr)>,
}

/// One kind of descriptor, dump side.
pub struct Kind {
    pub name: &'static str,
    /// `None` if the descriptor is not of this kind; else its description
    /// or the reason it cannot be dumped.
    pub dump: fn(&Probe, &mut DumpShared) -> Option<Result<FileKind>>,
}

/// Kinds in the order they are tried (mqueue and deleted before regular).
pub const REGISTRY: &[Kind] = &[
    mqueue::KIND,
    memfd::KIND,
    deleted::KIND,
    regular::KIND,
    pty::KIND,
    chardev::KIND,
    pipe::KIND,
    eventfd::KIND,
    pidfd::KIND,
    timerfd::KIND,
    signalfd::KIND,
    epoll::KIND,
    inotify::KIND,
    unix::KIND,
    inet::KIND,
    inet::OTHER,
];

/// Status flags and position of one descriptor, from /proc/PID/fdinfo/N.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FdInfo {
    pub pos: u64,
    /// Raw flags, O_CLOEXEC included.
    pub flags: u32,
}

pub fn parse_fdinfo(text: &str) -> Result<FdInfo> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = Some(v.trim().parse::<u64>().with_context(|| format!("fdinfo pos {v:?}"))?);
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = Some(u32::from_str_radix(v.trim(), 8).with_context(|| format!("fdinfo flags {v:?}"))?);
        }
    }
    Ok(FdInfo {
        pos: pos.ok_or_else(|| anyhow!("fdinfo has no pos:"))?,
        flags: flags.ok_or_else(|| anyhow!("fdinfo has no flags:"))?,
    })
}

pub fn read_fdinfo(pid: Pid, fd: RemoteFd) -> Result<FdInfo> {
    let path = format!("/proc/{}/fdinfo/{}", pid.0, fd.0);
    let text = fs::read_to_string(&path).with_context(|| format!("{pid} {fd}: reading {path}"))?;
    parse_fdinfo(&text).with_context(|| format!("{pid} {fd}: {path}"))
}

/// The descriptors of `pid`, ascending.
pub fn list_fds(pid: Pid) -> Result<Vec<RemoteFd>> {
    let fds = crate::dump::proc::numeric_entries(&format!("/proc/{}/fd", pid.0)).with_context(|| format!("{pid}"))?;
    Ok(fds.into_iter().map(RemoteFd).collect())
}

/// Collects the open file descriptions of every process of a dump.
pub struct DumpCtx {
    files: Vec<OpenFile>,
    shared: DumpShared,
    /// (dev, ino) -> descriptions already described, with one (pid, fd)
    /// that holds each, to compare new descriptors against with kcmp.
    index: HashMap<(u64, u64), Vec<(u32, Pid, RemoteFd)>>,
    /// snap's copies of files in flight, indexed as held by snap itself:
    /// open until the end so later descriptors are compared with them.
    inflight_held: Vec<OwnedFd>,
}

impl DumpCtx {
    pub fn new(shell_job: bool) -> Self {
        DumpCtx {
            files: Vec::new(),
            shared: DumpShared {
                shell_job,
                blobs: Vec::new(),
                saved: HashSet::new(),
                dumped: Vec::new(),
                inflight: Vec::new(),
                unix_inflight: HashSet::new(),
                unix_unheld: Vec::new(),
                ext_unix_sk: false,
                tcp_established: false,
                repair: tcp::Repaired::default(),
                tcp_locked: HashSet::new(),
                ptys: Vec::new(),
            },
            index: HashMap::new(),
            inflight_held: Vec::new(),
        }
    }

    /// `--ext-unix-sk` (see `unix.rs`).
    pub fn set_ext_unix_sk(&mut self, on: bool) {
        self.shared.ext_unix_sk = on;
    }

    /// `--tcp-established` (see `tcp.rs`).
    pub fn set_tcp_established(&mut self, on: bool, lock: &inet::NetLock) {
        self.shared.tcp_established = on;
        self.shared.tcp_locked = lock.conns.clone();
    }

    /// The TCP connections put in repair mode so far: the caller decides
    /// when they leave it (dropped) or are closed in it (`forget`).
    pub fn take_repair(&mut self) -> tcp::Repaired {
        std::mem::take(&mut self.shared.repair)
    }

    /// Checks that need every descriptor seen: call before `finish`.
    pub fn check_done(&self) -> Result<()> {
        unix::check_inflight(&self.shared)
    }

    /// The processes of the dump (for descriptors that refer to processes).
    pub fn set_dumped(&mut self, pids: &[Pid]) {
        self.shared.dumped = pids.to_vec();
    }

    /// Describe every descriptor of one process. `fds`: the fds as received
    /// from the parasite, keyed by their number in the target. Refuses
    /// unsupported kinds naming pid, fd, link target and reason.
    pub fn dump_fds(&mut self, pid: Pid, fds: &[(RemoteFd, OwnedFd)]) -> Result<Vec<FdEntry>> {
        let mut out = Vec::with_capacity(fds.len());
        for (fd, ours) in fds {
            out.push(self.dump_one(pid, *fd, ours.as_fd())?);
        }
        Ok(out)
    }

    fn dump_one(&mut self, pid: Pid, fd: RemoteFd, ours: BorrowedFd<'_>) -> Result<FdEntry> {
        let lpath = format!("/proc/{}/fd/{}", pid.0, fd.0);
        let link = fs::read_link(&lpath)
            .with_context(|| format!("{pid} {fd}: readlink {lpath}"))?
            .to_string_lossy()
            .into_owned();
        let info = read_fdinfo(pid, fd)?;
        let st = nix::sys::stat::fstat(ours.as_raw_fd())
            .with_context(|| format!("{pid} {fd} ({link}): fstat"))?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let flags = info.flags & !(libc::O_CLOEXEC as u32);

        // The same open file description seen before (dup, fork, SCM_RIGHTS)?
        let key = (st.st_dev, st.st_ino);
        for &(id, pid2, fd2) in self.index.get(&key).into_iter().flatten() {
            let same = sys::same_description(pid, fd, pid2, fd2).with_context(|| {
                format!("{pid} {fd} ({link}): kcmp(KCMP_FILE) with {pid2} {fd2}")
            })?;
            if same {
                return Ok(FdEntry { fd: fd.0, cloexec, file: id });
            }
        }

        let probe = Probe { pid, fd, ours, link, st, flags, pos: info.pos };
        let kind = REGISTRY
            .iter()
            .find_map(|k| (k.dump)(&probe, &mut self.shared))
            .unwrap_or_else(|| Err(refusal(&probe)))?;
        let id = self.files.len() as u32;
        self.files.push(OpenFile { id, flags, kind });
        self.index.entry(key).or_default().push((id, pid, fd));
        self.dump_inflight(id).with_context(|| format!("{pid} {fd}: a file in flight in its queue (SCM_RIGHTS)"))?;
        Ok(FdEntry { fd: fd.0, cloexec, file: id })
    }

    /// Describe the files in flight the kind of open file `id` just handed
    /// over (`DumpShared::inflight`): open file descriptions that no
    /// process holds, described as held by snap itself, so that one also
    /// held by a process (or in flight twice) stays one description.
    fn dump_inflight(&mut self, id: u32) -> Result<()> {
        let fds = std::mem::take(&mut self.shared.inflight);
        if fds.is_empty() {
            return Ok(());
        }
        let me = Pid(std::process::id() as i32);
        let mut ids = Vec::with_capacity(fds.len());
        for f in fds {
            let e = self.dump_one(me, RemoteFd(f.as_raw_fd()), f.as_fd())?;
            if let FileKind::Epoll { .. } = self.files[e.file as usize].kind {
                anyhow::bail!("an epoll instance in flight: not supported (its watches name descriptors of a process)");
            }
            ids.push(e.file);
            self.inflight_held.push(f);
        }
        unix::resolve_inflight(&mut self.files[id as usize].kind, &ids)
    }

    /// The files image and the extra blobs to write next to it, once the
    /// checks that need every process are done (pseudo-terminal pairs).
    pub fn finish(mut self) -> Result<(FilesImage, Vec<(String, Vec<u8>)>)> {
        let who: HashMap<u32, (Pid, RemoteFd)> =
            self.index.values().flatten().map(|&(id, pid, fd)| (id, (pid, fd))).collect();
        pty::check(&mut self.files, &who, &self.shared)?;
        Ok((FilesImage { files: self.files }, self.shared.blobs))
    }
}

/// The error for a descriptor no kind claimed.
fn refusal(p: &Probe) -> anyhow::Error {
    let what = if p.link.starts_with("socket:") {
        "sockets are".to_string()
    } else if let Some(a) = p.link.strip_prefix("anon_inode:") {
        format!("anonymous inodes ({a}) are")
    } else {
        let t = match p.file_type() {
            libc::S_IFSOCK => "sockets",
            libc::S_IFBLK => "block devices",
            libc::S_IFCHR => "character devices of this kind",
            libc::S_IFLNK => "symbolic links (O_PATH)",
            libc::S_IFIFO => "pipes of this kind",
            libc::S_IFDIR | libc::S_IFREG => "files of this kind",
            _ => "descriptors of this kind",
        };
        format!("{t} are")
    };
    anyhow!("{}: {what} not supported yet", p.what())
}

/// Open `path` with saved status flags, minus those that would create or
/// truncate, and close-on-exec in our own process (restored processes get
/// their copy with dup2, which clears it).
pub fn open_with_flags(path: &str, flags: u32) -> std::io::Result<OwnedFd> {
    let acc = flags & libc::O_ACCMODE as u32;
    let drop = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC) as u32;
    let f = fs::OpenOptions::new()
        .read(acc == libc::O_RDONLY as u32 || acc == libc::O_RDWR as u32)
        .write(acc == libc::O_WRONLY as u32 || acc == libc::O_RDWR as u32)
        .custom_flags(((flags & !drop) | libc::O_CLOEXEC as u32) as i32)
        .open(path)?;
    Ok(f.into())
}

/// Put the file position back (not for O_PATH descriptors, which have none).
pub fn restore_pos(fd: BorrowedFd<'_>, flags: u32, pos: u64) -> nix::Result<()> {
    if flags & libc::O_PATH as u32 != 0 {
        return Ok(());
    }
    let pos = i64::try_from(pos).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
    nix::unistd::lseek(fd.as_raw_fd(), pos, nix::unistd::Whence::SeekSet).map(|_| ())
}

/// Restore-side state shared by the descriptions of one image.
pub struct RestoreCtx<'a> {
    pub read_blob: &'a dyn Fn(&str) -> Result<Vec<u8>>,
    pub shell_job: bool,
    /// `restore --ext-unix-sk`: connect saved connections to outside
    /// servers again.
    pub ext_unix_sk: bool,
    /// Pipes and FIFOs already created, by blob key: held until every
    /// description of them is open.
    pub pipes: HashMap<String, pipe::Held>,
    /// Deleted files already recreated, by blob name (one inode per dumped
    /// inode, however many descriptions it had).
    pub deleted: HashMap<String, deleted::Held>,
    /// Unix sockets made ahead of their descriptions.
    pub unix: unix::Restoring,
    /// memfds already created, by blob name (one per dumped inode).
    pub memfds: HashMap<String, OwnedFd>,
    /// POSIX message queues found or created, by queue inode at dump.
    pub mqueues: HashMap<u64, mqueue::Held>,
    /// Pseudo-terminal pairs, by saved pts number.
    pub ptys: pty::Ptys,
}

/// Restore: recreate every open file description in our own process.
/// Returns id -> OwnedFd (close-on-exec here; dup2 them into place).
pub fn restore_files(
    files: &FilesImage,
    read_blob: &dyn Fn(&str) -> Result<Vec<u8>>,
    shell_job: bool,
    ext_unix_sk: bool,
) -> Result<HashMap<u32, OwnedFd>> {
    let mut ctx = RestoreCtx {
        read_blob,
        shell_job,
        ext_unix_sk,
        pipes: HashMap::new(),
        deleted: HashMap::new(),
        unix: unix::Restoring::default(),
        memfds: HashMap::new(),
        mqueues: HashMap::new(),
        ptys: pty::Ptys::new(files),
    };
    let mut out = HashMap::with_capacity(files.files.len());
    // Unix sockets need an order among themselves (unix::restore_pass);
    // for every other kind the order does not matter.
    for pass in 0..3 {
        for of in files.files.iter().filter(|f| restore_pass(f) == pass) {
            let fd = restore_one(of, &mut ctx).with_context(|| format!("restoring open file {}", of.id))?;
            anyhow::ensure!(out.insert(of.id, fd).is_none(), "files image has open file {} twice", of.id);
        }
    }
    ctx.unix.finish(&out)?;
    // Dropping ctx closes the pipe ends no description of the image uses.
    Ok(out)
}

/// Unix sockets need an order among themselves; TCP listeners are bound
/// before the connections they accepted (which share their port: repair
/// mode lets those bind anyway, a listener without SO_REUSEADDR would not).
fn restore_pass(of: &OpenFile) -> u8 {
    match &of.kind {
        FileKind::Inet { .. } => 0,
        FileKind::TcpConn { .. } => 2,
        _ => unix::restore_pass(of),
    }
}

fn restore_one(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    match &of.kind {
        FileKind::Regular { .. } => regular::restore(of, ctx),
        FileKind::Deleted { .. } => deleted::restore(of, ctx),
        FileKind::Memfd { .. } => memfd::restore(of, ctx),
        FileKind::Pidfd { .. } => pidfd::restore(of, ctx),
        FileKind::CharDev { .. } | FileKind::Tty { .. } => chardev::restore(of, ctx),
        FileKind::Pipe { .. } | FileKind::Fifo { .. } => pipe::restore(of, ctx),
        FileKind::Eventfd { .. } => eventfd::restore(of, ctx),
        FileKind::Timerfd { .. } => timerfd::restore(of, ctx),
        FileKind::Signalfd { .. } => signalfd::restore(of, ctx),
        FileKind::Epoll { .. } => epoll::restore(of, ctx),
        FileKind::Inotify { .. } => inotify::restore(of, ctx),
        FileKind::Mqueue { .. } => mqueue::restore(of, ctx),
        FileKind::UnixPeer { .. } | FileKind::UnixListen { .. } | FileKind::UnixLone { .. } => unix::restore(of, ctx),
        FileKind::PtyMaster { .. } | FileKind::PtySlave { .. } => pty::restore(of, ctx),
        FileKind::Inet { .. } | FileKind::TcpConn { .. } => inet::restore(of, ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo() {
        let i = parse_fdinfo("pos:\t4096\nflags:\t02100002\nmnt_id:\t25\nino:\t7\n").unwrap();
        assert_eq!(i.pos, 4096);
        assert_eq!(i.flags, 0o2100002);
        assert!(i.flags & libc::O_CLOEXEC as u32 != 0);
        assert!(parse_fdinfo("pos: 1\n").is_err());
    }

    #[test]
    fn own_fds_listed() {
        let me = Pid(std::process::id() as i32);
        let f = fs::File::open("/proc/self/status").unwrap();
        let fds = list_fds(me).unwrap();
        assert!(fds.contains(&RemoteFd(f.as_raw_fd())));
        assert!(fds.windows(2).all(|w| w[0] < w[1]));
    }
}

/// Restore, inside a restored process once its fd table is in place (it
/// runs in the forked process, before its memory is replaced): the kinds
/// whose state names the process's own descriptor numbers (an epoll set
/// keys each watch by fd number) finish here. `fds` is the process's table.
pub fn after_fd_table(fds: &[FdEntry], files: &FilesImage) -> Result<()> {
    locks::after_fd_table(fds, files)?;
    mqueue::after_fd_table(fds, files)?;
    epoll::add_watches(fds, files)
}
