//! What a run reports: its [`Report`], or a [`Failure`] with the command that
//! replays it; the running hash that makes two runs of one seed comparable
//! ([`Trace`]); and the readable account printed under `RATION_SIM_TRACE`
//! ([`Tracer`]).

use std::collections::BTreeMap;

use openraft::{ServerState, Vote};
use ration_store::mem::MemDisk;

use crate::actors::{nodes, Shared};
use crate::faults::Fault;
use crate::SimConfig;

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Units the gateways admitted in total (the ground truth of spend: real costs
    /// of priced calls and spend from emergency reserves included).
    pub admitted: u64,
    pub cap: u64,
    /// What the ledger counts consumed on the gateways' leaves at the end (equal to
    /// `admitted`, or the run failed).
    pub ledger_consumed: u64,
    /// Overrun units the ledger counted on the root, and those the gateways' SDKs
    /// recorded (equal, or the run failed).
    pub overruns: u64,
    pub sdk_overruns: u64,
    /// Priced calls the gateways admitted.
    pub calls_admitted: u64,
    /// The most ledger time was seen ahead of true time, in ms (negative: behind).
    pub ledger_ahead_max_ms: i64,
    /// What the run's traffic and faults made happen, by kind: settles above the
    /// reservation (and their excess units), SDK outages and emergency-reserve
    /// spend, window rollovers under faults, clock steps by kind, fail-static
    /// leaves.
    pub events: BTreeMap<&'static str, u64>,
    /// Probe requests answered, and left unknown (timed out on every retry).
    pub probes_answered: u64,
    pub probes_unknown: u64,
    pub probe_grants: u64,
    /// Final applied index and audit length (equal on every node).
    pub applied_index: u64,
    pub audit_records: u64,
    /// Node crashes whose unflushed writes were lost.
    pub crashes: u64,
    /// Bytes written to a write-ahead log but not synced when its power was cut.
    pub unsynced_bytes_lost: u64,
    /// A hash of everything observable: equal for equal seeds.
    pub trace: u64,
    pub sim_ms: u64,
    /// The highest snapshot index on any node at the end (snapshots and log purges
    /// happened when it is above 0).
    pub snapshot_index: u64,
    /// Raft cores that stopped on their own (each was restarted): who, when, why.
    pub core_stops: Vec<String>,
    /// Distinct log indexes whose applied entry id was observed and cross-checked.
    pub entries_checked: u64,
    /// Terms in which more than one node was seen leading: legal in openraft's
    /// default leader-id mode, counted to show the checks held through them.
    pub shared_terms: u64,
}

/// A failed run: what broke, and how to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub nodes: u64,
    pub what: String,
    pub at_ms: u64,
    /// The environment the replay needs for a configuration other than the
    /// default (`RATION_SIM_WAL=0 ` and the like).
    pub env: String,
}

impl Failure {
    /// `what` broke at `at_ms` of simulated time in the run of `cfg`.
    pub(crate) fn new(cfg: &SimConfig, at_ms: u64, what: impl std::fmt::Display) -> Self {
        let mut env = String::new();
        for (set, var) in [
            (cfg.wal, "RATION_SIM_WAL"),
            (cfg.disk_failures, "RATION_SIM_DISK_FAILURES"),
            (cfg.extended, "RATION_SIM_EXTENDED"),
        ] {
            if !set {
                env.push_str(&format!("{var}=0 "));
            }
        }
        // The scans decide regions per seed; say it either way so a replay matches.
        env.push_str(if cfg.regions { "RATION_SIM_REGIONS=1 " } else { "RATION_SIM_REGIONS=0 " });
        Self { seed: cfg.seed, nodes: cfg.nodes, what: what.to_string(), at_ms, env }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at {} ms of simulated time: {}\nreplay: {}{}",
            self.seed,
            self.at_ms,
            self.what,
            self.env,
            replay_command(self.seed, self.nodes)
        )
    }
}

/// The command that runs `seed` again, with the features this build has.
pub fn replay_command(seed: u64, nodes: u64) -> String {
    let mut features = Vec::new();
    if cfg!(feature = "planted-bug-ack-before-flush") {
        features.push("planted-bug-ack-before-flush");
    }
    if cfg!(feature = "planted-bug-expiry-refunds") {
        features.push("planted-bug-expiry-refunds");
    }
    let features = if features.is_empty() {
        String::new()
    } else {
        format!(" --features {}", features.join(","))
    };
    let nodes = if nodes == 3 { String::new() } else { format!("RATION_SIM_NODES={nodes} ") };
    format!(
        "{nodes}RATION_SIM_SEED={seed} cargo test -p ration-sim{features} --test sim replay -- --ignored --nocapture"
    )
}

