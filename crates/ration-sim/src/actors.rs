//! What runs on each simulated host: the nodes (and the supervisor that restarts
//! them), the operator, the gateways, the probe client and the liveness client;
//! and [`Shared`], what those hosts share with the harness.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Range, RangeInclusive};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ration_core::LedgerConfig;
use ration_proto::v1;
use ration_server::{Config, Node, NodeHandle, Storage};
use ration_store::mem::MemDisk;

use crate::faults::Fault;
use crate::report::{Report, Tracer};
use crate::{net, SimConfig};

pub(crate) const ROOT: &str = "org";
pub(crate) const LEAVES: [&str; 3] = ["org/a", "org/b", "org/c"];
pub(crate) const PROBE_BUDGET: &str = "org/probe";
/// The budget the liveness client acquires from after healing.
const LIVE_BUDGET: &str = "live";
pub(crate) const UNIT: &str = "tokens";
/// The second unit of priced calls (`SimConfig::extended`): one per call, capped per
/// minute on the root, so windows roll over during the run.
pub(crate) const CALLS: &str = "calls";
/// The root's cap of [`CALLS`] per minute.
const CALLS_PER_MINUTE: u64 = 150;
/// The root's emergency reserve per gateway (`static_allowance`, tokens), and the
/// leaves' when they declare one (drawn per leaf): a gateway holds the smallest
/// along its chain, and none if any limit on the chain fails closed.
const ROOT_STATIC_ALLOWANCE: u64 = 100;
const LEAF_STATIC_ALLOWANCE: RangeInclusive<u64> = 20..=60;
/// The chance that a leaf declares a static allowance (is fail-static).
const FAIL_STATIC_LEAF_PROBABILITY: f64 = 0.5;
/// The cap of [`LIVE_BUDGET`].
const LIVE_BUDGET_CAP_TOKENS: u64 = 1_000;

/// The largest offset of a node's clock (either way), and of any clock's drift, in
/// ppm: how far a node's clock may be from true time without a `clock_step` fault.
pub(crate) const NODE_CLOCK_MAX_OFFSET_MS: i64 = 150;
pub(crate) const CLOCK_MAX_DRIFT_PPM: i64 = 2000;
/// Each node's clock is off by this much (drawn per node).
const NODE_CLOCK_OFFSET_MS: RangeInclusive<i64> =
    -NODE_CLOCK_MAX_OFFSET_MS..=NODE_CLOCK_MAX_OFFSET_MS;
/// Each node's and gateway's clock drifts by this much (drawn per clock).
const CLOCK_DRIFT_PPM: RangeInclusive<i64> = -CLOCK_MAX_DRIFT_PPM..=CLOCK_MAX_DRIFT_PPM;
/// A disk's fsync takes this long (drawn per disk; network disks under load are
/// slow).
const FSYNC_TIME_US: Range<u64> = 5_000..40_000;
/// The deadline of every RPC, the nodes' own (`rpc_timeout_ms`) and the clients'.
pub(crate) const RPC_DEADLINE_MS: u64 = 700;
/// The deadline of a client's call to a node (the gateways', the probe's, the
/// operator's setup and the liveness client's).
pub(crate) const CLIENT_RPC_TIMEOUT: Duration = Duration::from_millis(RPC_DEADLINE_MS);

/// A node whose Raft core stopped is restarted this long after (drawn per stop).
const RESTART_DELAY_MS: Range<u64> = 500..3_000;

/// Clients wait for the budgets to exist, polling this often.
const LIVE_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The operator looks for queued commands this often.
const OPERATOR_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The deadline of the operator's status, transfer and membership calls.
const OPERATOR_RPC_TIMEOUT: Duration = Duration::from_millis(3000);
/// Creating each budget is tried this many times, through the voters in turn.
const SETUP_MAX_ATTEMPTS: usize = 400;
const SETUP_RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// A gateway's clock is ahead by this much (drawn per gateway).
const GATEWAY_CLOCK_OFFSET_MS: Range<u64> = 0..200;
/// A gateway's `CoarseClock` is set this often.
const GATEWAY_CLOCK_TICK: Duration = Duration::from_millis(10);
/// The gateways' SDK settings (`SdkConfig`).
const SDK_REFRESH_INTERVAL: Duration = Duration::from_millis(100);
const SDK_LEASE_TTL: Duration = Duration::from_secs(3);
/// The lease TTL of gateways on fail-static leaves. The SDK renews its emergency
/// reserve once half its validity is gone, and an outage is declared only after a
/// round got no answer and `SDK_OUTAGE_AFTER` passed: with 3 s leases the reserve
/// would always have passed its local deadline by then (1 s left at worst, against
/// at least 1.2 s to declare an outage), so it could never be spent.
const SDK_FAIL_STATIC_LEASE_TTL: Duration = Duration::from_secs(4);
const SDK_MARGIN: Duration = Duration::from_millis(500);
/// No answer from the cluster for this long is an outage (reserves become
/// spendable).
const SDK_OUTAGE_AFTER: Duration = Duration::from_millis(500);
const SDK_HORIZON: Duration = Duration::from_secs(1);
const SDK_INITIAL_REQUEST_UNITS: u64 = 20;
/// A pair nothing holds is forgotten after this long unused: a gateway's calls
/// pair (`CALLS`, reserved only by priced calls, with no handle held) is forgotten
/// and stocked again many times a run, under every fault.
const SDK_IDLE_AFTER: Duration = Duration::from_millis(50);
/// A gateway spends this many units at a time (drawn per spend) ...
const GATEWAY_SPEND_UNITS: RangeInclusive<u64> = 1..=8;
/// With `SimConfig::extended`, this share of calls are priced: they reserve tokens
/// and one call (`Sdk::reserve`), and settle their real cost, known only after the
/// call ...
const PRICED_CALL_PROBABILITY: f64 = 0.3;
/// ... which is above the reservation this often, up to this many times it (the
/// excess is taken from live leases, the rest reported as an overrun) ...
const COST_ABOVE_RESERVATION_PROBABILITY: f64 = 0.3;
const MAX_COST_FACTOR: u64 = 3;
/// ... and waits this long between spends (drawn per spend).
const GATEWAY_SPEND_GAP_MS: Range<u64> = 10..40;
/// A gateway that stopped spending looks for the harness's shutdown this often.
const GATEWAY_SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// The probe's leases live this long.
const PROBE_LEASE_TTL_MS: i64 = 2_000;
/// A probe request is tried this many times (through random nodes) before its
/// outcome is recorded as unknown.
const PROBE_MAX_ATTEMPTS: u32 = 8;
const PROBE_RETRY_INTERVAL: Duration = Duration::from_millis(150);
/// The probe waits this long between requests (drawn per request).
const PROBE_GAP_MS: Range<u64> = 10..80;

