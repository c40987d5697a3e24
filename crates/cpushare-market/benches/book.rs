//! Criterion benchmarks of the market engine. See BENCHMARKS.md for results.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use cpushare_market::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::{requirements, slot, Driver, ScanBook, RESTING};

/// Place-and-match throughput: the mixed operation stream on a 100,000-slot book.
fn mixed_operations(c: &mut Criterion) {
    let mut g = c.benchmark_group("market");
    g.throughput(Throughput::Elements(1));
    let mut driver = Driver::new(7, false);
    g.bench_function("mixed order operation, 100k resting slots", |b| b.iter(|| driver.step()));
    g.finish();
    eprintln!("(book after the run: {} resting seccomp-strict slots, {} live leases)", driver.resting_slots(), driver.live_leases());
}

/// The filtered best-ask query alone, against the plain scan of a price-ordered map.
fn filtered_query(c: &mut Criterion) {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let mut book = AskBook::default();
    let mut scan = ScanBook::new();
    for seq in 0..RESTING as u64 {
        let (slot, ask) = slot(&mut r);
        let order = SellOrder {
            id: OrderId(seq),
            account: AccountId(0),
            node: NodeId(0),
            slot,
            ask,
            kind_asks: Default::default(),
            placed_at: 0,
            seq,
            lease: None,
            withdrawn: false,
        };
        book.insert(&order);
        scan.insert(ask, seq, slot);
    }
    let queries: Vec<(Requirements, u64)> = (0..4096).map(|_| requirements(&mut r)).collect();
    // Both must agree before either is timed.
    for (q, p) in &queries {
        assert_eq!(book.best(q, *p).map(|id| id.0), scan.best(q, *p).map(|(_, seq)| seq));
    }
    let mut g = c.benchmark_group("best ask for a filtered buy, 100k slots");
    g.throughput(Throughput::Elements(queries.len() as u64));
    g.bench_function("cpushare ask book", |b| {
        b.iter(|| {
            for (q, p) in &queries {
                black_box(book.best(q, *p));
            }
        })
    });
    g.bench_function("peer: price-ordered scan", |b| {
        b.iter(|| {
            for (q, p) in &queries {
                black_box(scan.best(q, *p));
            }
        })
    });
    g.finish();
}

/// Replaying an event log, as the exchange does at every start.
fn replay(c: &mut Criterion) {
    // A market built from its log: a 100k-slot book, then 100,000 operations.
    let mut driver = Driver::new(11, true);
    for _ in 0..100_000 {
        driver.step();
    }
    let events = driver.market.take_events();
    let full = Market::replay(MarketConfig::default(), &events);
    assert!(full.leases().count() > 0);
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("apply events from empty", |b| {
        b.iter_batched(|| (), |_| Market::replay(MarketConfig::default(), &events), BatchSize::LargeInput)
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(5));
    targets = mixed_operations, filtered_query, replay
}
criterion_main!(benches);
