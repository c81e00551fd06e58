//! Ledger time is bounded (ration_core::timebound), with default settings:
//! - a leader whose wall clock is 30 s or a year fast (beyond `clock_tolerance_ms`)
//!   does not move ledger time ahead of real time at all (its clock is not used;
//!   ledger time flows with its monotonic clock), hands leadership over, and ledger
//!   time then tracks real time; one 3 s fast (within the tolerance) is followed
//!   up to `clock_slack_ms` and keeps leading;
//! - after the whole cluster was down (here: every clock a day ahead of the log's
//!   time), ledger time catches up to the time a majority of the voters' clocks
//!   agree on.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ration_proto::v1::{self, cluster_client::ClusterClient, Period};
use ration_server::{Clock, Config, OffsetClock, SystemClock};
use ration_testkit::inproc::Cluster;
use ration_testkit::{channel, ledger, meta, status};

const DAY_MS: i64 = 86_400_000;
const YEAR_MS: i64 = 365 * DAY_MS;

/// The test clusters' settings, with the leader's tick at its default (test
/// clusters turn it off), as in production: ticks carry ledger time forward.
fn production_ticks(c: &mut Config) {
    c.tick_ms = Config::default().tick_ms;
}

fn wall_now() -> u64 {
    SystemClock.now_ms()
}

/// The highest ledger time any running node reports.
async fn ledger_time(cluster: &Cluster) -> u64 {
    let mut t = 0;
    for addr in cluster.running() {
        if let Some(s) = status(addr).await {
            t = t.max(s.ledger_time_ms);
        }
    }
    t
}

