//! Local admission: spending leased allowance with no RPC.
//!
//! An [`Allowance`] is what this gateway holds of one (budget, unit): a few lease
//! *slots*, each with the units left and a local deadline. Deciding a call is a
//! few atomic operations on the hot path, safe from any number of threads:
//!
//! - a slot is spendable while the coarse clock is before its deadline, which the
//!   refill logic sets to `sent_at + ttl - margin`, measured on this process's
//!   monotonic clock from when the acquire was *sent* — so it is always earlier than
//!   the ledger's own expiry, whatever the clocks and the network did;
//! - spending takes units with compare-and-swap, from one slot or across slots, and
//!   gives back what it took if the whole amount is not there (all or nothing);
//!   [`Reservation`] does the same across several allowances;
//! - only the refill side installs or retires leases; spenders only take and give
//!   back.
//!
//! A spender that checked a deadline a few nanoseconds before it passed can still
//! take units: the safety margin (hundreds of milliseconds) covers that window, and
//! the coarse clock's lag (about a millisecond).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Lease slots per allowance: the lease being spent, the next one fetched before it
/// runs out, and room for a fail-policy allowance.
pub const SLOTS: usize = 4;

/// Milliseconds on this process's monotonic clock, read cheaply on the hot path.
pub trait LocalClock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// How often the background thread of [`CoarseClock::start_ticking`] advances the clock.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(1);

/// A clock a background task advances (see [`CoarseClock::tick`]): one relaxed load
/// per read instead of a system call.
#[derive(Debug)]
pub struct CoarseClock {
    origin: Instant,
    now_ms: AtomicU64,
}

impl CoarseClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { origin: Instant::now(), now_ms: AtomicU64::new(0) })
    }

    /// Ticks the clock every [`TICK`] (a millisecond) on a background thread, for as long as the
    /// clock is in use.
    pub fn start_ticking(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        std::thread::spawn(move || {
            while let Some(clock) = weak.upgrade() {
                clock.tick();
                drop(clock);
                std::thread::sleep(TICK);
            }
        });
    }

    /// Moves the clock to `ms` (never backwards), for a caller that keeps time
    /// itself, such as a simulation. Use instead of [`CoarseClock::start_ticking`].
    pub fn set_ms(&self, ms: u64) {
        self.now_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Brings the clock up to date; call it every millisecond or so.
    pub fn tick(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

impl LocalClock for CoarseClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }
}

impl LocalClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Stripes per allowance: each thread spends from its own cache line, so threads
/// deciding at once do not bounce one counter between cores.
pub const STRIPES: usize = 4;

/// Per-slot data that changes only when a lease is installed or retired: read-mostly,
/// so sharing its cache line costs spenders nothing.
#[derive(Debug, Default)]
struct SlotMeta {
    /// Local time (ms) from which nothing may be spent; 0 = empty slot.
    deadline_ms: AtomicU64,
    /// Local time (ms) before which nothing may be spent (a lease for the next
    /// window, not open yet); 0 = open.
    opens_ms: AtomicU64,
    /// Changes each time the slot is filled or retired, so a late give-back to a
    /// reused slot is dropped instead of crediting the wrong lease.
    generation: AtomicU64,
}

/// One thread-group's share of every slot's units, on its own cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    remaining: [AtomicU64; SLOTS],
    /// Units taken from this stripe's share of each slot by reservations not yet
    /// settled: a lease run dry by reservations is not spent, and must not be
    /// retired (which would count the reserved units as spent) until they settle.
    reserved: [AtomicU64; SLOTS],
}

thread_local! {
    static MY_STRIPE: std::cell::Cell<usize> = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::cell::Cell::new((NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES as u64) as usize)
    };
}

fn my_stripe() -> usize {
    MY_STRIPE.with(std::cell::Cell::get)
}

/// Makes this thread spend from stripe `stripe` (modulo the stripe count) from now
/// on. Threads get stripes in turn as they first spend, so which one a thread gets
/// depends on what ran before it in the process; a deterministic simulation pins
/// its thread's stripe so that a seed replays the same in any process.
pub fn pin_thread_stripe(stripe: usize) {
    MY_STRIPE.with(|s| s.set(stripe % STRIPES));
}

/// One part of a take: the cell (slot * STRIPES + stripe), the slot's lease
/// generation and the units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Part {
    cell: u8,
    generation: u64,
    units: u64,
}

