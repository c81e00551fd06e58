//! Sealed audit segments: the audit history outside snapshots.
//!
//! A segment is an immutable file holding the audit records `[first_seq, first_seq +
//! count)`. Its bytes are a pure function of those records (so every replica that
//! holds the records can produce the same file, and a follower can check one it
//! fetched against the digest a snapshot's manifest names):
//!
//! ```text
//! "RATNAUDS" | version u32 | first_seq u64 | count u64 | prev_hash [32]
//! records: (len u32, postcard(AuditRecord)) * count (a record with neither cause
//!          nor detail in audit format 1's layout: `ration_core::audit::encode_record`)
//! footer: postcard(Footer) | footer_len u32
//! digest: SHA-256 of every byte before it
//! ```
//!
//! The footer is a small index: the byte offset of every [`OFFSET_EVERY`]th record
//! (a read seeks, not scans) and a zone map (ledger-time range, budget roots and
//! principals, each set up to [`ZONE_SET_MAX`] names), so a filtered audit query
//! skips whole segments that cannot match. Integers are little-endian.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ration_core::audit::{verify_chain, AuditFilter, AuditRecord, ChainHead, Hash};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const SEGMENT_MAGIC: &[u8; 8] = b"RATNAUDS";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 8 + 4 + 8 + 8 + 32;
/// One offset in the footer per this many records.
pub const OFFSET_EVERY: u64 = 1024;
/// Zone-map sets hold at most this many names; past it the set means "any".
pub const ZONE_SET_MAX: usize = 64;
/// A record larger than this is refused when read (a damaged length).
const MAX_RECORD: u32 = 1 << 20;

/// What a snapshot's manifest says of one segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    pub first_seq: u64,
    pub count: u64,
    /// The `prev_hash` of its first record and the hash of its last.
    pub prev_hash: Hash,
    pub last_hash: Hash,
    /// SHA-256 of the file (its trailer).
    pub digest: Hash,
    pub bytes: u64,
}

impl SegmentRef {
    pub fn end(&self) -> u64 {
        self.first_seq + self.count
    }

    pub fn file_name(&self) -> String {
        segment_file_name(self.first_seq, self.count)
    }
}

/// Appends `record` to `out` as a segment holds it (and the audit tail keeps it):
/// `[length u32][encode_record]`. Format 1's bytes for a record without a cause or
/// detail, so the file is the same whichever version writes it.
pub fn frame_record_onto(record: &AuditRecord, mut out: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out = ration_core::audit::encode_record_onto(record, out);
    let n = u32::try_from(out.len() - at - 4).map_err(std::io::Error::other)?;
    out[at..at + 4].copy_from_slice(&n.to_le_bytes());
    Ok(out)
}

pub fn segment_file_name(first: u64, count: u64) -> String {
    format!("seg-{first:020}-{count:010}.aud")
}

/// The index at the end of a segment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footer {
    /// Byte offset of record `i * OFFSET_EVERY` from the start of the file.
    pub offsets: Vec<u64>,
    pub min_time_ms: u64,
    pub max_time_ms: u64,
    /// Budget roots and principals of its records (None: more than ZONE_SET_MAX).
    pub roots: Option<BTreeSet<String>>,
    pub principals: Option<BTreeSet<String>>,
}

impl Footer {
    /// False only if no record of the segment can match `filter`.
    pub fn may_match(&self, filter: &AuditFilter) -> bool {
        if filter.from_ms.is_some_and(|t| self.max_time_ms < t)
            || filter.to_ms.is_some_and(|t| self.min_time_ms >= t)
        {
            return false;
        }
        if let (Some(sub), Some(roots)) = (&filter.subtree, &self.roots) {
            if !roots.contains(sub.root()) {
                return false;
            }
        }
        if let (Some(p), Some(ps)) = (&filter.principal, &self.principals) {
            if !ps.contains(p.as_str()) {
                return false;
            }
        }
        true
    }

    fn note(&mut self, index: u64, offset: u64, time_ms: u64, root: &str, principal: &str) {
        if index % OFFSET_EVERY == 0 {
            self.offsets.push(offset);
        }
        if index == 0 {
            self.min_time_ms = time_ms;
            self.max_time_ms = time_ms;
        } else {
            self.min_time_ms = self.min_time_ms.min(time_ms);
            self.max_time_ms = self.max_time_ms.max(time_ms);
        }
        add_capped(&mut self.roots, root);
        add_capped(&mut self.principals, principal);
    }
}

fn add_capped(set: &mut Option<BTreeSet<String>>, name: &str) {
    if let Some(s) = set {
        if !s.contains(name) {
            if s.len() == ZONE_SET_MAX {
                *set = None;
            } else {
                s.insert(name.to_owned());
            }
        }
    }
}

