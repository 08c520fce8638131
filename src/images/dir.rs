//! Image directory writer and validating reader (docs/image-format.md).
//!
//! A dump writes records and page maps as it goes, the page pack streams
//! out in the background, and `finish` writes `inventory.json` last, with
//! the manifest (name, size, xxh3-64 of every file) inside it. A directory
//! without `inventory.json` is an incomplete dump.
//!
//! The reader trusts nothing: it checks the format version, the
//! architecture, every manifest name (no `/`, no `..`), every file's size
//! and checksum, and then only reads files listed in the manifest.
use super::pagestore::{
    ChainStore, PageHash, PageStoreReader, PageStoreWriter, INDEX_NAME, PACK_NAME, PACK_ZST_NAME, PAGE_SIZE,
};
use super::records::{Inventory, FORMAT_VERSION};
use anyhow::{bail, ensure, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

pub const INVENTORY_NAME: &str = "inventory.json";
/// Architecture this build writes and accepts.
pub const ARCH: &str = "x86_64";
/// `inventory.json` larger than this is refused (it holds metadata only).
pub const MAX_INVENTORY_BYTES: u64 = 64 << 20;
/// Longest file name accepted in a manifest.
pub const MAX_NAME_LEN: usize = 200;
/// One page map entry: u64 LE address + u128 LE page hash.
pub const PAGEMAP_ENTRY_SIZE: usize = 24;
/// Suffix of the file that lists, for a page map of an incremental image,
/// the address ranges whose entries are the parent's (same page map name):
/// pairs of u64 LE (start, end), sorted, disjoint, page-aligned.
pub const INHERIT_SUFFIX: &str = ".from-parent";

/// One file of the image, as listed in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    /// xxh3-64 of the file's bytes, 16 lowercase hex digits.
    pub xxh3: String,
}

/// Where the page store is and how it is encoded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PageStoreInfo {
    /// `pages.pack` or `pages.pack.zst`.
    pub pack: String,
    /// `pages.idx`.
    pub index: String,
    /// Distinct pages in the store.
    pub pages: u64,
    /// "none" or "zstd".
    pub compression: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub files: Vec<ManifestFile>,
    pub page_store: PageStoreInfo,
}

/// What `inventory.json` holds: the inventory's fields plus `manifest`.
/// Code that only needs the `Inventory` can parse the file as one: unknown
/// fields are skipped.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InventoryFile {
    #[serde(flatten)]
    inventory: Inventory,
    manifest: Manifest,
}

/// Accept only plain, short file names: `[A-Za-z0-9._+-]`, not starting
/// with a dot, no `..` anywhere. Hostile manifests cannot reach outside the
/// directory.
pub fn check_name(name: &str) -> Result<()> {
    ensure!(!name.is_empty(), "empty file name");
    ensure!(name.len() <= MAX_NAME_LEN, "file name {:?}... is longer than {MAX_NAME_LEN} bytes", &name[..name.floor_char_boundary(40)]);
    ensure!(!name.contains('/'), "file name {name:?} contains '/'");
    ensure!(!name.contains(".."), "file name {name:?} contains '..'");
    ensure!(!name.starts_with('.'), "file name {name:?} starts with '.'");
    ensure!(
        name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)),
        "file name {name:?} has characters outside [A-Za-z0-9._+-]"
    );
    Ok(())
}

fn hex64(x: u64) -> String {
    format!("{x:016x}")
}

/// Names the writer keeps for itself.
fn reserved(name: &str) -> bool {
    [INVENTORY_NAME, PACK_NAME, PACK_ZST_NAME, INDEX_NAME].contains(&name) || name.ends_with(".tmp")
}

/// True for the page maps of an image: `pagemap-<pid>.bin` (a process's
/// private memory) and `pagemap-shmem-<id>.bin` (shared anonymous memory).
/// Tools that must find every page an image uses (merge, prune, show) go
/// by this name rule rather than by the records, so they need not know
/// every record type.
pub fn is_pagemap_name(name: &str) -> bool {
    name.starts_with("pagemap-") && name.ends_with(".bin")
}

