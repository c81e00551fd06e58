//! Controls on budgets: templates (a budget per user, key or run, created by its
//! first acquire), their instances' expiry, and freezing.
//!
//! - A template lives on a parent budget. An acquire, next-window acquire or
//!   overrun on a missing direct child of that parent creates the child with the
//!   template's limits first, as part of the same command: the record
//!   `budget_created` comes before the grant's. If the command is then refused,
//!   the creation is undone (chain head, ids and all), so a refusal still changes
//!   nothing. Commands apply one at a time, so racing gateways create a child once.
//! - Editing a template rewrites every instance's limits in the same command,
//!   checked first as `UpdateBudget` checks one budget: if any instance already
//!   holds more than a new cap in its current window, the edit is refused, naming
//!   it. Removing a template leaves its instances as ordinary budgets.
//! - An instance is looked at `idle_ms` after its last lease settled (or after it
//!   was created, or an overrun on it). If it holds no live lease and no window of
//!   it holds spend (every window with spend in it has ended), it is deleted and
//!   audited as `instance_expired`; otherwise it is looked at again when that
//!   window ends. So deleting it never gives anyone a fresh window early: the
//!   next acquire recreates it with nothing spent only where nothing was spent
//!   in the windows still open. A lifetime limit with spend keeps it forever.
//! - A frozen budget grants nothing on it or below it (`Frozen`, checked on every
//!   acquire); reports, releases, renewals and overruns still apply.
//! - Agent runs: a template may give its instances a longest life (no grant after
//!   it, no lease valid past it) and runaway guards. A guard caps what one span
//!   grants in its unit at its maximum (`GuardReached`), and spend counted in one
//!   span (reported, released, overrun or charged at expiry) that reaches the
//!   maximum halts the run: it is frozen with the reason (`Halted`), audited as
//!   `run_halted`, until an operator unfreezes it. So a run spends at most a
//!   guard's maximum per span, and nothing is granted once it is halted.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{BudgetId, Ctx, Ledger, LEDGER_PATH};
use crate::audit::{AuditKind, AuditRecord, ChainHead};
use crate::command::{Guard, LimitSpec, Outcome, Reply, TemplateSpec};
use crate::error::LedgerError;
use crate::names::{BudgetPath, Principal, Unit};
use crate::window::MAX_TIME_MS;

/// Most instances expired by one log entry (the rest wait for the next entries).
pub(super) const MAX_EXPIRIES_PER_ENTRY: usize = 1024;

/// A template on a budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Template {
    pub(super) limits: Vec<LimitSpec>,
    pub(super) max_instances: u64,
    pub(super) idle_ms: u64,
    pub(super) max_duration_ms: u64,
    pub(super) guards: Vec<Guard>,
    /// Derived: the instances it made that still exist.
    pub(super) members: BTreeSet<BudgetId>,
}

/// A budget a template made: when to look at it next for expiry, when it was
/// made, and what its guards' current spans granted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Instance {
    pub(super) due_ms: Option<u64>,
    pub(super) created_ms: u64,
    /// (unit, span length, span start, granted in the span, consumed in the span),
    /// one per guard that granted or counted anything.
    pub(super) spans: Vec<(Unit, u64, u64, u64, u64)>,
}

/// Why a budget grants nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Hold {
    /// An operator froze it.
    Frozen,
    /// Its runaway guard tripped.
    Halted { reason: String },
}

/// What the guards say about an acquire: grant at most `room`, or nothing until
/// the span that `guard` is in ends.
pub(super) enum Guarded {
    Room(u64),
    Full { guard: Guard, span_end_ms: u64 },
}

/// A template as queries see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateView {
    pub limits: Vec<LimitSpec>,
    pub max_instances: u64,
    pub idle_ms: u64,
    pub max_duration_ms: u64,
    pub guards: Vec<Guard>,
    pub instances: u64,
}

