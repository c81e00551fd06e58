//! A small LLM gateway that admits or refuses each simulated call through the SDK.
//!
//! ```sh
//! cargo run --release -p rationd                                  # terminal 1
//! cargo run --release -p ration-client --example gateway          # terminal 2
//! curl -s -XPOST 'localhost:8080/v1/complete?prompt_tokens=200&max_tokens=500'
//! curl -s localhost:8080/stats
//! ```
//!
//! `--endpoints` takes every node of a cluster (`--help` lists the flags). It logs
//! to stderr (`RUST_LOG` filters): when the ledger cannot be reached at start (it
//! keeps trying), and when the cluster stops answering and answers again.
//!
//! It creates the budgets `demo` (1,000,000 tokens a day) and `demo/app` (100,000
//! tokens a minute) if they do not exist. Each call reserves prompt + max_tokens on
//! `demo/app`, "runs the model" (a random completion length), and settles the real
//! count: the rest returns to the local allowance at once.
//!
//! A call may name a user or an agent run: `&user=alice` spends on
//! `<--users>/alice` (default `demo/users/alice`), `&run=r-42` on `<--runs>/r-42`
//! (default `demo/runs/r-42`). Such a call reserves tokens and their price in
//! `usd_micros` (`--usd-micros-per-token`), and a run's call also one unit of
//! `calls`; with `--run-in-flight-unit UNIT` a run's call also holds one UNIT slot
//! at the ledger while it runs (`Sdk::slot`). The budgets are made by the
//! templates an operator puts on the parents
//! (`rationctl budget template set`): the first call for a new user or run makes
//! its budget.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ration_client::{CoarseClock, Sdk, SdkConfig};
use ration_proto::v1::{self, ledger_client::LedgerClient};

const BUDGET: &str = "demo/app";

#[derive(serde::Deserialize)]
struct Call {
    prompt_tokens: u64,
    max_tokens: u64,
    /// Spend on this user's budget (made by the template on `--users`).
    user: Option<String>,
    /// Spend on this agent run's budget (made by the template on `--runs`).
    run: Option<String>,
    /// Price the call from the cluster's price book (`rationctl price set`): its
    /// tokens and their price at the version in force, settled at that version.
    model: Option<String>,
    /// A trace id: the call is recorded in the audit ledger under it (a run's
    /// calls are, under the run id, without one).
    trace: Option<String>,
}

struct App {
    sdk: Arc<Sdk>,
    users: String,
    runs: String,
    run_in_flight_unit: Option<String>,
    usd_micros_per_token: u64,
    /// The budget's tokens, resolved once: each call reserves without lookups.
    tokens_of: ration_client::Reserver<1>,
    admitted: AtomicU64,
    refused: AtomicU64,
    tokens: AtomicU64,
    seed: AtomicU64,
}

async fn complete(
    State(app): State<Arc<App>>,
    Query(call): Query<Call>,
) -> (StatusCode, Json<json::Value>) {
    let reserve = call.prompt_tokens.saturating_add(call.max_tokens);
    let named = match (&call.user, &call.run) {
        (Some(user), None) => Some((format!("{}/{user}", app.users), false)),
        (None, Some(run)) => Some((format!("{}/{run}", app.runs), true)),
        (None, None) => None,
        (Some(_), Some(_)) => return (StatusCode::BAD_REQUEST, Json(json::bad())),
    };
    if let Some((budget, run)) = named {
        return complete_for(&app, &call, &budget, run, reserve).await;
    }
    let Some(reservation) = app.tokens_of.reserve([reserve]) else {
        app.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::TOO_MANY_REQUESTS, Json(json::refused(reserve)));
    };
    // "Call the model": the completion is somewhere between 0 and max_tokens.
    let r = app.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).rotate_left(17);
    let completion = if call.max_tokens == 0 { 0 } else { r % (call.max_tokens + 1) };
    let used = call.prompt_tokens + completion;
    reservation.settle([used]);
    app.admitted.fetch_add(1, Ordering::Relaxed);
    app.tokens.fetch_add(used, Ordering::Relaxed);
    (StatusCode::OK, Json(json::admitted(used, reserve - used)))
}

