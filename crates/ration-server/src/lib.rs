//! # ration-server
//!
//! A Ration node: the ledger state machine (ration-core) replicated by openraft,
//! stored in sled (ration-store), reached over tonic (ration-proto). `rationd` is a
//! few lines over [`run`]; tests start nodes with [`start`].

mod audit_fetch;
pub mod auth;
pub mod config;
mod leadership;
mod ledger_time;
pub mod metrics;
pub mod network;
mod placement;
pub mod proposer;
mod services;
pub mod webhooks;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy};
use ration_core::{Command, LedgerConfig, Outcome};
use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::{AddLearnerRequest, ChangeMembershipRequest, StatusRequest};
use ration_store::{NodeId, Reader, TypeConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{Config, Timing};
use network::{Channels, Network};
use proposer::{BatchLimits, Proposer};
pub use proposer::{Clock, OffsetClock, ProposeError, SystemClock};

/// A running node's parts, shared by its services.
pub struct Node {
    pub id: NodeId,
    /// Where peers reach this node: its address in the membership (its client
    /// address too, unless the ports are separate).
    pub addr: String,
    /// Where clients reach this node.
    pub client_addr: String,
    /// Other members' client addresses, as their Raft messages announce them
    /// (bounded: only members are kept).
    client_addrs: std::sync::Mutex<BTreeMap<NodeId, String>>,
    /// This node's TLS material (None: plaintext).
    pub tls: Option<Arc<ration_tls::Credentials>>,
    /// The key bearer tokens are checked with (None: certificates only).
    pub(crate) tokens: Option<Arc<ration_tls::token::TokenKey>>,
    pub raft: Raft<TypeConfig>,
    pub reader: Reader,
    proposer: Proposer,
    pub channels: Channels,
    /// Channels for calls that wait on purpose (a learner catching up, a campaign, a
    /// transfer): their deadline is [`LONG_CALL_TIMEOUT`], not `rpc_timeout_ms`.
    pub long_calls: Channels,
    pub config: Config,
    /// Which cluster this node belongs to (0 until set or learned).
    pub identity: ration_store::ClusterIdentity,
    pub metrics: Arc<metrics::Metrics>,
    /// The write-ahead log's counters (None with `log_store = "sled"` or in memory).
    pub wal: Option<Arc<ration_store::wal::WalStats>>,
    /// Held while this node runs a leadership transfer: one at a time.
    transfer: tokio::sync::Mutex<()>,
    /// Set while this leader hands leadership over: it proposes nothing (no writes,
    /// no ticks), so its followers' leader leases run out and they vote.
    transferring: std::sync::atomic::AtomicBool,
    /// When this node's elections (and heartbeats) resume, while paused for a
    /// leadership transfer.
    paused_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// Where `GET /metrics` is served (None when `metrics_listen` is off).
    pub metrics_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// The clock the leader stamps entries with.
    clock: Arc<dyn Clock>,
    /// This node's view of ledger time and the bound on its stamps (shared with the
    /// proposer).
    time: Arc<std::sync::Mutex<ration_core::timebound::TimeBound>>,
    /// Audit segments this node is serving to peers (bounded).
    pub(crate) segment_serving: Arc<tokio::sync::Semaphore>,
    /// Heavy reads under way (audit queries, digests, snapshot saves), run on the
    /// blocking pool: bounded so they cannot take the node's threads.
    pub(crate) heavy_reads: Arc<tokio::sync::Semaphore>,
}

/// Heavy reads a node runs at once; more are refused as overloaded.
pub const HEAVY_READS_AT_ONCE: usize = 4;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Who leads, as this node knows it. The one notion of leadership: routing,
/// forwarding, linearizable reads and `Status` all ask [`Node::leader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leader {
    /// This node leads.
    Me,
    /// Another node leads, at this address.
    Other { id: NodeId, addr: String },
    /// No leader is known (an election is under way, or this node is cut off).
    Unknown,
}

/// Deadline of calls between nodes that wait on purpose (see `Node::long_calls`).
pub const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A node is ready only with at most this many log entries not yet applied.
pub const READY_MAX_LAG_ENTRIES: u64 = 100;

/// What commands became: their outcomes here (one per command, in order), or the
/// address of the leader to forward them to.
#[derive(Debug)]
pub enum Routed {
    Done(Vec<Outcome>),
    Forward(String),
}

