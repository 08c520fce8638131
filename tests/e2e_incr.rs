//! End-to-end tests of incremental checkpoints: `snap dump --track-mem`
//! (arms dirty-page tracking) and `--prev-images-dir PREV` (the new image
//! stores only pages that are not already in PREV's chain).
//!
//! Method: correctness is never judged by a counter. Before every dump the
//! whole process tree is stopped with SIGSTOP and the test takes a snapshot
//! of the WHOLE memory of every process (every VMA of /proc/PID/maps but
//! [vvar], [vvar_vclock], [vdso], [vsyscall]: bounds, permissions, name,
//! file offset, and a hash per page read from /proc/PID/mem). The dump runs
//! while the tree is still stopped, so the snapshot is the memory at the dump
//! instant; dump `--leave-running` leaves stopped processes stopped, and they
//! come back stopped from a restore, so a restored process can be
//! snapshotted before it runs a single instruction, and must equal the
//! snapshot of its dump exactly. Every image of a chain is restored (the
//! original tree killed first, so the PIDs are free) and compared.
//!
//! Differences that are not the program's state are normalized away, and
//! only those: adjacent VMAs the program cannot tell apart are merged, shared
//! anonymous memory is not compared by its backing file's name, and the
//! workloads run without glibc's rseq area (see `workload`).
//!
//! The C workload (fixtures/incr_mem.c) makes one kind of change per step
//! (user and kernel writes, mmap, munmap, mremap, MADV_DONTNEED, MADV_FREE,
//! brk up and down, concurrent threads, shared anonymous memory, private
//! file mappings, fork, exec); see its header for the list. The python
//! workload (fixtures/py_incr.py) mutates a dict and large buffers and
//! reports a checksum of its data.
//!
//! Run: `cargo test --release --test e2e_incr -- --test-threads=1`.

#[macro_use]
mod common;
use common::*;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::hash::Hasher;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const PAGE: u64 = 4096;

// ================================================================ memory snapshots

/// One page of a snapshot: its content reduced to "all zero", a hash, or
/// "unreadable" (a read of /proc/PID/mem failed; must then fail the same way).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Page {
    Zero,
    Data(u64),
    Unreadable,
}

impl fmt::Display for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Page::Zero => write!(f, "all zero"),
            Page::Data(h) => write!(f, "data (hash {h:016x})"),
            Page::Unreadable => write!(f, "unreadable"),
        }
    }
}

/// A VMA as /proc/PID/maps shows it. `offset` is kept only for mappings of
/// files (name starting with '/'): for private anonymous memory it is the
/// page offset the kernel happened to assign (it survives mremap), which a
/// restore cannot and need not reproduce.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Vma {
    start: u64,
    end: u64,
    perms: String,
    offset: u64,
    name: String,
}

impl fmt::Display for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{:x} {} {:08x} {}", self.start, self.end, self.perms, self.offset, self.name)
    }
}

impl Vma {
    fn is_file(&self) -> bool {
        self.name.starts_with('/')
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
struct Region {
    vma: Vma,
    pages: Vec<Page>,
}

/// The memory of one process.
type ProcMem = Vec<Region>;
/// The memory of every process of a tree, by pid.
type TreeMem = BTreeMap<i32, ProcMem>;

/// The name given to shared anonymous mappings (see `parse_maps`).
const SHARED_ANON: &str = "<shared anonymous memory>";

/// Kernel-provided mappings that are not the process's memory.
const SKIP_VMAS: &[&str] = &["[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"];

fn parse_maps(pid: i32) -> Vec<Vma> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_else(|e| panic!("read /proc/{pid}/maps: {e}"));
    let mut out = Vec::new();
    for line in text.lines() {
        // start-end perms offset dev inode [name, which may hold spaces]
        let mut it = line.splitn(6, ' ');
        let range = it.next().unwrap_or("");
        let perms = it.next().unwrap_or("").to_string();
        let offset = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
        let _dev = it.next();
        let _inode = it.next();
        let name = it.next().unwrap_or("").trim_start().to_string();
        if SKIP_VMAS.contains(&name.as_str()) {
            continue;
        }
        let (s, e) = range.split_once('-').unwrap_or_else(|| panic!("bad maps line {line:?}"));
        let (start, end) = (u64::from_str_radix(s, 16).unwrap(), u64::from_str_radix(e, 16).unwrap());
        // Shared anonymous memory is a deleted /dev/zero mapping in the
        // original and one of snap's memfds after a restore: the same
        // thing to the program (its sharing is tested elsewhere).
        let name = if name == "/dev/zero (deleted)" || (name.starts_with("/memfd:snap-shmem-") && name.ends_with(" (deleted)")) { SHARED_ANON.to_string() } else { name };
        let mut v = Vma { start, end, perms, offset, name };
        if !v.is_file() {
            v.offset = 0;
        }
        out.push(v);
    }
    out
}

fn page_of(bytes: &[u8]) -> Page {
    if bytes.iter().all(|&b| b == 0) {
        return Page::Zero;
    }
    let mut h = DefaultHasher::new();
    h.write(bytes);
    Page::Data(h.finish())
}

fn read_full(mem: &fs::File, buf: &mut [u8], addr: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = mem.read_at(&mut buf[done..], addr + done as u64)?;
        if n == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        done += n;
    }
    Ok(())
}

