//! `audit query|export|verify|spend`.
//!
//! Records arrive as protobuf and are turned back into ration-core records
//! (`convert::to_core::audit_record`), so this tool recomputes every hash itself: it
//! trusts neither the node nor the file. An exported record carries every hashed
//! field, so `audit verify --file` checks an export with no cluster at all.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Subcommand;
use ration_core::audit::{verify_chain, AuditEntry, AuditRecord, ChainHead, Flow, Hash};
use ration_core::{BudgetPath, LeaseId, Principal, Unit};
use ration_proto::v1::ledger_client::LedgerClient;
use ration_proto::{convert, v1};
use serde::{Deserialize, Serialize};

use crate::output::{amount, emit, Table};

use crate::{describe, time, Ctx, FileFormat};

/// Records asked for per page.
const PAGE: u32 = 1000;

#[derive(Debug, Clone, clap::Args)]
pub struct Filter {
    /// Records on this budget or below it.
    #[arg(long)]
    subtree: Option<String>,
    /// Records of this gateway (or operator).
    #[arg(long)]
    principal: Option<String>,
    /// Only these kinds (repeatable, or comma-separated): lease_granted,
    /// lease_reported, lease_released, lease_expired, lease_refunded, late_release,
    /// overrun, budget_created, budget_updated, budget_deleted, threshold_crossed,
    /// shadow_refusal, call_recorded, price_set, options_set (and the rest
    /// `QueryAudit` lists).
    #[arg(long = "kind", value_delimiter = ',')]
    kinds: Vec<String>,
    /// Records carrying this trace id: those its requests caused, and its
    /// recorded calls.
    #[arg(long)]
    trace: Option<String>,
    /// Records caused by requests of this client id.
    #[arg(long = "client-id")]
    client: Option<String>,
    /// From this time on (RFC 3339 UTC, ms since the epoch, or -2h).
    #[arg(long, allow_hyphen_values = true)]
    from: Option<String>,
    /// Before this time.
    #[arg(long, allow_hyphen_values = true)]
    to: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Records matching a filter, newest first, with how many matched.
    Query {
        #[command(flatten)]
        filter: Filter,
        /// Most records to print, the newest (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Every record (a contiguous run of the chain), as JSON Lines or CSV, ending
    /// with a trailer.
    ///
    /// Each page of records comes from whichever endpoint answers: a page that
    /// fails is asked of the other endpoints, for up to 5 rounds with a growing
    /// pause between them, so a node going away mid-export does not stop it. A
    /// finished export ends with a trailer line,
    /// {"trailer":{"records":N,"first_seq":..,"last_seq":..,"chain_head":"<hex>"}}
    /// (chain_head: the hash of the last record, the head of the chain when the
    /// export ended; in CSV a row whose seq cell is `trailer` and whose next cell
    /// holds that JSON), so `audit verify --file` tells a complete file from a
    /// cut-off one. An export with --to-seq is an excerpt and has no trailer.
    ///
    /// If a page cannot be fetched from any endpoint, the export stops (exit
    /// status 1) saying how many records it wrote: the file holds them and no
    /// trailer (a prefix), and `--resume` continues it.
    Export {
        /// The file format: one JSON record per line, or CSV.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: FileFormat,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// First sequence number.
        #[arg(long, default_value_t = 0, conflicts_with = "resume")]
        from_seq: u64,
        /// Stop before this sequence number (an excerpt: no trailer).
        #[arg(long)]
        to_seq: Option<u64>,
        /// Continue the export in --out after its last record: one that stopped
        /// part way, or a complete one brought up to date (its trailer is
        /// replaced). A missing or empty file is exported afresh; a broken one is
        /// left alone.
        #[arg(long, requires = "out")]
        resume: bool,
    },
    /// Check the hash chain end to end, on the cluster or in an exported file, and
    /// say where it breaks.
    ///
    /// A file is complete when its records chain and it ends with a trailer whose
    /// count, sequence numbers and chain head match them; a prefix when its records
    /// chain but the trailer is missing, the last line is cut off, or the trailer
    /// names more records than the file holds (the export did not finish); broken
    /// when a record does not parse, does not chain or does not match its hash, or
    /// the trailer disagrees with the records. With -o json the report (its
    /// `status`: complete, prefix or broken) is printed in every case.
    ///
    /// Exit status: 0 complete (on the cluster: the chain verifies); 3 prefix;
    /// 4 broken (a file, or the chain on the node); 1 nothing could be checked
    /// (an unreadable file, no endpoint answered).
    Verify {
        /// An export to check instead of the cluster.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The file's format (default: from its extension, .csv or JSON Lines).
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
    },
    /// Net spend (consumed + charged at expiry - refunded) per budget per window.
    Spend {
        /// The budget whose tree to sum (each budget includes those below it).
        #[arg(long)]
        subtree: String,
        /// Window to group by: minute, hour, day, week, month, lifetime (+HH:MM).
        #[arg(long, default_value = "day")]
        window: String,
        /// From this time on (RFC 3339 UTC, ms since the epoch, or -2h).
        #[arg(long, allow_hyphen_values = true)]
        from: Option<String>,
        /// Before this time.
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
    },
}

/// One record as exported: every hashed field, and the hashes in hex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    pub seq: u64,
    pub log_index: u64,
    pub time_ms: u64,
    pub effective_ms: u64,
    pub kind: String,
    pub budget: BudgetPath,
    pub principal: Principal,
    pub unit: Option<Unit>,
    pub lease: Option<LeaseId>,
    pub granted: u64,
    pub consumed: u64,
    pub returned: u64,
    pub charged: u64,
    pub uncharged: u64,
    #[serde(deserialize_with = "spelled::balances")]
    pub balances: Vec<spelled::Balance>,
    #[serde(deserialize_with = "spelled::limits")]
    pub limits: Vec<spelled::Limit>,
    pub prev_hash: String,
    pub hash: String,
    /// The request behind it: client id, request id, trace id, usage lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<ration_core::audit::Cause>,
    /// What a price, options, threshold, shadow-refusal or call record says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<ration_core::audit::Detail>,
}

