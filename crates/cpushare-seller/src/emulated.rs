//! A lease that runs one unmodified static program in the emulated jail, live:
//! the buyer's stdin comes in over the relay, the program's stdout and stderr
//! go back as it writes them, its files are the buyer's (fetched on demand,
//! see `cpushare_sandbox::emulate::mirror`), and when it ends what it changed
//! goes back before its outcome.
//!
//! The jail's supervisor runs on a blocking thread and speaks to the relay
//! through channels; a router task sorts what the buyer sends.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cpushare_exchange::job;
use cpushare_proto::v1::{self as pb, job_message::Body as Job};
use cpushare_sandbox::emulate::{run_emulated_remote, Cache, Changed, Entry, Fetch, Mount, Remote, Stopper, World};
use cpushare_sandbox::{Ending, Limits, Options, Program};
use prost::bytes::Bytes;
use tokio::sync::mpsc;

use crate::CHUNK;

/// Stdin the buyer may send ahead of what the program has read: the seller
/// grants this much more (a `stdin` chunk with only `size`) whenever less
/// than half of it is left.
const STDIN_WINDOW: u64 = 1 << 20;

/// The most mounts a buyer may ask for (the loader bounds arguments and environment).
const MAX_MOUNTS: usize = 64;

/// What a lease's emulated run needs of the seller.
pub(crate) struct Setup {
    pub lease: u64,
    pub buyer_account: u64,
    pub program: Arc<Program>,
    pub args: Vec<String>,
    pub world: pb::EmulatedWorld,
    pub limits: Limits,
    /// This seller's cache directory: `work/` for runs, `files/` for cached buyer files.
    pub cache_dir: PathBuf,
    pub disk_bytes: u64,
    pub cache_bytes: u64,
}

/// Checks what the buyer asked for and makes it the jail's world, with an
/// empty local directory per mount under `work`.
fn world(w: &pb::EmulatedWorld, work: &Path) -> anyhow::Result<World> {
    anyhow::ensure!(w.mounts.len() <= MAX_MOUNTS, "at most {MAX_MOUNTS} mounts");
    anyhow::ensure!(w.cwd.starts_with('/'), "the working directory must be absolute");
    let mut mounts = Vec::new();
    for (i, m) in w.mounts.iter().enumerate() {
        anyhow::ensure!(m.guest.starts_with('/') && !m.guest.contains('\0'), "mount {i}: the guest path must be absolute");
        let host = work.join(i.to_string());
        std::fs::create_dir_all(&host)?;
        mounts.push(Mount { host, guest: m.guest.clone(), read_only: m.read_only });
    }
    let mut seed = [0u8; 32];
    let n = w.seed.len().min(32);
    seed[..n].copy_from_slice(&w.seed[..n]);
    Ok(World { env: w.env.clone(), cwd: w.cwd.clone(), mounts, seed })
}

