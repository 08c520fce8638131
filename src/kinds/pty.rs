//! Pseudo-terminals held inside the dump: a `/dev/ptmx` master and the
//! `/dev/pts/N` slaves of the same pair (a tree started by `script`, `tmux`,
//! `sshd`-like programs, `expect`).
//!
//! Dump: the master's pts number comes from TIOCGPTN on our copy; a slave
//! is matched to it by its index (device minor) and its devpts instance.
//! The state of the pair is read through the master, which the kernel lets
//! reach the slave's settings without changing anything: termios (TCGETS2),
//! window size, packet mode, lock, the session that has the slave as its
//! controlling terminal (TIOCGSID) and its foreground process group
//! (TIOCGPGRP). TIOCEXCL is read on a slave. Every check that needs all
//! processes (a slave's master in the dump, the session leader in the dump,
//! no holder outside) runs at the end of the dump, in [`check`].
//!
//! A slave whose master is outside the dump is the terminal the tree runs
//! on: `--shell-job` turns it into a [`FileKind::Tty`] (restore gives snap's
//! own terminal), without it the dump is refused naming it.
//!
//! Not saved: bytes queued in the pair. A terminal's queues cannot be read
//! without consuming them (no peek, no tee), so the dump reports their sizes
//! (FIONREAD on the master: output not yet read by it; on a slave: input not
//! yet read by the program, complete lines only in canonical mode) on
//! stderr and they are lost at restore, as is a half-typed canonical line.
//! An idle interactive program has both queues empty.
//!
//! Restore: a new pair from `/dev/ptmx`, opened until the saved pts number
//! comes up (devpts hands out the lowest free number), so the restored
//! programs usually see the same `/dev/pts/N`; if that number is taken they
//! get another one. Settings are applied through the master, slaves are
//! opened with TIOCGPTPEER. The controlling terminal is given back by the
//! restored session leader itself (TIOCSCTTY right after its setsid, before
//! it forks the rest of the session: `restore/tree.rs`), through a slave
//! descriptor the pool keeps for it ([`ctty_fds`]); the foreground group is
//! set once every process group exists (TIOCSPGRP, a remote call in the
//! leader: `restore/mod.rs`).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::stat::{major, minor};
use serde::{Deserialize, Serialize};

use super::{open_with_flags, sys, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, FilesImage, OpenFile};
use crate::types::{Pid, RemoteFd};

pub const KIND: Kind = Kind { name: "pty", dump };

/// The state of a pseudo-terminal pair, saved with its master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PtyState {
    pub termios: Termios,
    pub winsize: Winsize,
    /// TIOCPKT packet mode on the master.
    pub packet: bool,
    /// The slave is locked (TIOCSPTLCK; unlockpt not called yet).
    pub locked: bool,
    /// Session (its leader's pid) that has the slave as its controlling
    /// terminal; 0: none.
    pub session: i32,
    /// Foreground process group of that terminal; 0: none.
    pub foreground: i32,
}

/// `struct termios2` of the slave.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: Vec<u8>,
    pub ispeed: u32,
    pub ospeed: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Winsize {
    pub rows: u16,
    pub cols: u16,
    pub xpixel: u16,
    pub ypixel: u16,
}

/// What the dump noted of one pty descriptor, for the checks at the end.
pub struct Seen {
    pid: Pid,
    fd: RemoteFd,
    index: u32,
    /// st_dev of the devpts instance the pair lives in.
    devpts: u64,
    master: bool,
}

fn is_pts_major(maj: u64) -> bool {
    (136..=143).contains(&maj)
}

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFCHR {
        return None;
    }
    let (maj, min) = (major(p.st.st_rdev), minor(p.st.st_rdev));
    if (maj, min) == (5, 2) {
        return Some(dump_master(p, sh).with_context(|| p.what()));
    }
    if is_pts_major(maj) {
        let index = ((maj - 136) * 256 + min) as u32;
        return Some(dump_slave(p, sh, index).with_context(|| p.what()));
    }
    None
}

