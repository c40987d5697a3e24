use thiserror::Error;

use crate::{AccountId, Cents, LeaseId, OrderId, Time};

/// Why an operation was refused. A refused operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MarketError {
    #[error("{0} does not exist; open it first")]
    UnknownAccount(AccountId),
    #[error("{0} already exists")]
    AccountExists(AccountId),
    #[error("{0} does not exist (it may have been filled, cancelled or withdrawn)")]
    UnknownOrder(OrderId),
    #[error("{0} does not exist (it may have ended)")]
    UnknownLease(LeaseId),
    #[error("{order} belongs to another account")]
    NotYourOrder { order: OrderId },
    #[error("{lease} belongs to other accounts")]
    NotYourLease { lease: LeaseId },
    #[error("invalid amount {amount} cents: {reason}")]
    InvalidAmount { amount: Cents, reason: &'static str },
    #[error("invalid order: {0}")]
    InvalidOrder(String),
    #[error("insufficient funds: this needs {needed} cents but {available} are available; deposit more or ask for less")]
    InsufficientFunds { needed: Cents, available: Cents },
    #[error("the amount would overflow the balance")]
    Overflow,
    #[error("{lease} is not waiting for ready (it is already running)")]
    NotAwaitingReady { lease: LeaseId },
    #[error("{lease} timed out at {deadline} waiting for ready")]
    ReadyTooLate { lease: LeaseId, deadline: Time },
    #[error("{order} was already withdrawn")]
    AlreadyWithdrawn { order: OrderId },
    #[error("the exchange is already halted")]
    Halted,
    #[error("the exchange is not halted")]
    NotHalted,
    #[error("time went backwards: asked to act at {now}, but the market is already at {last}")]
    TimeWentBackwards { now: Time, last: Time },
}