/// Writes a segment's bytes as records arrive, to any `Write` (a file when
/// sealing, a buffer when a peer serves one).
pub struct SegmentEncoder<W: Write> {
    out: W,
    hasher: Sha256,
    written: u64,
    first_seq: u64,
    count: u64,
    next: ChainHead,
    prev_hash: Hash,
    footer: Footer,
    buf: Vec<u8>,
}

impl<W: Write> SegmentEncoder<W> {
    /// Starts the segment of `count` records from `first_seq`, whose first record's
    /// `prev_hash` is `prev_hash`.
    pub fn new(out: W, first_seq: u64, count: u64, prev_hash: Hash) -> std::io::Result<Self> {
        let mut enc = Self {
            out,
            hasher: Sha256::new(),
            written: 0,
            first_seq,
            count,
            next: ChainHead { next_seq: first_seq, last_hash: prev_hash },
            prev_hash,
            footer: Footer {
                roots: Some(BTreeSet::new()),
                principals: Some(BTreeSet::new()),
                ..Footer::default()
            },
            buf: Vec::new(),
        };
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(SEGMENT_MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&first_seq.to_le_bytes());
        header.extend_from_slice(&count.to_le_bytes());
        header.extend_from_slice(&prev_hash);
        enc.put(&header)?;
        Ok(enc)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends the next record; it must continue the chain.
    pub fn push(&mut self, record: &AuditRecord) -> std::io::Result<()> {
        let index = self.next.next_seq - self.first_seq;
        if index >= self.count {
            return Err(std::io::Error::other(format!(
                "segment from {} holds {} records; record {} is past it",
                self.first_seq, self.count, record.entry.seq
            )));
        }
        self.next = verify_chain(std::iter::once(record), self.next)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let e = &record.entry;
        self.footer.note(index, self.written, e.time_ms, e.budget.root(), e.principal.as_str());
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf = frame_record_onto(record, buf)?;
        let r = self.put(&buf);
        self.buf = buf;
        r
    }

    /// Appends the next record as the bytes a segment holds for it,
    /// `[length u32][encode_record]` (as the audit tail keeps them), without
    /// decoding it: its sequence number must continue the segment, and its own
    /// hash becomes the chain's head. Its content is not hashed again here: the
    /// bytes are the tail's, whose chunks carry a CRC, and were encoded from the
    /// record apply hashed (`rationctl audit verify` recomputes every hash).
    pub fn push_framed(&mut self, framed: &[u8]) -> std::io::Result<()> {
        let index = self.next.next_seq - self.first_seq;
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let len = framed
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .filter(|&n| n + 4 == framed.len())
            .ok_or_else(|| bad("a framed audit record's length does not match it".into()))?;
        let (head, hash) = ration_core::audit::record_head(&framed[4..4 + len])
            .map_err(|e| bad(format!("an audit record's leading fields do not decode: {e}")))?;
        if index >= self.count {
            return Err(std::io::Error::other(format!(
                "segment from {} holds {} records; record {} is past it",
                self.first_seq, self.count, head.seq
            )));
        }
        if head.seq != self.next.next_seq {
            return Err(bad(format!(
                "expected audit record {}, found {}",
                self.next.next_seq, head.seq
            )));
        }
        self.footer.note(index, self.written, head.time_ms, head.root(), head.principal);
        self.next = ChainHead { next_seq: head.seq + 1, last_hash: hash };
        self.put(framed)
    }

    /// The output so far (a server drains its buffer between records).
    pub fn out_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes the footer and digest; returns the segment's reference and the output.
    pub fn finish(mut self) -> std::io::Result<(SegmentRef, W)> {
        if self.next.next_seq != self.first_seq + self.count {
            return Err(std::io::Error::other(format!(
                "segment from {} should hold {} records but got {}",
                self.first_seq,
                self.count,
                self.next.next_seq - self.first_seq
            )));
        }
        let footer = postcard::to_allocvec(&self.footer).map_err(std::io::Error::other)?;
        self.put(&footer)?;
        self.put(&(footer.len() as u32).to_le_bytes())?;
        let digest: Hash = self.hasher.clone().finalize().into();
        self.out.write_all(&digest)?;
        self.written += 32;
        let r = SegmentRef {
            first_seq: self.first_seq,
            count: self.count,
            prev_hash: self.prev_hash,
            last_hash: self.next.last_hash,
            digest,
            bytes: self.written,
        };
        Ok((r, self.out))
    }
}

impl<W: Write> std::fmt::Debug for SegmentEncoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentEncoder")
            .field("first_seq", &self.first_seq)
            .field("count", &self.count)
            .field("next_seq", &self.next.next_seq)
            .finish_non_exhaustive()
    }
}

/// Why a segment file was refused.
fn bad(path: &Path, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("audit segment {}: {what}", path.display()),
    )
}

/// A sealed segment on disk, its footer read (not its records).
#[derive(Clone, Debug)]
pub struct SegmentFile {
    pub path: PathBuf,
    pub first_seq: u64,
    pub count: u64,
    pub footer: Footer,
}

