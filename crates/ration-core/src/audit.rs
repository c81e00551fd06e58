//! The audit ledger: one hash-chained record for every state change.
//!
//! The ledger emits records; it does not store them (effects out). A store appends
//! them in order: [`AuditLog`] in memory here, a durable one in the node. The pure
//! functions [`query`], [`spend`] and [`verify_chain`] work over any iterator of
//! records, so every store answers the same way.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{BudgetOptions, LimitSpec, Price, UsageLine};
use crate::names::{BudgetPath, ClientId, LeaseId, Principal, Unit};
use crate::window::Window;

/// A SHA-256 digest.
pub type Hash = [u8; 32];
/// The `prev_hash` of the first record.
pub const GENESIS: Hash = [0; 32];
const DOMAIN: &[u8] = b"ration-audit-v1\0";
const DOMAIN_V2: &[u8] = b"ration-audit-v2\0";

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AuditKind {
    BudgetCreated,
    BudgetUpdated,
    BudgetDeleted,
    LeaseGranted,
    LeaseReported,
    LeaseReleased,
    /// A lease passed its expiry: its unsettled allowance was charged as consumed.
    LeaseExpired,
    /// A late final report on an expired lease gave back the unspent part.
    LeaseRefunded,
    /// A late final report came after the lease's window closed: nothing refunded.
    LateRelease,
    /// A call cost more than its gateway could take from its leases; the excess
    /// (`flow.consumed`) was counted as consumed without having been granted.
    Overrun,
    /// The per-principal limits changed; the record's `limits` hold the new values
    /// (unit = the limit's name, cap = its value), on budget path `_ration`.
    LimitsChanged,
    /// A principal was given a role: the record's `principal` is the principal that
    /// got it, `unit` the role, `budget` its scope (`_ration` for the whole ledger).
    RoleGranted,
    /// A role was taken back (fields as for [`AuditKind::RoleGranted`]).
    RoleRevoked,
    /// A template was set on `budget` (the parent); `limits` are its limits.
    TemplateSet,
    /// The template on `budget` was removed.
    TemplateDeleted,
    /// `budget` was frozen: it grants nothing; `balances` show what its live leases
    /// still hold.
    BudgetFrozen,
    /// `budget` was unfrozen.
    BudgetUnfrozen,
    /// A template's instance was idle with no spend in any open window, and was
    /// deleted by the ledger (principal `_ration`); `balances` are its last figures.
    InstanceExpired,
    /// A run's runaway guard tripped: spend counted in one of its spans reached
    /// the guard's maximum, and the run is frozen (`principal`: whose spend it was;
    /// `unit`: the guard's unit). `balances[0]` describes the guard: `cap` its
    /// maximum, `window_start_ms` the start of the span, `consumed` the spend
    /// counted in it, `outstanding` what was granted in it.
    RunHalted,
    /// A model's price got a new version: `detail` holds it.
    PriceSet,
    /// A budget's thresholds or shadow mode changed: `detail` holds the new options.
    OptionsSet,
    /// Spend in a limit's window reached a threshold of its cap: `unit` and
    /// `balances[0]` are the limit's, `detail` the threshold. Once per threshold per
    /// window; delivered to the webhook.
    ThresholdCrossed,
    /// A shadow budget's cap would have refused (or cut) an acquire that was
    /// granted (`lease`): `balances[0]` is the limit as it was, `detail` what was
    /// granted and what the cap had left.
    ShadowRefusal,
    /// One call, recorded for the audit trail with its trace id (`detail`).
    CallRecorded,
}

