//! The cpushare exchange: the service every node talks to.

pub mod client;
pub mod convert;
pub mod datadir;
pub mod engine;
pub mod job;
pub mod netclient;
pub mod networks;
pub mod node;
pub mod order_entry;
pub mod pki;
pub mod read_ahead;
pub mod relay;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod web;

/// The oldest protocol version this exchange still serves.
pub const PROTOCOL_MIN: u32 = 1;

/// HTTP/2 flow-control windows and frame size, on both ends of every
/// connection: large enough that a relay moving a big fragment is not throttled
/// by round trips (8 relay messages in flight: 4 MiB gave 450-480 MB/s of
/// relayed file, 8 MiB 600), small enough that a slow reader holds little
/// memory. Messages must stay well under the stream window: at 4 MiB messages
/// a relay waits for each to be acknowledged (110 MB/s).
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
pub const MAX_FRAME: u32 = 1 << 20;

/// Encrypted bytes a connection's rustls may hold for its socket, on both
/// ends. Its default (64 KiB) made a relay's bulk transfer write each socket
/// 64 KiB at a time; at 1 MiB one system call carries a whole HTTP/2 write
/// (the relay bench's writes 79,000 -> 10,000, its CPU time -18 %). A limit,
/// not an allocation: an idle connection holds nothing.
pub const TLS_BUFFER: usize = 1 << 20;

/// The largest request message the exchange takes by default
/// (`service::Limits::max_message`).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The most payload to put in one relay message: under [`MAX_MESSAGE`] by
/// the few bytes the frame and job-message envelopes need.
pub const RELAY_CHUNK: usize = MAX_MESSAGE - (4 << 10);