/// After healing, one grant must be served within this many attempts ...
const LIVENESS_MAX_ATTEMPTS: u64 = 200;
/// ... made this often.
const LIVENESS_RETRY_INTERVAL: Duration = Duration::from_millis(100);
const LIVENESS_LEASE_TTL_MS: i64 = 60_000;

/// What hosts share with the harness.
#[derive(Default)]
pub(crate) struct Shared {
    /// Simulated wall-clock time at the start of the run (ms since 1970): true time
    /// is this plus simulated elapsed time.
    pub(crate) epoch_ms: AtomicU64,
    pub(crate) nodes: Mutex<BTreeMap<u64, Arc<Node>>>,
    /// Ground truth: tokens the gateways admitted (real costs of priced calls, and
    /// spend from emergency reserves, included), in total and by leaf budget.
    pub(crate) admitted: AtomicU64,
    pub(crate) admitted_by_leaf: Mutex<BTreeMap<&'static str, u64>>,
    /// Priced calls admitted (one [`CALLS`] each).
    pub(crate) calls_admitted: AtomicU64,
    /// Pairs the gateways' SDKs forgot (idle, nothing holding them).
    pub(crate) sdk_forgotten: AtomicU64,
    /// Priced calls whose real cost was above their reservation, and by how much in
    /// all.
    pub(crate) settle_overruns: AtomicU64,
    pub(crate) settle_overrun_units: AtomicU64,
    /// Overrun units each gateway's SDK recorded (beyond what its leases held), by
    /// gateway, published once it has stopped spending.
    pub(crate) sdk_overruns: Mutex<BTreeMap<u64, u64>>,
    /// Gateways that have stopped spending (their ground truth is final). They keep
    /// running, so that what they still owe the ledger (releases, overruns) reaches it.
    pub(crate) gateways_done: AtomicU64,
    pub(crate) stop_spending: AtomicBool,
    /// Leader wall clocks stepped ahead so far (`clock_step` faults).
    pub(crate) forward_clock_steps: AtomicU64,
    /// The gateways drop their SDKs (set once the ledger agrees with them).
    pub(crate) shutdown: AtomicBool,
    /// What the ledger counted consumed on the gateways' leaves when it agreed with
    /// them (`checks::gateway_accounts`).
    pub(crate) ledger_consumed: AtomicU64,
    pub(crate) probe: Mutex<ProbeLog>,
    /// Operator commands for the operator host to carry out.
    pub(crate) ops: Mutex<Vec<Fault>>,
    pub(crate) live: AtomicBool,
    /// Nodes whose Raft core stopped on its own, with the reason, not yet seen by
    /// the supervisor.
    pub(crate) core_stops: Mutex<Vec<(u64, String)>>,
    /// Agents (`SimConfig::templates`): tokens the runaway run admitted; calls in
    /// flight on the slot run now, the most ever, and the calls that ended.
    pub(crate) run_admitted: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) most_in_flight: AtomicU64,
    pub(crate) slot_calls: AtomicU64,
}

/// The agents' budget (`SimConfig::templates`): a template makes each run.
pub(crate) const AGENTS: &str = "agents";
/// The run that calls in a tight loop, and the run whose calls hold slots.
pub(crate) const RUNAWAY_RUN: &str = "agents/runaway";
pub(crate) const SLOT_RUN: &str = "agents/slots";
/// Each run: this many tokens for life, and this many calls in flight.
pub(crate) const RUN_TOKENS: u64 = 3_000;
pub(crate) const RUN_IN_FLIGHT: u64 = 3;
/// The runaway guard: at most this many tokens per span of this length.
pub(crate) const RUN_GUARD_TOKENS: u64 = 400;
pub(crate) const RUN_GUARD_SPAN_MS: u64 = 5_000;
/// The unit of calls in flight, and how long a slot is taken for.
pub(crate) const IN_FLIGHT: &str = "inflight";
const SLOT_MAX_CALL: Duration = Duration::from_secs(2);
/// Callers taking slots on the slot run.
const SLOT_CALLERS: u64 = 8;

#[derive(Default, Debug)]
pub(crate) struct ProbeLog {
    /// request id -> lease id granted (acknowledged).
    pub(crate) granted: BTreeMap<u64, u64>,
    pub(crate) refused: u64,
    pub(crate) unknown: BTreeSet<u64>,
}

/// The running nodes, by id.
pub(crate) fn nodes(shared: &Shared) -> Vec<(u64, Arc<Node>)> {
    shared
        .nodes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, n)| (*id, n.clone()))
        .collect()
}

/// The running node that leads with the highest term, if any.
pub(crate) fn current_leader(shared: &Shared) -> Option<u64> {
    nodes(shared)
        .iter()
        .filter(|(_, n)| n.raft.metrics().borrow().state == ServerState::Leader)
        .max_by_key(|(_, n)| n.raft.metrics().borrow().current_term)
        .map(|(id, _)| *id)
}

