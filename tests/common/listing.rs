//! The tree lister (`guest/lister`): one static program run over a source on the host and over
//! a mount in the microVM, so that the two listings compare line by line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Builds the lister (`guest/build-lister.sh`, cached) and returns its path.
pub fn lister() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build-lister.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err("guest/build-lister.sh failed".into());
    }
    let lister = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !lister.is_file() {
        return Err(format!("lister not built at {}", lister.display()));
    }
    Ok(lister)
}

/// The lister's lines for `root` on the host.
pub fn host_listing(lister: &Path, root: &Path) -> Vec<String> {
    let out = Command::new(lister)
        .arg(root)
        .output()
        .expect("running the lister");
    assert!(out.status.success(), "lister failed on {}", root.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Asserts two listings hold the same lines, naming up to 40 on each side that differ.
pub fn assert_same_listing(host: &[String], guest: &[String]) {
    let h: std::collections::BTreeSet<&String> = host.iter().collect();
    let g: std::collections::BTreeSet<&String> = guest.iter().collect();
    let missing: Vec<_> = h.difference(&g).collect();
    let extra: Vec<_> = g.difference(&h).collect();
    let show = |v: &[&&String]| {
        v.iter()
            .take(40)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        missing.is_empty() && extra.is_empty() && host.len() == guest.len(),
        "{} host lines, {} guest lines\nonly on the host:\n{}\nonly in the guest:\n{}",
        host.len(),
        guest.len(),
        show(&missing),
        show(&extra),
    );
}

/// Columns of a lister line: path, type, mode, uid, gid, size, mtime, ...
const LISTER_SIZE: usize = 5;
const LISTER_MTIME: usize = 6;

/// Lister lines without directories' sizes: a tar layer carries none (an image built from one
/// has its own), so the listing of an image converted from a tar and the source tree's differ
/// there.
pub fn without_dir_sizes(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let mut f: Vec<&str> = l.split('\t').collect();
            if f.get(1) == Some(&"dir") {
                if let Some(size) = f.get_mut(LISTER_SIZE) {
                    *size = "-";
                }
            }
            f.join("\t")
        })
        .collect()
}

/// Lister lines without what nydus-image does not preserve: directories' sizes (EROFS's
/// own), and the root's mtime (none is stored; it is served as the load time, as nydusd does).
pub fn without_unpreserved_v6_fields(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let mut f: Vec<&str> = l.split('\t').collect();
            let is_dir = f.get(1) == Some(&"dir");
            if is_dir {
                if let Some(size) = f.get_mut(LISTER_SIZE) {
                    *size = "-";
                }
            }
            if f.first() == Some(&"/") {
                if let Some(mtime) = f.get_mut(LISTER_MTIME) {
                    *mtime = "-";
                }
            }
            f.join("\t")
        })
        .collect()
}

/// [`without_unpreserved_v6_fields`] for a v6 image nydus-image built from a tar layer
/// (`--type tar-rafs`), which also keeps only the whole seconds of each mtime (a pax header's
/// fraction is dropped): mtimes are compared to the second.
pub fn without_unpreserved_v6_tar_fields(lines: &[String]) -> Vec<String> {
    without_unpreserved_v6_fields(lines)
        .iter()
        .map(|l| {
            let mut f: Vec<String> = l.split('\t').map(str::to_owned).collect();
            if let Some(m) = f.get_mut(LISTER_MTIME) {
                if let Some((secs, _)) = m.split_once('.') {
                    *m = secs.to_owned();
                }
            }
            f.join("\t")
        })
        .collect()
}
