//! The agent's decisions: each admission is answered from the leases this agent
//! holds through the SDK (no cluster round trip), charged all or nothing across
//! the descriptors of one call.
//!
//! A call whose descriptors carry a correlation value (the request id) reserves
//! `hits` (the most the request may cost: its max tokens) and keeps the
//! reservation until the stream-done call with the same value settles the real
//! count; a reservation never settled is charged whole after `settle_timeout`. A
//! settle for a reservation already charged by timeout charges only what it used
//! beyond it; a settle for a reservation this agent never made (it restarted, or
//! Envoy sent the request path elsewhere) charges its count whole. Use beyond
//! what was reserved and held is an overrun the SDK reports to the ledger: never
//! left out of the ledger.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ration_client::{LocalClock as _, Reservation, Sdk};
use ration_proto::v1;

use crate::rules::{Descriptor, Match, Rules, Target};

/// Names of the agent's metrics (the SDK's own, `ration_client_*`, are exported
/// beside them).
pub mod counters {
    /// Descriptors answered, by `code` (ok, over_limit) and `phase` (check, settle).
    pub const DESCRIPTORS: &str = "ration_agent_descriptors_total";
    /// Calls answered, by `code`.
    pub const CALLS: &str = "ration_agent_calls_total";
    /// Descriptors no rule matched (not limited).
    pub const UNMATCHED: &str = "ration_agent_unmatched_total";
    /// Descriptors refused for a value that cannot name a budget.
    pub const BAD_VALUES: &str = "ration_agent_bad_values_total";
    /// Reservations charged whole because no stream-done call came in time.
    pub const SETTLE_TIMEOUTS: &str = "ration_agent_settle_timeouts_total";
    /// Stream-done calls with no reservation here: their count charged whole.
    pub const UNRESERVED_SETTLES: &str = "ration_agent_unreserved_settles_total";
    /// Units charged by stream-done calls.
    pub const SETTLED_UNITS: &str = "ration_agent_settled_units_total";
    /// Reservations waiting for their stream-done call.
    pub const PENDING: &str = "ration_agent_pending_reservations";
    /// Ledger operations (acquires, releases, reports) the agent's SDK sent.
    pub const CLUSTER_OPS: &str = "ration_agent_cluster_ops_total";
    /// Calls refused because a limit of the agent itself was reached (`what`).
    pub const AGENT_LIMITS: &str = "ration_agent_limit_refusals_total";
    /// Priced descriptors refused or left unpriced: their model has no price in
    /// force in the price book.
    pub const NO_PRICE: &str = "ration_agent_no_price_total";
}

/// The agent's limits and timings.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A reservation no stream-done call settles is charged whole after this.
    pub settle_timeout: Duration,
    /// The most reservations waiting for their stream-done call.
    pub max_pending: usize,
    /// The most (budget, unit) pairs the agent leases for.
    pub max_budgets: usize,
    /// The longest a call waits for leases rather than refuse: a budget met for
    /// the first time (its first lease), or leases run dry by a burst while the
    /// budget has room (a refill round). Under Envoy's own timeout for the call.
    pub cold_wait: Duration,
    /// The most descriptors in one call.
    pub max_descriptors: usize,
    /// RLQS: how long a quota assignment holds without a newer one.
    pub quota_ttl: Duration,
    /// RLQS: a bucket with no requests for this long is abandoned.
    pub quota_idle: Duration,
    /// RLQS: the most buckets one Envoy's stream may have assigned.
    pub max_buckets_per_stream: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            settle_timeout: Duration::from_secs(300),
            max_pending: 100_000,
            max_budgets: 100_000,
            cold_wait: Duration::from_millis(500),
            max_descriptors: 64,
            quota_ttl: Duration::from_secs(7),
            quota_idle: Duration::from_secs(60),
            max_buckets_per_stream: 10_000,
        }
    }
}

/// A limit as Envoy's answer shows it: the binding limit of the descriptor's
/// budget in its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitView {
    pub cap: u64,
    pub period: v1::Period,
    /// The ledger's unleased remainder (as last read, at most a second or two old)
    /// plus what this agent holds now: what it could still admit at most.
    pub remaining: u64,
    /// Until the window rolls over (none for a lifetime limit).
    pub reset_in: Option<Duration>,
}

/// One descriptor's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub over: bool,
    pub limit: Option<LimitView>,
}

/// A call's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub over: bool,
    pub statuses: Vec<Status>,
}

