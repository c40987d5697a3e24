//! A whole market on this machine: an exchange on SQLite in a directory of its
//! own, sellers and members, all over mutual TLS on localhost. `cpushare demo`
//! runs on it, and so do the end-to-end tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cpushare_exchange::client::Connection;
use cpushare_exchange::datadir::{self, Running, Settings};
use cpushare_exchange::node::{enroll, NodeConfig};
use cpushare_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Seller, SellerConfig};

/// What a seller measures of its machine once and caches (see [`crate::bench`], [`crate::vm_lease::kvm_verdict`]).
const MEASURED: [&str; 2] = ["benchmark.json", "kvm-probe.json"];

pub struct Testbed {
    pub dir: PathBuf,
    pub exchange: Running,
    pub url: String,
    pub operator: Connection,
    pub sellers: Vec<SellerHandle>,
}

pub struct SellerHandle {
    pub name: String,
    pub account: u64,
    pub node: NodeConfig,
    pub seller: Arc<Seller>,
    /// Held so the seller runs until killed (a dropped sender reads as "stop").
    _stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SellerHandle {
    /// The seller vanishes: its session and relays drop and its jails die, without
    /// a word to the exchange (as when its machine loses power).
    pub fn kill(self) {
        // Not `stop`: a seller that stops on purpose withdraws its slots first.
        self.task.abort();
        self.seller.stop_leases();
    }
}

impl Testbed {
    /// An exchange in `dir` (which must not exist yet), listening on a free port on
    /// localhost, with a short heartbeat timeout so that lost sellers show quickly.
    pub async fn start(dir: &Path, heartbeat_timeout_secs: u64) -> anyhow::Result<Testbed> {
        let mut settings = Settings::new("127.0.0.1:0".parse()?, vec!["127.0.0.1".into()], String::new());
        settings.heartbeat_timeout_secs = heartbeat_timeout_secs;
        settings.settle_every_secs = 1;
        settings.orders_per_sec = 10_000.0;
        settings.order_burst = 10_000.0;
        datadir::init(&dir.join("exchange"), settings, &dir.join("operator")).await?;
        let exchange = datadir::run(&dir.join("exchange"), None).await?;
        let url = format!("https://127.0.0.1:{}", exchange.listening.addr.port());
        let mut operator_node = NodeConfig::load(&dir.join("operator"))?;
        operator_node.url = url.clone();
        let operator = operator_node.connect().await?;
        Ok(Testbed { dir: dir.to_path_buf(), exchange, url, operator, sellers: Vec::new() })
    }

    /// A member with one enrolled node and `cents` deposited.
    pub async fn member(&mut self, name: &str, cents: i64) -> anyhow::Result<NodeConfig> {
        let created = self
            .operator
            .admin
            .create_account(pb::CreateAccountRequest { name: name.into() })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        if cents > 0 {
            self.operator
                .admin
                .deposit(pb::DepositRequest { account: created.account, amount_cents: cents })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        }
        enroll(&self.url, &created.token, None, &self.dir.join(name), name).await
    }

    /// A seller with `cpus` slots at `price` cents per CPU-hour, running.
    pub async fn seller(&mut self, name: &str, cpus: u32, price: u64, tune: impl FnOnce(&mut SellerConfig)) -> anyhow::Result<&SellerHandle> {
        let node = self.member(name, 0).await?;
        let mut config = SellerConfig::new(node.dir.clone(), cpus, price);
        // Each seller a cache of its own (its images, files, VMs), as on its
        // own machine; what it measured of this one machine is shared, so
        // that the benchmark and the KVM probe run once per testbed.
        let shared = self.dir.join("cache");
        config.cache_dir = shared.join(name);
        std::fs::create_dir_all(&config.cache_dir)?;
        for measured in MEASURED {
            let _ = std::fs::copy(shared.join(measured), config.cache_dir.join(measured));
        }
        config.ram_per_slot_mib = 256;
        tune(&mut config);
        let cache_dir = config.cache_dir.clone();
        let seller = Seller::start(config).await?;
        for measured in MEASURED {
            if !shared.join(measured).exists() {
                let _ = std::fs::copy(cache_dir.join(measured), shared.join(measured));
            }
        }
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn({
            let seller = seller.clone();
            async move { seller.run(stopped).await }
        });
        let account = node.account;
        self.sellers.push(SellerHandle { name: name.into(), account, node, seller, _stop: stop, task });
        // Ready once its slots are on the market.
        let mut conn = self.sellers.last().unwrap().node.connect().await?;
        for _ in 0..200 {
            let orders = conn.exchange.list_orders(pb::ListOrdersRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            if orders.into_inner().orders.len() >= cpus as usize {
                return Ok(self.sellers.last().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("seller {name} did not register its slots")
    }
}
