//! README.md's "A secured 3-node cluster", run as written: both shell blocks are
//! read from the README itself. In the first, the `cargo build` line is left out,
//! `./target/release/rationd` is this build's `rationd`, and the `rationctl` lines
//! run in-process (`rationctl::run`, the same code as the binary) with the block's
//! relative paths taken from the block's working directory; the rest (ports,
//! flags, files) runs in bash unchanged. The three nodes must form one cluster
//! over mutual TLS; then the second block's `rationctl` commands must succeed as
//! written, `gw-eu` (granted the gateway role on `acme` there) must be able to
//! acquire on `acme` but not create a budget, and a client without a certificate
//! must be refused.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The `n`th ```sh block after the heading `heading`.
fn shell_block(readme: &str, heading: &str, n: usize) -> String {
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("no {heading:?}"));
    let section = section.split("\n## ").next().unwrap();
    let block = section.split("```sh\n").nth(n + 1).unwrap_or_else(|| panic!("no block {n}"));
    block.split("```").next().unwrap().to_owned()
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

const RATIONCTL: &str = "./target/release/rationctl ";

/// Runs a README `rationctl` line in-process, in `dir`: arguments that are
/// relative paths of the block (`certs/...`, and what `--out` names) become paths
/// under `dir`.
async fn rationctl(dir: &Path, line: &str) -> anyhow::Result<String> {
    let words: Vec<&str> = line.strip_prefix(RATIONCTL).unwrap().split_whitespace().collect();
    let args = words.iter().enumerate().map(|(i, a)| {
        let path = a.starts_with("certs/") || (i > 0 && words[i - 1] == "--out");
        if path {
            dir.join(a).to_string_lossy().into_owned()
        } else {
            (*a).to_owned()
        }
    });
    let mut out = Vec::new();
    rationctl::run(std::iter::once("rationctl".to_owned()).chain(args), &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_secured_cluster_starts_and_answers_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let heading = "## A secured 3-node cluster";
    let start = shell_block(&readme, heading, 0);
    let usage = shell_block(&readme, heading, 1);
    let dir = tempfile::tempdir().unwrap();

    // The fixed ports must be free for a listener as rationd binds it (tokio sets
    // SO_REUSEADDR, so a closed connection's TIME_WAIT does not count); another
    // test's client connection may hold one for a moment as its local port.
    let ports: Vec<u16> = (1..=3).flat_map(|i| [50070 + i, 50080 + i, 9470 + i]).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut busy = None;
        for p in &ports {
            if tokio::net::TcpListener::bind(("127.0.0.1", *p)).await.is_err() {
                busy = Some(*p);
                break;
            }
        }
        let Some(busy) = busy else { break };
        assert!(Instant::now() < deadline, "port {busy} stayed in use for 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut shell = Vec::new();
    for line in start.lines().filter(|l| !l.trim_start().starts_with("cargo build")) {
        if line.starts_with(RATIONCTL) {
            rationctl(dir.path(), line).await.unwrap_or_else(|e| panic!("{line}: {e:#}"));
        } else {
            shell.push(line.replace("./target/release/rationd", env!("CARGO_BIN_EXE_rationd")));
        }
    }
    let script = shell.join("\n");
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

    // The usage block, as written, once the cluster answers it.
    let lines: Vec<&str> = usage.lines().filter(|l| l.starts_with(RATIONCTL)).collect();
    assert_eq!(lines.len(), 3, "{usage}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let members = loop {
        match rationctl(dir.path(), lines[0]).await {
            Ok(out) if out.lines().filter(|l| l.contains("voter")).count() == 3 => break out,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no 3-voter cluster within 60 s: {other:?}\nnode logs:\n{}",
                    std::fs::read_to_string(dir.path().join("nodes.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert!(
        members.contains("127.0.0.1:50081"),
        "members are listed at their peer addresses:\n{members}"
    );
    let set = rationctl(dir.path(), lines[1]).await.unwrap();
    assert!(set.contains("acme"), "{set}");
    let granted = rationctl(dir.path(), lines[2]).await.unwrap();
    assert!(granted.contains("gateway") && granted.contains("acme"), "{granted}");

    // gw-eu (the block's other certificate) may now spend on acme, and only that.
    let as_gw = lines[0]
        .replace("certs/admin.pem", "certs/gw-eu.pem")
        .replace("certs/admin-key.pem", "certs/gw-eu-key.pem");
    let as_gw = as_gw.strip_suffix(" member list").unwrap();
    let certs = dir.path().join("certs");
    let tls = ration_tls::ClientTls::from_files(&ration_tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join("gw-eu.pem"),
        key: certs.join("gw-eu-key.pem"),
    })
    .unwrap();
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50071")
        .connect_with_connector_lazy(ration_tls::Connector::new(tls));
    let lease = ration_proto::v1::ledger_client::LedgerClient::new(channel)
        .acquire(ration_proto::v1::AcquireRequest {
            meta: Some(ration_proto::v1::RequestMeta {
                client_id: "readme-gw-eu".into(),
                request_id: 1,
                principal: "gw-eu".into(),
                ..Default::default()
            }),
            budget: "acme".into(),
            unit: "tokens".into(),
            wanted: 1000,
            min: 1,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.granted, 1000, "{lease:?}");
    let err = rationctl(dir.path(), &format!("{as_gw} budget set acme/x --limit tokens=1/day"))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("PERMISSION_DENIED"), "{err:#}");

    // Without a client certificate the same command is refused.
    let no_cert = lines[0].split(" --cert").next().unwrap().to_owned() + " member list";
    let err = rationctl(dir.path(), &no_cert).await.unwrap_err().to_string();
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("no client certificate was presented"),
        "{err}"
    );
    drop(nodes);
}
