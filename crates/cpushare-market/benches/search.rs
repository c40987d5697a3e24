//! The ask book's search alone, for the latency bench's mix of buys (1, 2 or 4
//! CPUs, the same filters) on its steady-state book of 100,000 resting slots.
//! Run with `cargo bench -p cpushare-market --bench search`; for instructions
//! per search, under callgrind with `--toggle-collect='*search::searches*'`
//! (the figure printed is then slowed by valgrind; divide its count by 100,000).

use std::time::Instant;

use cpushare_market::*;
use rand::{Rng, SeedableRng};

mod common;
use common::{requirements, Driver};

/// The timed loop, apart so that callgrind can count it alone.
#[inline(never)]
fn searches(m: &Market, queries: &[(Requirements, u64, usize)]) -> usize {
    queries.iter().map(|(req, max_price, cpus)| m.asks().best_n(req, *max_price, *cpus).len()).sum()
}

fn main() {
    let mut d = Driver::new(7, false);
    for _ in 0..300_000 {
        d.step();
    }
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let queries: Vec<_> = (0..20_000)
        .map(|_| {
            let (req, max_price) = requirements(&mut r);
            (req, max_price, [1, 1, 1, 1, 1, 1, 1, 2, 2, 4][r.gen_range(0..10)])
        })
        .collect();
    const ROUNDS: usize = 5;
    let start = Instant::now();
    let found: usize = (0..ROUNDS).map(|_| searches(&d.market, &queries)).sum();
    let ns = start.elapsed().as_nanos() as f64 / (ROUNDS * queries.len()) as f64;
    println!("ask search, the latency bench's mix of buys on its 100k-slot book: {ns:.0} ns each ({} searches, {found} slots found)", ROUNDS * queries.len());
}
