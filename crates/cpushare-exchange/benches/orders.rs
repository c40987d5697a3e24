//! Orders placed per second over mutual TLS with durable commit, from
//! concurrent clients on this machine, on SQLite and (when CPUSHARE_TEST_POSTGRES
//! names a server) PostgreSQL, side by side. Each client is its own account,
//! node and TLS connection. Latency is measured
//! at the client, from sending to the acknowledgement (which the exchange gives
//! only once the order is committed to disk).
//!
//! `cargo bench -p cpushare-exchange --bench orders`; CPUSHARE_BENCH_CLIENTS
//! (default 256) and CPUSHARE_BENCH_SECS (default 10) change the run, and
//! CPUSHARE_BENCH_WINDOW=N has each client keep N orders in flight on one
//! order-entry stream (`PlaceOrders`) instead of a call per order.

use std::time::{Duration, Instant};

use cpushare_exchange::datadir::{self, Settings};
use cpushare_exchange::node::{enroll, NodeConfig};
use cpushare_exchange::client::Connection;
use cpushare_proto::v1 as pb;
use pb::order_entry::Order;
use rand::{Rng, SeedableRng};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The next order: four buys for each sell; some cross and trade.
fn next_order(rng: &mut impl Rng) -> Order {
    if rng.gen_ratio(1, 5) {
        let slot = pb::SlotAttributes {
            score: rng.gen_range(500..20_000),
            ram_mib: 2048,
            kinds: vec![pb::SandboxKind::SeccompStrict as i32],
            inbound_udp: rng.gen_bool(0.4),
            latency_ms: rng.gen_range(5..200),
        };
        Order::Sell(pb::PlaceSellRequest { slot: Some(slot), ask: rng.gen_range(25..60), kind_asks: vec![] })
    } else {
        Order::Buy(pb::PlaceBuyRequest {
            cpus: 1,
            max_price: rng.gen_range(5..30),
            requirements: Some(pb::Requirements {
                kind: pb::SandboxKind::SeccompStrict as i32,
                min_score: if rng.gen_bool(0.4) { rng.gen_range(1000..8000) } else { 0 },
                ..Default::default()
            }),
            period_secs: 3600,
            periods: 0,
            attended: false,
        })
    }
}

/// A call per order, one in flight.
async fn one_at_a_time(mut conn: Connection, mut rng: impl Rng, stop: Instant) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while Instant::now() < stop {
        let t = Instant::now();
        match next_order(&mut rng) {
            Order::Sell(r) => drop(conn.exchange.place_sell(r).await.unwrap()),
            Order::Buy(r) => drop(conn.exchange.place_buy(r).await.unwrap()),
            Order::Cancel(_) => unreachable!(),
        }
        latencies.push(t.elapsed());
    }
    latencies
}

/// One order-entry stream with `window` orders in flight.
async fn streamed(mut conn: Connection, mut rng: impl Rng, stop: Instant, window: usize) -> Vec<Duration> {
    let (tx, rx) = tokio::sync::mpsc::channel(window);
    let mut acks = conn.exchange.place_orders(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut sent = std::collections::VecDeque::new();
    let mut latencies = Vec::new();
    for tag in 0.. {
        if sent.len() < window && Instant::now() < stop {
            sent.push_back(Instant::now());
            tx.send(pb::OrderEntry { tag, order: Some(next_order(&mut rng)) }).await.unwrap();
            continue;
        }
        let Some(at) = sent.pop_front() else { break };
        let ack = acks.message().await.unwrap().expect("an answer for every entry");
        assert_eq!(ack.code, 0, "{}", ack.error);
        latencies.push(at.elapsed());
    }
    latencies
}

async fn run(label: &str, db: String, clients: usize, window: usize, secs: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), vec!["127.0.0.1".into()], db);
    settings.orders_per_sec = 1e9;
    settings.order_burst = 1e9;
    datadir::init(&data, settings, &tmp.path().join("operator")).await.unwrap();
    let running = datadir::run(&data, None).await.unwrap();
    let url = format!("https://127.0.0.1:{}", running.listening.addr.port());
    let mut operator = NodeConfig::load(&tmp.path().join("operator")).unwrap();
    operator.url = url.clone();
    let mut admin = operator.connect().await.unwrap();

    let mut nodes = Vec::new();
    for i in 0..clients {
        let c = admin.admin.create_account(pb::CreateAccountRequest { name: format!("c{i}") }).await.unwrap().into_inner();
        admin.admin.deposit(pb::DepositRequest { account: c.account, amount_cents: 1_000_000_000 }).await.unwrap();
        nodes.push(enroll(&url, &c.token, None, &tmp.path().join(format!("c{i}")), "c").await.unwrap());
    }
    let mut conns = Vec::new();
    for n in &nodes {
        conns.push(n.connect().await.unwrap());
    }

    let start = Instant::now();
    let stop = start + Duration::from_secs(secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            tokio::spawn(async move {
                match window {
                    0 => one_at_a_time(conn, rng, stop).await,
                    w => streamed(conn, rng, stop, w).await,
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "{label:>10}: {} orders in {elapsed:.1} s = {:.0} orders/s; latency p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms ({clients} clients, {})",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        match window {
            0 => "a call per order".to_string(),
            w => format!("a stream each, {w} in flight"),
        }
    );
    running.listening.shutdown().await;
}

fn main() {
    let clients = env("CPUSHARE_BENCH_CLIENTS", 256) as usize;
    let secs = env("CPUSHARE_BENCH_SECS", 10);
    // 0: a unary call per order; N: an order-entry stream per client with N in flight.
    let window = env("CPUSHARE_BENCH_WINDOW", 0) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        println!("orders over mutual TLS, acknowledged after a durable commit, one machine (2 cores)");
        run("sqlite", String::new(), clients, window, secs).await;
        match std::env::var("CPUSHARE_TEST_POSTGRES") {
            Ok(base) => {
                let db = format!("cpushare_bench_{}", std::process::id());
                let ok = std::process::Command::new("psql")
                    .args(["-h", "/var/run/postgresql", "-d", "postgres", "-qc", &format!("CREATE DATABASE {db}")])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(ok, "could not create the benchmark database");
                let (head, query) = base.split_once('?').unwrap_or((&base, ""));
                run("postgres", format!("{}/{db}?{query}", &head[..head.rfind('/').unwrap()]), clients, window, secs).await;
                let _ = std::process::Command::new("psql")
                    .args(["-h", "/var/run/postgresql", "-d", "postgres", "-qc", &format!("DROP DATABASE {db}")])
                    .status();
            }
            Err(_) => println!("  postgres: skipped (set CPUSHARE_TEST_POSTGRES)"),
        }
    });
}
