//! Voters far apart: three `rationd` processes, each behind a user-space proxy
//! (`ration_testkit::proxy`, [`Fault::Wan`]) that delays every byte between two
//! nodes by 150 ms one way, so every Raft round trip costs 300 ms (about US East
//! to Asia-Pacific). The client (this test) sits next to every node.
//!
//! With `--voter-rtt-ms 300` and nothing else, the cluster forms, commits, serves
//! linearizable reads, and keeps its leader while writers keep it busy. With openraft 0.9's own timing
//! (the AppendEntries deadline equal to a 250 ms heartbeat: what Ration had before
//! the deadline was decoupled) the same layout commits nothing, so the proxy does
//! delay what it says. With a deadline long enough to commit but under twice the
//! round trip, the leader logs the warning that names `voter_rtt_ms`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ration_proto::v1;
use ration_testkit::process::{free_addrs, initial_cluster, Proc};
use ration_testkit::proxy::{Fault, Faults, Link};
use ration_testkit::{channel_within, meta};

const NODES: usize = 3;
const ONE_WAY_MS: u64 = 150;

struct Wan {
    _root: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    procs: Vec<Proc>,
    _faults: Arc<Faults>,
}

impl Drop for Wan {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill9();
        }
    }
}

/// Three nodes 300 ms apart (round trip), started with `args`.
async fn start(args: &[&str]) -> Wan {
    let root = tempfile::tempdir().unwrap();
    let real = free_addrs(NODES);
    let faults = Faults::start(real.clone()).await;
    for src in 0..NODES {
        for dst in (0..NODES).filter(|d| *d != src) {
            faults.set(src, dst, Fault::Wan(Link::delay_ms(ONE_WAY_MS)));
        }
    }
    let addrs = faults.addrs.clone();
    let cluster = initial_cluster(&addrs);
    let mut procs: Vec<Proc> = (0..NODES)
        .map(|i| {
            let mut p = Proc::new(
                env!("CARGO_BIN_EXE_rationd"),
                i as u64 + 1,
                real[i],
                root.path().join(format!("n{}", i + 1)),
                cluster.clone(),
            );
            p.advertise = Some(addrs[i]);
            p.args.extend(args.iter().map(|s| s.to_string()));
            p
        })
        .collect();
    for (i, p) in procs.iter_mut().enumerate() {
        p.spawn();
        faults.set_pid(i, p.pid());
    }
    Wan { _root: root, addrs, procs, _faults: faults }
}

fn acquire(id: u64, client: &str, budget: &str) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: meta(client, id, "wan"),
        budget: budget.into(),
        unit: "tokens".into(),
        wanted: 1,
        min: 1,
        ttl_ms: 60_000,
        starts_at_ms: 0,
    }
}

