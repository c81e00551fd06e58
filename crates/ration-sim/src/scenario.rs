//! Scripted scenarios: a small cluster driven step by step through one mechanism,
//! so a regression test keeps its meaning however the random fault schedule
//! changes. Each runs the production node (services, proposer, patched openraft) on
//! turmoil, with the same supervisor and checks as [`crate::run`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use openraft::ServerState;
use rand::rngs::StdRng;
use rand::SeedableRng;
use ration_proto::v1;
use ration_store::mem::MemDisk;

use crate::actors::{
    acquire_one, addr, host, node_config, nodes, setup_budgets, spawn_node, Plan, Shared, SimClock,
    Supervisor, CLIENT_RPC_TIMEOUT, PROBE_BUDGET,
};
use crate::checks::{applied, check_running, converged, log_ids_above_snapshot};
use crate::report::{Report, Tracer};
use crate::{
    net, Observed, CHECK_EVERY_STEPS, CONVERGENCE_TIMEOUT_MS, EPOCH_MS, MAX_MESSAGE_LATENCY,
    MIN_MESSAGE_LATENCY, SIM_TICK, TCP_CAPACITY_MESSAGES,
};

/// A scenario may run this long in simulated time.
const SCENARIO_DURATION: Duration = Duration::from_secs(600);
/// Every disk's fsync time in a scenario.
const FSYNC_TIME: Duration = Duration::from_millis(10);
/// The writer's budget cap (it never binds).
const WRITER_CAP_TOKENS: u64 = 1_000_000;
/// The scenario writers' leases live this long.
const WRITER_LEASE_TTL_MS: i64 = 500;
/// The writer waits `WRITER_MIN_GAP_MS` plus up to `WRITER_GAP_SPREAD_MS` (by
/// request id) between acquires.
const WRITER_MIN_GAP_MS: u64 = 10;
const WRITER_GAP_SPREAD_MS: u64 = 20;
/// A scenario's cluster must elect a leader and accept the budgets within this.
const SETUP_TIMEOUT_MS: u64 = 20_000;

// `two_fast_leaders_in_a_row`: how long the cluster runs before and after each
// clock step, and how long a leader with a fast clock may take to hand over.
const FAST_CLOCK_SETTLE_MS: u64 = 3_000;
const FAST_LEADER_HANDOVER_TIMEOUT_MS: u64 = 5_000;

// `higher_vote_during_a_slow_purge`: how slowly every disk purges, how many times
// the race is tried at most, and how long each of its steps may wait.
const SLOW_PURGE: Duration = Duration::from_millis(400);
const MAX_RACE_ATTEMPTS: u64 = 12;
const REELECTION_TIMEOUT_MS: u64 = 2_000;
const PURGE_START_TIMEOUT_MS: u64 = 20_000;
const PURGE_END_TIMEOUT_MS: u64 = 5_000;
const CAMPAIGN_TIMEOUT_MS: u64 = 10_000;
const AFTER_RELEASE_MS: u64 = 3_000;

// `a_stopped_core_is_restarted`: how long the cluster runs before the disk fails,
// how long the core may take to stop and to be restarted, and how long it runs
// after.
const BEFORE_DISK_FAILURE_MS: u64 = 1_000;
const CORE_STOP_TIMEOUT_MS: u64 = 10_000;
const RESTART_TIMEOUT_MS: u64 = 10_000;
const AFTER_RESTART_MS: u64 = 2_000;

// `forwarding_recovers_after_a_stalled_connection`: the client's pace, how long
// the cluster runs before and after the leader is cut off (and for how long), and
// the limit on the first write through the follower after the repair.
const VIA_FOLLOWER_GAP: Duration = Duration::from_millis(50);
const BEFORE_CUT_OFF_MS: u64 = 2_000;
const LEADER_CUT_OFF_MS: u64 = 400;
const AFTER_REPAIR_MS: u64 = 6_000;
const FORWARDING_RECOVERY_LIMIT_MS: u64 = 3_000;

