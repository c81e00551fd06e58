//! Prometheus metrics, served over HTTP at `GET /metrics` on `metrics_listen`.
//!
//! Each node keeps its own registry (so several nodes can run in one process, as the
//! tests do): counters and histograms updated on the request path with relaxed
//! atomics, and gauges read from openraft's metrics and the applied ledger when
//! scraped. The text is Prometheus exposition format 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::ServerState;
use ration_core::ledger::Held;
use ration_core::{ErrorKind, Outcome, Reply};

use crate::Node;

/// Log lines the binary held back as repeats (`rationd`'s log filter counts them
/// here; /metrics exports them as `ration_log_lines_suppressed_total`).
pub static LOG_LINES_SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Per-budget series stop after this many budgets (a scrape must stay bounded); the
/// `ration_budget_series_truncated` gauge says when they did.
pub const MAX_BUDGET_SERIES: usize = 10_000;
/// Distinct RPC (method, code) pairs tracked; further ones are counted as `other`.
const MAX_METHODS: usize = 256;
/// Distinct label values (units; top-level budgets on denials) tracked; further
/// ones are counted as `other`, so a scrape stays bounded.
const MAX_LABEL_VALUES: usize = 256;

/// What the metrics need of one command of an entry: for an acquire, its unit and
/// top-level budget (the labels of grants and denials); for an overrun, its unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandLabels {
    Other,
    Acquire { unit: String, top: String },
    Overrun { unit: String },
}

/// The name of a gRPC status code number, as Prometheus labels show it.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "other",
    }
}

/// Adds `n` to `map[key]`, or to `map["other"]` once the map holds
/// [`MAX_LABEL_VALUES`] keys.
fn bump<K: Ord + Clone>(map: &mut BTreeMap<K, u64>, key: K, other: K, n: u64) {
    let key = if map.contains_key(&key) || map.len() < MAX_LABEL_VALUES { key } else { other };
    let v = map.entry(key).or_insert(0);
    *v = v.saturating_add(n);
}

/// A fixed-bucket histogram.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
    /// `sum` is kept in units of `1 / scale` (microseconds for seconds).
    scale: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64], scale: f64) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
            scale,
        }
    }

    fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            if let Some(c) = self.counts.get(i) {
                c.fetch_add(1, Relaxed);
            }
        }
        // Truncation is intended: the sum is kept in whole units of 1/scale.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        self.sum.fetch_add((value * self.scale) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative = cumulative.saturating_add(count.load(Relaxed));
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum.load(Relaxed) as f64 / self.scale;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

const BATCH_BOUNDS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];
const LATENCY_BOUNDS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The kinds a refusal is labelled with.
const KINDS: [ErrorKind; 7] = [
    ErrorKind::InvalidArgument,
    ErrorKind::NotFound,
    ErrorKind::AlreadyExists,
    ErrorKind::FailedPrecondition,
    ErrorKind::ResourceExhausted,
    ErrorKind::PermissionDenied,
    ErrorKind::Aborted,
];

fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument => "invalid_argument",
        ErrorKind::NotFound => "not_found",
        ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::FailedPrecondition => "failed_precondition",
        ErrorKind::ResourceExhausted => "resource_exhausted",
        ErrorKind::PermissionDenied => "permission_denied",
        ErrorKind::Aborted => "aborted",
    }
}

