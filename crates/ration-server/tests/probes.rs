//! Liveness and readiness apart, as etcd has them: a node that lost its quorum is
//! alive (`/livez` 200, gRPC `ration.v1.Liveness` SERVING) but not ready (`/readyz`
//! 503 saying why, "" and `ration.v1.Ledger` NOT_SERVING); it becomes ready once a
//! leader is known. A liveness probe must not restart a cluster that lost quorum.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use ration_testkit::inproc::{config, listener};
use ration_testkit::{channel, eventually};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

fn get(at: SocketAddr, path: &str) -> (u16, String) {
    get_with(at, path, "")
}

fn get_with(at: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let mut conn = std::net::TcpStream::connect(at).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{headers}\r\n").as_bytes()).unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

async fn grpc_health(addr: SocketAddr, service: &str) -> ServingStatus {
    let reply = HealthClient::new(channel(addr))
        .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .unwrap()
        .into_inner();
    reply.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_quorum_is_alive_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(listener().await);
    }
    let cluster: Vec<(u64, SocketAddr)> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap()))
        .collect();
    let mut handles = Vec::new();
    let mut rest = listeners.into_iter();
    // Node 1 alone: its peers are not running, so no leader can be elected.
    let l = rest.next().unwrap();
    let one = ration_server::start(config(1, cluster[0].1, dir.path().join("n1"), &cluster), l)
        .await
        .unwrap();
    let metrics = *one.node.metrics_addr.get().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(metrics, "/livez"), (200, "ok\n".into()));
    let (code, why) = get(metrics, "/readyz");
    assert_eq!((code, why.as_str()), (503, "no leader is known\n"));
    assert_eq!(grpc_health(cluster[0].1, "ration.v1.Liveness").await, ServingStatus::Serving);
    assert_eq!(grpc_health(cluster[0].1, "").await, ServingStatus::NotServing);
    assert_eq!(grpc_health(cluster[0].1, "ration.v1.Ledger").await, ServingStatus::NotServing);

    // The others come: a leader is elected and node 1 becomes ready.
    for (i, l) in rest.enumerate() {
        let (id, addr) = cluster[i + 1];
        handles.push(
            ration_server::start(config(id, addr, dir.path().join(format!("n{id}")), &cluster), l)
                .await
                .unwrap(),
        );
    }
    eventually("node 1 is ready", Duration::from_secs(20), || async move {
        get(metrics, "/readyz").0 == 200
    })
    .await;
    assert_eq!(grpc_health(cluster[0].1, "").await, ServingStatus::Serving);
    one.stop().await.unwrap();
    for h in handles {
        h.stop().await.unwrap();
    }
}

/// With a metrics token, `/metrics` (which names every tenant) answers only with
/// the token; the probes stay open for kubelet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_token_while_probes_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-metrics-token-0123\n").unwrap();
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let mut c = config(1, addr, dir.path().join("n1"), &[(1, addr)]);
    c.metrics_token_file = Some(token_file.clone());
    let node = ration_server::start(c.clone(), l).await.unwrap();
    let at = *node.node.metrics_addr.get().unwrap();
    eventually("ready", Duration::from_secs(10), || async { get(at, "/readyz").0 == 200 }).await;
    assert_eq!(get(at, "/livez").0, 200);
    let (code, body) = get(at, "/metrics");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    assert_eq!(get_with(at, "/metrics", "Authorization: Bearer wrong-token-0123456789\r\n").0, 401);
    let (code, body) =
        get_with(at, "/metrics", "Authorization: Bearer s3cret-metrics-token-0123\r\n");
    assert_eq!(code, 200);
    assert!(body.contains("ration_"), "{body}");
    node.stop().await.unwrap();

    // A token too short to be one is refused at start.
    std::fs::write(&token_file, "short").unwrap();
    let l = listener().await;
    let err = ration_server::start(c, l).await.unwrap_err();
    assert!(format!("{err:#}").contains("at least 16"), "{err:#}");
}
