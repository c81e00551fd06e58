use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::*;

struct SledBuilder;

impl StoreBuilder<TypeConfig, SledLogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, SledLogStore, StateMachine), StorageError<NodeId>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = open(dir.path(), LedgerConfig::default()).expect("storage opens");
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    Suite::test_all(SledBuilder).expect("openraft's storage suite passes");
}

fn records(n: u64) -> Vec<AuditRecord> {
    use ration_core::{Batch, BudgetPath, BudgetSpec, ClientId, Command, Op, Principal, Request};
    let mut ledger = Ledger::default();
    let mut out = Vec::new();
    for i in 0..n {
        let spec = BudgetSpec { path: BudgetPath::new(format!("b{i}")).unwrap(), limits: vec![] };
        let req = Request {
            client: ClientId::new("c").unwrap(),
            request_id: i + 1,
            principal: Principal::new("ops").unwrap(),
            op: Op::CreateBudget(spec),
        };
        let entry =
            ration_core::Entry::V1(Batch { time_ms: 1, commands: vec![Command::Request(req)] });
        out.extend(ledger.apply(i + 1, &entry).audit);
    }
    out
}

#[test]
fn audit_chunks_read_and_truncate_across_boundaries() {
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open(dir.path(), LedgerConfig::default()).unwrap();
    let all = records(10);
    for chunk in [&all[0..3], &all[3..4], &all[4..10]] {
        sm.audit.append(chunk.to_vec()).unwrap();
    }
    assert_eq!(sm.audit.len().unwrap(), 10);
    assert_eq!(sm.audit.read(2, 5).unwrap(), all[2..7].to_vec());
    assert_eq!(sm.audit.read(9, 5).unwrap(), all[9..].to_vec());
    assert!(sm.audit.read(10, 5).unwrap().is_empty());
    sm.audit.truncate_from(5).unwrap();
    assert_eq!(sm.audit.len().unwrap(), 5);
    assert_eq!(sm.audit.read(0, 100).unwrap(), all[..5].to_vec());
    sm.audit.truncate_from(0).unwrap();
    assert_eq!(sm.audit.len().unwrap(), 0);
}

/// The file tail of a store opened in `dir`.
fn file_tail(sm: &StateMachine) -> &crate::tail::FileTail {
    let crate::audit_store::AuditBackend::File(tail) = &sm.audit.backend else {
        panic!("a store on disk has a file tail")
    };
    tail
}

#[test]
fn one_large_apply_is_kept_in_bounded_chunks() {
    // A restart re-applies everything after the snapshot in one call; a chunk per
    // call made every later read of a few records decode all of them.
    use crate::audit_store::{AUDIT_CHUNK, AUDIT_VALUE_BYTES};
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open(dir.path(), LedgerConfig::default()).unwrap();
    let n = AUDIT_CHUNK as u64 * 2 + 7;
    let all = records(n);
    sm.audit.append(all.clone()).unwrap();
    let mut seen = 0;
    for (first, end, len) in file_tail(&sm).chunks() {
        let held = (end - first) as usize;
        assert_eq!(first, seen as u64, "chunks are contiguous");
        let framed = |r: &AuditRecord| 4 + ration_core::audit::encode_record(r).len();
        let bytes: usize = all[seen..seen + held].iter().map(framed).sum();
        assert_eq!(len, bytes, "a chunk holds its records, each framed with its length");
        assert!(held <= AUDIT_CHUNK && len <= AUDIT_VALUE_BYTES, "{len}");
        // Full, but for the last: one more record would have gone over.
        if seen + held < all.len() {
            let more = len + framed(&all[seen + held]);
            assert!(more > AUDIT_VALUE_BYTES || held == AUDIT_CHUNK);
        }
        seen += held;
    }
    assert_eq!(seen, all.len());
    assert_eq!(sm.audit.len().unwrap(), n);
    assert_eq!(sm.audit.read(0, usize::MAX).unwrap(), all);
    let mid = AUDIT_CHUNK as u64 + 3;
    assert_eq!(sm.audit.read(mid, 2).unwrap(), all[mid as usize..mid as usize + 2].to_vec());
    sm.audit.truncate_from(mid).unwrap();
    assert_eq!(sm.audit.read(0, usize::MAX).unwrap(), all[..mid as usize].to_vec());
    assert_eq!(sm.audit.len().unwrap(), mid);
}

