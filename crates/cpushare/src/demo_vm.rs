//! `cpushare demo --vm`: a cluster of VMs booting a livecd on this machine.
//!
//! An exchange, three sellers and a buyer on localhost, as in the jail demo.
//! `scripts/make-live-iso` builds a small livecd (Debian's kernel, busybox);
//! the buyer rents two nodes that boot it, checks each seller's signed
//! statement of what it booted, and follows their consoles. Halfway one
//! seller is killed (unless `--no-faults`): its node is replaced by a new one
//! on the third seller. The nodes share a private network with the buyer
//! (whose end is a userspace stack: no root needed), and each pings the
//! buyer across it every second. Then the cluster stops and the bill is printed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cpushare_buyer::cluster::{run_cluster, ClusterSpec, Event, Node};
use cpushare_exchange::convert::euros;
use cpushare_proto::v1 as pb;
use cpushare_seller::testbed::Testbed;
use tokio::sync::mpsc;

use crate::table::Output;

const NODES: u32 = 2;
/// Cents per CPU-hour: software emulation is priced below jail work.
const SELLERS: [(&str, u64); 3] = [("alice", 600), ("bob", 800), ("carol", 1000)];
/// What each node runs once booted: it says what it is, then counts, and
/// pings the buyer across the cluster's private network each second.
const PAYLOAD: &str = "#!/bin/sh\n\
me=$(ifconfig eth0 | sed -n 's/.*inet addr:\\([0-9.]*\\).*/\\1/p')\n\
echo \"node up: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPU, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, at $me\"\n\
i=0; while true; do i=$((i+1)); rtt=$(ping -c 1 -W 1 10.77.0.1 | sed -n 's/.*time=\\(.*\\) ms/\\1 ms/p'); echo \"tick $i: $(echo $i | sha256sum | cut -c1-16), buyer 10.77.0.1 ${rtt:-unreachable}\"; sleep 1; done\n";

/// The script that builds the livecd, from the source tree this binary was built in.
fn make_live_iso() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-live-iso")
}

fn build_livecd(dir: &Path) -> anyhow::Result<PathBuf> {
    let script = make_live_iso();
    anyhow::ensure!(script.exists(), "demo --vm builds its livecd with scripts/make-live-iso from the cpushare source tree; {} is missing", script.display());
    let payload = dir.join("payload");
    std::fs::create_dir_all(&payload)?;
    std::fs::write(payload.join("init"), PAYLOAD)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(payload.join("init"), std::fs::Permissions::from_mode(0o755))?;
    let iso = dir.join("demo.iso");
    let out = std::process::Command::new(&script).arg(&iso).arg(&payload).output().with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/make-live-iso failed (it needs busybox-static, cpio, xorriso, isolinux and syslinux-common, which it installs as root): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(iso)
}