pub(crate) fn host(id: u64) -> String {
    format!("n{id}")
}

pub(crate) fn addr(id: u64) -> String {
    format!("n{id}:{}", net::PORT)
}

/// A node's clock: simulated time, skewed and drifting. Its wall clock can be
/// stepped ([`SimClock::step`], a `clock_step` fault); its monotonic clock never is.
#[derive(Debug)]
pub(crate) struct SimClock {
    epoch_ms: u64,
    offset_ms: AtomicI64,
    drift_ppm: i64,
}

impl SimClock {
    pub(crate) fn new(epoch_ms: u64, offset_ms: i64, drift_ppm: i64) -> Self {
        Self { epoch_ms, offset_ms: AtomicI64::new(offset_ms), drift_ppm }
    }

    /// Steps the wall clock by `ms` (forward if positive); monotonic time is unchanged.
    pub(crate) fn step(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Relaxed);
    }
}

impl ration_server::Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default().as_millis() as i64;
        let t = self.epoch_ms as i64
            + elapsed
            + elapsed * self.drift_ppm / 1_000_000
            + self.offset_ms.load(Relaxed);
        t.max(0) as u64
    }

    /// Simulated time since the start, drifting like the wall clock (a monotonic
    /// clock runs at the same rate; it has no offset and never steps).
    fn mono_ms(&self) -> u64 {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default().as_millis() as i64;
        (elapsed + elapsed * self.drift_ppm / 1_000_000).max(0) as u64
    }
}

pub(crate) fn node_config(id: u64, voters: u64) -> Config {
    let mut cluster: Vec<String> = (1..=voters).map(|i| format!("{i}={}", addr(i))).collect();
    if id > voters {
        // The spare names itself too, but is not the lowest id: it waits to be added.
        cluster.push(format!("{id}={}", addr(id)));
    }
    Config {
        node_id: id,
        listen: "0.0.0.0:50051".parse().unwrap_or(Config::default().listen),
        advertise: Some(addr(id)),
        data_dir: "/nonexistent/simulated".into(),
        initial_cluster: cluster,
        tick_ms: 250,
        heartbeat_ms: 100,
        election_timeout_min_ms: 600,
        election_timeout_max_ms: 1200,
        // The lease and AppendEntries deadline these seeds were found with (before
        // both were derived from voter_rtt_ms): upstream's lease, 3/4 of the minimum
        // election timeout.
        leader_lease_ms: 1200,
        replication_timeout_ms: 450,
        rpc_timeout_ms: RPC_DEADLINE_MS,
        // Snapshots and log purges happen often, so catch-up by snapshot is exercised.
        snapshot_after_entries: 40,
        keep_log_after_snapshot: 10,
        metrics_listen: "off".into(),
        batch_wait_us: 2000,
        // The simulated network is plaintext (the issue allows it): say so, as a
        // node on a non-loopback address must.
        insecure: true,
        ..Config::default()
    }
}

/// The voters and the spare (id `cfg.nodes + 1`), each on its own disk, with a
/// clock skew and drift and an fsync time drawn from `rng` in id order. Returns
/// the disks and the clocks, by node id.
pub(crate) fn spawn_nodes(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    rng: &mut StdRng,
    shared: &Arc<Shared>,
) -> (BTreeMap<u64, MemDisk>, BTreeMap<u64, Arc<SimClock>>) {
    let epoch_ms = shared.epoch_ms.load(Relaxed);
    let mut disks = BTreeMap::new();
    let mut clocks = BTreeMap::new();
    let regions = cfg.regions.then(|| Regions::draw(cfg));
    for id in 1..=cfg.nodes + 1 {
        let disk = if cfg.wal { MemDisk::with_wal() } else { MemDisk::default() };
        disks.insert(id, disk.clone());
        let offset = rng.gen_range(NODE_CLOCK_OFFSET_MS);
        let clock = Arc::new(SimClock::new(epoch_ms, offset, rng.gen_range(CLOCK_DRIFT_PPM)));
        clocks.insert(id, clock.clone());
        let fsync = Duration::from_micros(rng.gen_range(FSYNC_TIME_US));
        let mut config = node_config(id, cfg.nodes);
        config.commit_heartbeat = cfg.commit_heartbeat;
        if let Some(layout) = &regions {
            layout.apply(&mut config);
        }
        spawn_node(sim, id, disk, fsync, clock, config, shared.clone());
    }
    if let Some(layout) = &regions {
        layout.install(sim);
    }
    (disks, clocks)
}

/// One-way latency between regions (ms) and its jitter, drawn per pair of nodes.
const REGION_LATENCY_MS: RangeInclusive<u64> = 30..=150;
const REGION_JITTER_MS: RangeInclusive<u64> = 0..=20;

/// Where the nodes are ([`SimConfig::regions`]): a latency per pair of nodes.
pub(crate) struct Regions {
    /// (a, b, one-way ms, jitter ms), a < b.
    links: Vec<(u64, u64, u64, u64)>,
}

