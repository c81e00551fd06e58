//! Money and visibility: the price book, budget options (alert thresholds and
//! shadow mode), recorded calls, burn rates and forecasts, and the webhook cursor.
//!
//! Thresholds and burn rates are computed in one place: every path that changes a
//! counter's spend (reports, releases, expiry charges, late refunds, overruns)
//! notes the counter (`note_spent`), and after every command (and after
//! housekeeping) [`Ledger::observe`] looks at each noted counter once.

use serde::{Deserialize, Serialize};

use super::{BudgetId, Ctx, Ledger};
use crate::audit::{AuditKind, AuditRecord, Balance, Cause, Detail};
use crate::command::{
    BudgetOptions, CallRecord, Outcome, Price, PriceSpec, Reply, MAX_MODELS, MAX_PRICE_VERSIONS,
};
use crate::error::LedgerError;
use crate::names::{BudgetPath, Principal, Unit};
use crate::window::Window;

/// Burn rates are measured over the last one to two buckets of this length.
pub const RATE_BUCKET_MS: u64 = 60_000;

/// One version of a model's price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceVersion {
    pub version: u32,
    pub effective_from_ms: u64,
    pub price: Price,
    /// Ledger time of the command that set it.
    pub set_at_ms: u64,
}

/// A budget's options as the ledger keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Options {
    /// Ascending.
    pub thresholds_pct: Vec<u32>,
    pub shadow: bool,
    /// Acquires its caps would have refused, since it was made shadow.
    pub would_refuse: u64,
}

/// A counter whose spend a command changed, and whose spend it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Spent {
    pub budget: BudgetId,
    pub counter: u64,
    pub principal: Principal,
}

/// What the ledger watches of one counter (kept in the counter): the spend it
/// last saw (to turn figures into deltas), the thresholds crossed in that window,
/// and the burn rate's two buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Watch {
    window_start_ms: u64,
    consumed: u64,
    /// How many of the budget's thresholds spend in this window has reached.
    crossed: u32,
    /// Index (`time / RATE_BUCKET_MS`) of the current bucket.
    bucket: u64,
    current: u64,
    previous: u64,
    /// When spend was first seen (rates are not measured from before it).
    since_ms: u64,
}

impl Watch {
    /// (spend, over how many ms) in the last one to two buckets as of `now_ms`.
    fn recent(&self, now_ms: u64) -> (u64, u64) {
        let now_bucket = now_ms / RATE_BUCKET_MS;
        let (amount, from_bucket) = if now_bucket == self.bucket {
            (self.previous.saturating_add(self.current), self.bucket.saturating_sub(1))
        } else if now_bucket == self.bucket.saturating_add(1) {
            (self.current, self.bucket)
        } else {
            (0, now_bucket.saturating_sub(1))
        };
        let from = from_bucket.saturating_mul(RATE_BUCKET_MS).max(self.since_ms);
        (amount, now_ms.saturating_sub(from))
    }

    fn add(&mut self, at_ms: u64, amount: u64) {
        let b = at_ms / RATE_BUCKET_MS;
        if b == self.bucket {
            self.current = self.current.saturating_add(amount);
        } else if b == self.bucket.saturating_add(1) {
            self.previous = self.current;
            self.current = amount;
            self.bucket = b;
        } else if b > self.bucket {
            self.previous = 0;
            self.current = amount;
            self.bucket = b;
        } else {
            // Ledger time never goes back; an expiry's effective time may be a
            // little earlier than now: count it in the current bucket.
            self.current = self.current.saturating_add(amount);
        }
    }
}

/// A limit's burn rate and projected exhaustion.
#[derive(Clone, Debug, PartialEq)]
pub struct Forecast {
    pub unit: Unit,
    pub window: Window,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub cap: u64,
    pub consumed: u64,
    /// Spend per second over the last 60 to 120 s of ledger time (since spend was
    /// first seen, if later), as gateways settle it.
    pub rate_per_s: f64,
    /// When spend reaches the cap at that rate; `None` if the rate is zero or the
    /// window ends first. Equal to now if it already has.
    pub exhausts_at_ms: Option<u64>,
}