pub async fn run(out_dir: &Path, no_faults: bool, out: Output) -> anyhow::Result<()> {
    let started = Instant::now();
    anyhow::ensure!(cpushare_sandbox::vm::qemu_version().is_ok(), "demo --vm needs QEMU: install qemu-system-x86 (Debian) and run it again");
    let tmp = std::env::temp_dir().join(format!("cpushare-demo-vm-{}", std::process::id()));
    let _cleanup = crate::demo::Cleanup(tmp.clone());
    let say = |line: String| if out.json { eprintln!("{line}") } else { println!("{line}") };
    std::fs::create_dir_all(&tmp)?;
    say("building a small livecd (Debian's kernel and busybox; the kernel package is downloaded once)".into());
    let iso = build_livecd(&tmp)?;
    say(format!("starting an exchange, three sellers and a buyer on localhost (in {})", tmp.display()));
    let mut tb = Testbed::start(&tmp.join("tb"), 3).await.context("starting the exchange")?;
    for (name, price) in SELLERS {
        let s = tb.seller(name, 1, price, |c| c.ram_per_slot_mib = 512).await.with_context(|| format!("starting seller {name}"))?;
        let p = s.seller.probe();
        let kind = if p.vm_kvm { "vm-kvm" } else { "vm-tcg" };
        say(format!("   seller {name}: 1 slot at {price} cents per CPU-hour, {kind} ({})", p.qemu_version));
    }
    let buyer = tb.member("buyer", 20_000).await?;
    say("   buyer: 200.00 EUR deposited".into());

    let logs = out_dir.join("vm-consoles");
    let _ = std::fs::remove_dir_all(&logs);
    let spec = ClusterSpec { iso, nodes: NODES, max_price: 2000, ram_mib: 256, scratch_mib: 64, kvm_only: false, logs: logs.clone(), replace: true, network: true, tap: None, socks: Some(([127, 0, 0, 1], 0).into()), shares: vec![] };
    say(format!("renting {NODES} machines that boot it (256 MiB and a 64 MiB scratch disk each)"));
    let conn = buyer.connect().await?;
    let (tx, mut rx) = mpsc::channel(256);
    let cluster = tokio::spawn(run_cluster(conn.clone(), spec, tx, Arc::new(())));
    let mut order = 0;
    let mut booted: Vec<Node> = Vec::new();
    let mut victim = None;
    let mut replaced = false;
    // Every seller's node, the vanished one's too, for the bill.
    let seller_nodes: Vec<(String, PathBuf)> = tb.sellers.iter().map(|s| (s.name.clone(), s.node.dir.clone())).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let e = tokio::time::timeout_at(deadline.into(), rx.recv()).await.context("the cluster did not come up within 5 minutes")?;
        let Some(e) = e else { break };
        match e {
            Event::Placed { order: o } => order = o,
            Event::Uploading { .. } => {}
            Event::Booted(n) => {
                let seller = tb.sellers.iter().find(|s| s.node.node == n.seller_node).map_or("?".to_string(), |s| s.name.clone());
                say(format!("   lease {} booted on {seller} at {} ({} boot, {}; {} bytes of image sent): {}", n.lease, n.ip, n.boot, n.accel, n.uploaded, n.attested));
                booted.push(n);
                let lines = wait_for(&booted.last().unwrap().console_log, "tick 2").await;
                say(format!("      its console: {}", lines.trim()));
                if booted.len() < NODES as usize {
                    continue;
                }
                if no_faults || victim.is_some() {
                    replaced = victim.is_some();
                    break;
                }
                let n = &booted[0];
                let at = tb.sellers.iter().position(|s| s.node.node == n.seller_node).context("the node's seller")?;
                let s = tb.sellers.remove(at);
                say(format!("!! seller {} vanished (its machine lost power): lease {} is lost, a replacement is rented", s.name, n.lease));
                victim = Some(n.lease);
                s.kill();
            }
            Event::Stopped { lease, why } => say(format!("   lease {lease}: {why}")),
        }
    }
    say("stopping the cluster: every lease ends, the unspent escrow comes back".into());
    conn.exchange.clone().cancel_order(pb::CancelOrderRequest { order }).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let _ = tokio::time::timeout(Duration::from_secs(30), cluster).await;
    // Let the last settlement land, then the bill.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut ex = conn.exchange.clone();
    let b = ex.balance(pb::BalanceRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
    let audit = tb.operator.admin.audit(pb::AuditRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
    let mut sellers = Vec::new();
    for (name, dir) in &seller_nodes {
        let mut c = cpushare_exchange::node::NodeConfig::load(dir)?.connect().await?;
        let e = c.exchange.balance(pb::BalanceRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
        sellers.push((name.clone(), e.available_cents));
    }
    let spent = 20_000 - b.available_cents - b.escrow_cents;
    if out.json {
        println!(
            "{}",
            serde_json::json!({
                "nodes": booted.iter().map(|n| serde_json::json!({"lease": n.lease, "seller_node": n.seller_node, "boot": n.boot, "accel": n.accel, "ip": n.ip, "attested": n.attested.to_string(), "console": n.console_log})).collect::<Vec<_>>(),
                "replaced": replaced,
                "spent_cents": spent,
                "buyer_escrow_cents": b.escrow_cents,
                "sellers": sellers,
                "ledger_ok": audit.ok,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!();
        println!("nodes          {} booted ({}), consoles in {}", booted.len(), if replaced { "one replaced after its seller vanished" } else { "no faults" }, logs.display());
        println!("bill           {} EUR (billed from each guest's boot, per second)", euros(spent));
        println!("buyer          {} EUR left, {} EUR in escrow", euros(b.available_cents), euros(b.escrow_cents));
        for (name, cents) in &sellers {
            println!("seller {name:<7} earned {} EUR", euros(*cents));
        }
        println!("exchange fees  {} EUR", euros(audit.fees_cents));
        println!("ledger         {}", if audit.ok { "balanced" } else { &audit.problem });
        println!("took           {:.1} s", started.elapsed().as_secs_f64());
    }
    anyhow::ensure!(audit.ok, "the ledger does not balance: {}", audit.problem);
    anyhow::ensure!(b.escrow_cents == 0, "escrow left after the cluster stopped: {} cents", b.escrow_cents);
    tb.exchange.listening.shutdown().await;
    Ok(())
}

/// The console log once it holds `line` (at most a minute), from its payload's first line.
async fn wait_for(log: &Path, line: &str) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(line) || t.elapsed() > Duration::from_secs(60) {
            return text.lines().skip_while(|l| !l.starts_with("node up")).take(3).collect::<Vec<_>>().join(" | ");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
