//! Support for unit tests: sockets as sock_diag reports them, and a guard for the
//! tests that need the real kernel.

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
