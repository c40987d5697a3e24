//! The cpushare market engine: order book, matching, leases, metering and a
//! double-entry ledger, as a pure library.
//!
//! Nothing here reads a clock, a file or a socket. Every operation is told the
//! time, validates its input, and emits [`Event`]s; [`Market::apply`] is the
//! only code that changes state. So:
//!
//! - a refused operation ([`MarketError`]) changes nothing;
//! - replaying the event log from an empty market rebuilds exactly the same
//!   state (this is how the exchange persists and recovers);
//! - a whole market, with thousands of sellers and buyers over simulated days,
//!   runs deterministically in one process ([`sim`]).
//!
//! Money is integer cents. Usage is metered per second at a price per hour and
//! settled in whole cents with the remainder carried per lease, so the buyer
//! pays delivered seconds × price to within one cent per lease, never above the
//! bid. The ledger's balances (every account's available and escrow, the
//! exchange's fees, and the outside world) always sum to zero.

mod book;
mod deadlines;
mod error;
mod event;
pub mod index;
mod lease;
mod market;
pub mod money;
mod order;
mod pages;
mod records;
pub mod sim;
mod types;

pub use book::{Ask, AskBook, BidBook};
pub use error::MarketError;
pub use event::Event;
pub use lease::{EndReason, Lease, LeaseState, PriceSide};
pub use market::{Balance, Bucket, Market, MarketConfig, Posting, Room, Snapshot};
pub use order::{BuyOrder, BuyRequest, SellOrder, SellRequest};
pub use types::{AccountId, Cents, KindAsks, KindSet, LeaseId, NodeId, OrderId, Requirements, SandboxKind, SlotAttributes, Time};
