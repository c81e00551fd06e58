//! Pricing LLM calls from the ledger's price book.
//!
//! The SDK keeps a copy of the replicated price book (refreshed every
//! [`PRICE_REFRESH`] by its refill task, or on demand with
//! [`Sdk::refresh_prices`]). [`Sdk::reserve_call`] turns (model, prompt tokens, max
//! tokens) into a reservation in tokens and in `usd_micros`, priced at the version
//! in force now; [`CallReservation::settle`] charges what the call really used at
//! that same version, whatever was set since.
//!
//! What the ledger records, and at which granularity:
//! - per lease: the release that settles a `usd_micros` lease carries, as usage
//!   lines in its request, the subtotals per (model, price version) of the calls
//!   settled on that budget since the previous release (`Cause.usage` of its
//!   `lease_released` record);
//! - per call, for calls given a trace id (agent runs, where calls are few and
//!   costly, or any call a gateway wants traced): one `call_recorded` record with
//!   the trace id, model, version, tokens and cost, sent in the next refill round
//!   and re-sent with the same request id until the ledger answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ration_core::command::{Price, UsageLine};
use ration_proto::v1;

use crate::refill::Sdk;
use crate::Reservation;

/// How often the refill task reads the price book again (within a second when a
/// model was asked for that it does not hold).
pub const PRICE_REFRESH: Duration = Duration::from_secs(30);
/// The unit dollars are counted in.
pub const USD_MICROS: &str = "usd_micros";
/// The unit tokens are counted in (when [`CallSpec::tokens`] is set).
pub const TOKENS: &str = "tokens";
/// Distinct (model, version) subtotals kept per budget between releases.
const MAX_USAGE_LINES: usize = 32;

/// One version of a model's price, as the SDK holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriceVersion {
    pub version: u32,
    pub effective_from_ms: u64,
    pub price: Price,
}

/// The SDK's copy of the price book.
#[derive(Debug, Default)]
pub struct PriceBook {
    models: BTreeMap<String, Vec<PriceVersion>>,
    /// Local clock (ms since the epoch) of the last refresh; 0: never.
    pub(crate) fetched_at_ms: u64,
}

impl PriceBook {
    pub(crate) fn replace(&mut self, reply: &v1::ListPricesReply, now_ms: u64) {
        self.models = reply
            .models
            .iter()
            .map(|m| {
                let versions = m
                    .versions
                    .iter()
                    .map(|v| {
                        let p = v.price.unwrap_or_default();
                        let u = |x: i64| u64::try_from(x).unwrap_or(0);
                        PriceVersion {
                            version: v.version,
                            effective_from_ms: v.effective_from_ms,
                            price: Price {
                                input: u(p.input),
                                cached_input: u(p.cached_input),
                                output: u(p.output),
                            },
                        }
                    })
                    .collect();
                (m.model.clone(), versions)
            })
            .collect();
        self.fetched_at_ms = now_ms;
    }

    /// The version of `model`'s price in force at `at_ms` (ledger time: the wall
    /// clock, which ledger time follows).
    pub fn at(&self, model: &str, at_ms: u64) -> Option<PriceVersion> {
        self.models.get(model)?.iter().rev().find(|v| v.effective_from_ms <= at_ms).copied()
    }

    /// Version `version` of `model`'s price, if the book still holds it.
    pub fn version(&self, model: &str, version: u32) -> Option<PriceVersion> {
        self.models.get(model)?.iter().find(|v| v.version == version).copied()
    }
}

/// The price a call is reserved at, what it costs at most, and the (unit,
/// amount) pairs reserved.
type CallWants = (PriceVersion, u64, Vec<(String, u64)>);

/// An LLM call to reserve for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallSpec {
    pub model: String,
    /// Prompt tokens (counted as uncached input when reserving: the most it costs).
    pub prompt_tokens: u64,
    /// The most output tokens the call may produce.
    pub max_tokens: u64,
    /// Also reserve `prompt + max_tokens` on the budget's `tokens` limit.
    pub tokens: bool,
    /// A trace id (a W3C traceparent, a run id): the call is recorded in the audit
    /// ledger under it when settled.
    pub trace: Option<String>,
    /// Other (unit, amount) pairs the call takes on the budget, settled as
    /// reserved (one `calls` for an agent run's call).
    pub extra: Vec<(String, u64)>,
}