impl AuditKind {
    pub const ALL: [AuditKind; 24] = [
        AuditKind::BudgetCreated,
        AuditKind::BudgetUpdated,
        AuditKind::BudgetDeleted,
        AuditKind::LeaseGranted,
        AuditKind::LeaseReported,
        AuditKind::LeaseReleased,
        AuditKind::LeaseExpired,
        AuditKind::LeaseRefunded,
        AuditKind::LateRelease,
        AuditKind::Overrun,
        AuditKind::LimitsChanged,
        AuditKind::RoleGranted,
        AuditKind::RoleRevoked,
        AuditKind::TemplateSet,
        AuditKind::TemplateDeleted,
        AuditKind::BudgetFrozen,
        AuditKind::BudgetUnfrozen,
        AuditKind::InstanceExpired,
        AuditKind::RunHalted,
        AuditKind::PriceSet,
        AuditKind::OptionsSet,
        AuditKind::ThresholdCrossed,
        AuditKind::ShadowRefusal,
        AuditKind::CallRecorded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuditKind::BudgetCreated => "budget_created",
            AuditKind::BudgetUpdated => "budget_updated",
            AuditKind::BudgetDeleted => "budget_deleted",
            AuditKind::LeaseGranted => "lease_granted",
            AuditKind::LeaseReported => "lease_reported",
            AuditKind::LeaseReleased => "lease_released",
            AuditKind::LeaseExpired => "lease_expired",
            AuditKind::LeaseRefunded => "lease_refunded",
            AuditKind::LateRelease => "late_release",
            AuditKind::Overrun => "overrun",
            AuditKind::LimitsChanged => "limits_changed",
            AuditKind::RoleGranted => "role_granted",
            AuditKind::RoleRevoked => "role_revoked",
            AuditKind::TemplateSet => "template_set",
            AuditKind::TemplateDeleted => "template_deleted",
            AuditKind::BudgetFrozen => "budget_frozen",
            AuditKind::BudgetUnfrozen => "budget_unfrozen",
            AuditKind::InstanceExpired => "instance_expired",
            AuditKind::RunHalted => "run_halted",
            AuditKind::PriceSet => "price_set",
            AuditKind::OptionsSet => "options_set",
            AuditKind::ThresholdCrossed => "threshold_crossed",
            AuditKind::ShadowRefusal => "shadow_refusal",
            AuditKind::CallRecorded => "call_recorded",
        }
    }
}

/// How allowance moved. Over all records: granted + overruns = consumed +
/// returned + (charged - uncharged) + outstanding, where overruns is the
/// `consumed` of the [`AuditKind::Overrun`] records (spend never granted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub granted: u64,
    pub consumed: u64,
    pub returned: u64,
    /// Charged as consumed at expiry.
    pub charged: u64,
    /// Charged at expiry, then reclassified by a late final report (as consumed and
    /// returned).
    pub uncharged: u64,
}

impl Flow {
    /// Net spend this flow adds to its budget (a refund subtracts).
    pub fn net_spend(&self) -> i128 {
        // Each term is below 2^64, so i128 cannot overflow; saturating keeps clippy honest.
        i128::from(self.consumed)
            .saturating_add(i128::from(self.charged))
            .saturating_sub(i128::from(self.uncharged))
    }
}

/// One limit's figures after the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub budget: BudgetPath,
    pub unit: Unit,
    pub window: Window,
    pub window_start_ms: u64,
    pub cap: u64,
    pub consumed: u64,
    pub outstanding: u64,
}

/// The hashed content of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Gapless sequence number, from 0.
    pub seq: u64,
    /// The Raft log index of the entry that caused it.
    pub log_index: u64,
    /// Ledger time when it was applied.
    pub time_ms: u64,
    /// The ledger time the flow belongs to: `time_ms`, except for an expiry, where it
    /// is the last instant the lease was valid (`expires_at_ms - 1`).
    pub effective_ms: u64,
    pub kind: AuditKind,
    pub budget: BudgetPath,
    /// The gateway holding the lease, or the operator who changed the budget.
    pub principal: Principal,
    pub unit: Option<Unit>,
    pub lease: Option<LeaseId>,
    pub flow: Flow,
    /// Figures of every limit the change touched.
    pub balances: Vec<Balance>,
    /// The budget's limits after a budget change.
    pub limits: Vec<LimitSpec>,
    pub prev_hash: Hash,
    /// The request that caused it (none for what the ledger does on its own:
    /// expiries, instance expiry, thresholds crossed by an expiry).
    pub cause: Option<Cause>,
    /// What a kind of record says beyond the fields above.
    pub detail: Option<Detail>,
}

/// The request behind a record: its client id and request id (exactly-once keys),
/// and what the caller attached to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    pub client: ClientId,
    pub request_id: u64,
    pub trace: Option<String>,
    /// Subtotals per (model, price version) of what a settlement paid for.
    pub usage: Vec<UsageLine>,
}

