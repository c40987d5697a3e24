//! A deterministic simulation of a whole market: many sellers coming and going,
//! buyers placing filtered orders and cancelling them, seeded so that the same
//! configuration always produces the same trades. It is how we size the
//! exchange before anyone needs it, and a soak test of the engine's invariants.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    AccountId, BuyRequest, EndReason, Event, KindSet, LeaseId, Market, MarketConfig, MarketError, NodeId, OrderId,
    Requirements, SandboxKind, SellRequest, SlotAttributes, Time,
};

const HOUR: Time = 3600;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    pub sellers: u32,
    pub buyers: u32,
    /// Simulated time, in seconds.
    pub duration: Time,
    pub market: MarketConfig,
    /// Mean hours a seller stays online, and offline.
    pub mean_online_hours: f64,
    pub mean_offline_hours: f64,
    /// Mean hours between one buyer's orders.
    pub mean_hours_between_orders: f64,
    /// Share of leases whose seller never reports ready.
    pub ready_failure: f64,
    /// Check every invariant of the market once per simulated hour (slow on big markets).
    pub check_invariants: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            sellers: 100_000,
            buyers: 10_000,
            duration: 24 * HOUR,
            market: MarketConfig::default(),
            mean_online_hours: 16.0,
            mean_offline_hours: 4.0,
            mean_hours_between_orders: 3.0,
            ready_failure: 0.01,
            check_invariants: false,
        }
    }
}

/// One simulated hour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HourStats {
    pub hour: u64,
    /// Slots on the market (resting or leased) at the end of the hour.
    pub slots: u64,
    /// Leases alive at the end of the hour.
    pub leased: u64,
    /// Leases running (ready and metered) at the end of the hour.
    pub running: u64,
    /// CPUs that buyers want and no slot fits yet.
    pub waiting_cpus: u64,
    pub trades: u64,
    /// Sum of trade prices (for the mean).
    pub price_sum: u64,
    /// Cents charged to buyers this hour.
    pub charged: i64,
    pub cpu_seconds: u64,
}

impl HourStats {
    pub fn mean_price(&self) -> f64 {
        if self.trades == 0 {
            0.0
        } else {
            self.price_sum as f64 / self.trades as f64
        }
    }

    pub fn utilisation(&self) -> f64 {
        if self.slots == 0 {
            0.0
        } else {
            self.leased as f64 / self.slots as f64
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    pub hours: Vec<HourStats>,
    /// Market operations performed (commands, ticks and settlements).
    pub operations: u64,
    /// Operations the market refused (stale or unaffordable requests, as in life).
    pub refused: u64,
    pub events: u64,
    pub trades: u64,
    pub slots_placed: u64,
    pub buy_orders: u64,
    pub charged: i64,
    pub fees: i64,
    pub cpu_seconds: u64,
    pub ended: BTreeMap<&'static str, u64>,
    /// Largest number of live leases seen.
    pub peak_leases: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    SellerOnline(u32),
    SellerOffline(u32),
    PlaceBuy(u32),
    Ready(LeaseId),
    CancelIfUnfilled(OrderId),
    Cancel(OrderId),
    EndOfHour,
}

struct Seller {
    account: AccountId,
    node: NodeId,
    slots: Vec<(SlotAttributes, u64)>,
}

struct Buyer {
    account: AccountId,
}

/// Runs the simulation. Deterministic: the same config gives the same report.
pub fn run(config: &SimConfig) -> Result<SimReport, String> {
    Sim::new(config).run()
}

struct Sim<'a> {
    config: &'a SimConfig,
    rng: ChaCha8Rng,
    market: Market,
    sellers: Vec<Seller>,
    buyers: Vec<Buyer>,
    queue: BinaryHeap<Reverse<(Time, u64, Action)>>,
    queued: u64,
    report: SimReport,
    hour: HourStats,
}

impl<'a> Sim<'a> {
    fn new(config: &'a SimConfig) -> Self {
        Sim {
            config,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            market: Market::new(config.market),
            sellers: Vec::new(),
            buyers: Vec::new(),
            queue: BinaryHeap::new(),
            queued: 0,
            report: SimReport::default(),
            hour: HourStats::default(),
        }
    }

    fn at(&mut self, t: Time, action: Action) {
        self.queued += 1;
        self.queue.push(Reverse((t, self.queued, action)));
    }

