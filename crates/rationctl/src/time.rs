//! Times on the command line and in output: RFC 3339 in UTC, milliseconds since the
//! epoch, or relative to now (`-1h`).

use anyhow::{anyhow, bail};
use ration_core::window::{civil_from_days, days_from_civil};

/// `2026-11-28T15:04:05.123Z`.
pub fn format_ms(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    let days = ms.div_euclid(86_400_000);
    let rest = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// The pause before retry `round` (1, 2, ...): `base` doubled each round, at most
/// `max` (and no pause before round 0, the first try).
pub fn backoff(
    round: u32,
    base: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    if round == 0 {
        return std::time::Duration::ZERO;
    }
    let factor = 1u32.checked_shl(round.saturating_sub(1)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Parses `1764340000000` (ms), `now`, `-90s`/`-15m`/`-2h`/`-7d` (before now),
/// `2026-11-28`, or `2026-11-28T15:04:05[.123]Z`.
pub fn parse(s: &str, now_ms: u64) -> anyhow::Result<u64> {
    let s = s.trim();
    if s == "now" {
        return Ok(now_ms);
    }
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Some(rel) = s.strip_prefix('-') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: u64 = n.parse().map_err(|_| anyhow!("bad relative time {s:?}"))?;
        let scale = match unit {
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => bail!("bad relative time {s:?}: use s, m, h or d"),
        };
        return Ok(now_ms.saturating_sub(n.saturating_mul(scale)));
    }
    let bad = || {
        anyhow!("bad time {s:?}: use RFC 3339 in UTC (2026-11-28T15:04:05Z), a date, ms since the epoch, or -2h")
    };
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let mut parts = date.splitn(3, '-').map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (y, m, d) = (
        parts.next().ok_or_else(bad)??,
        parts.next().ok_or_else(bad)??,
        parts.next().ok_or_else(bad)??,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut ms = days_from_civil(y, m, d) * 86_400_000;
    if let Some(t) = time {
        let (hms, frac) = t.split_once('.').unwrap_or((t, "0"));
        let mut hms = hms.splitn(3, ':').map(|p| p.parse::<i64>().map_err(|_| bad()));
        let (h, min, sec) = (
            hms.next().ok_or_else(bad)??,
            hms.next().ok_or_else(bad)??,
            hms.next().ok_or_else(bad)??,
        );
        if !(0..24).contains(&h) || !(0..60).contains(&min) || !(0..61).contains(&sec) {
            return Err(bad());
        }
        let frac: String = frac.chars().chain("000".chars()).take(3).collect();
        let milli: i64 = frac.parse().map_err(|_| bad())?;
        ms += ((h * 60 + min) * 60 + sec) * 1000 + milli;
    }
    u64::try_from(ms).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        use std::time::Duration;
        let (base, max) = (Duration::from_millis(250), Duration::from_secs(2));
        let pauses: Vec<u128> = (0..7).map(|r| backoff(r, base, max).as_millis()).collect();
        assert_eq!(pauses, [0, 250, 500, 1000, 2000, 2000, 2000]);
        assert_eq!(backoff(u32::MAX, base, max), max);
    }

    #[test]
    fn times_parse_and_print() {
        let t = parse("2026-11-28T15:04:05.123Z", 0).unwrap();
        assert_eq!(format_ms(t), "2026-11-28T15:04:05.123Z");
        assert_eq!(parse("1970-01-02", 0).unwrap(), 86_400_000);
        assert_eq!(parse("-2h", 10_000_000).unwrap(), 10_000_000 - 7_200_000);
        assert_eq!(parse("42", 0).unwrap(), 42);
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert!(parse("2026-13-01", 0).is_err());
        assert!(parse("yesterday", 0).unwrap_err().to_string().contains("RFC 3339"));
        // Leap day and year boundaries survive the round trip.
        for s in ["2024-02-29T23:59:59.999Z", "2000-03-01T00:00:00.000Z"] {
            assert_eq!(format_ms(parse(s, 0).unwrap()), s);
        }
    }
}
