//! The soak: an exchange, four sellers and three buyers as separate processes
//! on this machine, the sellers and buyers each in a network namespace of
//! its own on one switch (as root), with work going on continuously (the
//! Mandelbrot example's tiles, job after job, two buyers competing for the
//! sellers' slots; where livecds can be built, a third buyer's cluster of one
//! VM on the cluster's network, started, run a while and stopped, again and
//! again) and, at random moments:
//! - SIGKILL of a seller (started again a little later), of the exchange
//!   itself (started again at once; a cluster's VM runs on through it) or of
//!   a buyer's job or cluster (its leases must end "buyer lost" and its escrow
//!   come back by themselves; it then runs again);
//! - network faults on a seller's or a buyer's link: a partition (the cable
//!   unplugged at the switch for 1-10 s, against a heartbeat timeout of 5 s),
//!   packet loss (10-40 %, with nftables: this kernel has no netem) or a
//!   choked link (a 64-512 kbit/s token bucket, which delays what queues).
//!
//! The cluster's buyer is spared both until a cluster has ticked to its stop,
//! so that even a short run sees one through. Each fault is printed as it
//! strikes.
//!
//! Checked at every checkpoint and at the end: every tile of every job has
//! exactly one result and it is the one a local run gives; every VM of a
//! cluster booted once and its clock went on to the cluster's stop; the ledger
//! balances (the exchange's audit of every invariant); no running lease was
//! charged more or less than its delivered time at its price (within a cent);
//! no lease outlives its job; each buyer paid what its jobs' reports say, to
//! the cent; the memory of every process stays bounded. Prints a report.
//!
//! Not root (outside CI): the same without namespaces and network faults.
//! `CPUSHARE_SOAK_SECS` sets its length (60 s by default, the suite's short
//! run); `scripts/soak MINUTES` runs it long. The seed of each run is
//! printed; `CPUSHARE_SOAK_SEED` replays one.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::lab::{can_build, Lab};
use common::*;
use rand::{Rng, SeedableRng};

const SELLERS: usize = 4;
/// Buyers of tiles; one more runs clusters.
const BUYERS: usize = 2;

/// The exchange process, killed and started again on its data.
struct Exchange {
    data: PathBuf,
    operator: PathBuf,
    process: Running,
}

