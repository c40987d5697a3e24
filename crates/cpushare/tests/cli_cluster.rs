//! `cpushare cluster` as a buyer types it, against a real exchange and seller
//! processes, booting a real livecd under software emulation.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_cluster_starts_shows_its_consoles_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    use cpushare_sandbox::vm::testing::livecd;
    let Some(short) = livecd(tmp.path(), "short", "#!/bin/sh\necho hello from the cluster\n") else { return };
    let long = livecd(tmp.path(), "long", "#!/bin/sh\necho staying up\nsleep 600\n").unwrap();
    let (_exchange, operator) = exchange(tmp.path());
    let (seller, buyer) = (tmp.path().join("seller"), tmp.path().join("buyer"));
    member(&operator, "seller", &seller);
    let buyer_account = member(&operator, "buyer", &buyer);
    ok(&operator, &["deposit", &buyer_account, "1000"]);
    let _selling = selling(&seller, 1, Some(&tmp.path().join("seller-cache")));

    // A livecd that says hello and powers off: the cluster ends by itself.
    let d1 = tmp.path().join("c1");
    let d1s = d1.to_str().unwrap();
    let table = json(&buyer, &["cluster", "start", "--iso", short.to_str().unwrap(), "--nodes", "1", "--max-price", "40000", "--ram", "256", "--dir", d1s]);
    let node = &table.as_array().unwrap()[0];
    assert_eq!((node["boot"].as_str(), node["accel"].as_str()), (Some("direct"), Some("tcg")), "{table}");
    // On the cluster's network, after the buyer at .1.
    assert_eq!(node["ip"], "10.77.0.2", "{table}");
    let lease = node["lease"].as_u64().unwrap().to_string();
    let console = ok(&buyer, &["cluster", "console", &lease, "--dir", d1s]);
    assert!(console.contains("hello from the cluster"), "{console}");
    let status = json(&buyer, &["cluster", "status", "--dir", d1s]);
    assert_eq!((&status[0]["state"], &status[0]["ip"]), (&"ended".into(), &"10.77.0.2".into()), "{status}");
    // What the seller signed it booted, checked against this image and the exchange's CA.
    let attested = status[0]["attestation"].as_str().unwrap();
    assert!(attested.starts_with("verified: your image, direct boot, tcg, QEMU emulator version"), "{status}");

    // One that stays up until `cluster stop`.
    let d2 = tmp.path().join("c2");
    let (mut start, said) = cluster_up(&buyer, &long, &d2);
    // Its console, followed live as the guest runs, until the lease ends.
    let lease = json(&buyer, &["cluster", "status", "--dir", d2.to_str().unwrap()])[0]["lease"].as_u64().unwrap().to_string();
    let mut follow = Command::new(BIN)
        .arg("--config")
        .arg(&buyer)
        .args(["cluster", "console", &lease, "--follow", "--dir", d2.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut live = BufReader::new(follow.stdout.take().unwrap()).lines();
    assert!(live.by_ref().map_while(Result::ok).any(|l| l.contains("staying up")), "the payload's line reached the console");
    ok(&buyer, &["cluster", "stop", "--dir", d2.to_str().unwrap()]);
    let followed = follow.wait().unwrap();
    assert!(followed.success(), "--follow ends with the lease: {followed:?}");
    let ended = start.wait().unwrap();
    let rest: Vec<String> = said.map_while(Result::ok).collect();
    assert!(ended.success(), "{ended:?}: {rest:?}");
    let status = json(&buyer, &["cluster", "status", "--dir", d2.to_str().unwrap()]);
    assert_eq!(status[0]["state"], "ended", "{status}");
    // The escrow came back; the ledger balances.
    assert_eq!(json(&buyer, &["balance"])["escrow (EUR)"], "0.00");
    assert_eq!(json(&operator, &["exchange", "audit"])["ok"], true);
    // Not a livecd: refused before anything is rented.
    fails(&buyer, &["cluster", "start", "--iso", "/etc/hostname", "--dir", tmp.path().join("c3").to_str().unwrap()], "is not an ISO 9660 image");
    fails(&buyer, &["cluster", "start", "--iso", long.to_str().unwrap(), "--ram", "lots"], "is not a size");
}

#[test]
fn the_vm_demo_boots_a_cluster_replaces_a_lost_node_and_balances_the_books() {
    let tmp = tempfile::tempdir().unwrap();
    // The demo builds its own livecd; skip (or fail under CI) where it cannot.
    if livecd_prerequisites_missing(tmp.path()) {
        return;
    }
    let out_dir = tmp.path().join("demo-out");
    let report = json(tmp.path(), &["demo", "--vm", "--out", out_dir.to_str().unwrap()]);
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "two nodes, then the replacement of the lost one: {report}");
    assert!(nodes.iter().all(|n| n["attested"].as_str().unwrap().starts_with("verified: your image")), "{report}");
    assert_eq!(report["replaced"], true);
    assert_eq!(report["ledger_ok"], true);
    assert_eq!(report["buyer_escrow_cents"], 0);
    let console = std::fs::read_to_string(nodes[2]["console"].as_str().unwrap()).unwrap();
    assert!(console.contains("node up: kernel") && console.contains("tick 2"), "{console}");
}

