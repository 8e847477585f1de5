//! Loading the kernel side: tracefs and bpffs, the tracepoint's layout, the embedded
//! object, pinned maps, and the attach.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use connwatch_common::{
    length_offsets, probe_offsets, set_state_offsets as off, stat, ConnInfo, MAP_CONNS, MAP_EVENTS,
    MAP_STATS,
};

/// Where the maps are pinned, so `list` reads them and a restarted daemon keeps its ages.
pub const PIN_DIR: &str = "/sys/fs/bpf/connwatch";
pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";
/// A tracepoint the eBPF object attaches to, and the record fields its program reads.
pub struct Hook {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    pub fields: &'static [(&'static str, usize)],
    /// Without it connwatch cannot work; without the others it learns activity and
    /// owners only from sock_diag, at deadlines.
    pub required: bool,
}

pub const HOOKS: [Hook; 4] = [
    Hook {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        fields: &[
            ("skaddr", off::SKADDR),
            ("oldstate", off::OLDSTATE),
            ("newstate", off::NEWSTATE),
            ("sport", off::SPORT),
            ("dport", off::DPORT),
            ("family", off::FAMILY),
            ("protocol", off::PROTOCOL),
            ("saddr", off::SADDR),
            ("daddr", off::DADDR),
            ("saddr_v6", off::SADDR_V6),
            ("daddr_v6", off::DADDR_V6),
        ],
        required: true,
    },
    Hook {
        program: "tcp_probe",
        category: "tcp",
        name: "tcp_probe",
        fields: &[
            ("data_len", probe_offsets::DATA_LEN),
            ("skaddr", probe_offsets::SKADDR),
        ],
        required: false,
    },
    Hook {
        program: "sock_send_length",
        category: "sock",
        name: "sock_send_length",
        fields: &[
            ("sk", length_offsets::SK),
            ("protocol", length_offsets::PROTOCOL),
            ("ret", length_offsets::RET),
        ],
        required: false,
    },
    Hook {
        program: "sock_recv_length",
        category: "sock",
        name: "sock_recv_length",
        fields: &[
            ("sk", length_offsets::SK),
            ("protocol", length_offsets::PROTOCOL),
            ("ret", length_offsets::RET),
        ],
        required: false,
    },
];

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connwatch.bpf.o"));

pub type ConnMap = HashMap<MapData, u64, ConnInfo>;

/// The loaded program and the maps the daemon uses. Dropping it detaches the program;
/// the pinned maps stay.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub conns: ConnMap,
    pub events: RingBuf<MapData>,
    pub stats: PerCpuArray<MapData, u64>,
}

/// Kernel-side drop counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub map_full: u64,
    pub ring_full: u64,
}

fn is_mounted(path: &str, fstype: &str) -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let _dev = f.next();
            f.next() == Some(path) && f.next() == Some(fstype)
        })
    })
}

fn mount(fstype: &str, target: &str) -> Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in a literal");
    let (src, fst, tgt) = (c("nodev"), c(fstype), c(target));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "cannot mount {fstype} on {target}: {} (mount it by hand: mount -t {fstype} nodev {target})",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Mounts tracefs and bpffs where they are missing: aya resolves tracepoint ids through
/// tracefs, and pinning needs bpffs.
pub fn ensure_filesystems() -> Result<()> {
    if !Path::new(TRACEFS).join("events").exists() && !is_mounted(TRACEFS, "tracefs") {
        mount("tracefs", TRACEFS)?;
        tracing::info!("mounted tracefs on {TRACEFS}");
    }
    if !is_mounted(BPFFS, "bpf") {
        mount("bpf", BPFFS)?;
        tracing::info!("mounted bpffs on {BPFFS}");
    }
    Ok(())
}

/// Offsets of the tracepoint's fields as the running kernel's format file gives them.
pub fn tracepoint_fields(format: &str) -> Vec<(String, usize)> {
    format
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?.split(';').next()?;
            let name = decl.split_whitespace().last()?;
            let name = name.split('[').next()?.to_string();
            let offset = line
                .split(';')
                .find_map(|p| p.trim().strip_prefix("offset:"))?
                .parse()
                .ok()?;
            Some((name, offset))
        })
        .collect()
}

/// Refuses a tracepoint whose record differs from what its program reads.
pub fn check_layout(hook: &Hook, format: &str) -> Result<()> {
    let fields = tracepoint_fields(format);
    let tp = format!("{}:{}", hook.category, hook.name);
    for (name, want) in hook.fields {
        match fields.iter().find(|(n, _)| n == name) {
            Some((_, got)) if got == want => {}
            Some((_, got)) => bail!(
                "tracepoint {tp} field {name} is at offset {got}, connwatch reads it at {want}: this kernel's layout is not supported"
            ),
            None => bail!("tracepoint {tp} has no field {name}: this kernel's layout is not supported"),
        }
    }
    Ok(())
}

