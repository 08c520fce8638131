//! `snap image show`: what an image holds.
use super::dir::{is_pagemap_name, ImageReader};
use super::pagestore::{BuildPageHasher, PageHash};
use super::records::ProcessImage;
use anyhow::Result;
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;

#[derive(Serialize)]
struct ProcSummary {
    pid: i32,
    ppid: Option<i32>,
    comm: Option<String>,
    threads: Option<usize>,
    vmas: Option<usize>,
    fds: Option<usize>,
    memory_pages: Option<usize>,
    memory_bytes: Option<u64>,
    /// Why a record could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct StoreSummary {
    distinct_pages: usize,
    page_bytes: u64,
    stored_bytes: u64,
    compression: String,
}

/// One image of the parent chain.
#[derive(Serialize)]
struct ChainLink {
    /// Its directory, as reached from this image (parent paths joined).
    dir: String,
    id: String,
    memory_backend: String,
}

/// Where the pages the page maps use are: an incremental image stores
/// only what changed and takes the rest from its parents.
#[derive(Serialize)]
struct PageRefs {
    /// Distinct pages used by the page maps.
    referenced: usize,
    /// Of those, in this image's own store.
    stored_here: usize,
    /// Of those, found only in a parent's store.
    from_parents: usize,
}

#[derive(Serialize)]
struct Summary {
    dir: String,
    format_version: u32,
    arch: String,
    kernel: String,
    created_unix: u64,
    roots: Vec<i32>,
    /// With `dump --cgroup`: that cgroup (relative to the cgroup2 mount).
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<String>,
    features: Vec<String>,
    id: String,
    /// Parent directory as the inventory gives it (relative to this image).
    parent: Option<String>,
    parent_id: Option<String>,
    /// How the dump read the memory: "full", "hash", "uffd-wp", "soft-dirty".
    memory_backend: String,
    /// The parents, nearest first (empty for a standalone image).
    chain: Vec<ChainLink>,
    pages: PageRefs,
    processes: Vec<ProcSummary>,
    page_store: StoreSummary,
    files: usize,
    total_bytes: u64,
}

fn summarize(dir: &Path) -> Result<Summary> {
    let r = ImageReader::open(dir)?;
    let inv = r.inventory();
    let store = r.own_pages();
    let mut processes = Vec::new();
    for &pid in &inv.pids {
        let mut s = ProcSummary {
            pid,
            ppid: None,
            comm: None,
            threads: None,
            vmas: None,
            fds: None,
            memory_pages: None,
            memory_bytes: None,
            error: None,
        };
        let mut errs = Vec::new();
        match r.read_json::<ProcessImage>(&format!("proc-{pid}.json")) {
            Ok(p) => {
                s.ppid = Some(p.ppid);
                s.comm = Some(p.comm);
                s.threads = Some(p.threads.len());
                s.vmas = Some(p.vmas.len());
                s.fds = Some(p.fds.len());
            }
            Err(e) => errs.push(format!("{e:#}")),
        }
        let pm = format!("pagemap-{pid}.bin");
        if r.has(&pm) {
            match r.pagemap(&pm) {
                Ok(m) => {
                    s.memory_pages = Some(m.len());
                    s.memory_bytes = Some(m.len() as u64 * 4096);
                }
                Err(e) => errs.push(format!("{e:#}")),
            }
        } else {
            s.memory_pages = Some(0);
            s.memory_bytes = Some(0);
        }
        if !errs.is_empty() {
            s.error = Some(errs.join("; "));
        }
        processes.push(s);
    }
    let pages = page_refs(&r)?;
    let mut chain = Vec::new();
    let mut p = r.parent();
    while let Some(a) = p {
        let ai = a.inventory();
        chain.push(ChainLink { dir: a.dir().display().to_string(), id: ai.id.clone(), memory_backend: ai.memory_backend.clone() });
        p = a.parent();
    }
    let m = r.manifest();
    let pack = m.files.iter().find(|f| f.name == m.page_store.pack).map_or(0, |f| f.size);
    Ok(Summary {
        dir: dir.display().to_string(),
        format_version: inv.format_version,
        arch: inv.arch.clone(),
        kernel: inv.kernel.clone(),
        created_unix: inv.created_unix,
        roots: inv.roots.clone(),
        cgroup: inv.cgroup.clone(),
        features: inv.features.clone(),
        id: inv.id.clone(),
        parent: inv.parent.clone(),
        parent_id: inv.parent_id.clone(),
        memory_backend: inv.memory_backend.clone(),
        chain,
        pages,
        processes,
        page_store: StoreSummary {
            distinct_pages: store.len(),
            page_bytes: store.len() as u64 * 4096,
            stored_bytes: pack,
            compression: m.page_store.compression.clone(),
        },
        files: m.files.len() + 1,
        total_bytes: m.files.iter().map(|f| f.size).sum(),
    })
}

