//! The filesystems the kernel side needs: tracefs (aya resolves tracepoint ids through
//! it) and bpffs (pins), mounted where a fresh machine lacks them.

use std::fs;
use std::path::Path;

use anyhow::{bail, Result};

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

fn is_mounted(path: &str, fstype: &str) -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let _dev = f.next();
            f.next() == Some(path) && f.next() == Some(fstype)
        })
    })
}

fn mount(fstype: &str, target: &str) -> Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in a literal");
    let (src, fst, tgt) = (c("nodev"), c(fstype), c(target));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "cannot mount {fstype} on {target}: {} (mount it by hand: mount -t {fstype} nodev {target})",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Mounts tracefs and bpffs where they are missing: aya resolves tracepoint ids through
/// tracefs, and pinning needs bpffs.
pub fn ensure_filesystems() -> Result<()> {
    if !Path::new(TRACEFS).join("events").exists() && !is_mounted(TRACEFS, "tracefs") {
        mount("tracefs", TRACEFS)?;
        tracing::info!("mounted tracefs on {TRACEFS}");
    }
    if !is_mounted(BPFFS, "bpf") {
        mount("bpf", BPFFS)?;
        tracing::info!("mounted bpffs on {BPFFS}");
    }
    Ok(())
}
