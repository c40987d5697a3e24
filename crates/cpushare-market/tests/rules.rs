//! One test per market rule, on small hand-built books.

use cpushare_market::*;

const HOUR: u64 = 3600;
const BUYER: AccountId = AccountId(1);
const SELLER: AccountId = AccountId(2);
const OTHER: AccountId = AccountId(3);
const NODE: NodeId = NodeId(10);
const NODE2: NodeId = NodeId(11);

fn market() -> Market {
    let mut m = Market::new(MarketConfig { fee_bps: 1000, ready_timeout: 300 });
    for a in [BUYER, SELLER, OTHER] {
        m.open_account(a, 0).unwrap();
    }
    m.deposit(BUYER, 100_000, 0).unwrap();
    m.deposit(OTHER, 100_000, 0).unwrap();
    m
}

fn slot() -> SlotAttributes {
    SlotAttributes {
        score: 2000,
        ram_mib: 2048,
        kinds: KindSet::of(&[SandboxKind::SeccompStrict]),
        inbound_udp: false,
        latency_ms: 30,
    }
}

fn sell(m: &mut Market, node: NodeId, slot: SlotAttributes, ask: u64, now: Time) -> OrderId {
    m.place_sell(SELLER, SellRequest::new(node, slot, ask), now).unwrap()
}

fn buy(cpus: u32, max_price: u64) -> BuyRequest {
    BuyRequest::new(cpus, max_price, SandboxKind::SeccompStrict)
}

fn leases_of(m: &Market, order: OrderId) -> Vec<Lease> {
    m.buy_order(order).map(|o| o.leases.iter().map(|l| m.lease(*l).unwrap().clone()).collect()).unwrap_or_default()
}

fn ended(events: &[Event]) -> Vec<(LeaseId, EndReason, Time)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::LeaseEnded { lease, reason, at, .. } => Some((*lease, *reason, *at)),
            _ => None,
        })
        .collect()
}

/// A refused operation returns the expected error, emits nothing and changes nothing.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    m: &mut Market,
    op: impl FnOnce(&mut Market) -> Result<T, MarketError>,
    expected: MarketError,
) {
    m.take_events();
    let before = m.snapshot();
    let err = op(m).expect_err("operation should be refused");
    assert_eq!(err, expected);
    assert!(m.pending_events().is_empty(), "a refused operation emitted {:?}", m.pending_events());
    assert_eq!(m.snapshot(), before, "a refused operation changed the state");
    assert!(!err.to_string().is_empty());
}

#[track_caller]
fn check(m: &Market) {
    m.check_invariants().unwrap();
}

#[test]
fn deposits_and_withdrawals_move_money_from_and_to_the_world() {
    let mut m = market();
    m.withdraw(BUYER, 30_000, 1).unwrap();
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 70_000, escrow: 0 });
    assert_eq!(m.world(), -170_000);
    assert_refused(&mut m, |m| m.withdraw(BUYER, 70_001, 2), MarketError::InsufficientFunds { needed: 70_001, available: 70_000 });
    assert_refused(&mut m, |m| m.deposit(BUYER, 0, 2), MarketError::InvalidAmount { amount: 0, reason: "must be positive" });
    assert_refused(&mut m, |m| m.deposit(BUYER, -5, 2), MarketError::InvalidAmount { amount: -5, reason: "must be positive" });
    assert_refused(&mut m, |m| m.deposit(AccountId(99), 5, 2), MarketError::UnknownAccount(AccountId(99)));
    assert_refused(&mut m, |m| m.open_account(BUYER, 2), MarketError::AccountExists(BUYER));
    check(&m);
}

#[test]
fn balances_cannot_overflow() {
    let mut m = market();
    let max = money::MAX_TRANSFER;
    // Keep depositing the largest transfer until the balance would overflow.
    let mut refused = None;
    for i in 0..10_000 {
        if let Err(e) = m.deposit(SELLER, max, i) {
            refused = Some(e);
            break;
        }
    }
    assert_eq!(refused, Some(MarketError::Overflow));
    assert_refused(&mut m, |m| m.deposit(SELLER, max, 20_000), MarketError::Overflow);
    check(&m);
}

