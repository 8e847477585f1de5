//! Types and constants shared by the eBPF programs and the userspace daemon.
//!
//! Everything here is `#[repr(C)]`, free of padding, and read by both sides of the
//! kernel boundary, so a field added here changes the pinned map layout: bump
//! [`LAYOUT_VERSION`] when that happens.
#![no_std]

/// Bumped whenever [`ConnEntry`] or [`EntryEvent`] change shape; part of the pin path so
/// a new daemon never reads an old map with the wrong layout.
pub const LAYOUT_VERSION: u32 = 5;

/// Names of the maps, as the eBPF object declares them and bpffs pins them.
pub const MAP_CONNS: &str = "CW_CONNS";
pub const MAP_EVENTS: &str = "CW_EVENTS";
pub const MAP_STATS: &str = "CW_STATS";
pub const MAP_LISTENERS: &str = "CW_LISTENERS";
/// The addresses of IPv6 sockets (`[local, remote]`, 32 bytes) by the connection map's
/// key, for the entries flagged [`FLAG_ADDRS6`]: kept apart so that an entry fits the
/// kernel's 128-byte allocation.
pub const MAP_ADDRS6: &str = "CW_ADDRS6";

/// Capacity of the listener map (one entry per listening port and network namespace;
/// allocated as used).
pub const MAX_LISTENERS: u32 = 65_536;

/// Where builds before this one pinned the first sighting of each socket older than
/// connwatch (a hash `[cookie, netns inode]` -> `CLOCK_MONOTONIC` ns that no program
/// read). The daemon now keeps them in a file; it takes over this map once, if it
/// finds it, and removes its pin.
pub const MAP_FIRST_SEEN: &str = "CW_FIRST_SEEN";

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
/// `protocol` is a u16). The set-state program no longer reads the record (it is a
/// BTF-typed tracepoint on the same event, reading `struct sock` itself); these stay for
/// tools that read the classic record and for the daemon's format check.
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

/// Names of the read-only globals through which the daemon hands the set-state program
/// the running kernel's struct layout, read from its BTF at load time (the program has
/// no CO-RE). Every offset is in bytes from the start of `struct sock`, except
/// [`NET_INUM`], which is from the start of `struct net`. The program does nothing
/// until [`READY`] is set to 1, so an object loaded without them records nothing
/// rather than garbage.
pub mod sock_globals {
    /// `u32`, 1 once the offsets below are set.
    pub const READY: &str = "CW_BTF_READY";
    /// `sock.__sk_common.skc_daddr` (`__be32`).
    pub const DADDR: &str = "CW_OFF_SKC_DADDR";
    /// `sock.__sk_common.skc_rcv_saddr` (`__be32`).
    pub const RCV_SADDR: &str = "CW_OFF_SKC_RCV_SADDR";
    /// `sock.__sk_common.skc_dport` (`__be16`, network order).
    pub const DPORT: &str = "CW_OFF_SKC_DPORT";
    /// `sock.__sk_common.skc_num` (`u16`, host order).
    pub const NUM: &str = "CW_OFF_SKC_NUM";
    /// `sock.__sk_common.skc_family` (`u16`).
    pub const FAMILY: &str = "CW_OFF_SKC_FAMILY";
    /// `sock.__sk_common.skc_bound_dev_if` (`int`).
    pub const BOUND_DEV_IF: &str = "CW_OFF_SKC_BOUND_DEV_IF";
    /// `sock.__sk_common.skc_net.net` (`struct net *`).
    pub const NET: &str = "CW_OFF_SKC_NET";
    /// `sock.__sk_common.skc_v6_daddr` (`struct in6_addr`).
    pub const V6_DADDR: &str = "CW_OFF_SKC_V6_DADDR";
    /// `sock.__sk_common.skc_v6_rcv_saddr` (`struct in6_addr`).
    pub const V6_RCV_SADDR: &str = "CW_OFF_SKC_V6_RCV_SADDR";
    /// `sock.sk_protocol` (`u16`; a bitfield before 5.6, which is refused).
    pub const PROTOCOL: &str = "CW_OFF_SK_PROTOCOL";
    /// `net.ns.inum` (`unsigned int`), from the start of `struct net`.
    pub const NET_INUM: &str = "CW_OFF_NET_INUM";

