#![allow(clippy::arithmetic_side_effects)]

use super::*;
use crate::audit::{spend, AuditFilter, AuditKind, AuditLog};
use crate::command::{
    Acquire, Batch, BudgetSpec, FailPolicy, Grant, Release, Report, Role, RoleGrant, Scope,
    MAX_AMOUNT,
};
use crate::names::ClientId;
use crate::window::{Period, Window};

const T0: u64 = 1_764_340_245_123; // 2025-11-28T14:30:45.123Z
const MIN: u64 = 60_000;

/// Drives a ledger one command per entry, keeping the audit log alongside.
struct H {
    ledger: Ledger,
    log: AuditLog,
    index: u64,
    request: u64,
    now: u64,
}

fn path(p: &str) -> BudgetPath {
    BudgetPath::new(p).unwrap()
}

fn unit(u: &str) -> Unit {
    Unit::new(u).unwrap()
}

fn who(p: &str) -> Principal {
    Principal::new(p).unwrap()
}

fn limit(u: &str, cap: u64, period: Period) -> LimitSpec {
    LimitSpec {
        unit: unit(u),
        cap,
        window: Window::utc(period),
        on_unreachable: FailPolicy::FailClosed,
    }
}

fn spec(p: &str, limits: Vec<LimitSpec>) -> BudgetSpec {
    BudgetSpec { path: path(p), limits }
}

fn acquire(p: &str, wanted: u64, min: u64, ttl_ms: u64) -> Op {
    Op::Acquire(Acquire { budget: path(p), unit: unit("tokens"), wanted, min, ttl_ms })
}

impl H {
    fn new() -> Self {
        Self { ledger: Ledger::default(), log: AuditLog::new(), index: 0, request: 0, now: T0 }
    }

    fn entry(&mut self, commands: Vec<Command>) -> Vec<Outcome> {
        self.index += 1;
        let applied =
            self.ledger.apply(self.index, &Entry::V1(Batch { time_ms: self.now, commands }));
        self.log.append(applied.audit).expect("records continue the chain");
        self.ledger.check_invariants().expect("invariants hold");
        applied.outcomes
    }

    fn req(&mut self, principal: &str, op: Op) -> Request {
        self.request += 1;
        Request {
            client: ClientId::new(format!("{principal}-client")).unwrap(),
            request_id: self.request,
            principal: who(principal),
            op,
        }
    }

    fn run(&mut self, principal: &str, op: Op) -> Outcome {
        let r = self.req(principal, op);
        self.entry(vec![Command::Request(r)]).remove(0)
    }

    fn ok(&mut self, principal: &str, op: Op) -> Reply {
        self.run(principal, op).expect("command succeeds")
    }

    fn grant(&mut self, principal: &str, op: Op) -> Grant {
        match self.ok(principal, op) {
            Reply::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    fn tick(&mut self, advance_ms: u64) {
        self.now += advance_ms;
        self.entry(vec![Command::Tick]);
    }

    fn usage(&self, p: &str) -> (u64, u64) {
        let v = self.ledger.budget(&path(p)).unwrap();
        (v.limits[0].consumed, v.limits[0].outstanding)
    }

    /// acme (1000/month) > acme/search (500/day) > acme/search/key-7 (300/minute).
    fn tree() -> Self {
        let mut h = Self::new();
        h.ok("ops", Op::CreateBudget(spec("acme", vec![limit("tokens", 1000, Period::Month)])));
        h.ok("ops", Op::CreateBudget(spec("acme/search", vec![limit("tokens", 500, Period::Day)])));
        h.ok(
            "ops",
            Op::CreateBudget(spec("acme/search/key-7", vec![limit("tokens", 300, Period::Minute)])),
        );
        h
    }
}

#[test]
fn acquire_debits_every_ancestor_in_one_entry() {
    let mut h = H::tree();
    let before = h.log.len();
    let g = h.grant("gw-1", acquire("acme/search/key-7", 100, 1, 10_000));
    assert_eq!(g.granted, 100);
    assert_eq!(g.expires_at_ms, T0 + 10_000);
    assert_eq!(g.ttl_ms, 10_000);
    for p in ["acme", "acme/search", "acme/search/key-7"] {
        assert_eq!(h.usage(p), (0, 100), "{p}");
    }
    // One record, with the balances of all three limits.
    assert_eq!(h.log.len(), before + 1);
    let rec = &h.log.records()[before];
    assert_eq!(rec.entry.kind, AuditKind::LeaseGranted);
    assert_eq!(rec.entry.balances.len(), 3);
    assert!(rec.entry.balances.iter().all(|b| b.outstanding == 100));

    h.ok("gw-1", Op::Report(Report { lease: g.lease, consumed_delta: 30, renew_ttl_ms: None }));
    assert_eq!(h.usage("acme"), (30, 70));
    let r = h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 45 }));
    assert_eq!(r, Reply::Released { lease: g.lease, returned: 55, refunded: 0, late: false });
    for p in ["acme", "acme/search", "acme/search/key-7"] {
        assert_eq!(h.usage(p), (45, 0), "{p}");
    }
    assert_eq!(h.ledger.budget(&path("acme")).unwrap().live_leases, 0);
}

#[test]
fn the_tightest_ancestor_bounds_the_grant() {
    let mut h = H::tree();
    // key-7 allows 300 a minute but search only 500 a day: spend 450 of search first.
    let g = h.grant("gw-1", acquire("acme/search", 450, 450, 10_000));
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 450 }));
    let g = h.grant("gw-1", acquire("acme/search/key-7", 300, 1, 10_000));
    assert_eq!(g.granted, 50);
    let err = h.run("gw-2", acquire("acme/search/key-7", 10, 1, 10_000)).unwrap_err();
    assert!(
        matches!(&err, LedgerError::Exhausted { path: p, available: 0, .. } if p.as_str() == "acme/search"),
        "{err}"
    );
    assert_eq!(err.kind(), crate::error::ErrorKind::ResourceExhausted);
}

#[test]
fn scarce_allowance_is_shared_fairly() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Lifetime)])));
    // Alone, a gateway may take everything.
    let a = h.grant("gw-a", acquire("t", 60, 1, 10_000));
    assert_eq!(a.granted, 60);
    // A second gateway asking for all that is left gets its fair share: half.
    let b = h.grant("gw-b", acquire("t", 40, 1, 10_000));
    assert_eq!(b.granted, 20);
    // A third shares the remaining 20 three ways (rounded up).
    let c = h.grant("gw-c", acquire("t", 20, 1, 10_000));
    assert_eq!(c.granted, 7);
    // min is honoured when it fits, even above the fair share.
    let d = h.grant("gw-d", acquire("t", 13, 10, 10_000));
    assert_eq!(d.granted, 10);
    assert_eq!(h.usage("t"), (0, 97));
}

#[test]
fn min_above_what_is_left_is_refused_and_changes_nothing() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 10, Period::Lifetime)])));
    h.grant("gw-a", acquire("t", 8, 8, 10_000));
    let before = h.log.len();
    let totals = h.ledger.totals();
    let err = h.run("gw-b", acquire("t", 5, 3, 10_000)).unwrap_err();
    assert!(matches!(err, LedgerError::Exhausted { available: 2, min: 3, .. }), "{err}");
    assert_eq!(h.log.len(), before, "a refusal writes no audit record");
    // Only the exactly-once table and the index moved; the quota state did not.
    assert_eq!(h.usage("t"), (0, 8));
    assert_eq!(h.ledger.totals(), totals);
    assert_eq!(h.ledger.live_lease_count(), 1);
}

#[test]
fn a_lease_never_outlives_its_window() {
    let mut h = H::tree();
    // key-7 has a minute window ending at 14:31:00.
    let g = h.grant("gw-1", acquire("acme/search/key-7", 10, 1, 3_600_000));
    assert_eq!(g.window_end_ms, 1_764_340_260_000);
    assert_eq!(g.expires_at_ms, g.window_end_ms);
    // The validity the gateway is told is cut at the window's end too.
    assert_eq!(g.ttl_ms, g.window_end_ms - T0);
    // Renewal cannot push it past the window either.
    let r = h.ok(
        "gw-1",
        Op::Report(Report { lease: g.lease, consumed_delta: 0, renew_ttl_ms: Some(3_600_000) }),
    );
    assert!(matches!(r, Reply::Reported { expires_at_ms, .. } if expires_at_ms == g.window_end_ms));
}

#[test]
fn renewal_extends_a_lease() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 10, Period::Lifetime)])));
    let g = h.grant("gw", acquire("t", 5, 1, 1_000));
    h.now += 900;
    let r = h.ok(
        "gw",
        Op::Report(Report { lease: g.lease, consumed_delta: 1, renew_ttl_ms: Some(1_000) }),
    );
    assert_eq!(r, Reply::Reported { lease: g.lease, unreported: 4, expires_at_ms: T0 + 1_900 });
    h.tick(500); // past the first expiry, before the renewed one
    assert!(h.ledger.lease(g.lease).is_some());
}

#[test]
fn expiry_charges_and_a_late_release_refunds_while_the_window_is_open() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Day)])));
    let g = h.grant("gw", acquire("t", 40, 1, 1_000));
    h.ok("gw", Op::Report(Report { lease: g.lease, consumed_delta: 10, renew_ttl_ms: None }));
    h.tick(1_000);
    // Charged: 10 reported + 30 unsettled.
    assert_eq!(h.usage("t"), (40, 0));
    let last = h.log.records().last().unwrap();
    assert_eq!(last.entry.kind, AuditKind::LeaseExpired);
    assert_eq!(last.entry.flow.charged, 30);
    assert_eq!(last.entry.effective_ms, T0 + 999);
    // Reporting on it now is refused with a clear reason.
    let err = h
        .run("gw", Op::Report(Report { lease: g.lease, consumed_delta: 1, renew_ttl_ms: None }))
        .unwrap_err();
    assert_eq!(err, LedgerError::LeaseExpired { lease: g.lease });
    // Another gateway cannot settle it.
    let err =
        h.run("gw-x", Op::Release(Release { lease: g.lease, consumed_total: 10 })).unwrap_err();
    assert_eq!(err, LedgerError::ForeignLease { lease: g.lease });
    // The real total was 15: 25 comes back.
    let r = h.ok("gw", Op::Release(Release { lease: g.lease, consumed_total: 15 }));
    assert_eq!(r, Reply::Released { lease: g.lease, returned: 0, refunded: 25, late: true });
    assert_eq!(h.usage("t"), (15, 0));
    // Settled: a second final report is refused.
    let err = h.run("gw", Op::Release(Release { lease: g.lease, consumed_total: 15 })).unwrap_err();
    assert_eq!(err, LedgerError::LeaseNotFound { lease: g.lease });
}

#[test]
fn no_refund_after_the_window_closed() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Minute)])));
    let g = h.grant("gw", acquire("t", 40, 1, 5_000));
    h.tick(2 * MIN);
    // The minute rolled: consumption starts again from zero.
    assert_eq!(h.usage("t"), (0, 0));
    let r = h.ok("gw", Op::Release(Release { lease: g.lease, consumed_total: 0 }));
    assert_eq!(r, Reply::Released { lease: g.lease, returned: 0, refunded: 0, late: true });
    assert_eq!(h.log.records().last().unwrap().entry.kind, AuditKind::LateRelease);
    let t = h.ledger.totals();
    assert_eq!((t.granted, t.charged, t.uncharged), (40, 40, 0));
}

#[test]
fn windows_roll_over() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Minute)])));
    let g = h.grant("gw", acquire("t", 100, 1, 5_000));
    h.ok("gw", Op::Release(Release { lease: g.lease, consumed_total: 100 }));
    assert!(h.run("gw", acquire("t", 1, 1, 5_000)).is_err());
    h.tick(MIN);
    let v = h.ledger.budget(&path("t")).unwrap();
    assert_eq!((v.limits[0].consumed, v.limits[0].remaining), (0, 100));
    assert_eq!(h.grant("gw", acquire("t", 100, 1, 5_000)).granted, 100);
}

