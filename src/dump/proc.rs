//! Per-process state that can be read from outside, through /proc.
//!
//! Everything here is plain parsing of /proc text (and the binary auxv), so
//! it works for processes of any uid (no `prlimit`, which needs
//! `CAP_SYS_RESOURCE` for other uids on these machines). What only the
//! process itself can tell (signal handlers, itimers, brk, threads' registers)
//! is left at defaults for the caller to fill.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::images::records::{
    Creds, ITimers, MmInfo, ProcState, ProcessImage, Rlimit, Sched,
};
use crate::types::{Pid, Tid};

/// Fields of /proc/PID/stat after the `(comm)` part, indexed by their
/// number in proc(5) (field 3 is `state`).
/// /proc/PID/stat, split around the comm (which may hold spaces and ')').
pub struct Stat {
    pub comm: String,
    rest: Vec<String>,
}

impl Stat {
    /// /proc/PID/stat of `pid` (None if it is gone or unreadable).
    pub fn read(pid: i32) -> Option<Stat> {
        Stat::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?).ok()
    }

    pub fn parse(text: &str) -> Result<Stat> {
        // comm may contain spaces and parentheses: it ends at the LAST ')'.
        let open = text.find('(').ok_or_else(|| anyhow!("no '(' in stat line"))?;
        let close = text.rfind(')').ok_or_else(|| anyhow!("no ')' in stat line"))?;
        anyhow::ensure!(close > open, "malformed stat line");
        let comm = text[open + 1..close].to_string();
        let rest = text[close + 1..].split_whitespace().map(str::to_string).collect();
        Ok(Stat { comm, rest })
    }

    /// Field `n` as numbered in proc(5) (3 is the state).
    pub fn field_str(&self, n: usize) -> Result<&str> {
        self.rest
            .get(n.checked_sub(3).ok_or_else(|| anyhow!("stat field {n} is not after comm"))?)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("stat has no field {n}"))
    }

    pub fn field<T: std::str::FromStr>(&self, n: usize) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let s = self.field_str(n)?;
        s.parse::<T>().with_context(|| format!("stat field {n} {s:?}"))
    }
}

fn read_text(path: &str) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

fn readlink(path: &str) -> Result<String> {
    let t = fs::read_link(path).with_context(|| format!("readlink {path}"))?;
    Ok(t.to_string_lossy().into_owned())
}

/// The value of `Key:` in a /proc status file.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

fn status_ids(status: &str, key: &str) -> Result<[u32; 4]> {
    let v = status_field(status, key).ok_or_else(|| anyhow!("status has no {key}:"))?;
    let ids: Vec<u32> = v
        .split_whitespace()
        .map(|x| x.parse::<u32>().with_context(|| format!("status {key}: {x:?}")))
        .collect::<Result<_>>()?;
    ids.try_into().map_err(|v: Vec<u32>| anyhow!("status {key}: expected 4 ids, got {}", v.len()))
}

fn status_hex(status: &str, key: &str) -> Result<u64> {
    let v = status_field(status, key).ok_or_else(|| anyhow!("status has no {key}:"))?;
    u64::from_str_radix(v, 16).with_context(|| format!("status {key}: {v:?}"))
}

fn status_num(status: &str, key: &str) -> Result<u32> {
    let v = status_field(status, key).ok_or_else(|| anyhow!("status has no {key}:"))?;
    v.parse().with_context(|| format!("status {key}: {v:?}"))
}

fn parse_creds(status: &str) -> Result<Creds> {
    let groups = status_field(status, "Groups")
        .unwrap_or("")
        .split_whitespace()
        .map(|g| g.parse::<u32>().with_context(|| format!("status Groups: {g:?}")))
        .collect::<Result<_>>()?;
    Ok(Creds {
        uid: status_ids(status, "Uid")?,
        gid: status_ids(status, "Gid")?,
        groups,
        cap_inh: status_hex(status, "CapInh")?,
        cap_prm: status_hex(status, "CapPrm")?,
        cap_eff: status_hex(status, "CapEff")?,
        cap_bnd: status_hex(status, "CapBnd")?,
        cap_amb: status_hex(status, "CapAmb").unwrap_or(0),
    })
}