/// Encode a page map: sorted by address, strictly increasing, page-aligned.
pub fn encode_pagemap(entries: &[(u64, PageHash)]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(entries.len() * PAGEMAP_ENTRY_SIZE);
    let mut prev: Option<u64> = None;
    for (i, &(addr, h)) in entries.iter().enumerate() {
        ensure!(addr % PAGE_SIZE as u64 == 0, "page map entry {i}: address {addr:#x} is not page-aligned");
        if let Some(p) = prev {
            ensure!(addr > p, "page map entry {i}: address {addr:#x} does not follow {p:#x} (must be sorted, no duplicates)");
        }
        prev = Some(addr);
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
    }
    Ok(out)
}

/// Decode and validate a page map (without the store check).
pub fn decode_pagemap(name: &str, b: &[u8]) -> Result<Vec<(u64, PageHash)>> {
    ensure!(
        b.len() % PAGEMAP_ENTRY_SIZE == 0,
        "page map {name}: length {} is not a multiple of {PAGEMAP_ENTRY_SIZE}",
        b.len()
    );
    let (chunks, _) = b.as_chunks::<PAGEMAP_ENTRY_SIZE>();
    let mut out = Vec::with_capacity(chunks.len());
    let mut prev: Option<u64> = None;
    for (i, c) in chunks.iter().enumerate() {
        let (a, h) = c.split_at(8);
        let addr = u64::from_le_bytes(a.try_into().context("page map entry")?);
        let hash = u128::from_le_bytes(h.try_into().context("page map entry")?);
        ensure!(addr % PAGE_SIZE as u64 == 0, "page map {name} entry {i}: address {addr:#x} is not page-aligned");
        ensure!(addr <= u64::MAX - PAGE_SIZE as u64 + 1, "page map {name} entry {i}: address {addr:#x} out of range");
        if let Some(p) = prev {
            ensure!(addr > p, "page map {name} entry {i}: address {addr:#x} after {p:#x} (not sorted or duplicate)");
        }
        prev = Some(addr);
        out.push((addr, hash));
    }
    Ok(out)
}

/// Decode and validate an inherited-ranges file: sorted, disjoint,
/// page-aligned, non-empty ranges.
pub fn decode_ranges(name: &str, b: &[u8]) -> Result<Vec<(u64, u64)>> {
    ensure!(b.len() % 16 == 0, "{name}: length {} is not a multiple of 16", b.len());
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(b.len() / 16);
    for (i, c) in b.as_chunks::<16>().0.iter().enumerate() {
        let s = u64::from_le_bytes(c[..8].try_into().context("range")?);
        let e = u64::from_le_bytes(c[8..].try_into().context("range")?);
        ensure!(
            s < e && s % PAGE_SIZE as u64 == 0 && e % PAGE_SIZE as u64 == 0,
            "{name} range {i}: {s:#x}-{e:#x} is empty or not page-aligned"
        );
        if let Some(&(_, pe)) = out.last() {
            ensure!(s >= pe, "{name} range {i}: {s:#x} overlaps or precedes the one before (ends {pe:#x})");
        }
        out.push((s, e));
    }
    Ok(out)
}

pub struct ImageWriter {
    dir: PathBuf,
    files: Vec<ManifestFile>,
    names: HashSet<String>,
    pages: PageStoreWriter,
    pack_name: &'static str,
}

