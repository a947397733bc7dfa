//! libFuzzer target: the tar reader and whiteout applier, and the image made of what they
//! accept (`skiff_fuzz::harness::tar`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    skiff_fuzz::harness::tar::run(data);
    skiff_fuzz::coverage::record();
});
