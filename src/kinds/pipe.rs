//! Pipes and named pipes (FIFOs), both ends, with the bytes buffered in them.
//!
//! Dump reads the buffered bytes without consuming them: `tee()` duplicates
//! the pipe's buffers into a temporary pipe of our own of the same size, and
//! we read that one. The data is stored once per pipe, whichever end is seen
//! first. Restore creates one pipe per pipe id, fills it, uses pipe2()'s
//! description of each end for the first description of that end, and opens
//! any further one anew through /proc/self/fd so each has its own flags.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::fcntl::{fcntl, tee, FcntlArg, OFlag, SpliceFFlags};

use super::{open_with_flags, sys, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "pipe", dump };

/// Blob holding the buffered bytes of a pipe or FIFO.
pub fn blob_name(fifo: bool, pipe_id: u64) -> String {
    if fifo {
        format!("fifo-{pipe_id}.data")
    } else {
        format!("pipe-{pipe_id}.data")
    }
}

fn dump(p: &Probe, sh: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.file_type() != libc::S_IFIFO {
        return None;
    }
    let fifo = !p.link.starts_with("pipe:[");
    if fifo && !p.link.starts_with('/') {
        return None;
    }
    Some(dump_inner(p, sh, fifo).with_context(|| p.what()))
}

fn dump_inner(p: &Probe, sh: &mut DumpShared, fifo: bool) -> Result<FileKind> {
    let pipe_id = p.st.st_ino;
    let write_end = p.flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
    let pipe_size = fcntl(p.ours.as_raw_fd(), FcntlArg::F_GETPIPE_SZ).context("F_GETPIPE_SZ")? as u64;
    let buffered = sys::fionread(p.ours).context("FIONREAD")? as u64;
    let blob = blob_name(fifo, pipe_id);
    if buffered > 0 && !sh.saved.contains(&blob) {
        let data = peek(p.ours, pipe_size as usize, buffered as usize)?;
        sh.saved.insert(blob.clone());
        sh.blobs.push((blob, data));
    }
    Ok(if fifo {
        FileKind::Fifo { path: p.link.clone(), pipe_id, write_end, buffered, pipe_size }
    } else {
        FileKind::Pipe { pipe_id, write_end, buffered, pipe_size }
    })
}

/// The `buffered` bytes in the pipe behind `fd` (either end), left in place.
fn peek(fd: BorrowedFd<'_>, pipe_size: usize, buffered: usize) -> Result<Vec<u8>> {
    // A read end of the same pipe: a new description, so the target's own
    // flags are not touched and a write end works as well.
    let ours = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let reader = open_with_flags(&ours, (libc::O_RDONLY | libc::O_NONBLOCK) as u32)
        .with_context(|| format!("opening a read end through {ours}"))?;
    let (tmp_r, tmp_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).context("pipe2")?;
    fcntl(tmp_w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(pipe_size as i32))
        .with_context(|| format!("F_SETPIPE_SZ {pipe_size} on the temporary pipe"))?;
    // One tee only: a second would duplicate the same bytes again.
    let n = tee(&reader, &tmp_w, buffered, SpliceFFlags::SPLICE_F_NONBLOCK).context("tee")?;
    ensure!(n == buffered, "tee copied {n} of the {buffered} buffered bytes");
    drop(tmp_w);
    let mut data = Vec::with_capacity(buffered);
    std::fs::File::from(tmp_r).read_to_end(&mut data).context("reading the temporary pipe")?;
    ensure!(data.len() == buffered, "read {} of the {buffered} buffered bytes", data.len());
    Ok(data)
}

/// A pipe or FIFO created at restore, held open until every description of
/// it is open. For a pipe: (read end, write end); for a FIFO: one O_RDWR fd.
pub struct Held {
    read: OwnedFd,
    write: Option<OwnedFd>,
    /// Which ends (read, write) of a pipe already handed out their pipe2()
    /// description (see `restore`).
    given: [bool; 2],
}

impl Held {
    fn end(&self, write_end: bool) -> BorrowedFd<'_> {
        match (&self.write, write_end) {
            (Some(w), true) => w.as_fd(),
            _ => self.read.as_fd(),
        }
    }
}

