//! The Cluster service: status, membership, leadership and snapshots, for
//! operators (rationctl) and joining nodes.

use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, ServerState};
use ration_proto::v1::{self, cluster_client::ClusterClient};
use tonic::{Request, Response, Status};

use super::forward;
use super::IntoStatus;
use crate::Node;

/// How long `AddLearner` waits for the new learner to catch up.
/// (Below rationctl's default RPC deadline of 10 s, so it hears the answer.)
const LEARNER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often it looks.
const LEARNER_CATCH_UP_POLL: Duration = Duration::from_millis(100);
/// Data per streamed snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// How long a requested snapshot may take to build.
const SNAPSHOT_BUILD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub(super) struct ClusterService {
    pub(super) node: Arc<Node>,
}

fn role(state: ServerState) -> v1::Role {
    match state {
        ServerState::Leader => v1::Role::Leader,
        ServerState::Follower => v1::Role::Follower,
        ServerState::Candidate => v1::Role::Candidate,
        ServerState::Learner => v1::Role::Learner,
        ServerState::Shutdown => v1::Role::Shutdown,
    }
}

impl ClusterService {
    /// Finishes removing `remove` (this node among them, already demoted to a
    /// learner) on the leader elected after this one steps down.
    async fn finish_on_next_leader(
        &self,
        remove: Vec<u64>,
    ) -> Result<Response<v1::MembershipReply>, Status> {
        let patience = Duration::from_millis(4 * self.node.config.timing().follower_patience_ms());
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.node.leader() {
                crate::Leader::Other { addr, .. } => {
                    let req = v1::ChangeMembershipRequest { voters: vec![], retain: false, remove };
                    return forward::forward(
                        &self.node,
                        false,
                        None,
                        &addr,
                        req,
                        on_leader!(ClusterClient, change_membership),
                    )
                    .await;
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::unavailable(format!(
                        "node {} left the voters, but no other leader was elected within {} ms \
                         to remove it; retry the removal",
                        self.node.id,
                        patience.as_millis()
                    )));
                }
                _ => tokio::time::sleep(LEARNER_CATCH_UP_POLL).await,
            }
        }
    }

    fn status(&self, with_digest: bool) -> v1::StatusReply {
        let node = &self.node;
        let m = node.raft.metrics().borrow().clone();
        let (digest, budgets, leases, applied, ledger_time_ms) = {
            let state = node.reader.state();
            (
                if with_digest { state.ledger.digest().to_vec() } else { Vec::new() },
                state.ledger.budget_count() as u64,
                state.ledger.live_lease_count() as u64,
                state.last_applied.map(|l| l.index).unwrap_or(0),
                state.ledger.now_ms(),
            )
        };
        let (wall_ms, clock_skew_ms) = node.clock_reading();
        let leader_addr = match node.leader() {
            crate::Leader::Me => node.client_addr.clone(),
            crate::Leader::Other { id, addr } => node.client_addr_of(id, &addr),
            crate::Leader::Unknown => String::new(),
        };
        let mut reply = v1::StatusReply {
            id: node.id,
            addr: node.client_addr.clone(),
            peer_addr: node.addr.clone(),
            term: m.current_term,
            leader: m.current_leader,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: crate::commit_index(&m).unwrap_or(applied).max(applied),
            applied_index: applied,
            members: node.members(),
            state_digest: digest,
            audit_records: ration_store::audit_len(&node.reader),
            budgets,
            live_leases: leases,
            data_bytes: ration_store::backup::dir_size(&node.config.data_dir),
            cluster_id: node.identity.get(),
            membership_index: m.membership_config.log_id().as_ref().map_or(0, |l| l.index),
            wall_ms,
            ledger_time_ms,
            clock_skew_ms,
            leader_priority: node.config.leader_priority,
            failover_bound_ms: node.config.failover_bound_ms(),
            ..Default::default()
        };
        reply.set_role(role(m.state));
        reply
    }

    fn membership_reply(&self, log_index: u64) -> Response<v1::MembershipReply> {
        Response::new(v1::MembershipReply { members: self.node.members(), log_index })
    }
}

type ChunkStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl v1::cluster_server::Cluster for ClusterService {
    type SaveSnapshotStream = ChunkStream;

    async fn save_snapshot(
        &self,
        req: Request<v1::SaveSnapshotRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        super::allow(&self.node, &crate::auth::Caller::of(&req), ration_core::Action::Administer)?;
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
            .wait(Some(SNAPSHOT_BUILD_TIMEOUT))
            .metrics(|m| m.snapshot.map(|s| s.index) >= applied, "snapshot built")
            .await
            .map_err(|e| Status::deadline_exceeded(format!("snapshot not built: {e}")))?;
        let dir = self.node.config.data_dir.clone();
        let (bytes, info, sha256) = self
            .node
            .heavy("a snapshot save", move || -> Result<_, Status> {
                let bytes = ration_store::backup::current_snapshot(&dir)
                    .map_err(|e| Status::internal(format!("reading the snapshot: {e}")))?
                    .ok_or_else(|| Status::internal("the snapshot file is missing"))?;
                let info = ration_store::backup::inspect_snapshot(&bytes)
                    .map_err(|e| Status::internal(format!("the snapshot does not check: {e}")))?;
                let sha256 = sha2::Sha256::digest(&bytes).to_vec();
                Ok((bytes, info, sha256))
            })
            .await??;
        let bytes = std::sync::Arc::new(bytes);
        let total = bytes.len();
        let chunks = total.div_ceil(SNAPSHOT_CHUNK_BYTES).max(1);
        let stream = tokio_stream::iter((0..chunks).map(move |i| {
            let start = i * SNAPSHOT_CHUNK_BYTES;
            let end = (start + SNAPSHOT_CHUNK_BYTES).min(total);
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
        req: Request<v1::AddLearnerRequest>,
    ) -> Result<Response<v1::MembershipReply>, Status> {
        super::allow(&self.node, &crate::auth::Caller::of(&req), ration_core::Action::Administer)?;
        if !self.node.is_leader() {
            return forward::long_to_leader(
                &self.node,
                req,
                on_leader!(ClusterClient, add_learner),
            )
            .await;
        }
        let r = req.into_inner();
        if r.id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument("a learner needs a non-zero id and an address"));
        }
        crate::config::check_peer_addr(&r.addr)
            .map_err(|e| Status::invalid_argument(format!("addr: {e}")))?;
        if let Some(m) = self.node.members().into_iter().find(|m| m.addr == r.addr && m.id != r.id)
        {
            return Err(Status::already_exists(format!(
                "{} is node {}'s address already; each member needs its own",
                r.addr, m.id
            )));
        }
        let written = self
            .node
            .raft
            .add_learner(r.id, BasicNode::new(r.addr.clone()), true)
            .await
            .map_err(IntoStatus::into_status)?;
        // openraft returns at once for a learner it cannot reach: wait until this one
        // has caught up, so "added" means "can be promoted".
        let deadline = tokio::time::Instant::now() + LEARNER_CATCH_UP_TIMEOUT;
        while let Err(lagging) = self.node.caught_up(r.id, &r.addr) {
            if tokio::time::Instant::now() >= deadline {
                // A definite answer, not a retryable timeout: it was added.
                return Err(Status::failed_precondition(format!(
                    "node {} was added as a learner but has not caught up within {} s: {lagging}",
                    r.id,
                    LEARNER_CATCH_UP_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(LEARNER_CATCH_UP_POLL).await;
        }
        Ok(self.membership_reply(written.log_id.index))
    }

    async fn change_membership(
        &self,
        req: Request<v1::ChangeMembershipRequest>,
    ) -> Result<Response<v1::MembershipReply>, Status> {
        super::allow(&self.node, &crate::auth::Caller::of(&req), ration_core::Action::Administer)?;
        if !self.node.is_leader() {
            return forward::long_to_leader(
                &self.node,
                req,
                on_leader!(ClusterClient, change_membership),
            )
            .await;
        }
        let r = req.into_inner();
        let change = match (r.voters.is_empty(), r.remove.is_empty()) {
            (false, true) => {
                // A learner becomes a voter only once caught up: a lagging voter counts
                // toward the quorum without being able to help it.
                let members = self.node.members();
                for id in &r.voters {
                    match members.iter().find(|m| m.id == *id) {
                        Some(m) if !m.voter => {
                            self.node.caught_up(*id, &m.addr).map_err(IntoStatus::into_status)?
                        }
                        Some(_) => {}
                        None => {
                            return Err(Status::failed_precondition(format!(
                                "node {id} is not a member: add it as a learner first"
                            )))
                        }
                    }
                }
                openraft::ChangeMembers::ReplaceAllVoters(r.voters.into_iter().collect())
            }
            (true, false) => {
                let members = self.node.members();
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
                        .map_err(IntoStatus::into_status)?;
                    if removed.contains(&self.node.id) {
                        // This leader demoted itself and steps down once that commits;
                        // the next leader removes it (now a learner) from the cluster.
                        return self.finish_on_next_leader(removed.into_iter().collect()).await;
                    }
                }
                openraft::ChangeMembers::RemoveNodes(removed)
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give either voters (the new voter set) or remove (nodes to remove)",
                ))
            }
        };
        let written = self
            .node
            .raft
            .change_membership(change, r.retain)
            .await
            .map_err(IntoStatus::into_status)?;
        Ok(self.membership_reply(written.log_id.index))
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        // The digest encodes the whole ledger, and the data size walks the data
        // directory: both off the async workers (a digest counts as a heavy read).
        let with_digest = req.get_ref().digest;
        if with_digest {
            // It holds off apply while it encodes the ledger: for admins only.
            super::allow(
                &self.node,
                &crate::auth::Caller::of(&req),
                ration_core::Action::Administer,
            )?;
        }
        let me = ClusterService { node: self.node.clone() };
        if with_digest {
            return Ok(Response::new(
                self.node.heavy("a status with a digest", move || me.status(true)).await?,
            ));
        }
        ration_store::off_async(move || me.status(false))
            .await
            .map(Response::new)
            .map_err(|e| Status::internal(format!("status failed: {e}")))
    }

    async fn transfer_leader(
        &self,
        req: Request<v1::TransferLeaderRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        super::allow(&self.node, &crate::auth::Caller::of(&req), ration_core::Action::Administer)?;
        // The leader runs transfers (one at a time, with its view of who is caught up).
        if !self.node.is_leader() {
            return forward::long_to_leader(
                &self.node,
                req,
                on_leader!(ClusterClient, transfer_leader),
            )
            .await;
        }
        let to = req.into_inner().to;
        let status = self.node.transfer_leadership(to).await.map_err(IntoStatus::into_status)?;
        Ok(Response::new(status))
    }

    async fn campaign(
        &self,
        _req: Request<v1::CampaignRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        self.node.campaign().await.map_err(IntoStatus::into_status)?;
        Ok(Response::new(self.status(false)))
    }

    async fn pause_elections(
        &self,
        req: Request<v1::PauseElectionsRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        self.node.pause_elections(req.into_inner().ms).map_err(IntoStatus::into_status)?;
        Ok(Response::new(self.status(false)))
    }
}
