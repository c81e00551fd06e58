//! ration-core → protobuf: replies, views, audit records, and refusals as gRPC
//! statuses.

use ration_core::audit::AuditRecord;
use ration_core::ledger::{BudgetView, LeaseView};
use ration_core::{ErrorKind, FailPolicy, Grant, LedgerError, LimitSpec, Period, Reply, Window};
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
    if let LedgerError::PrincipalLimit { what, max, .. } = e {
        let mut details = tonic_types::ErrorDetails::new();
        let metadata =
            [("limit".to_owned(), what.replace(' ', "_")), ("max".to_owned(), max.to_string())];
        details.set_error_info(
            crate::rpc::REASON_PRINCIPAL_LIMIT,
            crate::rpc::DOMAIN,
            metadata.into_iter().collect::<std::collections::HashMap<_, _>>(),
        );
        return <Status as tonic_types::StatusExt>::with_error_details(
            code,
            e.to_string(),
            details,
        );
    }
    Status::new(code, e.to_string())
}

/// A principal's roles, as the proto lists them.
pub fn role_scopes(roles: &[(ration_core::Role, ration_core::Scope)]) -> Vec<v1::RoleScope> {
    roles
        .iter()
        .map(|(role, scope)| v1::RoleScope {
            role: role.name().to_owned(),
            scope: scope.to_string(),
        })
        .collect()
}

/// The reply to a role change: whether it changed anything, and the subject's
/// roles after it.
pub fn roles_reply(
    reply: &Reply,
    roles: &[(ration_core::Role, ration_core::Scope)],
) -> Result<v1::RolesReply, Status> {
    match reply {
        Reply::RolesChanged { changed } => {
            Ok(v1::RolesReply { changed: *changed, roles: role_scopes(roles) })
        }
        other => Err(unexpected(other)),
    }
}

pub fn principal_limits(l: &ration_core::PrincipalLimits) -> v1::PrincipalLimits {
    v1::PrincipalLimits {
        clients: l.clients,
        outcomes: l.outcomes,
        live_leases: l.live_leases,
        budgets: l.budgets,
    }
}

pub fn principal_usage(p: &str, u: &ration_core::PrincipalUsage) -> v1::PrincipalUsage {
    v1::PrincipalUsage {
        principal: p.to_owned(),
        clients: u.clients,
        outcomes: u.outcomes,
        live_leases: u.live_leases,
        budgets: u.budgets,
    }
}

fn to_i64(value: u64) -> i64 {
    // Core amounts are at most 10^18 < i64::MAX.
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn window(w: Window) -> v1::Window {
    let period = match w.period() {
        Period::Minute => v1::Period::Minute,
        Period::Hour => v1::Period::Hour,
        Period::Day => v1::Period::Day,
        Period::Week => v1::Period::Week,
        Period::Month => v1::Period::Month,
        Period::Lifetime => v1::Period::Lifetime,
        Period::Concurrent => v1::Period::Concurrent,
    };
    v1::Window { period: period as i32, offset_minutes: i32::from(w.offset_minutes()) }
}

pub fn limit(l: &LimitSpec) -> v1::Limit {
    v1::Limit {
        unit: l.unit.to_string(),
        cap: to_i64(l.cap),
        window: Some(window(l.window)),
        static_allowance: match l.on_unreachable {
            FailPolicy::FailClosed => None,
            FailPolicy::StaticAllowance { amount } => Some(to_i64(amount)),
        },
    }
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
                window_end_ms: window_end(*window_end_ms),
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

pub fn overrun_reply(reply: &Reply) -> Result<v1::OverrunReply, Status> {
    match reply {
        Reply::OverrunRecorded { recorded, over_cap } => {
            Ok(v1::OverrunReply { recorded: to_i64(*recorded), over_cap: *over_cap })
        }
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
                limit: Some(limit(&l.spec)),
                window_start_ms: l.window_start_ms,
                window_end_ms: window_end(l.window_end_ms),
                consumed: to_i64(l.consumed),
                outstanding: to_i64(l.outstanding),
                remaining: to_i64(l.remaining),
                holders: l.holders,
                overruns: to_i64(l.overruns),
                upcoming: to_i64(l.upcoming),
                threshold_reached_pct: l.threshold_reached_pct.unwrap_or(0),
            })
            .collect(),
        children: v.children,
        live_leases: v.live_leases,
        frozen: v.frozen,
        instance: v.instance,
        template: v.template.as_ref().map(|t| v1::Template {
            limits: t.limits.iter().map(limit).collect(),
            max_instances: t.max_instances,
            idle_ms: t.idle_ms,
            instances: t.instances,
            max_duration_ms: t.max_duration_ms,
            guards: t
                .guards
                .iter()
                .map(|g| v1::Guard {
                    unit: g.unit.to_string(),
                    max: to_i64(g.max),
                    per_ms: g.per_ms,
                })
                .collect(),
        }),
        hold: v.hold.clone().unwrap_or_default(),
        options: v.options.as_ref().map(budget_options),
        shadow_refusals: v.shadow_refusals,
    }
}

