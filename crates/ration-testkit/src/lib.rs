//! Test support shared by the workspace's integration tests.
//!
//! - [`inproc`]: clusters of in-process nodes (`ration_server::start`) on loopback.
//! - [`process`]: real `rationd` processes, spawned, signalled and killed. The test
//!   passes the binary in (`env!("CARGO_BIN_EXE_rationd")` exists only in rationd's
//!   own integration tests).
//! - [`proxy`]: a user-space fault proxy to partition and slow links between
//!   processes.
//! - [`python`]: a venv with pinned PyPI packages, for outside programs.
//! - Here: what both kinds of cluster share: gRPC channels, status, leader and
//!   convergence polling, request metadata and limits, retried requests
//!   ([`until_answered!`]), audit log reads.

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

pub mod inproc;
pub mod process;
pub mod proxy;
pub mod python;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ration_proto::v1;
use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::ledger_client::LedgerClient;
use tonic::transport::Channel;

/// What [`until_answered!`] needs, reachable from any crate that uses the macro.
#[doc(hidden)]
pub mod __private {
    pub use ration_proto::rpc::retryable;
    pub use tokio::time::sleep;
}

/// A channel to `addr` whose calls give up after 3 s.
pub fn channel(addr: SocketAddr) -> Channel {
    channel_within(addr, Duration::from_secs(3))
}

/// A channel to `addr` whose calls give up after `timeout` (connecting, after at most
/// 1 s).
pub fn channel_within(addr: SocketAddr, timeout: Duration) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(1)))
        .connect_lazy()
}

/// A Ledger client on [`channel`].
pub fn ledger(addr: SocketAddr) -> LedgerClient<Channel> {
    LedgerClient::new(channel(addr))
}

/// The node's status with its state digest, or `None` if it does not answer in 3 s.
pub async fn status(addr: SocketAddr) -> Option<v1::StatusReply> {
    status_within(addr, true, Duration::from_secs(3)).await
}

