//! The gRPC services a node serves on one port: Ledger (clients), Cluster
//! (operators), Raft (peers), grpc.health.v1 and server reflection (v1 and v1alpha).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use ration_core::audit::AuditFilter;
use ration_core::{Command, LeaseId};
use ration_proto::convert;
use ration_proto::v1::{
    self, cluster_client::ClusterClient, cluster_server::ClusterServer,
    ledger_client::LedgerClient, ledger_server::LedgerServer, raft_server::RaftServer,
};
use tonic::{Request as GrpcRequest, Response, Status};

use crate::{Node, ProposeError, Routed, RoutedAll};

/// Set on a request a follower forwarded, so it is never forwarded twice.
const FORWARDED: &str = "x-ration-forwarded";
/// Most records or budgets one page returns.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

/// Serves every service on the connections `incoming` yields: a TCP listener in
/// production, a simulated network in tests.
pub(crate) async fn serve<I, IO, IE>(
    node: Arc<Node>,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: crate::Connection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = node.config.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    // Cluster (operations) serves from the start; the overall status ("") and
    // Ledger serve only while this node knows a leader, so a readiness probe keeps
    // clients away from a node that could not answer them.
    health.set_serving::<ClusterServer<ClusterService>>().await;
    tokio::spawn(track_readiness(node.raft.metrics(), health.clone()));
    // Each reflection version also lists the other, so either shows every service.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ration_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ration_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let ledger = LedgerServer::new(LedgerService { node: node.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let cluster = ClusterServer::new(ClusterService { node: node.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let peer_max = node.config.peer_max_message_bytes;
    let raft = RaftServer::new(RaftService { node: node.clone() })
        .max_decoding_message_size(peer_max)
        .max_encoding_message_size(peer_max);
    tonic::transport::Server::builder()
        .layer(crate::metrics::RpcTimer { metrics: node.metrics.clone() })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ledger)
        .add_service(cluster)
        .add_service(raft)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Keeps the health status of "" and Ledger in step with whether a leader is known.
