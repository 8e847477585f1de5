//! Everything that talks to the kernel: loading and attaching the eBPF side, its pins,
//! the tracepoint layouts, the sock_diag client, `/proc` and the process's
//! capabilities. Nothing here decides; the engine above does.

pub mod btf;
pub mod cgroup;
pub mod conns;
pub mod firewall;
pub mod first_seen;
pub mod fs;
pub mod layout;
pub mod load;
pub mod netns;
pub mod pins;
pub mod privilege;
pub mod procfs;
pub mod sock_diag;

pub use conns::ConnMap;
pub use load::{load_and_attach, read_stats, write_filter, FilterMap, Loaded, Sizes, Stats};