fn fill(fd: BorrowedFd<'_>, pipe_size: u64, data: &[u8]) -> Result<()> {
    let cur = fcntl(fd.as_raw_fd(), FcntlArg::F_GETPIPE_SZ).context("F_GETPIPE_SZ")? as u64;
    if cur != pipe_size {
        let sz = i32::try_from(pipe_size).map_err(|_| anyhow!("pipe size {pipe_size} too big"))?;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(sz)).with_context(|| format!("F_SETPIPE_SZ {pipe_size}"))?;
    }
    let mut off = 0;
    while off < data.len() {
        match nix::unistd::write(fd, &data[off..]) {
            Ok(n) => off += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).with_context(|| format!("writing {} buffered bytes (at {off})", data.len())),
        }
    }
    Ok(())
}

pub fn restore(of: &OpenFile, ctx: &mut RestoreCtx) -> Result<OwnedFd> {
    let (fifo, path, pipe_id, write_end, buffered, pipe_size) = match &of.kind {
        FileKind::Pipe { pipe_id, write_end, buffered, pipe_size } => {
            (false, None, *pipe_id, *write_end, *buffered, *pipe_size)
        }
        FileKind::Fifo { path, pipe_id, write_end, buffered, pipe_size } => {
            (true, Some(path.as_str()), *pipe_id, *write_end, *buffered, *pipe_size)
        }
        _ => bail!("not a pipe"),
    };
    let name = match path {
        Some(p) => format!("fifo {p} (pipe {pipe_id})"),
        None => format!("pipe:[{pipe_id}]"),
    };
    let key = blob_name(fifo, pipe_id);
    if !ctx.pipes.contains_key(&key) {
        let held = if let Some(p) = path {
            // O_RDWR never blocks on a FIFO; it keeps the buffer alive too.
            let fd = open_with_flags(p, (libc::O_RDWR | libc::O_NONBLOCK) as u32)
                .with_context(|| format!("{name}: opening"))?;
            let st = nix::sys::stat::fstat(fd.as_raw_fd()).with_context(|| format!("{name}: fstat"))?;
            ensure!(st.st_mode & libc::S_IFMT == libc::S_IFIFO, "{name}: is not a FIFO any more");
            Held { read: fd, write: None, given: [true, true] }
        } else {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
                .with_context(|| format!("{name}: pipe2"))?;
            Held { read: r, write: Some(w), given: [false, false] }
        };
        let data = if buffered > 0 {
            (ctx.read_blob)(&key).with_context(|| format!("{name}: reading blob {key}"))?
        } else {
            Vec::new()
        };
        ensure!(
            data.len() as u64 == buffered,
            "{name}: blob {key} has {} bytes, the image says {buffered}",
            data.len()
        );
        fill(held.end(true), pipe_size, &data).with_context(|| format!("{name}: filling"))?;
        ctx.pipes.insert(key.clone(), held);
    }
    let held = ctx.pipes.get_mut(&key).ok_or_else(|| anyhow!("{name}: lost"))?;
    // The first description of each end of an anonymous pipe is the one
    // pipe2() made, with its status flags set: reopening through /proc
    // would add O_LARGEFILE, which pipe() never sets (F_GETFL would differ).
    if !fifo && of.flags & libc::O_LARGEFILE as u32 == 0 && !held.given[write_end as usize] {
        held.given[write_end as usize] = true;
        let fd = held.end(write_end).try_clone_to_owned().with_context(|| format!("{name}: dup"))?;
        const SETTABLE: u32 = (libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME) as u32;
        let fl = OFlag::from_bits_truncate((of.flags & SETTABLE) as i32);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl)).with_context(|| format!("{name}: F_SETFL {:#o}", of.flags))?;
        return Ok(fd);
    }
    let ours = format!("/proc/self/fd/{}", held.end(write_end).as_raw_fd());
    let fd = open_with_flags(&ours, of.flags)
        .with_context(|| format!("{name}: opening the {} end with flags {:#o}", if write_end { "write" } else { "read" }, of.flags))?;
    Ok(fd)
}