    /// `u32`, not an offset: 0 (the default) lets the ring buffer wake its reader for
    /// every event it finds the reader waiting for; N > 0 wakes the reader only when the
    /// unread data crosses N bytes (far fewer self-interrupts under churn), in which case
    /// the reader must also drain on a timer.
    pub const RB_WAKEUP_BYTES: &str = "CW_RB_WAKEUP_BYTES";

    /// Every offset global ([`READY`] and [`RB_WAKEUP_BYTES`] excluded).
    pub const OFFSETS: [&str; 11] = [
        DADDR,
        RCV_SADDR,
        DPORT,
        NUM,
        FAMILY,
        BOUND_DEV_IF,
        NET,
        V6_DADDR,
        V6_RCV_SADDR,
        PROTOCOL,
        NET_INUM,
    ];
}

/// The set-state program: a BTF-typed tracepoint (`tp_btf/inet_sock_set_state`, args
/// `const struct sock *sk, int oldstate, int newstate`), attached as
/// `aya::programs::BtfTracePoint` with `load(SET_STATE_BTF_TRACEPOINT, &btf)`.
pub const SET_STATE_PROGRAM: &str = "inet_sock_set_state";
pub const SET_STATE_BTF_TRACEPOINT: &str = "inet_sock_set_state";

/// `ConnInfo::flags`: the socket existed before connwatch saw it, so its birth is unknown.
pub const FLAG_BIRTH_UNKNOWN: u32 = 1;
/// `ConnInfo::flags`: an accepted child (born entering SYN_RECV, or first seen leaving it).
pub const FLAG_INBOUND: u32 = 2;
/// `ConnInfo::flags`: a connect()ed socket (CLOSE -> SYN_SENT, or first seen leaving
/// SYN_SENT). Listeners carry neither direction flag.
pub const FLAG_OUTBOUND: u32 = 4;
/// `ConnInfo::flags`: an accepted socket whose owner fields are its listener's (the
/// process that called listen() on that port), not necessarily the process holding it:
/// shown to users, never trusted to protect it.
pub const FLAG_OWNER_LISTENER: u32 = 8;
/// `ConnEntry::flags`: an IPv6 socket whose addresses are not both IPv4-mapped: they are
/// in [`MAP_ADDRS6`] under the entry's key, not in the entry.
pub const FLAG_ADDRS6: u32 = 16;

/// Key of the listener map: a listening port in a network namespace.
#[inline(always)]
pub const fn listener_key(netns: u32, port: u16) -> u64 {
    ((netns as u64) << 16) | port as u64
}

/// Who listens on a port: written when a socket enters LISTEN (in the caller of
/// listen()), removed when that socket leaves it. Accepted sockets are born in softirq,
/// where the current task is unrelated; they take their listener's owner from here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenOwner {
    /// The listening socket's cookie: only its own close removes the entry.
    pub cookie: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub _pad: u32,
}

