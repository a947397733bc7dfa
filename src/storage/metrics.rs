//! Counters of the storage layer: backend traffic, cache hits, verification failures, fetch
//! latency and prefetch progress.
//!
//! [`Metrics`] is a set of atomics shared through an `Arc` by the backend wrapper, the chunk
//! source and the prefetch worker. [`Metrics::snapshot`] reads them into a plain
//! [`MetricsSnapshot`] that renders as JSON (serde) or as Prometheus text.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (milliseconds) of the fetch latency histogram buckets; a last bucket holds the rest.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// Storage counters, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Range requests sent to the backend (every attempt counts).
    pub backend_requests: AtomicU64,
    /// Bytes received from the backend.
    pub backend_bytes: AtomicU64,
    /// Backend requests that failed.
    pub backend_errors: AtomicU64,
    /// Backend requests retried after a retryable error.
    pub backend_retries: AtomicU64,
    /// Chunks served from the in-memory cache.
    pub mem_hits: AtomicU64,
    /// Chunks not in the in-memory cache.
    pub mem_misses: AtomicU64,
    /// Chunks served from the on-disk cache.
    pub disk_hits: AtomicU64,
    /// Chunks not in the on-disk cache (or no disk cache).
    pub disk_misses: AtomicU64,
    /// Cache files that failed verification and were deleted.
    pub disk_corrupt: AtomicU64,
    /// Chunks written to the on-disk cache.
    pub disk_stores: AtomicU64,
    /// Chunk files evicted from the on-disk cache.
    pub disk_evictions: AtomicU64,
    /// Chunks fetched from the backend and verified.
    pub chunks_fetched: AtomicU64,
    /// Backend replies that failed verification (length, decompression or digest).
    pub verify_failures: AtomicU64,
    /// Chunk reads that ended in an error.
    pub read_errors: AtomicU64,
    /// Chunks the prefetch worker has to look at.
    pub prefetch_chunks_total: AtomicU64,
    /// Chunks the prefetch worker has looked at (fetched, or found cached).
    pub prefetch_chunks_done: AtomicU64,
    /// Bytes (stored form) the prefetch worker fetched from the backend.
    pub prefetch_bytes: AtomicU64,
    /// Chunks the prefetch worker could not fetch.
    pub prefetch_errors: AtomicU64,
    /// 1 once the prefetch worker has finished its whole list.
    pub prefetch_complete: AtomicU64,
    /// Distinct chunks that file reads asked for (not read-ahead or prefetch): the chunks the
    /// workload itself needed, whichever cache served them. Counted for remote backends only.
    pub demand_chunks: AtomicU64,
    /// Stored (compressed) bytes of those chunks: what a fetcher that knew the workload in
    /// advance would have had to fetch, the yardstick for `backend_bytes`.
    pub demand_stored_bytes: AtomicU64,
    /// Reads served by the filesystem (where it counts them, see `RafsFsOptions::reads`).
    pub fs_reads: AtomicU64,
    /// Bytes those reads returned.
    pub fs_read_bytes: AtomicU64,
    /// Chunks decoded and verified ahead of the reads (local blobs, or the disk cache).
    pub ahead_decoded: AtomicU64,
    /// Reads that found their chunk decoded ahead.
    pub ahead_hits: AtomicU64,
    /// Chunks decoded ahead that no read used before they were dropped.
    pub ahead_wasted: AtomicU64,
    /// Digests counted in `demand_chunks`, so that each chunk counts once.
    demand_seen: Mutex<HashSet<crate::format::ChunkDigest>>,
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_us: AtomicU64,
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// Records that a file read needed the chunk `digest` of `stored_size` stored bytes;
    /// counts each chunk once.
    pub fn note_demand(&self, digest: &crate::format::ChunkDigest, stored_size: u32) {
        let first = crate::util::sync::lock(&self.demand_seen).insert(*digest);
        if first {
            inc(&self.demand_chunks);
            add(&self.demand_stored_bytes, u64::from(stored_size));
        }
    }

    /// Records the latency of one backend request.
    pub fn observe_latency(&self, d: Duration) {
        let ms = d.as_millis();
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= u128::from(b))
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        if let Some(b) = self.latency.get(i) {
            inc(b);
        }
        add(
            &self.latency_sum_us,
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// Reads every counter. `backend` names the backend in the output.
    pub fn snapshot(&self, backend: &str) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut cumulative = 0;
        let buckets = self
            .latency
            .iter()
            .enumerate()
            .map(|(i, c)| {
                cumulative += g(c);
                LatencyBucket {
                    le_ms: LATENCY_BUCKETS_MS.get(i).copied(),
                    count: cumulative,
                }
            })
            .collect();
        MetricsSnapshot {
            backend: backend.to_string(),
            backend_requests: g(&self.backend_requests),
            backend_bytes: g(&self.backend_bytes),
            backend_errors: g(&self.backend_errors),
            backend_retries: g(&self.backend_retries),
            mem_hits: g(&self.mem_hits),
            mem_misses: g(&self.mem_misses),
            disk_hits: g(&self.disk_hits),
            disk_misses: g(&self.disk_misses),
            disk_corrupt: g(&self.disk_corrupt),
            disk_stores: g(&self.disk_stores),
            disk_evictions: g(&self.disk_evictions),
            chunks_fetched: g(&self.chunks_fetched),
            verify_failures: g(&self.verify_failures),
            read_errors: g(&self.read_errors),
            prefetch_chunks_total: g(&self.prefetch_chunks_total),
            prefetch_chunks_done: g(&self.prefetch_chunks_done),
            prefetch_bytes: g(&self.prefetch_bytes),
            prefetch_errors: g(&self.prefetch_errors),
            prefetch_complete: g(&self.prefetch_complete) != 0,
            demand_chunks: g(&self.demand_chunks),
            demand_stored_bytes: g(&self.demand_stored_bytes),
            fs_reads: g(&self.fs_reads),
            fs_read_bytes: g(&self.fs_read_bytes),
            ahead_decoded: g(&self.ahead_decoded),
            ahead_hits: g(&self.ahead_hits),
            ahead_wasted: g(&self.ahead_wasted),
            fetch_latency: buckets,
            fetch_latency_sum_seconds: g(&self.latency_sum_us) as f64 / 1e6,
        }
    }
}

