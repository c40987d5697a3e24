//! The engine: one task owns the whole state and is its only writer.
//!
//! API handlers send it jobs (closures over [`Core`]). It runs every job that
//! is waiting and hands what they changed (records and ledger rows), with their
//! answers, to the committer as one batch. The committer writes batches in
//! order, each (or several queued together) in one transaction, and only then
//! answers and tells subscribers. So an acknowledged call is durable, nobody
//! hears of a change before it is, and a thousand orders arriving together cost
//! one commit (group commit). The engine does not wait for the disk: it applies
//! the next jobs while the committer syncs the last batch. It also keeps time:
//! ready timeouts, period ends, settlement, and sellers whose heartbeats stopped.
//!
//! If the store fails, the engine's memory is ahead of the disk; it stops the
//! process, and the restart rebuilds the state from the store, which holds
//! exactly what was acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cpushare_market::{AccountId, Bucket, EndReason, Event, KindSet, LeaseId, MarketConfig, NodeId, OrderId, SandboxKind, Time};
use rustc_hash::FxHashMap;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::state::{apply_registry, Record, State, StateSnapshot};
use crate::store::{LedgerRow, Store};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub market: MarketConfig,
    /// A seller silent this long is lost.
    pub heartbeat_timeout: Duration,
    /// Settle running leases this often.
    pub settle_every: Duration,
    /// Take a snapshot after this many records.
    pub snapshot_every: u64,
    /// Most jobs in one batch (one commit).
    pub max_batch: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            market: MarketConfig::default(),
            heartbeat_timeout: Duration::from_secs(30),
            settle_every: Duration::from_secs(10),
            snapshot_every: 100_000,
            max_batch: 4096,
        }
    }
}

/// Who a connection is, from its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub account: AccountId,
    pub node: NodeId,
    pub admin: bool,
}

/// A lease's parties, kept while it lives so that its events reach them.
#[derive(Debug, Clone, Copy)]
pub struct Parties {
    pub buyer: AccountId,
    pub seller: AccountId,
    pub node: NodeId,
    pub kinds: KindSet,
}

/// What subscribers hear, after the change is durable.
#[derive(Debug, Clone)]
pub enum Notice {
    /// `market`: the sandbox kind the buyer asked for (the market it traded in);
    /// `kinds`: every kind the seller's slot offers.
    Trade { lease: LeaseId, price: u64, at: Time, kinds: KindSet, market: Option<SandboxKind> },
    Lease { parties: Parties, lease: LeaseId, kind: &'static str, at: Time, reason: Option<EndReason>, charged: i64 },
}

/// A message for one seller node's session.
#[derive(Debug, Clone)]
pub enum ToSeller {
    Assigned { lease: LeaseId, sell: OrderId, price: u64, period: u64, ready_by: Time, buyer: u64 },
    Closed { lease: LeaseId, reason: EndReason },
}

/// State shared with the API handlers without going through the engine.
pub struct Shared {
    pub config: EngineConfig,
    /// Certificate fingerprint -> caller, for every node not revoked.
    pub trusted: RwLock<HashMap<String, Caller>>,
    /// Last time each seller node was heard from (seconds).
    pub last_seen: Mutex<FxHashMap<NodeId, Time>>,
    /// Buyers following their lease events: per account, the streams open
    /// now and since when none has been (when the last closed, or the start).
    pub watchers: Mutex<FxHashMap<AccountId, (u32, Time)>>,
    pub notices: broadcast::Sender<Arc<Notice>>,
    pub store: Arc<Store>,
    /// Whether a snapshot is being written out now.
    saving_snapshot: std::sync::atomic::AtomicBool,
    /// The live session of each seller node: its id and its mailbox.
    sessions: Mutex<FxHashMap<NodeId, (u64, mpsc::Sender<ToSeller>)>>,
}

impl Shared {
    pub fn caller(&self, fingerprint: &str) -> Option<Caller> {
        self.trusted.read().unwrap().get(fingerprint).copied()
    }

    pub fn heard_from(&self, node: NodeId) {
        self.last_seen.lock().unwrap().insert(node, now_secs());
    }

    /// Ends a node's session if it is still the one with this id.
    pub fn close_session(&self, node: NodeId, session: u64) {
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.get(&node).is_some_and(|(id, _)| *id == session) {
            sessions.remove(&node);
        }
    }

