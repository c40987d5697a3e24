//! Test databases: a fresh SQLite file, and a fresh PostgreSQL database when
//! `CPUSHARE_TEST_POSTGRES` names a server (scripts/test starts one). Under
//! `CI=true` a missing PostgreSQL fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

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
