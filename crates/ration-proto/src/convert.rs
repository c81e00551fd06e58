//! Protobuf ⇄ ration-core. Every field a client sends is checked here or by the
//! core's own constructors; a bad one becomes INVALID_ARGUMENT naming the field.

use ration_core::audit::{AuditKind, AuditRecord};
use ration_core::ledger::{BudgetView, LeaseView};
use ration_core::{
    Acquire, BudgetPath, BudgetSpec, ClientId, ErrorKind, FailPolicy, Grant, LeaseId, LedgerError,
    LimitSpec, Op, Period, Principal, Release, Reply, Report, Request, Unit, Window,
};
use tonic::{Code, Status};

use crate::v1;

/// A core refusal as a gRPC status, with the core's message.
pub fn status(e: &LedgerError) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Aborted => Code::Aborted,
    };
    Status::new(code, e.to_string())
}

fn invalid(e: LedgerError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// A non-negative amount: negative values are refused, not wrapped.
pub fn amount(field: &str, value: i64) -> Result<u64, Status> {
    u64::try_from(value).map_err(|_| {
        Status::invalid_argument(format!("{field} must not be negative (got {value})"))
    })
}

fn to_i64(value: u64) -> i64 {
    // Core amounts are at most 10^18 < i64::MAX.
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn path(field: &str, value: &str) -> Result<BudgetPath, Status> {
    BudgetPath::new(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

pub fn unit(value: &str) -> Result<Unit, Status> {
    Unit::new(value).map_err(invalid)
}

fn meta(meta: Option<&v1::RequestMeta>) -> Result<(ClientId, u64, Principal), Status> {
    let m = meta.ok_or_else(|| missing("meta (client_id, request_id, principal)"))?;
    Ok((
        ClientId::new(m.client_id.as_str()).map_err(invalid)?,
        m.request_id,
        Principal::new(m.principal.as_str()).map_err(invalid)?,
    ))
}

fn request(m: Option<&v1::RequestMeta>, op: Op) -> Result<Request, Status> {
    let (client, request_id, principal) = meta(m)?;
    Ok(Request { client, request_id, principal, op })
}

pub fn window(w: Option<&v1::Window>) -> Result<Window, Status> {
    let w = w.ok_or_else(|| missing("limit.window"))?;
    let period = match v1::Period::try_from(w.period) {
        Ok(v1::Period::Minute) => Period::Minute,
        Ok(v1::Period::Hour) => Period::Hour,
        Ok(v1::Period::Day) => Period::Day,
        Ok(v1::Period::Week) => Period::Week,
        Ok(v1::Period::Month) => Period::Month,
        Ok(v1::Period::Lifetime) => Period::Lifetime,
        Ok(v1::Period::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(format!(
                "limit.window.period {} is not one of minute, hour, day, week, month, lifetime",
                w.period
            )))
        }
    };
    let offset = i16::try_from(w.offset_minutes).map_err(|_| {
        Status::invalid_argument(format!(
            "window.offset_minutes {} is out of range",
            w.offset_minutes
        ))
    })?;
    Window::with_offset(period, offset).map_err(invalid)
}

pub fn window_out(w: Window) -> v1::Window {
    let period = match w.period() {
        Period::Minute => v1::Period::Minute,
        Period::Hour => v1::Period::Hour,
        Period::Day => v1::Period::Day,
        Period::Week => v1::Period::Week,
        Period::Month => v1::Period::Month,
        Period::Lifetime => v1::Period::Lifetime,
    };
    v1::Window { period: period as i32, offset_minutes: i32::from(w.offset_minutes()) }
}

pub fn limit(l: &v1::Limit) -> Result<LimitSpec, Status> {
    let on_unreachable = match l.static_allowance {
        None => FailPolicy::FailClosed,
        Some(a) => FailPolicy::StaticAllowance { amount: amount("limit.static_allowance", a)? },
    };
    Ok(LimitSpec {
        unit: unit(&l.unit)?,
        cap: amount("limit.cap", l.cap)?,
        window: window(l.window.as_ref())?,
        on_unreachable,
    })
}

pub fn limit_out(l: &LimitSpec) -> v1::Limit {
    v1::Limit {
        unit: l.unit.to_string(),
        cap: to_i64(l.cap),
        window: Some(window_out(l.window)),
        static_allowance: match l.on_unreachable {
            FailPolicy::FailClosed => None,
            FailPolicy::StaticAllowance { amount } => Some(to_i64(amount)),
        },
    }
}

fn spec(p: &str, limits: &[v1::Limit]) -> Result<BudgetSpec, Status> {
    Ok(BudgetSpec {
        path: path("path", p)?,
        limits: limits.iter().map(limit).collect::<Result<_, _>>()?,
    })
}

pub fn create_budget(r: &v1::CreateBudgetRequest) -> Result<Request, Status> {
    request(r.meta.as_ref(), Op::CreateBudget(spec(&r.path, &r.limits)?))
}

pub fn update_budget(r: &v1::UpdateBudgetRequest) -> Result<Request, Status> {
    let op =
        Op::UpdateBudget { spec: spec(&r.path, &r.limits)?, expected_version: r.expected_version };
    request(r.meta.as_ref(), op)
}

pub fn delete_budget(r: &v1::DeleteBudgetRequest) -> Result<Request, Status> {
    let op =
        Op::DeleteBudget { path: path("path", &r.path)?, expected_version: r.expected_version };
    request(r.meta.as_ref(), op)
}

pub fn acquire(r: &v1::AcquireRequest) -> Result<Request, Status> {
    let op = Op::Acquire(Acquire {
        budget: path("budget", &r.budget)?,
        unit: unit(&r.unit)?,
        wanted: amount("wanted", r.wanted)?,
        min: amount("min", r.min)?,
        ttl_ms: amount("ttl_ms", r.ttl_ms)?,
    });
    request(r.meta.as_ref(), op)
}

pub fn report(r: &v1::ReportRequest) -> Result<Request, Status> {
    let op = Op::Report(Report {
        lease: LeaseId::from_raw(r.lease_id),
        consumed_delta: amount("consumed_delta", r.consumed_delta)?,
        renew_ttl_ms: r.renew_ttl_ms.map(|t| amount("renew_ttl_ms", t)).transpose()?,
    });
    request(r.meta.as_ref(), op)
}

pub fn release(r: &v1::ReleaseRequest) -> Result<Request, Status> {
    let op = Op::Release(Release {
        lease: LeaseId::from_raw(r.lease_id),
        consumed_total: amount("consumed_total", r.consumed_total)?,
    });
    request(r.meta.as_ref(), op)
}

fn unexpected(reply: &Reply) -> Status {
    Status::internal(format!("the ledger answered with an unexpected reply: {reply:?}"))
}

pub fn budget_changed(path: &str, reply: &Reply) -> Result<v1::BudgetChanged, Status> {
    let version = match reply {
        Reply::BudgetCreated { version } | Reply::BudgetUpdated { version } => *version,
        Reply::BudgetDeleted => 0,
        other => return Err(unexpected(other)),
    };
    Ok(v1::BudgetChanged { path: path.to_owned(), version })
}

pub fn lease(reply: &Reply) -> Result<v1::Lease, Status> {
    match reply {
        Reply::Granted(Grant { lease, granted, expires_at_ms, window_end_ms, ttl_ms }) => {
            Ok(v1::Lease {
                lease_id: lease.raw(),
                granted: to_i64(*granted),
                expires_at_ms: *expires_at_ms,
                window_end_ms: *window_end_ms,
                ttl_ms: to_i64(*ttl_ms),
            })
        }
        other => Err(unexpected(other)),
    }
}

pub fn report_reply(reply: &Reply) -> Result<v1::ReportReply, Status> {
    match reply {
        Reply::Reported { lease, unreported, expires_at_ms } => Ok(v1::ReportReply {
            lease_id: lease.raw(),
            unreported: to_i64(*unreported),
            expires_at_ms: *expires_at_ms,
        }),
        other => Err(unexpected(other)),
    }
}

pub fn release_reply(reply: &Reply) -> Result<v1::ReleaseReply, Status> {
    match reply {
        Reply::Released { lease, returned, refunded, late } => Ok(v1::ReleaseReply {
            lease_id: lease.raw(),
            returned: to_i64(*returned),
            refunded: to_i64(*refunded),
            late: *late,
        }),
        other => Err(unexpected(other)),
    }
}

pub fn budget(v: &BudgetView) -> v1::Budget {
    v1::Budget {
        path: v.path.to_string(),
        version: v.version,
        limits: v
            .limits
            .iter()
            .map(|l| v1::LimitStatus {
                limit: Some(limit_out(&l.spec)),
                window_start_ms: l.window_start_ms,
                window_end_ms: l.window_end_ms,
                consumed: to_i64(l.consumed),
                outstanding: to_i64(l.outstanding),
                remaining: to_i64(l.remaining),
                holders: l.holders,
            })
            .collect(),
        children: v.children,
        live_leases: v.live_leases,
    }
}

pub fn lease_info(v: &LeaseView) -> v1::LeaseInfo {
    v1::LeaseInfo {
        lease_id: v.lease.raw(),
        principal: v.principal.to_string(),
        budget: v.budget.to_string(),
        unit: v.unit.to_string(),
        granted: to_i64(v.granted),
        reported: to_i64(v.reported),
        acquired_ms: v.acquired_ms,
        expires_at_ms: v.expires_at_ms,
        window_end_ms: v.window_end_ms,
    }
}

/// Most operations one Batch call may carry.
pub const MAX_BATCH_OPS: usize = 1024;

/// Converts every operation of a batch; a malformed one fails the whole call, naming
/// its position, before anything is proposed.
pub fn batch(r: &v1::BatchRequest) -> Result<Vec<Request>, Status> {
    if r.ops.len() > MAX_BATCH_OPS {
        return Err(Status::invalid_argument(format!(
            "a batch holds at most {MAX_BATCH_OPS} operations, got {}",
            r.ops.len()
        )));
    }
    r.ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let converted = match &op.op {
                Some(v1::batch_op::Op::Acquire(a)) => acquire(a),
                Some(v1::batch_op::Op::Report(rep)) => report(rep),
                Some(v1::batch_op::Op::Release(rel)) => release(rel),
                None => Err(missing("op")),
            };
            converted.map_err(|s| Status::new(s.code(), format!("ops[{i}]: {}", s.message())))
        })
        .collect()
}

/// One operation's result inside a batch reply.
pub fn batch_result(outcome: &ration_core::Outcome) -> v1::BatchResult {
    use v1::batch_result::Result as R;
    let result = match outcome {
        Err(e) => {
            let s = status(e);
            R::Error(v1::OpError { code: s.code() as i32, message: s.message().to_owned() })
        }
        Ok(reply @ Reply::Granted(_)) => lease(reply).map(R::Lease).unwrap_or_else(internal_error),
        Ok(reply @ Reply::Reported { .. }) => {
            report_reply(reply).map(R::Report).unwrap_or_else(internal_error)
        }
        Ok(reply @ Reply::Released { .. }) => {
            release_reply(reply).map(R::Release).unwrap_or_else(internal_error)
        }
        Ok(other) => internal_error(unexpected(other)),
    };
    v1::BatchResult { result: Some(result) }
}

fn internal_error(s: Status) -> v1::batch_result::Result {
    v1::batch_result::Result::Error(v1::OpError {
        code: s.code() as i32,
        message: s.message().to_owned(),
    })
}

pub fn audit_kind(name: &str) -> Result<AuditKind, Status> {
    AuditKind::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
        let names: Vec<&str> = AuditKind::ALL.iter().map(|k| k.name()).collect();
        Status::invalid_argument(format!(
            "unknown audit kind {name:?}; use one of {}",
            names.join(", ")
        ))
    })
}