#[test]
fn bad_settlements_are_refused() {
    let mut h = H::tree();
    let g = h.grant("gw", acquire("acme", 10, 1, 5_000));
    let over =
        h.run("gw", Op::Report(Report { lease: g.lease, consumed_delta: 11, renew_ttl_ms: None }));
    assert!(matches!(over, Err(LedgerError::OverReport { granted: 10, .. })));
    h.ok("gw", Op::Report(Report { lease: g.lease, consumed_delta: 6, renew_ttl_ms: None }));
    let below = h.run("gw", Op::Release(Release { lease: g.lease, consumed_total: 5 }));
    assert!(matches!(below, Err(LedgerError::ReleaseBelowReported { reported: 6, total: 5, .. })));
    let over = h.run("gw", Op::Release(Release { lease: g.lease, consumed_total: 11 }));
    assert!(matches!(over, Err(LedgerError::OverReport { .. })));
    // Another principal's lease: refused, and not even remembered (the state moves
    // as two empty entries would move it).
    let mut expected = h.ledger.clone();
    for i in 1..=2 {
        expected.apply(h.index + i, &Entry::V1(Batch { time_ms: h.now, commands: vec![] }));
    }
    let foreign = h.run("gw-other", Op::Release(Release { lease: g.lease, consumed_total: 6 }));
    assert_eq!(foreign, Err(LedgerError::ForeignLease { lease: g.lease }));
    let foreign = h.run(
        "gw-other",
        Op::Report(Report { lease: g.lease, consumed_delta: 1, renew_ttl_ms: None }),
    );
    assert_eq!(foreign, Err(LedgerError::ForeignLease { lease: g.lease }));
    assert_eq!(h.ledger.digest(), expected.digest(), "a refused foreign settlement left a trace");
    let unknown = LeaseId::from_raw(999_999);
    let err = h.run("gw", Op::Release(Release { lease: unknown, consumed_total: 0 }));
    assert_eq!(err, Err(LedgerError::LeaseNotFound { lease: unknown }));
    let huge = h.run(
        "gw",
        Op::Report(Report { lease: g.lease, consumed_delta: u64::MAX, renew_ttl_ms: None }),
    );
    assert!(matches!(huge, Err(LedgerError::AmountTooLarge { .. })));
    assert_eq!(h.usage("acme"), (6, 4));
}

#[test]
fn bad_acquires_are_refused() {
    let mut h = H::tree();
    let cases = [
        (acquire("acme", 0, 0, 1_000), "wanted"),
        (acquire("acme", 5, 6, 1_000), "min"),
        (acquire("acme", 5, 1, 0), "ttl_ms"),
        (acquire("acme", 5, 1, 3_600_001), "ttl_ms"),
        (acquire("acme", MAX_AMOUNT + 1, 1, 1_000), "wanted"),
    ];
    for (op, field) in cases {
        let err = h.run("gw", op).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
    }
    let err = h.run("gw", acquire("nope", 5, 1, 1_000)).unwrap_err();
    assert_eq!(err.kind(), crate::error::ErrorKind::NotFound);
    let err = h
        .run(
            "gw",
            Op::Acquire(Acquire {
                budget: path("acme"),
                unit: unit("usd_micros"),
                wanted: 5,
                min: 1,
                ttl_ms: 1_000,
            }),
        )
        .unwrap_err();
    assert!(matches!(err, LedgerError::NoLimitForUnit { .. }), "{err}");
    assert_eq!(h.ledger.live_lease_count(), 0);
}

#[test]
fn budget_lifecycle() {
    let mut h = H::tree();
    let err = h.run("ops", Op::CreateBudget(spec("acme", vec![]))).unwrap_err();
    assert!(matches!(err, LedgerError::BudgetExists { .. }));
    let err = h.run("ops", Op::CreateBudget(spec("other/child", vec![]))).unwrap_err();
    assert!(matches!(err, LedgerError::ParentNotFound { .. }), "{err}");
    let dup = spec("x", vec![limit("tokens", 1, Period::Day), limit("tokens", 2, Period::Day)]);
    assert!(matches!(
        h.run("ops", Op::CreateBudget(dup)),
        Err(LedgerError::InvalidArgument { .. })
    ));
    let big = spec("x", vec![limit("tokens", MAX_AMOUNT + 1, Period::Day)]);
    assert!(matches!(h.run("ops", Op::CreateBudget(big)), Err(LedgerError::AmountTooLarge { .. })));

    // Update needs the current version, and cannot cut a cap below what is in use.
    let g = h.grant("gw", acquire("acme/search", 200, 1, 5_000));
    let lower = spec("acme/search", vec![limit("tokens", 150, Period::Day)]);
    let err =
        h.run("ops", Op::UpdateBudget { spec: lower.clone(), expected_version: 1 }).unwrap_err();
    assert!(matches!(err, LedgerError::CapBelowUsage { in_use: 200, .. }), "{err}");
    let err = h.run("ops", Op::UpdateBudget { spec: lower, expected_version: 7 }).unwrap_err();
    assert!(matches!(err, LedgerError::VersionMismatch { actual: 1, .. }), "{err}");
    let two = spec(
        "acme/search",
        vec![limit("tokens", 250, Period::Day), limit("requests", 10, Period::Minute)],
    );
    assert_eq!(
        h.ok("ops", Op::UpdateBudget { spec: two, expected_version: 1 }),
        Reply::BudgetUpdated { version: 2 }
    );
    // The kept limit kept its usage; the new one starts empty.
    let v = h.ledger.budget(&path("acme/search")).unwrap();
    assert_eq!((v.limits[0].cap(), v.limits[0].outstanding), (250, 200));
    assert_eq!(v.limits[1].outstanding, 0);

    // Delete refuses parents and budgets with live leases.
    let err = h
        .run("ops", Op::DeleteBudget { path: path("acme/search"), expected_version: None })
        .unwrap_err();
    assert!(matches!(err, LedgerError::HasChildren { children: 1, .. }));
    h.ok("ops", Op::DeleteBudget { path: path("acme/search/key-7"), expected_version: Some(1) });
    let err = h
        .run("ops", Op::DeleteBudget { path: path("acme/search"), expected_version: None })
        .unwrap_err();
    assert!(matches!(err, LedgerError::HasLiveLeases { leases: 1, .. }));
    h.ok("gw", Op::Release(Release { lease: g.lease, consumed_total: 0 }));
    h.ok("ops", Op::DeleteBudget { path: path("acme/search"), expected_version: Some(2) });
    assert!(h.ledger.budget(&path("acme/search")).is_none());
    assert_eq!(h.ledger.budget(&path("acme")).unwrap().children, 0);
}

impl LimitView {
    fn cap(&self) -> u64 {
        self.spec.cap
    }
}

#[test]
fn a_retry_returns_the_first_result_and_changes_nothing() {
    let mut h = H::tree();
    let r = h.req("gw", acquire("acme", 10, 1, 5_000));
    let first = h.entry(vec![Command::Request(r.clone())]).remove(0);
    let state = h.ledger.clone();
    // Retried in the next entry (same ledger time): same reply, and the state moves
    // exactly as an empty entry would move it.
    let again = h.entry(vec![Command::Request(r.clone())]).remove(0);
    assert_eq!(first, again);
    let mut empty = state.clone();
    empty.apply(h.index, &Entry::V1(Batch { time_ms: h.now, commands: vec![] }));
    assert_eq!(h.ledger.digest(), empty.digest());
    // The same id with other content is refused.
    let mut other = r.clone();
    other.op = acquire("acme", 11, 1, 5_000);
    let err = h.entry(vec![Command::Request(other)]).remove(0).unwrap_err();
    assert!(matches!(err, LedgerError::RequestIdReused { .. }));
    // Refusals are remembered too.
    let bad = h.req("gw", acquire("nope", 1, 1, 5_000));
    let e1 = h.entry(vec![Command::Request(bad.clone())]).remove(0);
    h.ok("ops", Op::CreateBudget(spec("nope", vec![limit("tokens", 5, Period::Day)])));
    let e2 = h.entry(vec![Command::Request(bad)]).remove(0);
    assert_eq!(e1, e2);
}

#[test]
fn a_client_id_is_exactly_once_per_principal() {
    let mut h = H::tree();
    let mine = h.req("gw", acquire("acme", 10, 1, 5_000));
    let first = h.entry(vec![Command::Request(mine.clone())]).remove(0);
    assert!(first.is_ok());
    let mut expected = h.ledger.clone();
    for i in 1..=2 {
        expected.apply(h.index + i, &Entry::V1(Batch { time_ms: h.now, commands: vec![] }));
    }
    // Another principal with the same client id: neither the replay of gw's result
    // (whatever it sends) nor a new request id.
    for (request_id, op) in
        [(mine.request_id, mine.op.clone()), (mine.request_id + 1, acquire("acme", 1, 1, 5_000))]
    {
        let theirs = Request { principal: who("intruder"), request_id, op, ..mine.clone() };
        let err = h.entry(vec![Command::Request(theirs)]).remove(0).unwrap_err();
        assert!(matches!(err, LedgerError::ForeignClient { .. }), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::PermissionDenied);
        let said = err.to_string().replace(mine.client.as_str(), "");
        assert!(!said.contains("gw"), "does not say whose it is: {err}");
    }
    // Nothing changed, and gw's retry still replays its own result.
    assert_eq!(h.ledger.digest(), expected.digest());
    let again = h.entry(vec![Command::Request(mine.clone())]).remove(0);
    assert_eq!(first, again);
}

#[test]
fn old_request_ids_are_refused_not_replayed() {
    let mut h = H::new();
    h.ledger = Ledger::new(LedgerConfig { dedup_window: 4, ..LedgerConfig::default() });
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 1000, Period::Lifetime)])));
    let first = h.req("gw", acquire("t", 1, 1, 5_000));
    h.entry(vec![Command::Request(first.clone())]);
    for _ in 0..4 {
        h.ok("gw", acquire("t", 1, 1, 5_000));
    }
    let err = h.entry(vec![Command::Request(first)]).remove(0).unwrap_err();
    assert!(matches!(err, LedgerError::RequestTooOld { window: 4, .. }), "{err}");
    assert_eq!(h.ledger.live_lease_count(), 5);
}

#[test]
fn idle_clients_are_forgotten() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 1000, Period::Lifetime)])));
    assert_eq!(h.ledger.dedup_size(), (1, 1));
    h.tick(24 * 3_600_000 + 1);
    assert_eq!(h.ledger.dedup_size(), (0, 0));
}

#[test]
fn time_never_goes_back() {
    let mut h = H::new();
    h.tick(0);
    h.now = T0 - 10_000;
    h.tick(0);
    assert_eq!(h.ledger.now_ms(), T0);
    h.now = u64::MAX;
    h.tick(0);
    assert_eq!(h.ledger.now_ms(), crate::window::MAX_TIME_MS);
}

#[test]
fn leases_expire_and_windows_work_up_to_the_end_of_time() {
    use crate::window::MAX_TIME_MS;
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("m", vec![limit("tokens", 100, Period::Minute)])));
    h.ok("ops", Op::CreateBudget(spec("l", vec![limit("tokens", 100, Period::Lifetime)])));
    // Far in the future (a year-9999 clock is no longer an end): minute windows still
    // roll over, and leases still expire.
    h.now = 253_402_300_799_999 + 7 * MIN;
    h.tick(0);
    let g = h.grant("gw", acquire("m", 50, 1, 5_000));
    assert!(g.expires_at_ms > h.now && g.expires_at_ms <= h.now + 5_000, "{g:?}");
    h.tick(MIN);
    assert_eq!(h.usage("m"), (0, 0), "charged at expiry, then the minute rolled over");
    // Just before the end of time: a lease is cut at the end, and expires there.
    h.now = MAX_TIME_MS - 2_000;
    h.tick(0);
    let g = h.grant("gw", acquire("l", 40, 1, 3_600_000));
    assert_eq!(g.expires_at_ms, MAX_TIME_MS);
    h.now = u64::MAX;
    h.tick(0);
    assert_eq!(h.usage("l"), (40, 0), "the lease expired at the end of time and was charged");
    // At the end, nothing more can be leased; the refusal says why.
    let err = h.run("gw", acquire("l", 1, 1, 1_000)).unwrap_err();
    assert!(err.to_string().contains("end"), "{err}");
}

#[test]
#[should_panic(expected = "applied after")]
fn indexes_must_increase() {
    let mut l = Ledger::default();
    let e = Entry::V1(Batch { time_ms: 1, commands: vec![] });
    l.apply(5, &e);
    l.apply(5, &e);
}

#[test]
fn lease_ids_come_from_the_log_position() {
    let mut h = H::tree();
    let reqs: Vec<Command> =
        (0..3).map(|_| Command::Request(h.req("gw", acquire("acme", 1, 1, 5_000)))).collect();
    let outs = h.entry(reqs);
    for (slot, o) in outs.iter().enumerate() {
        let Ok(Reply::Granted(g)) = o else { panic!("{o:?}") };
        assert_eq!(g.lease, LeaseId::from_position(h.index, slot));
    }
}

#[test]
fn snapshots_restore_exactly_and_refuse_garbage() {
    let mut h = H::tree();
    let g = h.grant("gw", acquire("acme/search/key-7", 50, 1, 1_000));
    h.grant("gw2", acquire("acme/search", 20, 1, 60_000));
    h.tick(2_000); // the first lease expires and is kept for a late report
    assert!(h
        .run("gw", Op::Report(Report { lease: g.lease, consumed_delta: 0, renew_ttl_ms: None }))
        .is_err());
    let bytes = h.ledger.snapshot();
    let restored = Ledger::restore(&bytes).unwrap();
    assert_eq!(restored, h.ledger);
    assert_eq!(restored.snapshot(), bytes);
    assert_eq!(restored.digest(), h.ledger.digest());
    // Views and derived indexes came back too.
    assert_eq!(restored.budget(&path("acme")), h.ledger.budget(&path("acme")));
    assert_eq!(restored.expired_retained_count(), 1);

    assert!(matches!(Ledger::restore(&bytes[..bytes.len() / 2]), Err(SnapshotError::Decode(_))));
    assert!(Ledger::restore(b"not a snapshot").is_err());
}

