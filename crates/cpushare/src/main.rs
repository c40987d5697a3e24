//! `cpushare`: one binary for every actor of the exchange.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod cluster_cmd;
mod demo;
mod demo_vm;
mod emulate_cmd;
mod examples_cmd;
mod exchange_cmd;
mod node_cmd;
mod sim;
mod table;
mod vnet_cmd;
mod work_cmd;

/// cpushare: an open exchange where anyone sells the idle CPUs of a Linux
/// machine and anyone else rents them by the hour.
///
/// See it all work on this machine: `cpushare demo`.
///
/// Start an exchange with `cpushare exchange init` and `cpushare exchange run`;
/// give people accounts with `cpushare account create NAME`; each machine joins
/// with `cpushare enroll`; sellers run `cpushare sell`, buyers `cpushare run`
/// (or `buy`, `orders`, `leases`, `balance`...).
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// This node's configuration directory (its key, certificate and exchange).
    /// Default: $CPUSHARE_CONFIG, or ~/.config/cpushare.
    #[arg(long, global = true, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole system on this machine: an exchange, three sellers and a buyer
    /// render a Mandelbrot image in tiles; one seller is killed halfway.
    Demo(demo::DemoArgs),
    /// Sell this machine's CPUs: measure them, offer one slot per CPU, run what is leased.
    Sell(work_cmd::SellArgs),
    /// Run a program on rented CPUs (or --local): once, unmodified, as if here; or over a directory of inputs.
    Run(work_cmd::RunArgs),
    /// Machines that boot your livecd on sellers' hosts: start, status, console, stop.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCmd),
    /// The virtual network's parts on their own: run a node, bridge a tap to a VM port, plan a cluster.
    #[command(subcommand)]
    Vnet(vnet_cmd::VnetCmd),
    /// Write the SDK's example programs (mandelbrot, crack) and inputs for
    /// them, ready for `cpushare run`.
    Examples(examples_cmd::ExamplesArgs),
    /// Simulate a whole market (sellers, buyers, churn) to size the exchange.
    ///
    /// Deterministic: the same seed and sizes always give the same trades.
    /// Prints one line per simulated hour, then totals, wall time and peak memory.
    Sim(sim::SimArgs),
    /// Run and operate an exchange.
    #[command(subcommand)]
    Exchange(exchange_cmd::ExchangeCmd),
    /// Accounts (operator only).
    #[command(subcommand)]
    Account(node_cmd::AccountCmd),
    /// Join an exchange: make this machine's key and get it certified with a
    /// one-time token from the operator.
    Enroll(node_cmd::EnrollArgs),
    /// Nodes of your account.
    #[command(subcommand)]
    Node(node_cmd::NodeCmd),
    /// Your account's money: available and held in escrow.
    Balance,
    /// Money from outside into an account (operator only; stands in for a payment provider).
    Deposit(node_cmd::DepositArgs),
    /// Money from your account to outside.
    Withdraw(node_cmd::WithdrawArgs),
    /// Your account's ledger entries, newest first.
    Statement(node_cmd::StatementArgs),
    /// Rent CPUs: place a buy order.
    Buy(node_cmd::BuyArgs),
    /// Your orders.
    Orders,
    /// Cancel one of your orders (a buy order's leases end now).
    Cancel(node_cmd::CancelArgs),
    /// End one of your leases now.
    CancelLease(node_cmd::CancelLeaseArgs),
    /// Depth of one market: CPUs offered and wanted per price.
    Book(node_cmd::BookArgs),
    /// Trades as they happen.
    Trades(node_cmd::TradesArgs),
    /// Your leases, as buyer and as seller.
    Leases,
    /// A token to sign in to the exchange's web dashboard as your account
    /// (paste it at the dashboard's /signin; each call makes a new one).
    WebToken,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config.clone().unwrap_or_else(cpushare_exchange::node::default_config_dir);
    let out = table::Output { json: cli.json };
    match cli.command {
        Command::Sim(args) => sim::run(args),
        Command::Examples(args) => examples_cmd::run(args),
        command => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                match command {
                    Command::Sim(_) | Command::Examples(_) => unreachable!(),
                    Command::Demo(args) => demo::run(args, out).await,
                    Command::Sell(args) => work_cmd::sell(args, &config, out).await,
                    Command::Run(args) => work_cmd::run(args, &config, out).await,
                    Command::Cluster(cmd) => cluster_cmd::run(cmd, &config, out).await,
                    Command::Vnet(cmd) => vnet_cmd::run(cmd).await,
                    Command::Exchange(cmd) => exchange_cmd::run(cmd, &config, out).await,
                    Command::Account(cmd) => node_cmd::account(cmd, &config, out).await,
                    Command::Enroll(args) => node_cmd::enroll(args, &config, out).await,
                    Command::Node(cmd) => node_cmd::node(cmd, &config, out).await,
                    Command::Balance => node_cmd::balance(&config, out).await,
                    Command::WebToken => node_cmd::web_token(&config, out).await,
                    Command::Deposit(args) => node_cmd::deposit(args, &config, out).await,
                    Command::Withdraw(args) => node_cmd::withdraw(args, &config, out).await,
                    Command::Statement(args) => node_cmd::statement(args, &config, out).await,
                    Command::Buy(args) => node_cmd::buy(args, &config, out).await,
                    Command::Orders => node_cmd::orders(&config, out).await,
                    Command::Cancel(args) => node_cmd::cancel(args, &config, out).await,
                    Command::CancelLease(args) => node_cmd::cancel_lease(args, &config, out).await,
                    Command::Book(args) => node_cmd::book(args, &config, out).await,
                    Command::Trades(args) => node_cmd::trades(args, &config, out).await,
                    Command::Leases => node_cmd::leases(&config, out).await,
                }
            })
        }
    }
}
