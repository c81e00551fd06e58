//! README.md's walkthrough "Give 2,000 employees 100k tokens per minute and 50 USD
//! per month, and stop runaway agents", run as written against a real `rationd`:
//! the shell block is read from the README itself. Three things are swapped, none
//! of them a command: the `rationctl` alias runs this build's rationctl instead of
//! `cargo run --release`, the example gateway (built here, as the README's `cargo
//! run` would) listens on a free port instead of 8080 and starts in the background,
//! and both find the node through `RATIONCTL_ENDPOINTS` / `RATION_ENDPOINTS`. Then
//! what the README says each command shows is checked.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ration_testkit::process::{free_addrs, initial_cluster, Proc};

/// Builds a binary target (`--bin NAME` or `--example NAME`) of `package` with the
/// cargo running this test, and returns its path from cargo's report.
fn build(package: &str, kind: &str, name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "-q", "-p", package, kind, name, "--message-format", "json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = format!("\"name\":\"{name}\"");
    let line = text
        .lines()
        .find(|l| l.contains("\"executable\":\"") && l.contains(&tag))
        .unwrap_or_else(|| panic!("cargo did not report {name}: {text}"));
    let at = line.find("\"executable\":\"").unwrap() + "\"executable\":\"".len();
    PathBuf::from(&line[at..at + line[at..].find('"').unwrap()])
}

/// The first ```sh block after `heading`, with continuation lines joined.
fn shell_block(readme: &str, heading: &str) -> Vec<String> {
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("no {heading:?}"));
    let start = section.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let end = section[start..].find("```").expect("the block ends") + start;
    section[start..end].replace("\\\n", " ").lines().map(str::to_owned).collect()
}

/// Kills the gateway however the test ends.
struct Gateway(PathBuf);

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

/// Runs the ```sh block of README section `heading` against a fresh node, with the
/// substitutions the module's doc lists, and returns its stdout (after checking
/// it succeeded).
async fn walkthrough(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let block = shell_block(&readme, heading);
    let rationctl = build("rationctl", "--bin", "rationctl");
    let gateway = build("ration-client", "--example", "gateway");
    let addrs = free_addrs(2);
    let (node, http) = (addrs[0], addrs[1]);
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Proc::new(
        env!("CARGO_BIN_EXE_rationd"),
        1,
        node,
        dir.path().join("node"),
        initial_cluster(&[node]),
    );
    proc.spawn();

    let mut script = vec!["set -euo pipefail".to_owned()];
    let mut started_gateway = false;
    for line in &block {
        if line.trim_start().starts_with("alias rationctl=") {
            script.push(format!("rationctl() {{ {} \"$@\"; }}", rationctl.display()));
        } else if let Some(rest) = line.split("--example gateway --").nth(1) {
            let args = rest.split('#').next().unwrap().trim();
            script.push(format!(
                "{} {args} --listen {http} >gateway.log 2>&1 & echo $! >gateway.pid",
                gateway.display()
            ));
            script.push(format!(
                "until curl -sf {http}/stats >/dev/null; do sleep 0.1; done # gateway up"
            ));
            started_gateway = true;
        } else {
            script.push(line.replace("localhost:8080", &http.to_string()));
        }
    }
    assert!(started_gateway, "the block starts no example gateway: {block:?}");
    let _gateway = Gateway(dir.path().join("gateway.pid"));
    // The node answers before the block runs (as "with a node running" says).
    let deadline = Instant::now() + Duration::from_secs(30);
    while ration_testkit::status_within(node, false, Duration::from_secs(1)).await.is_none() {
        assert!(Instant::now() < deadline, "the node never answered:\n{}", proc.log_tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let script = script.join("\n");
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || {
            Command::new("timeout")
                .args(["300", "bash", "-c", &script])
                .current_dir(dir)
                .env("RATIONCTL_ENDPOINTS", node.to_string())
                .env("RATION_ENDPOINTS", node.to_string())
                .env("RATION_LOG", "warn")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let gateway_log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "the walkthrough failed ({}):\n{stdout}\n{stderr}\ngateway:\n{gateway_log}",
        out.status
    );
    drop(proc);
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs_as_written() {
    let stdout =
        walkthrough("## Give 2,000 employees 100k tokens per minute and 50 USD per month").await;

    // What the README says each step shows.
    let has = |s: &str| assert!(stdout.contains(s), "no {s:?} in:\n{stdout}");
    has("template on acme/users: tokens=100000/minute usd_micros=50000000/month each");
    has("runaway guard: calls=20/1m");
    // Alice's first call was admitted and made her budget.
    let alice = stdout.find("acme/users/alice").expect("alice's budget is shown");
    assert!(stdout[..alice].contains("{\"admitted\":1,"), "alice's first call:\n{stdout}");
    has("made by its parent's template");
    // The run loop: 20 calls admitted, then refused; the run halted.
    let run: Vec<&str> = stdout.lines().filter(|l| l.contains("\"wanted\":200")).collect();
    let admitted = stdout.matches("{\"admitted\":1,").count();
    assert_eq!(admitted, 21, "alice's call and 20 of the run's 40:\n{stdout}");
    assert_eq!(run.len(), 20, "the other 20 run calls were refused:\n{stdout}");
    has("acme/agents/r-7 (frozen)");
    has("grants nothing: halted by its runaway guard: spent 20 calls");
    has("run_halted  acme/agents/r-7");
    has("budget acme/agents/r-7: unfrozen");
    has("budget acme/users: frozen");
    has("live leases still hold");
    has("budget acme/users: unfrozen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_money_walkthrough_runs_as_written() {
    let stdout =
        walkthrough("## Price calls in dollars, warn before a cap, and trace every call").await;
    let has = |s: &str| assert!(stdout.contains(s), "no {s:?} in:\n{stdout}");
    has("gpt-x: version 1 in force from");
    // The first calls were admitted, charged at version 1: 1,000 prompt tokens at
    // $2.50 a million is 2,500 usd_micros, plus the completion at $10 a million.
    let priced: Vec<&str> = stdout.lines().filter(|l| l.contains("\"price_version\":1")).collect();
    assert!(priced.len() >= 3, "calls charged at version 1:\n{stdout}");
    for l in &priced {
        let charged: u64 = field(l, "charged");
        let cost: u64 = field(l, "cost_usd_micros");
        assert_eq!(cost, 2_500 + (charged - 1_000) * 10, "{l}");
    }
    // Refused once team's day cap was reached (shadow mode on team/new-app refuses nothing).
    assert!(stdout.contains("{\"admitted\":0,"), "the team's cap refused some:\n{stdout}");
    has("gpt-x: version 2 in force from");
    has("superseded");
    // The traced call.
    has("call req-3: gpt-x v1 1000+0+");
    has("50% reached");
    has("80% reached");
    has("shadow: granted ");
    has("shadow mode: its caps refuse nothing (");
    has("REACHES CAP");
}

/// A number field of a flat JSON object line.
fn field(line: &str, name: &str) -> u64 {
    let at = line.find(&format!("\"{name}\":")).unwrap_or_else(|| panic!("no {name} in {line}"));
    let rest = &line[at + name.len() + 3..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().unwrap()
}
