//! Target `core_apply`: arbitrary command sequences applied to the ledger.
//!
//! The input is a program. Its first byte picks the ledger configuration (the
//! default, or one with tiny limits so the "ledger full" and exactly-once eviction
//! paths run); then each entry reads: how far the log index moves (usually 1,
//! sometimes a gap, rarely a jump to the largest index a lease id can encode), how
//! the leader's clock moves (not at all, a little, hours, weeks, backwards, to just
//! around a window boundary or a lease's expiry, past the idle and retention
//! horizons, or anywhere up to `u64::MAX`), and its commands. Commands draw on a small
//! vocabulary — paths `a`, `a/b`, `a/c`, `a/b/d`, `x`; units `t`, `u`; three clients
//! and three principals; small caps and the six window kinds — so budgets collide,
//! leases are shared, and request ids repeat: a client's next id, an id it used
//! before with another command, a gap, or an earlier request sent again verbatim.
//! Leases come from earlier grants (live or settled) or are made up.
//!
//! After every entry it checks:
//! - no panic, one outcome per command, the log index and a clock that never goes back;
//! - `Ledger::check_invariants`;
//! - through the budget views: consumed + outstanding <= cap and remaining = cap -
//!   both, for every limit, the window holding the ledger's time;
//! - conservation from the totals, and the totals equal the sum of the audit flows;
//! - the entry's audit records continue the chain (`verify_chain` from the previous
//!   head) and end at the ledger's head;
//! - exactly-once: a request sent again gets its first outcome, unless the ledger may
//!   have forgotten it (then it is refused as too old, or the client was idle long
//!   enough to be forgotten); an id reused for another command is refused;
//! - determinism: a second ledger fed the same entries from the start gives equal
//!   outcomes, audit records, digest and state;
//! - every 8 entries the ledger is snapshotted and restored; the restored copy must
//!   equal it (derived indexes included) and is then fed the same entries in lockstep.
//!
//! At the end, a fresh ledger replaying every entry must reach the same digest, and
//! the whole audit trail must verify from the genesis head.

use std::collections::BTreeMap;

use ration_core::audit::{verify_chain, Flow};
use ration_core::command::MAX_AMOUNT;
use ration_core::ledger::Held;
use ration_core::names::MAX_LEASE_INDEX;
use ration_core::{
    Acquire, AuditRecord, Batch, BudgetPath, BudgetSpec, ChainHead, ClientId, Command, Entry,
    FailPolicy, LeaseId, Ledger, LedgerConfig, LedgerError, LimitSpec, Op, Outcome, Period,
    Principal, Release, Reply, Report, Request, Unit, Window,
};

use crate::fixture::T0;
use crate::input::Input;

const PATHS: [&str; 5] = ["a", "a/b", "a/c", "a/b/d", "x"];
const UNITS: [&str; 2] = ["t", "u"];
const CLIENTS: [&str; 3] = ["c0", "c1", "c2"];
const PRINCIPALS: [&str; 3] = ["p0", "p1", "p2"];
/// Most entries one input drives.
pub const MAX_ENTRIES: usize = 48;
const MAX_COMMANDS: usize = 24;
/// A snapshot is taken and restored after every this many entries.
pub const SNAPSHOT_EVERY: usize = 8;

fn windows() -> [Window; 6] {
    let offset = |p, m| Window::with_offset(p, m).expect("offsets within 14 h are valid");
    [
        Window::utc(Period::Minute),
        Window::utc(Period::Hour),
        offset(Period::Day, 330),
        Window::utc(Period::Lifetime),
        Window::utc(Period::Week),
        offset(Period::Month, -300),
    ]
}

fn name<T: TryFrom<&'static str>>(s: &'static str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s).expect("vocabulary names are valid")
}

/// The fuzz target.
pub fn core_apply(data: &[u8]) {
    run_program(data);
}

/// What a program left: the ledger, the entries it applied and the audit trail.
#[derive(Debug)]
pub struct Run {
    pub ledger: Ledger,
    pub entries: Vec<(u64, Entry)>,
    pub audit: Vec<AuditRecord>,
}