pub fn audit_record(r: &AuditRecord) -> v1::AuditRecord {
    let e = &r.entry;
    v1::AuditRecord {
        seq: e.seq,
        log_index: e.log_index,
        time_ms: e.time_ms,
        effective_ms: e.effective_ms,
        kind: e.kind.name().to_owned(),
        budget: e.budget.to_string(),
        principal: e.principal.to_string(),
        unit: e.unit.as_ref().map(|u| u.to_string()).unwrap_or_default(),
        lease_id: e.lease.map(|l| l.raw()).unwrap_or_default(),
        flow: Some(v1::Flow {
            granted: to_i64(e.flow.granted),
            consumed: to_i64(e.flow.consumed),
            returned: to_i64(e.flow.returned),
            charged: to_i64(e.flow.charged),
            uncharged: to_i64(e.flow.uncharged),
        }),
        balances: e
            .balances
            .iter()
            .map(|b| v1::Balance {
                budget: b.budget.to_string(),
                unit: b.unit.to_string(),
                window: Some(window_out(b.window)),
                window_start_ms: b.window_start_ms,
                cap: to_i64(b.cap),
                consumed: to_i64(b.consumed),
                outstanding: to_i64(b.outstanding),
            })
            .collect(),
        prev_hash: e.prev_hash.to_vec(),
        hash: r.hash.to_vec(),
        limits: e.limits.iter().map(limit_out).collect(),
    }
}

