//! The seller daemon: measures this machine once, offers one slot per CPU,
//! keeps its session with the exchange (reconnecting with backoff), and runs
//! what it leases, each fragment in a fresh jail.
//!
//! Runs as an ordinary user: the jail needs no privileges.

pub mod bench;
mod emulated;
mod process_tag;
pub mod vm_lease;
pub mod testbed;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpushare_exchange::client::Connection;
use cpushare_exchange::job::{self, next};
use cpushare_exchange::node::NodeConfig;
use cpushare_proto::v1::{self as pb, job_message::Body as Job, seller_message::Body as Say, session_message::Body as Heard};
use cpushare_sandbox::{examples, jail, Ending, Limits, Options, Program, Session};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// Largest program a seller accepts.
const MAX_PROGRAM: u64 = 64 << 20;
/// Largest fragment input a seller accepts.
const MAX_INPUT: usize = 256 << 20;
/// Bytes per relay frame.
const CHUNK: usize = cpushare_exchange::RELAY_CHUNK;

#[derive(Debug, Clone)]
pub struct SellerConfig {
    /// The node's configuration directory (enrolled with `cpushare enroll`).
    pub node_dir: PathBuf,
    /// Slots offered (one per CPU).
    pub cpus: u32,
    /// Ask, cents per CPU-hour.
    pub price: u64,
    /// Ask for VMs under software emulation (`vm-tcg`), which run CPU-bound
    /// work about five times slower (default: [`default_vm_tcg_price`]).
    pub vm_tcg_price: u64,
    /// RAM per slot, MiB.
    pub ram_per_slot_mib: u32,
    /// Where the benchmark score is cached.
    pub cache_dir: PathBuf,
    /// CPU seconds one fragment may use.
    pub cpu_seconds: u64,
    /// Output one fragment may write.
    pub output_bytes: usize,
    /// For tests of `--replicas`: flip a byte of every output (a dishonest seller).
    pub corrupt_outputs: bool,
    /// Disk one emulated run may fill with the buyer's files and its writes.
    pub disk_per_slot_bytes: u64,
    /// Buyers' read-only files kept between leases (`cache_dir/files`).
    pub file_cache_bytes: u64,
    /// Buyers' livecd images kept between leases (`cache_dir/images`).
    pub image_cache_bytes: u64,
}

impl SellerConfig {
    pub fn new(node_dir: PathBuf, cpus: u32, price: u64) -> SellerConfig {
        SellerConfig {
            node_dir,
            cpus,
            price,
            vm_tcg_price: default_vm_tcg_price(price),
            ram_per_slot_mib: default_ram_per_slot(cpus),
            cache_dir: default_cache_dir(),
            cpu_seconds: 3600,
            output_bytes: 256 << 20,
            corrupt_outputs: false,
            disk_per_slot_bytes: 8 << 30,
            file_cache_bytes: 4 << 30,
            image_cache_bytes: 20 << 30,
        }
    }
}

/// A fifth of the ask (at least a cent): what a CPU-hour of software
/// emulation is worth next to one of native code.
pub fn default_vm_tcg_price(price: u64) -> u64 {
    (price.saturating_add(2) / 5).max(1)
}

/// Half of this machine's RAM shared among the slots, at most 4 GiB each.
pub fn default_ram_per_slot(cpus: u32) -> u32 {
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(4096, |kib| kib / 1024);
    ((total_mib / 2) / cpus.max(1) as u64).clamp(128, 4096) as u32
}

pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("cpushare")
}

/// What this machine offers, measured.
#[derive(Debug, Clone)]
pub struct Probe {
    pub score: u32,
    pub kernel: String,
    pub seccomp_strict: bool,
    /// Unmodified static programs run here (Syscall User Dispatch works).
    pub emulated: bool,
    /// Livecds run here in QEMU under software emulation.
    pub vm_tcg: bool,
    /// QEMU's version line, named in every VM's attestation.
    pub qemu_version: String,
    /// ... and with KVM: a real Linux kernel was seen to boot under it.
    pub vm_kvm: bool,
    pub latency_ms: u32,
}

