//! Local admission cost: `Handle::try_spend` on a lease that never runs out, on one
//! thread and on two threads spending from the same allowance at once; and an LLM
//! call's reserve + settle on two limits (tokens and dollars), by name
//! (`Gateway::reserve`) and through a pre-resolved `Reserver`.
//!
//! `cargo bench -p ration-client --bench admission`

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use criterion::{Criterion, Throughput};
use ration_client::{CoarseClock, Gateway};

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let clock = CoarseClock::new();
    clock.tick();
    let gw = Gateway::new(clock);
    gw.install_lease("acme/search", "tokens", u64::MAX / 4, 0, u64::MAX / 2, 0).unwrap();
    let h = gw.handle("acme/search", "tokens");
    let baseline = AtomicU64::new(u64::MAX);

    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(1));
    // Baseline: a bare atomic decrement, the floor for any shared counter.
    group.bench_function("baseline_atomic_fetch_sub", |b| {
        b.iter(|| black_box(baseline.fetch_sub(black_box(1), Ordering::AcqRel)))
    });
    group.bench_function("try_spend_1_thread", |b| b.iter(|| black_box(h.try_spend(black_box(1)))));
    group.bench_function("try_spend_2_threads", |b| {
        b.iter_custom(|iters| {
            let other = h.clone();
            let start = Instant::now();
            let t = std::thread::spawn(move || {
                for _ in 0..iters {
                    black_box(other.try_spend(black_box(1)));
                }
            });
            for _ in 0..iters {
                black_box(h.try_spend(black_box(1)));
            }
            t.join().unwrap();
            // Per decision as each thread sees it, while the other decides too.
            start.elapsed()
        })
    });
    gw.install_lease("acme", "usd_micros", u64::MAX / 4, 0, u64::MAX / 2, 0).unwrap();
    group.bench_function("reserve_settle_2_limits", |b| {
        b.iter(|| {
            let r = gw
                .reserve(&[("acme/search", "tokens", 4096), ("acme", "usd_micros", 300)])
                .unwrap();
            black_box(r.settle(&[1000, 80]))
        })
    });
    // The same call through a Reserver: pairs resolved once, nothing allocated.
    let reserver = gw.reserver([("acme/search", "tokens"), ("acme", "usd_micros")]);
    group.bench_function("reserver_reserve_settle_2_limits", |b| {
        b.iter(|| {
            let r = reserver.reserve(black_box([4096, 300])).unwrap();
            r.settle(black_box([1000, 80]))
        })
    });
    group.finish();
    c.final_summary();
}
