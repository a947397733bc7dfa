//! libFuzzer target: both bootstrap parsers, and the filesystem over what they accept
//! (`skiff_fuzz::harness::bootstrap`).
#![no_main]

use std::sync::LazyLock;

use skiff_fuzz::harness::bootstrap::{run, Fixture};

static FIXTURE: LazyLock<Fixture> = LazyLock::new(Fixture::load);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    run(&FIXTURE, data);
    skiff_fuzz::coverage::record();
});
