//! The Raft log and vote in a segmented write-ahead log, durable against power loss.
//!
//! Files `wal-<seq>.log` (seq in hex, increasing) each start with [`MAGIC`] and hold
//! records `[len u32][crc32 u32][kind u8][payload]` (little-endian; the CRC covers
//! kind and payload). Kinds: a log entry, a vote, the committed id, a purge point,
//! a truncation, and a state record (vote, committed, purge point) that begins every
//! segment, so older segments can be deleted without losing them.
//!
//! Durability: an append is acknowledged to openraft, and a vote returned as saved,
//! only after `fdatasync` of the segment that holds it ([`WalFs::sync`]), and, for a
//! new segment, after an `fsync` of the directory. Many entries share one sync: one
//! per `append` call, which carries everything openraft has queued. The committed
//! id and purge points are written without a sync of their own (they ride on the
//! next one; losing them only means re-applying or purging again). A segment is
//! deleted only once the purge record that covers it is synced.
//!
//! Recovery reads the segments in order. A record cut short or failing its CRC at
//! the end of the last segment is a torn write: the segment is cut there (nothing
//! after it was acknowledged). The same damage anywhere else is corruption, and
//! opening fails with the file and offset.

pub mod fs;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

pub use fs::{MemFs, StdFs, WalFs};

use crate::{NodeId, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"RATNWAL\x01";
/// A segment stops taking records past this size, and the next one starts.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes before a record's payload: length, CRC, kind.
const RECORD_HEADER: usize = 9;
/// The largest payload a record may claim (an entry is at most a few MiB).
const MAX_RECORD: u32 = 256 << 20;

const KIND_ENTRY: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_COMMITTED: u8 = 3;
const KIND_PURGED: u8 = 4;
const KIND_TRUNCATE: u8 = 5;
const KIND_STATE: u8 = 6;

/// The state record that begins every segment.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:016x}.log")
}

fn segment_seq(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    u64::from_str_radix(hex, 16).ok()
}

fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(payload);
    let len = u32::try_from(payload.len()).expect("a record is smaller than 4 GiB");
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    ration_core::encode(value)
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log I/O: {0}")]
    Io(#[from] io::Error),
    #[error("write-ahead log segment {file} is damaged at byte {offset}: {reason}")]
    Corrupt { file: String, offset: u64, reason: String },
}

/// Where an entry's record payload is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u64,
    offset: u64,
    len: u32,
    log_id: LogId<NodeId>,
}

#[derive(Debug, Default)]
struct Inner {
    active: u64,
    active_len: u64,
    index: BTreeMap<u64, Loc>,
    /// Live index entries per segment.
    live: BTreeMap<u64, usize>,
    state: State,
    /// Segments no entry needs any more, to delete once the purge record that
    /// emptied them is synced.
    doomed: Vec<u64>,
    /// The last entries appended, at most [`RECENT_ENTRIES`], as they were
    /// appended: openraft reads each entry back to replicate it and to apply it,
    /// and each read from the file decoded the whole entry again. An entry leaves
    /// when the index drops or replaces it; a read uses it only if its log id is
    /// the index's.
    recent: BTreeMap<u64, Entry<TypeConfig>>,
}

/// Most entries [`Inner::recent`] keeps: more than the entries one replication
/// round or one apply call reads under load (entries hold at most 1 MiB of
/// commands, shared with openraft's own copies).
const RECENT_ENTRIES: usize = 64;

impl Inner {
    fn drop_from(&mut self, first: u64) {
        drop(self.recent.split_off(&first));
        let gone = self.index.split_off(&first);
        for loc in gone.values() {
            self.unref(loc.seg);
        }
    }

    fn drop_through(&mut self, last: u64) {
        self.recent = self.recent.split_off(&last.saturating_add(1));
        let keep = self.index.split_off(&last.saturating_add(1));
        let gone = std::mem::replace(&mut self.index, keep);
        for loc in gone.values() {
            self.unref(loc.seg);
        }
    }

    fn unref(&mut self, seg: u64) {
        if let Some(n) = self.live.get_mut(&seg) {
            *n = n.saturating_sub(1);
        }
    }

