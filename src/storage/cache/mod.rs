//! The on-disk chunk cache shared by every Skiff process on a host.
//!
//! Layout under the cache directory (see docs/cache.md):
//!
//! ```text
//! chunks/ab/abcdef…          verified uncompressed bytes of the chunk whose blake3 is abcdef…
//! chunks-sha256/ab/abcdef…   the same for a chunk named by its sha256 (Nydus images)
//! locks/abcdef…              lock file of a chunk being fetched (flock), removed once stored
//! locks/sha256-abcdef…       the same for a sha256 chunk
//! tmp/abcdef….PID.N          a chunk being written; renamed into place when complete
//! tmp/sha256-abcdef….PID.N   the same for a sha256 chunk
//! bootstraps/sha256-…  bootstraps fetched from registries, by layer digest (see [`BootstrapCache`])
//! ```
//!
//! A chunk file appears whole or not at all (temporary file + rename in one filesystem), is
//! checked against its name (with the algorithm of its directory) each time it is read from
//! disk, and is deleted if it fails. A chunk is keyed by its digest *and* algorithm, so a
//! blake3 and a sha256 digest never stand for each other.
//! Access time is the file's mtime, set on every disk hit; the cache evicts least recently used
//! chunks beyond its byte limit.

mod bootstraps;
mod lock;
mod maintenance;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use bootstraps::BootstrapCache;
pub use lock::{ChunkFileLock, Claim, ClaimError, SingleFlight, TAKEOVER_AFTER};
pub use maintenance::{gc, stat, CacheStat, GcReport};

use super::metrics::{inc, Metrics};
use crate::format::{ChunkDigest, DigestAlgo, DIGEST_LEN};
use crate::util::sync::lock;

/// The cache directory every Skiff process uses unless told otherwise, so that they share.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/skiff/chunks";

/// Evicting goes down to this share (per cent) of the limit, so that it does not run on every
/// store.
const LOW_WATER_PERCENT: u64 = 90;

/// A disk hit updates the file's mtime (its access time for eviction) at most this often.
const TOUCH_INTERVAL: Duration = Duration::from_secs(10);

/// Why the cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("chunk cache {path}: {op}")]
pub struct CacheError {
    /// What was being done.
    pub op: &'static str,
    /// The file or directory.
    pub path: String,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError {
        op,
        path: path.display().to_string(),
        source,
    }
}

#[derive(Clone, Copy)]
struct Entry {
    size: u64,
    atime: SystemTime,
}

#[derive(Default)]
struct Index {
    entries: HashMap<ChunkDigest, Entry>,
    bytes: u64,
}

impl Index {
    fn insert(&mut self, d: ChunkDigest, e: Entry) {
        if let Some(old) = self.entries.insert(d, e) {
            self.bytes -= old.size;
        }
        self.bytes += e.size;
    }

    fn remove(&mut self, d: &ChunkDigest) {
        if let Some(old) = self.entries.remove(d) {
            self.bytes -= old.size;
        }
    }
}

/// The on-disk cache of verified, uncompressed chunks, keyed by chunk digest and algorithm.
pub struct ChunkDiskCache {
    root: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    metrics: Arc<Metrics>,
    tmp_seq: AtomicU64,
}

/// The directory of the chunks digested with `algo`: blake3 chunks keep the layout of the
/// first versions, sha256 chunks have one of their own.
fn chunks_dir(root: &Path, algo: DigestAlgo) -> PathBuf {
    match algo {
        DigestAlgo::Blake3 => root.join("chunks"),
        DigestAlgo::Sha256 => root.join("chunks-sha256"),
    }
}

/// The path of chunk `d` under `root`.
fn chunk_path(root: &Path, d: &ChunkDigest) -> PathBuf {
    let hex = hex::encode(d.bytes);
    chunks_dir(root, d.algo).join(&hex[..2]).join(hex)
}

/// The name of chunk `d` in the `locks` and `tmp` directories.
fn chunk_file_name(d: &ChunkDigest) -> String {
    match d.algo {
        DigestAlgo::Blake3 => hex::encode(d.bytes),
        DigestAlgo::Sha256 => format!("sha256-{}", hex::encode(d.bytes)),
    }
}