    fn drop_session(&self, node: NodeId) {
        self.sessions.lock().unwrap().remove(&node);
    }

    /// Delivers mail to a seller's session; a session that does not read its mail
    /// is cut (it will reconnect).
    fn deliver(&self, node: NodeId, message: ToSeller) {
        let mut sessions = self.sessions.lock().unwrap();
        if let Some((_, mailbox)) = sessions.get(&node) {
            if mailbox.try_send(message).is_err() {
                sessions.remove(&node);
            }
        }
    }
}

/// The state and this batch's output, as jobs see them.
pub struct Core {
    pub state: State,
    /// Records made since the last commit, in order.
    pending: Vec<Record>,
    ledger: Vec<LedgerRow>,
    notices: Vec<Notice>,
    to_sellers: Vec<(NodeId, ToSeller)>,
    pub parties: FxHashMap<LeaseId, Parties>,
    shared: Arc<Shared>,
}

impl Core {
    /// The time to act at: the clock, but never before what the market has seen.
    pub fn now(&self) -> Time {
        now_secs().max(self.state.market.now())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Cancels `account`'s order, buy or sell (the API's and the dashboard's Cancel).
    pub fn cancel_order(&mut self, account: AccountId, order: OrderId) -> Result<(), cpushare_market::MarketError> {
        let now = self.now();
        let m = &mut self.state.market;
        if m.buy_order(order).is_some() {
            m.cancel_buy(account, order, now)
        } else {
            m.cancel_sell(account, order, now)
        }
    }

    /// Makes a registry change (applied at once, durable with this batch).
    pub fn record(&mut self, record: Record) {
        self.collect_market();
        apply_registry(&mut self.state.registry, &record);
        match &record {
            Record::NodeEnrolled { node, account, fingerprint, admin, .. } => {
                let caller = Caller { account: *account, node: *node, admin: *admin };
                self.shared.trusted.write().unwrap().insert(fingerprint.clone(), caller);
            }
            Record::NodeRevoked { node, .. } => {
                // Useless at once: new calls are refused and the live session is cut.
                self.shared.trusted.write().unwrap().retain(|_, c| c.node != *node);
                self.shared.drop_session(*node);
            }
            _ => {}
        }
        self.pending.push(record);
    }

    /// Starts a seller node's session; news it would get from this batch is dropped,
    /// since the session's first message lists the node's leases as they stand.
    pub fn open_session(&mut self, node: NodeId, session: u64, mailbox: mpsc::Sender<ToSeller>) {
        self.collect_market();
        self.to_sellers.retain(|(n, _)| *n != node);
        self.shared.sessions.lock().unwrap().insert(node, (session, mailbox));
    }

    /// Moves the market's new events (and their postings) into this batch.
    fn collect_market(&mut self) {
        let events = self.state.market.take_events();
        if events.is_empty() {
            return;
        }
        let postings = self.state.market.take_postings();
        debug_assert!(postings.iter().all(|p| p.event < events.len()), "postings of events not taken");
        let first_seq = self.state.seq + self.pending.len() as u64 + 1;
        for p in postings {
            let e = &events[p.event];
            self.ledger.push(LedgerRow {
                seq: first_seq + p.event as u64,
                account: p.account.0,
                bucket: match p.bucket {
                    Bucket::Available => "available",
                    Bucket::Escrow => "escrow",
                }
                .into(),
                amount: p.amount,
                reason: reason(e),
                at: e.at(),
            });
        }
        for e in events {
            self.notice(&e);
            self.pending.push(Record::Market(e));
        }
    }

    fn notice(&mut self, e: &Event) {
        let lease_notice = |parties: Parties, lease, kind, at, reason, charged| Notice::Lease {
            parties,
            lease,
            kind,
            at,
            reason,
            charged,
        };
        match *e {
            Event::LeaseOpened { lease, buy, sell, buyer, seller, node, price, at, .. } => {
                let kinds = self.state.market.sell_order(sell).map(|s| s.slot.kinds).unwrap_or_default();
                let market = self.state.market.buy_order(buy).map(|b| b.request.requirements.kind);
                let p = Parties { buyer, seller, node, kinds };
                self.parties.insert(lease, p);
                self.notices.push(Notice::Trade { lease, price, at, kinds, market });
                self.notices.push(lease_notice(p, lease, "opened", at, None, 0));
                // (A lease that already ended within the same job is not assigned.)
                if let Some(l) = self.state.market.lease(lease) {
                    let assigned =
                        ToSeller::Assigned { lease, sell: l.sell, price: l.price, period: l.period, ready_by: l.deadline, buyer: l.buyer.0 };
                    self.to_sellers.push((node, assigned));
                }
            }
            Event::LeaseReady { lease, at } | Event::LeaseRenewed { lease, at, .. } => {
                let kind = if matches!(e, Event::LeaseReady { .. }) { "ready" } else { "renewed" };
                if let Some(&p) = self.parties.get(&lease) {
                    self.notices.push(lease_notice(p, lease, kind, at, None, 0));
                }
            }
            Event::LeaseSettled { lease, until, charge, .. } => {
                if let Some(&p) = self.parties.get(&lease) {
                    self.notices.push(lease_notice(p, lease, "settled", until, None, charge));
                }
            }
            Event::LeaseEnded { lease, reason, at, .. } => {
                if let Some(p) = self.parties.remove(&lease) {
                    self.notices.push(lease_notice(p, lease, "ended", at, Some(reason), 0));
                    self.to_sellers.push((p.node, ToSeller::Closed { lease, reason }));
                }
            }
            _ => {}
        }
    }
}

/// What moved the money, in words, for statements.
fn reason(e: &Event) -> String {
    match e {
        Event::Deposited { .. } => "deposit".into(),
        Event::Withdrawn { .. } => "withdrawal".into(),
        Event::BuyPlaced { order, .. } => format!("{order} placed: escrow"),
        Event::BuyCancelled { order, .. } => format!("{order} cancelled: escrow returned"),
        Event::LeaseOpened { lease, .. } => format!("{lease} opened"),
        Event::LeaseSettled { lease, seconds, .. } => format!("{lease}: {seconds} s metered"),
        Event::LeaseRenewed { lease, .. } => format!("{lease} renewed: escrow for the next period"),
        Event::LeaseEnded { lease, reason, .. } => format!("{lease} ended ({})", reason.name()),
        other => format!("{other:?}"),
    }
}

type Reply = Box<dyn FnOnce() + Send>;
type Job = Box<dyn FnOnce(&mut Core) -> Reply + Send>;

/// A handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    pub shared: Arc<Shared>,
}

#[derive(Debug, thiserror::Error)]
#[error("the exchange's engine has stopped")]
pub struct Stopped;

impl Engine {
    /// Loads the state from the store (the newest snapshot, then the records after
    /// it) and starts the engine task.
    pub async fn start(store: Store, config: EngineConfig) -> anyhow::Result<Engine> {
        let mut state = match store.latest_snapshot().await? {
            Some((seq, body)) => {
                let snapshot: StateSnapshot = serde_json::from_str(&body)?;
                anyhow::ensure!(snapshot.seq == seq, "snapshot {seq} claims sequence {}", snapshot.seq);
                State::restore(config.market, snapshot)
            }
            None => State::new(config.market),
        };
        store
            .for_each_record(state.seq, |seq, body| {
                let record: Record = serde_json::from_str(body)
                    .map_err(|e| anyhow::anyhow!("record {seq} in the store is unreadable ({e}): {body}"))?;
                state.apply(seq, &record);
                Ok(())
            })
            .await?;
        state.market.check_invariants().map_err(|e| anyhow::anyhow!("the stored market is inconsistent: {e}"))?;
        // Statements record postings from now on (replayed ones are in the store already).
        state.market.keep_journal();
        tracing::info!(seq = state.seq, "state loaded");

        let trusted = state
            .registry
            .trusted()
            .into_iter()
            .map(|(f, (node, n))| (f, Caller { account: n.account, node, admin: n.admin }))
            .collect();
        // Sellers that held slots get a full timeout to reconnect after a restart.
        let now = now_secs();
        let last_seen = state.market.nodes().map(|n| (n, now)).collect();
        let (notices, _) = broadcast::channel(16_384);
        let shared = Arc::new(Shared {
            config: config.clone(),
            trusted: RwLock::new(trusted),
            last_seen: Mutex::new(last_seen),
            watchers: Mutex::new(FxHashMap::default()),
            notices,
            store: Arc::new(store),
            saving_snapshot: Default::default(),
            sessions: Mutex::new(FxHashMap::default()),
        });
        let parties = state
            .market
            .leases()
            .map(|l| {
                let kinds = state.market.sell_order(l.sell).map(|s| s.slot.kinds).unwrap_or_default();
                (l.id, Parties { buyer: l.buyer, seller: l.seller, node: l.node, kinds })
            })
            .collect();
        let core = Core {
            state,
            pending: Vec::new(),
            ledger: Vec::new(),
            notices: Vec::new(),
            to_sellers: Vec::new(),
            parties,
            shared: shared.clone(),
        };
        let (tx, rx) = mpsc::channel(config.max_batch * 4);
        // A few batches may wait for the disk; beyond that the engine waits too.
        let (batches, to_commit) = mpsc::channel(4);
        tokio::spawn(commit_in_order(to_commit, shared.clone()));
        tokio::spawn(run(core, rx, batches, config));
        Ok(Engine { jobs: tx, shared })
    }

