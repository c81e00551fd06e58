//! The fuzz targets without libFuzzer, on the stable toolchain: seeded random and
//! mutated inputs, no coverage feedback. For where `scripts/fuzz.sh` cannot build
//! libFuzzer, and to reproduce a failing input from any source.
//!
//! ```text
//! cargo run -p ration-fuzz --release --example driver -- run TARGET [SECONDS] [SEED]
//! cargo run -p ration-fuzz --example driver -- repro TARGET FILE
//! cargo run -p ration-fuzz --example driver -- tmin TARGET FILE OUT
//! ```
//!
//! `repro` and `tmin` run in strict mode (known bugs are not tolerated, see
//! `ration_fuzz::known`). `tmin` shrinks a failing input by deleting chunks while
//! it still fails at the same place, and writes the result to OUT.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

thread_local! {
    static PANICKED_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Where `target` panics on `input`, if it does.
fn panic_site(target: ration_fuzz::Target, input: &[u8]) -> Option<String> {
    PANICKED_AT.with(|p| p.borrow_mut().take());
    catch_unwind(AssertUnwindSafe(|| target(input))).err()?;
    PANICKED_AT.with(|p| p.borrow_mut().take()).or(Some(String::new()))
}

fn minimize(target: ration_fuzz::Target, mut input: Vec<u8>) -> Vec<u8> {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
        PANICKED_AT.with(|p| *p.borrow_mut() = at);
    }));
    let Some(site) = panic_site(target, &input) else {
        eprintln!("the input does not fail");
        std::process::exit(1);
    };
    eprintln!("fails at {site}; {} bytes", input.len());
    let mut chunk = input.len().div_ceil(2).max(1);
    loop {
        let mut at = 0;
        while at < input.len() {
            let mut shorter = input.clone();
            shorter.drain(at..(at + chunk).min(input.len()));
            if panic_site(target, &shorter).as_deref() == Some(site.as_str()) {
                input = shorter;
            } else {
                at += chunk;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    let _ = std::panic::take_hook();
    eprintln!("minimized to {} bytes", input.len());
    input
}

fn usage() -> ! {
    let names: Vec<&str> = ration_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "usage: driver run TARGET [SECONDS] [SEED] | repro TARGET FILE | tmin TARGET FILE OUT"
    );
    eprintln!("targets: {}", names.join(", "));
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(name)) = (args.first(), args.get(1)) else { usage() };
    let Some(target) = ration_fuzz::target(name) else { usage() };
    let read = |file: &String| {
        std::fs::read(file).unwrap_or_else(|e| {
            eprintln!("cannot read {file}: {e}");
            std::process::exit(2);
        })
    };
    match cmd.as_str() {
        "tmin" => {
            let (Some(file), Some(out)) = (args.get(2), args.get(3)) else { usage() };
            ration_fuzz::known::set_strict(true);
            let small = minimize(target, read(file));
            if let Err(e) = std::fs::write(out, small) {
                eprintln!("cannot write {out}: {e}");
                std::process::exit(2);
            }
        }
        "repro" => {
            let Some(file) = args.get(2) else { usage() };
            let input = read(file);
            ration_fuzz::known::set_strict(true);
            target(&input);
            println!("{name}: {file} ({} bytes) passes", input.len());
        }
        "run" => {
            let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60);
            let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            let seeds = ration_fuzz::seeds::seeds(name);
            let start = Instant::now();
            let budget = Duration::from_secs(seconds);
            let runs =
                ration_fuzz::driver::run(name, target, &seeds, seed, |_| start.elapsed() < budget);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{name}: {runs} inputs in {secs:.1} s ({:.0}/s), seed {seed}, no failure",
                runs as f64 / secs.max(1e-9)
            );
        }
        _ => usage(),
    }
}
