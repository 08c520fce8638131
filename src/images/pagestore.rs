//! Content-addressed page store (docs/image-format.md, "Page store").
//!
//! Every 4 KiB page is keyed by its xxh3-128 hash. A store is two files:
//! the pack (`pages.pack`, or `pages.pack.zst` when compressed), the
//! concatenation of every distinct non-zero page in the order first seen, and
//! the index (`pages.idx`), the hash of each page of the pack in the same
//! order as 16-byte little-endian integers. Page `i` of the pack is at byte
//! offset `i * 4096` of the (decompressed) pack. Zero pages are never stored:
//! a page absent from a page map is zero.
//!
//! The writer is built for throughput: a fast zero check on 16-byte words,
//! one xxh3-128 per page, a `HashSet` keyed by the hash itself with an
//! identity hasher, and new pages appended to an in-memory buffer that is
//! handed to the sink in big writes. The reader maps the pack with `mmap`
//! (so restore can `process_vm_writev` straight from it) or, for a
//! compressed pack, decompresses it into memory once.

use crate::sys::mapping::FileMap;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashSet;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use xxhash_rust::xxh3::{xxh3_128, Xxh3Default};

/// xxh3-128 of a 4 KiB page.
pub type PageHash = u128;

/// Size of one page in the store.
pub const PAGE_SIZE: usize = 4096;
/// Size of one entry of `pages.idx`.
pub const INDEX_ENTRY_SIZE: usize = 16;
/// File names of the store inside an image directory.
pub const PACK_NAME: &str = "pages.pack";
pub const PACK_ZST_NAME: &str = "pages.pack.zst";
pub const INDEX_NAME: &str = "pages.idx";

/// Pages are buffered until this many bytes are pending, then handed to the
/// writer thread in one piece (2 MiB: big writes, yet the buffers of the
/// queue stay in cache).
const FLUSH_BYTES: usize = 2 << 20;
/// zstd level for compressed packs: level 1 keeps up with the disk.
const ZSTD_LEVEL: i32 = 1;

/// Hasher for keys that already are uniformly distributed hashes: fold the
/// 128 bits to 64 and use them as they are.
#[derive(Default, Clone, Copy)]
pub struct PageHashHasher(u64);

impl Hasher for PageHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Generic path (not used for u128 keys): FNV-style mix.
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

/// `BuildHasher` for maps and sets keyed by `PageHash`.
pub type BuildPageHasher = BuildHasherDefault<PageHashHasher>;

/// True if the page (any length multiple of 64 is fine) is all zeros.
#[inline]
pub fn is_zero_page(p: &[u8]) -> bool {
    let (blocks, rest) = p.as_chunks::<64>();
    blocks.iter().all(|b| {
        let (w, _) = b.as_chunks::<16>();
        let acc = w.iter().fold(0u128, |a, x| a | u128::from_ne_bytes(*x));
        acc == 0
    }) && rest.iter().all(|&b| b == 0)
}

/// The store's key of a page.
#[inline]
pub fn hash_page(p: &[u8]) -> PageHash {
    xxh3_128(p)
}

