//! Audit records: building them, adding their flows to the totals, chaining them.

use super::{About, BudgetId, CounterRef, Ctx, Ledger};
use crate::audit::{AuditEntry, AuditKind, AuditRecord, Balance, Flow, GENESIS};
use crate::names::{BudgetPath, Principal};

impl Ledger {
    pub(super) fn base_entry(
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
            cause: None,
            detail: None,
        }
    }

    pub(super) fn emit_budget(&mut self, ctx: &mut Ctx<'_>, kind: AuditKind, id: BudgetId) {
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
    pub(super) fn lease_entry(
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
    pub(super) fn record(&mut self, audit: &mut Vec<AuditRecord>, entry: AuditEntry) {
        self.totals.add_record(entry.kind, &entry.flow);
        let mut entry = entry;
        if entry.cause.is_none() {
            entry.cause.clone_from(&self.cause);
        }
        audit.push(self.chain.seal(entry));
    }

    pub(super) fn balances(&self, counters: &[CounterRef]) -> Vec<Balance> {
        counters
            .iter()
            .filter_map(|c| {
                let b = self.budgets.get(&c.budget)?;
                let limit = b.limits.iter().find(|l| l.counter.id == c.counter)?;
                Some(limit.balance(&b.path))
            })
            .collect()
    }
}
