//! `cpushare`: one binary for every actor of the exchange.

use clap::{Parser, Subcommand};

mod sim;

/// cpushare: an open exchange where anyone sells the idle CPUs of a Linux
/// machine and anyone else rents them by the hour.
#[derive(Parser)]
#[command(version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a whole market (sellers, buyers, churn) to size the exchange.
    ///
    /// Deterministic: the same seed and sizes always give the same trades.
    /// Prints one line per simulated hour, then totals, wall time and peak memory.
    Sim(sim::SimArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => sim::run(args),
    }
}
