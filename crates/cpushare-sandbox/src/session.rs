//! Stream mode: one jail serves many fragments, so that small fragments do not
//! each pay for a new process (about 0.4 ms here, more than the work in many of
//! them).
//!
//! The protocol, which the guest SDKs implement (`cs_stream_*` in C, `stream`
//! in Rust):
//! - fd 0 carries each fragment as an 8-byte little-endian length and then
//!   its bytes; the end of fd 0 means there is no more work.
//! - fd 1 carries records: `1, len: u32 LE, bytes` is output of the current
//!   fragment; `2, status: i32 LE` ends the fragment (0 is success).
//! - fd 2 is the log, as in a one-shot jail; what the program writes there
//!   while a fragment runs belongs to that fragment.
//!
//! A fragment that kills its jail (a forbidden call, a fault, its CPU time) is
//! reported exactly as in a one-shot jail, and the next fragment gets a new
//! jail. Every fragment gets the full `Limits::cpu_seconds`, counted by the
//! supervisor (moving the jail's RLIMIT_CPU would need CAP_SYS_RESOURCE once
//! the jail runs as another user); the jail's own RLIMIT_CPU is a budget of
//! many fragments, and a jail that has used most of it is replaced.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::jail::{ending, keep_log, start, wait, wall_limit, Ending, Kill, Limits, Options, Program, Run, Started};

/// Record kinds on fd 1.
pub const RECORD_OUTPUT: u8 = 1;
pub const RECORD_END: u8 = 2;

/// A jail's CPU budget, in fragment limits: after this much it is replaced.
const BUDGET_FRAGMENTS: u64 = 16;

/// The jail of a stream-mode program; started on the first fragment, and again
/// after a fragment kills it.
pub struct Session {
    program: Arc<Program>,
    args: Vec<String>,
    limits: Limits,
    options: Options,
    jail: Option<Started>,
    jails_started: u64,
}

/// How the program's records for one fragment ended.
#[derive(Debug, PartialEq, Eq)]
#[doc(hidden)]
pub enum Records {
    /// The program ended the fragment with this status.
    End(i32),
    /// Its output passed the lease's limit.
    TooMuch,
    /// fd 1 closed or broke the protocol: the jail ended (or must).
    Broken,
}

impl Session {
    pub fn new(program: Arc<Program>, args: &[&str], limits: Limits, options: Options) -> Session {
        Session { program, args: args.iter().map(|s| s.to_string()).collect(), limits, options, jail: None, jails_started: 0 }
    }

    /// How many jails this session has started (one, unless fragments killed them).
    pub fn jails_started(&self) -> u64 {
        self.jails_started
    }

