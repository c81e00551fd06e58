//! Snapshots: encoding the state, restoring it (rebuilding and re-checking every
//! derived index), its digest, and the invariant checks tests and restore run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{BudgetId, Lease, Ledger, PrincipalLimits};
use crate::names::{BudgetPath, ClientId, LeaseId, Principal, Unit};
use crate::window::Window;

/// The highest next audit sequence number a restored ledger may hold. Far below
/// `u64::MAX`, so applying entries after a restore never overflows the sequence.
pub(super) const MAX_AUDIT_SEQ: u64 = (1 << 62) - 1;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("snapshot decodes but is inconsistent: {0}")]
    Inconsistent(Box<InvariantError>),
}

impl From<InvariantError> for SnapshotError {
    fn from(e: InvariantError) -> Self {
        Self::Inconsistent(Box::new(e))
    }
}

/// A broken ledger invariant, found by [`Ledger::check_invariants`] or while a
/// snapshot is restored, with the figures involved. Budget ids are the ledger's
/// internal ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantError {
    #[error("per-principal usage does not match the state: {detail}")]
    PrincipalUsage { detail: String },
    #[error("the roles table is not one the ledger could hold: {detail}")]
    Roles { detail: String },
    #[error("the templates, instances or frozen budgets do not match the budgets: {detail}")]
    Controls { detail: String },
    #[error("the audit sequence is exhausted: next sequence number {next_seq} is above {max}")]
    AuditSequenceExhausted { next_seq: u64, max: u64 },
    #[error("budget {path} appears twice (budget ids {first} and {second})")]
    DuplicateBudgetPath { path: BudgetPath, first: u64, second: u64 },
    #[error("budget {path} has a missing parent (budget id {parent})")]
    MissingParent { path: BudgetPath, parent: u64 },
    #[error("budget {path} names {parent} as its parent")]
    WrongParent { path: BudgetPath, parent: BudgetPath },
    #[error(
        "budget {path} has the wrong kind of parent link: top-level, but linked to budget id \
         {parent}"
    )]
    ParentLinkOnTopLevel { path: BudgetPath, parent: u64 },
    #[error("budget {path} has the wrong kind of parent link: nested, but linked to none")]
    ParentLinkMissing { path: BudgetPath },
    #[error("lease {lease} draws on a budget that does not exist (budget id {budget})")]
    LeaseDrawsOnMissingBudget { lease: LeaseId, budget: u64 },
    #[error(
        "lease {lease} outlives the window of a limit it draws on (expires at {expires_at_ms}, \
         window end {window_end_ms})"
    )]
    LeaseOutlivesWindow { lease: LeaseId, expires_at_ms: u64, window_end_ms: u64 },
    #[error("lease {lease} names a budget path that does not match: {path} (budget id {budget})")]
    LeasePathMismatch { lease: LeaseId, path: BudgetPath, budget: u64 },
    #[error("lease {lease} is on a missing budget (budget id {budget})")]
    LeaseOnMissingBudget { lease: LeaseId, budget: u64 },
    #[error("budget {path} has a counter id ({counter}) in use twice or not yet issued")]
    BadCounterId { path: BudgetPath, counter: u64 },
    #[error("lease {lease} is listed as opening later but is not live")]
    OpeningNotLive { lease: LeaseId },
    #[error(
        "lease {lease} opens at {opens_at_ms}, after the end ({window_end_ms}) of a window it \
         draws on"
    )]
    OpensOffBoundary { lease: LeaseId, opens_at_ms: u64, window_end_ms: u64 },
    #[error(
        "lease {lease} opens at {opens_at_ms} but expires at {expires_at_ms}, reports spend, or \
         should have opened (ledger time {now_ms})"
    )]
    ExpiresBeforeOpening { lease: LeaseId, opens_at_ms: u64, expires_at_ms: u64, now_ms: u64 },
    #[error("lease {lease} reported {reported} of {granted}")]
    OverReported { lease: LeaseId, reported: u64, granted: u64 },
    #[error(
        "lease {lease} expiry {expires_at_ms} outside (now {now_ms}, window end {window_end_ms}]"
    )]
    LeaseExpiryOutOfRange { lease: LeaseId, expires_at_ms: u64, now_ms: u64, window_end_ms: u64 },
    #[error("{path} {unit} per {window}: outstanding {outstanding} but live leases hold {held}")]
    OutstandingMismatch {
        path: BudgetPath,
        unit: Unit,
        window: Window,
        outstanding: u64,
        held: u64,
    },
    #[error(
        "{path} {unit} per {window}: consumed {consumed} + outstanding {outstanding} > cap {cap} \
         + overruns {overruns}"
    )]
    OverCap {
        path: BudgetPath,
        unit: Unit,
        window: Window,
        consumed: u64,
        outstanding: u64,
        cap: u64,
        overruns: u64,
    },
    #[error("{path} {unit} per {window}: {upcoming} granted for the next window, cap {cap}")]
    UpcomingOverCap { path: BudgetPath, unit: Unit, window: Window, upcoming: u64, cap: u64 },
    #[error(
        "{path} {unit} per {window}: window closed with {outstanding} outstanding (window end \
         {window_end_ms}, now {now_ms})"
    )]
    ClosedWindowOutstanding {
        path: BudgetPath,
        unit: Unit,
        window: Window,
        outstanding: u64,
        window_end_ms: u64,
        now_ms: u64,
    },
    #[error(
        "conservation: granted {granted} + uncharged {uncharged} + overrun {overrun} != consumed \
         {consumed} + returned {returned} + charged {charged} + outstanding {outstanding}"
    )]
    Conservation {
        granted: u128,
        uncharged: u128,
        overrun: u128,
        consumed: u128,
        returned: u128,
        charged: u128,
        outstanding: u128,
    },
}

