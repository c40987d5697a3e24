//! A cluster of VMs booting the buyer's livecd on sellers' hosts: one buy
//! order for N nodes of kind `vm-tcg` (or `vm-kvm`), the image sent to each
//! seller once (a seller that has it, from an earlier lease of anyone's,
//! uploads nothing; an interrupted upload resumes), every node's serial
//! console written to a log file as the guest writes it. A node is trusted
//! only once its seller's signed statement of what it booted checks out
//! ([`crate::attestation`]); a seller that vanishes is replaced (the exchange
//! reopens the order) unless the spec says not to.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use cpushare_exchange::client::Connection;
use cpushare_exchange::job::{self, next};
use cpushare_proto::v1::{self as pb, job_message::Body as Say};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::share::ShareServer;

use crate::attestation::{self, Attested, Expected};
use crate::Progress;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The livecd (ISO 9660, bootable through isolinux/syslinux, GRUB or the BIOS).
    pub iso: PathBuf,
    pub nodes: u32,
    /// Cents per CPU-hour.
    pub max_price: u64,
    /// Guest RAM per node, MiB.
    pub ram_mib: u32,
    /// A writable scratch disk per node, MiB (RAM on the seller: slots must have RAM for both).
    pub scratch_mib: u32,
    /// Only hosts where KVM really boots Linux (otherwise software emulation is fine).
    pub kvm_only: bool,
    /// Where each node's console goes: `console-LEASE.log`.
    pub logs: PathBuf,
    /// Boot a replacement when a node's seller vanishes.
    pub replace: bool,
    /// Put the nodes and this host on one private network (10.77.0.0/16, this host at .1).
    pub network: bool,
    /// This host's interface on it (needs CAP_NET_ADMIN)...
    pub tap: Option<String>,
    /// ...or, without one, a SOCKS5 proxy into the network listening here
    /// (a userspace stack at this host's address). With neither, the
    /// network still runs, relaying for nodes that need it.
    pub socks: Option<std::net::SocketAddr>,
    /// The buyer's directories the nodes mount over the network
    /// (`10.77.0.1:/NAME`, NFSv3): see [`crate::share`].
    pub shares: Vec<crate::share::ShareSpec>,
}

/// One node, once it has booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub lease: u64,
    pub seller_node: u64,
    /// "direct" or "bios".
    pub boot: String,
    /// "kvm" or "tcg".
    pub accel: String,
    /// Bytes of the image sent to this seller (0: it had it), and how long that took.
    pub uploaded: u64,
    pub upload_time: std::time::Duration,
    pub console_log: PathBuf,
    /// The seller's signed statement, checked: what the node runs.
    pub attested: Attested,
    /// Its address on the cluster's network (empty without one).
    pub ip: String,
}

/// What happens to a cluster, as it happens.
#[derive(Debug, Clone)]
pub enum Event {
    /// The order is on the book.
    Placed { order: u64 },
    /// Image bytes sent to a node's seller so far, of `total` to send.
    Uploading { lease: u64, sent: u64, total: u64 },
    Booted(Node),
    /// A node's VM stopped (the guest powered off or crashed), or its lease ended.
    Stopped { lease: u64, why: String },
}

/// The buyer's address on its cluster's network (the network's member 1).
pub const BUYER_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 77, 0, 1);

