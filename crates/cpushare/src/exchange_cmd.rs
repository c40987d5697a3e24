//! `cpushare exchange ...`: make, run and operate an exchange.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use cpushare_exchange::client::DEFAULT_PORT;
use cpushare_exchange::datadir::{self, Settings};
use cpushare_proto::v1 as pb;
use serde_json::json;

use crate::node_cmd::{connect, status};
use crate::table::Output;

#[derive(Subcommand)]
pub enum ExchangeCmd {
    /// Create an exchange: its data directory, certificate authority and store,
    /// and the operator's own node (saved in --config) for the admin commands.
    Init(InitArgs),
    /// Run the exchange kept in a data directory (stop with Ctrl-C or SIGTERM).
    Run(RunArgs),
    /// Kill switch: stop matching and end every lease now (metering stops, escrow returns).
    Halt,
    /// Restart matching after a halt.
    Resume,
    /// Check every ledger and market invariant; print the totals.
    Audit,
    /// Refuse sellers whose kernel version starts with one of these prefixes
    /// (replaces the list; give none to clear it).
    RefuseKernels { prefixes: Vec<String> },
}

#[derive(Args)]
pub struct InitArgs {
    /// Where the exchange keeps its data. Default: $CPUSHARE_DATA, or ~/.local/share/cpushare-exchange.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Host names or addresses nodes will use to reach the exchange (repeat for several).
    /// Default: localhost, 127.0.0.1 and this machine's host name.
    #[arg(long = "name", value_name = "HOST")]
    names: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    listen: SocketAddr,
    /// Store: a PostgreSQL URL (postgres://...) for operators who outgrow one machine.
    /// Default: SQLite in the data directory.
    #[arg(long, value_name = "URL")]
    db: Option<String>,
}

#[derive(Args)]
pub struct RunArgs {
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Listen here instead of the address chosen at init.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve the web dashboard here (plain HTTP: put it behind a TLS proxy to publish it).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    web: SocketAddr,
    /// No web dashboard.
    #[arg(long, conflicts_with = "web")]
    no_web: bool,
}

pub async fn run(cmd: ExchangeCmd, config: &Path, out: Output) -> anyhow::Result<()> {
    match cmd {
        ExchangeCmd::Init(args) => init(args, config, out).await,
        ExchangeCmd::Run(args) => serve(args).await,
        ExchangeCmd::Halt => {
            let ended = connect(config).await?.admin.halt(pb::HaltRequest {}).await.map_err(status)?.into_inner();
            out.record(vec![("halted", json!(true)), ("leases ended", json!(ended.leases_ended))]);
            Ok(())
        }
        ExchangeCmd::Resume => {
            connect(config).await?.admin.resume(pb::ResumeRequest {}).await.map_err(status)?;
            out.record(vec![("halted", json!(false))]);
            Ok(())
        }
        ExchangeCmd::Audit => {
            let a = connect(config).await?.admin.audit(pb::AuditRequest {}).await.map_err(status)?.into_inner();
            out.record(vec![
                ("ok", json!(a.ok)),
                ("problem", if a.ok { json!(null) } else { json!(a.problem) }),
                ("deposited (EUR)", json!(cpushare_exchange::convert::euros(-a.world_cents))),
                ("fees (EUR)", json!(cpushare_exchange::convert::euros(a.fees_cents))),
                ("accounts", json!(a.accounts)),
                ("sell orders", json!(a.sell_orders)),
                ("buy orders", json!(a.buy_orders)),
                ("leases", json!(a.leases)),
                ("records", json!(a.events)),
            ]);
            anyhow::ensure!(a.ok, "the audit failed: {}", a.problem);
            Ok(())
        }
        ExchangeCmd::RefuseKernels { prefixes } => {
            connect(config).await?.admin.set_refused_kernels(pb::SetRefusedKernelsRequest { prefixes: prefixes.clone() }).await.map_err(status)?;
            out.record(vec![("refused kernels", json!(prefixes))]);
            Ok(())
        }
    }
}

async fn init(args: InitArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let data = args.data.unwrap_or_else(datadir::default_data_dir);
    let mut names = args.names;
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into()];
        if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
            let host = host.trim();
            if !host.is_empty() && host != "localhost" {
                names.push(host.to_string());
            }
        }
    }
    let settings = Settings::new(args.listen, names, args.db.unwrap_or_default());
    let done = datadir::init(&data, settings, config).await.context("cannot create the exchange")?;
    out.record(vec![
        ("data", json!(data.display().to_string())),
        ("CA fingerprint", json!(done.ca_fingerprint)),
        ("operator node", json!(config.display().to_string())),
        ("exchange URL", json!(done.admin.url)),
    ]);
    if !out.json {
        println!();
        println!("Next: `cpushare exchange run` to serve, then `cpushare account create NAME` for each member.");
        println!("Members should check the CA fingerprint above when they enroll.");
    }
    Ok(())
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let data = args.data.unwrap_or_else(datadir::default_data_dir);
    let running = datadir::run(&data, args.listen).await.with_context(|| format!("cannot start the exchange in {}", data.display()))?;
    println!("cpushare exchange listening on {}", running.listening.addr);
    println!("CA fingerprint {}", running.ca_fingerprint);
    let _web = if args.no_web {
        None
    } else {
        // The exchange's work does not depend on its dashboard: a busy port is said, not fatal.
        match cpushare_exchange::web::serve(running.engine.clone(), args.web).await {
            Ok(web) => {
                println!("dashboard at http://{}/", web.addr);
                Some(web)
            }
            Err(e) => {
                eprintln!("cpushare: no dashboard: {e:#} (give another address with --web)");
                None
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping");
    running.listening.shutdown().await;
    Ok(())
}