/// What a scenario saw.
#[derive(Clone, Debug, Default)]
pub struct ScenarioReport {
    /// Raft cores that stopped on their own: who, when, why.
    pub core_stops: Vec<String>,
    /// Supervisor restarts.
    pub restarts: u64,
    /// Times the patched openraft path ("replication channel closed before a
    /// snapshot could be sent") was taken.
    pub race_hits: u64,
    /// Attempts the scenario needed to provoke its mechanism.
    pub attempts: u64,
    /// Grants the writer was acknowledged.
    pub writes: u64,
    /// Simulated time at the end, and the converged applied index.
    pub sim_ms: u64,
    pub applied: u64,
    /// Distinct committed entries cross-checked.
    pub entries_checked: u64,
    /// The most ledger time was seen ahead of true time, in ms.
    pub ledger_ahead_max_ms: i64,
}

struct Cluster<'a> {
    sim: turmoil::Sim<'a>,
    shared: Arc<Shared>,
    disks: BTreeMap<u64, MemDisk>,
    clocks: BTreeMap<u64, Arc<SimClock>>,
    voters: u64,
    supervisor: Supervisor,
    tracer: Tracer,
    rng: StdRng,
    report: Report,
    observed: Observed,
    writes: Arc<AtomicU64>,
    steps: u64,
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        ration_store::runtime::seed_thread_rng(None);
    }
}