impl Node {
    /// Runs a heavy read (`what`) on the blocking pool, off the async workers that
    /// carry heartbeats and replication; at most [`HEAVY_READS_AT_ONCE`] at once,
    /// and more are refused as overloaded (UNAVAILABLE with a retry delay).
    pub(crate) async fn heavy<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let permit = self.heavy_reads.clone().try_acquire_owned().map_err(|_| {
            ration_proto::rpc::overloaded(
                format!(
                    "this node runs {HEAVY_READS_AT_ONCE} heavy reads at once ({what} refused); retry shortly"
                ),
                Duration::from_millis(500),
            )
        })?;
        ration_store::off_async(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| tonic::Status::internal(format!("{what} failed: {e}")))
    }

    /// The leader as this node knows it now.
    pub fn leader(&self) -> Leader {
        // Read in place, not cloned: every write asks this.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.state == ServerState::Leader {
            return Leader::Me;
        }
        let Some(id) = m.current_leader.filter(|id| *id != self.id) else {
            return Leader::Unknown;
        };
        match m.membership_config.membership().get_node(&id) {
            Some(n) => Leader::Other { id, addr: n.addr.clone() },
            None => Leader::Unknown,
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Leader::Me
    }

    /// Where clients reach member `id`: its announced client address, or its
    /// member address while none is known (the same unless the ports are separate).
    pub fn client_addr_of(&self, id: NodeId, member_addr: &str) -> String {
        if id == self.id {
            return self.client_addr.clone();
        }
        let known = self.client_addrs.lock().unwrap_or_else(|p| p.into_inner());
        known.get(&id).cloned().unwrap_or_else(|| member_addr.to_owned())
    }

    /// Notes the client address member `id` announced (ignored for non-members and
    /// for addresses that are not host:port).
    pub(crate) fn learn_client_addr(&self, id: NodeId, addr: &str) {
        if id == self.id {
            return;
        }
        let known = self.client_addrs.lock().unwrap_or_else(|p| p.into_inner());
        if known.get(&id).is_some_and(|a| a == addr) || ration_store::check_peer_addr(addr).is_err()
        {
            return;
        }
        drop(known);
        let members: BTreeSet<NodeId> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().nodes().map(|(id, _)| *id).collect()
        };
        let mut known = self.client_addrs.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|id, _| members.contains(id));
        if members.contains(&id) && known.get(&id).is_none_or(|a| a != addr) {
            known.insert(id, addr.to_owned());
        }
    }

    /// Liveness (`/livez`): the Raft core runs. Only a stopped core is fatal; a node
    /// that knows no leader (quorum lost) is alive, and restarting it would not help.
    pub fn liveness(&self) -> Result<(), String> {
        let m = self.raft.metrics().borrow().clone();
        match (&m.running_state, m.state) {
            (Err(fatal), _) => Err(format!("the Raft core stopped: {fatal}")),
            (Ok(()), ServerState::Shutdown) => Err("the Raft core is shut down".into()),
            _ => Ok(()),
        }
    }

    /// Readiness (`/readyz`): alive, a leader is known, and this node has applied
    /// its log to within [`READY_MAX_LAG_ENTRIES`] entries.
    pub fn readiness(&self) -> Result<(), String> {
        self.liveness()?;
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader.is_none() {
            return Err("no leader is known".into());
        }
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        let lag = last.saturating_sub(applied);
        if lag > READY_MAX_LAG_ENTRIES {
            return Err(format!("{lag} log entries are not applied yet"));
        }
        Ok(())
    }

    /// Proposes commands together (in one entry, in order) if this node leads, or
    /// says where the leader is. With no leader known it proposes anyway, and
    /// openraft's answer decides.
    /// Whether this node's proposer has nothing queued or in flight.
    pub(crate) fn proposer_idle(&self) -> bool {
        self.proposer.idle()
    }

    pub async fn route(&self, commands: Vec<Command>) -> Result<Routed, ProposeError> {
        if let Leader::Other { addr, .. } = self.leader() {
            return Ok(Routed::Forward(addr));
        }
        if self.transferring.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ProposeError::Transferring);
        }
        match self.proposer.propose(commands).await {
            Ok(outcomes) => Ok(Routed::Done(outcomes)),
            Err(ProposeError::NotLeader { leader: Some((id, addr)) }) if id != self.id => {
                Ok(Routed::Forward(addr))
            }
            Err(e) => Err(e),
        }
    }
}

/// An accepted connection the services can be served on: a TCP stream in
/// production, a simulated or in-memory one in tests.
pub trait Connection:
    tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + tonic::transport::server::Connected
    + Unpin
    + Send
    + 'static
{
}

impl<T> Connection for T where
    T: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static
{
}

/// A node started in this process; [`NodeHandle::stop`] shuts it down.
#[derive(Debug)]
pub struct NodeHandle {
    pub node: Arc<Node>,
    stop: Option<watch::Sender<bool>>,
    served: JoinHandle<anyhow::Result<()>>,
    /// Set once the Raft core has stopped on its own (see [`NodeHandle::core_stopped`]).
    core: watch::Receiver<Option<CoreStopped>>,
}

/// Why a node's Raft core stopped without being asked to: a fatal storage error, a
/// panic inside the core, or an internal error openraft cannot recover from. The
/// node can no longer vote, lead, follow or apply; only a restart (which recovers
/// from the log on disk) brings it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreStopped {
    pub reason: String,
}

impl std::fmt::Display for CoreStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the Raft core stopped: {}", self.reason)
    }
}

impl std::error::Error for CoreStopped {}

impl NodeHandle {
    /// Stops serving, shuts Raft down, and waits for both.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        let served = self.served.await.context("server task")?;
        self.node.raft.shutdown().await.context("raft shutdown")?;
        served
    }

    /// Resolves when the Raft core stops on its own, with the reason; never while
    /// it runs. (A core stopped by [`NodeHandle::stop`] is not reported: `stop`
    /// consumes the handle.)
    pub async fn core_stopped(&self) -> CoreStopped {
        let mut core = self.core.clone();
        let verdict = match core.wait_for(Option::is_some).await {
            Ok(stopped) => stopped.clone(),
            // The watcher ended without a verdict: only when the runtime is
            // shutting down, so say so.
            Err(_) => None,
        };
        verdict.unwrap_or_else(|| CoreStopped { reason: "its watcher ended".into() })
    }
}