#[test]
fn inconsistent_snapshots_are_refused_with_the_broken_invariant() {
    let mut h = H::tree();
    h.grant("gw", acquire("acme/search/key-7", 50, 1, 1_000));

    let mut broken = h.ledger.clone();
    broken.totals.granted += 1;
    let err = broken.check_invariants().unwrap_err();
    assert!(matches!(err, InvariantError::Conservation { granted: 51, outstanding: 50, .. }));
    assert!(err.to_string().starts_with("conservation: granted 51 + uncharged 0"), "{err}");
    assert!(matches!(
        Ledger::restore(&broken.snapshot()),
        Err(SnapshotError::Inconsistent(e)) if matches!(*e, InvariantError::Conservation { .. })
    ));

    let mut last = h.ledger.clone();
    last.chain.next_seq = snapshot::MAX_AUDIT_SEQ;
    assert_eq!(Ledger::restore(&last.snapshot()).unwrap(), last);
    last.chain.next_seq += 1;
    assert!(matches!(
        Ledger::restore(&last.snapshot()),
        Err(SnapshotError::Inconsistent(e))
            if matches!(*e, InvariantError::AuditSequenceExhausted { .. })
    ));
}

#[test]
fn the_audit_ledger_answers_queries() {
    let mut h = H::tree();
    h.ok("ops", Op::CreateBudget(spec("zeta", vec![limit("tokens", 100, Period::Day)])));
    let g = h.grant("gw-1", acquire("acme/search/key-7", 100, 1, 10_000));
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 70 }));
    let g = h.grant("gw-2", acquire("acme/search", 50, 1, 1_000));
    h.ok("gw-2", Op::Report(Report { lease: g.lease, consumed_delta: 5, renew_ttl_ms: None }));
    let z = h.grant("gw-2", acquire("zeta", 9, 1, 10_000));
    h.ok("gw-2", Op::Release(Release { lease: z.lease, consumed_total: 9 }));
    h.tick(MIN); // gw-2's acme/search lease expires: 45 charged
    h.log.verify().unwrap();

    let by_gw1 = AuditFilter { principal: Some(who("gw-1")), ..AuditFilter::default() };
    assert_eq!(h.log.query(&by_gw1).count(), 2);
    let subtree = AuditFilter {
        subtree: Some(path("acme/search")),
        kinds: vec![AuditKind::LeaseExpired],
        ..AuditFilter::default()
    };
    let expired: Vec<_> = h.log.query(&subtree).collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].entry.flow.charged, 45);
    let created = AuditFilter { kinds: vec![AuditKind::BudgetCreated], ..AuditFilter::default() };
    assert_eq!(h.log.query(&created).count(), 4);
    let late = AuditFilter { from_ms: Some(T0 + 1), ..AuditFilter::default() };
    assert_eq!(h.log.query(&late).count(), 1, "only the expiry happened after T0");

    // Spend per budget per day, rolled up the tree: 70 (key-7) + 5 + 45 (search).
    let rows = spend(h.log.records(), &path("acme"), Window::utc(Period::Day), None, None);
    let got: Vec<(String, i128)> = rows.iter().map(|r| (r.budget.to_string(), r.spent)).collect();
    assert_eq!(
        got,
        vec![("acme".into(), 120), ("acme/search".into(), 120), ("acme/search/key-7".into(), 70)]
    );
    assert_eq!(rows[0].window_start_ms, 1_764_288_000_000);
}

#[test]
fn tampering_is_detected_where_it_happened() {
    let mut h = H::tree();
    let g = h.grant("gw-1", acquire("acme", 100, 1, 10_000));
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 70 }));
    let mut records = h.log.records().to_vec();
    records[3].entry.flow.consumed = 7;
    let err = crate::audit::verify_chain(&records, ChainHead::default()).unwrap_err();
    assert_eq!(err.seq, 3);
    let mut records = h.log.records().to_vec();
    records.remove(2);
    assert_eq!(crate::audit::verify_chain(&records, ChainHead::default()).unwrap_err().seq, 3);
    assert_eq!(h.log.head(), h.ledger.chain_head());
}

#[test]
fn conservation_holds_through_every_path() {
    let mut h = H::tree();
    let a = h.grant("gw-1", acquire("acme", 100, 1, 1_000));
    let b = h.grant("gw-2", acquire("acme", 100, 1, 1_000));
    h.ok("gw-1", Op::Release(Release { lease: a.lease, consumed_total: 30 }));
    h.tick(1_000);
    h.ok("gw-2", Op::Release(Release { lease: b.lease, consumed_total: 10 }));
    let t = h.ledger.totals();
    assert_eq!(t.granted, u128::from(a.granted + b.granted));
    assert_eq!(t.consumed + t.returned + t.charged - t.uncharged, t.granted);
    let from_audit = h.log.records().iter().fold((0u128, 0i128), |(g, rest), r| {
        let f = r.entry.flow;
        (
            g + u128::from(f.granted),
            rest + i128::from(f.consumed) + i128::from(f.returned) + i128::from(f.charged)
                - i128::from(f.uncharged),
        )
    });
    assert_eq!(from_audit.0 as i128, from_audit.1);
}

#[test]
fn too_many_commands_in_one_entry_are_refused_not_panicked() {
    let mut l = Ledger::default();
    let commands = vec![Command::Tick; MAX_COMMANDS_PER_ENTRY + 1];
    let applied = l.apply(1, &Entry::V1(Batch { time_ms: T0, commands }));
    assert!(applied.outcomes[MAX_COMMANDS_PER_ENTRY].is_err());
    assert!(applied.outcomes[0].is_ok());
}

#[test]
fn the_ledger_has_limits() {
    let mut h = H::new();
    h.ledger =
        Ledger::new(LedgerConfig { max_budgets: 1, max_live_leases: 1, ..LedgerConfig::default() });
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 10, Period::Day)])));
    assert!(matches!(
        h.run("ops", Op::CreateBudget(spec("u", vec![]))),
        Err(LedgerError::LedgerFull { .. })
    ));
    h.grant("gw", acquire("t", 1, 1, 1_000));
    assert!(matches!(h.run("gw", acquire("t", 1, 1, 1_000)), Err(LedgerError::LedgerFull { .. })));
}

fn overrun(p: &str, amount: u64) -> Op {
    Op::Overrun(crate::command::Overrun { budget: path(p), unit: unit("tokens"), amount })
}

#[test]
fn an_overrun_is_counted_up_the_tree_audited_and_stops_grants_until_the_window_rolls() {
    let mut h = H::tree();
    // key-7: 300 a minute. A gateway leases all of it and spends it, then a call
    // costs 40 more than it could take.
    let g = h.grant("gw-1", acquire("acme/search/key-7", 300, 1, 10_000));
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 300 }));
    let r = h.ok("gw-1", overrun("acme/search/key-7", 40));
    assert_eq!(r, Reply::OverrunRecorded { recorded: 40, over_cap: true });
    for p in ["acme", "acme/search", "acme/search/key-7"] {
        assert_eq!(h.usage(p), (340, 0), "{p}: the ledger counts what was really spent");
    }
    let rec = h.log.records().last().unwrap();
    assert_eq!(rec.entry.kind, AuditKind::Overrun);
    assert_eq!(rec.entry.flow.consumed, 40);
    assert_eq!(rec.entry.principal.as_str(), "gw-1");
    assert_eq!(rec.entry.balances.len(), 3);
    let view = h.ledger.budget(&path("acme/search/key-7")).unwrap();
    assert_eq!((view.limits[0].overruns, view.limits[0].remaining), (40, 0));
    // Over its cap, key-7 grants nothing; an ancestor with room is unaffected
    // for its other children.
    let err = h.run("gw-2", acquire("acme/search/key-7", 1, 1, 10_000)).unwrap_err();
    assert!(matches!(err, LedgerError::Exhausted { available: 0, .. }), "{err}");
    assert_eq!(h.grant("gw-2", acquire("acme/search", 10, 1, 10_000)).granted, 10);
    let t = h.ledger.totals();
    assert_eq!((t.overrun, t.consumed), (40, 340));
    // The minute rolls: key-7 grants again, and its overrun figure starts over.
    h.tick(MIN);
    assert_eq!(h.grant("gw-2", acquire("acme/search/key-7", 5, 1, 10_000)).granted, 5);
    let view = h.ledger.budget(&path("acme/search/key-7")).unwrap();
    assert_eq!(view.limits[0].overruns, 0);
    // Spend per window counts the overrun as spend.
    let s =
        spend(h.log.records(), &path("acme/search/key-7"), Window::utc(Period::Minute), None, None);
    assert_eq!(
        s.iter()
            .filter(|r| r.budget.as_str() == "acme/search/key-7")
            .map(|r| r.spent)
            .sum::<i128>(),
        340
    );
}

#[test]
fn an_overrun_below_the_cap_is_still_counted_and_overruns_are_bounded() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Lifetime)])));
    let r = h.ok("gw", overrun("t", 30));
    assert_eq!(r, Reply::OverrunRecorded { recorded: 30, over_cap: false });
    assert_eq!(h.usage("t"), (30, 0));
    assert_eq!(h.grant("gw", acquire("t", 100, 1, 10_000)).granted, 70);
    // Refusals change nothing: zero, too large, unknown budget, no limit in the unit.
    let before = h.ledger.totals();
    assert!(matches!(h.run("gw", overrun("t", 0)), Err(LedgerError::InvalidArgument { .. })));
    assert!(matches!(
        h.run("gw", overrun("t", MAX_AMOUNT + 1)),
        Err(LedgerError::AmountTooLarge { .. })
    ));
    assert!(matches!(h.run("gw", overrun("nope", 1)), Err(LedgerError::BudgetNotFound { .. })));
    let other = Op::Overrun(crate::command::Overrun {
        budget: path("t"),
        unit: unit("usd_micros"),
        amount: 1,
    });
    assert!(matches!(h.run("gw", other), Err(LedgerError::NoLimitForUnit { .. })));
    assert_eq!(h.ledger.totals(), before);
    // A lifetime limit piles overruns up only to a bound far from overflow.
    for _ in 0..3 {
        h.ok("gw", overrun("t", MAX_AMOUNT));
    }
    assert!(matches!(
        h.run("gw", overrun("t", MAX_AMOUNT)),
        Err(LedgerError::AmountTooLarge { .. })
    ));
}

#[test]
fn raising_the_cap_after_an_overrun_lets_grants_resume_and_lowering_it_is_checked() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Lifetime)])));
    let g = h.grant("gw", acquire("t", 100, 1, 10_000));
    h.ok("gw", Op::Release(Release { lease: g.lease, consumed_total: 100 }));
    h.ok("gw", overrun("t", 25));
    // A cap of 110 still counts the overrun as the old one did: allowed, grants nothing.
    h.ok(
        "ops",
        Op::UpdateBudget {
            spec: spec("t", vec![limit("tokens", 110, Period::Lifetime)]),
            expected_version: 1,
        },
    );
    assert!(h.run("gw", acquire("t", 1, 1, 10_000)).is_err());
    h.ok(
        "ops",
        Op::UpdateBudget {
            spec: spec("t", vec![limit("tokens", 200, Period::Lifetime)]),
            expected_version: 2,
        },
    );
    assert_eq!(h.grant("gw", acquire("t", 500, 1, 10_000)).granted, 75);
}

#[test]
fn snapshots_keep_overruns_and_an_older_snapshot_still_restores() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Lifetime)])));
    h.grant("gw", acquire("t", 50, 1, 10_000));
    h.ok("gw", overrun("t", 70));
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored, h.ledger);
    assert_eq!(restored.budget(&path("t")).unwrap().limits[0].overruns, 70);
    assert_eq!(restored.totals().overrun, 70);
    // A V1 snapshot (written before overruns existed) restores with none.
    let mut plain = H::new();
    plain.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 100, Period::Lifetime)])));
    plain.grant("gw", acquire("t", 50, 1, 10_000));
    let v1 = postcard::to_stdvec(&snapshot::SnapshotFormatV1Only::V1(&plain.ledger)).unwrap();
    let mut old = Ledger::restore(&v1).unwrap();
    // (Everything but the per-principal state, which a V1 snapshot lacks.)
    old.dedup.set_owners(plain.ledger.dedup.owners());
    old.principals = plain.ledger.principals.clone();
    assert_eq!(old, plain.ledger);
}

fn acquire_next(p: &str, wanted: u64, ttl_ms: u64, starts_at_ms: u64) -> Op {
    Op::AcquireNext(crate::command::AcquireNext {
        acquire: Acquire { budget: path(p), unit: unit("tokens"), wanted, min: 1, ttl_ms },
        starts_at_ms,
    })
}