/// Parses a 64-digit lowercase hex chunk name.
fn parse_digest(name: &str) -> Option<[u8; DIGEST_LEN]> {
    if name.len() != DIGEST_LEN * 2 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut d = [0u8; DIGEST_LEN];
    hex::decode_to_slice(name, &mut d).ok()?;
    Some(d)
}

/// Every chunk file under `root`, of both algorithms: digest, path, size, mtime.
fn scan_chunks(root: &Path) -> Vec<(ChunkDigest, PathBuf, u64, SystemTime)> {
    let mut out = Vec::new();
    for algo in [DigestAlgo::Blake3, DigestAlgo::Sha256] {
        scan_chunk_dir(root, algo, &mut out);
    }
    out
}

fn scan_chunk_dir(
    root: &Path,
    algo: DigestAlgo,
    out: &mut Vec<(ChunkDigest, PathBuf, u64, SystemTime)>,
) {
    let Ok(shards) = fs::read_dir(chunks_dir(root, algo)) else {
        return;
    };
    for shard in shards.flatten() {
        let Ok(files) = fs::read_dir(shard.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name();
            let Some(bytes) = name.to_str().and_then(parse_digest) else {
                continue;
            };
            let d = ChunkDigest { algo, bytes };
            let Ok(md) = f.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((d, f.path(), md.len(), mtime));
        }
    }
}

