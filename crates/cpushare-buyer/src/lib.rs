//! The buyer library: rents CPUs, farms out fragments of work, and gets every
//! result back even when sellers vanish.
//!
//! A job is a static program and a list of fragments (inputs). [`run`] places
//! a buy order, serves each lease it gets with fragments sent ahead (so the
//! seller never waits, up to a few megabytes), reruns elsewhere whatever a lost lease
//! had in flight, and cancels the order when every fragment has its result.
//! With `replicas: 2` each fragment runs on two sellers of different accounts;
//! outputs are compared and a third run settles a mismatch, naming the seller
//! that disagreed. [`run_local`] runs the same program in the same jail on this
//! machine, with no exchange and no money.

pub mod attestation;
pub mod cluster;
mod input;
pub mod share;
mod unmodified;

pub use input::Input;
pub use unmodified::{run_unmodified, Finished, Unmodified};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use cpushare_exchange::client::Connection;
use cpushare_exchange::job::{self, next};
use cpushare_proto::v1::{self as pb, job_message::Body as Say};
use cpushare_sandbox::{jail, Ending, Limits, Options, Program, Session};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// Bytes per relay frame.
const CHUNK: usize = cpushare_exchange::RELAY_CHUNK;
/// Room made ahead for one output, whatever size a seller announces.
const MAX_OUTPUT: u64 = 256 << 20;
/// Fragments sent ahead to one lease: at most this many...
const WINDOW: usize = 32;
/// A fragment answered this soon after the one before is quick: see `work`.
const QUICK: std::time::Duration = std::time::Duration::from_millis(5);
/// ...and, beyond two (one running, one on its way), at most this many bytes
/// of input. Small fragments keep the seller busy; big ones do not pile up in
/// memory.
const WINDOW_BYTES: usize = 4 << 20;

/// One piece of work: a name (for output files) and its input.
#[derive(Debug, Clone)]
pub struct Fragment {
    pub name: String,
    pub input: Input,
}

#[derive(Debug, Clone)]
pub struct Job {
    /// A static x86-64 program for the jail.
    pub program: Vec<u8>,
    /// Its argv (argv[0] first).
    pub args: Vec<String>,
    pub fragments: Vec<Fragment>,
    pub cpus: u32,
    /// Cents per CPU-hour.
    pub max_price: u64,
    pub requirements: pb::Requirements,
    /// Runs per fragment on sellers of different accounts (1 or 2).
    pub replicas: u32,
    /// The program serves many fragments in one jail (the SDK's stream mode).
    pub stream: bool,
}

/// What became of one fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentResult {
    pub name: String,
    pub output: Vec<u8>,
    pub success: bool,
    /// How it ended, in words ("exited with status 2", "killed by the jail: ...").
    pub ending: String,
    pub log: Vec<u8>,
    /// The seller node whose result was kept (0 for a local run).
    pub seller_node: u64,
}

/// A seller whose output disagreed with the others'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub fragment: String,
    pub seller_account: u64,
    pub seller_node: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub results: Vec<FragmentResult>,
    /// Fragments run again because a lease ended with them in flight.
    pub reruns: u32,
    pub mismatches: Vec<Mismatch>,
    /// Results kept per seller node.
    pub per_seller: BTreeMap<u64, u32>,
    pub leases: u32,
    /// What the job cost, cents (all leases ended, escrow returned).
    pub cost_cents: i64,
}

/// Hooks called as a job goes: progress, notes, and each result as it is settled.
pub trait Progress: Send + Sync + 'static {
    fn done(&self, _done: usize, _total: usize) {}
    fn note(&self, _message: &str) {}
    /// A fragment's result is final (replicas agreed). Return true once its
    /// output is kept elsewhere (written to a file, checked and dropped): the
    /// report then holds the result without its output, and the run reuses
    /// the memory. So a run's memory does not grow with its outputs, and a
    /// run cut short keeps what it had finished.
    fn settled(&self, _result: &FragmentResult) -> bool {
        false
    }
}

