//! The ledger state machine: `apply(index, entry)` is a pure function of the state
//! and the entry. No clock, no randomness, no I/O, no hash-map iteration.
//!
//! Every command is checked in full before anything changes, so a refusal changes
//! nothing (beyond being remembered for retries). A broken invariant is a panic.
//!
//! This file holds the state's types, `apply` and the request dispatch, and the
//! lookups the rest share. The operations live beside it: `budgets` (create, update,
//! delete), `leases` (acquire, report, release), `time` (expiry and rollover),
//! `emit` (audit records), `queries` (read accessors and views) and `snapshot`
//! (snapshot, restore, digest and the invariant checks).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::audit::{AuditRecord, Balance, ChainHead, Flow};
use crate::command::{Authority, Command, Entry, LimitSpec, Op, Outcome, Reply, Request};
use crate::dedup::{ClientRequests, Dedup, Seen};
use crate::error::LedgerError;
use crate::index::{HashIndex, IdIndex};
use crate::names::{BudgetPath, LeaseId, Principal, Unit, MAX_COMMANDS_PER_ENTRY, MAX_LEASE_INDEX};
use crate::window::clamp_time;
use counters::Counters;

mod budgets;
mod controls;
mod counters;
mod emit;
mod holders;
mod leases;
mod principals;
mod queries;
mod roles;
mod snapshot;
#[cfg(test)]
mod tests;
mod time;
mod visibility;

pub use controls::TemplateView;
pub(crate) use principals::Principals;
pub use principals::{Held, PrincipalLimits, PrincipalUsage, LEDGER_PATH, MAX_PRINCIPAL_LIMIT};
pub use roles::{Action, MAX_PRINCIPALS_WITH_ROLES, MAX_ROLES_PER_PRINCIPAL};
pub use snapshot::{InvariantError, SnapshotError};
pub use visibility::{Forecast, PriceVersion, RATE_BUCKET_MS};

/// Limits and retention times of a ledger. Part of the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// Longest lease a gateway may ask for.
    pub max_lease_ttl_ms: u64,
    pub max_budgets: u64,
    pub max_live_leases: u64,
    /// How long an expired lease is kept so a late final report can be refunded.
    pub expired_retention_ms: u64,
    pub max_expired_retained: u64,
    /// Results remembered per client (the exactly-once window).
    pub dedup_window: u32,
    /// A client not seen for this long is forgotten by the exactly-once table.
    pub dedup_idle_ms: u64,
    pub max_dedup_clients: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        const HOUR_MS: u64 = 3_600_000;
        Self {
            max_lease_ttl_ms: HOUR_MS,
            max_budgets: 10_000_000,
            max_live_leases: 10_000_000,
            expired_retention_ms: 24 * HOUR_MS,
            max_expired_retained: 1_000_000,
            dedup_window: 1024,
            dedup_idle_ms: 24 * HOUR_MS,
            max_dedup_clients: 1_000_000,
        }
    }
}

/// Budget ids are never reused, so a reference to a deleted budget stays dangling
/// rather than pointing at a new one.
type BudgetId = u64;

/// One limit's usage in its current window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Counter {
    /// Unique over the ledger's life; a limit whose (unit, window) changes gets a new one.
    id: u64,
    window_start_ms: u64,
    window_end_ms: u64,
    /// Settled plus charged on expiry, in this window.
    consumed: u64,
    /// Granted in live leases and not yet reported.
    outstanding: u64,
    /// Reported overruns in this window (included in `consumed`): spend that was never
    /// granted. `consumed + outstanding <= cap + overruns` always. Kept in the
    /// snapshot's second section (see `snapshot`), so older snapshots still decode.
    #[serde(skip)]
    overruns: u64,
    /// Derived: live leases per holder, for the fair share.
    #[serde(skip)]
    holders: holders::Holders,
    /// Granted in live leases that open when this window ends (acquired for the
    /// next window, see [`crate::AcquireNext`]), not yet reported: the next window's
    /// outstanding. Its consumed is zero until it opens. `upcoming <= cap`. In the
    /// snapshot's third section.
    #[serde(skip)]
    upcoming: u64,
    /// Derived: live next-window leases per holder.
    #[serde(skip)]
    upcoming_holders: holders::Holders,
    /// Thresholds crossed and burn rate (`visibility`), once spend is seen. In the
    /// snapshot's seventh section.
    #[serde(skip)]
    watch: Option<Box<visibility::Watch>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Limit {
    spec: LimitSpec,
    counter: Counter,
}

