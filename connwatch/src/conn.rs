//! The vocabulary of connections: TCP states, address tuples, owners and births.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use connwatch_common::{tcp_state, ConnInfo, AF_INET, AF_INET6, FLAG_INBOUND, FLAG_OUTBOUND};

/// A kernel TCP state (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpState(pub u32);

impl TcpState {
    pub const ESTABLISHED: TcpState = TcpState(tcp_state::ESTABLISHED);
    pub const SYN_SENT: TcpState = TcpState(tcp_state::SYN_SENT);
    pub const SYN_RECV: TcpState = TcpState(tcp_state::SYN_RECV);
    pub const FIN_WAIT1: TcpState = TcpState(tcp_state::FIN_WAIT1);
    pub const FIN_WAIT2: TcpState = TcpState(tcp_state::FIN_WAIT2);
    pub const TIME_WAIT: TcpState = TcpState(tcp_state::TIME_WAIT);
    pub const CLOSE: TcpState = TcpState(tcp_state::CLOSE);
    pub const CLOSE_WAIT: TcpState = TcpState(tcp_state::CLOSE_WAIT);
    pub const LAST_ACK: TcpState = TcpState(tcp_state::LAST_ACK);
    pub const LISTEN: TcpState = TcpState(tcp_state::LISTEN);
    pub const CLOSING: TcpState = TcpState(tcp_state::CLOSING);
    pub const NEW_SYN_RECV: TcpState = TcpState(tcp_state::NEW_SYN_RECV);

    const NAMES: [(TcpState, &'static str); 12] = [
        (Self::ESTABLISHED, "ESTABLISHED"),
        (Self::SYN_SENT, "SYN_SENT"),
        (Self::SYN_RECV, "SYN_RECV"),
        (Self::FIN_WAIT1, "FIN_WAIT1"),
        (Self::FIN_WAIT2, "FIN_WAIT2"),
        (Self::TIME_WAIT, "TIME_WAIT"),
        (Self::CLOSE, "CLOSE"),
        (Self::CLOSE_WAIT, "CLOSE_WAIT"),
        (Self::LAST_ACK, "LAST_ACK"),
        (Self::LISTEN, "LISTEN"),
        (Self::CLOSING, "CLOSING"),
        (Self::NEW_SYN_RECV, "NEW_SYN_RECV"),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("UNKNOWN", |(_, n)| n)
    }

    /// Parses `CLOSE_WAIT`, `close-wait` or `close_wait`.
    pub fn parse(text: &str) -> Option<TcpState> {
        let norm = text.trim().to_ascii_uppercase().replace('-', "_");
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == norm)
            .map(|(s, _)| *s)
    }

    /// States a policy may never act on: a socket still opening, or a listener.
    pub fn is_opening_or_listening(self) -> bool {
        matches!(
            self,
            Self::LISTEN | Self::SYN_SENT | Self::SYN_RECV | Self::NEW_SYN_RECV
        )
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A connection's local and remote endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Tuple {
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        Tuple { local, remote }
    }

    /// The tuple a map entry records; `None` for a family connwatch does not track.
    pub fn from_info(info: &ConnInfo) -> Option<Tuple> {
        let ip = |raw: &[u8; 16]| -> Option<IpAddr> {
            match info.family {
                AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
                AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
                _ => None,
            }
        };
        Some(Tuple {
            local: SocketAddr::new(ip(&info.saddr)?, info.sport),
            remote: SocketAddr::new(ip(&info.daddr)?, info.dport),
        })
    }

    pub fn is_ipv6(&self) -> bool {
        self.local.is_ipv6()
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.local, self.remote) {
            // Every audit and intent line names tuples, thousands in a mass round:
            // IPv4 is written by hand, a good deal faster than std's formatting.
            (SocketAddr::V4(l), SocketAddr::V4(r)) => {
                let mut buf = [0u8; 2 * V4_MAX + 4];
                let mut n = write_v4(&mut buf, l);
                buf[n..n + 4].copy_from_slice(b" -> ");
                n += 4;
                n += write_v4(&mut buf[n..], r);
                f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
            }
            _ => write!(f, "{} -> {}", self.local, self.remote),
        }
    }
}

/// The longest IPv4 socket address, `255.255.255.255:65535`.
const V4_MAX: usize = 21;

/// Writes `a.b.c.d:port` at the start of `out`; returns its length.
fn write_v4(out: &mut [u8], addr: std::net::SocketAddrV4) -> usize {
    let mut n = 0;
    for (i, octet) in addr.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        n += write_decimal(&mut out[n..], u32::from(octet));
    }
    out[n] = b':';
    n + 1 + write_decimal(&mut out[n + 1..], u32::from(addr.port()))
}

/// Writes `v` in decimal at the start of `out`; returns its length.
fn write_decimal(out: &mut [u8], mut v: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for (o, d) in out.iter_mut().zip(digits[..len].iter().rev()) {
        *o = *d;
    }
    len
}

