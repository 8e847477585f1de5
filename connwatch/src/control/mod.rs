//! The control API: JSON lines over a Unix socket (the protocol, the server that hands
//! each request to the event loop, the answers, and the client `list` and `top` use),
//! and the HTTP responder for Prometheus scrapes.

pub mod answer;
pub mod client;
pub mod http;
pub mod protocol;
pub mod server;