#[test]
fn a_buy_order_escrows_its_first_period_at_the_bid() {
    let mut m = market();
    let req = BuyRequest { period: 1800, ..buy(3, 101) };
    m.place_buy(BUYER, req, 1).unwrap();
    // ceil(101 * 1800 / 3600) = 51 per CPU
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 153, escrow: 153 });
    assert_refused(&mut m, |m| m.place_buy(BUYER, buy(1000, 100), 1), MarketError::InsufficientFunds { needed: 100_000, available: 99_847 });
    check(&m);
}

#[test]
fn bad_orders_are_refused_with_reasons() {
    let mut m = market();
    for bad in [
        buy(0, 100),
        buy(1, 0),
        buy(1, money::MAX_PRICE + 1),
        buy(money::MAX_CPUS + 1, 100),
        BuyRequest { period: 59, ..buy(1, 100) },
        BuyRequest { periods: Some(0), ..buy(1, 100) },
    ] {
        m.take_events();
        let before = m.snapshot();
        assert!(matches!(m.place_buy(BUYER, bad, 1), Err(MarketError::InvalidOrder(_))), "{bad:?}");
        assert_eq!(m.snapshot(), before);
    }
    let no_kinds = SlotAttributes { kinds: KindSet::default(), ..slot() };
    for (s, ask) in [(slot(), 0), (no_kinds, 10), (SlotAttributes { ram_mib: 0, ..slot() }, 10)] {
        let before = m.snapshot();
        let r = m.place_sell(SELLER, SellRequest::new(NODE, s, ask), 1);
        assert!(matches!(r, Err(MarketError::InvalidOrder(_))));
        assert_eq!(m.snapshot(), before);
    }
    // The market keys nodes by their id plus one: the largest id is refused, the one below taken.
    let r = m.place_sell(SELLER, SellRequest::new(NodeId(u64::MAX), slot(), 10), 1);
    assert!(matches!(r, Err(MarketError::InvalidOrder(_))), "{r:?}");
    m.place_sell(SELLER, SellRequest::new(NodeId(u64::MAX - 1), slot(), 10), 1).unwrap();
    assert_eq!(m.seller_lost(NodeId(u64::MAX), 1, 1), Ok(vec![]));
    assert_refused(&mut m, |m| m.place_buy(AccountId(42), buy(1, 1), 1), MarketError::UnknownAccount(AccountId(42)));
    check(&m);
}

#[test]
fn an_incoming_buy_trades_at_the_resting_ask() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 1);
    let b = m.place_buy(BUYER, buy(1, 150), 2).unwrap();
    let ls = leases_of(&m, b);
    assert_eq!(ls.len(), 1);
    assert_eq!((ls[0].sell, ls[0].price, ls[0].side), (s, 100, PriceSide::Ask));
    // The lease holds one period at its price; the bid's extra escrow went back.
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 100, escrow: 100 });
    assert_eq!(m.sell_order(s).unwrap().lease, Some(ls[0].id));
    check(&m);
}

#[test]
fn an_incoming_sell_trades_at_the_resting_bid() {
    let mut m = market();
    let b = m.place_buy(BUYER, buy(1, 150), 1).unwrap();
    let s = sell(&mut m, NODE, slot(), 100, 2);
    let ls = leases_of(&m, b);
    assert_eq!((ls[0].sell, ls[0].price, ls[0].side), (s, 150, PriceSide::Bid));
    check(&m);
}

