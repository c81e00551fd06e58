//! The gateway SDK against a real 3-node cluster on loopback.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ration_client::{CoarseClock, Sdk, SdkConfig};
use ration_proto::v1::{self, Period};
use ration_testkit::inproc::Cluster;
use ration_testkit::{eventually, ledger, meta};

/// Large enough that what 50 gateways hold (their spend rate × the horizon) is a
/// small part of it: otherwise a gateway that runs dry waits on the others' leases
/// long before the cap is reached, which is scarcity, not a failover gap.
const CAP: i64 = 900_000;

async fn budget(
    addr: std::net::SocketAddr,
    id: u64,
    path: &str,
    cap: i64,
    static_allowance: Option<i64>,
) {
    let mut limit = ration_testkit::limit("tokens", cap, Period::Lifetime);
    limit.static_allowance = static_allowance;
    let req = v1::CreateBudgetRequest {
        meta: meta("sdk-admin", id, "ops"),
        path: path.into(),
        limits: vec![limit],
    };
    // Retried with its request id while the outcome is unknown (a leader change on
    // a busy machine): exactly once.
    ration_testkit::until_answered!([addr], create_budget, req).unwrap();
}

/// A gateway with every SDK setting at its default (sized for a failover:
/// `ration_client::refill::defaults`).
fn sdk(cluster: &Cluster, principal: &str, clock: &Arc<CoarseClock>) -> Arc<Sdk> {
    let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
    Sdk::start(SdkConfig::new(endpoints, principal), clock.clone()).unwrap()
}

async fn consumed(addr: std::net::SocketAddr, path: &str) -> (i64, i64) {
    let b = ledger(addr)
        .get_budget(v1::GetBudgetRequest { path: path.into(), linearizable: true })
        .await
        .unwrap();
    let l = &b.into_inner().limits[0];
    (l.consumed, l.outstanding)
}

struct Totals {
    admitted: AtomicU64,
    /// Refusals while the cluster was electing a new leader (the kill window).
    denied_electing: AtomicU64,
    electing: AtomicBool,
}