impl ImageWriter {
    /// Create `dir` (it must not exist or be empty).
    pub fn create(dir: &Path, compress: bool) -> Result<Self> {
        match std::fs::read_dir(dir) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    bail!("image directory {} exists and is not empty", dir.display());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating image directory {}", dir.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("image directory {}", dir.display())),
        }
        let pack_name = if compress { PACK_ZST_NAME } else { PACK_NAME };
        let pack_path = dir.join(pack_name);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&pack_path)
            .with_context(|| format!("creating {}", pack_path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            names: HashSet::new(),
            pages: PageStoreWriter::to_file(f, compress)?,
            pack_name,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn write_json<T: Serialize>(&mut self, name: &str, v: &T) -> Result<()> {
        let b = serde_json::to_vec_pretty(v).with_context(|| format!("encoding {name}"))?;
        self.write_bytes(name, &b)
    }

    pub fn write_bytes(&mut self, name: &str, data: &[u8]) -> Result<()> {
        check_name(name)?;
        ensure!(!reserved(name), "file name {name:?} is reserved for the image itself");
        ensure!(!self.names.contains(name), "image file {name} written twice");
        let path = self.dir.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(data).with_context(|| format!("writing {}", path.display()))?;
        self.names.insert(name.to_string());
        self.files.push(ManifestFile { name: name.to_string(), size: data.len() as u64, xxh3: hex64(xxh3_64(data)) });
        Ok(())
    }

    /// Write a page map (sorted by address) as `name`. Every hash must have
    /// been added to this image's page store.
    pub fn write_pagemap(&mut self, name: &str, entries: &[(u64, PageHash)]) -> Result<()> {
        for &(addr, h) in entries {
            ensure!(self.pages.contains(h), "page map {name}: page at {addr:#x} ({h:032x}) is not in the page store");
        }
        let b = encode_pagemap(entries).with_context(|| format!("page map {name}"))?;
        self.write_bytes(name, &b)
    }

    /// For page map `name` of an incremental image: the runs `(address,
    /// length)` whose entries are taken from the parent's page map `name`.
    /// An unchanged page costs no entry of its own: the image stays small
    /// however big the process (DESIGN: incremental images hold what changed).
    pub fn write_inherited(&mut self, name: &str, runs: &[(u64, usize)]) -> Result<()> {
        let mut b = Vec::with_capacity(runs.len() * 16);
        for &(a, l) in runs {
            b.extend_from_slice(&a.to_le_bytes());
            b.extend_from_slice(&(a + l as u64).to_le_bytes());
        }
        decode_ranges(name, &b)?;
        self.write_bytes(&format!("{name}{INHERIT_SUFFIX}"), &b)
    }

    pub fn pages(&mut self) -> &mut PageStoreWriter {
        &mut self.pages
    }

    /// Flush the page store, write the manifest and `inventory.json` last.
    pub fn finish(mut self, inv: Inventory) -> Result<()> {
        let summary = self.pages.finish().context("finishing the page store")?;
        timing("page store finished");
        let idx_path = self.dir.join(INDEX_NAME);
        std::fs::write(&idx_path, &summary.index).with_context(|| format!("writing {}", idx_path.display()))?;
        self.files.push(ManifestFile {
            name: INDEX_NAME.into(),
            size: summary.index.len() as u64,
            xxh3: hex64(xxh3_64(&summary.index)),
        });
        self.files.push(ManifestFile {
            name: self.pack_name.into(),
            size: summary.pack_bytes,
            xxh3: hex64(summary.pack_xxh3),
        });
        let manifest = Manifest {
            files: self.files,
            page_store: PageStoreInfo {
                pack: self.pack_name.into(),
                index: INDEX_NAME.into(),
                pages: summary.pages,
                compression: if summary.compressed { "zstd" } else { "none" }.into(),
            },
        };
        // Everything else must be on disk before the inventory says the
        // image is complete.
        let d = File::open(&self.dir).with_context(|| format!("open {}", self.dir.display()))?;
        timing("syncfs");
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)).with_context(|| format!("syncfs {}", self.dir.display()))?;
        let body = serde_json::to_vec_pretty(&InventoryFile { inventory: inv, manifest }).context("encoding inventory")?;
        let tmp = self.dir.join("inventory.json.tmp");
        {
            let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&body).with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
        }
        let fin = self.dir.join(INVENTORY_NAME);
        std::fs::rename(&tmp, &fin).with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
        d.sync_all().with_context(|| format!("fsync {}", self.dir.display()))?;
        Ok(())
    }
}