async fn transfer_to(cluster: &Cluster, to: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader = cluster.leader().await;
        if leader == to {
            return;
        }
        let r = ClusterClient::new(channel(cluster.addrs[&leader]))
            .transfer_leader(v1::TransferLeaderRequest { to })
            .await;
        if r.is_ok_and(|s| s.into_inner().leader == Some(to)) {
            return;
        }
        assert!(Instant::now() < deadline, "leadership did not move to node {to}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn leader_with_a_fast_clock(ahead_ms: i64) {
    let mut cluster = Cluster::start(3, production_ticks).await;
    let slack = Config::default().clock_slack_ms;
    let leader = cluster.leader().await;
    let limit = ration_testkit::limit("tokens", 1_000_000, Period::Minute);
    ledger(cluster.addrs[&leader])
        .create_budget(v1::CreateBudgetRequest {
            meta: meta("clock", 1, "ops"),
            path: "m".into(),
            limits: vec![limit],
        })
        .await
        .unwrap();
    let fast = cluster.addrs.keys().copied().find(|id| *id != leader).unwrap();
    cluster.stop(fast).await;
    let clock = Arc::new(OffsetClock { offset_ms: AtomicI64::new(ahead_ms) });
    cluster.restart_with_clock(fast, clock).await;
    cluster.converged().await;
    transfer_to(&cluster, fast).await;

    // While it leads, and after: ledger time is never more than the slack ahead of
    // real time (a window closes at most that early), however fast its clock; not
    // ahead at all when the clock is beyond the tolerance.
    let mut worst_ahead = i64::MIN;
    let mut followed = i64::MIN;
    let mut stepped_down_at = None;
    let started = Instant::now();
    let mut n = 2;
    while started.elapsed() < Duration::from_secs(12) {
        // Writes carry time stamps too, not only ticks.
        let addr = cluster.addrs[&leader];
        n += 1;
        let _ = ledger(addr)
            .acquire(v1::AcquireRequest {
                meta: meta("clock", n, "gw"),
                budget: "m".into(),
                unit: "tokens".into(),
                wanted: 1,
                min: 1,
                ttl_ms: 1000,
                starts_at_ms: 0,
            })
            .await;
        // Each node's ledger time against real time just after its answer (never
        // more than it really is ahead: the bounds above) and, from answers that
        // came within 50 ms, just before the ask (at most 50 ms more than it is:
        // whether the clock was followed, however slow a loaded machine answers).
        for addr in cluster.running() {
            let asked = wall_now() as i64;
            let Some(s) = status(addr).await else { continue };
            let answered = wall_now() as i64;
            worst_ahead = worst_ahead.max(s.ledger_time_ms as i64 - answered);
            if answered - asked <= 50 {
                followed = followed.max(s.ledger_time_ms as i64 - asked);
            }
        }
        let now_leader = cluster.leader().await;
        if now_leader != fast && stepped_down_at.is_none() {
            stepped_down_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "clock {ahead_ms} ms ahead: ledger time at most {worst_ahead} ms ahead of real time \
         (slack {slack} ms); the fast leader handed over after {stepped_down_at:?}"
    );
    let tolerance = Config::default().clock_tolerance_ms as i64;
    if ahead_ms > tolerance {
        // Not even one slack: a clock beyond the tolerance is not used. The margin
        // is for the test's own readings (ledger time is read before the wall clock).
        assert!(
            worst_ahead <= 250,
            "ledger time ran {worst_ahead} ms ahead of real time under a clock {ahead_ms} ms fast"
        );
        assert!(stepped_down_at.is_some(), "the leader with the wrong clock kept leading");
        let steps = cluster.nodes[&fast].node.metrics.clock_step_downs();
        assert!(steps >= 1, "its step-down is counted");
    } else {
        // Within the tolerance: followed, up to one slack, and it keeps leading.
        assert!(
            worst_ahead <= slack as i64 + 20,
            "ledger time ran {worst_ahead} ms ahead of real time; the slack is {slack} ms"
        );
        // Followed: ahead of real time by a good part of the slack. Not followed,
        // ledger time would be behind real time, so `followed` at most the 50 ms
        // an answer may take. How much of the slack shows depends on how stale the
        // new leader's view of ledger time was when its term began (the entry it
        // had last applied, plus the replication delay): a clean-clone CI run on
        // this 2-core machine saw 442 ms, so the bar is a fifth of the slack.
        assert!(
            followed >= slack as i64 / 5,
            "the clock was not followed: {followed} ms ahead at most (from answers within 50 ms)"
        );
        // Leadership may still move on a loaded machine (an election timeout): what
        // must not happen is a step-down for the clock's sake.
        let steps = cluster.nodes[&fast].node.metrics.clock_step_downs();
        assert_eq!(steps, 0, "a clock within the tolerance is no reason to hand over");
    }
    // Ledger time recovers: a few seconds on, it is within a second of real time.
    let mut recovered = false;
    for _ in 0..100 {
        let t = ledger_time(&cluster).await as i64;
        let real = wall_now() as i64;
        if (t - real).abs() <= 1_100 && t - real <= slack as i64 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "ledger time did not come back to real time");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_three_seconds_fast_moves_ledger_time_by_the_slack_at_most() {
    leader_with_a_fast_clock(3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_thirty_seconds_fast_does_not_move_ledger_time_ahead() {
    leader_with_a_fast_clock(30_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_a_year_fast_does_not_move_ledger_time_ahead() {
    leader_with_a_fast_clock(YEAR_MS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_cluster_wide_outage_ledger_time_catches_up_with_the_voters_clocks() {
    let mut cluster = Cluster::start(3, production_ticks).await;
    let leader = cluster.leader().await;
    let limit = ration_testkit::limit("tokens", 1_000, Period::Day);
    ledger(cluster.addrs[&leader])
        .create_budget(v1::CreateBudgetRequest {
            meta: meta("clock", 1, "ops"),
            path: "d".into(),
            limits: vec![limit],
        })
        .await
        .unwrap();
    cluster.converged().await;
    // Every node down; they come back "a day later": all their clocks agree.
    let ids: Vec<u64> = cluster.addrs.keys().copied().collect();
    for id in &ids {
        cluster.stop(*id).await;
    }
    for id in &ids {
        let clock = Arc::new(OffsetClock { offset_ms: AtomicI64::new(DAY_MS) });
        cluster.restart_with_clock(*id, clock).await;
    }
    let started = Instant::now();
    loop {
        let t = ledger_time(&cluster).await as i64;
        let day_later = wall_now() as i64 + DAY_MS;
        if (t - day_later).abs() <= 1_100 {
            eprintln!("ledger time caught up a day in {:?}", started.elapsed());
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "ledger time {t} did not catch up with the clocks ({day_later})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The day's window rolled: the budget is empty again in the new day.
    let b = ledger(cluster.addrs[&cluster.leader().await])
        .get_budget(v1::GetBudgetRequest { path: "d".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert!(b.limits[0].window_start_ms > wall_now(), "the window is tomorrow's: {b:?}");
    cluster.shutdown().await;
}
