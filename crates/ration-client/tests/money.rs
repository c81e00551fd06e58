//! Money and visibility against a real 3-node cluster on loopback: prices that
//! change mid-run, spend tied to its trace, webhooks through a leader kill,
//! shadow mode, forecasts.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ration_client::{CallSpec, CoarseClock, Sdk, SdkConfig, TokenUsage};
use ration_proto::v1::{self, Period};
use ration_testkit::inproc::Cluster;
use ration_testkit::{eventually, ledger, meta};

fn sdk(cluster: &Cluster, principal: &str, clock: &Arc<CoarseClock>) -> Arc<Sdk> {
    let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
    Sdk::start(SdkConfig::new(endpoints, principal), clock.clone()).unwrap()
}

fn addrs(cluster: &Cluster) -> Vec<std::net::SocketAddr> {
    cluster.nodes.keys().map(|id| cluster.addrs[id]).collect()
}

async fn create(cluster: &Cluster, id: u64, path: &str, limits: Vec<v1::Limit>) {
    let req =
        v1::CreateBudgetRequest { meta: meta("money-admin", id, "ops"), path: path.into(), limits };
    ration_testkit::until_answered!(addrs(cluster), create_budget, req).unwrap();
}

async fn options(cluster: &Cluster, id: u64, path: &str, thresholds: Vec<u32>, shadow: bool) {
    let req = v1::SetBudgetOptionsRequest {
        meta: meta("money-admin", id, "ops"),
        path: path.into(),
        options: Some(v1::BudgetOptions { thresholds_pct: thresholds, shadow }),
    };
    ration_testkit::until_answered!(addrs(cluster), set_budget_options, req).unwrap();
}

async fn set_price(cluster: &Cluster, id: u64, model: &str, input: i64, output: i64) -> u32 {
    let req = v1::SetPriceRequest {
        meta: meta("money-admin", id, "ops"),
        model: model.into(),
        price: Some(v1::Price { input, cached_input: input / 10, output }),
        effective_from_ms: 0,
    };
    ration_testkit::until_answered!(addrs(cluster), set_price, req).unwrap().version
}

async fn get_budget(cluster: &Cluster, path: &str) -> v1::Budget {
    let req = v1::GetBudgetRequest { path: path.into(), linearizable: true };
    ration_testkit::until_answered!(addrs(cluster), get_budget, req).unwrap()
}

async fn query(cluster: &Cluster, req: v1::QueryAuditRequest) -> Vec<v1::AuditRecord> {
    let mut all = Vec::new();
    let mut req = v1::QueryAuditRequest { limit: 1000, linearizable: true, ..req };
    loop {
        let page = ration_testkit::until_answered!(addrs(cluster), query_audit, req).unwrap();
        if page.records.is_empty() && page.next_seq == req.from_seq {
            return all;
        }
        all.extend(page.records);
        if page.next_seq == req.from_seq {
            return all;
        }
        req.from_seq = page.next_seq;
        let head = ration_testkit::audit_records(addrs(cluster)[0]).await.len() as u64;
        if req.from_seq >= head {
            return all;
        }
    }
}