impl ChunkDiskCache {
    /// Opens (creating if needed) the cache at `dir`, holding at most `limit` bytes of chunks
    /// (0: no limit). Removes temporary files left by dead processes and indexes what is there.
    pub fn open(dir: &Path, limit: u64, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        for sub in ["chunks", "locks", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        maintenance::remove_stale_tmp(dir);
        let mut index = Index::default();
        for (d, _, size, atime) in scan_chunks(dir) {
            index.insert(d, Entry { size, atime });
        }
        tracing::info!(
            dir = %dir.display(),
            chunks = index.entries.len(),
            bytes = index.bytes,
            limit,
            "chunk cache opened"
        );
        let cache = Self {
            root: dir.to_path_buf(),
            limit,
            index: Mutex::new(index),
            metrics,
            tmp_seq: AtomicU64::new(0),
        };
        cache.evict_if_needed();
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The byte limit (0: none).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes of chunks this process believes the cache holds.
    pub fn bytes(&self) -> u64 {
        lock(&self.index).bytes
    }

    /// Reads chunk `digest` of `len` bytes if cached and intact. A file of the wrong size or
    /// digest (computed with the digest's own algorithm) is logged and deleted, and counts as a
    /// miss.
    pub fn get(&self, digest: &ChunkDigest, len: usize) -> Option<Vec<u8>> {
        let path = chunk_path(&self.root, digest);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open cached chunk");
                }
                lock(&self.index).remove(digest);
                return None;
            }
        };
        // Read one byte more than expected, so that a longer file shows.
        let mut buf = Vec::with_capacity(len + 1);
        let read = (&mut f).take(len as u64 + 1).read_to_end(&mut buf);
        let ok = matches!(read, Ok(n) if n == len) && digest.matches(&buf);
        if !ok {
            inc(&self.metrics.disk_corrupt);
            tracing::error!(
                path = %path.display(),
                got_len = buf.len(),
                want_len = len,
                "cached chunk is corrupt; deleting it and fetching again"
            );
            let _ = fs::remove_file(&path);
            lock(&self.index).remove(digest);
            return None;
        }
        let now = SystemTime::now();
        let touch = {
            let mut g = lock(&self.index);
            let e = g.entries.get(digest).copied();
            let stale =
                e.is_none_or(|e| now.duration_since(e.atime).unwrap_or_default() >= TOUCH_INTERVAL);
            g.insert(
                *digest,
                Entry {
                    size: len as u64,
                    atime: if stale {
                        now
                    } else {
                        e.map_or(now, |e| e.atime)
                    },
                },
            );
            stale
        };
        if touch {
            let _ = f.set_modified(now);
        }
        Some(buf)
    }

    /// Whether chunk `digest` has a file in the cache (not verified).
    pub fn contains(&self, digest: &ChunkDigest) -> bool {
        chunk_path(&self.root, digest).is_file()
    }

    /// Stores the verified bytes of chunk `digest`: writes a temporary file, then renames it into
    /// place, so that no reader ever sees part of a chunk. Failures (a full disk, say) are
    /// logged; the cache is an optimisation and never fails a read.
    pub fn put(&self, digest: &ChunkDigest, data: &[u8]) {
        if let Err(e) = self.try_put(digest, data) {
            tracing::warn!(error = %crate::util::error_chain(&e), "cannot store chunk in the cache");
            return;
        }
        inc(&self.metrics.disk_stores);
        lock(&self.index).insert(
            *digest,
            Entry {
                size: data.len() as u64,
                atime: SystemTime::now(),
            },
        );
        self.evict_if_needed();
    }

    fn try_put(&self, digest: &ChunkDigest, data: &[u8]) -> Result<(), CacheError> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{seq}",
            chunk_file_name(digest),
            std::process::id()
        ));
        let dest = chunk_path(&self.root, digest);
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
            f.write_all(data).map_err(io_err("writing", &tmp))?;
            // No fsync: every read from disk checks the digest, so a file torn by a power loss
            // is found, deleted and fetched again (docs/cache.md).
            drop(f);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
            }
            fs::rename(&tmp, &dest).map_err(io_err("renaming into", &dest))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The lock path of chunk `digest`.
    fn lock_path(&self, digest: &ChunkDigest) -> PathBuf {
        self.root.join("locks").join(chunk_file_name(digest))
    }

    /// Takes the cross-process lock of chunk `digest`, waiting for another process until
    /// `until` (for ever with `None`); `Ok(None)` if it still holds the lock then.
    pub fn lock_until(
        &self,
        digest: &ChunkDigest,
        until: Option<std::time::Instant>,
    ) -> Result<Option<ChunkFileLock>, CacheError> {
        let p = self.lock_path(digest);
        ChunkFileLock::lock_until(p.clone(), until).map_err(io_err("locking", &p))
    }

    /// Takes the cross-process lock of chunk `digest` if nobody holds it.
    pub fn try_lock(&self, digest: &ChunkDigest) -> Result<Option<ChunkFileLock>, CacheError> {
        let p = self.lock_path(digest);
        ChunkFileLock::try_lock(p.clone()).map_err(io_err("locking", &p))
    }

    /// Evicts least recently used chunks while the cache holds more than its limit. Other
    /// processes add chunks too, so the directory is scanned again before choosing victims.
    fn evict_if_needed(&self) {
        if self.limit == 0 {
            return;
        }
        let mut g = lock(&self.index);
        if g.bytes <= self.limit {
            return;
        }
        // Merge what is on disk (other processes' chunks, their access times) into the index.
        let mut fresh = Index::default();
        for (d, _, size, mtime) in scan_chunks(&self.root) {
            let atime = g.entries.get(&d).map_or(mtime, |e| e.atime.max(mtime));
            fresh.insert(d, Entry { size, atime });
        }
        *g = fresh;
        if g.bytes <= self.limit {
            return;
        }
        let target = self.limit / 100 * LOW_WATER_PERCENT;
        let mut by_age: Vec<(ChunkDigest, Entry)> =
            g.entries.iter().map(|(d, e)| (*d, *e)).collect();
        by_age.sort_by_key(|(_, e)| e.atime);
        let mut evicted = 0u64;
        for (d, _) in by_age {
            if g.bytes <= target {
                break;
            }
            let p = chunk_path(&self.root, &d);
            match fs::remove_file(&p) {
                Ok(()) => {
                    evicted += 1;
                    inc(&self.metrics.disk_evictions);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot evict chunk");
                    continue;
                }
            }
            g.remove(&d);
        }
        tracing::debug!(
            evicted,
            bytes = g.bytes,
            limit = self.limit,
            "chunk cache evicted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (ChunkDigest, Vec<u8>) {
        let data = vec![n; len];
        (ChunkDigest::blake3(*blake3::hash(&data).as_bytes()), data)
    }

    #[test]
    fn put_get_corrupt_and_evict() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Arc::new(Metrics::default());
        let c = ChunkDiskCache::open(dir.path(), 10_000, m.clone()).expect("open");
        let (d1, b1) = chunk(1, 3000);
        assert!(c.get(&d1, 3000).is_none());
        c.put(&d1, &b1);
        assert_eq!(c.get(&d1, 3000).as_deref(), Some(&b1[..]));
        // Corrupt the file: detected, deleted, a miss.
        let p = chunk_path(dir.path(), &d1);
        let mut bad = b1.clone();
        bad[7] ^= 1;
        fs::write(&p, &bad).expect("write");
        assert!(c.get(&d1, 3000).is_none());
        assert!(!p.exists());
        assert_eq!(m.disk_corrupt.load(Ordering::Relaxed), 1);
        // Truncated file: same.
        c.put(&d1, &b1);
        fs::write(&p, &b1[..100]).expect("write");
        assert!(c.get(&d1, 3000).is_none());
        // Over the limit: the least recently used go.
        for n in 2..8u8 {
            let (d, b) = chunk(n, 3000);
            c.put(&d, &b);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(c.bytes() <= 10_000, "{}", c.bytes());
        let (d7, _) = chunk(7, 3000);
        let (d2, _) = chunk(2, 3000);
        assert!(c.contains(&d7));
        assert!(!c.contains(&d2));
        // A reopened cache sees the same chunks; stale temporary files are removed.
        let stale = dir
            .path()
            .join("tmp")
            .join(format!("{}.999999999.0", chunk_file_name(&d7)));
        fs::write(&stale, b"half").expect("write");
        let c2 = ChunkDiskCache::open(dir.path(), 10_000, m).expect("reopen");
        assert!(!stale.exists());
        assert_eq!(c2.bytes(), c.bytes());
    }

    #[test]
    fn the_limit_holds_after_a_panic_poisoned_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Arc::new(ChunkDiskCache::open(dir.path(), 10_000, Arc::default()).expect("open"));
        let c2 = c.clone();
        let panicked = std::thread::spawn(move || {
            let _g = lock(&c2.index);
            panic!("injected while holding the index");
        })
        .join();
        assert!(panicked.is_err() && c.index.is_poisoned());
        for n in 1..10u8 {
            let (d, b) = chunk(n, 3000);
            c.put(&d, &b);
            std::thread::sleep(Duration::from_millis(2));
        }
        // Eviction still ran: the limit is kept on disk, not only in the index.
        assert!(c.bytes() <= 10_000, "{}", c.bytes());
        let on_disk: u64 = scan_chunks(dir.path()).iter().map(|(_, _, s, _)| s).sum();
        assert!(on_disk <= 10_000, "{on_disk} bytes on disk");
    }
}