impl Exchange {
    fn kill_and_restart(&mut self) {
        kill9(self.process.0.id());
        let _ = self.process.0.wait();
        self.process = exchange_again(&self.data);
        wait_for_exchange(&self.operator);
    }
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Keeps the highest resident memory seen of each kind of process.
fn note(peak: &mut BTreeMap<&'static str, u64>, what: &'static str, pid: u32) {
    let e = peak.entry(what).or_default();
    *e = (*e).max(rss_kib(pid));
}

/// Where the members run: their own namespaces on the lab's switch, or (not root) here.
struct Net(Option<Lab>);

impl Net {
    /// `cpushare --config DIR ARGS` as member `name`.
    fn cpushare(&self, name: &str, dir: &Path, args: &[&str]) -> Command {
        let mut c = match &self.0 {
            Some(lab) => lab.command(name, &[BIN]),
            None => Command::new(BIN),
        };
        c.arg("--config").arg(dir).args(args);
        c
    }
}

struct Seller {
    name: String,
    dir: PathBuf,
    process: Option<Running>,
    /// When a killed seller starts again.
    back_at: Option<Instant>,
}

impl Seller {
    fn start(&mut self, net: &Net) {
        let child = net.cpushare(&self.name, &self.dir, &["sell", "--cpus", "1", "--price", "36000", "--ram-per-slot", "256"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.process = Some(Running(child));
        self.back_at = None;
    }
}

/// A buyer's job (or cluster) under way.
struct Job {
    child: Child,
    /// Where its tiles go (the cluster's directory).
    out: PathBuf,
    started: Instant,
    killed: bool,
    /// A cluster: when it is stopped (from when all its nodes were up).
    stop_at: Option<Instant>,
    stopped: bool,
}

/// What a buyer runs, job after job.
enum Work {
    Tiles,
    /// A one-node cluster booting this livecd.
    Cluster(PathBuf),
}

struct Buyer {
    name: String,
    dir: PathBuf,
    work: Work,
    job: Option<Job>,
    /// A killed job's (or a stopped cluster's) order and leases must end by
    /// themselves: since when this buyer waits for that.
    orphaned: Option<Instant>,
    /// What the buyer held (available + escrow) when its current job started.
    held_before: i64,
    /// What its jobs cost: their reports' costs, and what killed ones took.
    cost: i64,
    runs: usize,
}

/// "12.34" -> 1234.
fn cents(v: &serde_json::Value) -> i64 {
    let s = v.as_str().unwrap();
    let (whole, part) = s.split_once('.').unwrap();
    let sign = if whole.starts_with('-') { -1 } else { 1 };
    sign * (whole.trim_start_matches('-').parse::<i64>().unwrap() * 100 + part.parse::<i64>().unwrap())
}

fn held(buyer: &Path) -> i64 {
    let b = json(buyer, &["balance"]);
    cents(&b["available (EUR)"]) + cents(&b["escrow (EUR)"])
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

/// A cluster's run: each node's VM booted once and its clock only went on
/// (through exchange restarts: a VM that booted again would start at tick 0).
/// Returns its nodes, their ticks and how many of those reached the buyer by ping.
fn check_cluster(dir: &Path, said: &str) -> (usize, usize, usize) {
    let (mut nodes, mut ticked, mut pings) = (0, 0, 0);
    for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
        if !e.file_name().unwrap().to_string_lossy().starts_with("console-") {
            continue;
        }
        let console = std::fs::read_to_string(&e).unwrap();
        let boots = console.matches("cpushare-livecd: up").count();
        assert!(boots <= 1, "a VM booted twice in one lease: {console}\n{said}");
        let clock = ticks(&console);
        assert!(clock.windows(2).all(|w| w[0].0 < w[1].0), "a VM's clock went back: {console}");
        nodes += boots;
        ticked += clock.len();
        pings += clock.iter().filter(|t| t.1).count();
    }
    (nodes, ticked, pings)
}

/// Whether a node of the cluster in `dir` has shown a tick of its clock.
fn has_ticked(dir: &Path) -> bool {
    let consoles = std::fs::read_dir(dir).into_iter().flatten().map(|e| e.unwrap().path());
    consoles.filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("console-")).any(|p| !ticks(&std::fs::read_to_string(p).unwrap_or_default()).is_empty())
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

/// What can go wrong next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillExchange,
    KillJob,
    KillSeller,
    Partition,
    Loss,
    Choke,
}

impl Fault {
    fn roll(rng: &mut impl Rng, network: bool) -> Fault {
        let x: f64 = rng.gen();
        match (network, x) {
            (true, x) if x < 0.12 => Fault::KillExchange,
            (true, x) if x < 0.22 => Fault::KillJob,
            (true, x) if x < 0.50 => Fault::KillSeller,
            (true, x) if x < 0.70 => Fault::Partition,
            (true, x) if x < 0.85 => Fault::Loss,
            (true, _) => Fault::Choke,
            (false, x) if x < 0.2 => Fault::KillExchange,
            (false, x) if x < 0.35 => Fault::KillJob,
            (false, _) => Fault::KillSeller,
        }
    }
}

#[test]
fn soak_with_processes_killed_and_links_failing_at_random() {
    let secs: u64 = std::env::var("CPUSHARE_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("CPUSHARE_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();

    // The switch: the exchange at .1 (this namespace, where the test's own
    // commands run too), buyers from .2, sellers from .10.
    let iso = cpushare_sandbox::vm::testing::livecd(tmp.path(), "ticking", TICKING);
    let buyer_count = BUYERS + iso.is_some() as usize;
    let mut net = Net(can_build(&["ip", "nft", "tc"]).then(|| Lab::new("k", "10.211.0")));
    // The links that can fail: each buyer's and each seller's.
    let mut links = Vec::new();
    let address = match &mut net.0 {
        Some(lab) => {
            lab.plug_here(1);
            for i in 0..buyer_count {
                links.push(format!("b{i}"));
                lab.plug(&format!("b{i}"), 2 + i as u8);
            }
            for i in 0..SELLERS {
                links.push(format!("s{i}"));
                lab.plug(&format!("s{i}"), 10 + i as u8);
            }
            "10.211.0.1"
        }
        None => {
            eprintln!("soak: no network faults (not root)");
            "127.0.0.1"
        }
    };
    eprintln!("soak: {secs} s, seed {seed} (CPUSHARE_SOAK_SEED={seed} replays it)");

    let (first, operator) = exchange_on(tmp.path(), address);
    // From here on the exchange runs as this test's own process, killed at will,
    // with a heartbeat timeout of 5 s so that lost sellers and buyers end soon.
    drop(first);
    set_heartbeat_timeout(&tmp.path().join("data"), 5);
    let mut ex = Exchange { data: tmp.path().join("data"), operator: operator.clone(), process: exchange_again(&tmp.path().join("data")) };
    wait_for_exchange(&operator);

    let mut buyers: Vec<Buyer> = (0..buyer_count)
        .map(|i| {
            let dir = tmp.path().join(format!("buyer-{i}"));
            let account = member(&operator, &format!("buyer-{i}"), &dir);
            ok(&operator, &["deposit", &account, "100000"]);
            let work = match &iso {
                Some(iso) if i == BUYERS => Work::Cluster(iso.clone()),
                _ => Work::Tiles,
            };
            Buyer { name: format!("b{i}"), dir, work, job: None, orphaned: None, held_before: 0, cost: 0, runs: 0 }
        })
        .collect();
    if iso.is_none() {
        eprintln!("soak: no clusters (no livecd here)");
    }
    let mut sellers: Vec<Seller> = (0..SELLERS)
        .map(|i| {
            let dir = tmp.path().join(format!("seller-{i}"));
            member(&operator, &format!("seller-{i}"), &dir);
            let mut s = Seller { name: format!("s{i}"), dir, process: None, back_at: None };
            s.start(&net);
            s
        })
        .collect();
    for s in &sellers {
        wait_for_slots(&s.dir, 1);
    }
    let ex_dir = tmp.path().join("ex");
    ok(&buyers[0].dir, &["examples", ex_dir.to_str().unwrap()]);
    let p = |s: &str| ex_dir.join(s).to_str().unwrap().to_string();
    let reference = tmp.path().join("reference");
    ok(&buyers[0].dir, &["run", "--local", &p("mandelbrot"), "--inputs", &p("mandelbrot-tiles"), "--outputs", reference.to_str().unwrap()]);
    let members: Vec<PathBuf> = buyers.iter().map(|b| b.dir.clone()).chain(sellers.iter().map(|s| s.dir.clone())).collect();
    let members: Vec<&Path> = members.iter().map(|m| m.as_path()).collect();

    let started = Instant::now();
    let (mut jobs, mut tiles, mut reruns) = (0, 0, 0u64);
    let (mut clusters, mut vm_nodes, mut ticks, mut pings) = (0, 0, 0, 0);
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut peak: BTreeMap<&'static str, u64> = BTreeMap::new();
    // Links under a fault, and when each heals.
    let mut faulted: BTreeMap<String, Instant> = BTreeMap::new();
    let mut next_fault = Instant::now() + Duration::from_millis(rng.gen_range(1000..4000));
    let mut next_kind = Fault::roll(&mut rng, net.0.is_some());
    loop {
        let now = Instant::now();
        let running = started.elapsed() < Duration::from_secs(secs);
        if !running && buyers.iter().all(|b| b.job.is_none() && b.orphaned.is_none()) {
            break;
        }
        for s in &mut sellers {
            if s.back_at.is_some_and(|t| now >= t) {
                s.start(&net);
            }
        }
        if let Some(lab) = &net.0 {
            let healed: Vec<String> = faulted.iter().filter(|(_, &t)| now >= t || !running).map(|(n, _)| n.clone()).collect();
            for name in healed {
                lab.set_link(&name, true);
                lab.set_loss(&name, 0);
                lab.set_rate(&name, 0);
                faulted.remove(&name);
            }
        }

        for b in &mut buyers {
            if let Some(since) = b.orphaned {
                // Nobody cancels a killed job's order: the exchange sees the buyer gone and ends it all by itself.
                let (orders, leases) = (json(&b.dir, &["orders"]), json(&b.dir, &["leases"]));
                if orders.as_array().unwrap().is_empty() && leases.as_array().unwrap().is_empty() {
                    assert_eq!(json(&b.dir, &["balance"])["escrow (EUR)"], "0.00");
                    b.cost += b.held_before - held(&b.dir);
                    b.orphaned = None;
                } else {
                    assert!(since.elapsed() < Duration::from_secs(30), "{}'s killed job left its order or leases 30 s on: {orders} {leases}", b.name);
                }
                continue;
            }
            match &mut b.job {
                None if running => {
                    let out = tmp.path().join(format!("out-{}-{}", b.name, b.runs));
                    b.held_before = held(&b.dir);
                    let child = match &b.work {
                        Work::Tiles => {
                            let args = ["--json", "run", "--cpus", "2", "--max-price", "40000", &p("mandelbrot"), "--inputs", &p("mandelbrot-tiles"), "--outputs", out.to_str().unwrap()];
                            net.cpushare(&b.name, &b.dir, &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
                        }
                        Work::Cluster(iso) => {
                            let args = ["cluster", "start", "--iso", iso.to_str().unwrap(), "--nodes", "1", "--max-price", "40000", "--ram", "256M", "--dir", out.to_str().unwrap()];
                            let said = std::fs::File::create(out.with_extension("said")).unwrap();
                            net.cpushare(&b.name, &b.dir, &args).stdout(Stdio::null()).stderr(said).spawn().unwrap()
                        }
                    };
                    b.job = Some(Job { child, out, started: Instant::now(), killed: false, stop_at: None, stopped: false });
                    b.runs += 1;
                }
                None => {}
                Some(job) => {
                    note(&mut peak, "buyer", job.child.id());
                    if job.child.try_wait().unwrap().is_none() {
                        assert!(job.started.elapsed() < Duration::from_secs(300), "a job of {} did not finish in 300 s", b.name);
                        if matches!(b.work, Work::Cluster(_)) && !job.killed && !job.stopped {
                            // A cluster runs a while once up (to the end of the soak at most), then is stopped.
                            let said = std::fs::read_to_string(job.out.with_extension("said")).unwrap_or_default();
                            // Its clock is seen to start before it may be stopped: a slow TCG boot is not a failure.
                            if job.stop_at.is_none() && said.contains("node(s) up") && has_ticked(&job.out) {
                                job.stop_at = Some(now + Duration::from_millis(rng.gen_range(15_000..30_000)));
                                eprintln!("soak: {:.1} s: the cluster of {} is up and ticking", started.elapsed().as_secs_f64(), b.name);
                            }
                            if job.stop_at.is_some_and(|t| now >= t || !running) {
                                // Not while the exchange restarts: then again a moment later.
                                job.stopped = net.cpushare(&b.name, &b.dir, &["cluster", "stop", "--dir", job.out.to_str().unwrap()]).output().unwrap().status.success();
                            }
                        }
                        continue;
                    }
                    let job = b.job.take().unwrap();
                    let output = job.child.wait_with_output().unwrap();
                    if job.killed {
                        b.orphaned = Some(Instant::now());
                        continue;
                    }
                    if matches!(b.work, Work::Cluster(_)) {
                        // It ended: stopped, or its buyer taken for lost (a long partition) and its order with it.
                        let said = std::fs::read_to_string(job.out.with_extension("said")).unwrap_or_default();
                        assert!(output.status.success(), "a cluster of {} failed: {said}", b.name);
                        let (n, t, ok) = check_cluster(&job.out, &said);
                        eprintln!("soak: {:.1} s: the cluster of {} ended, {t} ticks", started.elapsed().as_secs_f64(), b.name);
                        (clusters, vm_nodes, ticks, pings) = (clusters + 1, vm_nodes + n, ticks + t, pings + ok);
                        // What it cost is what the buyer holds less, once its leases ended.
                        b.orphaned = Some(Instant::now());
                        checkpoint(&operator, &members);
                        continue;
                    }
                    assert!(output.status.success(), "a job of {} failed: {}", b.name, String::from_utf8_lossy(&output.stderr));
                    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                    tiles += check_outputs(&job.out, &reference);
                    reruns += report["reruns"].as_u64().unwrap();
                    b.cost += report["cost_cents"].as_i64().unwrap();
                    jobs += 1;
                    // The job's order and leases are gone with it.
                    let orders = json(&b.dir, &["orders"]);
                    assert!(orders.as_array().unwrap().is_empty(), "an order outlived its job: {orders}");
                    checkpoint(&operator, &members);
                }
            }
        }

        if running && now >= next_fault {
            let kind = next_kind;
            // Until one cluster has ticked to its end, its buyer's job and link are left alone: a
            // short soak's few faults could otherwise leave no cluster seen through.
            let spared = ticks == 0;
            let cluster_link = format!("b{BUYERS}");
            // What the fault struck, if anything could be struck now.
            let struck: Option<String> = match kind {
                Fault::KillExchange => {
                    ex.kill_and_restart();
                    Some("the exchange".into())
                }
                Fault::KillJob => {
                    // A job that is under way (a cluster only once one has ticked to its end: see `spared`).
                    let under_way: Vec<usize> = (0..buyers.len())
                        .filter(|&i| !(spared && matches!(buyers[i].work, Work::Cluster(_))) && buyers[i].job.as_ref().is_some_and(|j| j.started.elapsed() > Duration::from_millis(500)))
                        .collect();
                    under_way.get(rng.gen_range(0..under_way.len().max(1))).map(|&i| {
                        let job = buyers[i].job.as_mut().unwrap();
                        let _ = job.child.kill();
                        job.killed = true;
                        format!("the job of {}", buyers[i].name)
                    })
                }
                Fault::KillSeller => {
                    // A seller vanishes; it comes back a little later (with its node's identity).
                    let alive: Vec<usize> = (0..sellers.len()).filter(|&i| sellers[i].process.is_some()).collect();
                    (alive.len() > 1).then(|| {
                        let s = &mut sellers[alive[rng.gen_range(0..alive.len())]];
                        let victim = s.process.take().unwrap();
                        kill9(victim.0.id());
                        drop(victim);
                        s.back_at = Some(now + Duration::from_millis(rng.gen_range(500..3000)));
                        s.name.clone()
                    })
                }
                Fault::Partition | Fault::Loss | Fault::Choke => {
                    let lab = net.0.as_ref().unwrap();
                    let free: Vec<&String> = links.iter().filter(|n| !faulted.contains_key(*n) && !(spared && **n == cluster_link)).collect();
                    // Leave one seller's link whole, so that work goes on.
                    let whole_sellers = free.iter().filter(|n| n.starts_with('s')).count();
                    let free: Vec<&String> = free.into_iter().filter(|n| !n.starts_with('s') || whole_sellers > 1).collect();
                    free.get(rng.gen_range(0..free.len().max(1))).map(|&name| {
                        match kind {
                            Fault::Partition => lab.set_link(name, false),
                            Fault::Loss => lab.set_loss(name, rng.gen_range(10..=40)),
                            _ => lab.set_rate(name, 64 << rng.gen_range(0..4)),
                        }
                        let heal = match kind {
                            Fault::Partition => rng.gen_range(1000..10_000),
                            _ => rng.gen_range(3000..10_000),
                        };
                        faulted.insert(name.clone(), now + Duration::from_millis(heal));
                        format!("{name}'s link for {heal} ms")
                    })
                }
            };
            if let Some(what) = struck {
                // A line per fault, so that a failed run's story can be read back.
                eprintln!("soak: {:.1} s: {kind:?} of {what}", started.elapsed().as_secs_f64());
                *faults.entry(kind).or_default() += 1;
                next_fault = now + Duration::from_millis(rng.gen_range(1500..5000));
                next_kind = Fault::roll(&mut rng, net.0.is_some());
            } else {
                // Not now (no job under way, no link free): the same fault a little later.
                next_fault = now + Duration::from_millis(200);
            }
        }

        note(&mut peak, "exchange", ex.process.0.id());
        for s in &sellers {
            if let Some(r) = &s.process {
                note(&mut peak, "seller", r.0.id());
                // Whether it grows with the run: the first half's peak against the whole run's.
                if started.elapsed() < Duration::from_secs(secs / 2) {
                    note(&mut peak, "seller in the first half", r.0.id());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The end: no lease stuck, the escrow back, the books balanced, each buyer's spend its reports'.
    for b in &buyers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !json(&b.dir, &["leases"]).as_array().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "leases outlived every job of {}: {}", b.name, json(&b.dir, &["leases"]));
            std::thread::sleep(Duration::from_millis(200));
        }
        let balance = json(&b.dir, &["balance"]);
        assert_eq!(balance["escrow (EUR)"], "0.00", "{balance}");
        let spent = 10_000_000 - cents(&balance["available (EUR)"]);
        assert_eq!(spent, b.cost, "{} paid what its jobs' reports say (and its killed jobs cost), to the cent", b.name);
    }
    let audit = json(&operator, &["exchange", "audit"]);
    assert_eq!(audit["ok"], true, "{audit}");
    // Memory: bounded (generous bounds: what matters is that it does not grow with the run).
    for (what, kib) in &peak {
        assert!(*kib < 512 * 1024, "{what} reached {kib} KiB");
    }
    eprintln!(
        "soak report: {:.0} s, seed {seed}: {jobs} jobs, {tiles} tiles, each with one result equal to a local run's; {reruns} reruns; \
         {clusters} clusters, {vm_nodes} VMs, each booted once, {ticks} ticks of their clocks, {pings} of them with the buyer answering a ping; \
         faults {}; the buyers paid {} cents, as their reports say; audit ok; peak memory {}",
        started.elapsed().as_secs_f64(),
        faults.iter().map(|(f, n)| format!("{f:?} {n}")).collect::<Vec<_>>().join(", "),
        buyers.iter().map(|b| b.cost.to_string()).collect::<Vec<_>>().join(" and "),
        peak.iter().map(|(w, k)| format!("{w} {} MiB", k / 1024)).collect::<Vec<_>>().join(", ")
    );
    assert!(jobs >= 1);
    if iso.is_some() {
        assert!(clusters >= 1 && ticks >= 1, "a cluster ran: {clusters} clusters, {ticks} ticks");
    }
}
