//! What is known of each socket (the tracker, fed by kernel events, the pinned map
//! and sock_diag dumps) and when each is next due (the deadline heap).

pub mod deadlines;
pub mod tracker;

pub use deadlines::Deadlines;
pub use tracker::{Seed, Source, Tracked, Tracker};
