//! connwatch's kernel side: one BTF-typed tracepoint that records each TCP socket's
//! identity (cookie, network namespace), birth, state and owner in a map and reports
//! lifecycle changes through a ring buffer. It decides nothing; the daemon does.
//!
//! Nothing runs per packet or per send: the kernel already keeps each socket's last
//! data times (`tcp_info`'s `tcpi_last_data_recv`/`tcpi_last_data_sent`), which the
//! daemon reads at an idle deadline and in every dump.
//!
//! The set-state program reads `struct sock` directly. aya-ebpf has no CO-RE, so the
//! daemon reads the member offsets from the running kernel's BTF and hands them in as
//! the read-only globals below (`EbpfLoader::override_global`). The globals live in
//! `.rodata`, which aya freezes, so the verifier sees every offset as a constant: the
//! loads are checked against `struct sock`'s BTF and run as plain (fault-guarded)
//! loads, with no helper call.
#![no_std]
#![no_main]

use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_ns,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use connwatch_common::{
    event_kind, listener_key, sends, stat, tcp_state, v4_mapped, ConnEntry, EntryEvent, Filter,
    ListenOwner, AF_INET, AF_INET6, DEFAULT_MAX_CONNS, DEFAULT_RING_BYTES, FLAG_ADDRS6,
    FLAG_BIRTH_UNKNOWN, FLAG_INBOUND, FLAG_OUTBOUND, FLAG_OWNER_LISTENER, IPPROTO_TCP,
    MAX_LISTENERS,
};

// Pinned by name: a restarted daemon finds the same maps, and the ages in them.
// Allocated as sockets come (no preallocation): it costs what it holds, not what it
// could hold.
#[map(name = "CW_CONNS")]
static CONNS: HashMap<u64, ConnEntry> = HashMap::pinned(DEFAULT_MAX_CONNS, BPF_F_NO_PREALLOC);

// The `[local, remote]` addresses of the entries flagged FLAG_ADDRS6 (IPv6 sockets not
// talking IPv4), by the same key: apart, so that every entry fits a 128-byte object.
#[map(name = "CW_ADDRS6")]
static ADDRS6: HashMap<u64, [u64; 4]> = HashMap::pinned(DEFAULT_MAX_CONNS, BPF_F_NO_PREALLOC);

#[map(name = "CW_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(DEFAULT_RING_BYTES, 0);

#[map(name = "CW_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

// Who listens on each port (`connwatch_common::listener_key`), for the sockets accepted
// there. Few entries, allocated as used.
#[map(name = "CW_LISTENERS")]
static LISTENERS: HashMap<u64, ListenOwner> = HashMap::pinned(MAX_LISTENERS, BPF_F_NO_PREALLOC);

// What the daemon wants to hear of (`connwatch_common::Filter`): all zero, so nothing is
// sent, until a daemon writes it; cleared again at a clean stop.
#[map(name = "CW_FILTER")]
static FILTER: Array<Filter> = Array::pinned(1, 0);

// The running kernel's layout, set by the daemon from BTF (names in
// `connwatch_common::sock_globals`). Offsets are from the start of `struct sock`, except
// CW_OFF_NET_INUM (from `struct net`). Until CW_BTF_READY is 1 the program records nothing.
#[unsafe(no_mangle)]
static CW_BTF_READY: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_DPORT: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_NUM: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_BOUND_DEV_IF: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_NET: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_V6_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SKC_V6_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_SK_PROTOCOL: u32 = 0;
#[unsafe(no_mangle)]
static CW_OFF_NET_INUM: u32 = 0;
/// Ring buffer wakeups: 0 (default) wakes the reader on every event the kernel finds it
/// waiting for, as before. N > 0 wakes it only when unread data crosses N bytes, so a
/// reader that sets it must also drain on a timer.
#[unsafe(no_mangle)]
static CW_RB_WAKEUP_BYTES: u32 = 0;

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// A global set at load time; volatile so the compiler keeps the load for the verifier
/// to fold.
#[inline(always)]
fn global(g: &'static u32) -> usize {
    // SAFETY: a plain static.
    unsafe { core::ptr::read_volatile(g) as usize }
}

/// Reads a `T` at `off` bytes into a kernel object.
///
/// # Safety
/// `base` is a BTF-typed kernel pointer and `off` a constant the verifier can check
/// against that type.
#[cfg(not(feature = "probe-read"))]
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, off: usize) -> T {
    core::ptr::read_volatile(base.add(off).cast::<T>())
}