/// Measures the machine: the benchmark (cached per CPU model), whether the jail
/// really works here (it runs a program in it), the kernel, and the latency to
/// the exchange.
pub async fn probe(config: &SellerConfig, conn: &mut Connection) -> anyhow::Result<Probe> {
    let dir = config.cache_dir.clone();
    let score = tokio::task::spawn_blocking(move || bench::score(&dir)).await?;
    let seccomp_strict = jail_works().await;
    let emulated = seccomp_strict && emulation_works().await;
    let qemu_version = cpushare_sandbox::vm::qemu_version().unwrap_or_default();
    let vm_tcg = !qemu_version.is_empty();
    let vm_kvm = vm_tcg && vm_lease::kvm_verdict(&config.cache_dir, &qemu_version).await;
    let kernel = kernel_release();
    let mut rtts = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        conn.exchange.hello(pb::HelloRequest {}).await.map_err(|s| anyhow::anyhow!("the exchange refused: {}", s.message()))?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    Ok(Probe { score, kernel, seccomp_strict, emulated, vm_tcg, qemu_version, vm_kvm, latency_ms: rtts[1].as_millis().max(1) as u32 })
}

/// Runs the same program in the emulated jail, its input on stdin: the proof
/// that Syscall User Dispatch works here.
pub async fn emulation_works() -> bool {
    use cpushare_sandbox::emulate::{run_emulated, World};
    let run = tokio::task::spawn_blocking(|| {
        let program = Program::new(examples::CRACK).ok()?;
        let limits = Limits { ram_bytes: 64 << 20, cpu_seconds: 5, output_bytes: 1024, log_bytes: 1024 };
        let input = b"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 abcdefghijklmnopqrstuvwxyz 5 0 10".to_vec();
        let out = std::sync::Arc::new(Mutex::new(Vec::new()));
        let run = run_emulated(&program, &["crack"], &World::default(), Box::new(std::io::Cursor::new(input)), Box::new(Shared(out.clone())), Box::new(std::io::sink()), &limits, &Options::default()).ok()?;
        let output = out.lock().unwrap().clone();
        Some(run.ending.success() && output == b"none\n")
    });
    matches!(run.await, Ok(Some(true)))
}

/// A `Write` into a shared buffer.
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a real program in the jail: the only proof that strict mode works here.
pub async fn jail_works() -> bool {
    let Ok(program) = Program::new(examples::CRACK) else { return false };
    let limits = Limits { ram_bytes: 64 << 20, cpu_seconds: 5, output_bytes: 1024, log_bytes: 1024 };
    let input = b"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 abcdefghijklmnopqrstuvwxyz 5 0 10".to_vec();
    match jail::run(&program, &["crack"], input, &limits, &Options::default()).await {
        Ok(run) => run.ending.success() && run.output == b"none\n",
        Err(_) => false,
    }
}

