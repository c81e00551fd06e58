//! `audit query|export|verify|spend`.
//!
//! Records arrive as protobuf and are turned back into ration-core records
//! (`convert::to_core::audit_record`), so this tool recomputes every hash itself: it
//! trusts neither the node nor the file. An exported record carries every hashed
//! field, so `audit verify --file` checks an export with no cluster at all.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Subcommand;
use ration_core::audit::{verify_chain, AuditEntry, AuditRecord, Balance, ChainHead, Flow, Hash};
use ration_core::{BudgetPath, LeaseId, LimitSpec, Principal, Unit};
use ration_proto::{convert, v1};
use serde::{Deserialize, Serialize};

use crate::output::{emit, Table};
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
    /// Only these kinds (repeatable): lease_granted, lease_reported, lease_released,
    /// lease_expired, lease_refunded, late_release, budget_created, budget_updated,
    /// budget_deleted.
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// From this time on (RFC 3339 UTC, ms since the epoch, or -2h).
    #[arg(long, allow_hyphen_values = true)]
    from: Option<String>,
    /// Before this time.
    #[arg(long, allow_hyphen_values = true)]
    to: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Records matching a filter, oldest first.
    Query {
        #[command(flatten)]
        filter: Filter,
        /// Most records to print (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Every record (a contiguous run of the chain), as JSON Lines or CSV.
    Export {
        #[arg(long, value_enum, default_value = "jsonl")]
        format: FileFormat,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// First sequence number.
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// Stop before this sequence number.
        #[arg(long)]
        to_seq: Option<u64>,
    },
    /// Check the hash chain end to end, on the cluster or in an exported file, and
    /// say where it breaks.
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
    pub balances: Vec<Balance>,
    pub limits: Vec<LimitSpec>,
    pub prev_hash: String,
    pub hash: String,
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
            balances: e.balances.clone(),
            limits: e.limits.clone(),
            prev_hash: ration_core::audit::hex(&e.prev_hash),
            hash: ration_core::audit::hex(&r.hash),
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
                balances: self.balances,
                limits: self.limits,
                prev_hash: unhex("prev_hash", &self.prev_hash)?,
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
            balances: serde_json::from_str(&r.balances).context("balances")?,
            limits: serde_json::from_str(&r.limits).context("limits")?,
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }
}

/// Reads an export (JSON Lines or CSV) back into core records.
pub fn read_export(path: &std::path::Path, format: FileFormat) -> anyhow::Result<Vec<AuditRecord>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut records = Vec::new();
    match format {
        FileFormat::Jsonl => {
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let e: Exported = serde_json::from_str(&line)
                    .with_context(|| format!("{} line {}", path.display(), i + 1))?;
                records.push(
                    e.into_core().with_context(|| format!("{} line {}", path.display(), i + 1))?,
                );
            }
        }
        FileFormat::Csv => {
            for (i, row) in csv::Reader::from_reader(file).deserialize::<CsvRow>().enumerate() {
                let at = || format!("{} record {}", path.display(), i + 1);
                let row = row.with_context(at)?;
                records
                    .push(Exported::from_csv(row).and_then(Exported::into_core).with_context(at)?);
            }
        }
    }
    Ok(records)
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

/// Pages through QueryAudit on one endpoint (the first that answers), handing each
/// page of core records to `each`; stops when it returns false or records run out.
async fn pages(
    ctx: &Ctx,
    mut req: v1::QueryAuditRequest,
    mut each: impl FnMut(Vec<AuditRecord>) -> anyhow::Result<bool>,
) -> anyhow::Result<String> {
    req.limit = PAGE;
    let first = req.clone();
    let (mut reply, endpoint) = ctx
        .first(|e| {
            let req = first.clone();
            async move {
                let mut c =
                    ctx.ledger(&e).map_err(|x| tonic::Status::unavailable(x.to_string()))?;
                Ok((c.query_audit(req).await?.into_inner(), e))
            }
        })
        .await?;
    let mut client = ctx.ledger(&endpoint)?;
    loop {
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
        reply = client
            .query_audit(req.clone())
            .await
            .map_err(|s| anyhow!("{endpoint}: {}", describe(&s)))?
            .into_inner();
    }
}

fn request(filter: &Filter) -> anyhow::Result<v1::QueryAuditRequest> {
    let now = time::now_ms();
    Ok(v1::QueryAuditRequest {
        subtree: filter.subtree.clone().unwrap_or_default(),
        principal: filter.principal.clone().unwrap_or_default(),
        kinds: filter.kinds.clone(),
        from_ms: filter.from.as_deref().map(|t| time::parse(t, now)).transpose()?,
        to_ms: filter.to.as_deref().map(|t| time::parse(t, now)).transpose()?,
        from_seq: 0,
        limit: PAGE,
        // Through the leader: every acknowledged write is in the answer.
        linearizable: true,
    })
}

#[derive(Debug, Serialize)]
struct Verified {
    source: String,
    records: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    head_hash: String,
    /// False when the run does not start at record 0, so its first link is taken
    /// on trust.
    from_genesis: bool,
}

#[derive(Debug, Serialize)]
struct SpendOut {
    budget: String,
    unit: String,
    window_start: String,
    window_end: String,
    spent: String,
}