impl Cluster<'_> {
    /// `voters` nodes with 10 ms fsyncs and exact clocks, and a writer that
    /// acquires through any node every 10-30 ms until told to stop.
    fn new(seed: u64, voters: u64, tweak: impl Fn(&mut ration_server::Config)) -> Self {
        Self::new_for(seed, voters, SCENARIO_DURATION, tweak)
    }

    /// [`Cluster::new`] for a scenario that may run `duration` of simulated time.
    fn new_for(
        seed: u64,
        voters: u64,
        duration: Duration,
        tweak: impl Fn(&mut ration_server::Config),
    ) -> Self {
        // openraft's election timeouts too come from the seed: the scenario replays.
        ration_store::runtime::seed_thread_rng(Some(seed));
        ration_client::local::pin_thread_stripe(0);
        let mut sim = turmoil::Builder::new()
            .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
            .simulation_duration(duration)
            .tick_duration(SIM_TICK)
            .min_message_latency(MIN_MESSAGE_LATENCY)
            .max_message_latency(MAX_MESSAGE_LATENCY)
            .tcp_capacity(TCP_CAPACITY_MESSAGES)
            .rng_seed(seed)
            .build();
        let shared = Arc::new(Shared::default());
        shared.epoch_ms.store(EPOCH_MS, Relaxed);
        let mut disks = BTreeMap::new();
        let mut clocks = BTreeMap::new();
        for id in 1..=voters {
            let disk = MemDisk::default();
            disks.insert(id, disk.clone());
            let clock = Arc::new(SimClock::new(EPOCH_MS, 0, 0));
            clocks.insert(id, clock.clone());
            let mut config = node_config(id, voters);
            tweak(&mut config);
            spawn_node(&mut sim, id, disk, FSYNC_TIME, clock, config, shared.clone());
        }
        let writes = Arc::new(AtomicU64::new(0));
        {
            let shared = shared.clone();
            let writes = writes.clone();
            let endpoints: Vec<String> = (1..=voters).map(addr).collect();
            sim.client("writer", async move {
                setup_budgets(&endpoints, &Plan::plain(WRITER_CAP_TOKENS)).await?;
                shared.live.store(true, Relaxed);
                let mut request_id = 0u64;
                let mut at = 0usize;
                while !shared.stop_spending.load(Relaxed) {
                    request_id += 1;
                    let req = acquire_one(
                        "writer",
                        request_id,
                        "writer",
                        PROBE_BUDGET,
                        WRITER_LEASE_TTL_MS,
                    );
                    let mut c = v1::ledger_client::LedgerClient::new(net::channel(
                        &endpoints[at % endpoints.len()],
                        CLIENT_RPC_TIMEOUT,
                    ));
                    match c.acquire(req).await {
                        Ok(_) => {
                            writes.fetch_add(1, Relaxed);
                        }
                        Err(_) => at += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(
                        WRITER_MIN_GAP_MS + request_id % WRITER_GAP_SPREAD_MS,
                    ))
                    .await;
                }
                Ok(())
            });
        }
        Self {
            sim,
            shared,
            disks,
            clocks,
            voters,
            supervisor: Supervisor::default(),
            tracer: Tracer::from_env(),
            rng: StdRng::seed_from_u64(seed),
            report: Report::default(),
            observed: Observed::default(),
            writes,
            steps: 0,
        }
    }

    fn now_ms(&self) -> u64 {
        self.sim.elapsed().as_millis() as u64
    }

    fn step(&mut self) -> Result<(), String> {
        self.sim.step().map_err(|e| format!("a host failed: {e}"))?;
        self.steps += 1;
        let now = self.now_ms();
        self.supervisor.poll(
            &mut self.sim,
            &self.shared,
            &mut self.rng,
            &mut self.report,
            &mut self.tracer,
        );
        self.tracer.observe(now, &self.shared);
        if self.steps % CHECK_EVERY_STEPS == 0 {
            check_running(&self.shared, &self.disks, &mut self.observed, now)
                .map_err(|e| format!("at {now} ms: {e}"))?;
        }
        Ok(())
    }

    /// Steps until `done` holds (true) or `ms` of simulated time pass (false).
    fn run_until(&mut self, ms: u64, done: impl Fn(&Self) -> bool) -> Result<bool, String> {
        let until = self.now_ms() + ms;
        while self.now_ms() < until {
            if done(self) {
                return Ok(true);
            }
            self.step()?;
        }
        Ok(done(self))
    }

    fn metrics(&self, id: u64) -> Option<openraft::RaftMetrics<u64, openraft::BasicNode>> {
        nodes(&self.shared)
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.raft.metrics().borrow().clone())
    }

    /// The node that leads with the highest term, if any.
    fn leader(&self) -> Option<u64> {
        (1..=self.voters)
            .filter_map(|id| self.metrics(id).map(|m| (id, m)))
            .filter(|(_, m)| m.state == ServerState::Leader)
            .max_by_key(|(_, m)| m.current_term)
            .map(|(id, _)| id)
    }

    fn set_held(&mut self, id: u64, held: bool) {
        for other in (1..=self.voters).filter(|o| *o != id) {
            if held {
                self.sim.hold(host(id), host(other));
            } else {
                self.sim.release(host(id), host(other));
            }
        }
        let now = self.now_ms();
        self.tracer.event(now, format!("n{id}: links {}", if held { "held" } else { "released" }));
    }

    /// Steps node `id`'s wall clock by `ms` (its monotonic clock does not move).
    fn step_clock(&mut self, id: u64, ms: i64) {
        if let Some(clock) = self.clocks.get(&id) {
            clock.step(ms);
            if ms > 0 {
                self.shared.forward_clock_steps.fetch_add(1, Relaxed);
            }
        }
        let now = self.now_ms();
        self.tracer.event(now, format!("n{id}: wall clock stepped by {ms} ms"));
    }

    /// Stops the writer, waits (at most 60 s) until every voter is up at the same
    /// applied index under one leader, and checks that committed entries agree.
    fn converge(mut self) -> Result<ScenarioReport, String> {
        self.shared.stop_spending.store(true, Relaxed);
        if !self.run_until(CONVERGENCE_TIMEOUT_MS, |c| converged(&c.shared))? {
            return Err(format!(
                "no convergence within {} s: {:#?}",
                CONVERGENCE_TIMEOUT_MS / 1000,
                applied(&self.shared)
            ));
        }
        let now = self.now_ms();
        check_running(&self.shared, &self.disks, &mut self.observed, now)
            .map_err(|e| e.to_string())?;
        let applied = nodes(&self.shared)
            .first()
            .and_then(|(_, n)| n.reader.state().last_applied.map(|l| l.index))
            .unwrap_or(0);
        for (id, node) in nodes(&self.shared) {
            if let Some(disk) = self.disks.get(&id) {
                let held = log_ids_above_snapshot(&node, disk, None);
                self.observed.still_holds(id, &held).map_err(|e| e.to_string())?;
            }
        }
        if self.observed.last().unwrap_or(0) > applied {
            return Err("an entry applied during the run is past the converged index".into());
        }
        Ok(ScenarioReport {
            core_stops: self.report.core_stops.clone(),
            restarts: self.report.faults.get("core_restart").copied().unwrap_or(0),
            writes: self.writes.load(Relaxed),
            sim_ms: self.now_ms(),
            applied,
            entries_checked: self.observed.len() as u64,
            ledger_ahead_max_ms: self.observed.max_ahead_ms().unwrap_or(0),
            ..ScenarioReport::default()
        })
    }
}