/// Watches openraft's metrics and reports the first sign that the core has ended:
/// a fatal `running_state`, the `Shutdown` state, or the metrics channel closing.
async fn watch_core(raft: Raft<TypeConfig>, report: watch::Sender<Option<CoreStopped>>) {
    let mut metrics = raft.metrics();
    drop(raft);
    loop {
        let stopped = {
            let m = metrics.borrow_and_update();
            match (&m.running_state, m.state) {
                (Err(fatal), _) => Some(fatal.to_string()),
                (Ok(()), ServerState::Shutdown) => Some("state is Shutdown".to_owned()),
                _ => None,
            }
        };
        if let Some(reason) = stopped {
            let _ = report.send(Some(CoreStopped { reason }));
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                let _ = report.send(Some(CoreStopped { reason: "its metrics channel closed".into() }));
                return;
            },
            // Nobody waits for the verdict any more (the handle was stopped or dropped).
            () = report.closed() => return,
        }
    }
}

/// One INFO line for each change of leadership or membership this node sees: it
/// became leader, another node leads now (a leader becoming known after an
/// election), the leader is no longer known (an election begins), or the voters
/// or learners changed. Ends with the metrics channel.
async fn log_changes(raft: Raft<TypeConfig>, me: NodeId) {
    let mut metrics = raft.metrics();
    drop(raft);
    let mut leader: Option<NodeId> = None;
    let mut members: Option<(Vec<NodeId>, Vec<NodeId>)> = None;
    loop {
        {
            let m = metrics.borrow_and_update();
            if let (None, Some(gone)) = (m.current_leader, leader) {
                tracing::info!(
                    leader = gone,
                    term = m.current_term,
                    "no leader known now (node {gone} led); an election follows"
                );
                leader = None;
            }
            if let Some(now) = m.current_leader.filter(|l| leader != Some(*l)) {
                leader = Some(now);
                if now == me {
                    tracing::info!(term = m.current_term, "this node is now the leader");
                } else {
                    tracing::info!(
                        leader = now,
                        term = m.current_term,
                        "node {now} is now the leader"
                    );
                }
            }
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let learners: Vec<NodeId> = membership.learner_ids().collect();
            let seen = Some((voters, learners));
            if members != seen {
                let (voters, learners) = seen.clone().unwrap_or_default();
                if members.is_some() {
                    tracing::info!(?voters, ?learners, "membership changed");
                } else {
                    tracing::info!(?voters, ?learners, "membership");
                }
                members = seen;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Runs a node until `shutdown` resolves, or until its Raft core stops on its own.
///
/// A stopped core is an error: the process should exit non-zero so that its
/// supervisor (systemd's `Restart=on-failure`, a Kubernetes restart) starts it again
/// and it recovers from its log. Staying up would leave a replica that answers
/// health checks NOT_SERVING and refuses every write, forever.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| in_use(e, "give each node its own --listen"))
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let peer_listener = match config.peer_listen {
        Some(at) => Some(
            TcpListener::bind(at)
                .await
                .map_err(|e| in_use(e, "give each node its own --peer-listen"))
                .with_context(|| format!("cannot listen for peers on {at}"))?,
        ),
        None => None,
    };
    let handle = start_split(config, listener, peer_listener).await?;
    supervise(handle, shutdown).await
}

/// An address already taken says which setting to change.
fn in_use(e: std::io::Error, hint: &str) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        std::io::Error::new(
            e.kind(),
            format!("the address is already in use (another rationd on this machine?): {hint}"),
        )
    } else {
        e
    }
}

/// The second half of [`run`], for a node started any way: waits for `shutdown` or
/// for the core to stop. A requested shutdown stops the node and returns its
/// result; a core that stopped on its own is logged and returned as an error
/// ([`CoreStopped`]) after the services are stopped.
pub async fn supervise(
    handle: NodeHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::select! {
        () = shutdown => {
            tracing::info!(id = handle.node.id, "shutting down");
            if handle.node.is_leader() {
                hand_over(&handle.node).await;
            }
            handle.stop().await
        }
        removed = removal(&handle.node) => {
            tracing::info!(
                id = handle.node.id,
                membership_index = removed.membership_index,
                seen_on = removed.seen_on,
                "this node was removed from the cluster; it stops serving and exits 0 \
                 (add it again with `rationctl member add` after wiping its data directory)"
            );
            handle.stop().await
        }
        stopped = handle.core_stopped() => {
            tracing::error!(
                id = handle.node.id,
                reason = %stopped.reason,
                "the Raft core stopped; exiting so the supervisor restarts this node and it recovers from its log"
            );
            if let Err(e) = handle.stop().await {
                tracing::warn!("stopping after the core stopped: {e:#}");
            }
            Err(stopped.into())
        }
    }
}

/// How often a node that is not the leader asks a peer whether it is still a member.
const REMOVAL_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Evidence that this node was removed: a peer of the same cluster that knows a
/// leader reports a committed membership, newer than this node's, without it.
#[derive(Debug)]
struct Removed {
    membership_index: u64,
    seen_on: u64,
}

/// Resolves once this node has been removed from the cluster; never otherwise.
///
/// A removed node does not find out from Raft: the leader stops replicating to it
/// as soon as the membership without it is appended, so it keeps the joint
/// membership that still lists it and (if it was a voter) campaigns forever. Like
/// etcd's members, it asks its peers instead: every [`REMOVAL_PROBE_INTERVAL`],
/// while it is not the leader, it asks one member it knows of (the leader first)
/// for its status. It counts as removed only on a peer's word that is safe to act
/// on: the same cluster id, a known leader, and a membership that is committed on
/// that peer, newer than the one this node has, and without this node. A node that
/// was never a member (one waiting to be added) is never removed.
async fn removal(node: &Node) -> Removed {
    let mut tick = tokio::time::interval(REMOVAL_PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0usize;
    let mut listed = Listed::default();
    loop {
        tick.tick().await;
        let (mine, peers, leader) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let member = membership.get_node(&node.id).is_some();
            let mine = m.membership_config.log_id().as_ref().map_or(0, |l| l.index);
            let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
            let seen = Seen {
                member,
                index: mine,
                applied,
                any_members: membership.nodes().next().is_some(),
                joining: node.config.join.is_some(),
            };
            if listed.removed_by(seen) {
                return Removed { membership_index: mine, seen_on: node.id };
            }
            if m.state == ServerState::Leader || !member {
                continue;
            }
            let peers: Vec<String> = membership
                .nodes()
                .filter(|(id, _)| **id != node.id)
                .map(|(_, n)| n.addr.clone())
                .collect();
            let leader = m
                .current_leader
                .filter(|l| *l != node.id)
                .and_then(|l| membership.get_node(&l))
                .map(|n| n.addr.clone());
            (mine, peers, leader)
        };
        let Some(addr) = leader.or_else(|| {
            next = next.wrapping_add(1);
            peers.get(next % peers.len().max(1)).cloned()
        }) else {
            continue;
        };
        let Ok(channel) = node.channels.get(&addr) else { continue };
        let mut client = ClusterClient::new(channel);
        let Ok(Ok(peer)) = tokio::time::timeout(
            REMOVAL_PROBE_INTERVAL,
            client.status(StatusRequest { digest: false }),
        )
        .await
        else {
            continue;
        };
        let peer = peer.into_inner();
        let cluster = node.identity.get();
        if cluster != 0
            && peer.cluster_id == cluster
            && peer.leader.is_some()
            && peer.membership_index > mine
            && peer.membership_index <= peer.commit_index
            && !peer.members.is_empty()
            && peer.members.iter().all(|m| m.id != node.id)
        {
            return Removed { membership_index: peer.membership_index, seen_on: peer.id };
        }
    }
}

/// What [`removal`] sees of this node's own membership at one look.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// This node is in the membership.
    member: bool,
    /// The membership's log index.
    index: u64,
    /// The last applied log index.
    applied: u64,
    any_members: bool,
    /// Started with `--join` (it may hold another cluster's membership until added).
    joining: bool,
}

