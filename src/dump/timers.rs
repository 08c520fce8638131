//! POSIX timers: ids, clocks and notification from /proc/PID/timers, the
//! remaining time from timer_gettime inside the process (parasite).

use crate::images::records::PosixTimer;
use crate::parasite::{remote, Parasite};
use crate::types::{Pid, Tid};
use anyhow::{bail, Context, Result};

/// Parse /proc/PID/timers: blocks of "ID:", "signal: SIG/VALUE",
/// "notify: KIND/pid.N|tid.N", "ClockID:".
pub fn parse(text: &str) -> Result<Vec<PosixTimer>> {
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let (k, v) = line.split_once(':').with_context(|| format!("bad line in timers: {line:?}"))?;
        let v = v.trim();
        match k {
            "ID" => out.push(PosixTimer { id: v.parse().with_context(|| format!("timer id {v:?}"))?, ..Default::default() }),
            _ if out.is_empty() => bail!("timers: {k} before any ID"),
            "signal" => {
                let t = out.last_mut().expect("checked above");
                let (sig, val) = v.split_once('/').with_context(|| format!("timer signal {v:?}"))?;
                t.signo = sig.parse().with_context(|| format!("timer signal {v:?}"))?;
                t.sigval = u64::from_str_radix(val.trim_start_matches("0x"), 16).unwrap_or(0);
            }
            "notify" => {
                let t = out.last_mut().expect("checked above");
                let (kind, who) = v.split_once('/').with_context(|| format!("timer notify {v:?}"))?;
                t.notify = match kind {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD_ID,
                    _ => bail!("timer {}: unknown notification {kind:?}", t.id),
                };
                t.notify_tid = who.split_once('.').and_then(|(_, n)| n.parse().ok()).unwrap_or(0);
            }
            "ClockID" => out.last_mut().expect("checked above").clock = v.parse().with_context(|| format!("clock {v:?}"))?,
            _ => {}
        }
    }
    Ok(out)
}

pub fn dump(pid: Pid, leader: Tid, par: &mut Parasite) -> Result<Vec<PosixTimer>> {
    let path = format!("/proc/{}/timers", pid.0);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{pid}: reading {path}"))?;
    let mut timers = parse(&text).with_context(|| format!("{pid}: parsing {path}"))?;
    let (scratch, _) = par.scratch();
    for t in &mut timers {
        let r = par.syscall(leader, libc::SYS_timer_gettime, [t.id as u64, scratch.0, 0, 0, 0, 0])?;
        if r < 0 {
            bail!("{pid}: timer_gettime of timer {}: {}", t.id, nix::errno::Errno::from_raw(-r as i32));
        }
        let mut b = [0u8; 32];
        remote::read_mem(pid, scratch, &mut b)?;
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        t.interval_ns = w(0) * 1_000_000_000 + w(1);
        t.value_ns = w(2) * 1_000_000_000 + w(3);
    }
    Ok(timers)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_proc_timers() {
        let t = super::parse("ID: 7\nsignal: 12/0000000000001234\nnotify: thread/tid.745\nClockID: 1\nID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.3\nClockID: 0\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].id, t[0].signo, t[0].sigval, t[0].notify, t[0].notify_tid, t[0].clock), (7, 12, 0x1234, libc::SIGEV_THREAD_ID, 745, 1));
        assert_eq!((t[1].id, t[1].notify, t[1].clock), (0, libc::SIGEV_SIGNAL, 0));
        assert!(super::parse("signal: 1/0\n").is_err());
    }
}