/// As above, through `bpf_probe_read_kernel` (for comparison; slower).
#[cfg(feature = "probe-read")]
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, off: usize) -> T {
    aya_ebpf::helpers::bpf_probe_read_kernel(base.add(off).cast::<T>())
        .unwrap_or(core::mem::zeroed())
}

/// A socket changed state: `inet_sock_set_state(const struct sock *sk, int oldstate,
/// int newstate)`, called with the socket locked (or not yet visible).
///
/// Runs the kernel does not make because this program was already running on the CPU
/// (recursion) are counted by the kernel itself: `recursion_misses` in the program's
/// info (`bpftool prog show`, `bpf_prog_info`, Linux 5.12+), at no cost here.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    if global(&CW_BTF_READY) != 1 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    // SAFETY: sk is the tracepoint's BTF-typed socket; offsets come from BTF.
    unsafe { record(&ctx, sk, oldstate as u32, newstate as u32) };
    0
}

/// Records the current process as the socket's owner; only called where the current
/// process is certainly the one using the socket (connect, listen). Its name is not
/// kept: userspace reads it from /proc when it shows it.
#[inline(always)]
fn set_owner(entry: &mut ConnEntry) {
    entry.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: no arguments; the cgroup v2 id of the current task (0 without cgroup v2).
    entry.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
}

/// A socket entered LISTEN: remember its owner for the sockets it will accept.
#[inline(always)]
fn remember_listener(entry: &ConnEntry) {
    let owner = ListenOwner {
        cookie: entry.cookie,
        cgroup_id: entry.cgroup_id,
        pid: entry.pid,
        _pad: 0,
    };
    // A full map only costs accepted sockets their shown owner.
    let _ = LISTENERS.insert(&listener_key(entry.netns, entry.sport), &owner, BPF_ANY);
}

/// A listening socket closed: forget it, unless another socket listens there now.
#[inline(always)]
fn forget_listener(entry: &ConnEntry) {
    let key = listener_key(entry.netns, entry.sport);
    // SAFETY: read-only use of a map value.
    if unsafe { LISTENERS.get(&key) }.is_some_and(|l| l.cookie == entry.cookie) {
        let _ = LISTENERS.remove(&key);
    }
}

/// An accepted socket takes its listener's owner, flagged as such.
#[inline(always)]
fn inherit_owner(entry: &mut ConnEntry) {
    // SAFETY: read-only use of a map value.
    if let Some(l) = unsafe { LISTENERS.get(&listener_key(entry.netns, entry.sport)) } {
        entry.pid = l.pid;
        entry.cgroup_id = l.cgroup_id;
        entry.flags |= FLAG_OWNER_LISTENER as u8;
    }
}

/// What one state change says of a socket: its state since now, its tuple and device.
struct Seen {
    state: u32,
    at: u64,
    /// `[local, remote]`, two words each (an IPv4 address in the first 4 bytes of each).
    addrs: [u64; 4],
    /// The IPv4 addresses the entry holds; None when they are kept apart (`FLAG_ADDRS6`).
    v4: Option<([u8; 4], [u8; 4])>,
    sport: u16,
    dport: u16,
    family: u16,
    bound_dev_if: u32,
}

impl Seen {
    /// Writes what changed into the entry (its addresses if it holds them); true when
    /// the addresses are to be kept apart.
    #[inline(always)]
    fn write_to(&self, entry: &mut ConnEntry) -> bool {
        entry.state = self.state as u8;
        entry.state_since_ns = self.at;
        entry.sport = self.sport;
        entry.dport = self.dport;
        entry.family = self.family;
        entry.bound_dev_if = self.bound_dev_if;
        match self.v4 {
            Some((s, d)) => {
                entry.saddr = s;
                entry.daddr = d;
                entry.flags &= !(FLAG_ADDRS6 as u8);
                false
            }
            None => {
                entry.saddr = [0; 4];
                entry.daddr = [0; 4];
                entry.flags |= FLAG_ADDRS6 as u8;
                true
            }
        }
    }
}

/// Keeps the addresses apart for an entry that says so (`apart`); removes them when the
/// entry no longer needs them (`had`: it did before). False if they could not be stored
/// (the map is full).
#[inline(always)]
fn follow_addrs(key: u64, apart: bool, had: bool, addrs: &[u64; 4]) -> bool {
    if !apart {
        if had {
            let _ = ADDRS6.remove(&key);
        }
        return true;
    }
    if let Some(p) = ADDRS6.get_ptr_mut(&key) {
        // SAFETY: a map value of four words; one socket's changes are serialised by its
        // lock. Written in place: an update would allocate a new element.
        unsafe { *p = *addrs };
        return true;
    }
    ADDRS6.insert(&key, addrs, BPF_ANY).is_ok()
}

