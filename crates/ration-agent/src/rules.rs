//! Which budget a rate limit descriptor charges: pure matching, no I/O.
//!
//! A rule names a domain, the descriptor's entries (keys in order, each with a
//! value to equal or `*` for any value), the budget path (where `{key}` stands
//! for that entry's value, so one rule gives one budget per API key or user under
//! a parent) and the unit charged. Two keys are set aside before matching:
//!
//! - `correlate`: the entry that ties a request-path call to its stream-done call
//!   (Envoy's rate limit requests carry no request id; the request id header does);
//! - `settle`: an entry present only in the stream-done call (any value).
//!
//! The first rule that matches wins; a descriptor no rule matches is not limited
//! (as in envoyproxy/ratelimit), and counted.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One entry of a rule: a key and the value it must have (`*`: any).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EntryRule {
    pub key: String,
    #[serde(default = "any")]
    pub value: String,
}

fn any() -> String {
    "*".into()
}

/// A rule as written in the agent's configuration (`[[rule]]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub domain: String,
    /// The descriptor's entries, in order (the correlate and settle keys aside).
    pub entries: Vec<EntryRule>,
    /// The budget path; `{key}` is replaced by the value of entry `key`.
    pub budget: String,
    /// The unit charged: `hits_addend` units of it per call.
    pub unit: String,
    #[serde(default)]
    pub correlate: Option<String>,
    #[serde(default)]
    pub settle: Option<String>,
    /// Price the hits from the cluster's price book: the entry (one of `entries`)
    /// whose value names the model. The hits are tokens of kind `price_tokens`, and
    /// the rule's unit must be `usd_micros`: a reservation is priced at the version
    /// in force when it is made, and settled at that version.
    #[serde(default)]
    pub price_model: Option<String>,
    /// `input`, `cached_input` or `output`: which of the model's prices the hits
    /// are charged at.
    #[serde(default)]
    pub price_tokens: Option<String>,
}

/// Which of a model's prices a priced descriptor's tokens are charged at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Input,
    CachedInput,
    Output,
}

impl TokenKind {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "input" => Some(Self::Input),
            "cached_input" => Some(Self::CachedInput),
            "output" => Some(Self::Output),
            _ => None,
        }
    }

    /// What `tokens` of this kind cost at `price`, in usd_micros (rounded up).
    pub fn cost(self, price: &ration_core::command::Price, tokens: u64) -> u64 {
        match self {
            Self::Input => price.cost(tokens, 0, 0),
            Self::CachedInput => price.cost(0, tokens, 0),
            Self::Output => price.cost(0, 0, tokens),
        }
    }
}

/// A descriptor as the agent reads it (converted from Envoy's, `crate::envoy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    /// The descriptor's own `hits_addend`, if set (it may be 0: check only).
    pub hits: Option<u64>,
    /// Envoy's `is_negative_hits`: give units back rather than charge them.
    pub negative: bool,
}

/// What a descriptor charges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub budget: String,
    pub unit: String,
    /// The correlation value, when the rule has a correlate key and it is present.
    pub correlation: Option<String>,
    /// Whether this is the stream-done call that settles a reservation.
    pub settle: bool,
    /// A priced rule's model (the entry's value) and which price applies.
    pub priced: Option<(String, TokenKind)>,
}

/// How a descriptor matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    Target(Target),
    /// No rule names this descriptor: it is not limited.
    Unmatched,
    /// A rule matched but a value cannot be a budget path segment (for example it
    /// holds a `/`, which would name another budget): refused.
    BadValue(String),
}

/// The rules, checked when loaded.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<RuleConfig>,
}

