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
        sm.audit.append(chunk).unwrap();
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
                payload: EntryPayload::Normal(batch),
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