/// The newest membership that listed this node, as far as it has seen.
#[derive(Debug, Default)]
struct Listed {
    at: Option<u64>,
    looked: bool,
}

impl Listed {
    /// Whether this node applied a membership without itself that is newer than
    /// the newest one that listed it (it led the change that removed it, or saw it
    /// committed before the leader let go). A node catching up replays older
    /// memberships without itself (one before it was added; a previous learner's
    /// removal): those are not newer than one that listed it, or it was never
    /// listed yet, and are not a removal.
    fn removed_by(&mut self, s: Seen) -> bool {
        if !std::mem::replace(&mut self.looked, true)
            && !s.member
            && !s.joining
            && s.any_members
            && s.index > 0
        {
            // At start, a node with state that holds a membership without itself
            // applied its removal before it stopped. (A new node waiting to be
            // added has no membership yet; a joining one may hold another
            // cluster's.)
            self.at = Some(0);
        }
        if s.member {
            self.at = Some(self.at.map_or(s.index, |at| at.max(s.index)));
            return false;
        }
        self.at.is_some_and(|at| s.index > at)
            && s.any_members
            && s.index > 0
            && s.index <= s.applied
    }
}

#[cfg(test)]
mod removal_tests {
    use super::{Listed, Seen};

    fn seen(member: bool, index: u64) -> Seen {
        Seen { member, index, applied: index, any_members: true, joining: false }
    }

    #[test]
    fn a_new_node_replaying_older_memberships_without_itself_is_not_removed() {
        // Node 5 starts empty, then replays the log: the first membership, a
        // learner 4 added and removed, then itself added.
        let mut l = Listed::default();
        assert!(!l.removed_by(Seen { any_members: false, ..seen(false, 0) }));
        for (member, index) in [(false, 1), (false, 20), (false, 30), (true, 40), (true, 41)] {
            assert!(!l.removed_by(seen(member, index)), "at {index}");
        }
        // Then really removed.
        assert!(l.removed_by(seen(false, 50)));
    }

    #[test]
    fn a_member_whose_newer_membership_lacks_it_is_removed_only_once_applied() {
        let mut l = Listed::default();
        assert!(!l.removed_by(seen(true, 10)));
        assert!(!l.removed_by(Seen { applied: 11, ..seen(false, 12) }), "not applied yet");
        assert!(l.removed_by(seen(false, 12)));
    }

    #[test]
    fn a_node_that_applied_its_removal_before_stopping_knows_at_start() {
        let mut l = Listed::default();
        assert!(l.removed_by(seen(false, 30)));
        // A joining node holding another cluster's membership does not.
        let mut j = Listed::default();
        assert!(!j.removed_by(Seen { joining: true, ..seen(false, 30) }));
        assert!(!j.removed_by(Seen { joining: true, ..seen(false, 31) }));
    }
}