#[test]
fn a_slot_may_ask_less_for_software_emulated_vms_than_for_the_jail() {
    let mut m = market();
    let both = SlotAttributes { kinds: KindSet::of(&[SandboxKind::SeccompStrict, SandboxKind::VmTcg]), ..slot() };
    let tcg = BuyRequest::new(1, 30, SandboxKind::VmTcg);
    // An ask for a kind the slot does not offer, or of nothing, is refused.
    let req = |kind_asks| SellRequest { node: NODE, slot: both, ask: 100, kind_asks };
    let stray = KindAsks::default().with(SandboxKind::VmKvm, 20);
    assert_refused(&mut m, |m| m.place_sell(SELLER, req(stray), 0), MarketError::InvalidOrder("an ask for vm-kvm, which the slot does not offer".into()));
    let s = m.place_sell(SELLER, req(KindAsks::default().with(SandboxKind::VmTcg, 20)), 0).unwrap();
    assert_eq!(m.asks().depth(SandboxKind::SeccompStrict), vec![(100, 1)]);
    assert_eq!(m.asks().depth(SandboxKind::VmTcg), vec![(20, 1)]);
    // A VM buyer bidding 30 gets it at its own ask, 20; it would not reach 100.
    let b = m.place_buy(BUYER, tcg, 1).unwrap();
    let lease = leases_of(&m, b)[0].clone();
    assert_eq!((lease.sell, lease.price, lease.side), (s, 20, PriceSide::Ask));
    assert!(m.asks().depth(SandboxKind::SeccompStrict).is_empty(), "a leased slot leaves every kind's book");
    m.lease_ready(SELLER, lease.id, 1).unwrap();
    // It renews at the vm-tcg ask, which a new base ask does not change.
    m.reprice_sell(SELLER, s, 120, 10).unwrap();
    m.tick(HOUR + 1).unwrap();
    assert_eq!(m.lease(lease.id).unwrap().price, 20);
    m.cancel_buy(BUYER, b, HOUR + 2).unwrap();
    // Resting again: a jail bid of 110 does not reach the slot's 120 and rests.
    let jail = m.place_buy(OTHER, buy(1, 110), HOUR + 3).unwrap();
    assert!(leases_of(&m, jail).is_empty());
    check(&m);

    // A new slot meets resting bids at each kind's own ask: the VM bid of 30
    // is met (at the bid) though the jail bid of 110 is not.
    let vm = m.place_buy(BUYER, tcg, HOUR + 4).unwrap();
    assert_eq!(leases_of(&m, vm)[0].sell, s, "the resting slot took it first, at its ask");
    let second = m.place_buy(BUYER, tcg, HOUR + 5).unwrap();
    let s2 = m.place_sell(SELLER, SellRequest { node: NODE2, ask: 120, ..req(KindAsks::default().with(SandboxKind::VmTcg, 20)) }, HOUR + 6).unwrap();
    let l = leases_of(&m, second)[0].clone();
    assert_eq!((l.sell, l.price, l.side), (s2, 30, PriceSide::Bid));
    assert!(leases_of(&m, jail).is_empty());
    check(&m);
}

#[test]
fn price_then_time_priority() {
    let mut m = market();
    let first = sell(&mut m, NODE, slot(), 100, 1);
    let _second = sell(&mut m, NODE, slot(), 100, 2);
    let cheaper_later = sell(&mut m, NODE, slot(), 90, 3);
    let b = m.place_buy(BUYER, buy(2, 100), 4).unwrap();
    let sells: Vec<_> = leases_of(&m, b).iter().map(|l| l.sell).collect();
    assert_eq!(sells, vec![cheaper_later, first]);

    // Bids: the higher price first, then the earlier.
    let b1 = m.place_buy(OTHER, buy(1, 120), 5).unwrap();
    let b2 = m.place_buy(BUYER, buy(1, 130), 6).unwrap();
    let b3 = m.place_buy(OTHER, buy(1, 130), 7).unwrap();
    // The one remaining ask (100) went to b1 at once; two more slots arrive.
    assert_eq!(leases_of(&m, b1).len(), 1);
    sell(&mut m, NODE2, slot(), 50, 8);
    assert_eq!((leases_of(&m, b2).len(), leases_of(&m, b3).len()), (1, 0));
    check(&m);
}

#[test]
fn a_reprice_loses_time_priority() {
    let mut m = market();
    let first = sell(&mut m, NODE, slot(), 100, 1);
    let second = sell(&mut m, NODE, slot(), 100, 2);
    m.reprice_sell(SELLER, first, 100, 3).unwrap();
    let b = m.place_buy(BUYER, buy(1, 100), 4).unwrap();
    assert_eq!(leases_of(&m, b)[0].sell, second);
    check(&m);
}

