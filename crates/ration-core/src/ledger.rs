//! The ledger state machine: `apply(index, entry)` is a pure function of the state
//! and the entry. No clock, no randomness, no I/O, no hash-map iteration.
//!
//! Every command is checked in full before anything changes, so a refusal changes
//! nothing (beyond being remembered for retries). A broken invariant is a panic.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{AuditEntry, AuditKind, AuditRecord, Balance, ChainHead, Flow, GENESIS};
use crate::command::{
    check_amount, Acquire, BudgetSpec, Command, Entry, Grant, LimitSpec, Op, Outcome, Release,
    Reply, Report, Request,
};
use crate::dedup::{Dedup, Seen};
use crate::error::LedgerError;
use crate::names::{BudgetPath, LeaseId, Principal, Unit, MAX_COMMANDS_PER_ENTRY, MAX_LEASE_INDEX};
use crate::window::{clamp_time, Window};

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
    /// Derived: live leases per holder, for the fair share.
    #[serde(skip)]
    holders: BTreeMap<Principal, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Limit {
    spec: LimitSpec,
    counter: Counter,
}

impl Limit {
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

    fn available(&self, now_ms: u64) -> u64 {
        let (consumed, _, _) = self.effective(now_ms);
        self.spec
            .cap
            .checked_sub(consumed)
            .and_then(|a| a.checked_sub(self.counter.outstanding))
            .expect("invariant: consumed + outstanding <= cap")
    }

    fn roll(&mut self, now_ms: u64) {
        let c = &mut self.counter;
        if now_ms >= c.window_end_ms {
            // Leases never outlive their window, and expiry runs before any roll.
            assert_eq!(c.outstanding, 0, "invariant: a window closes with nothing outstanding");
            let (s, e) = self.spec.window.bounds(now_ms);
            c.window_start_ms = s;
            c.window_end_ms = e;
            c.consumed = 0;
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
    counters: Vec<CounterRef>,
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
    counters: Vec<CounterRef>,
}

/// Lifetime allowance flows; `granted = consumed + returned + charged - uncharged +
/// outstanding` always.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub granted: u128,
    pub consumed: u128,
    pub returned: u128,
    pub charged: u128,
    pub uncharged: u128,
}

impl Totals {
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
    /// Distinct principals holding live leases on it.
    pub holders: u64,
}

/// A budget as queries see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetView {
    pub path: BudgetPath,
    pub version: u64,
    pub limits: Vec<LimitView>,
    pub children: u64,
    pub live_leases: u64,
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
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("snapshot decodes but is inconsistent: {0}")]
    Inconsistent(String),
}

/// The quota ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    config: LedgerConfig,
    last_index: u64,
    now_ms: u64,
    next_budget_id: BudgetId,
    next_counter_id: u64,
    budgets: BTreeMap<BudgetId, Budget>,
    leases: BTreeMap<LeaseId, Lease>,
    expired: BTreeMap<LeaseId, ExpiredLease>,
    dedup: Dedup,
    totals: Totals,
    chain: ChainHead,
    #[serde(skip)]
    by_path: BTreeMap<BudgetPath, BudgetId>,
    #[serde(skip)]
    expiry: BTreeSet<(u64, LeaseId)>,
    #[serde(skip)]
    forget: BTreeSet<(u64, LeaseId)>,
}

