//! Snapshot files outside a running node: read the current one, inspect one, and
//! build a node's data directory from one (`rationctl snapshot save|restore`).
//!
//! A saved snapshot is exactly a node's `snapshot.bin`: openraft's metadata (last log
//! id, membership) and the body (the ledger's encoding and every audit record up to
//! its chain head), each section with its own SHA-256 and the file with a trailer
//! hash ([`crate::framing`]). Inspecting or restoring one checks every hash, then
//! decodes it fully: the ledger's invariants are re-checked and the audit chain is
//! verified end to end. A damaged file is refused with a message naming where.

use std::io::Write;
use std::path::Path;

use crate::{
    decode_body, open, read_snapshot_file, NodeId, OpenError, SnapshotBody, SnapshotFile,
    SNAPSHOT_FILE,
};
use ration_core::LedgerConfig;

/// What a snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub last_log_index: u64,
    pub last_log_term: u64,
    /// (id, address, voter)
    pub members: Vec<(u64, String, bool)>,
    pub budgets: usize,
    pub live_leases: usize,
    /// Length of the audit chain (records before the snapshot's chain head).
    pub audit_records: u64,
    /// Sealed segments the snapshot lists (the history before its tail; they are
    /// files of the data directory, not part of the snapshot).
    pub audit_segments: usize,
    /// The ledger's state digest (equal on every replica at this index).
    pub digest: [u8; 32],
}

/// The bytes of the snapshot `dir` holds now, if any.
pub fn current_snapshot(dir: &Path) -> Result<Option<Vec<u8>>, OpenError> {
    match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// When the snapshot `dir` holds now was written (built here, installed from the
/// leader, or restored), if there is one: the file's modification time.
pub fn current_snapshot_written_at(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir.join(SNAPSHOT_FILE)).and_then(|m| m.modified()).ok()
}

/// Decodes and checks a snapshot file's bytes.
pub fn inspect_snapshot(bytes: &[u8]) -> Result<SnapshotInfo, String> {
    let file = SnapshotFile::decode(bytes)?;
    let (state, manifest, _tail) = decode_body(&file.data)?;
    let last = file.meta.last_log_id;
    if last != state.last_applied {
        return Err(format!(
            "snapshot metadata says index {:?} but its body is at {:?}",
            last.map(|l| l.index),
            state.last_applied.map(|l| l.index)
        ));
    }
    let membership = file.meta.last_membership.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    Ok(SnapshotInfo {
        last_log_index: last.map_or(0, |l| l.index),
        last_log_term: last.map_or(0, |l| l.leader_id.term),
        members: membership
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect(),
        budgets: state.ledger.budget_count(),
        live_leases: state.ledger.live_lease_count(),
        audit_records: state.ledger.chain_head().next_seq,
        audit_segments: manifest.len(),
        digest: state.ledger.digest(),
    })
}

/// Builds a node's data directory in `dir` (which must not exist or be empty) from
/// a snapshot file's bytes. A node started on it resumes from the snapshot; it still
/// has to be made a member (join, or `rationctl member add` and `promote`), and the
/// leader sends it the log after the snapshot.
pub fn restore(dir: &Path, bytes: &[u8]) -> Result<SnapshotInfo, OpenError> {
    let info = inspect_snapshot(bytes)
        .map_err(|reason| OpenError::Snapshot { path: dir.join(SNAPSHOT_FILE), reason })?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(OpenError::NotEmpty { dir: dir.to_path_buf() });
    }
    std::fs::create_dir_all(dir)?;
    let tmp = crate::unique_tmp(dir);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    // Opening the store writes the snapshot's audit records into the tail and syncs.
    let (log, sm) = open(dir, LedgerConfig::default())?;
    if read_snapshot_file(&dir.join(SNAPSHOT_FILE))?.is_none() {
        return Err(OpenError::Snapshot {
            path: dir.join(SNAPSHOT_FILE),
            reason: "vanished while restoring".into(),
        });
    }
    log.db.flush()?;
    drop((log, sm));
    Ok(info)
}

