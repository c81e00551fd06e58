//! The real `rationctl` binary: exit codes, error messages, environment variables.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn rationctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rationctl"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A loopback port nothing listens on.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

#[test]
fn failures_exit_non_zero_with_one_clear_line() {
    let dead = dead_endpoint();
    let out = rationctl(&["--endpoints", &dead, "--timeout-ms", "500", "member", "list"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: no endpoint answered") && err.contains(&dead), "{err}");
    assert!(out.stdout.is_empty());

    // The endpoints come from RATIONCTL_ENDPOINTS too.
    let out = rationctl(
        &["endpoint", "health"],
        &[("RATIONCTL_ENDPOINTS", &dead), ("RATIONCTL_TIMEOUT_MS", "500")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("unhealthy: {dead}")), "{err}");
    // ... and RATIONCTL_OUTPUT selects JSON: the health rows are still printed.
    let out = rationctl(
        &["endpoint", "health"],
        &[
            ("RATIONCTL_ENDPOINTS", &dead),
            ("RATIONCTL_OUTPUT", "json"),
            ("RATIONCTL_TIMEOUT_MS", "500"),
        ],
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["healthy"], false);
    assert_eq!(rows[0]["endpoint"], dead.as_str());

    // Bad input is refused before anything is sent.
    let out =
        rationctl(&["--endpoints", &dead, "budget", "set", "acme", "--limit", "tokens=10"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("bad limit \"tokens=10\""), "{err}");
    let out = rationctl(&["snapshot", "status", "/nonexistent/file.snap"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("cannot read /nonexistent/file.snap"));

    // A command line clap refuses exits 2 with usage.
    let out = rationctl(&["budget", "frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = rationctl(&["--output", "yaml", "member", "list"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("yaml"));
    let out = rationctl(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for noun in ["member", "endpoint", "leader", "snapshot", "budget", "audit"] {
        assert!(help.contains(noun), "{help}");
    }
}
