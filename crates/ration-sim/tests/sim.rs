//! The deterministic simulation, as tests. CI runs 130 seeds from a range that
//! changes every run (printed; `RATION_SIM_FIRST_SEED`/`RATION_SIM_SEEDS` pin it),
//! 20 more with 5 voters, the known failures, pinned regression seeds, scripted
//! scenarios and a replay check. A failure prints the seed and its replay command.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use ration_sim::{rotating_first_seed, run, scenario, seeds_from_env, Failure, Report, SimConfig};

/// Seeds that fail for a reason not fixed yet: (seed, voters, what is wrong). CI
/// still runs each one on every run and reports whether it still fails; none is
/// ever skipped silently.
const KNOWN_FAILURES: &[(u64, u64, &str)] = &[];

#[derive(Default)]
struct Totals {
    faults: BTreeMap<&'static str, u64>,
    admitted: u64,
    cap: u64,
    crashes: u64,
    lost_bytes: u64,
    unknown: u64,
    grants: u64,
    snapshotted: u64,
    core_stops: u64,
    checked: u64,
    shared_terms: u64,
    events: BTreeMap<&'static str, u64>,
    overruns: u64,
    calls: u64,
    /// The most ledger time was seen ahead of true time in any run, in ms.
    ledger_ahead_max_ms: i64,
    /// Runs whose voters were in regions (`SimConfig::regions`).
    region_runs: u64,
}

impl Totals {
    fn add(&mut self, r: &Report) {
        for (k, v) in &r.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.admitted += r.admitted;
        self.cap += r.cap;
        self.crashes += r.crashes;
        self.lost_bytes += r.unsynced_bytes_lost;
        self.unknown += r.probes_unknown;
        self.grants += r.probe_grants;
        self.snapshotted += u64::from(r.snapshot_index > 0);
        self.core_stops += r.core_stops.len() as u64;
        self.checked += r.entries_checked;
        self.shared_terms += r.shared_terms;
        for (k, v) in &r.events {
            *self.events.entry(k).or_default() += v;
        }
        self.overruns += r.overruns;
        self.calls += r.calls_admitted;
        self.ledger_ahead_max_ms = self.ledger_ahead_max_ms.max(r.ledger_ahead_max_ms);
    }
}

/// Whether a seed of the scans (and its replay) puts its voters in regions 30-150 ms
/// apart (`SimConfig::regions`, issue 22): one seed in four, or every seed with
/// `RATION_SIM_REGIONS=1`, none with `RATION_SIM_REGIONS=0`.
fn regions_for(seed: u64) -> bool {
    match std::env::var("RATION_SIM_REGIONS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => seed % 4 == 1,
    }
}

/// Whether a seed of the scans (and its replay) has its fail-closed leaves made by a
/// template on the root (`SimConfig::templates`, issue 20): one seed in two, or
/// every seed with `RATION_SIM_TEMPLATES=1`, none with `RATION_SIM_TEMPLATES=0`.
fn templates_for(seed: u64) -> bool {
    match std::env::var("RATION_SIM_TEMPLATES").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => seed % 2 == 0,
    }
}

