//! Resident memory of one exchange process holding 10,000 concurrent seller
//! sessions (each its own node, certificate and TLS connection, offering a slot
//! and sending heartbeats). The exchange runs as its own process, so that its
//! memory is measured alone.
//!
//! `cargo bench -p cpushare --bench sessions`; CPUSHARE_BENCH_SESSIONS changes the count.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cpushare_exchange::client::Connection;
use cpushare_exchange::node::{enroll, NodeConfig};
use cpushare_proto::v1 as pb;
use tokio_stream::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_cpushare");

struct Exchange(Child);

impl Drop for Exchange {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn connect(node: &NodeConfig) -> Connection {
    for _ in 0..200 {
        if let Ok(c) = node.connect().await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot reach the exchange");
}

fn main() {
    let sessions: usize = std::env::var("CPUSHARE_BENCH_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    // A socket per session on each side (two processes): raise the open-file limit
    // to the hard one (the exchange inherits it).
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(hard as usize > sessions + 1000, "the open-file limit ({hard}) is too low for {sessions} sessions");

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = Command::new(BIN)
            .args(["exchange", "init", "--name", "127.0.0.1", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(&data)
            .arg("--config")
            .arg(tmp.path().join("operator"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let settings = data.join("exchange.json");
        let mut s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
        s["order_burst"] = 1e9.into();
        s["orders_per_sec"] = 1e9.into();
        std::fs::write(&settings, s.to_string()).unwrap();
        let exchange = Exchange(
            Command::new(BIN).args(["exchange", "run", "--data"]).arg(&data).env("RUST_LOG", "warn").stdout(Stdio::null()).spawn().unwrap(),
        );
        let pid = exchange.0.id();
        let operator = NodeConfig::load(&tmp.path().join("operator")).unwrap();
        let mut admin = connect(&operator).await;
        let idle = memory_kib(pid, "VmRSS:");

        // Accounts and enrollments, a few at a time.
        let started = Instant::now();
        let mut nodes = Vec::with_capacity(sessions);
        for chunk in (0..sessions).collect::<Vec<_>>().chunks(64) {
            let mut tasks = Vec::new();
            for &i in chunk {
                let mut admin = admin.clone();
                let (url, dir) = (operator.url.clone(), tmp.path().join(format!("s{i}")));
                tasks.push(tokio::spawn(async move {
                    let c = admin.admin.create_account(pb::CreateAccountRequest { name: format!("s{i}") }).await.unwrap().into_inner();
                    enroll(&url, &c.token, None, &dir, "seller").await.unwrap()
                }));
            }
            for t in tasks {
                nodes.push(t.await.unwrap());
            }
        }
        println!("{sessions} nodes enrolled in {:.1} s", started.elapsed().as_secs_f64());

        // Every node opens its session, offers one slot, and beats every 10 s.
        let started = Instant::now();
        let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(sessions);
        let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<String>(sessions);
        for (i, node) in nodes.into_iter().enumerate() {
            let (alive_tx, failed_tx) = (alive_tx.clone(), failed_tx.clone());
            tokio::spawn(async move {
                let mut conn = connect(&node).await;
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let slot = pb::SlotAttributes {
                    score: 1000 + i as u32 % 5000,
                    ram_mib: 2048,
                    kinds: vec![pb::SandboxKind::SeccompStrict as i32],
                    inbound_udp: false,
                    latency_ms: 20,
                };
                let register = pb::Register { kernel: "6.1.0".into(), seccomp_strict: true, slots: vec![pb::SlotOffer { slot: Some(slot), ask: 100, kind_asks: vec![] }] };
                tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Register(register)) }).await.unwrap();
                let mut inbound = match conn.exchange.seller_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                    Ok(r) => r.into_inner(),
                    Err(e) => return failed_tx.send(e.message().to_string()).await.unwrap(),
                };
                inbound.next().await.unwrap().unwrap();
                alive_tx.send(()).await.unwrap();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {
                            let beat = pb::SellerMessage { body: Some(pb::seller_message::Body::Heartbeat(pb::Heartbeat {})) };
                            if tx.send(beat).await.is_err() { break; }
                        }
                        m = inbound.next() => {
                            if !matches!(m, Some(Ok(_))) {
                                let _ = failed_tx.send(format!("session ended: {m:?}")).await;
                                break;
                            }
                        }
                    }
                }
            });
        }
        drop(alive_tx);
        for _ in 0..sessions {
            tokio::select! {
                _ = alive_rx.recv() => {}
                f = failed_rx.recv() => panic!("a session failed: {f:?}"),
            }
        }
        println!("{sessions} sessions registered in {:.1} s", started.elapsed().as_secs_f64());

        // Hold them through several heartbeat rounds.
        tokio::time::sleep(Duration::from_secs(35)).await;
        if let Ok(f) = failed_rx.try_recv() {
            panic!("a session failed while held: {f}");
        }
        let audit = admin.admin.audit(pb::AuditRequest {}).await.unwrap().into_inner();
        assert_eq!(audit.sell_orders as usize, sessions, "every session's slot is on the market");
        let rss = memory_kib(pid, "VmRSS:");
        let peak = memory_kib(pid, "VmHWM:");
        println!(
            "exchange with {sessions} live seller sessions: {:.0} MiB resident (peak {:.0} MiB, idle {:.0} MiB), {:.1} KiB per session",
            rss as f64 / 1024.0,
            peak as f64 / 1024.0,
            idle as f64 / 1024.0,
            (rss - idle) as f64 / sessions as f64
        );
        drop(exchange);
    });
}
