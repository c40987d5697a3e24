//! Commands a node runs against its exchange.

use std::path::Path;

use clap::{Args, Subcommand};
use cpushare_exchange::client::Connection;
use cpushare_exchange::convert::{euros, kind_from, kind_to, parse_euros};
use cpushare_exchange::node::{self, NodeConfig};
use cpushare_market::SandboxKind;
use cpushare_proto::v1 as pb;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::table::Output;

/// Connects as the node enrolled in `config`.
pub async fn connect(config: &Path) -> anyhow::Result<Connection> {
    NodeConfig::load(config)?.connect().await
}

/// Connects as the node enrolled in `config`, for a command that then runs a
/// while (`run`, `cluster start`): an exchange that cannot be reached (restarting,
/// or a link coming back) is tried again for a minute, said once through `note`,
/// rather than the command giving up at once. Refusals (a certificate, say) end
/// it at once.
pub async fn connect_patiently(config: &Path, note: impl Fn(&str)) -> anyhow::Result<Connection> {
    let node = NodeConfig::load(config)?;
    let since = std::time::Instant::now();
    let mut told = false;
    loop {
        match node.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if since.elapsed() < PATIENCE && format!("{e:#}").contains("cannot reach the exchange") => {
                if !told {
                    note(&format!("{e:#}; trying again for up to {} s", PATIENCE.as_secs()));
                    told = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long `connect_patiently` waits for an exchange it cannot reach.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// A refusal from the exchange, as the user should read it.
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

#[derive(Subcommand)]
pub enum AccountCmd {
    /// Create an account; prints its one-time enrollment token.
    Create { name: String },
}

#[derive(Args)]
pub struct EnrollArgs {
    /// The exchange, as https://HOST[:PORT].
    #[arg(long, value_name = "URL")]
    exchange: String,
    /// The one-time token the operator gave you.
    #[arg(long)]
    token: String,
    /// The exchange's CA fingerprint, if you have it: the connection is refused unless it matches.
    #[arg(long, value_name = "SHA256")]
    ca_fingerprint: Option<String>,
    /// A name for this machine in listings. Default: its host name.
    #[arg(long)]
    name: Option<String>,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Make a node's certificate useless at once (yours, or any, for the operator).
    Revoke { node: u64 },
}

#[derive(Args)]
pub struct DepositArgs {
    account: u64,
    /// Euros, e.g. 25 or 12.50.
    amount: String,
}

#[derive(Args)]
pub struct WithdrawArgs {
    /// Euros, e.g. 25 or 12.50.
    amount: String,
}

#[derive(Args)]
pub struct StatementArgs {
    /// How many entries.
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

#[derive(Args)]
pub struct BuyArgs {
    /// CPUs wanted.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// The most you pay, in cents per CPU-hour.
    #[arg(long, value_name = "CENTS")]
    max_price: u64,
    /// Sandbox: seccomp-strict, seccomp-emulated, vm-kvm or vm-tcg.
    #[arg(long, default_value = "seccomp-strict")]
    kind: SandboxKind,
    /// Minimum benchmark score (MFLOPS) per CPU.
    #[arg(long, default_value_t = 0)]
    min_score: u32,
    /// Minimum RAM per CPU, in MiB.
    #[arg(long, default_value_t = 0)]
    min_ram: u32,
    /// Maximum latency from the seller to the exchange, in ms.
    #[arg(long)]
    max_latency: Option<u32>,
    /// Only sellers that accept inbound UDP (direct virtual-network paths).
    #[arg(long)]
    udp_only: bool,
    /// Lease period in seconds (leases renew, and escrow refills, once per period).
    #[arg(long, default_value_t = 3600)]
    period: u64,
    /// Periods each lease runs; without it, leases run until you cancel.
    #[arg(long)]
    periods: Option<u32>,
}

#[derive(Args)]
pub struct CancelArgs {
    order: u64,
}

#[derive(Args)]
pub struct CancelLeaseArgs {
    lease: u64,
}

#[derive(Args)]
pub struct BookArgs {
    #[arg(long, default_value = "seccomp-strict")]
    kind: SandboxKind,
}

#[derive(Args)]
pub struct TradesArgs {
    /// Stop after this many trades (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
}

pub async fn account(cmd: AccountCmd, config: &Path, out: Output) -> anyhow::Result<()> {
    let AccountCmd::Create { name } = cmd;
    let node = NodeConfig::load(config)?;
    let mut conn = node.connect().await?;
    let created = conn.admin.create_account(pb::CreateAccountRequest { name: name.clone() }).await.map_err(status)?.into_inner();
    let fp = cpushare_exchange::pki::fingerprint(&node.ca);
    out.record(vec![("account", json!(created.account)), ("name", json!(name)), ("token", json!(created.token))]);
    if !out.json {
        println!();
        println!("The token works once. On the member's machine:");
        println!("  cpushare enroll --exchange {} --token {} --ca-fingerprint {fp}", node.url, created.token);
    }
    Ok(())
}

pub async fn enroll(args: EnrollArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let name = args.name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "node".into())
    });
    let pinned = args.ca_fingerprint.is_some();
    let node = node::enroll(&args.exchange, &args.token, args.ca_fingerprint, config, &name).await?;
    out.record(vec![
        ("account", json!(node.account)),
        ("node", json!(node.node)),
        ("CA fingerprint", json!(cpushare_exchange::pki::fingerprint(&node.ca))),
        ("saved in", json!(config.display().to_string())),
    ]);
    if !pinned && !out.json {
        println!();
        println!("No fingerprint was pinned: compare the CA fingerprint above with the one the operator published.");
    }
    Ok(())
}

pub async fn node(cmd: NodeCmd, config: &Path, out: Output) -> anyhow::Result<()> {
    let NodeCmd::Revoke { node } = cmd;
    connect(config).await?.admin.revoke_node(pb::RevokeNodeRequest { node }).await.map_err(status)?;
    out.record(vec![("revoked", json!(node))]);
    Ok(())
}

pub async fn balance(config: &Path, out: Output) -> anyhow::Result<()> {
    let b = connect(config).await?.exchange.balance(pb::BalanceRequest {}).await.map_err(status)?.into_inner();
    out.record(vec![
        ("available (EUR)", json!(euros(b.available_cents))),
        ("escrow (EUR)", json!(euros(b.escrow_cents))),
    ]);
    Ok(())
}

pub async fn web_token(config: &Path, out: Output) -> anyhow::Result<()> {
    let t = connect(config).await?.exchange.web_token(pb::WebTokenRequest {}).await.map_err(status)?.into_inner();
    out.record(vec![("token", json!(t.token)), ("sign in at", json!("the exchange's dashboard, /signin"))]);
    Ok(())
}

fn amount(s: &str) -> anyhow::Result<i64> {
    parse_euros(s).map_err(anyhow::Error::msg)
}

pub async fn deposit(args: DepositArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let cents = amount(&args.amount)?;
    let r = connect(config)
        .await?
        .admin
        .deposit(pb::DepositRequest { account: args.account, amount_cents: cents })
        .await
        .map_err(status)?
        .into_inner();
    out.record(vec![("account", json!(args.account)), ("available (EUR)", json!(euros(r.available_cents)))]);
    Ok(())
}

pub async fn withdraw(args: WithdrawArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let cents = amount(&args.amount)?;
    let r = connect(config).await?.exchange.withdraw(pb::WithdrawRequest { amount_cents: cents }).await.map_err(status)?.into_inner();
    out.record(vec![("available (EUR)", json!(euros(r.available_cents)))]);
    Ok(())
}

pub async fn statement(args: StatementArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let r = connect(config)
        .await?
        .exchange
        .statement(pb::StatementRequest { limit: args.limit, before_seq: 0 })
        .await
        .map_err(status)?
        .into_inner();
    let rows = r
        .entries
        .into_iter()
        .map(|e| vec![json!(e.seq), json!(e.at), json!(e.bucket), json!(euros(e.amount_cents)), json!(e.reason)])
        .collect();
    out.table(&["seq", "at", "bucket", "EUR", "reason"], rows);
    Ok(())
}

pub async fn buy(args: BuyArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let request = pb::PlaceBuyRequest {
        cpus: args.cpus,
        max_price: args.max_price,
        requirements: Some(pb::Requirements {
            kind: kind_to(args.kind) as i32,
            min_score: args.min_score,
            min_ram_mib: args.min_ram,
            max_latency_ms: args.max_latency.unwrap_or(0),
            inbound_udp_only: args.udp_only,
        }),
        period_secs: args.period,
        periods: args.periods.unwrap_or(0),
        // A plain order: nobody watches it, it stands until cancelled.
        attended: false,
    };
    let r = connect(config).await?.exchange.place_buy(request).await.map_err(status)?.into_inner();
    out.record(vec![
        ("order", json!(r.order)),
        ("leases opened", json!(r.leases)),
        ("still wanted", json!(args.cpus as usize - r.leases.len())),
    ]);
    Ok(())
}

pub async fn orders(config: &Path, out: Output) -> anyhow::Result<()> {
    let r = connect(config).await?.exchange.list_orders(pb::ListOrdersRequest {}).await.map_err(status)?.into_inner();
    let rows = r
        .orders
        .into_iter()
        .map(|o| {
            let mut what = match (&o.requirements, &o.slot) {
                (Some(req), _) => describe_requirements(req),
                (_, Some(s)) => format!("{} MFLOPS, {} MiB, {} ms", s.score, s.ram_mib, s.latency_ms),
                _ => String::new(),
            };
            for a in &o.kind_asks {
                let kind = cpushare_exchange::convert::kind_from(a.kind).map_or("?".to_string(), |k| k.to_string());
                what.push_str(&format!("; {kind} at {} cents", a.ask));
            }
            vec![json!(o.id), json!(o.side), json!(o.price), json!(o.open), json!(o.leased), json!(what)]
        })
        .collect();
    out.table(&["order", "side", "cents/CPU-h", "open", "leased", "what"], rows);
    Ok(())
}

fn describe_requirements(r: &pb::Requirements) -> String {
    let mut parts = vec![kind_from(r.kind).map(|k| k.name().to_string()).unwrap_or_default()];
    if r.min_score > 0 {
        parts.push(format!(">= {} MFLOPS", r.min_score));
    }
    if r.min_ram_mib > 0 {
        parts.push(format!(">= {} MiB", r.min_ram_mib));
    }
    if r.max_latency_ms > 0 {
        parts.push(format!("<= {} ms", r.max_latency_ms));
    }
    if r.inbound_udp_only {
        parts.push("inbound UDP".into());
    }
    parts.join(", ")
}

pub async fn cancel(args: CancelArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    connect(config).await?.exchange.cancel_order(pb::CancelOrderRequest { order: args.order }).await.map_err(status)?;
    out.record(vec![("cancelled", json!(args.order))]);
    Ok(())
}

pub async fn cancel_lease(args: CancelLeaseArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    connect(config).await?.exchange.cancel_lease(pb::CancelLeaseRequest { lease: args.lease }).await.map_err(status)?;
    out.record(vec![("ended", json!(args.lease))]);
    Ok(())
}

pub async fn book(args: BookArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let r = connect(config)
        .await?
        .exchange
        .book_depth(pb::BookDepthRequest { kind: kind_to(args.kind) as i32 })
        .await
        .map_err(status)?
        .into_inner();
    let side = |name: &str, levels: Vec<pb::PriceLevel>| -> Vec<Vec<Value>> {
        levels.into_iter().map(|l| vec![json!(name), json!(l.price), json!(l.cpus)]).collect()
    };
    let mut rows = side("bid", r.bids);
    rows.extend(side("ask", r.asks));
    out.table(&["side", "cents/CPU-h", "cpus"], rows);
    Ok(())
}

pub async fn trades(args: TradesArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let mut stream = connect(config).await?.exchange.trades(pb::TradesRequest {}).await.map_err(status)?.into_inner();
    let mut seen = 0;
    while let Some(t) = stream.next().await {
        let t = t.map_err(status)?;
        let kinds: Vec<String> = t.kinds.iter().filter_map(|k| kind_from(*k).ok()).map(|k| k.name().to_string()).collect();
        if out.json {
            println!("{}", json!({"lease": t.lease, "price_cents": t.price, "at": t.at, "kinds": kinds}));
        } else {
            println!("{}  lease {}  {} cents/CPU-h  {}", t.at, t.lease, t.price, kinds.join(","));
        }
        seen += 1;
        if args.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

pub async fn leases(config: &Path, out: Output) -> anyhow::Result<()> {
    let r = connect(config).await?.exchange.list_leases(pb::ListLeasesRequest {}).await.map_err(status)?.into_inner();
    let rows = r
        .leases
        .into_iter()
        .map(|l| {
            vec![
                json!(l.id),
                json!(l.role),
                json!(l.state),
                json!(l.price),
                json!(l.delivered_secs),
                json!(euros(l.charged_cents)),
                json!(l.seller_node),
            ]
        })
        .collect();
    out.table(&["lease", "role", "state", "cents/CPU-h", "delivered s", "charged EUR", "seller node"], rows);
    Ok(())
}
