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

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{BudgetId, Ctx, Ledger, LEDGER_PATH};
use crate::audit::{AuditKind, AuditRecord, ChainHead};
use crate::command::{LimitSpec, Outcome, Reply, TemplateSpec};
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
    /// Derived: the instances it made that still exist.
    pub(super) members: BTreeSet<BudgetId>,
}

/// A budget a template made: when to look at it next for expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Instance {
    pub(super) due_ms: Option<u64>,
}

/// A template as queries see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateView {
    pub limits: Vec<LimitSpec>,
    pub max_instances: u64,
    pub idle_ms: u64,
    pub instances: u64,
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
        self.instances.insert(id, Instance { due_ms: None });
        self.touch_instance(id);
        self.emit_budget(ctx, AuditKind::BudgetCreated, id);
        Ok(Some(undo))
    }

    fn undo_instance(&mut self, ctx: &mut Ctx<'_>, undo: Undo) {
        self.forget_instance(undo.id);
        let budget = self.budgets.remove(&undo.id).expect("the instance was just created");
        assert_eq!(budget.live_leases, 0, "a refused command leaves no lease");
        self.by_path.remove(&budget.path);
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
            // The end of the last window that holds spend (or next-window grants).
            let quiet = b
                .limits
                .iter()
                .filter(|l| l.effective(now).0 > 0 || l.counter.upcoming > 0)
                .map(|l| l.counter.window_end_ms.max(l.effective(now).2))
                .max()
                .unwrap_or(0);
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
            if let Some(Instance { due_ms: Some(due) }) = self.instances.remove(member) {
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
        let changed = if frozen { self.frozen.insert(id) } else { self.frozen.remove(&id) };
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

    /// The frozen budget among `id` and its ancestors, if any.
    pub(super) fn frozen_at(&self, id: BudgetId) -> Option<&BudgetPath> {
        if self.frozen.is_empty() {
            return None;
        }
        let mut at = Some(id);
        while let Some(b) = at {
            let budget = &self.budgets[&b];
            if self.frozen.contains(&b) {
                return Some(&budget.path);
            }
            at = budget.parent;
        }
        None
    }

    pub fn template(&self, parent: &BudgetPath) -> Option<TemplateView> {
        let t = self.templates.get(self.by_path.get(parent)?)?;
        Some(TemplateView {
            limits: t.limits.clone(),
            max_instances: t.max_instances,
            idle_ms: t.idle_ms,
            instances: t.members.len() as u64,
        })
    }

    pub fn is_frozen(&self, path: &BudgetPath) -> bool {
        self.by_path.get(path).is_some_and(|id| self.frozen.contains(id))
    }

    /// Whether `path` was made by a template that still holds it.
    pub fn is_instance(&self, path: &BudgetPath) -> bool {
        self.by_path.get(path).is_some_and(|id| self.instances.contains_key(id))
    }

    /// The derived tables equal a rebuild from the primary ones, every instance's
    /// budget is a child of a template's budget, and no template is over its bound
    /// except after an edit lowered it.
    pub(super) fn check_controls(&self) -> Result<(), String> {
        let mut copy = self.clone_controls();
        copy.rebuild_controls()?;
        for (id, t) in &self.templates {
            if copy.templates[id].members != t.members {
                return Err(format!("the members of the template on budget id {id} are stale"));
            }
        }
        if copy.instance_due != self.instance_due {
            return Err("the instance expiry index is stale".into());
        }
        Ok(())
    }

    /// A ledger holding only the budgets' tree and the controls, for checks.
    fn clone_controls(&self) -> Ledger {
        let mut copy = Ledger::new(self.config.clone());
        copy.budgets = self.budgets.clone();
        copy.templates = self.templates.clone();
        copy.instances = self.instances.clone();
        copy.frozen = self.frozen.clone();
        copy
    }

    /// Rebuilds the templates' members and the due index from the instances, and
    /// checks that every template, instance and frozen budget exists.
    pub(super) fn rebuild_controls(&mut self) -> Result<(), String> {
        self.instance_due.clear();
        for t in self.templates.values_mut() {
            t.members.clear();
        }
        for id in self.templates.keys() {
            if !self.budgets.contains_key(id) {
                return Err(format!("a template is on budget id {id}, which does not exist"));
            }
        }
        for id in &self.frozen {
            if !self.budgets.contains_key(id) {
                return Err(format!("budget id {id} is frozen but does not exist"));
            }
        }
        for (id, instance) in &self.instances {
            let parent = self.budgets.get(id).and_then(|b| b.parent);
            let Some(t) = parent.and_then(|p| self.templates.get_mut(&p)) else {
                return Err(format!("budget id {id} is an instance of no template"));
            };
            t.members.insert(*id);
            if let Some(due) = instance.due_ms {
                self.instance_due.insert((due, *id));
            }
        }
        Ok(())
    }
}
