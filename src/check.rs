//! `snap check`: what this kernel supports, and what each feature enables.
//! The probes themselves are in `sys::probe`.
use crate::sys::probe::*;
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub present: bool,
    pub detail: String,
    pub enables: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kernel: String,
    pub features: Vec<Feature>,
    /// The dirty-tracking backend incremental dumps use here: "soft-dirty",
    /// "uffd-wp", or "hash" (every page read and hashed).
    pub tracking_backend: String,
}

fn feature(name: &'static str, enables: &'static str, p: Probe) -> Feature {
    let (present, detail) = match p {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Feature { name, present, detail, enables }
}

/// Run every probe.
pub fn probe_all() -> Report {
    let u = nix::sys::utsname::uname();
    let kernel = u
        .as_ref()
        .map(|u| format!("{} {}", u.release().to_string_lossy(), u.machine().to_string_lossy()))
        .unwrap_or_else(|_| "unknown".into());
    let (seize, rseq) = probe_ptrace();
    let features = vec![
        feature("ptrace-seize", "seizing and interrupting the tree without signals (every dump)", seize),
        feature("ptrace-rseq-config", "dumping and restoring each thread's rseq registration", rseq),
        feature("clone3-set-tid", "restore with the exact PIDs and TIDs of the dump", probe_clone3_set_tid()),
        feature("kcmp", "finding files, fs and mm shared between processes", probe_kcmp()),
        feature("process-vm-readv", "reading memory from outside the target (fallback page reader)", probe_process_vm_readv()),
        feature("vmsplice", "zero-copy page transfer from the parasite", probe_vmsplice()),
        feature("uffd-wp-async-pagemap-scan", "incremental dumps and pre-copy migration (dirty tracking here)", probe_uffd_pagemap_scan()),
        feature("pagemap-scan", "finding a dump's pages with one PAGEMAP_SCAN per mapping (else /proc/PID/pagemap entry by entry)", probe_pagemap_scan()),
        feature("soft-dirty", "incremental dumps with soft-dirty bits (the other tracking backend)", probe_soft_dirty()),
        feature("pidfd", "taking fds from the target (pidfd_getfd), race-free process handles", probe_pidfd()),
        feature("prctl-mm-map", "restoring brk, arg/env and auxv (PR_SET_MM_MAP)", probe_prctl_mm_map()),
        feature("tcp-repair", "dumping and restoring established TCP connections", probe_tcp_repair()),
        feature("network-lock", "dumping TCP connections whose peer is outside the dump (nftables drops their packets until restore)", crate::kinds::inet::probe_lock()),
        feature("cgroup2-freezer", "freezing a cgroup for a consistent cut: snap run groups, dump --cgroup (systemd services)", probe_cgroup2()),
        feature("pid-net-namespaces", "restore --pidns and a group's own network namespace", probe_namespaces()),
        feature("sysv-next-id", "SysV shared memory, semaphores and message queues keep their ids at restore", probe_sysv_next_id()),
        feature("msg-copy", "dumping SysV message queues: their messages are copied in place (MSG_COPY)", probe_msg_copy()),
        feature("timerfd-set-ticks", "restoring a timerfd's unread expiration count exactly (else a count above 1 comes back as 1)", probe_timerfd_set_ticks()),
        feature("cap-sys-resource", "setting rlimits of other users' processes with prlimit", probe_sys_resource()),
    ];
    let tracking_backend = crate::track::backend().unwrap_or("hash").to_string();
    Report { kernel, features, tracking_backend }
}

pub fn run(json: bool) -> Result<()> {
    let r = probe_all();
    if json {
        crate::outln!("{}", serde_json::to_string(&r)?)?;
        return Ok(());
    }
    crate::outln!("kernel: {}", r.kernel)?;
    let w = r.features.iter().map(|f| f.name.len()).max().unwrap_or(0);
    for f in &r.features {
        crate::outln!("{:<w$}  {:<7}  {}", f.name, if f.present { "present" } else { "absent" }, f.detail)?;
        crate::outln!("{:<w$}  {:<7}  enables: {}", "", "", f.enables)?;
    }
    crate::outln!("incremental dumps track dirty pages with: {}", r.tracking_backend)?;
    Ok(())
}
