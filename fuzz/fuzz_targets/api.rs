//! libFuzzer target: nydusd's HTTP API as Skiff serves it (`skiff_fuzz::harness::api`).
#![no_main]

use std::sync::LazyLock;

use skiff_fuzz::harness::api::{run, Fixture};

static FIXTURE: LazyLock<Fixture> = LazyLock::new(Fixture::start);

libfuzzer_sys::fuzz_target!(init: { LazyLock::force(&FIXTURE); }, |data: &[u8]| {
    run(&FIXTURE, data);
    skiff_fuzz::coverage::record();
});