/// What a call really used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Uncached input tokens.
    pub input: u64,
    pub cached: u64,
    pub output: u64,
}

/// Why a call could not be reserved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error(
        "model {0} has no price in force in the price book (set one with `rationctl price set`)"
    )]
    NoPrice(String),
    #[error("the budget's leases do not cover the call (refused)")]
    Refused,
}

/// A call reserved at a price version: settle it with what it used.
#[derive(Debug)]
pub struct CallReservation {
    sdk: Arc<Sdk>,
    budget: String,
    spec: CallSpec,
    price: PriceVersion,
    reserved_usd: u64,
    reservation: Option<Reservation>,
}

/// What a settled call cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charged {
    pub price_version: u32,
    pub cost_usd_micros: u64,
}

impl CallReservation {
    /// The price version the call is charged at.
    pub fn price_version(&self) -> u32 {
        self.price.version
    }

    /// What was reserved in usd_micros.
    pub fn reserved_usd_micros(&self) -> u64 {
        self.reserved_usd
    }

    /// Charges what the call used at the version it was reserved at: the
    /// reservation is settled (use beyond it is taken from leases or reported as
    /// an overrun, as any reservation's), the usage is added to the budget's
    /// subtotals for its next release, and a traced call is recorded.
    pub fn settle(mut self, used: TokenUsage) -> Charged {
        let cost = self.price.price.cost(used.input, used.cached, used.output);
        let tokens = used.input.saturating_add(used.cached).saturating_add(used.output);
        if let Some(r) = self.reservation.take() {
            let mut used_all = Vec::with_capacity(2 + self.spec.extra.len());
            if self.spec.tokens {
                used_all.push(tokens);
            }
            used_all.push(cost);
            used_all.extend(self.spec.extra.iter().map(|(_, n)| *n));
            r.settle(&used_all);
        }
        let line = UsageLine {
            model: self.spec.model.clone(),
            price_version: self.price.version,
            calls: 1,
            input_tokens: used.input,
            cached_tokens: used.cached,
            output_tokens: used.output,
            cost_usd_micros: cost,
        };
        self.sdk.add_usage(&self.budget, &line);
        if let Some(trace) = &self.spec.trace {
            self.sdk.record_call(&self.budget, trace, &line);
        }
        Charged { price_version: self.price.version, cost_usd_micros: cost }
    }
}

/// Adds `line` to `lines`, merged with the line of the same (model, version).
pub(crate) fn add_line(lines: &mut Vec<UsageLine>, line: &UsageLine) {
    if let Some(l) =
        lines.iter_mut().find(|l| l.model == line.model && l.price_version == line.price_version)
    {
        l.calls = l.calls.saturating_add(line.calls);
        l.input_tokens = l.input_tokens.saturating_add(line.input_tokens);
        l.cached_tokens = l.cached_tokens.saturating_add(line.cached_tokens);
        l.output_tokens = l.output_tokens.saturating_add(line.output_tokens);
        l.cost_usd_micros = l.cost_usd_micros.saturating_add(line.cost_usd_micros);
    } else if lines.len() < MAX_USAGE_LINES {
        lines.push(line.clone());
    }
}

pub(crate) fn to_proto(line: &UsageLine) -> v1::UsageLine {
    let i = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    v1::UsageLine {
        model: line.model.clone(),
        price_version: line.price_version,
        calls: i(line.calls),
        input_tokens: i(line.input_tokens),
        cached_tokens: i(line.cached_tokens),
        output_tokens: i(line.output_tokens),
        cost_usd_micros: i(line.cost_usd_micros),
    }
}

pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Sdk {
    /// Reads the price book again from the nearest member; false if none answered.
    pub async fn refresh_prices(&self) -> bool {
        match self.cluster().list_prices().await {
            Some(reply) => {
                self.prices_mut().replace(&reply, wall_ms());
                true
            }
            None => false,
        }
    }

    /// The version of `model`'s price in force now, as last read. A model the
    /// book does not hold has the book read again within a second.
    pub fn price(&self, model: &str) -> Option<PriceVersion> {
        let found = self.prices().at(model, wall_ms());
        if found.is_none() {
            self.price_missed.store(true, std::sync::atomic::Ordering::Release);
        }
        found
    }

    /// Reserves for an LLM call on `budget`: `prompt + max_tokens` tokens (if
    /// `call.tokens`) and their price in usd_micros at the version in force now,
    /// all or nothing.
    pub fn reserve_call(
        self: &Arc<Self>,
        budget: &str,
        call: CallSpec,
    ) -> Result<CallReservation, CallError> {
        let (price, usd, wants) = self.call_wants(&call)?;
        let wants: Vec<(&str, &str, u64)> =
            wants.iter().map(|(u, n)| (budget, u.as_str(), *n)).collect();
        let reservation = self.reserve(&wants).ok_or(CallError::Refused)?;
        Ok(self.call_reservation(budget, call, price, usd, reservation))
    }

    /// As [`Sdk::reserve_call`], but a budget the ledger has not answered for yet
    /// (a new user's or run's, made by a template on its first acquire) is waited
    /// for, as [`Sdk::reserve_waiting`] waits.
    pub async fn reserve_call_waiting(
        self: &Arc<Self>,
        budget: &str,
        call: CallSpec,
        wait: Duration,
    ) -> Result<CallReservation, CallError> {
        let (price, usd, wants) = self.call_wants(&call)?;
        let wants: Vec<(&str, &str, u64)> =
            wants.iter().map(|(u, n)| (budget, u.as_str(), *n)).collect();
        let reservation = self.reserve_waiting(&wants, wait).await.ok_or(CallError::Refused)?;
        Ok(self.call_reservation(budget, call, price, usd, reservation))
    }

    /// The price in force, what it makes the call cost at most, and the (unit,
    /// amount) pairs to reserve, in the order [`CallReservation::settle`] settles.
    fn call_wants(&self, call: &CallSpec) -> Result<CallWants, CallError> {
        let price =
            self.price(&call.model).ok_or_else(|| CallError::NoPrice(call.model.clone()))?;
        let usd = price.price.cost(call.prompt_tokens, 0, call.max_tokens);
        let mut wants = Vec::with_capacity(2 + call.extra.len());
        if call.tokens {
            wants.push((TOKENS.to_owned(), call.prompt_tokens.saturating_add(call.max_tokens)));
        }
        wants.push((USD_MICROS.to_owned(), usd));
        wants.extend(call.extra.iter().cloned());
        Ok((price, usd, wants))
    }

    fn call_reservation(
        self: &Arc<Self>,
        budget: &str,
        call: CallSpec,
        price: PriceVersion,
        usd: u64,
        reservation: Reservation,
    ) -> CallReservation {
        CallReservation {
            sdk: self.clone(),
            budget: budget.to_owned(),
            spec: call,
            price,
            reserved_usd: usd,
            reservation: Some(reservation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_answers_the_version_in_force_and_lines_merge() {
        let mut book = PriceBook::default();
        let p = |input| Some(v1::Price { input, cached_input: 0, output: 0 });
        book.replace(
            &v1::ListPricesReply {
                models: vec![v1::ModelPrices {
                    model: "m".into(),
                    versions: vec![
                        v1::PriceVersion {
                            version: 1,
                            effective_from_ms: 100,
                            price: p(1),
                            set_at_ms: 0,
                        },
                        v1::PriceVersion {
                            version: 2,
                            effective_from_ms: 200,
                            price: p(2),
                            set_at_ms: 0,
                        },
                    ],
                }],
                now_ms: 0,
            },
            1,
        );
        assert_eq!(book.at("m", 99), None);
        assert_eq!(book.at("m", 150).map(|v| v.version), Some(1));
        assert_eq!(book.at("m", 200).map(|v| v.version), Some(2));
        assert_eq!(book.version("m", 1).map(|v| v.price.input), Some(1));
        let line = UsageLine {
            model: "m".into(),
            price_version: 1,
            calls: 1,
            input_tokens: 10,
            cached_tokens: 0,
            output_tokens: 5,
            cost_usd_micros: 7,
        };
        let mut lines = Vec::new();
        add_line(&mut lines, &line);
        add_line(&mut lines, &line);
        add_line(&mut lines, &UsageLine { price_version: 2, ..line.clone() });
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].calls, lines[0].cost_usd_micros), (2, 14));
    }
}
