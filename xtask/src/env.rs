//! What the child processes of the xtask inherit.
//!
//! `cargo xtask` is `cargo run`, which hands the xtask binary its own build's
//! variables (CARGO_PKG_*, CARGO_MANIFEST_DIR, ...) and prepends the workspace
//! target dir and the rustup toolchain's lib dirs to LD_LIBRARY_PATH. None of
//! that is meant for the commands the xtask runs, so [`scrub`] takes it out.
//! The eBPF build additionally must not pick up a compiler, wrapper or flags
//! meant for the host build ([`ebpf_removed`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables `cargo run` sets for the binary it runs, by exact name.
const CARGO_RUN_VARS: [&str; 6] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// Variables that would make the eBPF build use another compiler, a wrapper,
/// other flags or another target. The xtask sets RUSTC, CARGO_ENCODED_RUSTFLAGS
/// and CARGO_TARGET_DIR itself and passes --target.
pub const EBPF_REMOVED: [&str; 14] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
];

/// Removes from `cmd`'s environment what `cargo run` added for the xtask itself.
pub fn scrub(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_") || CARGO_RUN_VARS.contains(&key) {
            cmd.env_remove(key);
        }
    }
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        let drop = [crate::target_dir(), rustup_toolchains()];
        match filter_ld_library_path(&old, &drop) {
            Some(kept) if kept == old => {}
            Some(kept) => {
                cmd.env("LD_LIBRARY_PATH", kept);
            }
            None => {
                cmd.env_remove("LD_LIBRARY_PATH");
            }
        }
    }
}

/// The entries of an LD_LIBRARY_PATH that lie under none of `drop`; None if
/// nothing is left.
pub fn filter_ld_library_path(value: &OsString, drop: &[PathBuf]) -> Option<OsString> {
    let kept: Vec<PathBuf> = std::env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty() && !drop.iter().any(|d| p.starts_with(d)))
        .collect();
    if kept.is_empty() {
        return None;
    }
    std::env::join_paths(kept).ok()
}

fn rustup_toolchains() -> PathBuf {
    let home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".rustup")
        });
    home.join("toolchains")
}

/// PATH with `dir` first (once).
pub fn path_with(dir: &Path) -> OsString {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path).filter(|d| d != dir));
    }
    std::env::join_paths(dirs).unwrap_or_else(|_| dir.as_os_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_cargo_run_additions_from_ld_library_path() {
        let value = OsString::from(
            "/work/main/target/debug:/work/main/target/debug/deps:/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/lib:/opt/lib",
        );
        let drop = [
            PathBuf::from("/work/main/target"),
            PathBuf::from("/root/.rustup/toolchains"),
        ];
        assert_eq!(
            filter_ld_library_path(&value, &drop),
            Some(OsString::from("/opt/lib"))
        );
        let only = OsString::from("/work/main/target/debug");
        assert_eq!(filter_ld_library_path(&only, &drop), None);
    }

    #[test]
    fn path_with_puts_dir_first_once() {
        let dir = Path::new("/nonexistent/xtask-test-bin");
        let path = path_with(dir);
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        assert_eq!(dirs[0], dir);
        assert_eq!(dirs.iter().filter(|d| *d == dir).count(), 1);
    }
}
