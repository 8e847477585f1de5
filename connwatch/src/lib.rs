//! connwatch: watch every TCP socket through eBPF, destroy the ones a policy chooses.
//!
//! The modules follow the data, bottom to top; each depends only on those above it
//! in this list:
//! - [`conn`], [`clock`]: the vocabulary (states, tuples, owners, births, time);
//! - [`kernel`]: loading the eBPF side, pins, tracepoint layouts, sock_diag, `/proc`,
//!   capabilities;
//! - [`policy`]: rules and decisions (pure), parsing, the config file;
//! - [`track`]: what is known of each socket (in the policy's terms), and its next
//!   deadline;
//! - [`engine`]: plan, fire, re-check, destroy, record;
//! - [`observe`]: the view `list`/`top`/API/metrics share, metrics, log sinks;
//! - [`control`]: the control API (protocol, server, client) and the metrics HTTP;
//! - [`daemon`]: the only wiring, the event loop;
//! - [`cli`]: the command line and its subcommands.
pub mod cli;
pub mod clock;
pub mod conn;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod kernel;
pub mod observe;
pub mod policy;
pub mod track;

#[cfg(test)]
mod layering;
#[cfg(test)]
mod testing;
