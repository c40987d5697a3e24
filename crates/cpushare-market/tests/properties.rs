//! Random sequences of every market operation; after each step the market's
//! promises must hold: money is conserved, no balance but the world's is
//! negative, no slot is leased twice, nothing is charged above the bid, each
//! lease's charge is its delivered seconds × price to within a cent, a refused
//! operation changes nothing, and replaying the log rebuilds the same state.

use std::collections::HashMap;

use cpushare_market::*;
use proptest::prelude::*;

const ACCOUNTS: u64 = 4;
const NODES: u64 = 4;

#[derive(Debug, Clone)]
enum Op {
    Deposit { account: u64, amount: i64 },
    Withdraw { account: u64, amount: i64 },
    /// `tcg_ask`: the slot's own ask for vm-tcg (0: none).
    Sell { account: u64, node: u64, slot: SlotAttributes, ask: u64, tcg_ask: u64 },
    Buy { account: u64, request: BuyRequest },
    CancelBuy { account: u64, pick: usize },
    CancelSell { account: u64, pick: usize },
    /// `leased`: pick among leased slots, whose new ask matters at renewal.
    Reprice { account: u64, pick: usize, ask: u64, leased: bool },
    CancelLease { account: u64, pick: usize },
    ReleaseLease { account: u64, pick: usize },
    Ready { account: u64, pick: usize },
    Tick { dt: u64 },
    Settle { dt: u64, silent_node: u64, silent_for: u64 },
    SellerLost { node: u64, silent_for: u64 },
    BuyerLost { account: u64, silent_for: u64 },
    Backwards,
    Halt,
    Resume,
}

fn kinds() -> impl Strategy<Value = KindSet> {
    prop::sample::subsequence(SandboxKind::ALL.to_vec(), 0..=4).prop_map(|k| KindSet::of(&k))
}

fn kind() -> impl Strategy<Value = SandboxKind> {
    prop::sample::select(SandboxKind::ALL.to_vec())
}

fn slot() -> impl Strategy<Value = SlotAttributes> {
    (1u32..5000, 0u32..9000, kinds(), any::<bool>(), 0u32..500).prop_map(
        |(score, ram_mib, kinds, inbound_udp, latency_ms)| SlotAttributes { score, ram_mib, kinds, inbound_udp, latency_ms },
    )
}

