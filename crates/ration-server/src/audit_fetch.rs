//! Fetching the audit segments a node lacks.
//!
//! A node that installs a snapshot gets the ledger, the manifest of sealed audit
//! segments and the records after them, but not the segments (the history). This
//! task fetches each listed segment the node lacks from a peer (`Raft.
//! FetchAuditSegment`), into a temporary file, and keeps it only if it is exactly
//! what the manifest names (digest, chain, every record). It runs beside
//! replication, never in its way: one segment at a time, on its own connection
//! with the long-call deadline, and reads that need a missing segment answer
//! UNAVAILABLE meanwhile.

use std::sync::Weak;
use std::time::Duration;

use ration_proto::v1;
use ration_store::segments::SegmentRef;
use tokio::io::AsyncWriteExt;

use crate::Node;

/// How often the task looks for missing segments when it found none.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// Backoff after a round in which no peer could serve a missing segment.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs until the node is dropped.
pub(crate) async fn run(node: Weak<Node>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(n) = node.upgrade() else { return };
        let missing = n.reader.audit.missing();
        if missing.is_empty() {
            drop(n);
            backoff = BACKOFF_MIN;
            tokio::time::sleep(IDLE_CHECK).await;
            continue;
        }
        let mut progress = false;
        for want in missing {
            match fetch_one(&n, &want).await {
                Ok(()) => progress = true,
                Err(e) => {
                    tracing::warn!(
                        first = want.first_seq,
                        count = want.count,
                        error = %e,
                        "could not fetch an audit segment from any peer; will retry"
                    );
                    break;
                }
            }
        }
        drop(n);
        if progress {
            backoff = BACKOFF_MIN;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Fetches `want` from the first peer that has it.
async fn fetch_one(node: &Node, want: &SegmentRef) -> Result<(), String> {
    let peers: Vec<String> = {
        let state = node.reader.state();
        state
            .membership
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.id)
            .map(|(_, n)| n.addr.clone())
            .collect()
    };
    let dir = node.reader.audit.fetch_dir().ok_or("this node keeps no segments")?;
    let mut errors = Vec::new();
    for addr in peers {
        match fetch_from(node, &addr, want, &dir).await {
            Ok(true) => {
                tracing::info!(
                    first = want.first_seq,
                    count = want.count,
                    bytes = want.bytes,
                    from = %addr,
                    "fetched an audit segment"
                );
                node.metrics
                    .audit_segments_fetched
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
            Ok(false) => return Ok(()), // no longer listed
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    if errors.is_empty() {
        return Err("no peer to fetch from".into());
    }
    Err(errors.join("; "))
}

async fn fetch_from(
    node: &Node,
    addr: &str,
    want: &SegmentRef,
    dir: &std::path::Path,
) -> Result<bool, String> {
    let channel = node.long_calls.get(addr).map_err(|e| e.to_string())?;
    let mut client = v1::raft_client::RaftClient::new(channel)
        .max_decoding_message_size(node.config.peer_max_message_bytes);
    let req = v1::FetchAuditSegmentRequest {
        first_seq: want.first_seq,
        count: want.count,
        cluster_id: node.identity.get(),
    };
    let mut stream =
        client.fetch_audit_segment(req).await.map_err(|s| s.message().to_owned())?.into_inner();
    tokio::fs::create_dir_all(dir).await.map_err(|e| e.to_string())?;
    let tmp = dir.join(format!("{}.fetch", want.file_name()));
    let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| e.to_string())?;
    let mut got = 0u64;
    let received = async {
        while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_owned())? {
            got += chunk.data.len() as u64;
            if got > want.bytes {
                return Err(format!("sent more than the {} bytes the manifest names", want.bytes));
            }
            file.write_all(&chunk.data).await.map_err(|e| e.to_string())?;
        }
        file.flush().await.map_err(|e| e.to_string())
    }
    .await;
    drop(file);
    if let Err(e) = received {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let audit = node.reader.audit.clone();
    let want = want.clone();
    let tmp2 = tmp.clone();
    let kept = ration_store::off_async(move || audit.install_segment(&tmp2, &want))
        .await
        .map_err(|e| e.to_string())?;
    if kept.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    kept.map_err(|e| e.to_string())
}
