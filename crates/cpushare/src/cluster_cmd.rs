//! `cpushare cluster start/status/console/stop`: VMs booting your livecd on
//! sellers' hosts. `start` runs in the foreground (Ctrl-C stops the cluster);
//! the others act on the cluster whose directory they are given.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use cpushare_buyer::cluster::{run_cluster, ClusterSpec, Event, Node};
use cpushare_buyer::Progress;
use cpushare_proto::v1 as pb;
use serde_json::json;
use tokio::sync::mpsc;

use crate::node_cmd::{connect, connect_patiently, status};
use crate::table::Output;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Rent N machines that boot your livecd, send it to each seller (once per
    /// seller: an interrupted upload resumes), wait until every node has booted
    /// and print them; then keep their consoles in DIR until Ctrl-C or
    /// `cluster stop` ends the cluster (the unspent escrow comes back).
    Start(StartArgs),
    /// The cluster's nodes: lease, seller, state, how each booted.
    Status(DirArg),
    /// A node's serial console so far (its lease id, from `cluster status`).
    Console(ConsoleArgs),
    /// End the cluster: every lease ends now.
    Stop(DirArg),
}

#[derive(Args)]
pub struct StartArgs {
    /// The livecd: an ISO 9660 image (isolinux, syslinux or GRUB, or anything a BIOS boots).
    #[arg(long, value_name = "FILE")]
    iso: PathBuf,
    /// Machines to rent.
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// The most you pay, in cents per CPU-hour (per node: one vCPU each).
    #[arg(long, default_value_t = 5)]
    max_price: u64,
    /// Guest RAM per node: MiB, or with a unit (512M, 1G).
    #[arg(long, default_value = "512", value_name = "SIZE", value_parser = mib)]
    ram: u32,
    /// A writable scratch disk per node, in the seller's RAM (slots need RAM for both): MiB, or 512M, 2G.
    #[arg(long, default_value = "0", value_name = "SIZE", value_parser = mib)]
    scratch: u32,
    /// Only hosts where KVM boots Linux (otherwise software emulation, about 5x slower for CPU-bound work, is fine).
    #[arg(long)]
    kvm_only: bool,
    /// When a node's seller vanishes, carry on with fewer nodes instead of booting a replacement elsewhere.
    #[arg(long)]
    no_replace: bool,
    /// No private network among the nodes (by default they and this host share 10.77.0.0/16, this host at .1).
    #[arg(long)]
    no_network: bool,
    /// This host's interface on the cluster's network (needs CAP_NET_ADMIN; without it, the SOCKS5 proxy below).
    #[arg(long, default_value = "cpushare0", value_name = "NAME")]
    tap: String,
    /// Without the interface: a SOCKS5 proxy into the cluster's network here (`curl --socks5 127.0.0.1:1080 http://10.77.0.2/`).
    #[arg(long, default_value = "127.0.0.1:1080", value_name = "ADDR")]
    socks: std::net::SocketAddr,
    /// Share a directory of this host with the nodes, read-write over NFSv3 at
    /// 10.77.0.1:/NAME (NAME: the directory's name unless given). What a node
    /// writes is on this disk once written, whatever becomes of the node; the
    /// nodes act in it as your user, confined to it. Livecds made by
    /// scripts/make-live-iso --share NAME mount it at /mnt/NAME. Repeatable.
    #[arg(long, value_name = "DIR[:NAME]")]
    share: Vec<cpushare_buyer::share::ShareSpec>,
    #[command(flatten)]
    dir: DirArg,
}

#[derive(Args)]
pub struct DirArg {
    /// The cluster's directory: its state and each node's console log.
    #[arg(long, default_value = "cpushare-cluster", value_name = "DIR")]
    dir: PathBuf,
}

/// A size in MiB: a number of MiB, or one with a unit (K, M, G; KiB, MiB, GiB).
fn mib(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a size (examples: 512, 512M, 1G)"))?;
    let kib = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => n << 10,
        "g" | "gb" | "gib" => n << 20,
        "k" | "kb" | "kib" => n,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use M or G")),
    };
    if kib % 1024 != 0 {
        return Err(format!("{s} is not a whole number of MiB"));
    }
    u32::try_from(kib >> 10).map_err(|_| format!("{s} is too large"))
}

#[derive(Args)]
pub struct ConsoleArgs {
    /// The node's lease id.
    lease: u64,
    /// Keep printing what the guest writes until its lease ends (Ctrl-C stops).
    #[arg(long, short)]
    follow: bool,
    #[command(flatten)]
    dir: DirArg,
}