fn request() -> impl Strategy<Value = BuyRequest> {
    (
        0u32..4,
        0u64..300,
        kind(),
        prop_oneof![Just(0u32), 1u32..5000],
        prop_oneof![Just(0u32), 1u32..9000],
        prop_oneof![Just(u32::MAX), 0u32..500],
        any::<bool>(),
        prop::sample::select(vec![59u64, 60, 61, 600, 3599, 3600]),
        prop_oneof![Just(None), (0u32..4).prop_map(Some)],
    )
        .prop_map(|(cpus, max_price, kind, min_score, min_ram_mib, max_latency_ms, udp, period, periods)| BuyRequest {
            cpus,
            max_price,
            requirements: Requirements { kind, min_score, min_ram_mib, max_latency_ms, inbound_udp_only: udp },
            period,
            periods,
            // (Varied, so that replays carry it both ways; the market does not act on it.)
            attended: udp,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let account = 0..ACCOUNTS + 1; // one account more than exist
    let node = 0..NODES;
    prop_oneof![
        2 => (account.clone(), prop_oneof![-10i64..400, 400i64..20_000]).prop_map(|(account, amount)| Op::Deposit { account, amount }),
        3 => (account.clone(), -10i64..5_000).prop_map(|(account, amount)| Op::Withdraw { account, amount }),
        // Half of the slots ask something else for software-emulated VMs (0 there: invalid).
        4 => (account.clone(), node.clone(), slot(), 0u64..300, prop_oneof![Just(0u64), 0u64..300])
            .prop_map(|(account, node, slot, ask, tcg_ask)| Op::Sell { account, node, slot, ask, tcg_ask }),
        4 => (account.clone(), request()).prop_map(|(account, request)| Op::Buy { account, request }),
        1 => (account.clone(), any::<usize>()).prop_map(|(account, pick)| Op::CancelBuy { account, pick }),
        1 => (account.clone(), any::<usize>()).prop_map(|(account, pick)| Op::CancelSell { account, pick }),
        2 => (account.clone(), any::<usize>(), 0u64..300, any::<bool>()).prop_map(|(account, pick, ask, leased)| Op::Reprice { account, pick, ask, leased }),
        1 => (account.clone(), any::<usize>()).prop_map(|(account, pick)| Op::CancelLease { account, pick }),
        1 => (account.clone(), any::<usize>()).prop_map(|(account, pick)| Op::ReleaseLease { account, pick }),
        6 => (account.clone(), any::<usize>()).prop_map(|(account, pick)| Op::Ready { account, pick }),
        3 => prop_oneof![0u64..200, 0u64..4000].prop_map(|dt| Op::Tick { dt }),
        2 => (0u64..600, node.clone(), 0u64..600).prop_map(|(dt, silent_node, silent_for)| Op::Settle { dt, silent_node, silent_for }),
        1 => (node, 0u64..600).prop_map(|(node, silent_for)| Op::SellerLost { node, silent_for }),
        1 => (account, 0u64..600).prop_map(|(account, silent_for)| Op::BuyerLost { account, silent_for }),
        1 => Just(Op::Backwards),
        // Halts are rare (a kill switch); resuming when not halted tests the refusal.
        1 => prop_oneof![4 => Just(Op::Resume), 1 => Just(Op::Halt)],
    ]
}

/// An independent account of what each lease delivered and was charged, rebuilt from
/// the events alone.
#[derive(Default)]
struct Meter {
    /// lease -> (price now, bid, metered up to, Σ seconds × price, cents charged)
    leases: HashMap<LeaseId, (u64, u64, Time, u128, i64)>,
    bids: HashMap<OrderId, u64>,
}

impl Meter {
    fn observe(&mut self, e: &Event) -> Result<(), TestCaseError> {
        match *e {
            Event::BuyPlaced { order, request, .. } => {
                self.bids.insert(order, request.max_price);
            }
            Event::LeaseOpened { lease, buy, price, .. } => {
                let bid = self.bids[&buy];
                prop_assert!(price <= bid, "{lease} opened at {price} above its bid {bid}");
                self.leases.insert(lease, (price, bid, 0, 0, 0));
            }
            Event::LeaseReady { lease, at } => self.leases.get_mut(&lease).unwrap().2 = at,
            Event::LeaseRenewed { lease, at, price, .. } => {
                let l = self.leases.get_mut(&lease).unwrap();
                prop_assert!(price <= l.1, "{lease} renewed at {price} above its bid {}", l.1);
                prop_assert_eq!(l.2, at, "{} renewed before its period was metered", lease);
                l.0 = price;
            }
            Event::LeaseSettled { lease, until, charge, .. } => {
                let l = self.leases.get_mut(&lease).unwrap();
                prop_assert!(until > l.2);
                l.3 += (until - l.2) as u128 * l.0 as u128;
                l.2 = until;
                l.4 += charge;
                // Whole cents charged never exceed the exact amount, and trail it by under a cent.
                let charged = l.4 as u128 * 3600;
                prop_assert!(charged <= l.3 && l.3 - charged < 3600, "{lease}: charged {} for {} cent-s/h", l.4, l.3);
            }
            Event::LeaseEnded { lease, .. } => {
                self.leases.remove(&lease);
            }
            _ => {}
        }
        Ok(())
    }
}

/// The order's owner, except that the lowest account number asks as itself (mostly a stranger).
fn owner_or(m: &Market, order: OrderId, account: u64) -> AccountId {
    if account == 0 { AccountId(account) } else { m.sell_order(order).unwrap().account }
}

fn pick<T: Copy>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()])
}

