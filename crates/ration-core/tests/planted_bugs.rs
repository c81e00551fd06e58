//! A planted bug (a cargo feature the simulation must catch) cannot reach a release
//! build: `compile_error!` refuses the feature without `debug_assertions`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

fn check_release() -> std::process::Output {
    // Its own target directory: the outer `cargo test` may hold the default one.
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("planted-bug-guard");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["check", "-p", "ration-core", "--lib", "--offline", "--quiet"])
        .args(["--features", "planted-bug-expiry-refunds"])
        .arg("--target-dir")
        .arg(&target)
        .arg("--release")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.output().expect("cargo check runs")
}

#[test]
fn a_release_build_with_a_planted_bug_does_not_compile() {
    let release = check_release();
    let stderr = String::from_utf8_lossy(&release.stderr);
    assert!(!release.status.success(), "a release build with a planted bug compiled");
    assert!(stderr.contains("refused in release builds"), "failed for another reason:\n{stderr}");
}
