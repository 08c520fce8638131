//! snap: checkpoint/restore for Linux processes and application groups.
//!
//! Layout (see docs/architecture.md):
//! - `cli`      argument parsing and the verbs
//! - `dump`     seize the tree, collect every kind of state, write the image
//! - `restore`  replay the tree with exact PIDs, put every process's state back
//! - `parasite` remote system calls and the injected blob
//! - `images`   the image format: records, page store, loader
//! - `ipc`      SysV shared memory, semaphores and message queues
//! - `kinds`    one module per kind of file descriptor, dump and restore side by side
//! - `group`    application groups: `snap run` supervisor, `join`, `ps`
//! - `sys`      thin system-call wrappers (the only `unsafe` outside the parasite)

pub mod check;
pub mod cli;
pub mod dump;
pub mod group;
pub mod images;
pub mod ipc;
pub mod kinds;
pub mod parasite;
pub mod progress;
pub mod restore;
pub mod service;
pub mod spans;
pub mod sys;
pub mod track;
pub mod types;
