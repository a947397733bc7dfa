//! Looking after a cache directory from outside a running daemon: `skiff cache stat` and
//! `skiff cache gc`, and the clean-up of temporary files left by killed processes.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{scan_chunks, ChunkFileLock};

/// A temporary file older than this is removed even if its writer's pid is alive (pids are
/// reused, and another pid namespace may have written it).
const TMP_MAX_AGE: Duration = Duration::from_secs(3600);

/// Whether process `pid` exists (in this pid namespace).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes temporary files whose writer is dead or that are older than an hour; returns how
/// many were removed.
pub(super) fn remove_stale_tmp(root: &Path) -> u64 {
    let mut removed = 0;
    let Ok(entries) = fs::read_dir(root.join("tmp")) else {
        return 0;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .split('.')
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or(0);
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default() > TMP_MAX_AGE)
            .unwrap_or(true);
        if (old || !pid_alive(pid)) && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, dir = %root.display(), "removed stale temporary chunk files");
    }
    removed
}

/// Removes lock files nobody holds (left by failed fetches or killed processes).
fn remove_idle_locks(root: &Path) -> u64 {
    let mut removed = 0;
    let Ok(entries) = fs::read_dir(root.join("locks")) else {
        return 0;
    };
    for e in entries.flatten() {
        if let Ok(Some(l)) = ChunkFileLock::try_lock(e.path()) {
            l.done();
            removed += 1;
        }
    }
    removed
}

/// What a cache directory holds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CacheStat {
    /// The directory.
    pub dir: String,
    /// Chunk files.
    pub chunks: u64,
    /// Bytes in chunk files.
    pub bytes: u64,
    /// Temporary files (chunks being written, or left by killed processes).
    pub tmp_files: u64,
    /// Lock files (chunks being fetched, or left by failures).
    pub lock_files: u64,
    /// Seconds since the least recently used chunk was used.
    pub oldest_access_age_secs: Option<u64>,
}

/// Counts what the cache at `dir` holds.
pub fn stat(dir: &Path) -> CacheStat {
    let chunks = scan_chunks(dir);
    let count = |sub: &str| fs::read_dir(dir.join(sub)).map_or(0, |r| r.flatten().count() as u64);
    let now = SystemTime::now();
    CacheStat {
        dir: dir.display().to_string(),
        chunks: chunks.len() as u64,
        bytes: chunks.iter().map(|c| c.2).sum(),
        tmp_files: count("tmp"),
        lock_files: count("locks"),
        oldest_access_age_secs: chunks
            .iter()
            .map(|c| c.3)
            .min()
            .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
    }
}

/// What `gc` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GcReport {
    /// Stale temporary files removed.
    pub tmp_removed: u64,
    /// Idle lock files removed.
    pub locks_removed: u64,
    /// Chunk files evicted to meet the limit.
    pub chunks_evicted: u64,
    /// Bytes evicted.
    pub bytes_evicted: u64,
    /// Bytes of chunks left.
    pub bytes_left: u64,
}

/// Cleans the cache at `dir`: stale temporary files, idle lock files, and, with `limit`, the
/// least recently used chunks beyond `limit` bytes.
pub fn gc(dir: &Path, limit: Option<u64>) -> GcReport {
    let tmp_removed = remove_stale_tmp(dir);
    let locks_removed = remove_idle_locks(dir);
    let mut chunks = scan_chunks(dir);
    let mut bytes: u64 = chunks.iter().map(|c| c.2).sum();
    let (mut chunks_evicted, mut bytes_evicted) = (0, 0);
    if let Some(limit) = limit {
        chunks.sort_by_key(|c| c.3);
        for (_, path, size, _) in chunks {
            if bytes <= limit {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                chunks_evicted += 1;
                bytes_evicted += size;
                bytes -= size;
            }
        }
    }
    GcReport {
        tmp_removed,
        locks_removed,
        chunks_evicted,
        bytes_evicted,
        bytes_left: bytes,
    }
}
