//! The daemon's storage configuration (the `--config` JSON file, see `configs/skiff.json`), and
//! putting the storage stack together from it: backend → retries → caches → prefetch.
//!
//! Unknown keys are errors: a setting that was misspelt must not be silently ignored.

use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::prefetch::{self, PrefetchHandle, PrefetchOptions};
use super::{
    BlobBackend, CachedChunkSource, ChunkDiskCache, LocalFsBackend, Metrics, RetryPolicy,
    RetryingBackend, S3Backend, S3Config, DEFAULT_CACHE_DIR,
};
use crate::format::Bootstrap;
use crate::runtime::threads::{self, ThreadKind};

/// Threads fetching ahead of the reads from a remote backend: each holds one request in
/// flight, beside the requests of the reads themselves.
const FETCH_AHEAD_WORKERS: usize = 3;

/// A byte count written as a number or as a string such as `"512M"` or `"10G"`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum ByteSize {
    /// Plain bytes.
    Bytes(u64),
    /// With a unit: K, M, G (powers of 1024).
    Text(String),
}

impl ByteSize {
    /// The number of bytes.
    pub fn get(&self) -> Result<u64, ConfigError> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(s) => crate::util::parse_size(s).map_err(ConfigError::Invalid),
        }
    }
}

/// Where blobs come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    /// A local directory of blob files named by hex id.
    Localfs {
        /// The directory.
        dir: PathBuf,
    },
    /// S3-compatible object storage.
    S3(S3Config),
    /// An OCI registry (filled in by the registry backend; refused until then).
    Registry(serde_json::Map<String, serde_json::Value>),
}

/// The on-disk chunk cache.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The directory (default `/var/cache/skiff/chunks` for remote backends; none for localfs).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Byte limit, kept by evicting least recently used chunks (default: none).
    #[serde(default)]
    pub limit: Option<ByteSize>,
    /// `false` turns the disk cache off, whatever the backend.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// What to fetch in the background.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchConfig {
    /// A file of image paths, one per line, fetched first (after the bootstrap's own list).
    #[serde(default)]
    pub files: Option<PathBuf>,
    /// Then every chunk of the image.
    #[serde(default)]
    pub all: bool,
    /// Bytes per second prefetch may use.
    #[serde(default)]
    pub bandwidth: Option<ByteSize>,
    /// Use the bootstrap's prefetch table (default true).
    #[serde(default)]
    pub use_image_list: Option<bool>,
    /// Image paths fetched first (after the bootstrap's table and `files`); a directory
    /// stands for every file under it. A path missing from the image is an error.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Worker threads (default 1: one backend request at a time).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Largest merged request (default 8M).
    #[serde(default)]
    pub merge: Option<ByteSize>,
}

/// Backend request retries and concurrency.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request (default 5).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// First backoff delay in milliseconds (default 50).
    #[serde(default)]
    pub base_delay_ms: Option<u64>,
    /// Longest backoff delay in milliseconds (default 2000).
    #[serde(default)]
    pub max_delay_ms: Option<u64>,
    /// Backend requests in flight at once (default 16).
    #[serde(default)]
    pub max_requests: Option<usize>,
}

/// The whole storage configuration of a `skiff mount` or `skiff serve`.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where blobs come from.
    #[serde(default)]
    pub backend: Option<BackendConfig>,
    /// The disk cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Background prefetch.
    #[serde(default)]
    pub prefetch: PrefetchConfig,
    /// Retries and concurrency.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Write the metrics as JSON here, every second and at exit.
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
    /// In-memory chunk cache in bytes (default: 4 chunks, 4M at the default chunk size; see
    /// [`super::default_memory_cache`]).
    #[serde(default)]
    pub memory_cache: Option<ByteSize>,
    /// Decode and verify the chunks that follow a read in its blob ahead of need, on another
    /// thread, into half of the memory cache (default true; see [`super::ahead`]). Only chunks
    /// of local blobs or of the disk cache: never over the network.
    #[serde(default)]
    pub decode_ahead: Option<bool>,
}