/// Balances and limits as exported, spelled as the rest of rationctl's JSON is:
/// windows by name (`day+05:30`), policies in snake_case (`fail_closed`, `static`
/// with `static_allowance`). Files written before this spelling (the core types'
/// own: `{"period":"Day",...}`, `"FailClosed"`) still read.
pub mod spelled {
    use ration_core::{BudgetPath, FailPolicy, LimitSpec, Unit, Window};
    use serde::{Deserialize, Deserializer, Serialize};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Balance {
        pub budget: BudgetPath,
        pub unit: Unit,
        pub window: String,
        pub window_start_ms: u64,
        pub cap: u64,
        pub consumed: u64,
        pub outstanding: u64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Limit {
        pub unit: Unit,
        pub cap: u64,
        pub window: String,
        /// `fail_closed` or `static`.
        pub on_unreachable: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub static_allowance: Option<u64>,
    }

    impl Balance {
        pub fn from_core(b: &ration_core::audit::Balance) -> Self {
            Self {
                budget: b.budget.clone(),
                unit: b.unit.clone(),
                window: b.window.to_string(),
                window_start_ms: b.window_start_ms,
                cap: b.cap,
                consumed: b.consumed,
                outstanding: b.outstanding,
            }
        }

        pub fn into_core(self) -> anyhow::Result<ration_core::audit::Balance> {
            Ok(ration_core::audit::Balance {
                budget: self.budget,
                unit: self.unit,
                window: window(&self.window)?,
                window_start_ms: self.window_start_ms,
                cap: self.cap,
                consumed: self.consumed,
                outstanding: self.outstanding,
            })
        }
    }

    impl Limit {
        pub fn from_core(l: &LimitSpec) -> Self {
            let (on_unreachable, static_allowance) = match l.on_unreachable {
                FailPolicy::FailClosed => ("fail_closed", None),
                FailPolicy::StaticAllowance { amount } => ("static", Some(amount)),
            };
            Self {
                unit: l.unit.clone(),
                cap: l.cap,
                window: l.window.to_string(),
                on_unreachable: on_unreachable.to_owned(),
                static_allowance,
            }
        }

        pub fn into_core(self) -> anyhow::Result<LimitSpec> {
            let on_unreachable = match (self.on_unreachable.as_str(), self.static_allowance) {
                ("fail_closed", None) => FailPolicy::FailClosed,
                ("static", Some(amount)) => FailPolicy::StaticAllowance { amount },
                (other, _) => anyhow::bail!(
                    "on_unreachable {other:?} (static_allowance {:?}): use fail_closed, or \
                     static with static_allowance",
                    self.static_allowance
                ),
            };
            Ok(LimitSpec {
                unit: self.unit,
                cap: self.cap,
                window: window(&self.window)?,
                on_unreachable,
            })
        }
    }

    fn window(name: &str) -> anyhow::Result<Window> {
        crate::budget::parse_window(name)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BalanceIn {
        Spelled(Balance),
        Core(ration_core::audit::Balance),
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum LimitIn {
        Spelled(Limit),
        Core(LimitSpec),
    }

    pub fn balances<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Balance>, D::Error> {
        let v: Vec<BalanceIn> = Vec::deserialize(d)?;
        Ok(v.into_iter()
            .map(|b| match b {
                BalanceIn::Spelled(b) => b,
                BalanceIn::Core(b) => Balance::from_core(&b),
            })
            .collect())
    }

    pub fn limits<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Limit>, D::Error> {
        let v: Vec<LimitIn> = Vec::deserialize(d)?;
        Ok(v.into_iter()
            .map(|l| match l {
                LimitIn::Spelled(l) => l,
                LimitIn::Core(l) => Limit::from_core(&l),
            })
            .collect())
    }
}

/// The same in CSV: nested fields as JSON text in one cell.
#[derive(Debug, Serialize, Deserialize)]
struct CsvRow {
    seq: u64,
    log_index: u64,
    time_ms: u64,
    effective_ms: u64,
    kind: String,
    budget: String,
    principal: String,
    unit: String,
    lease: String,
    granted: u64,
    consumed: u64,
    returned: u64,
    charged: u64,
    uncharged: u64,
    balances: String,
    limits: String,
    prev_hash: String,
    hash: String,
    #[serde(default)]
    cause: String,
    #[serde(default)]
    detail: String,
}

fn unhex(field: &str, s: &str) -> anyhow::Result<Hash> {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow!("{field} is not hex"))?;
    bytes.try_into().map_err(|_| anyhow!("{field} is not 32 bytes"))
}

impl Exported {
    pub fn from_core(r: &AuditRecord) -> Self {
        let e = &r.entry;
        Self {
            seq: e.seq,
            log_index: e.log_index,
            time_ms: e.time_ms,
            effective_ms: e.effective_ms,
            kind: e.kind.name().to_owned(),
            budget: e.budget.clone(),
            principal: e.principal.clone(),
            unit: e.unit.clone(),
            lease: e.lease,
            granted: e.flow.granted,
            consumed: e.flow.consumed,
            returned: e.flow.returned,
            charged: e.flow.charged,
            uncharged: e.flow.uncharged,
            balances: e.balances.iter().map(spelled::Balance::from_core).collect(),
            limits: e.limits.iter().map(spelled::Limit::from_core).collect(),
            prev_hash: ration_core::audit::hex(&e.prev_hash),
            hash: ration_core::audit::hex(&r.hash),
            cause: e.cause.clone(),
            detail: e.detail.clone(),
        }
    }

    pub fn into_core(self) -> anyhow::Result<AuditRecord> {
        let kind =
            convert::to_core::audit_kind(&self.kind).map_err(|s| anyhow!("{}", s.message()))?;
        Ok(AuditRecord {
            entry: AuditEntry {
                seq: self.seq,
                log_index: self.log_index,
                time_ms: self.time_ms,
                effective_ms: self.effective_ms,
                kind,
                budget: self.budget,
                principal: self.principal,
                unit: self.unit,
                lease: self.lease,
                flow: Flow {
                    granted: self.granted,
                    consumed: self.consumed,
                    returned: self.returned,
                    charged: self.charged,
                    uncharged: self.uncharged,
                },
                balances: self
                    .balances
                    .into_iter()
                    .map(spelled::Balance::into_core)
                    .collect::<anyhow::Result<_>>()
                    .context("balances")?,
                limits: self
                    .limits
                    .into_iter()
                    .map(spelled::Limit::into_core)
                    .collect::<anyhow::Result<_>>()
                    .context("limits")?,
                prev_hash: unhex("prev_hash", &self.prev_hash)?,
                cause: self.cause,
                detail: self.detail,
            },
            hash: unhex("hash", &self.hash)?,
        })
    }

    fn to_csv(&self) -> anyhow::Result<CsvRow> {
        Ok(CsvRow {
            seq: self.seq,
            log_index: self.log_index,
            time_ms: self.time_ms,
            effective_ms: self.effective_ms,
            kind: self.kind.clone(),
            budget: self.budget.to_string(),
            principal: self.principal.to_string(),
            unit: self.unit.as_ref().map(|u| u.to_string()).unwrap_or_default(),
            lease: self.lease.map(|l| l.raw().to_string()).unwrap_or_default(),
            granted: self.granted,
            consumed: self.consumed,
            returned: self.returned,
            charged: self.charged,
            uncharged: self.uncharged,
            balances: serde_json::to_string(&self.balances)?,
            limits: serde_json::to_string(&self.limits)?,
            prev_hash: self.prev_hash.clone(),
            hash: self.hash.clone(),
            cause: match &self.cause {
                Some(c) => serde_json::to_string(c)?,
                None => String::new(),
            },
            detail: match &self.detail {
                Some(d) => serde_json::to_string(d)?,
                None => String::new(),
            },
        })
    }

    fn from_csv(r: CsvRow) -> anyhow::Result<Self> {
        let name = |field: &str, e: ration_core::LedgerError| anyhow!("{field}: {e}");
        Ok(Self {
            seq: r.seq,
            log_index: r.log_index,
            time_ms: r.time_ms,
            effective_ms: r.effective_ms,
            kind: r.kind,
            budget: BudgetPath::new(r.budget.as_str()).map_err(|e| name("budget", e))?,
            principal: Principal::new(r.principal.as_str()).map_err(|e| name("principal", e))?,
            unit: (!r.unit.is_empty())
                .then(|| Unit::new(r.unit.as_str()))
                .transpose()
                .map_err(|e| name("unit", e))?,
            lease: (!r.lease.is_empty())
                .then(|| r.lease.parse::<u64>().map(LeaseId::from_raw))
                .transpose()
                .map_err(|_| anyhow!("lease is not a number"))?,
            granted: r.granted,
            consumed: r.consumed,
            returned: r.returned,
            charged: r.charged,
            uncharged: r.uncharged,
            balances: spelled::balances(&mut serde_json::Deserializer::from_str(&r.balances))
                .context("balances")?,
            limits: spelled::limits(&mut serde_json::Deserializer::from_str(&r.limits))
                .context("limits")?,
            prev_hash: r.prev_hash,
            hash: r.hash,
            cause: (!r.cause.is_empty())
                .then(|| serde_json::from_str(&r.cause))
                .transpose()
                .context("cause")?,
            detail: (!r.detail.is_empty())
                .then(|| serde_json::from_str(&r.detail))
                .transpose()
                .context("detail")?,
        })
    }
}

/// `audit verify`'s exit status for a file that is a prefix (an export that did not
/// finish).
pub const EXIT_PREFIX: i32 = 3;
/// `audit verify`'s exit status for a broken file, or a chain on a node that does
/// not verify.
pub const EXIT_BROKEN: i32 = 4;

/// What `audit verify --file` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    /// The records chain and the trailer matches them.
    Complete,
    /// The records chain but the export did not finish: no trailer, a cut-off last
    /// line, or a trailer that names more records than the file holds.
    Prefix,
    /// A record does not parse, chain or match its hash, or the trailer disagrees.
    Broken,
}

/// The error `audit verify` ends with when a file is not complete (or the chain on
/// a node is broken); it carries the exit status ([`exit_code`]).
#[derive(Debug)]
pub struct VerifyFailed {
    pub status: FileStatus,
    message: String,
}

impl VerifyFailed {
    pub fn exit_code(&self) -> i32 {
        match self.status {
            FileStatus::Complete => 0,
            FileStatus::Prefix => EXIT_PREFIX,
            FileStatus::Broken => EXIT_BROKEN,
        }
    }
}

impl std::fmt::Display for VerifyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for VerifyFailed {}

/// The process exit status for an error [`crate::run`] returned: [`EXIT_PREFIX`] or
/// [`EXIT_BROKEN`] when `audit verify` found a prefix or a broken chain, 1 for any
/// other failure.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    e.downcast_ref::<VerifyFailed>().map_or(1, VerifyFailed::exit_code)
}

