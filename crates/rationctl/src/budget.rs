//! `budget set|get|list|delete|freeze|unfreeze`, `budget limit rm` and
//! `budget template set|get|delete`.
//!
//! A limit is named by its unit and window (`tokens/day`, `usd_micros/month+05:30`):
//! a budget holds at most one limit per name. `set` on an existing budget replaces
//! the limits it names and keeps the others (`--replace-all`: the named limits are
//! the whole set); it reads the budget first and writes with that version, so a
//! change made in between is refused, not overwritten. Changes print as a diff.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{anyhow, bail};
use clap::Subcommand;
use ration_core::{Period, Window};
use ration_proto::{convert, v1};
use serde::Serialize;

use crate::output::{amount, emit, time_ms, when, Table};
use crate::Ctx;

#[derive(Debug, Subcommand)]
pub enum BudgetCmd {
    /// Create a budget, or set some of its limits (the others are kept).
    Set {
        /// Its path: `acme`, `acme/search`, ... (the parent must exist).
        path: String,
        /// A limit: UNIT=CAP/WINDOW[,static=N]. WINDOW is minute, hour, day, week,
        /// month, lifetime or concurrent (units in flight), optionally at a UTC
        /// offset (day+05:30). static=N lets
        /// a gateway cut off from the cluster spend N (default: fail closed). On an
        /// existing budget this replaces its UNIT/WINDOW limit, or adds one.
        #[arg(long = "limit", required = true)]
        limits: Vec<String>,
        /// The limits given become the budget's only limits: any other is removed.
        #[arg(long)]
        replace_all: bool,
        /// Only update if the budget is at this version (optimistic concurrency).
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Show one budget with its limits' current windows.
    Get {
        /// The budget's path (`acme/search`).
        path: String,
    },
    /// List budgets as a tree, with consumed, outstanding and remaining per window.
    List {
        /// Only this budget and those below it.
        #[arg(long)]
        subtree: Option<String>,
    },
    /// Delete a leaf budget that has no live leases.
    Delete {
        /// The budget's path.
        path: String,
        /// Delete only if the budget is still at this version (refused otherwise).
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// One limit of a budget (`budget limit rm acme usd_micros/month`).
    #[command(subcommand)]
    Limit(LimitCmd),
    /// The template on a budget: one child budget per user, key or run, made by
    /// the first acquire on it (`budget template set acme/users --limit ...`).
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Refuse every new grant on a budget and below it, at once, cluster-wide.
    /// Leases already granted stay spendable until they settle or expire: the
    /// reply says how much they hold. Audited as `budget_frozen`.
    Freeze {
        /// The budget's path.
        path: String,
    },
    /// Grant again on a frozen budget. Audited as `budget_unfrozen`.
    Unfreeze {
        /// The budget's path.
        path: String,
    },
    /// Replace a budget's alert thresholds and shadow mode (no flags: clear both).
    /// When spend in a limit's window reaches a threshold, one `threshold_crossed`
    /// record is written (and POSTed to the cluster's webhook), once per window.
    /// In shadow mode the budget's own caps refuse nothing: what they would have
    /// refused is granted and recorded (`shadow_refusal`), and its ancestors' caps
    /// still apply. Audited as `options_set`.
    Options {
        /// The budget's path.
        path: String,
        /// Percent of each limit's cap (repeatable or comma-separated: 50,80,100).
        #[arg(long = "threshold", value_delimiter = ',')]
        thresholds: Vec<u32>,
        /// Shadow mode: record would-be refusals instead of refusing.
        #[arg(long)]
        shadow: bool,
    },
    /// Each limit's burn rate (over the last 60 to 120 s) and when spend reaches its
    /// cap at that rate.
    Forecast {
        /// The budget's path.
        path: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Set (or replace) the template on PARENT. The first acquire on a missing
    /// PARENT/NAME creates it with these limits; replacing the template rewrites
    /// every instance's limits at once (refused, naming the instance, if one has
    /// already used more than a new cap this window).
    Set {
        /// The budget the instances go under (`acme/users`).
        parent: String,
        /// A limit of each instance, as in `budget set` (tokens=100000/minute).
        #[arg(long = "limit", required = true)]
        limits: Vec<String>,
        /// At most this many instances (1..=100000).
        #[arg(long, default_value_t = 10_000)]
        max_instances: u64,
        /// Delete an instance idle this long whose windows with spend have all
        /// ended (30s, 15m, 2h, 7d; `never` keeps them).
        #[arg(long, default_value = "never")]
        idle: String,
        /// For agent runs: an instance grants nothing once this long has passed
        /// since it was made, and no lease on it is valid past then (`never`).
        #[arg(long, default_value = "never")]
        max_duration: String,
        /// A runaway guard, UNIT=MAX/DURATION (calls=30/10s): an instance granted
        /// MAX of UNIT within one DURATION span that asks for more is halted
        /// (frozen; `budget unfreeze` resumes it). Repeat for more guards.
        #[arg(long = "guard")]
        guards: Vec<String>,
    },
    /// Show the template on PARENT.
    Get {
        /// The budget the template is on.
        parent: String,
    },
    /// Remove the template on PARENT: its instances stay as ordinary budgets.
    #[command(visible_alias = "rm")]
    Delete {
        /// The budget the template is on.
        parent: String,
    },
}

/// `90000` ms as `90s`, `3600000` as `1h`: the largest unit that divides it.
fn duration(ms: u64) -> String {
    for (unit, scale) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms >= scale && ms % scale == 0 {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

/// Parses a guard, `UNIT=MAX/DURATION` (`calls=30/10s`).
pub fn parse_guard(spec: &str) -> anyhow::Result<v1::Guard> {
    let usage = || anyhow!("bad guard {spec:?}: use UNIT=MAX/DURATION, e.g. calls=30/10s");
    let (unit, rest) = spec.split_once('=').ok_or_else(usage)?;
    let (max, per) = rest.split_once('/').ok_or_else(usage)?;
    let max: i64 = max.trim().parse().map_err(|_| usage())?;
    let per_ms = parse_idle(per)?;
    if per_ms == 0 {
        return Err(usage());
    }
    Ok(v1::Guard { unit: unit.trim().to_owned(), max, per_ms })
}

/// Parses `30s`, `15m`, `2h`, `7d`, a number of ms, or `never` (0).
pub fn parse_idle(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    if s == "never" {
        return Ok(0);
    }
    if let Ok(ms) = s.trim_end_matches("ms").parse::<u64>() {
        return Ok(ms);
    }
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let bad = || anyhow!("bad duration {s:?}: use 30s, 15m, 2h, 7d, or never");
    let n: u64 = n.parse().map_err(|_| bad())?;
    let scale: u64 = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    Ok(n.saturating_mul(scale))
}

#[derive(Debug, Subcommand)]
pub enum LimitCmd {
    /// Remove one limit of a budget, keeping the others.
    #[command(visible_alias = "remove")]
    Rm {
        /// The budget's path.
        path: String,
        /// The limit: UNIT/WINDOW, as in --limit without the cap (tokens/day,
        /// usd_micros/month+05:30).
        limit: String,
        /// Only update if the budget is at this version.
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

/// Parses `UNIT/WINDOW`, the name of a limit.
pub fn parse_limit_name(spec: &str) -> anyhow::Result<(String, Window)> {
    let (unit, window) = spec
        .split_once('/')
        .filter(|(u, _)| !u.trim().is_empty() && !u.contains('='))
        .ok_or_else(|| anyhow!("bad limit {spec:?}: name it UNIT/WINDOW, e.g. tokens/day"))?;
    Ok((unit.trim().to_owned(), parse_window(window.trim())?))
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
        "concurrent" => Period::Concurrent,
        _ => bail!(
            "unknown window {name:?}: use minute, hour, day, week, month, lifetime or concurrent"
        ),
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

// ----- limits as declared, and the diff between two sets of them -----

/// A limit as declared: what `--limit` says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Spec {
    unit: String,
    window: Window,
    cap: i64,
    static_allowance: Option<i64>,
}

impl Spec {
    fn from_proto(l: &v1::Limit) -> anyhow::Result<Self> {
        let window = convert::to_core::window(l.window.as_ref())
            .map_err(|s| anyhow!("limit on {}: {}", l.unit, s.message()))?;
        Ok(Self { unit: l.unit.clone(), window, cap: l.cap, static_allowance: l.static_allowance })
    }

    fn to_proto(&self) -> v1::Limit {
        v1::Limit {
            unit: self.unit.clone(),
            cap: self.cap,
            window: Some(convert::to_proto::window(self.window)),
            static_allowance: self.static_allowance,
        }
    }

    /// What names it: at most one limit per (unit, window) on a budget.
    fn key(&self) -> (String, Window) {
        (self.unit.clone(), self.window)
    }

    /// `2000000/day,static=500`, as `--limit` takes it after `UNIT=`.
    fn amount(&self) -> String {
        match self.static_allowance {
            None => format!("{}/{}", self.cap, self.window),
            Some(n) => format!("{}/{},static={n}", self.cap, self.window),
        }
    }
}

/// The limits of a budget as the server holds them.
fn specs(b: &v1::Budget) -> anyhow::Result<Vec<Spec>> {
    b.limits.iter().map(|l| Spec::from_proto(&l.limit.clone().unwrap_or_default())).collect()
}

/// `current` with each of `named` replacing the limit of its name, or added after
/// the others. A name given twice is refused.
fn merge(current: &[Spec], named: &[Spec]) -> anyhow::Result<Vec<Spec>> {
    let mut out = current.to_vec();
    for (i, n) in named.iter().enumerate() {
        if named.iter().take(i).any(|m| m.key() == n.key()) {
            bail!("the limit {}/{} is given twice", n.unit, n.window);
        }
        match out.iter_mut().find(|o| o.key() == n.key()) {
            Some(o) => *o = n.clone(),
            None => out.push(n.clone()),
        }
    }
    Ok(out)
}

/// What a limit says, in JSON.
#[derive(Debug, Serialize)]
struct SpecOut {
    cap: i64,
    on_unreachable: OnUnreachable,
    static_allowance: Option<i64>,
}

impl From<&Spec> for SpecOut {
    fn from(s: &Spec) -> Self {
        Self {
            cap: s.cap,
            on_unreachable: OnUnreachable::of(s.static_allowance),
            static_allowance: s.static_allowance,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum ChangeKind {
    Added,
    Changed,
    Removed,
}

/// One line of a diff of limits.
#[derive(Debug, Serialize)]
struct ChangeOut {
    change: ChangeKind,
    unit: String,
    window: String,
    before: Option<SpecOut>,
    after: Option<SpecOut>,
    #[serde(skip)]
    line: String,
}

/// The changes from `before` to `after`, by unit then window.
fn diff(before: &[Spec], after: &[Spec]) -> Vec<ChangeOut> {
    // Each name: its limit before and after.
    type BeforeAfter<'a> = (Option<&'a Spec>, Option<&'a Spec>);
    let mut both: BTreeMap<(String, Window), BeforeAfter<'_>> = BTreeMap::new();
    for b in before {
        both.entry(b.key()).or_default().0 = Some(b);
    }
    for a in after {
        both.entry(a.key()).or_default().1 = Some(a);
    }
    both.into_iter()
        .filter_map(|((unit, window), pair)| {
            let (change, line) = match pair {
                (None, Some(a)) => (ChangeKind::Added, format!("+ {unit} {}", a.amount())),
                (Some(b), None) => (ChangeKind::Removed, format!("- {unit} {}", b.amount())),
                (Some(b), Some(a)) if a != b => {
                    (ChangeKind::Changed, format!("~ {unit} {} -> {}", b.amount(), a.amount()))
                }
                _ => return None,
            };
            Some(ChangeOut {
                change,
                unit,
                window: window.to_string(),
                before: pair.0.map(SpecOut::from),
                after: pair.1.map(SpecOut::from),
                line,
            })
        })
        .collect()
}

// ----- budgets as printed -----

/// What a cut-off gateway does once its leases are spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum OnUnreachable {
    /// Refuses every call.
    FailClosed,
    /// Admits up to `static_allowance` in all.
    Static,
}

impl OnUnreachable {
    fn of(static_allowance: Option<i64>) -> Self {
        if static_allowance.is_some() {
            Self::Static
        } else {
            Self::FailClosed
        }
    }
}

#[derive(Debug, Serialize)]
struct LimitOut {
    unit: String,
    /// Its name as `--limit` takes it: `day`, `month+05:30`, `lifetime`.
    window: String,
    cap: i64,
    on_unreachable: OnUnreachable,
    /// What a cut-off gateway may spend (with `static`); null when failing closed.
    static_allowance: Option<i64>,
    /// The current window, ms since the epoch; a lifetime window starts at 0 and
    /// has no end (null).
    window_start_ms: u64,
    window_end_ms: Option<u64>,
    consumed: i64,
    outstanding: i64,
    /// Granted in leases for the next window.
    upcoming: i64,
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
    /// It grants nothing, nor does any budget below it.
    frozen: bool,
    /// Why (an operator froze it, or the runaway guard that halted it).
    #[serde(skip_serializing_if = "Option::is_none")]
    hold: Option<String>,
    /// Made by its parent's template.
    instance: bool,
    template: Option<TemplateOut>,
    /// Alert thresholds, percent of each cap.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    thresholds_pct: Vec<u32>,
    /// Shadow mode: its caps refuse nothing; would-be refusals are recorded.
    shadow: bool,
    /// In shadow mode: acquires its caps would have refused.
    shadow_refusals: u64,
}

#[derive(Debug, Serialize)]
struct TemplateOut {
    parent: String,
    /// Each instance's limits, as `--limit` takes them.
    limits: Vec<String>,
    max_instances: u64,
    /// 0: instances never expire.
    idle_ms: u64,
    /// 0: runs never end.
    max_duration_ms: u64,
    /// Runaway guards, as `--guard` takes them.
    guards: Vec<String>,
    instances: u64,
}

fn template_out(parent: &str, t: &v1::Template) -> anyhow::Result<TemplateOut> {
    let limits = t
        .limits
        .iter()
        .map(|l| {
            let spec = Spec::from_proto(l)
                .map_err(|e| anyhow!("template on {parent} as sent by the server: {e}"))?;
            let mut text = format!("{}={}/{}", spec.unit, spec.cap, spec.window);
            if let Some(n) = spec.static_allowance {
                text.push_str(&format!(",static={n}"));
            }
            Ok(text)
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(TemplateOut {
        parent: parent.to_owned(),
        limits,
        max_instances: t.max_instances,
        idle_ms: t.idle_ms,
        max_duration_ms: t.max_duration_ms,
        guards: t
            .guards
            .iter()
            .map(|g| format!("{}={}/{}", g.unit, g.max, duration(g.per_ms)))
            .collect(),
        instances: t.instances,
    })
}

fn template_text(t: &TemplateOut) -> String {
    let idle = if t.idle_ms == 0 { "never".to_owned() } else { duration(t.idle_ms) };
    let mut s = format!(
        "template on {}: {} each; {} of at most {} instances; idle instances expire: {}\n",
        t.parent,
        t.limits.join(" "),
        t.instances,
        t.max_instances,
        idle
    );
    if t.max_duration_ms > 0 {
        s.push_str(&format!(
            "  each instance ends {} after it is made\n",
            duration(t.max_duration_ms)
        ));
    }
    for g in &t.guards {
        s.push_str(&format!("  runaway guard: {g}\n"));
    }
    s
}

fn budget_out(b: &v1::Budget) -> anyhow::Result<BudgetOut> {
    let limits = b
        .limits
        .iter()
        .map(|l| {
            let spec = Spec::from_proto(&l.limit.clone().unwrap_or_default())
                .map_err(|e| anyhow!("budget {} as sent by the server: {e}", b.path))?;
            let lifetime = matches!(spec.window.period(), Period::Lifetime | Period::Concurrent);
            Ok(LimitOut {
                window: spec.window.to_string(),
                on_unreachable: OnUnreachable::of(spec.static_allowance),
                unit: spec.unit,
                cap: spec.cap,
                static_allowance: spec.static_allowance,
                window_start_ms: l.window_start_ms,
                window_end_ms: if lifetime { None } else { l.window_end_ms.and_then(time_ms) },
                consumed: l.consumed,
                outstanding: l.outstanding,
                upcoming: l.upcoming,
                remaining: l.remaining,
                overruns: l.overruns,
                holders: l.holders,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(BudgetOut {
        path: b.path.clone(),
        version: b.version,
        children: b.children,
        live_leases: b.live_leases,
        limits,
        frozen: b.frozen,
        hold: (!b.hold.is_empty()).then(|| b.hold.clone()),
        instance: b.instance,
        template: b.template.as_ref().map(|t| template_out(&b.path, t)).transpose()?,
        thresholds_pct: b.options.as_ref().map(|o| o.thresholds_pct.clone()).unwrap_or_default(),
        shadow: b.options.as_ref().is_some_and(|o| o.shadow),
        shadow_refusals: b.shadow_refusals,
    })
}

const HEADER: [&str; 16] = [
    "BUDGET",
    "VERSION",
    "CHILDREN",
    "LEASES",
    "UNIT",
    "WINDOW",
    "CAP",
    "ON UNREACHABLE",
    "CONSUMED",
    "OUTSTANDING",
    "UPCOMING",
    "REMAINING",
    "OVERRUNS",
    "HOLDERS",
    "WINDOW START",
    "WINDOW END",
];

/// A budget's rows: one per limit (the budget's own columns on the first).
fn rows(t: &mut Table, label: &str, b: &BudgetOut) {
    let mut label = label.to_owned();
    if b.frozen {
        label.push_str(" (frozen)");
    }
    if b.template.is_some() {
        label.push_str(" (template)");
    }
    let own = [label, b.version.to_string(), b.children.to_string(), b.live_leases.to_string()];
    if b.limits.is_empty() {
        let mut row = own.to_vec();
        row.extend(std::iter::repeat_n("-".to_owned(), HEADER.len() - own.len()));
        t.row(row);
    }
    for (i, l) in b.limits.iter().enumerate() {
        let mut row = if i == 0 { own.to_vec() } else { vec![String::new(); own.len()] };
        let lifetime = l.window == Period::Lifetime.name() || l.window == Period::Concurrent.name();
        row.extend([
            l.unit.clone(),
            l.window.clone(),
            amount(&l.unit, l.cap),
            match l.static_allowance {
                Some(n) => format!("static={}", amount(&l.unit, n)),
                None => "fail_closed".to_owned(),
            },
            amount(&l.unit, l.consumed),
            amount(&l.unit, l.outstanding),
            amount(&l.unit, l.upcoming),
            amount(&l.unit, l.remaining),
            amount(&l.unit, l.overruns),
            l.holders.to_string(),
            if lifetime { "-".to_owned() } else { when(Some(l.window_start_ms)) },
            when(l.window_end_ms),
        ]);
        t.row(row);
    }
}

fn table(b: &BudgetOut) -> String {
    let mut t = Table::new(&HEADER);
    rows(&mut t, &b.path, b);
    let mut s = t.render();
    if b.instance {
        s.push_str("made by its parent's template\n");
    }
    if let Some(hold) = &b.hold {
        s.push_str(&format!("grants nothing: {hold}\n"));
    }
    if !b.thresholds_pct.is_empty() {
        let t: Vec<String> = b.thresholds_pct.iter().map(|t| format!("{t}%")).collect();
        s.push_str(&format!("alert thresholds: {}\n", t.join(", ")));
    }
    if b.shadow {
        s.push_str(&format!(
            "shadow mode: its caps refuse nothing ({} acquires they would have refused)\n",
            b.shadow_refusals
        ));
    }
    if let Some(template) = &b.template {
        s.push_str(&template_text(template));
    }
    s
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

/// A budget after `set` or `limit rm`: the budget, the version it had (none if
/// it was created) and what changed in its limits.
#[derive(Debug, Serialize)]
struct Written {
    #[serde(flatten)]
    budget: BudgetOut,
    previous_version: Option<u64>,
    changes: Vec<ChangeOut>,
}

fn written(w: &Written) -> String {
    let mut s = match w.previous_version {
        None => format!("budget {}: created at version {}\n", w.budget.path, w.budget.version),
        Some(v) => format!("budget {}: version {v} -> {}\n", w.budget.path, w.budget.version),
    };
    if w.changes.is_empty() {
        s.push_str("  (no limit changed)\n");
    }
    for c in &w.changes {
        s.push_str(&c.line);
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&table(&w.budget));
    s
}

// ----- the commands -----

pub async fn run(ctx: &Ctx, cmd: BudgetCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        BudgetCmd::Set { path, limits, replace_all, expected_version } => {
            let named = limits
                .iter()
                .map(|l| parse_limit(l).and_then(|l| Spec::from_proto(&l)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Refuses a name given twice, also with --replace-all.
            let mut after = merge(&[], &named)?;
            let (before, previous) = match get(ctx, &path).await? {
                None => {
                    // One request id for the call, reused by every retry: exactly once.
                    let req = v1::CreateBudgetRequest {
                        meta: ctx.meta(),
                        path: path.clone(),
                        limits: after.iter().map(Spec::to_proto).collect(),
                    };
                    ctx.on_ledger(&req, |mut c, r| async move { c.create_budget(r).await })
                        .await
                        .map_err(|e| about(&path, e))?;
                    (Vec::new(), None)
                }
                Some(b) => {
                    check_version(&b, expected_version)?;
                    let before = specs(&b)?;
                    if !replace_all {
                        after = merge(&before, &named)?;
                    }
                    update(ctx, &b, &after).await?;
                    (before, Some(b.version))
                }
            };
            print_written(ctx, out, &path, previous, diff(&before, &after)).await
        }
        BudgetCmd::Limit(LimitCmd::Rm { path, limit, expected_version }) => {
            let (unit, window) = parse_limit_name(&limit)?;
            let b =
                get(ctx, &path).await?.ok_or_else(|| anyhow!("budget {path} does not exist"))?;
            check_version(&b, expected_version)?;
            let before = specs(&b)?;
            let after: Vec<Spec> =
                before.iter().filter(|s| s.key() != (unit.clone(), window)).cloned().collect();
            if after.len() == before.len() {
                let names: Vec<String> =
                    before.iter().map(|s| format!("{}/{}", s.unit, s.window)).collect();
                bail!(
                    "budget {path} has no {unit}/{window} limit (its limits: {})",
                    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
                );
            }
            update(ctx, &b, &after).await?;
            print_written(ctx, out, &path, Some(b.version), diff(&before, &after)).await
        }
        BudgetCmd::Get { path } => {
            let b =
                get(ctx, &path).await?.ok_or_else(|| anyhow!("budget {path} does not exist"))?;
            emit(out, ctx.format, &budget_out(&b)?, table)
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
                                .map_err(|x| tonic::Status::unavailable(format!("{x:#}")))?;
                            Ok(c.list_budgets(req).await?.into_inner())
                        }
                    })
                    .await
                    .map_err(|e| match &subtree {
                        Some(s) => about(s, e),
                        None => e,
                    })?;
                let n = page.budgets.len();
                if let Some(last) = page.budgets.last() {
                    after = last.path.clone();
                }
                for b in &page.budgets {
                    all.push(budget_out(b)?);
                }
                if n < 1000 {
                    break;
                }
            }
            emit(out, ctx.format, &all, tree)
        }
        BudgetCmd::Template(TemplateCmd::Set {
            parent,
            limits,
            max_instances,
            idle,
            max_duration,
            guards,
        }) => {
            let limits = limits
                .iter()
                .map(|l| parse_limit(l).and_then(|l| Spec::from_proto(&l)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            merge(&[], &limits)?;
            let req = v1::SetTemplateRequest {
                meta: ctx.meta(),
                parent: parent.clone(),
                limits: limits.iter().map(Spec::to_proto).collect(),
                max_instances,
                idle_ms: parse_idle(&idle)?,
                max_duration_ms: parse_idle(&max_duration)?,
                guards: guards.iter().map(|g| parse_guard(g)).collect::<anyhow::Result<_>>()?,
            };
            let r = ctx
                .on_ledger(&req, |mut c, r| async move { c.set_template(r).await })
                .await
                .map_err(|e| about(&parent, e))?;
            show_template(ctx, out, &parent, Some(r.instances)).await
        }
        BudgetCmd::Template(TemplateCmd::Get { parent }) => {
            show_template(ctx, out, &parent, None).await
        }
        BudgetCmd::Template(TemplateCmd::Delete { parent }) => {
            let req = v1::DeleteTemplateRequest { meta: ctx.meta(), parent: parent.clone() };
            let r = ctx
                .on_ledger(&req, |mut c, r| async move { c.delete_template(r).await })
                .await
                .map_err(|e| about(&parent, e))?;
            #[derive(Serialize)]
            struct Removed {
                parent: String,
                instances_kept: u64,
            }
            let removed = Removed { parent, instances_kept: r.instances };
            emit(out, ctx.format, &removed, |r| {
                format!(
                    "template on {} removed; its {} instance(s) stay as ordinary budgets\n",
                    r.parent, r.instances_kept
                )
            })
        }
        BudgetCmd::Freeze { path } => freeze(ctx, out, path, true).await,
        BudgetCmd::Options { path, thresholds, shadow } => {
            let req = v1::SetBudgetOptionsRequest {
                meta: ctx.meta(),
                path: path.clone(),
                options: Some(v1::BudgetOptions { thresholds_pct: thresholds.clone(), shadow }),
            };
            ctx.on_ledger(&req, |mut c, r| async move { c.set_budget_options(r).await })
                .await
                .map_err(|e| about(&path, e))?;
            #[derive(Serialize)]
            struct OptionsOut {
                path: String,
                thresholds_pct: Vec<u32>,
                shadow: bool,
            }
            let o = OptionsOut { path, thresholds_pct: thresholds, shadow };
            emit(out, ctx.format, &o, |o| {
                let t: Vec<String> = o.thresholds_pct.iter().map(|t| format!("{t}%")).collect();
                format!(
                    "budget {}: thresholds {}; shadow mode {}\n",
                    o.path,
                    if t.is_empty() { "none".into() } else { t.join(", ") },
                    if o.shadow { "on" } else { "off" }
                )
            })
        }
        BudgetCmd::Forecast { path } => forecast(ctx, out, path).await,
        BudgetCmd::Unfreeze { path } => freeze(ctx, out, path, false).await,
        BudgetCmd::Delete { path, expected_version } => {
            let req =
                v1::DeleteBudgetRequest { meta: ctx.meta(), path: path.clone(), expected_version };
            ctx.on_ledger(&req, |mut c, r| async move { c.delete_budget(r).await })
                .await
                .map_err(|e| about(&path, e))?;
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

/// `budget forecast`.
async fn forecast(ctx: &Ctx, out: &mut dyn Write, path: String) -> anyhow::Result<()> {
    let req = v1::ForecastRequest { path: path.clone(), linearizable: true };
    let r = ctx
        .on_ledger(&req, |mut c, r| async move { c.forecast(r).await })
        .await
        .map_err(|e| about(&path, e))?;
    #[derive(Serialize)]
    struct LimitOut {
        unit: String,
        window: String,
        cap: i64,
        consumed: i64,
        rate_per_s: f64,
        /// When spend reaches the cap at that rate (ms since the epoch); null: not
        /// in this window.
        exhausts_at_ms: Option<u64>,
        window_end_ms: Option<u64>,
    }
    #[derive(Serialize)]
    struct ForecastOut {
        path: String,
        now_ms: u64,
        limits: Vec<LimitOut>,
    }
    let limits = r
        .limits
        .iter()
        .map(|l| LimitOut {
            unit: l.unit.clone(),
            window: l
                .window
                .as_ref()
                .and_then(|w| convert::to_core::window(Some(w)).ok())
                .map_or_else(String::new, |w| w.to_string()),
            cap: l.cap,
            consumed: l.consumed,
            rate_per_s: l.rate_per_s,
            exhausts_at_ms: l.exhausts_at_ms,
            window_end_ms: l.window_end_ms,
        })
        .collect();
    let o = ForecastOut { path, now_ms: r.now_ms, limits };
    emit(out, ctx.format, &o, |o| {
        let mut t = Table::new(&["UNIT", "WINDOW", "CONSUMED", "CAP", "RATE/S", "REACHES CAP"]);
        for l in &o.limits {
            let reaches = match l.exhausts_at_ms {
                Some(at) if at <= o.now_ms => "reached".to_owned(),
                #[allow(clippy::cast_precision_loss)]
                Some(at) => format!(
                    "{} (in {:.0} s)",
                    crate::time::format_ms(at),
                    at.saturating_sub(o.now_ms) as f64 / 1000.0
                ),
                None if l.rate_per_s > 0.0 => "not this window".to_owned(),
                None => "no spend lately".to_owned(),
            };
            #[allow(clippy::cast_possible_truncation)]
            let rate = amount(&l.unit, l.rate_per_s.round() as i64);
            t.row(vec![
                l.unit.clone(),
                l.window.clone(),
                amount(&l.unit, l.consumed),
                amount(&l.unit, l.cap),
                rate,
                reaches,
            ]);
        }
        format!("budget {}\n{}", o.path, t.render())
    })
}

/// `budget freeze` (or, with `frozen` false, `unfreeze`).
async fn freeze(ctx: &Ctx, out: &mut dyn Write, path: String, frozen: bool) -> anyhow::Result<()> {
    let req = v1::FreezeRequest { meta: ctx.meta(), path: path.clone(), frozen };
    let r = ctx
        .on_ledger(&req, |mut c, r| async move { c.freeze_budget(r).await })
        .await
        .map_err(|e| about(&path, e))?;
    #[derive(Serialize)]
    struct FreezeOut {
        path: String,
        frozen: bool,
        changed: bool,
        /// Per unit: what live leases under it hold unspent.
        held: BTreeMap<String, i64>,
    }
    let held = r.held.iter().map(|h| (h.unit.clone(), h.amount)).collect();
    let o = FreezeOut { path, frozen, changed: r.changed, held };
    emit(out, ctx.format, &o, |o| {
        let state = if o.frozen { "frozen" } else { "unfrozen" };
        let mut s = if o.changed {
            format!("budget {}: {state}\n", o.path)
        } else {
            format!("budget {}: already {state}\n", o.path)
        };
        if o.frozen {
            if o.held.is_empty() {
                s.push_str("  (it has no limit of its own: leases under it are summed on the budgets whose limits they draw on)\n");
            }
            for (unit, amount) in &o.held {
                s.push_str(&format!(
                    "  live leases still hold {amount} {unit}: at most that can be spent under it until they settle or expire\n"
                ));
            }
        }
        s
    })
}

/// Prints the template on `parent` (after a set, with how many instances it
/// rewrote).
async fn show_template(
    ctx: &Ctx,
    out: &mut dyn Write,
    parent: &str,
    rewritten: Option<u64>,
) -> anyhow::Result<()> {
    let b = get(ctx, parent).await?.ok_or_else(|| anyhow!("budget {parent} does not exist"))?;
    let t = b.template.as_ref().ok_or_else(|| anyhow!("budget {parent} has no template"))?;
    #[derive(Serialize)]
    struct Shown {
        #[serde(flatten)]
        template: TemplateOut,
        /// After `set`: instances whose limits were rewritten.
        rewritten: Option<u64>,
    }
    let shown = Shown { template: template_out(parent, t)?, rewritten };
    emit(out, ctx.format, &shown, |s| {
        let mut text = template_text(&s.template);
        if let Some(n) = s.rewritten {
            text.push_str(&format!("  {n} instance(s) rewritten to these limits\n"));
        }
        text
    })
}

/// Refuses to write `b` if the caller expected another version.
fn check_version(b: &v1::Budget, expected: Option<u64>) -> anyhow::Result<()> {
    match expected {
        Some(v) if v != b.version => bail!(
            "budget {} is at version {}, not the expected {v}; re-read it and retry",
            b.path,
            b.version
        ),
        _ => Ok(()),
    }
}

/// Gives `b` the limits `limits`, if it is still at the version it was read at.
async fn update(ctx: &Ctx, b: &v1::Budget, limits: &[Spec]) -> anyhow::Result<()> {
    let req = v1::UpdateBudgetRequest {
        meta: ctx.meta(),
        path: b.path.clone(),
        limits: limits.iter().map(Spec::to_proto).collect(),
        expected_version: b.version,
    };
    ctx.on_ledger(&req, |mut c, r| async move { c.update_budget(r).await })
        .await
        .map_err(|e| about(&b.path, e))?;
    Ok(())
}

/// Reads the budget back and prints it with what changed.
async fn print_written(
    ctx: &Ctx,
    out: &mut dyn Write,
    path: &str,
    previous_version: Option<u64>,
    changes: Vec<ChangeOut>,
) -> anyhow::Result<()> {
    let b = get(ctx, path).await?.ok_or_else(|| anyhow!("budget {path} vanished"))?;
    let w = Written { budget: budget_out(&b)?, previous_version, changes };
    emit(out, ctx.format, &w, written)
}

/// The budget at `path` (linearizable), or None.
async fn get(ctx: &Ctx, path: &str) -> anyhow::Result<Option<v1::Budget>> {
    let req = v1::GetBudgetRequest { path: path.to_owned(), linearizable: true };
    ctx.first(|e| {
        let req = req.clone();
        async move {
            let mut c = ctx.ledger(&e).map_err(|x| tonic::Status::unavailable(format!("{x:#}")))?;
            match c.get_budget(req).await {
                Ok(b) => Ok(Some(b.into_inner())),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                Err(s) => Err(s),
            }
        }
    })
    .await
    .map_err(|e| about(path, e))
}

/// An error about the budget at `path`, prefixed with `budget <path>: ` unless its
/// message already names that budget (the server's usually do): said once.
fn about(path: &str, e: anyhow::Error) -> anyhow::Error {
    if names(&format!("{e:#}"), path) {
        e
    } else {
        e.context(format!("budget {path}"))
    }
}

/// Whether `text` mentions `path` as a whole path (not `acme` inside `acme/x`).
fn names(text: &str, path: &str) -> bool {
    let in_path = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.');
    !path.is_empty()
        && text.match_indices(path).any(|(i, _)| {
            let before = text.get(..i).and_then(|t| t.chars().next_back());
            let after = text.get(i + path.len()..).and_then(|t| t.chars().next());
            !before.is_some_and(in_path) && !after.is_some_and(in_path)
        })
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
        let (unit, window) = parse_limit_name("usd_micros/month+05:30").unwrap();
        assert_eq!((unit.as_str(), window.to_string().as_str()), ("usd_micros", "month+05:30"));
        assert!(parse_limit_name("tokens=5/day").unwrap_err().to_string().contains("UNIT/WINDOW"));
        assert!(parse_limit_name("tokens").is_err());
    }

    fn spec(s: &str) -> Spec {
        Spec::from_proto(&parse_limit(s).unwrap()).unwrap()
    }

    #[test]
    fn set_replaces_only_the_limits_it_names() {
        let before = [spec("tokens=1000/day"), spec("usd_micros=50/month")];
        let after =
            merge(&before, &[spec("tokens=2000/day,static=5"), spec("tokens=9/hour")]).unwrap();
        assert_eq!(
            after,
            [spec("tokens=2000/day,static=5"), spec("usd_micros=50/month"), spec("tokens=9/hour")]
        );
        // day and day+05:30 are different windows.
        assert_eq!(merge(&before, &[spec("tokens=1/day+05:30")]).unwrap().len(), 3);
        let twice = merge(&[], &[spec("tokens=1/day"), spec("tokens=2/day")]).unwrap_err();
        assert!(twice.to_string().contains("tokens/day is given twice"), "{twice}");

        let lines: Vec<String> =
            diff(&before, &[spec("tokens=2000/day,static=5"), spec("tokens=9/hour")])
                .into_iter()
                .map(|c| c.line)
                .collect();
        assert_eq!(
            lines,
            ["+ tokens 9/hour", "~ tokens 1000/day -> 2000/day,static=5", "- usd_micros 50/month",]
        );
        assert!(diff(&before, &before).is_empty());
    }

    #[test]
    fn errors_name_their_budget_once() {
        assert!(names("budget acme is at version 2", "acme"));
        assert!(names("parent budget nowhere of nowhere/x does not exist", "nowhere/x"));
        assert!(!names("budget acme/x does not exist", "acme"));
        assert!(!names("invalid cap", "acme"));
        let e = about("acme", anyhow!("INVALID_ARGUMENT: invalid cap"));
        assert_eq!(format!("{e:#}"), "budget acme: INVALID_ARGUMENT: invalid cap");
        let e = about("acme", anyhow!("ABORTED: budget acme is at version 2"));
        assert_eq!(format!("{e:#}"), "ABORTED: budget acme is at version 2");
    }
}
