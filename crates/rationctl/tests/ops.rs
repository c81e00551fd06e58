//! Operations against real 3-node clusters (in-process nodes, real sockets):
//! every `rationctl` command, snapshot save and restore into a node that rejoins,
//! audit export/verify (with a tampered file), and a metrics scrape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ration_proto::v1;
use ration_testkit::inproc::{self, Cluster};
use ration_testkit::{eventually, ledger, meta};
use serde_json::Value;

/// Runs rationctl in-process against `endpoints`; Ok(stdout) or Err(message).
async fn ctl(endpoints: &[SocketAddr], args: &[&str]) -> Result<String, String> {
    let eps: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let eps = eps.join(",");
    let mut argv = vec!["rationctl", "--endpoints", &eps, "--timeout-ms", "5000"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    match rationctl::run(argv, &mut out).await {
        Ok(()) => Ok(String::from_utf8(out).unwrap()),
        Err(e) => Err(format!("{e:#}")),
    }
}

async fn ctl_json(endpoints: &[SocketAddr], args: &[&str]) -> Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    let out = ctl(endpoints, &a).await.unwrap_or_else(|e| panic!("rationctl {args:?}: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rationctl {args:?} printed {out}: {e}"))
}

fn all(c: &Cluster) -> Vec<SocketAddr> {
    c.nodes.keys().map(|id| c.addrs[id]).collect()
}

