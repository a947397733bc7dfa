//! Skiff's fuzz targets: the harness they share (`harness/`), used by the libFuzzer binaries in
//! `fuzz_targets/` and, through a `#[path]` include, by the CI smoke test
//! (`tests/fuzz_smoke.rs`), so that both feed Skiff exactly the same way.

pub mod harness;

/// Edge coverage of a corpus (`scripts/fuzz.sh coverage`); only in the instrumented build.
#[cfg(fuzzing)]
pub mod coverage;

/// Without the instrumentation there is nothing to record.
#[cfg(not(fuzzing))]
pub mod coverage {
    /// Does nothing.
    pub fn record() {}
}
