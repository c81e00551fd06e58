//! # ration-store
//!
//! Durable storage for a Ration node, behind openraft 0.9's storage traits
//! (`storage-v2`):
//!
//! - [`wal::WalLogStore`] keeps the Raft log, the vote, the committed log id and the
//!   last purged log id in a segmented write-ahead log. An append is reported to
//!   openraft, and a vote as saved, only after `fdatasync`. The log is the
//!   durability point of the whole ledger. ([`SledLogStore`], the same in sled, whose
//!   flush is not power-safe, remains for comparison: `log_store = "sled"`.)
//! - [`StateMachine`] keeps the ledger (`ration_core::Ledger`) in memory and writes
//!   each applied entry's audit records to the audit tail's file ([`tail`]),
//!   unflushed. A snapshot is the
//!   ledger's deterministic encoding plus the audit records, written to a file with
//!   fsync and an atomic rename. After a restart the state machine starts from the
//!   last snapshot and openraft re-applies the committed log after it.
//!
//! See ARCHITECTURE.md ("Durability") for what is durable when.

// openraft's traits fix the error type; it is large, and not ours to box.
#![allow(clippy::result_large_err)]

// A planted bug exists for the simulation to catch (crates/ration-sim/README.md) and
// only in debug builds: a release build with it (`--release --all-features`) is a
// compile error, so no release `rationd` can ship it.
#[cfg(all(feature = "planted-bug-ack-before-flush", not(debug_assertions)))]
compile_error!(
    "feature `planted-bug-ack-before-flush` plants a bug for the simulation to catch; it is refused in release builds"
);

use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use ration_core::audit::{verify_chain, AuditRecord, ChainHead};
use ration_core::{Ledger, LedgerConfig, Outcome};
use serde::{Deserialize, Serialize};

pub type NodeId = u64;

/// What one applied log entry answers: one outcome per command of its batch (none
/// for Raft's own blank and membership entries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub outcomes: Vec<Outcome>,
}

/// A ledger entry as openraft carries it: shared, so the copies openraft makes
/// (the log's cache of recent entries, replication, apply) cost a reference
/// count, not a copy of every command. Encoded exactly as the entry itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedEntry(pub std::sync::Arc<ration_core::Entry>);

impl From<ration_core::Entry> for SharedEntry {
    fn from(entry: ration_core::Entry) -> Self {
        Self(std::sync::Arc::new(entry))
    }
}

impl std::ops::Deref for SharedEntry {
    type Target = ration_core::Entry;
    fn deref(&self) -> &ration_core::Entry {
        &self.0
    }
}

impl Serialize for SharedEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ration_core::Entry::deserialize(d).map(Self::from)
    }
}

openraft::declare_raft_types!(
    /// Ration's openraft types: the replicated data is the versioned ledger entry.
    pub TypeConfig:
        D = SharedEntry,
        R = Response,
        NodeId = NodeId,
        Node = BasicNode,
        AsyncRuntime = runtime::RationRuntime,
);

pub mod audit_store;
pub mod backup;
pub mod framing;
pub mod mem;
pub mod runtime;
pub mod segments;
mod tail;
pub mod wal;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Opens (or creates) a node's storage in `dir` with the durable log: `dir/wal/`
/// (the Raft log and vote), `dir/sled/` (audit records, the cluster id) and
/// `dir/snapshot.bin`. Returns the log, the state machine and the cluster identity.
pub async fn open_durable(
    dir: &Path,
    config: LedgerConfig,
) -> Result<(wal::WalLogStore, StateMachine, ClusterIdentity), OpenError> {
    open_durable_with(dir, config, SealPolicy::default()).await
}

