//! The market: commands validate and then emit events; `apply` is the only
//! code that changes state. So a refused command changes nothing, and replaying
//! the events from an empty market rebuilds the same state.

use std::collections::{BTreeSet, HashMap};

use rustc_hash::FxHashMap;
use arrayvec::ArrayVec;
use smallvec::SmallVec;

use serde::{Deserialize, Serialize};

use crate::book::{AskBook, BidBook};
use crate::deadlines::Deadlines;
use crate::index::MAX_N;
use crate::money::{accrue, cumulative_fee, period_ceiling, MAX_TRANSFER};
use crate::records::{BuyRec, LeaseRec, NodeKey, NodeRec, SlotRec, Table};
use crate::{
    AccountId, BuyOrder, BuyRequest, Cents, EndReason, Event, Lease, LeaseId, MarketError, NodeId, OrderId,
    PriceSide, Requirements, SandboxKind, SellOrder, SellRequest, Time,
};

/// Rules an operator sets when the market starts. Replaying a log needs the same config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketConfig {
    /// The exchange's fee, in basis points of every charge.
    pub fee_bps: u32,
    /// Seconds a seller has to report ready after a match.
    pub ready_timeout: u64,
}

impl Default for MarketConfig {
    fn default() -> Self {
        MarketConfig { fee_bps: 300, ready_timeout: 600 }
    }
}

/// How many more of each a market should make room for ([`Market::reserve`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    pub slots: usize,
    /// Seller nodes (a node offers one slot per CPU).
    pub nodes: usize,
    pub buy_orders: usize,
    pub leases: usize,
}

/// One account's money at the exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// Free to spend or withdraw.
    pub available: Cents,
    /// Held for open buy orders and the current period of running leases.
    pub escrow: Cents,
}

#[derive(Debug, Clone)]
pub struct Market {
    config: MarketConfig,
    /// The latest time any event carried; commands may not act before it.
    now: Time,
    next_id: u64,
    next_seq: u64,
    balances: FxHashMap<AccountId, Balance>,
    /// The outside world: minus everything ever deposited plus everything withdrawn.
    world: Cents,
    fees: Cents,
    /// Slots (sell orders), buy orders and leases, as records laid out for the
    /// cache (`records`); the public structs are built from them when asked for.
    sells: Table<SlotRec>,
    buys: Table<BuyRec>,
    leases: Table<LeaseRec>,
    /// A node's slots in the order they were placed (inline: most nodes have a few,
    /// and a slot placed or withdrawn then costs no second trip to memory).
    slots_of_node: Table<NodeRec>,
    asks: AskBook,
    bids: BidBook,
    deadlines: Deadlines,
    /// Matching is stopped (the operator's kill switch); orders rest, nothing trades.
    halted: bool,
    outbox: Vec<Event>,
    /// Per-account postings of the pending events, when the owner keeps a statement.
    journal: Option<Vec<Posting>>,
}

/// Which of an account's two balances a posting moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bucket {
    Available,
    Escrow,
}

/// One line of an account's statement: `amount` moved in `bucket` by the pending
/// event at index `event` (as [`Market::take_events`] will return it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub event: usize,
    pub account: AccountId,
    pub bucket: Bucket,
    pub amount: Cents,
}

impl Market {
    pub fn new(config: MarketConfig) -> Self {
        Market {
            config,
            now: 0,
            next_id: 1,
            next_seq: 1,
            balances: FxHashMap::default(),
            world: 0,
            fees: 0,
            sells: Table::default(),
            buys: Table::default(),
            leases: Table::default(),
            slots_of_node: Table::default(),
            asks: AskBook::default(),
            bids: BidBook::default(),
            deadlines: Deadlines::default(),
            halted: false,
            outbox: Vec::new(),
            journal: None,
        }
    }

    /// Makes room for this many more slots, seller nodes, buy orders and leases. A
    /// table that outgrows its room is moved whole to one twice its size, which stops
    /// matching for as long as that takes (tens of milliseconds at 200,000 slots); an
    /// exchange that knows its size reserves room for it, with headroom, up front.
    pub fn reserve(&mut self, room: Room) {
        self.sells.reserve(room.slots);
        self.slots_of_node.reserve(room.nodes);
        self.buys.reserve(room.buy_orders);
        self.leases.reserve(room.leases);
    }

    /// Keep postings per account for every event from now on (see [`Market::take_postings`]).
    pub fn keep_journal(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
    }

    /// Postings of the events emitted since the last call, with indexes into the
    /// events [`Market::take_events`] returns; take both together.
    pub fn take_postings(&mut self) -> Vec<Posting> {
        self.journal.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Rebuilds a market from its event log.
    pub fn replay<'a>(config: MarketConfig, events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut m = Market::new(config);
        for e in events {
            m.apply(e);
        }
        m
    }