#[test]
fn a_record_larger_than_a_chunk_stands_alone() {
    use crate::audit_store::AUDIT_VALUE_BYTES;
    let mut all = records(5);
    // A record far larger than a chunk (the encoder does not check that records
    // are real).
    let balance = ration_core::audit::Balance {
        budget: all[2].entry.budget.clone(),
        unit: ration_core::Unit::new("tokens").unwrap(),
        window: ration_core::Window::utc(ration_core::Period::Month),
        window_start_ms: 1,
        cap: 1 << 40,
        consumed: 1 << 30,
        outstanding: 1 << 20,
    };
    all[2].entry.balances = vec![balance; AUDIT_VALUE_BYTES / 16];
    assert!(crate::encode(&all[2]).len() > AUDIT_VALUE_BYTES);
    let dir = TempDir::new().unwrap();
    let (_log, sm) = open(dir.path(), LedgerConfig::default()).unwrap();
    sm.audit.append(all.clone()).unwrap();
    let chunks: Vec<(u64, u64)> = file_tail(&sm).chunks().iter().map(|c| (c.0, c.1)).collect();
    assert_eq!(chunks, vec![(0, 2), (2, 3), (3, 5)]);
    assert_eq!(sm.audit.read(0, usize::MAX).unwrap(), all);
}

/// The tail survives a restart as written; a crash that tore its last write, or
/// damage anywhere, cuts it at the last intact chunk before (the rest is
/// regenerated from the log); sealed chunks are dropped without moving the rest.
#[test]
fn the_tail_file_reopens_intact_and_cuts_a_torn_or_damaged_end() {
    use crate::tail::FileTail;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tail");
    let all = records(300);
    let tail = FileTail::open(&path).unwrap();
    for chunk in all.chunks(40) {
        tail.append(chunk.to_vec()).unwrap();
    }
    let chunks = tail.chunks();
    assert!(chunks.len() >= 8, "{chunks:?}");
    drop(tail);
    let tail = FileTail::open(&path).unwrap();
    assert_eq!(tail.chunks(), chunks, "reopened as written");
    assert_eq!(tail.read(0, usize::MAX).unwrap(), all);
    drop(tail);
    // A torn last write: the last chunk is cut short.
    let size = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(size - 3).unwrap();
    let tail = FileTail::open(&path).unwrap();
    let (last_first, _, _) = *chunks.last().unwrap();
    assert_eq!(tail.end().unwrap(), last_first, "the torn chunk is gone, the rest kept");
    assert_eq!(tail.read(0, usize::MAX).unwrap(), all[..last_first as usize].to_vec());
    // Appending goes on from there.
    tail.append(all[last_first as usize..].to_vec()).unwrap();
    assert_eq!(tail.read(0, usize::MAX).unwrap(), all);
    drop(tail);
    // A flipped byte in the fourth chunk: cut before it, even though later
    // chunks are intact.
    let bytes = std::fs::read(&path).unwrap();
    let mut damaged = bytes.clone();
    let tail = FileTail::open(&path).unwrap();
    let fourth = tail.chunks()[3];
    drop(tail);
    let at = bytes.len() - 1; // somewhere in the last chunk first
    damaged[at] ^= 0x40;
    std::fs::write(&path, &damaged).unwrap();
    let tail = FileTail::open(&path).unwrap();
    assert!(tail.end().unwrap() < 300);
    drop(tail);
    std::fs::write(&path, &bytes).unwrap();
    let offset_of_fourth = {
        // The fourth chunk starts after the first three (headers of 24 bytes).
        let tail = FileTail::open(&path).unwrap();
        let c = tail.chunks();
        drop(tail);
        c[..3].iter().map(|(_, _, len)| 24 + len).sum::<usize>()
    };
    let mut damaged = bytes.clone();
    damaged[offset_of_fourth + 30] ^= 0x01;
    std::fs::write(&path, &damaged).unwrap();
    let tail = FileTail::open(&path).unwrap();
    assert_eq!(tail.end().unwrap(), fourth.0, "cut at the damaged chunk");
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, offset_of_fourth);
    tail.append(all[fourth.0 as usize..].to_vec()).unwrap();
    // Dropping what segments hold: the chunks wholly before 150 go, the rest stay
    // readable (in a new file), and appends go on.
    tail.drop_before(150).unwrap();
    let first = tail.chunks()[0];
    assert!(first.0 <= 150 && first.1 > 150, "{first:?}");
    assert_eq!(tail.read(first.0, usize::MAX).unwrap(), all[first.0 as usize..].to_vec());
    assert!(tail.read(0, 1).unwrap()[0].entry.seq == first.0);
    let more = records(302);
    tail.append(more[300..].to_vec()).unwrap();
    assert_eq!(tail.end().unwrap(), 302);
    drop(tail);
    let tail = FileTail::open(&path).unwrap();
    assert_eq!(tail.read(first.0, usize::MAX).unwrap(), more[first.0 as usize..].to_vec());
    tail.drop_before(400).unwrap();
    assert_eq!((tail.end().unwrap(), tail.chunks().len()), (0, 0));
}