/// A `Write` that counts and checksums (xxh3-64) what passes through it, so
/// the manifest checksum of the pack costs no second pass over the file.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Xxh3Default,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Xxh3Default::new(), bytes: 0 }
    }
    /// (bytes written, xxh3-64 of them, the inner writer)
    pub fn into_parts(self) -> (u64, u64, W) {
        (self.bytes, self.hasher.digest(), self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where the pack goes. A plain pack is checksummed page by page in
/// `add_pages` (the pages are in cache there, and the writer thread, the
/// slow side, is left with nothing but the copy into the file); a
/// compressed one is checksummed as the compressed bytes pass.
enum Sink {
    Plain { file: File, bytes: u64 },
    Zstd(zstd::stream::write::Encoder<'static, HashingWriter<File>>),
}

impl Sink {
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        match self {
            Sink::Plain { file, bytes } => {
                file.write_all(buf).context("writing page pack")?;
                *bytes += buf.len() as u64;
            }
            Sink::Zstd(w) => w.write_all(buf).context("writing compressed page pack")?,
        }
        Ok(())
    }

    /// End the stream, fsync; (bytes in the file, xxh3-64 of them if the
    /// sink computed it, compressed).
    fn finish(self) -> Result<(u64, Option<u64>, bool)> {
        match self {
            Sink::Plain { file, bytes } => {
                file.sync_all().context("fsync page pack")?;
                Ok((bytes, None, false))
            }
            Sink::Zstd(enc) => {
                let (n, x, f) = enc.finish().context("ending zstd stream of page pack")?.into_parts();
                f.sync_all().context("fsync page pack")?;
                Ok((n, Some(x), true))
            }
        }
    }
}

/// What `PageStoreWriter::finish` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PackSummary {
    /// Distinct pages stored.
    pub pages: u64,
    /// Bytes of the pack file as written (compressed size when compressed).
    pub pack_bytes: u64,
    /// xxh3-64 of the pack file's bytes.
    pub pack_xxh3: u64,
    /// The index file contents (`pages.idx`).
    pub index: Vec<u8>,
    pub compressed: bool,
}

/// Counters, for progress and `image show`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PageStats {
    /// Pages passed to `add_pages`.
    pub pages_in: u64,
    /// Of those, all-zero pages (not stored, not listed).
    pub zero_pages: u64,
    /// Of those, pages already in the store.
    pub dup_pages: u64,
    /// Distinct pages stored.
    pub stored_pages: u64,
}

/// The pack is written by a background thread (compression there too), so
/// hashing and the copy into the file overlap. A fixed pool of buffers goes
/// round between the two threads: fresh memory is expensive on a VM whose
/// host backs it lazily (a buffer allocated per flush costs a page fault per
/// 4 KiB), and small buffers stay in cache between the threads.
struct BgWriter {
    tx: Option<SyncSender<Vec<u8>>>,
    free: Receiver<Vec<u8>>,
    /// Buffers made so far (at most `POOL`).
    made: usize,
    thread: Option<JoinHandle<Result<(u64, Option<u64>, bool)>>>,
    blocked: std::time::Duration,
}

/// Buffers in circulation between the threads.
const POOL: usize = 4;

impl BgWriter {
    fn spawn(mut sink: Sink) -> Result<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(POOL);
        let (free_tx, free) = sync_channel::<Vec<u8>>(POOL);
        let thread = std::thread::Builder::new()
            .name("snap-pack-writer".into())
            .spawn(move || -> Result<(u64, Option<u64>, bool)> {
                let mut busy = std::time::Duration::ZERO;
                for mut buf in rx {
                    let t = std::time::Instant::now();
                    sink.write(&buf)?;
                    busy += t.elapsed();
                    buf.clear();
                    let _ = free_tx.try_send(buf);
                }
                crate::images::dir::timing(&format!("pack writer: {:.1} ms writing", busy.as_secs_f64() * 1e3));
                sink.finish()
            })
            .context("starting the page pack writer thread")?;
        Ok(Self { tx: Some(tx), free, made: 1, thread: Some(thread), blocked: Default::default() })
    }

    /// Wait for the thread and return its result (its error if it failed).
    fn join(&mut self) -> Result<(u64, Option<u64>, bool)> {
        crate::images::dir::timing(&format!(
            "pack writer: add_pages waited {:.1} ms for it",
            self.blocked.as_secs_f64() * 1e3
        ));
        self.tx = None;
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("page pack writer thread panicked"))?,
            None => bail!("page pack writer already finished"),
        }
    }

    /// Hand a full buffer over; returns an empty one to fill next (a new
    /// one while the pool is not complete, else the next one written out).
    fn send(&mut self, buf: Vec<u8>) -> Result<Vec<u8>> {
        let t = std::time::Instant::now();
        let sent = match &self.tx {
            Some(tx) => tx.send(buf).is_ok(),
            None => false,
        };
        let next = if !sent {
            None
        } else if self.made < POOL {
            self.made += 1;
            Some(Vec::with_capacity(FLUSH_BYTES))
        } else {
            self.free.recv().ok()
        };
        self.blocked += t.elapsed();
        match next {
            Some(b) => Ok(b),
            None => {
                // The thread stopped: its result carries the reason.
                self.join()?;
                bail!("page pack writer stopped");
            }
        }
    }
}

