//! The ledger core under load: 1M budgets, 100k live leases.
//!
//! `cargo bench -p ration-core --bench ledger` measures applying acquire, report and
//! release commands in group-committed entries of 1024, and prints the memory each
//! budget and each lease costs (live heap bytes, from a counting allocator). Under
//! `cargo test` it runs once on a small ledger, as a smoke test.
//!
//! The allocator beneath the counting one is the node's (`rationd`'s mimalloc), so
//! the ledger's memory is laid out, and paged, as in a node: mimalloc backs its
//! arenas with transparent huge pages where the kernel allows them (`madvise`
//! mode), which a million budgets' random lookups miss the TLB far less on.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};

use criterion::{BatchSize, Criterion, Throughput};
use ration_core::{
    Acquire, Batch, BudgetPath, BudgetSpec, ClientId, Command, Entry, FailPolicy, LeaseId, Ledger,
    LedgerConfig, LimitSpec, Op, Period, Principal, Release, Reply, Report, Request, Unit, Window,
};

/// Counts live heap bytes, so memory per budget and per lease is exact.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// The node's allocator (crates/rationd/src/main.rs).
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)]
// SAFETY: forwards every call to the node's allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

const T0: u64 = 1_764_340_245_123;
const PER_ENTRY: usize = 1024;
struct Sizes {
    roots: usize,
    children: usize,
    leases: usize,
    /// Clients (each with its exactly-once window) the leases are spread over.
    gateways: usize,
}

struct Fixture {
    ledger: Ledger,
    index: u64,
    request: u64,
    /// Live leases, with the gateway holding each.
    leases: Vec<(LeaseId, usize)>,
    sizes: Sizes,
    rng: u64,
}

impl Fixture {
    fn next_random(&mut self) -> u64 {
        // xorshift64: deterministic load, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn entry(&mut self, commands: Vec<Command>) -> Vec<ration_core::Outcome> {
        self.index += 1;
        let applied = self.ledger.apply(self.index, &Entry::V1(Batch { time_ms: T0, commands }));
        // The node hands records to its audit store; here they are dropped.
        drop(applied.audit);
        applied.outcomes
    }

    fn request(&mut self, gateway: usize, op: Op) -> Command {
        self.request += 1;
        Command::Request(Request {
            client: ClientId::new(format!("gw-{gateway}")).unwrap(),
            request_id: self.request,
            principal: Principal::new(format!("gw-{gateway}")).unwrap(),
            op,
        })
    }

    fn random_leaf(&mut self) -> BudgetPath {
        let r = self.next_random() as usize;
        let root = r % self.sizes.roots;
        let child = (r / self.sizes.roots) % self.sizes.children;
        BudgetPath::new(format!("org-{root}/key-{child}")).unwrap()
    }

    fn acquire(&mut self) -> (usize, Op) {
        let gateway = self.next_random() as usize % self.sizes.gateways;
        let op = Op::Acquire(Acquire {
            budget: self.random_leaf(),
            unit: Unit::new("tokens").unwrap(),
            wanted: 1_000_000,
            min: 1,
            ttl_ms: 3_600_000,
        });
        (gateway, op)
    }

    fn build(sizes: Sizes) -> (Self, isize, isize) {
        let base = live_bytes();
        let mut f = Fixture {
            ledger: Ledger::new(LedgerConfig::default()),
            index: 0,
            request: 0,
            leases: Vec::new(),
            sizes,
            rng: 0x9e37_79b9_7f4a_7c15,
        };
        let limit = |cap| LimitSpec {
            unit: Unit::new("tokens").unwrap(),
            cap,
            window: Window::utc(Period::Month),
            on_unreachable: FailPolicy::FailClosed,
        };
        let mut creates = Vec::new();
        for root in 0..f.sizes.roots {
            let spec = BudgetSpec {
                path: BudgetPath::new(format!("org-{root}")).unwrap(),
                limits: vec![limit(1 << 50)],
            };
            creates.push(spec);
        }
        for child in 0..f.sizes.children {
            for root in 0..f.sizes.roots {
                let path = BudgetPath::new(format!("org-{root}/key-{child}")).unwrap();
                creates.push(BudgetSpec { path, limits: vec![limit(1 << 40)] });
            }
        }
        for chunk in creates.chunks(PER_ENTRY) {
            let commands =
                chunk.iter().map(|s| f.request(0, Op::CreateBudget(s.clone()))).collect();
            f.entry(commands);
        }
        // Budget creation filled one client's exactly-once window; forget it so the
        // budget figure is budgets alone.
        f.ledger = Ledger::restore(&f.ledger.snapshot()).unwrap();
        let after_budgets = live_bytes();
        while f.leases.len() < f.sizes.leases {
            let ops: Vec<(usize, Op)> = (0..PER_ENTRY).map(|_| f.acquire()).collect();
            let commands = ops.iter().map(|(g, op)| f.request(*g, op.clone())).collect();
            let outcomes = f.entry(commands);
            for ((g, _), o) in ops.iter().zip(outcomes) {
                if let Ok(Reply::Granted(grant)) = o {
                    f.leases.push((grant.lease, *g));
                }
            }
        }
        let after_leases = live_bytes();
        let lease_list_bytes =
            (f.leases.capacity() * std::mem::size_of::<(LeaseId, usize)>()) as isize;
        (f, after_budgets - base, after_leases - after_budgets - lease_list_bytes)
    }
}