/// One node's counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    grants: AtomicU64,
    /// Units granted, by unit.
    granted_units: std::sync::Mutex<BTreeMap<String, u64>>,
    overruns: AtomicU64,
    overrun_units: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Requests refused by a per-principal limit, by limit (`Held::ALL` order).
    principal_limit_refusals: [AtomicU64; 4],
    clock_skew_ms: std::sync::atomic::AtomicI64,
    clock_step_downs: AtomicU64,
    ledger_time_rebases: AtomicU64,
    placement_transfers: AtomicU64,
    placement_failures: AtomicU64,
    /// Acquires refused, by (refusal kind, top-level budget).
    denials: std::sync::Mutex<BTreeMap<(&'static str, String), u64>>,
    proposals: AtomicU64,
    batch_commands: Histogram,
    /// By (gRPC method path, status code); read-locked on the request path
    /// (written only the first time a pair is seen).
    rpcs: RwLock<BTreeMap<String, BTreeMap<&'static str, Arc<Histogram>>>>,
    /// Audit segments fetched from peers (after a snapshot install).
    pub audit_segments_fetched: AtomicU64,
    /// Webhook POSTs answered 2xx, and attempts that failed.
    pub webhook_delivered: AtomicU64,
    pub webhook_failed: AtomicU64,
    /// Audit records after the webhook cursor, as the leader last looked.
    pub webhook_backlog: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            grants: AtomicU64::new(0),
            granted_units: std::sync::Mutex::default(),
            overruns: AtomicU64::new(0),
            overrun_units: std::sync::Mutex::default(),
            principal_limit_refusals: Default::default(),
            clock_skew_ms: std::sync::atomic::AtomicI64::new(0),
            clock_step_downs: AtomicU64::new(0),
            ledger_time_rebases: AtomicU64::new(0),
            placement_transfers: AtomicU64::new(0),
            placement_failures: AtomicU64::new(0),
            denials: std::sync::Mutex::default(),
            proposals: AtomicU64::new(0),
            batch_commands: Histogram::new(BATCH_BOUNDS, 1.0),
            audit_segments_fetched: AtomicU64::new(0),
            webhook_delivered: AtomicU64::new(0),
            webhook_failed: AtomicU64::new(0),
            webhook_backlog: AtomicU64::new(0),
            rpcs: RwLock::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    pub fn set_clock_skew(&self, ms: i64) {
        self.clock_skew_ms.store(ms, Relaxed);
    }

    pub fn clock_stepped_down(&self) {
        self.clock_step_downs.fetch_add(1, Relaxed);
    }

    pub fn ledger_time_rebased(&self) {
        self.ledger_time_rebases.fetch_add(1, Relaxed);
    }

    /// A leader-placement request of this node ended: it took leadership or not.
    pub fn placement_transfer(&self, took: bool) {
        if took {
            self.placement_transfers.fetch_add(1, Relaxed);
        } else {
            self.placement_failures.fetch_add(1, Relaxed);
        }
    }

    /// Times this node took leadership for its leader priority.
    pub fn placement_transfers(&self) -> u64 {
        self.placement_transfers.load(Relaxed)
    }

    /// Times this node handed leadership over because its clock was off.
    pub fn clock_step_downs(&self) -> u64 {
        self.clock_step_downs.load(Relaxed)
    }

    /// Counts one proposed entry, the acquires it granted or refused and the
    /// overruns it recorded. `labels[i]` labels command `i` of the entry.
    pub fn proposed(&self, labels: &[CommandLabels], outcomes: &[Outcome]) {
        self.proposals.fetch_add(1, Relaxed);
        #[allow(clippy::cast_precision_loss)]
        self.batch_commands.observe(outcomes.len() as f64);
        let mut granted: BTreeMap<&str, u64> = BTreeMap::new();
        let mut denied: BTreeMap<(&'static str, &str), u64> = BTreeMap::new();
        let mut overrun: BTreeMap<&str, u64> = BTreeMap::new();
        for (labels, outcome) in labels.iter().zip(outcomes) {
            if let Err(ration_core::LedgerError::PrincipalLimit { what, .. }) = outcome {
                if let Some(i) = Held::ALL.iter().position(|h| h.phrase() == *what) {
                    self.principal_limit_refusals[i].fetch_add(1, Relaxed);
                }
            }
            if let Ok(Reply::OverrunRecorded { recorded, .. }) = outcome {
                self.overruns.fetch_add(1, Relaxed);
                if let CommandLabels::Overrun { unit } = labels {
                    let n = overrun.entry(unit).or_insert(0);
                    *n = n.saturating_add(*recorded);
                }
            }
            let CommandLabels::Acquire { unit, top: budget } = labels else { continue };
            match outcome {
                Ok(Reply::Granted(g)) => {
                    self.grants.fetch_add(1, Relaxed);
                    let n = granted.entry(unit).or_insert(0);
                    *n = n.saturating_add(g.granted);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(k) = KINDS.iter().find(|k| **k == e.kind()) {
                        let n = denied.entry((kind_label(*k), budget)).or_insert(0);
                        *n = n.saturating_add(1);
                    }
                }
            }
        }
        if !granted.is_empty() {
            let mut units = self.granted_units.lock().unwrap_or_else(|p| p.into_inner());
            for (unit, n) in granted {
                bump(&mut units, unit.to_owned(), "other".to_owned(), n);
            }
        }
        if !overrun.is_empty() {
            let mut units = self.overrun_units.lock().unwrap_or_else(|p| p.into_inner());
            for (unit, n) in overrun {
                bump(&mut units, unit.to_owned(), "other".to_owned(), n);
            }
        }
        if !denied.is_empty() {
            let mut denials = self.denials.lock().unwrap_or_else(|p| p.into_inner());
            for ((reason, budget), n) in denied {
                let other = (reason, "other".to_owned());
                bump(&mut denials, (reason, budget.to_owned()), other, n);
            }
        }
    }

    /// Records how long one RPC took to answer, by its gRPC method path and status
    /// code (a number, as in `grpc-status`).
    pub fn rpc(&self, method: &str, code: i32, took: Duration) {
        self.rpc_histogram(method, code_name(code)).observe(took.as_secs_f64());
    }

    /// The latency histogram of a (method, code): a read lock and no allocation
    /// once the pair has been seen.
    fn rpc_histogram(&self, method: &str, code: &'static str) -> Arc<Histogram> {
        if let Some(h) = self
            .rpcs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(method)
            .and_then(|codes| codes.get(code))
        {
            return h.clone();
        }
        let mut rpcs = self.rpcs.write().unwrap_or_else(|p| p.into_inner());
        let pairs: usize = rpcs.values().map(BTreeMap::len).sum();
        let known = rpcs.get(method).is_some_and(|codes| codes.contains_key(code));
        let (method, code) =
            if known || pairs < MAX_METHODS { (method, code) } else { ("other", "other") };
        rpcs.entry(method.to_owned())
            .or_default()
            .entry(code)
            .or_insert_with(|| Arc::new(Histogram::new(LATENCY_BOUNDS, 1e6)))
            .clone()
    }
}

/// Escapes a label value.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// The whole exposition text for `node`.
pub fn render(node: &Node) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let visibility;
    let m = node.raft.metrics().borrow().clone();
    let (applied, budgets, leases, budget_views, total_budgets, ledger_now_ms, holds) = {
        let state = node.reader.state();
        let views: Vec<(ration_core::BudgetView, Vec<ration_core::ledger::Forecast>)> =
            if m.state == ServerState::Leader {
                state
                    .ledger
                    .budgets(None, None, MAX_BUDGET_SERIES)
                    .into_iter()
                    .map(|v| {
                        let f = state.ledger.forecast(&v.path).unwrap_or_default();
                        (v, f)
                    })
                    .collect()
            } else {
                Vec::new()
            };
        visibility = state.ledger.visibility_totals();
        (
            state.last_applied.map_or(0, |l| l.index),
            state.ledger.budget_count(),
            state.ledger.live_lease_count(),
            views,
            state.ledger.budget_count(),
            state.ledger.now_ms(),
            state.ledger.holds(),
        )
    };
    let commit = crate::commit_index(&m).unwrap_or(applied).max(applied);

    header(&mut out, "ration_node_info", "gauge", "This node's id and address.");
    let _ = writeln!(
        out,
        "ration_node_info{{node_id=\"{}\",addr=\"{}\"}} 1",
        node.id,
        label(&node.addr)
    );
    header(&mut out, "ration_build_info", "gauge", "The rationd build: its version.");
    let _ = writeln!(out, "ration_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    gauge(&mut out, "ration_raft_term", "Current Raft term.", m.current_term);
    gauge(
        &mut out,
        "ration_raft_is_leader",
        "1 if this node leads.",
        u8::from(m.state == ServerState::Leader),
    );
    gauge(
        &mut out,
        "ration_raft_leader_id",
        "The leader this node knows of (0: none).",
        m.current_leader.unwrap_or(0),
    );
    header(&mut out, "ration_raft_state", "gauge", "1 for this node's Raft role.");
    for (state, name) in [
        (ServerState::Leader, "leader"),
        (ServerState::Follower, "follower"),
        (ServerState::Candidate, "candidate"),
        (ServerState::Learner, "learner"),
        (ServerState::Shutdown, "shutdown"),
    ] {
        let _ =
            writeln!(out, "ration_raft_state{{state=\"{name}\"}} {}", u8::from(m.state == state));
    }
    gauge(
        &mut out,
        "ration_raft_last_log_index",
        "Last log index this node holds.",
        m.last_log_index.unwrap_or(0),
    );
    gauge(
        &mut out,
        "ration_raft_commit_index",
        "Highest index a quorum holds (the leader's view; elsewhere the applied index).",
        commit,
    );
    gauge(&mut out, "ration_raft_applied_index", "Last index applied to the ledger.", applied);
    gauge(
        &mut out,
        "ration_raft_apply_lag",
        "Entries committed (or held, on a follower) but not yet applied.",
        commit.max(m.last_log_index.unwrap_or(0)).saturating_sub(applied),
    );
    gauge(
        &mut out,
        "ration_raft_voters",
        "Voters in the current membership.",
        m.membership_config.membership().voter_ids().count(),
    );
    // Heartbeat round trips (the leader's view): what voter_rtt_ms should cover.
    header(
        &mut out,
        "ration_peer_heartbeat_rtt_seconds",
        "gauge",
        "Last heartbeat round trip to each follower, measured while this node led.",
    );
    let rtts = node.channels.heartbeat_rtt.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (peer, rtt) in rtts {
        let _ = writeln!(
            out,
            "ration_peer_heartbeat_rtt_seconds{{peer=\"{peer}\"}} {}",
            rtt.as_secs_f64()
        );
    }
    // The snapshot: how far behind the log it is, and how old. Snapshots are taken
    // every `snapshot_after_entries` entries; a node whose snapshot falls far
    // behind keeps a growing log and replays it all on restart.
    let snapshot_index = m.snapshot.map_or(0, |s| s.index);
    gauge(
        &mut out,
        "ration_snapshot_last_index",
        "Last log index the node's current snapshot covers (0: none yet).",
        snapshot_index,
    );
    gauge(
        &mut out,
        "ration_snapshot_entries_behind",
        "Log entries applied since the current snapshot.",
        applied.saturating_sub(snapshot_index),
    );
    let written = ration_store::backup::current_snapshot_written_at(&node.config.data_dir)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    gauge(
        &mut out,
        "ration_snapshot_timestamp_seconds",
        "When the current snapshot was written (built, installed or restored), Unix time; 0: none yet.",
        written,
    );
    gauge(&mut out, "ration_budgets", "Budgets in the ledger.", budgets);
    gauge(&mut out, "ration_live_leases", "Live leases in the ledger.", leases);
    let (frozen, halted, halted_total) = holds;
    gauge(
        &mut out,
        "ration_budgets_frozen",
        "Budgets an operator froze (they grant nothing, nor does any budget below them).",
        frozen,
    );
    gauge(
        &mut out,
        "ration_runs_halted",
        "Runs their runaway guard halted that are still halted (alert on any increase of ration_runs_halted_total).",
        halted,
    );
    header(
        &mut out,
        "ration_runs_halted_total",
        "counter",
        "Runs halted by their runaway guard since the ledger began (replicated: equal on every node).",
    );
    let _ = writeln!(out, "ration_runs_halted_total {halted_total}");
    let (crossings, shadow_refusals) = visibility;
    header(
        &mut out,
        "ration_thresholds_crossed_total",
        "counter",
        "Alert thresholds spend reached (threshold_crossed records) since the ledger began (replicated).",
    );
    let _ = writeln!(out, "ration_thresholds_crossed_total {crossings}");
    header(
        &mut out,
        "ration_shadow_refusals_total",
        "counter",
        "Acquires a shadow budget's caps would have refused, granted and recorded (replicated).",
    );
    let _ = writeln!(out, "ration_shadow_refusals_total {shadow_refusals}");
    header(
        &mut out,
        "ration_webhook_deliveries_total",
        "counter",
        "Webhook POSTs this node made as leader, by result (failed attempts are retried).",
    );
    let _ = writeln!(
        out,
        "ration_webhook_deliveries_total{{result=\"ok\"}} {}",
        node.metrics.webhook_delivered.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "ration_webhook_deliveries_total{{result=\"failed\"}} {}",
        node.metrics.webhook_failed.load(Relaxed)
    );
    gauge(
        &mut out,
        "ration_webhook_backlog_records",
        "Audit records after the webhook cursor, as this node last looked as leader.",
        node.metrics.webhook_backlog.load(Relaxed),
    );
    gauge(
        &mut out,
        "ration_audit_records",
        "Audit records this node holds.",
        ration_store::audit_len(&node.reader),
    );
    let (listed, missing, segment_bytes) = node.reader.audit.segment_counts();
    gauge(
        &mut out,
        "ration_audit_segments",
        "Sealed audit segments the current snapshot's manifest lists.",
        listed,
    );
    gauge(
        &mut out,
        "ration_audit_segments_missing",
        "Listed audit segments this node has not fetched from a peer yet.",
        missing,
    );
    gauge(
        &mut out,
        "ration_audit_segment_bytes",
        "Bytes of the audit segments this node holds.",
        segment_bytes,
    );

    let metrics = &node.metrics;
    header(
        &mut out,
        "ration_audit_segments_fetched_total",
        "counter",
        "Audit segments fetched from peers and checked.",
    );
    let _ = writeln!(
        out,
        "ration_audit_segments_fetched_total {}",
        metrics.audit_segments_fetched.load(Relaxed)
    );
    header(&mut out, "ration_grants_total", "counter", "Acquires granted by this node as leader.");
    let _ = writeln!(out, "ration_grants_total {}", metrics.grants.load(Relaxed));
    header(
        &mut out,
        "ration_granted_units_total",
        "counter",
        "Units granted by this node, by unit.",
    );
    for (unit, n) in metrics.granted_units.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "ration_granted_units_total{{unit=\"{}\"}} {n}", label(unit));
    }
    header(
        &mut out,
        "ration_overruns_total",
        "counter",
        "Overruns this node recorded as leader: calls that cost more than their gateway held.",
    );
    let _ = writeln!(out, "ration_overruns_total {}", metrics.overruns.load(Relaxed));
    header(
        &mut out,
        "ration_overrun_units_total",
        "counter",
        "Units of the overruns this node recorded as leader (counted as consumed), by unit.",
    );
    for (unit, n) in metrics.overrun_units.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "ration_overrun_units_total{{unit=\"{}\"}} {n}", label(unit));
    }
    gauge(
        &mut out,
        "ration_clock_skew_ms",
        "This node's wall clock minus its estimate of ledger time (ms).",
        metrics.clock_skew_ms.load(Relaxed),
    );
    header(
        &mut out,
        "ration_clock_step_downs_total",
        "counter",
        "Times this node handed leadership over because its wall clock was off the voters'.",
    );
    let _ =
        writeln!(out, "ration_clock_step_downs_total {}", metrics.clock_step_downs.load(Relaxed));
    header(
        &mut out,
        "ration_leader_placement_total",
        "counter",
        "Times this node asked for leadership because its leader_priority is higher than the leader's, by outcome.",
    );
    let _ = writeln!(
        out,
        "ration_leader_placement_total{{outcome=\"took\"}} {}",
        metrics.placement_transfers.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "ration_leader_placement_total{{outcome=\"failed\"}} {}",
        metrics.placement_failures.load(Relaxed)
    );
    header(
        &mut out,
        "ration_ledger_time_rebases_total",
        "counter",
        "Times ledger time caught up with a majority of the voters' clocks (after an outage).",
    );
    let _ = writeln!(
        out,
        "ration_ledger_time_rebases_total {}",
        metrics.ledger_time_rebases.load(Relaxed)
    );
    header(
        &mut out,
        "ration_principal_limit_refusals_total",
        "counter",
        "Requests refused by a per-principal limit (rationctl limits show), by limit, on this node as leader.",
    );
    for (limit, n) in Held::ALL.iter().zip(&metrics.principal_limit_refusals) {
        let _ = writeln!(
            out,
            "ration_principal_limit_refusals_total{{limit=\"{}\"}} {}",
            limit.name(),
            n.load(Relaxed)
        );
    }
    header(
        &mut out,
        "ration_denials_total",
        "counter",
        "Acquires refused by this node as leader, by reason and top-level budget.",
    );
    for ((reason, budget), n) in metrics.denials.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            out,
            "ration_denials_total{{reason=\"{reason}\",budget=\"{}\"}} {n}",
            label(budget)
        );
    }
    if let Some(wal) = &node.wal {
        header(&mut out, "ration_wal_syncs_total", "counter", "fdatasyncs of the Raft log.");
        let _ = writeln!(out, "ration_wal_syncs_total {}", wal.syncs.load(Relaxed));
        header(&mut out, "ration_wal_entries_total", "counter", "Raft entries made durable.");
        let _ = writeln!(out, "ration_wal_entries_total {}", wal.entries.load(Relaxed));
        header(&mut out, "ration_wal_bytes_total", "counter", "Bytes written to the Raft log.");
        let _ = writeln!(out, "ration_wal_bytes_total {}", wal.bytes.load(Relaxed));
    }
    header(
        &mut out,
        "ration_log_lines_suppressed_total",
        "counter",
        "Repeated warning and error log lines held back.",
    );
    let _ =
        writeln!(out, "ration_log_lines_suppressed_total {}", LOG_LINES_SUPPRESSED.load(Relaxed));
    header(&mut out, "ration_proposals_total", "counter", "Raft entries this node proposed.");
    let _ = writeln!(out, "ration_proposals_total {}", metrics.proposals.load(Relaxed));
    header(
        &mut out,
        "ration_proposal_batch_commands",
        "histogram",
        "Commands per proposed Raft entry (group commit).",
    );
    metrics.batch_commands.render(&mut out, "ration_proposal_batch_commands", "");
    header(
        &mut out,
        "ration_rpc_duration_seconds",
        "histogram",
        "Time to answer each gRPC call, by method and status code (from the response \
         headers: a streamed reply that fails after its first message counts as OK).",
    );
    let rpcs: Vec<(String, &'static str, Arc<Histogram>)> = {
        let rpcs = metrics.rpcs.read().unwrap_or_else(|p| p.into_inner());
        rpcs.iter()
            .flat_map(|(m, codes)| codes.iter().map(move |(c, h)| (m.clone(), *c, h.clone())))
            .collect()
    };
    for (method, code, h) in rpcs {
        h.render(
            &mut out,
            "ration_rpc_duration_seconds",
            &format!("method=\"{}\",code=\"{code}\"", label(&method)),
        );
    }

    // Per-budget series come from the leader only, so a sum over nodes counts each
    // budget once (every replica holds the same figures).
    if m.state != ServerState::Leader {
        return out;
    }
    gauge(
        &mut out,
        "ration_budget_series_truncated",
        "1 if there are more budgets than per-budget series (10000).",
        u8::from(total_budgets > budget_views.len()),
    );
    for (name, help) in [
        ("ration_budget_cap", "A limit's cap, in its unit (unit=\"usd_micros\": millionths of a US dollar, so value / 1e6 is dollars)."),
        ("ration_budget_consumed", "Consumed in the limit's current window, in its unit (usd_micros / 1e6 = dollars)."),
        ("ration_budget_outstanding", "Granted in live leases, not yet settled, in the limit's unit (usd_micros / 1e6 = dollars)."),
        ("ration_budget_remaining", "cap - consumed - outstanding (0 when over the cap), in the limit's unit (usd_micros / 1e6 = dollars)."),
        ("ration_budget_overruns", "Overruns counted in the limit's current window, in its unit (usd_micros / 1e6 = dollars)."),
        ("ration_budget_upcoming", "Granted in leases for the limit's next window, in its unit (usd_micros / 1e6 = dollars)."),
        (
            "ration_budget_window_end_timestamp_seconds",
            "When the limit's current window ends (Unix time; no series for lifetime limits).",
        ),
        (
            "ration_budget_window_remaining_seconds",
            "Ledger time left in the limit's current window (no series for lifetime or concurrent limits).",
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for (b, _) in &budget_views {
            for l in &b.limits {
                let lifetime = matches!(
                    l.spec.window.period(),
                    ration_core::Period::Lifetime | ration_core::Period::Concurrent
                );
                #[allow(clippy::cast_precision_loss)] // ms to seconds, for display
                let value = match name {
                    "ration_budget_cap" => l.spec.cap as f64,
                    "ration_budget_consumed" => l.consumed as f64,
                    "ration_budget_outstanding" => l.outstanding as f64,
                    "ration_budget_overruns" => l.overruns as f64,
                    "ration_budget_upcoming" => l.upcoming as f64,
                    _ if lifetime => continue,
                    "ration_budget_window_end_timestamp_seconds" => l.window_end_ms as f64 / 1000.0,
                    "ration_budget_window_remaining_seconds" => {
                        l.window_end_ms.saturating_sub(ledger_now_ms) as f64 / 1000.0
                    }
                    _ => l.remaining as f64,
                };
                let _ = writeln!(
                    out,
                    "{name}{{budget=\"{}\",unit=\"{}\",window=\"{}\"}} {value}",
                    label(b.path.as_str()),
                    label(l.spec.unit.as_str()),
                    l.spec.window
                );
            }
        }
    }
    for (name, help) in [
        (
            "ration_budget_burn_rate_per_second",
            "Spend per second in the limit over the last 60 to 120 s of ledger time (usd_micros / 1e6 = dollars).",
        ),
        (
            "ration_budget_exhaustion_seconds",
            "Seconds until spend reaches the limit's cap at the current burn rate (no series when the window ends first or nothing is spent); 0: reached.",
        ),
        (
            "ration_budget_threshold_reached_percent",
            "The highest alert threshold spend has reached in the limit's current window (no series: none).",
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for (b, forecasts) in &budget_views {
            for (l, f) in b.limits.iter().zip(forecasts) {
                #[allow(clippy::cast_precision_loss)] // ms to seconds, for display
                let value = match name {
                    "ration_budget_burn_rate_per_second" => f.rate_per_s,
                    "ration_budget_exhaustion_seconds" => match f.exhausts_at_ms {
                        Some(at) => at.saturating_sub(ledger_now_ms) as f64 / 1000.0,
                        None => continue,
                    },
                    _ => match l.threshold_reached_pct {
                        Some(p) => f64::from(p),
                        None => continue,
                    },
                };
                let _ = writeln!(
                    out,
                    "{name}{{budget=\"{}\",unit=\"{}\",window=\"{}\"}} {value}",
                    label(b.path.as_str()),
                    label(l.spec.unit.as_str()),
                    l.spec.window
                );
            }
        }
    }
    header(
        &mut out,
        "ration_budget_shadow_refusals_total",
        "counter",
        "Acquires a shadow budget's caps would have refused since it was made shadow (no series for other budgets).",
    );
    for (b, _) in &budget_views {
        if b.options.as_ref().is_some_and(|o| o.shadow) {
            let _ = writeln!(
                out,
                "ration_budget_shadow_refusals_total{{budget=\"{}\"}} {}",
                label(b.path.as_str()),
                b.shadow_refusals
            );
        }
    }
    out
}

/// Serves `GET /metrics` on `listener` (bound before Raft starts) until the node
/// stops. Returns the bound address.
/// Whether two secrets are equal, in time that does not depend on where they
/// differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

pub(crate) async fn serve(
    node: std::sync::Weak<Node>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let token = std::sync::Arc::new(token);
    let probe = |check: fn(&Node) -> Result<(), String>, node: std::sync::Weak<Node>| {
        move || {
            let node = node.clone();
            async move {
                let verdict = match node.upgrade() {
                    Some(node) => check(&node),
                    None => Err("the node stopped".to_owned()),
                };
                match verdict {
                    Ok(()) => (axum::http::StatusCode::OK, "ok\n".to_owned()),
                    Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                }
            }
        }
    };
    let app = axum::Router::new()
        .route("/livez", axum::routing::get(probe(Node::liveness, node.clone())))
        .route("/readyz", axum::routing::get(probe(Node::readiness, node.clone())))
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let node = node.clone();
                let token = token.clone();
                async move {
                    if let Some(want) = token.as_deref() {
                        let given = headers
                            .get(axum::http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .unwrap_or_default();
                        if !same_secret(given.as_bytes(), want.as_bytes()) {
                            return (
                                axum::http::StatusCode::UNAUTHORIZED,
                                [(axum::http::header::CONTENT_TYPE, "text/plain")],
                                "/metrics needs the token (Authorization: Bearer <token>, \
                                 metrics_token_file)\n"
                                    .to_owned(),
                            );
                        }
                    }
                    match node.upgrade() {
                        Some(node) => (
                            axum::http::StatusCode::OK,
                            [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            render(&node),
                        ),
                        None => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            "node stopped\n".to_owned(),
                        ),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!("metrics server: {e}");
        }
    });
    Ok(bound)
}

/// A tower layer timing every gRPC call into [`Metrics::rpc`].
#[derive(Clone, Debug)]
pub(crate) struct RpcTimer {
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for RpcTimer {
    type Service = Timed<S>;
    fn layer(&self, inner: S) -> Timed<S> {
        Timed { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Timed<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for Timed<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let metrics = self.metrics.clone();
        let method = req.uri().path().to_owned();
        let started = std::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let out = fut.await;
            // A refusal is a trailers-only reply: its status is in the headers. A
            // reply with a body ends with its status in the trailers (OK here).
            let code = match &out {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                Err(_) => 2,
            };
            metrics.rpc(&method, code, started.elapsed());
            out
        })
    }
}
