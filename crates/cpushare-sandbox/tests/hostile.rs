//! The jail against honest and hostile programs: each ends with the exact
//! report a buyer would read, and the supervisor carries on.

use cpushare_sandbox::{examples, run, test_guests as g, Ending, Kill, Limits, Options, Program};

fn limits() -> Limits {
    Limits { ram_bytes: 256 << 20, cpu_seconds: 5, output_bytes: 1 << 20, log_bytes: 4096 }
}

async fn jail(elf: &[u8], input: &[u8], limits: &Limits) -> cpushare_sandbox::Run {
    let program = Program::new(elf).unwrap();
    run(&program, &["guest"], input.to_vec(), limits, &Options::default()).await.unwrap()
}

async fn report(elf: &[u8], limits: &Limits) -> String {
    let r = jail(elf, b"", limits).await;
    match r.ending {
        Ending::Killed(k) => k.to_string(),
        other => panic!("expected a kill, got {other}"),
    }
}

#[tokio::test]
async fn an_honest_program_reads_writes_and_logs() {
    let r = jail(g::HELLO, b"hello, jail", &limits()).await;
    assert_eq!(r.ending, Ending::Exited(0));
    assert_eq!(r.output, b"HELLO, JAIL");
    assert_eq!(r.log, b"hello: done\n");
    let r = jail(g::EXITCODE, &[42], &limits()).await;
    assert_eq!(r.ending, Ending::Exited(42));
}

#[tokio::test]
async fn forbidden_system_calls_are_named() {
    assert_eq!(report(g::FORK, &limits()).await, "killed by the jail: forbidden system call 57 (fork)");
    assert_eq!(report(g::OPEN, &limits()).await, "killed by the jail: forbidden system call 2 (open)");
    // Switching dispatch off is itself a system call it sees.
    assert_eq!(report(g::SNEAKY, &limits()).await, "killed by the jail: forbidden system call 157 (prctl)");
}

#[tokio::test]
async fn the_time_stamp_counter_is_off() {
    assert_eq!(report(g::RDTSC, &limits()).await, "killed: rdtsc (the time-stamp counter is off in the jail)");
}

#[tokio::test]
async fn the_cpu_time_limit_ends_a_spinning_program() {
    let l = Limits { cpu_seconds: 1, ..limits() };
    assert_eq!(report(g::SPIN, &l).await, "killed: CPU time limit (1 s)");
}

#[tokio::test]
async fn a_program_larger_than_the_slot_is_refused() {
    let r = report(g::HOG, &limits()).await;
    assert_eq!(r, "killed: address-space limit (the program needs 2049 MiB, the slot offers 256 MiB)");
}

#[tokio::test]
async fn faults_are_reported() {
    assert!(report(g::CRASH, &limits()).await.starts_with("killed: segmentation fault at 0x0"));
    assert_eq!(report(g::DEEP, &limits()).await, "killed: stack overflow");
}

#[tokio::test]
async fn output_beyond_the_lease_is_cut_without_filling_memory() {
    let l = Limits { output_bytes: 1 << 20, ..limits() };
    let r = jail(g::SPEW, b"", &l).await;
    assert_eq!(r.ending, Ending::Killed(Kill::OutputLimit { bytes: 1 << 20 }));
    assert!(r.output.len() <= 1 << 20);
    assert_eq!(r.ending.to_string(), "killed: output larger than the 1048576 bytes this lease allows");
}

#[tokio::test]
async fn garbage_is_not_a_program() {
    assert_eq!(report(b"#!/bin/sh\nrm -rf /\n", &limits()).await, "not a program the jail can run: not a 64-bit little-endian ELF file");
    let mut elf = g::HELLO.to_vec();
    elf[18] = 40; // e_machine: ARM
    assert_eq!(report(&elf, &limits()).await, "not a program the jail can run: not an x86-64 program");
}

#[tokio::test]
async fn many_jails_at_once_do_not_disturb_each_other() {
    let program = Program::new(g::HELLO).unwrap();
    let hostile = Program::new(g::FORK).unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let input = format!("job {i}").into_bytes();
        let (p, h) = (&program, &hostile);
        tasks.push(async move {
            let good = run(p, &["hello"], input.clone(), &limits(), &Options::default()).await.unwrap();
            let bad = run(h, &["fork"], Vec::new(), &limits(), &Options::default()).await.unwrap();
            (input, good, bad)
        });
    }
    for (input, good, bad) in futures::future::join_all(tasks).await {
        assert_eq!(good.output, input.to_ascii_uppercase());
        assert_eq!(bad.ending, Ending::Killed(Kill::ForbiddenSyscall { nr: 57 }));
    }
}