/// Hash every page of a VMA from /proc/PID/mem (256 pages at a time; page
/// by page where a chunk fails, so one unreadable page is located).
fn read_pages(mem: &fs::File, v: &Vma) -> Vec<Page> {
    const CHUNK: usize = 256;
    let n = ((v.end - v.start) / PAGE) as usize;
    let mut pages = Vec::with_capacity(n);
    let mut buf = vec![0u8; CHUNK * PAGE as usize];
    let mut i = 0;
    while i < n {
        let k = (n - i).min(CHUNK);
        let addr = v.start + i as u64 * PAGE;
        let b = &mut buf[..k * PAGE as usize];
        if read_full(mem, b, addr).is_ok() {
            pages.extend(b.chunks(PAGE as usize).map(page_of));
        } else {
            for j in 0..k {
                let pb = &mut buf[..PAGE as usize];
                match read_full(mem, pb, addr + j as u64 * PAGE) {
                    Ok(()) => pages.push(page_of(pb)),
                    Err(_) => pages.push(Page::Unreadable),
                }
            }
        }
        i += k;
    }
    pages
}

/// Adjacent VMAs that the program cannot tell apart from one (same
/// permissions and name, and contiguous file offsets for a file) are
/// merged: how the kernel splits or merges VMAs (e.g. when userfaultfd
/// registration changes their flags) is not part of the process's state.
fn normalize(regions: Vec<Region>) -> ProcMem {
    let mut out: ProcMem = Vec::new();
    for r in regions {
        if let Some(last) = out.last_mut() {
            let l = &last.vma;
            let contiguous_file = !l.is_file() || l.offset + (l.end - l.start) == r.vma.offset;
            if l.end == r.vma.start && l.perms == r.vma.perms && l.name == r.vma.name && contiguous_file {
                last.vma.end = r.vma.end;
                last.pages.extend(r.pages);
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// The whole memory of one (stopped) process.
fn mem_of(pid: i32) -> ProcMem {
    let vmas = parse_maps(pid);
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap_or_else(|e| panic!("open /proc/{pid}/mem: {e}"));
    let regions = vmas
        .into_iter()
        .map(|v| {
            let pages = read_pages(&mem, &v);
            Region { vma: v, pages }
        })
        .collect();
    normalize(regions)
}

fn snapshot(pids: &[i32]) -> TreeMem {
    pids.iter().map(|&p| (p, mem_of(p))).collect()
}

fn maps_text(m: &ProcMem) -> String {
    m.iter().map(|r| format!("  {}", r.vma)).collect::<Vec<_>>().join("\n")
}

/// What a page difference most likely means.
fn hint(want: Page, got: Page) -> &'static str {
    match (want, got) {
        (Page::Zero, Page::Data(_)) => "a page that was zero at the dump instant came back with data: stale content from an earlier image of the chain (zapped or unmapped page, or data at an address reused since)?",
        (Page::Data(_), Page::Zero) => "a page with data came back zero: a page written since the previous dump missed by the tracking, or not found in the chain?",
        (Page::Data(_), Page::Data(_)) => "a page came back with other content: an older version of the page (write missed by the tracking) or a page from another address?",
        _ => "readability differs",
    }
}

/// Compare two snapshots of one process: same VMAs, identical pages. The
/// error names the first difference (address, VMA, both contents) and
/// counts all of them.
fn compare_proc(pid: i32, want: &ProcMem, got: &ProcMem) -> Result<(), String> {
    let wv: Vec<&Vma> = want.iter().map(|r| &r.vma).collect();
    let gv: Vec<&Vma> = got.iter().map(|r| &r.vma).collect();
    if wv != gv {
        let i = wv.iter().zip(gv.iter()).position(|(a, b)| a != b).unwrap_or(wv.len().min(gv.len()));
        return Err(format!(
            "pid {pid}: memory layout differs at VMA #{i}: expected {}, got {}\n--- expected (dump instant)\n{}\n--- got\n{}",
            wv.get(i).map(|v| v.to_string()).unwrap_or_else(|| "nothing".into()),
            gv.get(i).map(|v| v.to_string()).unwrap_or_else(|| "nothing".into()),
            maps_text(want),
            maps_text(got)
        ));
    }
    let mut diffs = Vec::new();
    let mut total = 0usize;
    for (w, g) in want.iter().zip(got.iter()) {
        for (j, (a, b)) in w.pages.iter().zip(g.pages.iter()).enumerate() {
            if a != b {
                total += 1;
                if diffs.len() < 12 {
                    diffs.push((w.vma.start + j as u64 * PAGE, &w.vma, *a, *b));
                }
            }
        }
    }
    if total == 0 {
        return Ok(());
    }
    let (addr, vma, a, b) = diffs[0];
    let mut msg = format!(
        "pid {pid}: {total} page(s) differ; first at {addr:#x} (page {} of VMA {vma}): expected {a}, got {b}: {}",
        (addr - vma.start) / PAGE,
        hint(a, b)
    );
    for (addr, vma, a, b) in &diffs[1..] {
        msg.push_str(&format!("\n  also {addr:#x} in {vma}: expected {a}, got {b}"));
    }
    Err(msg)
}

fn compare_tree(want: &TreeMem, got: &TreeMem) -> Result<(), String> {
    let wk: Vec<i32> = want.keys().copied().collect();
    let gk: Vec<i32> = got.keys().copied().collect();
    if wk != gk {
        return Err(format!("processes differ: expected {wk:?}, got {gk:?}"));
    }
    for (pid, w) in want {
        compare_proc(*pid, w, &got[pid])?;
    }
    Ok(())
}

// ================================================================ stopping, dumping, restoring

fn task_state(pid: i32, tid: i32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let r = s.rfind(')')?;
    s[r + 2..].chars().next()
}

/// Wait until every thread of every pid is in state T (group stop).
fn wait_stopped(pids: &[i32], what: &str) {
    wait_for(what, secs(10), || {
        pids.iter()
            .all(|&p| {
                let t = tids(p);
                !t.is_empty() && t.iter().all(|&tid| task_state(p, tid) == Some('T'))
            })
            .then_some(())
    });
}

/// SIGSTOP every process of the tree under `root`; returns its pids once
/// every thread is stopped (and the tree did not change meanwhile).
fn stop_tree(root: i32) -> Vec<i32> {
    let pids = tree(root);
    for &p in &pids {
        assert!(kill(p, libc::SIGSTOP), "SIGSTOP {p}");
    }
    wait_stopped(&pids, &format!("tree {pids:?} to stop"));
    assert_eq!(tree(root), pids, "the tree changed while it was being stopped");
    pids
}

fn cont_tree(pids: &[i32]) {
    for &p in pids {
        assert!(kill(p, libc::SIGCONT), "SIGCONT {p}");
    }
}

/// SIGKILL the tree under `root` and wait until every pid is free again.
fn kill_tree(root: i32) {
    let pids = tree(root);
    for &p in &pids {
        kill(p, libc::SIGKILL);
    }
    wait_gone(&pids, secs(30)).unwrap_or_else(|e| panic!("killing tree {pids:?}: {e}"));
}

/// What `snap dump --json` reports about the pages of an image.
#[derive(Clone, Debug)]
struct DumpStats {
    backend: String,
    pages_stored: u64,
    pages_read: u64,
}

/// `snap dump -t ROOT -D DIR --leave-running --json [--track-mem]
/// [--prev-images-dir PREV]`, asserting success and the JSON summary's
/// fields.
fn dump_json(root: i32, dir: &Path, prev: Option<&Path>, track: bool) -> DumpStats {
    let prev_s = prev.map(|p| p.to_string_lossy().into_owned());
    let mut extra = vec!["--leave-running", "--json"];
    if track {
        extra.push("--track-mem");
    }
    if let Some(p) = &prev_s {
        extra.push("--prev-images-dir");
        extra.push(p);
    }
    let run = dump_raw(&[root], dir, &extra);
    assert!(run.ok(), "snap dump {extra:?} failed: {}", run.describe());
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("dump --json printed no JSON object ({e}): {:?}", run.stdout));
    let backend = v["backend"].as_str().unwrap_or_else(|| panic!("dump --json: no string \"backend\": {v}")).to_string();
    assert!(["uffd-wp", "soft-dirty", "hash", "full"].contains(&backend.as_str()), "dump --json: unknown backend {backend:?}: {v}");
    let pages_stored = v["pages_stored"].as_u64().unwrap_or_else(|| panic!("dump --json: no number \"pages_stored\": {v}"));
    let pages_read = v["pages_read"].as_u64().unwrap_or_else(|| panic!("dump --json: no number \"pages_read\": {v}"));
    eprintln!("  dump {}: backend {backend}, pages_stored {pages_stored}, pages_read {pages_read}", dir.display());
    DumpStats { backend, pages_stored, pages_read }
}

/// How the chain is dumped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// `--track-mem` on every dump, `--prev-images-dir` on all but the first.
    Tracked,
    /// `--prev-images-dir` without any `--track-mem` (the hash backend).
    HashOnly,
    /// Plain full dumps (control: the comparison itself, with no incremental
    /// feature involved).
    Full,
}

/// One point of a chain: the image taken after step `k` and the memory of
/// the tree at that instant.
struct Point {
    k: u32,
    dir: PathBuf,
    mem: TreeMem,
    stats: Option<DumpStats>,
    /// What the workload reported for the step ("pages=56", "child=PID"...).
    info: String,
}

/// Stop the tree, snapshot its memory, dump it (still stopped), check that
/// the dump left it stopped and its memory as it was, and let it run again.
fn checkpoint(t: &TempDir, root: i32, k: u32, info: String, mode: Mode, prev: Option<&Path>) -> Point {
    let pids = stop_tree(root);
    let mem = snapshot(&pids);
    let dir = t.sub(&format!("img{k:02}"));
    let stats = match mode {
        Mode::Full => {
            dump_ok(&[root], &dir, &["--leave-running"]);
            None
        }
        Mode::Tracked => Some(dump_json(root, &dir, prev, true)),
        Mode::HashOnly => Some(dump_json(root, &dir, prev, false)),
    };
    // A stopped process stays stopped with --leave-running, and arming the
    // tracking (or the dump itself) changes none of its memory.
    wait_stopped(&pids, &format!("dump {k}: the stopped tree {pids:?} to be still stopped after dump --leave-running"));
    let after = snapshot(&pids);
    if let Err(e) = compare_tree(&mem, &after) {
        panic!("dump {k} (--leave-running{}) changed the memory of the stopped tree: {e}", if mode == Mode::Tracked { " --track-mem" } else { "" });
    }
    cont_tree(&pids);
    Point { k, dir, mem, stats, info }
}

/// Restore one point (its processes come back stopped, since they were
/// stopped at the dump), compare the whole memory with the snapshot of the
/// dump instant, then let it run `then` (e.g. the next step), and kill it.
fn restore_and_compare(r: &Reaper, root: i32, p: &Point, what: &str, then: impl FnOnce(&[i32])) {
    let pids: Vec<i32> = p.mem.keys().copied().collect();
    eprintln!("restoring {what} from {}", p.dir.display());
    restore_ok(&p.dir, r, &pids);
    wait_stopped(&pids, &format!("the processes restored from {what} to be stopped (they were stopped at the dump)"));
    assert_eq!(tree(root), pids, "{what}: the restored tree differs from the dumped one");
    let got = snapshot(&pids);
    if let Err(e) = compare_tree(&p.mem, &got) {
        panic!("{what} ({}): the restored memory differs from the memory at the dump instant: {e}", p.dir.display());
    }
    then(&pids);
    kill_tree(root);
}

fn info_num(info: &str, key: &str) -> Option<u64> {
    info.split_whitespace().find_map(|w| w.strip_prefix(key)?.parse().ok())
}

/// The tracking backend snap picks here: soft-dirty where `snap check`
/// finds it, else uffd-wp (userfaultfd write-protect + PAGEMAP_SCAN).
fn tracking_backend() -> Result<&'static str, String> {
    match feature_present("soft-dirty") {
        Ok(_) => Ok("soft-dirty"),
        Err(_) => feature_present("uffd-wp").map(|_| "uffd-wp"),
    }
}

