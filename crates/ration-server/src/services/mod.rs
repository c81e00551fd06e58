//! The gRPC services a node serves: Ledger (clients), Cluster (operators), Raft
//! (peers), grpc.health.v1 and server reflection (v1 and v1alpha), on one port or
//! on a client port and a peer port (see [`serve`] and [`crate::auth`]).
//!
//! - `ledger`, `cluster`, `raft`: one module per service;
//! - `forward`: the one path that sends a call on to the leader;
//! - `pipeline`: the Pipeline call's driver (operations as they arrive, bounded);
//! - `health`: readiness;
//! - this module: serving, and the one conversion from the node's internal errors
//!   to gRPC statuses (ledger refusals convert in `ration_proto::convert`).

/// The closure that makes the same call on the leader, for [`forward::forward`]:
/// `on_leader!(LedgerClient, acquire)`.
macro_rules! on_leader {
    ($client:ident, $method:ident) => {
        |mut c: $client<tonic::transport::Channel>, r| async move { c.$method(r).await }
    };
}

mod cluster;
mod forward;
mod health;
mod ledger;
mod pipeline;
mod raft;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use ration_proto::v1::raft_server::RaftServer;
use ration_proto::v1::{cluster_server::ClusterServer, ledger_server::LedgerServer};
use tonic::Status;

use crate::leadership::TransferError;
use crate::{Node, ProposeError};

/// Serves the services on the connections `ports` yields (TCP or TLS listeners in
/// production, a simulated network in tests): with one port, everything there;
/// with a peer port, Raft only there, and the client port without it. Each port
/// is guarded by its [`crate::auth::Gate`].
pub(crate) async fn serve<I, IO, IE, F>(
    node: Arc<Node>,
    ports: crate::Ports<I>,
    shutdown: impl Fn() -> F,
) -> anyhow::Result<()>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: crate::Connection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: Future<Output = ()> + Send + 'static,
{
    use crate::auth::{Gate, Port};
    let max = node.config.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    // Cluster (operations) serves from the start; the overall status ("") and
    // Ledger serve only while this node knows a leader, so a readiness probe keeps
    // clients away from a node that could not answer them.
    health.set_serving::<ClusterServer<cluster::ClusterService>>().await;
    tokio::spawn(health::track_readiness(Arc::downgrade(&node), health.clone()));
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
    let reflection = node.config.reflection;
    let ledger = LedgerServer::new(ledger::LedgerService { node: node.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let cluster = ClusterServer::new(cluster::ClusterService { node: node.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let peer_max = node.config.peer_max_message_bytes;
    let raft = RaftServer::new(raft::RaftService { node: node.clone() })
        .max_decoding_message_size(peer_max)
        .max_encoding_message_size(peer_max);
    let timer = crate::metrics::RpcTimer { metrics: node.metrics.clone() };
    let tokens = node.tokens.clone();
    let split = ports.peer.is_some();
    // Wide HTTP/2 windows (crate::network::STREAM_WINDOW): distant voters.
    let client = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(crate::network::STREAM_WINDOW))
        .initial_connection_window_size(Some(crate::network::CONNECTION_WINDOW))
        .layer(timer.clone())
        .layer(Gate {
            port: if split { Port::Client } else { Port::Shared },
            tokens: tokens.clone(),
        })
        .add_service(health_service.clone())
        .add_optional_service(reflection.then_some(reflection_v1))
        .add_optional_service(reflection.then_some(reflection_v1alpha))
        .add_service(ledger.clone())
        .add_service(cluster.clone())
        .add_optional_service((!split).then(|| raft.clone()))
        .serve_with_incoming_shutdown(ports.client, shutdown());
    let Some(peer_incoming) = ports.peer else {
        client.await?;
        return Ok(());
    };
    let peer = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(crate::network::STREAM_WINDOW))
        .initial_connection_window_size(Some(crate::network::CONNECTION_WINDOW))
        .layer(timer)
        .layer(Gate { port: Port::Peer, tokens })
        .add_service(health_service)
        .add_service(ledger)
        .add_service(cluster)
        .add_service(raft)
        .serve_with_incoming_shutdown(peer_incoming, shutdown());
    tokio::try_join!(client, peer)?;
    Ok(())
}

/// Refuses `caller` what its roles do not let it do (as this node's applied
/// ledger holds them), with PERMISSION_DENIED saying what it needs.
pub(super) fn allow(
    node: &Node,
    caller: &crate::auth::Caller,
    action: ration_core::Action<'_>,
) -> Result<(), Status> {
    let Some((principal, authority)) = crate::auth::authority(caller, &node.config.admins)? else {
        return Ok(());
    };
    let state = node.reader.state();
    state
        .ledger
        .authorize(&principal, authority, action)
        .map_err(|e| ration_proto::convert::to_proto::status(&e))
}

/// How long an overloaded node asks clients to wait before retrying.
const OVERLOAD_RETRY_AFTER: Duration = Duration::from_millis(50);

/// The node's internal errors as gRPC statuses: the one place they convert.
pub(crate) trait IntoStatus {
    fn into_status(self) -> Status;
}

impl IntoStatus for ProposeError {
    fn into_status(self) -> Status {
        match self {
            ProposeError::NotLeader { .. } => Status::unavailable(
                "no leader is known right now (election in progress); retry shortly",
            ),
            ProposeError::Overloaded(_) => {
                ration_proto::rpc::overloaded(self.to_string(), OVERLOAD_RETRY_AFTER)
            }
            ProposeError::Shutdown | ProposeError::Unknown(_) | ProposeError::Transferring => {
                Status::unavailable(self.to_string())
            }
        }
    }
}

impl IntoStatus for RaftError<u64, ClientWriteError<u64, BasicNode>> {
    fn into_status(self) -> Status {
        match self {
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                Status::failed_precondition(c.to_string())
            }
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                Status::unavailable("leadership moved; retry")
            }
            other => Status::unavailable(other.to_string()),
        }
    }
}

impl IntoStatus for TransferError {
    fn into_status(self) -> Status {
        match self {
            TransferError::NotMember(_) => Status::not_found(self.to_string()),
            TransferError::NotVoter(_) => Status::failed_precondition(self.to_string()),
            TransferError::BadPause(_) => Status::invalid_argument(self.to_string()),
            TransferError::CampaignTimedOut => Status::deadline_exceeded(self.to_string()),
            TransferError::InProgress => Status::aborted(self.to_string()),
            TransferError::Lagging { .. } | TransferError::Unreachable { .. } => {
                Status::failed_precondition(self.to_string())
            }
            TransferError::Raft(_) => Status::unavailable(self.to_string()),
            TransferError::Target(s) => s,
        }
    }
}

impl IntoStatus for ration_store::ReadError {
    fn into_status(self) -> Status {
        match self {
            // Another node has them, or this one will soon: retryable.
            ration_store::ReadError::Missing { .. } => Status::unavailable(self.to_string()),
            other => Status::internal(other.to_string()),
        }
    }
}