    fn hours(&mut self, mean: f64) -> Time {
        // Exponential: memoryless arrivals and departures.
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        (-u.ln() * mean * HOUR as f64) as Time + 1
    }

    fn run(mut self) -> Result<SimReport, String> {
        self.populate()?;
        self.at(HOUR, Action::EndOfHour);
        while let Some(Reverse((t, _, action))) = self.queue.pop() {
            if t > self.config.duration {
                break;
            }
            self.op(|m| m.tick(t))?;
            match action {
                Action::SellerOnline(s) => self.seller_online(s, t)?,
                Action::SellerOffline(s) => self.seller_offline(s, t)?,
                Action::PlaceBuy(b) => self.place_buy(b, t)?,
                Action::Ready(lease) => {
                    if let Some(seller) = self.market.lease(lease).map(|l| l.seller) {
                        self.op(|m| m.lease_ready(seller, lease, t))?;
                    }
                }
                Action::CancelIfUnfilled(order) => {
                    if let Some(o) = self.market.buy_order(order).filter(|o| o.leases.is_empty()) {
                        let account = o.account;
                        self.op(|m| m.cancel_buy(account, order, t))?;
                    }
                }
                Action::Cancel(order) => {
                    if let Some(account) = self.market.buy_order(order).map(|o| o.account) {
                        self.op(|m| m.cancel_buy(account, order, t))?;
                    }
                }
                Action::EndOfHour => self.end_of_hour(t)?,
            }
            self.observe(t);
        }
        self.market.check_invariants().map_err(|e| format!("invariant broken at the end: {e}"))?;
        Ok(self.report)
    }

    /// Runs one market operation. A refusal is counted (stale requests happen in any
    /// real market); anything else would be a bug, reported as an error.
    fn op<T>(&mut self, f: impl FnOnce(&mut Market) -> Result<T, MarketError>) -> Result<Option<T>, String> {
        self.report.operations += 1;
        match f(&mut self.market) {
            Ok(v) => Ok(Some(v)),
            Err(MarketError::InsufficientFunds { .. } | MarketError::UnknownLease(_) | MarketError::ReadyTooLate { .. }) => {
                self.report.refused += 1;
                Ok(None)
            }
            Err(e) => Err(format!("the market refused a well-formed operation: {e}")),
        }
    }

    fn populate(&mut self) -> Result<(), String> {
        let cfg = self.config;
        for i in 0..cfg.sellers {
            let account = AccountId(1 + i as u64);
            self.op(|m| m.open_account(account, 0))?;
            let seller = self.make_seller(account, NodeId(i as u64));
            self.sellers.push(seller);
            // Most sellers are online when the day starts; the rest arrive over the first hours.
            let start = if self.rng.gen_bool(0.8) { 0 } else { self.hours(cfg.mean_offline_hours) };
            self.at(start, Action::SellerOnline(i));
        }
        for i in 0..cfg.buyers {
            let account = AccountId(1 + cfg.sellers as u64 + i as u64);
            self.op(|m| m.open_account(account, 0))?;
            let funds = self.rng.gen_range(20_000..2_000_000);
            self.op(|m| m.deposit(account, funds, 0))?;
            self.buyers.push(Buyer { account });
            let first = self.hours(cfg.mean_hours_between_orders);
            self.at(first, Action::PlaceBuy(i));
        }
        Ok(())
    }

    fn make_seller(&mut self, account: AccountId, node: NodeId) -> Seller {
        // A machine: one CPU model, one network, several identical slots.
        let (slot, ask) = random_slot(&mut self.rng);
        let n_slots = [1, 1, 2, 2, 2, 4, 4, 8][self.rng.gen_range(0..8)];
        Seller { account, node, slots: vec![(slot, ask); n_slots] }
    }

    fn seller_online(&mut self, s: u32, t: Time) -> Result<(), String> {
        let (account, node) = (self.sellers[s as usize].account, self.sellers[s as usize].node);
        for i in 0..self.sellers[s as usize].slots.len() {
            let (slot, ask) = self.sellers[s as usize].slots[i];
            self.op(|m| m.place_sell(account, SellRequest::new(node, slot, ask), t))?;
            self.report.slots_placed += 1;
        }
        let d = self.hours(self.config.mean_online_hours);
        self.at(t + d, Action::SellerOffline(s));
        Ok(())
    }

