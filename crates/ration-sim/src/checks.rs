//! The checks: while the simulation runs ([`check_running`], [`note_leaders`]),
//! whether the cluster has converged ([`converged`]), and at the end
//! ([`check_final`]); the committed-log checker they share ([`Observed`]); and why
//! a check failed ([`CheckError`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use openraft::{LogId, ServerState};
use ration_core::audit::{verify_chain, AuditKind, ChainBreak, ChainHead};
use ration_server::Node;
use ration_store::mem::MemDisk;

use crate::actors::{nodes, Shared};
use crate::report::{Report, Trace};
use crate::SimConfig;

/// Why a check failed. Its message is what the failed run reports.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A running node's ledger broke one of its invariants.
    #[error("node {node}: ledger invariant broken: {reason}")]
    Invariant { node: u64, reason: String },
    /// Two running nodes at the same applied index hold different states.
    #[error("nodes {first} and {second} differ at applied index {index}")]
    StateDiverged { first: u64, second: u64, index: u64 },
    /// Two replicas applied different entries at one index.
    #[error("nodes {first_node} and {node} applied different entries at index {}: {first} and {id}", .id.index)]
    DifferentEntries { first_node: u64, first: LogId<u64>, node: u64, id: LogId<u64> },
    /// A committed entry was replaced in a replica's log.
    #[error("committed entry {committed} (applied by node {applied_by}) was lost: node {node} holds {held} at index {}", .held.index)]
    LostEntry { committed: LogId<u64>, applied_by: u64, node: u64, held: LogId<u64> },
    #[error("no node is running")]
    NoNodeRunning,
    #[error("no member is running")]
    NoMemberRunning,
    /// A member's ledger broke one of its invariants at the end.
    #[error("node {node}: {reason}")]
    FinalInvariant { node: u64, reason: String },
    #[error("node {node}: reading audit records: {source}")]
    AuditRead { node: u64, source: ration_store::ReadError },
    #[error("node {node}: audit chain: {source}")]
    AuditChain { node: u64, source: ChainBreak },
    #[error(
        "node {node}: audit records end at {verified:?} but the ledger's chain is at {head:?}"
    )]
    AuditHead { node: u64, verified: ChainHead, head: ChainHead },
    /// The converged members differ in applied index, state or audit length.
    #[error("replicas differ: node {node} at index {index} with {records} records, another at {other_index} with {other_records}")]
    ReplicasDiffer { node: u64, index: u64, records: usize, other_index: u64, other_records: u64 },
    /// An entry applied during the run is past the converged index.
    #[error("index {last} was applied during the run, but the converged cluster is at {applied}")]
    AppliedPastConverged { last: u64, applied: u64 },
    /// The gateways admitted more than the root's cap.
    #[error("gateways admitted {admitted} units, over the cap of {cap}")]
    OverCap { admitted: u64, cap: u64 },
    /// A probe request was granted more than once.
    #[error("{principal} was granted {} times: {leases:?}", .leases.len())]
    GrantedTwice { principal: String, leases: Vec<u64> },
    /// An acknowledged probe grant is not in the log (exactly once).
    #[error(
        "probe request {request_id} was acknowledged with lease {lease} but the log has {logged:?}"
    )]
    AckedGrantMissing { request_id: u64, lease: u64, logged: Option<Vec<u64>> },
}

/// The cluster's committed log as observed so far: for each index, the id (term,
/// leader node, index) of the entry some replica applied there, and which replica.
///
/// openraft runs in its default leader-id mode, where a leader is identified by
/// (term, node id) and several nodes can lead the same term (the later one wins;
/// log ids carry the node id). "One leader per term" is therefore not a safety
/// property here. What is: no two replicas ever apply different entries at the
/// same index, and a committed (applied) entry is never replaced or lost.
#[derive(Debug, Default)]
pub struct Observed {
    committed: BTreeMap<u64, (LogId<u64>, u64)>,
}

