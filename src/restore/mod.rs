//! `snap restore`. (stub)
use anyhow::Result;
pub fn run(a: &crate::cli::RestoreArgs) -> Result<i32> { let _ = a; todo!() }
