use ration_core::audit::AuditKind;
use ration_core::{
    Acquire, BudgetPath, BudgetSpec, ClientId, FailPolicy, LeaseId, LedgerError, LimitSpec, Op,
    Period, Principal, Release, Reply, Request, Unit, Window,
};
use tonic::Code;

use super::{to_core, to_proto};
use crate::v1;

fn meta() -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        client_id: "c".into(),
        request_id: 1,
        principal: "gw".into(),
        ..Default::default()
    })
}

#[test]
fn negative_and_malformed_input_is_refused_with_the_field() {
    let bad = v1::AcquireRequest {
        meta: meta(),
        budget: "acme".into(),
        unit: "tokens".into(),
        wanted: -5,
        min: 0,
        ttl_ms: 1000,
        starts_at_ms: 0,
    };
    let err = to_core::acquire(&bad).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("wanted must not be negative"), "{}", err.message());
    let bad = v1::AcquireRequest { budget: "a//b".into(), wanted: 5, ..bad };
    assert!(to_core::acquire(&bad).unwrap_err().message().contains("budget"));
    let bad = v1::AcquireRequest { meta: None, budget: "a".into(), ..bad };
    assert!(to_core::acquire(&bad).unwrap_err().message().contains("meta"));
    let w = v1::Window { period: 99, offset_minutes: 0 };
    assert!(to_core::window(Some(&w)).unwrap_err().message().contains("period"));
    assert!(to_core::audit_kind("nope").is_err());
    assert_eq!(to_core::audit_kind("lease_expired").unwrap(), AuditKind::LeaseExpired);
}

#[test]
fn limits_round_trip() {
    let l = v1::Limit {
        unit: "usd_micros".into(),
        cap: 5,
        window: Some(v1::Window { period: v1::Period::Day as i32, offset_minutes: 330 }),
        static_allowance: Some(2),
    };
    assert_eq!(to_proto::limit(&to_core::limit(&l).unwrap()), l);
}

#[test]
fn audit_records_round_trip_exactly() {
    use ration_core::{Batch, Command, Entry, Ledger, LedgerConfig};
    let req = |id, op| {
        Command::Request(Request {
            client: ClientId::new("c").unwrap(),
            request_id: id,
            principal: Principal::new("gw").unwrap(),
            op,
        })
    };
    let day = Window::with_offset(Period::Day, 60).unwrap();
    let spec = BudgetSpec {
        path: BudgetPath::new("acme").unwrap(),
        limits: vec![LimitSpec {
            unit: Unit::new("tokens").unwrap(),
            cap: 100,
            window: day,
            on_unreachable: FailPolicy::StaticAllowance { amount: 3 },
        }],
    };
    let acquire = Acquire {
        budget: spec.path.clone(),
        unit: Unit::new("tokens").unwrap(),
        wanted: 40,
        min: 1,
        ttl_ms: 5_000,
    };
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut records = Vec::new();
    let first = Entry::V1(Batch {
        time_ms: 1_000_000,
        commands: vec![req(1, Op::CreateBudget(spec)), req(2, Op::Acquire(acquire))],
    });
    let applied = ledger.apply(2, &first);
    let Ok(Reply::Granted(grant)) = &applied.outcomes[1] else { panic!("{applied:?}") };
    records.extend(applied.audit);
    let release = Release { lease: grant.lease, consumed_total: 7 };
    use ration_core::command::{
        Annotation, BudgetOptions, CallRecord, Price, PriceSpec, UsageLine,
    };
    let line = UsageLine {
        model: "gpt-x".into(),
        price_version: 1,
        calls: 2,
        input_tokens: 5,
        cached_tokens: 1,
        output_tokens: 1,
        cost_usd_micros: 7,
    };
    let price = Price { input: 1_000_000, cached_input: 100_000, output: 2_000_000 };
    let commands = vec![
        req(3, Op::SetPrice(PriceSpec { model: "gpt-x".into(), price, effective_from_ms: 0 })),
        req(
            4,
            Op::SetOptions {
                path: BudgetPath::new("acme").unwrap(),
                options: BudgetOptions { thresholds_pct: vec![5, 90], shadow: true },
            },
        ),
        req(
            5,
            Op::Annotated {
                note: Annotation { trace: Some("00-abc-01".into()), usage: vec![line.clone()] },
                op: Box::new(Op::Release(release)),
            },
        ),
        req(
            6,
            Op::RecordCall(CallRecord {
                budget: BudgetPath::new("acme").unwrap(),
                trace: "00-abc-01".into(),
                usage: line,
            }),
        ),
        req(
            7,
            Op::Acquire(Acquire {
                budget: BudgetPath::new("acme").unwrap(),
                unit: Unit::new("tokens").unwrap(),
                wanted: 200,
                min: 200,
                ttl_ms: 5_000,
            }),
        ),
    ];
    let second = Entry::V1(Batch { time_ms: 1_000_001, commands });
    let applied = ledger.apply(3, &second);
    assert!(applied.outcomes.iter().all(Result::is_ok), "{:?}", applied.outcomes);
    records.extend(applied.audit);
    let kinds: Vec<&str> = records.iter().map(|r| r.entry.kind.name()).collect();
    assert_eq!(
        kinds,
        [
            "budget_created",
            "lease_granted",
            "price_set",
            "options_set",
            "lease_released",
            "threshold_crossed",
            "call_recorded",
            "shadow_refusal",
            "lease_granted"
        ]
    );
    for r in &records {
        assert_eq!(&to_core::audit_record(&to_proto::audit_record(r)).unwrap(), r);
    }
    let mut bad = to_proto::audit_record(&records[0]);
    bad.hash.pop();
    assert!(to_core::audit_record(&bad).unwrap_err().message().contains("hash must be 32 bytes"));
}