/// Whether `snap check --json` finds a feature whose name contains `key`,
/// with its detail line.
fn feature_present(key: &str) -> Result<String, String> {
    let c = snap(&["check", "--json"]);
    if !c.ok() {
        return Err(format!("snap check --json failed: {}", c.describe()));
    }
    let v: serde_json::Value = serde_json::from_str(c.stdout.trim()).map_err(|e| format!("snap check --json is not JSON ({e})"))?;
    for f in v["features"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or("");
        if name.contains(key) {
            let detail = f["detail"].as_str().unwrap_or("").to_string();
            return if f["present"] == true { Ok(detail) } else { Err(format!("snap check: {name} absent: {detail}")) };
        }
    }
    Err(format!("snap check --json lists no {key} feature"))
}

/// The workloads run without glibc's rseq registration. With it, the
/// kernel rewrites each thread's rseq area (the CPU it runs on) whenever the
/// thread returns to user space, which the remote system calls of any dump
/// make it do, and a restored thread may run on another CPU: that word is
/// kernel-maintained scheduling data, not memory the program wrote, and
/// would make "identical memory" unprovable. (snap's rseq handling is not
/// what these tests are about.)
fn workload(prog: &Path) -> Command {
    let mut c = Command::new(prog);
    c.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
    c
}

