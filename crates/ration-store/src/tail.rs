//! The audit tail on disk: the records after the sealed segments, in one
//! append-only file of framed chunks, unflushed.
//!
//! Each apply call writes its records with one `pwrite` at the file's end, as
//! chunks of at most [`AUDIT_CHUNK`] records and, past a chunk's first record,
//! [`AUDIT_VALUE_BYTES`] bytes (a read of a few records decodes one chunk, not an
//! apply call's thousands). The tail was a sled tree: sled logs every value, and
//! rewrites the leaves that hold them, from threads of its own, and under pipelined
//! load that was about a fifth of a node's CPU (benches/README.md, session 23).
//!
//! A chunk is `[len u32][crc32 u32][first u64][end u64][records]` (little-endian):
//! `len` bytes of records, those numbered `first..end` back to back, each as
//! `[length u32][its encoding]` with the encoding a sealed segment holds
//! (`ration_core::audit::encode_record`), so sealing copies a record's bytes
//! without decoding it (`AuditStore::seal_until`); the CRC covers `first`, `end`
//! and the records. The file before this framing (`audit-tail`, bare encodings) is
//! removed on open and regenerated like a lost tail.
//! Nothing here is synced: like sled's unflushed writes, what a crash loses is
//! regenerated from the snapshot and the log (`StateMachine::open`). Opening reads
//! the chunks in order and cuts the file at the first one that is torn, fails its
//! CRC, or does not continue the one before.
//!
//! An index of every chunk (first record, offset, end) is kept in memory: one
//! entry per apply call, or per about a hundred records for calls that bring
//! more, for a tail the snapshot builds keep bounded (`SealPolicy`,
//! `snapshot_after_entries`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

use ration_core::audit::AuditRecord;

use crate::audit_store::{AUDIT_CHUNK, AUDIT_VALUE_BYTES};
use crate::ReadError;

/// Bytes before a chunk's records: length, CRC, first and end sequence numbers.
const HEADER: usize = 4 + 4 + 8 + 8;

/// Where a chunk is: its records start at `offset + HEADER`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk {
    offset: u64,
    len: u32,
    /// The sequence number after its last record.
    end: u64,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// The file's length: where the next chunk goes.
    bytes: u64,
    /// By first sequence number; contiguous (each starts where the one before ends).
    chunks: BTreeMap<u64, Chunk>,
}

/// A chunk's records one by one: (sequence number, `[length u32][encoding]`).
pub(crate) struct Framed<'a> {
    seq: u64,
    end: u64,
    rest: &'a [u8],
}

impl<'a> Framed<'a> {
    pub(crate) fn new(first: u64, end: u64, bytes: &'a [u8]) -> Self {
        Self { seq: first, end, rest: bytes }
    }
}

impl<'a> Iterator for Framed<'a> {
    type Item = std::io::Result<(u64, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.seq >= self.end {
            return None;
        }
        let short = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an audit tail chunk ends inside a record",
            )
        };
        if self.rest.len() < 4 {
            self.seq = self.end;
            return Some(Err(short()));
        }
        let n = u32_at(self.rest, 0) as usize;
        let Some(framed) = self.rest.get(..4 + n) else {
            self.seq = self.end;
            return Some(Err(short()));
        };
        self.rest = &self.rest[4 + n..];
        let seq = self.seq;
        self.seq += 1;
        Some(Ok((seq, framed)))
    }
}

/// The tail file and its index, and the thread that writes what applies hand it.
#[derive(Debug)]
pub(crate) struct FileTail {
    path: PathBuf,
    shared: Arc<Shared>,
    /// To the writer; taken (closing the channel) when the tail is dropped.
    to_writer: Mutex<Option<SyncSender<Vec<AuditRecord>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    inner: RwLock<Inner>,
    pending: Mutex<Pending>,
    written: Condvar,
    /// Tests: the writer's next write fails as a full disk would.
    #[cfg(test)]
    fail_next: std::sync::atomic::AtomicBool,
}

/// Appends handed to the writer, and how many it has done.
#[derive(Debug, Default)]
struct Pending {
    queued: u64,
    written: u64,
    /// The first failed write: every later call fails with it (the tail would
    /// otherwise miss records).
    failed: Option<String>,
}

