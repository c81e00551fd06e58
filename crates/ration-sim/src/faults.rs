//! Fault injection: the kinds of [`Fault`], the schedule drawn from the seed
//! ([`Chaos`]), and how each fault is injected into the simulation and healed:
//! crashes, partitions, pauses, slow links, disk failures, the operator's
//! leadership and membership changes, and (`SimConfig::extended`) flapping links,
//! steps of a leader's wall clock and gateways cut off from the cluster.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use ration_store::mem::MemDisk;

use crate::actors::{current_leader, gateway_host, host, SimClock, RPC_DEADLINE_MS};
use crate::{Harness, SimConfig, MAX_MESSAGE_LATENCY};

/// The first fault comes this long after the budgets were accepted.
const FIRST_FAULT_AT_MS: u64 = 1_500;
/// A fault lasts this long before it is healed (drawn per fault) ...
const FAULT_DURATION_MS: Range<u64> = 300..2_500;
/// ... and the next one starts this long after (drawn per fault).
const FAULT_GAP_MS: Range<u64> = 200..1_500;
/// Slow links: the maximum message latency, usually (drawn per fault) ...
const SLOW_LINK_LATENCY_MS: Range<u64> = 20..120;
/// ... and sometimes, past the RPC deadline.
const PAST_DEADLINE_LINK_LATENCY_MS: Range<u64> = RPC_DEADLINE_MS..1500;
/// Flapping links: how long the flapping lasts, and how long each cut and each
/// repair lasts (drawn per fault).
const FLAP_DURATION_MS: Range<u64> = 1_000..4_000;
const FLAP_PERIOD_MS: Range<u64> = 100..500;
/// A gateway cut off from the cluster stays cut off this long (drawn per fault):
/// long enough, often, for its SDK to declare an outage (a round that tried every
/// node got no answer, and `outage_after` passed) once its leases reach their local
/// deadlines, and spend its emergency reserve.
const ISOLATE_GATEWAY_MS: Range<u64> = 2_500..6_000;
/// A stepped wall clock jumps by one of these (ms; drawn per fault).
const CLOCK_STEPS_MS: [i64; 4] = [30_000, YEAR_MS, -30_000, -YEAR_MS];
const YEAR_MS: i64 = 365 * 86_400_000;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    Crash(u64),
    /// Several nodes lose power at once (a rack, a zone): correlated crashes.
    CrashMany,
    PartitionLeader,
    IsolateFollower,
    OneWay,
    Pause(u64),
    SlowLinks,
    TransferLeader,
    AddSpare,
    RemoveSpare,
    /// A node's disk fails (every log write errors) until healed: openraft stops
    /// its Raft core, the host ends, and the supervisor restarts it (again and
    /// again while the disk is still failing).
    DiskFailure(u64),
    /// A gateway's or a node's links are cut and repaired in turn, every
    /// `period_ms`, until healed.
    Flap {
        target: FlapTarget,
        period_ms: u64,
    },
    /// The leader's wall clock steps by this many ms (forward if positive; its
    /// monotonic clock does not move) and steps back when healed.
    ClockStep(i64),
    /// A gateway is cut off from every node.
    IsolateGateway(u64),
}

/// What flaps: a gateway (its links to every node) or a node (its links to the
/// other nodes).
#[derive(Clone, Copy, Debug)]
pub(crate) enum FlapTarget {
    Gateway(u64),
    Node(u64),
}

impl Fault {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::Crash(_) => "crash_restart",
            Fault::CrashMany => "crash_majority",
            Fault::PartitionLeader => "partition_leader",
            Fault::IsolateFollower => "isolate_follower",
            Fault::OneWay => "one_way_partition",
            Fault::Pause(_) => "pause",
            Fault::SlowLinks => "slow_links",
            Fault::TransferLeader => "leader_transfer",
            Fault::AddSpare => "membership_add",
            Fault::RemoveSpare => "membership_remove",
            Fault::DiskFailure(_) => "disk_failure",
            Fault::Flap { .. } => "flapping_links",
            Fault::ClockStep(_) => "clock_step",
            Fault::IsolateGateway(_) => "isolate_gateway",
        }
    }

    /// Which kind of clock step, counted apart in the report's events.
    pub(crate) fn detail(self) -> Option<&'static str> {
        match self {
            Fault::ClockStep(YEAR_MS) => Some("clock_step_year_ahead"),
            Fault::ClockStep(ms) if ms == -YEAR_MS => Some("clock_step_year_back"),
            Fault::ClockStep(ms) if ms > 0 => Some("clock_step_30s_ahead"),
            Fault::ClockStep(_) => Some("clock_step_30s_back"),
            _ => None,
        }
    }
}