/// One tracked TCP socket as the kernel keeps it: the value of the connection map, keyed
/// by the kernel's socket address (stable for the socket's life, reused after it). The
/// socket's identity is (`cookie`, `netns`): the cookie is the one sock_diag reports
/// (`idiag_cookie`, and `ss -e` as `sk:`), the namespace is the inode of its network
/// namespace. Times are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
///
/// 64 bytes, so that with the hash table's own header each element is one 128-byte
/// allocation: an IPv6 socket's addresses live in [`MAP_ADDRS6`] ([`FLAG_ADDRS6`]), and
/// the owner's name is read from `/proc` when shown. Userspace reads it as a
/// [`ConnInfo`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEntry {
    /// When the socket was born (connect, listen or accept); with `FLAG_BIRTH_UNKNOWN`,
    /// when the program first saw it. Either way when the entry was made: the
    /// generation that tells a reused socket address from an earlier socket.
    pub first_ns: u64,
    /// When the current state began.
    pub state_since_ns: u64,
    /// As [`ConnInfo::cookie`]; 0 while an accepted child's identity is pending.
    pub cookie: u64,
    /// The owning process's cgroup v2 id where the owner was learned; 0 = unknown.
    pub cgroup_id: u64,
    /// Local and remote IPv4 address (or the IPv4 address an IPv4-mapped IPv6 one
    /// carries); zero with `FLAG_ADDRS6`.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Local and remote port, host byte order.
    pub sport: u16,
    pub dport: u16,
    pub netns: u32,
    pub pid: u32,
    pub bound_dev_if: u32,
    pub family: u16,
    pub state: u8,
    /// The `FLAG_*` bits (all below 256).
    pub flags: u8,
    pub _pad: u32,
}

/// `::ffff:0:0/96`, the prefix of an IPv4-mapped IPv6 address.
const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// The IPv4 address an IPv4-mapped IPv6 address carries (in network order, as bytes),
/// given as two native-endian words, as the kernel program reads it; None for any other
/// address. Word compares: a byte slice compare would be a call on the BPF target.
#[inline(always)]
pub fn v4_mapped(words: [u64; 2]) -> Option<[u8; 4]> {
    let second = words[1].to_ne_bytes();
    let prefix = u32::from_ne_bytes([second[0], second[1], second[2], second[3]]);
    (words[0] == 0 && prefix == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
        .then_some([second[4], second[5], second[6], second[7]])
}

/// An address as the two native-endian words [`v4_mapped`] takes.
pub fn address_words(a: &[u8; 16]) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&a[..8]);
    hi.copy_from_slice(&a[8..]);
    [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)]
}

impl ConnEntry {
    /// As [`ConnInfo::identity_pending`].
    pub const fn identity_pending(&self) -> bool {
        self.cookie == 0
    }

    /// What the kernel program keeps of `info`: the entry, and the addresses it keeps
    /// apart (an IPv6 socket's, unless both are IPv4-mapped). The owner's name is not
    /// kept.
    pub fn of(info: &ConnInfo) -> (ConnEntry, Option<[u8; 32]>) {
        let mut e = ConnEntry {
            first_ns: info.seen_ns,
            state_since_ns: info.state_since_ns,
            cookie: info.cookie,
            cgroup_id: info.cgroup_id,
            saddr: [0; 4],
            daddr: [0; 4],
            sport: info.sport,
            dport: info.dport,
            netns: info.netns,
            pid: info.pid,
            bound_dev_if: info.bound_dev_if,
            family: info.family,
            state: info.state as u8,
            flags: (info.flags & !FLAG_ADDRS6) as u8,
            _pad: 0,
        };
        let (s, d) = (&info.saddr, &info.daddr);
        if info.family != AF_INET6 {
            e.saddr.copy_from_slice(&s[..4]);
            e.daddr.copy_from_slice(&d[..4]);
            return (e, None);
        }
        match (v4_mapped(address_words(s)), v4_mapped(address_words(d))) {
            (Some(s4), Some(d4)) => {
                e.saddr = s4;
                e.daddr = d4;
                (e, None)
            }
            _ => {
                e.flags |= FLAG_ADDRS6 as u8;
                let mut both = [0u8; 32];
                both[..16].copy_from_slice(s);
                both[16..].copy_from_slice(d);
                (e, Some(both))
            }
        }
    }
}

