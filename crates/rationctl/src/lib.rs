//! # rationctl
//!
//! The operator CLI, in etcdctl's noun-verb style: `rationctl [global flags] <noun>
//! <verb> [args]`. Every global flag also reads a `RATIONCTL_*` environment
//! variable. Output is a table for people or JSON (`-o json`) for scripts. A failure
//! prints one line naming what went wrong and exits non-zero.
//!
//! [`run`] does everything and writes to the given output, so tests drive the CLI
//! in-process; `main.rs` only maps its result to an exit code.

pub mod audit;
mod budget;
mod certs;
mod cluster;
mod limits;
mod output;
mod price;
mod role;
mod snapshot;
pub mod time;

use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ration_proto::v1::{cluster_client::ClusterClient, ledger_client::LedgerClient, RequestMeta};
use tonic::transport::{Channel, Endpoint};

pub use output::Format;

/// What rationctl calls through: a channel that adds the bearer token, if any.
pub type Chan = ration_tls::token::WithToken<Channel>;

/// The principal a token names (read without checking: only a node can check it).
fn token_principal(token: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let payload = token
        .strip_prefix("ration1.")
        .and_then(|r| r.split('.').next())
        .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|p| String::from_utf8(p).ok())
        .ok_or_else(|| anyhow!("--token is not a Ration token (ration1.…)"))?;
    Ok(payload.split('\n').next().unwrap_or_default().to_owned())
}

/// Ration's operator CLI.
#[derive(Debug, Parser)]
#[command(
    name = "rationctl",
    version,
    about = "Operate a Ration cluster: members, snapshots, budgets, audit, limits"
)]
pub struct Cli {
    /// Cluster members to talk to, comma separated (host:port).
    #[arg(
        long,
        global = true,
        env = "RATIONCTL_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051"
    )]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(
        long,
        short,
        global = true,
        env = "RATIONCTL_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub output: Format,
    /// Deadline of each RPC, in milliseconds.
    #[arg(long, global = true, env = "RATIONCTL_TIMEOUT_MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Who budget changes are recorded as in the audit log (their principal).
    /// Default: the principal --cert names, else "rationctl". With a client
    /// certificate the cluster refuses any other.
    #[arg(long, global = true, env = "RATIONCTL_OPERATOR")]
    pub operator: Option<String>,
    /// The CA certificate (PEM) the cluster's certificates are signed by: talk TLS.
    #[arg(long, global = true, env = "RATIONCTL_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), naming its principal (with --cacert, --key).
    #[arg(long, global = true, env = "RATIONCTL_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, env = "RATIONCTL_KEY")]
    pub key: Option<std::path::PathBuf>,
    /// A bearer token (`rationctl token issue`) instead of a client certificate:
    /// with --cacert, and the principal is the one the token names.
    #[arg(long, global = true, env = "RATIONCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Noun,
}

#[derive(Debug, Subcommand)]
pub enum Noun {
    /// Cluster membership: list, add (as learner), promote (to voter), remove.
    #[command(subcommand)]
    Member(cluster::MemberCmd),
    /// Per-endpoint health and status.
    #[command(subcommand)]
    Endpoint(cluster::EndpointCmd),
    /// Leadership.
    #[command(subcommand)]
    Leader(cluster::LeaderCmd),
    /// Save a snapshot from a node; restore one into a new data directory.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Budgets and their limits.
    #[command(subcommand)]
    Budget(budget::BudgetCmd),
    /// The audit ledger: query, export, verify, spend.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// The price book: model prices in versions (`price set`, `list`, `history`).
    #[command(subcommand)]
    Price(price::PriceCmd),
    /// Per-principal limits: show them and who is near them; change them.
    #[command(subcommand)]
    Limits(limits::LimitsCmd),
    /// Roles: who may do what on which budgets (enforced with TLS).
    #[command(subcommand)]
    Role(role::RoleCmd),
    /// TLS certificates: make a development CA and certificates.
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Bearer tokens for clients without a certificate: issue one.
    #[command(subcommand)]
    Token(certs::TokenCmd),
}

/// What the commands share: endpoints, deadlines, the output format.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub endpoints: Vec<String>,
    pub timeout: Duration,
    pub format: Format,
    pub principal: String,
    tls: Option<ration_tls::ClientTls>,
    token: Option<String>,
    client_id: String,
    next_request: std::sync::atomic::AtomicU64,
}