/// Runs `seeds` with `nodes` voters; prints a summary; returns the failures.
fn run_seeds(seeds: std::ops::Range<u64>, nodes: u64) -> (Totals, Vec<Failure>) {
    let started = std::time::Instant::now();
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    let n = seeds.end - seeds.start;
    eprintln!(
        "running {n} seeds {}..{} with {nodes} voters (replay the range with RATION_SIM_FIRST_SEED={} RATION_SIM_SEEDS={n})",
        seeds.start, seeds.end, seeds.start
    );
    for seed in seeds {
        let t0 = std::time::Instant::now();
        // `RATION_SIM_WAL=0`: the in-memory log store instead of the write-ahead log;
        // `RATION_SIM_EXTENDED=0`: the fault mix and budgets before issue 12.
        let wal = std::env::var("RATION_SIM_WAL").map_or(true, |v| v != "0");
        let extended = std::env::var("RATION_SIM_EXTENDED").map_or(true, |v| v != "0");
        let regions = regions_for(seed);
        let templates = templates_for(seed);
        match run(&SimConfig { nodes, wal, extended, regions, templates, ..SimConfig::new(seed) }) {
            Ok(r) => {
                totals.region_runs += u64::from(regions);
                if std::env::var_os("RATION_SIM_VERBOSE").is_some() {
                    eprintln!(
                        "seed {seed}: {:.1?} wall, {} ms simulated, applied {}, snapshot at {}, admitted {} (ledger {}, overruns {}), ledger time ahead at most {} ms, {:?}, {:?}, core stops {:?}",
                        t0.elapsed(),
                        r.sim_ms,
                        r.applied_index,
                        r.snapshot_index,
                        r.admitted,
                        r.ledger_consumed,
                        r.overruns,
                        r.ledger_ahead_max_ms,
                        r.faults,
                        r.events,
                        r.core_stops
                    );
                }
                totals.add(&r);
            }
            Err(f) => {
                eprintln!("{f}");
                failures.push(f);
            }
        }
    }
    eprintln!(
        "{n} seeds ({nodes} voters) in {:.1?}: {} failed; faults {:?}; events {:?}; gateways admitted {} of {} cap in total ({} units of overruns counted by the ledger, {} priced calls); ledger time at most {} ms ahead of true time; {} crashes ({} unsynced bytes lost to power cuts); {} Raft cores stopped and were restarted; probe grants {}, unknown outcomes {}; runs with snapshots: {}; committed entries cross-checked: {}; terms with two leaders: {}; runs with voters in regions 30-150 ms apart: {}",
        started.elapsed(),
        failures.len(),
        totals.faults,
        totals.events,
        totals.admitted,
        totals.cap,
        totals.overruns,
        totals.calls,
        totals.ledger_ahead_max_ms,
        totals.crashes,
        totals.lost_bytes,
        totals.core_stops,
        totals.grants,
        totals.unknown,
        totals.snapshotted,
        totals.checked,
        totals.shared_terms,
        totals.region_runs,
    );
    (totals, failures)
}

#[test]
fn many_seeds_keep_every_invariant() {
    let seeds = seeds_from_env(130);
    let n = seeds.end - seeds.start;
    let (totals, failures) = run_seeds(seeds, 3);
    let failing: Vec<u64> = failures.iter().map(|f| f.seed).collect();
    assert!(failing.is_empty(), "failing seeds: {failing:?} (each printed its replay command)");
    // The runs must actually stress the system, or passing means nothing.
    assert!(totals.faults.values().sum::<u64>() >= n * 3, "too few faults: {:?}", totals.faults);
    assert!(
        totals.admitted * 10 >= totals.cap * 7,
        "gateways spent only {} of {}: the cap was not approached",
        totals.admitted,
        totals.cap
    );
    assert!(
        totals.snapshotted * 2 >= n,
        "snapshots happened in only {} of {n} runs",
        totals.snapshotted
    );
    assert!(
        totals.checked >= n * 20,
        "only {} committed entries were cross-checked",
        totals.checked
    );
    // The faults and traffic of issue 12 happened (unless RATION_SIM_EXTENDED=0).
    if std::env::var("RATION_SIM_EXTENDED").map_or(true, |v| v != "0") && n >= 100 {
        assert!(totals.region_runs > 0, "no run had its voters in regions");
        for fault in ["flapping_links", "clock_step", "isolate_gateway"] {
            assert!(totals.faults.get(fault).copied().unwrap_or(0) > 0, "no {fault} fault");
        }
        let event = |k: &str| totals.events.get(k).copied().unwrap_or(0);
        assert!(
            event("settle_overrun") > 0 && totals.overruns > 0,
            "no overruns: {:?}",
            totals.events
        );
        assert!(
            event("sdk_forgotten_pairs") > 0,
            "no gateway forgot an idle pair: {:?}",
            totals.events
        );
        assert!(
            event("reserve_units_spent") > 0,
            "no emergency reserve spent: {:?}",
            totals.events
        );
        assert!(
            event("window_rollover") * 2 >= n,
            "a window rolled over under faults in only {} of {n} runs",
            event("window_rollover")
        );
    }
}

