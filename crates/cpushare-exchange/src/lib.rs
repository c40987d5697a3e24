//! The cpushare exchange: the service every node talks to.

pub mod client;
pub mod convert;
pub mod datadir;
pub mod engine;
pub mod node;
pub mod pki;
pub mod relay;
pub mod server;
pub mod service;
pub mod state;
pub mod store;

/// The oldest protocol version this exchange still serves.
pub const PROTOCOL_MIN: u32 = 1;