#[tokio::test]
async fn the_examples_compute_what_they_should() {
    let r = jail(examples::MANDELBROT, b"-2.0 -1.2 0.1 8 4 50", &limits()).await;
    assert_eq!(r.ending, Ending::Exited(0), "{}", String::from_utf8_lossy(&r.log));
    assert!(r.output.starts_with(b"P5\n8 4\n255\n"));
    assert_eq!(r.output.len(), 11 + 32);
    // sha256("hello"), searched in a range that holds it and one that does not.
    let hash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let index = [7u64, 4, 11, 11, 14].iter().fold(0, |acc, d| acc * 26 + d); // "hello" in base 26
    let found = jail(examples::CRACK, format!("{hash} abcdefghijklmnopqrstuvwxyz 5 {} 1000", index - 500).as_bytes(), &limits()).await;
    assert_eq!(found.output, b"found hello\n");
    let none = jail(examples::CRACK, format!("{hash} abcdefghijklmnopqrstuvwxyz 5 0 1000").as_bytes(), &limits()).await;
    assert_eq!(none.output, b"none\n");
    let bad = jail(examples::CRACK, b"nonsense", &limits()).await;
    assert_eq!(bad.ending, Ending::Exited(2));
    assert!(String::from_utf8_lossy(&bad.log).contains("expected"));
}

/// The escape-time formula of `guest/examples/mandelbrot.c`, computed here.
fn mandelbrot_reference(x0: f64, y0: f64, step: f64, w: usize, h: usize, max: i64) -> Vec<u8> {
    let mut out = format!("P5\n{w} {h}\n255\n").into_bytes();
    for j in 0..h {
        let ci = y0 + j as f64 * step;
        for i in 0..w {
            let cr = x0 + i as f64 * step;
            let (mut zr, mut zi, mut k) = (0.0f64, 0.0f64, 0i64);
            while k < max && zr * zr + zi * zi < 4.0 {
                let t = zr * zr - zi * zi + cr;
                zi = 2.0 * zr * zi + ci;
                zr = t;
                k += 1;
            }
            out.push(if k == max { 0 } else { (1 + 254 * k / (k + 24)) as u8 });
        }
    }
    out
}

#[tokio::test]
async fn mandelbrot_in_c_and_in_rust_render_the_true_image() {
    // Numbers that parse exactly, so the reference needs no parser of its own.
    let input = b"-2.5 -1.25 0.0625 64 40 400";
    let expected = mandelbrot_reference(-2.5, -1.25, 0.0625, 64, 40, 400);
    assert!(expected[11..].contains(&0) && expected[11..].iter().any(|&v| v > 100), "the tile holds both the set and its edge");
    for (language, elf) in [("C", examples::MANDELBROT), ("Rust", examples::RUST_MANDELBROT)] {
        let r = jail(elf, input, &limits()).await;
        assert_eq!(r.ending, Ending::Exited(0), "{language}: {}", String::from_utf8_lossy(&r.log));
        assert!(r.output == expected, "{language} mandelbrot differs from the reference");
    }
    // The same numbers in a form whose parse rounds: C and Rust still agree to the byte.
    let input = b"-0.7453 0.1127 0.0000013 96 64 3000";
    let c = jail(examples::MANDELBROT, input, &limits()).await;
    let rust = jail(examples::RUST_MANDELBROT, input, &limits()).await;
    assert_eq!(c.ending, Ending::Exited(0));
    assert!(c.output == rust.output, "C and Rust mandelbrot disagree");
    let bad = jail(examples::RUST_MANDELBROT, b"1 2 three", &limits()).await;
    assert_eq!(bad.ending, Ending::Exited(2));
    assert_eq!(bad.log, b"mandelbrot: expected six numbers: X0 Y0 STEP WIDTH HEIGHT MAXITER\n");
}

/// What a buyer does with the Rust SDK: `cargo build` in `guest/rust`, using
/// its `.cargo/config.toml`, gives a program the jail runs.
#[tokio::test]
async fn the_rust_sdk_builds_with_cargo() {
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/rust");
    let target = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO"))
        .current_dir(&sdk)
        .args(["build", "--offline", "--release", "--example", "mandelbrot", "--target-dir"])
        .arg(target.path())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let elf = std::fs::read(target.path().join("x86_64-unknown-linux-gnu/release/examples/mandelbrot")).unwrap();
    let input = b"-2.0 -1.2 0.01 120 80 300";
    let built = jail(&elf, input, &limits()).await;
    assert_eq!(built.ending, Ending::Exited(0), "{}", String::from_utf8_lossy(&built.log));
    assert!(built.output == jail(examples::MANDELBROT, input, &limits()).await.output);
}