fn hash_in(field: &str, bytes: &[u8]) -> Result<ration_core::audit::Hash, Status> {
    bytes.try_into().map_err(|_| {
        Status::invalid_argument(format!("{field} must be 32 bytes (got {})", bytes.len()))
    })
}

/// A record as received, back in core form, so a client can recompute its hash and
/// verify the chain itself. Exact inverse of [`audit_record`].
pub fn audit_record_in(r: &v1::AuditRecord) -> Result<AuditRecord, Status> {
    use ration_core::audit::{AuditEntry, Balance, Flow};
    let flow = r.flow.as_ref().ok_or_else(|| missing("flow"))?;
    let balances = r
        .balances
        .iter()
        .map(|b| {
            Ok(Balance {
                budget: path("balances.budget", &b.budget)?,
                unit: unit(&b.unit)?,
                window: window(b.window.as_ref())?,
                window_start_ms: b.window_start_ms,
                cap: amount("balances.cap", b.cap)?,
                consumed: amount("balances.consumed", b.consumed)?,
                outstanding: amount("balances.outstanding", b.outstanding)?,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let entry = AuditEntry {
        seq: r.seq,
        log_index: r.log_index,
        time_ms: r.time_ms,
        effective_ms: r.effective_ms,
        kind: audit_kind(&r.kind)?,
        budget: path("budget", &r.budget)?,
        principal: Principal::new(r.principal.as_str()).map_err(invalid)?,
        unit: (!r.unit.is_empty()).then(|| unit(&r.unit)).transpose()?,
        lease: (r.lease_id != 0).then(|| LeaseId::from_raw(r.lease_id)),
        flow: Flow {
            granted: amount("flow.granted", flow.granted)?,
            consumed: amount("flow.consumed", flow.consumed)?,
            returned: amount("flow.returned", flow.returned)?,
            charged: amount("flow.charged", flow.charged)?,
            uncharged: amount("flow.uncharged", flow.uncharged)?,
        },
        balances,
        limits: r.limits.iter().map(limit).collect::<Result<_, _>>()?,
        prev_hash: hash_in("prev_hash", &r.prev_hash)?,
    };
    Ok(AuditRecord { entry, hash: hash_in("hash", &r.hash)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Option<v1::RequestMeta> {
        Some(v1::RequestMeta { client_id: "c".into(), request_id: 1, principal: "gw".into() })
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
        };
        let err = acquire(&bad).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("wanted must not be negative"), "{}", err.message());
        let bad = v1::AcquireRequest { budget: "a//b".into(), wanted: 5, ..bad };
        assert!(acquire(&bad).unwrap_err().message().contains("budget"));
        let bad = v1::AcquireRequest { meta: None, budget: "a".into(), ..bad };
        assert!(acquire(&bad).unwrap_err().message().contains("meta"));
        let w = v1::Window { period: 99, offset_minutes: 0 };
        assert!(window(Some(&w)).unwrap_err().message().contains("period"));
        assert!(audit_kind("nope").is_err());
        assert_eq!(audit_kind("lease_expired").unwrap(), AuditKind::LeaseExpired);
    }

    #[test]
    fn limits_round_trip() {
        let l = v1::Limit {
            unit: "usd_micros".into(),
            cap: 5,
            window: Some(v1::Window { period: v1::Period::Day as i32, offset_minutes: 330 }),
            static_allowance: Some(2),
        };
        assert_eq!(limit_out(&limit(&l).unwrap()), l);
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
        let second =
            Entry::V1(Batch { time_ms: 1_000_001, commands: vec![req(3, Op::Release(release))] });
        records.extend(ledger.apply(3, &second).audit);
        assert_eq!(records.len(), 3);
        for r in &records {
            assert_eq!(&audit_record_in(&audit_record(r)).unwrap(), r);
        }
        let mut bad = audit_record(&records[0]);
        bad.hash.pop();
        assert!(audit_record_in(&bad).unwrap_err().message().contains("hash must be 32 bytes"));
    }

    #[test]
    fn refusals_map_to_codes() {
        let e = LedgerError::LeaseNotFound { lease: LeaseId::from_raw(1) };
        assert_eq!(status(&e).code(), Code::NotFound);
        assert!(status(&e).message().contains("lease 1"));
    }
}
