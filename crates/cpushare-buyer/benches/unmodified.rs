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
    let runs = [
        ("read-write mount (fetched)", false),
        ("read-write mount again (fetched)", false),
        ("read-only mount, first lease (fetched, cached)", true),
        ("read-only mount, second lease (from the seller's cache)", true),
    ];
    for (label, read_only) in runs.into_iter().take(if profile { 1 } else { 4 }) {
        let job = Unmodified {
            program: busybox.clone(),
            args: dd.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: "/data".into(),
            mounts: vec![Mount { host: data.clone(), guest: "/data".into(), read_only }],
            seed: [0; 32],
            max_price: 4000,
            min_ram_mib: 0,
        };
        let conn = buyer.connect().await.unwrap();
        // Timed from the seller's readiness would hide the lease; timed whole, it is in.
        let started = Instant::now();
        let done = run_unmodified(conn, job, tokio::io::empty(), tokio::io::sink(), tokio::io::sink(), &()).await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(done.exit_code, Some(0), "{}", done.killed);
        println!(
            "through the exchange relay, {label}: {mib} MiB in {secs:.2} s = {:.0} MB/s (order, lease and program upload included)",
            mb_per_s(bytes, secs)
        );
    }
}
