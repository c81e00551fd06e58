//! `rationctl price`: the replicated price book (usd per million tokens, by model,
//! in versions that take effect in order).

use std::io::Write;

use anyhow::{anyhow, bail};
use clap::Subcommand;
use ration_proto::v1;
use serde::Serialize;

use crate::output::{amount, emit, Table, USD_MICROS};
use crate::{time, Ctx};

#[derive(Debug, Subcommand)]
pub enum PriceCmd {
    /// Add a version of MODEL's price, in US dollars per million tokens
    /// (`price set gpt-4o --input-price 2.50 --cached-price 1.25 --output-price
    /// 10`). Calls
    /// reserved from when it takes effect are charged at it. Audited as
    /// `price_set`.
    Set {
        /// The model's name, as gateways name it.
        model: String,
        /// Dollars per million (uncached) input tokens.
        #[arg(long = "input-price")]
        input: String,
        /// Dollars per million cached input tokens [default: the input price].
        #[arg(long = "cached-price")]
        cached_input: Option<String>,
        /// Dollars per million output tokens.
        #[arg(long = "output-price")]
        output_price: String,
        /// When it takes effect (RFC 3339 UTC, ms since the epoch, +2h); not before
        /// the model's latest version. Default: now.
        #[arg(long, allow_hyphen_values = true)]
        effective_from: Option<String>,
    },
    /// Every model with the version in force now (and one set to take over, if any).
    List,
    /// Every kept version of MODEL, oldest first.
    History {
        /// The model's name.
        model: String,
    },
}

/// Dollars (`2.50`, `0.000150`) as usd_micros: at most six decimals.
pub fn parse_dollars(field: &str, text: &str) -> anyhow::Result<i64> {
    let t = text.trim().trim_start_matches('$');
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        bail!("--{field} {text:?} is not an amount of dollars (like 2.50)");
    }
    if frac.len() > 6 {
        bail!("--{field} {text:?} has more than six decimals (a usd_micro is $0.000001)");
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| anyhow!("--{field} {text:?} is too large"))?
    };
    let frac: i64 = format!("{frac:0<6}").parse().unwrap_or(0);
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(|| anyhow!("--{field} {text:?} is too large"))
}

#[derive(Serialize)]
struct VersionOut {
    model: String,
    version: u32,
    effective_from_ms: u64,
    /// usd_micros per million tokens.
    input: i64,
    cached_input: i64,
    output: i64,
    in_force: bool,
}

fn versions(m: &v1::ModelPrices, now_ms: u64) -> Vec<VersionOut> {
    let current =
        m.versions.iter().rev().find(|v| v.effective_from_ms <= now_ms).map(|v| v.version);
    m.versions
        .iter()
        .map(|v| {
            let p = v.price.unwrap_or_default();
            VersionOut {
                model: m.model.clone(),
                version: v.version,
                effective_from_ms: v.effective_from_ms,
                input: p.input,
                cached_input: p.cached_input,
                output: p.output,
                in_force: Some(v.version) == current,
            }
        })
        .collect()
}

fn table(rows: &[VersionOut], now_ms: u64) -> String {
    let mut t =
        Table::new(&["MODEL", "VERSION", "FROM", "INPUT/MTOK", "CACHED/MTOK", "OUTPUT/MTOK", ""]);
    for r in rows {
        let state = if r.in_force {
            "in force"
        } else if r.effective_from_ms > now_ms {
            "upcoming"
        } else {
            "superseded"
        };
        t.row(vec![
            r.model.clone(),
            r.version.to_string(),
            time::format_ms(r.effective_from_ms),
            amount(USD_MICROS, r.input),
            amount(USD_MICROS, r.cached_input),
            amount(USD_MICROS, r.output),
            state.into(),
        ]);
    }
    t.render()
}

pub async fn run(ctx: &Ctx, cmd: PriceCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        PriceCmd::Set { model, input, cached_input, output_price, effective_from } => {
            let input = parse_dollars("input-price", &input)?;
            let cached_input = match cached_input {
                Some(c) => parse_dollars("cached-price", &c)?,
                None => input,
            };
            let output = parse_dollars("output-price", &output_price)?;
            let effective_from_ms =
                effective_from.map(|t| time::parse(&t, time::now_ms())).transpose()?.unwrap_or(0);
            let req = v1::SetPriceRequest {
                meta: ctx.meta(),
                model: model.clone(),
                price: Some(v1::Price { input, cached_input, output }),
                effective_from_ms,
            };
            let r = ctx.on_ledger(&req, |mut c, r| async move { c.set_price(r).await }).await?;
            #[derive(Serialize)]
            struct SetOut {
                model: String,
                version: u32,
                effective_from_ms: u64,
            }
            let o = SetOut { model, version: r.version, effective_from_ms: r.effective_from_ms };
            emit(out, ctx.format, &o, |o| {
                format!(
                    "{}: version {} in force from {}\n",
                    o.model,
                    o.version,
                    time::format_ms(o.effective_from_ms)
                )
            })
        }
        PriceCmd::List | PriceCmd::History { .. } => {
            let model = match &cmd {
                PriceCmd::History { model } => model.clone(),
                _ => String::new(),
            };
            let req = v1::ListPricesRequest { model: model.clone(), linearizable: true };
            let r = ctx.on_ledger(&req, |mut c, r| async move { c.list_prices(r).await }).await?;
            let mut rows = Vec::new();
            for m in &r.models {
                let all = versions(m, r.now_ms);
                if model.is_empty() {
                    // The version in force, and any still to come.
                    rows.extend(
                        all.into_iter().filter(|v| v.in_force || v.effective_from_ms > r.now_ms),
                    );
                } else {
                    rows.extend(all);
                }
            }
            if !model.is_empty() && rows.is_empty() {
                bail!("model {model} has no price in the price book");
            }
            emit(out, ctx.format, &rows, |rows| table(rows, r.now_ms))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_dollars;

    #[test]
    fn dollars_parse_to_usd_micros_exactly() {
        assert_eq!(parse_dollars("input", "2.50").unwrap(), 2_500_000);
        assert_eq!(parse_dollars("input", "$10").unwrap(), 10_000_000);
        assert_eq!(parse_dollars("input", "0.000150").unwrap(), 150);
        assert_eq!(parse_dollars("input", ".5").unwrap(), 500_000);
        for bad in ["", "-1", "1.0000001", "abc", "1.2.3"] {
            assert!(parse_dollars("input", bad).is_err(), "{bad}");
        }
    }
}