#[cfg(test)]
mod sha256_tests {
    use super::*;

    #[test]
    fn sha256_chunks_have_their_own_place_and_are_verified_with_sha256() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Arc::new(Metrics::default());
        let c = ChunkDiskCache::open(dir.path(), 0, m.clone()).expect("open");
        let data = vec![5u8; 4000];
        let sha = ChunkDigest {
            algo: DigestAlgo::Sha256,
            bytes: DigestAlgo::Sha256.digest(&data),
        };
        let b3 = ChunkDigest::blake3(DigestAlgo::Blake3.digest(&data));
        c.put(&sha, &data);
        assert!(c.contains(&sha));
        assert!(!c.contains(&b3));
        assert!(dir
            .path()
            .join("chunks-sha256")
            .join(&hex::encode(sha.bytes)[..2])
            .is_dir());
        assert_eq!(c.get(&sha, 4000).as_deref(), Some(&data[..]));
        // The same bytes under the blake3 name are not there.
        assert!(c.get(&ChunkDigest::blake3(sha.bytes), 4000).is_none());
        // A file in the sha256 place whose sha256 is wrong is corrupt, even though it is named
        // by a digest of something.
        let p = chunk_path(dir.path(), &sha);
        fs::write(&p, vec![6u8; 4000]).expect("write");
        assert!(c.get(&sha, 4000).is_none());
        assert!(!p.exists());
        // stat and gc see both places.
        c.put(&sha, &data);
        c.put(&b3, &data);
        let st = maintenance::stat(dir.path());
        assert_eq!((st.chunks, st.bytes), (2, 8000));
        let report = maintenance::gc(dir.path(), Some(0));
        assert_eq!(report.chunks_evicted, 2);
        assert_eq!(maintenance::stat(dir.path()).chunks, 0);
        // Eviction by the limit too.
        let small = ChunkDiskCache::open(dir.path(), 5000, m).expect("open");
        small.put(&sha, &data);
        std::thread::sleep(Duration::from_millis(5));
        small.put(&b3, &data);
        assert!(small.bytes() <= 5000);
        assert!(!small.contains(&sha) && small.contains(&b3));
    }
}
