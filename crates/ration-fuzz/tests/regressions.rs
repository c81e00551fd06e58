//! Every input in fuzz/regressions/ (named `TARGET-what.bin`), through its target.
//! Each reproduces a bug the fuzzers found; all are fixed, so every input must pass
//! strictly (no tolerance from `ration_fuzz::known`). A new finding that cannot be
//! fixed at once gets a tolerance there and may be marked ignored here meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

fn regressions() -> Vec<(String, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .expect("fuzz/regressions exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .map(|p| {
            let file = p.file_name().unwrap().to_string_lossy().into_owned();
            let target = file.split('-').next().unwrap().to_owned();
            (target, p)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn regression_inputs_pass_with_known_bugs_tolerated() {
    let all = regressions();
    assert!(!all.is_empty());
    for (target, path) in all {
        let run = ration_fuzz::target(&target)
            .unwrap_or_else(|| panic!("{}: no target {target}", path.display()));
        run(&std::fs::read(&path).unwrap());
    }
}

/// Runs one input strictly on its own thread: whether it passed within 10 s. (A
/// hanging input's thread is left spinning until the test process exits.)
fn passes_strictly(target: &str, input: Vec<u8>) -> bool {
    let run = ration_fuzz::target(target).unwrap();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        ration_fuzz::known::set_strict(true);
        let passed = catch_unwind(AssertUnwindSafe(|| run(&input))).is_ok();
        let _ = done.send(passed);
    });
    finished.recv_timeout(Duration::from_secs(10)).unwrap_or(false)
}

#[test]
fn regression_inputs_pass_strictly() {
    let failing: Vec<String> = regressions()
        .into_iter()
        .filter(|(target, path)| !passes_strictly(target, std::fs::read(path).unwrap()))
        .map(|(_, path)| path.display().to_string())
        .collect();
    assert!(failing.is_empty(), "still failing (panic or hang): {failing:#?}");
}
