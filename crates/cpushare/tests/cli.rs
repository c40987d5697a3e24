//! The `cpushare` binary as a user runs it.

use std::process::Command;

fn cpushare(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cpushare")).args(args).output().expect("run cpushare");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn sim_prints_hours_and_totals_and_is_deterministic() {
    let args = ["sim", "--sellers", "300", "--buyers", "40", "--days", "0.25", "--check"];
    let (ok, out, err) = cpushare(&args);
    assert!(ok, "{err}");
    let hours = out.lines().filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit())).count();
    assert_eq!(hours, 6, "{out}");
    let trades: u64 = out.lines().find_map(|l| l.strip_prefix("trades")).unwrap().trim().parse().unwrap();
    assert!(trades > 0);
    assert!(out.contains("peak memory"));
    // Same seed, same market (wall time and memory aside).
    let (_, again, _) = cpushare(&args);
    let stable = |s: &str| s.lines().filter(|l| !l.starts_with("wall") && !l.starts_with("peak memory")).collect::<Vec<_>>().join("\n");
    assert_eq!(stable(&out), stable(&again));
}

#[test]
fn bad_flags_get_a_clear_error() {
    for (args, expect) in [
        (vec!["sim", "--days", "0"], "--days must be more than 0"),
        (vec!["sim", "--sellers", "0"], "at least one seller"),
        (vec!["sim", "--fee-bps", "20000"], "--fee-bps is at most 10000"),
        (vec!["sim", "--sellers", "lots"], "invalid value 'lots'"),
        (vec!["sell-everything"], "unrecognized subcommand"),
    ] {
        let (ok, _, err) = cpushare(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

#[test]
fn help_explains_the_commands() {
    let (ok, out, _) = cpushare(&["--help"]);
    assert!(ok);
    assert!(out.contains("sim"));
    let (ok, out, _) = cpushare(&["sim", "--help"]);
    assert!(ok);
    for flag in ["--sellers", "--buyers", "--days", "--seed", "--check"] {
        assert!(out.contains(flag), "sim --help lacks {flag}");
    }
}
