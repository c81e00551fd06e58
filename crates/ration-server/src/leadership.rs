//! Moving leadership on purpose. openraft 0.9 has no leadership transfer, and a
//! follower that hears from a leader refuses to vote; so to move leadership to a
//! voter, every other voter pauses its elections (the leader its heartbeats too)
//! for a moment, and the target campaigns until it wins.

use std::time::Duration;

use ration_proto::v1::{self, cluster_client::ClusterClient};

use crate::{Leader, Node, NodeId};

/// How long the other voters hold off elections while the target campaigns,
/// beyond openraft's leader lease (`Timing::leader_lease_ms`: a follower refuses to
/// vote until that long after it last heard from the leader).
const TRANSFER_PAUSE_MARGIN: Duration = Duration::from_millis(2000);
/// Longest pause a `PauseElections` call may ask for.
pub(crate) const MAX_PAUSE: Duration = Duration::from_millis(10_000);
/// How long a transfer waits for its target to hold the leader's whole log.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(3);
/// How long a campaigning node keeps trying to win.
const CAMPAIGN_DEADLINE: Duration = Duration::from_secs(8);
/// How much longer than [`CAMPAIGN_DEADLINE`] the leader waits for the campaign's
/// answer (a target that went silent cannot keep writes refused for longer).
const CAMPAIGN_SLACK: Duration = Duration::from_secs(2);
/// How often a campaigning node looks at how its election goes.
const CAMPAIGN_POLL: Duration = Duration::from_millis(20);

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

/// Sets a flag for as long as it lives.
struct Quiet<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Quiet<'a> {
    fn new(flag: &'a std::sync::atomic::AtomicBool) -> Self {
        flag.store(true, std::sync::atomic::Ordering::Release);
        Self(flag)
    }
}

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Node {
    /// Voters and learners: (id, address, voter).
    pub(crate) fn members(&self) -> Vec<v1::Member> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| v1::Member {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
                client_addr: self.client_addr_of(*id, &n.addr),
            })
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
        // From here until the campaign ends this leader proposes nothing: log
        // replication would renew its followers' leases as heartbeats do, and they
        // would never vote for the target while writes flow.
        let _quiet = Quiet::new(&self.transferring);
        if to != self.id {
            // Then the target must hold the leader's whole log: a candidate with a
            // shorter log than the others' is refused by them, and its higher term
            // would still depose this leader, leaving nobody to lead.
            self.fully_replicated(to, &target.addr).await?;
        }
        let lease = Duration::from_millis(self.config.timing().leader_lease_ms);
        let pause = u64::try_from((lease + TRANSFER_PAUSE_MARGIN).min(MAX_PAUSE).as_millis())
            .unwrap_or(u64::MAX);
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
        if to != self.id {
            // Again, in case a proposal slipped in while the others were paused.
            self.fully_replicated(to, &target.addr).await?;
        }
        let unreachable =
            |status| TransferError::Unreachable { id: to, addr: target.addr.clone(), status };
        // A campaign takes up to CAMPAIGN_DEADLINE: the long-call channels.
        let channel = self
            .long_calls
            .get(&target.addr)
            .map_err(|e| unreachable(tonic::Status::unavailable(e.to_string())))?;
        // Bounded by the target's own campaign deadline (plus slack), not by the
        // long-call deadline: this leader refuses writes until the call ends.
        let result = tokio::time::timeout(
            CAMPAIGN_DEADLINE + CAMPAIGN_SLACK,
            ClusterClient::new(channel).campaign(v1::CampaignRequest {}),
        )
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("the campaign did not end")));
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

    /// On the leader, with new proposals refused: waits (up to [`CATCH_UP_DEADLINE`])
    /// until the proposals already accepted are answered and member `id` has every
    /// entry of the leader's log.
    async fn fully_replicated(&self, id: NodeId, addr: &str) -> Result<(), TransferError> {
        let deadline = tokio::time::Instant::now() + CATCH_UP_DEADLINE;
        loop {
            let behind = {
                let m = self.raft.metrics();
                let m = m.borrow();
                let last = m.last_log_index.unwrap_or(0);
                let matched = m.replication.as_ref().and_then(|r| r.get(&id).copied().flatten());
                last.saturating_sub(matched.map_or(0, |l| l.index))
            };
            if behind == 0 && self.proposer_idle() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TransferError::Lagging { id, addr: addr.to_owned(), behind });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Triggers elections here until this node leads, for at most a few seconds.
    pub(crate) async fn campaign(&self) -> Result<(), TransferError> {
        let deadline = tokio::time::Instant::now() + CAMPAIGN_DEADLINE;
        let first = match self.leader() {
            Leader::Other { id, .. } => Some(id),
            _ => None,
        };
        // One election at a time: triggering another while votes are in flight
        // raises the term again and makes every answer to the last one stale (on a
        // loaded machine, where persisting a vote takes a while, none ever counts).
        // Elect again only after an election timeout. Not sooner when this node does
        // not look like a candidate: until its own vote is persisted its metrics
        // still say follower, and re-electing then restarted the election every
        // poll (a simulated run stayed leaderless for 5.6 s that way).
        let patience = Duration::from_millis(self.config.timing().election_timeout_max_ms);
        let mut last: Option<tokio::time::Instant> = None;
        loop {
            match self.leader() {
                Leader::Me => break,
                // Another node won in the meantime: campaigning on would only
                // depose it.
                Leader::Other { id, .. } if Some(id) != first && id != self.id => {
                    return Err(TransferError::Raft(format!("node {id} took leadership first")));
                }
                _ => {}
            }
            let now = tokio::time::Instant::now();
            if now > deadline {
                return Err(TransferError::CampaignTimedOut);
            }
            if last.is_none_or(|t| now.duration_since(t) >= patience) {
                self.raft
                    .trigger()
                    .elect()
                    .await
                    .map_err(|e| TransferError::Raft(e.to_string()))?;
                last = Some(now);
            }
            tokio::time::sleep(CAMPAIGN_POLL).await;
        }
        // A new leader that was paused by an earlier transfer sends heartbeats now.
        self.resume_elections();
        Ok(())
    }

    /// Ends any pause of this node's elections and heartbeats at once.
    fn resume_elections(&self) {
        *self.paused_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.raft.runtime_config().elect(true);
        self.raft.runtime_config().heartbeat(true);
    }

    /// Stops this node from starting elections (and, leading, from sending
    /// heartbeats) for `ms` milliseconds.
    pub(crate) fn pause_elections(&self, ms: u64) -> Result<(), TransferError> {
        if ms == 0 || Duration::from_millis(ms) > MAX_PAUSE {
            return Err(TransferError::BadPause(ms));
        }
        // Pauses overlap when transfers follow each other: the pause ends at the
        // latest deadline asked for, not when the first timer fires.
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        {
            let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
            *paused = Some(paused.map_or(until, |p| p.max(until)));
        }
        self.raft.runtime_config().elect(false);
        self.raft.runtime_config().heartbeat(false);
        let raft = self.raft.clone();
        let paused = self.paused_until.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            let mut p = paused.lock().unwrap_or_else(|p| p.into_inner());
            if p.is_some_and(|p| p <= tokio::time::Instant::now()) {
                *p = None;
                raft.runtime_config().elect(true);
                raft.runtime_config().heartbeat(true);
            }
        });
        Ok(())
    }
}
