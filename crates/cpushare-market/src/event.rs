//! Every state change is an event. Applying the log from an empty market
//! rebuilds exactly the same state: this is how the exchange persists and
//! recovers. Events carry every amount they move, so a statement of an
//! account is a filter over the log.

use serde::{Deserialize, Serialize};

use crate::{
    AccountId, BuyRequest, Cents, EndReason, KindAsks, LeaseId, NodeId, OrderId, PriceSide, SlotAttributes, Time,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    AccountOpened { account: AccountId, at: Time },
    /// Money from outside (a payment provider) into `available`.
    Deposited { account: AccountId, amount: Cents, at: Time },
    /// Money from `available` to outside.
    Withdrawn { account: AccountId, amount: Cents, at: Time },
    /// The operator stopped matching (leases end separately, "exchange halted").
    Halted { at: Time },
    /// Matching restarts.
    Resumed { at: Time },

    /// A slot enters the book.
    SellPlaced {
        order: OrderId,
        account: AccountId,
        node: NodeId,
        slot: SlotAttributes,
        ask: u64,
        #[serde(default, skip_serializing_if = "KindAsks::is_empty")]
        kind_asks: KindAsks,
        at: Time,
    },
    /// A new ask; a resting order loses its time priority.
    SellRepriced { order: OrderId, ask: u64, at: Time },
    /// The slot leaves the market: at once if resting, when its lease ends if leased.
    SellWithdrawn { order: OrderId, at: Time },

    /// A buy order arrives; `escrow` moves from available to escrow. It trades first
    /// (`LeaseOpened`), then rests with what is left (`BuyRested`).
    BuyPlaced { order: OrderId, account: AccountId, request: BuyRequest, escrow: Cents, at: Time },
    /// The order's open CPUs enter the book.
    BuyRested { order: OrderId, at: Time },
    /// The buyer cancels: the open CPUs' escrow (`released`) returns; its leases end separately.
    BuyCancelled { order: OrderId, released: Cents, at: Time },

    /// A trade. One open CPU of `buy` and the slot `sell` become a lease awaiting ready.
    /// The lease holds `escrow` for its first period; `refund` (the part of the order's
    /// escrow the lower price does not need) returns to available.
    LeaseOpened {
        lease: LeaseId,
        buy: OrderId,
        sell: OrderId,
        /// The parties, for whoever reads the log (they follow from the orders).
        buyer: AccountId,
        seller: AccountId,
        node: NodeId,
        price: u64,
        side: PriceSide,
        escrow: Cents,
        refund: Cents,
        deadline: Time,
        at: Time,
    },
    /// The seller is running the work: metering starts now.
    LeaseReady { lease: LeaseId, at: Time },
    /// Metering of `seconds` up to `until`: `charge` moves from the buyer's escrow, `fee`
    /// of it to the exchange and the rest to the seller; `carry` is the new remainder.
    LeaseSettled { lease: LeaseId, until: Time, seconds: u64, charge: Cents, fee: Cents, carry: u64 },
    /// A new period with the same slot. The old period's unspent escrow (`released`)
    /// returns and `escrow` is held for the new one.
    LeaseRenewed { lease: LeaseId, at: Time, price: u64, released: Cents, escrow: Cents },
    /// The lease ends; its unspent escrow (`released`) returns. If `reopen` is set, the
    /// order wants a CPU again and holds that much escrow for it.
    LeaseEnded { lease: LeaseId, reason: EndReason, at: Time, released: Cents, reopen: Option<Cents> },
}

impl Event {
    /// The time the event happened (for `LeaseSettled`, the end of the metered span).
    pub fn at(&self) -> Time {
        match *self {
            Event::AccountOpened { at, .. }
            | Event::Deposited { at, .. }
            | Event::Withdrawn { at, .. }
            | Event::Halted { at }
            | Event::Resumed { at }
            | Event::SellPlaced { at, .. }
            | Event::SellRepriced { at, .. }
            | Event::SellWithdrawn { at, .. }
            | Event::BuyPlaced { at, .. }
            | Event::BuyRested { at, .. }
            | Event::BuyCancelled { at, .. }
            | Event::LeaseOpened { at, .. }
            | Event::LeaseReady { at, .. }
            | Event::LeaseRenewed { at, .. }
            | Event::LeaseEnded { at, .. } => at,
            Event::LeaseSettled { until, .. } => until,
        }
    }
}
