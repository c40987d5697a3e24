//! Per-operation latency percentiles and single-core throughput of the mixed
//! order stream on a 100,000-slot book (criterion reports means, not tails).
//! Run with `cargo bench -p cpushare-market --bench latency`.

use std::time::Instant;

mod common;
use common::{Driver, OP_NAMES};

fn main() {
    // CPUSHARE_BENCH_OPS shortens the run (for instruction counting under callgrind).
    let measured: usize = std::env::var("CPUSHARE_BENCH_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    // CPUSHARE_BENCH_WARMUP: operations before either loop (instruction counts under
    // callgrind are taken past the tables' last growth).
    let warmup: usize = std::env::var("CPUSHARE_BENCH_WARMUP").ok().and_then(|v| v.parse().ok()).unwrap_or(measured / 5);
    let mut d = Driver::new(7, false);
    for _ in 0..warmup {
        d.step();
    }

    // Throughput: the loop alone, no per-operation clock reads, in rounds one after
    // the other on the same market: a VM's speed swings (its neighbours share the
    // memory), and the rounds show whether one run met a slow patch.
    const ROUNDS: usize = 5;
    let mut counts = [0; OP_NAMES.len()];
    let mut rates = Vec::with_capacity(ROUNDS);
    let start = Instant::now();
    for r in 0..ROUNDS {
        let ops = measured / ROUNDS + usize::from(r < measured % ROUNDS);
        let round = Instant::now();
        for (total, n) in counts.iter_mut().zip(throughput(&mut d, ops)) {
            *total += n;
        }
        rates.push(ops as f64 / round.elapsed().as_secs_f64());
    }
    let secs = start.elapsed().as_secs_f64();

    // Latency: each operation timed.
    let mut nanos: Vec<u32> = Vec::with_capacity(measured);
    let mut by_kind: Vec<Vec<u32>> = vec![Vec::new(); OP_NAMES.len()];
    for _ in 0..measured {
        let t = Instant::now();
        let kind = d.step();
        let ns = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        nanos.push(ns);
        by_kind[kind].push(ns);
    }
    println!("mixed order operations on a market of 100k resting and 100k leased slots, one core");
    println!("throughput  {:.0} operations/s ({measured} operations in {secs:.3} s)", measured as f64 / secs);
    let mix: Vec<String> = OP_NAMES.iter().zip(counts).map(|(name, n)| format!("{name} {n}")).collect();
    println!("            of which {}", mix.join(", "));
    let shown: Vec<String> = rates.iter().map(|r| format!("{:.0}k", r / 1000.0)).collect();
    rates.sort_by(f64::total_cmp);
    println!("            rounds of {} operations: {} (median {:.0}k)", measured / ROUNDS, shown.join(" "), rates[ROUNDS / 2] / 1000.0);
    println!("{}", percentiles("all", &mut nanos));
    for (name, ns) in OP_NAMES.iter().zip(&mut by_kind) {
        println!("{}", percentiles(name, ns));
    }
    println!(
        "book        {} resting seccomp-strict slots, {} live leases, {} resting buy orders after the run",
        d.resting_slots(),
        d.live_leases(),
        d.market.buy_orders().filter(|o| o.resting).count()
    );
}

/// The timed loop, apart so that callgrind can count it alone
/// (`--toggle-collect='*throughput*'`).
#[inline(never)]
fn throughput(d: &mut Driver, operations: usize) -> [u32; OP_NAMES.len()] {
    let mut counts = [0; OP_NAMES.len()];
    for _ in 0..operations {
        counts[d.step()] += 1;
    }
    counts
}

fn percentiles(name: &str, nanos: &mut [u32]) -> String {
    if nanos.is_empty() {
        return format!("{name:>14}  no samples");
    }
    nanos.sort_unstable();
    let pct = |p: f64| nanos[((nanos.len() as f64 * p) as usize).min(nanos.len() - 1)] as f64 / 1000.0;
    format!(
        "{name:>14}  n {:>7}  p50 {:>6.2} us  p90 {:>6.2} us  p99 {:>7.2} us  p99.9 {:>8.2} us  max {:>9.2} us",
        nanos.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    )
}
