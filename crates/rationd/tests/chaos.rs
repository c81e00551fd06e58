//! Process-level chaos: three `rationd` processes behind a user-space fault proxy
//! (`ration_testkit::proxy`), gateways spending through the real SDK and two writers
//! recording every acknowledged grant and release, while a seeded schedule injects
//! kill -9 and restart, SIGSTOP/SIGCONT, partitions (isolating the leader or a
//! follower, one-way cuts, clients cut off from the leader, every gateway cut off
//! for longer than its leases live) and slow links for a bounded time. Then
//! everything heals and the test checks:
//!
//! 1. consumed + outstanding <= cap for every limit on every node (and at every
//!    sample taken during the chaos);
//! 2. what the gateways admitted (plus what the writer settled) is within the root's
//!    cap, and the ledger accounts for all of it;
//! 3. every acknowledged grant and release is in every node's audit log;
//! 4. every node's audit chain verifies from record 0, and the chains are equal;
//! 5. the replicas converge to one state digest at one applied index;
//! 6. one leader, and a fresh acquire succeeds.
//!
//! `RATION_CHAOS_SECS` (default 20) sets the length of the fault phase,
//! `RATION_CHAOS_SEED` the seed of the fault schedule (printed at the start; the
//! seed fixes the sequence of choices, not the timing), `RATION_CHAOS_KEEP=1` keeps
//! the data directories and logs, `RATION_TEST_LOG` sets the nodes' log filter
//! (default `warn`). See docs/CHAOS.md and scripts/chaos.sh.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ration_client::{CoarseClock, Sdk, SdkConfig};
use ration_core::audit::{verify_chain, ChainHead};
use ration_proto::v1;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_testkit::process::{free_addrs, initial_cluster, Proc};
use ration_testkit::proxy::{Fault, Faults};
use ration_testkit::{channel_within, create_lifetime_budget, meta, until_answered};

const NODES: usize = 3;
/// The root's cap per second of faults.
const CAP_PER_S: i64 = 600;
/// The gateways' combined demand, in units per second: unhindered they would take
/// the cap in a fifth of the fault phase. Faults slow them down (to about a third
/// of this in 20 s runs), so the cap is reached while faults go on, at a load that
/// does not depend on the run's length.
const SPEND_PER_S: f64 = 5.0 * CAP_PER_S as f64;
const LEAVES: [&str; 4] = ["org/a", "org/b", "org/c", "org/d"];
const GATEWAYS: usize = 8;
/// The writer that competes for the cap; the other writes to `bulk`, which has
/// room for everything, so acknowledged writes keep coming after the cap is reached.
const WRITER_LEAF: &str = "org/w";
const BULK: &str = "bulk";
const BULK_CAP: i64 = 1_000_000_000_000;
/// The gateways' lease ttl.
const LEASE_TTL: Duration = Duration::from_secs(4);
/// A control-plane call to a node (status, reads) gives up after this: a stopped
/// node does not answer.
const PROBE: Duration = Duration::from_millis(700);

