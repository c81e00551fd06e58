//! Envoy's Rate Limit Quota Service (RLQS), one Envoy's stream at a time: Envoy
//! admits requests itself from the quota assignments the agent sends, and reports
//! how many it allowed and denied per bucket about once a second. Envoy counts
//! requests only, so RLQS budgets are request budgets (one unit per request).
//!
//! The hard cap holds because every assignment is backed by allowance the agent
//! keeps reserved from its leases. An assignment is a token bucket of `F` tokens
//! refilled by `F` each second, valid for `ttl` seconds. Envoy 1.40 reports every
//! 5 s whatever `reporting_interval` says (a hard-coded interval in its client),
//! so `ttl` (default 7 s) outlasts a report interval, and from one report until the
//! assignment expires Envoy can admit at most `F` (a full bucket) plus `F` per
//! second for `ttl` seconds, plus two seconds' slack for the report and the answer
//! in flight: the *exposure* `F × (ttl + 3)`. After each report the agent charges
//! what Envoy allowed (from the previous exposure; beyond it, from leases, and
//! beyond those as an overrun: never left out of the ledger) and reserves the
//! exposure again. When `F` changes, Envoy starts a new, full bucket, while the
//! old one may still be spent until the new assignment arrives: `3 × F_old` more
//! is reserved for that. When the leases cannot cover even `F` = 1 the bucket is
//! denied (a blanket `DENY_ALL` with the same ttl), and `3 × F_old` stays reserved.
//! One case is covered only after the fact: a stream that breaks between a report
//! and its answer leaves Envoy on the old assignment until its ttl, up to
//! `F_old × (ttl + 1)`; what it admits beyond what is reserved is charged when Envoy
//! reports it on its next stream (as an overrun if the leases no longer hold it).
//!
//! `F` follows the bucket's demand (allowed + denied per second, smoothed), ×1.25,
//! rounded up to a power of two so that it rarely changes (Envoy keeps a bucket's
//! tokens only while its assignment stays identical). A bucket without requests
//! for `quota_idle` is abandoned and its exposure given back. When the agent
//! stops it denies every bucket and waits (up to a report interval and a second)
//! for Envoy's next report, which says what was admitted before the denial
//! arrived: charged exactly, the rest given back. A stream that ends otherwise
//! charges every exposure it held whole, since what Envoy admitted since its last
//! report is unknown (conservative: the ledger may count more than was used,
//! never less).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ration_client::Reservation;

use crate::agent::{Agent, Key};
use crate::rules::Match;

/// One bucket's line of a usage report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub bucket: BTreeMap<String, String>,
    pub allowed: u64,
    pub denied: u64,
}

/// What the agent tells Envoy to do for a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// A token bucket: `per_second` tokens, refilled by `per_second` each second.
    Allow { per_second: u64 },
    /// Refuse every request (blanket DENY_ALL).
    Deny,
    /// Forget the bucket (idle).
    Abandon,
}

/// One bucket's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub bucket: BTreeMap<String, String>,
    pub assignment: Assignment,
    pub ttl: Duration,
}

/// Names of the RLQS metrics.
pub mod counters {
    /// Assignments sent, by `kind` (allow, deny, abandon).
    pub const ASSIGNMENTS: &str = "ration_agent_quota_assignments_total";
    /// Requests Envoy reported allowed, charged to budgets.
    pub const ALLOWED: &str = "ration_agent_quota_allowed_total";
    /// Requests Envoy reported denied.
    pub const DENIED: &str = "ration_agent_quota_denied_total";
    /// Units charged whole because a stream ended with exposure held.
    pub const CLOSED_EXPOSURE: &str = "ration_agent_quota_closed_exposure_units_total";
}

struct Bucket {
    /// The budget and unit it charges (`None`: no rule, or a bad value: denied).
    key: Option<Key>,
    exposure: Option<Reservation>,
    /// The current assignment's rate (0: denied).
    per_second: u64,
    rate: f64,
    last_report: Option<Instant>,
    last_request: Instant,
}

/// One Envoy's RLQS stream.
pub struct QuotaStream {
    agent: Arc<Agent>,
    buckets: HashMap<BTreeMap<String, String>, Bucket>,
    /// The agent is stopping: every bucket is denied, nothing more reserved.
    draining: bool,
}

