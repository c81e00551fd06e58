//! Architecture invariant: ration-core knows nothing about protobuf, sled, tokio or
//! openraft, and pulls in no source of time, randomness or I/O.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

const FORBIDDEN: [&str; 11] = [
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
];

#[test]
fn ration_core_depends_on_no_io_crate() {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "-p", "ration-core", "--edges", "normal,build", "--prefix", "none"])
        .args(["--format", "{p}", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    // The listing parsed: the crates we do depend on are there.
    for expected in ["ration-core", "serde", "sha2", "postcard"] {
        assert!(crates.contains(&expected), "{expected} missing from:\n{tree}");
    }
    let bad: Vec<&&str> = crates.iter().filter(|c| FORBIDDEN.contains(c)).collect();
    assert!(bad.is_empty(), "ration-core must stay pure, but depends on {bad:?}:\n{tree}");
}