#[test]
fn an_old_data_directory_moves_its_tail_out_of_sled() {
    // A store written when the tail was a sled tree: opening it drops the tree,
    // and the snapshot's tail takes its place (the log regenerates the rest).
    let dir = TempDir::new().unwrap();
    {
        let db = sled::open(dir.path().join("sled")).unwrap();
        db.open_tree("audit").unwrap().insert(b"x", b"y").unwrap();
        db.flush().unwrap();
    }
    let (log, sm) = open(dir.path(), LedgerConfig::default()).unwrap();
    assert!(!log.db.tree_names().iter().any(|n| n.as_ref() == b"audit"));
    assert_eq!(sm.audit.len().unwrap(), 0);
}

/// A real snapshot file: a sled store that applied budget creations, then built.
async fn built_snapshot(dir: &Path, budgets: u64) -> Vec<u8> {
    use ration_core::{Batch, BudgetPath, BudgetSpec, ClientId, Command, Op, Principal, Request};
    let (_log, mut sm) = open(dir, LedgerConfig::default()).unwrap();
    let entries: Vec<Entry<TypeConfig>> = (0..budgets)
        .map(|i| {
            let spec =
                BudgetSpec { path: BudgetPath::new(format!("b{i}")).unwrap(), limits: vec![] };
            let req = Request {
                client: ClientId::new("c").unwrap(),
                request_id: i + 1,
                principal: Principal::new("ops").unwrap(),
                op: Op::CreateBudget(spec),
            };
            let batch = ration_core::Entry::V1(Batch {
                time_ms: 1_000 + i,
                commands: vec![Command::Request(req)],
            });
            Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i + 1),
                payload: EntryPayload::Normal(batch.into()),
            }
        })
        .collect();
    sm.apply(entries).await.unwrap();
    let mut builder = sm.get_snapshot_builder().await;
    builder.build_snapshot().await.unwrap();
    drop((builder, sm));
    backup::current_snapshot(dir).unwrap().unwrap()
}