impl std::fmt::Debug for QuotaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaStream").field("buckets", &self.buckets.len()).finish_non_exhaustive()
    }
}

const RATE_SMOOTHING: f64 = 0.5;

/// Seconds of an old assignment's rate covered when it changes: its full bucket,
/// plus two seconds for the answer in flight.
const IN_FLIGHT_SECONDS: u64 = 3;

impl QuotaStream {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent, buckets: HashMap::new(), draining: false }
    }

    /// The agent is stopping: every bucket is denied from now on (answers to send
    /// at once). Exposure stays reserved until Envoy's next report says what it
    /// admitted before the denial arrived ([`QuotaStream::report`] then charges it
    /// and reserves nothing more).
    pub fn drain(&mut self) -> Vec<Answer> {
        self.draining = true;
        let ttl = self.agent.limits().quota_ttl;
        let buckets: Vec<_> = self.buckets.keys().cloned().collect();
        buckets.into_iter().map(|b| self.answer(b, Assignment::Deny, ttl)).collect()
    }

    /// Whether any exposure is still reserved.
    pub fn exposed(&self) -> bool {
        self.buckets.values().any(|b| b.exposure.is_some())
    }

    /// The exposure of an assignment of `per_second` (see the module's docs).
    pub fn exposure(&self, per_second: u64) -> u64 {
        per_second.saturating_mul(self.agent.limits().quota_ttl.as_secs().saturating_add(3))
    }

    /// Charges a usage report and answers each bucket in it.
    pub async fn report(&mut self, domain: &str, usages: Vec<Usage>) -> Vec<Answer> {
        let now = Instant::now();
        let ttl = self.agent.limits().quota_ttl;
        let mut answers = Vec::with_capacity(usages.len());
        for u in usages {
            metrics::counter!(counters::ALLOWED).increment(u.allowed);
            metrics::counter!(counters::DENIED).increment(u.denied);
            if !self.buckets.contains_key(&u.bucket)
                && self.buckets.len() >= self.agent.limits().max_buckets_per_stream
            {
                metrics::counter!(crate::agent::counters::AGENT_LIMITS, "what" => "max_buckets_per_stream")
                    .increment(1);
                answers.push(self.answer(u.bucket, Assignment::Deny, ttl));
                continue;
            }
            let agent = self.agent.clone();
            let b = self.buckets.entry(u.bucket.clone()).or_insert_with(|| {
                let key = match agent.rules().resolve_bucket(domain, &u.bucket) {
                    Match::Target(t) => Some((t.budget, t.unit)),
                    Match::Unmatched => {
                        tracing::warn!(bucket = ?u.bucket, "no rule names this RLQS bucket: denied");
                        None
                    }
                    Match::BadValue(why) => {
                        tracing::debug!(bucket = ?u.bucket, "RLQS bucket denied: {why}");
                        None
                    }
                };
                let key = key.filter(|k| agent.track(k));
                Bucket { key, exposure: None, per_second: 0, rate: 0.0, last_report: None, last_request: now }
            });
            let Some(key) = b.key.clone() else {
                answers.push(Answer { bucket: u.bucket, assignment: Assignment::Deny, ttl });
                continue;
            };
            // What Envoy admitted since the last report: from the exposure first.
            charge(&self.agent, &key, b.exposure.take(), u.allowed);
            let demand = u.allowed + u.denied;
            if demand > 0 {
                b.last_request = now;
            }
            if now.duration_since(b.last_request) >= self.agent.limits().quota_idle {
                let bucket = u.bucket.clone();
                self.buckets.remove(&bucket);
                answers.push(self.answer(bucket, Assignment::Abandon, ttl));
                continue;
            }
            // Demand per second, over our own clock (Envoy's time_elapsed is in
            // whole seconds, 0 in a bucket's first report).
            let inst = match b.last_report {
                Some(t) => demand as f64 / now.duration_since(t).as_secs_f64().max(0.2),
                None => demand as f64,
            };
            b.rate = if b.last_report.is_none() {
                inst
            } else {
                (1.0 - RATE_SMOOTHING) * b.rate + RATE_SMOOTHING * inst
            };
            b.last_report = Some(now);
            let want = ((b.rate * 1.25).ceil() as u64).clamp(1, 1 << 24).next_power_of_two();
            let current = b.per_second;
            let (per_second, exposure) = if self.draining {
                (0, None)
            } else {
                assign(&self.agent, &key, want, current, ttl.as_secs().saturating_add(3)).await
            };
            tracing::debug!(
                budget = %key.0, allowed = u.allowed, denied = u.denied, rate = b.rate, want,
                per_second, exposure = exposure.as_ref().map_or(0, |x| x.reserved()[0]),
                held = self.agent.sdk().held(&key.0, &key.1).1,
                "RLQS assignment"
            );
            let b = self.buckets.get_mut(&u.bucket).expect("still there");
            b.exposure = exposure;
            b.per_second = per_second;
            let assignment =
                if per_second == 0 { Assignment::Deny } else { Assignment::Allow { per_second } };
            answers.push(self.answer(u.bucket, assignment, ttl));
        }
        answers
    }

    fn answer(
        &self,
        bucket: BTreeMap<String, String>,
        assignment: Assignment,
        ttl: Duration,
    ) -> Answer {
        let kind = match assignment {
            Assignment::Allow { .. } => "allow",
            Assignment::Deny => "deny",
            Assignment::Abandon => "abandon",
        };
        metrics::counter!(counters::ASSIGNMENTS, "kind" => kind).increment(1);
        Answer { bucket, assignment, ttl }
    }

    /// The stream ended: what Envoy admitted since its last report is unknown, so
    /// every exposure held is charged whole.
    pub fn close(self) -> u64 {
        let mut charged = 0;
        for b in self.buckets.into_values() {
            if let Some(x) = b.exposure {
                let reserved = x.reserved();
                charged += reserved.iter().sum::<u64>();
                x.settle(&reserved);
            }
        }
        metrics::counter!(counters::CLOSED_EXPOSURE).increment(charged);
        charged
    }
}

