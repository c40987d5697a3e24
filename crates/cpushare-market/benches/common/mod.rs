//! The benchmark workload: a market in a steady state, with 100,000 slots
//! resting in the book and 100,000 more leased, and a realistic stream of order
//! operations against it: filtered buys (most take slots at once, some rest),
//! buyers ending leases (the slot returns to the book), sellers adding and
//! withdrawing slots, buyers cancelling orders (one that nothing fits yet, or a
//! finished job's, which ends its leases).
//!
//! The stream holds both populations where they started: slot churn keeps the
//! book at 100,000 resting slots, and a lease is ended only while more than
//! 100,000 are live (below that the operation is the next buy instead), so every
//! part of the run measures a market of the same size.
//!
//! The driver learns what happened from the events each operation emits (they
//! are in cache, just written), so the time measured is the market's own: the
//! one record it reads is the slot a withdrawal picks (is it resting?), which
//! the withdrawal itself reads first.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};

use cpushare_market::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::{FxHashMap, FxHashSet};

pub const RESTING: usize = 100_000;
/// Live leases held through the run: half of the market's slots are leased.
pub const LEASED: usize = 100_000;
const SELLERS: u64 = 10_000;
const BUYERS: u64 = 1_000;

pub use cpushare_market::sim::{random_requirements as requirements, random_slot as slot};

pub const OP_NAMES: [&str; 5] = ["place sell", "place buy", "end lease", "withdraw slot", "cancel buy"];
const SELL: usize = 0;
const BUY: usize = 1;
const END: usize = 2;
const WITHDRAW: usize = 3;
const CANCEL: usize = 4;

#[derive(Debug, Clone, Copy)]
enum Planned {
    Buy(AccountId, BuyRequest),
    EndLease,
    /// A new slot if the book is below its size, else a withdrawal (picked by the number).
    Churn(AccountId, NodeId, SlotAttributes, u64, usize),
    CancelBuy,
}

/// A live lease as the driver knows it, from its `LeaseOpened` event.
#[derive(Debug, Clone, Copy)]
struct Live {
    lease: LeaseId,
    buyer: AccountId,
    buy: OrderId,
}

/// Drives the market through the planned operation mix. Randomness is drawn up
/// front so the timed loop measures the market, not the generator.
pub struct Driver {
    pub market: Market,
    plan: Vec<Planned>,
    next: usize,
    /// Buys to place instead of ending a lease while too few are live.
    buys: Vec<Planned>,
    next_buy: usize,
    now: Time,
    /// Live leases in the order they opened (what is ended first), and those ended
    /// before their turn (a cancelled order's later leases), skipped when they come up.
    oldest: VecDeque<Live>,
    ended: FxHashSet<LeaseId>,
    live: usize,
    /// Every slot on the market, with its seller, to pick withdrawals from: a pick
    /// that is leased is passed over (whether it rests is asked of the market, which
    /// a withdrawal reads first anyway).
    slots: Vec<(AccountId, OrderId)>,
    /// Buy orders resting with open CPUs, oldest first (cancelled or filled ones
    /// are skipped), and their buyers and open CPUs.
    waiting: VecDeque<OrderId>,
    open: FxHashMap<OrderId, (AccountId, u32)>,
    /// Events of the market's outbox already read.
    seen: usize,
    pub ops: u64,
    keep_events: bool,
}

