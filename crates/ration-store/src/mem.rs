//! An in-memory node store for deterministic simulation, behind the same openraft
//! traits as the sled store, with an explicit durable/volatile split.
//!
//! A [`MemDisk`] is what survives a crash: it lives outside the simulated host and
//! holds only what the store has flushed. A [`MemLogStore`] keeps its working copy
//! (the "page cache") in the host; writes land there, and a flush, which takes a
//! simulated `fsync_delay`, copies them to the disk. A crash drops the working copy
//! and whatever had not been flushed, exactly what a real crash loses. The state
//! machine is the production [`StateMachine`] with its audit records in memory
//! (volatile, rebuilt from the snapshot and log) and its snapshot on the disk
//! (durable once written, as the file is after fsync and rename).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::wal::{MemFs, WalLogStore};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use ration_core::LedgerConfig;

use crate::{
    AuditBackend, AuditStore, ClusterIdentity, NodeId, OpenError, SnapshotPlace, StateMachine,
    TypeConfig,
};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The log, vote and purge point as stored.
#[derive(Clone, Debug, Default)]
struct LogImage {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
}

#[derive(Debug, Default)]
struct Disk {
    image: LogImage,
    snapshot: Option<Vec<u8>>,
    flushes: u64,
}

/// A simulated disk: what a node flushed, surviving its crashes.
#[derive(Clone, Debug, Default)]
pub struct MemDisk {
    disk: Arc<Mutex<Disk>>,
    cluster_id: Arc<AtomicU64>,
    /// How long a purge keeps the Raft core waiting (0: not at all).
    purge_delay_us: Arc<AtomicU64>,
    /// Purges under way now.
    purging: Arc<AtomicU64>,
    /// While set, every log write (append, vote, truncate) fails: a dead disk.
    failing: Arc<AtomicBool>,
    /// With [`MemDisk::with_wal`]: the files of the write-ahead log, which a power
    /// cut ([`MemDisk::power_cut`]) cuts back to what was synced.
    wal: Option<Arc<MemFs>>,
}

impl MemDisk {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshot(&self) -> Option<Vec<u8>> {
        self.lock().snapshot.clone()
    }

    pub(crate) fn set_snapshot(&self, bytes: Vec<u8>) {
        self.lock().snapshot = Some(bytes);
    }

    /// A disk whose node keeps its Raft log in the write-ahead log
    /// ([`crate::wal::WalLogStore`]) on in-memory files, as production does on real
    /// ones; see [`MemDisk::open_wal`].
    pub fn with_wal() -> Self {
        Self { wal: Some(MemFs::new()), ..Self::default() }
    }

    /// Cuts the power of a write-ahead-log disk: what was not synced is lost (the
    /// first `torn_keep` unsynced bytes of the last write may survive, torn).
    /// Returns the bytes lost (0 for a disk without a write-ahead log).
    pub fn power_cut(&self, torn_keep: Option<usize>) -> u64 {
        self.wal.as_ref().map_or(0, |fs| fs.power_cut(torn_keep))
    }

    /// Opens a node on a write-ahead-log disk (power restored first): the log
    /// recovered from its files, the state machine, the cluster identity. `None`
    /// for a disk made without [`MemDisk::with_wal`].
    pub async fn open_wal(
        &self,
        fsync_delay: Duration,
        config: LedgerConfig,
    ) -> Result<Option<(WalLogStore, StateMachine, ClusterIdentity)>, OpenError> {
        let Some(fs) = &self.wal else { return Ok(None) };
        fs.restore();
        fs.set_sync_delay(fsync_delay);
        let log = WalLogStore::open(fs.clone()).await?;
        let (_, sm, identity) = self.open(fsync_delay, config)?;
        Ok(Some((log, sm, identity)))
    }

    /// Makes every later purge on this disk take `delay` (a disk on which deleting
    /// the purged entries is slow). Scenario tests use it to hold the Raft core
    /// inside a purge.
    pub fn set_purge_delay(&self, delay: Duration) {
        self.purge_delay_us.store(delay.as_micros() as u64, Relaxed);
    }