// ================================================================ the C workload chain

/// Steps of fixtures/incr_mem.c (see its header); 15 is the exec, 16 a
/// step of the exec'd image.
const STEPS: u32 = 16;
const STEP_EXEC: u32 = 15;
/// Steps that change only a few pages by plain writes: their incremental
/// image must be small (and, tracked with uffd-wp, read few pages).
const SMALL_STEPS: &[u32] = &[1, 2, 11, 12];

/// Wait for the workload's "step K ..." report; returns the rest of the line.
fn wait_step(d: &Path, pid: i32, k: u32) -> String {
    let p = d.join("step");
    let want = k.to_string();
    wait_for(&format!("step {k} of pid {pid}"), secs(30), || {
        if let Some(s) = read_opt(&p) {
            let mut it = s.split_whitespace();
            if it.next() == Some(want.as_str()) {
                return Some(it.collect::<Vec<_>>().join(" "));
            }
        }
        if let Some(res) = read_opt(&d.join("result")) {
            panic!("the workload failed at step {k}: {}", res.trim());
        }
        if !alive(pid) || proc_state(pid) == Some('Z') {
            panic!("pid {pid} died during step {k}");
        }
        None
    })
}

/// Tell the running workload to perform step `k` and wait until it has.
fn do_step(d: &Path, pid: i32, k: u32) -> String {
    let _ = fs::remove_file(d.join("step"));
    assert!(kill(pid, libc::SIGUSR1), "SIGUSR1 to {pid}");
    wait_step(d, pid, k)
}