/// Starts the cluster and runs until its order is cancelled (`stop`) or every
/// node has stopped; tells `events` what happens. The order is cancelled on
/// the way out, whatever ends it.
pub async fn run_cluster(conn: Connection, spec: ClusterSpec, events: mpsc::Sender<Event>, progress: Arc<dyn Progress>) -> anyhow::Result<()> {
    let ca = conn.ca().cloned().context("this connection does not trust the exchange's CA by its certificate, so nodes' attestations cannot be checked: use an enrolled node's configuration")?;
    let iso = spec.iso.clone();
    let (sha, size, expected) = tokio::task::spawn_blocking(move || image_facts(&iso)).await??;
    let expected = Arc::new(expected);
    std::fs::create_dir_all(&spec.logs).with_context(|| format!("cannot create {}", spec.logs.display()))?;
    // Shares are checked before any money moves.
    anyhow::ensure!(spec.shares.is_empty() || spec.network, "a share is reached over the cluster's network: --share needs it on");
    let shares = if spec.shares.is_empty() { None } else { Some(ShareServer::new(&spec.shares)?) };
    // Every call to the exchange waits out its restarts (crate::patiently): a
    // cluster outlives them, its VMs too (their sellers keep them running).
    let ex = conn.exchange.clone();
    let mut lease_events = crate::follow(&ex).await?;
    let kind = if spec.kvm_only { pb::SandboxKind::VmKvm } else { pb::SandboxKind::VmTcg };
    let requirements = pb::Requirements { kind: kind as i32, min_ram_mib: spec.ram_mib + spec.scratch_mib, ..Default::default() };
    let request = pb::PlaceBuyRequest { cpus: spec.nodes, max_price: spec.max_price, requirements: Some(requirements), period_secs: 3600, periods: 0, attended: true };
    let placed = crate::place(&ex, request).await?;
    let order = placed.order;
    let _ = events.send(Event::Placed { order }).await;
    // The cluster's network, with this host as its relay (and on it, given an interface).
    let _network = if spec.network {
        match join_as_buyer(&conn, order, &spec, shares, &progress).await {
            Ok(a) => Some(a),
            Err(e) => {
                let _ = crate::cancel(&ex, order).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let spec = Arc::new(spec);
    let mut workers = tokio::task::JoinSet::new();
    let mut pending = placed.leases.clone();
    let mut finished = 0u32;
    // A lease is announced both in the order's reply and in the events: served once.
    let mut started = std::collections::HashSet::new();
    let result = async {
        loop {
            if !pending.is_empty() {
                let leases = crate::list_leases(&ex).await?;
                for id in pending.drain(..) {
                    let Some(l) = leases.iter().find(|l| l.id == id && l.buy_order == order) else { continue };
                    if started.contains(&id) {
                        continue;
                    }
                    if !spec.replace && started.len() >= spec.nodes as usize {
                        // A replacement the buyer did not want: ended before anything is billed.
                        progress.note(&format!("lease {id} would replace a lost node: ended (no replacements asked for)"));
                        cancel_lease(&ex, id).await;
                        continue;
                    }
                    started.insert(id);
                    progress.note(&format!("lease {id} on seller node {}", l.seller_node));
                    let (conn, spec, events, node, ca, expected) = (conn.clone(), spec.clone(), events.clone(), l.seller_node, ca.clone(), expected.clone());
                    workers.spawn(async move {
                        let facts = Facts { order, ca: &ca, sha, size, expected: &expected };
                        let (why, end) = match boot_node(&conn, id, node, &spec, &facts, &events).await {
                            Ok(Stop::Finished(why)) => (why, true),
                            Ok(Stop::Untrusted(why)) => (format!("not trusted, lease ended: {why}"), true),
                            Ok(Stop::LeaseEnded) => ("the lease ended".to_string(), false),
                            Ok(Stop::SellerFault(why)) => (format!("lost: {why}"), false),
                            Err(e) => (format!("{e:#}"), false),
                        };
                        let _ = events.send(Event::Stopped { lease: id, why }).await;
                        (id, end)
                    });
                }
            }
            tokio::select! {
                e = lease_events.next() => match e {
                    Some(Ok(e)) if e.kind == "opened" => pending.push(e.lease),
                    Some(Ok(_)) => {}
                    // The exchange went away (a restart): follow it again, and pick up
                    // the order's leases that opened meanwhile.
                    Some(Err(_)) | None => {
                        progress.note("the exchange went away; reconnecting");
                        lease_events = crate::follow(&ex).await.context("the exchange did not come back")?;
                        let open = crate::list_leases(&ex).await?.into_iter().filter(|l| l.buy_order == order && l.state != "ended").map(|l| l.id);
                        pending.extend(open.filter(|id| !started.contains(id)));
                    }
                },
                Some(done) = workers.join_next() => {
                    // A VM that stopped by itself (or that the buyer does not trust) is
                    // done: its lease ends, billing with it. A node whose lease ended
                    // otherwise (its seller vanished) is replaced: the exchange reopens
                    // the order, and a new lease comes, unless replacements are off.
                    match done {
                        Ok((lease, true)) => {
                            cancel_lease(&ex, lease).await;
                            finished += 1;
                        }
                        Ok((_, false)) if !spec.replace => finished += 1,
                        _ => {}
                    }
                    if finished >= spec.nodes {
                        return Ok(());
                    }
                    if !crate::buy_orders(&ex).await?.contains(&order) && workers.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    let cancelled = crate::cancel(&ex, order).await;
    workers.shutdown().await;
    result.and(cancelled)
}

/// Ends a lease, through an exchange restart if need be (one already ended is ended enough).
async fn cancel_lease(ex: &crate::Client, lease: u64) {
    let _ = crate::patiently_on(ex, |mut ex| async move { ex.cancel_lease(pb::CancelLeaseRequest { lease }).await }).await;
}

/// Whether the lease still stands, asked through an exchange restart.
async fn stands(ex: &crate::Client, lease: u64) -> anyhow::Result<bool> {
    Ok(crate::list_leases(ex).await?.iter().any(|l| l.id == lease && l.state != "ended"))
}

/// Joins the cluster's network as its buyer: on it with an interface if
/// this host may make one, else through a SOCKS5 proxy, else as a relay only.
/// This host on its cluster's network, with the task serving its shares;
/// both end when it is dropped.
struct BuyerNetwork {
    _attached: cpushare_exchange::netclient::Attached,
    shares: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for BuyerNetwork {
    fn drop(&mut self) {
        if let Some(t) = &self.shares {
            t.abort();
        }
    }
}

async fn join_as_buyer(conn: &Connection, order: u64, spec: &ClusterSpec, shares: Option<Arc<ShareServer>>, progress: &Arc<dyn Progress>) -> anyhow::Result<BuyerNetwork> {
    use cpushare_exchange::netclient::{attach, Local};
    use cpushare_vnet::stack::{Inbound, Services};
    let (identity, ca) = (conn.identity().context("the buyer's connection has no identity")?.clone(), conn.ca().context("no CA")?.clone());
    let stats = Some(spec.logs.join("network.json"));
    let exported = || spec.shares.iter().map(|s| format!("{} as {}:/{}", s.dir.display(), BUYER_ADDRESS, s.name)).collect::<Vec<_>>().join(", ");
    if let Some(name) = &spec.tap {
        match attach(conn, &identity, &ca, order, 0, Local::Tap(name.clone()), stats.clone()).await {
            Ok(a) => {
                progress.note(&format!("this host is {} on the cluster's network ({name})", a.me.ip));
                let mut task = None;
                if let Some(server) = shares {
                    // Only the cluster's nodes, not this host's other users.
                    let listener = crate::share::listen_on_device((a.me.ip, crate::share::NFS_PORT).into(), name).with_context(|| format!("serving the shares at {}:{} on {name}", a.me.ip, crate::share::NFS_PORT))?;
                    let (me, prefix) = (a.me.ip, a.prefix);
                    task = Some(tokio::spawn(server.accept(listener, move |peer| crate::share::cluster_peer(peer, me, prefix))));
                    progress.note(&format!("sharing {}", exported()));
                }
                return Ok(BuyerNetwork { _attached: a, shares: task });
            }
            Err(e) => progress.note(&format!("no {name} here ({e:#})")),
        }
    }
    let socks = match spec.socks.map(|at| (at, std::net::TcpListener::bind(at))) {
        Some((_, Ok(listener))) => Some(listener),
        Some((at, Err(e))) => {
            progress.note(&format!("no SOCKS5 proxy at {at} ({e})"));
            None
        }
        None => None,
    };
    if socks.is_none() && shares.is_none() {
        progress.note("the cluster's network runs and this host relays for it, but is not on it");
        let a = attach(conn, &identity, &ca, order, 0, Local::Nothing, stats).await?;
        return Ok(BuyerNetwork { _attached: a, shares: None });
    }
    // The userspace stack: the SOCKS5 proxy out, the shares' port in.
    let mut services = Services { socks, inbound: Vec::new() };
    let mut task = None;
    if let Some(server) = shares {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        services.inbound.push(Inbound { port: crate::share::NFS_PORT, handed: Box::new(move |stream, from| drop(tx.send((stream, from.into())))) });
        task = Some(tokio::spawn(server.take(rx)));
    }
    let a = attach(conn, &identity, &ca, order, 0, Local::Stack(services), stats).await?;
    if let Some(proxy) = a.socks {
        progress.note(&format!("a SOCKS5 proxy into the cluster's network at {proxy} (this host is {} there): curl --socks5 {proxy} http://10.77.0.2/", a.me.ip));
    }
    if task.is_some() {
        progress.note(&format!("sharing {}", exported()));
    }
    Ok(BuyerNetwork { _attached: a, shares: task })
}

/// How a node's VM ended.
enum Stop {
    /// It stopped by itself (powered off, crashed) or was refused (a corrupt image): why.
    Finished(String),
    /// Its seller's attestation did not check out: why. The buyer ends the lease.
    Untrusted(String),
    /// Its lease ended under it.
    LeaseEnded,
    /// Its seller could not run it (the seller restarted and lost it, QEMU
    /// would not start): why. The order finds another slot.
    SellerFault(String),
}

/// The image's SHA-256 and size, checked to be a livecd, and what its nodes must attest.
fn image_facts(iso: &std::path::Path) -> anyhow::Result<([u8; 32], u64, Expected)> {
    let file = std::fs::File::open(iso).with_context(|| format!("cannot read the image {}", iso.display()))?;
    let (sha, size) = cpushare_sandbox::vm::image_sha256(file)?;
    // ISO 9660 says "CD001" at byte 32769: catch a wrong file here, not on a seller.
    let mut magic = [0u8; 5];
    let readable = std::fs::File::open(iso).and_then(|mut f| {
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start(32769))?;
        f.read_exact(&mut magic)
    });
    anyhow::ensure!(readable.is_ok() && &magic == b"CD001", "{} is not an ISO 9660 image (a livecd)", iso.display());
    Ok((sha, size, Expected::of(iso, sha)))
}

/// What every node is checked against.
struct Facts<'a> {
    order: u64,
    ca: &'a rustls::pki_types::CertificateDer<'static>,
    sha: [u8; 32],
    size: u64,
    expected: &'a Expected,
}

/// A reader that counts what has been read from it.
struct Counted<R> {
    inner: R,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// One node: the image to its seller (as much as it lacks), then its console
/// into the log until the VM stops. A relay that breaks while the lease
/// stands (the exchange restarting, a partition) is opened again: the seller
/// kept the VM running, and says so when offered the image again.
async fn boot_node(conn: &Connection, lease: u64, seller_node: u64, spec: &ClusterSpec, facts: &Facts<'_>, events: &mpsc::Sender<Event>) -> anyhow::Result<Stop> {
    let log_path = spec.logs.join(format!("console-{lease}.log"));
    let mut node = NodeSoFar { log: tokio::fs::File::create(&log_path).await?, log_path, console: 0, booted: false, upload: None };
    loop {
        match attach_node(conn, lease, seller_node, spec, facts, events, &mut node).await? {
            Attach::Stopped(stop) => return Ok(stop),
            Attach::Broke(why) => {
                if !stands(&conn.exchange, lease).await? {
                    return Ok(Stop::LeaseEnded);
                }
                tracing::info!(lease, "the relay broke ({why}); opening it again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

/// What a node's relays have done so far.
struct NodeSoFar {
    log_path: PathBuf,
    log: tokio::fs::File,
    /// Console bytes in the log (a relay opened again asks for what follows).
    console: u64,
    /// Whether the buyer has been told it booted.
    booted: bool,
    /// What the upload sent and how long it took, once done.
    upload: Option<(u64, std::time::Duration)>,
}

enum Attach {
    Stopped(Stop),
    /// The relay broke off: why.
    Broke(String),
}

/// One relay of a node, until the VM stops or the relay breaks.
async fn attach_node(conn: &Connection, lease: u64, seller_node: u64, spec: &ClusterSpec, facts: &Facts<'_>, events: &mpsc::Sender<Event>, node: &mut NodeSoFar) -> anyhow::Result<Attach> {
    let (sha, size) = (facts.sha, facts.size);
    let broke = |e: &dyn std::fmt::Display| Ok(Attach::Broke(e.to_string()));
    let mut conn = match conn.another().await {
        Ok(c) => c,
        Err(e) => return broke(&e),
    };
    let (out, rx) = mpsc::channel::<pb::RelayFrame>(8);
    out.send(pb::RelayFrame { lease, data: Default::default() }).await?;
    let mut inbound = match conn.exchange.relay(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return broke(&s.message()),
    };
    out.send(job::frame(Say::ImageOffer(pb::ImageOffer { sha256: sha.to_vec(), size, ram_mib: spec.ram_mib, scratch_mib: spec.scratch_mib, network_order: if spec.network { facts.order } else { 0 }, console_from: node.console }))).await?;
    let from = match next(&mut inbound).await {
        Ok(Some(Say::ImageWanted(w))) => w.from.min(size),
        Ok(Some(Say::Outcome(o))) if o.seller_fault => return Ok(Attach::Stopped(Stop::SellerFault(o.killed))),
        Ok(Some(Say::Outcome(o))) => return Ok(Attach::Stopped(Stop::Finished(format!("refused: {}", o.killed)))),
        Ok(None) => return broke(&"closed"),
        Err(e) => return broke(&e),
        Ok(Some(other)) => anyhow::bail!("the seller answered the image offer with {other:?}"),
    };
    let upload_started = std::time::Instant::now();
    if from < size {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::open(&spec.iso)?;
        file.seek(SeekFrom::Start(from))?;
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = Counted { inner: file, count: count.clone() };
        let total = size - from;
        let send = job::send_file(&out, Say::Image, 0, reader, total);
        tokio::pin!(send);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                r = &mut send => match r {
                    Ok(()) => break,
                    Err(e) => return broke(&e),
                },
                _ = tick.tick() => {
                    let sent = count.load(std::sync::atomic::Ordering::Relaxed);
                    let _ = events.try_send(Event::Uploading { lease, sent, total });
                }
            }
        }
        let _ = events.send(Event::Uploading { lease, sent: total, total }).await;
    }
    let upload = *node.upload.get_or_insert((size - from, upload_started.elapsed()));
    loop {
        match next(&mut inbound).await {
            Ok(Some(Say::VmBooted(b))) => {
                // The seller says it again on every relay (checked each time); the buyer hears it once.
                let attested = match attestation::check(facts.ca, seller_node, lease, facts.expected, b.attestation.as_ref()) {
                    Ok(a) => a,
                    Err(why) => return Ok(Attach::Stopped(Stop::Untrusted(why))),
                };
                if std::mem::replace(&mut node.booted, true) {
                    continue;
                }
                let booted = Node { lease, seller_node, boot: attested.boot.clone(), accel: attested.accel.clone(), uploaded: upload.0, upload_time: upload.1, console_log: node.log_path.clone(), attested, ip: b.ip.clone() };
                let _ = events.send(Event::Booted(booted)).await;
            }
            Ok(Some(Say::Console(c))) => {
                node.log.write_all(&c.data).await?;
                node.log.flush().await?;
                node.console += c.data.len() as u64;
            }
            Ok(Some(Say::Outcome(o))) if o.seller_fault => return Ok(Attach::Stopped(Stop::SellerFault(o.killed))),
            Ok(Some(Say::Outcome(o))) if !o.killed.is_empty() => return Ok(Attach::Stopped(Stop::Finished(o.killed))),
            Ok(Some(Say::Outcome(o))) => return Ok(Attach::Stopped(Stop::Finished(format!("the VM stopped (QEMU exit status {})", o.exit_code)))),
            Ok(Some(other)) => anyhow::bail!("unexpected message from the seller: {other:?}"),
            Ok(None) => return broke(&"closed"),
            Err(e) => return broke(&e),
        }
    }
}
