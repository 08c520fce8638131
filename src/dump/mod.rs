//! `snap dump`. (stub)
use anyhow::Result;
pub fn run(a: &crate::cli::DumpArgs) -> Result<()> { let _ = a; todo!() }
pub mod proc;
pub mod mm;