/// One cumulative histogram bucket.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LatencyBucket {
    /// Upper bound in milliseconds; `None` is +Inf.
    pub le_ms: Option<u64>,
    /// Requests that took at most `le_ms`.
    pub count: u64,
}

/// The counters of [`Metrics`] at one moment (see the fields of [`Metrics`] for meanings).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[allow(missing_docs)]
pub struct MetricsSnapshot {
    pub backend: String,
    pub backend_requests: u64,
    pub backend_bytes: u64,
    pub backend_errors: u64,
    pub backend_retries: u64,
    pub mem_hits: u64,
    pub mem_misses: u64,
    pub disk_hits: u64,
    pub disk_misses: u64,
    pub disk_corrupt: u64,
    pub disk_stores: u64,
    pub disk_evictions: u64,
    pub chunks_fetched: u64,
    pub verify_failures: u64,
    pub read_errors: u64,
    pub prefetch_chunks_total: u64,
    pub prefetch_chunks_done: u64,
    pub prefetch_bytes: u64,
    pub prefetch_errors: u64,
    pub prefetch_complete: bool,
    #[serde(default)]
    pub demand_chunks: u64,
    #[serde(default)]
    pub demand_stored_bytes: u64,
    #[serde(default)]
    pub fs_reads: u64,
    #[serde(default)]
    pub fs_read_bytes: u64,
    #[serde(default)]
    pub ahead_decoded: u64,
    #[serde(default)]
    pub ahead_hits: u64,
    #[serde(default)]
    pub ahead_wasted: u64,
    pub fetch_latency: Vec<LatencyBucket>,
    pub fetch_latency_sum_seconds: f64,
}