/// Snapshot layouts. Each version appends a section for what the one before did not
/// hold (V2: overruns; V3: next-window leases; V4: per-principal limits; V5:
/// roles; V6: templates, instances and frozen budgets; V7: the price book, budget
/// options, burn rates and the webhook cursor), so older snapshots still
/// restore.
#[derive(Serialize, Deserialize)]
enum SnapshotFormat<L, X, Y, Z, R, C, V> {
    V1(L),
    V2(L, X),
    V3(L, X, Y),
    V4(L, X, Y, Z),
    V5(L, X, Y, Z, R),
    V6(L, X, Y, Z, R, C),
    V7(L, X, Y, Z, R, C, V),
}

/// The sixth section of a V6 snapshot. A snapshot without one restores with no
/// templates and nothing frozen.
#[derive(Serialize, Deserialize, Default)]
struct Controls {
    /// (budget, limits, max instances, idle ms, max duration ms, guards), in budget
    /// id order.
    templates: Vec<TemplateSection>,
    instances: Vec<(BudgetId, super::controls::Instance)>,
    frozen: Vec<(BudgetId, super::controls::Hold)>,
    halted_total: u64,
}

type TemplateSection =
    (BudgetId, Vec<crate::command::LimitSpec>, u64, u64, u64, Vec<crate::command::Guard>);

/// Only the first layout, for tests that write an older snapshot.
#[cfg(test)]
#[derive(Serialize)]
pub(super) enum SnapshotFormatV1Only<L> {
    V1(L),
}

/// The second section of a V2 snapshot.
#[derive(Serialize, Deserialize, Default)]
struct Overruns {
    /// (counter id, overruns in its current window), for counters with any.
    counters: Vec<(u64, u64)>,
    total: u128,
}

/// The fourth section of a V4 snapshot. A snapshot without one restores with the
/// default limits, and its budgets and clients count against nobody.
#[derive(Serialize, Deserialize, Default)]
struct PerPrincipal {
    limits: PrincipalLimits,
    /// (budget, the principal that created it).
    creators: Vec<(BudgetId, Principal)>,
    /// (client, the principal it counts against).
    owners: Vec<(ClientId, Principal)>,
}

/// The fifth section of a V5 snapshot: (principal, role, scope), in order. A
/// snapshot without one restores with no roles.
type RolesSection = Vec<(Principal, crate::command::Role, crate::command::Scope)>;

/// The third section of a V3 snapshot.
#[derive(Serialize, Deserialize, Default)]
struct Upcoming {
    /// (counter id, granted for its next window), for counters with any.
    counters: Vec<(u64, u64)>,
    /// (lease, when it opens), for live leases that have not opened.
    opening: Vec<(LeaseId, u64)>,
}

