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

mod actors;
mod checks;
mod faults;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::SeedableRng;
use ration_store::mem::MemDisk;

pub use checks::{CheckError, Observed};
pub use report::{replay_command, Failure, Report};

use actors::{addr, host, Shared, Supervisor};
use checks::{applied, check_final, check_running, converged, note_leaders};
use faults::Chaos;
use report::{Trace, Tracer};

/// The simulation's wall clock starts here (2025-11-28T00:00:00Z), so runs are
/// reproducible to the millisecond.
const EPOCH_MS: u64 = 1_764_288_000_000;
/// How long faults are injected, unless configured (`SimConfig::chaos`).
const DEFAULT_CHAOS: Duration = Duration::from_secs(8);
/// The root budget's lifetime cap, unless configured (`SimConfig::cap`).
const DEFAULT_CAP_TOKENS: u64 = 3_000;
/// Mixed into the seed for the harness's own generator (clocks, fsync times, the
/// fault schedule, restart delays).
const HARNESS_RNG_SALT: u64 = 0x005e_ed0f_5eed;
/// A run may go on this long past its chaos window: setup and settling.
const SIM_DURATION_AFTER_CHAOS: Duration = Duration::from_secs(90);
/// One simulation step. Coarse steps keep a seed cheap; Raft's timers (100 ms
/// heartbeats) are far coarser still.
const SIM_TICK: Duration = Duration::from_millis(10);
const MIN_MESSAGE_LATENCY: Duration = Duration::from_micros(200);
/// The maximum message latency outside `slow_links` faults.
const MAX_MESSAGE_LATENCY: Duration = Duration::from_millis(4);
/// Messages in flight on one simulated TCP connection.
const TCP_CAPACITY_MESSAGES: usize = 256;
/// The cluster must accept the budgets within this much simulated time.
const SETUP_DEADLINE_MS: u64 = 30_000;
/// After healing, the cluster must converge (and serve a grant) within this.
const CONVERGENCE_TIMEOUT_MS: u64 = 60_000;
/// The running checks are made every this many steps (250 ms of simulated time).
const CHECK_EVERY_STEPS: u64 = 25;

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
    /// Keep each node's Raft log in the production write-ahead log on simulated
    /// files, and make every crash a power cut that loses what was not synced
    /// (tearing the last write half of the time). False: the in-memory log store
    /// the seeds before it ran on.
    pub wal: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3,
            gateways: 4,
            chaos: DEFAULT_CHAOS,
            cap: DEFAULT_CAP_TOKENS,
            faults: true,
            disk_failures: true,
            wal: true,
        }
    }
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig) -> Result<Report, Failure> {
    install_panic_hook();
    // Every host runs on this thread: the SDK's spending stripe must not depend on
    // which tests ran on other threads before (a seed replays in any process).
    ration_client::local::pin_thread_stripe(0);
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
    let result = run_inner(cfg);
    RUNNING_SEED.with(|s| s.set(None));
    ration_store::runtime::seed_thread_rng(None);
    result
}

fn run_inner(cfg: &SimConfig) -> Result<Report, Failure> {
    // Set up, in this order (the seeded draws depend on it): the nodes, the
    // operator, the gateways, the probe, the fault schedule.
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ HARNESS_RNG_SALT);
    let mut sim = build_sim(cfg);
    let shared = Arc::new(Shared::default());
    let disks = actors::spawn_nodes(&mut sim, cfg, &mut rng, &shared);
    let voters: Vec<String> = (1..=cfg.nodes).map(addr).collect();
    actors::spawn_operator(&mut sim, cfg, &shared, &voters);
    for g in 0..cfg.gateways {
        actors::spawn_gateway(&mut sim, cfg, g, &mut rng, &shared, &voters);
    }
    actors::spawn_probe(&mut sim, cfg, &shared, &voters);
    let mut chaos = Chaos::draw(cfg, &mut rng);
    let mut h = Harness::new(cfg, sim, shared, disks, rng);

    // Run until the budgets exist, then inject faults for `cfg.chaos`.
    let started_chaos = h.wait_until_live()?;
    let chaos_ms = cfg.chaos.as_millis() as u64;
    loop {
        let t = h.now_ms().saturating_sub(started_chaos);
        if t >= chaos_ms {
            break;
        }
        chaos.advance(&mut h, t);
        h.tick()?;
    }

    // Heal everything, stop spending, and let the cluster settle.
    chaos.heal_all(&mut h);
    h.shared.stop_spending.store(true, Relaxed);
    let live_ok = actors::spawn_liveness(&mut h.sim, &voters);
    h.settle(&live_ok)?;

    // Check and report.
    h.finish()
}

fn build_sim<'a>(cfg: &SimConfig) -> turmoil::Sim<'a> {
    turmoil::Builder::new()
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .simulation_duration(cfg.chaos + SIM_DURATION_AFTER_CHAOS)
        .tick_duration(SIM_TICK)
        .min_message_latency(MIN_MESSAGE_LATENCY)
        .max_message_latency(MAX_MESSAGE_LATENCY)
        .tcp_capacity(TCP_CAPACITY_MESSAGES)
        .rng_seed(cfg.seed)
        .enable_random_order()
        .build()
}