/// The last line of a finished export: what the file holds, so that a file cut
/// short (or padded) is told apart from a complete one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// Records in the file.
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Hex hash of the last record: the head of the chain when the export ended.
    /// With no records: the genesis hash for an export from record 0, else none.
    pub chain_head: Option<String>,
}

/// A trailer as a JSON Lines line: `{"trailer":{...}}` (a record has no such key).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrailerLine {
    trailer: Trailer,
}

/// The `seq` cell of a CSV export's trailer row (the next cell holds the trailer as
/// JSON, the others are empty).
const CSV_TRAILER: &str = "trailer";

/// An export read back: its records, its trailer, and what is wrong with its lines.
#[derive(Debug, Default)]
pub struct ExportFile {
    pub records: Vec<AuditRecord>,
    /// The trailer, and the byte offset where its line starts.
    pub trailer: Option<(Trailer, u64)>,
    /// The first line that is neither a record nor a trailer, or is out of place (a
    /// record or a second trailer after the trailer): where, and why.
    pub bad: Option<String>,
    /// Where the last line starts, when it is cut off: the file does not end with a
    /// newline and that line does not parse.
    pub torn_at: Option<u64>,
}

/// What an export's records and trailer add up to.
#[derive(Debug)]
pub struct Finding {
    pub status: FileStatus,
    /// The head after the records that chain (every record, unless broken).
    pub head: ChainHead,
    /// Why the file is not complete.
    pub problem: Option<String>,
}

/// One line (CSV: one row) of an export.
struct Item {
    at: u64,
    label: String,
    parsed: anyhow::Result<Line>,
}

enum Line {
    Record(Box<AuditRecord>),
    Trailer(Trailer),
}

