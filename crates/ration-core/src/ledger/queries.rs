//! Read-only accessors and the views queries return.

use super::{BudgetId, BudgetView, Lease, LeaseView, Ledger, LedgerConfig, LimitView, Totals};
use crate::audit::ChainHead;
use crate::names::{BudgetPath, LeaseId, Principal};

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
        self.leases
            .values_any_order()
            .map(|l| u128::from(l.granted.saturating_sub(l.reported)))
            .sum()
    }

    pub fn budget(&self, path: &BudgetPath) -> Option<BudgetView> {
        self.by_path.get(path).map(|id| self.view(*id))
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
        let after = |p: &BudgetPath| start_after.is_none_or(|a| p > a);
        let Some(s) = subtree else {
            let lower = start_after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
            return self
                .paths
                .range((lower, Bound::Unbounded))
                .take(limit)
                .map(|p| self.view(self.by_path[p]))
                .collect();
        };
        // The subtree is the budget itself, then exactly the paths in [s/, s0): a
        // page reads only what it returns, however many siblings share the prefix.
        let (from, to) = s.descendant_bounds();
        let own = self.paths.get(s).filter(|p| after(p));
        let rest = match start_after {
            Some(a) if *a >= to => None,
            Some(a) if *a >= from => {
                Some(self.paths.range((Bound::Excluded(a.clone()), Bound::Excluded(to))))
            }
            _ => Some(self.paths.range((Bound::Included(from), Bound::Excluded(to)))),
        };
        own.into_iter()
            .chain(rest.into_iter().flatten())
            .take(limit)
            .map(|p| self.view(self.by_path[p]))
            .collect()
    }

    fn view(&self, id: BudgetId) -> BudgetView {
        let b = &self.budgets[&id];
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
                    overruns: l.overruns(now),
                    holders: l.counter.holders.len() as u64,
                    upcoming: l.counter.upcoming,
                    threshold_reached_pct: self.reached_pct(id, l),
                }
            })
            .collect();
        BudgetView {
            path: b.path.clone(),
            version: b.version,
            limits,
            children: b.children,
            live_leases: b.live_leases,
            frozen: self.frozen.contains_key(&id),
            hold: self.hold_of(id),
            instance: self.instances.contains_key(&id),
            template: self.template_of(id),
            options: self.vis.options.get(&id).map(|o| crate::command::BudgetOptions {
                thresholds_pct: o.thresholds_pct.clone(),
                shadow: o.shadow,
            }),
            shadow_refusals: self.vis.options.get(&id).map_or(0, |o| o.would_refuse),
        }
    }

    pub fn lease(&self, id: LeaseId) -> Option<LeaseView> {
        self.leases.get(&id).map(|l| self.lease_view(id, l))
    }

    /// Live leases, optionally of one principal, in id order, at most `limit`.
    pub fn leases(&self, principal: Option<&Principal>, limit: usize) -> Vec<LeaseView> {
        // The `limit` lowest ids, without sorting them all: one pass to pick them.
        let mut picked: Vec<(&LeaseId, &Lease)> = self
            .leases
            .values_any_order_keyed()
            .filter(|(_, l)| principal.is_none_or(|p| &l.principal == p))
            .collect();
        if picked.len() > limit {
            if let Some(last) = limit.checked_sub(1) {
                picked.select_nth_unstable_by_key(last, |(id, _)| **id);
            }
            picked.truncate(limit);
        }
        picked.sort_unstable_by_key(|(id, _)| **id);
        picked.into_iter().map(|(id, l)| self.lease_view(*id, l)).collect()
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
            opens_at_ms: self.opening.get(&id).copied(),
        }
    }
}