impl Limit {
    /// Whether spend counts as consumed in it: not in a limit on units in flight
    /// ([`crate::Period::Concurrent`]), where what a lease held comes back when it
    /// ends.
    fn counts_spend(&self) -> bool {
        counts_spend(&self.spec)
    }

    /// (consumed, window start, window end) as of `now_ms`, rolling over lazily.
    fn effective(&self, now_ms: u64) -> (u64, u64, u64) {
        let c = &self.counter;
        if now_ms < c.window_end_ms {
            (c.consumed, c.window_start_ms, c.window_end_ms)
        } else {
            let (s, e) = self.spec.window.bounds(now_ms);
            (0, s, e)
        }
    }

    /// Overruns counted in the window holding `now_ms`.
    fn overruns(&self, now_ms: u64) -> u64 {
        if now_ms < self.counter.window_end_ms {
            self.counter.overruns
        } else {
            0
        }
    }

    /// What may still be granted: nothing once consumed + outstanding reaches the cap
    /// (after an overrun it may be above it).
    fn available(&self, now_ms: u64) -> u64 {
        let (consumed, _, _) = self.effective(now_ms);
        self.spec.cap.saturating_sub(consumed.saturating_add(self.counter.outstanding))
    }

    /// What may still be granted in the window after the current one.
    fn available_next(&self) -> u64 {
        self.spec.cap.saturating_sub(self.counter.upcoming)
    }

    /// Moves the counter to the window holding `now_ms`, if that is a later one. The
    /// next window's leases become the current window's.
    fn roll(&mut self, now_ms: u64) {
        let c = &mut self.counter;
        if now_ms >= c.window_end_ms {
            // Leases never outlive their window, and expiry runs before any roll;
            // next-window leases open (and roll their counters) at the window's end.
            assert_eq!(c.outstanding, 0, "invariant: a window closes with nothing outstanding");
            assert!(c.holders.is_empty(), "invariant: a window closes with no holders");
            let (s, e) = self.spec.window.bounds(now_ms);
            if s == c.window_end_ms {
                c.outstanding = std::mem::take(&mut c.upcoming);
                c.holders = std::mem::take(&mut c.upcoming_holders);
            } else {
                assert_eq!(c.upcoming, 0, "invariant: next-window leases opened at its start");
            }
            c.window_start_ms = s;
            c.window_end_ms = e;
            c.consumed = 0;
            c.overruns = 0;
        }
    }

    /// The next window's figures, as an audit balance.
    fn upcoming_balance(&self, budget: &BudgetPath) -> Balance {
        Balance {
            budget: budget.clone(),
            unit: self.spec.unit.clone(),
            window: self.spec.window,
            window_start_ms: self.counter.window_end_ms,
            cap: self.spec.cap,
            consumed: 0,
            outstanding: self.counter.upcoming,
        }
    }

    fn balance(&self, budget: &BudgetPath) -> Balance {
        Balance {
            budget: budget.clone(),
            unit: self.spec.unit.clone(),
            window: self.spec.window,
            window_start_ms: self.counter.window_start_ms,
            cap: self.spec.cap,
            consumed: self.counter.consumed,
            outstanding: self.counter.outstanding,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Budget {
    path: BudgetPath,
    parent: Option<BudgetId>,
    version: u64,
    limits: Vec<Limit>,
    /// Derived: number of child budgets.
    #[serde(skip)]
    children: u64,
    /// Derived: live leases on this budget or below it.
    #[serde(skip)]
    live_leases: u64,
}

/// A counter a lease drew on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CounterRef {
    budget: BudgetId,
    counter: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    principal: Principal,
    budget: BudgetId,
    /// The budget's path, kept for audit records (budgets with live leases are never
    /// deleted, so it stays true).
    path: BudgetPath,
    unit: Unit,
    granted: u64,
    reported: u64,
    acquired_ms: u64,
    expires_at_ms: u64,
    window_end_ms: u64,
    counters: Counters,
}

/// An expired lease kept for a late final report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ExpiredLease {
    principal: Principal,
    path: BudgetPath,
    unit: Unit,
    granted: u64,
    reported: u64,
    window_end_ms: u64,
    forget_at_ms: u64,
    counters: Counters,
}

/// Lifetime allowance flows; `granted + overrun = consumed + returned + charged -
/// uncharged + outstanding` always.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub granted: u128,
    pub consumed: u128,
    pub returned: u128,
    pub charged: u128,
    pub uncharged: u128,
    /// Reported overruns (included in `consumed`). In the snapshot's second section.
    #[serde(skip)]
    pub overrun: u128,
}