impl Observed {
    /// Records that `node` applied entry `id`; an error if another replica applied
    /// a different entry at that index.
    pub fn applied(&mut self, node: u64, id: LogId<u64>) -> Result<(), CheckError> {
        match self.committed.entry(id.index) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((id, node));
                Ok(())
            }
            std::collections::btree_map::Entry::Occupied(o) if o.get().0 == id => Ok(()),
            std::collections::btree_map::Entry::Occupied(o) => {
                let (first, first_node) = *o.get();
                Err(CheckError::DifferentEntries { first_node, first, node, id })
            }
        }
    }

    /// Checks that `node`, whose log holds `held` (entry ids), still holds every
    /// observed committed entry at those indexes.
    pub fn still_holds(&self, node: u64, held: &[LogId<u64>]) -> Result<(), CheckError> {
        for id in held {
            if let Some((committed, by)) = self.committed.get(&id.index) {
                if committed != id {
                    return Err(CheckError::LostEntry {
                        committed: *committed,
                        applied_by: *by,
                        node,
                        held: *id,
                    });
                }
            }
        }
        Ok(())
    }

    /// The highest index observed committed.
    pub fn last(&self) -> Option<u64> {
        self.committed.keys().next_back().copied()
    }

    pub fn len(&self) -> usize {
        self.committed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.committed.is_empty()
    }
}

/// The ids of the entries `node`'s disk holds above its snapshot (and purge point),
/// up to `upto`: the entries it applied, or will apply, from its log. Below the
/// snapshot the disk may still hold stale entries that a snapshot install made
/// obsolete and whose purge is not flushed yet (openraft cleans them up on
/// restart). Empty while the core has not yet reported what the state machine did
/// (a snapshot install in progress).
pub(crate) fn log_ids_above_snapshot(
    node: &Node,
    disk: &MemDisk,
    upto: Option<u64>,
) -> Vec<LogId<u64>> {
    let m = node.raft.metrics().borrow().clone();
    let applied = node.reader.state().last_applied;
    if m.last_applied != applied {
        return Vec::new();
    }
    let above = [m.snapshot, m.purged, disk.durable_summary().last_purged]
        .iter()
        .flatten()
        .map(|l| l.index)
        .max();
    let from = above.map_or(0, |i| i + 1);
    match upto {
        Some(upto) if upto < from => Vec::new(),
        Some(upto) => disk.durable_log_ids(from..=upto),
        None => disk.durable_log_ids(from..),
    }
}

/// Checked while the simulation runs, on every live node: the ledger's invariants
/// (which include consumed + outstanding <= cap for every limit, and
/// conservation); replicas at the same applied index hold the same state; and the
/// entries each replica applied (its last applied id, and the ids its disk holds
/// up to it) agree with every other replica's (see [`Observed`]).
pub(crate) fn check_running(
    shared: &Shared,
    disks: &BTreeMap<u64, MemDisk>,
    observed: &mut Observed,
) -> Result<(), CheckError> {
    let mut digests: BTreeMap<u64, (u64, [u8; 32])> = BTreeMap::new();
    for (id, node) in nodes(shared) {
        let state = node.reader.state();
        state
            .ledger
            .check_invariants()
            .map_err(|e| CheckError::Invariant { node: id, reason: e.to_string() })?;
        // Replicas at the same applied index hold the same state.
        let last_applied = state.last_applied;
        let at = last_applied.map_or(0, |l| l.index);
        let digest = state.ledger.digest();
        drop(state);
        match digests.get(&at) {
            Some((other, d)) if *d != digest => {
                return Err(CheckError::StateDiverged { first: *other, second: id, index: at });
            }
            _ => {
                digests.insert(at, (id, digest));
            }
        }
        if let Some(last) = last_applied {
            observed.applied(id, last)?;
            if let Some(disk) = disks.get(&id) {
                for entry in log_ids_above_snapshot(&node, disk, Some(last.index)) {
                    observed.applied(id, entry)?;
                }
            }
        }
    }
    Ok(())
}

