//! # ration-client
//!
//! The gateway SDK: [`Sdk`] admits or refuses each call from leased allowance with
//! no RPC ([`local`]), and keeps the allowances stocked in the background
//! ([`refill`]) through one `Batch` RPC per round ([`remote`]).

pub mod local;
pub mod pricing;
pub mod refill;
pub mod remote;
pub mod slot;

pub use pricing::{CallError, CallReservation, CallSpec, Charged, TokenUsage};
pub use refill::{Sdk, SdkConfig, Unreachable};
pub use remote::{Cluster, ClusterConfig, ClusterError, Connector};
pub use slot::{Slot, SlotError};

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

pub use local::{Allowance, CoarseClock, LocalClock, Reservation, Taken};

/// Names of the counters the SDK reports through the `metrics` facade; the gateway
/// installs whatever exporter it likes.
pub mod counters {
    pub const ADMITTED: &str = "ration_client_admitted_total";
    pub const DENIED: &str = "ration_client_denied_total";
    pub const REFILLS: &str = "ration_client_refill_rounds_total";
    pub const FAILOVERS: &str = "ration_client_unanswered_rounds_total";
    /// Outages begun: no member answered for `outage_after`; reserves became spendable.
    pub const OUTAGES: &str = "ration_client_outages_total";
    /// Keys put in quarantine: the ledger refused their acquires as invalid.
    pub const QUARANTINED: &str = "ration_client_quarantined_keys_total";
    /// Units calls used beyond what they reserved and the leases held: reported to
    /// the ledger as overruns.
    pub const OVERRUN_UNITS: &str = "ration_client_overrun_units_total";
    /// (budget, unit) pairs forgotten: nothing held them and they went unused
    /// for `SdkConfig::idle_after`; their leases went back to the ledger.
    pub const FORGOTTEN: &str = "ration_client_forgotten_keys_total";
    /// Emergency reserve acquires the ledger refused (RESOURCE_EXHAUSTED: most often
    /// not enough of the cap left for it), so a gateway cut off now would have less
    /// than its policy.
    pub const RESERVES_REFUSED: &str = "ration_client_reserves_refused_total";
}

/// A gateway's allowances by (budget path, unit), and its clock.
#[derive(Debug)]
pub struct Gateway {
    clock: Arc<CoarseClock>,
    allowances: RwLock<BTreeMap<(String, String), Arc<Allowance>>>,
}

/// A handle on one (budget, unit): the fast way to spend (no map lookup, and the
/// counters are registered once, not looked up per decision).
#[derive(Clone)]
pub struct Handle {
    allowance: Arc<Allowance>,
    clock: Arc<CoarseClock>,
    admitted: metrics::Counter,
    denied: metrics::Counter,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("allowance", &self.allowance).finish_non_exhaustive()
    }
}

impl Handle {
    /// Admits a call costing `amount` if the leases held cover it.
    #[inline]
    pub fn try_spend(&self, amount: u64) -> bool {
        let ok = self.allowance.try_spend(amount, self.clock.now_ms());
        if ok { &self.admitted } else { &self.denied }.increment(1);
        ok
    }

    pub fn allowance(&self) -> &Arc<Allowance> {
        &self.allowance
    }
}

/// Pre-resolved (budget, unit) pairs for calls that reserve on `N` of them at once,
/// as an LLM call does (prompt + max_tokens in tokens, its price in dollars): the
/// allowances and counters are looked up once, here, so [`Reserver::reserve`] and
/// [`Held::settle`] look nothing up by name and allocate nothing.
#[derive(Clone)]
pub struct Reserver<const N: usize> {
    allowances: [Arc<Allowance>; N],
    clock: Arc<CoarseClock>,
    admitted: metrics::Counter,
    denied: metrics::Counter,
    overrun: metrics::Counter,
}

impl<const N: usize> std::fmt::Debug for Reserver<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reserver").field("pairs", &N).finish_non_exhaustive()
    }
}