    /// Purges under way on this disk right now.
    pub fn purges_in_progress(&self) -> u64 {
        self.purging.load(Relaxed)
    }

    /// While `failing`, every log write on this disk returns an I/O error (a disk
    /// that died). openraft treats that as fatal and stops the node's Raft core.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Relaxed);
        if let Some(fs) = &self.wal {
            fs.set_failing(failing);
        }
    }

    /// What the disk holds of the log: the vote, the purge point and the id of every
    /// entry (what a node finds after a crash).
    pub fn durable_summary(&self) -> DurableSummary {
        if let Some(fs) = &self.wal {
            let r = wal_durable(fs);
            return DurableSummary {
                vote: r.vote,
                last_purged: r.purged,
                first: r.entries.first().copied(),
                last: r.entries.last().copied(),
                snapshot_bytes: self.lock().snapshot.as_ref().map_or(0, Vec::len),
            };
        }
        let d = self.lock();
        DurableSummary {
            vote: d.image.vote,
            last_purged: d.image.last_purged,
            first: d.image.log.values().next().map(|e| e.log_id),
            last: d.image.log.values().next_back().map(|e| e.log_id),
            snapshot_bytes: d.snapshot.as_ref().map_or(0, Vec::len),
        }
    }

    /// The ids of the durable log entries in `range` of indexes.
    pub fn durable_log_ids(&self, range: impl RangeBounds<u64>) -> Vec<LogId<NodeId>> {
        if let Some(fs) = &self.wal {
            return wal_durable(fs)
                .entries
                .into_iter()
                .filter(|id| range.contains(&id.index))
                .collect();
        }
        self.lock().image.log.range(range).map(|(_, e)| e.log_id).collect()
    }

    /// Flushes (syncs) completed so far.
    pub fn flushes(&self) -> u64 {
        if let Some(fs) = &self.wal {
            return fs.syncs();
        }
        self.lock().flushes
    }

    /// Opens a node on this disk: a log store whose working copy starts from what
    /// was flushed, the state machine, and the cluster identity.
    pub fn open(
        &self,
        fsync_delay: Duration,
        config: LedgerConfig,
    ) -> Result<(MemLogStore, StateMachine, ClusterIdentity), OpenError> {
        let image = self.lock().image.clone();
        let log =
            MemLogStore { disk: self.clone(), cache: Arc::new(Mutex::new(image)), fsync_delay };
        let audit =
            AuditStore::new(AuditBackend::Mem(Arc::default()), None, crate::SealPolicy::default());
        let sm = StateMachine::open(None, audit, SnapshotPlace::Mem(self.clone()), config)?;
        let identity = ClusterIdentity { meta: None, current: self.cluster_id.clone() };
        Ok((log, sm, identity))
    }
}

/// What the synced files of a write-ahead log hold: vote, purge point, entry ids.
fn wal_durable(fs: &MemFs) -> crate::wal::Recovered {
    crate::wal::recover_summary(&fs.durable_files()).unwrap_or_else(|e| {
        // A torn tail is cut by recovery; anything else would be a bug in the log.
        panic!("the simulated disk holds a damaged write-ahead log: {e}")
    })
}

/// What a [`MemDisk`] holds of the log (see [`MemDisk::durable_summary`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableSummary {
    pub vote: Option<Vote<NodeId>>,
    pub last_purged: Option<LogId<NodeId>>,
    pub first: Option<LogId<NodeId>>,
    pub last: Option<LogId<NodeId>>,
    pub snapshot_bytes: usize,
}

/// The in-memory Raft log store (see the module docs).
#[derive(Clone, Debug)]
pub struct MemLogStore {
    disk: MemDisk,
    cache: Arc<Mutex<LogImage>>,
    fsync_delay: Duration,
}

