//! A node whose Raft core stops on its own is not left running: `supervise` (what
//! `ration_server::run`, and so `rationd`, uses) returns an error naming why, so
//! the process exits non-zero and its supervisor restarts it. Driven through the
//! storage seam: a node on an in-memory disk that then fails, over real loopback
//! gRPC. (`crates/rationd/tests/core_stop.rs` does it to a real process whose
//! disk fills up.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use ration_core::LedgerConfig;
use ration_proto::v1::{self, Period};
use ration_server::{CoreStopped, Storage, SystemClock};
use ration_store::mem::MemDisk;
use ration_testkit::inproc::{config, listener};
use ration_testkit::{eventually, ledger, limit, meta};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_core_stops_is_reported_and_supervise_returns_an_error() {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, addr, dir.path().into(), &[(1, addr)]);
    let disk = MemDisk::default();
    let (log, sm, identity) = disk.open(Duration::from_millis(1), LedgerConfig::default()).unwrap();
    let reader = sm.reader();
    let incoming = tonic::transport::server::TcpIncoming::from(l);
    let handle = ration_server::start_with_storage(
        cfg,
        Storage { log, sm, reader, identity, wal: None },
        ration_server::Ports::shared(incoming),
        ration_server::network::tcp_channels,
        Arc::new(SystemClock),
        None,
    )
    .await
    .unwrap();
    let node = handle.node.clone();
    eventually("the node leads", Duration::from_secs(10), || {
        let node = node.clone();
        async move { node.is_leader() }
    })
    .await;
    ledger(addr)
        .create_budget(v1::CreateBudgetRequest {
            meta: meta("admin", 1, "ops"),
            path: "acme".into(),
            limits: vec![limit("tokens", 1_000, Period::Month)],
        })
        .await
        .unwrap();

    // While the core runs, nothing is reported.
    let quiet = tokio::time::timeout(Duration::from_millis(300), handle.core_stopped()).await;
    assert!(quiet.is_err(), "a running core was reported stopped: {quiet:?}");

    let supervised = tokio::spawn(ration_server::supervise(handle, std::future::pending()));
    // The disk dies: the next write fails in the log store, which openraft treats
    // as fatal.
    disk.set_failing(true);
    let write = ledger(addr)
        .create_budget(v1::CreateBudgetRequest {
            meta: meta("admin", 2, "ops"),
            path: "acme/search".into(),
            limits: vec![],
        })
        .await;
    assert!(write.is_err(), "a write on a failed disk succeeded: {write:?}");
    let result = tokio::time::timeout(Duration::from_secs(10), supervised)
        .await
        .expect("supervise did not return within 10 s of the core stopping")
        .unwrap();
    let error = result.expect_err("supervise returned Ok for a stopped core");
    let stopped = error.downcast_ref::<CoreStopped>().expect("the error is CoreStopped");
    assert!(
        stopped.reason.contains("simulated disk failure"),
        "the reason does not say what failed: {stopped}"
    );
    // And the node stopped serving: its port no longer answers.
    let after = tokio::time::timeout(
        Duration::from_secs(3),
        ledger(addr).get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: false }),
    )
    .await;
    assert!(!matches!(after, Ok(Ok(_))), "the stopped node still answers: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_shutdown_is_not_a_core_failure() {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, addr, dir.path().into(), &[(1, addr)]);
    let handle = ration_server::start(cfg, l).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let supervised = tokio::spawn(ration_server::supervise(handle, async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), supervised).await.unwrap().unwrap();
    assert!(result.is_ok(), "a clean shutdown returned {result:?}");
}
