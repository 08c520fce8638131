//! Thin system-call wrappers: the only place besides the parasite with `unsafe`.
pub mod ptrace;