/// Zeroes an entry a word at a time. A zeroed struct literal compiles to a call to
/// memset, which the BPF target runs as a loop of byte stores: 64 of them at
/// every birth. Volatile stores are not merged back into that call.
///
/// # Safety
/// `entry` points to a writable `ConnEntry`.
#[inline(always)]
unsafe fn clear(entry: *mut ConnEntry) {
    const WORDS: usize = core::mem::size_of::<ConnEntry>() / 8;
    const _: () = assert!(core::mem::size_of::<ConnEntry>() % 8 == 0);
    let words = entry.cast::<u64>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: within the value, 8-aligned (ConnEntry holds u64 fields).
        core::ptr::write_volatile(words.add(i), 0);
        i += 1;
    }
}

/// Counts one more in a per-CPU slot; returns the count on this CPU (0 if the slot is
/// missing), so a rare condition can be told to the daemon's log the first time only.
#[inline(always)]
fn count(index: u32) -> u64 {
    match STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only from this CPU.
        Some(v) => unsafe {
            *v += 1;
            *v
        },
        None => 0,
    }
}

/// Bytes one event takes in the ring buffer: the record and its 8-byte header.
const EVENT_BYTES: u64 = (core::mem::size_of::<EntryEvent>() + 8) as u64;

/// Writes the event straight into the ring buffer (no copy on the stack), if the
/// daemon's filter wants it: the entry, and the addresses where it keeps them apart.
#[inline(always)]
fn send(
    ctx: &BtfTracePointContext,
    key: u64,
    kind: u32,
    oldstate: u32,
    entry: &ConnEntry,
    addrs: &[u64; 4],
) {
    let Some(filter) = FILTER.get(0) else {
        return;
    };
    if !sends(
        filter,
        kind,
        oldstate,
        entry.state as u32,
        entry.sport,
        entry.dport,
    ) {
        return;
    }
    match EVENTS.reserve::<EntryEvent>(0) {
        Some(mut slot) => {
            let ev = slot.as_mut_ptr();
            // SAFETY: a reserved record of EntryEvent's size; every field is written,
            // the addresses as words (EntryEvent is 8-aligned, its addresses at 80).
            unsafe {
                (*ev).key = key;
                (*ev).kind = kind;
                (*ev).oldstate = oldstate;
                (*ev).entry = *entry;
                let words = core::ptr::addr_of_mut!((*ev).addrs6).cast::<u64>();
                let apart = entry.flags & FLAG_ADDRS6 as u8 != 0;
                let mut i = 0;
                while i < 4 {
                    *words.add(i) = if apart { addrs[i] } else { 0 };
                    i += 1;
                }
            }
            let wake = global(&CW_RB_WAKEUP_BYTES) as u64;
            let flags = if filter.wake_each != 0 {
                // The daemon sleeps until told: this event is the first of a spell.
                BPF_RB_FORCE_WAKEUP
            } else if wake == 0 {
                0
            } else {
                // Unread bytes, this record's included (reserved already).
                let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
                if avail >= wake && avail.saturating_sub(EVENT_BYTES) < wake {
                    BPF_RB_FORCE_WAKEUP
                } else {
                    BPF_RB_NO_WAKEUP
                }
            };
            slot.submit(flags);
        }
        None => {
            // Rare, and told once per CPU: the daemon counts every loss.
            if count(stat::RING_FULL) == 1 {
                warn!(
                    ctx,
                    "the event ring is full: events are lost until the daemon reads them (it reconciles with the kernel)"
                );
            }
        }
    }
}

/// The socket's cookie: the kernel gives it one on first ask, the same number sock_diag
/// reports.
#[inline(always)]
unsafe fn cookie_of(sk: *const u8) -> u64 {
    bpf_get_socket_cookie(sk as *mut c_void)
}

