//! Three real nodes in one process, on real loopback sockets, with sled on disk.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use ration_proto::v1::{self, Period};
use ration_testkit::inproc::{self, Cluster};
use ration_testkit::{channel, eventually, ledger, limit, meta};

fn acquire(client: &str, request_id: u64, wanted: i64) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: meta(client, request_id, "gw-1"),
        budget: "acme/search".into(),
        unit: "tokens".into(),
        wanted,
        min: 1,
        ttl_ms: 600_000,
        starts_at_ms: 0,
    }
}

async fn create_tree(addr: std::net::SocketAddr) {
    let mut c = ledger(addr);
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
            .get_budget(v1::GetBudgetRequest { path: "acme/search".into(), linearizable: false })
            .await;
        assert_eq!(b.unwrap().into_inner().limits[0].limit.as_ref().unwrap().cap, 500_000);
    }

    let lease = ledger(cluster.addrs[&follower])
        .acquire(acquire("gw-1-a", 1, 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.granted, 1000);
    // A linearizable read through a follower sees it at once.
    let info = ledger(cluster.addrs[&follower])
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
    let second = ledger(survivor).acquire(acquire("gw-1-a", 2, 2000)).await.unwrap().into_inner();
    assert_eq!(second.granted, 2000);
    // A retry of the first acquire, through another node after a leader change,
    // returns the first result and grants nothing new.
    let retried = ledger(survivor).acquire(acquire("gw-1-a", 1, 1000)).await.unwrap().into_inner();
    assert_eq!(retried, lease);

    // The old leader rejoins and catches up.
    cluster.restart(leader).await;
    let statuses = cluster.converged().await;
    assert_eq!(statuses.len(), 3);
    assert!(statuses.windows(2).all(|w| w[0].state_digest == w[1].state_digest), "digests differ");
    let b = ledger(cluster.addrs[&leader])
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

    let mut client = ledger(cluster.addrs[&leader]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_install_fetches_the_sealed_audit_history_from_peers() {
    let mut cluster = Cluster::start(3, |c| {
        c.snapshot_after_entries = 20;
        c.keep_log_after_snapshot = 5;
        c.audit_segment_min_records = 40;
        c.audit_segment_max_records = 90;
    })
    .await;
    let leader = cluster.leader().await;
    create_tree(cluster.addrs[&leader]).await;
    let lagging = *cluster.addrs.keys().find(|id| **id != leader).unwrap();
    cluster.stop(lagging).await;
    let mut client = ledger(cluster.addrs[&leader]);
    for i in 0..400 {
        client.acquire(acquire("gw-1-b", i + 1, 10)).await.unwrap();
    }
    let raft = cluster.nodes[&leader].node.raft.clone();
    eventually("the leader purged its log past the lagging node", Duration::from_secs(20), || {
        let purged = raft.metrics().borrow().purged.map(|l| l.index).unwrap_or(0);
        async move { purged > 20 }
    })
    .await;
    let reader = cluster.nodes[&leader].node.reader.clone();
    eventually("the leader sealed segments", Duration::from_secs(20), || {
        let listed = reader.audit.segment_counts().0;
        async move { listed >= 2 }
    })
    .await;

    cluster.restart(lagging).await;
    cluster.converged().await;
    let node = cluster.nodes[&lagging].node.clone();
    assert!(node.raft.metrics().borrow().snapshot.is_some(), "it installed a snapshot");
    eventually("the lagging node fetched every listed segment", Duration::from_secs(30), || {
        let (listed, missing, _) = node.reader.audit.segment_counts();
        async move { listed >= 2 && missing == 0 }
    })
    .await;
    // The snapshot it holds carries the tail only, not the history.
    let snap = ration_store::backup::current_snapshot(&node.config.data_dir).unwrap().unwrap();
    let info = ration_store::backup::inspect_snapshot(&snap).unwrap();
    assert!(info.audit_segments >= 2 && info.audit_records > 300, "{info:?}");
    // Its whole audit chain, read from it alone, is the leader's, record for record.
    let mine = ration_testkit::audit_records(cluster.addrs[&lagging]).await;
    let theirs = ration_testkit::audit_records(cluster.addrs[&leader]).await;
    assert!(mine.len() > 400);
    assert_eq!(mine.len(), theirs.len());
    assert!(mine.iter().zip(&theirs).all(|(a, b)| a.hash == b.hash && a.seq == b.seq));
    assert!(node.metrics.audit_segments_fetched.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    cluster.shutdown().await;
}

/// Under load one log entry carries many commands, so the entry-count policy alone
/// lets the unsealed audit tail grow without a snapshot: `snapshot_after_audit_records`
/// makes every node build one (sealing the records) once that many are unsealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_snapshots_once_enough_audit_records_are_unsealed() {
    let cluster = Cluster::start(3, |c| {
        c.snapshot_after_entries = 1_000_000;
        c.snapshot_after_audit_records = 150;
        c.audit_segment_min_records = 40;
        c.audit_segment_max_records = 90;
    })
    .await;
    let leader = cluster.leader().await;
    create_tree(cluster.addrs[&leader]).await;
    let mut client = ledger(cluster.addrs[&leader]);
    // 400 grants in 4 Batch calls: a handful of log entries.
    for b in 0..4u64 {
        let ops = (0..100u64)
            .map(|i| v1::BatchOp {
                op: Some(v1::batch_op::Op::Acquire(acquire("gw-batch", b * 100 + i + 1, 1))),
            })
            .collect();
        let reply = client.batch(v1::BatchRequest { ops }).await.unwrap().into_inner();
        assert!(reply
            .results
            .iter()
            .all(|r| matches!(r.result, Some(v1::batch_result::Result::Lease(_)))));
    }
    let entries = cluster.nodes[&leader].node.raft.metrics().borrow().last_log_index.unwrap_or(0);
    assert!(entries < 100, "{entries} entries: far below the entry policy");
    for (id, n) in &cluster.nodes {
        let node = n.node.clone();
        eventually(&format!("node {id} sealed its audit records"), Duration::from_secs(20), || {
            let sealed = node.reader.audit.sealed_end();
            let snapshot = node.raft.metrics().borrow().snapshot.is_some();
            async move { snapshot && sealed >= 250 }
        })
        .await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_leave_and_take_over_leadership() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    cluster.leader().await;
    create_tree(cluster.addrs[&1]).await;

    // Node 4 joins through node 1 as a voter: added as a learner, then promoted.
    let l = inproc::listener().await;
    let addr4 = l.local_addr().unwrap();
    let mut c4 = inproc::config(4, addr4, cluster.dir.path().join("node-4"), &[]);
    c4.join = Some(cluster.addrs[&1].to_string());
    c4.join_as = "voter".into();
    cluster.addrs.insert(4, addr4);
    cluster.nodes.insert(4, ration_server::start(c4, l).await.unwrap());
    eventually("node 4 is a voter", Duration::from_secs(30), || async move {
        ration_testkit::status(addr4)
            .await
            .is_some_and(|s| s.members.iter().any(|m| m.id == 4 && m.voter))
    })
    .await;
    cluster.converged().await;

    // Leadership moves to node 4 on request.
    let mut admin =
        ration_proto::v1::cluster_client::ClusterClient::new(channel(cluster.addrs[&2]));
    admin.transfer_leader(v1::TransferLeaderRequest { to: 4 }).await.unwrap();
    eventually("node 4 leads", Duration::from_secs(20), || async move {
        ration_testkit::status(addr4).await.is_some_and(|s| s.leader == Some(4))
    })
    .await;

    // Node 2 is removed; the rest keep serving writes.
    admin
        .change_membership(v1::ChangeMembershipRequest {
            voters: vec![1, 3, 4],
            retain: false,
            remove: vec![],
        })
        .await
        .unwrap();
    eventually("node 2 is no longer a member", Duration::from_secs(20), || async move {
        ration_testkit::status(addr4).await.is_some_and(|s| s.members.iter().all(|m| m.id != 2))
    })
    .await;
    cluster.stop(2).await;
    let lease =
        ledger(cluster.addrs[&1]).acquire(acquire("gw-1-c", 1, 5)).await.unwrap().into_inner();
    assert_eq!(lease.granted, 5);
    let statuses = cluster.converged().await;
    assert!(statuses.windows(2).all(|w| w[0].state_digest == w[1].state_digest), "digests differ");

    // Refused changes say why.
    let err = admin.transfer_leader(v1::TransferLeaderRequest { to: 9 }).await;
    let err = match err {
        Err(e) => e,
        Ok(_) => {
            // node 2 is gone; ask a member instead
            ration_proto::v1::cluster_client::ClusterClient::new(channel(cluster.addrs[&1]))
                .transfer_leader(v1::TransferLeaderRequest { to: 9 })
                .await
                .unwrap_err()
        }
    };
    assert!(matches!(err.code(), tonic::Code::NotFound | tonic::Code::Unavailable), "{err}");
    cluster.shutdown().await;
}

/// A Batch answers each operation on its own, as the proto promises: a malformed
/// operation (or one the ledger refuses) is refused in its place, named by its
/// position, and every other operation is carried out. Only a malformed envelope
/// (more operations than allowed) refuses the whole call. Sent through a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_operation_on_its_own() {
    use v1::batch_op::Op;
    use v1::batch_result::Result as R;
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    create_tree(cluster.addrs[&leader]).await;
    let follower = cluster.addrs.keys().copied().find(|id| *id != leader).unwrap();
    let mut bad_name = acquire("gw-batch", 2, 5);
    bad_name.budget = "acme//search".into();
    let mut unknown = acquire("gw-batch", 3, 5);
    unknown.budget = "nobody".into();
    let ops = vec![
        v1::BatchOp { op: Some(Op::Acquire(acquire("gw-batch", 1, 5))) },
        v1::BatchOp { op: Some(Op::Acquire(bad_name)) },
        v1::BatchOp { op: None },
        v1::BatchOp { op: Some(Op::Acquire(unknown)) },
        v1::BatchOp { op: Some(Op::Acquire(acquire("gw-batch", 4, 7))) },
    ];
    let mut c = ledger(cluster.addrs[&follower]);
    let results = c.batch(v1::BatchRequest { ops }).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 5, "{results:?}");
    let granted: Vec<i64> = results
        .iter()
        .filter_map(|r| match &r.result {
            Some(R::Lease(l)) => Some(l.granted),
            _ => None,
        })
        .collect();
    assert_eq!(granted, [5, 7], "{results:?}");
    let error = |i: usize| match &results[i].result {
        Some(R::Error(e)) => (tonic::Code::from(e.code), e.message.clone()),
        other => panic!("ops[{i}] was not refused: {other:?}"),
    };
    let (code, message) = error(1);
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(message.starts_with("ops[1]: "), "{message}");
    let (code, message) = error(2);
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(message.starts_with("ops[2]: "), "{message}");
    let (code, message) = error(3);
    assert_eq!(code, tonic::Code::NotFound, "{message}");
    // A malformed envelope is refused whole.
    let ops = vec![v1::BatchOp { op: None }; ration_proto::convert::MAX_BATCH_OPS + 1];
    let e = c.batch(v1::BatchRequest { ops }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most"), "{}", e.message());
    cluster.shutdown().await;
}

/// `join` without `join_as` adds the node as a caught-up learner and leaves the
/// voters alone: three voters stay three (a fourth would tolerate no more failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_is_as_a_learner_unless_asked() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    cluster.leader().await;
    create_tree(cluster.addrs[&1]).await;
    let l = inproc::listener().await;
    let addr4 = l.local_addr().unwrap();
    let mut c4 = inproc::config(4, addr4, cluster.dir.path().join("node-4"), &[]);
    c4.join = Some(cluster.addrs[&2].to_string());
    assert_eq!(c4.join_as, "learner", "the default");
    cluster.addrs.insert(4, addr4);
    cluster.nodes.insert(4, ration_server::start(c4, l).await.unwrap());
    eventually("node 4 is a learner", Duration::from_secs(30), || async move {
        ration_testkit::status(addr4)
            .await
            .is_some_and(|s| s.members.iter().any(|m| m.id == 4 && !m.voter))
    })
    .await;
    // Caught up (same state as the voters) and still a learner afterwards.
    cluster.converged().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = ration_testkit::status(cluster.addrs[&1]).await.unwrap();
    let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters, [1, 2, 3], "{:?}", s.members);
    assert!(s.members.iter().any(|m| m.id == 4 && !m.voter), "{:?}", s.members);
    // A bad join_as is refused before anything starts.
    let mut bad = inproc::config(5, addr4, cluster.dir.path().join("node-5"), &[]);
    bad.join = Some(cluster.addrs[&1].to_string());
    bad.join_as = "observer".into();
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("join_as \"observer\" is not learner or voter"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_change_nothing() {
    let cluster = Cluster::start(1, |_| {}).await;
    cluster.leader().await;
    let addr = cluster.addrs[&1];
    create_tree(addr).await;
    let mut c = ledger(addr);
    let before = ration_testkit::status(addr).await.unwrap();

    let cases: Vec<(v1::AcquireRequest, tonic::Code, &str)> = vec![
        (
            v1::AcquireRequest { wanted: -1, ..acquire("bad", 1, 0) },
            tonic::Code::InvalidArgument,
            "wanted must not be negative",
        ),
        (
            v1::AcquireRequest { budget: "acme//x".into(), ..acquire("bad", 2, 5) },
            tonic::Code::InvalidArgument,
            "budget",
        ),
        (
            v1::AcquireRequest { budget: "nope".into(), ..acquire("bad", 3, 5) },
            tonic::Code::NotFound,
            "nope does not exist",
        ),
        (
            v1::AcquireRequest { unit: "usd_micros".into(), ..acquire("bad", 4, 5) },
            tonic::Code::FailedPrecondition,
            "no",
        ),
        (acquire("bad", 5, 600_000), tonic::Code::Ok, ""),
        (
            v1::AcquireRequest { min: 600_000, ..acquire("bad", 6, 600_000) },
            tonic::Code::ResourceExhausted,
            "exhausted",
        ),
        (
            v1::AcquireRequest { meta: None, ..acquire("bad", 7, 5) },
            tonic::Code::InvalidArgument,
            "meta",
        ),
    ];
    for (req, code, text) in cases {
        match c.acquire(req.clone()).await {
            Ok(_) => assert_eq!(code, tonic::Code::Ok, "{req:?} succeeded"),
            Err(s) => {
                assert_eq!(s.code(), code, "{req:?}: {s}");
                assert!(s.message().contains(text), "{req:?}: {s}");
            }
        }
    }
    let err = c
        .report(v1::ReportRequest {
            meta: meta("bad", 8, "gw-1"),
            lease_id: 12345,
            consumed_delta: 1,
            renew_ttl_ms: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

    // An oversized message is refused; the node keeps serving.
    let huge = v1::CreateBudgetRequest {
        meta: meta("bad", 9, "ops"),
        path: "x".repeat(9 << 20),
        limits: vec![],
    };
    let err = c.create_budget(huge).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    let after = ration_testkit::status(addr).await.unwrap();
    assert_eq!(after.budgets, before.budgets);
    assert_eq!(
        after.live_leases,
        before.live_leases + 1,
        "only the one good acquire changed state"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_stock_clients() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let cluster = Cluster::start(1, |_| {}).await;
    let addr = cluster.addrs[&1];
    let health = HealthClient::new(channel(addr));
    // Cluster serves at once; "" and Ledger only once a leader is known.
    let r = health
        .clone()
        .check(HealthCheckRequest { service: "ration.v1.Cluster".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status(), ServingStatus::Serving);
    cluster.leader().await;
    for service in ["", "ration.v1.Ledger", "ration.v1.Cluster"] {
        let health = &health;
        eventually(&format!("{service:?} serving"), Duration::from_secs(5), || async move {
            let r = health
                .clone()
                .check(HealthCheckRequest { service: service.into() })
                .await
                .unwrap()
                .into_inner();
            r.status() == ServingStatus::Serving
        })
        .await;
    }

    let expected =
        ["grpc.health.v1.Health", "ration.v1.Cluster", "ration.v1.Ledger", "ration.v1.Raft"];
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(channel(addr));
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for e in expected {
            assert!(names.iter().any(|n| n == e), "v1 reflection lacks {e}: {names:?}");
        }
    }
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(channel(addr));
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for e in expected {
            assert!(names.iter().any(|n| n == e), "v1alpha reflection lacks {e}: {names:?}");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_through_large_entries() {
    // Entries of about a megabyte (and a debug build): one entry per RPC, and a
    // replication timeout (3/4 of the election timeout) long enough to carry it.
    let mut cluster = Cluster::start(3, |c| {
        c.heartbeat_ms = 400;
        c.election_timeout_min_ms = 2000;
        c.election_timeout_max_ms = 3000;
        c.raft_max_entries_per_rpc = 1;
    })
    .await;
    let leader = cluster.leader().await;
    let addr = cluster.addrs[&leader];
    // Long names make big commands: entries near their byte limit.
    let path = format!("acme/{}", "k".repeat(60));
    let mut c = ledger(addr);
    for (i, p) in ["acme".to_owned(), path.clone()].into_iter().enumerate() {
        c.create_budget(v1::CreateBudgetRequest {
            meta: meta("admin-big", i as u64 + 1, "ops"),
            path: p,
            limits: vec![limit("tokens", 1_000_000_000, Period::Lifetime)],
        })
        .await
        .unwrap();
    }
    let lagging = *cluster.addrs.keys().find(|id| **id != leader).unwrap();
    cluster.stop(lagging).await;

    // 24 batches of 1,024 acquires, 4 at a time, so entries fill to thousands of commands.
    let mut rid = 0u64;
    for round in 0..6 {
        let mut calls = Vec::new();
        for k in 0..4 {
            // One client per batch: each stays inside its exactly-once window.
            let client_id = format!("{round}-{k}-{}", "c".repeat(96));
            let ops = (0..1024)
                .map(|_| {
                    rid += 1;
                    v1::BatchOp {
                        op: Some(v1::batch_op::Op::Acquire(v1::AcquireRequest {
                            meta: meta(&client_id, rid, &"g".repeat(100)),
                            budget: path.clone(),
                            unit: "tokens".into(),
                            wanted: 10,
                            min: 1,
                            ttl_ms: 600_000,
                            starts_at_ms: 0,
                        })),
                    }
                })
                .collect();
            let mut c = ledger(addr);
            calls.push(tokio::spawn(async move {
                c.batch(v1::BatchRequest { ops }).await.unwrap().into_inner()
            }));
        }
        for call in calls {
            let reply = call.await.unwrap();
            assert!(reply
                .results
                .iter()
                .all(|r| matches!(r.result, Some(v1::batch_result::Result::Lease(_)))));
        }
    }
    cluster.restart(lagging).await;
    let statuses = cluster.converged().await;
    assert!(statuses.windows(2).all(|w| w[0].state_digest == w[1].state_digest), "digests differ");
    assert!(statuses.iter().all(|s| s.live_leases == 24 * 1024));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_from_another_cluster_are_refused() {
    let a = Cluster::start(1, |_| {}).await;
    let b = Cluster::start(1, |_| {}).await;
    a.leader().await;
    b.leader().await;
    let (id_a, id_b) = (a.nodes[&1].node.identity.get(), b.nodes[&1].node.identity.get());
    assert!(id_a != 0 && id_b != 0 && id_a != id_b, "each new cluster has its own id");
    let mut raft = ration_proto::v1::raft_client::RaftClient::new(channel(b.addrs[&1]));
    let foreign =
        raft.vote(v1::RaftPayload { data: vec![1, 2, 3], cluster_id: id_a }).await.unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::FailedPrecondition, "{foreign}");
    assert!(foreign.message().contains("cluster"), "{foreign}");
    // Its own cluster's id gets past the check (and this payload then fails to decode).
    let own =
        raft.vote(v1::RaftPayload { data: vec![1, 2, 3], cluster_id: id_b }).await.unwrap_err();
    assert_eq!(own.code(), tonic::Code::InvalidArgument, "{own}");
    a.shutdown().await;
    b.shutdown().await;
}
