//! Architecture invariants: the crates depend on each other only as ARCHITECTURE.md
//! draws it.
//! - The core is pure: `ration-core` pulls in no protobuf, storage, consensus,
//!   async runtime, clock, randomness or I/O crate (not even through its build
//!   dependencies).
//! - Storage knows no gRPC: `ration-store` pulls in neither tonic nor `ration-proto`.
//! - The gateway SDK knows no storage or consensus: `ration-client` pulls in neither
//!   sled nor openraft.
//! - The Envoy agent is a gateway: `ration-agent` reaches the cluster through the SDK
//!   and pulls in neither the server, sled nor openraft.
//!
//! Each check reads `cargo tree -e <edges> -p <crate> --prefix none` and prints what
//! it found (`--nocapture` shows it).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::process::Command;

/// The crates in `package`'s dependency tree along `edges` (itself included).
fn tree(package: &str, edges: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "-p", package, "--edges", edges, "--prefix", "none"])
        .args(["--format", "{p}", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    tree.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
}

/// Asserts `package`'s tree holds every one of `expected` (so the listing parsed)
/// and none of `forbidden`, printing the workspace crates and the checked names.
fn check(package: &str, edges: &str, expected: &[&str], forbidden: &[&str]) {
    let crates = tree(package, edges);
    let ours: Vec<&str> =
        crates.iter().map(String::as_str).filter(|c| c.starts_with("ration")).collect();
    // One print, so the reports of tests running in parallel do not interleave.
    let mut report = format!("cargo tree -e {edges} -p {package}: {} crates\n", crates.len());
    report += &format!("  workspace crates: {}\n", ours.join(", "));
    let mut bad = Vec::new();
    for name in expected {
        let found = crates.contains(*name);
        report += &format!("  {name}: {}\n", if found { "present (expected)" } else { "MISSING" });
        if !found {
            bad.push(format!("{name} missing"));
        }
    }
    for name in forbidden {
        let found = crates.contains(*name);
        report += &format!("  {name}: {}\n", if found { "PRESENT (forbidden)" } else { "absent" });
        if found {
            bad.push(format!("{name} present"));
        }
    }
    print!("{report}");
    assert!(bad.is_empty(), "{package}: {bad:?}; its tree: {crates:?}");
}

#[test]
fn ration_core_is_pure() {
    check(
        "ration-core",
        "normal,build",
        &["ration-core", "serde", "sha2", "postcard"],
        &[
            "tokio",
            "tonic",
            "prost",
            "sled",
            "openraft",
            "hyper",
            "mio",
            "rand",
            "getrandom",
            "tracing",
            "futures",
        ],
    );
}

#[test]
fn ration_store_knows_no_grpc() {
    check(
        "ration-store",
        "normal",
        &["ration-store", "ration-core", "openraft", "sled"],
        &["tonic", "ration-proto"],
    );
}

#[test]
fn ration_client_knows_no_storage_or_consensus() {
    check(
        "ration-client",
        "normal",
        &["ration-client", "ration-proto", "tonic"],
        &["sled", "openraft"],
    );
}

#[test]
fn the_envoy_agent_is_a_gateway_over_the_sdk() {
    check(
        "ration-agent",
        "normal",
        &["ration-agent", "ration-client", "envoy-types", "tonic"],
        &["ration-server", "ration-store", "sled", "openraft"],
    );
}
