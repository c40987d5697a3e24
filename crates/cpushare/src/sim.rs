//! `cpushare sim`: runs the market simulator and prints what happened.

use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use cpushare_market::sim::{self, SimConfig, SimReport};
use cpushare_market::MarketConfig;

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Seller machines (each offers 1 to 8 CPU slots).
    #[arg(long, default_value_t = 100_000)]
    sellers: u32,
    /// Buyer accounts (each places an order every few hours).
    #[arg(long, default_value_t = 10_000)]
    buyers: u32,
    /// Simulated days.
    #[arg(long, default_value_t = 1.0)]
    days: f64,
    /// Random seed: the same seed gives the same market.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The exchange's fee in basis points (100 = 1 %).
    #[arg(long, default_value_t = MarketConfig::default().fee_bps)]
    fee_bps: u32,
    /// Check every market invariant once per simulated hour (slower).
    #[arg(long)]
    check: bool,
    /// Print only the totals, not the hourly table.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    if !(args.days > 0.0 && args.days <= 365.0) {
        bail!("--days must be more than 0 and at most 365, got {}", args.days);
    }
    if args.sellers == 0 || args.buyers == 0 {
        bail!("a market needs at least one seller and one buyer (--sellers {}, --buyers {})", args.sellers, args.buyers);
    }
    if args.fee_bps > 10_000 {
        bail!("--fee-bps is at most 10000 (100 %), got {}", args.fee_bps);
    }
    let config = SimConfig {
        seed: args.seed,
        sellers: args.sellers,
        buyers: args.buyers,
        duration: (args.days * 86_400.0) as u64,
        market: MarketConfig { fee_bps: args.fee_bps, ..MarketConfig::default() },
        check_invariants: args.check,
        ..SimConfig::default()
    };
    println!(
        "simulating {} sellers and {} buyers for {} day(s), seed {}",
        config.sellers, config.buyers, args.days, config.seed
    );
    let started = Instant::now();
    let report = sim::run(&config).map_err(anyhow::Error::msg).context("the simulation failed")?;
    let wall = started.elapsed();
    if !args.quiet {
        print_hours(&report);
    }
    print_totals(&report, wall.as_secs_f64());
    Ok(())
}

fn print_hours(r: &SimReport) {
    println!(
        "{:>5} {:>9} {:>9} {:>6} {:>9} {:>9} {:>10} {:>12}",
        "hour", "slots", "leased", "util", "waiting", "trades", "mean c/h", "charged EUR"
    );
    for h in &r.hours {
        println!(
            "{:>5} {:>9} {:>9} {:>5.1}% {:>9} {:>9} {:>10.2} {:>12.2}",
            h.hour,
            h.slots,
            h.leased,
            100.0 * h.utilisation(),
            h.waiting_cpus,
            h.trades,
            h.mean_price(),
            h.charged as f64 / 100.0
        );
    }
}

fn print_totals(r: &SimReport, wall: f64) {
    println!("trades            {}", r.trades);
    println!("buy orders        {}", r.buy_orders);
    println!("slots placed      {}", r.slots_placed);
    println!("CPU-hours sold    {:.0}", r.cpu_seconds as f64 / 3600.0);
    println!("charged           {:.2} EUR (fees {:.2} EUR)", r.charged as f64 / 100.0, r.fees as f64 / 100.0);
    println!("peak live leases  {}", r.peak_leases);
    let ended: Vec<String> = r.ended.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("leases ended      {}", ended.join(", "));
    println!("operations        {} ({} refused as stale or unaffordable), {} events", r.operations, r.refused, r.events);
    println!("wall time         {wall:.2} s ({:.0} operations/s)", r.operations as f64 / wall);
    match peak_memory_kib() {
        Some(kib) => println!("peak memory       {:.0} MiB", kib as f64 / 1024.0),
        None => println!("peak memory       unknown (no /proc/self/status)"),
    }
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