impl Totals {
    /// Adds one audit record's flow.
    pub fn add_record(&mut self, kind: crate::audit::AuditKind, f: &Flow) {
        if kind == crate::audit::AuditKind::Overrun {
            self.overrun = self.overrun.saturating_add(f.consumed.into());
        }
        self.add(f);
    }

    fn add(&mut self, f: &Flow) {
        self.granted = self.granted.saturating_add(f.granted.into());
        self.consumed = self.consumed.saturating_add(f.consumed.into());
        self.returned = self.returned.saturating_add(f.returned.into());
        self.charged = self.charged.saturating_add(f.charged.into());
        self.uncharged = self.uncharged.saturating_add(f.uncharged.into());
    }
}

/// What applying one entry produced: one outcome per command, in order, and the
/// audit records to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub outcomes: Vec<Outcome>,
    pub audit: Vec<AuditRecord>,
}

/// A limit's figures as of the ledger's time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitView {
    pub spec: LimitSpec,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub consumed: u64,
    pub outstanding: u64,
    pub remaining: u64,
    /// Overruns counted in this window (part of `consumed`).
    pub overruns: u64,
    /// Distinct principals holding live leases on it.
    pub holders: u64,
    /// Granted in leases for the next window (they open when this one ends).
    pub upcoming: u64,
    /// The highest alert threshold (percent of the cap) spend has reached in this
    /// window.
    pub threshold_reached_pct: Option<u32>,
}

/// A budget as queries see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetView {
    pub path: BudgetPath,
    pub version: u64,
    pub limits: Vec<LimitView>,
    pub children: u64,
    pub live_leases: u64,
    /// Frozen (by an operator, or halted by a run's guard): it grants nothing, nor
    /// does any budget below it.
    pub frozen: bool,
    /// Why it is frozen.
    pub hold: Option<String>,
    /// Made by its parent's template (and expires when idle, if the template says so).
    pub instance: bool,
    /// The template on it, if any.
    pub template: Option<TemplateView>,
    /// Its alert thresholds and shadow mode, if set.
    pub options: Option<crate::command::BudgetOptions>,
    /// In shadow mode: acquires its caps would have refused.
    pub shadow_refusals: u64,
}

/// A live lease as queries see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub lease: LeaseId,
    pub principal: Principal,
    pub budget: BudgetPath,
    pub unit: Unit,
    pub granted: u64,
    pub reported: u64,
    pub acquired_ms: u64,
    pub expires_at_ms: u64,
    pub window_end_ms: u64,
    /// When a lease acquired for the next window opens (nothing is spent from it
    /// before); `None` once it is open.
    pub opens_at_ms: Option<u64>,
}