/// The whole scenario on fixtures/incr_mem.c: full dump, then one dump per
/// step (chained as `mode` says), then every image restored and compared.
fn c_chain(test: &str, mode: Mode) {
    let _l = lock();
    let bin = need!(fixture("incr_mem"), test, "gcc not found");
    let t = TempDir::new(test);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, workload(&bin).arg(&d), &t.join("log"));
    wait_ready(&d, pid, secs(30));

    let mut points: Vec<Point> = vec![checkpoint(&t, pid, 0, String::new(), mode, None)];
    for k in 1..=STEPS {
        let info = do_step(&d, pid, k);
        eprintln!("step {k}: {info}");
        let prev = points.last().unwrap().dir.clone();
        points.push(checkpoint(&t, pid, k, info, mode, Some(&prev)));
    }
    let child = info_num(&points[13].info, "child=").expect("step 13 reports the child's pid") as i32;
    assert!(points[13].mem.contains_key(&child) && points[STEPS as usize].mem.contains_key(&child), "the forked child {child} is in the dumps from step 13 on");
    kill_tree(pid);

    // Every point of the chain restores to exactly that point. A restored
    // point (but the last) then runs its next step, so the restored
    // processes are shown to work, not only to look right.
    for p in &points {
        let what = format!("image {} (after step {})", p.k, p.k);
        restore_and_compare(&r, pid, p, &what, |pids| {
            if p.k < STEPS {
                cont_tree(pids);
                do_step(&d, pid, p.k + 1);
            } else {
                comparator_self_test(pids, &p.mem);
            }
        });
    }

    if mode != Mode::Full {
        check_incremental(test, mode, &points);
    }
}

/// Self-test of the comparison, on the last restored tree: a single byte
/// changed (through /proc/PID/mem) must be reported at its address.
fn comparator_self_test(pids: &[i32], want: &TreeMem) {
    let pid = pids[0];
    let reg = want[&pid].iter().find(|r| r.vma.perms == "rw-p" && r.vma.name.is_empty() && r.pages.len() >= 16).expect("a private anonymous rw VMA of 16 pages or more");
    let addr = reg.vma.start + (reg.pages.len() as u64 / 2) * PAGE + 123;
    let f = fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/mem")).unwrap();
    let mut b = [0u8; 1];
    f.read_at(&mut b, addr).unwrap();
    b[0] ^= 0x5a;
    f.write_at(&b, addr).unwrap();
    let got = snapshot(pids);
    let page = addr & !(PAGE - 1);
    match compare_tree(want, &got) {
        Ok(()) => panic!("comparator self-test: one byte changed at {addr:#x} and the memory compared equal"),
        Err(e) => assert!(e.contains(&format!("{page:#x}")) && e.contains("1 page(s) differ"), "comparator self-test: change at {addr:#x} reported as: {e}"),
    }
}