    /// Runs one fragment.
    pub async fn run(&mut self, input: &[u8]) -> io::Result<Run> {
        let started = Instant::now();
        let per_fragment = self.limits.cpu_seconds;
        let budget = per_fragment.saturating_mul(BUDGET_FRAGMENTS);
        if let Some(jail) = &self.jail {
            if cpu_used(jail.pid)?.as_secs() + per_fragment > budget {
                self.jail = None; // killed on drop
            }
        }
        if self.jail.is_none() {
            let args: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
            self.jail = Some(start(&self.program, &args, &self.limits, budget, &self.options)?);
            self.jails_started += 1;
        }
        let jail = self.jail.as_mut().unwrap();
        let pid = jail.pid;
        let cpu_before = cpu_used(pid)?;
        let mut output = Vec::new();
        let mut log = Vec::new();
        let mut killed = None;
        let (records, written) = {
            let Started { stdin, stdout, stderr, .. } = jail;
            let header = (input.len() as u64).to_le_bytes();
            let writing = async {
                stdin.write_all(&header).await?;
                stdin.write_all(input).await
            };
            let reading = read_records(stdout, &mut output, self.limits.output_bytes);
            tokio::pin!(writing, reading);
            let mut buf = vec![0u8; 16 << 10];
            let (mut written, mut log_open) = (false, true);
            // The fragment's CPU limit, kept by the supervisor: CPU time never
            // runs ahead of wall time, so checking when the limit could first
            // be reached, and again after what is left, misses nothing.
            let limit = Duration::from_secs(per_fragment);
            let wall = wall_limit(per_fragment);
            let check = tokio::time::sleep(limit);
            tokio::pin!(check);
            let records = loop {
                tokio::select! {
                    // A program that dies mid-input breaks the pipe: its records say the rest.
                    _ = &mut writing, if !written => written = true,
                    r = &mut reading => break r,
                    r = stderr.read(&mut buf), if log_open => match r {
                        Ok(n) if n > 0 => keep_log(&mut log, &buf[..n], self.limits.log_bytes),
                        _ => log_open = false,
                    },
                    _ = &mut check => {
                        let used = cpu_used(pid)?.saturating_sub(cpu_before);
                        if used >= limit {
                            killed = Some(Kill::CpuLimit { seconds: per_fragment });
                            break Records::Broken;
                        }
                        if started.elapsed() >= wall {
                            killed = Some(Kill::WallClock { seconds: wall.as_secs() });
                            break Records::Broken;
                        }
                        let next = (limit - used).max(Duration::from_millis(20)).min(wall.saturating_sub(started.elapsed()));
                        check.as_mut().reset(tokio::time::Instant::now() + next);
                    }
                }
            };
            // Whatever the program logged before it ended the fragment is in the pipe now.
            // Read the fd itself: tokio's try_read answers from its cached
            // readiness, which may not have seen these bytes yet.
            let fd = std::os::fd::AsRawFd::as_raw_fd(stderr);
            if log_open {
                loop {
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    if n <= 0 {
                        break;
                    }
                    keep_log(&mut log, &buf[..n as usize], self.limits.log_bytes);
                }
            }
            (records, written)
        };

        let ending = match records {
            // It ended the fragment without reading all of it: the rest would be
            // taken for the next fragment, so this jail cannot go on.
            Records::End(status) if !written => {
                self.jail = None;
                Ending::Exited(status)
            }
            Records::End(status) => Ending::Exited(status),
            Records::TooMuch | Records::Broken => {
                if matches!(records, Records::TooMuch) {
                    killed = Some(Kill::OutputLimit { bytes: self.limits.output_bytes });
                }
                let mut jail = self.jail.take().unwrap();
                if killed.is_some() {
                    unsafe { libc::kill(jail.pid, libc::SIGKILL) };
                }
                let pid = jail.pid;
                let (wstatus, cpu) = tokio::task::spawn_blocking(move || wait(pid)).await.map_err(io::Error::other)??;
                jail.guard.0 = None;
                let cpu = cpu.saturating_sub(cpu_before);
                let ending = ending(killed, &jail.status, wstatus, cpu, &self.limits);
                return Ok(Run { ending, output, log, cpu, wall: started.elapsed() });
            }
        };
        let cpu = match &self.jail {
            Some(j) => cpu_used(j.pid)?.saturating_sub(cpu_before),
            None => Duration::ZERO,
        };
        Ok(Run { ending, output, log, cpu, wall: started.elapsed() })
    }
}

/// For the fuzzer: what the supervisor makes of `bytes` on a jail's fd 1
/// (the first fragment's records), the output it kept, at most `cap`.
#[doc(hidden)]
pub fn records_of(mut bytes: &[u8], cap: usize) -> (Records, Vec<u8>) {
    use std::future::Future;
    let mut output = Vec::new();
    let records = {
        let read = std::pin::pin!(read_records(&mut bytes, &mut output, cap));
        // A slice is always ready: one poll finishes it.
        let std::task::Poll::Ready(records) = read.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) else { unreachable!("a slice never blocks") };
        records
    };
    (records, output)
}

/// Reads one fragment's records into `output`.
async fn read_records(from: &mut (impl tokio::io::AsyncRead + Unpin), output: &mut Vec<u8>, cap: usize) -> Records {
    let mut head = [0u8; 5];
    loop {
        if from.read_exact(&mut head).await.is_err() {
            return Records::Broken;
        }
        let n = u32::from_le_bytes(head[1..5].try_into().unwrap());
        match head[0] {
            RECORD_OUTPUT => {
                let n = n as usize;
                if output.len() + n > cap {
                    return Records::TooMuch;
                }
                let at = output.len();
                output.resize(at + n, 0);
                if from.read_exact(&mut output[at..]).await.is_err() {
                    output.truncate(at);
                    return Records::Broken;
                }
            }
            RECORD_END => return Records::End(n as i32),
            _ => return Records::Broken,
        }
    }
}

/// The CPU time a process has used so far (user + system).
fn cpu_used(pid: libc::pid_t) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses;
    // utime and stime are the 14th and 15th of the line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let t = ticks(11) + ticks(12);
    Ok(Duration::from_millis(t * 1000 / per_sec))
}