/// A spent lease: acquire `wanted` on `budget` and release it with `used` consumed.
async fn spend(addr: SocketAddr, client: &str, budget: &str, wanted: i64, used: i64) {
    let mut l = ledger(addr);
    let lease = l
        .acquire(v1::AcquireRequest {
            meta: meta(client, 1, client),
            budget: budget.into(),
            unit: "tokens".into(),
            wanted,
            min: 1,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    l.release(v1::ReleaseRequest {
        meta: meta(client, 2, client),
        lease_id: lease.lease_id,
        consumed_total: used,
    })
    .await
    .unwrap();
}

/// A new node `id` that names the cluster but is not the lowest id, so it waits to
/// be added (`member add`).
async fn waiting_node(c: &Cluster, id: u64) -> (ration_server::NodeHandle, SocketAddr) {
    let l = inproc::listener().await;
    let addr = l.local_addr().unwrap();
    let mut cfg = c.config(1);
    cfg.node_id = id;
    cfg.listen = addr;
    cfg.data_dir = c.dir.path().join(format!("node-{id}"));
    cfg.initial_cluster.push(format!("{id}={addr}"));
    (ration_server::start(cfg, l).await.unwrap(), addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_end_to_end() {
    let mut c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let eps = all(&c);

    let members = ctl_json(&eps, &["member", "list"]).await;
    let members = members.as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["role"] == "voter"));
    assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);
    let table = ctl(&eps, &["member", "list"]).await.unwrap();
    assert!(table.starts_with("ID") && table.contains("voter"), "{table}");

    // Node 4 names the cluster but is not the lowest id, so it waits to be added.
    let (node4, addr4) = waiting_node(&c, 4).await;

    let added = ctl_json(&eps, &["member", "add", "4", &addr4.to_string()]).await;
    let four = added.as_array().unwrap().iter().find(|m| m["id"] == 4).unwrap().clone();
    assert_eq!(four["role"], "learner");
    let again = ctl(&eps, &["member", "add", "4", &addr4.to_string()]).await.unwrap_err();
    assert!(again.contains("already a member"), "{again}");
    let promoted = ctl_json(&eps, &["member", "promote", "4"]).await;
    assert!(promoted.as_array().unwrap().iter().any(|m| m["id"] == 4 && m["role"] == "voter"));

    // Status from all four endpoints: one leader, same term, node 4 caught up.
    let mut eps4 = eps.clone();
    eps4.push(addr4);
    eventually("node 4 catches up", Duration::from_secs(20), || async {
        let rows = ctl_json(&eps4, &["endpoint", "status"]).await;
        let rows = rows.as_array().unwrap().clone();
        rows.len() == 4
            && rows.iter().all(|r| r["lag"] == 0 && r["term"] == rows[0]["term"])
            && rows.iter().filter(|r| r["role"] == "leader").count() == 1
            && rows.iter().all(|r| r["data_bytes"].as_u64().unwrap() > 0)
    })
    .await;
    let table = ctl(&eps4, &["endpoint", "status"]).await.unwrap();
    assert!(table.contains("LAG") && table.contains("leader"), "{table}");
    let health = ctl_json(&eps4, &["endpoint", "health"]).await;
    assert!(health.as_array().unwrap().iter().all(|h| h["healthy"] == true));

    // Move leadership to node 4, then take it out again.
    let moved = ctl_json(&eps, &["leader", "move", "4"]).await;
    assert!(moved.as_array().unwrap().iter().any(|m| m["id"] == 4 && m["leader"] == true));
    let back = if leader == 4 { 1 } else { leader };
    ctl(&eps, &["leader", "move", &back.to_string()]).await.unwrap();
    let removed = ctl_json(&eps, &["member", "remove", "4"]).await;
    let ids: Vec<u64> =
        removed.as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    let err = ctl(&eps, &["member", "remove", "9"]).await.unwrap_err();
    assert!(err.contains("node 9 is not a member"), "{err}");
    let err = ctl(&eps, &["member", "promote", "9"]).await.unwrap_err();
    assert!(err.contains("not a member"), "{err}");

    // The cluster still writes without node 4.
    node4.stop().await.unwrap();
    ctl(&eps, &["budget", "set", "after", "--limit", "tokens=5/day"]).await.unwrap();

    // Node 5 is added the same way after node 4's removal: replaying the log, it
    // applies memberships without itself (before it was added, node 4's removal)
    // and must not take them for its own removal.
    let (node5, addr5) = waiting_node(&c, 5).await;
    ctl_json(&eps, &["member", "add", "5", &addr5.to_string()]).await;
    let mut eps5 = eps.clone();
    eps5.push(addr5);
    eventually("node 5 catches up", Duration::from_secs(20), || async {
        let rows = ctl_json(&eps5, &["endpoint", "status"]).await;
        rows.as_array().unwrap().iter().all(|r| r["lag"] == 0)
            && rows.as_array().unwrap().len() == 4
    })
    .await;
    // Past two removal probes, it still serves and is still a member.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rows = ctl_json(&[addr5], &["member", "list"]).await;
    assert!(rows.as_array().unwrap().iter().any(|m| m["id"] == 5), "{rows}");
    ctl_json(&eps, &["member", "remove", "5"]).await;
    node5.stop().await.unwrap();

    // A dead endpoint: health says which, and fails.
    c.stop(3).await;
    let err = ctl(&eps, &["endpoint", "health"]).await.unwrap_err();
    assert!(err.contains(&c.addrs[&3].to_string()), "{err}");
    let err = ctl(&[c.addrs[&3]], &["member", "list"]).await.unwrap_err();
    assert!(err.contains("no endpoint answered"), "{err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_restores_into_a_new_node_that_rejoins() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let eps = all(&c);
    ctl(&eps, &["budget", "set", "acme", "--limit", "tokens=1000/day"]).await.unwrap();
    ctl(&eps, &["budget", "set", "acme/search", "--limit", "tokens=600/day"]).await.unwrap();
    for i in 0..5 {
        spend(c.addrs[&leader], &format!("gw-{i}"), "acme/search", 50, 10 + i).await;
    }

    let file = c.dir.path().join("acme.snap");
    let saved = ctl_json(&eps, &["snapshot", "save", file.to_str().unwrap()]).await;
    assert_eq!(saved["budgets"], 2);
    assert!(saved["audit_records"].as_u64().unwrap() >= 12, "{saved}");
    assert!(saved["last_log_index"].as_u64().unwrap() > 0);
    let status = ctl_json(&eps, &["snapshot", "status", file.to_str().unwrap()]).await;
    assert_eq!(status["state_digest"], saved["state_digest"]);

    // A corrupted copy is refused, by status and by restore.
    let bad = c.dir.path().join("bad.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&bad, &bytes).unwrap();
    let err = ctl(&eps, &["snapshot", "status", bad.to_str().unwrap()]).await.unwrap_err();
    assert!(err.contains("does not check"), "{err}");

    // Writes after the snapshot reach the restored node through the log.
    spend(c.addrs[&leader], "gw-late", "acme/search", 20, 20).await;

    let dir4 = c.dir.path().join("node-4");
    let restored = ctl_json(
        &eps,
        &["snapshot", "restore", file.to_str().unwrap(), "--data-dir", dir4.to_str().unwrap()],
    )
    .await;
    assert_eq!(restored["state_digest"], saved["state_digest"]);
    let err = ctl(
        &eps,
        &["snapshot", "restore", file.to_str().unwrap(), "--data-dir", dir4.to_str().unwrap()],
    )
    .await
    .unwrap_err();
    assert!(err.contains("not empty"), "{err}");
    // Its cause said once: the directory appears once.
    assert_eq!(err.matches(dir4.to_str().unwrap()).count(), 1, "{err}");

    let l4 = inproc::listener().await;
    let addr4 = l4.local_addr().unwrap();
    let mut cfg = c.config(1);
    cfg.node_id = 4;
    cfg.listen = addr4;
    cfg.data_dir = dir4;
    cfg.initial_cluster = Vec::new();
    cfg.join = Some(c.addrs[&1].to_string());
    cfg.join_as = "voter".into();
    // Supervised as rationd runs it: the restored directory's membership (the
    // snapshot's) does not list node 4, which must not count as being removed.
    let node4 = ration_server::start(cfg, l4).await.unwrap();
    let (stop4, stopped4) = tokio::sync::oneshot::channel::<()>();
    let node4 = tokio::spawn(ration_server::supervise(node4, async move {
        let _ = stopped4.await;
    }));
    eventually("node 4 is a voter", Duration::from_secs(30), || async {
        let m = ctl_json(&eps, &["member", "list"]).await;
        m.as_array().unwrap().iter().any(|m| m["id"] == 4 && m["role"] == "voter")
    })
    .await;
    let mut eps4 = eps.clone();
    eps4.push(addr4);
    eventually("every node at the same index and digest", Duration::from_secs(30), || async {
        let mut digests = Vec::new();
        for a in &eps4 {
            match ration_testkit::status(*a).await {
                Some(s) => digests.push((s.applied_index, s.state_digest, s.audit_records)),
                None => return false,
            }
        }
        digests.iter().all(|d| *d == digests[0])
    })
    .await;
    // Node 4 serves what happened before and after the snapshot.
    let b = ctl_json(&[addr4], &["budget", "get", "acme/search"]).await;
    assert_eq!(b["limits"][0]["consumed"], 10 + 11 + 12 + 13 + 14 + 20);
    let verified = ctl_json(&[addr4], &["audit", "verify"]).await;
    assert_eq!(verified["from_genesis"], true);
    assert!(!node4.is_finished(), "node 4 stopped on its own");
    stop4.send(()).unwrap();
    node4.await.unwrap().unwrap();
    c.shutdown().await;
}

/// Disaster recovery: every node and its data is lost; a saved snapshot becomes a
/// new one-node cluster (`snapshot restore --new-cluster`), the others join it as
/// voters from empty directories, and the ledger is the one that was saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_cluster_is_rebuilt_from_a_snapshot() {
    // Small audit segments, so the snapshot carries only a tail and the history is
    // in segment files that the restore must bring along.
    let c = Cluster::start(3, |cfg| {
        cfg.audit_segment_min_records = 4;
        cfg.audit_segment_max_records = 8;
    })
    .await;
    let leader = c.leader().await;
    let eps = all(&c);
    ctl(&eps, &["budget", "set", "acme", "--limit", "tokens=1000/day"]).await.unwrap();
    for i in 0..4 {
        spend(c.addrs[&leader], &format!("gw-{i}"), "acme", 50, 20 + i).await;
    }
    let backups = tempfile::tempdir().unwrap();
    let file = backups.path().join("acme.snap");
    let saved = ctl_json(&eps, &["snapshot", "save", file.to_str().unwrap()]).await;
    assert!(saved["audit_segments"].as_u64().unwrap() >= 1, "{saved}");
    // The backup of the history: a copy of the audit segments of the node that
    // built the snapshot (every file of each node's audit/ directory, as rsync would).
    let segment_backup = backups.path().join("audit");
    std::fs::create_dir_all(&segment_backup).unwrap();
    for n in c.nodes.values() {
        let dir = n.node.config.data_dir.join("audit");
        for e in std::fs::read_dir(&dir).into_iter().flatten() {
            let e = e.unwrap();
            std::fs::copy(e.path(), segment_backup.join(e.file_name())).unwrap();
        }
    }
    let old_cluster = ration_testkit::status(c.addrs[&1]).await.unwrap().cluster_id;
    assert_ne!(old_cluster, 0);
    // Everything is lost: the nodes stop and their directories are deleted (the
    // cluster's temporary directory goes with it).
    let lost = c.dir.path().to_owned();
    c.shutdown().await;
    assert!(!lost.exists());

    let root = tempfile::tempdir().unwrap();
    let l1 = inproc::listener().await;
    let addr1 = l1.local_addr().unwrap();
    let dir1 = root.path().join("node-1");
    // Without --node-id and --addr, --new-cluster is refused before anything is written.
    let err = ctl(
        &[addr1],
        &["snapshot", "restore", file.to_str().unwrap(), "--data-dir", "x", "--new-cluster"],
    )
    .await
    .unwrap_err();
    assert!(err.contains("--node-id") && err.contains("--addr"), "{err}");
    // An address peers could not dial is refused, and nothing is written.
    let bad = root.path().join("bad");
    let err = ctl(
        &[addr1],
        &[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            bad.to_str().unwrap(),
            "--new-cluster",
            "--node-id",
            "1",
            "--addr",
            "not-an-address",
        ],
    )
    .await
    .unwrap_err();
    assert!(err.contains("is not host:port"), "{err}");
    assert!(!bad.exists());
    let restored = ctl_json(
        &[addr1],
        &[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            dir1.to_str().unwrap(),
            "--new-cluster",
            "--node-id",
            "1",
            "--addr",
            &addr1.to_string(),
            "--audit-segments",
            segment_backup.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(restored["state_digest"], saved["state_digest"]);
    assert_eq!(restored["segments_copied"], saved["audit_segments"], "{restored}");
    assert_eq!(restored["segments_missing"].as_array().unwrap().len(), 0, "{restored}");
    assert_eq!(restored["members"].as_array().unwrap().len(), 1, "{restored}");

    let start = |id: u64, addr: SocketAddr, dir: std::path::PathBuf, join: Option<String>| {
        let mut cfg = inproc::config(id, addr, dir, &[]);
        cfg.join = join;
        cfg.join_as = "voter".into();
        cfg
    };
    let mut nodes = BTreeMap::new();
    nodes.insert(1, ration_server::start(start(1, addr1, dir1, None), l1).await.unwrap());
    assert_eq!(ration_testkit::leader(&[addr1]).await, 1);
    let s1 = ration_testkit::status(addr1).await.unwrap();
    assert!(s1.cluster_id != 0 && s1.cluster_id != old_cluster, "{s1:?}");
    // The ledger is the saved one, audit chain included.
    let b = ctl_json(&[addr1], &["budget", "get", "acme"]).await;
    assert_eq!(b["limits"][0]["consumed"], 20 + 21 + 22 + 23);
    assert_eq!(ctl_json(&[addr1], &["audit", "verify"]).await["from_genesis"], true);

    // Two new nodes join it as voters, from empty directories.
    let mut addrs = vec![addr1];
    for id in 2..=3u64 {
        let l = inproc::listener().await;
        let addr = l.local_addr().unwrap();
        let cfg = start(id, addr, root.path().join(format!("node-{id}")), Some(addr1.to_string()));
        nodes.insert(id, ration_server::start(cfg, l).await.unwrap());
        addrs.push(addr);
    }
    eventually("three voters", Duration::from_secs(60), || async {
        let m = ctl_json(&[addr1], &["member", "list"]).await;
        m.as_array().unwrap().iter().filter(|m| m["role"] == "voter").count() == 3
    })
    .await;
    spend(addr1, "gw-after", "acme", 10, 10).await;
    let statuses = ration_testkit::converged(&addrs, Duration::from_secs(30)).await;
    assert!(statuses.iter().all(|s| s.cluster_id == s1.cluster_id), "{statuses:?}");
    let b = ctl_json(&[addrs[2]], &["budget", "get", "acme"]).await;
    assert_eq!(b["limits"][0]["consumed"], 20 + 21 + 22 + 23 + 10);
    // The joiners installed node 1's snapshot and fetched its segments: each holds
    // the whole chain, record for record.
    for id in 2..=3u64 {
        let reader = nodes[&id].node.reader.clone();
        eventually("the joiner fetched the audit segments", Duration::from_secs(30), || {
            let missing = reader.audit.missing().len();
            async move { missing == 0 }
        })
        .await;
    }
    let chain = ration_testkit::audit_records(addr1).await;
    for addr in &addrs[1..] {
        let theirs = ration_testkit::audit_records(*addr).await;
        assert_eq!(theirs.len(), chain.len());
        assert!(theirs.iter().zip(&chain).all(|(a, b)| a.hash == b.hash));
    }
    for (_, n) in nodes {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budgets_and_the_audit_ledger() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let eps = all(&c);

    ctl(
        &eps,
        &[
            "budget",
            "set",
            "acme",
            "--limit",
            "tokens=1000/day",
            "--limit",
            "tokens=5000/month+05:30",
        ],
    )
    .await
    .unwrap();
    for team in ["search", "chat"] {
        ctl(
            &eps,
            &["budget", "set", &format!("acme/{team}"), "--limit", "tokens=400/day,static=5"],
        )
        .await
        .unwrap();
    }
    ctl(&eps, &["budget", "set", "acme/chat/bots", "--limit", "tokens=100/hour"]).await.unwrap();
    // Update: version moves on; a stale expected version is refused.
    let b = ctl_json(&eps, &["budget", "set", "acme/chat", "--limit", "tokens=450/day"]).await;
    assert_eq!((b["version"].as_u64().unwrap(), b["limits"][0]["cap"].as_i64().unwrap()), (2, 450));
    let err = ctl(
        &eps,
        &["budget", "set", "acme/chat", "--limit", "tokens=1/day", "--expected-version", "1"],
    )
    .await
    .unwrap_err();
    assert!(err.contains("Aborted") || err.contains("version"), "{err}");
    let err =
        ctl(&eps, &["budget", "set", "x", "--limit", "tokens=1/fortnight"]).await.unwrap_err();
    assert!(err.contains("fortnight"), "{err}");
    let err = ctl(&eps, &["budget", "set", "nowhere/child", "--limit", "tokens=1/day"])
        .await
        .unwrap_err();
    assert!(err.contains("nowhere"), "{err}");

    spend(c.addrs[&leader], "gw-a", "acme/search", 100, 70).await;
    spend(c.addrs[&leader], "gw-b", "acme/chat/bots", 50, 30).await;

    let got = ctl_json(&eps, &["budget", "get", "acme/chat/bots"]).await;
    assert_eq!(got["limits"][0]["consumed"], 30);
    assert_eq!(got["limits"][0]["remaining"], 70);
    let err = ctl(&eps, &["budget", "get", "acme/nope"]).await.unwrap_err();
    assert!(err.contains("acme/nope does not exist"), "{err}");

    let tree = ctl(&eps, &["budget", "list"]).await.unwrap();
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with("BUDGET"), "{tree}");
    assert!(lines[1].starts_with("acme "), "{tree}");
    assert!(
        tree.contains("├─ chat") && tree.contains("│  └─ bots") && tree.contains("└─ search"),
        "{tree}"
    );
    assert!(tree.contains("month+05:30"), "{tree}");
    let listed = ctl_json(&eps, &["budget", "list", "--subtree", "acme/chat"]).await;
    let paths: Vec<&str> =
        listed.as_array().unwrap().iter().map(|b| b["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["acme/chat", "acme/chat/bots"]);
    let root = &ctl_json(&eps, &["budget", "list"]).await[0];
    assert_eq!(root["limits"][0]["consumed"], 100, "{root}");

    // Query by subtree, principal, kind and time.
    let q = ctl_json(&eps, &["audit", "query", "--subtree", "acme/chat"]).await;
    assert!(q
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["budget"].as_str().unwrap().starts_with("acme/chat")));
    let q = ctl_json(&eps, &["audit", "query", "--principal", "gw-a", "--kind", "lease_released"])
        .await;
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0]["consumed"].as_u64(), q[0]["returned"].as_u64()), (Some(70), Some(30)));
    let q = ctl_json(
        &eps,
        &["audit", "query", "--from", "-1h", "--to", "now", "--kind", "lease_granted"],
    )
    .await;
    assert_eq!(q.as_array().unwrap().len(), 2);
    let q = ctl_json(&eps, &["audit", "query", "--to", "2000-01-01"]).await;
    assert!(q.as_array().unwrap().is_empty());
    let err = ctl(&eps, &["audit", "query", "--kind", "lease_stolen"]).await.unwrap_err();
    assert!(err.contains("unknown audit kind"), "{err}");
    let table = ctl(&eps, &["audit", "query"]).await.unwrap();
    assert!(table.contains("budget_created") && table.contains("lease_released"), "{table}");
    assert!(table.contains("showing 9 of 9 matching records, newest first"), "{table}");
    // Newest first, and how many were cut off.
    let table = ctl(&eps, &["audit", "query", "--limit", "2"]).await.unwrap();
    assert!(
        table.contains("showing 2 of 9 matching records, newest first (--limit 0 for all)"),
        "{table}"
    );
    let newest = ctl_json(&eps, &["audit", "query", "--limit", "2"]).await;
    let seqs: Vec<u64> =
        newest.as_array().unwrap().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [8, 7]);
    // Kinds comma-separated; an empty time range is refused, not answered with nothing.
    let q = ctl_json(&eps, &["audit", "query", "--kind", "lease_granted,lease_released"]).await;
    assert_eq!(q.as_array().unwrap().len(), 4);
    let err = ctl(&eps, &["audit", "query", "--from", "-24h", "--to", "-48h"]).await.unwrap_err();
    assert!(err.contains("is not before --to") && err.contains("empty"), "{err}");
    let err = ctl(&eps, &["audit", "spend", "--subtree", "acme", "--from", "-1h", "--to", "-2h"])
        .await
        .unwrap_err();
    assert!(err.contains("is not before --to") && err.contains("empty"), "{err}");

    // Spend per budget per window, rolled up the tree.
    let s = ctl_json(&eps, &["audit", "spend", "--subtree", "acme", "--window", "day"]).await;
    // (Numbers as numbers, times as epoch ms.)
    let spent: BTreeMap<String, i64> = s
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(
                r["window_start_ms"].as_u64().is_some() && r["window_end_ms"].as_u64().is_some(),
                "{r}"
            );
            (r["budget"].as_str().unwrap().to_owned(), r["spent"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(spent["acme"], 100);
    assert_eq!(spent["acme/chat"], 30);
    assert_eq!(spent["acme/search"], 70);

    // Export round-trips, in both formats, and verifies; the live chain verifies.
    // verify reads each node's own copy: let the followers apply everything first.
    c.converged().await;
    let live = ctl_json(&eps, &["audit", "verify"]).await;
    let n = live["records"].as_u64().unwrap();
    // 4 creates, 1 update, 2 grants, 2 releases.
    assert_eq!(n, 9, "{live}");
    let mut all_records: Vec<Value> =
        ctl_json(&eps, &["audit", "query", "--limit", "0"]).await.as_array().unwrap().clone();
    all_records.reverse(); // queries answer newest first; exports run oldest first
    assert_eq!(all_records.len() as u64, n);
    for (format, name) in [("jsonl", "audit.jsonl"), ("csv", "audit.csv")] {
        let path = c.dir.path().join(name);
        ctl(&eps, &["audit", "export", "--format", format, "--out", path.to_str().unwrap()])
            .await
            .unwrap();
        let format =
            if format == "csv" { rationctl::FileFormat::Csv } else { rationctl::FileFormat::Jsonl };
        let back = rationctl_read(&path, format);
        assert_eq!(back, all_records, "{name} does not round-trip");
        let v = ctl_json(&eps, &["audit", "verify", "--file", path.to_str().unwrap()]).await;
        assert_eq!((v["records"].as_u64(), &v["head_hash"]), (Some(n), &live["head_hash"]));
    }
    // Stdout export, a range of it, equals the file's lines.
    let part = ctl(&eps, &["audit", "export", "--from-seq", "2", "--to-seq", "5"]).await.unwrap();
    assert_eq!(part.lines().count(), 3);
    let whole = std::fs::read_to_string(c.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(part.lines().collect::<Vec<_>>(), whole.lines().skip(2).take(3).collect::<Vec<_>>());

    // One altered amount in the middle of an export: verify names that record.
    let tampered = c.dir.path().join("tampered.jsonl");
    let mut lines: Vec<String> = whole.lines().map(str::to_owned).collect();
    let victim = lines
        .iter()
        .position(|l| l.contains("\"consumed\":70"))
        .expect("the release of 70 is exported");
    lines[victim] = lines[victim].replacen("\"consumed\":70", "\"consumed\":7", 1);
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let err =
        ctl(&eps, &["audit", "verify", "--file", tampered.to_str().unwrap()]).await.unwrap_err();
    assert!(
        err.contains(&format!("breaks at record {victim}"))
            && err.contains("does not match its hash"),
        "{err}"
    );
    // A deleted record is a gap.
    let mut gap: Vec<String> = whole.lines().map(str::to_owned).collect();
    gap.remove(3);
    std::fs::write(&tampered, gap.join("\n")).unwrap();
    let err =
        ctl(&eps, &["audit", "verify", "--file", tampered.to_str().unwrap()]).await.unwrap_err();
    assert!(
        err.contains("breaks at record 4") && err.contains("expected sequence number 3"),
        "{err}"
    );
    // The same alteration in CSV.
    let csv = std::fs::read_to_string(c.dir.path().join("audit.csv")).unwrap();
    let mut rows: Vec<String> = csv.lines().map(str::to_owned).collect();
    let row = rows.iter().position(|l| l.contains(",70,30,")).expect("the release row");
    rows[row] = rows[row].replacen(",70,30,", ",60,40,", 1);
    let tampered_csv = c.dir.path().join("tampered.csv");
    std::fs::write(&tampered_csv, rows.join("\n")).unwrap();
    let err = ctl(&eps, &["audit", "verify", "--file", tampered_csv.to_str().unwrap()])
        .await
        .unwrap_err();
    assert!(err.contains(&format!("breaks at record {}", row - 1)), "{err}");

    // Delete a leaf; deleting one with children is refused.
    let err = ctl(&eps, &["budget", "delete", "acme/chat"]).await.unwrap_err();
    assert!(err.contains("FailedPrecondition") || err.contains("child"), "{err}");
    ctl(&eps, &["budget", "delete", "acme/chat/bots"]).await.unwrap();
    let err = ctl(&eps, &["budget", "get", "acme/chat/bots"]).await.unwrap_err();
    assert!(err.contains("does not exist"), "{err}");
    c.shutdown().await;
}

fn rationctl_read(path: &std::path::Path, format: rationctl::FileFormat) -> Vec<Value> {
    rationctl::audit::read_export(path, format)
        .unwrap()
        .iter()
        .map(|r| serde_json::to_value(rationctl::audit::Exported::from_core(r)).unwrap())
        .collect()
}

/// GET /metrics over plain HTTP/1.0.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// Parses the exposition text: every sample's `name{labels}` to its value. Fails on
/// a malformed line or a sample whose family has no TYPE line before it.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        if series.contains('{') {
            assert!(series.ends_with('}'), "{line}");
        }
        assert!(samples.insert(series.to_owned(), value).is_none(), "duplicate series {series}");
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_scraped_and_parsed() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let eps = all(&c);
    ctl(&eps, &["budget", "set", "acme", "--limit", "tokens=100/day"]).await.unwrap();
    spend(c.addrs[&leader], "gw-a", "acme", 60, 25).await;
    // Hold 50 outstanding, then ask for more than remains: a denial.
    let mut l = ledger(c.addrs[&leader]);
    let held = l
        .acquire(v1::AcquireRequest {
            meta: meta("gw-b", 1, "gw-b"),
            budget: "acme".into(),
            unit: "tokens".into(),
            wanted: 50,
            min: 50,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.granted, 50);
    let denied = l
        .acquire(v1::AcquireRequest {
            meta: meta("gw-c", 1, "gw-c"),
            budget: "acme".into(),
            unit: "tokens".into(),
            wanted: 40,
            min: 40,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::ResourceExhausted);
    // An overrun of 5 tokens: counted as consumed, and by unit.
    l.report_overrun(v1::OverrunRequest {
        meta: meta("gw-d", 1, "gw-d"),
        budget: "acme".into(),
        unit: "tokens".into(),
        amount: 5,
    })
    .await
    .unwrap();
    // A snapshot on the node that answers first: its snapshot series move.
    let snap = tempfile::tempdir().unwrap();
    let file = snap.path().join("s.snap");
    ctl(&eps, &["snapshot", "save", file.to_str().unwrap()]).await.unwrap();
    c.converged().await;

    let mut leaders = 0;
    let mut snapshots = 0;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for (id, handle) in &c.nodes {
        let addr = *handle.node.metrics_addr.get().expect("metrics are served");
        let m = parse_metrics(&scrape(addr).await);
        let is_leader = *id == leader;
        leaders += m["ration_raft_is_leader"] as u32;
        assert_eq!(m["ration_raft_is_leader"], f64::from(u8::from(is_leader)), "node {id}");
        assert_eq!(m["ration_raft_leader_id"], leader as f64);
        assert_eq!(m["ration_raft_apply_lag"], 0.0, "node {id}");
        assert!(m["ration_raft_term"] >= 1.0);
        assert_eq!(m["ration_raft_applied_index"], m["ration_raft_commit_index"]);
        assert_eq!(
            m[&format!("ration_node_info{{node_id=\"{id}\",addr=\"{}\"}}", c.addrs[id])],
            1.0
        );
        let series =
            |name: &str| format!("{name}{{budget=\"acme\",unit=\"tokens\",window=\"day\"}}");
        assert_eq!(m["ration_live_leases"], 1.0);
        let (snap_index, written) =
            (m["ration_snapshot_last_index"], m["ration_snapshot_timestamp_seconds"]);
        assert_eq!(
            m["ration_snapshot_entries_behind"],
            m["ration_raft_applied_index"] - snap_index,
            "node {id}"
        );
        if snap_index > 0.0 {
            snapshots += 1;
            assert!((now - written).abs() < 120.0, "node {id}: snapshot written at {written}");
        } else {
            assert_eq!(written, 0.0, "node {id}");
        }
        assert_eq!(
            m[&format!("ration_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))],
            1.0
        );
        if is_leader {
            // Per-budget series come from the leader only.
            assert_eq!(m[&series("ration_budget_cap")], 100.0, "node {id}");
            assert_eq!(m[&series("ration_budget_consumed")], 30.0, "node {id}");
            assert_eq!(m[&series("ration_budget_outstanding")], 50.0, "node {id}");
            assert_eq!(m[&series("ration_budget_remaining")], 20.0, "node {id}");
            assert_eq!(m["ration_overruns_total"], 1.0);
            assert_eq!(m["ration_overrun_units_total{unit=\"tokens\"}"], 5.0);
            assert_eq!(m[&series("ration_budget_upcoming")], 0.0, "node {id}");
            let left = m[&series("ration_budget_window_remaining_seconds")];
            assert!(left > 0.0 && left <= 86_400.0, "{left}");
            assert!(m[&series("ration_budget_window_end_timestamp_seconds")] > 1.7e9);
            assert_eq!(m["ration_grants_total"], 2.0);
            assert_eq!(m["ration_granted_units_total{unit=\"tokens\"}"], 110.0);
            assert_eq!(
                m["ration_denials_total{reason=\"resource_exhausted\",budget=\"acme\"}"],
                1.0
            );
            assert!(m["ration_proposal_batch_commands_count"] >= 4.0);
            assert_eq!(
                m["ration_proposal_batch_commands_bucket{le=\"+Inf\"}"],
                m["ration_proposal_batch_commands_count"]
            );
            // Timed by method and status: two grants and one refusal.
            let acquire = |code: &str| {
                format!("ration_rpc_duration_seconds_count{{method=\"/ration.v1.Ledger/Acquire\",code=\"{code}\"}}")
            };
            assert_eq!(m[&acquire("OK")], 2.0);
            assert_eq!(m[&acquire("RESOURCE_EXHAUSTED")], 1.0);
            assert!(
                m["ration_rpc_duration_seconds_sum{method=\"/ration.v1.Ledger/Acquire\",code=\"OK\"}"]
                    > 0.0
            );
        } else {
            assert!(
                !m.contains_key(&series("ration_budget_cap")),
                "node {id}: a follower's budget series"
            );
            assert_eq!(m["ration_grants_total"], 0.0);
            // Followers answer the leader's replication calls.
            assert!(
                m["ration_rpc_duration_seconds_count{method=\"/ration.v1.Raft/AppendEntries\",code=\"OK\"}"]
                    >= 1.0
            );
        }
    }
    assert_eq!(leaders, 1);
    assert!(snapshots >= 1, "no node reports the snapshot it saved");
    c.shutdown().await;
}