impl Regions {
    /// Drawn from its own generator (seeded from the run's seed), so a seed's other
    /// draws are those it has without regions.
    pub(crate) fn draw(cfg: &SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5245_4749_4f4e_5321);
        let mut links = Vec::new();
        for a in 1..=cfg.nodes + 1 {
            for b in a + 1..=cfg.nodes + 1 {
                links.push((
                    a,
                    b,
                    rng.gen_range(REGION_LATENCY_MS),
                    rng.gen_range(REGION_JITTER_MS),
                ));
            }
        }
        Self { links }
    }

    /// The slowest round trip between two nodes, jitter included.
    pub(crate) fn max_rtt_ms(&self) -> u64 {
        self.links.iter().map(|(_, _, d, j)| 2 * (d + j)).max().unwrap_or(0)
    }

    /// Timings derived from the slowest round trip, as an operator would set them,
    /// and the production tick (1 s). The other seeds tick every 250 ms; across
    /// regions a follower learns that an entry committed up to a heartbeat and a
    /// one-way trip after the leader does (about 0.8 s at the slowest layout), so
    /// with an entry every 250 ms the replicas were never all at one index and the
    /// final comparison never came, while the cluster kept committing.
    fn apply(&self, config: &mut Config) {
        config.tick_ms = Config::default().tick_ms;
        config.voter_rtt_ms = self.max_rtt_ms();
        config.heartbeat_ms = 0;
        config.election_timeout_min_ms = 0;
        config.election_timeout_max_ms = 0;
        config.leader_lease_ms = 0;
        config.replication_timeout_ms = 0;
    }

    fn install(&self, sim: &mut turmoil::Sim<'_>) {
        for &(a, b, d, j) in &self.links {
            sim.set_link_latency(host(a), host(b), Duration::from_millis(d));
            sim.set_link_max_message_latency(host(a), host(b), Duration::from_millis(d + j));
        }
    }
}

/// Starts node `id` as a simulated host on `disk`. Like a process under a
/// supervisor: when its Raft core stops on its own, the host logs why, tells the
/// harness (`Shared::core_stops`) and ends; the harness restarts it from its disk
/// after a delay ([`Supervisor`]).
pub(crate) fn spawn_node(
    sim: &mut turmoil::Sim<'_>,
    id: u64,
    disk: MemDisk,
    fsync: Duration,
    clock: Arc<SimClock>,
    config: Config,
    shared: Arc<Shared>,
) {
    sim.host(host(id), move || {
        let disk = disk.clone();
        let config = config.clone();
        let clock = clock.clone();
        let shared = shared.clone();
        async move {
            // A disk with a write-ahead log runs the production log store on
            // simulated files; the others run the in-memory log store.
            let opened = match disk.open_wal(fsync, LedgerConfig::default()).await {
                Ok(opened) => opened,
                // Recovery writes (a new segment); on a failed disk it cannot, and
                // the process exits like rationd does, for its supervisor to retry.
                Err(e) => {
                    let reason = format!("storage did not open: {e}");
                    shared.core_stops.lock().unwrap_or_else(|p| p.into_inner()).push((id, reason));
                    return Ok(());
                }
            };
            if let Some((log, sm, identity)) = opened {
                let storage =
                    Storage { reader: sm.reader(), wal: Some(log.stats()), log, sm, identity };
                return run_host(id, storage, config, clock, shared).await;
            }
            let (log, sm, identity) = disk
                .open(fsync, LedgerConfig::default())
                .map_err(|e| format!("node {id} storage: {e}"))?;
            let storage = Storage { reader: sm.reader(), log, sm, identity, wal: None };
            run_host(id, storage, config, clock, shared).await
        }
    });
}

/// The life of one node's process on its host: serve until the Raft core stops.
async fn run_host<L>(
    id: u64,
    storage: Storage<L, ration_store::StateMachine>,
    config: Config,
    clock: Arc<SimClock>,
    shared: Arc<Shared>,
) -> turmoil::Result
where
    L: openraft::storage::RaftLogStorage<ration_store::TypeConfig>,
{
    let incoming = net::incoming().await?;
    let handle: NodeHandle = ration_server::start_with_storage(
        config,
        storage,
        ration_server::Ports::shared(incoming),
        |timeout| -> ration_server::network::ChannelMaker {
            Arc::new(move |a: &str| Ok(net::channel(a, timeout)))
        },
        clock,
        None,
    )
    .await
    .map_err(|e| format!("node {id} start: {e:#}"))?;
    shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).insert(id, handle.node.clone());
    // What `ration_server::supervise` does in rationd: a core that stopped ends the
    // process (here, the host) so that it is restarted.
    let stopped = handle.core_stopped().await;
    shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    shared.core_stops.lock().unwrap_or_else(|p| p.into_inner()).push((id, stopped.reason));
    Ok(())
}

/// Restarts hosts whose Raft core stopped, after a delay, as systemd or Kubernetes
/// would restart the process. Each restart is counted as a fault (`core_restart`).
#[derive(Default)]
pub(crate) struct Supervisor {
    /// (restart at, in simulated ms; node id)
    due: Vec<(u64, u64)>,
}

impl Supervisor {
    pub(crate) fn poll(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        shared: &Shared,
        rng: &mut StdRng,
        report: &mut Report,
        tracer: &mut Tracer,
    ) {
        let now = sim.elapsed().as_millis() as u64;
        let stops: Vec<(u64, String)> =
            std::mem::take(&mut *shared.core_stops.lock().unwrap_or_else(|p| p.into_inner()));
        for (id, reason) in stops {
            let delay = rng.gen_range(RESTART_DELAY_MS);
            tracer
                .event(now, format!("n{id}: Raft core stopped ({reason}); restart in {delay} ms"));
            report.core_stops.push(format!("n{id} at {now} ms: {reason}"));
            self.due.push((now + delay, id));
        }
        let mut i = 0;
        while i < self.due.len() {
            let (at, id) = self.due[i];
            if at > now {
                i += 1;
                continue;
            }
            self.due.swap_remove(i);
            // A crash fault may have restarted it already.
            if !sim.is_host_running(host(id)) {
                sim.bounce(host(id));
                *report.faults.entry("core_restart").or_default() += 1;
                tracer.event(now, format!("n{id}: restarted from its disk by the supervisor"));
            }
        }
    }
}

/// A request for one unit of `budget` (at least one), from `client` as `principal`.
pub(crate) fn acquire_one(
    client: &str,
    request_id: u64,
    principal: &str,
    budget: &str,
    ttl_ms: i64,
) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: Some(v1::RequestMeta {
            client_id: client.into(),
            request_id,
            principal: principal.into(),
            ..Default::default()
        }),
        budget: budget.into(),
        unit: UNIT.into(),
        wanted: 1,
        min: 1,
        ttl_ms,
        starts_at_ms: 0,
    }
}

