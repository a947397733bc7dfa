//! libFuzzer target: descriptor chains of FUSE requests from a hostile guest, through the
//! vhost-user device of `skiff serve` (`skiff_fuzz::harness::fuse`).
#![no_main]

use std::sync::LazyLock;

use skiff_fuzz::harness::fuse::{run, write_seeds, Fixture};

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let f = Fixture::start();
    // scripts/fuzz.sh asks for the generated seeds this way (then runs no input).
    if let Some(dir) = std::env::var_os("SKIFF_FUZZ_WRITE_SEEDS").filter(|d| !d.is_empty()) {
        write_seeds(&f, std::path::Path::new(&dir)).expect("writing the fuse seeds");
    }
    f
});

libfuzzer_sys::fuzz_target!(init: { LazyLock::force(&FIXTURE); }, |data: &[u8]| {
    run(&FIXTURE, data);
    skiff_fuzz::coverage::record();
});
