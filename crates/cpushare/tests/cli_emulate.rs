//! `cpushare run --emulate`: an unmodified static program behaves as if run
//! here, on this machine (`--local`) or on a seller through the exchange.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use sha2::{Digest, Sha256};

#[test]
fn an_unmodified_program_streams_stdin_to_stdout_and_returns_its_exit_status() {
    if !std::path::Path::new("/usr/bin/busybox").exists() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "busybox-static is needed under CI");
        eprintln!("skipped: no /usr/bin/busybox (scripts/test installs busybox-static)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("names.txt"), "carol\nalice\nbob\n").unwrap();
    let cpushare = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new(BIN)
            .args(["run", "--local", "--emulate"])
            .args(args)
            .current_dir(dir.path())
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    // A file in the current directory (mounted by default, at its own path).
    let out = cpushare(&["/usr/bin/busybox", "--", "sort", "names.txt"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"alice\nbob\ncarol\n");
    // stdin in, stdout out, and a copy in --log.
    let out = cpushare(&["--log", "log.txt", "/usr/bin/busybox", "--", "wc", "-w"], b"one two three\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    assert_eq!(std::fs::read_to_string(dir.path().join("log.txt")).unwrap().trim(), "3");
    // The exit status is the program's.
    assert_eq!(cpushare(&["/usr/bin/busybox", "--", "false"], b"").status.code(), Some(1));
    // Outside its mounts nothing exists.
    let out = cpushare(&["--mount", &format!("{}:/data:ro", dir.path().display()), "/usr/bin/busybox", "--", "cat", "/etc/hostname"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file or directory"));
    // Read-only means read-only.
    let out = cpushare(&["--mount", &format!("{}:/data:ro", dir.path().display()), "/usr/bin/busybox", "--", "touch", "/data/new"], b"");
    assert_ne!(out.status.code(), Some(0));
    assert!(!dir.path().join("new").exists());
    // A program the jail cannot run is refused with the reason, before any jail starts.
    let out = cpushare(&["/bin/ls"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/bin/ls is not a program the jail can run: dynamically linked (link it statically)"), "{}", String::from_utf8_lossy(&out.stderr));
    let many: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    let mut args = vec!["/usr/bin/busybox", "--", "echo"];
    args.extend(many.iter().map(|s| s.as_str()));
    let out = cpushare(&args, b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 256 arguments"), "{}", String::from_utf8_lossy(&out.stderr));
    // Bad flags get a clear error.
    let out = cpushare(&["--mount", "relative:/x", "/usr/bin/busybox", "--", "true"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"), "{}", String::from_utf8_lossy(&out.stderr));
    // Without --inputs, `cpushare run PROGRAM -- ARGS` is this same unmodified run.
    let plain = Command::new(BIN).args(["run", "--local", "/usr/bin/busybox", "--", "echo", "plain"]).current_dir(dir.path()).output().unwrap();
    assert_eq!((plain.status.code(), plain.stdout.as_slice()), (Some(0), &b"plain\n"[..]), "{}", String::from_utf8_lossy(&plain.stderr));
    let stream = Command::new(BIN).args(["run", "--local", "--stream", "/usr/bin/busybox"]).current_dir(dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&stream.stderr).contains("--stream and --replicas are for fragments"), "{}", String::from_utf8_lossy(&stream.stderr));
}

/// `cpushare --config CONFIG run --emulate ARGS` in `dir`, fed `stdin`.
fn emulate_on(config: &Path, dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["run", "--emulate", "--max-price", "40000"])
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // Fed from a thread: the program may answer before it has read it all.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_unmodified_program_runs_on_a_seller_as_if_here() {
    if !Path::new("/usr/bin/busybox").exists() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "busybox-static is needed under CI");
        eprintln!("skipped: no /usr/bin/busybox (scripts/test installs busybox-static)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_exchange, operator) = exchange(tmp.path());
    let (seller, buyer) = (tmp.path().join("seller"), tmp.path().join("buyer"));
    member(&operator, "seller", &seller);
    let buyer_account = member(&operator, "buyer", &buyer);
    ok(&operator, &["deposit", &buyer_account, "1000"]);
    let seller_cache = tmp.path().join("seller-cache");
    let _selling = selling(&seller, 1, Some(&seller_cache));

    // The buyer's working directory: mounted by default, read-write, at its own path.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("sub")).unwrap();
    std::fs::write(work.join("names.txt"), "carol\nalice\nbob\n").unwrap();
    std::fs::write(work.join("old.txt"), "to be removed\n").unwrap();
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(work.join("big.bin"), &big).unwrap();
    let big_sha: String = Sha256::digest(&big).iter().map(|b| format!("{b:02x}")).collect();
    let bb = "/usr/bin/busybox";

    let out = emulate_on(&buyer, &work, &["--log", "log.txt", bb, "--", "sort", "names.txt"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "alice\nbob\ncarol\n");
    assert_eq!(std::fs::read_to_string(work.join("log.txt")).unwrap(), "alice\nbob\ncarol\n");

    // A file of several relay chunks, read on demand.
    let out = emulate_on(&buyer, &work, &[bb, "--", "sha256sum", "big.bin"], b"");
    assert_eq!(text(&out.stdout), format!("{big_sha}  big.bin\n"), "{}", text(&out.stderr));

    // Stdin much larger than the seller's window streams through; stdout and the exit status come back.
    let out = emulate_on(&buyer, &work, &[bb, "--", "sha256sum"], &big);
    assert_eq!(text(&out.stdout), format!("{big_sha}  -\n"), "{}", text(&out.stderr));
    let out = emulate_on(&buyer, &work, &[bb, "--", "sh", "-c", "exit 3"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = emulate_on(&buyer, &work, &[bb, "--", "cat", "/etc/hostname"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("No such file or directory"), "{}", text(&out.stderr));

    // What it writes, makes and removes comes back.
    let out = emulate_on(&buyer, &work, &[bb, "--", "cp", "names.txt", "sub/copy.txt"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(work.join("sub/copy.txt")).unwrap(), "carol\nalice\nbob\n");
    emulate_on(&buyer, &work, &[bb, "--", "mkdir", "-p", "made/deeper"], b"");
    emulate_on(&buyer, &work, &[bb, "--", "rm", "old.txt"], b"");
    emulate_on(&buyer, &work, &[bb, "--", "gzip", "-k", "big.bin"], b"");
    assert!(work.join("made/deeper").is_dir() && !work.join("old.txt").exists());
    let out = Command::new(bb).args(["gzip", "-dc", "big.bin.gz"]).current_dir(&work).output().unwrap();
    assert!(out.stdout == big, "the compressed copy written on the seller decompresses to the original here");

    // A read-only mount crosses once: the seller keeps it for this buyer.
    let ro = format!("{}:/in:ro", work.display());
    let cached = || std::fs::read_dir(seller_cache.join("cpushare/files")).map_or(0, |d| d.count());
    let before = cached();
    let out = emulate_on(&buyer, &work, &["--mount", &ro, bb, "--", "sha256sum", "/in/big.bin"], b"");
    assert_eq!(text(&out.stdout), format!("{big_sha}  /in/big.bin\n"), "{}", text(&out.stderr));
    assert_eq!(cached(), before + 1, "the seller cached the read-only file");
    let out = emulate_on(&buyer, &work, &["--mount", &ro, bb, "--", "touch", "/in/new"], b"");
    assert_ne!(out.status.code(), Some(0));
    assert!(!work.join("new").exists());
    // The seller keeps no copy of a run's files once it is over.
    let runs = std::fs::read_dir(seller_cache.join("cpushare/work")).unwrap().count();
    assert_eq!(runs, 0, "the seller's work directory is emptied after each run");

    // The buyer paid for what ran, no more: its orders are gone, the ledger balances.
    let orders = json(&buyer, &["orders"]);
    assert!(orders.as_array().unwrap().is_empty(), "{orders}");
    assert_eq!(json(&buyer, &["balance"])["escrow (EUR)"], "0.00");
    assert_eq!(json(&operator, &["exchange", "audit"])["ok"], true);
}
