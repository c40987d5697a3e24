//! Unmodified static programs in the emulated jail, against the same programs
//! run natively.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use cpushare_sandbox::emulate::{run_emulated, EmulatedRun, Mount, World};
use cpushare_sandbox::{Limits, Options, Program};
use support::{needs, Captured};

mod support;

struct Outcome {
    run: EmulatedRun,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn emulate(elf: &[u8], args: &[&str], world: &World, stdin: &[u8]) -> Outcome {
    emulate_with(elf, args, world, stdin, &Options::default())
}

fn emulate_with(elf: &[u8], args: &[&str], world: &World, stdin: &[u8], options: &Options) -> Outcome {
    let program = Program::new(elf).unwrap();
    let (out, err) = (Captured::default(), Captured::default());
    let limits = Limits { ram_bytes: 512 << 20, ..Limits::default() };
    let run = run_emulated(&program, args, world, Box::new(std::io::Cursor::new(stdin.to_vec())), Box::new(out.clone()), Box::new(err.clone()), &limits, options).unwrap();
    Outcome { run, stdout: out.bytes(), stderr: err.bytes() }
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

/// A buyer directory with some text and a binary-ish file.
fn buyer_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..5000u32 {
        text.push_str(&format!("{} line {} of the buyer's data\n", (i * 7919) % 5000, i));
    }
    std::fs::write(dir.path().join("data.txt"), &text).unwrap();
    std::fs::write(dir.path().join("numbers.txt"), "3 4\n10 20\n-1 1\n").unwrap();
    dir
}

#[test]
fn busybox_applets_match_native_runs_over_buyer_files() {
    let Some(busybox) = needs("/usr/bin/busybox") else { return };
    let dir = buyer_files();
    let world = World { cwd: "/work".into(), mounts: vec![Mount { host: dir.path().into(), guest: "/work".into(), read_only: false }], ..World::default() };
    let cases: &[&[&str]] = &[
        &["sha256sum", "data.txt", "numbers.txt"],
        &["sort", "-n", "data.txt"],
        &["wc", "data.txt"],
        &["awk", "{ s += $1 * $2 } END { print s, NR }", "numbers.txt"],
        &["ls", "-1", "."],
        &["cat", "./././data.txt"],
    ];
    for args in cases {
        let o = emulate(&busybox, args, &world, b"");
        let expected = native("/usr/bin/busybox", &[&["busybox"][..], args].concat(), dir.path(), b"");
        assert!(o.run.ending.success(), "{args:?}: {:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&expected), "{args:?}");
    }
    // gzip writes a file next to its input; the result is the same bytes as natively.
    let o = emulate(&busybox, &["gzip", "-k", "-9", "data.txt"], &world, b"");
    assert!(o.run.ending.success(), "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
    let ours = std::fs::read(dir.path().join("data.txt.gz")).unwrap();
    std::fs::remove_file(dir.path().join("data.txt.gz")).unwrap();
    native("/usr/bin/busybox", &["busybox", "gzip", "-k", "-9", "data.txt"], dir.path(), b"");
    assert_eq!(ours, std::fs::read(dir.path().join("data.txt.gz")).unwrap());
    // Guest paths resolve in the guest's tree.
    let o = emulate(&busybox, &["cat", "/work/../work/./numbers.txt"], &world, b"");
    assert_eq!(o.stdout, b"3 4\n10 20\n-1 1\n");
    // And stdin to stdout.
    let o = emulate(&busybox, &["sort"], &world, b"b\nc\na\n");
    assert_eq!(o.stdout, b"a\nb\nc\n");
}

/// Builds one of `tests/emulated/` with `tool` (musl-gcc, gcc or rustc) into `dir`.
fn build(tool: &str, source: &str, dir: &Path) -> Option<Vec<u8>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulated").join(source);
    let out = dir.join(source.replace('.', "-"));
    let mut cmd = Command::new(if tool == "gcc-static-pie" { "gcc" } else { tool });
    match tool {
        "rustc" => cmd.args(["-O", "-C", "target-feature=+crt-static", "--edition", "2021"]),
        "gcc-static-pie" => cmd.args(["-O2", "-static-pie"]),
        _ => cmd.args(["-O2", "-static"]),
    };
    match cmd.arg(&src).arg("-o").arg(&out).status() {
        Ok(s) if s.success() => Some(std::fs::read(&out).unwrap()),
        r if std::env::var("CI").as_deref() == Ok("true") => panic!("{tool} could not build {source}: {r:?}"),
        r => {
            eprintln!("skipped: {tool} could not build {source}: {r:?} (scripts/test installs it)");
            None
        }
    }
}

fn mounted(dir: &Path) -> World {
    World {
        cwd: "/work".into(),
        mounts: vec![Mount { host: dir.into(), guest: "/work".into(), read_only: false }],
        env: vec!["GREETING=hello from the buyer".into(), "PATH=/bin".into()],
        ..World::default()
    }
}

#[test]
fn a_musl_program_reads_and_writes_files_and_allocates_100_mb() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(elf) = build("musl-gcc", "files.c", tmp.path()) else { return };
    let dir = buyer_files();
    let o = emulate(&elf, &["files", "numbers.txt", "upper.txt"], &mounted(dir.path()), b"");
    assert!(o.run.ending.success(), "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "lines 3 sum 3264000 size 15 greeting hello from the buyer\n");
    assert_eq!(std::fs::read_to_string(dir.path().join("sub/moved.txt")).unwrap(), "3 4\n10 20\n-1 1\n".to_uppercase());
}

#[test]
fn a_glibc_static_program_runs_unmodified() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(elf) = build("gcc", "files.c", tmp.path()) else { return };
    let dir = buyer_files();
    let o = emulate(&elf, &["files", "data.txt", "upper.txt"], &mounted(dir.path()), b"");
    assert!(o.run.ending.success(), "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("lines 5000 sum 3264000 size {} greeting hello from the buyer\n", std::fs::metadata(dir.path().join("data.txt")).unwrap().len()));
}

#[test]
fn a_rust_std_program_built_crt_static_runs_unmodified() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(elf) = build("rustc", "words.rs", tmp.path()) else { return };
    let dir = buyer_files();
    let o = emulate(&elf, &["words", "data.txt", "counts.txt"], &mounted(dir.path()), b"");
    assert!(o.run.ending.success(), "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
    let native_dir = buyer_files();
    let exe = tmp.path().join("words-rs");
    let expected = native(exe.to_str().unwrap(), &["words", "data.txt", "counts.txt"], native_dir.path(), b"");
    let words = String::from_utf8_lossy(&expected).split(',').next().unwrap().to_string();
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{words}, cwd /work\n"));
    assert_eq!(std::fs::read(dir.path().join("counts.txt")).unwrap(), std::fs::read(native_dir.path().join("counts.txt")).unwrap());
}

#[test]
fn hostile_calls_get_errors_and_touch_nothing_of_the_sellers() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(elf) = build("gcc", "hostile.c", tmp.path()) else { return };
    let dir = buyer_files();
    std::os::unix::fs::symlink("/etc", dir.path().join("escape")).unwrap();
    let ro = tempfile::tempdir().unwrap();
    let mut world = mounted(dir.path());
    world.mounts.push(Mount { host: ro.path().into(), guest: "/ro".into(), read_only: true });
    let _ = std::fs::remove_file("/tmp/cpushare-escaped");
    let o = emulate(&elf, &["hostile"], &world, b"");
    assert!(o.run.ending.success(), "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    for line in [
        "socket -1 Function not implemented",
        "ptrace -1 Function not implemented",
        "execve Function not implemented",
        "fork -1 Function not implemented",
        "shadow No such file or directory",
        "dotdot No such file or directory",
        "relative No such file or directory",
        "symlink No such file or directory",
        "readonly Read-only file system",
    ] {
        assert!(out.lines().any(|l| l == line), "expected {line:?} in:\n{out}");
    }
    // Each refused call is named in the log, once.
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("system call 41 (socket) is not emulated"), "{log}");
    assert!(log.contains("system call 59 (execve) is not emulated"), "{log}");
    assert!(!Path::new("/tmp/cpushare-escaped").exists());
    assert_eq!(std::fs::read_dir(ro.path()).unwrap().count(), 0);
}

