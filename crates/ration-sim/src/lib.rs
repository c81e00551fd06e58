//! # ration-sim
//!
//! A deterministic simulation of a Ration cluster: the production services,
//! proposer, openraft and gateway SDK run unchanged on turmoil's simulated hosts,
//! network and time; disks are `ration_store::mem` stores whose unflushed writes
//! die with a crash. One seed drives everything: the fault schedule, clock skews,
//! message latencies, openraft's election timeouts and tokio's scheduling choices.
//!
//! A run: 3 (or 5) nodes and a spare, gateways spending a budget tree through the
//! SDK (some of it fail-static, some calls priced above their reservation, one
//! limit per minute), a probe client retrying requests through random nodes, and
//! an operator moving leadership and changing membership, under a seeded schedule
//! of faults. Invariants are checked while it runs and after the faults are
//! healed; a failure names the seed and the command that replays it.

pub mod net;
pub mod scenario;

mod actors;
mod checks;
mod faults;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ration_store::mem::MemDisk;

pub use checks::{CheckError, Observed};
pub use report::{replay_command, Failure, Report};

use actors::{addr, host, Plan, Shared, SimClock, Supervisor};
use checks::{applied, check_final, check_running, converged, gateway_accounts, note_leaders};
use faults::Chaos;
use report::{Trace, Tracer};

/// The simulation's wall clock starts here (2025-11-28T00:00:00Z), so runs are
/// reproducible to the millisecond. With `SimConfig::extended` it starts a little
/// before the next minute instead (drawn per seed: [`WINDOW_ROLLOVER_AT_MS`]), so a
/// per-minute window rolls over while faults are injected.
const EPOCH_MS: u64 = 1_764_288_000_000;
const MINUTE_MS: u64 = 60_000;
/// With `SimConfig::extended`, the first minute boundary comes this long after the
/// simulation starts (drawn per seed): the budgets are accepted after 1 to 3 s, and
/// faults are injected for the 8 s after that.
const WINDOW_ROLLOVER_AT_MS: Range<u64> = 3_000..8_000;

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
    /// The faults and traffic of issue 12: flapping links, steps of a leader's wall
    /// clock, gateways cut off from the cluster; fail-static budgets (emergency
    /// reserves), priced calls whose real cost may be above their reservation
    /// (overruns), and a per-minute limit whose window rolls over during the run.
    /// False: the mix and the budget tree before them, for seeds found then.
    pub extended: bool,
    /// Voters in regions (issue 22): every pair of nodes gets a one-way latency
    /// drawn in 30-150 ms with up to 20 ms of jitter, and the nodes' Raft timings
    /// are derived from the slowest round trip (`voter_rtt_ms`) instead of the
    /// fixed ones the other seeds were found with. Gateways stay next to the nodes.
    pub regions: bool,
    /// The nodes' `commit_heartbeat` (a heartbeat at every commit, openraft's own
    /// behaviour; off by default): on for seeds pinned before it was turned off.
    pub commit_heartbeat: bool,
    /// Issue 20: the leaves that fail closed are not created up front but made by
    /// a template on the root, by the gateways' first acquires (racing, under
    /// faults). Checked: each is made once, is an instance, and every invariant
    /// holds as for a created leaf. Off by default, so seeds pinned before keep
    /// their traffic.
    pub templates: bool,
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
            extended: true,
            regions: false,
            commit_heartbeat: false,
            templates: false,
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
    // The gateways' SDKs log their outages and emergency-reserve spend: counted.
    let sdk_events = Arc::new(SdkEvents::default());
    let _logs = tracing::subscriber::set_default(sdk_event_subscriber(&sdk_events));
    ration_store::runtime::seed_thread_rng(Some(cfg.seed));
    RUNNING_SEED.with(|s| s.set(Some((cfg.seed, cfg.nodes))));
    let result = run_inner(cfg, &sdk_events);
    RUNNING_SEED.with(|s| s.set(None));
    ration_store::runtime::seed_thread_rng(None);
    result
}