impl Progress for () {}

#[derive(Clone, PartialEq, Eq)]
struct Answer {
    output: Vec<u8>,
    success: bool,
    ending: String,
    log: Vec<u8>,
}

struct Slot {
    answers: Vec<(u64, u64, Answer)>, // (seller account, seller node, answer)
    in_flight: Vec<u64>,              // seller accounts running it now
    needed: usize,
    result: Option<FragmentResult>,
}

/// Who runs what, shared by the lease workers.
struct Farm {
    names: Vec<String>,
    slots: Vec<Slot>,
    queue: VecDeque<usize>,
    done: usize,
    reruns: u32,
    mismatches: Vec<Mismatch>,
    /// Output buffers given back once their results were kept elsewhere,
    /// already in memory: filling fresh pages costs this VM more than the
    /// relay does (see BENCHMARKS.md).
    spare: Vec<Vec<u8>>,
}

/// Bytes of output buffers kept for reuse, at most.
const SPARE_BYTES: usize = 256 << 20;

impl Farm {
    fn new(job: &Job) -> Farm {
        let needed = job.replicas.max(1) as usize;
        let mut queue = VecDeque::new();
        for _ in 0..needed {
            queue.extend(0..job.fragments.len());
        }
        Farm {
            names: job.fragments.iter().map(|f| f.name.clone()).collect(),
            slots: (0..job.fragments.len()).map(|_| Slot { answers: Vec::new(), in_flight: Vec::new(), needed, result: None }).collect(),
            queue,
            done: 0,
            reruns: 0,
            mismatches: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// An empty buffer for an output of about `size` bytes.
    fn buffer(&mut self, size: usize) -> Vec<u8> {
        match self.spare.iter().position(|b| b.capacity() >= size) {
            Some(k) => self.spare.swap_remove(k),
            None => Vec::with_capacity(size),
        }
    }

    fn give_buffer(&mut self, mut buffer: Vec<u8>) {
        let kept: usize = self.spare.iter().map(|b| b.capacity()).sum();
        if buffer.capacity() > 0 && kept + buffer.capacity() <= SPARE_BYTES {
            buffer.clear();
            self.spare.push(buffer);
        }
    }

    fn finished(&self) -> bool {
        self.done == self.slots.len()
    }

    /// A fragment this seller account may run: one it has not run, and not now.
    /// Runs waiting to be handed out.
    fn waiting(&self) -> usize {
        self.queue.len()
    }

    fn take(&mut self, account: u64) -> Option<usize> {
        let pos = self.queue.iter().position(|&i| {
            let s = &self.slots[i];
            s.result.is_none() && !s.in_flight.contains(&account) && !s.answers.iter().any(|a| a.0 == account)
        })?;
        let i = self.queue.remove(pos)?;
        self.slots[i].in_flight.push(account);
        Some(i)
    }

    /// A fragment in flight on a lease that ended goes back in the queue.
    fn lost(&mut self, i: usize, account: u64) {
        self.give_back(i, account, true);
    }

    /// A fragment handed to a lease goes back in the queue; `ran` if the
    /// seller had it (a rerun), not if it was still waiting to be sent.
    fn give_back(&mut self, i: usize, account: u64, ran: bool) {
        let s = &mut self.slots[i];
        if let Some(p) = s.in_flight.iter().position(|a| *a == account) {
            s.in_flight.remove(p);
            if s.result.is_none() {
                self.queue.push_front(i);
                self.reruns += ran as u32;
            }
        }
    }

    /// Records an answer; returns true if the fragment is now settled.
    fn answer(&mut self, i: usize, account: u64, node: u64, answer: Answer) -> bool {
        let s = &mut self.slots[i];
        if let Some(p) = s.in_flight.iter().position(|a| *a == account) {
            s.in_flight.remove(p);
        }
        if s.result.is_some() {
            return false;
        }
        s.answers.push((account, node, answer));
        // The answer most sellers gave, once it has a majority of the replicas asked for.
        let majority = s.needed / 2 + 1;
        let mut best: Option<(usize, usize)> = None; // (index, votes)
        for (k, (_, _, a)) in s.answers.iter().enumerate() {
            let votes = s.answers.iter().filter(|(_, _, b)| b == a).count();
            if best.is_none_or(|(_, v)| votes > v) {
                best = Some((k, votes));
            }
        }
        let (winner, votes) = best.expect("an answer was just added");
        if votes >= majority.min(s.needed) && (s.needed == 1 || votes >= 2) {
            for (acc, n, a) in &s.answers {
                if *a != s.answers[winner].2 {
                    self.mismatches.push(Mismatch { fragment: self.names[i].clone(), seller_account: *acc, seller_node: *n });
                }
            }
            // Moved, not cloned: an output may be large. Later answers are ignored.
            let (_, node, winner) = s.answers.swap_remove(winner);
            s.answers.clear();
            s.result = Some(FragmentResult {
                name: self.names[i].clone(),
                output: winner.output,
                success: winner.success,
                ending: winner.ending,
                log: winner.log,
                seller_node: node,
            });
            self.done += 1;
            return true;
        }
        if s.answers.len() >= s.needed {
            // Replicas disagree: one more run decides.
            s.needed += 1;
            self.queue.push_front(i);
        }
        false
    }
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// How long a job waits for an exchange that went away (restarting) to answer again.
const EXCHANGE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a call failed because the exchange was not there (down, restarting,
/// the connection cut), not because it refused.
fn transient(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// Makes the call `f` until the exchange answers it: while it restarts, for
/// up to [`EXCHANGE_PATIENCE`]. For calls that may be made twice.
async fn patiently<T, Fut>(mut f: impl FnMut() -> Fut) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let since = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if transient(&s) && since.elapsed() < EXCHANGE_PATIENCE => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            Err(s) => return Err(status(s)),
        }
    }
}

/// [`patiently`], each try on a fresh handle to the client `ex`.
async fn patiently_on<T, Fut>(ex: &Client, f: impl Fn(Client) -> Fut) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    patiently(|| f(ex.clone())).await
}

/// Runs a job on the exchange `conn` is connected to.
pub async fn run(conn: Connection, job: Job, progress: Arc<dyn Progress>) -> anyhow::Result<Report> {
    anyhow::ensure!(!job.fragments.is_empty(), "the job has no fragments");
    anyhow::ensure!(job.replicas >= 1 && job.replicas <= 3, "--replicas is 1, 2 or 3");
    let mut ex = conn.exchange.clone();
    let before = patiently_on(&ex, |mut ex| async move { ex.balance(pb::BalanceRequest {}).await }).await?;
    let mut events = follow(&ex).await?;
    // Attended: should this run vanish, its leases end "buyer lost" and stop costing.
    let request = pb::PlaceBuyRequest { cpus: job.cpus, max_price: job.max_price, requirements: Some(job.requirements), period_secs: 3600, periods: 0, attended: true };
    let placed = place(&ex, request).await?;
    let order = placed.order;
    progress.note(&format!("order {order} placed for {} CPUs at up to {} cents per CPU-hour", job.cpus, job.max_price));

    let farm = Arc::new(Mutex::new(Farm::new(&job)));
    let changed = Arc::new(Notify::new());
    let job = Arc::new(job);
    let program_sha: [u8; 32] = Sha256::digest(&job.program).into();
    let mut workers: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    // A lease that keeps failing while it stands is cancelled; when it was the
    // last one working, the run fails rather than wait for nothing.
    let (fatal, mut fatal_rx) = mpsc::channel::<(u64, anyhow::Error)>(1);
    let mut seen_leases = 0u32;

    // New leases of this order come from the reply and from lease events.
    let mut pending: Vec<u64> = placed.leases.clone();
    let total = job.fragments.len();
    while !farm.lock().unwrap().finished() {
        if !pending.is_empty() {
            let leases = list_leases(&ex).await?;
            for id in pending.drain(..) {
                if workers.contains_key(&id) {
                    continue;
                }
                let Some(info) = leases.iter().find(|l| l.id == id && l.buy_order == order) else { continue };
                seen_leases += 1;
                progress.note(&format!("lease {id} on seller node {} at {} cents per CPU-hour", info.seller_node, info.price));
                let (conn, farm, changed, job, progress) = (conn.clone(), farm.clone(), changed.clone(), job.clone(), progress.clone());
                let (account, node) = (info.seller_account, info.seller_node);
                workers.insert(
                    id,
                    tokio::spawn({
                        let fatal = fatal.clone();
                        async move {
                            let worker = Worker { lease: id, account, node, farm: &farm, changed: &changed, job: &job, sha: program_sha, progress: &*progress };
                            if let Err(e) = serve_lease(&worker, conn).await {
                                let _ = fatal.send((id, e)).await;
                            }
                            changed.notify_waiters();
                        }
                    }),
                );
            }
        }
        tokio::select! {
            e = events.next() => match e {
                Some(Ok(e)) if e.kind == "opened" => pending.push(e.lease),
                // The worker sees its relay close and returns what it had in flight.
                Some(Ok(e)) if e.kind == "ended" && workers.contains_key(&e.lease) => {
                    progress.note(&format!("lease {} ended: {}", e.lease, e.reason));
                }
                Some(Ok(_)) => {}
                // The exchange went away (a restart): follow it again, and pick up the
                // order's leases that opened meanwhile (their workers reconnect by themselves).
                Some(Err(_)) | None => {
                    progress.note("the exchange went away; reconnecting");
                    events = follow(&ex).await.context("the exchange did not come back")?;
                    let open = list_leases(&ex).await?.into_iter().filter(|l| l.buy_order == order && l.state != "ended").map(|l| l.id);
                    pending.extend(open.filter(|id| !workers.contains_key(id)));
                }
            },
            Some((lease, e)) = fatal_rx.recv() => {
                // An input that cannot be read fails every lease alike: the run ends now.
                if !e.is::<BadInput>() && workers.iter().any(|(id, w)| *id != lease && !w.is_finished()) {
                    progress.note(&format!("{e:#}"));
                } else {
                    let _ = ex.cancel_order(pb::CancelOrderRequest { order }).await;
                    return Err(e);
                }
            }
            _ = changed.notified() => {
                let f = farm.lock().unwrap();
                progress.done(f.done, total);
            }
        }
    }
    cancel(&ex, order).await?;
    for w in workers.values() {
        w.abort();
    }
    // Aborting only asks; each must be gone before the farm is ours alone.
    for (_, w) in workers {
        let _ = w.await;
    }
    let after = patiently_on(&ex, |mut ex| async move { ex.balance(pb::BalanceRequest {}).await }).await?;
    let farm = Arc::try_unwrap(farm).ok().map(|m| m.into_inner().unwrap()).context("workers still hold the farm")?;
    let mut report = Report {
        reruns: farm.reruns,
        mismatches: farm.mismatches,
        leases: seen_leases,
        cost_cents: (before.available_cents + before.escrow_cents) - (after.available_cents + after.escrow_cents),
        ..Report::default()
    };
    for s in farm.slots {
        let r = s.result.expect("every fragment is settled");
        *report.per_seller.entry(r.seller_node).or_default() += 1;
        report.results.push(r);
    }
    progress.done(total, total);
    Ok(report)
}

type Client = cpushare_proto::v1::exchange_client::ExchangeClient<cpushare_exchange::client::Versioned>;

/// The account's lease events, followed from now.
async fn follow(ex: &Client) -> anyhow::Result<tonic::Streaming<pb::LeaseEvent>> {
    patiently_on(ex, |mut ex| async move { ex.lease_events(pb::LeaseEventsRequest {}).await }).await
}

/// The account's buy orders standing now.
async fn buy_orders(ex: &Client) -> anyhow::Result<std::collections::HashSet<u64>> {
    let listed = patiently_on(ex, |mut ex| async move { ex.list_orders(pb::ListOrdersRequest {}).await }).await?;
    Ok(listed.orders.into_iter().filter(|o| o.side == "buy").map(|o| o.id).collect())
}

async fn list_leases(ex: &Client) -> anyhow::Result<Vec<pb::Lease>> {
    Ok(patiently_on(ex, |mut ex| async move { ex.list_leases(pb::ListLeasesRequest {}).await }).await?.leases)
}

/// Places a buy order. Placing is not to be done twice: when the
/// exchange goes away during the call, the order it may have taken before it
/// went is looked for among the account's orders once it is back.
async fn place(ex: &Client, request: pb::PlaceBuyRequest) -> anyhow::Result<pb::OrderReply> {
    let since = std::time::Instant::now();
    loop {
        let known = buy_orders(ex).await?;
        match ex.clone().place_buy(request).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if transient(&s) && since.elapsed() < EXCHANGE_PATIENCE => {
                let now = buy_orders(ex).await?;
                if let Some(&order) = now.difference(&known).next() {
                    // It was taken: its leases (if any) come from the events and the lease list.
                    let leases = list_leases(ex).await?.into_iter().filter(|l| l.buy_order == order).map(|l| l.id).collect();
                    return Ok(pb::OrderReply { order, leases });
                }
            }
            Err(s) => return Err(status(s)),
        }
    }
}

