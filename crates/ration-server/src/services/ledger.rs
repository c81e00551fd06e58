//! The Ledger service: budgets, leases and the audit trail, for gateways and tools.
//!
//! Writes go through [`LedgerService::write`]: convert (ration-proto), route
//! (propose here, or forward to the leader), convert the outcomes back. Reads
//! answer from this node's applied state, or, when linearizable, from the leader.

use std::sync::Arc;

use openraft::error::RaftError;
use ration_core::{Command, Outcome, Reply};
use ration_proto::convert::{to_core, to_proto};
use ration_proto::v1::{self, ledger_client::LedgerClient};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::forward;
use super::IntoStatus;
use crate::auth::Caller;
use crate::{Node, Routed};

/// Audit records read from storage per step of a `QueryAudit` scan.
const AUDIT_SCAN_CHUNK: usize = 4096;
/// Most audit records one `QueryAudit` call examines, matching or not.
const AUDIT_MAX_SCANNED: usize = 1 << 20;

#[derive(Clone, Debug)]
pub(super) struct LedgerService {
    pub(super) node: Arc<Node>,
}

/// The one outcome of a one-command write.
fn only(outcomes: Vec<Outcome>) -> Result<Reply, Status> {
    let n = outcomes.len();
    let mut outcomes = outcomes.into_iter();
    match (outcomes.next(), outcomes.next()) {
        (Some(outcome), None) => outcome.map_err(|e| to_proto::status(&e)),
        _ => Err(Status::internal(format!("one command got {n} outcomes"))),
    }
}

