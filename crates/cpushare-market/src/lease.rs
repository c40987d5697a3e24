//! Leases: one slot rented by one buy order, period after period.

use serde::{Deserialize, Serialize};

use crate::{AccountId, Cents, NodeId, OrderId, LeaseId, Time};

/// Which side's price a trade took: always the order that was resting.
/// A renewal keeps the rule: at the current ask if the ask was resting,
/// at the bid if the bid was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PriceSide {
    Ask,
    Bid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    /// Matched; the buyer's work is being uploaded. Not billed.
    AwaitingReady,
    /// The seller reported ready; metered per second.
    Running { period_start: Time, metered_until: Time },
}

/// Why a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// It ran every period its order asked for.
    Completed,
    CancelledByBuyer,
    /// The seller's node went silent; metering stopped at its last heartbeat.
    SellerLost,
    BuyerLost,
    /// The buyer could not escrow the next period.
    OutOfFunds,
    /// The seller never reported ready.
    ReadyTimeout,
    /// The seller withdrew the slot or raised its ask above the bid; the
    /// lease ran to the end of its period.
    SellerWithdrew,
    /// The operator halted the exchange.
    ExchangeHalted,
}

impl EndReason {
    pub const ALL: [EndReason; 8] = [
        EndReason::Completed,
        EndReason::CancelledByBuyer,
        EndReason::SellerLost,
        EndReason::BuyerLost,
        EndReason::OutOfFunds,
        EndReason::ReadyTimeout,
        EndReason::SellerWithdrew,
        EndReason::ExchangeHalted,
    ];

    /// Whether the order should look for another slot: the seller (or the
    /// exchange) failed it, not the buyer.
    pub fn reopens_order(self) -> bool {
        matches!(
            self,
            EndReason::SellerLost | EndReason::ReadyTimeout | EndReason::SellerWithdrew | EndReason::ExchangeHalted
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            EndReason::Completed => "completed",
            EndReason::CancelledByBuyer => "cancelled by buyer",
            EndReason::SellerLost => "seller lost",
            EndReason::BuyerLost => "buyer lost",
            EndReason::OutOfFunds => "out of funds",
            EndReason::ReadyTimeout => "timed out waiting for ready",
            EndReason::SellerWithdrew => "seller withdrew",
            EndReason::ExchangeHalted => "exchange halted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub buy: OrderId,
    pub sell: OrderId,
    pub buyer: AccountId,
    pub seller: AccountId,
    pub node: NodeId,
    /// Cents per CPU-hour for the current period.
    pub price: u64,
    pub side: PriceSide,
    /// Seconds.
    pub period: u64,
    pub opened_at: Time,
    pub state: LeaseState,
    /// The ready deadline while awaiting ready, the period's end while running.
    pub deadline: Time,
    /// Periods completed and renewed.
    pub renewals: u32,
    /// Escrow still held for the current period.
    pub escrow: Cents,
    /// Metering remainder in cent-seconds per hour (< 3600).
    pub carry: u64,
    /// Seconds metered over the lease's life.
    pub delivered: u64,
    /// Cents charged to the buyer over the lease's life (fee included).
    pub charged: Cents,
    /// The exchange's part of `charged`.
    pub fee: Cents,
}