    /// Runs `f` on the engine; answers once what it changed is durable.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Core) -> T + Send + 'static) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |core| {
            let v = f(core);
            Box::new(move || {
                let _ = tx.send(v);
            })
        });
        self.jobs.send(job).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

async fn run(mut core: Core, mut jobs: mpsc::Receiver<Job>, batches: mpsc::Sender<Batch>, config: EngineConfig) {
    let mut clock = tokio::time::interval(Duration::from_secs(1));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_settle = now_secs();
    loop {
        let mut replies: Vec<Reply> = Vec::new();
        tokio::select! {
            job = jobs.recv() => {
                let Some(job) = job else { break };
                replies.push(job(&mut core));
                while replies.len() < config.max_batch {
                    match jobs.try_recv() {
                        Ok(job) => replies.push(job(&mut core)),
                        Err(_) => break,
                    }
                }
            }
            _ = clock.tick() => {
                let now = core.now();
                time_passes(&mut core, now, &config);
                if now >= last_settle + config.settle_every.as_secs() {
                    last_settle = now;
                    let last_seen = core.shared.last_seen.lock().unwrap().clone();
                    let _ = core.state.market.settle(now, |n| last_seen.get(&n).copied().unwrap_or(now));
                }
            }
        }
        let batch = seal(&mut core, replies, config.snapshot_every);
        if batches.send(batch).await.is_err() {
            break;
        }
    }
    tracing::info!("engine stopped");
}

