//! The exchange's data directory: its CA, its server certificate, its settings
//! and (by default) its SQLite store. `init` makes one; `open` runs from it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cpushare_market::{AccountId, MarketConfig};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineConfig};
use crate::node::{create_private_dir, NodeConfig};
use crate::pki::{fingerprint, node_request, Authority, Identity};
use crate::server::{serve, Listening};
use crate::service::{Api, Limits};
use crate::state::Record;
use crate::store::{sqlite_url, Store};

/// What `exchange.json` holds; every field has a default an operator may change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Store URL; empty means the SQLite file in the data directory.
    #[serde(default)]
    pub db: String,
    pub listen: SocketAddr,
    /// Host names and addresses the server certificate is valid for.
    pub names: Vec<String>,
    #[serde(default = "default_fee")]
    pub fee_bps: u32,
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_secs: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_timeout_secs: u64,
    #[serde(default = "default_rate")]
    pub orders_per_sec: f64,
    #[serde(default = "default_burst")]
    pub order_burst: f64,
    /// How often running leases are metered and settled.
    #[serde(default = "default_settle")]
    pub settle_every_secs: u64,
    /// Snapshot the state after this many records, so a restart replays only the tail.
    #[serde(default = "default_snapshot")]
    pub snapshot_every_records: u64,
}

fn default_fee() -> u32 {
    MarketConfig::default().fee_bps
}
fn default_ready_timeout() -> u64 {
    MarketConfig::default().ready_timeout
}
fn default_heartbeat() -> u64 {
    30
}
fn default_rate() -> f64 {
    Limits::default().orders_per_sec
}
fn default_burst() -> f64 {
    Limits::default().order_burst
}
fn default_snapshot() -> u64 {
    EngineConfig::default().snapshot_every
}
fn default_settle() -> u64 {
    EngineConfig::default().settle_every.as_secs()
}

impl Settings {
    pub fn new(listen: SocketAddr, names: Vec<String>, db: String) -> Settings {
        Settings {
            db,
            listen,
            names,
            fee_bps: default_fee(),
            ready_timeout_secs: default_ready_timeout(),
            heartbeat_timeout_secs: default_heartbeat(),
            orders_per_sec: default_rate(),
            order_burst: default_burst(),
            settle_every_secs: default_settle(),
            snapshot_every_records: default_snapshot(),
        }
    }

    fn engine(&self) -> EngineConfig {
        EngineConfig {
            market: MarketConfig { fee_bps: self.fee_bps, ready_timeout: self.ready_timeout_secs },
            heartbeat_timeout: Duration::from_secs(self.heartbeat_timeout_secs),
            settle_every: Duration::from_secs(self.settle_every_secs.max(1)),
            snapshot_every: self.snapshot_every_records.max(1),
            ..EngineConfig::default()
        }
    }

    fn limits(&self) -> Limits {
        Limits { orders_per_sec: self.orders_per_sec, order_burst: self.order_burst, ..Limits::default() }
    }
}

/// Where the exchange keeps its data: `--data`, `$CPUSHARE_DATA`, or
/// `$XDG_DATA_HOME/cpushare-exchange` (`~/.local/share/cpushare-exchange`).
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CPUSHARE_DATA") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("cpushare-exchange")
}

pub struct Initialised {
    pub ca_fingerprint: String,
    pub admin: NodeConfig,
}

/// Creates a data directory: CA, server certificate, settings, the store with
/// the operator's account, and the operator's own node (saved in `admin_dir`,
/// so that `cpushare account create` and friends work from this machine).
pub async fn init(dir: &Path, settings: Settings, admin_dir: &Path) -> anyhow::Result<Initialised> {
    if dir.join("exchange.json").exists() {
        bail!("{} already holds an exchange; start it with `cpushare exchange run`", dir.display());
    }
    if admin_dir.join("node.json").exists() {
        bail!("{} already holds an enrolled node; pass another --config for the operator's node", admin_dir.display());
    }
    create_private_dir(dir)?;
    let authority = Authority::create("cpushare exchange")?;
    authority.save(dir)?;
    authority.issue_server(&settings.names)?.save(dir, "server")?;
    std::fs::write(dir.join("exchange.json"), serde_json::to_string_pretty(&settings)? + "\n")?;

    let store = Store::open(&store_url(dir, &settings)).await?;
    let engine = Engine::start(store, settings.engine()).await?;
    let (key, csr) = node_request("operator")?;
    let cert = authority.sign_node(&csr, 1)?;
    let fp = fingerprint(&cert);
    let (account, node) = engine
        .call(move |core| {
            anyhow::ensure!(core.state.registry.accounts.is_empty(), "the store already holds accounts");
            let (account, node, at) = (AccountId(1), core.state.registry.next_node(), core.now());
            core.record(Record::AccountCreated { account, name: "operator".into(), at });
            core.state.market.open_account(account, at)?;
            core.record(Record::NodeEnrolled {
                node,
                account,
                name: "operator".into(),
                fingerprint: fp,
                admin: true,
                token_hash: None,
                at,
            });
            Ok((account, node))
        })
        .await??;
    anyhow::ensure!(node.0 == 1, "the operator's node must be the first");
    let host = settings.names.first().cloned().unwrap_or_else(|| "localhost".into());
    let admin = NodeConfig {
        dir: admin_dir.to_path_buf(),
        url: format!("https://{}:{}", url_host(&host), settings.listen.port()),
        ca: authority.cert_der().clone(),
        identity: Identity { cert, key_pkcs8: key.serialize_der() },
        account: account.0,
        node: node.0,
    };
    admin.save()?;
    Ok(Initialised { ca_fingerprint: authority.fingerprint(), admin })
}

fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn store_url(dir: &Path, settings: &Settings) -> String {
    if settings.db.is_empty() {
        sqlite_url(&dir.join("exchange.db"))
    } else {
        settings.db.clone()
    }
}

pub fn load_settings(dir: &Path) -> anyhow::Result<Settings> {
    let file = dir.join("exchange.json");
    let text = std::fs::read_to_string(&file).map_err(|_| {
        anyhow::anyhow!("{} holds no exchange: create one with `cpushare exchange init --data {}`", dir.display(), dir.display())
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged", file.display()))
}

/// A running exchange.
pub struct Running {
    pub listening: Listening,
    pub engine: Engine,
    pub ca_fingerprint: String,
}

/// Starts the exchange kept in `dir`; `listen` overrides the settings' address.
pub async fn run(dir: &Path, listen: Option<SocketAddr>) -> anyhow::Result<Running> {
    let settings = load_settings(dir)?;
    let authority = Arc::new(Authority::load(dir)?);
    let server = Identity::load(dir, "server")?;
    let store = Store::open(&store_url(dir, &settings)).await?;
    let engine = Engine::start(store, settings.engine()).await?;
    let api = Api::new(engine.clone(), authority.clone(), settings.limits());
    let listening = serve(api, &authority, &server, listen.unwrap_or(settings.listen)).await?;
    Ok(Running { listening, engine, ca_fingerprint: authority.fingerprint() })
}
