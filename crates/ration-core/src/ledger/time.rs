//! Time passing: leases expiring, expired leases forgotten, idle clients dropped.

use super::{About, ExpiredLease, Ledger};
use crate::audit::{AuditKind, AuditRecord, Flow};
use crate::names::LeaseId;

impl Ledger {
    pub(super) fn housekeep(&mut self, index: u64, audit: &mut Vec<AuditRecord>) {
        let now = self.now_ms;
        // Expiries and openings, in time order; at equal times expiries first (a
        // window's leases expire at its end, when the next window's leases open).
        loop {
            let expiring = self.expiry.first().copied().filter(|&(t, _)| t <= now);
            let opening = self.openings.first().copied().filter(|&(t, _)| t <= now);
            let (expires_at_ms, id) = match (expiring, opening) {
                (None, None) => break,
                (Some(e), Some(o)) if o.0 < e.0 => {
                    self.open(o.0, o.1);
                    continue;
                }
                (None, Some(o)) => {
                    self.open(o.0, o.1);
                    continue;
                }
                (Some(e), _) => e,
            };
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
            let spent = (lease.budget, &lease.unit, flow.charged);
            self.guard_spend(index, &lease.principal, audit, spent);
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
        self.dedup.expire(now, self.config.dedup_idle_ms, &mut self.principals);
        self.expire_instances(index, audit);
    }

    /// Lease `id`, acquired for the next window, opens at `at`: every counter whose
    /// window ends then moves to the next window, where the lease is counted.
    fn open(&mut self, at: u64, id: LeaseId) {
        self.openings.remove(&(at, id));
        self.opening.remove(&id);
        let counters = self.leases[&id].counters.clone();
        for r in counters.iter() {
            let Some(b) = self.budgets.get_mut(&r.budget) else { continue };
            if let Some(limit) = b.limits.iter_mut().find(|l| l.counter.id == r.counter) {
                limit.roll(at);
            }
        }
    }
}
