//! Property tests: random command sequences against a simple reference model.
//!
//! The model keeps the ledger's semantics in the plainest form it can: leases in a
//! map, consumption in per-window buckets (no lazy rollover), outstanding and fair
//! share recomputed by scanning every lease. After every entry it checks the ledger
//! against it, and checks the invariants the brief demands:
//! - consumed + outstanding <= cap + overruns for every budget, unit, window
//!   (ancestors included, since spend on a descendant is counted in each ancestor's
//!   limits), and nothing is granted while consumed + outstanding >= cap;
//! - granted + overruns = consumed + returned + charged on expiry + outstanding,
//!   from the ledger's totals and from the audit records;
//! - a ledger restored from a snapshot midway, fed the same entries, stays equal to
//!   the original, and so does one replayed from the first entry;
//! - the audit chain verifies;
//! - a retried request returns its first result and changes nothing.
//!
//! `PROPTEST_CASES=5000 cargo test --release -p ration-core --test ledger_model` runs
//! more cases.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use ration_core::audit::{verify_chain, AuditLog};
use ration_core::command::MAX_AMOUNT;
use ration_core::{
    Acquire, Batch, BudgetPath, BudgetSpec, ChainHead, ClientId, Command, Entry, FailPolicy,
    LeaseId, Ledger, LedgerConfig, LedgerError, LimitSpec, Op, Outcome, Period, Principal, Release,
    Reply, Report, Request, Unit, Window,
};

const T0: u64 = 1_764_340_245_123;
const PATHS: [&str; 5] = ["a", "a/b", "a/b/c", "a/d", "e"];
const UNITS: [&str; 2] = ["tokens", "requests"];
const PRINCIPALS: [&str; 4] = ["gw0", "gw1", "gw2", "gw3"];
/// Total time a case may advance: below the exactly-once idle horizon (24 h).
const MAX_ADVANCE_MS: u64 = 20 * 3_600_000;

fn windows() -> [Window; 4] {
    [
        Window::utc(Period::Minute),
        Window::utc(Period::Hour),
        Window::with_offset(Period::Day, 330).unwrap(),
        Window::utc(Period::Lifetime),
    ]
}

// ----- what the generator produces: intents, resolved against the model -----

#[derive(Clone, Debug)]
struct LimitGen {
    unit: usize,
    window: usize,
    cap: u64,
}

#[derive(Clone, Debug)]
enum Cmd {
    Create {
        budget: usize,
        limits: Vec<LimitGen>,
    },
    Update {
        budget: usize,
        limits: Vec<LimitGen>,
        stale: bool,
    },
    Delete {
        budget: usize,
    },
    /// `next`: an acquire for the next window (0..=7 at the current window's end,
    /// 8 a millisecond after it, 9 at ledger time now).
    Acquire {
        budget: usize,
        unit: usize,
        wanted: u64,
        min: u64,
        ttl_ms: u64,
        who: usize,
        next: Option<u8>,
    },
    Report {
        pick: usize,
        percent: u64,
        renew_ms: Option<u64>,
        foreign: bool,
    },
    Release {
        pick: usize,
        percent: u64,
        foreign: bool,
    },
    Overrun {
        budget: usize,
        unit: usize,
        amount: u64,
        who: usize,
    },
    Tick,
}

#[derive(Clone, Debug)]
enum Step {
    Entry {
        advance_ms: u64,
        cmds: Vec<Cmd>,
    },
    /// Send an earlier request again, alone in an entry, with no time advance.
    Retry {
        pick: usize,
    },
    /// Restore a second ledger from a snapshot here; it must track the first.
    Snapshot,
}

fn limit_gen() -> impl Strategy<Value = LimitGen> + Clone {
    let cap =
        prop_oneof![4 => 0u64..40, 3 => Just(100u64), 3 => Just(1000u64), 1 => Just(MAX_AMOUNT)];
    (0..UNITS.len(), 0..4usize, cap).prop_map(|(unit, window, cap)| LimitGen { unit, window, cap })
}

