//! The whole path on one machine: an exchange, sellers and a buyer over mutual
//! TLS, programs running in real jails.

use std::sync::Arc;
use std::time::Duration;

use cpushare_buyer::{run, run_unmodified, Fragment, Job, Unmodified};
use cpushare_sandbox::emulate::Mount;
use cpushare_proto::v1 as pb;
use cpushare_sandbox::examples;
use cpushare_seller::testbed::Testbed;

fn requirements() -> pb::Requirements {
    pb::Requirements { kind: pb::SandboxKind::SeccompStrict as i32, ..Default::default() }
}

fn tiles(n: usize) -> Vec<Fragment> {
    tiles_of(n, 200)
}

/// Tiles of `iterations` per point: more makes each fragment take longer.
fn tiles_of(n: usize, iterations: u32) -> Vec<Fragment> {
    (0..n)
        .map(|i| Fragment { name: format!("tile{i}"), input: format!("-2.0 {} 0.02 64 8 {iterations}", -1.2 + 0.16 * i as f64).into_bytes().into() })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragments_run_across_sellers_and_come_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::start(&dir.path().join("tb"), 5).await.unwrap();
    for name in ["s1", "s2", "s3"] {
        tb.seller(name, 1, 3600, |_| {}).await.unwrap();
    }
    let buyer = tb.member("buyer", 100_000).await.unwrap();
    let job = Job {
        program: examples::MANDELBROT.to_vec(),
        args: vec!["mandelbrot".into()],
        fragments: tiles(15),
        cpus: 3,
        max_price: 4000,
        requirements: requirements(),
        replicas: 1,
        stream: false,
    };
    let report = run(buyer.connect().await.unwrap(), job, Arc::new(())).await.unwrap();
    assert_eq!(report.results.len(), 15);
    for (i, r) in report.results.iter().enumerate() {
        assert!(r.success, "{}: {}", r.name, r.ending);
        assert_eq!(r.name, format!("tile{i}"));
        assert!(r.output.starts_with(b"P5\n64 8\n255\n"));
    }
    assert_eq!(report.leases, 3);
    assert_eq!(report.per_seller.values().sum::<u32>(), 15);
    assert!(report.per_seller.len() >= 2, "the work spread: {:?}", report.per_seller);
    assert!(report.cost_cents >= 0);
    // The order is cancelled: nothing left running or escrowed.
    let mut conn = buyer.connect().await.unwrap();
    let balance = conn.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
    assert_eq!(balance.escrow_cents, 0);
    assert_eq!(100_000 - balance.available_cents, report.cost_cents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seller_killed_mid_fragment_loses_only_that_fragment() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::start(&dir.path().join("tb"), 3).await.unwrap();
    for name in ["s1", "s2", "s3"] {
        tb.seller(name, 1, 3600, |_| {}).await.unwrap();
    }
    let buyer = tb.member("buyer", 100_000).await.unwrap();
    // Each fragment searches ~1.5 million keys: long enough to be caught mid-run.
    let hash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; // "hello"
    let per = 1_500_000u64;
    let fragments: Vec<Fragment> = (0..8)
        .map(|i| Fragment { name: format!("range{i}"), input: format!("{hash} abcdefghijklmnopqrstuvwxyz 5 {} {per}", i * per).into_bytes().into() })
        .collect();
    let job = Job {
        program: examples::CRACK.to_vec(),
        args: vec!["crack".into()],
        fragments,
        cpus: 3,
        max_price: 4000,
        requirements: requirements(),
        replicas: 1,
        stream: false,
    };
    let conn = buyer.connect().await.unwrap();
    let running = tokio::spawn(run(conn, job, Arc::new(())));
    // Let work start everywhere, then one seller vanishes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = tb.sellers.remove(0);
    let victim_node = victim.node.node;
    victim.kill();
    let report = tokio::time::timeout(Duration::from_secs(120), running).await.expect("the job finishes").unwrap().unwrap();
    assert!(report.results.iter().all(|r| r.success), "{:?}", report.results.iter().map(|r| &r.ending).collect::<Vec<_>>());
    // "hello" is index 3_276_872 in base 26: range 2.
    let found: Vec<_> = report.results.iter().filter(|r| r.output != b"none\n").map(|r| (r.name.clone(), r.output.clone())).collect();
    assert_eq!(found, vec![("range2".to_string(), b"found hello\n".to_vec())]);
    assert!(report.reruns >= 1, "the lost fragment ran again: {report:?}");
    assert!(!report.per_seller.contains_key(&victim_node) || report.per_seller[&victim_node] < 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_catch_a_seller_that_returns_wrong_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::start(&dir.path().join("tb"), 5).await.unwrap();
    tb.seller("honest1", 1, 3600, |_| {}).await.unwrap();
    let liar = tb.seller("liar", 1, 3000, |c| c.corrupt_outputs = true).await.unwrap().account;
    tb.seller("honest2", 1, 3600, |_| {}).await.unwrap();
    let buyer = tb.member("buyer", 100_000).await.unwrap();
    // Tiles slow enough that all three sellers get work: two honest ones
    // alone could run every replica of quick tiles before the liar starts.
    let job = Job {
        program: examples::MANDELBROT.to_vec(),
        args: vec!["mandelbrot".into()],
        fragments: tiles_of(12, 20_000),
        cpus: 3,
        max_price: 4000,
        requirements: requirements(),
        replicas: 2,
        stream: false,
    };
    // Each result is handed over once, when it is final, and kept out of the report.
    let kept = Arc::new(Kept::default());
    let report = run(buyer.connect().await.unwrap(), job, kept.clone()).await.unwrap();
    let kept = std::mem::take(&mut *kept.0.lock().unwrap());
    assert_eq!(kept.len(), 12, "each fragment was settled once");
    assert!(report.results.iter().all(|r| r.output.is_empty()), "outputs handed over are not held");
    // Every kept output is the honest one (checked against a local run).
    let local = cpushare_buyer::run_local(
        Job {
            program: examples::MANDELBROT.to_vec(),
            args: vec!["mandelbrot".into()],
            fragments: tiles_of(12, 20_000),
            cpus: 1,
            max_price: 0,
            requirements: requirements(),
            replicas: 1,
            stream: false,
        },
        2,
        cpushare_sandbox::Limits::default(),
        false,
        Arc::new(()),
    )
    .await
    .unwrap();
    for local in &local.results {
        assert!(local.output.starts_with(b"P5\n"), "a local run's report holds its outputs");
        assert_eq!(kept[&local.name], local.output, "{}", local.name);
    }
    assert!(!report.mismatches.is_empty(), "the liar was caught");
    assert!(report.mismatches.iter().all(|m| m.seller_account == liar), "{:?}", report.mismatches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_job_runs_many_small_fragments_and_reports_each_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::start(&dir.path().join("tb"), 5).await.unwrap();
    for name in ["s1", "s2", "s3"] {
        tb.seller(name, 1, 3600, |_| {}).await.unwrap();
    }
    let buyer = tb.member("buyer", 100_000).await.unwrap();
    let mut fragments: Vec<Fragment> = (0..600).map(|i| Fragment { name: format!("f{i}"), input: format!("word {i}").into_bytes().into() }).collect();
    fragments[100].input = b"crash".to_vec().into();
    fragments[200].input = b"log".to_vec().into();
    fragments[300].input = b"fail".to_vec().into();
    let job = Job {
        program: cpushare_sandbox::test_guests::STREAM.to_vec(),
        args: vec!["stream".into()],
        fragments,
        cpus: 3,
        max_price: 4000,
        requirements: requirements(),
        replicas: 1,
        stream: true,
    };
    let report = run(buyer.connect().await.unwrap(), job, Arc::new(())).await.unwrap();
    assert_eq!(report.results.len(), 600);
    for (i, r) in report.results.iter().enumerate() {
        match i {
            100 => assert!(!r.success && r.ending.starts_with("killed: segmentation fault at 0x8"), "{}", r.ending),
            200 => assert_eq!((r.success, r.log.as_slice(), r.output.as_slice()), (true, &b"stream: a line for this fragment\n"[..], &b"LOG"[..])),
            300 => assert_eq!((r.success, r.ending.as_str()), (false, "exited with status 3")),
            _ => assert_eq!((r.success, String::from_utf8_lossy(&r.output).into_owned()), (true, format!("WORD {i}"))),
        }
    }
    assert_eq!(report.reruns, 0);
    assert!(report.per_seller.len() >= 2, "the work spread: {:?}", report.per_seller);
}

/// Settled results, taken out of the report as a caller writing them to files would.
#[derive(Default)]
struct Kept(std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>);

impl cpushare_buyer::Progress for Kept {
    fn settled(&self, result: &cpushare_buyer::FragmentResult) -> bool {
        let earlier = self.0.lock().unwrap().insert(result.name.clone(), result.output.clone());
        assert!(earlier.is_none(), "{} handed over twice", result.name);
        true
    }
}

/// Progress notes, shown when a test fails.
struct Notes;

impl cpushare_buyer::Progress for Notes {
    fn note(&self, message: &str) {
        eprintln!("{message}");
    }
}

/// An unmodified program whose seller vanishes before it has shown anything
/// starts over on another seller; the buyer sees one clean run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unmodified_program_whose_seller_vanishes_runs_again_elsewhere() {
    let Ok(busybox) = std::fs::read("/usr/bin/busybox") else {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "busybox-static is needed under CI");
        eprintln!("skipped: no /usr/bin/busybox (scripts/test installs busybox-static)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::start(&dir.path().join("tb"), 3).await.unwrap();
    for name in ["s1", "s2"] {
        tb.seller(name, 1, 3600, |_| {}).await.unwrap();
    }
    let buyer = tb.member("buyer", 100_000).await.unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    // A few seconds of shell arithmetic (builtins only), then one line.
    let script = "i=0; while [ $i -lt 3000000 ]; do i=$((i+1)); done; echo counted $i";
    let job = Unmodified {
        program: busybox,
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        cwd: "/work".into(),
        mounts: vec![Mount { host: work, guest: "/work".into(), read_only: false }],
        seed: [1; 32],
        max_price: 4000,
        min_ram_mib: 0,
    };
    let mut ex = buyer.connect().await.unwrap().exchange;
    let conn = buyer.connect().await.unwrap();
    let running = tokio::spawn(async move {
        let mut out = Vec::new();
        let done = run_unmodified(conn, job, tokio::io::empty(), &mut out, tokio::io::sink(), &Notes).await;
        (done, out)
    });
    // Whichever seller runs it vanishes once it is running.
    let victim = loop {
        let leases = ex.list_leases(pb::ListLeasesRequest {}).await.unwrap().into_inner().leases;
        if let Some(l) = leases.iter().find(|l| l.state == "running") {
            break l.seller_node;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = tb.sellers.iter().position(|s| s.node.node == victim).expect("the lease's seller is ours");
    tb.sellers.remove(at).kill();
    let (done, out) = tokio::time::timeout(Duration::from_secs(120), running).await.expect("the run finishes").unwrap();
    let done = done.unwrap();
    assert_eq!(done.exit_code, Some(0), "{}", done.killed);
    assert_eq!(String::from_utf8_lossy(&out), "counted 3000000\n", "the output once, from the second seller");
    assert_ne!(done.seller_node, victim);
}

/// Inputs read from files as they are sent: the job runs as with bytes; an
/// input file gone meanwhile ends the run at once with a clear error, and its
/// order is cancelled (nothing left escrowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inputs_are_read_from_their_files_as_they_are_sent_and_a_vanished_one_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::start(&dir.path().join("tb"), 5).await.unwrap();
    tb.seller("s1", 1, 3600, |_| {}).await.unwrap();
    let buyer = tb.member("buyer", 100_000).await.unwrap();
    let inputs = dir.path().join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    let from_files = |fragments: Vec<Fragment>| -> Vec<Fragment> {
        fragments
            .into_iter()
            .map(|f| {
                let path = inputs.join(&f.name);
                std::fs::write(&path, f.input.load().unwrap()).unwrap();
                Fragment { name: f.name, input: cpushare_buyer::Input::file(path).unwrap() }
            })
            .collect()
    };
    let job = |fragments| Job {
        program: examples::MANDELBROT.to_vec(),
        args: vec!["mandelbrot".into()],
        fragments,
        cpus: 1,
        max_price: 4000,
        requirements: requirements(),
        replicas: 1,
        stream: false,
    };
    let report = run(buyer.connect().await.unwrap(), job(from_files(tiles(4))), Arc::new(())).await.unwrap();
    let local = cpushare_buyer::run_local(job(tiles(4)), 1, cpushare_sandbox::Limits::default(), false, Arc::new(())).await.unwrap();
    for (remote, local) in report.results.iter().zip(&local.results) {
        assert!(remote.success && remote.output == local.output, "{}", remote.name);
    }

    let fragments = from_files(tiles(3));
    std::fs::remove_file(inputs.join("tile2")).unwrap();
    let started = std::time::Instant::now();
    let e = run(buyer.connect().await.unwrap(), job(fragments), Arc::new(())).await.unwrap_err();
    assert!(format!("{e:#}").contains("cannot read the input") && format!("{e:#}").contains("tile2"), "{e:#}");
    assert!(started.elapsed() < Duration::from_secs(30), "it ended at once, not after the lease's retries");
    let mut conn = buyer.connect().await.unwrap();
    let orders = conn.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner();
    assert!(orders.orders.iter().all(|o| o.side != "buy"), "the order was cancelled: {orders:?}");
}
