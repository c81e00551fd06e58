//! The Pipeline call on a real 3-node cluster: every operation answered once by
//! its tag, the cap held, refusals per operation, exactly once across calls, and
//! operations through a follower forwarded one by one, an oversized message ending
//! the call alone.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;

use ration_proto::v1::{self, batch_op::Op, batch_result::Result as R, Period};
use ration_testkit::inproc::Cluster;
use ration_testkit::{ledger, limit, meta};
use tokio_stream::wrappers::ReceiverStream;

/// An acquire by principal gw, from one of 8 clients (each remembers its last
/// 1,024 requests, so a retry of any of these is still answered exactly once).
fn acquire(budget: &str, request_id: u64) -> Op {
    Op::Acquire(v1::AcquireRequest {
        meta: meta(&format!("gw-{}", request_id % 8), request_id, "gw"),
        budget: budget.into(),
        unit: "tokens".into(),
        wanted: 10,
        min: 1,
        ttl_ms: 600_000,
        starts_at_ms: 0,
    })
}

/// Sends `ops` (tag, operation) on one Pipeline call to `addr`, closes the
/// client's side, and returns every result by tag, checking each tag comes once
/// and the call ends with OK.
async fn pipeline(addr: std::net::SocketAddr, ops: Vec<(u64, Option<Op>)>) -> BTreeMap<u64, R> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut results = ledger(addr).pipeline(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let sending = tokio::spawn(async move {
        for (tag, op) in ops {
            let op = Some(v1::BatchOp { op });
            tx.send(v1::PipelineOp { tag, op }).await.unwrap();
        }
        // `tx` dropped: the client's side is closed.
    });
    let mut by_tag = BTreeMap::new();
    while let Some(r) = results.message().await.expect("the call ends with OK") {
        let result = r.result.and_then(|x| x.result).expect("every result has one");
        assert!(by_tag.insert(r.tag, result).is_none(), "tag {} answered twice", r.tag);
    }
    sending.await.unwrap();
    by_tag
}

/// Budget `acme`: 1,000 tokens a day.
async fn create_acme(addr: std::net::SocketAddr) {
    ledger(addr)
        .create_budget(v1::CreateBudgetRequest {
            meta: meta("ops", 1, "ops"),
            path: "acme".into(),
            limits: vec![limit("tokens", 1_000, Period::Day)],
        })
        .await
        .unwrap();
}

