//! `connwatch check`: a preflight, one line per thing connwatch needs.

use std::net::{TcpListener, TcpStream};
use std::path::Path;

use anyhow::{bail, Result};

use crate::conn::Tuple;
use crate::diag::{DestroyError, SockDiag};
use crate::loader;

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
                 // SAFETY: BPF_MAP_CREATE (0) reads a bpf_attr of the given size from a valid buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        bail!(
            "bpf() refused to create a map: {}",
            std::io::Error::last_os_error()
        );
    }
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
    loader::ensure_filesystems()?;
    Ok(format!(
        "tracefs at {}, bpffs at {}",
        loader::TRACEFS,
        loader::BPFFS
    ))
}

fn tracepoint(hook: &loader::Hook) -> Result<String> {
    loader::check_hook(hook)?;
    Ok(format!(
        "{}:{} present, layout as expected",
        hook.category, hook.name
    ))
}

fn object() -> Result<String> {
    Ok(format!("embedded, {} bytes", loader::object()?.len()))
}

/// What the kernel says of `SOCK_DESTROY`, found by destroying a loopback connection
/// of our own: the only honest proof it works.
#[derive(Debug, PartialEq, Eq)]
pub enum DestroySupport {
    Works,
    /// `EOPNOTSUPP`: a kernel without `CONFIG_INET_DIAG_DESTROY`.
    NotSupported,
    /// `EPERM`: this process lacks CAP_NET_ADMIN.
    NoPermission,
    /// The probe itself could not run (no loopback, sock_diag refused, ...).
    Unknown(String),
}

impl DestroySupport {
    pub fn of(result: Result<(), DestroyError>) -> DestroySupport {
        match result {
            Ok(()) => DestroySupport::Works,
            Err(DestroyError::NotSupported) => DestroySupport::NotSupported,
            Err(DestroyError::PermissionDenied) => DestroySupport::NoPermission,
            Err(e) => {
                DestroySupport::Unknown(format!("SOCK_DESTROY failed on a test connection: {e}"))
            }
        }
    }

    /// One sentence: what works and what does not.
    pub fn describe(&self) -> String {
        const STILL: &str = "connwatch can still observe and list (`connwatch run` without --enforce logs every decision, `connwatch list`, `connwatch explain`), but every destroy will fail (each logged once and counted, never retried in a loop)";
        match self {
            DestroySupport::Works => "destroyed a test connection on loopback".into(),
            DestroySupport::NotSupported => format!(
                "this kernel cannot destroy sockets (SOCK_DESTROY: not supported; it needs CONFIG_INET_DIAG_DESTROY=y): {STILL}"
            ),
            DestroySupport::NoPermission => format!(
                "SOCK_DESTROY was refused: no CAP_NET_ADMIN: {STILL}"
            ),
            DestroySupport::Unknown(why) => format!("{why}: whether destroys work is unknown"),
        }
    }
}

/// Tries SOCK_DESTROY on a loopback connection of our own.
pub fn probe_destroy() -> DestroySupport {
    let attempt = || -> Result<Result<(), DestroyError>> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (_server, _) = listener.accept()?;
        let tuple = Tuple::new(client.local_addr()?, client.peer_addr()?);
        let mut diag = SockDiag::open()?;
        let Some(sock) = diag.get(&tuple)? else {
            bail!("sock_diag cannot find a fresh loopback connection");
        };
        Ok(diag.destroy(&sock))
    };
    match attempt() {
        Ok(result) => DestroySupport::of(result),
        Err(e) => DestroySupport::Unknown(format!("cannot try SOCK_DESTROY: {e:#}")),
    }
}

fn sock_destroy() -> Result<String> {
    match probe_destroy() {
        DestroySupport::Works => Ok(DestroySupport::Works.describe()),
        other => bail!("{}", other.describe()),
    }
}

/// Prints one line per check; returns whether everything needed is there.
pub fn run() -> bool {
    let root = line("privileges", root());
    let is_root = root.ok;
    let mut lines = vec![root, line("eBPF object", object()), line("BTF", btf())];
    if is_root {
        lines.push(line("BPF", bpf_syscall()));
        lines.push(line("tracefs/bpffs", filesystems()));
        for hook in &loader::HOOKS {
            let mut l = line("tracepoint", tracepoint(hook));
            if !l.ok && !hook.required {
                // Optional: connwatch works without it, learning less.
                l.ok = true;
                l.detail = format!(
                    "{} (optional: activity and owners come from sock_diag instead)",
                    l.detail
                );
            }
            lines.push(l);
        }
        lines.push(line("SOCK_DESTROY", sock_destroy()));
    } else {
        for what in ["BPF", "tracefs/bpffs", "tracepoint", "SOCK_DESTROY"] {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_sock_destroy_is_reported_with_what_still_works() {
        let s = DestroySupport::of(Err(DestroyError::NotSupported));
        assert_eq!(s, DestroySupport::NotSupported);
        let text = s.describe();
        for want in [
            "cannot destroy",
            "CONFIG_INET_DIAG_DESTROY",
            "observe and list",
            "connwatch list",
            "never retried",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        let s = DestroySupport::of(Err(DestroyError::PermissionDenied));
        assert!(s.describe().contains("CAP_NET_ADMIN"), "{}", s.describe());
        assert_eq!(DestroySupport::of(Ok(())), DestroySupport::Works);
        let other = DestroySupport::of(Err(DestroyError::Other(
            std::io::Error::from_raw_os_error(libc::EBUSY),
        )));
        assert!(matches!(other, DestroySupport::Unknown(_)), "{other:?}");
    }
}
