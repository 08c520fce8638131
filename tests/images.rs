//! Image format tests: round trips, dedup, compression, and a deterministic
//! fuzz loop over damaged and hostile images (the loader must return Err,
//! never panic).
use snap::images::dir::{check_name, ImageReader, ImageWriter};
use snap::images::pagestore::PAGE_SIZE;
use snap::images::records::*;
use snap::images::PageHash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory path under the temp dir, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "snap-images-test-{}-{}-{}",
            std::process::id(),
            tag,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn page(seed: u64) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9e3779b97f4a7c15) | 1);
    let mut v = vec![0u8; PAGE_SIZE];
    for w in v.chunks_mut(8) {
        w.copy_from_slice(&r.next().to_ne_bytes());
    }
    v
}

fn inventory(pids: Vec<i32>) -> Inventory {
    Inventory {
        format_version: FORMAT_VERSION,
        arch: "x86_64".into(),
        kernel: "6.18.0-test".into(),
        xsave_mask: 0x2e7,
        xsave_size: 2696,
        created_unix: 1_700_000_000,
        roots: vec![pids[0]],
        pids,
        features: vec!["test".into()],
        memory_bytes: 0,
        id: "0123456789abcdef0123456789abcdef".into(),
        parent: None,
        parent_id: None,
        memory_backend: "full".into(),
        tracking: None,
        pidns: None,
        net_lock: None,
        cgroup: None,
    }
}

fn proc_image(pid: i32, ppid: i32) -> ProcessImage {
    ProcessImage {
        pid,
        ppid,
        pgid: pid,
        sid: pid,
        state: ProcState::Alive,
        comm: format!("proc{pid}"),
        exe: "/bin/true".into(),
        cwd: "/".into(),
        root: "/".into(),
        umask: 0o22,
        creds: Creds::default(),
        rlimits: vec![Rlimit { resource: 7, soft: 1024, hard: 4096 }],
        personality: 0,
        nice: 0,
        sched: Sched::default(),
        no_new_privs: false,
        dumpable: 1,
        seccomp: 0,
        mm: MmInfo::default(),
        vmas: vec![Vma {
            start: 0x10000,
            end: 0x20000,
            prot: 3,
            shared: false,
            pgoff: 0,
            kind: VmaKind::Anon,
            growsdown: false,
        }],
        fds: vec![FdEntry { fd: 0, cloexec: false, file: 0 }],
        sigactions: vec![SigAction::default(); 64],
        itimers: ITimers::default(),
        shared_pending: vec![],
        threads: vec![ThreadImage {
            tid: pid,
            comm: format!("proc{pid}"),
            regs: vec![0; 27],
            xsave_hex: to_hex(&[1, 2, 3]),
            sigmask: 0,
            pending: vec![],
            robust_list: 0,
            robust_list_len: 0,
            rseq: None,
            sigaltstack: SigAltStack::default(),
            clear_child_tid: 0,
        }],
        children: vec![],
        posix_timers: Vec::new(),
        stopped: false,
        file_locks: Vec::new(),
        start_time: 1,
    }
}

fn files_image() -> FilesImage {
    FilesImage {
        files: vec![OpenFile { id: 0, flags: 0, kind: FileKind::CharDev { path: "/dev/null".into(), rdev: 0x103 } }],
    }
}

/// Memory of two processes: 16 pages each, with zero pages, a page repeated
/// inside one process, and pages shared between the two.
fn memory(pid: i32) -> Vec<u8> {
    let mut m = Vec::new();
    for i in 0..16u64 {
        let p = match i {
            3 | 9 => vec![0u8; PAGE_SIZE],       // zero pages
            5 => page(1000 + pid as u64 * 7),    // same as page 4 of this process
            4 => page(1000 + pid as u64 * 7),
            0..=2 => page(i),                    // shared by both processes
            _ => page(pid as u64 * 100 + i),     // private
        };
        m.extend(p);
    }
    m
}