#[tokio::test]
async fn a_single_bit_flip_anywhere_in_a_snapshot_file_is_refused() {
    let dir = TempDir::new().unwrap();
    let bytes = built_snapshot(dir.path(), 12).await;
    let good = backup::inspect_snapshot(&bytes).expect("the intact file checks");
    assert_eq!(good.budgets, 12);
    assert_eq!(good.audit_records, 12);
    // Every byte position, a different bit each time, plus every bit of the first
    // and last 64 bytes (headers and trailer).
    let mut flips: Vec<(usize, u8)> = (0..bytes.len()).map(|i| (i, (i % 8) as u8)).collect();
    for i in (0..64).chain(bytes.len() - 64..bytes.len()) {
        flips.extend((0..8).map(|b| (i, b)));
    }
    for (at, bit) in &flips {
        let mut damaged = bytes.clone();
        damaged[*at] ^= 1 << bit;
        let e = backup::inspect_snapshot(&damaged).expect_err(&format!(
            "a flip of bit {bit} at byte {at} of {} was accepted",
            bytes.len()
        ));
        assert!(
            e.contains("damaged") && e.contains("bytes"),
            "the refusal does not say where: {e}"
        );
    }
    eprintln!(
        "{} single-bit flips over a {}-byte snapshot file: all refused",
        flips.len(),
        bytes.len()
    );
}

#[tokio::test]
async fn a_damaged_snapshot_file_is_refused_on_open_and_restore_saying_where() {
    let dir = TempDir::new().unwrap();
    let mut bytes = built_snapshot(dir.path(), 5).await;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x04;
    std::fs::write(dir.path().join(SNAPSHOT_FILE), &bytes).unwrap();
    let e = open(dir.path(), LedgerConfig::default()).expect_err("a damaged snapshot opened");
    let msg = e.to_string();
    assert!(msg.contains("snapshot") && msg.contains("does not match its checksum"), "{msg}");
    let target = TempDir::new().unwrap();
    let e = backup::restore(&target.path().join("new"), &bytes).expect_err("restored");
    assert!(e.to_string().contains("section"), "{e}");
}

#[tokio::test]
async fn install_refuses_a_damaged_body() {
    let dir = TempDir::new().unwrap();
    let bytes = built_snapshot(dir.path(), 3).await;
    let file = SnapshotFile::decode(&bytes).unwrap();
    let mut body = file.data.clone();
    let last = body.len() - 1;
    body[last] ^= 0x01;
    let other = TempDir::new().unwrap();
    let (_log, mut sm) = open(other.path(), LedgerConfig::default()).unwrap();
    let e = sm.install_snapshot(&file.meta, Box::new(Cursor::new(body))).await;
    let msg = format!("{:?}", e.expect_err("a damaged body was installed"));
    assert!(msg.contains("snapshot body is damaged"), "{msg}");
    // The node's state is untouched.
    assert_eq!(sm.reader().state().ledger.budget_count(), 0);
}

/// Entries creating budgets `from..to`, one per log index.
fn budget_entries(from: u64, to: u64) -> Vec<Entry<TypeConfig>> {
    use ration_core::{Batch, BudgetPath, BudgetSpec, ClientId, Command, Op, Principal, Request};
    (from..to)
        .map(|i| {
            let spec = BudgetSpec {
                path: BudgetPath::new(format!("r{}/b{i}", i % 3)).unwrap(),
                limits: vec![],
            };
            let req = Request {
                client: ClientId::new(format!("c{}", i % 2)).unwrap(),
                request_id: i + 1,
                principal: Principal::new(format!("ops{}", i % 2)).unwrap(),
                op: Op::CreateBudget(spec),
            };
            let batch = ration_core::Entry::V1(Batch {
                time_ms: 1_000 + i,
                commands: vec![Command::Request(req)],
            });
            Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i + 1),
                payload: EntryPayload::Normal(batch.into()),
            }
        })
        .collect()
}

// (budget_entries starts at index 2: index 1 creates the roots.)
const SMALL: SealPolicy = SealPolicy { min_records: 100, max_records: 250, archive: None };

/// Parents `r0..r2` first, then `n` budgets under them: n + 3 records.
async fn applied_store(dir: &Path, n: u64) -> StateMachine {
    applied_store_with(dir, n, SMALL).await
}

