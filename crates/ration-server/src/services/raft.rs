//! The Raft service: openraft's messages between peers, postcard-encoded, each
//! tagged with the cluster id so a node never takes messages from another cluster.

use std::sync::Arc;

use ration_proto::v1;
use tonic::{Request, Response, Status};

use crate::Node;

#[derive(Debug)]
pub(super) struct RaftService {
    pub(super) node: Arc<Node>,
}

impl RaftService {
    /// Refuses a message from another cluster; learns the cluster id from the first
    /// message that carries one. Then decodes the payload.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<v1::RaftPayload>,
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
        req: Request<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        self.encode(&self.node.raft.append_entries(self.decode(req)?).await)
    }

    async fn vote(
        &self,
        req: Request<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        self.encode(&self.node.raft.vote(self.decode(req)?).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<v1::RaftPayload>,
    ) -> Result<Response<v1::RaftPayload>, Status> {
        self.encode(&self.node.raft.install_snapshot(self.decode(req)?).await)
    }
}