pub fn budget_options(o: &ration_core::command::BudgetOptions) -> v1::BudgetOptions {
    v1::BudgetOptions { thresholds_pct: o.thresholds_pct.clone(), shadow: o.shadow }
}

pub fn price(p: &ration_core::command::Price) -> v1::Price {
    v1::Price {
        input: to_i64(p.input),
        cached_input: to_i64(p.cached_input),
        output: to_i64(p.output),
    }
}

pub fn usage_line(u: &ration_core::command::UsageLine) -> v1::UsageLine {
    v1::UsageLine {
        model: u.model.clone(),
        price_version: u.price_version,
        calls: to_i64(u.calls),
        input_tokens: to_i64(u.input_tokens),
        cached_tokens: to_i64(u.cached_tokens),
        output_tokens: to_i64(u.output_tokens),
        cost_usd_micros: to_i64(u.cost_usd_micros),
    }
}

pub fn price_reply(model: &str, reply: &Reply) -> Result<v1::PriceReply, Status> {
    match reply {
        Reply::PriceSet { version, effective_from_ms } => Ok(v1::PriceReply {
            model: model.to_owned(),
            version: *version,
            effective_from_ms: *effective_from_ms,
        }),
        other => Err(unexpected(other)),
    }
}

pub fn price_version(v: &ration_core::ledger::PriceVersion) -> v1::PriceVersion {
    v1::PriceVersion {
        version: v.version,
        effective_from_ms: v.effective_from_ms,
        price: Some(price(&v.price)),
        set_at_ms: v.set_at_ms,
    }
}

pub fn model_prices(
    model: &str,
    versions: &[ration_core::ledger::PriceVersion],
) -> v1::ModelPrices {
    v1::ModelPrices {
        model: model.to_owned(),
        versions: versions.iter().map(price_version).collect(),
    }
}

pub fn options_reply(path: &str, reply: &Reply) -> Result<v1::BudgetOptionsReply, Status> {
    match reply {
        Reply::OptionsSet => Ok(v1::BudgetOptionsReply { path: path.to_owned() }),
        other => Err(unexpected(other)),
    }
}

pub fn record_call_reply(reply: &Reply) -> Result<v1::RecordCallReply, Status> {
    match reply {
        Reply::CallRecorded => Ok(v1::RecordCallReply {}),
        other => Err(unexpected(other)),
    }
}

pub fn forecast(
    path: &str,
    now_ms: u64,
    limits: &[ration_core::ledger::Forecast],
) -> v1::ForecastReply {
    v1::ForecastReply {
        path: path.to_owned(),
        now_ms,
        limits: limits
            .iter()
            .map(|f| v1::LimitForecast {
                unit: f.unit.to_string(),
                window: Some(window(f.window)),
                window_start_ms: f.window_start_ms,
                window_end_ms: window_end(f.window_end_ms),
                cap: to_i64(f.cap),
                consumed: to_i64(f.consumed),
                rate_per_s: f.rate_per_s,
                exhausts_at_ms: f.exhausts_at_ms,
            })
            .collect(),
    }
}

pub fn template_reply(parent: &str, reply: &Reply) -> Result<v1::TemplateReply, Status> {
    match reply {
        Reply::TemplateSet { instances } | Reply::TemplateDeleted { instances } => {
            Ok(v1::TemplateReply { parent: parent.to_owned(), instances: *instances })
        }
        other => Err(unexpected(other)),
    }
}

