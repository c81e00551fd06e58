//! # ration-sim
//!
//! A deterministic simulation of a Ration cluster: the production services,
//! proposer, openraft and gateway SDK run unchanged on turmoil's simulated hosts,
//! network and time; disks are `ration_store::mem` stores whose unflushed writes
//! die with a crash. One seed drives everything: the fault schedule, clock skews,
//! message latencies, openraft's election timeouts and tokio's scheduling choices.
//!
//! A run: 3 (or 5) nodes and a spare, gateways spending a budget tree through the
//! SDK, a probe client retrying requests through random nodes, and an operator
//! moving leadership and changing membership, under a seeded schedule of faults.
//! Invariants are checked while it runs and after the faults are healed; a
//! failure names the seed and the command that replays it.

pub mod net;
pub mod scenario;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use openraft::{LogId, ServerState, Vote};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ration_core::audit::{verify_chain, AuditKind, ChainHead};
use ration_core::LedgerConfig;
use ration_proto::v1;
use ration_server::{Config, Node, NodeHandle, Storage};
use ration_store::mem::MemDisk;

/// The simulation's wall clock starts here (2025-11-28T00:00:00Z), so runs are
/// reproducible to the millisecond.
const EPOCH_MS: u64 = 1_764_288_000_000;
const ROOT: &str = "org";
const LEAVES: [&str; 3] = ["org/a", "org/b", "org/c"];
const PROBE_BUDGET: &str = "org/probe";
const UNIT: &str = "tokens";

/// What one run does.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Voters at the start: 3 or 5 (a spare node joins and leaves during the run).
    pub nodes: u64,
    pub gateways: u64,
    /// How long faults are injected, in simulated time.
    pub chaos: Duration,
    /// The root budget's lifetime cap.
    pub cap: u64,
    /// Inject faults (false: a quiet run, for the determinism check).
    pub faults: bool,
    /// Include disk failures in the fault mix (false: the mix before they were
    /// added, so seeds found then keep their schedules).
    pub disk_failures: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3,
            gateways: 4,
            chaos: Duration::from_secs(8),
            cap: 3_000,
            faults: true,
            disk_failures: true,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub seed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Units the gateways admitted in total (the ground truth of spend).
    pub admitted: u64,
    pub cap: u64,
    /// Probe requests answered, and left unknown (timed out on every retry).
    pub probes_answered: u64,
    pub probes_unknown: u64,
    pub probe_grants: u64,
    /// Final applied index and audit length (equal on every node).
    pub applied_index: u64,
    pub audit_records: u64,
    /// Node crashes whose unflushed writes were lost.
    pub crashes: u64,
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
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at {} ms of simulated time: {}\nreplay: {}",
            self.seed,
            self.at_ms,
            self.what,
            replay_command(self.seed, self.nodes)
        )
    }
}

/// A node's clock: simulated time, skewed and drifting.
#[derive(Debug)]
struct SimClock {
    offset_ms: i64,
    drift_ppm: i64,
}

impl ration_server::Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default().as_millis() as i64;
        let t = EPOCH_MS as i64 + elapsed + elapsed * self.drift_ppm / 1_000_000 + self.offset_ms;
        t.max(0) as u64
    }
}

/// Starts node `id` as a simulated host on `disk`. Like a process under a
/// supervisor: when its Raft core stops on its own, the host logs why, tells the
/// harness (`Shared::core_stops`) and ends; the harness restarts it from its disk
/// after a delay ([`Supervisor`]).
fn spawn_node(
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
            let (log, sm, identity) = disk
                .open(fsync, LedgerConfig::default())
                .map_err(|e| format!("node {id} storage: {e}"))?;
            let reader = sm.reader();
            let storage = Storage { log, sm, reader, identity };
            let incoming = net::incoming().await?;
            let handle: NodeHandle = ration_server::start_with_storage(
                config,
                storage,
                incoming,
                |timeout| -> ration_server::network::ChannelMaker {
                    Arc::new(move |a: &str| Ok(net::channel(a, timeout)))
                },
                clock,
            )
            .await
            .map_err(|e| format!("node {id} start: {e:#}"))?;
            shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).insert(id, handle.node.clone());
            // What `ration_server::supervise` does in rationd: a core that stopped
            // ends the process (here, the host) so that it is restarted.
            let stopped = handle.core_stopped().await;
            shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            shared.core_stops.lock().unwrap_or_else(|p| p.into_inner()).push((id, stopped.reason));
            Ok(())
        }
    });
}

