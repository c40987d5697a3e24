//! VM clusters end to end: an exchange, a seller and a buyer on localhost, the
//! test livecd (`scripts/make-live-iso`) under software emulation. Measures
//!
//! - a large image's transfer through the exchange relay (the livecd padded
//!   to CPUSHARE_BENCH_IMAGE_MIB, default 1024), and an interrupted upload's
//!   resumption (what it sends against what was missing);
//! - `cluster start` to guest userspace with the image cached on the seller,
//!   against plain `qemu-system-x86_64 -kernel -initrd` booting the same
//!   kernel, initrd and command line, interleaved in the same run
//!   (CPUSHARE_BENCH_BOOTS rounds, default 5).
//!
//! See BENCHMARKS.md for results.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpushare_buyer::cluster::{run_cluster, ClusterSpec, Event, Node};
use cpushare_exchange::client::Connection;
use cpushare_proto::v1 as pb;
use cpushare_sandbox::vm::testing::padded;
use cpushare_seller::testbed::Testbed;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn spec(iso: &Path, logs: &Path) -> ClusterSpec {
    ClusterSpec { iso: iso.into(), nodes: 1, max_price: 4000, ram_mib: 256, scratch_mib: 0, kvm_only: false, logs: logs.into(), replace: false, network: false, tap: None, socks: None, shares: vec![] }
}

/// Starts a one-node cluster; returns its events and the task.
fn start(conn: &Connection, spec: ClusterSpec) -> (mpsc::Receiver<Event>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let (tx, rx) = mpsc::channel(256);
    (rx, tokio::spawn(run_cluster(conn.clone(), spec, tx, Arc::new(()))))
}

/// Runs a one-node cluster of a livecd that powers off by itself, to its end;
/// returns the node and when its console first said the guest was up.
async fn run_to_end(conn: &Connection, iso: &Path, logs: &Path) -> (Node, Duration) {
    let t = Instant::now();
    let (mut rx, task) = start(conn, spec(iso, logs));
    let mut node = None;
    let mut up = None;
    while let Some(e) = rx.recv().await {
        if let Event::Booted(n) = e {
            node = Some(n);
        }
        // The console log fills as the guest writes; poll it for the line.
        if let (Some(n), None) = (&node, up) {
            wait_for_line(&n.console_log, "cpushare-livecd: up").await;
            up = Some(t.elapsed());
        }
    }
    task.await.unwrap().unwrap();
    (node.expect("the node booted"), up.expect("the guest came up"))
}