impl Ledger {
    /// The whole state, deterministically encoded: equal states give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut counters = Vec::new();
        let mut upcoming = Vec::new();
        for (_, b) in self.budgets.sorted() {
            for l in &b.limits {
                if l.counter.overruns > 0 {
                    counters.push((l.counter.id, l.counter.overruns));
                }
                if l.counter.upcoming > 0 {
                    upcoming.push((l.counter.id, l.counter.upcoming));
                }
            }
        }
        let extra = Overruns { counters, total: self.totals.overrun };
        let opening = self.opening.iter().map(|(id, at)| (*id, *at)).collect();
        let next = Upcoming { counters: upcoming, opening };
        let principals = PerPrincipal {
            limits: self.principals.limits,
            creators: self.principals.creators.iter().map(|(b, p)| (*b, p.clone())).collect(),
            owners: self.dedup.owners(),
        };
        let roles = self.roles_section();
        let controls = Controls {
            templates: self
                .templates
                .iter()
                .map(|(id, t)| {
                    let limits = t.limits.clone();
                    (*id, limits, t.max_instances, t.idle_ms, t.max_duration_ms, t.guards.clone())
                })
                .collect(),
            instances: self.instances.iter().map(|(id, i)| (*id, i.clone())).collect(),
            frozen: self.frozen.iter().map(|(id, h)| (*id, h.clone())).collect(),
            halted_total: self.halted_total,
        };
        let vis = super::visibility::Visibility { watch: self.watches(), ..self.vis.clone() };
        crate::encode(&SnapshotFormat::V7(self, extra, next, principals, roles, controls, &vis))
    }

    /// Rebuilds a ledger from [`Ledger::snapshot`] bytes, and checks it.
    pub fn restore(bytes: &[u8]) -> Result<Self, SnapshotError> {
        type Format = SnapshotFormat<
            Ledger,
            Overruns,
            Upcoming,
            PerPrincipal,
            RolesSection,
            Controls,
            super::visibility::Visibility,
        >;
        let mut vis = super::visibility::Visibility::default();
        let (mut ledger, extra, next, principals, roles, controls) =
            match postcard::from_bytes::<Format>(bytes)? {
                SnapshotFormat::V1(ledger) => (
                    ledger,
                    Overruns::default(),
                    Upcoming::default(),
                    PerPrincipal::default(),
                    Vec::new(),
                    Controls::default(),
                ),
                SnapshotFormat::V2(ledger, extra) => (
                    ledger,
                    extra,
                    Upcoming::default(),
                    PerPrincipal::default(),
                    Vec::new(),
                    Controls::default(),
                ),
                SnapshotFormat::V3(ledger, extra, next) => {
                    (ledger, extra, next, PerPrincipal::default(), Vec::new(), Controls::default())
                }
                SnapshotFormat::V4(ledger, extra, next, principals) => {
                    (ledger, extra, next, principals, Vec::new(), Controls::default())
                }
                SnapshotFormat::V5(ledger, extra, next, principals, roles) => {
                    (ledger, extra, next, principals, roles, Controls::default())
                }
                SnapshotFormat::V6(ledger, extra, next, principals, roles, controls) => {
                    (ledger, extra, next, principals, roles, controls)
                }
                SnapshotFormat::V7(ledger, extra, next, principals, roles, controls, v) => {
                    vis = v;
                    (ledger, extra, next, principals, roles, controls)
                }
            };
        let watches = std::mem::take(&mut vis.watch);
        ledger.vis = vis;
        ledger.templates = controls
            .templates
            .into_iter()
            .map(|(id, limits, max_instances, idle_ms, max_duration_ms, guards)| {
                let members = std::collections::BTreeSet::new();
                let t = super::controls::Template {
                    limits,
                    max_instances,
                    idle_ms,
                    max_duration_ms,
                    guards,
                    members,
                };
                (id, t)
            })
            .collect();
        ledger.instances = controls.instances.into_iter().collect();
        ledger.frozen = controls.frozen.into_iter().collect();
        ledger.halted_total = controls.halted_total;
        ledger.restore_roles(roles);
        ledger.principals.limits = principals.limits;
        ledger.principals.creators = principals.creators.into_iter().collect();
        ledger.dedup.set_owners(principals.owners);
        ledger.totals.overrun = extra.total;
        let overruns: BTreeMap<u64, u64> = extra.counters.into_iter().collect();
        let upcoming: BTreeMap<u64, u64> = next.counters.into_iter().collect();
        for b in ledger.budgets.values_any_order_mut() {
            for l in &mut b.limits {
                l.counter.overruns = overruns.get(&l.counter.id).copied().unwrap_or(0);
                l.counter.upcoming = upcoming.get(&l.counter.id).copied().unwrap_or(0);
            }
        }
        ledger.opening = next.opening.into_iter().collect();
        ledger.restore_watches(watches).map_err(|detail| InvariantError::Controls { detail })?;
        let next_seq = ledger.chain_head().next_seq;
        if next_seq > MAX_AUDIT_SEQ {
            return Err(
                InvariantError::AuditSequenceExhausted { next_seq, max: MAX_AUDIT_SEQ }.into()
            );
        }
        ledger.rebuild()?;
        ledger.check_invariants()?;
        Ok(ledger)
    }

    /// SHA-256 of the snapshot: equal on replicas that applied the same entries.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.snapshot()).into()
    }

    /// The per-principal usage equals a recount from the leases, the budgets'
    /// creators and the exactly-once table's owners.
    fn check_principal_usage(&self) -> Result<(), InvariantError> {
        let mut recount = super::Principals::default();
        self.dedup.count_owned(&mut recount);
        for l in self.leases.values_any_order() {
            recount.change(&l.principal, |u| u.live_leases = u.live_leases.saturating_add(1));
        }
        for (id, p) in &self.principals.creators {
            if !self.budgets.contains_key(id) {
                return Err(InvariantError::PrincipalUsage {
                    detail: format!("budget id {id} created by {p} does not exist"),
                });
            }
            recount.change(p, |u| u.budgets = u.budgets.saturating_add(1));
        }
        if recount.usage != self.principals.usage {
            return Err(InvariantError::PrincipalUsage {
                detail: format!("held {:?}, recounted {:?}", self.principals.usage, recount.usage),
            });
        }
        Ok(())
    }

    /// Recomputes every derived index from the primary state.
    fn rebuild(&mut self) -> Result<(), InvariantError> {
        self.by_path.clear();
        self.paths.clear();
        for (&id, b) in self.budgets.sorted() {
            self.paths.insert(b.path.clone());
            if let Some(first) = self.by_path.insert(b.path.clone(), id) {
                return Err(InvariantError::DuplicateBudgetPath {
                    path: b.path.clone(),
                    first,
                    second: id,
                });
            }
        }
        // Counter ids are unique (leases find their counters by id).
        let mut counter_ids = std::collections::BTreeSet::new();
        for (_, b) in self.budgets.sorted() {
            for l in &b.limits {
                if !counter_ids.insert(l.counter.id) || l.counter.id >= self.next_counter_id {
                    return Err(InvariantError::BadCounterId {
                        path: b.path.clone(),
                        counter: l.counter.id,
                    });
                }
            }
        }
        let ids: Vec<BudgetId> = self.budgets.sorted_keys();
        for id in &ids {
            let b = self.budget_mut(*id);
            b.children = 0;
            b.live_leases = 0;
            for l in &mut b.limits {
                l.counter.holders = Default::default();
                l.counter.upcoming_holders = Default::default();
            }
        }
        for id in &ids {
            let path = self.budgets[id].path.clone();
            match (self.budgets[id].parent, path.parent()) {
                (Some(p), Some(parent_path)) => {
                    let Some(parent) = self.budgets.get_mut(&p) else {
                        return Err(InvariantError::MissingParent { path, parent: p });
                    };
                    // Each parent's path is its child's minus the last segment: so the
                    // parent links can form no cycle.
                    if parent.path != parent_path {
                        return Err(InvariantError::WrongParent {
                            path,
                            parent: parent.path.clone(),
                        });
                    }
                    parent.children = parent.children.saturating_add(1);
                }
                (None, None) => {}
                (Some(p), None) => {
                    return Err(InvariantError::ParentLinkOnTopLevel { path, parent: p })
                }
                (None, Some(_)) => return Err(InvariantError::ParentLinkMissing { path }),
            }
        }
        // Parents have lower ids than their children (a parent exists before its
        // children are made), so in id order each parent shares first.
        for id in &ids {
            let mut limits = std::mem::take(&mut self.budget_mut(*id).limits);
            self.share_units(self.budgets[id].parent, &mut limits);
            self.budget_mut(*id).limits = limits;
        }
        self.expiry.clear();
        self.openings.clear();
        for (id, at) in &self.opening {
            if !self.leases.contains_key(id) {
                return Err(InvariantError::OpeningNotLive { lease: *id });
            }
            self.openings.insert((*at, *id));
        }
        let leases: Vec<(LeaseId, Lease)> =
            self.leases.sorted().into_iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, lease) in &leases {
            self.expiry.insert((lease.expires_at_ms, *id));
            let opens = self.opening.get(id).copied();
            for c in &lease.counters {
                // A counter may be gone (its limit was replaced by an update), but
                // not its budget: budgets with live leases below them stay.
                if !self.budgets.contains_key(&c.budget) {
                    return Err(InvariantError::LeaseDrawsOnMissingBudget {
                        lease: *id,
                        budget: c.budget,
                    });
                }
                let Some(limit) = self
                    .budgets
                    .get_mut(&c.budget)
                    .and_then(|b| b.limits.iter_mut().find(|l| l.counter.id == c.counter))
                else {
                    continue;
                };
                // Leases never outlive the window they draw on (a window must close
                // with nothing outstanding); a lease that has not opened draws on the
                // next window of a counter whose window ends when it opens.
                let counter = &mut limit.counter;
                let next = opens.is_some_and(|at| at >= counter.window_end_ms);
                let window_end_ms = if next {
                    if opens != Some(counter.window_end_ms) {
                        return Err(InvariantError::OpensOffBoundary {
                            lease: *id,
                            opens_at_ms: opens.unwrap_or(0),
                            window_end_ms: counter.window_end_ms,
                        });
                    }
                    limit.spec.window.bounds(counter.window_end_ms).1
                } else {
                    counter.window_end_ms
                };
                if lease.expires_at_ms > window_end_ms {
                    return Err(InvariantError::LeaseOutlivesWindow {
                        lease: *id,
                        expires_at_ms: lease.expires_at_ms,
                        window_end_ms,
                    });
                }
                let holders =
                    if next { &mut counter.upcoming_holders } else { &mut counter.holders };
                holders.add(&lease.principal);
            }
            if self.budgets.get(&lease.budget).is_none_or(|b| b.path != lease.path) {
                return Err(InvariantError::LeasePathMismatch {
                    lease: *id,
                    path: lease.path.clone(),
                    budget: lease.budget,
                });
            }
            let mut at = Some(lease.budget);
            while let Some(b) = at {
                let Some(budget) = self.budgets.get_mut(&b) else {
                    return Err(InvariantError::LeaseOnMissingBudget { lease: *id, budget: b });
                };
                budget.live_leases = budget.live_leases.saturating_add(1);
                at = budget.parent;
            }
        }
        self.forget = self.expired.iter().map(|(id, e)| (e.forget_at_ms, *id)).collect();
        self.rebuild_controls().map_err(|detail| InvariantError::Controls { detail })?;
        self.principals.usage.clear();
        self.dedup.rebuild(&mut self.principals);
        let budgets = &self.budgets;
        self.principals.creators.retain(|id, _| budgets.contains_key(id));
        let creators: Vec<Principal> = self.principals.creators.values().cloned().collect();
        for p in &creators {
            self.principals.change(p, |u| u.budgets = u.budgets.saturating_add(1));
        }
        let holders: Vec<Principal> =
            self.leases.values_any_order().map(|l| l.principal.clone()).collect();
        for p in &holders {
            self.principals.change(p, |u| u.live_leases = u.live_leases.saturating_add(1));
        }
        // Live leases hold the ledger's copy of their principal, as when acquired
        // (`Principals::canonical`; the same text either way).
        let principals = &self.principals;
        for lease in self.leases.values_any_order_mut() {
            if let Some(p) = principals.canonical(&lease.principal) {
                lease.principal = p.clone();
            }
        }
        Ok(())
    }

    /// Checks every invariant from scratch: the cap on every limit, outstanding
    /// equal to the live leases' unsettled allowance, leases inside their windows,
    /// and conservation. Tests call it after every step; restore calls it once.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        self.check_principal_usage()?;
        self.check_roles()?;
        self.check_controls().map_err(|detail| InvariantError::Controls { detail })?;
        self.check_visibility().map_err(|detail| InvariantError::Controls { detail })?;
        let window_ends: BTreeMap<(BudgetId, u64), u64> = self
            .budgets
            .values_any_order_keyed()
            .flat_map(|(id, b)| {
                b.limits.iter().map(move |l| ((*id, l.counter.id), l.counter.window_end_ms))
            })
            .collect();
        // (budget, counter id, whether the next window's) -> unsettled allowance
        let mut outstanding: BTreeMap<(BudgetId, u64, bool), u64> = BTreeMap::new();
        for (id, l) in self.leases.sorted() {
            if l.reported > l.granted {
                return Err(InvariantError::OverReported {
                    lease: *id,
                    reported: l.reported,
                    granted: l.granted,
                });
            }
            if l.expires_at_ms > l.window_end_ms || l.expires_at_ms <= self.now_ms {
                return Err(InvariantError::LeaseExpiryOutOfRange {
                    lease: *id,
                    expires_at_ms: l.expires_at_ms,
                    now_ms: self.now_ms,
                    window_end_ms: l.window_end_ms,
                });
            }
            let opens = self.opening.get(id).copied();
            if let Some(at) = opens {
                if l.expires_at_ms <= at
                    || l.reported > 0
                    || at <= self.now_ms
                    || at > crate::window::MAX_TIME_MS
                {
                    return Err(InvariantError::ExpiresBeforeOpening {
                        lease: *id,
                        opens_at_ms: at,
                        expires_at_ms: l.expires_at_ms,
                        now_ms: self.now_ms,
                    });
                }
            }
            for c in &l.counters {
                let next = opens
                    .zip(window_ends.get(&(c.budget, c.counter)))
                    .is_some_and(|(at, e)| at >= *e);
                let o = outstanding.entry((c.budget, c.counter, next)).or_insert(0);
                *o = o.saturating_add(l.granted.saturating_sub(l.reported));
            }
        }
        for (id, b) in self.budgets.sorted() {
            for l in &b.limits {
                let c = &l.counter;
                let held_next = outstanding.get(&(*id, c.id, true)).copied().unwrap_or(0);
                if c.upcoming != held_next {
                    return Err(InvariantError::OutstandingMismatch {
                        path: b.path.clone(),
                        unit: l.spec.unit.clone(),
                        window: l.spec.window,
                        outstanding: c.upcoming,
                        held: held_next,
                    });
                }
                let shadow = self.is_shadow(*id);
                if c.upcoming > l.spec.cap && !shadow {
                    return Err(InvariantError::UpcomingOverCap {
                        path: b.path.clone(),
                        unit: l.spec.unit.clone(),
                        window: l.spec.window,
                        upcoming: c.upcoming,
                        cap: l.spec.cap,
                    });
                }
                let held = outstanding.get(&(*id, c.id, false)).copied().unwrap_or(0);
                if c.outstanding != held {
                    return Err(InvariantError::OutstandingMismatch {
                        path: b.path.clone(),
                        unit: l.spec.unit.clone(),
                        window: l.spec.window,
                        outstanding: c.outstanding,
                        held,
                    });
                }
                let (consumed, _, _) = l.effective(self.now_ms);
                let overruns = l.overruns(self.now_ms);
                if c.overruns > c.consumed
                    || consumed.checked_add(c.outstanding).is_none_or(|used| {
                        used > l.spec.cap.saturating_add(overruns)
                            && !(shadow
                                && used <= crate::command::MAX_AMOUNT.saturating_add(overruns))
                    })
                {
                    return Err(InvariantError::OverCap {
                        path: b.path.clone(),
                        unit: l.spec.unit.clone(),
                        window: l.spec.window,
                        consumed,
                        outstanding: c.outstanding,
                        cap: l.spec.cap,
                        overruns,
                    });
                }
                if (c.outstanding > 0 || c.upcoming > 0) && self.now_ms >= c.window_end_ms {
                    return Err(InvariantError::ClosedWindowOutstanding {
                        path: b.path.clone(),
                        unit: l.spec.unit.clone(),
                        window: l.spec.window,
                        outstanding: c.outstanding.saturating_add(c.upcoming),
                        window_end_ms: c.window_end_ms,
                        now_ms: self.now_ms,
                    });
                }
            }
        }
        let t = self.totals;
        let outstanding = self.outstanding_total();
        let rhs = t
            .consumed
            .saturating_add(t.returned)
            .saturating_add(t.charged)
            .saturating_add(outstanding);
        if t.granted.saturating_add(t.uncharged).saturating_add(t.overrun) != rhs {
            return Err(InvariantError::Conservation {
                granted: t.granted,
                uncharged: t.uncharged,
                overrun: t.overrun,
                consumed: t.consumed,
                returned: t.returned,
                charged: t.charged,
                outstanding,
            });
        }
        Ok(())
    }
}
