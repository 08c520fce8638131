//! A restored process driven from outside: remote system calls at the
//! control area's `syscall` instruction, errors turned into errno names.

use crate::parasite::remote;
use crate::types::{Pid, RemoteAddr, Tid};
use anyhow::{bail, Result};

pub struct Remote {
    /// PID as the host sees it (for /proc and ptrace).
    pub host: i32,
    /// The thread the calls run on.
    pub tid: Tid,
    pub ctl: u64,
}

impl Remote {
    pub fn on(&self, tid: Tid) -> Remote {
        Remote { host: self.host, tid, ctl: self.ctl }
    }

    /// Run system call `nr`; a negative result becomes an error naming the errno.
    pub fn call(&mut self, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = remote::syscall_in(self.tid, RemoteAddr(self.ctl), nr, args)?;
        if (-4095..0).contains(&r) {
            bail!("system call {nr} in {}: {}", self.tid, nix::errno::Errno::from_raw(-r as i32));
        }
        Ok(r as u64)
    }

    /// Like `call`, leaving the thread in its syscall-exit stop with the
    /// registers the call left (for the last call before setting the
    /// final registers).
    pub fn call_keep(&mut self, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = remote::syscall_in_keep(self.tid, RemoteAddr(self.ctl), nr, args)?;
        if (-4095..0).contains(&r) {
            bail!("system call {nr} in {}: {}", self.tid, nix::errno::Errno::from_raw(-r as i32));
        }
        Ok(r as u64)
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        remote::write_mem(Pid(self.host), RemoteAddr(addr), data)
    }
}