/// 50 gateways spend on five leaves of one tree until the root's cap is reached.
/// With `kill_leader`, the leader is stopped a third of the way through.
async fn spend_to_the_cap(kill_leader: bool) {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let addr = cluster.addrs[&leader];
    budget(addr, 1, "org", CAP, None).await;
    for (i, leaf) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        budget(addr, i as u64 + 2, &format!("org/{leaf}"), CAP / 4, None).await;
    }
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdks: Vec<Arc<Sdk>> = (0..50).map(|i| sdk(&cluster, &format!("gw-{i}"), &clock)).collect();
    let handles: Vec<_> = sdks
        .iter()
        .enumerate()
        .map(|(i, s)| s.handle(&format!("org/{}", ["a", "b", "c", "d", "e"][i % 5]), "tokens"))
        .collect();
    // Every gateway holds a lease before spending starts.
    eventually("every gateway holds a lease", Duration::from_secs(20), || {
        let ready = handles.iter().all(|h| h.allowance().available(clock_now(&sdks[0])) > 0);
        async move { ready }
    })
    .await;

    let totals = Arc::new(Totals {
        admitted: AtomicU64::new(0),
        denied_electing: AtomicU64::new(0),
        electing: AtomicBool::new(false),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let spenders: Vec<_> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let (totals, stop) = (totals.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = i as u64;
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let amount = 1 + (n >> 33) % 8;
                    if h.try_spend(amount) {
                        totals.admitted.fetch_add(amount, Ordering::Relaxed);
                    } else if totals.electing.load(Ordering::Relaxed) {
                        totals.denied_electing.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    if kill_leader {
        eventually("a third of the cap is spent", Duration::from_secs(60), || {
            let spent = totals.admitted.load(Ordering::Relaxed);
            async move { spent > CAP as u64 / 3 }
        })
        .await;
        totals.electing.store(true, Ordering::Relaxed);
        cluster.stop(leader).await;
        let new_leader = cluster.leader().await;
        assert_ne!(new_leader, leader);
        // The window: from the kill until the gateways have had time to fail over.
        tokio::time::sleep(Duration::from_secs(2)).await;
        totals.electing.store(false, Ordering::Relaxed);
    }
    // Spend until the cap is reached, or admissions stop making progress.
    let started = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    while started.elapsed() < Duration::from_secs(90) {
        let now = totals.admitted.load(Ordering::Relaxed);
        if now >= CAP as u64 || last_change.elapsed() > Duration::from_secs(3) {
            break;
        }
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the last leases drain.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for s in spenders {
        s.await.unwrap();
    }
    for s in &sdks {
        s.release_all().await.unwrap();
    }
    let admitted = totals.admitted.load(Ordering::Relaxed);
    let survivor = cluster.addrs[cluster.nodes.keys().next().unwrap()];
    let (ledger_consumed, outstanding) = consumed(survivor, "org").await;
    eprintln!(
        "admitted {admitted} of {CAP}; ledger consumed {ledger_consumed}, outstanding {outstanding}; refusals while electing {}",
        totals.denied_electing.load(Ordering::Relaxed)
    );
    assert!(admitted <= CAP as u64, "admitted {admitted} > cap {CAP}");
    assert!(admitted * 100 >= CAP as u64 * 99, "only {admitted} of {CAP} was spent");
    assert!(ledger_consumed as u64 >= admitted, "the ledger counted less than was admitted");
    assert!(ledger_consumed + outstanding <= CAP);
    assert_eq!(
        totals.denied_electing.load(Ordering::Relaxed),
        0,
        "calls were refused while a new leader was elected"
    );
    cluster.shutdown().await;
}

fn clock_now(sdk: &Sdk) -> u64 {
    use ration_client::LocalClock;
    sdk.gateway().clock().now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_gateways_spend_a_tree_to_its_cap_and_never_past_it() {
    spend_to_the_cap(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_and_no_call_is_refused_while_a_new_leader_is_elected() {
    spend_to_the_cap(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_then_settle_charges_exactly_what_was_used() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "r", 10_000, None).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let s = sdk(&cluster, "gw-r", &clock);
    let h = s.handle("r", "tokens");
    eventually("a lease is held", Duration::from_secs(20), || {
        let ok = h.allowance().available(clock_now(&s)) >= 150;
        async move { ok }
    })
    .await;
    let before = h.allowance().available(clock_now(&s));
    let r = s.reserve(&[("r", "tokens", 150)]).unwrap();
    assert_eq!(h.allowance().available(clock_now(&s)), before - 150);
    assert_eq!(r.settle(&[37]), vec![113]);
    assert_eq!(h.allowance().available(clock_now(&s)), before - 37);
    let dropped = s.reserve(&[("r", "tokens", 20)]).unwrap();
    drop(dropped);
    assert_eq!(h.allowance().available(clock_now(&s)), before - 37);
    s.release_all().await.unwrap();
    assert_eq!(consumed(addr, "r").await, (37, 0), "the ledger charged exactly the settled amount");
    cluster.shutdown().await;
}

/// A call that outlasts the lease it reserved from (an LLM call of a minute) is
/// charged what it used, not what it reserved: the SDK keeps the lease past its
/// deadline (not spendable) until the call settles, then releases it late, and
/// the ledger, which charged it by expiry, refunds the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_outlasts_its_lease_is_charged_what_it_used() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "long", 100_000, None).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let s = sdk(&cluster, "gw-long", &clock);
    // Refused reservations are demand: the leases grow until one fits.
    eventually("a lease holds 500", Duration::from_secs(20), || {
        let ok = s.reserve(&[("long", "tokens", 500)]).is_some();
        async move { ok }
    })
    .await;
    let r = s.reserve(&[("long", "tokens", 500)]).unwrap();
    // Past the validity of every lease held when it was reserved (and the
    // ledger's expiry of it), renewed meanwhile by the refill rounds.
    let ttl = s.lease_ttl();
    tokio::time::sleep(ttl + Duration::from_secs(3)).await;
    assert_eq!(r.settle(&[120]), vec![380]);
    // The next rounds release the old lease with what was really spent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.release_all().await.unwrap();
    eventually("the late release is counted", Duration::from_secs(10), || async move {
        consumed(addr, "long").await == (120, 0)
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cluster_down_gateways_spend_their_leases_then_follow_the_policy() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "closed", 10_000, None).await;
    budget(addr, 2, "static", 10_000, Some(50)).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let s = sdk(&cluster, "gw-o", &clock);
    let closed = s.handle("closed", "tokens");
    let fixed = s.handle("static", "tokens");
    eventually("leases are held", Duration::from_secs(20), || {
        let now = clock_now(&s);
        let ok = closed.allowance().available(now) > 0 && fixed.allowance().available(now) > 0;
        async move { ok }
    })
    .await;
    // The emergency reserve is real allowance: a lease of the declared 50 units,
    // outstanding in the ledger beside the leases held, before any outage.
    eventually("the reserve is held", Duration::from_secs(20), || async {
        consumed(addr, "static").await.1 >= 50 + fixed.allowance().available(clock_now(&s)) as i64
    })
    .await;

    for id in [1, 2, 3] {
        cluster.stop(id).await;
    }
    let held_closed = closed.allowance().available(clock_now(&s));
    let held_static = fixed.allowance().available(clock_now(&s));
    let mut spent = 0;
    while closed.try_spend(1) {
        spent += 1;
    }
    assert_eq!(spent, held_closed, "the leases held are spent, and nothing more");
    let mut spent_static = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    // The reserve becomes spendable once no member has answered for `outage_after`.
    while Instant::now() < deadline && spent_static < held_static + 50 {
        if fixed.try_spend(1) {
            spent_static += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        spent_static,
        held_static + 50,
        "leases, then exactly the declared static allowance"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!closed.try_spend(1), "fail closed: no lease, no admission");
    assert!(!fixed.try_spend(1), "the static allowance is not unlimited");

    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    eventually("admission resumes once the cluster is back", Duration::from_secs(60), || {
        let ok = closed.try_spend(1);
        async move { ok }
    })
    .await;
    // What the gateway admitted from the static budget (its leases, then the
    // reserve) is exactly what the ledger counts as consumed once it reports back.
    let addr = cluster.addrs[&cluster.leader().await];
    eventually("the reserve's spend is reported", Duration::from_secs(30), || async {
        consumed(addr, "static").await.0 == spent_static as i64
    })
    .await;
    cluster.shutdown().await;
}

/// Gateways with DEFAULT settings spend a fail-static budget through a link that
/// flaps (cut for 3 s, longer than `outage_after`, then up for 2 s, for 40 s) until
/// the cap is reached. What they admitted, counted in the gateways and including
/// what they spent from their emergency reserves, never exceeds the cap; healed,
/// they spend all of it but the reserves they hold (spendable only in an outage);
/// and it is then exactly what the ledger counts as consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_never_overruns_a_fail_static_budget() {
    use ration_testkit::proxy::{Fault, Faults};
    const CAP: i64 = 6_000;
    const STATIC: i64 = 300;
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "flap", CAP, Some(STATIC)).await;
    // The gateways reach the nodes only through proxies the test can cut.
    let faults = Faults::start(cluster.addrs.values().copied().collect()).await;
    let endpoints: Vec<String> = faults.addrs.iter().map(|a| a.to_string()).collect();
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdks: Vec<Arc<Sdk>> = (0..4)
        .map(|i| Sdk::start(SdkConfig::new(endpoints.clone(), format!("gw-{i}")), clock.clone()))
        .collect::<Result<_, _>>()
        .unwrap();
    let handles: Vec<_> = sdks.iter().map(|s| s.handle("flap", "tokens")).collect();
    let admitted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let spenders: Vec<_> = handles
        .into_iter()
        .map(|h| {
            let (admitted, stop) = (admitted.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if h.try_spend(1) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    let cut = |fault: Fault| {
        for dst in 0..3 {
            faults.set(faults.client(), dst, fault);
        }
    };
    let (mut outages, started) = (0, Instant::now());
    while started.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Alternate refused connections and silent ones.
        cut(if outages % 2 == 0 { Fault::Reset } else { Fault::Blackhole });
        outages += 1;
        tokio::time::sleep(Duration::from_secs(3)).await;
        cut(Fault::Pass);
        assert!(
            admitted.load(Ordering::Relaxed) <= CAP as u64,
            "admitted {} > cap {CAP} after outage {outages}",
            admitted.load(Ordering::Relaxed)
        );
    }
    faults.heal_all();
    // Healed, the gateways spend on until all that is left of the cap is what they
    // hold as emergency reserves (spendable only in an outage): allowed a minute,
    // since on a loaded machine the flapping left them far from it.
    let spendable = (CAP - 4 * STATIC) as u64;
    let healed = Instant::now();
    while admitted.load(Ordering::Relaxed) < spendable && healed.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "healed: {} admitted {:.1} s after healing",
        admitted.load(Ordering::Relaxed),
        healed.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for s in spenders {
        s.await.unwrap();
    }
    for s in &sdks {
        s.release_all().await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    let mut last = (0, 0);
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_secs(30) {
        last = consumed(addr, "flap").await;
        if last.0 as u64 == admitted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{outages} outages: admitted {admitted} of {CAP} (static {STATIC} per gateway); \
         ledger consumed {}, outstanding {}",
        last.0, last.1
    );
    assert!(admitted <= CAP as u64, "admitted {admitted} > cap {CAP}");
    assert!(
        admitted >= spendable,
        "the cap was not approached: {admitted} admitted, less than the cap less the \
         gateways' reserves ({spendable})"
    );
    assert_eq!(
        last.0 as u64, admitted,
        "the ledger's consumed figure differs from what was admitted"
    );
    cluster.shutdown().await;
}

/// A gateway with 3,000 budgets, one malformed name and one budget that does not
/// exist (DEFAULT settings): its rounds go as several batches within the server's
/// limit, the two bad keys are quarantined (logged, counted, never re-sent every
/// round), and every valid budget gets stocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_budgets_and_bad_keys_never_wedge_a_gateway() {
    const N: usize = 3_000;
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    // Created 64 at a time.
    let paths: Vec<String> = (0..N).map(|i| format!("tenant-{i:04}")).collect();
    for (c, chunk) in paths.chunks(64).enumerate() {
        let mut calls = Vec::new();
        for (i, path) in chunk.iter().enumerate() {
            let id = (c * 64 + i) as u64 + 1;
            let path = path.clone();
            calls.push(tokio::spawn(async move { budget(addr, id, &path, 1_000, None).await }));
        }
        for call in calls {
            call.await.unwrap();
        }
    }
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
    let s = Sdk::start(SdkConfig::new(endpoints, "gw-many"), clock.clone()).unwrap();
    let handles: Vec<_> = paths.iter().map(|p| s.handle(p, "tokens")).collect();
    let bad = s.handle("acme//broken", "tokens");
    let missing = s.handle("no-such-budget", "tokens");
    eventually("every valid budget is stocked", Duration::from_secs(120), || {
        let now = clock_now(&s);
        let ok = handles.iter().all(|h| h.allowance().available(now) > 0);
        async move { ok }
    })
    .await;
    let now = clock_now(&s);
    assert_eq!(bad.allowance().available(now), 0);
    assert_eq!(missing.allowance().available(now), 0);
    // The bad keys are not re-sent every round: a few rounds later the gateway has
    // sent no more than what keeping 3,000 budgets stocked takes.
    let before = s.ops_sent();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_round = (s.ops_sent() - before) / 10;
    eprintln!("ops sent: {} in all, {per_round} per round after stocking", s.ops_sent());
    assert!(handles.iter().all(|h| h.allowance().available(clock_now(&s)) > 0));
    cluster.shutdown().await;
}

/// The fail-static policy is the strictest along the ancestor chain: a leaf with
/// `static=50` under a parent with `static=40` holds a reserve of 40; a leaf with
/// `static=50` under a fail-closed parent holds none. Seen in the ledger: what is
/// outstanding beyond the gateway's spendable leases is the reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strictest_policy_along_the_ancestor_chain_sizes_the_reserve() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "chain", 100_000, Some(40)).await;
    budget(addr, 2, "chain/leaf", 100_000, Some(50)).await;
    budget(addr, 3, "closed", 100_000, None).await;
    budget(addr, 4, "closed/leaf", 100_000, Some(50)).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
    let s = Sdk::start(SdkConfig::new(endpoints, "gw-chain"), clock.clone()).unwrap();
    let _a = s.handle("chain/leaf", "tokens");
    let _b = s.handle("closed/leaf", "tokens");
    let beyond = |path: &'static str| {
        let s = s.clone();
        async move {
            let (_, outstanding) = consumed(addr, path).await;
            outstanding - s.held(path, "tokens").1 as i64
        }
    };
    eventually("the chain's reserve is the smaller static", Duration::from_secs(20), || async {
        beyond("chain/leaf").await == 40
    })
    .await;
    // Several rounds later, the leaf under a fail-closed parent still holds none.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(s.held("closed/leaf", "tokens").1 > 0, "its ordinary leases are held");
    assert_eq!(beyond("closed/leaf").await, 0, "a reserve under a fail-closed parent");
    assert_eq!(beyond("chain/leaf").await, 40);
    cluster.shutdown().await;
}

/// Calls whose real cost is known only afterwards (a dollar price, output tokens)
/// settle above what they reserved, again and again, with default SDK settings,
/// until the cap is reached. The excess comes from the leases when they hold it and
/// is reported as an overrun when they do not: the ledger's consumed figure equals
/// the sum of the real costs the gateways admitted, and stays within the cap plus
/// the audited overruns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_above_the_reservation_is_counted_to_the_unit() {
    const CAP: i64 = 200_000;
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "usd", CAP, None).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints: Vec<String> = cluster.addrs.values().map(|a| a.to_string()).collect();
    let gateways: Vec<Arc<Sdk>> = (0..2)
        .map(|i| {
            Sdk::start(SdkConfig::new(endpoints.clone(), format!("gw-over-{i}")), clock.clone())
                .unwrap()
        })
        .collect();
    let real_total = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (g, sdk) in gateways.iter().enumerate() {
        for worker in 0..2u64 {
            let (sdk, real_total, calls) = (sdk.clone(), real_total.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ (g as u64 * 31 + worker);
                let mut refused_in_a_row = 0u32;
                while started.elapsed() < Duration::from_secs(60) && refused_in_a_row < 400 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let estimate = 20 + x % 60;
                    // Real cost: from half the estimate to three times it.
                    let real = estimate / 2 + (x >> 20) % (estimate * 5 / 2 + 1);
                    match sdk.reserve(&[("usd", "tokens", estimate)]) {
                        Some(r) => {
                            refused_in_a_row = 0;
                            r.settle(&[real]);
                            real_total.fetch_add(real, Ordering::Relaxed);
                            calls.fetch_add(1, Ordering::Relaxed);
                        }
                        None => refused_in_a_row += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    for sdk in &gateways {
        // Every overrun and release reaches the ledger (retried with the same ids).
        eventually("the gateway settles everything", Duration::from_secs(30), || async {
            sdk.release_all().await.is_ok()
        })
        .await;
    }
    let real = real_total.load(Ordering::Relaxed) as i64;
    let b = ledger(addr)
        .get_budget(v1::GetBudgetRequest { path: "usd".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    let l = &b.limits[0];
    let overruns: u64 = gateways.iter().map(|s| s.gateway_overruns("usd", "tokens")).sum();
    eprintln!(
        "{} calls, real cost {real}, ledger consumed {} outstanding {} overruns {} (gateways \
         recorded {overruns})",
        calls.load(Ordering::Relaxed),
        l.consumed,
        l.outstanding,
        l.overruns
    );
    assert!(calls.load(Ordering::Relaxed) > 1_000, "the test made calls");
    assert!(l.overruns > 0, "some calls overran what the leases held");
    assert_eq!(l.overruns as u64, overruns, "every recorded overrun reached the ledger");
    assert_eq!(l.outstanding, 0);
    assert_eq!(l.consumed, real, "the ledger's consumed figure is the sum of real costs");
    assert!(l.consumed <= CAP + l.overruns, "consumed {} > cap + overruns", l.consumed);
    // Each overrun is an audited record; their sum is the limit's overrun figure.
    let records = ledger(addr)
        .query_audit(v1::QueryAuditRequest {
            kinds: vec!["overrun".into()],
            limit: 1000,
            linearizable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let audited: i64 = records.iter().map(|r| r.flow.as_ref().unwrap().consumed).sum();
    assert_eq!(audited, l.overruns, "the overrun records add up");
    cluster.shutdown().await;
}

async fn set_outcomes_limit(addr: std::net::SocketAddr, client: &str, outcomes: u64) {
    ledger(addr)
        .set_limits(v1::SetLimitsRequest {
            meta: meta(client, 1, "ops"),
            limits: Some(v1::PrincipalLimits {
                clients: 100_000,
                outcomes,
                live_leases: 1_000_000,
                budgets: 1_000_000,
            }),
        })
        .await
        .unwrap();
}

/// A per-principal limit refuses a gateway's overrun report (the spend happened):
/// the SDK keeps it and sends it again, and it reaches the ledger once the limit
/// is raised. Nothing the gateway admitted is left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overrun_refused_by_a_principal_limit_is_kept_until_the_ledger_takes_it() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "p", 1_000_000, None).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let s = sdk(&cluster, "gw-held", &clock);
    let h = s.handle("p", "tokens");
    eventually("a lease is held", Duration::from_secs(20), || {
        let ok = h.allowance().available(clock_now(&s)) >= 150;
        async move { ok }
    })
    .await;
    // From now on the gateway's principal may not have one more result remembered.
    set_outcomes_limit(addr, "limits-admin-1", 1).await;
    let r = s.reserve(&[("p", "tokens", 10)]).unwrap();
    let available = h.allowance().available(clock_now(&s));
    // A call that cost far more than its reservation and everything leased.
    r.settle(&[available + 10 + 5_000]);
    let over = s.gateway_overruns("p", "tokens");
    assert!(over >= 5_000, "the gateway recorded the overrun ({over})");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let overruns = |b: v1::Budget| b.limits[0].overruns;
    let get = || async {
        ledger(addr)
            .get_budget(v1::GetBudgetRequest { path: "p".into(), linearizable: true })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(overruns(get().await), 0, "the limit refused the report");
    // The operator raises the limit: the kept overrun lands, all of it.
    set_outcomes_limit(addr, "limits-admin-2", 4_194_304).await;
    eventually("the overrun reaches the ledger", Duration::from_secs(20), || async {
        overruns(get().await) as u64 == over
    })
    .await;
    cluster.shutdown().await;
}

/// A gateway lists every member; two of them are 60 ms away (one way), one is
/// near. The SDK finds the leader before its first round and reads from the
/// nearest member, found by measuring, not configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_reads_from_the_nearest_member_and_writes_to_the_leader() {
    use ration_testkit::proxy::{Fault, Faults, Link};
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.leader().await;
    let targets: Vec<std::net::SocketAddr> = cluster.addrs.values().copied().collect();
    let proxies = Faults::start(targets.clone()).await;
    // The near one is a follower, so nearest and leader differ.
    let near = cluster.addrs.keys().position(|id| *id != leader).unwrap();
    for dst in (0..targets.len()).filter(|d| *d != near) {
        proxies.set(proxies.client(), dst, Fault::Wan(Link::delay_ms(60)));
    }
    budget(cluster.addrs[&leader], 1, "near", 1_000, None).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints = proxies.addrs.iter().map(|a| a.to_string()).collect();
    let sdk = Sdk::start(SdkConfig::new(endpoints, "gw-near"), clock.clone()).unwrap();
    let handle = sdk.handle("near", "tokens");
    eventually("the gateway holds a lease", Duration::from_secs(20), || {
        let spent = handle.try_spend(1);
        async move { spent }
    })
    .await;
    let leader_at = cluster.addrs.keys().position(|id| *id == leader).unwrap();
    assert_eq!(sdk.cluster().nearest(), Some(near), "the member without the 60 ms link");
    assert_eq!(sdk.cluster().preferred(), leader_at, "writes go to the leader");
    // One region's timings (a failover bound of about a second, learned from
    // Status): the configured horizon stands.
    let bound = sdk.cluster().failover_bound();
    assert!(bound > Duration::ZERO && bound < Duration::from_secs(2), "{bound:?}");
    assert_eq!(sdk.horizon(), ration_client::refill::defaults::HORIZON);
    // A read (the fail-static policy's) is answered from the nearest member.
    let started = Instant::now();
    let read = sdk.cluster().get_budget("near").await.unwrap();
    let took = started.elapsed();
    assert_eq!(read.path, "near");
    eprintln!("read from the nearest member in {took:?} (the others are 120 ms away)");
    assert!(proxies.accepted[proxies.client()].load(Ordering::Relaxed) >= 3);
    cluster.shutdown().await;
}

/// A cluster sized for voters 300 ms apart (`voter_rtt_ms = 300`, here on
/// loopback, with the test kit's own lease and election timeouts) reports its
/// failover bound in `Status`; a gateway with default settings raises its horizon
/// so half of it outlasts the bound plus a 3 s round, and its lease validity to
/// twice that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_sizes_its_leases_from_the_clusters_failover_bound() {
    let cluster = Cluster::start(3, |c| c.voter_rtt_ms = 300).await;
    let leader = cluster.leader().await;
    budget(cluster.addrs[&leader], 1, "far", 1_000_000, None).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdk = sdk(&cluster, "gw-far", &clock);
    let handle = sdk.handle("far", "tokens");
    eventually("the gateway holds a lease", Duration::from_secs(20), || {
        let spent = handle.try_spend(1);
        async move { spent }
    })
    .await;
    let bound = Duration::from_millis(cluster.config(1).failover_bound_ms());
    assert_eq!(sdk.cluster().failover_bound(), bound);
    let horizon = (bound + ration_client::refill::defaults::ROUND_DEADLINE) * 2;
    assert!(horizon > ration_client::refill::defaults::HORIZON, "{horizon:?}");
    assert_eq!(sdk.horizon(), horizon);
    assert_eq!(sdk.lease_ttl(), horizon * 2);
    cluster.shutdown().await;
}

// ----- templates and freezing, with real gateways -----

/// `acme` and `acme/users` (tokens, lifetime), and a template on `acme/users`
/// giving each user `per_user` tokens a day.
async fn users_tree(cluster: &Cluster, root_cap: i64, users_cap: i64, per_user: i64) {
    let addrs: Vec<std::net::SocketAddr> = cluster.addrs.values().copied().collect();
    budget(addrs[0], 1, "acme", root_cap, None).await;
    budget(addrs[0], 2, "acme/users", users_cap, None).await;
    let req = v1::SetTemplateRequest {
        meta: meta("sdk-admin", 3, "ops"),
        parent: "acme/users".into(),
        limits: vec![ration_testkit::limit("tokens", per_user, Period::Day)],
        max_instances: 1000,
        idle_ms: 0,
        ..Default::default()
    };
    ration_testkit::until_answered!(addrs, set_template, req).unwrap();
}

async fn audit(addr: std::net::SocketAddr, subtree: &str, kind: &str) -> Vec<v1::AuditRecord> {
    let req = v1::QueryAuditRequest {
        subtree: subtree.into(),
        kinds: vec![kind.into()],
        limit: 1000,
        linearizable: true,
        ..Default::default()
    };
    ledger(addr).query_audit(req).await.unwrap().into_inner().records
}

/// Spends `amount` per call on `user`'s budget in a loop until `stop`, adding what
/// was admitted to `admitted[user]`; returns the last admission's time.
fn spender(
    handle: ration_client::Handle,
    admitted: Arc<Vec<AtomicU64>>,
    user: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Option<Instant>> {
    tokio::spawn(async move {
        let mut last = None;
        let mut n = user as u64;
        while !stop.load(Ordering::Relaxed) {
            n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let amount = 1 + (n >> 33) % 8;
            if handle.try_spend(amount) {
                admitted[user].fetch_add(amount, Ordering::Relaxed);
                last = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        last
    })
}

/// Issue #20: 200 gateways (each an SDK with default settings) all start spending
/// on 20 users that do not exist yet, in a different order each. The template
/// makes each user's budget once, and the per-user and root caps hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_gateways_racing_on_new_users_make_one_budget_each_and_the_caps_hold() {
    const USERS: usize = 20;
    const PER_USER: i64 = 1_000;
    // Below USERS * PER_USER: the root binds too.
    const ROOT: i64 = 15_000;
    let cluster = Cluster::start(3, |_| {}).await;
    users_tree(&cluster, ROOT, ROOT, PER_USER).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdks: Vec<Arc<Sdk>> = (0..200).map(|i| sdk(&cluster, &format!("gw-{i}"), &clock)).collect();
    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..USERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut spenders = Vec::new();
    for (i, s) in sdks.iter().enumerate() {
        // Each gateway spends on two users, picked so every user has 20 gateways.
        for user in [i % USERS, (i * 7 + 3) % USERS] {
            let h = s.handle(&format!("acme/users/u{user}"), "tokens");
            spenders.push(spender(h, admitted.clone(), user, stop.clone()));
        }
    }
    let total = |a: &Vec<AtomicU64>| a.iter().map(|x| x.load(Ordering::Relaxed)).sum::<u64>();
    let started = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    while started.elapsed() < Duration::from_secs(60) {
        let now = total(&admitted);
        if last_change.elapsed() > Duration::from_secs(5) {
            break;
        }
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for s in spenders {
        s.await.unwrap();
    }
    for s in &sdks {
        s.release_all().await.unwrap();
    }
    let addr = cluster.addrs[&cluster.leader().await];
    let created = audit(addr, "acme/users", "budget_created").await;
    let mut paths: Vec<&str> = created
        .iter()
        .map(|r| r.budget.as_str())
        .filter(|p| p.starts_with("acme/users/"))
        .collect();
    paths.sort_unstable();
    let before = paths.len();
    paths.dedup();
    assert_eq!(before, paths.len(), "a user's budget was created twice: {paths:?}");
    assert_eq!(paths.len(), USERS, "one budget per user: {paths:?}");
    let mut spent = 0;
    for user in 0..USERS {
        let path = format!("acme/users/u{user}");
        let b = ledger(addr)
            .get_budget(v1::GetBudgetRequest { path: path.clone(), linearizable: true })
            .await
            .unwrap()
            .into_inner();
        assert!(b.instance, "{path} was made by the template");
        let (consumed, outstanding) = (b.limits[0].consumed, b.limits[0].outstanding);
        let gave = admitted[user].load(Ordering::Relaxed);
        assert!(gave <= PER_USER as u64, "{path}: admitted {gave} > its cap {PER_USER}");
        assert_eq!(outstanding, 0, "{path}: every lease was released");
        assert_eq!(consumed as u64, gave, "{path}: the ledger counts exactly what was admitted");
        assert!(gave > 0, "{path}: nothing was admitted");
        spent += gave;
    }
    let (root, _) = consumed(addr, "acme").await;
    eprintln!("admitted {spent} across {USERS} users (root cap {ROOT}, per user {PER_USER})");
    assert!(spent <= ROOT as u64, "admitted {spent} > root cap {ROOT}");
    assert_eq!(root as u64, spent);
    cluster.shutdown().await;
}

/// Issue #20: freezing a budget refuses new grants at once; what the gateways can
/// still spend under it is what its live leases held when the freeze applied (the
/// `budget_frozen` record's balance, and the reply's `held`). Unfreezing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_stops_spending_within_what_live_leases_held() {
    const USERS: usize = 5;
    let cluster = Cluster::start(3, |_| {}).await;
    users_tree(&cluster, 10_000_000, 10_000_000, 1_000_000).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdks: Vec<Arc<Sdk>> = (0..20).map(|i| sdk(&cluster, &format!("gw-{i}"), &clock)).collect();
    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..USERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let spenders: Vec<_> = sdks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let h = s.handle(&format!("acme/users/u{}", i % USERS), "tokens");
            spender(h, admitted.clone(), i % USERS, stop.clone())
        })
        .collect();
    let total = |a: &Vec<AtomicU64>| a.iter().map(|x| x.load(Ordering::Relaxed)).sum::<u64>();
    eventually("the gateways are spending", Duration::from_secs(30), || {
        let n = total(&admitted);
        async move { n > 20_000 }
    })
    .await;

    let addrs: Vec<std::net::SocketAddr> = cluster.addrs.values().copied().collect();
    let freeze = |frozen: bool, id: u64| v1::FreezeRequest {
        meta: meta("sdk-admin", id, "ops"),
        path: "acme/users".into(),
        frozen,
    };
    let asked = Instant::now();
    let before = total(&admitted);
    let reply = ration_testkit::until_answered!(addrs, freeze_budget, freeze(true, 10)).unwrap();
    let answered = Instant::now();
    assert!(reply.changed);
    let held = reply.held.iter().find(|h| h.unit == "tokens").unwrap().amount as u64;
    // Spending goes on until the leases live at the freeze run out.
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let mut last = None;
    for s in spenders {
        last = last.max(s.await.unwrap());
    }
    // Read once every spender has stopped: a lease still live after the sleep
    // admits until then (read before the stop, a few admissions went uncounted
    // here while the ledger counted them).
    let frozen_total = total(&admitted);
    for s in &sdks {
        s.release_all().await.unwrap();
    }
    let addr = cluster.addrs[&cluster.leader().await];
    let record = audit(addr, "acme/users", "budget_frozen").await;
    assert_eq!(record.len(), 1);
    let at = record[0].balances.iter().find(|b| b.budget == "acme/users").unwrap().clone();
    // Nothing was granted under it after the freeze applied.
    let req = v1::QueryAuditRequest {
        subtree: "acme/users".into(),
        kinds: vec!["lease_granted".into()],
        from_seq: record[0].seq + 1,
        limit: 1000,
        linearizable: true,
        ..Default::default()
    };
    let granted = ledger(addr).query_audit(req).await.unwrap().into_inner().records;
    assert!(granted.is_empty(), "granted after the freeze: {granted:?}");
    assert_eq!(at.outstanding as u64, held, "the reply and the record agree");
    let (final_consumed, outstanding) = consumed(addr, "acme/users").await;
    assert_eq!(outstanding, 0);
    assert_eq!(final_consumed as u64, frozen_total, "the ledger counts exactly what was admitted");
    let after = final_consumed as u64 - at.consumed as u64;
    let since_asked = frozen_total - before;
    let last_ms = last.map_or(0, |t| t.saturating_duration_since(answered).as_millis());
    eprintln!(
        "freeze: {after} spent after it applied, bound {held} (live leases then); \
         {since_asked} admitted after it was asked; the reply took {} ms; \
         the last admission came {last_ms} ms after the reply",
        answered.duration_since(asked).as_millis()
    );
    assert!(after <= held, "spent {after} after the freeze, above the {held} its leases held");

    // Unfrozen, spending resumes.
    let reply = ration_testkit::until_answered!(addrs, freeze_budget, freeze(false, 11)).unwrap();
    assert!(reply.changed);
    let s = sdk(&cluster, "gw-after", &clock);
    let h = s.handle("acme/users/u0", "tokens");
    eventually("spending resumes", Duration::from_secs(30), || {
        let ok = h.try_spend(1);
        async move { ok }
    })
    .await;
    s.release_all().await.unwrap();
    cluster.shutdown().await;
}

/// Issue #20: agent runs. `runs` has a template: 1,000 calls and 100,000 tokens
/// per run, 6 s at most, and a runaway guard of 50 calls per 60 s. A run calling
/// in a tight loop is halted in its first span, having spent at most the guard's
/// 50 calls; a slow run is not halted and spends nothing past its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_run_is_halted_within_its_guard_and_no_run_outlives_its_duration() {
    const GUARD: u64 = 50;
    const DURATION_MS: u64 = 6_000;
    let cluster = Cluster::start(3, |_| {}).await;
    let addrs: Vec<std::net::SocketAddr> = cluster.addrs.values().copied().collect();
    budget(addrs[0], 1, "runs", 1_000_000, None).await;
    let req = v1::SetTemplateRequest {
        meta: meta("sdk-admin", 2, "ops"),
        parent: "runs".into(),
        limits: vec![
            ration_testkit::limit("calls", 1_000, Period::Lifetime),
            ration_testkit::limit("tokens", 100_000, Period::Lifetime),
        ],
        max_instances: 100,
        idle_ms: 0,
        max_duration_ms: DURATION_MS,
        guards: vec![v1::Guard { unit: "calls".into(), max: GUARD as i64, per_ms: 60_000 }],
    };
    ration_testkit::until_answered!(addrs, set_template, req).unwrap();
    let clock = CoarseClock::new();
    clock.start_ticking();
    let s = sdk(&cluster, "gw-agents", &clock);
    let runaway = s.reserver([("runs/loop", "calls"), ("runs/loop", "tokens")]);
    let slow = s.reserver([("runs/slow", "calls"), ("runs/slow", "tokens")]);
    let started = Instant::now();
    let (mut loop_calls, mut slow_calls) = (0u64, 0u64);
    let (mut first_slow, mut last_slow) = (None, None);
    let mut next_slow = Instant::now();
    // The loop calls as fast as it can (a 1 ms pause lets the SDK work); the slow
    // run calls every 300 ms, 20 calls in its 6 s at most.
    while started.elapsed() < Duration::from_millis(DURATION_MS + 4_000) {
        if let Some(h) = runaway.reserve([1, 100]) {
            h.settle([1, 80]);
            loop_calls += 1;
        }
        if Instant::now() >= next_slow {
            next_slow += Duration::from_millis(300);
            if let Some(h) = slow.reserve([1, 100]) {
                h.settle([1, 80]);
                slow_calls += 1;
                first_slow = first_slow.or(Some(Instant::now()));
                last_slow = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.release_all().await.unwrap();
    let leader = cluster.addrs[&cluster.leader().await];
    let halted = audit(leader, "runs", "run_halted").await;
    assert_eq!(halted.len(), 1, "only the loop was halted: {halted:?}");
    assert_eq!(halted[0].budget, "runs/loop");
    let created = audit(leader, "runs/loop", "budget_created").await;
    let halted_after = halted[0].time_ms.saturating_sub(created[0].time_ms);
    let get = |path: &'static str| async move {
        ledger(leader)
            .get_budget(v1::GetBudgetRequest { path: path.into(), linearizable: true })
            .await
            .unwrap()
            .into_inner()
    };
    let run = get("runs/loop").await;
    assert!(run.frozen && run.hold.contains("runaway guard"), "{run:?}");
    let ledger_calls = run.limits[0].consumed as u64;
    eprintln!(
        "runaway: {loop_calls} calls admitted (guard {GUARD} per span), ledger {ledger_calls}; \
         halted {halted_after} ms after it began. slow run: {slow_calls} calls"
    );
    assert!(loop_calls <= GUARD, "the runaway spent {loop_calls} > its guard {GUARD}");
    assert_eq!(ledger_calls, loop_calls, "the ledger counts every admitted call");
    assert_eq!(run.limits[1].consumed as u64, loop_calls * 80);
    let slow_run = get("runs/slow").await;
    assert!(!slow_run.frozen, "the slow run was not halted: {slow_run:?}");
    assert_eq!(slow_run.limits[0].consumed as u64, slow_calls);
    // Its leases ended with it: nothing was spent after its 6 s (measured from its
    // first call, which came after the acquire that made it).
    let lived = last_slow.unwrap().duration_since(first_slow.unwrap());
    assert!(lived <= Duration::from_millis(DURATION_MS), "the slow run spent for {lived:?}");
    assert!(slow_calls >= 5, "the slow run made only {slow_calls} calls");
    let e = ledger(leader)
        .acquire(v1::AcquireRequest {
            meta: meta("late", 1, "gw-agents"),
            budget: "runs/slow".into(),
            unit: "calls".into(),
            wanted: 1,
            min: 1,
            ttl_ms: 1_000,
            starts_at_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("ended"), "{e}");
    cluster.shutdown().await;
}

/// Issue #20: a limit on calls in flight. 500 callers on 5 gateways take a slot
/// per call (`Sdk::slot`) on a budget allowing 10 calls in flight. Two gateways
/// crash part way (their callers abandon the slots they hold, unreleased). At no
/// moment are more than 10 calls in flight, the crashed gateways' slots come back
/// when their leases expire, and every call counts once on the lifetime limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_never_exceed_the_limit_through_gateway_crashes() {
    const N: u64 = 10;
    const CALLERS: u64 = 500;
    const MAX_CALL: Duration = Duration::from_secs(2);
    let cluster = Cluster::start(3, |_| {}).await;
    let addrs: Vec<std::net::SocketAddr> = cluster.addrs.values().copied().collect();
    let req = v1::CreateBudgetRequest {
        meta: meta("sdk-admin", 1, "ops"),
        path: "agents".into(),
        limits: vec![
            ration_testkit::limit("calls", 1_000_000, Period::Lifetime),
            ration_testkit::limit("calls", N as i64, Period::Concurrent),
        ],
    };
    ration_testkit::until_answered!(addrs, create_budget, req).unwrap();
    let clock = CoarseClock::new();
    clock.start_ticking();
    let sdks: Vec<Arc<Sdk>> = (0..5).map(|i| sdk(&cluster, &format!("gw-{i}"), &clock)).collect();
    let crashed: Arc<Vec<AtomicBool>> = Arc::new((0..5).map(|_| AtomicBool::new(false)).collect());
    let in_flight = Arc::new(AtomicU64::new(0));
    let by_gateway: Arc<Vec<AtomicU64>> = Arc::new((0..5).map(|_| AtomicU64::new(0)).collect());
    let most = Arc::new(AtomicU64::new(0));
    let (calls, abandoned) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let gw = (i % 5) as usize;
            let s = sdks[gw].clone();
            let (crashed, in_flight, most) = (crashed.clone(), in_flight.clone(), most.clone());
            let by_gateway = by_gateway.clone();
            let (calls, abandoned, stop) = (calls.clone(), abandoned.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) && !crashed[gw].load(Ordering::Relaxed) {
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let Ok(slot) = s.slot("agents", "calls", MAX_CALL).await else {
                        // Refused (all in flight) or no answer: try again later.
                        tokio::time::sleep(Duration::from_millis(200 + (n >> 33) % 300)).await;
                        continue;
                    };
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    by_gateway[gw].fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20 + (n >> 40) % 60)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    by_gateway[gw].fetch_sub(1, Ordering::SeqCst);
                    if crashed[gw].load(Ordering::Relaxed) {
                        // The gateway died mid-call: nothing is released.
                        slot.abandon();
                        abandoned.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    if slot.end(1).await.is_ok() {
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Each crash comes while the gateway has calls in flight.
    for (gw, after) in [(0, 3), (1, 1)] {
        tokio::time::sleep(Duration::from_secs(after)).await;
        eventually("the gateway has a call in flight", Duration::from_secs(30), || {
            let busy = by_gateway[gw].load(Ordering::SeqCst) > 0;
            if busy {
                crashed[gw].store(true, Ordering::Relaxed);
            }
            async move { busy }
        })
        .await;
    }
    // The crashed gateways' slots expire within their ttl (MAX_CALL, a round's
    // deadline and the margin); then the survivors fill every slot again.
    let ttl = MAX_CALL + sdks[0].cluster().round_deadline() + sdks[0].lease_margin();
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    most.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let recovered = most.load(Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let leader = cluster.addrs[&cluster.leader().await];
    let b = ledger(leader)
        .get_budget(v1::GetBudgetRequest { path: "agents".into(), linearizable: true })
        .await
        .unwrap()
        .into_inner();
    let (lifetime, concurrent) = (&b.limits[0], &b.limits[1]);
    let overall = most.load(Ordering::SeqCst).max(recovered);
    eprintln!(
        "calls in flight: at most {overall} (limit {N}), {recovered} after the crashes; \
         {} calls ended, {} abandoned by crashed gateways; ledger: {} consumed, \
         {} in flight now",
        calls.load(Ordering::Relaxed),
        abandoned.load(Ordering::Relaxed),
        lifetime.consumed,
        concurrent.outstanding
    );
    assert!(overall <= N, "{overall} calls were in flight at once, above {N}");
    assert_eq!(recovered, N, "the crashed gateways' slots came back");
    assert!(abandoned.load(Ordering::Relaxed) > 0, "a crash abandoned no slot");
    assert_eq!(concurrent.consumed, 0);
    assert!(concurrent.outstanding as u64 <= N);
    // Every ended call counted once; an abandoned one counts its unit at expiry.
    let ended = calls.load(Ordering::Relaxed);
    let counted = lifetime.consumed as u64;
    assert!(counted >= ended && counted <= ended + abandoned.load(Ordering::Relaxed) + N);
    cluster.shutdown().await;
}

/// A gateway that meets many budgets (a user's, a run's) keeps only those in use:
/// a pair nothing holds (no handle, reserver or reservation), unused for
/// `idle_after`, is forgotten, and its leases go back to the ledger with exactly
/// what was spent, overruns included. A held handle or an open reservation keeps
/// its pair, and a forgotten pair used again is stocked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pairs_are_forgotten_and_their_leases_go_back_with_what_was_spent() {
    const N: usize = 20;
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    for i in 0..N {
        budget(addr, i as u64 + 1, &format!("idle-{i}"), 100_000, None).await;
    }
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
    let mut config = SdkConfig::new(endpoints, "gw-idle");
    config.idle_after = Duration::from_secs(2);
    let s = Sdk::start(config, clock.clone()).unwrap();
    // Each pair spends once; the first uses far beyond what it reserved and
    // what its leases hold (an overrun, reported to the ledger). One pair stays
    // held by a handle, another by an open reservation.
    let mut used = [0i64; N];
    let mut handle = None;
    let mut open = None;
    for (i, u) in used.iter_mut().enumerate() {
        let path = format!("idle-{i}");
        let r = s.reserve_waiting(&[(&path, "tokens", 10)], Duration::from_secs(20)).await;
        let r = r.unwrap_or_else(|| panic!("{path}: no lease"));
        if i == 2 {
            open = Some(r);
            continue;
        }
        let spent = if i == 0 { 10 + s.held(&path, "tokens").1 + 1_000 } else { 3 + i as u64 };
        r.settle(&[spent]);
        *u = spent as i64;
        if i == 0 {
            assert!(s.gateway_overruns(&path, "tokens") >= 1_000, "the first pair overran");
        }
        if i == 1 {
            handle = Some(s.handle(&path, "tokens"));
        }
    }
    let (handle, open) = (handle.unwrap(), open.unwrap());
    eventually("unheld pairs are forgotten", Duration::from_secs(30), || {
        let n = (s.tracked_len(), s.gateway().len());
        async move { n == (2, 2) }
    })
    .await;
    for (i, u) in used.iter().enumerate().skip(3) {
        let path = format!("idle-{i}");
        eventually(&format!("{path}: its leases are back"), Duration::from_secs(10), || {
            let path = path.clone();
            async move { consumed(addr, &path).await == (*u, 0) }
        })
        .await;
    }
    eventually("idle-0: its overrun is counted", Duration::from_secs(10), || {
        let u = used[0];
        async move { consumed(addr, "idle-0").await == (u, 0) }
    })
    .await;
    // The held pairs still hold leases, and still spend from them.
    assert!(consumed(addr, "idle-1").await.1 > 0, "a held pair keeps its lease");
    assert!(handle.try_spend(1));
    open.settle(&[4]);
    drop(handle);
    eventually("released pairs are forgotten in turn", Duration::from_secs(30), || {
        let n = (s.tracked_len(), s.gateway().len());
        async move { n == (0, 0) }
    })
    .await;
    eventually("idle-1 and idle-2: exactly what was spent", Duration::from_secs(10), || {
        let (one, two) = (used[1] + 1, used[2] + 4);
        async move {
            consumed(addr, "idle-1").await == (one, 0) && consumed(addr, "idle-2").await == (two, 0)
        }
    })
    .await;
    // Used again: stocked again, from nothing.
    let r = s.reserve_waiting(&[("idle-3", "tokens", 10)], Duration::from_secs(20)).await;
    r.expect("a forgotten pair is stocked again when used").settle(&[10]);
    assert_eq!(s.tracked_len(), 1);
    s.release_all().await.unwrap();
    assert_eq!(consumed(addr, "idle-3").await, (used[3] + 10, 0));
    cluster.shutdown().await;
}

/// A pair holding an emergency reserve (a fail-static budget) is forgotten like
/// any other once idle: its reserve lease goes back to the ledger with its other
/// leases, nothing outstanding is left behind, and used again it is stocked
/// again, reserve included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_pair_gives_its_emergency_reserve_back() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    // A cap far above what the leases take: a lease may take all that remains of
    // a small cap, and the reserve then waits for it to come back.
    budget(addr, 1, "static-idle", 10_000_000, Some(50)).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints = cluster.addrs.values().map(|a| a.to_string()).collect();
    let mut config = SdkConfig::new(endpoints, "gw-reserve-idle");
    config.idle_after = Duration::from_secs(2);
    let s = Sdk::start(config, clock.clone()).unwrap();
    let r = s.reserve_waiting(&[("static-idle", "tokens", 10)], Duration::from_secs(20)).await;
    r.expect("a lease").settle(&[7]);
    // The reserve is held: 50 outstanding beyond what the leases hold unspent.
    eventually("the reserve is held", Duration::from_secs(20), || async {
        let unspent = s.held("static-idle", "tokens").1 as i64;
        consumed(addr, "static-idle").await.1 >= 50 + unspent
    })
    .await;
    eventually("the idle pair is forgotten", Duration::from_secs(30), || {
        let n = (s.tracked_len(), s.gateway().len());
        async move { n == (0, 0) }
    })
    .await;
    assert!(s.forgotten() >= 1);
    eventually("its leases and its reserve are back", Duration::from_secs(10), || async {
        consumed(addr, "static-idle").await == (7, 0)
    })
    .await;
    // Used again: leases and a reserve again (held by a handle meanwhile, so it is
    // not forgotten again while this looks).
    let held = s.handle("static-idle", "tokens");
    let r = s.reserve_waiting(&[("static-idle", "tokens", 10)], Duration::from_secs(20)).await;
    r.expect("a forgotten pair is stocked again when used").settle(&[5]);
    eventually("the reserve is held again", Duration::from_secs(20), || async {
        let unspent = s.held("static-idle", "tokens").1 as i64;
        consumed(addr, "static-idle").await.1 >= 50 + unspent
    })
    .await;
    drop(held);
    s.release_all().await.unwrap();
    assert_eq!(consumed(addr, "static-idle").await, (12, 0));
    cluster.shutdown().await;
}

/// A gateway's first lease is asked for before its policy is known; on a small cap
/// it could take all that remains and leave no room for the emergency reserve the
/// policy asks for. The reserve is asked for ahead of the leases; a second gateway
/// that finds the cap leased out is refused its reserve, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_emergency_reserve_comes_before_leases_on_a_small_cap() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    // The SDK's first lease asks for 100 (`SdkConfig::initial_request`): all of it.
    budget(addr, 1, "static-small", 100, Some(40)).await;
    // Readable on every member, so the SDK learns the policy in its first round
    // (from a member that had not applied the budget yet, a round later: then the
    // reserve is refused once and room is made, `refill.rs::room_for_a_reserve_…`).
    for member in cluster.addrs.values().copied() {
        eventually("every member has the budget", Duration::from_secs(10), || async move {
            let read = v1::GetBudgetRequest { path: "static-small".into(), linearizable: false };
            ledger(member).get_budget(read).await.is_ok()
        })
        .await;
    }
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints: Vec<String> = cluster.addrs.values().map(|a| a.to_string()).collect();
    let a = Sdk::start(SdkConfig::new(endpoints.clone(), "gw-small-a"), clock.clone()).unwrap();
    let r = a.reserve_waiting(&[("static-small", "tokens", 10)], Duration::from_secs(20)).await;
    r.expect("a lease").settle(&[10]);
    eventually("the reserve is held beside the lease", Duration::from_secs(10), || {
        let held = a.reserve_held("static-small", "tokens");
        async move { held == 40 }
    })
    .await;
    // The reserve is real allowance: the lease got what the reserve left.
    let (_, unspent) = a.held("static-small", "tokens");
    assert_eq!(unspent, 50, "a lease of 60 less the 10 spent");
    eventually("the spend is reported; the rest is held", Duration::from_secs(10), || async {
        consumed(addr, "static-small").await == (10, 90)
    })
    .await;
    assert_eq!(a.reserves_refused(), 0);
    // A second gateway finds nothing left for its reserve: refused, and counted.
    let b = Sdk::start(SdkConfig::new(endpoints, "gw-small-b"), clock.clone()).unwrap();
    let _handle = b.handle("static-small", "tokens");
    eventually("the second reserve is refused", Duration::from_secs(10), || {
        let n = b.reserves_refused();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(b.reserve_held("static-small", "tokens"), 0);
    b.release_all().await.unwrap();
    a.release_all().await.unwrap();
    assert_eq!(consumed(addr, "static-small").await, (10, 0));
    cluster.shutdown().await;
}

/// A limit's `static=` changed on the ledger reaches a gateway that keeps running
/// (`SdkConfig::policy_refresh`): its reserve is given back when the limit fails
/// closed, and taken again, at the new size, when it declares one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_fail_policy_reaches_a_running_gateway() {
    let cluster = Cluster::start(3, |_| {}).await;
    let addr = cluster.addrs[&cluster.leader().await];
    budget(addr, 1, "static-change", 1_000_000, Some(40)).await;
    let clock = CoarseClock::new();
    clock.start_ticking();
    let endpoints: Vec<String> = cluster.addrs.values().map(|a| a.to_string()).collect();
    let mut config = SdkConfig::new(endpoints, "gw-policy");
    config.policy_refresh = Duration::from_secs(1);
    let s = Sdk::start(config, clock.clone()).unwrap();
    let _handle = s.handle("static-change", "tokens");
    let held = |n: u64| {
        let s = s.clone();
        move || {
            let got = s.reserve_held("static-change", "tokens");
            async move { got == n }
        }
    };
    eventually("the reserve is held", Duration::from_secs(10), held(40)).await;
    let update = |id: u64, static_allowance: Option<i64>| async move {
        let version = ledger(addr)
            .get_budget(v1::GetBudgetRequest { path: "static-change".into(), linearizable: true })
            .await
            .unwrap()
            .into_inner()
            .version;
        let mut limit = ration_testkit::limit("tokens", 1_000_000, Period::Lifetime);
        limit.static_allowance = static_allowance;
        let req = v1::UpdateBudgetRequest {
            meta: meta("sdk-admin", id, "ops"),
            path: "static-change".into(),
            limits: vec![limit],
            expected_version: version,
        };
        ration_testkit::until_answered!([addr], update_budget, req).unwrap();
    };
    update(2, None).await;
    eventually(
        "the reserve goes back once the limit fails closed",
        Duration::from_secs(10),
        held(0),
    )
    .await;
    // And stays back (a renewal gives a reserve back for a moment, then takes it
    // again under the policy it knows).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.reserve_held("static-change", "tokens"), 0);
    update(3, Some(25)).await;
    eventually("a reserve of the new size is taken", Duration::from_secs(10), held(25)).await;
    s.release_all().await.unwrap();
    assert_eq!(consumed(addr, "static-change").await, (0, 0));
    cluster.shutdown().await;
}
