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
    cluster.shutdown().await;
}
