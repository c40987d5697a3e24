//! The cpushare exchange: the service every node talks to.

pub mod engine;
pub mod pki;
pub mod state;
pub mod store;
