//! What connwatch keeps in bpffs: the maps (so ages survive restarts and `list` reads
//! them without a daemon), the programs and their links (so sockets born while no
//! daemon runs are still recorded). The pin directory carries the layout version of
//! the shared types, so a daemon never reads a map of another layout.

use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use anyhow::{Context, Result};
use aya::maps::{Map, MapData};
use connwatch_common::{obj_get, obj_info, LAYOUT_VERSION, MAP_ADDRS6, MAP_CONNS};

use crate::kernel::conns::ConnMap;
use crate::kernel::first_seen::FirstSeenFile;
use crate::kernel::layout::Hook;

/// Where every layout's pins live; `cleanup` empties it.
pub const PIN_ROOT: &str = "/sys/fs/bpf/connwatch";

/// Where this build's maps, programs and links are pinned: [`PIN_ROOT`] and the
/// layout version, e.g. `/sys/fs/bpf/connwatch/layout-1`.
pub static PIN_DIR: LazyLock<String> =
    LazyLock::new(|| format!("{PIN_ROOT}/layout-{LAYOUT_VERSION}"));

/// Pins of another layout (an older or newer connwatch): their paths. A daemon must
/// not run beside them: their programs would go on recording into maps it cannot read.
pub fn foreign_layouts() -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(PIN_ROOT) else {
        return Vec::new();
    };
    let ours = Path::new(PIN_DIR.as_str());
    let mut found: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != ours)
        .collect();
    found.sort();
    found
}

/// Where a program's attachment (its bpf_link) is pinned: while the pin exists the
/// program stays attached, so sockets born while no daemon runs are still recorded.
pub fn link_pin(program: &str) -> PathBuf {
    Path::new(PIN_DIR.as_str()).join(format!("link_{program}"))
}

/// Where the program behind a pinned link is pinned, so a restarted daemon can tell
/// whether that program is the one it would load (same instructions, same maps).
pub fn prog_pin(program: &str) -> PathBuf {
    Path::new(PIN_DIR.as_str()).join(format!("prog_{program}"))
}

/// The tag of a loaded program: the kernel's hash of its instructions, the same for
/// the same build's program on the same kernel.
///
/// Program info is read by hand ([`obj_info`]): aya fetches it through calls that need
/// CAP_SYS_ADMIN, where this needs only the descriptor.
pub(crate) fn prog_tag(fd: BorrowedFd<'_>) -> std::io::Result<[u8; 8]> {
    // The leading fields of `struct bpf_prog_info` (include/uapi/linux/bpf.h), stable
    // ABI: type, id (u32 each), then the tag.
    let mut info = [0u8; 16];
    obj_info(fd, &mut info)?;
    Ok(info[8..16].try_into().expect("8 bytes"))
}

/// A program's `recursion_misses` (`struct bpf_prog_info`, Linux 5.12+; 0 before):
/// runs the kernel skipped because a BPF program was already running on that CPU.
pub fn recursion_misses(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    // `struct bpf_prog_info` up to `recursion_misses` (offset 208) and the u32 after it.
    const RECURSION_MISSES: usize = 208;
    let mut info = [0u8; 224];
    obj_info(fd, &mut info)?;
    let b = &info[RECURSION_MISSES..RECURSION_MISSES + 8];
    Ok(u64::from_ne_bytes(b.try_into().expect("8 bytes")))
}

/// Opens a pinned program, to read its statistics.
pub fn open_prog(path: &Path) -> std::io::Result<OwnedFd> {
    obj_get(path)
}

pub(crate) fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The tag (instruction hash) of the hook's program pinned by an earlier start, if any.
pub(crate) fn pinned_tag(hook: &Hook) -> Option<[u8; 8]> {
    let fd = obj_get(&prog_pin(hook.program)).ok()?;
    prog_tag(fd.as_fd()).ok()
}

/// What a stopping daemon leaves pinned, in one sentence for its last log line.
pub fn left_behind() -> String {
    let dir_name = PIN_DIR.as_str();
    let Ok(dir) = fs::read_dir(dir_name) else {
        return format!("nothing is left pinned ({dir_name} is gone)");
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
        "left pinned in {dir_name}: the maps {} (`connwatch list` still reads them); {attached}; the first sightings of sockets older than connwatch stay in {}; `connwatch cleanup` removes it all",
        maps.join(", "),
        crate::kernel::first_seen::PATH
    )
}

/// Removes every pinned object of every layout: the links first (which detaches the
/// programs), then the programs and the maps (and the ages in them), and the first
/// sightings of sockets older than connwatch.
pub fn cleanup() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let first_seen = FirstSeenFile::host();
    if first_seen.remove()? {
        removed.push(first_seen.path().display().to_string());
    }
    let root = Path::new(PIN_ROOT);
    if !root.exists() {
        return Ok(removed);
    }
    let list = |dir: &Path| -> Result<Vec<PathBuf>> {
        fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .map(|e| e.map(|e| e.path()).map_err(anyhow::Error::from))
            .collect()
    };
    let mut dirs = Vec::new();
    let mut paths = Vec::new();
    for path in list(root)? {
        if path.is_dir() {
            paths.extend(list(&path)?);
            dirs.push(path);
        } else {
            paths.push(path);
        }
    }
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
    for dir in dirs.iter().map(PathBuf::as_path).chain([root]) {
        fs::remove_dir(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(removed)
}

/// Opens the pinned connection map, as `list` does while a daemon runs or after it.
pub fn open_pinned_conns() -> Result<ConnMap> {
    let path = Path::new(PIN_DIR.as_str()).join(MAP_CONNS);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open {}: has `connwatch run` been started on this host since boot?",
            path.display()
        )
    })?;
    // Pinned beside it by the same build (the layout is in the pin path).
    let addrs6 = MapData::from_pin(Path::new(PIN_DIR.as_str()).join(MAP_ADDRS6))
        .with_context(|| format!("cannot open {MAP_ADDRS6} beside {}", path.display()))?;
    ConnMap::new(Map::HashMap(data), Some(Map::HashMap(addrs6)))
}
