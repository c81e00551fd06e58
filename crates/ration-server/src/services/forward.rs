//! The one path that forwards a call to the leader: any Ledger or Cluster method,
//! on behalf of a follower that received it.
//!
//! It marks the call forwarded and refuses a second hop (a leader that moved
//! between two nodes' views answers UNAVAILABLE instead of bouncing the call), uses
//! the configured message limits, and drops the cached channel after any transport
//! failure so the next call reconnects.

use std::future::Future;

use ration_proto::v1::{cluster_client::ClusterClient, ledger_client::LedgerClient};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::{Leader, Node};

/// Set on a request a follower forwarded, so it is never forwarded twice.
const FORWARDED: &str = "x-ration-forwarded";

/// A client a call can be forwarded through.
pub(super) trait Client {
    fn new(channel: Channel, max_message_bytes: usize) -> Self;
}

impl Client for LedgerClient<Channel> {
    fn new(channel: Channel, max: usize) -> Self {
        LedgerClient::new(channel).max_decoding_message_size(max).max_encoding_message_size(max)
    }
}

impl Client for ClusterClient<Channel> {
    fn new(channel: Channel, max: usize) -> Self {
        ClusterClient::new(channel).max_decoding_message_size(max).max_encoding_message_size(max)
    }
}

/// Whether a request arrived forwarded by another node.
pub(super) fn was_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

/// A forwarded call reached a node that does not lead either: leadership moved
/// while the call travelled.
fn second_hop() -> Status {
    Status::unavailable("leadership is moving; retry shortly (with the same request id)")
}

/// Where a call that needs the leader goes when this node does not lead.
pub(super) fn leader_addr(node: &Node) -> Result<String, Status> {
    match node.leader() {
        Leader::Other { addr, .. } => Ok(addr),
        Leader::Me | Leader::Unknown => {
            Err(Status::unavailable("no leader is known right now; retry shortly"))
        }
    }
}

/// Sends `inner` (a request this node received, marked forwarded if
/// `already_forwarded`, from a client authenticated as `on_behalf`) to the node at
/// `addr` with `call`, and returns its answer.
pub(super) async fn forward<C, Req, Rep, Fut>(
    node: &Node,
    already_forwarded: bool,
    on_behalf: Option<&str>,
    addr: &str,
    inner: Req,
    call: impl FnOnce(C, Request<Req>) -> Fut,
) -> Result<Response<Rep>, Status>
where
    C: Client,
    Fut: Future<Output = Result<Response<Rep>, Status>>,
{
    forward_on(node, &node.channels, already_forwarded, on_behalf, addr, inner, call).await
}

/// [`forward`] over `channels` (a call that waits on purpose uses the node's
/// long-call channels, whose deadline is longer).
async fn forward_on<C, Req, Rep, Fut>(
    node: &Node,
    channels: &crate::network::Channels,
    already_forwarded: bool,
    on_behalf: Option<&str>,
    addr: &str,
    inner: Req,
    call: impl FnOnce(C, Request<Req>) -> Fut,
) -> Result<Response<Rep>, Status>
where
    C: Client,
    Fut: Future<Output = Result<Response<Rep>, Status>>,
{
    if already_forwarded {
        return Err(second_hop());
    }
    let channel = channels.get(addr).map_err(|e| Status::unavailable(e.to_string()))?;
    let client = C::new(channel, node.config.max_message_bytes);
    let mut req = Request::new(inner);
    req.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    // The leader takes the client's identity from this node's word, which it
    // honours only on its peer port, from a member's certificate.
    if let Some(p) = on_behalf {
        let value = tonic::metadata::MetadataValue::try_from(p)
            .map_err(|_| Status::invalid_argument(format!("principal {p:?} is not ASCII")))?;
        req.metadata_mut().insert(crate::auth::ON_BEHALF_OF, value);
    }
    let result = call(client, req).await;
    channels.forget_on_failure(addr, result)
}

/// [`forward`] to the leader this node knows.
pub(super) async fn to_leader<C, Req, Rep, Fut>(
    node: &Node,
    req: Request<Req>,
    call: impl FnOnce(C, Request<Req>) -> Fut,
) -> Result<Response<Rep>, Status>
where
    C: Client,
    Fut: Future<Output = Result<Response<Rep>, Status>>,
{
    to_leader_on(node, &node.channels, req, call).await
}

/// [`to_leader`] for a call that waits on purpose (a learner catching up, a
/// transfer): over the long-call channels.
pub(super) async fn long_to_leader<C, Req, Rep, Fut>(
    node: &Node,
    req: Request<Req>,
    call: impl FnOnce(C, Request<Req>) -> Fut,
) -> Result<Response<Rep>, Status>
where
    C: Client,
    Fut: Future<Output = Result<Response<Rep>, Status>>,
{
    to_leader_on(node, &node.long_calls, req, call).await
}

async fn to_leader_on<C, Req, Rep, Fut>(
    node: &Node,
    channels: &crate::network::Channels,
    req: Request<Req>,
    call: impl FnOnce(C, Request<Req>) -> Fut,
) -> Result<Response<Rep>, Status>
where
    C: Client,
    Fut: Future<Output = Result<Response<Rep>, Status>>,
{
    if was_forwarded(&req) {
        return Err(second_hop());
    }
    let addr = leader_addr(node)?;
    let caller = crate::auth::Caller::of(&req);
    forward_on(node, channels, false, caller.principal(), &addr, req.into_inner(), call).await
}