    /// Events emitted since the last call, in order.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.outbox)
    }

    /// Drops pending events without allocating (for benchmarks and simulations that
    /// only count).
    pub fn discard_events(&mut self) -> usize {
        let n = self.outbox.len();
        self.outbox.clear();
        n
    }

    pub fn pending_events(&self) -> &[Event] {
        &self.outbox
    }

    // ---- reading ----

    pub fn config(&self) -> &MarketConfig {
        &self.config
    }
    pub fn now(&self) -> Time {
        self.now
    }
    pub fn balance(&self, account: AccountId) -> Option<Balance> {
        self.balances.get(&account).copied()
    }
    pub fn fees(&self) -> Cents {
        self.fees
    }
    pub fn world(&self) -> Cents {
        self.world
    }
    pub fn sell_order(&self, id: OrderId) -> Option<SellOrder> {
        self.sells.get(id).map(SlotRec::view)
    }
    pub fn buy_order(&self, id: OrderId) -> Option<BuyOrder> {
        self.buys.get(id).map(BuyRec::view)
    }
    pub fn lease(&self, id: LeaseId) -> Option<Lease> {
        self.leases.get(id).map(LeaseRec::view)
    }
    /// Live leases, in no particular order.
    pub fn leases(&self) -> impl Iterator<Item = Lease> + '_ {
        self.leases.iter().map(LeaseRec::view)
    }
    pub fn sell_orders(&self) -> impl Iterator<Item = SellOrder> + '_ {
        self.sells.iter().map(SlotRec::view)
    }
    pub fn buy_orders(&self) -> impl Iterator<Item = BuyOrder> + '_ {
        self.buys.iter().map(BuyRec::view)
    }
    pub fn accounts(&self) -> impl Iterator<Item = (AccountId, Balance)> + '_ {
        self.balances.iter().map(|(a, b)| (*a, *b))
    }
    /// Nodes that have slots on the market (resting or leased).
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.slots_of_node.iter().map(|n| n.key.node())
    }

    pub fn asks(&self) -> &AskBook {
        &self.asks
    }
    pub fn bids(&self) -> &BidBook {
        &self.bids
    }
    /// The earliest pending deadline (ready timeout or period end), so a caller
    /// knows when `tick` next has work.
    pub fn next_deadline(&mut self) -> Option<Time> {
        let leases = &self.leases;
        self.deadlines.first_live(|at, l| leases.get(l).is_some_and(|l| l.deadline == at)).map(|d| d.0)
    }

    // ---- money ----

    pub fn open_account(&mut self, account: AccountId, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        if self.balances.contains_key(&account) {
            return Err(MarketError::AccountExists(account));
        }
        self.emit(Event::AccountOpened { account, at: now });
        Ok(())
    }

    /// Money from outside (the payment provider stands here) into `available`.
    pub fn deposit(&mut self, account: AccountId, amount: Cents, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        check_amount(amount)?;
        let balance = self.balance_of(account)?;
        balance.available.checked_add(amount).ok_or(MarketError::Overflow)?;
        self.world.checked_sub(amount).ok_or(MarketError::Overflow)?;
        self.emit(Event::Deposited { account, amount, at: now });
        Ok(())
    }

    pub fn withdraw(&mut self, account: AccountId, amount: Cents, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        check_amount(amount)?;
        let balance = self.balance_of(account)?;
        if balance.available < amount {
            return Err(MarketError::InsufficientFunds { needed: amount, available: balance.available });
        }
        self.emit(Event::Withdrawn { account, amount, at: now });
        Ok(())
    }

    // ---- orders ----

    /// Offers one slot. It trades at once with the best resting bid it satisfies
    /// (at the bid's price), or rests.
    pub fn place_sell(&mut self, account: AccountId, req: SellRequest, now: Time) -> Result<OrderId, MarketError> {
        self.check_time(now)?;
        self.balance_of(account)?;
        req.validate()?;
        let order = self.alloc_order();
        // Its place in the slot table, known from its id, and its node's record are
        // fetched while the book is updated.
        self.sells.prefetch(order);
        self.slots_of_node.prefetch(req.node.into());
        self.emit(Event::SellPlaced {
            order,
            account,
            node: req.node,
            slot: req.slot,
            ask: req.ask,
            kind_asks: req.kind_asks,
            at: now,
        });
        self.match_resting_sell(order, now);
        Ok(order)
    }

    /// Asks for CPUs. Escrow for one period of every CPU at the bid is held at once;
    /// the order fills from the best asks that meet its requirements (each at its
    /// ask) and rests with the remainder.
    pub fn place_buy(&mut self, account: AccountId, req: BuyRequest, now: Time) -> Result<OrderId, MarketError> {
        self.check_time(now)?;
        let balance = self.balance_of(account)?;
        req.validate()?;
        let escrow = req.escrow_per_cpu().checked_mul(req.cpus as Cents).ok_or(MarketError::Overflow)?;
        if balance.available < escrow {
            return Err(MarketError::InsufficientFunds { needed: escrow, available: balance.available });
        }
        let order = self.alloc_order();
        // Where the order and its first leases will be written is known from their ids:
        // those trips to memory are started now and made while the book is searched,
        // which is done before the order is written (placing it does not change the
        // asks, so the search finds what it would have found after).
        self.buys.prefetch(order);
        for lease in (1..=(req.cpus as u64).min(MAX_N as u64)).map(|n| LeaseId(order.0 + n)) {
            self.leases.prefetch(lease);
        }
        let first = self.search_asks(&req.requirements, req.max_price, req.cpus);
        self.emit(Event::BuyPlaced { order, account, request: req, escrow, at: now });
        self.fill_buy(order, first, now);
        Ok(order)
    }

    /// Cancels a buy order: its open CPUs leave the book and its leases end now,
    /// charged for the time they delivered.
    pub fn cancel_buy(&mut self, account: AccountId, order: OrderId, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        let o = self.buys.get(order).ok_or(MarketError::UnknownOrder(order))?;
        if o.account != account {
            return Err(MarketError::NotYourOrder { order });
        }
        let leases = o.leases.clone();
        // Each lease's record, then its slot's, all fetched at once rather than in turn.
        for &lease in &leases {
            self.leases.prefetch(lease);
        }
        self.emit(Event::BuyCancelled { order, released: o.escrow(), at: now });
        for &lease in &leases {
            self.sells.prefetch(self.leases.at(lease).sell);
        }
        for lease in leases {
            self.end_lease(lease, EndReason::CancelledByBuyer, now, now);
        }
        Ok(())
    }

    /// Ends one lease of the buyer's, now; its order does not look for a replacement.
    pub fn cancel_lease(&mut self, account: AccountId, lease: LeaseId, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        let l = self.leases.get(lease).ok_or(MarketError::UnknownLease(lease))?;
        if l.buyer != account {
            return Err(MarketError::NotYourLease { lease });
        }
        self.end_lease(lease, EndReason::CancelledByBuyer, now, now);
        Ok(())
    }

    /// The seller gives a lease back now (its work could not run, say): it ends
    /// "seller withdrew", charged for the time delivered, and the buyer's order
    /// looks for another slot. The slot stays on the market.
    pub fn release_lease(&mut self, account: AccountId, lease: LeaseId, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        let l = self.leases.get(lease).ok_or(MarketError::UnknownLease(lease))?;
        if l.seller != account {
            return Err(MarketError::NotYourLease { lease });
        }
        self.end_lease(lease, EndReason::SellerWithdrew, now, now);
        Ok(())
    }

    /// Takes a slot off the market: at once if it rests, at the end of its lease
    /// period if it is leased.
    pub fn cancel_sell(&mut self, account: AccountId, order: OrderId, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        let o = self.own_sell(account, order)?;
        if o.withdrawn {
            return Err(MarketError::AlreadyWithdrawn { order });
        }
        self.emit(Event::SellWithdrawn { order, at: now });
        Ok(())
    }

    /// Changes a slot's ask. A resting slot loses its time priority and may trade at
    /// once; a leased slot's new ask applies when its lease comes up for renewal.
    pub fn reprice_sell(&mut self, account: AccountId, order: OrderId, ask: u64, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        let o = self.own_sell(account, order)?;
        if o.withdrawn {
            return Err(MarketError::AlreadyWithdrawn { order });
        }
        SellRequest { node: o.node, slot: o.slot, ask, kind_asks: o.kind_asks }.validate()?;
        let resting = o.is_resting();
        self.emit(Event::SellRepriced { order, ask, at: now });
        if resting {
            self.match_resting_sell(order, now);
        }
        Ok(())
    }

    // ---- leases ----

    /// The seller's report that the buyer's work is running: metering starts now.
    pub fn lease_ready(&mut self, account: AccountId, lease: LeaseId, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        let l = self.leases.get(lease).ok_or(MarketError::UnknownLease(lease))?;
        if l.seller != account {
            return Err(MarketError::NotYourLease { lease });
        }
        if l.running {
            return Err(MarketError::NotAwaitingReady { lease });
        }
        if now > l.deadline {
            return Err(MarketError::ReadyTooLate { lease, deadline: l.deadline });
        }
        self.emit(Event::LeaseReady { lease, at: now });
        Ok(())
    }

    /// A seller's node went silent. Its slots leave the market; its leases end
    /// "seller lost", metered up to `last_seen` (its last heartbeat); their orders
    /// look for other slots. Returns the leases ended.
    pub fn seller_lost(&mut self, node: NodeId, last_seen: Time, now: Time) -> Result<Vec<LeaseId>, MarketError> {
        self.check_time(now)?;
        let slots = NodeKey::of(node).and_then(|n| self.slots_of_node.get(n)).map(|n| n.slots.clone()).unwrap_or_default();
        let mut ended = Vec::new();
        for order in slots {
            let o = self.sells.at(order);
            let lease = o.lease();
            if !o.withdrawn {
                self.emit(Event::SellWithdrawn { order, at: now });
            }
            if let Some(lease) = lease {
                ended.push(lease);
            }
        }
        for &lease in &ended {
            self.end_lease(lease, EndReason::SellerLost, last_seen, now);
        }
        Ok(ended)
    }

    /// A buyer's node went silent: its leases end "buyer lost", metered up to
    /// `last_seen`, and their orders do not look for replacements.
    pub fn buyer_lost(&mut self, account: AccountId, last_seen: Time, now: Time) -> Result<Vec<LeaseId>, MarketError> {
        self.check_time(now)?;
        self.balance_of(account)?;
        let mut ended: Vec<LeaseId> = self.leases.iter().filter(|l| l.buyer == account).map(|l| l.id).collect();
        ended.sort_unstable();
        for &lease in &ended {
            self.end_lease(lease, EndReason::BuyerLost, last_seen, now);
        }
        Ok(ended)
    }

    /// The kill switch: stops matching and ends every lease now ("exchange halted";
    /// metering stops, unspent escrow returns). Orders keep their place and their
    /// CPUs; nothing trades until [`Market::resume`]. Returns the leases ended.
    pub fn halt(&mut self, now: Time) -> Result<Vec<LeaseId>, MarketError> {
        self.check_time(now)?;
        if self.halted {
            return Err(MarketError::Halted);
        }
        self.emit(Event::Halted { at: now });
        let mut ended: Vec<LeaseId> = self.leases.iter().map(|l| l.id).collect();
        ended.sort_unstable();
        for &lease in &ended {
            self.end_lease(lease, EndReason::ExchangeHalted, now, now);
        }
        Ok(ended)
    }

    /// Restarts matching: every resting bid, best first, takes what it can.
    pub fn resume(&mut self, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        if !self.halted {
            return Err(MarketError::NotHalted);
        }
        self.emit(Event::Resumed { at: now });
        let mut bids: Vec<(u64, u64, OrderId)> =
            self.buys.iter().filter(|o| o.resting).map(|o| (u64::MAX - o.max_price(), o.seq, o.id)).collect();
        bids.sort_unstable();
        for (_, _, order) in bids {
            self.fill_buy(order, None, now);
        }
        Ok(())
    }

    /// Runs everything due by `now`: ready timeouts and period ends (renewal or end),
    /// in deadline order.
    pub fn tick(&mut self, now: Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        loop {
            let leases = &self.leases;
            let live = |at, l| leases.get(l).is_some_and(|l: &LeaseRec| l.deadline == at);
            let Some((deadline, lease)) = self.deadlines.first_live(live) else { break };
            if deadline > now {
                break;
            }
            let l = self.leases.at(lease);
            if l.running {
                self.end_period(lease, deadline, now);
            } else {
                let sell = l.sell;
                if !self.sells.at(sell).withdrawn {
                    // A seller that cannot start what it sold is not offered again until it re-posts.
                    self.emit(Event::SellWithdrawn { order: sell, at: deadline });
                }
                self.end_lease(lease, EndReason::ReadyTimeout, deadline, now);
            }
        }
        Ok(())
    }

    /// Meters every running lease up to `now`, or up to its node's last heartbeat
    /// when `alive_until` says the node has been silent since, and settles whole cents.
    pub fn settle(&mut self, now: Time, alive_until: impl Fn(NodeId) -> Time) -> Result<(), MarketError> {
        self.check_time(now)?;
        let mut running: Vec<(LeaseId, NodeId)> = self
            .leases
            .iter()
            .filter(|l| l.running)
            .map(|l| (l.id, l.node))
            .collect();
        running.sort_unstable();
        for (lease, node) in running {
            self.settle_lease(lease, now.min(alive_until(node)));
        }
        Ok(())
    }

    // ---- internals that emit ----

    fn check_time(&self, now: Time) -> Result<(), MarketError> {
        if now < self.now {
            return Err(MarketError::TimeWentBackwards { now, last: self.now });
        }
        Ok(())
    }

    fn balance_of(&self, account: AccountId) -> Result<Balance, MarketError> {
        self.balances.get(&account).copied().ok_or(MarketError::UnknownAccount(account))
    }

    fn own_sell(&self, account: AccountId, order: OrderId) -> Result<&SlotRec, MarketError> {
        let o = self.sells.get(order).ok_or(MarketError::UnknownOrder(order))?;
        if o.account != account {
            return Err(MarketError::NotYourOrder { order });
        }
        Ok(o)
    }

    fn alloc_order(&self) -> OrderId {
        OrderId(self.next_id)
    }

    fn emit(&mut self, event: Event) {
        self.apply(&event);
        self.outbox.push(event);
    }

    /// Fills a buy order's open CPUs from the best fitting asks, each at its ask; what
    /// is left rests in the book.
    /// `first`: what a search of the book for the order as it stands found, if one
    /// was made (`search_asks`).
    fn fill_buy(&mut self, order: OrderId, mut first: Option<ArrayVec<OrderId, MAX_N>>, now: Time) {
        while !self.halted {
            let o = self.buys.at(order);
            if o.open == 0 {
                return;
            }
            let want = (o.open as usize).min(MAX_N);
            let kind = o.kind();
            let fits = match first.take() {
                Some(fits) => fits,
                None => self.search_asks(&o.requirements, o.max_price(), o.open).unwrap_or_default(),
            };
            for &sell in &fits {
                let ask = self.sells.at(sell).ask_for(kind);
                self.open_lease(order, sell, ask, PriceSide::Ask, now);
            }
            if fits.len() < want {
                break;
            }
        }
        if !self.buys.at(order).resting {
            self.emit(Event::BuyRested { order, at: now });
        }
    }

    /// The best few asks for `cpus` at once (up to `MAX_N`): the same slots, in the
    /// same order, as a search per CPU (a lease takes only its own slot out of the
    /// book), for one walk of the index; their slots are prefetched. `None` while
    /// matching is halted.
    fn search_asks(&self, req: &Requirements, max_price: u64, cpus: u32) -> Option<ArrayVec<OrderId, MAX_N>> {
        if self.halted {
            return None;
        }
        let fits = self.asks.best_n(req, max_price, (cpus as usize).min(MAX_N));
        for &sell in &fits {
            self.sells.prefetch(sell);
        }
        Some(fits)
    }

    /// Trades a resting slot with the best bid it satisfies, at the bid.
    fn match_resting_sell(&mut self, order: OrderId, now: Time) {
        if self.halted || self.bids.is_empty() {
            return;
        }
        if let Some(buy) = self.bids.best_for(self.sells.at(order)) {
            let price = self.buys.at(buy).max_price();
            self.open_lease(buy, order, price, PriceSide::Bid, now);
        }
    }

    fn open_lease(&mut self, buy: OrderId, sell: OrderId, price: u64, side: PriceSide, now: Time) {
        let order = self.buys.at(buy);
        let escrow = period_ceiling(price, order.period());
        let refund = order.escrow_per_cpu() - escrow;
        let lease = LeaseId(self.next_id);
        let (buyer, slot) = (order.account, self.sells.at(sell));
        self.emit(Event::LeaseOpened {
            lease,
            buy,
            sell,
            buyer,
            seller: slot.account,
            node: slot.node,
            price,
            side,
            escrow,
            refund,
            deadline: now + self.config.ready_timeout,
            at: now,
        });
    }

    /// Meters a running lease up to `until` (never past its period's end).
    fn settle_lease(&mut self, lease: LeaseId, until: Time) {
        let l = self.leases.at(lease);
        if !l.running {
            return;
        }
        let metered_until = l.metered_until;
        let until = until.min(l.deadline);
        if until <= metered_until {
            return;
        }
        let seconds = until - metered_until;
        let (charge, carry) = accrue(l.carry as u64, seconds, l.price());
        let fee = cumulative_fee(l.charged + charge, self.config.fee_bps) - l.fee;
        self.emit(Event::LeaseSettled { lease, until, seconds, charge, fee, carry });
    }

    /// A running lease reached the end of its period at `end`: it completes, loses its
    /// slot, runs out of funds, or renews.
    fn end_period(&mut self, lease: LeaseId, end: Time, now: Time) {
        self.settle_lease(lease, end);
        let l = self.leases.at(lease);
        let order = self.buys.at(l.buy);
        let slot = self.sells.at(l.sell);
        if order.periods != 0 && l.renewals + 1 >= order.periods {
            return self.end_lease(lease, EndReason::Completed, end, now);
        }
        let ask = slot.ask_for(order.kind());
        if slot.withdrawn || ask > order.max_price() {
            return self.end_lease(lease, EndReason::SellerWithdrew, end, now);
        }
        let price = match l.side {
            PriceSide::Ask => ask,
            PriceSide::Bid => l.price(),
        };
        let escrow = period_ceiling(price, l.period());
        let released = l.escrow;
        let available = self.balances[&l.buyer].available;
        if available + released < escrow {
            return self.end_lease(lease, EndReason::OutOfFunds, end, now);
        }
        self.emit(Event::LeaseRenewed { lease, at: end, price, released, escrow });
    }

    /// Ends a lease at `at` (clamped to what was already metered and to `now`),
    /// then lets its order and its slot trade again where the reason allows.
    fn end_lease(&mut self, lease: LeaseId, reason: EndReason, at: Time, now: Time) {
        let l = self.leases.at(lease);
        self.touch(l.buy, l.sell);
        let at = if l.running { at.clamp(l.metered_until, now.min(l.deadline).max(l.metered_until)) } else { at.min(now) };
        self.settle_lease(lease, at);
        let l = self.leases.at(lease);
        let (buy, sell, buyer, released) = (l.buy, l.sell, l.buyer, l.escrow);
        // (The order is read only if its CPU may reopen: it is still on its way in.)
        let reopen = match reason.reopens_order().then(|| self.buys.get(buy)).flatten() {
            Some(order) => {
                let need = order.escrow_per_cpu();
                (self.balances[&buyer].available + released >= need).then_some(need)
            }
            None => None,
        };
        self.emit(Event::LeaseEnded { lease, reason, at, released, reopen });
        if reopen.is_some() {
            self.fill_buy(buy, None, now);
        }
        if self.sells.get(sell).is_some_and(|s| s.is_resting()) {
            self.match_resting_sell(sell, now);
        }
    }

    // ---- the one place state changes ----

    /// Applies one event. Events come from this market's own commands or from its
    /// log; an event that does not fit the state is a corrupt log, and panics.
    pub fn apply(&mut self, event: &Event) {
        self.now = self.now.max(event.at());
        match *event {
            Event::AccountOpened { account, .. } => {
                self.balances.insert(account, Balance::default());
            }
            Event::Deposited { account, amount, .. } => {
                self.post(account, Bucket::Available, amount);
                self.world -= amount;
            }
            Event::Withdrawn { account, amount, .. } => {
                self.post(account, Bucket::Available, -amount);
                self.world += amount;
            }
            Event::Halted { .. } => self.halted = true,
            Event::Resumed { .. } => self.halted = false,
            Event::SellPlaced { order, account, node, slot, ask, kind_asks, at } => {
                self.take_id(order.0);
                let seq = self.take_seq();
                let o = SellOrder { id: order, account, node, slot, ask, kind_asks, placed_at: at, seq, lease: None, withdrawn: false };
                let o = SlotRec::new(&o);
                self.asks.insert(&o);
                self.sells.insert(o);
                self.add_to_node(node, order);
            }
            Event::SellRepriced { order, ask, .. } => {
                let resting = self.sells.at(order).is_resting();
                if resting {
                    self.asks.remove(self.sells.at(order));
                }
                let seq = if resting { self.take_seq() } else { self.sells.at(order).seq };
                let o = self.sells.at_mut(order);
                o.set_ask(ask);
                o.seq = seq;
                if resting {
                    self.asks.insert(self.sells.at(order));
                }
            }
            Event::SellWithdrawn { order, .. } => {
                let o = self.sells.at_mut(order);
                // Its node's record is needed last, after the book's: start fetching it now.
                self.slots_of_node.prefetch(o.node.into());
                if o.is_resting() {
                    self.remove_sell(order, true);
                } else {
                    o.withdrawn = true;
                }
            }
            Event::BuyPlaced { order, account, request, escrow, at } => {
                self.take_id(order.0);
                self.hold(account, escrow);
                let seq = self.take_seq();
                let o = BuyOrder {
                    id: order,
                    account,
                    request,
                    placed_at: at,
                    seq,
                    open: request.cpus,
                    resting: false,
                    leases: SmallVec::new(),
                };
                self.buys.insert(BuyRec::new(&o));
            }
            Event::BuyRested { order, .. } => {
                let o = self.buys.at_mut(order);
                o.resting = true;
                self.bids.insert(self.buys.at(order));
            }
            Event::BuyCancelled { order, released, .. } => {
                let o = self.buys.at(order);
                let account = o.account;
                if o.resting {
                    self.bids.remove(o);
                }
                self.release(account, released);
                let o = self.buys.at_mut(order);
                o.open = 0;
                o.resting = false;
                self.drop_buy_if_done(order);
            }
            Event::LeaseOpened { lease, buy, sell, price, side, escrow, refund, deadline, at, .. } => {
                self.take_id(lease.0);
                // Each record looked up once (the books are other fields of `self`).
                let o = self.buys.at_mut(buy);
                let leaves_book = o.resting && o.open == 1;
                if leaves_book {
                    self.bids.remove(o);
                } else if o.resting {
                    self.bids.resize(o, -1);
                }
                let (buyer, period) = (o.account, o.period);
                o.open -= 1;
                o.resting &= !leaves_book;
                o.leases.push(lease);
                self.release(buyer, refund);
                let s = self.sells.at_mut(sell);
                self.asks.remove(s);
                let (seller, node) = (s.account, s.node);
                s.set_lease(Some(lease));
                let mut l = LeaseRec {
                    id: lease,
                    buy,
                    sell,
                    buyer,
                    escrow,
                    deadline,
                    metered_until: 0,
                    renewals: 0,
                    carry: 0,
                    running: false,
                    side,
                    seller,
                    node,
                    opened_at: at,
                    period_start: 0,
                    delivered: 0,
                    charged: 0,
                    fee: 0,
                    price: 0,
                    period,
                };
                l.set_price(price);
                self.leases.insert(l);
                self.deadlines.push(deadline, lease);
            }
            Event::LeaseReady { lease, at } => {
                let l = self.leases.at_mut(lease);
                l.run_from(at);
                self.deadlines.push(l.deadline, lease);
                self.compact_deadlines();
            }
            Event::LeaseSettled { lease, until, seconds, charge, fee, carry } => {
                let l = self.leases.at_mut(lease);
                assert!(l.running, "{lease} settled while not running");
                assert_eq!(l.metered_until + seconds, until, "{lease} settled over a gap or an overlap");
                l.metered_until = until;
                l.delivered += seconds;
                l.carry = u16::try_from(carry).expect("a carry stays under 3600");
                l.charged += charge;
                l.fee += fee;
                l.escrow -= charge;
                let (buyer, seller) = (l.buyer, l.seller);
                self.post(buyer, Bucket::Escrow, -charge);
                self.post(seller, Bucket::Available, charge - fee);
                self.fees += fee;
            }
            Event::LeaseRenewed { lease, at, price, released, escrow } => {
                let l = self.leases.at_mut(lease);
                l.set_price(price);
                l.renewals += 1;
                l.escrow = escrow;
                l.run_from(at);
                self.deadlines.push(l.deadline, lease);
                let buyer = l.buyer;
                self.release(buyer, released);
                self.hold(buyer, escrow);
            }
            Event::LeaseEnded { lease, released, reopen, .. } => {
                let l = self.leases.remove(lease).expect("ended lease exists");
                self.compact_deadlines();
                self.release(l.buyer, released);
                let o = self.buys.at_mut(l.buy);
                o.leases.retain(|x| *x != lease);
                if reopen.is_some() {
                    // The reopened CPU trades at once or rests (`BuyRested`) like a new order.
                    o.open += 1;
                    if o.resting {
                        self.bids.resize(o, 1);
                    }
                }
                let done = o.open == 0 && o.leases.is_empty();
                if let Some(escrow) = reopen {
                    self.hold(l.buyer, escrow);
                }
                if done {
                    self.buys.remove(l.buy);
                }
                let s = self.sells.at_mut(l.sell);
                s.set_lease(None);
                if s.withdrawn {
                    self.remove_sell(l.sell, false);
                } else {
                    // A fresh time priority (`take_seq`, inline: `s` borrows the slot table).
                    s.seq = self.next_seq;
                    self.next_seq += 1;
                    self.asks.insert(s);
                }
            }
        }
    }

    /// Starts bringing in a buy order and a slot together, before either is needed:
    /// on a market larger than the CPU's caches each is a trip to memory, and two
    /// trips started side by side are made at once, where the code that uses them
    /// (far apart) would make them in turn.
    fn touch(&self, buy: OrderId, sell: OrderId) {
        self.buys.prefetch(buy);
        self.sells.prefetch(sell);
    }

    fn compact_deadlines(&mut self) {
        self.deadlines.compact(self.leases.len(), self.leases.iter().map(|l| (l.deadline, l.id)));
    }

    fn take_id(&mut self, id: u64) {
        self.next_id = self.next_id.max(id + 1);
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// The one place an account's balance changes.
    fn post(&mut self, account: AccountId, bucket: Bucket, amount: Cents) {
        self.post_both(account, bucket, amount, 0);
    }

    /// Adds `amount` to the `first` bucket and `to_other` to the other one (either may
    /// be negative), looking the account up once: holding and releasing escrow move
    /// money between an account's two buckets on most events.
    fn post_both(&mut self, account: AccountId, first: Bucket, amount: Cents, to_other: Cents) {
        if amount == 0 && to_other == 0 {
            return;
        }
        let b = self.balances.get_mut(&account).expect("account of an event exists");
        let other = match first {
            Bucket::Available => {
                b.available += amount;
                b.escrow += to_other;
                Bucket::Escrow
            }
            Bucket::Escrow => {
                b.escrow += amount;
                b.available += to_other;
                Bucket::Available
            }
        };
        if let Some(journal) = &mut self.journal {
            let event = self.outbox.len();
            for (bucket, amount) in [(first, amount), (other, to_other)] {
                if amount != 0 {
                    journal.push(Posting { event, account, bucket, amount });
                }
            }
        }
    }

    fn hold(&mut self, account: AccountId, amount: Cents) {
        self.post_both(account, Bucket::Available, -amount, amount);
    }

    fn release(&mut self, account: AccountId, amount: Cents) {
        self.post_both(account, Bucket::Escrow, -amount, amount);
    }

    /// Removes a slot from the market (and from the book, if it rests there).
    fn remove_sell(&mut self, order: OrderId, in_book: bool) {
        let o = self.sells.remove(order).expect("removed order exists");
        if in_book {
            self.asks.remove(&o);
        }
        let n = self.slots_of_node.at_mut(o.node.into());
        n.slots.retain(|x| *x != order);
        if n.slots.is_empty() {
            self.slots_of_node.remove(o.node.into());
        }
    }

    fn add_to_node(&mut self, node: NodeId, order: OrderId) {
        match self.slots_of_node.get_mut(node.into()) {
            Some(n) => n.slots.push(order),
            None => self.slots_of_node.insert(NodeRec { key: node.into(), slots: [order].into_iter().collect() }),
        }
    }

    fn drop_buy_if_done(&mut self, order: OrderId) {
        let o = self.buys.at(order);
        if o.open == 0 && o.leases.is_empty() {
            self.buys.remove(order);
        }
    }
}

