//! The example gateway, run as a user would: `--help` lists its flags, and with no
//! ledger to reach it says so (and keeps trying) instead of exiting or hanging
//! silently. The binary is the one `cargo test` builds beside this test.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the example (as a plain binary: `cargo test` builds examples only as
/// test harnesses) with the cargo running this test, and returns its path.
fn gateway() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "-q", "-p", "ration-client", "--example", "gateway"])
                .args(["--message-format", "json"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            // The built executable, from cargo's own report of it.
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.contains("\"executable\"") && l.contains("\"gateway\""))
                .unwrap_or_else(|| panic!("cargo did not report the example: {text}"));
            let at = line.find("\"executable\":\"").unwrap() + "\"executable\":\"".len();
            PathBuf::from(&line[at..at + line[at..].find('"').unwrap()])
        })
        .clone()
}

#[test]
fn help_lists_the_flags() {
    let out = Command::new(gateway()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--endpoints", "--listen", "RATION_ENDPOINTS"] {
        assert!(text.contains(flag), "--help does not mention {flag}:\n{text}");
    }
}

#[test]
fn an_unreachable_ledger_is_logged() {
    // Two endpoints nobody listens on.
    let dead: Vec<String> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
        })
        .collect();
    let mut child = Command::new(gateway())
        .args(["--endpoints", &dead.join(","), "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    assert!(child.try_wait().unwrap().is_none(), "the gateway exited instead of retrying");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(
        text.contains("cannot reach the ledger at")
            && text.contains(&dead[0])
            && text.contains(&dead[1]),
        "nothing said within {:?}:\n{text}",
        started.elapsed()
    );
}
