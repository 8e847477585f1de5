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
    /// The traffic counters of `tcp_info`, where it was asked for and the kernel's is
    /// long enough to hold them.
    pub traffic: Option<TcpTraffic>,
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

/// What a connection carried, from the kernel's `tcp_info`: data bytes received
/// (`tcpi_bytes_received`) and sent (`tcpi_bytes_sent` less `tcpi_bytes_retrans`: each
/// byte once; on kernels before 4.19, which lack those, `tcpi_bytes_acked`, which also
/// counts the connecting end's SYN and an acknowledged FIN), segments
/// each way (`tcpi_segs_in`, `tcpi_segs_out`, headers-only ones included) and segments
/// retransmitted (`tcpi_total_retrans`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTraffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    pub retrans: u32,
}

impl TcpTraffic {
    /// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h), stable ABI. The byte
    /// counters came in Linux 4.1, the segment counters in 4.2: an older kernel sends a
    /// shorter `tcp_info`, and then there are none.
    const TOTAL_RETRANS: usize = 100;
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    const SEGS_OUT: usize = 136;
    const SEGS_IN: usize = 140;
    /// Linux 4.19.
    const BYTES_SENT: usize = 200;
    const BYTES_RETRANS: usize = 208;

    pub fn parse(tcp_info: &[u8]) -> Option<TcpTraffic> {
        let u32_at = |off: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(
                tcp_info.get(off..off + 4)?.try_into().ok()?,
            ))
        };
        let u64_at = |off: usize| -> Option<u64> {
            Some(u64::from_ne_bytes(
                tcp_info.get(off..off + 8)?.try_into().ok()?,
            ))
        };
        let sent = u64_at(Self::BYTES_SENT)
            .zip(u64_at(Self::BYTES_RETRANS))
            .map(|(sent, again)| sent.saturating_sub(again));
        Some(TcpTraffic {
            bytes_in: u64_at(Self::BYTES_RECEIVED)?,
            bytes_out: match sent {
                Some(n) => n,
                None => u64_at(Self::BYTES_ACKED)?,
            },
            segs_in: u32_at(Self::SEGS_IN)?,
            segs_out: u32_at(Self::SEGS_OUT)?,
            retrans: u32_at(Self::TOTAL_RETRANS)?,
        })
    }

    /// Bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.bytes_in.saturating_add(self.bytes_out)
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
            traffic: response.nlas.iter().find_map(|nla| match nla {
                Nla::TcpInfo(raw) => TcpTraffic::parse(raw),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters sit where include/uapi/linux/tcp.h puts them; a `tcp_info` of a
    /// kernel older than 4.2 (104 bytes, without them) gives none. Bytes sent are
    /// `bytes_sent - bytes_retrans` (5100 - 100 here), not the bytes acknowledged.
    #[test]
    fn traffic_is_read_at_the_abi_offsets_and_only_where_sent() {
        let mut info = vec![0u8; 232];
        info[200..208].copy_from_slice(&5100u64.to_ne_bytes());
        info[208..216].copy_from_slice(&100u64.to_ne_bytes());
        info[100..104].copy_from_slice(&3u32.to_ne_bytes());
        info[120..128].copy_from_slice(&5000u64.to_ne_bytes());
        info[128..136].copy_from_slice(&7000u64.to_ne_bytes());
        info[136..140].copy_from_slice(&11u32.to_ne_bytes());
        info[140..144].copy_from_slice(&13u32.to_ne_bytes());
        let t = TcpTraffic::parse(&info).unwrap();
        assert_eq!(
            t,
            TcpTraffic {
                bytes_in: 7000,
                bytes_out: 5000,
                segs_in: 13,
                segs_out: 11,
                retrans: 3,
            }
        );
        assert_eq!(t.bytes(), 12000);
        // Before 4.19 (a 192-byte tcp_info): the bytes acknowledged.
        info[120..128].copy_from_slice(&5001u64.to_ne_bytes());
        assert_eq!(TcpTraffic::parse(&info[..192]).unwrap().bytes_out, 5001);
        assert_eq!(TcpTraffic::parse(&info[..143]), None);
        assert_eq!(TcpTraffic::parse(&info[..104]), None);
        assert!(TcpActivity::parse(&info[..104]).is_some());
    }
}