/// A call on a user's or a run's budget: tokens and their price, and for a run one
/// call; all or nothing.
async fn complete_for(
    app: &App,
    call: &Call,
    budget: &str,
    run: bool,
    reserve: u64,
) -> (StatusCode, Json<json::Value>) {
    // A run's calls in flight: one slot held at the ledger for the call.
    let slot = match (&app.run_in_flight_unit, run) {
        (Some(unit), true) => {
            match app.sdk.slot(budget, unit, std::time::Duration::from_secs(60)).await {
                Ok(slot) => Some(slot),
                Err(_) => {
                    app.refused.fetch_add(1, Ordering::Relaxed);
                    return (StatusCode::TOO_MANY_REQUESTS, Json(json::refused(reserve)));
                }
            }
        }
        _ => None,
    };
    if let Some(model) = &call.model {
        let r = priced(app, call, budget, run, model).await;
        if let Some(slot) = slot {
            let _ = slot.end(1).await;
        }
        return r;
    }
    let price = |tokens: u64| tokens.saturating_mul(app.usd_micros_per_token);
    let mut wants = vec![(budget, "tokens", reserve), (budget, "usd_micros", price(reserve))];
    if run {
        wants.push((budget, "calls", 1));
    }
    // A new user's or run's first call waits for its first lease (its budget is
    // made by that acquire).
    let first = std::time::Duration::from_secs(2);
    let Some(reservation) = app.sdk.reserve_waiting(&wants, first).await else {
        app.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::TOO_MANY_REQUESTS, Json(json::refused(reserve)));
    };
    let r = app.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).rotate_left(17);
    let completion = if call.max_tokens == 0 { 0 } else { r % (call.max_tokens + 1) };
    let used = call.prompt_tokens + completion;
    reservation.settle(&[used, price(used), 1]);
    if let Some(slot) = slot {
        let _ = slot.end(1).await;
    }
    app.admitted.fetch_add(1, Ordering::Relaxed);
    app.tokens.fetch_add(used, Ordering::Relaxed);
    (StatusCode::OK, Json(json::admitted(used, reserve - used)))
}

/// A call priced from the price book: tokens and dollars (and a run's call), all
/// or nothing; charged at the version in force when it was reserved.
async fn priced(
    app: &App,
    call: &Call,
    budget: &str,
    run: bool,
    model: &str,
) -> (StatusCode, Json<json::Value>) {
    let reserve = call.prompt_tokens.saturating_add(call.max_tokens);
    let run_id = run.then(|| budget.rsplit('/').next().unwrap_or_default().to_owned());
    let spec = ration_client::CallSpec {
        model: model.to_owned(),
        prompt_tokens: call.prompt_tokens,
        max_tokens: call.max_tokens,
        tokens: true,
        trace: call.trace.clone().or(run_id),
        extra: if run { vec![("calls".to_owned(), 1)] } else { Vec::new() },
    };
    let first = std::time::Duration::from_secs(2);
    let reservation = match app.sdk.reserve_call_waiting(budget, spec, first).await {
        Ok(r) => r,
        Err(ration_client::CallError::NoPrice(_)) => {
            app.refused.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_REQUEST, Json(json::bad()));
        }
        Err(_) => {
            app.refused.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::TOO_MANY_REQUESTS, Json(json::refused(reserve)));
        }
    };
    let r = app.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).rotate_left(17);
    let completion = if call.max_tokens == 0 { 0 } else { r % (call.max_tokens + 1) };
    let charged = reservation.settle(ration_client::TokenUsage {
        input: call.prompt_tokens,
        cached: 0,
        output: completion,
    });
    let used = call.prompt_tokens + completion;
    app.admitted.fetch_add(1, Ordering::Relaxed);
    app.tokens.fetch_add(used, Ordering::Relaxed);
    let mut reply = json::admitted(used, reserve - used);
    reply.insert("cost_usd_micros", charged.cost_usd_micros);
    reply.insert("price_version", u64::from(charged.price_version));
    (StatusCode::OK, Json(reply))
}