/// The openraft race of issue 10 (third_party/openraft/RATION-PATCH.md), on purpose.
///
/// Every disk purges slowly (400 ms), so a leader's core sits inside each purge.
/// A follower F is cut off (its links held) until it has campaigned into a higher
/// term and the leader has snapshotted and purged past F's log. F's links are
/// released while the leader is inside a purge: F answers the leader's pending
/// AppendEntries with its higher vote, the replication task queues that notice
/// and exits, and when the purge returns the leader's core asks the closed
/// channel to ship F a snapshot. Upstream openraft 0.9.25 stopped the core there
/// for good; the patched one logs a warning, handles the notice and steps down.
/// Repeated (at most 12 times) until the patched path has been taken.
pub fn higher_vote_during_a_slow_purge() -> Result<ScenarioReport, String> {
    let hits = Arc::new(AtomicU64::new(0));
    let logs = std::env::var("RATION_SIM_LOG").ok().map(|filter| {
        tracing_subscriber::Layer::with_filter(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_timer(crate::SimTime)
                .with_writer(std::io::stderr),
            tracing_subscriber::EnvFilter::new(filter),
        )
    });
    let _count = tracing::subscriber::set_default(tracing_subscriber::layer::SubscriberExt::with(
        tracing_subscriber::layer::SubscriberExt::with(
            tracing_subscriber::registry(),
            PatchedPath(hits.clone()),
        ),
        logs,
    ));
    // Snapshots every 100 entries: a follower cut off right after a purge has time
    // to campaign before the next purge passes its log. A heartbeat at every commit,
    // as when the race was found: the replication streams' timing decides whether
    // the race is reached within 12 tries.
    let mut c = Cluster::new(10, 3, |config| {
        config.snapshot_after_entries = 100;
        config.commit_heartbeat = true;
    });
    if !c.run_until(SETUP_TIMEOUT_MS, |c| c.shared.live.load(Relaxed) && c.leader().is_some())? {
        return Err("no leader accepted the budgets".into());
    }
    for disk in c.disks.values() {
        disk.set_purge_delay(SLOW_PURGE);
    }
    let mut attempts = 0;
    while hits.load(Relaxed) == 0 && attempts < MAX_RACE_ATTEMPTS {
        attempts += 1;
        let Some(leader) = c.leader() else {
            c.run_until(REELECTION_TIMEOUT_MS, |c| c.leader().is_some())?;
            continue;
        };
        let follower = (1..=c.voters).find(|i| *i != leader).unwrap_or(2);
        let leader_disk = c.disks[&leader].clone();
        // Right after a purge, F is cut off, up to date.
        c.run_until(PURGE_START_TIMEOUT_MS, |_| leader_disk.purges_in_progress() > 0)?;
        c.run_until(PURGE_END_TIMEOUT_MS, |_| leader_disk.purges_in_progress() == 0)?;
        c.set_held(follower, true);
        // F campaigns into a higher term.
        c.run_until(CAMPAIGN_TIMEOUT_MS, |c| {
            let (Some(f), Some(l)) = (c.metrics(follower), c.metrics(leader)) else {
                return false;
            };
            f.current_term > l.current_term
        })?;
        // The next purge passes F's log: F is released while the leader's core is
        // inside it.
        c.run_until(PURGE_START_TIMEOUT_MS, |_| leader_disk.purges_in_progress() > 0)?;
        c.set_held(follower, false);
        c.run_until(AFTER_RELEASE_MS, |_| false)?;
    }
    let hit = hits.load(Relaxed);
    let mut report = c.converge()?;
    report.race_hits = hit;
    report.attempts = attempts;
    Ok(report)
}