#[test]
fn filters_are_hard_constraints() {
    let mut m = market();
    let small = sell(&mut m, NODE, SlotAttributes { ram_mib: 512, ..slot() }, 10, 1);
    let slow = sell(&mut m, NODE, SlotAttributes { latency_ms: 400, ..slot() }, 11, 1);
    let weak = sell(&mut m, NODE, SlotAttributes { score: 100, ..slot() }, 12, 1);
    let no_udp = sell(&mut m, NODE, slot(), 13, 1);
    let vm_only = sell(&mut m, NODE, SlotAttributes { kinds: KindSet::of(&[SandboxKind::VmTcg]), inbound_udp: true, ..slot() }, 14, 1);
    let fits = sell(&mut m, NODE2, SlotAttributes { inbound_udp: true, ..slot() }, 50, 1);
    let req = Requirements {
        kind: SandboxKind::SeccompStrict,
        min_score: 1000,
        min_ram_mib: 1024,
        max_latency_ms: 100,
        inbound_udp_only: true,
    };
    let b = m.place_buy(BUYER, BuyRequest { requirements: req, ..buy(2, 100) }, 2).unwrap();
    let ls = leases_of(&m, b);
    assert_eq!(ls.iter().map(|l| l.sell).collect::<Vec<_>>(), vec![fits]);
    assert_eq!(m.buy_order(b).unwrap().open, 1, "the rest of the order rests");
    for s in [small, slow, weak, no_udp, vm_only] {
        assert!(m.sell_order(s).unwrap().is_resting());
    }
    // A new slot that does not satisfy the resting bid does not trade with it.
    let s = sell(&mut m, NODE2, SlotAttributes { ram_mib: 1000, inbound_udp: true, ..slot() }, 1, 3);
    assert!(m.sell_order(s).unwrap().is_resting());
    check(&m);
}

#[test]
fn a_buy_for_several_cpus_fills_from_several_sellers_and_rests_with_the_rest() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 1);
    sell(&mut m, NODE2, slot(), 110, 1);
    let b = m.place_buy(BUYER, buy(3, 120), 2).unwrap();
    assert_eq!(leases_of(&m, b).len(), 2);
    assert_eq!(m.buy_order(b).unwrap().open, 1);
    assert_eq!(m.bids().depth(SandboxKind::SeccompStrict), vec![(120, 1)]);
    // escrow: 100 + 110 for the leases, 120 for the open CPU
    assert_eq!(m.balance(BUYER).unwrap().escrow, 330);
    sell(&mut m, NodeId(12), slot(), 115, 3);
    assert_eq!(leases_of(&m, b).len(), 3);
    assert_eq!(m.buy_order(b).unwrap().open, 0);
    assert!(m.bids().depth(SandboxKind::SeccompStrict).is_empty());
    check(&m);
}

#[test]
fn a_large_buy_takes_the_cheapest_fitting_slots_in_price_time_order() {
    // More CPUs than one search of the book returns at a time (index::MAX_N).
    let mut m = market();
    let mut fitting = Vec::new();
    for i in 0..30u64 {
        // Prices in no order, some equal; every third slot has too little RAM.
        let ram_mib = if i % 3 == 0 { 1024 } else { 4096 };
        let ask = 100 + (i * 7) % 11;
        let s = sell(&mut m, NodeId(100 + i), SlotAttributes { ram_mib, ..slot() }, ask, 1);
        if ram_mib >= 2048 {
            fitting.push((ask, s));
        }
    }
    fitting.sort(); // by price, then by placing (ids grow with time)
    let req = BuyRequest { requirements: Requirements { min_ram_mib: 2048, ..Requirements::any(SandboxKind::SeccompStrict) }, ..buy(15, 200) };
    let b = m.place_buy(BUYER, req, 2).unwrap();
    let mut leases = leases_of(&m, b);
    leases.sort_by_key(|l| l.id);
    let taken: Vec<(u64, OrderId)> = leases.iter().map(|l| (l.price, l.sell)).collect();
    assert_eq!(taken, fitting[..15], "the 15 cheapest slots that fit, opened best first");
    assert_eq!(m.buy_order(b).unwrap().open, 0);
    // The rest of the fitting slots and every small one still rest.
    assert_eq!(m.asks().len(SandboxKind::SeccompStrict), 15);
    check(&m);
}

