//! `budget set|get|list|delete`.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{anyhow, bail};
use clap::Subcommand;
use ration_core::{Period, Window};
use ration_proto::{convert, v1};
use serde::Serialize;

use crate::output::{emit, Table};
use crate::{time, Ctx};

#[derive(Debug, Subcommand)]
pub enum BudgetCmd {
    /// Create a budget, or replace the limits of an existing one.
    Set {
        /// Its path: `acme`, `acme/search`, ... (the parent must exist).
        path: String,
        /// A limit: UNIT=CAP/WINDOW[,static=N]. WINDOW is minute, hour, day, week,
        /// month or lifetime, optionally at a UTC offset (day+05:30). static=N lets
        /// a gateway cut off from the cluster spend N (default: fail closed).
        #[arg(long = "limit", required = true)]
        limits: Vec<String>,
        /// Only update if the budget is at this version (optimistic concurrency).
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Show one budget with its limits' current windows.
    Get { path: String },
    /// List budgets as a tree, with consumed, outstanding and remaining per window.
    List {
        /// Only this budget and those below it.
        #[arg(long)]
        subtree: Option<String>,
    },
    /// Delete a leaf budget that has no live leases.
    Delete {
        path: String,
        #[arg(long)]
        expected_version: Option<u64>,
    },
}

/// Parses `UNIT=CAP/WINDOW[,static=N]`.
pub fn parse_limit(spec: &str) -> anyhow::Result<v1::Limit> {
    let usage =
        || anyhow!("bad limit {spec:?}: use UNIT=CAP/WINDOW[,static=N], e.g. tokens=1000000/day");
    let (main, extra) = spec.split_once(',').map_or((spec, None), |(m, e)| (m, Some(e)));
    let (unit, rest) = main.split_once('=').ok_or_else(usage)?;
    let (cap, window) = rest.split_once('/').ok_or_else(usage)?;
    let cap: i64 = cap.trim().parse().map_err(|_| usage())?;
    let static_allowance = match extra {
        None => None,
        Some(e) => {
            let n = e.trim().strip_prefix("static=").ok_or_else(usage)?;
            Some(n.parse::<i64>().map_err(|_| usage())?)
        }
    };
    Ok(v1::Limit {
        unit: unit.trim().to_owned(),
        cap,
        window: Some(convert::to_proto::window(parse_window(window.trim())?)),
        static_allowance,
    })
}

/// Parses `day`, `day+05:30`, `month-08:00`, ...
pub fn parse_window(s: &str) -> anyhow::Result<Window> {
    let split = s.find(['+', '-']).unwrap_or(s.len());
    let (name, offset) = s.split_at(split);
    let period = match name {
        "minute" => Period::Minute,
        "hour" => Period::Hour,
        "day" => Period::Day,
        "week" => Period::Week,
        "month" => Period::Month,
        "lifetime" => Period::Lifetime,
        _ => bail!("unknown window {name:?}: use minute, hour, day, week, month or lifetime"),
    };
    let minutes = if offset.is_empty() {
        0
    } else {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (h, m) = offset
            .get(1..)
            .and_then(|o| o.split_once(':'))
            .ok_or_else(|| anyhow!("bad offset {offset:?}: use +HH:MM or -HH:MM"))?;
        let h: i16 = h.parse().map_err(|_| anyhow!("bad offset {offset:?}"))?;
        let m: i16 = m.parse().map_err(|_| anyhow!("bad offset {offset:?}"))?;
        sign * (h * 60 + m)
    };
    Window::with_offset(period, minutes).map_err(|e| anyhow!("{e}"))
}

#[derive(Debug, Serialize)]
struct LimitOut {
    unit: String,
    window: String,
    cap: i64,
    static_allowance: Option<i64>,
    window_start: String,
    window_end: String,
    consumed: i64,
    outstanding: i64,
    remaining: i64,
    /// Overruns counted in this window (part of consumed).
    overruns: i64,
    holders: u64,
}

#[derive(Debug, Serialize)]
struct BudgetOut {
    path: String,
    version: u64,
    children: u64,
    live_leases: u64,
    limits: Vec<LimitOut>,
}

fn budget_out(b: &v1::Budget) -> BudgetOut {
    BudgetOut {
        path: b.path.clone(),
        version: b.version,
        children: b.children,
        live_leases: b.live_leases,
        limits: b
            .limits
            .iter()
            .map(|l| {
                let spec = l.limit.clone().unwrap_or_default();
                LimitOut {
                    window: convert::to_core::window(spec.window.as_ref())
                        .map(|w| w.to_string())
                        .unwrap_or_else(|_| "?".into()),
                    unit: spec.unit,
                    cap: spec.cap,
                    static_allowance: spec.static_allowance,
                    window_start: time::format_ms(l.window_start_ms),
                    window_end: time::format_ms(l.window_end_ms),
                    consumed: l.consumed,
                    outstanding: l.outstanding,
                    remaining: l.remaining,
                    overruns: l.overruns,
                    holders: l.holders,
                }
            })
            .collect(),
    }
}

const HEADER: [&str; 10] = [
    "BUDGET",
    "UNIT",
    "WINDOW",
    "CAP",
    "CONSUMED",
    "OUTSTANDING",
    "REMAINING",
    "OVERRUNS",
    "LEASES",
    "WINDOW START",
];

fn rows(t: &mut Table, label: &str, b: &BudgetOut) {
    if b.limits.is_empty() {
        t.row(vec![
            label.to_owned(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            b.live_leases.to_string(),
            "-".into(),
        ]);
    }
    for (i, l) in b.limits.iter().enumerate() {
        t.row(vec![
            if i == 0 { label.to_owned() } else { String::new() },
            l.unit.clone(),
            l.window.clone(),
            l.cap.to_string(),
            l.consumed.to_string(),
            l.outstanding.to_string(),
            l.remaining.to_string(),
            l.overruns.to_string(),
            if i == 0 { b.live_leases.to_string() } else { String::new() },
            l.window_start.clone(),
        ]);
    }
}

/// The budgets as a tree: each under its parent, drawn with box characters.
fn tree(budgets: &Vec<BudgetOut>) -> String {
    let paths: std::collections::BTreeSet<&str> = budgets.iter().map(|b| b.path.as_str()).collect();
    let parent = |p: &str| p.rsplit_once('/').map(|(a, _)| a.to_owned());
    let mut children: BTreeMap<Option<String>, Vec<&BudgetOut>> = BTreeMap::new();
    for b in budgets {
        let up = parent(&b.path).filter(|p| paths.contains(p.as_str()));
        children.entry(up).or_default().push(b);
    }
    let mut t = Table::new(&HEADER);
    fn walk(
        t: &mut Table,
        children: &BTreeMap<Option<String>, Vec<&BudgetOut>>,
        at: Option<String>,
        prefix: &str,
        root: bool,
    ) {
        let kids = children.get(&at).cloned().unwrap_or_default();
        let n = kids.len();
        for (i, b) in kids.into_iter().enumerate() {
            let last = i + 1 == n;
            let name = if root {
                b.path.clone()
            } else {
                b.path.rsplit('/').next().unwrap_or("").to_owned()
            };
            let (branch, next) = match (root, last) {
                (true, _) => (String::new(), String::new()),
                (false, true) => (format!("{prefix}└─ "), format!("{prefix}   ")),
                (false, false) => (format!("{prefix}├─ "), format!("{prefix}│  ")),
            };
            rows(t, &format!("{branch}{name}"), b);
            walk(t, children, Some(b.path.clone()), &next, false);
        }
    }
    walk(&mut t, &children, None, "", true);
    t.render()
}

pub async fn run(ctx: &Ctx, cmd: BudgetCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        BudgetCmd::Set { path, limits, expected_version } => {
            let limits =
                limits.iter().map(|l| parse_limit(l)).collect::<anyhow::Result<Vec<_>>>()?;
            let current = get(ctx, &path).await?;
            // One request id for the call, reused by every retry: exactly once.
            let meta = ctx.meta();
            let _: v1::BudgetChanged = match current {
                None => {
                    let req = v1::CreateBudgetRequest { meta, path: path.clone(), limits };
                    ctx.on_ledger(&req, |mut c, r| async move { c.create_budget(r).await }).await?
                }
                Some(b) => {
                    let req = v1::UpdateBudgetRequest {
                        meta,
                        path: path.clone(),
                        limits,
                        expected_version: expected_version.unwrap_or(b.version),
                    };
                    ctx.on_ledger(&req, |mut c, r| async move { c.update_budget(r).await }).await?
                }
            };
            let b = get(ctx, &path).await?.ok_or_else(|| anyhow!("budget {path} vanished"))?;
            let b = budget_out(&b);
            emit(out, ctx.format, &b, |b| {
                let mut t = Table::new(&HEADER);
                rows(&mut t, &format!("{} (version {})", b.path, b.version), b);
                t.render()
            })
        }
        BudgetCmd::Get { path } => {
            let b =
                get(ctx, &path).await?.ok_or_else(|| anyhow!("budget {path} does not exist"))?;
            let b = budget_out(&b);
            emit(out, ctx.format, &b, |b| {
                let mut t = Table::new(&HEADER);
                rows(&mut t, &format!("{} (version {})", b.path, b.version), b);
                t.render()
            })
        }
        BudgetCmd::List { subtree } => {
            let mut all = Vec::new();
            let mut after = String::new();
            loop {
                let req = v1::ListBudgetsRequest {
                    subtree: subtree.clone().unwrap_or_default(),
                    start_after: after.clone(),
                    limit: 1000,
                    linearizable: true,
                };
                let page = ctx
                    .first(|e| {
                        let req = req.clone();
                        async move {
                            let mut c = ctx
                                .ledger(&e)
                                .map_err(|x| tonic::Status::unavailable(x.to_string()))?;
                            Ok(c.list_budgets(req).await?.into_inner())
                        }
                    })
                    .await?;
                let n = page.budgets.len();
                if let Some(last) = page.budgets.last() {
                    after = last.path.clone();
                }
                all.extend(page.budgets.iter().map(budget_out));
                if n < 1000 {
                    break;
                }
            }
            emit(out, ctx.format, &all, tree)
        }
        BudgetCmd::Delete { path, expected_version } => {
            let req =
                v1::DeleteBudgetRequest { meta: ctx.meta(), path: path.clone(), expected_version };
            ctx.on_ledger(&req, |mut c, r| async move { c.delete_budget(r).await }).await?;
            #[derive(Serialize)]
            struct Deleted {
                deleted: String,
            }
            emit(out, ctx.format, &Deleted { deleted: path }, |d| {
                format!("deleted {}\n", d.deleted)
            })
        }
    }
}

/// The budget at `path` (linearizable), or None.
async fn get(ctx: &Ctx, path: &str) -> anyhow::Result<Option<v1::Budget>> {
    let req = v1::GetBudgetRequest { path: path.to_owned(), linearizable: true };
    let found = ctx
        .first(|e| {
            let req = req.clone();
            async move {
                let mut c =
                    ctx.ledger(&e).map_err(|x| tonic::Status::unavailable(x.to_string()))?;
                match c.get_budget(req).await {
                    Ok(b) => Ok(Some(b.into_inner())),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                    Err(s) => Err(s),
                }
            }
        })
        .await?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse() {
        let l = parse_limit("tokens=1000/day+05:30,static=50").unwrap();
        assert_eq!((l.unit.as_str(), l.cap, l.static_allowance), ("tokens", 1000, Some(50)));
        assert_eq!(l.window.unwrap().offset_minutes, 330);
        assert_eq!(parse_limit("usd=5/month-08:00").unwrap().window.unwrap().offset_minutes, -480);
        assert!(parse_limit("tokens=1000").unwrap_err().to_string().contains("UNIT=CAP/WINDOW"));
        assert!(parse_limit("tokens=1/fortnight").unwrap_err().to_string().contains("fortnight"));
    }
}