/// The ledger's state for this module (the snapshot's seventh section).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Visibility {
    pub prices: std::collections::BTreeMap<String, Vec<PriceVersion>>,
    pub options: std::collections::BTreeMap<BudgetId, Options>,
    /// By counter id. Only in the snapshot: in memory each counter holds its own.
    pub watch: std::collections::BTreeMap<u64, Watch>,
    pub crossings_total: u64,
    pub shadow_refusals_total: u64,
    /// Notices (webhooks) are delivered for every audit record before this sequence
    /// number.
    pub notices_acked: u64,
}

impl Ledger {
    pub(super) fn set_price(&mut self, ctx: &mut Ctx<'_>, spec: &PriceSpec) -> Outcome {
        spec.validate()?;
        let now = self.now_ms;
        let effective_from_ms =
            if spec.effective_from_ms == 0 { now } else { spec.effective_from_ms };
        let versions = self.vis.prices.get(&spec.model);
        if versions.is_none() && self.vis.prices.len() >= MAX_MODELS {
            return Err(LedgerError::LedgerFull { what: "models".into(), max: MAX_MODELS as u64 });
        }
        let last = versions.and_then(|v| v.last());
        if let Some(last) = last {
            if effective_from_ms < last.effective_from_ms {
                return Err(LedgerError::InvalidArgument {
                    field: "effective_from_ms".into(),
                    reason: format!(
                        "{effective_from_ms} is before version {} of {} (in force from {}): \
                         versions take effect in order",
                        last.version, spec.model, last.effective_from_ms
                    ),
                });
            }
        }
        let version = last.map_or(1, |l| l.version.saturating_add(1));
        let v = PriceVersion { version, effective_from_ms, price: spec.price, set_at_ms: now };
        let list = self.vis.prices.entry(spec.model.clone()).or_default();
        list.push(v);
        if list.len() > MAX_PRICE_VERSIONS {
            list.remove(0);
        }
        let mut entry = self.base_entry(
            ctx.index,
            AuditKind::PriceSet,
            BudgetPath::new(super::LEDGER_PATH).expect("the ledger's path is valid"),
            ctx.principal.clone(),
            now,
        );
        entry.detail = Some(Detail::Price {
            model: spec.model.clone(),
            version,
            effective_from_ms,
            price: spec.price,
        });
        self.record(ctx.audit, entry);
        Ok(Reply::PriceSet { version, effective_from_ms })
    }

    pub(super) fn set_options(
        &mut self,
        ctx: &mut Ctx<'_>,
        path: &BudgetPath,
        options: &BudgetOptions,
    ) -> Outcome {
        options.validate()?;
        let id = self.budget_id(path)?;
        let now = self.now_ms;
        let was_shadow = self.vis.options.get(&id).is_some_and(|o| o.shadow);
        if was_shadow && !options.shadow {
            // Its caps must hold what its windows already hold, as if they had been
            // enforced: otherwise the ledger could not keep `used <= cap`.
            for l in &self.budgets[&id].limits {
                let (consumed, _, _) = l.effective(now);
                let in_use = consumed.saturating_add(l.counter.outstanding);
                if in_use > l.spec.cap.saturating_add(l.overruns(now))
                    || l.counter.upcoming > l.spec.cap
                {
                    return Err(LedgerError::InvalidArgument {
                        field: "shadow".into(),
                        reason: format!(
                            "{path} holds {in_use} {} per {} against a cap of {}: enforcing it \
                             now would break the cap; raise the cap or wait for the window to end",
                            l.spec.unit, l.spec.window, l.spec.cap
                        ),
                    });
                }
            }
        }
        let mut thresholds_pct = options.thresholds_pct.clone();
        thresholds_pct.sort_unstable();
        if thresholds_pct.is_empty() && !options.shadow {
            self.vis.options.remove(&id);
        } else {
            let o = self.vis.options.entry(id).or_default();
            if !o.shadow {
                o.would_refuse = 0;
            }
            o.thresholds_pct = thresholds_pct;
            o.shadow = options.shadow;
        }
        // Thresholds already reached in the current windows are not announced again.
        let thresholds = self.vis.options.get(&id).map(|o| o.thresholds_pct.clone());
        if let Some(b) = self.budgets.get_mut(&id) {
            for l in &mut b.limits {
                let cap = l.spec.cap;
                if let Some(w) = l.counter.watch.as_deref_mut() {
                    w.crossed = thresholds.as_ref().map_or(0, |t| level(t, w.consumed, cap));
                }
            }
        }
        let mut entry = self.base_entry(
            ctx.index,
            AuditKind::OptionsSet,
            path.clone(),
            ctx.principal.clone(),
            now,
        );
        entry.detail = Some(Detail::Options(options.clone()));
        self.record(ctx.audit, entry);
        Ok(Reply::OptionsSet)
    }

