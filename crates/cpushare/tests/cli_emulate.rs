//! `cpushare run --local --emulate`: an unmodified static program behaves as
//! if run here.

use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cpushare");

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
    // A program the jail cannot run is refused with the reason.
    let out = cpushare(&["/bin/ls"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dynamically linked (link it statically)"), "{}", String::from_utf8_lossy(&out.stderr));
    let many: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    let mut args = vec!["/usr/bin/busybox", "--", "echo"];
    args.extend(many.iter().map(|s| s.as_str()));
    let out = cpushare(&args, b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 256 arguments"), "{}", String::from_utf8_lossy(&out.stderr));
    // Bad flags get a clear error.
    let out = cpushare(&["--mount", "relative:/x", "/usr/bin/busybox", "--", "true"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"), "{}", String::from_utf8_lossy(&out.stderr));
}