async fn track_readiness(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, BasicNode>>,
    health: tonic_health::server::HealthReporter,
) {
    let mut ready = None;
    loop {
        let now = {
            let m = metrics.borrow_and_update();
            m.current_leader.is_some() && m.state != ServerState::Shutdown
        };
        if ready != Some(now) {
            ready = Some(now);
            let status = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health.set_service_status("ration.v1.Ledger", status).await;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { .. } => Status::unavailable(
            "no leader is known right now (election in progress); retry shortly",
        ),
        ProposeError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
        ProposeError::Shutdown => Status::unavailable(e.to_string()),
        ProposeError::Unknown(_) => Status::unavailable(e.to_string()),
    }
}

fn forwarded<T>(req: &GrpcRequest<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

fn forward_request<T>(inner: T) -> GrpcRequest<T> {
    let mut r = GrpcRequest::new(inner);
    r.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

#[derive(Debug)]
struct LedgerService {
    node: Arc<Node>,
}

/// Proposes `$core` here or forwards the original request to the leader.
macro_rules! write {
    ($self:ident, $req:ident, $convert:path, $method:ident, $reply:expr) => {{
        let was_forwarded = forwarded(&$req);
        let inner = $req.into_inner();
        let command = Command::Request($convert(&inner)?);
        match $self.node.route(command).await.map_err(propose_status)? {
            Routed::Done(outcome) => {
                let reply = outcome.map_err(|e| convert::status(&e))?;
                Ok(Response::new($reply(&inner, &reply)?))
            }
            Routed::Forward(_) if was_forwarded => Err(Status::unavailable(
                "leadership is moving; retry shortly (with the same request id)",
            )),
            Routed::Forward(addr) => {
                let channel = $self
                    .node
                    .channels
                    .get(&addr)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let mut client = LedgerClient::new(channel);
                let result = client.$method(forward_request(inner)).await;
                $self.node.channels.forget_on_failure(&addr, result)
            }
        }
    }};
}

/// For linearizable reads on a follower: forward to the leader.
macro_rules! read_via_leader {
    ($self:ident, $req:ident, $method:ident) => {{
        if forwarded(&$req) {
            return Err(Status::unavailable("leadership is moving; retry shortly"));
        }
        let (_, addr) = $self
            .node
            .leader()
            .ok_or_else(|| Status::unavailable("no leader is known right now"))?;
        let channel =
            $self.node.channels.get(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
        let result = LedgerClient::new(channel).$method(forward_request($req.into_inner())).await;
        return $self.node.channels.forget_on_failure(&addr, result);
    }};
}

impl LedgerService {
    /// Read-index on the leader. Returns false if this node is not the leader.
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

fn page(limit: u32) -> usize {
    (if limit == 0 { DEFAULT_PAGE } else { limit.min(MAX_PAGE) }) as usize
}

#[tonic::async_trait]
impl v1::ledger_server::Ledger for LedgerService {
    async fn create_budget(
        &self,
        req: GrpcRequest<v1::CreateBudgetRequest>,
    ) -> Result<Response<v1::BudgetChanged>, Status> {
        write!(
            self,
            req,
            convert::create_budget,
            create_budget,
            |r: &v1::CreateBudgetRequest, reply| { convert::budget_changed(&r.path, reply) }
        )
    }

    async fn update_budget(
        &self,
        req: GrpcRequest<v1::UpdateBudgetRequest>,
    ) -> Result<Response<v1::BudgetChanged>, Status> {
        write!(
            self,
            req,
            convert::update_budget,
            update_budget,
            |r: &v1::UpdateBudgetRequest, reply| { convert::budget_changed(&r.path, reply) }
        )
    }

    async fn delete_budget(
        &self,
        req: GrpcRequest<v1::DeleteBudgetRequest>,
    ) -> Result<Response<v1::BudgetChanged>, Status> {
        write!(
            self,
            req,
            convert::delete_budget,
            delete_budget,
            |r: &v1::DeleteBudgetRequest, reply| { convert::budget_changed(&r.path, reply) }
        )
    }

    async fn get_budget(
        &self,
        req: GrpcRequest<v1::GetBudgetRequest>,
    ) -> Result<Response<v1::Budget>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            read_via_leader!(self, req, get_budget);
        }
        let path = convert::path("path", &req.get_ref().path)?;
        let state = self.node.reader.state();
        let view = state
            .ledger
            .budget(&path)
            .ok_or_else(|| Status::not_found(format!("budget {path} does not exist")))?;
        Ok(Response::new(convert::budget(&view)))
    }

    async fn list_budgets(
        &self,
        req: GrpcRequest<v1::ListBudgetsRequest>,
    ) -> Result<Response<v1::ListBudgetsReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            read_via_leader!(self, req, list_budgets);
        }
        let r = req.get_ref();
        let subtree =
            (!r.subtree.is_empty()).then(|| convert::path("subtree", &r.subtree)).transpose()?;
        let after = (!r.start_after.is_empty())
            .then(|| convert::path("start_after", &r.start_after))
            .transpose()?;
        let state = self.node.reader.state();
        let budgets = state.ledger.budgets(subtree.as_ref(), after.as_ref(), page(r.limit));
        Ok(Response::new(v1::ListBudgetsReply {
            budgets: budgets.iter().map(convert::budget).collect(),
        }))
    }

    async fn acquire(
        &self,
        req: GrpcRequest<v1::AcquireRequest>,
    ) -> Result<Response<v1::Lease>, Status> {
        write!(
            self,
            req,
            convert::acquire,
            acquire,
            |_: &v1::AcquireRequest, reply| convert::lease(reply)
        )
    }

    async fn report(
        &self,
        req: GrpcRequest<v1::ReportRequest>,
    ) -> Result<Response<v1::ReportReply>, Status> {
        write!(self, req, convert::report, report, |_: &v1::ReportRequest, reply| {
            convert::report_reply(reply)
        })
    }

    async fn release(
        &self,
        req: GrpcRequest<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseReply>, Status> {
        write!(self, req, convert::release, release, |_: &v1::ReleaseRequest, reply| {
            convert::release_reply(reply)
        })
    }

    async fn get_lease(
        &self,
        req: GrpcRequest<v1::GetLeaseRequest>,
    ) -> Result<Response<v1::LeaseInfo>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            read_via_leader!(self, req, get_lease);
        }
        let id = LeaseId::from_raw(req.get_ref().lease_id);
        let state = self.node.reader.state();
        let view = state
            .ledger
            .lease(id)
            .ok_or_else(|| Status::not_found(format!("lease {id} is not live")))?;
        Ok(Response::new(convert::lease_info(&view)))
    }

    async fn batch(
        &self,
        req: GrpcRequest<v1::BatchRequest>,
    ) -> Result<Response<v1::BatchReply>, Status> {
        let was_forwarded = forwarded(&req);
        let inner = req.into_inner();
        let commands: Vec<Command> =
            convert::batch(&inner)?.into_iter().map(Command::Request).collect();
        if commands.is_empty() {
            return Ok(Response::new(v1::BatchReply { results: vec![] }));
        }
        match self.node.route_all(commands).await.map_err(propose_status)? {
            RoutedAll::Done(outcomes) => Ok(Response::new(v1::BatchReply {
                results: outcomes.iter().map(convert::batch_result).collect(),
            })),
            RoutedAll::Forward(_) if was_forwarded => Err(Status::unavailable(
                "leadership is moving; retry shortly (with the same request ids)",
            )),
            RoutedAll::Forward(addr) => {
                let channel = self
                    .node
                    .channels
                    .get(&addr)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let result = LedgerClient::new(channel)
                    .max_decoding_message_size(self.node.config.max_message_bytes)
                    .max_encoding_message_size(self.node.config.max_message_bytes)
                    .batch(forward_request(inner))
                    .await;
                self.node.channels.forget_on_failure(&addr, result)
            }
        }
    }

    async fn query_audit(
        &self,
        req: GrpcRequest<v1::QueryAuditRequest>,
    ) -> Result<Response<v1::QueryAuditReply>, Status> {
        if req.get_ref().linearizable && !self.linearize().await? {
            read_via_leader!(self, req, query_audit);
        }
        let r = req.into_inner();
        let filter = AuditFilter {
            subtree: (!r.subtree.is_empty())
                .then(|| convert::path("subtree", &r.subtree))
                .transpose()?,
            principal: (!r.principal.is_empty())
                .then(|| ration_core::Principal::new(r.principal.as_str()))
                .transpose()
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            kinds: r.kinds.iter().map(|k| convert::audit_kind(k)).collect::<Result<_, _>>()?,
            from_ms: r.from_ms,
            to_ms: r.to_ms,
        };
        let want = page(r.limit);
        let mut records = Vec::new();
        let mut next = r.from_seq;
        // Scan in bounded chunks so one query cannot hold memory without limit.
        const SCAN: usize = 4096;
        const MAX_SCANNED: usize = 1 << 20;
        let mut scanned = 0usize;
        while records.len() < want && scanned < MAX_SCANNED {
            let chunk = self
                .node
                .reader
                .audit_records(next, SCAN)
                .map_err(|e| Status::internal(e.to_string()))?;
            if chunk.is_empty() {
                break;
            }
            for rec in chunk {
                scanned += 1;
                next = rec.entry.seq + 1;
                if filter.matches(&rec) {
                    records.push(convert::audit_record(&rec));
                    if records.len() == want {
                        break;
                    }
                }
            }
        }
        Ok(Response::new(v1::QueryAuditReply { records, next_seq: next }))
    }
}

