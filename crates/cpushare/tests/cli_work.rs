//! `cpushare examples`, `run`, `sell` and `demo` as users type them.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The one file in `dir` that says "found ...", and what it says.
fn found(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .filter(|(_, text)| text.starts_with("found"))
        .collect()
}

#[test]
fn examples_run_locally_and_bad_work_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ex = dir.join("ex");
    ok(dir, &["examples", ex.to_str().unwrap()]);
    let p = |s: &str| ex.join(s).to_str().unwrap().to_string();

    let report = json(dir, &["run", "--local", "--cpus", "2", &p("crack"), "--inputs", &p("crack-ranges"), "--outputs", &p("crack-out")]);
    assert_eq!(report["fragments"], 26);
    assert_eq!(report["succeeded"], 26);
    assert_eq!(found(&ex.join("crack-out")), vec![("range-18".to_string(), "found share\n".to_string())]);

    // A run cut short keeps the outputs it had finished, each whole: they are
    // written as they are settled, not at the end.
    let cut = ex.join("cut-out");
    let mut running = Running(
        Command::new(BIN)
            .arg("--config")
            .arg(dir)
            .args(["run", "--local", "--cpus", "1", &p("crack"), "--inputs", &p("crack-ranges"), "--outputs", cut.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let written = || -> Vec<String> {
        let names = std::fs::read_dir(&cut).into_iter().flatten().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
        names.filter(|n| !n.starts_with('.')).collect()
    };
    let since = std::time::Instant::now();
    while written().is_empty() {
        assert!(since.elapsed() < std::time::Duration::from_secs(60), "no output was written while the run went on");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    running.0.kill().unwrap();
    running.0.wait().unwrap();
    let kept = written();
    assert!(kept.len() < 26, "the run was cut short: {kept:?}");
    for name in &kept {
        assert_eq!(std::fs::read(cut.join(name)).unwrap(), std::fs::read(ex.join("crack-out").join(name)).unwrap(), "{name}");
    }
    // --resume runs only the rest; then there is nothing left to run.
    let resumed = json(dir, &["run", "--local", "--resume", &p("crack"), "--inputs", &p("crack-ranges"), "--outputs", cut.to_str().unwrap()]);
    assert_eq!((resumed["fragments"].as_u64(), resumed["skipped"].as_u64()), (Some(26 - kept.len() as u64), Some(kept.len() as u64)));
    assert_eq!(written().len(), 26);
    for name in written() {
        assert_eq!(std::fs::read(cut.join(&name)).unwrap(), std::fs::read(ex.join("crack-out").join(&name)).unwrap(), "{name}");
    }
    let again = json(dir, &["run", "--local", "--resume", &p("crack"), "--inputs", &p("crack-ranges"), "--outputs", cut.to_str().unwrap()]);
    assert_eq!((again["fragments"].as_u64(), again["skipped"].as_u64()), (Some(0), Some(26)));

    let report = json(dir, &["run", "--local", &p("mandelbrot"), "--inputs", &p("mandelbrot-tiles"), "--outputs", &p("tiles-out")]);
    assert_eq!(report["succeeded"], 24);
    let tile = std::fs::read(ex.join("tiles-out/tile-1-2")).unwrap();
    assert!(tile.starts_with(b"P5\n160 160\n255\n") && tile.len() == 15 + 160 * 160);

    // A fragment that fails leaves NAME.error saying why, and the run fails.
    let bad = dir.join("bad-inputs");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("nonsense"), "not a tile").unwrap();
    std::fs::write(bad.join("good"), "-2 -1 0.5 4 4 10").unwrap();
    fails(dir, &["run", "--local", &p("mandelbrot"), "--inputs", bad.to_str().unwrap(), "--outputs", &p("bad-out")], "1 fragment(s) failed");
    let error = std::fs::read_to_string(ex.join("bad-out/nonsense.error")).unwrap();
    assert!(error.contains("exited with status 2") && error.contains("expected six numbers"), "{error}");
    assert!(ex.join("bad-out/good").exists());
    // Resumed once the input is fixed: only the failed one runs, and its .error goes.
    std::fs::write(bad.join("nonsense"), "-2 -1 0.5 4 4 10").unwrap();
    let resumed = json(dir, &["run", "--local", "--resume", &p("mandelbrot"), "--inputs", bad.to_str().unwrap(), "--outputs", &p("bad-out")]);
    assert_eq!((resumed["fragments"].as_u64(), resumed["succeeded"].as_u64(), resumed["skipped"].as_u64()), (Some(1), Some(1), Some(1)));
    assert!(ex.join("bad-out/nonsense").exists() && !ex.join("bad-out/nonsense.error").exists());

    // Not a program, no inputs, nothing to read.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(dir, &["run", "--local", &p("crack-ranges/range-00"), "--inputs", &p("crack-ranges"), "--outputs", &p("o")], "is not an ELF executable");
    // A program the jail would refuse is refused here, before an order is placed (this one has no exchange at all).
    fails(dir, &["run", "/bin/ls", "--inputs", &p("crack-ranges"), "--outputs", &p("o")], "/bin/ls is not a program the jail can run: dynamically linked (link it statically)");
    // Unmodified programs too, on a seller or here.
    fails(dir, &["run", "--emulate", "/bin/ls"], "/bin/ls is not a program the jail can run: dynamically linked (link it statically)");
    fails(dir, &["run", "--local", "/bin/ls"], "/bin/ls is not a program the jail can run: dynamically linked (link it statically)");
    fails(dir, &["run", "--local", &p("crack"), "--inputs", empty.to_str().unwrap(), "--outputs", &p("o")], "holds no input files");
    fails(dir, &["run", "--local", &p("nothing"), "--inputs", &p("crack-ranges"), "--outputs", &p("o")], "cannot read the program");
}

#[test]
fn a_seller_sells_and_a_buyer_runs_a_job_through_the_exchange() {
    let tmp = tempfile::tempdir().unwrap();
    let (_exchange, operator) = exchange(tmp.path());
    let (seller, buyer) = (tmp.path().join("seller"), tmp.path().join("buyer"));
    member(&operator, "seller", &seller);
    let buyer_account = member(&operator, "buyer", &buyer);
    ok(&operator, &["deposit", &buyer_account, "1000"]);

    let mut selling = selling(&seller, 2, None);

    let ex = tmp.path().join("ex");
    ok(&buyer, &["examples", ex.to_str().unwrap()]);
    let p = |s: &str| ex.join(s).to_str().unwrap().to_string();
    let report = json(
        &buyer,
        &["run", "--cpus", "2", "--max-price", "40000", &p("crack"), "--inputs", &p("crack-ranges"), "--outputs", &p("out")],
    );
    assert_eq!(report["succeeded"], 26, "{report}");
    assert_eq!(found(&ex.join("out")), vec![("range-18".to_string(), "found share\n".to_string())]);
    let cost = report["cost_cents"].as_i64().unwrap();
    assert!(cost > 0, "{report}");

    // The buyer's order is gone, the escrow returned; the seller earned what the buyer paid, less the fee.
    let orders = json(&buyer, &["orders"]);
    assert!(orders.as_array().unwrap().is_empty(), "{orders}");
    let balance = json(&buyer, &["balance"]);
    assert_eq!(balance["escrow (EUR)"], "0.00", "{balance}");
    assert_eq!(cents(&balance["available (EUR)"]), 100_000 - cost, "{balance}");
    let status = json(&seller, &["sell", "--status"]);
    let earned = status["earned_cents"].as_i64().unwrap();
    assert!(earned > 0 && earned <= cost, "{status}");
    assert_eq!(json(&operator, &["exchange", "audit"])["ok"], true);

    // SIGTERM stops the seller cleanly: its slots leave the book.
    nix_term(&selling);
    assert!(selling.0.wait().unwrap().success());
    assert_eq!(json(&seller, &["sell", "--status"])["slots"], 0);
}

/// "999.40" -> 99940.
fn cents(euros: &serde_json::Value) -> i64 {
    let (whole, part) = euros.as_str().unwrap().split_once('.').unwrap();
    whole.parse::<i64>().unwrap() * 100 + part.parse::<i64>().unwrap()
}

fn nix_term(child: &Running) {
    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn the_demo_renders_the_image_reruns_lost_tiles_and_balances_the_books() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("demo-out");
    let report = json(tmp.path(), &["demo", "--out", out_dir.to_str().unwrap(), "--width", "800", "--height", "600"]);
    assert_eq!(report["tiles"], 24, "{report}");
    assert!(report["reruns"].as_u64().unwrap() <= 2, "only the killed seller's tiles in flight (two at most) rerun: {report}");
    assert_eq!(report["ledger_ok"], true);
    let sellers = report["sellers"].as_array().unwrap();
    assert_eq!(sellers.len(), 2, "the killed seller is not in the bill: {report}");
    let tiles: u64 = sellers.iter().map(|s| s[1].as_u64().unwrap()).sum();
    assert!(tiles < 24, "the killed seller rendered some tiles before it vanished: {report}");

    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(out_dir.join("mandelbrot.png")).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (800, 600));
    // Black inside the set (the middle of the main cardioid), coloured outside (a corner).
    let at = |x: usize, y: usize| &pixels[(y * 800 + x) * 3..][..3];
    assert_eq!(at(500, 300), [0, 0, 0]);
    assert_ne!(at(0, 0), [0, 0, 0]);

    fails(tmp.path(), &["demo", "--width", "10"], "the image must be at least");
}