/// The program headers of an ELF: (offset of each header, its type).
fn phdrs(elf: &[u8]) -> Vec<(usize, u32)> {
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    (0..u16_at(56)).map(|i| phoff + i * 56).map(|at| (at, u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()))).collect()
}

fn put_u64(elf: &mut [u8], at: usize, v: u64) {
    elf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(elf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(elf[at..at + 8].try_into().unwrap())
}

#[tokio::test]
async fn hostile_elf_files_are_refused_or_contained_with_a_precise_report() {
    const PT_LOAD: u32 = 1;
    let bad = |why: &str| format!("not a program the jail can run: {why}");
    let base = g::HELLO.to_vec();
    let loads: Vec<usize> = phdrs(&base).into_iter().filter(|(_, t)| *t == PT_LOAD).map(|(at, _)| at).collect();
    assert!(loads.len() >= 2, "the test program has a code and a data segment");
    let first = loads[0];

    // Truncated: the ELF header cut short, and program headers past the end of the file.
    assert_eq!(report(&base[..40], &limits()).await, bad("not a 64-bit little-endian ELF file"));
    let mut e = base.clone();
    put_u64(&mut e, 32, (base.len() + 4096) as u64);
    assert_eq!(report(&e, &limits()).await, bad("malformed program headers"));
    let cut = phdrs(&base).last().unwrap().0 + 20;
    assert_eq!(report(&base[..cut], &limits()).await, bad("malformed program headers"));
    // No program headers at all, or a count the loader does not take.
    let mut e = base.clone();
    e[56..58].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(report(&e, &limits()).await, bad("malformed program headers"));
    let mut e = base.clone();
    e[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
    assert_eq!(report(&e, &limits()).await, bad("malformed program headers"));
    // Sizes: a file part larger than the segment, a segment wrapping the address space,
    // one above the program's addresses, one larger than the slot's RAM.
    let mut e = base.clone();
    let memsz = get_u64(&e, first + 40);
    put_u64(&mut e, first + 32, memsz + 1);
    assert_eq!(report(&e, &limits()).await, bad("malformed program headers"));
    let mut e = base.clone();
    put_u64(&mut e, first + 40, u64::MAX - 0x1000);
    assert_eq!(report(&e, &limits()).await, bad("malformed program headers"));
    let mut e = base.clone();
    put_u64(&mut e, first + 40, 0x7e00_0000_0000);
    assert_eq!(report(&e, &limits()).await, bad("a segment lies outside the addresses a program may use"));
    let mut e = base.clone();
    put_u64(&mut e, first + 16, 0x1000);
    assert_eq!(report(&e, &limits()).await, bad("a segment lies outside the addresses a program may use"), "below 64 KiB");
    let mut e = base.clone();
    put_u64(&mut e, first + 40, 1 << 46);
    // (Every header is checked before anything is mapped: a first segment that large covers the next.)
    assert_eq!(report(&e, &limits()).await, bad("overlapping segments"));
    let mut e = base.clone();
    let last = *loads.last().unwrap();
    put_u64(&mut e, last + 40, 1 << 30);
    let r = report(&e, &limits()).await;
    assert!(r.starts_with("killed: address-space limit (the program needs 10") && r.ends_with("MiB, the slot offers 256 MiB)"), "{r}");
    // Overlapping segments: the first three pages long, the second loaded a page into it.
    let mut e = base.clone();
    let (vaddr, memsz) = (get_u64(&e, first + 16), get_u64(&e, first + 40));
    put_u64(&mut e, first + 40, memsz.max(0x3000));
    put_u64(&mut e, loads[1] + 16, (vaddr & !0xfff) + 0x1000);
    assert_eq!(report(&e, &limits()).await, bad("overlapping segments"));
    // An entry point outside every segment: contained as the fault it is.
    let mut e = base.clone();
    put_u64(&mut e, 24, 0x7000_0000);
    assert_eq!(report(&e, &limits()).await, "killed: segmentation fault at 0x70000000 (instruction 0x70000000)");
    // And the jail carries on with an honest program.
    assert_eq!(jail(g::HELLO, b"still here", &limits()).await.output, b"STILL HERE");
}