/// Where units were taken from, to give them back exactly: per part, the cell
/// (slot and stripe), the slot's lease generation and the units. The first part
/// is inline (a take from this thread's own stripe has just one); a take gathered
/// across stripes keeps the rest in a `Vec`. Small, because reservations hold it
/// inline and are moved by value (56 bytes; the 16 parts inline were 280, and
/// copying them was a sixth of a two-limit reservation's time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    first: Option<Part>,
    more: Vec<Part>,
}

impl Taken {
    /// Total units taken.
    pub fn units(&self) -> u64 {
        self.parts().fold(0, |sum, p| sum.saturating_add(p.3))
    }

    /// Forgets every part (keeping the `Vec`'s room).
    fn clear(&mut self) {
        self.first = None;
        self.more.clear();
    }

    fn push(&mut self, (slot, stripe, generation, units): (u8, u8, u64, u64)) {
        let part = Part { cell: slot * STRIPES as u8 + stripe, generation, units };
        match self.first {
            None => self.first = Some(part),
            Some(_) => self.more.push(part),
        }
    }

    /// The parts, as (slot, stripe, generation, units).
    fn parts(&self) -> impl DoubleEndedIterator<Item = (u8, u8, u64, u64)> + '_ {
        self.first
            .iter()
            .chain(&self.more)
            .map(|p| (p.cell / STRIPES as u8, p.cell % STRIPES as u8, p.generation, p.units))
    }
}

/// What a slot holds, for the refill side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotState {
    pub slot: usize,
    pub generation: u64,
    pub remaining: u64,
    /// Units reservations hold from it, not settled yet.
    pub reserved: u64,
    pub deadline_ms: u64,
    pub opens_ms: u64,
}

/// One (budget, unit) on this gateway.
#[derive(Debug, Default)]
pub struct Allowance {
    meta: [SlotMeta; SLOTS],
    stripes: [Stripe; STRIPES],
    /// Units asked for and refused: demand the refill side must also cover.
    denied_units: AtomicU64,
    /// Overrun units not yet handed to the refill side (see [`Reservation::settle`]).
    overruns_pending: AtomicU64,
    /// Overrun units ever recorded here.
    overruns_total: AtomicU64,
}

impl Allowance {
    pub fn new() -> Self {
        Self::default()
    }

    fn live(&self, slot: usize, now_ms: u64) -> bool {
        let meta = &self.meta[slot];
        meta.deadline_ms.load(Ordering::Acquire) > now_ms
            && meta.opens_ms.load(Ordering::Acquire) <= now_ms
    }