/// Runs `data` as [`core_apply`] does, with every check, and returns what it built.
pub fn run_program(data: &[u8]) -> Run {
    let mut input = Input::new(data);
    let mut h = Harness::new(config(&mut input));
    while !input.is_empty() && h.entries.len() < MAX_ENTRIES {
        let Some((index, entry)) = h.next_entry(&mut input) else { break };
        h.apply(index, entry);
    }
    h.finish()
}

fn config(input: &mut Input<'_>) -> LedgerConfig {
    match input.u8() % 4 {
        3 => LedgerConfig {
            max_lease_ttl_ms: 60_000,
            max_budgets: 1 + u64::from(input.u8() % 5),
            max_live_leases: 1 + u64::from(input.u8() % 5),
            expired_retention_ms: 120_000,
            max_expired_retained: u64::from(input.u8() % 3),
            dedup_window: u32::from(input.u8() % 5),
            dedup_idle_ms: 600_000,
            max_dedup_clients: 1 + u64::from(input.u8() % 3),
        },
        _ => LedgerConfig::default(),
    }
}

#[derive(Debug)]
struct Remembered {
    request: Request,
    outcome: Outcome,
    /// Ledger time when the ledger executed it.
    at_ms: u64,
}

#[derive(Debug)]
struct Harness {
    config: LedgerConfig,
    ledger: Ledger,
    /// Fed the same entries from the start: determinism.
    replica: Ledger,
    /// Restored from the last snapshot, then fed the same entries.
    restored: Option<Ledger>,
    entries: Vec<(u64, Entry)>,
    audit: Vec<AuditRecord>,
    head: ChainHead,
    /// Sum of every audit record's flow.
    flows: [u128; 5],
    index: u64,
    time_ms: u64,
    /// Every lease ever granted.
    leases: Vec<LeaseId>,
    next_id: [u64; CLIENTS.len()],
    sent: Vec<Request>,
    remembered: BTreeMap<(ClientId, u64), Remembered>,
}

impl Harness {
    fn new(config: LedgerConfig) -> Self {
        Self {
            ledger: Ledger::new(config.clone()),
            replica: Ledger::new(config.clone()),
            config,
            restored: None,
            entries: Vec::new(),
            audit: Vec::new(),
            head: ChainHead::default(),
            flows: [0; 5],
            index: 0,
            time_ms: T0,
            leases: Vec::new(),
            next_id: [0; CLIENTS.len()],
            sent: Vec::new(),
            remembered: BTreeMap::new(),
        }
    }

    // ----- generating entries -----

    fn next_entry(&mut self, input: &mut Input<'_>) -> Option<(u64, Entry)> {
        let step = match input.u8() {
            0..=223 => 1,
            224..=253 => 1 + u64::from(input.u16()),
            // Close to the largest index a lease id can encode.
            _ => MAX_LEASE_INDEX.saturating_sub(u64::from(input.u8())).saturating_sub(self.index),
        };
        let index = self.index.checked_add(step.max(1))?;
        if index > MAX_LEASE_INDEX {
            return None;
        }
        self.index = index;
        self.time_ms = self.next_time(input);
        let n = match input.u8() {
            0..=15 => 0,
            16..=223 => 1 + input.below(3),
            224..=247 => 1 + input.below(8),
            _ => 1 + input.below(MAX_COMMANDS),
        };
        let commands = (0..n).map(|_| self.command(input)).collect();
        Some((index, Entry::V1(Batch { time_ms: self.time_ms, commands })))
    }