/// Runs one operation; `None` when there was nothing to run it on.
fn execute(m: &mut Market, now: &mut Time, op: &Op) -> Option<Result<(), MarketError>> {
    let buys: Vec<OrderId> = { let mut v: Vec<_> = m.buy_orders().map(|o| o.id).collect(); v.sort(); v };
    let sells: Vec<OrderId> = { let mut v: Vec<_> = m.sell_orders().map(|o| o.id).collect(); v.sort(); v };
    // Sorted: the market's maps iterate in no particular order.
    let mut leases: Vec<Lease> = m.leases().collect();
    leases.sort_by_key(|l| l.id);
    let leased_sells: Vec<OrderId> = leases.iter().map(|l| l.sell).collect();
    let awaiting: Vec<LeaseId> = leases.iter().filter(|l| l.state == LeaseState::AwaitingReady).map(|l| l.id).collect();
    let leases: Vec<LeaseId> = leases.iter().map(|l| l.id).collect();
    let t = *now;
    let result: Result<(), MarketError> = match *op {
        Op::Deposit { account, amount } => m.deposit(AccountId(account), amount, t),
        Op::Withdraw { account, amount } => m.withdraw(AccountId(account), amount, t),
        Op::Sell { account, node, slot, ask, tcg_ask } => {
            let kind_asks = KindAsks::default().with(SandboxKind::VmTcg, tcg_ask);
            m.place_sell(AccountId(account), SellRequest { node: NodeId(node), slot, ask, kind_asks }, t).map(drop)
        }
        Op::Buy { account, request } => m.place_buy(AccountId(account), request, t).map(drop),
        Op::CancelBuy { account, pick: i } => match pick(&buys, i) {
            Some(o) => m.cancel_buy(AccountId(account), o, t),
            None => m.cancel_buy(AccountId(account), OrderId(9999), t),
        },
        Op::CancelSell { account, pick: i } => match pick(&sells, i) {
            Some(o) => m.cancel_sell(owner_or(m, o, account), o, t),
            None => return None,
        },
        Op::Reprice { account, pick: i, ask, leased } => match pick(if leased { &leased_sells } else { &sells }, i) {
            Some(o) => m.reprice_sell(owner_or(m, o, account), o, ask, t),
            None => return None,
        },
        Op::CancelLease { account, pick: i } => match pick(&leases, i) {
            Some(l) => m.cancel_lease(AccountId(account), l, t),
            None => return None,
        },
        Op::ReleaseLease { account, pick: i } => match pick(&leases, i) {
            // Mostly the lease's seller, sometimes a stranger.
            Some(l) => {
                let who = if account == ACCOUNTS { AccountId(account) } else { m.lease(l).unwrap().seller };
                m.release_lease(who, l, t)
            }
            None => return None,
        },
        Op::Ready { account, pick: i } => match pick(if account % 2 == 0 { &awaiting } else { &leases }, i) {
            // Mostly the right seller, sometimes a stranger.
            Some(l) => {
                let seller = m.lease(l).unwrap().seller;
                let who = if account == ACCOUNTS { AccountId(account) } else { seller };
                m.lease_ready(who, l, t)
            }
            None => return None,
        },
        Op::Tick { dt } => {
            *now += dt;
            m.tick(*now)
        }
        Op::Settle { dt, silent_node, silent_for } => {
            *now += dt;
            let t = *now;
            let silent_since = t.saturating_sub(silent_for);
            m.settle(t, |n| if n == NodeId(silent_node) { silent_since } else { t })
        }
        Op::SellerLost { node, silent_for } => m.seller_lost(NodeId(node), t.saturating_sub(silent_for), t).map(drop),
        Op::BuyerLost { account, silent_for } => m.buyer_lost(AccountId(account), t.saturating_sub(silent_for), t).map(drop),
        Op::Backwards => {
            if m.now() == 0 {
                return None;
            }
            m.tick(m.now() - 1)
        }
        Op::Halt => m.halt(t).map(drop),
        Op::Resume => m.resume(t),
    };
    Some(result)
}