impl<const N: usize> Reserver<N> {
    /// Reserves `amounts[i]` on the i-th pair, all or nothing. Nothing is spent
    /// until [`Held::settle`]; dropping the result unsettled gives it all back.
    #[inline]
    pub fn reserve(&self, amounts: [u64; N]) -> Option<Held<'_, N>> {
        let now = self.clock.now_ms();
        let mut held =
            Held { by: self, taken: std::array::from_fn(|_| Taken::default()), settled: false };
        for (i, allowance) in self.allowances.iter().enumerate() {
            if !allowance.try_take_into(amounts[i], now, &mut held.taken[i]) {
                // `held` gives back what it took so far when dropped (this part
                // took nothing).
                self.denied.increment(1);
                return None;
            }
        }
        self.admitted.increment(1);
        Some(held)
    }
}

/// A reservation made by a [`Reserver`].
pub struct Held<'a, const N: usize> {
    by: &'a Reserver<N>,
    taken: [Taken; N],
    settled: bool,
}

impl<const N: usize> std::fmt::Debug for Held<'_, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reserved: [u64; N] = std::array::from_fn(|i| self.reserved(i));
        f.debug_struct("Held").field("reserved", &reserved).finish_non_exhaustive()
    }
}

impl<const N: usize> Held<'_, N> {
    /// Units reserved on the i-th pair.
    pub fn reserved(&self, i: usize) -> u64 {
        self.taken.get(i).map_or(0, Taken::units)
    }

    /// Keeps `used[i]` of the i-th reservation and gives the rest back, as
    /// [`Reservation::settle`] does: use beyond a reservation is taken from live
    /// leases as far as they hold it, and the rest recorded as an overrun that the
    /// SDK reports to the ledger. Nothing used is ever left out of the ledger.
    #[inline]
    pub fn settle(mut self, used: [u64; N]) {
        self.settled = true;
        for (i, allowance) in self.by.allowances.iter().enumerate() {
            let clock = &self.by.clock;
            let (_, over) = allowance.settle(&self.taken[i], used[i], || Some(clock.now_ms()));
            if over > 0 {
                self.by.overrun.increment(over);
            }
        }
    }
}

impl<const N: usize> Drop for Held<'_, N> {
    fn drop(&mut self) {
        if !self.settled {
            for (allowance, t) in self.by.allowances.iter().zip(&self.taken) {
                allowance.release(t, t.units());
            }
        }
    }
}

impl Gateway {
    pub fn new(clock: Arc<CoarseClock>) -> Self {
        Self { clock, allowances: RwLock::new(BTreeMap::new()) }
    }

    pub fn clock(&self) -> &Arc<CoarseClock> {
        &self.clock
    }

    /// The allowance for (budget, unit), created empty on first use.
    fn allowance(&self, budget: &str, unit: &str) -> Arc<Allowance> {
        let key = (budget.to_owned(), unit.to_owned());
        let found = self.allowances.read().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        match found {
            Some(a) => a,
            None => self
                .allowances
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_default()
                .clone(),
        }
    }

    /// Forgets (budget, unit) if nothing outside this map and the caller holds
    /// `allowance` (no handle, reserver or reservation): nothing can spend from it
    /// any more, and a later use creates a new, empty one. Returns whether it was
    /// forgotten.
    pub(crate) fn forget_unheld(&self, key: &(String, String), allowance: &Arc<Allowance>) -> bool {
        let mut map = self.allowances.write().unwrap_or_else(|p| p.into_inner());
        // Clones are made under the read lock, so under the write lock the count
        // is exact: one here, one the caller's.
        let unheld = map.get(key).is_some_and(|a| Arc::ptr_eq(a, allowance))
            && Arc::strong_count(allowance) == 2;
        if unheld {
            // The count is read relaxed: this makes everything the last holder did
            // before dropping its clone (a spend, an overrun) visible to the caller,
            // as `Arc::get_mut` does.
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            map.remove(key);
        }
        unheld
    }

