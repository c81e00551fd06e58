//! `rationctl limits show|set` against a real 3-node cluster (in-process nodes, real
//! sockets), and the per-principal limits they set refusing real gRPC requests with
//! RESOURCE_EXHAUSTED + ErrorInfo PRINCIPAL_LIMIT, in single calls and in a Batch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use ration_proto::v1;
use ration_testkit::inproc::Cluster;
use ration_testkit::{ledger, limit, meta};
use serde_json::Value;

async fn ctl(endpoints: &[SocketAddr], args: &[&str]) -> Result<String, String> {
    let eps: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let eps = eps.join(",");
    let mut argv = vec!["rationctl", "--endpoints", &eps, "--timeout-ms", "5000", "-o", "json"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    match rationctl::run(argv, &mut out).await {
        Ok(()) => Ok(String::from_utf8(out).unwrap()),
        Err(e) => Err(format!("{e:#}")),
    }
}

async fn json(endpoints: &[SocketAddr], args: &[&str]) -> Value {
    let out = ctl(endpoints, args).await.unwrap_or_else(|e| panic!("rationctl {args:?}: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rationctl {args:?} printed {out}: {e}"))
}

fn acquire(client: &str, request_id: u64, principal: &str) -> v1::AcquireRequest {
    v1::AcquireRequest {
        meta: meta(client, request_id, principal),
        budget: "acme".into(),
        unit: "tokens".into(),
        wanted: 1,
        min: 1,
        ttl_ms: 60_000,
        starts_at_ms: 0,
    }
}

/// GET /metrics over plain HTTP/1.0.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_are_shown_set_audited_and_refuse_with_a_clear_status() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let eps: Vec<SocketAddr> = c.nodes.keys().map(|id| c.addrs[id]).collect();
    let mut l = ledger(c.addrs[&leader]);
    l.create_budget(v1::CreateBudgetRequest {
        meta: meta("admin", 1, "ops"),
        path: "acme".into(),
        limits: vec![limit("tokens", 1_000_000, v1::Period::Lifetime)],
    })
    .await
    .unwrap();

    // The defaults.
    let shown = json(&eps, &["limits", "show"]).await;
    assert_eq!(shown["limits"]["clients"], 100_000, "{shown}");
    assert_eq!(shown["limits"]["outcomes"], 4_194_304, "{shown}");
    assert_eq!(shown["limits"]["live_leases"], 1_000_000, "{shown}");
    assert_eq!(shown["limits"]["budgets"], 1_000_000, "{shown}");

    // Set changes only what it names.
    let set = json(&eps, &["limits", "set", "--clients", "2", "--live-leases", "3"]).await;
    assert_eq!((set["clients"].as_u64(), set["live_leases"].as_u64()), (Some(2), Some(3)));
    assert_eq!(set["outcomes"], 4_194_304, "{set}");

    // Two clients of "gw" are fine; a third client id is refused, with the reason.
    l.acquire(acquire("gw-1", 1, "gw")).await.unwrap();
    l.acquire(acquire("gw-2", 1, "gw")).await.unwrap();
    let refused = l.acquire(acquire("gw-3", 1, "gw")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(ration_proto::rpc::is_principal_limit(&refused), "{refused:?}");
    assert!(
        refused.message().contains("principal gw holds its maximum of 2 clients"),
        "{}",
        refused.message()
    );
    // Another principal is not held back.
    l.acquire(acquire("other-1", 1, "other")).await.unwrap();
    // The live-lease limit: "gw" holds 2; its third lease is fine, the fourth is not,
    // in a Batch too (code 8, per operation).
    l.acquire(acquire("gw-1", 2, "gw")).await.unwrap();
    let batch = l
        .batch(v1::BatchRequest {
            ops: vec![v1::BatchOp {
                op: Some(v1::batch_op::Op::Acquire(acquire("gw-2", 2, "gw"))),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    match &batch.results[0].result {
        Some(v1::batch_result::Result::Error(e)) => {
            assert_eq!(e.code, tonic::Code::ResourceExhausted as i32, "{e:?}");
            assert!(e.message.contains("maximum of 3 live leases"), "{e:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // The leader counts the refusals by limit.
    let maddr = *c.nodes[&leader].node.metrics_addr.get().expect("metrics are served");
    let text = scrape(maddr).await;
    for (limit, at_least) in [("clients", 1), ("live_leases", 1)] {
        let line = format!("ration_principal_limit_refusals_total{{limit=\"{limit}\"}} ");
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in {text}"))
            .parse()
            .unwrap();
        assert!(n >= at_least, "{line}{n}");
    }

    // Show says who holds what.
    let gw = json(&eps, &["limits", "show", "--principal", "gw"]).await;
    let u = &gw["principals"][0];
    assert_eq!((u["clients"].as_u64(), u["live_leases"].as_u64()), (Some(2), Some(3)), "{gw}");
    let top = json(&eps, &["limits", "show", "--top", "5"]).await;
    assert_eq!(top["principals"][0]["principal"], "gw", "{top}");

    // Bad values are refused with the field named; nothing changes.
    let err = ctl(&eps, &["limits", "set", "--clients", "0"]).await.unwrap_err();
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("limits.clients"), "{err}");
    assert!(ctl(&eps, &["limits", "set"]).await.unwrap_err().contains("name at least one"));

    // Every change is in the audit log, by the operator, on `_ration`.
    let q = json(&eps, &["audit", "query", "--kind", "limits_changed"]).await;
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["budget"], "_ration");
    assert_eq!(q[0]["principal"], "rationctl");

    // The limits are replicated: every node answers them from its own state.
    for addr in c.addrs.values() {
        let r = ledger(*addr)
            .get_limits(v1::GetLimitsRequest {
                principal: String::new(),
                top: 0,
                linearizable: false,
            })
            .await;
        // (a follower may not have applied the change yet; it does within a moment)
        let mut got = r.unwrap().into_inner().limits.unwrap().clients;
        for _ in 0..50 {
            if got == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            got = ledger(*addr)
                .get_limits(v1::GetLimitsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .limits
                .unwrap()
                .clients;
        }
        assert_eq!(got, 2, "node {addr}");
    }
}