#[test]
fn upload_time_is_not_billed_and_running_time_is_metered_per_second() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    // 200 s of upload, then ready.
    m.settle(200, |_| u64::MAX).unwrap();
    assert_eq!(m.lease(lease).unwrap().charged, 0);
    m.lease_ready(SELLER, lease, 200).unwrap();
    // 1800 s of running at 100 c/h = 50 c; 10 % fee = 5 c.
    m.settle(2000, |_| u64::MAX).unwrap();
    let l = m.lease(lease).unwrap();
    assert_eq!((l.delivered, l.charged, l.fee), (1800, 50, 5));
    assert_eq!(m.balance(SELLER).unwrap().available, 45);
    assert_eq!(m.fees(), 5);
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 100, escrow: 50 });
    check(&m);
}

#[test]
fn a_second_ready_and_a_strangers_ready_are_refused() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    assert_refused(&mut m, |m| m.lease_ready(BUYER, lease, 1), MarketError::NotYourLease { lease });
    m.lease_ready(SELLER, lease, 1).unwrap();
    assert_refused(&mut m, |m| m.lease_ready(SELLER, lease, 2), MarketError::NotAwaitingReady { lease });
    assert_refused(&mut m, |m| m.lease_ready(SELLER, LeaseId(999), 2), MarketError::UnknownLease(LeaseId(999)));
    assert_refused(&mut m, |m| m.tick(0), MarketError::TimeWentBackwards { now: 0, last: 1 });
    check(&m);
}

#[test]
fn a_lease_renews_with_the_same_seller_and_completes_after_its_periods() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, BuyRequest { periods: Some(3), ..buy(1, 100) }, 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 10).unwrap();
    m.take_events();
    m.tick(10 + HOUR).unwrap();
    m.tick(10 + 2 * HOUR).unwrap();
    let l = m.lease(lease).unwrap();
    assert_eq!((l.renewals, l.sell, l.charged), (2, s, 200));
    let renewals = m.take_events().iter().filter(|e| matches!(e, Event::LeaseRenewed { .. })).count();
    assert_eq!(renewals, 2);
    m.tick(10 + 3 * HOUR + 5).unwrap();
    assert_eq!(ended(m.pending_events()), vec![(lease, EndReason::Completed, 10 + 3 * HOUR)]);
    assert!(m.lease(lease).is_none());
    assert!(m.buy_order(b).is_none(), "a completed order is gone");
    assert!(m.sell_order(s).unwrap().is_resting(), "the slot is back on the market");
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 300, escrow: 0 });
    assert_eq!(m.balance(SELLER).unwrap().available + m.fees(), 300);
    check(&m);
}

#[test]
fn a_late_tick_still_meters_exactly_to_each_period_end() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, BuyRequest { periods: Some(2), ..buy(1, 100) }, 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    m.tick(10 * HOUR).unwrap();
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::Completed, 2 * HOUR)]);
    assert_eq!(m.balance(BUYER).unwrap().available, 100_000 - 200);
    check(&m);
}

#[test]
fn a_seller_that_never_reports_ready_times_out_and_the_order_moves_on() {
    let mut m = market();
    let bad = sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 120), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    let good = sell(&mut m, NODE2, slot(), 110, 1);
    assert_refused(&mut m, |m| m.lease_ready(SELLER, lease, 301), MarketError::ReadyTooLate { lease, deadline: 300 });
    m.tick(301).unwrap();
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::ReadyTimeout, 300)]);
    assert!(m.sell_order(bad).is_none(), "the failed slot is off the market");
    let ls = leases_of(&m, b);
    assert_eq!((ls.len(), ls[0].sell), (1, good));
    assert_eq!(m.lease(lease), None);
    assert_eq!(m.balance(BUYER).unwrap().escrow, 110);
    check(&m);
}