/// One tracked TCP socket as userspace reads it: a [`ConnEntry`] with its addresses in
/// full, and the owner's name where userspace has read it (zero from the kernel).
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
    /// Owning process where known (0 = unknown): the caller of connect() or listen(),
    /// or for an accepted socket its listener's (`FLAG_OWNER_LISTENER`).
    pub pid: u32,
    /// Inode number of the socket's network namespace (`stat -L -c %i /proc/PID/ns/net`).
    pub netns: u32,
    /// The owning process's command name.
    pub comm: [u8; 16],
    /// The kernel's socket cookie (`bpf_get_socket_cookie`, sock_diag's `idiag_cookie`).
    /// 0 (no socket has it) while an accepted child's identity is not final yet: see
    /// [`ConnInfo::identity_pending`].
    pub cookie: u64,
    /// The owning process's cgroup v2 id where the owner was learned; 0 = unknown.
    pub cgroup_id: u64,
    /// `SO_BINDTODEVICE` / scope interface index (`skc_bound_dev_if`); 0 = none.
    pub bound_dev_if: u32,
    pub _pad1: u32,
}

impl ConnInfo {
    pub const fn zeroed() -> Self {
        ConnInfo {
            birth_ns: 0,
            seen_ns: 0,
            state_since_ns: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            family: 0,
            _pad0: 0,
            state: 0,
            flags: 0,
            pid: 0,
            netns: 0,
            comm: [0; 16],
            cookie: 0,
            cgroup_id: 0,
            bound_dev_if: 0,
            _pad1: 0,
        }
    }

    /// The socket an entry describes, its IPv6 addresses from `addrs6` (`[local,
    /// remote]`) where the entry keeps them apart (zero if they were not found).
    pub fn from_entry(e: &ConnEntry, addrs6: Option<&[u8; 32]>) -> ConnInfo {
        let flags = e.flags as u32;
        let mut info = ConnInfo::zeroed();
        info.birth_ns = if flags & FLAG_BIRTH_UNKNOWN != 0 {
            0
        } else {
            e.first_ns
        };
        info.seen_ns = e.first_ns;
        info.state_since_ns = e.state_since_ns;
        if flags & FLAG_ADDRS6 != 0 {
            if let Some(both) = addrs6 {
                info.saddr.copy_from_slice(&both[..16]);
                info.daddr.copy_from_slice(&both[16..]);
            }
        } else if e.family == AF_INET6 {
            info.saddr[..12].copy_from_slice(&V4_MAPPED);
            info.daddr[..12].copy_from_slice(&V4_MAPPED);
            info.saddr[12..].copy_from_slice(&e.saddr);
            info.daddr[12..].copy_from_slice(&e.daddr);
        } else {
            info.saddr[..4].copy_from_slice(&e.saddr);
            info.daddr[..4].copy_from_slice(&e.daddr);
        }
        info.sport = e.sport;
        info.dport = e.dport;
        info.family = e.family;
        info.state = e.state as u32;
        info.flags = flags;
        info.pid = e.pid;
        info.netns = e.netns;
        info.cookie = e.cookie;
        info.cgroup_id = e.cgroup_id;
        info.bound_dev_if = e.bound_dev_if;
        info
    }

    /// An accepted child recorded at its birth on a kernel that reports the birth
    /// before the socket has its identity. Before Linux 6.15, `inet_csk_clone_lock()`
    /// fires LISTEN -> SYN_RECV while the child still holds its listener's tuple (no
    /// peer yet: remote port 0) and only then sets its cookie (the request socket's,
    /// replacing any cookie asked for before). Such an entry holds the birth, the
    /// namespace and the direction, but no cookie and no peer; the kernel program
    /// completes it (and reports the birth) at the child's next state change. Nothing
    /// can be told of it by identity until then.
    pub const fn identity_pending(&self) -> bool {
        self.cookie == 0
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

/// A lifecycle event as the ring buffer carries it: the socket's key, what happened, its
/// entry after the change and, with `FLAG_ADDRS6`, its addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryEvent {
    pub key: u64,
    pub kind: u32,
    pub oldstate: u32,
    pub entry: ConnEntry,
    /// `[local, remote]` IPv6 addresses where the entry's flags say so; else zero.
    pub addrs6: [u8; 32],
}

/// A lifecycle event as userspace reads it: the socket's key, what happened, and the
/// socket after the change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    pub key: u64,
    pub kind: u32,
    pub oldstate: u32,
    pub info: ConnInfo,
}

