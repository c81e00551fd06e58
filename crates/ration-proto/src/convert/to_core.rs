//! Protobuf → ration-core: every field a client sends is checked here or by the
//! core's own constructors; a bad one becomes INVALID_ARGUMENT naming the field.

use ration_core::audit::{AuditFilter, AuditKind, AuditRecord};
use ration_core::{
    Acquire, BudgetPath, BudgetSpec, ClientId, FailPolicy, LeaseId, LedgerError, LimitSpec, Op,
    Overrun, Period, Principal, Release, Report, Request, Role, RoleGrant, Scope, Unit, Window,
};
use tonic::Status;

use super::{missing, to_proto, DEFAULT_PAGE, MAX_BATCH_OPS, MAX_PAGE};
use crate::v1;

fn invalid(e: LedgerError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A non-negative amount: negative values are refused, not wrapped.
pub fn amount(field: &str, value: i64) -> Result<u64, Status> {
    u64::try_from(value).map_err(|_| {
        Status::invalid_argument(format!("{field} must not be negative (got {value})"))
    })
}

pub fn path(field: &str, value: &str) -> Result<BudgetPath, Status> {
    BudgetPath::new(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// An optional path: the empty string means "not given".
pub fn optional_path(field: &str, value: &str) -> Result<Option<BudgetPath>, Status> {
    (!value.is_empty()).then(|| path(field, value)).transpose()
}

pub fn unit(value: &str) -> Result<Unit, Status> {
    Unit::new(value).map_err(invalid)
}

pub fn principal(field: &str, value: &str) -> Result<Principal, Status> {
    Principal::new(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// A lease id as the client sent it (any value names a lease; unknown ones are
/// refused by the ledger).
pub fn lease_id(raw: u64) -> LeaseId {
    LeaseId::from_raw(raw)
}

/// A page size: 0 means [`DEFAULT_PAGE`], and at most [`MAX_PAGE`].
pub fn page(limit: u32) -> usize {
    let asked = usize::try_from(limit).unwrap_or(MAX_PAGE);
    if asked == 0 {
        DEFAULT_PAGE
    } else {
        asked.min(MAX_PAGE)
    }
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
    let op = match m {
        Some(m) if !m.trace.is_empty() || !m.usage.is_empty() => {
            let note = ration_core::command::Annotation {
                trace: (!m.trace.is_empty()).then(|| m.trace.clone()),
                usage: m.usage.iter().map(usage_line).collect::<Result<_, _>>()?,
            };
            note.validate().map_err(|e| Status::invalid_argument(format!("meta: {e}")))?;
            Op::Annotated { note, op: Box::new(op) }
        }
        _ => op,
    };
    Ok(Request { client, request_id, principal, op })
}

pub fn usage_line(u: &v1::UsageLine) -> Result<ration_core::command::UsageLine, Status> {
    let line = ration_core::command::UsageLine {
        model: u.model.clone(),
        price_version: u.price_version,
        calls: amount("usage.calls", u.calls)?,
        input_tokens: amount("usage.input_tokens", u.input_tokens)?,
        cached_tokens: amount("usage.cached_tokens", u.cached_tokens)?,
        output_tokens: amount("usage.output_tokens", u.output_tokens)?,
        cost_usd_micros: amount("usage.cost_usd_micros", u.cost_usd_micros)?,
    };
    line.validate().map_err(invalid)?;
    Ok(line)
}

pub fn price(p: Option<&v1::Price>) -> Result<ration_core::command::Price, Status> {
    let p = p.ok_or_else(|| missing("price"))?;
    Ok(ration_core::command::Price {
        input: amount("price.input", p.input)?,
        cached_input: amount("price.cached_input", p.cached_input)?,
        output: amount("price.output", p.output)?,
    })
}

pub fn set_price(r: &v1::SetPriceRequest) -> Result<Request, Status> {
    let spec = ration_core::command::PriceSpec {
        model: r.model.clone(),
        price: price(r.price.as_ref())?,
        effective_from_ms: r.effective_from_ms,
    };
    spec.validate().map_err(|e| to_proto::status(&e))?;
    request(r.meta.as_ref(), Op::SetPrice(spec))
}

/// The model a price-book read asks for (`None`: every model).
pub fn list_prices(r: &v1::ListPricesRequest) -> Result<Option<String>, Status> {
    if r.model.is_empty() {
        return Ok(None);
    }
    ration_core::command::check_label("model", &r.model).map_err(invalid)?;
    Ok(Some(r.model.clone()))
}

pub fn budget_options(
    o: Option<&v1::BudgetOptions>,
) -> Result<ration_core::command::BudgetOptions, Status> {
    let o = o.cloned().unwrap_or_default();
    let options =
        ration_core::command::BudgetOptions { thresholds_pct: o.thresholds_pct, shadow: o.shadow };
    options.validate().map_err(invalid)?;
    Ok(options)
}

pub fn set_budget_options(r: &v1::SetBudgetOptionsRequest) -> Result<Request, Status> {
    let op = Op::SetOptions {
        path: path("path", &r.path)?,
        options: budget_options(r.options.as_ref())?,
    };
    request(r.meta.as_ref(), op)
}

pub fn record_call(r: &v1::RecordCallRequest) -> Result<Request, Status> {
    ration_core::command::check_label("trace", &r.trace).map_err(invalid)?;
    let call = ration_core::command::CallRecord {
        budget: path("budget", &r.budget)?,
        trace: r.trace.clone(),
        usage: usage_line(r.usage.as_ref().ok_or_else(|| missing("usage"))?)?,
    };
    request(r.meta.as_ref(), Op::RecordCall(call))
}

pub fn forecast(r: &v1::ForecastRequest) -> Result<BudgetPath, Status> {
    path("path", &r.path)
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
        Ok(v1::Period::Concurrent) => Period::Concurrent,
        Ok(v1::Period::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(format!(
                "limit.window.period {} is not one of minute, hour, day, week, month, lifetime, concurrent",
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

fn spec(p: &str, limits: &[v1::Limit]) -> Result<BudgetSpec, Status> {
    Ok(BudgetSpec {
        path: path("path", p)?,
        limits: limits.iter().map(limit).collect::<Result<_, _>>()?,
    })
}

// ----- writes -----

pub fn create_budget(r: &v1::CreateBudgetRequest) -> Result<Request, Status> {
    request(r.meta.as_ref(), Op::CreateBudget(spec(&r.path, &r.limits)?))
}

pub fn update_budget(r: &v1::UpdateBudgetRequest) -> Result<Request, Status> {
    let op =
        Op::UpdateBudget { spec: spec(&r.path, &r.limits)?, expected_version: r.expected_version };
    request(r.meta.as_ref(), op)
}

pub fn set_template(r: &v1::SetTemplateRequest) -> Result<Request, Status> {
    let op = Op::SetTemplate(ration_core::TemplateSpec {
        parent: path("parent", &r.parent)?,
        limits: r.limits.iter().map(limit).collect::<Result<_, _>>()?,
        max_instances: r.max_instances,
        idle_ms: r.idle_ms,
        max_duration_ms: r.max_duration_ms,
        guards: r
            .guards
            .iter()
            .map(|g| {
                Ok(ration_core::command::Guard {
                    unit: unit(&g.unit)?,
                    max: amount("guards.max", g.max)?,
                    per_ms: g.per_ms,
                })
            })
            .collect::<Result<_, Status>>()?,
    });
    request(r.meta.as_ref(), op)
}

pub fn delete_template(r: &v1::DeleteTemplateRequest) -> Result<Request, Status> {
    request(r.meta.as_ref(), Op::DeleteTemplate { parent: path("parent", &r.parent)? })
}

pub fn freeze(r: &v1::FreezeRequest) -> Result<Request, Status> {
    request(r.meta.as_ref(), Op::Freeze { path: path("path", &r.path)?, frozen: r.frozen })
}

pub fn set_limits(r: &v1::SetLimitsRequest) -> Result<Request, Status> {
    let l = r.limits.as_ref().ok_or_else(|| missing("limits"))?;
    let limits = ration_core::PrincipalLimits {
        clients: l.clients,
        outcomes: l.outcomes,
        live_leases: l.live_leases,
        budgets: l.budgets,
    };
    limits.validate().map_err(|e| to_proto::status(&e))?;
    request(r.meta.as_ref(), Op::SetLimits(limits))
}

/// A `GrantRole` (or, with `revoke`, a `RevokeRole`).
pub fn role_change(r: &v1::RoleRequest, revoke: bool) -> Result<Request, Status> {
    let grant = RoleGrant {
        principal: Principal::new(r.subject.as_str())
            .map_err(|e| Status::invalid_argument(format!("subject: {e}")))?,
        role: Role::parse(&r.role).map_err(invalid)?,
        scope: Scope::parse(&r.scope)
            .map_err(|e| Status::invalid_argument(format!("scope: {e}")))?,
    };
    request(r.meta.as_ref(), if revoke { Op::RevokeRole(grant) } else { Op::GrantRole(grant) })
}

/// What a `ListRoles` asks for: one principal, or a page of them.
#[derive(Debug)]
pub struct RolesPage {
    pub principal: Option<Principal>,
    pub start_after: Option<Principal>,
    pub limit: usize,
}

pub fn list_roles(r: &v1::ListRolesRequest) -> Result<RolesPage, Status> {
    let name = |field: &str, text: &str| -> Result<Option<Principal>, Status> {
        if text.is_empty() {
            return Ok(None);
        }
        Principal::new(text)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
    };
    let limit = match r.limit {
        0 => DEFAULT_PAGE,
        n => (n as usize).min(MAX_PAGE),
    };
    Ok(RolesPage {
        principal: name("principal", &r.principal)?,
        start_after: name("start_after", &r.start_after)?,
        limit,
    })
}

/// The principal a `GetLimits` asks about (none: the fullest `top`, at most 100).
pub fn get_limits(r: &v1::GetLimitsRequest) -> Result<(Option<Principal>, usize), Status> {
    let principal = if r.principal.is_empty() {
        None
    } else {
        Some(Principal::new(r.principal.as_str()).map_err(|e| to_proto::status(&e))?)
    };
    Ok((principal, (r.top as usize).min(100)))
}

pub fn delete_budget(r: &v1::DeleteBudgetRequest) -> Result<Request, Status> {
    let op =
        Op::DeleteBudget { path: path("path", &r.path)?, expected_version: r.expected_version };
    request(r.meta.as_ref(), op)
}

pub fn acquire(r: &v1::AcquireRequest) -> Result<Request, Status> {
    let acquire = Acquire {
        budget: path("budget", &r.budget)?,
        unit: unit(&r.unit)?,
        wanted: amount("wanted", r.wanted)?,
        min: amount("min", r.min)?,
        ttl_ms: amount("ttl_ms", r.ttl_ms)?,
    };
    let op = match r.starts_at_ms {
        0 => Op::Acquire(acquire),
        starts_at_ms => Op::AcquireNext(ration_core::AcquireNext { acquire, starts_at_ms }),
    };
    request(r.meta.as_ref(), op)
}

pub fn report(r: &v1::ReportRequest) -> Result<Request, Status> {
    let op = Op::Report(Report {
        lease: lease_id(r.lease_id),
        consumed_delta: amount("consumed_delta", r.consumed_delta)?,
        renew_ttl_ms: r.renew_ttl_ms.map(|t| amount("renew_ttl_ms", t)).transpose()?,
    });
    request(r.meta.as_ref(), op)
}

pub fn release(r: &v1::ReleaseRequest) -> Result<Request, Status> {
    let op = Op::Release(Release {
        lease: lease_id(r.lease_id),
        consumed_total: amount("consumed_total", r.consumed_total)?,
    });
    request(r.meta.as_ref(), op)
}

pub fn overrun(r: &v1::OverrunRequest) -> Result<Request, Status> {
    let op = Op::Overrun(Overrun {
        budget: path("budget", &r.budget)?,
        unit: unit(&r.unit)?,
        amount: amount("amount", r.amount)?,
    });
    request(r.meta.as_ref(), op)
}

/// Converts every operation of a batch; a malformed one fails the whole call, naming
/// its position, before anything is proposed.
/// A batch's operations, each converted on its own: the outer error refuses the
/// whole call (only a malformed envelope: more than [`MAX_BATCH_OPS`] operations),
/// an inner one refuses that operation alone (its message names it, `ops[i]: ...`).
pub fn batch(r: &v1::BatchRequest) -> Result<Vec<Result<Request, Status>>, Status> {
    if r.ops.len() > MAX_BATCH_OPS {
        return Err(Status::invalid_argument(format!(
            "a batch holds at most {MAX_BATCH_OPS} operations, got {}",
            r.ops.len()
        )));
    }
    Ok(r.ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let converted = match &op.op {
                Some(v1::batch_op::Op::Acquire(a)) => acquire(a),
                Some(v1::batch_op::Op::Report(rep)) => report(rep),
                Some(v1::batch_op::Op::Release(rel)) => release(rel),
                Some(v1::batch_op::Op::Overrun(o)) => overrun(o),
                Some(v1::batch_op::Op::RecordCall(c)) => record_call(c),
                None => Err(missing("op")),
            };
            converted.map_err(|s| Status::new(s.code(), format!("ops[{i}]: {}", s.message())))
        })
        .collect())
}

// ----- reads -----

/// One page of `ListBudgets`, in path order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetPage {
    /// Only budgets within this subtree (the subtree's root included).
    pub subtree: Option<BudgetPath>,
    /// Only budgets whose path sorts after this one.
    pub start_after: Option<BudgetPath>,
    pub limit: usize,
}

pub fn list_budgets(r: &v1::ListBudgetsRequest) -> Result<BudgetPage, Status> {
    Ok(BudgetPage {
        subtree: optional_path("subtree", &r.subtree)?,
        start_after: optional_path("start_after", &r.start_after)?,
        limit: page(r.limit),
    })
}

pub fn get_budget(r: &v1::GetBudgetRequest) -> Result<BudgetPath, Status> {
    path("path", &r.path)
}

pub fn get_lease(r: &v1::GetLeaseRequest) -> LeaseId {
    lease_id(r.lease_id)
}

/// One page of `QueryAudit`: the records matching `filter` from sequence number
/// `from_seq` on, at most `limit` of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditPage {
    pub filter: AuditFilter,
    pub from_seq: u64,
    pub limit: usize,
}

pub fn query_audit(r: &v1::QueryAuditRequest) -> Result<AuditPage, Status> {
    let filter = AuditFilter {
        subtree: optional_path("subtree", &r.subtree)?,
        principal: (!r.principal.is_empty())
            .then(|| principal("principal", &r.principal))
            .transpose()?,
        kinds: r.kinds.iter().map(|k| audit_kind(k)).collect::<Result<_, _>>()?,
        from_ms: r.from_ms,
        to_ms: r.to_ms,
        trace: (!r.trace.is_empty())
            .then(|| {
                ration_core::command::check_label("trace", &r.trace).map_err(invalid)?;
                Ok::<_, Status>(r.trace.clone())
            })
            .transpose()?,
        client: (!r.client_id.is_empty())
            .then(|| ClientId::new(r.client_id.as_str()).map_err(invalid))
            .transpose()?,
    };
    Ok(AuditPage { filter, from_seq: r.from_seq, limit: page(r.limit) })
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

fn hash(field: &str, bytes: &[u8]) -> Result<ration_core::audit::Hash, Status> {
    bytes.try_into().map_err(|_| {
        Status::invalid_argument(format!("{field} must be 32 bytes (got {})", bytes.len()))
    })
}

/// A record as received, back in core form, so a client can recompute its hash and
/// verify the chain itself. Exact inverse of [`super::to_proto::audit_record`].
pub fn audit_record(r: &v1::AuditRecord) -> Result<AuditRecord, Status> {
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
        lease: (r.lease_id != 0).then(|| lease_id(r.lease_id)),
        flow: Flow {
            granted: amount("flow.granted", flow.granted)?,
            consumed: amount("flow.consumed", flow.consumed)?,
            returned: amount("flow.returned", flow.returned)?,
            charged: amount("flow.charged", flow.charged)?,
            uncharged: amount("flow.uncharged", flow.uncharged)?,
        },
        balances,
        limits: r.limits.iter().map(limit).collect::<Result<_, _>>()?,
        prev_hash: hash("prev_hash", &r.prev_hash)?,
        cause: r
            .cause
            .as_ref()
            .map(|c| {
                Ok::<_, Status>(ration_core::audit::Cause {
                    client: ClientId::new(c.client_id.as_str()).map_err(invalid)?,
                    request_id: c.request_id,
                    trace: c.trace.clone(),
                    usage: c.usage.iter().map(usage_line).collect::<Result<_, _>>()?,
                })
            })
            .transpose()?,
        detail: r.detail.as_ref().and_then(|d| d.detail.as_ref()).map(detail).transpose()?,
    };
    Ok(AuditRecord { entry, hash: hash("hash", &r.hash)? })
}

fn detail(d: &v1::audit_detail::Detail) -> Result<ration_core::audit::Detail, Status> {
    use ration_core::audit::Detail;
    use v1::audit_detail::Detail as D;
    Ok(match d {
        D::Price(p) => {
            let v = p.version.as_ref().ok_or_else(|| missing("detail.price.version"))?;
            Detail::Price {
                model: p.model.clone(),
                version: v.version,
                effective_from_ms: v.effective_from_ms,
                price: price(v.price.as_ref())?,
            }
        }
        D::Options(o) => Detail::Options(ration_core::command::BudgetOptions {
            thresholds_pct: o.thresholds_pct.clone(),
            shadow: o.shadow,
        }),
        D::ThresholdPct(percent) => Detail::Threshold { percent: *percent },
        D::WouldRefuse(w) => Detail::WouldRefuse {
            granted: amount("detail.would_refuse.granted", w.granted)?,
            available: amount("detail.would_refuse.available", w.available)?,
        },
        D::Call(c) => Detail::Call {
            trace: c.trace.clone(),
            usage: usage_line(c.usage.as_ref().ok_or_else(|| missing("detail.call.usage"))?)?,
        },
    })
}