    /// An entry at its index, replacing any entry there. Entries after it stay:
    /// openraft removes conflicting entries itself (a truncate record) and may
    /// append an entry the log already holds.
    fn insert(&mut self, loc: Loc) {
        self.recent.remove(&loc.log_id.index);
        if let Some(old) = self.index.insert(loc.log_id.index, loc) {
            self.unref(old.seg);
        }
        *self.live.entry(loc.seg).or_default() += 1;
    }

    /// Applies one record, at recovery (`recovered`: an entry is decoded whole, so
    /// one that does not decode stops recovery) or after writing it (an entry's
    /// log id alone is read: the entry was just encoded from a value).
    fn apply(
        &mut self,
        seg: u64,
        offset: u64,
        kind: u8,
        payload: &[u8],
        recovered: bool,
    ) -> Result<(), String> {
        fn de<'a, T: Deserialize<'a>>(p: &'a [u8]) -> Result<T, String> {
            postcard::from_bytes(p).map_err(|e| e.to_string())
        }
        match kind {
            KIND_ENTRY => {
                let log_id = if recovered {
                    de::<Entry<TypeConfig>>(payload)?.log_id
                } else {
                    entry_log_id(payload)?
                };
                let len = u32::try_from(payload.len()).map_err(|e| e.to_string())?;
                self.insert(Loc { seg, offset, len, log_id });
            }
            KIND_VOTE => self.state.vote = Some(de(payload)?),
            KIND_COMMITTED => self.state.committed = de(payload)?,
            KIND_PURGED => self.purge(de(payload)?),
            KIND_TRUNCATE => self.drop_from(de(payload)?),
            KIND_STATE => {
                let s: State = de(payload)?;
                self.state.vote = s.vote.or(self.state.vote);
                self.state.committed = s.committed.or(self.state.committed);
                if let Some(p) = s.purged {
                    self.purge(p);
                }
            }
            other => return Err(format!("unknown record kind {other}")),
        }
        Ok(())
    }

    fn purge(&mut self, upto: LogId<NodeId>) {
        if self.state.purged.is_some_and(|p| p.index >= upto.index) {
            return;
        }
        self.state.purged = Some(upto);
        self.drop_through(upto.index);
    }

    /// Segments before the active one that hold no live entry.
    fn empty_segments(&self) -> Vec<u64> {
        self.live.iter().filter(|(s, n)| **n == 0 && **s < self.active).map(|(s, _)| *s).collect()
    }
}

/// Counters of the log's work, for metrics.
#[derive(Debug, Default)]
pub struct WalStats {
    /// `fdatasync`s of a segment.
    pub syncs: AtomicU64,
    /// Entries made durable.
    pub entries: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
}

/// The Raft log and vote over a [`WalFs`].
#[derive(Clone, Debug)]
pub struct WalLogStore {
    fs: Arc<dyn WalFs>,
    inner: Arc<Mutex<Inner>>,
    /// One writer at a time (openraft calls the log store from one task; this keeps
    /// a sync's accounting simple if it ever does not).
    write: Arc<tokio::sync::Mutex<()>>,
    stats: Arc<WalStats>,
}