/// Names of /proc/PID/limits rows and their RLIMIT_* numbers. (The casts
/// are no-ops on glibc, where RLIMIT_* are u32, but not on musl.)
#[allow(clippy::unnecessary_cast)]
const LIMIT_NAMES: &[(&str, u32)] = &[
    ("Max cpu time", libc::RLIMIT_CPU as u32),
    ("Max file size", libc::RLIMIT_FSIZE as u32),
    ("Max data size", libc::RLIMIT_DATA as u32),
    ("Max stack size", libc::RLIMIT_STACK as u32),
    ("Max core file size", libc::RLIMIT_CORE as u32),
    ("Max resident set", libc::RLIMIT_RSS as u32),
    ("Max processes", libc::RLIMIT_NPROC as u32),
    ("Max open files", libc::RLIMIT_NOFILE as u32),
    ("Max locked memory", libc::RLIMIT_MEMLOCK as u32),
    ("Max address space", libc::RLIMIT_AS as u32),
    ("Max file locks", libc::RLIMIT_LOCKS as u32),
    ("Max pending signals", libc::RLIMIT_SIGPENDING as u32),
    ("Max msgqueue size", libc::RLIMIT_MSGQUEUE as u32),
    ("Max nice priority", libc::RLIMIT_NICE as u32),
    ("Max realtime priority", libc::RLIMIT_RTPRIO as u32),
    ("Max realtime timeout", libc::RLIMIT_RTTIME as u32),
];

fn limit_value(s: &str) -> Result<u64> {
    if s == "unlimited" {
        Ok(u64::MAX)
    } else {
        s.parse().with_context(|| format!("limit value {s:?}"))
    }
}

/// Parse /proc/PID/limits. Rows are sorted by RLIMIT number.
pub fn parse_limits(text: &str) -> Result<Vec<Rlimit>> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let Some(&(name, resource)) = LIMIT_NAMES.iter().find(|(n, _)| {
            line.strip_prefix(n).is_some_and(|r| r.starts_with(' '))
        }) else {
            bail!("unknown limits row {line:?}");
        };
        let mut vals = line[name.len()..].split_whitespace();
        let soft = limit_value(vals.next().ok_or_else(|| anyhow!("limits row {line:?}: no soft limit"))?)?;
        let hard = limit_value(vals.next().ok_or_else(|| anyhow!("limits row {line:?}: no hard limit"))?)?;
        out.push(Rlimit { resource, soft, hard });
    }
    out.sort_by_key(|r| r.resource);
    Ok(out)
}

/// Parse a raw auxv: native-endian u64 pairs, stopping at AT_NULL.
pub fn parse_auxv(raw: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for pair in raw.chunks_exact(16) {
        let mut k = [0u8; 8];
        let mut v = [0u8; 8];
        k.copy_from_slice(&pair[..8]);
        v.copy_from_slice(&pair[8..]);
        let (k, v) = (u64::from_ne_bytes(k), u64::from_ne_bytes(v));
        if k == libc::AT_NULL {
            break;
        }
        out.push((k, v));
    }
    out
}

