//! Where a node keeps its audit records: sealed segments on disk (the history,
//! immutable, see [`crate::segments`]) and the tail after them in a file of its own
//! ([`crate::tail`]: written on apply, unflushed, regenerated from the log after a
//! crash).
//!
//! The segments a node holds are those its current snapshot's manifest lists. A
//! segment the manifest lists and this node lacks (it installed a snapshot from a
//! peer, or lost the file) is *missing*: reads that need it fail with
//! [`ReadError::Missing`] until the node fetches it from a peer (the server's
//! fetcher, `ration_server::audit_fetch`) and [`AuditStore::install_segment`] checks
//! and keeps it.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ration_core::audit::{AuditFilter, AuditRecord, ChainHead, GENESIS};

use crate::segments::{self, SegmentEncoder, SegmentFile, SegmentRef};
use crate::ReadError;

/// When a snapshot build seals the tail into segments: once the tail holds at least
/// `min_records`, into segments of at most `max_records`; and where it moves the
/// old ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealPolicy {
    pub min_records: u64,
    pub max_records: u64,
    pub archive: Option<ArchivePolicy>,
}

/// Segments whose newest record is older than `after_ms` of ledger time are moved
/// from the data directory to `dir` at the next snapshot build. They stay listed
/// and readable there (queries, exports, serving peers), and are never deleted by
/// the node: the archive is append-only, so several nodes may share one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivePolicy {
    pub dir: PathBuf,
    pub after_ms: u64,
}

impl Default for SealPolicy {
    fn default() -> Self {
        // About 20 MB and 300 MB of records: a snapshot carries at most the first,
        // a data directory gains a file per the second.
        Self { min_records: 65_536, max_records: 1_048_576, archive: None }
    }
}

/// Audit records: segments, then the tail.
#[derive(Clone, Debug)]
pub struct AuditStore {
    pub(crate) backend: AuditBackend,
    pub(crate) sealed: Arc<RwLock<Sealed>>,
}

#[derive(Clone, Debug)]
pub(crate) enum AuditBackend {
    /// An append-only file of chunks: one write per apply call.
    File(Arc<crate::tail::FileTail>),
    /// Volatile, like unflushed sled writes: rebuilt from the snapshot and the log.
    /// (The simulation's store; it never seals.)
    Mem(Arc<std::sync::Mutex<Vec<AuditRecord>>>),
}

/// The sealed segments: what the manifest lists, and which of them are on disk.
#[derive(Debug, Default)]
pub struct Sealed {
    /// `data_dir/audit/` (None in memory: nothing is ever sealed).
    pub(crate) dir: Option<PathBuf>,
    pub(crate) policy: Option<SealPolicy>,
    /// Contiguous from sequence number 0.
    pub(crate) manifest: Vec<SegmentRef>,
    /// The listed segments present here, by first sequence number.
    pub(crate) files: BTreeMap<u64, SegmentFile>,
}

impl Sealed {
    /// The sequence number after the last sealed record.
    pub fn end(&self) -> u64 {
        self.manifest.last().map_or(0, SegmentRef::end)
    }

    /// Where the tail's chain starts.
    pub fn tail_start(&self) -> ChainHead {
        self.manifest.last().map_or(ChainHead::default(), |s| ChainHead {
            next_seq: s.end(),
            last_hash: s.last_hash,
        })
    }

    fn find(&self, seq: u64) -> Option<&SegmentRef> {
        let i = self.manifest.partition_point(|s| s.end() <= seq);
        self.manifest.get(i).filter(|s| s.first_seq <= seq)
    }

    pub fn missing(&self) -> Vec<SegmentRef> {
        self.manifest.iter().filter(|s| !self.files.contains_key(&s.first_seq)).cloned().collect()
    }