/// [`open_durable`] with a seal policy for the audit segments.
pub async fn open_durable_with(
    dir: &Path,
    config: LedgerConfig,
    policy: SealPolicy,
) -> Result<(wal::WalLogStore, StateMachine, ClusterIdentity), OpenError> {
    let wal_dir = dir.join(WAL_DIR);
    let fresh = !wal_dir.exists();
    let (sled_log, sm) = open_with(dir, config, policy)?;
    let identity = sled_log.identity().map_err(|e| OpenError::Io(std::io::Error::other(e)))?;
    if fresh
        && (!sled_log.is_empty()
            || sled_log.get_meta::<Vote<NodeId>>(VOTE).ok().flatten().is_some())
    {
        return Err(OpenError::Io(std::io::Error::other(format!(
            "{} holds a Raft log in sled (log_store = \"sled\"); start it with that setting, or restore a snapshot into a new directory",
            dir.display()
        ))));
    }
    let fs = wal::StdFs::new(&wal_dir)?;
    let log = wal::WalLogStore::open(Arc::new(fs)).await?;
    Ok((log, sm, identity))
}

/// Where the write-ahead log lives in a data directory.
pub const WAL_DIR: &str = "wal";

/// Checks a member address as peers will dial it: `host:port`, a host name or IP
/// address (IPv6 in brackets) and a port from 1 to 65535.
pub fn check_peer_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let bad = || {
        format!("{addr:?} is not host:port (for example 10.0.0.5:50051 or ration-2.ration:50051)")
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// The file that says which node a data directory belongs to.
pub const NODE_ID_FILE: &str = "node-id";

/// The file that says which cluster a data directory belongs to (hex).
pub const CLUSTER_ID_FILE: &str = "cluster-id";

/// Writes `dir/name` so that it survives a power cut once this returns: a
/// temporary file, fsync, rename, directory fsync.
fn write_durably(dir: &Path, name: &str, contents: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Makes `dir` the data directory of node `id`: the first start writes the id
/// (durably: temporary file, fsync, rename, directory fsync); every later start must
/// give the same id. Starting node 2 on node 1's directory would make it a node that
/// holds node 1's log and vote under another name.
pub fn claim_node_id(dir: &Path, id: NodeId) -> Result<(), OpenError> {
    let path = dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let holds: NodeId = text.trim().parse().map_err(|_| {
                OpenError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} does not hold a node id: {:?}", path.display(), text.trim()),
                ))
            })?;
            if holds != id {
                return Err(OpenError::WrongNode { dir: dir.to_path_buf(), holds, given: id });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_durably(dir, NODE_ID_FILE, &format!("{id}\n"))?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens (or creates) a node's storage in `dir` with the Raft log in sled:
/// `dir/sled/` and `dir/snapshot.bin`.
pub fn open(dir: &Path, config: LedgerConfig) -> Result<(SledLogStore, StateMachine), OpenError> {
    open_with(dir, config, SealPolicy::default())
}

/// Where sealed audit segments live in a data directory.
pub const AUDIT_DIR: &str = "audit";
/// The audit tail's file in the data directory ([`tail`]).
pub const AUDIT_TAIL_FILE: &str = "audit-tail-v2";
/// The tail file before each record was framed with its length: removed on open,
/// and what it held regenerated from the snapshot and the log.
const OLD_AUDIT_TAIL_FILE: &str = "audit-tail";

/// sled's page cache: it holds the log (`log_store = "sled"`), read mostly near
/// its end, and the node's metadata; the default (1 GiB) would let RSS grow with
/// the log.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// [`open`] with a seal policy for the audit segments.
pub fn open_with(
    dir: &Path,
    config: LedgerConfig,
    policy: SealPolicy,
) -> Result<(SledLogStore, StateMachine), OpenError> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new()
        .path(dir.join("sled"))
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| match e {
            // sled reports a held lock as an `Other` error wrapping the WouldBlock.
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                OpenError::Locked { dir: dir.to_path_buf() }
            }
            other => OpenError::Sled(other),
        })?;
    let log = SledLogStore {
        log: db.open_tree("log")?,
        meta: db.open_tree("meta")?,
        db: db.clone(),
        dir: dir.to_path_buf(),
    };
    // The audit tail was a sled tree before it had a file of its own: what it
    // held is regenerated from the snapshot and the log (`StateMachine::open`).
    if db.tree_names().iter().any(|n| n.as_ref() == b"audit") {
        db.drop_tree("audit")?;
    }
    match std::fs::remove_file(dir.join(OLD_AUDIT_TAIL_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let tail = tail::FileTail::open(&dir.join(AUDIT_TAIL_FILE))?;
    let audit =
        AuditStore::new(AuditBackend::File(Arc::new(tail)), Some(dir.join(AUDIT_DIR)), policy);
    let sm = StateMachine::open(Some(db), audit, SnapshotPlace::Dir(dir.to_path_buf()), config)?;
    Ok((log, sm))
}

/// Why storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (or a node of this one that is still stopping) holds the
    /// data directory's lock.
    #[error("{} is in use by another rationd (its lock is held)", dir.display())]
    Locked { dir: PathBuf },
    /// A restore's target directory holds something already.
    #[error("{} is not empty: restore only into a new data directory", dir.display())]
    NotEmpty { dir: PathBuf },
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("snapshot file {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    /// The data directory belongs to another node.
    #[error("{} is the data directory of node {holds}, not node {given}: start it with --node-id {holds}, or give node {given} its own --data-dir", dir.display())]
    WrongNode { dir: PathBuf, holds: NodeId, given: NodeId },
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    ration_core::encode(value)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&key[..8]);
    u64::from_be_bytes(bytes)
}

