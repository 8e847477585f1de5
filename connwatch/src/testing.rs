//! Support for unit tests: sockets as sock_diag reports them and as the map holds
//! them, and a guard for the tests that need the real kernel.

use connwatch_common::{ConnInfo, AF_INET};

use crate::conn::{cookie_to_diag, TcpState, Tuple};
use crate::kernel::sock_diag::DiagSocket;

/// A socket as a dump reports it: `cookie` in the kernel's bytes, held by a process
/// (inode 1, so protections are looked up), unbound, without `tcp_info`. Tests that
/// need an orphan, a device or timers change those fields by struct update.
pub fn diag_socket(tuple: Tuple, state: TcpState, cookie: u64) -> DiagSocket {
    DiagSocket {
        tuple,
        state,
        cookie: cookie_to_diag(cookie),
        inode: 1,
        uid: 0,
        ifindex: 0,
        activity: None,
        traffic: None,
    }
}

/// A map entry of socket `cookie` in namespace `netns`: 127.0.0.1:`sport` to
/// 127.0.0.1:8080 in `state`, born, first seen and in its state since `cookie` ns.
pub fn loopback_info(netns: u32, state: u32, sport: u16, cookie: u64) -> ConnInfo {
    let mut i = ConnInfo::zeroed();
    i.family = AF_INET;
    i.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    i.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    i.sport = sport;
    i.dport = 8080;
    i.state = state;
    i.netns = netns;
    i.cookie = cookie;
    i.birth_ns = cookie;
    i.seen_ns = cookie;
    i.state_since_ns = cookie;
    i
}

/// Fails the calling test, saying why, when it cannot run: these tests exercise the
/// real kernel and must not pass by doing nothing.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test {what} and needs root (with BPF and sock_diag); run it as root: `sudo cargo xtask test`"
    );
}