fn check_amount(amount: Cents) -> Result<(), MarketError> {
    if amount <= 0 {
        return Err(MarketError::InvalidAmount { amount, reason: "must be positive" });
    }
    if amount > MAX_TRANSFER {
        return Err(MarketError::InvalidAmount { amount, reason: "above the largest single transfer" });
    }
    Ok(())
}

/// A canonical, comparable picture of the whole state: what replay must
/// reproduce, and what the exchange stores so that a restart need not replay the
/// whole log. The book fields are derived (kept for comparison).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub now: Time,
    pub next_id: u64,
    pub next_seq: u64,
    pub world: Cents,
    pub fees: Cents,
    pub balances: Vec<(AccountId, Balance)>,
    pub sells: Vec<SellOrder>,
    pub buys: Vec<BuyOrder>,
    pub leases: Vec<Lease>,
    pub deadlines: Vec<(Time, LeaseId)>,
    pub halted: bool,
    pub asks: Vec<OrderId>,
    pub bids: Vec<OrderId>,
}

impl Market {
    /// Rebuilds a market from a snapshot; it then behaves exactly as the market the
    /// snapshot was taken from.
    pub fn restore(config: MarketConfig, s: Snapshot) -> Market {
        let mut m = Market::new(config);
        let nodes = s.sells.iter().map(|o| o.node).collect::<std::collections::HashSet<_>>().len();
        m.reserve(Room { slots: s.sells.len(), nodes, buy_orders: s.buys.len(), leases: s.leases.len() });
        (m.now, m.next_id, m.next_seq, m.world, m.fees, m.halted) =
            (s.now, s.next_id, s.next_seq, s.world, s.fees, s.halted);
        m.balances = s.balances.into_iter().collect();
        // Slots of a node in id order: the order they were placed in, as seller_lost expects.
        for o in s.sells {
            let o = SlotRec::new(&o);
            if o.is_resting() {
                m.asks.insert(&o);
            }
            m.add_to_node(o.node, o.id);
            m.sells.insert(o);
        }
        for o in s.buys {
            let o = BuyRec::new(&o);
            if o.resting {
                m.bids.insert(&o);
            }
            m.buys.insert(o);
        }
        for l in s.leases {
            m.deadlines.push(l.deadline, l.id);
            m.leases.insert(LeaseRec::new(&l));
        }
        m
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut balances: Vec<_> = self.accounts().collect();
        balances.sort_by_key(|b| b.0);
        let mut sells: Vec<_> = self.sell_orders().collect();
        sells.sort_by_key(|o| o.id);
        let mut buys: Vec<_> = self.buy_orders().collect();
        buys.sort_by_key(|o| o.id);
        let mut leases: Vec<_> = self.leases().collect();
        leases.sort_by_key(|l| l.id);
        let mut deadlines: Vec<_> = leases.iter().map(|l| (l.deadline, l.id)).collect();
        deadlines.sort_unstable();
        Snapshot {
            now: self.now,
            next_id: self.next_id,
            next_seq: self.next_seq,
            world: self.world,
            fees: self.fees,
            balances,
            sells,
            buys,
            leases,
            deadlines,
            halted: self.halted,
            asks: self.asks.entries(),
            bids: self.bids.entries(),
        }
    }