/// Lets the spenders run until admissions stop for 4 s (the caps are reached) or
/// `within` passes, then stops them and releases every gateway's leases.
async fn spend_until_refused(
    admitted: &AtomicU64,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    gateways: &[Arc<Sdk>],
    within: Duration,
) {
    let (mut last, mut since) = (0, Instant::now());
    let started = Instant::now();
    while since.elapsed() < Duration::from_secs(4) && started.elapsed() < within {
        let a = admitted.load(Ordering::Relaxed);
        if a != last {
            (last, since) = (a, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for g in gateways {
        g.release_all().await.unwrap();
    }
}

/// What the gateways charged, by price version: (calls, cost).
type Tally = Arc<Mutex<BTreeMap<u32, (u64, u64)>>>;

/// Prices change mid-run: every call is charged at the version in force when it
/// was reserved (one reserved before the change and settled after it included),
/// the ledger's `usd_micros` equals what the gateways charged, the releases carry
/// subtotals per (model, version) that add up to it, and an auditor finds every
/// traced call by its trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_change_mid_run_charges_each_call_at_the_version_it_was_reserved_at() {
    let cluster = Cluster::start(3, |_| {}).await;
    cluster.leader().await;
    create(
        &cluster,
        1,
        "org",
        vec![
            ration_testkit::limit("usd_micros", 1_000_000_000_000, Period::Lifetime),
            ration_testkit::limit("tokens", 1_000_000_000, Period::Lifetime),
        ],
    )
    .await;
    // $1 per million input tokens, $2 per million output: 1 and 2 usd_micros per token.
    assert_eq!(set_price(&cluster, 2, "gpt-x", 1_000_000, 2_000_000).await, 1);
    let clock = CoarseClock::new();
    clock.start_ticking();
    let gateways: Vec<Arc<Sdk>> =
        (0..4).map(|i| sdk(&cluster, &format!("gw-{i}"), &clock)).collect();
    // The price book is read from the nearest member, which may not have applied
    // the price yet.
    for g in &gateways {
        let g = g.clone();
        eventually("the gateway sees version 1", Duration::from_secs(10), move || {
            let g = g.clone();
            async move { g.refresh_prices().await && g.price("gpt-x").is_some_and(|p| p.version == 1) }
        })
        .await;
    }
    let spec = |trace: Option<String>| CallSpec {
        model: "gpt-x".into(),
        prompt_tokens: 1_000,
        max_tokens: 500,
        tokens: true,
        trace,
        extra: Vec::new(),
    };
    let used = TokenUsage { input: 800, cached: 200, output: 300 };
    // Every gateway holds leases before the run.
    for g in &gateways {
        let r = g.reserve_waiting(
            &[("org", "tokens", 1_500), ("org", "usd_micros", 2_000)],
            Duration::from_secs(20),
        );
        drop(r.await.expect("a first lease"));
    }

    // Reserved at version 1 now, settled after version 2 is in force.
    let early = gateways[0].reserve_call("org", spec(None)).unwrap();
    assert_eq!(early.price_version(), 1);

    let tally: Tally = Arc::default();
    let traced = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, g) in gateways.iter().enumerate() {
        for k in 0..5 {
            let (g, tally, stop, traced) = (g.clone(), tally.clone(), stop.clone(), traced.clone());
            tasks.push(tokio::spawn(async move {
                // One caller in twenty is an agent run, traced.
                let trace = (i == 0 && k == 0).then(|| "run-7".to_owned());
                while !stop.load(Ordering::Relaxed) {
                    match g.reserve_call("org", spec(trace.clone())) {
                        Ok(call) => {
                            tokio::time::sleep(Duration::from_millis(3)).await;
                            let c = call.settle(used);
                            let mut t = tally.lock().unwrap();
                            let e = t.entry(c.price_version).or_insert((0, 0));
                            *e = (e.0 + 1, e.1 + c.cost_usd_micros);
                            if trace.is_some() {
                                traced.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The price doubles.
    assert_eq!(set_price(&cluster, 3, "gpt-x", 2_000_000, 4_000_000).await, 2);
    for g in &gateways {
        let g = g.clone();
        eventually("the gateway sees version 2", Duration::from_secs(10), move || {
            let g = g.clone();
            async move { g.refresh_prices().await && g.price("gpt-x").is_some_and(|p| p.version == 2) }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let late = early.settle(used);
    // 800 + 200 cached (a tenth of the price) + 300 output at version 1.
    assert_eq!(late, ration_client::Charged { price_version: 1, cost_usd_micros: 800 + 20 + 600 });
    {
        let mut t = tally.lock().unwrap();
        let e = t.entry(1).or_insert((0, 0));
        *e = (e.0 + 1, e.1 + late.cost_usd_micros);
    }
    for g in &gateways {
        g.release_all().await.unwrap();
    }
    let tally = tally.lock().unwrap().clone();
    eprintln!("charged by version (calls, usd_micros): {tally:?}");
    assert!(tally.get(&1).is_some_and(|v| v.0 > 10) && tally.get(&2).is_some_and(|v| v.0 > 10));
    // Each version's calls cost what that version says, per call.
    assert_eq!(tally[&1].1, tally[&1].0 * 1_420);
    assert_eq!(tally[&2].1, tally[&2].0 * 2_840);
    let charged: u64 = tally.values().map(|v| v.1).sum();

    // The ledger counted exactly what was charged.
    let org = get_budget(&cluster, "org").await;
    let usd = org.limits.iter().find(|l| l.limit.as_ref().unwrap().unit == "usd_micros").unwrap();
    assert_eq!((usd.consumed as u64, usd.outstanding), (charged, 0));
    // The releases' subtotals per (model, version) add up to the same, call for call.
    let released = query(
        &cluster,
        v1::QueryAuditRequest {
            subtree: "org".into(),
            kinds: vec![
                "lease_released".into(),
                "late_release".into(),
                "lease_refunded".into(),
                "overrun".into(),
            ],
            ..Default::default()
        },
    )
    .await;
    let mut lines: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for r in &released {
        let cause = r.cause.as_ref().expect("a release names its request");
        assert!(!cause.client_id.is_empty());
        for u in &cause.usage {
            assert_eq!(u.model, "gpt-x");
            let e = lines.entry(u.price_version).or_insert((0, 0));
            *e = (e.0 + u.calls as u64, e.1 + u.cost_usd_micros as u64);
        }
    }
    assert_eq!(lines, tally, "usage lines on the releases, by version");
    // From the trace id to every call it made.
    let calls =
        query(&cluster, v1::QueryAuditRequest { trace: "run-7".into(), ..Default::default() })
            .await;
    assert_eq!(calls.len() as u64, traced.load(Ordering::Relaxed));
    assert!(calls.iter().all(|r| r.kind == "call_recorded"));
    let traced_cost: i64 = calls
        .iter()
        .map(|r| match r.detail.as_ref().and_then(|d| d.detail.as_ref()) {
            Some(v1::audit_detail::Detail::Call(c)) => c.usage.as_ref().unwrap().cost_usd_micros,
            other => panic!("{other:?}"),
        })
        .sum();
    assert!(traced_cost > 0);
    // The price book's history.
    let book = ledger(addrs(&cluster)[0])
        .list_prices(v1::ListPricesRequest { model: "gpt-x".into(), linearizable: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(book.models[0].versions.len(), 2);
    cluster.shutdown().await;
}

/// The webhook receiver of the test (the cluster's config is a `fn`, so it reads
/// the address from here).
static RECEIVER: OnceLock<(String, std::path::PathBuf)> = OnceLock::new();
const SECRET: &str = "test-webhook-secret-0123456789";

#[derive(Default)]
struct Received {
    /// (idempotency key, body, signature valid).
    posts: Vec<(String, String, bool)>,
    failed_first: bool,
}

async fn receiver(received: Arc<Mutex<Received>>) -> String {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let received = received.clone();
            async move {
                let key = headers.get("idempotency-key").unwrap().to_str().unwrap().to_owned();
                let sig = headers.get("x-ration-signature").unwrap().to_str().unwrap().to_owned();
                let valid =
                    sig == ration_server::webhooks::signature(SECRET.as_bytes(), body.as_bytes());
                let mut r = received.lock().unwrap();
                if !r.failed_first {
                    // The first POST fails: it must be retried.
                    r.failed_first = true;
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                r.posts.push((key, body, valid));
                StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}/hook")
}

/// Thresholds at every 10% of five budgets, spent to their caps by gateways while
/// the leader is killed half way: every crossing is a record, and every record
/// reaches the receiver, signed, under its own idempotency key (redeliveries
/// carry the same key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_deliver_every_threshold_crossing_through_a_leader_kill() {
    let received = Arc::new(Mutex::new(Received::default()));
    let url = receiver(received.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    RECEIVER.set((url, secret)).unwrap();
    let mut cluster = Cluster::start(3, |c| {
        let (url, secret) = RECEIVER.get().unwrap();
        c.webhook_url = Some(url.clone());
        c.webhook_secret_file = Some(secret.clone());
    })
    .await;
    let leader = cluster.leader().await;
    const CAP: i64 = 20_000;
    let budgets: Vec<String> = (0..5).map(|i| format!("alerts/b{i}")).collect();
    create(
        &cluster,
        1,
        "alerts",
        vec![ration_testkit::limit("tokens", 10 * CAP, Period::Lifetime)],
    )
    .await;
    for (i, b) in budgets.iter().enumerate() {
        let id = 2 + 2 * i as u64;
        create(&cluster, id, b, vec![ration_testkit::limit("tokens", CAP, Period::Lifetime)]).await;
        options(&cluster, id + 1, b, (1..=10).map(|t| t * 10).collect(), false).await;
    }
    let clock = CoarseClock::new();
    clock.start_ticking();
    let gateways: Vec<Arc<Sdk>> =
        (0..5).map(|i| sdk(&cluster, &format!("gw-{i}"), &clock)).collect();
    let admitted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, g) in gateways.iter().enumerate() {
        for b in &budgets {
            let h = g.handle(b, "tokens");
            let (admitted, stop) = (admitted.clone(), stop.clone());
            let mut n = i as u64 + 7;
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let amount = 1 + (n >> 33) % 20;
                    if h.try_spend(amount) {
                        admitted.fetch_add(amount, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
            }));
        }
    }
    let total = 5 * CAP as u64;
    // The leader is killed once it has delivered some notices (the ledger learns
    // of spend as leases settle, so crossings trail admissions by seconds).
    eventually("some notices are delivered", Duration::from_secs(90), || {
        let n = received.lock().unwrap().posts.len();
        async move { n >= 15 }
    })
    .await;
    let before_kill = received.lock().unwrap().posts.len();
    cluster.stop(leader).await;
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    // Spend the rest, until admissions stop.
    spend_until_refused(&admitted, &stop, tasks, &gateways, Duration::from_secs(120)).await;
    // Every crossing is one record.
    let crossings = query(
        &cluster,
        v1::QueryAuditRequest { kinds: vec!["threshold_crossed".into()], ..Default::default() },
    )
    .await;
    let mut per_budget: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in &crossings {
        let Some(v1::audit_detail::Detail::ThresholdPct(p)) =
            r.detail.as_ref().and_then(|d| d.detail.clone())
        else {
            panic!("{r:?}")
        };
        per_budget.entry(r.budget.clone()).or_default().push(p);
    }
    let admitted = admitted.load(Ordering::Relaxed);
    eprintln!("admitted {admitted} of {total}; crossings {}", crossings.len());
    for b in &budgets {
        let spent = get_budget(&cluster, b).await.limits[0].consumed;
        let expected: Vec<u32> =
            (1..=10).map(|t| t * 10).filter(|t| spent * 100 >= i64::from(*t) * CAP).collect();
        assert_eq!(per_budget.get(b).cloned().unwrap_or_default(), expected, "{b} spent {spent}");
    }
    assert!(crossings.len() >= 45, "the budgets were spent to (nearly) their caps");
    // Every record reaches the receiver, under its hash as the key, signed.
    let keys: BTreeSet<String> = crossings.iter().map(|r| ration_testkit::hex(&r.hash)).collect();
    eventually("every crossing is delivered", Duration::from_secs(30), || {
        let got: BTreeSet<String> =
            received.lock().unwrap().posts.iter().map(|p| p.0.clone()).collect();
        let done = got == keys;
        async move { done }
    })
    .await;
    {
        let r = received.lock().unwrap();
        assert!(r.posts.iter().all(|p| p.2), "every signature verifies");
        for (key, body, _) in &r.posts {
            assert!(body.contains(&format!("\"id\":\"{key}\"")), "{body}");
        }
        let distinct: BTreeSet<&String> = r.posts.iter().map(|p| &p.0).collect();
        eprintln!(
            "webhooks: {} crossings, {} POSTs received ({} before the kill, {} redelivered), 1 refused and retried",
            keys.len(),
            r.posts.len(),
            before_kill,
            r.posts.len() - distinct.len()
        );
    }
    cluster.shutdown().await;
}

/// A budget in shadow mode refuses nothing on its own cap and records what it
/// would have refused; its parent's cap still holds for everything spent below it.
/// And the forecast of a steady load: its burn rate and exhaustion time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_refuses_nothing_its_parent_holds_and_forecasts_follow_a_steady_load() {
    let cluster = Cluster::start(3, |_| {}).await;
    cluster.leader().await;
    const PARENT: i64 = 30_000;
    const SHADOW: i64 = 5_000;
    create(&cluster, 1, "p", vec![ration_testkit::limit("tokens", PARENT, Period::Lifetime)]).await;
    create(&cluster, 2, "p/new", vec![ration_testkit::limit("tokens", SHADOW, Period::Lifetime)])
        .await;
    options(&cluster, 3, "p/new", vec![], true).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let gateways: Vec<Arc<Sdk>> =
        (0..3).map(|i| sdk(&cluster, &format!("gw-{i}"), &clock)).collect();
    let admitted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for g in &gateways {
        let h = g.handle("p/new", "tokens");
        let (admitted, stop) = (admitted.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if h.try_spend(7) {
                    admitted.fetch_add(7, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    spend_until_refused(&admitted, &stop, tasks, &gateways, Duration::from_secs(90)).await;
    let admitted = admitted.load(Ordering::Relaxed);
    let shadow = get_budget(&cluster, "p/new").await;
    let parent = get_budget(&cluster, "p").await;
    eprintln!(
        "shadow: admitted {admitted}; p/new consumed {} (cap {SHADOW}); p consumed {} (cap {PARENT}); {} would-be refusals",
        shadow.limits[0].consumed, parent.limits[0].consumed, shadow.shadow_refusals
    );
    // The parent's cap held; the shadow cap refused nothing (spend went far past it).
    assert!(admitted <= PARENT as u64);
    assert!(admitted * 100 >= PARENT as u64 * 95, "only {admitted} admitted");
    assert_eq!(parent.limits[0].consumed as u64, admitted);
    assert_eq!(shadow.limits[0].consumed as u64, admitted);
    // Every would-be refusal is recorded, and counted on the budget.
    let refusals = query(
        &cluster,
        v1::QueryAuditRequest { kinds: vec!["shadow_refusal".into()], ..Default::default() },
    )
    .await;
    assert!(!refusals.is_empty());
    assert_eq!(refusals.len() as u64, shadow.shadow_refusals);
    assert!(refusals.iter().all(|r| r.budget == "p/new"));

    // A steady load of 2,000 units/s (three gateways, 40 units every 60 ms
    // each) on a lifetime budget for 80 s: the ledger learns of spend as leases
    // settle (a few seconds of each gateway's spend at a time), and measures the
    // rate over the last 60 to 120 s.
    const STEADY_CAP: i64 = 500_000;
    create(
        &cluster,
        4,
        "steady",
        vec![ration_testkit::limit("tokens", STEADY_CAP, Period::Lifetime)],
    )
    .await;
    // Fresh gateways: the ones above released everything and stopped.
    let gateways: Vec<Arc<Sdk>> =
        (0..3).map(|i| sdk(&cluster, &format!("steady-{i}"), &clock)).collect();
    let spent = Arc::new(AtomicU64::new(0));
    let begun = Instant::now();
    let mut tasks = Vec::new();
    for g in &gateways {
        let h = g.handle("steady", "tokens");
        let spent = spent.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(60));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while begun.elapsed() < Duration::from_secs(80) {
                tick.tick().await;
                if h.try_spend(40) {
                    spent.fetch_add(40, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = spent.load(Ordering::Relaxed);
    let true_rate = n as f64 / begun.elapsed().as_secs_f64();
    let f = ledger(addrs(&cluster)[0])
        .forecast(v1::ForecastRequest { path: "steady".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    let l = &f.limits[0];
    let rate_error = (l.rate_per_s - true_rate).abs() / true_rate;
    // At the true rate, spend reaches the cap this long after what was admitted.
    let true_s = (STEADY_CAP as f64 - n as f64) / true_rate;
    let projected_s = l
        .exhausts_at_ms
        .expect("a lifetime limit is exhausted in its window")
        .saturating_sub(f.now_ms) as f64
        / 1000.0;
    let when_error = (projected_s - true_s).abs() / true_s;
    eprintln!(
        "forecast: burn rate {:.0}/s against {:.0}/s admitted ({:.1}% off); cap reached in {:.0} s \
         projected against {:.0} s at the true rate ({:.1}% off); consumed {} of {n} admitted",
        l.rate_per_s,
        true_rate,
        rate_error * 100.0,
        projected_s,
        true_s,
        when_error * 100.0,
        l.consumed
    );
    assert!(rate_error < 0.25, "burn rate {} against {true_rate}", l.rate_per_s);
    assert!(when_error < 0.25, "{projected_s} s against {true_s} s");
    for g in &gateways {
        g.release_all().await.unwrap();
    }
    cluster.shutdown().await;
}
