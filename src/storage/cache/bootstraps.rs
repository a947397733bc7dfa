//! Bootstraps fetched from registries, kept beside the chunks by layer digest, so that every
//! process starting the same image on a host fetches its bootstrap once (and a restarted daemon
//! not at all).
//!
//! ```text
//! bootstraps/sha256-abcdef…   the bootstrap layer whose digest is sha256:abcdef…
//! locks/bootstrap-sha256-…    lock file of a bootstrap being fetched (flock)
//! ```
//!
//! The cache holds bytes only: whoever reads a bootstrap from here validates it as it would a
//! fetched one (the bootstrap's own Merkle tree and whole-file digest, and the manifest's root
//! digest or layer digest), and calls [`BootstrapCache::remove`] if it fails.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{io_err, CacheError, ChunkFileLock};

/// Counter for unique temporary file names within this process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The bootstraps of a cache directory.
#[derive(Debug, Clone)]
pub struct BootstrapCache {
    root: PathBuf,
}

/// The file name for layer digest `digest` (`algorithm:hex`), or `None` for anything that is not
/// a plain digest (the name comes from a registry's manifest).
fn file_name(digest: &str) -> Option<String> {
    let (alg, hex) = digest.split_once(':')?;
    let alg_ok = !alg.is_empty() && alg.bytes().all(|b| b.is_ascii_alphanumeric());
    let hex_ok = (32..=128).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit());
    (alg_ok && hex_ok).then(|| format!("{alg}-{hex}"))
}

impl BootstrapCache {
    /// The bootstraps of the cache at `dir`, creating its directories if needed.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        for sub in ["bootstraps", "locks", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        Ok(Self {
            root: dir.to_path_buf(),
        })
    }

    fn path(&self, digest: &str) -> Option<PathBuf> {
        file_name(digest).map(|n| self.root.join("bootstraps").join(n))
    }

    /// The cached bytes of the bootstrap layer `digest`, unverified.
    pub fn get(&self, digest: &str) -> Option<Vec<u8>> {
        fs::read(self.path(digest)?).ok()
    }

    /// Keeps `bytes` as the bootstrap layer `digest` (already verified by the caller). A failure
    /// is logged: the cache only saves a fetch.
    pub fn put(&self, digest: &str, bytes: &[u8]) {
        let Some(dest) = self.path(digest) else {
            return;
        };
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("bootstrap.{}.{seq}", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
            f.write_all(bytes).map_err(io_err("writing", &tmp))?;
            drop(f);
            // Rename, so that another process reads a whole bootstrap or none.
            fs::rename(&tmp, &dest).map_err(io_err("renaming into", &dest))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(error = %crate::util::error_chain(&e), "cannot keep the bootstrap in the cache");
        }
    }

    /// Drops a cached bootstrap that failed validation.
    pub fn remove(&self, digest: &str) {
        if let Some(p) = self.path(digest) {
            let _ = fs::remove_file(p);
        }
    }

    /// Takes the cross-process lock of bootstrap `digest`, waiting while another process
    /// fetches it. `None` for a digest that cannot name a file.
    pub fn lock(&self, digest: &str) -> Result<Option<ChunkFileLock>, CacheError> {
        let Some(name) = file_name(digest) else {
            return Ok(None);
        };
        let p = self.root.join("locks").join(format!("bootstrap-{name}"));
        // No deadline: this runs once, before serving, while the holder fetches what this
        // process needs too.
        ChunkFileLock::lock_until(p.clone(), None).map_err(io_err("locking", &p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_digests_name_files() {
        let hex = "ab".repeat(32);
        assert_eq!(
            file_name(&format!("sha256:{hex}")),
            Some(format!("sha256-{hex}"))
        );
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha/256:{hex}"),
            format!(":{hex}"),
            "sha256:abc".to_string(),
            format!("sha256:{hex}/x"),
            hex.clone(),
        ] {
            assert_eq!(file_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn put_get_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = BootstrapCache::open(dir.path()).expect("open");
        let d = format!("sha256:{}", "cd".repeat(32));
        assert_eq!(c.get(&d), None);
        let lock = c
            .lock(&d)
            .expect("lock")
            .expect("a lock for a plain digest");
        c.put(&d, b"bootstrap bytes");
        lock.done();
        assert_eq!(c.get(&d).as_deref(), Some(&b"bootstrap bytes"[..]));
        c.remove(&d);
        assert_eq!(c.get(&d), None);
        assert!(c.lock("sha256:../x").expect("no error").is_none());
    }
}