impl WalLogStore {
    /// Opens the log in `fs`: recovers every segment (cutting a torn tail), then
    /// starts a new segment beginning with the recovered state.
    pub async fn open(fs: Arc<dyn WalFs>) -> Result<Self, WalError> {
        let files = segments(&*fs)?;
        let last = files.last().map(|(s, _)| *s);
        let mut inner = Inner::default();
        let mut repair = None;
        // One segment in memory at a time.
        for (seq, name) in &files {
            let bytes = fs.read(name)?;
            repair = scan_segment(&mut inner, *seq, name, &bytes, Some(*seq) == last)?;
        }
        match repair {
            Some(Repair::Remove(name)) => fs.remove(&name)?,
            Some(Repair::Cut(name, at, reason)) => {
                tracing::warn!(
                    segment = %name,
                    offset = at,
                    "cutting a torn write at the end of the log: {reason}"
                );
                fs.truncate(&name, at)?;
                fs.sync(&name).await?;
            }
            None => {}
        }
        // What a crashed process wrote may still sit only in the page cache: make it
        // durable before anything new is acknowledged on top of it. (Only the last
        // segment can hold unsynced bytes: a full one is synced before the next.)
        if let Some(seq) = last {
            let name = segment_name(seq);
            if fs.list()?.contains(&name) {
                fs.sync(&name).await?;
            }
        }
        // The log is contiguous: a hole would hand openraft fewer entries than it asks
        // for, silently.
        let mut expected = None;
        for &index in inner.index.keys() {
            if let Some(e) = expected {
                if index != e {
                    return Err(WalError::Corrupt {
                        file: segment_name(last.unwrap_or(0)),
                        offset: 0,
                        reason: format!("the log has no entry {e} but has entry {index}"),
                    });
                }
            }
            expected = Some(index + 1);
        }
        let store = Self {
            fs,
            inner: Arc::new(Mutex::new(inner)),
            write: Arc::new(tokio::sync::Mutex::new(())),
            stats: Arc::new(WalStats::default()),
        };
        let next = last.map_or(1, |s| s + 1);
        store.start_segment(next).await?;
        // Segments emptied by purges recovered above can go now: the new segment's
        // state record (synced) carries the purge point.
        let doomed = store.lock().empty_segments();
        store.delete(doomed);
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log's counters.
    pub fn stats(&self) -> Arc<WalStats> {
        self.stats.clone()
    }

    /// Creates segment `seq` with the current state as its first record, syncs it
    /// and the directory, and makes it the active segment.
    async fn start_segment(&self, seq: u64) -> io::Result<()> {
        let name = segment_name(seq);
        let state = self.lock().state.clone();
        let mut bytes = MAGIC.to_vec();
        bytes.extend(record(KIND_STATE, &encode(&state)));
        self.fs.create(&name)?;
        self.fs.append(&name, &bytes)?;
        self.fs.sync(&name).await?;
        self.fs.sync_dir().await?;
        let mut inner = self.lock();
        inner.active = seq;
        inner.active_len = bytes.len() as u64;
        inner.live.entry(seq).or_default();
        Ok(())
    }

    /// Appends records to the active segment (without syncing), applying them.
    fn write(&self, records: &[(u8, Vec<u8>)]) -> io::Result<u64> {
        let mut inner = self.lock();
        let seq = inner.active;
        let mut bytes = Vec::new();
        let mut placed = Vec::with_capacity(records.len());
        for (kind, payload) in records {
            let offset = inner.active_len + (bytes.len() + RECORD_HEADER) as u64;
            placed.push((*kind, offset));
            bytes.extend(record(*kind, payload));
        }
        self.fs.append(&segment_name(seq), &bytes)?;
        inner.active_len += bytes.len() as u64;
        self.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        for ((kind, offset), (_, payload)) in placed.into_iter().zip(records) {
            inner.apply(seq, offset, kind, payload, false).map_err(io::Error::other)?;
        }
        Ok(seq)
    }

    /// Syncs the segment `seq` was written to; then deletes the segments that
    /// `doomed` names (their purge record is durable now).
    async fn sync(&self, seq: u64, doomed: Vec<u64>) -> io::Result<()> {
        self.fs.sync(&segment_name(seq)).await?;
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.delete(doomed);
        Ok(())
    }

    fn delete(&self, doomed: Vec<u64>) {
        for seg in doomed {
            let name = segment_name(seg);
            match self.fs.remove(&name) {
                Ok(()) => {
                    self.lock().live.remove(&seg);
                }
                Err(e) => tracing::warn!(segment = %name, "could not delete a purged segment: {e}"),
            }
        }
    }

    /// Starts a new segment if the active one is full. The full one is synced
    /// first (unsynced committed or purge records may end it), so only the last
    /// segment can ever end in a torn write.
    async fn rotate_if_full(&self) -> io::Result<()> {
        let (full, active) = {
            let inner = self.lock();
            (inner.active_len >= SEGMENT_BYTES, inner.active)
        };
        if full {
            self.fs.sync(&segment_name(active)).await?;
            self.start_segment(active + 1).await?;
        }
        Ok(())
    }

    /// Writes records and syncs them: the durable path (entries, votes, truncation).
    async fn write_durably(&self, records: &[(u8, Vec<u8>)]) -> io::Result<()> {
        let _one = self.write.lock().await;
        self.rotate_if_full().await?;
        let seq = self.write(records)?;
        let doomed = std::mem::take(&mut self.lock().doomed);
        self.sync(seq, doomed).await
    }

    /// Appends entries and returns once they are synced (what `append` does before
    /// it acknowledges them to openraft).
    pub async fn append_entries(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> io::Result<()> {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let records: Vec<(u8, Vec<u8>)> = entries.iter().map(|e| (KIND_ENTRY, encode(e))).collect();
        let n = records.len() as u64;
        self.write_durably(&records).await?;
        self.stats.entries.fetch_add(n, Ordering::Relaxed);
        let mut inner = self.lock();
        for entry in entries {
            let index = entry.log_id.index;
            if inner.index.get(&index).is_some_and(|loc| loc.log_id == entry.log_id) {
                inner.recent.insert(index, entry);
            }
        }
        while inner.recent.len() > RECENT_ENTRIES {
            inner.recent.pop_first();
        }
        Ok(())
    }

    /// Number of entries held (not purged).
    pub fn len(&self) -> usize {
        self.lock().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().index.is_empty()
    }
}

/// An encoded entry's log id: its first field (postcard writes a struct's fields
/// in order), read without decoding the rest (`wal::tests::an_entrys_log_id_is_read_from_its_start`).
fn entry_log_id(payload: &[u8]) -> Result<LogId<NodeId>, String> {
    postcard::take_from_bytes::<LogId<NodeId>>(payload)
        .map(|(log_id, _)| log_id)
        .map_err(|e| e.to_string())
}

/// The segment files in `fs`, in order: (seq, name).
fn segments(fs: &dyn WalFs) -> io::Result<Vec<(u64, String)>> {
    let mut segs: Vec<(u64, String)> =
        fs.list()?.into_iter().filter_map(|n| segment_seq(&n).map(|s| (s, n))).collect();
    segs.sort();
    Ok(segs)
}

/// What recovery must fix at the end of the log before it goes on.
enum Repair {
    /// The last segment never got its header: remove it.
    Remove(String),
    /// The last segment ends in a torn write at this offset: cut it there.
    Cut(String, u64, String),
}

/// Recovers one segment into `inner` (segments go in order), without writing;
/// says what to repair if it is the last one and its tail is torn.
fn scan_segment(
    inner: &mut Inner,
    seq: u64,
    name: &str,
    bytes: &[u8],
    is_last: bool,
) -> Result<Option<Repair>, WalError> {
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        file: name.to_owned(),
        offset: offset as u64,
        reason,
    };
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        if is_last && MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            // Created, then power was cut before its header was synced.
            return Ok(Some(Repair::Remove(name.to_owned())));
        }
        return Err(corrupt(0, "not a write-ahead log segment".into()));
    }
    inner.live.entry(seq).or_default();
    let mut at = MAGIC.len();
    while at < bytes.len() {
        match parse(&bytes[at..]) {
            Ok((kind, payload, size)) => {
                let offset = (at + RECORD_HEADER) as u64;
                inner.apply(seq, offset, kind, payload, true).map_err(|r| corrupt(at, r))?;
                at += size;
            }
            Err(reason) if is_last => {
                return Ok(Some(Repair::Cut(name.to_owned(), at as u64, reason)));
            }
            Err(reason) => return Err(corrupt(at, reason)),
        }
    }
    Ok(None)
}

