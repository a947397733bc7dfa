//! What each fuzz target feeds Skiff and what it checks of the outcome.
//!
//! One module per target, each with a `run` taking the fuzzer's bytes. A target fails (panics,
//! which libFuzzer reports as a crash) when Skiff panics, hangs, or gives an outcome that breaks
//! an invariant: bytes served under a digest they do not have, an accepted layer that does not
//! make a loadable image equal to it, a reply framed wrongly. Rejections are fine: all input is
//! untrusted, and a clear error is the right answer to most of it.
//!
//! This directory is also compiled into the CI smoke test (`tests/fuzz_smoke.rs`) by path, so
//! it uses only crates that Skiff itself depends on.

pub mod api;
pub mod bootstrap;
pub mod fuse;
pub mod input;
pub mod mem;
pub mod nydus_config;
pub mod serve;
pub mod tar;

use std::path::{Path, PathBuf};

/// What one iteration came to, for the smoke test to show that inputs get past the parsers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Refused with an error.
    Rejected,
    /// Accepted, and this much was served and checked: bytes of file content, or (for the
    /// API) responses.
    Served(u64),
}

/// The bytes of file content a served tree holds.
pub fn served_bytes(tree: &serve::Tree) -> u64 {
    tree.values()
        .map(|s| match &s.content {
            Some(serve::Content::Read(b)) => b.len() as u64,
            _ => 0,
        })
        .sum()
}

/// The checked-in seeds (`fuzz/seeds`), found from either crate that compiles this harness.
pub fn seeds_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let here = manifest.join("seeds");
    if here.is_dir() {
        here
    } else {
        manifest.join("fuzz").join("seeds")
    }
}

/// The seed files of `target` (`fuzz/seeds/<target>/*`), sorted by name, with their names.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seeds_dir().join(target);
    let mut out: Vec<(String, Vec<u8>)> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_file())
            .filter_map(|e| {
                let bytes = std::fs::read(e.path()).ok()?;
                Some((e.file_name().to_string_lossy().into_owned(), bytes))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// Renders an error with its whole `#[source]` chain, as an operator would see it: the
/// rendering code runs for every rejection, so it is fuzzed too.
pub fn render(e: &dyn std::error::Error) -> String {
    skiff::util::error_chain(e)
}
