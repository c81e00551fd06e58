//! `ration-agent-load`: measures ration-agent as Envoy uses it, against a 3-node
//! cluster started in this process.
//!
//! 1. Latency: `--clients` concurrent Envoy-like callers (a tonic client on
//!    `envoy-types`, over `--connections` HTTP/2 connections) call
//!    `ShouldRateLimit` as fast as they can, against the agent and against a no-op
//!    rate limit service (answers OK at once) in the same process, interleaved
//!    over `--rounds` rounds: p50/p99 and calls per second, as ratios to the no-op.
//! 2. Fan-in: `--gateways` gateways admitting `--gateway-rate` calls per second
//!    each over `--keys` budgets, first all behind one agent (each gateway a
//!    caller of the agent, as Envoys are), then each with its own SDK: cluster
//!    writes (acquires, releases, reports sent) per 1,000 admissions.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use hdrhistogram::Histogram;
use ration_agent::agent::Limits;
use ration_agent::config::Config;
use ration_agent::rules::{EntryRule, RuleConfig, Rules};
use ration_client::{CoarseClock, Sdk, SdkConfig};
use ration_proto::v1::{self, Period};
use ration_testkit::inproc::Cluster;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "ration-agent-load", about = "Latency and fan-in of ration-agent")]
struct Args {
    /// Concurrent callers in the latency runs.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// HTTP/2 connections they share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Budgets (one per API key) the calls spread over.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Seconds per latency run.
    #[arg(long, default_value_t = 5)]
    duration_s: u64,
    /// Latency rounds (no-op, agent, no-op, agent, ...).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Gateways in the fan-in runs.
    #[arg(long, default_value_t = 50)]
    gateways: usize,
    /// Admissions per second per gateway in the fan-in runs.
    #[arg(long, default_value_t = 200)]
    gateway_rate: u64,
    /// Seconds per fan-in run: at least a lease's validity (20 s by default), or
    /// the SDK gateways' renewals fall outside the count.
    #[arg(long, default_value_t = 20)]
    fanin_s: u64,
}

/// Answers OK at once: the floor of any rate limit service over this transport.
#[derive(Debug)]
struct Noop;

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        _: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..RateLimitResponse::default()
        }))
    }
}

fn request(key: usize) -> RateLimitRequest {
    RateLimitRequest {
        domain: "llm".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry { key: "api_key".into(), value: format!("k{key}") }],
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 1,
    }
}

async fn channels(addr: std::net::SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

struct Run {
    hist: Histogram<u64>,
    calls: u64,
    over: u64,
    secs: f64,
}

/// `clients` callers as fast as they can for `duration`.
async fn latency(addr: std::net::SocketAddr, args: &Args) -> anyhow::Result<Run> {
    let chans = channels(addr, args.connections).await?;
    let stop = Instant::now() + Duration::from_secs(args.duration_s);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut client = RateLimitServiceClient::new(chans[c % chans.len()].clone());
        let keys = args.keys;
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let (mut calls, mut over, mut i) = (0u64, 0u64, c);
            while Instant::now() < stop {
                i += 1;
                let t = Instant::now();
                let r = client.should_rate_limit(request(i % keys)).await;
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = hist.record(us.max(1));
                calls += 1;
                if !matches!(r, Ok(ref r) if r.get_ref().overall_code == Code::Ok as i32) {
                    over += 1;
                }
            }
            (hist, calls, over)
        }));
    }
    let started = Instant::now();
    let mut run = Run { hist: Histogram::new(3)?, calls: 0, over: 0, secs: 0.0 };
    for t in tasks {
        let (h, c, o) = t.await?;
        run.hist.add(h)?;
        run.calls += c;
        run.over += o;
    }
    run.secs = started.elapsed().as_secs_f64();
    Ok(run)
}

/// Paced callers: `gateways` × `rate` calls per second, each through `admit`.
async fn paced<F, Fut>(args: &Args, admit: F) -> (u64, u64)
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Instant::now() + Duration::from_secs(args.fanin_s);
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for g in 0..args.gateways {
        let (admit, ok, refused, keys) = (admit.clone(), ok.clone(), refused.clone(), args.keys);
        let every = Duration::from_secs_f64(1.0 / args.gateway_rate.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = g;
            while Instant::now() < stop {
                tick.tick().await;
                i += 1;
                let counter = if admit(g, i % keys).await { &ok } else { &refused };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed))
}