/// The budget tree of a run (drawn from the seed with `SimConfig::extended`).
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// The root's lifetime cap in tokens.
    pub(crate) cap: u64,
    /// Fail-static budgets and priced calls with a per-minute limit
    /// (`SimConfig::extended`).
    pub(crate) extended: bool,
    /// Each leaf's static allowance in tokens, if it declares one (the root then
    /// declares [`ROOT_STATIC_ALLOWANCE`]), in the order of [`LEAVES`].
    pub(crate) leaf_static: [Option<u64>; LEAVES.len()],
    /// The leaves without a static allowance are made by a template on the root
    /// (`SimConfig::templates`).
    pub(crate) templated: bool,
}

impl Plan {
    /// Lifetime caps only, every budget failing closed: the tree before issue 12.
    pub(crate) fn plain(cap: u64) -> Self {
        Self { cap, extended: false, leaf_static: [None; LEAVES.len()], templated: false }
    }

    pub(crate) fn draw(cfg: &SimConfig, rng: &mut StdRng) -> Self {
        let mut plan = Self::plain(cfg.cap);
        plan.templated = cfg.templates;
        if cfg.extended {
            plan.extended = true;
            for s in &mut plan.leaf_static {
                *s = rng
                    .gen_bool(FAIL_STATIC_LEAF_PROBABILITY)
                    .then(|| rng.gen_range(LEAF_STATIC_ALLOWANCE));
            }
        }
        plan
    }

    /// Leaves whose gateways hold an emergency reserve.
    pub(crate) fn fail_static_leaves(&self) -> u64 {
        self.leaf_static.iter().filter(|s| s.is_some()).count() as u64
    }

    /// The SDK lease TTL of the gateways on `leaf`.
    fn lease_ttl(&self, leaf: &str) -> Duration {
        let i = LEAVES.iter().position(|l| *l == leaf).unwrap_or(0);
        if self.leaf_static[i].is_some() {
            SDK_FAIL_STATIC_LEASE_TTL
        } else {
            SDK_LEASE_TTL
        }
    }

    /// The longest SDK lease TTL of any gateway: once this long has passed since the
    /// gateways stopped spending, every lease they spent from has passed its local
    /// deadline and (the cluster answering) been released.
    pub(crate) fn longest_lease_ttl(&self) -> Duration {
        LEAVES.iter().map(|l| self.lease_ttl(l)).max().unwrap_or(SDK_LEASE_TTL)
    }

    /// The leaves the root's template makes.
    pub(crate) fn templated_leaves(&self) -> Vec<&'static str> {
        LEAVES
            .iter()
            .zip(self.leaf_static)
            .filter(|(_, s)| self.templated && s.is_none())
            .map(|(l, _)| *l)
            .collect()
    }

    /// The root's template, if the plan has one: each leaf it makes gets what a
    /// created leaf failing closed gets.
    fn template(&self) -> Option<v1::SetTemplateRequest> {
        let limit = v1::Limit {
            unit: UNIT.into(),
            cap: (self.cap / 2) as i64,
            window: Some(v1::Window { period: v1::Period::Lifetime as i32, offset_minutes: 0 }),
            static_allowance: None,
        };
        self.templated.then(|| v1::SetTemplateRequest {
            meta: None,
            parent: ROOT.into(),
            limits: vec![limit],
            max_instances: LEAVES.len() as u64,
            idle_ms: 0,
            max_duration_ms: 0,
            guards: Vec::new(),
        })
    }

    /// Each budget to create, with its limits, parents first.
    fn budgets(&self) -> Vec<(String, Vec<v1::Limit>)> {
        let limit =
            |unit: &str, cap: u64, period: v1::Period, static_allowance: Option<u64>| v1::Limit {
                unit: unit.into(),
                cap: cap as i64,
                window: Some(v1::Window { period: period as i32, offset_minutes: 0 }),
                static_allowance: static_allowance.map(|a| a as i64),
            };
        let lifetime = v1::Period::Lifetime;
        let mut root = vec![limit(
            UNIT,
            self.cap,
            lifetime,
            self.extended.then_some(ROOT_STATIC_ALLOWANCE.min(self.cap)),
        )];
        if self.extended {
            root.push(limit(CALLS, CALLS_PER_MINUTE, v1::Period::Minute, None));
        }
        let mut budgets = vec![
            (ROOT.to_owned(), root),
            (LIVE_BUDGET.to_owned(), vec![limit(UNIT, LIVE_BUDGET_CAP_TOKENS, lifetime, None)]),
        ];
        for (leaf, static_allowance) in LEAVES.iter().zip(self.leaf_static) {
            if self.templated && static_allowance.is_none() {
                continue; // made by the root's template
            }
            // The leaves together may spend more than the root: the root binds.
            let cap = self.cap / 2;
            let static_allowance = static_allowance.map(|a| a.min(cap));
            budgets.push(((*leaf).to_owned(), vec![limit(UNIT, cap, lifetime, static_allowance)]));
        }
        budgets.push((PROBE_BUDGET.to_owned(), vec![limit(UNIT, self.cap / 10, lifetime, None)]));
        if self.templated {
            budgets.push((AGENTS.to_owned(), vec![limit(UNIT, 4 * RUN_TOKENS, lifetime, None)]));
        }
        budgets
    }

    /// The agents' run template (`SimConfig::templates`): a lifetime token cap,
    /// calls in flight, and a runaway guard.
    fn run_template(&self) -> Option<v1::SetTemplateRequest> {
        let limit = |unit: &str, cap: u64, period: v1::Period| v1::Limit {
            unit: unit.into(),
            cap: cap as i64,
            window: Some(v1::Window { period: period as i32, offset_minutes: 0 }),
            static_allowance: None,
        };
        self.templated.then(|| v1::SetTemplateRequest {
            meta: None,
            parent: AGENTS.into(),
            limits: vec![
                limit(UNIT, RUN_TOKENS, v1::Period::Lifetime),
                limit(IN_FLIGHT, RUN_IN_FLIGHT, v1::Period::Concurrent),
            ],
            max_instances: 10,
            idle_ms: 0,
            max_duration_ms: 0,
            guards: vec![v1::Guard {
                unit: UNIT.into(),
                max: RUN_GUARD_TOKENS as i64,
                per_ms: RUN_GUARD_SPAN_MS,
            }],
        })
    }
}