/// The socket's tuple, family and bound device, as they are now; None for a family
/// other than IPv4/IPv6.
#[inline(always)]
unsafe fn seen(sk: *const u8, state: u32, at: u64) -> Option<Seen> {
    let family: u16 = load(sk, global(&CW_OFF_SKC_FAMILY));
    let (addrs, v4) = if family == AF_INET {
        // Network order in memory: the bytes of the native-endian word are the address.
        let s: u32 = load(sk, global(&CW_OFF_SKC_RCV_SADDR));
        let d: u32 = load(sk, global(&CW_OFF_SKC_DADDR));
        (
            [s as u64, 0, d as u64, 0],
            Some((s.to_ne_bytes(), d.to_ne_bytes())),
        )
    } else if family == AF_INET6 {
        let s = global(&CW_OFF_SKC_V6_RCV_SADDR);
        let d = global(&CW_OFF_SKC_V6_DADDR);
        let s: [u64; 2] = [load(sk, s), load(sk, s + 8)];
        let d: [u64; 2] = [load(sk, d), load(sk, d + 8)];
        let v4 = match (v4_mapped(s), v4_mapped(d)) {
            (Some(s4), Some(d4)) => Some((s4, d4)),
            _ => None,
        };
        ([s[0], s[1], d[0], d[1]], v4)
    } else {
        return None;
    };
    let dport: u16 = load(sk, global(&CW_OFF_SKC_DPORT));
    let bound_dev_if: i32 = load(sk, global(&CW_OFF_SKC_BOUND_DEV_IF));
    Some(Seen {
        state,
        at,
        addrs,
        v4,
        // skc_num is host order, skc_dport network order: both host order here, as the
        // classic tracepoint gave them.
        sport: load(sk, global(&CW_OFF_SKC_NUM)),
        dport: u16::from_be(dport),
        family,
        bound_dev_if: bound_dev_if as u32,
    })
}

/// The inode of the socket's network namespace: sk->__sk_common.skc_net.net->ns.inum.
#[inline(always)]
unsafe fn netns_of(sk: *const u8) -> u32 {
    let net: *const u8 = load(sk, global(&CW_OFF_SKC_NET));
    if net.is_null() {
        return 0;
    }
    load(net, global(&CW_OFF_NET_INUM))
}

