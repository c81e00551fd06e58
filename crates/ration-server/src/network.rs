//! Raft RPCs over tonic. Payloads are openraft's messages encoded with postcard.
//!
//! Channels come from a [`Channels`] factory chosen by configuration: real sockets in
//! production, a simulated network in tests. Every RPC has a deadline, and a channel
//! that fails is dropped so the next call reconnects (a stalled connection is never
//! reused).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use ration_proto::v1::raft_client::RaftClient;
use ration_proto::v1::RaftPayload;
use ration_store::{NodeId, TypeConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

/// HTTP/2 flow-control windows of node-to-node channels and of both servers: at
/// HTTP/2's 64 KiB default an AppendEntries or Batch of 1 MB to a node 300 ms away
/// takes many round trips. A window lets a sender run ahead by that much, no more
/// (what is received is bounded by the message size limits).
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// Makes a channel to an address. Production connects lazily over TCP.
pub type ChannelMaker = Arc<dyn Fn(&str) -> Result<Channel, tonic::transport::Error> + Send + Sync>;

/// The default: lazy TCP channels with connect and request deadlines.
pub fn tcp_channels(timeout: Duration) -> ChannelMaker {
    Arc::new(move |addr: &str| {
        Ok(Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .connect_lazy())
    })
}

/// Channels over TLS with this node's credentials (reloaded ones used for new
/// connections): the peer's certificate must be signed by the CA and name the host
/// dialled, and this node presents its own.
pub fn tls_channels(timeout: Duration, tls: Arc<ration_tls::Credentials>) -> ChannelMaker {
    Arc::new(move |addr: &str| {
        let connector = ration_tls::Connector::new(ration_tls::ClientTls::Reloading(tls.clone()));
        Ok(Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .connect_with_connector_lazy(connector))
    })
}

/// A cache of channels by address, shared by the Raft network and the forwarder.
#[derive(Clone)]
pub struct Channels {
    make: ChannelMaker,
    cache: Arc<Mutex<BTreeMap<String, Channel>>>,
    pub timeout: Duration,
    pub max_message_bytes: usize,
    /// The last heartbeat round trip to each peer this node led (an empty
    /// AppendEntries: the network's round trip plus the follower's handling).
    pub heartbeat_rtt: Arc<Mutex<BTreeMap<NodeId, Duration>>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Channels {
    pub fn new(make: ChannelMaker, timeout: Duration, max_message_bytes: usize) -> Self {
        Self {
            make,
            cache: Arc::new(Mutex::new(BTreeMap::new())),
            timeout,
            max_message_bytes,
            heartbeat_rtt: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(addr) {
            return Ok(c.clone());
        }
        let c = (self.make)(addr)?;
        cache.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Forgets a channel after a failure, so the next call reconnects.
    pub fn drop_channel(&self, addr: &str) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
    }

    /// Passes a forwarded call's result through, forgetting the channel to `addr`
    /// when the call failed in a way a dead connection causes (unavailable, a
    /// timeout, a transport error). A stalled connection answers every later call
    /// with a timeout (CANCELLED), never UNAVAILABLE, so keeping it would fail
    /// every forward to that node for good. An answer the leader gave (an invalid
    /// argument, an exhausted budget) keeps the channel.
    pub fn forget_on_failure<T>(
        &self,
        addr: &str,
        result: Result<T, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        if let Err(s) = &result {
            // A failure the call may not have survived (`rpc::retryable`), except an
            // overloaded leader's answer, which came over a healthy connection.
            if ration_proto::rpc::retryable(s) && !ration_proto::rpc::is_overloaded(s) {
                self.drop_channel(addr);
            }
        }
        result
    }
}

/// openraft's network factory.
#[derive(Clone, Debug)]
pub struct Network {
    pub channels: Channels,
    pub identity: ration_store::ClusterIdentity,
    /// This node's client address, announced on every Raft message.
    pub client_addr: String,
    /// A heartbeat round trip longer than this is logged: the timings were sized
    /// for closer voters (half the AppendEntries deadline).
    pub rtt_warn: Duration,
    /// `voter_rtt_ms` in force, for that warning.
    pub voter_rtt_ms: u64,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Connection {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            identity: self.identity.clone(),
            client_addr: tonic::metadata::MetadataValue::try_from(self.client_addr.as_str()).ok(),
            rtt_warn: self.rtt_warn,
            voter_rtt_ms: self.voter_rtt_ms,
        }
    }
}

/// A connection to one peer.
#[derive(Debug)]
pub struct Connection {
    target: NodeId,
    addr: String,
    channels: Channels,
    identity: ration_store::ClusterIdentity,
    client_addr: Option<tonic::metadata::AsciiMetadataValue>,
    rtt_warn: Duration,
    voter_rtt_ms: u64,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        which: Rpc,
        rpc: &Req,
        deadline: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let channel = self
            .channels
            .get(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(self.channels.max_message_bytes)
            .max_encoding_message_size(self.channels.max_message_bytes);
        let data =
            ration_core::try_encode(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request =
            tonic::Request::new(RaftPayload { data, cluster_id: self.identity.get() });
        request.set_timeout(deadline);
        if let Some(addr) = &self.client_addr {
            request.metadata_mut().insert(crate::auth::CLIENT_ADDR, addr.clone());
        }
        let reply = match which {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                self.channels.drop_channel(&self.addr);
                return Err(match status.code() {
                    tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
                    _ => RPCError::Network(NetworkError::new(&status)),
                });
            }
        };
        // A reply from another cluster's node is not evidence about ours.
        let mine = self.identity.get();
        if mine != 0 && reply.cluster_id != 0 && reply.cluster_id != mine {
            let e = std::io::Error::other(format!(
                "{} answers for cluster {:x}, not ours ({mine:x})",
                self.addr, reply.cluster_id
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let _ = self.identity.adopt(reply.cluster_id);
        let result: Result<Resp, RaftError<NodeId, E>> = postcard::from_bytes(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let deadline = option.hard_ttl().min(self.channels.timeout);
        let heartbeat = rpc.entries.is_empty();
        let sent = std::time::Instant::now();
        let reply = self.call(Rpc::Append, &rpc, deadline).await;
        if heartbeat && reply.is_ok() {
            let rtt = sent.elapsed();
            self.channels
                .heartbeat_rtt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.target, rtt);
            if rtt > self.rtt_warn {
                tracing::warn!(
                    peer = self.target,
                    rtt_ms = rtt.as_millis(),
                    "a heartbeat to node {} took {} ms round trip, more than half the \
                     AppendEntries deadline ({} ms): Raft's timings are sized for voters \
                     {} ms apart; set voter_rtt_ms (--voter-rtt-ms) to the slowest round \
                     trip between voters on every node",
                    self.target,
                    rtt.as_millis(),
                    deadline.as_millis(),
                    self.voter_rtt_ms
                );
            }
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let deadline = option.hard_ttl().max(self.channels.timeout);
        self.call(Rpc::Snapshot, &rpc, deadline).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let deadline = option.hard_ttl().min(self.channels.timeout);
        self.call(Rpc::Vote, &rpc, deadline).await
    }
}
