//! The share's NFS server against a real NFSv3 client: libnfs's tools
//! (Debian's libnfs-utils), which speak the protocol from userspace, so the
//! test needs no kernel NFS client and no root.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use cpushare_buyer::share::{ShareServer, ShareSpec};

/// The libnfs tools, or why the test cannot run (a failure under CI).
fn tools() -> Option<()> {
    if Command::new("nfs-cp").output().is_ok() {
        return Some(());
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "nfs-cp (Debian's libnfs-utils) is missing; scripts/test installs it");
    eprintln!("skipping: nfs-cp (libnfs-utils) is not installed");
    None
}

async fn serve(dir: &Path, name: &str) -> u16 {
    let server = ShareServer::new(&[ShareSpec { dir: dir.to_path_buf(), name: name.into() }]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(Arc::clone(&server).accept(listener, |_| true));
    port
}

fn url(port: u16, path: &str) -> String {
    format!("nfs://127.0.0.1{path}?version=3&nfsport={port}&mountport={port}")
}

async fn run(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || Command::new(&args[0]).args(&args[1..]).output().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nfs_client_writes_reads_and_lists_the_share() {
    if tools().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = serve(dir.path(), "data").await;
    let scratch = tempfile::tempdir().unwrap();
    // 8 MiB and a bit, so that reads and writes go in several calls.
    let body: Vec<u8> = (0..(8 << 20) + 12345u32).map(|i| (i * 31 % 251) as u8).collect();
    let local = scratch.path().join("in.bin");
    std::fs::write(&local, &body).unwrap();
    let out = run(&["nfs-cp", local.to_str().unwrap(), &url(port, "/data/results.bin")]).await;
    assert!(out.status.success(), "nfs-cp to the share: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dir.path().join("results.bin")).unwrap(), body, "on the buyer's disk");
    let back = scratch.path().join("back.bin");
    let out = run(&["nfs-cp", &url(port, "/data/results.bin"), back.to_str().unwrap()]).await;
    assert!(out.status.success(), "nfs-cp from the share: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), body);
    std::fs::write(dir.path().join("from-the-buyer.txt"), b"hi").unwrap();
    let out = run(&["nfs-ls", &url(port, "/data")]).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("results.bin") && listing.contains("from-the-buyer.txt"), "{listing}");
    let out = run(&["nfs-cat", &url(port, "/data/from-the-buyer.txt")]).await;
    assert_eq!(out.stdout, b"hi");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_exports_are_mounted() {
    if tools().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = serve(dir.path(), "data").await;
    for path in ["/etc/passwd", "/data/../../etc/passwd", "/other/x"] {
        let out = run(&["nfs-cat", &url(port, path)]).await;
        assert!(!out.status.success() && out.stdout.is_empty(), "{path} was served: {}", String::from_utf8_lossy(&out.stdout));
    }
}
