//! What the CLI tests share: running `cpushare` as a user would, and a live
//! exchange process.
#![allow(dead_code)] // each test file uses its own part

pub mod lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cpushare");

pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN).arg("--config").arg(config).args(args).output().unwrap()
}

pub fn ok(config: &Path, args: &[&str]) -> String {
    let out = run(config, args);
    assert!(out.status.success(), "cpushare {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn fails(config: &Path, args: &[&str], expect: &str) {
    let out = run(config, args);
    assert!(!out.status.success(), "cpushare {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(expect), "cpushare {args:?}: expected {expect:?} in {err}");
}

pub fn json(config: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(config, &all)).unwrap()
}

/// An exchange initialised and running; returns it with the operator's config dir.
pub fn exchange(tmp: &Path) -> (Running, PathBuf) {
    exchange_on(tmp, "127.0.0.1")
}

/// [`exchange`], listening on `address` (of this host) and named by it.
pub fn exchange_on(tmp: &Path, address: &str) -> (Running, PathBuf) {
    let port = std::net::TcpListener::bind((address, 0)).unwrap().local_addr().unwrap().port();
    let operator = tmp.join("operator");
    let data = tmp.join("data");
    let listen = format!("{address}:{port}");
    let init = json(&operator, &["exchange", "init", "--data", data.to_str().unwrap(), "--name", address, "--listen", &listen]);
    assert_eq!(init["CA fingerprint"].as_str().unwrap().len(), 95);
    fails(&operator, &["exchange", "init", "--data", data.to_str().unwrap()], "already holds an exchange");
    let child = Command::new(BIN).args(["exchange", "run", "--web", "127.0.0.1:0", "--data"]).arg(&data).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let running = Running(child);
    wait_for_exchange(&operator);
    (running, operator)
}

/// The exchange on `data` again (as after a kill), without its dashboard.
pub fn exchange_again(data: &Path) -> Running {
    Running(Command::new(BIN).args(["exchange", "run", "--no-web", "--data"]).arg(data).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// Waits (at most 30 s) until the exchange answers `operator`'s audit.
pub fn wait_for_exchange(operator: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while run(operator, &["exchange", "audit"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "the exchange did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets the heartbeat timeout of the exchange on `data` (taken at its next start).
pub fn set_heartbeat_timeout(data: &Path, secs: u64) {
    let settings = data.join("exchange.json");
    let mut s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
    s["heartbeat_timeout_secs"] = secs.into();
    std::fs::write(&settings, s.to_string()).unwrap();
}

/// A livecd payload that is a clock: a tick a second, each saying whether
/// the buyer (10.77.0.1) answered a ping across the cluster's network.
pub const TICKING: &str = "#!/bin/sh\ni=0\nwhile true; do if ping -c 1 -W 1 10.77.0.1 >/dev/null 2>&1; then p=ok; else p=lost; fi; echo \"tick $i ping $p\"; i=$((i+1)); sleep 1; done\n";

/// The ticks in a [`TICKING`] node's console: each one's number, and whether its ping was answered.
pub fn ticks(console: &str) -> Vec<(u64, bool)> {
    console
        .lines()
        .filter_map(|l| {
            let (n, ping) = l.trim().strip_prefix("tick ")?.split_once(" ping ")?;
            Some((n.parse().ok()?, ping == "ok"))
        })
        .collect()
}


/// A member account created by the operator and enrolled in `dir`; returns its account id.
pub fn member(operator: &Path, name: &str, dir: &Path) -> String {
    let created = json(operator, &["account", "create", name]);
    let url = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(operator.join("node.json")).unwrap()).unwrap()["exchange"]
        .as_str()
        .unwrap()
        .to_string();
    json(dir, &["enroll", "--exchange", &url, "--token", created["token"].as_str().unwrap()]);
    created["account"].as_u64().unwrap().to_string()
}

/// `cpushare sell` for `seller` with `cpus` slots at 36,000 cents per CPU-hour
/// (10 cents a second: a short job costs whole cents), its cache in `cache`
/// when given; returns once its slots are on the book.
pub fn selling(seller: &Path, cpus: u32, cache: Option<&Path>) -> Running {
    let mut command = Command::new(BIN);
    command.arg("--config").arg(seller).args(["sell", "--cpus", &cpus.to_string(), "--price", "36000", "--ram-per-slot", "256"]);
    if let Some(cache) = cache {
        command.env("XDG_CACHE_HOME", cache);
    }
    let running = Running(command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_for_slots(seller, cpus);
    running
}

/// Waits (at most a minute) until `seller`'s `cpus` slots are on the book.
pub fn wait_for_slots(seller: &Path, cpus: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while json(seller, &["sell", "--status"])["slots"] != cpus {
        assert!(Instant::now() < deadline, "the slots of {} never reached the book", seller.display());
        std::thread::sleep(Duration::from_millis(200));
    }
}