#[test]
fn a_lease_for_the_next_window_counts_there_and_opens_at_the_boundary() {
    // key-7: 300 per minute; the minute ends at 14:31:00, 14.877 s after T0.
    let mut h = H::tree();
    let end = 1_764_340_260_000;
    let now_lease = h.grant("gw-1", acquire("acme/search/key-7", 300, 1, 60_000));
    assert_eq!(now_lease.granted, 300, "the whole minute is leased");
    // The current minute has nothing left, but the next one has it all.
    let refused = h.run("gw-2", acquire("acme/search/key-7", 10, 1, 60_000)).unwrap_err();
    assert!(matches!(refused, LedgerError::Exhausted { .. }), "{refused:?}");
    h.now = end - 2_000;
    // A lease that would expire before it opens is refused.
    let err = h.run("gw-1", acquire_next("acme/search/key-7", 200, 1_000, end)).unwrap_err();
    assert!(matches!(err, LedgerError::InvalidArgument { ref field, .. } if field == "ttl_ms"));
    let next = h.grant("gw-1", acquire_next("acme/search/key-7", 200, 20_000, end));
    assert_eq!(next.granted, 200);
    // It lives until the next minute ends at most.
    assert_eq!(next.window_end_ms, end + MIN);
    assert_eq!(next.expires_at_ms, h.now + 20_000);
    let view = h.ledger.budget(&path("acme/search/key-7")).unwrap();
    assert_eq!((view.limits[0].outstanding, view.limits[0].upcoming), (300, 200));
    // The day and month limits above do not end at 14:31: it is in their current
    // windows, beside the first lease (300 + 200 of the day's 500).
    assert_eq!(h.usage("acme/search"), (0, 500));
    assert_eq!(h.ledger.lease(next.lease).unwrap().opens_at_ms, Some(end));
    // The grant's audit balance is the next minute's.
    let granted = h.log.records().last().unwrap().entry.balances[0].clone();
    assert_eq!((granted.window_start_ms, granted.consumed, granted.outstanding), (end, 0, 200));

    // Nothing can be spent from it before it opens, and a bad start is refused.
    let early = Op::Report(Report { lease: next.lease, consumed_delta: 1, renew_ttl_ms: None });
    let err = h.run("gw-1", early).unwrap_err();
    assert!(
        matches!(err, LedgerError::InvalidArgument { ref field, .. } if field == "consumed_delta")
    );
    let err = h.run("gw-2", acquire_next("acme/search/key-7", 1, 20_000, end + 1)).unwrap_err();
    assert!(
        matches!(err, LedgerError::InvalidArgument { ref field, .. } if field == "starts_at_ms")
    );

    // A snapshot taken now restores the lease that has not opened.
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored.digest(), h.ledger.digest());
    assert_eq!(restored.lease(next.lease).unwrap().opens_at_ms, Some(end));

    // At the boundary the old lease expires (charged in full) and the new one opens:
    // it is the new minute's outstanding, and spendable.
    h.tick(2_000);
    assert!(h.ledger.lease(now_lease.lease).is_none());
    assert_eq!(h.ledger.lease(next.lease).unwrap().opens_at_ms, None);
    let view = h.ledger.budget(&path("acme/search/key-7")).unwrap();
    assert_eq!(view.limits[0].window_start_ms, end);
    assert_eq!(
        (view.limits[0].consumed, view.limits[0].outstanding, view.limits[0].upcoming),
        (0, 200, 0)
    );
    h.ok("gw-1", Op::Report(Report { lease: next.lease, consumed_delta: 50, renew_ttl_ms: None }));
    assert_eq!(h.usage("acme/search/key-7"), (50, 150));
    // The restored copy, fed the same entry, agrees.
    let mut restored = restored;
    restored.apply(h.index - 1, &Entry::V1(Batch { time_ms: end, commands: vec![Command::Tick] }));
    assert_eq!(restored.lease(next.lease).unwrap().opens_at_ms, None);
}

#[test]
fn a_lease_for_the_next_window_released_before_it_opens_returns_everything() {
    let mut h = H::tree();
    let end = 1_764_340_260_000;
    h.now = end - 1_000;
    let next = h.grant("gw-1", acquire_next("acme/search/key-7", 100, 20_000, end));
    let spent = Op::Release(Release { lease: next.lease, consumed_total: 1 });
    assert!(h.run("gw-1", spent).is_err(), "nothing was spendable yet");
    let r = h.ok("gw-1", Op::Release(Release { lease: next.lease, consumed_total: 0 }));
    assert!(matches!(r, Reply::Released { returned: 100, .. }), "{r:?}");
    let view = h.ledger.budget(&path("acme/search/key-7")).unwrap();
    assert_eq!(view.limits[0].upcoming, 0);
    h.tick(5_000);
    assert_eq!(h.usage("acme/search/key-7"), (0, 0));
    // Asking for a start ledger time has passed is an ordinary acquire.
    let g = h.grant("gw-1", acquire_next("acme/search/key-7", 10, 20_000, end));
    assert_eq!(h.ledger.lease(g.lease).unwrap().opens_at_ms, None);
}

#[test]
fn a_subtree_listing_reads_only_the_subtree_whatever_its_siblings() {
    let mut h = H::new();
    for p in ["a", "a-x", "a.y", "ab", "a/b", "a/b/c", "a/z", "b"] {
        let parent_missing =
            p.contains('/') && h.ledger.budget(&path(p.rsplit_once('/').unwrap().0)).is_none();
        assert!(!parent_missing, "{p}");
        h.ok("ops", Op::CreateBudget(spec(p, vec![])));
    }
    let names =
        |v: Vec<BudgetView>| v.iter().map(|b| b.path.as_str().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(h.ledger.budgets(Some(&path("a")), None, 100)), ["a", "a/b", "a/b/c", "a/z"]);
    // Page by page, from every page token.
    assert_eq!(names(h.ledger.budgets(Some(&path("a")), None, 1)), ["a"]);
    assert_eq!(names(h.ledger.budgets(Some(&path("a")), Some(&path("a")), 2)), ["a/b", "a/b/c"]);
    assert_eq!(names(h.ledger.budgets(Some(&path("a")), Some(&path("a/b/c")), 2)), ["a/z"]);
    assert!(h.ledger.budgets(Some(&path("a")), Some(&path("a/z")), 2).is_empty());
    // A token before the subtree starts at it; one after it ends the listing.
    assert_eq!(names(h.ledger.budgets(Some(&path("a/b")), Some(&path("a")), 9)), ["a/b", "a/b/c"]);
    assert!(h.ledger.budgets(Some(&path("a")), Some(&path("b")), 9).is_empty());
    assert_eq!(h.ledger.budgets(None, Some(&path("a/z")), 9).len(), 2);
}

fn set_limits(clients: u64, outcomes: u64, live_leases: u64, budgets: u64) -> Op {
    Op::SetLimits(PrincipalLimits { clients, outcomes, live_leases, budgets })
}

/// A request from `client` (a new client id per call when `client` is new).
fn from_client(h: &mut H, client: &str, principal: &str, op: Op) -> Outcome {
    h.request += 1;
    let r = Request {
        client: ClientId::new(client).unwrap(),
        request_id: h.request,
        principal: who(principal),
        op,
    };
    h.entry(vec![Command::Request(r)]).remove(0)
}

fn principal_limit(o: &Outcome) -> Option<(String, u64)> {
    match o {
        Err(LedgerError::PrincipalLimit { what, max, .. }) => Some((what.clone(), *max)),
        _ => None,
    }
}

#[test]
fn per_principal_limits_refuse_before_anything_is_remembered_and_spare_other_principals() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("t", vec![limit("tokens", 1_000_000, Period::Lifetime)])));
    // The change is an audited command on the ledger's own path.
    assert_eq!(h.ok("ops", set_limits(3, 6, 2, 2)), Reply::LimitsSet);
    let rec = h.log.records().last().unwrap().clone();
    assert_eq!(rec.entry.kind, AuditKind::LimitsChanged);
    assert_eq!(rec.entry.budget.as_str(), LEDGER_PATH);
    let named: Vec<(String, u64)> =
        rec.entry.limits.iter().map(|l| (l.unit.to_string(), l.cap)).collect();
    let want = [("clients", 3), ("outcomes", 6), ("live_leases", 2), ("budgets", 2)];
    assert_eq!(named, want.map(|(n, v)| (n.to_owned(), v)));
    assert_eq!(h.ledger.principal_limits().outcomes, 6);

    // Live leases: the third lease of "gw" is refused (and that refusal is an
    // ordinary, remembered outcome).
    let g1 = h.grant("gw", acquire("t", 1, 1, 60_000)); // client gw-client
    from_client(&mut h, "c2", "gw", acquire("t", 1, 1, 60_000)).unwrap();
    let third = from_client(&mut h, "c3", "gw", acquire("t", 1, 1, 60_000));
    assert_eq!(principal_limit(&third), Some(("live leases".into(), 2)), "{third:?}");
    let u = h.ledger.principal_usage(&who("gw"));
    assert_eq!((u.clients, u.outcomes, u.live_leases), (3, 3, 2), "{u:?}");

    // Clients: a fourth client id of "gw" is refused, and nothing is remembered.
    let before = h.ledger.dedup_size();
    let refused = from_client(&mut h, "c4", "gw", acquire("t", 1, 1, 60_000));
    assert_eq!(principal_limit(&refused), Some(("clients".into(), 3)), "{refused:?}");
    assert_eq!(refused.unwrap_err().kind(), crate::ErrorKind::ResourceExhausted);
    assert_eq!(h.ledger.dedup_size(), before, "a refused request is not remembered");
    // Another principal is not affected.
    from_client(&mut h, "o1", "other", acquire("t", 1, 1, 60_000)).unwrap();

    // Outcomes: "gw" remembers 3; three more fill its 6, the next is refused.
    h.ok("gw", Op::Release(Release { lease: g1.lease, consumed_total: 1 }));
    h.grant("gw", acquire("t", 1, 1, 60_000));
    assert!(principal_limit(&h.run("gw", acquire("t", 1, 1, 60_000))).is_some());
    assert_eq!(h.ledger.principal_usage(&who("gw")).outcomes, 6);
    let full = h.run("gw", acquire("t", 1, 1, 60_000));
    assert_eq!(principal_limit(&full), Some(("outcomes".into(), 6)), "{full:?}");
    assert_eq!(h.ledger.principal_usage(&who("gw")).outcomes, 6);

    // Budgets created, counted until deleted; the ledger's own path is reserved.
    let b = |p: &str| Op::CreateBudget(spec(p, vec![limit("tokens", 5, Period::Day)]));
    h.ok("builder", b("b1"));
    h.ok("builder", b("b2"));
    assert_eq!(principal_limit(&h.run("builder", b("b3"))), Some(("budgets".into(), 2)));
    h.ok("builder", Op::DeleteBudget { path: path("b2"), expected_version: None });
    h.ok("builder", b("b3"));
    assert!(matches!(h.run("ops", b(LEDGER_PATH)), Err(LedgerError::InvalidPath { .. })));

    // Limits are checked: 0 or more than the maximum is refused.
    assert!(matches!(
        h.run("ops", set_limits(0, 1, 1, 1)),
        Err(LedgerError::InvalidArgument { .. })
    ));
    let over = set_limits(1, MAX_PRINCIPAL_LIMIT + 1, 1, 1);
    assert!(matches!(h.run("ops", over), Err(LedgerError::InvalidArgument { .. })));

    // A snapshot keeps the limits, the creators and the owners, and restores the
    // same usage (invariants recount it).
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored, h.ledger);
    assert_eq!(restored.principal_usage(&who("builder")).budgets, 2);
    assert_eq!(restored.principal_limits(), h.ledger.principal_limits());

    // Raising a limit lets the principal go on at once; a principal held by the
    // limits can still change them.
    assert!(principal_limit(&h.run("gw", acquire("t", 1, 1, 60_000))).is_some());
    h.ok("gw", set_limits(4, 100, 10, 10));
    from_client(&mut h, "c4", "gw", acquire("t", 1, 1, 60_000)).unwrap();
    // Idle clients are forgotten with what they counted, leases expire: nothing held.
    h.tick(24 * 3_600_000 + 1);
    assert_eq!(h.ledger.principal_usage(&who("gw")), PrincipalUsage::default());
    assert!(h.ledger.top_principals(10).iter().all(|(p, _)| p.as_str() != "gw"));
}

#[test]
fn a_snapshot_without_per_principal_state_restores_with_defaults() {
    let mut h = H::tree();
    h.grant("gw", acquire("acme", 1, 1, 60_000));
    let v1 = postcard::to_stdvec(&snapshot::SnapshotFormatV1Only::V1(&h.ledger)).unwrap();
    let old = Ledger::restore(&v1).unwrap();
    assert_eq!(old.principal_limits(), PrincipalLimits::default());
    // Leases count (they name their principal); budgets and clients of an older
    // snapshot count against nobody.
    let u = old.principal_usage(&who("gw"));
    assert_eq!((u.live_leases, u.clients, u.budgets), (1, 0, 0));
}