/// A running hash of what happened, to compare two runs of one seed.
#[derive(Default)]
pub(crate) struct Trace(u64);

impl Trace {
    pub(crate) fn note(&mut self, at: u64, what: &str) {
        for b in at.to_le_bytes().iter().chain(what.as_bytes()) {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    pub(crate) fn finish(&mut self, r: &Report) -> u64 {
        self.note(
            r.sim_ms,
            &format!(
                "{:?}",
                (
                    r.admitted,
                    r.applied_index,
                    r.audit_records,
                    r.probe_grants,
                    &r.faults,
                    &r.events,
                    r.ledger_ahead_max_ms,
                )
            ),
        );
        self.0
    }
}

/// A readable account of a run, printed to stderr when `RATION_SIM_TRACE` is set:
/// faults (and what each crashed disk kept), elections with who voted for whom,
/// leadership changes, Raft cores that stopped and their restarts.
pub(crate) struct Tracer {
    on: bool,
    /// Per node: (state, vote, leader) as last printed.
    seen: BTreeMap<u64, (ServerState, Vote<u64>, Option<u64>)>,
}

impl Tracer {
    pub(crate) fn from_env() -> Self {
        Self { on: std::env::var_os("RATION_SIM_TRACE").is_some(), seen: BTreeMap::new() }
    }

    pub(crate) fn event(&mut self, at_ms: u64, what: impl std::fmt::Display) {
        if self.on {
            eprintln!("[{at_ms:>6} ms] {what}");
        }
    }

    pub(crate) fn fault(
        &mut self,
        at_ms: u64,
        fault: Fault,
        undo: &[String],
        lasts: u64,
        disks: &BTreeMap<u64, MemDisk>,
    ) {
        if !self.on {
            return;
        }
        self.event(at_ms, format!("fault {} {fault:?} on {undo:?} for {lasts} ms", fault.name()));
        if matches!(fault, Fault::Crash(_) | Fault::CrashMany) {
            for h in undo {
                let id: u64 = h.trim_start_matches('n').parse().unwrap_or(0);
                if let Some(disk) = disks.get(&id) {
                    let d = disk.durable_summary();
                    self.event(
                        at_ms,
                        format!(
                            "  {h} crashed; its disk kept vote {}, log {}..={} (purged to {}), snapshot {} bytes",
                            d.vote.map_or("none".into(), |v| v.to_string()),
                            d.first.map_or("-".into(), |l| l.to_string()),
                            d.last.map_or("-".into(), |l| l.to_string()),
                            d.last_purged.map_or("-".into(), |l| l.to_string()),
                            d.snapshot_bytes
                        ),
                    );
                }
            }
            for h in undo {
                let id: u64 = h.trim_start_matches('n').parse().unwrap_or(0);
                self.seen.remove(&id);
            }
        }
    }

    /// Prints what changed in each live node's Raft state since the last call.
    pub(crate) fn observe(&mut self, at_ms: u64, shared: &Shared) {
        if !self.on {
            return;
        }
        for (id, node) in nodes(shared) {
            let m = node.raft.metrics().borrow().clone();
            let now = (m.state, m.vote, m.current_leader);
            let before = self.seen.insert(id, now);
            if before == Some(now) {
                continue;
            }
            let (state, vote, leader) = now;
            let candidate = vote.leader_id().node_id;
            let mut parts = Vec::new();
            if before.map(|b| b.0) != Some(state) {
                parts.push(format!("{state:?}"));
            }
            if before.map(|b| b.1) != Some(vote) {
                parts.push(if candidate == id && !vote.is_committed() {
                    format!("campaigns in term {} (votes for itself)", vote.leader_id().term)
                } else if candidate == id {
                    format!("won term {} (vote {vote})", vote.leader_id().term)
                } else if vote.is_committed() {
                    format!("follows n{candidate} in term {} (vote {vote})", vote.leader_id().term)
                } else {
                    format!(
                        "votes for n{candidate} in term {} (vote {vote})",
                        vote.leader_id().term
                    )
                });
            }
            if before.map(|b| b.2) != Some(leader) {
                parts.push(format!(
                    "sees leader {}",
                    leader.map_or("none".into(), |l| format!("n{l}"))
                ));
            }
            self.event(at_ms, format!("n{id}: {}", parts.join(", ")));
        }
    }
}