/// What `start` leaves for the other commands.
fn state_path(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

fn read_state(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let path = state_path(dir);
    let text = std::fs::read_to_string(&path).with_context(|| format!("no cluster in {} (start one with `cpushare cluster start`)", dir.display()))?;
    Ok(serde_json::from_str(&text)?)
}

struct Notes;

impl Progress for Notes {
    fn note(&self, message: &str) {
        eprintln!("cpushare: {message}");
    }
}

pub async fn run(cmd: ClusterCmd, config: &Path, out: Output) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Start(args) => start(args, config, out).await,
        ClusterCmd::Status(d) => show(&d.dir, config, out).await,
        ClusterCmd::Console(args) => console(args, config).await,
        ClusterCmd::Stop(d) => {
            let state = read_state(&d.dir)?;
            let order = state["order"].as_u64().context("a cluster state without its order")?;
            let mut conn = connect(config).await?;
            conn.exchange.cancel_order(pb::CancelOrderRequest { order }).await.map_err(status)?;
            println!("cluster stopped: order {order} cancelled, its leases ended");
            Ok(())
        }
    }
}

/// A node's console log so far; with `--follow`, then what is added, until the lease ends.
async fn console(args: ConsoleArgs, config: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let log = args.dir.dir.join(format!("console-{}.log", args.lease));
    let mut file = std::fs::File::open(&log).with_context(|| format!("no console for lease {} in {}", args.lease, args.dir.dir.display()))?;
    let mut stdout = std::io::stdout();
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    stdout.write_all(&buf)?;
    if !args.follow {
        return Ok(());
    }
    stdout.flush()?;
    let mut conn = connect(config).await?;
    let mut at = buf.len() as u64;
    let mut checked = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
        buf.clear();
        file.seek(SeekFrom::Start(at))?;
        at += file.read_to_end(&mut buf)? as u64;
        stdout.write_all(&buf)?;
        stdout.flush()?;
        // The buyer's `cluster start` writes the log; the lease's end ends it.
        if checked.elapsed() > std::time::Duration::from_secs(2) {
            checked = std::time::Instant::now();
            let leases = conn.exchange.list_leases(pb::ListLeasesRequest {}).await.map_err(status)?.into_inner().leases;
            if !leases.iter().any(|l| l.id == args.lease) {
                eprintln!("cpushare: lease {} has ended", args.lease);
                return Ok(());
            }
        }
    }
}

async fn start(args: StartArgs, config: &Path, out: Output) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    let dir = args.dir.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let spec = ClusterSpec {
        iso: args.iso.clone(),
        nodes: args.nodes,
        max_price: args.max_price,
        ram_mib: args.ram,
        scratch_mib: args.scratch,
        kvm_only: args.kvm_only,
        logs: dir.clone(),
        replace: !args.no_replace,
        network: !args.no_network,
        tap: Some(args.tap.clone()),
        socks: Some(args.socks),
        shares: args.share.clone(),
    };
    // An exchange restarting (or a link coming back) is waited for, as the cluster waits for it later.
    let conn = connect_patiently(config, |m| Notes.note(m)).await?;
    let (tx, mut rx) = mpsc::channel(64);
    let cluster = tokio::spawn(run_cluster(conn.clone(), spec, tx, Arc::new(Notes)));
    let mut booted: Vec<Node> = Vec::new();
    let mut order = 0;
    // One bar per node whose seller lacks the image (a seller that has it uploads nothing).
    let bars = MultiProgress::new();
    let mut uploads: std::collections::HashMap<u64, ProgressBar> = Default::default();
    let save = |order: u64, booted: &[Node]| {
        let nodes: Vec<_> =
            booted.iter().map(|n| json!({"lease": n.lease, "seller_node": n.seller_node, "boot": n.boot, "accel": n.accel, "ip": n.ip, "attested": n.attested.to_string()})).collect();
        let state = json!({"order": order, "iso": args.iso, "nodes": nodes});
        std::fs::write(state_path(&dir), serde_json::to_string_pretty(&state).unwrap())
    };
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                Some(Event::Placed { order: o }) => {
                    order = o;
                    save(order, &booted)?;
                    eprintln!("cpushare: order {o} placed for {} node(s); waiting for sellers (the image goes to each once)", args.nodes);
                }
                Some(Event::Uploading { lease, sent, total }) => {
                    let bar = uploads.entry(lease).or_insert_with(|| upload_bar(&bars, lease, total));
                    bar.set_position(sent);
                    if sent >= total {
                        bar.finish_and_clear();
                    }
                }
                Some(Event::Booted(n)) => {
                    if let Some(bar) = uploads.remove(&n.lease) {
                        bar.finish_and_clear();
                    }
                    let _ = bars.println(format!("cpushare: lease {} {}", n.lease, n.attested));
                    eprintln!("cpushare: lease {} booted on seller node {} ({}, {}; {} bytes uploaded)", n.lease, n.seller_node, n.boot, n.accel, n.uploaded);
                    booted.push(n);
                    save(order, &booted)?;
                    if booted.len() == args.nodes as usize {
                        let rows = booted.iter().map(|n| vec![json!(n.lease), json!(n.seller_node), json!(n.ip), json!(n.boot), json!(n.accel), json!(n.console_log.display().to_string())]).collect();
                        out.table(&["lease", "seller node", "ip", "boot", "accel", "console"], rows);
                        eprintln!("cpushare: all {} node(s) up; Ctrl-C or `cpushare cluster stop --dir {}` ends the cluster", args.nodes, dir.display());
                    }
                }
                Some(Event::Stopped { lease, why }) => eprintln!("cpushare: lease {lease}: {why}"),
                // The cluster is over: its outcome (an error, such as a file that is no livecd) is ours.
                None => return cluster.await?,
            },
            _ = &mut stop => {
                eprintln!("cpushare: stopping the cluster");
                if order != 0 {
                    let mut ex = conn.exchange.clone();
                    let _ = ex.cancel_order(pb::CancelOrderRequest { order }).await;
                }
                cluster.abort();
                let _ = cluster.await;
                return Ok(());
            }
        }
    }
}