impl ConnEvent {
    pub fn from_record(r: &EntryEvent) -> ConnEvent {
        ConnEvent {
            key: r.key,
            kind: r.kind,
            oldstate: r.oldstate,
            info: ConnInfo::from_entry(&r.entry, Some(&r.addrs6)),
        }
    }
}

/// Name of the one-entry array map through which the daemon tells the kernel program
/// what to send it (see [`Filter`]).
pub const MAP_FILTER: &str = "CW_FILTER";

/// Words of [`Filter::ports`]: one bit for each of the 65536 ports.
pub const PORT_WORDS: usize = 1024;

/// What the daemon wants to hear of: the one value of the filter map, written by the
/// daemon at start, on every policy reload and (with `active` 0) at a clean stop. The
/// kernel program keeps every socket in the connection map whatever this says; it only
/// decides which lifecycle events cross the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    /// 1 while a daemon reads the ring; 0 (no daemon) sends nothing at all.
    pub active: u32,
    /// Bit `1 << state`: the TCP states in which some rule can give a socket a deadline
    /// (or, for a TIME_WAIT limit, the states a connection enters TIME_WAIT from).
    pub states: u32,
    /// 1 when some rule can select a socket whatever its ports.
    pub any_port: u32,
    /// 1 while the daemon sleeps instead of polling the ring (nothing came for a
    /// while): each event wakes it. 0 while it polls: the kernel wakes it only once a
    /// share of the ring is unread. The daemon's own state, not the policy's.
    pub wake_each: u32,
    /// Bit `port % 64` of word `port / 64`: a port some rule selects, local or remote.
    pub ports: [u64; PORT_WORDS],
}

impl Filter {
    /// Sends nothing: what the kernel program does before any daemon wrote the map.
    pub const fn off() -> Self {
        Filter {
            active: 0,
            states: 0,
            any_port: 0,
            wake_each: 0,
            ports: [0; PORT_WORDS],
        }
    }

    /// Sends everything: every state, every port.
    pub const fn everything() -> Self {
        Filter {
            active: 1,
            states: u32::MAX,
            any_port: 1,
            wake_each: 0,
            ports: [0; PORT_WORDS],
        }
    }

    pub fn add_state(&mut self, state: u32) {
        if state < 32 {
            self.states |= 1 << state;
        }
    }

    pub fn add_port(&mut self, port: u16) {
        self.ports[(port >> 6) as usize] |= 1 << (port & 63);
    }

    #[inline(always)]
    pub fn has_port(&self, port: u16) -> bool {
        let i = (port >> 6) as usize;
        // The index is below PORT_WORDS for every u16: no bounds check is emitted.
        i < PORT_WORDS && (self.ports[i] >> (port & 63)) & 1 == 1
    }
}

/// Whether a socket in `state` with these ports is one the daemon must follow: some rule
/// can give it a deadline. The eBPF program and the daemon both decide with this.
#[inline(always)]
pub fn matters(f: &Filter, state: u32, sport: u16, dport: u16) -> bool {
    state < 32
        && (f.states >> state) & 1 == 1
        && (f.any_port != 0 || f.has_port(sport) || f.has_port(dport))
}

/// Whether one lifecycle event crosses the ring: while a daemon runs, a socket first
/// seen now (`DISCOVERED`: the daemon may know it from a dump) always does; any other
/// event when the socket matters before or after the change, so the daemon hears of a
/// socket entering a state that matters and of it leaving one (and then forgets it).
#[inline(always)]
pub fn sends(f: &Filter, kind: u32, oldstate: u32, newstate: u32, sport: u16, dport: u16) -> bool {
    f.active != 0
        && (kind == event_kind::DISCOVERED
            || matters(f, oldstate, sport, dport)
            || matters(f, newstate, sport, dport))
}

