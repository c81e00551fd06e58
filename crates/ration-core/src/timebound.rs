//! Bounded ledger time: what a leader may stamp into an entry.
//!
//! The ledger keeps `now = max(now, entry time)`, so a leader whose wall clock is
//! wrong could roll windows early (a fast clock) or freeze expiry (a clock set far
//! ahead, then corrected). [`TimeBound`] keeps a node's stamps close to ledger time
//! as it flows on the node's own *monotonic* clock:
//!
//! - every node observes the ledger time it applies, with the monotonic instant it
//!   saw it; its estimate of ledger time "now" is that plus the monotonic time since;
//! - when it starts leading a term, it fixes that estimate as its base, kept for the
//!   whole term (a moment of not leading inside the term does not reset it); each
//!   stamp is its wall clock clamped to `base + monotonic elapsed ± slack` (and
//!   never below the ledger's time). So one leader moves ledger time at most `slack`
//!   away from where monotonic time puts it, whatever its wall clock says, and
//!   ledger time keeps flowing even if its wall clock stands still or runs slow;
//! - a wall clock further than `tolerance` from the estimate is known to be wrong
//!   (or the whole cluster was down: see below) and is not used at all: the stamp is
//!   the estimate. So a clock stepped far ahead moves ledger time by nothing, and a
//!   series of leaders can move it ahead only as far as their own clocks, each
//!   within the tolerance, and by at most `slack` per term;
//! - a leader whose wall clock is off its estimate by more than `tolerance` asks the
//!   voters for their wall clocks: [`quorum_time`] is a time a majority of them have
//!   reached. Ledger time may jump forward to it ([`TimeBound::rebase`]): this is how
//!   ledger time catches up after the whole cluster was down. A leader whose own
//!   clock is off the quorum's by more than `tolerance` does not lead: it hands
//!   leadership over (the node does that; this module only measures).
//!
//! Pure and deterministic: the caller passes every clock reading in.

/// Clock readings are milliseconds: wall (since the Unix epoch) and monotonic (from
/// any origin fixed for the process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Base {
    term: u64,
    ledger_ms: u64,
    mono_ms: u64,
}

/// A node's view of ledger time, and the bound on what it may stamp as leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeBound {
    slack_ms: u64,
    tolerance_ms: u64,
    /// The largest ledger time seen, and the monotonic instant it was seen.
    seen: Option<(u64, u64)>,
    /// Fixed when this node starts stamping for a term; kept for that term.
    base: Option<Base>,
    /// Whether this node is stamping (leading) now: only then does its estimate
    /// come from `base`.
    stamping: bool,
}

impl TimeBound {
    pub fn new(slack_ms: u64, tolerance_ms: u64) -> Self {
        Self { slack_ms, tolerance_ms, seen: None, base: None, stamping: false }
    }

    /// Ledger time `ledger_ms` was applied here, as seen at monotonic `mono_ms`.
    pub fn observe(&mut self, ledger_ms: u64, mono_ms: u64) {
        if self.seen.is_none_or(|(seen, _)| ledger_ms > seen) {
            self.seen = Some((ledger_ms, mono_ms));
        }
    }

    /// Ledger time now, as this node's monotonic clock carries it on from the
    /// latest ledger time it saw (its leader base, if it is stamping).
    pub fn estimate(&self, mono_ms: u64) -> Option<u64> {
        let (ledger, at) = match self.base.filter(|_| self.stamping) {
            Some(b) => (b.ledger_ms, b.mono_ms),
            None => self.seen?,
        };
        Some(ledger.saturating_add(mono_ms.saturating_sub(at)))
    }

    /// The time stamp for an entry this node proposes now as leader of `term`,
    /// where `ledger_ms` is the ledger time it has applied. A ledger that never had
    /// a time (a new cluster) takes the wall clock as it is.
    pub fn stamp(&mut self, term: u64, wall_ms: u64, mono_ms: u64, ledger_ms: u64) -> u64 {
        self.observe(ledger_ms, mono_ms);
        if ledger_ms == 0 {
            self.base = Some(Base { term, ledger_ms: wall_ms, mono_ms });
            self.stamping = true;
            return wall_ms;
        }
        if self.base.is_none_or(|b| b.term != term) {
            self.stamping = false;
            let ledger = self.estimate(mono_ms).unwrap_or(ledger_ms).max(ledger_ms);
            self.base = Some(Base { term, ledger_ms: ledger, mono_ms });
        }
        self.stamping = true;
        let est = self.estimate(mono_ms).unwrap_or(ledger_ms);
        if wall_ms.abs_diff(est) > self.tolerance_ms {
            // A wall clock this far off is not evidence of anything: ledger time
            // flows with the monotonic clock until the voters' clocks say otherwise
            // (`rebase`) or this node hands leadership over.
            return est.max(ledger_ms);
        }
        let lo = est.saturating_sub(self.slack_ms);
        let hi = est.saturating_add(self.slack_ms);
        wall_ms.clamp(lo, hi).max(ledger_ms)
    }

