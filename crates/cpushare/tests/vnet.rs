//! The virtual network for real, as root: a buyer and three sellers in
//! network namespaces on one switch, the third seller behind a firewall that
//! drops UDP it did not ask for. Each seller's "VM" is a tap in a namespace
//! of its own joined to the seller's node through a unix datagram socket, as
//! QEMU's `-netdev dgram` is; the buyer has `cpushare0`. Unmodified ping and
//! iperf3 run across; the nodes' counters say which way traffic went.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lab::{can_build, sh, Lab};
use common::BIN;

/// What a node's stats file says.
fn node_stats(lab: &Lab, node: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(lab.dir.path().join(format!("{node}.json"))).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// Waits until `f` holds (at most `secs`).
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn a_cluster_network_across_namespaces_switches_relays_and_keeps_strangers_out() {
    if !can_build(&["ping", "iperf3", "nft", "curl", "busybox"]) {
        return;
    }
    let mut lab = Lab::new("v", "10.210.0");
    // The buyer at .1, sellers at .2-.4, an outsider at .9.
    for (name, host) in [("b", 1), ("s1", 2), ("s2", 3), ("s3", 4), ("x", 9)] {
        lab.plug(name, host);
    }
    // The third seller takes only replies to what it sent.
    let nft = "table inet fw { chain input { type filter hook input priority 0; policy accept; ct state established,related accept; meta l4proto udp drop; }; }";
    assert!(lab.exec("s3", &["nft", nft]).status.success());
    let dir = lab.dir.path().to_path_buf();
    let cfg = dir.join("cfg");
    sh(&[BIN, "vnet", "plan", "--dir", cfg.to_str().unwrap(), "--endpoints", "10.210.0.1:51820,10.210.0.2:51820,10.210.0.3:51820,10.210.0.4:51820", "--closed", "4"]);
    let conf = |n: u32| cfg.join(format!("node-{n}.json")).to_str().unwrap().to_string();
    let stats = |n: &str| dir.join(format!("{n}.json")).to_str().unwrap().to_string();
    // The buyer: cpushare0, and a SOCKS5 proxy on a userspace stack at .5 (what a buyer without CAP_NET_ADMIN gets).
    let (b_node, b_stack) = (dir.join("b-node.sock"), dir.join("b-stack.sock"));
    let b_port = format!("{}:{}", b_node.display(), b_stack.display());
    lab.spawn("b", &[BIN, "vnet", "node", "--config", &conf(1), "--tap", "cpushare0", "--address", "10.77.0.1/16", "--port", &b_port, "--stats", &stats("b")]);
    lab.spawn("b", &[BIN, "vnet", "socks", "--listen", "127.0.0.1:1080", "--address", "10.77.0.5/16", "--mac", "52:54:00:77:00:05", "--vm", b_stack.to_str().unwrap(), "--node", b_node.to_str().unwrap()]);
    for (i, s) in ["s1", "s2", "s3"].iter().enumerate() {
        let (ours, vm) = (dir.join(format!("{s}-node.sock")), dir.join(format!("{s}-vm.sock")));
        let port = format!("{}:{}", ours.display(), vm.display());
        lab.spawn(s, &[BIN, "vnet", "node", "--config", &conf(i as u32 + 2), "--port", &port, "--stats", &stats(s)]);
        // The seller's VM: a namespace of its own behind the seller's socket.
        let v = format!("v{}", i + 1);
        lab.add_ns(&v);
        let (addr, mac) = (format!("10.77.0.{}/16", 11 + i), format!("52:54:00:77:00:{:02x}", 11 + i));
        lab.spawn(&v, &[BIN, "vnet", "bridge", "--tap", "eth0", "--address", &addr, "--mac", &mac, "--vm", vm.to_str().unwrap(), "--node", ours.to_str().unwrap()]);
    }

    // Everyone reaches everyone: VMs to VMs, VMs to the buyer's cpushare0, and back.
    for (from, to) in [("v1", "10.77.0.12"), ("v1", "10.77.0.13"), ("v2", "10.77.0.13"), ("v3", "10.77.0.11"), ("v1", "10.77.0.1"), ("v3", "10.77.0.1"), ("b", "10.77.0.13")] {
        assert!(eventually(20, || lab.ping(from, to)), "{from} cannot reach {to}; logs in {}", dir.display());
    }
    // Unmodified iperf3 across the cluster, VM to VM and buyer to the closed seller's VM.
    for (server, addr, client) in [("v2", "10.77.0.12", "v1"), ("v3", "10.77.0.13", "b")] {
        lab.spawn(server, &["iperf3", "-s", "-1"]);
        std::thread::sleep(Duration::from_millis(500));
        let out = lab.exec(client, &["iperf3", "-c", addr, "-t", "2", "-J"]);
        assert!(out.status.success(), "iperf3 to {addr}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap();
        assert!(bps > 1e6, "iperf3 to {addr}: {bps} bit/s");
    }

    // Through the SOCKS5 proxy, unmodified curl fetches 4 MiB from a web
    // server on the closed seller's VM (relayed); the stack answers ping.
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let blob: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(www.join("blob"), &blob).unwrap();
    lab.spawn("v3", &["busybox", "httpd", "-f", "-p", "8080", "-h", www.to_str().unwrap()]);
    assert!(eventually(20, || lab.ping("v3", "10.77.0.5")), "the buyer's stack answers ping");
    let fetched = dir.join("fetched");
    let curl = |url: &str| lab.exec("b", &["curl", "-sS", "--max-time", "30", "--socks5", "127.0.0.1:1080", url, "-o", fetched.to_str().unwrap()]);
    let out = curl("http://10.77.0.13:8080/blob");
    assert!(out.status.success(), "curl through the proxy: {}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&fetched).unwrap() == blob, "what came through the proxy is what the VM served");
    // Outside the cluster, and a port nobody listens on: refused, clearly.
    // (curl prints the proxy's reply code: 2 not allowed, 5 connection refused.)
    let out = curl("http://10.210.0.2:8080/");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("(2)"), "the proxy goes nowhere but the cluster: {}", String::from_utf8_lossy(&out.stderr));
    let out = curl("http://10.77.0.13:8081/");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("(5)"), "a closed port is refused: {}", String::from_utf8_lossy(&out.stderr));

    // Which way it went: s1 and s2 directly; anything to s3 through the buyer.
    assert!(eventually(3, || node_stats(&lab, "s1")["peers"]["4"]["tx_relayed"].as_u64().unwrap_or(0) > 0));
    let s1 = node_stats(&lab, "s1");
    let to_s2 = &s1["peers"]["3"];
    assert!(to_s2["tx_direct"].as_u64().unwrap() > 100 && to_s2["tx_relayed"].as_u64().unwrap() == 0, "s1 to s2 goes direct: {s1}");
    let to_s3 = &s1["peers"]["4"];
    assert!(to_s3["tx_relayed"].as_u64().unwrap() > 0 && to_s3["tx_direct"].as_u64().unwrap() == 0, "s1 to s3 goes through the buyer: {s1}");
    assert_eq!(to_s3["path"], "relayed");
    let b = node_stats(&lab, "b");
    assert!(b["relayed_for_others"].as_u64().unwrap() > 0, "the buyer relayed: {b}");

    // An outsider on the same switch, with its own cluster whose member list
    // names s1's real key and address: its handshakes fail, nothing crosses.
    let other = dir.join("other");
    sh(&[BIN, "vnet", "plan", "--dir", other.to_str().unwrap(), "--endpoints", "10.210.0.9:51820,10.210.0.2:51820"]);
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(conf(2)).unwrap()).unwrap();
    let mut theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(other.join("node-1.json")).unwrap()).unwrap();
    theirs["members"][1]["public"] = ours["public"].clone();
    std::fs::write(other.join("node-1.json"), theirs.to_string()).unwrap();
    let before = node_stats(&lab, "s1")["dropped_strangers"].as_u64().unwrap();
    lab.spawn("x", &[BIN, "vnet", "node", "--config", other.join("node-1.json").to_str().unwrap(), "--tap", "cpushare0", "--address", "10.77.0.99/16"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(!lab.ping("x", "10.77.0.11"), "the outsider reached a VM");
    assert!(eventually(3, || node_stats(&lab, "s1")["dropped_strangers"].as_u64().unwrap() > before), "s1 refused the outsider's handshakes");

    // A real datagram from s1 to s2, caught on s2's wire, sent again as it was
    // (a replay) and with one bit of its header flipped (tampering): both
    // dropped, and counted.
    let s2 = lab.ns("s2");
    let before = node_stats(&lab, "s2");
    let pinger = Command::new("ip").args(["netns", "exec", &lab.ns("v1"), "ping", "-c", "20", "-i", "0.1", "10.77.0.12"]).stdout(Stdio::null()).spawn().unwrap();
    let caught = in_namespace(&s2, || catch_data_datagram([10, 210, 0, 2], 51820));
    let sock = in_namespace(&s2, || std::net::UdpSocket::bind("10.210.0.3:0").unwrap());
    sock.send_to(&caught, "10.210.0.3:51820").unwrap();
    // Tampered: a counter never seen (so not a replay) that the tag does not cover.
    let mut tampered = caught.clone();
    tampered[15] ^= 0x40;
    sock.send_to(&tampered, "10.210.0.3:51820").unwrap();
    let field = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    assert!(
        eventually(3, || {
            let now = node_stats(&lab, "s2");
            field(&now, "dropped_replayed") > field(&before, "dropped_replayed") && field(&now, "dropped_unauthenticated") > field(&before, "dropped_unauthenticated")
        }),
        "s2 dropped both: {}",
        node_stats(&lab, "s2")
    );
    let mut pinger = pinger;
    let _ = pinger.wait();
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            // SAFETY: setns(2) moves only this thread into the namespace.
            assert_eq!(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {ns}");
            f()
        })
        .join()
        .unwrap()
    })
}

/// The UDP payload of the next data datagram (type 4) from `src` to `port`
/// seen on this namespace's interfaces.
fn catch_data_datagram(src: [u8; 4], port: u16) -> Vec<u8> {
    // SAFETY: a packet socket, read into a local buffer.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, (libc::ETH_P_IP as u16).to_be() as i32);
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval { tv_sec: 10, tv_usec: 0 };
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32);
        let mut buf = vec![0u8; 65536];
        loop {
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            assert!(n > 0, "no datagram from {src:?} within 10 s");
            let p = &buf[..n as usize];
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            if p[9] != 17 || p[12..16] != src || p.len() < ihl + 8 {
                continue;
            }
            let udp = &p[ihl..];
            if u16::from_be_bytes([udp[2], udp[3]]) == port && udp.get(8) == Some(&4) {
                libc::close(fd);
                return udp[8..].to_vec();
            }
        }
    }
}
