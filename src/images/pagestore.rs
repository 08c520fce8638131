//! Content-addressed page store. OWNER: images helper. (stub)
use anyhow::Result;

/// xxh3-128 of a 4 KiB page.
pub type PageHash = u128;

pub struct PageStoreWriter {}
impl PageStoreWriter {
    /// Add `data` (a multiple of 4096 bytes) whose first page is at virtual
    /// address `first_addr`. Appends `(vaddr, hash)` to `map` for every page
    /// that is not all zeros; stores each distinct page once.
    pub fn add_pages(&mut self, first_addr: u64, data: &[u8], map: &mut Vec<(u64, PageHash)>) -> Result<()> {
        let _ = (first_addr, data, map);
        todo!()
    }
}

pub struct PageStoreReader {}
impl PageStoreReader {
    /// The 4096 bytes of the page with this hash.
    pub fn page(&self, hash: PageHash) -> Result<&[u8]> {
        let _ = hash;
        todo!()
    }
}