async fn applied_store_with(dir: &Path, n: u64, policy: SealPolicy) -> StateMachine {
    use ration_core::{Batch, BudgetPath, BudgetSpec, ClientId, Command, Op, Principal, Request};
    let (_log, mut sm) = open_with(dir, LedgerConfig::default(), policy).unwrap();
    let roots: Vec<Command> = (0..3)
        .map(|r| {
            Command::Request(Request {
                client: ClientId::new("root").unwrap(),
                request_id: r + 1,
                principal: Principal::new("ops0").unwrap(),
                op: Op::CreateBudget(BudgetSpec {
                    path: BudgetPath::new(format!("r{r}")).unwrap(),
                    limits: vec![],
                }),
            })
        })
        .collect();
    let first = Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(
            ration_core::Entry::V1(Batch { time_ms: 999, commands: roots }).into(),
        ),
    };
    sm.apply(vec![first]).await.unwrap();
    sm.apply(budget_entries(1, n + 1)).await.unwrap();
    sm
}

fn all_records(sm: &StateMachine) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    loop {
        let got = sm.audit.read(out.len() as u64, 77).unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

#[tokio::test]
async fn snapshots_carry_live_state_and_a_manifest_not_the_history() {
    let dir = TempDir::new().unwrap();
    let mut sm = applied_store(dir.path(), 1_000).await;
    let before = all_records(&sm);
    assert_eq!(before.len(), 1_003);
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    // 1,003 records: segments of 250, 250, 250, 253 would leave... the policy seals
    // up to 250 at a time while at least 100 remain: 4 x 250, then 3 stay in the tail.
    let (listed, missing, bytes) = sm.audit.segment_counts();
    assert_eq!((listed, missing), (4, 0));
    assert!(bytes > 0);
    let snap = backup::current_snapshot(dir.path()).unwrap().unwrap();
    let info = backup::inspect_snapshot(&snap).unwrap();
    assert_eq!((info.audit_records, info.audit_segments), (1_003, 4));
    let file = SnapshotFile::decode(&snap).unwrap();
    let body = SnapshotBody::decode(&file.data).unwrap();
    assert_eq!(body.audit.len(), 3, "only the tail rides in the snapshot");
    // Reads cross segments and the tail; the chain verifies end to end.
    assert_eq!(all_records(&sm), before);
    verify_chain(&before, ChainHead::default()).unwrap();
    // A second build with 40 more records adds none (below the minimum).
    sm.apply(budget_entries(1_001, 1_041)).await.unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(sm.audit.segment_counts().0, 4);
    let all = all_records(&sm);
    assert_eq!(all.len(), 1_043);
    drop(sm);
    // Restart: same records, without reading the history.
    let (_log, sm) = open_with(dir.path(), LedgerConfig::default(), SMALL).unwrap();
    assert_eq!(all_records(&sm), all);
}

#[tokio::test]
async fn zone_maps_let_queries_skip_segments() {
    let dir = TempDir::new().unwrap();
    let mut sm = applied_store(dir.path(), 1_000).await;
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let filter =
        |from_ms| ration_core::audit::AuditFilter { from_ms: Some(from_ms), ..Default::default() };
    // Record i (i >= 3) has time 1000 + (i - 2): the first two segments end
    // before 1_700, the third ([500, 750)) reaches 1_747.
    assert_eq!(sm.audit.skip_to(0, &filter(1_700)), 500);
    assert_eq!(sm.audit.skip_to(0, &filter(0)), 0);
    let p = ration_core::audit::AuditFilter {
        principal: Some(ration_core::Principal::new("nobody").unwrap()),
        ..Default::default()
    };
    assert_eq!(sm.audit.skip_to(0, &p), 1_000, "every segment skipped, then the tail");
}

#[tokio::test]
async fn a_follower_installs_the_manifest_and_fetches_segments_it_lacks() {
    let a = TempDir::new().unwrap();
    let mut leader = applied_store(a.path(), 1_000).await;
    leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let snap = leader.get_current_snapshot().await.unwrap().unwrap();
    let b = TempDir::new().unwrap();
    let (flog, mut follower) = open_with(b.path(), LedgerConfig::default(), SMALL).unwrap();
    follower.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let missing = follower.audit.missing();
    assert_eq!(missing.len(), 4);
    // Reads of the history say what is missing; the tail reads.
    let e = follower.audit.read(0, 10).unwrap_err();
    assert!(matches!(e, ReadError::Missing { first: 0, end: 250 }), "{e}");
    assert_eq!(follower.audit.read(1_000, 10).unwrap().len(), 3);
    // Fetch each from the "peer": its bytes, produced on the fly, must match the
    // digest the manifest names; a damaged copy is refused.
    let fetch_dir = follower.audit.fetch_dir().unwrap();
    for (i, want) in missing.iter().enumerate() {
        let mut bytes = Vec::new();
        leader
            .audit
            .serve_segment(want.first_seq, want.count, 1000, |piece| {
                bytes.extend(piece);
                true
            })
            .unwrap();
        let tmp = fetch_dir.join(format!("fetch-{i}.tmp"));
        if i == 0 {
            let mut bad = bytes.clone();
            bad[300] ^= 1;
            std::fs::write(&tmp, &bad).unwrap();
            assert!(follower.audit.install_segment(&tmp, want).is_err());
        }
        std::fs::write(&tmp, &bytes).unwrap();
        assert!(follower.audit.install_segment(&tmp, want).unwrap());
    }
    assert!(follower.audit.missing().is_empty());
    assert_eq!(all_records(&follower), all_records(&leader));
    // A restart keeps them.
    drop((flog, follower));
    let (_log, follower) = open_with(b.path(), LedgerConfig::default(), SMALL).unwrap();
    assert!(follower.audit.missing().is_empty());
    assert_eq!(all_records(&follower), all_records(&leader));
}

#[tokio::test]
async fn a_segment_sealed_without_its_snapshot_is_dropped_and_regenerated() {
    let dir = TempDir::new().unwrap();
    let sm = applied_store(dir.path(), 600).await;
    let all = all_records(&sm);
    // Seal as a build would, but "crash" before the snapshot file is written.
    assert_eq!(sm.audit.seal_until(603).unwrap(), 3);
    drop(sm);
    let (log, sm) = open_with(dir.path(), LedgerConfig::default(), SMALL).unwrap();
    assert_eq!(sm.audit.segment_counts().0, 0);
    assert_eq!(std::fs::read_dir(dir.path().join(AUDIT_DIR)).unwrap().count(), 0);
    // No snapshot was written: the records come back, identical, when the log is
    // re-applied (here: the same entries applied again).
    drop((log, sm));
    let sm = applied_store(dir.path(), 600).await;
    assert_eq!(all_records(&sm), all);
}

#[tokio::test]
async fn old_segments_move_to_the_archive_and_stay_readable() {
    let dir = TempDir::new().unwrap();
    let archive = TempDir::new().unwrap();
    let policy = SealPolicy {
        archive: Some(ArchivePolicy { dir: archive.path().to_path_buf(), after_ms: 300 }),
        ..SMALL
    };
    let mut sm = applied_store_with(dir.path(), 1_000, policy.clone()).await;
    let before = all_records(&sm);
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    // Ledger time is 2_000 (the last record's); segments whose newest record is
    // before 1_700 are archived: [0, 250) and [250, 500) (newest 1_497).
    assert_eq!(sm.audit.placement(), (2, 2));
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(archive.path()).len(), 2);
    assert_eq!(names(&dir.path().join(AUDIT_DIR)).len(), 2);
    assert_eq!(all_records(&sm), before);
    // Archived segments still verify, byte for byte, against the manifest.
    let manifest = sm.audit.sealed().manifest.clone();
    for r in &manifest[..2] {
        segments::verify_file(&archive.path().join(r.file_name()), r).unwrap();
    }
    // A restart finds them in the archive; a peer can still be served from them.
    drop(sm);
    let (_log, sm) = open_with(dir.path(), LedgerConfig::default(), policy).unwrap();
    assert_eq!(sm.audit.placement(), (2, 2));
    assert!(sm.audit.missing().is_empty());
    assert_eq!(all_records(&sm), before);
    let mut served = Vec::new();
    let r = sm
        .audit
        .serve_segment(0, 250, 4096, |b| {
            served.extend(b);
            true
        })
        .unwrap();
    assert_eq!(r, manifest[0]);
    assert_eq!(served, std::fs::read(archive.path().join(r.file_name())).unwrap());
}

