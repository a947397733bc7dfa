//! The short run of the fuzz targets, for CI: each target's harness (`fuzz/src/harness`, the
//! same code the libFuzzer targets of `scripts/fuzz.sh` run) is fed its checked-in seeds, the
//! inputs of every crash found so far (`fuzz/regressions/<target>`), and a fixed number of
//! mutations of the seeds drawn from a fixed random seed, so that a failure reproduces. A panic,
//! Skiff's or a broken invariant of the harness, fails the test, and the input is written out
//! for `scripts/fuzz.sh replay`.
//!
//! This is not coverage-guided (the campaign is, see docs/fuzzing.md); it keeps the harness
//! building and the seeds loading, and replays every past crash. `SKIFF_FUZZ_SMOKE_ITERS` sets
//! the mutations per target.

#[allow(dead_code)]
#[path = "../fuzz/src/harness/mod.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Mutex, Once};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use harness::Outcome;

/// Mutations per target by default: a few seconds each.
const DEFAULT_ITERS: usize = 1500;

fn iters() -> usize {
    std::env::var("SKIFF_FUZZ_SMOKE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERS)
}

/// The crash inputs kept as regressions for `target`.
fn regressions(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = harness::seeds_dir()
        .with_file_name("regressions")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let bytes = std::fs::read(e.path()).ok()?;
                    Some((e.file_name().to_string_lossy().into_owned(), bytes))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// One of the mutations libFuzzer's default mutator also makes, chosen at random.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, other: &[u8]) {
    const INTERESTING: [u64; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0xffff_ffff, u64::MAX];
    let len = input.len();
    match rng.gen_range(0..8) {
        // Flip a bit.
        0 if len > 0 => {
            let i = rng.gen_range(0..len);
            input[i] ^= 1 << rng.gen_range(0..8);
        }
        // A random byte.
        1 if len > 0 => {
            let i = rng.gen_range(0..len);
            input[i] = rng.gen();
        }
        // An interesting little-endian value of 1, 2, 4 or 8 bytes.
        2 if len > 0 => {
            let v = INTERESTING[rng.gen_range(0..INTERESTING.len())].to_le_bytes();
            let n = [1, 2, 4, 8][rng.gen_range(0..4)].min(len);
            let i = rng.gen_range(0..=len - n);
            input[i..i + n].copy_from_slice(&v[..n]);
        }
        // Delete a range.
        3 if len > 0 => {
            let i = rng.gen_range(0..len);
            let n = rng.gen_range(1..=(len - i).min(64));
            input.drain(i..i + n);
        }
        // Insert random bytes.
        4 => {
            let i = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            input.splice(i..i, bytes);
        }
        // Copy a range over another place.
        5 if len > 1 => {
            let n = rng.gen_range(1..=len.min(64));
            let from = rng.gen_range(0..=len - n);
            let to = rng.gen_range(0..=len - n);
            let piece = input[from..from + n].to_vec();
            input[to..to + n].copy_from_slice(&piece);
        }
        // Truncate.
        6 if len > 0 => input.truncate(rng.gen_range(0..len)),
        // Splice in a piece of another seed.
        _ if !other.is_empty() => {
            let n = rng.gen_range(1..=other.len().min(512));
            let from = rng.gen_range(0..=other.len() - n);
            let to = rng.gen_range(0..=len);
            input.splice(to..to, other[from..from + n].iter().copied());
        }
        _ => {}
    }
}

/// Where a failing input is written.
fn failure_path(target: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-smoke-{target}-{name}"))
}

/// Messages of the panics of any thread since the last [`take_panics`].
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn take_panics() -> Vec<String> {
    std::mem::take(&mut *PANICS.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Records every panic, in any thread (the daemons' workers too), then reports it as before.
fn record_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let place = info.location().map(|l| l.to_string()).unwrap_or_default();
            let thread = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            PANICS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("thread {thread} at {place}: {msg}"));
            previous(info);
        }));
    });
}

