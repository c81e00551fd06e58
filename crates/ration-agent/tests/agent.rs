//! ration-agent against a real 3-node cluster on loopback, called as Envoy calls
//! it: Envoy's `RateLimitService` over gRPC (a tonic client on `envoy-types`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ration_agent::agent::Limits;
use ration_agent::config::Config;
use ration_agent::rules::{RuleConfig, Rules};
use ration_client::SdkConfig;
use ration_proto::v1::{self, Period};
use ration_testkit::inproc::Cluster;
use ration_testkit::{eventually, ledger, meta};

const RULES: &str = r#"
[[rule]]
domain = "llm"
entries = [{ key = "api_key" }]
budget = "acme/keys/{api_key}"
unit = "tokens"
correlate = "request_id"
settle = "phase"

[[rule]]
domain = "llm"
entries = [{ key = "team", value = "search" }]
budget = "acme/search"
unit = "requests"

[[rule]]
domain = "llm"
entries = [{ key = "user" }, { key = "model" }, { key = "tokens", value = "input" }]
budget = "acme/users/{user}"
unit = "usd_micros"
correlate = "request_id"
settle = "phase"
price_model = "model"
price_tokens = "input"

[[rule]]
domain = "llm"
entries = [{ key = "user" }, { key = "model" }, { key = "tokens", value = "output" }]
budget = "acme/users/{user}"
unit = "usd_micros"
correlate = "request_id"
settle = "phase"
price_model = "model"
price_tokens = "output"
"#;

fn rules() -> Rules {
    #[derive(serde::Deserialize)]
    struct F {
        rule: Vec<RuleConfig>,
    }
    let f: F = toml::from_str(RULES).unwrap();
    Rules::new(f.rule).unwrap()
}

async fn budget(addr: SocketAddr, id: u64, path: &str, limits: Vec<v1::Limit>) {
    let req =
        v1::CreateBudgetRequest { meta: meta("agent-admin", id, "ops"), path: path.into(), limits };
    ration_testkit::until_answered!([addr], create_budget, req).unwrap();
}

/// An agent on real sockets, leasing from `cluster`; stopped by the sender.
struct Agent {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    async fn start(cluster: &Cluster, principal: &str, limits: Limits) -> Self {
        Self::start_with(cluster, principal, limits, None).await
    }

    /// As `start`, with the SDK forgetting pairs idle for `idle_after`.
    async fn start_with(
        cluster: &Cluster,
        principal: &str,
        limits: Limits,
        idle_after: Option<Duration>,
    ) -> Self {
        let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
        let mut sdk = SdkConfig::new(endpoints, principal);
        if let Some(idle) = idle_after {
            sdk.idle_after = idle;
        }
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let config = Config {
            listen: addr,
            metrics_listen: http.local_addr().unwrap(),
            sdk,
            limits,
            rules: rules(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ration_agent::serve(config, grpc, http, None, async move {
            let _ = rx.await;
        }));
        Self { addr, stop: Some(tx), task }
    }

    async fn client(&self) -> RateLimitServiceClient<tonic::transport::Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        RateLimitServiceClient::new(ch)
    }

    /// Graceful stop: open reservations charged, leases released.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() })
            .collect(),
        hits_addend: hits.map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
        ..RateLimitDescriptor::default()
    }
}

async fn ask(
    c: &mut RateLimitServiceClient<tonic::transport::Channel>,
    descriptors: Vec<RateLimitDescriptor>,
    hits: u32,
) -> Result<RateLimitResponse, tonic::Status> {
    c.should_rate_limit(RateLimitRequest { domain: "llm".into(), descriptors, hits_addend: hits })
        .await
        .map(|r| r.into_inner())
}