/// The images are incremental: the JSON summaries of the dumps.
fn check_incremental(test: &str, mode: Mode, points: &[Point]) {
    let st = |k: u32| points[k as usize].stats.as_ref().unwrap();
    let info = |k: u32| points[k as usize].info.as_str();
    let full = st(0);
    // Region A alone holds 1536 distinct non-zero pages.
    assert!(full.pages_stored >= 1536, "the full dump stored only {} pages", full.pages_stored);
    for k in 1..=STEPS {
        let s = st(k);
        assert!(s.pages_stored < full.pages_stored, "dump {k} stored {} pages, not fewer than the full dump ({}): not incremental", s.pages_stored, full.pages_stored);
        if mode == Mode::HashOnly {
            assert_eq!(s.backend, "hash", "dump {k} without --track-mem: backend");
        }
    }
    for &k in SMALL_STEPS {
        assert!(st(k).pages_stored <= full.pages_stored / 8, "step {k} changes a few pages, but its dump stored {} of the full dump's {}", st(k).pages_stored, full.pages_stored);
    }
    // Every page written with new content is stored (here: step 1's and the
    // exec'd image's, which are known exactly), and the exec'd image was
    // dumped whole although its addresses overlap nothing of its parent.
    let p1 = info_num(info(1), "pages=").expect("step 1 reports pages=");
    assert!(st(1).pages_stored >= p1, "step 1 wrote {p1} pages with new content, its dump stored only {}", st(1).pages_stored);
    let px = info_num(info(STEP_EXEC), "pages=").expect("the exec step reports pages=");
    assert!(st(STEP_EXEC).pages_stored >= px, "the exec'd image filled {px} new pages, the dump stored only {}", st(STEP_EXEC).pages_stored);
    let p16 = info_num(info(16), "pages=").expect("step 16 reports pages=");
    assert!(st(16).pages_stored >= p16 && st(16).pages_stored <= full.pages_stored / 8, "step 16 (after exec) wrote {p16} pages; its dump stored {}", st(16).pages_stored);

    if mode != Mode::Tracked {
        return;
    }
    if let Err(why) = feature_present("soft-dirty") {
        // The other backend: on this kernel the chain ran with uffd-wp.
        skip(&format!("{test} (soft-dirty backend)"), &why);
    }
    match tracking_backend() {
        Err(why) => skip(&format!("{test} (tracking numbers; correctness was checked)"), &why),
        Ok(backend) => {
            // With tracking armed by the previous dump, a small step is
            // found without reading every page.
            for &k in SMALL_STEPS {
                assert_eq!(st(k).backend, backend, "step {k}: {backend} is available and tracking was armed by the previous dump");
            }
            for k in SMALL_STEPS.iter().copied().chain([14, 16]) {
                let s = st(k);
                if s.backend == backend {
                    assert!(s.pages_read <= full.pages_read / 4, "step {k}: the {backend} dump read {} pages, the full one {}: the tracking did not limit the reads", s.pages_read, full.pages_read);
                }
            }
        }
    }
}

/// The whole chain with dirty tracking (`--track-mem`): 1 full + 16
/// incremental dumps, one per kind of change (user and kernel writes,
/// mmap, munmap + new mapping over old data, mremap onto old data and
/// move+grow, MADV_DONTNEED, MADV_FREE + reclaim, brk up, brk down and up
/// again, concurrent threads, shared anonymous memory, private file
/// mapping, fork (the child's first dump), the child's changes, exec (its
/// new image dumped whole), a step of the exec'd image). Every one of the
/// 17 images restores to exactly the memory of its dump instant, the
/// restored tree runs its next step, and the images are incremental.
#[test]
fn incr_chain_tracked_every_kind_of_change() {
    c_chain("incr_chain_tracked_every_kind_of_change", Mode::Tracked);
}

/// Same chain with `--prev-images-dir` alone (no tracking armed: every page
/// is hashed and only new ones stored): same exactness, still incremental.
#[test]
fn incr_chain_hash_backend_every_kind_of_change() {
    c_chain("incr_chain_hash_backend_every_kind_of_change", Mode::HashOnly);
}

/// Control: the same scenario with plain full dumps. It shows that the
/// whole-memory comparison holds for a snap without incremental dumps (so a
/// failure of the two tests above is the incremental path's), and that the
/// comparison does detect a changed byte.
#[test]
fn full_dumps_baseline_same_comparison() {
    c_chain("full_dumps_baseline_same_comparison", Mode::Full);
}

// ================================================================ python

