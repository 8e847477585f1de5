//! Userspace only (the `user` feature): the shared types as aya reads them, and the
//! raw bpf(2) calls that aya does not offer, shared by the daemon and loadgen.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::vec;
use std::vec::Vec;

use super::{ConnEntry, ConnInfo, FLAG_ADDRS6};

// SAFETY: all are #[repr(C)], made only of integers and byte arrays, with explicit
// padding fields, so every bit pattern is valid and there is no hidden padding.
unsafe impl aya::Pod for super::ConnEntry {}
unsafe impl aya::Pod for super::EntryEvent {}
unsafe impl aya::Pod for super::Filter {}
unsafe impl aya::Pod for super::ListenOwner {}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The bpf(2) system call: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` (the
/// kernel takes the rest as zero). Its value (a new descriptor for the commands that
/// make one), or the kernel's error.
///
/// # Safety
/// Every pointer in `attr` names memory valid for what `cmd` does with it.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for the pointers in attr; its size is passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of_val(attr)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned object (`BPF_OBJ_GET`): needs only permission on the pin.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET reads a NUL-terminated path, alive across the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The kernel's description of a BPF object (`BPF_OBJ_GET_INFO_BY_FD`: for a program
/// `struct bpf_prog_info`), as much of it as `info` holds.
pub fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // Every pointer field of the info zero: the kernel writes nowhere but `info`.
    info.fill(0);
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(())
}

/// Entries a batch read asks for; a hash bucket larger than this fails the read
/// (`ENOSPC`).
pub const BATCH_ENTRIES: usize = 4096;

/// Every entry of a connection map and its IPv6 addresses, read [`BATCH_ENTRIES`] at a
/// time with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6): one system call for thousands of
/// sockets, where iterating costs two a socket (its key, then its value). `addrs6` is
/// the map of [`crate::MAP_ADDRS6`], read only when some entry keeps its addresses
/// there. The kernel's error where it refuses a batch.
pub fn conn_entries_batched(
    conns: BorrowedFd<'_>,
    addrs6: Option<BorrowedFd<'_>>,
) -> io::Result<Vec<(u64, ConnInfo)>> {
    let entries: Vec<(u64, ConnEntry)> = entries_batched(conns)?;
    let apart = entries
        .iter()
        .any(|(_, e)| e.flags as u32 & FLAG_ADDRS6 != 0);
    let addrs: HashMap<u64, [u8; 32]> = match addrs6 {
        Some(fd) if apart => entries_batched(fd)?.into_iter().collect(),
        _ => HashMap::new(),
    };
    Ok(entries
        .iter()
        .map(|(k, e)| (*k, ConnInfo::from_entry(e, addrs.get(k))))
        .collect())
}

/// Every entry of a hash map whose keys are `K` and values `V`, read in batches.
pub fn entries_batched<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    /// `bpf_attr` for the `BPF_MAP_*_BATCH` commands.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    // `struct bpf_map_info` begins type, id, key_size, value_size: the kernel writes
    // whole keys and values of its own sizes into the buffers below.
    let mut info = [0u8; 16];
    obj_info(map, &mut info)?;
    let size = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().unwrap()) as usize;
    if (size(8), size(12)) != (size_of::<K>(), size_of::<V>()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            std::format!(
                "the map's keys and values are {} and {} bytes, this build reads {} and {}",
                size(8),
                size(12),
                size_of::<K>(),
                size_of::<V>()
            ),
        ));
    }
    // SAFETY: Pod types are valid for any bit pattern, zero included.
    let (k0, v0): (K, V) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut keys = vec![k0; BATCH_ENTRIES];
    let mut values = vec![v0; BATCH_ENTRIES];
    let mut entries = Vec::new();
    // The kernel's position in the map between calls (a bucket index for a hash).
    let (mut at, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &at as *const u64 as u64 },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_ENTRIES as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the attribute names buffers of `count` keys and values of the map's
        // sizes (checked above) and two 8-byte batch positions, all alive across the
        // call; the kernel writes back `count` and the position.
        let done = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let n = (attr.count as usize).min(BATCH_ENTRIES);
        entries.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match done {
            Ok(_) => {}
            // The end of the map: the last entries came with it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(e) => return Err(e),
        }
        at = next;
        first = false;
    }
}
