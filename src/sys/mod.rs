//! Thin system-call wrappers: the only place besides the parasite with `unsafe`.
pub mod ptrace;
pub mod clone;
pub mod process;

/// A borrowed view of a descriptor this process owns and keeps open for at
/// least as long as the view is used.
pub fn borrow_fd(fd: std::os::fd::RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: callers pass descriptors they own and do not close while the
    // borrow lives (the restore pool keeps them open until the end).
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