/// The pack's writer: started on the first full buffer, so a small dump
/// (everything fits one buffer) writes it from the calling thread at the
/// end and never starts a thread.
enum Output {
    Pending(Sink),
    Running(BgWriter),
    Discard,
}

pub struct PageStoreWriter {
    seen: HashSet<PageHash, BuildPageHasher>,
    /// The parent chain's stores: their pages are referenced, never stored
    /// again (their indexes are shared, not copied).
    known: Vec<PageStoreReader>,
    order: Vec<PageHash>,
    buf: Vec<u8>,
    out: Output,
    /// xxh3-64 of a plain pack, page by page as stored.
    pack_hash: Option<Xxh3Default>,
    stats: PageStats,
}

impl PageStoreWriter {
    /// A store writing its pack to `file` (compressed with zstd if asked).
    pub fn to_file(file: File, compress: bool) -> Result<Self> {
        let (sink, pack_hash) = if compress {
            let w = HashingWriter::new(file);
            (Sink::Zstd(zstd::stream::write::Encoder::new(w, ZSTD_LEVEL).context("zstd encoder")?), None)
        } else {
            (Sink::Plain { file, bytes: 0 }, Some(Xxh3Default::new()))
        };
        Ok(Self {
            seen: HashSet::with_hasher(BuildPageHasher::default()),
            known: Vec::new(),
            order: Vec::new(),
            buf: Vec::new(),
            out: Output::Pending(sink),
            pack_hash,
            stats: PageStats::default(),
        })
    }

    /// A store that hashes and deduplicates but keeps no page data.
    pub fn discard() -> Self {
        Self {
            seen: HashSet::with_hasher(BuildPageHasher::default()),
            known: Vec::new(),
            order: Vec::new(),
            buf: Vec::new(),
            out: Output::Discard,
            pack_hash: None,
            stats: PageStats::default(),
        }
    }

    /// Room for `pages` more distinct pages (saves rehashing, and the fresh
    /// memory each rehash touches, while a big process streams in).
    pub fn reserve(&mut self, pages: usize) {
        self.seen.reserve(pages);
        self.order.reserve(pages);
    }

    pub fn stats(&self) -> PageStats {
        self.stats
    }

    /// True if a page with this hash is already stored, here or in the
    /// parent chain (`know`).
    pub fn contains(&self, hash: PageHash) -> bool {
        self.seen.contains(&hash) || self.knows(hash)
    }

    fn knows(&self, hash: PageHash) -> bool {
        self.known.iter().any(|s| s.contains(hash))
    }

    /// Pages an incremental image's parents already hold: `add_pages`
    /// references them without storing them again.
    pub fn know(&mut self, chain: &ChainStore) {
        self.known.extend(chain.stores().iter().cloned());
    }

