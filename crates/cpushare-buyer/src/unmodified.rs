//! An unmodified static program on one rented CPU, as if it ran here: our
//! stdin feeds it, its stdout and stderr come back as it writes them, it sees
//! only the directories we mount for it (the seller fetches what it opens,
//! see `cpushare_sandbox::emulate::mirror`), what it changes is written back
//! here when it ends, and its exit status is ours.


use anyhow::Context;
use cpushare_exchange::client::Connection;
use cpushare_exchange::job::{self, next};
use cpushare_proto::v1::{self as pb, job_message::Body as Say};
use cpushare_sandbox::emulate::share::{Incoming, Share};
use cpushare_sandbox::emulate::Mount;
use prost::bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::{status, Progress};

/// The most stdin read at once.
const STDIN_PIECE: u64 = 64 << 10;

/// The program and what it sees.
#[derive(Debug, Clone)]
pub struct Unmodified {
    /// A static x86-64 executable (musl or glibc, static or static-pie).
    pub program: Vec<u8>,
    /// Its argv, argv[0] first.
    pub args: Vec<String>,
    /// Its environment, NAME=value.
    pub env: Vec<String>,
    /// Its working directory (a guest path).
    pub cwd: String,
    /// Our directories it sees.
    pub mounts: Vec<Mount>,
    /// Where its getrandom draws from.
    pub seed: [u8; 32],
    /// Cents per CPU-hour.
    pub max_price: u64,
    pub min_ram_mib: u32,
}

/// How the run went.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its exit status, when it exited.
    pub exit_code: Option<i32>,
    /// Why the jail ended it, in words; empty if it exited.
    pub killed: String,
    pub cpu_ms: u64,
    pub lease: u64,
    pub seller_node: u64,
    /// Paths written back, and those that could not be (with why).
    pub written_back: u32,
    pub not_written_back: Vec<String>,
    /// What it cost, cents.
    pub cost_cents: i64,
}