// ----- the log -----

/// The Raft log, vote and committed id in sled. sled's flush is
/// `sync_file_range` plus a periodic `fsync`, so a power cut can lose acknowledged
/// entries and votes: kept to compare against [`wal::WalLogStore`], not for
/// production.
#[derive(Clone, Debug)]
pub struct SledLogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// The data directory (where `cluster-id` is kept).
    dir: PathBuf,
}

const VOTE: &str = "vote";
const CLUSTER_ID: &str = "cluster_id";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

impl SledLogStore {
    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> StorageResult<Option<T>> {
        let bytes = self.meta.get(key).map_err(|e| StorageIOError::read(&e))?;
        bytes
            .map(|b| postcard::from_bytes(&b).map_err(|e| StorageIOError::read(&e).into()))
            .transpose()
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), sled::Error> {
        self.meta.insert(key, encode(value)).map(|_| ())
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(|_| ())
    }

    /// This node's cluster identity, as stored (0 until it is set or learned): the
    /// `cluster-id` file (written durably), else sled's copy (a directory from before
    /// the file existed, which then gets the file).
    pub fn identity(&self) -> Result<ClusterIdentity, ReadError> {
        let path = self.dir.join(CLUSTER_ID_FILE);
        let from_file = match std::fs::read_to_string(&path) {
            Ok(text) => Some(u64::from_str_radix(text.trim(), 16).map_err(|_| {
                ReadError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} does not hold a cluster id: {:?}", path.display(), text.trim()),
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ReadError::Io(e)),
        };
        let from_sled = match self.meta.get(CLUSTER_ID)? {
            Some(bytes) => postcard::from_bytes(&bytes)?,
            None => 0,
        };
        let id = match from_file {
            Some(id) => id,
            None if from_sled != 0 => {
                write_durably(&self.dir, CLUSTER_ID_FILE, &format!("{from_sled:016x}\n"))
                    .map_err(ReadError::Io)?;
                from_sled
            }
            None => 0,
        };
        Ok(ClusterIdentity {
            meta: Some((self.meta.clone(), self.dir.clone())),
            current: Arc::new(std::sync::atomic::AtomicU64::new(id)),
        })
    }

    /// Number of entries held (not purged).
    pub fn len(&self) -> usize {
        self.log.len()
    }

    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        for item in self.log.range(index_key(start)..) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            if !range.contains(&key_index(&key)) {
                break;
            }
            let entry: Entry<TypeConfig> =
                postcard::from_bytes(&value).map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id = self.get_meta::<LogId<NodeId>>(LAST_PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, value)) => {
                let entry: Entry<TypeConfig> =
                    postcard::from_bytes(&value).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(VOTE, vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.flush().await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not flushed on its own: it rides on the next log or vote flush. A committed
        // id lost in a crash only means re-applying later, never applying too much.
        self.put_meta(COMMITTED, &committed).map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&index_key(entry.log_id.index), encode(&entry));
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        // The durability point: only a flushed append is acknowledged.
        let flushed = self.flush().await;
        let result = flushed.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(result);
        flushed.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(index_key(log_id.index)..).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush().await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: entries at or before it are ignored from then on.
        self.put_meta(LAST_PURGED, &log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for key in self.log.range(..=index_key(log_id.index)).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        // Not flushed: openraft runs a purge inline in its core, and awaiting an
        // fsync here stalled the core (and widened the window of the race in
        // third_party/openraft/RATION-PATCH.md). A purge lost in a crash is harmless:
        // the entries it removed are all covered by the snapshot, and openraft
        // purges them again. The next append or vote flush makes it durable.
        Ok(())
    }
}

/// Runs blocking work (file writes, big encodes) off the async workers, on tokio's
/// blocking pool. On a current-thread runtime (the deterministic simulation, unit
/// tests) it runs inline instead: a pool thread finishing at a wall-clock moment
/// would make a simulated run differ from its replay.
pub async fn off_async<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
    {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

/// An id no other cluster is likely to have: the time, the process and `salt` (say,
/// the node's address and id) mixed by a hash. Never 0.
pub fn new_cluster_id(salt: &impl std::hash::Hash) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::time::SystemTime::now().hash(&mut h);
    std::process::id().hash(&mut h);
    salt.hash(&mut h);
    h.finish().max(1)
}

/// Which cluster this node belongs to: set by the node that initializes a cluster,
/// learned (and stored) by the others from the first message that carries it.
#[derive(Clone, Debug)]
pub struct ClusterIdentity {
    /// Where it is stored (sled's meta tree and the data directory, whose
    /// `cluster-id` file is the durable copy); None in memory, where `current`
    /// itself is the durable copy (shared with the simulated disk).
    meta: Option<(sled::Tree, PathBuf)>,
    current: Arc<std::sync::atomic::AtomicU64>,
}

impl ClusterIdentity {
    /// The id, or 0 while unknown.
    pub fn get(&self) -> u64 {
        self.current.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes `id` if none is set yet (and stores it durably). Returns the id now held.
    pub fn adopt(&self, id: u64) -> Result<u64, sled::Error> {
        if id == 0 {
            return Ok(self.get());
        }
        match self.current.compare_exchange(
            0,
            id,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        ) {
            Ok(_) => {
                if let Some((meta, dir)) = &self.meta {
                    write_durably(dir, CLUSTER_ID_FILE, &format!("{id:016x}\n"))
                        .map_err(sled::Error::Io)?;
                    meta.insert(CLUSTER_ID, encode(&id))?;
                    meta.flush()?;
                }
                Ok(id)
            }
            Err(held) => Ok(held),
        }
    }
}

// ----- the state machine -----

/// The applied state, shared with the services that read it.
#[derive(Debug)]
pub struct AppliedState {
    pub ledger: Ledger,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
}

/// A handle for readers: the ledger as applied on this node, and its audit records.
#[derive(Clone, Debug)]
pub struct Reader {
    state: Arc<RwLock<AppliedState>>,
    pub audit: AuditStore,
}

/// Reads the ledger time applied on this node, holding no storage (a task that
/// outlives the node's storage by a moment does not keep it locked).
#[derive(Clone, Debug)]
pub struct LedgerNow(Arc<RwLock<AppliedState>>);

impl LedgerNow {
    pub fn get(&self) -> u64 {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).ledger.now_ms()
    }
}

impl Reader {
    /// A handle on the applied ledger time only.
    pub fn ledger_now(&self) -> LedgerNow {
        LedgerNow(self.state.clone())
    }