/// A call refused for what it is, not for any budget (a gRPC error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Invalid(String),
    Exhausted(String),
}

pub(crate) type Key = (String, String);

/// Reservations charged by timeout: what each reserved, by correlation, and when
/// each is forgotten.
type Expired = (HashMap<String, Vec<(Key, u64)>>, VecDeque<(Instant, String)>);

/// A reservation waiting for its stream-done call.
struct Pending {
    reservation: Reservation,
    keys: Vec<Key>,
    /// Per key, for a priced one: the model, which price, and the version the
    /// reservation was priced at (its settle is charged at it).
    prices: Vec<Option<Priced>>,
    deadline: Instant,
}

/// A priced descriptor's model, token kind and price version.
type Priced = (String, crate::rules::TokenKind, ration_client::pricing::PriceVersion);

/// A budget's state as last read from the cluster.
struct Info {
    budget: Option<v1::Budget>,
    touched: Instant,
    fetched: Option<Instant>,
}

/// The agent: rules, the SDK, and reservations waiting to settle.
pub struct Agent {
    sdk: Arc<Sdk>,
    rules: Rules,
    limits: Limits,
    pending: Mutex<HashMap<String, Pending>>,
    /// Reservations charged by timeout, by correlation: what was reserved, so a
    /// late settle charges only the rest. Dropped `settle_timeout` later.
    expired: Mutex<Expired>,
    info: Mutex<BTreeMap<String, Info>>,
    /// Set when the agent stops: RLQS streams deny every bucket and wait for
    /// Envoy's last report, so what it admitted is charged exactly.
    draining: tokio::sync::watch::Sender<bool>,
    /// RLQS streams open.
    streams: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("rules", &self.rules.len()).finish_non_exhaustive()
    }
}

