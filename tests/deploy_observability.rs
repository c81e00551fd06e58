//! The observability material in deploy/ agrees with the code: every `ration_*`
//! metric that the Grafana dashboard (`deploy/grafana/ration-dashboard.json`) and the
//! Prometheus rules (`deploy/prometheus/ration-rules.yml`, and their unit tests
//! `ration-rules.test.yml`) name is one the code exports, and every `ration:*`
//! recording rule they use is defined.
//!
//! A metric exists when its name is a string literal (`"ration_grants_total"`)
//! somewhere under `crates/*/src`: that is how rationd's exposition
//! (crates/ration-server/src/metrics.rs) and the SDK's counter names
//! (`ration_client::counters`) spell them. A histogram's `_bucket`, `_sum` and
//! `_count` series count as their histogram. A name that ends in `_` (as in
//! `ration_budget_*` in a comment) is a prefix: some metric must start with it.
//!
//! Also: the dashboard is JSON with the panels and variables Grafana needs, the rules
//! file has the expected structure (there is no YAML parser in the workspace, so this
//! is a line-based check: `groups:`, every rule with an `expr:`, unique names), and,
//! `promtool check rules` and `promtool test rules` accept the files (promtool from
//! PATH, else from Debian's `prometheus` package, fetched and unpacked by the test;
//! skipped, saying so, only where neither works).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const DASHBOARD: &str = "deploy/grafana/ration-dashboard.json";
const RULES: &str = "deploy/prometheus/ration-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/ration-rules.test.yml";

/// The alerts the rules must have.
const REQUIRED_ALERTS: &[&str] = &[
    "RationSnapshotStale",
    "RationNoLeader",
    "RationFollowerLag",
    "RationBudgetBurnRate",
    "RationBudgetNearCap",
    "RationClockSkew",
    "RationOverruns",
    "RationBudgetExhaustionSoon",
];

/// The repository: this package is its `tests/` directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
}

/// Every `ration_[a-z0-9_]+` word in `text` (not inside a longer identifier such as
/// `duration_seconds`, nor after `:` as in a recording rule's name), with its line.
fn metric_names(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut from = 0;
        while let Some(at) = line[from..].find("ration_") {
            let start = from + at;
            let mut end = start + "ration_".len();
            while end < bytes.len() && is_name_char(bytes[end]) {
                end += 1;
            }
            let standalone = start == 0 || {
                let b = bytes[start - 1];
                !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
            };
            if standalone && end > start + "ration_".len() {
                found.push((n + 1, line[start..end].to_owned()));
            }
            from = end;
        }
    }
    found
}

/// Every `ration:...` recording-rule name used in `text` (Prometheus names may hold
/// colons), with its line.
fn recording_names(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut from = 0;
        while let Some(at) = line[from..].find("ration:") {
            let start = from + at;
            let mut end = start + "ration:".len();
            while end < bytes.len() && (is_name_char(bytes[end]) || bytes[end] == b':') {
                end += 1;
            }
            let standalone = start == 0 || !is_name_char(bytes[start - 1]);
            if standalone && end > start + "ration:".len() {
                found.push((n + 1, line[start..end].trim_end_matches(':').to_owned()));
            }
            from = end;
        }
    }
    found
}

/// Every `"ration_..."` string literal in the Rust sources under `crates/*/src`.
fn exported_names() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root().join("crates")).unwrap() {
        let src = krate.unwrap().path().join("src");
        if src.is_dir() {
            walk(&src, &mut files);
        }
    }
    assert!(
        files.iter().any(|f| f.ends_with("ration-server/src/metrics.rs")),
        "crates/ration-server/src/metrics.rs moved? {} files found",
        files.len()
    );
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("\"ration_") {
            let lit = &rest[at + 1..];
            let len = lit.bytes().take_while(|b| is_name_char(*b)).count();
            if lit.as_bytes().get(len) == Some(&b'"') {
                names.insert(lit[..len].to_owned());
            }
            rest = &lit[len..];
        }
    }
    names
}

/// Whether `name`, as written in deploy/, is a metric the code exports.
fn exists(name: &str, exported: &BTreeSet<String>) -> bool {
    if name.ends_with('_') {
        return exported.iter().any(|e| e.starts_with(name));
    }
    if exported.contains(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| exported.contains(base)))
}

