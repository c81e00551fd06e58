//! Power cuts under load: three in-process nodes over real loopback gRPC, each
//! with its Raft log in the write-ahead log on a [`MemFs`] that loses every byte
//! not yet synced (and tears the last write) when the test cuts its power. Cuts hit
//! one node, a majority and all nodes, at random moments while clients write. After
//! each, the nodes come back from what their disks kept.
//!
//! Checked: no acknowledged acquire is lost (each is in the ledger's audit trail
//! afterwards, once); no node's vote goes back: the (term, leader) a node reports
//! never decreases, across its power cuts too (a forgotten vote would let it vote
//! again in a term it already voted in, or return to an older term);
//! replicas converge to equal state digests; the audit chain verifies.
//!
//! `RATION_POWER_CUT_SEED=<n>` replays another schedule; `RATION_POWER_CUT_ROUNDS`
//! runs more rounds (scripts use both for long runs).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ration_core::LedgerConfig;
use ration_proto::v1::{self, Period};
use ration_server::{NodeHandle, Storage, SystemClock};
use ration_store::wal::{MemFs, WalLogStore};
use ration_testkit::inproc::{config, listener, rebind};
use ration_testkit::{converged, leader, limit, meta, status_within, until_answered};

/// A tiny deterministic generator (xorshift64*), so a seed replays the schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Node {
    addr: SocketAddr,
    dir: PathBuf,
    fs: Arc<MemFs>,
    handle: Option<NodeHandle>,
}