pub fn freeze_reply(reply: &Reply) -> Result<v1::FreezeReply, Status> {
    match reply {
        Reply::Frozen { changed, held } => Ok(v1::FreezeReply {
            changed: *changed,
            held: held
                .iter()
                .map(|(unit, amount)| v1::UnitAmount {
                    unit: unit.to_string(),
                    amount: to_i64(*amount),
                })
                .collect(),
        }),
        other => Err(unexpected(other)),
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
        window_end_ms: window_end(v.window_end_ms),
        opens_at_ms: v.opens_at_ms.unwrap_or(0),
    }
}

/// One operation's result inside a batch reply.
pub fn batch_result(outcome: &ration_core::Outcome) -> v1::BatchResult {
    use v1::batch_result::Result as R;
    let result = match outcome {
        Err(e) => op_error(&status(e)),
        Ok(reply @ Reply::Granted(_)) => {
            lease(reply).map(R::Lease).unwrap_or_else(|s| op_error(&s))
        }
        Ok(reply @ Reply::Reported { .. }) => {
            report_reply(reply).map(R::Report).unwrap_or_else(|s| op_error(&s))
        }
        Ok(reply @ Reply::OverrunRecorded { .. }) => {
            overrun_reply(reply).map(R::Overrun).unwrap_or_else(|s| op_error(&s))
        }
        Ok(reply @ Reply::Released { .. }) => {
            release_reply(reply).map(R::Release).unwrap_or_else(|s| op_error(&s))
        }
        Ok(Reply::CallRecorded) => R::RecordCall(v1::RecordCallReply {}),
        Ok(other) => op_error(&unexpected(other)),
    };
    v1::BatchResult { result: Some(result) }
}

/// A batch result that refuses its operation with `s` (the others go on).
pub fn batch_error(s: &Status) -> v1::BatchResult {
    v1::BatchResult { result: Some(op_error(s)) }
}

fn op_error(s: &Status) -> v1::batch_result::Result {
    v1::batch_result::Result::Error(v1::OpError {
        code: s.code() as i32,
        message: s.message().to_owned(),
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
                window: Some(window(b.window)),
                window_start_ms: b.window_start_ms,
                cap: to_i64(b.cap),
                consumed: to_i64(b.consumed),
                outstanding: to_i64(b.outstanding),
            })
            .collect(),
        prev_hash: e.prev_hash.to_vec(),
        hash: r.hash.to_vec(),
        limits: e.limits.iter().map(limit).collect(),
        cause: e.cause.as_ref().map(|c| v1::Cause {
            client_id: c.client.to_string(),
            request_id: c.request_id,
            trace: c.trace.clone(),
            usage: c.usage.iter().map(usage_line).collect(),
        }),
        detail: e.detail.as_ref().map(|d| v1::AuditDetail { detail: Some(detail(d)) }),
    }
}

fn detail(d: &ration_core::audit::Detail) -> v1::audit_detail::Detail {
    use ration_core::audit::Detail;
    use v1::audit_detail::Detail as D;
    match d {
        Detail::Price { model, version, effective_from_ms, price: p } => {
            D::Price(v1::PriceDetail {
                model: model.clone(),
                version: Some(v1::PriceVersion {
                    version: *version,
                    effective_from_ms: *effective_from_ms,
                    price: Some(price(p)),
                    set_at_ms: 0,
                }),
            })
        }
        Detail::Options(o) => D::Options(budget_options(o)),
        Detail::Threshold { percent } => D::ThresholdPct(*percent),
        Detail::WouldRefuse { granted, available } => D::WouldRefuse(v1::WouldRefuse {
            granted: to_i64(*granted),
            available: to_i64(*available),
        }),
        Detail::Call { trace, usage } => {
            D::Call(v1::CallDetail { trace: trace.clone(), usage: Some(usage_line(usage)) })
        }
    }
}

/// A window's end as the API gives it: absent for a window that never ends (a
/// lifetime limit, whose end the ledger keeps as `u64::MAX`), rather than a
/// sentinel that reads as the year 292,278,994.
fn window_end(ms: u64) -> Option<u64> {
    (ms <= ration_core::window::MAX_TIME_MS.saturating_add(1)).then_some(ms)
}