/// Rents one CPU that runs unmodified programs and runs `job` on it.
pub async fn run_unmodified(
    conn: Connection,
    job: Unmodified,
    mut stdin: impl AsyncRead + Unpin + Send,
    mut stdout: impl AsyncWrite + Unpin + Send,
    mut stderr: impl AsyncWrite + Unpin + Send,
    progress: &dyn Progress,
) -> anyhow::Result<Finished> {
    let share = Share::new(&job.mounts)?;
    let mut ex = conn.exchange.clone();
    let before = ex.balance(pb::BalanceRequest {}).await.map_err(status)?.into_inner();
    let mut events = ex.lease_events(pb::LeaseEventsRequest {}).await.map_err(status)?.into_inner();
    let requirements = pb::Requirements { kind: pb::SandboxKind::SeccompEmulated as i32, min_ram_mib: job.min_ram_mib, ..Default::default() };
    let buy = pb::PlaceBuyRequest { cpus: 1, max_price: job.max_price, requirements: Some(requirements), period_secs: 3600, periods: 0, attended: true };
    // The order standing now; cancelled (ending its lease) whenever the run ends.
    let mut order = None;
    let result = async {
        let mut attempts = 0;
        loop {
            let placed = ex.place_buy(buy).await.map_err(status)?.into_inner();
            order = Some(placed.order);
            progress.note(&format!("order {} placed for 1 CPU at up to {} cents per CPU-hour; waiting for a seller", placed.order, job.max_price));
            let (lease, node) = lease_of(&mut ex, &mut events, placed.order, placed.leases).await?;
            progress.note(&format!("lease {lease} on seller node {node}"));
            let mut seen = Seen::default();
            match serve(&conn, lease, &job, &share, &mut stdin, &mut stdout, &mut stderr, &mut seen).await {
                Ok(mut finished) => {
                    finished.lease = lease;
                    finished.seller_node = node;
                    return Ok(finished);
                }
                // Nothing of this run reached us or came from us yet: it can start
                // over on another seller as if the first had never been, under a
                // new order (a lease the buyer ends does not reopen its order).
                Err(e) if !seen.anything() && attempts < RESTARTS => {
                    attempts += 1;
                    progress.note(&format!("lease {lease}: {e:#}; starting again on another seller"));
                    let _ = ex.cancel_order(pb::CancelOrderRequest { order: placed.order }).await;
                }
                Err(e) if seen.anything() => {
                    return Err(e.context("the program had already read input or written output, so it cannot simply run again: run it again yourself"));
                }
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    // Ends the lease too: billing stops with the program.
    if let Some(order) = order {
        let _ = ex.cancel_order(pb::CancelOrderRequest { order }).await;
    }
    let mut finished = result?;
    let after = ex.balance(pb::BalanceRequest {}).await.map_err(status)?.into_inner();
    finished.cost_cents = (before.available_cents + before.escrow_cents) - (after.available_cents + after.escrow_cents);
    Ok(finished)
}

/// The first lease of `order` still standing: one of `leases` (from its
/// placing), or one the events announce once a seller comes.
async fn lease_of(
    ex: &mut pb::exchange_client::ExchangeClient<cpushare_exchange::client::Versioned>,
    events: &mut tonic::Streaming<pb::LeaseEvent>,
    order: u64,
    mut candidates: Vec<u64>,
) -> anyhow::Result<(u64, u64)> {
    loop {
        if !candidates.is_empty() {
            let leases = ex.list_leases(pb::ListLeasesRequest {}).await.map_err(status)?.into_inner().leases;
            if let Some(l) = leases.iter().find(|l| candidates.contains(&l.id) && l.buy_order == order && l.state != "ended") {
                return Ok((l.id, l.seller_node));
            }
            candidates.clear();
        }
        match events.next().await {
            Some(Ok(e)) if e.kind == "opened" => candidates.push(e.lease),
            Some(Ok(_)) => {}
            Some(Err(s)) => return Err(status(s)).context("lease events"),
            None => anyhow::bail!("the exchange closed the lease events"),
        }
    }
}

/// How often a run that was lost before anything of it was seen starts over.
const RESTARTS: u32 = 5;

/// What of a run has been seen: once it has read our input or written
/// output, it cannot simply run again elsewhere.
#[derive(Default)]
struct Seen {
    input: bool,
    output: bool,
}

impl Seen {
    fn anything(&self) -> bool {
        self.input || self.output
    }
}

/// The lease's relay: the program up, then its streams and files until its outcome.
#[allow(clippy::too_many_arguments)]
async fn serve(
    conn: &Connection,
    lease: u64,
    job: &Unmodified,
    share: &Share,
    stdin: &mut (impl AsyncRead + Unpin + Send),
    stdout: &mut (impl AsyncWrite + Unpin + Send),
    stderr: &mut (impl AsyncWrite + Unpin + Send),
    seen: &mut Seen,
) -> anyhow::Result<Finished> {
    let mut conn = conn.another().await?;
    let (out, rx) = mpsc::channel::<pb::RelayFrame>(8);
    out.send(pb::RelayFrame { lease, data: Default::default() }).await?;
    let mut inbound = conn.exchange.relay(ReceiverStream::new(rx)).await.map_err(status)?.into_inner();
    let world = pb::EmulatedWorld {
        env: job.env.clone(),
        cwd: job.cwd.clone(),
        mounts: job.mounts.iter().map(|m| pb::GuestMount { guest: m.guest.clone(), read_only: m.read_only }).collect(),
        seed: job.seed.to_vec(),
    };
    let sha: [u8; 32] = Sha256::digest(&job.program).into();
    let offer = pb::ProgramOffer { sha256: sha.to_vec(), size: job.program.len() as u64, args: job.args.clone(), stream: false, world: Some(world) };
    out.send(job::frame(Say::Offer(offer))).await?;
    loop {
        match next(&mut inbound).await? {
            Some(Say::Ready(_)) => break,
            Some(Say::Wanted(_)) => {
                for c in job::chunks(0, Bytes::copy_from_slice(&job.program)) {
                    out.send(job::frame(Say::Program(c))).await?;
                }
            }
            other => anyhow::bail!("the seller answered the offer with {other:?}"),
        }
    }

    // Stdin the seller has room for, and whether ours has ended.
    let mut credit = 0u64;
    let mut stdin_done = false;
    // A changed file arriving, and the paths written back or not.
    let mut incoming: Option<(String, Option<Incoming>)> = None;
    let mut finished =
        Finished { exit_code: None, killed: String::new(), cpu_ms: 0, lease, seller_node: 0, written_back: 0, not_written_back: Vec::new(), cost_cents: 0 };
    loop {
        let message = tokio::select! {
            m = next(&mut inbound) => m?,
            // Cancel-safe: an interrupted read keeps its bytes in `stdin`.
            n = async {
                let room = credit.min(STDIN_PIECE);
                let mut piece = BytesMut::with_capacity(room as usize);
                let r = (&mut *stdin).take(room).read_buf(&mut piece).await;
                (r, piece)
            }, if credit > 0 && !stdin_done => {
                let (n, piece) = n;
                let n = n.context("reading stdin")?;
                stdin_done = n == 0;
                credit -= n as u64;
                seen.input |= n > 0;
                let chunk = pb::Chunk { fragment: 0, data: piece.freeze(), last: stdin_done, size: 0 };
                out.send(job::frame(Say::Stdin(chunk))).await?;
                continue;
            }
        };
        match message {
            Some(Say::Stdin(c)) => credit += c.size,
            Some(Say::Stdout(c)) => {
                seen.output = true;
                stdout.write_all(&c.data).await?;
                stdout.flush().await?;
            }
            Some(Say::Stderr(c)) => {
                seen.output = true;
                stderr.write_all(&c.data).await?;
                stderr.flush().await?;
            }
            Some(Say::FileRequest(r)) => answer(share, r, &out).await?,
            Some(Say::FileChange(c)) => {
                seen.output = true;
                let path = c.path.clone();
                let applied = match pb::ChangeKind::try_from(c.kind) {
                    Ok(pb::ChangeKind::File) => match share.write(c.mount as usize, &c.path, c.mode) {
                        Ok(w) => {
                            incoming = Some((path, Some(w)));
                            continue;
                        }
                        Err(e) => {
                            // Its content still comes: received and dropped.
                            incoming = Some((path.clone(), None));
                            Err(e)
                        }
                    },
                    Ok(pb::ChangeKind::Dir) => share.make_dir(c.mount as usize, &c.path, c.mode),
                    Ok(pb::ChangeKind::Gone) => share.remove(c.mount as usize, &c.path),
                    Err(_) => Err(libc::EINVAL),
                };
                record(&mut finished, &path, applied);
            }
            Some(Say::FileData(c)) => {
                let Some((path, w)) = incoming.as_mut() else { anyhow::bail!("file content from the seller without a change") };
                let wrote = match w {
                    Some(w) => w.write_all(&c.data).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
                    None => Ok(()),
                };
                if let Err(e) = wrote {
                    if let Some(w) = w.take() {
                        w.abandon();
                    }
                    let path = path.clone();
                    record(&mut finished, &path, Err(e));
                }
                if c.last {
                    let (path, w) = incoming.take().expect("checked above");
                    if let Some(w) = w {
                        record(&mut finished, &path, w.finish());
                    }
                }
            }
            Some(Say::Outcome(o)) => {
                if o.seller_fault {
                    anyhow::bail!("the seller failed: {}", o.killed);
                }
                finished.exit_code = o.killed.is_empty().then_some(o.exit_code);
                finished.killed = o.killed;
                finished.cpu_ms = o.cpu_ms;
                return Ok(finished);
            }
            None => anyhow::bail!("the seller went away before the program ended (nothing it wrote was applied)"),
            Some(other) => anyhow::bail!("unexpected message from the seller: {other:?}"),
        }
    }
}

fn record(finished: &mut Finished, path: &str, result: Result<(), i32>) {
    match result {
        Ok(()) => finished.written_back += 1,
        Err(e) => finished.not_written_back.push(format!("{path}: {}", std::io::Error::from_raw_os_error(e))),
    }
}

/// Answers a seller's listing or read from our mounts.
async fn answer(share: &Share, r: pb::FileRequest, out: &mpsc::Sender<pb::RelayFrame>) -> anyhow::Result<()> {
    let failed = |errno: i32| pb::FileReply { id: r.id, errno, ..Default::default() };
    if !r.read {
        let reply = match share.list(r.mount as usize, &r.path) {
            Ok(entries) => pb::FileReply {
                id: r.id,
                entries: entries
                    .into_iter()
                    .map(|e| pb::FileEntry { name: e.name, dir: e.dir, size: e.size, mode: e.mode, mtime_ns: e.mtime_ns, version: e.version })
                    .collect(),
                ..Default::default()
            },
            Err(e) => failed(e),
        };
        out.send(job::frame(Say::FileReply(reply))).await?;
        return Ok(());
    }
    let file = match share.read(r.mount as usize, &r.path) {
        Ok(f) => f,
        Err(e) => {
            out.send(job::frame(Say::FileReply(failed(e)))).await?;
            return Ok(());
        }
    };
    let size = file.metadata()?.len().min(r.limit);
    out.send(job::frame(Say::FileReply(pb::FileReply { id: r.id, size, ..Default::default() }))).await?;
    job::send_file(out, Say::FileData, r.id, file, size).await
}