    /// Checks every invariant the market promises; returns the first one broken.
    /// Cheap enough for tests and simulations, not for every production operation.
    pub fn check_invariants(&self) -> Result<(), String> {
        // Money: double-entry, so everything sums to zero; nothing but the world negative.
        let mut sum = self.world as i128 + self.fees as i128;
        if self.fees < 0 {
            return Err(format!("fee account is negative: {}", self.fees));
        }
        let mut expected_escrow: HashMap<AccountId, Cents> = HashMap::new();
        for (account, b) in &self.balances {
            if b.available < 0 || b.escrow < 0 {
                return Err(format!("{account} has a negative balance: {b:?}"));
            }
            sum += b.available as i128 + b.escrow as i128;
        }
        if sum != 0 {
            return Err(format!("balances sum to {sum}, not zero"));
        }
        // Escrow held equals what open orders and leases need.
        for o in self.buys.iter() {
            *expected_escrow.entry(o.account).or_default() += o.escrow();
            if o.resting != (o.open > 0) {
                return Err(format!("{} has {} open CPUs but resting is {}", o.id, o.open, o.resting));
            }
            if o.open == 0 && o.leases.is_empty() {
                return Err(format!("{} is done but still listed", o.id));
            }
            for lease in &o.leases {
                match self.leases.get(*lease) {
                    Some(l) if l.buy == o.id => {}
                    _ => return Err(format!("{} lists {lease}, which does not point back", o.id)),
                }
            }
        }
        let scheduled: BTreeSet<(Time, LeaseId)> = self.deadlines.entries().collect();
        let mut leased_slots = BTreeSet::new();
        for l in self.leases.iter() {
            *expected_escrow.entry(l.buyer).or_default() += l.escrow;
            if l.escrow < 0 {
                return Err(format!("{} holds negative escrow {}", l.id, l.escrow));
            }
            if !leased_slots.insert(l.sell) {
                return Err(format!("slot {} is in two leases", l.sell));
            }
            match self.sells.get(l.sell) {
                Some(s) if s.lease() == Some(l.id) => {}
                _ => return Err(format!("{}'s slot {} does not point back", l.id, l.sell)),
            }
            if !self.buys.get(l.buy).is_some_and(|o| o.leases.contains(&l.id)) {
                return Err(format!("{}'s order {} does not list it", l.id, l.buy));
            }
            if !scheduled.contains(&(l.deadline, l.id)) {
                return Err(format!("{} has no deadline scheduled", l.id));
            }
            if l.price() > self.buys.at(l.buy).max_price() {
                return Err(format!("{} runs at {} above its bid", l.id, l.price));
            }
            if l.carry >= 3600 {
                return Err(format!("{} carries {} cent-seconds per hour", l.id, l.carry));
            }
        }
        for (account, b) in &self.balances {
            let expected = expected_escrow.get(account).copied().unwrap_or(0);
            if b.escrow != expected {
                return Err(format!("{account} holds {} in escrow but its orders and leases need {expected}", b.escrow));
            }
        }
        // The book holds exactly the resting slots and open bids.
        let asks = self.asks.entries();
        let resting = self.sells.iter().filter(|s| s.is_resting()).count();
        if asks.len() != resting || asks.iter().any(|id| !self.sells.at(*id).is_resting()) {
            return Err(format!("the ask book holds {} slots, {resting} rest", asks.len()));
        }
        let bids = self.bids.entries();
        let open = self.buys.iter().filter(|o| o.open > 0).count();
        if bids.len() != open || bids.iter().any(|id| self.buys.at(*id).open == 0) {
            return Err(format!("the bid book holds {} orders, {open} are open", bids.len()));
        }
        for kind in SandboxKind::ALL {
            let slots = self.sells.iter().filter(|s| s.is_resting() && s.slot.kinds.contains(kind)).count();
            let depth: u32 = self.asks.depth(kind).iter().map(|d| d.1).sum();
            if (self.asks.len(kind), depth as usize) != (slots, slots) {
                return Err(format!("the {kind} ask book counts {} slots with depth {depth}, {slots} rest", self.asks.len(kind)));
            }
            let depth: u32 = self.bids.depth(kind).iter().map(|d| d.1).sum();
            let open: u32 = self.buys.iter().filter(|o| o.kind() == kind).map(|o| o.open).sum();
            if depth != open {
                return Err(format!("the {kind} bid depth shows {depth} CPUs, {open} are open"));
            }
        }
        // No resting bid could trade with a resting ask: the book is uncrossed
        // (unless matching is halted).
        for s in self.sells.iter().filter(|s| s.is_resting() && !self.halted) {
            if let Some(b) = self.bids.best_for(s) {
                return Err(format!("resting {} and {} could trade", s.id, b));
            }
        }
        self.asks.check()?;
        self.bids.check()?;
        Ok(())
    }
}
