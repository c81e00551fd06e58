//! What runs on each simulated host: the nodes (and the supervisor that restarts
//! them), the operator, the gateways, the probe client and the liveness client;
//! and [`Shared`], what those hosts share with the harness.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Range, RangeInclusive};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
use crate::{net, SimConfig, EPOCH_MS};

pub(crate) const ROOT: &str = "org";
pub(crate) const LEAVES: [&str; 3] = ["org/a", "org/b", "org/c"];
pub(crate) const PROBE_BUDGET: &str = "org/probe";
/// The budget the liveness client acquires from after healing.
const LIVE_BUDGET: &str = "live";
const UNIT: &str = "tokens";
/// The cap of [`LIVE_BUDGET`].
const LIVE_BUDGET_CAP_TOKENS: u64 = 1_000;

/// Each node's clock is off by this much (drawn per node).
const NODE_CLOCK_OFFSET_MS: RangeInclusive<i64> = -150..=150;
/// Each node's and gateway's clock drifts by this much (drawn per clock).
const CLOCK_DRIFT_PPM: RangeInclusive<i64> = -2000..=2000;
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
const SDK_MARGIN: Duration = Duration::from_millis(500);
const SDK_HORIZON: Duration = Duration::from_secs(1);
const SDK_INITIAL_REQUEST_UNITS: u64 = 20;
/// A gateway spends this many units at a time (drawn per spend) ...
const GATEWAY_SPEND_UNITS: RangeInclusive<u64> = 1..=8;
/// ... and waits this long between spends (drawn per spend).
const GATEWAY_SPEND_GAP_MS: Range<u64> = 10..40;

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
    pub(crate) nodes: Mutex<BTreeMap<u64, Arc<Node>>>,
    pub(crate) admitted: AtomicU64,
    pub(crate) gateways_done: AtomicU64,
    pub(crate) stop_spending: AtomicBool,
    pub(crate) probe: Mutex<ProbeLog>,
    /// Operator commands for the operator host to carry out.
    pub(crate) ops: Mutex<Vec<Fault>>,
    pub(crate) live: AtomicBool,
    /// Nodes whose Raft core stopped on its own, with the reason, not yet seen by
    /// the supervisor.
    pub(crate) core_stops: Mutex<Vec<(u64, String)>>,
}

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

/// A node's clock: simulated time, skewed and drifting.
#[derive(Debug)]
pub(crate) struct SimClock {
    pub(crate) offset_ms: i64,
    pub(crate) drift_ppm: i64,
}

impl ration_server::Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default().as_millis() as i64;
        let t = EPOCH_MS as i64 + elapsed + elapsed * self.drift_ppm / 1_000_000 + self.offset_ms;
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
        rpc_timeout_ms: RPC_DEADLINE_MS,
        // Snapshots and log purges happen often, so catch-up by snapshot is exercised.
        snapshot_after_entries: 40,
        keep_log_after_snapshot: 10,
        metrics_listen: "off".into(),
        batch_wait_us: 2000,
        ..Config::default()
    }
}

/// The voters and the spare (id `cfg.nodes + 1`), each on its own disk, with a
/// clock skew and drift and an fsync time drawn from `rng` in id order. Returns
/// the disks, by node id.
pub(crate) fn spawn_nodes(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    rng: &mut StdRng,
    shared: &Arc<Shared>,
) -> BTreeMap<u64, MemDisk> {
    let mut disks = BTreeMap::new();
    for id in 1..=cfg.nodes + 1 {
        let disk = if cfg.wal { MemDisk::with_wal() } else { MemDisk::default() };
        disks.insert(id, disk.clone());
        let clock = Arc::new(SimClock {
            offset_ms: rng.gen_range(NODE_CLOCK_OFFSET_MS),
            drift_ppm: rng.gen_range(CLOCK_DRIFT_PPM),
        });
        let fsync = Duration::from_micros(rng.gen_range(FSYNC_TIME_US));
        spawn_node(sim, id, disk, fsync, clock, node_config(id, cfg.nodes), shared.clone());
    }
    disks
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
        incoming,
        |timeout| -> ration_server::network::ChannelMaker {
            Arc::new(move |a: &str| Ok(net::channel(a, timeout)))
        },
        clock,
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
        }),
        budget: budget.into(),
        unit: UNIT.into(),
        wanted: 1,
        min: 1,
        ttl_ms,
    }
}

/// The operator: creates the budgets, then carries out transfers and membership
/// changes the harness queues (`Shared::ops`).
pub(crate) fn spawn_operator(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    shared: &Arc<Shared>,
    voters: &[String],
) {
    let shared = shared.clone();
    let endpoints = voters.to_vec();
    let cap = cfg.cap;
    let spare = cfg.nodes + 1;
    sim.client("operator", async move {
        setup_budgets(&endpoints, cap).await?;
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

/// Gateway `g`: the real SDK, with its own skewed, drifting clock (drawn from
/// `rng`), spending from one leaf until told to stop.
pub(crate) fn spawn_gateway(
    sim: &mut turmoil::Sim<'_>,
    cfg: &SimConfig,
    g: u64,
    rng: &mut StdRng,
    shared: &Arc<Shared>,
    voters: &[String],
) {
    let shared = shared.clone();
    let endpoints = voters.to_vec();
    let leaf = LEAVES[(g as usize) % LEAVES.len()];
    let offset = rng.gen_range(GATEWAY_CLOCK_OFFSET_MS);
    let drift_ppm = rng.gen_range(CLOCK_DRIFT_PPM);
    let mut grng = StdRng::seed_from_u64(cfg.seed.wrapping_add(g).wrapping_mul(0x9e37_79b9));
    sim.client(format!("g{g}"), async move {
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
        let mut config = ration_client::SdkConfig::new(endpoints, format!("gw-{g}"));
        config.cluster.connector =
            Some(ration_client::Connector(Arc::new(|a: &str| net::channel(a, CLIENT_RPC_TIMEOUT))));
        config.cluster.client_id = Some(format!("gw-{g}"));
        config.cluster.rpc_timeout = CLIENT_RPC_TIMEOUT;
        config.refresh = SDK_REFRESH_INTERVAL;
        config.lease_ttl = SDK_LEASE_TTL;
        config.margin = SDK_MARGIN;
        config.horizon = SDK_HORIZON;
        config.initial_request = SDK_INITIAL_REQUEST_UNITS;
        let sdk = ration_client::Sdk::start(config, clock).map_err(|e| e.to_string())?;
        let handle = sdk.handle(leaf, UNIT);
        while !shared.stop_spending.load(Relaxed) {
            let want = grng.gen_range(GATEWAY_SPEND_UNITS);
            if handle.try_spend(want) {
                shared.admitted.fetch_add(want, Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(grng.gen_range(GATEWAY_SPEND_GAP_MS))).await;
        }
        shared.gateways_done.fetch_add(1, Relaxed);
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

/// Creates the budget tree: the root with `cap`, leaves whose caps add up to more
/// (so the root binds), the probe's budget and the liveness budget.
pub(crate) async fn setup_budgets(
    endpoints: &[String],
    cap: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let limit = |cap: u64| v1::Limit {
        unit: UNIT.into(),
        cap: cap as i64,
        window: Some(v1::Window { period: v1::Period::Lifetime as i32, offset_minutes: 0 }),
        static_allowance: None,
    };
    let mut budgets =
        vec![(ROOT.to_owned(), cap), (LIVE_BUDGET.to_owned(), LIVE_BUDGET_CAP_TOKENS)];
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