/// Wait for the python workload's FILE ("mutated" or "checksum") with the
/// given step; returns the checksum.
/// A tracked tree larger than one SCM_RIGHTS message carries descriptors
/// for (253): the holder keeps every process's userfaultfd between the two
/// dumps, so the second reads every one of the 300 processes as tracked.
#[test]
fn incr_tracking_held_for_a_tree_of_300() {
    const T: &str = "incr_tracking_held_for_a_tree_of_300";
    let _l = lock();
    match tracking_backend() {
        Ok("uffd-wp") => {}
        Ok(b) => return skip(T, &format!("the {b} backend needs no holder")),
        Err(why) => return skip(T, &format!("no dirty-page tracking: {why}")),
    }
    let bin = need!(fixture("fanout"), T, "gcc not found");
    let t = TempDir::new(T);
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, workload(&bin).arg(&d).arg("300"), &t.join("log"));
    wait_ready(&d, pid, secs(60));
    let pids = tree(pid);
    assert_eq!(pids.len(), 301, "the fan-out tree: {pids:?}");
    let (a, b) = (t.sub("img0"), t.sub("img1"));
    dump_json(pid, &a, None, true);
    let a_s = a.to_string_lossy().into_owned();
    let run = dump_raw(&[pid], &b, &["--leave-running", "--json", "--track-mem", "--prev-images-dir", &a_s]);
    assert!(run.ok(), "incremental dump of the 301 processes: {}", run.describe());
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("dump --json");
    let procs = v["processes"].as_array().expect("processes in the summary");
    assert_eq!(procs.len(), 301, "{v}");
    let untracked: Vec<&serde_json::Value> = procs.iter().filter(|p| p["memory"] != "tracked").collect();
    assert!(untracked.is_empty(), "{} of 301 processes were not read as tracked: {:?}", untracked.len(), &untracked[..untracked.len().min(5)]);
    kill_tree(pid);
}

fn py_report(d: &Path, pid: i32, file: &str, step: u32) -> String {
    let p = d.join(file);
    wait_for(&format!("{} with step {step} from pid {pid}", p.display()), secs(30), || {
        if let Some(s) = read_opt(&p) {
            let v: Vec<&str> = s.split_whitespace().collect();
            if v.len() == 2 && v[0] == step.to_string() {
                return Some(v[1].to_string());
            }
        }
        if !alive(pid) || proc_state(pid) == Some('Z') {
            panic!("python workload {pid} died");
        }
        None
    })
}

fn py_signal(d: &Path, pid: i32, sig: i32, file: &str, step: u32) -> String {
    let _ = fs::remove_file(d.join(file));
    assert!(kill(pid, sig), "signal {sig} to {pid}");
    py_report(d, pid, file, step)
}

/// A python3 program (a dict of 20000 entries, 2 MiB of bytearrays) dumped
/// 6 times with `--track-mem`: full, then 5 incremental dumps, each after a
/// mutation (entries added, replaced and deleted, in-place writes, a large
/// buffer freed and another allocated). Restored from the middle (image 3)
/// and from the end (image 5), each comes back with exactly the memory of
/// its dump instant, reports the checksum of its data at that instant, and
/// its next mutation gives the same data as the original's did.
#[test]
fn incr_chain_python_restored_from_middle_and_end() {
    const TEST: &str = "incr_chain_python_restored_from_middle_and_end";
    const DUMPS: u32 = 5;
    let _l = lock();
    let py = need!(python3(), TEST, "no python3");
    let t = TempDir::new("incr_py");
    let r = Reaper::new();
    let d = t.sub("st");
    let pid = spawn(&r, workload(&py).arg(fixtures_src().join("py_incr.py")).arg(&d), &t.join("log"));
    let ready = wait_ready(&d, pid, secs(30));
    let mut sums = vec![ready.split_whitespace().nth(2).expect("ready PID STEP CHECKSUM").to_string()];

    let mut points = vec![checkpoint(&t, pid, 0, String::new(), Mode::Tracked, None)];
    for k in 1..=DUMPS {
        sums.push(py_signal(&d, pid, libc::SIGUSR1, "mutated", k));
        let prev = points.last().unwrap().dir.clone();
        points.push(checkpoint(&t, pid, k, String::new(), Mode::Tracked, Some(&prev)));
    }
    // The original goes on one more step: the expected result of step 4
    // from image 3 is known (sums[4]); from image 5 it is step 6's.
    sums.push(py_signal(&d, pid, libc::SIGUSR1, "mutated", DUMPS + 1));
    kill_tree(pid);

    let full = points[0].stats.clone().unwrap();
    for p in &points[1..] {
        let s = p.stats.as_ref().unwrap();
        assert!(s.pages_stored < full.pages_stored, "python dump {} stored {} pages, not fewer than the full dump's {}", p.k, s.pages_stored, full.pages_stored);
    }

    for k in [3, DUMPS] {
        let p = &points[k as usize];
        let what = if k == DUMPS { "the end of the chain" } else { "the middle of the chain" };
        restore_and_compare(&r, pid, p, &format!("python image {k} ({what})"), |pids| {
            cont_tree(pids);
            let sum = py_signal(&d, pid, libc::SIGUSR2, "checksum", k);
            assert_eq!(sum, sums[k as usize], "python restored from image {k} reports the checksum of another state");
            let next = py_signal(&d, pid, libc::SIGUSR1, "mutated", k + 1);
            assert_eq!(next, sums[k as usize + 1], "python restored from image {k}: its next mutation differs from the original's");
        });
    }
}