// ----- roles -----

fn role(principal: &str, r: Role, scope: &str) -> RoleGrant {
    RoleGrant { principal: who(principal), role: r, scope: Scope::parse(scope).unwrap() }
}

/// Runs `op` as an authenticated `principal` (roles checked as it applies).
fn as_principal(h: &mut H, principal: &str, op: Op) -> Outcome {
    let request = h.req(principal, op);
    h.entry(vec![Command::Authenticated { request, authority: Authority::Roles }]).remove(0)
}

fn as_bootstrap_admin(h: &mut H, principal: &str, op: Op) -> Outcome {
    let request = h.req(principal, op);
    h.entry(vec![Command::Authenticated { request, authority: Authority::BootstrapAdmin }])
        .remove(0)
}

fn denied(o: &Outcome) -> bool {
    matches!(o, Err(LedgerError::NotAuthorized { .. }))
}

#[test]
fn authenticated_requests_are_denied_by_default_and_granted_by_scope() {
    let mut h = H::tree();
    h.ok("ops", Op::CreateBudget(spec("globex", vec![limit("tokens", 1000, Period::Month)])));
    let state = |h: &H| (h.ledger.budgets(None, None, 100), h.log.len(), h.ledger.dedup_size());
    let before = state(&h);
    // No roles: nothing an authenticated principal asks is done, and nothing is kept.
    let refused = as_principal(&mut h, "gw", acquire("acme/search", 10, 1, 60_000));
    assert!(denied(&refused), "{refused:?}");
    assert_eq!(refused.as_ref().unwrap_err().kind(), crate::ErrorKind::PermissionDenied);
    let msg = refused.unwrap_err().to_string();
    assert!(msg.contains("needs role gateway on acme/search") && msg.contains("no roles"), "{msg}");
    let op = Op::CreateBudget(spec("acme/new", vec![]));
    assert!(denied(&as_principal(&mut h, "gw", op)));
    assert_eq!(before, state(&h), "a refusal changes nothing and is not remembered");

    // Only an admin grants roles; a bootstrap admin is one whatever the ledger holds.
    let g = Op::GrantRole(role("gw", Role::Gateway, "acme/search"));
    assert!(denied(&as_principal(&mut h, "gw", g.clone())), "a principal cannot grant itself");
    let changed = as_bootstrap_admin(&mut h, "root", g.clone()).unwrap();
    assert_eq!(changed, Reply::RolesChanged { changed: true });
    let rec = h.log.records().last().unwrap().entry.clone();
    assert_eq!(rec.kind, AuditKind::RoleGranted);
    assert_eq!((rec.principal.as_str(), rec.budget.as_str()), ("gw", "acme/search"));
    assert_eq!(rec.unit.as_ref().map(Unit::as_str), Some("gateway"));
    // Granting it again changes nothing and writes no record.
    let n = h.log.len();
    let again = as_bootstrap_admin(&mut h, "root", g).unwrap();
    assert_eq!((again, h.log.len()), (Reply::RolesChanged { changed: false }, n));

    // In scope (the subtree's root and below): granted. Outside: refused.
    let g1 = match as_principal(&mut h, "gw", acquire("acme/search/key-7", 10, 1, 60_000)) {
        Ok(Reply::Granted(g)) => g,
        other => panic!("{other:?}"),
    };
    assert!(as_principal(&mut h, "gw", acquire("acme/search", 10, 1, 60_000)).is_ok());
    assert!(denied(&as_principal(&mut h, "gw", acquire("acme", 10, 1, 60_000))));
    assert!(denied(&as_principal(&mut h, "gw", acquire("globex", 10, 1, 60_000))));
    // A gateway does not manage budgets, nor change limits.
    let op = Op::UpdateBudget { spec: spec("acme/search", vec![]), expected_version: 1 };
    assert!(denied(&as_principal(&mut h, "gw", op)));
    assert!(denied(&as_principal(&mut h, "gw", set_limits(1, 1, 1, 1))));
    // An operator on acme manages budgets there, and cannot acquire.
    as_bootstrap_admin(&mut h, "root", Op::GrantRole(role("op", Role::Operator, "acme"))).unwrap();
    let op = Op::CreateBudget(spec("acme/new", vec![limit("tokens", 5, Period::Day)]));
    assert!(as_principal(&mut h, "op", op).is_ok());
    assert!(denied(&as_principal(&mut h, "op", Op::CreateBudget(spec("globex/x", vec![])))));
    assert!(denied(&as_principal(&mut h, "op", acquire("acme/new", 1, 1, 60_000))));
    assert!(denied(&as_principal(&mut h, "op", Op::GrantRole(role("x", Role::Gateway, "acme")))));

    // Revoked: new acquires are refused, but the lease it holds still reports and
    // releases (spend that happened is recorded); a renewal is not granted.
    let r = Op::RevokeRole(role("gw", Role::Gateway, "acme/search"));
    assert_eq!(
        as_bootstrap_admin(&mut h, "root", r).unwrap(),
        Reply::RolesChanged { changed: true }
    );
    assert_eq!(h.log.records().last().unwrap().entry.kind, AuditKind::RoleRevoked);
    assert!(h.ledger.roles_of(&who("gw")).is_empty());
    assert!(denied(&as_principal(&mut h, "gw", acquire("acme/search/key-7", 10, 1, 60_000))));
    h.tick(1_000);
    let report =
        Op::Report(Report { lease: g1.lease, consumed_delta: 4, renew_ttl_ms: Some(600_000) });
    match as_principal(&mut h, "gw", report) {
        Ok(Reply::Reported { expires_at_ms, .. }) => {
            assert_eq!(expires_at_ms, g1.expires_at_ms, "a revoked gateway's lease is not renewed")
        }
        other => panic!("{other:?}"),
    }
    // An overrun on the limit its lease draws on is spend that happened: recorded.
    let overrun = |amount| {
        Op::Overrun(crate::command::Overrun {
            budget: path("acme/search/key-7"),
            unit: unit("tokens"),
            amount,
        })
    };
    assert!(matches!(as_principal(&mut h, "gw", overrun(3)), Ok(Reply::OverrunRecorded { .. })));
    // Someone holding neither a role nor a lease there cannot charge it.
    assert!(denied(&as_principal(&mut h, "stranger", overrun(3))));
    let release = Op::Release(Release { lease: g1.lease, consumed_total: 6 });
    assert!(matches!(as_principal(&mut h, "gw", release), Ok(Reply::Released { .. })));
    assert_eq!(h.usage("acme/search/key-7").0, 9);
    // Its lease settled, the revoked gateway can no longer report overruns there.
    assert!(denied(&as_principal(&mut h, "gw", overrun(1))));
}

#[test]
fn admin_does_everything_and_only_on_the_whole_ledger() {
    let mut h = H::tree();
    let bad = as_bootstrap_admin(&mut h, "root", Op::GrantRole(role("a", Role::Admin, "acme")));
    assert!(matches!(bad, Err(LedgerError::InvalidArgument { .. })), "{bad:?}");
    let bad =
        as_bootstrap_admin(&mut h, "root", Op::GrantRole(role("a", Role::Auditor, "_ration")));
    assert!(matches!(bad, Err(LedgerError::InvalidArgument { .. })), "{bad:?}");
    as_bootstrap_admin(&mut h, "root", Op::GrantRole(role("a", Role::Admin, "*"))).unwrap();
    assert!(as_principal(&mut h, "a", set_limits(9, 9, 9, 9)).is_ok());
    assert!(as_principal(&mut h, "a", acquire("acme", 1, 1, 60_000)).is_ok());
    let grant = Op::GrantRole(role("b", Role::Auditor, "acme/search"));
    assert!(as_principal(&mut h, "a", grant).is_ok());
    let holds = |h: &H, p: &str| h.ledger.roles_of(&who(p));
    assert_eq!(holds(&h, "b"), vec![(Role::Auditor, Scope::Subtree(path("acme/search")))]);
    // Reads follow the same rule.
    let l = &h.ledger;
    let b = who("b");
    assert!(l
        .authorize(&b, Authority::Roles, Action::ReadAudit(Some(&path("acme/search/key-7"))))
        .is_ok());
    assert!(l.authorize(&b, Authority::Roles, Action::ReadAudit(Some(&path("acme")))).is_err());
    assert!(l.authorize(&b, Authority::Roles, Action::ReadAudit(None)).is_err());
    assert!(l
        .authorize(&b, Authority::Roles, Action::ReadBudget(Some(&path("acme/search"))))
        .is_ok());
    assert!(l.authorize(&b, Authority::Roles, Action::Administer).is_err());
    assert!(l.authorize(&who("a"), Authority::Roles, Action::Administer).is_ok());
    // Unauthenticated requests (a plaintext cluster) are not checked at all.
    assert!(h.run("nobody", acquire("acme", 1, 1, 60_000)).is_ok());
}

#[test]
fn roles_survive_a_snapshot_and_are_bounded() {
    let mut h = H::tree();
    for i in 0..MAX_ROLES_PER_PRINCIPAL {
        let g = Op::GrantRole(role("many", Role::Gateway, &format!("acme/k{i}")));
        as_bootstrap_admin(&mut h, "root", g).unwrap();
    }
    let full = as_bootstrap_admin(&mut h, "root", Op::GrantRole(role("many", Role::Gateway, "zz")));
    assert!(matches!(full, Err(LedgerError::LedgerFull { .. })), "{full:?}");
    as_bootstrap_admin(&mut h, "root", Op::GrantRole(role("aud", Role::Auditor, "*"))).unwrap();
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored.digest(), h.ledger.digest());
    assert_eq!(restored.roles_of(&who("many")).len(), MAX_ROLES_PER_PRINCIPAL);
    assert_eq!(restored.roles_of(&who("aud")), vec![(Role::Auditor, Scope::All)]);
    assert_eq!(restored.all_roles(None, 10).len(), 2);
    assert_eq!(restored.all_roles(Some(&who("aud")), 10)[0].0, who("many"));
}

// ----- templates, instances and freezing -----

fn template(parent: &str, limits: Vec<LimitSpec>, max_instances: u64, idle_ms: u64) -> Op {
    Op::SetTemplate(crate::command::TemplateSpec {
        parent: path(parent),
        limits,
        max_instances,
        idle_ms,
        max_duration_ms: 0,
        guards: Vec::new(),
    })
}

/// acme (1000 tokens/month) with a template on acme/users: 100 tokens/day each.
fn users(max_instances: u64, idle_ms: u64) -> H {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("acme", vec![limit("tokens", 1000, Period::Month)])));
    h.ok("ops", Op::CreateBudget(spec("acme/users", vec![])));
    let t = template("acme/users", vec![limit("tokens", 100, Period::Day)], max_instances, idle_ms);
    h.ok("ops", t);
    h
}

fn kinds_since(h: &H, from: usize) -> Vec<(AuditKind, String)> {
    h.log.records()[from..].iter().map(|r| (r.entry.kind, r.entry.budget.to_string())).collect()
}

#[test]
fn the_first_acquire_on_a_templated_child_creates_it_once_even_when_gateways_race() {
    let mut h = users(10, 0);
    let before = h.log.records().len();
    // Three gateways ask for alice in one entry: one instance, three leases.
    let reqs: Vec<Command> = ["gw-1", "gw-2", "gw-3"]
        .iter()
        .map(|g| Command::Request(h.req(g, acquire("acme/users/alice", 40, 1, MIN))))
        .collect();
    let outcomes = h.entry(reqs);
    let granted: u64 = outcomes
        .iter()
        .map(|o| match o {
            Ok(Reply::Granted(g)) => g.granted,
            other => panic!("expected a grant, got {other:?}"),
        })
        .sum();
    assert!(granted <= 100, "the instance's cap holds: {granted}");
    let v = h.ledger.budget(&path("acme/users/alice")).unwrap();
    assert!(v.instance && v.version == 1 && v.live_leases == 3);
    assert_eq!(v.limits[0].spec.cap, 100);
    assert_eq!(h.ledger.template(&path("acme/users")).unwrap().instances, 1);
    let kinds = kinds_since(&h, before);
    assert_eq!(kinds[0], (AuditKind::BudgetCreated, "acme/users/alice".into()));
    assert_eq!(kinds.iter().filter(|k| k.0 == AuditKind::BudgetCreated).count(), 1);
    assert_eq!(kinds.iter().filter(|k| k.0 == AuditKind::LeaseGranted).count(), 3);
    // The creating gateway is the creation record's principal.
    assert_eq!(h.log.records()[before].entry.principal.as_str(), "gw-1");
    // Not a grandchild, and not a child of a budget without a template.
    assert!(matches!(
        h.run("gw-1", acquire("acme/users/alice/x", 1, 1, MIN)),
        Err(LedgerError::BudgetNotFound { .. })
    ));
    assert!(matches!(
        h.run("gw-1", acquire("acme/bob", 1, 1, MIN)),
        Err(LedgerError::BudgetNotFound { .. })
    ));
}