    /// The applied state; hold the guard briefly (it blocks apply).
    pub fn state(&self) -> RwLockReadGuard<'_, AppliedState> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Audit records from sequence number `from`, in order, at most `limit`.
    pub fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, ReadError> {
        self.audit.read(from, limit)
    }
}

/// Why stored data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A sealed segment this node lists but has not fetched from a peer yet.
    #[error("audit records {first}..{end} are not on this node yet (it is fetching them from a peer); retry, or ask another node")]
    Missing { first: u64, end: u64 },
}

use audit_store::AuditBackend;
pub use audit_store::{ArchivePolicy, AuditStore, SealPolicy};
use segments::SegmentRef;

/// The ledger state machine for openraft.
#[derive(Debug)]
pub struct StateMachine {
    state: Arc<RwLock<AppliedState>>,
    /// Flushed before a snapshot is written (None in memory).
    db: Option<sled::Db>,
    audit: AuditStore,
    snapshots: SnapshotPlace,
    /// Held for a whole snapshot build and a whole install, so neither reads or
    /// replaces the audit records or the file while the other is under way.
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Where the current snapshot is kept: a file, or a simulated disk.
#[derive(Clone, Debug)]
enum SnapshotPlace {
    Dir(PathBuf),
    Mem(mem::MemDisk),
}

/// A snapshot's content: the ledger, the manifest of sealed audit segments, and the
/// audit records after them up to the ledger's chain head (the tail, fewer than
/// the seal policy's minimum: the history itself is never in a snapshot).
///
/// Encoded ([`SnapshotBody::encode`]) as four framed sections, each with its own
/// SHA-256 and the whole with a trailer hash (see [`framing`]): `head` (applied log
/// id and membership), `ledg` (the ledger's own encoding), `mani` (the segments:
/// range, boundary hashes, digest, size), `audt` (the tail). The body is what
/// openraft ships to a follower, so an install checks it too. A body of the older
/// format (magic `RATNBODY`, no `mani`, every record in `audt`) still decodes.
struct SnapshotBody {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    ledger: Vec<u8>,
    manifest: Vec<SegmentRef>,
    audit: Vec<AuditRecord>,
}

const BODY_MAGIC_V1: &[u8; 8] = b"RATNBODY";
const BODY_TAGS_V1: [&[u8; 4]; 3] = [b"head", b"ledg", b"audt"];
const BODY_MAGIC: &[u8; 8] = b"RATNBOD2";
const BODY_TAGS: [&[u8; 4]; 4] = [b"head", b"ledg", b"mani", b"audt"];
const FILE_MAGIC: &[u8; 8] = b"RATNSNAP";
const FILE_TAGS: [&[u8; 4]; 2] = [b"meta", b"body"];

impl SnapshotBody {
    fn encode(&self) -> Vec<u8> {
        let head = encode(&(&self.last_applied, &self.membership));
        framing::frame(
            BODY_MAGIC,
            &[
                (BODY_TAGS[0], &head),
                (BODY_TAGS[1], &self.ledger),
                (BODY_TAGS[2], &encode(&self.manifest)),
                (BODY_TAGS[3], &encode(&self.audit)),
            ],
        )
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let section = |name: &str, e: postcard::Error| {
            format!("snapshot body: section \"{name}\" does not decode: {e}")
        };
        if bytes.starts_with(BODY_MAGIC_V1) {
            let parts = framing::unframe("snapshot body", BODY_MAGIC_V1, &BODY_TAGS_V1, bytes)
                .map_err(|e| e.to_string())?;
            let (last_applied, membership) =
                postcard::from_bytes(parts[0]).map_err(|e| section("head", e))?;
            let audit =
                ration_core::audit::decode_records(parts[2]).map_err(|e| section("audt", e))?;
            return Ok(Self {
                last_applied,
                membership,
                ledger: parts[1].to_vec(),
                manifest: Vec::new(),
                audit,
            });
        }
        let parts = framing::unframe("snapshot body", BODY_MAGIC, &BODY_TAGS, bytes)
            .map_err(|e| e.to_string())?;
        let (last_applied, membership) =
            postcard::from_bytes(parts[0]).map_err(|e| section("head", e))?;
        let manifest = postcard::from_bytes(parts[2]).map_err(|e| section("mani", e))?;
        let audit = ration_core::audit::decode_records(parts[3]).map_err(|e| section("audt", e))?;
        Ok(Self { last_applied, membership, ledger: parts[1].to_vec(), manifest, audit })
    }
}

/// The snapshot file: openraft's metadata and the body's bytes, framed again as
/// sections `meta` and `body` with their own checksums and a trailer hash.
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

impl SnapshotFile {
    /// The snapshot of `ledger` (its own encoding), the sealed segments `manifest`
    /// and `audit` (the records after them up to the chain head), applied up to
    /// `last`, under `membership`.
    fn new(
        last: Option<LogId<NodeId>>,
        membership: StoredMembership<NodeId, BasicNode>,
        ledger: Vec<u8>,
        manifest: Vec<SegmentRef>,
        audit: Vec<AuditRecord>,
    ) -> Self {
        let data = SnapshotBody {
            last_applied: last,
            membership: membership.clone(),
            ledger,
            manifest,
            audit,
        }
        .encode();
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: snapshot_id(last),
        };
        Self { meta, data }
    }