/// How long a leader that is asked to stop tries to hand leadership over first.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Before a leader stops, it moves leadership to the voter whose log is most
/// complete, so clients wait for a transfer, not for an election timeout. Failure
/// (no other voter, none reachable, too slow) only means the usual election.
async fn hand_over(node: &Node) {
    let m = node.raft.metrics().borrow().clone();
    let voters: Vec<NodeId> =
        m.membership_config.membership().voter_ids().filter(|id| *id != node.id).collect();
    let matched = |id: &NodeId| {
        m.replication.as_ref().and_then(|r| r.get(id).copied().flatten()).map_or(0, |l| l.index)
    };
    let Some(to) = voters.iter().copied().max_by_key(|id| (matched(id), std::cmp::Reverse(*id)))
    else {
        return;
    };
    match tokio::time::timeout(HAND_OVER_TIMEOUT, node.transfer_leadership(to)).await {
        Ok(Ok(_)) => tracing::info!(id = node.id, to, "handed leadership over before stopping"),
        Ok(Err(e)) => tracing::warn!(id = node.id, to, "could not hand leadership over: {e}"),
        Err(_) => tracing::warn!(id = node.id, to, "handing leadership over timed out"),
    }
}

/// Starts a node on `listener` and returns once it serves.
pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<NodeHandle> {
    start_split(config, listener, None).await
}

/// Starts a node on real sockets: clients on `listener`, peers on `peer_listener`
/// (required when the configuration sets `peer_listen`), with TLS on both when
/// the configuration has it.
pub async fn start_split(
    config: Config,
    listener: TcpListener,
    peer_listener: Option<TcpListener>,
) -> anyhow::Result<NodeHandle> {
    config.validate()?;
    let Some(files) = config.tls_files() else {
        let plain = |l: TcpListener| {
            tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true))
        };
        let ports = Ports { client: plain(listener), peer: peer_listener.map(plain) };
        return start_with(config, ports, network::tcp_channels, Arc::new(SystemClock), None).await;
    };
    let tls = ration_tls::Credentials::load(files).context("loading the TLS files")?;
    if tls.identity() != ration_tls::Identity::Node(config.node_id) {
        anyhow::bail!(
            "the TLS certificate {} names {}, but this is node {}: a node needs a certificate \
             with the URI spiffe://<domain>/ration/node/{} among its subject alternative names",
            tls.files().cert.display(),
            tls.identity(),
            config.node_id,
            config.node_id
        );
    }
    tls.watch(TLS_RELOAD_CHECK);
    let limits = ration_tls::IncomingLimits::default();
    let serve = |l: TcpListener, what| ration_tls::incoming(l, tls.clone(), limits, what);
    let ports =
        Ports { client: serve(listener, "client"), peer: peer_listener.map(|l| serve(l, "peer")) };
    let dial = tls.clone();
    start_with(
        config,
        ports,
        move |timeout| network::tls_channels(timeout, dial.clone()),
        Arc::new(SystemClock),
        Some(tls),
    )
    .await
}

/// How often a node checks whether its TLS files changed.
pub const TLS_RELOAD_CHECK: Duration = Duration::from_secs(10);

/// The connections a node serves: clients', and peers' when they have a port of
/// their own (else both arrive on `client`).
#[derive(Debug)]
pub struct Ports<I> {
    pub client: I,
    pub peer: Option<I>,
}

impl<I> Ports<I> {
    /// One port for everyone.
    pub fn shared(incoming: I) -> Self {
        Self { client: incoming, peer: None }
    }
}

/// [`start`] with the transport and the clock injected: `incoming` yields accepted
/// connections, `channels` makes client channels to peers, `clock` stamps entries.
pub async fn start_with<I, IO, IE>(
    config: Config,
    incoming: Ports<I>,
    channels: impl Fn(Duration) -> network::ChannelMaker,
    clock: Arc<dyn Clock>,
    tls: Option<Arc<ration_tls::Credentials>>,
) -> anyhow::Result<NodeHandle>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: Connection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    config.validate()?;
    ration_store::claim_node_id(&config.data_dir, config.node_id)
        .context("checking which node the data directory belongs to")?;
    let policy = ration_store::SealPolicy {
        min_records: config.audit_segment_min_records,
        max_records: config.audit_segment_max_records,
        archive: config.audit_archive_dir.clone().map(|dir| ration_store::ArchivePolicy {
            dir,
            after_ms: config.audit_archive_after_hours.saturating_mul(3_600_000),
        }),
    };
    if config.log_store == "sled" {
        let (log, sm, identity) = open_storage(&config, |dir, c| {
            let sealing = policy.clone();
            async move {
                let (log, sm) = ration_store::open_with(&dir, c, sealing)?;
                let identity = log
                    .identity()
                    .map_err(|e| ration_store::OpenError::Io(std::io::Error::other(e)))?;
                Ok((log, sm, identity))
            }
        })
        .await?;
        let storage = Storage { reader: sm.reader(), log, sm, identity, wal: None };
        return start_with_storage(config, storage, incoming, channels, clock, tls).await;
    }
    let (log, sm, identity) = open_storage(&config, |dir, c| {
        let sealing = policy.clone();
        async move { ration_store::open_durable_with(&dir, c, sealing).await }
    })
    .await?;
    let storage = Storage { reader: sm.reader(), wal: Some(log.stats()), log, sm, identity };
    start_with_storage(config, storage, incoming, channels, clock, tls).await
}

/// A node's storage, opened: the Raft log store, the ledger state machine, a reader
/// of what it applied, and the cluster identity. Production opens sled on disk
/// ([`start_with`]); a simulation passes `ration_store::mem` stores.
#[derive(Debug)]
pub struct Storage<L, S> {
    pub log: L,
    pub sm: S,
    pub reader: Reader,
    pub identity: ration_store::ClusterIdentity,
    /// The write-ahead log's counters, when the log is one (for metrics).
    pub wal: Option<Arc<ration_store::wal::WalStats>>,
}