/// The operator: creates the budgets, then carries out transfers and membership
/// changes the harness queues (`Shared::ops`).
pub(crate) fn spawn_operator(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    plan: &Plan,
    shared: &Arc<Shared>,
    voters: &[String],
) {
    let shared = shared.clone();
    let endpoints = voters.to_vec();
    let plan = plan.clone();
    let spare = cfg.nodes + 1;
    sim.client("operator", async move {
        setup_budgets(&endpoints, &plan).await?;
        shared.live.store(true, Relaxed);
        loop {
            let next = shared.ops.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match next {
                Some(op) => operate(&endpoints, spare, op).await,
                None if shared.stop_spending.load(Relaxed) => return Ok(()),
                None => tokio::time::sleep(OPERATOR_POLL_INTERVAL).await,
            }
        }
    });
}

/// The host name of gateway `g`.
pub(crate) fn gateway_host(g: u64) -> String {
    format!("g{g}")
}

/// The leaf budget gateway `g` spends from.
pub(crate) fn gateway_leaf(g: u64) -> &'static str {
    LEAVES[(g as usize) % LEAVES.len()]
}

/// Gateway `g`: the real SDK, with its own skewed, drifting clock (drawn from
/// `rng`), spending from one leaf until told to stop, counting what it admitted
/// (the ground truth). With `plan.extended`, some calls are priced: they reserve
/// tokens and a call, and settle a real cost that may be above the reservation.
/// After it stops spending the SDK keeps running, so that every release and
/// overrun it still owes reaches the ledger.
pub(crate) fn spawn_gateway(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    plan: &Plan,
    g: u64,
    rng: &mut StdRng,
    shared: &Arc<Shared>,
    voters: &[String],
) {
    let shared = shared.clone();
    let endpoints = voters.to_vec();
    let leaf = gateway_leaf(g);
    let priced = plan.extended;
    let lease_ttl = plan.lease_ttl(leaf);
    let offset = rng.gen_range(GATEWAY_CLOCK_OFFSET_MS);
    let drift_ppm = rng.gen_range(CLOCK_DRIFT_PPM);
    let mut grng = StdRng::seed_from_u64(cfg.seed.wrapping_add(g).wrapping_mul(0x9e37_79b9));
    sim.client(gateway_host(g), async move {
        while !shared.live.load(Relaxed) {
            tokio::time::sleep(LIVE_POLL_INTERVAL).await;
        }
        let clock = ration_client::CoarseClock::new();
        let ticking = clock.clone();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            loop {
                let e = started.elapsed().as_millis() as i64;
                ticking.set_ms((offset as i64 + e + e * drift_ppm / 1_000_000).max(0) as u64);
                tokio::time::sleep(GATEWAY_CLOCK_TICK).await;
            }
        });
        let config = sdk_config(endpoints, &format!("gw-{g}"), lease_ttl);
        let sdk = ration_client::Sdk::start(config, clock).map_err(|e| e.to_string())?;
        let handle = sdk.handle(leaf, UNIT);
        let admit = |units: u64| {
            shared.admitted.fetch_add(units, Relaxed);
            *shared
                .admitted_by_leaf
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(leaf)
                .or_default() += units;
        };
        while !shared.stop_spending.load(Relaxed) {
            let want = grng.gen_range(GATEWAY_SPEND_UNITS);
            if priced && grng.gen_bool(PRICED_CALL_PROBABILITY) {
                // Reserved, called, and settled at once (nothing can retire a lease
                // in between: the SDK's refill task runs on this host's runtime).
                if let Some(r) = sdk.reserve(&[(leaf, UNIT, want), (leaf, CALLS, 1)]) {
                    let cost = if grng.gen_bool(COST_ABOVE_RESERVATION_PROBABILITY) {
                        grng.gen_range(want + 1..=want * MAX_COST_FACTOR)
                    } else {
                        grng.gen_range(1..=want)
                    };
                    r.settle(&[cost, 1]);
                    admit(cost);
                    shared.calls_admitted.fetch_add(1, Relaxed);
                    if cost > want {
                        shared.settle_overruns.fetch_add(1, Relaxed);
                        shared.settle_overrun_units.fetch_add(cost - want, Relaxed);
                    }
                }
            } else if handle.try_spend(want) {
                admit(want);
            }
            tokio::time::sleep(Duration::from_millis(grng.gen_range(GATEWAY_SPEND_GAP_MS))).await;
        }
        shared
            .sdk_overruns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(g, sdk.gateway_overruns(leaf, UNIT));
        shared.sdk_forgotten.fetch_add(sdk.forgotten(), Relaxed);
        shared.gateways_done.fetch_add(1, Relaxed);
        // The SDK keeps refilling and releasing until the harness has seen the ledger
        // agree with the gateways.
        while !shared.shutdown.load(Relaxed) {
            tokio::time::sleep(GATEWAY_SHUTDOWN_POLL).await;
        }
        drop(sdk);
        Ok(())
    });
}

