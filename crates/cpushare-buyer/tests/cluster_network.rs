//! A cluster's private network with real VMs: two livecd nodes on two local
//! sellers under software emulation get their addresses by DHCP from their
//! sellers' network nodes and ping each other and the buyer; the buyer
//! fetches a page from each node's web server, over its own interface
//! (`cpushare0`, as root) or, with none (no CAP_NET_ADMIN needed), through
//! its SOCKS5 proxy; the counters show the frames crossing.

use std::sync::Arc;
use std::time::Duration;

use cpushare_buyer::cluster::{run_cluster, ClusterSpec, Event, Node};
use cpushare_seller::testbed::Testbed;
use tokio::sync::mpsc;

/// Each node pings every other member (ids 1..=3: the buyer, then the two
/// nodes) until it answers or a minute passes, then stays up a while so that
/// the other node can reach it too.
const PAYLOAD: &str = r#"#!/bin/sh
me=$(ifconfig eth0 | sed -n 's/.*inet addr:\([0-9.]*\).*/\1/p')
echo "node at $me"
echo "served by $me" >/payload/hello
httpd -p 80 -h /payload
for peer in 10.77.0.1 10.77.0.2 10.77.0.3; do
    [ "$peer" = "$me" ] && continue
    n=0
    until ping -c 1 -W 1 $peer >/dev/null 2>&1; do
        n=$((n+1))
        [ $n -ge 60 ] && break
    done
    if [ $n -lt 60 ]; then echo "reached $peer"; else echo "could not reach $peer"; fi
done
echo "pings done"
sleep 20
"#;

/// How the buyer's host is on the cluster's network.
#[derive(Clone, Copy)]
enum BuyerEnd {
    /// An interface of its own, named for this test.
    Tap,
    /// A SOCKS5 proxy at this address.
    Socks(std::net::SocketAddr),
}

/// GET /hello from `ip`:80 over the buyer's end of the network.
fn fetch(end: BuyerEnd, ip: std::net::Ipv4Addr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = match end {
        BuyerEnd::Tap => std::net::TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(20))?,
        BuyerEnd::Socks(proxy) => socks_connect(proxy, ip)?,
    };
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET /hello HTTP/1.0\r\n\r\n")?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    Ok(page)
}

/// A connection to `ip`:80 through the SOCKS5 proxy at `proxy`, as any
/// SOCKS client makes it (RFC 1928, no authentication, CONNECT to IPv4).
fn socks_connect(proxy: std::net::SocketAddr, ip: std::net::Ipv4Addr) -> std::io::Result<std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(&[5, 1, 0])?;
    let mut chose = [0u8; 2];
    s.read_exact(&mut chose)?;
    assert_eq!(chose, [5, 0], "no authentication");
    let mut connect = vec![5, 1, 0, 1];
    connect.extend_from_slice(&ip.octets());
    connect.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&connect)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply)?;
    assert_eq!(reply[1], 0, "the proxy connected to {ip}: {reply:?}");
    Ok(s)
}

/// The two tests take turns: four software-emulated guests at once on a
/// small machine would test its patience, not the network.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_vms_reach_each_other_and_the_buyer_s_cpushare0() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "the buyer's interface needs root under CI");
        eprintln!("skipped: the buyer's interface needs CAP_NET_ADMIN (run as root)");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().await;
    two_vms_on_a_cluster_network(BuyerEnd::Tap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_vms_reach_each_other_and_the_buyer_s_socks_proxy() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // On a port free a moment ago.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    two_vms_on_a_cluster_network(BuyerEnd::Socks(proxy)).await;
}

