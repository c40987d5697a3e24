//! The cpushare protocol, generated from `proto/cpushare/v1/exchange.proto`.
//! The `.proto` file is the documentation; this crate only compiles it.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("cpushare.v1");
}

/// The protocol version this build speaks (sent as `cpushare-protocol`).
pub const PROTOCOL_VERSION: u32 = 1;
/// The metadata header carrying it.
pub const PROTOCOL_HEADER: &str = "cpushare-protocol";