/// What a log holds, recovered from its files: the vote, the purge point and the
/// ids of its entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub vote: Option<Vote<NodeId>>,
    pub purged: Option<LogId<NodeId>>,
    pub entries: Vec<LogId<NodeId>>,
}

/// What a log in `segs` (segment files: name, bytes) holds. For a simulation to
/// check what a disk kept.
pub fn recover_summary(segs: &[(String, Vec<u8>)]) -> Result<Recovered, WalError> {
    let mut ordered: Vec<(u64, &String, &Vec<u8>)> =
        segs.iter().filter_map(|(n, b)| segment_seq(n).map(|s| (s, n, b))).collect();
    ordered.sort_by_key(|(s, _, _)| *s);
    let mut inner = Inner::default();
    let last = ordered.last().map(|(s, _, _)| *s);
    for (seq, name, bytes) in ordered {
        scan_segment(&mut inner, seq, name, bytes, Some(seq) == last)?;
    }
    Ok(Recovered {
        vote: inner.state.vote,
        purged: inner.state.purged,
        entries: inner.index.values().map(|l| l.log_id).collect(),
    })
}

/// One record at the start of `bytes`: (kind, payload, size with header), or why
/// it is not a whole, intact record.
fn parse(bytes: &[u8]) -> Result<(u8, &[u8], usize), String> {
    let header = bytes.get(..RECORD_HEADER).ok_or("a record header cut short")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Err(format!("a record claims {len} bytes"));
    }
    let size = RECORD_HEADER + len as usize;
    let payload = bytes.get(RECORD_HEADER..size).ok_or("a record cut short")?;
    let mut h = crc32fast::Hasher::new();
    h.update(&header[8..9]);
    h.update(payload);
    if h.finalize() != crc {
        return Err("a record fails its checksum".into());
    }
    Ok((header[8], payload, size))
}