    /// Add `data` (a multiple of 4096 bytes) whose first page is at virtual
    /// address `first_addr`. Appends `(vaddr, hash)` to `map` for every page
    /// that is not all zeros; stores each distinct page once.
    pub fn add_pages(&mut self, first_addr: u64, data: &[u8], map: &mut Vec<(u64, PageHash)>) -> Result<()> {
        ensure!(
            data.len() % PAGE_SIZE == 0,
            "add_pages at {first_addr:#x}: {} bytes is not a multiple of the page size",
            data.len()
        );
        ensure!(first_addr % PAGE_SIZE as u64 == 0, "add_pages: address {first_addr:#x} is not page-aligned");
        let npages = data.len() / PAGE_SIZE;
        ensure!(
            first_addr.checked_add(data.len() as u64).is_some(),
            "add_pages: {npages} pages at {first_addr:#x} overflow the address space"
        );
        map.reserve(npages);
        let keep = !matches!(self.out, Output::Discard);
        let (pages, _) = data.as_chunks::<PAGE_SIZE>();
        let mut addr = first_addr;
        for page in pages {
            self.stats.pages_in += 1;
            // Most non-zero pages differ from zero in their first word: the
            // full scan only runs on pages that start with zeros.
            let first = u128::from_ne_bytes(page.as_chunks::<16>().0[0]);
            if first == 0 && is_zero_page(page) {
                self.stats.zero_pages += 1;
            } else {
                let h = hash_page(page);
                map.push((addr, h));
                if !self.knows(h) && self.seen.insert(h) {
                    self.order.push(h);
                    self.stats.stored_pages += 1;
                    if keep {
                        if let Some(x) = &mut self.pack_hash {
                            x.update(page);
                        }
                        if self.buf.capacity() == 0 {
                            self.buf.reserve_exact(FLUSH_BYTES);
                        }
                        self.buf.extend_from_slice(page);
                        if self.buf.len() >= FLUSH_BYTES {
                            self.flush_buf()?;
                        }
                    }
                } else {
                    self.stats.dup_pages += 1;
                }
            }
            addr += PAGE_SIZE as u64;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Output::Pending(_) = self.out {
            let Output::Pending(sink) = std::mem::replace(&mut self.out, Output::Discard) else { unreachable!() };
            self.out = Output::Running(BgWriter::spawn(sink)?);
        }
        match &mut self.out {
            Output::Running(w) => {
                let full = std::mem::take(&mut self.buf);
                self.buf = w.send(full)?;
            }
            _ => self.buf.clear(),
        }
        Ok(())
    }

    /// Write out what is buffered, end the compressed stream, fsync, and
    /// return the pack's size and checksum and the index contents.
    pub fn finish(mut self) -> Result<PackSummary> {
        let mut index = Vec::with_capacity(self.order.len() * INDEX_ENTRY_SIZE);
        for h in &self.order {
            index.extend_from_slice(&h.to_le_bytes());
        }
        let pages = self.order.len() as u64;
        let (pack_bytes, sink_xxh3, compressed) = match std::mem::replace(&mut self.out, Output::Discard) {
            // Never filled a buffer: write it here, no thread.
            Output::Pending(mut sink) => {
                sink.write(&self.buf)?;
                sink.finish()?
            }
            Output::Running(mut w) => {
                if !self.buf.is_empty() {
                    w.send(std::mem::take(&mut self.buf))?;
                }
                w.join()?
            }
            Output::Discard => (0, Some(0), false),
        };
        let pack_xxh3 = match (sink_xxh3, self.pack_hash.take()) {
            (Some(x), _) => x,
            (None, Some(h)) => h.digest(),
            (None, None) => bail!("page pack checksum missing"),
        };
        Ok(PackSummary { pages, pack_bytes, pack_xxh3, index, compressed })
    }
}

/// Page memory of a loaded store: a read-only mapping of the pack file, or
/// the decompressed pack in memory.
enum Backing {
    Mapped(FileMap),
    Owned(Vec<u8>),
    Empty,
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m.bytes(),
            Backing::Owned(v) => v,
            Backing::Empty => &[],
        }
    }
}

struct StoreInner {
    data: Backing,
    /// The hash of each page of the pack, by position, and the lookup.
    index: HashIndex,
    compressed: bool,
    pack_file_bytes: u64,
}

/// A loaded page store. Cheap to clone (shared).
#[derive(Clone)]
pub struct PageStoreReader {
    inner: Arc<StoreInner>,
}

/// Map `len` bytes of `file` read-only.
fn map_file(file: &File, len: usize, what: &Path) -> Result<Backing> {
    if len == 0 {
        return Ok(Backing::Empty);
    }
    let m = FileMap::new(file, len).with_context(|| format!("mmap {}", what.display()))?;
    Ok(Backing::Mapped(m))
}

/// A loaded store's index: page hash -> position in the pack. The bytes
/// of `pages.idx` as read stay the list of hashes by position, and an
/// open-addressing table (linear probing, at most half full) holds only
/// positions: 4 bytes a slot, about 8 bytes a page, where a
/// `HashMap<u128, u32>` takes about 64 bytes a page. Loading a chain's
/// stores is most of what an incremental dump does before it stops the
/// processes, and on these VMs the fresh memory is what costs (a full
/// image of 1 GiB lists a quarter million pages).
struct HashIndex {
    /// `pages.idx`: the hash of page `i` in bytes `16 i .. 16 i + 16`, LE.
    bytes: Vec<u8>,
    /// Position of a page, or `EMPTY`; a hash's first slot is its low bits.
    slots: Vec<u32>,
    mask: usize,
}

