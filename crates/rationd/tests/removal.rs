//! A node removed from the cluster on purpose stops serving, says so, and exits 0,
//! so systemd's `Restart=on-failure` (or a supervisor watching for failures) does
//! not start it again: a follower removed by the leader, and then the leader
//! removing itself. The nodes that remain keep serving writes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ration_proto::v1;
use ration_proto::v1::cluster_client::ClusterClient;
use ration_testkit::process::{free_addrs, initial_cluster, Proc};
use ration_testkit::{channel, leader, meta, until_answered};

/// Waits up to `within` for `p` to exit and returns its exit code.
fn exit_code(p: &mut Proc, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
            p.child = None;
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

async fn remove(addr: SocketAddr, id: u64) {
    ClusterClient::new(channel(addr))
        .change_membership(v1::ChangeMembershipRequest {
            voters: vec![],
            retain: false,
            remove: vec![id],
        })
        .await
        .unwrap_or_else(|e| panic!("removing node {id} through {addr}: {e}"));
}

async fn write(addrs: &[SocketAddr], request_id: u64) {
    let req = v1::CreateBudgetRequest {
        meta: meta("removal", request_id, "test"),
        path: format!("after-{request_id}"),
        limits: vec![],
    };
    until_answered!(addrs, create_budget, req).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_nodes_stop_say_so_and_exit_zero() {
    let root = tempfile::tempdir().unwrap();
    let addrs = free_addrs(3);
    let cluster = initial_cluster(&addrs);
    let mut nodes: Vec<Proc> = (0..3)
        .map(|i| {
            let dir = root.path().join(format!("node-{}", i + 1));
            let mut p = Proc::new(
                env!("CARGO_BIN_EXE_rationd"),
                i as u64 + 1,
                addrs[i],
                dir,
                cluster.clone(),
            );
            p.log_filter = Some(String::new()); // rationd's default: removal is an INFO line
            p
        })
        .collect();
    for n in &mut nodes {
        n.spawn();
    }
    let first = leader(&addrs).await;
    write(&addrs, 1).await;

    // A follower, removed through the leader.
    let follower = (1..=3).find(|id| *id != first).unwrap();
    remove(addrs[first as usize - 1], follower).await;
    let f = &mut nodes[follower as usize - 1];
    let code = exit_code(f, Duration::from_secs(30));
    assert_eq!(code, Some(0), "removed follower {follower}:\n{}", f.log_tail(20));
    assert!(
        f.log_tail(20).contains("was removed from the cluster"),
        "removed follower {follower} did not say why it stopped:\n{}",
        f.log_tail(20)
    );

    // The leader removes itself; the last node carries on alone.
    let rest: Vec<SocketAddr> =
        (1..=3u64).filter(|id| *id != follower).map(|id| addrs[id as usize - 1]).collect();
    let now = leader(&rest).await;
    remove(addrs[now as usize - 1], now).await;
    let l = &mut nodes[now as usize - 1];
    let code = exit_code(l, Duration::from_secs(30));
    assert_eq!(code, Some(0), "removed leader {now}:\n{}", l.log_tail(20));
    assert!(l.log_tail(20).contains("was removed from the cluster"), "{}", l.log_tail(20));
    eprintln!(
        "{}{}",
        nodes[follower as usize - 1].log_tail(3),
        nodes[now as usize - 1].log_tail(3)
    );

    let last = (1..=3u64).find(|id| *id != follower && *id != now).unwrap();
    let last_addr = [addrs[last as usize - 1]];
    assert_eq!(leader(&last_addr).await, last);
    write(&last_addr, 2).await;
    assert!(nodes[last as usize - 1].child.as_mut().unwrap().try_wait().unwrap().is_none());
}