/// Runs the program; returns when its outcome is sent.
pub(crate) async fn serve(
    setup: Setup,
    mut inbound: tonic::Streaming<pb::RelayFrame>,
    out: mpsc::Sender<pb::RelayFrame>,
) -> anyhow::Result<()> {
    let work = setup.cache_dir.join("work").join(format!("lease-{}-{}", setup.lease, crate::process_tag::own()));
    let files_dir = setup.cache_dir.join("files");
    std::fs::create_dir_all(&files_dir)?;
    let _ = std::fs::remove_dir_all(&work);
    let _cleanup = RemoveOnDrop(work.clone());
    let stop = Stopper::default();
    // Kill the jail if this task is dropped (the lease ended) or the buyer goes.
    let _stop_on_drop = StopOnDrop(stop.clone());
    // Never blocked on stdin (the program may be waiting for a file reply):
    // the stdin window bounds what can pile up.
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Bytes>();
    let granted = Arc::new(AtomicU64::new(0));
    let (files_tx, files_rx) = mpsc::channel::<Job>(16);
    let router = tokio::spawn({
        let (stop, granted) = (stop.clone(), granted.clone());
        async move {
            let mut stdin_tx = Some(stdin_tx);
            let mut received = 0u64;
            // (Not one match arm with a guard: `b` moves into the send.)
            #[allow(clippy::collapsible_match)]
            while let Ok(Some(body)) = job::next(&mut inbound).await {
                match body {
                    Job::Stdin(c) => {
                        received += c.data.len() as u64;
                        if received > granted.load(Ordering::Acquire) {
                            tracing::warn!("the buyer sent more stdin than granted; run stopped");
                            break;
                        }
                        if let Some(tx) = &stdin_tx {
                            if !c.data.is_empty() && tx.send(c.data).is_err() {
                                stdin_tx = None;
                            }
                        }
                        if c.last {
                            stdin_tx = None;
                        }
                    }
                    b @ (Job::FileReply(_) | Job::FileData(_)) => {
                        if files_tx.send(b).await.is_err() {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            // The buyer is gone: nobody is left to see the program's work.
            stop.stop();
        }
    });
    let world = match world(&setup.world, &work) {
        Ok(w) => w,
        Err(e) => {
            let outcome = pb::Outcome { killed: format!("the seller refused the run: {e:#}"), ..Default::default() };
            return end(&out, outcome, router).await;
        }
    };

    let remote = Remote {
        fetch: Box::new(RelayFetch { out: out.clone(), replies: files_rx, next_id: 1 }),
        cache: Some(Cache { dir: files_dir.clone(), scope: format!("account {}", setup.buyer_account).into_bytes() }),
        disk_bytes: setup.disk_bytes,
        stop,
    };
    let (program, args, limits) = (setup.program.clone(), setup.args.clone(), setup.limits.clone());
    let (stdout, stderr) = (RelayWriter { out: out.clone(), err: false }, RelayWriter { out: out.clone(), err: true });
    let run = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let stdin = ChannelReader { rx: stdin_rx, pending: Bytes::new(), out: stdout.out.clone(), granted, consumed: 0 };
        run_emulated_remote(&program, &argv, &world, remote, Box::new(stdin), Box::new(stdout), Box::new(stderr), &limits, &Options::default())
    })
    .await?;
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            // Bad arguments are the buyer's to fix; anything else is ours.
            let seller_fault = e.kind() != io::ErrorKind::InvalidInput;
            let outcome = pb::Outcome { killed: format!("the jail could not start: {e}"), seller_fault, ..Default::default() };
            return end(&out, outcome, router).await;
        }
    };
    for change in run.changes {
        send_change(&out, change.mount, &change.path, change.state).await?;
    }
    let (exit_code, killed) = match &run.ending {
        Ending::Exited(c) => (*c, String::new()),
        Ending::Killed(k) => (-1, k.to_string()),
    };
    let outcome = pb::Outcome { success: run.ending.success(), exit_code, killed, cpu_ms: run.cpu.as_millis() as u64, ..Default::default() };
    let keep = setup.cache_bytes;
    tokio::task::spawn_blocking(move || trim_cache(&files_dir, keep));
    end(&out, outcome, router).await
}

/// Sends the outcome and waits for the buyer to close the relay (or the
/// lease to end): dropping our end first would reset it, outcome and all.
async fn end(out: &mpsc::Sender<pb::RelayFrame>, outcome: pb::Outcome, router: tokio::task::JoinHandle<()>) -> anyhow::Result<()> {
    out.send(job::frame(Job::Outcome(outcome))).await?;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(60), router).await;
    Ok(())
}

/// One changed path, and a file's content after it.
async fn send_change(out: &mpsc::Sender<pb::RelayFrame>, mount: usize, path: &str, state: Changed) -> anyhow::Result<()> {
    let (kind, mode, file) = match state {
        Changed::Gone => (pb::ChangeKind::Gone, 0, None),
        Changed::Dir { mode } => (pb::ChangeKind::Dir, mode, None),
        Changed::File { mode, file } => (pb::ChangeKind::File, mode, Some(file)),
    };
    let size = file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
    let change = pb::FileChange { mount: mount as u32, path: path.to_string(), kind: kind as i32, mode, size };
    out.send(job::frame(Job::FileChange(change))).await?;
    match file {
        Some(file) => job::send_file(out, Job::FileData, 0, file, u64::MAX).await,
        None => Ok(()),
    }
}