    fn encode(&self) -> Vec<u8> {
        framing::frame(
            FILE_MAGIC,
            &[(FILE_TAGS[0], &encode(&self.meta)), (FILE_TAGS[1], &self.data)],
        )
    }

    /// Checks every checksum of the file and of the body inside it.
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let parts = framing::unframe("snapshot file", FILE_MAGIC, &FILE_TAGS, bytes)
            .map_err(|e| e.to_string())?;
        let meta = postcard::from_bytes(parts[0])
            .map_err(|e| format!("snapshot file: section \"meta\" does not decode: {e}"))?;
        Ok(Self { meta, data: parts[1].to_vec() })
    }
}

const SNAPSHOT_FILE: &str = "snapshot.bin";

impl StateMachine {
    fn open(
        db: Option<sled::Db>,
        audit: AuditStore,
        snapshots: SnapshotPlace,
        config: LedgerConfig,
    ) -> Result<Self, OpenError> {
        let path = snapshots.path();
        let bad = |reason: String| OpenError::Snapshot { path: path.clone(), reason };
        let (state, manifest, tail) = match snapshots.read()? {
            Some(file) => decode_body(&file.data).map_err(bad)?,
            None => (
                AppliedState {
                    ledger: Ledger::new(config),
                    last_applied: None,
                    membership: StoredMembership::default(),
                },
                Vec::new(),
                Vec::new(),
            ),
        };
        // The segments are the snapshot's manifest: files it does not list (sealed
        // by a build whose snapshot never got written) go; listed ones missing or
        // damaged are fetched from peers.
        audit.sealed_mut().adopt(manifest)?;
        // Records past the snapshot's chain head are regenerated, identically, when
        // openraft re-applies the log after it. The tail up to it is the snapshot's.
        let head = state.ledger.chain_head().next_seq;
        let start = audit.sealed().end();
        audit.truncate_from(head).map_err(|e| bad(e.to_string()))?;
        let held = audit.read(start, 1).map_err(|e| bad(e.to_string()))?;
        let intact = audit.len().map_err(|e| bad(e.to_string()))? == head
            && (start == head || held.first().is_some_and(|r| r.entry.seq == start));
        if !intact {
            audit.replace_tail(&tail)?;
            audit.sync()?;
        }
        audit.drop_sealed_tail().map_err(|e| bad(e.to_string()))?;
        if let Some(db) = &db {
            db.flush()?;
        }
        Ok(Self {
            state: Arc::new(RwLock::new(state)),
            db,
            audit,
            snapshots,
            snapshot_lock: Arc::default(),
        })
    }