impl LedgerService {
    /// Every write: converts `req` into commands, proposes them here or forwards
    /// the call to the leader (with `call`), and converts the outcomes with `reply`.
    async fn write<Req, Rep, Fut>(
        &self,
        req: Request<Req>,
        convert: impl FnOnce(&Req, &Screen<'_>) -> Result<Vec<ration_core::Request>, Status>,
        reply: impl FnOnce(&Req, Vec<Outcome>) -> Result<Rep, Status>,
        call: impl FnOnce(LedgerClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Response<Rep>, Status>
    where
        Fut: std::future::Future<Output = Result<Response<Rep>, Status>>,
    {
        let already_forwarded = forward::was_forwarded(&req);
        let caller = Caller::of(&req);
        let inner = req.into_inner();
        self.write_as(&caller, already_forwarded, inner, convert, reply, call)
            .await
            .map(Response::new)
    }

    /// [`Self::write`] for a request already taken apart: who calls, whether a
    /// member forwarded it, and the message (a Pipeline call's operations come
    /// this way, without a gRPC request of their own).
    async fn write_as<Req, Rep, Fut>(
        &self,
        caller: &Caller,
        already_forwarded: bool,
        inner: Req,
        convert: impl FnOnce(&Req, &Screen<'_>) -> Result<Vec<ration_core::Request>, Status>,
        reply: impl FnOnce(&Req, Vec<Outcome>) -> Result<Rep, Status>,
        call: impl FnOnce(LedgerClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Rep, Status>
    where
        Fut: std::future::Future<Output = Result<Response<Rep>, Status>>,
    {
        let authority = crate::auth::authority(caller, &self.node.config.admins)?
            .map(|(_, authority)| authority);
        let screen = Screen { node: &self.node, caller, authority };
        let requests = convert(&inner, &screen)?;
        let commands: Vec<Command> = requests
            .into_iter()
            .map(|request| match authority {
                Some(authority) => Command::Authenticated { request, authority },
                None => Command::Request(request),
            })
            .collect();
        if commands.is_empty() {
            return reply(&inner, Vec::new());
        }
        match self.node.route(commands).await.map_err(IntoStatus::into_status)? {
            Routed::Done(outcomes) => reply(&inner, outcomes),
            Routed::Forward(addr) => forward::forward(
                &self.node,
                already_forwarded,
                caller.principal(),
                &addr,
                inner,
                call,
            )
            .await
            .map(Response::into_inner),
        }
    }

    /// GrantRole, or with `revoke` RevokeRole.
    async fn role_change(
        &self,
        req: Request<v1::RoleRequest>,
        revoke: bool,
    ) -> Result<Response<v1::RolesReply>, Status> {
        let node = self.node.clone();
        let call = move |mut c: LedgerClient<Channel>, r| async move {
            if revoke {
                c.revoke_role(r).await
            } else {
                c.grant_role(r).await
            }
        };
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::role_change(r, revoke)?)?]),
            move |r, outcomes| {
                let reply = only(outcomes)?;
                let subject = ration_core::Principal::new(r.subject.as_str())
                    .map_err(|e| Status::internal(e.to_string()))?;
                let roles = node.reader.state().ledger.roles_of(&subject);
                to_proto::roles_reply(&reply, &roles)
            },
            call,
        )
        .await
    }

    /// A Batch call's work, for the call and for each Pipeline operation.
    async fn batch_as(
        &self,
        caller: &Caller,
        already_forwarded: bool,
        req: v1::BatchRequest,
    ) -> Result<v1::BatchReply, Status> {
        // Each operation succeeds or fails on its own, as the proto promises: the
        // valid ones are proposed, the invalid ones (and those `screen` refuses: another
        // principal's, not allowed by the caller's roles, another's lease) answered
        // with their error in place. Only a malformed envelope refuses the whole call. The conversion
        // keeps each refusal in its place for the reply (converted once).
        let refused: std::sync::Mutex<Vec<Option<Status>>> = std::sync::Mutex::default();
        self.write_as(
            caller,
            already_forwarded,
            req,
            |r, screen| {
                let mut marks = refused.lock().unwrap_or_else(|p| p.into_inner());
                let mut valid = Vec::with_capacity(r.ops.len());
                for op in to_core::batch(r)? {
                    match op.and_then(|request| screen.check(request)) {
                        Ok(request) => {
                            marks.push(None);
                            valid.push(request);
                        }
                        Err(status) => marks.push(Some(status)),
                    }
                }
                Ok(valid)
            },
            |_, outcomes| {
                let marks = std::mem::take(&mut *refused.lock().unwrap_or_else(|p| p.into_inner()));
                let valid = marks.iter().filter(|m| m.is_none()).count();
                if outcomes.len() != valid {
                    return Err(Status::internal(format!(
                        "{valid} valid operations got {} outcomes",
                        outcomes.len()
                    )));
                }
                let mut outcomes = outcomes.iter();
                let results = marks
                    .iter()
                    .map(|mark| match mark {
                        None => outcomes.next().map_or_else(
                            || to_proto::batch_error(&Status::internal("outcome missing")),
                            to_proto::batch_result,
                        ),
                        Some(refused) => to_proto::batch_error(refused),
                    })
                    .collect();
                Ok(v1::BatchReply { results })
            },
            on_leader!(LedgerClient, batch),
        )
        .await
    }

    /// One operation of a Pipeline call, run as a Batch of one by `caller`: its
    /// result, or the status the whole Batch failed with as its error.
    async fn pipelined(&self, op: Option<v1::BatchOp>, caller: Caller) -> v1::BatchResult {
        use v1::batch_result::Result as R;
        let req = v1::BatchRequest { ops: vec![op.unwrap_or_default()] };
        let mut result = match self.batch_as(&caller, false, req).await {
            Ok(reply) => reply.results.into_iter().next().unwrap_or_else(|| {
                to_proto::batch_error(&Status::internal("a batch of one had no result"))
            }),
            Err(status) => to_proto::batch_error(&status),
        };
        // The Batch conversion names the operation's place; in a pipeline the tag
        // does.
        if let Some(R::Error(e)) = &mut result.result {
            if let Some(rest) = e.message.strip_prefix("ops[0]: ") {
                e.message = rest.to_owned();
            }
        }
        result
    }

    /// Refuses `caller` a read its roles do not allow.
    fn allow(&self, caller: &Caller, action: ration_core::Action<'_>) -> Result<(), Status> {
        super::allow(&self.node, caller, action)
    }

    /// Read-index on the leader. Returns false if this node is not the leader (the
    /// read must then go to the leader).
    async fn linearize(&self) -> Result<bool, Status> {
        if !self.node.is_leader() {
            return Ok(false);
        }
        match self.node.raft.ensure_linearizable().await {
            Ok(_) => Ok(true),
            Err(RaftError::APIError(_)) => Ok(false),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

/// What every write's requests pass before anything is proposed (see
/// [`Screen::check`]): the caller, and the authority its requests carry.
pub(super) struct Screen<'a> {
    node: &'a Node,
    caller: &'a Caller,
    authority: Option<ration_core::Authority>,
}

impl Screen<'_> {
    /// Refuses, without proposing anything, what the ledger would refuse as the
    /// caller's: a request naming another principal than the authenticated one; on
    /// the leader, one the caller's roles do not allow (as it has applied them: the
    /// ledger checks again in log order); a Report or Release of a lease this node
    /// knows to be another principal's (final: a lease's principal never changes).
    /// So the log and the ledger do not move. What this node has not applied yet
    /// goes to the ledger, which refuses it without remembering it.
    fn check(&self, request: ration_core::Request) -> Result<ration_core::Request, Status> {
        if let Some(me) = self.caller.principal() {
            if request.principal.as_str() != me {
                return Err(Status::permission_denied(format!(
                    "the request names principal {:?}, but the caller is authenticated as {me:?}",
                    request.principal.as_str()
                )));
            }
        }
        let state = self.node.reader.state();
        // Roles only on the leader: a follower may not have applied a grant its
        // caller already saw answered (the leader checks, and the ledger again).
        if let Some(authority) = self.authority.filter(|_| self.node.is_leader()) {
            state
                .ledger
                .authorize_request(&request, authority)
                .map_err(|e| to_proto::status(&e))?;
        }
        let id = match &request.op {
            ration_core::Op::Report(r) => r.lease,
            ration_core::Op::Release(r) => r.lease,
            _ => return Ok(request),
        };
        if state.ledger.owned_by_another(id, &request.principal) {
            return Err(to_proto::status(&ration_core::LedgerError::ForeignLease { lease: id }));
        }
        drop(state);
        Ok(request)
    }
}

#[tonic::async_trait]
impl v1::ledger_server::Ledger for LedgerService {
    async fn create_budget(
        &self,
        req: Request<v1::CreateBudgetRequest>,
    ) -> Result<Response<v1::BudgetChanged>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::create_budget(r)?)?]),
            |r, outcomes| to_proto::budget_changed(&r.path, &only(outcomes)?),
            on_leader!(LedgerClient, create_budget),
        )
        .await
    }

    async fn set_template(
        &self,
        req: Request<v1::SetTemplateRequest>,
    ) -> Result<Response<v1::TemplateReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::set_template(r)?)?]),
            |r, outcomes| to_proto::template_reply(&r.parent, &only(outcomes)?),
            on_leader!(LedgerClient, set_template),
        )
        .await
    }

    async fn delete_template(
        &self,
        req: Request<v1::DeleteTemplateRequest>,
    ) -> Result<Response<v1::TemplateReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::delete_template(r)?)?]),
            |r, outcomes| to_proto::template_reply(&r.parent, &only(outcomes)?),
            on_leader!(LedgerClient, delete_template),
        )
        .await
    }

    async fn freeze_budget(
        &self,
        req: Request<v1::FreezeRequest>,
    ) -> Result<Response<v1::FreezeReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::freeze(r)?)?]),
            |_, outcomes| to_proto::freeze_reply(&only(outcomes)?),
            on_leader!(LedgerClient, freeze_budget),
        )
        .await
    }

    async fn set_price(
        &self,
        req: Request<v1::SetPriceRequest>,
    ) -> Result<Response<v1::PriceReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::set_price(r)?)?]),
            |r, outcomes| to_proto::price_reply(&r.model, &only(outcomes)?),
            on_leader!(LedgerClient, set_price),
        )
        .await
    }

    async fn list_prices(
        &self,
        req: Request<v1::ListPricesRequest>,
    ) -> Result<Response<v1::ListPricesReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, list_prices))
                .await;
        }
        let model = to_core::list_prices(req.get_ref())?;
        // The price book is read by every gateway to price its reservations: any
        // caller the node accepts (with TLS, an authenticated one) may read it, with
        // no role needed.
        let state = self.node.reader.state();
        let models = state
            .ledger
            .prices()
            .filter(|(m, _)| model.as_deref().is_none_or(|x| x == *m))
            .map(|(m, v)| to_proto::model_prices(m, v))
            .collect();
        Ok(Response::new(v1::ListPricesReply { models, now_ms: state.ledger.now_ms() }))
    }

    async fn set_budget_options(
        &self,
        req: Request<v1::SetBudgetOptionsRequest>,
    ) -> Result<Response<v1::BudgetOptionsReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::set_budget_options(r)?)?]),
            |r, outcomes| to_proto::options_reply(&r.path, &only(outcomes)?),
            on_leader!(LedgerClient, set_budget_options),
        )
        .await
    }

    async fn record_call(
        &self,
        req: Request<v1::RecordCallRequest>,
    ) -> Result<Response<v1::RecordCallReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::record_call(r)?)?]),
            |_, outcomes| to_proto::record_call_reply(&only(outcomes)?),
            on_leader!(LedgerClient, record_call),
        )
        .await
    }

    async fn forecast(
        &self,
        req: Request<v1::ForecastRequest>,
    ) -> Result<Response<v1::ForecastReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, forecast)).await;
        }
        let path = to_core::forecast(req.get_ref())?;
        self.allow(&Caller::of(&req), ration_core::Action::ReadBudget(Some(&path)))?;
        let state = self.node.reader.state();
        let limits = state.ledger.forecast(&path).map_err(|e| to_proto::status(&e))?;
        Ok(Response::new(to_proto::forecast(path.as_str(), state.ledger.now_ms(), &limits)))
    }

    async fn update_budget(
        &self,
        req: Request<v1::UpdateBudgetRequest>,
    ) -> Result<Response<v1::BudgetChanged>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::update_budget(r)?)?]),
            |r, outcomes| to_proto::budget_changed(&r.path, &only(outcomes)?),
            on_leader!(LedgerClient, update_budget),
        )
        .await
    }

    async fn delete_budget(
        &self,
        req: Request<v1::DeleteBudgetRequest>,
    ) -> Result<Response<v1::BudgetChanged>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::delete_budget(r)?)?]),
            |r, outcomes| to_proto::budget_changed(&r.path, &only(outcomes)?),
            on_leader!(LedgerClient, delete_budget),
        )
        .await
    }

    async fn acquire(
        &self,
        req: Request<v1::AcquireRequest>,
    ) -> Result<Response<v1::Lease>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::acquire(r)?)?]),
            |_, outcomes| to_proto::lease(&only(outcomes)?),
            on_leader!(LedgerClient, acquire),
        )
        .await
    }

    async fn report(
        &self,
        req: Request<v1::ReportRequest>,
    ) -> Result<Response<v1::ReportReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::report(r)?)?]),
            |_, outcomes| to_proto::report_reply(&only(outcomes)?),
            on_leader!(LedgerClient, report),
        )
        .await
    }

    async fn report_overrun(
        &self,
        req: Request<v1::OverrunRequest>,
    ) -> Result<Response<v1::OverrunReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::overrun(r)?)?]),
            |_, outcomes| to_proto::overrun_reply(&only(outcomes)?),
            on_leader!(LedgerClient, report_overrun),
        )
        .await
    }

    async fn release(
        &self,
        req: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseReply>, Status> {
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::release(r)?)?]),
            |_, outcomes| to_proto::release_reply(&only(outcomes)?),
            on_leader!(LedgerClient, release),
        )
        .await
    }

    async fn batch(
        &self,
        req: Request<v1::BatchRequest>,
    ) -> Result<Response<v1::BatchReply>, Status> {
        let already_forwarded = forward::was_forwarded(&req);
        let caller = Caller::of(&req);
        self.batch_as(&caller, already_forwarded, req.into_inner()).await.map(Response::new)
    }

    type PipelineStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::PipelineResult, Status>> + Send>,
    >;

    async fn pipeline(
        &self,
        req: Request<tonic::Streaming<v1::PipelineOp>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        // Authenticated once, as the call opens (the Gate layer); each operation's
        // roles are checked as it runs, and so is the expiry of the bearer token the
        // call was opened with, if any.
        let caller = Caller::of(&req);
        let expiry = req.extensions().get::<crate::auth::TokenExpiry>().copied();
        let service = self.clone();
        let results =
            super::pipeline::drive(req.into_inner(), super::pipeline::MAX_IN_FLIGHT, move |op| {
                let (service, caller) = (service.clone(), caller.clone());
                async move {
                    let expired = expiry.map(|e| e.check(ration_tls::token::unix_now()));
                    if let Some(Err(status)) = expired {
                        return to_proto::batch_error(&status);
                    }
                    service.pipelined(op, caller).await
                }
            });
        Ok(Response::new(Box::pin(results)))
    }

    async fn set_limits(
        &self,
        req: Request<v1::SetLimitsRequest>,
    ) -> Result<Response<v1::LimitsReply>, Status> {
        let node = self.node.clone();
        self.write(
            req,
            |r, screen| Ok(vec![screen.check(to_core::set_limits(r)?)?]),
            move |_, outcomes| {
                only(outcomes)?;
                let state = node.reader.state();
                Ok(v1::LimitsReply {
                    limits: Some(to_proto::principal_limits(&state.ledger.principal_limits())),
                    usage: Vec::new(),
                })
            },
            on_leader!(LedgerClient, set_limits),
        )
        .await
    }

    async fn get_limits(
        &self,
        req: Request<v1::GetLimitsRequest>,
    ) -> Result<Response<v1::LimitsReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, get_limits)).await;
        }
        let (principal, top) = to_core::get_limits(req.get_ref())?;
        // One's own usage, or anyone's for an admin.
        let caller = Caller::of(&req);
        if principal.as_ref().is_none_or(|p| caller.principal() != Some(p.as_str())) {
            self.allow(&caller, ration_core::Action::Administer)?;
        }
        let state = self.node.reader.state();
        let ledger = &state.ledger;
        let usage = match principal {
            Some(p) => vec![to_proto::principal_usage(p.as_str(), &ledger.principal_usage(&p))],
            None => ledger
                .top_principals(top)
                .iter()
                .map(|(p, u)| to_proto::principal_usage(p.as_str(), u))
                .collect(),
        };
        Ok(Response::new(v1::LimitsReply {
            limits: Some(to_proto::principal_limits(&ledger.principal_limits())),
            usage,
        }))
    }

    async fn get_budget(
        &self,
        req: Request<v1::GetBudgetRequest>,
    ) -> Result<Response<v1::Budget>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, get_budget)).await;
        }
        let path = to_core::get_budget(req.get_ref())?;
        self.allow(&Caller::of(&req), ration_core::Action::ReadBudget(Some(&path)))?;
        let state = self.node.reader.state();
        let view = state
            .ledger
            .budget(&path)
            .ok_or_else(|| Status::not_found(format!("budget {path} does not exist")))?;
        Ok(Response::new(to_proto::budget(&view)))
    }

    async fn list_budgets(
        &self,
        req: Request<v1::ListBudgetsRequest>,
    ) -> Result<Response<v1::ListBudgetsReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, list_budgets))
                .await;
        }
        let page = to_core::list_budgets(req.get_ref())?;
        self.allow(&Caller::of(&req), ration_core::Action::ReadBudget(page.subtree.as_ref()))?;
        let state = self.node.reader.state();
        let budgets =
            state.ledger.budgets(page.subtree.as_ref(), page.start_after.as_ref(), page.limit);
        Ok(Response::new(v1::ListBudgetsReply {
            budgets: budgets.iter().map(to_proto::budget).collect(),
        }))
    }

    async fn get_lease(
        &self,
        req: Request<v1::GetLeaseRequest>,
    ) -> Result<Response<v1::LeaseInfo>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, get_lease)).await;
        }
        let id = to_core::get_lease(req.get_ref());
        // Another's lease reads as absent: lease ids are guessable, and a refusal
        // would tell that it exists and where.
        if self.allow(&Caller::of(&req), ration_core::Action::ReadLease(id)).is_err() {
            return Err(Status::not_found(format!("lease {id} is not live")));
        }
        let state = self.node.reader.state();
        let view = state
            .ledger
            .lease(id)
            .ok_or_else(|| Status::not_found(format!("lease {id} is not live")))?;
        Ok(Response::new(to_proto::lease_info(&view)))
    }

    async fn query_audit(
        &self,
        req: Request<v1::QueryAuditRequest>,
    ) -> Result<Response<v1::QueryAuditReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, query_audit))
                .await;
        }
        let page = to_core::query_audit(req.get_ref())?;
        let caller = Caller::of(&req);
        self.allow(&caller, ration_core::Action::ReadAudit(page.filter.subtree.as_ref()))?;
        // A scoped auditor does not see the figures of budgets above its scope that
        // a record's change also touched.
        let visible = crate::auth::authority(&caller, &self.node.config.admins)?
            .and_then(|(p, authority)| self.node.reader.state().ledger.audit_scopes(&p, authority));
        let audit = self.node.reader.audit.clone();
        let (records, next) = self
            .node
            .heavy("an audit query", move || -> Result<_, Status> {
                let mut records = Vec::new();
                let mut next = page.from_seq;
                // Scan in bounded chunks so one query cannot hold memory without
                // limit; skip sealed segments whose zone maps rule the filter out.
                let mut scanned = 0usize;
                while records.len() < page.limit && scanned < AUDIT_MAX_SCANNED {
                    next = audit.skip_to(next, &page.filter);
                    let chunk =
                        audit.read(next, AUDIT_SCAN_CHUNK).map_err(IntoStatus::into_status)?;
                    if chunk.is_empty() {
                        break;
                    }
                    for rec in chunk {
                        scanned += 1;
                        next = rec.entry.seq + 1;
                        if page.filter.matches(&rec) {
                            let mut record = to_proto::audit_record(&rec);
                            if let Some(scopes) = &visible {
                                // The proto's balances are the record's, in order.
                                let mut shown = rec
                                    .entry
                                    .balances
                                    .iter()
                                    .map(|b| scopes.iter().any(|s| b.budget.is_within(s)));
                                record.balances.retain(|_| shown.next().unwrap_or(false));
                            }
                            records.push(record);
                            if records.len() == page.limit {
                                break;
                            }
                        }
                    }
                }
                Ok((records, next))
            })
            .await??;
        Ok(Response::new(v1::QueryAuditReply { records, next_seq: next }))
    }

    async fn grant_role(
        &self,
        req: Request<v1::RoleRequest>,
    ) -> Result<Response<v1::RolesReply>, Status> {
        self.role_change(req, false).await
    }

    async fn revoke_role(
        &self,
        req: Request<v1::RoleRequest>,
    ) -> Result<Response<v1::RolesReply>, Status> {
        self.role_change(req, true).await
    }

    async fn list_roles(
        &self,
        req: Request<v1::ListRolesRequest>,
    ) -> Result<Response<v1::ListRolesReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            return forward::to_leader(&self.node, req, on_leader!(LedgerClient, list_roles)).await;
        }
        let page = to_core::list_roles(req.get_ref())?;
        // One's own roles, or anyone's for an admin.
        let caller = Caller::of(&req);
        if page.principal.as_ref().is_none_or(|p| caller.principal() != Some(p.as_str())) {
            self.allow(&caller, ration_core::Action::Administer)?;
        }
        let state = self.node.reader.state();
        let principals = match &page.principal {
            Some(p) => vec![(p.clone(), state.ledger.roles_of(p))],
            None => state.ledger.all_roles(page.start_after.as_ref(), page.limit),
        };
        Ok(Response::new(v1::ListRolesReply {
            principals: principals
                .iter()
                .map(|(p, roles)| v1::PrincipalRoles {
                    principal: p.to_string(),
                    roles: to_proto::role_scopes(roles),
                })
                .collect(),
        }))
    }
}