/// Why the storage stack could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("config {path}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A value is wrong or settings conflict.
    #[error("{0}")]
    Invalid(String),
    /// The backend could not be created.
    #[error("backend")]
    Backend(#[source] super::BackendError),
    /// The cache directory could not be used.
    #[error(transparent)]
    Cache(#[from] super::cache::CacheError),
}

impl StorageConfig {
    /// Reads a JSON config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    fn retry_policy(&self) -> RetryPolicy {
        let d = RetryPolicy::default();
        let r = &self.retry;
        RetryPolicy {
            attempts: r.attempts.unwrap_or(d.attempts).max(1),
            base_delay: r.base_delay_ms.map_or(d.base_delay, Duration::from_millis),
            max_delay: r.max_delay_ms.map_or(d.max_delay, Duration::from_millis),
            max_in_flight: r.max_requests.unwrap_or(d.max_in_flight).max(1),
        }
    }

    /// Sets up backend, caches and prefetch for `bootstrap`, and starts the background work
    /// (prefetch, metrics file).
    pub fn open(&self, bootstrap: &Arc<Bootstrap>) -> Result<StorageStack, ConfigError> {
        let (backend, remote): (Box<dyn BlobBackend>, bool) = match &self.backend {
            None => {
                return Err(ConfigError::Invalid(
                    "no backend: give --blob-dir, --backend s3 ... or a config file".into(),
                ))
            }
            Some(BackendConfig::Localfs { dir }) => (Box::new(LocalFsBackend::new(dir)), false),
            Some(BackendConfig::S3(c)) => (
                Box::new(S3Backend::new(c).map_err(ConfigError::Backend)?),
                true,
            ),
            Some(BackendConfig::Registry(_)) => {
                return Err(ConfigError::Invalid(
                    "the registry backend is not available in this build".into(),
                ))
            }
        };
        self.open_with_backend(bootstrap, backend, remote)
    }

    /// The disk cache directory in use, if any: the configured one, else the default for a
    /// `remote` backend.
    pub fn cache_dir(&self, remote: bool) -> Option<PathBuf> {
        match (self.cache.enabled, &self.cache.dir) {
            (Some(false), _) => None,
            (_, Some(d)) => Some(d.clone()),
            (_, None) if remote => Some(PathBuf::from(DEFAULT_CACHE_DIR)),
            (_, None) => None,
        }
    }

    /// Like [`Self::open`], over a backend built elsewhere (an image's registry backend);
    /// `remote` says whether the disk cache is on by default, as for any remote backend.
    pub fn open_with_backend(
        &self,
        bootstrap: &Arc<Bootstrap>,
        backend: Box<dyn BlobBackend>,
        remote: bool,
    ) -> Result<StorageStack, ConfigError> {
        let metrics = Arc::new(Metrics::default());
        let backend_name = backend.name();
        let backend = RetryingBackend::new(backend, self.retry_policy(), metrics.clone());
        let cache_dir = self.cache_dir(remote);
        let limit = match &self.cache.limit {
            Some(l) => l.get()?,
            None => 0,
        };
        if limit > 0 && cache_dir.is_none() {
            return Err(ConfigError::Invalid(
                "a cache limit needs a cache directory".into(),
            ));
        }
        let disk = match &cache_dir {
            Some(d) => Some(ChunkDiskCache::open(d, limit, metrics.clone())?),
            None => None,
        };
        let mem = match &self.memory_cache {
            Some(m) => usize::try_from(m.get()?).unwrap_or(usize::MAX),
            None => super::default_memory_cache(bootstrap.chunk_size()),
        };
        let source = Arc::new(CachedChunkSource::new(backend, mem, disk, metrics.clone()));
        if remote {
            source.start_fetch_ahead(FETCH_AHEAD_WORKERS);
        }
        if self.decode_ahead.unwrap_or(true) {
            source.start_decode_ahead(bootstrap.clone());
        }

        let mut first: Vec<u32> = Vec::new();
        if self.prefetch.use_image_list.unwrap_or(true) {
            first.extend(bootstrap.prefetch());
        }
        if let Some(f) = &self.prefetch.files {
            first.extend(read_prefetch_list(bootstrap, f)?);
        }
        first.extend(resolve_prefetch_paths(
            bootstrap,
            &self.prefetch.paths,
            "prefetch path",
        )?);
        let opts = PrefetchOptions {
            first,
            all: self.prefetch.all,
            bandwidth: match &self.prefetch.bandwidth {
                Some(b) => Some(b.get()?),
                None => None,
            },
            threads: self.prefetch.threads.unwrap_or(1).clamp(1, 1024),
            merge_bytes: match &self.prefetch.merge {
                Some(m) => m.get()?,
                None => 0,
            },
        };
        let wants_prefetch = !opts.first.is_empty() || opts.all;
        let asked =
            self.prefetch.all || self.prefetch.files.is_some() || !self.prefetch.paths.is_empty();
        if wants_prefetch && cache_dir.is_none() && asked {
            return Err(ConfigError::Invalid(
                "prefetch needs a disk cache to fetch into (give --cache-dir)".into(),
            ));
        }
        let prefetch = (wants_prefetch && cache_dir.is_some())
            .then(|| prefetch::spawn(bootstrap.clone(), source.clone(), opts));
        let writer = self
            .metrics_file
            .clone()
            .map(|p| MetricsWriter::start(p, metrics.clone(), backend_name));
        Ok(StorageStack {
            source,
            metrics,
            backend_name,
            remote,
            prefetch,
            writer,
        })
    }
}

/// Reads a prefetch list: image paths, one per line, `#` comments; a directory stands for every
/// file under it. A path missing from the image is an error.
pub fn read_prefetch_list(bootstrap: &Bootstrap, path: &Path) -> Result<Vec<u32>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    resolve_prefetch_paths(
        bootstrap,
        &lines,
        &format!("prefetch list {}", path.display()),
    )
}