/// A Raft core that stops (here: its disk fails, so openraft gets an I/O error
/// from the log store, which it treats as fatal) ends its host; the supervisor
/// restarts it from its disk, and the cluster converges with it.
pub fn a_stopped_core_is_restarted() -> Result<ScenarioReport, String> {
    let mut c = Cluster::new(11, 3, |_| {});
    if !c.run_until(SETUP_TIMEOUT_MS, |c| c.shared.live.load(Relaxed) && c.leader().is_some())? {
        return Err("no leader accepted the budgets".into());
    }
    c.run_until(BEFORE_DISK_FAILURE_MS, |_| false)?;
    let leader = c.leader().ok_or("the leader vanished")?;
    let disk = c.disks[&leader].clone();
    disk.set_failing(true);
    let now = c.now_ms();
    c.tracer.event(now, format!("n{leader}: its disk fails"));
    let stopped = c.shared.clone();
    if !c.run_until(CORE_STOP_TIMEOUT_MS, |c| {
        !stopped.nodes.lock().map_or(true, |n| n.contains_key(&leader))
            || !c.report.core_stops.is_empty()
    })? {
        return Err(format!("node {leader}'s core kept running on a failed disk"));
    }
    // The disk is replaced before the supervisor restarts the node.
    disk.set_failing(false);
    c.run_until(RESTART_TIMEOUT_MS, |c| c.report.faults.contains_key("core_restart"))?;
    c.run_until(AFTER_RESTART_MS, |_| false)?;
    c.converge()
}

/// A follower forwards writes to the leader over a cached channel. The leader is
/// cut off for 400 ms (shorter than any election timeout, so it stays leader);
/// the connection stalls for good (turmoil, like a real network that dropped the
/// segments, never resends). Forwarded calls then time out (CANCELLED, not
/// UNAVAILABLE), and a follower that kept the channel would never forward again:
/// followers never dial the leader for Raft, so nothing else replaces it. Writes
/// through the follower must succeed again soon after the link is repaired.
pub fn forwarding_recovers_after_a_stalled_connection() -> Result<ScenarioReport, String> {
    let mut c = Cluster::new(12, 3, |_| {});
    if !c.run_until(SETUP_TIMEOUT_MS, |c| c.shared.live.load(Relaxed) && c.leader().is_some())? {
        return Err("no leader accepted the budgets".into());
    }
    let leader = c.leader().ok_or("no leader")?;
    let follower = (1..=c.voters).find(|i| *i != leader).unwrap_or(2);
    // A client that writes only through the follower, noting when each succeeds.
    let ok_at: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    {
        let ok_at = ok_at.clone();
        let via = addr(follower);
        let stop = c.shared.clone();
        c.sim.client("via-follower", async move {
            let mut request_id = 0u64;
            while !stop.stop_spending.load(Relaxed) {
                request_id += 1;
                let req = acquire_one(
                    "via-follower",
                    request_id,
                    "via-follower",
                    PROBE_BUDGET,
                    WRITER_LEASE_TTL_MS,
                );
                let mut client =
                    v1::ledger_client::LedgerClient::new(net::channel(&via, CLIENT_RPC_TIMEOUT));
                if client.acquire(req).await.is_ok() {
                    let now = turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64);
                    ok_at.lock().unwrap_or_else(|p| p.into_inner()).push(now);
                }
                tokio::time::sleep(VIA_FOLLOWER_GAP).await;
            }
            Ok(())
        });
    }
    c.run_until(BEFORE_CUT_OFF_MS, |_| false)?;
    let before = ok_at.lock().unwrap_or_else(|p| p.into_inner()).len();
    if before == 0 {
        return Err("no write through the follower succeeded before the fault".into());
    }
    let others: Vec<u64> = (1..=c.voters).filter(|o| *o != leader).collect();
    for o in &others {
        c.sim.partition(host(leader), host(*o));
    }
    let now = c.now_ms();
    c.tracer.event(now, format!("n{leader}: cut off for {LEADER_CUT_OFF_MS} ms"));
    c.run_until(LEADER_CUT_OFF_MS, |_| false)?;
    for o in &others {
        c.sim.repair(host(leader), host(*o));
    }
    let repaired = c.now_ms();
    c.run_until(AFTER_REPAIR_MS, |_| false)?;
    if c.leader() != Some(leader) {
        return Err(format!(
            "leadership moved (to {:?}): the scenario did not test a stalled channel to a live leader",
            c.leader()
        ));
    }
    let after: Vec<u64> = ok_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .filter(|t| *t > repaired)
        .collect();
    let first = after.first().copied();
    let mut report = c.converge()?;
    report.attempts = after.len() as u64;
    match first {
        Some(t) if t <= repaired + FORWARDING_RECOVERY_LIMIT_MS => {
            report.sim_ms = t - repaired;
            Ok(report)
        }
        Some(t) => Err(format!(
            "the first write through the follower after repair took {} ms",
            t - repaired
        )),
        None => Err("no write through the follower succeeded after the link was repaired".into()),
    }
}