impl Instance {
    /// (start, granted, consumed) of guard `g`'s span holding `now_ms`.
    fn span(&self, g: &Guard, now_ms: u64) -> (u64, u64, u64) {
        let since = now_ms.saturating_sub(self.created_ms);
        let into = since.checked_rem(g.per_ms).unwrap_or(0);
        let start = self.created_ms.saturating_add(since.saturating_sub(into));
        let (granted, consumed) = self
            .spans
            .iter()
            .find(|s| s.0 == g.unit && s.1 == g.per_ms && s.2 == start)
            .map_or((0, 0), |s| (s.3, s.4));
        (start, granted, consumed)
    }
}

/// How to take back an instance a refused command created.
pub(super) struct Undo {
    id: BudgetId,
    chain: ChainHead,
    audit_len: usize,
    next_budget_id: BudgetId,
    next_counter_id: u64,
}

impl Ledger {
    /// Runs `op` on `path`, creating `path` from its parent's template first if it
    /// is missing and its parent has one; undoes the creation if `op` is refused.
    pub(super) fn with_instance(
        &mut self,
        ctx: &mut Ctx<'_>,
        path: &BudgetPath,
        op: impl FnOnce(&mut Self, &mut Ctx<'_>) -> Outcome,
    ) -> Outcome {
        let undo = self.instantiate(ctx, path)?;
        let outcome = op(self, ctx);
        if let (Err(_), Some(undo)) = (&outcome, undo) {
            self.undo_instance(ctx, undo);
        }
        outcome
    }

    fn instantiate(
        &mut self,
        ctx: &mut Ctx<'_>,
        path: &BudgetPath,
    ) -> Result<Option<Undo>, LedgerError> {
        if self.by_path.contains_key(path) {
            return Ok(None);
        }
        let Some(parent_path) = path.parent() else { return Ok(None) };
        let Some(&parent) = self.by_path.get(&parent_path) else { return Ok(None) };
        let Some(template) = self.templates.get(&parent) else { return Ok(None) };
        if template.members.len() as u64 >= template.max_instances {
            return Err(LedgerError::LedgerFull {
                what: format!("instances of the template on {parent_path}"),
                max: template.max_instances,
            });
        }
        if self.budgets.len() as u64 >= self.config.max_budgets {
            return Err(LedgerError::LedgerFull {
                what: "budgets".into(),
                max: self.config.max_budgets,
            });
        }
        let limits = template.limits.clone();
        let undo = Undo {
            id: self.next_budget_id,
            chain: self.chain,
            audit_len: ctx.audit.len(),
            next_budget_id: self.next_budget_id,
            next_counter_id: self.next_counter_id,
        };
        let id = self.insert_budget(path.clone(), Some(parent), limits);
        debug_assert_eq!(id, undo.id);
        if let Some(t) = self.templates.get_mut(&parent) {
            t.members.insert(id);
        }
        let instance = Instance { due_ms: None, created_ms: self.now_ms, spans: Vec::new() };
        self.instances.insert(id, instance);
        self.touch_instance(id);
        self.emit_budget(ctx, AuditKind::BudgetCreated, id);
        Ok(Some(undo))
    }

    fn undo_instance(&mut self, ctx: &mut Ctx<'_>, undo: Undo) {
        self.forget_instance(undo.id);
        let budget = self.budgets.remove(&undo.id).expect("the instance was just created");
        assert_eq!(budget.live_leases, 0, "a refused command leaves no lease");
        self.by_path.remove(&budget.path);
        self.paths.remove(&budget.path);
        if let Some(p) = budget.parent {
            let parent = self.budget_mut(p);
            parent.children = parent.children.checked_sub(1).expect("invariant: child count");
        }
        ctx.audit.truncate(undo.audit_len);
        self.chain = undo.chain;
        self.next_budget_id = undo.next_budget_id;
        self.next_counter_id = undo.next_counter_id;
    }

    /// Drops `id` from the instance tables (it is being deleted, or its template is).
    pub(super) fn forget_instance(&mut self, id: BudgetId) {
        let Some(instance) = self.instances.remove(&id) else { return };
        if let Some(due) = instance.due_ms {
            self.instance_due.remove(&(due, id));
        }
        let parent = self.budgets.get(&id).and_then(|b| b.parent);
        if let Some(t) = parent.and_then(|p| self.templates.get_mut(&p)) {
            t.members.remove(&id);
        }
    }

    /// `id` was just used: if it is an instance of a template that expires them,
    /// look at it again `idle_ms` from now.
    pub(super) fn touch_instance(&mut self, id: BudgetId) {
        if self.instances.is_empty() {
            return;
        }
        let Some(idle_ms) = self.instance_idle_ms(id) else { return };
        self.schedule_instance(id, Some(self.now_ms.saturating_add(idle_ms)));
    }

    fn instance_idle_ms(&self, id: BudgetId) -> Option<u64> {
        self.instances.get(&id)?;
        let parent = self.budgets.get(&id)?.parent?;
        Some(self.templates.get(&parent)?.idle_ms).filter(|&ms| ms > 0)
    }

    fn schedule_instance(&mut self, id: BudgetId, due: Option<u64>) {
        let Some(instance) = self.instances.get_mut(&id) else { return };
        if let Some(old) = std::mem::replace(&mut instance.due_ms, due) {
            self.instance_due.remove(&(old, id));
        }
        if let Some(due) = due {
            self.instance_due.insert((due, id));
        }
    }

    /// Deletes the instances that are due, idle and hold no spend in an open
    /// window; looks again later at the others.
    pub(super) fn expire_instances(&mut self, index: u64, audit: &mut Vec<AuditRecord>) {
        let now = self.now_ms;
        let mut expired = 0;
        while expired < MAX_EXPIRIES_PER_ENTRY {
            let Some(&(due, id)) = self.instance_due.first() else { break };
            if due > now {
                break;
            }
            self.schedule_instance(id, None);
            let b = &self.budgets[&id];
            // A lease settling touches it again.
            if b.live_leases > 0 {
                continue;
            }
            let Some(idle_ms) = self.instance_idle_ms(id) else { continue };
            if b.children > 0 {
                self.schedule_instance(id, Some(now.saturating_add(idle_ms)));
                continue;
            }
            // The end of the last window that holds spend (or next-window grants);
            // a run that has ended grants nothing more, so its spend keeps nothing.
            let quiet = if self.run_end(id).is_some_and(|end| end <= now) {
                0
            } else {
                b.limits
                    .iter()
                    .filter(|l| l.effective(now).0 > 0 || l.counter.upcoming > 0)
                    .map(|l| l.counter.window_end_ms.max(l.effective(now).2))
                    .max()
                    .unwrap_or(0)
            };
            if quiet > MAX_TIME_MS {
                continue; // a lifetime limit with spend: kept for good
            }
            if quiet > now {
                self.schedule_instance(id, Some(quiet));
                continue;
            }
            let system = Principal::new(LEDGER_PATH).expect("the ledger's own name is valid");
            let mut ctx = Ctx { index, principal: &system, audit };
            self.emit_budget(&mut ctx, AuditKind::InstanceExpired, id);
            self.remove_budget(id);
            expired = expired.saturating_add(1);
        }
    }

    pub(super) fn set_template(&mut self, ctx: &mut Ctx<'_>, spec: &TemplateSpec) -> Outcome {
        spec.validate()?;
        let parent = self.budget_id(&spec.parent)?;
        let members: Vec<BudgetId> = self
            .templates
            .get(&parent)
            .map(|t| t.members.iter().copied().collect())
            .unwrap_or_default();
        // Check every instance before changing any.
        for &id in &members {
            self.check_new_limits(id, &spec.limits)?;
        }
        for &id in &members {
            self.replace_limits(id, &spec.limits);
            self.emit_budget(ctx, AuditKind::BudgetUpdated, id);
        }
        let template = Template {
            limits: spec.limits.clone(),
            max_instances: spec.max_instances,
            idle_ms: spec.idle_ms,
            max_duration_ms: spec.max_duration_ms,
            guards: spec.guards.clone(),
            members: members.iter().copied().collect(),
        };
        let idle_changed =
            self.templates.get(&parent).is_some_and(|old| old.idle_ms != spec.idle_ms);
        self.templates.insert(parent, template);
        if idle_changed {
            for &id in &members {
                self.touch_instance(id);
                if spec.idle_ms == 0 {
                    self.schedule_instance(id, None);
                }
            }
        }
        let mut entry = self.base_entry(
            ctx.index,
            AuditKind::TemplateSet,
            spec.parent.clone(),
            ctx.principal.clone(),
            self.now_ms,
        );
        entry.limits = spec.limits.clone();
        self.record(ctx.audit, entry);
        Ok(Reply::TemplateSet { instances: members.len() as u64 })
    }

    pub(super) fn delete_template(&mut self, ctx: &mut Ctx<'_>, parent: &BudgetPath) -> Outcome {
        let id = self.budget_id(parent)?;
        let Some(template) = self.templates.remove(&id) else {
            return Err(LedgerError::TemplateNotFound { path: parent.clone() });
        };
        for member in &template.members {
            if let Some(Instance { due_ms: Some(due), .. }) = self.instances.remove(member) {
                self.instance_due.remove(&(due, *member));
            }
        }
        let entry = self.base_entry(
            ctx.index,
            AuditKind::TemplateDeleted,
            parent.clone(),
            ctx.principal.clone(),
            self.now_ms,
        );
        self.record(ctx.audit, entry);
        Ok(Reply::TemplateDeleted { instances: template.members.len() as u64 })
    }

    pub(super) fn freeze(&mut self, ctx: &mut Ctx<'_>, path: &BudgetPath, frozen: bool) -> Outcome {
        let id = self.budget_id(path)?;
        let changed = if frozen {
            self.frozen.insert(id, Hold::Frozen).is_none()
        } else {
            self.frozen.remove(&id).is_some()
        };
        // Every live lease under the budget in a unit draws on each of its limits in
        // that unit: the largest such figure is what they hold.
        let mut held: Vec<(Unit, u64)> = Vec::new();
        for l in &self.budgets[&id].limits {
            let h = l.counter.outstanding.saturating_add(l.counter.upcoming);
            match held.iter_mut().find(|(u, _)| *u == l.spec.unit) {
                Some((_, most)) => *most = (*most).max(h),
                None => held.push((l.spec.unit.clone(), h)),
            }
        }
        if changed {
            let kind = if frozen { AuditKind::BudgetFrozen } else { AuditKind::BudgetUnfrozen };
            self.emit_budget(ctx, kind, id);
        }
        Ok(Reply::Frozen { changed, held })
    }

    /// Refuses an acquire on `id` if it or an ancestor is frozen or halted, or it
    /// is a run that has ended.
    pub(super) fn check_grants(&self, id: BudgetId) -> Result<(), LedgerError> {
        if let Some(end) = self.run_end(id).filter(|&end| end <= self.now_ms) {
            let path = self.budgets[&id].path.clone();
            return Err(LedgerError::RunEnded { path, ended_at_ms: end });
        }
        if self.frozen.is_empty() {
            return Ok(());
        }
        let mut at = Some(id);
        while let Some(b) = at {
            let budget = &self.budgets[&b];
            match self.frozen.get(&b) {
                Some(Hold::Frozen) => {
                    return Err(LedgerError::Frozen { path: budget.path.clone() })
                }
                Some(Hold::Halted { reason }) => {
                    return Err(LedgerError::Halted {
                        path: budget.path.clone(),
                        reason: reason.clone(),
                    })
                }
                None => {}
            }
            at = budget.parent;
        }
        Ok(())
    }

    /// When run `id` ends (its template's max duration after it was made).
    pub(super) fn run_end(&self, id: BudgetId) -> Option<u64> {
        if self.instances.is_empty() {
            return None;
        }
        let instance = self.instances.get(&id)?;
        let template = self.templates.get(&self.budgets.get(&id)?.parent?)?;
        (template.max_duration_ms > 0)
            .then(|| instance.created_ms.saturating_add(template.max_duration_ms))
    }

    /// What the guards of instance `id` allow an acquire of `unit` now: the least
    /// room their current spans have.
    pub(super) fn guarded(&self, id: BudgetId, unit: &Unit, at_least: u64) -> Guarded {
        let mut room = u64::MAX;
        let Some(instance) = self.instances.get(&id) else { return Guarded::Room(room) };
        let parent = self.budgets[&id].parent;
        let Some(template) = parent.and_then(|p| self.templates.get(&p)) else {
            return Guarded::Room(room);
        };
        for g in template.guards.iter().filter(|g| g.unit == *unit) {
            let (start_ms, granted, _) = instance.span(g, self.now_ms);
            let left = g.max.saturating_sub(granted);
            if left < at_least {
                let span_end_ms = start_ms.saturating_add(g.per_ms);
                return Guarded::Full { guard: g.clone(), span_end_ms };
            }
            room = room.min(left);
        }
        Guarded::Room(room)
    }

    /// Counts `granted` (or, with `consumed`, spend) of `unit` in the current span of
    /// each guard of instance `id`. Spend that reaches a guard's maximum within a
    /// span halts the run (once): returns the guard and its span's figures.
    pub(super) fn count_guarded(
        &mut self,
        id: BudgetId,
        unit: &Unit,
        amount: u64,
        consumed: bool,
    ) -> Option<(Guard, u64, u64, u64)> {
        if self.instances.is_empty() {
            return None;
        }
        let now = self.now_ms;
        let parent = self.budgets.get(&id).and_then(|b| b.parent)?;
        let template = self.templates.get(&parent)?;
        let instance = self.instances.get_mut(&id)?;
        let mut tripped = None;
        for g in template.guards.iter().filter(|g| g.unit == *unit) {
            let (start, mut granted, mut spent) = instance.span(g, now);
            if consumed {
                spent = spent.saturating_add(amount);
            } else {
                granted = granted.saturating_add(amount);
            }
            match instance.spans.iter_mut().find(|s| s.0 == g.unit && s.1 == g.per_ms) {
                Some(s) => (s.2, s.3, s.4) = (start, granted, spent),
                None => instance.spans.push((g.unit.clone(), g.per_ms, start, granted, spent)),
            }
            if consumed && spent >= g.max && tripped.is_none() {
                tripped = Some((g.clone(), start, granted, spent));
            }
        }
        tripped.filter(|_| !self.frozen.contains_key(&id))
    }

    /// Counts spend on instance `id` against its guards, and halts it if one trips.
    pub(super) fn guard_spend(
        &mut self,
        index: u64,
        principal: &Principal,
        audit: &mut Vec<AuditRecord>,
        (id, unit, amount): (BudgetId, &Unit, u64),
    ) {
        if amount == 0 || self.instances.is_empty() {
            return;
        }
        let Some((guard, start_ms, granted, spent)) = self.count_guarded(id, unit, amount, true)
        else {
            return;
        };
        let reason = format!(
            "spent {spent} {} within {} ms of {start_ms} (its guard allows {}; granted {granted})",
            guard.unit, guard.per_ms, guard.max
        );
        self.frozen.insert(id, Hold::Halted { reason });
        self.halted_total = self.halted_total.saturating_add(1);
        let path = self.budgets[&id].path.clone();
        let mut entry = self.base_entry(
            index,
            AuditKind::RunHalted,
            path.clone(),
            principal.clone(),
            self.now_ms,
        );
        entry.unit = Some(guard.unit.clone());
        entry.balances = vec![crate::audit::Balance {
            budget: path,
            unit: guard.unit,
            window: crate::window::Window::utc(crate::window::Period::Lifetime),
            window_start_ms: start_ms,
            cap: guard.max,
            consumed: spent,
            outstanding: granted,
        }];
        self.record(audit, entry);
    }

    /// (budgets frozen by an operator, runs halted now, runs halted ever).
    pub fn holds(&self) -> (u64, u64, u64) {
        let halted = self.frozen.values().filter(|h| matches!(h, Hold::Halted { .. })).count();
        let frozen = self.frozen.len().saturating_sub(halted);
        (frozen as u64, halted as u64, self.halted_total)
    }

    /// Why `path` grants nothing, if it is frozen or halted.
    pub fn hold(&self, path: &BudgetPath) -> Option<String> {
        self.hold_of(*self.by_path.get(path)?)
    }

    pub(super) fn hold_of(&self, id: BudgetId) -> Option<String> {
        match self.frozen.get(&id)? {
            Hold::Frozen => Some("frozen by an operator".into()),
            Hold::Halted { reason } => Some(format!("halted by its runaway guard: {reason}")),
        }
    }

    pub fn template(&self, parent: &BudgetPath) -> Option<TemplateView> {
        self.template_of(*self.by_path.get(parent)?)
    }

    pub(super) fn template_of(&self, id: BudgetId) -> Option<TemplateView> {
        let t = self.templates.get(&id)?;
        Some(TemplateView {
            limits: t.limits.clone(),
            max_instances: t.max_instances,
            idle_ms: t.idle_ms,
            max_duration_ms: t.max_duration_ms,
            guards: t.guards.clone(),
            instances: t.members.len() as u64,
        })
    }

    pub fn is_frozen(&self, path: &BudgetPath) -> bool {
        self.by_path.get(path).is_some_and(|id| self.frozen.contains_key(id))
    }

    /// Whether `path` was made by a template that still holds it.
    pub fn is_instance(&self, path: &BudgetPath) -> bool {
        self.by_path.get(path).is_some_and(|id| self.instances.contains_key(id))
    }

    /// The derived tables equal a rebuild from the primary ones, every instance's
    /// budget is a child of a template's budget, and no template is over its bound
    /// except after an edit lowered it.
    pub(super) fn check_controls(&self) -> Result<(), String> {
        let (members, due) = self.derive_controls()?;
        for (id, t) in &self.templates {
            if members.get(id) != Some(&t.members) {
                return Err(format!("the members of the template on budget id {id} are stale"));
            }
        }
        if due != self.instance_due {
            return Err("the instance expiry index is stale".into());
        }
        Ok(())
    }

    /// Each template's members and the expiry index, as the instances imply them;
    /// or what does not exist that should.
    #[allow(clippy::type_complexity)]
    fn derive_controls(
        &self,
    ) -> Result<(BTreeMap<BudgetId, BTreeSet<BudgetId>>, BTreeSet<(u64, BudgetId)>), String> {
        for id in self.templates.keys() {
            if !self.budgets.contains_key(id) {
                return Err(format!("a template is on budget id {id}, which does not exist"));
            }
        }
        for id in self.frozen.keys() {
            if !self.budgets.contains_key(id) {
                return Err(format!("budget id {id} is frozen but does not exist"));
            }
        }
        let mut members: BTreeMap<BudgetId, BTreeSet<BudgetId>> =
            self.templates.keys().map(|id| (*id, BTreeSet::new())).collect();
        let mut due = BTreeSet::new();
        for (id, instance) in &self.instances {
            let parent = self.budgets.get(id).and_then(|b| b.parent);
            let Some(m) = parent.and_then(|p| members.get_mut(&p)) else {
                return Err(format!("budget id {id} is an instance of no template"));
            };
            m.insert(*id);
            if let Some(at) = instance.due_ms {
                due.insert((at, *id));
            }
        }
        Ok((members, due))
    }

    /// Rebuilds the templates' members and the due index from the instances, and
    /// checks that every template, instance and frozen budget exists.
    pub(super) fn rebuild_controls(&mut self) -> Result<(), String> {
        let (members, due) = self.derive_controls()?;
        for (id, m) in members {
            if let Some(t) = self.templates.get_mut(&id) {
                t.members = m;
            }
        }
        self.instance_due = due;
        Ok(())
    }
}