    pub(super) fn record_call(&mut self, ctx: &mut Ctx<'_>, call: &CallRecord) -> Outcome {
        crate::command::check_label("trace", &call.trace)?;
        call.usage.validate()?;
        self.budget_id(&call.budget)?;
        let mut entry = self.base_entry(
            ctx.index,
            AuditKind::CallRecorded,
            call.budget.clone(),
            ctx.principal.clone(),
            self.now_ms,
        );
        entry.detail = Some(Detail::Call { trace: call.trace.clone(), usage: call.usage.clone() });
        self.record(ctx.audit, entry);
        Ok(Reply::CallRecorded)
    }

    pub(super) fn ack_notices(&mut self, upto_seq: u64) -> Outcome {
        let upto = upto_seq.min(self.chain.next_seq);
        self.vis.notices_acked = self.vis.notices_acked.max(upto);
        Ok(Reply::NoticesAcked { acked_seq: self.vis.notices_acked })
    }

    /// Whether budget `id` is in shadow mode.
    pub(super) fn is_shadow(&self, id: BudgetId) -> bool {
        !self.vis.options.is_empty() && self.vis.options.get(&id).is_some_and(|o| o.shadow)
    }

    /// Records that a shadow budget's limit would have refused (or cut) a grant.
    pub(super) fn shadow_refusal(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: BudgetId,
        lease: crate::names::LeaseId,
        balance: Balance,
        granted: u64,
        available: u64,
    ) {
        if let Some(o) = self.vis.options.get_mut(&id) {
            o.would_refuse = o.would_refuse.saturating_add(1);
        }
        self.vis.shadow_refusals_total = self.vis.shadow_refusals_total.saturating_add(1);
        let mut entry = self.base_entry(
            ctx.index,
            AuditKind::ShadowRefusal,
            balance.budget.clone(),
            ctx.principal.clone(),
            self.now_ms,
        );
        entry.unit = Some(balance.unit.clone());
        entry.lease = Some(lease);
        entry.balances = vec![balance];
        entry.detail = Some(Detail::WouldRefuse { granted, available });
        self.record(ctx.audit, entry);
    }

    /// Notes that the spend of `counters` changed, by `principal`'s command.
    pub(super) fn note_spent(&mut self, counters: &[super::CounterRef], principal: &Principal) {
        for c in counters {
            self.spent.push(Spent {
                budget: c.budget,
                counter: c.counter,
                principal: principal.clone(),
            });
        }
    }

    /// Looks at each counter whose spend the command changed: moves its burn rate,
    /// and emits a `threshold_crossed` record for each threshold its spend reached.
    pub(super) fn observe(&mut self, index: u64, audit: &mut Vec<AuditRecord>) {
        if self.spent.is_empty() {
            return;
        }
        let mut spent = std::mem::take(&mut self.spent);
        for s in spent.drain(..) {
            self.watch_counter(index, audit, s);
        }
        self.spent = spent;
    }

