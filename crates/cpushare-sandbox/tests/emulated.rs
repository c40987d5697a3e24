//! Unmodified static programs in the emulated jail, against the same programs
//! run natively.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use cpushare_sandbox::emulate::{run_emulated, EmulatedRun, Mount, World};
use cpushare_sandbox::{Limits, Options, Program};

/// A `Write` whose bytes the test reads afterwards.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

struct Outcome {
    run: EmulatedRun,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn emulate(elf: &[u8], args: &[&str], world: &World, stdin: &[u8]) -> Outcome {
    let program = Program::new(elf).unwrap();
    let (out, err) = (Captured::default(), Captured::default());
    let limits = Limits { ram_bytes: 512 << 20, ..Limits::default() };
    let run = run_emulated(&program, args, world, Box::new(std::io::Cursor::new(stdin.to_vec())), Box::new(out.clone()), Box::new(err.clone()), &limits, &Options::default()).unwrap();
    Outcome { run, stdout: out.bytes(), stderr: err.bytes() }
}

/// A prerequisite program, or None (a skip, said aloud) outside CI.
fn needs(path: &str) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{path} is needed under CI: {e}"),
        Err(e) => {
            eprintln!("skipped: {path}: {e} (scripts/test installs it)");
            None
        }
    }
}

fn native(path: &str, args: &[&str], dir: &Path, stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(path).args(&args[1..]).current_dir(dir).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    out.stdout
}

#[test]
fn busybox_echo_runs_unmodified() {
    let Some(busybox) = needs("/usr/bin/busybox") else { return };
    let o = emulate(&busybox, &["echo", "hello", "jail"], &World::default(), b"");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello jail\n", "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
    assert!(o.run.ending.success(), "{:?}", o.run);
}
