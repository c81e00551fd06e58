//! Real nodes with mutual TLS and separate client and peer ports: the cluster
//! forms, clients are who their certificates say, and every way in without the
//! right certificate is refused with a clear status and changes nothing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ration_proto::v1::{
    self, cluster_client::ClusterClient, ledger_client::LedgerClient, raft_client::RaftClient,
};
use ration_server::NodeHandle;
use ration_testkit::inproc::{config, listener};
use ration_tls::dev::{DevSet, Leaf};
use ration_tls::token::{unix_now, TokenKey, WithToken};
use ration_tls::{ClientTls, Connector, TlsFiles};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

struct TlsCluster {
    dir: tempfile::TempDir,
    set: DevSet,
    clients: BTreeMap<u64, SocketAddr>,
    peers: BTreeMap<u64, SocketAddr>,
    nodes: BTreeMap<u64, NodeHandle>,
}

fn files<'a>(set: &'a DevSet, who: &str) -> &'a TlsFiles {
    &set.principals.iter().find(|(p, _)| p == who).expect("a principal of the set").1
}

impl TlsCluster {
    async fn start(n: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u64> = (1..=n).collect();
        let set = ration_tls::dev::write_set(
            &dir.path().join("certs"),
            &ids,
            &["127.0.0.1".into(), "localhost".into()],
            &["gw".into(), "admin".into(), "gw2".into(), "ops".into(), "aud".into()],
        )
        .unwrap();
        let mut listeners = BTreeMap::new();
        for id in &ids {
            listeners.insert(*id, (listener().await, listener().await));
        }
        let clients = listeners.iter().map(|(id, l)| (*id, l.0.local_addr().unwrap())).collect();
        let peers = listeners.iter().map(|(id, l)| (*id, l.1.local_addr().unwrap())).collect();
        // Every node checks bearer tokens with one key.
        std::fs::write(dir.path().join("token.key"), [b'k'; 48]).unwrap();
        let mut c = Self { dir, set, clients, peers, nodes: BTreeMap::new() };
        for (id, (l, pl)) in listeners {
            let handle = ration_server::start_split(c.config(id), l, Some(pl)).await.unwrap();
            c.nodes.insert(id, handle);
        }
        c
    }

    fn config(&self, id: u64) -> ration_server::Config {
        let cluster: Vec<(u64, SocketAddr)> = self.peers.iter().map(|(i, a)| (*i, *a)).collect();
        let mut c =
            config(id, self.clients[&id], self.dir.path().join(format!("node-{id}")), &cluster);
        c.peer_listen = Some(self.peers[&id]);
        c.tls = Some(self.set.nodes[(id - 1) as usize].1.clone());
        c.token_key_file = Some(self.token_key_file());
        c
    }

    fn token_key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("token.key")
    }

    /// A channel that trusts the CA, presents no certificate and sends `token`.
    fn with_token(&self, token: &str, addr: SocketAddr) -> WithToken<Channel> {
        WithToken::new(chan(ClientTls::ca_only(&self.set.ca).unwrap(), addr), Some(token)).unwrap()
    }

    fn as_principal(&self, who: &str) -> ClientTls {
        ClientTls::from_files(files(&self.set, who)).unwrap()
    }

    fn as_node(&self, id: u64) -> ClientTls {
        ClientTls::from_files(&self.set.nodes[(id - 1) as usize].1).unwrap()
    }

    /// The leader, once every node agrees on one (asked as `admin`).
    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut seen = Vec::new();
            for addr in self.clients.values() {
                let s = ClusterClient::new(chan(self.as_principal("admin"), *addr))
                    .status(v1::StatusRequest { digest: false })
                    .await;
                seen.push(s.ok().and_then(|s| s.into_inner().leader));
            }
            if let Some(Some(l)) = seen.first().copied() {
                if seen.iter().all(|s| *s == Some(l)) {
                    return l;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each node's state digest, once all have applied the same index.
    async fn digests(&self) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut st = Vec::new();
            for addr in self.clients.values() {
                let s = ClusterClient::new(chan(self.as_principal("admin"), *addr))
                    .status(v1::StatusRequest { digest: true })
                    .await
                    .unwrap()
                    .into_inner();
                st.push((s.applied_index, s.state_digest));
            }
            if st.iter().all(|s| s == &st[0]) {
                return st.into_iter().map(|s| s.1).collect();
            }
            assert!(Instant::now() < deadline, "nodes did not converge");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `admin` (a bootstrap admin) grants, or with `revoke` takes back, a role.
    async fn role(&self, node: u64, revoke: bool, subject: &str, role: &str, scope: &str) {
        static REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
        let request_id = REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut admin = LedgerClient::new(chan(self.as_principal("admin"), self.clients[&node]));
        let req = v1::RoleRequest {
            meta: meta("c-admin-roles", request_id, "admin"),
            subject: subject.into(),
            role: role.into(),
            scope: scope.into(),
        };
        let reply = if revoke { admin.revoke_role(req).await } else { admin.grant_role(req).await };
        assert!(reply.unwrap().into_inner().changed);
    }

    async fn shutdown(mut self) {
        for (_, h) in std::mem::take(&mut self.nodes) {
            h.stop().await.unwrap();
        }
    }
}

fn chan(tls: ClientTls, addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(Connector::new(tls))
}

fn plain(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

fn meta(client: &str, request_id: u64, principal: &str) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        client_id: client.into(),
        request_id,
        principal: principal.into(),
        ..Default::default()
    })
}

