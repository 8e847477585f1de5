//! `connwatch check`: a preflight, one line per thing connwatch needs.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::kernel::layout::{self, Hook};
use crate::kernel::sock_diag::{probe_destroy, DestroySupport};
use crate::kernel::{fs, load, netns};

struct Line {
    ok: bool,
    what: &'static str,
    detail: String,
}

fn line(what: &'static str, r: Result<String>) -> Line {
    match r {
        Ok(detail) => Line {
            ok: true,
            what,
            detail,
        },
        Err(e) => Line {
            ok: false,
            what,
            detail: format!("{e:#}"),
        },
    }
}

fn root() -> Result<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("not root: loading eBPF and destroying sockets need root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)");
    }
    Ok("running as root".into())
}

/// Creates (and closes) a one-entry array map: proves the bpf() syscall works for us.
fn bpf_syscall() -> Result<String> {
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4; // key size
    attr[2] = 4; // value size
    attr[3] = 1; // max entries

    // SAFETY: BPF_MAP_CREATE (0) reads a bpf_attr without pointers.
    let fd = unsafe { connwatch_common::bpf(0, &mut attr) }
        .map_err(|e| anyhow::anyhow!("bpf() refused to create a map: {e}"))?;
    // SAFETY: a descriptor the syscall just returned to us.
    unsafe { libc::close(fd as i32) };
    Ok("bpf() syscall works".into())
}

fn btf() -> Result<String> {
    let p = Path::new("/sys/kernel/btf/vmlinux");
    if !p.exists() {
        bail!(
            "{} is missing: the kernel lacks CONFIG_DEBUG_INFO_BTF",
            p.display()
        );
    }
    Ok(format!("{} present", p.display()))
}

fn filesystems() -> Result<String> {
    fs::ensure_filesystems()?;
    Ok(format!(
        "tracefs at {}, bpffs at {}",
        fs::TRACEFS,
        fs::BPFFS
    ))
}

fn tracepoint(hook: &Hook) -> Result<String> {
    layout::check_hook(hook)
        .with_context(|| format!("{}:{} is not usable", hook.category, hook.name))?;
    Ok(format!(
        "{}:{} present, layout as expected",
        hook.category, hook.name
    ))
}

fn object() -> Result<String> {
    Ok(format!("embedded, {} bytes", load::object()?.len()))
}

fn sock_destroy() -> Result<String> {
    match probe_destroy() {
        DestroySupport::Works => Ok(DestroySupport::Works.describe()),
        other => bail!("{}", other.describe()),
    }
}

/// Whether every network namespace on the host can be reached: one sock_diag socket
/// opened inside each (as the daemon does to look up and destroy their sockets).
fn namespaces() -> Result<String> {
    let all = netns::all();
    let host = netns::own()?;
    let mut failed = Vec::new();
    for ns in all.iter().filter(|n| n.inode != host) {
        if let Err(e) = netns::open_in(&ns.path) {
            failed.push(format!("{} ({}): {e:#}", ns.inode, ns.path.display()));
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} network namespaces cannot be reached, so their sockets are listed by the kernel program but never destroyed: {}",
            failed.len(),
            all.len(),
            failed.join("; ")
        );
    }
    Ok(format!(
        "{} network namespace{} ({} other than the host's), each reachable through setns",
        all.len(),
        if all.len() == 1 { "" } else { "s" },
        all.len().saturating_sub(1)
    ))
}

/// Prints one line per check; returns whether everything needed is there.
pub fn run() -> bool {
    let root = line("privileges", root());
    let is_root = root.ok;
    let mut lines = vec![root, line("eBPF object", object()), line("BTF", btf())];
    if is_root {
        lines.push(line("BPF", bpf_syscall()));
        lines.push(line("tracefs/bpffs", filesystems()));
        for hook in &layout::HOOKS {
            lines.push(line("tracepoint", tracepoint(hook)));
        }
        lines.push(line("SOCK_DESTROY", sock_destroy()));
        lines.push(line("namespaces", namespaces()));
    } else {
        for what in [
            "BPF",
            "tracefs/bpffs",
            "tracepoint",
            "SOCK_DESTROY",
            "namespaces",
        ] {
            lines.push(Line {
                ok: false,
                what,
                detail: "not checked: needs root".into(),
            });
        }
    }
    for l in &lines {
        println!(
            "{:<4} {:<14} {}",
            if l.ok { "ok" } else { "FAIL" },
            l.what,
            l.detail
        );
    }
    lines.iter().all(|l| l.ok)
}