impl ExportFile {
    pub fn read(path: &std::path::Path, format: FileFormat) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self::parse(&bytes, format))
    }

    /// Reads an export's bytes. Never fails: what does not parse is in `bad` or
    /// `torn_at`.
    pub fn parse(bytes: &[u8], format: FileFormat) -> Self {
        let items = match format {
            FileFormat::Jsonl => jsonl_items(bytes),
            FileFormat::Csv => csv_items(bytes),
        };
        let ends_whole = bytes.last().is_none_or(|b| *b == b'\n');
        let last = items.len().saturating_sub(1);
        let mut file = Self::default();
        for (k, item) in items.into_iter().enumerate() {
            match item.parsed {
                Err(_) if k == last && !ends_whole => file.torn_at = Some(item.at),
                Err(e) => {
                    file.bad = Some(format!("{}: {e:#}", item.label));
                    break;
                }
                Ok(_) if file.trailer.is_some() => {
                    file.bad = Some(format!("{} follows the trailer", item.label));
                    break;
                }
                Ok(Line::Trailer(t)) => file.trailer = Some((t, item.at)),
                Ok(Line::Record(r)) => file.records.push(*r),
            }
        }
        file
    }

    /// Complete, a prefix or broken, and why.
    pub fn check(&self) -> Finding {
        use ration_core::audit::hex;
        let mut head = start_of(self.records.first());
        let found =
            |status, head, problem: String| Finding { status, head, problem: Some(problem) };
        for r in &self.records {
            match verify_chain(std::iter::once(r), head) {
                Ok(next) => head = next,
                Err(b) => return found(FileStatus::Broken, head, b.to_string()),
            }
        }
        if let Some(bad) = &self.bad {
            return found(FileStatus::Broken, head, bad.clone());
        }
        let n = self.records.len() as u64;
        let first = self.records.first().map(|r| r.entry.seq);
        let last = self.records.last().map(|r| r.entry.seq);
        let Some((t, _)) = &self.trailer else {
            let why = if self.torn_at.is_some() {
                "its last line is cut off and it has no trailer (the export did not finish)"
            } else {
                "it has no trailer (the export did not finish)"
            };
            return found(FileStatus::Prefix, head, why.into());
        };
        if self.torn_at.is_some() {
            return found(FileStatus::Broken, head, "a cut-off line follows the trailer".into());
        }
        let head_hex = hex(&head.last_hash);
        if t.records == n
            && t.first_seq == first
            && t.last_seq == last
            && (n == 0 || t.chain_head.as_deref() == Some(head_hex.as_str()))
        {
            return Finding { status: FileStatus::Complete, head, problem: None };
        }
        let seqs = |f: Option<u64>, l: Option<u64>| match (f, l) {
            (Some(f), Some(l)) => format!("seq {f}..={l}"),
            _ => "no records".into(),
        };
        if t.records > n
            && (n == 0 || t.first_seq == first)
            && last.is_none_or(|l| t.last_seq.is_some_and(|tl| tl > l))
        {
            return found(
                FileStatus::Prefix,
                head,
                format!(
                    "its trailer names {} records ({}): the rest are missing",
                    t.records,
                    seqs(t.first_seq, t.last_seq)
                ),
            );
        }
        found(
            FileStatus::Broken,
            head,
            format!(
                "its trailer ({} records, {}, chain head {}) disagrees with its records ({n}, {}, \
                 chain head {head_hex})",
                t.records,
                seqs(t.first_seq, t.last_seq),
                t.chain_head.as_deref().unwrap_or("none"),
                seqs(first, last),
            ),
        )
    }
}

fn jsonl_items(bytes: &[u8]) -> Vec<Item> {
    let mut items = Vec::new();
    let mut at = 0u64;
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let start = at;
        at = at.saturating_add(line.len() as u64).saturating_add(1);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = std::str::from_utf8(line).map_err(|_| anyhow!("not UTF-8")).and_then(|l| {
            if let Ok(t) = serde_json::from_str::<TrailerLine>(l) {
                return Ok(Line::Trailer(t.trailer));
            }
            let e: Exported = serde_json::from_str(l)?;
            Ok(Line::Record(Box::new(e.into_core()?)))
        });
        items.push(Item { at: start, label: format!("line {}", i.saturating_add(1)), parsed });
    }
    items
}

fn csv_items(bytes: &[u8]) -> Vec<Item> {
    let mut reader = csv::Reader::from_reader(bytes);
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => return vec![Item { at: 0, label: "the header".into(), parsed: Err(e.into()) }],
    };
    let mut items = Vec::new();
    let mut row = csv::StringRecord::new();
    for k in 1u64.. {
        let at = reader.position().byte();
        let parsed = match reader.read_record(&mut row) {
            Ok(false) => break,
            Ok(true) if row.get(0) == Some(CSV_TRAILER) => {
                serde_json::from_str(row.get(1).unwrap_or_default())
                    .map(Line::Trailer)
                    .context("a trailer row whose second cell is not the trailer")
            }
            Ok(true) => row
                .deserialize::<CsvRow>(Some(&headers))
                .map_err(anyhow::Error::from)
                .and_then(Exported::from_csv)
                .and_then(Exported::into_core)
                .map(|r| Line::Record(Box::new(r))),
            Err(e) => Err(e.into()),
        };
        items.push(Item { at, label: format!("record {k}"), parsed });
        if reader.position().byte() <= at {
            break;
        }
    }
    items
}

/// Reads an export (JSON Lines or CSV) back into core records; its trailer, if it
/// has one, is left out. Fails on a line that is neither.
pub fn read_export(path: &std::path::Path, format: FileFormat) -> anyhow::Result<Vec<AuditRecord>> {
    let file = ExportFile::read(path, format)?;
    if let Some(bad) = file.bad {
        return Err(anyhow!("{} {bad}", path.display()));
    }
    if file.torn_at.is_some() {
        return Err(anyhow!("{}: its last line is cut off", path.display()));
    }
    Ok(file.records)
}

/// Writes records in `format`.
pub fn write_export(
    records: &[AuditRecord],
    format: FileFormat,
    out: &mut dyn Write,
    csv_header: bool,
) -> anyhow::Result<()> {
    match format {
        FileFormat::Jsonl => {
            for r in records {
                serde_json::to_writer(&mut *out, &Exported::from_core(r))?;
                writeln!(out)?;
            }
        }
        FileFormat::Csv => {
            let mut w = csv::WriterBuilder::new().has_headers(csv_header).from_writer(&mut *out);
            for r in records {
                w.serialize(Exported::from_core(r).to_csv()?)?;
            }
            w.flush()?;
        }
    }
    Ok(())
}

