//! The node's transport and clock are injected: here three nodes run over an
//! in-memory network (tokio duplex pipes, no sockets) with a clock the test sets, the
//! way a deterministic simulation will run them.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_proto::v1::{self, Period};
use ration_server::network::ChannelMaker;
use ration_server::{Clock, Config};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// Listeners by address: a connection is a duplex pipe handed to the listener.
type Net = Arc<Mutex<BTreeMap<String, mpsc::UnboundedSender<DuplexStream>>>>;

#[derive(Debug)]
struct TestClock(AtomicU64);

/// Time as the test sets it: wall and monotonic move together (a correct clock).
impl Clock for TestClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn mono_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn dial(net: &Net, addr: &str) -> Channel {
    let (net, addr) = (net.clone(), addr.to_owned());
    Endpoint::from_static("http://in-memory")
        .timeout(Duration::from_secs(1))
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let (net, addr) = (net.clone(), addr.clone());
            async move {
                let (client, server) = tokio::io::duplex(1 << 16);
                let listener = net.lock().unwrap().get(&addr).cloned();
                listener
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, addr.clone())
                    })?
                    .send(server)
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, addr)
                    })?;
                Ok::<_, std::io::Error>(TokioIo::new(client))
            }
        }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_run_over_an_injected_network_and_clock() {
    const T: u64 = 1_764_340_245_123;
    let net: Net = Arc::new(Mutex::new(BTreeMap::new()));
    let clock = Arc::new(TestClock(AtomicU64::new(T)));
    let dir = tempfile::tempdir().unwrap();
    let cluster: Vec<String> = (1..=3).map(|i| format!("{i}=mem-{i}")).collect();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let addr = format!("mem-{id}");
        let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
        net.lock().unwrap().insert(addr.clone(), tx);
        // Accepted pipes as the stream of `Result`s tonic's server takes.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            Ok::<DuplexStream, std::io::Error>,
        );
        let config = Config {
            node_id: id,
            advertise: Some(addr),
            data_dir: dir.path().join(format!("node-{id}")),
            initial_cluster: cluster.clone(),
            tick_ms: 3_600_000,
            heartbeat_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            rpc_timeout_ms: 1000,
            metrics_listen: "off".into(),
            ..Config::default()
        };
        let maker_net = net.clone();
        let channels = move |_timeout: Duration| -> ChannelMaker {
            let net = maker_net.clone();
            Arc::new(move |addr: &str| Ok(dial(&net, addr)))
        };
        nodes.push(
            ration_server::start_with(
                config,
                ration_server::Ports::shared(incoming),
                channels,
                clock.clone(),
                None,
            )
            .await
            .unwrap(),
        );
    }

    // A leader is elected over the pipes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let s = ClusterClient::new(dial(&net, "mem-1"))
            .status(v1::StatusRequest { digest: false })
            .await;
        if let Ok(s) = s {
            if let Some(l) = s.into_inner().leader {
                break l;
            }
        }
        assert!(Instant::now() < deadline, "no leader over the in-memory network");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!((1..=3).contains(&leader));

    // Writes through a follower are forwarded over the pipes; the ledger's time is
    // the injected clock's.
    let follower = if leader == 1 { "mem-2" } else { "mem-1" };
    let mut client = LedgerClient::new(dial(&net, follower));
    let meta = |id| {
        Some(v1::RequestMeta {
            client_id: "sim".into(),
            request_id: id,
            principal: "gw".into(),
            ..Default::default()
        })
    };
    client
        .create_budget(v1::CreateBudgetRequest {
            meta: meta(1),
            path: "sim".into(),
            limits: vec![v1::Limit {
                unit: "tokens".into(),
                cap: 100,
                window: Some(v1::Window { period: Period::Lifetime as i32, offset_minutes: 0 }),
                static_allowance: None,
            }],
        })
        .await
        .unwrap();
    let lease = client
        .acquire(v1::AcquireRequest {
            meta: meta(2),
            budget: "sim".into(),
            unit: "tokens".into(),
            wanted: 40,
            min: 1,
            ttl_ms: 5000,
            starts_at_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.expires_at_ms, T + 5000, "the ledger's time came from the injected clock");

    // Moving the clock past the expiry (a tick carries it) charges the lease.
    clock.0.store(T + 6000, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Any write carries the new time; an empty batch carries none, so send a
        // harmless refused acquire.
        let _ = client
            .acquire(v1::AcquireRequest {
                meta: meta(3),
                budget: "sim".into(),
                unit: "tokens".into(),
                wanted: 1000,
                min: 1000,
                ttl_ms: 5000,
                starts_at_ms: 0,
            })
            .await;
        let b = client
            .get_budget(v1::GetBudgetRequest { path: "sim".into(), linearizable: true })
            .await
            .unwrap()
            .into_inner();
        if b.limits[0].consumed == 40 && b.limits[0].outstanding == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lease did not expire with the injected clock: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in nodes {
        n.stop().await.unwrap();
    }
}
