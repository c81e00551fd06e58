//! The real `ration-load` binary against a node on loopback (`--endpoints`).
//!
//! Run again against the same cluster (issue #18 point 7): the ledger remembers
//! each client's recent requests (exactly-once), so a run that reused the client
//! and request ids of the run before had its operations refused as reused request
//! ids. Each run now writes under client ids of its own, and a run that does meet
//! refusals says why. Three runs: two plain ones, each without an error; then one
//! that reuses the second's client ids (`--client-id-base`), the old behaviour,
//! which must count its refusals and print their reason.
//!
//! `--floor`: health checks, one per RPC, counted like operations.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use ration_testkit::inproc::Cluster;

struct Run {
    stdout: String,
    ops: u64,
    errors: u64,
    client_ids: String,
}

/// Batches of 8 operations, 4 in flight, for 2 s, with `extra` flags.
async fn load(endpoint: String, extra: &[&str]) -> Run {
    let mut args = vec!["--batch", "8", "--budgets", "4"];
    args.extend(extra);
    run(endpoint, &args).await
}

async fn run(endpoint: String, extra: &[&str]) -> Run {
    let mut args: Vec<String> = [
        "--endpoints",
        endpoint.as_str(),
        "--concurrency",
        "4",
        "--connections",
        "1",
        "--warmup-s",
        "0",
        "--duration-s",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ration-load")).args(&args).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ration-load failed: {}\n{stdout}\n{stderr}", out.status);
    // "N ops in T s: R ops/s; latency ...; E errors"
    let summary = stdout
        .lines()
        .find(|l| l.contains(" ops in ") && l.ends_with(" errors"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    let ops = summary.split(' ').next().unwrap().parse().unwrap();
    let errors = summary.rsplit(' ').nth(1).unwrap().parse().unwrap();
    // "client ids: BASE-*"
    let client_ids = stdout
        .lines()
        .find_map(|l| l.strip_prefix("client ids: "))
        .and_then(|l| l.strip_suffix("-*"))
        .unwrap_or_else(|| panic!("no client ids line in:\n{stdout}"))
        .to_owned();
    Run { stdout, ops, errors, client_ids }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_against_the_same_cluster_is_not_refused_and_refusals_say_why() {
    let cluster = Cluster::start(1, |_| {}).await;
    let endpoint = cluster.addrs[&cluster.leader().await].to_string();

    let first = load(endpoint.clone(), &[]).await;
    assert!(first.ops > 0, "the first run did nothing:\n{}", first.stdout);
    assert_eq!(first.errors, 0, "the first run failed operations:\n{}", first.stdout);

    let second = load(endpoint.clone(), &[]).await;
    assert_ne!(second.client_ids, first.client_ids, "each run writes under client ids of its own");
    assert!(second.ops > 0, "the second run did nothing:\n{}", second.stdout);
    assert_eq!(second.errors, 0, "the second run was refused:\n{}", second.stdout);

    // The second run's ids again: what every run did before. Its requests reuse ids
    // the ledger remembers, with other contents, so they are refused, and the
    // summary says why.
    let reused = load(endpoint, &["--client-id-base", &second.client_ids]).await;
    assert!(reused.errors > 0, "reused client ids were not refused:\n{}", reused.stdout);
    let reasons: Vec<&str> = reused.stdout.lines().filter(|l| l.contains(" failed: ")).collect();
    assert!(!reasons.is_empty(), "refusals without a reason:\n{}", reused.stdout);
    assert!(
        reasons.iter().any(|l| l.to_lowercase().contains("request")),
        "the reason does not name the reused request id:\n{}",
        reused.stdout
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_counts_health_checks_as_operations() {
    let cluster = Cluster::start(1, |_| {}).await;
    let endpoint = cluster.addrs[&cluster.leader().await].to_string();
    let floor = run(endpoint.clone(), &["--floor"]).await;
    assert!(floor.ops > 0, "no health check was counted:\n{}", floor.stdout);
    assert_eq!(floor.errors, 0, "health checks failed:\n{}", floor.stdout);
    assert!(floor.stdout.contains("per health check"), "{}", floor.stdout);
    // Not with the flags that choose other operations.
    let refused = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ration-load"))
            .args(["--endpoints", &endpoint, "--floor", "--batch", "8"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--floor"));
    cluster.shutdown().await;
}