#[test]
fn the_strict_mode_hostile_cases_hold_in_emulated_mode_too() {
    use cpushare_sandbox::test_guests as g;
    let report = |elf: &[u8], limits: Limits| {
        let program = Program::new(elf).unwrap();
        let run = run_emulated(&program, &["guest"], &World::default(), Box::new(std::io::empty()), Box::new(std::io::sink()), Box::new(std::io::sink()), &limits, &Options::default()).unwrap();
        run.ending.to_string()
    };
    let limits = Limits { ram_bytes: 256 << 20, ..Limits::default() };
    assert_eq!(report(g::RDTSC, limits.clone()), "killed: rdtsc (the time-stamp counter is off in the jail)");
    assert!(report(g::CRASH, limits.clone()).starts_with("killed: segmentation fault at 0x0"));
    assert_eq!(report(g::DEEP, limits.clone()), "killed: stack overflow");
    assert_eq!(report(g::SPIN, Limits { cpu_seconds: 1, ..limits.clone() }), "killed: CPU time limit (1 s)");
    assert!(report(g::HOG, limits).starts_with("killed: address-space limit"));
}

#[test]
fn a_static_pie_program_runs_unmodified() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(elf) = build("gcc-static-pie", "files.c", tmp.path()) else { return };
    assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), 3, "ET_DYN: position-independent");
    let dir = buyer_files();
    let o = emulate(&elf, &["files", "numbers.txt", "upper.txt"], &mounted(dir.path()), b"");
    assert!(o.run.ending.success(), "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "lines 3 sum 3264000 size 15 greeting hello from the buyer\n");
}