/// Write an image of two processes; return (pid -> page map) for checking.
fn build_image(dir: &Path, compress: bool) -> Vec<(i32, Vec<(u64, PageHash)>)> {
    let pids = vec![100, 101];
    let mut w = ImageWriter::create(dir, compress).unwrap();
    let mut maps = Vec::new();
    for &pid in &pids {
        let mut map = Vec::new();
        let mem = memory(pid);
        // Two calls, to exercise dedup across calls.
        w.pages().add_pages(0x10000, &mem[..8 * PAGE_SIZE], &mut map).unwrap();
        w.pages().add_pages(0x18000, &mem[8 * PAGE_SIZE..], &mut map).unwrap();
        w.write_pagemap(&format!("pagemap-{pid}.bin"), &map).unwrap();
        w.write_json(&format!("proc-{pid}.json"), &proc_image(pid, if pid == 100 { 1 } else { 100 })).unwrap();
        maps.push((pid, map));
    }
    w.write_json("files.json", &files_image()).unwrap();
    w.write_bytes("pipe-1.data", b"buffered pipe bytes").unwrap();
    w.finish(inventory(pids)).unwrap();
    maps
}

fn check_roundtrip(compress: bool) {
    let t = TempDir::new("rt");
    let maps = build_image(t.path(), compress);
    let r = ImageReader::open(t.path()).unwrap();
    assert_eq!(r.inventory(), &inventory(vec![100, 101]));
    let store = r.own_pages().clone();
    assert_eq!(store.compressed(), compress);
    for (pid, map) in &maps {
        // 16 pages - 2 zero pages listed.
        assert_eq!(map.len(), 14);
        let got = r.pagemap(&format!("pagemap-{pid}.bin")).unwrap();
        assert_eq!(&got, map);
        let mem = memory(*pid);
        // Every page reads back; absent pages are exactly the zero ones.
        for i in 0..16usize {
            let addr = 0x10000 + (i * PAGE_SIZE) as u64;
            let want = &mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            match got.iter().find(|e| e.0 == addr) {
                Some(&(_, h)) => assert_eq!(store.page(h).unwrap(), want),
                None => assert!(want.iter().all(|&b| b == 0), "page {i} of {pid} missing"),
            }
        }
        let p: ProcessImage = r.read_json(&format!("proc-{pid}.json")).unwrap();
        assert_eq!(p, proc_image(*pid, if *pid == 100 { 1 } else { 100 }));
    }
    // Distinct pages: 3 shared + per process (1 repeated twice + 9 private) = 3 + 2*10.
    assert_eq!(store.len(), 23);
    store.verify_pages().unwrap();
    assert_eq!(r.read_json::<FilesImage>("files.json").unwrap(), files_image());
    assert_eq!(r.read_bytes("pipe-1.data").unwrap(), b"buffered pipe bytes");
    assert!(r.read_bytes("not-there").is_err());
    assert!(r.read_bytes("../etc/passwd").is_err());
    assert!(store.page(12345).is_err());
}

#[test]
fn roundtrip_plain() {
    check_roundtrip(false);
}

#[test]
fn roundtrip_zstd() {
    check_roundtrip(true);
}

#[test]
fn dedup_across_processes() {
    let t = TempDir::new("dedup");
    let mut w = ImageWriter::create(t.path(), false).unwrap();
    let p = page(42);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    w.pages().add_pages(0x1000, &p, &mut a).unwrap();
    w.pages().add_pages(0x7000, &p, &mut b).unwrap();
    assert_eq!(a[0].1, b[0].1);
    w.write_pagemap("pagemap-1.bin", &a).unwrap();
    w.write_pagemap("pagemap-2.bin", &b).unwrap();
    w.finish(inventory(vec![1, 2])).unwrap();
    let size = std::fs::metadata(t.path().join("pages.pack")).unwrap().len();
    assert_eq!(size, PAGE_SIZE as u64, "the page is stored once");
    let r = ImageReader::open(t.path()).unwrap();
    assert_eq!(r.own_pages().len(), 1);
    assert_eq!(r.pagemap("pagemap-2.bin").unwrap(), vec![(0x7000, a[0].1)]);
}