/// [`start_with`] with the storage injected too: everything a deterministic
/// simulation replaces (network, clock, disk) comes from the caller; the services,
/// proposer and openraft are the production ones.
pub async fn start_with_storage<L, S, I, IO, IE>(
    config: Config,
    storage: Storage<L, S>,
    incoming: Ports<I>,
    channels: impl Fn(Duration) -> network::ChannelMaker,
    clock: Arc<dyn Clock>,
    tls: Option<Arc<ration_tls::Credentials>>,
) -> anyhow::Result<NodeHandle>
where
    L: openraft::storage::RaftLogStorage<TypeConfig>,
    S: openraft::storage::RaftStateMachine<TypeConfig>,
    I: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: Connection,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    config.validate()?;
    if config.split_ports() != incoming.peer.is_some() {
        anyhow::bail!("a node with peer_listen serves two ports; one without, one");
    }
    let addr = config.member_addr();
    // Read and bound before Raft starts, so a bad token file or a taken port fails
    // the start cleanly.
    let metrics_token = config.metrics_token().context("the metrics token")?;
    let webhook = config.webhook().context("the webhook")?;
    let tokens = match &config.token_key_file {
        Some(path) => {
            Some(Arc::new(ration_tls::token::TokenKey::load(path).context("the bearer token key")?))
        }
        None => None,
    };
    let metrics_listener = match config.metrics_addr()? {
        Some(at) => Some(
            TcpListener::bind(at)
                .await
                .map_err(|e| in_use(e, "give each node its own --metrics-listen, or set it to off"))
                .with_context(|| format!("cannot serve metrics on {at}"))?,
        ),
        None => None,
    };
    let Storage { log, sm, reader, identity, wal } = storage;
    let timing = config.timing();
    let raft_config = openraft::Config {
        cluster_name: "ration".into(),
        heartbeat_interval: timing.heartbeat_ms,
        replication_timeout: timing.replication_timeout_ms,
        leader_lease: timing.leader_lease_ms,
        commit_heartbeat: config.commit_heartbeat,
        election_timeout_min: timing.election_timeout_min_ms,
        election_timeout_max: timing.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
        max_in_snapshot_log_to_keep: config.keep_log_after_snapshot,
        snapshot_max_chunk_size: config.snapshot_chunk_bytes as u64,
        // Entries hold thousands of commands: a few per RPC keep messages bounded.
        max_payload_entries: config.raft_max_entries_per_rpc,
        install_snapshot_timeout: config.rpc_timeout_ms.saturating_mul(5),
        ..Default::default()
    }
    .validate()
    .context("raft configuration")?;
    let long_calls = Channels::new(
        channels(LONG_CALL_TIMEOUT),
        LONG_CALL_TIMEOUT,
        config.peer_max_message_bytes,
    );
    let channels = Channels::new(
        channels(config.rpc_timeout()),
        config.rpc_timeout(),
        config.peer_max_message_bytes,
    );
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config),
        Network {
            channels: channels.clone(),
            identity: identity.clone(),
            client_addr: config.advertise_addr(),
            rtt_warn: Duration::from_millis(timing.replication_timeout_ms / 2),
            voter_rtt_ms: config.voter_rtt_ms,
        },
        log,
        sm,
    )
    .await
    .context("starting raft")?;
    let limits = BatchLimits {
        max_commands: config.batch_max_commands,
        max_bytes: config.batch_max_bytes,
        wait: Duration::from_micros(config.batch_wait_us),
        queue: config.proposal_queue,
        in_flight: config.proposals_in_flight(),
    };
    let node_metrics = Arc::new(metrics::Metrics::default());
    let time = Arc::new(std::sync::Mutex::new(ration_core::timebound::TimeBound::new(
        config.clock_slack_ms,
        config.clock_tolerance_ms,
    )));
    let stamper = proposer::Stamper {
        clock: clock.clone(),
        bound: time.clone(),
        ledger_now: reader.ledger_now(),
    };
    let proposer = Proposer::start(raft.clone(), stamper, limits, node_metrics.clone());
    let node = Arc::new(Node {
        id: config.node_id,
        addr: addr.clone(),
        client_addr: config.advertise_addr(),
        client_addrs: std::sync::Mutex::default(),
        tls,
        tokens,
        raft: raft.clone(),
        reader,
        proposer,
        channels,
        long_calls,
        config: config.clone(),
        identity,
        metrics: node_metrics,
        wal,
        transfer: tokio::sync::Mutex::new(()),
        transferring: std::sync::atomic::AtomicBool::new(false),
        paused_until: Arc::new(std::sync::Mutex::new(None)),
        metrics_addr: std::sync::OnceLock::new(),
        clock,
        time,
        segment_serving: Arc::new(tokio::sync::Semaphore::new(2)),
        heavy_reads: Arc::new(tokio::sync::Semaphore::new(HEAVY_READS_AT_ONCE)),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    if let Some(listener) = metrics_listener {
        let bound =
            metrics::serve(Arc::downgrade(&node), listener, metrics_token, stopped()).await?;
        let _ = node.metrics_addr.set(bound);
        tracing::info!(%bound, "metrics served at /metrics");
    }
    let served = tokio::spawn(services::serve(node.clone(), incoming, stopped));
    let (core_tx, core_rx) = watch::channel(None);
    tokio::spawn(watch_core(raft.clone(), core_tx));
    tokio::spawn(log_changes(raft.clone(), node.id));
    bootstrap(&node).await?;
    tokio::spawn(ticker(Arc::downgrade(&node), node.config.tick_ms));
    if let Some(target) = webhook {
        tokio::spawn(webhooks::run(Arc::downgrade(&node), target));
    }
    tokio::spawn(ledger_time::keep(Arc::downgrade(&node)));
    if node.config.leader_priority > 0 {
        tokio::spawn(placement::keep(Arc::downgrade(&node)));
    }
    if node.reader.audit.fetch_dir().is_some() {
        tokio::spawn(audit_fetch::run(Arc::downgrade(&node)));
        tokio::spawn(snapshot_when_unsealed(
            Arc::downgrade(&node),
            node.config.snapshot_after_audit_records,
        ));
    }
    if node.config.split_ports() {
        tracing::info!(id = node.id, clients = %node.client_addr, peers = %addr, tls = node.tls.is_some(), "node serving");
    } else {
        tracing::info!(id = node.id, %addr, "node serving");
    }
    if node.tls.is_none() && node.config.insecure {
        tokio::spawn(warn_insecure(Arc::downgrade(&node)));
    }
    if node.tls.is_some() && !node.config.admins.is_empty() {
        tokio::spawn(warn_bootstrap_admins(Arc::downgrade(&node)));
    }
    Ok(NodeHandle { node, stop: Some(stop_tx), served, core: core_rx })
}

/// How often a node serving without TLS on a non-loopback address says so.
const INSECURE_WARNING_EVERY: Duration = Duration::from_secs(60);
/// How often a node checks whether its bootstrap admins are still needed.
const BOOTSTRAP_ADMINS_CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Once the ledger holds an admin of its own, the bootstrap admins (`admins`) are
/// no longer needed to grant roles, and any certificate or token naming one is an
/// admin no revoke can touch: says so every [`BOOTSTRAP_ADMINS_CHECK_EVERY`].
async fn warn_bootstrap_admins(node: std::sync::Weak<Node>) {
    let mut tick = tokio::time::interval(BOOTSTRAP_ADMINS_CHECK_EVERY);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let admins = node.reader.state().ledger.holders_of(ration_core::Role::Admin);
        if admins > 0 {
            tracing::warn!(
                bootstrap_admins = ?node.config.admins,
                ledger_admins = admins,
                "bootstrap admins are configured though the ledger holds {admins} admin(s) of \
                 its own: a credential naming a bootstrap admin is an admin no revoke can \
                 touch; set `admins = []` in every node's configuration"
            );
        }
    }
}

