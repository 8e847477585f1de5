//! The sock_diag wire format as connwatch uses it: the socket a reply describes, the
//! `tcp_info` timers it carries, the errors a destroy can meet, and the socket id a
//! request names.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};
use netlink_packet_sock_diag::inet::{nlas::Nla, InetResponse, SocketId};

use crate::conn::{TcpState, Tuple};

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Local and remote endpoints; `local` is the kernel's "source".
    pub tuple: Tuple,
    pub state: TcpState,
    /// The kernel's socket cookie (`sock_gen_cookie`), in the bytes the kernel sent. It
    /// distinguishes this socket from a later one that reuses the same tuple.
    pub cookie: [u8; 8],
    /// Inode of the socket file; 0 for sockets no process holds (`TIME_WAIT`, orphans).
    pub inode: u32,
    pub uid: u32,
    /// The device the socket is bound to (`sk_bound_dev_if`), 0 if none. Exact lookups match
    /// on it, so it is handed back unchanged when destroying.
    pub ifindex: u32,
    /// The data timers of `tcp_info`, where it was asked for and sent.
    pub activity: Option<TcpActivity>,
}

/// How long ago the socket last sent and received data, from the kernel's `tcp_info`
/// (`tcpi_last_data_sent`, `tcpi_last_data_recv`, in milliseconds). Both start at the
/// connection's establishment, and neither moves for keepalives or pure ACKs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpActivity {
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
}

impl TcpActivity {
    /// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h), stable ABI.
    const LAST_DATA_SENT: usize = 44;
    const LAST_DATA_RECV: usize = 52;

    pub fn parse(tcp_info: &[u8]) -> Option<TcpActivity> {
        let at = |off: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(
                tcp_info.get(off..off + 4)?.try_into().ok()?,
            ))
        };
        Some(TcpActivity {
            last_data_sent_ms: at(Self::LAST_DATA_SENT)?,
            last_data_recv_ms: at(Self::LAST_DATA_RECV)?,
        })
    }

    /// Milliseconds since data last moved in either direction.
    pub fn quiet_ms(&self) -> u32 {
        self.last_data_sent_ms.min(self.last_data_recv_ms)
    }
}

impl DiagSocket {
    pub(super) fn from_response(response: &InetResponse) -> DiagSocket {
        let id = &response.header.socket_id;
        // The crate decodes AF_INET replies into `IpAddr::V4` and AF_INET6 ones into
        // `IpAddr::V6` (v4-mapped addresses included, as the kernel reports them), so the
        // tuple's family is the socket's own family with no conversion here.
        DiagSocket {
            tuple: Tuple::new(
                SocketAddr::new(id.source_address, id.source_port),
                SocketAddr::new(id.destination_address, id.destination_port),
            ),
            state: TcpState(u32::from(response.header.state)),
            cookie: id.cookie,
            inode: response.header.inode,
            uid: response.header.uid,
            ifindex: id.interface_id,
            activity: response.nlas.iter().find_map(|nla| match nla {
                Nla::TcpInfo(raw) => TcpActivity::parse(raw),
                _ => None,
            }),
        }
    }
}

/// Why a destroy did not happen.
#[derive(Debug)]
pub enum DestroyError {
    /// `ENOENT`: no socket with that tuple and cookie (closed, or the tuple was reused).
    Gone,
    /// `EOPNOTSUPP`: the kernel cannot destroy this socket (no `CONFIG_INET_DIAG_DESTROY`, or
    /// a state it refuses to abort).
    NotSupported,
    /// `EPERM`/`EACCES`: the caller lacks `CAP_NET_ADMIN` in the socket's network namespace.
    PermissionDenied,
    /// Anything else, including failures to talk to the kernel at all.
    Other(io::Error),
}

impl DestroyError {
    pub(super) fn from_errno(errno: i32) -> DestroyError {
        match errno {
            libc::ENOENT => DestroyError::Gone,
            libc::EOPNOTSUPP => DestroyError::NotSupported,
            libc::EPERM | libc::EACCES => DestroyError::PermissionDenied,
            _ => DestroyError::Other(io::Error::from_raw_os_error(errno)),
        }
    }
}

impl fmt::Display for DestroyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestroyError::Gone => f.write_str("gone"),
            DestroyError::NotSupported => f.write_str("not supported by the kernel"),
            DestroyError::PermissionDenied => f.write_str("permission denied"),
            DestroyError::Other(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl std::error::Error for DestroyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DestroyError::Other(e) => Some(e),
            _ => None,
        }
    }
}

/// The request's socket id for `tuple`: local is the kernel's source, remote its destination.
pub(super) fn socket_id(
    tuple: &Tuple,
    interface: u32,
    cookie: [u8; 8],
) -> io::Result<(u8, SocketId)> {
    let family = match (tuple.local, tuple.remote) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tuple {tuple} mixes IPv4 and IPv6"),
            ))
        }
    };
    let id = SocketId {
        source_port: tuple.local.port(),
        destination_port: tuple.remote.port(),
        source_address: tuple.local.ip(),
        destination_address: tuple.remote.ip(),
        interface_id: interface,
        cookie,
    };
    Ok((family, id))
}

/// Whether two tuples name the same endpoints, ignoring IPv6 scope ids (the kernel's replies
/// carry the interface separately, in `ifindex`).
pub(super) fn same_endpoints(a: &Tuple, b: &Tuple) -> bool {
    let key = |t: &Tuple| (t.local.ip(), t.local.port(), t.remote.ip(), t.remote.port());
    key(a) == key(b)
}

pub(super) fn invalid_data(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}