#[test]
fn a_refused_acquire_on_a_templated_child_creates_nothing() {
    let mut h = users(10, 0);
    let head = h.ledger.chain_head();
    let next_budget = h.ledger.next_budget_id;
    // Refused by the acquire itself (more than the instance's cap at minimum).
    let e = h.run("gw-1", acquire("acme/users/alice", 500, 500, MIN)).unwrap_err();
    assert!(matches!(e, LedgerError::Exhausted { .. }), "{e}");
    assert!(h.ledger.budget(&path("acme/users/alice")).is_none());
    assert_eq!(h.ledger.chain_head(), head, "no record was kept");
    assert_eq!(h.ledger.next_budget_id, next_budget);
    assert_eq!(h.ledger.template(&path("acme/users")).unwrap().instances, 0);
    // The same acquire within the cap creates it.
    h.ok("gw-1", acquire("acme/users/alice", 100, 100, MIN));
    assert!(h.ledger.is_instance(&path("acme/users/alice")));
}

#[test]
fn a_template_bounds_its_instances() {
    let mut h = users(2, 0);
    h.ok("gw-1", acquire("acme/users/a", 1, 1, MIN));
    h.ok("gw-1", acquire("acme/users/b", 1, 1, MIN));
    let e = h.run("gw-1", acquire("acme/users/c", 1, 1, MIN)).unwrap_err();
    assert!(
        matches!(&e, LedgerError::LedgerFull { max: 2, what } if what.contains("acme/users")),
        "{e}"
    );
    assert!(h.ledger.budget(&path("acme/users/c")).is_none());
    // Existing instances still work; an operator deleting one makes room.
    h.ok("gw-1", acquire("acme/users/a", 1, 1, MIN));
    h.tick(MIN);
    h.ok("ops", Op::DeleteBudget { path: path("acme/users/b"), expected_version: None });
    h.ok("gw-1", acquire("acme/users/c", 1, 1, MIN));
    assert_eq!(h.ledger.template(&path("acme/users")).unwrap().instances, 2);
}

#[test]
fn editing_a_template_rewrites_every_instance_or_none() {
    let mut h = users(10, 0);
    let a = h.grant("gw-1", acquire("acme/users/a", 60, 60, MIN));
    h.ok("gw-1", Op::Release(Release { lease: a.lease, consumed_total: 60 }));
    h.ok("gw-1", acquire("acme/users/b", 10, 10, MIN));
    // A cap below what a has spent today is refused, naming it; nothing changes.
    let e = h
        .run("ops", template("acme/users", vec![limit("tokens", 50, Period::Day)], 10, 0))
        .unwrap_err();
    assert!(
        matches!(&e, LedgerError::CapBelowUsage { path: p, in_use: 60, .. } if p.as_str() == "acme/users/a"),
        "{e}"
    );
    assert_eq!(h.ledger.budget(&path("acme/users/b")).unwrap().limits[0].spec.cap, 100);
    // A cap that fits is applied to both, keeping their figures.
    let r = h.ok("ops", template("acme/users", vec![limit("tokens", 70, Period::Day)], 10, 0));
    assert_eq!(r, Reply::TemplateSet { instances: 2 });
    let a = h.ledger.budget(&path("acme/users/a")).unwrap();
    assert_eq!((a.version, a.limits[0].spec.cap, a.limits[0].consumed), (2, 70, 60));
    assert_eq!(h.ledger.budget(&path("acme/users/b")).unwrap().limits[0].outstanding, 10);
    let e = h.run("gw-1", acquire("acme/users/a", 20, 20, MIN)).unwrap_err();
    assert!(matches!(e, LedgerError::Exhausted { available: 10, .. }), "{e}");
    // New instances get the new limits.
    h.ok("gw-1", acquire("acme/users/c", 1, 1, MIN));
    assert_eq!(h.ledger.budget(&path("acme/users/c")).unwrap().limits[0].spec.cap, 70);
}

#[test]
fn an_idle_instance_expires_only_once_its_spent_windows_have_ended() {
    const HOUR: u64 = 60 * MIN;
    let mut h = users(10, HOUR);
    let g = h.grant("gw-1", acquire("acme/users/a", 30, 30, MIN));
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 30 }));
    // An instance with nothing spent goes after an idle hour.
    let g = h.grant("gw-1", acquire("acme/users/b", 5, 5, MIN));
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 0 }));
    h.tick(HOUR + 1);
    assert!(h.ledger.budget(&path("acme/users/b")).is_none(), "b held no spend");
    // a spent 30 today: it stays until the day ends, so no one gets a fresh day.
    assert_eq!(h.usage("acme/users/a"), (30, 0));
    let day_end = Window::utc(Period::Day).bounds(h.now).1;
    h.now = day_end - 1;
    h.tick(0);
    assert!(h.ledger.budget(&path("acme/users/a")).is_some());
    let before = h.log.records().len();
    h.tick(1);
    assert!(h.ledger.budget(&path("acme/users/a")).is_none(), "its day ended");
    let r = &h.log.records()[before];
    assert_eq!((r.entry.kind, r.entry.principal.as_str()), (AuditKind::InstanceExpired, "_ration"));
    assert_eq!(r.entry.balances[0].consumed, 30, "its last figures are kept in the record");
    // The history stays: the month's spend on acme still counts it.
    assert_eq!(h.usage("acme"), (30, 0));
    assert_eq!(h.ledger.template(&path("acme/users")).unwrap().instances, 0);
    // The next acquire makes it again, fresh.
    h.ok("gw-1", acquire("acme/users/a", 1, 1, MIN));
    assert_eq!(h.usage("acme/users/a"), (0, 1));
}

#[test]
fn an_instance_with_a_live_lease_or_lifetime_spend_never_expires() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("runs", vec![])));
    h.ok("ops", template("runs", vec![limit("tokens", 100, Period::Lifetime)], 10, 1_000));
    let g = h.grant("gw-1", acquire("runs/r1", 10, 10, 3_600_000));
    h.tick(10_000);
    assert!(h.ledger.budget(&path("runs/r1")).is_some(), "a live lease keeps it");
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 4 }));
    h.tick(10_000);
    h.tick(365 * 24 * 3_600_000);
    assert!(h.ledger.budget(&path("runs/r1")).is_some(), "lifetime spend keeps it");
    assert_eq!(h.usage("runs/r1"), (4, 0));
}

#[test]
fn a_frozen_budget_grants_nothing_below_it_until_unfrozen() {
    let mut h = users(10, 0);
    let g = h.grant("gw-1", acquire("acme/users/a", 40, 40, MIN));
    let r = h.ok("ops", Op::Freeze { path: path("acme/users"), frozen: true });
    // acme/users has no limit of its own: nothing is summed there.
    assert_eq!(r, Reply::Frozen { changed: true, held: vec![] });
    let r = h.ok("ops", Op::Freeze { path: path("acme"), frozen: true });
    assert_eq!(r, Reply::Frozen { changed: true, held: vec![(unit("tokens"), 40)] });
    assert!(h.ledger.budget(&path("acme")).unwrap().frozen);
    for p in ["acme", "acme/users/a", "acme/users/new"] {
        let e = h.run("gw-1", acquire(p, 1, 1, MIN)).unwrap_err();
        assert!(matches!(&e, LedgerError::Frozen { .. }), "{p}: {e}");
        assert_eq!(e.kind(), crate::error::ErrorKind::FailedPrecondition);
    }
    assert!(h.ledger.budget(&path("acme/users/new")).is_none());
    // What was granted can still be reported, renewed and released.
    h.ok("gw-1", Op::Report(Report { lease: g.lease, consumed_delta: 5, renew_ttl_ms: Some(MIN) }));
    h.ok("gw-1", Op::Release(Release { lease: g.lease, consumed_total: 30 }));
    let r = h.ok("ops", Op::Freeze { path: path("acme"), frozen: true });
    assert_eq!(r, Reply::Frozen { changed: false, held: vec![(unit("tokens"), 0)] });
    h.ok("ops", Op::Freeze { path: path("acme"), frozen: false });
    let e = h.run("gw-1", acquire("acme/users/a", 1, 1, MIN)).unwrap_err();
    assert!(matches!(&e, LedgerError::Frozen { path: p } if p.as_str() == "acme/users"), "{e}");
    h.ok("ops", Op::Freeze { path: path("acme/users"), frozen: false });
    h.ok("gw-1", acquire("acme/users/a", 1, 1, MIN));
    let kinds: Vec<AuditKind> = h.log.records().iter().map(|r| r.entry.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == AuditKind::BudgetFrozen).count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == AuditKind::BudgetUnfrozen).count(), 2);
}

#[test]
fn templates_instances_and_freezes_survive_a_snapshot() {
    let mut h = users(10, 60 * MIN);
    h.ok("gw-1", acquire("acme/users/a", 1, 1, MIN));
    h.ok("ops", Op::Freeze { path: path("acme/users/a"), frozen: true });
    let bytes = h.ledger.snapshot();
    let restored = Ledger::restore(&bytes).unwrap();
    assert_eq!(restored.snapshot(), bytes);
    assert!(restored.is_frozen(&path("acme/users/a")));
    assert!(restored.is_instance(&path("acme/users/a")));
    assert_eq!(restored.template(&path("acme/users")), h.ledger.template(&path("acme/users")));
    h.ledger = restored;
    // The restored ledger still expires it: a day after, the instance is gone.
    h.ok("ops", Op::Freeze { path: path("acme/users/a"), frozen: false });
    h.tick(2 * MIN);
    h.tick(24 * 60 * MIN);
    assert!(h.ledger.budget(&path("acme/users/a")).is_none());
}

#[test]
fn a_template_keeps_its_budget_and_removing_it_keeps_its_instances() {
    let mut h = users(10, 60 * MIN);
    h.ok("gw-1", acquire("acme/users/a", 1, 1, MIN));
    h.tick(2 * MIN);
    let e = h.run("ops", Op::DeleteBudget { path: path("acme/users"), expected_version: None });
    assert!(matches!(e, Err(LedgerError::HasChildren { .. })), "{e:?}");
    let r = h.ok("ops", Op::DeleteTemplate { parent: path("acme/users") });
    assert_eq!(r, Reply::TemplateDeleted { instances: 1 });
    assert!(!h.ledger.is_instance(&path("acme/users/a")));
    h.tick(25 * 60 * MIN);
    assert!(h.ledger.budget(&path("acme/users/a")).is_some(), "ordinary budgets never expire");
    assert!(matches!(
        h.run("gw-1", acquire("acme/users/b", 1, 1, MIN)),
        Err(LedgerError::BudgetNotFound { .. })
    ));
    assert!(matches!(
        h.run("ops", Op::DeleteTemplate { parent: path("acme/users") }),
        Err(LedgerError::TemplateNotFound { .. })
    ));
    // A budget with a template is not deleted under it.
    h.ok("ops", Op::CreateBudget(spec("solo", vec![])));
    h.ok("ops", template("solo", vec![limit("tokens", 1, Period::Day)], 1, 0));
    let e = h.run("ops", Op::DeleteBudget { path: path("solo"), expected_version: None });
    assert!(matches!(e, Err(LedgerError::HasTemplate { .. })), "{e:?}");
    // Bad templates are refused with the field named.
    for (bad, field) in [
        (template("solo", vec![], 1, 0), "limits"),
        (template("solo", vec![limit("tokens", 1, Period::Day)], 0, 0), "max_instances"),
        (template("solo", vec![limit("tokens", 1, Period::Day)], 1, 5), "idle_ms"),
        (template("solo", vec![limit("tokens", 1, Period::Day)], 100_001, 0), "max_instances"),
    ] {
        let e = h.run("ops", bad).unwrap_err();
        assert!(matches!(&e, LedgerError::InvalidArgument { field: f, .. } if f == field), "{e}");
    }
}

/// runs (usd 1000 lifetime) with a run template: 500 usd and 100 calls each,
/// runs last 10 minutes, guard: at most 10 calls per 10 s.
fn runs(idle_ms: u64) -> H {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("runs", vec![limit("tokens", 1000, Period::Lifetime)])));
    let t = crate::command::TemplateSpec {
        parent: path("runs"),
        limits: vec![limit("tokens", 500, Period::Lifetime), limit("calls", 100, Period::Lifetime)],
        max_instances: 100,
        idle_ms,
        max_duration_ms: 10 * MIN,
        guards: vec![crate::command::Guard { unit: unit("calls"), max: 10, per_ms: 10_000 }],
    };
    h.ok("ops", Op::SetTemplate(t));
    h
}

fn calls(p: &str, wanted: u64, min: u64) -> Op {
    Op::Acquire(Acquire { budget: path(p), unit: unit("calls"), wanted, min, ttl_ms: MIN })
}

