//! Image directory writer and validating reader. OWNER: images helper. (stub)
use super::pagestore::{PageHash, PageStoreReader, PageStoreWriter};
use super::records::Inventory;
use anyhow::Result;
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

pub struct ImageWriter {}
impl ImageWriter {
    /// Create `dir` (it must not exist or be empty).
    pub fn create(dir: &Path, compress: bool) -> Result<Self> { let _ = (dir, compress); todo!() }
    pub fn write_json<T: Serialize>(&mut self, name: &str, v: &T) -> Result<()> { let _ = (name, v); todo!() }
    pub fn write_bytes(&mut self, name: &str, data: &[u8]) -> Result<()> { let _ = (name, data); todo!() }
    /// Write a page map (sorted by address) as `name`.
    pub fn write_pagemap(&mut self, name: &str, entries: &[(u64, PageHash)]) -> Result<()> { let _ = (name, entries); todo!() }
    pub fn pages(&mut self) -> &mut PageStoreWriter { todo!() }
    /// Flush the page store, write the manifest and `inventory.json` last.
    pub fn finish(self, inv: Inventory) -> Result<()> { let _ = inv; todo!() }
}

pub struct ImageReader {}
impl ImageReader {
    /// Open and validate (version, arch, manifest sizes and checksums).
    pub fn open(dir: &Path) -> Result<Self> { let _ = dir; todo!() }
    pub fn inventory(&self) -> &Inventory { todo!() }
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> { let _ = name; todo!() }
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> { let _ = name; todo!() }
    pub fn pagemap(&self, name: &str) -> Result<Vec<(u64, PageHash)>> { let _ = name; todo!() }
    pub fn pages(&self) -> Result<PageStoreReader> { todo!() }
}
