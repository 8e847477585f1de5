//! Loading the kernel side: the embedded object, its maps pinned, its programs
//! attached through pinned links (or the ones of an earlier start kept).

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};
use connwatch_common::{
    sock_globals, stat, Filter, DEFAULT_RING_BYTES, LAYOUT_VERSION, MAP_ADDRS6, MAP_CONNS,
    MAP_EVENTS, MAP_FILTER, MAP_STATS, SET_STATE_PROGRAM,
};

use crate::kernel::btf::SockOffsets;
use crate::kernel::conns::ConnMap;
use crate::kernel::fs::ensure_filesystems;
use crate::kernel::layout::{check_hook, Hook, HOOKS};
use crate::kernel::pins::{
    self, link_pin, pinned_tag, prog_pin, prog_tag, remove_pin, PIN_DIR, PIN_ROOT,
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connwatch.bpf.o"));

pub type FilterMap = Array<MapData, Filter>;

/// The ring buffer wakes the daemon only when this share of it is unread (the daemon
/// also drains it on a short timer): one wakeup a batch, not one an event.
pub const WAKEUP_SHARE: u32 = 4;

/// The loaded program and the maps the daemon uses. Dropping it leaves the pinned
/// maps and links: the programs stay attached until `connwatch cleanup`.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub conns: ConnMap,
    pub events: RingBuf<MapData>,
    pub stats: PerCpuArray<MapData, u64>,
    /// What the kernel program sends (see `connwatch_common::Filter`).
    pub filter: FilterMap,
    /// The pinned set-state program, for its `recursion_misses`; None if not pinned.
    pub set_state: Option<std::os::fd::OwnedFd>,
    /// The kernel program's rare diagnostics (a full map, a full ring), through
    /// aya-log; None if its log ring could not be opened. Poll it and `flush()`.
    pub logger: Option<KernelLog>,
}

/// The reader of the kernel program's log records, which go to the daemon's log.
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Kernel-side drop counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub map_full: u64,
    pub ring_full: u64,
    /// Runs of the set-state program the kernel skipped because a BPF program was
    /// already running on that CPU (`recursion_misses` in its `bpf_prog_info`): each
    /// is a state change never recorded.
    pub recursion_misses: u64,
    /// Connections born accepted from a peer, and connecting out; connections closed.
    pub opened_in: u64,
    pub opened_out: u64,
    pub closed: u64,
}

impl Stats {
    /// What happened since `start` (counters read then): what the daemon reports.
    pub fn since(&self, start: &Stats) -> Stats {
        Stats {
            events: self.events.saturating_sub(start.events),
            map_full: self.map_full.saturating_sub(start.map_full),
            ring_full: self.ring_full.saturating_sub(start.ring_full),
            recursion_misses: self.recursion_misses.saturating_sub(start.recursion_misses),
            opened_in: self.opened_in.saturating_sub(start.opened_in),
            opened_out: self.opened_out.saturating_sub(start.opened_out),
            closed: self.closed.saturating_sub(start.closed),
        }
    }

    /// Whether anything was lost between `before` and this reading.
    pub fn lost_since(&self, before: &Stats) -> bool {
        self.map_full > before.map_full
            || self.ring_full > before.ring_full
            || self.recursion_misses > before.recursion_misses
    }
}

/// The embedded object, or an error if this binary was built without it.
pub fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!("this connwatch binary was built without its eBPF object: build it with `cargo xtask build` (which runs `cargo xtask build-ebpf` first)");
    }
    Ok(OBJECT)
}

/// Sizes of the kernel-side maps; None keeps the built-in (or pinned) size.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    pub max_conns: Option<u32>,
    pub ring_bytes: Option<u32>,
}

/// How a hook's program came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Attached now and pinned.
    Pinned,
    /// Attached now, replacing the pinned link of an earlier start that ran this same
    /// build's program: each start loads its own, so that the program's diagnostics
    /// reach this start's log.
    Renewed,
    /// Attached now, replacing a pinned link that ran another program (an upgrade).
    Replaced,
}