fn bench(c: &mut Criterion, full: bool) {
    let sizes = if full {
        Sizes { roots: 1000, children: 999, leases: 100_000, gateways: 1000 }
    } else {
        Sizes { roots: 10, children: 99, leases: 1_000, gateways: 1000 }
    };
    let (budgets, leases) = (sizes.roots * (sizes.children + 1), sizes.leases);
    let started = std::time::Instant::now();
    let (f, budget_bytes, lease_bytes) = Fixture::build(sizes);
    let (clients, remembered) = f.ledger.dedup_size();
    println!(
        "ledger: {} budgets, {} live leases, built in {:.1} s",
        f.ledger.budget_count(),
        f.ledger.live_lease_count(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "memory: {} bytes per budget; {} bytes per live lease (with its exactly-once entry; {clients} clients, {remembered} results remembered)",
        budget_bytes / budgets as isize,
        lease_bytes / leases as isize,
    );
    println!("snapshot: {} bytes", f.ledger.snapshot().len());

    let f = std::cell::RefCell::new(f);
    let mut group = c.benchmark_group("ledger_1M_budgets_100k_leases");
    group.throughput(Throughput::Elements(PER_ENTRY as u64));
    group.sample_size(if full { 30 } else { 10 });

    // Baseline for the ratios: the simplest possible ledger, a debit of 1024 random
    // keys in an ordered map as large as the budget map.
    let mut baseline: std::collections::BTreeMap<u64, u64> =
        (0..budgets as u64).map(|k| (k, 1 << 40)).collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    group.bench_function("baseline_btreemap_debit_x1024", |b| {
        b.iter(|| {
            for _ in 0..PER_ENTRY {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if let Some(v) = baseline.get_mut(&(rng % budgets as u64)) {
                    *v -= 1;
                }
            }
        })
    });
    drop(baseline);

    apply_benches(&mut group, &f);
    group.finish();

    // The same commands on a ledger small enough to stay in the CPU's caches (100
    // budgets, 1,000 leases, 8 clients): against the figures above, how much of a
    // command's cost is the memory a million budgets spread over.
    {
        let (small, _, _) =
            Fixture::build(Sizes { roots: 10, children: 9, leases: 1_000, gateways: 8 });
        let small = std::cell::RefCell::new(small);
        let mut group = c.benchmark_group("ledger_in_cache_100_budgets_1k_leases");
        group.throughput(Throughput::Elements(PER_ENTRY as u64));
        group.sample_size(if full { 30 } else { 10 });
        apply_benches(&mut group, &small);
        group.finish();
        small.borrow().ledger.check_invariants().unwrap();
    }

    // Building the hash of one record: a grant's, as the acquires above make
    // (two balances, a cause). In cache: what hashing costs beside the lookups.
    let record = {
        let f = &mut *f.borrow_mut();
        let (g, op) = f.acquire();
        let command = f.request(g, op);
        f.index += 1;
        let applied =
            f.ledger.apply(f.index, &Entry::V1(Batch { time_ms: T0, commands: vec![command] }));
        applied.audit.into_iter().next().unwrap()
    };
    assert_eq!(record.entry.compute_hash(), record.hash);
    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hash_one_grant_record", |b| {
        b.iter(|| black_box(&record.entry).compute_hash())
    });
    // Encoding the whole record (what the node's audit store writes): postcard's
    // own encoder into a vector, the baseline, against the project's.
    group.bench_function("encode_one_grant_record_postcard", |b| {
        b.iter(|| postcard::to_stdvec(black_box(&record)).unwrap())
    });
    group.bench_function("encode_one_grant_record", |b| {
        b.iter(|| ration_core::encode(black_box(&record)))
    });
    group.finish();
    f.borrow().ledger.check_invariants().unwrap();
}

/// Reports, and acquires with releases, applied in entries of 1,024 to `f`.
fn apply_benches(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    f: &std::cell::RefCell<Fixture>,
) {
    // Report 1 token on 1024 random live leases per entry.
    group.bench_function("report_x1024", |b| {
        b.iter_batched(
            || {
                let f = &mut *f.borrow_mut();
                (0..PER_ENTRY)
                    .map(|_| {
                        let at = f.next_random() as usize % f.leases.len();
                        let (lease, g) = f.leases[at];
                        let op =
                            Op::Report(Report { lease, consumed_delta: 1, renew_ttl_ms: None });
                        f.request(g, op)
                    })
                    .collect::<Vec<_>>()
            },
            |commands| {
                let f = &mut *f.borrow_mut();
                f.index += 1;
                black_box(f.ledger.apply(f.index, &Entry::V1(Batch { time_ms: T0, commands })))
            },
            BatchSize::LargeInput,
        )
    });

    // 512 acquires and 512 releases per entry: the lease count stays level.
    group.bench_function("acquire_release_x1024", |b| {
        b.iter_batched(
            || {
                let f = &mut *f.borrow_mut();
                let mut commands = Vec::with_capacity(PER_ENTRY);
                for _ in 0..PER_ENTRY / 2 {
                    let (g, op) = f.acquire();
                    commands.push(f.request(g, op));
                    let at = f.next_random() as usize % f.leases.len();
                    let (lease, g) = f.leases.swap_remove(at);
                    commands.push(f.request(g, Op::Release(Release { lease, consumed_total: 0 })));
                }
                commands
            },
            |commands| {
                let f = &mut *f.borrow_mut();
                f.index += 1;
                let gateways: Vec<usize> = commands
                    .iter()
                    .map(|c| c.request().map_or(0, |r| r.principal.as_str()[3..].parse().unwrap()))
                    .collect();
                let applied = f.ledger.apply(f.index, &Entry::V1(Batch { time_ms: T0, commands }));
                for (o, g) in applied.outcomes.iter().zip(gateways) {
                    if let Ok(Reply::Granted(grant)) = o {
                        f.leases.push((grant.lease, g));
                    }
                }
                black_box(applied.audit)
            },
            BatchSize::LargeInput,
        )
    });
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, full);
    c.final_summary();
}
