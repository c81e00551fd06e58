//! # ration-agent
//!
//! A regional agent for gateways that are not Rust programs: Envoy (and the
//! gateways built on it) asks it over Envoy's own rate limit protocol, and it
//! answers from allowances it leases from the Ration cluster through the SDK
//! (`ration-client`): one lease holder per budget per region instead of one per
//! gateway, and no cluster round trip per admission.
//!
//! - [`rules`]: which budget and unit a descriptor charges (pure);
//! - [`agent`]: the decisions, reservations and their settling;
//! - [`quota`]: Envoy's Rate Limit Quota Service (RLQS), stream by stream;
//! - [`envoy`]: Envoy's two services and their protobuf conversions;
//! - [`config`]: TOML, environment and flags;
//! - [`prom`]: the metrics recorder behind `/metrics`.

pub mod agent;
pub mod config;
pub mod envoy;
pub mod prom;
pub mod quota;
pub mod rules;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ration_client::{CoarseClock, Sdk};
use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::config::Config;
use crate::prom::Prom;

/// How long a graceful shutdown gives the cluster to take back the leases.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds both ports, then serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    prom: Option<Arc<Prom>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (listen)", config.listen))?;
    let http = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} (metrics_listen)", config.metrics_listen))?;
    serve(config, grpc, http, prom, shutdown).await
}

/// Serves on listeners already bound: Envoy's rate limit service and gRPC health
/// on `grpc`, `/metrics`, `/healthz` and `/readyz` on `http`. On `shutdown`: stops
/// taking calls, charges every reservation still waiting for its stream-done call
/// at what it reserved, and releases every lease (what was spent is reported,
/// the rest returns to the budget at once).
pub async fn serve(
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    prom: Option<Arc<Prom>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let agent = start(config)?;
    serve_agent(agent, grpc, http, prom, shutdown).await
}

/// Starts the SDK (its clock and refill task) and the agent over it, on the
/// current tokio runtime.
pub fn start(config: Config) -> anyhow::Result<Arc<Agent>> {
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdk = Sdk::start(config.sdk, clock).context("starting the SDK")?;
    Ok(Agent::new(sdk, config.rules, config.limits))
}

/// [`serve`] for an agent already started ([`start`]).
pub async fn serve_agent(
    agent: Arc<Agent>,
    grpc: TcpListener,
    http: TcpListener,
    prom: Option<Arc<Prom>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sdk = agent.sdk().clone();
    tracing::info!(
        listen = %grpc.local_addr()?, metrics = %http.local_addr()?,
        principal = sdk.cluster().principal(),
        "ration-agent serving Envoy's rate limit service"
    );

    // Reservations past their timeout are charged; limits shown are read again.
    let upkeep = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                agent.expire(Instant::now());
                agent.refresh(256).await;
            }
        })
    };

    let ready = {
        let sdk = sdk.clone();
        move || !sdk.cluster().failover_bound().is_zero()
    };
    let metrics_app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let prom = prom.clone();
                async move { prom.map(|p| p.render()).unwrap_or_default() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ok = ready();
                async move {
                    if ok {
                        (axum::http::StatusCode::OK, "ready\n")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "no cluster member answered yet\n",
                        )
                    }
                }
            }),
        );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http_task = {
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            axum::serve(http, metrics_app).with_graceful_shutdown(stop).await
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer<envoy::Service>>()
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    let mut rx = stop_rx.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .concurrency_limit_per_connection(4096)
            .add_service(health_service)
            .add_service(envoy::Service(agent.clone()).server())
            .add_service(envoy::Quota(agent.clone()).server())
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|s| *s).await;
            }),
    );

    shutdown.await;
    // RLQS streams deny every bucket and wait for Envoy's last report.
    agent.drain();
    let drained = tokio::time::Instant::now() + envoy::DRAIN_WAIT + Duration::from_secs(1);
    while agent.streams().load(std::sync::atomic::Ordering::Acquire) > 0
        && tokio::time::Instant::now() < drained
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("stopping: no new calls; charging open reservations and releasing leases");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc_task).await;
    upkeep.abort();
    let charged = agent.settle_all();
    if charged > 0 {
        tracing::warn!(charged, "reservations with no stream-done call yet were charged whole");
    }
    match tokio::time::timeout(RELEASE_TIMEOUT, sdk.release_all()).await {
        Ok(Ok(())) => tracing::info!("leases released"),
        Ok(Err(e)) => tracing::warn!("releasing leases failed ({e}); they expire on their own"),
        Err(_) => tracing::warn!("releasing leases timed out; they expire on their own"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), http_task).await;
    Ok(())
}