/// Notes who leads which term; a term with a second leader is counted
/// (`Report::shared_terms`), not failed (see [`Observed`]).
pub(crate) fn note_leaders(
    shared: &Shared,
    leaders: &mut BTreeMap<u64, BTreeSet<u64>>,
    report: &mut Report,
) {
    for (id, node) in nodes(shared) {
        let m = node.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            let set = leaders.entry(m.current_term).or_default();
            if set.insert(id) && set.len() == 2 {
                report.shared_terms += 1;
            }
        }
    }
}

/// Every member of the final membership is up and at the same applied index, and
/// a leader is known to all of them.
pub(crate) fn converged(shared: &Shared) -> bool {
    let all = nodes(shared);
    let Some((_, any)) = all.first() else { return false };
    let members: BTreeSet<u64> =
        any.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    let live: BTreeMap<u64, &Arc<Node>> =
        all.iter().filter(|(id, _)| members.contains(id)).map(|(id, n)| (*id, n)).collect();
    if live.len() != members.len() {
        return false;
    }
    let views: Vec<(Option<u64>, u64, Option<u64>)> = live
        .values()
        .map(|n| {
            let m = n.raft.metrics().borrow().clone();
            (
                m.current_leader,
                n.reader.state().last_applied.map_or(0, |l| l.index),
                m.last_log_index,
            )
        })
        .collect();
    let first = views[0];
    first.0.is_some() && views.iter().all(|v| v.0 == first.0 && v.1 == first.1 && v.2 == Some(v.1))
}

/// Each running node as it sees itself, for failure messages.
pub(crate) fn applied(shared: &Shared) -> Vec<String> {
    nodes(shared)
        .iter()
        .map(|(id, n)| {
            let m = n.raft.metrics().borrow().clone();
            let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
            format!(
                "node {id}: {:?} term {} leader {:?} last log {:?} applied {} snapshot {:?} voters {voters:?}",
                m.state,
                m.current_term,
                m.current_leader,
                m.last_log_index,
                n.reader.state().last_applied.map_or(0, |l| l.index),
                m.snapshot.map(|s| s.index),
            )
        })
        .collect()
}