    fn seller_offline(&mut self, s: u32, t: Time) -> Result<(), String> {
        let node = self.sellers[s as usize].node;
        // The exchange notices silence some seconds after the last heartbeat.
        let last_seen = t.saturating_sub(self.rng.gen_range(5..30));
        self.op(|m| m.seller_lost(node, last_seen, t))?;
        let d = self.hours(self.config.mean_offline_hours);
        self.at(t + d, Action::SellerOnline(s));
        Ok(())
    }

    fn place_buy(&mut self, b: u32, t: Time) -> Result<(), String> {
        let account = self.buyers[b as usize].account;
        let (requirements, max_price) = random_requirements(&mut self.rng);
        let r = &mut self.rng;
        let cpus = [1, 1, 2, 4, 4, 8, 8, 16, 32, 64][r.gen_range(0..10)];
        let period = if r.gen_bool(0.8) { HOUR } else { 600 };
        let periods = if r.gen_bool(0.8) { Some(r.gen_range(1..8)) } else { None };
        let request = BuyRequest { cpus, max_price, requirements, period, periods, attended: false };
        let patience = self.hours(1.0);
        let cancel_after = self.hours(8.0);
        let next = self.hours(self.config.mean_hours_between_orders);
        self.at(t + next, Action::PlaceBuy(b));
        let mut placed = self.op(|m| m.place_buy(account, request, t))?;
        if placed.is_none() {
            // Out of money: this buyer tops up, as a real one would, and tries again.
            self.op(|m| m.deposit(account, 1_000_000, t))?;
            placed = self.op(|m| m.place_buy(account, request, t))?;
        }
        if let Some(order) = placed {
            self.report.buy_orders += 1;
            self.at(t + patience, Action::CancelIfUnfilled(order));
            if periods.is_none() {
                self.at(t + cancel_after, Action::Cancel(order));
            }
        }
        Ok(())
    }

    fn end_of_hour(&mut self, t: Time) -> Result<(), String> {
        self.op(|m| m.settle(t, |_| t))?;
        self.observe(t);
        let mut stats = std::mem::take(&mut self.hour);
        stats.hour = t / HOUR;
        stats.slots = self.market.sell_orders().count() as u64;
        stats.leased = self.market.leases().count() as u64;
        stats.running =
            self.market.leases().filter(|l| matches!(l.state, crate::LeaseState::Running { .. })).count() as u64;
        stats.waiting_cpus = self.market.buy_orders().map(|o| o.open as u64).sum();
        self.report.peak_leases = self.report.peak_leases.max(stats.leased);
        self.report.hours.push(stats);
        if self.config.check_invariants {
            self.market.check_invariants().map_err(|e| format!("invariant broken at hour {}: {e}", t / HOUR))?;
        }
        self.at(t + HOUR, Action::EndOfHour);
        Ok(())
    }