#[test]
fn five_voters_keep_every_invariant() {
    // Its own rotating range, distinct from the 3-voter one.
    let first = std::env::var("RATION_SIM_FIRST_SEED_5")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rotating_first_seed() + 500);
    let n = std::env::var("RATION_SIM_SEEDS_5").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let (_, failures) = run_seeds(first..first + n, 5);
    let failing: Vec<u64> = failures.iter().map(|f| f.seed).collect();
    assert!(failing.is_empty(), "failing seeds with 5 voters: {failing:?}");
}

/// Every known failure runs on every CI run, and its status is printed.
#[test]
fn known_failures_are_run_and_reported() {
    if KNOWN_FAILURES.is_empty() {
        eprintln!("known failures: none");
    }
    for (seed, nodes, what) in KNOWN_FAILURES {
        match run(&SimConfig { nodes: *nodes, ..SimConfig::new(*seed) }) {
            Ok(_) => eprintln!("KNOWN FAILURE NOW PASSES: seed {seed} ({nodes} voters): {what}; remove it from KNOWN_FAILURES"),
            Err(f) => eprintln!("KNOWN FAILURE STILL FAILS: {what}\n{f}"),
        }
    }
}

/// The four seeds of issue 10, from 3,000 that CI never ran: 41642 and 41755
/// stopped a leader's Raft core for good (the openraft race); 41435 and 42918 had
/// two leaders in one term, which is legal in openraft's default leader-id mode
/// and was flagged by a wrong check. Their schedules change whenever the fault
/// mix does, so each mechanism also has a scripted scenario below.
#[test]
fn issue_10_seeds_pass() {
    let mut shared = 0;
    for seed in [41642, 41755, 41435, 42918] {
        // The fault mix of that time (no disk failures, nothing of issue 12).
        let cfg =
            SimConfig { disk_failures: false, wal: false, extended: false, ..SimConfig::new(seed) };
        let r = run(&cfg).unwrap_or_else(|f| panic!("{f}"));
        eprintln!(
            "seed {seed}: applied {}, core stops {:?}, terms with two leaders {}",
            r.applied_index, r.core_stops, r.shared_terms
        );
        shared += r.shared_terms;
    }
    // Their schedules have moved since (leadership transfers no longer re-trigger
    // elections every 150 ms, which is what put two candidates in one term): none of
    // them, and none of seeds 41000-45999 (`scan_two_leader_seeds`), has a term with
    // two leaders now; `two_leaders_in_one_term_pass_the_check` pins a seed that
    // does. Every seed still runs the check that replaced "one leader per term" (no
    // two replicas apply different entries at one index).
    eprintln!("terms with two leaders over the four seeds: {shared}");
}

/// A seed (5 voters, the fault mix before issue 12) in which two nodes led the same
/// term, legal in openraft's default leader-id mode: every check holds through it.
/// Found with `RATION_SIM_NODES=5 RATION_SIM_DISK_FAILURES=1 RATION_SIM_WAL=1
/// RATION_SIM_SCAN=a..b cargo test --release -p ration-sim --test sim
/// scan_two_leader_seeds -- --ignored --nocapture`, before issue 12; it still has
/// such a term with `extended: false` (none of 600 seeds with the issue-12 mix,
/// 1029936776000..1029936776600, has one). When a change moves schedules so that
/// it no longer has such a term, find another the same way.
/// Its nodes send a heartbeat at every commit, as all nodes did when it was found
/// (`commit_heartbeat`; off since, which moved its schedule).
#[test]
fn two_leaders_in_one_term_pass_the_check() {
    let seed = 1_029_936_776_237;
    let cfg =
        SimConfig { nodes: 5, extended: false, commit_heartbeat: true, ..SimConfig::new(seed) };
    let r = run(&cfg).unwrap_or_else(|f| panic!("{f}"));
    eprintln!(
        "seed {seed}: terms with two leaders {}, applied {}",
        r.shared_terms, r.applied_index
    );
    assert!(r.shared_terms >= 1, "seed {seed} no longer has a term with two leaders: re-pin it");
}

