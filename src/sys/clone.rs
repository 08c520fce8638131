//! clone3 with `set_tid`: create a process with an exact PID.

use std::mem::size_of;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Fork this process so that the child gets PID `pid` in our pid namespace
/// (`pid` 0: any PID). Returns 0 in the child, the child's PID in the parent.
/// The caller must be single-threaded (a forked child of a multi-threaded
/// process may find locks held forever).
pub fn fork_with_pid(pid: i32) -> nix::Result<i32> {
    let tids = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid > 0 { tids.as_ptr() as u64 } else { 0 },
        set_tid_size: if pid > 0 { 1 } else { 0 },
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM is fork(): the child runs on its own
    // copy of this address space and stack, returning from this call with 0.
    // `args` and `tids` outlive the call; the kernel only reads them.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, size_of::<CloneArgs>()) };
    if r < 0 {
        Err(nix::errno::Errno::last())
    } else {
        Ok(r as i32)
    }
}

/// A fresh anonymous mapping at exactly `addr` (MAP_FIXED_NOREPLACE), RWX,
/// used as the restore control area that every forked process inherits.
pub fn map_control_area(addr: u64, len: usize) -> nix::Result<()> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the
    // area is only accessed through the returned address range below.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(nix::errno::Errno::last());
    }
    if p as u64 != addr {
        // Old kernels ignore NOREPLACE and return another address.
        // SAFETY: unmapping the mapping we just made and nothing else.
        unsafe { libc::munmap(p, len) };
        return Err(nix::errno::Errno::EEXIST);
    }
    Ok(())
}

/// Write `code` at the start of the control area made by `map_control_area`.
pub fn write_control_code(addr: u64, code: &[u8]) {
    // SAFETY: `addr` is the start of our own RW mapping of at least one page
    // (map_control_area succeeded) and `code` is far smaller than a page.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), addr as *mut u8, code.len()) };
}