fn dump_master(p: &Probe, sh: &mut DumpShared) -> Result<FileKind> {
    let m = p.ours;
    let index = sys::ioctl_get_int(m, libc::TIOCGPTN).context("TIOCGPTN")? as u32;
    // /dev/pts/ptmx lives in the devpts instance itself; /dev/ptmx reaches
    // the one mounted on /dev/pts as the holder sees it.
    let devpts = if p.link.starts_with("/dev/pts/") {
        p.st.st_dev
    } else {
        let at = format!("/proc/{}/root/dev/pts", p.pid.0);
        std::fs::metadata(&at).with_context(|| format!("stat {at}"))?.dev()
    };
    let t = sys::tcgets2(m).context("TCGETS2")?;
    let w = sys::get_winsize(m).context("TIOCGWINSZ")?;
    let packet = sys::ioctl_get_int(m, libc::TIOCGPKT).context("TIOCGPKT")? != 0;
    let locked = sys::ioctl_get_int(m, libc::TIOCGPTLCK).context("TIOCGPTLCK")? != 0;
    let session = match sys::ioctl_get_int(m, libc::TIOCGSID) {
        Ok(s) => s,
        Err(nix::errno::Errno::ENOTTY) => 0, // no session has it
        Err(e) => return Err(e).context("TIOCGSID"),
    };
    let foreground = if session == 0 { 0 } else { sys::ioctl_get_int(m, libc::TIOCGPGRP).context("TIOCGPGRP")? };
    let unread = sys::ioctl_get_int(m, libc::FIONREAD).context("FIONREAD")?;
    if unread > 0 {
        eprintln!(
            "snap: warning: {}: {unread} byte(s) of terminal output not yet read from the master of /dev/pts/{index} \
             are not saved (a terminal's queue cannot be read without consuming it)",
            p.what()
        );
    }
    sh.ptys.push(Seen { pid: p.pid, fd: p.fd, index, devpts, master: true });
    Ok(FileKind::PtyMaster {
        path: p.link.clone(),
        index,
        state: PtyState {
            termios: Termios {
                iflag: t.c_iflag,
                oflag: t.c_oflag,
                cflag: t.c_cflag,
                lflag: t.c_lflag,
                line: t.c_line,
                cc: t.c_cc.to_vec(),
                ispeed: t.c_ispeed,
                ospeed: t.c_ospeed,
            },
            winsize: Winsize { rows: w.ws_row, cols: w.ws_col, xpixel: w.ws_xpixel, ypixel: w.ws_ypixel },
            packet,
            locked,
            session,
            foreground,
        },
    })
}

fn dump_slave(p: &Probe, sh: &mut DumpShared, index: u32) -> Result<FileKind> {
    let exclusive = sys::ioctl_get_int(p.ours, libc::TIOCGEXCL).context("TIOCGEXCL")? != 0;
    let unread = sys::ioctl_get_int(p.ours, libc::FIONREAD).context("FIONREAD")?;
    let key = format!("pty-input-{}-{index}", p.st.st_dev);
    if unread > 0 && sh.saved.insert(key) {
        eprintln!(
            "snap: warning: {}: {unread} byte(s) of terminal input not yet read by the program \
             are not saved (a terminal's queue cannot be read without consuming it)",
            p.what()
        );
    }
    sh.ptys.push(Seen { pid: p.pid, fd: p.fd, index, devpts: p.st.st_dev, master: false });
    Ok(FileKind::PtySlave { path: p.link.clone(), index, exclusive })
}

