//! The virtual network: one encrypted Ethernet switch per cluster, over UDP.
//!
//! - [`node`]: a member of a cluster's network as a state machine (switch,
//!   paths direct or through the buyer's relay, handshakes, timers), no I/O.
//! - [`handshake`], [`session`], [`replay`], [`wire`]: Noise IKpsk2 with
//!   WireGuard's cookies, AES-256-GCM data packets, replay windows,
//!   the datagram formats.
//! - [`frames`], [`gso`]: Ethernet frames (64 KiB offload frames included)
//!   in datagram-sized pieces, and cut to MTU size where a port needs it.
//! - [`io`], [`run`]: the UDP socket (GSO/GRO, batches), the tap, QEMU's
//!   datagram sockets, and the loop around a node.
//! - [`stack`], [`socks5`]: a userspace TCP/IP stack on a node's port with
//!   a SOCKS5 proxy in front, for a buyer without CAP_NET_ADMIN.
pub mod dhcp;
pub mod frames;
pub mod gso;
pub mod handshake;
pub mod io;
pub mod node;
pub mod replay;
pub mod run;
pub mod session;
pub mod socks5;
pub mod stack;
pub mod wire;
