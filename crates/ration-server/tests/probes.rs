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
    let mut conn = std::net::TcpStream::connect(at).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
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