#[derive(Debug)]
struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    fn members(&self) -> Vec<v1::Member> {
        let m = self.node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| v1::Member { id: *id, addr: n.addr.clone(), voter: voters.contains(id) })
            .collect()
    }

    fn status(&self, with_digest: bool) -> v1::StatusReply {
        let m = self.node.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let (digest, budgets, leases, applied) = {
            let state = self.node.reader.state();
            (
                if with_digest { state.ledger.digest().to_vec() } else { Vec::new() },
                state.ledger.budget_count() as u64,
                state.ledger.live_lease_count() as u64,
                state.last_applied.map(|l| l.index).unwrap_or(0),
            )
        };
        v1::StatusReply {
            id: self.node.id,
            addr: self.node.addr.clone(),
            role: role.into(),
            term: m.current_term,
            leader: m.current_leader,
            leader_addr: self.node.leader().map(|(_, a)| a).unwrap_or_default(),
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: crate::commit_index(&m).unwrap_or(applied).max(applied),
            applied_index: applied,
            members: self.members(),
            state_digest: digest,
            audit_records: ration_store::audit_len(&self.node.reader),
            budgets,
            live_leases: leases,
            data_bytes: ration_store::backup::dir_size(&self.node.config.data_dir),
        }
    }

    /// A client for the leader, and its address (for
    /// `Channels::forget_on_failure` on the call's result).
    async fn leader_client(
        &self,
    ) -> Result<(String, ClusterClient<tonic::transport::Channel>), Status> {
        let (_, addr) = self
            .node
            .leader()
            .ok_or_else(|| Status::unavailable("no leader is known right now"))?;
        let channel =
            self.node.channels.get(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
        Ok((addr, ClusterClient::new(channel)))
    }
}

fn membership_status(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(c.to_string())
        }
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::unavailable("leadership moved; retry")
        }
        other => Status::unavailable(other.to_string()),
    }
}

/// Data per streamed snapshot chunk.
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// How long a requested snapshot may take to build.
const SNAPSHOT_BUILD: std::time::Duration = std::time::Duration::from_secs(120);

type ChunkStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl v1::cluster_server::Cluster for ClusterService {
    type SaveSnapshotStream = ChunkStream;

    async fn save_snapshot(
        &self,
        _req: GrpcRequest<v1::SaveSnapshotRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        use sha2::Digest;
        let applied = self.node.reader.state().last_applied.map(|l| l.index);
        if applied.is_none() {
            return Err(Status::failed_precondition("this node has applied nothing yet"));
        }
        self.node
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(format!("cannot start a snapshot: {e}")))?;
        self.node
            .raft
            .wait(Some(SNAPSHOT_BUILD))
            .metrics(|m| m.snapshot.map(|s| s.index) >= applied, "snapshot built")
            .await
            .map_err(|e| Status::deadline_exceeded(format!("snapshot not built: {e}")))?;
        let bytes = ration_store::backup::current_snapshot(&self.node.config.data_dir)
            .map_err(|e| Status::internal(format!("reading the snapshot: {e}")))?
            .ok_or_else(|| Status::internal("the snapshot file is missing"))?;
        let info = ration_store::backup::inspect_snapshot(&bytes)
            .map_err(|e| Status::internal(format!("the snapshot does not check: {e}")))?;
        let sha256 = sha2::Sha256::digest(&bytes).to_vec();
        let bytes = std::sync::Arc::new(bytes);
        let total = bytes.len();
        let chunks = total.div_ceil(SNAPSHOT_CHUNK).max(1);
        let stream = tokio_stream::iter((0..chunks).map(move |i| {
            let start = i * SNAPSHOT_CHUNK;
            let end = (start + SNAPSHOT_CHUNK).min(total);
            let first = i == 0;
            let last = i + 1 == chunks;
            Ok(v1::SnapshotChunk {
                data: bytes.get(start..end).unwrap_or_default().to_vec(),
                total_bytes: if first { total as u64 } else { 0 },
                last_log_index: if first { info.last_log_index } else { 0 },
                last_log_term: if first { info.last_log_term } else { 0 },
                sha256: if last { sha256.clone() } else { Vec::new() },
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn add_learner(
        &self,
        req: GrpcRequest<v1::AddLearnerRequest>,
    ) -> Result<Response<v1::MembershipReply>, Status> {
        if !self.node.is_leader() {
            if forwarded(&req) {
                return Err(Status::unavailable("leadership is moving; retry"));
            }
            let (addr, mut client) = self.leader_client().await?;
            let result = client.add_learner(forward_request(req.into_inner())).await;
            return self.node.channels.forget_on_failure(&addr, result);
        }
        let r = req.into_inner();
        if r.id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument("a learner needs a non-zero id and an address"));
        }
        let written = self
            .node
            .raft
            .add_learner(r.id, BasicNode::new(r.addr), true)
            .await
            .map_err(membership_status)?;
        Ok(Response::new(v1::MembershipReply {
            members: self.members(),
            log_index: written.log_id.index,
        }))
    }

    async fn change_membership(
        &self,
        req: GrpcRequest<v1::ChangeMembershipRequest>,
    ) -> Result<Response<v1::MembershipReply>, Status> {
        if !self.node.is_leader() {
            if forwarded(&req) {
                return Err(Status::unavailable("leadership is moving; retry"));
            }
            let (addr, mut client) = self.leader_client().await?;
            let result = client.change_membership(forward_request(req.into_inner())).await;
            return self.node.channels.forget_on_failure(&addr, result);
        }
        let r = req.into_inner();
        let change = match (r.voters.is_empty(), r.remove.is_empty()) {
            (false, true) => {
                openraft::ChangeMembers::ReplaceAllVoters(r.voters.into_iter().collect())
            }
            (true, false) => {
                let members = self.members();
                let voters: Vec<u64> = members.iter().filter(|m| m.voter).map(|m| m.id).collect();
                if voters.iter().all(|v| r.remove.contains(v)) {
                    return Err(Status::failed_precondition("cannot remove every voter"));
                }
                if let Some(id) = r.remove.iter().find(|id| !members.iter().any(|m| m.id == **id)) {
                    return Err(Status::not_found(format!("node {id} is not a member")));
                }
                // A voter is first demoted, then removed: openraft removes only learners.
                let removed: std::collections::BTreeSet<u64> = r.remove.into_iter().collect();
                if voters.iter().any(|v| removed.contains(v)) {
                    let keep: std::collections::BTreeSet<u64> =
                        voters.into_iter().filter(|v| !removed.contains(v)).collect();
                    self.node
                        .raft
                        .change_membership(keep, true)
                        .await
                        .map_err(membership_status)?;
                }
                openraft::ChangeMembers::RemoveNodes(removed)
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give either voters (the new voter set) or remove (nodes to remove)",
                ))
            }
        };
        let written =
            self.node.raft.change_membership(change, r.retain).await.map_err(membership_status)?;
        Ok(Response::new(v1::MembershipReply {
            members: self.members(),
            log_index: written.log_id.index,
        }))
    }

    async fn status(
        &self,
        req: GrpcRequest<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        Ok(Response::new(self.status(req.get_ref().digest)))
    }

    async fn transfer_leader(
        &self,
        req: GrpcRequest<v1::TransferLeaderRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let to = req.into_inner().to;
        let members: BTreeMap<u64, (String, bool)> =
            self.members().into_iter().map(|m| (m.id, (m.addr, m.voter))).collect();
        let (addr, voter) = members
            .get(&to)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("node {to} is not a member")))?;
        if !voter {
            return Err(Status::failed_precondition(format!(
                "node {to} is a learner, not a voter"
            )));
        }
        // openraft 0.9 has no leadership transfer, and followers that hear from a
        // leader refuse to vote: so every other voter pauses its elections (the leader
        // its heartbeats too) for a moment, and the target campaigns until it wins.
        const PAUSE_MS: u64 = 3000;
        for (id, (member_addr, is_voter)) in &members {
            if *id == to || !is_voter {
                continue;
            }
            let paused = match self.node.channels.get(member_addr) {
                Ok(ch) => {
                    let result = ClusterClient::new(ch)
                        .pause_elections(v1::PauseElectionsRequest { ms: PAUSE_MS })
                        .await;
                    self.node.channels.forget_on_failure(member_addr, result).map(|_| ())
                }
                Err(e) => Err(Status::unavailable(e.to_string())),
            };
            if let Err(e) = paused {
                tracing::warn!(node = id, "could not pause elections for a leader transfer: {e}");
            }
        }
        let channel =
            self.node.channels.get(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
        let result = ClusterClient::new(channel).campaign(v1::CampaignRequest {}).await;
        self.node.channels.forget_on_failure(&addr, result)
    }

    async fn campaign(
        &self,
        _req: GrpcRequest<v1::CampaignRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(8);
        while !self.node.is_leader() {
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(
                    "did not win an election in time; the cluster keeps its leader",
                ));
            }
            self.node
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        }
        Ok(Response::new(self.status(false)))
    }

    async fn pause_elections(
        &self,
        req: GrpcRequest<v1::PauseElectionsRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let ms = req.into_inner().ms;
        if ms == 0 || ms > 10_000 {
            return Err(Status::invalid_argument(format!("pause of {ms} ms is outside 1..=10000")));
        }
        let raft = self.node.raft.clone();
        raft.runtime_config().elect(false);
        raft.runtime_config().heartbeat(false);
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            raft.runtime_config().elect(true);
            raft.runtime_config().heartbeat(true);
        });
        Ok(Response::new(self.status(false)))
    }
}