fn run(ops: Vec<Op>) -> Result<Vec<Event>, TestCaseError> {
    let config = MarketConfig { fee_bps: 250, ready_timeout: 900 };
    let mut m = Market::new(config);
    m.keep_journal();
    let mut log = Vec::new();
    let mut meter = Meter::default();
    // What the journal says each account holds; must always equal the balances.
    let mut journaled: HashMap<AccountId, Balance> = HashMap::new();
    for a in 0..ACCOUNTS {
        m.open_account(AccountId(a), 0).unwrap();
    }
    log.extend(m.take_events());
    let mut now: Time = 0;
    for op in ops {
        let before = m.snapshot();
        let Some(result) = execute(&mut m, &mut now, &op) else { continue };
        let events = m.take_events();
        for p in m.take_postings() {
            prop_assert!(p.event < events.len(), "posting of event {} of {}", p.event, events.len());
            let b = journaled.entry(p.account).or_default();
            match p.bucket {
                Bucket::Available => b.available += p.amount,
                Bucket::Escrow => b.escrow += p.amount,
            }
        }
        for (account, balance) in m.accounts() {
            prop_assert_eq!(journaled.get(&account).copied().unwrap_or_default(), balance, "journal of {}", account);
        }
        if let Err(e) = result {
            prop_assert!(events.is_empty(), "refused with {e} but emitted {events:?}");
            prop_assert_eq!(&m.snapshot(), &before, "refused with {} but changed the state", e);
        }
        for e in &events {
            meter.observe(e)?;
        }
        log.extend(events);
        m.check_invariants().map_err(TestCaseError::fail)?;
    }
    let replayed = Market::replay(config, &log);
    prop_assert_eq!(replayed.snapshot(), m.snapshot());
    Ok(log)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn the_market_keeps_its_promises(ops in prop::collection::vec(op(), 1..120)) {
        run(ops)?;
    }

    /// A market restored from a snapshot taken midway carries on exactly as the
    /// original: the same events, the same state.
    #[test]
    fn a_restored_market_carries_on_like_the_original(ops in prop::collection::vec(op(), 2..120), cut in any::<prop::sample::Index>()) {
        let config = MarketConfig { fee_bps: 250, ready_timeout: 900 };
        let mut m = Market::new(config);
        for a in 0..ACCOUNTS {
            m.open_account(AccountId(a), 0).unwrap();
        }
        let cut = cut.index(ops.len());
        let mut now = 0;
        for op in &ops[..cut] {
            execute(&mut m, &mut now, op);
        }
        let snapshot = m.snapshot();
        let json = serde_json::to_string(&snapshot).unwrap();
        let mut r = Market::restore(config, serde_json::from_str(&json).unwrap());
        prop_assert_eq!(r.snapshot(), snapshot);
        r.check_invariants().map_err(TestCaseError::fail)?;
        m.take_events();
        let mut now_r = now;
        for op in &ops[cut..] {
            let a = execute(&mut m, &mut now, op);
            let b = execute(&mut r, &mut now_r, op);
            prop_assert_eq!(a, b);
            prop_assert_eq!(m.take_events(), r.take_events());
        }
        prop_assert_eq!(m.snapshot(), r.snapshot());
    }
}

/// Guards the property above against going vacuous: the generated operations must
/// reach every kind of event and every way a lease ends.
#[test]
fn random_sequences_reach_every_event_and_end_reason() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha));
    let mut kinds = std::collections::BTreeSet::new();
    let mut reasons = std::collections::BTreeSet::new();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let ops = prop::collection::vec(op(), 100..120).new_tree(&mut runner).unwrap().current();
        for e in run(ops).unwrap() {
            if let Event::LeaseEnded { reason, .. } = e {
                reasons.insert(reason.name());
            }
            let json = serde_json::to_value(&e).unwrap();
            kinds.insert(json["event"].as_str().unwrap().to_string());
            *counts.entry(json["event"].as_str().unwrap().to_string()).or_insert(0) += 1;
        }
    }
    assert!(counts["lease-ready"] * 2 > counts["lease-opened"], "most leases should start: {counts:?}");
    assert_eq!(kinds.len(), 16, "events seen: {kinds:?}");
    assert_eq!(reasons.len(), EndReason::ALL.len(), "end reasons seen: {reasons:?}");
}