    /// Spends `amount` units for good (nothing to give back later). The hottest
    /// path: a deadline check and one compare-and-swap on this thread's stripe.
    #[inline]
    pub fn try_spend(&self, amount: u64, now_ms: u64) -> bool {
        let stripe = &self.stripes[my_stripe()];
        for slot in 0..SLOTS {
            if self.live(slot, now_ms)
                && stripe.remaining[slot]
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(amount))
                    .is_ok()
            {
                return true;
            }
        }
        amount == 0 || self.take_across(amount, now_ms, &mut Taken::default())
    }

    /// Spends up to `amount` for good from live slots (as much as they hold) and
    /// returns what it took. For use beyond a reservation: there is nothing to give
    /// back, so a partial take is fine.
    pub fn take_up_to(&self, amount: u64, now_ms: u64) -> u64 {
        self.gather(amount, now_ms, |_| {})
    }

    /// Takes up to `amount` from every stripe of every live slot, telling `took`
    /// each (slot, stripe, generation, units) taken; returns the total.
    fn gather(&self, amount: u64, now_ms: u64, mut took: impl FnMut((u8, u8, u64, u64))) -> u64 {
        let mut need = amount;
        for slot in 0..SLOTS {
            if need == 0 {
                break;
            }
            if !self.live(slot, now_ms) {
                continue;
            }
            let generation = self.meta[slot].generation.load(Ordering::Acquire);
            for (k, stripe) in self.stripes.iter().enumerate() {
                if need == 0 {
                    break;
                }
                let mut got = 0;
                let _ =
                    stripe.remaining[slot].fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                        got = r.min(need);
                        (got > 0).then(|| r - got)
                    });
                if got > 0 {
                    took((slot as u8, k as u8, generation, got));
                    need -= got;
                }
            }
        }
        amount - need
    }

    /// Records `units` spent beyond anything leased: the refill side reports them to
    /// the ledger as an overrun.
    pub fn record_overrun(&self, units: u64) {
        if units > 0 {
            self.overruns_pending.fetch_add(units, Ordering::AcqRel);
            self.overruns_total.fetch_add(units, Ordering::Relaxed);
        }
    }

    /// Puts back overrun units the ledger could not take yet (a per-principal limit
    /// refused the report): the next round sends them again, with what came since.
    pub fn return_overruns(&self, units: u64) {
        if units > 0 {
            self.overruns_pending.fetch_add(units, Ordering::AcqRel);
        }
    }

    /// Takes the overrun units recorded since the last call (for the refill side).
    pub fn take_overruns(&self) -> u64 {
        self.overruns_pending.swap(0, Ordering::AcqRel)
    }

    /// Overrun units ever recorded on this allowance.
    pub fn overruns_total(&self) -> u64 {
        self.overruns_total.load(Ordering::Relaxed)
    }

    /// Units refused so far (a running total), so refill can size for unmet demand.
    pub fn denied_units(&self) -> u64 {
        self.denied_units.load(Ordering::Relaxed)
    }

    /// Takes `amount` units if this allowance holds them in live slots, all or
    /// nothing, and says where from so they can be given back.
    pub fn try_take(&self, amount: u64, now_ms: u64) -> Option<Taken> {
        let mut t = Taken::default();
        self.try_take_into(amount, now_ms, &mut t).then_some(t)
    }

    /// [`Allowance::try_take`] into `t` (emptied first), so a caller that keeps
    /// the parts in place copies nothing: true if all of `amount` was taken.
    #[inline]
    pub fn try_take_into(&self, amount: u64, now_ms: u64, t: &mut Taken) -> bool {
        t.clear();
        if amount == 0 {
            return true;
        }
        let k = my_stripe();
        for slot in 0..SLOTS {
            if !self.live(slot, now_ms) {
                continue;
            }
            let generation = self.meta[slot].generation.load(Ordering::Acquire);
            let cell = &self.stripes[k].remaining[slot];
            if cell
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(amount))
                .is_ok()
            {
                t.push((slot as u8, k as u8, generation, amount));
                // Held as reserved until it settles (as `hold` does, for one part).
                self.stripes[k].reserved[slot].fetch_add(amount, Ordering::AcqRel);
                return true;
            }
        }
        let took = self.take_across(amount, now_ms, t);
        if took {
            self.hold(t);
        }
        took
    }

    /// Counts what `t` took as reserved (until [`Allowance::unhold`]).
    fn hold(&self, t: &Taken) {
        for (slot, stripe, _, units) in t.parts() {
            self.stripes[stripe as usize].reserved[slot as usize]
                .fetch_add(units, Ordering::AcqRel);
        }
    }

    /// Ends reservation `t`: gives `units` of it back (last parts first, as
    /// [`Allowance::give_back`]) and stops counting all of it as reserved, in
    /// slots still holding the same lease. One pass, one generation check a part.
    pub(crate) fn release(&self, t: &Taken, units: u64) {
        let mut left = units.min(t.units());
        for (slot, stripe, generation, got) in t.parts().rev() {
            let back = got.min(left);
            left -= back;
            if self.meta[slot as usize].generation.load(Ordering::Acquire) != generation {
                continue;
            }
            let s = &self.stripes[stripe as usize];
            if back > 0 {
                s.remaining[slot as usize].fetch_add(back, Ordering::AcqRel);
            }
            // Wrapping: a release racing a retire and reinstall may subtract from a
            // counter reset to 0; `slots` reads the sum as signed and clamps at 0.
            s.reserved[slot as usize].fetch_sub(got, Ordering::AcqRel);
        }
    }

    /// Slow path: gather `amount` from every stripe of every live slot into `t`, or
    /// give it all back.
    fn take_across(&self, amount: u64, now_ms: u64, t: &mut Taken) -> bool {
        // Refuse without touching anything when the units are plainly not there: a
        // partial take that must be given back could race a retire and be lost.
        if self.available(now_ms) < amount {
            self.denied_units.fetch_add(amount, Ordering::Relaxed);
            return false;
        }
        let need = amount - self.gather(amount, now_ms, |part| t.push(part));
        if need == 0 {
            true
        } else {
            self.give_back(t, t.units());
            t.clear();
            self.denied_units.fetch_add(amount, Ordering::Relaxed);
            false
        }
    }

    /// Returns up to `units` of what `taken` took, to the stripes it came from (those
    /// still holding the same lease), last first.
    pub fn give_back(&self, taken: &Taken, units: u64) {
        let mut left = units.min(taken.units());
        for (slot, stripe, generation, got) in taken.parts().rev() {
            if left == 0 {
                break;
            }
            let back = got.min(left);
            left -= back;
            // A reused slot holds another lease: the units went with the old one
            // (counted as spent there), and are never credited to the new one.
            if self.meta[slot as usize].generation.load(Ordering::Acquire) == generation {
                self.stripes[stripe as usize].remaining[slot as usize]
                    .fetch_add(back, Ordering::AcqRel);
            }
        }
    }

    fn slot_units(&self, slot: usize) -> u64 {
        self.stripes.iter().map(|s| s.remaining[slot].load(Ordering::Acquire)).sum()
    }

    /// Units spendable now.
    pub fn available(&self, now_ms: u64) -> u64 {
        (0..SLOTS).filter(|&i| self.live(i, now_ms)).map(|i| self.slot_units(i)).sum()
    }

    /// Installs a lease of `units` spendable until `deadline_ms` in an empty slot
    /// (never used, or retired), split over the stripes. Returns the slot and
    /// generation, or `None` if every slot holds a lease. A slot whose lease has
    /// passed its deadline but was not retired yet is not reused: its leftover must
    /// be counted when it is retired.
    pub fn install(&self, units: u64, deadline_ms: u64) -> Option<SlotState> {
        self.install_from(units, 0, deadline_ms)
    }

    /// [`Allowance::install`] for a lease spendable only from local time `opens_ms`
    /// (0: at once).
    pub fn install_from(&self, units: u64, opens_ms: u64, deadline_ms: u64) -> Option<SlotState> {
        let slot = (0..SLOTS).find(|&i| self.meta[i].deadline_ms.load(Ordering::Acquire) == 0)?;
        let meta = &self.meta[slot];
        // Close the slot first so no spender sees new units under the old deadline,
        // then fill it, then open it.
        meta.deadline_ms.store(0, Ordering::Release);
        let generation = meta.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let share = units / STRIPES as u64;
        for (k, stripe) in self.stripes.iter().enumerate() {
            let extra = if k == 0 { units % STRIPES as u64 } else { 0 };
            stripe.remaining[slot].store(share + extra, Ordering::Release);
            stripe.reserved[slot].store(0, Ordering::Release);
        }
        meta.opens_ms.store(opens_ms, Ordering::Release);
        meta.deadline_ms.store(deadline_ms, Ordering::Release);
        Some(SlotState { slot, generation, remaining: units, reserved: 0, deadline_ms, opens_ms })
    }

    /// Closes a slot (its lease is being released or has expired locally) and returns
    /// the units it still held, if it still holds lease `generation`.
    pub fn retire(&self, slot: usize, generation: u64) -> Option<u64> {
        let meta = self.meta.get(slot)?;
        if meta.generation.load(Ordering::Acquire) != generation {
            return None;
        }
        meta.deadline_ms.store(0, Ordering::Release);
        // Bump the generation so late give-backs are dropped, then empty it.
        meta.generation.fetch_add(1, Ordering::AcqRel);
        for s in &self.stripes {
            s.reserved[slot].store(0, Ordering::Release);
        }
        Some(self.stripes.iter().map(|s| s.remaining[slot].swap(0, Ordering::AcqRel)).sum())
    }

    /// What every slot holds, for refill and reporting.
    pub fn slots(&self) -> [SlotState; SLOTS] {
        std::array::from_fn(|i| SlotState {
            slot: i,
            generation: self.meta[i].generation.load(Ordering::Acquire),
            remaining: self.slot_units(i),
            reserved: u64::try_from(
                self.stripes
                    .iter()
                    .map(|s| s.reserved[i].load(Ordering::Acquire) as i64)
                    .fold(0i64, i64::wrapping_add),
            )
            .unwrap_or(0),
            deadline_ms: self.meta[i].deadline_ms.load(Ordering::Acquire),
            opens_ms: self.meta[i].opens_ms.load(Ordering::Acquire),
        })
    }
}