/// Loads one hook's program and attaches it through a pinned link, replacing the pinned
/// link of an earlier start (the new one runs before the old one goes).
fn attach_pinned(program: &mut BtfTracePoint, hook: &Hook, btf: &Btf) -> Result<Attached> {
    program
        .load(hook.name, btf)
        .with_context(|| format!("the kernel refused the {} program", hook.program))?;
    let ours = prog_tag(program.fd()?.as_fd())
        .with_context(|| format!("cannot read back the loaded {} program", hook.program))?;
    let link_path = link_pin(hook.program);
    let old: Option<FdLink> = match PinnedLink::from_pin(&link_path) {
        Ok(link) => Some(link.into()),
        Err(_) if !link_path.exists() => None,
        Err(e) => {
            tracing::warn!(
                "{} is not a usable link ({e}): replacing it",
                link_path.display()
            );
            None
        }
    };
    let same_build = old.is_some() && pinned_tag(hook) == Some(ours);
    // A BTF-typed tracepoint attaches through a bpf_link, which can be pinned.
    let id = program.attach().with_context(|| {
        format!(
            "cannot attach to tracepoint {}:{}",
            hook.category, hook.name
        )
    })?;
    let link: FdLink = program.take_link(id)?.into();
    // The new program runs before the old pins go: no gap where nothing records.
    let prog_path = prog_pin(hook.program);
    remove_pin(&link_path)?;
    remove_pin(&prog_path)?;
    link.pin(&link_path)
        .with_context(|| format!("cannot pin {}", link_path.display()))?;
    program
        .pin(&prog_path)
        .with_context(|| format!("cannot pin {}", prog_path.display()))?;
    // Dropping the old link's last descriptor detaches it (its pin is gone).
    Ok(match (old.is_some(), same_build) {
        (false, _) => Attached::Pinned,
        (true, true) => Attached::Renewed,
        (true, false) => Attached::Replaced,
    })
}

