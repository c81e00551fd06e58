//! # ration-fuzz
//!
//! Ration's fuzz targets, as plain functions of a byte slice. Each one panics if and
//! only if it finds a bug; any input that is merely malformed must be refused quietly.
//!
//! - [`proto_requests`]: every protobuf request a client or peer sends (the 19 listed
//!   in [`proto::KINDS`]), decoded from arbitrary bytes with `prost`, then run through
//!   the conversion the server applies (`ration_proto::convert`), re-encoded into the
//!   replicated log format and decoded back, and applied to a small ledger.
//! - [`entry_decode`]: `Entry::decode` of arbitrary bytes (the Raft log format); what
//!   decodes must re-encode to an equal entry and apply without breaking invariants.
//! - [`snapshot_restore`]: `Ledger::restore` and the snapshot-file check
//!   `ration_store::backup::inspect_snapshot` on arbitrary bytes; what restores must
//!   answer queries and keep applying.
//! - [`core_apply`]: the input is read as a program of log entries over a small
//!   vocabulary (a few budget paths, units, clients and principals), applied to the
//!   ledger; after every entry the invariants, the cap of every limit, conservation,
//!   the audit chain, exactly-once, determinism (a replica fed the same entries) and
//!   snapshot/restore equivalence are checked.
//!
//! They are compiled twice: by `fuzz/` into libFuzzer binaries (coverage-guided,
//! `scripts/fuzz.sh`), and by this crate's smoke test, which runs each target on a
//! few thousand inputs mutated from [`seeds`] with a fixed seed ([`driver`]), so the
//! targets build and pass in `cargo test --workspace`.

// A fuzz harness reports a bug by panicking: `expect` and `assert!` are its output.
#![allow(clippy::expect_used, clippy::panic)]

pub mod core;
pub mod driver;
mod fixture;
mod input;
pub mod known;
pub mod proto;
pub mod seeds;
pub mod snapshot;

pub use crate::core::core_apply;
pub use crate::proto::proto_requests;
pub use crate::snapshot::{entry_decode, snapshot_restore};

/// A fuzz target: a function of the input bytes that panics on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name its libFuzzer binary has in `fuzz/`.
pub const TARGETS: [(&str, Target); 4] = [
    ("proto_requests", proto_requests),
    ("entry_decode", entry_decode),
    ("snapshot_restore", snapshot_restore),
    ("core_apply", core_apply),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}