impl MemLogStore {
    fn cache(&self) -> MutexGuard<'_, LogImage> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the working copy durable after the simulated fsync time. A crash
    /// during the wait (the task is dropped with its host) loses the writes.
    /// The error a failed disk returns.
    fn check_disk(&self) -> StorageResult<()> {
        if self.disk.failing.load(Relaxed) {
            return Err(openraft::StorageIOError::write_logs(&std::io::Error::other(
                "simulated disk failure",
            ))
            .into());
        }
        Ok(())
    }

    async fn flush(&self) {
        tokio::time::sleep(self.fsync_delay).await;
        let image = self.cache().clone();
        let mut disk = self.disk.lock();
        disk.image = image;
        disk.flushes += 1;
    }
}

impl RaftLogReader<TypeConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        Ok(self.cache().log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let c = self.cache();
        let last = c.log.values().next_back().map(|e| e.log_id).or(c.last_purged);
        Ok(LogState { last_purged_log_id: c.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.check_disk()?;
        self.cache().vote = Some(*vote);
        self.flush().await;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.cache().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // As in the sled store: not flushed on its own.
        self.cache().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.cache().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.check_disk()?;
        {
            let mut c = self.cache();
            for entry in entries {
                c.log.insert(entry.log_id.index, entry);
            }
        }
        if cfg!(feature = "planted-bug-ack-before-flush") {
            // PLANTED BUG (feature `planted-bug-ack-before-flush` only): acknowledged
            // at once and flushed in the background, so a crash can lose an entry
            // openraft already counted as durable.
            callback.log_io_completed(Ok(()));
            let store = self.clone();
            tokio::spawn(async move { store.flush().await });
        } else {
            self.flush().await;
            callback.log_io_completed(Ok(()));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.check_disk()?;
        self.cache().log.split_off(&log_id.index);
        self.flush().await;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        {
            let mut c = self.cache();
            c.last_purged = Some(log_id);
            let kept = c.log.split_off(&(log_id.index + 1));
            c.log = kept;
        }
        // As in the sled store, not flushed: the next flush carries it, and a purge
        // lost in a crash is redone. A slow disk (`set_purge_delay`) still makes the
        // core wait, which is how a scenario test opens the window of the openraft
        // race in third_party/openraft/RATION-PATCH.md.
        let delay = Duration::from_micros(self.disk.purge_delay_us.load(Relaxed));
        if !delay.is_zero() {
            self.disk.purging.fetch_add(1, Relaxed);
            // Counted down even if the host crashes during the wait.
            struct Done(Arc<AtomicU64>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Relaxed);
                }
            }
            let _done = Done(self.disk.purging.clone());
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, MemLogStore, StateMachine, ()> for Builder {
        async fn build(&self) -> Result<((), MemLogStore, StateMachine), StorageError<NodeId>> {
            let (log, sm, _) =
                MemDisk::default().open(Duration::ZERO, LedgerConfig::default()).map_err(|e| {
                    openraft::StorageIOError::read(&std::io::Error::other(e.to_string()))
                })?;
            Ok(((), log, sm))
        }
    }

    #[test]
    fn passes_the_openraft_storage_suite() {
        Suite::test_all(Builder).expect("openraft's storage suite passes");
    }

    #[tokio::test]
    async fn a_crash_loses_only_what_was_not_flushed() {
        let disk = MemDisk::default();
        let (mut log, _, _) = disk.open(Duration::from_millis(5), LedgerConfig::default()).unwrap();
        let vote = Vote::new(3, 1);
        log.save_vote(&vote).await.unwrap();
        // An unflushed committed id and a write still in the working copy.
        log.save_committed(Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 9)))
            .await
            .unwrap();
        let (mut reopened, _, _) = disk.open(Duration::ZERO, LedgerConfig::default()).unwrap();
        assert_eq!(reopened.read_vote().await.unwrap(), Some(vote));
        assert_eq!(reopened.read_committed().await.unwrap(), None);
        assert!(disk.flushes() >= 1);
    }
}
