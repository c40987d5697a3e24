//! The buyer's share with real VMs (software emulation): a cluster's nodes
//! mount the buyer's directory over the cluster's network with their stock
//! kernel's NFS client, write to it and read each other's files; one node's
//! seller is killed while the node writes, what that node had synced (and
//! every line it had sent since) is on the buyer's disk, and its
//! replacement reads it. A node of another cluster, on its own network,
//! cannot mount the first cluster's share (only its own buyer's); a guest's
//! symlink out of the share writes into the guest, not onto the buyer's host.
//!
//! The first cluster's buyer is on its network by an interface of its own
//! when root (the share listens on that interface), the second's always by
//! the userspace stack (the share behind it): both ways are exercised as root.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cpushare_buyer::cluster::{run_cluster, ClusterSpec, Event, Node};
use cpushare_buyer::share::ShareSpec;
use cpushare_seller::testbed::Testbed;
use tokio::sync::mpsc;

/// Each node writes a file of 4 MiB named after itself and syncs it, tries
/// to write through a symlink out of the share, then keeps reading what the
/// other nodes wrote. `SHARES` lists what it mounted.
const PAYLOAD: &str = r#"#!/bin/sh
me=$(ifconfig eth0 | sed -n 's/.*inet addr:\([0-9.]*\).*/\1/p')
echo "node at $me"
grep -q " /mnt/data nfs" /proc/mounts && echo "mounted data" || echo "no data share"
grep -q " /mnt/other nfs" /proc/mounts && echo "mounted other" || true
if [ -d /mnt/other ] && grep -q " /mnt/other nfs" /proc/mounts; then
    echo "written by $me in the other cluster" >/mnt/other/from-$me.txt && sync && echo "wrote other"