/// Writes the trailer line that ends a finished export.
pub fn write_trailer(
    trailer: &Trailer,
    format: FileFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match format {
        FileFormat::Jsonl => {
            serde_json::to_writer(&mut *out, &TrailerLine { trailer: trailer.clone() })?;
            writeln!(out)?;
        }
        FileFormat::Csv => {
            let json = serde_json::to_string(trailer)?;
            let mut row = vec![CSV_TRAILER, json.as_str()];
            row.resize(CSV_FIELDS.len(), "");
            let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(&mut *out);
            w.write_record(&row)?;
            w.flush()?;
        }
    }
    Ok(())
}

/// Rounds of attempts at one page of records; each round asks every endpoint.
const PAGE_ROUNDS: u32 = 5;
/// The pause before the second round, doubled before each round after it.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
const RETRY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Pages through QueryAudit, handing each page of core records to `each`; stops
/// when it returns false or records run out. Returns the endpoint that answered the
/// last page.
///
/// A page is asked of the endpoint that answered the one before; if that fails with
/// a retryable status (the node is down or has no leader, the deadline passed), of
/// the others in turn, for [`PAGE_ROUNDS`] rounds with a growing pause between
/// them, always from the page's first sequence number. A linearizable request may
/// be answered by any endpoint (each reads through the leader). Otherwise every
/// page after the first comes from the node that answered the first: its own copy
/// is what is being read, and a node further behind would end the run early.
async fn pages(
    ctx: &Ctx,
    mut req: v1::QueryAuditRequest,
    mut each: impl FnMut(Vec<AuditRecord>) -> anyhow::Result<bool>,
) -> anyhow::Result<String> {
    req.limit = PAGE;
    let mut clients = vec![None; ctx.endpoints.len()];
    let mut at = None;
    loop {
        let (reply, i) = page(ctx, &req, &mut clients, at).await?;
        at = Some(i);
        let endpoint = ctx.endpoints.get(i).cloned().unwrap_or_default();
        let records = reply
            .records
            .iter()
            .map(convert::to_core::audit_record)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|s| anyhow!("{endpoint} sent a malformed record: {}", s.message()))?;
        let empty = records.is_empty();
        if !empty && !each(records)? {
            return Ok(endpoint);
        }
        if empty && reply.next_seq == req.from_seq {
            return Ok(endpoint);
        }
        req.from_seq = reply.next_seq;
    }
}

/// One page of [`pages`]: the reply and the index of the endpoint that gave it.
async fn page(
    ctx: &Ctx,
    req: &v1::QueryAuditRequest,
    clients: &mut [Option<LedgerClient<crate::Chan>>],
    at: Option<usize>,
) -> anyhow::Result<(v1::QueryAuditReply, usize)> {
    let n = clients.len();
    let order: Vec<usize> = match at {
        Some(i) if !req.linearizable => vec![i],
        Some(i) => (0..n).map(|k| i.saturating_add(k) % n.max(1)).collect(),
        None => (0..n).collect(),
    };
    let mut failures = Vec::new();
    for round in 0..PAGE_ROUNDS {
        if round > 0 {
            let pause = time::backoff(round, RETRY_PAUSE, RETRY_PAUSE_MAX);
            eprintln!(
                "rationctl: no endpoint answered for audit records from seq {} ({}); round {} \
                 of {PAGE_ROUNDS} in {} ms",
                req.from_seq,
                failures.join("; "),
                round.saturating_add(1),
                pause.as_millis()
            );
            tokio::time::sleep(pause).await;
            failures.clear();
        }
        for &i in &order {
            let (Some(endpoint), Some(slot)) = (ctx.endpoints.get(i), clients.get_mut(i)) else {
                continue;
            };
            let client = match slot {
                Some(c) => c.clone(),
                None => match ctx.ledger(endpoint) {
                    Ok(c) => slot.insert(c).clone(),
                    Err(e) => {
                        failures.push(format!("{endpoint}: {e:#}"));
                        continue;
                    }
                },
            };
            match client.clone().query_audit(req.clone()).await {
                Ok(reply) => return Ok((reply.into_inner(), i)),
                Err(s) if ration_proto::rpc::retryable(&s) => {
                    if at.is_some() && round == 0 {
                        eprintln!(
                            "rationctl: {endpoint} failed for audit records from seq {}: {}",
                            req.from_seq,
                            describe(&s)
                        );
                    }
                    // A fresh connection next time.
                    *slot = None;
                    failures.push(format!("{endpoint}: {}", describe(&s)));
                }
                Err(s) => return Err(anyhow!("{endpoint}: {}", describe(&s))),
            }
        }
    }
    Err(anyhow!(
        "no endpoint answered for audit records from seq {} in {PAGE_ROUNDS} rounds: {}",
        req.from_seq,
        failures.join("; ")
    ))
}

/// `--from` and `--to` as ledger times (ms), refusing an empty range.
fn time_range(from: Option<&str>, to: Option<&str>) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let now = time::now_ms();
    let from_ms = from.map(|t| time::parse(t, now)).transpose()?;
    let to_ms = to.map(|t| time::parse(t, now)).transpose()?;
    if let (Some(f), Some(t)) = (from_ms, to_ms) {
        if f >= t {
            return Err(anyhow!(
                "--from {} ({}) is not before --to {} ({}): the range is empty",
                from.unwrap_or_default(),
                time::format_ms(f),
                to.unwrap_or_default(),
                time::format_ms(t)
            ));
        }
    }
    Ok((from_ms, to_ms))
}

fn request(filter: &Filter) -> anyhow::Result<v1::QueryAuditRequest> {
    let (from_ms, to_ms) = time_range(filter.from.as_deref(), filter.to.as_deref())?;
    Ok(v1::QueryAuditRequest {
        subtree: filter.subtree.clone().unwrap_or_default(),
        principal: filter.principal.clone().unwrap_or_default(),
        kinds: filter.kinds.clone(),
        from_ms,
        to_ms,
        from_seq: 0,
        limit: PAGE,
        // Through the leader: every acknowledged write is in the answer.
        linearizable: true,
        trace: filter.trace.clone().unwrap_or_default(),
        client_id: filter.client.clone().unwrap_or_default(),
    })
}

/// What an export has written so far (a resumed file's records included).
#[derive(Debug, Default)]
struct Progress {
    records: u64,
    first_seq: Option<u64>,
    last: Option<(u64, Hash)>,
}

