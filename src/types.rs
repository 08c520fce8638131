//! Typed ids: a number that means something in another process is never a
//! bare integer or a pointer.

use std::fmt;

/// A process id (thread-group id) in the dumped or restored tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(pub i32);

/// A thread id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tid(pub i32);

/// An address in another process's address space (never dereferenced here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteAddr(pub u64);

/// A descriptor number in another process's fd table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteFd(pub i32);

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.0)
    }
}
impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tid {}", self.0)
    }
}
impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
impl fmt::Display for RemoteFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fd {}", self.0)
    }
}

impl Pid {
    pub fn nix(self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0)
    }
}
impl Tid {
    pub fn nix(self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0)
    }
}

pub const PAGE_SIZE: usize = 4096;