const EMPTY: u32 = u32::MAX;

impl HashIndex {
    /// Parse `pages.idx`: 16-byte LE hashes, no duplicates.
    fn parse(bytes: Vec<u8>) -> Result<Self> {
        ensure!(
            bytes.len() % INDEX_ENTRY_SIZE == 0,
            "{INDEX_NAME}: length {} is not a multiple of {INDEX_ENTRY_SIZE}",
            bytes.len()
        );
        let n = bytes.len() / INDEX_ENTRY_SIZE;
        ensure!(n < EMPTY as usize, "{INDEX_NAME}: {n} pages is too many");
        let size = (2 * n).next_power_of_two().max(16);
        let mut me = Self { slots: vec![EMPTY; size], mask: size - 1, bytes };
        for i in 0..n {
            let h = me.hash_at(i);
            match me.probe(h) {
                Ok(_) => bail!("{INDEX_NAME}: page hash {h:032x} appears twice (entry {i})"),
                Err(free) => me.slots[free] = i as u32,
            }
        }
        Ok(me)
    }

    fn empty() -> Self {
        Self { bytes: Vec::new(), slots: vec![EMPTY; 1], mask: 0 }
    }

    fn len(&self) -> usize {
        self.bytes.len() / INDEX_ENTRY_SIZE
    }

    /// The hash of page `i` (< `len`).
    #[inline]
    fn hash_at(&self, i: usize) -> PageHash {
        let (c, _) = self.bytes[i * INDEX_ENTRY_SIZE..].as_chunks::<INDEX_ENTRY_SIZE>();
        u128::from_le_bytes(c[0])
    }

    /// `Ok(position)` of `h`, or `Err(free slot)` where it would go.
    #[inline]
    fn probe(&self, h: PageHash) -> std::result::Result<usize, usize> {
        let mut s = ((h as u64) ^ ((h >> 64) as u64)) as usize & self.mask;
        loop {
            match self.slots[s] {
                EMPTY => return Err(s),
                p if self.hash_at(p as usize) == h => return Ok(p as usize),
                _ => s = (s + 1) & self.mask,
            }
        }
    }

    #[inline]
    fn get(&self, h: PageHash) -> Option<usize> {
        self.probe(h).ok()
    }

    /// Every hash, by position.
    fn hashes(&self) -> impl Iterator<Item = PageHash> + '_ {
        self.bytes.as_chunks::<INDEX_ENTRY_SIZE>().0.iter().map(|c| u128::from_le_bytes(*c))
    }
}

impl PageStoreReader {
    /// Load a store from an already-verified pack file and index contents.
    /// The pack must hold exactly `index.len() / 16` pages.
    ///
    /// Page contents are not checked here: every accessor that hands out
    /// page bytes (`page`, `verified`) hashes them and compares with the
    /// page's name first, so a damaged pack gives an error, never wrong
    /// memory, and costs no separate pass over the file.
    pub fn load(pack_path: &Path, compressed: bool, index: Vec<u8>) -> Result<Self> {
        let idx = HashIndex::parse(index)?;
        let want = (idx.len() as u64)
            .checked_mul(PAGE_SIZE as u64)
            .context("page store size overflows")?;
        let file = File::open(pack_path).with_context(|| format!("open {}", pack_path.display()))?;
        let file_len = file.metadata().with_context(|| format!("stat {}", pack_path.display()))?.len();
        let data = if compressed {
            let dec = zstd::stream::read::Decoder::new(&file)
                .with_context(|| format!("zstd stream of {}", pack_path.display()))?;
            // Grow with the data actually decoded, never past what the index
            // promises (+1 byte to detect an overlong stream).
            let mut v = Vec::new();
            dec.take(want + 1)
                .read_to_end(&mut v)
                .with_context(|| format!("decompressing {}", pack_path.display()))?;
            ensure!(
                v.len() as u64 == want,
                "{}: decompressed to {}{} bytes, index lists {} pages ({} bytes)",
                pack_path.display(),
                v.len(),
                if v.len() as u64 > want { "+" } else { "" },
                idx.len(),
                want
            );
            Backing::Owned(v)
        } else {
            ensure!(
                file_len == want,
                "{}: {} bytes, index lists {} pages ({} bytes)",
                pack_path.display(),
                file_len,
                idx.len(),
                want
            );
            let len = usize::try_from(want).context("page pack larger than the address space")?;
            map_file(&file, len, pack_path)?
        };
        Ok(Self { inner: Arc::new(StoreInner { data, index: idx, compressed, pack_file_bytes: file_len }) })
    }

