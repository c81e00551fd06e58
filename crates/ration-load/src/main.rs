//! `ration-load`: drives acquire, report and release against a Ration cluster and
//! prints operations per second and latency percentiles.
//!
//! By default it starts a 3-node cluster of `rationd` processes on loopback (the
//! `rationd` binary next to this one), in a temporary directory, and stops it after.
//! `--endpoints` targets a running cluster instead.
//!
//! `--wan` puts the started nodes in regions: a user-space proxy
//! (`ration_testkit::proxy`) in front of each node delays every link by its one-way
//! delay (with jitter and loss), this generator included (`c`). `--failovers N`
//! then kills the leader N times and reports how long writes stopped each time.

/// mimalloc: glibc malloc was a fifth of a node's CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use ration_proto::v1::cluster_client::ClusterClient;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_proto::v1::{self, Period};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Parser)]
#[command(name = "ration-load", about = "Drive load against a Ration cluster")]
struct Args {
    /// Target a running cluster (comma-separated host:port); otherwise start --nodes nodes.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The rationd binary to start (default: next to this executable).
    #[arg(long)]
    rationd: Option<PathBuf>,
    /// Nodes to start (without --endpoints): 3 (the default), or 1 for a node alone,
    /// unreplicated, its log synced as in a cluster (like for like with a single
    /// Redis or a single database).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    nodes: u8,
    /// Requests in flight.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// HTTP/2 connections to the leader.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Budgets the load spreads over.
    #[arg(long, default_value_t = 1000)]
    budgets: usize,
    /// Reports per lease between acquire and release.
    #[arg(long, default_value_t = 3)]
    reports: usize,
    /// Instead of raw RPCs: this many SDK gateways in this process, each deciding
    /// calls locally (`try_spend(1)`) as fast as it can while its refill keeps it
    /// stocked. Reports decisions per second and cluster writes per 1,000 decisions.
    #[arg(long, default_value_t = 0)]
    gateways: usize,
    /// With --gateways: decisions per second per gateway (0: as fast as it can).
    /// A paced rate leaves the cores to the nodes, e.g. for --failovers.
    #[arg(long, default_value_t = 0)]
    gateway_rate: u64,
    /// Operations per RPC through the Batch call; 0 sends one operation per RPC.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// With --batch 0: send each operation as one message on a Pipeline call (one
    /// call per connection, shared by its workers) instead of an RPC of its own.
    #[arg(long)]
    pipeline: bool,
    /// With --batch 0: instead of ledger operations, one gRPC health check
    /// (`grpc.health.v1.Health/Check`) per RPC to the leader, through the same
    /// server and layers: no Raft, no ledger. The floor under one operation per RPC
    /// on this machine (this generator's gRPC client included), to set beside it.
    #[arg(long)]
    floor: bool,
    #[arg(long, default_value_t = 3)]
    warmup_s: u64,
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    /// The started nodes' Raft log store: `wal` (the default) or `sled` (the store
    /// before the write-ahead log, which a power cut can undo), to compare them.
    #[arg(long, default_value = "wal")]
    log_store: String,
    /// Prefix of the client ids this run writes under (workers `BASE-N`, budget
    /// setup `BASE-admin`). Default: new each run (`load-<pid>-<time>`), so a second
    /// run against the same cluster is not refused as a replay of the first.
    #[arg(long)]
    client_id_base: Option<String>,
    /// TLS: the CA the nodes' certificates are signed by (with --cert and --key: a
    /// client certificate naming principal `load`, which needs roles operator and
    /// gateway on what it uses, or to be a bootstrap admin).
    #[arg(long)]
    cacert: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// Start the nodes with mutual TLS (a development CA, peers on ports of their
    /// own) and talk TLS to them: with the same flags otherwise, the cost of TLS.
    /// The bootstrap admin makes `load` an operator and a gateway on `*`, so roles
    /// are checked as for any client.
    #[arg(long)]
    tls: bool,
    /// Regions for the started nodes: one-way delay per link, comma-separated
    /// `A-B=DELAY[~JITTER][/LOSS%]` (ms, ms, percent), A and B node ids 1-3 or `c`
    /// (this generator), symmetric; unlisted links have none. For example
    /// `1-2=40,1-3=110,2-3=65,c-2=40,c-3=110` (this generator in node 1's region).
    #[arg(long)]
    wan: Option<String>,
    /// Flags for every started node, space-separated (e.g. `--voter-rtt-ms 260`).
    #[arg(long, allow_hyphen_values = true)]
    node_args: Option<String>,
    /// After the load: SIGKILL the leader this many times (restarting it once
    /// writes resume) and report the time from each kill to the first write
    /// through a survivor. With --gateways, the gateways keep deciding through
    /// the kills and their refusals are reported per kill (the budget is far from
    /// its cap, so every refusal is a failover gap their leases did not cover).
    #[arg(long, default_value_t = 0)]
    failovers: usize,
}

impl Args {
    fn client_id(&self, who: &str) -> String {
        format!("{}-{who}", self.client_id_base.as_deref().unwrap_or("load"))
    }
}

struct Nodes {
    children: Vec<Option<Child>>,
    /// How to start each node again.
    commands: Vec<(PathBuf, Vec<String>)>,
    /// The proxies in front of the nodes, with `--wan`.
    faults: Option<Arc<ration_testkit::proxy::Faults>>,
    _dir: tempfile::TempDir,
}