/// A run in progress: the simulated cluster, and what the harness keeps about it.
struct Harness<'a> {
    cfg: &'a SimConfig,
    sim: turmoil::Sim<'a>,
    shared: Arc<Shared>,
    disks: BTreeMap<u64, MemDisk>,
    rng: StdRng,
    report: Report,
    trace: Trace,
    tracer: Tracer,
    supervisor: Supervisor,
    observed: Observed,
    leaders_by_term: BTreeMap<u64, BTreeSet<u64>>,
    /// Steps taken since the budgets were accepted.
    steps: u64,
}

impl<'a> Harness<'a> {
    fn new(
        cfg: &'a SimConfig,
        sim: turmoil::Sim<'a>,
        shared: Arc<Shared>,
        disks: BTreeMap<u64, MemDisk>,
        rng: StdRng,
    ) -> Self {
        let mut tracer = Tracer::from_env();
        tracer.event(
            0,
            format!(
                "seed {}: {} voters, a spare (n{}), {} gateways",
                cfg.seed,
                cfg.nodes,
                cfg.nodes + 1,
                cfg.gateways
            ),
        );
        Self {
            cfg,
            sim,
            shared,
            disks,
            rng,
            report: Report { seed: cfg.seed, cap: cfg.cap, ..Report::default() },
            trace: Trace::default(),
            tracer,
            supervisor: Supervisor::default(),
            observed: Observed::default(),
            leaders_by_term: BTreeMap::new(),
            steps: 0,
        }
    }

    fn now_ms(&self) -> u64 {
        self.sim.elapsed().as_millis() as u64
    }

    /// A failure of this run, now.
    fn fail(&self, what: impl std::fmt::Display) -> Failure {
        Failure::new(self.cfg, self.now_ms(), what)
    }

    /// One step of the simulation, nothing else.
    fn step(&mut self) -> Result<(), Failure> {
        self.sim.step().map(|_| ()).map_err(|e| self.fail(format!("a host failed: {e}")))
    }

    /// Steps until the operator has created the budgets; returns when, in ms.
    fn wait_until_live(&mut self) -> Result<u64, Failure> {
        loop {
            self.step()?;
            if self.shared.live.load(Relaxed) {
                return Ok(self.now_ms());
            }
            if self.now_ms() > SETUP_DEADLINE_MS {
                return Err(self.fail("the cluster never accepted the budgets"));
            }
        }
    }

    /// One step, then what follows every step: the supervisor's restarts, the
    /// trace, and every `CHECK_EVERY_STEPS` steps the running checks.
    fn tick(&mut self) -> Result<(), Failure> {
        self.step()?;
        self.steps += 1;
        self.supervisor.poll(
            &mut self.sim,
            &self.shared,
            &mut self.rng,
            &mut self.report,
            &mut self.tracer,
        );
        let now = self.now_ms();
        self.tracer.observe(now, &self.shared);
        if self.steps % CHECK_EVERY_STEPS == 0 {
            check_running(&self.shared, &self.disks, &mut self.observed)
                .map_err(|e| self.fail(e))?;
            note_leaders(&self.shared, &mut self.leaders_by_term, &mut self.report);
        }
        Ok(())
    }

    /// Steps until the liveness grant was served, every gateway has stopped and
    /// the cluster has converged; fails after `CONVERGENCE_TIMEOUT_MS`.
    fn settle(&mut self, live_ok: &AtomicBool) -> Result<(), Failure> {
        let deadline = self.now_ms() + CONVERGENCE_TIMEOUT_MS;
        loop {
            self.tick()?;
            // Checked every step: the leader's ticks keep entries in flight part of the
            // time, so a coarser check could keep landing on one.
            if live_ok.load(Relaxed)
                && self.shared.gateways_done.load(Relaxed) == self.cfg.gateways
                && converged(&self.shared)
            {
                return Ok(());
            }
            if self.now_ms() > deadline {
                let hosts: Vec<(u64, bool)> = (1..=self.cfg.nodes + 1)
                    .map(|i| (i, self.sim.is_host_running(host(i))))
                    .collect();
                return Err(self.fail(format!(
                    "no convergence {} s after healing (liveness grant: {}, gateways done: {}/{}; hosts running: {:?}): {:#?}",
                    CONVERGENCE_TIMEOUT_MS / 1000,
                    live_ok.load(Relaxed),
                    self.shared.gateways_done.load(Relaxed),
                    self.cfg.gateways,
                    hosts,
                    applied(&self.shared)
                )));
            }
        }
    }

    /// The final checks; the report.
    fn finish(mut self) -> Result<Report, Failure> {
        self.report.sim_ms = self.now_ms();
        check_running(&self.shared, &self.disks, &mut self.observed).map_err(|e| self.fail(e))?;
        check_final(
            self.cfg,
            &self.shared,
            &self.disks,
            &self.observed,
            &mut self.report,
            &mut self.trace,
        )
        .map_err(|e| self.fail(e))?;
        self.report.trace = self.trace.finish(&self.report);
        self.tracer.event(self.report.sim_ms, format!("converged and checked: {:?}", self.report));
        Ok(self.report)
    }
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
