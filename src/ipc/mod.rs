//! Inter-process communication objects that belong to no descriptor.
pub mod sysv;
