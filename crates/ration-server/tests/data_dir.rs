//! A data directory belongs to one node: starting another node id on it is refused
//! with a message that says whose it is and what to do, and changes nothing. It
//! also keeps its cluster's id, in a file written durably, across restarts.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ration_testkit::inproc::{config, listener, rebind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_refuses_another_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node-1");
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let node = ration_server::start(config(1, addr, data.clone(), &[(1, addr)]), l).await.unwrap();
    node.stop().await.unwrap();
    let before = std::fs::read_to_string(data.join(ration_store::NODE_ID_FILE)).unwrap();
    assert_eq!(before.trim(), "1");

    let l = rebind(addr).await;
    let err =
        ration_server::start(config(2, addr, data.clone(), &[(2, addr)]), l).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("is the data directory of node 1, not node 2")
            && msg.contains("--node-id 1")
            && msg.contains("--data-dir"),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(data.join(ration_store::NODE_ID_FILE)).unwrap(), before);

    // Its own node starts on it again, in the same cluster.
    let l = rebind(addr).await;
    let node = ration_server::start(config(1, addr, data.clone(), &[(1, addr)]), l).await.unwrap();
    let cluster = node.node.identity.get();
    assert_ne!(cluster, 0);
    let file = std::fs::read_to_string(data.join(ration_store::CLUSTER_ID_FILE)).unwrap();
    assert_eq!(u64::from_str_radix(file.trim(), 16).unwrap(), cluster, "{file}");
    node.stop().await.unwrap();
    let l = rebind(addr).await;
    let node = ration_server::start(config(1, addr, data, &[(1, addr)]), l).await.unwrap();
    assert_eq!(node.node.identity.get(), cluster);
    node.stop().await.unwrap();
}

/// A second node on a data directory another one holds is refused (after waiting
/// a few seconds for a node that is still stopping), and the message says so once:
/// the directory, that it is in use, no OS error code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_is_refused_once_said() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node-1");
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let node = ration_server::start(config(1, addr, data.clone(), &[(1, addr)]), l).await.unwrap();
    let l2 = listener().await;
    let addr2 = l2.local_addr().unwrap();
    let err =
        ration_server::start(config(1, addr2, data.clone(), &[(1, addr2)]), l2).await.unwrap_err();
    let msg = format!("{err:#}");
    let shown = data.display().to_string();
    assert!(msg.contains("is in use by another rationd"), "{msg}");
    assert_eq!(msg.matches(&shown).count(), 1, "the directory is named once: {msg}");
    assert!(!msg.contains("WouldBlock") && !msg.contains("code: 11"), "{msg}");
    node.stop().await.unwrap();
}