/// Logs a warning every [`INSECURE_WARNING_EVERY`] while the node runs without TLS
/// where others can reach it.
async fn warn_insecure(node: std::sync::Weak<Node>) {
    let mut tick = tokio::time::interval(INSECURE_WARNING_EVERY);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        tracing::warn!(
            clients = %node.client_addr,
            peers = %node.addr,
            "serving WITHOUT TLS (--insecure): anyone who reaches these ports can read and \
             rewrite the ledger and take over the cluster"
        );
    }
}

/// How long opening storage waits for a lock held by a node still stopping.
const STORAGE_LOCK_WAIT: Duration = Duration::from_secs(5);
/// Between two attempts to take the storage lock.
const STORAGE_LOCK_RETRY: Duration = Duration::from_millis(100);
/// Attempts to join a cluster through `join` before giving up.
const JOIN_ATTEMPTS: u32 = 60;
/// Between two attempts to join.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// Opens the node's storage. A lock held by a node that is still stopping (in this
/// process or another) is retried for a few seconds; any other error is final.
async fn open_storage<L, F, Fut>(
    config: &Config,
    open: F,
) -> anyhow::Result<(L, ration_store::StateMachine, ration_store::ClusterIdentity)>
where
    F: Fn(std::path::PathBuf, LedgerConfig) -> Fut,
    Fut: Future<
        Output = Result<
            (L, ration_store::StateMachine, ration_store::ClusterIdentity),
            ration_store::OpenError,
        >,
    >,
{
    let deadline = tokio::time::Instant::now() + STORAGE_LOCK_WAIT;
    loop {
        match open(config.data_dir.clone(), LedgerConfig::default()).await {
            Ok(opened) => return Ok(opened),
            Err(ration_store::OpenError::Locked { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(STORAGE_LOCK_RETRY).await;
            }
            // It names the directory itself.
            Err(e @ ration_store::OpenError::Locked { .. }) => {
                return Err(anyhow::Error::new(e).context("cannot open storage"))
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot open storage in {}", config.data_dir.display())
                })
            }
        }
    }
}