async fn stats(State(app): State<Arc<App>>) -> Json<json::Value> {
    let (leases, held) = app.sdk.held(BUDGET, "tokens");
    Json(json::stats(
        app.admitted.load(Ordering::Relaxed),
        app.refused.load(Ordering::Relaxed),
        app.tokens.load(Ordering::Relaxed),
        leases,
        held,
    ))
}

/// Replies as flat JSON objects.
mod json {
    pub type Value = std::collections::BTreeMap<&'static str, u64>;
    pub fn bad() -> Value {
        Value::from([("admitted", 0), ("bad_request", 1)])
    }
    pub fn refused(reserve: u64) -> Value {
        Value::from([("admitted", 0), ("wanted", reserve)])
    }
    pub fn admitted(used: u64, returned: u64) -> Value {
        Value::from([("admitted", 1), ("charged", used), ("returned", returned)])
    }
    pub fn stats(admitted: u64, refused: u64, tokens: u64, leases: usize, held: u64) -> Value {
        Value::from([
            ("admitted", admitted),
            ("refused", refused),
            ("tokens_charged", tokens),
            ("leases_held", leases as u64),
            ("tokens_held", held),
        ])
    }
}

/// The gateway's flags.
#[derive(clap::Parser, Debug)]
#[command(about = "An example LLM gateway that admits each call through Ration's SDK")]
struct Args {
    /// The cluster's nodes (host:port, comma-separated); any of them will do.
    #[arg(
        long,
        env = "RATION_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051"
    )]
    endpoints: Vec<String>,
    /// Where the gateway serves HTTP.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// TLS: the CA the cluster's certificates are signed by (with --cert, --key).
    #[arg(long, env = "RATION_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// The gateway's client certificate; it leases and creates the demo budgets as
    /// the principal the certificate names (which needs roles operator and gateway
    /// on `demo`: `rationctl role grant`).
    #[arg(long, env = "RATION_CERT")]
    cert: Option<std::path::PathBuf>,
    #[arg(long, env = "RATION_KEY")]
    key: Option<std::path::PathBuf>,
    /// Where `&user=NAME` calls spend: NAME's budget under this parent.
    #[arg(long, default_value = "demo/users")]
    users: String,
    /// Where `&run=ID` calls spend: the run's budget under this parent.
    #[arg(long, default_value = "demo/runs")]
    runs: String,
    /// Hold one slot of this unit on a run's budget for each of its calls (the
    /// run's template limits it with UNIT=N/concurrent: at most N calls in flight).
    #[arg(long)]
    run_in_flight_unit: Option<String>,
    /// The price a user's or run's call is charged in usd_micros per token.
    #[arg(long, default_value_t = 2)]
    usd_micros_per_token: u64,
}

/// How the gateway reaches the cluster: TLS (if any) and the principal it acts as.
#[derive(Clone, Debug)]
struct Access {
    tls: Option<ration_tls::ClientTls>,
    /// Who creates the demo budgets, and who leases.
    admin: String,
    gateway: String,
}

impl Access {
    fn of(args: &Args) -> anyhow::Result<Self> {
        let (Some(ca), Some(cert), Some(key)) = (&args.cacert, &args.cert, &args.key) else {
            if args.cacert.is_some() || args.cert.is_some() || args.key.is_some() {
                anyhow::bail!("give --cacert, --cert and --key together");
            }
            return Ok(Self { tls: None, admin: "ops".into(), gateway: "gateway-example".into() });
        };
        let files = ration_tls::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
        let who = match ration_tls::identity_of(&ration_tls::read_certs(cert)?[0]) {
            Ok(ration_tls::Identity::Principal(p)) => p,
            other => anyhow::bail!(
                "{}: not a client certificate naming a principal: {other:?}",
                cert.display()
            ),
        };
        Ok(Self {
            tls: Some(ration_tls::ClientTls::from_files(&files)?),
            admin: who.clone(),
            gateway: who,
        })
    }
}

