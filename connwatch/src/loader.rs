//! Loading the kernel side: tracefs and bpffs, the tracepoint's layout, the embedded
//! object, pinned maps, and the attach through pinned links.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
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

/// The loaded program and the maps the daemon uses. Dropping it leaves the pinned
/// maps and links: the programs stay attached until `connwatch cleanup`.
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

/// Sizes of the kernel-side maps; None keeps the built-in (or pinned) size.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    pub max_conns: Option<u32>,
    pub ring_bytes: Option<u32>,
}

/// Where a program's attachment (its bpf_link) is pinned: while the pin exists the
/// program stays attached, so sockets born while no daemon runs are still recorded.
pub fn link_pin(program: &str) -> PathBuf {
    Path::new(PIN_DIR).join(format!("link_{program}"))
}

/// Where the program behind a pinned link is pinned, so a restarted daemon can tell
/// whether that program is the one it would load (same instructions, same maps).
pub fn prog_pin(program: &str) -> PathBuf {
    Path::new(PIN_DIR).join(format!("prog_{program}"))
}

/// How a hook's program came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The pinned link of an earlier start runs this very program: kept, nothing attached.
    Reused,
    /// Attached now and pinned.
    Pinned,
    /// Attached now, replacing a pinned link that ran another program (an upgrade).
    Replaced,
    /// Attached now but not pinnable (no bpf_link for tracepoints on this kernel): it
    /// detaches when the daemon stops.
    Unpinned,
}

