//! The exchange as nodes see it: a real server over mutual TLS on loopback.

mod common;

use std::time::Duration;

use common::{buy, Exchange};
use cpushare_exchange::client::{connect, Trust};
use cpushare_exchange::datadir;
use cpushare_exchange::node::enroll;
use cpushare_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

fn slot() -> pb::SlotAttributes {
    pb::SlotAttributes {
        score: 2000,
        ram_mib: 2048,
        kinds: vec![pb::SandboxKind::SeccompStrict as i32],
        inbound_udp: false,
        latency_ms: 20,
    }
}


#[tokio::test]
async fn nodes_enroll_trade_and_see_their_statements() {
    let mut ex = Exchange::start(|_| {}).await;
    let (alice, mut a) = ex.member("alice", 10_000).await;
    let (bob, mut b) = ex.member("bob", 0).await;
    assert_ne!(alice.node, bob.node);

    let hello = a.exchange.hello(pb::HelloRequest {}).await.unwrap().into_inner();
    assert_eq!((hello.account, hello.node, hello.admin), (alice.account, alice.node, false));
    assert_eq!(hello.ca_fingerprint, ex.running.ca_fingerprint);

    let mut events = a.exchange.lease_events(pb::LeaseEventsRequest {}).await.unwrap().into_inner();
    let mut trades = b.exchange.trades(pb::TradesRequest {}).await.unwrap().into_inner();

    // Bob's node opens its session and offers one slot.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let register = pb::Register { kernel: "6.1.0".into(), seccomp_strict: true, slots: vec![pb::SlotOffer { slot: Some(slot()), ask: 100, kind_asks: vec![] }] };
    tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Register(register)) }).await.unwrap();
    let mut session = b.exchange.seller_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let Some(pb::session_message::Body::Registered(reg)) = session.next().await.unwrap().unwrap().body else { panic!() };
    assert_eq!(reg.orders.len(), 1);

    let placed = a.exchange.place_buy(buy(2, 150)).await.unwrap().into_inner();
    assert_eq!(placed.leases.len(), 1, "one of two CPUs fills at once");
    let lease = placed.leases[0];

    let Some(pb::session_message::Body::LeaseAssigned(assigned)) = session.next().await.unwrap().unwrap().body else { panic!() };
    assert_eq!((assigned.lease, assigned.price), (lease, 100));
    let trade = trades.next().await.unwrap().unwrap();
    assert_eq!((trade.lease, trade.price), (lease, 100));
    let opened = events.next().await.unwrap().unwrap();
    assert_eq!((opened.lease, opened.kind.as_str()), (lease, "opened"));

    tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Ready(pb::Ready { lease })) }).await.unwrap();
    let ready = events.next().await.unwrap().unwrap();
    assert_eq!(ready.kind, "ready");

    let orders = a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders;
    assert_eq!(orders.len(), 1);
    assert_eq!((orders[0].side.as_str(), orders[0].open, orders[0].leased), ("buy", 1, 1));
    let leases = b.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner().leases;
    assert_eq!((leases[0].role.as_str(), leases[0].state.as_str()), ("seller", "running"));

    let balance = a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
    assert_eq!((balance.available_cents, balance.escrow_cents), (10_000 - 250, 250));
    let depth = b.exchange.book_depth(pb::BookDepthRequest { kind: pb::SandboxKind::SeccompStrict as i32 }).await.unwrap().into_inner();
    assert_eq!(depth.bids, vec![pb::PriceLevel { price: 150, cpus: 1 }]);

    let statement = a.exchange.statement(pb::StatementRequest::default()).await.unwrap().into_inner().entries;
    let sum: i64 = statement.iter().map(|e| e.amount_cents).sum();
    assert_eq!(sum, 10_000, "the statement adds up to the balance: {statement:?}");
    assert!(statement.iter().any(|e| e.reason == "deposit"));

    let audit = ex.admin.admin.audit(pb::AuditRequest {}).await.unwrap().into_inner();
    assert!(audit.ok, "{}", audit.problem);
    assert_eq!((audit.leases, audit.world_cents), (1, -10_000));
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn strangers_revoked_nodes_and_other_accounts_are_refused() {
    let mut ex = Exchange::start(|_| {}).await;
    let (_alice, mut a) = ex.member("alice", 10_000).await;
    let (bob, mut b) = ex.member("bob", 10_000).await;

    // No certificate: only Hello and Enroll work.
    let mut anon = connect(&ex.url, Trust::Fingerprint(ex.running.ca_fingerprint.clone()), None).await.unwrap();
    let err = anon.exchange.balance(pb::BalanceRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("enroll"), "{}", err.message());
    let err = anon.exchange.enroll(pb::EnrollRequest { token: "guess".into(), csr_der: vec![1, 2], node_name: "x".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Messages are bounded (1 MiB by default): a huge one is refused before it is read.
    let huge = pb::EnrollRequest { token: "t".into(), csr_der: vec![0; 2 << 20], node_name: "x".into() };
    let err = anon.exchange.enroll(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Not the operator.
    let err = a.admin.create_account(pb::CreateAccountRequest { name: "mallory".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = a.admin.deposit(pb::DepositRequest { account: 2, amount_cents: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Someone else's order does not exist, as far as Alice can tell.
    let bobs = b.exchange.place_buy(buy(1, 10)).await.unwrap().into_inner().order;
    let err = a.exchange.cancel_order(pb::CancelOrderRequest { order: bobs }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders.is_empty());

    // Malformed orders are refused precisely and change nothing.
    let err = a.exchange.place_buy(pb::PlaceBuyRequest { requirements: None, ..buy(1, 10) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = a.exchange.place_buy(buy(0, 10)).await.unwrap_err();
    assert!(err.message().contains("cpus must be between"), "{}", err.message());
    let err = a.exchange.place_buy(buy(1_000, 1_000_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("insufficient funds"));
    let balance = a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
    assert_eq!((balance.available_cents, balance.escrow_cents), (10_000, 0));

    // A revoked node is refused at once, though its connection is open.
    ex.admin.admin.revoke_node(pb::RevokeNodeRequest { node: bob.node }).await.unwrap();
    let err = b.exchange.balance(pb::BalanceRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn a_token_enrolls_once_and_a_wrong_pin_is_caught() {
    let mut ex = Exchange::start(|_| {}).await;
    let created = ex.admin.admin.create_account(pb::CreateAccountRequest { name: "carol".into() }).await.unwrap().into_inner();
    let tmp = tempfile::tempdir().unwrap();
    let wrong = "00:".repeat(31) + "00";
    let err = enroll(&ex.url, &created.token, Some(wrong), &tmp.path().join("a"), "a").await.err().unwrap();
    assert!(format!("{err:#}").contains("fingerprint"), "{err:#}");
    // First use without a pin works and records the CA.
    let node = enroll(&ex.url, &created.token, None, &tmp.path().join("b"), "b").await.unwrap();
    assert_eq!(cpushare_exchange::pki::fingerprint(&node.ca), ex.running.ca_fingerprint);
    let err = enroll(&ex.url, &created.token, None, &tmp.path().join("c"), "c").await.err().unwrap();
    assert!(format!("{err:#}").contains("already used"), "{err:#}");
    let err = ex.admin.admin.create_account(pb::CreateAccountRequest { name: "carol".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = ex.admin.admin.create_account(pb::CreateAccountRequest { name: "no spaces".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn an_old_client_is_told_to_upgrade() {
    let ex = Exchange::start(|_| {}).await;
    // A raw channel that sends no protocol version.
    let conn = connect(&ex.url, Trust::FirstUse, None).await.unwrap();
    let mut raw = pb::exchange_client::ExchangeClient::new(conn.channel);
    let err = raw.hello(pb::HelloRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().starts_with("upgrade to at least protocol 1"), "{}", err.message());
    ex.running.listening.shutdown().await;
}

/// The exchange does its own TLS handshakes (to size each connection's
/// buffers): one client that never finishes its handshake and one that sends
/// junk must hold up nobody, and must not stop the server.
#[tokio::test]
async fn a_stalled_or_junk_handshake_holds_up_nobody() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ex = Exchange::start(|_| {}).await;
    let addr = ex.running.listening.addr;
    let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: exchange\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a junk handshake is closed at once");
    // A real client is served while the stalled one still waits.
    for _ in 0..3 {
        let conn = tokio::time::timeout(Duration::from_secs(5), connect(&ex.url, Trust::FirstUse, None)).await.unwrap().unwrap();
        let mut raw = pb::exchange_client::ExchangeClient::new(conn.channel);
        let err = raw.hello(pb::HelloRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "the call reached the service: {err}");
    }
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn order_traffic_is_rate_limited_per_account() {
    let mut ex = Exchange::start(|s| {
        s.orders_per_sec = 1.0;
        s.order_burst = 3.0;
    })
    .await;
    let (_n, mut a) = ex.member("alice", 10_000).await;
    for _ in 0..3 {
        a.exchange.place_buy(buy(1, 1)).await.unwrap();
    }
    let err = a.exchange.place_buy(buy(1, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("per second per account"), "{}", err.message());
    // Other accounts are not affected.
    let (_m, mut b) = ex.member("bob", 10_000).await;
    b.exchange.place_buy(buy(1, 1)).await.unwrap();
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn a_silent_seller_is_lost_and_its_buyer_pays_only_for_time_delivered() {
    let mut ex = Exchange::start(|s| s.heartbeat_timeout_secs = 2).await;
    let (_a, mut a) = ex.member("alice", 10_000).await;
    let (_b, mut b) = ex.member("bob", 0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let register = pb::Register { kernel: "6.1".into(), seccomp_strict: true, slots: vec![pb::SlotOffer { slot: Some(slot()), ask: 3600, kind_asks: vec![] }] };
    tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Register(register)) }).await.unwrap();
    let mut session = b.exchange.seller_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    session.next().await.unwrap().unwrap();
    let mut events = a.exchange.lease_events(pb::LeaseEventsRequest {}).await.unwrap().into_inner();
    let lease = a.exchange.place_buy(buy(1, 3600)).await.unwrap().into_inner().leases[0];
    tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Ready(pb::Ready { lease })) }).await.unwrap();
    // The seller goes silent (its process dies): drop the session.
    drop(tx);
    drop(session);
    let ended = loop {
        let e = tokio::time::timeout(Duration::from_secs(15), events.next()).await.expect("the seller is declared lost").unwrap().unwrap();
        if e.kind == "ended" {
            break e;
        }
    };
    assert_eq!((ended.lease, ended.reason.as_str()), (lease, "seller lost"));
    // At 1 EUR per hour (one cent a second), a few seconds delivered.
    let balance = a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
    let spent = 10_000 - balance.available_cents;
    assert!(balance.escrow_cents == 100 * 36 && (0..=10).contains(&(spent - 3600)), "{balance:?}");
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn the_relay_joins_a_leases_buyer_and_seller_only() {
    let mut ex = Exchange::start(|_| {}).await;
    let (_a, mut a) = ex.member("alice", 10_000).await;
    let (_b, mut b) = ex.member("bob", 0).await;
    let (_c, mut c) = ex.member("carol", 0).await;
    b.exchange.place_sell(pb::PlaceSellRequest { slot: Some(slot()), ask: 10, kind_asks: vec![] }).await.unwrap();
    let lease = a.exchange.place_buy(buy(1, 10)).await.unwrap().into_inner().leases[0];

    let frame = |data: &[u8]| pb::RelayFrame { lease, data: data.to_vec().into() };
    let err = c.exchange.relay(tokio_stream::iter(vec![frame(b"hi")])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "carol is not a party");

    let (to_seller, rx) = tokio::sync::mpsc::channel(8);
    to_seller.send(frame(b"work")).await.unwrap();
    let mut buyer_in = a.exchange.relay(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let (to_buyer, rx) = tokio::sync::mpsc::channel(8);
    to_buyer.send(frame(b"")).await.unwrap();
    let mut seller_in = b.exchange.relay(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert_eq!(seller_in.next().await.unwrap().unwrap().data, &b"work"[..]);
    to_buyer.send(pb::RelayFrame { lease: 0, data: b"result".to_vec().into() }).await.unwrap();
    assert_eq!(buyer_in.next().await.unwrap().unwrap().data, &b"result"[..]);
    // A large transfer arrives whole and in order.
    let chunks: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_le_bytes().repeat(4096)).collect();
    let sender = tokio::spawn({
        let chunks = chunks.clone();
        async move {
            for c in chunks {
                to_seller.send(pb::RelayFrame { lease: 0, data: c.into() }).await.unwrap();
            }
        }
    });
    for c in &chunks {
        assert_eq!(&seller_in.next().await.unwrap().unwrap().data, c);
    }
    sender.await.unwrap();
    // When the lease ends, the relay closes.
    a.exchange.cancel_lease(pb::CancelLeaseRequest { lease }).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), seller_in.next()).await.unwrap();
    assert!(matches!(end, Some(Err(_)) | None), "{end:?}");
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn halting_ends_every_lease_and_resuming_trades_again() {
    let mut ex = Exchange::start(|_| {}).await;
    let (_a, mut a) = ex.member("alice", 10_000).await;
    let (_b, mut b) = ex.member("bob", 0).await;
    b.exchange.place_sell(pb::PlaceSellRequest { slot: Some(slot()), ask: 10, kind_asks: vec![] }).await.unwrap();
    a.exchange.place_buy(buy(1, 10)).await.unwrap();
    let halted = ex.admin.admin.halt(pb::HaltRequest {}).await.unwrap().into_inner();
    assert_eq!(halted.leases_ended, 1);
    assert!(a.exchange.hello(pb::HelloRequest {}).await.unwrap().into_inner().halted);
    assert!(a.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner().leases.is_empty());
    let err = ex.admin.admin.halt(pb::HaltRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    ex.admin.admin.resume(pb::ResumeRequest {}).await.unwrap();
    assert_eq!(a.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner().leases.len(), 1);
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn sellers_on_a_refused_kernel_are_turned_away() {
    let mut ex = Exchange::start(|_| {}).await;
    let (_b, mut b) = ex.member("bob", 0).await;
    ex.admin.admin.set_refused_kernels(pb::SetRefusedKernelsRequest { prefixes: vec!["4.19.".into()] }).await.unwrap();
    let register = pb::Register { kernel: "4.19.0-21-amd64".into(), seccomp_strict: true, slots: vec![] };
    let first = pb::SellerMessage { body: Some(pb::seller_message::Body::Register(register)) };
    let err = b.exchange.seller_session(tokio_stream::iter(vec![first])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("4.19.0-21-amd64") && err.message().contains("upgrade"), "{}", err.message());
    ex.running.listening.shutdown().await;
}

#[tokio::test]
async fn a_restart_finds_every_order_lease_and_cent() {
    restart_keeps_everything(100_000).await;
}

#[tokio::test]
async fn a_restart_from_a_snapshot_and_the_log_tail_keeps_everything() {
    // A snapshot every few records: the restart restores one and replays what followed.
    restart_keeps_everything(7).await;
}

async fn restart_keeps_everything(snapshot_every: u64) {
    let mut ex = Exchange::start(|s| s.snapshot_every_records = snapshot_every).await;
    let (alice, mut a) = ex.member("alice", 10_000).await;
    let (bob, mut b) = ex.member("bob", 0).await;
    b.exchange.place_sell(pb::PlaceSellRequest { slot: Some(slot()), ask: 40, kind_asks: vec![] }).await.unwrap();
    a.exchange.place_buy(buy(3, 50)).await.unwrap();
    for price in 1..=10 {
        b.exchange.place_sell(pb::PlaceSellRequest { slot: Some(slot()), ask: 100 + price, kind_asks: vec![] }).await.unwrap();
    }
    // A slot with an ask of its own for software-emulated VMs.
    let both = pb::SlotAttributes { kinds: vec![pb::SandboxKind::SeccompStrict as i32, pb::SandboxKind::VmTcg as i32], ..slot() };
    let tcg = |ask| vec![pb::KindAsk { kind: pb::SandboxKind::VmTcg as i32, ask }];
    b.exchange.place_sell(pb::PlaceSellRequest { slot: Some(both.clone()), ask: 200, kind_asks: tcg(30) }).await.unwrap();
    let depth = b.exchange.book_depth(pb::BookDepthRequest { kind: pb::SandboxKind::VmTcg as i32 }).await.unwrap().into_inner();
    assert_eq!(depth.asks, vec![pb::PriceLevel { price: 30, cpus: 1 }]);
    let refused = b.exchange.place_sell(pb::PlaceSellRequest { slot: Some(slot()), ask: 200, kind_asks: tcg(30) }).await.unwrap_err();
    assert!(refused.message().contains("which the slot does not offer"), "{}", refused.message());
    let refused = b.exchange.place_sell(pb::PlaceSellRequest { slot: Some(both), ask: 200, kind_asks: [tcg(30), tcg(31)].concat() }).await.unwrap_err();
    assert!(refused.message().contains("two asks for vm-tcg"), "{}", refused.message());
    let before = (
        b.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner(),
        a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner(),
        a.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner(),
        a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner(),
    );
    let data = ex.data.clone();
    ex.running.listening.shutdown().await;
    let store = cpushare_exchange::store::Store::open(&cpushare_exchange::store::sqlite_url(&data.join("exchange.db"))).await.unwrap();
    let snapshot = store.latest_snapshot().await.unwrap();
    assert_eq!(snapshot.is_some(), snapshot_every < 1000, "a snapshot was taken iff they are frequent");
    store.close().await;
    let running = datadir::run(&data, Some("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let mut cfg = alice;
    cfg.url = format!("https://127.0.0.1:{}", running.listening.addr.port());
    let mut a = cfg.connect().await.unwrap();
    let mut bcfg = bob;
    bcfg.url = cfg.url.clone();
    let mut b = bcfg.connect().await.unwrap();
    let after = (
        b.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner(),
        a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner(),
        a.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner(),
        a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner(),
    );
    assert_eq!(before, after);
    assert!(after.0.orders.iter().any(|o| o.kind_asks == tcg(30)), "the vm-tcg ask survives the restart");
    running.listening.shutdown().await;
}

#[tokio::test]
async fn a_vanished_buyer_of_a_watched_order_is_lost_and_pays_for_nothing_more() {
    let mut ex = Exchange::start(|s| s.heartbeat_timeout_secs = 2).await;
    let (_a, mut a) = ex.member("alice", 100_000).await;
    let (_c, mut c) = ex.member("carol", 100_000).await;
    let (_b, mut b) = ex.member("bob", 0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let offers = (0..2).map(|_| pb::SlotOffer { slot: Some(slot()), ask: 3600, kind_asks: vec![] }).collect();
    tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Register(pb::Register { kernel: "6.1".into(), seccomp_strict: true, slots: offers })) }).await.unwrap();
    let mut session = b.exchange.seller_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    session.next().await.unwrap().unwrap();
    let beat = tx.clone();
    let beats = tokio::spawn(async move {
        while beat.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Heartbeat(pb::Heartbeat {})) }).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    // Alice watches her order (as `cpushare run` does); Carol's is a plain one, and she follows nothing.
    let alice_events = a.exchange.lease_events(pb::LeaseEventsRequest {}).await.unwrap().into_inner();
    let watched = a.exchange.place_buy(pb::PlaceBuyRequest { attended: true, ..buy(1, 3600) }).await.unwrap().into_inner();
    let plain = c.exchange.place_buy(buy(1, 3600)).await.unwrap().into_inner();
    for lease in [watched.leases[0], plain.leases[0]] {
        tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Ready(pb::Ready { lease })) }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut bob_events = b.exchange.lease_events(pb::LeaseEventsRequest {}).await.unwrap().into_inner();
    // Alice's program dies: its stream goes with it.
    drop(alice_events);
    let gone = std::time::Instant::now();
    let ended = loop {
        let e = tokio::time::timeout(Duration::from_secs(15), bob_events.next()).await.expect("the buyer is declared lost").unwrap().unwrap();
        if e.kind == "ended" {
            break e;
        }
    };
    assert_eq!((ended.lease, ended.reason.as_str()), (watched.leases[0], "buyer lost"));
    assert!(gone.elapsed() < Duration::from_secs(6), "lost within the timeout and a tick");
    // Her order is cancelled, her escrow back; what she paid stops at about when she went.
    let orders = a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders;
    assert!(orders.is_empty(), "{orders:?}");
    let balance = a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
    assert_eq!(balance.escrow_cents, 0);
    let paid = 100_000 - balance.available_cents;
    assert!((2..=6).contains(&paid), "about 3 s at a cent a second, not the timeout too: {paid}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner().available_cents, balance.available_cents, "nothing more");
    // Carol's plain order, never watched, stands and runs.
    let leases = c.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner().leases;
    assert_eq!((leases.len(), leases[0].state.as_str()), (1, "running"));
    let audit = ex.admin.admin.audit(pb::AuditRequest {}).await.unwrap().into_inner();
    assert!(audit.ok, "{}", audit.problem);
    beats.abort();
    ex.running.listening.shutdown().await;
}

/// Sends `entries` on one order-entry stream, all at once, and collects the answers.
async fn entry_stream(conn: &mut cpushare_exchange::client::Connection, entries: Vec<pb::OrderEntry>) -> Vec<pb::OrderAck> {
    let n = entries.len();
    let acks = conn.exchange.place_orders(tokio_stream::iter(entries)).await.unwrap().into_inner();
    let acks: Vec<pb::OrderAck> = acks.map(|a| a.unwrap()).collect().await;
    assert_eq!(acks.len(), n, "every entry is answered");
    acks
}

fn entry(tag: u64, order: pb::order_entry::Order) -> pb::OrderEntry {
    pb::OrderEntry { tag, order: Some(order) }
}

#[tokio::test]
async fn many_orders_in_flight_on_one_stream_are_answered_in_order_each_as_its_call_would() {
    let mut ex = Exchange::start(|s| {
        s.orders_per_sec = 1e6;
        s.order_burst = 1e6;
    })
    .await;
    let (alice, mut a) = ex.member("alice", 1_000_000).await;
    let (_b, mut b) = ex.member("bob", 0).await;
    let (_c, mut carol) = ex.member("carol", 1_000_000).await;
    let carols = carol.exchange.place_buy(buy(1, 1)).await.unwrap().into_inner().order;

    // Bob sells 150 slots and Alice buys 200 CPUs, on a stream each, far more
    // than the window in flight; among Alice's entries, refused ones.
    use pb::order_entry::Order;
    let sells = (0..150).map(|i| entry(i, Order::Sell(pb::PlaceSellRequest { slot: Some(slot()), ask: 5, kind_asks: vec![] }))).collect();
    let sold = entry_stream(&mut b, sells).await;
    assert!(sold.iter().enumerate().all(|(i, a)| a.tag == i as u64 && a.code == 0 && a.placed.is_some()), "{sold:?}");
    let mut buys: Vec<_> = (0..200).map(|i| entry(i, Order::Buy(buy(1, 10)))).collect();
    buys[10] = entry(10, Order::Buy(buy(0, 10)));
    buys[20] = entry(20, Order::Cancel(pb::CancelOrderRequest { order: carols }));
    buys[30] = pb::OrderEntry { tag: 30, order: None };
    let acks = entry_stream(&mut a, buys).await;
    assert!(acks.iter().enumerate().all(|(i, a)| a.tag == i as u64), "answers in the order sent");
    assert_eq!(acks[10].code, Code::InvalidArgument as i32);
    assert!(acks[10].error.contains("cpus must be between"), "{}", acks[10].error);
    assert_eq!(acks[20].code, Code::NotFound as i32, "another account's order does not exist: {:?}", acks[20]);
    assert_eq!(acks[30].code, Code::InvalidArgument as i32);
    let placed: Vec<_> = acks.iter().filter_map(|a| a.placed.clone()).collect();
    assert_eq!(placed.len(), 197, "the stream carried on past refused entries");
    // The first 150 buys each took one of Bob's slots; the rest rest in the book.
    let leased: usize = placed.iter().map(|p| p.leases.len()).sum();
    assert_eq!(leased, 150);
    let orders = a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders;
    assert_eq!(orders.len(), 197, "every answered order is there");
    let leases = a.exchange.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner().leases;
    assert_eq!(leases.len(), 150);

    // A cancel on the stream, and what a restart finds: everything answered was durable.
    let resting = placed.iter().find(|p| p.leases.is_empty()).unwrap().order;
    let cancelled = entry_stream(&mut a, vec![entry(7, Order::Cancel(pb::CancelOrderRequest { order: resting }))]).await;
    assert_eq!((cancelled[0].code, cancelled[0].placed.as_ref().map(|p| p.order)), (0, Some(resting)));
    let balance = a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
    ex.running.listening.shutdown().await;
    let running = datadir::run(&ex.data, Some("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let mut node = alice;
    node.url = format!("https://127.0.0.1:{}", running.listening.addr.port());
    let mut a = node.connect().await.unwrap();
    assert_eq!(a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders.len(), 196);
    assert_eq!(a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner(), balance);
    running.listening.shutdown().await;
}

#[tokio::test]
async fn an_order_stream_is_rate_limited_and_stops_at_its_node_s_revocation() {
    let mut ex = Exchange::start(|s| {
        s.orders_per_sec = 1.0;
        s.order_burst = 3.0;
    })
    .await;
    let (alice, mut a) = ex.member("alice", 10_000).await;
    use pb::order_entry::Order;
    let acks = entry_stream(&mut a, (0..5).map(|i| entry(i, Order::Buy(buy(1, 1)))).collect()).await;
    let codes: Vec<i32> = acks.iter().map(|a| a.code).collect();
    assert_eq!(&codes[..3], &[0, 0, 0], "the burst");
    assert_eq!(&codes[3..], &[Code::ResourceExhausted as i32; 2]);
    assert!(acks[4].error.contains("per second per account"), "{}", acks[4].error);

    // An open stream: one entry taken, then the node is revoked, and the next is refused.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = a.exchange.place_orders(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    tx.send(entry(1, Order::Buy(buy(1, 1)))).await.unwrap();
    assert_eq!(acks.next().await.unwrap().unwrap().code, 0);
    ex.admin.admin.revoke_node(pb::RevokeNodeRequest { node: alice.node }).await.unwrap();
    tx.send(entry(2, Order::Buy(buy(1, 1)))).await.unwrap();
    let refused = acks.next().await.unwrap().unwrap();
    assert_eq!(refused.code, Code::Unauthenticated as i32);
    assert!(refused.error.contains("revoked"), "{}", refused.error);
    drop(tx);
    assert!(acks.next().await.is_none(), "the stream ends when its sender does");
    ex.running.listening.shutdown().await;
}