impl SegmentFile {
    /// Opens `path` and reads its header and footer, checking them against what
    /// the manifest says (`expect`): range and size. The digest is checked by
    /// [`verify_file`] (a whole read), not here.
    pub fn open(path: &Path, expect: &SegmentRef) -> std::io::Result<Self> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        if len != expect.bytes {
            return Err(bad(path, format!("{len} bytes, the manifest says {}", expect.bytes)));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        f.read_exact(&mut header)?;
        let (first, count, prev) = parse_header(path, &header)?;
        if (first, count, prev) != (expect.first_seq, expect.count, expect.prev_hash) {
            return Err(bad(path, "header does not match the manifest"));
        }
        if len < HEADER_LEN + 4 + 32 {
            return Err(bad(path, "too short"));
        }
        f.seek(SeekFrom::Start(len - 36))?;
        let mut tail = [0u8; 36];
        f.read_exact(&mut tail)?;
        if tail[4..] != expect.digest {
            return Err(bad(path, "digest does not match the manifest"));
        }
        let footer_len = u64::from(u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")));
        if footer_len > len - HEADER_LEN - 36 {
            return Err(bad(path, "footer length out of range"));
        }
        f.seek(SeekFrom::Start(len - 36 - footer_len))?;
        let mut footer = vec![0u8; footer_len as usize];
        f.read_exact(&mut footer)?;
        let footer: Footer =
            postcard::from_bytes(&footer).map_err(|e| bad(path, format!("footer: {e}")))?;
        if footer.offsets.len() as u64 != count.div_ceil(OFFSET_EVERY) {
            return Err(bad(path, "footer offsets do not match the record count"));
        }
        Ok(Self { path: path.to_path_buf(), first_seq: first, count, footer })
    }

    /// Records from `from` (inside this segment), at most `limit`.
    pub fn read(&self, from: u64, limit: usize) -> std::io::Result<Vec<AuditRecord>> {
        let end = self.first_seq + self.count;
        if from < self.first_seq || from >= end {
            return Ok(Vec::new());
        }
        let index = from - self.first_seq;
        let slot = (index / OFFSET_EVERY) as usize;
        let mut skip = index - slot as u64 * OFFSET_EVERY;
        let mut f = BufReader::with_capacity(64 * 1024, File::open(&self.path)?);
        f.seek(SeekFrom::Start(self.footer.offsets[slot]))?;
        let mut out = Vec::new();
        let mut seq = self.first_seq + slot as u64 * OFFSET_EVERY;
        while out.len() < limit && seq < end {
            let record = read_record(&self.path, &mut f)?;
            if record.entry.seq != seq {
                return Err(bad(
                    &self.path,
                    format!("record {} where {seq} belongs", record.entry.seq),
                ));
            }
            if skip > 0 {
                skip -= 1;
            } else {
                out.push(record);
            }
            seq += 1;
        }
        Ok(out)
    }
}

fn parse_header(path: &Path, h: &[u8]) -> std::io::Result<(u64, u64, Hash)> {
    if &h[..8] != SEGMENT_MAGIC {
        return Err(bad(path, "not an audit segment (bad magic)"));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(path, format!("version {version}, this build reads {VERSION}")));
    }
    let first = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
    let count = u64::from_le_bytes(h[20..28].try_into().expect("8 bytes"));
    let prev: Hash = h[28..60].try_into().expect("32 bytes");
    Ok((first, count, prev))
}

fn read_record(path: &Path, r: &mut impl Read) -> std::io::Result<AuditRecord> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_RECORD {
        return Err(bad(path, format!("record length {len} is out of range")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    ration_core::audit::decode_record(&buf)
        .map_err(|e| bad(path, format!("record does not decode: {e}")))
}

/// Reads the whole file at `path` and checks it is exactly the segment `expect`
/// names: digest, header, every record in sequence and chained from `prev_hash` to
/// `last_hash`, and the footer as the records give it.
pub fn verify_file(path: &Path, expect: &SegmentRef) -> std::io::Result<()> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len != expect.bytes {
        return Err(bad(path, format!("{len} bytes, expected {}", expect.bytes)));
    }
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut header = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut header)?;
    let (first, count, prev) = parse_header(path, &header)?;
    if (first, count, prev) != (expect.first_seq, expect.count, expect.prev_hash) {
        return Err(bad(path, "header does not match the manifest"));
    }
    // Re-encoding the records must give the same bytes, digest included.
    let mut enc = SegmentEncoder::new(std::io::sink(), first, count, prev)?;
    for _ in 0..count {
        let record = read_record(path, &mut r)?;
        enc.push(&record).map_err(|e| bad(path, e))?;
    }
    let (got, _) = enc.finish().map_err(|e| bad(path, e))?;
    if got != *expect {
        return Err(bad(path, "its records do not give the digest the manifest names"));
    }
    Ok(())
}

/// Writes `bytes` to `dir/name` durably: temporary file, fsync, rename, fsync dir.
pub fn write_file_durably(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    write(&mut f)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}