/// Charges `allowed` requests: from `exposure` (the rest of which goes back),
/// then from leases, the rest as an overrun.
fn charge(agent: &Agent, key: &Key, exposure: Option<Reservation>, allowed: u64) {
    let held = exposure.as_ref().map_or(0, |x| x.reserved().iter().sum());
    if let Some(x) = exposure {
        x.settle(&[allowed.min(held)]);
    }
    if allowed > held {
        agent.spend(key, allowed - held);
    }
}

/// The largest assignment (a power of two, at most `want`) whose exposure the
/// leases cover, with the old assignment's too when it changes; or a denial,
/// keeping what the old assignment may still admit reserved as far as the leases
/// hold it. Returns (per second, exposure reserved).
async fn assign(
    agent: &Agent,
    key: &Key,
    want: u64,
    current: u64,
    seconds: u64,
) -> (u64, Option<Reservation>) {
    let sdk = agent.sdk();
    let reserve = |units: u64| sdk.reserve(&[(key.0.as_str(), key.1.as_str(), units)]);
    let mut f = want;
    let mut waited = false;
    // What the old assignment may admit after the report, until the new one
    // arrives: a full bucket and the answer's time in flight.
    let in_flight = current.saturating_mul(IN_FLIGHT_SECONDS).min(current.saturating_mul(seconds));
    loop {
        let old = if f == current { 0 } else { in_flight };
        if let Some(x) = reserve(f.saturating_mul(seconds).saturating_add(old)) {
            return (f, Some(x));
        }
        // A budget met for the first time holds nothing only because nothing was
        // asked yet.
        if !waited && !sdk.answered(&key.0, &key.1) {
            waited = true;
            if sdk.first_answer(&[(key.0.as_str(), key.1.as_str())], agent.limits().cold_wait).await
            {
                continue;
            }
        }
        if f == 1 {
            break;
        }
        f /= 2;
    }
    // Denied: keep covering what the current assignment may still admit.
    let tail = in_flight.min(sdk.held(&key.0, &key.1).1);
    (0, if tail > 0 { reserve(tail) } else { None })
}