// ================================================================ missing or damaged parents

/// Names of the page pack files of an image (what holds the page data).
fn pack_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages.pack")).collect()
}

/// A chain whose parent is missing or damaged fails with an error that
/// names the parent, and leaves no process behind; a dump with a
/// --prev-images-dir that does not exist, or is no image, fails naming the
/// path and leaves the process running untouched. With the parent intact
/// again the same image restores exactly.
#[test]
fn incr_missing_or_damaged_parent_fails_clearly() {
    let _l = lock();
    let t = TempDir::new("incr_parent");
    let r = Reaper::new();
    let pid = spawn(&r, workload(Path::new("sleep")).arg("1000"), &t.join("log"));
    wait_in_syscall(pid, pid, &[35, 230], secs(10));

    // Bad --prev-images-dir: refused, naming it; the process is untouched.
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let empty = t.sub("empty-not-an-image");
    for bad in [t.join("no-such-parent-img"), empty] {
        let bad_s = bad.to_string_lossy().into_owned();
        let run = dump_raw(&[pid], &t.join("img-bad"), &["--leave-running", "--track-mem", "--prev-images-dir", &bad_s]);
        assert!(!run.ok(), "dump with --prev-images-dir {bad_s} succeeded: {}", run.describe());
        let name = bad.file_name().unwrap().to_string_lossy().into_owned();
        assert!(run.stderr.contains(&name), "the error does not name {bad_s}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "snap panicked: {}", run.describe());
        let st = proc_state(pid);
        assert!(st == Some('S') || st == Some('R'), "state {st:?} after the refused dump");
        assert_eq!(status_field(pid, "TracerPid").as_deref(), Some("0"), "still traced after the refused dump");
        assert_eq!(fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(), maps, "memory layout changed by the refused dump");
        wait_in_syscall(pid, pid, &[35, 230], secs(10));
        let _ = fs::remove_dir_all(t.join("img-bad"));
    }

    // A chain of two, dumped stopped (see the module comment).
    let pids = stop_tree(pid);
    let mem = snapshot(&pids);
    let p1 = t.sub("parent-img-1");
    let p2 = t.sub("child-img-2");
    let s1 = dump_json(pid, &p1, None, true);
    let s2 = dump_json(pid, &p2, Some(&p1), true);
    assert!(s2.pages_stored < s1.pages_stored, "the second image stored {} pages, the first {}: it does not depend on its parent", s2.pages_stored, s1.pages_stored);
    kill_tree(pid);
    let p2s = p2.to_string_lossy().into_owned();
    let restore_fails = |why: &str| {
        let run = snap(&["restore", "-D", &p2s, "-d"]);
        assert!(!run.ok(), "restore with {why} succeeded: {}", run.describe());
        assert!(run.stderr.contains("parent-img-1"), "restore with {why}: the error does not name the parent directory {}: {}", p1.display(), run.stderr);
        assert!(!run.stderr.contains("panicked"), "snap panicked: {}", run.describe());
        assert!(!alive(pid), "restore with {why} failed but left pid {pid} behind");
    };

    // Parent moved away.
    let moved = t.join("parent-img-1.moved");
    fs::rename(&p1, &moved).unwrap();
    restore_fails("the parent image directory missing");
    fs::rename(&moved, &p1).unwrap();

    // Parent's page pack deleted.
    let packs = pack_files(&p1);
    assert!(!packs.is_empty(), "no pages.pack* in {}", p1.display());
    let saved = t.sub("saved-packs");
    for f in &packs {
        fs::copy(f, saved.join(f.file_name().unwrap())).unwrap();
        fs::remove_file(f).unwrap();
    }
    restore_fails("the parent's page pack deleted");

    // Intact again: the same image restores exactly.
    for f in &packs {
        fs::copy(saved.join(f.file_name().unwrap()), f).unwrap();
    }
    let p = Point { k: 2, dir: p2.clone(), mem, stats: Some(s2), info: String::new() };
    restore_and_compare(&r, pid, &p, "image 2 with its parent intact again", |_| {});
}