#[tokio::test]
async fn a_restored_directory_gets_its_segments_copied_and_checked() {
    let dir = TempDir::new().unwrap();
    let mut sm = applied_store(dir.path(), 1_000).await;
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let all = all_records(&sm);
    drop(sm);
    let bytes = backup::current_snapshot(dir.path()).unwrap().unwrap();
    let target = TempDir::new().unwrap();
    let new = target.path().join("dr");
    let (info, _) = backup::restore_new_cluster(&new, &bytes, 1, "127.0.0.1:1").await.unwrap();
    assert_eq!(info.audit_segments, 4);
    // A damaged source copy is refused, naming the file.
    let source = TempDir::new().unwrap();
    for e in std::fs::read_dir(dir.path().join(AUDIT_DIR)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), source.path().join(e.file_name())).unwrap();
    }
    let victim = std::fs::read_dir(source.path()).unwrap().next().unwrap().unwrap().path();
    let good = std::fs::read(&victim).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0x10;
    std::fs::write(&victim, &bad).unwrap();
    let e = backup::copy_segments(&new, source.path()).unwrap_err();
    assert!(e.to_string().contains("audit segment"), "{e}");
    std::fs::write(&victim, &good).unwrap();
    std::fs::remove_file(source.path().join(segments::segment_file_name(750, 250))).unwrap();
    let done = backup::copy_segments(&new, source.path()).unwrap();
    assert_eq!((done.copied, done.missing.clone()), (3, vec![(750, 250)]));
    let (_log, sm) = open_with(&new, LedgerConfig::default(), SMALL).unwrap();
    assert_eq!(sm.audit.missing().len(), 1);
    assert!(matches!(sm.audit.read(750, 1), Err(ReadError::Missing { first: 750, end: 1_000 })));
    assert_eq!(sm.audit.read(0, 750).unwrap(), all[..750].to_vec());
    assert_eq!(sm.audit.read(1_000, 10).unwrap(), all[1_000..].to_vec());
}

