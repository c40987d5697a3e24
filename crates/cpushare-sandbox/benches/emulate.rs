//! The emulated jail against the same unmodified static program run natively:
//! the cost of one emulated system call (against a plain pipe round trip, the
//! obvious way to forward a call), reading a file through the emulation, and
//! a CPU-bound loop. See BENCHMARKS.md for results.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cpushare_sandbox::emulate::{run_emulated, Mount, World};
use cpushare_sandbox::{Limits, Options, Program};

fn build(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulated/bench.c");
    let out = dir.join("bench");
    assert!(Command::new("gcc").args(["-O2", "-static"]).arg(&src).arg("-o").arg(&out).status().unwrap().success());
    out
}

fn emulated(program: &Program, args: &[&str], world: &World) -> (Duration, String) {
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let limits = Limits { ram_bytes: 1 << 30, ..Limits::default() };
    let started = Instant::now();
    let run = run_emulated(program, args, world, Box::new(std::io::empty()), Box::new(Sink(out.clone())), Box::new(std::io::sink()), &limits, &Options::default()).unwrap();
    let took = started.elapsed();
    assert!(run.ending.success(), "{:?}", run);
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    (took, text)
}

fn native(exe: &Path, args: &[&str], dir: &Path) -> (Duration, String) {
    let started = Instant::now();
    let out = Command::new(exe).args(&args[1..]).current_dir(dir).output().unwrap();
    (started.elapsed(), String::from_utf8(out.stdout).unwrap())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A one-byte round trip between two processes over two pipes, µs (median of batches).
fn pipe_round_trip() -> f64 {
    let (mut a_r, mut a_w) = std::io::pipe().unwrap();
    let (mut b_r, mut b_w) = std::io::pipe().unwrap();
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while a_r.read_exact(&mut b).is_ok() {
            if b_w.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut batches = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        for _ in 0..2000 {
            a_w.write_all(&[1]).unwrap();
            let mut b = [0u8; 1];
            b_r.read_exact(&mut b).unwrap();
        }
        batches.push(started.elapsed().as_secs_f64() * 1e6 / 2000.0);
    }
    drop(a_w);
    echo.join().unwrap();
    median(batches)
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = build(tmp.path());
    let program = Program::new(&std::fs::read(&exe).unwrap()).unwrap();
    let world = World { cwd: "/work".into(), mounts: vec![Mount { host: tmp.path().into(), guest: "/work".into(), read_only: true }], ..World::default() };

    // One emulated call: (N calls - no calls) / N, median of runs.
    let n = 200_000;
    let per_call: Vec<f64> = (0..9)
        .map(|_| {
            let (with, _) = emulated(&program, &["bench", "calls", &n.to_string()], &world);
            let (without, _) = emulated(&program, &["bench", "calls", "0"], &world);
            (with.as_secs_f64() - without.as_secs_f64()) * 1e6 / n as f64
        })
        .collect();
    println!("emulated system call (getppid), round trip: median {:.2} µs over 9 runs of {n}", median(per_call));
    println!("peer: one-byte round trip over two pipes between two threads: median {:.2} µs", pipe_round_trip());

    // Reading a file through the emulation.
    let mib = 1024;
    let file = tmp.path().join("big");
    std::fs::write(&file, vec![7u8; mib << 20]).unwrap();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..5 {
        let (t, out) = emulated(&program, &["bench", "read", "/work/big"], &world);
        assert_eq!(out.trim(), (mib << 20).to_string());
        ours.push((mib << 20) as f64 / t.as_secs_f64() / 1e6);
        let (t, _) = native(&exe, &["bench", "read", "big"], tmp.path());
        theirs.push((mib << 20) as f64 / t.as_secs_f64() / 1e6);
    }
    println!("reading a {mib} MiB buyer file in 1 MiB reads: emulated {:.0} MB/s, native {:.0} MB/s (medians of 5)", median(ours), median(theirs));

    // CPU-bound.
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..5 {
        let (t, a) = emulated(&program, &["bench", "cpu", "600"], &world);
        let (u, b) = native(&exe, &["bench", "cpu", "600"], tmp.path());
        assert_eq!(a, b);
        ours.push(t.as_secs_f64() * 1e3);
        theirs.push(u.as_secs_f64() * 1e3);
    }
    let (o, t) = (median(ours), median(theirs));
    println!("CPU-bound loop (600x600 Mandelbrot points): emulated {o:.1} ms, native {t:.1} ms ({:+.1} %)", (o / t - 1.0) * 100.0);
}