    /// Adopts `manifest` (a snapshot's): keeps the files it lists that are here and
    /// intact, deletes every other segment file. Files that fail their check are
    /// deleted too (and fetched again from a peer).
    pub(crate) fn adopt(&mut self, manifest: Vec<SegmentRef>) -> std::io::Result<()> {
        self.files.clear();
        self.manifest = manifest;
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        std::fs::create_dir_all(&dir)?;
        // Archived segments first; a copy in the data directory wins.
        if let Some(archive) = self.policy.as_ref().and_then(|p| p.archive.as_ref()) {
            for r in &self.manifest {
                let path = archive.dir.join(r.file_name());
                if path.exists() {
                    match SegmentFile::open(&path, r) {
                        Ok(f) => {
                            self.files.insert(r.first_seq, f);
                        }
                        Err(e) => tracing::warn!(error = %e, "archived audit segment unusable"),
                    }
                }
            }
        }
        let wanted: BTreeMap<String, &SegmentRef> =
            self.manifest.iter().map(|s| (s.file_name(), s)).collect();
        for item in std::fs::read_dir(&dir)? {
            let path = item?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            match wanted.get(&name) {
                Some(r) => match SegmentFile::open(&path, r) {
                    Ok(f) => {
                        self.files.insert(r.first_seq, f);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "audit segment damaged; it will be fetched from a peer");
                        std::fs::remove_file(&path)?;
                    }
                },
                None => std::fs::remove_file(&path)?,
            }
        }
        Ok(())
    }
}

/// Most records in one chunk of the tail, and per read when many are copied.
pub(crate) const AUDIT_CHUNK: usize = 4096;

/// Most encoded bytes of records in one chunk of the tail past its first record (a
/// single larger record stands alone): a read of a few records decodes about
/// this much. (It was sled's limit, when the tail was a sled tree: sled writes a
/// value above a quarter of its 512 KiB segment as a file of its own, and a leaf
/// of 17 values is logged whole when it splits.)
pub(crate) const AUDIT_VALUE_BYTES: usize = 7 * 1024;

impl AuditStore {
    pub(crate) fn new(backend: AuditBackend, dir: Option<PathBuf>, policy: SealPolicy) -> Self {
        let policy = dir.as_ref().map(|_| policy);
        Self { backend, sealed: Arc::new(RwLock::new(Sealed { dir, policy, ..Sealed::default() })) }
    }