    fn next_time(&self, input: &mut Input<'_>) -> u64 {
        let t = self.time_ms;
        let now = self.ledger.now_ms();
        match input.u8() {
            0..=47 => t,
            48..=127 => t.saturating_add(u64::from(input.u8()) * 10),
            128..=175 => t.saturating_add(u64::from(input.u16()) * 100),
            176..=191 => t.saturating_add(u64::from(input.u32())),
            // Behind the ledger's clock: it must keep its time.
            192..=207 => t.saturating_sub(u64::from(input.u16()) * 10),
            // Just before, at or after the end of a window.
            208..=227 => {
                let (_, end) = input.pick(&windows()).bounds(now);
                end.saturating_sub(1).saturating_add(input.below(3) as u64)
            }
            // Just before, at or after a live lease's expiry.
            228..=243 => match self.ledger.leases(None, 16).as_slice() {
                [] => t,
                live => input
                    .pick(live)
                    .expires_at_ms
                    .saturating_sub(1)
                    .saturating_add(input.below(3) as u64),
            },
            // Around the exactly-once idle horizon and the expired-lease retention.
            244..=251 => {
                let horizon = if input.bool() {
                    self.config.dedup_idle_ms
                } else {
                    self.config.expired_retention_ms
                };
                now.saturating_add(horizon).saturating_sub(1).saturating_add(input.below(3) as u64)
            }
            // Anywhere, far past the latest time the ledger keeps (year 9999).
            _ => input.u64(),
        }
    }

