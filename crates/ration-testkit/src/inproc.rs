//! Clusters of in-process nodes (`ration_server::start`) on real loopback sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ration_proto::v1::StatusReply;
use ration_server::{Config, NodeHandle};
use tokio::net::TcpListener;

/// A single-node cluster serving mutual TLS with `node` (node 1's certificate and
/// key), peers on a port of their own, data under `dir`; and its client address.
/// It also takes bearer tokens made with the key in [`token_key_file`]`(&dir)`.
pub async fn tls_node(dir: PathBuf, node: ration_tls::TlsFiles) -> (NodeHandle, SocketAddr) {
    let (l, pl) = (listener().await, listener().await);
    let addr = l.local_addr().expect("bound");
    let key = token_key_file(&dir);
    std::fs::write(&key, [b'k'; 48]).expect("the token key is written");
    let mut cfg = config(1, addr, dir, &[(1, pl.local_addr().expect("bound"))]);
    cfg.peer_listen = Some(pl.local_addr().expect("bound"));
    cfg.tls = Some(node);
    cfg.token_key_file = Some(key);
    let node = ration_server::start_split(cfg, l, Some(pl)).await.expect("the node starts");
    (node, addr)
}

/// Where [`tls_node`] keeps the key its bearer tokens are checked with.
pub fn token_key_file(dir: &std::path::Path) -> PathBuf {
    dir.with_extension("token.key")
}

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

/// A cluster of in-process nodes on loopback, each with its own data directory.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: BTreeMap<u64, SocketAddr>,
    pub nodes: BTreeMap<u64, NodeHandle>,
    pub tweak: fn(&mut Config),
}

impl Cluster {
    pub async fn start(n: u64, tweak: fn(&mut Config)) -> Self {
        if let Some(wait) = crate::wait_for_a_new_day() {
            tokio::time::sleep(wait).await;
        }
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

    /// Restarts node `id` with `clock` stamping its entries (a node whose clock is
    /// wrong).
    pub async fn restart_with_clock(
        &mut self,
        id: u64,
        clock: std::sync::Arc<dyn ration_server::Clock>,
    ) {
        let l = rebind(self.addrs[&id]).await;
        let incoming = tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true));
        let handle = ration_server::start_with(
            self.config(id),
            ration_server::Ports::shared(incoming),
            ration_server::network::tcp_channels,
            clock,
            None,
        )
        .await
        .unwrap();
        self.nodes.insert(id, handle);
    }

    /// The addresses of the running nodes.
    pub fn running(&self) -> Vec<SocketAddr> {
        self.nodes.keys().map(|id| self.addrs[id]).collect()
    }

    /// The leader all running nodes agree on ([`crate::leader`]).
    pub async fn leader(&self) -> u64 {
        crate::leader(&self.running()).await
    }

    /// Waits until every running node has applied the same index (its whole log,
    /// with equal state digests), and returns the statuses ([`crate::converged`]).
    pub async fn converged(&self) -> Vec<StatusReply> {
        crate::converged(&self.running(), Duration::from_secs(30)).await
    }

    /// The first limit of budget `path`, read through the leader (linearizable).
    pub async fn first_limit(&self, path: &str) -> ration_proto::v1::LimitStatus {
        let addr = self.addrs[&self.leader().await];
        let b = crate::ledger(addr)
            .get_budget(ration_proto::v1::GetBudgetRequest {
                path: path.into(),
                linearizable: true,
            })
            .await
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .into_inner();
        b.limits.into_iter().next().unwrap_or_else(|| panic!("{path} has no limit"))
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}
