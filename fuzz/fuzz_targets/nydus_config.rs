//! libFuzzer target: nydusd's JSON configuration (`skiff_fuzz::harness::nydus_config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    skiff_fuzz::harness::nydus_config::run(data);
    skiff_fuzz::coverage::record();
});