/// A fault in force.
struct Active {
    /// Healed at, in ms since chaos began.
    until: u64,
    /// Injected at, in ms since chaos began.
    since: u64,
    fault: Fault,
    /// What to undo: host names, by fault kind.
    undo: Vec<String>,
    /// Flapping links: whether they are cut now.
    cut: bool,
}

/// The fault schedule of a run, and the faults in force.
pub(crate) struct Chaos {
    /// (starts at, in ms since chaos began; fault; lasts, in ms), the next last.
    pending: Vec<(u64, Fault, u64)>,
    active: Vec<Active>,
}

impl Chaos {
    /// The fault schedule, drawn up front from the seed (none unless `cfg.faults`).
    pub(crate) fn draw(cfg: &SimConfig, rng: &mut StdRng) -> Self {
        let chaos_ms = cfg.chaos.as_millis() as u64;
        let mut schedule: Vec<(u64, Fault, u64)> = Vec::new();
        if cfg.faults {
            let mut t = FIRST_FAULT_AT_MS;
            while t < chaos_ms {
                // Kinds 0-9, then disk failures (10) and the kinds of issue 12 (11-13)
                // if configured.
                let kinds = 10 + u32::from(cfg.disk_failures) + 3 * u32::from(cfg.extended);
                let mut kind = rng.gen_range(0..kinds);
                if !cfg.disk_failures && kind >= 10 {
                    kind += 1;
                }
                let fault = match kind {
                    13 => Fault::IsolateGateway(rng.gen_range(0..cfg.gateways)),
                    12 => Fault::ClockStep(CLOCK_STEPS_MS[rng.gen_range(0..CLOCK_STEPS_MS.len())]),
                    11 => {
                        let target = if rng.gen_bool(0.5) {
                            FlapTarget::Gateway(rng.gen_range(0..cfg.gateways))
                        } else {
                            FlapTarget::Node(rng.gen_range(1..=cfg.nodes))
                        };
                        Fault::Flap { target, period_ms: rng.gen_range(FLAP_PERIOD_MS) }
                    }
                    10 => Fault::DiskFailure(rng.gen_range(1..=cfg.nodes)),
                    0 | 1 => Fault::Crash(rng.gen_range(1..=cfg.nodes)),
                    9 => Fault::CrashMany,
                    2 => Fault::PartitionLeader,
                    3 => Fault::IsolateFollower,
                    4 => Fault::OneWay,
                    5 => Fault::Pause(rng.gen_range(1..=cfg.nodes)),
                    6 => Fault::SlowLinks,
                    7 => Fault::TransferLeader,
                    _ => {
                        if rng.gen_bool(0.5) {
                            Fault::AddSpare
                        } else {
                            Fault::RemoveSpare
                        }
                    }
                };
                let lasts = rng.gen_range(match fault {
                    Fault::Flap { .. } => FLAP_DURATION_MS,
                    Fault::IsolateGateway(_) => ISOLATE_GATEWAY_MS,
                    _ => FAULT_DURATION_MS,
                });
                schedule.push((t, fault, lasts));
                t += lasts + rng.gen_range(FAULT_GAP_MS);
            }
        }
        schedule.reverse();
        Self { pending: schedule, active: Vec::new() }
    }

    /// At `t` ms since chaos began: injects the faults due by then and heals those
    /// that have lasted their time.
    pub(crate) fn advance(&mut self, h: &mut Harness<'_>, t: u64) {
        while let Some(&(at, fault, lasts)) = self.pending.last() {
            if at > t {
                break;
            }
            self.pending.pop();
            *h.report.faults.entry(fault.name()).or_default() += 1;
            if let Some(detail) = fault.detail() {
                *h.report.events.entry(detail).or_default() += 1;
            }
            let now = h.now_ms();
            h.trace.note(now, fault.name());
            let undo = inject(h, fault);
            let now = h.now_ms();
            h.tracer.fault(now, fault, &undo, lasts, &h.disks);
            self.active.push(Active { until: t + lasts, since: t, fault, undo, cut: true });
        }
        for a in &mut self.active {
            // Flapping links: cut for a period, repaired for the next, and so on.
            if let Fault::Flap { period_ms, .. } = a.fault {
                let cut = ((t - a.since) / period_ms.max(1)) % 2 == 0;
                if cut != a.cut {
                    a.cut = cut;
                    set_cut(&mut h.sim, &a.undo, cut);
                }
            }
        }
        self.active.retain(|a| {
            if a.until > t {
                return true;
            }
            heal(&mut h.sim, h.cfg.nodes + 1, a, &h.disks, &h.clocks);
            let now = h.now_ms();
            h.tracer.event(now, format!("heal {} {:?}", a.fault.name(), a.undo));
            false
        });
    }

