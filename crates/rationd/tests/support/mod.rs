//! Helpers for tests that run real `rationd` processes: spawning and killing them,
//! picking ports, asking who leads, waiting for convergence, reading audit logs;
//! and a user-space fault proxy ([`proxy`]) to partition and slow their links.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a part of this

pub mod proxy;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ration_proto::v1;
use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::ledger_client::LedgerClient;
use tonic::transport::Channel;

/// One `rationd` process, restartable from its data directory.
pub struct Proc {
    pub id: u64,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it tells peers and clients to use (`--advertise`), if not `addr`.
    pub advertise: Option<SocketAddr>,
    pub dir: PathBuf,
    /// `--initial-cluster`.
    pub cluster: String,
    /// Further flags.
    pub args: Vec<String>,
    pub child: Option<Child>,
    /// The stderr log of every incarnation, oldest first.
    pub logs: Vec<PathBuf>,
}

impl Proc {
    /// A node with the flags the process tests share: a tick every 200 ms and a
    /// snapshot every 300 entries, so restarts go through snapshots too.
    pub fn new(id: u64, addr: SocketAddr, dir: PathBuf, cluster: String) -> Self {
        let args = ["--tick-ms", "200", "--snapshot-after-entries", "300"];
        Self {
            id,
            addr,
            advertise: None,
            dir,
            cluster,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            logs: Vec::new(),
        }
    }

    pub fn spawn(&mut self) {
        let path = self.dir.with_extension(format!("log{}", self.logs.len()));
        let log = std::fs::File::create(&path).unwrap();
        self.logs.push(path);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rationd"));
        cmd.args(["--node-id", &self.id.to_string(), "--listen", &self.addr.to_string()])
            .args(["--data-dir", self.dir.to_str().unwrap(), "--initial-cluster", &self.cluster])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(&self.args);
        if let Some(a) = self.advertise {
            cmd.args(["--advertise", &a.to_string()]);
        }
        // RATION_TEST_LOG (e.g. `info,openraft=info`) makes the nodes' logs verbose.
        let filter = std::env::var("RATION_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let child =
            cmd.env("RATION_LOG", filter).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL (also ends a stopped process)
            c.wait().unwrap();
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) with kill(1).
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let ok = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
            assert!(ok.unwrap().success(), "kill -{name} {pid} failed");
        }
    }

    /// The last `n` lines of each incarnation's log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for (i, path) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- node {} incarnation {i} ({} lines, {}) ---\n",
                self.id,
                lines.len(),
                path.display()
            ));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `n` distinct free loopback addresses: all listeners stay bound until every port
/// is chosen, so the kernel cannot hand the same one out twice.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<_> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// `1=addr1,2=addr2,...` for `--initial-cluster`.
pub fn initial_cluster(addrs: &[SocketAddr]) -> String {
    addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",")
}

pub fn channel(addr: SocketAddr) -> Channel {
    channel_within(addr, Duration::from_secs(3))
}

pub fn channel_within(addr: SocketAddr, timeout: Duration) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(1)))
        .connect_lazy()
}

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

/// The id of a node that sees itself lead, within 30 s.
pub async fn leader(addrs: &[SocketAddr]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for a in addrs {
            if let Some(s) = status(*a).await {
                if ration_proto::rpc::is_leader(&s) {
                    return s.id;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader within 30 s");
}

pub fn meta(client: &str, request_id: u64) -> Option<v1::RequestMeta> {
    meta_as(client, "gw-chaos", request_id)
}

pub fn meta_as(client: &str, principal: &str, request_id: u64) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta { client_id: client.into(), request_id, principal: principal.into() })
}

/// Sends a request until it gets a definite answer, rotating through the nodes and
/// keeping its request id: exactly-once makes every retry safe. Gives up (panics)
/// after 60 s without one.
macro_rules! until_answered {
    ($addrs:expr, $method:ident, $req:expr) => {{
        let started = std::time::Instant::now();
        let mut attempt = 0usize;
        loop {
            let addr = $addrs[attempt % $addrs.len()];
            match ration_proto::v1::ledger_client::LedgerClient::new($crate::support::channel(addr))
                .$method($req.clone())
                .await
            {
                Ok(r) => break Ok(r.into_inner()),
                Err(s) if ration_proto::rpc::retryable(&s) => {
                    attempt += 1;
                    assert!(
                        started.elapsed() < std::time::Duration::from_secs(60),
                        "no answer in 60 s ({attempt} attempts): {s}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(s) => break Err(s),
            }
        }
    }};
}
pub(crate) use until_answered;

/// Creates a budget with one lifetime limit of `cap` tokens, failing closed (a
/// cut-off gateway spends its leases and nothing more), retried until answered.
pub async fn create_lifetime_budget(addrs: &[SocketAddr], request_id: u64, path: &str, cap: i64) {
    let req = v1::CreateBudgetRequest {
        meta: meta_as("chaos-admin", "ops", request_id),
        path: path.into(),
        limits: vec![v1::Limit {
            unit: "tokens".into(),
            cap,
            window: Some(v1::Window { period: v1::Period::Lifetime as i32, offset_minutes: 0 }),
            static_allowance: None,
        }],
    };
    until_answered!(addrs, create_budget, req).unwrap();
}

/// Waits until every node answers with the same applied index and state digest, and
/// returns their statuses. Equal indexes with different digests fail at once.
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
        if all.len() == addrs.len() && all.iter().all(|s| s.applied_index == all[0].applied_index) {
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
            .map(|s| (s.id, ration_proto::rpc::role_name(s.role()), s.applied_index))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "nodes did not converge within {within:?}; last seen (id, role, applied): {last:?} \
         ({} of {} answered)",
        last.len(),
        addrs.len()
    );
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lease ids of one kind of audit record on one node (its own records).
pub async fn audit_lease_ids(addr: SocketAddr, kind: &str) -> BTreeSet<u64> {
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