#[test]
fn refusals_map_to_codes() {
    let e = LedgerError::LeaseNotFound { lease: LeaseId::from_raw(1) };
    assert_eq!(to_proto::status(&e).code(), Code::NotFound);
    assert!(to_proto::status(&e).message().contains("lease 1"));
}

#[test]
fn reads_convert_with_pages_bounded_and_fields_named() {
    use super::{DEFAULT_PAGE, MAX_PAGE};
    assert_eq!(to_core::page(0), DEFAULT_PAGE);
    assert_eq!(to_core::page(7), 7);
    assert_eq!(to_core::page(u32::MAX), MAX_PAGE);
    let list = v1::ListBudgetsRequest {
        subtree: "acme".into(),
        start_after: String::new(),
        limit: 0,
        linearizable: false,
    };
    let page = to_core::list_budgets(&list).unwrap();
    assert_eq!(page.subtree, Some(BudgetPath::new("acme").unwrap()));
    assert_eq!((page.start_after, page.limit), (None, DEFAULT_PAGE));
    let bad = v1::ListBudgetsRequest { start_after: "a//b".into(), ..list };
    assert!(to_core::list_budgets(&bad).unwrap_err().message().starts_with("start_after"));
    let audit = v1::QueryAuditRequest {
        principal: "gw".into(),
        kinds: vec!["lease_expired".into()],
        from_seq: 5,
        limit: 2_000,
        ..Default::default()
    };
    let page = to_core::query_audit(&audit).unwrap();
    assert_eq!(page.filter.principal, Some(Principal::new("gw").unwrap()));
    assert_eq!(page.filter.kinds, vec![AuditKind::LeaseExpired]);
    assert_eq!((page.from_seq, page.limit), (5, MAX_PAGE));
    let bad = v1::QueryAuditRequest { kinds: vec!["nope".into()], ..audit.clone() };
    assert!(to_core::query_audit(&bad).unwrap_err().message().contains("unknown audit kind"));
    let bad = v1::QueryAuditRequest { principal: " ".into(), ..audit };
    assert!(to_core::query_audit(&bad).unwrap_err().message().starts_with("principal"));
}

#[test]
fn a_window_that_never_ends_has_no_end_in_the_api() {
    let grant = |window_end_ms| {
        let reply = Reply::Granted(ration_core::Grant {
            lease: LeaseId::from_raw(7),
            granted: 1,
            expires_at_ms: 1_000,
            window_end_ms,
            ttl_ms: 1_000,
        });
        match to_proto::batch_result(&Ok(reply)).result {
            Some(v1::batch_result::Result::Lease(l)) => l.window_end_ms,
            other => panic!("{other:?}"),
        }
    };
    // A lifetime window ends at u64::MAX in the ledger: no end in the API.
    assert_eq!(grant(u64::MAX), None);
    // Any window that ends, up to the end of ledger time, keeps its end.
    assert_eq!(grant(60_000), Some(60_000));
    let last = ration_core::window::MAX_TIME_MS + 1;
    assert_eq!(grant(last), Some(last));
}
