//! Limits per principal: what one principal may make every replica hold.
//!
//! The ledger's own limits (`LedgerConfig`) bound the whole table; these bound one
//! principal's share of it, so one client (or one stolen credential) cannot fill the
//! exactly-once table, the live leases or the budgets for everyone. They are checked
//! before anything is remembered or created, refuse with
//! [`LedgerError::PrincipalLimit`] (RESOURCE_EXHAUSTED), and are replicated
//! configuration: [`crate::Op::SetLimits`] changes them as an audited command.
//!
//! What counts against a principal:
//! - **clients**: client ids in the exactly-once table whose first request declared
//!   it (a client id is counted against the principal it first came with);
//! - **outcomes**: results remembered for those clients;
//! - **live leases** it holds;
//! - **budgets** it created that still exist.
//!
//! Lowering a limit below what a principal holds refuses its new requests of that
//! kind until it drops under the limit (clients idle for `dedup_idle_ms` are
//! forgotten, leases settle or expire, budgets are deleted); nothing is evicted.
//! `SetLimits` itself is never refused by them, so an operator they hold can still
//! raise them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{BudgetId, Ctx, Ledger};
use crate::audit::AuditKind;
use crate::command::{FailPolicy, LimitSpec, Outcome, Reply};
use crate::error::LedgerError;
use crate::names::{BudgetPath, Principal, Unit};
use crate::window::{Period, Window};

/// The budget path of the audit records of changes to the ledger's own settings.
/// No budget may be created under it.
pub const LEDGER_PATH: &str = "_ration";

/// The most any per-principal limit may be set to.
pub const MAX_PRINCIPAL_LIMIT: u64 = 1_000_000_000;

/// Per-principal limits. Replicated; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalLimits {
    /// Client ids in the exactly-once table counted against one principal.
    pub clients: u64,
    /// Results remembered for those clients, in all.
    pub outcomes: u64,
    /// Live leases one principal holds.
    pub live_leases: u64,
    /// Budgets one principal created that still exist.
    pub budgets: u64,
}

impl Default for PrincipalLimits {
    fn default() -> Self {
        Self { clients: 100_000, outcomes: 4_194_304, live_leases: 1_000_000, budgets: 1_000_000 }
    }
}

impl PrincipalLimits {
    /// Each limit is in 1..=[`MAX_PRINCIPAL_LIMIT`].
    pub fn validate(&self) -> Result<(), LedgerError> {
        for (name, value) in self.named() {
            if value == 0 || value > MAX_PRINCIPAL_LIMIT {
                return Err(LedgerError::InvalidArgument {
                    field: format!("limits.{name}"),
                    reason: format!("{value} is outside 1..={MAX_PRINCIPAL_LIMIT}"),
                });
            }
        }
        Ok(())
    }

    /// (name, value) of each limit, in a fixed order; the names the API and the
    /// audit records use.
    pub fn named(&self) -> [(&'static str, u64); 4] {
        [
            ("clients", self.clients),
            ("outcomes", self.outcomes),
            ("live_leases", self.live_leases),
            ("budgets", self.budgets),
        ]
    }
}

/// One of the four things a principal's limits count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    Clients,
    Outcomes,
    LiveLeases,
    Budgets,
}

impl Held {
    pub const ALL: [Held; 4] = [Held::Clients, Held::Outcomes, Held::LiveLeases, Held::Budgets];

    /// As the API, the metrics and the audit records name it (`live_leases`).
    pub fn name(self) -> &'static str {
        match self {
            Held::Clients => "clients",
            Held::Outcomes => "outcomes",
            Held::LiveLeases => "live_leases",
            Held::Budgets => "budgets",
        }
    }

    /// As a refusal's message says it (`live leases`).
    pub fn phrase(self) -> &'static str {
        match self {
            Held::LiveLeases => "live leases",
            other => other.name(),
        }
    }
}

/// What one principal holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrincipalUsage {
    pub clients: u64,
    pub outcomes: u64,
    pub live_leases: u64,
    pub budgets: u64,
}