pub async fn status_within(
    addr: SocketAddr,
    digest: bool,
    timeout: Duration,
) -> Option<v1::StatusReply> {
    ClusterClient::new(channel_within(addr, timeout))
        .status(v1::StatusRequest { digest })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The id of the one leader that every node in `addrs` answers with, and that
/// itself leads; waits up to 30 s. Pass only the nodes that run.
pub async fn leader(addrs: &[SocketAddr]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut all = Vec::new();
        for a in addrs {
            match status(*a).await {
                Some(s) => all.push(s),
                None => break,
            }
        }
        if all.len() == addrs.len() {
            if let Some(l) = all.first().and_then(|s| s.leader) {
                let agreed = all.iter().all(|s| s.leader == Some(l));
                if agreed && all.iter().any(|s| s.id == l && ration_proto::rpc::is_leader(s)) {
                    return l;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after 30 s waiting for one leader known to every node of {addrs:?}");
}

/// Waits until every node in `addrs` answers with the same applied index, has
/// applied its whole log, and holds the same state digest; returns their statuses.
/// Equal indexes with different digests fail at once.
pub async fn converged(addrs: &[SocketAddr], within: Duration) -> Vec<v1::StatusReply> {
    let deadline = Instant::now() + within;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let mut all = Vec::new();
        for a in addrs {
            if let Some(s) = status(*a).await {
                all.push(s);
            }
        }
        if all.len() == addrs.len()
            && all.iter().all(|s| {
                s.applied_index == all[0].applied_index && s.last_log_index == s.applied_index
            })
        {
            let digests: BTreeSet<&[u8]> = all.iter().map(|s| &s.state_digest[..]).collect();
            assert!(
                digests.len() == 1,
                "replicas DIVERGED: different state digests at applied index {}: {:?}",
                all[0].applied_index,
                all.iter().map(|s| (s.id, hex(&s.state_digest))).collect::<Vec<_>>()
            );
            return all;
        }
        last = all
            .iter()
            .map(|s| {
                (s.id, ration_proto::rpc::role_name(s.role()), s.applied_index, s.last_log_index)
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "nodes did not converge within {within:?}; last seen (id, role, applied, last log): \
         {last:?} ({} of {} answered)",
        last.len(),
        addrs.len()
    );
}

/// Polls until `check` passes or the deadline ends.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Waits, if need be, until the current UTC minute has at least `needed` left
/// (at most 30 s). A test that checks a per-minute window's figures over several
/// calls must see one window: at a minute boundary the ledger opens a new one,
/// whose figures start again from zero. Ledger time is the leader's clock, which
/// is this machine's in a test.
pub async fn clear_of_a_minute_boundary(needed: Duration) {
    assert!(needed <= Duration::from_secs(30), "a test needing {needed:?} of one minute");
    if let Some(wait) = wait_for_a_boundary(Duration::from_secs(60), needed) {
        tokio::time::sleep(wait).await;
    }
}

/// How much of the current UTC day a test that starts a cluster needs left: see
/// [`wait_for_a_new_day`].
pub const DAY_BOUNDARY_GUARD: Duration = Duration::from_secs(180);

/// How long to wait, if at all, so that a test starts with at least
/// [`DAY_BOUNDARY_GUARD`] of the current UTC day left: into the next day when
/// less is left. Tests check caps of daily, weekly and monthly windows, and each
/// of those windows ends at a UTC midnight: a test running across one would see
/// its budget's figures start again from zero. Starting a cluster waits this long
/// ([`inproc::Cluster::start`], a process's first spawn), so a test that starts in
/// a day's last three minutes starts after midnight instead.
pub fn wait_for_a_new_day() -> Option<Duration> {
    let wait = wait_for_a_boundary(Duration::from_secs(86_400), DAY_BOUNDARY_GUARD)?;
    eprintln!("waiting {wait:?} for a new UTC day: this test's windows must not end during it");
    Some(wait)
}

/// How long to wait until the current UTC `period` (a minute, a day: each starts
/// at a multiple of its length since the epoch) has at least `needed` left, if it
/// has less.
fn wait_for_a_boundary(period: Duration, needed: Duration) -> Option<Duration> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    wait_at(now, period, needed)
}

/// [`wait_for_a_boundary`] at `now` (since the epoch).
fn wait_at(now: Duration, period: Duration, needed: Duration) -> Option<Duration> {
    let into =
        Duration::from_millis(u64::try_from(now.as_millis() % period.as_millis()).unwrap_or(0));
    let left = period.saturating_sub(into);
    // A little past the boundary: the leader's time stamps may lag this clock.
    (left < needed).then(|| left + Duration::from_millis(200))
}

/// Request metadata: exactly-once client and request id, and the principal.
pub fn meta(client: &str, request_id: u64, principal: &str) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        client_id: client.into(),
        request_id,
        principal: principal.into(),
        ..Default::default()
    })
}

/// A limit of `cap` per `period`, failing closed.
pub fn limit(unit: &str, cap: i64, period: v1::Period) -> v1::Limit {
    v1::Limit {
        unit: unit.into(),
        cap,
        window: Some(v1::Window { period: period as i32, offset_minutes: 0 }),
        static_allowance: None,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends a Ledger request until it gets a definite answer, rotating through the
/// nodes `$addrs` and keeping its request id: exactly-once makes every retry safe.
/// Gives up (panics) after 60 s without one. Evaluates to `Result<reply, Status>`.
#[macro_export]
macro_rules! until_answered {
    ($addrs:expr, $method:ident, $req:expr) => {{
        let started = ::std::time::Instant::now();
        let mut attempt = 0usize;
        loop {
            let addr = $addrs[attempt % $addrs.len()];
            match $crate::ledger(addr).$method($req.clone()).await {
                Ok(r) => break Ok(r.into_inner()),
                Err(s) if $crate::__private::retryable(&s) => {
                    attempt += 1;
                    assert!(
                        started.elapsed() < ::std::time::Duration::from_secs(60),
                        "no answer in 60 s ({attempt} attempts): {s}"
                    );
                    $crate::__private::sleep(::std::time::Duration::from_millis(50)).await;
                }
                Err(s) => break Err(s),
            }
        }
    }};
}

/// Creates a budget with one lifetime limit of `cap` tokens, failing closed (a
/// cut-off gateway spends its leases and nothing more), retried until answered.
pub async fn create_lifetime_budget(addrs: &[SocketAddr], request_id: u64, path: &str, cap: i64) {
    let req = v1::CreateBudgetRequest {
        meta: meta("chaos-admin", request_id, "ops"),
        path: path.into(),
        limits: vec![limit("tokens", cap, v1::Period::Lifetime)],
    };
    until_answered!(addrs, create_budget, req).unwrap();
}

/// Lease ids of one kind of audit record on one node (its own records).
pub async fn audit_lease_ids(addr: SocketAddr, kind: &str) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    let mut from = 0;
    loop {
        let page = ledger(addr)
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

/// Every audit record one node has applied, from record 0, read from that node
/// alone (`linearizable: false`).
pub async fn audit_records(addr: SocketAddr) -> Vec<v1::AuditRecord> {
    let mut all = Vec::new();
    let mut from = 0;
    loop {
        let page = LedgerClient::new(channel_within(addr, Duration::from_secs(20)))
            .query_audit(v1::QueryAuditRequest {
                from_seq: from,
                limit: 1000,
                linearizable: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.records.is_empty() {
            return all;
        }
        all.extend(page.records);
        from = page.next_seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_only_when_too_little_of_the_period_is_left() {
        let day = Duration::from_secs(86_400);
        let guard = DAY_BOUNDARY_GUARD;
        // 2026-12-05 00:00:00 UTC, and moments around the next midnight.
        let midnight = Duration::from_secs(1_796_428_800);
        assert_eq!(midnight.as_secs() % 86_400, 0);
        assert_eq!(wait_at(midnight, day, guard), None, "a whole day left");
        assert_eq!(wait_at(midnight + day - guard, day, guard), None, "exactly the guard left");
        let late = midnight + day - Duration::from_secs(10);
        assert_eq!(wait_at(late, day, guard), Some(Duration::from_millis(10_200)));
        let last_ms = midnight + day - Duration::from_millis(1);
        assert_eq!(wait_at(last_ms, day, guard), Some(Duration::from_millis(201)));
        // A minute: 58.6 s in with 15 s needed waits 1.4 s and a little.
        let minute = Duration::from_secs(60);
        let at = midnight + Duration::from_millis(58_600);
        assert_eq!(
            wait_at(at, minute, Duration::from_secs(15)),
            Some(Duration::from_millis(1_600))
        );
        assert_eq!(
            wait_at(midnight + Duration::from_secs(30), minute, Duration::from_secs(15)),
            None
        );
    }
}