/// Open a file of the image without following symlinks.
fn open_in(dir: &Path, name: &str) -> Result<(File, u64)> {
    let path = dir.join(name);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("image file {name}: cannot open {}", path.display()))?;
    let md = f.metadata().with_context(|| format!("image file {name}: stat"))?;
    ensure!(md.is_file(), "image file {name} is not a regular file");
    Ok((f, md.len()))
}

/// Stream the file through xxh3-64.
fn hash_file(f: &mut File, name: &str) -> Result<(u64, u64)> {
    let mut h = Xxh3Default::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf).with_context(|| format!("reading image file {name}"))?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((n, h.digest()))
}

pub struct ImageReader {
    dir: PathBuf,
    inv: Inventory,
    manifest: Manifest,
    files: HashMap<String, ManifestFile>,
    store: PageStoreReader,
    /// The parent image of an incremental chain, opened and validated too.
    parent: Option<Box<ImageReader>>,
    /// This image's store and its parents'.
    chain: ChainStore,
}

/// Longest chain of parents followed (a loop of images is refused by it).
pub const MAX_CHAIN: usize = 1000;

impl ImageReader {
    /// Open and validate (version, arch, manifest sizes and checksums), and
    /// the same for every parent of an incremental image.
    pub fn open(dir: &Path) -> Result<Self> {
        timing("image open");
        let r = Self::open_chain(dir, 0);
        timing("image opened");
        r
    }

    fn open_chain(dir: &Path, depth: usize) -> Result<Self> {
        let mut me = Self::open_inner(dir).with_context(|| format!("image {}", dir.display()))?;
        let Some(rel) = me.inv.parent.clone() else { return Ok(me) };
        ensure!(depth < MAX_CHAIN, "image {}: chain of parents longer than {MAX_CHAIN} (a loop?)", dir.display());
        let pdir = dir.join(&rel);
        let parent = Self::open_chain(&pdir, depth + 1).with_context(|| {
            format!("image {} is incremental: its parent {} cannot be used", dir.display(), pdir.display())
        })?;
        if let Some(want) = &me.inv.parent_id {
            ensure!(
                &parent.inv.id == want,
                "image {}: parent {} is image {:?}, but this image was dumped against image {want:?} (replaced parent?)",
                dir.display(),
                pdir.display(),
                parent.inv.id
            );
        }
        let mut stores = vec![me.store.clone()];
        stores.extend(parent.chain.stores().iter().cloned());
        me.chain = ChainStore::new(stores);
        me.parent = Some(Box::new(parent));
        Ok(me)
    }

    /// The parent image of an incremental chain.
    pub fn parent(&self) -> Option<&ImageReader> {
        self.parent.as_deref()
    }