/// Cancels the order, through an exchange restart if need be (an order
/// already gone, as when a first attempt got through, is cancelled enough).
async fn cancel(ex: &Client, order: u64) -> anyhow::Result<()> {
    match patiently_on(ex, |mut ex| async move { ex.cancel_order(pb::CancelOrderRequest { order }).await }).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("does not exist") => Ok(()),
        Err(e) => Err(e.context(format!("cancelling order {order}"))),
    }
}

/// How long a lease whose work keeps breaking off while it stands is tried
/// again: longer than the exchange's heartbeat timeout (30 s by default), so a
/// seller that vanished is declared lost, and its lease ended, first.
const GIVE_UP: std::time::Duration = std::time::Duration::from_secs(90);

/// Serves one lease with [`work`] until the work is done or the lease ends
/// (a seller lost is not an error: its fragments run elsewhere). Work that
/// breaks off while the lease stands is tried again; an error is returned only
/// when that goes on for [`GIVE_UP`], after the lease is cancelled so that it
/// costs no more.
async fn serve_lease(w: &Worker<'_>, conn: Connection) -> anyhow::Result<()> {
    let Worker { lease, farm, progress, .. } = *w;
    let mut ex = conn.exchange.clone();
    let first_failure = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        let Err(e) = work(w, conn.clone()).await else { return Ok(()) };
        if e.is::<BadInput>() {
            return Err(e);
        }
        let leases = list_leases(&ex).await?;
        let stands = leases.iter().any(|l| l.id == lease && l.state != "ended");
        if !stands || farm.lock().unwrap().finished() {
            progress.note(&format!("lease {lease}: {e:#}"));
            return Ok(());
        }
        if first_failure.elapsed() > GIVE_UP {
            let _ = ex.cancel_lease(pb::CancelLeaseRequest { lease }).await;
            return Err(e.context(format!("lease {lease} kept failing while it stood; cancelled")));
        }
        progress.note(&format!("lease {lease}: {e:#}; trying again in {} ms", pause.as_millis()));
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

/// What a lease's worker needs of the run.
#[derive(Clone, Copy)]
struct Worker<'a> {
    lease: u64,
    /// The seller's account and node.
    account: u64,
    node: u64,
    farm: &'a Mutex<Farm>,
    changed: &'a Notify,
    job: &'a Job,
    /// The program's SHA-256.
    sha: [u8; 32],
    progress: &'a dyn Progress,
}