/// An acquire of 10 tokens on `budget` by `principal` (client `c-<principal>`).
fn acquire(principal: &str, request_id: u64, budget: &str) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: meta(&format!("c-{principal}"), request_id, principal),
        budget: budget.into(),
        unit: "tokens".into(),
        wanted: 10,
        min: 1,
        ttl_ms: 60_000,
        starts_at_ms: 0,
    }
}

fn create(path: &str, request_id: u64, principal: &str) -> v1::CreateBudgetRequest {
    v1::CreateBudgetRequest {
        meta: meta(&format!("c-{principal}"), request_id, principal),
        path: path.into(),
        limits: vec![v1::Limit {
            unit: "tokens".into(),
            cap: 1000,
            window: Some(v1::Window { period: v1::Period::Lifetime as i32, offset_minutes: 0 }),
            static_allowance: None,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_forms_over_mutual_tls_and_clients_are_who_their_certificates_say() {
    let c = TlsCluster::start(3).await;
    let leader = c.leader().await;
    let follower = *c.clients.keys().find(|id| **id != leader).unwrap();

    // Through a follower: forwarded to the leader over the peer port, with the
    // client's identity (roles granted through a follower too).
    c.role(follower, false, "gw", "operator", "tenant").await;
    c.role(follower, false, "gw", "auditor", "tenant").await;
    let mut gw = LedgerClient::new(chan(c.as_principal("gw"), c.clients[&follower]));
    gw.create_budget(create("tenant", 1, "gw")).await.unwrap();
    let records = gw
        .query_audit(v1::QueryAuditRequest {
            limit: 100,
            linearizable: true,
            subtree: "tenant".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let made = records.iter().find(|r| r.budget == "tenant").expect("the creation is audited");
    assert_eq!(made.principal, "gw");

    // The follower tells clients where the leader's client port is.
    let s = ClusterClient::new(chan(c.as_principal("admin"), c.clients[&follower]))
        .status(v1::StatusRequest { digest: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.addr,
        c.clients[&follower].to_string(),
        "status of {follower} ({}): {s:?}; clients {:?} peers {:?}",
        s.id,
        c.clients,
        c.peers
    );
    assert_eq!(s.peer_addr, c.peers[&follower].to_string(), "{s:?} {:?} {:?}", c.clients, c.peers);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = ClusterClient::new(chan(c.as_principal("admin"), c.clients[&follower]))
            .status(v1::StatusRequest { digest: false })
            .await
            .unwrap()
            .into_inner();
        if s.leader_addr == c.clients[&leader].to_string() {
            let m = s.members.iter().find(|m| m.id == leader).unwrap();
            assert_eq!(m.addr, c.peers[&leader].to_string());
            assert_eq!(m.client_addr, c.clients[&leader].to_string());
            break;
        }
        assert!(Instant::now() < deadline, "leader_addr stays {}", s.leader_addr);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// The next result of a Pipeline call: its tag and what it holds.
async fn next(
    results: &mut tonic::Streaming<v1::PipelineResult>,
) -> (u64, v1::batch_result::Result) {
    let r = results.message().await.unwrap().unwrap();
    (r.tag, r.result.unwrap().result.unwrap())
}

/// A Pipeline call is authenticated once, as it opens (the client's certificate),
/// and each operation is checked as it runs: a principal other than the
/// certificate's, or a budget outside the caller's roles, refuses that operation
/// alone, and a role revoked while the call is open refuses the operations after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_acts_as_its_certificate_says_operation_by_operation() {
    use v1::{batch_op::Op, batch_result::Result as R};
    let c = TlsCluster::start(3).await;
    let leader = c.leader().await;
    c.role(leader, false, "gw", "operator", "tenant").await;
    c.role(leader, false, "gw", "gateway", "tenant").await;
    let mut gw = LedgerClient::new(chan(c.as_principal("gw"), c.clients[&leader]));
    gw.create_budget(create("tenant", 1, "gw")).await.unwrap();
    let op = |budget: &str, request_id: u64, principal: &str| v1::PipelineOp {
        tag: request_id,
        op: Some(v1::BatchOp { op: Some(Op::Acquire(acquire(principal, request_id, budget))) }),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut results =
        gw.pipeline(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(op("tenant", 101, "gw")).await.unwrap();
    let (tag, r) = next(&mut results).await;
    assert!(tag == 101 && matches!(r, R::Lease(_)), "{tag} {r:?}");
    // Naming another principal than the certificate's.
    tx.send(op("tenant", 102, "admin")).await.unwrap();
    let (tag, r) = next(&mut results).await;
    let R::Error(e) = r else { panic!("{r:?}") };
    assert_eq!((tag, e.code), (102, Code::PermissionDenied as i32), "{e:?}");
    // Outside its roles.
    tx.send(op("elsewhere", 103, "gw")).await.unwrap();
    let (tag, r) = next(&mut results).await;
    let R::Error(e) = r else { panic!("{r:?}") };
    assert_eq!((tag, e.code), (103, Code::PermissionDenied as i32), "{e:?}");
    assert!(e.message.contains("elsewhere"), "{}", e.message);
    // The role revoked while the call stays open: the next operation is refused.
    c.role(leader, true, "gw", "gateway", "tenant").await;
    tx.send(op("tenant", 104, "gw")).await.unwrap();
    let (tag, r) = next(&mut results).await;
    let R::Error(e) = r else { panic!("{r:?}") };
    assert_eq!((tag, e.code), (104, Code::PermissionDenied as i32), "{e:?}");
    drop(tx);
    assert!(results.message().await.unwrap().is_none(), "the call ends with OK");
    c.shutdown().await;
}

/// A call expected to be refused: its status code, and a message naming why.
async fn refused<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    code: Option<Code>,
    says: &[&str],
) -> (String, String) {
    let status = call.await.expect_err(what);
    if let Some(code) = code {
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }
    let source = std::error::Error::source(&status).map(|s| format!("{s:?}")).unwrap_or_default();
    let msg = status.message().to_owned();
    assert!(
        says.iter().any(|w| msg.contains(w) || source.contains(w)),
        "{what}: expected one of {says:?} in {msg:?} / {source}"
    );
    (format!("{:?}", status.code()), msg)
}

fn forged_append(leader: u64, term: u64) -> v1::RaftPayload {
    use openraft::{CommittedLeaderId, LogId, Vote};
    let rpc = openraft::raft::AppendEntriesRequest::<ration_store::TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: vec![],
        leader_commit: Some(LogId::new(CommittedLeaderId::new(term, leader), 1_000_000)),
    };
    v1::RaftPayload { data: postcard::to_stdvec(&rpc).unwrap(), cluster_id: 0 }
}

fn forged_snapshot(leader: u64, term: u64) -> v1::RaftPayload {
    use openraft::{SnapshotMeta, StoredMembership, Vote};
    let rpc = openraft::raft::InstallSnapshotRequest::<ration_store::TypeConfig> {
        vote: Vote::new_committed(term, leader),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: "forged".into(),
        },
        offset: 0,
        data: vec![0; 16],
        done: true,
    };
    v1::RaftPayload { data: postcard::to_stdvec(&rpc).unwrap(), cluster_id: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_way_in_without_the_right_certificate_is_refused_and_changes_nothing() {
    let c = TlsCluster::start(3).await;
    let leader = c.leader().await;
    let follower = *c.clients.keys().find(|id| **id != leader).unwrap();
    // Roles: gw runs "tenant" (operator and gateway there), ops is an operator
    // everywhere, aud audits "tenant", gw2 was a gateway on "tenant" until revoked.
    c.role(leader, false, "gw", "operator", "tenant").await;
    c.role(leader, false, "gw", "gateway", "tenant").await;
    c.role(leader, false, "ops", "operator", "*").await;
    c.role(leader, false, "aud", "auditor", "tenant").await;
    c.role(leader, false, "gw2", "gateway", "tenant").await;
    LedgerClient::new(chan(c.as_principal("gw"), c.clients[&leader]))
        .create_budget(create("tenant", 1, "gw"))
        .await
        .unwrap();
    LedgerClient::new(chan(c.as_principal("ops"), c.clients[&leader]))
        .create_budget(create("elsewhere", 1, "ops"))
        .await
        .unwrap();
    let gw2 = LedgerClient::new(chan(c.as_principal("gw2"), c.clients[&leader]))
        .acquire(acquire("gw2", 1, "tenant"))
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    c.role(follower, true, "gw2", "gateway", "tenant").await;
    // A budget below tenant with a lease on it, and ops auditing only that one.
    let mut gw_at_leader = LedgerClient::new(chan(c.as_principal("gw"), c.clients[&leader]));
    gw_at_leader.create_budget(create("tenant/sub", 2, "gw")).await.unwrap();
    gw_at_leader.acquire(acquire("gw", 5, "tenant/sub")).await.unwrap();
    c.role(leader, false, "ops", "auditor", "tenant/sub").await;
    // A lease admin holds, for the lease test below.
    let lease = LedgerClient::new(chan(c.as_principal("admin"), c.clients[&leader]))
        .acquire(v1::AcquireRequest {
            meta: meta("c-admin", 1, "admin"),
            budget: "tenant".into(),
            unit: "tokens".into(),
            wanted: 10,
            min: 1,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    let before = c.digests().await;
    let client = c.clients[&leader];
    let peer = c.peers[&follower];
    let mut table = Vec::new();

    // No client certificate at all.
    let ca_only = ClientTls::ca_only(&c.set.ca).unwrap();
    let r = refused(
        "no certificate",
        LedgerClient::new(chan(ca_only, client)).create_budget(create("x", 1, "gw")),
        Some(Code::Unauthenticated),
        &["no client certificate was presented"],
    )
    .await;
    table.push(("no client certificate", r));

    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    let foreign_set = ration_tls::dev::write_set(other.path(), &[1], &[], &["gw".into()]).unwrap();
    let foreign = ClientTls::from_files(&TlsFiles {
        ca: c.set.ca.clone(),
        ..files(&foreign_set, "gw").clone()
    })
    .unwrap();
    let r = refused(
        "another CA",
        LedgerClient::new(chan(foreign, client)).create_budget(create("x", 1, "gw")),
        Some(Code::Unauthenticated),
        // The same CA name with another key: the signature does not verify.
        &["is not signed by the CA this node trusts"],
    )
    .await;
    table.push(("certificate from another CA", r));

    // An expired certificate from the cluster's own CA.
    let expired = {
        let ca = &c.set.authority;
        let now = time::OffsetDateTime::now_utc();
        let leaf = Leaf {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
            ..Leaf::principal("gw")
        };
        ca.issue(&leaf).unwrap().write(other.path(), "expired", &c.set.ca).unwrap()
    };
    let r = refused(
        "expired",
        LedgerClient::new(chan(ClientTls::from_files(&expired).unwrap(), client))
            .create_budget(create("x", 1, "gw")),
        Some(Code::Unauthenticated),
        &["the client certificate is expired (since "],
    )
    .await;
    table.push(("expired certificate", r));
    // The node still serves the right certificate: the refusals above were theirs.
    LedgerClient::new(chan(c.as_principal("gw"), client))
        .get_budget(v1::GetBudgetRequest { path: "tenant".into(), linearizable: true })
        .await
        .unwrap();

    // Plaintext to a TLS port.
    let r = refused(
        "plaintext",
        LedgerClient::new(plain(client)).create_budget(create("x", 1, "gw")),
        None,
        &[""],
    )
    .await;
    table.push(("plaintext client", r));

    // A node's certificate used as a client.
    let r = refused(
        "node certificate on the client port",
        LedgerClient::new(chan(c.as_node(follower), client)).create_budget(create("x", 1, "gw")),
        Some(Code::PermissionDenied),
        &["peer port"],
    )
    .await;
    table.push(("peer certificate used as a client", r));

    // A client's certificate used as a peer, forging AppendEntries and
    // InstallSnapshot at a higher term.
    let r = refused(
        "client certificate on the peer port (AppendEntries)",
        RaftClient::new(chan(c.as_principal("gw"), peer)).append_entries(forged_append(leader, 99)),
        Some(Code::PermissionDenied),
        &["client port"],
    )
    .await;
    table.push(("client certificate used as a peer (forged AppendEntries)", r));
    let r = refused(
        "client certificate on the peer port (InstallSnapshot)",
        RaftClient::new(chan(c.as_principal("admin"), peer))
            .install_snapshot(forged_snapshot(leader, 99)),
        Some(Code::PermissionDenied),
        &["client port"],
    )
    .await;
    table.push(("forged InstallSnapshot from a client certificate", r));
    // Raft is not served on the client port at all.
    let r = refused(
        "Raft on the client port",
        RaftClient::new(chan(c.as_principal("gw"), client))
            .install_snapshot(forged_snapshot(leader, 99)),
        Some(Code::Unimplemented),
        &[""],
    )
    .await;
    table.push(("Raft call on the client port", r));
    // A member speaks only for itself.
    let other_member = *c.clients.keys().find(|id| **id != leader && **id != follower).unwrap();
    let r = refused(
        "a member forging the leader's AppendEntries",
        RaftClient::new(chan(c.as_node(other_member), peer))
            .append_entries(forged_append(leader, 99)),
        Some(Code::PermissionDenied),
        &["cannot send a Raft message from"],
    )
    .await;
    table.push(("member forging another member's AppendEntries", r));
    // Peer-only methods on the client port.
    let r = refused(
        "Campaign on the client port",
        ClusterClient::new(chan(c.as_principal("admin"), client))
            .campaign(v1::CampaignRequest::default()),
        Some(Code::PermissionDenied),
        &["peer port only"],
    )
    .await;
    table.push(("Campaign on the client port", r));
    // A client claiming another principal.
    let r = refused(
        "a request naming another principal",
        LedgerClient::new(chan(c.as_principal("gw"), c.clients[&follower]))
            .create_budget(create("y", 7, "admin")),
        Some(Code::PermissionDenied),
        &["authenticated as \"gw\""],
    )
    .await;
    table.push(("request naming another principal", r));
    // A client claiming a forwarded identity: the header counts only from members.
    let mut req = tonic::Request::new(create("z", 8, "admin"));
    req.metadata_mut().insert("x-ration-principal", "admin".parse().unwrap());
    let r = refused(
        "x-ration-principal from a client",
        LedgerClient::new(chan(c.as_principal("gw"), client)).create_budget(req),
        Some(Code::PermissionDenied),
        &["authenticated as \"gw\""],
    )
    .await;
    table.push(("client setting x-ration-principal", r));

    // A gateway releasing another principal's lease (in its own name).
    let r = refused(
        "releasing another principal's lease",
        LedgerClient::new(chan(c.as_principal("gw"), client)).release(v1::ReleaseRequest {
            meta: meta("c-gw", 2, "gw"),
            lease_id: lease,
            consumed_total: 0,
        }),
        Some(Code::PermissionDenied),
        &["principal"],
    )
    .await;
    table.push(("gateway releasing another principal's lease", r));

    // Roles. A gateway acquiring outside its subtree, directly and in a Batch.
    let r = refused(
        "a gateway acquiring outside its subtree",
        LedgerClient::new(chan(c.as_principal("gw"), c.clients[&follower])).acquire(acquire(
            "gw",
            3,
            "elsewhere",
        )),
        Some(Code::PermissionDenied),
        &["needs role gateway on elsewhere"],
    )
    .await;
    table.push(("gateway acquiring outside its subtree", r));
    let batch = LedgerClient::new(chan(c.as_principal("gw"), client))
        .batch(v1::BatchRequest {
            ops: vec![v1::BatchOp {
                op: Some(v1::batch_op::Op::Acquire(acquire("gw", 4, "elsewhere"))),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let Some(v1::batch_result::Result::Error(e)) = &batch.results[0].result else {
        panic!("refused in place: {batch:?}")
    };
    assert_eq!(e.code, Code::PermissionDenied as i32, "{e:?}");
    assert!(e.message.contains("needs role gateway on elsewhere"), "{e:?}");
    // A revoked gateway acquires nothing more.
    let r = refused(
        "a revoked gateway acquiring",
        LedgerClient::new(chan(c.as_principal("gw2"), client)).acquire(acquire("gw2", 2, "tenant")),
        Some(Code::PermissionDenied),
        &["it holds no roles"],
    )
    .await;
    table.push(("acquire after the gateway role was revoked", r));
    // An operator changing membership, transferring leadership, saving a snapshot.
    let r = refused(
        "an operator changing membership",
        ClusterClient::new(chan(c.as_principal("ops"), c.clients[&follower])).change_membership(
            v1::ChangeMembershipRequest { voters: vec![leader], ..Default::default() },
        ),
        Some(Code::PermissionDenied),
        &["needs role admin"],
    )
    .await;
    table.push(("operator changing membership", r));
    let r = refused(
        "an operator adding a learner",
        ClusterClient::new(chan(c.as_principal("ops"), client))
            .add_learner(v1::AddLearnerRequest { id: 9, addr: "127.0.0.1:1".into() }),
        Some(Code::PermissionDenied),
        &["needs role admin"],
    )
    .await;
    table.push(("operator adding a learner", r));
    let r = refused(
        "a gateway transferring leadership",
        ClusterClient::new(chan(c.as_principal("gw"), client))
            .transfer_leader(v1::TransferLeaderRequest { to: follower }),
        Some(Code::PermissionDenied),
        &["needs role admin"],
    )
    .await;
    table.push(("gateway transferring leadership", r));
    let r = refused(
        "a gateway forcing a digest",
        ClusterClient::new(chan(c.as_principal("gw"), client))
            .status(v1::StatusRequest { digest: true }),
        Some(Code::PermissionDenied),
        &["needs role admin"],
    )
    .await;
    table.push(("gateway asking for a state digest", r));
    // An operator (not an admin) granting roles, raising limits.
    let r = refused(
        "an operator granting itself admin",
        LedgerClient::new(chan(c.as_principal("ops"), client)).grant_role(v1::RoleRequest {
            meta: meta("c-ops", 9, "ops"),
            subject: "ops".into(),
            role: "admin".into(),
            scope: "*".into(),
        }),
        Some(Code::PermissionDenied),
        &["needs role admin"],
    )
    .await;
    table.push(("operator granting itself admin", r));
    // A gateway creating a budget; reading another's lease; an auditor reading
    // outside its subtree.
    let r = refused(
        "an auditor creating a budget",
        LedgerClient::new(chan(c.as_principal("aud"), client))
            .create_budget(create("tenant/x", 5, "aud")),
        Some(Code::PermissionDenied),
        &["needs role operator on tenant/x"],
    )
    .await;
    table.push(("auditor creating a budget", r));
    let r = refused(
        "a gateway reading another's lease",
        LedgerClient::new(chan(c.as_principal("gw"), client))
            .get_lease(v1::GetLeaseRequest { lease_id: gw2, linearizable: false }),
        Some(Code::NotFound),
        &["is not live"],
    )
    .await;
    table.push(("gateway reading another gateway's lease", r));
    let r = refused(
        "an auditor reading the whole ledger's audit",
        LedgerClient::new(chan(c.as_principal("aud"), client))
            .query_audit(v1::QueryAuditRequest { limit: 10, ..Default::default() }),
        Some(Code::PermissionDenied),
        &["needs role auditor on *"],
    )
    .await;
    table.push(("auditor reading outside its subtree", r));
    // What they may do still works (reads change nothing).
    LedgerClient::new(chan(c.as_principal("aud"), client))
        .query_audit(v1::QueryAuditRequest {
            limit: 10,
            subtree: "tenant".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    LedgerClient::new(chan(c.as_principal("aud"), client))
        .get_lease(v1::GetLeaseRequest { lease_id: gw2, linearizable: false })
        .await
        .unwrap();
    // A scoped auditor sees records of its subtree without the figures of the
    // budgets above it that the same change touched; one on tenant sees them.
    let audit_as = |who: &'static str| {
        let chan = chan(c.as_principal(who), client);
        async move {
            LedgerClient::new(chan)
                .query_audit(v1::QueryAuditRequest {
                    limit: 100,
                    subtree: "tenant/sub".into(),
                    kinds: vec!["lease_granted".into()],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .records
        }
    };
    let budgets = |records: &[v1::AuditRecord]| -> std::collections::BTreeSet<String> {
        records.iter().flat_map(|r| r.balances.iter().map(|b| b.budget.clone())).collect()
    };
    let scoped = audit_as("ops").await;
    assert_eq!(scoped.len(), 1, "{scoped:?}");
    assert_eq!(budgets(&scoped), ["tenant/sub".to_owned()].into(), "{scoped:?}");
    let wider = audit_as("aud").await;
    assert_eq!(budgets(&wider), ["tenant".to_owned(), "tenant/sub".to_owned()].into());

    let after = c.digests().await;
    assert_eq!(before, after, "a refused call changed the ledger");
    // The revoked gateway still settles what it holds: spend that happened is
    // recorded whatever its roles.
    LedgerClient::new(chan(c.as_principal("gw2"), client))
        .release(v1::ReleaseRequest {
            meta: meta("c-gw2", 3, "gw2"),
            lease_id: gw2,
            consumed_total: 7,
        })
        .await
        .unwrap();
    for (what, (code, msg)) in &table {
        println!("| {what} | {code} | {msg} |");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_to_start_with_another_nodes_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let set =
        ration_tls::dev::write_set(&dir.path().join("certs"), &[1, 2], &["127.0.0.1".into()], &[])
            .unwrap();
    let (l, pl) = (listener().await, listener().await);
    let mut cfg = config(1, l.local_addr().unwrap(), dir.path().join("n1"), &[]);
    cfg.peer_listen = Some(pl.local_addr().unwrap());
    cfg.tls = Some(set.nodes[1].1.clone());
    let err = ration_server::start_split(cfg, l, Some(pl)).await.unwrap_err().to_string();
    assert!(err.contains("names node 2, but this is node 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_reloads_its_certificates_on_sighup_without_restarting() {
    let c = TlsCluster::start(1).await;
    c.leader().await;
    let addr = c.clients[&1];
    let ask = |tls: ClientTls| async move {
        ClusterClient::new(chan(tls, addr)).status(v1::StatusRequest { digest: false }).await
    };
    ask(c.as_principal("gw")).await.unwrap();

    // Node 1's files replaced by ones from a new CA, as a rotation would.
    let rotated = tempfile::tempdir().unwrap();
    let new = ration_tls::dev::write_set(
        rotated.path(),
        &[1],
        &["127.0.0.1".into(), "localhost".into()],
        &["gw".into()],
    )
    .unwrap();
    let mine = &c.set.nodes[0].1;
    for (from, to) in
        [(&new.ca, &mine.ca), (&new.nodes[0].1.cert, &mine.cert), (&new.nodes[0].1.key, &mine.key)]
    {
        std::fs::copy(from, to).unwrap();
    }
    let tls = c.nodes[&1].node.tls.clone().unwrap();
    let before = tls.reloads();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls.reloads() == before {
        assert!(Instant::now() < deadline, "no reload within 10 s of SIGHUP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New connections use the new files: the old CA's client is refused (it does
    // not trust the node's new certificate), the new CA's client is served.
    let old = ask(c.as_principal("gw")).await.unwrap_err();
    eprintln!("old CA's client after the rotation: {old:?}");
    let fresh = ClientTls::from_files(&new.principals[0].1).unwrap();
    let s = ask(fresh).await.unwrap().into_inner();
    assert_eq!(s.id, 1);
    assert_eq!(c.nodes[&1].node.tls.as_ref().unwrap().identity(), ration_tls::Identity::Node(1));
    c.shutdown().await;
}

/// A Pipeline call opened with a bearer token serves it until the token expires,
/// then refuses each further operation (UNAUTHENTICATED, saying so) without
/// running it: a stream does not outlive the token it was opened with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_opened_with_a_bearer_token_stops_when_the_token_expires() {
    use v1::{batch_op::Op, batch_result::Result as R};
    let c = TlsCluster::start(3).await;
    let leader = c.leader().await;
    c.role(leader, false, "gw", "operator", "tenant").await;
    c.role(leader, false, "gw", "gateway", "tenant").await;
    LedgerClient::new(chan(c.as_principal("gw"), c.clients[&leader]))
        .create_budget(create("tenant", 1, "gw"))
        .await
        .unwrap();
    let key = TokenKey::load(&c.token_key_file()).unwrap();
    let until = unix_now() + 2;
    let mut gw = LedgerClient::new(c.with_token(&key.issue("gw", until), c.clients[&leader]));
    let op = |request_id: u64| v1::PipelineOp {
        tag: request_id,
        op: Some(v1::BatchOp { op: Some(Op::Acquire(acquire("gw", request_id, "tenant"))) }),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut results =
        gw.pipeline(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(op(201)).await.unwrap();
    let (tag, r) = next(&mut results).await;
    assert!(tag == 201 && matches!(r, R::Lease(_)), "{tag} {r:?}");
    while unix_now() <= until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tx.send(op(202)).await.unwrap();
    let (tag, r) = next(&mut results).await;
    let R::Error(e) = r else { panic!("{r:?}") };
    assert_eq!((tag, e.code), (202, Code::Unauthenticated as i32), "{e:?}");
    assert!(e.message.contains("bearer token this call was opened with expired"), "{}", e.message);
    drop(tx);
    assert!(results.message().await.unwrap().is_none(), "the call ends with OK");
    // The refused operation was never run: only the first lease exists.
    let leases = LedgerClient::new(chan(c.as_principal("admin"), c.clients[&leader]))
        .get_budget(v1::GetBudgetRequest { path: "tenant".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leases.live_leases, 1, "{leases:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_without_a_certificate_authenticates_with_a_bearer_token() {
    let c = TlsCluster::start(3).await;
    let leader = c.leader().await;
    let follower = *c.clients.keys().find(|id| **id != leader).unwrap();
    let key = TokenKey::load(&c.token_key_file()).unwrap();
    let token = key.issue("gw", unix_now() + 600);

    // Through a follower: forwarded with the token's principal, audited as it.
    c.role(leader, false, "gw", "operator", "by-token").await;
    LedgerClient::new(c.with_token(&token, c.clients[&follower]))
        .create_budget(create("by-token", 1, "gw"))
        .await
        .unwrap();
    let records = LedgerClient::new(chan(c.as_principal("admin"), c.clients[&leader]))
        .query_audit(v1::QueryAuditRequest { limit: 100, linearizable: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .records;
    let made = records.iter().find(|r| r.budget == "by-token").expect("audited");
    assert_eq!(made.principal, "gw");

    let before = c.digests().await;
    let client = c.clients[&leader];
    let mut table = Vec::new();
    let r = refused(
        "a token for the wrong principal",
        LedgerClient::new(c.with_token(&token, client)).create_budget(create("x", 2, "admin")),
        Some(Code::PermissionDenied),
        &["authenticated as \"gw\""],
    )
    .await;
    table.push(("token for the wrong principal", r));
    let r = refused(
        "an expired token",
        LedgerClient::new(c.with_token(&key.issue("gw", unix_now() - 1), client))
            .create_budget(create("x", 3, "gw")),
        Some(Code::Unauthenticated),
        &["bearer token refused: the token expired"],
    )
    .await;
    table.push(("expired token", r));
    let forged = TokenKey::from_bytes(&[b'z'; 48]).issue("admin", unix_now() + 600);
    let r = refused(
        "a token made with another key",
        LedgerClient::new(c.with_token(&forged, client)).create_budget(create("x", 4, "admin")),
        Some(Code::Unauthenticated),
        &["does not verify"],
    )
    .await;
    table.push(("token made with another key", r));
    let r = refused(
        "a token on the peer port",
        RaftClient::new(c.with_token(&token, c.peers[&follower]))
            .append_entries(forged_append(leader, 99)),
        Some(Code::Unauthenticated),
        &["no client certificate"],
    )
    .await;
    table.push(("token on the peer port (forged AppendEntries)", r));
    assert_eq!(before, c.digests().await, "a refused call changed the ledger");
    for (what, (code, msg)) in &table {
        println!("| {what} | {code} | {msg} |");
    }
    c.shutdown().await;
}