/// splitmix64: a seeded schedule without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// The cluster under test and the record of what was done to it.
struct Chaos {
    procs: Mutex<Vec<Proc>>,
    faults: Arc<Faults>,
    /// Where the nodes really listen: the test's own probes bypass the proxies.
    real: Vec<SocketAddr>,
    started: Instant,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Chaos {
    fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn note(&self, kind: &'static str, what: String) {
        eprintln!("[{:8.3}s] {what}", self.t());
        *self.counts.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn say(&self, what: String) {
        eprintln!("[{:8.3}s] {what}", self.t());
    }

    fn spawn(&self, i: usize) {
        let mut procs = self.procs.lock().unwrap();
        procs[i].spawn();
        self.faults.set_pid(i, procs[i].pid());
    }

    fn kill9(&self, i: usize) {
        let mut procs = self.procs.lock().unwrap();
        procs[i].kill9();
        self.faults.set_pid(i, None);
    }

    fn signal(&self, i: usize, name: &str) {
        self.procs.lock().unwrap()[i].signal(name);
    }

    /// The node that leads in the highest term any node reports, if any answers so.
    async fn leader(&self) -> Option<usize> {
        self.leader_and_term().await.map(|(i, _)| i)
    }

    async fn leader_and_term(&self) -> Option<(usize, u64)> {
        let probes: Vec<_> = self
            .real
            .iter()
            .map(|a| tokio::spawn(ration_testkit::status_within(*a, false, PROBE)))
            .collect();
        let mut best: Option<(u64, usize)> = None;
        for (i, p) in probes.into_iter().enumerate() {
            if let Some(s) = p.await.unwrap() {
                if ration_proto::rpc::is_leader(&s) && best.is_none_or(|(term, _)| s.term > term) {
                    best = Some((s.term, i));
                }
            }
        }
        best.map(|(term, i)| (i, term))
    }

    /// The leader if one is seen, else any node; and how it was chosen.
    async fn pick(&self, rng: &mut Rng, prefer_leader: bool) -> (usize, &'static str) {
        let leader = self.leader().await;
        match leader {
            Some(l) if prefer_leader => (l, "leader"),
            Some(l) => {
                let f = (l + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
                (f, "follower")
            }
            None => (rng.below(NODES as u64) as usize, "no leader seen"),
        }
    }

    /// Sleeps `d`, but not past `end`.
    async fn hold(&self, d: Duration, end: Instant) {
        let until = (Instant::now() + d).min(end.max(Instant::now()));
        tokio::time::sleep_until(until.into()).await;
    }

    /// kill -9 and restart; SIGSTOP and SIGCONT. One fault at a time.
    async fn process_lane(&self, mut rng: Rng, end: Instant) {
        loop {
            self.hold(rng.ms(500, 2500), end).await;
            if Instant::now() + Duration::from_millis(500) >= end {
                return;
            }
            let kill = rng.percent(50);
            let prefer_leader = rng.percent(60);
            let (node, role) = self.pick(&mut rng, prefer_leader).await;
            let down = rng.ms(1000, 5000);
            let id = node + 1;
            if kill {
                self.kill9(node);
                self.note("kill -9", format!("kill -9 node {id} ({role}); restart in {down:?}"));
                self.hold(down, end).await;
                self.spawn(node);
                self.say(format!("restarted node {id}"));
            } else {
                self.signal(node, "STOP");
                self.note("SIGSTOP", format!("SIGSTOP node {id} ({role}); SIGCONT in {down:?}"));
                self.hold(down, end).await;
                self.signal(node, "CONT");
                self.say(format!("SIGCONT node {id}"));
            }
        }
    }

    /// Partitions and slow links, one at a time, each healed before the next.
    ///
    /// At least once per run (forced 40% into it if chance has not done it), every
    /// gateway is cut off from every node for longer than its leases live: the
    /// gateways spend their leases to their local deadlines, the ledger expires the
    /// leases and charges them, and the late releases settle them.
    async fn network_lane(&self, mut rng: Rng, end: Instant) {
        let phase = end.saturating_duration_since(Instant::now());
        let force_cutoff_at = Instant::now() + phase.mul_f64(0.4);
        let mut cut_off = false;
        loop {
            self.hold(rng.ms(500, 2500), end).await;
            if Instant::now() + Duration::from_millis(500) >= end {
                return;
            }
            let how = if rng.percent(50) { Fault::Blackhole } else { Fault::Reset };
            let how_name = if how == Fault::Blackhole { "blackhole" } else { "reset" };
            let mut lasts = rng.ms(1500, 5000);
            let roll = rng.below(100);
            if roll < 10 || (!cut_off && Instant::now() >= force_cutoff_at) {
                cut_off = true;
                lasts = LEASE_TTL + rng.ms(1000, 2500);
                for node in 0..NODES {
                    self.faults.set(self.faults.client(), node, how);
                }
                self.note(
                    "gateways cut off",
                    format!(
                        "cut clients -> every node ({how_name}) for {lasts:?}, past the lease ttl"
                    ),
                );
            } else if roll < 32 {
                let (node, role) = self.pick(&mut rng, true).await;
                let clients = rng.percent(50);
                self.faults.isolate(node, how, clients);
                self.note(
                    "isolate leader",
                    format!(
                        "isolate node {} ({role}) from its peers{} ({how_name}) for {lasts:?}",
                        node + 1,
                        if clients { " and clients" } else { "" }
                    ),
                );
            } else if roll < 50 {
                let (node, role) = self.pick(&mut rng, false).await;
                let clients = rng.percent(50);
                self.faults.isolate(node, how, clients);
                self.note(
                    "isolate follower",
                    format!(
                        "isolate node {} ({role}) from its peers{} ({how_name}) for {lasts:?}",
                        node + 1,
                        if clients { " and clients" } else { "" }
                    ),
                );
            } else if roll < 72 {
                // One way: src's connections to dst carry nothing; dst → src works.
                let prefer_leader = rng.percent(70);
                let (src, role) = self.pick(&mut rng, prefer_leader).await;
                let dst = (src + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
                self.faults.set(src, dst, how);
                self.note(
                    "one-way cut",
                    format!(
                        "one-way cut node {} ({role}) -> node {} ({how_name}) for {lasts:?}",
                        src + 1,
                        dst + 1
                    ),
                );
            } else if roll < 86 {
                let (node, role) = self.pick(&mut rng, true).await;
                self.faults.set(self.faults.client(), node, how);
                self.note(
                    "clients cut",
                    format!("cut clients -> node {} ({role}) ({how_name}) for {lasts:?}", node + 1),
                );
            } else {
                let prefer_leader = rng.percent(50);
                let (node, role) = self.pick(&mut rng, prefer_leader).await;
                let delay = rng.ms(20, 150);
                self.faults.inbound(node, Fault::Delay(delay));
                self.note(
                    "slow links",
                    format!(
                        "slow every link into node {} ({role}) by {delay:?} per chunk for {lasts:?}",
                        node + 1
                    ),
                );
            }
            self.hold(lasts, end).await;
            self.faults.heal_all();
            self.say("network healed".into());
        }
    }

    /// Every process running and continued, every link passing.
    fn heal(&self) {
        self.faults.heal_all();
        for i in 0..NODES {
            let running = self.procs.lock().unwrap()[i].running();
            if running {
                self.signal(i, "CONT");
            } else {
                self.spawn(i);
            }
        }
    }
}

/// Prints the tail of every node's log if the test fails.
struct DumpLogsOnPanic<'a>(&'a Chaos);

impl Drop for DumpLogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.0.procs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                eprintln!("{}", p.log_tail(40));
            }
        }
    }
}