/// # Safety
/// `sk` is the tracepoint's BTF-typed socket pointer.
#[inline(always)]
unsafe fn record(ctx: &BtfTracePointContext, sk: *const u8, oldstate: u32, newstate: u32) {
    let protocol: u16 = load(sk, global(&CW_OFF_SK_PROTOCOL));
    if protocol != IPPROTO_TCP {
        return;
    }
    let _ = count(stat::EVENTS);
    let key = sk as u64;
    let now = bpf_ktime_get_ns();

    if newstate == tcp_state::CLOSE {
        let cookie = cookie_of(sk);
        // The entry is copied out before it is removed. One at this address with another
        // cookie is a dead socket's whose close went unseen: reported closed all the same.
        if let Some(entry) = CONNS.get(&key) {
            let mut entry = *entry;
            let mut addrs = [0u64; 4];
            if entry.flags & FLAG_ADDRS6 as u8 != 0 {
                if let Some(a) = ADDRS6.get(&key) {
                    addrs = *a;
                }
                let _ = ADDRS6.remove(&key);
            }
            entry.state = newstate as u8;
            entry.state_since_ns = now;
            let _ = CONNS.remove(&key);
            if entry.identity_pending() && oldstate == tcp_state::SYN_RECV {
                // An accepted child that dies before its identity was completed.
                entry.cookie = cookie;
            } else if entry.cookie != cookie {
                let _ = count(stat::REPLACED);
            }
            if oldstate == tcp_state::LISTEN {
                forget_listener(&entry);
            } else {
                let _ = count(stat::CLOSED);
            }
            send(ctx, key, event_kind::CLOSED, oldstate, &entry, &addrs);
        }
        return;
    }

    // The tuple is re-read on every change: at SYN_SENT the local port is still 0.
    let Some(mut seen) = seen(sk, newstate, now) else {
        return;
    };
    // Before Linux 6.15 an accepted child enters SYN_RECV still holding its listener's
    // tuple (no peer: remote port 0), and the kernel sets its cookie only after this
    // tracepoint, replacing any asked for now. Its entry is made now, with the birth and
    // no identity (`ConnEntry::identity_pending`); its next change completes it and
    // reports the birth. From 6.15 the child has its peer and cookie here already.
    let early_child = newstate == tcp_state::SYN_RECV && seen.dport == 0;
    let cookie = if early_child { 0 } else { cookie_of(sk) };
    if early_child {
        // Its tuple is its listener's, which nothing reads (no identity yet): its entry
        // keeps no addresses until its next change gives it its own.
        seen.v4 = Some(([0; 4], [0; 4]));
    }

    // A socket is born when it leaves CLOSE (connect, listen) or when an accepted child
    // enters SYN_RECV. An entry already at its address belongs to a dead socket whose
    // close went unseen (the program was detached): the new socket replaces it.
    let born = oldstate == tcp_state::CLOSE || newstate == tcp_state::SYN_RECV;
    let mut replaced = false;
    let mut had_addrs = false;
    if !born {
        if let Some(p) = CONNS.get_ptr_mut(&key) {
            // SAFETY: a map value pointer; concurrent updates of one socket's state are
            // serialised by the socket lock the kernel holds around this tracepoint.
            let entry = &mut *p;
            had_addrs = entry.flags & FLAG_ADDRS6 as u8 != 0;
            let kind = if entry.cookie == cookie {
                event_kind::STATE
            } else if entry.identity_pending()
                && entry.state as u32 == tcp_state::SYN_RECV
                && oldstate == tcp_state::SYN_RECV
            {
                // The accepted child recorded at its birth: now it has its cookie and
                // its peer, and the daemon hears of its birth.
                entry.cookie = cookie;
                event_kind::OPENED
            } else {
                // Another socket's entry at this address: this one is first seen now.
                0
            };
            if kind != 0 {
                let apart = seen.write_to(entry);
                if !follow_addrs(key, apart, had_addrs, &seen.addrs) {
                    let _ = count(stat::MAP_FULL);
                }
                send(ctx, key, kind, oldstate, entry, &seen.addrs);
                return;
            }
            let _ = count(stat::REPLACED);
            replaced = true;
        }
    }

    // A new socket, or one first seen now: that one predates the program.
    let mut slot = core::mem::MaybeUninit::<ConnEntry>::uninit();
    clear(slot.as_mut_ptr());
    // SAFETY: every byte was just written; any bit pattern is a valid ConnEntry.
    let entry = &mut *slot.as_mut_ptr();
    entry.cookie = cookie;
    entry.netns = netns_of(sk);
    entry.first_ns = now;
    let flags = if born {
        if newstate == tcp_state::SYN_RECV {
            FLAG_INBOUND
        } else if newstate == tcp_state::SYN_SENT {
            FLAG_OUTBOUND
        } else {
            0
        }
    } else if oldstate == tcp_state::SYN_SENT {
        FLAG_BIRTH_UNKNOWN | FLAG_OUTBOUND
    } else if oldstate == tcp_state::SYN_RECV {
        FLAG_BIRTH_UNKNOWN | FLAG_INBOUND
    } else {
        FLAG_BIRTH_UNKNOWN
    };
    entry.flags = flags as u8;
    let apart = seen.write_to(entry);
    // connect() and listen() run in the owner's process; everything else here may run
    // in softirq, where the current task is unrelated: an accepted socket is told its
    // listener's.
    if oldstate == tcp_state::CLOSE {
        set_owner(entry);
        if newstate == tcp_state::LISTEN {
            remember_listener(entry);
        }
    } else if born {
        inherit_owner(entry);
    }
    // The addresses first, so that a reader never finds an entry without them. A dead
    // socket's at this address (its close unseen) are replaced, or removed where its
    // entry was found; a newborn's does not look (the daemon removes what is left).
    let stored = follow_addrs(key, apart, had_addrs, &seen.addrs);
    let insert = if born || replaced {
        BPF_ANY
    } else {
        BPF_NOEXIST
    };
    if !stored || CONNS.insert(&key, &*entry, insert).is_err() {
        if apart && stored {
            let _ = ADDRS6.remove(&key);
        }
        // Rare, and told once per CPU: the daemon counts every one.
        if count(stat::MAP_FULL) == 1 {
            warn!(
                ctx,
                "the connection map is full: new sockets are not recorded (restart with a larger --max-conns after `connwatch cleanup`)"
            );
        }
        return;
    }
    // Counted here, not from the events: the filter lets few of them through.
    if born && flags & FLAG_INBOUND != 0 {
        let _ = count(stat::OPENED_IN);
    } else if born && flags & FLAG_OUTBOUND != 0 {
        let _ = count(stat::OPENED_OUT);
    }
    if early_child {
        // Reported once it has an identity.
        return;
    }
    let kind = if born {
        event_kind::OPENED
    } else {
        event_kind::DISCOVERED
    };
    send(ctx, key, kind, oldstate, entry, &seen.addrs);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
