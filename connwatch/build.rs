//! Hands the eBPF object built by `cargo xtask build-ebpf` to the daemon, which
//! embeds `$OUT_DIR/connwatch.bpf.o`.
//!
//! When the object has not been built, an empty stub takes its place so the
//! workspace still checks and lints; the daemon refuses an empty object at run
//! time.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("connwatch.bpf.o");

    // The xtask passes an explicit target dir on as an absolute path; a relative
    // one given by hand is taken from the workspace root.
    let target = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .iter()
        .filter_map(env::var_os)
        .find(|v| !v.is_empty())
        .map(|dir| workspace.join(dir))
        .unwrap_or_else(|| workspace.join("target"));
    let release_dir = target.join("bpfel-unknown-none").join("release");
    let object = release_dir.join("connwatch");

    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    println!("cargo:rerun-if-env-changed=CARGO_BUILD_TARGET_DIR");
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rerun-if-changed={}", release_dir.display());

    match fs::read(&object) {
        Ok(bytes) => write(&out, &bytes),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object not built: run cargo xtask build-ebpf; this binary will refuse to load"
            );
            write(&out, &[]);
        }
    }
}

/// Writes only when the content differs, so an unchanged object does not make
/// rustc rebuild the crate.
fn write(path: &PathBuf, bytes: &[u8]) {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
