//! `cpushare run --local --emulate PROGRAM -- ARGS`: an unmodified static
//! program in the emulated jail, behaving as if run here: the terminal's
//! stdin feeds it, its stdout and stderr stream back live, its exit status is
//! ours, and it sees only the directories mounted for it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use cpushare_sandbox::emulate::{run_emulated, Mount, World};
use cpushare_sandbox::{Ending, Limits, Options, Program};

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

pub async fn run(path: PathBuf, elf: Vec<u8>, args: Vec<String>, mounts: Vec<String>, log: Option<PathBuf>) -> anyhow::Result<()> {
    let here = std::env::current_dir().context("the current directory")?;
    let mounts: Vec<Mount> = if mounts.is_empty() {
        let at = here.to_string_lossy().into_owned();
        vec![Mount { host: here.clone(), guest: at, read_only: false }]
    } else {
        mounts.iter().map(|m| Mount::parse(m).map_err(anyhow::Error::msg)).collect::<anyhow::Result<_>>()?
    };
    // The program starts where we are when that is inside one of its mounts.
    let cwd = mounts
        .iter()
        .find_map(|m| here.strip_prefix(&m.host).ok().map(|rest| format!("{}/{}", m.guest.trim_end_matches('/'), rest.to_string_lossy())))
        .unwrap_or_else(|| "/".into());
    let seed: [u8; 32] = rand_seed();
    let world = World { env: std::env::vars().map(|(k, v)| format!("{k}={v}")).collect(), cwd, mounts, seed };
    let copy = match &log {
        Some(p) => Some(Arc::new(Mutex::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?))),
        None => None,
    };
    let argv0 = path.file_name().map_or("program".into(), |n| n.to_string_lossy().into_owned());
    let argv: Vec<String> = std::iter::once(argv0).chain(args).collect();
    let program = Program::new(&elf)?;
    let run = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        run_emulated(
            &program,
            &argv,
            &world,
            Box::new(std::io::stdin()),
            Box::new(Tee { to: std::io::stdout(), copy: copy.clone() }),
            Box::new(Tee { to: std::io::stderr(), copy }),
            &Limits { ram_bytes: 4 << 30, ..Limits::default() },
            &Options { debuggable: true, ..Options::default() },
        )
    })
    .await??;
    match run.ending {
        Ending::Exited(code) => std::process::exit(code),
        Ending::Killed(kill) => {
            eprintln!("cpushare: {kill}");
            std::process::exit(125)
        }
    }
}

/// A fresh seed for the program's getrandom (the kernel's randomness, read once).
fn rand_seed() -> [u8; 32] {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed)).expect("/dev/urandom");
    seed
}