impl Ctx {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        if cli.endpoints.is_empty() || cli.endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(anyhow!("--endpoints needs at least one host:port"));
        }
        let (tls, certified) = match (&cli.cacert, &cli.cert, &cli.key) {
            (None, None, None) => (None, None),
            (Some(ca), None, None) => (Some(ration_tls::ClientTls::ca_only(ca)?), None),
            (Some(ca), Some(cert), Some(key)) => {
                let files =
                    ration_tls::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
                let who = ration_tls::identity_of(&ration_tls::read_certs(cert)?[0])
                    .map_err(|e| anyhow!("{}: {e}", cert.display()))?;
                (Some(ration_tls::ClientTls::from_files(&files)?), Some(who))
            }
            _ => {
                return Err(anyhow!("give --cacert alone, or --cacert, --cert and --key together"))
            }
        };
        if cli.token.is_some() && (cli.cacert.is_none() || cli.cert.is_some()) {
            return Err(anyhow!(
                "--token goes with --cacert and instead of --cert/--key (a token must not cross the network in clear)"
            ));
        }
        let token_principal = match &cli.token {
            // The principal inside; the node checks the signature and expiry.
            Some(t) => Some(token_principal(t)?),
            None => None,
        };
        let certified = certified.or(token_principal.map(ration_tls::Identity::Principal));
        let principal = match (&cli.operator, certified) {
            (Some(p), _) => p.clone(),
            (None, Some(ration_tls::Identity::Principal(p))) => p,
            (None, Some(ration_tls::Identity::Node(id))) => {
                return Err(anyhow!(
                    "{} is node {id}'s certificate: rationctl needs a client certificate naming a principal",
                    cli.cert.as_ref().map(|c| c.display().to_string()).unwrap_or_default()
                ))
            }
            (None, None) => "rationctl".to_owned(),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(Self {
            endpoints: cli.endpoints.iter().map(|e| e.trim().to_owned()).collect(),
            timeout: Duration::from_millis(cli.timeout_ms.max(1)),
            format: cli.output,
            principal,
            tls,
            token: cli.token.clone(),
            client_id: format!("rationctl:{:x}-{nanos:x}", std::process::id()),
            next_request: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// A channel to one endpoint (connected lazily, with the RPC deadline), that
    /// sends the bearer token if there is one.
    pub fn channel(&self, endpoint: &str) -> anyhow::Result<Chan> {
        ration_tls::token::WithToken::new(self.raw_channel(endpoint)?, self.token.as_deref())
            .map_err(|e| anyhow!("--token: {e}"))
    }

    fn raw_channel(&self, endpoint: &str) -> anyhow::Result<Channel> {
        let uri = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .with_context(|| format!("bad endpoint {endpoint:?}"))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        Ok(match &self.tls {
            Some(tls) => {
                endpoint.connect_with_connector_lazy(ration_tls::Connector::new(tls.clone()))
            }
            None => endpoint.connect_lazy(),
        })
    }

    pub fn ledger(&self, endpoint: &str) -> anyhow::Result<LedgerClient<Chan>> {
        Ok(LedgerClient::new(self.channel(endpoint)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    pub fn cluster(&self, endpoint: &str) -> anyhow::Result<ClusterClient<Chan>> {
        Ok(ClusterClient::new(self.channel(endpoint)?).max_decoding_message_size(64 << 20))
    }

    /// Sends `req` through `call` on a Ledger client, to the first endpoint that
    /// answers (see [`Ctx::first`]); the same request on every attempt.
    pub async fn on_ledger<Req, T, F, Fut>(&self, req: &Req, call: F) -> anyhow::Result<T>
    where
        Req: Clone,
        F: Fn(LedgerClient<Chan>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.first(|e| {
            let started = self.ledger(&e).map(|c| call(c, req.clone()));
            async move {
                match started {
                    Ok(fut) => Ok(fut.await?.into_inner()),
                    Err(x) => Err(tonic::Status::unavailable(format!("{x:#}"))),
                }
            }
        })
        .await
    }

    /// [`Ctx::on_ledger`] for the Cluster service.
    pub async fn on_cluster<Req, T, F, Fut>(&self, req: &Req, call: F) -> anyhow::Result<T>
    where
        Req: Clone,
        F: Fn(ClusterClient<Chan>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.first(|e| {
            let started = self.cluster(&e).map(|c| call(c, req.clone()));
            async move {
                match started {
                    Ok(fut) => Ok(fut.await?.into_inner()),
                    Err(x) => Err(tonic::Status::unavailable(format!("{x:#}"))),
                }
            }
        })
        .await
    }

    /// Fresh request metadata. A retry of the same call reuses what it was given.
    pub fn meta(&self) -> Option<RequestMeta> {
        Some(RequestMeta {
            client_id: self.client_id.clone(),
            request_id: self.next_request.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            principal: self.principal.clone(),
            ..Default::default()
        })
    }

    /// Calls `f` on each endpoint in turn until one answers; UNAVAILABLE and
    /// DEADLINE_EXCEEDED move on to the next, anything else is the answer. While an
    /// endpoint says no leader is known (an election: it ends within a second or
    /// two), every endpoint is tried again after 200 ms, for at most 5 s.
    ///
    /// A refusal is the cluster's answer, the same from every endpoint, so it is
    /// reported without the endpoint (`ABORTED: budget acme is at version 2, ...`);
    /// anything else names the endpoint it came from. When no endpoint answers, each
    /// distinct cause is said once, after the endpoints that gave it.
    pub async fn first<T, F, Fut>(&self, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        const ELECTION_WAIT: Duration = Duration::from_secs(5);
        let started = std::time::Instant::now();
        loop {
            match self.each(&mut f).await {
                Err((_, true)) if started.elapsed() < ELECTION_WAIT => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((errors, _)) => {
                    let causes: Vec<String> = errors
                        .iter()
                        .map(|(cause, at)| format!("{}: {cause}", at.join(", ")))
                        .collect();
                    return Err(anyhow!("no endpoint answered: {}", causes.join("; ")));
                }
                Ok(answer) => return answer,
            }
        }
    }

    /// One round of [`Ctx::first`]: the answer, or each cause of no answer with the
    /// endpoints that gave it (in the order first seen) and whether one of them
    /// was an election.
    #[allow(clippy::type_complexity)]
    async fn each<T, F, Fut>(
        &self,
        f: &mut F,
    ) -> Result<anyhow::Result<T>, (Vec<(String, Vec<String>)>, bool)>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut errors: Vec<(String, Vec<String>)> = Vec::new();
        let mut election = false;
        for e in &self.endpoints {
            match f(e.clone()).await {
                Ok(v) => return Ok(Ok(v)),
                Err(s) if ration_proto::rpc::retryable(&s) => {
                    election |= s.message().contains("no leader is known");
                    let cause = describe(&s);
                    match errors.iter_mut().find(|(c, _)| *c == cause) {
                        Some((_, at)) => at.push(e.clone()),
                        None => errors.push((cause, vec![e.clone()])),
                    }
                }
                Err(s) if is_refusal(s.code()) => return Ok(Err(anyhow!(describe(&s)))),
                Err(s) => return Ok(Err(anyhow!("{e}: {}", describe(&s)))),
            }
        }
        Err((errors, election))
    }
}

/// Codes with which the ledger or the cluster refuses a request: the answer, not a
/// failure to get one.
fn is_refusal(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
    )
}

/// A gRPC status as one line: its code as gRPC spells it, then its message
/// (`FAILED_PRECONDITION: budget acme has 1 child budget(s); delete them first`).
pub(crate) fn describe(s: &tonic::Status) -> String {
    let code = code_name(s.code());
    let mut message = s.message().trim().to_owned();
    // A transport error says why in its innermost cause (a refused TLS handshake:
    // `received fatal alert: CertificateRequired`, `invalid peer certificate: ...`).
    let mut cause = std::error::Error::source(s);
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c.to_string());
        cause = c.source();
    }
    if let Some(why) = innermost.filter(|w| !message.contains(w.as_str())) {
        let tls = ["alert", "certificate", "TLS", "tls"].iter().any(|k| why.contains(k));
        message = format!(
            "{message} ({why}{})",
            if tls { "; check --cacert, --cert and --key" } else { "" }
        );
    }
    if message.is_empty() {
        code.to_owned()
    } else {
        format!("{code}: {message}")
    }
}

/// The canonical name of a gRPC code (`FAILED_PRECONDITION`), as the README's table
/// of status codes spells it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Runs one command line (`args[0]` is the program name), writing its output to
/// `out`.
pub async fn run<I, T>(args: I, out: &mut dyn std::io::Write) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    run_cli(cli, out).await
}

/// Runs a parsed command line.
pub async fn run_cli(cli: Cli, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let ctx = Ctx::new(&cli)?;
    match cli.command {
        Noun::Member(c) => cluster::member(&ctx, c, out).await,
        Noun::Endpoint(c) => cluster::endpoint(&ctx, c, out).await,
        Noun::Leader(c) => cluster::leader(&ctx, c, out).await,
        Noun::Snapshot(c) => snapshot::run(&ctx, c, out).await,
        Noun::Budget(c) => budget::run(&ctx, c, out).await,
        Noun::Audit(c) => audit::run(&ctx, c, out).await,
        Noun::Limits(c) => limits::run(&ctx, c, out).await,
        Noun::Price(c) => price::run(&ctx, c, out).await,
        Noun::Role(c) => role::run(&ctx, c, out).await,
        Noun::Certs(c) => certs::run(&ctx, c, out).await,
        Noun::Token(c) => certs::token(&ctx, c, out),
    }
}

/// Which format a file export uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// One JSON object per line.
    Jsonl,
    Csv,
}

#[cfg(test)]
mod tests {

    /// Every flag and argument of every subcommand says what it is (`--help`).
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no description)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<super::Cli as clap::CommandFactory>::command(), "rationctl", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