fn run_inner(cfg: &SimConfig, sdk_events: &Arc<SdkEvents>) -> Result<Report, Failure> {
    // Set up, in this order (the seeded draws depend on it): the epoch and the
    // budget tree, the nodes, the operator, the gateways, the probe, the fault
    // schedule.
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ HARNESS_RNG_SALT);
    let epoch_ms = if cfg.extended {
        EPOCH_MS + MINUTE_MS - rng.gen_range(WINDOW_ROLLOVER_AT_MS)
    } else {
        EPOCH_MS
    };
    let plan = Plan::draw(cfg, &mut rng);
    let mut sim = build_sim(cfg, epoch_ms);
    let shared = Arc::new(Shared::default());
    shared.epoch_ms.store(epoch_ms, Relaxed);
    let (disks, clocks) = actors::spawn_nodes(&mut sim, cfg, &mut rng, &shared);
    let voters: Vec<String> = (1..=cfg.nodes).map(addr).collect();
    actors::spawn_operator(&mut sim, cfg, &plan, &shared, &voters);
    for g in 0..cfg.gateways {
        actors::spawn_gateway(&mut sim, cfg, &plan, g, &mut rng, &shared, &voters);
    }
    actors::spawn_probe(&mut sim, cfg, &shared, &voters);
    if plan.templated {
        actors::spawn_agents(&mut sim, cfg, &shared, &voters);
    }
    let mut chaos = Chaos::draw(cfg, &mut rng);
    let mut h = Harness::new(cfg, sim, shared, disks, clocks, rng, sdk_events.clone());
    h.accounts_after_stop_ms = plan.longest_lease_ttl().as_millis() as u64;
    h.templated = plan.templated_leaves();
    h.report.events.insert("templated_leaves", h.templated.len() as u64);
    h.report.events.insert("fail_static_leaves", plan.fail_static_leaves());
    h.tracer.event(
        0,
        format!(
            "budgets: {plan:?}, epoch {epoch_ms} (a minute starts every 60 s from {})",
            EPOCH_MS
        ),
    );

    // Run until the budgets exist, then inject faults for `cfg.chaos`.
    let started_chaos = h.wait_until_live()?;
    let chaos_ms = cfg.chaos.as_millis() as u64;
    h.in_chaos = true;
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
    h.in_chaos = false;
    h.shared.stop_spending.store(true, Relaxed);
    h.stopped_at = h.now_ms();
    let live_ok = actors::spawn_liveness(&mut h.sim, &voters);
    h.settle(&live_ok)?;

    // Check and report.
    h.finish()
}

fn build_sim<'a>(cfg: &SimConfig, epoch_ms: u64) -> turmoil::Sim<'a> {
    turmoil::Builder::new()
        .epoch(UNIX_EPOCH + Duration::from_millis(epoch_ms))
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
    clocks: BTreeMap<u64, Arc<SimClock>>,
    rng: StdRng,
    report: Report,
    trace: Trace,
    tracer: Tracer,
    supervisor: Supervisor,
    observed: Observed,
    leaders_by_term: BTreeMap<u64, BTreeSet<u64>>,
    /// Steps taken since the budgets were accepted.
    steps: u64,
    /// Whether faults are being injected.
    in_chaos: bool,
    /// When the gateways were told to stop spending (simulated ms).
    stopped_at: u64,
    /// After the gateways stop spending, the ledger must come to agree with what
    /// they admitted (every lease they spent from released, every overrun
    /// reported); not checked before this long (the longest SDK lease TTL), so that
    /// every lease held when they stopped has passed its local deadline.
    accounts_after_stop_ms: u64,
    /// The leaves the root's template makes (`SimConfig::templates`).
    templated: Vec<&'static str>,
    /// The latest minute (of ledger time) any node had reached, at the last check.
    minute: Option<u64>,
    sdk_events: Arc<SdkEvents>,
}