/// Count the distinct pages of every page map and where they are stored.
fn page_refs(r: &ImageReader) -> Result<PageRefs> {
    let mut seen: HashSet<PageHash, BuildPageHasher> = HashSet::default();
    for f in r.manifest().files.iter().filter(|f| is_pagemap_name(&f.name)) {
        seen.extend(r.pagemap(&f.name)?.into_iter().map(|(_, h)| h));
    }
    let own = r.own_pages();
    let stored_here = seen.iter().filter(|&&h| own.contains(h)).count();
    Ok(PageRefs { referenced: seen.len(), stored_here, from_parents: seen.len() - stored_here })
}

/// Human form of a byte count.
pub(crate) fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// UTC date of a Unix time, `YYYY-MM-DD HH:MM:SS UTC` (no time zone crate).
fn utc(t: u64) -> String {
    let days = (t / 86400) as i64;
    let s = t % 86400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "?".into(), |x| x.to_string())
}

pub fn run(dir: &Path, json: bool) -> Result<()> {
    let s = summarize(dir)?;
    if json {
        return crate::outln!("{}", serde_json::to_string(&s)?);
    }
    crate::outln!("image          {}", s.dir)?;
    crate::outln!("format         version {} ({})", s.format_version, s.arch)?;
    crate::outln!("kernel         {}", s.kernel)?;
    crate::outln!("created        {} ({})", utc(s.created_unix), s.created_unix)?;
    crate::outln!("roots          {}", s.roots.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "))?;
    if let Some(c) = &s.cgroup {
        crate::outln!("cgroup         {c}")?;
    }
    if !s.features.is_empty() {
        crate::outln!("features       {}", s.features.join(" "))?;
    }
    if !s.id.is_empty() {
        crate::outln!("id             {}", s.id)?;
    }
    if !s.memory_backend.is_empty() {
        crate::outln!("memory read    {}", s.memory_backend)?;
    }
    match &s.parent {
        Some(p) => {
            crate::outln!("parent         {p} (id {})", s.parent_id.as_deref().unwrap_or("?"))?;
            let dirs: Vec<&str> = s.chain.iter().map(|c| c.dir.as_str()).collect();
            crate::outln!("chain          {} parent{}: {}", dirs.len(), if dirs.len() == 1 { "" } else { "s" }, dirs.join(" <- "))?;
            crate::outln!(
                "pages          {} used: {} stored here, {} from parents",
                s.pages.referenced, s.pages.stored_here, s.pages.from_parents
            )?;
        }
        None => {
            crate::outln!("parent         none (standalone)")?;
            crate::outln!("pages          {} used, all stored here", s.pages.referenced)?;
        }
    }
    crate::outln!(
        "page store     {} distinct pages ({}), {} stored, compression {}",
        s.page_store.distinct_pages,
        bytes(s.page_store.page_bytes),
        bytes(s.page_store.stored_bytes),
        s.page_store.compression
    )?;
    crate::outln!("files          {} ({} total)", s.files, bytes(s.total_bytes))?;
    crate::outln!()?;
    crate::outln!("{:>8} {:>8} {:<16} {:>7} {:>5} {:>4} {:>9} {:>10}", "PID", "PPID", "COMM", "THREADS", "VMAS", "FDS", "PAGES", "MEMORY")?;
    for p in &s.processes {
        crate::outln!(
            "{:>8} {:>8} {:<16} {:>7} {:>5} {:>4} {:>9} {:>10}",
            p.pid,
            opt(&p.ppid),
            p.comm.clone().unwrap_or_else(|| "?".into()),
            opt(&p.threads),
            opt(&p.vmas),
            opt(&p.fds),
            opt(&p.memory_pages),
            p.memory_bytes.map_or_else(|| "?".into(), bytes)
        )?;
        if let Some(e) = &p.error {
            crate::outln!("         error: {e}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn dates_and_sizes() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