#[test]
fn a_runaway_guard_caps_each_span_and_halts_a_run_whose_spend_reaches_it() {
    let mut h = runs(0);
    let a = h.grant("gw-1", calls("runs/r1", 8, 1));
    assert_eq!(a.granted, 8);
    // The guard caps the span: 2 are left of 10, and asking is no offence.
    let b = h.grant("gw-2", calls("runs/r1", 5, 1));
    assert_eq!(b.granted, 2);
    let e = h.run("gw-1", calls("runs/r1", 4, 1)).unwrap_err();
    assert!(matches!(e, LedgerError::GuardReached { max: 10, .. }), "{e}");
    assert_eq!(e.kind(), crate::error::ErrorKind::ResourceExhausted);
    assert!(!h.ledger.is_frozen(&path("runs/r1")));
    // Spend: 8 reported, then 2 released: 10 in the span reaches the guard.
    h.ok("gw-1", Op::Report(Report { lease: a.lease, consumed_delta: 8, renew_ttl_ms: None }));
    assert!(!h.ledger.is_frozen(&path("runs/r1")));
    let before = h.log.records().len();
    h.ok("gw-2", Op::Release(Release { lease: b.lease, consumed_total: 2 }));
    let r = h.log.records().last().unwrap();
    assert_eq!(h.log.records().len(), before + 2, "the release, then the halt");
    assert_eq!((r.entry.kind, r.entry.principal.as_str()), (AuditKind::RunHalted, "gw-2"));
    assert_eq!((r.entry.balances[0].cap, r.entry.balances[0].consumed), (10, 10));
    assert_eq!(h.ledger.holds(), (0, 1, 1));
    let v = h.ledger.budget(&path("runs/r1")).unwrap();
    assert!(v.frozen && v.hold.as_deref().unwrap().contains("runaway guard"));
    // Halted for every unit and gateway, also in a later span; settling still works.
    h.tick(10_000);
    for op in [calls("runs/r1", 1, 1), acquire("runs/r1", 1, 1, MIN)] {
        let e = h.run("gw-3", op).unwrap_err();
        assert!(
            matches!(&e, LedgerError::Halted { reason, .. } if reason.contains("spent 10 calls")),
            "{e}"
        );
    }
    h.ok("gw-1", Op::Release(Release { lease: a.lease, consumed_total: 8 }));
    // Other runs are untouched; an operator can resume it, in a new span.
    h.ok("gw-1", calls("runs/r2", 1, 1));
    h.ok("ops", Op::Freeze { path: path("runs/r1"), frozen: false });
    assert_eq!(h.grant("gw-1", calls("runs/r1", 20, 1)).granted, 10, "a new span");
    assert_eq!(h.ledger.holds(), (0, 0, 1));
    // A snapshot keeps the spans and the count.
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored.holds(), (0, 0, 1));
    assert_eq!(restored.snapshot(), h.ledger.snapshot());
}

#[test]
fn spend_charged_at_expiry_or_overrun_counts_against_a_guard() {
    let mut h = runs(0);
    h.grant("gw-1", calls("runs/r1", 10, 1));
    h.tick(MIN);
    // The lease expired unreported: its 10 were charged, and that is spend.
    let v = h.ledger.budget(&path("runs/r1")).unwrap();
    assert!(v.frozen, "{:?}", v.hold);
    let mut h = runs(0);
    h.grant("gw-1", calls("runs/r2", 1, 1));
    let o = Op::Overrun(crate::command::Overrun {
        budget: path("runs/r2"),
        unit: unit("calls"),
        amount: 10,
    });
    h.ok("gw-1", o);
    assert!(h.ledger.is_frozen(&path("runs/r2")));
    // A run that was never made by an overrun is made, and halted, by it.
    let o = Op::Overrun(crate::command::Overrun {
        budget: path("runs/r3"),
        unit: unit("calls"),
        amount: 11,
    });
    h.ok("gw-1", o);
    assert!(h.ledger.is_frozen(&path("runs/r3")) && h.ledger.is_instance(&path("runs/r3")));
}

#[test]
fn a_run_grants_nothing_past_its_max_duration_and_then_expires() {
    let mut h = runs(MIN);
    let g = h.grant("gw-1", acquire("runs/r1", 100, 1, 3_600_000));
    assert!(g.expires_at_ms <= T0 + 10 * MIN, "a lease never outlives its run");
    h.now += 9 * MIN;
    let g2 = h.grant("gw-1", acquire("runs/r1", 10, 1, MIN));
    assert_eq!(g2.expires_at_ms, T0 + 10 * MIN, "cut at the run's end");
    h.ok("gw-1", Op::Release(Release { lease: g2.lease, consumed_total: 10 }));
    h.now += MIN;
    let e = h.run("gw-1", acquire("runs/r1", 1, 1, MIN)).unwrap_err();
    assert!(matches!(e, LedgerError::RunEnded { ended_at_ms, .. } if ended_at_ms == T0 + 10 * MIN));
    // Its first lease expired at the end and was charged; with nothing live, the
    // ended run is deleted after an idle minute although its limits are lifetime.
    assert_eq!(h.usage("runs/r1"), (110, 0));
    h.tick(MIN + 1);
    assert!(h.ledger.budget(&path("runs/r1")).is_none());
    assert_eq!(h.usage("runs"), (110, 0), "the parent keeps the run's spend");
}

#[test]
fn a_concurrent_limit_holds_units_in_flight_and_gets_them_back_however_a_lease_ends() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("org", vec![limit("calls", 100, Period::Lifetime)])));
    h.ok("ops", Op::CreateBudget(spec("org/run", vec![limit("calls", 3, Period::Concurrent)])));
    let slot = |h: &mut H, gw: &str| h.run(gw, calls("org/run", 1, 1));
    let a = match slot(&mut h, "gw-1").unwrap() {
        Reply::Granted(g) => g,
        other => panic!("{other:?}"),
    };
    let b = match slot(&mut h, "gw-2").unwrap() {
        Reply::Granted(g) => g,
        other => panic!("{other:?}"),
    };
    slot(&mut h, "gw-3").unwrap();
    let e = slot(&mut h, "gw-4").unwrap_err();
    assert!(matches!(e, LedgerError::Exhausted { available: 0, .. }), "{e}");
    // A call that ended: its unit comes back, and it counts once on the lifetime limit.
    h.ok("gw-1", Op::Release(Release { lease: a.lease, consumed_total: 1 }));
    let run = h.ledger.budget(&path("org/run")).unwrap();
    assert_eq!((run.limits[0].consumed, run.limits[0].outstanding), (0, 2));
    assert_eq!(h.usage("org"), (1, 2));
    slot(&mut h, "gw-4").unwrap();
    // Reported spend frees nothing early: the unit is held until the lease ends...
    h.ok("gw-2", Op::Report(Report { lease: b.lease, consumed_delta: 1, renew_ttl_ms: None }));
    let run = h.ledger.budget(&path("org/run")).unwrap();
    assert_eq!((run.limits[0].consumed, run.limits[0].outstanding), (0, 2));
    // ... and a crashed gateway's leases come back at expiry, charged only where
    // spend counts.
    h.tick(MIN);
    let run = h.ledger.budget(&path("org/run")).unwrap();
    assert_eq!(
        (run.limits[0].consumed, run.limits[0].outstanding, run.limits[0].remaining),
        (0, 0, 3)
    );
    assert_eq!(h.usage("org"), (4, 0), "1 released, 1 reported and 2 charged at expiry");
    // A late release refunds only where the expiry charged.
    h.ok("gw-2", Op::Release(Release { lease: b.lease, consumed_total: 1 }));
    assert_eq!(h.ledger.budget(&path("org/run")).unwrap().limits[0].consumed, 0);
    // An overrun is spend: counted on the lifetime limit, not on the one in flight.
    let o = |p: &str| {
        Op::Overrun(crate::command::Overrun { budget: path(p), unit: unit("calls"), amount: 2 })
    };
    h.ok("gw-1", o("org/run"));
    assert_eq!(h.ledger.budget(&path("org/run")).unwrap().limits[0].consumed, 0);
    h.ok("ops", Op::CreateBudget(spec("solo", vec![limit("calls", 3, Period::Concurrent)])));
    assert!(matches!(h.run("gw-1", o("solo")), Err(LedgerError::NoLimitForUnit { .. })));
    assert!(Window::with_offset(Period::Concurrent, 60).is_err());
}

// ----- money and visibility -----

fn price(model: &str, input: u64, output: u64, effective_from_ms: u64) -> Op {
    Op::SetPrice(crate::command::PriceSpec {
        model: model.into(),
        price: crate::command::Price { input, cached_input: input / 10, output },
        effective_from_ms,
    })
}

fn options(p: &str, thresholds_pct: Vec<u32>, shadow: bool) -> Op {
    Op::SetOptions {
        path: path(p),
        options: crate::command::BudgetOptions { thresholds_pct, shadow },
    }
}

fn spend_now(h: &mut H, p: &str, amount: u64) {
    let g = h.grant("gw", acquire(p, amount, amount, 60_000));
    h.ok("gw", Op::Release(Release { lease: g.lease, consumed_total: amount }));
}

fn details(h: &H, from: usize, kind: AuditKind) -> Vec<crate::audit::Detail> {
    h.log.records()[from..]
        .iter()
        .filter(|r| r.entry.kind == kind)
        .filter_map(|r| r.entry.detail.clone())
        .collect()
}

#[test]
fn prices_are_versioned_in_effective_order_and_audited() {
    let mut h = H::new();
    assert_eq!(
        h.ok("ops", price("gpt-x", 2_500_000, 10_000_000, 0)),
        Reply::PriceSet { version: 1, effective_from_ms: T0 }
    );
    h.tick(1_000);
    let later = T0 + 60_000;
    assert_eq!(
        h.ok("ops", price("gpt-x", 1_250_000, 5_000_000, later)),
        Reply::PriceSet { version: 2, effective_from_ms: later }
    );
    // Out of order, bad names and absurd prices are refused.
    assert!(h.run("ops", price("gpt-x", 1, 1, T0 + 30_000)).is_err());
    assert!(h.run("ops", price("bad model", 1, 1, 0)).is_err());
    assert!(h.run("ops", price("gpt-y", crate::command::MAX_PRICE_PER_MTOK + 1, 1, 0)).is_err());
    let at = |t| h.ledger.price_at("gpt-x", t).map(|v| v.version);
    assert_eq!((at(T0 - 1), at(T0), at(later - 1), at(later)), (None, Some(1), Some(1), Some(2)));
    // 1,000 input and 500 output tokens at version 1: 2,500 + 5,000 usd_micros.
    let v1 = h.ledger.price_at("gpt-x", T0).unwrap().price;
    assert_eq!(v1.cost(1_000, 0, 500), 7_500);
    assert_eq!(v1.cost(1, 0, 0), 3, "rounded up to the next usd_micro");
    let sets = details(&h, 0, AuditKind::PriceSet);
    assert_eq!(sets.len(), 2);
    // A snapshot keeps the book.
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored, h.ledger);
}

#[test]
fn thresholds_are_crossed_once_per_window_on_every_spend_path() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("team", vec![limit("tokens", 1_000, Period::Minute)])));
    h.ok("ops", options("team", vec![80, 50, 100], false));
    let from = h.log.len();
    spend_now(&mut h, "team", 400);
    assert!(details(&h, from, AuditKind::ThresholdCrossed).is_empty());
    spend_now(&mut h, "team", 450); // 85%: crosses 50 and 80 in one command
    let crossed = details(&h, from, AuditKind::ThresholdCrossed);
    assert_eq!(
        crossed,
        vec![
            crate::audit::Detail::Threshold { percent: 50 },
            crate::audit::Detail::Threshold { percent: 80 }
        ]
    );
    let view = h.ledger.budget(&path("team")).unwrap();
    assert_eq!(view.limits[0].threshold_reached_pct, Some(80));
    // The record names the request that caused it.
    let rec =
        h.log.records().iter().rev().find(|r| r.entry.kind == AuditKind::ThresholdCrossed).unwrap();
    assert_eq!(rec.entry.cause.as_ref().unwrap().client.as_str(), "gw-client");
    spend_now(&mut h, "team", 10);
    assert_eq!(details(&h, from, AuditKind::ThresholdCrossed).len(), 2, "no repeat");
    // An expiry charge crosses 100% (no request behind it: no cause).
    let g = h.grant("gw", acquire("team", 140, 140, 1_000));
    h.tick(1_500);
    let last =
        h.log.records().iter().rev().find(|r| r.entry.kind == AuditKind::ThresholdCrossed).unwrap();
    assert_eq!(last.entry.detail, Some(crate::audit::Detail::Threshold { percent: 100 }));
    assert!(last.entry.cause.is_none());
    let _ = g;
    // A new window crosses them again.
    h.tick(MIN);
    let from = h.log.len();
    spend_now(&mut h, "team", 600);
    assert_eq!(details(&h, from, AuditKind::ThresholdCrossed).len(), 1);
    assert_eq!(h.ledger.visibility_totals().0, 4);
    // An overrun counts too.
    let from = h.log.len();
    h.ok("gw", overrun("team", 500));
    assert_eq!(details(&h, from, AuditKind::ThresholdCrossed).len(), 2);
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored, h.ledger);
}