pub fn kernel_release() -> String {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy().into_owned()
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Programs by SHA-256, the most recent few kept.
#[derive(Default)]
struct ProgramCache {
    programs: HashMap<[u8; 32], Arc<Program>>,
    order: VecDeque<[u8; 32]>,
}

impl ProgramCache {
    const KEEP: usize = 32;

    fn get(&mut self, sha: &[u8]) -> Option<Arc<Program>> {
        let key: [u8; 32] = sha.try_into().ok()?;
        self.programs.get(&key).cloned()
    }

    fn put(&mut self, program: Program) -> Arc<Program> {
        let key = program.sha256();
        let program = Arc::new(program);
        if self.programs.insert(key, program.clone()).is_none() {
            self.order.push_back(key);
            while self.order.len() > Self::KEEP {
                if let Some(old) = self.order.pop_front() {
                    self.programs.remove(&old);
                }
            }
        }
        program
    }
}

/// A running seller.
pub struct Seller {
    config: SellerConfig,
    node: Arc<NodeConfig>,
    probe: Probe,
    cache: Mutex<ProgramCache>,
    leases: Mutex<HashMap<u64, JoinHandle<()>>>,
    /// This node's sell orders, as the exchange last registered them.
    orders: Mutex<Vec<u64>>,
    images: Arc<vm_lease::Images>,
    /// The session now open: VMs outlive the session their lease began in.
    session: vm_lease::SessionLink,
    /// The leases the exchange listed at this process's first session: an
    /// earlier process of this node took them on, and their VMs died with it.
    inherited: Mutex<Option<std::collections::HashSet<u64>>>,
}

impl Seller {
    /// Loads the node, measures the machine, and refuses to start if the jail does not work here.
    pub async fn start(config: SellerConfig) -> anyhow::Result<Arc<Seller>> {
        let node = NodeConfig::load(&config.node_dir)?;
        let mut conn = node.connect().await?;
        let probe = probe(&config, &mut conn).await?;
        if !probe.seccomp_strict {
            anyhow::bail!(
                "the jail does not work on this machine (kernel {}): seccomp strict mode or posix_spawn failed; nothing can be sold",
                probe.kernel
            );
        }
        tracing::info!(score = probe.score, latency_ms = probe.latency_ms, kernel = %probe.kernel, emulated = probe.emulated, vm_tcg = probe.vm_tcg, vm_kvm = probe.vm_kvm, "measured");
        vm_lease::remove_stale_scratch();
        vm_lease::remove_stale_vms(&config.cache_dir);
        let images = Arc::new(vm_lease::Images::new(config.cache_dir.join("images"), config.image_cache_bytes)?);
        Ok(Arc::new(Seller { config, node: Arc::new(node), probe, cache: Mutex::default(), leases: Mutex::default(), orders: Mutex::default(), images, session: Arc::new(Mutex::new(mpsc::channel(1).0)), inherited: Mutex::default() }))
    }

    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    fn offers(&self, inbound_udp: bool) -> Vec<pb::SlotOffer> {
        let slot = pb::SlotAttributes {
            score: self.probe.score,
            ram_mib: self.config.ram_per_slot_mib,
            kinds: [
                (true, pb::SandboxKind::SeccompStrict),
                (self.probe.emulated, pb::SandboxKind::SeccompEmulated),
                (self.probe.vm_kvm, pb::SandboxKind::VmKvm),
                // A KVM host runs TCG-priced work with KVM: never slower.
                (self.probe.vm_tcg, pb::SandboxKind::VmTcg),
            ]
            .into_iter()
            .filter_map(|(offered, kind)| offered.then_some(kind as i32))
            .collect(),
            inbound_udp,
            latency_ms: self.probe.latency_ms,
        };
        // Software-emulated VMs at their own, lower ask (the same CPU).
        let kind_asks = if self.probe.vm_tcg && self.config.vm_tcg_price != self.config.price {
            vec![pb::KindAsk { kind: pb::SandboxKind::VmTcg as i32, ask: self.config.vm_tcg_price }]
        } else {
            Vec::new()
        };
        (0..self.config.cpus).map(|_| pb::SlotOffer { slot: Some(slot.clone()), ask: self.config.price, kind_asks: kind_asks.clone() }).collect()
    }

    /// Keeps a session with the exchange until `stop` fires, reconnecting with
    /// backoff (1 s doubling to 30 s) whenever the exchange goes away.
    pub async fn run(self: &Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            tokio::select! {
                r = self.session() => match r {
                    Ok(()) => tracing::info!("the exchange closed the session"),
                    Err(e) => tracing::warn!("session lost: {e:#}"),
                },
                _ = stop.changed() => break,
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        self.stop_leases();
        self.withdraw().await;
    }

    /// Stops every lease worker, and with it its jail and relay.
    pub fn stop_leases(&self) {
        for (_, task) in self.leases.lock().unwrap().drain() {
            task.abort();
        }
    }

    /// A seller that stops on purpose takes its slots off the book at once,
    /// rather than leaving buyers to wait for the heartbeat timeout. Best
    /// effort: if the exchange is unreachable, the timeout does the same.
    async fn withdraw(&self) {
        let orders = std::mem::take(&mut *self.orders.lock().unwrap());
        let cancel_all = async {
            let mut conn = self.node.connect().await?;
            for order in orders {
                if let Err(e) = conn.exchange.cancel_order(pb::CancelOrderRequest { order }).await {
                    tracing::warn!(order, "could not withdraw the slot: {}", e.message());
                }
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), cancel_all).await {
            Ok(Ok(())) => tracing::info!("slots withdrawn"),
            Ok(Err(e)) => tracing::warn!("could not withdraw the slots: {e:#}"),
            Err(_) => tracing::warn!("could not withdraw the slots in time"),
        }
    }

    async fn session(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut conn = self.node.connect().await?;
        let hello = conn.exchange.hello(pb::HelloRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
        let beat_every = Duration::from_secs((hello.heartbeat_timeout_secs as u64 / 3).max(1));
        let (tx, rx) = mpsc::channel(64);
        *self.session.lock().unwrap() = tx.clone();
        // Slots claim inbound UDP only once the exchange has seen it arrive here.
        let inbound_udp = match cpushare_exchange::netclient::takes_inbound_udp(&conn).await {
            Ok(yes) => yes,
            Err(e) => {
                tracing::warn!("could not test for inbound UDP: {e:#}");
                false
            }
        };
        let register = pb::Register { kernel: self.probe.kernel.clone(), seccomp_strict: self.probe.seccomp_strict, slots: self.offers(inbound_udp) };
        tx.send(pb::SellerMessage { body: Some(Say::Register(register)) }).await?;
        let mut inbound = conn
            .exchange
            .seller_session(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow::anyhow!("the exchange refused the session: {}", s.message()))?
            .into_inner();
        // Aborted however the session ends, even when this future is dropped
        // (the seller stopped or killed): heartbeats from a dead session
        // would keep its leases alive at the exchange.
        let _beats = AbortOnDrop({
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(beat_every).await;
                    if tx.send(pb::SellerMessage { body: Some(Say::Heartbeat(pb::Heartbeat {})) }).await.is_err() {
                        break;
                    }
                }
            })
        });
        let result = async {
            while let Some(message) = inbound.next().await {
                match message?.body {
                    Some(Heard::Registered(r)) => {
                        tracing::info!(slots = r.orders.len(), leases = r.leases.len(), "registered");
                        *self.orders.lock().unwrap() = r.orders.clone();
                        let live: Vec<u64> = r.leases.iter().map(|l| l.lease).collect();
                        self.inherited.lock().unwrap().get_or_insert_with(|| live.iter().copied().collect());
                        self.leases.lock().unwrap().retain(|lease, task| {
                            let keep = live.contains(lease);
                            if !keep {
                                task.abort();
                            }
                            keep
                        });
                        for l in r.leases {
                            self.serve(l.lease, l.buyer_account, &conn);
                        }
                    }
                    Some(Heard::LeaseAssigned(l)) => {
                        tracing::info!(lease = l.lease, price = l.price, "leased");
                        self.serve(l.lease, l.buyer_account, &conn);
                    }
                    Some(Heard::LeaseClosed(c)) => {
                        tracing::info!(lease = c.lease, reason = %c.reason, "lease ended");
                        if let Some(task) = self.leases.lock().unwrap().remove(&c.lease) {
                            task.abort();
                        }
                    }
                    Some(Heard::Error(e)) => tracing::warn!("the exchange says: {}", e.message),
                    None => {}
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        result
    }

    /// Starts serving a lease, unless it is already served.
    fn serve(self: &Arc<Self>, lease: u64, buyer_account: u64, conn: &Connection) {
        let mut leases = self.leases.lock().unwrap();
        if leases.get(&lease).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let (me, conn) = (self.clone(), conn.clone());
        leases.insert(
            lease,
            tokio::spawn(async move {
                // Until it ends (the exchange's word on that aborts this task),
                // a lease whose relay broke is served again on a new one.
                let mut pause = Duration::from_secs(1);
                while let Err(e) = me.serve_lease(lease, buyer_account, conn.clone()).await {
                    tracing::warn!(lease, "lease stopped: {e:#}; serving it again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }),
        );
    }

    fn vm_setup(&self, lease: u64) -> vm_lease::Setup {
        vm_lease::Setup {
            lease,
            images: self.images.clone(),
            accel: if self.probe.vm_kvm { cpushare_sandbox::vm::Accel::Kvm } else { cpushare_sandbox::vm::Accel::Tcg },
            slot_ram_mib: self.config.ram_per_slot_mib,
            node: self.node.clone(),
            qemu_version: self.probe.qemu_version.clone(),
            work: self.config.cache_dir.join("vm").join(format!("lease-{lease}-{}", process_tag::own())),
            session: self.session.clone(),
        }
    }

    /// One lease: receive the program (or find it cached), report ready, then run
    /// fragments in order, each in a fresh jail, and send back what they wrote.
    async fn serve_lease(&self, lease: u64, buyer_account: u64, conn: Connection) -> anyhow::Result<()> {
        // The session open now: an exchange restart breaks it and this relay
        // alike, and the next try takes the new one.
        let session = self.session.lock().unwrap().clone();
        // A connection of its own, so that the slots' relays run on several cores.
        let mut conn = conn.another().await?;
        let (out, rx) = mpsc::channel::<pb::RelayFrame>(8);
        out.send(pb::RelayFrame { lease, data: Default::default() }).await?;
        let mut inbound = conn
            .exchange
            .relay(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow::anyhow!("the relay refused: {}", s.message()))?
            .into_inner();

        // The program.
        let offer = match next(&mut inbound).await? {
            Some(Job::Offer(o)) => o,
            Some(Job::ImageOffer(_)) if self.inherited.lock().unwrap().as_ref().is_some_and(|l| l.contains(&lease)) => {
                // Its VM died with this node's earlier process: booting another
                // under the same lease would pass a fresh machine off as the
                // buyer's running one.
                return vm_lease::give_back(&self.vm_setup(lease), &out, "the seller restarted, and the lease's VM died with it".into()).await;
            }
            Some(Job::ImageOffer(image)) => {
                anyhow::ensure!(self.probe.vm_tcg, "virtual machines do not run on this seller");
                return vm_lease::serve(self.vm_setup(lease), image, inbound, out).await;
            }
            other => anyhow::bail!("expected a program or image offer, got {other:?}"),
        };
        if offer.size > MAX_PROGRAM {
            anyhow::bail!("the program is {} bytes; this seller takes at most {MAX_PROGRAM}", offer.size);
        }
        let cached = self.cache.lock().unwrap().get(&offer.sha256);
        let program = match cached {
            Some(p) => p,
            None => {
                out.send(job::frame(Job::Wanted(pb::ProgramWanted {}))).await?;
                let mut bytes = Vec::with_capacity(offer.size as usize);
                loop {
                    match next(&mut inbound).await? {
                        Some(Job::Program(c)) => {
                            bytes.extend_from_slice(&c.data);
                            if bytes.len() as u64 > offer.size {
                                anyhow::bail!("the program is larger than offered");
                            }
                            if c.last {
                                break;
                            }
                        }
                        other => anyhow::bail!("expected the program, got {other:?}"),
                    }
                }
                if Sha256::digest(&bytes).as_slice() != offer.sha256.as_slice() {
                    anyhow::bail!("the program does not match its SHA-256");
                }
                let program = Program::new(&bytes)?;
                self.cache.lock().unwrap().put(program)
            }
        };
        // Metering starts now that the upload is done.
        session.send(pb::SellerMessage { body: Some(Say::Ready(pb::Ready { lease })) }).await?;
        out.send(job::frame(Job::Ready(pb::JobReady {}))).await?;

        let args = if offer.args.is_empty() { vec!["program".to_string()] } else { offer.args };
        let limits = Limits {
            ram_bytes: self.config.ram_per_slot_mib as u64 * (1 << 20),
            cpu_seconds: self.config.cpu_seconds,
            output_bytes: self.config.output_bytes,
            log_bytes: 16 << 10,
        };
        if let Some(world) = offer.world {
            anyhow::ensure!(self.probe.emulated, "unmodified programs do not run on this seller");
            let setup = emulated::Setup {
                lease,
                buyer_account,
                program,
                args,
                world,
                limits,
                cache_dir: self.config.cache_dir.clone(),
                disk_bytes: self.config.disk_per_slot_bytes,
                cache_bytes: self.config.file_cache_bytes,
            };
            return emulated::serve(setup, inbound, out).await;
        }

        // Fragments: a reader passes their input chunks on as they come; the
        // runner runs the fragment they belong to meanwhile.
        let (chunks_tx, mut chunks) = mpsc::channel::<pb::Chunk>(16);
        let reader = tokio::spawn(async move {
            while let Ok(Some(body)) = next(&mut inbound).await {
                let Job::Input(c) = body else { continue };
                if chunks_tx.send(c).await.is_err() {
                    break;
                }
            }
        });
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        // Stream-mode programs keep one jail for the whole lease.
        let mut session = offer.stream.then(|| Session::new(program.clone(), &argv, limits.clone(), Options::default()));
        while let Some(first) = chunks.recv().await {
            let fragment = first.fragment;
            let (run, streamed) = match &mut session {
                Some(session) => (session.run(&whole_input(first, &mut chunks).await?).await, false),
                // A jail per fragment: its input streams in and its output out as it goes.
                None => stream_fragment(&program, &argv, first, &mut chunks, &limits, &out, self.config.corrupt_outputs).await?,
            };
            let (mut output, mut outcome) = match run {
                Ok(r) => {
                    let (exit_code, killed, seller_fault) = match &r.ending {
                        Ending::Exited(c) => (*c, String::new(), false),
                        Ending::Killed(k) => (-1, k.to_string(), matches!(k, cpushare_sandbox::Kill::LoaderFailed { .. })),
                    };
                    let outcome = pb::Outcome {
                        fragment,
                        success: r.ending.success(),
                        exit_code,
                        killed,
                        log: r.log,
                        cpu_ms: r.cpu.as_millis() as u64,
                        seller_fault,
                        output: Default::default(),
                    };
                    (r.output, outcome)
                }
                Err(e) => (Vec::new(), pb::Outcome { fragment, killed: format!("the seller could not start the jail: {e}"), seller_fault: true, ..Default::default() }),
            };
            if self.config.corrupt_outputs && !streamed && !output.is_empty() {
                let last = output.len() - 1;
                output[last] ^= 0xff;
            }
            // A small output rides in the outcome; the rest of a large one goes ahead in chunks.
            if !streamed && output.len() + outcome.log.len() + outcome.killed.len() <= CHUNK {
                outcome.output = output.into();
            } else if !output.is_empty() {
                for c in job::chunks(fragment, output.into()) {
                    out.send(job::frame(Job::Output(c))).await?;
                }
            }
            out.send(job::frame(Job::Outcome(outcome))).await?;
        }
        reader.abort();
        Ok(())
    }
}

/// A fragment's whole input, from its first chunk and the ones after it.
async fn whole_input(first: pb::Chunk, chunks: &mut mpsc::Receiver<pb::Chunk>) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::with_capacity((first.size as usize).min(MAX_INPUT));
    let mut c = first;
    loop {
        anyhow::ensure!(data.len() + c.data.len() <= MAX_INPUT, "a fragment larger than {MAX_INPUT} bytes");
        data.extend_from_slice(&c.data);
        if c.last {
            return Ok(data);
        }
        c = chunks.recv().await.ok_or_else(|| anyhow::anyhow!("the relay closed in the middle of a fragment"))?;
    }
}

/// One fragment in a fresh jail, its input fed in as its chunks arrive and
/// its output sent on as the program writes it: a large fragment is never
/// held whole. Returns the run (its `output` is the part not yet sent) and
/// whether any output went ahead.
async fn stream_fragment(
    program: &Program,
    argv: &[&str],
    first: pb::Chunk,
    chunks: &mut mpsc::Receiver<pb::Chunk>,
    limits: &Limits,
    out: &mpsc::Sender<pb::RelayFrame>,
    corrupt: bool,
) -> anyhow::Result<(std::io::Result<cpushare_sandbox::Run>, bool)> {
    let fragment = first.fragment;
    let (input, input_rx) = mpsc::channel::<prost::bytes::Bytes>(16);
    let (output_tx, mut output) = mpsc::channel::<prost::bytes::Bytes>(16);
    let feed = async move {
        let mut c = first;
        loop {
            // Once the jail is done with its input, the rest is taken and dropped.
            if !c.data.is_empty() {
                let _ = input.send(c.data).await;
            }
            if c.last {
                return anyhow::Ok(());
            }
            c = chunks.recv().await.ok_or_else(|| anyhow::anyhow!("the relay closed in the middle of a fragment"))?;
        }
    };
    let forward = async {
        let mut sent = false;
        while let Some(mut piece) = output.recv().await {
            if corrupt && !sent {
                let mut v = piece.to_vec();
                v[0] ^= 0xff;
                piece = v.into();
            }
            out.send(job::frame(Job::Output(pb::Chunk { fragment, data: piece, last: false, size: 0 }))).await?;
            sent = true;
        }
        anyhow::Ok(sent)
    };
    let options = Options::default();
    let run = jail::run_piped(program, argv, input_rx, output_tx, CHUNK, limits, &options);
    let (run, fed, sent) = tokio::join!(run, feed, forward);
    fed?;
    Ok((run, sent?))
}

