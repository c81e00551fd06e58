//! Helpers for tests that start real nodes on real loopback sockets.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_proto::v1::{self, StatusReply, StatusRequest};
use ration_server::{Config, NodeHandle};
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub fn config(id: u64, addr: SocketAddr, dir: PathBuf, cluster: &[(u64, SocketAddr)]) -> Config {
    Config {
        node_id: id,
        listen: addr,
        data_dir: dir,
        initial_cluster: cluster.iter().map(|(i, a)| format!("{i}={a}")).collect(),
        // Quiet clusters: no ticks, so applied indexes settle and can be compared.
        tick_ms: 3_600_000,
        heartbeat_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        rpc_timeout_ms: 1000,
        // Each node serves metrics on a port of its own (see Node::metrics_addr).
        metrics_listen: "127.0.0.1:0".into(),
        ..Config::default()
    }
}

/// A free loopback port, as a bound listener (kept until the node takes it).
pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

pub async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

pub async fn ledger(addr: SocketAddr) -> LedgerClient<Channel> {
    LedgerClient::new(channel(addr).await)
}

pub async fn status(addr: SocketAddr) -> Option<StatusReply> {
    ClusterClient::new(channel(addr).await)
        .status(StatusRequest { digest: true })
        .await
        .ok()
        .map(|r| r.into_inner())
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

pub fn meta(client: &str, request_id: u64, principal: &str) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta { client_id: client.into(), request_id, principal: principal.into() })
}

pub fn limit(unit: &str, cap: i64, period: v1::Period) -> v1::Limit {
    v1::Limit {
        unit: unit.into(),
        cap,
        window: Some(v1::Window { period: period as i32, offset_minutes: 0 }),
        static_allowance: None,
    }
}

/// A cluster of in-process nodes on loopback, each with its own data directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: BTreeMap<u64, SocketAddr>,
    pub nodes: BTreeMap<u64, NodeHandle>,
    pub tweak: fn(&mut Config),
}

impl Cluster {
    pub async fn start(n: u64, tweak: fn(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            listeners.insert(id, listener().await);
        }
        let addrs: BTreeMap<u64, SocketAddr> =
            listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap())).collect();
        let mut c = Cluster { dir, addrs, nodes: BTreeMap::new(), tweak };
        for (id, l) in listeners {
            let handle = ration_server::start(c.config(id), l).await.unwrap();
            c.nodes.insert(id, handle);
        }
        c
    }

    pub fn config(&self, id: u64) -> Config {
        let cluster: Vec<(u64, SocketAddr)> = self.addrs.iter().map(|(i, a)| (*i, *a)).collect();
        let mut c =
            config(id, self.addrs[&id], self.dir.path().join(format!("node-{id}")), &cluster);
        (self.tweak)(&mut c);
        c
    }

    pub async fn stop(&mut self, id: u64) {
        if let Some(h) = self.nodes.remove(&id) {
            h.stop().await.unwrap();
        }
    }

    pub async fn restart(&mut self, id: u64) {
        let l = rebind(self.addrs[&id]).await;
        let handle = ration_server::start(self.config(id), l).await.unwrap();
        self.nodes.insert(id, handle);
    }

    async fn statuses(&self) -> Option<Vec<StatusReply>> {
        let mut all = Vec::new();
        for id in self.nodes.keys() {
            all.push(status(self.addrs[id]).await?);
        }
        Some(all)
    }

    /// The leader all running nodes agree on.
    pub async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(all) = self.statuses().await {
                if let Some(l) = all[0].leader {
                    if self.nodes.contains_key(&l) && all.iter().all(|s| s.leader == Some(l)) {
                        return l;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for one leader known to every running node");
    }

    /// Waits until every running node has applied the same index, and returns the
    /// statuses.
    pub async fn converged(&self) -> Vec<StatusReply> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(all) = self.statuses().await {
                let first = all[0].applied_index;
                if all.iter().all(|s| s.applied_index == first && s.last_log_index == first) {
                    return all;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for every running node at the same applied index");
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}
