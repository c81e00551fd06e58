//! Calendar windows: minute, hour, day, week (ISO, from Monday), month, lifetime.
//!
//! Windows are computed from ledger time alone (milliseconds since the Unix epoch,
//! UTC), shifted by the budget's fixed offset. Pure integer arithmetic: no time zone
//! database, no clock.

// Calendar arithmetic works on times clamped to MAX_TIME_MS (2^62) and offsets
// within a day, so no i64 expression here can overflow.
#![allow(clippy::arithmetic_side_effects)]

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;

/// The end of ledger time: 2^62 ms after the epoch (about the year 146 million).
/// Entry times beyond it are clamped. Leases expire by it at the latest, and the
/// window holding it never closes (it ends at `MAX_TIME_MS + 1`), so windows and
/// expiry work at every time a ledger can reach.
pub const MAX_TIME_MS: u64 = 1 << 62;
/// Largest fixed offset from UTC, in minutes (UTC+14:00 / UTC-14:00).
pub const MAX_OFFSET_MINUTES: i16 = 14 * 60;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// The length of a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Period {
    Minute,
    Hour,
    Day,
    /// An ISO week, Monday 00:00 to Monday 00:00.
    Week,
    Month,
    /// Never rolls over.
    Lifetime,
    /// Units in flight: a limit on how many units live leases hold at once. It
    /// never rolls over and counts nothing as consumed: what a lease held comes
    /// back when it is released, whatever it reports, or when it expires (a
    /// crashed gateway's units come back then). For calls in flight, one lease per
    /// call (`Sdk::slot`).
    Concurrent,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Lifetime => "lifetime",
            Period::Concurrent => "concurrent",
        }
    }
}

/// A window kind: a period, in local time at a fixed offset from UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    period: Period,
    offset_minutes: i16,
}

impl Window {
    /// A UTC window.
    pub const fn utc(period: Period) -> Self {
        Self { period, offset_minutes: 0 }
    }

    /// A window at a fixed offset from UTC (`+330` is UTC+05:30).
    pub fn with_offset(period: Period, offset_minutes: i16) -> Result<Self, LedgerError> {
        if !(-MAX_OFFSET_MINUTES..=MAX_OFFSET_MINUTES).contains(&offset_minutes) {
            return Err(LedgerError::InvalidArgument {
                field: "window.offset_minutes".into(),
                reason: format!(
                    "{offset_minutes} is outside -{MAX_OFFSET_MINUTES}..={MAX_OFFSET_MINUTES}"
                ),
            });
        }
        if matches!(period, Period::Lifetime | Period::Concurrent) && offset_minutes != 0 {
            return Err(LedgerError::InvalidArgument {
                field: "window.offset_minutes".into(),
                reason: format!("a {} window takes no offset", period.name()),
            });
        }
        Ok(Self { period, offset_minutes })
    }

    pub const fn period(self) -> Period {
        self.period
    }

    pub const fn offset_minutes(self) -> i16 {
        self.offset_minutes
    }

    /// The window instance holding `t_ms`: `[start, end)`. A lifetime window is
    /// `[0, u64::MAX)`.
    pub fn bounds(self, t_ms: u64) -> (u64, u64) {
        if matches!(self.period, Period::Lifetime | Period::Concurrent) {
            return (0, u64::MAX);
        }
        let offset_ms = i64::from(self.offset_minutes) * MINUTE_MS;
        // t <= MAX_TIME_MS = 2^62, so no i64 arithmetic below can overflow.
        let local = clamp_time(t_ms) as i64 + offset_ms;
        let (start, end) = match self.period {
            Period::Minute => floor_to(local, MINUTE_MS),
            Period::Hour => floor_to(local, HOUR_MS),
            Period::Day => floor_to(local, DAY_MS),
            Period::Week => {
                let day = local.div_euclid(DAY_MS);
                // 1970-01-01 was a Thursday: Monday-based weekday is (day + 3) mod 7.
                let monday = day - (day + 3).rem_euclid(7);
                (monday * DAY_MS, (monday + 7) * DAY_MS)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(local.div_euclid(DAY_MS));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1) * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS)
            }
            Period::Lifetime | Period::Concurrent => unreachable!("handled above"),
        };
        (to_utc(start - offset_ms).min(MAX_TIME_MS), to_utc(end - offset_ms).min(MAX_TIME_MS + 1))
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.period.name())?;
        if self.offset_minutes != 0 {
            let sign = if self.offset_minutes < 0 { '-' } else { '+' };
            let m = self.offset_minutes.unsigned_abs();
            write!(f, "{sign}{:02}:{:02}", m / 60, m % 60)?;
        }
        Ok(())
    }
}

/// Ledger time is clamped into `0..=MAX_TIME_MS`.
pub fn clamp_time(t_ms: u64) -> u64 {
    t_ms.min(MAX_TIME_MS)
}