pub fn read_format(hook: &Hook) -> Result<String> {
    let path = format!("{TRACEFS}/events/{}/{}/format", hook.category, hook.name);
    fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))
}

/// Checks one hook against the running kernel.
pub fn check_hook(hook: &Hook) -> Result<()> {
    check_layout(hook, &read_format(hook)?)
}

/// The embedded object, or an error if this binary was built without it.
pub fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!("this connwatch binary was built without its eBPF object: build it with `cargo xtask build` (which runs `cargo xtask build-ebpf` first)");
    }
    Ok(OBJECT)
}

/// Loads the program with its maps pinned under [`PIN_DIR`] (reusing maps already
/// there) and attaches it to the tracepoint.
/// Sizes of the kernel-side maps; None keeps the built-in (or pinned) size.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    pub max_conns: Option<u32>,
    pub ring_bytes: Option<u32>,
}

pub fn load_and_attach(sizes: Sizes) -> Result<Loaded> {
    ensure_filesystems()?;
    let mut usable = Vec::new();
    for hook in &HOOKS {
        match check_hook(hook) {
            Ok(()) => usable.push(hook),
            Err(e) if hook.required => return Err(e),
            Err(e) => tracing::warn!(
                "{e:#}: activity and owners will be learned from sock_diag at deadlines only"
            ),
        }
    }
    fs::create_dir_all(PIN_DIR).with_context(|| format!("cannot create {PIN_DIR}"))?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(PIN_DIR);
    if let Some(n) = sizes.max_conns {
        loader.map_max_entries(MAP_CONNS, n);
    }
    if let Some(n) = sizes.ring_bytes {
        loader.map_max_entries(MAP_EVENTS, n);
    }
    let mut ebpf = loader
        .load(object()?)
        .context("cannot load the eBPF object (is this root, with CAP_BPF and CAP_PERFMON?)")?;
    for hook in usable {
        let program: &mut TracePoint = ebpf
            .program_mut(hook.program)
            .with_context(|| format!("the eBPF object has no {} program", hook.program))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the kernel refused the {} program", hook.program))?;
        program.attach(hook.category, hook.name).with_context(|| {
            format!(
                "cannot attach to tracepoint {}:{}",
                hook.category, hook.name
            )
        })?;
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
    let conns = ConnMap::try_from(conns_map)?;
    let events = RingBuf::try_from(ebpf.take_map(MAP_EVENTS).context("no event ring")?)?;
    let stats = PerCpuArray::try_from(ebpf.take_map(MAP_STATS).context("no stats map")?)?;
    Ok(Loaded {
        ebpf,
        conns,
        events,
        stats,
    })
}

/// Removes every pinned object: the maps (and the ages in them). The program itself
/// goes with the last process holding it.
pub fn cleanup() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let dir = Path::new(PIN_DIR);
    if !dir.exists() {
        return Ok(removed);
    }
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {PIN_DIR}"))? {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        removed.push(path.display().to_string());
    }
    fs::remove_dir(dir).with_context(|| format!("cannot remove {PIN_DIR}"))?;
    Ok(removed)
}

/// Opens the pinned connection map, as `list` does while a daemon runs or after it.
pub fn open_pinned_conns() -> Result<ConnMap> {
    let path = Path::new(PIN_DIR).join(MAP_CONNS);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open {}: has `connwatch run` been started on this host since boot?",
            path.display()
        )
    })?;
    Ok(ConnMap::try_from(Map::HashMap(data))?)
}

pub fn read_stats(stats: &PerCpuArray<MapData, u64>) -> Result<Stats> {
    let sum = |i: u32| -> Result<u64> { Ok(stats.get(&i, 0)?.iter().sum()) };
    Ok(Stats {
        events: sum(stat::EVENTS)?,
        map_full: sum(stat::MAP_FULL)?,
        ring_full: sum(stat::RING_FULL)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 1480
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;
";

    #[test]
    fn accepts_the_known_layout() {
        check_layout(&HOOKS[0], FORMAT_6_18).unwrap();
    }

    #[test]
    fn refuses_a_shifted_layout() {
        // Before 5.6 `protocol` was a u8, which moved the addresses.
        let old = FORMAT_6_18.replace("offset:32;", "offset:31;");
        let err = check_layout(&HOOKS[0], &old).unwrap_err().to_string();
        assert!(err.contains("saddr") && err.contains("31"), "{err}");
    }

    #[test]
    fn running_kernel_matches_the_program() {
        crate::testing::require_root("reads the tracepoint format file under tracefs");
        ensure_filesystems().unwrap();
        for hook in &HOOKS {
            check_hook(hook).unwrap();
        }
    }
}
