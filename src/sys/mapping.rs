//! A read-only private mapping of a file, unmapped on drop: the page
//! store's pack files are read through one.

use std::fs::File;
use std::os::fd::AsRawFd;

pub struct FileMap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is private, read-only and never changed after it is
// made; it is unmapped only in Drop, when no borrow of it can remain.
unsafe impl Send for FileMap {}
// SAFETY: as above; shared reads of immutable memory are fine.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Map the first `len` bytes (not 0) of `file` read-only.
    pub fn new(file: &File, len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh private read-only mapping of a file we opened; the
        // kernel picks the address. A file truncated by someone else later
        // would raise SIGBUS on access: images are not modified while read.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileMap { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len come from a successful mmap of exactly len bytes,
        // PROT_READ, alive until Drop (which needs &mut self).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns; no slices of it
        // outlive `self` (they borrow from it).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}
