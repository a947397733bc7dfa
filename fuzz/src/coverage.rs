//! Which instrumented edges a corpus reaches, for `scripts/fuzz.sh coverage`.
//!
//! libFuzzer counts covered edges (`cov:`) but can only name them with a sanitizer runtime,
//! which the stable toolchain lacks. SanitizerCoverage's own tables are in the binary, though:
//! one 8-bit counter per edge (`__sancov_cntrs`) and the address of each (`__sancov_pcs`).
//! With `SKIFF_FUZZ_COVERAGE_OUT=FILE`, a target ORs the counters after every input it runs
//! (libFuzzer clears them before each) and, at exit, writes one line per edge: its address
//! relative to the binary's load address and whether any input reached it. The script then
//! names the addresses with llvm-symbolizer and sums them by source file.

use std::io::Write;
use std::sync::{Mutex, Once, OnceLock};

extern "C" {
    // Linker-defined bounds of SanitizerCoverage's sections in this binary.
    static __start___sancov_cntrs: u8;
    static __stop___sancov_cntrs: u8;
    static __start___sancov_pcs: usize;
    static __stop___sancov_pcs: usize;
}

/// Edges reached by any input so far.
static SEEN: Mutex<Vec<bool>> = Mutex::new(Vec::new());
/// Where to write them at exit, when coverage is asked for.
static OUT: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();

fn counters() -> &'static [u8] {
    // SAFETY: the linker defines both symbols as the bounds of the counters section, which
    // lives for the whole process; the counters are plain bytes, written by instrumented code
    // in any thread (a torn read only misses or finds a hit, which is all this looks at).
    unsafe {
        let start = &raw const __start___sancov_cntrs;
        let stop = &raw const __stop___sancov_cntrs;
        std::slice::from_raw_parts(start, stop as usize - start as usize)
    }
}

fn pcs() -> &'static [usize] {
    // SAFETY: as for `counters`: the linker's bounds of the PC table, an array of
    // (address, flags) pairs of `usize`, written once by the module constructor.
    unsafe {
        let start = &raw const __start___sancov_pcs;
        let stop = &raw const __stop___sancov_pcs;
        std::slice::from_raw_parts(start, (stop as usize - start as usize) / size_of::<usize>())
    }
}

/// After an input: notes the edges it reached, when coverage is asked for.
pub fn record() {
    let Some(_) = OUT.get_or_init(|| {
        let out = std::env::var_os("SKIFF_FUZZ_COVERAGE_OUT")
            .filter(|v| !v.is_empty())
            .map(Into::into);
        if out.is_some() {
            static AT_EXIT: Once = Once::new();
            // SAFETY: `dump` is an `extern "C" fn()` that never unwinds across the boundary
            // (it catches everything and only writes a file).
            AT_EXIT.call_once(|| unsafe {
                libc::atexit(dump);
            });
        }
        out
    }) else {
        return;
    };
    let c = counters();
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.len() != c.len() {
        seen.resize(c.len(), false);
    }
    for (s, &n) in seen.iter_mut().zip(c) {
        *s |= n != 0;
    }
}

extern "C" fn dump() {
    let _ = std::panic::catch_unwind(|| {
        let Some(Some(path)) = OUT.get() else { return };
        let seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        // The load address, so that the addresses can be looked up in the file.
        // SAFETY: Dl_info is plain data (pointers and integers), valid all zero.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr reads the address of a function of this binary and fills `info`.
        let base = unsafe {
            libc::dladdr(dump as *const libc::c_void, &mut info);
            info.dli_fbase as usize
        };
        let Ok(f) = std::fs::File::create(path) else {
            return;
        };
        let mut w = std::io::BufWriter::new(f);
        for (i, pair) in pcs().chunks_exact(2).enumerate() {
            let hit = seen.get(i).copied().unwrap_or(false);
            let _ = writeln!(w, "{:#x} {}", pair[0].wrapping_sub(base), u8::from(hit));
        }
    });
}
