//! Link-time settings of the `skiff` binary.
//!
//! Relative relocations packed (`-z pack-relative-relocs`, DT_RELR): a position-independent
//! Rust binary carries one 24-byte `.rela.dyn` entry per pointer to relocate (about 17,000 in
//! skiff, 400 KiB), all read by the dynamic loader at every start and so resident in every
//! daemon; packed, they take 5 KiB. Measured: 0.6-1.0 MiB less RSS per idle daemon
//! (docs/benchmarks.md, "Memory per daemon"). DT_RELR needs glibc 2.36 at run time and a
//! linker that knows it (binutils 2.38, lld 15): used when the build host's glibc is 2.36 or
//! newer and it builds for itself; `SKIFF_NO_RELR=1` turns it off.

use std::process::Command;

fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(v) = text.split_whitespace().nth(1) else {
        return false;
    };
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SKIFF_NO_RELR");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    let wanted = std::env::var_os("SKIFF_NO_RELR").is_none_or(|v| v.is_empty() || v == "0");
    if wanted && target == host && target.ends_with("-linux-gnu") && glibc_at_least(2, 36) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