#[test]
fn a_shadow_budget_refuses_nothing_records_what_it_would_have_and_its_parent_still_holds() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("org", vec![limit("tokens", 1_000, Period::Day)])));
    h.ok("ops", Op::CreateBudget(spec("org/new", vec![limit("tokens", 100, Period::Day)])));
    h.ok("ops", options("org/new", vec![], true));
    let from = h.log.len();
    // Its cap (100) does not bound the grant; the parent's (1,000) does.
    let g = h.grant("gw", acquire("org/new", 300, 300, 60_000));
    assert_eq!(g.granted, 300);
    let refusals = details(&h, from, AuditKind::ShadowRefusal);
    assert_eq!(refusals, vec![crate::audit::Detail::WouldRefuse { granted: 300, available: 100 }]);
    let g2 = h.grant("gw", acquire("org/new", 600, 600, 60_000));
    assert_eq!(g2.granted, 600);
    assert_eq!(details(&h, from, AuditKind::ShadowRefusal).len(), 2);
    // The parent's cap refuses as always.
    assert!(matches!(
        h.run("gw", acquire("org/new", 200, 200, 60_000)),
        Err(LedgerError::Exhausted { .. })
    ));
    let view = h.ledger.budget(&path("org/new")).unwrap();
    let shadow_on = crate::command::BudgetOptions { thresholds_pct: vec![], shadow: true };
    assert_eq!((view.options, view.shadow_refusals), (Some(shadow_on), 2));
    h.ok("gw", Op::Release(Release { lease: g.lease, consumed_total: 300 }));
    h.ok("gw", Op::Release(Release { lease: g2.lease, consumed_total: 600 }));
    assert_eq!(h.usage("org"), (900, 0));
    assert_eq!(h.usage("org/new"), (900, 0));
    // Enforcing it now would break its cap: refused with the figures.
    let err = h.run("ops", options("org/new", vec![], false)).unwrap_err();
    assert!(err.to_string().contains("holds 900"), "{err}");
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    assert_eq!(restored, h.ledger);
    // Next day it can be enforced.
    h.tick(24 * 60 * MIN);
    h.ok("ops", options("org/new", vec![], false));
    assert!(h.run("gw", acquire("org/new", 200, 200, 60_000)).is_err());
}

#[test]
fn annotated_commands_carry_their_trace_and_usage_and_calls_are_found_by_trace() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("runs", vec![limit("usd_micros", 1_000_000, Period::Day)])));
    let line = crate::command::UsageLine {
        model: "gpt-x".into(),
        price_version: 1,
        calls: 1,
        input_tokens: 1_000,
        cached_tokens: 0,
        output_tokens: 500,
        cost_usd_micros: 7_500,
    };
    let note = crate::command::Annotation { trace: Some("run-42".into()), usage: vec![] };
    let acq = Op::Acquire(Acquire {
        budget: path("runs"),
        unit: unit("usd_micros"),
        wanted: 10_000,
        min: 1,
        ttl_ms: 60_000,
    });
    let g = match h.ok("gw", Op::Annotated { note: note.clone(), op: Box::new(acq) }) {
        Reply::Granted(g) => g,
        other => panic!("{other:?}"),
    };
    h.ok(
        "gw",
        Op::RecordCall(crate::command::CallRecord {
            budget: path("runs"),
            trace: "run-42".into(),
            usage: line.clone(),
        }),
    );
    let settle = crate::command::Annotation { trace: None, usage: vec![line.clone()] };
    h.ok(
        "gw",
        Op::Annotated {
            note: settle,
            op: Box::new(Op::Release(Release { lease: g.lease, consumed_total: 7_500 })),
        },
    );
    let filter = AuditFilter { trace: Some("run-42".into()), ..AuditFilter::default() };
    let kinds: Vec<AuditKind> = h.log.query(&filter).map(|r| r.entry.kind).collect();
    assert_eq!(kinds, vec![AuditKind::LeaseGranted, AuditKind::CallRecorded]);
    let released =
        h.log.records().iter().find(|r| r.entry.kind == AuditKind::LeaseReleased).unwrap();
    let cause = released.entry.cause.as_ref().unwrap();
    assert_eq!((cause.client.as_str(), cause.usage.clone()), ("gw-client", vec![line]));
    // Every record of a request names its client and request id.
    assert!(h.log.records().iter().all(|r| r.entry.cause.is_some()));
    // Nested annotations and bad traces are refused.
    let nested = Op::Annotated {
        note: note.clone(),
        op: Box::new(Op::Annotated { note, op: Box::new(overrun("runs", 1)) }),
    };
    assert!(h.run("gw", nested).is_err());
    let bad = crate::command::Annotation { trace: Some("has space".into()), usage: vec![] };
    assert!(h.run("gw", Op::Annotated { note: bad, op: Box::new(overrun("runs", 1)) }).is_err());
    h.log.verify().unwrap();
}

#[test]
fn a_record_without_a_cause_hashes_as_the_first_audit_format_and_both_formats_decode() {
    let mut h = H::tree();
    let g = h.grant("gw-1", acquire("acme/search/key-7", 100, 1, 1_000));
    h.tick(2_000); // expiry: a record with no cause
    let _ = g;
    let expired =
        h.log.records().iter().find(|r| r.entry.kind == AuditKind::LeaseExpired).unwrap().clone();
    assert!(expired.entry.cause.is_none());
    // Written in format 1 (no cause, no detail), it decodes and keeps its hash.
    let e = &expired.entry;
    let legacy = postcard::to_stdvec(&(
        (
            e.seq,
            e.log_index,
            e.time_ms,
            e.effective_ms,
            e.kind,
            &e.budget,
            &e.principal,
            &e.unit,
            &e.lease,
            &e.flow,
            &e.balances,
            &e.limits,
            &e.prev_hash,
        ),
        expired.hash,
    ))
    .unwrap();
    // Written by this version, such a record has exactly format 1's bytes.
    assert_eq!(crate::audit::encode_record(&expired), legacy);
    for r in h.log.records() {
        assert_eq!(&crate::audit::decode_record(&crate::audit::encode_record(r)).unwrap(), r);
        // The leading fields and the hash read from the bytes alone, in both formats.
        let bytes = crate::audit::encode_record(r);
        let (head, hash) = crate::audit::record_head(&bytes).unwrap();
        let e = &r.entry;
        assert_eq!(
            (head.seq, head.log_index, head.time_ms, head.effective_ms, head.kind),
            (e.seq, e.log_index, e.time_ms, e.effective_ms, e.kind)
        );
        assert_eq!(
            (head.budget, head.root(), head.principal),
            (e.budget.as_str(), e.budget.root(), e.principal.as_str())
        );
        assert_eq!(hash, r.hash);
        let onto = crate::audit::encode_record_onto(r, vec![7]);
        assert_eq!((onto[0], &onto[1..]), (7, &bytes[..]));
    }
    let (head, hash) = crate::audit::record_head(&legacy).unwrap();
    assert_eq!(
        (head.seq, head.kind, hash),
        (expired.entry.seq, AuditKind::LeaseExpired, expired.hash)
    );
    assert!(crate::audit::record_head(&legacy[..20]).is_err());
    assert!(h.log.records().iter().any(|r| r.entry.cause.is_some()));
    let decoded = crate::audit::decode_record(&legacy).unwrap();
    assert_eq!(decoded, expired);
    assert_eq!(decoded.entry.compute_hash(), expired.hash);
    let current = postcard::to_stdvec(&h.log.records().to_vec()).unwrap();
    assert_eq!(crate::audit::decode_records(&current).unwrap(), h.log.records());
    // A list of format-1 records (as a sled value or a snapshot section holds it).
    let mut list = vec![2u8];
    list.extend_from_slice(&legacy);
    list.extend_from_slice(&legacy);
    assert_eq!(crate::audit::decode_records(&list).unwrap(), vec![expired.clone(), expired]);
    assert!(crate::audit::decode_records(&legacy[..legacy.len() - 1]).is_err());
}

#[test]
fn the_burn_rate_follows_a_steady_load_and_projects_exhaustion() {
    let mut h = H::new();
    h.ok("ops", Op::CreateBudget(spec("team", vec![limit("tokens", 1_000_000, Period::Day)])));
    // 100 tokens every 500 ms: 200 tokens/s.
    for _ in 0..120 {
        spend_now(&mut h, "team", 100);
        h.tick(500);
    }
    let f = &h.ledger.forecast(&path("team")).unwrap()[0];
    assert!((f.rate_per_s - 200.0).abs() / 200.0 < 0.06, "rate {}", f.rate_per_s);
    let remaining_s = (f.cap - f.consumed) as f64 / 200.0;
    let projected = f.exhausts_at_ms.unwrap() as f64;
    let truth = h.ledger.now_ms() as f64 + remaining_s * 1000.0;
    assert!((projected - truth).abs() / (remaining_s * 1000.0) < 0.06);
    // Idle for two buckets: no rate, no projection.
    h.tick(2 * RATE_BUCKET_MS + 1);
    let f = &h.ledger.forecast(&path("team")).unwrap()[0];
    assert_eq!((f.rate_per_s, f.exhausts_at_ms), (0.0, None));
}

#[test]
fn notices_are_acknowledged_forward_only_and_within_the_chain() {
    let mut h = H::tree();
    let end = h.ledger.chain_head().next_seq;
    h.index += 1;
    let applied = h.ledger.apply(
        h.index,
        &Entry::V1(Batch {
            time_ms: h.now,
            commands: vec![
                Command::AckNotices { upto_seq: 2 },
                Command::AckNotices { upto_seq: 1 },
                Command::AckNotices { upto_seq: end + 100 },
            ],
        }),
    );
    let acked: Vec<u64> = applied
        .outcomes
        .iter()
        .map(|o| match o {
            Ok(Reply::NoticesAcked { acked_seq }) => *acked_seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(acked, vec![2, 2, end]);
    h.ledger.check_invariants().unwrap();
}

#[test]
fn leases_are_listed_lowest_id_first_up_to_the_limit() {
    let mut h = H::tree();
    let mut ids = Vec::new();
    for (i, who) in ["gw-1", "gw-2", "gw-1", "gw-3", "gw-1", "gw-2"].iter().enumerate() {
        // One per entry, so each lease id is a new log index.
        let g = h.grant(who, acquire("acme/search/key-7", 10 + i as u64, 1, 10_000));
        ids.push((g.lease, *who));
    }
    ids.sort();
    let listed = |h: &H, p: Option<&str>, n: usize| -> Vec<LeaseId> {
        h.ledger.leases(p.map(who).as_ref(), n).iter().map(|l| l.lease).collect()
    };
    let all: Vec<LeaseId> = ids.iter().map(|(l, _)| *l).collect();
    assert_eq!(listed(&h, None, usize::MAX), all);
    assert_eq!(listed(&h, None, 6), all);
    assert_eq!(listed(&h, None, 2), all[..2]);
    assert_eq!(listed(&h, None, 0), Vec::<LeaseId>::new());
    let gw1: Vec<LeaseId> = ids.iter().filter(|(_, w)| *w == "gw-1").map(|(l, _)| *l).collect();
    assert_eq!(listed(&h, Some("gw-1"), 2), gw1[..2]);
    assert_eq!(listed(&h, Some("gw-1"), 10), gw1);
    assert_eq!(listed(&h, Some("gw-9"), 10), Vec::<LeaseId>::new());
}

/// A request acts through the ledger's own copy of its principal: what it stores
/// (a lease's principal, a client's owner) shares that copy; leases do after a restore too,
/// so comparing them does not read the text. Copies of one name made apart are
/// still equal and hash alike.
#[test]
fn leases_share_the_ledgers_copy_of_their_principal() {
    use std::hash::BuildHasher;
    let apart = (who("gw"), who("gw"));
    assert_eq!(apart.0, apart.1);
    let s = std::collections::hash_map::RandomState::new();
    assert_eq!(s.hash_one(&apart.0), s.hash_one(&apart.1));
    assert_ne!(who("gw"), who("gx"));

    let mut h = H::tree();
    let first = h.grant("gw", acquire("acme/search", 10, 1, MIN)).lease;
    let second = h.grant("gw", acquire("acme/search/key-7", 10, 1, MIN)).lease;
    let shared = |l: &Ledger| {
        let key = l.principals.canonical(&who("gw")).unwrap().clone();
        let lease = |id| l.leases.get(&id).unwrap().principal.clone();
        assert!(key.same_copy(&lease(first)) && key.same_copy(&lease(second)));
    };
    shared(&h.ledger);
    let restored = Ledger::restore(&h.ledger.snapshot()).unwrap();
    shared(&restored);
    assert_eq!(restored, h.ledger);
}