/// The kernel's identity of a loaded program: its id, its tag (a hash of its
/// instructions) and the maps it uses.
#[derive(Debug, PartialEq, Eq)]
struct ProgIdentity {
    id: u32,
    tag: [u8; 8],
    map_ids: Vec<u32>,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a program descriptor, map ids included. Done by hand:
/// aya fetches map ids through `BPF_PROG_GET_FD_BY_ID`, which needs CAP_SYS_ADMIN,
/// where this needs nothing beyond the descriptor.
fn prog_identity(fd: BorrowedFd<'_>) -> std::io::Result<ProgIdentity> {
    // The leading fields of `struct bpf_prog_info` (include/uapi/linux/bpf.h), stable ABI.
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        ty: u32,
        id: u32,
        tag: [u8; 8],
        jited_prog_len: u32,
        xlated_prog_len: u32,
        jited_prog_insns: u64,
        xlated_prog_insns: u64,
        load_time: u64,
        created_by_uid: u32,
        nr_map_ids: u32,
        map_ids: u64,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let get = |info: &mut Info| -> std::io::Result<()> {
        let attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<Info>() as u32,
            info: info as *mut Info as u64,
        };
        // SAFETY: the kernel writes at most info_len bytes into `info`, and at most
        // nr_map_ids ids where map_ids points.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &attr as *const InfoAttr,
                std::mem::size_of::<InfoAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let mut info = Info::default();
    get(&mut info)?;
    let mut map_ids = vec![0u32; info.nr_map_ids as usize];
    let mut again = Info {
        nr_map_ids: info.nr_map_ids,
        map_ids: map_ids.as_mut_ptr() as u64,
        ..Info::default()
    };
    get(&mut again)?;
    map_ids.truncate(again.nr_map_ids.min(info.nr_map_ids) as usize);
    map_ids.sort_unstable();
    Ok(ProgIdentity {
        id: info.id,
        tag: info.tag,
        map_ids,
    })
}

/// Opens a pinned object (`BPF_OBJ_GET`): needs only permission on the pin.
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET reads a NUL-terminated path and returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjAttr,
            std::mem::size_of::<ObjAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Whether the pinned link of an earlier start runs the program just loaded (same
/// instructions and maps). Anything missing or different answers no.
fn pinned_runs(old_link: &FdLink, hook: &Hook, ours: &ProgIdentity) -> bool {
    let Ok(link) = old_link.info() else {
        return false;
    };
    let Ok(fd) = obj_get(&prog_pin(hook.program)) else {
        return false;
    };
    match prog_identity(fd.as_fd()) {
        Ok(pinned) => {
            pinned.id == link.program_id()
                && pinned.tag == ours.tag
                && pinned.map_ids == ours.map_ids
        }
        Err(_) => false,
    }
}

/// Loads one hook's program and attaches it through a pinned link, or keeps the pinned
/// link of an earlier start when it runs the same program on the same maps.
fn attach_pinned(program: &mut TracePoint, hook: &Hook) -> Result<Attached> {
    program
        .load()
        .with_context(|| format!("the kernel refused the {} program", hook.program))?;
    let ours = prog_identity(program.fd()?.as_fd())
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
    if let Some(old) = &old {
        if pinned_runs(old, hook, &ours) {
            // Ours stays unused: the attached one is identical.
            program.unload()?;
            return Ok(Attached::Reused);
        }
    }
    let attach = |program: &mut TracePoint| {
        program.attach(hook.category, hook.name).with_context(|| {
            format!(
                "cannot attach to tracepoint {}:{}",
                hook.category, hook.name
            )
        })
    };
    let id = attach(program)?;
    let link = match program
        .take_link(id)
        .map_err(anyhow::Error::from)
        .and_then(|l| FdLink::try_from(l).map_err(anyhow::Error::from))
    {
        Ok(link) => link,
        Err(e) => {
            // Tracepoints are bpf_link-based from Linux 5.15: older kernels attach
            // through perf ioctls, which cannot be pinned (and the failed conversion
            // detached it).
            tracing::warn!(
                "cannot pin the {} attachment ({e}): it detaches when the daemon stops",
                hook.program
            );
            attach(program)?;
            return Ok(Attached::Unpinned);
        }
    };
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
    Ok(if old.is_some() {
        Attached::Replaced
    } else {
        Attached::Pinned
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
    // Root's alone: the maps say who talks to whom.
    fs::set_permissions(PIN_DIR, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {PIN_DIR} to root"))?;
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
    let mut how = Vec::new();
    for hook in usable {
        let program: &mut TracePoint = ebpf
            .program_mut(hook.program)
            .with_context(|| format!("the eBPF object has no {} program", hook.program))?
            .try_into()?;
        how.push((hook.program, attach_pinned(program, hook)?));
    }
    let named = |want: Attached| -> Vec<&str> {
        how.iter()
            .filter(|(_, a)| *a == want)
            .map(|(p, _)| *p)
            .collect()
    };
    for (what, a) in [
        (
            "kept the attached programs of an earlier start",
            Attached::Reused,
        ),
        ("attached and pinned", Attached::Pinned),
        (
            "replaced the pinned programs of another build",
            Attached::Replaced,
        ),
        ("attached without a pin", Attached::Unpinned),
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
    let conns = ConnMap::try_from(conns_map)?;
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
    Ok(Loaded {
        ebpf,
        conns,
        events,
        stats,
    })
}

/// What a stopping daemon leaves pinned, in one sentence for its last log line.
pub fn left_behind() -> String {
    let Ok(dir) = fs::read_dir(PIN_DIR) else {
        return format!("nothing is left pinned ({PIN_DIR} is gone)");
    };
    let mut maps = Vec::new();
    let mut links = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(program) = name.strip_prefix("link_") {
            links.push(program.to_string());
        } else if !name.starts_with("prog_") {
            maps.push(name);
        }
    }
    maps.sort();
    links.sort();
    let attached = if links.is_empty() {
        "no program stays attached: sockets born from now on are not recorded until the next start"
            .to_string()
    } else {
        format!(
            "its programs stay attached through pinned links ({}): sockets born from now on are still recorded",
            links.join(", ")
        )
    };
    format!(
        "left pinned in {PIN_DIR}: the maps {} (`connwatch list` still reads them); {attached}; `connwatch cleanup` removes it all",
        maps.join(", ")
    )
}

/// Removes every pinned object: the links first (which detaches the programs), then
/// the programs and the maps (and the ages in them).
pub fn cleanup() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let dir = Path::new(PIN_DIR);
    if !dir.exists() {
        return Ok(removed);
    }
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {PIN_DIR}"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    let rank = |p: &PathBuf| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        match () {
            _ if name.starts_with("link_") => 0,
            _ if name.starts_with("prog_") => 1,
            _ => 2,
        }
    };
    paths.sort_by_key(|p| (rank(p), p.clone()));
    for path in paths {
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
