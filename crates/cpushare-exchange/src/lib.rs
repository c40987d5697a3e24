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

/// HTTP/2 flow-control windows and frame size, on both ends of every
/// connection: large enough that a relay moving a big fragment is not throttled
/// by round trips, small enough that a slow reader holds little memory.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 1 << 20;

/// The most payload to put in one relay message: the exchange refuses
/// messages over 1 MiB by default (`service::Limits::max_message`), and the
/// frame and job-message envelopes need a few bytes of it.
pub const RELAY_CHUNK: usize = (1 << 20) - (4 << 10);