fn upload_bar(bars: &MultiProgress, lease: u64, total: u64) -> ProgressBar {
    let bar = bars.add(ProgressBar::new(total));
    let style = ProgressStyle::with_template("image to lease {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left").expect("a valid template");
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(lease.to_string());
    bar
}

async fn show(dir: &Path, config: &Path, out: Output) -> anyhow::Result<()> {
    let state = read_state(dir)?;
    let order = state["order"].as_u64().context("a cluster state without its order")?;
    let mut conn = connect(config).await?;
    let leases = conn.exchange.list_leases(pb::ListLeasesRequest {}).await.map_err(status)?.into_inner().leases;
    let booted = state["nodes"].as_array().cloned().unwrap_or_default();
    let how = |lease: u64| {
        booted.iter().find(|n| n["lease"] == lease).map_or("-".to_string(), |n| format!("{} / {}", n["boot"].as_str().unwrap_or("?"), n["accel"].as_str().unwrap_or("?")))
    };
    let attested = |lease: u64| booted.iter().find(|n| n["lease"] == lease).and_then(|n| n["attested"].as_str()).unwrap_or("not booted yet").to_string();
    let ip = |lease: u64| booted.iter().find(|n| n["lease"] == lease).and_then(|n| n["ip"].as_str()).filter(|ip| !ip.is_empty()).unwrap_or("-").to_string();
    let live: Vec<&pb::Lease> = leases.iter().filter(|l| l.buy_order == order).collect();
    let mut rows: Vec<Vec<serde_json::Value>> =
        live.iter().map(|l| vec![json!(l.id), json!(l.seller_node), json!(l.state), json!(ip(l.id)), json!(how(l.id)), json!(l.delivered_secs), json!(l.charged_cents), json!(attested(l.id))]).collect();
    // Nodes whose leases have ended are no longer listed by the exchange.
    for n in &booted {
        let lease = n["lease"].as_u64().unwrap_or(0);
        if !live.iter().any(|l| l.id == lease) {
            rows.push(vec![json!(lease), n["seller_node"].clone(), json!("ended"), json!(ip(lease)), json!(how(lease)), json!(null), json!(null), json!(attested(lease))]);
        }
    }
    out.table(&["lease", "seller node", "state", "ip", "boot / accel", "delivered s", "charged cents", "attestation"], rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_mib() {
        assert_eq!(super::mib("512"), Ok(512));
        assert_eq!(super::mib("512M"), Ok(512));
        assert_eq!(super::mib("1G"), Ok(1024));
        assert_eq!(super::mib("2GiB"), Ok(2048));
        assert_eq!(super::mib("2048k"), Ok(2));
        assert!(super::mib("1.5G").unwrap_err().contains("unknown unit"));
        assert!(super::mib("100k").unwrap_err().contains("whole number"));
        assert!(super::mib("lots").unwrap_err().contains("not a size"));
        assert!(super::mib("9999999G").unwrap_err().contains("too large"));
    }
}
