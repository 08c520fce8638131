//! Merging incremental chains into standalone images (`snap image merge`)
//! and removing old checkpoints without breaking the ones kept
//! (`snap image prune`). Format side: docs/image-format.md, "Chains, merge
//! and prune".
//!
//! An incremental image's page maps point into its own store and its
//! parents' stores, so a parent can only go once nothing left needs it.
//! `merge` writes an image as a standalone copy; `prune` rewrites, in place
//! and crash-safely, each kept image whose parent is about to go, then
//! checks every kept image before it deletes anything.

use super::dir::{is_pagemap_name, ImageReader, ImageWriter, INHERIT_SUFFIX, INVENTORY_NAME, MAX_CHAIN};
use super::pagestore::{BuildPageHasher, ChainStore, PageHash, PageStoreWriter, PAGE_SIZE};
use super::records::Inventory;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What `merge` wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MergeReport {
    /// The image merged.
    pub dir: String,
    /// The standalone image written.
    pub output: String,
    /// The image id, the same in both (same checkpoint content).
    pub id: String,
    /// Images whose page stores were read: the image and its parents.
    pub chain_len: usize,
    /// Files copied unchanged (records, page maps, data blobs).
    pub files_copied: usize,
    /// Distinct pages in the new store.
    pub pages: u64,
    /// Size of the new page pack file.
    pub pack_bytes: u64,
    /// "none" or "zstd".
    pub compression: String,
}

/// What `prune` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    /// Image directories removed.
    pub removed: Vec<String>,
    /// Image directories rewritten as standalone (their parents were removed).
    pub rebased: Vec<String>,
    /// Bytes freed on disk.
    pub bytes_freed: u64,
    /// Image directories kept, oldest first.
    pub kept: Vec<String>,
    /// Entries of the root that are not images and were left alone (a
    /// directory without inventory.json may be a dump being written).
    pub skipped: Vec<String>,
    /// Leftovers of an interrupted prune that were put right first.
    pub recovered: Vec<String>,
}

// ------------------------------------------------------------------ merge

/// Write the image `dir` as the standalone image `out` (which must not
/// exist or be empty): see `merge_into`. On failure nothing is left at
/// `out`.
pub fn merge(dir: &Path, out: &Path, compress: bool) -> Result<MergeReport> {
    let img = ImageReader::open(dir).with_context(|| format!("merge: cannot read image {}", dir.display()))?;
    merge_into(&img, &[], out, compress)
        .with_context(|| format!("merging image {} into {}", dir.display(), out.display()))
}

/// Write `img` as a standalone image at `out`: every file of its manifest
/// but the page store copied byte for byte (page maps complete, with what
/// they inherit from the parent merged in; no `.from-parent` files), a new store holding exactly the
/// pages its page maps use plus `extra` (pages other images will need from
/// it), and its inventory without `parent` and `parent_id` (the `id` stays:
/// same content, so a child dumped against `img` may use `out` as parent).
/// A failure removes what was written (or empties `out` if it existed).
fn merge_into(img: &ImageReader, extra: &[PageHash], out: &Path, compress: bool) -> Result<MergeReport> {
    let existed = out.exists();
    let w = match ImageWriter::create(out, compress) {
        Ok(w) => w,
        Err(e) => {
            if !existed {
                // Only an empty directory this call made goes.
                let _ = fs::remove_dir(out);
            }
            return Err(e);
        }
    };
    let r = write_merged(img, extra, w, out);
    if r.is_err() {
        remove_partial(out, existed);
    }
    r
}

