//! The fuzz targets on stable: the committed corpus replayed, then a short
//! mutation run per target (`NETFAULT_FUZZ_SECONDS`, default 2). A failing
//! input is written to `target/fuzz-failures/` and named in the panic.
//! Coverage-guided runs are `scripts/fuzz.sh` (libFuzzer, nightly).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netfault_fuzz::{Target, TARGETS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// Runs `t` on `input`; on a panic, keeps the input and fails naming it.
fn run_one(t: &Target, input: &[u8]) -> bool {
    let r = catch_unwind(AssertUnwindSafe(|| (t.run)(input)));
    if let Ok(accepted) = r {
        return accepted;
    }
    {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/fuzz-failures")
            .join(t.name);
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("crash-{:016x}", fnv(input)));
        let _ = std::fs::write(&path, input);
        panic!(
            "fuzz target {} panicked on {} bytes, kept in {} (replay: cargo test -p netfault-fuzz)",
            t.name,
            input.len(),
            path.display()
        );
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Tokens worth splicing into structured inputs.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\"percent\"",
    b"\"type\"",
    b"\"duration\"",
    b"\"ports\"",
    b"65536",
    b"\x00",
    b"\xff\xff",
    b"\r\n",
    b" HTTP/1.1",
    b"\\u0000",
    b"%",
    b"ms",
    b"netfault.io/",
    b"\x1f",
    b"=",
    b";",
    b"*",
];

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..5) {
        match rng.random_range(0..7) {
            0 if !input.is_empty() => {
                let at = rng.random_range(0..input.len());
                input[at] ^= 1 << rng.random_range(0..8);
            }
            1 if !input.is_empty() => {
                let at = rng.random_range(0..input.len());
                input[at] = rng.random();
            }
            2 if !input.is_empty() => {
                let from = rng.random_range(0..input.len());
                let to = (from + rng.random_range(1..16)).min(input.len());
                input.drain(from..to);
            }
            3 => {
                let at = rng.random_range(0..=input.len());
                let tok = TOKENS[rng.random_range(0..TOKENS.len())];
                input.splice(at..at, tok.iter().copied());
            }
            4 if !input.is_empty() => {
                // Repeat a chunk (deep nesting, long lines).
                let from = rng.random_range(0..input.len());
                let to = (from + rng.random_range(1..8)).min(input.len());
                let chunk = input[from..to].to_vec();
                for _ in 0..rng.random_range(1..64) {
                    input.splice(from..from, chunk.iter().copied());
                }
            }
            5 => {
                // Splice with another seed.
                let other = &seeds[rng.random_range(0..seeds.len())];
                let at = rng.random_range(0..=input.len());
                let from = rng.random_range(0..=other.len());
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                let at = rng.random_range(0..=input.len());
                input.insert(at, rng.random());
            }
        }
    }
    input.truncate(1 << 16);
}

#[test]
fn every_target_has_a_corpus_and_replays_it() {
    for t in TARGETS {
        let seeds = corpus(t.name);
        assert!(
            seeds.len() >= 4,
            "{}: only {} seeds in {}",
            t.name,
            seeds.len(),
            corpus_dir(t.name).display()
        );
        let accepted = seeds.iter().filter(|s| run_one(t, s)).count();
        println!("{}: {} seeds, {accepted} accepted", t.name, seeds.len());
        assert!(
            accepted > 0 && accepted < seeds.len(),
            "{}: the corpus must hold inputs the parser accepts and inputs it refuses ({accepted} of {} accepted)",
            t.name,
            seeds.len()
        );
    }
}

#[test]
fn every_target_survives_a_short_mutation_run() {
    let per_target = std::env::var("NETFAULT_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(2), Duration::from_secs_f64);
    for (i, t) in TARGETS.iter().enumerate() {
        let seeds = corpus(t.name);
        let mut rng = StdRng::seed_from_u64(0x6e66 + i as u64);
        let start = Instant::now();
        let (mut execs, mut accepted) = (0u64, 0u64);
        while start.elapsed() < per_target {
            let mut input = seeds[rng.random_range(0..seeds.len())].clone();
            mutate(&mut rng, &seeds, &mut input);
            accepted += u64::from(run_one(t, &input));
            execs += 1;
        }
        println!(
            "{}: {execs} mutated inputs in {:.1} s, {accepted} accepted",
            t.name,
            start.elapsed().as_secs_f64()
        );
        assert!(execs > 0);
    }
}