fn io_err(e: &io::Error) -> std::io::Error {
    io::Error::new(e.kind(), e.to_string())
}

impl RaftLogReader<TypeConfig> for WalLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        // Each with its entry when the recent ones hold it under the same log id.
        let locs: Vec<(Loc, Option<Entry<TypeConfig>>)> = {
            let inner = self.lock();
            inner
                .index
                .range((start, end))
                .map(|(i, l)| {
                    let held = inner.recent.get(i).filter(|e| e.log_id == l.log_id).cloned();
                    (*l, held)
                })
                .collect()
        };
        if let (Some((first, _)), Some((last, _))) = (locs.first(), locs.last()) {
            let span = last.log_id.index - first.log_id.index + 1;
            if span != locs.len() as u64 {
                let e = io::Error::other(format!(
                    "the log has {} entries between {} and {}",
                    locs.len(),
                    first.log_id.index,
                    last.log_id.index
                ));
                return Err(StorageIOError::read_logs(&e).into());
            }
        }
        let mut entries = Vec::with_capacity(locs.len());
        for (loc, held) in locs {
            if let Some(entry) = held {
                entries.push(entry);
                continue;
            }
            let bytes = self
                .fs
                .read_at(&segment_name(loc.seg), loc.offset, loc.len as usize)
                .map_err(|e| StorageIOError::read_logs(&io_err(&e)))?;
            let entry: Entry<TypeConfig> =
                postcard::from_bytes(&bytes).map_err(|e| StorageIOError::read_logs(&e))?;
            if entry.log_id != loc.log_id {
                let e = io::Error::other(format!(
                    "the log holds {} where {} was written",
                    entry.log_id, loc.log_id
                ));
                return Err(StorageIOError::read_logs(&e).into());
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for WalLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let inner = self.lock();
        let last_purged_log_id = inner.state.purged;
        let last_log_id = inner.index.values().next_back().map(|l| l.log_id).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.write_durably(&[(KIND_VOTE, encode(vote))])
            .await
            .map_err(|e| StorageIOError::write_vote(&io_err(&e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self.lock().state.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not synced on its own: it rides on the next sync. A committed id lost in a
        // power cut only means re-applying later, never applying too much.
        let _one = self.write.lock().await;
        self.write(&[(KIND_COMMITTED, encode(&committed))])
            .map_err(|e| StorageIOError::write(&io_err(&e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.lock().state.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The durability point: acknowledged only once synced.
        let written = self.append_entries(entries).await;
        callback.log_io_completed(written.as_ref().map(|_| ()).map_err(io_err));
        written.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.write_durably(&[(KIND_TRUNCATE, encode(&log_id.index))])
            .await
            .map_err(|e| StorageIOError::write_logs(&io_err(&e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Not synced: openraft runs a purge inline in its core, and awaiting a sync
        // here stalls it. Segments it empties are deleted after the next sync, which
        // makes this record durable first; a purge lost to a power cut is redone.
        let _one = self.write.lock().await;
        self.write(&[(KIND_PURGED, encode(&log_id))])
            .map_err(|e| StorageIOError::write_logs(&io_err(&e)))?;
        let mut inner = self.lock();
        let doomed = inner.empty_segments();
        inner.doomed = doomed;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
