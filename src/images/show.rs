//! `snap image show`. OWNER: images helper. (stub)
use anyhow::Result;
use std::path::Path;
pub fn run(dir: &Path, json: bool) -> Result<()> { let _ = (dir, json); todo!() }
