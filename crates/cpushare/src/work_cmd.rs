//! `cpushare sell` and `cpushare run`: the two halves of the original CPUShare.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use cpushare_buyer::{Fragment, FragmentResult, Input, Job, Progress, Report};
use cpushare_exchange::convert::{euros, kind_to};
use cpushare_market::SandboxKind;
use cpushare_proto::v1 as pb;
use cpushare_seller::{Seller, SellerConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::node_cmd::{connect, connect_patiently, status};
use crate::table::Output;

#[derive(Args)]
pub struct SellArgs {
    /// CPU slots to offer.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Ask, in cents per CPU-hour.
    #[arg(long, default_value_t = 5)]
    price: u64,
    /// Ask for VMs under software emulation (vm-tcg, offered when QEMU runs here), which run
    /// CPU-bound work about five times slower than the jail [default: a fifth of --price, at least 1].
    #[arg(long, value_name = "CENTS")]
    vm_tcg_price: Option<u64>,
    /// RAM per slot in MiB (default: half of this machine's RAM shared among the slots).
    #[arg(long, value_name = "MIB")]
    ram_per_slot: Option<u32>,
    /// Show this seller's slots, leases and earnings instead of selling.
    #[arg(long)]
    status: bool,
}

pub async fn sell(args: SellArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    if args.status {
        return sell_status(config, out).await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(args.cpus >= 1, "--cpus must be at least 1");
    let mut seller_config = SellerConfig::new(config.to_path_buf(), args.cpus, args.price);
    if let Some(p) = args.vm_tcg_price {
        anyhow::ensure!(p >= 1, "--vm-tcg-price is in cents per CPU-hour and must be at least 1");
        seller_config.vm_tcg_price = p;
    }
    if let Some(ram) = args.ram_per_slot {
        anyhow::ensure!(ram >= 16, "--ram-per-slot is in MiB and must be at least 16");
        seller_config.ram_per_slot_mib = ram;
    }
    let seller = Seller::start(seller_config.clone()).await?;
    let p = seller.probe();
    println!(
        "selling {} slot(s) of {} MiB at {} cents per CPU-hour: {} MFLOPS per CPU, kernel {}, seccomp strict works, {} ms to the exchange",
        args.cpus, seller_config.ram_per_slot_mib, args.price, p.score, p.kernel, p.latency_ms
    );
    if p.vm_tcg {
        let kvm = if p.vm_kvm { "; vm-kvm at the full price" } else { "" };
        println!("VMs: vm-tcg at {} cents per CPU-hour ({}){kvm}", seller_config.vm_tcg_price, p.qemu_version);
    }
    println!("(Ctrl-C or SIGTERM stops; `cpushare sell --status` shows slots, leases and earnings)");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn({
        let seller = seller.clone();
        async move { seller.run(stopped).await }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    let _ = stop.send(true);
    let _ = task.await;
    Ok(())
}

async fn sell_status(config: &Path, out: Output) -> anyhow::Result<()> {
    let mut conn = connect(config).await?;
    let orders = conn.exchange.list_orders(pb::ListOrdersRequest {}).await.map_err(status)?.into_inner().orders;
    let leases = conn.exchange.list_leases(pb::ListLeasesRequest {}).await.map_err(status)?.into_inner().leases;
    let balance = conn.exchange.balance(pb::BalanceRequest {}).await.map_err(status)?.into_inner();
    let statement = conn.exchange.statement(pb::StatementRequest { limit: 10_000, before_seq: 0 }).await.map_err(status)?.into_inner();
    let earned: i64 = statement.entries.iter().filter(|e| e.reason.contains("metered") && e.amount_cents > 0).map(|e| e.amount_cents).sum();
    let slots: Vec<_> = orders.iter().filter(|o| o.side == "sell").collect();
    let selling: Vec<_> = leases.iter().filter(|l| l.role == "seller").collect();
    if out.json {
        println!(
            "{}",
            json!({
                "slots": slots.len(),
                "leased": slots.iter().filter(|o| o.leased > 0).count(),
                "leases": selling.iter().map(|l| json!({"lease": l.id, "state": l.state, "price_cents": l.price, "delivered_secs": l.delivered_secs, "charged_cents": l.charged_cents})).collect::<Vec<_>>(),
                "earned_cents": earned,
                "available_cents": balance.available_cents,
            })
        );
        return Ok(());
    }
    println!("slots: {} ({} leased)", slots.len(), slots.iter().filter(|o| o.leased > 0).count());
    out.table(
        &["lease", "state", "cents/CPU-h", "delivered s", "charged EUR"],
        selling.iter().map(|l| vec![json!(l.id), json!(l.state), json!(l.price), json!(l.delivered_secs), json!(euros(l.charged_cents))]).collect(),
    );
    println!("earned so far: {} EUR (available: {} EUR)", euros(earned), euros(balance.available_cents));
    Ok(())
}

#[derive(Args)]
pub struct RunArgs {
    /// The program: a static x86-64 executable (any, run unmodified; for
    /// --inputs, one that reads a fragment on stdin: see guest/ for the SDK).
    program: PathBuf,
    /// Arguments passed to the program (after --).
    #[arg(last = true)]
    args: Vec<String>,
    /// A directory of inputs: each file is one fragment (with --outputs; without
    /// either, the program runs once, unmodified, as with --emulate).
    #[arg(long, value_name = "DIR", requires = "outputs")]
    inputs: Option<PathBuf>,
    /// Where each fragment's output goes (same file names; NAME.error for failures).
    #[arg(long, value_name = "DIR", requires = "inputs")]
    outputs: Option<PathBuf>,
    /// Run only the inputs with no output in --outputs yet (failures, NAME.error,
    /// run again): to pick up a run that was cut short, paying only for the rest.
    #[arg(long, requires = "inputs")]
    resume: bool,
    /// CPUs to rent.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// The most you pay, in cents per CPU-hour.
    #[arg(long, default_value_t = 5)]
    max_price: u64,
    /// Run each fragment on this many sellers of different accounts and compare outputs.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Minimum RAM per CPU in MiB.
    #[arg(long, default_value_t = 0)]
    min_ram: u32,
    /// Run here, in the same jail, with no exchange and no money (gdb and strace work).
    #[arg(long)]
    local: bool,
    /// The program serves many fragments in one jail (built with the SDK's
    /// stream mode: cs_stream_next in C, cpushare_guest::stream in Rust).
    /// Much faster for small fragments.
    #[arg(long)]
    stream: bool,
    /// Run an unmodified static program (musl or glibc, static or static-pie)
    /// on one rented CPU as if here: its system calls are answered by the
    /// jail's supervisor, it sees only the --mount directories (the seller
    /// fetches what it opens; what it changes is written back here when it
    /// ends), stdin feeds it, its stdout and stderr stream back live and its
    /// exit status is this command's (125 if the jail ended it). The default
    /// when there are no --inputs.
    #[arg(long, conflicts_with_all = ["inputs", "outputs", "stream", "replicas"])]
    emulate: bool,
    /// With --emulate: a directory the program sees, HOST_DIR:GUEST_PATH[:ro]
    /// (repeatable). Default: the current directory, read-write, at its own path.
    #[arg(long, value_name = "HOST:GUEST[:ro]")]
    mount: Vec<String>,
    /// With --emulate: an environment variable for the program, NAME=VALUE or
    /// NAME for ours (repeatable). On a seller it gets only LANG, LC_ALL, TERM
    /// and TZ otherwise; with --local, all of ours.
    #[arg(long, value_name = "NAME[=VALUE]")]
    env: Vec<String>,
    /// With --emulate: also keep a copy of the program's stdout and stderr in FILE.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
}

/// The progress bar, and each fragment's output written to the outputs
/// directory as soon as it is settled: a run cut short keeps what it finished,
/// and outputs do not pile up in memory.
struct Bar {
    bar: ProgressBar,
    outputs: PathBuf,
    /// What could not be written as it came (it is written at the end, or the run fails there).
    unwritten: std::sync::Mutex<Vec<String>>,
}

impl Progress for Bar {
    fn done(&self, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
    }
    fn note(&self, message: &str) {
        self.bar.println(message);
    }
    fn settled(&self, result: &FragmentResult) -> bool {
        match write_output(result, &self.outputs) {
            Ok(()) => true,
            Err(e) => {
                self.bar.println(format!("{e:#}"));
                self.unwritten.lock().unwrap().push(result.name.clone());
                false
            }
        }
    }
}

pub fn bar(total: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} fragments  {elapsed}").unwrap());
    pb
}

/// The fragments of the inputs directory `dir`, sorted by name, but for those
/// `skip` names; returns them and how many were skipped.
pub fn read_inputs(dir: &Path, skip: impl Fn(&str) -> bool) -> anyhow::Result<(Vec<Fragment>, usize)> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the inputs directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    anyhow::ensure!(!names.is_empty(), "{} holds no input files: each file is one fragment", dir.display());
    let all = names.len();
    names.retain(|p| !skip(&p.file_name().unwrap().to_string_lossy()));
    let skipped = all - names.len();
    let fragments = names
        .into_iter()
        .map(|p| {
            Ok(Fragment {
                name: p.file_name().unwrap().to_string_lossy().into_owned(),
                // Read a piece at a time as it is sent: the inputs need not fit in memory.
                input: Input::file(&p).with_context(|| format!("reading {}", p.display()))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((fragments, skipped))
}

pub async fn run(args: RunArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    let program = std::fs::read(&args.program).with_context(|| format!("cannot read the program {}", args.program.display()))?;
    anyhow::ensure!(program.starts_with(b"\x7fELF"), "{} is not an ELF executable", args.program.display());
    // The loader's own checks (both jails load programs alike), here, before any CPU is paid for.
    cpushare_sandbox::elf::check(&program).map_err(|why| anyhow::anyhow!("{} is not a program the jail can run: {why}", args.program.display()))?;
    if args.emulate || args.inputs.is_none() {
        anyhow::ensure!(!args.stream && args.replicas == 1, "--stream and --replicas are for fragments: give --inputs and --outputs");
        let request = crate::emulate_cmd::Request {
            path: args.program,
            elf: program,
            args: args.args,
            mounts: args.mount,
            env: args.env,
            log: args.log,
            local: args.local,
            max_price: args.max_price,
            min_ram_mib: args.min_ram,
        };
        return crate::emulate_cmd::run(request, config).await;
    }
    let (Some(inputs), Some(outputs)) = (args.inputs, args.outputs) else { anyhow::bail!("--inputs and --outputs are needed") };
    let done = |name: &str| args.resume && outputs.join(name).is_file();
    let (fragments, skipped) = read_inputs(&inputs, done)?;
    std::fs::create_dir_all(&outputs).with_context(|| format!("cannot create {}", outputs.display()))?;
    if fragments.is_empty() {
        // Everything is there already: no order, nothing paid.
        summarize(&Report::default(), skipped, out, args.local);
        return Ok(());
    }
    let argv0 = args.program.file_name().map_or("program".into(), |n| n.to_string_lossy().into_owned());
    let job = Job {
        program,
        args: std::iter::once(argv0).chain(args.args).collect(),
        fragments,
        cpus: args.cpus,
        max_price: args.max_price,
        requirements: pb::Requirements {
            kind: kind_to(SandboxKind::SeccompStrict) as i32,
            min_ram_mib: args.min_ram,
            ..Default::default()
        },
        replicas: args.replicas,
        stream: args.stream,
    };
    let total = job.fragments.len();
    let pb = if out.json { ProgressBar::hidden() } else { bar(total) };
    let progress = Arc::new(Bar { bar: pb.clone(), outputs: outputs.clone(), unwritten: Default::default() });
    let report = if args.local {
        let limits = cpushare_sandbox::Limits::default();
        cpushare_buyer::run_local(job, args.cpus as usize, limits, true, progress.clone()).await?
    } else {
        // An exchange restarting is waited for, as the run waits for it later.
        let conn = connect_patiently(config, |m| progress.note(m)).await?;
        cpushare_buyer::run(conn, job, progress.clone()).await?
    };
    pb.finish_and_clear();
    // One more try for what could not be written as it came (the report still holds it).
    let unwritten = std::mem::take(&mut *progress.unwritten.lock().unwrap());
    for r in report.results.iter().filter(|r| unwritten.contains(&r.name)) {
        write_output(r, &outputs)?;
    }
    let failed = report.results.iter().filter(|r| !r.success).count();
    summarize(&report, skipped, out, args.local);
    anyhow::ensure!(failed == 0, "{failed} fragment(s) failed: see the .error files in {}", outputs.display());
    Ok(())
}

/// Writes a fragment's output as NAME (or, if it failed, how and its log as
/// NAME.error), through a temporary file renamed into place: a file there is
/// whole.
fn write_output(r: &FragmentResult, dir: &Path) -> anyhow::Result<()> {
    let (name, body, stale) = if r.success {
        (r.name.clone(), std::borrow::Cow::Borrowed(&r.output[..]), format!("{}.error", r.name))
    } else {
        let text = format!("{}\n--- log ---\n{}", r.ending, String::from_utf8_lossy(&r.log));
        (format!("{}.error", r.name), std::borrow::Cow::Owned(text.into_bytes()), r.name.clone())
    };
    // What an earlier run into the same directory left for this fragment goes.
    let _ = std::fs::remove_file(dir.join(stale));
    let part = dir.join(format!(".{name}.part"));
    std::fs::write(&part, &body).with_context(|| format!("cannot write {}", part.display()))?;
    std::fs::rename(&part, dir.join(&name)).with_context(|| format!("cannot write {}", dir.join(&name).display()))?;
    Ok(())
}

/// The closing summary; `skipped`: fragments not run because their outputs were there (--resume).
pub fn summarize(report: &Report, skipped: usize, out: Output, local: bool) {
    let ok = report.results.iter().filter(|r| r.success).count();
    if out.json {
        println!(
            "{}",
            json!({
                "fragments": report.results.len(),
                "succeeded": ok,
                "skipped": skipped,
                "reruns": report.reruns,
                "mismatches": report.mismatches.iter().map(|m| json!({"fragment": m.fragment, "seller_account": m.seller_account, "seller_node": m.seller_node})).collect::<Vec<_>>(),
                "per_seller_node": report.per_seller,
                "leases": report.leases,
                "cost_cents": report.cost_cents,
            })
        );
        return;
    }
    println!("fragments   {} ({} succeeded)", report.results.len(), ok);
    if skipped > 0 {
        println!("skipped     {skipped} (their outputs were there: --resume)");
    }
    println!("reruns      {}", report.reruns);
    for m in &report.mismatches {
        println!("mismatch    {}: seller node {} (account {}) disagreed with the others", m.fragment, m.seller_node, m.seller_account);
    }
    if local {
        println!("ran locally; no money moved");
        return;
    }
    let per: Vec<String> = report.per_seller.iter().map(|(n, c)| format!("node {n}: {c}")).collect();
    println!("per seller  {}", per.join(", "));
    println!("leases      {}", report.leases);
    println!("cost        {} cents ({} EUR)", report.cost_cents, euros(report.cost_cents));
}
