//! Leases: acquiring, reporting on and releasing them (late ones too).

use super::{About, Budget, BudgetId, CounterRef, Counters, Ctx, Lease, Ledger};
use crate::audit::{AuditKind, Balance, Flow};
use crate::command::{
    check_amount, Acquire, Grant, Outcome, Overrun, Release, Reply, Report, MAX_AMOUNT,
};
use crate::error::LedgerError;
use crate::names::{LeaseId, Principal};
use crate::window::MAX_TIME_MS;

impl Ledger {
    /// Grants a lease on `a.budget`; with `starts_at`, one for the next window that
    /// opens then (see [`crate::AcquireNext`]).
    pub(super) fn acquire(
        &mut self,
        ctx: &mut Ctx<'_>,
        slot: usize,
        a: &Acquire,
        starts_at: Option<u64>,
    ) -> Outcome {
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
        if let Some(full) = self.principals.full(ctx.principal, super::Held::LiveLeases) {
            return Err(full);
        }
        let leaf = self.budget_id(&a.budget)?;
        let now = self.now_ms;
        let at_least = a.min.max(1);
        // A start ledger time has already reached is an ordinary acquire.
        let opens = starts_at.filter(|&s| s > now);
        if let Some(s) = opens {
            if s.saturating_sub(now) > self.config.max_lease_ttl_ms {
                return Err(invalid(
                    "starts_at_ms",
                    format!(
                        "{s} is more than the longest lease ({} ms) after ledger time {now}",
                        self.config.max_lease_ttl_ms
                    ),
                ));
            }
        }

        self.check_grants(leaf)?;
        // A run's runaway guards cap what one span grants (spend reaching one halts
        // the run: see `guard_spend`).
        let room = match self.guarded(leaf, &a.unit, at_least) {
            super::controls::Guarded::Room(room) => room,
            super::controls::Guarded::Full { guard, span_end_ms } => {
                return Err(LedgerError::GuardReached {
                    path: a.budget.clone(),
                    unit: guard.unit,
                    max: guard.max,
                    per_ms: guard.per_ms,
                    span_end_ms,
                })
            }
        };
        let run_end = self.run_end(leaf);
        // Decide, touching nothing: the grant is bounded by every limit in the unit on
        // the budget and its ancestors, and by each one's fair share.
        let mut grant = a.wanted.min(room);
        let mut window_end_ms = u64::MAX;
        // (budget, limit index, whether the lease draws on the limit's next window)
        let mut refs: Vec<(BudgetId, usize, bool)> = Vec::new();
        // Shadow limits: (budget, limit index, available), recorded if the grant
        // goes past what they had left.
        let mut shadowed: Vec<(BudgetId, usize, u64)> = Vec::new();
        let mut chain = Vec::new();
        let mut at = Some(leaf);
        while let Some(id) = at {
            let budget = &self.budgets[&id];
            chain.push(id);
            for (i, limit) in
                budget.limits.iter().enumerate().filter(|(_, l)| l.spec.unit == a.unit)
            {
                let (_, _, end) = limit.effective(now);
                // A lease for the next window opens exactly when a window it draws
                // on ends, and no earlier window ends before it opens.
                let next = match opens {
                    Some(s) if s > end => {
                        return Err(invalid(
                            "starts_at_ms",
                            format!(
                                "{s} is after the end ({end}) of the current {} window of {} \
                                 {}: a lease opens at the end of the current window",
                                limit.spec.window, budget.path, a.unit
                            ),
                        ))
                    }
                    Some(s) => s == end,
                    None => false,
                };
                let (available, holders, ends) = if next {
                    let next_end = limit.spec.window.bounds(end).1;
                    (limit.available_next(), &limit.counter.upcoming_holders, next_end)
                } else {
                    (limit.available(now), &limit.counter.holders, end)
                };
                if self.is_shadow(id) {
                    // Its caps refuse nothing and bound nothing (beyond keeping its
                    // figures under MAX_AMOUNT); what they would have refused is
                    // recorded.
                    let used = if next {
                        limit.counter.upcoming
                    } else {
                        limit.effective(now).0.saturating_add(limit.counter.outstanding)
                    };
                    let headroom = MAX_AMOUNT.saturating_sub(used);
                    if headroom < at_least {
                        return Err(LedgerError::Exhausted {
                            path: budget.path.clone(),
                            unit: a.unit.clone(),
                            window: limit.spec.window,
                            available: headroom,
                            min: at_least,
                        });
                    }
                    grant = grant.min(headroom);
                    shadowed.push((id, i, available));
                    window_end_ms = window_end_ms.min(ends);
                    refs.push((id, i, next));
                    continue;
                }
                if available < at_least {
                    return Err(LedgerError::Exhausted {
                        path: budget.path.clone(),
                        unit: a.unit.clone(),
                        window: limit.spec.window,
                        available,
                        min: at_least,
                    });
                }
                let sharers = (holders.len() as u64)
                    .saturating_add(u64::from(!holders.contains(ctx.principal)));
                let share = available.div_ceil(sharers);
                grant = grant.min(a.wanted.min(share).max(at_least).min(available));
                window_end_ms = window_end_ms.min(ends);
                refs.push((id, i, next));
            }
            at = budget.parent;
        }
        if refs.is_empty() {
            return Err(LedgerError::NoLimitForUnit {
                path: a.budget.clone(),
                unit: a.unit.clone(),
            });
        }

        // Leases expire by the end of ledger time at the latest, and by a run's end.
        let expires_at_ms = now
            .saturating_add(a.ttl_ms)
            .min(window_end_ms)
            .min(MAX_TIME_MS)
            .min(run_end.unwrap_or(u64::MAX));
        if expires_at_ms <= now {
            return Err(invalid(
                "ttl_ms",
                format!("ledger time is at its end ({MAX_TIME_MS}): no lease can be granted"),
            ));
        }
        if let Some(s) = opens.filter(|&s| expires_at_ms <= s) {
            return Err(invalid(
                "ttl_ms",
                format!("{} would expire the lease before it opens at {s}", a.ttl_ms),
            ));
        }

        // Commit.
        let lease_id = LeaseId::from_position(ctx.index, slot);
        for (id, i, available) in shadowed.into_iter().filter(|s| s.2 < grant) {
            let b = &self.budgets[&id];
            let balance = b.limits[i].balance(&b.path);
            self.shadow_refusal(ctx, id, lease_id, balance, grant, available);
        }
        let mut counters = Counters::default();
        let mut balances = Vec::with_capacity(refs.len());
        // One lookup per budget up the chain: `refs` is in chain order. The lease
        // keeps the budget's own copy of its path and the limit's of its unit
        // (equal to the request's), not one more copy each.
        let (mut path, mut unit) = (None, None);
        let mut refs = refs.iter().peekable();
        for &id in &chain {
            let budget = self.budget_mut(id);
            budget.live_leases = budget.live_leases.saturating_add(1);
            path.get_or_insert_with(|| budget.path.clone());
            while let Some(&(_, i, next)) = refs.next_if(|r| r.0 == id) {
                let limit = &mut budget.limits[i];
                limit.roll(now);
                let c = &mut limit.counter;
                let (outstanding, holders) = if next {
                    (&mut c.upcoming, &mut c.upcoming_holders)
                } else {
                    (&mut c.outstanding, &mut c.holders)
                };
                *outstanding =
                    outstanding.checked_add(grant).expect("invariant: outstanding <= cap");
                holders.add(ctx.principal);
                counters.push(CounterRef { budget: id, counter: c.id });
                unit.get_or_insert_with(|| limit.spec.unit.clone());
                balances.push(if next {
                    limit.upcoming_balance(&budget.path)
                } else {
                    limit.balance(&budget.path)
                });
            }
        }
        assert!(refs.next().is_none(), "invariant: a grant's limits are on its budget's chain");
        self.count_guarded(leaf, &a.unit, grant, false);
        self.principals.change(ctx.principal, |u| u.live_leases = u.live_leases.saturating_add(1));
        self.leases.insert(
            lease_id,
            Lease {
                principal: ctx.principal.clone(),
                budget: leaf,
                path: path.unwrap_or_else(|| a.budget.clone()),
                unit: unit.unwrap_or_else(|| a.unit.clone()),
                granted: grant,
                reported: 0,
                acquired_ms: now,
                expires_at_ms,
                window_end_ms,
                counters,
            },
        );
        self.expiry.insert((expires_at_ms, lease_id));
        if let Some(s) = opens {
            self.opening.insert(lease_id, s);
            self.openings.insert((s, lease_id));
        }
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

    /// Whether lease `id` (live, or expired and remembered) is another principal's.
    /// Final once true: a lease's principal never changes.
    pub fn owned_by_another(&self, id: LeaseId, principal: &Principal) -> bool {
        match self.leases.get(&id) {
            Some(l) => &l.principal != principal,
            None => self.expired.get(&id).is_some_and(|e| &e.principal != principal),
        }
    }

    /// The live lease `id` of `principal`, or why not.
    fn live_lease(&self, id: LeaseId, principal: &Principal) -> Result<&Lease, LedgerError> {
        if self.owned_by_another(id, principal) {
            return Err(LedgerError::ForeignLease { lease: id });
        }
        match self.leases.get(&id) {
            Some(l) => Ok(l),
            None if self.expired.contains_key(&id) => Err(LedgerError::LeaseExpired { lease: id }),
            None => Err(LedgerError::LeaseNotFound { lease: id }),
        }
    }

    pub(super) fn report(&mut self, ctx: &mut Ctx<'_>, r: &Report) -> Outcome {
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
        self.check_open(r.lease, "consumed_delta", r.consumed_delta)?;
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
            Some(ttl) => {
                old_expiry.max(now.saturating_add(ttl).min(lease.window_end_ms).min(MAX_TIME_MS))
            }
            None => old_expiry,
        };
        let granted = lease.granted;
        let (path, unit, leaf) = (lease.path.clone(), lease.unit.clone(), lease.budget);
        // Copied out of the lease while the counters change: up to three are kept in
        // the lease (`Counters`), so this allocates only for deeper chains.
        let counters = lease.counters.clone();
        let delta = r.consumed_delta;
        if delta > 0 {
            self.note_spent(&counters, ctx.principal);
        }
        let balances = self.update_counters(&counters, |spec, counter| {
            // Units in flight come back as they are spent: nothing is consumed.
            if super::counts_spend(spec) {
                counter.consumed =
                    counter.consumed.checked_add(delta).expect("invariant: consumed <= cap");
            }
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
        self.guard_spend(ctx.index, ctx.principal, ctx.audit, (leaf, &unit, delta));
        Ok(Reply::Reported {
            lease: r.lease,
            unreported: granted.saturating_sub(reported),
            expires_at_ms: new_expiry,
        })
    }

    pub(super) fn release(&mut self, ctx: &mut Ctx<'_>, r: &Release) -> Outcome {
        check_amount("consumed_total", r.consumed_total)?;
        match self.live_lease(r.lease, ctx.principal) {
            Ok(lease) => {
                check_total(r.lease, lease.granted, lease.reported, r.consumed_total)?;
                self.check_open(r.lease, "consumed_total", r.consumed_total)?;
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
                let spent = (lease.budget, &lease.unit, flow.consumed);
                self.guard_spend(ctx.index, ctx.principal, ctx.audit, spent);
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
        // Each limit still in the window the lease expired in gets the unspent part
        // of the charge back: all of them before the lease's window ends; after it,
        // those with longer windows (a month above a minute), so their figures stay
        // what gateways really spent. A limit's window is still that one while it
        // started before the lease's window end (the lease expired by then).
        let refund = e.granted.saturating_sub(r.consumed_total);
        let open: Vec<CounterRef> = e
            .counters
            .iter()
            .copied()
            .filter(|c| {
                self.budgets
                    .get(&c.budget)
                    .and_then(|b| b.limits.iter().find(|l| l.counter.id == c.counter))
                    .is_some_and(|l| l.counts_spend() && l.effective(now).1 < e.window_end_ms)
            })
            .collect();
        let (kind, flow, balances) = if !open.is_empty() {
            self.note_spent(&open, ctx.principal);
            let balances = self.update_counters(&open, |_, counter| {
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

    pub(super) fn overrun(&mut self, ctx: &mut Ctx<'_>, o: &Overrun) -> Outcome {
        check_amount("amount", o.amount)?;
        if o.amount == 0 {
            return Err(invalid("amount", "must be at least 1".into()));
        }
        let leaf = self.budget_id(&o.budget)?;
        let now = self.now_ms;
        // Decide, touching nothing: every limit in the unit up the chain takes it.
        let mut refs: Vec<(BudgetId, usize)> = Vec::new();
        let mut at = Some(leaf);
        while let Some(id) = at {
            let budget = &self.budgets[&id];
            // An overrun is spend: a limit on units in flight does not count it.
            for (i, limit) in budget
                .limits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.spec.unit == o.unit && l.counts_spend())
            {
                let (consumed, _, _) = limit.effective(now);
                // Overruns pile up only until an operator notices; keep every sum
                // far from overflowing.
                let room = MAX_CONSUMED.saturating_sub(consumed);
                if o.amount > room {
                    return Err(LedgerError::AmountTooLarge {
                        field: "amount".into(),
                        value: o.amount,
                        max: room,
                    });
                }
                refs.push((id, i));
            }
            at = budget.parent;
        }
        if refs.is_empty() {
            return Err(LedgerError::NoLimitForUnit {
                path: o.budget.clone(),
                unit: o.unit.clone(),
            });
        }
        let mut balances = Vec::with_capacity(refs.len());
        let mut over_cap = false;
        for &(id, i) in &refs {
            let counter = self.budgets[&id].limits[i].counter.id;
            self.note_spent(&[CounterRef { budget: id, counter }], ctx.principal);
            let budget = self.budget_mut(id);
            let limit = &mut budget.limits[i];
            limit.roll(now);
            let c = &mut limit.counter;
            c.consumed = c.consumed.checked_add(o.amount).expect("checked against MAX_CONSUMED");
            c.overruns = c.overruns.checked_add(o.amount).expect("overruns <= consumed");
            over_cap |= c.consumed.saturating_add(c.outstanding) > limit.spec.cap;
            balances.push(limit.balance(&budget.path));
        }
        let mut entry = self.base_entry(
            ctx.index,
            AuditKind::Overrun,
            o.budget.clone(),
            ctx.principal.clone(),
            now,
        );
        entry.unit = Some(o.unit.clone());
        entry.flow = Flow { consumed: o.amount, ..Flow::default() };
        entry.balances = balances;
        self.record(ctx.audit, entry);
        self.touch_instance(leaf);
        self.guard_spend(ctx.index, ctx.principal, ctx.audit, (leaf, &o.unit, o.amount));
        Ok(Reply::OverrunRecorded { recorded: o.amount, over_cap })
    }

    /// Takes a live lease out: `consumed` more is settled and the rest of its
    /// outstanding allowance leaves the counters.
    /// Returns the lease and the balances after the change.
    pub(super) fn detach(&mut self, id: LeaseId, consumed: u64) -> (Lease, Vec<Balance>) {
        let lease = self.leases.remove(&id).expect("caller checked the lease is live");
        self.principals
            .change(&lease.principal, |u| u.live_leases = u.live_leases.saturating_sub(1));
        self.expiry.remove(&(lease.expires_at_ms, id));
        let opens = self.opening.remove(&id);
        if let Some(s) = opens {
            self.openings.remove(&(s, id));
            assert_eq!(consumed, 0, "invariant: nothing is spent from a lease before it opens");
        }
        let unsettled =
            lease.granted.checked_sub(lease.reported).expect("invariant: reported <= granted");
        let mut balances = Vec::with_capacity(lease.counters.len());
        let settle = |b: &mut Budget, r: &CounterRef, balances: &mut Vec<Balance>| {
            let Some(limit) = b.limits.iter_mut().find(|l| l.counter.id == r.counter) else {
                return; // its limit was replaced by an update
            };
            let counter = &mut limit.counter;
            let next = opens.is_some_and(|s| s >= counter.window_end_ms);
            let (outstanding, holders) = if next {
                (&mut counter.upcoming, &mut counter.upcoming_holders)
            } else {
                (&mut counter.outstanding, &mut counter.holders)
            };
            *outstanding = outstanding
                .checked_sub(unsettled)
                .expect("invariant: outstanding covers the lease");
            assert!(
                holders.remove_one(&lease.principal),
                "invariant: a live lease's holder is counted"
            );
            if super::counts_spend(&limit.spec) {
                counter.consumed =
                    counter.consumed.checked_add(consumed).expect("invariant: consumed <= cap");
            }
            balances.push(if next {
                limit.upcoming_balance(&b.path)
            } else {
                limit.balance(&b.path)
            });
        };
        // One lookup per budget up the chain: a lease's counters are in chain order.
        let mut rest = lease.counters.iter().peekable();
        let mut at = Some(lease.budget);
        while let Some(id) = at {
            let b = self.budgets.get_mut(&id).expect("invariant: budget ids in use resolve");
            b.live_leases = b.live_leases.checked_sub(1).expect("invariant: live lease count");
            while let Some(r) = rest.next_if(|r| r.budget == id) {
                settle(b, r, &mut balances);
            }
            at = b.parent;
        }
        // Acquire makes none out of chain order; settled one by one if one were.
        for r in rest {
            if let Some(b) = self.budgets.get_mut(&r.budget) {
                settle(b, r, &mut balances);
            }
        }
        self.touch_instance(lease.budget);
        if consumed > 0 {
            self.note_spent(&lease.counters, &lease.principal);
        }
        (lease, balances)
    }
}

impl Ledger {
    /// Refuses spending `amount` (named `field`) from lease `id` before it opens.
    fn check_open(&self, id: LeaseId, field: &str, amount: u64) -> Result<(), LedgerError> {
        match self.opening.get(&id) {
            Some(opens) if amount > 0 => Err(invalid(
                field,
                format!(
                    "lease {id} opens at {opens} (ledger time is {}): nothing can be spent from \
                     it before",
                    self.now_ms
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Most a limit may count as consumed in one window, overruns included: four times
/// [`MAX_AMOUNT`], so sums of a few such figures stay far from `u64::MAX`.
const MAX_CONSUMED: u64 = 4 * MAX_AMOUNT;

fn invalid(field: &str, reason: String) -> LedgerError {
    LedgerError::InvalidArgument { field: field.into(), reason }
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
