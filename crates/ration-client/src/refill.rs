//! Keeping allowances stocked: a background round, every `refresh`, that
//!
//! - retires leases that passed their local deadline or ran dry, releasing them with
//!   what was really spent (the rest returns to the ledger's pool at once);
//! - measures each allowance's spend rate (EWMA over rounds);
//! - acquires `rate × horizon` (at least `initial_request`) when what is held falls
//!   below half of that — the low-water mark — and releases whole leases it holds
//!   beyond that target, so surplus goes back to the pool;
//! - sends all of it in one `Batch` RPC. Acquires and releases that got no answer
//!   are sent again next round with the same request ids.
//!
//! When the cluster cannot be reached, gateways spend what their leases hold until
//! the local deadlines, then follow the budget's policy: refuse (fail closed, the
//! default), or spend an emergency reserve (a budget whose every limit in the unit,
//! along its ancestor chain, declares `static=`). The reserve is real allowance: a
//! lease of the smallest declared amount, acquired and renewed while the cluster
//! answers (so it counts in the ledger's outstanding and is audited), spendable only
//! during an outage (no answer from any member for `outage_after`, transport
//! failures only) and only until the lease's own local deadline, and released with
//! what was spent when contact returns (or charged whole by expiry if the gateway
//! never comes back). Never more than the cap, never unlimited.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ration_proto::v1::batch_op::Op;
use ration_proto::v1::batch_result::Result as R;
use ration_proto::v1::{self, BatchOp};

use crate::local::{Allowance, CoarseClock, LocalClock};
use crate::remote::{Cluster, ClusterConfig, ClusterError};
use crate::{counters, Gateway, Handle, Reservation};

/// How a gateway keeps its allowances stocked.
#[derive(Clone, Debug)]
pub struct SdkConfig {
    pub cluster: ClusterConfig,
    /// How often the refill round runs.
    pub refresh: Duration,
    /// TTL asked for each lease.
    pub lease_ttl: Duration,
    /// Safety margin: the local deadline is `sent_at + lease_ttl - margin`.
    pub margin: Duration,
    /// How much spend to hold: rate × horizon.
    pub horizon: Duration,
    /// What to ask for before any rate is known.
    pub initial_request: u64,
    /// The most one acquire asks for.
    pub max_request: u64,
    /// How long without an answer from any member counts as an outage, when a
    /// budget's emergency reserve may be spent.
    pub outage_after: Duration,
    /// How often a live lease's settled spend is reported (`Report`), if it grew;
    /// zero: only when the lease is released.
    pub report_every: Duration,
    /// A (budget, unit) pair nothing holds (no [`Handle`], [`crate::Reserver`] or
    /// reservation), unused for this long, is forgotten: its leases go back to
    /// the ledger with what was spent, and its memory is freed; a later use starts
    /// it again, empty. Zero: never forgotten.
    pub idle_after: Duration,
    /// How often a pair's fail policy (its `static=` reserve, or fail closed) is
    /// read again, so a changed limit takes effect on gateways that keep running:
    /// a reserve is taken, resized or given back within about this long. At most
    /// [`POLICY_READS_PER_ROUND`] pairs are read again per round. Zero: read once.
    pub policy_refresh: Duration,
}

/// Pairs whose known policy is read again in one round, oldest first: a gateway
/// stocking thousands of pairs spreads the reads over rounds.
pub const POLICY_READS_PER_ROUND: usize = 32;

/// How often the SDK asks every member's `Status` again while none has answered.
const REMEASURE: Duration = Duration::from_secs(5);

/// Weight of the newest round's demand in the demand rate (an EWMA per round).
const RATE_SMOOTHING: f64 = 0.3;

/// Defaults of [`SdkConfig::new`], sized from the cluster's defaults
/// (`ration_server::Config::timing`: a follower campaigns after 0.5-0.7 s of
/// silence, RPC deadline 2 s). The longest a healthy gateway goes without an answer
/// when the leader dies or stops answering is about: the election (0.66 s p50
/// measured after a SIGKILL in one region), plus one RPC deadline spent on the old
/// leader (1 s), plus a round's pause (0.2 s): call it 2-4 s
/// (`crates/rationd/tests/failover.rs` measures it). Leases are topped up when what
/// is held falls to half the horizon, so half the horizon must outlast that gap:
/// 5 s. Voters far apart fail over more slowly (writes resumed up to 5.5 s after a
/// SIGKILL with voters 300 ms apart: benches/README.md, "Across regions"), so the
/// SDK raises its horizon (and lease validity) itself when the cluster's
/// `Status.failover_bound_ms` says so ([`Sdk::horizon`]): these are the least it
/// uses. And a lease must outlive the horizon it stocks.
pub mod defaults {
    use std::time::Duration;

    /// Deadline of one RPC (connect included), raised by four round trips to the
    /// slowest member the SDK measured (`Cluster::rpc_deadline`).
    pub const RPC_TIMEOUT: Duration = Duration::from_secs(1);
    /// Attempts per round across endpoints before the round gives up.
    pub const MAX_ATTEMPTS: u32 = 6;
    /// The most one round's batch may take (attempts, leader discovery, backoff):
    /// an election (up to 2 s, as clusters tuned for distant voters have it) and one
    /// RPC deadline, so a round that starts as the leader dies ends with the new one;
    /// at least two RPC deadlines (`Cluster::round_deadline`).
    pub const ROUND_DEADLINE: Duration = Duration::from_secs(3);
    /// How often the refill task runs a round.
    pub const REFRESH: Duration = Duration::from_millis(200);
    /// Validity asked for each lease: twice the horizon.
    pub const LEASE_TTL: Duration = Duration::from_secs(20);
    /// A lease stops being spent this long before the ledger's expiry.
    pub const MARGIN: Duration = Duration::from_secs(1);
    /// Held allowance is refilled at half of this, so half of it (5 s) must outlast
    /// an RPC deadline, an election and a failover at the current spend rate.
    pub const HORIZON: Duration = Duration::from_secs(10);
    /// What to ask for before any rate is known (units).
    pub const INITIAL_REQUEST: u64 = 100;
    /// The most one acquire asks for (units).
    pub const MAX_REQUEST: u64 = 1 << 40;
    /// No answer from any member for this long is an outage.
    pub const OUTAGE_AFTER: Duration = Duration::from_secs(2);
    /// A live lease's settled spend is reported at most this often (so alert
    /// thresholds, burn rates and webhooks follow spend within seconds, not only
    /// when a lease settles).
    pub const REPORT_EVERY: Duration = Duration::from_secs(2);
    /// A pair nothing holds is forgotten after this long unused: a gateway that
    /// meets a new user or run every second holds at most about 300 pairs more
    /// than it uses, and returns their leases rather than strand them.
    pub const IDLE_AFTER: Duration = Duration::from_secs(300);
    /// A changed fail policy reaches running gateways within about this long (as
    /// a changed price does, [`crate::pricing::PRICE_REFRESH`]).
    pub const POLICY_REFRESH: Duration = Duration::from_secs(30);
}

impl SdkConfig {
    pub fn new(endpoints: Vec<String>, principal: impl Into<String>) -> Self {
        Self {
            cluster: ClusterConfig {
                endpoints,
                principal: principal.into(),
                rpc_timeout: defaults::RPC_TIMEOUT,
                max_attempts: defaults::MAX_ATTEMPTS,
                round_deadline: defaults::ROUND_DEADLINE,
                connector: None,
                tls: None,
                token: None,
                client_id: None,
            },
            refresh: defaults::REFRESH,
            lease_ttl: defaults::LEASE_TTL,
            margin: defaults::MARGIN,
            horizon: defaults::HORIZON,
            initial_request: defaults::INITIAL_REQUEST,
            max_request: defaults::MAX_REQUEST,
            outage_after: defaults::OUTAGE_AFTER,
            report_every: defaults::REPORT_EVERY,
            idle_after: defaults::IDLE_AFTER,
            policy_refresh: defaults::POLICY_REFRESH,
        }
    }
}

/// The policy for when the cluster is unreachable and leases are spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    FailClosed,
    StaticAllowance(u64),
}

#[derive(Debug)]
struct Held {
    lease_id: u64,
    slot: usize,
    generation: u64,
    granted: u64,
    deadline_ms: u64,
    /// Local time a lease for the next window opens (0: open).
    opens_ms: u64,
    /// Settled spend already reported, and when (local ms).
    reported: u64,
    reported_at_ms: u64,
    /// The window boundary (ledger ms) the lease is cut at, if it is.
    cut_at: Option<u64>,
}