impl PrincipalUsage {
    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// The per-principal state: the limits, who created each budget, and (derived)
/// what each principal holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Principals {
    pub(super) limits: PrincipalLimits,
    /// The principal that created each budget still present.
    pub(super) creators: BTreeMap<BudgetId, Principal>,
    /// Derived (rebuilt on restore): usage per principal; principals holding
    /// nothing are absent, so the map is bounded by what the ledger holds.
    pub(super) usage: crate::index::HashIndex<Principal, PrincipalUsage>,
}

impl Principals {
    /// The ledger's own copy of `p`, if it holds anything. A request acts through
    /// it, so what the request stores (a lease's principal, a counter's holder, a
    /// client's owner) shares it, and later comparisons with it do not read the
    /// text (a cache miss per comparison at a million budgets).
    pub(crate) fn canonical(&self, p: &Principal) -> Option<&Principal> {
        self.usage.get_key_value(p).map(|(k, _)| k)
    }

    pub(super) fn usage(&self, p: &Principal) -> PrincipalUsage {
        self.usage.get(p).copied().unwrap_or_default()
    }

    /// Changes `p`'s usage; drops its entry when it holds nothing.
    pub(crate) fn change(&mut self, p: &Principal, f: impl FnOnce(&mut PrincipalUsage)) {
        let u = match self.usage.get_mut(p) {
            Some(u) => u,
            None => self.usage.entry(p.clone()).or_default(),
        };
        f(u);
        if u.is_zero() {
            self.usage.remove(p);
        }
    }

    pub(super) fn full(&self, p: &Principal, what: Held) -> Option<LedgerError> {
        let u = self.usage(p);
        let l = &self.limits;
        let (held, max) = match what {
            Held::Clients => (u.clients, l.clients),
            Held::Outcomes => (u.outcomes, l.outcomes),
            Held::LiveLeases => (u.live_leases, l.live_leases),
            Held::Budgets => (u.budgets, l.budgets),
        };
        (held >= max).then(|| LedgerError::PrincipalLimit {
            principal: p.to_string(),
            what: what.phrase().to_owned(),
            max,
        })
    }
}

impl Ledger {
    /// The per-principal limits in force.
    pub fn principal_limits(&self) -> PrincipalLimits {
        self.principals.limits
    }

    /// What `principal` holds now, counted against its limits.
    pub fn principal_usage(&self, principal: &Principal) -> PrincipalUsage {
        self.principals.usage(principal)
    }

    /// Principals holding the most of anything, most first (at most `n`): for
    /// operators looking for who fills the ledger.
    pub fn top_principals(&self, n: usize) -> Vec<(Principal, PrincipalUsage)> {
        let mut all: Vec<(Principal, PrincipalUsage)> =
            self.principals.usage.values_any_order_keyed().map(|(p, u)| (p.clone(), *u)).collect();
        let weight = |u: &PrincipalUsage| {
            let l = &self.principals.limits;
            // The fullest of the four, as a fraction of its limit (in millionths).
            [
                (u.clients, l.clients),
                (u.outcomes, l.outcomes),
                (u.live_leases, l.live_leases),
                (u.budgets, l.budgets),
            ]
            .iter()
            .map(|(held, max)| {
                u128::from(*held)
                    .saturating_mul(1_000_000)
                    .checked_div(u128::from(*max))
                    .unwrap_or(u128::MAX)
            })
            .max()
            .unwrap_or(0)
        };
        all.sort_by(|a, b| weight(&b.1).cmp(&weight(&a.1)).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    pub(super) fn set_limits(&mut self, ctx: &mut Ctx<'_>, limits: &PrincipalLimits) -> Outcome {
        limits.validate()?;
        self.principals.limits = *limits;
        let path = BudgetPath::new(LEDGER_PATH).expect("the ledger's own path is valid");
        let mut entry = self.base_entry(
            ctx.index,
            AuditKind::LimitsChanged,
            path,
            ctx.principal.clone(),
            self.now_ms,
        );
        // The new limits, one per name, as lifetime "limits" in the record.
        entry.limits = limits
            .named()
            .iter()
            .map(|(name, value)| LimitSpec {
                unit: Unit::new(*name).expect("limit names are valid units"),
                cap: *value,
                window: Window::utc(Period::Lifetime),
                on_unreachable: FailPolicy::FailClosed,
            })
            .collect();
        self.record(ctx.audit, entry);
        Ok(Reply::LimitsSet)
    }
}