#[test]
fn a_lost_seller_is_charged_to_its_last_heartbeat_and_the_work_moves() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    let spare = sell(&mut m, NODE2, slot(), 90, 1);
    // Heartbeats stopped at 900 s; the exchange notices at 1000 s.
    m.settle(1000, |n| if n == NODE { 900 } else { u64::MAX }).unwrap();
    assert_eq!(m.lease(lease).unwrap().delivered, 900);
    let lost = m.seller_lost(NODE, 900, 1000).unwrap();
    assert_eq!(lost, vec![lease]);
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::SellerLost, 900)]);
    // 900 s at 100 c/h = 25 c; the replacement holds its own period's escrow.
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 25 - 90, escrow: 90 });
    assert_eq!(leases_of(&m, b)[0].sell, spare);
    assert_eq!(m.sell_orders().filter(|s| s.node == NODE).count(), 0);
    check(&m);
}

#[test]
fn a_seller_lost_before_ready_charges_nothing() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(2, 100), 0).unwrap();
    assert_eq!(m.seller_lost(NODE, 0, 50).unwrap().len(), 1);
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 200, escrow: 200 });
    assert_eq!(m.buy_order(b).unwrap().open, 2);
    // Losing a node without slots is not an error.
    assert!(m.seller_lost(NodeId(77), 0, 50).unwrap().is_empty());
    check(&m);
}

#[test]
fn a_lost_buyer_ends_its_leases_and_frees_the_slots() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    let waiting = m.place_buy(OTHER, buy(1, 100), 10).unwrap();
    assert_eq!(m.buyer_lost(BUYER, 720, 800).unwrap(), vec![lease]);
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::BuyerLost, 720)]);
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 20, escrow: 0 });
    assert_eq!(leases_of(&m, waiting)[0].sell, s, "the freed slot goes to the waiting bid");
    check(&m);
}

#[test]
fn renewal_follows_the_seller_ask_while_it_fits_the_bid() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 150), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    m.reprice_sell(SELLER, s, 140, 10).unwrap();
    assert_eq!(m.lease(lease).unwrap().price, 100, "a new ask waits for renewal");
    m.tick(HOUR).unwrap();
    assert_eq!(m.lease(lease).unwrap().price, 140);
    m.reprice_sell(SELLER, s, 160, HOUR + 10).unwrap();
    let spare = sell(&mut m, NODE2, slot(), 150, HOUR + 20);
    m.take_events();
    m.tick(2 * HOUR).unwrap();
    assert_eq!(ended(m.pending_events()), vec![(lease, EndReason::SellerWithdrew, 2 * HOUR)]);
    assert_eq!(leases_of(&m, b)[0].sell, spare, "the order moved to a slot it can afford");
    assert!(m.sell_order(s).unwrap().is_resting());
    check(&m);
}

#[test]
fn a_lease_made_at_the_bid_renews_at_the_bid() {
    let mut m = market();
    let b = m.place_buy(BUYER, buy(1, 150), 0).unwrap();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    m.reprice_sell(SELLER, s, 120, 10).unwrap();
    m.tick(HOUR).unwrap();
    let l = m.lease(lease).unwrap();
    assert_eq!((l.price, l.side, l.renewals), (150, PriceSide::Bid, 1));
    check(&m);
}

#[test]
fn a_withdrawn_slot_finishes_its_period_then_leaves() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    m.cancel_sell(SELLER, s, 100).unwrap();
    assert_refused(&mut m, |m| m.cancel_sell(SELLER, s, 101), MarketError::AlreadyWithdrawn { order: s });
    assert!(m.lease(lease).is_some());
    m.tick(HOUR).unwrap();
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::SellerWithdrew, HOUR)]);
    assert!(m.sell_order(s).is_none());
    assert_eq!(m.buy_order(b).unwrap().open, 1, "the order looks for another slot");
    // A resting slot leaves at once.
    let r = sell(&mut m, NODE2, SlotAttributes { score: 1, ..slot() }, 500, HOUR);
    m.cancel_sell(SELLER, r, HOUR).unwrap();
    assert!(m.sell_order(r).is_none());
    assert_refused(&mut m, |m| m.cancel_sell(SELLER, r, HOUR), MarketError::UnknownOrder(r));
    check(&m);
}