    /// Heals every fault still in force and restores normal message latency.
    pub(crate) fn heal_all(&mut self, h: &mut Harness<'_>) {
        for a in self.active.drain(..) {
            heal(&mut h.sim, h.cfg.nodes + 1, &a, &h.disks, &h.clocks);
        }
        let now = h.now_ms();
        h.tracer.event(now, "chaos over: every fault healed");
        h.sim.set_max_message_latency(MAX_MESSAGE_LATENCY);
    }
}

/// Cuts (or repairs) the links between `hosts[0]` and each of the others.
fn set_cut(sim: &mut turmoil::Sim<'_>, hosts: &[String], cut: bool) {
    if let Some((h, peers)) = hosts.split_first() {
        for p in peers {
            if cut {
                sim.partition(h.as_str(), p.as_str());
            } else {
                sim.repair(h.as_str(), p.as_str());
            }
        }
    }
}

/// The disk side of a crash: with the write-ahead log, the power goes with the
/// process, and what was not synced is lost (half the time the last write is
/// torn, keeping a prefix of up to [`MAX_TORN_BYTES`]).
fn power_cut(cfg: &SimConfig, rng: &mut StdRng, report: &mut crate::Report, disk: &MemDisk) {
    report.crashes += 1;
    if !cfg.wal {
        return;
    }
    let torn = rng.gen_bool(0.5).then(|| rng.gen_range(0..MAX_TORN_BYTES));
    report.unsynced_bytes_lost += disk.power_cut(torn);
    *report.faults.entry("power_cut").or_default() += 1;
    if torn.is_some() {
        *report.faults.entry("torn_write").or_default() += 1;
    }
}

/// The most bytes of an unsynced write a torn power cut keeps.
const MAX_TORN_BYTES: usize = 256;