/// Where Syscall User Dispatch or FSGSBASE is missing, the seccomp-filter
/// fallback runs the same programs with the same results. Forced here: every
/// program sets its thread pointer with arch_prctl, which strict mode would
/// kill, so these pass only if the filter (and its one extra call) is in place.
#[test]
fn the_seccomp_filter_fallback_runs_the_same_programs() {
    use cpushare_sandbox::test_guests as g;
    let fallback = Options { fallback: true, ..Options::default() };
    let tmp = tempfile::tempdir().unwrap();
    if let Some(elf) = build("musl-gcc", "files.c", tmp.path()) {
        let dir = buyer_files();
        let o = emulate_with(&elf, &["files", "numbers.txt", "upper.txt"], &mounted(dir.path()), b"", &fallback);
        assert!(o.run.ending.success(), "{:?} {}", o.run, String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "lines 3 sum 3264000 size 15 greeting hello from the buyer\n");
    }
    if let Some(elf) = build("gcc", "hostile.c", tmp.path()) {
        let dir = buyer_files();
        let o = emulate_with(&elf, &["hostile"], &mounted(dir.path()), b"", &fallback);
        let out = String::from_utf8_lossy(&o.stdout);
        for line in ["socket -1 Function not implemented", "execve Function not implemented", "shadow No such file or directory"] {
            assert!(out.lines().any(|l| l == line), "expected {line:?} in:\n{out}");
        }
    }
    if let Some(busybox) = needs("/usr/bin/busybox") {
        let dir = buyer_files();
        let world = World { cwd: "/work".into(), mounts: vec![Mount { host: dir.path().into(), guest: "/work".into(), read_only: false }], ..World::default() };
        for args in [&["sha256sum", "data.txt"][..], &["sort", "-n", "data.txt"], &["awk", "{ s += $1 * $2 } END { print s, NR }", "numbers.txt"]] {
            let o = emulate_with(&busybox, args, &world, b"", &fallback);
            assert!(o.run.ending.success(), "{args:?}: {:?}", o.run);
            assert_eq!(o.stdout, native("/usr/bin/busybox", &[&["busybox"][..], args].concat(), dir.path(), b""), "{args:?}");
        }
    }
    // The strict-mode hostile cases hold behind the filter too.
    let report = |elf: &[u8], limits: Limits| {
        let program = Program::new(elf).unwrap();
        let run = run_emulated(&program, &["guest"], &World::default(), Box::new(std::io::empty()), Box::new(std::io::sink()), Box::new(std::io::sink()), &limits, &fallback).unwrap();
        run.ending.to_string()
    };
    let limits = Limits { ram_bytes: 256 << 20, ..Limits::default() };
    assert_eq!(report(g::RDTSC, limits.clone()), "killed: rdtsc (the time-stamp counter is off in the jail)");
    assert!(report(g::CRASH, limits.clone()).starts_with("killed: segmentation fault at 0x0"));
    assert_eq!(report(g::SPIN, Limits { cpu_seconds: 1, ..limits.clone() }), "killed: CPU time limit (1 s)");
    assert!(report(g::HOG, limits).starts_with("killed: address-space limit"));
}
