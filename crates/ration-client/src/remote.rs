//! The cluster client: one `Batch` RPC carries a round's acquires, reports and
//! releases. It prefers the leader it last heard of, fails over across the
//! configured endpoints, puts a deadline on every RPC, and retries a request with
//! the same request ids (exactly-once makes that safe), a bounded number of times.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ration_proto::rpc;
use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_proto::v1::{self, BatchOp, BatchResult};
use tonic::transport::{Channel, Endpoint};

/// Why a round got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no endpoint answered after {attempts} attempts in {elapsed_ms} ms: {last}")]
    Unreachable { attempts: u32, elapsed_ms: u64, last: String },
    #[error("the cluster refused the batch: {0}")]
    Refused(tonic::Status),
    #[error("bad endpoint {0}: {1}")]
    Endpoint(String, String),
    #[error("no endpoints configured: give at least one host:port")]
    NoEndpoints,
    /// The server answered a batch with a different number of results than it had
    /// operations: pairing them up would be wrong, so none is used.
    #[error("the cluster answered {results} results for {ops} operations")]
    Mismatch { ops: usize, results: usize },
}

/// The first pause between two attempts of a batch; it doubles per attempt.
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(20);
/// The backoff stops doubling after this many attempts (20 ms << 4 = 320 ms).
const RETRY_BACKOFF_MAX_DOUBLINGS: u32 = 4;
/// An RPC's deadline grows by this many round trips to the slowest member that
/// answered, over the configured `rpc_timeout`: a write sent to a follower far away
/// takes a round trip to it, one on to the leader, one to commit and one waiting
/// for the entry in flight, and a fresh connection one or two more.
const RPC_DEADLINE_ROUND_TRIPS: u64 = 4;
/// The round trip that growth counts at most (so at most 4 s is added).
const RPC_DEADLINE_RTT_CAP: Duration = Duration::from_secs(1);

/// Client-side identity and limits.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub endpoints: Vec<String>,
    /// The gateway's principal: leases belong to it.
    pub principal: String,
    pub rpc_timeout: Duration,
    /// Attempts per batch across endpoints before giving up for this round.
    pub max_attempts: u32,
    /// The most one batch may take, all attempts, leader discovery and backoff
    /// included; then the round gives up (its operations go again next round, with
    /// the same request ids).
    pub round_deadline: Duration,
    /// Makes the channel to an endpoint; `None`: lazy TCP. A simulation passes its
    /// own network here.
    pub connector: Option<Connector>,
    /// TLS to the cluster's client ports (`None`: plaintext): the CA the nodes'
    /// certificates are signed by and, for client-certificate authentication, this
    /// gateway's certificate naming `principal`
    /// (`ration_tls::ClientTls::from_files`).
    pub tls: Option<ration_tls::ClientTls>,
    /// A bearer token (`rationctl token issue`) sent on every call, for a gateway
    /// without a client certificate: with `tls` trusting the CA only
    /// (`ClientTls::ca_only`), and `principal` the one the token names.
    pub token: Option<String>,
    /// The client id request ids are scoped to; `None`: one per incarnation (from
    /// the process id and the time). A simulation fixes it to replay exactly.
    pub client_id: Option<String>,
}

/// Makes a channel to `host:port`.
#[derive(Clone)]
pub struct Connector(pub std::sync::Arc<dyn Fn(&str) -> Channel + Send + Sync>);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