fn rules() -> Rules {
    Rules::new(vec![RuleConfig {
        domain: "llm".into(),
        entries: vec![EntryRule { key: "api_key".into(), value: "*".into() }],
        budget: "acme/keys/{api_key}".into(),
        unit: "tokens".into(),
        correlate: None,
        settle: None,
        price_model: None,
        price_tokens: None,
    }])
    .expect("valid rule")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The agent's metrics recorder, as ration-agent installs it.
    let _prom = ration_agent::prom::Prom::install().map_err(anyhow::Error::msg)?;
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.addrs[&cluster.leader().await];
    let endpoints: Vec<String> = cluster.addrs.values().map(|a| a.to_string()).collect();
    let mut budgets = vec!["acme".to_owned(), "acme/keys".to_owned()];
    budgets.extend((0..args.keys).map(|k| format!("acme/keys/k{k}")));
    for (i, path) in budgets.iter().enumerate() {
        let req = v1::CreateBudgetRequest {
            meta: ration_testkit::meta("agent-load", i as u64 + 1, "ops"),
            path: path.clone(),
            limits: vec![ration_testkit::limit("tokens", 1 << 50, Period::Lifetime)],
        };
        ration_testkit::until_answered!([leader], create_budget, req)
            .map_err(|e| anyhow::anyhow!("{path}: {e:?}"))?;
    }

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent_addr = grpc.local_addr()?;
    let config = Config {
        listen: agent_addr,
        metrics_listen: http.local_addr()?,
        sdk: SdkConfig::new(endpoints.clone(), "agent"),
        limits: Limits::default(),
        rules: rules(),
    };
    let agent = ration_agent::start(config)?;
    tokio::spawn(ration_agent::serve_agent(
        agent.clone(),
        grpc,
        http,
        None,
        std::future::pending(),
    ));
    let noop = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let noop_addr = noop.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(Noop))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(noop)),
    );
    // Warm-up: every key leased once.
    let mut warm = RateLimitServiceClient::new(channels(agent_addr, 1).await?.remove(0));
    for k in 0..args.keys {
        warm.should_rate_limit(request(k)).await?;
    }

    println!(
        "latency: {} callers over {} connections, {} s per run, {} keys",
        args.clients, args.connections, args.duration_s, args.keys
    );
    println!("| round | target | calls/s | p50 us | p99 | refused |");
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=args.rounds {
        let base = latency(noop_addr, &args).await?;
        let got = latency(agent_addr, &args).await?;
        for (name, r) in [("no-op", &base), ("agent", &got)] {
            println!(
                "| {round} | {name} | {:.0} | {} | {} | {} |",
                r.calls as f64 / r.secs,
                r.hist.value_at_quantile(0.5),
                r.hist.value_at_quantile(0.99),
                r.over
            );
        }
        ratios.push((
            got.hist.value_at_quantile(0.5) as f64 / base.hist.value_at_quantile(0.5).max(1) as f64,
            got.hist.value_at_quantile(0.99) as f64
                / base.hist.value_at_quantile(0.99).max(1) as f64,
            (got.calls as f64 / got.secs) / (base.calls as f64 / base.secs),
        ));
    }
    for (i, (p50, p99, tput)) in ratios.iter().enumerate() {
        println!(
            "round {}: agent / no-op: p50 {p50:.2}x, p99 {p99:.2}x, calls/s {tput:.2}x",
            i + 1
        );
    }

    // Fan-in: one agent for every gateway.
    println!(
        "fan-in: {} gateways x {} calls/s over {} keys, {} s each",
        args.gateways, args.gateway_rate, args.keys, args.fanin_s
    );
    let chans = channels(agent_addr, args.connections).await?;
    let before = agent.sdk().ops_sent();
    let (ok_a, refused_a) = paced(&args, move |g, k| {
        let mut c = RateLimitServiceClient::new(chans[g % chans.len()].clone());
        async move {
            matches!(c.should_rate_limit(request(k)).await,
                Ok(r) if r.get_ref().overall_code == Code::Ok as i32)
        }
    })
    .await;
    let writes_a = agent.sdk().ops_sent() - before;

    // Fan-in: a gateway per SDK.
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdks: Vec<Arc<Sdk>> = (0..args.gateways)
        .map(|g| Sdk::start(SdkConfig::new(endpoints.clone(), format!("gw-{g}")), clock.clone()))
        .collect::<Result<_, _>>()?;
    let handles: Arc<Vec<Vec<ration_client::Handle>>> = Arc::new(
        sdks.iter()
            .map(|s| {
                (0..args.keys).map(|k| s.handle(&format!("acme/keys/k{k}"), "tokens")).collect()
            })
            .collect(),
    );
    // The same warm-up: every gateway's keys leased before counting.
    let ready = Arc::new(AtomicBool::new(false));
    for _ in 0..100 {
        if sdks
            .iter()
            .all(|s| (0..args.keys).all(|k| s.held(&format!("acme/keys/k{k}"), "tokens").0 > 0))
        {
            ready.store(true, Ordering::Relaxed);
            break;
        }
        for h in handles.iter().flatten() {
            h.try_spend(1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before: u64 = sdks.iter().map(|s| s.ops_sent()).sum();
    let h = handles.clone();
    let (ok_s, refused_s) = paced(&args, move |g, k| {
        let ok = h[g][k].try_spend(1);
        async move { ok }
    })
    .await;
    let writes_s: u64 = sdks.iter().map(|s| s.ops_sent()).sum::<u64>() - before;
    println!("| gateways | admitted | refused | cluster writes | writes per 1,000 admissions |");
    println!("|---|---|---|---|---|");
    let per = |w: u64, ok: u64| w as f64 * 1000.0 / ok.max(1) as f64;
    println!(
        "| behind one agent | {ok_a} | {refused_a} | {writes_a} | {:.3} |",
        per(writes_a, ok_a)
    );
    println!(
        "| each with its own SDK{} | {ok_s} | {refused_s} | {writes_s} | {:.3} |",
        if ready.load(Ordering::Relaxed) { "" } else { " (not all warm)" },
        per(writes_s, ok_s)
    );
    println!(
        "fan-in: the agent sends {:.1}x fewer cluster writes per admission",
        per(writes_s, ok_s) / per(writes_a, ok_a).max(1e-9)
    );
    Ok(())
}
