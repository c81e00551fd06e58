use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::*;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
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
