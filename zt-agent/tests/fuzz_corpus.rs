//! The cargo-fuzz targets (`fuzz/`, run by `cargo xtask fuzz`) in the ordinary test run:
//! every input of their seed corpora (`fuzz/corpus/<target>/`) replayed through the
//! targets' own code (`fuzz/src/`, compiled in here), then a bounded run of seeded
//! random mutations of those inputs. cargo-fuzz's instrumented build takes minutes from
//! scratch, too long for `cargo xtask test`; this costs one more test binary.
//!
//! `ZT_FUZZ_MUTATIONS` (default 1000 per target) inputs, at most `ZT_FUZZ_SECONDS`
//! (default 15) per target; `ZT_FUZZ_SEED` replays a run. A failing input is written to
//! `target/fuzz-failures/` (replay it with `cargo +nightly fuzz run <target> <file>`).
#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("manifest", targets::manifest),
    ("policy_compile", targets::policy::policy_compile),
    ("cni_input", targets::cni_input),
    ("dns_event", targets::dns_event),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The seed corpus of `target`, in name order (never empty: a target without seeds
/// would make this test prove nothing).
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seed inputs in {}", dir.display());
    v
}

/// Runs `f` on `input`; on a panic, keeps the input and says how to replay it.
fn run_one(target: &str, f: Target, input: &[u8], what: &str) {
    if let Err(p) = std::panic::catch_unwind(|| f(input)) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{target}-{}", std::process::id()));
        std::fs::write(&file, input).unwrap();
        eprintln!("fuzz target {target} panicked on {what}; input kept in {} (cargo +nightly fuzz run {target} {})", file.display(), file.display());
        std::panic::resume_unwind(p);
    }
}

#[test]
fn seed_corpora_replay_cleanly() {
    for (target, f) in TARGETS {
        let inputs = corpus(target);
        for (name, data) in &inputs {
            run_one(target, *f, data, &format!("fuzz/corpus/{target}/{name}"));
        }
        println!("{target}: {} seed inputs", inputs.len());
    }
}

// ---------------------------------------------------------------------------
// Mutations (a small libFuzzer-like mutator, no coverage feedback)
// ---------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens of the inputs' formats (YAML, JSON, CNI variables, DNS).
const TOKENS: &[&[u8]] = &[
    b"\n---\n",
    b": ",
    b"\n- ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"\"",
    b"'",
    b"null",
    b"~",
    b"- ",
    b"<<: ",
    b"0x",
    b"-1",
    b"65536",
    b"4294967296",
    b"1e400",
    b"\\u0000",
    b"::",
    b"/0",
    b"/129",
    b"*.",
    b"spiffe://",
    b"kind: List\nitems:\n",
    b"CNI_COMMAND=ADD\n",
    b"CNI_ARGS=",
    b";",
    b"=",
    b"\0",
    b"\xc0\x0c",
    b"\xff\xff",
    b"\x00\x01\x00\x01",
];

fn mutate(rng: &mut Rng, m: &mut Vec<u8>, other: &[u8]) {
    let at = rng.below(m.len() + 1);
    match rng.below(9) {
        0 if !m.is_empty() => {
            let i = rng.below(m.len());
            m[i] ^= 1 << rng.below(8);
        }
        1 if !m.is_empty() => {
            let i = rng.below(m.len());
            m[i] = [0u8, 0xff, 0x7f, 0x80, b'\n', b' ', b':', b'-', b'"', b'0', b'9'][rng.below(11)];
        }
        2 => {
            let t = TOKENS[rng.below(TOKENS.len())];
            m.splice(at..at, t.iter().copied());
        }
        3 => {
            let n = rng.below(16).min(m.len() - at);
            m.drain(at..at + n);
        }
        4 => m.truncate(at),
        5 if !m.is_empty() => {
            // Copy a chunk of this input elsewhere.
            let from = rng.below(m.len());
            let n = (1 + rng.below(64)).min(m.len() - from);
            let chunk = m[from..from + n].to_vec();
            m.splice(at..at, chunk);
        }
        6 if !other.is_empty() => {
            // Splice in a chunk of another seed.
            let from = rng.below(other.len());
            let n = (1 + rng.below(256)).min(other.len() - from);
            m.splice(at..at, other[from..from + n].iter().copied());
        }
        7 => {
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            m.splice(at..at, bytes);
        }
        _ => {
            // A line of the input repeated.
            if let Some(start) = m[..at].iter().rposition(|b| *b == b'\n') {
                let line = m[start..at].to_vec();
                m.splice(at..at, line);
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn mutated_corpora_never_panic() {
    let per_target = env_u64("ZT_FUZZ_MUTATIONS").unwrap_or(1000);
    let limit = Duration::from_secs(env_u64("ZT_FUZZ_SECONDS").unwrap_or(15));
    let seed = env_u64("ZT_FUZZ_SEED")
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 ^ std::process::id() as u64);
    println!("mutated corpora: seed {seed} (ZT_FUZZ_SEED={seed} replays), up to {per_target} inputs per target");
    for (k, (target, f)) in TARGETS.iter().enumerate() {
        let seeds = corpus(target);
        let mut rng = Rng(seed ^ (k as u64) << 56);
        let start = Instant::now();
        let mut n = 0;
        while n < per_target && start.elapsed() < limit {
            let (name, base) = &seeds[rng.below(seeds.len())];
            let other = &seeds[rng.below(seeds.len())].1;
            let mut m = base.clone();
            let steps = 1 + rng.below(8);
            for _ in 0..steps {
                mutate(&mut rng, &mut m, other);
            }
            run_one(target, *f, &m, &format!("input #{n} ({steps} mutations of {name}, ZT_FUZZ_SEED={seed})"));
            n += 1;
        }
        println!("{target}: {n} mutated inputs in {:.1} s", start.elapsed().as_secs_f64());
    }
}