/// Initializes a new cluster or joins an existing one, once.
async fn bootstrap(node: &Arc<Node>) -> anyhow::Result<()> {
    let config = &node.config;
    if let Some(through) = &config.join {
        // Done once this node is a member (a voter, when asked to join as one). A
        // node restored from a snapshot knows the cluster's membership already,
        // without being in it: it still joins.
        let as_voter = config.join_as == "voter";
        let done = {
            let m = node.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            if as_voter {
                membership.voter_ids().any(|id| id == node.id)
            } else {
                membership.get_node(&node.id).is_some()
            }
        };
        if done {
            return Ok(());
        }
        let node = node.clone();
        let through = through.clone();
        tokio::spawn(async move {
            for attempt in 1..=JOIN_ATTEMPTS {
                match join(&node, &through, as_voter).await {
                    Ok(()) if as_voter => {
                        tracing::info!(id = node.id, "joined the cluster as a voter");
                        return;
                    }
                    Ok(()) => {
                        tracing::info!(
                            id = node.id,
                            "joined the cluster as a learner (caught up); promote it with \
                             `rationctl member promote {}`",
                            node.id
                        );
                        return;
                    }
                    Err(e) => {
                        // A dead connection would fail every later attempt too.
                        node.channels.drop_channel(&through);
                        tracing::warn!(attempt, "joining through {through}: {e:#}");
                    }
                }
                tokio::time::sleep(JOIN_RETRY).await;
            }
            tracing::error!("gave up joining through {through}");
        });
        return Ok(());
    }
    let peers = config.peers()?;
    let members: BTreeMap<NodeId, BasicNode> = if peers.is_empty() {
        BTreeMap::from([(node.id, BasicNode::new(node.addr.clone()))])
    } else {
        peers.iter().map(|p| (p.id, BasicNode::new(p.addr.clone()))).collect()
    };
    let lowest = members.keys().next().copied();
    if lowest == Some(node.id)
        && config.initial_cluster_state == "new"
        && !node.raft.is_initialized().await?
    {
        // A new cluster gets a new id; the other members learn it from its messages.
        node.identity.adopt(new_cluster_id(node)).context("storing the cluster id")?;
        node.raft.initialize(members).await.context("initializing the cluster")?;
        tracing::info!(id = node.id, "initialized the cluster");
    }
    Ok(())
}

/// A new cluster's id (see [`ration_store::new_cluster_id`]).
fn new_cluster_id(node: &Node) -> u64 {
    ration_store::new_cluster_id(&(&node.addr, node.id))
}

/// Adds this node as a learner through `through` (AddLearner returns once it has
/// caught up), then, if `as_voter`, makes it a voter.
async fn join(node: &Node, through: &str, as_voter: bool) -> anyhow::Result<()> {
    let channel = node.channels.get(through)?;
    let mut client = ClusterClient::new(channel);
    client.add_learner(AddLearnerRequest { id: node.id, addr: node.addr.clone() }).await?;
    if !as_voter {
        return Ok(());
    }
    let status = client.status(StatusRequest { digest: false }).await?.into_inner();
    let mut voters: BTreeSet<u64> =
        status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    voters.insert(node.id);
    client
        .change_membership(ChangeMembershipRequest {
            voters: voters.into_iter().collect(),
            retain: false,
            remove: Vec::new(),
        })
        .await?;
    Ok(())
}

/// The leader proposes a tick periodically so expiry and rollover need no writes.
/// Holds the node weakly: a stopped node's storage is released at once.
async fn ticker(node: std::sync::Weak<Node>, every_ms: u64) {
    let mut every = tokio::time::interval(Duration::from_millis(every_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.raft.metrics().borrow().state == ServerState::Shutdown {
            return;
        }
        if node.is_leader() && !node.transferring.load(std::sync::atomic::Ordering::Acquire) {
            if let Err(e) = node.proposer.propose(vec![Command::Tick]).await {
                tracing::debug!("tick not proposed: {e}");
            }
        }
    }
}

/// How often [`snapshot_when_unsealed`] looks, and how long it lets a snapshot it
/// asked for take before asking again.
const UNSEALED_CHECK: Duration = Duration::from_secs(1);
const SNAPSHOT_PATIENCE: Duration = Duration::from_secs(120);

/// Asks for a snapshot once `after_records` audit records are not sealed: the
/// build seals them into segments, and the log before it is purged. openraft's
/// policy counts log entries only, and under load one entry carries thousands of
/// commands. Every node does this for itself.
async fn snapshot_when_unsealed(node: std::sync::Weak<Node>, after_records: u64) {
    if after_records == 0 {
        return;
    }
    let mut every = tokio::time::interval(UNSEALED_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (when asked, the snapshot then): wait for a newer snapshot before asking
    // again (the build seals segments before it writes the snapshot).
    let mut asked: Option<(tokio::time::Instant, Option<u64>)> = None;
    loop {
        every.tick().await;
        let Some(node) = node.upgrade() else { return };
        let (state, snapshot) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            (m.state, m.snapshot.map(|l| l.index))
        };
        if state == ServerState::Shutdown {
            return;
        }
        if let Some((at, then)) = asked {
            if snapshot == then && at.elapsed() < SNAPSHOT_PATIENCE {
                continue;
            }
            asked = None;
        }
        let sealed = node.reader.audit.sealed_end();
        let head = node.reader.state().ledger.chain_head().next_seq;
        let unsealed = head.saturating_sub(sealed);
        if unsealed < after_records {
            continue;
        }
        tracing::debug!(unsealed, "audit records not sealed: building a snapshot");
        match node.raft.trigger().snapshot().await {
            Ok(()) => asked = Some((tokio::time::Instant::now(), snapshot)),
            Err(e) => tracing::warn!("could not start a snapshot: {e}"),
        }
    }
}

/// On the leader, the highest index a quorum of voters holds. openraft 0.9's metrics
/// do not carry the commit index, so other nodes report `None`.
pub(crate) fn commit_index(m: &openraft::RaftMetrics<u64, BasicNode>) -> Option<u64> {
    let replication = m.replication.as_ref()?;
    let membership = m.membership_config.membership();
    let mut matched: Vec<u64> = membership
        .voter_ids()
        .map(|id| {
            if id == m.id {
                m.last_log_index.unwrap_or(0)
            } else {
                replication.get(&id).copied().flatten().map_or(0, |l| l.index)
            }
        })
        .collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched.get(matched.len() / 2).copied()
}
