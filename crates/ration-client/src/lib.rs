//! # ration-client
//!
//! The gateway SDK: [`Sdk`] admits or refuses each call from leased allowance with
//! no RPC ([`local`]), and keeps the allowances stocked in the background
//! ([`refill`]) through one `Batch` RPC per round ([`remote`]).

pub mod local;
pub mod refill;
pub mod remote;

pub use refill::{Sdk, SdkConfig, Unreachable};
pub use remote::{Cluster, ClusterConfig, ClusterError, Connector};

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
