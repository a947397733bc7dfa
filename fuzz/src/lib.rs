//! Skiff's fuzz targets: the harness they share (`harness/`), used by the libFuzzer binaries in
//! `fuzz_targets/` and, through a `#[path]` include, by the CI smoke test
//! (`tests/fuzz_smoke.rs`), so that both feed Skiff exactly the same way.

pub mod harness;