/// Serves one lease: sends the program (unless the seller has it), then keeps
/// up to [`WINDOW`] fragments in flight until none is left for this seller.
async fn work(w: &Worker<'_>, conn: Connection) -> anyhow::Result<()> {
    let Worker { lease, account, node, farm, changed, job, sha, progress } = *w;
    // A connection of its own, so relays to several sellers run on several cores.
    let mut conn = conn.another().await?;
    let (out, rx) = mpsc::channel::<pb::RelayFrame>(8);
    out.send(pb::RelayFrame { lease, data: Default::default() }).await?;
    let mut inbound = conn.exchange.relay(ReceiverStream::new(rx)).await.map_err(status)?.into_inner();
    let offer = pb::ProgramOffer { sha256: sha.to_vec(), size: job.program.len() as u64, args: job.args.clone(), stream: job.stream, world: None };
    out.send(job::frame(Say::Offer(offer))).await?;
    match next(&mut inbound).await? {
        Some(Say::Ready(_)) => {}
        Some(Say::Wanted(_)) => {
            for c in job::chunks(0, prost::bytes::Bytes::copy_from_slice(&job.program)) {
                out.send(job::frame(Say::Program(c))).await?;
            }
            match next(&mut inbound).await? {
                Some(Say::Ready(_)) => {}
                other => anyhow::bail!("the seller did not get ready: {other:?}"),
            }
        }
        other => anyhow::bail!("the seller answered the offer with {other:?}"),
    }
    progress.note(&format!("lease {lease}: seller ready"));

    // Fragments sent (or being sent) whose results have not come back, oldest first.
    let mut in_flight: VecDeque<usize> = VecDeque::new();
    let mut in_flight_bytes = 0;
    // The part of `in_flight` still to upload, and how far into its first one.
    let mut to_send: VecDeque<usize> = VecDeque::new();
    let mut sent_of_first = 0;
    let mut output = Vec::new();
    // Two in flight (one running, one on its way) unless fragments turn out to
    // be quick, when the window doubles so the seller does not wait on the
    // round trip; slow ones bring it back to two.
    let mut window = 2;
    let mut last_answer = std::time::Instant::now();
    let result = async {
        loop {
            // Fill the window.
            while in_flight.len() < window && (in_flight.len() < 2 || in_flight_bytes < WINDOW_BYTES) {
                let taken = {
                    let mut f = farm.lock().unwrap();
                    // Beyond two, no more than this lease's share of what waits, so a
                    // lease that came first does not hoard the work of a short job.
                    if in_flight.len() >= 2 && in_flight.len() >= f.waiting() / job.cpus.max(1) as usize {
                        None
                    } else {
                        f.take(account)
                    }
                };
                let Some(i) = taken else { break };
                in_flight.push_back(i);
                to_send.push_back(i);
                in_flight_bytes += job.fragments[i].input.len();
            }
            let Some(&i) = in_flight.front() else {
                // Nothing for this seller now: wait for news, stop when all is settled.
                if farm.lock().unwrap().finished() {
                    return Ok(());
                }
                changed.notified().await;
                continue;
            };
            // Upload and download at once: a seller sending back one big output
            // must not wait for the next input to finish arriving.
            let message = match to_send.front() {
                Some(&up) => tokio::select! {
                    permit = out.reserve() => {
                        let input = &job.fragments[up].input;
                        let end = (sent_of_first + CHUNK).min(input.len());
                        let mut unread = None;
                        let frame = job::chunk_frame(Say::Input, |buf, chunk| {
                            unread = input.read_range(sent_of_first, end, buf).err();
                            chunk.fragment = up as u64;
                            chunk.last = end == input.len();
                            chunk.size = if sent_of_first == 0 { input.len() as u64 } else { 0 };
                            Ok(())
                        });
                        if let Some(e) = unread {
                            return Err(BadInput(e).into());
                        }
                        permit?.send(frame?);
                        sent_of_first = end;
                        if end == input.len() {
                            to_send.pop_front();
                            sent_of_first = 0;
                        }
                        continue;
                    }
                    message = next(&mut inbound) => message?,
                },
                None => next(&mut inbound).await?,
            };
            // The oldest fragment's output, then its outcome.
            let outcome = match message {
                Some(Say::Output(c)) if c.fragment == i as u64 => {
                    if output.is_empty() {
                        // Room for all of it: its size when the seller knows it, else as
                        // much as the input (many programs transform their input).
                        let hint = if c.size > 0 { c.size } else { job.fragments[i].input.len() as u64 };
                        output = farm.lock().unwrap().buffer(hint.min(MAX_OUTPUT) as usize);
                    }
                    output.extend_from_slice(&c.data);
                    continue;
                }
                Some(Say::Outcome(o)) if o.fragment == i as u64 => {
                    output.extend_from_slice(&o.output);
                    o
                }
                None => anyhow::bail!("the relay closed"),
                other => anyhow::bail!("unexpected message from the seller: {other:?}"),
            };
            in_flight.pop_front();
            in_flight_bytes -= job.fragments[i].input.len();
            let mut f = farm.lock().unwrap();
            if outcome.seller_fault {
                f.lost(i, account);
                drop(f);
                anyhow::bail!("the seller failed: {}", outcome.killed);
            }
            let ending = if outcome.killed.is_empty() { format!("exited with status {}", outcome.exit_code) } else { outcome.killed };
            let answer = Answer { output: std::mem::take(&mut output), success: outcome.success, ending, log: outcome.log };
            if f.answer(i, account, node, answer) {
                hand_over(f, farm, i, progress);
            } else {
                drop(f);
            }
            changed.notify_waiters();
            let gap = std::mem::replace(&mut last_answer, std::time::Instant::now()).elapsed();
            // Only a stream-mode jail takes fragments back to back; with a jail
            // per fragment the seller runs one at a time, and more sent ahead
            // would only be more to rerun if it vanished.
            if gap < QUICK && job.stream {
                window = (window * 2).min(WINDOW);
            } else if gap > 10 * QUICK {
                window = 2;
            }
        }
    }
    .await;
    // Whatever is still in flight runs elsewhere.
    let mut f = farm.lock().unwrap();
    let unsent = to_send.len() - (sent_of_first > 0) as usize;
    let sent = in_flight.len() - unsent;
    for (k, i) in in_flight.into_iter().enumerate() {
        f.give_back(i, account, k < sent);
    }
    drop(f);
    changed.notify_waiters();
    result
}

