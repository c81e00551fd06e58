//! The Raft service: openraft's messages between peers, postcard-encoded, each
//! tagged with the cluster id so a node never takes messages from another cluster.

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use ration_proto::v1;
use ration_store::TypeConfig;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::Node;

#[derive(Debug)]
pub(super) struct RaftService {
    // (see `fetch_audit_segment` for the segment server)
    pub(super) node: Arc<Node>,
}

impl RaftService {
    /// Refuses a message from another cluster; learns the cluster id from the first
    /// message that carries one. Then decodes the payload, and refuses it if the
    /// member it says it is from (`sender`) is not the one whose certificate sent
    /// it: a member speaks only for itself. Notes the sender's client address.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<v1::RaftPayload>,
        sender: impl FnOnce(&T) -> Option<u64>,
    ) -> Result<T, Status> {
        let caller = Caller::of(&req);
        let announced = req
            .metadata()
            .get(crate::auth::CLIENT_ADDR)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let payload = req.into_inner();
        let identity = &self.node.identity;
        let mine = identity.get();
        if mine != 0 && payload.cluster_id != 0 && payload.cluster_id != mine {
            return Err(Status::failed_precondition(format!(
                "raft message from cluster {:x}, but this node belongs to cluster {mine:x}; check the peer addresses",
                payload.cluster_id
            )));
        }
        let value: T = postcard::from_bytes(&payload.data)
            .map_err(|e| Status::invalid_argument(format!("raft payload does not decode: {e}")))?;
        let from = sender(&value);
        if let Some(cert) = caller.node() {
            if from != Some(cert) {
                return Err(Status::permission_denied(format!(
                    "node {cert}'s certificate cannot send a Raft message from {}",
                    from.map_or("no node".to_owned(), |f| format!("node {f}"))
                )));
            }
        }
        identity.adopt(payload.cluster_id).map_err(|e| Status::internal(e.to_string()))?;
        if let (Some(from), Some(addr)) = (from, announced) {
            self.node.learn_client_addr(from, &addr);
        }
        Ok(value)
    }

    fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Response<v1::RaftPayload>, Status> {
        let data = ration_core::try_encode(value).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::RaftPayload { data, cluster_id: self.node.identity.get() }))
    }
}

/// Segments a node serves at once; each decodes and re-encodes its records.
const SEGMENTS_SERVED_AT_ONCE: usize = 2;
/// Bytes per chunk of a served segment.
const SEGMENT_CHUNK_BYTES: usize = 1 << 20;

type SegmentStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<v1::AuditSegmentChunk, Status>> + Send>,
>;

#[tonic::async_trait]
impl v1::raft_server::Raft for RaftService {
    type FetchAuditSegmentStream = SegmentStream;

    async fn fetch_audit_segment(
        &self,
        req: Request<v1::FetchAuditSegmentRequest>,
    ) -> Result<Response<SegmentStream>, Status> {
        let r = req.into_inner();
        let mine = self.node.identity.get();
        if mine == 0 || r.cluster_id != mine {
            return Err(Status::failed_precondition(format!(
                "audit segment request from cluster {:x}, but this node belongs to cluster {mine:x}",
                r.cluster_id
            )));
        }
        if r.count == 0 || r.first_seq.checked_add(r.count).is_none() {
            return Err(Status::invalid_argument(format!(
                "segment {}+{} is not a range of records",
                r.first_seq, r.count
            )));
        }
        let permit = self.node.segment_serving.clone().try_acquire_owned().map_err(|_| {
            ration_proto::rpc::overloaded(
                format!("this node serves {SEGMENTS_SERVED_AT_ONCE} audit segments at once; retry"),
                std::time::Duration::from_secs(1),
            )
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::AuditSegmentChunk, Status>>(4);
        let audit = self.node.reader.audit.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let sent = audit.serve_segment(r.first_seq, r.count, SEGMENT_CHUNK_BYTES, |data| {
                tx.blocking_send(Ok(v1::AuditSegmentChunk { data })).is_ok()
            });
            if let Err(e) = sent {
                let status = match e {
                    ration_store::ReadError::Missing { .. } => Status::not_found(e.to_string()),
                    other => Status::internal(other.to_string()),
                };
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn append_entries(
        &self,
        req: Request<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self
            .decode(req, |r: &AppendEntriesRequest<TypeConfig>| r.vote.leader_id().voted_for())?;
        self.encode(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        req: Request<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        let rpc: VoteRequest<u64> =
            self.decode(req, |r: &VoteRequest<u64>| r.vote.leader_id().voted_for())?;
        self.encode(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self
            .decode(req, |r: &InstallSnapshotRequest<TypeConfig>| r.vote.leader_id().voted_for())?;
        self.encode(&self.node.raft.install_snapshot(rpc).await)
    }
}
