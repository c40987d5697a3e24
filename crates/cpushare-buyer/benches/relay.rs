//! Work through the exchange relay, end to end: an exchange, three sellers and
//! a buyer on localhost, every fragment run in a real jail. Prints fragments per
//! second for small fragments and megabytes per second for large ones.
//! See BENCHMARKS.md for results.
//!
//! CPUSHARE_BENCH_FRAGMENTS (default 20000) and CPUSHARE_BENCH_MIB (default 1024)
//! set the sizes.

use std::sync::Arc;
use std::time::Instant;

use cpushare_buyer::{run, Fragment, Job};
use cpushare_proto::v1 as pb;
use cpushare_sandbox::test_guests;
use cpushare_seller::testbed::Testbed;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `stream`: the upper-casing stream-mode guest, one jail per lease; otherwise
/// `cat`, one jail per fragment.
fn job(fragments: Vec<Fragment>, stream: bool) -> Job {
    let (program, name) = if stream { (test_guests::STREAM, "stream") } else { (test_guests::CAT, "cat") };
    Job {
        program: program.to_vec(),
        args: vec![name.into()],
        fragments,
        cpus: 3,
        max_price: 4000,
        requirements: pb::Requirements { kind: pb::SandboxKind::SeccompStrict as i32, ..Default::default() },
        replicas: 1,
        stream,
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; a filter argument is ignored.
    let small = env("CPUSHARE_BENCH_FRAGMENTS", 20_000);
    let mib = env("CPUSHARE_BENCH_MIB", 1024);
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::start(&dir.path().join("tb"), 10).await.unwrap();
    for name in ["s1", "s2", "s3"] {
        tb.seller(name, 1, 3600, |c| c.ram_per_slot_mib = 1024).await.unwrap();
    }
    let buyer = tb.member("buyer", 10_000_000).await.unwrap();

    for stream in [true, false] {
        let fragments = (0..small).map(|i| Fragment { name: format!("f{i}"), input: format!("fragment {i}").into_bytes().into() }).collect();
        let started = Instant::now();
        let report = run(buyer.connect().await.unwrap(), job(fragments, stream), Arc::new(())).await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        let expect = |i: usize| if stream { format!("FRAGMENT {i}") } else { format!("fragment {i}") };
        assert!(report.results.iter().enumerate().all(|(i, r)| r.success && r.output == expect(i).as_bytes()));
        println!(
            "small fragments, {}: {small} through the relay in {secs:.2} s = {:.0} fragments/s (per seller node: {:?})",
            if stream { "stream mode (one jail per lease)" } else { "one jail per fragment" },
            small as f64 / secs,
            report.per_seller
        );
    }

    // Large fragments of 64 MiB each; each byte crosses the relay twice (in and back).
    let each = 64usize << 20;
    // A whole number of rounds over the three sellers.
    let count = (mib << 20).div_ceil(each).div_ceil(3) * 3;
    let fragments = (0..count).map(|i| Fragment { name: format!("big{i}"), input: vec![i as u8; each].into() }).collect();
    // Each output is checked as it is settled and then let go, as `cpushare
    // run` writes each to its file: the buyer's memory holds the outputs in
    // flight, not all of them (so does the peer's).
    let checked = Arc::new(Checked(each, std::sync::atomic::AtomicUsize::new(0)));
    let started = Instant::now();
    let report = run(buyer.connect().await.unwrap(), job(fragments, false), checked.clone()).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(report.results.iter().all(|r| r.success));
    assert_eq!(checked.1.load(std::sync::atomic::Ordering::Relaxed), count, "every output was checked");
    let bytes = (count * each * 2) as f64;
    println!(
        "large fragments: {count} x 64 MiB in and out in {secs:.2} s = {:.0} MB/s through the relay ({:.0} MB/s each way)",
        bytes / secs / 1e6,
        bytes / 2.0 / secs / 1e6
    );
    tb.exchange.listening.shutdown().await;

    // The peer: the same bytes, in and back, over one plain loopback TCP
    // connection echoing them (no TLS, no exchange in the middle, no jail):
    // the ceiling any relay on this machine works under.
    let total = count * each;
    let started = Instant::now();
    loopback_echo(total).await;
    let secs = started.elapsed().as_secs_f64();
    println!("peer, plain loopback TCP echo of the same {} MiB: {:.0} MB/s in and out", total >> 20, (total * 2) as f64 / secs / 1e6);
}

/// Checks each large output (its size, and its last byte: the fragment's
/// number) as it is settled, counts it, and lets it go.
struct Checked(usize, std::sync::atomic::AtomicUsize);

impl cpushare_buyer::Progress for Checked {
    fn settled(&self, r: &cpushare_buyer::FragmentResult) -> bool {
        let i: usize = r.name.strip_prefix("big").unwrap().parse().unwrap();
        assert!(r.success && r.output.len() == self.0 && r.output[self.0 - 1] == i as u8, "{}", r.name);
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

/// Sends `total` bytes over loopback TCP to an echo task and reads them back.
async fn loopback_echo(total: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
    });
    let (mut r, mut w) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        let block = vec![7u8; 1 << 20];
        for _ in 0..total >> 20 {
            w.write_all(&block).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < total >> 20 << 20 {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    writer.await.unwrap();
    echo.await.unwrap();
}