/// Remove a partly written image: the directory if this run created it,
/// else only what was put in it.
fn remove_partial(dir: &Path, existed: bool) {
    if !existed {
        let _ = fs::remove_dir_all(dir);
    } else if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn write_merged(img: &ImageReader, extra: &[PageHash], mut w: ImageWriter, out: &Path) -> Result<MergeReport> {
    let chain = img.pages()?;
    let m = img.manifest().clone();
    // Pages in the order the page maps use them: pages restored together
    // stay together in the new pack.
    let mut hashes = Vec::new();
    for f in m.files.iter().filter(|f| is_pagemap_name(&f.name)) {
        hashes.extend(img.pagemap(&f.name)?.into_iter().map(|(_, h)| h));
    }
    hashes.extend_from_slice(extra);
    let mut prog = crate::progress::Progress::new("merge", (hashes.len() * PAGE_SIZE) as u64);
    let mut scratch = Vec::with_capacity(1);
    for h in hashes {
        copy_page(&chain, h, w.pages(), &mut scratch)
            .with_context(|| format!("image {}: page {h:032x}", img.dir().display()))?;
        prog.add(PAGE_SIZE as u64);
    }
    prog.finish();
    let mut files_copied = 0;
    for f in &m.files {
        if f.name == m.page_store.pack || f.name == m.page_store.index || f.name.ends_with(INHERIT_SUFFIX) {
            continue;
        }
        let ctx = || format!("writing {} into {}", f.name, out.display());
        if is_pagemap_name(&f.name) {
            // Complete: with the entries an incremental image takes from
            // its parent merged in.
            w.write_pagemap(&f.name, &img.pagemap(&f.name)?).with_context(ctx)?;
        } else {
            w.write_bytes(&f.name, &img.read_bytes(&f.name)?).with_context(ctx)?;
        }
        files_copied += 1;
    }
    let mut inv = img.inventory().clone();
    inv.parent = None;
    inv.parent_id = None;
    w.finish(inv.clone()).with_context(|| format!("finishing image {}", out.display()))?;

    // What was written must stand on its own.
    let done = ImageReader::open(out).with_context(|| format!("checking the new image {}", out.display()))?;
    ensure!(done.inventory() == &inv, "the new image {}: inventory differs from the one written", out.display());
    check_page_maps(&done)?;
    let nm = done.manifest();
    Ok(MergeReport {
        dir: img.dir().display().to_string(),
        output: out.display().to_string(),
        id: inv.id,
        chain_len: chain.stores().len(),
        files_copied,
        pages: nm.page_store.pages,
        pack_bytes: nm.files.iter().find(|f| f.name == nm.page_store.pack).map_or(0, |f| f.size),
        compression: nm.page_store.compression.clone(),
    })
}

/// Copy one page from the chain into `store`, unless it is there already.
/// `ChainStore::page` checks the bytes against their hash as it reads them;
/// `add_pages` hashes them again for the new store, and must agree.
fn copy_page(chain: &ChainStore, h: PageHash, store: &mut PageStoreWriter, scratch: &mut Vec<(u64, PageHash)>) -> Result<()> {
    if store.contains(h) {
        return Ok(());
    }
    let data = chain.page(h)?;
    scratch.clear();
    store.add_pages(0, data, scratch)?;
    ensure!(
        scratch.first().map(|e| e.1) == Some(h),
        "page {h:032x} is all zeros (an image never stores or lists zero pages)"
    );
    Ok(())
}

/// Every entry of every page map of `img` resolves in its chain
/// (`ImageReader::pagemap` checks each hash). Returns the entries counted.
fn check_page_maps(img: &ImageReader) -> Result<u64> {
    let mut n = 0;
    for f in img.manifest().files.iter().filter(|f| is_pagemap_name(&f.name)) {
        n += img.pagemap(&f.name)?.len() as u64;
    }
    Ok(n)
}

// ------------------------------------------------------------------ listing

/// Prefixes of the directories a prune makes next to the images. They
/// start with a dot and are never taken for images; `recover` clears them.
const NEW_PREFIX: &str = ".snap-prune-new-";
const OLD_PREFIX: &str = ".snap-prune-old-";
const DEL_PREFIX: &str = ".snap-prune-del-";

/// One image directory of the root.
struct Image {
    /// Directory name inside the root.
    name: String,
    dir: PathBuf,
    /// Canonical path: how parents (relative paths) are matched to images.
    canon: PathBuf,
    /// The inventory, or why it cannot be read.
    inv: Result<Inventory, String>,
}

impl Image {
    fn created(&self) -> u64 {
        self.inv.as_ref().map_or(0, |i| i.created_unix)
    }
}

/// Where an image's parent is.
#[derive(Debug, Clone, PartialEq)]
enum Link {
    /// A standalone image.
    None,
    /// Another image of the root (its index).
    InRoot(usize),
    /// Outside the root: prune leaves it alone.
    Outside,
    /// The parent path leads nowhere: the image is broken already.
    Missing(PathBuf),
}

/// The images of `root` ordered by creation time then name, and the
/// entries that are no images (directories without inventory.json,
/// symlinks).
fn list_images(root: &Path) -> Result<(Vec<Image>, Vec<String>)> {
    let rd = fs::read_dir(root).with_context(|| format!("reading image root {}", root.display()))?;
    let mut images = Vec::new();
    let mut skipped = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("reading image root {}", root.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type().with_context(|| format!("{}: stat", e.path().display()))?;
        if ft.is_symlink() {
            skipped.push(format!("{name} (symlink, not followed)"));
            continue;
        }
        if !ft.is_dir() {
            continue;
        }
        let dir = e.path();
        if e.file_name().to_str().is_none() {
            skipped.push(format!("{name} (name is not UTF-8)"));
            continue;
        }
        let inv_path = dir.join(INVENTORY_NAME);
        if !fs::symlink_metadata(&inv_path).is_ok_and(|m| m.is_file()) {
            skipped.push(format!("{name} (no {INVENTORY_NAME}: not an image, or a dump being written)"));
            continue;
        }
        let inv = fs::read(&inv_path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice::<Inventory>(&b).map_err(anyhow::Error::from))
            .map_err(|e| format!("{}: {e}", inv_path.display()));
        let canon = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
        images.push(Image { name, dir, canon, inv });
    }
    images.sort_by(|a, b| (a.created(), &a.name).cmp(&(b.created(), &b.name)));
    skipped.sort();
    Ok((images, skipped))
}

/// The parent link of every image.
fn links(images: &[Image]) -> Vec<Link> {
    let by_path: HashMap<&Path, usize> = images.iter().enumerate().map(|(i, m)| (m.canon.as_path(), i)).collect();
    images
        .iter()
        .map(|m| {
            let Some(rel) = m.inv.as_ref().ok().and_then(|i| i.parent.as_ref()) else { return Link::None };
            let p = m.dir.join(rel);
            match p.canonicalize() {
                Ok(c) => by_path.get(c.as_path()).map_or(Link::Outside, |&i| Link::InRoot(i)),
                Err(_) => Link::Missing(p),
            }
        })
        .collect()
}

/// Images of the chain above `i` inside the root, nearest first (stops at
/// the first parent outside the root or missing).
fn ancestors(links: &[Link], i: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut cur = i;
    while let Link::InRoot(p) = links[cur] {
        if out.contains(&p) || out.len() >= MAX_CHAIN {
            break; // a loop of images: `ImageReader::open` refuses those
        }
        out.push(p);
        cur = p;
    }
    out
}

/// Disk space of a directory tree (allocated blocks, symlinks not followed).
fn disk_usage(path: &Path) -> Result<u64> {
    let md = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let mut n = md.blocks() * 512;
    if md.is_dir() {
        for e in fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            n += disk_usage(&e.with_context(|| format!("reading {}", path.display()))?.path())?;
        }
    }
    Ok(n)
}

