//! Membership changes refuse addresses peers could never dial, and a second member
//! at an address a member already has.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ration_proto::v1::{self, cluster_client::ClusterClient};
use ration_testkit::channel;
use ration_testkit::inproc::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_member_addresses_are_refused() {
    let cluster = Cluster::start(1, |_| {}).await;
    cluster.leader().await;
    let addr = cluster.addrs[&1];
    let mut c = ClusterClient::new(channel(addr));
    let add = |id: u64, addr: &str| v1::AddLearnerRequest { id, addr: addr.into() };
    let e = c.add_learner(add(2, "not-an-address")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("is not host:port"), "{}", e.message());
    let e = c.add_learner(add(2, &addr.to_string())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("is node 1's address"), "{}", e.message());
    let members = c.status(v1::StatusRequest { digest: false }).await.unwrap().into_inner().members;
    assert_eq!(members.len(), 1, "a refused learner was added: {members:?}");

    // A learner with nothing running at its address never catches up, so it cannot
    // be promoted: the refusal names it.
    let nobody = ration_testkit::process::free_addrs(1)[0].to_string();
    // Adding it waits for it to catch up, then says it did not (after 5 s).
    let mut slow = ClusterClient::new(ration_testkit::channel_within(
        addr,
        std::time::Duration::from_secs(30),
    ));
    let e = slow.add_learner(add(2, &nobody)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("added as a learner but has not caught up")
            && e.message().contains(&nobody),
        "{}",
        e.message()
    );
    let e = c
        .change_membership(v1::ChangeMembershipRequest {
            voters: vec![1, 2],
            retain: false,
            remove: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("node 2 ({nobody})")), "{}", e.message());
    let members = c.status(v1::StatusRequest { digest: false }).await.unwrap().into_inner().members;
    assert!(members.iter().all(|m| m.id != 2 || !m.voter), "a lagging learner became a voter");
    cluster.shutdown().await;
}
