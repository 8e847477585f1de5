//! Least privilege. Loading and attaching the kernel programs needs much of root
//! (CAP_BPF, CAP_PERFMON, and CAP_SYS_ADMIN where tracefs or bpffs must be mounted);
//! the event loop after it needs little. [`drop_after_load`] keeps only what the loop
//! uses, drops everything else from every capability set (the bounding set too, so
//! not even an exec could get it back), and sets `no_new_privs`.
//!
//! What the loop does, and what it needs (each found by trying it with the set alone;
//! RELIABILITY.md has the list):
//! - reading the ring buffer, reading and updating the maps through the descriptors
//!   it already holds, sock_diag dumps and lookups, reading `/proc/<pid>/comm`,
//!   re-reading a root-owned config file on SIGHUP: nothing;
//! - destroying a socket (`SOCK_DESTROY`): CAP_NET_ADMIN;
//! - reaching a socket in another network namespace: opening `/proc/PID/ns/net` of a
//!   process there (CAP_SYS_PTRACE for processes of other users or with more
//!   capabilities) and `setns` into it (CAP_SYS_ADMIN), on a short-lived thread;
//! - finding the sockets of protected processes through `/proc/<pid>/fd`: CAP_SYS_PTRACE
//!   (for root's processes, which hold capabilities the daemon no longer has) and
//!   CAP_DAC_READ_SEARCH (for other users' processes, whose `fd` directories are
//!   private). Without them a protected process's socket would not be recognised.

use std::io;

use anyhow::{bail, Result};

use crate::kernel::sock_diag::{self, DestroySupport};

pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;

/// The capabilities the event loop keeps, and what for.
pub const KEEP: [(u32, &str); 4] = [
    (CAP_NET_ADMIN, "destroying sockets"),
    (
        CAP_SYS_ADMIN,
        "entering other network namespaces (setns) to reach their sockets",
    ),
    (
        CAP_SYS_PTRACE,
        "opening other processes' /proc/PID/ns/net, and finding protected processes' sockets in /proc",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "the same, for processes of other users",
    ),
];

/// Capability names by number (include/uapi/linux/capability.h).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub fn name(cap: u32) -> String {
    NAMES
        .get(cap as usize)
        .map_or_else(|| format!("capability {cap}"), |n| n.to_string())
}

/// The names of the capabilities in a mask, lowest first.
pub fn names(mask: u64) -> Vec<String> {
    (0..64).filter(|c| mask & (1 << c) != 0).map(name).collect()
}

/// A process's capability sets, as `capget` gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's capability sets.
pub fn current() -> io::Result<Sets> {
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two data records for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
    Ok(Sets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

fn set(sets: Sets) -> io::Result<()> {
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    let (e0, e1) = split(sets.effective);
    let (p0, p1) = split(sets.permitted);
    let (i0, i1) = split(sets.inheritable);
    let data = [
        Data {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        Data {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: capset reads two data records for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The bounding set, as a mask.
pub fn bounding() -> u64 {
    (0..=last_cap().min(63))
        .filter(|&c| {
            // SAFETY: PR_CAPBSET_READ reads one bit of our own bounding set.
            unsafe { libc::prctl(libc::PR_CAPBSET_READ, c as libc::c_ulong, 0, 0, 0) == 1 }
        })
        .fold(0, |m, c| m | 1 << c)
}

/// What [`drop_after_load`] did.
#[derive(Debug)]
pub struct Dropped {
    /// The capabilities kept (effective and permitted).
    pub kept: u64,
    /// Wanted ones this process did not have to begin with.
    pub missing: u64,
    /// Whether the bounding set could be reduced too (it needs CAP_SETPCAP).
    pub bounding_reduced: bool,
    /// What the kernel says of SOCK_DESTROY, tried with the kept set alone.
    pub destroy: DestroySupport,
}

/// Keeps only [`KEEP`] (of what this process has), drops everything else from the
/// effective, permitted, inheritable, ambient and bounding sets, sets `no_new_privs`,
/// then tries a destroy with what is left. Logs what it kept and why.
pub fn drop_after_load() -> Result<Dropped> {
    let want = KEEP.iter().fold(0u64, |m, (c, _)| m | 1 << c);
    let before = current()?;
    let kept = want & before.permitted;
    let missing = want & !before.permitted;
    // The bounding set first: dropping from it needs CAP_SETPCAP, about to go.
    let mut bounding_reduced = true;
    for cap in 0..=last_cap().min(63) {
        if kept & (1 << cap) != 0 || bounding() & (1 << cap) == 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP changes only our own bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            bounding_reduced = false;
            break;
        }
    }
    // SAFETY: clears our own ambient set; EINVAL on kernels without one is harmless.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    set(Sets {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    })
    .map_err(|e| anyhow::anyhow!("cannot drop capabilities: {e}"))?;
    // SAFETY: sets a flag on our own process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!("cannot set no_new_privs: {}", io::Error::last_os_error());
    }
    let after = current()?;
    if after.permitted != kept || after.effective != kept {
        bail!(
            "capabilities after the drop are {:?}, not the {:?} asked for",
            names(after.permitted),
            names(kept)
        );
    }
    let why: Vec<String> = KEEP
        .iter()
        .filter(|(c, _)| kept & (1 << c) != 0)
        .map(|(c, what)| format!("{} ({what})", name(*c)))
        .collect();
    tracing::info!(
        "privileges: kept {}; dropped every other capability{}, no_new_privs set",
        if why.is_empty() {
            "none".to_string()
        } else {
            why.join(", ")
        },
        if bounding_reduced {
            ", bounding set included"
        } else {
            " (the bounding set stays: no CAP_SETPCAP to reduce it)"
        }
    );
    for (cap, what) in KEEP.iter().filter(|(c, _)| missing & (1 << c) != 0) {
        tracing::warn!(
            "{} was not granted to connwatch: {what} will not work",
            name(*cap)
        );
    }
    let destroy = sock_diag::probe_destroy();
    match &destroy {
        DestroySupport::Works => {
            tracing::debug!("SOCK_DESTROY works with the kept capabilities")
        }
        other => tracing::warn!("{}", other.describe()),
    }
    Ok(Dropped {
        kept,
        missing,
        bounding_reduced,
        destroy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_numbering() {
        assert_eq!(name(CAP_NET_ADMIN), "CAP_NET_ADMIN");
        assert_eq!(name(CAP_SYS_PTRACE), "CAP_SYS_PTRACE");
        assert_eq!(name(CAP_DAC_READ_SEARCH), "CAP_DAC_READ_SEARCH");
        assert_eq!(name(CAP_SETPCAP), "CAP_SETPCAP");
        assert_eq!(name(39), "CAP_BPF");
        assert_eq!(name(38), "CAP_PERFMON");
        assert_eq!(name(50), "capability 50");
        assert_eq!(
            names(1 << CAP_NET_ADMIN | 1 << CAP_DAC_READ_SEARCH),
            ["CAP_DAC_READ_SEARCH", "CAP_NET_ADMIN"]
        );
    }

    #[test]
    fn reads_this_process_capabilities() {
        let sets = current().unwrap();
        assert_eq!(sets.effective & !sets.permitted, 0, "{sets:?}");
        // The bounding set bounds what an exec could gain; ours is never empty as root.
        if unsafe { libc::geteuid() } == 0 {
            assert_ne!(bounding(), 0);
        }
    }
}
