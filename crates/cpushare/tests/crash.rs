//! The exchange killed with SIGKILL in the middle of heavy traffic comes back
//! with every acknowledged order, lease and cent, and its clients carry on.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpushare_exchange::client::Connection;
use cpushare_exchange::node::{enroll, NodeConfig};
use cpushare_proto::v1 as pb;
use tokio_stream::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_cpushare");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The exchange process; killed when dropped, so a failing test leaves none behind.
struct Exchange(Child);

impl Drop for Exchange {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data: &Path) -> Exchange {
    let child = Command::new(BIN)
        .args(["exchange", "run", "--web", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Exchange(child)
}

/// Connects, retrying while the exchange (re)starts.
async fn connect(node: &NodeConfig) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.connect().await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the exchange did not come back: {e:#}"),
        }
    }
}

fn slot() -> pb::SlotAttributes {
    pb::SlotAttributes { score: 3000, ram_mib: 4096, kinds: vec![pb::SandboxKind::SeccompStrict as i32], inbound_udp: true, latency_ms: 10 }
}

/// What the clients were told, and so must survive.
#[derive(Default)]
struct Acked {
    orders: BTreeSet<u64>,
    leases: BTreeSet<u64>,
}

/// A buyer that places orders as fast as it can and reconnects on its own.
async fn buyer(node: NodeConfig, acked: Arc<Mutex<Acked>>, stop: Instant) -> usize {
    let mut conn = connect(&node).await;
    let mut placed = 0;
    let mut i = 0u64;
    while Instant::now() < stop {
        i += 1;
        let request = pb::PlaceBuyRequest {
            cpus: 1 + (i % 3) as u32,
            max_price: 20 + i % 30,
            requirements: Some(pb::Requirements { kind: pb::SandboxKind::SeccompStrict as i32, ..Default::default() }),
            period_secs: 3600,
            periods: 0,
            attended: false,
        };
        match conn.exchange.place_buy(request).await {
            Ok(r) => {
                let r = r.into_inner();
                let mut a = acked.lock().unwrap();
                a.orders.insert(r.order);
                a.leases.extend(r.leases);
                placed += 1;
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {} // out of money: fine
            Err(_) => conn = connect(&node).await,
        }
    }
    placed
}

/// A seller node: registers slots, reports ready for what it is given, sends
/// heartbeats, and reconnects on its own. Returns how many times it registered.
async fn seller(node: NodeConfig, slots: usize, stop: Instant, registered_leases: Arc<Mutex<Vec<usize>>>) -> usize {
    let mut sessions = 0;
    while Instant::now() < stop {
        let mut conn = connect(&node).await;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let offers = (0..slots).map(|_| pb::SlotOffer { slot: Some(slot()), ask: 10, kind_asks: vec![] }).collect();
        let register = pb::Register { kernel: "6.1.0".into(), seccomp_strict: true, slots: offers };
        tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Register(register)) }).await.unwrap();
        let Ok(response) = conn.exchange.seller_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await else { continue };
        let mut inbound = response.into_inner();
        sessions += 1;
        let beat = tx.clone();
        let heart = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if beat.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Heartbeat(pb::Heartbeat {})) }).await.is_err() {
                    break;
                }
            }
        });
        loop {
            let message = match tokio::time::timeout(Duration::from_secs(1), inbound.next()).await {
                Err(_) if Instant::now() < stop => continue, // quiet: keep listening
                Ok(Some(Ok(message))) => message,
                _ => break, // the exchange went away (or time is up): reconnect
            };
            let ready = |lease| pb::SellerMessage { body: Some(pb::seller_message::Body::Ready(pb::Ready { lease })) };
            match message.body {
                Some(pb::session_message::Body::Registered(r)) => {
                    registered_leases.lock().unwrap().push(r.leases.len());
                    for l in r.leases {
                        let _ = tx.send(ready(l.lease)).await;
                    }
                }
                Some(pb::session_message::Body::LeaseAssigned(a)) => {
                    let _ = tx.send(ready(a.lease)).await;
                }
                _ => {}
            }
            if Instant::now() >= stop {
                break;
            }
        }
        heart.abort();
    }
    sessions
}

async fn members(admin: &mut Connection, url: &str, dir: &Path, names: &[&str], cents: i64) -> Vec<NodeConfig> {
    let mut nodes = Vec::new();
    for name in names {
        let c = admin.admin.create_account(pb::CreateAccountRequest { name: name.to_string() }).await.unwrap().into_inner();
        if cents > 0 {
            admin.admin.deposit(pb::DepositRequest { account: c.account, amount_cents: cents }).await.unwrap();
        }
        nodes.push(enroll(url, &c.token, None, &dir.join(name), name).await.unwrap());
    }
    nodes
}

