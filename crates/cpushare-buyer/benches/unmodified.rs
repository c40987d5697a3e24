//! Reading a buyer's file from an unmodified program on a seller: an exchange,
//! one seller and a buyer on localhost; busybox `dd` reads the file through
//! the emulated jail, its content fetched from the buyer over the exchange
//! relay as it opens it. Against the same `dd` run natively from the page
//! cache, and the emulated jail reading the file locally (no relay).
//! See BENCHMARKS.md for results.
//!
//! CPUSHARE_BENCH_MIB (default 1024) sets the file's size; CPUSHARE_BENCH_PROFILE=1
//! runs only one fetch through the relay (for `perf record`).

use std::time::Instant;

use cpushare_buyer::{run_unmodified, Unmodified};
use cpushare_sandbox::emulate::{run_emulated, Mount, World};
use cpushare_sandbox::{Limits, Options, Program};
use cpushare_seller::testbed::Testbed;

const BUSYBOX: &str = "/usr/bin/busybox";

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("CPUSHARE_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let Ok(busybox) = std::fs::read(BUSYBOX) else {
        println!("skipped: {BUSYBOX} is missing (scripts/test installs busybox-static)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let bytes = mib << 20;
    let piece: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(data.join("big.bin")).unwrap();
        for _ in 0..mib {
            f.write_all(&piece).unwrap();
        }
    }
    let dd = ["dd", "if=/data/big.bin", "of=/dev/null", "bs=1M"];
    let profile = std::env::var("CPUSHARE_BENCH_PROFILE").is_ok();

    // The peer: dd natively, from the page cache.
    if !profile {
        let started = Instant::now();
        let status = std::process::Command::new(BUSYBOX)
            .args(["dd", "of=/dev/null", "bs=1M"])
            .arg(format!("if={}", data.join("big.bin").display()))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        println!("peer: native dd reads {mib} MiB from the page cache: {:.0} MB/s", mb_per_s(bytes, started.elapsed().as_secs_f64()));

        // The emulated jail reading the buyer's directory on the same machine (no relay).
        let program = Program::new(&busybox).unwrap();
        let world = World { cwd: "/data".into(), mounts: vec![Mount { host: data.clone(), guest: "/data".into(), read_only: true }], ..World::default() };
        let started = Instant::now();
        let run = run_emulated(
            &program,
            &dd,
            &world,
            Box::new(std::io::empty()),
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
            &Limits { ram_bytes: 256 << 20, ..Limits::default() },
            &Options::default(),
        )
        .unwrap();
        assert!(run.ending.success(), "{:?}", run.ending);
        println!("emulated jail, local file: {:.0} MB/s", mb_per_s(bytes, started.elapsed().as_secs_f64()));
    }

    // Through the exchange: a seller fetches the file over the relay, then the program reads it.
    let mut tb = Testbed::start(&dir.path().join("tb"), 10).await.unwrap();
    tb.seller("s1", 1, 3600, |c| c.ram_per_slot_mib = 512).await.unwrap();
    let buyer = tb.member("buyer", 10_000_000).await.unwrap();
    std::fs::write(data.join("tiny.bin"), b"x").unwrap();
    let run = |file: &str, read_only: bool| {
        let job = Unmodified {
            program: busybox.clone(),
            args: ["dd", &format!("if=/data/{file}"), "of=/dev/null", "bs=1M"].iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: "/data".into(),
            mounts: vec![Mount { host: data.clone(), guest: "/data".into(), read_only }],
            seed: [0; 32],
            max_price: 4000,
            min_ram_mib: 0,
        };
        let buyer = &buyer;
        async move {
            let conn = buyer.connect().await.unwrap();
            let started = Instant::now();
            let done = run_unmodified(conn, job, tokio::io::empty(), tokio::io::sink(), tokio::io::sink(), &()).await.unwrap();
            assert_eq!(done.exit_code, Some(0), "{}", done.killed);
            started.elapsed().as_secs_f64()
        }
    };
    // What a run costs besides the file: the order, the lease, the program's upload.
    let mut fixed: Vec<f64> = Vec::new();
    for _ in 0..3 {
        fixed.push(run("tiny.bin", false).await);
    }
    fixed.sort_by(f64::total_cmp);
    let fixed = fixed[1];
    println!("a run with a 1-byte file (order, lease, program upload): {:.0} ms", fixed * 1000.0);
    let rounds = if profile { 1 } else { 5 };
    let mut times: Vec<f64> = Vec::new();
    for _ in 0..rounds {
        times.push(run("big.bin", false).await);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "through the exchange relay, fetched on demand: {mib} MiB, median of {rounds} runs {median:.2} s = {:.0} MB/s whole run, {:.0} MB/s for the file (less the 1-byte run)",
        mb_per_s(bytes, median),
        mb_per_s(bytes, median - fixed)
    );
    if profile {
        return;
    }
    let first = run("big.bin", true).await;
    println!("read-only mount, first lease (fetched into the seller's cache): {:.0} MB/s for the file", mb_per_s(bytes, first - fixed));
    let second = run("big.bin", true).await;
    println!("read-only mount, next lease (from the seller's cache): {second:.2} s for the whole run");
}