impl Progress {
    fn add(&mut self, page: &[AuditRecord]) {
        self.records = self.records.saturating_add(page.len() as u64);
        if self.first_seq.is_none() {
            self.first_seq = page.first().map(|r| r.entry.seq);
        }
        if let Some(r) = page.last() {
            self.last = Some((r.entry.seq, r.hash));
        }
    }

    fn trailer(&self, from_genesis: bool) -> Trailer {
        let chain_head = match self.last {
            Some((_, hash)) => Some(ration_core::audit::hex(&hash)),
            None if from_genesis => Some(ration_core::audit::hex(&ration_core::audit::GENESIS)),
            None => None,
        };
        Trailer {
            records: self.records,
            first_seq: self.first_seq,
            last_seq: self.last.map(|(seq, _)| seq),
            chain_head,
        }
    }

    fn seqs(&self) -> String {
        match (self.first_seq, self.last) {
            (Some(first), Some((last, _))) => format!(" (seq {first}..={last})"),
            _ => String::new(),
        }
    }
}

/// An export file opened for `--resume`. At the first write it is cut back to the
/// records it keeps (its trailer, or a cut-off last line, dropped), so a resume that
/// writes nothing leaves the file as it was.
#[derive(Debug)]
struct Resumed {
    file: std::fs::File,
    keep: u64,
    /// The kept part does not end with a newline: write one first.
    newline: bool,
    cut: bool,
}

impl Write for Resumed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.cut {
            use std::io::Seek;
            self.file.set_len(self.keep)?;
            self.file.seek(std::io::SeekFrom::End(0))?;
            if self.newline {
                self.file.write_all(b"\n")?;
            }
            self.cut = true;
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Where `--resume` picks up `path`: what it holds, and the file to append to; None
/// when there is nothing to keep (no file, or no records), so the export starts
/// afresh.
fn resume(
    path: &std::path::Path,
    format: FileFormat,
) -> anyhow::Result<Option<(Progress, Resumed)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let file = ExportFile::parse(&bytes, format);
    if file.records.is_empty() && file.bad.is_none() {
        return Ok(None);
    }
    let finding = file.check();
    let problem = finding.problem.clone().unwrap_or_default();
    match finding.status {
        FileStatus::Broken => {
            return Err(anyhow!(
                "cannot resume {}: it is broken ({problem}); export to a new file",
                path.display()
            ))
        }
        FileStatus::Prefix if file.trailer.is_some() => {
            return Err(anyhow!(
                "cannot resume {}: {problem}; export to a new file",
                path.display()
            ))
        }
        _ => {}
    }
    let keep =
        file.trailer.as_ref().map(|(_, at)| *at).or(file.torn_at).unwrap_or(bytes.len() as u64);
    let newline = usize::try_from(keep)
        .ok()
        .and_then(|k| k.checked_sub(1))
        .and_then(|i| bytes.get(i))
        .is_some_and(|b| *b != b'\n');
    let mut progress = Progress::default();
    progress.add(&file.records);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some((progress, Resumed { file: f, keep, newline, cut: false })))
}