// ------------------------------------------------------------------ safety

/// Holds an exclusive flock on the root directory for the whole prune:
/// two prunes of one root would pull images from under each other.
struct RootLock {
    _lock: nix::fcntl::Flock<File>,
}

fn lock_root(root: &Path) -> Result<RootLock> {
    let f = File::open(root).with_context(|| format!("opening image root {}", root.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(RootLock { _lock: l }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            bail!("image root {}: another prune is running on it", root.display())
        }
        Err((_, e)) => Err(e).with_context(|| format!("locking image root {}", root.display())),
    }
}

/// Put right what an interrupted prune left (see `replace`): a kept image
/// moved aside while its rewrite was being put in place goes back if its
/// name is free, and every other leftover is deleted (a rewritten image
/// not yet in place, an old version already replaced, an image that was
/// being deleted).
fn recover(root: &Path) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let mut names: Vec<String> = fs::read_dir(root)
        .with_context(|| format!("reading image root {}", root.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| [NEW_PREFIX, OLD_PREFIX, DEL_PREFIX].iter().any(|p| n.starts_with(p)))
        .collect();
    // Old versions first: one may have to go back before anything else.
    names.sort_by_key(|n| !n.starts_with(OLD_PREFIX));
    for n in names {
        let path = root.join(&n);
        if let Some(orig) = n.strip_prefix(OLD_PREFIX).filter(|o| !o.is_empty()) {
            let target = root.join(orig);
            if fs::symlink_metadata(&target).is_err() {
                fs::rename(&path, &target)
                    .with_context(|| format!("putting {} back at {}", path.display(), target.display()))?;
                fsync_dir(root)?;
                notes.push(format!("{orig}: put back from {n} (a prune stopped while rewriting it)"));
                continue;
            }
        }
        fs::remove_dir_all(&path).with_context(|| format!("removing {}, left by an interrupted prune", path.display()))?;
        notes.push(format!("{n}: removed (left by an interrupted prune)"));
    }
    Ok(notes)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}

/// Put the directory `with` at `dir`, and what was at `dir` at `aside`.
/// One atomic exchange (RENAME_EXCHANGE) where the filesystem has it, so
/// `dir` always holds a whole image; else two renames, between which `dir`
/// is missing for a moment (`recover` puts `aside` back after a crash).
fn replace(dir: &Path, with: &Path, aside: &Path) -> Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, with, None, dir, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => fs::rename(with, aside)
            .with_context(|| format!("renaming {} to {}", with.display(), aside.display()))?,
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            fs::rename(dir, aside).with_context(|| format!("renaming {} to {}", dir.display(), aside.display()))?;
            fs::rename(with, dir).with_context(|| format!("renaming {} to {}", with.display(), dir.display()))?;
        }
        Err(e) => {
            return Err(e).with_context(|| format!("exchanging {} and {}", with.display(), dir.display()));
        }
    }
    Ok(())
}