    fn command(&mut self, input: &mut Input<'_>) -> Command {
        let mut kind = input.u8() % 16;
        // Little works before a budget exists, or reports without a live lease:
        // mostly, make one instead.
        if input.u8() % 8 != 0 {
            if (3..=12).contains(&kind) && self.ledger.budget_count() == 0 {
                kind = 1;
            } else if (9..=12).contains(&kind) && self.ledger.live_lease_count() == 0 {
                kind = 5;
            }
        }
        let (op, owner) = match kind {
            // Now and then, small per-principal limits (or invalid ones), so the
            // fuzzer drives principals into them.
            0 if input.u8() % 4 == 0 => {
                let mut one = || match input.u8() {
                    0..=239 => 1 + u64::from(input.u8() % 12),
                    240..=247 => 0,
                    _ => u64::MAX,
                };
                let limits = ration_core::PrincipalLimits {
                    clients: one(),
                    outcomes: one(),
                    live_leases: one(),
                    budgets: one(),
                };
                (Op::SetLimits(limits), None)
            }
            // Now and then, alert thresholds or shadow mode on a budget (a shadow
            // budget's caps bound nothing, and its ancestors' must still hold),
            // or the webhook cursor moving.
            0 if input.u8() % 3 == 0 => {
                if input.u8() % 4 == 0 {
                    return Command::AckNotices { upto_seq: u64::from(input.u16()) };
                }
                let thresholds_pct = match input.u8() % 4 {
                    0 => Vec::new(),
                    1 => vec![50, 100],
                    2 => vec![1 + u32::from(input.u8()) * 4, 100],
                    _ => vec![0, 1001],
                };
                let options = ration_core::command::BudgetOptions {
                    thresholds_pct,
                    shadow: input.u8() % 2 == 0,
                };
                (Op::SetOptions { path: self.path(input, true), options }, None)
            }
            0 => return Command::Tick,
            1..=2 => (Op::CreateBudget(self.spec(input, false)), None),
            3 => {
                let spec = self.spec(input, true);
                let current = self.ledger.budget(&spec.path).map_or(1, |v| v.version);
                let expected_version =
                    if input.u8() % 4 == 3 { u64::from(input.u8() % 4) } else { current };
                (Op::UpdateBudget { spec, expected_version }, None)
            }
            4 => {
                let path = self.path(input, true);
                let current = self.ledger.budget(&path).map_or(1, |v| v.version);
                let expected_version = match input.u8() % 4 {
                    0 => None,
                    1..=2 => Some(current),
                    _ => Some(u64::from(input.u8() % 4)),
                };
                (Op::DeleteBudget { path, expected_version }, None)
            }
            5..=7 => {
                let acquire = Op::Acquire(self.acquire(input));
                if input.u8() % 8 == 0 {
                    // With a trace: its records carry it; the outcome is the same.
                    let note = ration_core::command::Annotation {
                        trace: Some("trace-1".into()),
                        usage: Vec::new(),
                    };
                    (Op::Annotated { note, op: Box::new(acquire) }, None)
                } else {
                    (acquire, None)
                }
            }
            8 => {
                // For the next window: mostly at the end of the current minute.
                let now = self.ledger.now_ms();
                let end = ration_core::Window::utc(ration_core::Period::Minute).bounds(now).1;
                let starts_at_ms = match input.u8() % 4 {
                    0 | 1 => end,
                    2 => end.saturating_add(1),
                    _ => now.saturating_add(u64::from(input.u16())),
                };
                let acquire = self.acquire(input);
                (Op::AcquireNext(ration_core::AcquireNext { acquire, starts_at_ms }), None)
            }
            9..=10 => {
                let (lease, owner, granted, reported) = self.pick_lease(input);
                let remaining = granted.saturating_sub(reported);
                let consumed_delta = match input.u8() {
                    0..=127 => u64::from(input.u8() % 30),
                    128..=191 => remaining,
                    192..=223 => remaining.saturating_add(1),
                    224..=247 => 0,
                    _ => *input.pick(&[u64::MAX, MAX_AMOUNT + 1]),
                };
                let renew_ttl_ms = match input.u8() {
                    0..=191 => None,
                    192..=247 => {
                        Some(1 + u64::from(input.u32()) % self.config.max_lease_ttl_ms.max(1))
                    }
                    _ => Some(*input.pick(&[0, 3_600_001, u64::MAX])),
                };
                (Op::Report(Report { lease, consumed_delta, renew_ttl_ms }), owner)
            }
            11..=12 => {
                let (lease, owner, granted, reported) = self.pick_lease(input);
                let consumed_total = match input.u8() {
                    0..=111 => reported.saturating_add(u64::from(input.u8() % 30)),
                    112..=175 => granted,
                    176..=207 => granted.saturating_add(1),
                    208..=223 => reported.saturating_sub(1),
                    224..=247 => 0,
                    _ => u64::MAX,
                };
                (Op::Release(Release { lease, consumed_total }), owner)
            }
            13 => {
                let amount = match input.u8() {
                    0..=223 => 1 + u64::from(input.u8() % 50),
                    224..=239 => MAX_AMOUNT,
                    _ => *input.pick(&[0, MAX_AMOUNT + 1, u64::MAX]),
                };
                let overrun = ration_core::Overrun {
                    budget: self.path(input, true),
                    unit: name(input.pick_str(&UNITS)),
                    amount,
                };
                (Op::Overrun(overrun), None)
            }
            _ => {
                // An earlier request, sent again exactly.
                if self.sent.is_empty() {
                    return Command::Tick;
                }
                let i = usize::from(input.u16()) % self.sent.len();
                return Command::Request(self.sent[i].clone());
            }
        };
        let c = input.below(CLIENTS.len());
        let request_id = match input.u8() % 16 {
            0..=13 => self.next_id[c].saturating_add(1),
            // An id this client used before, now for this command.
            14 => {
                let used: Vec<u64> = self
                    .sent
                    .iter()
                    .filter(|r| r.client.as_str() == CLIENTS[c])
                    .map(|r| r.request_id)
                    .collect();
                if used.is_empty() {
                    self.next_id[c].saturating_add(1)
                } else {
                    used[usize::from(input.u16()) % used.len()]
                }
            }
            _ => self.next_id[c].saturating_add(2 + u64::from(input.u8())),
        };
        self.next_id[c] = self.next_id[c].max(request_id);
        let principal = match owner {
            Some(p) if input.u8() % 8 != 0 => p,
            _ => name(input.pick_str(&PRINCIPALS)),
        };
        let request = Request { client: name(CLIENTS[c]), request_id, principal, op };
        self.sent.push(request.clone());
        Command::Request(request)
    }