/// The quota ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    config: LedgerConfig,
    last_index: u64,
    now_ms: u64,
    next_budget_id: BudgetId,
    next_counter_id: u64,
    budgets: IdIndex<BudgetId, Budget>,
    leases: IdIndex<LeaseId, Lease>,
    expired: BTreeMap<LeaseId, ExpiredLease>,
    dedup: Dedup,
    totals: Totals,
    chain: ChainHead,
    /// Derived: budget ids by path, hashed (point lookups, once or twice per request).
    #[serde(skip)]
    by_path: HashIndex<BudgetPath, BudgetId>,
    /// Derived: the same paths in order, for listing.
    #[serde(skip)]
    paths: BTreeSet<BudgetPath>,
    #[serde(skip)]
    expiry: BTreeSet<(u64, LeaseId)>,
    #[serde(skip)]
    forget: BTreeSet<(u64, LeaseId)>,
    /// Live leases acquired for the next window that have not opened yet, with the
    /// time they open. In the snapshot's third section.
    #[serde(skip)]
    opening: BTreeMap<LeaseId, u64>,
    /// Derived: `opening` in time order.
    #[serde(skip)]
    openings: BTreeSet<(u64, LeaseId)>,
    /// Per-principal limits and usage. In the snapshot's fourth section.
    #[serde(skip)]
    principals: Principals,
    /// Who holds which roles. In the snapshot's fifth section.
    #[serde(skip)]
    roles: roles::Roles,
    /// Templates, by the budget they are on. In the snapshot's sixth section.
    #[serde(skip)]
    templates: BTreeMap<BudgetId, controls::Template>,
    /// Budgets a template made. In the snapshot's sixth section.
    #[serde(skip)]
    instances: BTreeMap<BudgetId, controls::Instance>,
    /// Derived: instances by when to look at them for expiry.
    #[serde(skip)]
    instance_due: BTreeSet<(u64, BudgetId)>,
    /// Budgets that grant nothing on them or below them, and why. In the sixth
    /// section.
    #[serde(skip)]
    frozen: BTreeMap<BudgetId, controls::Hold>,
    /// Runs halted by their guards since the ledger began. In the sixth section.
    #[serde(skip)]
    halted_total: u64,
    /// The price book, budget options, what is watched of each counter, the
    /// webhook cursor. In the seventh section.
    #[serde(skip)]
    vis: visibility::Visibility,
    /// The cause of the request being applied (none between requests), which
    /// every record it emits carries.
    #[serde(skip)]
    cause: Option<crate::audit::Cause>,
    /// Counters whose spend changed in the command being applied, for `observe`
    /// (empty between commands).
    #[serde(skip)]
    spent: Vec<visibility::Spent>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new(LedgerConfig::default())
    }
}

impl Ledger {
    pub fn new(config: LedgerConfig) -> Self {
        Self {
            config,
            last_index: 0,
            now_ms: 0,
            next_budget_id: 1,
            next_counter_id: 1,
            budgets: IdIndex::new(),
            leases: IdIndex::new(),
            expired: BTreeMap::new(),
            dedup: Dedup::default(),
            totals: Totals::default(),
            chain: ChainHead::default(),
            by_path: HashIndex::new(),
            paths: BTreeSet::new(),
            expiry: BTreeSet::new(),
            forget: BTreeSet::new(),
            opening: BTreeMap::new(),
            openings: BTreeSet::new(),
            principals: Principals::default(),
            roles: roles::Roles::default(),
            templates: BTreeMap::new(),
            instances: BTreeMap::new(),
            instance_due: BTreeSet::new(),
            frozen: BTreeMap::new(),
            halted_total: 0,
            vis: visibility::Visibility::default(),
            cause: None,
            spent: Vec::new(),
        }
    }

    /// Applies log entry `index`. Indexes must increase; the entry's time moves the
    /// ledger's clock forward (never back), then expiries run, then the commands.
    ///
    /// # Panics
    /// If `index` does not increase, or a ledger invariant is broken.
    pub fn apply(&mut self, index: u64, entry: &Entry) -> Applied {
        assert!(index > self.last_index, "entry {index} applied after {}", self.last_index);
        assert!(index <= MAX_LEASE_INDEX, "log index {index} beyond what lease ids encode");
        self.last_index = index;
        let Entry::V1(batch) = entry;
        self.now_ms = self.now_ms.max(clamp_time(batch.time_ms));
        // Most commands emit a record: room for one each, so the records (hundreds of
        // bytes apiece) are not copied as the vector doubles.
        let mut audit = Vec::with_capacity(batch.commands.len());
        self.housekeep(index, &mut audit);
        self.observe(index, &mut audit);
        let outcomes = batch
            .commands
            .iter()
            .enumerate()
            .map(|(slot, command)| match command {
                _ if slot >= MAX_COMMANDS_PER_ENTRY => Err(LedgerError::InvalidArgument {
                    field: "entry".into(),
                    reason: format!("more than {MAX_COMMANDS_PER_ENTRY} commands in one entry"),
                }),
                Command::Tick => Ok(Reply::Ticked { now_ms: self.now_ms }),
                Command::Request(request) => self.request(index, slot, request, None, &mut audit),
                Command::Authenticated { request, authority } => {
                    self.request(index, slot, request, Some(*authority), &mut audit)
                }
                Command::AckNotices { upto_seq } => self.ack_notices(*upto_seq),
            })
            .collect();
        Applied { outcomes, audit }
    }

