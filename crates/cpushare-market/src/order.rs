//! Sell orders (one CPU slot each) and buy orders (N CPUs with constraints).

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::money::{period_ceiling, MAX_CPUS, MAX_PERIOD, MAX_PRICE, MIN_PERIOD};
use crate::{AccountId, Cents, KindAsks, LeaseId, MarketError, NodeId, OrderId, Requirements, SandboxKind, SlotAttributes, Time};

/// What a seller asks to place: one slot at an ask in cents per CPU-hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SellRequest {
    pub node: NodeId,
    pub slot: SlotAttributes,
    /// Cents per CPU-hour.
    pub ask: u64,
    /// Other asks for some of the kinds the slot offers.
    #[serde(default, skip_serializing_if = "KindAsks::is_empty")]
    pub kind_asks: KindAsks,
}

impl SellRequest {
    /// One slot at one ask for every kind it offers.
    pub fn new(node: NodeId, slot: SlotAttributes, ask: u64) -> Self {
        SellRequest { node, slot, ask, kind_asks: KindAsks::default() }
    }

    pub(crate) fn validate(&self) -> Result<(), MarketError> {
        validate_price("ask", self.ask)?;
        for kind in SandboxKind::ALL {
            if let Some(ask) = self.kind_asks.get(kind) {
                validate_price(&format!("{kind} ask"), ask)?;
                if !self.slot.kinds.contains(kind) {
                    return Err(MarketError::InvalidOrder(format!("an ask for {kind}, which the slot does not offer")));
                }
            }
        }
        if self.node.0 == u64::MAX {
            return Err(MarketError::InvalidOrder(format!("node ids go up to {}, got {}", u64::MAX - 1, self.node.0)));
        }
        if self.slot.kinds.is_empty() {
            return Err(MarketError::InvalidOrder("a slot must offer at least one sandbox kind".into()));
        }
        if self.slot.ram_mib == 0 {
            return Err(MarketError::InvalidOrder("a slot must offer some RAM (ram_mib is 0)".into()));
        }
        Ok(())
    }
}

/// What a buyer asks to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuyRequest {
    pub cpus: u32,
    /// The most it pays, in cents per CPU-hour.
    pub max_price: u64,
    pub requirements: Requirements,
    /// Lease period in seconds: leases renew (and escrow refills) once per period.
    pub period: u64,
    /// How many periods each lease runs; `None` runs until cancelled.
    pub periods: Option<u32>,
    /// Its buyer watches it (a program driving the work): when that buyer is
    /// seen to have gone, the exchange declares it lost (see `Market::buyer_lost`).
    #[serde(default)]
    pub attended: bool,
}

impl BuyRequest {
    /// `cpus` of any slot of `kind` at up to `max_price`, hourly, until cancelled.
    pub fn new(cpus: u32, max_price: u64, kind: SandboxKind) -> Self {
        BuyRequest {
            cpus,
            max_price,
            requirements: Requirements::any(kind),
            period: crate::money::SECONDS_PER_HOUR,
            periods: None,
            attended: false,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), MarketError> {
        validate_price("max price", self.max_price)?;
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(MarketError::InvalidOrder(format!(
                "cpus must be between 1 and {MAX_CPUS}, got {}",
                self.cpus
            )));
        }
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&self.period) {
            return Err(MarketError::InvalidOrder(format!(
                "the lease period must be between {MIN_PERIOD} s and {MAX_PERIOD} s, got {} s",
                self.period
            )));
        }
        if self.periods == Some(0) {
            return Err(MarketError::InvalidOrder(
                "periods must be at least 1 (omit it to run until cancelled)".into(),
            ));
        }
        Ok(())
    }

    /// Escrow held for one CPU still wanted: its first period at the full bid.
    pub fn escrow_per_cpu(&self) -> Cents {
        period_ceiling(self.max_price, self.period)
    }
}

fn validate_price(what: &str, price: u64) -> Result<(), MarketError> {
    if price == 0 || price > MAX_PRICE {
        return Err(MarketError::InvalidOrder(format!(
            "the {what} must be between 1 and {MAX_PRICE} cents per CPU-hour, got {price}"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SellOrder {
    pub id: OrderId,
    pub account: AccountId,
    pub node: NodeId,
    pub slot: SlotAttributes,
    pub ask: u64,
    #[serde(default, skip_serializing_if = "KindAsks::is_empty")]
    pub kind_asks: KindAsks,
    pub placed_at: Time,
    /// Time priority in the book: renewed whenever the order (re-)enters it.
    pub seq: u64,
    /// The lease the slot is in, if any. A slot is never in two.
    pub lease: Option<LeaseId>,
    /// Taken off the market while leased: it goes when its lease ends.
    pub withdrawn: bool,
}

impl SellOrder {
    pub fn is_resting(&self) -> bool {
        self.lease.is_none()
    }

    /// What a lease of this slot for `kind` costs per CPU-hour.
    pub fn ask_for(&self, kind: SandboxKind) -> u64 {
        self.kind_asks.get(kind).unwrap_or(self.ask)
    }

    /// The slot's kinds grouped by price: its entries in the ask book.
    #[inline]
    pub fn tiers(&self) -> crate::types::Tiers {
        self.kind_asks.tiers(self.slot.kinds, self.ask)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuyOrder {
    pub id: OrderId,
    pub account: AccountId,
    pub request: BuyRequest,
    pub placed_at: Time,
    pub seq: u64,
    /// CPUs still wanted, with escrow held for each.
    pub open: u32,
    /// Whether the open CPUs rest in the book (they do once the order has traded
    /// what it could on arrival).
    pub resting: bool,
    /// Live leases filling this order (inline up to four: most orders are small).
    pub leases: SmallVec<[LeaseId; 4]>,
}

impl BuyOrder {
    pub fn max_price(&self) -> u64 {
        self.request.max_price
    }

    /// Escrow this order holds for its open CPUs.
    pub fn escrow(&self) -> Cents {
        self.open as Cents * self.request.escrow_per_cpu()
    }
}