async fn two_vms_on_a_cluster_network(end: BuyerEnd) {
    let dir = tempfile::tempdir().unwrap();
    let Some(iso) = cpushare_sandbox::vm::testing::livecd(dir.path(), "net", PAYLOAD) else { return };
    let mut tb = Testbed::start(&dir.path().join("tb"), 5).await.unwrap();
    for (name, price) in [("s1", 1000), ("s2", 2000)] {
        tb.seller(name, 1, price, |c| c.ram_per_slot_mib = 512).await.unwrap();
    }
    // The sellers proved at start that UDP reaches them unasked, so their slots say so.
    for s in &tb.sellers {
        let orders = s.node.connect().await.unwrap().exchange.clone().list_orders(cpushare_proto::v1::ListOrdersRequest {}).await.unwrap().into_inner().orders;
        assert!(orders.iter().all(|o| o.slot.as_ref().is_some_and(|a| a.inbound_udp)), "{orders:?}");
    }
    let buyer = tb.member("buyer", 1_000_000).await.unwrap();
    let (tap, socks) = match end {
        BuyerEnd::Tap => (Some(format!("cpst{}", std::process::id() % 100_000)), None),
        BuyerEnd::Socks(at) => (None, Some(at)),
    };
    let logs = dir.path().join("logs");
    let spec = ClusterSpec { iso, nodes: 2, max_price: 4000, ram_mib: 256, scratch_mib: 0, kvm_only: false, logs: logs.clone(), replace: false, network: true, tap, socks, shares: vec![] };
    let (tx, mut rx) = mpsc::channel(64);
    let running = tokio::spawn(run_cluster(buyer.connect().await.unwrap(), spec, tx, Arc::new(())));
    let mut nodes: Vec<Node> = Vec::new();
    let mut stopped = Vec::new();
    let consoles = |nodes: &[Node]| nodes.iter().map(|n| std::fs::read_to_string(&n.console_log).unwrap_or_default()).collect::<Vec<_>>();
    let mut pages = Vec::new();
    let since = std::time::Instant::now();
    loop {
        // While both nodes are up, after their pings: a page from each.
        let up = consoles(&nodes);
        if pages.is_empty() && nodes.len() == 2 && up.iter().all(|c| c.contains("pings done")) {
            for n in &nodes {
                let ip = n.ip.parse().unwrap();
                pages.push(tokio::task::spawn_blocking(move || fetch(end, ip)).await.unwrap().unwrap_or_else(|e| panic!("fetching from {ip}: {e}")));
            }
        }
        assert!(since.elapsed() < Duration::from_secs(300), "the cluster did not end in 300 s; consoles:\n{}", up.join("\n---\n"));
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Err(_) => {}
            Ok(Some(Event::Booted(n))) => nodes.push(n),
            Ok(Some(Event::Stopped { why, .. })) => stopped.push(why),
            Ok(Some(_)) => {}
            Ok(None) => break,
        }
    }
    running.await.unwrap().unwrap();
    assert_eq!(nodes.len(), 2, "{stopped:?}");
    let consoles = consoles(&nodes);
    let mut ips: Vec<&str> = nodes.iter().map(|n| n.ip.as_str()).collect();
    ips.sort();
    assert_eq!(ips, ["10.77.0.2", "10.77.0.3"], "the sellers' members after the buyer's");
    for (node, console) in nodes.iter().zip(&consoles) {
        // Its DHCP client took the address the exchange gave its member.
        assert!(console.contains(&format!("cpushare-livecd: network eth0 {}", node.ip)), "{console}");
        assert!(console.contains("pings done"), "{console}");
        let other = ips.iter().find(|ip| **ip != node.ip).unwrap();
        assert!(console.contains(&format!("reached {other}")), "node {} reaches node {other}:\n{console}", node.ip);
        assert!(console.contains("reached 10.77.0.1"), "the buyer's end answers ping:\n{console}");
    }
    assert_eq!(pages.len(), 2, "both pages fetched while the nodes were up");
    for (node, page) in nodes.iter().zip(&pages) {
        assert!(page.starts_with("HTTP/1.") && page.ends_with(&format!("served by {}\n", node.ip)), "{page}");
    }
    // The buyer's counters: what it carried, to peers that have left since.
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(logs.join("network.json")).expect("the buyer's network counters")).unwrap();
    for peer in ["2", "3"] {
        let c = &stats["peers"][peer];
        assert_eq!(c["path"], "direct", "both sellers take inbound UDP: {stats}");
        assert!(c["left"] == true && c["frames_in"].as_u64().unwrap() > 0 && c["frames_out"].as_u64().unwrap() > 0, "{stats}");
    }
}