    fn request(
        &mut self,
        index: u64,
        slot: usize,
        req: &Request,
        authority: Option<Authority>,
        audit: &mut Vec<AuditRecord>,
    ) -> Outcome {
        // Exactly once per (principal, client id): a client id belongs to the
        // principal of its first remembered request, and another principal can
        // neither replay its results nor burn its request ids.
        // One lookup of the client serves the owner check, the replay check and
        // admission (`admit`, below).
        let held = self.dedup.client(&req.client);
        // The request acts through the ledger's own copy of its principal, when it
        // holds one (`Principals::canonical`): same text, cheaper comparisons.
        let principal = self.principals.canonical(&req.principal).unwrap_or(&req.principal).clone();
        if held.and_then(|c| c.owner()).is_some_and(|owner| *owner != principal) {
            return Err(LedgerError::ForeignClient { client: req.client.to_string() });
        }
        let fingerprint = fingerprint(req);
        let window = self.config.dedup_window;
        match Dedup::check_in(held, &req.client, req.request_id, fingerprint, window) {
            Seen::Replay(outcome) => return outcome,
            Seen::Refused(err) => return Err(err),
            Seen::New => {}
        }
        // An authenticated principal needs the role for what it asks, as of now (a
        // refusal leaves no trace: granting the role and retrying works). A report
        // whose renewal it may no longer ask for is applied without the renewal.
        let stripped;
        let op = match authority.map(|a| self.authorize_request(req, a)).transpose()? {
            Some(false) => {
                let Op::Report(r) = req.op.inner() else {
                    unreachable!("only reports lose a part")
                };
                stripped = Op::Report(crate::command::Report { renew_ttl_ms: None, ..r.clone() });
                &stripped
            }
            _ => req.op.inner(),
        };
        // Checked before anything is remembered: a refusal here leaves no trace.
        // Never for SetLimits, so an operator held by a limit can still raise it.
        if !matches!(req.op.inner(), Op::SetLimits(_)) {
            if let Some(refusal) = self.admit(req, held) {
                return Err(refusal);
            }
        }
        // Acting on another principal's lease leaves no trace either: the answer
        // cannot change (a lease's principal never does), so nothing needs to be
        // remembered for a retry, and a client cannot grow the table with them.
        let lease = match req.op.inner() {
            Op::Report(r) => Some(r.lease),
            Op::Release(r) => Some(r.lease),
            _ => None,
        };
        if let Some(id) = lease.filter(|id| self.owned_by_another(*id, &principal)) {
            return Err(LedgerError::ForeignLease { lease: id });
        }
        let outcome = match &req.op {
            Op::Annotated { note, op: inner } => match (note.validate(), inner.as_ref()) {
                (Err(e), _) => Err(e),
                (_, Op::Annotated { .. }) => Err(LedgerError::InvalidArgument {
                    field: "op".into(),
                    reason: "an annotated operation may not be annotated again".into(),
                }),
                _ => Ok(()),
            },
            _ => Ok(()),
        };
        let outcome = match outcome {
            Err(e) => Err(e),
            Ok(()) => {
                self.cause = Some(visibility::cause_of(req));
                let outcome = self.dispatch(index, slot, &principal, op, audit);
                if outcome.is_ok() {
                    self.observe(index, audit);
                }
                self.spent.clear();
                self.cause = None;
                outcome
            }
        };
        self.dedup.remember(
            &req.client,
            &principal,
            req.request_id,
            fingerprint,
            outcome.clone(),
            self.now_ms,
            &self.config,
            &mut self.principals,
        );
        outcome
    }

