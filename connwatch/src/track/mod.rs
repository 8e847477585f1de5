//! What is known of each socket (the tracker, fed by kernel events, the pinned map
//! and sock_diag dumps) and when each is next due (the deadline heap).

pub mod deadlines;
mod packed;
pub mod tracker;

pub use deadlines::Deadlines;
pub use tracker::{Seed, Source, Tracked, Tracker};

/// A hash map for keys the kernel hands out (socket addresses, cookies, namespace
/// inodes), which no peer chooses: a fast hasher rather than std's SipHash, since a
/// mass round hashes each key several times. Maps keyed by peer addresses keep std's.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
