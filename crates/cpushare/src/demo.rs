//! `cpushare demo`: the whole system on this machine in one command.
//!
//! An exchange on SQLite in a temporary directory, three sellers and a funded
//! buyer, all over mutual TLS on localhost. The buyer renders a Mandelbrot
//! image in tiles across the sellers; halfway, one seller is killed (unless
//! `--no-faults`) and its tile in flight runs again elsewhere. The image lands
//! in `demo-out/mandelbrot.png`, and the bill is printed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use cpushare_buyer::{Fragment, Job, Progress};
use cpushare_exchange::convert::{euros, kind_to};
use cpushare_market::SandboxKind;
use cpushare_proto::v1 as pb;
use cpushare_sandbox::examples;
use cpushare_seller::testbed::{SellerHandle, Testbed};
use indicatif::ProgressBar;

use crate::table::Output;
use crate::work_cmd::bar;

#[derive(Args)]
pub struct DemoArgs {
    /// Where the image goes.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Do not kill a seller halfway.
    #[arg(long)]
    no_faults: bool,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 2000)]
    width: u32,
    #[arg(long, default_value_t = 1200)]
    height: u32,
    /// Instead: a cluster of two VMs booting a small livecd (built with
    /// scripts/make-live-iso; needs QEMU), one replaced when its seller vanishes.
    #[arg(long)]
    vm: bool,
}

const TILE_W: u32 = 200;
const TILE_H: u32 = 100;
/// Play money at a visible scale: euros per CPU-hour.
const SELLERS: [(&str, u64); 3] = [("alice", 3000), ("bob", 4000), ("carol", 5000)];

/// Kills a seller once half the tiles are in.
struct Chaos {
    bar: ProgressBar,
    victim: Mutex<Option<SellerHandle>>,
    killed: AtomicBool,
    /// Stdout carries the JSON report: the story goes to stderr.
    json: bool,
}