/// Children of every thread of `pid`, ascending, without duplicates.
fn read_children(pid: Pid) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for tid in thread_ids(pid)? {
        let path = format!("/proc/{}/task/{}/children", pid.0, tid.0);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            // A thread that exited between listing and reading has no children.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        };
        for c in text.split_whitespace() {
            out.push(c.parse::<i32>().with_context(|| format!("{path}: {c:?}"))?);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Everything about `pid` that /proc tells from outside. Left at defaults for
/// the caller: `mm.brk` (= `start_brk` for now), `dumpable`, `sigactions`,
/// `itimers`, `shared_pending`, `threads`, `vmas`, `fds`.
pub fn read_process(pid: Pid) -> Result<ProcessImage> {
    read_process_inner(pid).with_context(|| format!("{pid}: reading /proc/{}", pid.0))
}

fn read_process_inner(pid: Pid) -> Result<ProcessImage> {
    let p = pid.0;
    let stat = Stat::parse(&read_text(&format!("/proc/{p}/stat"))?)?;
    let status = read_text(&format!("/proc/{p}/status"))?;

    let state_ch = stat.field_str(3)?;
    let zombie = state_ch == "Z" || state_ch == "X";
    let state = if zombie {
        ProcState::Zombie { wait_status: stat.field::<i32>(52)? }
    } else {
        ProcState::Alive
    };
    // A zombie has no mm, files or fs any more: those links are gone.
    let link = |name: &str| -> Result<String> {
        match readlink(&format!("/proc/{p}/{name}")) {
            Ok(s) => Ok(s),
            Err(_) if zombie => Ok(String::new()),
            Err(e) => Err(e),
        }
    };

    let umask = match status_field(&status, "Umask") {
        Some(v) => u32::from_str_radix(v, 8).with_context(|| format!("status Umask: {v:?}"))?,
        None => 0o022,
    };
    let personality_text = read_text(&format!("/proc/{p}/personality"))?;
    let personality = u32::from_str_radix(personality_text.trim(), 16)
        .with_context(|| format!("personality {:?}", personality_text.trim()))?;

    let auxv = if zombie {
        Vec::new()
    } else {
        parse_auxv(&fs::read(format!("/proc/{p}/auxv")).with_context(|| format!("reading /proc/{p}/auxv"))?)
    };
    let start_brk: u64 = stat.field(47)?;
    let mm = MmInfo {
        start_code: stat.field(26)?,
        end_code: stat.field(27)?,
        start_stack: stat.field(28)?,
        start_data: stat.field(45)?,
        end_data: stat.field(46)?,
        start_brk,
        brk: start_brk,
        arg_start: stat.field(48)?,
        arg_end: stat.field(49)?,
        env_start: stat.field(50)?,
        env_end: stat.field(51)?,
        auxv,
    };

    Ok(ProcessImage {
        pid: p,
        ppid: stat.field(4)?,
        pgid: stat.field(5)?,
        sid: stat.field(6)?,
        start_time: stat.field(22)?,
        state,
        comm: stat.comm.clone(),
        exe: link("exe")?,
        cwd: link("cwd")?,
        root: link("root")?,
        umask,
        creds: parse_creds(&status)?,
        rlimits: parse_limits(&read_text(&format!("/proc/{p}/limits"))?)?,
        personality,
        nice: stat.field(19)?,
        sched: Sched { policy: stat.field(41)?, priority: stat.field(40)? },
        no_new_privs: status_num(&status, "NoNewPrivs").unwrap_or(0) != 0,
        dumpable: 0,
        seccomp: status_num(&status, "Seccomp").unwrap_or(0),
        mm,
        vmas: Vec::new(),
        fds: Vec::new(),
        sigactions: Vec::new(),
        itimers: ITimers::default(),
        shared_pending: Vec::new(),
        threads: Vec::new(),
        children: read_children(pid)?,
        posix_timers: Vec::new(),
        stopped: false,
        file_locks: Vec::new(),
    })
}

/// The numeric entries of a /proc directory (pids, tids or fds), ascending.
pub fn numeric_entries(dir: &str) -> Result<Vec<i32>> {
    let mut v = Vec::new();
    for ent in fs::read_dir(dir).with_context(|| format!("listing {dir}"))? {
        let ent = ent.with_context(|| format!("listing {dir}"))?;
        if let Some(n) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Thread ids of `pid`, the leader first, then ascending.
pub fn thread_ids(pid: Pid) -> Result<Vec<Tid>> {
    let mut tids = numeric_entries(&format!("/proc/{}/task", pid.0)).with_context(|| format!("{pid}"))?;
    tids.sort_unstable_by_key(|&t| (t != pid.0, t));
    Ok(tids.into_iter().map(Tid).collect())
}

/// The comm of one thread.
pub fn thread_comm(pid: Pid, tid: Tid) -> Result<String> {
    let path = format!("/proc/{}/task/{}/comm", pid.0, tid.0);
    let s = fs::read_to_string(Path::new(&path)).with_context(|| format!("{pid} {tid}: reading {path}"))?;
    Ok(s.strip_suffix('\n').unwrap_or(&s).to_string())
}

#[cfg(test)]
#[allow(clippy::unnecessary_cast)]
mod tests {
    use super::*;

    #[test]
    fn stat_comm_with_parens_and_spaces() {
        let line = "412 (a) b (c)) S 1 412 412 0 -1 4194560 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        let s = Stat::parse(line).unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!(s.field_str(3).unwrap(), "S");
        assert_eq!(s.field::<i32>(4).unwrap(), 1);
        assert_eq!(s.field::<i32>(19).unwrap(), 20);
        assert!(s.field_str(60).is_err());
    }

    #[test]
    fn limits_parse() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max stack size            8388608              unlimited            bytes     \n\
Max open files            1024                 4096                 files     \n\
Max nice priority         0                    0                    \n";
        let l = parse_limits(text).unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l[0], Rlimit { resource: libc::RLIMIT_CPU as u32, soft: u64::MAX, hard: u64::MAX });
        assert_eq!(l[1], Rlimit { resource: libc::RLIMIT_STACK as u32, soft: 8388608, hard: u64::MAX });
        assert!(l.iter().any(|r| *r == Rlimit { resource: libc::RLIMIT_NOFILE as u32, soft: 1024, hard: 4096 }));
        assert!(parse_limits("h\nMax bogus thing 1 2\n").is_err());
    }

    #[test]
    fn auxv_stops_at_null() {
        let mut raw = Vec::new();
        for (k, v) in [(6u64, 4096u64), (0, 0), (7, 7)] {
            raw.extend_from_slice(&k.to_ne_bytes());
            raw.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&raw), vec![(6, 4096)]);
    }

    #[test]
    fn self_process() {
        let me = Pid(std::process::id() as i32);
        let p = read_process(me).unwrap();
        assert_eq!(p.pid, me.0);
        assert_eq!(p.state, ProcState::Alive);
        assert_eq!(p.rlimits.len(), 16);
        assert!(p.mm.auxv.iter().any(|&(k, _)| k == libc::AT_PAGESZ));
        assert!(p.mm.start_code != 0 && p.mm.env_end > p.mm.env_start);
        let t = thread_ids(me).unwrap();
        assert_eq!(t[0].0, me.0);
        assert!(!thread_comm(me, t[0]).unwrap().is_empty());
    }
}
