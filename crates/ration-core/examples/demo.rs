//! A short demonstration of the ledger core alone (no network, no storage):
//! `cargo run -p ration-core --example demo`.

#![allow(clippy::unwrap_used)]

use ration_core::audit::{spend, AuditLog};
use ration_core::{
    Acquire, Batch, BudgetPath, BudgetSpec, ClientId, Command, Entry, FailPolicy, Ledger,
    LimitSpec, Op, Outcome, Period, Principal, Release, Request, Unit, Window,
};

struct Demo {
    ledger: Ledger,
    audit: AuditLog,
    index: u64,
    request: u64,
    now_ms: u64,
}

impl Demo {
    fn run(&mut self, who: &str, op: Op) -> Outcome {
        self.index += 1;
        self.request += 1;
        let request = Request {
            client: ClientId::new(format!("{who}-demo")).expect("valid id"),
            request_id: self.request,
            principal: Principal::new(who).expect("valid id"),
            op,
        };
        let entry =
            Entry::V1(Batch { time_ms: self.now_ms, commands: vec![Command::Request(request)] });
        let applied = self.ledger.apply(self.index, &entry);
        self.audit.append(applied.audit).expect("the ledger continues its own chain");
        let outcome = applied.outcomes.into_iter().next().expect("one outcome per command");
        match &outcome {
            Ok(reply) => println!("  {who:>8}: {reply:?}"),
            Err(e) => println!("  {who:>8}: refused: {e}"),
        }
        outcome
    }
}

fn path(p: &str) -> BudgetPath {
    BudgetPath::new(p).expect("valid path")
}

fn main() {
    let tokens = Unit::new("tokens").expect("valid unit");
    let limit = |cap, period| LimitSpec {
        unit: tokens.clone(),
        cap,
        window: Window::utc(period),
        on_unreachable: FailPolicy::FailClosed,
    };
    let mut d = Demo {
        ledger: Ledger::default(),
        audit: AuditLog::new(),
        index: 0,
        request: 0,
        now_ms: 1_764_340_245_123,
    };
    println!("Ration ledger core demonstration\n");
    println!("Budgets: acme 1000 tokens/month > acme/search 300 tokens/minute");
    let _ = d.run(
        "admin",
        Op::CreateBudget(BudgetSpec {
            path: path("acme"),
            limits: vec![limit(1000, Period::Month)],
        }),
    );
    let _ = d.run(
        "admin",
        Op::CreateBudget(BudgetSpec {
            path: path("acme/search"),
            limits: vec![limit(300, Period::Minute)],
        }),
    );

    println!("\nThree gateways lease; as allowance runs short, each later one gets a fair share of what is left:");
    let acquire = |wanted| {
        Op::Acquire(Acquire {
            budget: path("acme/search"),
            unit: tokens.clone(),
            wanted,
            min: 1,
            ttl_ms: 10_000,
        })
    };
    let a = d.run("gw-eu", acquire(200));
    let _b = d.run("gw-us", acquire(200));
    let _ = d.run("gw-ap", acquire(200));

    println!("\ngw-eu settles: it spent 120 of its lease, the rest returns to the pool:");
    if let Ok(ration_core::Reply::Granted(g)) = a {
        let _ = d.run("gw-eu", Op::Release(Release { lease: g.lease, consumed_total: 120 }));
    }

    println!("\n15 s later gw-us and gw-ap have not settled: their leases expire and are charged in full.");
    d.now_ms += 15_000;
    d.index += 1;
    let applied = d
        .ledger
        .apply(d.index, &Entry::V1(Batch { time_ms: d.now_ms, commands: vec![Command::Tick] }));
    d.audit.append(applied.audit).expect("chain continues");

    let view = d.ledger.budget(&path("acme")).expect("exists");
    let l = &view.limits[0];
    println!(
        "\nacme: consumed {} outstanding {} remaining {} of {}",
        l.consumed, l.outstanding, l.remaining, l.spec.cap
    );
    for row in spend(d.audit.records(), &path("acme"), Window::utc(Period::Day), None, None) {
        println!("spend today: {:<12} {} {}", row.budget.to_string(), row.spent, row.unit);
    }
    match d.audit.verify() {
        Ok(head) => println!("audit: {} records, hash chain verified", head.next_seq),
        Err(e) => println!("audit: {e}"),
    }
    println!("state digest: {}", ration_core::audit::hex(&d.ledger.digest()));
}