/// Ledger time under two fast wall clocks in a row (found by soak seed 5036). The
/// leader's wall clock jumps 30 s ahead, sees its clock disagree with the voters'
/// and hands leadership over. Its clock is repaired; 3 s later the new leader's
/// clock jumps 30 s ahead too. When seed 5036 was found, each such leader stamped
/// its estimate plus the clock slack, and the second term's base started from
/// ledger time the first had moved a slack ahead: two slacks. A clock beyond the
/// tolerance is no longer used at all (`ration_core::timebound`), so neither moves
/// ledger time ahead; the running checks still allow one slack per forward step
/// ([`crate::checks`]), and the report says how far ahead ledger time got.
pub fn two_fast_leaders_in_a_row() -> Result<ScenarioReport, String> {
    const STEP_MS: i64 = 30_000;
    let mut c = Cluster::new(13, 3, |_| {});
    if !c.run_until(SETUP_TIMEOUT_MS, |c| c.shared.live.load(Relaxed) && c.leader().is_some())? {
        return Err("no leader accepted the budgets".into());
    }
    c.run_until(FAST_CLOCK_SETTLE_MS, |_| false)?;
    let first = c.leader().ok_or("no leader")?;
    c.step_clock(first, STEP_MS);
    if !c.run_until(FAST_LEADER_HANDOVER_TIMEOUT_MS, |c| c.leader().is_some_and(|l| l != first))? {
        return Err(format!("n{first} kept leading with its clock {STEP_MS} ms fast"));
    }
    c.step_clock(first, -STEP_MS);
    c.run_until(FAST_CLOCK_SETTLE_MS, |_| false)?;
    let second = c.leader().ok_or("no leader")?;
    if second == first {
        return Err(format!("n{first} leads again: the scenario needs a second leader"));
    }
    c.step_clock(second, STEP_MS);
    c.run_until(FAST_LEADER_HANDOVER_TIMEOUT_MS, |c| c.leader().is_some_and(|l| l != second))?;
    c.step_clock(second, -STEP_MS);
    c.run_until(FAST_CLOCK_SETTLE_MS, |_| false)?;
    let mut report = c.converge()?;
    report.attempts = 2;
    Ok(report)
}

/// Counts the patched openraft path's warning.
struct PatchedPath(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PatchedPath {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}").contains("(ration patch)") {
                    self.0 = true;
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        if m.0 {
            self.0.fetch_add(1, Relaxed);
        }
    }
}

/// (admitted, refused) per minute of true time, by its start.
type Minutes = BTreeMap<u64, (u64, u64)>;

/// What [`per_minute_limit_across_boundaries`] saw, per minute of true time.
#[derive(Clone, Debug, Default)]
pub struct MinuteReport {
    /// The scenario's cluster report.
    pub cluster: ScenarioReport,
    /// The per-minute cap.
    pub cap: u64,
    /// (minute start in ms since the epoch, admitted, refused) for each whole minute
    /// spent at half the cap, then each whole minute spent at twice it.
    pub below_cap: Vec<(u64, u64, u64)>,
    pub above_cap: Vec<(u64, u64, u64)>,
}