fn limits_per_budget() -> impl Strategy<Value = Vec<LimitGen>> {
    prop::collection::vec(limit_gen(), 0..3)
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let limits = prop::collection::vec(limit_gen(), 0..3);
    let wanted = prop_oneof![16 => 1u64..60, 1 => Just(0u64), 3 => 500u64..2000];
    let ttl = prop_oneof![10 => 1_000u64..30_000, 6 => 30_000u64..600_000, 1 => Just(0u64), 1 => Just(3_600_001u64)];
    prop_oneof![
        3 => (0..PATHS.len(), limits.clone()).prop_map(|(budget, limits)| Cmd::Create { budget, limits }),
        1 => (0..PATHS.len(), limits, prop::bool::weighted(0.2))
            .prop_map(|(budget, limits, stale)| Cmd::Update { budget, limits, stale }),
        1 => (0..PATHS.len()).prop_map(|budget| Cmd::Delete { budget }),
        8 => (0..PATHS.len(), 0..UNITS.len(), wanted, 0u64..=110, ttl, 0..PRINCIPALS.len(), prop::option::weighted(0.3, 0u8..10)).prop_map(
            // min is mostly a fraction of wanted; above 100% it is a bad argument.
            |(budget, unit, wanted, min_percent, ttl_ms, who, next)| {
                let min = wanted * min_percent / 100;
                Cmd::Acquire { budget, unit, wanted, min, ttl_ms, who, next }
            }
        ),
        4 => (any::<usize>(), 0u64..=120, prop::option::weighted(0.2, 1_000u64..60_000), prop::bool::weighted(0.05))
            .prop_map(|(pick, percent, renew_ms, foreign)| Cmd::Report { pick, percent, renew_ms, foreign }),
        4 => (any::<usize>(), 0u64..=120, prop::bool::weighted(0.05))
            .prop_map(|(pick, percent, foreign)| Cmd::Release { pick, percent, foreign }),
        2 => (0..PATHS.len(), 0..UNITS.len(), prop_oneof![8 => 1u64..80, 1 => Just(0u64), 1 => Just(MAX_AMOUNT)], 0..PRINCIPALS.len())
            .prop_map(|(budget, unit, amount, who)| Cmd::Overrun { budget, unit, amount, who }),
        1 => Just(Cmd::Tick),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let advance = prop_oneof![
        6 => 0u64..5_000,
        3 => 0u64..70_000,
        1 => 0u64..7_200_000,
    ];
    prop_oneof![
        12 => (advance, prop::collection::vec(cmd(), 1..5))
            .prop_map(|(advance_ms, cmds)| Step::Entry { advance_ms, cmds }),
        2 => any::<usize>().prop_map(|pick| Step::Retry { pick }),
        1 => Just(Step::Snapshot),
    ]
}

// ----- the reference model -----

#[derive(Clone, Debug)]
struct MLimit {
    unit: Unit,
    window: Window,
    cap: u64,
    /// Identity of the counter: kept while (unit, window) is kept by updates.
    generation: u64,
}

#[derive(Clone, Debug)]
struct MBudget {
    version: u64,
    limits: Vec<MLimit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MState {
    Live,
    Expired { forget_at_ms: u64 },
    Gone,
}

#[derive(Clone, Debug)]
struct MLease {
    principal: usize,
    budget: String,
    /// (generation, start of the window it draws on).
    counters: Vec<(u64, u64)>,
    /// When a lease acquired for the next window opens.
    opens_at: Option<u64>,
    granted: u64,
    reported: u64,
    expires_at_ms: u64,
    window_end_ms: u64,
    state: MState,
}

#[derive(Clone, Debug, Default)]
struct Model {
    now_ms: u64,
    next_generation: u64,
    budgets: BTreeMap<String, MBudget>,
    leases: BTreeMap<LeaseId, MLease>,
    /// consumed per (generation, window start), overruns included.
    consumed: BTreeMap<(u64, u64), u64>,
    /// overruns per (generation, window start).
    overruns: BTreeMap<(u64, u64), u64>,
    windows_of: BTreeMap<u64, Window>,
    records: u64,
}

/// The shape of an expected refusal; compared by variant.
fn same_variant(a: &LedgerError, b: &LedgerError) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn p(s: &str) -> BudgetPath {
    BudgetPath::new(s).unwrap()
}

fn parent_of(path: &str) -> Option<&str> {
    path.rfind('/').map(|at| &path[..at])
}

impl Model {
    fn chain(&self, path: &str) -> Vec<String> {
        let mut out = vec![path.to_owned()];
        let mut at = path;
        while let Some(parent) = parent_of(at) {
            out.push(parent.to_owned());
            at = parent;
        }
        out
    }

    /// Unsettled allowance of live leases on the window of `generation` starting at
    /// `start`.
    fn outstanding_in(&self, generation: u64, start: u64) -> u64 {
        self.leases
            .values()
            .filter(|l| l.state == MState::Live && l.counters.contains(&(generation, start)))
            .map(|l| l.granted - l.reported)
            .sum()
    }

    /// ... on the current window.
    fn outstanding(&self, generation: u64) -> u64 {
        self.outstanding_in(generation, self.windows_of[&generation].bounds(self.now_ms).0)
    }

    /// ... on the next window.
    fn upcoming(&self, generation: u64) -> u64 {
        self.outstanding_in(generation, self.windows_of[&generation].bounds(self.now_ms).1)
    }

    fn holders(&self, generation: u64, start: u64) -> BTreeSet<usize> {
        self.leases
            .values()
            .filter(|l| l.state == MState::Live && l.counters.contains(&(generation, start)))
            .map(|l| l.principal)
            .collect()
    }

    /// Whether the window a lease drew on (generation, window start) is still the
    /// generation's current one, on a limit that still exists.
    fn still_open(&self, c: &(u64, u64)) -> bool {
        let exists = self.budgets.values().any(|b| b.limits.iter().any(|l| l.generation == c.0));
        exists && self.windows_of[&c.0].bounds(self.now_ms).0 == c.1
    }

    /// Whether a live lease has not opened yet.
    fn unopened(&self, l: &MLease) -> bool {
        l.opens_at.is_some_and(|at| at > self.now_ms)
    }

    /// The earliest end of the current windows of the limits an acquire on
    /// (budget, unit) would draw on.
    fn next_start(&self, budget: &str, unit: &str) -> u64 {
        let mut end = self.now_ms + 1_000;
        if self.budgets.contains_key(budget) {
            end = u64::MAX;
            for path in self.chain(budget) {
                for l in self.budgets[&path].limits.iter().filter(|l| l.unit.as_str() == unit) {
                    end = end.min(l.window.bounds(self.now_ms).1);
                }
            }
        }
        end
    }

    fn consumed_now(&self, generation: u64) -> u64 {
        let start = self.windows_of[&generation].bounds(self.now_ms).0;
        self.consumed.get(&(generation, start)).copied().unwrap_or(0)
    }

    fn overruns_now(&self, generation: u64) -> u64 {
        let start = self.windows_of[&generation].bounds(self.now_ms).0;
        self.overruns.get(&(generation, start)).copied().unwrap_or(0)
    }

    fn bucket(&mut self, generation: u64, start: u64) -> &mut u64 {
        self.consumed.entry((generation, start)).or_insert(0)
    }

    fn new_limits(&mut self, limits: &[LimitSpec], old: &[MLimit]) -> Vec<MLimit> {
        limits
            .iter()
            .map(|l| {
                let generation = match old.iter().find(|o| o.unit == l.unit && o.window == l.window)
                {
                    Some(o) => o.generation,
                    None => {
                        self.next_generation += 1;
                        self.windows_of.insert(self.next_generation, l.window);
                        self.next_generation
                    }
                };
                MLimit { unit: l.unit.clone(), window: l.window, cap: l.cap, generation }
            })
            .collect()
    }

    /// Moves time and expires leases; returns the number of audit records.
    fn advance(&mut self, time_ms: u64) -> u64 {
        self.now_ms = self.now_ms.max(time_ms);
        let now = self.now_ms;
        let mut due: Vec<(u64, LeaseId)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.state == MState::Live && l.expires_at_ms <= now)
            .map(|(id, l)| (l.expires_at_ms, *id))
            .collect();
        due.sort();
        for (_, id) in &due {
            let l = self.leases[id].clone();
            let charge = l.granted - l.reported;
            for (generation, start) in &l.counters {
                *self.bucket(*generation, *start) += charge;
            }
            self.leases.get_mut(id).unwrap().state = MState::Expired {
                forget_at_ms: l.expires_at_ms + LedgerConfig::default().expired_retention_ms,
            };
        }
        for l in self.leases.values_mut() {
            if matches!(l.state, MState::Expired { forget_at_ms } if forget_at_ms <= now) {
                l.state = MState::Gone;
            }
        }
        due.len() as u64
    }

    /// Predicts one command's outcome and applies it to the model. Returns the
    /// prediction and the number of audit records it writes.
    fn execute(
        &mut self,
        lease_id: LeaseId,
        who: usize,
        op: &Op,
    ) -> (Result<Reply, LedgerError>, u64) {
        match self.try_execute(lease_id, who, op) {
            Ok((reply, records)) => (Ok(reply), records),
            Err(e) => (Err(e), 0),
        }
    }

    fn try_execute(
        &mut self,
        lease_id: LeaseId,
        who: usize,
        op: &Op,
    ) -> Result<(Reply, u64), LedgerError> {
        let now = self.now_ms;
        match op {
            Op::CreateBudget(spec) => {
                spec.validate()?;
                let path = spec.path.as_str();
                if self.budgets.contains_key(path) {
                    return Err(LedgerError::BudgetExists { path: spec.path.clone() });
                }
                if let Some(parent) = parent_of(path) {
                    if !self.budgets.contains_key(parent) {
                        return Err(LedgerError::ParentNotFound {
                            path: spec.path.clone(),
                            parent: p(parent),
                        });
                    }
                }
                let limits = self.new_limits(&spec.limits, &[]);
                self.budgets.insert(path.to_owned(), MBudget { version: 1, limits });
                Ok((Reply::BudgetCreated { version: 1 }, 1))
            }
            Op::UpdateBudget { spec, expected_version } => {
                spec.validate()?;
                let path = spec.path.as_str();
                let b = self
                    .budgets
                    .get(path)
                    .ok_or(LedgerError::BudgetNotFound { path: spec.path.clone() })?
                    .clone();
                if b.version != *expected_version {
                    return Err(LedgerError::VersionMismatch {
                        path: spec.path.clone(),
                        expected: *expected_version,
                        actual: b.version,
                    });
                }
                for new in &spec.limits {
                    if let Some(old) =
                        b.limits.iter().find(|o| o.unit == new.unit && o.window == new.window)
                    {
                        let in_use =
                            self.consumed_now(old.generation) + self.outstanding(old.generation);
                        if new.cap + self.overruns_now(old.generation) < in_use
                            || new.cap < self.upcoming(old.generation)
                        {
                            return Err(LedgerError::CapBelowUsage {
                                path: spec.path.clone(),
                                unit: new.unit.clone(),
                                window: new.window,
                                cap: new.cap,
                                in_use,
                            });
                        }
                    }
                }
                let limits = self.new_limits(&spec.limits, &b.limits);
                let version = b.version + 1;
                self.budgets.insert(path.to_owned(), MBudget { version, limits });
                Ok((Reply::BudgetUpdated { version }, 1))
            }
            Op::DeleteBudget { path, .. } => {
                if !self.budgets.contains_key(path.as_str()) {
                    return Err(LedgerError::BudgetNotFound { path: path.clone() });
                }
                let children =
                    self.budgets.keys().filter(|k| parent_of(k) == Some(path.as_str())).count()
                        as u64;
                if children > 0 {
                    return Err(LedgerError::HasChildren { path: path.clone(), children });
                }
                let leases = self
                    .leases
                    .values()
                    .filter(|l| l.state == MState::Live && p(&l.budget).is_within(path))
                    .count() as u64;
                if leases > 0 {
                    return Err(LedgerError::HasLiveLeases { path: path.clone(), leases });
                }
                self.budgets.remove(path.as_str());
                Ok((Reply::BudgetDeleted, 1))
            }
            Op::Acquire(a) => self.acquire(lease_id, who, a, None),
            Op::AcquireNext(a) => self.acquire(lease_id, who, &a.acquire, Some(a.starts_at_ms)),
            Op::Report(r) => {
                ration_core::command::check_amount("consumed_delta", r.consumed_delta)?;
                let l = self.lease_for(r.lease, who)?.clone();
                if l.state != MState::Live {
                    return Err(LedgerError::LeaseExpired { lease: r.lease });
                }
                if self.unopened(&l) && r.consumed_delta > 0 {
                    return Err(LedgerError::InvalidArgument {
                        field: String::new(),
                        reason: String::new(),
                    });
                }
                if l.reported + r.consumed_delta > l.granted {
                    return Err(LedgerError::OverReport {
                        lease: r.lease,
                        granted: l.granted,
                        reported: l.reported,
                        requested: r.consumed_delta,
                    });
                }
                let expires = match r.renew_ttl_ms {
                    Some(ttl) => l.expires_at_ms.max((now + ttl).min(l.window_end_ms)),
                    None => l.expires_at_ms,
                };
                for (generation, start) in &l.counters {
                    *self.bucket(*generation, *start) += r.consumed_delta;
                }
                let m = self.leases.get_mut(&r.lease).unwrap();
                m.reported += r.consumed_delta;
                m.expires_at_ms = expires;
                let records = u64::from(r.consumed_delta > 0 || expires != l.expires_at_ms);
                Ok((
                    Reply::Reported {
                        lease: r.lease,
                        unreported: l.granted - m.reported,
                        expires_at_ms: expires,
                    },
                    records,
                ))
            }
            Op::Release(r) => {
                ration_core::command::check_amount("consumed_total", r.consumed_total)?;
                let l = self.lease_for(r.lease, who)?.clone();
                if r.consumed_total < l.reported {
                    return Err(LedgerError::ReleaseBelowReported {
                        lease: r.lease,
                        reported: l.reported,
                        total: r.consumed_total,
                    });
                }
                if r.consumed_total > l.granted {
                    return Err(LedgerError::OverReport {
                        lease: r.lease,
                        granted: l.granted,
                        reported: l.reported,
                        requested: 0,
                    });
                }
                if l.state == MState::Live && self.unopened(&l) && r.consumed_total > 0 {
                    return Err(LedgerError::InvalidArgument {
                        field: String::new(),
                        reason: String::new(),
                    });
                }
                let reply = if l.state == MState::Live {
                    for (generation, start) in &l.counters {
                        *self.bucket(*generation, *start) += r.consumed_total - l.reported;
                    }
                    Reply::Released {
                        lease: r.lease,
                        returned: l.granted - r.consumed_total,
                        refunded: 0,
                        late: false,
                    }
                } else if l.counters.iter().any(|c| self.still_open(c)) {
                    // Every limit still in the window the lease drew on is refunded.
                    let refund = l.granted - r.consumed_total;
                    let open: Vec<(u64, u64)> =
                        l.counters.iter().copied().filter(|c| self.still_open(c)).collect();
                    for c in open {
                        *self.bucket(c.0, c.1) -= refund;
                    }
                    Reply::Released { lease: r.lease, returned: 0, refunded: refund, late: true }
                } else {
                    Reply::Released { lease: r.lease, returned: 0, refunded: 0, late: true }
                };
                self.leases.get_mut(&r.lease).unwrap().state = MState::Gone;
                Ok((reply, 1))
            }
            // Templates and freezing are tested in the ledger's unit tests and the
            // simulation; this model's workload never sends them.
            Op::SetTemplate(_)
            | Op::DeleteTemplate { .. }
            | Op::Freeze { .. }
            | Op::SetPrice(_)
            | Op::SetOptions { .. }
            | Op::Annotated { .. }
            | Op::RecordCall(_) => {
                unreachable!("the model's workload sends no template or freeze")
            }
            // Per-principal limits are tested in the ledger's unit tests; the model's
            // load stays far below the defaults, so they never refuse here.
            Op::SetLimits(l) => {
                l.validate()?;
                Ok((Reply::LimitsSet, 1))
            }
            Op::Overrun(o) => {
                ration_core::command::check_amount("amount", o.amount)?;
                if o.amount == 0 {
                    return Err(LedgerError::InvalidArgument {
                        field: String::new(),
                        reason: String::new(),
                    });
                }
                if !self.budgets.contains_key(o.budget.as_str()) {
                    return Err(LedgerError::BudgetNotFound { path: o.budget.clone() });
                }
                let mut touched = Vec::new();
                for path in self.chain(o.budget.as_str()) {
                    for l in self.budgets[&path].limits.iter().filter(|l| l.unit == o.unit) {
                        if self.consumed_now(l.generation) + o.amount > 4 * MAX_AMOUNT {
                            return Err(LedgerError::AmountTooLarge {
                                field: String::new(),
                                value: 0,
                                max: 0,
                            });
                        }
                        touched.push((l.generation, l.window.bounds(now).0, l.cap));
                    }
                }
                if touched.is_empty() {
                    return Err(LedgerError::NoLimitForUnit {
                        path: o.budget.clone(),
                        unit: o.unit.clone(),
                    });
                }
                let mut over_cap = false;
                for (generation, start, cap) in touched {
                    *self.bucket(generation, start) += o.amount;
                    *self.overruns.entry((generation, start)).or_insert(0) += o.amount;
                    over_cap |= self.consumed_now(generation) + self.outstanding(generation) > cap;
                }
                Ok((Reply::OverrunRecorded { recorded: o.amount, over_cap }, 1))
            }
            // Roles are tested in the ledger's unit tests and against real nodes;
            // the model sends unauthenticated requests only.
            Op::GrantRole(_) | Op::RevokeRole(_) => {
                unreachable!("the model generates no role changes")
            }
        }
    }

    fn acquire(
        &mut self,
        lease_id: LeaseId,
        who: usize,
        a: &Acquire,
        starts_at: Option<u64>,
    ) -> Result<(Reply, u64), LedgerError> {
        let now = self.now_ms;
        ration_core::command::check_amount("wanted", a.wanted)?;
        ration_core::command::check_amount("min", a.min)?;
        let max_ttl = LedgerConfig::default().max_lease_ttl_ms;
        if a.wanted == 0 || a.min > a.wanted || a.ttl_ms == 0 || a.ttl_ms > max_ttl {
            return Err(LedgerError::InvalidArgument {
                field: String::new(),
                reason: String::new(),
            });
        }
        if !self.budgets.contains_key(a.budget.as_str()) {
            return Err(LedgerError::BudgetNotFound { path: a.budget.clone() });
        }
        let opens = starts_at.filter(|&s| s > now);
        if opens.is_some_and(|s| s - now > max_ttl) {
            return Err(LedgerError::InvalidArgument {
                field: String::new(),
                reason: String::new(),
            });
        }
        let at_least = a.min.max(1);
        let mut grant = a.wanted;
        let mut window_end = u64::MAX;
        let mut counters = Vec::new();
        for path in self.chain(a.budget.as_str()) {
            for l in self.budgets[&path].limits.iter().filter(|l| l.unit == a.unit) {
                let (start, end) = l.window.bounds(now);
                if opens.is_some_and(|s| s > end) {
                    return Err(LedgerError::InvalidArgument {
                        field: String::new(),
                        reason: String::new(),
                    });
                }
                // A lease opening when this window ends draws on the next one.
                let (start, end, consumed) = if opens == Some(end) {
                    (end, l.window.bounds(end).1, 0)
                } else {
                    (start, end, self.consumed_now(l.generation))
                };
                let available =
                    l.cap.saturating_sub(consumed + self.outstanding_in(l.generation, start));
                if available < at_least {
                    return Err(LedgerError::Exhausted {
                        path: p(&path),
                        unit: a.unit.clone(),
                        window: l.window,
                        available,
                        min: at_least,
                    });
                }
                let holders = self.holders(l.generation, start);
                let sharers = holders.len() as u64 + u64::from(!holders.contains(&who));
                let share = available.div_ceil(sharers);
                grant = grant.min(a.wanted.min(share).max(at_least).min(available));
                window_end = window_end.min(end);
                counters.push((l.generation, start));
            }
        }
        if counters.is_empty() {
            return Err(LedgerError::NoLimitForUnit {
                path: a.budget.clone(),
                unit: a.unit.clone(),
            });
        }
        let expires_at_ms = (now + a.ttl_ms).min(window_end);
        if opens.is_some_and(|s| expires_at_ms <= s) {
            return Err(LedgerError::InvalidArgument {
                field: String::new(),
                reason: String::new(),
            });
        }
        self.leases.insert(
            lease_id,
            MLease {
                principal: who,
                budget: a.budget.to_string(),
                counters,
                opens_at: opens,
                granted: grant,
                reported: 0,
                expires_at_ms,
                window_end_ms: window_end,
                state: MState::Live,
            },
        );
        Ok((
            Reply::Granted(ration_core::Grant {
                lease: lease_id,
                granted: grant,
                expires_at_ms,
                window_end_ms: window_end,
                ttl_ms: expires_at_ms - now,
            }),
            1,
        ))
    }

    fn lease_for(&self, id: LeaseId, who: usize) -> Result<&MLease, LedgerError> {
        match self.leases.get(&id) {
            Some(l) if l.state != MState::Gone && l.principal != who => {
                Err(LedgerError::ForeignLease { lease: id })
            }
            Some(l) if l.state != MState::Gone => Ok(l),
            _ => Err(LedgerError::LeaseNotFound { lease: id }),
        }
    }

    /// Every model limit against the ledger's view, and the cap.
    fn check(&self, ledger: &Ledger) -> Result<(), TestCaseError> {
        prop_assert_eq!(ledger.budget_count(), self.budgets.len());
        for (path, b) in &self.budgets {
            let view = ledger
                .budget(&p(path))
                .ok_or_else(|| TestCaseError::fail(format!("{path} missing")))?;
            prop_assert_eq!(view.version, b.version);
            prop_assert_eq!(view.limits.len(), b.limits.len());
            for (l, v) in b.limits.iter().zip(&view.limits) {
                let consumed = self.consumed_now(l.generation);
                let outstanding = self.outstanding(l.generation);
                let overruns = self.overruns_now(l.generation);
                let upcoming = self.upcoming(l.generation);
                prop_assert!(upcoming <= l.cap, "next window over its cap");
                prop_assert_eq!(
                    (v.consumed, v.outstanding, v.overruns, v.upcoming),
                    (consumed, outstanding, overruns, upcoming),
                    "{} {} per {}",
                    path,
                    l.unit,
                    l.window
                );
                prop_assert!(
                    consumed + outstanding <= l.cap + overruns,
                    "cap broken on {} {} per {}",
                    path,
                    l.unit,
                    l.window
                );
            }
        }
        let live = self.leases.values().filter(|l| l.state == MState::Live).count();
        prop_assert_eq!(ledger.live_lease_count(), live);
        Ok(())
    }
}

// ----- the driver -----

struct Run {
    ledger: Ledger,
    model: Model,
    log: AuditLog,
    entries: Vec<(u64, Entry)>,
    /// Each request sent, with its first outcome.
    sent: Vec<(Request, Outcome)>,
    shadow: Option<Ledger>,
    index: u64,
    request_id: u64,
    started_ms: u64,
}

impl Run {
    fn new() -> Self {
        Self {
            ledger: Ledger::default(),
            model: Model { now_ms: T0, ..Model::default() },
            log: AuditLog::new(),
            entries: Vec::new(),
            sent: Vec::new(),
            shadow: None,
            index: 0,
            request_id: 0,
            started_ms: T0,
        }
    }

    fn limits(&self, gens: &[LimitGen]) -> Vec<LimitSpec> {
        gens.iter()
            .map(|g| LimitSpec {
                unit: Unit::new(UNITS[g.unit]).unwrap(),
                cap: g.cap,
                window: windows()[g.window],
                on_unreachable: FailPolicy::FailClosed,
            })
            .collect()
    }

    /// Mostly a live lease; sometimes any lease ever granted (expired, settled).
    fn pick_lease(&self, pick: usize) -> Option<(LeaseId, MLease)> {
        let live: Vec<_> =
            self.model.leases.iter().filter(|(_, l)| l.state == MState::Live).collect();
        let pool: Vec<_> = if pick % 5 != 0 && !live.is_empty() {
            live
        } else {
            self.model.leases.iter().collect()
        };
        if pool.is_empty() {
            return None;
        }
        let (id, l) = pool[(pick / 5) % pool.len()];
        Some((*id, l.clone()))
    }

    /// Turns an intent into a concrete request (principal index, op).
    fn resolve(&self, cmd: &Cmd) -> Option<(usize, Op)> {
        let ops = PRINCIPALS.len(); // index of the operator principal
        Some(match cmd {
            Cmd::Tick => return None,
            Cmd::Create { budget, limits } => (
                ops,
                Op::CreateBudget(BudgetSpec {
                    path: p(PATHS[*budget]),
                    limits: self.limits(limits),
                }),
            ),
            Cmd::Update { budget, limits, stale } => {
                let version = self.model.budgets.get(PATHS[*budget]).map_or(1, |b| b.version)
                    + u64::from(*stale);
                (
                    ops,
                    Op::UpdateBudget {
                        spec: BudgetSpec { path: p(PATHS[*budget]), limits: self.limits(limits) },
                        expected_version: version,
                    },
                )
            }
            Cmd::Delete { budget } => {
                (ops, Op::DeleteBudget { path: p(PATHS[*budget]), expected_version: None })
            }
            Cmd::Acquire { budget, unit, wanted, min, ttl_ms, who, next } => {
                let acquire = Acquire {
                    budget: p(PATHS[*budget]),
                    unit: Unit::new(UNITS[*unit]).unwrap(),
                    wanted: *wanted,
                    min: *min,
                    ttl_ms: *ttl_ms,
                };
                let op = match next {
                    None => Op::Acquire(acquire),
                    Some(k) => {
                        let end = self.model.next_start(PATHS[*budget], UNITS[*unit]);
                        let starts_at_ms = match k {
                            8 => end.saturating_add(1),
                            9 => self.model.now_ms,
                            _ => end,
                        };
                        Op::AcquireNext(ration_core::AcquireNext { acquire, starts_at_ms })
                    }
                };
                (*who, op)
            }
            Cmd::Report { pick, percent, renew_ms, foreign } => {
                let (lease, l) =
                    self.pick_lease(*pick).unwrap_or((LeaseId::from_raw(7), MLease::dummy()));
                let delta = (l.granted - l.reported) * percent / 100;
                let who = if *foreign { (l.principal + 1) % PRINCIPALS.len() } else { l.principal };
                (who, Op::Report(Report { lease, consumed_delta: delta, renew_ttl_ms: *renew_ms }))
            }
            Cmd::Release { pick, percent, foreign } => {
                let (lease, l) =
                    self.pick_lease(*pick).unwrap_or((LeaseId::from_raw(7), MLease::dummy()));
                let total = l.reported + (l.granted - l.reported) * percent / 100;
                let who = if *foreign { (l.principal + 1) % PRINCIPALS.len() } else { l.principal };
                (who, Op::Release(Release { lease, consumed_total: total }))
            }
            Cmd::Overrun { budget, unit, amount, who } => (
                *who,
                Op::Overrun(ration_core::command::Overrun {
                    budget: p(PATHS[*budget]),
                    unit: Unit::new(UNITS[*unit]).unwrap(),
                    amount: *amount,
                }),
            ),
        })
    }

    fn principal(who: usize) -> Principal {
        Principal::new(PRINCIPALS.get(who).copied().unwrap_or("ops")).unwrap()
    }

    fn apply(&mut self, entry: Entry) -> Result<Vec<Outcome>, TestCaseError> {
        self.index += 1;
        let applied = self.ledger.apply(self.index, &entry);
        // The ledger's own encoder (which the hashes, fingerprints, snapshots and
        // the audit store use) writes postcard's bytes for all it is given.
        prop_assert_eq!(ration_core::encode(&entry), postcard::to_stdvec(&entry).unwrap());
        for r in &applied.audit {
            prop_assert_eq!(ration_core::encode(r), postcard::to_stdvec(r).unwrap());
        }
        self.log.append(applied.audit.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Some(shadow) = &mut self.shadow {
            let again = shadow.apply(self.index, &entry);
            prop_assert_eq!(&again, &applied, "the restored ledger diverged");
        }
        self.entries.push((self.index, entry));
        self.ledger.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
        Ok(applied.outcomes)
    }

    fn entry(&mut self, advance_ms: u64, cmds: &[Cmd]) -> Result<(), TestCaseError> {
        let budget_left = (self.started_ms + MAX_ADVANCE_MS).saturating_sub(self.model.now_ms);
        let time_ms = self.model.now_ms + advance_ms.min(budget_left);
        let mut expected_records = self.model.advance(time_ms);
        let mut commands = Vec::new();
        let mut expected = Vec::new();
        for (slot, cmd) in cmds.iter().enumerate() {
            match self.resolve(cmd) {
                None => {
                    commands.push(Command::Tick);
                    expected.push(Ok(Reply::Ticked { now_ms: self.model.now_ms }));
                }
                Some((who, op)) => {
                    let (outcome, records) =
                        self.model.execute(LeaseId::from_position(self.index + 1, slot), who, &op);
                    expected_records += records;
                    expected.push(outcome);
                    self.request_id += 1;
                    let client = ClientId::new(format!("client-{who}")).unwrap();
                    commands.push(Command::Request(Request {
                        client,
                        request_id: self.request_id,
                        principal: Self::principal(who),
                        op,
                    }));
                }
            }
        }
        let records_before = self.log.len() as u64;
        let outcomes = self.apply(Entry::V1(Batch { time_ms, commands: commands.clone() }))?;
        for ((got, want), command) in outcomes.iter().zip(&expected).zip(&commands) {
            match (got, want) {
                (Ok(g), Ok(w)) => prop_assert_eq!(g, w, "{:?}", command),
                (Err(g), Err(w)) => prop_assert!(
                    same_variant(g, w),
                    "got {:?}, model expected {:?} for {:?}",
                    g,
                    w,
                    command
                ),
                _ => prop_assert!(
                    false,
                    "got {:?}, model expected {:?} for {:?}",
                    got,
                    want,
                    command
                ),
            }
            if let Command::Request(r) = command {
                self.sent.push((r.clone(), got.clone()));
            }
        }
        self.model.records += expected_records;
        prop_assert_eq!(
            self.log.len() as u64 - records_before,
            expected_records,
            "audit records written"
        );
        self.model.check(&self.ledger)?;
        self.check_conservation()
    }

    fn retry(&mut self, pick: usize) -> Result<(), TestCaseError> {
        if self.sent.is_empty() {
            return Ok(());
        }
        let (request, first) = self.sent[pick % self.sent.len()].clone();
        // Refusals that leave no trace (another principal's lease or client id, a
        // per-principal limit) are not remembered by design: a retry is checked
        // afresh and may be refused differently (the lease may be gone since).
        if matches!(
            first,
            Err(LedgerError::ForeignLease { .. }
                | LedgerError::ForeignClient { .. }
                | LedgerError::PrincipalLimit { .. })
        ) {
            return Ok(());
        }
        let mut idle = self.ledger.clone();
        idle.apply(
            self.index + 1,
            &Entry::V1(Batch { time_ms: self.model.now_ms, commands: vec![] }),
        );
        let records_before = self.log.len();
        let outcomes = self.apply(Entry::V1(Batch {
            time_ms: self.model.now_ms,
            commands: vec![Command::Request(request)],
        }))?;
        prop_assert_eq!(&outcomes[0], &first, "a retry must return the first result");
        prop_assert_eq!(self.log.len(), records_before, "a retry writes no record");
        prop_assert!(idle.digest() == self.ledger.digest(), "a retry changed the state");
        Ok(())
    }

    fn snapshot(&mut self) -> Result<(), TestCaseError> {
        let bytes = self.ledger.snapshot();
        let restored = Ledger::restore(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(restored.digest() == self.ledger.digest());
        self.shadow = Some(restored);
        Ok(())
    }

    fn check_conservation(&self) -> Result<(), TestCaseError> {
        let t = self.ledger.totals();
        let outstanding = self.ledger.outstanding_total();
        prop_assert_eq!(
            t.granted + t.uncharged + t.overrun,
            t.consumed + t.returned + t.charged + outstanding
        );
        let (mut granted, mut rest) = (0i128, 0i128);
        for r in self.log.records() {
            let f = r.entry.flow;
            granted += i128::from(f.granted);
            if r.entry.kind == ration_core::AuditKind::Overrun {
                granted += i128::from(f.consumed);
            }
            rest += i128::from(f.consumed) + i128::from(f.returned) + i128::from(f.charged)
                - i128::from(f.uncharged);
        }
        prop_assert_eq!(granted, rest + outstanding as i128, "conservation from the audit ledger");
        Ok(())
    }

    fn finish(&self) -> Result<(), TestCaseError> {
        // Replay from the first entry gives the same state and the same audit chain.
        let mut replay = Ledger::default();
        let mut log = AuditLog::new();
        for (index, entry) in &self.entries {
            log.append(replay.apply(*index, entry).audit)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        prop_assert!(replay.digest() == self.ledger.digest(), "replay from the start diverged");
        if let Some(shadow) = &self.shadow {
            prop_assert!(
                shadow.digest() == self.ledger.digest(),
                "replay from the snapshot diverged"
            );
        }
        prop_assert_eq!(log.records(), self.log.records());
        let head = verify_chain(self.log.records(), ChainHead::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(head, self.ledger.chain_head());
        Ok(())
    }
}

impl MLease {
    fn dummy() -> Self {
        MLease {
            principal: 0,
            budget: String::new(),
            counters: vec![],
            opens_at: None,
            granted: 3,
            reported: 0,
            expires_at_ms: 0,
            window_end_ms: 0,
            state: MState::Gone,
        }
    }
}

/// What the generated cases exercised, so a generator that stopped reaching a
/// path fails the test instead of passing vacuously.
#[derive(Debug, Default)]
struct Coverage {
    cases: u64,
    entries: u64,
    commands: u64,
    granted: u64,
    /// Grants of acquires for the next window.
    granted_next: u64,
    refused: BTreeMap<String, u64>,
    expired: u64,
    refunded: u64,
    late_after_window: u64,
    overruns: u64,
    retries: u64,
    snapshots: u64,
}

impl Coverage {
    fn add(&mut self, run: &Run) {
        self.cases += 1;
        self.entries += run.entries.len() as u64;
        self.commands += run.sent.len() as u64;
        for (request, outcome) in &run.sent {
            match outcome {
                Ok(Reply::Granted(_)) if matches!(request.op, Op::AcquireNext(_)) => {
                    self.granted += 1;
                    self.granted_next += 1;
                }
                Ok(Reply::Granted(_)) => self.granted += 1,
                Ok(_) => {}
                Err(e) => {
                    let name = format!("{e:?}");
                    let name = name.split([' ', '{', '(']).next().unwrap_or("").to_owned();
                    *self.refused.entry(name).or_insert(0) += 1;
                }
            }
        }
        for r in run.log.records() {
            match r.entry.kind {
                ration_core::AuditKind::LeaseExpired => self.expired += 1,
                ration_core::AuditKind::LeaseRefunded => self.refunded += 1,
                ration_core::AuditKind::LateRelease => self.late_after_window += 1,
                ration_core::AuditKind::Overrun => self.overruns += 1,
                _ => {}
            }
        }
    }
}

#[test]
fn the_ledger_matches_the_model_and_keeps_its_invariants() {
    use proptest::test_runner::{Config, TestRunner};
    use std::cell::RefCell;

    // PROPTEST_CASES overrides the count.
    let config = Config { failure_persistence: None, ..Config::default() };
    let seed = match std::env::var("RATION_PROPTEST_SEED").as_deref() {
        Ok("random") => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                as u64
        }
        Ok(s) => s.parse().expect("RATION_PROPTEST_SEED is a number or 'random'"),
        Err(_) => 0x5eed,
    };
    eprintln!(
        "seed {seed}: replay with RATION_PROPTEST_SEED={seed} cargo test -p ration-core --test ledger_model"
    );
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = proptest::test_runner::TestRng::from_seed(
        proptest::test_runner::RngAlgorithm::ChaCha,
        &bytes,
    );
    let mut runner = TestRunner::new_with_rng(config, rng);
    let coverage = RefCell::new(Coverage::default());
    let case = (
        prop::collection::vec(limits_per_budget(), PATHS.len()),
        prop::collection::vec(step(), 1..120),
    );
    let result = runner.run(&case, |(setup, steps)| {
        let mut run = Run::new();
        // Most cases start from the whole tree, so commands reach real budgets.
        let creates: Vec<Cmd> = setup
            .into_iter()
            .enumerate()
            .map(|(budget, limits)| Cmd::Create { budget, limits })
            .collect();
        run.entry(0, &creates)?;
        for step in &steps {
            match step {
                Step::Entry { advance_ms, cmds } => run.entry(*advance_ms, cmds)?,
                Step::Retry { pick } => {
                    run.retry(*pick)?;
                    coverage.borrow_mut().retries += 1;
                }
                Step::Snapshot => {
                    run.snapshot()?;
                    coverage.borrow_mut().snapshots += 1;
                }
            }
        }
        run.finish()?;
        coverage.borrow_mut().add(&run);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let c = coverage.into_inner();
    eprintln!("{c:#?}");
    // Every path the brief cares about was reached.
    assert!(
        c.granted > 1000
            && c.granted_next > 100
            && c.expired > 100
            && c.refunded > 10
            && c.late_after_window > 0
            && c.overruns > 10,
        "{c:?}"
    );
    assert!(c.retries > 100 && c.snapshots > 50, "{c:?}");
    for kind in [
        "Exhausted",
        "BudgetNotFound",
        "ForeignLease",
        "OverReport",
        "LeaseExpired",
        "CapBelowUsage",
        "VersionMismatch",
        "HasLiveLeases",
    ] {
        assert!(
            c.refused.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} refusal was generated: {c:?}"
        );
    }
}

/// Many gateways hammer one small tree; the cap must hold at every step.
#[test]
fn contention_on_one_tree_never_overshoots() {
    let mut run = Run::new();
    let create = |budget, cap, window| Cmd::Create {
        budget,
        limits: vec![LimitGen { unit: 0, window, cap }],
    };
    run.entry(0, &[create(0, 1000, 3), create(1, 600, 1), create(2, 300, 0)]).unwrap();
    for i in 0..2000usize {
        let cmds: Vec<Cmd> = (0..8)
            .map(|k| match (i + k) % 4 {
                0 | 1 => Cmd::Acquire {
                    budget: 2 - (k % 3),
                    unit: 0,
                    wanted: 37,
                    min: (k % 3) as u64,
                    ttl_ms: 20_000,
                    who: k % 4,
                    next: None,
                },
                2 => Cmd::Report { pick: i * 7 + k, percent: 50, renew_ms: None, foreign: false },
                _ => Cmd::Release { pick: i * 13 + k, percent: 90, foreign: false },
            })
            .collect();
        run.entry(1_500, &cmds).unwrap();
    }
    run.finish().unwrap();
    let totals = run.ledger.totals();
    assert!(totals.granted > 1000, "the test exercised refills: {totals:?}");
}