#[tokio::test]
async fn sealing_copies_the_tails_bytes_into_the_segment_a_peer_would_serve() {
    use crate::segments::{segment_file_name, SegmentEncoder};
    let dir = TempDir::new().unwrap();
    let sm = applied_store(dir.path(), 600).await;
    let all = all_records(&sm);
    // Sealed from the tail file's bytes, without decoding the records.
    assert_eq!(sm.audit.seal_until(603).unwrap(), 3);
    let mut prev = ration_core::audit::GENESIS;
    for first in [0u64, 250, 500] {
        let count = if first == 500 { 103 } else { 250 };
        let sealed =
            std::fs::read(dir.path().join(AUDIT_DIR).join(segment_file_name(first, count)))
                .unwrap();
        // The same segment encoded from the decoded records, as a peer serving
        // it from records it holds would: byte for byte the same file.
        let mut enc = SegmentEncoder::new(Vec::new(), first, count, prev).unwrap();
        for r in &all[first as usize..(first + count) as usize] {
            enc.push(r).unwrap();
        }
        let (r, encoded) = enc.finish().unwrap();
        assert_eq!(sealed, encoded, "segment from {first}");
        prev = r.last_hash;
    }
    assert_eq!(prev, all[602].hash);
    assert_eq!(all_records(&sm), all);
    // Framing that lies about its length, or a record out of order, is refused.
    let mut enc = SegmentEncoder::new(Vec::new(), 0, 10, ration_core::audit::GENESIS).unwrap();
    let mut framed = Vec::new();
    framed.extend_from_slice(&[0; 4]);
    let framed = ration_core::audit::encode_record_onto(&all[1], framed);
    let n = (framed.len() - 4) as u32;
    let mut wrong = framed.clone();
    wrong[..4].copy_from_slice(&(n + 1).to_le_bytes());
    assert!(enc.push_framed(&wrong).is_err());
    let mut right = framed;
    right[..4].copy_from_slice(&n.to_le_bytes());
    let e = enc.push_framed(&right).unwrap_err();
    assert!(e.to_string().contains("expected audit record 0, found 1"), "{e}");
}

