//! Tables for people, JSON for scripts.
//!
//! JSON (`-o json`) follows one set of conventions, so a script reads every command
//! the same way:
//!
//! - amounts, counts and versions are JSON numbers, never strings;
//! - a time is an integer of milliseconds since the Unix epoch (UTC), in a field
//!   whose name ends in `_ms` (what the protocol and the audit records carry); a time
//!   that never comes, such as the end of a lifetime window, is `null` ([`time_ms`]).
//!   Tables show times as RFC 3339 in UTC ([`when`]);
//! - enum values are snake_case strings (`fail_closed`, `static`, `lease_granted`);
//!   windows are their names as the command line takes them (`minute`, `day+05:30`,
//!   `lifetime`).

use std::io::Write;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A table: a header row and rows of cells, printed with aligned columns.
#[derive(Debug, Default)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { header: header.iter().map(|h| (*h).to_owned()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                let width = widths.get(i).copied().unwrap_or(0);
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Writes `value` as JSON, or the table `table` builds, per `format`.
pub(crate) fn emit<T: Serialize>(
    out: &mut dyn Write,
    format: Format,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        Format::Table => out.write_all(table(value).as_bytes())?,
    }
    Ok(())
}

/// A time for JSON: ms since the epoch, or None (`null`) for one past every
/// calendar window the ledger computes (the end of a lifetime window is `u64::MAX`).
pub(crate) fn time_ms(ms: u64) -> Option<u64> {
    (ms <= ration_core::window::MAX_TIME_MS).then_some(ms)
}

/// A time for people: RFC 3339 in UTC, or `never`.
pub(crate) fn when(ms: Option<u64>) -> String {
    ms.map_or_else(|| "never".to_owned(), crate::time::format_ms)
}

/// A byte count for people: 1.5 MiB.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS.get(unit).copied().unwrap_or("B"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_bytes_read_well() {
        let mut t = Table::new(&["ID", "ADDRESS"]);
        t.row(vec!["1".into(), "127.0.0.1:1".into()]);
        t.row(vec!["10".into(), "h:2".into()]);
        assert_eq!(t.render(), "ID  ADDRESS\n1   127.0.0.1:1\n10  h:2\n");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(time_ms(86_400_000), Some(86_400_000));
        assert_eq!(time_ms(u64::MAX), None);
        assert_eq!(when(time_ms(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(when(time_ms(u64::MAX)), "never");
    }
}

/// The unit whose amounts are millionths of a US dollar.
pub const USD_MICROS: &str = "usd_micros";

/// An amount as a table shows it: `usd_micros` as dollars (`$1,234.50`, with more
/// decimals, up to six, when cents do not say it all), any other unit as it is.
/// JSON output keeps the integers.
pub fn amount(unit: &str, value: impl Into<i128>) -> String {
    let value: i128 = value.into();
    if unit != USD_MICROS {
        return value.to_string();
    }
    let sign = if value < 0 { "-" } else { "" };
    let micros = value.unsigned_abs();
    let (dollars, rest) = (micros / 1_000_000, micros % 1_000_000);
    let digits = dollars.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let mut fraction = format!("{rest:06}");
    while fraction.len() > 2 && fraction.ends_with('0') {
        fraction.pop();
    }
    format!("{sign}${grouped}.{fraction}")
}

#[cfg(test)]
mod money_tests {
    use super::amount;

    #[test]
    fn usd_micros_show_as_dollars_and_other_units_as_they_are() {
        assert_eq!(amount("usd_micros", 50_000_000i64), "$50.00");
        assert_eq!(amount("usd_micros", 100_000_000_000i64), "$100,000.00");
        assert_eq!(amount("usd_micros", 1_022i64), "$0.001022");
        assert_eq!(amount("usd_micros", 1_234_567_890i64), "$1,234.56789");
        assert_eq!(amount("usd_micros", 0i64), "$0.00");
        assert_eq!(amount("usd_micros", -2_500_000i64), "-$2.50");
        assert_eq!(amount("tokens", 1_000_000i64), "1000000");
    }
}
