//! Keeping ledger time honest (the rules are in `ration_core::timebound`).
//!
//! Every node observes the ledger time it applies, so that when it is elected its
//! stamps continue from where its monotonic clock says ledger time is now. On the
//! leader, a wall clock further than `clock_tolerance_ms` from that estimate makes
//! it ask the voters for their wall clocks: ledger time catches up to a time a
//! majority of them reached (after the whole cluster was down), and a leader whose
//! own clock is further than the tolerance from theirs hands leadership over. A
//! single-voter cluster has only its own clock, and trusts it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::ServerState;
use ration_core::timebound::quorum_time;
use ration_proto::v1::{self, cluster_client::ClusterClient};

use crate::Node;

/// How often a node observes ledger time and checks its clock.
const EVERY: Duration = Duration::from_millis(200);
/// Least time between two checks of the voters' clocks.
const CHECK_EVERY: Duration = Duration::from_secs(2);

impl Node {
    /// (wall clock now, wall clock minus the estimate of ledger time now).
    pub(crate) fn clock_reading(&self) -> (u64, i64) {
        let (wall, mono) = (self.clock.now_ms(), self.clock.mono_ms());
        let skew = self.time.lock().unwrap_or_else(|p| p.into_inner()).skew_ms(wall, mono);
        (wall, skew.unwrap_or(0))
    }

    /// The wall clocks of the voters that answered within the RPC deadline, this
    /// node's own included, and the number of voters.
    async fn voter_clocks(&self) -> (Vec<u64>, usize) {
        let members = self.members();
        let voters = members.iter().filter(|m| m.voter).count();
        let mut asks = tokio::task::JoinSet::new();
        for m in members.iter().filter(|m| m.voter && m.id != self.id) {
            let Ok(channel) = self.channels.get(&m.addr) else { continue };
            asks.spawn(async move {
                ClusterClient::new(channel)
                    .status(v1::StatusRequest { digest: false })
                    .await
                    .ok()
                    .map(|r| r.into_inner().wall_ms)
            });
        }
        let mut clocks = vec![self.clock.now_ms()];
        while let Some(answer) = asks.join_next().await {
            if let Ok(Some(wall)) = answer {
                clocks.push(wall);
            }
        }
        (clocks, voters)
    }
}

/// Runs for the node's life (holding it weakly).
pub(crate) async fn keep(node: Weak<Node>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check: Option<tokio::time::Instant> = None;
    loop {
        every.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.raft.metrics().borrow().state == ServerState::Shutdown {
            return;
        }
        check(&node, &mut last_check).await;
    }
}

async fn check(node: &Arc<Node>, last_check: &mut Option<tokio::time::Instant>) {
    let ledger_ms = node.reader.state().ledger.now_ms();
    let leading = node.is_leader();
    let (wall, mono) = (node.clock.now_ms(), node.clock.mono_ms());
    let (skew, disagrees) = {
        let mut t = node.time.lock().unwrap_or_else(|p| p.into_inner());
        if ledger_ms > 0 {
            t.observe(ledger_ms, mono);
        }
        if !leading {
            t.step_down();
        }
        let skew = t.skew_ms(wall, mono);
        (skew, skew.is_some_and(|s| t.disagrees(s)))
    };
    node.metrics.set_clock_skew(skew.unwrap_or(0));
    if !leading || !disagrees || ledger_ms == 0 {
        return;
    }
    if last_check.is_some_and(|at| at.elapsed() < CHECK_EVERY) {
        return;
    }
    *last_check = Some(tokio::time::Instant::now());
    let (clocks, voters) = node.voter_clocks().await;
    let Some(quorum) = quorum_time(&clocks, voters) else {
        tracing::warn!(
            id = node.id,
            skew_ms = skew.unwrap_or(0),
            "this leader's wall clock disagrees with ledger time, and too few voters answered \
             to compare clocks: ledger time moves with its monotonic clock"
        );
        return;
    };
    let mono = node.clock.mono_ms();
    let moved = node.time.lock().unwrap_or_else(|p| p.into_inner()).rebase(quorum, mono);
    if moved {
        node.metrics.ledger_time_rebased();
        tracing::info!(
            id = node.id,
            from_ms = ledger_ms,
            to_ms = quorum,
            "ledger time caught up with the time a majority of the voters' clocks agree on"
        );
    }
    let wall = node.clock.now_ms();
    let off = i128::from(wall) - i128::from(quorum);
    let tolerance = i128::from(node.config.clock_tolerance_ms);
    if voters > 1 && off.abs() > tolerance {
        node.metrics.clock_stepped_down();
        tracing::error!(
            id = node.id,
            off_ms = i64::try_from(off).unwrap_or(i64::MAX),
            tolerance_ms = node.config.clock_tolerance_ms,
            "this node's wall clock is off the time a majority of the voters' clocks agree on: \
             it does not lead, and hands leadership over; fix its clock (NTP)"
        );
        crate::hand_over(node).await;
    }
}
