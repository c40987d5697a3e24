//! Test databases: a fresh SQLite file, and a fresh PostgreSQL database when
//! `CPUSHARE_TEST_POSTGRES` names a server (scripts/test starts one). Under
//! `CI=true` a missing PostgreSQL fails the test instead of skipping it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use cpushare_exchange::client::Connection;
use cpushare_exchange::datadir::{self, Running, Settings};
use cpushare_exchange::node::{enroll, NodeConfig};
use cpushare_proto::v1 as pb;

pub struct TestDb {
    pub name: &'static str,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = cpushare_exchange::store::sqlite_url(&dir.path().join("exchange.db"));
    TestDb { name: "sqlite", url, _dir: Some(dir) }
}

/// A new, empty PostgreSQL database, or `None` (with the reason printed) when no
/// server is configured outside CI.
pub async fn postgres() -> Option<TestDb> {
    let Ok(base) = std::env::var("CPUSHARE_TEST_POSTGRES") else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but CPUSHARE_TEST_POSTGRES is not set: scripts/test starts PostgreSQL and sets it");
        }
        eprintln!("skipping the PostgreSQL half: set CPUSHARE_TEST_POSTGRES (scripts/test does) to run it");
        return None;
    };
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!("cpushare_test_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    sqlx::any::install_default_drivers();
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&base).await.expect("connect to CPUSHARE_TEST_POSTGRES");
    sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {db}").as_str()).await.unwrap();
    let (head, query) = base.split_once('?').map_or((base.as_str(), ""), |(h, q)| (h, q));
    let head = &head[..head.rfind('/').unwrap()];
    let url = if query.is_empty() { format!("{head}/{db}") } else { format!("{head}/{db}?{query}") };
    Some(TestDb { name: "postgres", url, _dir: None })
}

/// SQLite, and PostgreSQL when available.
pub async fn backends() -> Vec<TestDb> {
    let mut v = vec![sqlite()];
    v.extend(postgres().await);
    v
}

/// A buy order for `cpus` seccomp-strict CPUs at up to `max_price`.
pub fn buy(cpus: u32, max_price: u64) -> pb::PlaceBuyRequest {
    pb::PlaceBuyRequest {
        cpus,
        max_price,
        requirements: Some(pb::Requirements { kind: pb::SandboxKind::SeccompStrict as i32, ..Default::default() }),
        period_secs: 0,
        periods: 0,
        attended: false,
    }
}

/// An exchange on loopback with its operator connected.
pub struct Exchange {
    pub running: Running,
    pub admin: Connection,
    pub url: String,
    pub data: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Exchange {
    pub async fn start(tune: impl FnOnce(&mut Settings)) -> Exchange {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), vec!["localhost".into(), "127.0.0.1".into()], String::new());
        tune(&mut settings);
        datadir::init(&data, settings, &tmp.path().join("operator")).await.unwrap();
        let running = datadir::run(&data, None).await.unwrap();
        let url = format!("https://127.0.0.1:{}", running.listening.addr.port());
        let mut admin_cfg = NodeConfig::load(&tmp.path().join("operator")).unwrap();
        admin_cfg.url = url.clone();
        let admin = admin_cfg.connect().await.unwrap();
        Exchange { running, admin, url, data, _tmp: tmp }
    }

    /// A new account with one enrolled node and `cents` deposited.
    pub async fn member(&mut self, name: &str, cents: i64) -> (NodeConfig, Connection) {
        let created = self.admin.admin.create_account(pb::CreateAccountRequest { name: name.into() }).await.unwrap().into_inner();
        if cents > 0 {
            self.admin.admin.deposit(pb::DepositRequest { account: created.account, amount_cents: cents }).await.unwrap();
        }
        let dir = self._tmp.path().join(name);
        let node = enroll(&self.url, &created.token, Some(self.running.ca_fingerprint.clone()), &dir, name).await.unwrap();
        let conn = node.connect().await.unwrap();
        (node, conn)
    }
}