/// Loads the program with its maps pinned under [`PIN_DIR`] (reusing maps already
/// there) and attaches it to the tracepoints through pinned links (reusing links
/// already there when they run the same program).
///
/// Events still in the ring from before this start are discarded: they describe what
/// the map already holds, and the caller reconciles with the map and one sock_diag
/// dump before it reads the ring.
pub fn load_and_attach(sizes: Sizes) -> Result<Loaded> {
    ensure_filesystems()?;
    for hook in &HOOKS {
        check_hook(hook)?;
    }
    let foreign = pins::foreign_layouts();
    if !foreign.is_empty() {
        let shown: Vec<String> = foreign.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{PIN_ROOT} holds pins of another connwatch version ({}), whose programs may still be attached; this build uses layout {LAYOUT_VERSION} in {}: run `connwatch cleanup` (it detaches them and forgets their ages), then start again",
            shown.join(", "),
            PIN_DIR.as_str()
        );
    }
    let pin_dir = PIN_DIR.as_str();
    // Root's alone: the maps say who talks to whom.
    for dir in [PIN_ROOT, pin_dir] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {dir} to root"))?;
    }
    // The set-state program reads `struct sock` at the offsets this kernel's BTF gives.
    let btf = Btf::from_sys_fs().context(
        "cannot read this kernel's BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)",
    )?;
    let offsets = SockOffsets::from_sys_fs()?;
    let globals = offsets.globals();
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    for (name, value) in &globals {
        loader.override_global(name, value, true);
    }
    // One wakeup a batch: the kernel wakes the daemon when a quarter of the ring is
    // unread; the daemon drains it on a short timer as well.
    let wakeup = sizes.ring_bytes.unwrap_or(DEFAULT_RING_BYTES) / WAKEUP_SHARE;
    loader.override_global(sock_globals::RB_WAKEUP_BYTES, &wakeup, true);
    if let Some(n) = sizes.max_conns {
        loader.map_max_entries(MAP_CONNS, n);
        loader.map_max_entries(MAP_ADDRS6, n);
    }
    if let Some(n) = sizes.ring_bytes {
        loader.map_max_entries(MAP_EVENTS, n);
    }
    let mut ebpf = loader
        .load(object()?)
        .context("cannot load the eBPF object (is this root, with CAP_BPF and CAP_PERFMON?)")?;
    // Before the programs load: the logger owns the log ring they write to. Only the
    // set-state program logs, and it is loaded anew at every start, so its records
    // come here (a kept program would write to its own start's ring).
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!("the kernel program's diagnostics will not be logged: {e}");
            None
        }
    };
    let mut how = Vec::new();
    for hook in &HOOKS {
        let program = ebpf
            .program_mut(hook.program)
            .with_context(|| format!("the eBPF object has no {} program", hook.program))?;
        how.push((
            hook.program,
            attach_pinned(program.try_into()?, hook, &btf)?,
        ));
    }
    let named = |want: Attached| -> Vec<&str> {
        how.iter()
            .filter(|(_, a)| *a == want)
            .map(|(p, _)| *p)
            .collect()
    };
    for (what, a) in [
        ("attached and pinned", Attached::Pinned),
        (
            "attached anew in place of the same build's, pinned by an earlier start",
            Attached::Renewed,
        ),
        (
            "replaced the pinned programs of another build",
            Attached::Replaced,
        ),
    ] {
        let n = named(a);
        if !n.is_empty() {
            tracing::info!("{what}: {}", n.join(", "));
        }
    }
    let conns_map = ebpf.take_map(MAP_CONNS).context("no connection map")?;
    if let (Map::HashMap(data), Some(want)) = (&conns_map, sizes.max_conns) {
        // A pinned map outlives restarts, and its size with it.
        if let Ok(have) = data.info().map(|i| i.max_entries()) {
            if have != want {
                tracing::warn!(
                    "the pinned connection map holds {have} entries, not the {want} asked for: `connwatch cleanup` (which forgets the ages) resizes it"
                );
            }
        }
    }
    let conns = ConnMap::new(conns_map, ebpf.take_map(MAP_ADDRS6))?;
    let mut events = RingBuf::try_from(ebpf.take_map(MAP_EVENTS).context("no event ring")?)?;
    let mut stale = 0u64;
    while events.next().is_some() {
        stale += 1;
    }
    if stale > 0 {
        tracing::info!(
            "discarded {stale} kernel events recorded before this start: the pinned map already holds what they say"
        );
    }
    let stats = PerCpuArray::try_from(ebpf.take_map(MAP_STATS).context("no stats map")?)?;
    let filter = FilterMap::try_from(ebpf.take_map(MAP_FILTER).context("no filter map")?)?;
    let set_state = pins::open_prog(&prog_pin(SET_STATE_PROGRAM)).ok();
    Ok(Loaded {
        ebpf,
        conns,
        events,
        stats,
        filter,
        set_state,
        logger,
    })
}

pub use connwatch_common::BATCH_ENTRIES;

/// Tells the kernel program what to send: `filter` (its `active` 0 sends nothing).
pub fn write_filter(map: &mut FilterMap, filter: &Filter) -> Result<()> {
    map.set(0, filter, 0)
        .context("cannot write the kernel program's event filter")
}

pub fn read_stats(
    stats: &PerCpuArray<MapData, u64>,
    set_state: Option<&std::os::fd::OwnedFd>,
) -> Result<Stats> {
    let sum = |i: u32| -> Result<u64> { Ok(stats.get(&i, 0)?.iter().sum()) };
    Ok(Stats {
        events: sum(stat::EVENTS)?,
        map_full: sum(stat::MAP_FULL)?,
        ring_full: sum(stat::RING_FULL)?,
        // 0 where the program is not pinned (attached without a link): unknown.
        recursion_misses: set_state
            .and_then(|fd| pins::recursion_misses(fd.as_fd()).ok())
            .unwrap_or(0),
        opened_in: sum(stat::OPENED_IN)?,
        opened_out: sum(stat::OPENED_OUT)?,
        closed: sum(stat::CLOSED)?,
    })
}