/// Opens the sled half of a node's storage, waiting for a stopping node's lock.
async fn open_sm(
    dir: &std::path::Path,
) -> (ration_store::StateMachine, ration_store::ClusterIdentity) {
    for _ in 0..100 {
        match ration_store::open(dir, LedgerConfig::default()) {
            Ok((sled_log, sm)) => return (sm, sled_log.identity().unwrap()),
            Err(ration_store::OpenError::Locked { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
    panic!("{} stayed locked", dir.display());
}

async fn start(
    node: &Node,
    id: u64,
    cluster: &[(u64, SocketAddr)],
    l: tokio::net::TcpListener,
) -> NodeHandle {
    let mut cfg = config(id, node.addr, node.dir.clone(), cluster);
    // Snapshots and purges happen during the run, so cuts also land around them.
    cfg.snapshot_after_entries = 200;
    cfg.keep_log_after_snapshot = 50;
    let log = WalLogStore::open(node.fs.clone()).await.unwrap();
    let (sm, identity) = open_sm(&node.dir).await;
    let storage = Storage { reader: sm.reader(), wal: Some(log.stats()), log, sm, identity };
    let incoming = tonic::transport::server::TcpIncoming::from(l);
    ration_server::start_with_storage(
        cfg,
        storage,
        ration_server::Ports::shared(incoming),
        ration_server::network::tcp_channels,
        Arc::new(SystemClock),
        None,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_and_votes_survive_power_cuts() {
    let seed: u64 =
        std::env::var("RATION_POWER_CUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let rounds: usize =
        std::env::var("RATION_POWER_CUT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let root = tempfile::tempdir().unwrap();
    let mut listeners = BTreeMap::new();
    for id in 1..=3u64 {
        listeners.insert(id, listener().await);
    }
    let cluster: Vec<(u64, SocketAddr)> =
        listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap())).collect();
    let addrs: Vec<SocketAddr> = cluster.iter().map(|(_, a)| *a).collect();
    let mut nodes: BTreeMap<u64, Node> = BTreeMap::new();
    for (id, l) in listeners {
        let node = Node {
            addr: l.local_addr().unwrap(),
            dir: root.path().join(format!("node-{id}")),
            // Syncs take time, as on a disk: writes wait unsynced meanwhile, and a
            // cut then loses them.
            fs: MemFs::with_sync_delay(Duration::from_millis(2)),
            handle: None,
        };
        let handle = start(&node, id, &cluster, l).await;
        nodes.insert(id, Node { handle: Some(handle), ..node });
    }
    leader(&addrs).await;
    let create = v1::CreateBudgetRequest {
        meta: meta("admin", 1, "ops"),
        path: "acme".into(),
        limits: vec![limit("tokens", 1_000_000_000, Period::Lifetime)],
    };
    until_answered!(addrs, create_budget, create).unwrap();

    // Clients: acquires, each retried with its request id until answered, so every
    // acknowledged one is known (request id -> lease id).
    let acked: Arc<Mutex<BTreeMap<(usize, u64), u64>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (acked, running, addrs) = (acked.clone(), running.clone(), addrs.clone());
        clients.push(tokio::spawn(async move {
            let mut request_id = 0u64;
            while running.load(Ordering::Relaxed) {
                request_id += 1;
                let req = v1::AcquireRequest {
                    meta: meta(&format!("gw-{c}"), request_id, "gw"),
                    budget: "acme".into(),
                    unit: "tokens".into(),
                    wanted: 1,
                    min: 1,
                    ttl_ms: 3_600_000,
                    starts_at_ms: 0,
                };
                let lease = until_answered!(addrs, acquire, req).unwrap();
                acked.lock().unwrap().insert((c, request_id), lease.lease_id);
            }
        }));
    }
    // Each node's vote as it reports it: (term, leader it follows), in order seen.
    // openraft orders votes by (term, leader id); a node's never goes back. (Two
    // leaders in one term are legal in openraft's default leader-id mode, so that
    // is not what is checked.)
    type Votes = BTreeMap<u64, Vec<(u64, u64)>>;
    let votes: Arc<Mutex<Votes>> = Arc::default();
    let watcher = {
        let (votes, running, addrs) = (votes.clone(), running.clone(), addrs.clone());
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                for a in &addrs {
                    if let Some(s) = status_within(*a, false, Duration::from_millis(200)).await {
                        if let Some(leader) = s.leader {
                            let mut v = votes.lock().unwrap();
                            let seen = v.entry(s.id).or_default();
                            if seen.last() != Some(&(s.term, leader)) {
                                seen.push((s.term, leader));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // The leader alone (down long enough for the others to elect), a follower, a
    // majority, everyone; then at random.
    let mut cuts = BTreeMap::<&str, usize>::new();
    let mut lost_bytes = 0u64;
    for round in 0..rounds {
        let now = leader(&addrs).await;
        let (victims, down_ms): (Vec<u64>, u64) = match round {
            0 => (vec![now], 1500),
            1 => (vec![(1..=3).find(|id| *id != now).unwrap()], rng.below(300)),
            2 => {
                let spare = 1 + rng.below(3);
                ((1..=3).filter(|id| *id != spare).collect(), rng.below(300))
            }
            3 => (vec![1, 2, 3], rng.below(300)),
            _ => ((1..=3).filter(|_| rng.below(2) == 0).collect(), rng.below(1500)),
        };
        if victims.is_empty() {
            continue;
        }
        *cuts.entry(["one node", "a majority", "all nodes"][victims.len() - 1]).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        for id in &victims {
            let node = nodes.get_mut(id).unwrap();
            let torn = (rng.below(2) == 0).then(|| rng.below(64) as usize);
            lost_bytes += node.fs.power_cut(torn);
        }
        for id in &victims {
            let node = nodes.get_mut(id).unwrap();
            // The process dies with its disk: stop whatever still runs of it.
            if let Some(h) = node.handle.take() {
                let _ = h.stop().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(down_ms)).await;
        for id in &victims {
            let node = nodes.get_mut(id).unwrap();
            node.fs.restore();
            let l = rebind(node.addr).await;
            node.handle = Some(start(node, *id, &cluster, l).await);
        }
        leader(&addrs).await;
    }

    // Let the clients make progress after the last cut, then stop them.
    let before = acked.lock().unwrap().len();
    ration_testkit::eventually("writes go on after the cuts", Duration::from_secs(30), || {
        let acked = acked.clone();
        async move { acked.lock().unwrap().len() > before + 20 }
    })
    .await;
    running.store(false, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    watcher.await.unwrap();

    let statuses = converged(&addrs, Duration::from_secs(60)).await;
    let leader_addr = addrs[statuses.iter().position(ration_proto::rpc::is_leader).unwrap_or(0)];
    let granted = ration_testkit::audit_lease_ids(leader_addr, "lease_granted").await;
    let acked = acked.lock().unwrap().clone();
    let missing: Vec<_> = acked.iter().filter(|(_, lease)| !granted.contains(lease)).collect();
    assert!(missing.is_empty(), "acknowledged acquires missing from the ledger: {missing:?}");
    let distinct: BTreeSet<u64> = acked.values().copied().collect();
    assert_eq!(distinct.len(), acked.len(), "two acknowledged acquires share a lease");
    let votes = votes.lock().unwrap().clone();
    for (node, seen) in &votes {
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "node {node}'s vote went back: {seen:?}");
    }
    let terms: BTreeSet<u64> = votes.values().flatten().map(|(t, _)| *t).collect();
    // The audit chain is whole on every node.
    for a in &addrs {
        let records: Vec<ration_core::AuditRecord> = ration_testkit::audit_records(*a)
            .await
            .iter()
            .map(|r| ration_proto::convert::to_core::audit_record(r).unwrap())
            .collect();
        ration_core::audit::verify_chain(records.iter(), ration_core::ChainHead::default())
            .unwrap_or_else(|e| panic!("{a}: the audit chain breaks: {e:?}"));
    }
    let syncs: u64 = nodes.values().map(|n| n.fs.syncs()).sum();
    println!(
        "power cuts (seed {seed}): {cuts:?}; {lost_bytes} unsynced bytes lost; {} acquires acknowledged, all in the ledger; {} terms observed, no node's vote went back; {syncs} syncs",
        acked.len(),
        terms.len()
    );
    for node in nodes.into_values() {
        if let Some(h) = node.handle {
            h.stop().await.unwrap();
        }
    }
}
