//! A full proposal queue refuses at once with the structured overload status
//! (UNAVAILABLE, reason OVERLOADED, a retry delay), and a refused request changes
//! nothing. The queue counts commands: one Batch of 1,024 operations fills a queue
//! of 1,024.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use ration_proto::rpc;
use ration_proto::v1::{self, ledger_client::LedgerClient};
use ration_server::Config;

const OPS: usize = 1024;
const CALLERS: usize = 24;

fn meta(client: &str, request_id: u64) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        client_id: client.into(),
        request_id,
        principal: "gw".into(),
        ..Default::default()
    })
}

fn acquire(client: &str, request_id: u64) -> v1::BatchOp {
    v1::BatchOp {
        op: Some(v1::batch_op::Op::Acquire(v1::AcquireRequest {
            meta: meta(client, request_id),
            budget: "acme".into(),
            unit: "tokens".into(),
            wanted: 1,
            min: 1,
            ttl_ms: 600_000,
            starts_at_ms: 0,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_the_overload_status_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        listen: addr,
        data_dir: dir.path().to_path_buf(),
        metrics_listen: "off".into(),
        // The smallest queue allowed: exactly one full Batch.
        proposal_queue: OPS,
        ..Config::default()
    };
    let handle = ration_server::start(config, listener).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(30))
        .connect_lazy();
    let mut client = LedgerClient::new(channel.clone());
    let day = v1::Window { period: v1::Period::Day as i32, offset_minutes: 0 };
    let create = v1::CreateBudgetRequest {
        meta: meta("admin", 1),
        path: "acme".into(),
        limits: vec![v1::Limit {
            unit: "tokens".into(),
            cap: 1_000_000_000,
            window: Some(day),
            static_allowance: None,
        }],
    };
    // The node leads within a few seconds of starting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Err(e) = client.create_budget(create.clone()).await {
        assert!(tokio::time::Instant::now() < deadline, "no leader: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut granted = 0u64;
    let mut overloaded = 0;
    for round in 0..5u64 {
        let calls: Vec<_> = (0..CALLERS)
            .map(|c| {
                let mut client = LedgerClient::new(channel.clone());
                let id = format!("gw-{round}-{c}");
                let ops = (1..=OPS as u64).map(|r| acquire(&id, r)).collect();
                tokio::spawn(async move { client.batch(v1::BatchRequest { ops }).await })
            })
            .collect();
        for call in calls {
            match call.await.unwrap() {
                Ok(reply) => {
                    let results = reply.into_inner().results;
                    assert_eq!(results.len(), OPS);
                    for r in results {
                        let Some(v1::batch_result::Result::Lease(l)) = r.result else {
                            panic!("an acquire was refused: {r:?}");
                        };
                        granted += u64::try_from(l.granted).unwrap();
                    }
                }
                Err(s) => {
                    assert!(rpc::is_overloaded(&s), "not an overload: {s:?}");
                    assert!(rpc::retryable(&s), "an overload is retryable");
                    assert_eq!(rpc::retry_after(&s), Some(Duration::from_millis(50)));
                    assert!(s.message().contains("proposal queue is full"), "{}", s.message());
                    overloaded += 1;
                }
            }
        }
        if overloaded > 0 {
            break;
        }
    }
    assert!(overloaded > 0, "{CALLERS} concurrent Batches of {OPS} never filled a queue of {OPS}");
    // A refused Batch changed nothing: the ledger holds exactly what was granted.
    let budget = client
        .get_budget(v1::GetBudgetRequest { path: "acme".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u64::try_from(budget.limits[0].outstanding).unwrap(), granted);
    handle.stop().await.unwrap();
}