#[test]
fn every_metric_in_the_dashboard_and_rules_is_exported() {
    let exported = exported_names();
    // The scan finds the server's and the SDK's names.
    for known in ["ration_raft_is_leader", "ration_budget_cap", "ration_client_admitted_total"] {
        assert!(exported.contains(known), "{known} not found in crates/*/src: {exported:?}");
    }
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for file in [DASHBOARD, RULES, RULE_TESTS] {
        let names = metric_names(&read(file));
        assert!(names.len() > 10, "{file}: only {} metric names found", names.len());
        for (line, name) in names {
            if exists(&name, &exported) {
                used.insert(name);
            } else {
                unknown.push(format!("{file}:{line}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "deploy/ names metrics that no crate exports (no string literal \"name\" under \
         crates/*/src):\n  {}",
        unknown.join("\n  ")
    );
    // The panels the dashboard promises are there.
    for name in [
        "ration_raft_is_leader",
        "ration_raft_term",
        "ration_raft_commit_index",
        "ration_raft_applied_index",
        "ration_raft_apply_lag",
        "ration_proposals_total",
        "ration_proposal_batch_commands_bucket",
        "ration_rpc_duration_seconds_bucket",
        "ration_grants_total",
        "ration_denials_total",
        "ration_budget_consumed",
        "ration_overruns_total",
        "ration_clock_skew_ms",
        "ration_wal_syncs_total",
        "ration_wal_bytes_total",
    ] {
        assert!(used.contains(name), "nothing in deploy/ uses {name}");
    }
}

/// Recording rules: `record:` name -> line.
fn recorded(rules: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (n, line) in rules.lines().enumerate() {
        if let Some(name) = line.trim_start().strip_prefix("- record:") {
            let previous = out.insert(name.trim().to_owned(), n + 1);
            assert!(previous.is_none(), "{RULES}:{}: {} recorded twice", n + 1, name.trim());
        }
    }
    out
}

#[test]
fn every_recording_rule_used_is_defined() {
    let rules = read(RULES);
    let defined = recorded(&rules);
    assert!(defined.contains_key("ration:budget_in_use:ratio"), "{defined:?}");
    let mut undefined = Vec::new();
    for file in [DASHBOARD, RULES, RULE_TESTS] {
        for (line, name) in recording_names(&read(file)) {
            if !defined.contains_key(&name) {
                undefined.push(format!("{file}:{line}: {name}"));
            }
        }
    }
    assert!(undefined.is_empty(), "undefined recording rules:\n  {}", undefined.join("\n  "));
}

/// One rule of the rules file, as read line by line.
#[derive(Debug)]
struct Rule {
    line: usize,
    /// `alert` or `record`
    kind: &'static str,
    name: String,
    keys: BTreeMap<String, String>,
}

/// The rules, from `- alert:` / `- record:` items and the keys indented under them.
fn rules(text: &str) -> (Vec<String>, Vec<Rule>) {
    let mut groups = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    let mut rule_indent = usize::MAX;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(name) = trimmed.strip_prefix("- name:") {
            groups.push(name.trim().to_owned());
            rule_indent = usize::MAX;
            continue;
        }
        let item = [("alert", "- alert:"), ("record", "- record:")]
            .into_iter()
            .find_map(|(kind, prefix)| trimmed.strip_prefix(prefix).map(|rest| (kind, rest)));
        if let Some((kind, name)) = item {
            rule_indent = indent + 2;
            rules.push(Rule {
                line: n + 1,
                kind,
                name: name.trim().to_owned(),
                keys: BTreeMap::new(),
            });
            continue;
        }
        if indent == rule_indent {
            if let (Some(rule), Some((key, value))) = (rules.last_mut(), trimmed.split_once(':')) {
                rule.keys.insert(key.to_owned(), value.trim().to_owned());
            }
        } else if indent < rule_indent && !trimmed.starts_with("rules:") {
            rule_indent = usize::MAX;
        }
    }
    (groups, rules)
}

#[test]
fn the_rules_file_is_well_formed() {
    let text = read(RULES);
    assert!(!text.contains('\t'), "{RULES}: tabs are not YAML indentation");
    assert!(text.lines().any(|l| l == "groups:"), "{RULES}: no top-level groups:");
    let (groups, rules) = rules(&text);
    assert!(!groups.is_empty(), "{RULES}: no groups");
    assert_eq!(groups.len(), groups.iter().collect::<BTreeSet<_>>().len(), "group names repeat");
    let mut alerts = BTreeSet::new();
    for rule in &rules {
        let at = format!("{RULES}:{} ({} {})", rule.line, rule.kind, rule.name);
        let expr = rule.keys.get("expr").unwrap_or_else(|| panic!("{at}: no expr:"));
        assert!(!expr.is_empty(), "{at}: empty expr");
        if rule.kind == "alert" {
            assert!(rule.name.starts_with("Ration"), "{at}: alert names start with Ration");
            assert!(alerts.insert(rule.name.clone()), "{at}: alert defined twice");
            assert!(rule.keys.contains_key("labels"), "{at}: no labels: (severity)");
            assert!(rule.keys.contains_key("annotations"), "{at}: no annotations:");
            if let Some(duration) = rule.keys.get("for") {
                let digits = duration.trim_end_matches(['s', 'm', 'h']);
                assert!(
                    !digits.is_empty()
                        && digits.bytes().all(|b| b.is_ascii_digit())
                        && digits.len() < duration.len(),
                    "{at}: for: {duration} is not a duration like 5m"
                );
            }
        } else {
            assert!(rule.name.starts_with("ration:"), "{at}: recording rules are ration:*");
        }
    }
    for needed in REQUIRED_ALERTS {
        assert!(alerts.contains(*needed), "{RULES}: no alert {needed} (have {alerts:?})");
    }
    assert!(text.matches("severity:").count() >= alerts.len(), "every alert has a severity");
}

#[test]
fn the_dashboard_is_a_grafana_dashboard() {
    let text = read(DASHBOARD);
    let dash: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert_eq!(dash["uid"], "ration-overview");
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var_names: BTreeSet<&str> = vars.iter().map(|v| v["name"].as_str().unwrap()).collect();
    let datasource =
        vars.iter().find(|v| v["type"] == "datasource").expect("a datasource variable");
    assert_eq!(datasource["name"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{title}: panel id repeats");
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_u64().unwrap(), pos["w"].as_u64().unwrap());
        assert!(x + w <= 24 && pos["h"].as_u64().unwrap() > 0, "{title}: gridPos {pos}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}: data source");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: {expr}");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{title}: unbalanced parentheses in {expr}"
            );
            // Every $variable a query uses is defined (or one of Grafana's own).
            for (i, _) in expr.match_indices('$') {
                let var: String = expr[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    var.starts_with("__") || var_names.contains(var.as_str()),
                    "{title}: ${var} is not a dashboard variable ({expr})"
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "only {queries} queries");
}

/// A `promtool`: the one on PATH, else the one in Debian's `prometheus` package,
/// fetched with `apt-get download` and unpacked with `dpkg-deb -x` under the target
/// directory (no root, nothing installed), once. `None` (the check is skipped,
/// saying so) only where neither works.
fn promtool() -> Option<PathBuf> {
    let works = |p: &Path| {
        std::process::Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success())
    };
    if works(Path::new("promtool")) {
        return Some(PathBuf::from("promtool"));
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("promtool");
    let bin = dir.join("usr/bin/promtool");
    if works(&bin) {
        return Some(bin);
    }
    let partial = dir.with_file_name(format!("promtool.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).unwrap();
    let step = |what: &str, cmd: &mut std::process::Command| -> bool {
        match cmd.output() {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                eprintln!("{what} failed: {}", String::from_utf8_lossy(&o.stderr));
                false
            }
            Err(e) => {
                eprintln!("{what}: {e}");
                false
            }
        }
    };
    let fetched = step(
        "apt-get download prometheus",
        std::process::Command::new("apt-get")
            .args(["download", "-qq", "prometheus"])
            .current_dir(&partial),
    );
    let deb = std::fs::read_dir(&partial)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    let unpacked = fetched
        && deb.is_some_and(|deb| {
            step(
                "dpkg-deb -x",
                std::process::Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial),
            )
        });
    if !unpacked {
        let _ = std::fs::remove_dir_all(&partial);
        return None;
    }
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::rename(&partial, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&partial); // another test process won the race
    }
    works(&bin).then_some(bin)
}

/// `promtool check rules` and `promtool test rules` (promtool from PATH or from
/// Debian's package, see [`promtool`]).
#[test]
fn promtool_accepts_the_rules() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "SKIPPED: no promtool on PATH, and Debian's prometheus package could not be \
             fetched (apt-get download) here"
        );
        return;
    };
    let dir = root().join("deploy/prometheus");
    for args in [
        ["check", "rules", dir.join("ration-rules.yml").to_str().unwrap()],
        ["test", "rules", dir.join("ration-rules.test.yml").to_str().unwrap()],
    ] {
        let out = std::process::Command::new(&promtool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_scanner_reads_names_as_written() {
    let text = "rate(ration_wal_syncs_total[5m]) / ration:budget_in_use:ratio\n\
                rpc_duration_seconds ration_budget_* x:ration_no";
    let names: Vec<String> = metric_names(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["ration_wal_syncs_total", "ration_budget_"]);
    let recs: Vec<String> = recording_names(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(recs, ["ration:budget_in_use:ratio"]);
    let exported: BTreeSet<String> =
        ["ration_rpc_duration_seconds", "ration_budget_cap"].map(String::from).into();
    assert!(exists("ration_rpc_duration_seconds_bucket", &exported));
    assert!(exists("ration_budget_", &exported));
    assert!(!exists("ration_budget_age_seconds", &exported));
    assert!(!exists("ration_snapshot_", &exported));
}