    /// A vocabulary path: usually one a request about `existing` budgets (or, for a
    /// new one, a budget whose parent exists) can succeed with; sometimes any.
    fn path(&self, input: &mut Input<'_>, existing: bool) -> BudgetPath {
        let fits = |p: &'static str| {
            let path: BudgetPath = name(p);
            let exists = self.ledger.budget(&path).is_some();
            let parent_exists = path.parent().is_none_or(|p| self.ledger.budget(&p).is_some());
            if existing {
                exists
            } else {
                !exists && parent_exists
            }
        };
        let candidates: Vec<&'static str> = PATHS.into_iter().filter(|&p| fits(p)).collect();
        if input.u8() % 4 == 0 || candidates.is_empty() {
            name(input.pick_str(&PATHS))
        } else {
            name(input.pick_str(&candidates))
        }
    }

    fn spec(&self, input: &mut Input<'_>, existing: bool) -> BudgetSpec {
        let path = self.path(input, existing);
        let n = match input.u8() {
            0..=7 => 17,
            8..=31 => 4,
            32..=63 => 0,
            64..=191 => 1,
            _ => 2,
        };
        let limits = (0..n).map(|_| limit_spec(input)).collect();
        BudgetSpec { path, limits }
    }

    fn acquire(&self, input: &mut Input<'_>) -> Acquire {
        let wanted = match input.u8() {
            0..=199 => 1 + u64::from(input.u8() % 60),
            200..=215 => 0,
            216..=247 => 500 + u64::from(input.u16() % 1500),
            _ => *input.pick(&[MAX_AMOUNT, MAX_AMOUNT + 1, u64::MAX]),
        };
        let min = match input.u8() {
            0..=79 => 0,
            80..=127 => wanted,
            128..=239 => {
                // Above 100% it is more than wanted: a bad argument.
                let percent = u128::from(input.u8() % 104);
                u64::try_from(u128::from(wanted) * percent / 100).unwrap_or(u64::MAX)
            }
            _ => u64::from(input.u8()),
        };
        let ttl_ms = match input.u8() {
            0..=7 => 0,
            8..=183 => 1_000 + u64::from(input.u16()),
            184..=247 => 1 + u64::from(input.u32()) % self.config.max_lease_ttl_ms.max(1),
            248..=251 => 3_600_001,
            _ => u64::MAX,
        };
        Acquire {
            budget: self.path(input, true),
            unit: name(input.pick_str(&UNITS)),
            wanted,
            min,
            ttl_ms,
        }
    }

    /// A lease to report or release: (id, owner, granted, reported) as far as known.
    fn pick_lease(&self, input: &mut Input<'_>) -> (LeaseId, Option<Principal>, u64, u64) {
        let id = match input.u8() % 8 {
            0..=3 => {
                let live = self.ledger.leases(None, 64);
                if live.is_empty() {
                    None
                } else {
                    Some(input.pick(&live).lease)
                }
            }
            4..=5 if !self.leases.is_empty() => Some(*input.pick(&self.leases)),
            6 if !self.leases.is_empty() => {
                Some(LeaseId::from_raw(input.pick(&self.leases).raw() ^ 1))
            }
            _ => None,
        };
        let id = id.unwrap_or_else(|| LeaseId::from_raw(input.u64()));
        match self.ledger.lease(id) {
            Some(v) => (id, Some(v.principal), v.granted, v.reported),
            None => (id, None, u64::from(input.u8() % 60), 0),
        }
    }

    // ----- applying and checking -----

    fn apply(&mut self, index: u64, entry: Entry) {
        let at = self.entries.len();
        let before_ms = self.ledger.now_ms();
        let applied = self.ledger.apply(index, &entry);
        let Entry::V1(batch) = &entry;
        assert_eq!(applied.outcomes.len(), batch.commands.len(), "entry {at}: outcomes");
        assert_eq!(self.ledger.last_index(), index);
        assert!(self.ledger.now_ms() >= before_ms, "entry {at}: the ledger's clock went back");
        if let Err(e) = self.ledger.check_invariants() {
            panic!("entry {at} (index {index}): invariant broken: {e}\nentry: {entry:?}");
        }
        self.check_views(at);

        self.head = verify_chain(&applied.audit, self.head)
            .unwrap_or_else(|e| panic!("entry {at}: audit chain breaks: {e}"));
        assert_eq!(self.head, self.ledger.chain_head(), "entry {at}: chain head");
        for r in &applied.audit {
            assert_eq!(r.entry.log_index, index, "entry {at}: audit record of another entry");
            add_flow(&mut self.flows, &r.entry.flow);
        }
        self.check_conservation(at);

        for (command, outcome) in batch.commands.iter().zip(&applied.outcomes) {
            self.observe(command, outcome);
        }

        let digest = self.ledger.digest();
        let replayed = self.replica.apply(index, &entry);
        assert_eq!(replayed, applied, "entry {at}: a replica applying it answered otherwise");
        assert_eq!(self.replica.digest(), digest, "entry {at}: replica digest differs");
        assert_eq!(self.replica, self.ledger, "entry {at}: replica state differs");
        if let Some(restored) = self.restored.as_mut() {
            let replayed = restored.apply(index, &entry);
            assert_eq!(replayed, applied, "entry {at}: the restored ledger answered otherwise");
            assert_eq!(restored.digest(), digest, "entry {at}: restored ledger's digest differs");
            assert_eq!(*restored, self.ledger, "entry {at}: restored ledger's state differs");
        }

        self.audit.extend(applied.audit);
        self.entries.push((index, entry));
        if self.entries.len() % SNAPSHOT_EVERY == 0 {
            let bytes = self.ledger.snapshot();
            let restored = Ledger::restore(&bytes).unwrap_or_else(|e| {
                panic!("entry {at}: the ledger's snapshot does not restore: {e}")
            });
            assert_eq!(restored.digest(), digest, "entry {at}: restored digest differs");
            assert_eq!(restored, self.ledger, "entry {at}: restore rebuilt a different state");
            self.restored = Some(restored);
        }
    }

    fn check_views(&self, at: usize) {
        let now = self.ledger.now_ms();
        let views = self.ledger.budgets(None, None, usize::MAX);
        assert_eq!(views.len(), self.ledger.budget_count(), "entry {at}: budget count");
        for v in &views {
            // A shadow budget's own caps bound nothing (its ancestors' do).
            let shadow = v.options.as_ref().is_some_and(|o| o.shadow);
            for l in &v.limits {
                let what = format!("entry {at}: {} {} per {}", v.path, l.spec.unit, l.spec.window);
                let used = l.consumed.checked_add(l.outstanding);
                let bound = if shadow { MAX_AMOUNT } else { l.spec.cap };
                let Some(used) = used.filter(|u| *u <= bound.saturating_add(l.overruns)) else {
                    panic!(
                        "{what}: consumed {} + outstanding {} > cap {} + overruns {}",
                        l.consumed, l.outstanding, l.spec.cap, l.overruns
                    );
                };
                assert!(l.overruns <= l.consumed, "{what}: overruns are part of consumed");
                assert_eq!(l.remaining, l.spec.cap.saturating_sub(used), "{what}: remaining");
                assert!(
                    l.window_start_ms <= now && now < l.window_end_ms,
                    "{what}: window [{}, {}) does not hold now {now}",
                    l.window_start_ms,
                    l.window_end_ms
                );
            }
        }
    }

    fn check_conservation(&self, at: usize) {
        let t = self.ledger.totals();
        let outstanding = self.ledger.outstanding_total();
        assert_eq!(
            t.granted + t.uncharged + t.overrun,
            t.consumed + t.returned + t.charged + outstanding,
            "entry {at}: conservation: {t:?}, outstanding {outstanding}"
        );
        assert_eq!(
            self.flows,
            [t.granted, t.consumed, t.returned, t.charged, t.uncharged],
            "entry {at}: the audit flows do not add up to the ledger's totals {t:?}"
        );
    }

    fn observe(&mut self, command: &Command, outcome: &Outcome) {
        let now = self.ledger.now_ms();
        let request = match command {
            Command::Tick => {
                assert_eq!(outcome, &Ok(Reply::Ticked { now_ms: now }));
                return;
            }
            // Generated only as unauthenticated requests: roles are tested in the
            // ledger's unit tests and against real nodes.
            Command::Request(r) => r,
            Command::Authenticated { .. } => {
                unreachable!("the fuzzer sends no authenticated requests")
            }
            Command::AckNotices { .. } => {
                assert!(matches!(outcome, Ok(Reply::NoticesAcked { .. })), "{outcome:?}");
                return;
            }
        };
        if let Ok(Reply::Granted(g)) = outcome {
            assert!(g.expires_at_ms <= g.window_end_ms, "{g:?}");
            if !self.leases.contains(&g.lease) {
                self.leases.push(g.lease);
            }
        }
        // Exactly-once. The ledger may forget a client idle for `dedup_idle_ms`, or
        // the least recently seen one when more clients than it keeps are active.
        let forgettable = |at_ms: u64| {
            now.saturating_sub(at_ms) >= self.config.dedup_idle_ms
                || CLIENTS.len() as u64 > self.config.max_dedup_clients
        };
        // Refused without running: an old or reused id, or a client id that
        // belongs to another principal (checked before the exactly-once table).
        let refused_as_dup = matches!(
            outcome,
            Err(LedgerError::RequestTooOld { .. }
                | LedgerError::RequestIdReused { .. }
                | LedgerError::ForeignClient { .. })
        );
        let key = (request.client.clone(), request.request_id);
        let executed = match self.remembered.get(&key) {
            Some(first) if first.request == *request => {
                if *outcome == first.outcome {
                    false
                } else {
                    assert!(
                        matches!(outcome, Err(LedgerError::RequestTooOld { .. }))
                            || forgettable(first.at_ms),
                        "exactly-once: {request:?} sent again answered {outcome:?}, but first {:?}",
                        first.outcome
                    );
                    !refused_as_dup
                }
            }
            Some(first) => {
                assert!(
                    refused_as_dup || forgettable(first.at_ms),
                    "exactly-once: request id reused for {request:?} was executed: {outcome:?}; \
                     the id was first used for {:?}",
                    first.request
                );
                !refused_as_dup
            }
            None => {
                assert!(
                    !matches!(outcome, Err(LedgerError::RequestIdReused { .. })),
                    "exactly-once: {request:?} refused as a reused id, but it was never sent"
                );
                !refused_as_dup
            }
        };
        // A per-principal limit on the exactly-once table, and acting on another
        // principal's client id or lease, refuse before anything is remembered:
        // the id stays unused.
        let unremembered = matches!(
            outcome,
            Err(LedgerError::PrincipalLimit { what, .. })
                if *what == Held::Clients.phrase() || *what == Held::Outcomes.phrase()
        ) || matches!(
            outcome,
            Err(LedgerError::ForeignClient { .. } | LedgerError::ForeignLease { .. })
        );
        if executed && !unremembered {
            let remembered =
                Remembered { request: request.clone(), outcome: outcome.clone(), at_ms: now };
            self.remembered.insert(key, remembered);
        }
    }

    fn finish(self) -> Run {
        let mut fresh = Ledger::new(self.config.clone());
        for (index, entry) in &self.entries {
            fresh.apply(*index, entry);
        }
        assert_eq!(fresh.digest(), self.ledger.digest(), "a replay from the start differs");
        let head =
            verify_chain(&self.audit, ChainHead::default()).expect("the audit trail verifies");
        assert_eq!(head, self.ledger.chain_head());
        Run { ledger: self.ledger, entries: self.entries, audit: self.audit }
    }
}

fn limit_spec(input: &mut Input<'_>) -> LimitSpec {
    let unit: Unit = name(input.pick_str(&UNITS));
    let window = *input.pick(&windows());
    let cap = match input.u8() {
        0..=127 => u64::from(input.u8() % 50),
        128..=175 => 100,
        176..=223 => 1000,
        224..=247 => MAX_AMOUNT,
        _ => *input.pick(&[MAX_AMOUNT + 1, u64::MAX, 0]),
    };
    let on_unreachable = if input.u8() % 4 == 0 {
        // One time in eight above the cap: a bad argument.
        let amount = *input.pick(&[0, cap / 2, cap, 1, 0, cap / 2, cap, cap.saturating_add(1)]);
        FailPolicy::StaticAllowance { amount }
    } else {
        FailPolicy::FailClosed
    };
    LimitSpec { unit, cap, window, on_unreachable }
}

fn add_flow(sums: &mut [u128; 5], f: &Flow) {
    let parts = [f.granted, f.consumed, f.returned, f.charged, f.uncharged];
    for (sum, part) in sums.iter_mut().zip(parts) {
        *sum = sum.saturating_add(u128::from(part));
    }
}