/// The first budget creation that commits, or None within `within`.
async fn first_commit(addrs: &[SocketAddr], within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut at = 0usize;
    while started.elapsed() < within {
        let mut client = v1::ledger_client::LedgerClient::new(channel_within(
            addrs[at % NODES],
            Duration::from_secs(5),
        ));
        let r = client
            .create_budget(v1::CreateBudgetRequest {
                meta: meta("wan-admin", 1, "wan"),
                path: "w".into(),
                limits: vec![ration_testkit::limit("tokens", 1 << 40, v1::Period::Lifetime)],
            })
            .await;
        match r {
            Ok(_) => return Some(started.elapsed()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Some(started.elapsed()),
            Err(_) => at += 1,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_300_ms_apart_form_commit_and_keep_their_leader_under_load() {
    let wan = start(&["--voter-rtt-ms", "300"]).await;
    let formed = first_commit(&wan.addrs, Duration::from_secs(60)).await;
    let formed = formed.unwrap_or_else(|| {
        panic!("nothing committed in 60 s; node 1 log:\n{}", wan.procs[0].log_tail(30))
    });
    eprintln!("first commit {} ms after start", formed.as_millis());
    let leader = ration_testkit::leader(&wan.addrs).await;
    let leader_addr = wan.addrs[usize::try_from(leader).unwrap() - 1];
    let term = ration_testkit::status(leader_addr).await.unwrap().term;

    // One write pays a round trip to a follower at least: the proxy delays.
    let mut client =
        v1::ledger_client::LedgerClient::new(channel_within(leader_addr, Duration::from_secs(10)));
    let t = Instant::now();
    client.acquire(acquire(2, "wan-probe", "w")).await.unwrap();
    let one = t.elapsed();
    assert!(one >= Duration::from_millis(2 * ONE_WAY_MS), "a commit took only {one:?}");
    // A linearizable read: the leader confirms it still leads with a round of
    // AppendEntries, which must be given more than a heartbeat interval.
    let read = client
        .get_budget(v1::GetBudgetRequest { path: "w".into(), linearizable: true })
        .await
        .unwrap_or_else(|s| panic!("a linearizable read at 300 ms RTT: {s:?}"));
    assert_eq!(read.into_inner().path, "w");

    // 20 s of writers keeping the leader busy: every write commits, and the leader
    // stays (no election: the term does not move).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut id = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let ops = (0..64)
                        .map(|_| {
                            id += 1;
                            v1::BatchOp {
                                op: Some(v1::batch_op::Op::Acquire(acquire(
                                    id,
                                    &format!("wan-writer-{w}"),
                                    "w",
                                ))),
                            }
                        })
                        .collect();
                    match client.batch(v1::BatchRequest { ops }).await {
                        Ok(r) => {
                            let r = r.into_inner().results;
                            let good = r
                                .iter()
                                .filter(|x| {
                                    matches!(x.result, Some(v1::batch_result::Result::Lease(_)))
                                })
                                .count() as u64;
                            ok.fetch_add(good, Ordering::Relaxed);
                            failed.fetch_add(r.len() as u64 - good, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(64, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let after = ration_testkit::status(leader_addr).await.unwrap();
    eprintln!(
        "20 s of writers at 300 ms RTT: {ok} acquires committed ({:.0}/s), {failed} failed; \
         term {term} -> {}",
        ok as f64 / 20.0,
        after.term
    );
    assert_eq!(failed, 0, "every write commits");
    assert!(ok > 0);
    assert_eq!(after.term, term, "no election under load");
    assert!(ration_proto::rpc::is_leader(&after), "node {leader} still leads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_append_entries_deadline_at_the_heartbeat_voters_300_ms_apart_commit_nothing() {
    // openraft 0.9's own timing: every AppendEntries has one 250 ms heartbeat
    // interval to come back, less than the round trip.
    let wan = start(&[
        "--heartbeat-ms",
        "250",
        "--replication-timeout-ms",
        "250",
        "--leader-lease-ms",
        "2000",
        "--election-timeout-min-ms",
        "1000",
        "--election-timeout-max-ms",
        "2000",
    ])
    .await;
    let formed = first_commit(&wan.addrs, Duration::from_secs(15)).await;
    assert_eq!(formed, None, "a write committed although every AppendEntries times out");
}

/// A cluster whose timings are too short for its distance, but not so short that
/// nothing commits (AppendEntries deadline 500 ms, round trip 300 ms): it forms,
/// and the leader warns that heartbeats take more than half the deadline, naming
/// `voter_rtt_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_warns_when_heartbeats_take_more_than_half_the_deadline() {
    let wan = start(&[
        "--replication-timeout-ms",
        "500",
        "--leader-lease-ms",
        "1000",
        "--election-timeout-min-ms",
        "1200",
        "--election-timeout-max-ms",
        "1600",
    ])
    .await;
    let formed = first_commit(&wan.addrs, Duration::from_secs(60)).await;
    assert!(formed.is_some(), "nothing committed; node 1 log:\n{}", wan.procs[0].log_tail(30));
    let leader = ration_testkit::leader(&wan.addrs).await;
    let proc = &wan.procs[usize::try_from(leader).unwrap() - 1];
    let started = Instant::now();
    let mut warned = false;
    while !warned && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log: String =
            proc.logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect();
        warned = log.contains("more than half the AppendEntries deadline (500 ms)")
            && log.contains("set voter_rtt_ms");
    }
    eprintln!("warned {:?} after the first commit", started.elapsed());
    assert!(warned, "no heartbeat warning in the leader's log:\n{}", proc.log_tail(20));
}