/// Waits until `log` holds `line` (polling every 5 ms).
async fn wait_for_line(log: &Path, line: &str) {
    let t = Instant::now();
    loop {
        if std::fs::read_to_string(log).is_ok_and(|s| s.contains(line)) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no {line:?} in {}", log.display());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The peer for boots: QEMU told the kernel, initrd and command line directly.
async fn plain_qemu(kernel: &Path, initrd: &Path, cmdline: &str) -> Duration {
    let t = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        // The machine the runner boots TCG guests on.
        .args(["-M", "pc", "-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("cpushare-livecd: up") {
            let took = t.elapsed();
            let _ = child.kill().await;
            return took;
        }
    }
    panic!("plain qemu: the guest never came up");
}

/// The peer for the transfer: the same file over plain loopback TCP into a
/// new file (no TLS, no relay, no hashing), what this machine does at best.
fn plain_tcp_copy(from: &Path, to: &Path) -> Duration {
    // std::io::copy: sendfile from the file, splice into the other.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let to = to.to_path_buf();
    let receiver = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut file = std::fs::File::create(&to).unwrap();
        std::io::copy(&mut sock, &mut file).unwrap();
    });
    let t = Instant::now();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    std::io::copy(&mut std::fs::File::open(from).unwrap(), &mut sock).unwrap();
    drop(sock);
    receiver.join().unwrap();
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let image_mib = env("CPUSHARE_BENCH_IMAGE_MIB", 1024);
    let boots = env("CPUSHARE_BENCH_BOOTS", 5);
    let dir = tempfile::tempdir().unwrap();
    let Some(iso) = cpushare_sandbox::vm::testing::livecd(dir.path(), "live", "#!/bin/sh\n") else {
        println!("skipped: scripts/make-live-iso failed (QEMU and the ISO tools are installed by scripts/test)");
        return;
    };
    let mut tb = Testbed::start(&dir.path().join("tb"), 10).await.unwrap();
    tb.seller("s1", 1, 1000, |c| c.ram_per_slot_mib = 512).await.unwrap();
    let buyer = tb.member("buyer", 10_000_000).await.unwrap();
    let conn = buyer.connect().await.unwrap();

    // A large image, sent once.
    let big = padded(&iso, image_mib, 1, dir.path());
    let (node, _) = run_to_end(&conn, &big, &dir.path().join("big")).await;
    let mb = node.uploaded as f64 / 1e6;
    let peer = plain_tcp_copy(&big, &dir.path().join("tcp-copy"));
    let _ = std::fs::remove_file(dir.path().join("tcp-copy"));
    println!(
        "image transfer through the relay: {mb:.0} MB in {:.2} s = {:.0} MB/s (sent by the buyer, written by the seller; peer: plain loopback TCP file copy {:.0} MB/s)",
        node.upload_time.as_secs_f64(),
        mb / node.upload_time.as_secs_f64(),
        mb / peer.as_secs_f64()
    );

    // An upload interrupted at about 40 %, then started again.
    let other = padded(&iso, image_mib, 2, dir.path());
    let size = std::fs::metadata(&other).unwrap().len();
    let (mut rx, task) = start(&conn, spec(&other, &dir.path().join("cut")));
    let mut order = 0;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Placed { order: o } => order = o,
            Event::Uploading { sent, .. } if sent >= size * 2 / 5 => break,
            _ => {}
        }
    }
    task.abort();
    conn.exchange.clone().cancel_order(pb::CancelOrderRequest { order }).await.unwrap();
    // The seller lets the lease go before the next one can have its slot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let part = std::fs::read_dir(dir.path().join("tb/cache/s1/images"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .map(|e| e.metadata().unwrap().len())
        .expect("the interrupted upload left its part");
    let (resumed, _) = run_to_end(&conn, &other, &dir.path().join("resumed")).await;
    println!(
        "resumed upload: {} MB had arrived of {} MB; the second start sent {} MB (missing: {} MB)",
        part / 1_000_000,
        size / 1_000_000,
        resumed.uploaded / 1_000_000,
        (size - part) / 1_000_000
    );
    assert_eq!(resumed.uploaded, size - part, "a resumed upload sends exactly what was missing");

    // Boots with the image cached, against plain QEMU.
    let d = cpushare_sandbox::vm::boot::direct_boot(&iso).unwrap();
    let (kernel, initrd) = (dir.path().join("k"), dir.path().join("i"));
    std::fs::write(&kernel, &d.kernel).unwrap();
    std::fs::write(&initrd, d.initrd.as_ref().unwrap()).unwrap();
    run_to_end(&conn, &iso, &dir.path().join("warm")).await; // the image reaches the seller once
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    for round in 0..boots {
        let (node, up) = run_to_end(&conn, &iso, &dir.path().join(format!("boot{round}"))).await;
        assert_eq!(node.uploaded, 0);
        ours.push(up);
        plain.push(plain_qemu(&kernel, &initrd, &d.cmdline).await);
    }
    let (ours, plain) = (median(ours), median(plain));
    println!(
        "cluster start to guest userspace, image cached, TCG, median of {boots}: {:.2} s; plain qemu -kernel {:.2} s (ratio {:.2})",
        ours.as_secs_f64(),
        plain.as_secs_f64(),
        ours.as_secs_f64() / plain.as_secs_f64()
    );
}