    /// A store with no pages.
    pub fn empty() -> Self {
        Self {
            inner: Arc::new(StoreInner {
                data: Backing::Empty,
                index: HashIndex::empty(),
                compressed: false,
                pack_file_bytes: 0,
            }),
        }
    }

    /// The 4096 bytes of the page with this hash, checked against it.
    pub fn page(&self, hash: PageHash) -> Result<&[u8]> {
        let off = self.page_offset(hash)?;
        self.verified(off, PAGE_SIZE)
    }

    /// `len` bytes of the pack from byte `off` (both multiples of 4096),
    /// after checking that every page in them hashes to its name in the
    /// index: the integrity check of the pack, done page by page as the
    /// pages are used (in cache, right before they are copied on) rather
    /// than as a separate pass over the whole file. Errors name the page.
    pub fn verified(&self, off: usize, len: usize) -> Result<&[u8]> {
        ensure!(
            off % PAGE_SIZE == 0 && len % PAGE_SIZE == 0,
            "page store range {off:#x}+{len:#x} is not page-aligned"
        );
        let data = self
            .inner
            .data
            .bytes()
            .get(off..off.checked_add(len).context("page store range overflows")?)
            .with_context(|| format!("page store range {off:#x}+{len:#x} is beyond the pack"))?;
        let first = off / PAGE_SIZE;
        ensure!(first + len / PAGE_SIZE <= self.inner.index.len(), "page store range beyond the index");
        let names = (first..).map(|i| self.inner.index.hash_at(i));
        for ((i, p), h) in data.as_chunks::<PAGE_SIZE>().0.iter().enumerate().zip(names) {
            if hash_page(p) != h {
                bail!(
                    "page store damaged: page {} of the pack does not hash to its name {h:032x}",
                    first + i
                );
            }
        }
        Ok(data)
    }

    pub fn contains(&self, hash: PageHash) -> bool {
        self.inner.index.get(hash).is_some()
    }

    /// Number of distinct pages.
    pub fn len(&self) -> usize {
        self.inner.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.index.len() == 0
    }

    pub fn compressed(&self) -> bool {
        self.inner.compressed
    }

    /// Size of the pack file on disk.
    pub fn pack_file_bytes(&self) -> u64 {
        self.inner.pack_file_bytes
    }

    /// The whole (decompressed) pack: page `i` at `i * 4096`, NOT checked
    /// (see `verified`); for whole-file checksums.
    pub fn pack_bytes(&self) -> &[u8] {
        self.inner.data.bytes()
    }

    /// Re-hash every page and compare with its key (slow, full pass).
    pub fn verify_pages(&self) -> Result<()> {
        self.verified(0, self.inner.index.len() * PAGE_SIZE).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn zero_check() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        for pos in [0, 15, 16, 63, 64, 2000, 4095] {
            p[pos] = 1;
            assert!(!is_zero_page(&p), "byte {pos}");
            p[pos] = 0;
        }
    }