fi
grep -q " /mnt/data nfs" /proc/mounts || { sleep 600; exit 0; }
yes "written by $me" | head -c 4194304 >/mnt/data/big-$me.txt
sync
echo "synced $me"
# Writing on when its seller is killed: a line at a time, never synced.
(i=0; while :; do i=$((i+1)); echo "line $i from $me" >>/mnt/data/log-$me.txt; sleep 0.2; done) &
# A symlink out of the share: the guest follows it, in its own file system.
ln -s /etc /mnt/data/etc-$me
echo "escaped?" >/mnt/data/etc-$me/cpushare-escape-$me && echo "wrote through the link into its own /etc"
seen=""
n=0
while [ $n -lt 600 ]; do
    for f in /mnt/data/big-*.txt; do
        [ "$f" = /mnt/data/big-$me.txt ] && continue
        case " $seen " in *" $f "*) continue ;; esac
        [ -f "$f" ] || continue
        # Complete once 4 MiB are there (the writer synced before saying so).
        [ "$(wc -c <"$f")" -eq 4194304 ] || continue
        who=${f#/mnt/data/big-}
        who=${who%.txt}
        if yes "written by $who" | head -c 4194304 | cmp -s - "$f"; then echo "read $who's file: intact"; else echo "read $who's file: differs"; fi
        seen="$seen $f"
    done
    sleep 1
    n=$((n+1))
done
"#;

async fn console_says(node: &Node, what: &str, within: Duration) -> String {
    let since = std::time::Instant::now();
    loop {
        let console = std::fs::read_to_string(&node.console_log).unwrap_or_default();
        if console.contains(what) || since.elapsed() > within {
            return console;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn booted(rx: &mut mpsc::Receiver<Event>, within: Duration) -> Node {
    let since = std::time::Instant::now();
    loop {
        let left = within.checked_sub(since.elapsed()).expect("a node boots in time");
        match tokio::time::timeout(left, rx.recv()).await.expect("a node boots in time") {
            Some(Event::Booted(n)) => return n,
            Some(Event::Stopped { why, .. }) => eprintln!("a node stopped: {why}"),
            Some(_) => {}
            None => panic!("the cluster ended before a node booted"),
        }
    }
}

fn expected_big(ip: &str) -> Vec<u8> {
    let line = format!("written by {ip}\n");
    line.as_bytes().iter().copied().cycle().take(4 << 20).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_share_the_buyer_s_directory_and_it_outlives_them() {
    let dir = tempfile::tempdir().unwrap();
    let Some(iso) = cpushare_sandbox::vm::testing::livecd_with(dir.path(), "share", PAYLOAD, &["--share", "data"]) else { return };
    let Some(other_iso) = cpushare_sandbox::vm::testing::livecd_with(dir.path(), "other", PAYLOAD, &["--share", "data", "--share", "other"]) else { return };
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("not root: the first cluster's buyer is on its network through the userspace stack too");
    }
    let mut tb = Testbed::start(&dir.path().join("tb"), 3).await.unwrap();
    // Cheapest first: the first cluster takes s1 and s2, its replacement s3; the other cluster s4.
    for (name, price) in [("s1", 1000), ("s2", 2000), ("s3", 3000), ("s4", 4000)] {
        tb.seller(name, 1, price, |c| c.ram_per_slot_mib = 512).await.unwrap();
    }
    let buyer = tb.member("buyer", 1_000_000).await.unwrap();
    let shared = dir.path().join("shared");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let tap = root.then(|| format!("cpsh{}", std::process::id() % 100_000));
    let logs = dir.path().join("logs");
    let spec = ClusterSpec {
        iso,
        nodes: 2,
        max_price: 3500,
        ram_mib: 256,
        scratch_mib: 0,
        kvm_only: false,
        logs: logs.clone(),
        replace: true,
        network: true,
        tap,
        socks: None,
        shares: vec![ShareSpec { dir: shared.clone(), name: "data".into() }],
    };
    let conn = buyer.connect().await.unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let running = tokio::spawn(run_cluster(conn.clone(), spec, tx, Arc::new(())));
    let (a, b) = (booted(&mut rx, Duration::from_secs(120)).await, booted(&mut rx, Duration::from_secs(120)).await);
    // Each writes its file and reads the other's, through the buyer's share.
    for (me, other) in [(&a, &b), (&b, &a)] {
        let console = console_says(me, &format!("read {}'s file", other.ip), Duration::from_secs(180)).await;
        assert!(console.contains("mounted data"), "{console}");
        assert!(console.contains(&format!("synced {}", me.ip)), "{console}");
        assert!(console.contains(&format!("read {}'s file: intact", other.ip)), "{console}");
        assert!(console.contains("wrote through the link into its own /etc"), "{console}");
    }
    // As root the share listens on the buyer's interface, at its address:
    // this host's own processes are not let in (only the cluster's nodes).
    if root {
        let url = "nfs://10.77.0.1/data?version=3&nfsport=2049&mountport=2049";
        match std::process::Command::new("nfs-ls").arg(url).output() {
            Ok(out) => assert!(!out.status.success() && out.stdout.is_empty(), "a local process listed the share: {}", String::from_utf8_lossy(&out.stdout)),
            Err(e) => assert!(std::env::var("CI").as_deref() != Ok("true"), "nfs-ls (libnfs-utils) is needed under CI: {e}"),
        }
    }
    // One node's seller dies; what the node synced is on the buyer's disk.
    let lost = if a.seller_node < b.seller_node { a.clone() } else { b.clone() };
    let at = tb.sellers.iter().position(|s| s.node.node == lost.seller_node).unwrap();
    tb.sellers.remove(at).kill();
    assert_eq!(std::fs::read(shared.join(format!("big-{}.txt", lost.ip))).unwrap(), expected_big(&lost.ip));
    // What it was writing when it went: the lines it had sent, in order (the
    // last one cut only if the kill fell between the pages of one write).
    let log = std::fs::read_to_string(shared.join(format!("log-{}.txt", lost.ip))).unwrap();
    let lines: Vec<&str> = log.split_inclusive('\n').collect();
    assert!(lines.len() > 1, "{log:?}");
    for (i, l) in lines.iter().enumerate() {
        let want = format!("line {} from {}\n", i + 1, lost.ip);
        assert!(*l == want || (i == lines.len() - 1 && want.starts_with(l)), "line {}: {l:?}", i + 1);
    }
    // Its replacement mounts the same share and reads it.
    let replacement = booted(&mut rx, Duration::from_secs(120)).await;
    let console = console_says(&replacement, &format!("read {}'s file", lost.ip), Duration::from_secs(180)).await;
    assert!(console.contains(&format!("read {}'s file: intact", lost.ip)), "the replacement reads the lost node's file:\n{console}");

    // Another cluster of the same buyer, on a network of its own: its node
    // mounts its own buyer's share, never the first cluster's.
    let other_spec = ClusterSpec {
        iso: other_iso,
        nodes: 1,
        max_price: 5000,
        ram_mib: 256,
        scratch_mib: 0,
        kvm_only: false,
        logs: dir.path().join("other-logs"),
        replace: false,
        network: true,
        tap: None,
        socks: None,
        shares: vec![ShareSpec { dir: elsewhere.clone(), name: "other".into() }],
    };
    let (tx2, mut rx2) = mpsc::channel(64);
    let running2 = tokio::spawn(run_cluster(conn.clone(), other_spec, tx2, Arc::new(())));
    let stranger = booted(&mut rx2, Duration::from_secs(120)).await;
    let console = console_says(&stranger, "wrote other", Duration::from_secs(120)).await;
    assert!(console.contains("cpushare-livecd: share data not mounted"), "the other cluster's node cannot mount the first one's share:\n{console}");
    assert!(console.contains("no data share") && console.contains("wrote other"), "{console}");
    assert_eq!(std::fs::read_to_string(elsewhere.join(format!("from-{}.txt", stranger.ip))).unwrap(), format!("written by {} in the other cluster\n", stranger.ip));
    assert!(!shared.join(format!("from-{}.txt", stranger.ip)).exists());

    // The guests' symlinks are in the share as symlinks; nothing went through them here.
    for ip in [&a.ip, &b.ip] {
        let link = shared.join(format!("etc-{ip}"));
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/etc"), "the guest's symlink, as it made it");
        assert!(!Path::new(&format!("/etc/cpushare-escape-{ip}")).exists(), "a guest wrote into the buyer's /etc");
    }
    let mut files: Vec<String> = std::fs::read_dir(&shared).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    let mut want: Vec<String> = [&a.ip, &b.ip, &replacement.ip].iter().flat_map(|ip| [format!("big-{ip}.txt"), format!("etc-{ip}"), format!("log-{ip}.txt")]).collect();
    want.sort();
    assert_eq!(files, want, "nothing but what the nodes made");

    // Both clusters end with their orders.
    let mut ex = conn.exchange.clone();
    for o in ex.list_orders(cpushare_proto::v1::ListOrdersRequest {}).await.unwrap().into_inner().orders {
        let _ = ex.cancel_order(cpushare_proto::v1::CancelOrderRequest { order: o.id }).await;
    }
    for (r, events) in [(running, rx), (running2, rx2)] {
        drop(events);
        tokio::time::timeout(Duration::from_secs(60), r).await.expect("a cluster ends with its order").unwrap().unwrap();
    }
    let mut ops = tb.operator.clone();
    let audit = ops.admin.audit(cpushare_proto::v1::AuditRequest {}).await.unwrap().into_inner();
    assert!(audit.ok, "{}", audit.problem);
}