    pub(crate) fn sealed(&self) -> RwLockReadGuard<'_, Sealed> {
        self.sealed.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn sealed_mut(&self) -> RwLockWriteGuard<'_, Sealed> {
        self.sealed.write().unwrap_or_else(|p| p.into_inner())
    }

    fn mem(
        records: &Arc<std::sync::Mutex<Vec<AuditRecord>>>,
    ) -> std::sync::MutexGuard<'_, Vec<AuditRecord>> {
        records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn append(&self, records: Vec<AuditRecord>) -> std::io::Result<()> {
        match &self.backend {
            // In bounded chunks however many one apply call brings (a restart
            // re-applies the whole log after the snapshot in one call).
            AuditBackend::File(tail) => tail.append(records),
            AuditBackend::Mem(m) => {
                Self::mem(m).extend(records);
                Ok(())
            }
        }
    }

    /// Makes the tail durable (after a restore, or an installed snapshot).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        match &self.backend {
            AuditBackend::File(tail) => tail.sync(),
            AuditBackend::Mem(_) => Ok(()),
        }
    }

    /// Records from sequence number `from`, in order, at most `limit`: from the
    /// segments, then the tail. Fails with [`ReadError::Missing`] on a segment this
    /// node has not fetched yet.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, ReadError> {
        let mut out = Vec::new();
        let mut next = from;
        let end = {
            let sealed = self.sealed();
            while out.len() < limit && next < sealed.end() {
                let seg = sealed.find(next).expect("the manifest is contiguous from 0");
                let file = sealed
                    .files
                    .get(&seg.first_seq)
                    .ok_or(ReadError::Missing { first: seg.first_seq, end: seg.end() })?;
                let got = file.read(next, limit - out.len())?;
                if got.is_empty() {
                    break;
                }
                next = got.last().map_or(next, |r| r.entry.seq + 1);
                out.extend(got);
            }
            sealed.end()
        };
        if out.len() < limit {
            out.extend(self.read_tail(next.max(end), limit - out.len())?);
        }
        Ok(out)
    }

    /// Records of the tail from `from`, at most `limit`.
    fn read_tail(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, ReadError> {
        match &self.backend {
            AuditBackend::File(tail) => tail.read(from, limit),
            AuditBackend::Mem(m) => {
                let held = Self::mem(m);
                let start = usize::try_from(from).unwrap_or(usize::MAX).min(held.len());
                Ok(held.iter().skip(start).take(limit).cloned().collect())
            }
        }
    }

    /// Number of records (they run from 0 without gaps, some perhaps missing here).
    pub fn len(&self) -> Result<u64, ReadError> {
        let sealed_end = self.sealed().end();
        let tail = match &self.backend {
            AuditBackend::Mem(m) => Self::mem(m).len() as u64,
            AuditBackend::File(tail) => tail.end()?,
        };
        Ok(tail.max(sealed_end))
    }

    pub fn is_empty(&self) -> bool {
        self.len().map_or(true, |n| n == 0)
    }

    /// Drops every record of the tail from sequence number `seq` on.
    pub(crate) fn truncate_from(&self, seq: u64) -> Result<(), ReadError> {
        match &self.backend {
            AuditBackend::File(tail) => tail.truncate_from(seq),
            AuditBackend::Mem(m) => {
                Self::mem(m).truncate(usize::try_from(seq).unwrap_or(usize::MAX));
                Ok(())
            }
        }
    }

    /// Replaces the tail with `records` (in memory: the whole list, which then
    /// starts at 0 only if nothing is sealed, as in the simulation).
    pub(crate) fn replace_tail(&self, records: &[AuditRecord]) -> std::io::Result<()> {
        match &self.backend {
            AuditBackend::File(tail) => tail.replace(records),
            AuditBackend::Mem(m) => {
                let mut held = Self::mem(m);
                held.clear();
                held.extend_from_slice(records);
                Ok(())
            }
        }
    }

    /// Drops the tail's chunks that lie wholly in sealed segments.
    pub(crate) fn drop_sealed_tail(&self) -> Result<(), ReadError> {
        let AuditBackend::File(tail) = &self.backend else {
            return Ok(());
        };
        let end = self.sealed().end();
        Ok(tail.drop_before(end)?)
    }

    /// Seals the tail up to `head` into segments (files written and synced) once it
    /// holds at least the policy's minimum. Returns how many segments it wrote.
    pub(crate) fn seal_until(&self, head: u64) -> Result<usize, ReadError> {
        let (dir, policy, mut start) = {
            let sealed = self.sealed();
            match (&sealed.dir, &sealed.policy) {
                (Some(dir), Some(p)) => (dir.clone(), p.clone(), sealed.tail_start()),
                _ => return Ok(0),
            }
        };
        let mut written = 0;
        while head.saturating_sub(start.next_seq) >= policy.min_records {
            let count = (head - start.next_seq).min(policy.max_records);
            let r = self.write_segment(&dir, start, count)?;
            start = ChainHead { next_seq: r.end(), last_hash: r.last_hash };
            let file = SegmentFile::open(&dir.join(r.file_name()), &r)?;
            let mut sealed = self.sealed_mut();
            sealed.files.insert(r.first_seq, file);
            sealed.manifest.push(r);
            written += 1;
        }
        Ok(written)
    }

    fn write_segment(
        &self,
        dir: &Path,
        start: ChainHead,
        count: u64,
    ) -> Result<SegmentRef, ReadError> {
        std::fs::create_dir_all(dir)?;
        let name = segments::segment_file_name(start.next_seq, count);
        let mut result = None;
        segments::write_file_durably(dir, &name, |f| {
            let mut enc = SegmentEncoder::new(
                BufWriter::with_capacity(1 << 20, f),
                start.next_seq,
                count,
                start.last_hash,
            )?;
            let mut next = start.next_seq;
            let end = start.next_seq + count;
            // From the file: each record's bytes are copied as the tail holds them.
            if let AuditBackend::File(tail) = &self.backend {
                while next < end {
                    let before = next;
                    let want = (end - next).min(AUDIT_CHUNK as u64) as usize;
                    let raw = tail.read_raw(next, want)?;
                    if raw.is_empty() {
                        return Err(std::io::Error::other(format!(
                            "the audit tail ends at {next}, before {end}"
                        )));
                    }
                    for (first, chunk_end, bytes) in &raw {
                        for framed in crate::tail::Framed::new(*first, *chunk_end, bytes) {
                            let (seq, framed) = framed?;
                            if seq < next {
                                continue;
                            }
                            if seq >= end {
                                break;
                            }
                            enc.push_framed(framed)?;
                            next = seq + 1;
                        }
                    }
                    if next == before {
                        return Err(std::io::Error::other(format!(
                            "the audit tail has no record {next}"
                        )));
                    }
                }
            }
            while next < end {
                let chunk = self
                    .read_tail(next, (end - next).min(AUDIT_CHUNK as u64) as usize)
                    .map_err(std::io::Error::other)?;
                if chunk.is_empty() {
                    return Err(std::io::Error::other(format!(
                        "the audit tail ends at {next}, before {end}"
                    )));
                }
                for r in &chunk {
                    enc.push(r)?;
                }
                next += chunk.len() as u64;
            }
            let (r, mut w) = enc.finish()?;
            w.flush()?;
            result = Some(r);
            Ok(())
        })?;
        Ok(result.expect("written"))
    }

    /// The bytes of the segment `[first, first + count)` as this node would seal it,
    /// produced from whatever holds those records here, handed to `out` in pieces
    /// of about `chunk` bytes. Fails if this node lacks any of the records.
    pub fn serve_segment(
        &self,
        first: u64,
        count: u64,
        chunk: usize,
        mut out: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<SegmentRef, ReadError> {
        let prev = if first == 0 {
            GENESIS
        } else {
            let before = self.read(first - 1, 1)?;
            match before.first() {
                Some(r) if r.entry.seq == first - 1 => r.hash,
                _ => return Err(ReadError::Missing { first: first - 1, end: first }),
            }
        };
        let mut enc = SegmentEncoder::new(Vec::with_capacity(chunk + 4096), first, count, prev)?;
        let end = first.checked_add(count).ok_or(ReadError::Missing { first, end: u64::MAX })?;
        let mut next = first;
        while next < end {
            let got = self.read(next, (end - next).min(AUDIT_CHUNK as u64) as usize)?;
            if got.is_empty() {
                return Err(ReadError::Missing { first: next, end });
            }
            for r in &got {
                enc.push(r)?;
                if enc.out_mut().len() >= chunk {
                    let piece = std::mem::take(enc.out_mut());
                    if !out(piece) {
                        return Err(ReadError::Io(std::io::Error::other("the receiver went away")));
                    }
                }
            }
            next += got.len() as u64;
        }
        let (r, rest) = enc.finish()?;
        if !rest.is_empty() && !out(rest) {
            return Err(ReadError::Io(std::io::Error::other("the receiver went away")));
        }
        Ok(r)
    }

    /// Keeps a fetched segment: checks the file at `tmp` is exactly `want` (digest,
    /// chain, every record), then moves it into place. False if the manifest no
    /// longer lists `want` (a newer snapshot was installed meanwhile).
    pub fn install_segment(&self, tmp: &Path, want: &SegmentRef) -> Result<bool, ReadError> {
        segments::verify_file(tmp, want)?;
        let mut sealed = self.sealed_mut();
        if !sealed.manifest.contains(want) {
            std::fs::remove_file(tmp)?;
            return Ok(false);
        }
        let dir =
            sealed.dir.clone().ok_or_else(|| std::io::Error::other("no segment directory"))?;
        let path = dir.join(want.file_name());
        std::fs::File::open(tmp)?.sync_all()?;
        std::fs::rename(tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()?;
        let file = SegmentFile::open(&path, want)?;
        sealed.files.insert(want.first_seq, file);
        Ok(true)
    }

    /// Moves the segments in the data directory whose newest record is older than
    /// the archive policy's age at ledger time `now_ms` to the archive directory
    /// (copied, synced, renamed into place, then removed here). Returns how many.
    pub(crate) fn archive_old(&self, now_ms: u64) -> Result<usize, ReadError> {
        let (dir, archive, old) = {
            let sealed = self.sealed();
            let (Some(dir), Some(archive)) =
                (&sealed.dir, sealed.policy.as_ref().and_then(|p| p.archive.clone()))
            else {
                return Ok(0);
            };
            let cutoff = now_ms.saturating_sub(archive.after_ms);
            let old: Vec<SegmentRef> = sealed
                .manifest
                .iter()
                .filter(|r| {
                    sealed.files.get(&r.first_seq).is_some_and(|f| {
                        f.path.parent() == Some(dir.as_path()) && f.footer.max_time_ms < cutoff
                    })
                })
                .cloned()
                .collect();
            (dir.clone(), archive, old)
        };
        if old.is_empty() {
            return Ok(0);
        }
        std::fs::create_dir_all(&archive.dir)?;
        for r in &old {
            let name = r.file_name();
            let target = archive.dir.join(&name);
            let usable = target.exists() && SegmentFile::open(&target, r).is_ok();
            if !usable {
                let from = dir.join(&name);
                segments::write_file_durably(&archive.dir, &name, |f| {
                    std::io::copy(&mut std::fs::File::open(&from)?, f).map(|_| ())
                })?;
            }
            let file = SegmentFile::open(&target, r)?;
            self.sealed_mut().files.insert(r.first_seq, file);
            std::fs::remove_file(dir.join(&name))?;
        }
        std::fs::File::open(&dir)?.sync_all()?;
        Ok(old.len())
    }

    /// (segments in the data directory, segments in the archive)
    pub fn placement(&self) -> (usize, usize) {
        let sealed = self.sealed();
        let here = sealed
            .files
            .values()
            .filter(|f| sealed.dir.as_deref().is_some_and(|d| f.path.parent() == Some(d)))
            .count();
        (here, sealed.files.len() - here)
    }

    /// Where fetched segments are written before they are checked.
    pub fn fetch_dir(&self) -> Option<PathBuf> {
        self.sealed().dir.clone()
    }

    /// Segments listed but not held here.
    pub fn missing(&self) -> Vec<SegmentRef> {
        self.sealed().missing()
    }

    /// The first sequence number at or after `from` whose segment may hold a record
    /// `filter` selects (`from` itself when it is in the tail): a query skips the
    /// segments the zone maps exclude without reading them.
    pub fn skip_to(&self, from: u64, filter: &AuditFilter) -> u64 {
        let sealed = self.sealed();
        let mut next = from;
        while let Some(seg) = sealed.find(next) {
            match sealed.files.get(&seg.first_seq) {
                Some(f) if !f.footer.may_match(filter) => next = seg.end(),
                _ => break,
            }
        }
        next
    }

    /// The sequence number after the last sealed record: records from here on are
    /// in the tail (and in the next snapshot).
    pub fn sealed_end(&self) -> u64 {
        self.sealed().end()
    }

    /// (segments listed, missing, bytes of the present ones)
    pub fn segment_counts(&self) -> (usize, usize, u64) {
        let sealed = self.sealed();
        let present: u64 = sealed
            .manifest
            .iter()
            .filter(|s| sealed.files.contains_key(&s.first_seq))
            .map(|s| s.bytes)
            .sum();
        (sealed.manifest.len(), sealed.manifest.len() - sealed.files.len(), present)
    }
}
