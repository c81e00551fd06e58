//! The fuzz targets on a few thousand deterministic inputs each (seeds, random and
//! mutated bytes from a fixed seed), so they build, run and stay green in
//! `cargo test --workspace`. Real fuzzing: `scripts/fuzz.sh` (see fuzz/README.md).
//! `RATION_FUZZ_SMOKE_RUNS=N` runs N inputs per target instead.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use ration_fuzz::{driver, seeds, target};

fn smoke(name: &str, default_runs: usize) {
    let runs = std::env::var("RATION_FUZZ_SMOKE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_runs);
    let seeds = seeds::seeds(name);
    assert!(!seeds.is_empty(), "{name} has seeds");
    let done = driver::run(name, target(name).unwrap(), &seeds, 0x2026, |n| n < runs);
    assert!(done >= runs.min(seeds.len()));
}

#[test]
fn proto_requests() {
    smoke("proto_requests", 20_000);
}

#[test]
fn entry_decode() {
    smoke("entry_decode", 20_000);
}

#[test]
fn snapshot_restore() {
    smoke("snapshot_restore", 5_000);
}

#[test]
fn core_apply() {
    smoke("core_apply", 2_000);
}

/// The seed snapshot files mirror ration-store's format: if it changes, these stop
/// being accepted and the mirror in `seeds.rs` needs the same change.
#[test]
fn snapshot_file_seeds_are_accepted_by_the_store() {
    let run = ration_fuzz::core::run_program(&seeds::programs()[1]);
    let file = seeds::snapshot_file(&run.ledger, &run.audit);
    let info = ration_store::backup::inspect_snapshot(&file).expect("a valid snapshot file");
    assert_eq!(info.last_log_index, run.ledger.last_index());
}

/// Seed programs really drive the ledger: entries, grants, audit records.
#[test]
fn seed_programs_do_something() {
    let runs: Vec<_> =
        seeds::programs().iter().map(|p| ration_fuzz::core::run_program(p)).collect();
    let entries: usize = runs.iter().map(|r| r.entries.len()).sum();
    let records: usize = runs.iter().map(|r| r.audit.len()).sum();
    assert!(entries > 50 && records > 20, "{entries} entries, {records} audit records");
}