/// Checked once the cluster has converged: the members agree (applied index,
/// state, audit records, each chain verified); no committed entry was lost; the
/// gateways stayed under the cap; probe grants are in the log exactly once. Fills
/// in the rest of `report`.
pub(crate) fn check_final(
    cfg: &SimConfig,
    shared: &Shared,
    disks: &BTreeMap<u64, MemDisk>,
    observed: &Observed,
    report: &mut Report,
    trace: &mut Trace,
) -> Result<(), CheckError> {
    let all = nodes(shared);
    let any = &all.first().ok_or(CheckError::NoNodeRunning)?.1;
    let members: BTreeSet<u64> =
        any.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    let mut reference: Option<(u64, [u8; 32], u64)> = None;
    let mut records = Vec::new();
    for (id, node) in all.iter().filter(|(id, _)| members.contains(id)) {
        let id = *id;
        let state = node.reader.state();
        state
            .ledger
            .check_invariants()
            .map_err(|e| CheckError::FinalInvariant { node: id, reason: e.to_string() })?;
        let applied = state.last_applied.map_or(0, |l| l.index);
        let digest = state.ledger.digest();
        let head = state.ledger.chain_head();
        drop(state);
        let held = node
            .reader
            .audit_records(0, usize::MAX)
            .map_err(|source| CheckError::AuditRead { node: id, source })?;
        let verified = verify_chain(&held, ChainHead::default())
            .map_err(|source| CheckError::AuditChain { node: id, source })?;
        if verified != head {
            return Err(CheckError::AuditHead { node: id, verified, head });
        }
        match &reference {
            None => {
                reference = Some((applied, digest, held.len() as u64));
                records = held;
            }
            Some((a, d, n)) => {
                if (*a, *d, *n) != (applied, digest, held.len() as u64) {
                    return Err(CheckError::ReplicasDiffer {
                        node: id,
                        index: applied,
                        records: held.len(),
                        other_index: *a,
                        other_records: *n,
                    });
                }
            }
        }
    }
    let (applied, _, audit) = reference.ok_or(CheckError::NoMemberRunning)?;
    // Committed entries are never lost: the converged cluster is at or past every
    // index ever applied, and every member's disk holds the committed entry at each
    // index it still has.
    if let Some(last) = observed.last() {
        if last > applied {
            return Err(CheckError::AppliedPastConverged { last, applied });
        }
    }
    for (id, node) in all.iter().filter(|(id, _)| members.contains(id)) {
        if let Some(disk) = disks.get(id) {
            observed.still_holds(*id, &log_ids_above_snapshot(node, disk, None))?;
        }
    }
    report.entries_checked = observed.len() as u64;
    report.snapshot_index = all
        .iter()
        .filter_map(|(_, n)| n.raft.metrics().borrow().snapshot.map(|s| s.index))
        .max()
        .unwrap_or(0);
    report.applied_index = applied;
    report.audit_records = audit;

    // Ground truth: what gateways admitted never exceeds the root's cap.
    let admitted = shared.admitted.load(Relaxed);
    report.admitted = admitted;
    if admitted > cfg.cap {
        return Err(CheckError::OverCap { admitted, cap: cfg.cap });
    }

    // Exactly once: each probe request granted at most once; every acknowledged
    // grant is in the log; unknown outcomes may be there or not, once at most.
    let probe = shared.probe.lock().unwrap_or_else(|p| p.into_inner());
    let mut grants: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &records {
        if r.entry.kind == AuditKind::LeaseGranted
            && r.entry.principal.as_str().starts_with("probe-")
        {
            grants
                .entry(r.entry.principal.to_string())
                .or_default()
                .push(r.entry.lease.map_or(0, |l| l.raw()));
        }
    }
    if let Some((p, leases)) = grants.iter().find(|(_, l)| l.len() > 1) {
        return Err(CheckError::GrantedTwice { principal: p.clone(), leases: leases.clone() });
    }
    for (request_id, lease) in &probe.granted {
        let key = format!("probe-{request_id}");
        if grants.get(&key).map(|l| l.as_slice()) != Some(&[*lease][..]) {
            return Err(CheckError::AckedGrantMissing {
                request_id: *request_id,
                lease: *lease,
                logged: grants.get(&key).cloned(),
            });
        }
    }
    report.probes_answered = probe.granted.len() as u64 + probe.refused;
    report.probes_unknown = probe.unknown.len() as u64;
    report.probe_grants = probe.granted.len() as u64;
    trace.note(applied, &format!("{admitted}/{audit}/{}", probe.granted.len()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(term: u64, node: u64, index: u64) -> LogId<u64> {
        LogId::new(openraft::CommittedLeaderId::new(term, node), index)
    }

    #[test]
    fn two_leaders_of_one_term_are_fine_when_replicas_agree_on_entries() {
        let mut o = Observed::default();
        // T8-N1 led first and wrote index 5 on itself only; T8-N3 then led term 8
        // too and its index 5 is what every replica applied.
        for node in 1..=3 {
            o.applied(node, id(8, 3, 5)).unwrap();
        }
        o.applied(2, id(8, 3, 6)).unwrap();
        assert_eq!(o.last(), Some(6));
        // Node 1 still holds its own unapplied T8-N1-7 beyond what was applied:
        // nothing committed is contradicted.
        o.still_holds(1, &[id(8, 3, 5), id(8, 3, 6)]).unwrap();
    }

    #[test]
    fn different_entries_applied_at_one_index_fail() {
        let mut o = Observed::default();
        o.applied(1, id(8, 1, 5)).unwrap();
        let e = o.applied(3, id(8, 3, 5)).unwrap_err();
        assert!(matches!(e, CheckError::DifferentEntries { first_node: 1, node: 3, .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("nodes 1 and 3 applied different entries at index 5"), "{e}");
    }

    #[test]
    fn a_lost_committed_entry_fails() {
        let mut o = Observed::default();
        o.applied(1, id(2, 1, 9)).unwrap();
        let e = o.still_holds(2, &[id(3, 2, 9)]).unwrap_err();
        assert!(matches!(e, CheckError::LostEntry { applied_by: 1, node: 2, .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("committed entry") && e.contains("was lost"), "{e}");
    }
}