/// Lists the seeds in `RATION_SIM_SCAN` (`first..end`) whose run, with the fault mix
/// of `issue_10_seeds_pass`, had a term with two leaders: for re-pinning those
/// seeds when a change moves the schedules (`cargo test --release -p ration-sim
/// --test sim scan_two_leader_seeds -- --ignored --nocapture`).
#[test]
#[ignore]
fn scan_two_leader_seeds() {
    let range = std::env::var("RATION_SIM_SCAN").unwrap_or_else(|_| "41000..41500".into());
    let (a, b) = range.split_once("..").expect("RATION_SIM_SCAN is first..end");
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    // The fault mix of `issue_10_seeds_pass` unless RATION_SIM_NODES /
    // RATION_SIM_DISK_FAILURES / RATION_SIM_WAL say otherwise (as for `replay`).
    let nodes = std::env::var("RATION_SIM_NODES").map_or(3, |n| n.parse().unwrap());
    let disk_failures = std::env::var("RATION_SIM_DISK_FAILURES").is_ok_and(|v| v != "0");
    let wal = std::env::var("RATION_SIM_WAL").is_ok_and(|v| v != "0");
    let extended = std::env::var("RATION_SIM_EXTENDED").is_ok_and(|v| v != "0");
    for seed in a..b {
        let cfg = SimConfig { nodes, disk_failures, wal, extended, ..SimConfig::new(seed) };
        match run(&cfg) {
            Ok(r) if r.shared_terms > 0 => {
                eprintln!("seed {seed}: {} shared terms", r.shared_terms)
            }
            Ok(_) => {}
            Err(f) => eprintln!("seed {seed} FAILED: {f}"),
        }
    }
}

#[test]
fn scenario_higher_vote_during_a_slow_purge() {
    let r = scenario::higher_vote_during_a_slow_purge().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{r:?}");
    assert!(
        r.race_hits >= 1,
        "the scenario never reached the race (the patched path was not taken): {r:?}"
    );
    assert!(r.core_stops.is_empty(), "a Raft core stopped: {:?}", r.core_stops);
    assert!(r.writes > 100 && r.entries_checked > 100, "too little happened: {r:?}");
}

#[test]
fn scenario_a_stopped_core_is_restarted() {
    let r = scenario::a_stopped_core_is_restarted().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{r:?}");
    assert_eq!(r.core_stops.len(), 1, "{r:?}");
    assert!(r.core_stops[0].contains("simulated disk failure"), "{r:?}");
    assert_eq!(r.restarts, 1, "{r:?}");
}

#[test]
fn scenario_forwarding_recovers_after_a_stalled_connection() {
    let r = scenario::forwarding_recovers_after_a_stalled_connection()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "first write through the follower {} ms after repair; {} after it",
        r.sim_ms, r.attempts
    );
    assert!(r.attempts > 10, "{r:?}");
}

/// Ledger time under two fast leader clocks in a row (soak seed 5036): within one
/// clock slack per forward step (checked while it runs); how far ahead it got is
/// printed (clocks 30 s fast are beyond the tolerance and not used at all).
#[test]
fn scenario_two_fast_leaders_in_a_row() {
    let r = scenario::two_fast_leaders_in_a_row().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "ledger time at most {} ms ahead of true time after two 30 s steps on successive leaders (clock slack 1000 ms); {r:?}",
        r.ledger_ahead_max_ms
    );
    assert!(r.writes > 50, "{r:?}");
    // Neither clock was used: no more ahead than a correct clock may be (150 ms).
    assert!(r.ledger_ahead_max_ms <= 170, "{r:?}");
}

/// Found by the soak after issue 10 (seed 1029936413438): the spare led, was cut
/// off, and every forward to it from the other nodes timed out for good (a stalled
/// channel was dropped only on UNAVAILABLE). Pinned with the fault mix it was
/// found under.
#[test]
fn soak_seed_with_a_stalled_forwarding_channel_passes() {
    let cfg = SimConfig { wal: false, extended: false, ..SimConfig::new(1_029_936_413_438) };
    run(&cfg).unwrap_or_else(|f| panic!("{f}"));
}