fn floor_to(t: i64, len: i64) -> (i64, i64) {
    let start = t.div_euclid(len) * len;
    (start, start + len)
}

fn to_utc(t: i64) -> u64 {
    u64::try_from(t).unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01: (year, month 1-12, day 1-31).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const T: u64 = 1_764_340_245_123; // 2025-11-28T14:30:45.123Z, a Friday

    #[test]
    fn utc_windows() {
        assert_eq!(Window::utc(Period::Minute).bounds(T), (1_764_340_200_000, 1_764_340_260_000));
        assert_eq!(Window::utc(Period::Hour).bounds(T), (1_764_338_400_000, 1_764_342_000_000));
        assert_eq!(Window::utc(Period::Day).bounds(T), (1_764_288_000_000, 1_764_374_400_000));
        // Monday 2025-11-24 to Monday 2025-12-01.
        assert_eq!(Window::utc(Period::Week).bounds(T), (1_763_942_400_000, 1_764_547_200_000));
        // 2025-11-01 to 2025-12-01.
        assert_eq!(Window::utc(Period::Month).bounds(T), (1_761_955_200_000, 1_764_547_200_000));
        assert_eq!(Window::utc(Period::Lifetime).bounds(T), (0, u64::MAX));
    }

    #[test]
    fn offset_windows() {
        // UTC+05:30: the local day 2025-11-28 runs from 2025-11-27T18:30Z.
        let ist = Window::with_offset(Period::Day, 330).unwrap();
        assert_eq!(ist.bounds(T), (1_764_268_200_000, 1_764_354_600_000));
        // Hours at a half-hour offset start at :30 UTC.
        let h = Window::with_offset(Period::Hour, 330).unwrap();
        assert_eq!(h.bounds(T), (1_764_340_200_000, 1_764_343_800_000));
        // UTC-08:00 month: local 2025-11-28 06:30, so November in local time.
        let pst = Window::with_offset(Period::Month, -480).unwrap();
        assert_eq!(pst.bounds(T), (1_761_984_000_000, 1_764_576_000_000));
        assert!(Window::with_offset(Period::Day, 841).is_err());
        assert!(Window::with_offset(Period::Lifetime, 60).is_err());
        assert_eq!(ist.to_string(), "day+05:30");
        assert_eq!(pst.to_string(), "month-08:00");
    }

    #[test]
    fn leap_february_and_year_end() {
        let feb29 = 1_709_208_000_000; // 2024-02-29T12:00Z
        let (s, e) = Window::utc(Period::Month).bounds(feb29);
        assert_eq!((s, e), (1_706_745_600_000, 1_709_251_200_000)); // Feb 1 .. Mar 1
        let dec31 = 1_735_646_400_000; // 2024-12-31T12:00Z
        let (_, e) = Window::utc(Period::Month).bounds(dec31);
        assert_eq!(e, 1_735_689_600_000); // 2025-01-01
    }

    #[test]
    fn near_the_epoch_and_the_end_of_time() {
        let w = Window::with_offset(Period::Day, 600).unwrap();
        let (s, e) = w.bounds(0);
        assert!(s <= e);
        for period in [Period::Minute, Period::Hour, Period::Day, Period::Week, Period::Month] {
            let (s, e) = Window::utc(period).bounds(u64::MAX);
            assert!(s <= MAX_TIME_MS && e == MAX_TIME_MS + 1, "{period:?}: {s} {e}");
            let (s, e) = Window::utc(period).bounds(MAX_TIME_MS - 1);
            assert!(s < MAX_TIME_MS && e >= MAX_TIME_MS);
        }
    }

    #[test]
    fn civil_round_trip() {
        for z in [-800_000i64, -1, 0, 1, 19_000, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    fn any_window() -> impl Strategy<Value = Window> {
        (
            prop_oneof![
                Just(Period::Minute),
                Just(Period::Hour),
                Just(Period::Day),
                Just(Period::Week),
                Just(Period::Month)
            ],
            -MAX_OFFSET_MINUTES..=MAX_OFFSET_MINUTES,
        )
            .prop_map(|(p, o)| Window::with_offset(p, o).unwrap())
    }

    proptest! {
        #[test]
        fn bounds_hold_the_instant_and_tile_time(w in any_window(), t in 100_000_000u64..MAX_TIME_MS - 100_000_000_000) {
            let (s, e) = w.bounds(t);
            prop_assert!(s <= t && t < e);
            // The next window starts where this one ends; the previous ends where it starts.
            prop_assert_eq!(w.bounds(e).0, e);
            prop_assert_eq!(w.bounds(s - 1).1, s);
            prop_assert_eq!(w.bounds(s), (s, e));
        }
    }
}
