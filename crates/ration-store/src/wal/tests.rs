use std::time::Duration;

use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload};
use ration_core::LedgerConfig;

use super::*;
use crate::mem::MemDisk;
use crate::StateMachine;

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
}

/// Appends as `RaftLogStorage::append` does, up to the acknowledgement.
async fn append(log: &mut WalLogStore, entries: Vec<Entry<TypeConfig>>) -> io::Result<()> {
    log.append_entries(entries).await
}

async fn indexes(log: &mut WalLogStore) -> Vec<u64> {
    log.try_get_log_entries(..).await.unwrap().iter().map(|e| e.log_id.index).collect()
}

struct WalBuilder;

impl StoreBuilder<TypeConfig, WalLogStore, StateMachine, tempfile::TempDir> for WalBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, WalLogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let fs = StdFs::new(dir.path()).expect("dir");
        let log = WalLogStore::open(Arc::new(fs)).await.expect("log opens");
        let (_, sm, _) = MemDisk::default()
            .open(Duration::ZERO, LedgerConfig::default())
            .expect("state machine opens");
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_the_openraft_storage_suite() {
    Suite::test_all(WalBuilder).expect("openraft's storage suite passes");
}

#[tokio::test]
async fn what_was_synced_survives_a_power_cut_and_nothing_else() {
    let fs = MemFs::new();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    append(&mut log, (1..=5).map(|i| blank(2, i)).collect()).await.unwrap();
    // Not synced on their own: the committed id and a purge point.
    log.save_committed(Some(log_id(2, 5))).await.unwrap();
    log.purge(log_id(2, 2)).await.unwrap();
    let lost = fs.power_cut(None);
    assert!(lost > 0, "the committed and purge records were unsynced");
    fs.restore();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5]);
    assert_eq!(log.read_committed().await.unwrap(), None);
    // A vote is durable once save_vote returns, even with nothing after it.
    log.save_vote(&Vote::new(3, 2)).await.unwrap();
    fs.power_cut(None);
    fs.restore();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
}

#[tokio::test]
async fn a_torn_write_is_cut_and_an_unacknowledged_append_is_lost() {
    // Every length of tear of the unsynced tail (two entries: 2 x 15 bytes or so).
    for keep in 0..40 {
        let fs = MemFs::new();
        let mut log = WalLogStore::open(fs.clone()).await.unwrap();
        append(&mut log, (1..=3).map(|i| blank(1, i)).collect()).await.unwrap();
        // The next append is written, but its sync has not finished when power goes.
        fs.hold_syncs(true);
        let mut writer = log.clone();
        let pending =
            tokio::spawn(async move { append(&mut writer, vec![blank(1, 4), blank(1, 5)]).await });
        while !fs.list().unwrap().is_empty() && log.len() < 5 {
            tokio::task::yield_now().await;
        }
        fs.power_cut(Some(keep));
        assert!(pending.await.unwrap().is_err(), "an append whose sync failed was acknowledged");
        fs.hold_syncs(false);
        fs.restore();
        let mut log = WalLogStore::open(fs.clone()).await.unwrap();
        let got = indexes(&mut log).await;
        // Torn mid-record: cut there. A whole record that made it is fine to keep
        // (never acknowledged, so the leader may replace it).
        assert!(got.starts_with(&[1, 2, 3]) && got.len() <= 5, "keep {keep}: {got:?}");
        // The log goes on from there (openraft removes the unacknowledged rest first).
        log.truncate(log_id(1, 4)).await.unwrap();
        append(&mut log, vec![blank(2, 4)]).await.unwrap();
        drop(log);
        let mut log = WalLogStore::open(fs.clone()).await.unwrap();
        let entries = log.try_get_log_entries(..).await.unwrap();
        assert_eq!(entries.last().unwrap().log_id, log_id(2, 4), "keep {keep}");
        assert_eq!(entries.len(), 4, "keep {keep}");
    }
}

/// A process that crashed (no power cut) left its last writes in the page cache
/// only; the next process acknowledges entries after them. They are synced when the
/// log opens, so a power cut later cannot punch a hole under acknowledged entries
/// (the simulation found this: a follower re-applied a log with a hole in it).
#[tokio::test]
async fn what_a_crashed_process_wrote_is_synced_before_the_log_goes_on() {
    let fs = MemFs::new();
    let log = WalLogStore::open(fs.clone()).await.unwrap();
    append(&mut log.clone(), vec![blank(1, 1)]).await.unwrap();
    // Written, its sync never done: the process died.
    fs.hold_syncs(true);
    let mut writer = log.clone();
    let stuck = tokio::spawn(async move { append(&mut writer, vec![blank(1, 2)]).await });
    while log.len() < 2 {
        tokio::task::yield_now().await;
    }
    stuck.abort();
    drop(log);
    fs.hold_syncs(false);
    // The next process sees entry 2 and builds on it; then the power goes.
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    append(&mut log, vec![blank(1, 3)]).await.unwrap();
    fs.power_cut(None);
    fs.restore();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
}