/// (consumed, outstanding) of the budget's first limit, read through the leader.
async fn ledger_figures(cluster: &Cluster, path: &str) -> (i64, i64) {
    let l = cluster.first_limit(path).await;
    (l.consumed, l.outstanding)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_keys_budget_admits_to_its_cap_then_answers_over_limit_with_its_window() {
    let cluster = Cluster::start(3, |_| {}).await;
    // The key's limit is per minute, and the last check reads what it counts: one
    // minute must hold the whole test (it takes about 2 s, more on a busy machine; its
    // wait below is 10 s at most).
    ration_testkit::clear_of_a_minute_boundary(Duration::from_secs(15)).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "acme", vec![ration_testkit::limit("tokens", 1_000_000, Period::Day)]).await;
    budget(addr, 2, "acme/keys", vec![ration_testkit::limit("tokens", 1_000_000, Period::Day)])
        .await;
    budget(addr, 3, "acme/keys/k1", vec![ration_testkit::limit("tokens", 1_000, Period::Minute)])
        .await;
    let agent = Agent::start(&cluster, "agent-1", Limits::default()).await;
    let mut c = agent.client().await;
    // The first call for a budget waits for its first lease (no refusal because
    // nothing was asked yet); three of 300 fit in 1,000, the fourth does not.
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = ask(&mut c, vec![descriptor(&[("api_key", "k1")], None)], 300).await.unwrap();
        codes.push(r.overall_code);
    }
    assert_eq!(codes, [Code::Ok as i32, Code::Ok as i32, Code::Ok as i32, Code::OverLimit as i32]);
    // The answer shows the budget's real window once the agent has read it.
    eventually("the over-limit answer carries the limit", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let r = ask(&mut c, vec![descriptor(&[("api_key", "k1")], None)], 300).await.unwrap();
            let s = &r.statuses[0];
            let Some(l) = &s.current_limit else { return false };
            assert_eq!(r.overall_code, Code::OverLimit as i32);
            assert_eq!((l.requests_per_unit, l.unit), (1_000, Unit::Minute as i32));
            assert_eq!(s.limit_remaining, 0);
            let reset = s.duration_until_reset.unwrap();
            assert!((0..=60).contains(&reset.seconds), "{reset:?}");
            true
        }
    })
    .await;
    // Another key has no budget: refused (fail closed), not admitted. A value that
    // would name another budget is refused too; an unmatched descriptor is not
    // limited.
    let r = ask(&mut c, vec![descriptor(&[("api_key", "nobody")], None)], 1).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let r = ask(&mut c, vec![descriptor(&[("api_key", "k1/../k2")], None)], 1).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let r = ask(&mut c, vec![descriptor(&[("route", "x")], None)], 1).await.unwrap();
    assert_eq!(r.overall_code, Code::Ok as i32);
    // A descriptor's own hits_addend of 0 checks without charging.
    let r = ask(&mut c, vec![descriptor(&[("api_key", "k1")], Some(0))], 0).await.unwrap();
    assert_eq!(r.overall_code, Code::Ok as i32, "100 tokens are still held");
    // Bad requests get an error that says what is wrong.
    let e = ask(&mut c, vec![], 1).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("descriptor"), "{}", e.message());
    let e = ask(&mut c, vec![descriptor(&[], None)], 1).await.unwrap_err();
    assert!(e.message().contains("no entries"), "{}", e.message());
    agent.stop().await;
    // Released on shutdown: the ledger counts exactly what was admitted.
    assert_eq!(ledger_figures(&cluster, "acme/keys/k1").await, (900, 0));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reservation_is_settled_at_the_real_count_or_charged_whole_when_none_comes() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "acme", vec![ration_testkit::limit("tokens", 1_000_000, Period::Lifetime)])
        .await;
    budget(
        addr,
        2,
        "acme/keys",
        vec![ration_testkit::limit("tokens", 1_000_000, Period::Lifetime)],
    )
    .await;
    budget(
        addr,
        3,
        "acme/keys/k1",
        vec![ration_testkit::limit("tokens", 100_000, Period::Lifetime)],
    )
    .await;
    let limits =
        Limits { settle_timeout: Duration::from_secs(2), max_pending: 3, ..Limits::default() };
    let agent = Agent::start(&cluster, "agent-1", limits).await;
    let mut c = agent.client().await;
    let call = |id: &str, settle: bool| {
        let mut e = vec![("api_key", "k1"), ("request_id", id)];
        if settle {
            e.push(("phase", "settle"));
        }
        e.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>()
    };
    let d = |e: &Vec<(String, String)>, hits| {
        descriptor(&e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(), hits)
    };
    // r1: reserve 5,000 (max tokens), settle at 1,200 (the response's count).
    let r = ask(&mut c, vec![d(&call("r1", false), Some(5_000))], 0).await.unwrap();
    assert_eq!(r.overall_code, Code::Ok as i32);
    ask(&mut c, vec![d(&call("r1", true), Some(1_200))], 0).await.unwrap();
    // r2: reserve 3,000, never settled in time: charged 3,000; its late settle
    // at 3,500 charges only the 500 beyond it (an overrun if no lease holds it).
    ask(&mut c, vec![d(&call("r2", false), Some(3_000))], 0).await.unwrap();
    // r3: a settle with no reservation here (another agent took the request
    // path): its count is charged whole.
    // r4: settled above its reservation: the excess is charged (from leases, or
    // as an overrun).
    ask(&mut c, vec![d(&call("r4", false), Some(100))], 0).await.unwrap();
    ask(&mut c, vec![d(&call("r4", true), Some(400))], 0).await.unwrap();
    ask(&mut c, vec![d(&call("r3", true), Some(700))], 0).await.unwrap();
    // The pending bound: r2 and two more wait; a fourth is refused with a reason.
    ask(&mut c, vec![d(&call("r5", false), Some(10))], 0).await.unwrap();
    ask(&mut c, vec![d(&call("r6", false), Some(10))], 0).await.unwrap();
    let e = ask(&mut c, vec![d(&call("r7", false), Some(10))], 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("max_pending"), "{}", e.message());
    ask(&mut c, vec![d(&call("r5", true), Some(10))], 0).await.unwrap();
    ask(&mut c, vec![d(&call("r6", true), Some(0))], 0).await.unwrap();
    // After the timeout (upkeep runs each second), r2 is charged whole.
    tokio::time::sleep(Duration::from_secs(4)).await;
    ask(&mut c, vec![d(&call("r2", true), Some(3_500))], 0).await.unwrap();
    agent.stop().await;
    let expected = 1_200 + 3_500 + 700 + 400 + 10;
    assert_eq!(ledger_figures(&cluster, "acme/keys/k1").await, (expected, 0));
    cluster.shutdown().await;
}