#[derive(Debug)]
struct RaftService {
    node: Arc<Node>,
}

impl RaftService {
    /// Refuses a message from another cluster; learns the cluster id from the first
    /// message that carries one. Then decodes the payload.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        req: GrpcRequest<v1::RaftPayload>,
    ) -> Result<T, Status> {
        let payload = req.into_inner();
        let identity = &self.node.identity;
        let mine = identity.get();
        if mine != 0 && payload.cluster_id != 0 && payload.cluster_id != mine {
            return Err(Status::failed_precondition(format!(
                "raft message from cluster {:x}, but this node belongs to cluster {mine:x}; check the peer addresses",
                payload.cluster_id
            )));
        }
        identity.adopt(payload.cluster_id).map_err(|e| Status::internal(e.to_string()))?;
        postcard::from_bytes(&payload.data)
            .map_err(|e| Status::invalid_argument(format!("raft payload does not decode: {e}")))
    }

    fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Response<v1::RaftPayload>, Status> {
        let data = postcard::to_stdvec(value).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::RaftPayload { data, cluster_id: self.node.identity.get() }))
    }
}

#[tonic::async_trait]
impl v1::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: GrpcRequest<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        self.encode(&self.node.raft.append_entries(self.decode(req)?).await)
    }

    async fn vote(
        &self,
        req: GrpcRequest<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        self.encode(&self.node.raft.vote(self.decode(req)?).await)
    }

    async fn install_snapshot(
        &self,
        req: GrpcRequest<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        self.encode(&self.node.raft.install_snapshot(self.decode(req)?).await)
    }
}