fn error(r: &R) -> (i32, &str) {
    match r {
        R::Error(e) => (e.code, e.message.as_str()),
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_answers_every_operation_once_and_holds_the_cap() {
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let addr = cluster.addrs[&leader];
    create_acme(addr).await;

    // 3,000 acquires of 10 on a cap of 1,000 (three times the in-flight bound),
    // an empty operation and a malformed one.
    let mut ops: Vec<(u64, Option<Op>)> =
        (1..=3_000).map(|r| (r, Some(acquire("acme", r)))).collect();
    ops.push((5_000, None));
    ops.push((5_001, Some(acquire("../acme", 5_001))));
    let results = pipeline(addr, ops).await;
    assert_eq!(results.len(), 3_002);
    let mut granted = 0;
    let mut leases = BTreeMap::new();
    for (tag, r) in results.range(1..=3_000) {
        match r {
            R::Lease(l) => {
                granted += l.granted;
                leases.insert(*tag, l.lease_id);
            }
            other => assert_eq!(error(other).0, tonic::Code::ResourceExhausted as i32, "{other:?}"),
        }
    }
    assert_eq!(granted, 1_000, "the whole cap and no more");
    assert_eq!(leases.len(), 100);
    let (code, message) = error(&results[&5_000]);
    assert_eq!(code, tonic::Code::InvalidArgument as i32);
    assert!(message.contains("op") && !message.starts_with("ops["), "{message}");
    let (code, message) = error(&results[&5_001]);
    assert_eq!(code, tonic::Code::InvalidArgument as i32);
    assert!(message.contains("budget"), "{message}");

    // The ledger's own figures agree.
    let budget = ledger(addr)
        .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((budget.limits[0].consumed, budget.limits[0].outstanding), (0, 1_000));

    // Exactly once across calls: a granted acquire sent again on a new call (same
    // request id, same content) gets the same lease back, and grants nothing more.
    let (&tag, &lease) = leases.iter().next().unwrap();
    let again = pipeline(addr, vec![(1, Some(acquire("acme", tag)))]).await;
    let R::Lease(l) = &again[&1] else { panic!("{:?}", again[&1]) };
    assert_eq!(l.lease_id, lease);
    // The same request id with other content is refused, by the ledger.
    let changed = pipeline(addr, vec![(1, Some(acquire("other", tag)))]).await;
    assert_eq!(error(&changed[&1]).0, tonic::Code::InvalidArgument as i32);

    // Reports and releases on the same call, then the figures.
    let mut ops = Vec::new();
    for (i, (&tag, &lease_id)) in leases.iter().enumerate() {
        let rid = 10_000 + 2 * tag;
        ops.push((
            2 * i as u64,
            Some(Op::Report(v1::ReportRequest {
                meta: meta("gw", rid, "gw"),
                lease_id,
                consumed_delta: 3,
                renew_ttl_ms: None,
            })),
        ));
        ops.push((
            2 * i as u64 + 1,
            Some(Op::Release(v1::ReleaseRequest {
                meta: meta("gw", rid + 1, "gw"),
                lease_id,
                consumed_total: 4,
            })),
        ));
    }
    let results = pipeline(addr, ops).await;
    assert_eq!(results.len(), 200);
    // Each release may finish before its report (results come as they finish, and
    // both were in flight at once): then the report finds the lease gone. Either
    // way the lease ends with 4 consumed.
    for r in results.values() {
        if let R::Error(e) = r {
            assert_eq!(e.code, tonic::Code::NotFound as i32, "{e:?}");
        }
    }
    let budget = ledger(addr)
        .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((budget.limits[0].consumed, budget.limits[0].outstanding), (400, 0));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_through_a_follower_forwards_each_operation() {
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let follower = cluster.addrs[cluster.addrs.keys().find(|id| **id != leader).unwrap()];
    create_acme(follower).await;
    let ops = (1..=50).map(|r| (r, Some(acquire("acme", r)))).collect();
    let results = pipeline(follower, ops).await;
    let leases: std::collections::BTreeSet<u64> = results
        .values()
        .map(|r| match r {
            R::Lease(l) => l.lease_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(leases.len(), 50);
    let budget = ledger(cluster.addrs[&leader])
        .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget.limits[0].outstanding, 500);
    cluster.shutdown().await;
}

/// A message above the node's message limit ends the call with OUT_OF_RANGE,
/// saying so; what was answered before stands, the oversized operation is not
/// run, and a new call works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_the_call_and_nothing_else() {
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.addrs[&cluster.leader().await];
    create_acme(leader).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut results = ledger(leader).pipeline(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let send = |tag: u64, budget: String| v1::PipelineOp {
        tag,
        op: Some(v1::BatchOp { op: Some(acquire(&budget, tag)) }),
    };
    tx.send(send(1, "acme".into())).await.unwrap();
    let first = results.message().await.unwrap().unwrap();
    assert!(matches!(first.result.and_then(|r| r.result), Some(R::Lease(_))), "tag 1 granted");
    // Above the default max_message_bytes (8 MiB).
    tx.send(send(2, "a".repeat(9 << 20))).await.unwrap();
    let status = results.message().await.expect_err("the call ends with an error");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{}", status.message());
    drop(tx);

    let budget = || async {
        ledger(leader)
            .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: true })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(budget().await.limits[0].outstanding, 10, "only tag 1 was run");
    let results = pipeline(leader, vec![(3, Some(acquire("acme", 3)))]).await;
    assert!(matches!(results[&3], R::Lease(_)), "{results:?}");
    assert_eq!(budget().await.limits[0].outstanding, 20);
    cluster.shutdown().await;
}