/// The part of a record only some kinds have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Detail {
    /// A price version (`price_set`): the model, its version number, when it takes
    /// effect, and the price.
    Price { model: String, version: u32, effective_from_ms: u64, price: Price },
    /// New options (`options_set`).
    Options(BudgetOptions),
    /// The threshold crossed (`threshold_crossed`), in percent of the cap.
    Threshold { percent: u32 },
    /// What a shadow budget's cap would have refused (`shadow_refusal`): the
    /// acquire was granted `granted`, and the limit had only `available` left
    /// (0 when it would have refused the acquire outright).
    WouldRefuse { granted: u64, available: u64 },
    /// A recorded call (`call_recorded`).
    Call { trace: String, usage: UsageLine },
}

/// The layout of a record before causes and details (audit format 1): a record with
/// neither is hashed as this, so chains written before them still verify.
#[derive(Serialize, Deserialize)]
struct LegacyEntry {
    seq: u64,
    log_index: u64,
    time_ms: u64,
    effective_ms: u64,
    kind: AuditKind,
    budget: BudgetPath,
    principal: Principal,
    unit: Option<Unit>,
    lease: Option<LeaseId>,
    flow: Flow,
    balances: Vec<Balance>,
    limits: Vec<LimitSpec>,
    prev_hash: Hash,
}

#[derive(Serialize, Deserialize)]
struct LegacyRecord {
    entry: LegacyEntry,
    hash: Hash,
}

impl From<LegacyRecord> for AuditRecord {
    fn from(r: LegacyRecord) -> Self {
        let e = r.entry;
        AuditRecord {
            entry: AuditEntry {
                seq: e.seq,
                log_index: e.log_index,
                time_ms: e.time_ms,
                effective_ms: e.effective_ms,
                kind: e.kind,
                budget: e.budget,
                principal: e.principal,
                unit: e.unit,
                lease: e.lease,
                flow: e.flow,
                balances: e.balances,
                limits: e.limits,
                prev_hash: e.prev_hash,
                cause: None,
                detail: None,
            },
            hash: r.hash,
        }
    }
}

/// Encodes one record (postcard) so that a record with neither cause nor detail
/// has exactly format 1's bytes: a segment of such records is the same file
/// whichever version writes it (its digest, in a snapshot's manifest, stays
/// true). [`decode_record`] reads both.
pub fn encode_record(r: &AuditRecord) -> Vec<u8> {
    encode_record_onto(r, Vec::new())
}

/// [`encode_record`]'s bytes appended to `out`.
pub fn encode_record_onto(r: &AuditRecord, out: Vec<u8>) -> Vec<u8> {
    match r.entry.format_1() {
        Some(fields) => crate::encode_onto(&(fields, &r.hash), out),
        None => crate::encode_onto(r, out),
    }
}

/// The leading fields of a record, read from its encoding (either audit format:
/// both begin with these) without decoding the rest: what a segment's footer
/// indexes and the chain's order needs when records are copied as bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct RecordHead<'a> {
    pub seq: u64,
    pub log_index: u64,
    pub time_ms: u64,
    pub effective_ms: u64,
    pub kind: AuditKind,
    pub budget: &'a str,
    pub principal: &'a str,
}

impl RecordHead<'_> {
    /// The budget path's root segment (as [`BudgetPath::root`]).
    pub fn root(&self) -> &str {
        self.budget.split('/').next().unwrap_or(self.budget)
    }
}

/// An encoded record's leading fields and its hash (its last 32 bytes: a record
/// encodes as its entry, then the hash as 32 plain bytes).
pub fn record_head(bytes: &[u8]) -> Result<(RecordHead<'_>, Hash), postcard::Error> {
    let (head, _) = postcard::take_from_bytes::<RecordHead<'_>>(bytes)?;
    let at = bytes.len().checked_sub(32).ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes[at..]);
    Ok((head, hash))
}

/// Decodes one record written in either audit format (postcard). The current
/// format holds two more fields than format 1, so format-1 bytes run out (or leave
/// bytes over) when read as the current one, and the fallback takes over; either
/// way every byte must be used.
pub fn decode_record(bytes: &[u8]) -> Result<AuditRecord, postcard::Error> {
    exact::<AuditRecord>(bytes)
        .or_else(|e| exact::<LegacyRecord>(bytes).map(Into::into).map_err(|_| e))
}

