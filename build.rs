//! Builds the parasite blob (`src/parasite/blob/blob.rs`) as a no_std
//! static-pie ELF with the same rustc that builds the crate, into OUT_DIR.
//! The host toolchain cannot add rustup targets, so the blob is built for
//! the host target with `-nostartfiles -nostdlib -static-pie`.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/parasite/blob/blob.rs";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let blob = out.join("parasite.elf");
    let status = Command::new(&rustc)
        .args([
            "--edition", "2021",
            "-C", "panic=abort",
            "-C", "opt-level=2",
            "-C", "relocation-model=pie",
            "-C", "debuginfo=0",
            "-C", "link-args=-nostartfiles",
            "-C", "link-args=-nostdlib",
            "-C", "link-args=-static-pie",
            "-C", "link-args=-Wl,--build-id=none",
            "--crate-type", "bin",
            "--crate-name", "parasite_blob",
            "-o",
        ])
        .arg(&blob)
        .arg(src)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {rustc} to build the parasite blob: {e}"));
    if !status.success() {
        panic!("building the parasite blob {src} with {rustc} failed: {status}");
    }
}