impl Rules {
    /// Checks each rule: a unit the ledger accepts, a budget template whose
    /// placeholders name entries of the rule, entry keys not repeated.
    pub fn new(rules: Vec<RuleConfig>) -> Result<Self, String> {
        for (i, r) in rules.iter().enumerate() {
            let at = format!("rule {} (domain {:?}, budget {:?})", i + 1, r.domain, r.budget);
            if r.domain.is_empty() {
                return Err(format!("{at}: domain must not be empty"));
            }
            if r.entries.is_empty() {
                return Err(format!("{at}: needs at least one entry"));
            }
            ration_core::names::Unit::new(r.unit.clone())
                .map_err(|e| format!("{at}: unit {:?}: {e}", r.unit))?;
            let mut keys = std::collections::BTreeSet::new();
            for e in &r.entries {
                if e.key.is_empty() || !keys.insert(e.key.as_str()) {
                    return Err(format!("{at}: entry key {:?} empty or repeated", e.key));
                }
                if Some(&e.key) == r.correlate.as_ref() || Some(&e.key) == r.settle.as_ref() {
                    return Err(format!(
                        "{at}: entry key {:?} is also the correlate or settle key",
                        e.key
                    ));
                }
            }
            if r.settle.is_some() && r.correlate.is_none() {
                return Err(format!("{at}: a settle key needs a correlate key"));
            }
            match (&r.price_model, &r.price_tokens) {
                (None, None) => {}
                (Some(m), Some(t)) => {
                    if !r.entries.iter().any(|e| &e.key == m) {
                        return Err(format!("{at}: price_model {m:?} is not one of its entries"));
                    }
                    if TokenKind::parse(t).is_none() {
                        return Err(format!(
                            "{at}: price_tokens {t:?} is not input, cached_input or output"
                        ));
                    }
                    if r.unit != "usd_micros" {
                        return Err(format!(
                            "{at}: a priced rule charges usd_micros, not {:?}",
                            r.unit
                        ));
                    }
                }
                _ => return Err(format!("{at}: give price_model and price_tokens together")),
            }
            // Every placeholder names a wildcard entry; the rest must be a path.
            let mut sample = r.budget.clone();
            for e in &r.entries {
                sample = sample.replace(&format!("{{{}}}", e.key), "x");
            }
            if sample.contains('{') || sample.contains('}') {
                return Err(format!("{at}: the budget names a placeholder no entry has"));
            }
            ration_core::names::BudgetPath::new(sample)
                .map_err(|e| format!("{at}: budget {:?}: {e}", r.budget))?;
        }
        Ok(Self { rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The budget and unit this descriptor charges, by the first rule matching it.
    pub fn resolve(&self, domain: &str, d: &Descriptor) -> Match {
        for r in self.rules.iter().filter(|r| r.domain == domain) {
            if let Some(m) = matches(r, d) {
                return m;
            }
        }
        Match::Unmatched
    }

    /// The budget and unit an RLQS bucket charges: its id (an unordered map) holds
    /// exactly the rule's entry keys, with matching values. Correlation and settle
    /// keys have no meaning here.
    pub fn resolve_bucket(&self, domain: &str, bucket: &BTreeMap<String, String>) -> Match {
        for r in self.rules.iter().filter(|r| r.domain == domain) {
            if bucket.len() != r.entries.len() {
                continue;
            }
            let entries: Option<Vec<(String, String)>> = r
                .entries
                .iter()
                .map(|e| bucket.get(&e.key).map(|v| (e.key.clone(), v.clone())))
                .collect();
            let Some(entries) = entries else { continue };
            let d = Descriptor { entries, ..Descriptor::default() };
            if let Some(m) = matches(r, &d) {
                return match m {
                    Match::Target(t) => {
                        Match::Target(Target { correlation: None, settle: false, ..t })
                    }
                    other => other,
                };
            }
        }
        Match::Unmatched
    }
}

/// How `d` matches rule `r`, if it does.
fn matches(r: &RuleConfig, d: &Descriptor) -> Option<Match> {
    let mut correlation = None;
    let mut settle = false;
    let mut rest = Vec::with_capacity(d.entries.len());
    for (k, v) in &d.entries {
        if Some(k) == r.correlate.as_ref() {
            correlation = Some(v.clone());
        } else if Some(k) == r.settle.as_ref() {
            settle = true;
        } else {
            rest.push((k, v));
        }
    }
    if rest.len() != r.entries.len() {
        return None;
    }
    for ((k, v), e) in rest.iter().zip(&r.entries) {
        if **k != e.key || (e.value != "*" && **v != e.value) {
            return None;
        }
    }
    let mut budget = r.budget.clone();
    for ((k, v), e) in rest.iter().zip(&r.entries) {
        let placeholder = format!("{{{}}}", e.key);
        if !budget.contains(&placeholder) {
            continue;
        }
        if v.contains('/') || ration_core::names::BudgetPath::new((*v).clone()).is_err() {
            return Some(Match::BadValue(format!(
                "the value of {k:?} cannot name a budget (1-64 of [A-Za-z0-9_.-])"
            )));
        }
        budget = budget.replace(&placeholder, v);
    }
    if let Err(e) = ration_core::names::BudgetPath::new(budget.clone()) {
        return Some(Match::BadValue(format!("budget {budget:?}: {e}")));
    }
    // A settle call without its correlation cannot find its reservation.
    let settle = settle && correlation.is_some();
    let priced = match (&r.price_model, r.price_tokens.as_deref().and_then(TokenKind::parse)) {
        (Some(m), Some(kind)) => {
            let model = rest.iter().find(|(k, _)| *k == m).map(|(_, v)| (*v).clone())?;
            Some((model, kind))
        }
        _ => None,
    };
    Some(Match::Target(Target { budget, unit: r.unit.clone(), correlation, settle, priced }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        let text = r#"
            [[rule]]
            domain = "llm"
            entries = [{ key = "api_key" }]
            budget = "acme/keys/{api_key}"
            unit = "tokens"
            correlate = "request_id"
            settle = "phase"

            [[rule]]
            domain = "llm"
            entries = [{ key = "team", value = "search" }]
            budget = "acme/search"
            unit = "requests"
        "#;
        #[derive(Deserialize)]
        struct F {
            rule: Vec<RuleConfig>,
        }
        let f: F = toml::from_str(text).unwrap();
        Rules::new(f.rule).unwrap()
    }

    fn d(entries: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            entries: entries.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            ..Descriptor::default()
        }
    }

    #[test]
    fn a_wildcard_names_one_budget_per_value_and_sets_aside_the_correlation() {
        let r = rules();
        let m = r.resolve("llm", &d(&[("api_key", "k-7"), ("request_id", "r1")]));
        assert_eq!(
            m,
            Match::Target(Target {
                budget: "acme/keys/k-7".into(),
                unit: "tokens".into(),
                correlation: Some("r1".into()),
                settle: false,
                priced: None,
            })
        );
        let m = r.resolve("llm", &d(&[("api_key", "k-7"), ("request_id", "r1"), ("phase", "x")]));
        assert!(matches!(m, Match::Target(Target { settle: true, .. })));
        // Without a correlation there is nothing to settle: an ordinary charge.
        let m = r.resolve("llm", &d(&[("api_key", "k-7"), ("phase", "x")]));
        assert!(matches!(m, Match::Target(Target { settle: false, correlation: None, .. })));
    }

    #[test]
    fn fixed_values_domains_and_extra_entries_must_match() {
        let r = rules();
        assert!(matches!(r.resolve("llm", &d(&[("team", "search")])), Match::Target(_)));
        assert_eq!(r.resolve("llm", &d(&[("team", "ads")])), Match::Unmatched);
        assert_eq!(r.resolve("other", &d(&[("api_key", "k")])), Match::Unmatched);
        assert_eq!(r.resolve("llm", &d(&[("api_key", "k"), ("x", "y")])), Match::Unmatched);
    }

    #[test]
    fn a_value_that_would_name_another_budget_is_refused() {
        let r = rules();
        for bad in ["a/b", "..", "", "k y", &"x".repeat(65)] {
            assert!(
                matches!(r.resolve("llm", &d(&[("api_key", bad)])), Match::BadValue(_)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_bucket_id_matches_by_its_keys_in_any_order() {
        let r = rules();
        let b = |e: &[(&str, &str)]| -> BTreeMap<String, String> {
            e.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
        };
        let m = r.resolve_bucket("llm", &b(&[("api_key", "k-7")]));
        assert!(matches!(&m, Match::Target(t) if t.budget == "acme/keys/k-7" && !t.settle));
        assert!(matches!(r.resolve_bucket("llm", &b(&[("team", "search")])), Match::Target(_)));
        assert_eq!(r.resolve_bucket("llm", &b(&[("api_key", "k"), ("x", "y")])), Match::Unmatched);
        assert!(matches!(r.resolve_bucket("llm", &b(&[("api_key", "a/b")])), Match::BadValue(_)));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let rule = |budget: &str, unit: &str| RuleConfig {
            domain: "llm".into(),
            entries: vec![EntryRule { key: "k".into(), value: "*".into() }],
            budget: budget.into(),
            unit: unit.into(),
            correlate: None,
            settle: None,
            price_model: None,
            price_tokens: None,
        };
        assert!(Rules::new(vec![rule("a/{k}", "tokens")]).is_ok());
        // A priced rule: its model is one of its entries, its unit usd_micros.
        let priced = |model: &str, tokens: Option<&str>, unit: &str| RuleConfig {
            price_model: Some(model.into()),
            price_tokens: tokens.map(Into::into),
            ..rule("a/{k}", unit)
        };
        assert!(Rules::new(vec![priced("k", Some("output"), "usd_micros")]).is_ok());
        for (bad, why) in [
            (priced("m", Some("output"), "usd_micros"), "not one of its entries"),
            (priced("k", Some("words"), "usd_micros"), "not input, cached_input or output"),
            (priced("k", Some("input"), "tokens"), "charges usd_micros"),
            (priced("k", None, "usd_micros"), "together"),
        ] {
            let e = Rules::new(vec![bad]).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let e = Rules::new(vec![rule("a/{nope}", "tokens")]).unwrap_err();
        assert!(e.contains("placeholder"), "{e}");
        let e = Rules::new(vec![rule("a//b", "tokens")]).unwrap_err();
        assert!(e.contains("budget"), "{e}");
        let e = Rules::new(vec![rule("a", "Tokens")]).unwrap_err();
        assert!(e.contains("unit"), "{e}");
        let mut r = rule("a", "tokens");
        r.settle = Some("phase".into());
        assert!(Rules::new(vec![r]).unwrap_err().contains("correlate"));
    }
}