#[derive(Serialize, Deserialize)]
enum SnapshotFormat<L> {
    V1(L),
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
            budgets: BTreeMap::new(),
            leases: BTreeMap::new(),
            expired: BTreeMap::new(),
            dedup: Dedup::default(),
            totals: Totals::default(),
            chain: ChainHead::default(),
            by_path: BTreeMap::new(),
            expiry: BTreeSet::new(),
            forget: BTreeSet::new(),
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
        let mut audit = Vec::new();
        self.housekeep(index, &mut audit);
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
                Command::Request(request) => self.request(index, slot, request, &mut audit),
            })
            .collect();
        Applied { outcomes, audit }
    }

    fn request(
        &mut self,
        index: u64,
        slot: usize,
        req: &Request,
        audit: &mut Vec<AuditRecord>,
    ) -> Outcome {
        let fingerprint = fingerprint(req);
        match self.dedup.check(&req.client, req.request_id, fingerprint, self.config.dedup_window) {
            Seen::Replay(outcome) => return outcome,
            Seen::Refused(err) => return Err(err),
            Seen::New => {}
        }
        let mut ctx = Ctx { index, principal: &req.principal, audit };
        let outcome = match &req.op {
            Op::CreateBudget(spec) => self.create_budget(&mut ctx, spec),
            Op::UpdateBudget { spec, expected_version } => {
                self.update_budget(&mut ctx, spec, *expected_version)
            }
            Op::DeleteBudget { path, expected_version } => {
                self.delete_budget(&mut ctx, path, *expected_version)
            }
            Op::Acquire(a) => self.acquire(&mut ctx, slot, a),
            Op::Report(r) => self.report(&mut ctx, r),
            Op::Release(r) => self.release(&mut ctx, r),
        };
        self.dedup.remember(
            &req.client,
            req.request_id,
            fingerprint,
            outcome.clone(),
            self.now_ms,
            &self.config,
        );
        outcome
    }

    // ----- budgets -----

    fn create_budget(&mut self, ctx: &mut Ctx<'_>, spec: &BudgetSpec) -> Outcome {
        spec.validate()?;
        if self.by_path.contains_key(&spec.path) {
            return Err(LedgerError::BudgetExists { path: spec.path.clone() });
        }
        if self.budgets.len() as u64 >= self.config.max_budgets {
            return Err(LedgerError::LedgerFull {
                what: "budgets".into(),
                max: self.config.max_budgets,
            });
        }
        let parent = match spec.path.parent() {
            None => None,
            Some(parent) => match self.by_path.get(&parent) {
                Some(&id) => Some(id),
                None => {
                    return Err(LedgerError::ParentNotFound { path: spec.path.clone(), parent })
                }
            },
        };
        let limits = spec.limits.iter().map(|l| self.new_limit(l.clone())).collect();
        let id = self.next_budget_id;
        self.next_budget_id = id.checked_add(1).expect("budget id overflow");
        if let Some(p) = parent {
            self.budget_mut(p).children = self.budget_mut(p).children.saturating_add(1);
        }
        let budget = Budget {
            path: spec.path.clone(),
            parent,
            version: 1,
            limits,
            children: 0,
            live_leases: 0,
        };
        self.by_path.insert(spec.path.clone(), id);
        self.budgets.insert(id, budget);
        self.emit_budget(ctx, AuditKind::BudgetCreated, id);
        Ok(Reply::BudgetCreated { version: 1 })
    }

    fn update_budget(
        &mut self,
        ctx: &mut Ctx<'_>,
        spec: &BudgetSpec,
        expected_version: u64,
    ) -> Outcome {
        spec.validate()?;
        let id = self.budget_id(&spec.path)?;
        let now = self.now_ms;
        let budget = &self.budgets[&id];
        check_version(budget, expected_version)?;
        // Check every kept limit before changing anything.
        for new in &spec.limits {
            if let Some(old) = find_limit(&budget.limits, &new.unit, new.window) {
                let (consumed, _, _) = old.effective(now);
                let in_use = consumed.saturating_add(old.counter.outstanding);
                if new.cap < in_use {
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
        let mut old_limits = std::mem::take(&mut self.budget_mut(id).limits);
        let limits = spec
            .limits
            .iter()
            .map(|new| {
                match old_limits
                    .iter()
                    .position(|l| l.spec.unit == new.unit && l.spec.window == new.window)
                {
                    Some(at) => {
                        let mut kept = old_limits.swap_remove(at);
                        // Start from the current window, so the new cap is checked
                        // against (and stored beside) current figures only.
                        kept.roll(now);
                        kept.spec = new.clone();
                        kept
                    }
                    None => self.new_limit(new.clone()),
                }
            })
            .collect();
        let budget = self.budget_mut(id);
        budget.limits = limits;
        budget.version = budget.version.saturating_add(1);
        let version = budget.version;
        self.emit_budget(ctx, AuditKind::BudgetUpdated, id);
        Ok(Reply::BudgetUpdated { version })
    }

    fn delete_budget(
        &mut self,
        ctx: &mut Ctx<'_>,
        path: &BudgetPath,
        expected_version: Option<u64>,
    ) -> Outcome {
        let id = self.budget_id(path)?;
        let budget = &self.budgets[&id];
        if let Some(expected) = expected_version {
            check_version(budget, expected)?;
        }
        if budget.children > 0 {
            return Err(LedgerError::HasChildren { path: path.clone(), children: budget.children });
        }
        if budget.live_leases > 0 {
            return Err(LedgerError::HasLiveLeases {
                path: path.clone(),
                leases: budget.live_leases,
            });
        }
        self.emit_budget(ctx, AuditKind::BudgetDeleted, id);
        let budget = self.budgets.remove(&id).expect("looked up above");
        self.by_path.remove(&budget.path);
        if let Some(p) = budget.parent {
            let parent = self.budget_mut(p);
            parent.children = parent.children.checked_sub(1).expect("invariant: child count");
        }
        Ok(Reply::BudgetDeleted)
    }

    fn new_limit(&mut self, spec: LimitSpec) -> Limit {
        let id = self.next_counter_id;
        self.next_counter_id = id.checked_add(1).expect("counter id overflow");
        let (window_start_ms, window_end_ms) = spec.window.bounds(self.now_ms);
        let counter = Counter {
            id,
            window_start_ms,
            window_end_ms,
            consumed: 0,
            outstanding: 0,
            holders: BTreeMap::new(),
        };
        Limit { spec, counter }
    }

    // ----- leases -----

    fn acquire(&mut self, ctx: &mut Ctx<'_>, slot: usize, a: &Acquire) -> Outcome {
        check_amount("wanted", a.wanted)?;
        check_amount("min", a.min)?;
        if a.wanted == 0 {
            return Err(invalid("wanted", "must be at least 1".into()));
        }
        if a.min > a.wanted {
            return Err(invalid("min", format!("{} is above wanted {}", a.min, a.wanted)));
        }
        if a.ttl_ms == 0 || a.ttl_ms > self.config.max_lease_ttl_ms {
            return Err(invalid(
                "ttl_ms",
                format!("{} is outside 1..={}", a.ttl_ms, self.config.max_lease_ttl_ms),
            ));
        }
        if self.leases.len() as u64 >= self.config.max_live_leases {
            return Err(LedgerError::LedgerFull {
                what: "live leases".into(),
                max: self.config.max_live_leases,
            });
        }
        let leaf = self.budget_id(&a.budget)?;
        let now = self.now_ms;
        let at_least = a.min.max(1);

        // Decide, touching nothing: the grant is bounded by every limit in the unit on
        // the budget and its ancestors, and by each one's fair share.
        let mut grant = a.wanted;
        let mut window_end_ms = u64::MAX;
        let mut refs: Vec<(BudgetId, usize)> = Vec::new();
        let mut chain = Vec::new();
        let mut at = Some(leaf);
        while let Some(id) = at {
            let budget = &self.budgets[&id];
            chain.push(id);
            for (i, limit) in
                budget.limits.iter().enumerate().filter(|(_, l)| l.spec.unit == a.unit)
            {
                let available = limit.available(now);
                if available < at_least {
                    return Err(LedgerError::Exhausted {
                        path: budget.path.clone(),
                        unit: a.unit.clone(),
                        window: limit.spec.window,
                        available,
                        min: at_least,
                    });
                }
                let holders = &limit.counter.holders;
                let sharers = (holders.len() as u64)
                    .saturating_add(u64::from(!holders.contains_key(ctx.principal)));
                let share = available.div_ceil(sharers);
                grant = grant.min(a.wanted.min(share).max(at_least).min(available));
                window_end_ms = window_end_ms.min(limit.effective(now).2);
                refs.push((id, i));
            }
            at = budget.parent;
        }
        if refs.is_empty() {
            return Err(LedgerError::NoLimitForUnit {
                path: a.budget.clone(),
                unit: a.unit.clone(),
            });
        }

        // Commit.
        let mut counters = Vec::with_capacity(refs.len());
        let mut balances = Vec::with_capacity(refs.len());
        for &(id, i) in &refs {
            let budget = self.budget_mut(id);
            let limit = &mut budget.limits[i];
            limit.roll(now);
            let c = &mut limit.counter;
            c.outstanding =
                c.outstanding.checked_add(grant).expect("invariant: outstanding <= cap");
            let held = c.holders.entry(ctx.principal.clone()).or_insert(0);
            *held = held.saturating_add(1);
            counters.push(CounterRef { budget: id, counter: c.id });
            balances.push(limit.balance(&budget.path));
        }
        for &id in &chain {
            let b = self.budget_mut(id);
            b.live_leases = b.live_leases.saturating_add(1);
        }
        let lease_id = LeaseId::from_position(ctx.index, slot);
        let expires_at_ms = now.saturating_add(a.ttl_ms).min(window_end_ms);
        self.leases.insert(
            lease_id,
            Lease {
                principal: ctx.principal.clone(),
                budget: leaf,
                path: a.budget.clone(),
                unit: a.unit.clone(),
                granted: grant,
                reported: 0,
                acquired_ms: now,
                expires_at_ms,
                window_end_ms,
                counters,
            },
        );
        self.expiry.insert((expires_at_ms, lease_id));
        let flow = Flow { granted: grant, ..Flow::default() };
        let about =
            About { lease: lease_id, path: &a.budget, principal: ctx.principal, unit: &a.unit };
        let entry =
            self.lease_entry(ctx.index, AuditKind::LeaseGranted, about, flow, balances, now);
        self.record(ctx.audit, entry);
        let ttl_ms = expires_at_ms.saturating_sub(now);
        Ok(Reply::Granted(Grant {
            lease: lease_id,
            granted: grant,
            expires_at_ms,
            window_end_ms,
            ttl_ms,
        }))
    }

    /// The live lease `id` of `principal`, or why not.
    fn live_lease(&self, id: LeaseId, principal: &Principal) -> Result<&Lease, LedgerError> {
        match self.leases.get(&id) {
            Some(l) if &l.principal == principal => Ok(l),
            Some(_) => Err(LedgerError::ForeignLease { lease: id }),
            None if self.expired.get(&id).is_some_and(|e| &e.principal != principal) => {
                Err(LedgerError::ForeignLease { lease: id })
            }
            None if self.expired.contains_key(&id) => Err(LedgerError::LeaseExpired { lease: id }),
            None => Err(LedgerError::LeaseNotFound { lease: id }),
        }
    }

    fn report(&mut self, ctx: &mut Ctx<'_>, r: &Report) -> Outcome {
        check_amount("consumed_delta", r.consumed_delta)?;
        if let Some(ttl) = r.renew_ttl_ms {
            if ttl == 0 || ttl > self.config.max_lease_ttl_ms {
                return Err(invalid(
                    "renew_ttl_ms",
                    format!("{ttl} is outside 1..={}", self.config.max_lease_ttl_ms),
                ));
            }
        }
        let lease = self.live_lease(r.lease, ctx.principal)?;
        let reported = lease
            .reported
            .checked_add(r.consumed_delta)
            .filter(|&total| total <= lease.granted)
            .ok_or(LedgerError::OverReport {
                lease: r.lease,
                granted: lease.granted,
                reported: lease.reported,
                requested: r.consumed_delta,
            })?;
        let now = self.now_ms;
        let old_expiry = lease.expires_at_ms;
        let new_expiry = match r.renew_ttl_ms {
            Some(ttl) => old_expiry.max(now.saturating_add(ttl).min(lease.window_end_ms)),
            None => old_expiry,
        };
        let (granted, counters) = (lease.granted, lease.counters.clone());
        let (path, unit) = (lease.path.clone(), lease.unit.clone());
        let delta = r.consumed_delta;
        let balances = self.update_counters(&counters, |counter| {
            counter.consumed =
                counter.consumed.checked_add(delta).expect("invariant: consumed <= cap");
            counter.outstanding = counter
                .outstanding
                .checked_sub(delta)
                .expect("invariant: outstanding covers the lease");
        });
        let lease = self.leases.get_mut(&r.lease).expect("checked above");
        lease.reported = reported;
        lease.expires_at_ms = new_expiry;
        if new_expiry != old_expiry {
            self.expiry.remove(&(old_expiry, r.lease));
            self.expiry.insert((new_expiry, r.lease));
        }
        if delta > 0 || new_expiry != old_expiry {
            let flow = Flow { consumed: delta, ..Flow::default() };
            let about =
                About { lease: r.lease, path: &path, principal: ctx.principal, unit: &unit };
            let entry =
                self.lease_entry(ctx.index, AuditKind::LeaseReported, about, flow, balances, now);
            self.record(ctx.audit, entry);
        }
        Ok(Reply::Reported {
            lease: r.lease,
            unreported: granted.saturating_sub(reported),
            expires_at_ms: new_expiry,
        })
    }

    fn release(&mut self, ctx: &mut Ctx<'_>, r: &Release) -> Outcome {
        check_amount("consumed_total", r.consumed_total)?;
        match self.live_lease(r.lease, ctx.principal) {
            Ok(lease) => {
                check_total(r.lease, lease.granted, lease.reported, r.consumed_total)?;
                let flow = Flow {
                    consumed: r.consumed_total.saturating_sub(lease.reported),
                    returned: lease.granted.saturating_sub(r.consumed_total),
                    ..Flow::default()
                };
                let (lease, balances) = self.detach(r.lease, flow.consumed);
                let about = About {
                    lease: r.lease,
                    path: &lease.path,
                    principal: &lease.principal,
                    unit: &lease.unit,
                };
                let kind = AuditKind::LeaseReleased;
                let entry = self.lease_entry(ctx.index, kind, about, flow, balances, self.now_ms);
                self.record(ctx.audit, entry);
                Ok(Reply::Released {
                    lease: r.lease,
                    returned: flow.returned,
                    refunded: 0,
                    late: false,
                })
            }
            Err(LedgerError::LeaseExpired { .. }) => self.late_release(ctx, r),
            Err(e) => Err(e),
        }
    }

    fn late_release(&mut self, ctx: &mut Ctx<'_>, r: &Release) -> Outcome {
        let e = &self.expired[&r.lease];
        check_total(r.lease, e.granted, e.reported, r.consumed_total)?;
        let e = self.expired.remove(&r.lease).expect("checked above");
        self.forget.remove(&(e.forget_at_ms, r.lease));
        let now = self.now_ms;
        let (kind, flow, balances) = if now < e.window_end_ms {
            let refund = e.granted.saturating_sub(r.consumed_total);
            let balances = self.update_counters(&e.counters, |counter| {
                counter.consumed = counter
                    .consumed
                    .checked_sub(refund)
                    .expect("invariant: the charge is still counted");
            });
            let flow = Flow {
                consumed: r.consumed_total.saturating_sub(e.reported),
                returned: refund,
                uncharged: e.granted.saturating_sub(e.reported),
                ..Flow::default()
            };
            (AuditKind::LeaseRefunded, flow, balances)
        } else {
            (AuditKind::LateRelease, Flow::default(), self.balances(&e.counters))
        };
        let about = About { lease: r.lease, path: &e.path, principal: &e.principal, unit: &e.unit };
        let entry = self.lease_entry(ctx.index, kind, about, flow, balances, now);
        self.record(ctx.audit, entry);
        Ok(Reply::Released { lease: r.lease, returned: 0, refunded: flow.returned, late: true })
    }

    /// Takes a live lease out: `consumed` more is settled and the rest of its
    /// outstanding allowance leaves the counters.
    /// Returns the lease and the balances after the change.
    fn detach(&mut self, id: LeaseId, consumed: u64) -> (Lease, Vec<Balance>) {
        let lease = self.leases.remove(&id).expect("caller checked the lease is live");
        self.expiry.remove(&(lease.expires_at_ms, id));
        let unsettled =
            lease.granted.checked_sub(lease.reported).expect("invariant: reported <= granted");
        let balances = self.update_counters(&lease.counters, |counter| {
            counter.consumed =
                counter.consumed.checked_add(consumed).expect("invariant: consumed <= cap");
            counter.outstanding = counter
                .outstanding
                .checked_sub(unsettled)
                .expect("invariant: outstanding covers the lease");
            match counter.holders.get_mut(&lease.principal) {
                Some(n) if *n > 1 => *n = n.saturating_sub(1),
                Some(_) => {
                    counter.holders.remove(&lease.principal);
                }
                None => panic!("invariant: a live lease's holder is counted"),
            }
        });
        let mut at = Some(lease.budget);
        while let Some(id) = at {
            let b = self.budget_mut(id);
            b.live_leases = b.live_leases.checked_sub(1).expect("invariant: live lease count");
            at = b.parent;
        }
        (lease, balances)
    }

    // ----- time -----

    fn housekeep(&mut self, index: u64, audit: &mut Vec<AuditRecord>) {
        let now = self.now_ms;
        while let Some(&(expires_at_ms, id)) = self.expiry.first() {
            if expires_at_ms > now {
                break;
            }
            let charge = {
                let l = &self.leases[&id];
                l.granted.saturating_sub(l.reported)
            };
            #[cfg(not(feature = "planted-bug-expiry-refunds"))]
            let (lease, balances, flow) = {
                let (lease, balances) = self.detach(id, charge);
                (lease, balances, Flow { charged: charge, ..Flow::default() })
            };
            // PLANTED BUG (feature `planted-bug-expiry-refunds` only, for the
            // simulation to catch): the unsettled allowance goes back to the pool
            // instead of being charged, so a gateway still spending it overshoots.
            #[cfg(feature = "planted-bug-expiry-refunds")]
            let (lease, balances, flow) = {
                let (lease, balances) = self.detach(id, 0);
                (lease, balances, Flow { returned: charge, ..Flow::default() })
            };
            // The spend belongs to the last instant the lease was valid.
            let effective = expires_at_ms.saturating_sub(1);
            let about = About {
                lease: id,
                path: &lease.path,
                principal: &lease.principal,
                unit: &lease.unit,
            };
            let kind = AuditKind::LeaseExpired;
            let entry = self.lease_entry(index, kind, about, flow, balances, effective);
            self.record(audit, entry);
            let forget_at_ms = expires_at_ms.saturating_add(self.config.expired_retention_ms);
            self.expired.insert(
                id,
                ExpiredLease {
                    principal: lease.principal,
                    path: lease.path,
                    unit: lease.unit,
                    granted: lease.granted,
                    reported: lease.reported,
                    window_end_ms: lease.window_end_ms,
                    forget_at_ms,
                    counters: lease.counters,
                },
            );
            self.forget.insert((forget_at_ms, id));
        }
        while let Some(&(forget_at_ms, id)) = self.forget.first() {
            if forget_at_ms > now && self.expired.len() as u64 <= self.config.max_expired_retained {
                break;
            }
            self.forget.pop_first();
            self.expired.remove(&id);
        }
        self.dedup.expire(now, self.config.dedup_idle_ms);
    }

    // ----- audit -----

    fn base_entry(
        &self,
        index: u64,
        kind: AuditKind,
        budget: BudgetPath,
        principal: Principal,
        effective_ms: u64,
    ) -> AuditEntry {
        AuditEntry {
            seq: 0,
            log_index: index,
            time_ms: self.now_ms,
            effective_ms,
            kind,
            budget,
            principal,
            unit: None,
            lease: None,
            flow: Flow::default(),
            balances: Vec::new(),
            limits: Vec::new(),
            prev_hash: GENESIS,
        }
    }

    fn emit_budget(&mut self, ctx: &mut Ctx<'_>, kind: AuditKind, id: BudgetId) {
        let b = &self.budgets[&id];
        let entry = AuditEntry {
            balances: b.limits.iter().map(|l| l.balance(&b.path)).collect(),
            limits: if kind == AuditKind::BudgetDeleted {
                Vec::new()
            } else {
                b.limits.iter().map(|l| l.spec.clone()).collect()
            },
            ..self.base_entry(ctx.index, kind, b.path.clone(), ctx.principal.clone(), self.now_ms)
        };
        self.record(ctx.audit, entry);
    }

    /// The record of a change to a lease, with the balances after it.
    fn lease_entry(
        &self,
        index: u64,
        kind: AuditKind,
        about: About<'_>,
        flow: Flow,
        balances: Vec<Balance>,
        effective_ms: u64,
    ) -> AuditEntry {
        AuditEntry {
            unit: Some(about.unit.clone()),
            lease: Some(about.lease),
            flow,
            balances,
            ..self.base_entry(
                index,
                kind,
                about.path.clone(),
                about.principal.clone(),
                effective_ms,
            )
        }
    }

    /// Adds a record's flow to the totals, chains it and emits it.
    fn record(&mut self, audit: &mut Vec<AuditRecord>, entry: AuditEntry) {
        self.totals.add(&entry.flow);
        audit.push(self.chain.seal(entry));
    }

    fn balances(&self, counters: &[CounterRef]) -> Vec<Balance> {
        counters
            .iter()
            .filter_map(|c| {
                let b = self.budgets.get(&c.budget)?;
                let limit = b.limits.iter().find(|l| l.counter.id == c.counter)?;
                Some(limit.balance(&b.path))
            })
            .collect()
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
        mut change: impl FnMut(&mut Counter),
    ) -> Vec<Balance> {
        let mut balances = Vec::with_capacity(counters.len());
        for r in counters {
            let Some(b) = self.budgets.get_mut(&r.budget) else { continue };
            let Some(limit) = b.limits.iter_mut().find(|l| l.counter.id == r.counter) else {
                continue;
            };
            change(&mut limit.counter);
            balances.push(limit.balance(&b.path));
        }
        balances
    }

    fn counter_mut(&mut self, r: CounterRef) -> Option<&mut Counter> {
        let b = self.budgets.get_mut(&r.budget)?;
        b.limits.iter_mut().map(|l| &mut l.counter).find(|c| c.id == r.counter)
    }
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

fn invalid(field: &str, reason: String) -> LedgerError {
    LedgerError::InvalidArgument { field: field.into(), reason }
}

fn check_version(budget: &Budget, expected: u64) -> Result<(), LedgerError> {
    if budget.version != expected {
        return Err(LedgerError::VersionMismatch {
            path: budget.path.clone(),
            expected,
            actual: budget.version,
        });
    }
    Ok(())
}

fn check_total(lease: LeaseId, granted: u64, reported: u64, total: u64) -> Result<(), LedgerError> {
    if total < reported {
        return Err(LedgerError::ReleaseBelowReported { lease, reported, total });
    }
    if total > granted {
        return Err(LedgerError::OverReport {
            lease,
            granted,
            reported,
            requested: total.saturating_sub(reported),
        });
    }
    Ok(())
}

fn find_limit<'a>(limits: &'a [Limit], unit: &Unit, window: Window) -> Option<&'a Limit> {
    limits.iter().find(|l| &l.spec.unit == unit && l.spec.window == window)
}

/// 64 bits of SHA-256 over the principal and operation: a retry must match its
/// original to get the remembered result.
fn fingerprint(req: &Request) -> u64 {
    let digest = crate::hashing::sha256_of(b"ration-request-v1\0", &(&req.principal, &req.op));
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

// ----- queries, snapshots, invariants -----

impl Ledger {
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Index of the last applied entry.
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Ledger time: the largest entry time stamp applied.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Where the audit chain ends; records emitted next continue from here.
    pub fn chain_head(&self) -> ChainHead {
        self.chain
    }

    pub fn budget_count(&self) -> usize {
        self.budgets.len()
    }

    pub fn live_lease_count(&self) -> usize {
        self.leases.len()
    }

    pub fn expired_retained_count(&self) -> usize {
        self.expired.len()
    }

    /// (clients, remembered results) in the exactly-once table.
    pub fn dedup_size(&self) -> (usize, usize) {
        (self.dedup.clients(), self.dedup.remembered())
    }

    /// Sum of unsettled allowance over all live leases.
    pub fn outstanding_total(&self) -> u128 {
        self.leases.values().map(|l| u128::from(l.granted.saturating_sub(l.reported))).sum()
    }

    pub fn budget(&self, path: &BudgetPath) -> Option<BudgetView> {
        self.by_path.get(path).map(|id| self.view(&self.budgets[id]))
    }

    /// Budgets at or below `subtree` (all if `None`), in path order, after
    /// `start_after`, at most `limit`.
    pub fn budgets(
        &self,
        subtree: Option<&BudgetPath>,
        start_after: Option<&BudgetPath>,
        limit: usize,
    ) -> Vec<BudgetView> {
        use std::ops::Bound;
        let lower = match (start_after, subtree) {
            // A page token before the subtree: start at the subtree.
            (Some(after), Some(s)) if after < s => Bound::Included(s.clone()),
            (Some(after), _) => Bound::Excluded(after.clone()),
            (None, Some(s)) => Bound::Included(s.clone()),
            (None, None) => Bound::Unbounded,
        };
        self.by_path
            .range((lower, Bound::Unbounded))
            .take_while(|(p, _)| subtree.is_none_or(|s| p.as_str().starts_with(s.as_str())))
            .filter(|(p, _)| subtree.is_none_or(|s| p.is_within(s)))
            .take(limit)
            .map(|(_, id)| self.view(&self.budgets[id]))
            .collect()
    }

    fn view(&self, b: &Budget) -> BudgetView {
        let now = self.now_ms;
        let limits = b
            .limits
            .iter()
            .map(|l| {
                let (consumed, window_start_ms, window_end_ms) = l.effective(now);
                LimitView {
                    spec: l.spec.clone(),
                    window_start_ms,
                    window_end_ms,
                    consumed,
                    outstanding: l.counter.outstanding,
                    remaining: l.available(now),
                    holders: l.counter.holders.len() as u64,
                }
            })
            .collect();
        BudgetView {
            path: b.path.clone(),
            version: b.version,
            limits,
            children: b.children,
            live_leases: b.live_leases,
        }
    }

    pub fn lease(&self, id: LeaseId) -> Option<LeaseView> {
        self.leases.get(&id).map(|l| self.lease_view(id, l))
    }

    /// Live leases, optionally of one principal, in id order, at most `limit`.
    pub fn leases(&self, principal: Option<&Principal>, limit: usize) -> Vec<LeaseView> {
        self.leases
            .iter()
            .filter(|(_, l)| principal.is_none_or(|p| &l.principal == p))
            .take(limit)
            .map(|(id, l)| self.lease_view(*id, l))
            .collect()
    }

    fn lease_view(&self, id: LeaseId, l: &Lease) -> LeaseView {
        LeaseView {
            lease: id,
            principal: l.principal.clone(),
            budget: l.path.clone(),
            unit: l.unit.clone(),
            granted: l.granted,
            reported: l.reported,
            acquired_ms: l.acquired_ms,
            expires_at_ms: l.expires_at_ms,
            window_end_ms: l.window_end_ms,
        }
    }

    /// The whole state, deterministically encoded: equal states give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        postcard::to_stdvec(&SnapshotFormat::V1(self)).expect("encoding into a Vec cannot fail")
    }

    /// Rebuilds a ledger from [`Ledger::snapshot`] bytes, and checks it.
    pub fn restore(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let SnapshotFormat::V1(mut ledger) = postcard::from_bytes::<SnapshotFormat<Ledger>>(bytes)?;
        if ledger.chain_head().next_seq >= 1 << 62 {
            return Err(SnapshotError::Inconsistent("the audit sequence is exhausted".into()));
        }
        ledger.rebuild().map_err(SnapshotError::Inconsistent)?;
        ledger.check_invariants().map_err(SnapshotError::Inconsistent)?;
        Ok(ledger)
    }

    /// SHA-256 of the snapshot: equal on replicas that applied the same entries.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.snapshot()).into()
    }

    /// Recomputes every derived index from the primary state.
    fn rebuild(&mut self) -> Result<(), String> {
        self.by_path.clear();
        for (&id, b) in &self.budgets {
            if self.by_path.insert(b.path.clone(), id).is_some() {
                return Err(format!("budget {} appears twice", b.path));
            }
        }
        let ids: Vec<BudgetId> = self.budgets.keys().copied().collect();
        for id in &ids {
            let b = self.budget_mut(*id);
            b.children = 0;
            b.live_leases = 0;
            for l in &mut b.limits {
                l.counter.holders.clear();
            }
        }
        for id in &ids {
            let path = self.budgets[id].path.clone();
            match (self.budgets[id].parent, path.parent()) {
                (Some(p), Some(parent_path)) => {
                    let parent = self
                        .budgets
                        .get_mut(&p)
                        .ok_or(format!("budget {path} has a missing parent"))?;
                    // Each parent's path is its child's minus the last segment: so the
                    // parent links can form no cycle.
                    if parent.path != parent_path {
                        return Err(format!("budget {path} names {} as its parent", parent.path));
                    }
                    parent.children = parent.children.saturating_add(1);
                }
                (None, None) => {}
                _ => return Err(format!("budget {path} has the wrong kind of parent link")),
            }
        }
        self.expiry.clear();
        let leases: Vec<(LeaseId, Lease)> =
            self.leases.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, lease) in &leases {
            self.expiry.insert((lease.expires_at_ms, *id));
            for c in &lease.counters {
                // A counter may be gone (its limit was replaced by an update), but
                // not its budget: budgets with live leases below them stay.
                if !self.budgets.contains_key(&c.budget) {
                    return Err(format!("lease {id} draws on a budget that does not exist"));
                }
                let Some(counter) = self.counter_mut(*c) else { continue };
                // Leases never outlive the window they draw on (a window must close
                // with nothing outstanding).
                if lease.expires_at_ms > counter.window_end_ms {
                    return Err(format!("lease {id} outlives the window of a limit it draws on"));
                }
                let n = counter.holders.entry(lease.principal.clone()).or_insert(0);
                *n = n.saturating_add(1);
            }
            if self.budgets.get(&lease.budget).is_none_or(|b| b.path != lease.path) {
                return Err(format!("lease {id} names a budget path that does not match"));
            }
            let mut at = Some(lease.budget);
            while let Some(b) = at {
                let budget =
                    self.budgets.get_mut(&b).ok_or(format!("lease {id} is on a missing budget"))?;
                budget.live_leases = budget.live_leases.saturating_add(1);
                at = budget.parent;
            }
        }
        self.forget = self.expired.iter().map(|(id, e)| (e.forget_at_ms, *id)).collect();
        self.dedup.rebuild();
        Ok(())
    }

    /// Checks every invariant from scratch: the cap on every limit, outstanding
    /// equal to the live leases' unsettled allowance, leases inside their windows,
    /// and conservation. Tests call it after every step; restore calls it once.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut outstanding: BTreeMap<u64, u64> = BTreeMap::new();
        for (id, l) in &self.leases {
            if l.reported > l.granted {
                return Err(format!("lease {id} reported {} of {}", l.reported, l.granted));
            }
            if l.expires_at_ms > l.window_end_ms || l.expires_at_ms <= self.now_ms {
                return Err(format!(
                    "lease {id} expiry {} outside (now {}, window end {}]",
                    l.expires_at_ms, self.now_ms, l.window_end_ms
                ));
            }
            for c in &l.counters {
                let o = outstanding.entry(c.counter).or_insert(0);
                *o = o.saturating_add(l.granted.saturating_sub(l.reported));
            }
        }
        for b in self.budgets.values() {
            for l in &b.limits {
                let c = &l.counter;
                let expected = outstanding.get(&c.id).copied().unwrap_or(0);
                if c.outstanding != expected {
                    return Err(format!(
                        "{} {} per {}: outstanding {} but live leases hold {expected}",
                        b.path, l.spec.unit, l.spec.window, c.outstanding
                    ));
                }
                let (consumed, _, _) = l.effective(self.now_ms);
                if consumed.checked_add(c.outstanding).is_none_or(|used| used > l.spec.cap) {
                    return Err(format!(
                        "{} {} per {}: consumed {consumed} + outstanding {} > cap {}",
                        b.path, l.spec.unit, l.spec.window, c.outstanding, l.spec.cap
                    ));
                }
                if c.outstanding > 0 && self.now_ms >= c.window_end_ms {
                    return Err(format!(
                        "{} {} per {}: window closed with {} outstanding",
                        b.path, l.spec.unit, l.spec.window, c.outstanding
                    ));
                }
            }
        }
        let t = self.totals;
        let rhs = t
            .consumed
            .saturating_add(t.returned)
            .saturating_add(t.charged)
            .saturating_add(self.outstanding_total());
        if t.granted.saturating_add(t.uncharged) != rhs {
            return Err(format!("conservation: granted {} + uncharged {} != consumed {} + returned {} + charged {} + outstanding {}", t.granted, t.uncharged, t.consumed, t.returned, t.charged, self.outstanding_total()));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