    fn watch_counter(&mut self, index: u64, audit: &mut Vec<AuditRecord>, s: Spent) {
        let now = self.now_ms;
        let Some(b) = self.budgets.get_mut(&s.budget) else { return };
        let Some(limit) = b.limits.iter_mut().find(|l| l.counter.id == s.counter) else {
            return;
        };
        if !limit.counts_spend() {
            return;
        }
        let cap = limit.spec.cap;
        let c = &mut limit.counter;
        let (consumed, window_start_ms) = (c.consumed, c.window_start_ms);
        // The first spend seen is only a baseline: it holds spend from before
        // `since_ms`, which would inflate the rate.
        let first = c.watch.is_none();
        let w = c.watch.get_or_insert_with(|| {
            Box::new(Watch {
                window_start_ms,
                since_ms: now,
                bucket: now / RATE_BUCKET_MS,
                ..Watch::default()
            })
        });
        let delta = if w.window_start_ms == window_start_ms {
            consumed.saturating_sub(w.consumed)
        } else {
            w.window_start_ms = window_start_ms;
            w.crossed = 0;
            consumed
        };
        w.consumed = consumed;
        if !first {
            w.add(now, delta);
        }
        let Some(o) = self.vis.options.get(&s.budget) else { return };
        if o.thresholds_pct.is_empty() {
            return;
        }
        let reached = level(&o.thresholds_pct, consumed, cap);
        if reached <= w.crossed {
            return;
        }
        let from = w.crossed as usize;
        w.crossed = reached;
        let crossed: Vec<u32> =
            o.thresholds_pct.get(from..reached as usize).unwrap_or_default().to_vec();
        let balance = limit.balance(&b.path);
        for percent in crossed {
            self.vis.crossings_total = self.vis.crossings_total.saturating_add(1);
            let mut entry = self.base_entry(
                index,
                AuditKind::ThresholdCrossed,
                balance.budget.clone(),
                s.principal.clone(),
                now,
            );
            entry.unit = Some(balance.unit.clone());
            entry.balances = vec![balance.clone()];
            entry.detail = Some(Detail::Threshold { percent });
            self.record(audit, entry);
        }
    }

    /// The burn-rate state of every counter, by counter id (the snapshot's form).
    pub(super) fn watches(&self) -> std::collections::BTreeMap<u64, Watch> {
        self.budgets
            .values_any_order()
            .flat_map(|b| b.limits.iter())
            .filter_map(|l| l.counter.watch.as_ref().map(|w| (l.counter.id, (**w).clone())))
            .collect()
    }

    /// Gives each counter its burn-rate state from a snapshot; refuses one kept
    /// for a counter that does not exist.
    pub(super) fn restore_watches(
        &mut self,
        mut watches: std::collections::BTreeMap<u64, Watch>,
    ) -> Result<(), String> {
        for b in self.budgets.values_any_order_mut() {
            for l in &mut b.limits {
                l.counter.watch = watches.remove(&l.counter.id).map(Box::new);
            }
        }
        match watches.keys().next() {
            Some(c) => Err(format!("a burn rate is kept for counter {c}, which does not exist")),
            None => Ok(()),
        }
    }

    /// Options only on budgets that exist, watches only on counters that exist,
    /// price versions in order and within bounds.
    pub(super) fn check_visibility(&self) -> Result<(), String> {
        if let Some(id) = self.vis.options.keys().find(|id| !self.budgets.contains_key(id)) {
            return Err(format!("options held for budget id {id}, which does not exist"));
        }
        if !self.vis.watch.is_empty() {
            return Err("burn rates are kept outside their counters".into());
        }
        if self.vis.prices.len() > MAX_MODELS {
            return Err(format!("{} models in the price book", self.vis.prices.len()));
        }
        for (model, versions) in &self.vis.prices {
            if versions.is_empty() || versions.len() > MAX_PRICE_VERSIONS {
                return Err(format!("{model} has {} price versions", versions.len()));
            }
            if versions.windows(2).any(|w| {
                w[1].version <= w[0].version || w[1].effective_from_ms < w[0].effective_from_ms
            }) {
                return Err(format!("{model}'s price versions are out of order"));
            }
        }
        if self.vis.notices_acked > self.chain.next_seq {
            return Err(format!(
                "notices acknowledged up to {} but the audit chain ends at {}",
                self.vis.notices_acked, self.chain.next_seq
            ));
        }
        Ok(())
    }