/// What one pass of the engine changed, waiting to be made durable.
struct Batch {
    records: Vec<(u64, String)>,
    ledger: Vec<LedgerRow>,
    replies: Vec<Reply>,
    notices: Vec<Notice>,
    mail: Vec<(NodeId, ToSeller)>,
    /// A snapshot of the state as of the end of this batch.
    snapshot: Option<StateSnapshot>,
}

/// Numbers the batch's records and takes everything it must announce.
fn seal(core: &mut Core, replies: Vec<Reply>, snapshot_every: u64) -> Batch {
    core.collect_market();
    let first = core.state.seq + 1;
    let records: Vec<(u64, String)> = std::mem::take(&mut core.pending)
        .iter()
        .enumerate()
        .map(|(i, r)| (first + i as u64, serde_json::to_string(r).expect("a record serialises")))
        .collect();
    let before = core.state.seq;
    core.state.seq += records.len() as u64;
    // Only the copy here: serialising and saving it happen off this thread
    // and off the commit path (see `save_snapshot`). None is copied while the
    // last is still being saved: it would only be dropped.
    let due = before / snapshot_every != core.state.seq / snapshot_every;
    let snapshot = (due && !core.shared.saving_snapshot.load(std::sync::atomic::Ordering::Acquire)).then(|| core.state.snapshot());
    Batch {
        records,
        ledger: std::mem::take(&mut core.ledger),
        replies,
        notices: std::mem::take(&mut core.notices),
        mail: std::mem::take(&mut core.to_sellers),
        snapshot,
    }
}