    fn open_inner(dir: &Path) -> Result<Self> {
        let (f, len) = match open_in(dir, INVENTORY_NAME) {
            Ok(x) => x,
            Err(e) if !dir.join(INVENTORY_NAME).exists() => {
                return Err(e).context("no inventory.json: not an image, or an incomplete dump");
            }
            Err(e) => return Err(e),
        };
        ensure!(len <= MAX_INVENTORY_BYTES, "inventory.json is {len} bytes (limit {MAX_INVENTORY_BYTES})");
        let mut body = Vec::new();
        f.take(MAX_INVENTORY_BYTES + 1).read_to_end(&mut body).context("reading inventory.json")?;
        ensure!(body.len() as u64 <= MAX_INVENTORY_BYTES, "inventory.json is larger than {MAX_INVENTORY_BYTES} bytes");

        // Check the version before the rest of the schema, so a newer image
        // says so instead of failing on a field it does not know.
        let v: serde_json::Value = serde_json::from_slice(&body).context("inventory.json is not valid JSON")?;
        let ver = v.get("format_version").context("inventory.json has no format_version")?;
        let ver = ver.as_u64().with_context(|| format!("inventory.json: format_version {ver} is not a number"))?;
        ensure!(
            ver == FORMAT_VERSION as u64,
            "{INVENTORY_NAME}: image format version {ver}, this snap reads version {FORMAT_VERSION}"
        );
        let invf: InventoryFile = serde_json::from_value(v).context("inventory.json")?;
        let inv = invf.inventory;
        let manifest = invf.manifest;
        ensure!(inv.arch == ARCH, "image is for architecture {:?}, this is {ARCH}", inv.arch);

        let mut files = HashMap::new();
        for mf in &manifest.files {
            check_name(&mf.name).context("manifest")?;
            ensure!(mf.name != INVENTORY_NAME, "manifest lists {INVENTORY_NAME} itself");
            ensure!(mf.xxh3.len() == 16, "manifest: {}: checksum {:?} is not 16 hex digits", mf.name, mf.xxh3);
            u64::from_str_radix(&mf.xxh3, 16)
                .with_context(|| format!("manifest: {}: checksum {:?} is not hex", mf.name, mf.xxh3))?;
            ensure!(files.insert(mf.name.clone(), mf.clone()).is_none(), "manifest lists {} twice", mf.name);
        }
        let ps = &manifest.page_store;
        let compressed = match (ps.compression.as_str(), ps.pack.as_str()) {
            ("none", PACK_NAME) => false,
            ("zstd", PACK_ZST_NAME) => true,
            (c, p) => bail!("manifest: page store compression {c:?} with pack {p:?} is not supported"),
        };
        ensure!(ps.index == INDEX_NAME, "manifest: page store index {:?} (expected {INDEX_NAME})", ps.index);
        ensure!(files.contains_key(&ps.pack), "manifest: page pack {} is not listed", ps.pack);
        ensure!(files.contains_key(&ps.index), "manifest: page index {} is not listed", ps.index);

        // Sizes and checksums of every file but the uncompressed pack (see
        // below).
        for mf in &manifest.files {
            let (mut f, size) = open_in(dir, &mf.name)?;
            ensure!(size == mf.size, "image file {}: size {size}, manifest says {}", mf.name, mf.size);
            // The index is read (and checked) once, just below.
            if (!compressed && mf.name == ps.pack) || mf.name == ps.index {
                continue;
            }
            let (n, x) = hash_file(&mut f, &mf.name)?;
            ensure!(n == mf.size, "image file {}: read {n} bytes, manifest says {}", mf.name, mf.size);
            ensure!(hex64(x) == mf.xxh3, "image file {}: checksum {} does not match the manifest ({})", mf.name, hex64(x), mf.xxh3);
        }
        let index = read_listed(dir, &files, &ps.index)?;
        ensure!(
            index.len() as u64 / 16 == ps.pages,
            "manifest says {} pages, {} lists {}",
            ps.pages,
            ps.index,
            index.len() / 16
        );
        // The uncompressed pack's size is checked above and by `load`; its
        // contents are checked page by page as they are used (every page's
        // name is its xxh3-128), which costs no pass of its own. Its
        // manifest checksum remains for `verify_pack`.
        let store = PageStoreReader::load(&dir.join(&ps.pack), compressed, index)
            .with_context(|| format!("page store {}", ps.pack))?;
        let chain = ChainStore::new(vec![store.clone()]);
        Ok(Self { dir: dir.to_path_buf(), inv, manifest, files, store, parent: None, chain })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inv
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// True if the manifest lists `name`.
    pub fn has(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let b = self.read_bytes(name)?;
        serde_json::from_slice(&b).with_context(|| format!("image {}: {name}", self.dir.display()))
    }

    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        read_listed(&self.dir, &self.files, name).with_context(|| format!("image {}", self.dir.display()))
    }