/// Delete an image directory: renamed out of the way first (atomic), so a
/// crash never leaves a half-deleted directory that still looks like an
/// image; `recover` finishes the job.
fn delete_dir(root: &Path, name: &str) -> Result<()> {
    let from = root.join(name);
    let to = root.join(format!("{DEL_PREFIX}{name}"));
    fs::rename(&from, &to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
    fs::remove_dir_all(&to).with_context(|| format!("removing {}", to.display()))
}

// ------------------------------------------------------------------ prune

/// Keep the newest `keep` images among the image directories directly under
/// `root` (ordered by creation time, then name) and remove the others
/// without breaking any kept image.
///
/// Each kept image whose parent is to be removed (the oldest kept image of
/// its chain) is first rewritten as standalone, in place: merged into a
/// sibling directory with every page it and the kept images below it would
/// otherwise only find in removed images, then swapped in by renames. Then
/// every kept image must open, resolve every page map entry and need no
/// removed image; only then is anything deleted. If that check fails, the
/// rewritten images are swapped back and nothing is removed.
pub fn prune(root: &Path, keep: usize) -> Result<PruneReport> {
    let _lock = lock_root(root)?;
    let recovered = recover(root)?;
    let (images, skipped) = list_images(root)?;
    if let Some(m) = images.iter().find(|m| m.inv.is_err()) {
        bail!(
            "image {}: cannot read its inventory ({}), so cannot tell which images it needs; \
             remove it with --remove or by hand first",
            m.dir.display(),
            m.inv.as_ref().err().map_or("", |e| e.as_str())
        );
    }
    let links = links(&images);
    let cut = images.len().saturating_sub(keep);
    let removed: Vec<usize> = (0..cut).collect();
    let kept: Vec<usize> = (cut..images.len()).collect();
    let mut report = PruneReport {
        kept: kept.iter().map(|&i| images[i].name.clone()).collect(),
        skipped,
        recovered,
        ..Default::default()
    };
    if removed.is_empty() {
        return Ok(report);
    }
    for &k in &kept {
        if let Link::Missing(p) = &links[k] {
            bail!(
                "kept image {} is broken already: its parent {} does not exist; nothing was removed",
                images[k].dir.display(),
                p.display()
            );
        }
    }
    let plan = plan_rebase(&links, &removed, &kept);
    let mut freed: i128 = 0;
    for &i in &removed {
        freed += i128::from(disk_usage(&images[i].dir)?);
    }

    let made = build_rewrites(root, &images, &plan).context("nothing was removed")?;
    for (b, tmp) in &made {
        freed += i128::from(disk_usage(&images[*b].dir)?) - i128::from(disk_usage(tmp)?);
    }
    let swapped = swap_in_and_check(root, &images, &made, &removed, &kept)?;

    // 4. Delete the old versions and the removed images.
    for &b in &swapped {
        fs::remove_dir_all(root.join(format!("{OLD_PREFIX}{}", images[b].name)))
            .with_context(|| format!("removing the old version of {}", images[b].dir.display()))?;
        report.rebased.push(images[b].name.clone());
    }
    for &i in &removed {
        delete_dir(root, &images[i].name)?;
        report.removed.push(images[i].name.clone());
    }
    fsync_dir(root)?;
    report.bytes_freed = u64::try_from(freed.max(0)).unwrap_or(u64::MAX);
    Ok(report)
}

/// Rewrite each image of the plan as standalone into a sibling directory,
/// all before any is put in place (each reads the chain as it is now).
/// On failure the rewrites made so far are deleted.
fn build_rewrites(root: &Path, images: &[Image], plan: &[(usize, Vec<(usize, usize)>)]) -> Result<Vec<(usize, PathBuf)>> {
    let mut made: Vec<(usize, PathBuf)> = Vec::new();
    for (b, below) in plan {
        let m = &images[*b];
        let tmp = root.join(format!("{NEW_PREFIX}{}", m.name));
        let r = (|| -> Result<()> {
            ensure!(!tmp.exists(), "{} exists already", tmp.display());
            let extra = pages_needed_from(images, below)?;
            let img = ImageReader::open(&m.dir).with_context(|| format!("kept image {}", m.dir.display()))?;
            merge_into(&img, &extra, &tmp, img.own_pages().compressed())
                .with_context(|| format!("rewriting {} as standalone", m.dir.display()))?;
            Ok(())
        })();
        if let Err(e) = r {
            for (_, t) in &made {
                let _ = fs::remove_dir_all(t);
            }
            return Err(e);
        }
        made.push((*b, tmp));
    }
    Ok(made)
}

/// Swap the rewrites in, then check every kept image. If anything fails,
/// swap the old versions back (nothing is lost). Returns the images
/// swapped: their old versions wait at `.snap-prune-old-NAME`.
fn swap_in_and_check(
    root: &Path,
    images: &[Image],
    made: &[(usize, PathBuf)],
    removed: &[usize],
    kept: &[usize],
) -> Result<Vec<usize>> {
    let mut swapped: Vec<usize> = Vec::new();
    let checked = (|| -> Result<()> {
        for (b, tmp) in made {
            replace(&images[*b].dir, tmp, &root.join(format!("{OLD_PREFIX}{}", images[*b].name)))?;
            swapped.push(*b);
        }
        fsync_dir(root)?;
        let gone: HashSet<&Path> = removed.iter().map(|&i| images[i].canon.as_path()).collect();
        for &k in kept {
            check_kept(&images[k], &gone)?;
        }
        Ok(())
    })();
    match checked {
        Ok(()) => Ok(swapped),
        Err(e) => {
            let e = e.context("nothing was removed; the rewritten images were put back as they were");
            Err(match undo_swaps(root, images, &swapped, made) {
                Ok(()) => e,
                Err(b) => e.context(format!("and putting them back failed too: {b:#}")),
            })
        }
    }
}

/// The kept images to rewrite as standalone: those whose parent is to be
/// removed. Each comes with the kept images below it that reach the
/// removed images through it, and how many steps below it they are.
fn plan_rebase(links: &[Link], removed: &[usize], kept: &[usize]) -> Vec<(usize, Vec<(usize, usize)>)> {
    let is_removed = |i: usize| removed.contains(&i);
    let mut plan: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
    for &k in kept {
        if matches!(links[k], Link::InRoot(p) if is_removed(p)) && !plan.iter().any(|(b, _)| *b == k) {
            plan.push((k, Vec::new()));
        }
    }
    for &k in kept {
        // Walk up through kept images to the first one whose parent goes.
        let up = ancestors(links, k);
        let chain = std::iter::once(k).chain(up);
        for (depth, a) in chain.enumerate() {
            if is_removed(a) {
                break;
            }
            if let Some((_, below)) = plan.iter_mut().find(|(b, _)| *b == a) {
                if depth > 0 {
                    below.push((k, depth));
                }
                break;
            }
        }
    }
    plan
}

/// Pages that the kept images `below` (each `depth` steps below the image
/// being rewritten) use and find only in that image or above it: the
/// rewritten image must hold them, since what is above it goes. A child
/// may use a page its parent does not (memory that went back to an older
/// content, found in a grandparent).
fn pages_needed_from(images: &[Image], below: &[(usize, usize)]) -> Result<Vec<PageHash>> {
    let mut seen: HashSet<PageHash, BuildPageHasher> = HashSet::default();
    let mut out = Vec::new();
    for &(k, depth) in below {
        let img = ImageReader::open(&images[k].dir).with_context(|| format!("kept image {}", images[k].dir.display()))?;
        let chain = img.pages()?;
        for f in img.manifest().files.iter().filter(|f| is_pagemap_name(&f.name)) {
            for (_, h) in img.pagemap(&f.name)? {
                let (store, _) = chain.locate(h)?;
                if store >= depth && seen.insert(h) {
                    out.push(h);
                }
            }
        }
    }
    Ok(out)
}

/// A kept image opens (its whole chain validated), every entry of its page
/// maps resolves, and no image of its chain is one about to be removed.
fn check_kept(m: &Image, gone: &HashSet<&Path>) -> Result<()> {
    let img = ImageReader::open(&m.dir).with_context(|| format!("kept image {} does not open", m.dir.display()))?;
    check_page_maps(&img).with_context(|| format!("kept image {}", m.dir.display()))?;
    let mut p = img.parent();
    while let Some(a) = p {
        let c = a.dir().canonicalize().with_context(|| format!("resolving {}", a.dir().display()))?;
        ensure!(
            !gone.contains(c.as_path()),
            "kept image {} still needs {}, which is to be removed",
            m.dir.display(),
            a.dir().display()
        );
        p = a.parent();
    }
    Ok(())
}

/// Swap the rewritten images back out (after a failed check), and delete
/// the rewrites.
fn undo_swaps(root: &Path, images: &[Image], swapped: &[usize], made: &[(usize, PathBuf)]) -> Result<()> {
    for &b in swapped.iter().rev() {
        let old = root.join(format!("{OLD_PREFIX}{}", images[b].name));
        let new = root.join(format!("{NEW_PREFIX}{}", images[b].name));
        replace(&images[b].dir, &old, &new)?;
    }
    fsync_dir(root)?;
    for (_, tmp) in made {
        fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    Ok(())
}

/// Remove exactly the images `names` (directory names in `root`), refusing
/// (nothing removed) if an image left in `root` has one of them in its
/// chain of parents.
pub fn remove(root: &Path, names: &[String]) -> Result<PruneReport> {
    ensure!(!names.is_empty(), "no image to remove");
    let _lock = lock_root(root)?;
    let recovered = recover(root)?;
    let (images, skipped) = list_images(root)?;
    let mut gone: Vec<usize> = Vec::new();
    for n in names {
        let n = n.trim_end_matches('/');
        let i = images.iter().position(|m| m.name == n).with_context(|| {
            let have: Vec<&str> = images.iter().map(|m| m.name.as_str()).collect();
            format!("{} is not an image in {} (images: {})", n, root.display(), have.join(" "))
        })?;
        if !gone.contains(&i) {
            gone.push(i);
        }
    }
    let links = links(&images);
    let mut needs = Vec::new();
    for (i, m) in images.iter().enumerate().filter(|(i, _)| !gone.contains(i)) {
        if let Err(e) = &m.inv {
            bail!("image {} is left but its inventory cannot be read ({e}): cannot tell which images it needs", m.dir.display());
        }
        if let Some(&p) = ancestors(&links, i).iter().find(|a| gone.contains(a)) {
            needs.push(format!("image {} needs {} (its parent chain passes through it)", m.name, images[p].name));
        }
    }
    if !needs.is_empty() {
        bail!(
            "refusing to remove from {}: {}; nothing was removed (remove those images too, \
             or rewrite them with `snap image merge`, or use --keep)",
            root.display(),
            needs.join("; ")
        );
    }
    let mut report = PruneReport { skipped, recovered, ..Default::default() };
    for (i, m) in images.iter().enumerate() {
        if gone.contains(&i) {
            report.bytes_freed += disk_usage(&m.dir)?;
            delete_dir(root, &m.name)?;
            report.removed.push(m.name.clone());
        } else {
            report.kept.push(m.name.clone());
        }
    }
    fsync_dir(root)?;
    Ok(report)
}

// ------------------------------------------------------------------ CLI

/// `snap image merge DIR -o OUT [--compress] [--json]`.
pub fn run_merge(dir: &Path, out: &Path, compress: bool, json: bool) -> Result<()> {
    let r = merge(dir, out, compress)?;
    if json {
        crate::outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        crate::outln!(
            "{} written: standalone copy of {} (chain of {} image{}), {} pages, pack {} ({}), {} files copied",
            r.output,
            r.dir,
            r.chain_len,
            if r.chain_len == 1 { "" } else { "s" },
            r.pages,
            super::show::bytes(r.pack_bytes),
            r.compression,
            r.files_copied
        )?;
    }
    Ok(())
}

/// `snap image prune ROOT (--keep N | --remove NAME...) [--json]`.
pub fn run_prune(root: &Path, keep: Option<usize>, remove_names: &[String], json: bool) -> Result<()> {
    let r = match (keep, remove_names.is_empty()) {
        (Some(n), true) => prune(root, n)?,
        (None, false) => remove(root, remove_names)?,
        _ => bail!("give either --keep N or --remove NAME..."),
    };
    if json {
        crate::outln!("{}", serde_json::to_string(&r)?)?;
        return Ok(());
    }
    for n in &r.recovered {
        crate::outln!("recovered {n}")?;
    }
    for n in &r.skipped {
        crate::outln!("skipped   {n}")?;
    }
    for n in &r.rebased {
        crate::outln!("rebased   {n} (rewritten as standalone: its parent is removed)")?;
    }
    for n in &r.removed {
        crate::outln!("removed   {n}")?;
    }
    crate::outln!("kept      {}", if r.kept.is_empty() { "(none)".to_string() } else { r.kept.join(" ") })?;
    crate::outln!("freed     {}", super::show::bytes(r.bytes_freed))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::records::FORMAT_VERSION;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the temp dir, removed on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "snap-prune-test-{}-{tag}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A non-zero page, different for every seed.
    fn page(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut v = vec![0u8; PAGE_SIZE];
        for w in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_ne_bytes());
        }
        v
    }

    fn hash(seed: u64) -> PageHash {
        crate::images::pagestore::hash_page(&page(seed))
    }

    fn id_of(name: &str) -> String {
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(name.as_bytes()))
    }

    /// Page map of one image: page `seeds[i]` at 0x10000 + i pages (seed
    /// 0: a zero page, not listed).
    fn addr(i: usize) -> u64 {
        0x10000 + (i * PAGE_SIZE) as u64
    }

    /// Write image `root/name` as an incremental dump against `parent`
    /// would: pages the parent chain holds are referenced, not stored.
    fn build(root: &Path, name: &str, parent: Option<&str>, created: u64, seeds: &[u64], compress: bool) -> PathBuf {
        let dir = root.join(name);
        let mut w = ImageWriter::create(&dir, compress).unwrap();
        let pr = parent.map(|p| ImageReader::open(&root.join(p)).unwrap());
        if let Some(pr) = &pr {
            w.pages().know(&pr.pages().unwrap());
        }
        let mut mem = Vec::new();
        for &s in seeds {
            mem.extend(if s == 0 { vec![0u8; PAGE_SIZE] } else { page(s) });
        }
        let mut map = Vec::new();
        w.pages().add_pages(addr(0), &mem, &mut map).unwrap();
        w.write_pagemap("pagemap-1.bin", &map).unwrap();
        // Shared memory: the same first page, at object offset 0.
        w.write_pagemap("pagemap-shmem-7.bin", &map[..1].iter().map(|&(_, h)| (0, h)).collect::<Vec<_>>()).unwrap();
        w.write_json("proc-1.json", &serde_json::json!({"pid": 1, "image": name})).unwrap();
        w.write_bytes("pipe-3.data", format!("pipe bytes of {name}").as_bytes()).unwrap();
        w.finish(Inventory {
            format_version: FORMAT_VERSION,
            arch: "x86_64".into(),
            kernel: "test".into(),
            xsave_mask: 0,
            xsave_size: 0,
            created_unix: created,
            roots: vec![1],
            pids: vec![1],
            features: vec![],
            memory_bytes: (seeds.len() * PAGE_SIZE) as u64,
            id: id_of(name),
            parent: parent.map(|p| format!("../{p}")),
            parent_id: pr.map(|p| p.inventory().id.clone()),
            memory_backend: if parent.is_some() { "uffd-wp" } else { "full" }.into(),
            tracking: None,
            pidns: None,
            net_lock: None,
            cgroup: None,
        })
        .unwrap();
        dir
    }

    /// The image's memory through its chain: (address, bytes) per entry.
    fn memory(dir: &Path) -> Vec<(u64, Vec<u8>)> {
        let r = ImageReader::open(dir).unwrap();
        let chain = r.pages().unwrap();
        r.pagemap("pagemap-1.bin").unwrap().into_iter().map(|(a, h)| (a, chain.page(h).unwrap().to_vec())).collect()
    }

    fn expect_memory(dir: &Path, seeds: &[u64]) {
        let want: Vec<(u64, Vec<u8>)> =
            seeds.iter().enumerate().filter(|(_, &s)| s != 0).map(|(i, &s)| (addr(i), page(s))).collect();
        assert_eq!(memory(dir), want, "memory of {}", dir.display());
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The chain c1 <- c2 <- ... <- c5 of the tests, with each image's
    /// page seeds. c5 uses page 3 again, which only c1 holds and c4 does
    /// not use: a rewrite of c4 must take it along for c5.
    const CHAIN: [(&str, [u64; 4]); 5] =
        [("c1", [1, 2, 3, 0]), ("c2", [1, 20, 3, 21]), ("c3", [1, 30, 3, 31]), ("c4", [1, 40, 41, 0]), ("c5", [1, 40, 3, 50])];

    fn build_chain(root: &Path) {
        for (i, (name, seeds)) in CHAIN.iter().enumerate() {
            let parent = if i == 0 { None } else { Some(CHAIN[i - 1].0) };
            build(root, name, parent, 1000 + i as u64, seeds, false);
        }
    }

    #[test]
    fn merge_of_chain_is_standalone_with_exactly_the_pages_used() {
        let t = Tmp::new("merge");
        build_chain(&t.0);
        let out = t.0.join("m3");
        let rep = merge(&t.0.join("c3"), &out, false).unwrap();
        assert_eq!(rep.chain_len, 3);
        assert_eq!(rep.id, id_of("c3"));
        let r = ImageReader::open(&out).unwrap();
        let orig = ImageReader::open(&t.0.join("c3")).unwrap();
        assert!(r.parent().is_none());
        let mut want = orig.inventory().clone();
        want.parent = None;
        want.parent_id = None;
        assert_eq!(r.inventory(), &want, "inventory identical but for the parent");
        // Exactly the pages c3 uses: 1, 30, 3, 31 (not 2, 20, 21).
        let store = r.own_pages();
        assert_eq!(store.len(), 4);
        for s in [1, 30, 3, 31] {
            assert!(store.contains(hash(s)), "page {s}");
        }
        assert_eq!(rep.pages, 4);
        // Every other file byte for byte.
        for f in &orig.manifest().files {
            if f.name.starts_with("pages.") {
                continue;
            }
            assert_eq!(r.read_bytes(&f.name).unwrap(), orig.read_bytes(&f.name).unwrap(), "{}", f.name);
        }
        assert_eq!(r.manifest().files.len(), orig.manifest().files.len());
        // Stands alone: the parents can go.
        for n in ["c1", "c2", "c3"] {
            fs::remove_dir_all(t.0.join(n)).unwrap();
        }
        expect_memory(&out, &CHAIN[2].1);
        r.verify_pack().unwrap();
    }

    #[test]
    fn merge_of_standalone_and_compressed() {
        let t = Tmp::new("merge-std");
        let a = build(&t.0, "a", None, 1, &[5, 6, 5, 0, 7], false);
        let rep = merge(&a, &t.0.join("z"), true).unwrap();
        assert_eq!((rep.chain_len, rep.pages, rep.compression.as_str()), (1, 3, "zstd"));
        let r = ImageReader::open(&t.0.join("z")).unwrap();
        assert!(r.own_pages().compressed());
        r.verify_pack().unwrap();
        expect_memory(&t.0.join("z"), &[5, 6, 5, 0, 7]);
        // A child of `a` may name the copy as its parent (same id).
        build(&t.0, "child", Some("z"), 2, &[5, 8], false);
        expect_memory(&t.0.join("child"), &[5, 8]);
        // And back from a compressed image.
        merge(&t.0.join("z"), &t.0.join("y"), false).unwrap();
        expect_memory(&t.0.join("y"), &[5, 6, 5, 0, 7]);
    }

    #[test]
    fn merge_refuses_non_empty_output_and_leaves_it_alone() {
        let t = Tmp::new("merge-out");
        let a = build(&t.0, "a", None, 1, &[1, 2], false);
        let out = t.0.join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("keep.txt"), b"mine").unwrap();
        let e = format!("{:#}", merge(&a, &out, false).unwrap_err());
        assert!(e.contains("not empty"), "{e}");
        assert_eq!(fs::read(out.join("keep.txt")).unwrap(), b"mine");
        assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
        // An existing empty directory is fine.
        let empty = t.0.join("empty");
        fs::create_dir(&empty).unwrap();
        merge(&a, &empty, false).unwrap();
        expect_memory(&empty, &[1, 2]);
    }

    #[test]
    fn merge_with_missing_parent_names_it_and_writes_nothing() {
        let t = Tmp::new("merge-missing");
        build_chain(&t.0);
        fs::rename(t.0.join("c2"), t.0.join("elsewhere")).unwrap();
        let out = t.0.join("out");
        let e = format!("{:#}", merge(&t.0.join("c3"), &out, false).unwrap_err());
        assert!(e.contains("c3/../c2"), "error names the parent: {e}");
        assert!(!out.exists());
    }

    /// A page of a parent's pack damaged: merge notices while reading it,
    /// fails naming the page, and removes the partial output.
    #[test]
    fn merge_checks_every_page_and_removes_partial_output() {
        let t = Tmp::new("merge-damaged");
        build_chain(&t.0);
        let pack = t.0.join("c1").join("pages.pack");
        let mut b = fs::read(&pack).unwrap();
        b[2 * PAGE_SIZE + 9] ^= 1; // c1's third page: seed 3
        fs::write(&pack, &b).unwrap();
        let out = t.0.join("out");
        let e = format!("{:#}", merge(&t.0.join("c3"), &out, false).unwrap_err());
        assert!(e.contains(&format!("{:032x}", hash(3))) && e.contains("damaged"), "{e}");
        assert!(!out.exists(), "partial output left behind");
    }

    #[test]
    fn prune_keep_rebases_oldest_kept_with_pages_its_children_need() {
        let t = Tmp::new("prune");
        build_chain(&t.0);
        fs::create_dir(t.0.join("being-written")).unwrap();
        fs::write(t.0.join("notes.txt"), b"x").unwrap();
        let r = prune(&t.0, 2).unwrap();
        assert_eq!(r.removed, names(&["c1", "c2", "c3"]));
        assert_eq!(r.rebased, names(&["c4"]));
        assert_eq!(r.kept, names(&["c4", "c5"]));
        assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
        assert!(r.skipped[0].starts_with("being-written"), "{:?}", r.skipped);
        assert!(r.bytes_freed > 0);
        for n in ["c1", "c2", "c3"] {
            assert!(!t.0.join(n).exists(), "{n} still there");
        }
        // Only the two images, the skipped directory and the file are left.
        let mut left: Vec<String> = fs::read_dir(&t.0).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, names(&["being-written", "c4", "c5", "notes.txt"]));
        let c4 = ImageReader::open(&t.0.join("c4")).unwrap();
        assert!(c4.parent().is_none());
        assert_eq!(c4.inventory().id, id_of("c4"));
        // c4's pages (1, 40, 41) and page 3, which only c5 uses.
        assert_eq!(c4.own_pages().len(), 4);
        assert!(c4.own_pages().contains(hash(3)));
        let c5 = ImageReader::open(&t.0.join("c5")).unwrap();
        assert_eq!(c5.parent().map(|p| p.inventory().id.clone()), Some(id_of("c4")));
        expect_memory(&t.0.join("c4"), &CHAIN[3].1);
        expect_memory(&t.0.join("c5"), &CHAIN[4].1);
        // Nothing more to do.
        let r = prune(&t.0, 2).unwrap();
        assert!(r.removed.is_empty() && r.rebased.is_empty());
    }

    #[test]
    fn prune_keep_zero_and_keep_all() {
        let t = Tmp::new("prune-all");
        build_chain(&t.0);
        let r = prune(&t.0, 5).unwrap();
        assert!(r.removed.is_empty() && r.rebased.is_empty() && r.bytes_freed == 0);
        assert_eq!(r.kept.len(), 5);
        let r = prune(&t.0, 9).unwrap();
        assert_eq!(r.kept.len(), 5);
        let r = prune(&t.0, 0).unwrap();
        assert_eq!(r.removed, names(&["c1", "c2", "c3", "c4", "c5"]));
        assert!(r.rebased.is_empty() && r.kept.is_empty());
        assert_eq!(fs::read_dir(&t.0).unwrap().count(), 0);
    }

    /// Two branches from one parent, and an unrelated standalone image:
    /// both children of the removed parent are rewritten; the other image is
    /// untouched.
    #[test]
    fn prune_rebases_every_kept_child_of_a_removed_parent() {
        let t = Tmp::new("prune-branch");
        build(&t.0, "a", None, 10, &[1, 2, 3], false);
        build(&t.0, "b1", Some("a"), 11, &[1, 4], true);
        build(&t.0, "b2", Some("a"), 12, &[2, 3, 5], false);
        build(&t.0, "c", Some("b2"), 13, &[1, 3, 6], false);
        build(&t.0, "x", None, 14, &[9], false);
        let x_before = fs::read(t.0.join("x").join(INVENTORY_NAME)).unwrap();
        let r = prune(&t.0, 4).unwrap();
        assert_eq!(r.removed, names(&["a"]));
        assert_eq!(r.rebased, names(&["b1", "b2"]));
        // b2 holds page 1 for c, though b2 itself does not use it.
        let b2 = ImageReader::open(&t.0.join("b2")).unwrap();
        assert!(b2.own_pages().contains(hash(1)) && b2.parent().is_none());
        assert!(ImageReader::open(&t.0.join("b1")).unwrap().own_pages().compressed(), "compression kept");
        expect_memory(&t.0.join("b1"), &[1, 4]);
        expect_memory(&t.0.join("b2"), &[2, 3, 5]);
        expect_memory(&t.0.join("c"), &[1, 3, 6]);
        assert_eq!(fs::read(t.0.join("x").join(INVENTORY_NAME)).unwrap(), x_before);
    }

    /// A kept image that is damaged: the check after the rewrite fails, the
    /// rewritten image is put back as it was and nothing is removed.
    #[test]
    fn prune_check_failure_puts_everything_back() {
        let t = Tmp::new("prune-fail");
        build_chain(&t.0);
        let c4_inv = fs::read(t.0.join("c4").join(INVENTORY_NAME)).unwrap();
        fs::write(t.0.join("c5").join("pipe-3.data"), b"damaged").unwrap();
        let e = format!("{:#}", prune(&t.0, 2).unwrap_err());
        assert!(e.contains("nothing was removed") && e.contains("c5"), "{e}");
        let mut left: Vec<String> = fs::read_dir(&t.0).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, names(&["c1", "c2", "c3", "c4", "c5"]));
        assert_eq!(fs::read(t.0.join("c4").join(INVENTORY_NAME)).unwrap(), c4_inv, "c4 put back");
        expect_memory(&t.0.join("c4"), &CHAIN[3].1);
    }

    #[test]
    fn remove_refuses_a_needed_parent_and_removes_nothing() {
        let t = Tmp::new("remove");
        build_chain(&t.0);
        let e = format!("{:#}", remove(&t.0, &names(&["c2"])).unwrap_err());
        assert!(e.contains("image c3 needs c2") && e.contains("nothing was removed"), "{e}");
        assert!(e.contains("image c5 needs c2"), "every image that needs it: {e}");
        let e = format!("{:#}", remove(&t.0, &names(&["c4", "c2", "c3"])).unwrap_err());
        assert!(e.contains("image c5 needs"), "{e}");
        assert_eq!(fs::read_dir(&t.0).unwrap().count(), 5);
        let e = format!("{:#}", remove(&t.0, &names(&["nope"])).unwrap_err());
        assert!(e.contains("nope is not an image"), "{e}");
        // The newest two: nothing needs them.
        let r = remove(&t.0, &names(&["c5/", "c4"])).unwrap();
        assert_eq!(r.removed, names(&["c4", "c5"]));
        assert_eq!(r.kept, names(&["c1", "c2", "c3"]));
        assert!(r.bytes_freed > 0);
        expect_memory(&t.0.join("c3"), &CHAIN[2].1);
        // A whole chain at once.
        let r = remove(&t.0, &names(&["c1", "c2", "c3"])).unwrap();
        assert_eq!(r.removed.len(), 3);
        assert_eq!(fs::read_dir(&t.0).unwrap().count(), 0);
    }

    /// What a prune stopped by a crash leaves is put right by the next one.
    #[test]
    fn interrupted_prune_leftovers_are_recovered() {
        let t = Tmp::new("recover");
        build_chain(&t.0);
        // Stopped between the two renames of the fallback swap: c4 moved
        // aside, its rewrite not yet in place.
        merge(&t.0.join("c4"), &t.0.join(format!("{NEW_PREFIX}c4")), false).unwrap();
        fs::rename(t.0.join("c4"), t.0.join(format!("{OLD_PREFIX}c4"))).unwrap();
        // Stopped while deleting a removed image.
        fs::create_dir(t.0.join(format!("{DEL_PREFIX}c0"))).unwrap();
        let r = prune(&t.0, 5).unwrap();
        assert_eq!(r.recovered.len(), 3, "{:?}", r.recovered);
        assert_eq!(r.kept.len(), 5);
        let mut left: Vec<String> = fs::read_dir(&t.0).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, names(&["c1", "c2", "c3", "c4", "c5"]));
        // c4 is the original (incremental) again, and c5 opens through it.
        assert!(ImageReader::open(&t.0.join("c4")).unwrap().parent().is_some());
        expect_memory(&t.0.join("c5"), &CHAIN[4].1);
    }

    #[test]
    fn one_prune_at_a_time() {
        let t = Tmp::new("lock");
        build(&t.0, "a", None, 1, &[1], false);
        let held = lock_root(&t.0).unwrap();
        let e = format!("{:#}", prune(&t.0, 0).unwrap_err());
        assert!(e.contains("another prune is running"), "{e}");
        assert!(remove(&t.0, &names(&["a"])).is_err());
        assert!(t.0.join("a").exists());
        drop(held);
        assert_eq!(prune(&t.0, 0).unwrap().removed, names(&["a"]));
    }

    #[test]
    fn replace_swaps_directories() {
        let t = Tmp::new("replace");
        let (d, w, a) = (t.0.join("d"), t.0.join("w"), t.0.join("a"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join("f"), b"old").unwrap();
        fs::create_dir(&w).unwrap();
        fs::write(w.join("f"), b"new").unwrap();
        replace(&d, &w, &a).unwrap();
        assert_eq!(fs::read(d.join("f")).unwrap(), b"new");
        assert_eq!(fs::read(a.join("f")).unwrap(), b"old");
        assert!(!w.exists());
    }
}
