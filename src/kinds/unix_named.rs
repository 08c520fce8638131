//! Giving restored Unix sockets their names without touching the real file
//! system.
//!
//! A socket's name is the byte string it was bound with, or, for an
//! accepted socket, a copy of its listener's. Two restore cases need a name
//! on a socket that does not own a file at that path:
//!
//! - the accepted end of a stream or seqpacket connection: a temporary
//!   listener is bound to the same name, the other end (bound first to its
//!   own name, if it had one) connects to it, and accept() gives the end with
//!   the name; the temporary listener is closed right away;
//! - the sender of a queued datagram: a temporary socket connects to the
//!   receiver, is then bound to the sender's name and sends the message, so
//!   recvfrom() tells the same sender.
//!
//! A path name is bound inside a private root: a thread unshare(CLONE_FS)s
//! and chroot()s into an empty temporary directory where the path's parent
//! directories are made, binds there, and the directory is removed
//! afterwards. The string is the same, so getsockname()/getpeername()
//! return it, and nothing appears at (or is removed from) the real path,
//! where the real listener may be bound before or after. An abstract name
//! is bound in snap's own network namespace (a socket's namespace is fixed
//! when it is created, and a later dump queries snap's): it must be free
//! on this host at that moment, so `unix.rs` makes these connections
//! before it binds any restored socket to a name of its own.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::sys;
use super::unix_diag as diag;
use super::unix_queue;

/// "/path", "@abstract" (raw bytes to show).
pub fn show(raw: &[u8]) -> String {
    match raw.first() {
        None => "(unnamed)".into(),
        Some(0) => format!("@{}", String::from_utf8_lossy(&raw[1..])),
        Some(_) => String::from_utf8_lossy(raw).into_owned(),
    }
}

/// A sun_path as the kernel gives it, without the trailing NULs of a path.
pub fn trim(n: &[u8]) -> Vec<u8> {
    if n.first() == Some(&0) {
        return n.to_vec();
    }
    let end = n.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    n[..end].to_vec()
}

fn is_path(raw: &[u8]) -> bool {
    raw.first().is_some_and(|&c| c != 0)
}

