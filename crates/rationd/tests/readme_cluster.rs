//! README.md's "A 3-node cluster on one machine", run as written: the shell block
//! is read from the README itself (so the test breaks when the README drifts), the
//! `cargo build` line is left out and `./target/release/rationd` is replaced by this
//! build's `rationd`; nothing else changes (ports, flags, data directories). The
//! three nodes must form one cluster: one leader that every node knows, three
//! voters, and a write through any node reaching all of them.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ration_proto::v1;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_testkit::process::free_addrs;
use ration_testkit::{channel, meta, status_within};

/// The first ```sh block after the heading `heading`.
fn shell_block(readme: &str, heading: &str) -> String {
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("no {heading:?}"));
    let start = section.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let end = section[start..].find("```").expect("the block ends") + start;
    section[start..end].to_owned()
}

/// The block with its gRPC ports 5005i and metrics ports 946i (written literally or
/// as `5005$i` / `946$i` in the loop) moved to free ports that share a prefix
/// per kind, so the loop's `$i` suffix still works: the ports become `P1..P3` for a
/// free ten-port range `P0..P9` (found by binding all ten).
fn remap(script: &str, addrs: &[SocketAddr], metrics: &[SocketAddr]) -> (String, Vec<SocketAddr>) {
    let grpc = free_decade(2000);
    let metrics_base = free_decade(grpc + 1);
    assert_eq!(addrs.iter().map(|a| a.port()).collect::<Vec<_>>(), [50051, 50052, 50053]);
    assert_eq!(metrics.iter().map(|a| a.port()).collect::<Vec<_>>(), [9461, 9462, 9463]);
    let script = script
        .replace("127.0.0.1:5005", &format!("127.0.0.1:{grpc}"))
        .replace("127.0.0.1:946", &format!("127.0.0.1:{metrics_base}"));
    let addrs = (1..=3).map(|i| format!("127.0.0.1:{grpc}{i}").parse().unwrap()).collect();
    (script, addrs)
}

/// The first prefix `d >= from` such that ports `d0..=d9` are all free right now.
fn free_decade(from: u32) -> u32 {
    for d in from..6000u32 {
        let all: Result<Vec<_>, _> = (0..10)
            .map(|i| std::net::TcpListener::bind(("127.0.0.1", (d * 10 + i) as u16)))
            .collect();
        if all.is_ok() {
            return d;
        }
    }
    panic!("no ten consecutive free ports between 20000 and 59999");
}

/// Kills the nodes however the test ends.
struct Nodes(Vec<u32>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_three_node_cluster_starts_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let block = shell_block(&readme, "## A 3-node cluster on one machine");
    let script: String = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo build"))
        .map(|l| l.replace("./target/release/rationd", env!("CARGO_BIN_EXE_rationd")))
        .collect::<Vec<_>>()
        .join("\n");
    let addrs: Vec<SocketAddr> = script
        .lines()
        .find_map(|l| l.strip_prefix("C="))
        .expect("the block names the cluster in C=")
        .split(',')
        .map(|m| m.split_once('=').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(addrs.len(), 3, "{script}");
    // The README's fixed ports should be free: another test's client connection may
    // hold one for a moment as its local port (they are in Linux's ephemeral range),
    // so wait for them. If something on this machine keeps one (a CI host's own
    // service), the block runs with the same commands on free ports instead: the
    // README's ports are an example, its commands are what this test checks.
    let metrics: Vec<SocketAddr> =
        (1..=3).map(|i| format!("127.0.0.1:946{i}").parse().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (script, addrs) = loop {
        let Some(busy) =
            addrs.iter().chain(&metrics).find(|a| std::net::TcpListener::bind(a).is_err())
        else {
            break (script, addrs);
        };
        if Instant::now() >= deadline {
            eprintln!("{busy} stayed in use for 10 s; running the README block on free ports");
            break remap(&script, &addrs, &metrics);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let dir = tempfile::tempdir().unwrap();
    // The block starts the nodes in the background; their output goes to a file
    // (not to a pipe this test would wait on), and the script writes their pids.
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!("set -e\nexec >nodes.log 2>&1 </dev/null\n{script}\njobs -p >pids"))
        .current_dir(dir.path())
        .env("RATION_LOG", "warn")
        .status()
        .unwrap();
    let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap_or_default();
    let nodes = Nodes(pids.split_whitespace().filter_map(|p| p.parse().ok()).collect());
    assert!(status.success(), "the README block failed ({status})");
    assert_eq!(nodes.0.len(), 3, "the block did not start three nodes: {pids:?}");

    // One leader, known to every node, and three voters.
    let deadline = Instant::now() + Duration::from_secs(60);
    let statuses = loop {
        let mut all = Vec::new();
        for a in &addrs {
            all.push(status_within(*a, false, Duration::from_secs(2)).await);
        }
        let ok: Vec<v1::StatusReply> = all.into_iter().flatten().collect();
        if ok.len() == 3
            && ok[0].leader.is_some()
            && ok.iter().all(|s| s.leader == ok[0].leader)
            && ok.iter().all(|s| s.members.iter().filter(|m| m.voter).count() == 3)
        {
            break ok;
        }
        assert!(
            Instant::now() < deadline,
            "no healthy 3-node cluster within 60 s: {ok:?}\nnode logs:\n{}",
            std::fs::read_to_string(dir.path().join("nodes.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A write through the last node reaches every node.
    let mut c = LedgerClient::new(channel(addrs[2]));
    c.create_budget(v1::CreateBudgetRequest {
        meta: meta("readme", 1, "gw-chaos"),
        path: "readme".into(),
        limits: vec![],
    })
    .await
    .unwrap();
    for a in &addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = LedgerClient::new(channel(*a))
                .get_budget(v1::GetBudgetRequest { path: "readme".into(), linearizable: false })
                .await;
            if got.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "node {a} never saw the write: {got:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("the README's 3-node cluster formed: leader {:?}", statuses[0].leader);
    drop(nodes);
}

/// A second node on a taken metrics port (the README's mistake before it gave
/// each node its own) exits 1 with one line that says what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = taken.local_addr().unwrap().to_string();
    let grpc = free_addrs(1)[0].to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_rationd"))
        .args(["--listen", &grpc, "--metrics-listen", &metrics])
        .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
        .env("RATION_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(
        stderr.contains(&metrics)
            && stderr.contains("already in use")
            && stderr.contains("--metrics-listen"),
        "{stderr}"
    );
    // Refused before Raft started: nothing else was logged.
    assert!(stdout.trim().is_empty(), "logged before refusing: {stdout}");
    drop(taken);
}