/// Creates the demo budgets through whichever endpoint answers; until one does,
/// says so and tries again. A refusal (no certificate the cluster accepts, no
/// role to create them) is final: it says why and gives up.
async fn ensure_budgets(endpoints: &[String], access: &Access) -> anyhow::Result<()> {
    loop {
        let mut last = None;
        for endpoint in endpoints {
            match create_budgets(endpoint, access).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if let Some(s) = e.downcast_ref::<tonic::Status>() {
                        if matches!(
                            s.code(),
                            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                        ) {
                            anyhow::bail!(
                                "the ledger refused to create the demo budgets as {}: {:?}: {} \
                                 (with TLS, that principal needs roles operator and gateway on \
                                 demo: rationctl role grant {} operator --scope demo, and the \
                                 same with gateway)",
                                access.admin,
                                s.code(),
                                s.message(),
                                access.admin
                            );
                        }
                    }
                    last = Some(format!("{endpoint}: {e:#}"));
                }
            }
        }
        tracing::warn!(
            "cannot reach the ledger at {} ({}); trying again in 2 s",
            endpoints.join(","),
            last.unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

async fn create_budgets(endpoint: &str, access: &Access) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))?
        .connect_timeout(std::time::Duration::from_secs(1))
        .timeout(std::time::Duration::from_secs(2));
    let channel = match &access.tls {
        Some(tls) => {
            endpoint.connect_with_connector(ration_tls::Connector::new(tls.clone())).await?
        }
        None => endpoint.connect().await?,
    };
    let mut client = LedgerClient::new(channel);
    let limit = |cap, period: v1::Period| v1::Limit {
        unit: "tokens".into(),
        cap,
        window: Some(v1::Window { period: period as i32, offset_minutes: 0 }),
        static_allowance: None,
    };
    let run = std::process::id();
    for (i, (path, l)) in [
        ("demo", limit(1_000_000, v1::Period::Day)),
        ("demo/app", limit(100_000, v1::Period::Minute)),
    ]
    .into_iter()
    .enumerate()
    {
        let meta = Some(v1::RequestMeta {
            client_id: format!("gateway-example-{run}"),
            request_id: i as u64 + 1,
            principal: access.admin.clone(),
            ..Default::default()
        });
        match client
            .create_budget(v1::CreateBudgetRequest { meta, path: path.into(), limits: vec![l] })
            .await
        {
            Ok(_) => tracing::info!("created budget {path}"),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => return Err(s.into()),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let access = Access::of(&args)?;
    ensure_budgets(&args.endpoints, &access).await?;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let mut config = SdkConfig::new(args.endpoints.clone(), access.gateway.clone());
    config.cluster.tls = access.tls.clone();
    let sdk = Sdk::start(config, clock)?;
    sdk.handle(BUDGET, "tokens");
    let app = Arc::new(App {
        tokens_of: sdk.reserver([(BUDGET, "tokens")]),
        sdk,
        users: args.users.clone(),
        runs: args.runs.clone(),
        run_in_flight_unit: args.run_in_flight_unit.clone(),
        usd_micros_per_token: args.usd_micros_per_token,
        admitted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        seed: AtomicU64::new(1),
    });
    let router = Router::new()
        .route("/v1/complete", post(complete))
        .route("/stats", get(stats))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!("gateway on http://{}, leasing from {}", args.listen, args.endpoints.join(","));
    axum::serve(listener, router).await?;
    Ok(())
}