/// The next window boundary of a key's limits, as the latest grant told it.
#[derive(Clone, Copy, Debug)]
struct Boundary {
    /// Ledger time of the boundary (a grant's `window_end_ms`).
    ledger_ms: u64,
    /// When it comes on the local clock, estimated late (from when the grant was
    /// received): a lease for the next window is not spent before it.
    local_ms: u64,
}

#[derive(Debug)]
struct Tracked {
    allowance: Arc<Allowance>,
    leases: Vec<Held>,
    /// Units spent from retired leases plus live leases, as of the last round.
    spent_seen: u64,
    spent_retired: u64,
    denied_seen: u64,
    rate_per_s: f64,
    policy: Option<Unreachable>,
    /// Local time the policy was last read (0: never).
    policy_read_ms: u64,
    /// The emergency reserve lease, if the policy asks for one and it is held.
    reserve: Option<ReserveLease>,
    /// Why the ledger last refused the reserve, since it was last held (said
    /// once, when refusals start, and again when the reserve is held).
    reserve_refused: Option<Refused>,
    /// Until when (local ms) no acquire is sent for this key: the ledger refused
    /// one as invalid (or its budget does not exist). Every other key refills.
    quarantined_until: u64,
    /// The next window boundary, from the grant with the latest one.
    boundary: Option<Boundary>,
    /// The boundary (ledger ms) a lease for the next window was last asked for.
    next_asked: u64,
    /// Whether the ledger has answered an acquire for this key (a lease or a
    /// refusal): until then, a refusal here only means "not asked yet".
    answered: bool,
    /// Local time it was last looked up ([`Sdk::handle`]) or had demand.
    last_used_ms: u64,
}

impl Tracked {
    /// Takes `held` out of the allowance and returns its release, with what was
    /// spent from it (counted as spent here too).
    fn let_go(
        &mut self,
        held: &Held,
        cluster: &Cluster,
        key: &(String, String),
        now: u64,
    ) -> Pending {
        let left = self.allowance.retire(held.slot, held.generation).unwrap_or(0);
        let spent = held.granted.saturating_sub(left);
        self.spent_retired += spent;
        Pending {
            op: release(cluster, held.lease_id, spent),
            key: key.clone(),
            sent_at_ms: now,
            reserve: false,
        }
    }
}

/// How long a lease past its local deadline is kept (not spendable) while calls
/// that reserved from it have not settled: an LLM call can outlast a lease.
const SETTLE_WAIT_MS: u64 = 600_000;

/// How long a key whose acquire the ledger refused waits before trying again.
const QUARANTINE: Duration = Duration::from_secs(30);
/// How long a key whose acquire was refused on a precondition (its budget frozen,
/// its run halted or ended, no limit in its unit) is not asked for: the refusal is
/// replicated and remembered, so asking every round would load the cluster for
/// nothing; an unfreeze is seen within this much.
const PAUSE_ON_PRECONDITION: Duration = Duration::from_secs(1);

/// Why the ledger refused an emergency reserve (RESOURCE_EXHAUSTED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// The budget is exhausted (its allowance leased or spent): the next round
    /// makes room from this gateway's own leases ([`Sdk::make_room`]).
    Exhausted,
    /// A per-principal, ledger-wide or run-guard limit, which giving leases back
    /// would not lift.
    Limit,
}

/// A lease held back for outages: not spendable until installed.
#[derive(Debug)]
struct ReserveLease {
    lease_id: u64,
    granted: u64,
    deadline_ms: u64,
    /// Its slot in the allowance while an outage lets it be spent.
    installed: Option<(usize, u64)>,
}

/// A request sent and not yet answered: re-sent as is.
#[derive(Debug)]
struct Pending {
    op: BatchOp,
    key: (String, String),
    sent_at_ms: u64,
    /// An acquire of the emergency reserve (not installed when granted).
    reserve: bool,
}

/// The gateway SDK: local admission plus background refill.
#[derive(Debug)]
pub struct Sdk {
    gateway: Gateway,
    cluster: Arc<Cluster>,
    config: SdkConfig,
    tracked: Mutex<BTreeMap<(String, String), Tracked>>,
    pending: Mutex<Vec<Pending>>,
    ops_sent: std::sync::atomic::AtomicU64,
    /// Pairs forgotten so far (`SdkConfig::idle_after`).
    forgotten: std::sync::atomic::AtomicU64,
    /// Emergency reserve acquires the ledger refused (RESOURCE_EXHAUSTED).
    reserves_refused: std::sync::atomic::AtomicU64,
    /// Local time since which the cluster has not answered (the start of the
    /// first round that got no answer); 0 while it answers.
    unanswered_since_ms: std::sync::atomic::AtomicU64,
    /// Whether reserves are installed (an outage is under way).
    in_outage: std::sync::atomic::AtomicBool,
    /// Local time the last round started (0: none yet).
    last_round_ms: std::sync::atomic::AtomicU64,
    /// Starts a round now instead of at the next tick ([`Sdk::first_answer`]).
    wake: Arc<tokio::sync::Notify>,
    /// Rounds finished so far.
    rounds: tokio::sync::watch::Sender<u64>,
    /// Held by a round from start to end, and by [`Sdk::release_all`], which
    /// waits for the round under way (its grants are then held, and released).
    round_gate: tokio::sync::Mutex<()>,
    /// Set by [`Sdk::release_all`]: no round runs after it.
    stopped: std::sync::atomic::AtomicBool,
    /// The price book, as last read ([`crate::pricing`]).
    prices: std::sync::RwLock<crate::pricing::PriceBook>,
    /// Set while a price-book read runs.
    pricing: std::sync::atomic::AtomicBool,
    /// A model was asked for that the book does not hold: read it again within a
    /// second rather than at the next 30 s refresh.
    pub(crate) price_missed: std::sync::atomic::AtomicBool,
    /// Per budget: subtotals per (model, price version) of calls settled since its
    /// last `usd_micros` release, which the next one carries.
    usage: Mutex<BTreeMap<String, Vec<ration_core::command::UsageLine>>>,
}

