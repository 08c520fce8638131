//! timerfd: clock, unread expirations, settime flags, time left and interval,
//! all from fdinfo (`clockid:`, `ticks:`, `settime flags:` in octal,
//! `it_value: (s, ns)` = time left, `it_interval: (s, ns)`).
//!
//! Restore re-arms with `timerfd_settime`:
//! - a relative timer gets the time that was left at the dump (the time the
//!   program spent checkpointed does not count, as for CRIU);
//! - an absolute timer (`TFD_TIMER_ABSTIME`, with `TFD_TIMER_CANCEL_ON_SET`
//!   if it had it) is armed at the same absolute time on its clock
//!   (clock at dump + time left), so a deadline already passed fires at once;
//! - a periodic timer whose expiration was due at the dump (fdinfo shows a
//!   passed time as 0) runs on from the restore: its next expiration is one
//!   interval later, or at once if it had no unread expirations;
//! - unread expirations (`ticks` > 0) are then set exactly with the
//!   `TFD_IOC_SET_TICKS` ioctl (Linux with `CONFIG_CHECKPOINT_RESTORE`):
//!   a read returns the saved count, plus, for a periodic timer, the
//!   intervals that expire after the restore. Intervals a periodic timer had
//!   passed at the dump but the kernel had not counted yet (it counts them
//!   at the next read or `timerfd_gettime`) are not in fdinfo and are not
//!   restored. Fallback when the ioctl is missing (`ENOTTY`, `EINVAL`): the
//!   timer is armed to expire after 1 ns with its interval and snap waits
//!   until it has; a read then returns 1 (plus the intervals elapsed since),
//!   **a count above 1 is lost**, and a periodic timer's phase restarts.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{bail, ensure, Context, Result};
use nix::errno::Errno;

use super::eventfd::{fdinfo_text, field};
use super::{sys, DumpShared, Kind, Probe, RestoreCtx};
use crate::images::records::{FileKind, OpenFile};

pub const KIND: Kind = Kind { name: "timerfd", dump };

const NS: u64 = 1_000_000_000;

fn dump(p: &Probe, _: &mut DumpShared) -> Option<Result<FileKind>> {
    if p.link != "anon_inode:[timerfd]" {
        return None;
    }
    Some(dump_inner(p).with_context(|| p.what()))
}

/// "(4, 979455599)" -> ns.
fn parse_ts(v: &str) -> Result<u64> {
    let inner = v.trim().strip_prefix('(').and_then(|s| s.strip_suffix(')')).with_context(|| format!("time {v:?}"))?;
    let (s, ns) = inner.split_once(',').with_context(|| format!("time {v:?}"))?;
    let s: i64 = s.trim().parse().with_context(|| format!("time {v:?}"))?;
    let ns: i64 = ns.trim().parse().with_context(|| format!("time {v:?}"))?;
    // The kernel shows a time already passed as 0 or, on some paths, negative.
    if s < 0 || ns < 0 {
        return Ok(0);
    }
    Ok(s as u64 * NS + ns as u64)
}

fn clock_now(clockid: i32) -> Result<u64> {
    let ts = super::sys::clock_now(clockid).with_context(|| format!("clock_gettime({clockid})"))?;
    Ok(ts.tv_sec as u64 * NS + ts.tv_nsec as u64)
}

fn dump_inner(p: &Probe) -> Result<FileKind> {
    let text = fdinfo_text(p)?;
    let get = |k: &str| field(&text, k).with_context(|| format!("fdinfo has no {k}"));
    let clockid: i32 = get("clockid:")?.parse().context("clockid")?;
    let ticks: u64 = get("ticks:")?.parse().context("ticks")?;
    let settime_flags = u32::from_str_radix(get("settime flags:")?, 8).context("settime flags")?;
    let value_ns = parse_ts(get("it_value:")?)?;
    let interval_ns = parse_ts(get("it_interval:")?)?;
    let abs_ns = if settime_flags & libc::TFD_TIMER_ABSTIME as u32 != 0 && value_ns > 0 {
        clock_now(clockid)? + value_ns
    } else {
        0
    };
    Ok(FileKind::Timerfd { clockid, ticks, settime_flags, value_ns, interval_ns, abs_ns })
}

fn ts(ns: u64) -> libc::timespec {
    libc::timespec { tv_sec: (ns / NS) as libc::time_t, tv_nsec: (ns % NS) as libc::c_long }
}

fn settime(fd: &OwnedFd, flags: i32, value: u64, interval: u64) -> Result<()> {
    let its = libc::itimerspec { it_interval: ts(interval), it_value: ts(value) };
    super::sys::timerfd_settime(fd.as_fd(), flags, &its)
        .with_context(|| format!("timerfd_settime(flags {flags:#o}, value {value} ns, interval {interval} ns)"))
}

pub fn restore(of: &OpenFile, _: &mut RestoreCtx) -> Result<OwnedFd> {
    let FileKind::Timerfd { clockid, ticks, settime_flags, value_ns, interval_ns, abs_ns } = *&of.kind else {
        bail!("not a timerfd")
    };
    let mut fl = libc::TFD_CLOEXEC;
    if of.flags & libc::O_NONBLOCK as u32 != 0 {
        fl |= libc::TFD_NONBLOCK;
    }
    let fd = super::sys::timerfd_create(clockid, fl).with_context(|| format!("timerfd_create(clock {clockid})"))?;
    let what = || format!("timerfd (clock {clockid})");
    if value_ns > 0 {
        let abs = settime_flags & libc::TFD_TIMER_ABSTIME as u32 != 0;
        if abs {
            let flags = settime_flags as i32 & (libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET);
            settime(&fd, flags, abs_ns, interval_ns).with_context(what)?;
        } else {
            settime(&fd, 0, value_ns, interval_ns).with_context(what)?;
        }
    } else if interval_ns > 0 {
        // Periodic and due at the dump: the unread count is set below.
        let first = if ticks > 0 { interval_ns } else { 1 };
        settime(&fd, 0, first, interval_ns).with_context(what)?;
    }
    if ticks > 0 {
        match sys::timerfd_set_ticks(fd.as_fd(), ticks) {
            Ok(()) => {}
            Err(Errno::ENOTTY) | Err(Errno::EINVAL) => {
                // No TFD_IOC_SET_TICKS: expire once now, so the descriptor is
                // readable as it was (the count comes back as 1).
                settime(&fd, 0, 1, interval_ns).with_context(what)?;
                let mut pfd = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
                let n = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(5000u16)).with_context(what)?;
                ensure!(n == 1, "{}: the 1 ns re-arm did not expire within 5 s", what());
            }
            Err(e) => return Err(e).with_context(|| format!("{}: TFD_IOC_SET_TICKS {ticks}", what())),
        }
    }
    Ok(fd)
}
