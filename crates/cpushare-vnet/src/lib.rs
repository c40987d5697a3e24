//! The virtual network: one encrypted Ethernet switch per cluster.
pub mod handshake;
pub mod replay;
pub mod session;
pub mod wire;