impl Sdk {
    /// The connection to the cluster (which member leads and which is nearest).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Starts the SDK and its refill task (on the current tokio runtime).
    pub fn start(config: SdkConfig, clock: Arc<CoarseClock>) -> Result<Arc<Self>, ClusterError> {
        let cluster = Arc::new(Cluster::new(config.cluster.clone())?);
        let sdk = Arc::new(Self {
            gateway: Gateway::new(clock),
            cluster,
            config,
            tracked: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(Vec::new()),
            ops_sent: std::sync::atomic::AtomicU64::new(0),
            forgotten: std::sync::atomic::AtomicU64::new(0),
            reserves_refused: std::sync::atomic::AtomicU64::new(0),
            unanswered_since_ms: std::sync::atomic::AtomicU64::new(0),
            in_outage: std::sync::atomic::AtomicBool::new(false),
            last_round_ms: std::sync::atomic::AtomicU64::new(0),
            wake: Arc::new(tokio::sync::Notify::new()),
            rounds: tokio::sync::watch::Sender::new(0),
            round_gate: tokio::sync::Mutex::new(()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            prices: std::sync::RwLock::default(),
            pricing: std::sync::atomic::AtomicBool::new(false),
            price_missed: std::sync::atomic::AtomicBool::new(false),
            usage: Mutex::new(BTreeMap::new()),
        });
        let weak = Arc::downgrade(&sdk);
        let every = sdk.config.refresh;
        let wake = sdk.wake.clone();
        tokio::spawn(async move {
            // Who leads, and which member is nearest, before the first round.
            match weak.upgrade() {
                Some(sdk) => sdk.cluster.measure().await,
                None => return,
            }
            let mut measured = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = wake.notified() => {}
                }
                let Some(sdk) = weak.upgrade() else { return };
                // No member answered Status yet (a first connection between
                // regions can outlast the RPC deadline): ask again, now and then,
                // until the failover bound is known.
                if sdk.cluster.failover_bound().is_zero() && measured.elapsed() >= REMEASURE {
                    sdk.cluster.measure().await;
                    measured = tokio::time::Instant::now();
                }
                sdk.refresh_prices_now_and_then();
                sdk.round().await;
                sdk.rounds.send_modify(|n| *n += 1);
            }
        });
        Ok(sdk)
    }

    /// The local allowances and their clock, to read. A handle or reserver made
    /// through it is not tracked, so the refill task never stocks it (it admits
    /// nothing): spend through [`Sdk::handle`] and [`Sdk::reserver`].
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub(crate) fn prices(&self) -> std::sync::RwLockReadGuard<'_, crate::pricing::PriceBook> {
        self.prices.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn prices_mut(&self) -> std::sync::RwLockWriteGuard<'_, crate::pricing::PriceBook> {
        self.prices.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the price book in the background when it is older than
    /// [`crate::pricing::PRICE_REFRESH`] (one read at a time).
    fn refresh_prices_now_and_then(self: &Arc<Self>) {
        let age = crate::pricing::wall_ms().saturating_sub(self.prices().fetched_at_ms);
        let every = if self.price_missed.load(std::sync::atomic::Ordering::Acquire) {
            1_000
        } else {
            u64::try_from(crate::pricing::PRICE_REFRESH.as_millis()).unwrap_or(u64::MAX)
        };
        if age < every || self.pricing.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        self.price_missed.store(false, std::sync::atomic::Ordering::Release);
        let sdk = self.clone();
        tokio::spawn(async move {
            sdk.refresh_prices().await;
            sdk.pricing.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// For a `usd_micros` key: moves the budget's usage subtotals onto `op` (a
    /// release or an overrun), which carries them to the ledger exactly once.
    fn attach_usage(&self, key: &(String, String), op: &mut BatchOp) {
        if key.1 != crate::pricing::USD_MICROS {
            return;
        }
        let meta = match &mut op.op {
            Some(Op::Release(r)) => &mut r.meta,
            Some(Op::Overrun(o)) => &mut o.meta,
            _ => return,
        };
        let Some(meta) = meta else { return };
        let lines = self.usage.lock().unwrap_or_else(|p| p.into_inner()).remove(&key.0);
        if let Some(lines) = lines {
            meta.usage.extend(lines.iter().map(crate::pricing::to_proto));
        }
    }

    /// Whether usage subtotals wait for `key`'s next release (a `usd_micros` key).
    fn usage_waits(&self, key: &(String, String)) -> bool {
        key.1 == crate::pricing::USD_MICROS
            && self.usage.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key.0)
    }

    /// Adds a settled call's usage to `budget`'s subtotals per (model, price
    /// version), which the next release (or overrun) of its `usd_micros` lease
    /// carries to the ledger.
    pub fn add_usage(&self, budget: &str, line: &ration_core::command::UsageLine) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        crate::pricing::add_line(usage.entry(budget.to_owned()).or_default(), line);
    }

    /// Queues a `call_recorded` record for the next round (re-sent with the same
    /// request id until the ledger answers).
    pub(crate) fn record_call(
        &self,
        budget: &str,
        trace: &str,
        line: &ration_core::command::UsageLine,
    ) {
        let op = BatchOp {
            op: Some(Op::RecordCall(v1::RecordCallRequest {
                meta: self.cluster.meta(),
                budget: budget.to_owned(),
                trace: trace.to_owned(),
                usage: Some(crate::pricing::to_proto(line)),
            })),
        };
        let key = (budget.to_owned(), crate::pricing::USD_MICROS.to_owned());
        let now = self.gateway.clock().now_ms();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(Pending {
            op,
            key,
            sent_at_ms: now,
            reserve: false,
        });
    }

    /// How long before a lease's expiry (by its ttl, on this clock) it stops being
    /// spent.
    pub fn lease_margin(&self) -> Duration {
        self.config.margin
    }

    /// A handle to spend from (budget, unit); the refill task keeps it stocked
    /// for as long as it is held, and for `idle_after` after the last lookup.
    pub fn handle(&self, budget: &str, unit: &str) -> Handle {
        let handle = self.gateway.handle(budget, unit);
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        self.track(&mut tracked, (budget.to_owned(), unit.to_owned()), &handle);
        handle
    }

    /// As [`Sdk::handle`], unless (budget, unit) is not tracked yet and `max`
    /// pairs already are: then None, and nothing is tracked.
    pub fn handle_within(&self, budget: &str, unit: &str, max: usize) -> Option<Handle> {
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let key = (budget.to_owned(), unit.to_owned());
        if tracked.len() >= max && !tracked.contains_key(&key) {
            return None;
        }
        // (The refill round takes these two locks in this order too.)
        let handle = self.gateway.handle(budget, unit);
        self.track(&mut tracked, key, &handle);
        Some(handle)
    }

    fn track(
        &self,
        tracked: &mut BTreeMap<(String, String), Tracked>,
        key: (String, String),
        handle: &Handle,
    ) {
        let now = self.gateway.clock().now_ms();
        let t = tracked.entry(key).or_insert_with(|| Tracked {
            allowance: handle.allowance().clone(),
            leases: Vec::new(),
            spent_seen: 0,
            spent_retired: 0,
            denied_seen: 0,
            rate_per_s: 0.0,
            policy: None,
            policy_read_ms: 0,
            reserve: None,
            reserve_refused: None,
            quarantined_until: 0,
            boundary: None,
            next_asked: 0,
            answered: false,
            last_used_ms: now,
        });
        // The gateway's allowance and the tracked one are the same: a pair is
        // forgotten from both at once, under this lock (`Sdk::round`).
        debug_assert!(Arc::ptr_eq(&t.allowance, handle.allowance()));
        t.last_used_ms = t.last_used_ms.max(now);
    }

    /// (budget, unit) pairs forgotten so far: nothing held them and they went
    /// unused for `idle_after`.
    pub fn forgotten(&self) -> u64 {
        self.forgotten.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Emergency reserve acquires the ledger refused so far with RESOURCE_EXHAUSTED:
    /// not enough of the cap was left (leases held it), or a per-principal,
    /// ledger-wide or run-guard limit.
    pub fn reserves_refused(&self) -> u64 {
        self.reserves_refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Units of emergency reserve held for (budget, unit): 0 if none.
    pub fn reserve_held(&self, budget: &str, unit: &str) -> u64 {
        let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        tracked
            .get(&(budget.to_owned(), unit.to_owned()))
            .and_then(|t| t.reserve.as_ref())
            .map_or(0, |r| r.granted)
    }

    /// How many (budget, unit) pairs the SDK keeps stocked.
    pub fn tracked_len(&self) -> usize {
        self.tracked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits, at most `within`, until the ledger has answered an acquire for each
    /// of these (budget, unit) keys (tracked through [`Sdk::handle`] first),
    /// starting a round at once rather than at the next tick. For a caller that
    /// meets a key for the first time: its first call finds nothing held only
    /// because nothing was asked yet. Returns whether every key was answered.
    pub async fn first_answer(&self, keys: &[(&str, &str)], within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut rounds = self.rounds.subscribe();
        loop {
            let done = {
                let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
                keys.iter().all(|(b, u)| {
                    tracked.get(&((*b).to_owned(), (*u).to_owned())).is_none_or(|t| t.answered)
                })
            };
            if done {
                return true;
            }
            self.wake.notify_one();
            rounds.borrow_and_update();
            if tokio::time::timeout_at(deadline, rounds.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// Starts a refill round now and waits, at most `within`, until one that
    /// started after this call has finished (so it saw every refusal so far).
    /// For a caller whose allowance ran dry while the budget still has room:
    /// better a short wait than a refusal. Returns whether such a round finished.
    pub async fn refill_now(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut rounds = self.rounds.subscribe();
        let start = *rounds.borrow_and_update();
        self.wake.notify_one();
        // The round under way (if any) may have read demand before this call.
        loop {
            if *rounds.borrow_and_update() >= start + 2 {
                return true;
            }
            if tokio::time::timeout_at(deadline, rounds.changed()).await.is_err() {
                return false;
            }
            self.wake.notify_one();
        }
    }

    /// Whether the cluster answered the last round (false from the first round
    /// that got no answer until one is answered again).
    pub fn answering(&self) -> bool {
        self.unanswered_since_ms.load(std::sync::atomic::Ordering::Acquire) == 0
    }

    /// Whether the ledger has answered an acquire for (budget, unit).
    pub fn answered(&self, budget: &str, unit: &str) -> bool {
        let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        tracked.get(&(budget.to_owned(), unit.to_owned())).is_some_and(|t| t.answered)
    }

    /// A [`crate::Reserver`] for these (budget, unit) pairs, which the refill task
    /// keeps stocked: the allocation-free way to reserve on several at once.
    pub fn reserver<const N: usize>(&self, pairs: [(&str, &str); N]) -> crate::Reserver<N> {
        // The handles hold the tracked allowances until the reserver does, so an
        // idle pair is not forgotten in between (the reserver would then hold an
        // allowance nobody refills).
        let _held = pairs.map(|(b, u)| self.handle(b, u));
        self.gateway.reserver(pairs)
    }

    /// Reserves on several (budget, unit) pairs at once, all or nothing.
    pub fn reserve(&self, wants: &[(&str, &str, u64)]) -> Option<Reservation> {
        // As in `reserver`: held until the reservation holds them.
        let _held: Vec<Handle> = wants.iter().map(|(b, u, _)| self.handle(b, u)).collect();
        self.gateway.reserve(wants)
    }

    /// As [`Sdk::reserve`], but a pair the ledger has not answered yet (a budget
    /// first used now, such as a new user's or run's, made by a template on its
    /// first acquire) is waited for, up to `wait`: a first call is not refused only
    /// because no lease was asked for before it. Once every pair was answered, it
    /// tries for at most five refill periods more (the first lease is sized before
    /// any demand is known; the refusal counts as demand for the next).
    pub async fn reserve_waiting(
        &self,
        wants: &[(&str, &str, u64)],
        wait: Duration,
    ) -> Option<Reservation> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut answered_by: Option<tokio::time::Instant> = None;
        loop {
            if let Some(r) = self.reserve(wants) {
                return Some(r);
            }
            let now = tokio::time::Instant::now();
            if answered_by.is_none() && wants.iter().all(|(b, u, _)| self.answered(b, u)) {
                answered_by = Some(now + self.config.refresh * 5);
            }
            if now >= deadline || answered_by.is_some_and(|by| now >= by) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// How much spend to hold: the configured horizon, or more when the cluster's
    /// Raft timings say a failover may take longer (voters in distant regions):
    /// half of what is held (the low-water mark) must outlast the longest failover
    /// (`Status.failover_bound_ms`) plus a round's deadline.
    pub fn horizon(&self) -> Duration {
        let needed = (self.cluster.failover_bound() + self.cluster.round_deadline()) * 2;
        self.config.horizon.max(needed)
    }

    /// The validity asked for each lease: the configured one, or twice the horizon
    /// when that is longer (a lease must outlive the horizon it stocks).
    pub fn lease_ttl(&self) -> Duration {
        self.config.lease_ttl.max(self.horizon() * 2)
    }

    /// One refill round. Public so tests and benches can drive it directly.
    pub async fn round(&self) {
        let _gate = self.round_gate.lock().await;
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let now = self.gateway.clock().now_ms();
        let ttl_ms = u64::try_from(self.lease_ttl().as_millis()).unwrap_or(u64::MAX);
        let horizon = self.horizon();
        // Demand is measured over the time since the last round really ran: a round
        // that waited on a failover must not read seconds of spend as one period's.
        let last = self.last_round_ms.swap(now.max(1), std::sync::atomic::Ordering::AcqRel);
        let dt_s = if last == 0 {
            self.config.refresh.as_secs_f64()
        } else {
            now.saturating_sub(last) as f64 / 1000.0
        }
        .max(self.config.refresh.as_secs_f64() / 2.0)
        .max(0.001);
        // A lease whose local deadline comes before the next rounds can replace it
        // does not count as held: its successor is fetched while it is still spent.
        let lookahead_ms =
            u64::try_from((self.cluster.round_deadline() + self.config.refresh * 2).as_millis())
                .unwrap_or(u64::MAX);
        // Nor does one that would expire during a failover that starts now: a lease
        // is replaced while what is left of it still outlasts the longest failover
        // the cluster's timings allow (`Status.failover_bound_ms`), or a gateway
        // whose renewal met the leader's death held seconds, not half its horizon.
        let renew_ms = lookahead_ms.saturating_add(
            u64::try_from(self.cluster.failover_bound().as_millis()).unwrap_or(u64::MAX),
        );
        let report_every_ms = u64::try_from(self.config.report_every.as_millis()).unwrap_or(0);
        let mut ops: Vec<Pending> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        // An acquire still waiting for its answer is re-sent, not doubled.
        let resent: std::collections::BTreeSet<(String, String)> = ops
            .iter()
            .filter(|p| !p.reserve && starts_at(&p.op).is_some_and(|s| s == 0))
            .map(|p| p.key.clone())
            .collect();
        let reserve_resent: std::collections::BTreeSet<(String, String)> =
            ops.iter().filter(|p| p.reserve).map(|p| p.key.clone()).collect();
        // Keys with a request still unanswered are not forgotten (an answer, such
        // as an overrun to send again, would find no allowance).
        let busy: std::collections::BTreeSet<(String, String)> =
            ops.iter().map(|p| p.key.clone()).collect();
        let idle_ms = u64::try_from(self.config.idle_after.as_millis()).unwrap_or(u64::MAX);
        let mut forgotten = Vec::new();
        let outage = self.in_outage.load(std::sync::atomic::Ordering::Acquire);
        // Policies not known yet are read before the round's operations are built,
        // so a pair's first round asks for its reserve ahead of its first lease (a
        // lease asked for first could take all that remains of a small cap).
        // Budgets read are shared by keys under one parent.
        let policies_needed: Vec<(String, String)> = {
            let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
            tracked.iter().filter(|(_, t)| t.policy.is_none()).map(|(k, _)| k.clone()).collect()
        };
        let mut read = BTreeMap::new();
        for key in &policies_needed {
            self.learn_policy(key, &mut read, now).await;
        }
        let mut policies_again: Vec<(String, String)> = Vec::new();
        {
            let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
            for (key, t) in tracked.iter_mut() {
                // Retire leases past their local deadline or spent out.
                let slots = t.allowance.slots();
                let mut live_spent = 0;
                let mut keep = Vec::with_capacity(t.leases.len());
                for held in std::mem::take(&mut t.leases) {
                    let st = slots[held.slot];
                    // Run dry by reservations not settled yet is not spent out; and a
                    // lease past its deadline (no longer spendable) is kept while
                    // they settle, up to SETTLE_WAIT, so its release says what they
                    // really used (the ledger charged it by expiry meanwhile, and
                    // refunds the rest on this late release while its window is open).
                    let expired = now >= held.deadline_ms;
                    let settling = expired
                        && st.reserved > 0
                        && now < held.deadline_ms.saturating_add(SETTLE_WAIT_MS);
                    if (expired && !settling)
                        || (st.remaining == 0 && st.reserved == 0)
                        || st.generation != held.generation
                    {
                        let mut op = t.let_go(&held, &self.cluster, key, now);
                        self.attach_usage(key, &mut op.op);
                        ops.push(op);
                    } else {
                        live_spent += held.granted.saturating_sub(st.remaining);
                        let mut held = held;
                        // Settled spend (what reservations still hold may come back).
                        let settled =
                            held.granted.saturating_sub(st.remaining).saturating_sub(st.reserved);
                        if report_every_ms > 0
                            && now >= held.opens_ms
                            && settled > held.reported
                            && now.saturating_sub(held.reported_at_ms) >= report_every_ms
                        {
                            ops.push(Pending {
                                op: report(&self.cluster, held.lease_id, settled - held.reported),
                                key: key.clone(),
                                sent_at_ms: now,
                                reserve: false,
                            });
                            held.reported = settled;
                            held.reported_at_ms = now;
                        }
                        keep.push(held);
                    }
                }
                t.leases = keep;
                // Use beyond what calls reserved and the leases held: the ledger
                // counts it as an overrun (sent again, same request id, until answered).
                let over = t.allowance.take_overruns();
                if over > 0 {
                    let mut op = overrun(&self.cluster, key, over);
                    self.attach_usage(key, &mut op);
                    ops.push(Pending { op, key: key.clone(), sent_at_ms: now, reserve: false });
                }
                // Demand rate: what was spent plus what was asked for and refused.
                let spent = t.spent_retired + live_spent;
                let denied = t.allowance.denied_units();
                let demand =
                    spent.saturating_sub(t.spent_seen) + denied.saturating_sub(t.denied_seen);
                let delta = demand as f64 / dt_s;
                t.spent_seen = spent;
                t.denied_seen = denied;
                if demand > 0 {
                    t.last_used_ms = t.last_used_ms.max(now);
                }
                if idle_ms > 0
                    && over == 0
                    && !outage
                    && now.saturating_sub(t.last_used_ms) >= idle_ms
                    && now >= t.quarantined_until
                    && !busy.contains(key)
                    && !self.usage_waits(key)
                    && self.gateway.forget_unheld(key, &t.allowance)
                {
                    // Nothing holds it, so nothing spends from it any more: its
                    // leases go back with what was spent from them, and use beyond
                    // them recorded since the overruns were taken above (by a
                    // reservation settled meanwhile) is reported.
                    let late = t.allowance.take_overruns();
                    if late > 0 {
                        let mut op = overrun(&self.cluster, key, late);
                        self.attach_usage(key, &mut op);
                        ops.push(Pending { op, key: key.clone(), sent_at_ms: now, reserve: false });
                    }
                    for held in std::mem::take(&mut t.leases) {
                        let mut op = t.let_go(&held, &self.cluster, key, now);
                        self.attach_usage(key, &mut op.op);
                        ops.push(op);
                    }
                    if let Some(r) = t.reserve.take() {
                        let spent = r.installed.map_or(0, |(slot, generation)| {
                            r.granted
                                .saturating_sub(t.allowance.retire(slot, generation).unwrap_or(0))
                        });
                        ops.push(Pending {
                            op: release(&self.cluster, r.lease_id, spent),
                            key: key.clone(),
                            sent_at_ms: now,
                            reserve: false,
                        });
                    }
                    forgotten.push(key.clone());
                    continue;
                }
                t.rate_per_s = if t.rate_per_s == 0.0 {
                    delta
                } else {
                    (1.0 - RATE_SMOOTHING) * t.rate_per_s + RATE_SMOOTHING * delta
                };
                // Low-water: ask for more when what is held falls below half the target.
                let target = (t.rate_per_s * horizon.as_secs_f64()) as u64;
                let target = target.max(self.config.initial_request).min(self.config.max_request);
                // Surplus: leases not needed to cover the target go back now, so
                // allowance is not stranded here while other gateways need it.
                // Leases of a windowed limit end at its boundary and are followed by
                // the next window's lease (below): they keep the shorter lookahead
                // (renewing them early too made a gateway spending half of a
                // per-minute cap meet one refusal in the simulation). Not found yet
                // how to cover a failover there as well.
                let renew = if t.boundary.is_some() { lookahead_ms } else { renew_ms };
                let mut held = t.allowance.available(now.saturating_add(renew));
                // While a lease for the next window waits to open, the current ones
                // are spent until the boundary: none is surplus.
                let opening = t.leases.iter().any(|l| l.opens_ms > now);
                while t.leases.len() > 1 && !opening {
                    let slots = t.allowance.slots();
                    let Some((i, spare)) = t
                        .leases
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| slots[l.slot].reserved == 0)
                        .map(|(i, l)| (i, slots[l.slot].remaining))
                        .filter(|(_, r)| held.saturating_sub(*r) >= target)
                        .max_by_key(|(_, r)| *r)
                    else {
                        break;
                    };
                    let lease = t.leases.swap_remove(i);
                    held = held.saturating_sub(spare);
                    ops.push(t.let_go(&lease, &self.cluster, key, now));
                }
                let mut free_slots =
                    t.allowance.slots().iter().filter(|s| s.deadline_ms == 0).count();
                let quarantined = now < t.quarantined_until;
                // The emergency reserve: held (not spendable) while the cluster
                // answers, renewed once half its validity is gone, returned when the
                // policy no longer asks for it. Left alone during an outage. Asked
                // for before this round's leases (a batch applies in order): a lease
                // asked for first could take all that remains of a small cap.
                if !outage {
                    let wanted = match t.policy {
                        Some(Unreachable::StaticAllowance(units)) if units > 0 => units,
                        _ => 0,
                    };
                    let stale = t.reserve.as_ref().is_some_and(|r| {
                        r.granted != wanted || now.saturating_add(ttl_ms / 2) >= r.deadline_ms
                    });
                    if stale {
                        if let Some(r) = t.reserve.take() {
                            ops.push(Pending {
                                op: release(&self.cluster, r.lease_id, 0),
                                key: key.clone(),
                                sent_at_ms: now,
                                reserve: false,
                            });
                        }
                    }
                    if wanted > 0
                        && t.reserve.is_none()
                        && !reserve_resent.contains(key)
                        && !quarantined
                    {
                        // Refused last time for want of allowance: if this gateway's
                        // own open leases hold what the reserve needs, the ones
                        // holding most go back first (released in this batch, ahead
                        // of the reserve; the leases asked for after it get the
                        // rest). A policy learned late (a budget not yet readable
                        // where the SDK asked) lets a first lease take all of a small
                        // cap. Leases that calls hold reservations on are kept.
                        if t.reserve_refused == Some(Refused::Exhausted)
                            && Self::make_room(t, wanted, now, &self.cluster, key, &mut ops)
                        {
                            held = t.allowance.available(now.saturating_add(renew));
                            free_slots =
                                t.allowance.slots().iter().filter(|s| s.deadline_ms == 0).count();
                        }
                        ops.push(Pending {
                            op: acquire(&self.cluster, key, wanted, wanted, ttl_ms, 0),
                            key: key.clone(),
                            sent_at_ms: now,
                            reserve: true,
                        });
                    }
                }
                // A window boundary ahead (within the lookahead), not yet asked for.
                let boundary = t.boundary.filter(|b| {
                    b.ledger_ms > t.next_asked
                        && now < b.local_ms
                        && b.local_ms <= now.saturating_add(lookahead_ms)
                });
                // Before a boundary every lease ends there, and the next window's lease
                // covers what comes after: what matters is what is held now.
                if boundary.is_some() {
                    held = t.allowance.available(now);
                }
                if held < target / 2 + 1 && free_slots > 0 && !resent.contains(key) && !quarantined
                {
                    free_slots -= 1;
                    let want = target.saturating_sub(held).max(1);
                    ops.push(Pending {
                        op: acquire(&self.cluster, key, want, 1, ttl_ms, 0),
                        key: key.clone(),
                        sent_at_ms: now,
                        reserve: false,
                    });
                }
                // A lease for the next window, asked for now, opens at the boundary,
                // so the boundary (where every lease ends) is not a gap. Once per
                // boundary. If every slot is taken, the lease holding least makes
                // room (released with what was spent from it).
                if let Some(b) = boundary.filter(|_| !quarantined && !outage) {
                    if free_slots == 0 {
                        let slots = t.allowance.slots();
                        if let Some(i) =
                            (0..t.leases.len()).min_by_key(|&i| slots[t.leases[i].slot].remaining)
                        {
                            let lease = t.leases.swap_remove(i);
                            ops.push(t.let_go(&lease, &self.cluster, key, now));
                            free_slots = 1;
                        }
                    }
                    if free_slots > 0 {
                        t.next_asked = b.ledger_ms;
                        // Valid for a full lease after it opens.
                        let ttl = ttl_ms.saturating_add(b.local_ms - now);
                        ops.push(Pending {
                            op: acquire(&self.cluster, key, target.max(1), 1, ttl, b.ledger_ms),
                            key: key.clone(),
                            sent_at_ms: now,
                            reserve: false,
                        });
                    }
                }
            }
            // Forgotten under the same lock: `Sdk::handle` tracks a pair again
            // with the allowance the gateway now has (a new one).
            for key in &forgotten {
                tracked.remove(key);
            }
            if !forgotten.is_empty() {
                let n = forgotten.len() as u64;
                self.forgotten.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(counters::FORGOTTEN).increment(n);
            }
            // Known policies are read again every `policy_refresh`, a few per round.
            let refresh_ms =
                u64::try_from(self.config.policy_refresh.as_millis()).unwrap_or(u64::MAX);
            if refresh_ms > 0 {
                let mut due: Vec<(u64, &(String, String))> = tracked
                    .iter()
                    .filter(|(_, t)| {
                        t.policy.is_some() && now.saturating_sub(t.policy_read_ms) >= refresh_ms
                    })
                    .map(|(k, t)| (t.policy_read_ms, k))
                    .collect();
                due.sort_unstable();
                policies_again =
                    due.into_iter().take(POLICY_READS_PER_ROUND).map(|(_, k)| k.clone()).collect();
                // Counted from this attempt: a read that fails (a member down, the
                // budget deleted) keeps the policy known and waits its turn again.
                for key in &policies_again {
                    if let Some(t) = tracked.get_mut(key) {
                        t.policy_read_ms = now.max(1);
                    }
                }
            }
        }
        // An acquire the ledger would refuse as malformed (a bad budget name or
        // unit) is not sent: its key is quarantined, the others refill.
        ops.retain(|p| match &p.op.op {
            Some(Op::Acquire(a)) => match ration_proto::convert::to_core::acquire(a) {
                Ok(_) => true,
                Err(e) => {
                    self.quarantine(&p.key, now, e.message());
                    false
                }
            },
            _ => true,
        });
        if !ops.is_empty() {
            self.send(ops, now).await;
        }
        // Known policies read again after the round's batch, which they do not
        // change (they take effect next round), so the reads do not delay it. Not
        // while the cluster does not answer, and no more this round after a read
        // that fails: each tries every member, and the round (which `release_all`
        // waits for) must not wait on many of them.
        for key in &policies_again {
            if self.unanswered_since_ms.load(std::sync::atomic::Ordering::Acquire) != 0
                || !self.learn_policy(key, &mut read, now).await
            {
                break;
            }
        }
    }

    /// Sends a round's operations (`now`: the round's start), as batches of at most
    /// the server's limit, and installs what they get.
    async fn send(&self, ops: Vec<Pending>, now: u64) {
        metrics::counter!(counters::REFILLS).increment(1);
        // Rounds larger than the server's batch limit go as several batches.
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<Pending> =
                ops.by_ref().take(ration_proto::convert::MAX_BATCH_OPS).collect();
            let batch: Vec<BatchOp> = chunk.iter().map(|p| p.op.clone()).collect();
            self.ops_sent.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            match self.cluster.batch(batch).await {
                Ok(results) => {
                    let since =
                        self.unanswered_since_ms.swap(0, std::sync::atomic::Ordering::AcqRel);
                    if since > 0 {
                        tracing::info!(
                            "the cluster answers again, after {} ms without an answer",
                            self.gateway.clock().now_ms().saturating_sub(since)
                        );
                    }
                    self.apply_results(chunk, results, now);
                    self.end_outage(self.gateway.clock().now_ms());
                }
                Err(ClusterError::Refused(status)) => {
                    // The whole call was refused (a malformed envelope: a bug on one
                    // side). Acquires are dropped (the next round asks again);
                    // reports and releases are kept, since they carry spend.
                    tracing::error!("the cluster refused a refill batch: {status}");
                    let keep =
                        chunk.into_iter().filter(|p| !matches!(p.op.op, Some(Op::Acquire(_))));
                    self.pending.lock().unwrap_or_else(|p| p.into_inner()).extend(keep);
                }
                Err(e) => {
                    // One WARN line when the cluster stops answering (and one INFO
                    // line when it answers again), not one per round.
                    if self.unanswered_since_ms.load(std::sync::atomic::Ordering::Acquire) == 0 {
                        tracing::warn!(
                            "the cluster did not answer a refill round ({e}); leases are spent \
                             until their deadlines, and rounds go on"
                        );
                    } else {
                        tracing::debug!("refill round got no answer: {e}");
                    }
                    metrics::counter!(counters::FAILOVERS).increment(1);
                    let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    pending.extend(chunk);
                    pending.extend(ops.by_ref());
                    drop(pending);
                    // Only silence counts as an outage (a refusal is an answer), and
                    // only once it has lasted `outage_after` since this SDK first
                    // asked without an answer, however long it was idle before.
                    if matches!(e, ClusterError::Unreachable { .. }) {
                        let since = match self.unanswered_since_ms.compare_exchange(
                            0,
                            now.max(1),
                            std::sync::atomic::Ordering::AcqRel,
                            std::sync::atomic::Ordering::Acquire,
                        ) {
                            Ok(_) => now.max(1),
                            Err(earlier) => earlier,
                        };
                        let silent_ms = self.gateway.clock().now_ms().saturating_sub(since);
                        let outage_ms =
                            u64::try_from(self.config.outage_after.as_millis()).unwrap_or(0);
                        if silent_ms >= outage_ms {
                            self.start_outage();
                        }
                    }
                }
            }
        }
    }

    /// Stops acquiring for `key` for [`QUARANTINE`]: the ledger refuses its
    /// acquires. Logged and counted; every other key keeps refilling.
    fn quarantine(&self, key: &(String, String), now: u64, why: &str) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = tracked.get_mut(key) else { return };
        t.answered = true;
        if now >= t.quarantined_until {
            tracing::warn!(
                budget = %key.0, unit = %key.1,
                "acquires for this budget are refused ({why}); not asking for {} s",
                QUARANTINE.as_secs()
            );
            metrics::counter!(counters::QUARANTINED).increment(1);
        }
        let ms = u64::try_from(QUARANTINE.as_millis()).unwrap_or(u64::MAX);
        t.quarantined_until = now.saturating_add(ms);
    }

    /// Releases `t`'s open leases that no call holds a reservation on, most
    /// remaining first, until `wanted` units are freed, if together they hold that
    /// much (otherwise none: releasing them would not make room by itself). Returns
    /// whether any was released.
    fn make_room(
        t: &mut Tracked,
        wanted: u64,
        now: u64,
        cluster: &Cluster,
        key: &(String, String),
        ops: &mut Vec<Pending>,
    ) -> bool {
        let slots = t.allowance.slots();
        let free = |l: &Held| slots[l.slot].reserved == 0 && l.opens_ms <= now;
        let own: u64 = t.leases.iter().filter(|l| free(l)).map(|l| slots[l.slot].remaining).sum();
        if own < wanted {
            return false;
        }
        let mut freed = 0u64;
        while freed < wanted {
            let Some(i) = (0..t.leases.len())
                .filter(|&i| free(&t.leases[i]))
                .max_by_key(|&i| slots[t.leases[i].slot].remaining)
            else {
                break;
            };
            let lease = t.leases.swap_remove(i);
            freed = freed.saturating_add(slots[lease.slot].remaining);
            ops.push(t.let_go(&lease, cluster, key, now));
        }
        true
    }

    /// Installs what a batch sent at local time `sent` (this round's start) got.
    fn apply_results(&self, ops: Vec<Pending>, results: Vec<v1::BatchResult>, sent: u64) {
        let margin_ms = u64::try_from(self.config.margin.as_millis()).unwrap_or(0);
        let received = self.gateway.clock().now_ms();
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let mut leftovers = Vec::new();
        let mut quarantined = Vec::new();
        // `Cluster::batch` returns exactly one result per operation, in order.
        assert_eq!(ops.len(), results.len(), "one result per operation");
        for (p, r) in ops.into_iter().zip(results) {
            if let (Some(Op::Overrun(o)), Some(R::Error(e))) = (&p.op.op, &r.result) {
                if e.code == tonic::Code::ResourceExhausted as i32
                    || e.code == tonic::Code::PermissionDenied as i32
                {
                    // A per-principal limit (the exactly-once table holds this
                    // principal's maximum), or no role for it (revoked while it held
                    // no lease there): nothing was counted or remembered. The spend
                    // happened, so it goes back to be sent again next round (a sum
                    // per allowance: bounded however long it waits).
                    tracing::warn!(
                        budget = %o.budget, unit = %o.unit, amount = o.amount,
                        "an overrun report waits for the ledger: {}", e.message
                    );
                    match tracked.get(&p.key) {
                        Some(t) => {
                            t.allowance.return_overruns(u64::try_from(o.amount).unwrap_or(0))
                        }
                        // Its pair was forgotten: sent again as it is.
                        None => leftovers.push(p),
                    }
                    continue;
                }
                // The spend happened; only a budget that no longer exists (or a bad
                // name) refuses it. Say so loudly: the ledger could not count it.
                tracing::error!(
                    budget = %o.budget, unit = %o.unit, amount = o.amount,
                    "the ledger refused an overrun report: {}", e.message
                );
            }
            let Some(Op::Acquire(asked)) = &p.op.op else { continue };
            if let Some(t) = tracked.get_mut(&p.key) {
                t.answered = true;
            }
            let (ttl_ms, starts_at_ms) =
                (u64::try_from(asked.ttl_ms).unwrap_or(0), asked.starts_at_ms);
            let lease = match r.result {
                Some(R::Lease(lease)) => lease,
                // A lease for the next window that is refused (a limit changed, the
                // next window is leased out) is not a reason to stop refilling.
                Some(R::Error(_)) if starts_at_ms > 0 => continue,
                Some(R::Error(e)) if refused_for_good(e.code) => {
                    quarantined.push((p.key.clone(), e.message));
                    continue;
                }
                Some(R::Error(e))
                    if p.reserve && e.code == tonic::Code::ResourceExhausted as i32 =>
                {
                    // Not enough left of the cap for the reserve (leases hold it),
                    // or a per-principal or ledger-wide limit: asked for again every
                    // round, said once.
                    self.reserves_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!(counters::RESERVES_REFUSED).increment(1);
                    let why = if budget_exhausted(&e.message) {
                        Refused::Exhausted
                    } else {
                        Refused::Limit
                    };
                    let Some(t) = tracked.get_mut(&p.key) else { continue };
                    if t.reserve_refused.replace(why).is_none() {
                        tracing::warn!(
                            budget = %p.key.0, unit = %p.key.1,
                            "no emergency reserve is held: the ledger refused it ({}); \
                             asked for again every round",
                            e.message
                        );
                    }
                    continue;
                }
                Some(R::Error(e)) if e.code == tonic::Code::FailedPrecondition as i32 => {
                    if let Some(t) = tracked.get_mut(&p.key) {
                        let ms = u64::try_from(PAUSE_ON_PRECONDITION.as_millis()).unwrap_or(0);
                        t.quarantined_until = t.quarantined_until.max(received.saturating_add(ms));
                    }
                    continue;
                }
                _ => continue,
            };
            let granted = u64::try_from(lease.granted).unwrap_or(0);
            let Some(t) = tracked.get_mut(&p.key) else { continue };
            // The local deadline counts from when the acquire was first sent, for the
            // validity the ledger granted (the ttl asked for, cut at the window's end).
            let granted_ttl = u64::try_from(lease.ttl_ms).unwrap_or(0).min(ttl_ms);
            // A lease cut at its window's end is spent until the boundary (estimated
            // early, from when it was asked for), where the next window's lease
            // opens (estimated late): no gap, no overlap. Its leftover is charged by
            // expiry at the boundary, and the release that follows gives the unspent
            // part back to every limit whose window is still open. Any other lease
            // stops `margin` early, so its release lands before its expiry.
            let cut = lease.window_end_ms == Some(lease.expires_at_ms);
            let margin = if cut { 0 } else { margin_ms };
            let deadline = p.sent_at_ms.saturating_add(granted_ttl.saturating_sub(margin));
            // Ledger time when it was granted. A later ledger time comes, on the local
            // clock, no earlier than that much after this batch was sent (the grant
            // was stamped after), nor later than that much after it was answered.
            let granted_at = lease.expires_at_ms.saturating_sub(granted_ttl);
            let after = |from: u64, ledger_ms: u64| {
                from.saturating_add(ledger_ms.saturating_sub(granted_at))
            };
            // (None: the lease's windows never end.)
            if let Some(end) =
                lease.window_end_ms.filter(|e| t.boundary.is_none_or(|b| *e > b.ledger_ms))
            {
                let local_ms = after(received, end);
                t.boundary = Some(Boundary { ledger_ms: end, local_ms });
            }
            // A lease for the next window opens at the boundary it was asked for,
            // measured as the current leases' end is (from when the request was
            // sent), so they hand over with no gap; the ledger counts all of it in
            // the next window. Open at once if ledger time had reached it.
            let mut opens = if starts_at_ms > granted_at { after(sent, starts_at_ms) } else { 0 };
            // Each estimate of the boundary on the local clock is off by its own
            // request's one-way delay: the current leases' end (early) and this
            // one's opening (late) may leave a gap of the difference, where calls
            // would be refused below the cap. Open no later than the current
            // leases cut at this boundary end (each lease still counts in its own
            // window at the ledger).
            if opens > 0 {
                if let Some(end) = t
                    .leases
                    .iter()
                    .filter(|l| l.cut_at == Some(starts_at_ms))
                    .map(|l| l.deadline_ms)
                    .min()
                {
                    opens = opens.min(end);
                }
            }
            if p.reserve {
                let lease = ReserveLease {
                    lease_id: lease.lease_id,
                    granted,
                    deadline_ms: deadline,
                    installed: None,
                };
                // One reserve at a time: a second (an answer to a re-sent acquire
                // after a renewal) goes back at once.
                if t.reserve_refused.take().is_some() {
                    tracing::info!(
                        budget = %p.key.0, unit = %p.key.1,
                        "the emergency reserve is held again ({granted} units)"
                    );
                }
                match t.reserve {
                    None => t.reserve = Some(lease),
                    Some(_) => leftovers.push(Pending {
                        op: release(&self.cluster, lease.lease_id, 0),
                        reserve: false,
                        ..p
                    }),
                }
                continue;
            }
            match t.allowance.install_from(granted, opens, deadline) {
                Some(st) => t.leases.push(Held {
                    lease_id: lease.lease_id,
                    slot: st.slot,
                    generation: st.generation,
                    granted,
                    deadline_ms: deadline,
                    opens_ms: opens,
                    reported: 0,
                    reported_at_ms: received,
                    cut_at: if cut { lease.window_end_ms } else { None },
                }),
                // No room (cannot happen with one acquire in flight): give it back.
                None => leftovers.push(Pending {
                    op: release(&self.cluster, lease.lease_id, 0),
                    reserve: false,
                    ..p
                }),
            }
        }
        drop(tracked);
        if !leftovers.is_empty() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).extend(leftovers);
        }
        let now = self.gateway.clock().now_ms();
        for (key, why) in quarantined {
            self.quarantine(&key, now, &why);
        }
    }

    /// Reads the policy for this budget and unit: the strictest along its ancestor
    /// chain and across its limits in the unit. Any limit in the unit without
    /// `static=` fails closed; otherwise the smallest declared amount. Unknown until
    /// the cluster answers for every budget of the chain, which means fail closed.
    /// A leaf its parent's template has not made yet counts with the template's
    /// limits.
    async fn learn_policy(
        &self,
        key: &(String, String),
        read: &mut BTreeMap<String, Option<v1::Budget>>,
        now: u64,
    ) -> bool {
        let mut chain = Vec::new();
        let mut at = 0;
        while let Some(i) = key.0[at..].find('/') {
            chain.push(&key.0[..at + i]);
            at += i + 1;
        }
        chain.push(&key.0[..]);
        let mut smallest: Option<u64> = None;
        let mut closed = false;
        let mut parent: Option<&str> = None;
        for path in chain {
            if !read.contains_key(path) {
                read.insert(path.to_owned(), self.cluster.get_budget(path).await);
            }
            let limits: Vec<&v1::Limit> = match &read[path] {
                Some(budget) => budget.limits.iter().filter_map(|l| l.limit.as_ref()).collect(),
                // Not made yet by its parent's template: the first acquire makes it
                // with the template's limits.
                None => match parent
                    .and_then(|p| read[p].as_ref())
                    .and_then(|p| p.template.as_ref())
                    .filter(|_| path == key.0)
                {
                    Some(t) => t.limits.iter().collect(),
                    None => return false,
                },
            };
            parent = Some(path);
            for l in limits {
                if l.unit != key.1 {
                    continue;
                }
                match l.static_allowance.and_then(|a| u64::try_from(a).ok()) {
                    Some(a) => smallest = Some(smallest.map_or(a, |s| s.min(a))),
                    None => closed = true,
                }
            }
        }
        let policy = match smallest {
            Some(a) if !closed => Unreachable::StaticAllowance(a),
            _ => Unreachable::FailClosed,
        };
        if let Some(t) = self.tracked.lock().unwrap_or_else(|p| p.into_inner()).get_mut(key) {
            if t.policy.is_some_and(|p| p != policy) {
                tracing::info!(
                    budget = %key.0, unit = %key.1,
                    "the fail policy changed: {:?} (was {:?})", policy, t.policy
                );
            }
            t.policy = Some(policy);
            t.policy_read_ms = now.max(1);
        }
        true
    }

    /// No member has answered for `outage_after`: each reserve held becomes
    /// spendable, until its own lease's local deadline (after which the ledger has
    /// charged it by expiry).
    fn start_outage(&self) {
        if self.in_outage.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        tracing::warn!("no answer from the cluster: emergency reserves may be spent");
        metrics::counter!(counters::OUTAGES).increment(1);
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        for t in tracked.values_mut() {
            if let Some(r) = t.reserve.as_mut().filter(|r| r.installed.is_none()) {
                if let Some(st) = t.allowance.install(r.granted, r.deadline_ms) {
                    r.installed = Some((st.slot, st.generation));
                }
            }
        }
    }

    /// The cluster answered again: every reserve that was spendable is withdrawn
    /// and released with what was spent from it (the ledger records it as
    /// consumption); a new reserve is acquired next round.
    fn end_outage(&self, now: u64) {
        if !self.in_outage.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let mut releases = Vec::new();
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        for (key, t) in tracked.iter_mut() {
            let Some(r) = t.reserve.take_if(|r| r.installed.is_some()) else { continue };
            let (slot, generation) = r.installed.unwrap_or_default();
            let left = t.allowance.retire(slot, generation).unwrap_or(0);
            let spent = r.granted.saturating_sub(left);
            t.spent_retired += spent;
            if spent > 0 {
                tracing::warn!(
                    budget = %key.0, unit = %key.1, spent,
                    "spent from the emergency reserve during the outage; reporting it"
                );
            }
            releases.push(Pending {
                op: release(&self.cluster, r.lease_id, spent),
                key: key.clone(),
                sent_at_ms: now,
                reserve: false,
            });
        }
        drop(tracked);
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).extend(releases);
    }

    /// Ledger operations (acquires and releases) this SDK has sent: its write load
    /// on the cluster.
    pub fn ops_sent(&self) -> u64 {
        self.ops_sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Overrun units calls on (budget, unit) have recorded (see
    /// [`Reservation::settle`]); the refill round reports them to the ledger.
    pub fn gateway_overruns(&self, budget: &str, unit: &str) -> u64 {
        let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        tracked
            .get(&(budget.to_owned(), unit.to_owned()))
            .map_or(0, |t| t.allowance.overruns_total())
    }

    /// (leases held, units held now) for (budget, unit).
    pub fn held(&self, budget: &str, unit: &str) -> (usize, u64) {
        let now = self.gateway.clock().now_ms();
        let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        tracked
            .get(&(budget.to_owned(), unit.to_owned()))
            .map_or((0, 0), |t| (t.leases.len(), t.allowance.available(now)))
    }

    /// Releases every lease held (with what was spent), e.g. before shutdown.
    pub async fn release_all(&self) -> Result<(), ClusterError> {
        // A round under way would install leases granted after this drained them,
        // and nobody would release those: wait for it, and run no other.
        let _gate = self.round_gate.lock().await;
        self.stopped.store(true, std::sync::atomic::Ordering::Release);
        let mut ops = Vec::new();
        {
            let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
            for (key, t) in tracked.iter_mut() {
                let over = t.allowance.take_overruns();
                if over > 0 {
                    let mut op = overrun(&self.cluster, key, over);
                    self.attach_usage(key, &mut op);
                    ops.push(op);
                }
                if let Some(r) = t.reserve.take() {
                    let spent = match r.installed {
                        Some((slot, generation)) => r
                            .granted
                            .saturating_sub(t.allowance.retire(slot, generation).unwrap_or(0)),
                        None => 0,
                    };
                    ops.push(release(&self.cluster, r.lease_id, spent));
                }
                for held in t.leases.drain(..) {
                    let left = t.allowance.retire(held.slot, held.generation).unwrap_or(0);
                    let mut op =
                        release(&self.cluster, held.lease_id, held.granted.saturating_sub(left));
                    self.attach_usage(key, &mut op);
                    ops.push(op);
                }
            }
        }
        ops.extend(
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .map(|p| p.op),
        );
        if !ops.is_empty() {
            // An acquire still unanswered is sent again with its request id: if the
            // ledger granted it (the answer was lost), the grant comes back and is
            // released unspent here rather than left to expire.
            let granted: Vec<BatchOp> = self
                .cluster
                .batch(ops)
                .await?
                .iter()
                .filter_map(|r| match &r.result {
                    Some(R::Lease(lease)) => Some(release(&self.cluster, lease.lease_id, 0)),
                    _ => None,
                })
                .collect();
            if !granted.is_empty() {
                self.cluster.batch(granted).await?;
            }
        }
        Ok(())
    }
}

/// Whether a refused acquire will be refused again however often it is sent (a
/// malformed or unknown budget, a refusal by policy), as opposed to a cap that is
/// reached, a node that is busy, or a precondition that may pass next round (a
/// request id that fell out of the exactly-once window is FAILED_PRECONDITION).
fn refused_for_good(code: i32) -> bool {
    matches!(
        tonic::Code::from(code),
        tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::PermissionDenied
            | tonic::Code::OutOfRange
    )
}

/// The `starts_at_ms` of an acquire (0: an ordinary one); None for other operations.
fn starts_at(op: &BatchOp) -> Option<u64> {
    match &op.op {
        Some(Op::Acquire(a)) => Some(a.starts_at_ms),
        _ => None,
    }
}

fn acquire(
    cluster: &Cluster,
    key: &(String, String),
    wanted: u64,
    min: u64,
    ttl_ms: u64,
    starts_at_ms: u64,
) -> BatchOp {
    let units = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    BatchOp {
        op: Some(Op::Acquire(v1::AcquireRequest {
            meta: cluster.meta(),
            budget: key.0.clone(),
            unit: key.1.clone(),
            wanted: units(wanted),
            min: units(min),
            ttl_ms: units(ttl_ms),
            starts_at_ms,
        })),
    }
}

fn overrun(cluster: &Cluster, key: &(String, String), units: u64) -> BatchOp {
    BatchOp {
        op: Some(Op::Overrun(v1::OverrunRequest {
            meta: cluster.meta(),
            budget: key.0.clone(),
            unit: key.1.clone(),
            amount: i64::try_from(units).unwrap_or(i64::MAX),
        })),
    }
}

fn report(cluster: &Cluster, lease_id: u64, delta: u64) -> BatchOp {
    BatchOp {
        op: Some(Op::Report(v1::ReportRequest {
            meta: cluster.meta(),
            lease_id,
            consumed_delta: i64::try_from(delta).unwrap_or(i64::MAX),
            renew_ttl_ms: None,
        })),
    }
}

/// Whether a RESOURCE_EXHAUSTED refusal's message is the ledger's "budget ... is
/// exhausted" (`ration_core::LedgerError::Exhausted`): the allowance is leased or
/// spent, and not a per-principal, ledger-wide or runaway-guard limit, which
/// releasing leases would not lift.
fn budget_exhausted(message: &str) -> bool {
    message.contains(" is exhausted for ")
}

fn release(cluster: &Cluster, lease_id: u64, spent: u64) -> BatchOp {
    BatchOp {
        op: Some(Op::Release(v1::ReleaseRequest {
            meta: cluster.meta(),
            lease_id,
            consumed_total: i64::try_from(spent).unwrap_or(i64::MAX),
        })),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use super::*;

    /// A refused reserve makes room from the gateway's own leases: the ones holding
    /// most go first, leases a call holds a reservation on stay, and nothing goes
    /// back unless the free leases together hold the reserve.
    #[tokio::test]
    async fn room_for_a_reserve_comes_from_the_leases_holding_most() {
        let cluster = Cluster::new(SdkConfig::new(vec!["127.0.0.1:1".into()], "gw").cluster)
            .expect("a lazy cluster");
        let allowance = Arc::new(crate::Allowance::new());
        let mut t = Tracked {
            allowance: allowance.clone(),
            leases: Vec::new(),
            spent_seen: 0,
            spent_retired: 0,
            denied_seen: 0,
            rate_per_s: 0.0,
            policy: Some(Unreachable::StaticAllowance(20)),
            policy_read_ms: 0,
            reserve: None,
            reserve_refused: Some(Refused::Exhausted),
            quarantined_until: 0,
            boundary: None,
            next_asked: 0,
            answered: true,
            last_used_ms: 0,
        };
        for (id, units) in [(1, 30), (2, 25), (3, 10)] {
            let st = allowance.install_from(units, 0, 1_000_000).unwrap();
            t.leases.push(Held {
                lease_id: id,
                slot: st.slot,
                generation: st.generation,
                granted: units,
                deadline_ms: 1_000_000,
                opens_ms: 0,
                reported: 0,
                reported_at_ms: 0,
                cut_at: None,
            });
        }
        // A call holds 5 of the first lease: that lease stays.
        let call = allowance.try_take(5, 1).unwrap();
        let key = ("b".to_owned(), "tokens".to_owned());
        let released = |ops: &[Pending]| -> Vec<(u64, i64)> {
            ops.iter()
                .map(|p| match &p.op.op {
                    Some(Op::Release(r)) => (r.lease_id, r.consumed_total),
                    other => panic!("not a release: {other:?}"),
                })
                .collect()
        };
        // The free leases hold 35: not enough for 40, so none goes back.
        let mut ops = Vec::new();
        assert!(!Sdk::make_room(&mut t, 40, 1, &cluster, &key, &mut ops));
        assert!(ops.is_empty());
        assert_eq!(t.leases.len(), 3);
        // 20: the lease holding 25 goes back (nothing spent from it), the rest stay.
        assert!(Sdk::make_room(&mut t, 20, 1, &cluster, &key, &mut ops));
        assert_eq!(released(&ops), vec![(2, 0)]);
        let mut kept: Vec<u64> = t.leases.iter().map(|l| l.lease_id).collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![1, 3]);
        assert_eq!(allowance.available(1), 25 + 10);
        drop(call);
    }

    /// Only the ledger's own "exhausted" refusal makes room: a per-principal limit
    /// or a run's guard is not lifted by giving leases back.
    #[test]
    fn only_an_exhausted_budget_makes_room_for_a_reserve() {
        use ration_core::{BudgetPath, LedgerError, Period, Unit, Window};
        let exhausted = LedgerError::Exhausted {
            path: BudgetPath::new("acme").unwrap(),
            unit: Unit::new("tokens").unwrap(),
            window: Window::utc(Period::Lifetime),
            available: 3,
            min: 40,
        };
        assert!(budget_exhausted(&exhausted.to_string()));
        let full = LedgerError::PrincipalLimit {
            principal: "gw".into(),
            what: "live leases".into(),
            max: 10,
        };
        assert!(!budget_exhausted(&full.to_string()));
    }
}
