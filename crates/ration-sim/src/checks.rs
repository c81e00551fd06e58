//! The checks: while the simulation runs ([`check_running`], [`note_leaders`]),
//! whether the cluster has converged ([`converged`]), and at the end
//! ([`check_final`]); the committed-log checker they share ([`Observed`]); and why
//! a check failed ([`CheckError`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use openraft::{LogId, ServerState};
use ration_core::audit::{verify_chain, AuditKind, ChainBreak, ChainHead};
use ration_core::{BudgetPath, Ledger, Period};
use ration_server::Node;
use ration_store::mem::MemDisk;

use crate::actors::{
    node_config, nodes, Shared, CALLS, CLOCK_MAX_DRIFT_PPM, LEAVES, NODE_CLOCK_MAX_OFFSET_MS,
    PROBE_BUDGET, ROOT, UNIT,
};
use crate::report::{Report, Trace};
use crate::{SimConfig, SIM_TICK};

/// Ledger time may be ahead of true time by the clock slack of the node config
/// (what one leader with a wrong wall clock may add), plus what a correct node
/// clock may be ahead ([`NODE_CLOCK_MAX_OFFSET_MS`], and its drift over the run),
/// plus this (a check lands between simulation steps).
const LEDGER_TIME_MARGIN_MS: i64 = 2 * SIM_TICK.as_millis() as i64;

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
    /// The gateways admitted more than the root's cap plus the overruns the ledger
    /// counted on it.
    #[error(
        "gateways admitted {admitted} units, over the cap of {cap} plus {overruns} of overruns"
    )]
    OverCap { admitted: u64, cap: u64, overruns: u64 },
    /// After healing, the ledger's consumed figure for a gateway leaf (every lease
    /// released, every overrun reported) is not what its gateways admitted.
    #[error("gateways admitted {admitted} units from {budget}, but the ledger counts {consumed} consumed ({outstanding} outstanding)")]
    SpendMismatch { budget: String, admitted: u64, consumed: u64, outstanding: u64 },
    /// A leaf the root's template makes was made more than once, or exists without
    /// being an instance of it.
    #[error("leaf {budget}, made by the root's template: created {created} time(s), instance: {instance}")]
    Template { budget: String, created: usize, instance: bool },
    /// The agents' runs broke a bound: calls in flight, a guard, a halt.
    #[error("agents: {detail}")]
    Agents { detail: String },
    /// After healing, the overruns the ledger counted on the root are not those the
    /// gateways' SDKs recorded.
    #[error("the gateways' SDKs recorded {recorded} units of overruns, but the ledger counts {ledger} on {budget}")]
    OverrunsMismatch { budget: String, recorded: u64, ledger: u64 },
    /// The gateways admitted more priced calls than the ledger counts consumed over
    /// every window of the per-minute limit plus what live leases still hold.
    #[error(
        "gateways admitted {admitted} {unit}, but the ledger's audit counts {ledger} consumed or outstanding"
    )]
    CallsUnaccounted { unit: &'static str, admitted: u64, ledger: i128 },
    /// A node's ledger time ran ahead of true (simulated) time by more than the
    /// clock slack allows: one slack per leader wall clock stepped ahead so far
    /// (at least one), plus what correct clocks may be ahead.
    #[error("node {node}: ledger time {ledger_ms} is {ahead_ms} ms ahead of true time {true_ms} (at most {bound_ms} ms allowed after {forward_steps} forward clock steps)")]
    LedgerTimeAhead {
        node: u64,
        ledger_ms: u64,
        true_ms: u64,
        ahead_ms: i64,
        bound_ms: i64,
        forward_steps: u64,
    },
    /// Ledger time went backwards: an entry at a higher index holds an earlier time.
    #[error("ledger time went backwards: node {node} at index {index} has {ledger_ms}, but index {other_index} (node {other_node}) had {other_ms}")]
    LedgerTimeBackwards {
        node: u64,
        index: u64,
        ledger_ms: u64,
        other_node: u64,
        other_index: u64,
        other_ms: u64,
    },
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
    /// Ledger time observed after each applied index: (time, node).
    times: BTreeMap<u64, (u64, u64)>,
    /// The most ledger time was seen ahead of true time, in ms.
    max_ahead_ms: Option<i64>,
    /// Whether ledger time was seen further ahead than one clock slack allows.
    beyond_one_slack: bool,
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

    /// Records that `node`, at applied `index`, holds ledger time `ledger_ms`; an
    /// error if ledger time is lower than at a lower index, or higher than at a
    /// higher one (anywhere: replicas apply the same entries).
    pub fn ledger_time(&mut self, node: u64, index: u64, ledger_ms: u64) -> Result<(), CheckError> {
        let before = self.times.range(..=index).next_back().filter(|(_, (t, _))| *t > ledger_ms);
        let after = self.times.range(index..).next().filter(|(_, (t, _))| *t < ledger_ms);
        if let Some((other_index, (other_ms, other_node))) = before.or(after) {
            return Err(CheckError::LedgerTimeBackwards {
                node,
                index,
                ledger_ms,
                other_node: *other_node,
                other_index: *other_index,
                other_ms: *other_ms,
            });
        }
        self.times.insert(index, (ledger_ms, node));
        Ok(())
    }

    /// Records how far ledger time was seen ahead of true time, and whether that is
    /// more than one clock slack allows.
    pub fn ahead(&mut self, ms: i64, beyond_one_slack: bool) {
        self.max_ahead_ms = Some(self.max_ahead_ms.map_or(ms, |m| m.max(ms)));
        self.beyond_one_slack |= beyond_one_slack;
    }

    /// Whether ledger time was ever seen further ahead than one clock slack allows
    /// (legal after several leader clocks were stepped ahead).
    pub fn beyond_one_slack(&self) -> bool {
        self.beyond_one_slack
    }

    /// The most ledger time was seen ahead of true time (negative: behind), in ms.
    pub fn max_ahead_ms(&self) -> Option<i64> {
        self.max_ahead_ms
    }

    /// The latest ledger time observed.
    pub fn ledger_time_max(&self) -> Option<u64> {
        self.times.values().next_back().map(|(t, _)| *t)
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

/// The clock slack of the nodes (`clock_slack_ms`): how far one leader may move
/// ledger time from where monotonic time puts it.
pub(crate) fn clock_slack_ms() -> i64 {
    node_config(1, 3).clock_slack_ms as i64
}

/// How far ledger time may be ahead of true time, `elapsed_ms` into a run in which
/// `forward_steps` leader wall clocks were stepped ahead: the clock slack once per
/// such step (at least once), plus what a correct node clock may be ahead (its
/// offset and its drift so far), plus a margin. One slack per leader term with a
/// fast clock is what the product promises; the simulation's steps (30 s, a year)
/// are beyond the tolerance, and such a clock is not used at all, so runs stay far
/// inside this bound. Two soak seeds went past tighter versions of it: 5036 (two
/// successive fast leaders, when a far-off clock still earned a slack) and
/// 1029938618064 (one leader stepping down for a moment inside its term, which
/// fixed a second base from ledger time it had itself moved ahead).
pub(crate) fn ledger_time_bound_ms(elapsed_ms: u64, forward_steps: u64) -> i64 {
    clock_slack_ms() * forward_steps.max(1) as i64
        + NODE_CLOCK_MAX_OFFSET_MS
        + elapsed_ms as i64 * CLOCK_MAX_DRIFT_PPM / 1_000_000
        + LEDGER_TIME_MARGIN_MS
}

/// Checked while the simulation runs, on every live node: the ledger's invariants
/// (which include consumed + outstanding <= cap + overruns for every limit, and
/// conservation); replicas at the same applied index hold the same state; the
/// entries each replica applied (its last applied id, and the ids its disk holds
/// up to it) agree with every other replica's (see [`Observed`]); and ledger time
/// is never more than the clock slack ahead of true time (once per leader clock
/// stepped ahead: [`ledger_time_bound_ms`]), and never goes backwards.
/// `elapsed_ms`: simulated time since the run began.
pub(crate) fn check_running(
    shared: &Shared,
    disks: &BTreeMap<u64, MemDisk>,
    observed: &mut Observed,
    elapsed_ms: u64,
) -> Result<(), CheckError> {
    let true_ms = shared.epoch_ms.load(Relaxed) + elapsed_ms;
    let forward_steps = shared.forward_clock_steps.load(Relaxed);
    let bound_ms = ledger_time_bound_ms(elapsed_ms, forward_steps);
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
        let ledger_ms = state.ledger.now_ms();
        drop(state);
        match digests.get(&at) {
            Some((other, d)) if *d != digest => {
                return Err(CheckError::StateDiverged { first: *other, second: id, index: at });
            }
            _ => {
                digests.insert(at, (id, digest));
            }
        }
        if ledger_ms > 0 {
            let ahead_ms = ledger_ms as i64 - true_ms as i64;
            observed.ahead(ahead_ms, ahead_ms > ledger_time_bound_ms(elapsed_ms, 1));
            if ahead_ms > bound_ms {
                return Err(CheckError::LedgerTimeAhead {
                    node: id,
                    ledger_ms,
                    true_ms,
                    ahead_ms,
                    bound_ms,
                    forward_steps,
                });
            }
            observed.ledger_time(id, at, ledger_ms)?;
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
    templated: &[&'static str],
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
    // Every member holds the same state now: read the figures from one of them.
    let member =
        &all.iter().find(|(id, _)| members.contains(id)).ok_or(CheckError::NoMemberRunning)?.1;
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

    // Ground truth: what gateways admitted (real costs, reserve spend included)
    // never exceeds the root's cap plus the overruns the ledger counted on it; and,
    // now that every lease is released and every overrun reported, it is what the
    // ledger counts consumed.
    let admitted = shared.admitted.load(Relaxed);
    report.admitted = admitted;
    let state = member.reader.state();
    let root = lifetime(&state.ledger, ROOT);
    drop(state);
    report.overruns = root.overruns;
    report.sdk_overruns =
        shared.sdk_overruns.lock().unwrap_or_else(|p| p.into_inner()).values().sum();
    if admitted > cfg.cap.saturating_add(root.overruns) {
        return Err(CheckError::OverCap { admitted, cap: cfg.cap, overruns: root.overruns });
    }
    // The ledger agreed with the gateways (`gateway_accounts`) before they shut
    // down; since then their leases, unspent, may have expired and been charged,
    // which only adds: no leaf may now count less than its gateways admitted.
    report.ledger_consumed = shared.ledger_consumed.load(Relaxed);
    let by_leaf = shared.admitted_by_leaf.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let state = member.reader.state();
    for leaf in LEAVES {
        let f = lifetime(&state.ledger, leaf);
        let admitted = by_leaf.get(leaf).copied().unwrap_or(0);
        if f.consumed < admitted {
            return Err(CheckError::SpendMismatch {
                budget: leaf.into(),
                admitted,
                consumed: f.consumed,
                outstanding: f.outstanding,
            });
        }
    }
    // Leaves made by the root's template: made once each (gateways raced for them
    // under faults), and still instances of it.
    for leaf in templated {
        let created = records
            .iter()
            .filter(|r| {
                r.entry.kind == AuditKind::BudgetCreated && r.entry.budget.as_str() == *leaf
            })
            .count();
        let exists = BudgetPath::new(*leaf).is_ok_and(|p| state.ledger.budget(&p).is_some());
        let instance = BudgetPath::new(*leaf).is_ok_and(|p| state.ledger.is_instance(&p));
        if created != usize::from(exists) || exists != instance {
            return Err(CheckError::Template { budget: (*leaf).into(), created, instance });
        }
    }
    drop(state);
    if !templated.is_empty() {
        check_agents(shared, &records, report)?;
    }
    // Priced calls: never more than the ledger counts consumed over every window of
    // the per-minute limit (the audit's net spend in that unit: consumed, plus
    // charged at expiry, less refunded), plus what is still outstanding on live
    // leases: a gateway shut down while no leader was known (seed 29938155115: a
    // leader transfer left the cluster leaderless for 5.6 s) leaves its leases to
    // expire, and the ledger charges them whole then. Not equal: a lease released
    // after its window closed stays charged whole.
    let calls = shared.calls_admitted.load(Relaxed);
    report.calls_admitted = calls;
    let outstanding_calls: i128 = {
        let state = member.reader.state();
        BudgetPath::new(ROOT)
            .ok()
            .and_then(|root| state.ledger.budget(&root))
            .map(|b| {
                b.limits
                    .iter()
                    .filter(|l| l.spec.unit.as_str() == CALLS)
                    .map(|l| i128::from(l.outstanding))
                    .sum()
            })
            .unwrap_or(0)
    };
    let ledger_calls: i128 = records
        .iter()
        .filter(|r| r.entry.unit.as_ref().is_some_and(|u| u.as_str() == CALLS))
        .map(|r| r.entry.flow.net_spend())
        .sum::<i128>()
        + outstanding_calls;
    if i128::from(calls) > ledger_calls {
        return Err(CheckError::CallsUnaccounted {
            unit: CALLS,
            admitted: calls,
            ledger: ledger_calls,
        });
    }
    for (k, v) in [
        ("settle_overrun", shared.settle_overruns.load(Relaxed)),
        ("settle_overrun_units", shared.settle_overrun_units.load(Relaxed)),
        ("sdk_overrun_units", report.sdk_overruns),
        ("priced_calls", calls),
        ("sdk_forgotten_pairs", shared.sdk_forgotten.load(Relaxed)),
    ] {
        report.events.insert(k, v);
    }
    report.ledger_ahead_max_ms = observed.max_ahead_ms().unwrap_or(0);
    report.events.insert("ledger_time_beyond_one_slack", u64::from(observed.beyond_one_slack()));

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

/// A budget's figures in `unit`'s lifetime limit.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Figures {
    pub(crate) consumed: u64,
    pub(crate) outstanding: u64,
    pub(crate) overruns: u64,
}

/// The agents' runs (`SimConfig::templates`): calls in flight never above the
/// limit; the runaway run never granted more than its guard per span, nor more
/// than its lifetime cap, nor anything after its halt.
fn check_agents(
    shared: &Shared,
    records: &[ration_core::AuditRecord],
    report: &mut Report,
) -> Result<(), CheckError> {
    use crate::actors::{
        RUNAWAY_RUN, RUN_GUARD_SPAN_MS, RUN_GUARD_TOKENS, RUN_IN_FLIGHT, RUN_TOKENS,
    };
    let most = shared.most_in_flight.load(Relaxed);
    report.events.insert("most_calls_in_flight", most);
    report.events.insert("slot_calls", shared.slot_calls.load(Relaxed));
    if most > RUN_IN_FLIGHT {
        return Err(CheckError::Agents {
            detail: format!("{most} calls were in flight at once; the limit is {RUN_IN_FLIGHT}"),
        });
    }
    let admitted = shared.run_admitted.load(Relaxed);
    report.events.insert("runaway_admitted", admitted);
    if admitted > RUN_TOKENS {
        return Err(CheckError::Agents {
            detail: format!("the runaway run admitted {admitted} > its cap {RUN_TOKENS}"),
        });
    }
    let on_run = |r: &&ration_core::AuditRecord| r.entry.budget.as_str() == RUNAWAY_RUN;
    let Some(created) =
        records.iter().filter(on_run).find(|r| r.entry.kind == AuditKind::BudgetCreated)
    else {
        return Ok(()); // never made (no acquire got through)
    };
    let created_ms = created.entry.time_ms;
    let halted = records.iter().filter(on_run).find(|r| r.entry.kind == AuditKind::RunHalted);
    report.events.insert("runs_halted", u64::from(halted.is_some()));
    let mut by_span: BTreeMap<u64, u64> = BTreeMap::new();
    for r in records.iter().filter(on_run).filter(|r| r.entry.kind == AuditKind::LeaseGranted) {
        if let Some(h) = halted.filter(|h| r.entry.seq > h.entry.seq) {
            return Err(CheckError::Agents {
                detail: format!(
                    "lease granted (record {}) after the halt (record {})",
                    r.entry.seq, h.entry.seq
                ),
            });
        }
        let span = r.entry.time_ms.saturating_sub(created_ms) / RUN_GUARD_SPAN_MS;
        *by_span.entry(span).or_default() += r.entry.flow.granted;
    }
    if let Some((span, granted)) = by_span.iter().find(|(_, g)| **g > RUN_GUARD_TOKENS) {
        return Err(CheckError::Agents {
            detail: format!(
                "span {span} of the runaway run granted {granted} > its guard {RUN_GUARD_TOKENS}"
            ),
        });
    }
    Ok(())
}

fn lifetime(ledger: &Ledger, path: &str) -> Figures {
    let Ok(path) = BudgetPath::new(path) else { return Figures::default() };
    ledger
        .budget(&path)
        .and_then(|b| {
            b.limits
                .iter()
                .find(|l| {
                    l.spec.unit.as_str() == UNIT && l.spec.window.period() == Period::Lifetime
                })
                .map(|l| Figures {
                    consumed: l.consumed,
                    outstanding: l.outstanding,
                    overruns: l.overruns,
                })
        })
        .unwrap_or_default()
}

/// The ledger agrees with the gateways, on the running node that has applied the
/// most: each gateway leaf's lifetime consumed figure is what its gateways
/// admitted (so the root's, less the probe's, is their total), and the overruns
/// counted on the root are those the gateways' SDKs recorded. Holds once every
/// lease they spent from is released and every overrun reported: after healing,
/// with the SDKs running. Records the consumed figure (`Shared::ledger_consumed`).
pub(crate) fn gateway_accounts(shared: &Shared) -> Result<(), CheckError> {
    let all = nodes(shared);
    let (_, node) = all
        .iter()
        .max_by_key(|(_, n)| n.reader.state().last_applied.map_or(0, |l| l.index))
        .ok_or(CheckError::NoNodeRunning)?;
    let state = node.reader.state();
    let admitted = shared.admitted_by_leaf.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut consumed = 0;
    for leaf in LEAVES {
        let f = lifetime(&state.ledger, leaf);
        let admitted = admitted.get(leaf).copied().unwrap_or(0);
        if f.consumed != admitted {
            return Err(CheckError::SpendMismatch {
                budget: leaf.into(),
                admitted,
                consumed: f.consumed,
                outstanding: f.outstanding,
            });
        }
        consumed += f.consumed;
    }
    let (root, probe) = (lifetime(&state.ledger, ROOT), lifetime(&state.ledger, PROBE_BUDGET));
    let total = shared.admitted.load(Relaxed);
    if root.consumed.saturating_sub(probe.consumed) != total {
        return Err(CheckError::SpendMismatch {
            budget: format!("{ROOT} (less {PROBE_BUDGET})"),
            admitted: total,
            consumed: root.consumed.saturating_sub(probe.consumed),
            outstanding: root.outstanding.saturating_sub(probe.outstanding),
        });
    }
    let recorded: u64 =
        shared.sdk_overruns.lock().unwrap_or_else(|p| p.into_inner()).values().sum();
    if root.overruns != recorded {
        return Err(CheckError::OverrunsMismatch {
            budget: ROOT.into(),
            recorded,
            ledger: root.overruns,
        });
    }
    shared.ledger_consumed.store(consumed, Relaxed);
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