    pub fn reader(&self) -> Reader {
        Reader { state: self.state.clone(), audit: self.audit.clone() }
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, AppliedState> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The tail's records from `start` up to `head`, exactly: apply writes a
    /// batch's records before it releases the ledger, so every record up to a head
    /// read under the lock is there; fewer means the store lost some, and is an error.
    fn audit_between(&self, start: u64, head: ChainHead) -> Result<Vec<AuditRecord>, String> {
        let want = usize::try_from(head.next_seq - start).unwrap_or(usize::MAX);
        let mut records = self.audit.read(start, want).map_err(|e| e.to_string())?;
        records.truncate(want);
        if records.len() != want {
            return Err(format!(
                "the audit store holds {} records from {start} before the ledger's chain head at {}",
                records.len(),
                head.next_seq
            ));
        }
        Ok(records)
    }

    /// Flushes the audit records written so far (a no-op in memory).
    async fn flush_audit(&self) -> std::io::Result<()> {
        let audit = self.audit.clone();
        off_async(move || audit.sync()).await.map_err(std::io::Error::other)?
    }
}

impl SnapshotPlace {
    fn path(&self) -> PathBuf {
        match self {
            SnapshotPlace::Dir(dir) => dir.join(SNAPSHOT_FILE),
            SnapshotPlace::Mem(_) => PathBuf::from("<memory>"),
        }
    }

