//! Nydus 2.2's own tools for the tests that read Nydus RAFS v6 images: nydus-image builds the
//! images (the peer writes them, Skiff reads them), nydusd serves them for comparisons.
//!
//! `scripts/install-nydus.sh --image-only` installs nydus-image into
//! `/var/cache/skiff/tools/bin` (scripts/test.sh runs it); `SKIFF_NYDUS_BIN` overrides the
//! directory. A missing tool goes through [`super::require`]: a failure under CI.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the Nydus tools are installed.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("SKIFF_NYDUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("SKIFF_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/skiff"));
            cache.join("tools/bin")
        })
}

/// The nydus-image binary, or why there is none.
pub fn nydus_image() -> Result<PathBuf, String> {
    tool("nydus-image")
}

/// The nydusd binary, or why there is none.
pub fn nydusd() -> Result<PathBuf, String> {
    tool("nydusd")
}

fn tool(name: &str) -> Result<PathBuf, String> {
    let p = bin_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not installed (scripts/install-nydus.sh installs it)",
            p.display()
        ))
    }
}

/// [`super::require`] for nydus-image: its path, or `None` to skip (outside CI).
pub fn require_nydus_image() -> Option<PathBuf> {
    super::require("nydus-image 2.2", nydus_image())
}

/// Runs `nydus-image ARGS`, failing the test with its output unless it exits 0.
pub fn run_nydus_image<S: AsRef<OsStr>>(args: &[S]) -> String {
    let bin = nydus_image().expect("nydus-image");
    let out = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "nydus-image {:?} failed ({}):\n{text}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        out.status
    );
    text
}

/// How [`create_dir_rafs`] builds.
#[derive(Clone, Copy, Debug)]
pub struct BuildOpts {
    /// `--compressor`: none, lz4_block, zstd.
    pub compressor: &'static str,
    /// `--digester`: blake3, sha256.
    pub digester: &'static str,
    /// `--chunk-size`, which nydus-image reads as hex ("0x100000", "0x10000").
    pub chunk_size: &'static str,
}

impl BuildOpts {
    /// A short name for directories and messages.
    pub fn name(&self) -> String {
        format!("{}-{}-{}", self.compressor, self.digester, self.chunk_size)
    }
}

/// Builds directory `src` with `nydus-image create --type dir-rafs` into `out`: the bootstrap
/// at `out/bootstrap`, the blob in `out/blobs` named by its sha256. Returns the bootstrap.
pub fn create_dir_rafs(src: &Path, out: &Path, o: BuildOpts) -> PathBuf {
    let blobs = out.join("blobs");
    std::fs::create_dir_all(&blobs).expect("blob dir");
    let bootstrap = out.join("bootstrap");
    run_nydus_image(&[
        OsStr::new("create"),
        OsStr::new("--log-level"),
        OsStr::new("warn"),
        OsStr::new("--type"),
        OsStr::new("dir-rafs"),
        OsStr::new("--fs-version"),
        OsStr::new("6"),
        OsStr::new("--compressor"),
        OsStr::new(o.compressor),
        OsStr::new("--digester"),
        OsStr::new(o.digester),
        OsStr::new("--chunk-size"),
        OsStr::new(o.chunk_size),
        OsStr::new("--bootstrap"),
        bootstrap.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
        src.as_os_str(),
    ]);
    bootstrap
}

/// The blob files of `blob_dir` (built by [`create_dir_rafs`]).
pub fn blobs_in(blob_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(blob_dir)
        .expect("blob dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}
