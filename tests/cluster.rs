//! Three real nodes in one process, on real loopback sockets, with sled on disk.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{eventually, ledger, limit, meta, Cluster};
use ration_proto::v1::{self, Period};

fn acquire(client: &str, request_id: u64, wanted: i64) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: meta(client, request_id, "gw-1"),
        budget: "acme/search".into(),
        unit: "tokens".into(),
        wanted,
        min: 1,
        ttl_ms: 600_000,
    }
}

async fn create_tree(addr: std::net::SocketAddr) {
    let mut c = ledger(addr).await;
    for (i, (path, cap)) in [("acme", 1_000_000), ("acme/search", 500_000)].into_iter().enumerate()
    {
        c.create_budget(v1::CreateBudgetRequest {
            meta: meta("admin", i as u64 + 1, "ops"),
            path: path.into(),
            limits: vec![limit("tokens", cap, Period::Month)],
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_fails_over_and_catches_up() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let follower = *cluster.addrs.keys().find(|id| **id != leader).unwrap();

    // Written through a follower: forwarded to the leader.
    create_tree(cluster.addrs[&follower]).await;
    let statuses = cluster.converged().await;
    assert!(statuses.windows(2).all(|w| w[0].state_digest == w[1].state_digest), "digests differ");
    for addr in cluster.addrs.values() {
        let b = ledger(*addr)
            .await
            .get_budget(v1::GetBudgetRequest { path: "acme/search".into(), linearizable: false })
            .await;
        assert_eq!(b.unwrap().into_inner().limits[0].limit.as_ref().unwrap().cap, 500_000);
    }

    let lease = ledger(cluster.addrs[&follower])
        .await
        .acquire(acquire("gw-1-a", 1, 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.granted, 1000);
    // A linearizable read through a follower sees it at once.
    let info = ledger(cluster.addrs[&follower])
        .await
        .get_lease(v1::GetLeaseRequest { lease_id: lease.lease_id, linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.granted, 1000);

    // Kill the leader: another is elected and serves writes.
    cluster.stop(leader).await;
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let survivor = cluster.addrs[cluster.nodes.keys().next().unwrap()];
    let second =
        ledger(survivor).await.acquire(acquire("gw-1-a", 2, 2000)).await.unwrap().into_inner();
    assert_eq!(second.granted, 2000);
    // A retry of the first acquire, through another node after a leader change,
    // returns the first result and grants nothing new.
    let retried =
        ledger(survivor).await.acquire(acquire("gw-1-a", 1, 1000)).await.unwrap().into_inner();
    assert_eq!(retried, lease);

    // The old leader rejoins and catches up.
    cluster.restart(leader).await;
    let statuses = cluster.converged().await;
    assert_eq!(statuses.len(), 3);
    assert!(statuses.windows(2).all(|w| w[0].state_digest == w[1].state_digest), "digests differ");
    let b = ledger(cluster.addrs[&leader])
        .await
        .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.limits[0].outstanding, 3000, "the restarted node has both leases");
    assert_eq!(statuses[0].live_leases, 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_purged_log_catches_up_by_snapshot() {
    let mut cluster = Cluster::start(3, |c| {
        c.snapshot_after_entries = 20;
        c.keep_log_after_snapshot = 5;
    })
    .await;
    let leader = cluster.leader().await;
    create_tree(cluster.addrs[&leader]).await;
    let lagging = *cluster.addrs.keys().find(|id| **id != leader).unwrap();
    cluster.stop(lagging).await;

    let mut client = ledger(cluster.addrs[&leader]).await;
    for i in 0..120 {
        client.acquire(acquire("gw-1-b", i + 1, 10)).await.unwrap();
    }
    let lagging_last = 3; // it saw at most the tree's entries before it stopped
    let raft = cluster.nodes[&leader].node.raft.clone();
    eventually("the leader purged its log past the lagging node", Duration::from_secs(20), || {
        let purged = raft.metrics().borrow().purged.map(|l| l.index).unwrap_or(0);
        async move { purged > lagging_last + 10 }
    })
    .await;

    cluster.restart(lagging).await;
    let statuses = cluster.converged().await;
    assert!(statuses.windows(2).all(|w| w[0].state_digest == w[1].state_digest), "digests differ");
    assert!(statuses.iter().all(|s| s.live_leases == 120));
    let node = &cluster.nodes[&lagging].node;
    assert!(
        node.raft.metrics().borrow().snapshot.is_some(),
        "it caught up by installing a snapshot"
    );
    // The restored node answers audit queries for history before the snapshot.
    let audit = ledger(cluster.addrs[&lagging])
        .await
        .query_audit(v1::QueryAuditRequest {
            kinds: vec!["lease_granted".into()],
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.records.len(), 120);
    cluster.shutdown().await;
}