/// The simulation's SDK settings, for principal and client id `name`.
fn sdk_config(endpoints: Vec<String>, name: &str, lease_ttl: Duration) -> ration_client::SdkConfig {
    let mut config = ration_client::SdkConfig::new(endpoints, name);
    config.cluster.connector =
        Some(ration_client::Connector(Arc::new(|a: &str| net::channel(a, CLIENT_RPC_TIMEOUT))));
    config.cluster.client_id = Some(name.to_owned());
    config.cluster.rpc_timeout = CLIENT_RPC_TIMEOUT;
    config.refresh = SDK_REFRESH_INTERVAL;
    config.lease_ttl = lease_ttl;
    config.margin = SDK_MARGIN;
    config.outage_after = SDK_OUTAGE_AFTER;
    config.horizon = SDK_HORIZON;
    config.initial_request = SDK_INITIAL_REQUEST_UNITS;
    config.idle_after = SDK_IDLE_AFTER;
    config
}

/// The agents (`SimConfig::templates`): one SDK spending on a run in a tight loop
/// (its guard must halt it), and callers holding one slot per call on another run
/// (at most [`RUN_IN_FLIGHT`] calls in flight, whatever the faults).
pub(crate) fn spawn_agents(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    shared: &Arc<Shared>,
    voters: &[String],
) {
    let shared = shared.clone();
    let endpoints = voters.to_vec();
    let mut arng = StdRng::seed_from_u64(cfg.seed ^ 0xa9e7);
    sim.client("agents", async move {
        while !shared.live.load(Relaxed) {
            tokio::time::sleep(LIVE_POLL_INTERVAL).await;
        }
        let clock = ration_client::CoarseClock::new();
        let ticking = clock.clone();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            loop {
                ticking.set_ms(started.elapsed().as_millis() as u64);
                tokio::time::sleep(GATEWAY_CLOCK_TICK).await;
            }
        });
        let config = sdk_config(endpoints, "agents", SDK_LEASE_TTL);
        let sdk = ration_client::Sdk::start(config, clock).map_err(|e| e.to_string())?;
        let callers: Vec<_> = (0..SLOT_CALLERS)
            .map(|i| {
                let (sdk, shared) = (sdk.clone(), shared.clone());
                let mut crng = StdRng::seed_from_u64(arng.gen::<u64>() ^ i);
                tokio::spawn(async move {
                    while !shared.stop_spending.load(Relaxed) {
                        match sdk.slot(SLOT_RUN, IN_FLIGHT, SLOT_MAX_CALL).await {
                            Ok(slot) => {
                                let now = shared.in_flight.fetch_add(1, Relaxed) + 1;
                                shared.most_in_flight.fetch_max(now, Relaxed);
                                let call = crng.gen_range(20..200);
                                tokio::time::sleep(Duration::from_millis(call)).await;
                                shared.in_flight.fetch_sub(1, Relaxed);
                                if slot.end(1).await.is_ok() {
                                    shared.slot_calls.fetch_add(1, Relaxed);
                                }
                            }
                            Err(_) => {
                                let pause = crng.gen_range(50..150);
                                tokio::time::sleep(Duration::from_millis(pause)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        let handle = sdk.handle(RUNAWAY_RUN, UNIT);
        while !shared.stop_spending.load(Relaxed) {
            if handle.try_spend(5) {
                shared.run_admitted.fetch_add(5, Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for c in callers {
            let _ = c.await;
        }
        while !shared.shutdown.load(Relaxed) {
            tokio::time::sleep(GATEWAY_SHUTDOWN_POLL).await;
        }
        drop(sdk);
        Ok(())
    });
}

/// The probe: single requests through random nodes, retried with the same request
/// id through others until answered; an unanswered one stays unknown
/// (`Shared::probe`).
pub(crate) fn spawn_probe(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    shared: &Arc<Shared>,
    voters: &[String],
) {
    let shared = shared.clone();
    let endpoints = voters.to_vec();
    let mut prng = StdRng::seed_from_u64(cfg.seed ^ 0xbeef);
    sim.client("probe", async move {
        while !shared.live.load(Relaxed) {
            tokio::time::sleep(LIVE_POLL_INTERVAL).await;
        }
        let mut request_id = 0u64;
        while !shared.stop_spending.load(Relaxed) {
            request_id += 1;
            let req = acquire_one(
                "probe",
                request_id,
                &format!("probe-{request_id}"),
                PROBE_BUDGET,
                PROBE_LEASE_TTL_MS,
            );
            let mut answered = false;
            if prng.gen_bool(0.2) {
                // A duplicate of the same request to another node, unawaited: the
                // ledger must execute it once whichever copy lands first.
                let at = endpoints[prng.gen_range(0..endpoints.len())].clone();
                let dup = req.clone();
                tokio::spawn(async move {
                    let mut c =
                        v1::ledger_client::LedgerClient::new(net::channel(&at, CLIENT_RPC_TIMEOUT));
                    let _ = c.acquire(dup).await;
                });
            }
            for _attempt in 0..PROBE_MAX_ATTEMPTS {
                let at = &endpoints[prng.gen_range(0..endpoints.len())];
                let mut client =
                    v1::ledger_client::LedgerClient::new(net::channel(at, CLIENT_RPC_TIMEOUT));
                match client.acquire(req.clone()).await {
                    Ok(lease) => {
                        let mut log = shared.probe.lock().unwrap_or_else(|p| p.into_inner());
                        log.granted.insert(request_id, lease.into_inner().lease_id);
                        answered = true;
                        break;
                    }
                    // Refused by the ledger: an answer. (An overloaded node answers
                    // UNAVAILABLE, `rpc::is_overloaded`, and is retried.)
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        shared.probe.lock().unwrap_or_else(|p| p.into_inner()).refused += 1;
                        answered = true;
                        break;
                    }
                    Err(_) => tokio::time::sleep(PROBE_RETRY_INTERVAL).await,
                }
            }
            if !answered {
                shared.probe.lock().unwrap_or_else(|p| p.into_inner()).unknown.insert(request_id);
            }
            tokio::time::sleep(Duration::from_millis(prng.gen_range(PROBE_GAP_MS))).await;
        }
        Ok(())
    });
}

/// After healing: one grant served, retried through any node. The flag returned
/// is set once it was.
pub(crate) fn spawn_liveness(sim: &mut turmoil::Sim<'_>, voters: &[String]) -> Arc<AtomicBool> {
    let live_ok = Arc::new(AtomicBool::new(false));
    let endpoints = voters.to_vec();
    let done = live_ok.clone();
    sim.client("liveness", async move {
        for attempt in 0..LIVENESS_MAX_ATTEMPTS {
            let at = &endpoints[(attempt as usize) % endpoints.len()];
            let mut c = v1::ledger_client::LedgerClient::new(net::channel(at, CLIENT_RPC_TIMEOUT));
            let r = c
                .acquire(acquire_one("liveness", 1, "liveness", LIVE_BUDGET, LIVENESS_LEASE_TTL_MS))
                .await;
            if r.is_ok() {
                done.store(true, Relaxed);
                return Ok(());
            }
            tokio::time::sleep(LIVENESS_RETRY_INTERVAL).await;
        }
        Err("no grant was served after healing".into())
    });
    live_ok
}

/// Creates the budget tree of `plan`: the root, leaves whose caps add up to more
/// (so the root binds), the probe's budget and the liveness budget.
pub(crate) async fn setup_budgets(
    endpoints: &[String],
    plan: &Plan,
) -> Result<(), Box<dyn std::error::Error>> {
    let meta = |request_id: u64| {
        Some(v1::RequestMeta {
            client_id: "operator".into(),
            request_id,
            principal: "operator".into(),
            ..Default::default()
        })
    };
    for (i, (path, limits)) in plan.budgets().into_iter().enumerate() {
        // The template goes on the root before any leaf could be asked for.
        if i == 1 {
            if let Some(mut t) = plan.template() {
                t.meta = meta(1_000);
                let mut done = false;
                for attempt in 0..SETUP_MAX_ATTEMPTS {
                    let at = &endpoints[attempt % endpoints.len()];
                    let mut c =
                        v1::ledger_client::LedgerClient::new(net::channel(at, CLIENT_RPC_TIMEOUT));
                    if c.set_template(t.clone()).await.is_ok() {
                        done = true;
                        break;
                    }
                    tokio::time::sleep(SETUP_RETRY_INTERVAL).await;
                }
                if !done {
                    return Err("could not set the root's template".into());
                }
            }
        }
        let req = v1::CreateBudgetRequest {
            meta: Some(v1::RequestMeta {
                client_id: "operator".into(),
                request_id: i as u64 + 1,
                principal: "operator".into(),
                ..Default::default()
            }),
            path,
            limits,
        };
        let mut done = false;
        for attempt in 0..SETUP_MAX_ATTEMPTS {
            let at = &endpoints[attempt % endpoints.len()];
            let mut c = v1::ledger_client::LedgerClient::new(net::channel(at, CLIENT_RPC_TIMEOUT));
            match c.create_budget(req.clone()).await {
                Ok(_) => {
                    done = true;
                    break;
                }
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    done = true;
                    break;
                }
                Err(_) => tokio::time::sleep(SETUP_RETRY_INTERVAL).await,
            }
        }
        if !done {
            return Err("could not create the budgets".into());
        }
    }
    if let Some(mut t) = plan.run_template() {
        t.meta = meta(1_001);
        for attempt in 0..SETUP_MAX_ATTEMPTS {
            let at = &endpoints[attempt % endpoints.len()];
            let mut c = v1::ledger_client::LedgerClient::new(net::channel(at, CLIENT_RPC_TIMEOUT));
            if c.set_template(t.clone()).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(SETUP_RETRY_INTERVAL).await;
        }
        return Err("could not set the agents' template".into());
    }
    Ok(())
}

/// Carries out an operator fault from the operator host (errors are expected under
/// faults and ignored: the operation may or may not take effect).
async fn operate(endpoints: &[String], spare: u64, op: Fault) {
    let timeout = OPERATOR_RPC_TIMEOUT;
    let mut status = None;
    for at in endpoints {
        let mut c = v1::cluster_client::ClusterClient::new(net::channel(at, timeout));
        if let Ok(s) = c.status(v1::StatusRequest { digest: false }).await {
            // Which node leads, from its status reply.
            if ration_proto::rpc::is_leader(s.get_ref()) {
                status = Some((at.clone(), s.into_inner()));
                break;
            }
        }
    }
    let Some((leader_addr, status)) = status else { return };
    let mut c = v1::cluster_client::ClusterClient::new(net::channel(&leader_addr, timeout));
    match op {
        Fault::TransferLeader => {
            if let Some(to) = status
                .members
                .iter()
                .filter(|m| m.voter && Some(m.id) != status.leader)
                .map(|m| m.id)
                .next()
            {
                let _ = c.transfer_leader(v1::TransferLeaderRequest { to }).await;
            }
        }
        Fault::AddSpare => {
            if status.members.iter().any(|m| m.id == spare) {
                return;
            }
            if c.add_learner(v1::AddLearnerRequest { id: spare, addr: addr(spare) }).await.is_ok() {
                let mut voters: Vec<u64> =
                    status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
                voters.push(spare);
                let _ = c
                    .change_membership(v1::ChangeMembershipRequest {
                        voters,
                        retain: false,
                        remove: vec![],
                    })
                    .await;
            }
        }
        Fault::RemoveSpare if status.members.iter().any(|m| m.id == spare) => {
            let _ = c
                .change_membership(v1::ChangeMembershipRequest {
                    voters: vec![],
                    retain: false,
                    remove: vec![spare],
                })
                .await;
        }
        _ => {}
    }
}