/// The files at or under each of `paths` in the image, in order (`what` names the list in
/// errors). A path missing from the image is an error.
pub fn resolve_prefetch_paths(
    bootstrap: &Bootstrap,
    paths: &[String],
    what: &str,
) -> Result<Vec<u32>, ConfigError> {
    let mut out = Vec::new();
    for p in paths {
        let ino = prefetch::resolve(bootstrap, p)
            .ok_or_else(|| ConfigError::Invalid(format!("{what}: {p}: not in the image")))?;
        prefetch::files_under(bootstrap, ino, &mut out);
    }
    Ok(out)
}

/// The chunk source over the configured backend.
pub type ConfiguredSource = CachedChunkSource<RetryingBackend<Box<dyn BlobBackend>>>;

/// A running storage stack: the chunk source to serve from, its metrics, and background work.
pub struct StorageStack {
    /// The chunk source.
    pub source: Arc<ConfiguredSource>,
    /// The counters (for the Kata API's `/metrics`).
    pub metrics: Arc<Metrics>,
    /// The backend's name, for metrics.
    pub backend_name: &'static str,
    /// Whether the backend is remote (each request a round trip, bytes worth counting).
    pub remote: bool,
    prefetch: Option<PrefetchHandle>,
    writer: Option<MetricsWriter>,
}

impl StorageStack {
    /// The metrics now.
    pub fn snapshot(&self) -> super::MetricsSnapshot {
        self.metrics.snapshot(self.backend_name)
    }

    /// Stops prefetch, writes the metrics file one last time and logs the traffic totals.
    pub fn finish(mut self) {
        if let Some(p) = self.prefetch.take() {
            p.stop();
        }
        if let Some(w) = self.writer.take() {
            w.finish();
        }
        let s = self.snapshot();
        // One line a benchmark or an operator can read: what was fetched against what the
        // reads needed.
        tracing::info!(
            backend = s.backend,
            requests = s.backend_requests,
            bytes = s.backend_bytes,
            chunks_fetched = s.chunks_fetched,
            demand_chunks = s.demand_chunks,
            demand_stored_bytes = s.demand_stored_bytes,
            prefetch_bytes = s.prefetch_bytes,
            disk_hits = s.disk_hits,
            fetch_seconds = format_args!("{:.3}", s.fetch_latency_sum_seconds),
            "storage totals"
        );
    }
}

/// Writes the metrics JSON to a file every second and at the end (atomically, by rename).
struct MetricsWriter {
    /// Dropping it wakes the thread at once, to stop.
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    metrics: Arc<Metrics>,
    backend: &'static str,
}

fn write_metrics(path: &Path, metrics: &Metrics, backend: &str) {
    let text = metrics.snapshot(backend).to_json();
    if let Err(e) = crate::util::write_atomically(path, text.as_bytes()) {
        tracing::warn!(path = %path.display(), error = %crate::util::error_chain(&e), "cannot write metrics file");
    }
}

impl MetricsWriter {
    fn start(path: PathBuf, metrics: Arc<Metrics>, backend: &'static str) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (p, m) = (path.clone(), metrics.clone());
        let thread = threads::spawn(ThreadKind::Housekeeping, "skiff-metrics", move || {
            // Every second, until the sender is dropped.
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_secs(1))
            {
                write_metrics(&p, &m, backend);
            }
        })
        .map_err(|e| tracing::warn!(error = %e, "no metrics file writer"))
        .ok();
        write_metrics(&path, &metrics, backend);
        Self {
            stop: Some(stop),
            thread,
            path,
            metrics,
            backend,
        }
    }

    fn finish(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        write_metrics(&self.path, &self.metrics, self.backend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_refuses_unknown_keys() {
        let c: StorageConfig = serde_json::from_str(
            r#"{"backend": {"type": "s3", "endpoint": "http://127.0.0.1:9000", "bucket": "b",
                 "prefix": "blobs/", "path_style": true},
                "cache": {"dir": "/tmp/c", "limit": "1G"},
                "prefetch": {"all": true, "bandwidth": 1048576}}"#,
        )
        .expect("parse");
        assert!(matches!(c.backend, Some(BackendConfig::S3(ref s)) if s.prefix == "blobs/"));
        assert_eq!(
            c.cache.limit.as_ref().map(|l| l.get().ok()),
            Some(Some(1 << 30))
        );
        for bad in [
            r#"{"backend": {"type": "s3", "endpoint": "x", "bucket": "b", "bukket": 1}}"#,
            r#"{"backend": {"type": "localfs", "dir": "/x", "extra": 1}}"#,
            r#"{"cache": {"dir": "/x", "size": 1}}"#,
            r#"{"prefetch": {"al": true}}"#,
            r#"{"cahce": {}}"#,
        ] {
            assert!(serde_json::from_str::<StorageConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sample_config_parses() {
        let text = include_str!("../../configs/skiff.json");
        let c: StorageConfig = serde_json::from_str(text).expect("configs/skiff.json");
        assert!(c.backend.is_some());
    }
}