    fn dispatch(
        &mut self,
        index: u64,
        slot: usize,
        principal: &Principal,
        op: &Op,
        audit: &mut Vec<AuditRecord>,
    ) -> Outcome {
        let mut ctx = Ctx { index, principal, audit };
        match op {
            Op::CreateBudget(spec) => self.create_budget(&mut ctx, spec),
            Op::UpdateBudget { spec, expected_version } => {
                self.update_budget(&mut ctx, spec, *expected_version)
            }
            Op::DeleteBudget { path, expected_version } => {
                self.delete_budget(&mut ctx, path, *expected_version)
            }
            Op::Acquire(a) => {
                self.with_instance(&mut ctx, &a.budget, |l, ctx| l.acquire(ctx, slot, a, None))
            }
            Op::AcquireNext(a) => self.with_instance(&mut ctx, &a.acquire.budget, |l, ctx| {
                l.acquire(ctx, slot, &a.acquire, Some(a.starts_at_ms))
            }),
            Op::Report(r) => self.report(&mut ctx, r),
            Op::Release(r) => self.release(&mut ctx, r),
            Op::Overrun(o) => self.with_instance(&mut ctx, &o.budget, |l, ctx| l.overrun(ctx, o)),
            Op::SetLimits(l) => self.set_limits(&mut ctx, l),
            Op::GrantRole(g) => self.grant_role(&mut ctx, g),
            Op::RevokeRole(g) => self.revoke_role(&mut ctx, g),
            Op::SetTemplate(t) => self.set_template(&mut ctx, t),
            Op::DeleteTemplate { parent } => self.delete_template(&mut ctx, parent),
            Op::Freeze { path, frozen } => self.freeze(&mut ctx, path, *frozen),
            Op::SetPrice(p) => self.set_price(&mut ctx, p),
            Op::SetOptions { path, options } => self.set_options(&mut ctx, path, options),
            Op::RecordCall(c) => self.record_call(&mut ctx, c),
            Op::Annotated { .. } => unreachable!("unwrapped by `request`"),
        }
    }

    /// The per-principal limits on the exactly-once table: a client new to it
    /// counts against its principal's clients, and a result it would remember
    /// against its owner's outcomes.
    fn admit(&self, req: &Request, held: Option<&ClientRequests>) -> Option<LedgerError> {
        let owner = match (held, held.and_then(|c| c.owner())) {
            (_, Some(owner)) => owner,
            // Held since before owners were recorded: counted against nobody.
            (Some(_), None) => return None,
            (None, None) => {
                if let Some(full) = self.principals.full(&req.principal, Held::Clients) {
                    return Some(full);
                }
                &req.principal
            }
        };
        if held.is_none_or(|c| c.grows(self.config.dedup_window)) {
            return self.principals.full(owner, Held::Outcomes);
        }
        None
    }

    // ----- lookups -----

    fn budget_id(&self, path: &BudgetPath) -> Result<BudgetId, LedgerError> {
        self.by_path
            .get(path)
            .copied()
            .ok_or_else(|| LedgerError::BudgetNotFound { path: path.clone() })
    }

    fn budget_mut(&mut self, id: BudgetId) -> &mut Budget {
        self.budgets.get_mut(&id).expect("invariant: budget ids in use resolve")
    }

    /// Applies `change` to each counter that still exists, and returns the balances
    /// after it, in one lookup per counter.
    fn update_counters(
        &mut self,
        counters: &[CounterRef],
        mut change: impl FnMut(&LimitSpec, &mut Counter),
    ) -> Vec<Balance> {
        let mut balances = Vec::with_capacity(counters.len());
        for r in counters {
            let Some(b) = self.budgets.get_mut(&r.budget) else { continue };
            let Some(limit) = b.limits.iter_mut().find(|l| l.counter.id == r.counter) else {
                continue;
            };
            change(&limit.spec, &mut limit.counter);
            balances.push(limit.balance(&b.path));
        }
        balances
    }
}

/// Whether spend counts as consumed in a limit (see [`Limit::counts_spend`]).
fn counts_spend(spec: &LimitSpec) -> bool {
    spec.window.period() != crate::window::Period::Concurrent
}

/// Which lease an audit record is about.
struct About<'a> {
    lease: LeaseId,
    path: &'a BudgetPath,
    principal: &'a Principal,
    unit: &'a Unit,
}

/// Borrowed context of the request being applied.
struct Ctx<'a> {
    index: u64,
    principal: &'a Principal,
    audit: &'a mut Vec<AuditRecord>,
}

/// 64 bits of SHA-256 over the principal and operation: a retry must match its
/// original to get the remembered result.
fn fingerprint(req: &Request) -> u64 {
    let digest = crate::hashing::sha256_of(b"ration-request-v1\0", &(&req.principal, &req.op));
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}