/// `cluster start` of one node booting `iso`, in the foreground as a buyer
/// runs it, just started; with what it says.
fn cluster_start(buyer: &std::path::Path, iso: &std::path::Path, dir: &std::path::Path) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStderr>>) {
    let mut start = Command::new(BIN)
        .arg("--config")
        .arg(buyer)
        .args(["cluster", "start", "--iso", iso.to_str().unwrap(), "--max-price", "40000", "--ram", "256M", "--dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let said = BufReader::new(start.stderr.take().unwrap()).lines();
    (start, said)
}

/// The same, once all its nodes are up; with the rest of what it says.
fn cluster_up(buyer: &std::path::Path, iso: &std::path::Path, dir: &std::path::Path) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStderr>>) {
    let (start, mut said) = cluster_start(buyer, iso, dir);
    assert!(said.by_ref().map_while(Result::ok).any(|l| l.contains("node(s) up")), "the cluster came up");
    (start, said)
}

/// `cluster start` typed while the exchange is down (restarting, or the link to
/// it coming back) says so and waits for it, rather than giving up at once; the
/// cluster comes up once the exchange is back.
#[test]
fn a_cluster_started_while_the_exchange_is_down_waits_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = cpushare_sandbox::vm::testing::livecd(tmp.path(), "ticking", TICKING) else { return };
    let (mut exchange, operator) = exchange(tmp.path());
    let (seller, buyer) = (tmp.path().join("seller"), tmp.path().join("buyer"));
    member(&operator, "seller", &seller);
    let buyer_account = member(&operator, "buyer", &buyer);
    ok(&operator, &["deposit", &buyer_account, "1000"]);
    let _selling = selling(&seller, 1, Some(&tmp.path().join("seller-cache")));

    exchange.0.kill().unwrap();
    exchange.0.wait().unwrap();
    let dir = tmp.path().join("c");
    let (mut start, mut said) = cluster_start(&buyer, &iso, &dir);
    let first = said.next().unwrap().unwrap();
    assert!(first.contains("cannot reach the exchange") && first.contains("trying again"), "{first}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(start.try_wait().unwrap().is_none(), "cluster start gave up while the exchange was down");
    let _exchange = exchange_again(&tmp.path().join("data"));
    wait_for_exchange(&operator);
    assert!(said.by_ref().map_while(Result::ok).any(|l| l.contains("node(s) up")), "the cluster came up once the exchange was back");
    ok(&buyer, &["cluster", "stop", "--dir", dir.to_str().unwrap()]);
    assert!(start.wait().unwrap().success());
}

/// Whether `scripts/make-live-iso` cannot run here (said aloud; a failure under CI).
fn livecd_prerequisites_missing(dir: &std::path::Path) -> bool {
    cpushare_sandbox::vm::testing::livecd(dir, "probe", "#!/bin/sh\n").is_none()
}

/// The exchange killed (SIGKILL) and started again under a running cluster:
/// the VM runs on at its seller (its clock goes on, it does not boot again),
/// the buyer's console follows it again on new relays, the same lease goes on
/// being metered, the VM still reaches the buyer across the cluster's
/// network (both joined it again, as themselves); then its seller vanishes
/// and the replacement, joining the network after the restart, reaches the
/// buyer too; then that seller restarts at once, and gives the lease whose
/// VM it lost back. `cluster stop` ends it with the books balanced.
#[test]
fn a_cluster_outlives_an_exchange_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = cpushare_sandbox::vm::testing::livecd(tmp.path(), "ticking", TICKING) else { return };
    let (mut exchange, operator) = exchange(tmp.path());
    let buyer = tmp.path().join("buyer");
    let buyer_account = member(&operator, "buyer", &buyer);
    ok(&operator, &["deposit", &buyer_account, "1000"]);
    let mut sellers = Vec::new();
    for name in ["s1", "s2"] {
        let dir = tmp.path().join(name);
        member(&operator, name, &dir);
        let node: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("node.json")).unwrap()).unwrap();
        let cache = tmp.path().join(format!("{name}-cache"));
        let running = selling(&dir, 1, Some(&cache));
        sellers.push((node["node"].as_u64().unwrap(), running, cache));
    }

    let dir = tmp.path().join("c");
    let (mut start, said) = cluster_up(&buyer, &iso, &dir);
    let first = json(&buyer, &["cluster", "status", "--dir", dir.to_str().unwrap()])[0].clone();
    let lease = first["lease"].as_u64().unwrap();
    // A node's clock: each tick's number, and whether the buyer answered its ping.
    let clock = |lease: u64| ticks(&std::fs::read_to_string(dir.join(format!("console-{lease}.log"))).unwrap_or_default());
    let wait_for = |what: &str, lease: u64, done: &dyn Fn(&[(u64, bool)]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(&clock(lease)) {
            assert!(Instant::now() < deadline, "lease {lease} never {what}: {:?}", clock(lease));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for("reached the buyer", lease, &|c| c.iter().any(|t| t.1));

    // The exchange goes; it comes back with a heartbeat timeout of 5 s, for the seller killed below.
    let data = tmp.path().join("data");
    exchange.0.kill().unwrap();
    exchange.0.wait().unwrap();
    let before = clock(lease).last().unwrap().0;
    set_heartbeat_timeout(&data, 5);
    std::thread::sleep(Duration::from_secs(2));
    exchange = exchange_again(&data);
    wait_for_exchange(&operator);
    // The same VM's clock, seen again at the buyer: it went on meanwhile,
    // and its pings still reach the buyer.
    wait_for("went on after the restart", lease, &|c| c.last().is_some_and(|t| t.0 >= before + 5));
    wait_for("reached the buyer after the restart", lease, &|c| c.iter().any(|t| t.0 > before + 3 && t.1));
    let text = std::fs::read_to_string(dir.join(format!("console-{lease}.log"))).unwrap();
    assert_eq!(text.matches("cpushare-livecd: up").count(), 1, "the VM did not boot again: {text}");
    assert!(clock(lease).windows(2).all(|w| w[0].0 < w[1].0), "one clock, never reset: {:?}", clock(lease));
    // And what the VM printed while the exchange was away reached the buyer
    // when its relay came back: no tick around the restart is missing.
    let around: Vec<u64> = clock(lease).iter().map(|t| t.0).filter(|n| (before.saturating_sub(3)..=before + 5).contains(n)).collect();
    assert_eq!(around, (before.saturating_sub(3)..=before + 5).collect::<Vec<_>>(), "console output lost across the restart");
    // The same lease, metered on (settled every 10 s) at its price.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leases = json(&buyer, &["leases"]);
        let live = leases.as_array().unwrap();
        assert_eq!(live.len(), 1, "{leases}");
        assert_eq!((live[0]["lease"].as_u64(), live[0]["state"].as_str()), (Some(lease), Some("running")), "{leases}");
        let (price, secs) = (live[0]["cents/CPU-h"].as_i64().unwrap(), live[0]["delivered s"].as_i64().unwrap());
        if secs >= 10 {
            let charged: f64 = live[0]["charged EUR"].as_str().unwrap().parse().unwrap();
            assert!(((charged * 100.0).round() as i64 - price * secs / 3600).abs() <= 1, "{leases}");
            break;
        }
        assert!(Instant::now() < deadline, "the lease was not metered on: {leases}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Its seller vanishes: the replacement joins the network as it is since the restart.
    let at = sellers.iter().position(|(node, ..)| Some(*node) == first["seller node"].as_u64()).unwrap();
    let (_, killed, cache) = sellers.remove(at);
    drop(killed);
    // Its VM dies with it: the kernel kills a seller's QEMUs when it dies.
    let runs_from = |cache: &std::path::Path| {
        let cache = cache.to_string_lossy().into_owned();
        std::fs::read_dir("/proc").unwrap().flatten().any(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&cache)))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs_from(&cache) {
        assert!(Instant::now() < deadline, "the killed seller's VM runs on");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let second = loop {
        let status = json(&buyer, &["cluster", "status", "--dir", dir.to_str().unwrap()]);
        if let Some(n) = status.as_array().unwrap().iter().find(|n| n["lease"].as_u64() != Some(lease)) {
            break n["lease"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no replacement: {status}");
        std::thread::sleep(Duration::from_millis(500));
    };
    wait_for("reached the buyer from the replacement", second, &|c| c.iter().any(|t| t.1));

    // Its seller is killed and back at once, before the exchange misses it:
    // the VM died with the process, so the restarted seller gives the lease
    // back rather than boot another machine under it, and a new lease boots.
    let s2 = tmp.path().join("s2");
    drop(sellers.pop());
    let _back = selling(&s2, 1, Some(&tmp.path().join("s2-cache")));
    let deadline = Instant::now() + Duration::from_secs(120);
    let third = loop {
        let status = json(&buyer, &["cluster", "status", "--dir", dir.to_str().unwrap()]);
        if let Some(n) = status.as_array().unwrap().iter().find(|n| ![Some(lease), Some(second)].contains(&n["lease"].as_u64())) {
            break n["lease"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no new lease after the seller's restart: {status}");
        std::thread::sleep(Duration::from_millis(500));
    };
    wait_for("ticked on the new lease", third, &|c| !c.is_empty());
    let text = std::fs::read_to_string(dir.join(format!("console-{second}.log"))).unwrap();
    assert_eq!(text.matches("cpushare-livecd: up").count(), 1, "no second boot under lease {second}: {text}");

    ok(&buyer, &["cluster", "stop", "--dir", dir.to_str().unwrap()]);
    let ended = start.wait().unwrap();
    let rest: Vec<String> = said.map_while(Result::ok).collect();
    assert!(ended.success(), "{ended:?}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("the exchange went away")), "{rest:?}");
    assert_eq!(json(&buyer, &["balance"])["escrow (EUR)"], "0.00");
    assert_eq!(json(&operator, &["exchange", "audit"])["ok"], true);
    drop(exchange);
}