    /// Reads the events the last operations emitted: schedules sellers' ready reports
    /// and gathers the figures.
    fn observe(&mut self, t: Time) {
        let events = self.market.take_events();
        self.report.events += events.len() as u64;
        for e in &events {
            match *e {
                Event::LeaseOpened { lease, price, .. } => {
                    self.report.trades += 1;
                    self.hour.trades += 1;
                    self.hour.price_sum += price;
                    if !self.rng.gen_bool(self.config.ready_failure) {
                        // Uploading the work takes a few seconds to a couple of minutes.
                        let upload = self.rng.gen_range(2..120);
                        self.at(t + upload, Action::Ready(lease));
                    }
                }
                Event::LeaseSettled { seconds, charge, fee, .. } => {
                    self.report.charged += charge;
                    self.report.fees += fee;
                    self.report.cpu_seconds += seconds;
                    self.hour.charged += charge;
                    self.hour.cpu_seconds += seconds;
                }
                Event::LeaseEnded { reason, .. } => {
                    *self.report.ended.entry(reason.name()).or_default() += 1;
                }
                _ => {}
            }
        }
    }
}

/// A random machine's slot and its ask, as the simulated sellers (and the
/// benchmarks) have them: scores of ≈250–23,000 MFLOPS, 0.5–16 GiB, 4–512 ms,
/// 40 % reachable by UDP, all seccomp kinds and often VMs.
pub fn random_slot(r: &mut impl Rng) -> (SlotAttributes, u64) {
    let score = (r.gen_range(8.0f64..14.5)).exp2() as u32;
    let latency_ms = (r.gen_range(2.0f64..9.0)).exp2() as u32;
    let inbound_udp = r.gen_bool(0.4);
    let mut kinds = vec![SandboxKind::SeccompStrict, SandboxKind::SeccompEmulated];
    match r.gen_range(0..100) {
        0..=29 => kinds.push(SandboxKind::VmTcg),
        30..=39 => kinds.extend([SandboxKind::VmTcg, SandboxKind::VmKvm]),
        _ => {}
    }
    let ram_mib = [512, 1024, 2048, 2048, 4096, 8192, 16384][r.gen_range(0..7)];
    let slot = SlotAttributes { score, ram_mib, kinds: KindSet::of(&kinds), inbound_udp, latency_ms };
    // Asks follow the score and the RAM: about a cent per CPU-hour per 1,000 MFLOPS
    // plus a third of a cent per GiB, give or take.
    let ask = ((score as f64 / 1000.0 + ram_mib as f64 / 3072.0) * r.gen_range(0.6..1.6)).round().max(1.0) as u64;
    (slot, ask)
}

/// A random buyer's constraints and bid: 40 % want a minimum score, 40 % a
/// minimum RAM, 30 % a latency cap, 10 % inbound UDP only; the bid is around what
/// such a slot costs, some stingy, some generous.
pub fn random_requirements(r: &mut impl Rng) -> (Requirements, u64) {
    let kind = match r.gen_range(0..100) {
        0..=54 => SandboxKind::SeccompStrict,
        55..=74 => SandboxKind::SeccompEmulated,
        75..=94 => SandboxKind::VmTcg,
        _ => SandboxKind::VmKvm,
    };
    let min_score = if r.gen_bool(0.4) { (r.gen_range(9.0f64..14.0)).exp2() as u32 } else { 0 };
    let min_ram_mib = if r.gen_bool(0.4) { [1024, 2048, 4096, 8192][r.gen_range(0..4)] } else { 0 };
    let max_latency_ms = if r.gen_bool(0.3) { [20, 50, 100, 200][r.gen_range(0..4)] } else { u32::MAX };
    let inbound_udp_only = r.gen_bool(0.1);
    let reference = min_score.max(2000) as f64 / 1000.0 + min_ram_mib.max(1024) as f64 / 3072.0;
    let max_price = (reference * r.gen_range(0.5..3.0)).round().max(1.0) as u64;
    (Requirements { kind, min_score, min_ram_mib, max_latency_ms, inbound_udp_only }, max_price)
}

impl SimReport {
    pub fn ended_count(&self, reason: EndReason) -> u64 {
        self.ended.get(reason.name()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            sellers: 300,
            buyers: 60,
            duration: 12 * HOUR,
            check_invariants: true,
            mean_online_hours: 4.0,
            mean_offline_hours: 1.0,
            ready_failure: 0.05,
            ..SimConfig::default()
        }
    }

    #[test]
    fn a_small_market_trades_and_keeps_its_invariants() {
        let report = run(&small()).unwrap();
        assert_eq!(report.hours.len(), 12);
        assert!(report.trades > 100, "{report:?}");
        assert!(report.cpu_seconds > 0 && report.charged > 0);
        assert!(report.fees > 0 && report.fees < report.charged);
        for reason in [EndReason::Completed, EndReason::SellerLost, EndReason::ReadyTimeout, EndReason::CancelledByBuyer] {
            assert!(report.ended_count(reason) > 0, "no lease ended {}: {:?}", reason.name(), report.ended);
        }
        let busiest = report.hours.iter().map(|h| h.utilisation()).fold(0.0, f64::max);
        assert!(busiest > 0.05 && busiest <= 1.0, "utilisation {busiest}");
    }

    #[test]
    fn the_same_seed_gives_the_same_market() {
        let a = run(&small()).unwrap();
        let b = run(&small()).unwrap();
        assert_eq!(a, b);
        let c = run(&SimConfig { seed: 2, ..small() }).unwrap();
        assert_ne!(a.trades, c.trades);
    }
}