pub(crate) async fn run(ctx: &Ctx, cmd: AuditCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Query { filter, limit } => {
            let mut found: Vec<AuditRecord> = Vec::new();
            pages(ctx, request(&filter)?, |page| {
                found.extend(page);
                if limit > 0 && found.len() >= limit {
                    found.truncate(limit);
                    return Ok(false);
                }
                Ok(true)
            })
            .await?;
            let rows: Vec<Exported> = found.iter().map(Exported::from_core).collect();
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
                ]);
                for r in rows {
                    t.row(vec![
                        r.seq.to_string(),
                        time::format_ms(r.time_ms),
                        r.kind.clone(),
                        r.budget.to_string(),
                        r.principal.to_string(),
                        r.unit.as_ref().map(|u| u.to_string()).unwrap_or_default(),
                        r.lease.map(|l| l.raw().to_string()).unwrap_or_default(),
                        r.granted.to_string(),
                        r.consumed.to_string(),
                        r.returned.to_string(),
                        (i128::from(r.charged) - i128::from(r.uncharged)).to_string(),
                    ]);
                }
                t.render()
            })
        }
        AuditCmd::Export { format, out: file, from_seq, to_seq } => {
            let mut sink: Box<dyn Write> = match &file {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(&mut *out),
            };
            let mut written = 0u64;
            let mut header = true;
            let req = v1::QueryAuditRequest { from_seq, ..request(&Filter::empty())? };
            pages(ctx, req, |mut page| {
                if let Some(to) = to_seq {
                    page.retain(|r| r.entry.seq < to);
                }
                let more =
                    to_seq.is_none_or(|to| page.last().is_some_and(|r| r.entry.seq + 1 < to));
                write_export(&page, format, &mut sink, header)?;
                header = false;
                written += page.len() as u64;
                Ok(more && !page.is_empty())
            })
            .await?;
            if format == FileFormat::Csv && header {
                // No records: still write the header, so the file reads back.
                let mut w = csv::Writer::from_writer(&mut sink);
                w.write_record(CSV_FIELDS)?;
                w.flush()?;
            }
            sink.flush()?;
            drop(sink);
            if let Some(path) = file {
                eprintln!("exported {written} records to {}", path.display());
            }
            Ok(())
        }
        AuditCmd::Verify { file, format } => {
            let (source, head, first, last, count) = match file {
                Some(path) => {
                    let format = format.unwrap_or(
                        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
                            FileFormat::Csv
                        } else {
                            FileFormat::Jsonl
                        },
                    );
                    let records = read_export(&path, format)?;
                    let start = start_of(records.first());
                    let head = verify_chain(&records, start)
                        .map_err(|b| anyhow!("{}: {b}", path.display()))?;
                    (
                        path.display().to_string(),
                        head,
                        records.first().map(|r| r.entry.seq),
                        records.last().map(|r| r.entry.seq),
                        records.len() as u64,
                    )
                }
                None => {
                    let mut head: Option<ChainHead> = None;
                    let mut first = None;
                    let mut last = None;
                    let mut count = 0u64;
                    // The endpoint's own copy: verify checks what that node stores.
                    let req =
                        v1::QueryAuditRequest { linearizable: false, ..request(&Filter::empty())? };
                    let endpoint = pages(ctx, req, |page| {
                        let start = head.unwrap_or_else(|| start_of(page.first()));
                        head = Some(verify_chain(&page, start).map_err(|b| anyhow!("{b}"))?);
                        first = first.or(page.first().map(|r| r.entry.seq));
                        last = page.last().map(|r| r.entry.seq);
                        count += page.len() as u64;
                        Ok(true)
                    })
                    .await?;
                    (format!("node at {endpoint}"), head.unwrap_or_default(), first, last, count)
                }
            };
            let v = Verified {
                source,
                records: count,
                first_seq: first,
                last_seq: last,
                head_hash: ration_core::audit::hex(&head.last_hash),
                from_genesis: first.is_none_or(|s| s == 0),
            };
            emit(out, ctx.format, &v, |v| {
                format!(
                    "OK: {} records verified ({}), chain head {}{}\n",
                    v.records,
                    v.source,
                    v.head_hash,
                    if v.from_genesis {
                        ""
                    } else {
                        " (not from record 0: the first link is unchecked)"
                    }
                )
            })
        }
        AuditCmd::Spend { subtree, window, from, to } => {
            let now = time::now_ms();
            let path = convert::to_core::path("subtree", &subtree)
                .map_err(|s| anyhow!("{}", s.message()))?;
            let window = crate::budget::parse_window(&window)?;
            let from = from.as_deref().map(|t| time::parse(t, now)).transpose()?;
            let to = to.as_deref().map(|t| time::parse(t, now)).transpose()?;
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
                    window_start: time::format_ms(r.window_start_ms),
                    window_end: time::format_ms(r.window_end_ms),
                    spent: r.spent.to_string(),
                })
                .collect();
            emit(out, ctx.format, &rows, |rows| {
                let mut t = Table::new(&["BUDGET", "UNIT", "WINDOW START", "WINDOW END", "SPENT"]);
                for r in rows {
                    t.row(vec![
                        r.budget.clone(),
                        r.unit.clone(),
                        r.window_start.clone(),
                        r.window_end.clone(),
                        r.spent.clone(),
                    ]);
                }
                t.render()
            })
        }
    }
}

const CSV_FIELDS: [&str; 18] = [
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
        Self { subtree: None, principal: None, kinds: Vec::new(), from: None, to: None }
    }
}