/// What the writers were told succeeded.
#[derive(Default, Debug)]
struct Acked {
    /// lease id -> (budget, granted)
    granted: BTreeMap<u64, (&'static str, i64)>,
    /// lease id -> consumed total
    released: BTreeMap<u64, i64>,
    refused_exhausted: u64,
    /// The longest a request waited for a definite answer (retries included).
    longest_wait: Duration,
}

/// Acquires on `budget` through the proxies and releases every other lease with
/// half of it consumed, recording what was acknowledged, until `stop`.
async fn writer(
    name: &'static str,
    budget: &'static str,
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
) {
    let mut request_id = 0u64;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        request_id += 1;
        let acquire = v1::AcquireRequest {
            meta: meta(name, request_id, "writer"),
            budget: budget.into(),
            unit: "tokens".into(),
            wanted: 25,
            min: 1,
            ttl_ms: 30_000,
            starts_at_ms: 0,
        };
        let asked = Instant::now();
        let answer = until_answered!(addrs, acquire, acquire);
        {
            let mut a = acked.lock().unwrap();
            a.longest_wait = a.longest_wait.max(asked.elapsed());
        }
        let lease = match answer {
            Ok(l) => l,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                acked.lock().unwrap().refused_exhausted += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(s) => panic!("{name}: acquire refused: {s}"),
        };
        acked.lock().unwrap().granted.insert(lease.lease_id, (budget, lease.granted));
        n += 1;
        if n % 2 == 0 {
            request_id += 1;
            let total = lease.granted / 2;
            let release = v1::ReleaseRequest {
                meta: meta(name, request_id, "writer"),
                lease_id: lease.lease_id,
                consumed_total: total,
            };
            let asked = Instant::now();
            until_answered!(addrs, release, release).unwrap_or_else(|s| {
                panic!("{name}: release of lease {} refused: {s}", lease.lease_id)
            });
            let mut a = acked.lock().unwrap();
            a.longest_wait = a.longest_wait.max(asked.elapsed());
            a.released.insert(lease.lease_id, total);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_budget(addr: SocketAddr, path: &str) -> Option<v1::LimitStatus> {
    LedgerClient::new(channel_within(addr, PROBE))
        .get_budget(v1::GetBudgetRequest { path: path.into(), linearizable: false })
        .await
        .ok()
        .and_then(|b| b.into_inner().limits.into_iter().next())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}?")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_real_processes_keep_the_cap_and_every_acknowledged_record() {
    let secs = env_u64("RATION_CHAOS_SECS").unwrap_or(20).max(1);
    let cap = CAP_PER_S * (secs as i64).max(10);
    let seed = env_u64("RATION_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            % 1_000_000_007
    });
    eprintln!("chaos: seed {seed}, {secs} s of faults (rerun with RATION_CHAOS_SEED={seed})");
    let root = tempfile::tempdir().unwrap();
    let root_path = if std::env::var("RATION_CHAOS_KEEP").is_ok_and(|v| v == "1") {
        let kept = root.keep();
        eprintln!("chaos: data directories and logs kept in {}", kept.display());
        kept
    } else {
        root.path().to_path_buf()
    };

    // Nodes listen on `real`; everyone else reaches node i through proxy i.
    let real = free_addrs(NODES);
    let faults = Faults::start(real.clone()).await;
    let proxied = faults.addrs.clone();
    let cluster = initial_cluster(&proxied);
    let procs = (0..NODES)
        .map(|i| {
            let mut p = Proc::new(
                env!("CARGO_BIN_EXE_rationd"),
                i as u64 + 1,
                real[i],
                root_path.join(format!("node-{}", i + 1)),
                cluster.clone(),
            );
            p.advertise = Some(proxied[i]);
            p.args = ["--tick-ms", "500", "--snapshot-after-entries", "200"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            p
        })
        .collect();
    let chaos = Arc::new(Chaos {
        procs: Mutex::new(procs),
        faults: faults.clone(),
        real: real.clone(),
        started: Instant::now(),
        counts: Mutex::new(BTreeMap::new()),
    });
    let _dump = DumpLogsOnPanic(&chaos);
    for i in 0..NODES {
        chaos.spawn(i);
    }
    let first = ration_testkit::leader(&real).await;
    chaos.say(format!(
        "node {first} leads; nodes advertise proxies {proxied:?}, listen on {real:?}"
    ));

    create_lifetime_budget(&proxied, 1, "org", cap).await;
    for (i, leaf) in LEAVES.iter().enumerate() {
        create_lifetime_budget(&proxied, 2 + i as u64, leaf, cap / 2).await;
    }
    create_lifetime_budget(&proxied, 10, WRITER_LEAF, cap / 4).await;
    create_lifetime_budget(&proxied, 11, BULK, BULK_CAP).await;

    // Gateways, paced at SPEND_PER_S together.
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints: Vec<String> = proxied.iter().map(|a| a.to_string()).collect();
    let sdks: Vec<Arc<Sdk>> = (0..GATEWAYS)
        .map(|i| {
            let mut config = SdkConfig::new(endpoints.clone(), format!("gw-{i}"));
            config.refresh = Duration::from_millis(200);
            // Short leases, so that a gateway cut off for a few seconds outlives
            // them: the ledger then expires leases whose units were spent.
            config.lease_ttl = LEASE_TTL;
            config.margin = Duration::from_secs(1);
            config.horizon = Duration::from_secs(2);
            Sdk::start(config, clock.clone()).unwrap()
        })
        .collect();
    let per_gateway_per_s = SPEND_PER_S / GATEWAYS as f64;
    let pause = Duration::from_secs_f64((4.5 / per_gateway_per_s).clamp(0.002, 1.0));
    let admitted: Arc<Vec<AtomicU64>> =
        Arc::new((0..GATEWAYS).map(|_| AtomicU64::new(0)).collect());
    let stop_spending = Arc::new(AtomicBool::new(false));
    let spenders: Vec<_> = sdks
        .iter()
        .enumerate()
        .map(|(g, sdk)| {
            let h = sdk.handle(LEAVES[g % LEAVES.len()], "tokens");
            let (admitted, stop) = (admitted.clone(), stop_spending.clone());
            let mut n = seed ^ ((g as u64) << 32);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let amount = 1 + (n >> 33) % 8;
                    if h.try_spend(amount) {
                        admitted[g].fetch_add(amount, Ordering::Relaxed);
                    }
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect();
    let total_admitted = {
        let admitted = admitted.clone();
        move || admitted.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>()
    };

    let stop_writing = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let writers = [("w-org", WRITER_LEAF), ("w-bulk", BULK)].map(|(name, budget)| {
        tokio::spawn(writer(name, budget, proxied.clone(), stop_writing.clone(), acked.clone()))
    });

    // A monitor: the root's cap on every node, and the gateways' admissions, all the
    // time; and when the cap was first reached.
    let stop_monitor = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (chaos, stop, total) = (chaos.clone(), stop_monitor.clone(), total_admitted.clone());
        tokio::spawn(async move {
            let mut violations = Vec::new();
            let mut cap_reached: Option<f64> = None;
            let mut samples = 0u64;
            // Leaders of new terms; an isolated old leader still says it leads (openraft
            // does not step down without a quorum), in its old term: not counted.
            let mut last_term = 0u64;
            let mut leader_changes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some((l, term)) = chaos.leader_and_term().await {
                    if term > last_term {
                        leader_changes += u64::from(last_term > 0);
                        chaos.say(format!("node {} leads in term {term}", l + 1));
                        last_term = term;
                    }
                }
                let probes: Vec<_> =
                    chaos.real.iter().map(|a| tokio::spawn(get_budget(*a, "org"))).collect();
                for (i, probe) in probes.into_iter().enumerate() {
                    if let Some(l) = probe.await.unwrap() {
                        samples += 1;
                        if l.consumed + l.outstanding > cap {
                            violations.push(format!("at {:.3}s node {}: {l:?}", chaos.t(), i + 1));
                        }
                        if l.remaining == 0 && cap_reached.is_none() {
                            cap_reached = Some(chaos.t());
                            chaos.say(format!(
                                "the root's cap is fully taken (node {}: consumed {}, outstanding {}); gateways admitted {}",
                                i + 1, l.consumed, l.outstanding, total()
                            ));
                        }
                    }
                }
                let now = total();
                if now > cap as u64 {
                    violations
                        .push(format!("at {:.3}s gateways admitted {now} > {cap}", chaos.t()));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (violations, cap_reached, samples, leader_changes)
        })
    };

    // The faults.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let chaos_started = chaos.t();
    chaos.say(format!("chaos starts: {secs} s of faults"));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut rng = Rng(seed);
    let (p_rng, n_rng) = (Rng(rng.next()), Rng(rng.next()));
    tokio::join!(chaos.process_lane(p_rng, end), chaos.network_lane(n_rng, end));
    tokio::time::sleep_until(end.into()).await;
    chaos.heal();
    chaos.say("chaos over: every process running, every link healed".into());
    let chaos_secs = chaos.t() - chaos_started;

    // (6) Liveness: one leader that every node follows (checked before the writers
    // are awaited, whose own patience is 60 s per request), then a fresh acquire.
    let deadline = Instant::now() + Duration::from_secs(40);
    let leader = loop {
        let mut seen = Vec::new();
        for a in &real {
            seen.push(ration_testkit::status_within(*a, false, Duration::from_secs(2)).await);
        }
        let leaders: Vec<_> =
            seen.iter().flatten().filter(|s| ration_proto::rpc::is_leader(s)).collect();
        if leaders.len() == 1
            && seen.iter().all(|s| s.as_ref().is_some_and(|s| s.leader == Some(leaders[0].id)))
        {
            break leaders[0].id;
        }
        assert!(
            Instant::now() < deadline,
            "no single leader within 40 s of healing; (id, role, term, leader) or None if silent: {:?}",
            seen.iter()
                .map(|s| s.as_ref().map(|s| (s.id, ration_proto::rpc::role_name(s.role()), s.term, s.leader)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    chaos.say(format!("node {leader} leads, every node follows it"));

    // Let the gateways and writers run on the healed cluster for a moment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_spending.store(true, Ordering::Relaxed);
    for s in spenders {
        s.await.unwrap();
    }
    stop_writing.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    for (i, sdk) in sdks.iter().enumerate() {
        let mut tries = 0;
        while let Err(e) = sdk.release_all().await {
            tries += 1;
            assert!(tries < 20, "gateway {i} cannot release its leases: {e}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    drop(sdks);
    stop_monitor.store(true, Ordering::Relaxed);
    let (violations, cap_reached, samples, leader_changes) = monitor.await.unwrap();
    assert!(
        violations.is_empty(),
        "the cap was broken during the chaos, {} times; the first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );

    let fresh = v1::AcquireRequest {
        meta: meta("chaos-liveness", 1, "ops"),
        budget: BULK.into(),
        unit: "tokens".into(),
        wanted: 10,
        min: 10,
        ttl_ms: 60_000,
        starts_at_ms: 0,
    };
    let fresh = until_answered!(proxied, acquire, fresh).expect("a fresh acquire after healing");
    assert_eq!(fresh.granted, 10);
    chaos.say(format!("a fresh acquire got lease {}", fresh.lease_id));

    // (5) Convergence: equal applied index, equal state digest.
    let statuses = ration_testkit::converged(&real, Duration::from_secs(90)).await;
    let applied = statuses[0].applied_index;
    chaos.say(format!(
        "converged at applied index {applied}, digest {}",
        ration_testkit::hex(&statuses[0].state_digest[..8])
    ));

    // (1) The cap, on every node, for every limit; and during the chaos.
    let mut roots = Vec::new();
    for (a, s) in real.iter().zip(&statuses) {
        let budgets = LedgerClient::new(channel_within(*a, Duration::from_secs(10)))
            .list_budgets(v1::ListBudgetsRequest { limit: 1000, ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .budgets;
        assert_eq!(budgets.len(), 2 + LEAVES.len() + 1, "node {} lists {budgets:?}", s.id);
        for b in &budgets {
            for l in &b.limits {
                let cap = l.limit.as_ref().unwrap().cap;
                assert!(
                    l.consumed >= 0 && l.outstanding >= 0 && l.consumed + l.outstanding <= cap,
                    "node {}: budget {} breaks its cap {cap}: {l:?}",
                    s.id,
                    b.path
                );
            }
        }
        let root = budgets.iter().find(|b| b.path == "org").unwrap().limits[0].clone();
        roots.push(root);
    }

    // (2) Nothing admitted beyond the cap; the ledger accounts for all of it.
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let gateways: Vec<u64> = admitted.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let gw_total: u64 = gateways.iter().sum();
    let writer_settled: i64 = acked
        .released
        .iter()
        .filter(|(id, _)| acked.granted[id].0 == WRITER_LEAF)
        .map(|(_, c)| c)
        .sum();
    let spent = gw_total as i64 + writer_settled;
    assert!(
        spent <= cap,
        "admitted {gw_total} + settled by the writer {writer_settled} > cap {cap}"
    );
    let root = &roots[0];
    assert!(
        root.consumed + root.outstanding >= spent,
        "the ledger lost spend: consumed {} + outstanding {} < admitted {gw_total} + settled {writer_settled}",
        root.consumed,
        root.outstanding
    );

    // (3) and (4): every acknowledged record on every node; every chain verifies.
    let mut heads = BTreeSet::new();
    let mut records_per_node = Vec::new();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for (a, s) in real.iter().zip(&statuses) {
        let records = ration_testkit::audit_records(*a).await;
        let converted: Vec<_> = records
            .iter()
            .map(|r| ration_proto::convert::to_core::audit_record(r).unwrap())
            .collect();
        let head = verify_chain(&converted, ChainHead::default())
            .unwrap_or_else(|b| panic!("node {}: {b}", s.id));
        assert_eq!(head.next_seq, records.len() as u64, "node {}: the chain starts at 0", s.id);
        assert_eq!(
            records.len() as u64,
            s.audit_records,
            "node {}: audit records read vs reported",
            s.id
        );
        heads.insert((head.next_seq, head.last_hash));
        if kinds.is_empty() {
            for r in &records {
                *kinds.entry(r.kind.clone()).or_default() += 1;
            }
        }
        records_per_node.push(records.len());
        let of_kind = |kinds: &[&str]| -> BTreeSet<u64> {
            records
                .iter()
                .filter(|r| kinds.contains(&r.kind.as_str()))
                .map(|r| r.lease_id)
                .collect()
        };
        let granted = of_kind(&["lease_granted"]);
        let missing: Vec<_> = acked.granted.keys().filter(|id| !granted.contains(id)).collect();
        assert!(missing.is_empty(), "node {} lost acknowledged grants {missing:?}", s.id);
        let released = of_kind(&["lease_released", "lease_refunded", "late_release"]);
        let missing: Vec<_> = acked.released.keys().filter(|id| !released.contains(id)).collect();
        assert!(missing.is_empty(), "node {} lost acknowledged releases {missing:?}", s.id);
    }
    assert_eq!(heads.len(), 1, "the nodes' audit chains differ: {heads:?}");

    let counts = chaos.counts.lock().unwrap().clone();
    let faults_total: u64 = counts.values().sum();
    let accepted: Vec<u64> = faults.accepted.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    eprintln!("==== chaos summary (seed {seed}) ====");
    eprintln!("fault phase: {chaos_secs:.1} s; {faults_total} faults: {counts:?}");
    eprintln!("leaders of new terms observed: {leader_changes}");
    eprintln!(
        "proxied connections accepted from nodes 1..3 / clients: {accepted:?} (owner not found: {})",
        faults.unidentified.load(Ordering::Relaxed)
    );
    eprintln!(
        "writers: {} grants and {} releases acknowledged, all on every node; {} refused for exhaustion; \
         longest wait for an answer {:.1?}",
        acked.granted.len(),
        acked.released.len(),
        acked.refused_exhausted,
        acked.longest_wait
    );
    eprintln!(
        "gateways admitted {gw_total} ({gateways:?}) + writer settled {writer_settled} = {spent} of cap {cap}; \
         cap fully taken at {}; ledger root consumed {} outstanding {}",
        cap_reached.map_or("never".into(), |t| format!("{t:.1} s")),
        root.consumed,
        root.outstanding
    );
    eprintln!(
        "audit: {} records per node ({kinds:?}), chains verify from 0 and are equal; \
         applied index {applied}, digests equal; {samples} cap samples during the run; total {:.1} s",
        records_per_node[0],
        chaos.t()
    );
    assert!(acked.granted.len() >= 10, "the writers made little progress: {acked:?}");
    assert!(gw_total > 0, "the gateways admitted nothing");
}