#[tokio::test]
async fn the_tail_file_before_framed_records_is_removed_on_open() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join(OLD_AUDIT_TAIL_FILE), b"records in the old framing").unwrap();
    let sm = applied_store(dir.path(), 10).await;
    assert!(!dir.path().join(OLD_AUDIT_TAIL_FILE).exists());
    assert!(dir.path().join(AUDIT_TAIL_FILE).exists());
    assert_eq!(all_records(&sm).len(), 13);
}

/// Appends are written by the tail's own thread: whatever reads the tail next
/// (its end, its records, a cut, a seal) sees every record appended before it.
#[test]
fn every_read_of_the_tail_sees_what_was_appended_before_it() {
    use crate::tail::FileTail;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tail");
    let all = records(400);
    let tail = FileTail::open(&path).unwrap();
    for (i, r) in all.iter().enumerate() {
        tail.append(vec![r.clone()]).unwrap();
        assert_eq!(tail.end().unwrap(), i as u64 + 1);
        assert_eq!(tail.read(i as u64, 1).unwrap(), vec![r.clone()]);
        if i % 50 == 49 {
            // A cut right behind appends, and appends right behind a cut.
            tail.truncate_from(i as u64).unwrap();
            assert_eq!(tail.end().unwrap(), i as u64);
            tail.append(vec![r.clone()]).unwrap();
        }
    }
    let more = records(410);
    tail.append(more[400..].to_vec()).unwrap();
    drop(tail);
    // Dropping the tail waits for its writer: reopened, the file is whole, the
    // last append included.
    let tail = FileTail::open(&path).unwrap();
    assert_eq!(tail.end().unwrap(), 410);
    assert_eq!(tail.read(0, usize::MAX).unwrap(), more);
}

/// A write the tail's thread fails is not lost quietly: the append that handed it
/// over has returned, so every later call fails with the write's error (the tail
/// would otherwise miss records), and the file holds what came before it.
#[test]
fn a_failed_write_fails_every_later_call_of_the_tail() {
    use crate::tail::FileTail;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tail");
    let all = records(3);
    let tail = FileTail::open(&path).unwrap();
    tail.append(vec![all[0].clone()]).unwrap();
    assert_eq!(tail.end().unwrap(), 1);
    tail.fail_next_write();
    // Handed over: the apply does not wait for the write.
    tail.append(vec![all[1].clone()]).unwrap();
    let said = |r: std::io::Result<u64>| r.unwrap_err().to_string();
    assert!(said(tail.end()).contains("no space left (injected)"));
    // Sticky: a later append, read, sync or cut fails the same way.
    let e = tail.append(vec![all[2].clone()]).unwrap_err();
    assert!(e.to_string().contains("no space left (injected)"), "{e}");
    assert!(tail.read(0, usize::MAX).is_err());
    assert!(tail.sync().is_err());
    assert!(tail.truncate_from(0).is_err());
    drop(tail);
    // The record written before the failure is whole; the one after is not there.
    let tail = FileTail::open(&path).unwrap();
    assert_eq!(tail.end().unwrap(), 1);
    assert_eq!(tail.read(0, usize::MAX).unwrap(), vec![all[0].clone()]);
}
