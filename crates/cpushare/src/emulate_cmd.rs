//! `cpushare run --emulate PROGRAM -- ARGS`: an unmodified static program
//! behaving as if run here: the terminal's stdin feeds it, its stdout and
//! stderr stream back live, its exit status is ours, and it sees only the
//! directories mounted for it. On a rented CPU (the default) those
//! directories are fetched by the seller as the program opens them and what
//! it changes is written back here when it ends; with `--local` it runs in
//! the same jail on this machine.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use anyhow::Context;
use cpushare_buyer::{run_unmodified, Progress, Unmodified};
use cpushare_exchange::node::NodeConfig;
use cpushare_sandbox::emulate::{run_emulated, Mount, World};
use cpushare_sandbox::{Ending, Limits, Options, Program};

/// What `cpushare run --emulate` was asked.
pub struct Request {
    pub path: PathBuf,
    pub elf: Vec<u8>,
    pub args: Vec<String>,
    pub mounts: Vec<String>,
    pub env: Vec<String>,
    pub log: Option<PathBuf>,
    pub local: bool,
    pub max_price: u64,
    pub min_ram_mib: u32,
}

/// The exit status for a run the jail ended (or that could not run).
const JAIL_ENDED: i32 = 125;

/// Writes to a stream and, when asked, to a shared log file too.
struct Tee<W: Write> {
    to: W,
    copy: Option<Arc<Mutex<std::fs::File>>>,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.to.write(buf)?;
        if let Some(f) = &self.copy {
            f.lock().unwrap().write_all(&buf[..n])?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.to.flush()
    }
}

/// A terminal or pipe written directly: the program's output arrives in
/// pieces of at most a megabyte, and the order of stdout and stderr is kept.
impl<W: Write + Unpin> tokio::io::AsyncWrite for Tee<W> {
    fn poll_write(self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Write::write(self.get_mut(), buf))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Write::flush(self.get_mut()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Notes go to stderr when a person is watching it.
struct Notes;

impl Progress for Notes {
    fn note(&self, message: &str) {
        if std::io::stderr().is_terminal() {
            eprintln!("cpushare: {message}");
        }
    }
}

/// Variables passed to a stranger's machine unless more are asked for with
/// `--env`: nothing secret, only what makes programs behave as here.
const PASSED: [&str; 4] = ["LANG", "LC_ALL", "TERM", "TZ"];

/// `--env NAME=VALUE`, or `--env NAME` for our value.
fn env_of(asked: &[String], base: impl Iterator<Item = (String, String)>) -> anyhow::Result<Vec<String>> {
    let mut env: Vec<(String, String)> = base.collect();
    for a in asked {
        let (name, value) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (a.clone(), std::env::var(a).with_context(|| format!("--env {a}: no such variable here (use NAME=VALUE)"))?),
        };
        anyhow::ensure!(!name.is_empty(), "--env {a}: expected NAME=VALUE or NAME");
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

pub async fn run(r: Request, config: &Path) -> anyhow::Result<()> {
    let here = std::env::current_dir().context("the current directory")?;
    let mounts: Vec<Mount> = if r.mounts.is_empty() {
        let at = here.to_string_lossy().into_owned();
        vec![Mount { host: here.clone(), guest: at, read_only: false }]
    } else {
        r.mounts.iter().map(|m| Mount::parse(m).map_err(anyhow::Error::msg)).collect::<anyhow::Result<_>>()?
    };
    // The program starts where we are when that is inside one of its mounts.
    let cwd = mounts
        .iter()
        .find_map(|m| here.strip_prefix(&m.host).ok().map(|rest| format!("{}/{}", m.guest.trim_end_matches('/'), rest.to_string_lossy())))
        .unwrap_or_else(|| "/".into());
    let env = if r.local {
        env_of(&r.env, std::env::vars())?
    } else {
        env_of(&r.env, std::env::vars().filter(|(k, _)| PASSED.contains(&k.as_str())))?
    };
    let copy = match &r.log {
        Some(p) => Some(Arc::new(Mutex::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?))),
        None => None,
    };
    let argv0 = r.path.file_name().map_or("program".into(), |n| n.to_string_lossy().into_owned());
    let argv: Vec<String> = std::iter::once(argv0).chain(r.args).collect();
    let stdout = Tee { to: std::io::stdout(), copy: copy.clone() };
    let stderr = Tee { to: std::io::stderr(), copy };
    let world = World { env, cwd, mounts, seed: rand_seed() };
    let code = if r.local {
        local(r.elf, argv, world, stdout, stderr).await?
    } else {
        let job = Unmodified {
            program: r.elf,
            args: argv,
            env: world.env,
            cwd: world.cwd,
            mounts: world.mounts,
            seed: world.seed,
            max_price: r.max_price,
            min_ram_mib: r.min_ram_mib,
        };
        let conn = NodeConfig::load(config)?.connect().await?;
        let done = run_unmodified(conn, job, tokio::io::stdin(), stdout, stderr, &Notes).await?;
        Notes.note(&format!(
            "ran on seller node {} (lease {}): {} ms of CPU, {} cents, {} path(s) written back",
            done.seller_node, done.lease, done.cpu_ms, done.cost_cents, done.written_back
        ));
        for failed in &done.not_written_back {
            eprintln!("cpushare: could not write back {failed}");
        }
        match done.exit_code {
            Some(0) if !done.not_written_back.is_empty() => JAIL_ENDED,
            Some(code) => code,
            None => {
                eprintln!("cpushare: {}", done.killed);
                JAIL_ENDED
            }
        }
    };
    std::process::exit(code)
}

/// Runs it here, in the same jail.
async fn local(elf: Vec<u8>, argv: Vec<String>, world: World, stdout: Tee<std::io::Stdout>, stderr: Tee<std::io::Stderr>) -> anyhow::Result<i32> {
    let program = Program::new(&elf)?;
    let run = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        run_emulated(
            &program,
            &argv,
            &world,
            Box::new(std::io::stdin()),
            Box::new(stdout),
            Box::new(stderr),
            &Limits { ram_bytes: 4 << 30, ..Limits::default() },
            &Options { debuggable: true, ..Options::default() },
        )
    })
    .await??;
    Ok(match run.ending {
        Ending::Exited(code) => code,
        Ending::Killed(kill) => {
            eprintln!("cpushare: {kill}");
            JAIL_ENDED
        }
    })
}

/// A fresh seed for the program's getrandom (the kernel's randomness, read once).
fn rand_seed() -> [u8; 32] {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed)).expect("/dev/urandom");
    seed
}
