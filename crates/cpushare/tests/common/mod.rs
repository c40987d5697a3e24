//! What the CLI tests share: running `cpushare` as a user would, and a live
//! exchange process.
#![allow(dead_code)] // each test file uses its own part

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
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let operator = tmp.join("operator");
    let data = tmp.join("data");
    let listen = format!("127.0.0.1:{port}");
    let init = json(&operator, &["exchange", "init", "--data", data.to_str().unwrap(), "--name", "127.0.0.1", "--listen", &listen]);
    assert_eq!(init["CA fingerprint"].as_str().unwrap().len(), 95);
    fails(&operator, &["exchange", "init", "--data", data.to_str().unwrap()], "already holds an exchange");
    let child = Command::new(BIN).args(["exchange", "run", "--data"]).arg(&data).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while run(&operator, &["exchange", "audit"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "the exchange did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (running, operator)
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