impl Chaos {
    fn say(&self, line: String) {
        // Above the bar on a terminal; plainly otherwise (the bar is then hidden).
        if self.json {
            eprintln!("{line}");
        } else if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Progress for Chaos {
    fn done(&self, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        if done * 2 >= total && !self.killed.swap(true, Ordering::SeqCst) {
            if let Some(v) = self.victim.lock().unwrap().take() {
                self.say(format!("!! seller {} vanished mid-job ({done} of {total} tiles in): what it was running will run elsewhere", v.name));
                v.kill();
            }
        }
    }
    fn note(&self, message: &str) {
        self.say(format!("   {message}"));
    }
}

pub async fn run(args: DemoArgs, out: Output) -> anyhow::Result<()> {
    // Quiet by default: the demo tells its own story. RUST_LOG=info shows every actor's log.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
    }
    if args.vm {
        return crate::demo_vm::run(&args.out, args.no_faults, out).await;
    }
    anyhow::ensure!(args.width >= TILE_W && args.height >= TILE_H, "the image must be at least {TILE_W}x{TILE_H}");
    let started = Instant::now();
    let tmp = std::env::temp_dir().join(format!("cpushare-demo-{}", std::process::id()));
    let _cleanup = Cleanup(tmp.clone());
    // The story of the run; with --json, stdout carries only the report.
    let say = |line: String| if out.json { eprintln!("{line}") } else { println!("{line}") };
    say(format!("starting an exchange, three sellers and a buyer on localhost (in {})", tmp.display()));
    let mut tb = Testbed::start(&tmp, 3).await.context("starting the exchange")?;
    for (name, price) in SELLERS {
        let s = tb.seller(name, 1, price, |_| {}).await.with_context(|| format!("starting seller {name}"))?;
        say(format!("   seller {name}: 1 slot at {price} cents per CPU-hour, {} MFLOPS", s.seller.probe().score));
    }
    let buyer = tb.member("buyer", 20_000).await?;
    say("   buyer: 200.00 EUR deposited (an hour's escrow for three CPUs is held while it runs)".into());

    // Tiles, row by row.
    let (cols, rows) = (args.width / TILE_W, args.height / TILE_H);
    let step = 3.0 / (cols * TILE_W) as f64;
    let (x0, y0) = (-2.2, -((rows * TILE_H) as f64) * step / 2.0);
    let fragments: Vec<Fragment> = (0..rows * cols)
        .map(|i| {
            let (tx, ty) = (i % cols, i / cols);
            let input = format!(
                "{} {} {} {TILE_W} {TILE_H} 3000",
                x0 + (tx * TILE_W) as f64 * step,
                y0 + (ty * TILE_H) as f64 * step,
                step
            );
            Fragment { name: format!("tile-{ty:02}-{tx:02}.pgm"), input: input.into_bytes().into() }
        })
        .collect();
    let total = fragments.len();
    say(format!("rendering a {}x{} Mandelbrot image in {total} tiles across the sellers", cols * TILE_W, rows * TILE_H));
    let job = Job {
        program: examples::MANDELBROT.to_vec(),
        args: vec!["mandelbrot".into()],
        fragments,
        cpus: 3,
        max_price: 6000,
        requirements: pb::Requirements { kind: kind_to(SandboxKind::SeccompStrict) as i32, ..Default::default() },
        replicas: 1,
        stream: false,
    };
    let bar = if out.json { ProgressBar::hidden() } else { bar(total) };
    let victim = if args.no_faults { None } else { Some(tb.sellers.remove(1)) };
    let chaos = Arc::new(Chaos { bar: bar.clone(), victim: Mutex::new(victim), killed: AtomicBool::new(false), json: out.json });
    let report = cpushare_buyer::run(buyer.connect().await?, job, chaos.clone()).await?;
    bar.finish_and_clear();

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let png = args.out.join("mandelbrot.png");
    stitch(&report.results, cols, rows, &png)?;

    // Let the last settlement land, then the bill.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut rows_out = Vec::new();
    for s in &tb.sellers {
        let mut c = s.node.connect().await?;
        let b = c.exchange.balance(pb::BalanceRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
        let tiles = report.per_seller.get(&s.node.node).copied().unwrap_or(0);
        rows_out.push(serde_json::json!([s.name, tiles, euros(b.available_cents)]));
    }
    let mut c = buyer.connect().await?;
    let b = c.exchange.balance(pb::BalanceRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
    let audit = tb.operator.admin.audit(pb::AuditRequest {}).await.map_err(|e| anyhow::anyhow!("{}", e.message()))?.into_inner();
    if out.json {
        println!(
            "{}",
            serde_json::json!({
                "image": png.display().to_string(),
                "tiles": total,
                "reruns": report.reruns,
                "cost_cents": report.cost_cents,
                "buyer_available_cents": b.available_cents,
                "sellers": rows_out,
                "exchange_fees_cents": audit.fees_cents,
                "ledger_ok": audit.ok,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!();
        println!("image          {}", png.display());
        println!("tiles          {total} ({} run again after the seller vanished)", report.reruns);
        println!("bill           {} EUR for {} leases", euros(report.cost_cents), report.leases);
        println!("buyer          {} EUR left", euros(b.available_cents));
        for r in &rows_out {
            println!("seller {:<7} {} tiles, earned {} EUR", r[0].as_str().unwrap(), r[1], r[2].as_str().unwrap());
        }
        println!("exchange fees  {} EUR", euros(audit.fees_cents));
        println!("ledger         {}", if audit.ok { "balanced" } else { &audit.problem });
        println!("took           {:.1} s", started.elapsed().as_secs_f64());
    }
    anyhow::ensure!(audit.ok, "the ledger does not balance: {}", audit.problem);
    tb.exchange.listening.shutdown().await;
    Ok(())
}

/// Assembles the PGM tiles (row by row) into one colour PNG.
fn stitch(results: &[cpushare_buyer::FragmentResult], cols: u32, rows: u32, path: &Path) -> anyhow::Result<()> {
    let (w, h) = (cols * TILE_W, rows * TILE_H);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    for (i, r) in results.iter().enumerate() {
        anyhow::ensure!(r.success, "tile {} failed: {}", r.name, r.ending);
        let header = format!("P5\n{TILE_W} {TILE_H}\n255\n");
        let pixels = r.output.strip_prefix(header.as_bytes()).context("a tile is not the PGM image expected")?;
        anyhow::ensure!(pixels.len() == (TILE_W * TILE_H) as usize, "tile {} is short", r.name);
        let (tx, ty) = (i as u32 % cols, i as u32 / cols);
        for y in 0..TILE_H {
            for x in 0..TILE_W {
                let v = pixels[(y * TILE_W + x) as usize] as u32;
                let at = (((ty * TILE_H + y) * w + tx * TILE_W + x) * 3) as usize;
                // Black inside the set; outside, deep blue (escapes at once) to white (near the edge).
                if v > 0 {
                    rgb[at] = (v * v / 255) as u8;
                    rgb[at + 1] = (v * v * v / (255 * 255)) as u8;
                    rgb[at + 2] = (64 + v * 191 / 255) as u8;
                }
            }
        }
    }
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&rgb)?;
    Ok(())
}

/// Removes the demo's temporary directory at the end.
pub(crate) struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
