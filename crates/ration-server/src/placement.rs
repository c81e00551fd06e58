//! Leader placement: a node with a higher `leader_priority` than the leader's
//! takes leadership once it has been caught up for a while, so the leader sits
//! where most gateways are, and comes back there after a failover.
//!
//! The node that wants to lead drives it (the leader need not know anyone's
//! priority): every [`EVERY`] it asks the leader's `Status`, which carries the
//! leader's priority and commit index. After [`STREAK`] answers in a row in which
//! the leader's priority was lower than its own and its own applied index was
//! within [`crate::READY_MAX_LAG_ENTRIES`] of the leader's commit index, it asks the
//! leader to transfer leadership to it (`TransferLeader`, the same path as
//! `rationctl cluster transfer-leader`). Requests are spaced by a backoff that
//! doubles while they keep coming within [`BACKOFF_RESET`] of each other (a
//! flapping link cannot make leadership ping-pong), from [`BACKOFF_MIN`] up to
//! [`BACKOFF_MAX`]. Nodes with priority 0 (the default) never ask, so a cluster
//! that sets none behaves, and sends, exactly as without this module. Two nodes
//! with the same priority never take leadership from each other.

use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::ServerState;
use ration_proto::v1::{self, cluster_client::ClusterClient};

use crate::{Leader, Node};

/// How often a node with a priority looks at the leader.
const EVERY: Duration = Duration::from_secs(1);
/// Answers in a row that must find this node preferred and caught up.
const STREAK: u32 = 3;
/// The least time between two requests, doubled while requests keep coming.
const BACKOFF_MIN: Duration = Duration::from_secs(10);
/// The most time between two requests.
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A request this long after the previous one starts from [`BACKOFF_MIN`] again.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// Whether a follower with `mine` priority, `applied` entries applied, should count
/// towards taking leadership from a leader with `leader` priority whose commit
/// index is `commit`.
pub(crate) fn wants_to_lead(mine: u32, leader: u32, applied: u64, commit: u64) -> bool {
    mine > leader && commit.saturating_sub(applied) <= crate::READY_MAX_LAG_ENTRIES
}

/// The pacing of requests: when the next may be made, and how long after it the
/// one after may.
#[derive(Debug)]
pub(crate) struct Pace {
    backoff: Duration,
    last: Option<tokio::time::Instant>,
}

impl Pace {
    pub(crate) fn new() -> Self {
        Self { backoff: BACKOFF_MIN, last: None }
    }

    /// Whether a request may be made at `now`.
    pub(crate) fn ready(&self, now: tokio::time::Instant) -> bool {
        self.last.is_none_or(|at| now >= at + self.backoff)
    }

    /// A request is made at `now`.
    pub(crate) fn made(&mut self, now: tokio::time::Instant) {
        self.backoff = match self.last {
            Some(at) if now < at + BACKOFF_RESET => (self.backoff * 2).min(BACKOFF_MAX),
            _ => BACKOFF_MIN,
        };
        self.last = Some(now);
    }
}

/// Runs for the node's life (holding it weakly); started only on a node with a
/// priority (`leader_priority > 0`).
pub(crate) async fn keep(node: Weak<Node>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = 0;
    let mut pace = Pace::new();
    loop {
        every.tick().await;
        let Some(node) = node.upgrade() else { return };
        let mine = node.config.leader_priority;
        let (state, applied) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            (m.state, m.last_applied.map_or(0, |l| l.index))
        };
        match state {
            ServerState::Shutdown => return,
            ServerState::Follower => {}
            // A leader has nothing to ask; a learner or candidate cannot lead now.
            _ => {
                streak = 0;
                continue;
            }
        }
        let Leader::Other { id: leader, addr } = node.leader() else {
            streak = 0;
            continue;
        };
        if !node.members().iter().any(|m| m.id == node.id && m.voter) {
            streak = 0;
            continue;
        }
        let answer = match node.channels.get(&addr) {
            Ok(ch) => {
                let result =
                    ClusterClient::new(ch).status(v1::StatusRequest { digest: false }).await;
                node.channels.forget_on_failure(&addr, result).ok().map(|r| r.into_inner())
            }
            Err(_) => None,
        };
        let Some(status) = answer.filter(|s| s.id == leader && s.role() == v1::Role::Leader) else {
            streak = 0;
            continue;
        };
        if !wants_to_lead(mine, status.leader_priority, applied, status.commit_index) {
            streak = 0;
            continue;
        }
        streak += 1;
        let now = tokio::time::Instant::now();
        if streak < STREAK || !pace.ready(now) {
            continue;
        }
        streak = 0;
        pace.made(now);
        ask_to_lead(&node, leader, &addr, mine, status.leader_priority).await;
    }
}

/// Asks `leader` (at member address `addr`) to hand leadership to this node.
async fn ask_to_lead(node: &Arc<Node>, leader: u64, addr: &str, mine: u32, theirs: u32) {
    tracing::info!(
        id = node.id,
        leader,
        priority = mine,
        leader_priority = theirs,
        "this node has a higher leader priority than the leader and has caught up: asking \
         for leadership"
    );
    let result = match node.long_calls.get(addr) {
        Ok(ch) => {
            let result = ClusterClient::new(ch)
                .transfer_leader(v1::TransferLeaderRequest { to: node.id })
                .await;
            node.long_calls.forget_on_failure(addr, result).map(|_| ())
        }
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    match result {
        Ok(()) => {
            node.metrics.placement_transfer(true);
            tracing::info!(id = node.id, "took leadership (leader placement)");
        }
        Err(e) => {
            node.metrics.placement_transfer(false);
            tracing::warn!(id = node.id, leader, "leader placement: the transfer failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_higher_priority_that_has_caught_up_wants_to_lead() {
        assert!(wants_to_lead(10, 0, 500, 500));
        assert!(wants_to_lead(10, 9, 400, 500));
        assert!(!wants_to_lead(10, 10, 500, 500), "equal priorities never take over");
        assert!(!wants_to_lead(5, 10, 500, 500));
        assert!(!wants_to_lead(10, 0, 399, 500), "lagging");
        assert!(wants_to_lead(10, 0, 600, 500), "ahead of a stale answer is caught up");
    }

    #[test]
    fn requests_back_off_while_they_keep_coming() {
        let mut pace = Pace::new();
        let t0 = tokio::time::Instant::now();
        assert!(pace.ready(t0));
        pace.made(t0);
        assert!(!pace.ready(t0 + Duration::from_secs(9)));
        assert!(pace.ready(t0 + BACKOFF_MIN));
        // The next within the reset window: twice the wait, then four times.
        let t1 = t0 + BACKOFF_MIN;
        pace.made(t1);
        assert!(!pace.ready(t1 + BACKOFF_MIN));
        assert!(pace.ready(t1 + 2 * BACKOFF_MIN));
        let t2 = t1 + 2 * BACKOFF_MIN;
        pace.made(t2);
        assert!(!pace.ready(t2 + 3 * BACKOFF_MIN));
        assert!(pace.ready(t2 + 4 * BACKOFF_MIN));
        // Capped.
        let mut t = t2;
        for _ in 0..10 {
            t += BACKOFF_MAX;
            pace.made(t);
        }
        assert!(pace.ready(t + BACKOFF_MAX));
        // Quiet for long enough: back to the least wait.
        let later = t + BACKOFF_RESET + BACKOFF_MAX;
        pace.made(later);
        assert!(pace.ready(later + BACKOFF_MIN));
    }
}