/// Restarts hosts whose Raft core stopped, after a delay, as systemd or Kubernetes
/// would restart the process. Each restart is counted as a fault (`core_restart`).
#[derive(Default)]
struct Supervisor {
    /// (restart at, in simulated ms; node id)
    due: Vec<(u64, u64)>,
}

impl Supervisor {
    fn poll(
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
            let delay = rng.gen_range(500..3_000u64);
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
fn acquire_one(
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
        }),
        budget: budget.into(),
        unit: UNIT.into(),
        wanted: 1,
        min: 1,
        ttl_ms,
    }
}

fn host(id: u64) -> String {
    format!("n{id}")
}

fn addr(id: u64) -> String {
    format!("n{id}:{}", net::PORT)
}

fn node_config(id: u64, voters: u64) -> Config {
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
        rpc_timeout_ms: 700,
        // Snapshots and log purges happen often, so catch-up by snapshot is exercised.
        snapshot_after_entries: 40,
        keep_log_after_snapshot: 10,
        metrics_listen: "off".into(),
        batch_wait_us: 2000,
        ..Config::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Crash(u64),
    /// Several nodes lose power at once (a rack, a zone): correlated crashes.
    CrashMany,
    PartitionLeader,
    IsolateFollower,
    OneWay,
    Pause(u64),
    SlowLinks,
    TransferLeader,
    AddSpare,
    RemoveSpare,
    /// A node's disk fails (every log write errors) until healed: openraft stops
    /// its Raft core, the host ends, and the supervisor restarts it (again and
    /// again while the disk is still failing).
    DiskFailure(u64),
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Crash(_) => "crash_restart",
            Fault::CrashMany => "crash_majority",
            Fault::PartitionLeader => "partition_leader",
            Fault::IsolateFollower => "isolate_follower",
            Fault::OneWay => "one_way_partition",
            Fault::Pause(_) => "pause",
            Fault::SlowLinks => "slow_links",
            Fault::TransferLeader => "leader_transfer",
            Fault::AddSpare => "membership_add",
            Fault::RemoveSpare => "membership_remove",
            Fault::DiskFailure(_) => "disk_failure",
        }
    }
}

/// What hosts share with the harness.
#[derive(Default)]
struct Shared {
    nodes: Mutex<BTreeMap<u64, Arc<Node>>>,
    admitted: AtomicU64,
    gateways_done: AtomicU64,
    stop_spending: AtomicBool,
    probe: Mutex<ProbeLog>,
    /// Operator commands for the operator host to carry out.
    ops: Mutex<Vec<Fault>>,
    live: AtomicBool,
    /// Nodes whose Raft core stopped on its own, with the reason, not yet seen by
    /// the supervisor.
    core_stops: Mutex<Vec<(u64, String)>>,
}

#[derive(Default, Debug)]
struct ProbeLog {
    /// request id -> lease id granted (acknowledged).
    granted: BTreeMap<u64, u64>,
    refused: u64,
    unknown: BTreeSet<u64>,
}

fn err(seed: u64, at_ms: u64, what: impl Into<String>) -> Failure {
    Failure { seed, nodes: CURRENT_NODES.with(std::cell::Cell::get), what: what.into(), at_ms }
}

thread_local! {
    static CURRENT_NODES: std::cell::Cell<u64> = const { std::cell::Cell::new(3) };
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

thread_local! {
    static RUNNING_SEED: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// A panic inside a simulated host (openraft's own assertions, say) unwinds through
/// turmoil's runtime, which then aborts the process: this hook names the seed and
/// the replay command first.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            if let Some((seed, nodes)) = RUNNING_SEED.with(|s| s.get()) {
                RUNNING_SEED.with(|s| s.set(None));
                eprintln!(
                    "\nseed {seed} panicked in the simulation (the process may abort now)\nreplay: {}\n",
                    replay_command(seed, nodes)
                );
            }
        }));
    });
}

/// Log lines carry simulated time (wall time means nothing in a simulation).
pub(crate) struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let ms = turmoil::sim_elapsed().map_or(0, |d| d.as_millis());
        write!(w, "[{ms:>6} ms]")
    }
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig) -> Result<Report, Failure> {
    install_panic_hook();
    // `RATION_SIM_LOG=openraft=debug` (an env-filter) prints the nodes' own logs.
    let _logs = std::env::var("RATION_SIM_LOG").ok().map(|filter| {
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_ansi(false)
                .with_timer(SimTime)
                .with_writer(std::io::stderr)
                .finish(),
        )
    });
    ration_store::runtime::seed_thread_rng(Some(cfg.seed));
    RUNNING_SEED.with(|s| s.set(Some((cfg.seed, cfg.nodes))));
    CURRENT_NODES.with(|n| n.set(cfg.nodes));
    let result = run_inner(cfg);
    RUNNING_SEED.with(|s| s.set(None));
    ration_store::runtime::seed_thread_rng(None);
    result
}