/// One RLQS usage report line for bucket {team: <team>}.
fn usage(
    team: &str,
    allowed: u64,
    denied: u64,
) -> envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaUsageReports {
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
        BucketId, RateLimitQuotaUsageReports,
    };
    RateLimitQuotaUsageReports {
        domain: "llm".into(),
        bucket_quota_usages: vec![BucketQuotaUsage {
            bucket_id: Some(BucketId { bucket: [("team".to_owned(), team.to_owned())].into() }),
            time_elapsed: None,
            num_requests_allowed: allowed,
            num_requests_denied: denied,
        }],
    }
}

/// The token bucket's size in an RLQS answer, or None for a blanket rule.
fn assigned(
    r: &envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaResponse,
) -> Option<u32> {
    use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::Strategy;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction;
    let Some(BucketAction::QuotaAssignmentAction(a)) = &r.bucket_action[0].bucket_action else {
        panic!("not an assignment: {r:?}")
    };
    assert_eq!(a.assignment_time_to_live.unwrap().seconds, 7);
    match a.rate_limit_strategy.as_ref().unwrap().strategy.as_ref().unwrap() {
        Strategy::TokenBucket(t) => {
            assert_eq!(t.tokens_per_fill.unwrap().value, t.max_tokens);
            assert_eq!(t.fill_interval.unwrap().seconds, 1);
            Some(t.max_tokens)
        }
        Strategy::BlanketRule(_) => None,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rlqs_assignments_are_backed_by_reserved_allowance_and_every_reported_request_is_charged() {
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    let req = |cap| vec![ration_testkit::limit("requests", cap, Period::Lifetime)];
    budget(addr, 1, "acme", req(1_000_000)).await;
    budget(addr, 2, "acme/search", req(100)).await;
    let agent = Agent::start(&cluster, "agent-1", Limits::default()).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = RateLimitQuotaServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = c
        .stream_rate_limit_quotas(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let report = |team: &str, allowed, denied| {
        let tx = tx.clone();
        let u = usage(team, allowed, denied);
        async move { tx.send(u).await.unwrap() }
    };
    // team=t1 matches no rule (only team=search does): denied.
    report("t1", 0, 1).await;
    let r = answers.message().await.unwrap().unwrap();
    assert_eq!(assigned(&r), None, "{r:?}");
    // A bucket's first report: a small token bucket, its exposure (ten seconds
    // of its rate) reserved from the agent's leases.
    report("search", 0, 1).await;
    let r = answers.message().await.unwrap().unwrap();
    let f = assigned(&r).unwrap();
    assert_eq!(f, 2, "{r:?}");
    // High demand: the assignment grows only as far as the budget covers ten
    // seconds of it.
    report("search", 15, 5_000).await;
    let r = answers.message().await.unwrap().unwrap();
    let f = assigned(&r).unwrap();
    assert!((1..=8).contains(&f), "{f}: ten seconds of it must fit in the 85 left");
    // Envoy reports far more than it was assigned (a misbehaving Envoy): every
    // request reported is charged, beyond the leases as an overrun, and the
    // bucket is denied.
    report("search", 5_000, 0).await;
    let r = answers.message().await.unwrap().unwrap();
    assert_eq!(assigned(&r), None, "{r:?}");
    drop(tx);
    agent.stop().await;
    // Every request Envoy reported is in the ledger (overruns included); nothing
    // is outstanding once the agent has stopped.
    let l = cluster.first_limit("acme/search").await;
    println!(
        "rlqs: consumed {}, overruns {}, outstanding {}",
        l.consumed, l.overruns, l.outstanding
    );
    assert!(l.consumed >= 5_015, "{l:?}");
    assert!(l.overruns >= 4_900, "{l:?}");
    assert_eq!(l.outstanding, 0);
    cluster.shutdown().await;
}

/// The agent over mutual TLS, configured as a user would (a file and flags): it
/// leases as the principal its certificate names, which needs the role gateway
/// on the budgets it charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_mutual_tls_the_agent_leases_as_its_certificates_principal() {
    use clap::Parser as _;
    let dir = tempfile::tempdir().unwrap();
    let set = ration_tls::dev::write_set(
        &dir.path().join("certs"),
        &[1],
        &["127.0.0.1".into()],
        &["admin".into(), "agent-eu".into(), "agent-us".into()],
    )
    .unwrap();
    let (node, addr) =
        ration_testkit::inproc::tls_node(dir.path().join("n1"), set.nodes[0].1.clone()).await;
    let files = |p: &str| set.principals.iter().find(|(n, _)| n == p).unwrap().1.clone();
    let admin = files("admin");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(ration_tls::Connector::new(
            ration_tls::ClientTls::from_files(&admin).unwrap(),
        ));
    let mut ledger = v1::ledger_client::LedgerClient::new(channel);
    let mut id = 0;
    let mut meta = || {
        id += 1;
        meta("tls-admin", id, "admin")
    };
    let budgets = [
        ("acme", 1_000_000),
        ("acme/keys", 1_000_000),
        ("acme/keys/k1", 5_000),
        ("acme/keys/k2", 5_000),
    ];
    for (path, cap) in budgets {
        let limits = vec![ration_testkit::limit("tokens", cap, Period::Day)];
        let req = v1::CreateBudgetRequest { meta: meta(), path: path.into(), limits };
        eventually("the budget is created", Duration::from_secs(20), || {
            let (mut ledger, req) = (ledger.clone(), req.clone());
            async move { ledger.create_budget(req).await.is_ok() }
        })
        .await;
    }
    ledger
        .grant_role(v1::RoleRequest {
            meta: meta(),
            subject: "agent-eu".into(),
            role: "gateway".into(),
            scope: "acme".into(),
        })
        .await
        .unwrap();
    let config_file = dir.path().join("agent.toml");
    std::fs::write(&config_file, RULES).unwrap();
    let start = |who: &str| {
        let f = files(who);
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let args = ration_agent::config::Args::try_parse_from([
            "ration-agent".to_owned(),
            format!("--config={}", path(&config_file)),
            format!("--endpoints={addr}"),
            format!("--cacert={}", path(&f.ca)),
            format!("--cert={}", path(&f.cert)),
            format!("--key={}", path(&f.key)),
        ])
        .unwrap();
        args.into_config().unwrap()
    };
    let serve = |config: Config| async move {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = grpc.local_addr().unwrap();
        tokio::spawn(ration_agent::serve(config, grpc, http, None, std::future::pending()));
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{at}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        RateLimitServiceClient::new(ch)
    };
    // The principal is the certificate's, not the default.
    let eu = start("agent-eu");
    assert_eq!(eu.sdk.cluster.principal, "agent-eu");
    let mut eu = serve(eu).await;
    let r = ask(&mut eu, vec![descriptor(&[("api_key", "k1")], Some(1_000))], 0).await.unwrap();
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    // Another agent without the role is refused by the ledger: OVER_LIMIT, never
    // admitted.
    let mut us = serve(start("agent-us")).await;
    let r = ask(&mut us, vec![descriptor(&[("api_key", "k1")], Some(1_000))], 0).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32, "{r:?}");
    // A bearer token instead of a certificate (trusting the CA only): the agent
    // leases as the token's principal.
    let key = ration_tls::token::TokenKey::load(&ration_testkit::inproc::token_key_file(
        &dir.path().join("n1"),
    ))
    .unwrap();
    let token = dir.path().join("agent.token");
    std::fs::write(&token, key.issue("agent-tok", ration_tls::token::unix_now() + 600)).unwrap();
    ledger
        .grant_role(v1::RoleRequest {
            meta: meta(),
            subject: "agent-tok".into(),
            role: "gateway".into(),
            scope: "acme".into(),
        })
        .await
        .unwrap();
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let config = ration_agent::config::Args::try_parse_from([
        "ration-agent".to_owned(),
        format!("--config={}", path(&config_file)),
        format!("--endpoints={addr}"),
        format!("--cacert={}", path(&files("agent-eu").ca)),
        format!("--token-file={}", path(&token)),
        "--principal=agent-tok".to_owned(),
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let mut tok = serve(config).await;
    let r = ask(&mut tok, vec![descriptor(&[("api_key", "k2")], Some(1_000))], 0).await.unwrap();
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    node.stop().await.unwrap();
}

/// With every node gone, the agent admits from the leases it holds and then
/// follows the budget's policy: a fail-closed budget refuses; one with a static
/// allowance spends its emergency reserve (held while the cluster answered) and
/// then refuses. Never open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_cluster_gone_the_agent_spends_its_leases_then_follows_the_fail_policy() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    let lim = |cap, st: Option<i64>| {
        let mut l = ration_testkit::limit("tokens", cap, Period::Day);
        l.static_allowance = st;
        vec![l]
    };
    budget(addr, 1, "acme", lim(1_000_000, Some(500))).await;
    budget(addr, 2, "acme/keys", lim(1_000_000, Some(500))).await;
    budget(addr, 3, "acme/keys/closed", lim(100_000, None)).await;
    budget(addr, 4, "acme/keys/static", lim(100_000, Some(300))).await;
    let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = grpc.local_addr().unwrap();
    let config = Config {
        listen: at,
        metrics_listen: http.local_addr().unwrap(),
        sdk: SdkConfig::new(endpoints, "agent-1"),
        limits: Limits::default(),
        rules: rules(),
    };
    let agent = ration_agent::start(config).unwrap();
    tokio::spawn(ration_agent::serve_agent(
        agent.clone(),
        grpc,
        http,
        None,
        std::future::pending(),
    ));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{at}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = RateLimitServiceClient::new(ch);
    let call = |key: &'static str| vec![descriptor(&[("api_key", key)], Some(10))];
    // Both admit while the cluster answers; the static budget's reserve is held.
    eventually("leases and the reserve are held", Duration::from_secs(20), || {
        let mut c = c.clone();
        let sdk = agent.sdk().clone();
        async move {
            for key in ["closed", "static"] {
                let r = ask(&mut c, call(key), 0).await.unwrap();
                assert_eq!(r.overall_code, Code::Ok as i32);
            }
            let b = ledger(addr)
                .get_budget(v1::GetBudgetRequest {
                    path: "acme/keys/static".into(),
                    linearizable: false,
                })
                .await
                .unwrap()
                .into_inner();
            // A lease, and the reserve's own lease.
            sdk.held("acme/keys/closed", "tokens").0 > 0 && b.live_leases >= 2
        }
    })
    .await;
    let held = |key: &str| agent.sdk().held(&format!("acme/keys/{key}"), "tokens").1;
    let (closed_held, static_held) = (held("closed"), held("static"));
    for id in cluster.addrs.keys().copied().collect::<Vec<_>>() {
        cluster.stop(id).await;
    }
    // Spend both until refused for good (nothing admitted for 8 s: past the SDK's
    // outage detection); count what each admitted after the stop.
    let mut admitted = [0u64; 2];
    let mut last_ok = [Instant::now(); 2];
    let deadline = Instant::now() + Duration::from_secs(90);
    while last_ok.iter().any(|t| t.elapsed() < Duration::from_secs(8)) {
        assert!(Instant::now() < deadline, "still admitting: {admitted:?}");
        for (i, key) in ["closed", "static"].into_iter().enumerate() {
            let r = ask(&mut c, call(key), 0).await.unwrap();
            if r.overall_code == Code::Ok as i32 {
                admitted[i] += 10;
                last_ok[i] = Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "cluster gone: fail-closed admitted {} (held {closed_held}); static admitted {} \
         (held {static_held}, reserve 300)",
        admitted[0], admitted[1]
    );
    // Never more than the leases held, plus the reserve where there is one.
    assert!(admitted[0] <= closed_held, "{admitted:?} {closed_held}");
    assert!(admitted[1] <= static_held + 300, "{admitted:?} {static_held}");
    // The reserve was spent: the static budget admitted past its leases.
    assert!(admitted[1] > static_held, "{admitted:?} {static_held}");
}

/// A priced rule turns (model, prompt tokens, max tokens) into a dollar
/// reservation from the price book, and settles the real counts at the version
/// the call was reserved at, even when a new version took effect in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priced_rules_reserve_dollars_at_the_version_in_force_and_settle_at_it() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    let usd = |cap| vec![ration_testkit::limit("usd_micros", cap, Period::Lifetime)];
    budget(addr, 1, "acme", usd(1_000_000_000)).await;
    budget(addr, 2, "acme/users", usd(1_000_000_000)).await;
    budget(addr, 3, "acme/users/u1", usd(1_000_000)).await;
    let set_price = |id: u64, input: i64, output: i64| v1::SetPriceRequest {
        meta: meta("agent-admin", id, "ops"),
        model: "gpt-x".into(),
        price: Some(v1::Price { input, cached_input: input, output }),
        effective_from_ms: 0,
    };
    // $1 and $2 per million input and output tokens: 1 and 2 usd_micros a token.
    ration_testkit::until_answered!([addr], set_price, set_price(4, 1_000_000, 2_000_000)).unwrap();
    let call = |id: &str, settle: bool, kind: &str, n: u64| {
        let mut e = vec![("user", "u1"), ("model", "gpt-x"), ("tokens", kind), ("request_id", id)];
        if settle {
            e.push(("phase", "settle"));
        }
        descriptor(&e, Some(n))
    };
    let agent = Agent::start(&cluster, "agent-1", Limits::default()).await;
    let mut c = agent.client().await;
    // r1: 1,000 prompt tokens and at most 500 output: 2,000 usd_micros reserved at
    // version 1 (the agent may need a moment to read the book: refused until then).
    eventually("r1 is admitted once the agent has the price", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            let r = ask(
                &mut c,
                vec![call("r1", false, "input", 1_000), call("r1", false, "output", 500)],
                0,
            )
            .await
            .unwrap();
            r.overall_code == Code::Ok as i32
        }
    })
    .await;
    // The price doubles; r1 settles after it, at version 1: 1,000 + 300 x 2.
    ration_testkit::until_answered!([addr], set_price, set_price(5, 2_000_000, 4_000_000)).unwrap();
    ask(&mut c, vec![call("r1", true, "input", 1_000), call("r1", true, "output", 300)], 0)
        .await
        .unwrap();
    // An unknown model is refused, not charged.
    let unknown = descriptor(
        &[("user", "u1"), ("model", "nope"), ("tokens", "output"), ("request_id", "r9")],
        Some(10),
    );
    let r = ask(&mut c, vec![unknown], 0).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    agent.stop().await;
    // A new agent reads version 2: r2 is charged 2 x 1,000 + 4 x 300.
    let agent = Agent::start(&cluster, "agent-2", Limits::default()).await;
    let mut c = agent.client().await;
    eventually("r2 is admitted", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            let r = ask(
                &mut c,
                vec![call("r2", false, "input", 1_000), call("r2", false, "output", 500)],
                0,
            )
            .await
            .unwrap();
            r.overall_code == Code::Ok as i32
        }
    })
    .await;
    ask(&mut c, vec![call("r2", true, "input", 1_000), call("r2", true, "output", 300)], 0)
        .await
        .unwrap();
    agent.stop().await;
    assert_eq!(ledger_figures(&cluster, "acme/users/u1").await, (1_600 + 3_200, 0));
    // The releases carry the subtotals per (model, version).
    let mut lines = std::collections::BTreeMap::new();
    for r in ration_testkit::audit_records(addr).await {
        for u in r.cause.map(|c| c.usage).unwrap_or_default() {
            let e = lines.entry(u.price_version).or_insert((0, 0));
            *e = (e.0 + u.calls, e.1 + u.cost_usd_micros);
        }
    }
    assert_eq!(lines, std::collections::BTreeMap::from([(1, (1, 1_600)), (2, (1, 3_200))]));
    cluster.shutdown().await;
}

