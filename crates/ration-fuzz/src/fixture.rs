//! A small ledger with budgets, live leases and audit records, built once per
//! process: what converted requests are applied to and queries are asked of.

use std::sync::OnceLock;

use ration_core::audit::verify_chain;
use ration_core::{
    Acquire, AuditRecord, Batch, BudgetPath, BudgetSpec, ChainHead, ClientId, Command, Entry,
    FailPolicy, LeaseId, Ledger, LedgerConfig, LimitSpec, Op, Period, Principal, Release, Reply,
    Report, Request, Unit, Window,
};

/// Ledger time of the fixture's first entry (2025-11-28T14:30:45.123Z).
pub(crate) const T0: u64 = 1_764_340_245_123;

#[derive(Debug)]
pub(crate) struct Fixture {
    pub(crate) ledger: Ledger,
    pub(crate) audit: Vec<AuditRecord>,
    pub(crate) leases: Vec<LeaseId>,
}

pub(crate) fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build)
}

fn name<T: TryFrom<&'static str>>(s: &'static str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s).expect("fixture names are valid")
}

fn limit(unit: &'static str, cap: u64, window: Window, allowance: Option<u64>) -> LimitSpec {
    LimitSpec {
        unit: name::<Unit>(unit),
        cap,
        window,
        on_unreachable: allowance
            .map_or(FailPolicy::FailClosed, |amount| FailPolicy::StaticAllowance { amount }),
    }
}

fn build() -> Fixture {
    let day_ist = Window::with_offset(Period::Day, 330).expect("valid offset");
    let spec = |path: &'static str, limits: Vec<LimitSpec>| {
        Op::CreateBudget(BudgetSpec { path: name::<BudgetPath>(path), limits })
    };
    let acquire = |budget: &'static str, unit: &'static str, wanted: u64| {
        Op::Acquire(Acquire {
            budget: name(budget),
            unit: name(unit),
            wanted,
            min: 1,
            ttl_ms: 600_000,
        })
    };
    let mut id = 0u64;
    let mut req = |principal: &'static str, op: Op| {
        id = id.saturating_add(1);
        Command::Request(Request {
            // One client id per principal: a client id belongs to one principal.
            client: ClientId::new(format!("fixture-{principal}")).expect("fixture names are valid"),
            request_id: id,
            principal: name::<Principal>(principal),
            op,
        })
    };
    let first = vec![
        req(
            "admin",
            spec(
                "a",
                vec![
                    limit("t", 1000, Window::utc(Period::Minute), Some(10)),
                    limit("t", 100_000, Window::utc(Period::Lifetime), None),
                    limit("u", 50, day_ist, None),
                ],
            ),
        ),
        req("admin", spec("a/b", vec![limit("t", 400, Window::utc(Period::Hour), None)])),
        req("admin", spec("a/c", vec![])),
        req("admin", spec("a/b/d", vec![limit("u", 20, Window::utc(Period::Week), None)])),
        req("admin", spec("x", vec![limit("t", 5, Window::utc(Period::Month), None)])),
        // Roots that sort next to `a` and its subtree: "Z" < "a" < "a-b" < "a/b".
        req("admin", spec("Z", vec![])),
        req("admin", spec("a-b", vec![])),
        req("p0", acquire("a/b/d", "t", 100)),
        req("p1", acquire("a/c", "t", 50)),
        req("p0", acquire("a/b/d", "u", 7)),
        req("p1", acquire("x", "t", 5)),
    ];
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut audit = Vec::new();
    let applied = ledger.apply(1, &Entry::V1(Batch { time_ms: T0, commands: first }));
    let mut leases: Vec<LeaseId> = applied
        .outcomes
        .iter()
        .filter_map(|o| match o {
            Ok(Reply::Granted(g)) => Some(g.lease),
            _ => None,
        })
        .collect();
    assert_eq!(leases.len(), 4, "fixture grants: {:?}", applied.outcomes);
    audit.extend(applied.audit);
    let second = vec![
        req("p0", Op::Report(Report { lease: leases[0], consumed_delta: 30, renew_ttl_ms: None })),
        req("p1", Op::Release(Release { lease: leases[1], consumed_total: 20 })),
    ];
    let applied = ledger.apply(2, &Entry::V1(Batch { time_ms: T0 + 1_500, commands: second }));
    assert!(applied.outcomes.iter().all(Result::is_ok), "{:?}", applied.outcomes);
    audit.extend(applied.audit);
    leases.retain(|l| ledger.lease(*l).is_some());
    verify_chain(&audit, ChainHead::default()).expect("fixture audit chain verifies");
    ledger.check_invariants().expect("fixture invariants hold");
    Fixture { ledger, audit, leases }
}
