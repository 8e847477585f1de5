//! Reading connwatch's pinned maps from outside the daemon with the raw bpf(2) calls:
//! their size in kernel memory (fdinfo's `memlock`), their entries, the drop counters.

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use connwatch_common::{bpf, obj_get, obj_info, ConnEntry, ConnInfo, MAP_ADDRS6, MAP_CONNS};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// Opens a pinned map.
pub fn open(path: &Path) -> io::Result<OwnedFd> {
    obj_get(path).map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))
}

/// The kernel's description of a map descriptor: `map_type`, `max_entries`,
/// `memlock` (bytes the map holds in kernel memory), ...
pub fn fdinfo(fd: &OwnedFd) -> io::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

pub fn info_u64(info: &HashMap<String, String>, key: &str) -> u64 {
    info.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Every socket of the connection map pinned in `pin_dir`, with the IPv6 addresses
/// kept beside it, read in batches.
pub fn conns(pin_dir: &Path) -> io::Result<Vec<(u64, ConnInfo)>> {
    let fd = open(&pin_dir.join(MAP_CONNS))?;
    let info = fdinfo(&fd)?;
    let value_size = info_u64(&info, "value_size") as usize;
    if value_size != size_of::<ConnEntry>() {
        return Err(io::Error::other(format!(
            "the pinned map's values are {value_size} bytes, this build's entry {}: rebuild loadgen",
            size_of::<ConnEntry>()
        )));
    }
    let addrs6 = open(&pin_dir.join(MAP_ADDRS6))?;
    connwatch_common::conn_entries_batched(fd.as_fd(), Some(addrs6.as_fd()))
}

/// The sum over CPUs of slot `index` of a per-CPU u64 array.
pub fn percpu_sum(fd: &OwnedFd, index: u32) -> io::Result<u64> {
    let ncpu = possible_cpus()?;
    let mut values = vec![0u64; ncpu];
    #[repr(C)]
    struct Lookup {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = Lookup {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::addr_of!(index) as u64,
        value: values.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the key and a value for each CPU, alive across the call.
    unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)? };
    Ok(values.iter().sum())
}

fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (
            lo.parse().map_err(io::Error::other)?,
            hi.parse().map_err(io::Error::other)?,
        );
        n = n.max(hi + 1);
        let _ = lo;
    }
    Ok(n)
}

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// One loaded BPF program: its name (at most 15 bytes, as the kernel keeps it) and,
/// when `kernel.bpf_stats_enabled` is on, how often it ran and for how long.
#[derive(Clone, Debug)]
pub struct Prog {
    pub id: u32,
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// Every BPF program loaded on the host.
pub fn progs() -> io::Result<Vec<Prog>> {
    #[repr(C)]
    struct NextId {
        start_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct FdById {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut next = NextId {
            start_id: id,
            next_id: 0,
            open_flags: 0,
        };
        // SAFETY: no pointers in the attribute.
        match unsafe { bpf(BPF_PROG_GET_NEXT_ID, &mut next) } {
            Ok(_) => id = next.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        let mut by_id = FdById {
            prog_id: id,
            next_id: 0,
            open_flags: 0,
        };
        // A program unloaded meanwhile is simply skipped.
        // SAFETY: no pointers in the attribute.
        let Ok(fd) = (unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id) }) else {
            continue;
        };
        // SAFETY: a fresh descriptor from the kernel.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_prog_info: name[16] at offset 64.
        let mut info = [0u8; 256];
        if obj_info(fd.as_fd(), &mut info).is_err() {
            continue;
        }
        let name = &info[64..80];
        let name =
            String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(16)])
                .into_owned();
        let fi = fdinfo(&fd)?;
        out.push(Prog {
            id,
            name,
            run_cnt: info_u64(&fi, "run_cnt"),
            run_time_ns: info_u64(&fi, "run_time_ns"),
        });
    }
}

const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The ids of the maps a program uses (`bpf_prog_info`'s `map_ids`), pinned or not:
/// the log ring and read-only data have no pin of their own.
pub fn prog_map_ids(prog: &OwnedFd) -> io::Result<Vec<u32>> {
    // struct bpf_prog_info: nr_map_ids (u32) at 52, map_ids (a pointer) at 56.
    let mut info = [0u8; 256];
    obj_info(prog.as_fd(), &mut info)?;
    let n = u32::from_ne_bytes([info[52], info[53], info[54], info[55]]);
    let mut ids = vec![0u32; n as usize];
    info.fill(0);
    info[52..56].copy_from_slice(&n.to_ne_bytes());
    info[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info` and at most
    // `nr_map_ids` ids into `ids`, both alive across the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    // The program cannot gain maps; it says how many it wrote.
    let written = u32::from_ne_bytes([info[52], info[53], info[54], info[55]]).min(n);
    ids.truncate(written as usize);
    Ok(ids)
}

/// A descriptor of the map with this id.
pub fn map_by_id(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct FdById {
        map_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = FdById {
        map_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: no pointers in the attribute.
    let fd = unsafe { bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)? };
    // SAFETY: a fresh descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A map's name as the kernel keeps it (`bpf_map_info`'s `name`, at most 15 bytes).
pub fn map_name(map: &OwnedFd) -> io::Result<String> {
    // struct bpf_map_info: name[16] at offset 24.
    let mut info = [0u8; 96];
    obj_info(map.as_fd(), &mut info)?;
    let name = &info[24..40];
    let len = name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&name[..len]).into_owned())
}
