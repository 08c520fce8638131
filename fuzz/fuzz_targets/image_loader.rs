//! cargo fuzz run image_loader (not built by CI).
//! Input: a tiny archive of files, each `name_len:u8 name data_len:u16le data`,
//! written into a fresh directory that the loader then opens and reads.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snap::images::ImageReader;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("snap-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut d = data;
    while d.len() > 3 {
        let nl = d[0] as usize;
        if d.len() < 1 + nl + 2 { break; }
        let name = String::from_utf8_lossy(&d[1..1 + nl]).replace(['/', '\0'], "_");
        let dl = u16::from_le_bytes([d[1 + nl], d[2 + nl]]) as usize;
        let rest = &d[3 + nl..];
        let body = &rest[..dl.min(rest.len())];
        if !name.is_empty() && name != "." && name != ".." {
            let _ = std::fs::write(dir.join(&name), body);
        }
        d = &rest[body.len()..];
    }
    if let Ok(r) = ImageReader::open(&dir) {
        let store = r.pages().unwrap();
        for f in r.manifest().files.clone() {
            let _ = r.read_bytes(&f.name);
            if let Ok(m) = r.pagemap(&f.name) {
                for (_, h) in m { let _ = store.page(h); }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
});