    #[test]
    fn dedup_and_zero_pages() {
        let mut w = PageStoreWriter::discard();
        let mut data = page(1);
        data.extend(vec![0u8; PAGE_SIZE]);
        data.extend(page(1));
        data.extend(page(2));
        let mut map = Vec::new();
        w.add_pages(0x10000, &data, &mut map).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map[0].0, 0x10000);
        assert_eq!(map[1].0, 0x12000);
        assert_eq!(map[0].1, map[1].1);
        let s = w.stats();
        assert_eq!((s.pages_in, s.zero_pages, s.dup_pages, s.stored_pages), (4, 1, 1, 2));
        assert!(w.add_pages(0x1000, &data[..100], &mut map).is_err());
        assert!(w.add_pages(0x1001, &data[..4096], &mut map).is_err());
        assert!(w.add_pages(u64::MAX - 4095, &data[..8192], &mut map).is_err());
    }

    /// The index finds every page at its position, misses hashes it does
    /// not hold (also ones whose first slot is taken) and refuses
    /// duplicates and odd lengths.
    #[test]
    fn hash_index_lookups_and_duplicates() {
        let hashes: Vec<PageHash> = (0..1000u128).map(|i| hash_page(&page(i as u8)) ^ (i << 70)).collect();
        let mut bytes = Vec::new();
        for h in &hashes {
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        let idx = HashIndex::parse(bytes.clone()).unwrap();
        assert_eq!(idx.len(), 1000);
        for (i, &h) in hashes.iter().enumerate() {
            assert_eq!(idx.get(h), Some(i));
        }
        // Same low bits as a held hash (same first slot), different high bits.
        assert_eq!(idx.get(hashes[7] ^ (1 << 100)), None);
        assert_eq!(idx.get(0), None);
        assert_eq!(idx.hashes().collect::<Vec<_>>(), hashes);
        let mut dup = bytes.clone();
        dup.extend_from_slice(&hashes[3].to_le_bytes());
        let e = HashIndex::parse(dup).err().expect("duplicate refused").to_string();
        assert!(e.contains("twice (entry 1000)"), "{e}");
        assert!(HashIndex::parse(bytes[..100].to_vec()).is_err(), "odd length");
        assert_eq!(HashIndex::parse(Vec::new()).unwrap().get(5), None);
    }

    /// A damaged pack loads (sizes are right) but hands out no damaged
    /// page: `page`, `verified` and `verify_pages` all fail, naming it.
    #[test]
    fn damaged_pack_is_caught_per_page() {
        let dir = std::env::temp_dir().join(format!("snap-pagestore-dmg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(PACK_NAME);
        let mut w = PageStoreWriter::to_file(File::create(&path).unwrap(), false).unwrap();
        let mut data = Vec::new();
        for i in 0..8u8 {
            data.extend(page(i));
        }
        let mut map = Vec::new();
        w.add_pages(0, &data, &mut map).unwrap();
        let s = w.finish().unwrap();
        assert_eq!(s.pages, 8);
        assert_eq!(s.pack_xxh3, xxhash_rust::xxh3::xxh3_64(&data));
        let r = PageStoreReader::load(&path, false, s.index.clone()).unwrap();
        assert_eq!(r.verified(0, 8 * PAGE_SIZE).unwrap(), &data[..]);
        r.verify_pages().unwrap();
        drop(r);
        let mut b = std::fs::read(&path).unwrap();
        b[5 * PAGE_SIZE + 100] ^= 0x40;
        std::fs::write(&path, &b).unwrap();
        let r = PageStoreReader::load(&path, false, s.index.clone()).unwrap();
        assert!(r.page(map[4].1).is_ok());
        let e = format!("{:#}", r.page(map[5].1).unwrap_err());
        assert!(e.contains("page 5 "), "{e}");
        assert!(r.verified(4 * PAGE_SIZE, 2 * PAGE_SIZE).is_err());
        assert!(r.verified(0, 5 * PAGE_SIZE).is_ok());
        assert!(r.verify_pages().is_err());
        assert!(r.verified(PAGE_SIZE, 8 * PAGE_SIZE).is_err(), "beyond the pack");
        assert!(r.verified(100, PAGE_SIZE).is_err(), "unaligned");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Throughput of add_pages (writing the pack to /dev/shm) against a
    /// memcpy of the same buffer. `cargo test --release -- --ignored --nocapture bench_add_pages`
    #[test]
    #[ignore]
    fn bench_add_pages() {
        const SIZE: usize = 1 << 30;
        // Realistic-ish content: distinct non-zero pages, 1/16 zero pages.
        let mut data = vec![0u8; SIZE];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for (i, p) in data.chunks_mut(PAGE_SIZE).enumerate() {
            if i % 16 == 7 {
                continue;
            }
            for w in p.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_ne_bytes());
            }
        }
        let mut dst = vec![0u8; SIZE];
        dst.fill(1); // fault in
        let t = std::time::Instant::now();
        dst.copy_from_slice(&data);
        let memcpy = SIZE as f64 / t.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box(&dst);
        drop(dst);

        let mut map = Vec::new();
        let mut w = PageStoreWriter::discard();
        let t = std::time::Instant::now();
        for (i, c) in data.chunks(16 << 20).enumerate() {
            w.add_pages((i * (16 << 20)) as u64, c, &mut map).unwrap();
        }
        let discard = SIZE as f64 / t.elapsed().as_secs_f64() / 1e9;

        let path = std::path::PathBuf::from(format!("/dev/shm/snap-bench-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let mut map = Vec::new();
        let mut w = PageStoreWriter::to_file(f, false).unwrap();
        let t = std::time::Instant::now();
        for (i, c) in data.chunks(16 << 20).enumerate() {
            w.add_pages((i * (16 << 20)) as u64, c, &mut map).unwrap();
        }
        let s = w.finish().unwrap();
        let shm = SIZE as f64 / t.elapsed().as_secs_f64() / 1e9;
        let _ = std::fs::remove_file(&path);
        println!(
            "memcpy {memcpy:.2} GB/s; add_pages (hash+dedup only) {discard:.2} GB/s = {:.0}%; \
             add_pages + pack to tmpfs {shm:.2} GB/s = {:.0}% ({} pages)",
            discard / memcpy * 100.0,
            shm / memcpy * 100.0,
            s.pages
        );
    }
}

/// The page stores of an image and of its parents, nearest first: what an
/// incremental image's page maps resolve against.
#[derive(Clone)]
pub struct ChainStore {
    stores: Vec<PageStoreReader>,
}

impl ChainStore {
    /// `stores[0]` is the image's own, then its parent's, and so on.
    pub fn new(stores: Vec<PageStoreReader>) -> Self {
        Self { stores }
    }

    /// (which store, byte offset in it) of a page, nearest store first.
    pub fn locate(&self, hash: PageHash) -> Result<(usize, usize)> {
        for (i, s) in self.stores.iter().enumerate() {
            if let Some(k) = s.inner.index.get(hash) {
                return Ok((i, k * PAGE_SIZE));
            }
        }
        bail!("page {hash:032x} is in no page store of the image or its parents")
    }

    pub fn contains(&self, hash: PageHash) -> bool {
        self.stores.iter().any(|s| s.contains(hash))
    }

    /// The checked bytes of a page.
    pub fn page(&self, hash: PageHash) -> Result<&[u8]> {
        let (i, off) = self.locate(hash)?;
        self.stores[i].verified(off, PAGE_SIZE)
    }

    /// `PageStoreReader::verified` on store `i`.
    pub fn verified(&self, i: usize, off: usize, len: usize) -> Result<&[u8]> {
        self.stores.get(i).context("page store index out of range")?.verified(off, len)
    }

    /// Every page hash the chain holds.
    pub fn hashes(&self) -> impl Iterator<Item = PageHash> + '_ {
        self.stores.iter().flat_map(|s| s.inner.index.hashes())
    }

    pub fn stores(&self) -> &[PageStoreReader] {
        &self.stores
    }
}

impl PageStoreReader {
    /// Offset of a page inside `bytes()`: restore widens runs of pages that
    /// are adjacent in the pack into one slice for `process_vm_writev`.
    pub fn page_offset(&self, hash: PageHash) -> Result<usize> {
        let i = self.inner.index.get(hash).with_context(|| format!("page {hash:032x} is not in the page store"))?;
        Ok(i * PAGE_SIZE)
    }
}