    /// Stops stamping (not leading now). The term's base is kept: if this node
    /// stamps again in the same term (its view of its own leadership can lag the
    /// Raft core's), it continues from that base rather than from ledger time its
    /// own stamps may have moved ahead; a later term fixes a new base.
    pub fn step_down(&mut self) {
        self.stamping = false;
    }

    /// How far `wall_ms` is from this node's estimate of ledger time (positive: the
    /// wall clock is ahead). `None` before any ledger time was seen.
    pub fn skew_ms(&self, wall_ms: u64, mono_ms: u64) -> Option<i64> {
        let est = self.estimate(mono_ms)?;
        let diff = i128::from(wall_ms).saturating_sub(i128::from(est));
        Some(i64::try_from(diff).unwrap_or(if diff > 0 { i64::MAX } else { i64::MIN }))
    }

    /// Whether `skew_ms` is beyond the tolerance.
    pub fn disagrees(&self, skew_ms: i64) -> bool {
        skew_ms.unsigned_abs() > self.tolerance_ms
    }

    /// Lets ledger time jump forward to `quorum_ms` (see [`quorum_time`]) when that
    /// is ahead of this leader's estimate by more than the tolerance: the cluster
    /// was down, and a majority of clocks agree that time went on. Returns whether it
    /// moved. Never moves ledger time backwards.
    pub fn rebase(&mut self, quorum_ms: u64, mono_ms: u64) -> bool {
        let Some(est) = self.estimate(mono_ms) else { return false };
        let Some(base) = self.base.as_mut().filter(|_| self.stamping) else { return false };
        if quorum_ms <= est.saturating_add(self.tolerance_ms) {
            return false;
        }
        base.ledger_ms = quorum_ms;
        base.mono_ms = mono_ms;
        true
    }
}

