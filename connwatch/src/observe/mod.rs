//! What operators see: the view of the connections shared by `list`, `top`, the
//! control API and the metrics; the recent decisions; the metrics registry; where log
//! lines go.

pub mod journal;
pub mod log;
pub mod metrics;
pub mod view;