/// `max_budgets` bounds the pairs in use, not every pair ever met: a budget no
/// call used for the SDK's `idle_after` (and no reservation holds) is forgotten,
/// its leases go back to the ledger with what was spent, and a new budget takes
/// its place. (A gateway meeting a new API key, user or run now and then would
/// otherwise refuse every new one once it had met `max_budgets`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_budgets_are_forgotten_and_make_room_under_max_budgets() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    let big = || vec![ration_testkit::limit("tokens", 1_000_000, Period::Lifetime)];
    budget(addr, 1, "acme", big()).await;
    budget(addr, 2, "acme/keys", big()).await;
    for (i, k) in ["k1", "k2", "k3"].iter().enumerate() {
        let limits = vec![ration_testkit::limit("tokens", 10_000, Period::Lifetime)];
        budget(addr, 3 + i as u64, &format!("acme/keys/{k}"), limits).await;
    }
    let limits = Limits { max_budgets: 2, ..Limits::default() };
    let agent =
        Agent::start_with(&cluster, "agent-idle", limits, Some(Duration::from_secs(1))).await;
    let mut c = agent.client().await;
    let call = |key: &'static str| vec![descriptor(&[("api_key", key)], None)];
    for k in ["k1", "k2"] {
        let r = ask(&mut c, call(k), 300).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32, "{k}");
    }
    // Two pairs in use: a third budget is refused, with nothing charged.
    let r = ask(&mut c, call("k3"), 300).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32, "the third budget waits for room");
    // Once k1 and k2 have gone unused for a second, k3 is admitted.
    eventually("an idle budget makes room", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { ask(&mut c, call("k3"), 300).await.unwrap().overall_code == Code::Ok as i32 }
    })
    .await;
    // The forgotten pairs' leases are back, with exactly what was admitted.
    for k in ["k1", "k2"] {
        let path = format!("acme/keys/{k}");
        eventually(&format!("{path} released"), Duration::from_secs(10), || {
            let (cluster, path) = (&cluster, path.clone());
            async move { ledger_figures(cluster, &path).await == (300, 0) }
        })
        .await;
    }
    agent.stop().await;
    assert_eq!(ledger_figures(&cluster, "acme/keys/k3").await, (300, 0));
    cluster.shutdown().await;
}