/// A per-minute limit spent continuously across window boundaries by one gateway
/// running the SDK with its default settings (only its transport is the
/// simulation's): five minutes at half the cap, then three at 2.5 times it. Every call
/// costs one unit; the gateway's clock is exact. The report says, per minute of
/// true time, what was admitted and refused: below the cap nothing should be
/// refused (the boundary is no gap: a lease for the next window is acquired before
/// it opens); above it, refusals should come only once the minute's cap is spent,
/// and no minute should admit more than the cap.
pub fn per_minute_limit_across_boundaries() -> Result<MinuteReport, String> {
    const BUDGET: &str = "minutely";
    const UNIT_CALLS: &str = "calls";
    const CAP: u64 = 12_000;
    // One call every 10 ms is 6,000 a minute (half the cap); five every 10 ms is
    // 30,000 (two and a half times it).
    const GAP: Duration = Duration::from_millis(10);
    const MINUTES: [u64; 2] = [5, 3];
    const MINUTE_MS: u64 = 60_000;
    let mut c = Cluster::new_for(17, 3, Duration::from_secs(15 * 60), |_| {});
    if !c.run_until(SETUP_TIMEOUT_MS, |c| c.shared.live.load(Relaxed) && c.leader().is_some())? {
        return Err("no leader accepted the budgets".into());
    }
    // (true minute start, admitted, refused), per phase
    let tally: Arc<std::sync::Mutex<[Minutes; 2]>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let tally = tally.clone();
        let done = done.clone();
        let endpoints: Vec<String> = (1..=c.voters).map(addr).collect();
        c.sim.client("minute-gateway", async move {
            let create = v1::CreateBudgetRequest {
                meta: Some(v1::RequestMeta {
                    client_id: "minute-operator".into(),
                    request_id: 1,
                    principal: "operator".into(),
                    ..Default::default()
                }),
                path: BUDGET.into(),
                limits: vec![v1::Limit {
                    unit: UNIT_CALLS.into(),
                    cap: CAP as i64,
                    window: Some(v1::Window {
                        period: v1::Period::Minute as i32,
                        offset_minutes: 0,
                    }),
                    static_allowance: None,
                }],
            };
            let mut created = false;
            for at in endpoints.iter().cycle().take(30) {
                let mut l =
                    v1::ledger_client::LedgerClient::new(net::channel(at, CLIENT_RPC_TIMEOUT));
                match l.create_budget(create.clone()).await {
                    Ok(_) => {
                        created = true;
                        break;
                    }
                    Err(s) if s.code() == tonic::Code::AlreadyExists => {
                        created = true;
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            if !created {
                return Err("could not create the per-minute budget".into());
            }
            let clock = ration_client::CoarseClock::new();
            let ticking = clock.clone();
            // True time: the epoch plus simulated time (the gateway's clock is exact).
            let now_ms =
                || EPOCH_MS + turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64;
            tokio::spawn(async move {
                loop {
                    ticking.set_ms(now_ms());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            let mut config = ration_client::SdkConfig::new(endpoints, "minute-gw");
            config.cluster.connector = Some(ration_client::Connector(Arc::new(|a: &str| {
                net::channel(a, ration_client::refill::defaults::RPC_TIMEOUT)
            })));
            config.cluster.client_id = Some("minute-gw".into());
            let sdk = ration_client::Sdk::start(config, clock).map_err(|e| e.to_string())?;
            let handle = sdk.handle(BUDGET, UNIT_CALLS);
            // Warm up until the next minute starts, then count whole minutes.
            let first = (now_ms() / MINUTE_MS + 1) * MINUTE_MS;
            for (phase, calls) in [(0usize, 1u64), (1, 5)] {
                let start = if phase == 0 { first } else { first + MINUTES[0] * MINUTE_MS };
                let end = start + MINUTES[phase] * MINUTE_MS;
                loop {
                    let now = now_ms();
                    if now >= end {
                        break;
                    }
                    for _ in 0..calls {
                        let ok = handle.try_spend(1);
                        if now >= start {
                            let minute = now / MINUTE_MS * MINUTE_MS;
                            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                            let e = t[phase].entry(minute).or_default();
                            if ok {
                                e.0 += 1;
                            } else {
                                e.1 += 1;
                            }
                        }
                    }
                    tokio::time::sleep(GAP).await;
                }
            }
            done.store(true, Relaxed);
            drop(sdk);
            Ok(())
        });
    }
    let limit = (MINUTES[0] + MINUTES[1] + 2) * MINUTE_MS;
    if !c.run_until(limit, |_| done.load(Relaxed))? {
        return Err("the gateway did not finish its minutes".into());
    }
    let cluster = c.converge()?;
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let rows = |m: &BTreeMap<u64, (u64, u64)>| m.iter().map(|(k, (a, r))| (*k, *a, *r)).collect();
    Ok(MinuteReport { cluster, cap: CAP, below_cap: rows(&t[0]), above_cap: rows(&t[1]) })
}