    /// A page map, complete: for an incremental image, the entries it takes
    /// from its parent are merged in (see `INHERIT_SUFFIX`).
    pub fn pagemap(&self, name: &str) -> Result<Vec<(u64, PageHash)>> {
        let b = self.read_bytes(name)?;
        let mut m = decode_pagemap(name, &b).with_context(|| format!("image {}", self.dir.display()))?;
        let inh = format!("{name}{INHERIT_SUFFIX}");
        if self.has(&inh) {
            let ranges = decode_ranges(&inh, &self.read_bytes(&inh)?).with_context(|| format!("image {}", self.dir.display()))?;
            let parent = self
                .parent
                .as_deref()
                .with_context(|| format!("image {}: {inh} takes pages from a parent, but the image has none", self.dir.display()))?;
            let from = parent.pagemap(name)?;
            m = merge_inherited(&m, &from, &ranges)
                .with_context(|| format!("image {}: page map {name} with {inh}", self.dir.display()))?;
            return Ok(m);
        }
        for &(addr, h) in &m {
            ensure!(
                self.chain.contains(h),
                "image {}: page map {name}: page at {addr:#x} ({h:032x}) is not in the page store{}",
                self.dir.display(),
                if self.parent.is_some() { " nor in its parents'" } else { "" }
            );
        }
        Ok(m)
    }

    /// The addresses page map `name` covers once merged with its parents'
    /// (sorted, disjoint spans), without merging: this image's own pages
    /// and its inherited ranges, which hold only pages the parent has (the
    /// merge checks that at restore). What an incremental dump needs of its
    /// parent, at a fraction of [`Self::pagemap`]'s cost.
    pub fn pagemap_spans(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let b = self.read_bytes(name)?;
        let own = decode_pagemap(name, &b).with_context(|| format!("image {}", self.dir.display()))?;
        let mut spans = Vec::new();
        for &(a, _) in &own {
            crate::spans::push(&mut spans, a, a + PAGE_SIZE as u64);
        }
        let inh = format!("{name}{INHERIT_SUFFIX}");
        if self.has(&inh) {
            let ranges = decode_ranges(&inh, &self.read_bytes(&inh)?).with_context(|| format!("image {}", self.dir.display()))?;
            spans = crate::spans::union(&spans, &ranges);
        }
        Ok(spans)
    }

    /// The pages the page maps refer to: this image's store and its parents'.
    pub fn pages(&self) -> Result<ChainStore> {
        Ok(self.chain.clone())
    }

    /// This image's own page store (without its parents').
    pub fn own_pages(&self) -> &PageStoreReader {
        &self.store
    }

    /// Full check of the page pack: its manifest checksum, and every page
    /// against its name. `open` leaves this to the page accessors, which
    /// check each page as it is used.
    pub fn verify_pack(&self) -> Result<()> {
        let ps = &self.manifest.page_store;
        let mf = self.files.get(&ps.pack).with_context(|| format!("manifest: page pack {} is not listed", ps.pack))?;
        if !self.store.compressed() {
            let x = hex64(xxh3_64(self.store.pack_bytes()));
            ensure!(
                x == mf.xxh3,
                "image {}: image file {}: checksum {x} does not match the manifest ({})",
                self.dir.display(),
                mf.name,
                mf.xxh3
            );
        }
        self.store.verify_pages().with_context(|| format!("image {}: page pack {}", self.dir.display(), ps.pack))
    }
}

