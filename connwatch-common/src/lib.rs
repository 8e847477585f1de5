//! Types and constants shared by the eBPF programs and the userspace daemon.
//!
//! Everything here is `#[repr(C)]`, free of padding, and read by both sides of the
//! kernel boundary, so a field added here changes the pinned map layout: bump
//! [`LAYOUT_VERSION`] when that happens.
#![no_std]

/// Bumped whenever [`ConnInfo`] or [`ConnEvent`] change shape; part of the pin path so a
/// new daemon never reads an old map with the wrong layout.
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the maps, as the eBPF object declares them and bpffs pins them.
pub const MAP_CONNS: &str = "CW_CONNS";
pub const MAP_EVENTS: &str = "CW_EVENTS";
pub const MAP_STATS: &str = "CW_STATS";

/// Default capacity of the connection map; the daemon may size it at load time.
pub const DEFAULT_MAX_CONNS: u32 = 262_144;
/// Default size of the lifecycle ring buffer in bytes (a power of two, page aligned).
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Kernel TCP states, as `include/net/tcp_states.h` numbers them.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

/// Field offsets of the `sock:inet_sock_set_state` tracepoint record (kernel 5.6+, where
/// `protocol` is a u16). The daemon checks them against the tracepoint's format file
/// before it loads the program, so a kernel that moved them is refused, not misread.
pub mod set_state_offsets {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 36;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;
}

/// Field offsets of `tcp:tcp_probe` (every segment reaching an established socket;
/// `skaddr` since about 6.9), checked against the format file like the ones above.
pub mod probe_offsets {
    pub const DATA_LEN: usize = 76;
    pub const SKADDR: usize = 128;
}

/// Field offsets of `sock:sock_send_length` and `sock:sock_recv_length` (6.3+); they
/// fire in the calling process, which is how the owner of a socket is learned.
pub mod length_offsets {
    pub const SK: usize = 8;
    pub const PROTOCOL: usize = 18;
    pub const RET: usize = 20;
}

/// Activity is stamped at most once per granule: the data path pays a map lookup and,
/// once a second, a store.
pub const ACTIVITY_GRANULE_NS: u64 = 1_000_000_000;

/// `ConnInfo::flags`: the socket existed before connwatch saw it, so its birth is unknown.
pub const FLAG_BIRTH_UNKNOWN: u32 = 1;

/// One tracked TCP socket: the value of the connection map, keyed by the kernel's socket
/// address. Times are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// When the socket was born (connect or accept); 0 with `FLAG_BIRTH_UNKNOWN`.
    pub birth_ns: u64,
    /// When this map entry was created: the generation that tells a reused socket
    /// address (same key, new socket) from the socket a decision was made about.
    pub seen_ns: u64,
    /// When the current state began.
    pub state_since_ns: u64,
    /// Last time data was received / sent; 0 when none was seen. Kept coarse.
    pub last_rx_ns: u64,
    pub last_tx_ns: u64,
    /// Local and remote address; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Local and remote port, host byte order.
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad0: u16,
    pub state: u32,
    pub flags: u32,
    /// Owning process where known (0 = unknown), and its command name.
    pub pid: u32,
    pub _pad1: u32,
    pub comm: [u8; 16],
}

impl ConnInfo {
    pub const fn zeroed() -> Self {
        ConnInfo {
            birth_ns: 0,
            seen_ns: 0,
            state_since_ns: 0,
            last_rx_ns: 0,
            last_tx_ns: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            family: 0,
            _pad0: 0,
            state: 0,
            flags: 0,
            pid: 0,
            _pad1: 0,
            comm: [0; 16],
        }
    }
}

/// What happened to a socket, as reported through the ring buffer.
pub mod event_kind {
    /// A new socket (connect, listen or accept): its birth is now.
    pub const OPENED: u32 = 1;
    /// A socket connwatch had not seen changed state: it predates the program.
    pub const DISCOVERED: u32 = 2;
    /// A tracked socket changed state.
    pub const STATE: u32 = 3;
    /// The socket reached CLOSE and left the map.
    pub const CLOSED: u32 = 4;
}

/// A lifecycle event: the socket's key, what happened, and its entry after the change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    pub key: u64,
    pub kind: u32,
    pub oldstate: u32,
    pub info: ConnInfo,
}

/// Indexes of the per-CPU statistics array.
pub mod stat {
    /// State changes of TCP sockets seen.
    pub const EVENTS: u32 = 0;
    /// A new socket could not be recorded: the connection map was full.
    pub const MAP_FULL: u32 = 1;
    /// An event could not be sent: the ring buffer was full.
    pub const RING_FULL: u32 = 2;
    pub const COUNT: u32 = 3;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and there is no hidden padding.
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::ConnEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<ConnInfo>(), 5 * 8 + 32 + 4 * 2 + 4 * 4 + 16);
        assert_eq!(size_of::<ConnEvent>(), 8 + 4 + 4 + size_of::<ConnInfo>());
    }
}
