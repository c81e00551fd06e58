//! Creating, updating and deleting budgets.

use super::{Budget, Counter, Ctx, Ledger, Limit};
use crate::audit::AuditKind;
use crate::command::{BudgetSpec, LimitSpec, Outcome, Reply};
use crate::error::LedgerError;
use crate::names::{BudgetPath, Unit};
use crate::window::Window;

impl Ledger {
    pub(super) fn create_budget(&mut self, ctx: &mut Ctx<'_>, spec: &BudgetSpec) -> Outcome {
        spec.validate()?;
        if spec.path.root() == super::LEDGER_PATH {
            return Err(LedgerError::InvalidPath {
                path: spec.path.to_string(),
                reason: format!(
                    "{} is reserved for the ledger's own audit records",
                    super::LEDGER_PATH
                ),
            });
        }
        if self.by_path.contains_key(&spec.path) {
            return Err(LedgerError::BudgetExists { path: spec.path.clone() });
        }
        if self.budgets.len() as u64 >= self.config.max_budgets {
            return Err(LedgerError::LedgerFull {
                what: "budgets".into(),
                max: self.config.max_budgets,
            });
        }
        if let Some(full) = self.principals.full(ctx.principal, super::Held::Budgets) {
            return Err(full);
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
        let id = self.insert_budget(spec.path.clone(), parent, spec.limits.clone());
        self.principals.creators.insert(id, ctx.principal.clone());
        self.principals.change(ctx.principal, |u| u.budgets = u.budgets.saturating_add(1));
        self.emit_budget(ctx, AuditKind::BudgetCreated, id);
        Ok(Reply::BudgetCreated { version: 1 })
    }

    pub(super) fn update_budget(
        &mut self,
        ctx: &mut Ctx<'_>,
        spec: &BudgetSpec,
        expected_version: u64,
    ) -> Outcome {
        spec.validate()?;
        let id = self.budget_id(&spec.path)?;
        check_version(&self.budgets[&id], expected_version)?;
        self.check_new_limits(id, &spec.limits)?;
        let version = self.replace_limits(id, &spec.limits);
        self.emit_budget(ctx, AuditKind::BudgetUpdated, id);
        Ok(Reply::BudgetUpdated { version })
    }

    /// Inserts a budget (its parent, if any, exists) and returns its id.
    pub(super) fn insert_budget(
        &mut self,
        path: BudgetPath,
        parent: Option<super::BudgetId>,
        limits: Vec<LimitSpec>,
    ) -> super::BudgetId {
        let mut limits: Vec<Limit> = limits.into_iter().map(|l| self.new_limit(l)).collect();
        self.share_units(parent, &mut limits);
        let id = self.next_budget_id;
        self.next_budget_id = id.checked_add(1).expect("budget id overflow");
        if let Some(p) = parent {
            self.budget_mut(p).children = self.budget_mut(p).children.saturating_add(1);
        }
        let budget =
            Budget { path: path.clone(), parent, version: 1, limits, children: 0, live_leases: 0 };
        self.paths.insert(path.clone());
        self.by_path.insert(path, id);
        self.budgets.insert(id, budget);
        id
    }

    /// Removes a budget with no children and no live leases, and everything held
    /// about it.
    pub(super) fn remove_budget(&mut self, id: super::BudgetId) {
        self.forget_instance(id);
        self.frozen.remove(&id);
        self.vis.options.remove(&id);
        let budget = self.budgets.remove(&id).expect("the budget exists");
        assert_eq!(budget.live_leases, 0, "invariant: a removed budget holds no lease");
        assert_eq!(budget.children, 0, "invariant: a removed budget has no children");
        if let Some(creator) = self.principals.creators.remove(&id) {
            self.principals.change(&creator, |u| u.budgets = u.budgets.saturating_sub(1));
        }
        self.by_path.remove(&budget.path);
        self.paths.remove(&budget.path);
        if let Some(p) = budget.parent {
            let parent = self.budget_mut(p);
            parent.children = parent.children.checked_sub(1).expect("invariant: child count");
        }
    }

    /// Refuses `limits` for budget `id` if a kept limit's new cap is below what its
    /// current window already holds.
    pub(super) fn check_new_limits(
        &self,
        id: super::BudgetId,
        limits: &[LimitSpec],
    ) -> Result<(), LedgerError> {
        let now = self.now_ms;
        let budget = &self.budgets[&id];
        for new in limits {
            if let Some(old) = find_limit(&budget.limits, &new.unit, new.window) {
                let (consumed, _, _) = old.effective(now);
                let in_use = consumed.saturating_add(old.counter.outstanding);
                // After an overrun, usage may be above the old cap already: the new
                // cap must still hold it, counting the overruns as the old one did.
                // Leases already granted for the next window must fit as well.
                let (in_use, over) = if new.cap < old.counter.upcoming {
                    (old.counter.upcoming, 0)
                } else {
                    (in_use, old.overruns(now))
                };
                if new.cap.saturating_add(over) < in_use {
                    return Err(LedgerError::CapBelowUsage {
                        path: budget.path.clone(),
                        unit: new.unit.clone(),
                        window: new.window,
                        cap: new.cap,
                        in_use,
                    });
                }
            }
        }
        Ok(())
    }

    /// Replaces budget `id`'s limits (checked with [`Ledger::check_new_limits`]),
    /// keeping the figures of each (unit, window) kept; returns its new version.
    pub(super) fn replace_limits(&mut self, id: super::BudgetId, limits: &[LimitSpec]) -> u64 {
        let now = self.now_ms;
        let mut old_limits = std::mem::take(&mut self.budget_mut(id).limits);
        let limits = limits
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
        let mut limits: Vec<Limit> = limits;
        self.share_units(self.budgets[&id].parent, &mut limits);
        let budget = self.budget_mut(id);
        budget.limits = limits;
        budget.version = budget.version.saturating_add(1);
        budget.version
    }

    pub(super) fn delete_budget(
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
        if self.templates.contains_key(&id) {
            return Err(LedgerError::HasTemplate { path: path.clone() });
        }
        self.emit_budget(ctx, AuditKind::BudgetDeleted, id);
        self.remove_budget(id);
        Ok(Reply::BudgetDeleted)
    }

    /// Points each limit's unit at the same name held by a limit of `parent`, so
    /// a tree's limits share one copy of each unit name: less memory, and the
    /// name an acquire compares against up the chain is one already in cache.
    pub(super) fn share_units(&self, parent: Option<super::BudgetId>, limits: &mut [Limit]) {
        let Some(parent) = parent.and_then(|p| self.budgets.get(&p)) else { return };
        for l in limits {
            if let Some(p) = parent.limits.iter().find(|p| p.spec.unit == l.spec.unit) {
                l.spec.unit = p.spec.unit.clone();
            }
        }
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
            overruns: 0,
            holders: super::holders::Holders::default(),
            upcoming: 0,
            upcoming_holders: super::holders::Holders::default(),
            watch: None,
        };
        Limit { spec, counter }
    }
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

fn find_limit<'a>(limits: &'a [Limit], unit: &Unit, window: Window) -> Option<&'a Limit> {
    limits.iter().find(|l| &l.spec.unit == unit && l.spec.window == window)
}