    // ----- queries -----

    /// Every model's price versions (oldest first), in model order.
    pub fn prices(&self) -> impl Iterator<Item = (&str, &[PriceVersion])> {
        self.vis.prices.iter().map(|(m, v)| (m.as_str(), v.as_slice()))
    }

    /// The version of `model`'s price in force at ledger time `at_ms`.
    pub fn price_at(&self, model: &str, at_ms: u64) -> Option<&PriceVersion> {
        self.vis.prices.get(model)?.iter().rev().find(|v| v.effective_from_ms <= at_ms)
    }

    /// The highest threshold reached in the current window of limit `l` of budget `id`.
    pub(super) fn reached_pct(&self, id: BudgetId, l: &super::Limit) -> Option<u32> {
        let o = self.vis.options.get(&id)?;
        let w = l.counter.watch.as_ref()?;
        if w.window_start_ms != l.effective(self.now_ms).1 || w.crossed == 0 {
            return None;
        }
        o.thresholds_pct.get((w.crossed as usize).saturating_sub(1)).copied()
    }

    /// (thresholds crossed, shadow refusals) since the ledger began.
    pub fn visibility_totals(&self) -> (u64, u64) {
        (self.vis.crossings_total, self.vis.shadow_refusals_total)
    }

    /// The audit sequence number notices have been delivered up to.
    pub fn notices_acked(&self) -> u64 {
        self.vis.notices_acked
    }

    /// Burn rate and projected exhaustion of each of `path`'s limits, as of ledger
    /// time.
    pub fn forecast(&self, path: &BudgetPath) -> Result<Vec<Forecast>, LedgerError> {
        let id = self.budget_id(path)?;
        let now = self.now_ms;
        Ok(self.budgets[&id]
            .limits
            .iter()
            .map(|l| {
                let (consumed, start, end) = l.effective(now);
                let (amount, span) = l.counter.watch.as_ref().map_or((0, 0), |w| w.recent(now));
                let rate_per_s = if span == 0 { 0.0 } else { amount as f64 * 1000.0 / span as f64 };
                let remaining = l.spec.cap.saturating_sub(consumed);
                let exhausts_at_ms = if remaining == 0 {
                    Some(now)
                } else if rate_per_s > 0.0 {
                    let at = now as f64 + remaining as f64 * 1000.0 / rate_per_s;
                    (at < end as f64).then_some(at as u64)
                } else {
                    None
                };
                Forecast {
                    unit: l.spec.unit.clone(),
                    window: l.spec.window,
                    window_start_ms: start,
                    window_end_ms: end,
                    cap: l.spec.cap,
                    consumed,
                    rate_per_s,
                    exhausts_at_ms,
                }
            })
            .collect())
    }
}

/// How many of `thresholds` (ascending percentages) `consumed` reaches of `cap`.
fn level(thresholds: &[u32], consumed: u64, cap: u64) -> u32 {
    if consumed == 0 {
        return 0;
    }
    let spent = u128::from(consumed).saturating_mul(100);
    let reached = thresholds
        .iter()
        .take_while(|&&t| spent >= u128::from(t).saturating_mul(u128::from(cap)))
        .count();
    u32::try_from(reached).unwrap_or(u32::MAX)
}

/// The cause of what a request does, as its audit records carry it.
pub(super) fn cause_of(req: &crate::command::Request) -> Cause {
    let (trace, usage) = match &req.op {
        crate::command::Op::Annotated { note, .. } => (note.trace.clone(), note.usage.clone()),
        _ => (None, Vec::new()),
    };
    Cause { client: req.client.clone(), request_id: req.request_id, trace, usage }
}
