//! Three `rationd` processes; a client writes while a follower and then the leader
//! are killed with SIGKILL and restarted from their data directories. Afterwards
//! every acknowledged write is on every node, and the cap holds.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_proto::v1::{self, Period};
use tonic::transport::Channel;

const CAP: i64 = 40_000;

struct Proc {
    id: u64,
    addr: SocketAddr,
    dir: PathBuf,
    cluster: String,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.with_extension(format!("log{}", rand_suffix())))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rationd"))
            .args(["--node-id", &self.id.to_string(), "--listen", &self.addr.to_string()])
            .args(["--data-dir", self.dir.to_str().unwrap(), "--initial-cluster", &self.cluster])
            .args(["--tick-ms", "200", "--snapshot-after-entries", "300"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("RATION_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// `n` distinct free loopback addresses: all listeners stay bound until every port
/// is chosen, so the kernel cannot hand the same one out twice.
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<_> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// The tests here start processes on ports they chose and then released; run them
/// one at a time so two clusters can never end up on the same port.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy()
}

async fn status(addr: SocketAddr) -> Option<v1::StatusReply> {
    ClusterClient::new(channel(addr))
        .status(v1::StatusRequest { digest: true })
        .await
        .ok()
        .map(|r| r.into_inner())
}

async fn leader(addrs: &[SocketAddr]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for a in addrs {
            if let Some(s) = status(*a).await {
                if s.role == "leader" {
                    return s.id;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader within 30 s");
}

fn meta(client: &str, request_id: u64) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta { client_id: client.into(), request_id, principal: "gw-chaos".into() })
}

/// Sends a request until it gets a definite answer, rotating through the nodes and
/// keeping its request id: exactly-once makes every retry safe.
macro_rules! until_answered {
    ($addrs:expr, $method:ident, $req:expr) => {{
        let mut attempt = 0usize;
        loop {
            let addr = $addrs[attempt % $addrs.len()];
            match LedgerClient::new(channel(addr)).$method($req.clone()).await {
                Ok(r) => break Ok(r.into_inner()),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Internal
                    ) =>
                {
                    attempt += 1;
                    assert!(attempt < 400, "no answer after {attempt} attempts: {s}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => break Err(s),
            }
        }
    }};
}

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
            meta: meta("chaos-writer", request_id),
            budget: "acme/k".into(),
            unit: "tokens".into(),
            wanted: 25,
            min: 1,
            ttl_ms: 120_000,
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
                meta: meta("chaos-writer", request_id),
                lease_id: lease.lease_id,
                consumed_total: total,
            };
            until_answered!(addrs, release, release).unwrap();
            acked.lock().unwrap().released.insert(lease.lease_id, total);
        }
    }
}

async fn converged(addrs: &[SocketAddr]) -> Vec<v1::StatusReply> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut all = Vec::new();
        for a in addrs {
            if let Some(s) = status(*a).await {
                all.push(s);
            }
        }
        if all.len() == addrs.len()
            && all.iter().all(|s| {
                s.applied_index == all[0].applied_index && s.state_digest == all[0].state_digest
            })
        {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nodes did not converge within 60 s");
}

async fn audit_lease_ids(addr: SocketAddr, kind: &str) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    let mut from = 0;
    loop {
        let page = LedgerClient::new(channel(addr))
            .query_audit(v1::QueryAuditRequest {
                kinds: vec![kind.into()],
                from_seq: from,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.records.is_empty() {
            return ids;
        }
        ids.extend(page.records.iter().map(|r| r.lease_id));
        from = page.next_seq;
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
    let cluster = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs: Vec<Proc> = dirs(root.path(), 3)
        .into_iter()
        .enumerate()
        .map(|(i, dir)| Proc {
            id: i as u64 + 1,
            addr: addrs[i],
            dir,
            cluster: cluster.clone(),
            child: None,
        })
        .collect();
    for p in &mut procs {
        p.spawn();
    }
    leader(&addrs).await;
    for (i, (path, cap)) in [("acme", CAP), ("acme/k", CAP)].into_iter().enumerate() {
        let req = v1::CreateBudgetRequest {
            meta: meta("chaos-admin", i as u64 + 1),
            path: path.into(),
            limits: vec![v1::Limit {
                unit: "tokens".into(),
                cap,
                window: Some(v1::Window { period: Period::Lifetime as i32, offset_minutes: 0 }),
                static_allowance: None,
            }],
        };
        until_answered!(addrs, create_budget, req).unwrap();
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

    let statuses = converged(&addrs).await;
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
    let mut p = Proc {
        id: 1,
        addr,
        dir: root.path().join("node-1"),
        cluster: format!("1={addr}"),
        child: None,
    };
    p.spawn();
    leader(&[addr]).await;
    let req = v1::CreateBudgetRequest {
        meta: meta("term-admin", 1),
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