/// End of the dump, every process seen. A pair is the tree's own when its
/// master is in the dump and no process outside the dump holds its master
/// or a slave: then the session that has it as its terminal must be in the
/// dump too. Any other pair is a terminal the tree runs on: `--shell-job`
/// turns its slaves into `Tty` (snap's terminal at restore; a master of it
/// that leaked into the tree comes back as a new pair, unconnected), or the
/// dump is refused. `who`: the (pid, fd) each open file was first seen at.
pub fn check(files: &mut [OpenFile], who: &HashMap<u32, (Pid, RemoteFd)>, sh: &DumpShared) -> Result<()> {
    let seen = |id: u32| -> Option<&Seen> {
        let &(pid, fd) = who.get(&id)?;
        sh.ptys.iter().find(|s| s.pid == pid && s.fd == fd)
    };
    // Pairs whose master is in the dump -> processes outside that hold them.
    let mut outside: HashMap<(u32, u64), Vec<i32>> = HashMap::new();
    for s in sh.ptys.iter().filter(|s| s.master) {
        outside.entry((s.index, s.devpts)).or_insert_with(|| outside_holders(s.index, s.devpts, &sh.dumped));
    }
    let list = |v: &[i32]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    for of in files.iter_mut() {
        let id = of.id;
        match &mut of.kind {
            FileKind::PtySlave { path, .. } => {
                let s = seen(id).ok_or_else(|| anyhow!("open file {id} ({path}): no holder noted"))?;
                let why = match outside.get(&(s.index, s.devpts)) {
                    Some(o) if o.is_empty() => continue, // the tree's own pair
                    Some(o) => format!("whose master is in the dump but that is also open in process(es) outside it ({})", list(o)),
                    None => "whose master is not held by any process of the dump (the terminal the tree runs on?)".to_string(),
                };
                if !sh.shell_job {
                    bail!(
                        "{} {} ({path}): a pseudo-terminal {why}; use --shell-job to give the restored processes \
                         snap's own terminal instead",
                        s.pid,
                        s.fd
                    );
                }
                of.kind = FileKind::Tty { path: path.clone() };
            }
            FileKind::PtyMaster { index, state, .. } => {
                let s = seen(id).ok_or_else(|| anyhow!("open file {id} (/dev/ptmx): no holder noted"))?;
                let what = format!("{} {} (master of /dev/pts/{index})", s.pid, s.fd);
                let o = &outside[&(s.index, s.devpts)];
                if !o.is_empty() {
                    if !sh.shell_job {
                        bail!(
                            "{what}: /dev/pts/{index} is also open in process(es) outside the dump ({}): refusing, \
                             they would lose their terminal (with --shell-job it is taken as the terminal the \
                             tree runs on)",
                            list(o)
                        );
                    }
                    // The outside terminal's master leaked into the tree:
                    // restored as a new pair that is nobody's terminal.
                    state.session = 0;
                    state.foreground = 0;
                    continue;
                }
                let has_slaves = sh.ptys.iter().any(|x| !x.master && x.index == s.index && x.devpts == s.devpts);
                if state.locked && (has_slaves || state.session != 0) {
                    bail!("{what}: a locked pseudo-terminal with its slave open is not supported");
                }
                if state.session != 0 && !sh.dumped.contains(&Pid(state.session)) {
                    bail!(
                        "{what}: it is the controlling terminal of session {}, whose leader is not in the dump; \
                         dump the tree from the session leader (or an ancestor of it)",
                        state.session
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Processes outside `dumped` (and not snap) holding the master or a slave
/// of pair `index` of the devpts instance `devpts`.
fn outside_holders(index: u32, devpts: u64, dumped: &[Pid]) -> Vec<i32> {
    let slave = format!("/dev/pts/{index}");
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me || dumped.contains(&Pid(pid)) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        let holds = fds.flatten().any(|f| {
            let Ok(l) = std::fs::read_link(f.path()) else { return false };
            if l.as_os_str() == slave.as_str() {
                return std::fs::metadata(f.path()).is_ok_and(|m| m.dev() == devpts && is_pts_major(major(m.rdev())));
            }
            if l.as_os_str() != "/dev/ptmx" && l.as_os_str() != "/dev/pts/ptmx" {
                return false;
            }
            // A master: its pts number is in fdinfo (Linux 4.14+).
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", f.file_name().to_string_lossy()));
            let n = info.ok().and_then(|t| t.lines().find_map(|x| x.strip_prefix("tty-index:")?.trim().parse::<u32>().ok()));
            let their_devpts = if l.as_os_str() == "/dev/ptmx" {
                std::fs::metadata(format!("/proc/{pid}/root/dev/pts")).map(|m| m.dev()).ok()
            } else {
                std::fs::metadata(f.path()).map(|m| m.dev()).ok()
            };
            n == Some(index) && their_devpts == Some(devpts)
        });
        if holds {
            out.push(pid);
        }
    }
    out
}

/// A pair created at restore, by saved pts number.
struct Held {
    master: OwnedFd,
    /// pts number of the new pair.
    index: u32,
    master_given: bool,
}

/// Restore-side pairs: the saved master records (a slave may come first in
/// the image) and the pairs already created.
#[derive(Default)]
pub struct Ptys {
    saved: HashMap<u32, (u32, PtyState)>,
    open: HashMap<u32, Held>,
}

impl Ptys {
    pub fn new(files: &FilesImage) -> Ptys {
        let mut p = Ptys::default();
        for of in &files.files {
            if let FileKind::PtyMaster { index, state, .. } = &of.kind {
                p.saved.insert(*index, (of.flags, state.clone()));
            }
        }
        p
    }

    fn get(&mut self, index: u32) -> Result<&mut Held> {
        if !self.open.contains_key(&index) {
            let (flags, state) =
                self.saved.get(&index).ok_or_else(|| anyhow!("no master for /dev/pts/{index} in the image"))?;
            let held = create(index, *flags, state).with_context(|| format!("recreating pty /dev/pts/{index}"))?;
            self.open.insert(index, held);
        }
        self.open.get_mut(&index).ok_or_else(|| anyhow!("pty {index} lost"))
    }
}

/// At most this many spare pairs are opened to get the saved pts number.
const MAX_SPARE: usize = 1024;

/// Open /dev/ptmx until pts number `want` comes up or a higher one does
/// (then `want` is taken: any number will do).
fn open_ptmx(want: u32, flags: u32) -> Result<(OwnedFd, u32)> {
    let mut spare: Vec<(OwnedFd, u32)> = Vec::new();
    loop {
        let fd = match open_with_flags("/dev/ptmx", flags | libc::O_NOCTTY as u32) {
            Ok(fd) => fd,
            Err(_) if !spare.is_empty() => return Ok(spare.pop().expect("not empty")),
            Err(e) => return Err(e).context("opening /dev/ptmx"),
        };
        let n = sys::ioctl_get_int(fd.as_fd(), libc::TIOCGPTN).context("TIOCGPTN")? as u32;
        if n >= want || spare.len() >= MAX_SPARE {
            return Ok((fd, n)); // the spare pairs close here
        }
        spare.push((fd, n));
    }
}

fn create(want: u32, flags: u32, st: &PtyState) -> Result<Held> {
    let (master, index) = open_ptmx(want, flags)?;
    let m = master.as_fd();
    sys::ioctl_set_int(m, libc::TIOCSPTLCK, 0).context("unlocking (TIOCSPTLCK)")?;
    let t = &st.termios;
    let mut t2 = sys::tcgets2(m).context("TCGETS2")?;
    t2.c_iflag = t.iflag;
    t2.c_oflag = t.oflag;
    t2.c_cflag = t.cflag;
    t2.c_lflag = t.lflag;
    t2.c_line = t.line;
    if t.cc.len() != t2.c_cc.len() {
        bail!("saved termios has {} control characters, this system {}", t.cc.len(), t2.c_cc.len());
    }
    t2.c_cc.copy_from_slice(&t.cc);
    t2.c_ispeed = t.ispeed;
    t2.c_ospeed = t.ospeed;
    // On a master, the termios and window-size requests act on the slave.
    sys::tcsets2(m, &t2).context("TCSETS2")?;
    let w = &st.winsize;
    sys::set_winsize(m, &libc::winsize { ws_row: w.rows, ws_col: w.cols, ws_xpixel: w.xpixel, ws_ypixel: w.ypixel })
        .context("TIOCSWINSZ")?;
    if st.packet {
        sys::ioctl_set_int(m, libc::TIOCPKT, 1).context("TIOCPKT")?;
    }
    if st.locked {
        // Only without slaves (the dump refuses the rest).
        sys::ioctl_set_int(m, libc::TIOCSPTLCK, 1).context("locking (TIOCSPTLCK)")?;
    }
    Ok(Held { master, index, master_given: false })
}

/// Open the slave of `master` with the saved status flags, never as snap's
/// controlling terminal.
fn open_slave(master: BorrowedFd<'_>, flags: u32) -> nix::Result<OwnedFd> {
    let drop = (libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) as u32;
    let fl = (flags & !drop) | (libc::O_NOCTTY | libc::O_CLOEXEC) as u32;
    sys::open_pty_peer(master, fl as i32)
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    match &of.kind {
        FileKind::PtyMaster { index, .. } => {
            let held = ctx.ptys.get(*index)?;
            if held.master_given {
                bail!("the image has two master descriptions for /dev/pts/{index}");
            }
            held.master_given = true;
            held.master.try_clone().with_context(|| format!("dup of the master of /dev/pts/{index}"))
        }
        FileKind::PtySlave { path, index, exclusive } => {
            let held = ctx.ptys.get(*index)?;
            let fd = open_slave(held.master.as_fd(), of.flags).with_context(|| {
                format!("{path}: opening the new slave /dev/pts/{} (TIOCGPTPEER, flags {:#o})", held.index, of.flags)
            })?;
            if *exclusive {
                sys::ioctl_arg(fd.as_fd(), libc::TIOCEXCL, 0).with_context(|| format!("{path}: TIOCEXCL"))?;
            }
            Ok(fd)
        }
        _ => bail!("not a pseudo-terminal"),
    }
}

/// After every description is restored: for each pair that was a session's
/// controlling terminal, (session leader's pid, a slave descriptor) for the
/// leader's TIOCSCTTY. `fds`: the restored descriptions by id.
pub fn ctty_fds(files: &FilesImage, fds: &HashMap<u32, OwnedFd>) -> Result<Vec<(i32, OwnedFd)>> {
    let mut out = Vec::new();
    for of in &files.files {
        let FileKind::PtyMaster { index, state, .. } = &of.kind else { continue };
        if state.session == 0 {
            continue;
        }
        let m = fds.get(&of.id).ok_or_else(|| anyhow!("master of /dev/pts/{index}: not restored"))?;
        let fd = open_slave(m.as_fd(), libc::O_RDWR as u32)
            .with_context(|| format!("opening the slave of /dev/pts/{index} for session {}", state.session))?;
        out.push((state.session, fd));
    }
    Ok(out)
}

/// (session, foreground process group) of every pair that was a session's
/// controlling terminal.
pub fn foreground(files: &FilesImage) -> Vec<(i32, i32)> {
    files
        .files
        .iter()
        .filter_map(|of| match &of.kind {
            FileKind::PtyMaster { state, .. } if state.session != 0 => Some((state.session, state.foreground)),
            _ => None,
        })
        .collect()
}