    /// How many (budget, unit) pairs have an allowance.
    pub fn len(&self) -> usize {
        self.allowances.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no (budget, unit) pair has an allowance.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The handle for (budget, unit), created empty on first use.
    pub fn handle(&self, budget: &str, unit: &str) -> Handle {
        let allowance = self.allowance(budget, unit);
        Handle {
            allowance,
            clock: self.clock.clone(),
            admitted: metrics::counter!(counters::ADMITTED),
            denied: metrics::counter!(counters::DENIED),
        }
    }

    /// A [`Reserver`] for these (budget, unit) pairs, in order; each allowance is
    /// created empty on first use.
    pub fn reserver<const N: usize>(&self, pairs: [(&str, &str); N]) -> Reserver<N> {
        Reserver {
            allowances: pairs.map(|(b, u)| self.allowance(b, u)),
            clock: self.clock.clone(),
            admitted: metrics::counter!(counters::ADMITTED),
            denied: metrics::counter!(counters::DENIED),
            overrun: metrics::counter!(counters::OVERRUN_UNITS),
        }
    }

    /// Admits a call costing `amount` of `unit` on `budget`.
    pub fn try_spend(&self, budget: &str, unit: &str, amount: u64) -> bool {
        self.handle(budget, unit).try_spend(amount)
    }

    /// Reserves amounts on several (budget, unit) pairs at once, all or nothing: for
    /// an LLM call, prompt + max_tokens in tokens and its price in dollars.
    pub fn reserve(&self, wants: &[(&str, &str, u64)]) -> Option<Reservation> {
        let wants: Vec<(Arc<Allowance>, u64)> =
            wants.iter().map(|(b, u, n)| (self.allowance(b, u), *n)).collect();
        let clock: Arc<dyn LocalClock> = self.clock.clone();
        let r = Reservation::reserve(&wants, self.clock.now_ms()).map(|r| r.with_clock(clock));
        let name = if r.is_some() { counters::ADMITTED } else { counters::DENIED };
        metrics::counter!(name).increment(1);
        r
    }

    /// Makes a granted lease spendable: `units` until `ttl_ms - margin_ms` after
    /// `sent_at_ms` (this process's clock when the acquire was sent).
    pub fn install_lease(
        &self,
        budget: &str,
        unit: &str,
        units: u64,
        sent_at_ms: u64,
        ttl_ms: u64,
        margin_ms: u64,
    ) -> Option<local::SlotState> {
        let deadline = sent_at_ms.saturating_add(ttl_ms.saturating_sub(margin_ms));
        self.allowance(budget, unit).install(units, deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway with `tokens` on acme/search and `dollars` on acme, both live.
    fn gateway(tokens: u64, dollars: u64) -> Gateway {
        let clock = CoarseClock::new();
        clock.tick();
        let gw = Gateway::new(clock);
        gw.install_lease("acme/search", "tokens", tokens, 0, u64::MAX / 2, 0).unwrap();
        gw.install_lease("acme", "usd_micros", dollars, 0, u64::MAX / 2, 0).unwrap();
        gw
    }

    fn available(gw: &Gateway, budget: &str, unit: &str) -> u64 {
        gw.allowance(budget, unit).available(gw.clock().now_ms())
    }

    #[test]
    fn a_reserver_reserves_all_or_nothing_and_settles_as_a_reservation_does() {
        let gw = gateway(5000, 400);
        let r = gw.reserver([("acme/search", "tokens"), ("acme", "usd_micros")]);
        // Reserved, then settled below the reservation: the rest goes back.
        let held = r.reserve([4096, 300]).unwrap();
        assert_eq!((held.reserved(0), held.reserved(1)), (4096, 300));
        assert_eq!(available(&gw, "acme/search", "tokens"), 904);
        held.settle([1000, 80]);
        assert_eq!(available(&gw, "acme/search", "tokens"), 4000);
        assert_eq!(available(&gw, "acme", "usd_micros"), 320);
        // All or nothing: the dollars do not cover it, so no tokens stay taken.
        assert!(r.reserve([100, 321]).is_none());
        assert_eq!(available(&gw, "acme/search", "tokens"), 4000);
        // Dropped unsettled: everything goes back.
        drop(r.reserve([4000, 320]).unwrap());
        assert_eq!(available(&gw, "acme", "usd_micros"), 320);
        // Used beyond the reservation: taken from the leases as far as they hold,
        // the rest recorded as an overrun for the ledger; nothing left out.
        let held = r.reserve([10, 10]).unwrap();
        held.settle([20, 400]);
        assert_eq!(available(&gw, "acme/search", "tokens"), 3980);
        assert_eq!(available(&gw, "acme", "usd_micros"), 0);
        assert_eq!(gw.allowance("acme", "usd_micros").take_overruns(), 80);
    }
}