/// Indexes of the per-CPU statistics array.
pub mod stat {
    /// State changes of TCP sockets seen.
    pub const EVENTS: u32 = 0;
    /// A new socket could not be recorded: the connection map was full.
    pub const MAP_FULL: u32 = 1;
    /// An event could not be sent: the ring buffer was full.
    pub const RING_FULL: u32 = 2;
    /// An entry at a socket's address belonged to another socket (another cookie), whose
    /// close went unseen: it was replaced.
    pub const REPLACED: u32 = 3;
    /// Connections born accepted from a peer (entering SYN_RECV), whatever the filter.
    pub const OPENED_IN: u32 = 4;
    /// Connections born connecting out (CLOSE to SYN_SENT), whatever the filter.
    pub const OPENED_OUT: u32 = 5;
    /// Connections (not listeners) that reached CLOSE.
    pub const CLOSED: u32 = 6;
    pub const COUNT: u32 = 7;
}

#[cfg(feature = "user")]
pub use user::{bpf, conn_entries_batched, entries_batched, obj_get, obj_info, BATCH_ENTRIES};

// Userspace only: the kernel side has no std.
#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
mod user;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    use core::mem::offset_of;

    #[test]
    fn layouts_have_no_padding() {
        // 4 u64, 2 IPv4 addresses, 2 ports, netns/pid/bound_dev_if, family, state,
        // flags, pad: the sum of the fields is the size.
        assert_eq!(
            size_of::<ConnEntry>(),
            4 * 8 + 2 * 4 + 2 * 2 + 3 * 4 + 2 + 1 + 1 + 4
        );
        // With the hash table's 48-byte header, the 8-byte key and the allocator's
        // 8-byte link: one 128-byte object per socket.
        assert_eq!(size_of::<ConnEntry>(), 64);
        assert_eq!(size_of::<EntryEvent>(), 8 + 4 + 4 + 64 + 32);
        assert_eq!(size_of::<ListenOwner>(), 8 + 8 + 4 + 4);
    }

    #[test]
    fn identity_fields_are_where_the_layout_says() {
        assert_eq!(offset_of!(ConnEntry, cookie), 16);
        assert_eq!(offset_of!(ConnEntry, netns), 44);
        assert_eq!(offset_of!(ConnEntry, pid), 48);
        assert_eq!(offset_of!(EntryEvent, entry), 16);
        assert_eq!(offset_of!(EntryEvent, addrs6), 80);
    }

    fn info(family: u16, saddr: [u8; 16], daddr: [u8; 16]) -> ConnInfo {
        let mut i = ConnInfo::zeroed();
        i.birth_ns = 5;
        i.seen_ns = 5;
        i.state_since_ns = 9;
        i.saddr = saddr;
        i.daddr = daddr;
        i.sport = 80;
        i.dport = 40000;
        i.family = family;
        i.state = tcp_state::CLOSE_WAIT;
        i.flags = FLAG_INBOUND | FLAG_OWNER_LISTENER;
        i.pid = 77;
        i.netns = 4026531840;
        i.cookie = 1234;
        i.cgroup_id = 99;
        i.bound_dev_if = 3;
        i
    }

    #[test]
    fn mapped_addresses_are_told_by_words() {
        let mut a = [0u8; 16];
        a[10..12].copy_from_slice(&[0xff, 0xff]);
        a[12..].copy_from_slice(&[192, 0, 2, 7]);
        assert_eq!(v4_mapped(address_words(&a)), Some([192, 0, 2, 7]));
        for i in 0..12 {
            let mut b = a;
            b[i] ^= 1;
            assert_eq!(v4_mapped(address_words(&b)), None, "byte {i}");
        }
        assert_eq!(v4_mapped(address_words(&[0; 16])), None);
    }

    #[test]
    fn an_entry_and_its_addresses_give_back_the_socket() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut v4b = [0u8; 16];
        v4b[..4].copy_from_slice(&[10, 0, 0, 2]);
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[192, 0, 2, 1]);
        let mut v6 = [0u8; 16];
        v6[..2].copy_from_slice(&[0x20, 0x01]);
        v6[15] = 1;
        let mut unknown = info(AF_INET, v4, v4b);
        unknown.flags |= FLAG_BIRTH_UNKNOWN;
        unknown.birth_ns = 0;
        for (i, apart) in [
            (info(AF_INET, v4, v4b), false),
            (unknown, false),
            (info(AF_INET6, mapped, mapped), false),
            (info(AF_INET6, v6, mapped), true),
            (info(AF_INET6, [0; 16], [0; 16]), true),
        ] {
            let (e, addrs) = ConnEntry::of(&i);
            assert_eq!(addrs.is_some(), apart, "{i:?}");
            assert_eq!(e.flags as u32 & FLAG_ADDRS6 != 0, apart);
            let mut back = ConnInfo::from_entry(&e, addrs.as_ref());
            back.flags &= !FLAG_ADDRS6;
            assert_eq!(back, i);
        }
        // Addresses kept apart but not found: the socket without them, never another's.
        let (e, _) = ConnEntry::of(&info(AF_INET6, v6, v6));
        let lost = ConnInfo::from_entry(&e, None);
        assert_eq!((lost.saddr, lost.daddr), ([0; 16], [0; 16]));
    }

    #[test]
    fn direction_flags_are_distinct_bits() {
        let all = [
            FLAG_BIRTH_UNKNOWN,
            FLAG_INBOUND,
            FLAG_OUTBOUND,
            FLAG_OWNER_LISTENER,
            FLAG_ADDRS6,
        ];
        for (i, a) in all.iter().enumerate() {
            assert_eq!(a.count_ones(), 1);
            assert!(*a < 256, "the entry keeps flags in a byte");
            for b in &all[i + 1..] {
                assert_eq!(a & b, 0);
            }
        }
    }

    #[test]
    fn the_filter_matters_by_state_and_port() {
        let mut f = Filter::off();
        assert!(
            !sends(&f, event_kind::DISCOVERED, 1, 1, 1, 1),
            "no daemon, nothing sent"
        );
        f.active = 1;
        f.add_state(tcp_state::CLOSE_WAIT);
        f.add_port(8080);
        f.add_port(65535);
        assert!(matters(&f, tcp_state::CLOSE_WAIT, 8080, 40000));
        assert!(matters(&f, tcp_state::CLOSE_WAIT, 40000, 8080));
        assert!(matters(&f, tcp_state::CLOSE_WAIT, 1, 65535));
        assert!(!matters(&f, tcp_state::CLOSE_WAIT, 8081, 40000));
        assert!(!matters(&f, tcp_state::ESTABLISHED, 8080, 40000));
        assert!(!matters(&f, 40, 8080, 40000), "no state beyond the mask");
        // Into and out of a state that matters is sent; between others is not.
        assert!(sends(
            &f,
            event_kind::STATE,
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE_WAIT,
            8080,
            1
        ));
        assert!(sends(
            &f,
            event_kind::CLOSED,
            tcp_state::CLOSE_WAIT,
            tcp_state::CLOSE,
            8080,
            1
        ));
        assert!(!sends(
            &f,
            event_kind::STATE,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            8080,
            1
        ));
        assert!(sends(
            &f,
            event_kind::DISCOVERED,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            9,
            9
        ));
        f.any_port = 1;
        assert!(matters(&f, tcp_state::CLOSE_WAIT, 1, 2));
        let all = Filter::everything();
        for st in 0..16 {
            assert!(matters(&all, st, 0, 0));
        }
        assert_eq!(size_of::<Filter>(), 16 + 8 * PORT_WORDS);
    }

    #[test]
    fn global_names_are_distinct() {
        for (i, a) in sock_globals::OFFSETS.iter().enumerate() {
            assert_ne!(*a, sock_globals::READY);
            assert_ne!(*a, sock_globals::RB_WAKEUP_BYTES);
            for b in &sock_globals::OFFSETS[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
