//! connwatch's kernel side: a tracepoint that records each TCP socket's birth and
//! state in a map and reports lifecycle changes through a ring buffer, and three that
//! stamp activity and the owning process on the entry. It decides nothing; the daemon
//! does.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use connwatch_common::{
    event_kind, length_offsets, probe_offsets, set_state_offsets as off, stat, tcp_state,
    ConnEvent, ConnInfo, ACTIVITY_GRANULE_NS, AF_INET, AF_INET6, DEFAULT_MAX_CONNS,
    DEFAULT_RING_BYTES, FLAG_BIRTH_UNKNOWN, IPPROTO_TCP,
};

// Pinned by name: a restarted daemon finds the same maps, and the ages in them.
#[map(name = "CW_CONNS")]
static CONNS: HashMap<u64, ConnInfo> = HashMap::pinned(DEFAULT_MAX_CONNS, 0);

#[map(name = "CW_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(DEFAULT_RING_BYTES, 0);

#[map(name = "CW_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = record(&ctx);
    0
}

/// Data arrived on an established socket: stamp `last_rx`, once per granule.
#[tracepoint]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets checked against the format file before load.
    let Ok(len) = (unsafe { ctx.read_at::<u16>(probe_offsets::DATA_LEN) }) else {
        return 0;
    };
    // Pure ACKs and keepalives carry no data: they are not activity.
    if len == 0 {
        return 0;
    }
    let Ok(key) = (unsafe { ctx.read_at::<u64>(probe_offsets::SKADDR) }) else {
        return 0;
    };
    if let Some(entry) = CONNS.get_ptr_mut(&key) {
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: a map value pointer; a lost race between CPUs only loses a stamp
        // that the next segment writes again.
        let info = unsafe { &mut *entry };
        if now.wrapping_sub(info.last_rx_ns) >= ACTIVITY_GRANULE_NS {
            info.last_rx_ns = now;
        }
    }
    0
}

/// A process sent on a socket: stamp `last_tx` and learn the owner.
#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    on_length(&ctx, true);
    0
}

/// A process received from a socket: learn the owner.
#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    on_length(&ctx, false);
    0
}

#[inline(always)]
fn on_length(ctx: &TracePointContext, sent: bool) {
    // SAFETY: offsets checked against the format file before load.
    let Ok(protocol) = (unsafe { ctx.read_at::<u16>(length_offsets::PROTOCOL) }) else {
        return;
    };
    if protocol != IPPROTO_TCP {
        return;
    }
    let Ok(ret) = (unsafe { ctx.read_at::<i32>(length_offsets::RET) }) else {
        return;
    };
    let Ok(key) = (unsafe { ctx.read_at::<u64>(length_offsets::SK) }) else {
        return;
    };
    let Some(entry) = CONNS.get_ptr_mut(&key) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a map value pointer; see tcp_probe.
    let info = unsafe { &mut *entry };
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if info.pid != pid {
        set_owner(info);
    }
    if sent && ret > 0 && now.wrapping_sub(info.last_tx_ns) >= ACTIVITY_GRANULE_NS {
        info.last_tx_ns = now;
    }
}

/// Records the current process as the socket's owner; only called where the current
/// process is certainly the one using the socket.
#[inline(always)]
fn set_owner(info: &mut ConnInfo) {
    info.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Ok(comm) = bpf_get_current_comm() {
        info.comm = comm;
    }
}

/// What one state change says of a socket: its state since now, and its tuple.
struct Seen {
    state: u32,
    at: u64,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    family: u16,
}

impl Seen {
    #[inline(always)]
    fn write_to(&self, info: &mut ConnInfo) {
        info.state = self.state;
        info.state_since_ns = self.at;
        info.saddr = self.saddr;
        info.daddr = self.daddr;
        info.sport = self.sport;
        info.dport = self.dport;
        info.family = self.family;
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(v) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only from this CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn send(key: u64, kind: u32, oldstate: u32, info: &ConnInfo) {
    let event = ConnEvent {
        key,
        kind,
        oldstate,
        info: *info,
    };
    if EVENTS.output::<ConnEvent>(&event, 0).is_err() {
        count(stat::RING_FULL);
    }
}

fn record(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets of this tracepoint's record, checked by the daemon against the
    // format file before the program is loaded; read_at bounds the read itself.
    let protocol: u16 = unsafe { ctx.read_at(off::PROTOCOL)? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    count(stat::EVENTS);
    let key: u64 = unsafe { ctx.read_at(off::SKADDR)? };
    let oldstate: i32 = unsafe { ctx.read_at(off::OLDSTATE)? };
    let newstate: i32 = unsafe { ctx.read_at(off::NEWSTATE)? };
    let (oldstate, newstate) = (oldstate as u32, newstate as u32);
    let now = unsafe { bpf_ktime_get_ns() };

    if newstate == tcp_state::CLOSE {
        // SAFETY: the entry is copied out before it is removed.
        if let Some(info) = unsafe { CONNS.get(&key) } {
            let mut info = *info;
            info.state = newstate;
            info.state_since_ns = now;
            let _ = CONNS.remove(&key);
            send(key, event_kind::CLOSED, oldstate, &info);
        }
        return Ok(());
    }

    // The tuple is re-read on every change: at SYN_SENT the local port is still 0.
    let family: u16 = unsafe { ctx.read_at(off::FAMILY)? };
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        let s: [u8; 4] = unsafe { ctx.read_at(off::SADDR)? };
        let d: [u8; 4] = unsafe { ctx.read_at(off::DADDR)? };
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        saddr = unsafe { ctx.read_at(off::SADDR_V6)? };
        daddr = unsafe { ctx.read_at(off::DADDR_V6)? };
    } else {
        return Ok(());
    }
    let seen = Seen {
        state: newstate,
        at: now,
        saddr,
        daddr,
        sport: unsafe { ctx.read_at(off::SPORT)? },
        dport: unsafe { ctx.read_at(off::DPORT)? },
        family,
    };

    // A socket is born when it leaves CLOSE (connect, listen) or when an accepted child
    // enters SYN_RECV. An entry already at its address belongs to a dead socket whose
    // close went unseen (the program was detached): the new socket replaces it.
    let born = oldstate == tcp_state::CLOSE || newstate == tcp_state::SYN_RECV;
    if !born {
        if let Some(entry) = CONNS.get_ptr_mut(&key) {
            // SAFETY: a map value pointer; concurrent updates of one socket's state are
            // serialised by the socket lock the kernel holds around this tracepoint.
            let info = unsafe { &mut *entry };
            seen.write_to(info);
            send(key, event_kind::STATE, oldstate, info);
            return Ok(());
        }
    }

    // A new socket, or one first seen now: that one predates the program.
    let mut info = ConnInfo::zeroed();
    info.birth_ns = if born { now } else { 0 };
    info.flags = if born { 0 } else { FLAG_BIRTH_UNKNOWN };
    info.seen_ns = now;
    seen.write_to(&mut info);
    // connect() and listen() run in the owner's process; everything else here may run
    // in softirq, where the current task is unrelated.
    if oldstate == tcp_state::CLOSE {
        set_owner(&mut info);
    }
    let flags = if born { BPF_ANY } else { BPF_NOEXIST };
    if CONNS.insert(&key, &info, flags).is_err() {
        count(stat::MAP_FULL);
        return Ok(());
    }
    let kind = if born {
        event_kind::OPENED
    } else {
        event_kind::DISCOVERED
    };
    send(key, kind, oldstate, &info);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
