//! Leadership transfers: one at a time, only to a caught-up voter, and a refusal
//! names the node at fault. Any node takes the request (it goes to the leader).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ration_proto::v1::{self, cluster_client::ClusterClient};
use ration_testkit::channel;
use ration_testkit::inproc::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_one_at_a_time_and_only_to_a_caught_up_voter() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let others: Vec<u64> = cluster.addrs.keys().copied().filter(|id| *id != leader).collect();
    let addrs = cluster.addrs.clone();
    let client = |id: u64| ClusterClient::new(channel(addrs[&id]));

    // Two at once, each sent to a different node: one moves leadership, the other is
    // refused while it runs.
    let (mut c0, mut c1) = (client(others[0]), client(others[1]));
    let (a, b) = tokio::join!(
        c0.transfer_leader(v1::TransferLeaderRequest { to: others[0] }),
        c1.transfer_leader(v1::TransferLeaderRequest { to: others[1] }),
    );
    let refused: Vec<tonic::Status> = [a, b].into_iter().filter_map(Result::err).collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].code(), tonic::Code::Aborted, "{:?}", refused[0]);
    assert!(refused[0].message().contains("already in progress"), "{}", refused[0].message());

    // A stopped voter falls behind: a transfer to it is refused, naming it.
    let now = cluster.leader().await;
    let down = cluster.addrs.keys().copied().find(|id| *id != now).unwrap();
    cluster.stop(down).await;
    let live = cluster.addrs.keys().copied().find(|id| *id != down).unwrap();
    // Writes while it is down put it behind.
    for i in 0..(ration_server::READY_MAX_LAG_ENTRIES + 20) {
        let l = ration_testkit::limit("tokens", 10, v1::Period::Day);
        ration_testkit::ledger(cluster.addrs[&now])
            .create_budget(v1::CreateBudgetRequest {
                meta: ration_testkit::meta("ops", i + 1, "ops"),
                path: format!("b{i}"),
                limits: vec![l],
            })
            .await
            .unwrap();
    }
    let e = client(live).transfer_leader(v1::TransferLeaderRequest { to: down }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let addr = cluster.addrs[&down].to_string();
    assert!(
        e.message().contains(&format!("node {down} ({addr})")) && e.message().contains("behind"),
        "{}",
        e.message()
    );

    // A call that waits on purpose survives forwarding: AddLearner through a
    // follower waits its 5 s for the learner (here never running) and says so,
    // instead of timing out at the one-second deadline of ordinary forwarded calls.
    let leader = cluster.leader().await;
    let follower = cluster.addrs.keys().copied().find(|id| *id != leader && *id != down).unwrap();
    let nobody = ration_testkit::process::free_addrs(1)[0].to_string();
    let e = ClusterClient::new(ration_testkit::channel_within(
        addrs[&follower],
        std::time::Duration::from_secs(30),
    ))
    .add_learner(v1::AddLearnerRequest { id: 9, addr: nobody })
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("has not caught up"), "{}", e.message());
    cluster.shutdown().await;
}