/// Decodes a list of records (a postcard `Vec`) written in either audit format.
pub fn decode_records(bytes: &[u8]) -> Result<Vec<AuditRecord>, postcard::Error> {
    exact::<Vec<AuditRecord>>(bytes).or_else(|e| {
        exact::<Vec<LegacyRecord>>(bytes)
            .map(|v| v.into_iter().map(Into::into).collect())
            .map_err(|_| e)
    })
}

fn exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    match postcard::take_from_bytes::<T>(bytes)? {
        (value, []) => Ok(value),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

/// A record: its content and the hash that chains it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub entry: AuditEntry,
    pub hash: Hash,
}

impl AuditEntry {
    /// SHA-256 over a domain tag and the canonical (postcard) encoding.
    pub fn compute_hash(&self) -> Hash {
        if let Some(fields) = self.format_1() {
            // Hashed as format 1 (see `LegacyEntry`), field for field.
            return crate::hashing::sha256_of(DOMAIN, &fields);
        }
        crate::hashing::sha256_of(DOMAIN_V2, self)
    }

    /// The fields of a record with neither cause nor detail, in format 1's layout
    /// (`LegacyEntry`); None for any other.
    #[allow(clippy::type_complexity)]
    fn format_1(
        &self,
    ) -> Option<(
        u64,
        u64,
        u64,
        u64,
        AuditKind,
        &BudgetPath,
        &Principal,
        &Option<Unit>,
        &Option<LeaseId>,
        &Flow,
        &Vec<Balance>,
        &Vec<LimitSpec>,
        &Hash,
    )> {
        (self.cause.is_none() && self.detail.is_none()).then_some((
            self.seq,
            self.log_index,
            self.time_ms,
            self.effective_ms,
            self.kind,
            &self.budget,
            &self.principal,
            &self.unit,
            &self.lease,
            &self.flow,
            &self.balances,
            &self.limits,
            &self.prev_hash,
        ))
    }

    /// The trace id it carries: its cause's, or a recorded call's.
    pub fn trace(&self) -> Option<&str> {
        match &self.detail {
            Some(Detail::Call { trace, .. }) => Some(trace),
            _ => self.cause.as_ref().and_then(|c| c.trace.as_deref()),
        }
    }
}

/// Where the chain ends: the next sequence number and the last hash.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub next_seq: u64,
    pub last_hash: Hash,
}

impl Default for ChainHead {
    fn default() -> Self {
        Self { next_seq: 0, last_hash: GENESIS }
    }
}

impl fmt::Debug for ChainHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHead({}, {})", self.next_seq, hex(&self.last_hash))
    }
}

impl ChainHead {
    /// Numbers, links and hashes `entry`, and moves the head past it.
    pub(crate) fn seal(&mut self, mut entry: AuditEntry) -> AuditRecord {
        entry.seq = self.next_seq;
        entry.prev_hash = self.last_hash;
        let hash = entry.compute_hash();
        self.next_seq = self.next_seq.checked_add(1).expect("audit sequence overflow");
        self.last_hash = hash;
        AuditRecord { entry, hash }
    }
}

/// Lower-case hex of a hash.
pub fn hex(hash: &Hash) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Where and why a chain does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain breaks at record {seq}: {reason}")]
pub struct ChainBreak {
    pub seq: u64,
    pub reason: String,
}

/// Checks a run of records: gapless sequence numbers, each `prev_hash` equal to the
/// previous hash, each hash recomputed. `start` is the head the run must continue
/// (the default head for a chain from its first record). Returns the head after it.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    start: ChainHead,
) -> Result<ChainHead, ChainBreak> {
    let mut head = start;
    for record in records {
        let e = &record.entry;
        if e.seq != head.next_seq {
            return Err(ChainBreak {
                seq: e.seq,
                reason: format!("expected sequence number {}, found {}", head.next_seq, e.seq),
            });
        }
        if e.prev_hash != head.last_hash {
            return Err(ChainBreak {
                seq: e.seq,
                reason: "prev_hash does not match the hash of the record before it".into(),
            });
        }
        let computed = e.compute_hash();
        if computed != record.hash {
            return Err(ChainBreak {
                seq: e.seq,
                reason: format!(
                    "content does not match its hash (stored {}, computed {})",
                    hex(&record.hash),
                    hex(&computed)
                ),
            });
        }
        head = ChainHead { next_seq: e.seq.saturating_add(1), last_hash: computed };
    }
    Ok(head)
}

