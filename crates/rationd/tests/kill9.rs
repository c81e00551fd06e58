//! Three `rationd` processes; a client writes while a follower and then the leader
//! are killed with SIGKILL and restarted from their data directories. Afterwards
//! every acknowledged write is on every node, and the cap holds.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ration_proto::v1;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_testkit::process::{free_addrs, initial_cluster, Proc};
use ration_testkit::{
    audit_lease_ids, channel, converged, create_lifetime_budget, leader, meta, until_answered,
};

const CAP: i64 = 40_000;

/// The tests here start processes on ports they chose and then released; run them
/// one at a time so two clusters can never end up on the same port.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Acked {
    /// lease id -> granted
    granted: BTreeMap<u64, i64>,
    /// lease id -> consumed total
    released: BTreeMap<u64, i64>,
    refused_exhausted: u64,
}

async fn writer(addrs: Vec<SocketAddr>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let mut request_id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        request_id += 1;
        let acquire = v1::AcquireRequest {
            meta: meta("chaos-writer", request_id, "gw-chaos"),
            budget: "acme/k".into(),
            unit: "tokens".into(),
            wanted: 25,
            min: 1,
            ttl_ms: 120_000,
            starts_at_ms: 0,
        };
        let lease = match until_answered!(addrs, acquire, acquire) {
            Ok(l) => l,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                acked.lock().unwrap().refused_exhausted += 1;
                continue;
            }
            Err(s) => panic!("acquire refused: {s}"),
        };
        let n = {
            let mut a = acked.lock().unwrap();
            a.granted.insert(lease.lease_id, lease.granted);
            a.granted.len()
        };
        // Half the leases are settled, half stay live to the end.
        if n % 2 == 0 {
            request_id += 1;
            let total = lease.granted / 2;
            let release = v1::ReleaseRequest {
                meta: meta("chaos-writer", request_id, "gw-chaos"),
                lease_id: lease.lease_id,
                consumed_total: total,
            };
            until_answered!(addrs, release, release).unwrap();
            acked.lock().unwrap().released.insert(lease.lease_id, total);
        }
    }
}

fn dirs(root: &Path, n: u64) -> Vec<PathBuf> {
    (1..=n).map(|i| root.join(format!("node-{i}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_a_follower_and_the_leader() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().unwrap();
    let addrs = free_addrs(3);
    let cluster = initial_cluster(&addrs);
    let mut procs: Vec<Proc> = dirs(root.path(), 3)
        .into_iter()
        .enumerate()
        .map(|(i, dir)| {
            Proc::new(env!("CARGO_BIN_EXE_rationd"), i as u64 + 1, addrs[i], dir, cluster.clone())
        })
        .collect();
    for p in &mut procs {
        p.spawn();
    }
    leader(&addrs).await;
    for (i, path) in ["acme", "acme/k"].into_iter().enumerate() {
        create_lifetime_budget(&addrs, i as u64 + 1, path, CAP).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let writing = tokio::spawn(writer(addrs.clone(), stop.clone(), acked.clone()));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let first_leader = leader(&addrs).await;
    let follower = procs.iter().position(|p| p.id != first_leader).unwrap();
    procs[follower].kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader_now = leader(&[addrs[(follower + 1) % 3], addrs[(follower + 2) % 3]]).await;
    let leader_index = procs.iter().position(|p| p.id == leader_now).unwrap();
    procs[follower].spawn();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    procs[leader_index].kill9();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    procs[leader_index].spawn();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();

    let statuses = converged(&addrs, Duration::from_secs(60)).await;
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.granted.len() > 50,
        "the writer made progress through the faults: {}",
        acked.granted.len()
    );
    for (addr, s) in addrs.iter().zip(&statuses) {
        let granted = audit_lease_ids(*addr, "lease_granted").await;
        let missing: Vec<_> = acked.granted.keys().filter(|id| !granted.contains(id)).collect();
        assert!(missing.is_empty(), "node {} lost acknowledged leases {missing:?}", s.id);
        for id in acked.granted.keys().filter(|id| !acked.released.contains_key(id)) {
            let info = LedgerClient::new(channel(*addr))
                .get_lease(v1::GetLeaseRequest { lease_id: *id, linearizable: false })
                .await;
            assert!(info.is_ok(), "node {} lost live lease {id}: {info:?}", s.id);
        }
        let released = audit_lease_ids(*addr, "lease_released").await;
        let missing: Vec<_> = acked.released.keys().filter(|id| !released.contains(id)).collect();
        assert!(missing.is_empty(), "node {} lost acknowledged releases {missing:?}", s.id);
        for path in ["acme", "acme/k"] {
            let b = LedgerClient::new(channel(*addr))
                .get_budget(v1::GetBudgetRequest { path: path.into(), linearizable: false })
                .await
                .unwrap()
                .into_inner();
            let l = &b.limits[0];
            assert!(l.consumed + l.outstanding <= CAP, "cap broken on node {}: {l:?}", s.id);
            // What the client saw granted and not released is still held or consumed.
            let held: i64 = acked
                .granted
                .iter()
                .filter(|(id, _)| !acked.released.contains_key(id))
                .map(|(_, g)| g)
                .sum();
            let consumed: i64 = acked.released.values().sum();
            assert!(
                l.outstanding + l.consumed >= held + consumed,
                "node {} lost allowance: {l:?}",
                s.id
            );
        }
    }
    eprintln!(
        "acknowledged {} grants and {} releases across kill -9 of a follower and the leader; {} exhausted refusals; applied index {}",
        acked.granted.len(),
        acked.released.len(),
        acked.refused_exhausted,
        statuses[0].applied_index
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_and_state_survives() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().unwrap();
    let addr = free_addrs(1)[0];
    let mut p = Proc::new(
        env!("CARGO_BIN_EXE_rationd"),
        1,
        addr,
        root.path().join("node-1"),
        format!("1={addr}"),
    );
    p.spawn();
    leader(&[addr]).await;
    let req = v1::CreateBudgetRequest {
        meta: meta("term-admin", 1, "gw-chaos"),
        path: "kept".into(),
        limits: vec![],
    };
    until_answered!([addr], create_budget, req).unwrap();
    let mut child = p.child.take().unwrap();
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "rationd did not exit within 15 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "rationd exited with {exit}");
    // Restarted from the same directory, it still has the budget.
    p.spawn();
    leader(&[addr]).await;
    let b = LedgerClient::new(channel(addr))
        .get_budget(v1::GetBudgetRequest { path: "kept".into(), linearizable: true })
        .await
        .unwrap();
    assert_eq!(b.into_inner().path, "kept");
}