/// An input that could not be read (a file gone or changed since the job was made).
#[derive(Debug)]
struct BadInput(std::io::Error);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BadInput {}

/// Shows fragment `i`'s settled result to [`Progress::settled`], outside the
/// farm's lock (it may write a large file); if that kept the output, the
/// result keeps none and its buffer is reused.
fn hand_over(mut f: std::sync::MutexGuard<'_, Farm>, farm: &Mutex<Farm>, i: usize, progress: &dyn Progress) {
    let r = f.slots[i].result.as_mut().expect("settled");
    let settled = FragmentResult { output: std::mem::take(&mut r.output), ..r.clone() };
    drop(f);
    let kept = progress.settled(&settled);
    let mut f = farm.lock().unwrap();
    if kept {
        f.give_buffer(settled.output);
    } else {
        f.slots[i].result.as_mut().expect("settled").output = settled.output;
    }
}

/// Runs a job on this machine, in the same jail, `parallel` fragments at a time:
/// no exchange, no money. `debuggable` leaves the jails traceable (gdb, strace).
pub async fn run_local(job: Job, parallel: usize, limits: Limits, debuggable: bool, progress: Arc<dyn Progress>) -> anyhow::Result<Report> {
    let program = Arc::new(Program::new(&job.program)?);
    let queue = Arc::new(Mutex::new((0..job.fragments.len()).collect::<VecDeque<_>>()));
    let results: Arc<Mutex<Vec<Option<FragmentResult>>>> = Arc::new(Mutex::new(vec![None; job.fragments.len()]));
    let job = Arc::new(job);
    let total = job.fragments.len();
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let (program, queue, results, job, limits, progress) =
            (program.clone(), queue.clone(), results.clone(), job.clone(), limits.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let args: Vec<&str> = job.args.iter().map(|s| s.as_str()).collect();
            let options = Options { debuggable, ..Options::default() };
            let mut session = job.stream.then(|| Session::new(program.clone(), &args, limits.clone(), options.clone()));
            loop {
                let Some(i) = queue.lock().unwrap().pop_front() else { return Ok::<_, anyhow::Error>(()) };
                let f = &job.fragments[i];
                let r = match &mut session {
                    Some(session) => session.run(&f.input.load()?).await?,
                    None => jail::run(&program, &args, f.input.load()?, &limits, &options).await?,
                };
                let mut result = FragmentResult {
                    name: f.name.clone(),
                    success: r.ending.success(),
                    ending: match &r.ending {
                        Ending::Exited(c) => format!("exited with status {c}"),
                        Ending::Killed(k) => k.to_string(),
                    },
                    output: r.output,
                    log: r.log,
                    seller_node: 0,
                };
                if progress.settled(&result) {
                    result.output = Vec::new();
                }
                let mut all = results.lock().unwrap();
                all[i] = Some(result);
                let done = all.iter().filter(|r| r.is_some()).count();
                drop(all);
                progress.done(done, total);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let results = Arc::try_unwrap(results).ok().context("still running")?.into_inner().unwrap();
    let results: Vec<FragmentResult> = results.into_iter().map(|r| r.expect("every fragment ran")).collect();
    let mut per_seller = BTreeMap::new();
    per_seller.insert(0, results.len() as u32);
    Ok(Report { results, per_seller, ..Report::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(s: &str) -> Answer {
        Answer { output: s.as_bytes().to_vec(), success: true, ending: "exited with status 0".into(), log: Vec::new() }
    }

    fn job(n: usize, replicas: u32) -> Job {
        Job {
            program: Vec::new(),
            args: Vec::new(),
            fragments: (0..n).map(|i| Fragment { name: format!("f{i}"), input: Vec::new().into() }).collect(),
            cpus: 1,
            max_price: 1,
            requirements: pb::Requirements::default(),
            replicas,
            stream: false,
        }
    }

    #[test]
    fn a_lost_fragment_runs_again() {
        let mut f = Farm::new(&job(2, 1));
        let i = f.take(1).unwrap();
        f.lost(i, 1);
        assert_eq!(f.reruns, 1);
        assert_eq!(f.take(2), Some(i), "the lost fragment is first again");
        assert!(f.answer(i, 2, 20, answer("x")));
        assert!(!f.finished());
    }

    #[test]
    fn replicas_run_on_different_accounts_and_a_third_settles_a_mismatch() {
        let mut f = Farm::new(&job(1, 2));
        let i = f.take(1).unwrap();
        assert_eq!(f.take(1), None, "the same account never runs a fragment twice");
        assert_eq!(f.take(2), Some(i));
        assert!(!f.answer(i, 1, 10, answer("good")));
        assert!(!f.answer(i, 2, 20, answer("evil")), "a mismatch is not settled");
        assert_eq!(f.take(1), None);
        assert_eq!(f.take(3), Some(i), "a third account settles it");
        assert!(f.answer(i, 3, 30, answer("good")));
        assert_eq!(f.mismatches, vec![Mismatch { fragment: "f0".into(), seller_account: 2, seller_node: 20 }]);
        assert_eq!(f.slots[i].result.as_ref().unwrap().output, b"good");
    }

    #[test]
    fn agreeing_replicas_settle_at_once() {
        let mut f = Farm::new(&job(1, 2));
        let i = f.take(1).unwrap();
        assert_eq!(f.take(2), Some(i));
        assert!(!f.answer(i, 1, 10, answer("same")));
        assert!(f.answer(i, 2, 20, answer("same")));
        assert!(f.finished() && f.mismatches.is_empty());
    }
}