/// A reservation for one call across one or more allowances. [`Reservation::settle`]
/// keeps what the call really used and gives the rest back at once; dropping it
/// unsettled gives everything back.
pub struct Reservation {
    parts: Vec<(Arc<Allowance>, Taken)>,
    settled: bool,
    /// The clock settling reads to take use beyond the reservation from live
    /// leases; without one, all of it is an overrun.
    clock: Option<Arc<dyn LocalClock>>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("parts", &self.parts)
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// Reserves `amount` of each allowance, all or nothing.
    pub fn reserve(wants: &[(Arc<Allowance>, u64)], now_ms: u64) -> Option<Self> {
        let mut parts = Vec::with_capacity(wants.len());
        for (allowance, amount) in wants {
            match allowance.try_take(*amount, now_ms) {
                Some(t) => parts.push((allowance.clone(), t)),
                None => {
                    drop(Self { parts, settled: false, clock: None });
                    return None;
                }
            }
        }
        Some(Self { parts, settled: false, clock: None })
    }

    /// Settling takes use beyond the reservation from leases live on `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn LocalClock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Units reserved from each allowance, in order.
    pub fn reserved(&self) -> Vec<u64> {
        self.parts.iter().map(|(_, t)| t.units()).collect()
    }

    /// Keeps `used[i]` of the i-th allowance's reservation and returns the rest;
    /// returns what was given back. A call that used more than was reserved (a price
    /// known only afterwards) already happened: the excess is taken from the
    /// allowance's live leases as far as they hold it, and the rest is recorded as
    /// an overrun ([`Allowance::take_overruns`]), which the SDK reports to the
    /// ledger. Nothing used is ever left out of the ledger.
    pub fn settle(mut self, used: &[u64]) -> Vec<u64> {
        self.settled = true;
        let now = self.clock.as_ref().map(|c| c.now_ms());
        self.parts
            .iter()
            .enumerate()
            .map(|(i, (a, t))| {
                let (back, over) = a.settle(t, used.get(i).copied().unwrap_or(0), || now);
                if over > 0 {
                    metrics::counter!(crate::counters::OVERRUN_UNITS).increment(over);
                }
                back
            })
            .collect()
    }
}

