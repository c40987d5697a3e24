//! The soak: an exchange, three sellers and a buyer as separate processes on
//! this machine, with work going on continuously (the Mandelbrot example's
//! tiles, job after job) and, at random moments, SIGKILL of a seller (started
//! again a little later), of the exchange itself (started again at once) or
//! of the buyer's job (its leases must end "buyer lost" and its escrow come
//! back by themselves; the job is then run again).
//! Checked at every checkpoint and at the end: every tile of every job has
//! exactly one result and it is the one a local run gives; the ledger
//! balances (the exchange's audit of every invariant); no running lease was
//! charged more or less than its delivered time at its price (within a cent);
//! no lease outlives its job; the memory of every process stays bounded.
//! Prints a report.
//!
//! `CPUSHARE_SOAK_SECS` sets its length (60 s by default, the suite's short
//! run); `scripts/soak MINUTES` runs it long. The seed of each run is
//! printed; `CPUSHARE_SOAK_SEED` replays one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

/// The exchange process, killed and started again on its data.
struct Exchange {
    data: PathBuf,
    operator: PathBuf,
    process: Running,
}

impl Exchange {
    fn start(data: &Path) -> Running {
        Running(Command::new(BIN).args(["exchange", "run", "--no-web", "--data"]).arg(data).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
    }

    fn kill_and_restart(&mut self) {
        kill9(&self.process);
        let _ = self.process.0.wait();
        self.process = Exchange::start(&self.data);
        self.wait_up();
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while run(&self.operator, &["exchange", "audit"]).status.code() != Some(0) {
            assert!(Instant::now() < deadline, "the exchange did not come back");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn kill9(r: &Running) {
    let _ = Command::new("kill").args(["-KILL", &r.0.id().to_string()]).status();
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

struct Seller {
    dir: PathBuf,
    process: Option<Running>,
    /// When a killed seller starts again.
    back_at: Option<Instant>,
}

fn sell(dir: &Path) -> Running {
    Running(Command::new(BIN).arg("--config").arg(dir).args(["sell", "--cpus", "1", "--price", "36000", "--ram-per-slot", "256"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// "12.34" -> 1234.
fn cents(v: &serde_json::Value) -> i64 {
    let s = v.as_str().unwrap();
    let (whole, part) = s.split_once('.').unwrap();
    let sign = if whole.starts_with('-') { -1 } else { 1 };
    sign * (whole.trim_start_matches('-').parse::<i64>().unwrap() * 100 + part.parse::<i64>().unwrap())
}

/// Every tile has exactly one result, and it is the reference's.
fn check_outputs(out: &Path, reference: &Path) -> usize {
    let mut want: Vec<_> = std::fs::read_dir(reference).unwrap().map(|e| e.unwrap().file_name()).collect();
    let mut got: Vec<_> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "one result per tile, nothing else");
    for name in &want {
        assert!(std::fs::read(out.join(name)).unwrap() == std::fs::read(reference.join(name)).unwrap(), "{name:?} differs from a local run");
    }
    want.len()
}

/// The ledger balances and each running lease's charge is its delivered time at its price, within a cent.
fn checkpoint(operator: &Path, members: &[&Path]) {
    let audit = json(operator, &["exchange", "audit"]);
    assert_eq!(audit["ok"], true, "{audit}");
    for m in members {
        for l in json(m, &["leases"]).as_array().unwrap() {
            if l["state"] == "running" {
                let (price, secs) = (l["cents/CPU-h"].as_i64().unwrap(), l["delivered s"].as_i64().unwrap());
                let charged = cents(&l["charged EUR"]);
                let due = price * secs / 3600;
                assert!((charged - due).abs() <= 1, "lease {} charged {charged} cents for {secs} s at {price}: {l}", l["lease"]);
            }
        }
    }
}

#[test]
fn soak_with_sellers_and_the_exchange_killed_at_random() {
    let secs: u64 = std::env::var("CPUSHARE_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("CPUSHARE_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("soak: {secs} s, seed {seed} (CPUSHARE_SOAK_SEED={seed} replays it)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let (first, operator) = exchange(tmp.path());
    // From here on the exchange runs as this test's own process, killed at will,
    // with a heartbeat timeout of 5 s so that lost sellers and buyers end soon.
    drop(first);
    let settings = tmp.path().join("data/exchange.json");
    let mut s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
    s["heartbeat_timeout_secs"] = 5.into();
    std::fs::write(&settings, s.to_string()).unwrap();
    let mut ex = Exchange { data: tmp.path().join("data"), operator: operator.clone(), process: Exchange::start(&tmp.path().join("data")) };
    ex.wait_up();
    let buyer = tmp.path().join("buyer");
    let account = member(&operator, "buyer", &buyer);
    ok(&operator, &["deposit", &account, "100000"]);
    let mut sellers: Vec<Seller> = (0..3)
        .map(|i| {
            let dir = tmp.path().join(format!("seller-{i}"));
            member(&operator, &format!("seller-{i}"), &dir);
            Seller { process: Some(selling(&dir, 1, None)), dir, back_at: None }
        })
        .collect();
    let ex_dir = tmp.path().join("ex");
    ok(&buyer, &["examples", ex_dir.to_str().unwrap()]);
    let p = |s: &str| ex_dir.join(s).to_str().unwrap().to_string();
    let reference = tmp.path().join("reference");
    ok(&buyer, &["run", "--local", &p("mandelbrot"), "--inputs", &p("mandelbrot-tiles"), "--outputs", reference.to_str().unwrap()]);

    let started = Instant::now();
    let (mut jobs, mut tiles, mut reruns, mut seller_kills, mut exchange_kills, mut buyer_kills, mut cost) = (0, 0, 0, 0, 0, 0, 0i64);
    let held = |buyer: &Path| {
        let b = json(buyer, &["balance"]);
        cents(&b["available (EUR)"]) + cents(&b["escrow (EUR)"])
    };
    let mut peak: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut next_fault = Instant::now() + Duration::from_millis(rng.gen_range(1000..4000));
    // What the next fault is: below 0.2 the exchange, below 0.35 the buyer's job, else a seller.
    let mut next_kind: f64 = rng.gen();
    while started.elapsed() < Duration::from_secs(secs) {
        let out = tmp.path().join(format!("out-{jobs}-{buyer_kills}"));
        let before = held(&buyer);
        let mut job = Command::new(BIN)
            .arg("--config")
            .arg(&buyer)
            .args(["--json", "run", "--cpus", "2", "--max-price", "40000", &p("mandelbrot"), "--inputs", &p("mandelbrot-tiles"), "--outputs", out.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let job_started = Instant::now();
        let mut killed = false;
        let status = loop {
            if let Some(status) = job.try_wait().unwrap() {
                break status;
            }
            assert!(job_started.elapsed() < Duration::from_secs(300), "a job did not finish in 300 s");
            let now = Instant::now();
            for s in &mut sellers {
                if s.back_at.is_some_and(|t| now >= t) {
                    s.process = Some(sell(&s.dir));
                    s.back_at = None;
                }
            }
            // A job is killed once it is under way (it waits for one that is).
            let due = now >= next_fault && !(0.2..0.35).contains(&next_kind) || job_started.elapsed() > Duration::from_millis(50);
            if now >= next_fault && due {
                next_fault = now + Duration::from_millis(rng.gen_range(1500..5000));
                let roll = std::mem::replace(&mut next_kind, rng.gen());
                if roll < 0.2 {
                    ex.kill_and_restart();
                    exchange_kills += 1;
                } else if roll < 0.35 {
                    let _ = job.kill();
                    killed = true;
                    buyer_kills += 1;
                } else {
                    // A seller vanishes; it comes back a little later (with its node's identity).
                    let alive: Vec<usize> = (0..sellers.len()).filter(|&i| sellers[i].process.is_some()).collect();
                    if alive.len() > 1 {
                        let s = &mut sellers[alive[rng.gen_range(0..alive.len())]];
                        let victim = s.process.take().unwrap();
                        kill9(&victim);
                        drop(victim);
                        s.back_at = Some(now + Duration::from_millis(rng.gen_range(500..3000)));
                        seller_kills += 1;
                    }
                }
            }
            let mut note = |what: &'static str, pid: u32| {
                let e = peak.entry(what).or_default();
                *e = (*e).max(rss_kib(pid));
            };
            note("exchange", ex.process.0.id());
            note("buyer", job.id());
            for s in &sellers {
                if let Some(r) = &s.process {
                    note("seller", r.0.id());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let output = job.wait_with_output().unwrap();
        if killed {
            // Nobody cancels its order: the exchange sees the buyer gone and ends it all by itself.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !json(&buyer, &["orders"]).as_array().unwrap().is_empty() || !json(&buyer, &["leases"]).as_array().unwrap().is_empty() {
                assert!(Instant::now() < deadline, "a killed buyer's order or leases stood 30 s on: {} {}", json(&buyer, &["orders"]), json(&buyer, &["leases"]));
                std::thread::sleep(Duration::from_millis(250));
            }
            assert_eq!(json(&buyer, &["balance"])["escrow (EUR)"], "0.00");
            cost += before - held(&buyer);
            continue;
        }
        assert!(status.success(), "job {jobs} failed: {}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        tiles += check_outputs(&out, &reference);
        reruns += report["reruns"].as_u64().unwrap();
        cost += report["cost_cents"].as_i64().unwrap();
        jobs += 1;
        // The job's order and leases are gone with it.
        let orders = json(&buyer, &["orders"]);
        assert!(orders.as_array().unwrap().is_empty(), "an order outlived its job: {orders}");
        let seller_dirs: Vec<&Path> = sellers.iter().map(|s| s.dir.as_path()).collect();
        let mut members = vec![buyer.as_path()];
        members.extend(seller_dirs.iter().copied());
        checkpoint(&operator, &members);
    }
    // The end: no lease stuck, the escrow back, the books balanced.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !json(&buyer, &["leases"]).as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "leases outlived every job: {}", json(&buyer, &["leases"]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let balance = json(&buyer, &["balance"]);
    assert_eq!(balance["escrow (EUR)"], "0.00", "{balance}");
    let spent = 10_000_000 - cents(&balance["available (EUR)"]);
    assert_eq!(spent, cost, "the buyer paid what its jobs' reports say (and its killed jobs cost), to the cent");
    let audit = json(&operator, &["exchange", "audit"]);
    assert_eq!(audit["ok"], true, "{audit}");
    // Memory: bounded (generous bounds: what matters is that it does not grow with the run).
    for (what, kib) in &peak {
        assert!(*kib < 512 * 1024, "{what} reached {kib} KiB");
    }
    eprintln!(
        "soak report: {:.0} s, seed {seed}: {jobs} jobs, {tiles} tiles, each with one result equal to a local run's; {reruns} reruns; \
         {seller_kills} sellers, {exchange_kills} exchanges and {buyer_kills} buyers killed; the buyer paid {cost} cents, as its reports say; audit ok; \
         peak memory {}",
        started.elapsed().as_secs_f64(),
        peak.iter().map(|(w, k)| format!("{w} {} MiB", k / 1024)).collect::<Vec<_>>().join(", ")
    );
    assert!(jobs >= 1);
}
