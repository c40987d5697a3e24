//! The virtual network: one encrypted Ethernet switch per cluster.
pub mod frames;
pub mod handshake;
pub mod node;
pub mod replay;
pub mod session;
pub mod wire;