/// Found by CI's rotating seeds in session 10 (seed 29938155115): a leader transfer
/// left the cluster without a leader for 5.6 s (the target's elections restarted
/// every ~40 ms; see the note), the gateways shut down meanwhile with their
/// per-minute `calls` leases outstanding, and the check counted only what the
/// ledger had settled. Admitted calls are now held against settled spend plus what
/// live leases still hold (which the ledger charges whole at expiry).
#[test]
fn ci_seed_with_gateways_shut_down_while_leaderless_passes() {
    run(&SimConfig::new(29_938_155_115)).unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn a_seed_replays_exactly() {
    let a = run(&SimConfig::new(7)).unwrap();
    let b = run(&SimConfig::new(7)).unwrap();
    if cfg!(tokio_unstable) {
        assert_eq!(a, b, "seed 7 ran differently twice");
    } else {
        eprintln!("NOTE: built without --cfg tokio_unstable (RUSTFLAGS replaced .cargo/config.toml): runs are not reproducible; skipped the comparison");
    }
}

/// `RATION_SIM_SEED=<n> cargo test -p ration-sim --test sim replay -- --ignored --nocapture`
/// (`RATION_SIM_TRACE=1` prints a readable trace; `RATION_SIM_LOG=openraft=debug`
/// the nodes' own logs; `RATION_SIM_DISK_FAILURES=0` the fault mix without disk
/// failures and `RATION_SIM_WAL=0` the in-memory log store, as the pinned issue-10
/// seeds run; `RATION_SIM_EXTENDED=0` the fault mix and budgets before issue 12).
#[test]
#[ignore]
fn replay() {
    let seed = std::env::var("RATION_SIM_SEED").expect("set RATION_SIM_SEED").parse().unwrap();
    let nodes = std::env::var("RATION_SIM_NODES").map_or(3, |n| n.parse().unwrap());
    let disk_failures = std::env::var("RATION_SIM_DISK_FAILURES").map_or(true, |v| v != "0");
    let wal = std::env::var("RATION_SIM_WAL").map_or(true, |v| v != "0");
    let extended = std::env::var("RATION_SIM_EXTENDED").map_or(true, |v| v != "0");
    let regions = regions_for(seed);
    let templates = templates_for(seed);
    let config = SimConfig {
        nodes,
        disk_failures,
        wal,
        extended,
        regions,
        templates,
        ..SimConfig::new(seed)
    };
    match run(&config) {
        Ok(r) => eprintln!("{r:#?}"),
        Err(f) => panic!("{f}"),
    }
}

#[test]
fn scenario_per_minute_limit_across_boundaries() {
    let r = scenario::per_minute_limit_across_boundaries().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("cap {} per minute", r.cap);
    for (phase, rows) in [("half the cap", &r.below_cap), ("2.5x the cap", &r.above_cap)] {
        for (minute, admitted, refused) in rows.iter() {
            eprintln!("{phase}: minute {minute}: admitted {admitted}, refused {refused}");
        }
    }
    // Five whole minutes below the cap (six boundaries crossed while spending at
    // it), then three above it.
    assert_eq!((r.below_cap.len(), r.above_cap.len()), (5, 3), "{r:?}");
    for (minute, admitted, refused) in &r.below_cap {
        assert_eq!(
            *refused, 0,
            "minute {minute} refused calls below the cap ({admitted} admitted)"
        );
    }
    // The ledger holds each minute's window to the cap (the running checks). The
    // next window's lease opens at the boundary as measured from when it was asked
    // for, so in true time it may be spent up to one round trip early: a true-time
    // minute may admit what is spent in 100 ms (50 calls here) above the cap.
    for (minute, admitted, refused) in &r.above_cap {
        assert!(*admitted <= r.cap + 50, "minute {minute} admitted {admitted}, above the cap");
        // Refusals only once the minute's cap is really spent.
        assert!(
            *refused == 0 || *admitted >= r.cap,
            "minute {minute} refused {refused} with only {admitted} of {} admitted",
            r.cap
        );
    }
}
