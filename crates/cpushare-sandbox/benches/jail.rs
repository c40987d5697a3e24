//! The jail against running the same static program natively (spawn + execve,
//! no jail): how long a jail takes to start, and what it costs a CPU-bound
//! program. See BENCHMARKS.md for results.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use criterion::{criterion_group, criterion_main, Criterion};
use cpushare_sandbox::{examples, run, test_guests, Ending, Limits, Options, Program};

/// A tile that keeps one CPU busy for a few hundred milliseconds.
const TILE: &[u8] = b"-2.0 -1.2 0.006 500 400 2000";

fn native_file(dir: &std::path::Path, name: &str, elf: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, elf).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn native(path: &std::path::Path, input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(path).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn jail_start(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    let program = Program::new(test_guests::EXITCODE).unwrap();
    let path = native_file(tmp.path(), "exitcode", test_guests::EXITCODE);
    let mut g = c.benchmark_group("jail start (spawn, load, exit at once)");
    g.bench_function("cpushare jail (loader, rlimits, seccomp strict)", |b| {
        b.iter(|| {
            let r = rt.block_on(run(&program, &["exitcode"], vec![0], &limits, &Options::default())).unwrap();
            assert_eq!(r.ending, Ending::Exited(0));
        })
    });
    g.bench_function("native spawn + execve of the same program, no jail", |b| b.iter(|| native(&path, &[0])));
    g.finish();
}

fn cpu_bound(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    let program = Program::new(examples::MANDELBROT).unwrap();
    let path = native_file(tmp.path(), "mandelbrot", examples::MANDELBROT);
    let expected = native(&path, TILE);
    let mut g = c.benchmark_group("CPU-bound: one 500x400 mandelbrot tile, 2000 iterations");
    g.sample_size(20);
    g.bench_function("in the jail", |b| {
        b.iter(|| {
            let r = rt.block_on(run(&program, &["mandelbrot"], TILE.to_vec(), &limits, &Options::default())).unwrap();
            assert!(r.output == expected);
        })
    });
    g.bench_function("native", |b| b.iter(|| native(&path, TILE)));
    g.finish();
}

criterion_group!(benches, jail_start, cpu_bound);
criterion_main!(benches);