impl Driver {
    /// `keep_events`: leave every event, from the first, for the caller to take.
    pub fn new(seed: u64, keep_events: bool) -> Driver {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut market = Market::new(MarketConfig::default());
        // Room for the steady state and some, as an exchange of this size would reserve:
        // no table is moved to a larger one during the run (a one-off stall that is
        // growth, not the steady state this measures).
        let some = |n: usize| n + n / 5;
        market.reserve(Room { slots: some(RESTING + LEASED), nodes: some(RESTING), buy_orders: some(LEASED), leases: some(LEASED) });
        for a in 0..SELLERS + BUYERS {
            market.open_account(AccountId(a), 0).unwrap();
        }
        for b in SELLERS..SELLERS + BUYERS {
            market.deposit(AccountId(b), money::MAX_TRANSFER, 0).unwrap();
        }
        let buy = |r: &mut ChaCha8Rng| {
            let (req, max_price) = requirements(r);
            let cpus = [1, 1, 1, 1, 1, 1, 1, 2, 2, 4][r.gen_range(0..10)];
            let mut request = BuyRequest::new(cpus, max_price, req.kind);
            request.requirements = req;
            Planned::Buy(AccountId(r.gen_range(SELLERS..SELLERS + BUYERS)), request)
        };
        let plan = (0..1 << 20)
            .map(|_| match r.gen_range(0..100) {
                0..=34 => buy(&mut r),
                35..=79 => Planned::EndLease,
                80..=94 => {
                    let (s, ask) = slot(&mut r);
                    let seller = AccountId(r.gen_range(0..SELLERS));
                    Planned::Churn(seller, NodeId(r.gen_range(0..RESTING as u64)), s, ask, r.gen_range(0..usize::MAX))
                }
                _ => Planned::CancelBuy,
            })
            .collect();
        let buys = (0..1 << 16).map(|_| buy(&mut r)).collect();
        let mut d = Driver {
            market,
            plan,
            next: 0,
            buys,
            next_buy: 0,
            now: 0,
            oldest: VecDeque::new(),
            ended: FxHashSet::default(),
            live: 0,
            slots: Vec::with_capacity(2 * (RESTING + LEASED)),
            waiting: VecDeque::new(),
            open: FxHashMap::default(),
            seen: 0,
            ops: 0,
            keep_events,
        };
        // The steady state: as many slots as will rest and be leased, then buys
        // (from the same mix as the stream's) until enough are leased.
        for i in 0..RESTING + LEASED {
            let account = AccountId(r.gen_range(0..SELLERS));
            let (s, ask) = slot(&mut r);
            d.market.place_sell(account, SellRequest::new(NodeId(i as u64 / 4), s, ask), 0).unwrap();
        }
        d.observe();
        while d.live < LEASED {
            let Planned::Buy(account, request) = buy(&mut r) else { unreachable!() };
            d.market.place_buy(account, request, 0).unwrap();
            d.observe();
        }
        if !keep_events {
            d.market.discard_events();
            d.seen = 0;
        }
        d
    }

    /// One order operation; returns its kind (an index into `OP_NAMES`).
    pub fn step(&mut self) -> usize {
        let mut op = self.plan[self.next];
        self.next = (self.next + 1) % self.plan.len();
        if matches!(op, Planned::EndLease) && self.live <= LEASED {
            op = self.buys[self.next_buy];
            self.next_buy = (self.next_buy + 1) % self.buys.len();
        }
        let now = self.now;
        let kind = match op {
            Planned::Buy(account, request) => {
                op_place_buy(&mut self.market, account, request, now);
                BUY
            }
            Planned::EndLease => {
                let l = self.oldest_live();
                op_end_lease(&mut self.market, l.buyer, l.lease, now);
                END
            }
            Planned::Churn(account, node, slot, ask, _) if self.resting_slots() < RESTING => {
                op_place_sell(&mut self.market, account, SellRequest::new(node, slot, ask), now);
                SELL
            }
            Planned::Churn(.., pick) => {
                let (account, id) = self.pick_resting(pick);
                op_withdraw(&mut self.market, account, id, now);
                WITHDRAW
            }
            Planned::CancelBuy => {
                // A buyer gives up on CPUs nothing fits yet, or else the oldest job is done.
                let (account, order) = match self.oldest_waiting() {
                    Some(waiting) => waiting,
                    None => {
                        let l = self.oldest_live();
                        (l.buyer, l.buy)
                    }
                };
                op_cancel_buy(&mut self.market, account, order, now);
                CANCEL
            }
        };
        self.observe();
        self.ops += 1;
        if !self.keep_events && self.ops.is_multiple_of(1024) {
            self.market.discard_events();
            self.seen = 0;
        }
        kind
    }

    /// The oldest live lease, left in the queue: its end (or its order's cancellation)
    /// takes it out.
    fn oldest_live(&mut self) -> Live {
        loop {
            let l = *self.oldest.front().expect("the run keeps leases live");
            if !self.ended.remove(&l.lease) {
                return l;
            }
            self.oldest.pop_front();
        }
    }