impl<'a> Harness<'a> {
    fn new(
        cfg: &'a SimConfig,
        sim: turmoil::Sim<'a>,
        shared: Arc<Shared>,
        disks: BTreeMap<u64, MemDisk>,
        clocks: BTreeMap<u64, Arc<SimClock>>,
        rng: StdRng,
        sdk_events: Arc<SdkEvents>,
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
            clocks,
            rng,
            report: Report { seed: cfg.seed, cap: cfg.cap, ..Report::default() },
            trace: Trace::default(),
            tracer,
            supervisor: Supervisor::default(),
            observed: Observed::default(),
            leaders_by_term: BTreeMap::new(),
            steps: 0,
            in_chaos: false,
            stopped_at: 0,
            accounts_after_stop_ms: 0,
            templated: Vec::new(),
            minute: None,
            sdk_events,
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
            check_running(&self.shared, &self.disks, &mut self.observed, now)
                .map_err(|e| self.fail(e))?;
            note_leaders(&self.shared, &mut self.leaders_by_term, &mut self.report);
            self.note_rollover();
        }
        Ok(())
    }

    /// Counts the minute windows that rolled over (in ledger time, on the node
    /// furthest ahead) while faults were injected.
    fn note_rollover(&mut self) {
        let Some(minute) = self.observed.ledger_time_max().map(|t| t / MINUTE_MS) else {
            return;
        };
        if self.in_chaos && self.minute.is_some_and(|m| minute > m) {
            *self.report.events.entry("window_rollover").or_default() +=
                minute - self.minute.unwrap_or(minute);
        }
        self.minute = Some(minute);
    }

    /// Steps until the liveness grant was served, every gateway has stopped and the
    /// ledger agrees with what the gateways admitted (`gateway_accounts`, checked
    /// while their SDKs still run); then shuts the gateways down and steps until
    /// the cluster has converged. Fails after `CONVERGENCE_TIMEOUT_MS`.
    fn settle(&mut self, live_ok: &AtomicBool) -> Result<(), Failure> {
        let deadline = self.now_ms() + CONVERGENCE_TIMEOUT_MS;
        let mut agreed = false;
        loop {
            self.tick()?;
            if !agreed
                && live_ok.load(Relaxed)
                && self.shared.gateways_done.load(Relaxed) == self.cfg.gateways
                && self.now_ms() >= self.stopped_at + self.accounts_after_stop_ms
                && gateway_accounts(&self.shared).is_ok()
            {
                // The SDKs have delivered all they owed. Shut them down, so that the
                // cluster goes quiet and converges (their leases, all unspent now,
                // will expire and be charged: a gateway that vanishes is charged
                // whole, which the final check allows).
                agreed = true;
                self.shared.shutdown.store(true, Relaxed);
                let now = self.now_ms();
                self.tracer.event(now, "the ledger agrees with the gateways; they shut down");
            }
            // Checked every step: the leader's ticks keep entries in flight part of the
            // time, so a coarser check could keep landing on one.
            if agreed && converged(&self.shared) {
                return Ok(());
            }
            if self.now_ms() > deadline {
                if !agreed {
                    if let Err(e) = gateway_accounts(&self.shared) {
                        return Err(self.fail(format!(
                            "{e}, {} s after healing",
                            CONVERGENCE_TIMEOUT_MS / 1000
                        )));
                    }
                }
                let hosts: Vec<(u64, bool)> = (1..=self.cfg.nodes + 1)
                    .map(|i| (i, self.sim.is_host_running(host(i))))
                    .collect();
                return Err(self.fail(format!(
                    "no convergence {} s after healing (liveness grant: {}, gateways done: {}/{}, ledger agreed with them: {agreed}; hosts running: {:?}): {:#?}",
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
        let now = self.now_ms();
        check_running(&self.shared, &self.disks, &mut self.observed, now)
            .map_err(|e| self.fail(e))?;
        self.sdk_events.add_to(&mut self.report);
        check_final(
            self.cfg,
            &self.templated,
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

/// What the gateways' SDKs logged, counted: outages begun (no answer from the
/// cluster for `outage_after`, so emergency reserves became spendable), and units
/// spent from emergency reserves (reported when contact returned).
#[derive(Debug, Default)]
struct SdkEvents {
    outages: AtomicU64,
    reserve_spent: AtomicU64,
}

impl SdkEvents {
    fn add_to(&self, report: &mut Report) {
        report.events.insert("outage", self.outages.load(Relaxed));
        report.events.insert("reserve_units_spent", self.reserve_spent.load(Relaxed));
    }
}

/// The subscriber a run logs to: [`SdkEvents`] counts the SDK's warnings, and
/// `RATION_SIM_LOG` (an env-filter) prints the nodes' own logs. Without
/// `RATION_SIM_LOG` every other callsite is disabled: spans and events cost nothing.
fn sdk_event_subscriber(events: &Arc<SdkEvents>) -> Box<dyn tracing::Subscriber + Send + Sync> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let counted = tracing_subscriber::filter::Targets::new()
        .with_target("ration_client", tracing::Level::WARN);
    let counting = SdkEventLayer(events.clone()).with_filter(counted);
    match std::env::var("RATION_SIM_LOG") {
        Ok(filter) => Box::new(
            tracing_subscriber::registry().with(counting).with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_timer(SimTime)
                    .with_writer(std::io::stderr)
                    .with_filter(tracing_subscriber::EnvFilter::new(filter)),
            ),
        ),
        Err(_) => Box::new(tracing_subscriber::registry().with(counting)),
    }
}

struct SdkEventLayer(Arc<SdkEvents>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SdkEventLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            outage: bool,
            spent: Option<u64>,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message"
                    && format!("{value:?}").contains("emergency reserves may be spent")
                {
                    self.outage = true;
                }
            }
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "spent" {
                    self.spent = Some(value);
                }
            }
            fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                if field.name() == "spent" {
                    self.spent = u64::try_from(value).ok();
                }
            }
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if f.outage {
            self.0.outages.fetch_add(1, Relaxed);
        }
        if let Some(spent) = f.spent {
            self.0.reserve_spent.fetch_add(spent, Relaxed);
        }
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
