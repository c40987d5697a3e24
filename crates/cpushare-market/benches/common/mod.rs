//! The benchmark workload: a market with 100,000 resting slots of varied
//! attributes, and a realistic stream of order operations against it: filtered
//! buys (most take a slot at once), buyers ending leases (the slot returns to
//! the book), sellers adding and withdrawing slots, buyers giving up on orders
//! nothing fits. The stream is steady-state: leases end about as fast as buys
//! open them, and slot churn holds the book at 100,000.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};

use cpushare_market::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const RESTING: usize = 100_000;
const SELLERS: u64 = 10_000;
const BUYERS: u64 = 1_000;

pub use cpushare_market::sim::{random_requirements as requirements, random_slot as slot};

pub const OP_NAMES: [&str; 5] = ["place sell", "place buy", "end lease", "withdraw slot", "cancel buy"];
const SELL: usize = 0;
const WITHDRAW: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Planned {
    Buy(AccountId, BuyRequest),
    EndLease,
    /// A new slot if the book is below its size, else a withdrawal (picked by the number).
    Churn(AccountId, NodeId, SlotAttributes, u64, usize),
    GiveUp,
}

/// Drives the market through the planned operation mix. Randomness is drawn up
/// front so the timed loop measures the market, not the generator.
pub struct Driver {
    pub market: Market,
    plan: Vec<Planned>,
    next: usize,
    now: Time,
    leases: VecDeque<(AccountId, LeaseId)>,
    resting: Vec<(AccountId, OrderId)>,
    open_buys: VecDeque<(AccountId, OrderId)>,
    pub ops: u64,
    keep_events: bool,
}

impl Driver {
    /// `keep_events`: leave every event, from the first, for the caller to take.
    pub fn new(seed: u64, keep_events: bool) -> Driver {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut market = Market::new(MarketConfig::default());
        for a in 0..SELLERS + BUYERS {
            market.open_account(AccountId(a), 0).unwrap();
        }
        for b in SELLERS..SELLERS + BUYERS {
            market.deposit(AccountId(b), money::MAX_TRANSFER, 0).unwrap();
        }
        let mut resting = Vec::with_capacity(RESTING);
        for i in 0..RESTING {
            let account = AccountId(r.gen_range(0..SELLERS));
            let (s, ask) = slot(&mut r);
            let id = market.place_sell(account, SellRequest::new(NodeId(i as u64 / 4), s, ask), 0).unwrap();
            resting.push((account, id));
        }
        let plan = (0..1 << 20)
            .map(|_| match r.gen_range(0..100) {
                0..=34 => {
                    let (req, max_price) = requirements(&mut r);
                    let cpus = [1, 1, 1, 1, 1, 1, 1, 2, 2, 4][r.gen_range(0..10)];
                    let mut request = BuyRequest::new(cpus, max_price, req.kind);
                    request.requirements = req;
                    Planned::Buy(AccountId(r.gen_range(SELLERS..SELLERS + BUYERS)), request)
                }
                35..=79 => Planned::EndLease,
                80..=94 => {
                    let (s, ask) = slot(&mut r);
                    let seller = AccountId(r.gen_range(0..SELLERS));
                    Planned::Churn(seller, NodeId(r.gen_range(0..RESTING as u64)), s, ask, r.gen_range(0..usize::MAX))
                }
                _ => Planned::GiveUp,
            })
            .collect();
        if !keep_events {
            market.discard_events();
        }
        Driver { market, plan, next: 0, now: 0, leases: VecDeque::new(), resting, open_buys: VecDeque::new(), ops: 0, keep_events }
    }

    /// One order operation; returns its kind (an index into `OP_NAMES`).
    pub fn step(&mut self) -> usize {
        let op = self.plan[self.next];
        let kind = match op {
            Planned::Buy(..) => 1,
            Planned::EndLease => 2,
            Planned::Churn(..) if self.resting_slots() < RESTING => SELL,
            Planned::Churn(..) => WITHDRAW,
            Planned::GiveUp => 4,
        };
        self.next = (self.next + 1) % self.plan.len();
        let m = &mut self.market;
        match op {
            Planned::Churn(account, node, slot, ask, _) if kind == SELL => {
                let id = m.place_sell(account, SellRequest::new(node, slot, ask), self.now).unwrap();
                self.resting.push((account, id));
            }
            Planned::Buy(account, request) => {
                let id = m.place_buy(account, request, self.now).unwrap();
                let o = m.buy_order(id).unwrap();
                self.leases.extend(o.leases.iter().map(|l| (account, *l)));
                if o.open > 0 {
                    self.open_buys.push_back((account, id));
                }
            }
            Planned::EndLease => {
                let Some((account, lease)) = self.leases.pop_front() else { return kind };
                let Some(slot) = m.lease(lease).map(|l| l.sell) else { return kind };
                m.cancel_lease(account, lease, self.now).unwrap();
                self.resting.push((m.sell_order(slot).unwrap().account, slot));
            }
            Planned::Churn(.., pick) => {
                // Skip entries that traded since; withdraw the first still resting.
                while !self.resting.is_empty() {
                    let (account, id) = self.resting.swap_remove(pick % self.resting.len());
                    if m.sell_order(id).is_some_and(|s| s.is_resting()) {
                        m.cancel_sell(account, id, self.now).unwrap();
                        break;
                    }
                }
            }
            Planned::GiveUp => {
                while let Some((account, id)) = self.open_buys.pop_front() {
                    if let Some(o) = m.buy_order(id) {
                        self.leases.extend(o.leases.iter().map(|l| (account, *l)));
                        m.cancel_buy(account, id, self.now).unwrap();
                        break;
                    }
                }
            }
        }
        self.ops += 1;
        if !self.keep_events && self.ops.is_multiple_of(1024) {
            self.market.discard_events();
        }
        kind
    }

    pub fn resting_slots(&self) -> usize {
        self.market.asks().len(SandboxKind::SeccompStrict)
    }
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