/// Disaster recovery: builds the data directory of node `id` (serving at `addr`)
/// as the only voter of a new cluster, from a snapshot of a cluster that is lost.
///
/// The ledger and its audit records are the snapshot's, unchanged (the state digest
/// is preserved); the membership in the snapshot (both its metadata and its body)
/// is replaced by `{id: addr}` at the same log id; the directory gets a new cluster
/// id, so nodes of the old cluster can never exchange messages with the new one;
/// and the node's vote is set to the snapshot's last term, so its first election
/// is in a later term than every entry it holds. Started without
/// `--initial-cluster`, the node elects itself; the others join it (`--join`).
/// Returns what the snapshot holds and the new cluster id.
pub async fn restore_new_cluster(
    dir: &Path,
    bytes: &[u8],
    id: NodeId,
    addr: &str,
) -> Result<(SnapshotInfo, u64), OpenError> {
    let bad = |reason: String| OpenError::Snapshot { path: dir.join(SNAPSHOT_FILE), reason };
    if id == 0 {
        return Err(bad("node id 0 is not allowed".into()));
    }
    crate::check_peer_addr(addr).map_err(|e| {
        OpenError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("addr: {e}")))
    })?;
    inspect_snapshot(bytes).map_err(bad)?;
    let file = SnapshotFile::decode(bytes).map_err(bad)?;
    let body = SnapshotBody::decode(&file.data).map_err(bad)?;
    let last = file.meta.last_log_id;
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([id])],
        std::collections::BTreeMap::from([(id, openraft::BasicNode::new(addr))]),
    );
    let stored = openraft::StoredMembership::new(last, membership);
    let rewritten =
        SnapshotFile::new(last, stored, body.ledger, body.manifest, body.audit).encode();
    let info = restore(dir, &rewritten)?;
    crate::claim_node_id(dir, id)?;
    let (mut log, sm, identity) = crate::open_durable(dir, LedgerConfig::default()).await?;
    let cluster = crate::new_cluster_id(&(dir, id, addr));
    identity.adopt(cluster).map_err(OpenError::Sled)?;
    let term = last.map_or(0, |l| l.leader_id.term);
    openraft::storage::RaftLogStorage::save_vote(&mut log, &openraft::Vote::new(term, id))
        .await
        .map_err(|e| OpenError::Io(std::io::Error::other(e.to_string())))?;
    drop((log, sm));
    Ok((info, cluster))
}

/// Bytes in the files under `dir`, recursively (0 if it cannot be read).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The bytes of a snapshot file, exactly as a node writes one: `ledger` (the
/// ledger's own encoding) and `audit` (its records up to the chain head), applied
/// up to `last`, under `membership`. For tools and tests that make snapshot files
/// without a running node (the fuzz seeds use it).
pub fn snapshot_file_bytes(
    last: Option<openraft::LogId<crate::NodeId>>,
    membership: openraft::StoredMembership<crate::NodeId, openraft::BasicNode>,
    ledger: Vec<u8>,
    audit: Vec<ration_core::audit::AuditRecord>,
) -> Vec<u8> {
    SnapshotFile::new(last, membership, ledger, Vec::new(), audit).encode()
}

/// What [`copy_segments`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentsCopied {
    pub copied: usize,
    /// Listed segments not found in the source (first sequence number, count).
    pub missing: Vec<(u64, u64)>,
}

/// Copies into the data directory `dir` (restored from a snapshot) the audit
/// segments its snapshot lists, from `from` (an old data directory's `audit/`, or an
/// archive). Each is checked against the manifest (digest, chain, every record)
/// before it is kept. A node started on `dir` fetches any still missing from its
/// peers; in a new cluster with no peer holding them, queries of those records
/// answer UNAVAILABLE until they are copied in.
pub fn copy_segments(dir: &Path, from: &Path) -> Result<SegmentsCopied, OpenError> {
    let path = dir.join(SNAPSHOT_FILE);
    let file = read_snapshot_file(&path)?
        .ok_or_else(|| OpenError::Snapshot { path: path.clone(), reason: "missing".into() })?;
    let body = SnapshotBody::decode(&file.data)
        .map_err(|reason| OpenError::Snapshot { path: path.clone(), reason })?;
    let target = dir.join(crate::AUDIT_DIR);
    std::fs::create_dir_all(&target)?;
    let mut done = SegmentsCopied { copied: 0, missing: Vec::new() };
    for r in &body.manifest {
        let name = r.file_name();
        let src = from.join(&name);
        if !src.exists() {
            done.missing.push((r.first_seq, r.count));
            continue;
        }
        crate::segments::verify_file(&src, r)?;
        crate::segments::write_file_durably(&target, &name, |f| {
            std::io::copy(&mut std::fs::File::open(&src)?, f).map(|_| ())
        })?;
        done.copied += 1;
    }
    Ok(done)
}
