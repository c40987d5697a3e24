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
    let spec = ClusterSpec { iso: iso.into(), nodes: 1, max_price: 4000, ram_mib: 256, scratch_mib: 64, kvm_only: false, logs: logs.into() };
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
            Event::Placed { .. } => {}
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

    let (node, why) = one_node(&buyer, &iso, &dir.path().join("logs1")).await;
    assert_eq!((node.boot.as_str(), node.accel.as_str(), node.uploaded), ("direct", "tcg", size), "{node:?}");
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
    let spec = ClusterSpec { iso: junk, nodes: 1, max_price: 4000, ram_mib: 256, scratch_mib: 64, kvm_only: false, logs: dir.path().join("logs3") };
    let err = run_cluster(buyer.connect().await.unwrap(), spec, mpsc::channel(4).0, Arc::new(())).await.unwrap_err();
    assert!(format!("{err:#}").contains("is not an ISO 9660 image"), "{err:#}");
}