/// The bound on budgets refuses new calls, not spend: a settle on a budget the
/// agent does not lease for (the call reserved through another agent, or its
/// pair was forgotten since) is charged even when `max_budgets` pairs are in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settle_is_charged_even_at_max_budgets() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    let big = || vec![ration_testkit::limit("tokens", 1_000_000, Period::Lifetime)];
    budget(addr, 1, "acme", big()).await;
    budget(addr, 2, "acme/keys", big()).await;
    budget(addr, 3, "acme/keys/k1", big()).await;
    budget(addr, 4, "acme/keys/k2", big()).await;
    let limits = Limits { max_budgets: 1, ..Limits::default() };
    let agent = Agent::start(&cluster, "agent-bound", limits).await;
    let mut c = agent.client().await;
    let r = ask(&mut c, vec![descriptor(&[("api_key", "k1")], None)], 300).await.unwrap();
    assert_eq!(r.overall_code, Code::Ok as i32);
    let r = ask(&mut c, vec![descriptor(&[("api_key", "k2")], None)], 300).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32, "a new call beyond the bound is refused");
    let settle = [("api_key", "k2"), ("request_id", "elsewhere"), ("phase", "settle")];
    ask(&mut c, vec![descriptor(&settle, Some(700))], 0).await.unwrap();
    agent.stop().await;
    assert_eq!(ledger_figures(&cluster, "acme/keys/k2").await, (700, 0));
    assert_eq!(ledger_figures(&cluster, "acme/keys/k1").await, (300, 0));
    cluster.shutdown().await;
}
