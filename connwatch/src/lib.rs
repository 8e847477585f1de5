//! connwatch: watch every TCP socket through eBPF, destroy the ones a policy chooses.
pub mod conn;
