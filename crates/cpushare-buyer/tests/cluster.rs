//! A cluster node booting a real livecd (`scripts/make-live-iso`) on a local
//! seller under software emulation, its console read at the buyer; the image
//! crosses once per seller.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cpushare_buyer::cluster::{run_cluster, ClusterSpec, Event, Node};
use cpushare_seller::testbed::Testbed;
use tokio::sync::mpsc;

fn livecd(dir: &Path) -> Option<std::path::PathBuf> {
    cpushare_sandbox::vm::testing::livecd(dir, "live", "#!/bin/sh\necho hello from node $(hostname)\n")
}

/// Runs a one-node cluster to its end; returns the node and why it stopped.
async fn one_node(buyer: &cpushare_exchange::node::NodeConfig, iso: &Path, logs: &Path) -> (Node, String) {
    let spec = ClusterSpec { iso: iso.into(), nodes: 1, max_price: 4000, ram_mib: 256, scratch_mib: 64, kvm_only: false, logs: logs.into(), replace: true, network: false, tap: None, socks: None, shares: vec![] };
    let (tx, mut rx) = mpsc::channel(16);
    let running = tokio::spawn(run_cluster(buyer.connect().await.unwrap(), spec, tx, Arc::new(())));
    let mut booted = None;
    let mut stopped: Option<String> = None;
    let consoles = |logs: &Path| -> String {
        std::fs::read_dir(logs).map(|d| d.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect::<Vec<_>>().join("\n---\n")).unwrap_or_default()
    };
    loop {
        let Ok(e) = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await else {
            panic!("the cluster did not move on for 120 s; booted {booted:?}; consoles:\n{}", consoles(logs));
        };
        let Some(e) = e else { break };
        match e {
            Event::Booted(n) => booted = Some(n),
            Event::Stopped { why, .. } => {
                assert!(stopped.is_none(), "one node stops once: {stopped:?}, then {why}");
                stopped = Some(why)
            }
            Event::Placed { .. } | Event::Uploading { .. } => {}
        }
    }
    running.await.unwrap().unwrap();
    (booted.expect("the node booted"), stopped.expect("the node stopped"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_livecd_boots_on_a_seller_and_its_console_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some(iso) = livecd(dir.path()) else { return };
    let mut tb = Testbed::start(&dir.path().join("tb"), 5).await.unwrap();
    tb.seller("s1", 1, 3600, |c| c.ram_per_slot_mib = 512).await.unwrap();
    let buyer = tb.member("buyer", 100_000).await.unwrap();
    let size = std::fs::metadata(&iso).unwrap().len();
    // The seller offers software-emulated VMs at a fifth of its ask.
    let depth = |kind: cpushare_proto::v1::SandboxKind| {
        let mut ex = tb.operator.exchange.clone();
        async move { ex.book_depth(cpushare_proto::v1::BookDepthRequest { kind: kind as i32 }).await.unwrap().into_inner().asks }
    };
    let level = |price| vec![cpushare_proto::v1::PriceLevel { price, cpus: 1 }];
    assert_eq!(depth(cpushare_proto::v1::SandboxKind::VmTcg).await, level(720));
    assert_eq!(depth(cpushare_proto::v1::SandboxKind::SeccompStrict).await, level(3600));
    // vm-kvm only where the probe saw a real kernel boot under KVM (not here: it falls back to TCG).
    let kvm = tb.sellers[0].seller.probe().vm_kvm;
    assert_eq!(depth(cpushare_proto::v1::SandboxKind::VmKvm).await.is_empty(), !kvm);

    let (node, why) = one_node(&buyer, &iso, &dir.path().join("logs1")).await;
    assert_eq!((node.boot.as_str(), node.accel.as_str(), node.uploaded), ("direct", "tcg", size), "{node:?}");
    // The seller's signed statement checked out against this image and the exchange's CA.
    assert!(node.attested.qemu_version.starts_with("QEMU emulator version"), "{node:?}");
    assert_eq!((node.attested.boot.as_str(), node.attested.accel.as_str()), ("direct", "tcg"));
    let console = std::fs::read_to_string(&node.console_log).unwrap();
    assert!(console.contains("cpushare-livecd: up") && console.contains("hello from node"), "{console}");
    assert!(why.contains("the VM stopped"), "{why}");

    // The same image again: the seller has it, nothing is uploaded.
    let (again, _) = one_node(&buyer, &iso, &dir.path().join("logs2")).await;
    assert_eq!(again.uploaded, 0, "{again:?}");
    assert!(std::fs::read_to_string(&again.console_log).unwrap().contains("hello from node"));

    // A file that is not a livecd never leaves the buyer.
    let junk = dir.path().join("junk.iso");
    std::fs::write(&junk, vec![7u8; 100_000]).unwrap();
    let spec = ClusterSpec { iso: junk, nodes: 1, max_price: 4000, ram_mib: 256, scratch_mib: 64, kvm_only: false, logs: dir.path().join("logs3"), replace: true, network: false, tap: None, socks: None, shares: vec![] };
    let err = run_cluster(buyer.connect().await.unwrap(), spec, mpsc::channel(4).0, Arc::new(())).await.unwrap_err();
    assert!(format!("{err:#}").contains("is not an ISO 9660 image"), "{err:#}");
}

/// Waits for the next event other than upload progress.
async fn next_event(rx: &mut mpsc::Receiver<Event>, logs: &Path) -> Option<Event> {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.unwrap_or_else(|_| {
            let consoles: Vec<String> = std::fs::read_dir(logs).map(|d| d.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect()).unwrap_or_default();
            panic!("the cluster did not move on for 120 s; consoles:\n{}", consoles.join("\n---\n"))
        });
        match e {
            Some(Event::Uploading { .. }) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_seller_vanishes_is_replaced_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let Some(iso) = cpushare_sandbox::vm::testing::livecd(dir.path(), "live", "#!/bin/sh\necho node up; sleep 600\n") else { return };
    let mut tb = Testbed::start(&dir.path().join("tb"), 3).await.unwrap();
    // Cheapest first: each cluster's first node goes to the cheapest seller alive.
    for (name, price) in [("s1", 1000), ("s2", 2000), ("s3", 3000)] {
        tb.seller(name, 1, price, |c| c.ram_per_slot_mib = 512).await.unwrap();
    }
    let buyer = tb.member("buyer", 1_000_000).await.unwrap();
    let node_of = |tb: &Testbed, name: &str| tb.sellers.iter().find(|s| s.name == name).unwrap().node.node;
    let (s1, s2, s3) = (node_of(&tb, "s1"), node_of(&tb, "s2"), node_of(&tb, "s3"));
    let spec = |logs: &Path, replace| ClusterSpec { iso: iso.clone(), nodes: 1, max_price: 4000, ram_mib: 256, scratch_mib: 0, kvm_only: false, logs: logs.into(), replace, network: false, tap: None, socks: None, shares: vec![] };

    // Replacements on: s1's node is lost, a new one boots on s2.
    let logs = dir.path().join("replaced");
    let (tx, mut rx) = mpsc::channel(64);
    let conn = buyer.connect().await.unwrap();
    let running = tokio::spawn(run_cluster(conn.clone(), spec(&logs, true), tx, Arc::new(())));
    let Some(Event::Placed { order }) = next_event(&mut rx, &logs).await else { panic!("the order first") };
    let Some(Event::Booted(first)) = next_event(&mut rx, &logs).await else { panic!("then a node") };
    assert_eq!(first.seller_node, s1);
    let at = tb.sellers.iter().position(|s| s.node.node == s1).unwrap();
    tb.sellers.remove(at).kill();
    let Some(Event::Stopped { lease, why }) = next_event(&mut rx, &logs).await else { panic!("the lost node stops") };
    assert_eq!(lease, first.lease, "{why}");
    let Some(Event::Booted(second)) = next_event(&mut rx, &logs).await else { panic!("a replacement boots") };
    assert_eq!(second.seller_node, s2, "{second:?}");
    // Booted means its first console byte; its payload speaks a little later.
    let mut console = String::new();
    for _ in 0..600 {
        console = std::fs::read_to_string(&second.console_log).unwrap();
        if console.contains("node up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(console.contains("node up"), "{console}");
    conn.exchange.clone().cancel_order(cpushare_proto::v1::CancelOrderRequest { order }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), running).await.expect("the cluster ends with its order").unwrap().unwrap();

    // Replacements off: s2's node is lost and the cluster ends, though s3 is free.
    let logs = dir.path().join("not-replaced");
    let (tx, mut rx) = mpsc::channel(64);
    let running = tokio::spawn(run_cluster(conn.clone(), spec(&logs, false), tx, Arc::new(())));
    let Some(Event::Placed { .. }) = next_event(&mut rx, &logs).await else { panic!("the order first") };
    let Some(Event::Booted(only)) = next_event(&mut rx, &logs).await else { panic!("then a node") };
    assert_eq!(only.seller_node, s2);
    let at = tb.sellers.iter().position(|s| s.node.node == s2).unwrap();
    tb.sellers.remove(at).kill();
    let Some(Event::Stopped { lease, .. }) = next_event(&mut rx, &logs).await else { panic!("the lost node stops") };
    assert_eq!(lease, only.lease);
    tokio::time::timeout(Duration::from_secs(60), running).await.expect("the cluster ends").unwrap().unwrap();
    while let Some(e) = rx.recv().await {
        assert!(!matches!(e, Event::Booted(_)), "no replacement may boot: {e:?}");
    }
    // Whatever s3 was offered, it never ran, so nobody paid for it.
    let mut ops = tb.operator.clone();
    let audit = ops.admin.audit(cpushare_proto::v1::AuditRequest {}).await.unwrap().into_inner();
    assert!(audit.ok, "{}", audit.problem);
    let s3_conn = tb.sellers.iter().find(|s| s.node.node == s3).unwrap().node.connect().await.unwrap();
    let earned = s3_conn.exchange.clone().balance(cpushare_proto::v1::BalanceRequest {}).await.unwrap().into_inner();
    assert_eq!(earned.available_cents, 0, "s3 earned nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_upload_resumes_with_only_what_was_missing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(small) = cpushare_sandbox::vm::testing::livecd(dir.path(), "live", "#!/bin/sh\necho resumed and booted\n") else { return };
    let iso = cpushare_sandbox::vm::testing::padded(&small, 256, 1, dir.path());
    let size = std::fs::metadata(&iso).unwrap().len();
    let mut tb = Testbed::start(&dir.path().join("tb"), 5).await.unwrap();
    tb.seller("s1", 1, 1000, |c| c.ram_per_slot_mib = 512).await.unwrap();
    let buyer = tb.member("buyer", 1_000_000).await.unwrap();
    let conn = buyer.connect().await.unwrap();
    let spec = |logs: &str| ClusterSpec { iso: iso.clone(), nodes: 1, max_price: 4000, ram_mib: 256, scratch_mib: 0, kvm_only: false, logs: dir.path().join(logs), replace: false, network: false, tap: None, socks: None, shares: vec![] };

    // The buyer goes away a third of the way through the upload.
    let (tx, mut rx) = mpsc::channel(256);
    let first = tokio::spawn(run_cluster(conn.clone(), spec("cut"), tx, Arc::new(())));
    let mut order = 0;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("the upload moves") {
        match e {
            Event::Placed { order: o } => order = o,
            Event::Uploading { sent, .. } if sent >= size / 3 => break,
            Event::Booted(n) => panic!("the upload was to be cut before the boot: {n:?}"),
            _ => {}
        }
    }
    first.abort();
    conn.exchange.clone().cancel_order(cpushare_proto::v1::CancelOrderRequest { order }).await.unwrap();
    let images = dir.path().join("tb/cache/s1/images");
    let part = || std::fs::read_dir(&images).unwrap().flatten().find(|e| e.file_name().to_string_lossy().ends_with(".part")).map(|e| e.metadata().unwrap().len());
    // What arrived is kept once the seller has let the lease go.
    let mut had = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = part().expect("the interrupted upload is kept");
        if now == had && conn.exchange.clone().list_leases(cpushare_proto::v1::ListLeasesRequest {}).await.unwrap().into_inner().leases.is_empty() {
            break;
        }
        had = now;
    }
    assert!(had > 0 && had < size, "{had} of {size}");

    // Started again: only the rest crosses, and the image boots.
    let (tx, mut rx) = mpsc::channel(256);
    let again = tokio::spawn(run_cluster(conn.clone(), spec("resumed"), tx, Arc::new(())));
    let mut node = None;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("the cluster moves") {
        if let Event::Booted(n) = e {
            node = Some(n);
        }
    }
    again.await.unwrap().unwrap();
    let node = node.expect("the resumed image booted");
    assert_eq!(node.uploaded, size - had, "only what was missing was sent");
    assert!(std::fs::read_to_string(&node.console_log).unwrap().contains("resumed and booted"));
    assert!(part().is_none(), "the part became the whole image");
}