#[test]
fn compression_shrinks() {
    let t = TempDir::new("zst");
    let mut w = ImageWriter::create(t.path(), true).unwrap();
    // Compressible but distinct pages.
    let mut mem = Vec::new();
    for i in 0..256u32 {
        let mut p = vec![b'a'; PAGE_SIZE];
        p[..4].copy_from_slice(&i.to_le_bytes());
        mem.extend(p);
    }
    let mut m = Vec::new();
    w.pages().add_pages(0, &mem, &mut m).unwrap();
    w.write_pagemap("pagemap-1.bin", &m).unwrap();
    w.finish(inventory(vec![1])).unwrap();
    let size = std::fs::metadata(t.path().join("pages.pack.zst")).unwrap().len();
    assert!(size < mem.len() as u64 / 10, "zstd pack is {size} bytes");
    let r = ImageReader::open(t.path()).unwrap();
    let s = r.pages().unwrap();
    for (i, &(a, h)) in r.pagemap("pagemap-1.bin").unwrap().iter().enumerate() {
        assert_eq!(a, (i * PAGE_SIZE) as u64);
        assert_eq!(s.page(h).unwrap(), &mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
    }
}

#[test]
fn create_refuses_non_empty_dir() {
    let t = TempDir::new("nonempty");
    std::fs::create_dir_all(t.path()).unwrap();
    std::fs::write(t.path().join("x"), b"x").unwrap();
    let e = ImageWriter::create(t.path(), false).err().unwrap();
    assert!(format!("{e:#}").contains(&t.path().display().to_string()), "{e:#}");
    // An existing empty directory is fine.
    let t2 = TempDir::new("empty");
    std::fs::create_dir_all(t2.path()).unwrap();
    ImageWriter::create(t2.path(), false).unwrap();
}

#[test]
fn incomplete_dump_has_no_inventory() {
    let t = TempDir::new("crash");
    {
        let mut w = ImageWriter::create(t.path(), false).unwrap();
        w.write_json("proc-1.json", &proc_image(1, 0)).unwrap();
        // Dropped without finish: a crashed dump.
    }
    let e = ImageReader::open(t.path()).err().unwrap();
    assert!(format!("{e:#}").contains("incomplete"), "{e:#}");
}

#[test]
fn writer_rejects_bad_input() {
    let t = TempDir::new("bad");
    let mut w = ImageWriter::create(t.path(), false).unwrap();
    for bad in ["../x", "a/b", "..", ".", "", ".hidden", "inventory.json", "pages.idx", "x\0y", "sp ace"] {
        assert!(w.write_bytes(bad, b"x").is_err(), "{bad:?} accepted");
    }
    w.write_bytes("ok.bin", b"x").unwrap();
    assert!(w.write_bytes("ok.bin", b"x").is_err(), "duplicate accepted");
    let mut m = Vec::new();
    w.pages().add_pages(0x2000, &[page(1), page(2)].concat(), &mut m).unwrap();
    let rev = vec![m[1], m[0]];
    assert!(w.write_pagemap("pm-unsorted.bin", &rev).is_err());
    assert!(w.write_pagemap("pm-unaligned.bin", &[(0x2001, m[0].1)]).is_err());
    assert!(w.write_pagemap("pm-unknown.bin", &[(0x2000, 77)]).is_err());
    assert!(check_name("proc-12.json").is_ok());
}

#[test]
fn version_and_arch_errors_name_both() {
    let t = TempDir::new("ver");
    build_image(t.path(), false);
    let inv_path = t.path().join("inventory.json");
    let orig = std::fs::read(&inv_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&orig).unwrap();
    v["format_version"] = serde_json::json!(99);
    std::fs::write(&inv_path, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = format!("{:#}", ImageReader::open(t.path()).err().unwrap());
    assert!(e.contains("99") && e.contains(&FORMAT_VERSION.to_string()), "{e}");
    let mut v: serde_json::Value = serde_json::from_slice(&orig).unwrap();
    v["arch"] = serde_json::json!("aarch64");
    std::fs::write(&inv_path, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = format!("{:#}", ImageReader::open(t.path()).err().unwrap());
    assert!(e.contains("aarch64") && e.contains("x86_64"), "{e}");
    // Unknown fields are skipped (a minor version addition).
    let mut v: serde_json::Value = serde_json::from_slice(&orig).unwrap();
    v["some_future_field"] = serde_json::json!({"x": 1});
    std::fs::write(&inv_path, serde_json::to_vec(&v).unwrap()).unwrap();
    ImageReader::open(t.path()).unwrap();
}

#[test]
fn damaged_file_is_named() {
    let t = TempDir::new("dmg");
    build_image(t.path(), false);
    let p = t.path().join("proc-101.json");
    let mut b = std::fs::read(&p).unwrap();
    b[10] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let e = format!("{:#}", ImageReader::open(t.path()).err().unwrap());
    assert!(e.contains("proc-101.json") && e.contains("checksum"), "{e}");
    std::fs::remove_file(&p).unwrap();
    let e = format!("{:#}", ImageReader::open(t.path()).err().unwrap());
    assert!(e.contains("proc-101.json"), "{e}");
}

// ---------------------------------------------------------------- fuzzing

/// Open the image and read everything it references. Ok or Err, never panic.
fn read_everything(dir: &Path) -> anyhow::Result<()> {
    let r = ImageReader::open(dir)?;
    let store = r.pages()?;
    let names: Vec<String> = r.manifest().files.iter().map(|f| f.name.clone()).collect();
    for n in &names {
        let _ = r.read_bytes(n);
    }
    let _ = r.read_json::<FilesImage>("files.json");
    for &pid in &r.inventory().pids.clone() {
        let _ = r.read_json::<ProcessImage>(&format!("proc-{pid}.json"));
        if let Ok(m) = r.pagemap(&format!("pagemap-{pid}.bin")) {
            for (_, h) in m {
                store.page(h)?;
            }
        }
    }
    for n in names.iter().filter(|n| n.starts_with("pagemap-")) {
        let _ = r.pagemap(n);
    }
    let _ = r.verify_pack();
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Rewrite the manifest entry of `name` so the file's (mutated) bytes pass
/// the size and checksum checks: this pushes the fuzzer past the checksums
/// into the parsers behind them.
fn resign(dir: &Path, name: &str) {
    let inv = dir.join("inventory.json");
    let Ok(b) = std::fs::read(&inv) else { return };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&b) else { return };
    let data = std::fs::read(dir.join(name)).unwrap_or_default();
    if let Some(files) = v.pointer_mut("/manifest/files").and_then(|f| f.as_array_mut()) {
        for f in files {
            if f["name"] == name {
                f["size"] = serde_json::json!(data.len());
                f["xxh3"] = serde_json::json!(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data)));
            }
        }
    }
    std::fs::write(&inv, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn edit_inventory(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let inv = dir.join("inventory.json");
    let Ok(b) = std::fs::read(&inv) else { return };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&b) else { return };
    // Earlier mutations may have broken the shape: only edit a well-formed one.
    if !v.pointer("/manifest/page_store").is_some_and(|p| p.is_object())
        || !v.pointer("/manifest/files").is_some_and(|p| p.is_array())
    {
        return;
    }
    f(&mut v);
    std::fs::write(&inv, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn mutate(dir: &Path, rng: &mut Rng) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let name = names[rng.below(names.len() as u64) as usize].clone();
    let path = dir.join(&name);
    let data = std::fs::read(&path).unwrap_or_default();
    let resign_after = rng.below(2) == 0 && name != "inventory.json";
    let what = match rng.below(12) {
        0 => {
            let n = rng.below(data.len() as u64 + 1) as usize;
            std::fs::write(&path, &data[..n]).unwrap();
            format!("truncate {name} to {n}")
        }
        1 | 2 => {
            let mut d = data;
            if !d.is_empty() {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(d.len() as u64) as usize;
                    d[i] ^= 1 << rng.below(8);
                }
            }
            std::fs::write(&path, &d).unwrap();
            format!("flip bits in {name}")
        }
        3 => {
            std::fs::remove_file(&path).unwrap();
            format!("remove {name}")
        }
        4 => {
            let v = [0u64, 2, 99, u32::MAX as u64, u64::MAX][rng.below(5) as usize];
            edit_inventory(dir, |j| j["format_version"] = serde_json::json!(v));
            format!("format_version {v}")
        }
        5 => {
            let hostile = ["../x", "/etc/passwd", "a/b", "..", ".", "", "x\u{0}y", "inventory.json", "pages.pack", "proc-100.json"];
            let h = hostile[rng.below(hostile.len() as u64) as usize];
            let i = rng.below(8) as usize;
            edit_inventory(dir, |j| {
                if let Some(files) = j["manifest"]["files"].as_array_mut() {
                    if rng.below(2) == 0 && i < files.len() {
                        files[i]["name"] = serde_json::json!(h);
                    } else {
                        files.push(serde_json::json!({"name": h, "size": 0, "xxh3": "2d06800538d394c2"}));
                    }
                }
                if rng.below(4) == 0 {
                    j["manifest"]["page_store"]["pack"] = serde_json::json!(h);
                }
            });
            format!("hostile name {h:?}")
        }
        6 => {
            let s = [u64::MAX, 1 << 60, 1 << 40, 0, 24 * 1_000_000_007][rng.below(5) as usize];
            let i = rng.below(8) as usize;
            edit_inventory(dir, |j| {
                if let Some(f) = j["manifest"]["files"].get_mut(i) {
                    f["size"] = serde_json::json!(s);
                }
                if rng.below(2) == 0 {
                    j["manifest"]["page_store"]["pages"] = serde_json::json!(s);
                }
            });
            format!("absurd size {s}")
        }
        7 => {
            // Absurd page map entries, re-signed so they reach the parser.
            let pm = names.iter().find(|n| n.starts_with("pagemap-")).cloned();
            if let Some(pm) = pm {
                let mut d = std::fs::read(dir.join(&pm)).unwrap_or_default();
                match rng.below(4) {
                    0 => d.extend_from_slice(&[0xff; 24]),
                    1 => d.extend_from_slice(&[0x01; 7]),
                    2 => {
                        if d.len() >= 48 {
                            let (a, b) = d.split_at_mut(24);
                            a[..8].swap_with_slice(&mut b[..8]);
                        }
                    }
                    _ => {
                        if d.len() >= 24 {
                            d[0] |= 1;
                        }
                    }
                }
                std::fs::write(dir.join(&pm), &d).unwrap();
                resign(dir, &pm);
            }
            "absurd page map".into()
        }
        8 => {
            // Index: duplicate or extra entries, re-signed.
            let mut d = std::fs::read(dir.join("pages.idx")).unwrap_or_default();
            if d.len() >= 16 {
                let e = d[..16].to_vec();
                d.extend(e);
            } else {
                d.extend([7u8; 16]);
            }
            std::fs::write(dir.join("pages.idx"), &d).unwrap();
            resign(dir, "pages.idx");
            "index duplicate".into()
        }
        9 => {
            // Replace a file with a symlink to something outside.
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
            format!("symlink {name}")
        }
        10 => {
            let junk = ["", "{}", "null", "[]", "{\"format_version\":1}", "{\"format_version\":1,\"arch\":\"x86_64\"}", "\u{feff}{"];
            let j = junk[rng.below(junk.len() as u64) as usize];
            std::fs::write(dir.join("inventory.json"), j).unwrap();
            format!("inventory {j:?}")
        }
        _ => {
            edit_inventory(dir, |j| {
                let keys = ["pids", "roots", "manifest", "arch", "kernel", "created_unix"];
                let k = keys[rng.below(keys.len() as u64) as usize];
                j[k] = [serde_json::json!(null), serde_json::json!([-1, 0, i64::MAX]), serde_json::json!("x"), serde_json::json!(1e300)]
                    [rng.below(4) as usize]
                    .clone();
            });
            "inventory field".into()
        }
    };
    if resign_after && path.exists() && !path.is_symlink() {
        resign(dir, &name);
    }
    what
}

fn fuzz(compress: bool, iterations: u32, seed: u64) {
    let base = TempDir::new("fuzzbase");
    build_image(base.path(), compress);
    read_everything(base.path()).unwrap();
    let mut rng = Rng(seed);
    let (mut ok, mut err) = (0, 0);
    for it in 0..iterations {
        let work = TempDir::new("fuzz");
        copy_dir(base.path(), work.path());
        let mut log = Vec::new();
        for _ in 0..1 + rng.below(3) {
            log.push(mutate(work.path(), &mut rng));
        }
        let dir = work.path().to_path_buf();
        let res = std::panic::catch_unwind(move || read_everything(&dir).is_ok());
        match res {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => panic!("iteration {it} (seed {seed}): loader panicked after {log:?}"),
        }
    }
    eprintln!("fuzz compress={compress}: {iterations} mutated images, {ok} loaded, {err} refused");
    assert!(err > iterations / 2, "most mutations must be refused");
}

#[test]
fn fuzz_loader_plain() {
    fuzz(false, 2500, 0x5eed_0001);
}

#[test]
fn fuzz_loader_zstd() {
    fuzz(true, 1500, 0x5eed_0002);
}

#[test]
fn show_runs() {
    let t = TempDir::new("show");
    build_image(t.path(), true);
    snap::images::show::run(t.path(), false).unwrap();
    snap::images::show::run(t.path(), true).unwrap();
    let e = TempDir::new("show-missing");
    assert!(snap::images::show::run(e.path(), false).is_err());
}
