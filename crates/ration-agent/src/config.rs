//! The agent's configuration: a TOML file (`--config`, or `RATION_AGENT_CONFIG`)
//! holds the rules and may hold everything else; flags and their environment
//! variables override the file; the rest has defaults. See
//! `deploy/ration-agent.example.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ration_client::SdkConfig;
use serde::Deserialize;

use crate::agent::Limits;
use crate::rules::{RuleConfig, Rules};

/// Default gRPC address (Envoy's rate limit service and `grpc.health.v1`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";
/// Default HTTP address of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9103";

#[derive(clap::Parser, Debug, Default)]
#[command(
    name = "ration-agent",
    about = "Answers Envoy's rate limit service from allowances leased from a Ration cluster"
)]
pub struct Args {
    /// The configuration file (TOML): rules, and any setting below.
    #[arg(long, env = "RATION_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where Envoy reaches the rate limit service (gRPC).
    #[arg(long, env = "RATION_AGENT_LISTEN")]
    pub listen: Option<String>,
    /// Where /metrics, /healthz and /readyz are served (HTTP).
    #[arg(long, env = "RATION_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// The cluster's nodes (host:port, comma-separated).
    #[arg(long, env = "RATION_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Option<Vec<String>>,
    /// The principal the agent leases as (with a client certificate: the one it names).
    #[arg(long, env = "RATION_PRINCIPAL")]
    pub principal: Option<String>,
    /// TLS: the CA the cluster's certificates are signed by.
    #[arg(long, env = "RATION_CACERT")]
    pub cacert: Option<PathBuf>,
    /// TLS: the agent's client certificate (with --key).
    #[arg(long, env = "RATION_CERT")]
    pub cert: Option<PathBuf>,
    #[arg(long, env = "RATION_KEY")]
    pub key: Option<PathBuf>,
    /// A file holding a bearer token (`rationctl token issue`), with --cacert.
    #[arg(long, env = "RATION_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// The file's settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub endpoints: Option<Vec<String>>,
    pub principal: Option<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// A reservation no stream-done call settles is charged whole after this.
    pub settle_timeout_ms: Option<u64>,
    pub max_pending: Option<usize>,
    pub max_budgets: Option<usize>,
    /// A (budget, unit) pair no call has used for this long, and no reservation
    /// holds, is forgotten: its leases go back to the ledger and it stops
    /// counting towards `max_budgets`. 0: never.
    pub budget_idle_s: Option<u64>,
    /// The longest a call waits for leases rather than refuse (see `Limits`).
    pub cold_wait_ms: Option<u64>,
    /// RLQS: how long an assignment holds without a newer one (whole seconds).
    pub quota_ttl_s: Option<u64>,
    /// RLQS: a bucket with no requests for this long is abandoned.
    pub quota_idle_s: Option<u64>,
    /// RLQS: the most buckets one Envoy may have assigned.
    pub max_buckets_per_stream: Option<usize>,
    #[serde(default)]
    pub rule: Vec<RuleConfig>,
}

/// Everything the agent runs with.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub sdk: SdkConfig,
    pub limits: Limits,
    pub rules: Rules,
}

fn addr(what: &str, text: &str) -> anyhow::Result<SocketAddr> {
    text.parse().with_context(|| format!("{what} {text:?} is not host:port (an IP address)"))
}

impl Args {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let file: File = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("{}", path.display()))?
            }
            None => File::default(),
        };
        let rules = Rules::new(file.rule.clone()).map_err(anyhow::Error::msg)?;
        if rules.is_empty() {
            bail!(
                "no rules: the configuration file (--config) needs at least one [[rule]] \
                 saying which budget a descriptor charges (deploy/ration-agent.example.toml)"
            );
        }
        let listen = addr(
            "listen",
            self.listen.as_deref().or(file.listen.as_deref()).unwrap_or(DEFAULT_LISTEN),
        )?;
        let metrics_listen = addr(
            "metrics_listen",
            self.metrics_listen
                .as_deref()
                .or(file.metrics_listen.as_deref())
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )?;
        let endpoints =
            self.endpoints.or(file.endpoints).unwrap_or_else(|| vec!["127.0.0.1:50051".into()]);
        if endpoints.is_empty() {
            bail!("endpoints: name at least one node (host:port)");
        }
        let cacert = self.cacert.or(file.cacert);
        let cert = self.cert.or(file.cert);
        let key = self.key.or(file.key);
        let token_file = self.token_file.or(file.token_file);
        let mut principal =
            self.principal.or(file.principal).unwrap_or_else(|| "ration-agent".into());
        let mut tls = None;
        let mut token = None;
        match (&cacert, &cert, &key) {
            (Some(ca), Some(cert), Some(key)) => {
                let files =
                    ration_tls::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
                let named = ration_tls::read_certs(cert)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
                let first =
                    named.first().with_context(|| format!("{}: no certificate", cert.display()))?;
                match ration_tls::identity_of(first) {
                    Ok(ration_tls::Identity::Principal(p)) => principal = p,
                    other => bail!(
                        "{}: not a client certificate naming a principal: {other:?}",
                        cert.display()
                    ),
                }
                tls = Some(
                    ration_tls::ClientTls::from_files(&files)
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                );
            }
            (Some(ca), None, None) => {
                tls = Some(ration_tls::ClientTls::ca_only(ca).map_err(|e| anyhow::anyhow!("{e}"))?);
            }
            (None, None, None) => {}
            _ => {
                bail!("give --cacert with --cert and --key, or --cacert alone (with --token-file)")
            }
        }
        if let Some(path) = &token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read token file {}", path.display()))?;
            token = Some(text.trim().to_owned());
        }
        let mut sdk = SdkConfig::new(endpoints, principal);
        sdk.cluster.tls = tls;
        sdk.cluster.token = token;
        if let Some(s) = file.budget_idle_s {
            sdk.idle_after = Duration::from_secs(s);
        }
        let d = Limits::default();
        let limits = Limits {
            settle_timeout: file.settle_timeout_ms.map_or(d.settle_timeout, Duration::from_millis),
            max_pending: file.max_pending.unwrap_or(d.max_pending),
            max_budgets: file.max_budgets.unwrap_or(d.max_budgets),
            cold_wait: file.cold_wait_ms.map_or(d.cold_wait, Duration::from_millis),
            max_descriptors: d.max_descriptors,
            quota_ttl: file.quota_ttl_s.map_or(d.quota_ttl, Duration::from_secs),
            quota_idle: file.quota_idle_s.map_or(d.quota_idle, Duration::from_secs),
            max_buckets_per_stream: file.max_buckets_per_stream.unwrap_or(d.max_buckets_per_stream),
        };
        if limits.quota_ttl.is_zero() {
            bail!("quota_ttl_s must be at least 1 (Envoy reads it in whole seconds)");
        }
        if limits.settle_timeout.is_zero() || limits.max_pending == 0 || limits.max_budgets == 0 {
            bail!("settle_timeout_ms, max_pending and max_budgets must be above 0");
        }
        Ok(Config { listen, metrics_listen, sdk, limits, rules })
    }
}