/// Runs `run` on every seed and regression, then on `iters()` mutations (1 to 4 stacked) of
/// random seeds. Fails with the first panic, in the harness or in any thread of Skiff's,
/// naming the input and where it was saved.
fn smoke(target: &str, seeds: Vec<(String, Vec<u8>)>, run: &dyn Fn(&[u8]) -> Outcome) {
    record_panics();
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let mut inputs: Vec<(String, Vec<u8>)> = seeds.clone();
    inputs.extend(
        regressions(target)
            .into_iter()
            .map(|(n, b)| (format!("regression {n}"), b)),
    );
    let mut rng = StdRng::seed_from_u64(0x5eed_f022);
    for i in 0..iters() {
        let (name, base) = &seeds[rng.gen_range(0..seeds.len())];
        let other = &seeds[rng.gen_range(0..seeds.len())].1;
        let mut input = base.clone();
        for _ in 0..rng.gen_range(1..=4) {
            mutate(&mut rng, &mut input, other);
        }
        inputs.push((format!("mutation {i} of {name}"), input));
    }
    let _ = take_panics();
    let (mut served, mut served_mutations, mut bytes) = (0, 0, 0);
    for (name, input) in &inputs {
        let outcome = catch_unwind(AssertUnwindSafe(|| run(input)));
        let panics = take_panics();
        if outcome.is_err() || !panics.is_empty() {
            let path = failure_path(target, &name.replace([' ', '/'], "-"));
            let _ = std::fs::write(&path, input);
            panic!(
                "{target}: {name} panicked:\n{}\n(input saved as {}; replay it with \
                 scripts/fuzz.sh replay {target} FILE)",
                panics.join("\n"),
                path.display()
            );
        }
        if let Ok(Outcome::Served(n)) = outcome {
            served += 1;
            bytes += n;
            if name.starts_with("mutation") {
                served_mutations += 1;
            }
        }
    }
    eprintln!(
        "{target}: {} inputs, {served} accepted and served ({served_mutations} of them \
         mutations), {bytes} bytes of content (or responses) checked",
        inputs.len()
    );
    // Mutations that get past the parser are what exercise the layers above it.
    assert!(
        served >= seeds.len() && served_mutations > 0,
        "{target}: too few inputs accepted ({served}, {served_mutations} mutations)"
    );
}

#[test]
fn bootstrap_seeds_load() {
    for (name, bytes) in harness::seeds("bootstrap") {
        if let Err(e) = harness::bootstrap::loads(&bytes) {
            panic!("seed {name} no longer loads (regenerate with scripts/fuzz.sh seeds): {e}");
        }
    }
}

#[test]
fn bootstrap() {
    let fixture = harness::bootstrap::Fixture::load();
    smoke("bootstrap", harness::seeds("bootstrap"), &|data| {
        harness::bootstrap::run(&fixture, data)
    });
}

#[test]
fn tar_seeds_apply() {
    for (name, bytes) in harness::seeds("tar") {
        if let Err(e) = harness::tar::applies(&bytes) {
            panic!("seed {name} does not apply: {e}");
        }
    }
}

#[test]
fn tar() {
    smoke("tar", harness::seeds("tar"), &harness::tar::run);
}

#[test]
fn fuse() {
    let fixture = harness::fuse::Fixture::start();
    let seeds = harness::fuse::seeds(&fixture)
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("seed {i}"), s))
        .collect();
    smoke("fuse", seeds, &|data| harness::fuse::run(&fixture, data));
}

#[test]
fn nydus_config() {
    smoke(
        "nydus_config",
        harness::seeds("nydus_config"),
        &harness::nydus_config::run,
    );
}

#[test]
fn api() {
    // The target starts its API server in a network namespace of its own, which needs root.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the api fuzz target needs root (a network namespace)"
        );
        eprintln!("SKIPPED: the api fuzz target needs root (a network namespace)");
        return;
    }
    let fixture = harness::api::Fixture::start();
    smoke("api", harness::seeds("api"), &|data| {
        harness::api::run(&fixture, data)
    });
    // The inputs that hung, misordered or aborted tiny_http 0.12 (docs/fuzzing.md): each
    // request answered in turn, the one at fault with its 4xx, and the daemon still serving.
    let want: &[(&str, &[u16])] = &[
        ("failed-expectation-after-a-request", &[200, 417]),
        ("failed-expectation-answered-out-of-turn", &[400, 400]),
        ("http2-after-a-request", &[200, 400]),
        ("http2-request-deadlocks-its-connection", &[400]),
        ("huge-content-length-after-a-request", &[200, 413]),
        ("huge-content-length-aborts-the-daemon", &[413]),
    ];
    let known = regressions("api");
    for (name, statuses) in want {
        let (_, input) = known
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("fuzz/regressions/api/{name} is missing"));
        assert_eq!(
            harness::api::exchange(&fixture, input),
            *statuses,
            "the answers to {name}"
        );
    }
    assert_eq!(
        harness::api::exchange(&fixture, b"GET /api/v1/daemon HTTP/1.1\r\n\r\n"),
        [200],
        "the daemon serves on"
    );
}