impl Agent {
    pub fn new(sdk: Arc<Sdk>, rules: Rules, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            sdk,
            rules,
            limits,
            pending: Mutex::new(HashMap::new()),
            expired: Mutex::new((HashMap::new(), VecDeque::new())),
            info: Mutex::new(BTreeMap::new()),
            draining: tokio::sync::watch::Sender::new(false),
            streams: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Tells RLQS streams the agent is stopping ([`Agent::draining`]).
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Becomes true once [`Agent::drain`] is called.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// RLQS streams open (counted by [`crate::envoy::Quota`]).
    pub fn streams(&self) -> &std::sync::atomic::AtomicUsize {
        &self.streams
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn sdk(&self) -> &Arc<Sdk> {
        &self.sdk
    }

    /// Reservations waiting for their stream-done call.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Answers one rate limit call: `request_hits` is the call's own hits_addend
    /// (0 means 1), which a descriptor's own overrides.
    pub async fn decide(
        &self,
        domain: &str,
        descriptors: &[Descriptor],
        request_hits: u64,
    ) -> Result<Decision, Refusal> {
        if descriptors.is_empty() {
            return Err(Refusal::Invalid(
                "a rate limit request needs at least one descriptor".into(),
            ));
        }
        if descriptors.len() > self.limits.max_descriptors {
            return Err(Refusal::Invalid(format!(
                "{} descriptors in one request; at most {}",
                descriptors.len(),
                self.limits.max_descriptors
            )));
        }
        if domain.is_empty() {
            return Err(Refusal::Invalid("the domain must not be empty".into()));
        }
        let request_hits = request_hits.max(1);
        let matched: Vec<Match> =
            descriptors.iter().map(|d| self.rules.resolve(domain, d)).collect();
        let settle = matched.iter().any(|m| matches!(m, Match::Target(t) if t.settle));
        let decision = if settle {
            self.settle(descriptors, &matched, request_hits)
        } else {
            self.charge(descriptors, &matched, request_hits).await?
        };
        let code = if decision.over { "over_limit" } else { "ok" };
        metrics::counter!(counters::CALLS, "code" => code).increment(1);
        Ok(decision)
    }

    /// Tracks (budget, unit) in the SDK, within the agent's bound on budgets (the
    /// pairs the SDK keeps stocked: it forgets those unused for its `idle_after`).
    pub(crate) fn track(&self, key: &Key) -> bool {
        if self.sdk.handle_within(&key.0, &key.1, self.limits.max_budgets).is_none() {
            metrics::counter!(counters::AGENT_LIMITS, "what" => "max_budgets").increment(1);
            tracing::warn!(
                budget = %key.0, unit = %key.1,
                "refused: the agent already leases for max_budgets = {} budgets",
                self.limits.max_budgets
            );
            return false;
        }
        true
    }

    /// The request path: reserve (or spend) the hits of every matched descriptor,
    /// all or nothing.
    async fn charge(
        &self,
        descriptors: &[Descriptor],
        matched: &[Match],
        request_hits: u64,
    ) -> Result<Decision, Refusal> {
        // (descriptor index, key, units) of what this call charges, and for a
        // priced descriptor its tokens and price.
        let mut wants: Vec<(usize, Key, u64)> = Vec::new();
        let mut prices: Vec<(u64, Option<Priced>)> = Vec::new();
        let mut checks: Vec<(usize, Key)> = Vec::new();
        let mut over = vec![false; descriptors.len()];
        let mut correlation: Option<String> = None;
        for (i, (d, m)) in descriptors.iter().zip(matched).enumerate() {
            match m {
                Match::Unmatched => {
                    metrics::counter!(counters::UNMATCHED).increment(1);
                }
                Match::BadValue(why) => {
                    metrics::counter!(counters::BAD_VALUES).increment(1);
                    tracing::debug!("descriptor refused: {why}");
                    over[i] = true;
                }
                Match::Target(Target { budget, unit, correlation: c, priced, .. }) => {
                    let key = (budget.clone(), unit.clone());
                    if !self.track(&key) {
                        over[i] = true;
                        continue;
                    }
                    let hits = d.hits.unwrap_or(request_hits);
                    if d.negative {
                        // Given back by the caller: Ration gives back unspent units
                        // by settling reservations, not on request; charge nothing.
                        checks.push((i, key));
                    } else if hits == 0 {
                        checks.push((i, key));
                    } else {
                        let (units, price) = match priced {
                            None => (hits, None),
                            Some((model, kind)) => match self.sdk.price(model) {
                                Some(v) => {
                                    (kind.cost(&v.price, hits), Some((model.clone(), *kind, v)))
                                }
                                None => {
                                    metrics::counter!(counters::NO_PRICE).increment(1);
                                    tracing::debug!(
                                        "descriptor refused: model {model} has no price"
                                    );
                                    over[i] = true;
                                    continue;
                                }
                            },
                        };
                        wants.push((i, key, units));
                        prices.push((hits, price));
                        if correlation.is_none() {
                            correlation.clone_from(c);
                        }
                    }
                }
            }
        }
        let refused = over.iter().any(|o| *o);
        let mut reservation = None;
        if !refused && !wants.is_empty() {
            let asks: Vec<(&str, &str, u64)> =
                wants.iter().map(|(_, k, n)| (k.0.as_str(), k.1.as_str(), *n)).collect();
            reservation = self.sdk.reserve(&asks);
            // Both waits below share one bound, under Envoy's timeout for the call.
            let waited_until = tokio::time::Instant::now() + self.limits.cold_wait;
            if reservation.is_none() {
                // A budget met for the first time holds nothing only because
                // nothing was asked yet: wait (briefly) for its first answer.
                let cold: Vec<(&str, &str)> = wants
                    .iter()
                    .filter(|(_, k, _)| !self.sdk.answered(&k.0, &k.1))
                    .map(|(_, k, _)| (k.0.as_str(), k.1.as_str()))
                    .collect();
                if !cold.is_empty() && self.sdk.first_answer(&cold, self.limits.cold_wait).await {
                    reservation = self.sdk.reserve(&asks);
                }
            }
            // The leases ran dry (a burst, or the first calls while the leases are
            // still sized from no demand) while every budget, as last read or not
            // read yet, still has room: wait for refill rounds rather than refuse,
            // for as long as the cluster answers them (in an outage a round brings
            // nothing: the fail policy decides at once).
            let room = |k: &Key, n: u64| self.unleased(k).is_none_or(|u| u >= n);
            while reservation.is_none()
                && self.sdk.answering()
                && wants.iter().all(|(_, k, n)| room(k, *n))
            {
                let left = waited_until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() || !self.sdk.refill_now(left).await {
                    break;
                }
                reservation = self.sdk.reserve(&asks);
            }
            if reservation.is_none() {
                for (i, k, n) in &wants {
                    over[*i] = self.sdk.held(&k.0, &k.1).1 < *n;
                }
                if !over.iter().any(|o| *o) {
                    // Each alone fits but not all at once (a race): refuse all.
                    for (i, _, _) in &wants {
                        over[*i] = true;
                    }
                }
            }
        }
        for (i, k) in &checks {
            over[*i] = self.sdk.held(&k.0, &k.1).1 == 0;
        }
        let any_over = over.iter().any(|o| *o);
        match (reservation, correlation) {
            // Refused: Envoy does not forward the call, so nothing is charged (the
            // reservation, dropped, gives everything back).
            (Some(reservation), _) if any_over => drop(reservation),
            (Some(reservation), Some(c)) => self.keep(
                c,
                reservation,
                wants.iter().map(|w| w.1.clone()),
                prices.into_iter().map(|p| p.1).collect(),
            )?,
            // Nothing to wait for: spent now.
            (Some(reservation), None) => {
                let used: Vec<u64> = wants.iter().map(|w| w.2).collect();
                reservation.settle(&used);
                for ((_, key, units), (tokens, price)) in wants.iter().zip(&prices) {
                    if let Some(p) = price {
                        self.note_usage(&key.0, p, *tokens, *units);
                    }
                }
            }
            (None, _) => {}
        }
        let mut statuses = Vec::with_capacity(descriptors.len());
        for (i, m) in matched.iter().enumerate() {
            let limit = match m {
                Match::Target(t) => self.view(&t.budget, &t.unit, over[i]),
                _ => None,
            };
            let code = if over[i] { "over_limit" } else { "ok" };
            metrics::counter!(counters::DESCRIPTORS, "code" => code, "phase" => "check")
                .increment(1);
            statuses.push(Status { over: over[i], limit });
        }
        Ok(Decision { over: any_over, statuses })
    }

    /// Keeps a reservation until its stream-done call (or the timeout).
    fn keep(
        &self,
        correlation: String,
        reservation: Reservation,
        keys: impl Iterator<Item = Key>,
        prices: Vec<Option<Priced>>,
    ) -> Result<(), Refusal> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= self.limits.max_pending && !pending.contains_key(&correlation) {
            drop(pending);
            // Dropping the reservation gives it back: nothing was admitted.
            drop(reservation);
            metrics::counter!(counters::AGENT_LIMITS, "what" => "max_pending").increment(1);
            return Err(Refusal::Exhausted(format!(
                "the agent holds {} reservations waiting for their stream-done call \
                 (max_pending); refusing new ones until some settle",
                self.limits.max_pending
            )));
        }
        let entry = Pending {
            reservation,
            keys: keys.collect(),
            prices,
            deadline: Instant::now() + self.limits.settle_timeout,
        };
        // The same request id twice (a retried request): the earlier reservation
        // is charged whole, never dropped.
        if let Some(old) = pending.insert(correlation, entry) {
            let reserved = old.reservation.reserved();
            old.reservation.settle(&reserved);
        }
        metrics::gauge!(counters::PENDING).set(pending.len() as f64);
        Ok(())
    }

    /// The stream-done call: settle the reservation its correlation names at the
    /// real count. Always answered OK (Envoy does not act on it).
    fn settle(&self, descriptors: &[Descriptor], matched: &[Match], request_hits: u64) -> Decision {
        // Hits by correlation, then by key, in the call's order (with a priced
        // descriptor's model and price kind).
        type Used = (Key, u64, Option<(String, crate::rules::TokenKind)>);
        let mut by: BTreeMap<Option<String>, Vec<Used>> = BTreeMap::new();
        for (d, m) in descriptors.iter().zip(matched) {
            if let Match::Target(t) = m {
                let key = (t.budget.clone(), t.unit.clone());
                // What a settle charges was used already: it is counted whatever
                // the bound on budgets (which refuses new calls, not spend), even
                // for a pair forgotten since the call reserved.
                self.sdk.handle(&key.0, &key.1);
                let hits = if d.negative { 0 } else { d.hits.unwrap_or(request_hits) };
                let c = if t.settle { t.correlation.clone() } else { None };
                by.entry(c).or_default().push((key, hits, t.priced.clone()));
            }
        }
        for (correlation, used) in by {
            let found = correlation
                .as_ref()
                .and_then(|c| self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(c));
            if let Some(p) = found {
                let reserved = p.reservation.reserved();
                // A key the settle does not name keeps its whole reservation; a
                // priced one is charged at the version it was reserved at.
                // Each named count settles one reserved descriptor: the first not
                // yet settled with the same key and, for a priced one, the same
                // model and kind (a call's input and output tokens may charge
                // one budget).
                let mut taken = vec![false; used.len()];
                let amounts: Vec<u64> = p
                    .keys
                    .iter()
                    .zip(&reserved)
                    .zip(&p.prices)
                    .map(|((k, r), price)| {
                        let want = price.as_ref().map(|(m, kind, _)| (m.clone(), *kind));
                        let Some(at) = used
                            .iter()
                            .enumerate()
                            .position(|(i, (u, _, pr))| !taken[i] && u == k && *pr == want)
                        else {
                            return *r;
                        };
                        taken[at] = true;
                        let n = &used[at].1;
                        match price {
                            None => *n,
                            Some(pr) => {
                                let units = pr.1.cost(&pr.2.price, *n);
                                self.note_usage(&k.0, pr, *n, units);
                                units
                            }
                        }
                    })
                    .collect();
                let total: u64 = amounts.iter().sum();
                metrics::counter!(counters::SETTLED_UNITS).increment(total);
                p.reservation.settle(&amounts);
                continue;
            }
            // Charged whole by timeout: only what was used beyond it is charged.
            let mut timed_out = correlation
                .as_ref()
                .and_then(|c| self.expired.lock().unwrap_or_else(|p| p.into_inner()).0.remove(c));
            if correlation.is_some() && timed_out.is_none() {
                metrics::counter!(counters::UNRESERVED_SETTLES).increment(1);
            }
            for (key, tokens, priced) in used {
                // Unreserved here: priced at the version in force now.
                let n = match &priced {
                    None => tokens,
                    Some((model, kind)) => match self.sdk.price(model) {
                        Some(v) => {
                            let units = kind.cost(&v.price, tokens);
                            self.note_usage(&key.0, &(model.clone(), *kind, v), tokens, units);
                            units
                        }
                        None => {
                            metrics::counter!(counters::NO_PRICE).increment(1);
                            tracing::error!(
                                "a stream-done call for model {model} on {} cannot be priced: \
                                 no price in force; its {tokens} tokens are not charged",
                                key.0
                            );
                            continue;
                        }
                    },
                };
                // Each reserved descriptor counts once (in order: a call's input
                // and output tokens may charge one budget).
                let already = timed_out
                    .as_mut()
                    .and_then(|t| t.iter().position(|(k, _)| *k == key).map(|i| t.remove(i).1))
                    .unwrap_or(0);
                let extra = n.saturating_sub(already);
                if extra > 0 {
                    self.spend(&key, extra);
                }
            }
        }
        let statuses = matched
            .iter()
            .map(|_| {
                metrics::counter!(counters::DESCRIPTORS, "code" => "ok", "phase" => "settle")
                    .increment(1);
                Status { over: false, limit: None }
            })
            .collect();
        Decision { over: false, statuses }
    }

    /// Adds a priced charge to its budget's usage subtotals (a call is counted on
    /// its output tokens' descriptor).
    fn note_usage(&self, budget: &str, p: &Priced, tokens: u64, cost: u64) {
        use crate::rules::TokenKind;
        let (model, kind, v) = p;
        let line = ration_core::command::UsageLine {
            model: model.clone(),
            price_version: v.version,
            calls: u64::from(*kind == TokenKind::Output),
            input_tokens: if *kind == TokenKind::Input { tokens } else { 0 },
            cached_tokens: if *kind == TokenKind::CachedInput { tokens } else { 0 },
            output_tokens: if *kind == TokenKind::Output { tokens } else { 0 },
            cost_usd_micros: cost,
        };
        self.sdk.add_usage(budget, &line);
    }

    /// Charges units already used: from live leases as far as they hold, the rest
    /// recorded as an overrun for the ledger.
    pub(crate) fn spend(&self, key: &Key, units: u64) {
        let now = self.sdk.gateway().clock().now_ms();
        // Through the SDK, so the pair is tracked (stocked, and its overrun
        // reported) even if it was forgotten since the call reserved.
        let handle = self.sdk.handle(&key.0, &key.1);
        let took = handle.allowance().take_up_to(units, now);
        if took < units {
            handle.allowance().record_overrun(units - took);
        }
        metrics::counter!(counters::SETTLED_UNITS).increment(units);
    }

    /// Charges every reservation whose stream-done call did not come in time;
    /// forgets timed-out reservations a late settle can no longer refer to.
    pub fn expire(&self, now: Instant) -> usize {
        let due: Vec<(String, Pending)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<String> =
                pending.iter().filter(|(_, p)| p.deadline <= now).map(|(k, _)| k.clone()).collect();
            let due = keys.into_iter().filter_map(|k| pending.remove_entry(&k)).collect();
            metrics::gauge!(counters::PENDING).set(pending.len() as f64);
            due
        };
        let n = due.len();
        let mut expired = self.expired.lock().unwrap_or_else(|p| p.into_inner());
        for (c, p) in due {
            let reserved = p.reservation.reserved();
            expired.0.insert(c.clone(), p.keys.into_iter().zip(reserved.iter().copied()).collect());
            expired.1.push_back((now + self.limits.settle_timeout, c));
            p.reservation.settle(&reserved);
        }
        while expired.1.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, c)) = expired.1.pop_front() {
                expired.0.remove(&c);
            }
        }
        // Bounded like the reservations themselves.
        while expired.1.len() > self.limits.max_pending {
            if let Some((_, c)) = expired.1.pop_front() {
                expired.0.remove(&c);
            }
        }
        if n > 0 {
            metrics::counter!(counters::SETTLE_TIMEOUTS).increment(n as u64);
        }
        n
    }

    /// Charges every reservation at once (shutdown: their stream-done calls will
    /// find no agent).
    pub fn settle_all(&self) -> usize {
        let all: Vec<Pending> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().map(|(_, p)| p).collect()
        };
        let n = all.len();
        for p in all {
            let reserved = p.reservation.reserved();
            p.reservation.settle(&reserved);
        }
        n
    }

    /// The limit to show for a descriptor of (budget, unit): its tightest limit in
    /// the unit as last read. Reading starts on first use (`refresh`).
    fn view(&self, budget: &str, unit: &str, over: bool) -> Option<LimitView> {
        let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = info.entry(budget.to_owned()).or_insert_with(|| Info {
            budget: None,
            touched: now,
            fetched: None,
        });
        entry.touched = now;
        let b = entry.budget.as_ref()?;
        let held = self.sdk.held(budget, unit).1;
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        b.limits
            .iter()
            .filter_map(|s| s.limit.as_ref().map(|l| (s, l)))
            .filter(|(_, l)| l.unit == unit)
            .map(|(s, l)| LimitView {
                cap: u64::try_from(l.cap).unwrap_or(0),
                period: l
                    .window
                    .as_ref()
                    .and_then(|w| v1::Period::try_from(w.period).ok())
                    .unwrap_or(v1::Period::Lifetime),
                remaining: if over {
                    0
                } else {
                    u64::try_from(s.remaining).unwrap_or(0).saturating_add(held)
                },
                reset_in: s
                    .window_end_ms
                    .map(|end| Duration::from_millis(end.saturating_sub(wall_ms))),
            })
            .min_by_key(|v| v.remaining)
    }

    /// What the ledger had not leased out of (budget, unit)'s tightest limit when
    /// last read (`None` if not read yet).
    fn unleased(&self, key: &Key) -> Option<u64> {
        let info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        let b = info.get(&key.0).and_then(|i| i.budget.as_ref())?;
        let tightest = b
            .limits
            .iter()
            .filter(|s| s.limit.as_ref().is_some_and(|l| l.unit == key.1))
            .map(|s| u64::try_from(s.remaining).unwrap_or(0))
            .min()
            .unwrap_or(0);
        Some(tightest)
    }

    /// Reads again the budgets answered for recently (at most `max` per call), and
    /// forgets those not asked about for two minutes.
    pub async fn refresh(&self, max: usize) {
        let now = Instant::now();
        let due: Vec<String> = {
            let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
            info.retain(|_, i| now.duration_since(i.touched) < Duration::from_secs(120));
            let mut due: Vec<(Option<Instant>, String)> = info
                .iter()
                .filter(|(_, i)| {
                    now.duration_since(i.touched) < Duration::from_secs(60)
                        && i.fetched.is_none_or(|f| now.duration_since(f) >= Duration::from_secs(1))
                })
                .map(|(p, i)| (i.fetched, p.clone()))
                .collect();
            // Never read first, then the stalest.
            due.sort();
            due.into_iter().take(max).map(|(_, p)| p).collect()
        };
        for path in due {
            let budget = self.sdk.cluster().get_budget(&path).await;
            let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = info.get_mut(&path) {
                i.fetched = Some(Instant::now());
                if budget.is_some() {
                    i.budget = budget;
                }
            }
        }
        metrics::counter!(counters::CLUSTER_OPS).absolute(self.sdk.ops_sent());
    }
}