#[test]
fn a_buyer_who_cannot_fund_the_next_period_runs_out_of_funds() {
    let mut m = market();
    m.open_account(AccountId(50), 0).unwrap();
    m.deposit(AccountId(50), 150, 0).unwrap();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(AccountId(50), buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    m.tick(HOUR).unwrap();
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::OutOfFunds, HOUR)]);
    assert_eq!(m.balance(AccountId(50)).unwrap(), Balance { available: 50, escrow: 0 });
    assert!(m.buy_order(b).is_none());
    check(&m);
}

#[test]
fn cancelling_an_order_ends_its_leases_charged_for_time_delivered() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(2, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    assert_refused(&mut m, |m| m.cancel_buy(OTHER, b, 10), MarketError::NotYourOrder { order: b });
    assert_refused(&mut m, |m| m.cancel_buy(BUYER, OrderId(999), 10), MarketError::UnknownOrder(OrderId(999)));
    m.cancel_buy(BUYER, b, 36).unwrap();
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::CancelledByBuyer, 36)]);
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 1, escrow: 0 });
    assert!(m.buy_order(b).is_none());
    check(&m);
}

#[test]
fn cancelling_one_lease_does_not_look_for_another() {
    let mut m = market();
    sell(&mut m, NODE, slot(), 100, 0);
    sell(&mut m, NODE2, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    assert_refused(&mut m, |m| m.cancel_lease(SELLER, lease, 1), MarketError::NotYourLease { lease });
    m.cancel_lease(BUYER, lease, 1).unwrap();
    assert!(m.buy_order(b).is_none());
    assert_eq!(m.balance(BUYER).unwrap().escrow, 0);
    check(&m);
}

#[test]
fn the_charge_is_delivered_time_times_price_within_a_cent_and_never_above_the_bid() {
    let mut m = market();
    let price = 97;
    sell(&mut m, NODE, slot(), price, 0);
    let b = m.place_buy(BUYER, BuyRequest { period: 61, ..buy(1, price) }, 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    let mut t = 0;
    while t < 5 * HOUR {
        t += 7;
        m.settle(t, |_| u64::MAX).unwrap();
        m.tick(t).unwrap();
    }
    let l = m.lease(lease).unwrap();
    let exact = l.delivered as f64 * price as f64 / 3600.0;
    assert!((l.charged as f64 - exact).abs() < 1.0, "charged {} for {exact}", l.charged);
    assert!(l.charged as f64 <= exact);
    assert_eq!(l.delivered, t);
    assert_eq!(l.fee, l.charged / 10);
    check(&m);
}

#[test]
fn replay_rebuilds_the_same_state() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    sell(&mut m, NODE2, slot(), 120, 0);
    let b = m.place_buy(BUYER, buy(3, 130), 1).unwrap();
    for l in leases_of(&m, b) {
        m.lease_ready(SELLER, l.id, 5).unwrap();
    }
    m.reprice_sell(SELLER, s, 125, 100).unwrap();
    m.settle(2000, |_| u64::MAX).unwrap();
    m.tick(HOUR + 5).unwrap();
    m.seller_lost(NODE2, HOUR + 100, HOUR + 200).unwrap();
    m.place_buy(OTHER, buy(1, 200), HOUR + 300).unwrap();
    let events = m.take_events();
    let replayed = Market::replay(*m.config(), &events);
    assert_eq!(replayed.snapshot(), m.snapshot());
    replayed.check_invariants().unwrap();
    // And through JSON, as the exchange stores them.
    let json = serde_json::to_string(&events).unwrap();
    let back: Vec<Event> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, events);
}