/// `audit export`.
async fn export(
    ctx: &Ctx,
    format: FileFormat,
    file: Option<PathBuf>,
    from_seq: u64,
    to_seq: Option<u64>,
    resume_file: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let kept = match &file {
        Some(path) if resume_file => resume(path, format)?,
        _ => None,
    };
    let resumed = kept.is_some();
    let (mut progress, mut sink): (Progress, Box<dyn Write>) = match (kept, &file) {
        (Some((progress, f)), _) => (progress, Box::new(std::io::BufWriter::new(f))),
        (None, Some(path)) => (
            Progress::default(),
            Box::new(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create {}", path.display()))?,
            )),
        ),
        (None, None) => (Progress::default(), Box::new(&mut *out)),
    };
    let start = progress.last.map_or(from_seq, |(seq, _)| seq.saturating_add(1));
    // A resumed file's last record: the first one fetched must follow it.
    let mut link = progress.last.map(|(seq, hash)| (seq.saturating_add(1), hash));
    let mut header = !resumed;
    let req = v1::QueryAuditRequest { from_seq: start, ..request(&Filter::empty())? };
    let fetched = pages(ctx, req, |mut page| {
        if let Some(to) = to_seq {
            page.retain(|r| r.entry.seq < to);
        }
        let more =
            to_seq.is_none_or(|to| page.last().is_some_and(|r| r.entry.seq.saturating_add(1) < to));
        if let (Some((next, hash)), Some(r)) = (link.take(), page.first()) {
            if r.entry.seq != next || r.entry.prev_hash != hash {
                return Err(anyhow!(
                    "record {} on the cluster does not follow the file's last record (seq {}): \
                     they are not the same chain",
                    r.entry.seq,
                    next.saturating_sub(1)
                ));
            }
        }
        write_export(&page, format, &mut sink, header)?;
        if !page.is_empty() {
            header = false;
        }
        progress.add(&page);
        Ok(more && !page.is_empty())
    })
    .await;
    let dest = file.as_ref().map_or("standard output".into(), |p| p.display().to_string());
    if let Err(e) = fetched {
        sink.flush().with_context(|| format!("cannot write {dest}"))?;
        drop(sink);
        let how = match &file {
            Some(path) => format!(
                "`rationctl audit export --out {}{}{} --resume` continues it",
                path.display(),
                if format == FileFormat::Csv { " --format csv" } else { "" },
                to_seq.map(|t| format!(" --to-seq {t}")).unwrap_or_default()
            ),
            None => format!(
                "the rest starts at --from-seq {}",
                progress.last.map_or(start, |(seq, _)| seq.saturating_add(1))
            ),
        };
        return Err(e.context(format!(
            "audit export stopped: {dest} holds {} records{} and no trailer, so it is a \
             prefix; {how}",
            progress.records,
            progress.seqs()
        )));
    }
    if format == FileFormat::Csv && header {
        // No records: still write the header, so the file reads back.
        let mut w = csv::Writer::from_writer(&mut sink);
        w.write_record(CSV_FIELDS)?;
        w.flush()?;
    }
    let trailer = progress.trailer(start == 0);
    if to_seq.is_none() {
        write_trailer(&trailer, format, &mut sink)?;
    }
    sink.flush().with_context(|| format!("cannot write {dest}"))?;
    drop(sink);
    if let Some(path) = file {
        eprintln!(
            "exported {} records{} to {}{}",
            progress.records,
            progress.seqs(),
            path.display(),
            match (to_seq, trailer.chain_head) {
                (Some(_), _) => " (an excerpt, --to-seq: no trailer)".to_owned(),
                (None, Some(head)) => format!(", chain head {head}"),
                (None, None) => String::new(),
            }
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Verified {
    source: String,
    /// For a file: complete, prefix or broken.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<FileStatus>,
    records: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    /// The head after the records that chain.
    head_hash: String,
    /// False when the run does not start at record 0, so its first link is taken
    /// on trust.
    from_genesis: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    trailer: Option<Trailer>,
    /// Why a file is not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

/// `audit verify --file`.
fn verify_file(
    ctx: &Ctx,
    path: &std::path::Path,
    format: Option<FileFormat>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let format =
        format.unwrap_or(if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            FileFormat::Csv
        } else {
            FileFormat::Jsonl
        });
    let file = ExportFile::read(path, format)?;
    let finding = file.check();
    let first = file.records.first().map(|r| r.entry.seq);
    let v = Verified {
        source: path.display().to_string(),
        status: Some(finding.status),
        records: file.records.len() as u64,
        first_seq: first,
        last_seq: file.records.last().map(|r| r.entry.seq),
        head_hash: ration_core::audit::hex(&finding.head.last_hash),
        from_genesis: first.is_none_or(|s| s == 0),
        trailer: file.trailer.map(|(t, _)| t),
        problem: finding.problem.clone(),
    };
    if finding.status == FileStatus::Complete {
        return emit(out, ctx.format, &v, |v| {
            format!(
                "OK: complete: {} records verified ({}), chain head {} as the trailer says{}\n",
                v.records,
                v.source,
                v.head_hash,
                if v.from_genesis {
                    ""
                } else {
                    " (not from record 0: the first link is unchecked)"
                }
            )
        });
    }
    // Scripts get the report; people get the one error line.
    if ctx.format == crate::Format::Json {
        emit(out, ctx.format, &v, |_| String::new())?;
    }
    let message = match finding.status {
        FileStatus::Prefix => format!(
            "{} is a prefix: its {} records chain, but {}",
            path.display(),
            v.records,
            finding.problem.unwrap_or_default()
        ),
        _ => format!("{} is broken: {}", path.display(), finding.problem.unwrap_or_default()),
    };
    Err(VerifyFailed { status: finding.status, message }.into())
}

/// `audit verify` on the node that answers first: its own copy of the chain.
async fn verify_node(ctx: &Ctx, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut head: Option<ChainHead> = None;
    let mut first = None;
    let mut last = None;
    let mut count = 0u64;
    let req = v1::QueryAuditRequest { linearizable: false, ..request(&Filter::empty())? };
    let endpoint = pages(ctx, req, |page| {
        let start = head.unwrap_or_else(|| start_of(page.first()));
        head =
            Some(verify_chain(&page, start).map_err(|b| VerifyFailed {
                status: FileStatus::Broken,
                message: b.to_string(),
            })?);
        first = first.or(page.first().map(|r| r.entry.seq));
        last = page.last().map(|r| r.entry.seq);
        count = count.saturating_add(page.len() as u64);
        Ok(true)
    })
    .await?;
    let v = Verified {
        source: format!("node at {endpoint}"),
        status: None,
        records: count,
        first_seq: first,
        last_seq: last,
        head_hash: ration_core::audit::hex(&head.unwrap_or_default().last_hash),
        from_genesis: first.is_none_or(|s| s == 0),
        trailer: None,
        problem: None,
    };
    emit(out, ctx.format, &v, |v| {
        format!(
            "OK: {} records verified ({}), chain head {}{}\n",
            v.records,
            v.source,
            v.head_hash,
            if v.from_genesis { "" } else { " (not from record 0: the first link is unchecked)" }
        )
    })
}

/// What caused a record, for the table: the client and request id, its trace,
/// and what its kind adds (a threshold, a recorded call's cost, a price).
fn cause_text(r: &Exported) -> String {
    use ration_core::audit::Detail;
    let mut parts = Vec::new();
    match &r.detail {
        Some(Detail::Threshold { percent }) => parts.push(format!("{percent}% reached")),
        Some(Detail::Call { trace, usage }) => parts.push(format!(
            "call {trace}: {} v{} {}+{}+{} tokens {}",
            usage.model,
            usage.price_version,
            usage.input_tokens,
            usage.cached_tokens,
            usage.output_tokens,
            amount(crate::output::USD_MICROS, usage.cost_usd_micros)
        )),
        Some(Detail::WouldRefuse { granted, available }) => {
            parts.push(format!("shadow: granted {granted}, its cap had {available} left"))
        }
        Some(Detail::Price { model, version, .. }) => parts.push(format!("{model} v{version}")),
        Some(Detail::Options(o)) => {
            parts.push(format!("thresholds {:?} shadow {}", o.thresholds_pct, o.shadow))
        }
        None => {}
    }
    if let Some(c) = &r.cause {
        if let Some(t) = &c.trace {
            parts.push(format!("trace {t}"));
        }
        for u in &c.usage {
            parts.push(format!(
                "{} v{}: {} calls {}",
                u.model,
                u.price_version,
                u.calls,
                amount(crate::output::USD_MICROS, u.cost_usd_micros)
            ));
        }
        parts.push(format!("{}#{}", c.client, c.request_id));
    }
    parts.join("; ")
}

#[derive(Debug, Serialize)]
struct SpendOut {
    budget: String,
    unit: String,
    window_start_ms: u64,
    /// None: the window never ends (lifetime).
    window_end_ms: Option<u64>,
    /// A number (spend can be negative only if refunds outran charges in a window).
    spent: i128,
}

pub(crate) async fn run(ctx: &Ctx, cmd: AuditCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Query { filter, limit } => {
            // The server pages oldest first: keep the newest `limit` while counting
            // every match, then print newest first.
            let mut found: std::collections::VecDeque<AuditRecord> =
                std::collections::VecDeque::new();
            let mut matched: u64 = 0;
            pages(ctx, request(&filter)?, |page| {
                for r in page {
                    matched = matched.saturating_add(1);
                    found.push_back(r);
                    if limit > 0 && found.len() > limit {
                        found.pop_front();
                    }
                }
                Ok(true)
            })
            .await?;
            let rows: Vec<Exported> = found.iter().rev().map(Exported::from_core).collect();
            let showing = format!(
                "showing {} of {matched} matching records, newest first{}",
                rows.len(),
                if (rows.len() as u64) < matched { " (--limit 0 for all)" } else { "" }
            );
            emit(out, ctx.format, &rows, |rows| {
                let mut t = Table::new(&[
                    "SEQ",
                    "TIME",
                    "KIND",
                    "BUDGET",
                    "PRINCIPAL",
                    "UNIT",
                    "LEASE",
                    "GRANTED",
                    "CONSUMED",
                    "RETURNED",
                    "CHARGED",
                    "CAUSE",
                ]);
                for r in rows {
                    let unit = r.unit.as_ref().map(|u| u.to_string()).unwrap_or_default();
                    t.row(vec![
                        r.seq.to_string(),
                        time::format_ms(r.time_ms),
                        r.kind.clone(),
                        r.budget.to_string(),
                        r.principal.to_string(),
                        unit.clone(),
                        r.lease.map(|l| l.raw().to_string()).unwrap_or_default(),
                        amount(&unit, r.granted),
                        amount(&unit, r.consumed),
                        amount(&unit, r.returned),
                        amount(&unit, i128::from(r.charged) - i128::from(r.uncharged)),
                        cause_text(r),
                    ]);
                }
                t.render()
            })?;
            // After the table; on stderr with JSON, so stdout stays the records alone.
            if ctx.format == crate::Format::Json {
                eprintln!("{showing}");
            } else {
                writeln!(out, "{showing}")?;
            }
            Ok(())
        }
        AuditCmd::Export { format, out: file, from_seq, to_seq, resume } => {
            export(ctx, format, file, from_seq, to_seq, resume, out).await
        }
        AuditCmd::Verify { file: Some(path), format } => verify_file(ctx, &path, format, out),
        AuditCmd::Verify { file: None, .. } => verify_node(ctx, out).await,
        AuditCmd::Spend { subtree, window, from, to } => {
            let path = convert::to_core::path("subtree", &subtree)
                .map_err(|s| anyhow!("{}", s.message()))?;
            let window = crate::budget::parse_window(&window)?;
            let (from, to) = time_range(from.as_deref(), to.as_deref())?;
            let mut records = Vec::new();
            let filter = Filter { subtree: Some(subtree.clone()), ..Filter::empty() };
            pages(ctx, request(&filter)?, |page| {
                records.extend(page);
                Ok(true)
            })
            .await?;
            let rows: Vec<SpendOut> = ration_core::audit::spend(&records, &path, window, from, to)
                .into_iter()
                .map(|r| SpendOut {
                    budget: r.budget.to_string(),
                    unit: r.unit.to_string(),
                    window_start_ms: r.window_start_ms,
                    window_end_ms: crate::output::time_ms(r.window_end_ms),
                    spent: r.spent,
                })
                .collect();
            emit(out, ctx.format, &rows, |rows| {
                let mut t = Table::new(&["BUDGET", "UNIT", "WINDOW START", "WINDOW END", "SPENT"]);
                for r in rows {
                    t.row(vec![
                        r.budget.clone(),
                        r.unit.clone(),
                        time::format_ms(r.window_start_ms),
                        crate::output::when(r.window_end_ms),
                        amount(r.unit.as_str(), r.spent),
                    ]);
                }
                t.render()
            })
        }
    }
}

const CSV_FIELDS: [&str; 20] = [
    "seq",
    "log_index",
    "time_ms",
    "effective_ms",
    "kind",
    "budget",
    "principal",
    "unit",
    "lease",
    "granted",
    "consumed",
    "returned",
    "charged",
    "uncharged",
    "balances",
    "limits",
    "prev_hash",
    "hash",
    "cause",
    "detail",
];

/// Where verification of a run starts: the genesis head for record 0, otherwise
/// the run's own first link (which cannot be checked without what came before).
fn start_of(first: Option<&AuditRecord>) -> ChainHead {
    match first {
        Some(r) if r.entry.seq > 0 => {
            ChainHead { next_seq: r.entry.seq, last_hash: r.entry.prev_hash }
        }
        _ => ChainHead::default(),
    }
}

impl Filter {
    fn empty() -> Self {
        Self {
            subtree: None,
            principal: None,
            kinds: Vec::new(),
            from: None,
            to: None,
            trace: None,
            client: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn exports_spell_windows_and_policies_as_the_cli_does_and_old_files_still_read() {
        let mut ledger = ration_core::Ledger::default();
        let spec = ration_core::BudgetSpec {
            path: BudgetPath::new("acme").unwrap(),
            limits: vec![ration_core::LimitSpec {
                unit: Unit::new("tokens").unwrap(),
                cap: 100,
                window: ration_core::Window::with_offset(ration_core::Period::Day, 330).unwrap(),
                on_unreachable: ration_core::FailPolicy::StaticAllowance { amount: 5 },
            }],
        };
        let req = ration_core::Request {
            client: ration_core::ClientId::new("ops").unwrap(),
            request_id: 1,
            principal: Principal::new("ops").unwrap(),
            op: ration_core::Op::CreateBudget(spec),
        };
        let entry = ration_core::Entry::V1(ration_core::Batch {
            time_ms: 1_764_340_245_123,
            commands: vec![ration_core::Command::Request(req)],
        });
        let record = ledger.apply(1, &entry).audit.remove(0);
        let exported = Exported::from_core(&record);
        let line = serde_json::to_string(&exported).unwrap();
        assert!(line.contains(r#""window":"day+05:30""#), "{line}");
        assert!(line.contains(r#""on_unreachable":"static","static_allowance":5"#), "{line}");
        let back: Exported = serde_json::from_str(&line).unwrap();
        assert_eq!(back.clone().into_core().unwrap(), record);
        // The spelling of files exported before: the core types' own.
        let mut old: serde_json::Value = serde_json::to_value(&exported).unwrap();
        old["limits"] = serde_json::to_value(&record.entry.limits).unwrap();
        old["balances"] = serde_json::to_value(&record.entry.balances).unwrap();
        assert!(old.to_string().contains("StaticAllowance"), "{old}");
        let read: Exported = serde_json::from_value(old).unwrap();
        assert_eq!(read.into_core().unwrap(), record);
    }
}
