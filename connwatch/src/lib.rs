//! connwatch: watch every TCP socket through eBPF, destroy the ones a policy chooses.
//!
//! The kernel side (`connwatch-ebpf`) records each socket's birth and state; this
//! library keeps each socket's next deadline ([`deadlines`], fed by [`tracker`]),
//! decides with a pure [`policy`], and destroys through sock_diag ([`destroy`], [`diag`]).
pub mod api;
pub mod app;
pub mod audit;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod deadlines;
pub mod destroy;
pub mod diag;
pub mod engine;
pub mod limits;
pub mod list;
pub mod loader;
pub mod metrics;
pub mod oneshot;
pub mod owner;
pub mod policy;
pub mod privilege;
pub mod spec;
pub mod testing;
pub mod top;
pub mod tracker;