/// A time a majority of `clocks` (one wall clock reading per voter, this node's
/// included; voters that did not answer are left out) have reached: the
/// `(voters / 2 + 1)`-th largest. `None` if fewer than a majority of `voters`
/// answered. A minority of clocks, however far ahead, cannot move it.
pub fn quorum_time(clocks: &[u64], voters: usize) -> Option<u64> {
    let majority = voters.saturating_div(2).saturating_add(1);
    if clocks.len() < majority {
        return None;
    }
    let mut sorted = clocks.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.get(majority.saturating_sub(1)).copied()
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const T: u64 = 1_764_340_245_123;
    const YEAR: u64 = 365 * 86_400_000;

    #[test]
    fn a_clock_far_ahead_moves_ledger_time_by_nothing() {
        for ahead in [30_000, YEAR] {
            let mut b = TimeBound::new(1_000, 5_000);
            // A follower saw ledger time T at monotonic 100.
            b.observe(T, 100);
            // Elected 2 s later, its wall clock `ahead` ms fast: beyond the
            // tolerance, so it is not used; the stamp is the estimate.
            let s = b.stamp(7, T + 2_000 + ahead, 2_100, T);
            assert_eq!(s, T + 2_000, "the estimate");
            // A minute on, ledger time still flows with the monotonic clock.
            let s = b.stamp(7, T + 62_000 + ahead, 62_100, s);
            assert_eq!(s, T + 62_000);
            assert!(b.disagrees(b.skew_ms(T + 62_000 + ahead, 62_100).unwrap()));
        }
    }

    #[test]
    fn a_clock_a_little_ahead_moves_ledger_time_by_the_slack_at_most() {
        let mut b = TimeBound::new(1_000, 5_000);
        b.observe(T, 100);
        // 3 s fast: within the tolerance, so followed up to the slack.
        assert_eq!(b.stamp(7, T + 2_000 + 3_000, 2_100, T), T + 3_000);
        assert_eq!(b.stamp(7, T + 62_000 + 3_000, 62_100, T + 3_000), T + 63_000);
        // 800 ms fast: followed exactly.
        let mut b = TimeBound::new(1_000, 5_000);
        b.observe(T, 100);
        assert_eq!(b.stamp(7, T + 2_800, 2_100, T), T + 2_800);
    }

    #[test]
    fn a_moment_of_not_leading_keeps_the_terms_base() {
        // Soak seed 1029938618064 (5 voters): a leader whose own view of its
        // leadership lagged its Raft core's stepped down for a moment inside its
        // term; fixing a new base then, from ledger time its own stamps had moved a
        // slack ahead, let one term move ledger time two slacks.
        let mut b = TimeBound::new(1_000, 5_000);
        b.observe(T, 0);
        assert_eq!(b.stamp(4, T + 4_000, 1_000, T), T + 2_000, "estimate + slack");
        b.step_down();
        b.observe(T + 2_000, 1_100);
        // Same term, 200 ms later: still one slack ahead of the term's base.
        assert_eq!(b.stamp(4, T + 4_200, 1_200, T + 2_000), T + 2_200);
        // A later term fixes its base from what was observed, so a clock within
        // the tolerance adds one more slack per term (the documented bound).
        b.step_down();
        assert_eq!(b.stamp(6, T + 4_300, 1_300, T + 2_200), T + 3_200);
    }

    #[test]
    fn a_slow_or_stopped_wall_clock_does_not_freeze_ledger_time() {
        let mut b = TimeBound::new(1_000, 5_000);
        b.observe(T, 0);
        // A minute slow: beyond the tolerance, so not used at all.
        assert_eq!(b.stamp(1, T - 60_000, 10_000, T), T + 10_000);
        assert_eq!(b.stamp(1, T - 60_000, 20_000, T + 10_000), T + 20_000);
        // Two seconds slow: followed down to the slack.
        let mut b = TimeBound::new(1_000, 5_000);
        b.observe(T, 0);
        assert_eq!(b.stamp(1, T + 8_000, 10_000, T), T + 9_000);
    }

    #[test]
    fn a_good_clock_is_followed_and_ledger_time_never_goes_back() {
        let mut b = TimeBound::new(1_000, 5_000);
        b.observe(T, 0);
        assert_eq!(b.stamp(1, T + 500, 700, T), T + 500);
        assert_eq!(b.stamp(1, T + 1_400, 1_300, T + 500), T + 1_400);
        // The wall clock steps back: the stamp does not go below ledger time.
        assert_eq!(b.stamp(1, T + 100, 1_400, T + 1_400), T + 1_400);
    }

    #[test]
    fn each_term_fixes_a_new_base_from_what_was_observed() {
        let mut b = TimeBound::new(1_000, 5_000);
        b.observe(T, 0);
        assert_eq!(b.stamp(1, T + 3_000, 0, T), T + 1_000);
        b.step_down();
        // Another leader's entries carried ledger time to T + 5 s, seen at mono 5 s.
        b.observe(T + 5_000, 5_000);
        // Elected again at mono 8 s: the base is T + 8 s, so one more slack at most.
        assert_eq!(b.stamp(2, T + 12_000, 8_000, T + 5_000), T + 9_000);
    }

    #[test]
    fn a_new_ledger_takes_the_wall_clock() {
        let mut b = TimeBound::new(1_000, 5_000);
        assert_eq!(b.stamp(1, T, 0, 0), T);
        assert_eq!(b.stamp(1, T + 10, 10, T), T + 10);
    }

    #[test]
    fn after_a_cluster_wide_outage_ledger_time_catches_up_to_the_quorum() {
        let mut b = TimeBound::new(1_000, 5_000);
        // Restarted: the log says T; the wall clocks say a day later.
        let day = 86_400_000;
        b.observe(T, 0);
        assert_eq!(b.stamp(3, T + day, 0, T), T, "a clock this far off is not used");
        assert!(b.disagrees(b.skew_ms(T + day, 0).unwrap()));
        // Two of three voters agree on T + day; one is a year fast.
        let q = quorum_time(&[T + day, T + day + YEAR, T + day - 20], 3).unwrap();
        assert_eq!(q, T + day);
        assert!(b.rebase(q, 100));
        assert_eq!(b.stamp(3, T + day + 100, 100, T), T + day + 100);
        assert!(!b.disagrees(b.skew_ms(T + day + 100, 100).unwrap()));
        // A quorum within the tolerance moves nothing.
        assert!(!b.rebase(T + day + 2_000, 100));
    }

    #[test]
    fn the_quorum_time_ignores_a_minority_and_needs_a_majority() {
        assert_eq!(quorum_time(&[10, 1_000_000, 12], 3), Some(12));
        assert_eq!(quorum_time(&[10, 12], 3), Some(10));
        assert_eq!(quorum_time(&[10], 3), None);
        assert_eq!(quorum_time(&[5, 9, 7, 1_000, 2_000], 5), Some(9));
        assert_eq!(quorum_time(&[42], 1), Some(42));
    }
}
