//! Leader placement (`leader_priority`), with default timings on loopback:
//! - the node with the highest priority takes leadership once it has caught up,
//!   loses it when it dies, and takes it back after it restarts;
//! - two nodes with the same priority do not take leadership from each other;
//! - writes keep being accepted around a placement transfer.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use ration_proto::v1::{self, Period};
use ration_testkit::inproc::Cluster;
use ration_testkit::{ledger, meta, status};

/// Waits until every running node agrees that `want` (one of them) leads; the
/// time it took.
async fn until_leads(cluster: &Cluster, want: &[u64], within: Duration) -> (u64, Duration) {
    let started = Instant::now();
    while started.elapsed() < within {
        let leader = cluster.leader().await;
        if want.contains(&leader) {
            return (leader, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("none of {want:?} led within {within:?}; the leader is {}", cluster.leader().await);
}

fn took(cluster: &Cluster, id: u64) -> u64 {
    cluster.nodes[&id].node.metrics.placement_transfers()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preferred_node_leads_and_leads_again_after_a_failover() {
    let mut cluster = Cluster::start(3, |c| {
        if c.node_id == 3 {
            c.leader_priority = 10;
        }
    })
    .await;
    // Node 3 may also win the first election by itself: the placement that
    // matters is the one after its restart, below.
    let (_, first) = until_leads(&cluster, &[3], Duration::from_secs(30)).await;
    // Status says who prefers what.
    let s = status(cluster.addrs[&3]).await.unwrap();
    assert_eq!(s.leader_priority, 10);

    // Writes go on while leadership moves back and forth.
    let limit = ration_testkit::limit("tokens", 1_000_000, Period::Minute);
    ledger(cluster.addrs[&3])
        .create_budget(v1::CreateBudgetRequest {
            meta: meta("placement", 1, "ops"),
            path: "p".into(),
            limits: vec![limit],
        })
        .await
        .unwrap();

    cluster.stop(3).await;
    let (other, _) = until_leads(&cluster, &[1, 2], Duration::from_secs(30)).await;
    cluster.restart(3).await;
    let (_, back) = until_leads(&cluster, &[3], Duration::from_secs(40)).await;
    eprintln!(
        "node 3 (priority 10) led {first:?} after start; after its restart (node {other} led \
         meanwhile) it led again {back:?} later"
    );
    // A fresh process, and the leader alive: only placement makes it lead. Its
    // count goes up once the transfer call returns, a moment after it leads.
    let started = Instant::now();
    while took(&cluster, 3) == 0 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(took(&cluster, 3), 1, "the restarted node took leadership by placement");
    // And it stays there: nobody else asks.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cluster.leader().await, 3);
    for id in [1, 2] {
        assert_eq!(took(&cluster, id), 0, "node {id} has no priority and never asks");
    }
    // The budget made before the failover is still there, and writes work.
    let got = ledger(cluster.addrs[&3])
        .acquire(v1::AcquireRequest {
            meta: meta("placement-gw", 1, "gw"),
            budget: "p".into(),
            unit: "tokens".into(),
            wanted: 10,
            min: 1,
            ttl_ms: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.granted, 10);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_priorities_do_not_take_leadership_from_each_other() {
    let cluster = Cluster::start(3, |c| {
        if c.node_id >= 2 {
            c.leader_priority = 5;
        }
    })
    .await;
    let (leader, _) = until_leads(&cluster, &[2, 3], Duration::from_secs(30)).await;
    // Watch for 15 s (past the backoff and several streaks): leadership stays.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        assert_eq!(cluster.leader().await, leader, "leadership moved between equals");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // At most one placement transfer (none if node 2 or 3 won the first election),
    // none between the equals.
    let total: u64 = [1, 2, 3].iter().map(|id| took(&cluster, *id)).sum();
    assert!(total <= 1, "{total} placement transfers");
    cluster.shutdown().await;
}
