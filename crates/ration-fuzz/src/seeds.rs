//! Seed inputs for each target: valid encodings of every message kind, log
//! entries, ledger snapshots and snapshot files, and a few command programs. Mutation
//! starting from them reaches past the decoders quickly. Deterministic: the same
//! seeds on every run (`examples/seeds.rs` writes them into libFuzzer's corpus).

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, CommittedLeaderId, LogId, Membership, StoredMembership};
use ration_core::{AuditRecord, Batch, Command, Entry, Ledger, LedgerConfig};

use crate::core::run_program;
use crate::driver::Rng;
use crate::fixture::fixture;
use crate::proto::{raw_input, synthesized_input, KINDS};

/// Seeds for the target called `target` (none for an unknown name).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "proto_requests" => proto_seeds(),
        "entry_decode" => entry_seeds(),
        "snapshot_restore" => snapshot_seeds(),
        "core_apply" => programs(),
        _ => Vec::new(),
    }
}

/// Command programs for `core_apply`: all zeros (the plainest), and pseudo-random ones.
pub fn programs() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(0x5eed);
    let mut out = vec![vec![0u8; 64]];
    for i in 0..8 {
        let len = 64 << (i % 4);
        out.push(rng.bytes(len));
    }
    out
}

fn proto_seeds() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(0x9207);
    let mut out = Vec::new();
    for kind in 0..KINDS.len() {
        for choices in [vec![0u8; 64], rng.bytes(64), rng.bytes(128)] {
            let synthesized = synthesized_input(kind, &choices);
            // The same message as wire bytes, for the raw half of the target.
            out.push(raw_input(kind, &crate::proto::synthesize_message(kind, &choices)));
            out.push(synthesized);
        }
    }
    // The fixture's audit records as clients receive them.
    let audit_record = KINDS.iter().position(|k| *k == "AuditRecord").expect("a kind");
    for r in &fixture().audit {
        let wire = ration_proto::convert::to_proto::audit_record(r);
        out.push(raw_input(audit_record, &prost::Message::encode_to_vec(&wire)));
    }
    out
}

fn entry_seeds() -> Vec<Vec<u8>> {
    let mut out = vec![Entry::V1(Batch { time_ms: 0, commands: vec![Command::Tick] }).encode()];
    for program in programs().iter().take(4) {
        let run = run_program(program);
        out.extend(run.entries.iter().take(6).map(|(_, e)| e.encode()));
    }
    out
}

fn snapshot_seeds() -> Vec<Vec<u8>> {
    let f = fixture();
    let mut out = vec![
        Ledger::new(LedgerConfig::default()).snapshot(),
        f.ledger.snapshot(),
        snapshot_file(&f.ledger, &f.audit),
    ];
    for program in programs().iter().skip(1).take(3) {
        let run = run_program(program);
        out.push(run.ledger.snapshot());
        out.push(snapshot_file(&run.ledger, &run.audit));
    }
    out
}

/// A snapshot file holding `ledger` and its audit trail, as a one-node cluster's.
pub fn snapshot_file(ledger: &Ledger, audit: &[AuditRecord]) -> Vec<u8> {
    let last = Some(LogId::new(CommittedLeaderId::new(1, 1), ledger.last_index()));
    let nodes = BTreeMap::from([(1u64, BasicNode::new("127.0.0.1:7001"))]);
    let membership = StoredMembership::new(
        Some(LogId::new(CommittedLeaderId::new(1, 1), 0)),
        Membership::new(vec![BTreeSet::from([1u64])], nodes),
    );
    ration_store::backup::snapshot_file_bytes(last, membership, ledger.snapshot(), audit.to_vec())
}
