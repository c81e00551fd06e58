//! A leader asked to stop (SIGTERM in rationd: `supervise`'s shutdown) hands
//! leadership to another voter first, so clients wait for a transfer rather than an
//! election timeout: when it has stopped, another node already leads.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ration_testkit::inproc::Cluster;
use ration_testkit::status;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_over_first() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let handle = cluster.nodes.remove(&leader).unwrap();
    // Shut down at once, as on SIGTERM.
    ration_server::supervise(handle, async {}).await.unwrap();
    let mut leading = Vec::new();
    for (id, addr) in &cluster.addrs {
        if *id == leader {
            continue;
        }
        if let Some(s) = status(*addr).await {
            if ration_proto::rpc::is_leader(&s) {
                leading.push(*id);
            }
        }
    }
    assert_eq!(leading.len(), 1, "no other node led when the old leader ({leader}) stopped");
    cluster.shutdown().await;
}