fn crc(framed: &[u8]) -> u32 {
    // `framed` is a whole chunk: the CRC covers what follows it.
    crc32fast::hash(framed.get(8..).unwrap_or_default())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl FileTail {
    /// Opens (or creates) the tail at `path`, keeping the chunks that are whole,
    /// intact and contiguous from the first, and cutting the rest off.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let size = file.metadata()?.len();
        let mut chunks = BTreeMap::new();
        let mut at = 0u64;
        let mut next: Option<u64> = None;
        let mut buf = Vec::new();
        while at.saturating_add(HEADER as u64) <= size {
            let mut header = [0u8; HEADER];
            file.read_exact_at(&mut header, at)?;
            let len = u32_at(&header, 0);
            let (first, end) = (u64_at(&header, 8), u64_at(&header, 16));
            let total = HEADER as u64 + u64::from(len);
            if at.saturating_add(total) > size || end <= first || next.is_some_and(|n| n != first) {
                break;
            }
            buf.clear();
            buf.resize(total as usize, 0);
            file.read_exact_at(&mut buf, at)?;
            if crc(&buf) != u32_at(&header, 4) {
                break;
            }
            chunks.insert(first, Chunk { offset: at, len, end });
            next = Some(end);
            at += total;
        }
        if at < size {
            tracing::info!(
                path = %path.display(),
                kept = at,
                dropped = size - at,
                "the audit tail ends in a torn or damaged chunk: cut there (the log regenerates it)"
            );
            file.set_len(at)?;
        }
        let shared = Arc::new(Shared {
            inner: RwLock::new(Inner { file, bytes: at, chunks }),
            pending: Mutex::new(Pending::default()),
            written: Condvar::new(),
            #[cfg(test)]
            fail_next: std::sync::atomic::AtomicBool::new(false),
        });
        // One apply's records waiting while the writer does the one before: an
        // apply that finds both taken waits for the writer.
        let (to_writer, from_applies) = sync_channel::<Vec<AuditRecord>>(1);
        let writing = shared.clone();
        let writer =
            std::thread::Builder::new().name("ration-audit-tail".into()).spawn(move || {
                for records in from_applies {
                    // A panic here must not leave readers waiting for this write.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        Self::write(&writing, &records)
                    }));
                    drop(records);
                    let mut p = writing.pending();
                    p.written += 1;
                    let failed = match result {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(format!("writing the audit tail: {e}")),
                        Err(_) => Some("writing the audit tail panicked".to_owned()),
                    };
                    if let Some(f) = failed {
                        p.failed.get_or_insert(f);
                    }
                    writing.written.notify_all();
                }
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            shared,
            to_writer: Mutex::new(Some(to_writer)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The file and its index, once every append handed over so far is written.
    fn read_inner(&self) -> std::io::Result<RwLockReadGuard<'_, Inner>> {
        self.settle()?;
        Ok(self.shared.inner.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn write_inner(&self) -> std::io::Result<RwLockWriteGuard<'_, Inner>> {
        self.settle()?;
        Ok(self.shared.write_inner())
    }

    /// Waits until the writer has written every append handed to it.
    fn settle(&self) -> std::io::Result<()> {
        let mut p = self.shared.pending();
        while p.written < p.queued {
            p = self.shared.written.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        match &p.failed {
            Some(e) => Err(std::io::Error::other(e.clone())),
            None => Ok(()),
        }
    }

    /// Appends `records` (numbered consecutively) at the end, in one write.
    ///
    /// The encoding and the write are done by the tail's writer thread, so an apply
    /// returns without waiting for them: every other call here waits for what was
    /// handed over before it (reads see every record appended before them). A
    /// failed write fails every later call, this one's next append included.
    pub(crate) fn append(&self, records: Vec<AuditRecord>) -> std::io::Result<()> {
        if let Some(e) = &self.shared.pending().failed {
            return Err(std::io::Error::other(e.clone()));
        }
        if records.is_empty() {
            return Ok(());
        }
        let to_writer = self.to_writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(to_writer) = to_writer.as_ref() else {
            return Err(std::io::Error::other("the audit tail is closed"));
        };
        self.shared.pending().queued += 1;
        if to_writer.send(records).is_err() {
            let mut p = self.shared.pending();
            p.queued -= 1;
            p.failed.get_or_insert_with(|| "the audit tail's writer stopped".into());
            return Err(std::io::Error::other("the audit tail's writer stopped"));
        }
        Ok(())
    }

    /// Tests: the writer's next write fails (as a full disk would make it).
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.shared.fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The writer's one write of an apply's records.
    fn write(shared: &Shared, records: &[AuditRecord]) -> std::io::Result<()> {
        #[cfg(test)]
        if shared.fail_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("no space left (injected)"));
        }
        Self::append_to(&mut shared.write_inner(), records)
    }

    fn append_to(inner: &mut Inner, records: &[AuditRecord]) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::new();
        let mut added = Vec::new();
        let mut start = 0usize; // index of the open chunk's first record
        let mut chunk_at = 0usize; // where the open chunk's header is in `buf`
        buf.resize(HEADER, 0);
        let close = |buf: &mut Vec<u8>, chunk_at: usize, first: u64, end: u64| {
            let len = (buf.len() - chunk_at - HEADER) as u32;
            buf[chunk_at..chunk_at + 4].copy_from_slice(&len.to_le_bytes());
            buf[chunk_at + 8..chunk_at + 16].copy_from_slice(&first.to_le_bytes());
            buf[chunk_at + 16..chunk_at + 24].copy_from_slice(&end.to_le_bytes());
            let sum = crc(&buf[chunk_at..]);
            buf[chunk_at + 4..chunk_at + 8].copy_from_slice(&sum.to_le_bytes());
            len
        };
        for (i, record) in records.iter().enumerate() {
            let before = buf.len();
            buf = crate::segments::frame_record_onto(record, buf)?;
            let held = i - start;
            // Full: this record goes to a new chunk (a record larger than a chunk
            // stands alone).
            if held > 0
                && (buf.len() - chunk_at - HEADER > AUDIT_VALUE_BYTES || held == AUDIT_CHUNK)
            {
                let encoded = buf.split_off(before);
                let (first, end) = (records[start].entry.seq, record.entry.seq);
                let len = close(&mut buf, chunk_at, first, end);
                added.push((first, Chunk { offset: inner.bytes + chunk_at as u64, len, end }));
                chunk_at = buf.len();
                buf.resize(chunk_at + HEADER, 0);
                buf.extend_from_slice(&encoded);
                start = i;
            }
        }
        let first = records[start].entry.seq;
        let end = records[records.len() - 1].entry.seq + 1;
        let len = close(&mut buf, chunk_at, first, end);
        added.push((first, Chunk { offset: inner.bytes + chunk_at as u64, len, end }));
        inner.file.write_all_at(&buf, inner.bytes)?;
        inner.bytes += buf.len() as u64;
        inner.chunks.extend(added);
        Ok(())
    }

    /// The first sequence number of the chunk holding `seq`, or of the first one
    /// after it.
    fn chunk_from(inner: &Inner, seq: u64) -> Option<u64> {
        match inner.chunks.range(..=seq).next_back() {
            Some((&first, c)) if c.end > seq => Some(first),
            _ => inner.chunks.range(seq..).next().map(|(&first, _)| first),
        }
    }

    /// Decodes a chunk's records (numbered `first..end`) onto `out`, with their
    /// sequence numbers.
    fn decode(
        first: u64,
        end: u64,
        bytes: &[u8],
        out: &mut Vec<(u64, AuditRecord)>,
    ) -> Result<(), ReadError> {
        for framed in Framed::new(first, end, bytes) {
            let (seq, framed) = framed?;
            out.push((seq, ration_core::audit::decode_record(&framed[4..])?));
        }
        Ok(())
    }

    /// The chunks holding records from `from` on, enough for `limit` of them:
    /// (first, end, the records' framed bytes), copied under the lock.
    pub(crate) fn read_raw(
        &self,
        from: u64,
        limit: usize,
    ) -> std::io::Result<Vec<(u64, u64, Vec<u8>)>> {
        let mut raw: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let inner = self.read_inner()?;
        let Some(start) = Self::chunk_from(&inner, from) else {
            return Ok(raw);
        };
        let mut wanted = 0u64;
        for (&first, c) in inner.chunks.range(start..) {
            if wanted >= limit as u64 {
                break;
            }
            let mut bytes = vec![0u8; c.len as usize];
            inner.file.read_exact_at(&mut bytes, c.offset + HEADER as u64)?;
            wanted += c.end - first.max(from);
            raw.push((first, c.end, bytes));
        }
        Ok(raw)
    }

    /// Records from `from`, in order, at most `limit`. The bytes are copied under
    /// the lock and decoded after it, so an apply waits for a copy at most.
    pub(crate) fn read(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, ReadError> {
        let raw = self.read_raw(from, limit)?;
        let mut out = Vec::new();
        let mut decoded = Vec::new();
        for (first, end, bytes) in raw {
            decoded.clear();
            Self::decode(first, end, &bytes, &mut decoded)?;
            for (seq, record) in decoded.drain(..) {
                if seq >= from {
                    if out.len() == limit {
                        return Ok(out);
                    }
                    out.push(record);
                }
            }
        }
        Ok(out)
    }

    /// The sequence number after the last record (0 if there is none).
    pub(crate) fn end(&self) -> std::io::Result<u64> {
        Ok(self.read_inner()?.chunks.last_key_value().map_or(0, |(_, c)| c.end))
    }

    /// Drops every record from `seq` on.
    pub(crate) fn truncate_from(&self, seq: u64) -> Result<(), ReadError> {
        let mut inner = self.write_inner()?;
        let Some(first) = Self::chunk_from(&inner, seq) else {
            return Ok(());
        };
        let c = inner.chunks[&first];
        let mut kept = Vec::new();
        if first < seq {
            let mut bytes = vec![0u8; c.len as usize];
            inner.file.read_exact_at(&mut bytes, c.offset + HEADER as u64)?;
            let mut decoded = Vec::new();
            Self::decode(first, c.end, &bytes, &mut decoded)?;
            kept = decoded.into_iter().filter(|(s, _)| *s < seq).map(|(_, r)| r).collect();
        }
        inner.file.set_len(c.offset)?;
        inner.bytes = c.offset;
        inner.chunks.split_off(&first);
        if !kept.is_empty() {
            Self::append_to(&mut inner, &kept)?;
        }
        Ok(())
    }

    /// Replaces every record with `records`.
    pub(crate) fn replace(&self, records: &[AuditRecord]) -> std::io::Result<()> {
        let mut inner = self.write_inner()?;
        inner.file.set_len(0)?;
        inner.bytes = 0;
        inner.chunks.clear();
        if records.is_empty() {
            return Ok(());
        }
        Self::append_to(&mut inner, records)
    }

    /// Drops the chunks wholly before `seq` (sealed into segments): what follows
    /// them is copied to a new file that takes this one's place.
    pub(crate) fn drop_before(&self, seq: u64) -> std::io::Result<()> {
        let mut inner = self.write_inner()?;
        let Some((&keep, kept)) = inner.chunks.iter().find(|(_, c)| c.end > seq) else {
            inner.file.set_len(0)?;
            inner.bytes = 0;
            inner.chunks.clear();
            return Ok(());
        };
        let from = kept.offset;
        if from == 0 {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = from;
        while at < inner.bytes {
            let n = usize::try_from((inner.bytes - at).min(buf.len() as u64)).unwrap_or(buf.len());
            inner.file.read_exact_at(&mut buf[..n], at)?;
            file.write_all_at(&buf[..n], at - from)?;
            at += n as u64;
        }
        std::fs::rename(&tmp, &self.path)?;
        inner.file = file;
        inner.bytes -= from;
        let rest = inner.chunks.split_off(&keep);
        inner.chunks =
            rest.into_iter().map(|(f, c)| (f, Chunk { offset: c.offset - from, ..c })).collect();
        Ok(())
    }

    /// Makes what was written durable (a restore, or an installed snapshot).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.read_inner()?.file.sync_data()
    }

    /// (first sequence number, end, length of its records) of every chunk.
    #[cfg(test)]
    pub(crate) fn chunks(&self) -> Vec<(u64, u64, usize)> {
        let inner = self.read_inner().unwrap();
        inner.chunks.iter().map(|(&f, c)| (f, c.end, c.len as usize)).collect()
    }
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_inner(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FileTail {
    /// Closes the writer's channel and waits for it to finish what it was handed,
    /// so the file is whole before anything opens it again.
    fn drop(&mut self) {
        drop(self.to_writer.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = writer.join();
        }
    }
}