/// Applies a fault; returns what to undo (host names, by fault kind).
fn inject(h: &mut Harness<'_>, fault: Fault) -> Vec<String> {
    let Harness { sim, shared, cfg, rng, report, disks, clocks, .. } = h;
    let all: Vec<u64> = (1..=cfg.nodes + 1).collect();
    let leader = current_leader(shared);
    match fault {
        Fault::Crash(id) => {
            if !sim.is_host_running(host(id)) {
                return vec![];
            }
            shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            sim.crash(host(id));
            power_cut(cfg, rng, report, &disks[&id]);
            vec![host(id)]
        }
        Fault::CrashMany => {
            // A majority of the voters, the leader among them if known; or all of
            // them (a power loss across the cluster).
            let mut ids: Vec<u64> = (1..=cfg.nodes).collect();
            ids.sort_by_key(|i| (Some(*i) != leader, rng.gen_range(0..1000u32)));
            if rng.gen_bool(0.5) {
                ids.truncate(usize::try_from(cfg.nodes / 2 + 1).unwrap_or(2));
            }
            let mut undo = Vec::new();
            for id in ids {
                if sim.is_host_running(host(id)) {
                    shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    sim.crash(host(id));
                    power_cut(cfg, rng, report, &disks[&id]);
                    undo.push(host(id));
                }
            }
            undo
        }
        Fault::PartitionLeader => {
            let l = leader.unwrap_or(1);
            for other in all.iter().filter(|o| **o != l) {
                sim.partition(host(l), host(*other));
            }
            vec![host(l)]
        }
        Fault::IsolateFollower => {
            let f =
                all.iter().copied().find(|i| Some(*i) != leader && *i <= cfg.nodes).unwrap_or(2);
            for other in all.iter().filter(|o| **o != f) {
                sim.partition(host(f), host(*other));
            }
            vec![host(f)]
        }
        Fault::OneWay => {
            // The leader can send to a follower but not hear it.
            let l = leader.unwrap_or(1);
            let f = all.iter().copied().find(|i| *i != l && *i <= cfg.nodes).unwrap_or(2);
            sim.partition_oneway(host(f), host(l));
            vec![host(f), host(l)]
        }
        Fault::Pause(id) => {
            // Nothing in or out for a while, then everything at once (a GC pause or
            // a stopped process, as the network sees it).
            for other in all.iter().filter(|o| **o != id) {
                sim.hold(host(id), host(*other));
            }
            vec![host(id)]
        }
        Fault::SlowLinks => {
            // Sometimes slower than the RPC deadline (RPC_DEADLINE_MS): calls time
            // out while their messages are still in flight, are retried, and both
            // copies arrive, out of order: duplication and reordering on both paths.
            let max = if rng.gen_bool(0.3) {
                rng.gen_range(PAST_DEADLINE_LINK_LATENCY_MS)
            } else {
                rng.gen_range(SLOW_LINK_LATENCY_MS)
            };
            sim.set_max_message_latency(Duration::from_millis(max));
            vec![]
        }
        Fault::TransferLeader | Fault::AddSpare | Fault::RemoveSpare => {
            shared.ops.lock().unwrap_or_else(|p| p.into_inner()).insert(0, fault);
            vec![]
        }
        Fault::DiskFailure(id) => {
            if let Some(disk) = disks.get(&id) {
                disk.set_failing(true);
            }
            vec![host(id)]
        }
        Fault::Flap { target, .. } => {
            // The target first, then its peers (see `set_cut`).
            let hosts: Vec<String> = match target {
                FlapTarget::Gateway(g) => {
                    std::iter::once(gateway_host(g)).chain(all.iter().map(|i| host(*i))).collect()
                }
                FlapTarget::Node(id) => std::iter::once(host(id))
                    .chain(all.iter().filter(|o| **o != id).map(|i| host(*i)))
                    .collect(),
            };
            set_cut(sim, &hosts, true);
            hosts
        }
        Fault::ClockStep(step_ms) => {
            let l = leader.unwrap_or(1);
            if let Some(clock) = clocks.get(&l) {
                clock.step(step_ms);
                if step_ms > 0 {
                    shared.forward_clock_steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            vec![host(l)]
        }
        Fault::IsolateGateway(g) => {
            let hosts: Vec<String> =
                std::iter::once(gateway_host(g)).chain(all.iter().map(|i| host(*i))).collect();
            set_cut(sim, &hosts, true);
            hosts
        }
    }
}

fn heal(
    sim: &mut turmoil::Sim<'_>,
    hosts: u64,
    a: &Active,
    disks: &BTreeMap<u64, MemDisk>,
    clocks: &BTreeMap<u64, std::sync::Arc<SimClock>>,
) {
    let everyone: Vec<String> = (1..=hosts).map(host).collect();
    let undo = &a.undo;
    match a.fault {
        Fault::Crash(_) | Fault::CrashMany => {
            for h in undo {
                sim.bounce(h.as_str());
            }
        }
        Fault::PartitionLeader | Fault::IsolateFollower => {
            for h in undo {
                for o in everyone.iter().filter(|o| *o != h) {
                    sim.repair(h.as_str(), o.as_str());
                }
            }
        }
        Fault::OneWay => {
            if let [f, l] = undo.as_slice() {
                sim.repair_oneway(f.as_str(), l.as_str());
            }
        }
        Fault::Pause(_) => {
            for h in undo {
                for o in everyone.iter().filter(|o| *o != h) {
                    sim.release(h.as_str(), o.as_str());
                }
            }
        }
        Fault::SlowLinks => sim.set_max_message_latency(MAX_MESSAGE_LATENCY),
        Fault::DiskFailure(id) => {
            if let Some(disk) = disks.get(&id) {
                disk.set_failing(false);
            }
        }
        Fault::Flap { .. } => {
            if a.cut {
                set_cut(sim, undo, false);
            }
        }
        Fault::IsolateGateway(_) => set_cut(sim, undo, false),
        Fault::ClockStep(step_ms) => {
            let id: u64 =
                undo.first().map_or(0, |h| h.trim_start_matches('n').parse().unwrap_or(0));
            if let Some(clock) = clocks.get(&id) {
                clock.step(-step_ms);
            }
        }
        Fault::TransferLeader | Fault::AddSpare | Fault::RemoveSpare => {}
    }
}