/// Which records a query selects. Empty fields select everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records on this budget or below it.
    pub subtree: Option<BudgetPath>,
    pub principal: Option<Principal>,
    /// Any of these kinds; empty means all.
    pub kinds: Vec<AuditKind>,
    /// Ledger time range `[from_ms, to_ms)` on `time_ms`.
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    /// Records carrying this trace id (see [`AuditEntry::trace`]).
    pub trace: Option<String>,
    /// Records caused by this client id.
    pub client: Option<ClientId>,
}

impl AuditFilter {
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let e = &record.entry;
        self.subtree.as_ref().is_none_or(|s| e.budget.is_within(s))
            && self.principal.as_ref().is_none_or(|p| &e.principal == p)
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && self.from_ms.is_none_or(|t| e.time_ms >= t)
            && self.to_ms.is_none_or(|t| e.time_ms < t)
            && self.trace.as_deref().is_none_or(|t| e.trace() == Some(t))
            && self.client.as_ref().is_none_or(|c| e.cause.as_ref().is_some_and(|x| &x.client == c))
    }
}

/// The records `filter` selects, in order.
pub fn query<'a, 'f>(
    records: impl IntoIterator<Item = &'a AuditRecord> + 'f,
    filter: &'f AuditFilter,
) -> impl Iterator<Item = &'a AuditRecord> + 'f
where
    'a: 'f,
{
    records.into_iter().filter(move |r| filter.matches(r))
}

/// Net spend of one budget (its own and its descendants') in one unit and window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendRow {
    pub budget: BudgetPath,
    pub unit: Unit,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    /// consumed + charged on expiry - refunded.
    pub spent: i128,
}

/// Spend per budget per window, for every budget in `subtree` that saw spend. Spend
/// on a descendant counts for each of its ancestors within the subtree. Records are
/// placed by their `effective_ms`, within `[from_ms, to_ms)` if given.
pub fn spend<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    subtree: &BudgetPath,
    window: Window,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
) -> Vec<SpendRow> {
    let mut rows: BTreeMap<(BudgetPath, Unit, u64), (u64, i128)> = BTreeMap::new();
    for record in records {
        let e = &record.entry;
        let net = e.flow.net_spend();
        let Some(unit) = &e.unit else { continue };
        if net == 0
            || !e.budget.is_within(subtree)
            || from_ms.is_some_and(|t| e.effective_ms < t)
            || to_ms.is_some_and(|t| e.effective_ms >= t)
        {
            continue;
        }
        let (start, end) = window.bounds(e.effective_ms);
        let mut at = Some(e.budget.clone());
        while let Some(path) = at {
            if !path.is_within(subtree) {
                break;
            }
            at = path.parent();
            let row = rows.entry((path, unit.clone(), start)).or_insert((end, 0));
            row.1 = row.1.saturating_add(net);
        }
    }
    rows.into_iter()
        .map(|((budget, unit, window_start_ms), (window_end_ms, spent))| SpendRow {
            budget,
            unit,
            window_start_ms,
            window_end_ms,
            spent,
        })
        .collect()
}

/// An in-memory audit store that refuses anything that does not continue its chain.
#[derive(Clone, Debug, Default)]
pub struct AuditLog {
    records: Vec<AuditRecord>,
    head: ChainHead,
}

impl AuditLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends records the ledger emitted, checking each continues the chain.
    pub fn append(
        &mut self,
        records: impl IntoIterator<Item = AuditRecord>,
    ) -> Result<(), ChainBreak> {
        for record in records {
            self.head = verify_chain([&record], self.head)?;
            self.records.push(record);
        }
        Ok(())
    }

    pub fn records(&self) -> &[AuditRecord] {
        &self.records
    }

    pub fn head(&self) -> ChainHead {
        self.head
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn query<'f>(
        &'f self,
        filter: &'f AuditFilter,
    ) -> impl Iterator<Item = &'f AuditRecord> + 'f {
        query(&self.records, filter)
    }

    /// Re-verifies the whole chain from its first record.
    pub fn verify(&self) -> Result<ChainHead, ChainBreak> {
        verify_chain(&self.records, ChainHead::default())
    }
}
