//! Every Ledger and Cluster call that needs the leader takes the one forwarding
//! path from a follower (`services::forward`), and a call that was already
//! forwarded once is never forwarded again.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ration_proto::v1::{self, cluster_client::ClusterClient, Period};
use ration_testkit::inproc::Cluster;
use ration_testkit::{channel, ledger, limit, meta};

fn acquire(request_id: u64) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: meta("gw", request_id, "gw"),
        budget: "acme".into(),
        unit: "tokens".into(),
        wanted: 10,
        min: 1,
        ttl_ms: 600_000,
        starts_at_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_that_needs_the_leader_is_forwarded_once() {
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let follower = cluster.addrs[cluster.addrs.keys().find(|id| **id != leader).unwrap()];
    let mut l = ledger(follower);

    // Writes, each through the follower.
    let limits = vec![limit("tokens", 1_000, Period::Day)];
    let created = l
        .create_budget(v1::CreateBudgetRequest {
            meta: meta("ops", 1, "ops"),
            path: "acme".into(),
            limits: limits.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let more = vec![limit("tokens", 2_000, Period::Day)];
    let updated = l
        .update_budget(v1::UpdateBudgetRequest {
            meta: meta("ops", 2, "ops"),
            path: "acme".into(),
            limits: more,
            expected_version: created.version,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.version > created.version);
    l.create_budget(v1::CreateBudgetRequest {
        meta: meta("ops", 3, "ops"),
        path: "scratch".into(),
        limits,
    })
    .await
    .unwrap();
    l.delete_budget(v1::DeleteBudgetRequest {
        meta: meta("ops", 4, "ops"),
        path: "scratch".into(),
        expected_version: None,
    })
    .await
    .unwrap();
    let lease = l.acquire(acquire(1)).await.unwrap().into_inner();
    l.report(v1::ReportRequest {
        meta: meta("gw", 2, "gw"),
        lease_id: lease.lease_id,
        consumed_delta: 3,
        renew_ttl_ms: None,
    })
    .await
    .unwrap();
    let released = l
        .release(v1::ReleaseRequest {
            meta: meta("gw", 3, "gw"),
            lease_id: lease.lease_id,
            consumed_total: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.returned, 6);
    let ops =
        (10..20).map(|r| v1::BatchOp { op: Some(v1::batch_op::Op::Acquire(acquire(r))) }).collect();
    let batch = l.batch(v1::BatchRequest { ops }).await.unwrap().into_inner();
    assert_eq!(batch.results.len(), 10);

    // Linearizable reads, through the follower, see every write at once.
    let budget = l
        .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((budget.limits[0].consumed, budget.limits[0].outstanding), (4, 100));
    let list = l
        .list_budgets(v1::ListBudgetsRequest { linearizable: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.budgets.len(), 1, "scratch was deleted");
    let Some(v1::batch_result::Result::Lease(last)) = &batch.results[9].result else {
        panic!("{:?}", batch.results[9]);
    };
    let info = l
        .get_lease(v1::GetLeaseRequest { lease_id: last.lease_id, linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.granted, 10);
    let audit = l
        .query_audit(v1::QueryAuditRequest { linearizable: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(audit.records.iter().any(|r| r.kind == "lease_released"), "{audit:?}");

    // A Cluster write through the follower: the same voters (a no-op change).
    let voters: Vec<u64> = cluster.addrs.keys().copied().collect();
    let changed = ClusterClient::new(channel(follower))
        .change_membership(v1::ChangeMembershipRequest {
            voters: voters.clone(),
            retain: false,
            remove: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.members.iter().filter(|m| m.voter).count(), voters.len());

    // A call marked as forwarded already is not forwarded again, and has no effect.
    let mut second_hop = tonic::Request::new(acquire(99));
    second_hop.metadata_mut().insert("x-ration-forwarded", "1".parse().unwrap());
    let refused = l.acquire(second_hop).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("leadership is moving"), "{}", refused.message());
    assert!(ration_proto::rpc::retryable(&refused));
    let mut second_hop = tonic::Request::new(v1::ChangeMembershipRequest {
        voters,
        retain: false,
        remove: Vec::new(),
    });
    second_hop.metadata_mut().insert("x-ration-forwarded", "1".parse().unwrap());
    let refused =
        ClusterClient::new(channel(follower)).change_membership(second_hop).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let after = l
        .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.limits[0].outstanding, 100, "the refused second hop changed nothing");
    cluster.shutdown().await;
}
