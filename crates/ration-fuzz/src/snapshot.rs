//! Targets `entry_decode` and `snapshot_restore`: the two byte formats a node
//! decodes from its log, its peers and its operators.

use ration_core::audit::verify_chain;
use ration_core::names::MAX_LEASE_INDEX;
use ration_core::{Batch, Command, Entry, Ledger, LedgerConfig};
use ration_proto::convert;

use crate::fixture::fixture;

/// `Entry::decode` of arbitrary bytes. An entry that decodes must re-encode to an
/// equal entry, and apply to an empty ledger and to the fixture ledger with one
/// outcome per command, its invariants intact and its audit chain continued.
pub fn entry_decode(data: &[u8]) {
    let Ok(entry) = Entry::decode(data) else { return };
    let back = Entry::decode(&entry.encode()).expect("a decoded entry must re-encode and decode");
    assert_eq!(back, entry, "an entry must survive re-encoding");
    let Entry::V1(batch) = &entry;
    for mut ledger in [Ledger::new(LedgerConfig::default()), fixture().ledger.clone()] {
        let head = ledger.chain_head();
        let index = ledger.last_index().saturating_add(1);
        let applied = ledger.apply(index, &entry);
        assert_eq!(applied.outcomes.len(), batch.commands.len(), "one outcome per command");
        if let Err(e) = ledger.check_invariants() {
            panic!("invariant broken by decoded entry {entry:?}: {e}");
        }
        let after = verify_chain(&applied.audit, head).expect("the audit chain continues");
        assert_eq!(after, ledger.chain_head());
    }
}

/// `Ledger::restore` and `ration_store::backup::inspect_snapshot` (what `rationctl
/// snapshot restore` checks a file with) on arbitrary bytes: neither may panic. A
/// ledger that restores must hold its invariants, snapshot to bytes that restore to
/// an equal ledger, answer the queries the server makes, and keep applying.
pub fn snapshot_restore(data: &[u8]) {
    if let Ok(ledger) = Ledger::restore(data) {
        restored(ledger);
    }
    let _ = ration_store::backup::inspect_snapshot(data);
}

fn restored(mut ledger: Ledger) {
    if let Err(e) = ledger.check_invariants() {
        panic!("restore accepted a ledger that breaks an invariant: {e}");
    }
    let bytes = ledger.snapshot();
    let again = Ledger::restore(&bytes).expect("a restored ledger's own snapshot must restore");
    assert_eq!(again, ledger, "restore(snapshot(l)) must equal l, derived indexes included");
    assert_eq!(again.snapshot(), bytes);
    for view in ledger.budgets(None, None, usize::MAX) {
        let _ = convert::to_proto::budget(&view);
        for l in &view.limits {
            let used = l.consumed.checked_add(l.outstanding);
            assert!(used.is_some_and(|u| u <= l.spec.cap), "{}: {l:?} over its cap", view.path);
        }
    }
    for lease in ledger.leases(None, usize::MAX) {
        let _ = convert::to_proto::lease_info(&lease);
    }
    // It keeps working: a tick now (expiries due), and one two days later (every
    // lease expires, windows roll, idle clients are forgotten).
    for advance_ms in [0, 2 * 86_400_000] {
        let index = ledger.last_index().saturating_add(1);
        if index > MAX_LEASE_INDEX {
            break;
        }
        let head = ledger.chain_head();
        let time_ms = ledger.now_ms().saturating_add(advance_ms);
        let entry = Entry::V1(Batch { time_ms, commands: vec![Command::Tick] });
        let applied = ledger.apply(index, &entry);
        if let Err(e) = ledger.check_invariants() {
            panic!("invariant broken by a tick after restore: {e}");
        }
        let after = verify_chain(&applied.audit, head).expect("the audit chain continues");
        assert_eq!(after, ledger.chain_head());
    }
}