    fn oldest_waiting(&mut self) -> Option<(AccountId, OrderId)> {
        while let Some(order) = self.waiting.pop_front() {
            if let Some(&(account, _)) = self.open.get(&order) {
                return Some((account, order));
            }
        }
        None
    }

    /// A resting slot, chosen by `pick`, and taken off the list (it is about to be
    /// withdrawn).
    fn pick_resting(&mut self, mut pick: usize) -> (AccountId, OrderId) {
        loop {
            let at = pick % self.slots.len();
            let (account, id) = self.slots[at];
            if self.market.sell_order(id).expect("a listed slot is on the market").is_resting() {
                self.slots.swap_remove(at);
                return (account, id);
            }
            pick = pick.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        }
    }

    /// Follows the events of the last operation.
    fn observe(&mut self) {
        let seen = self.seen;
        self.seen = self.market.pending_events().len();
        for i in seen..self.seen {
            match self.market.pending_events()[i] {
                Event::SellPlaced { order, account, .. } => self.slots.push((account, order)),
                Event::LeaseOpened { lease, buy, buyer, .. } => {
                    self.live += 1;
                    self.oldest.push_back(Live { lease, buyer, buy });
                    if let Some((_, open)) = self.open.get_mut(&buy) {
                        // A resting order traded with a slot that came to the book.
                        *open -= 1;
                        if *open == 0 {
                            self.open.remove(&buy);
                        }
                    }
                }
                Event::LeaseEnded { lease, .. } => {
                    self.live -= 1;
                    if self.oldest.front().is_some_and(|l| l.lease == lease) {
                        self.oldest.pop_front();
                    } else {
                        self.ended.insert(lease);
                    }
                }
                Event::BuyRested { order, .. } => {
                    let o = self.market.buy_order(order).expect("a resting order exists");
                    self.open.insert(order, (o.account, o.open));
                    self.waiting.push_back(order);
                }
                Event::BuyCancelled { order, .. } => drop(self.open.remove(&order)),
                _ => {}
            }
        }
    }

    /// Resting slots (every slot of this workload offers seccomp-strict).
    pub fn resting_slots(&self) -> usize {
        self.market.asks().len(SandboxKind::SeccompStrict)
    }

    pub fn live_leases(&self) -> usize {
        self.live
    }
}

// One function per kind of operation, never inlined, so that a profile (callgrind's
// inclusive counts) shows what each kind costs.

#[inline(never)]
fn op_place_buy(m: &mut Market, account: AccountId, request: BuyRequest, now: Time) {
    m.place_buy(account, request, now).unwrap();
}

#[inline(never)]
fn op_end_lease(m: &mut Market, buyer: AccountId, lease: LeaseId, now: Time) {
    m.cancel_lease(buyer, lease, now).unwrap();
}

#[inline(never)]
fn op_place_sell(m: &mut Market, account: AccountId, request: SellRequest, now: Time) {
    m.place_sell(account, request, now).unwrap();
}

#[inline(never)]
fn op_withdraw(m: &mut Market, account: AccountId, order: OrderId, now: Time) {
    m.cancel_sell(account, order, now).unwrap();
}

#[inline(never)]
fn op_cancel_buy(m: &mut Market, account: AccountId, order: OrderId, now: Time) {
    m.cancel_buy(account, order, now).unwrap();
}

/// The obvious design, kept as the peer to measure against: resting asks in one
/// price-time ordered map, scanned from the best until one fits.
pub struct ScanBook {
    asks: BTreeMap<(u64, u64), SlotAttributes>,
}

impl ScanBook {
    pub fn new() -> Self {
        ScanBook { asks: BTreeMap::new() }
    }
    pub fn insert(&mut self, ask: u64, seq: u64, slot: SlotAttributes) {
        self.asks.insert((ask, seq), slot);
    }
    pub fn best(&self, req: &Requirements, max_price: u64) -> Option<(u64, u64)> {
        self.asks.range(..=(max_price, u64::MAX)).find(|(_, s)| req.accepts(s)).map(|(k, _)| *k)
    }
}