impl Allowance {
    /// Settles what `t` took: keeps `used` of it and gives the rest back. Use
    /// beyond it already happened: it is taken from the leases live at `now()` (if
    /// there is a clock) as far as they hold it, and the rest recorded as an
    /// overrun ([`Allowance::take_overruns`]). Returns (given back, overrun).
    pub(crate) fn settle(
        &self,
        t: &Taken,
        used: u64,
        now: impl FnOnce() -> Option<u64>,
    ) -> (u64, u64) {
        let reserved = t.units();
        let back = reserved.saturating_sub(used);
        self.release(t, back);
        let excess = used.saturating_sub(reserved);
        if excess == 0 {
            return (back, 0);
        }
        let taken = now().map_or(0, |now| self.take_up_to(excess, now));
        let over = excess - taken;
        if over > 0 {
            self.record_overrun(over);
        }
        (back, over)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            for (a, t) in &self.parts {
                a.release(t, t.units());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_lease(units: u64, deadline: u64) -> Allowance {
        let a = Allowance::new();
        a.install(units, deadline).unwrap();
        a
    }

    #[test]
    fn spends_until_empty_then_refuses() {
        let a = with_lease(10, 1000);
        assert!(a.try_take(4, 1).is_some());
        assert!(a.try_take(6, 1).is_some());
        assert!(a.try_take(1, 1).is_none());
        assert_eq!(a.available(1), 0);
    }

    #[test]
    fn nothing_is_spent_at_or_after_the_local_deadline() {
        let a = with_lease(10, 1000);
        assert!(a.try_take(1, 999).is_some());
        assert!(a.try_take(1, 1000).is_none());
        assert_eq!(a.available(1000), 0);
    }

    #[test]
    fn nothing_is_spent_before_a_slot_opens() {
        let a = Allowance::new();
        a.install_from(10, 500, 1_000).unwrap();
        assert!(!a.try_spend(1, 499));
        assert_eq!(a.available(499), 0);
        assert_eq!(a.take_up_to(5, 499), 0);
        assert!(a.try_spend(1, 500));
        assert_eq!(a.available(999), 9);
        assert!(!a.try_spend(1, 1_000));
    }

    #[test]
    fn spends_across_slots_all_or_nothing() {
        let a = with_lease(5, 1000);
        a.install(5, 2000).unwrap();
        let t = a.try_take(8, 1).unwrap();
        assert_eq!(t.units(), 8);
        assert_eq!(a.available(1), 2);
        assert!(a.try_take(3, 1).is_none());
        assert_eq!(a.available(1), 2, "a refused take gives back what it gathered");
        a.give_back(&t, 8);
        assert_eq!(a.available(1), 10);
    }

    #[test]
    fn give_back_never_credits_a_new_lease() {
        let a = with_lease(10, 1000);
        let t = a.try_take(10, 1).unwrap();
        let st = a.slots()[0];
        assert_eq!(a.retire(st.slot, st.generation), Some(0));
        a.install(3, 2000).unwrap();
        a.give_back(&t, 10);
        assert_eq!(a.available(1), 3);
    }

    #[test]
    fn a_slot_run_dry_by_reservations_shows_them_until_they_settle() {
        let a = with_lease(100, 1_000);
        let clock: Arc<dyn LocalClock> = Arc::new(ManualClock::default());
        let wants = [(Arc::new(a), 60)];
        let r1 = Reservation::reserve(&wants, 0).unwrap().with_clock(clock.clone());
        let r2 = Reservation::reserve(&[(wants[0].0.clone(), 40)], 0).unwrap();
        let a = &wants[0].0;
        // Dry, but not spent: 100 reserved.
        assert_eq!((a.slots()[0].remaining, a.slots()[0].reserved), (0, 100));
        r1.settle(&[10]);
        assert_eq!((a.slots()[0].remaining, a.slots()[0].reserved), (50, 40));
        drop(r2);
        assert_eq!((a.slots()[0].remaining, a.slots()[0].reserved), (90, 0));
        // Spending for good reserves nothing.
        assert!(a.try_spend(5, 0));
        assert_eq!(a.slots()[0].reserved, 0);
        // Retiring forgets reservations: a late settle credits nothing.
        let r3 = Reservation::reserve(&[(a.clone(), 85)], 0).unwrap();
        let generation = a.slots()[0].generation;
        assert_eq!(a.retire(0, generation), Some(0));
        assert_eq!(a.slots()[0].reserved, 0);
        r3.settle(&[0]);
        assert_eq!((a.slots()[0].remaining, a.slots()[0].reserved), (0, 0));
    }

    #[test]
    fn install_needs_a_free_slot() {
        let a = Allowance::new();
        for _ in 0..SLOTS {
            assert!(a.install(1, 1000).is_some());
        }
        assert_eq!(a.available(1), SLOTS as u64);
        assert!(a.install(1, 1000).is_none());
        assert_eq!(a.available(1000), 0, "expired");
        assert!(a.install(1, 3000).is_none(), "an expired slot is not reused before it is retired");
        let st = a.slots()[2];
        assert_eq!(a.retire(st.slot, st.generation), Some(1), "its leftover is counted");
        assert_eq!(a.install(1, 3000).map(|s| s.slot), Some(2));
    }

    #[test]
    fn multi_limit_is_all_or_nothing() {
        let tpm = Arc::new(with_lease(100, 1000));
        let usd = Arc::new(with_lease(5, 1000));
        let r = Reservation::reserve(&[(tpm.clone(), 50), (usd.clone(), 5)], 1).unwrap();
        assert_eq!(r.settle(&[50, 5]), vec![0, 0]);
        assert!(Reservation::reserve(&[(tpm.clone(), 50), (usd.clone(), 1)], 1).is_none());
        assert_eq!(tpm.available(1), 50, "the tokens taken before the refusal came back");
    }

    #[test]
    fn reserve_then_settle_refunds_exactly_and_a_dropped_guard_refunds_all() {
        let a = Arc::new(with_lease(1000, 10_000));
        let b = Arc::new(with_lease(50, 10_000));
        let r = Reservation::reserve(&[(a.clone(), 700), (b.clone(), 20)], 1).unwrap();
        assert_eq!((a.available(1), b.available(1)), (300, 30));
        assert_eq!(r.settle(&[412, 20]), vec![288, 0]);
        assert_eq!((a.available(1), b.available(1)), (588, 30));
        let r = Reservation::reserve(&[(a.clone(), 100)], 1).unwrap();
        drop(r);
        assert_eq!(a.available(1), 588);
        assert!(Reservation::reserve(&[(a.clone(), 10), (b.clone(), 31)], 1).is_none());
        assert_eq!(a.available(1), 588);
    }

    #[test]
    fn use_beyond_the_reservation_comes_from_the_leases_then_is_an_overrun() {
        let clock = Arc::new(ManualClock::default());
        clock.set(1);
        let a = Arc::new(with_lease(100, 1000));
        let r = Reservation::reserve(&[(a.clone(), 30)], 1).unwrap().with_clock(clock.clone());
        // Used 50 of 30 reserved: 20 more comes from the lease.
        assert_eq!(r.settle(&[50]), vec![0]);
        assert_eq!((a.available(1), a.overruns_total()), (50, 0));
        // Used 90 of 40 reserved with 10 left in the lease: 10 taken, 40 overrun.
        let r = Reservation::reserve(&[(a.clone(), 40)], 1).unwrap().with_clock(clock.clone());
        r.settle(&[90]);
        assert_eq!((a.available(1), a.take_overruns()), (0, 40));
        assert_eq!(a.take_overruns(), 0, "taken once");
        assert_eq!(a.overruns_total(), 40);
        // A lease past its local deadline is not spent from: all of it is overrun.
        let b = Arc::new(with_lease(100, 10));
        let r = Reservation::reserve(&[(b.clone(), 5)], 1).unwrap().with_clock(clock.clone());
        clock.set(10);
        r.settle(&[8]);
        assert_eq!(b.take_overruns(), 3);
        // Without a clock the excess is all overrun.
        let c = Arc::new(with_lease(100, 1000));
        Reservation::reserve(&[(c.clone(), 5)], 1).unwrap().settle(&[7]);
        assert_eq!((c.available(1), c.take_overruns()), (95, 2));
    }

    #[test]
    fn units_split_over_stripes_are_all_spendable_from_one_thread() {
        let a = with_lease(10, 1000);
        // 10 units over 4 stripes: one thread still gets every unit, one at a time
        // and all at once.
        let t = a.try_take(10, 1).unwrap();
        assert_eq!(t.units(), 10);
        a.give_back(&t, 10);
        let mut n = 0;
        while a.try_spend(1, 1) {
            n += 1;
        }
        assert_eq!(n, 10);
    }

    #[test]
    fn a_reservation_gathered_across_stripes_and_slots_settles_exactly() {
        // 10 units over 4 stripes in one slot, 6 in another: 14 can only be
        // gathered part by part, most of them past the inline first part.
        let a = with_lease(10, 1_000);
        a.install(6, 2_000).unwrap();
        let wants = [(Arc::new(a), 14)];
        let r = Reservation::reserve(&wants, 1).unwrap();
        let a = &wants[0].0;
        // Small enough to move by value cheaply (the parts past the first are not
        // inline).
        assert!(std::mem::size_of::<Taken>() <= 64);
        assert_eq!(r.reserved(), vec![14]);
        assert_eq!(a.slots().iter().map(|s| s.reserved).sum::<u64>(), 14);
        assert_eq!(a.available(1), 2);
        assert_eq!(r.settle(&[5]), vec![9]);
        assert_eq!(a.available(1), 11);
        assert!(a.slots().iter().all(|s| s.reserved == 0));
        // Dropped unsettled, a gathered reservation gives everything back.
        let r = Reservation::reserve(&[(a.clone(), 11)], 1).unwrap();
        assert_eq!(a.available(1), 0);
        drop(r);
        assert_eq!(a.available(1), 11);
    }

    #[test]
    fn many_threads_never_overspend() {
        let a = Arc::new(with_lease(100_000, u64::MAX));
        a.install(23_456, u64::MAX).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|k| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut got = 0u64;
                    let amount = 1 + k as u64 * 3;
                    loop {
                        let ok = if k % 2 == 0 {
                            a.try_spend(amount, 1)
                        } else {
                            a.try_take(amount, 1).is_some()
                        };
                        if !ok {
                            break;
                        }
                        got += amount;
                    }
                    got
                })
            })
            .collect();
        let spent: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(spent <= 123_456);
        assert_eq!(spent + a.available(1), 123_456, "every unit is either spent or still there");
    }
}