/// Writes batches in order, several at once when they queue up, and only then
/// answers and announces them.
async fn commit_in_order(mut batches: mpsc::Receiver<Batch>, shared: Arc<Shared>) {
    /// Records per transaction at most, when batches queue up.
    const MAX_ROWS: usize = 50_000;
    while let Some(first) = batches.recv().await {
        let mut group = vec![first];
        let mut rows = group[0].records.len();
        while rows < MAX_ROWS {
            match batches.try_recv() {
                Ok(b) => {
                    rows += b.records.len();
                    group.push(b);
                }
                Err(_) => break,
            }
        }
        let records: Vec<(u64, String)> = group.iter_mut().flat_map(|b| std::mem::take(&mut b.records)).collect();
        let ledger: Vec<LedgerRow> = group.iter_mut().flat_map(|b| std::mem::take(&mut b.ledger)).collect();
        if let Err(e) = shared.store.append(&records, &ledger).await {
            // Memory is now ahead of the disk: the only safe move is to stop and let a
            // restart rebuild from what is durable (and was acknowledged).
            tracing::error!("the store failed, stopping so that a restart recovers: {e:#}");
            eprintln!("cpushare exchange: the store failed: {e:#}; stopping");
            std::process::exit(70);
        }
        for batch in group {
            for reply in batch.replies {
                reply();
            }
            for notice in batch.notices {
                let _ = shared.notices.send(Arc::new(notice));
            }
            for (node, message) in batch.mail {
                shared.deliver(node, message);
            }
            if let Some(snapshot) = batch.snapshot {
                // After its records are durable, so a snapshot never runs ahead of the log.
                save_snapshot(&shared, snapshot);
            }
        }
    }
}

/// Serialises and saves a snapshot in the background: a snapshot of a large
/// market takes tens of milliseconds to write out, which every order
/// committed meanwhile would otherwise wait for. One at a time: one taken
/// while the last is still being saved is dropped (the log has everything,
/// and the next one comes after as many records again).
fn save_snapshot(shared: &Arc<Shared>, snapshot: StateSnapshot) {
    if shared.saving_snapshot.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let seq = snapshot.seq;
        let body = tokio::task::spawn_blocking(move || serde_json::to_string(&snapshot).expect("a snapshot serialises")).await;
        match body {
            Ok(body) => {
                if let Err(e) = shared.store.save_snapshot(seq, &body).await {
                    // Not fatal: the log holds everything; the next snapshot may work.
                    tracing::warn!("could not save a snapshot: {e:#}");
                }
            }
            Err(e) => tracing::warn!("could not serialise a snapshot: {e}"),
        }
        shared.saving_snapshot.store(false, std::sync::atomic::Ordering::Release);
    });
}

/// Deadlines, and sellers silent for longer than the heartbeat timeout.
fn time_passes(core: &mut Core, now: Time, config: &EngineConfig) {
    let timeout = config.heartbeat_timeout.as_secs();
    let silent: Vec<(NodeId, Time)> = {
        let mut seen = core.shared.last_seen.lock().unwrap();
        let mut silent = Vec::new();
        for node in core.state.market.nodes() {
            let last = *seen.entry(node).or_insert(now);
            if now > last + timeout {
                silent.push((node, last));
            }
        }
        silent.sort_unstable();
        silent
    };
    for (node, last) in silent {
        tracing::info!(%node, last, "seller lost: no heartbeat");
        let _ = core.state.market.seller_lost(node, last, now);
        core.shared.drop_session(node);
    }
    buyers_lost(core, now, timeout);
    let _ = core.state.market.tick(now);
}

/// Buyers of watched orders who have followed no lease events for the
/// timeout: their leases end "buyer lost" (metered to when they went) and
/// their watched orders are cancelled.
fn buyers_lost(core: &mut Core, now: Time, timeout: u64) {
    let watched: Vec<(AccountId, OrderId)> = core.state.market.buy_orders().filter(|o| o.request.attended).map(|o| (o.account, o.id)).collect();
    let mut accounts: Vec<AccountId> = watched.iter().map(|(a, _)| *a).collect();
    accounts.sort_unstable();
    accounts.dedup();
    let lost: Vec<(AccountId, Time)> = {
        let mut watchers = core.shared.watchers.lock().unwrap();
        accounts
            .into_iter()
            .filter_map(|a| {
                let (open, since) = *watchers.entry(a).or_insert((0, now));
                (open == 0 && now > since + timeout).then_some((a, since))
            })
            .collect()
    };
    for (account, since) in lost {
        tracing::info!(%account, since, "buyer lost: no lease events followed");
        let _ = core.state.market.buyer_lost(account, since, now);
        for (_, order) in watched.iter().filter(|(a, _)| *a == account) {
            let _ = core.state.market.cancel_buy(account, *order, now);
        }
    }
}

pub fn now_secs() -> Time {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
