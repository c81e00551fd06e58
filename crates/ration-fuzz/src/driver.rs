//! A small deterministic fuzz driver: random byte strings and seeds mutated by a
//! seeded PRNG, no coverage feedback. It runs the targets in the workspace's smoke
//! test (so they cannot rot) and, from the `driver` example, anywhere libFuzzer
//! cannot be built. Real fuzzing is `scripts/fuzz.sh` (coverage-guided libFuzzer).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use crate::Target;

/// Longest input the driver makes (libFuzzer's default `-max_len` is 4096 too).
pub const MAX_LEN: usize = 4096;

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

const INTERESTING: [u64; 10] =
    [0, 1, 0x7f, 0x80, 0xff, 0x7fff_ffff, 0xffff_ffff, u64::MAX, i64::MAX as u64, 1 << 48];

/// Applies 1 to 8 random mutations to `data`, sometimes splicing in part of `other`.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        let at = rng.below(len.max(1));
        match rng.below(10) {
            0 if len > 0 => data[at] ^= 1 << rng.below(8),
            1 if len > 0 => data[at] = rng.next_u64() as u8,
            2 if len > 0 => {
                data[at] = data[at].wrapping_add(if rng.below(2) == 0 { 1 } else { 255 })
            }
            3 => {
                let n = 1 + rng.below(8);
                let bytes = rng.bytes(n);
                data.splice(at.min(len)..at.min(len), bytes);
            }
            4 if len > 0 => {
                let end = (at + 1 + rng.below(16)).min(len);
                data.drain(at..end);
            }
            5 if len > 0 => {
                let end = (at + 1 + rng.below(16)).min(len);
                let chunk = data[at..end].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, chunk);
            }
            6 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = at.min(len);
                let end = (at + width).min(len);
                data.splice(at..end, v[..width].iter().copied());
            }
            7 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                let at = at.min(len);
                data.splice(at..at, other[from..end].iter().copied());
            }
            8 if len > 0 => data.truncate(at),
            _ => data.push(rng.next_u64() as u8),
        }
    }
    data.truncate(MAX_LEN);
}

/// The next input: a random byte string (one time in four) or a mutated seed.
pub fn generate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(4) == 0 {
        let len = if rng.below(8) == 0 { rng.below(MAX_LEN) } else { rng.below(128) };
        return rng.bytes(len);
    }
    let mut data = seeds[rng.below(seeds.len())].clone();
    let other = &seeds[rng.below(seeds.len())];
    mutate(rng, &mut data, other);
    data
}

/// Where a failing input is saved: the system temp dir, named by target and content.
pub fn failure_path(name: &str, input: &[u8]) -> PathBuf {
    // FNV-1a: a stable name for the same bytes.
    let hash = input
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    std::env::temp_dir().join(format!("ration-fuzz-{name}-{hash:016x}.bin"))
}

/// Runs `target` on `input`; if it panics, saves the input, says where, and panics on.
pub fn call(name: &str, target: Target, input: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(input))) {
        let path = failure_path(name, input);
        let saved = std::fs::write(&path, input).map_or_else(
            |e| format!("could not be saved to {}: {e}", path.display()),
            |()| format!("saved to {}", path.display()),
        );
        eprintln!(
            "fuzz target {name} panicked on a {}-byte input, {saved}; reproduce with \
             `cargo run -p ration-fuzz --example driver -- repro {name} {}`",
            input.len(),
            path.display()
        );
        resume_unwind(panic);
    }
}

/// Runs `target` on every seed, then on generated inputs until `more(runs)` says
/// stop. Returns the number of inputs run.
pub fn run(
    name: &str,
    target: Target,
    seeds: &[Vec<u8>],
    rng_seed: u64,
    mut more: impl FnMut(usize) -> bool,
) -> usize {
    let mut rng = Rng::new(rng_seed);
    for seed in seeds {
        call(name, target, seed);
    }
    let mut runs = seeds.len();
    while more(runs) {
        let input = generate(&mut rng, seeds);
        call(name, target, &input);
        runs += 1;
    }
    runs
}