/// A connection to the cluster, shared by a gateway's refill task.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    channels: Vec<Mutex<Option<Channel>>>,
    preferred: AtomicUsize,
    /// The round trip of each endpoint's last `Status` answer, in µs (`u64::MAX`:
    /// none yet), measured by leader discovery; reads go to the nearest.
    rtt_us: Vec<AtomicU64>,
    /// The fastest `Status` answer each endpoint ever gave, in µs (`u64::MAX`: none
    /// yet): its distance. Load, a fresh connection or a link that just came back
    /// only add to a round trip, so deadlines grow with this, not the last one.
    floor_rtt_us: Vec<AtomicU64>,
    /// The longest `failover_bound_ms` any member's `Status` gave (0: none yet).
    failover_bound_ms: AtomicU64,
    client_id: String,
    next_request: AtomicU64,
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Result<Self, ClusterError> {
        if config.endpoints.is_empty() {
            return Err(ClusterError::NoEndpoints);
        }
        for e in &config.endpoints {
            Endpoint::from_shared(format!("http://{e}"))
                .map_err(|x| ClusterError::Endpoint(e.clone(), x.to_string()))?;
        }
        if let Some(t) = &config.token {
            ration_tls::token::WithToken::new((), Some(t))
                .map_err(|x| ClusterError::Endpoint("(token)".into(), x))?;
        }
        // One client id per incarnation: request ids restart from 1 with it.
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let client_id = config.client_id.clone().unwrap_or_else(|| {
            format!("{}:{:x}-{:x}", config.principal, std::process::id(), incarnation)
        });
        let channels = config.endpoints.iter().map(|_| Mutex::new(None)).collect();
        let rtt_us = config.endpoints.iter().map(|_| AtomicU64::new(u64::MAX)).collect();
        let floor_rtt_us = config.endpoints.iter().map(|_| AtomicU64::new(u64::MAX)).collect();
        Ok(Self {
            config,
            channels,
            preferred: AtomicUsize::new(0),
            rtt_us,
            floor_rtt_us,
            failover_bound_ms: AtomicU64::new(0),
            client_id,
            next_request: AtomicU64::new(1),
        })
    }

    pub fn principal(&self) -> &str {
        &self.config.principal
    }

    /// Request metadata with a fresh request id.
    pub fn meta(&self) -> Option<v1::RequestMeta> {
        Some(v1::RequestMeta {
            client_id: self.client_id.clone(),
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            principal: self.config.principal.clone(),
            ..Default::default()
        })
    }

    /// The channel to endpoint `i`, sending the bearer token if there is one.
    fn channel(&self, i: usize) -> ration_tls::token::WithToken<Channel> {
        let channel = self.raw_channel(i);
        match ration_tls::token::WithToken::new(channel.clone(), self.config.token.as_deref()) {
            Ok(c) => c,
            // Checked in `new`: a token is printable ASCII.
            Err(_) => ration_tls::token::WithToken::new(channel, None).expect("no token"),
        }
    }

    fn raw_channel(&self, i: usize) -> Channel {
        let mut slot = self.channels[i].lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return c.clone();
        }
        if let Some(connect) = &self.config.connector {
            let c = (connect.0)(&self.config.endpoints[i]);
            *slot = Some(c.clone());
            return c;
        }
        // Each call has the deadline [`Cluster::rpc_deadline`] gives when it is made.
        let endpoint = Endpoint::from_shared(format!("http://{}", self.config.endpoints[i]))
            .expect("checked in new")
            .connect_timeout(self.rpc_deadline())
            .tcp_nodelay(true);
        let c = match &self.config.tls {
            Some(tls) => {
                endpoint.connect_with_connector_lazy(ration_tls::Connector::new(tls.clone()))
            }
            None => endpoint.connect_lazy(),
        };
        *slot = Some(c.clone());
        c
    }

    fn drop_channel(&self, i: usize) {
        *self.channels[i].lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Sends one batch, failing over and retrying with the same request ids, for at
    /// most `max_attempts` attempts and `round_deadline` in all. After a failure it
    /// asks every endpoint at once who leads, so the next attempt goes straight to a
    /// newly elected leader.
    pub async fn batch(&self, ops: Vec<BatchOp>) -> Result<Vec<BatchResult>, ClusterError> {
        let n = self.config.endpoints.len();
        let ops_len = ops.len();
        let request = v1::BatchRequest { ops };
        let started = tokio::time::Instant::now();
        let deadline = started + self.round_deadline();
        let mut last = String::from("no attempt was made");
        let mut i = self.preferred.load(Ordering::Relaxed) % n;
        let mut attempts = 0;
        while attempts < self.config.max_attempts && tokio::time::Instant::now() < deadline {
            attempts += 1;
            let mut client = LedgerClient::new(self.channel(i));
            let until = deadline.min(tokio::time::Instant::now() + self.rpc_deadline());
            let answer =
                tokio::time::timeout_at(until, client.batch(request.clone())).await.unwrap_or_else(
                    |_| Err(tonic::Status::deadline_exceeded("the RPC's deadline passed")),
                );
            match answer {
                Ok(reply) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    let results = reply.into_inner().results;
                    if results.len() != ops_len {
                        return Err(ClusterError::Mismatch {
                            ops: ops_len,
                            results: results.len(),
                        });
                    }
                    return Ok(results);
                }
                Err(s) if rpc::retryable(&s) => {
                    last = s.to_string();
                    self.drop_channel(i);
                    let failed = i;
                    let _ = tokio::time::timeout_at(deadline, self.discover_leader()).await;
                    i = self.preferred.load(Ordering::Relaxed) % n;
                    if i == failed {
                        i = (failed + 1) % n;
                    }
                    let backoff =
                        RETRY_BACKOFF_BASE * (1u32 << attempts.min(RETRY_BACKOFF_MAX_DOUBLINGS));
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + backoff))
                        .await;
                }
                Err(s) => return Err(ClusterError::Refused(s)),
            }
        }
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Err(ClusterError::Unreachable { attempts, elapsed_ms, last })
    }

    /// The endpoint that answered leader discovery fastest (its last answer), if
    /// any has answered: where reads go. In a cluster spread over regions, list
    /// every member; the nearest is found, not configured.
    pub fn nearest(&self) -> Option<usize> {
        self.rtt_us
            .iter()
            .enumerate()
            .map(|(i, r)| (r.load(Ordering::Relaxed), i))
            .filter(|(r, _)| *r != u64::MAX)
            .min()
            .map(|(_, i)| i)
    }

    /// The deadline of one RPC: the configured `rpc_timeout` plus four round trips
    /// to the farthest member that answered `Status` (its fastest answer, counted up
    /// to 1 s). One region: the configured deadline, near enough. Members 300 ms
    /// apart: a write forwarded by a follower, with its commit, takes 1.2 s and more
    /// on a fresh connection, past a 1 s deadline that would fail it every time.
    /// Not the last answer: on a loaded machine, or just after a link came back, one
    /// answer took seconds, and a deadline grown by it held a gateway's rounds on a
    /// dead connection for 5 s and more.
    pub fn rpc_deadline(&self) -> Duration {
        let slowest = self
            .floor_rtt_us
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .filter(|r| *r != u64::MAX)
            .max()
            .map_or(Duration::ZERO, Duration::from_micros)
            .min(RPC_DEADLINE_RTT_CAP);
        self.config.rpc_timeout + slowest * RPC_DEADLINE_ROUND_TRIPS as u32
    }

    /// The most one batch may take, every attempt included: the configured
    /// `round_deadline`, or two RPC deadlines when that is longer.
    pub fn round_deadline(&self) -> Duration {
        self.config.round_deadline.max(self.rpc_deadline() * 2)
    }

    /// The longest a failover should take, as the members' Raft timings say
    /// (`Status.failover_bound_ms`); zero until a member has answered `Status`.
    pub fn failover_bound(&self) -> Duration {
        Duration::from_millis(self.failover_bound_ms.load(Ordering::Relaxed))
    }

    fn note_status(&self, status: &v1::StatusReply) {
        self.failover_bound_ms.fetch_max(status.failover_bound_ms, Ordering::Relaxed);
    }

    /// The endpoint writes go to now (the leader, as last discovered).
    pub fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.config.endpoints.len()
    }

    /// Reads a budget from the nearest endpoint that answers (its applied state,
    /// not linearizable; the leader's if none was measured yet); None if none
    /// answers or it does not exist.
    pub async fn get_budget(&self, path: &str) -> Option<v1::Budget> {
        let n = self.config.endpoints.len();
        let start = self.nearest().unwrap_or_else(|| self.preferred.load(Ordering::Relaxed));
        for k in 0..n {
            let i = (start + k) % n;
            let request = v1::GetBudgetRequest { path: path.to_owned(), linearizable: false };
            let mut client = LedgerClient::new(self.channel(i));
            let answer = tokio::time::timeout(self.rpc_deadline(), client.get_budget(request))
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")));
            match answer {
                Ok(budget) => return Some(budget.into_inner()),
                Err(s) if s.code() == tonic::Code::NotFound => return None,
                Err(_) => self.drop_channel(i),
            }
        }
        None
    }

    /// Reads the price book from the nearest endpoint that answers; None if none
    /// does.
    pub async fn list_prices(&self) -> Option<v1::ListPricesReply> {
        let n = self.config.endpoints.len();
        let start = self.nearest().unwrap_or_else(|| self.preferred.load(Ordering::Relaxed));
        for k in 0..n {
            let i = (start + k) % n;
            let request = v1::ListPricesRequest { model: String::new(), linearizable: false };
            let mut client = LedgerClient::new(self.channel(i));
            let answer = tokio::time::timeout(self.rpc_deadline(), client.list_prices(request))
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")));
            match answer {
                Ok(reply) => return Some(reply.into_inner()),
                Err(_) => self.drop_channel(i),
            }
        }
        None
    }

    /// Asks every endpoint at once who leads and waits for every answer (each
    /// within the RPC deadline): the round trips for [`Cluster::nearest`], and the
    /// leader preferred from now on, as [`Cluster::discover_leader`] finds it. The
    /// SDK does this when it starts, so its first batch goes straight to the
    /// leader and its reads to the nearest member.
    pub async fn measure(&self) {
        self.ask_who_leads(true).await;
    }

    /// Asks every endpoint at once who leads (each within the RPC deadline), and
    /// prefers that endpoint from now on: the first that says it leads, else the
    /// leader the others name. A stopped or black-holed node costs one RPC deadline
    /// in parallel with the others, not one per node in turn. Each answer's round
    /// trip is noted ([`Cluster::nearest`]); the asks still out when the leader
    /// answers are not waited for.
    pub async fn discover_leader(&self) {
        self.ask_who_leads(false).await;
    }

    /// Every endpoint's `Status` at once: notes each answer's round trip and
    /// failover bound, and prefers the leader (one that says it leads, else the one
    /// the others name). Returns at the first leader unless `all`.
    async fn ask_who_leads(&self, all: bool) {
        let mut asks = tokio::task::JoinSet::new();
        let within = self.rpc_deadline();
        for i in 0..self.config.endpoints.len() {
            let channel = self.channel(i);
            asks.spawn(async move {
                let sent = tokio::time::Instant::now();
                let mut client = ClusterClient::new(channel);
                let status = tokio::time::timeout(
                    within,
                    client.status(v1::StatusRequest { digest: false }),
                )
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
                .map(tonic::Response::into_inner);
                (i, status, sent.elapsed())
            });
        }
        let (mut leader, mut named) = (None, None);
        while let Some(answer) = asks.join_next().await {
            let Ok((i, status, rtt)) = answer else { continue };
            let Ok(status) = status else {
                self.rtt_us[i].store(u64::MAX, Ordering::Relaxed);
                self.drop_channel(i);
                continue;
            };
            let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX - 1);
            self.rtt_us[i].store(us, Ordering::Relaxed);
            self.floor_rtt_us[i].fetch_min(us, Ordering::Relaxed);
            self.note_status(&status);
            // Only a node that sees itself lead is sure; a follower's view may be stale.
            if rpc::is_leader(&status) {
                leader = Some(i);
                if !all {
                    asks.abort_all();
                    break;
                }
            } else if let Some(at) =
                self.config.endpoints.iter().position(|e| *e == status.leader_addr)
            {
                named = Some(at);
            }
        }
        if let Some(at) = leader.or(named) {
            self.preferred.store(at, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_endpoint_list_is_refused() {
        let config = ClusterConfig {
            endpoints: Vec::new(),
            principal: "gw".into(),
            rpc_timeout: Duration::from_secs(1),
            max_attempts: 1,
            round_deadline: Duration::from_secs(1),
            connector: None,
            tls: None,
            token: None,
            client_id: None,
        };
        let err = Cluster::new(config).unwrap_err();
        assert!(matches!(err, ClusterError::NoEndpoints), "{err}");
    }

    #[test]
    fn the_rpc_deadline_grows_with_the_farthest_member_not_the_slowest_answer() {
        let config = ClusterConfig {
            endpoints: vec!["a:1".into(), "b:1".into(), "c:1".into()],
            principal: "gw".into(),
            rpc_timeout: Duration::from_secs(1),
            max_attempts: 6,
            round_deadline: Duration::from_secs(3),
            connector: None,
            tls: None,
            token: None,
            client_id: None,
        };
        let c = Cluster::new(config).unwrap();
        // Nothing measured: the configured deadlines.
        assert_eq!(
            (c.rpc_deadline(), c.round_deadline()),
            (Duration::from_secs(1), Duration::from_secs(3))
        );
        // One region: a millisecond away changes next to nothing.
        c.floor_rtt_us[0].fetch_min(1_000, Ordering::Relaxed);
        assert_eq!(c.rpc_deadline(), Duration::from_millis(1_004));
        assert_eq!(c.round_deadline(), Duration::from_secs(3));
        // A member 300 ms away (one that never answered does not count): four of its
        // round trips more, and a round fits two such attempts.
        c.floor_rtt_us[1].fetch_min(300_000, Ordering::Relaxed);
        assert_eq!(c.rpc_deadline(), Duration::from_millis(2_200));
        assert_eq!(c.round_deadline(), Duration::from_millis(4_400));
        // A slow answer later (load, a fresh connection) does not stretch it: the
        // fastest answer is the member's distance.
        c.floor_rtt_us[1].fetch_min(3_000_000, Ordering::Relaxed);
        assert_eq!(c.rpc_deadline(), Duration::from_millis(2_200));
        // A round trip counts at most 1 s.
        c.floor_rtt_us[2].fetch_min(5_000_000, Ordering::Relaxed);
        assert_eq!(c.rpc_deadline(), Duration::from_secs(5));
    }
}
