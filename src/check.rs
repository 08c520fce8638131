//! `snap check`. OWNER: images helper. (stub)
use anyhow::Result;
pub fn run(json: bool) -> Result<()> { let _ = json; todo!() }