/// The buyer's files over the relay, asked from the jail's blocking thread.
struct RelayFetch {
    out: mpsc::Sender<pb::RelayFrame>,
    replies: mpsc::Receiver<Job>,
    next_id: u64,
}

const EIO: i32 = libc::EIO;

impl RelayFetch {
    fn ask(&mut self, mount: usize, path: &str, read: bool, limit: u64) -> Result<pb::FileReply, i32> {
        let id = self.next_id;
        self.next_id += 1;
        let request = pb::FileRequest { id, mount: mount as u32, path: path.to_string(), read, limit };
        self.out.blocking_send(job::frame(Job::FileRequest(request))).map_err(|_| EIO)?;
        loop {
            match self.replies.blocking_recv().ok_or(EIO)? {
                Job::FileReply(r) if r.id == id => {
                    return if r.errno != 0 { Err(r.errno) } else { Ok(r) };
                }
                // Leftovers of an earlier request that failed halfway.
                _ => continue,
            }
        }
    }
}

impl Fetch for RelayFetch {
    fn list(&mut self, mount: usize, path: &str) -> Result<Vec<Entry>, i32> {
        let reply = self.ask(mount, path, false, 0)?;
        Ok(reply
            .entries
            .into_iter()
            .map(|e| Entry { name: e.name, dir: e.dir, size: e.size, mode: e.mode, mtime_ns: e.mtime_ns, version: e.version })
            .collect())
    }

    fn read(&mut self, mount: usize, path: &str, to: &mut File, limit: u64) -> Result<u64, i32> {
        let reply = self.ask(mount, path, true, limit)?;
        let mut got = 0u64;
        loop {
            match self.replies.blocking_recv().ok_or(EIO)? {
                Job::FileData(c) if c.fragment == reply.id => {
                    got += c.data.len() as u64;
                    if got > limit {
                        return Err(libc::EFBIG);
                    }
                    to.write_all(&c.data).map_err(|e| e.raw_os_error().unwrap_or(EIO))?;
                    if c.last {
                        return Ok(got);
                    }
                }
                _ => return Err(EIO),
            }
        }
    }
}

/// The program's stdin: what the buyer sends, until it says that was all.
/// The buyer reads its own stdin only once the program first reads, and
/// then stays at most [`STDIN_WINDOW`] ahead.
struct ChannelReader {
    rx: mpsc::UnboundedReceiver<Bytes>,
    pending: Bytes,
    out: mpsc::Sender<pb::RelayFrame>,
    /// Bytes the buyer may have sent, and bytes the program has read.
    granted: Arc<AtomicU64>,
    consumed: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            let granted = self.granted.load(Ordering::Acquire);
            if granted - self.consumed < STDIN_WINDOW / 2 {
                // Granted before asked: the router checks against it.
                self.granted.store(granted + STDIN_WINDOW, Ordering::Release);
                let more = pb::Chunk { fragment: 0, data: Bytes::new(), last: false, size: STDIN_WINDOW };
                self.out.blocking_send(job::frame(Job::Stdin(more))).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
            }
            match self.rx.blocking_recv() {
                Some(b) => self.pending = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        self.consumed += n as u64;
        Ok(n)
    }
}

/// The program's stdout or stderr, sent as it writes.
struct RelayWriter {
    out: mpsc::Sender<pb::RelayFrame>,
    err: bool,
}

impl Write for RelayWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK);
        let wrap = if self.err { Job::Stderr } else { Job::Stdout };
        let frame = job::chunk_frame(wrap, |to, _| {
            to.extend_from_slice(&buf[..n]);
            Ok(())
        });
        self.out.blocking_send(frame?).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct StopOnDrop(Stopper);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Keeps the cache of buyers' read-only files under `keep` bytes, dropping
/// the least recently used first (a use relinks and so touches its ctime).
fn trim_cache(dir: &Path, keep: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(i64, u64, PathBuf)> =
        entries.flatten().filter_map(|e| e.metadata().ok().filter(|m| m.is_file()).map(|m| (m.ctime(), m.len(), e.path()))).collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= keep {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}