/// `own` entries plus those of `parent` inside `ranges`, sorted. An own
/// entry inside an inherited range is refused (the image is inconsistent).
fn merge_inherited(own: &[(u64, PageHash)], parent: &[(u64, PageHash)], ranges: &[(u64, u64)]) -> Result<Vec<(u64, PageHash)>> {
    for &(addr, _) in own {
        let k = ranges.partition_point(|r| r.1 <= addr);
        ensure!(k == ranges.len() || ranges[k].0 > addr, "page {addr:#x} is stored here and also in an inherited range");
    }
    let mut taken: Vec<(u64, PageHash)> = Vec::new();
    let mut i = 0;
    for &(s, e) in ranges {
        i += parent[i..].partition_point(|x| x.0 < s);
        let before = taken.len();
        while i < parent.len() && parent[i].0 < e {
            taken.push(parent[i]);
            i += 1;
        }
        // A dump inherits only pages its parent holds: a range with holes
        // would restore them as zero, so the image is refused instead (and
        // `pagemap_spans` may take the ranges as they are).
        ensure!(
            (taken.len() - before) as u64 == (e - s) / PAGE_SIZE as u64,
            "inherited range {s:#x}-{e:#x} covers pages the parent does not hold"
        );
    }
    let mut out = Vec::with_capacity(own.len() + taken.len());
    let (mut a, mut b) = (0, 0);
    while a < own.len() || b < taken.len() {
        match (own.get(a), taken.get(b)) {
            (Some(x), Some(y)) if x.0 < y.0 => {
                out.push(*x);
                a += 1;
            }
            (Some(x), None) => {
                out.push(*x);
                a += 1;
            }
            (_, Some(y)) => {
                out.push(*y);
                b += 1;
            }
            (None, None) => break,
        }
    }
    Ok(out)
}

/// Read a file the manifest lists, checking its size and checksum again
/// (the directory may have changed since `open`).
fn read_listed(dir: &Path, files: &HashMap<String, ManifestFile>, name: &str) -> Result<Vec<u8>> {
    let mf = files.get(name).with_context(|| format!("{name} is not in the image manifest"))?;
    let (f, size) = open_in(dir, name)?;
    ensure!(size == mf.size, "image file {name}: size {size}, manifest says {}", mf.size);
    let mut b = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 30));
    f.take(mf.size).read_to_end(&mut b).with_context(|| format!("reading image file {name}"))?;
    ensure!(b.len() as u64 == mf.size, "image file {name}: read {} bytes, manifest says {}", b.len(), mf.size);
    let x = hex64(xxh3_64(&b));
    ensure!(x == mf.xxh3, "image file {name}: checksum {x} does not match the manifest ({})", mf.xxh3);
    Ok(b)
}

/// With `SNAP_TIMING` set in the environment, print `label` and the
/// milliseconds since the first call on stderr: where a dump or restore
/// spends its time, without a profiler (bench/run.sh can show it).
pub fn timing(label: &str) {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    if let Some(t0) = START.get_or_init(|| std::env::var_os("SNAP_TIMING").map(|_| Instant::now())) {
        let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
            .map_or(0.0, |t| t.tv_sec() as f64 * 1e3 + t.tv_nsec() as f64 / 1e6);
        eprintln!("snap timing: {:9.3} ms  (cpu {cpu:9.3} ms)  {label}", t0.elapsed().as_secs_f64() * 1e3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_takes_inherited_ranges_and_refuses_holes() {
        let p = PAGE_SIZE as u64;
        let parent = [(0, 10), (p, 11), (2 * p, 12), (4 * p, 14)];
        let own = [(3 * p, 33)];
        let m = merge_inherited(&own, &parent, &[(p, 3 * p)]).unwrap();
        assert_eq!(m, vec![(p, 11), (2 * p, 12), (3 * p, 33)]);
        // Page 3 is not the parent's: a range over it would restore a hole.
        let e = merge_inherited(&[], &parent, &[(2 * p, 5 * p)]).unwrap_err();
        assert!(e.to_string().contains("does not hold"), "{e}");
        // A page stored here and inherited too.
        assert!(merge_inherited(&own, &parent, &[(3 * p, 4 * p)]).is_err());
    }
}
