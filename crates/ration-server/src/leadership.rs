//! Moving leadership on purpose. openraft 0.9 has no leadership transfer, and a
//! follower that hears from a leader refuses to vote; so to move leadership to a
//! voter, every other voter pauses its elections (the leader its heartbeats too)
//! for a moment, and the target campaigns until it wins.

use std::time::Duration;

use ration_proto::v1::{self, cluster_client::ClusterClient};

use crate::{Leader, Node, NodeId};

/// How long the other voters hold off elections while the target campaigns.
pub(crate) const TRANSFER_PAUSE: Duration = Duration::from_millis(3000);
/// Longest pause a `PauseElections` call may ask for.
pub(crate) const MAX_PAUSE: Duration = Duration::from_millis(10_000);
/// How long a campaigning node keeps trying to win.
const CAMPAIGN_DEADLINE: Duration = Duration::from_secs(8);
/// Between two election attempts of a campaign.
const CAMPAIGN_RETRY: Duration = Duration::from_millis(150);

/// Why leadership did not move.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransferError {
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("node {0} is a learner, not a voter")]
    NotVoter(NodeId),
    #[error("pause of {0} ms is outside 1..=10000")]
    BadPause(u64),
    #[error("did not win an election in time; the cluster keeps its leader")]
    CampaignTimedOut,
    #[error("a leadership transfer is already in progress; try again when it is done")]
    InProgress,
    #[error("node {id} ({addr}) is {behind} log entries behind the leader (is it running?); wait until it has caught up (rationctl endpoint status shows its lag)")]
    Lagging { id: NodeId, addr: String, behind: u64 },
    #[error("node {id} ({addr}) did not take leadership: {status}")]
    Unreachable { id: NodeId, addr: String, status: tonic::Status },
    #[error("{0}")]
    Raft(String),
    /// The target's own answer (or failure) to `Campaign`.
    #[error(transparent)]
    Target(#[from] tonic::Status),
}

impl Node {
    /// Voters and learners: (id, address, voter).
    pub(crate) fn members(&self) -> Vec<v1::Member> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| v1::Member { id: *id, addr: n.addr.clone(), voter: voters.contains(id) })
            .collect()
    }

    /// Makes voter `to` the leader: the other voters pause their elections, then `to`
    /// campaigns. Returns `to`'s status once it leads. Run on the leader, one at a
    /// time (a second is refused while one runs), and only to a voter whose log is
    /// within [`crate::READY_MAX_LAG_ENTRIES`] of the leader's.
    pub(crate) async fn transfer_leadership(
        &self,
        to: NodeId,
    ) -> Result<v1::StatusReply, TransferError> {
        let _one = self.transfer.try_lock().map_err(|_| TransferError::InProgress)?;
        let members = self.members();
        let target = members.iter().find(|m| m.id == to).ok_or(TransferError::NotMember(to))?;
        if !target.voter {
            return Err(TransferError::NotVoter(to));
        }
        if to != self.id {
            self.caught_up(to, &target.addr)?;
        }
        let pause = u64::try_from(TRANSFER_PAUSE.as_millis()).unwrap_or(u64::MAX);
        for m in members.iter().filter(|m| m.voter && m.id != to) {
            let paused = match self.channels.get(&m.addr) {
                Ok(ch) => {
                    let result = ClusterClient::new(ch)
                        .pause_elections(v1::PauseElectionsRequest { ms: pause })
                        .await;
                    self.channels.forget_on_failure(&m.addr, result).map(|_| ())
                }
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            if let Err(e) = paused {
                tracing::warn!(node = m.id, "could not pause elections for a leader transfer: {e}");
            }
        }
        let unreachable =
            |status| TransferError::Unreachable { id: to, addr: target.addr.clone(), status };
        // A campaign takes up to CAMPAIGN_DEADLINE: the long-call channels.
        let channel = self
            .long_calls
            .get(&target.addr)
            .map_err(|e| unreachable(tonic::Status::unavailable(e.to_string())))?;
        let result = ClusterClient::new(channel).campaign(v1::CampaignRequest {}).await;
        Ok(self
            .long_calls
            .forget_on_failure(&target.addr, result)
            .map_err(unreachable)?
            .into_inner())
    }

    /// On the leader: whether member `id` (at `addr`) has the log to within
    /// [`crate::READY_MAX_LAG_ENTRIES`] entries of the leader's.
    pub(crate) fn caught_up(&self, id: NodeId, addr: &str) -> Result<(), TransferError> {
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m.replication.as_ref().and_then(|r| r.get(&id).copied().flatten());
        let behind = last.saturating_sub(matched.map_or(0, |l| l.index));
        // A member that never answered replication (None) is not caught up, however
        // short the log.
        if matched.is_none() || behind > crate::READY_MAX_LAG_ENTRIES {
            return Err(TransferError::Lagging { id, addr: addr.to_owned(), behind });
        }
        Ok(())
    }

    /// Triggers elections here until this node leads, for at most a few seconds.
    pub(crate) async fn campaign(&self) -> Result<(), TransferError> {
        let deadline = tokio::time::Instant::now() + CAMPAIGN_DEADLINE;
        while self.leader() != Leader::Me {
            if tokio::time::Instant::now() > deadline {
                return Err(TransferError::CampaignTimedOut);
            }
            self.raft.trigger().elect().await.map_err(|e| TransferError::Raft(e.to_string()))?;
            tokio::time::sleep(CAMPAIGN_RETRY).await;
        }
        Ok(())
    }

    /// Stops this node from starting elections (and, leading, from sending
    /// heartbeats) for `ms` milliseconds.
    pub(crate) fn pause_elections(&self, ms: u64) -> Result<(), TransferError> {
        if ms == 0 || Duration::from_millis(ms) > MAX_PAUSE {
            return Err(TransferError::BadPause(ms));
        }
        let raft = self.raft.clone();
        raft.runtime_config().elect(false);
        raft.runtime_config().heartbeat(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            raft.runtime_config().elect(true);
            raft.runtime_config().heartbeat(true);
        });
        Ok(())
    }
}