#[test]
fn halting_ends_every_lease_and_stops_matching_until_resumed() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(2, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    m.take_events();
    assert_eq!(m.halt(1800).unwrap(), vec![lease]);
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::ExchangeHalted, 1800)]);
    // Half an hour at 1 EUR/h; the order keeps both CPUs, resting.
    assert_eq!(m.balance(BUYER).unwrap(), Balance { available: 100_000 - 50 - 200, escrow: 200 });
    assert_eq!(m.buy_order(b).unwrap().open, 2);
    assert!(m.sell_order(s).unwrap().is_resting());
    // Nothing trades while halted, though orders may still rest.
    sell(&mut m, NODE2, slot(), 90, 1900);
    assert!(m.leases().next().is_none());
    assert_refused(&mut m, |m| m.halt(1900), MarketError::Halted);
    m.check_invariants().unwrap();
    m.resume(2000).unwrap();
    assert_eq!(leases_of(&m, b).len(), 2, "resuming uncrosses the book");
    assert_refused(&mut m, |m| m.resume(2000), MarketError::NotHalted);
    check(&m);
}

#[test]
fn the_journal_explains_every_balance_change() {
    let mut m = Market::new(MarketConfig::default());
    m.keep_journal();
    for a in [BUYER, SELLER] {
        m.open_account(a, 0).unwrap();
    }
    m.deposit(BUYER, 1000, 0).unwrap();
    sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 150), 0).unwrap();
    m.lease_ready(SELLER, leases_of(&m, b)[0].id, 0).unwrap();
    m.tick(HOUR).unwrap();
    m.cancel_buy(BUYER, b, HOUR + 600).unwrap();
    let events = m.take_events();
    let postings = m.take_postings();
    for account in [BUYER, SELLER] {
        let mut sum = Balance::default();
        for p in postings.iter().filter(|p| p.account == account) {
            assert!(p.event < events.len());
            match p.bucket {
                Bucket::Available => sum.available += p.amount,
                Bucket::Escrow => sum.escrow += p.amount,
            }
        }
        assert_eq!(sum, m.balance(account).unwrap(), "{account}");
    }
    // The deposit is the first posting, from the first money event.
    assert!(matches!(events[postings[0].event], Event::Deposited { amount: 1000, .. }));
    assert!(m.take_postings().is_empty());
}

#[test]
fn a_seller_can_give_a_lease_back_and_the_order_moves_on() {
    let mut m = market();
    let s = sell(&mut m, NODE, slot(), 100, 0);
    let b = m.place_buy(BUYER, buy(1, 100), 0).unwrap();
    let lease = leases_of(&m, b)[0].id;
    m.lease_ready(SELLER, lease, 0).unwrap();
    let spare = sell(&mut m, NODE2, slot(), 100, 1);
    assert_refused(&mut m, |m| m.release_lease(BUYER, lease, 360), MarketError::NotYourLease { lease });
    m.take_events();
    m.release_lease(SELLER, lease, 360).unwrap();
    assert_eq!(ended(&m.take_events()), vec![(lease, EndReason::SellerWithdrew, 360)]);
    assert_eq!(m.balance(BUYER).unwrap().available, 100_000 - 10 - 100);
    assert_eq!(leases_of(&m, b)[0].sell, spare);
    assert!(m.sell_order(s).unwrap().is_resting(), "the slot stays on the market");
    check(&m);
}

#[test]
fn a_resting_bid_that_asks_no_minimum_trades_with_a_slot_that_comes() {
    // A bid's "no minimum RAM" is a 0 in the bid book's index, where a search once
    // took 0 for a failed bit set and missed it.
    let mut m = market();
    let mut req = buy(1, 79);
    req.requirements.min_score = 2000;
    let b = m.place_buy(BUYER, req, 0).unwrap();
    assert!(m.buy_order(b).unwrap().resting);
    let s = m.place_sell(SELLER, SellRequest::new(NODE, slot(), 1), 0).unwrap();
    assert_eq!(m.sell_order(s).unwrap().lease, Some(leases_of(&m, b)[0].id), "the slot trades with the resting bid");
    check(&m);
}