/// Which side opened a connection: a peer connected to us (an accepted child), or we
/// connected out. Listeners have neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    /// From the map entry's flags, as the kernel program set them at birth.
    pub fn from_flags(flags: u32) -> Option<Direction> {
        if flags & FLAG_INBOUND != 0 {
            Some(Direction::In)
        } else if flags & FLAG_OUTBOUND != 0 {
            Some(Direction::Out)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    /// Parses `in` or `out` (`inbound`, `outbound` too).
    pub fn parse(text: &str) -> Result<Direction, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "in" | "inbound" => Ok(Direction::In),
            "out" | "outbound" => Ok(Direction::Out),
            _ => Err(format!(
                "'{text}' is not a direction: in (accepted from a peer) or out (connected out)"
            )),
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A socket's identity, as the kernel recorded it: its cookie (never reused while the
/// system runs) and its network namespace. A tuple is not an identity: it repeats
/// across namespaces and is reused over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockId {
    /// The inode of the socket's network namespace.
    pub netns: u32,
    pub cookie: u64,
}

impl SockId {
    pub fn new(netns: u32, cookie: u64) -> Self {
        SockId { netns, cookie }
    }
}

impl fmt::Display for SockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netns {} cookie {:#x}", self.netns, self.cookie)
    }
}

/// The cookie as sock_diag carries it (`idiag_cookie`: two 32-bit words, low first,
/// each in host order) and as a number.
pub fn cookie_from_diag(bytes: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let hi = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// The inverse of [`cookie_from_diag`].
pub fn cookie_to_diag(cookie: u64) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    out[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    out
}

/// An address as policies compare it: an IPv4-mapped IPv6 address (a dual-stack
/// socket talking IPv4) is the IPv4 address it carries.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The owner of a socket: the process that last used it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: [u8; 16],
}

impl Owner {
    pub fn new(pid: u32, name: &str) -> Owner {
        let mut comm = [0u8; 16];
        let n = name.len().min(15);
        comm[..n].copy_from_slice(&name.as_bytes()[..n]);
        Owner { pid, comm }
    }

    pub fn name(&self) -> &str {
        let end = self.comm.iter().position(|b| *b == 0).unwrap_or(16);
        std::str::from_utf8(&self.comm[..end]).unwrap_or("?")
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.pid)
    }
}

/// What is known of a socket's birth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Birth {
    /// Born at this monotonic time, seen by the kernel program.
    Known(u64),
    /// Existed before connwatch saw it, first seen at this time: it is at least this old.
    Unknown { seen_ns: u64 },
}

impl Birth {
    /// The latest time the socket can have been born: exact when known, a bound otherwise.
    pub fn no_later_than(self) -> u64 {
        match self {
            Birth::Known(ns) | Birth::Unknown { seen_ns: ns } => ns,
        }
    }

    pub fn is_known(self) -> bool {
        matches!(self, Birth::Known(_))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv4_tuples_read_as_std_writes_them() {
        use proptest::prelude::*;
        proptest!(|(a in any::<u32>(), p in any::<u16>(), b in any::<u32>(), q in any::<u16>())| {
            let l = SocketAddr::from((Ipv4Addr::from(a), p));
            let r = SocketAddr::from((Ipv4Addr::from(b), q));
            prop_assert_eq!(Tuple::new(l, r).to_string(), format!("{l} -> {r}"));
        });
        let widest = SocketAddr::from((Ipv4Addr::BROADCAST, u16::MAX));
        let zero = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(
            Tuple::new(widest, zero).to_string(),
            "255.255.255.255:65535 -> 0.0.0.0:0"
        );
    }

    use super::*;

    #[test]
    fn state_names_parse_in_both_spellings() {
        assert_eq!(TcpState::parse("close-wait"), Some(TcpState::CLOSE_WAIT));
        assert_eq!(TcpState::parse("CLOSE_WAIT"), Some(TcpState::CLOSE_WAIT));
        assert_eq!(TcpState::parse("fin_wait2"), Some(TcpState::FIN_WAIT2));
        assert_eq!(TcpState::parse("open"), None);
        assert_eq!(TcpState(99).name(), "UNKNOWN");
    }

    #[test]
    fn tuple_from_map_entry() {
        let mut info = ConnInfo::zeroed();
        info.family = AF_INET;
        info.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        info.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        info.sport = 8080;
        info.dport = 50000;
        let t = Tuple::from_info(&info).unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:8080 -> 10.1.2.3:50000");
        info.family = AF_INET6;
        info.saddr = Ipv6Addr::LOCALHOST.octets();
        info.daddr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(
            Tuple::from_info(&info).unwrap().to_string(),
            "[::1]:8080 -> [::1]:50000"
        );
        info.family = 1;
        assert!(Tuple::from_info(&info).is_none());
    }

    #[test]
    fn owner_names_are_kernel_comms() {
        let o = Owner::new(42, "a-very-long-process-name");
        assert_eq!(o.name(), "a-very-long-pro");
        assert_eq!(o.to_string(), "a-very-long-pro(42)");
    }

    #[test]
    fn cookies_convert_both_ways() {
        for c in [0u64, 1, 0x1234_5678_9abc_def0, u64::MAX] {
            assert_eq!(cookie_from_diag(cookie_to_diag(c)), c);
        }
        let low_first = cookie_to_diag(0x0000_0002_0000_0001);
        assert_eq!(u32::from_ne_bytes(low_first[..4].try_into().unwrap()), 1);
    }
}
