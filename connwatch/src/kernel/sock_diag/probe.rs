//! Whether `SOCK_DESTROY` works here, found by destroying a loopback connection of
//! our own: the only honest proof.

use std::net::{TcpListener, TcpStream};

use anyhow::{bail, Result};

use super::{DestroyError, SockDiag};
use crate::conn::Tuple;

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