async fn kill_and_recover(db: Option<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let mut init = Command::new(BIN);
    init.args(["exchange", "init", "--name", "127.0.0.1", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&data)
        .arg("--config")
        .arg(tmp.path().join("operator"));
    if let Some(db) = &db {
        init.args(["--db", db]);
    }
    let out = init.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Let the load through, settle every second, and give sellers a short leash.
    let settings = data.join("exchange.json");
    let mut s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
    s["orders_per_sec"] = 100_000.0.into();
    s["order_burst"] = 100_000.0.into();
    s["settle_every_secs"] = 1.into();
    s["heartbeat_timeout_secs"] = 10.into();
    std::fs::write(&settings, s.to_string()).unwrap();

    let mut exchange = start(&data);
    eprintln!("started");
    let operator = NodeConfig::load(&tmp.path().join("operator")).unwrap();
    let url = operator.url.clone();
    let mut admin = connect(&operator).await;
    let buyers = members(&mut admin, &url, tmp.path(), &["b1", "b2", "b3", "b4"], 5_000_000).await;
    let sellers = members(&mut admin, &url, tmp.path(), &["s1", "s2"], 0).await;

    let stop = Instant::now() + Duration::from_secs(8);
    let acked = Arc::new(Mutex::new(Acked::default()));
    let registered = Arc::new(Mutex::new(Vec::new()));
    let seller_tasks: Vec<_> =
        sellers.iter().map(|n| tokio::spawn(seller(NodeConfig::load(&n.dir).unwrap(), 200, stop, registered.clone()))).collect();
    let buyer_tasks: Vec<_> =
        buyers.iter().map(|n| tokio::spawn(buyer(NodeConfig::load(&n.dir).unwrap(), acked.clone(), stop))).collect();

    // Heavy traffic for a while, then SIGKILL: no chance to flush anything.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_kill = acked.lock().unwrap().orders.len();
    assert!(before_kill > 50, "traffic before the kill: {before_kill} orders");
    eprintln!("killing the exchange after {before_kill} orders");
    exchange.0.kill().unwrap();
    exchange.0.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exchange = start(&data);

    let mut placed = 0;
    eprintln!("restarted; waiting for the clients");
    for t in buyer_tasks {
        placed += t.await.unwrap();
    }
    let mut sessions = 0;
    for t in seller_tasks {
        sessions += t.await.unwrap();
    }
    eprintln!("clients done");
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.orders.len() > before_kill, "buyers carried on after the restart ({before_kill} -> {})", acked.orders.len());
    assert!(sessions >= 4, "both sellers reconnected on their own ({sessions} sessions)");
    assert!(!acked.leases.is_empty());

    // Every acknowledged order and lease is there; the ledger balances.
    let mut orders = BTreeSet::new();
    let mut leases = BTreeSet::new();
    let mut deposited = 0;
    for b in &buyers {
        let mut c = connect(&NodeConfig::load(&b.dir).unwrap()).await;
        orders.extend(c.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders.iter().map(|o| o.id));
        leases.extend(c.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner().leases.iter().map(|l| l.id));
        let balance = c.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
        let statement = c.exchange.statement(pb::StatementRequest { limit: 10_000, before_seq: 0 }).await.unwrap().into_inner();
        let sum: i64 = statement.entries.iter().map(|e| e.amount_cents).sum();
        assert_eq!(sum, balance.available_cents + balance.escrow_cents, "the statement explains the balance");
        deposited += 5_000_000;
    }
    let lost_orders: Vec<_> = acked.orders.difference(&orders).collect();
    assert!(lost_orders.is_empty(), "acknowledged orders lost: {lost_orders:?}");
    let lost_leases: Vec<_> = acked.leases.difference(&leases).collect();
    assert!(lost_leases.is_empty(), "acknowledged leases lost: {lost_leases:?}");
    let audit = admin_after(&operator).await;
    assert!(audit.ok, "{}", audit.problem);
    assert_eq!(-audit.world_cents, deposited, "every deposited cent is accounted for");
    assert!(registered.lock().unwrap().iter().any(|n| *n > 0), "a reconnecting seller got its leases back");
    println!("{placed} orders placed, {} leases, {sessions} seller sessions", acked.leases.len());

    drop(exchange);
}

async fn admin_after(operator: &NodeConfig) -> pb::AuditReply {
    connect(operator).await.admin.audit(pb::AuditRequest {}).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_traffic_on_sqlite_loses_nothing_acknowledged() {
    kill_and_recover(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_traffic_on_postgres_loses_nothing_acknowledged() {
    let Ok(base) = std::env::var("CPUSHARE_TEST_POSTGRES") else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but CPUSHARE_TEST_POSTGRES is not set: scripts/test starts PostgreSQL and sets it");
        }
        eprintln!("skipping: set CPUSHARE_TEST_POSTGRES (scripts/test does) to run against PostgreSQL");
        return;
    };
    // A database of its own.
    let db = format!("cpushare_test_crash_{}", std::process::id());
    let status = Command::new("psql").args(["-h", "/var/run/postgresql", "-d", "postgres", "-qc", &format!("CREATE DATABASE {db}")]).status();
    assert!(status.map(|s| s.success()).unwrap_or(false), "could not create a PostgreSQL database with psql");
    let (head, query) = base.split_once('?').unwrap_or((&base, ""));
    let url = format!("{}/{db}?{query}", &head[..head.rfind('/').unwrap()]);
    kill_and_recover(Some(url)).await;
}