#[tokio::test]
async fn damage_before_the_tail_is_refused_with_the_file_and_offset() {
    let fs = MemFs::new();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    append(&mut log, (1..=3).map(|i| blank(1, i)).collect()).await.unwrap();
    drop(log);
    // The next open starts a new segment, so the first is no longer the last.
    let log = WalLogStore::open(fs.clone()).await.unwrap();
    drop(log);
    let first = segment_name(1);
    let mut bytes = fs.read(&first).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x10;
    fs.remove(&first).unwrap();
    fs.create(&first).unwrap();
    fs.append(&first, &bytes).unwrap();
    let err = WalLogStore::open(fs.clone()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&first) && msg.contains("checksum"), "{msg}");
}

#[tokio::test]
async fn truncation_and_purges_survive_reopening_and_free_segments() {
    let fs = MemFs::new();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    append(&mut log, (1..=6).map(|i| blank(1, i)).collect()).await.unwrap();
    log.truncate(log_id(1, 5)).await.unwrap();
    append(&mut log, vec![blank(2, 5)]).await.unwrap();
    // An entry appended again where the log already holds it replaces only itself.
    append(&mut log, vec![blank(1, 3)]).await.unwrap();
    drop(log);
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    let entries = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(entries.iter().map(|e| e.log_id).collect::<Vec<_>>().last(), Some(&log_id(2, 5)));
    assert_eq!(entries.len(), 5);
    // Purge everything in the first two segments; they are deleted after the
    // next sync, and the purge point is kept in the new segment's state record.
    append(&mut log, vec![blank(2, 6)]).await.unwrap();
    log.purge(log_id(2, 5)).await.unwrap();
    assert!(fs.list().unwrap().contains(&segment_name(1)), "deleted before the purge is durable");
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    assert!(!fs.list().unwrap().contains(&segment_name(1)));
    drop(log);
    fs.power_cut(None);
    fs.restore();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    assert_eq!(indexes(&mut log).await, vec![6]);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 5)));
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
}

/// Writing an entry reads back only its log id, from the start of its encoding:
/// the same id a whole decode finds, for every kind of payload.
#[test]
fn an_entrys_log_id_is_read_from_its_start() {
    use ration_core::{Batch, Command};
    let normal = Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(7, 3), 1_000_000_007),
        payload: EntryPayload::Normal(
            ration_core::Entry::V1(Batch {
                time_ms: 1_764_340_245_123,
                commands: vec![Command::Tick],
            })
            .into(),
        ),
    };
    let membership = Entry::<TypeConfig> {
        log_id: log_id(u64::MAX, 2),
        payload: EntryPayload::Membership(openraft::Membership::new(
            vec![std::collections::BTreeSet::from([1, 2, 3])],
            None,
        )),
    };
    for entry in [blank(1, 0), blank(300, 1 << 40), normal, membership] {
        let bytes = crate::encode(&entry);
        assert_eq!(entry_log_id(&bytes).unwrap(), entry.log_id);
        let whole: Entry<TypeConfig> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(entry_log_id(&bytes).unwrap(), whole.log_id);
    }
}

fn normal(term: u64, index: u64) -> Entry<TypeConfig> {
    let batch = ration_core::Batch { time_ms: index, commands: vec![ration_core::Command::Tick] };
    let entry = ration_core::Entry::V1(batch);
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(entry.into()) }
}

fn shared(e: &Entry<TypeConfig>) -> &crate::SharedEntry {
    match &e.payload {
        EntryPayload::Normal(d) => d,
        other => panic!("{other:?}"),
    }
}

/// The last entries appended are read back as they were appended (the same shared
/// entry, not decoded from the file again), at most `RECENT_ENTRIES` of them, and
/// reads follow truncation, replacement and purges as the file does.
#[tokio::test]
async fn recent_entries_are_read_back_from_memory_and_follow_the_index() {
    let fs = MemFs::new();
    let mut log = WalLogStore::open(fs.clone()).await.unwrap();
    let first: Vec<_> = (1..=6).map(|i| normal(1, i)).collect();
    append(&mut log, first.clone()).await.unwrap();
    let read = log.try_get_log_entries(1..=6).await.unwrap();
    for (a, b) in read.iter().zip(&first) {
        assert!(Arc::ptr_eq(&shared(a).0, &shared(b).0), "entry {} from memory", a.log_id);
    }
    // Truncated and replaced: the replacement is read, never the old entry.
    log.truncate(log_id(1, 5)).await.unwrap();
    append(&mut log, vec![normal(2, 5)]).await.unwrap();
    append(&mut log, vec![normal(3, 3)]).await.unwrap();
    let ids: Vec<_> = log.try_get_log_entries(..).await.unwrap().iter().map(|e| e.log_id).collect();
    assert_eq!(ids, vec![log_id(1, 1), log_id(1, 2), log_id(3, 3), log_id(1, 4), log_id(2, 5)]);
    log.purge(log_id(1, 2)).await.unwrap();
    assert_eq!(indexes(&mut log).await, vec![3, 4, 5]);
    // Past the bound, the oldest are read from the file again: equal, not shared.
    let more: Vec<_> = (6..=(5 + RECENT_ENTRIES as u64)).map(|i| normal(3, i)).collect();
    append(&mut log, more).await.unwrap();
    let all = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(all.len(), 3 + RECENT_ENTRIES);
    assert_eq!(all[1].log_id, log_id(1, 4));
    assert_eq!(shared(&all[1]), shared(&first[3]));
    assert!(!Arc::ptr_eq(&shared(&all[1]).0, &shared(&first[3]).0), "read from the file");
    assert_eq!(log.lock().recent.len(), RECENT_ENTRIES);
}