impl Nodes {
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let (bin, args) = &self.commands[i];
        let child = Command::new(bin)
            .args(args)
            .env("RATION_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        if let Some(f) = &self.faults {
            f.set_pid(i, Some(child.id()));
        }
        self.children[i] = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(f) = &self.faults {
            f.set_pid(i, None);
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Started nodes: their gRPC endpoints (what clients and peers use), and where
/// each serves `/metrics`.
type Started = (Nodes, Vec<String>, Vec<SocketAddr>);

/// `--wan`: (source, destination, link) with nodes 0-2 and the client 3.
fn parse_wan(spec: &str) -> anyhow::Result<Vec<(usize, usize, ration_testkit::proxy::Link)>> {
    let end = |t: &str| -> anyhow::Result<usize> {
        match t.trim() {
            "c" => Ok(3),
            n => match n.parse::<usize>() {
                Ok(id @ 1..=3) => Ok(id - 1),
                _ => bail!("--wan: {n:?} is not a node id 1-3 or c"),
            },
        }
    };
    let mut links = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (pair, link) =
            part.split_once('=').with_context(|| format!("--wan: {part:?} is not A-B=LINK"))?;
        let (a, b) = pair.split_once('-').with_context(|| format!("--wan: {pair:?} is not A-B"))?;
        let (a, b) = (end(a)?, end(b)?);
        if a == b {
            bail!("--wan: {pair:?} links a node to itself");
        }
        let link = ration_testkit::proxy::Link::parse(link)
            .map_err(|e| anyhow::anyhow!("--wan {pair}: {e}"))?;
        links.push((a, b, link));
        links.push((b, a, link));
    }
    Ok(links)
}

async fn start_nodes(rationd: PathBuf, args: &Args) -> anyhow::Result<Started> {
    let tls = args.tls;
    let dir = tempfile::tempdir()?;
    let n = usize::from(args.nodes);
    // Hold every listener until all ports are chosen, so none repeats.
    let listeners: Vec<std::net::TcpListener> =
        (0..3 * n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let ports: Vec<SocketAddr> =
        listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    drop(listeners);
    let (addrs, rest) = ports.split_at(n);
    let (metrics, peers) = rest.split_at(n);
    let faults = match &args.wan {
        Some(spec) => {
            let links = parse_wan(spec)?;
            let faults = ration_testkit::proxy::Faults::start(addrs.to_vec()).await;
            for (src, dst, link) in links {
                // Both halves of a connection into dst pay its link's delay; the
                // client's links are by destination only (index 3 = the client).
                if dst < 3 {
                    faults.set(src, dst, ration_testkit::proxy::Fault::Wan(link));
                }
            }
            Some(faults)
        }
        None => None,
    };
    // Clients and peers use the proxies, when there are any.
    let advertised: Vec<SocketAddr> = match &faults {
        Some(f) => f.addrs.clone(),
        None => addrs.to_vec(),
    };
    // With TLS, peers get ports of their own (required), and the cluster lists them.
    let members = if tls { peers } else { &advertised[..] };
    let cluster = members
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let certs = if tls {
        let set = ration_tls::dev::write_set(
            &dir.path().join("certs"),
            &[1, 2, 3],
            &["127.0.0.1".into()],
            &["load".into(), "admin".into()],
        )
        .map_err(|e| anyhow::anyhow!("making certificates: {e}"))?;
        let _ = TLS.set(Some(ration_tls::ClientTls::from_files(&set.principals[0].1)?));
        let _ = ADMIN_TLS.set(ration_tls::ClientTls::from_files(&set.principals[1].1)?);
        Some(set)
    } else {
        None
    };
    let extra: Vec<String> =
        args.node_args.as_deref().unwrap_or("").split_whitespace().map(str::to_owned).collect();
    let mut commands = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let data = dir.path().join(format!("node-{}", i + 1));
        let mut cmd: Vec<String> = vec![
            "--node-id".into(),
            (i + 1).to_string(),
            "--listen".into(),
            a.to_string(),
            "--data-dir".into(),
            data.to_string_lossy().into_owned(),
            "--initial-cluster".into(),
            cluster.clone(),
            "--metrics-listen".into(),
            metrics[i].to_string(),
            "--log-store".into(),
            args.log_store.clone(),
        ];
        if faults.is_some() {
            cmd.extend(["--advertise".into(), advertised[i].to_string()]);
        }
        if let Some(set) = &certs {
            let f = &set.nodes[i].1;
            cmd.extend(["--peer-listen".into(), peers[i].to_string()]);
            for (flag, path) in
                [("--tls-ca", &f.ca), ("--tls-cert", &f.cert), ("--tls-key", &f.key)]
            {
                cmd.extend([flag.into(), path.to_string_lossy().into_owned()]);
            }
        }
        cmd.extend(extra.iter().cloned());
        commands.push((rationd.clone(), cmd));
    }
    let mut nodes = Nodes { children: (0..n).map(|_| None).collect(), commands, faults, _dir: dir };
    for i in 0..n {
        nodes.spawn(i)?;
    }
    Ok((nodes, advertised.iter().map(|a| a.to_string()).collect(), metrics.to_vec()))
}

/// One counter from a node's `/metrics` (plain HTTP/1.0; None if absent).
fn scrape(at: SocketAddr, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&at, Duration::from_secs(2)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// TLS for every channel this run makes (set once from the flags).
static TLS: std::sync::OnceLock<Option<ration_tls::ClientTls>> = std::sync::OnceLock::new();
/// With `--tls`: the bootstrap admin's certificate, to grant `load` its roles.
static ADMIN_TLS: std::sync::OnceLock<ration_tls::ClientTls> = std::sync::OnceLock::new();

/// With `--tls`, roles are checked: the bootstrap admin makes `load` an operator
/// and a gateway on `*`, so the run pays for the checks a real gateway does.
async fn grant_load_roles(leader: &str) -> anyhow::Result<()> {
    let Some(tls) = ADMIN_TLS.get() else { return Ok(()) };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{leader}"))?
        .timeout(Duration::from_secs(5));
    let mut admin = LedgerClient::new(
        endpoint.connect_with_connector_lazy(ration_tls::Connector::new(tls.clone())),
    );
    for (i, role) in ["operator", "gateway"].into_iter().enumerate() {
        admin
            .grant_role(v1::RoleRequest {
                meta: Some(v1::RequestMeta {
                    client_id: format!("ration-load-admin-{}", std::process::id()),
                    request_id: i as u64 + 1,
                    principal: "admin".into(),
                    ..Default::default()
                }),
                subject: "load".into(),
                role: role.into(),
                scope: "*".into(),
            })
            .await
            .with_context(|| format!("granting load the role {role}"))?;
    }
    Ok(())
}

fn channel(addr: &str) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(match TLS.get().and_then(Option::as_ref) {
        Some(tls) => endpoint.connect_with_connector_lazy(ration_tls::Connector::new(tls.clone())),
        None => endpoint.connect_lazy(),
    })
}

async fn find_leader(endpoints: &[String]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for e in endpoints {
            if let Ok(s) =
                ClusterClient::new(channel(e)?).status(v1::StatusRequest { digest: false }).await
            {
                let s = s.into_inner();
                if ration_proto::rpc::is_leader(&s) {
                    return Ok(s.addr);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no leader among {endpoints:?} within 30 s")
}

fn meta(client: &str, request_id: u64) -> Option<v1::RequestMeta> {
    Some(v1::RequestMeta {
        client_id: client.into(),
        request_id,
        principal: "load".into(),
        ..Default::default()
    })
}

fn lifetime(cap: i64) -> Vec<v1::Limit> {
    vec![v1::Limit {
        unit: "tokens".into(),
        cap,
        window: Some(v1::Window { period: Period::Lifetime as i32, offset_minutes: 0 }),
        static_allowance: None,
    }]
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    errors: AtomicU64,
    /// Why operations failed: (code, message with numbers as N) -> count, at most
    /// [`MAX_REASONS`] distinct ones (the rest under "other").
    reasons: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Most distinct failure reasons kept.
const MAX_REASONS: usize = 16;

impl Counters {
    /// One operation begun at `started`, with its latency and any failure
    /// counted while the run is `recording` (after the warm-up).
    fn timed(
        &self,
        recording: &AtomicBool,
        hist: &mut Histogram<u64>,
        started: Instant,
        err: Option<&tonic::Status>,
    ) {
        if recording.load(Ordering::Relaxed) {
            let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
            self.ops.fetch_add(1, Ordering::Relaxed);
            if let Some(e) = err {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.failed(&format!("{:?}", e.code()), e.message());
            }
        }
    }

    /// Counts one failed operation under its reason.
    fn failed(&self, code: &str, message: &str) {
        let mut why = format!("{code}: ");
        let mut in_number = false;
        for c in message.chars().take(160) {
            if c.is_ascii_digit() {
                if !in_number {
                    why.push('N');
                }
                in_number = true;
            } else {
                in_number = false;
                why.push(c);
            }
        }
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        let key = if reasons.contains_key(&why) || reasons.len() < MAX_REASONS {
            why
        } else {
            "other".to_owned()
        };
        *reasons.entry(key).or_insert(0) += 1;
    }

    /// The most frequent failure reasons, most frequent first.
    fn top_reasons(&self, n: usize) -> Vec<(String, u64)> {
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<(String, u64)> = reasons.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// How a single-operation worker sends each operation: an RPC of its own, or a
/// message on a shared Pipeline call.
#[derive(Clone)]
enum OneOp {
    Unary(LedgerClient<Channel>),
    Pipelined(Arc<Pipe>),
}

impl OneOp {
    async fn run(
        &mut self,
        op: v1::batch_op::Op,
    ) -> Result<v1::batch_result::Result, tonic::Status> {
        use v1::batch_op::Op;
        use v1::batch_result::Result as R;
        match self {
            Self::Unary(client) => match op {
                Op::Acquire(a) => client.acquire(a).await.map(|r| R::Lease(r.into_inner())),
                Op::Report(r) => client.report(r).await.map(|r| R::Report(r.into_inner())),
                Op::Release(r) => client.release(r).await.map(|r| R::Release(r.into_inner())),
                other => Err(tonic::Status::unimplemented(format!("not sent alone: {other:?}"))),
            },
            Self::Pipelined(pipe) => match pipe.run(op).await? {
                R::Error(e) => Err(tonic::Status::new(tonic::Code::from_i32(e.code), e.message)),
                other => Ok(other),
            },
        }
    }
}

/// One Pipeline call shared by many workers: each operation gets a tag, and the
/// reader hands each result to the worker waiting on its tag.
struct Pipe {
    send: tokio::sync::mpsc::Sender<v1::PipelineOp>,
    waiting: std::sync::Mutex<
        std::collections::HashMap<u64, tokio::sync::oneshot::Sender<v1::batch_result::Result>>,
    >,
    next_tag: AtomicU64,
}

impl Pipe {
    async fn open(mut client: LedgerClient<Channel>) -> anyhow::Result<Arc<Pipe>> {
        let (send, ops) = tokio::sync::mpsc::channel(1024);
        let pipe =
            Arc::new(Pipe { send, waiting: Default::default(), next_tag: AtomicU64::new(0) });
        let ops = tokio_stream::wrappers::ReceiverStream::new(ops);
        let mut results = client.pipeline(ops).await?.into_inner();
        let reader = Arc::downgrade(&pipe);
        tokio::spawn(async move {
            // Until the call ends; then the workers waiting get an error (their
            // senders are dropped with the map).
            while let Ok(Some(r)) = results.message().await {
                let Some(pipe) = reader.upgrade() else { return };
                let waiter = pipe.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.tag);
                if let (Some(w), Some(result)) = (waiter, r.result.and_then(|x| x.result)) {
                    let _ = w.send(result);
                }
            }
            if let Some(pipe) = reader.upgrade() {
                pipe.waiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        });
        Ok(pipe)
    }

    async fn run(&self, op: v1::batch_op::Op) -> Result<v1::batch_result::Result, tonic::Status> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(tag, tx);
        let op = v1::PipelineOp { tag, op: Some(v1::BatchOp { op: Some(op) }) };
        if self.send.send(op).await.is_err() {
            self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&tag);
            return Err(tonic::Status::unavailable("the pipeline call ended"));
        }
        rx.await.map_err(|_| tonic::Status::unavailable("the pipeline call ended unanswered"))
    }
}

/// `--floor`: health checks, one per RPC, timed as operations.
async fn floor_worker(
    mut health: HealthClient<Channel>,
    recording: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Histogram<u64> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = health.check(HealthCheckRequest { service: String::new() }).await;
        counters.timed(&recording, &mut hist, t, r.as_ref().err());
    }
    hist
}

async fn worker(
    worker_id: usize,
    mut client: OneOp,
    args: Arc<Args>,
    recording: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Histogram<u64> {
    use v1::batch_op::Op;
    use v1::batch_result::Result as R;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let client_id = args.client_id(&worker_id.to_string());
    let mut request_id = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (worker_id as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let timed = |hist: &mut Histogram<u64>, started: Instant, err: Option<&tonic::Status>| {
        counters.timed(&recording, hist, started, err)
    };
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let budget = format!("load/k{}", rng as usize % args.budgets);
        request_id += 1;
        let t = Instant::now();
        let acquired = client
            .run(Op::Acquire(v1::AcquireRequest {
                meta: meta(&client_id, request_id),
                budget,
                unit: "tokens".into(),
                wanted: 1000,
                min: 1,
                ttl_ms: 60_000,
                starts_at_ms: 0,
            }))
            .await;
        timed(&mut hist, t, acquired.as_ref().err());
        let lease_id = match acquired {
            Ok(R::Lease(lease)) => lease.lease_id,
            _ => continue,
        };
        for _ in 0..args.reports {
            request_id += 1;
            let t = Instant::now();
            let r = client
                .run(Op::Report(v1::ReportRequest {
                    meta: meta(&client_id, request_id),
                    lease_id,
                    consumed_delta: 1,
                    renew_ttl_ms: None,
                }))
                .await;
            timed(&mut hist, t, r.as_ref().err());
        }
        request_id += 1;
        let t = Instant::now();
        let r = client
            .run(Op::Release(v1::ReleaseRequest {
                meta: meta(&client_id, request_id),
                lease_id,
                consumed_total: args.reports as i64,
            }))
            .await;
        timed(&mut hist, t, r.as_ref().err());
    }
    hist
}

/// Each round: a batch of acquires on random budgets, `reports` batches of reports
/// on those leases, a batch of releases. Latency is per RPC; ops count operations.
async fn batch_worker(
    worker_id: usize,
    mut client: LedgerClient<Channel>,
    args: Arc<Args>,
    recording: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Histogram<u64> {
    use v1::batch_op::Op;
    use v1::batch_result::Result as R;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let client_id = args.client_id(&worker_id.to_string());
    let mut request_id = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (worker_id as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let send = |ops: Vec<Op>, client: &mut LedgerClient<Channel>| {
        let n = ops.len() as u64;
        let req = v1::BatchRequest {
            ops: ops.into_iter().map(|op| v1::BatchOp { op: Some(op) }).collect(),
        };
        let mut c = client.clone();
        let recording = recording.clone();
        let counters = counters.clone();
        async move {
            let t = Instant::now();
            let r = c.batch(req).await;
            let elapsed = t.elapsed();
            let whole =
                r.as_ref().err().map(|e| (format!("{:?}", e.code()), e.message().to_owned()));
            let results = r.map(|r| r.into_inner().results).unwrap_or_default();
            if recording.load(Ordering::Relaxed) {
                counters.ops.fetch_add(n, Ordering::Relaxed);
                let bad =
                    results.iter().filter(|x| matches!(x.result, Some(R::Error(_)) | None)).count()
                        as u64;
                counters
                    .errors
                    .fetch_add(bad + n.saturating_sub(results.len() as u64), Ordering::Relaxed);
                for x in &results {
                    if let Some(R::Error(e)) = &x.result {
                        let code = tonic::Code::from_i32(e.code);
                        counters.failed(&format!("{code:?}"), &e.message);
                    }
                }
                if let Some((code, message)) = &whole {
                    counters.failed(code, &format!("whole Batch: {message}"));
                }
            }
            (elapsed, results)
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let acquires: Vec<Op> = (0..args.batch)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                request_id += 1;
                Op::Acquire(v1::AcquireRequest {
                    meta: meta(&client_id, request_id),
                    budget: format!("load/k{}", rng as usize % args.budgets),
                    unit: "tokens".into(),
                    wanted: 1000,
                    min: 1,
                    ttl_ms: 60_000,
                    starts_at_ms: 0,
                })
            })
            .collect();
        let (elapsed, results) = send(acquires, &mut client).await;
        record(&mut hist, &recording, elapsed);
        let leases: Vec<u64> = results
            .iter()
            .filter_map(|r| if let Some(R::Lease(l)) = &r.result { Some(l.lease_id) } else { None })
            .collect();
        for _ in 0..args.reports {
            let ops = leases
                .iter()
                .map(|&lease_id| {
                    request_id += 1;
                    Op::Report(v1::ReportRequest {
                        meta: meta(&client_id, request_id),
                        lease_id,
                        consumed_delta: 1,
                        renew_ttl_ms: None,
                    })
                })
                .collect();
            let (elapsed, _) = send(ops, &mut client).await;
            record(&mut hist, &recording, elapsed);
        }
        let ops = leases
            .iter()
            .map(|&lease_id| {
                request_id += 1;
                Op::Release(v1::ReleaseRequest {
                    meta: meta(&client_id, request_id),
                    lease_id,
                    consumed_total: args.reports as i64,
                })
            })
            .collect();
        let (elapsed, _) = send(ops, &mut client).await;
        record(&mut hist, &recording, elapsed);
    }
    hist
}

fn record(hist: &mut Histogram<u64>, recording: &AtomicBool, elapsed: Duration) {
    if recording.load(Ordering::Relaxed) {
        let _ = hist.record(elapsed.as_micros().max(1) as u64);
    }
}

/// SDK gateways deciding in this process, and what they decided.
struct GatewayLoad {
    sdks: Vec<Arc<ration_client::Sdk>>,
    stop: Arc<AtomicBool>,
    recording: Arc<AtomicBool>,
    decisions: Arc<AtomicU64>,
    admitted: Arc<AtomicU64>,
    /// Refusals since the start, recording or not, and when they happened.
    refused: Arc<Refusals>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Each gateway's handle and clock, to read what it holds.
    handles: Vec<ration_client::Handle>,
    clock: Arc<ration_client::CoarseClock>,
}

impl GatewayLoad {
    /// What the gateways hold now, in seconds of spend at `rate` decisions/s each:
    /// (least, median, most).
    fn held_s(&self, rate: u64) -> (f64, f64, f64) {
        use ration_client::local::LocalClock;
        let now = self.clock.now_ms();
        let mut held: Vec<u64> =
            self.handles.iter().map(|h| h.allowance().available(now)).collect();
        held.sort_unstable();
        let s = |u: u64| u as f64 / rate.max(1) as f64;
        match (held.first(), held.last()) {
            (Some(a), Some(b)) => (s(*a), s(held[held.len() / 2]), s(*b)),
            _ => (0.0, 0.0, 0.0),
        }
    }
}

/// The gateways' refusals: how many, and the first and last time one happened
/// (ms since `base`; `u64::MAX` and 0 when none since the last `reset`).
struct Refusals {
    count: AtomicU64,
    base: Instant,
    first_ms: AtomicU64,
    last_ms: AtomicU64,
}

impl Refusals {
    fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            base: Instant::now(),
            first_ms: AtomicU64::new(u64::MAX),
            last_ms: AtomicU64::new(0),
        }
    }

    fn add(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        let at = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.first_ms.fetch_min(at, Ordering::Relaxed);
        self.last_ms.fetch_max(at, Ordering::Relaxed);
    }

    /// Forgets when refusals happened; returns the count so far.
    fn reset(&self) -> u64 {
        self.first_ms.store(u64::MAX, Ordering::Relaxed);
        self.last_ms.store(0, Ordering::Relaxed);
        self.count.load(Ordering::Relaxed)
    }

    /// (first, last) refusal since the last reset, relative to `since`.
    fn span(&self, since: Instant) -> Option<(Duration, Duration)> {
        let first = self.first_ms.load(Ordering::Relaxed);
        if first == u64::MAX {
            return None;
        }
        let at = |ms: u64| (self.base + Duration::from_millis(ms)).saturating_duration_since(since);
        Some((at(first), at(self.last_ms.load(Ordering::Relaxed))))
    }
}

/// Starts `args.gateways` SDK gateways with default settings, each deciding calls
/// of one unit on budget `sdk` (a cap no run reaches) at `args.gateway_rate`.
async fn start_gateways(
    args: &Args,
    endpoints: &[String],
    leader: &str,
) -> anyhow::Result<GatewayLoad> {
    use ration_client::{CoarseClock, Sdk, SdkConfig};
    let mut admin = LedgerClient::new(channel(leader)?);
    match admin
        .create_budget(v1::CreateBudgetRequest {
            meta: meta(&args.client_id("admin"), 1),
            path: "sdk".into(),
            limits: lifetime(1_000_000_000_000_000),
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => return Err(s.into()),
    }
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdks: Vec<Arc<Sdk>> = (0..args.gateways)
        .map(|i| {
            // With TLS every gateway here is the one principal the certificate names.
            let tls = TLS.get().cloned().flatten();
            let who = if tls.is_some() { "load".to_owned() } else { format!("gw-{i}") };
            let mut config = SdkConfig::new(endpoints.to_vec(), who);
            config.cluster.tls = tls;
            Sdk::start(config, clock.clone())
        })
        .collect::<Result<_, _>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let recording = Arc::new(AtomicBool::new(false));
    let decisions = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(Refusals::new());
    // Paced: this many decisions every 10 ms.
    let per_tick = args.gateway_rate.div_ceil(100);
    let handles: Vec<ration_client::Handle> =
        sdks.iter().map(|sdk| sdk.handle("sdk", "tokens")).collect();
    let tasks = handles
        .iter()
        .map(|h| {
            let h = h.clone();
            let (stop, recording, decisions, admitted, refused) = (
                stop.clone(),
                recording.clone(),
                decisions.clone(),
                admitted.clone(),
                refused.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while !stop.load(Ordering::Relaxed) {
                    let n = if per_tick > 0 { per_tick } else { 1024 };
                    let (mut d, mut a) = (0u64, 0u64);
                    for _ in 0..n {
                        d += 1;
                        a += u64::from(h.try_spend(1));
                    }
                    refused.add(d - a);
                    if recording.load(Ordering::Relaxed) {
                        decisions.fetch_add(d, Ordering::Relaxed);
                        admitted.fetch_add(a, Ordering::Relaxed);
                    }
                    if per_tick > 0 {
                        tick.tick().await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    Ok(GatewayLoad { sdks, stop, recording, decisions, admitted, refused, tasks, handles, clock })
}

/// End to end: SDK gateways decide locally and lease from the cluster.
async fn sdk_load(args: &Args, load: &GatewayLoad) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;
    let ops_before: u64 = load.sdks.iter().map(|s| s.ops_sent()).sum();
    let refused_before = load.refused.count.load(Ordering::Relaxed);
    load.recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
    load.recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let ops: u64 = load.sdks.iter().map(|s| s.ops_sent()).sum::<u64>() - ops_before;
    let refused = load.refused.count.load(Ordering::Relaxed) - refused_before;
    let (d, a) = (load.decisions.load(Ordering::Relaxed), load.admitted.load(Ordering::Relaxed));
    println!(
        "{} gateways: {:.0} decisions/s ({:.0} admitted/s, {:.2}% admitted, {refused} refused); cluster writes {} ({:.4} per 1,000 decisions)",
        args.gateways,
        d as f64 / elapsed,
        a as f64 / elapsed,
        100.0 * a as f64 / d.max(1) as f64,
        ops,
        1000.0 * ops as f64 / d.max(1) as f64
    );
    if let Some(sdk) = load.sdks.first() {
        println!(
            "gateway leases: horizon {:?}, validity {:?} (the cluster's failover bound: {:?})",
            sdk.horizon(),
            sdk.lease_ttl(),
            sdk.cluster().failover_bound()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.client_id_base.is_none() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        args.client_id_base = Some(format!("load-{:x}-{nanos:x}", std::process::id()));
    }
    let tls = match (&args.cacert, &args.cert, &args.key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => {
            Some(ration_tls::ClientTls::from_files(&ration_tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })?)
        }
        _ => bail!("give --cacert, --cert and --key together"),
    };
    if args.tls && (tls.is_some() || !args.endpoints.is_empty()) {
        bail!("--tls starts nodes with their own certificates: not with --endpoints or --cacert");
    }
    if !args.tls {
        let _ = TLS.set(tls);
    }
    if (args.wan.is_some() || args.failovers > 0 || args.node_args.is_some())
        && !args.endpoints.is_empty()
    {
        bail!("--wan, --node-args and --failovers start the nodes: not with --endpoints");
    }
    if args.wan.is_some() && args.tls {
        bail!("--wan proxies the nodes' one port: not with --tls (peers on ports of their own)");
    }
    if args.nodes == 2 {
        bail!("--nodes is 3 (a cluster) or 1 (a node alone), not 2");
    }
    if args.nodes != 3 && (args.wan.is_some() || args.failovers > 0 || !args.endpoints.is_empty()) {
        bail!("--nodes 1 starts a node alone: not with --wan, --failovers or --endpoints");
    }
    if args.floor && (args.batch > 0 || args.pipeline || args.gateways > 0) {
        bail!(
            "--floor sends health checks one per RPC: not with --batch, --pipeline or --gateways"
        );
    }
    if args.pipeline && args.batch > 0 {
        bail!("--pipeline sends one operation per message: not with --batch");
    }
    let args = Arc::new(args);
    let (mut _nodes, endpoints) = if args.endpoints.is_empty() {
        let rationd = match &args.rationd {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("rationd"),
        };
        let (nodes, eps, metrics) = start_nodes(rationd, &args).await?;
        if let Some(spec) = &args.wan {
            println!("regions (one-way delay per link, both ways): {spec}");
        }
        (Some((nodes, metrics)), eps)
    } else {
        (None, args.endpoints.clone())
    };
    // The leader's /metrics, when this run started the nodes.
    let leader_metrics = |leader: &str| -> Option<SocketAddr> {
        let (_, metrics) = _nodes.as_ref()?;
        Some(metrics[endpoints.iter().position(|e| e == leader)?])
    };
    let leader = find_leader(&endpoints).await?;
    println!("cluster: {endpoints:?}, leader {leader}");
    grant_load_roles(&leader).await?;
    if args.gateways > 0 {
        let load = start_gateways(&args, &endpoints, &leader).await?;
        sdk_load(&args, &load).await?;
        if args.failovers > 0 {
            if let Some((nodes, _)) = _nodes.as_mut() {
                let attempt = failover_attempt(&args)?;
                let gateways = Some((&load, args.gateway_rate));
                failovers(nodes, &endpoints, args.failovers, attempt, "sdk", gateways).await?;
            }
        }
        load.stop.store(true, Ordering::Relaxed);
        for t in load.tasks {
            t.await?;
        }
        return Ok(());
    }
    let mut admin = LedgerClient::new(channel(&leader)?);
    let admin_id = args.client_id("admin");
    let create = |rid: u64, path: String, cap: i64| v1::CreateBudgetRequest {
        meta: meta(&admin_id, rid),
        path,
        limits: lifetime(cap),
    };
    // A budget left by an earlier run against the same cluster is used as it is.
    let mut existed = 0usize;
    let made = |r: Result<tonic::Response<v1::BudgetChanged>, tonic::Status>| match r {
        Ok(_) => Ok(0),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(1),
        Err(s) => Err(s),
    };
    existed += made(admin.create_budget(create(1, "load".into(), 1_000_000_000_000_000)).await)?;
    // The children 64 at a time: one after another costs a round trip each, which
    // between regions is minutes for a thousand budgets.
    let mut next = 0usize;
    while next < args.budgets {
        let mut set = tokio::task::JoinSet::new();
        for i in next..(next + 64).min(args.budgets) {
            let mut c = admin.clone();
            let req = create(i as u64 + 2, format!("load/k{i}"), 1_000_000_000_000);
            set.spawn(async move { c.create_budget(req).await });
        }
        next = (next + 64).min(args.budgets);
        while let Some(r) = set.join_next().await {
            existed += made(r?)?;
        }
    }
    if existed > 0 {
        println!("{existed} budgets existed already (an earlier run); used as they are");
    }
    println!("client ids: {}-*", args.client_id_base.as_deref().unwrap_or("load"));

    let channels: Vec<Channel> =
        (0..args.connections.max(1)).map(|_| channel(&leader)).collect::<Result<_, _>>()?;
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    // With --pipeline, one Pipeline call per connection, shared by its workers.
    let mut pipes = Vec::new();
    if args.pipeline {
        for c in &channels {
            pipes.push(Pipe::open(LedgerClient::new(c.clone())).await?);
        }
    }
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let client = LedgerClient::new(channels[w % channels.len()].clone());
            let (a, r, s, c) = (args.clone(), recording.clone(), stop.clone(), counters.clone());
            if args.floor {
                let health = HealthClient::new(channels[w % channels.len()].clone());
                tokio::spawn(floor_worker(health, r, s, c))
            } else if args.batch > 0 {
                tokio::spawn(batch_worker(w, client, a, r, s, c))
            } else if args.pipeline {
                let one = OneOp::Pipelined(pipes[w % pipes.len()].clone());
                tokio::spawn(worker(w, one, a, r, s, c))
            } else {
                tokio::spawn(worker(w, OneOp::Unary(client), a, r, s, c))
            }
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;
    recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let status_before = ClusterClient::new(channel(&leader)?)
        .status(v1::StatusRequest { digest: false })
        .await?
        .into_inner();
    let syncs_before = leader_metrics(&leader).and_then(|m| scrape(m, "ration_wal_syncs_total"));
    tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
    recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let status_after = ClusterClient::new(channel(&leader)?)
        .status(v1::StatusRequest { digest: false })
        .await?
        .into_inner();
    let syncs_after = leader_metrics(&leader).and_then(|m| scrape(m, "ration_wal_syncs_total"));
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for w in workers {
        hist.add(w.await?)?;
    }
    let ops = counters.ops.load(Ordering::Relaxed);
    let entries = status_after.applied_index.saturating_sub(status_before.applied_index);
    let per = if args.batch > 0 {
        format!("per RPC of up to {} ops", args.batch)
    } else if args.pipeline {
        format!("per op (one op per message on {} Pipeline calls)", pipes.len())
    } else if args.floor {
        "per health check (one per RPC, no ledger work)".into()
    } else {
        "per op (one op per RPC)".into()
    };
    println!(
        "{} ops in {:.1} s: {:.0} ops/s; latency {per}: p50 {} us, p99 {} us, max {} us; {} errors",
        ops,
        elapsed,
        ops as f64 / elapsed,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max(),
        counters.errors.load(Ordering::Relaxed)
    );
    for (why, n) in counters.top_reasons(5) {
        println!("  {n} failed: {why}");
    }
    println!(
        "raft entries applied: {entries} ({:.0}/s), {:.1} commands per entry",
        entries as f64 / elapsed,
        ops as f64 / entries.max(1) as f64
    );
    match (syncs_before, syncs_after) {
        (Some(b), Some(a)) => {
            let syncs = a - b;
            println!(
                "log store {}: leader fdatasyncs {syncs:.0} ({:.0}/s), {:.1} commands per sync",
                args.log_store,
                syncs / elapsed,
                ops as f64 / syncs.max(1.0)
            );
        }
        _ => println!("log store {}: no write-ahead log counters", args.log_store),
    }
    // The ledger's own figures for the root of every budget this run used: what is
    // consumed and leased never exceeds the cap.
    // A leader change under the load (a starved heartbeat on a saturated machine)
    // leaves a moment with no leader: the read is retried for up to 10 s.
    let mut tries = 0;
    let root = loop {
        let read = v1::GetBudgetRequest { path: "load".into(), linearizable: true };
        match admin.get_budget(read).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && tries < 40 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => return Err(s.into()),
        }
    };
    for l in &root.limits {
        let cap = l.limit.as_ref().map_or(0, |x| x.cap);
        if l.consumed.saturating_add(l.outstanding) > cap {
            bail!(
                "OVERSHOT: load holds {} consumed + {} outstanding, cap {cap}",
                l.consumed,
                l.outstanding
            );
        }
        println!(
            "cap held: load has {} consumed + {} outstanding, cap {cap} (the ledger's figures)",
            l.consumed, l.outstanding
        );
    }
    if args.failovers > 0 {
        if let Some((nodes, _)) = _nodes.as_mut() {
            let attempt = failover_attempt(&args)?;
            failovers(nodes, &endpoints, args.failovers, attempt, "load", None).await?;
        }
    }
    Ok(())
}

/// The deadline of one probe write during a failover: half a second, plus two
/// round trips on the slowest link.
fn failover_attempt(args: &Args) -> anyhow::Result<Duration> {
    let slowest = match &args.wan {
        Some(spec) => {
            parse_wan(spec)?.iter().map(|(_, _, l)| l.delay + l.jitter).max().unwrap_or_default()
        }
        None => Duration::ZERO,
    };
    Ok(Duration::from_millis(500) + slowest * 4)
}

/// SIGKILLs the leader `n` times; each time, the time from the kill to the first
/// write (an acquire on `budget`) through a survivor, probed every 20 ms from this process
/// (so at its distance from the nodes; each attempt has `attempt`, then the next
/// survivor is tried). The node is restarted once writes resume
/// and given 3 s to catch up before the next kill. With `gateways` (and their
/// paced rate), the refusals from each kill to the end of its 3 s are reported
/// too, and what they held at the kill.
async fn failovers(
    nodes: &mut Nodes,
    endpoints: &[String],
    n: usize,
    attempt: Duration,
    budget: &str,
    gateways: Option<(&GatewayLoad, u64)>,
) -> anyhow::Result<()> {
    let refused = gateways.map(|(g, _)| &*g.refused);
    let mut gaps = Vec::new();
    let mut refusals = Vec::new();
    let mut rid = 1u64 << 40;
    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.parse()).collect::<Result<_, _>>()?;
    for round in 0..n {
        // The leader every node agrees on (a restarted node may not know yet).
        let id = ration_testkit::leader(&addrs).await;
        let victim = usize::try_from(id)?.checked_sub(1).context("leader id 0")?;
        let leader = &endpoints[victim];
        let survivors: Vec<&String> = endpoints.iter().filter(|e| *e != leader).collect();
        let refused_before = refused.map(Refusals::reset);
        // What the gateways hold as the leader dies (with a paced rate).
        let held = match gateways {
            Some((g, rate)) if rate > 0 => {
                let (least, median, most) = g.held_s(rate);
                format!("; they held {least:.1} / {median:.1} / {most:.1} s of spend at the kill (least / median / most)")
            }
            _ => String::new(),
        };
        let killed = Instant::now();
        nodes.kill(victim);
        let mut at = 0usize;
        let gap = loop {
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("failover {round}: no write through a survivor for 60 s");
            }
            rid += 1;
            let target = survivors[at % survivors.len()];
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
                .timeout(attempt)
                .connect_lazy();
            let r = LedgerClient::new(ch)
                .acquire(v1::AcquireRequest {
                    meta: meta("load-failover-probe", rid),
                    budget: budget.into(),
                    unit: "tokens".into(),
                    wanted: 1,
                    min: 1,
                    ttl_ms: 1000,
                    starts_at_ms: 0,
                })
                .await;
            match r {
                Ok(_) => break killed.elapsed(),
                Err(_) => at += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        gaps.push(gap.as_millis());
        nodes.spawn(victim)?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        match (refused, refused_before) {
            (Some(r), Some(before)) => {
                let n = r.count.load(Ordering::Relaxed) - before;
                refusals.push(n);
                let when = match r.span(killed) {
                    Some((a, b)) => {
                        format!(" (from {} to {} ms after it)", a.as_millis(), b.as_millis())
                    }
                    None => String::new(),
                };
                println!(
                    "failover {}: first write {} ms after the SIGKILL; gateways refused {n} calls{when}{held}",
                    round + 1,
                    gap.as_millis()
                );
            }
            _ => println!(
                "failover {}: first write {} ms after the SIGKILL",
                round + 1,
                gap.as_millis()
            ),
        }
    }
    gaps.sort_unstable();
    let pct = |p: usize| gaps[(gaps.len() * p / 100).min(gaps.len() - 1)];
    println!(
        "failover: {} kills, kill to first write p50 {} ms, p90 {} ms, max {} ms",
        gaps.len(),
        pct(50),
        pct(90),
        gaps.last().copied().unwrap_or(0)
    );
    if refused.is_some() {
        println!(
            "failover: gateways refused {} calls in all ({} of {} kills had any)",
            refusals.iter().sum::<u64>(),
            refusals.iter().filter(|r| **r > 0).count(),
            refusals.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod reason_tests {
    use super::Counters;

    #[test]
    fn failures_are_counted_by_reason_with_numbers_folded() {
        let c = Counters::default();
        c.failed(
            "ResourceExhausted",
            "budget load/k1 is exhausted: 0 available, at least 1 wanted",
        );
        c.failed(
            "ResourceExhausted",
            "budget load/k22 is exhausted: 0 available, at least 1 wanted",
        );
        c.failed("InvalidArgument", "request 7 of client c was already used");
        let top = c.top_reasons(5);
        assert_eq!(
            top[0],
            (
                "ResourceExhausted: budget load/kN is exhausted: N available, at least N wanted"
                    .to_owned(),
                2
            )
        );
        assert_eq!(top.len(), 2);
        for i in 0..40 {
            c.failed("Internal", &format!("distinct reason {}", "x".repeat(i)));
        }
        assert!(c.reasons.lock().unwrap().len() <= super::MAX_REASONS + 1, "bounded");
    }
}