    fn read(&self) -> Result<Option<SnapshotFile>, OpenError> {
        match self {
            SnapshotPlace::Dir(dir) => read_snapshot_file(&dir.join(SNAPSHOT_FILE)),
            SnapshotPlace::Mem(disk) => disk
                .snapshot()
                .map(|bytes| {
                    SnapshotFile::decode(&bytes)
                        .map_err(|reason| OpenError::Snapshot { path: self.path(), reason })
                })
                .transpose(),
        }
    }

    /// Writes the snapshot durably: temp file, fsync, rename, fsync the directory
    /// (in memory: straight to the simulated disk, which is durable).
    fn persist(&self, file: &SnapshotFile) -> std::io::Result<()> {
        let dir = match self {
            SnapshotPlace::Dir(dir) => dir,
            SnapshotPlace::Mem(disk) => {
                disk.set_snapshot(file.encode());
                return Ok(());
            }
        };
        let tmp = unique_tmp(dir);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&file.encode())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// A temporary file name in `dir` that no other writer in this process or another
/// uses at the same time (so two snapshot writes can never interleave in one file).
fn unique_tmp(dir: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{SNAPSHOT_FILE}.{}.{n}.tmp", std::process::id()))
}

fn read_snapshot_file(path: &Path) -> Result<Option<SnapshotFile>, OpenError> {
    match std::fs::read(path) {
        Ok(bytes) => SnapshotFile::decode(&bytes)
            .map(Some)
            .map_err(|reason| OpenError::Snapshot { path: path.to_path_buf(), reason }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A snapshot body, decoded and checked: the state, the segment manifest, the tail.
type DecodedBody = (AppliedState, Vec<SegmentRef>, Vec<AuditRecord>);

/// Decodes and checks a snapshot body: the ledger restores and checks its
/// invariants, the manifest's segments are contiguous from 0 and chained, and the
/// tail's records form a chain from the last segment to the ledger's head.
fn decode_body(data: &[u8]) -> Result<DecodedBody, String> {
    let body = SnapshotBody::decode(data)?;
    let ledger = Ledger::restore(&body.ledger).map_err(|e| e.to_string())?;
    let mut at = ChainHead::default();
    for s in &body.manifest {
        if s.first_seq != at.next_seq || s.prev_hash != at.last_hash || s.count == 0 {
            return Err(format!(
                "the segment manifest breaks at segment {}+{}: expected it to start at {:?}",
                s.first_seq, s.count, at
            ));
        }
        at = ChainHead { next_seq: s.end(), last_hash: s.last_hash };
    }
    let head = verify_chain(&body.audit, at).map_err(|e| e.to_string())?;
    if head != ledger.chain_head() {
        return Err(format!(
            "audit records end at {head:?} but the ledger's chain is at {:?}",
            ledger.chain_head()
        ));
    }
    let state =
        AppliedState { ledger, last_applied: body.last_applied, membership: body.membership };
    Ok((state, body.manifest, body.audit))
}

fn snapshot_id(last: Option<LogId<NodeId>>) -> String {
    match last {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
        None => "empty".to_owned(),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let lock = self.snapshot_lock.clone();
        let _serialized = lock.lock().await;
        let (ledger, last_applied, membership, head, now_ms) = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            (
                state.ledger.snapshot(),
                state.last_applied,
                state.membership.clone(),
                state.ledger.chain_head(),
                state.ledger.now_ms(),
            )
        };
        // Seal the history into segments first (files written and synced, off the
        // async workers): the snapshot then lists them and carries only the rest.
        let store = self.audit.clone();
        let sealed = off_async(move || {
            let n = store.seal_until(head.next_seq)?;
            store.archive_old(now_ms)?;
            Ok::<_, ReadError>(n)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &std::io::Error::other(e)))?
        .map_err(|e| StorageIOError::write_snapshot(None, &std::io::Error::other(e)))?;
        let (manifest, start) = {
            let s = self.audit.sealed();
            (s.manifest.clone(), s.end())
        };
        let audit = self
            .audit_between(start, head)
            .map_err(|e| StorageIOError::read_state_machine(&std::io::Error::other(e)))?;
        let file = SnapshotFile::new(last_applied, membership, ledger, manifest, audit);
        let meta = file.meta.clone();
        self.snapshots
            .persist(&file)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        if sealed > 0 {
            // The snapshot lists the new segments: the tail's copies can go (what
            // follows them is copied to a new file, off the async workers).
            let store = self.audit.clone();
            off_async(move || store.drop_sealed_tail())
                .await
                .map_err(|e| StorageIOError::write_snapshot(None, &std::io::Error::other(e)))?
                .map_err(|e| StorageIOError::write_snapshot(None, &std::io::Error::other(e)))?;
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(file.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut records = Vec::new();
        let mut state = self.write_state();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::default()),
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(Response::default());
                }
                EntryPayload::Normal(data) => {
                    let applied = state.ledger.apply(entry.log_id.index, &data);
                    records.extend(applied.audit);
                    responses.push(Response { outcomes: applied.outcomes });
                }
            }
        }
        // Handed to the tail before the ledger is released, so a snapshot builder
        // that reads the chain head under the lock always finds every record up to
        // it (reads of the tail wait for what was handed to its writer thread). Not
        // flushed: audit records can be regenerated from the log, and a snapshot
        // flushes them before it is written.
        let written = self.audit.append(records);
        drop(state);
        written.map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Self {
            state: self.state.clone(),
            db: self.db.clone(),
            audit: self.audit.clone(),
            snapshots: self.snapshots.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let lock = self.snapshot_lock.clone();
        let _serialized = lock.lock().await;
        let data = snapshot.into_inner();
        let (mut state, manifest, tail) = decode_body(&data).map_err(|reason| {
            StorageIOError::read_snapshot(Some(meta.signature()), &std::io::Error::other(reason))
        })?;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let write_err = |e: &dyn std::error::Error| {
            StorageIOError::write_snapshot(
                Some(meta.signature()),
                &std::io::Error::other(e.to_string()),
            )
        };
        // The segments this node has that the manifest lists stay; the others go,
        // and the listed ones it lacks are fetched from peers in the background.
        self.audit.sealed_mut().adopt(manifest).map_err(|e| write_err(&e))?;
        self.audit.replace_tail(&tail).map_err(|e| write_err(&e))?;
        self.flush_audit().await.map_err(|e| write_err(&e))?;
        self.snapshots
            .persist(&SnapshotFile { meta: meta.clone(), data })
            .map_err(|e| write_err(&e))?;
        *self.write_state() = state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let file = self.snapshots.read().map_err(|e| {
            StorageIOError::read_snapshot(None, &std::io::Error::other(e.to_string()))
        })?;
        Ok(file.map(|f| Snapshot { meta: f.meta, snapshot: Box::new(Cursor::new(f.data)) }))
    }
}

/// Number of audit records this node holds.
pub fn audit_len(reader: &Reader) -> u64 {
    reader.audit.len().unwrap_or(0)
}

#[cfg(test)]
mod tests;
