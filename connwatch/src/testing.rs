//! Support for unit tests that need the real kernel.

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
