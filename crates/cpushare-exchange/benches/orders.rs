//! Orders placed per second over mutual TLS with durable commit, from
//! concurrent clients on this machine, on SQLite and (when CPUSHARE_TEST_POSTGRES
//! names a server) PostgreSQL, side by side. Each client is its own account,
//! node and TLS connection, and keeps one order in flight. Latency is measured
//! at the client, from sending to the acknowledgement (which the exchange gives
//! only once the order is committed to disk).
//!
//! `cargo bench -p cpushare-exchange --bench orders`; CPUSHARE_BENCH_CLIENTS
//! (default 256) and CPUSHARE_BENCH_SECS (default 10) change the run.

use std::time::{Duration, Instant};

use cpushare_exchange::datadir::{self, Settings};
use cpushare_exchange::node::{enroll, NodeConfig};
use cpushare_proto::v1 as pb;
use rand::{Rng, SeedableRng};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn run(label: &str, db: String, clients: usize, secs: u64) {
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
        .map(|(i, mut conn)| {
            tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
                let mut latencies = Vec::new();
                while Instant::now() < stop {
                    let t = Instant::now();
                    // Four buys for each sell; some cross and trade.
                    if rng.gen_ratio(1, 5) {
                        let slot = pb::SlotAttributes {
                            score: rng.gen_range(500..20_000),
                            ram_mib: 2048,
                            kinds: vec![pb::SandboxKind::SeccompStrict as i32],
                            inbound_udp: rng.gen_bool(0.4),
                            latency_ms: rng.gen_range(5..200),
                        };
                        conn.exchange.place_sell(pb::PlaceSellRequest { slot: Some(slot), ask: rng.gen_range(25..60), kind_asks: vec![] }).await.unwrap();
                    } else {
                        let request = pb::PlaceBuyRequest {
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
                        };
                        conn.exchange.place_buy(request).await.unwrap();
                    }
                    latencies.push(t.elapsed());
                }
                latencies
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
        "{label:>10}: {} orders in {elapsed:.1} s = {:.0} orders/s; latency p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms ({clients} clients)",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    running.listening.shutdown().await;
}

fn main() {
    let clients = env("CPUSHARE_BENCH_CLIENTS", 256) as usize;
    let secs = env("CPUSHARE_BENCH_SECS", 10);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        println!("orders over mutual TLS, acknowledged after a durable commit, one machine (2 cores)");
        run("sqlite", String::new(), clients, secs).await;
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
                run("postgres", format!("{}/{db}?{query}", &head[..head.rfind('/').unwrap()]), clients, secs).await;
                let _ = std::process::Command::new("psql")
                    .args(["-h", "/var/run/postgresql", "-d", "postgres", "-qc", &format!("DROP DATABASE {db}")])
                    .status();
            }
            Err(_) => println!("  postgres: skipped (set CPUSHARE_TEST_POSTGRES)"),
        }
    });
}