fn run_inner(cfg: &SimConfig) -> Result<Report, Failure> {
    let seed = cfg.seed;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_ed0f_5eed);
    let mut sim = turmoil::Builder::new()
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .simulation_duration(cfg.chaos + Duration::from_secs(90))
        // Coarse steps keep a seed cheap; Raft's timers (100 ms heartbeats) are far
        // coarser still.
        .tick_duration(Duration::from_millis(10))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(Duration::from_millis(4))
        .tcp_capacity(256)
        .rng_seed(seed)
        .enable_random_order()
        .build();
    let shared = Arc::new(Shared::default());
    let spare = cfg.nodes + 1;
    let mut disks = BTreeMap::new();
    for id in 1..=spare {
        let disk = MemDisk::default();
        disks.insert(id, disk.clone());
        let clock = Arc::new(SimClock {
            offset_ms: rng.gen_range(-150..=150),
            drift_ppm: rng.gen_range(-2000..=2000),
        });
        // A disk's fsync takes 5 to 40 ms (network disks under load are slow).
        let fsync = Duration::from_micros(rng.gen_range(5_000..40_000));
        spawn_node(&mut sim, id, disk, fsync, clock, node_config(id, cfg.nodes), shared.clone());
    }
    let voters: Vec<String> = (1..=cfg.nodes).map(addr).collect();

    // The operator: creates the budgets, then carries out transfers and membership
    // changes the harness queues.
    {
        let shared = shared.clone();
        let endpoints = voters.clone();
        let cap = cfg.cap;
        sim.client("operator", async move {
            setup_budgets(&endpoints, cap).await?;
            shared.live.store(true, Relaxed);
            loop {
                let next = shared.ops.lock().unwrap_or_else(|p| p.into_inner()).pop();
                match next {
                    Some(op) => operate(&endpoints, spare, op).await,
                    None if shared.stop_spending.load(Relaxed) => return Ok(()),
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }

    // Gateways: the real SDK, each with its own skewed, drifting clock.
    for g in 0..cfg.gateways {
        let shared = shared.clone();
        let endpoints = voters.clone();
        let leaf = LEAVES[(g as usize) % LEAVES.len()];
        let offset = rng.gen_range(0..200u64);
        let drift_ppm = rng.gen_range(-2000..=2000i64);
        let mut grng = StdRng::seed_from_u64(seed.wrapping_add(g).wrapping_mul(0x9e37_79b9));
        sim.client(format!("g{g}"), async move {
            while !shared.live.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let clock = ration_client::CoarseClock::new();
            let ticking = clock.clone();
            let started = tokio::time::Instant::now();
            tokio::spawn(async move {
                loop {
                    let e = started.elapsed().as_millis() as i64;
                    ticking.set_ms((offset as i64 + e + e * drift_ppm / 1_000_000).max(0) as u64);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            let mut config = ration_client::SdkConfig::new(endpoints, format!("gw-{g}"));
            config.cluster.connector = Some(ration_client::Connector(Arc::new(|a: &str| {
                net::channel(a, Duration::from_millis(700))
            })));
            config.cluster.client_id = Some(format!("gw-{g}"));
            config.cluster.rpc_timeout = Duration::from_millis(700);
            config.refresh = Duration::from_millis(100);
            config.lease_ttl = Duration::from_secs(3);
            config.margin = Duration::from_millis(500);
            config.horizon = Duration::from_secs(1);
            config.initial_request = 20;
            let sdk = ration_client::Sdk::start(config, clock).map_err(|e| e.to_string())?;
            let handle = sdk.handle(leaf, UNIT);
            while !shared.stop_spending.load(Relaxed) {
                let want = grng.gen_range(1..=8u64);
                if handle.try_spend(want) {
                    shared.admitted.fetch_add(want, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(grng.gen_range(10..40))).await;
            }
            shared.gateways_done.fetch_add(1, Relaxed);
            drop(sdk);
            Ok(())
        });
    }

    // The probe: single requests through random nodes, retried with the same request
    // id through others until answered; an unanswered one stays unknown.
    {
        let shared = shared.clone();
        let endpoints = voters.clone();
        let mut prng = StdRng::seed_from_u64(seed ^ 0xbeef);
        sim.client("probe", async move {
            while !shared.live.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut request_id = 0u64;
            while !shared.stop_spending.load(Relaxed) {
                request_id += 1;
                let req = acquire_one(
                    "probe",
                    request_id,
                    &format!("probe-{request_id}"),
                    PROBE_BUDGET,
                    2_000,
                );
                let mut answered = false;
                if prng.gen_bool(0.2) {
                    // A duplicate of the same request to another node, unawaited: the
                    // ledger must execute it once whichever copy lands first.
                    let at = endpoints[prng.gen_range(0..endpoints.len())].clone();
                    let dup = req.clone();
                    tokio::spawn(async move {
                        let mut c = v1::ledger_client::LedgerClient::new(net::channel(
                            &at,
                            Duration::from_millis(700),
                        ));
                        let _ = c.acquire(dup).await;
                    });
                }
                for _attempt in 0..8 {
                    let at = &endpoints[prng.gen_range(0..endpoints.len())];
                    let mut client = v1::ledger_client::LedgerClient::new(net::channel(
                        at,
                        Duration::from_millis(700),
                    ));
                    match client.acquire(req.clone()).await {
                        Ok(lease) => {
                            let mut log = shared.probe.lock().unwrap_or_else(|p| p.into_inner());
                            log.granted.insert(request_id, lease.into_inner().lease_id);
                            answered = true;
                            break;
                        }
                        // A spent budget; an overloaded node answers UNAVAILABLE.
                        Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                            shared.probe.lock().unwrap_or_else(|p| p.into_inner()).refused += 1;
                            answered = true;
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(150)).await,
                    }
                }
                if !answered {
                    shared
                        .probe
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .unknown
                        .insert(request_id);
                }
                tokio::time::sleep(Duration::from_millis(prng.gen_range(10..80))).await;
            }
            Ok(())
        });
    }

    // The fault schedule, drawn up front from the seed.
    let chaos_ms = cfg.chaos.as_millis() as u64;
    let mut schedule: Vec<(u64, Fault, u64)> = Vec::new();
    if cfg.faults {
        let mut t = 1_500u64;
        while t < chaos_ms {
            let kinds = if cfg.disk_failures { 11 } else { 10 };
            let fault = match rng.gen_range(0..kinds) {
                10 => Fault::DiskFailure(rng.gen_range(1..=cfg.nodes)),
                0 | 1 => Fault::Crash(rng.gen_range(1..=cfg.nodes)),
                9 => Fault::CrashMany,
                2 => Fault::PartitionLeader,
                3 => Fault::IsolateFollower,
                4 => Fault::OneWay,
                5 => Fault::Pause(rng.gen_range(1..=cfg.nodes)),
                6 => Fault::SlowLinks,
                7 => Fault::TransferLeader,
                _ => {
                    if rng.gen_bool(0.5) {
                        Fault::AddSpare
                    } else {
                        Fault::RemoveSpare
                    }
                }
            };
            let lasts = rng.gen_range(300..2_500u64);
            schedule.push((t, fault, lasts));
            t += lasts + rng.gen_range(200..1_500u64);
        }
    }
    schedule.reverse();

    let mut report = Report { seed, cap: cfg.cap, ..Report::default() };
    let mut heal_at: Vec<(u64, Fault, Vec<String>)> = Vec::new();
    let mut trace = Trace::default();
    let mut observed = Observed::default();
    let mut leaders_by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut supervisor = Supervisor::default();
    let mut tracer = Tracer::from_env();
    tracer.event(
        0,
        format!("seed {seed}: {} voters, a spare (n{spare}), {} gateways", cfg.nodes, cfg.gateways),
    );
    let mut step = 0u64;
    let now_ms = |sim: &turmoil::Sim<'_>| sim.elapsed().as_millis() as u64;
    let started_chaos = loop {
        step_once(&mut sim, seed)?;
        if shared.live.load(Relaxed) {
            break now_ms(&sim);
        }
        if now_ms(&sim) > 30_000 {
            return Err(err(seed, now_ms(&sim), "the cluster never accepted the budgets"));
        }
    };

    // Chaos.
    loop {
        let t = now_ms(&sim).saturating_sub(started_chaos);
        if t >= chaos_ms {
            break;
        }
        while let Some(&(at, fault, lasts)) = schedule.last() {
            if at > t {
                break;
            }
            schedule.pop();
            *report.faults.entry(fault.name()).or_default() += 1;
            trace.note(now_ms(&sim), fault.name());
            let undo = inject(&mut sim, &shared, cfg, fault, &mut rng, &mut report, &disks);
            tracer.fault(now_ms(&sim), fault, &undo, lasts, &disks);
            heal_at.push((t + lasts, fault, undo));
        }
        heal_at.retain(|(until, fault, undo)| {
            if *until > t {
                return true;
            }
            heal(&mut sim, cfg.nodes + 1, *fault, undo, &disks);
            tracer.event(now_ms(&sim), format!("heal {} {undo:?}", fault.name()));
            false
        });
        step_once(&mut sim, seed)?;
        step += 1;
        supervisor.poll(&mut sim, &shared, &mut rng, &mut report, &mut tracer);
        tracer.observe(now_ms(&sim), &shared);
        if step % 25 == 0 {
            check_running(&shared, &disks, &mut observed)
                .map_err(|what| err(seed, now_ms(&sim), what))?;
            note_leaders(&shared, &mut leaders_by_term, &mut report);
        }
    }

    // Heal everything and let the cluster settle.
    for (_, fault, undo) in heal_at.drain(..) {
        heal(&mut sim, cfg.nodes + 1, fault, &undo, &disks);
    }
    tracer.event(now_ms(&sim), "chaos over: every fault healed");
    sim.set_max_message_latency(Duration::from_millis(4));
    shared.stop_spending.store(true, Relaxed);
    let live_ok = Arc::new(AtomicBool::new(false));
    {
        let endpoints = voters.clone();
        let live_ok = live_ok.clone();
        sim.client("liveness", async move {
            // After healing: one grant served, retried through any node.
            for attempt in 0..200u64 {
                let at = &endpoints[(attempt as usize) % endpoints.len()];
                let mut c = v1::ledger_client::LedgerClient::new(net::channel(
                    at,
                    Duration::from_millis(700),
                ));
                let r = c.acquire(acquire_one("liveness", 1, "liveness", "live", 60_000)).await;
                if r.is_ok() {
                    live_ok.store(true, Relaxed);
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err("no grant was served after healing".into())
        });
    }
    let settle_deadline = now_ms(&sim) + 60_000;
    loop {
        step_once(&mut sim, seed)?;
        step += 1;
        supervisor.poll(&mut sim, &shared, &mut rng, &mut report, &mut tracer);
        tracer.observe(now_ms(&sim), &shared);
        if step % 25 == 0 {
            check_running(&shared, &disks, &mut observed)
                .map_err(|what| err(seed, now_ms(&sim), what))?;
            note_leaders(&shared, &mut leaders_by_term, &mut report);
        }
        // Checked every step: the leader's ticks keep entries in flight part of the
        // time, so a coarser check could keep landing on one.
        if live_ok.load(Relaxed)
            && shared.gateways_done.load(Relaxed) == cfg.gateways
            && converged(&shared)
        {
            break;
        }
        if now_ms(&sim) > settle_deadline {
            return Err(err(
                seed,
                now_ms(&sim),
                format!(
                    "no convergence 60 s after healing (liveness grant: {}, gateways done: {}/{}; hosts running: {:?}): {:#?}",
                    live_ok.load(Relaxed),
                    shared.gateways_done.load(Relaxed),
                    cfg.gateways,
                    (1..=cfg.nodes + 1).map(|i| (i, sim.is_host_running(host(i)))).collect::<Vec<_>>(),
                    applied(&shared)
                ),
            ));
        }
    }
    report.sim_ms = now_ms(&sim);
    check_running(&shared, &disks, &mut observed).map_err(|what| err(seed, report.sim_ms, what))?;
    check_final(cfg, &shared, &disks, &observed, &mut report, &mut trace)
        .map_err(|what| err(seed, report.sim_ms, what))?;
    report.trace = trace.finish(&report);
    tracer.event(report.sim_ms, format!("converged and checked: {report:?}"));
    Ok(report)
}

fn step_once(sim: &mut turmoil::Sim<'_>, seed: u64) -> Result<(), Failure> {
    sim.step()
        .map(|_| ())
        .map_err(|e| err(seed, sim.elapsed().as_millis() as u64, format!("a host failed: {e}")))
}

/// Applies a fault; returns what to undo (host names, by fault kind).
fn inject(
    sim: &mut turmoil::Sim<'_>,
    shared: &Shared,
    cfg: &SimConfig,
    fault: Fault,
    rng: &mut StdRng,
    report: &mut Report,
    disks: &BTreeMap<u64, MemDisk>,
) -> Vec<String> {
    let all: Vec<u64> = (1..=cfg.nodes + 1).collect();
    let leader = current_leader(shared);
    match fault {
        Fault::Crash(id) => {
            if !sim.is_host_running(host(id)) {
                return vec![];
            }
            shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            sim.crash(host(id));
            report.crashes += 1;
            vec![host(id)]
        }
        Fault::CrashMany => {
            // A majority of the voters, the leader among them if known; or all of
            // them (a power loss across the cluster).
            let mut ids: Vec<u64> = (1..=cfg.nodes).collect();
            ids.sort_by_key(|i| (Some(*i) != leader, rng.gen_range(0..1000u32)));
            if rng.gen_bool(0.5) {
                ids.truncate(usize::try_from(cfg.nodes / 2 + 1).unwrap_or(2));
            }
            let mut undo = Vec::new();
            for id in ids {
                if sim.is_host_running(host(id)) {
                    shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    sim.crash(host(id));
                    report.crashes += 1;
                    undo.push(host(id));
                }
            }
            undo
        }
        Fault::PartitionLeader => {
            let l = leader.unwrap_or(1);
            for other in all.iter().filter(|o| **o != l) {
                sim.partition(host(l), host(*other));
            }
            vec![host(l)]
        }
        Fault::IsolateFollower => {
            let f =
                all.iter().copied().find(|i| Some(*i) != leader && *i <= cfg.nodes).unwrap_or(2);
            for other in all.iter().filter(|o| **o != f) {
                sim.partition(host(f), host(*other));
            }
            vec![host(f)]
        }
        Fault::OneWay => {
            // The leader can send to a follower but not hear it.
            let l = leader.unwrap_or(1);
            let f = all.iter().copied().find(|i| *i != l && *i <= cfg.nodes).unwrap_or(2);
            sim.partition_oneway(host(f), host(l));
            vec![host(f), host(l)]
        }
        Fault::Pause(id) => {
            // Nothing in or out for a while, then everything at once (a GC pause or
            // a stopped process, as the network sees it).
            for other in all.iter().filter(|o| **o != id) {
                sim.hold(host(id), host(*other));
            }
            vec![host(id)]
        }
        Fault::SlowLinks => {
            // Sometimes slower than the RPC deadline (700 ms): calls time out while
            // their messages are still in flight, are retried, and both copies
            // arrive, out of order: duplication and reordering on both paths.
            let max =
                if rng.gen_bool(0.3) { rng.gen_range(700..1500) } else { rng.gen_range(20..120) };
            sim.set_max_message_latency(Duration::from_millis(max));
            vec![]
        }
        Fault::TransferLeader | Fault::AddSpare | Fault::RemoveSpare => {
            shared.ops.lock().unwrap_or_else(|p| p.into_inner()).insert(0, fault);
            vec![]
        }
        Fault::DiskFailure(id) => {
            if let Some(disk) = disks.get(&id) {
                disk.set_failing(true);
            }
            vec![host(id)]
        }
    }
}

fn heal(
    sim: &mut turmoil::Sim<'_>,
    hosts: u64,
    fault: Fault,
    undo: &[String],
    disks: &BTreeMap<u64, MemDisk>,
) {
    let everyone: Vec<String> = (1..=hosts).map(host).collect();
    match fault {
        Fault::Crash(_) | Fault::CrashMany => {
            for h in undo {
                sim.bounce(h.as_str());
            }
        }
        Fault::PartitionLeader | Fault::IsolateFollower => {
            for h in undo {
                for o in everyone.iter().filter(|o| *o != h) {
                    sim.repair(h.as_str(), o.as_str());
                }
            }
        }
        Fault::OneWay => {
            if let [f, l] = undo {
                sim.repair_oneway(f.as_str(), l.as_str());
            }
        }
        Fault::Pause(_) => {
            for h in undo {
                for o in everyone.iter().filter(|o| *o != h) {
                    sim.release(h.as_str(), o.as_str());
                }
            }
        }
        Fault::SlowLinks => sim.set_max_message_latency(Duration::from_millis(4)),
        Fault::DiskFailure(id) => {
            if let Some(disk) = disks.get(&id) {
                disk.set_failing(false);
            }
        }
        Fault::TransferLeader | Fault::AddSpare | Fault::RemoveSpare => {}
    }
}

async fn setup_budgets(endpoints: &[String], cap: u64) -> Result<(), Box<dyn std::error::Error>> {
    let limit = |cap: u64| v1::Limit {
        unit: UNIT.into(),
        cap: cap as i64,
        window: Some(v1::Window { period: v1::Period::Lifetime as i32, offset_minutes: 0 }),
        static_allowance: None,
    };
    let mut budgets = vec![(ROOT.to_owned(), cap), ("live".to_owned(), 1_000)];
    for leaf in LEAVES {
        // The leaves together may spend more than the root: the root binds.
        budgets.push((leaf.to_owned(), cap / 2));
    }
    budgets.push((PROBE_BUDGET.to_owned(), cap / 10));
    for (i, (path, cap)) in budgets.into_iter().enumerate() {
        let req = v1::CreateBudgetRequest {
            meta: Some(v1::RequestMeta {
                client_id: "operator".into(),
                request_id: i as u64 + 1,
                principal: "operator".into(),
            }),
            path,
            limits: vec![limit(cap)],
        };
        let mut done = false;
        for attempt in 0..400usize {
            let at = &endpoints[attempt % endpoints.len()];
            let mut c =
                v1::ledger_client::LedgerClient::new(net::channel(at, Duration::from_millis(700)));
            match c.create_budget(req.clone()).await {
                Ok(_) => {
                    done = true;
                    break;
                }
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    done = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        if !done {
            return Err("could not create the budgets".into());
        }
    }
    Ok(())
}

/// Carries out an operator fault from the operator host (errors are expected under
/// faults and ignored: the operation may or may not take effect).
async fn operate(endpoints: &[String], spare: u64, op: Fault) {
    let timeout = Duration::from_millis(3000);
    let mut status = None;
    for at in endpoints {
        let mut c = v1::cluster_client::ClusterClient::new(net::channel(at, timeout));
        if let Ok(s) = c.status(v1::StatusRequest { digest: false }).await {
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

/// A readable account of a run, printed to stderr when `RATION_SIM_TRACE` is set:
/// faults (and what each crashed disk kept), elections with who voted for whom,
/// leadership changes, Raft cores that stopped and their restarts.
struct Tracer {
    on: bool,
    /// Per node: (state, vote, leader) as last printed.
    seen: BTreeMap<u64, (ServerState, Vote<u64>, Option<u64>)>,
}

impl Tracer {
    fn from_env() -> Self {
        Self { on: std::env::var_os("RATION_SIM_TRACE").is_some(), seen: BTreeMap::new() }
    }

    fn event(&mut self, at_ms: u64, what: impl std::fmt::Display) {
        if self.on {
            eprintln!("[{at_ms:>6} ms] {what}");
        }
    }

    fn fault(
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
    fn observe(&mut self, at_ms: u64, shared: &Shared) {
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

fn nodes(shared: &Shared) -> Vec<(u64, Arc<Node>)> {
    shared
        .nodes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, n)| (*id, n.clone()))
        .collect()
}

fn current_leader(shared: &Shared) -> Option<u64> {
    nodes(shared)
        .iter()
        .filter(|(_, n)| n.raft.metrics().borrow().state == ServerState::Leader)
        .max_by_key(|(_, n)| n.raft.metrics().borrow().current_term)
        .map(|(id, _)| *id)
}

/// Each running node as it sees itself, for failure messages.
fn applied(shared: &Shared) -> Vec<String> {
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
    pub fn applied(&mut self, node: u64, id: LogId<u64>) -> Result<(), String> {
        match self.committed.entry(id.index) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((id, node));
                Ok(())
            }
            std::collections::btree_map::Entry::Occupied(o) if o.get().0 == id => Ok(()),
            std::collections::btree_map::Entry::Occupied(o) => Err(format!(
                "nodes {} and {node} applied different entries at index {}: {} and {id}",
                o.get().1,
                id.index,
                o.get().0
            )),
        }
    }

    /// Checks that `node`, whose log holds `held` (entry ids), still holds every
    /// observed committed entry at those indexes.
    pub fn still_holds(&self, node: u64, held: &[LogId<u64>]) -> Result<(), String> {
        for id in held {
            if let Some((committed, by)) = self.committed.get(&id.index) {
                if committed != id {
                    return Err(format!(
                        "committed entry {committed} (applied by node {by}) was lost: node {node} holds {id} at index {}",
                        id.index
                    ));
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
fn log_ids_above_snapshot(node: &Node, disk: &MemDisk, upto: Option<u64>) -> Vec<LogId<u64>> {
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
fn check_running(
    shared: &Shared,
    disks: &BTreeMap<u64, MemDisk>,
    observed: &mut Observed,
) -> Result<(), String> {
    let mut digests: BTreeMap<u64, (u64, [u8; 32])> = BTreeMap::new();
    for (id, node) in nodes(shared) {
        let state = node.reader.state();
        state
            .ledger
            .check_invariants()
            .map_err(|e| format!("node {id}: ledger invariant broken: {e}"))?;
        // Replicas at the same applied index hold the same state.
        let last_applied = state.last_applied;
        let at = last_applied.map_or(0, |l| l.index);
        let digest = state.ledger.digest();
        drop(state);
        match digests.get(&at) {
            Some((other, d)) if *d != digest => {
                return Err(format!("nodes {other} and {id} differ at applied index {at}"));
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
fn note_leaders(shared: &Shared, leaders: &mut BTreeMap<u64, BTreeSet<u64>>, report: &mut Report) {
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
fn converged(shared: &Shared) -> bool {
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

fn check_final(
    cfg: &SimConfig,
    shared: &Shared,
    disks: &BTreeMap<u64, MemDisk>,
    observed: &Observed,
    report: &mut Report,
    trace: &mut Trace,
) -> Result<(), String> {
    let all = nodes(shared);
    let any = &all.first().ok_or("no node is running")?.1;
    let members: BTreeSet<u64> =
        any.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    let mut reference: Option<(u64, [u8; 32], u64)> = None;
    let mut records = Vec::new();
    for (id, node) in all.iter().filter(|(id, _)| members.contains(id)) {
        let state = node.reader.state();
        state.ledger.check_invariants().map_err(|e| format!("node {id}: {e}"))?;
        let applied = state.last_applied.map_or(0, |l| l.index);
        let digest = state.ledger.digest();
        let head = state.ledger.chain_head();
        drop(state);
        let held = node
            .reader
            .audit_records(0, usize::MAX)
            .map_err(|e| format!("node {id}: reading audit records: {e}"))?;
        let verified = verify_chain(&held, ChainHead::default())
            .map_err(|e| format!("node {id}: audit chain: {e}"))?;
        if verified != head {
            return Err(format!(
                "node {id}: audit records end at {verified:?} but the ledger's chain is at {head:?}"
            ));
        }
        match &reference {
            None => {
                reference = Some((applied, digest, held.len() as u64));
                records = held;
            }
            Some((a, d, n)) => {
                if (*a, *d, *n) != (applied, digest, held.len() as u64) {
                    return Err(format!(
                        "replicas differ: node {id} at index {applied} with {} records, another at {a} with {n}",
                        held.len()
                    ));
                }
            }
        }
    }
    let (applied, _, audit) = reference.ok_or("no member is running")?;
    // Committed entries are never lost: the converged cluster is at or past every
    // index ever applied, and every member's disk holds the committed entry at each
    // index it still has.
    if let Some(last) = observed.last() {
        if last > applied {
            return Err(format!(
                "index {last} was applied during the run, but the converged cluster is at {applied}"
            ));
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
        return Err(format!("gateways admitted {admitted} units, over the cap of {}", cfg.cap));
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
        return Err(format!("{p} was granted {} times: {leases:?}", leases.len()));
    }
    for (request_id, lease) in &probe.granted {
        let key = format!("probe-{request_id}");
        if grants.get(&key).map(|l| l.as_slice()) != Some(&[*lease][..]) {
            return Err(format!(
                "probe request {request_id} was acknowledged with lease {lease} but the log has {:?}",
                grants.get(&key)
            ));
        }
    }
    report.probes_answered = probe.granted.len() as u64 + probe.refused;
    report.probes_unknown = probe.unknown.len() as u64;
    report.probe_grants = probe.granted.len() as u64;
    trace.note(applied, &format!("{admitted}/{audit}/{}", probe.granted.len()));
    Ok(())
}

/// A running hash of what happened, to compare two runs of one seed.
#[derive(Default)]
struct Trace(u64);

impl Trace {
    fn note(&mut self, at: u64, what: &str) {
        for b in at.to_le_bytes().iter().chain(what.as_bytes()) {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn finish(&mut self, r: &Report) -> u64 {
        self.note(
            r.sim_ms,
            &format!(
                "{:?}",
                (r.admitted, r.applied_index, r.audit_records, r.probe_grants, &r.faults)
            ),
        );
        self.0
    }
}

/// Seeds to run: `RATION_SIM_SEEDS` of them (else `default`), from
/// `RATION_SIM_FIRST_SEED`, else from [`rotating_first_seed`]: each run covers
/// seeds no earlier run did. The range is printed by the tests; a failing seed
/// prints its own replay command.
pub fn seeds_from_env(default: u64) -> std::ops::Range<u64> {
    let n = std::env::var("RATION_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let first = std::env::var("RATION_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rotating_first_seed);
    first..first + n
}

/// A first seed that changes every minute: the minutes since 1970 times 1,000
/// (so a run of up to 1,000 seeds a minute never repeats an earlier one).
pub fn rotating_first_seed() -> u64 {
    let minutes =
        std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60);
    minutes.saturating_mul(1_000)
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
        assert!(e.contains("nodes 1 and 3 applied different entries at index 5"), "{e}");
    }

    #[test]
    fn a_lost_committed_entry_fails() {
        let mut o = Observed::default();
        o.applied(1, id(2, 1, 9)).unwrap();
        let e = o.still_holds(2, &[id(3, 2, 9)]).unwrap_err();
        assert!(e.contains("committed entry") && e.contains("was lost"), "{e}");
    }
}