impl MetricsSnapshot {
    /// The snapshot as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// The snapshot in the Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let mut s = String::new();
        let b = &self.backend;
        let mut counter = |name: &str, help: &str, v: u64, labels: &str| {
            let _ = writeln!(s, "# HELP skiff_{name} {help}");
            let _ = writeln!(s, "# TYPE skiff_{name} counter");
            let _ = writeln!(s, "skiff_{name}{{{labels}}} {v}");
        };
        let bl = format!("backend=\"{b}\"");
        counter(
            "backend_requests_total",
            "Backend range requests.",
            self.backend_requests,
            &bl,
        );
        counter(
            "backend_bytes_total",
            "Bytes received from the backend.",
            self.backend_bytes,
            &bl,
        );
        counter(
            "backend_errors_total",
            "Failed backend requests.",
            self.backend_errors,
            &bl,
        );
        counter(
            "backend_retries_total",
            "Retried backend requests.",
            self.backend_retries,
            &bl,
        );
        counter(
            "cache_hits_total",
            "Chunk cache hits.",
            self.mem_hits,
            "tier=\"memory\"",
        );
        counter(
            "cache_misses_total",
            "Chunk cache misses.",
            self.mem_misses,
            "tier=\"memory\"",
        );
        counter(
            "cache_hits_total",
            "Chunk cache hits.",
            self.disk_hits,
            "tier=\"disk\"",
        );
        counter(
            "cache_misses_total",
            "Chunk cache misses.",
            self.disk_misses,
            "tier=\"disk\"",
        );
        counter(
            "cache_corrupt_total",
            "Cache files that failed verification.",
            self.disk_corrupt,
            "",
        );
        counter(
            "cache_stores_total",
            "Chunks written to the disk cache.",
            self.disk_stores,
            "",
        );
        counter(
            "cache_evictions_total",
            "Chunks evicted from the disk cache.",
            self.disk_evictions,
            "",
        );
        counter(
            "chunks_fetched_total",
            "Chunks fetched and verified.",
            self.chunks_fetched,
            &bl,
        );
        counter(
            "verify_failures_total",
            "Backend replies that failed verification.",
            self.verify_failures,
            &bl,
        );
        counter(
            "read_errors_total",
            "Chunk reads that failed.",
            self.read_errors,
            "",
        );
        counter(
            "prefetch_chunks_done_total",
            "Chunks handled by prefetch.",
            self.prefetch_chunks_done,
            "",
        );
        counter(
            "prefetch_bytes_total",
            "Bytes fetched by prefetch.",
            self.prefetch_bytes,
            "",
        );
        counter(
            "prefetch_errors_total",
            "Chunks prefetch could not fetch.",
            self.prefetch_errors,
            "",
        );
        counter(
            "demand_chunks_total",
            "Distinct chunks file reads asked for.",
            self.demand_chunks,
            "",
        );
        counter(
            "demand_stored_bytes_total",
            "Stored bytes of the distinct chunks file reads asked for.",
            self.demand_stored_bytes,
            "",
        );
        counter(
            "ahead_decoded_total",
            "Chunks decoded and verified ahead of the reads.",
            self.ahead_decoded,
            "",
        );
        counter(
            "ahead_hits_total",
            "Reads that found their chunk decoded ahead.",
            self.ahead_hits,
            "",
        );
        counter(
            "ahead_wasted_total",
            "Chunks decoded ahead that no read used.",
            self.ahead_wasted,
            "",
        );
        let _ = writeln!(
            s,
            "# HELP skiff_prefetch_chunks Chunks prefetch has to handle."
        );
        let _ = writeln!(s, "# TYPE skiff_prefetch_chunks gauge");
        let _ = writeln!(s, "skiff_prefetch_chunks {}", self.prefetch_chunks_total);
        let _ = writeln!(
            s,
            "# HELP skiff_prefetch_complete 1 once prefetch has finished."
        );
        let _ = writeln!(s, "# TYPE skiff_prefetch_complete gauge");
        let _ = writeln!(
            s,
            "skiff_prefetch_complete {}",
            u8::from(self.prefetch_complete)
        );
        let _ = writeln!(
            s,
            "# HELP skiff_fetch_latency_seconds Backend request latency."
        );
        let _ = writeln!(s, "# TYPE skiff_fetch_latency_seconds histogram");
        let mut total = 0;
        for bk in &self.fetch_latency {
            let le = match bk.le_ms {
                Some(ms) => format!("{}", ms as f64 / 1000.0),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                s,
                "skiff_fetch_latency_seconds_bucket{{{bl},le=\"{le}\"}} {}",
                bk.count
            );
            total = bk.count;
        }
        let _ = writeln!(
            s,
            "skiff_fetch_latency_seconds_sum{{{bl}}} {}",
            self.fetch_latency_sum_seconds
        );
        let _ = writeln!(s, "skiff_fetch_latency_seconds_count{{{bl}}} {total}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_renders() {
        let m = Metrics::default();
        m.observe_latency(Duration::from_micros(500));
        m.observe_latency(Duration::from_millis(30));
        m.observe_latency(Duration::from_secs(10));
        inc(&m.backend_requests);
        let s = m.snapshot("s3");
        assert_eq!(s.fetch_latency.first().map(|b| b.count), Some(1));
        assert_eq!(s.fetch_latency.last().map(|b| b.count), Some(3));
        let p = s.to_prometheus();
        assert!(p.contains("skiff_backend_requests_total{backend=\"s3\"} 1"));
        assert!(p.contains("skiff_fetch_latency_seconds_count{backend=\"s3\"} 3"));
        let back: MetricsSnapshot = serde_json::from_str(&s.to_json()).expect("json");
        assert_eq!(back, s);
    }

    #[test]
    fn demand_counts_each_chunk_once() {
        let m = Metrics::default();
        let d = crate::format::ChunkDigest::blake3;
        m.note_demand(&d([1; 32]), 100);
        m.note_demand(&d([2; 32]), 50);
        m.note_demand(&d([1; 32]), 100);
        let s = m.snapshot("registry");
        assert_eq!((s.demand_chunks, s.demand_stored_bytes), (2, 150));
        assert!(s
            .to_prometheus()
            .contains("skiff_demand_stored_bytes_total{} 150"));
    }
}