/// Run `f` in a thread whose root is a fresh empty directory in which the
/// parent directories of the path names in `names` exist; in this thread if
/// there is no path name among them.
fn in_private_root<T: Send>(names: &[&[u8]], f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let paths: Vec<&[u8]> = names.iter().copied().filter(|n| is_path(n)).collect();
    if paths.is_empty() {
        return f();
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("snap-unix-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).context("unshare(CLONE_FS)")?;
            nix::unistd::chroot(&dir).with_context(|| format!("chroot {} (needs CAP_SYS_CHROOT)", dir.display()))?;
            nix::unistd::chdir("/").context("chdir / in the private root")?;
            for p in &paths {
                let full = Path::new("/").join(Path::new(std::ffi::OsStr::from_bytes(p)));
                if let Some(parent) = full.parent() {
                    fs::create_dir_all(parent).with_context(|| format!("making {} in the private root", parent.display()))?;
                }
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the private-root thread panicked")))
    });
    let _ = fs::remove_dir_all(&dir);
    r
}

/// A connection whose accepting end is named `acc` (the listener's name)
/// and whose connecting end is bound to `con` first (empty: unnamed).
/// Returns (accepted end, connecting end).
pub fn named_pair(ty: SockType, acc: &[u8], con: &[u8]) -> Result<(OwnedFd, OwnedFd)> {
    in_private_root(&[acc, con], || {
        let l = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
        sys::bind(l.as_fd(), acc).with_context(|| format!("binding a temporary listener to {}", show(acc)))?;
        sys::listen(l.as_fd(), 1).context("listen")?;
        let c = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
        if !con.is_empty() {
            sys::bind(c.as_fd(), con).with_context(|| format!("binding the connecting end to {}", show(con)))?;
        }
        sys::connect(c.as_fd(), acc).with_context(|| format!("connecting to the temporary listener {}", show(acc)))?;
        let a = sys::accept(l.as_fd()).context("accept")?;
        Ok((a, c))
    })
}

/// Send the saved datagrams `msgs` (lengths) of `data` to the socket named
/// `to`, each from a socket with its saved sender's name: a restored socket
/// of the image that holds that name (`known`), else a temporary one.
pub fn send_datagrams(
    to: &[u8],
    data: &[u8],
    msgs: &[u64],
    senders: &[Vec<u8>],
    known: &HashMap<Vec<u8>, OwnedFd>,
    files: &unix_queue::FilesOf<'_>,
) -> Result<()> {
    anyhow::ensure!(senders.len() == msgs.len(), "{} senders for {} saved datagrams", senders.len(), msgs.len());
    let lens = unix_queue::lengths(data, msgs, false)?;
    // One temporary socket per distinct sender not known, connected to the
    // receiver (path names resolve outside the private root).
    let mut temps: HashMap<&[u8], OwnedFd> = HashMap::new();
    for s in senders {
        if known.contains_key(s) || temps.contains_key(s.as_slice()) {
            continue;
        }
        let t = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
        sys::connect(t.as_fd(), to).with_context(|| format!("connecting a stand-in for sender {} to {}", show(s), show(to)))?;
        unix_queue::make_room(t.as_fd(), data.len(), msgs.len())?;
        temps.insert(s, t);
    }
    let named: Vec<(&[u8], BorrowedFd<'_>)> = temps.iter().filter(|(s, _)| !s.is_empty()).map(|(s, t)| (*s, t.as_fd())).collect();
    let names: Vec<&[u8]> = named.iter().map(|(s, _)| *s).collect();
    in_private_root(&names, || {
        for (s, t) in &named {
            sys::bind(*t, s).with_context(|| format!("binding a stand-in for sender {} (is the name taken on this host?)", show(s)))?;
        }
        Ok(())
    })?;
    // Restored senders get their send buffer back afterwards.
    let mut raised: Vec<(BorrowedFd<'_>, i32)> = Vec::new();
    for k in senders.iter().filter_map(|s| known.get(s)) {
        if raised.iter().all(|(f, _)| f.as_raw_fd() != k.as_raw_fd()) {
            let v = sys::get_int(k.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF).context("getsockopt(SO_SNDBUF)")?;
            unix_queue::make_room(k.as_fd(), data.len(), msgs.len())?;
            raised.push((k.as_fd(), v));
        }
    }
    let r = send_all(to, data, lens, senders, known, &temps, files);
    for (k, v) in raised {
        diag::set_buf(k, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, v as u64).context("putting SO_SNDBUF back")?;
    }
    r
}

fn send_all(
    to: &[u8],
    data: &[u8],
    lens: Vec<usize>,
    senders: &[Vec<u8>],
    known: &HashMap<Vec<u8>, OwnedFd>,
    temps: &HashMap<&[u8], OwnedFd>,
    files: &unix_queue::FilesOf<'_>,
) -> Result<()> {
    let mut off = 0;
    for (i, (len, s)) in lens.into_iter().zip(senders).enumerate() {
        let msg = &data[off..off + len];
        let r = match known.get(s) {
            Some(k) => unix_queue::send_one(k.as_fd(), msg, Some(to), false, &files(i)),
            None => unix_queue::send_one(temps[s.as_slice()].as_fd(), msg, None, false, &files(i)),
        };
        r.with_context(|| format!("sending a saved {len}-byte datagram from {} to {}", show(s), show(to)))?;
        off += len;
    }
    Ok(())
}

/// Raw sun_path bytes of a stored name: "@x" is abstract, anything else a
/// path.
pub fn raw(name: &str) -> Vec<u8> {
    match name.strip_prefix('@') {
        Some(abs) => std::iter::once(0).chain(abs.bytes()).collect(),
        None => name.as_bytes().to_vec(),
    }
}
