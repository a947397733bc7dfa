//! The caching chunk source: memory cache, then the shared disk cache, then the backend; every
//! chunk verified before it is served or stored.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use super::ahead::{DecodeAhead, Run};
use super::cache::{ChunkDiskCache, ChunkFileLock, Claim, SingleFlight};
use super::metrics::{add, inc, Metrics};
use super::{
    decode_chunk, BlobBackend, ChunkData, ChunkMemCache, ChunkSource, Deadline, StorageError,
    DEFAULT_REQUEST_TIMEOUT,
};

pub use super::cache::TAKEOVER_AFTER;
use crate::format::{digest_hex, BlobRecord, Bootstrap, ChunkDigest, ChunkRecord};
use crate::runtime::threads::{self, ThreadKind};

/// How many times a chunk whose stored bytes fail verification is fetched on its own before
/// the read fails.
const REFETCH_ATTEMPTS: usize = 3;

/// Adjacent chunks are fetched with one range request up to this many bytes.
pub const MAX_MERGED_BYTES: u64 = 8 << 20;

/// Fetch-ahead jobs queued beyond the ones being worked on; more are dropped (a hint only).
const FETCH_AHEAD_QUEUE: usize = 16;

/// A fetch-ahead job: chunks of one blob.
type AheadJob = (BlobRecord, Vec<ChunkRecord>);

/// Memory cache → disk cache → backend → verify → store, for any [`BlobBackend`].
///
/// A missing chunk is fetched once per host: threads of this process wait on a [`SingleFlight`]
/// claim, other processes on the chunk's lock file, and both find the chunk cached when they
/// get their turn.
///
/// Every wait is bounded by the read's [`Deadline`], and a reader never waits long behind
/// background work: background fetches make one attempt each and give their claims back when
/// it fails, and a reader waiting [`TAKEOVER_AFTER`] for background work (or another process)
/// still fetching its chunk fetches it itself.
pub struct CachedChunkSource<B> {
    backend: B,
    memcache: ChunkMemCache,
    disk: Option<ChunkDiskCache>,
    flights: SingleFlight,
    metrics: Arc<Metrics>,
    /// The fetch-ahead workers' queue, once [`Self::start_fetch_ahead`] has run.
    ahead: OnceLock<SyncSender<AheadJob>>,
    /// The streams decode-ahead follows, once [`Self::start_decode_ahead`] has run.
    decode_ahead: OnceLock<Arc<DecodeAhead>>,
}

impl<B> Drop for CachedChunkSource<B> {
    fn drop(&mut self) {
        // The decode-ahead worker holds no strong reference: tell it to end.
        if let Some(a) = self.decode_ahead.get() {
            a.close();
        }
    }
}

/// The right to fetch one chunk: this process's claim and, with a disk cache, the host's lock.
struct FetchRight<'a> {
    _claim: Claim<'a>,
    lock: Option<ChunkFileLock>,
}

impl FetchRight<'_> {
    /// The chunk is stored: lets the waiters in.
    fn done(self) {
        if let Some(l) = self.lock {
            l.done();
        }
    }
}

fn describe(blob: &BlobRecord, chunk: &ChunkRecord) -> (String, String, u64) {
    (
        digest_hex(&blob.id),
        chunk.chunk_digest().to_string(),
        chunk.compressed_offset.get(),
    )
}

impl<B: BlobBackend> CachedChunkSource<B> {
    /// A source over `backend` with `memcache_bytes` of memory cache and an optional disk cache.
    pub fn new(
        backend: B,
        memcache_bytes: usize,
        disk: Option<ChunkDiskCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            backend,
            memcache: ChunkMemCache::new(memcache_bytes),
            disk,
            flights: SingleFlight::default(),
            metrics,
            ahead: OnceLock::new(),
            decode_ahead: OnceLock::new(),
        }
    }

    /// A source with no disk cache and counters of its own: for blobs on a local disk, where
    /// `skiff check` and the Kata daemon's image mounts read them.
    pub fn in_memory(backend: B, memcache_bytes: usize) -> Self {
        Self::new(backend, memcache_bytes, None, Arc::new(Metrics::default()))
    }

    /// Starts `workers` threads that fetch the chunks given to
    /// [`ChunkSource::fetch_ahead`], in parallel with the reads that wait for their own chunk:
    /// with a remote backend, where each request costs a round trip, the rest of a file is then
    /// on its way while the first chunk is served. The threads end with the source.
    pub fn start_fetch_ahead(self: &Arc<Self>, workers: usize)
    where
        B: 'static,
    {
        let (tx, rx) = sync_channel::<AheadJob>(FETCH_AHEAD_QUEUE);
        if self.ahead.set(tx).is_err() {
            return;
        }
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            // Weak: the workers must not keep the source (and its queue's sender) alive.
            let source = Arc::downgrade(self);
            let spawned =
                threads::spawn(ThreadKind::Fetcher, format!("skiff-ahead-{i}"), move || {
                    loop {
                        let job = crate::util::sync::lock(&rx).recv();
                        let Ok((blob, chunks)) = job else { return };
                        let Some(source) = source.upgrade() else {
                            return;
                        };
                        // Failures are reported by the reads that need the chunks, not here.
                        let deadline = Deadline::after(DEFAULT_REQUEST_TIMEOUT).background();
                        let _ = source.fetch_chunks(&blob, &chunks, true, &deadline);
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no fetch-ahead worker");
            }
        }
    }

    /// Starts decode-ahead (see [`super::ahead`]) over the chunks of `bootstrap`, with one
    /// worker thread, if the chunks can be read without the network: a local backend, or a
    /// disk cache to read from. Decoded chunks take at most half of the memory cache. The
    /// thread ends with the source.
    pub fn start_decode_ahead(self: &Arc<Self>, bootstrap: Arc<Bootstrap>)
    where
        B: 'static,
    {
        let limit = self.memcache.limit() / 2;
        if limit == 0 || (!self.backend.is_local() && self.disk.is_none()) {
            return;
        }
        let ahead = Arc::new(DecodeAhead::new(bootstrap, limit));
        if self.decode_ahead.set(ahead.clone()).is_err() {
            return;
        }
        // Weak: the worker must not keep the source alive; the source closes the streams
        // when it goes, which ends the worker's wait.
        let source = Arc::downgrade(self);
        let spawned = threads::spawn(ThreadKind::Fetcher, "skiff-decode-ahead", move || {
            let ahead_bytes = || source.upgrade().map_or(0, |s| s.memcache.ahead_bytes());
            while let Some(run) = ahead.next_run(ahead_bytes) {
                let Some(source) = source.upgrade() else {
                    return;
                };
                source.decode_run(&run, ahead.limit());
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no decode-ahead worker");
        }
    }

    /// Decodes and verifies the chunks of `run` that are neither cached in memory nor claimed
    /// by a reader, into the memory cache (within `limit` bytes decoded ahead): with one read
    /// of the run's stored bytes from a local backend, or chunk by chunk from the disk cache.
    /// Each chunk is claimed while it is decoded, so that a reader wanting it waits for it
    /// rather than decoding it a second time. Failures are left to the reads.
    fn decode_run(&self, run: &Run, limit: usize) {
        let deadline = Deadline::after(DEFAULT_REQUEST_TIMEOUT).background();
        let mut mine: Vec<(ChunkRecord, Claim<'_>)> = Vec::with_capacity(run.chunks.len());
        for c in &run.chunks {
            let size = c.uncompressed_size.get() as usize;
            if self.memcache.contains(&c.chunk_digest(), size) {
                continue;
            }
            if let Some(claim) = self.flights.try_claim(c.chunk_digest(), &deadline) {
                mine.push((*c, claim));
            }
        }
        let (Some((first, _)), Some((last, _))) = (mine.first(), mine.last()) else {
            return;
        };
        let keep = |c: &ChunkRecord, d: Vec<u8>| -> bool {
            match self
                .memcache
                .insert_ahead(c.chunk_digest(), Arc::new(d), limit)
            {
                Some(wasted) => {
                    inc(&self.metrics.ahead_decoded);
                    add(&self.metrics.ahead_wasted, wasted);
                    true
                }
                None => false,
            }
        };
        if self.backend.is_local() {
            let start = first.compressed_offset.get();
            let end = last.compressed_offset.get() + u64::from(last.compressed_size.get());
            let Ok(stored) =
                self.backend
                    .read_range(&run.blob.id, start, (end - start) as usize, &deadline)
            else {
                return;
            };
            // Each chunk's claim is given up as soon as it is cached (or failed), so that a
            // reader waiting for it goes on at once.
            for (c, _claim) in mine {
                let from = (c.compressed_offset.get() - start) as usize;
                let bytes = stored.get(from..from + c.compressed_size.get() as usize);
                match bytes.map(|b| decode_chunk(b, &c)) {
                    Some(Ok(d)) => {
                        if !keep(&c, d) {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(chunk = %c.chunk_digest(), error = %e, "decode-ahead: chunk failed verification; left to the read");
                    }
                    None => return,
                }
            }
        } else if let Some(disk) = &self.disk {
            for (c, _claim) in mine {
                let Some(d) = disk.get(&c.chunk_digest(), c.uncompressed_size.get() as usize)
                else {
                    return;
                };
                if !keep(&c, d) {
                    return;
                }
            }
        }
    }

    /// Tells decode-ahead that a reader read `chunk` (piecewise: kept in memory for more).
    fn note_read(&self, chunk: &ChunkRecord, piecewise: bool, deadline: &Deadline) {
        if chunk.is_zero() || deadline.is_background() {
            return;
        }
        if let Some(a) = self.decode_ahead.get() {
            a.note_read(chunk, piecewise, self.memcache.ahead_bytes());
        }
    }

    /// Whether `chunk` is in the memory or disk cache.
    fn is_cached(&self, chunk: &ChunkRecord) -> bool {
        self.held_in_memory(chunk)
            || self
                .disk
                .as_ref()
                .is_some_and(|d| d.contains(&chunk.chunk_digest()))
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The disk cache, if any.
    pub fn disk(&self) -> Option<&ChunkDiskCache> {
        self.disk.as_ref()
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the memory cache holds `chunk` (its digest and its size must both match).
    fn held_in_memory(&self, chunk: &ChunkRecord) -> bool {
        self.memcache.contains(
            &chunk.chunk_digest(),
            chunk.uncompressed_size.get() as usize,
        )
    }

    /// The memory cache's copy of `chunk`, for a reader: its digest and its size must both
    /// match. A chunk decoded ahead counts as a hit of decode-ahead and, read `once`, leaves
    /// the cache.
    fn memory_copy(&self, chunk: &ChunkRecord, once: bool) -> Option<ChunkData> {
        let (data, was_ahead) = self.memcache.get(
            &chunk.chunk_digest(),
            chunk.uncompressed_size.get() as usize,
            once,
        )?;
        if was_ahead {
            inc(&self.metrics.ahead_hits);
        }
        Some(data)
    }

    fn lookup_memory(&self, chunk: &ChunkRecord, once: bool) -> Option<ChunkData> {
        let hit = self.memory_copy(chunk, once);
        inc(if hit.is_some() {
            &self.metrics.mem_hits
        } else {
            &self.metrics.mem_misses
        });
        hit
    }

    fn lookup_disk(&self, chunk: &ChunkRecord) -> Option<Vec<u8>> {
        let disk = self.disk.as_ref()?;
        let hit = disk.get(
            &chunk.chunk_digest(),
            chunk.uncompressed_size.get() as usize,
        );
        inc(if hit.is_some() {
            &self.metrics.disk_hits
        } else {
            &self.metrics.disk_misses
        });
        hit
    }

    /// Takes the right to fetch `chunk`, waiting for whoever is fetching it: a reader of this
    /// process until `deadline`, background work here or another process at most
    /// [`TAKEOVER_AFTER`] (then the chunk is fetched without the host's lock, which only risks
    /// fetching it twice).
    fn fetch_right(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<FetchRight<'_>, StorageError> {
        let claim = self
            .flights
            .claim(chunk.chunk_digest(), deadline)
            .map_err(|_| {
                let (blob, chunk, offset) = describe(blob, chunk);
                StorageError::DeadlineExceeded {
                    blob,
                    chunk,
                    offset,
                    waiting: "another reader's fetch of the chunk",
                }
            })?;
        let Some(disk) = self.disk.as_ref() else {
            return Ok(FetchRight {
                _claim: claim,
                lock: None,
            });
        };
        if claim.took_over() {
            // The background job it was taken from holds the host's lock, and goes on.
            tracing::debug!(chunk = %chunk.chunk_digest(), "a read took over a chunk from background work");
            return Ok(FetchRight {
                _claim: claim,
                lock: None,
            });
        }
        let until = if deadline.is_background() {
            deadline.instant()
        } else {
            let takeover = std::time::Instant::now() + TAKEOVER_AFTER;
            Some(deadline.instant().map_or(takeover, |d| d.min(takeover)))
        };
        let lock = match disk.lock_until(&chunk.chunk_digest(), until) {
            Ok(Some(l)) => Some(l),
            Ok(None) => {
                tracing::debug!(chunk = %chunk.chunk_digest(), "another process is still fetching the chunk; fetching it too");
                None
            }
            Err(e) => {
                // Without the lock the chunk may be fetched twice, which is only wasteful.
                tracing::warn!(error = %crate::util::error_chain(&e), "cannot lock chunk");
                None
            }
        };
        Ok(FetchRight {
            _claim: claim,
            lock,
        })
    }

    /// Takes the right to fetch `chunk` if nobody else is fetching it.
    fn try_fetch_right(&self, chunk: &ChunkRecord, deadline: &Deadline) -> Option<FetchRight<'_>> {
        let claim = self.flights.try_claim(chunk.chunk_digest(), deadline)?;
        let lock = match &self.disk {
            None => None,
            Some(d) => match d.try_lock(&chunk.chunk_digest()) {
                Ok(Some(l)) => Some(l),
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %crate::util::error_chain(&e), "cannot lock chunk");
                    None
                }
            },
        };
        Some(FetchRight {
            _claim: claim,
            lock,
        })
    }

    /// Checks stored bytes of `chunk`; counts and logs a failure.
    fn verify(&self, stored: &[u8], blob: &BlobRecord, chunk: &ChunkRecord) -> Option<Vec<u8>> {
        match decode_chunk(stored, chunk) {
            Ok(d) => {
                inc(&self.metrics.chunks_fetched);
                Some(d)
            }
            Err(e) => {
                inc(&self.metrics.verify_failures);
                let (b, c, o) = describe(blob, chunk);
                tracing::warn!(backend = self.backend.name(), blob = %b, chunk = %c, offset = o, error = %e, "chunk from backend failed verification");
                None
            }
        }
    }

    /// Fetches `chunk` on its own until it verifies (or gives up).
    fn fetch_one(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, StorageError> {
        let offset = chunk.compressed_offset.get();
        let len = chunk.compressed_size.get() as usize;
        let mut last = None;
        for _ in 0..REFETCH_ATTEMPTS {
            let stored = self
                .backend
                .read_range(&blob.id, offset, len, deadline)
                .map_err(|source| {
                    let (blob, chunk, offset) = describe(blob, chunk);
                    StorageError::Backend {
                        blob,
                        chunk,
                        offset,
                        source,
                    }
                })?;
            match decode_chunk(&stored, chunk) {
                Ok(d) => {
                    inc(&self.metrics.chunks_fetched);
                    return Ok(d);
                }
                Err(e) => {
                    inc(&self.metrics.verify_failures);
                    let (b, c, o) = describe(blob, chunk);
                    tracing::warn!(backend = self.backend.name(), blob = %b, chunk = %c, offset = o, error = %e, "chunk from backend failed verification");
                    last = Some(e);
                }
            }
        }
        let (blob, chunk, offset) = describe(blob, chunk);
        Err(StorageError::Corrupt {
            blob,
            chunk,
            offset,
            source: last.unwrap_or(super::VerifyError::Length { got: 0, want: len }),
        })
    }

    /// Fetches, verifies and stores `chunk` while holding its fetch right.
    fn fetch_and_store(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        right: FetchRight<'_>,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, StorageError> {
        let data = self.fetch_one(blob, chunk, deadline)?;
        if let Some(d) = &self.disk {
            d.put(&chunk.chunk_digest(), &data);
        }
        right.done();
        Ok(data)
    }

    /// Makes sure `chunks` (all in `blob`) are in the caches, fetching the missing ones with as
    /// few range requests as possible: runs of adjacent chunks go in one request of at most
    /// [`MAX_MERGED_BYTES`]. With `keep_in_memory` the chunks also go to the memory cache
    /// (foreground reads); prefetch leaves it alone. Returns the stored bytes fetched.
    ///
    /// Chunks someone else is fetching are skipped here and waited for at the end. Failures
    /// come back with the digest of their chunk.
    pub fn fetch_chunks(
        &self,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
        keep_in_memory: bool,
        deadline: &Deadline,
    ) -> (u64, Vec<(ChunkDigest, StorageError)>) {
        let mut errors = Vec::new();
        let mut fetched = 0u64;
        let mut mine: Vec<(ChunkRecord, FetchRight<'_>)> = Vec::new();
        let mut theirs: Vec<ChunkRecord> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in chunks.iter().filter(|c| !c.is_zero()) {
            if !seen.insert(c.chunk_digest()) || self.held_in_memory(c) {
                continue;
            }
            if let Some(d) = &self.disk {
                if d.contains(&c.chunk_digest()) {
                    if keep_in_memory {
                        theirs.push(*c);
                    }
                    continue;
                }
            }
            match self.try_fetch_right(c, deadline) {
                Some(r) => {
                    // Another process may have stored it just before we took the lock.
                    if self
                        .disk
                        .as_ref()
                        .is_some_and(|d| d.contains(&c.chunk_digest()))
                    {
                        r.done();
                        if keep_in_memory {
                            theirs.push(*c);
                        }
                    } else {
                        mine.push((*c, r));
                    }
                }
                None => theirs.push(*c),
            }
        }
        mine.sort_by_key(|(c, _)| c.compressed_offset.get());
        let i = 0;
        while i < mine.len() {
            // The run [i, j): adjacent in the blob, at most MAX_MERGED_BYTES together.
            let start = mine[i].0.compressed_offset.get();
            let mut end = start + u64::from(mine[i].0.compressed_size.get());
            let mut j = i + 1;
            while let Some((c, _)) = mine.get(j) {
                let size = u64::from(c.compressed_size.get());
                if c.compressed_offset.get() != end || end + size - start > MAX_MERGED_BYTES {
                    break;
                }
                end += size;
                j += 1;
            }
            let run: Vec<(ChunkRecord, FetchRight<'_>)> = mine.drain(i..j).collect();
            // What a chunk's fetch came to: counted, kept, or its error noted.
            let mut settle = |c: &ChunkRecord, data: Result<Vec<u8>, StorageError>| match data {
                Ok(d) => {
                    fetched += u64::from(c.compressed_size.get());
                    if keep_in_memory {
                        let wasted = self.memcache.insert(c.chunk_digest(), Arc::new(d));
                        add(&self.metrics.ahead_wasted, wasted);
                    }
                }
                Err(e) => {
                    inc(&self.metrics.read_errors);
                    errors.push((c.chunk_digest(), e));
                }
            };
            // A run of several chunks is one request, streamed: each chunk is verified, stored
            // and handed to whoever waits for it as soon as its bytes are in, not when the
            // last byte of the run is, and only one chunk's bytes are held at a time.
            let mut left: std::collections::VecDeque<(ChunkRecord, FetchRight<'_>)> = run.into();
            let mut retry: Vec<(ChunkRecord, FetchRight<'_>)> = Vec::new();
            if left.len() > 1 {
                let mut buf: Vec<u8> = Vec::new();
                let _ = self.backend.read_range_streaming(
                    &blob.id,
                    start,
                    (end - start) as usize,
                    deadline,
                    &mut |mut bytes: &[u8]| {
                        while !bytes.is_empty() {
                            let Some(want) =
                                left.front().map(|(c, _)| c.compressed_size.get() as usize)
                            else {
                                return;
                            };
                            if buf.is_empty() {
                                // Room for this chunk exactly: no doubling past it.
                                buf.reserve_exact(want);
                            }
                            let take = (want - buf.len()).min(bytes.len());
                            buf.extend_from_slice(&bytes[..take]);
                            bytes = &bytes[take..];
                            if buf.len() < want {
                                continue;
                            }
                            let Some((c, right)) = left.pop_front() else {
                                return;
                            };
                            match self.verify(&buf, blob, &c) {
                                Some(d) => {
                                    if let Some(disk) = &self.disk {
                                        disk.put(&c.chunk_digest(), &d);
                                    }
                                    right.done();
                                    settle(&c, Ok(d));
                                }
                                None => retry.push((c, right)),
                            }
                            buf.clear();
                        }
                    },
                );
            }
            // A single chunk, a chunk that failed verification, or what a failed run did not
            // deliver: each on its own.
            for (c, right) in retry.into_iter().chain(left) {
                let data = self.fetch_and_store(blob, &c, right, deadline);
                settle(&c, data);
            }
        }
        for c in theirs {
            if let Err(e) = self.read_chunk(blob, &c, deadline) {
                errors.push((c.chunk_digest(), e));
            }
        }
        (fetched, errors)
    }
}

impl<B: BlobBackend> CachedChunkSource<B> {
    /// Memory cache → disk cache → backend; the result goes to the memory cache if `keep`
    /// (a chunk read piecewise). Then decode-ahead hears of the read.
    fn read_chunk_keep(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        keep: bool,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        let r = self.read_chunk_from_caches(blob, chunk, keep, deadline);
        self.note_read(chunk, keep, deadline);
        r
    }

    fn read_chunk_from_caches(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        keep: bool,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        let remember = |d: Vec<u8>| {
            let d = Arc::new(d);
            if keep {
                let wasted = self.memcache.insert(chunk.chunk_digest(), d.clone());
                add(&self.metrics.ahead_wasted, wasted);
            }
            d
        };
        if let Some(d) = self.lookup_memory(chunk, !keep) {
            return Ok(d);
        }
        if let Some(d) = self.lookup_disk(chunk) {
            return Ok(remember(d));
        }
        let right = match self.fetch_right(blob, chunk, deadline) {
            Ok(r) => r,
            Err(e) => {
                inc(&self.metrics.read_errors);
                return Err(e);
            }
        };
        // Whoever held the right before may have cached the chunk (decode-ahead, often).
        if let Some(d) = self.memory_copy(chunk, !keep) {
            right.done();
            return Ok(d);
        }
        if let Some(d) = self.disk.as_ref().and_then(|disk| {
            disk.get(
                &chunk.chunk_digest(),
                chunk.uncompressed_size.get() as usize,
            )
        }) {
            inc(&self.metrics.disk_hits);
            right.done();
            return Ok(remember(d));
        }
        match self.fetch_and_store(blob, chunk, right, deadline) {
            Ok(d) => Ok(remember(d)),
            Err(e) => {
                inc(&self.metrics.read_errors);
                Err(e)
            }
        }
    }
}

impl<B: BlobBackend> ChunkSource for CachedChunkSource<B> {
    fn read_chunk(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        self.read_chunk_keep(blob, chunk, true, deadline)
    }

    fn read_chunk_once(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        self.read_chunk_keep(blob, chunk, false, deadline)
    }

    fn read_chunks(
        &self,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
        deadline: &Deadline,
    ) -> Vec<Result<ChunkData, StorageError>> {
        if chunks.len() < 2 {
            return chunks
                .iter()
                .map(|c| self.read_chunk(blob, c, deadline))
                .collect();
        }
        // One request for the adjacent missing ones; a chunk that failed there (after its own
        // retries) fails here without being fetched again.
        let (_, errors) = self.fetch_chunks(blob, chunks, true, deadline);
        let mut failed: std::collections::HashMap<ChunkDigest, StorageError> =
            errors.into_iter().collect();
        chunks
            .iter()
            .map(|c| match failed.remove(&c.chunk_digest()) {
                Some(e) => Err(e),
                None => self.read_chunk(blob, c, deadline),
            })
            .collect()
    }

    fn fetches_ahead(&self) -> bool {
        self.ahead.get().is_some()
    }

    /// Only over a local backend: over a remote one decode-ahead takes only what the disk
    /// cache holds, and the reads' own read-ahead still has to fetch the rest.
    fn decodes_ahead(&self) -> bool {
        self.decode_ahead.get().is_some() && self.backend.is_local()
    }

    fn is_ready(&self, chunk: &ChunkRecord) -> bool {
        self.held_in_memory(chunk)
    }

    fn fetch_ahead(&self, blob: &BlobRecord, chunks: &[ChunkRecord]) {
        let Some(tx) = self.ahead.get() else { return };
        let missing: Vec<ChunkRecord> = chunks
            .iter()
            .filter(|c| !c.is_zero() && !self.is_cached(c))
            .copied()
            .collect();
        if !missing.is_empty() {
            // A full queue means the workers are behind: the reads will fetch for themselves.
            let _ = tx.try_send((*blob, missing));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use zerocopy::little_endian::{U32, U64};
    use zerocopy::FromZeros;

    use super::*;
    use crate::storage::backend::fault::{Fault, FaultyBackend};
    use crate::storage::{BackendError, RetryPolicy, RetryingBackend};

    /// One in-memory blob of uncompressed chunks.
    struct MemBlob(Vec<u8>);

    impl BlobBackend for MemBlob {
        fn read_range(
            &self,
            _: &[u8; 32],
            o: u64,
            l: usize,
            _: &Deadline,
        ) -> Result<Vec<u8>, BackendError> {
            let o = o as usize;
            self.0
                .get(o..o + l)
                .map(<[u8]>::to_vec)
                .ok_or(BackendError::ShortBlob {
                    path: "mem".into(),
                    end: (o + l) as u64,
                })
        }
        fn name(&self) -> &'static str {
            "mem"
        }
    }

    fn image(n: usize, size: usize) -> (MemBlob, Vec<ChunkRecord>) {
        let mut blob = Vec::new();
        let mut chunks = Vec::new();
        for i in 0..n {
            let data: Vec<u8> = (0..size).map(|j| (i * 31 + j * 7) as u8).collect();
            let mut c = ChunkRecord::new_zeroed();
            c.digest = *blake3::hash(&data).as_bytes();
            c.compressed_offset = U64::new(blob.len() as u64);
            c.compressed_size = U32::new(size as u32);
            c.uncompressed_size = U32::new(size as u32);
            blob.extend_from_slice(&data);
            chunks.push(c);
        }
        (MemBlob(blob), chunks)
    }

    type Src = CachedChunkSource<RetryingBackend<Arc<FaultyBackend<MemBlob>>>>;

    fn source(blob: MemBlob, disk: Option<&std::path::Path>) -> (Src, Arc<FaultyBackend<MemBlob>>) {
        let m = Arc::new(Metrics::default());
        let faulty = Arc::new(FaultyBackend::new(blob));
        let policy = RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_in_flight: 4,
        };
        let disk = disk.map(|d| ChunkDiskCache::open(d, 0, m.clone()).expect("cache"));
        let backend = RetryingBackend::new(faulty.clone(), policy, m.clone());
        (CachedChunkSource::new(backend, 1 << 20, disk, m), faulty)
    }

    fn blob() -> BlobRecord {
        BlobRecord::new_zeroed()
    }

    /// Decode-ahead over a local blob, read as tar reads small files (each chunk whole, in
    /// stored order): the reads find chunks decoded ahead, what waits decoded ahead stays
    /// within its share of the memory cache and the cache within its limit, and with every
    /// fifth chunk's stored bytes damaged, none of those is ever served or cached: their reads
    /// fail, every other read returns the chunk's bytes.
    #[test]
    fn decode_ahead_stays_bounded_and_keeps_verified_chunks_only() {
        use crate::build::{build, BuildOptions, BuildSource, Compressor};
        use crate::format::Bootstrap;
        use crate::storage::backend::localfs::LocalFsBackend;
        use std::os::unix::fs::FileExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("src");
        std::fs::create_dir_all(&root).expect("src");
        for i in 0..300 {
            let text: String = (0..200 + i)
                .map(|l| format!("file {i} line {l}\n"))
                .collect();
            std::fs::write(root.join(format!("f{i:03}")), text).expect("write");
        }
        let (boot_path, blobs) = (dir.path().join("boot"), dir.path().join("blobs"));
        build(
            &BuildSource::Dir(root),
            &BuildOptions {
                bootstrap: boot_path.clone(),
                blob_dir: blobs.clone(),
                chunk_size: 64 * 1024,
                compressor: Compressor::Lz4,
                chunk_dicts: Vec::new(),
                progress: false,
                io_threads: 0,
                blob_id_sha256: false,
                node_compat: false,
            },
        )
        .expect("build");
        let boot = Arc::new(Bootstrap::load(&boot_path).expect("bootstrap"));
        let mut chunks: Vec<ChunkRecord> = boot
            .tables()
            .chunks
            .iter()
            .filter(|c| !c.is_zero())
            .copied()
            .collect();
        chunks.sort_by_key(|c| c.compressed_offset.get());
        assert!(chunks.len() >= 300, "{} chunks", chunks.len());
        let blob = boot.blobs()[0];
        let mem_limit = 64 * 1024;
        for damaged in [false, true] {
            let bad = |i: usize| damaged && i % 5 == 2;
            if damaged {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(blobs.join(digest_hex(&blob.id)))
                    .expect("blob");
                for (i, c) in chunks.iter().enumerate().filter(|(i, _)| bad(*i)) {
                    let at = c.compressed_offset.get() + u64::from(c.compressed_size.get()) / 2;
                    let mut b = [0u8; 1];
                    f.read_exact_at(&mut b, at).expect("read");
                    b[0] ^= 0xff;
                    f.write_all_at(&b, at).expect("write");
                    assert!(i < chunks.len());
                }
            }
            let m = Arc::new(Metrics::default());
            let src = Arc::new(CachedChunkSource::new(
                LocalFsBackend::new(&blobs),
                mem_limit,
                None,
                m.clone(),
            ));
            src.start_decode_ahead(boot.clone());
            assert!(src.decodes_ahead());
            for (i, c) in chunks.iter().enumerate() {
                let got = src.read_chunk_once(&blob, c, &Deadline::after(Duration::from_secs(30)));
                if bad(i) {
                    assert!(got.is_err(), "chunk {i}: damaged bytes served");
                } else {
                    let d = got.unwrap_or_else(|e| panic!("chunk {i}: {e}"));
                    assert_eq!(blake3::hash(&d).as_bytes(), &c.digest, "chunk {i}");
                }
                assert!(src.memcache.ahead_bytes() <= mem_limit / 2, "chunk {i}");
                assert!(src.memcache.bytes() <= mem_limit, "chunk {i}");
                let every = i % 25 == 0 || i + 1 == chunks.len();
                for (j, d) in chunks.iter().enumerate().filter(|(j, _)| every && bad(*j)) {
                    let size = d.uncompressed_size.get() as usize;
                    assert!(
                        !src.memcache.contains(&d.chunk_digest(), size),
                        "chunk {j} cached"
                    );
                }
                // Room for the worker, as a reader leaves it between two files.
                std::thread::sleep(Duration::from_millis(1));
            }
            let (decoded, hits) = (
                m.ahead_decoded.load(Ordering::Relaxed),
                m.ahead_hits.load(Ordering::Relaxed),
            );
            assert!(decoded > 0 && hits > 0, "decoded {decoded}, hits {hits}");
        }
    }

    #[test]
    fn faults_are_retried_and_wrong_bytes_never_served() {
        let (b, chunks) = image(4, 1000);
        let (src, faulty) = source(b, None);
        faulty.push([
            Fault::Error,
            Fault::Short,
            Fault::BitFlip,
            Fault::Stall(Duration::from_millis(5)),
        ]);
        for c in &chunks {
            let d = src
                .read_chunk(&blob(), c, &Deadline::none())
                .expect("read after faults");
            assert_eq!(blake3::hash(&d).as_bytes(), &c.digest);
        }
        // Always corrupt: an error, not bytes.
        let (b, chunks) = image(1, 1000);
        let (src, faulty) = source(b, None);
        faulty.push([Fault::BitFlip; 10]);
        assert!(matches!(
            src.read_chunk(&blob(), &chunks[0], &Deadline::none()),
            Err(StorageError::Corrupt { .. })
        ));
        assert_eq!(
            src.metrics().verify_failures.load(Ordering::Relaxed),
            REFETCH_ATTEMPTS as u64
        );
        // Always failing: an error after the retries.
        let (b, chunks) = image(1, 1000);
        let (src, faulty) = source(b, None);
        faulty.push([Fault::Error; 10]);
        assert!(matches!(
            src.read_chunk(&blob(), &chunks[0], &Deadline::none()),
            Err(StorageError::Backend { .. })
        ));
    }

    /// Found by the `bootstrap` fuzz target: a crafted record with a cached chunk's digest and
    /// a smaller size got the cached chunk's bytes, cut to its size: bytes served under a
    /// digest they do not have. Such a record names no chunk; it must fail, from memory or
    /// from disk.
    #[test]
    fn a_cached_digest_with_another_size_is_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        for disk in [None, Some(dir.path())] {
            let (b, chunks) = image(2, 1000);
            let (src, _) = source(b, disk);
            let real = src
                .read_chunk(&blob(), &chunks[0], &Deadline::none())
                .expect("the real chunk");
            assert_eq!(real.len(), 1000);
            // The digest of chunk 0, the place and size of chunk 1's first 5 bytes.
            let mut forged = chunks[1];
            forged.digest = chunks[0].digest;
            forged.compressed_size = U32::new(5);
            forged.uncompressed_size = U32::new(5);
            for read in [
                Src::read_chunk as fn(&Src, &_, &_, &_) -> _,
                Src::read_chunk_once,
            ] {
                match read(&src, &blob(), &forged, &Deadline::none()) {
                    Err(StorageError::Corrupt { .. }) => {}
                    Ok(d) => panic!("served {} bytes for a chunk that does not exist", d.len()),
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            let results = src.read_chunks(&blob(), &[chunks[0], forged], &Deadline::none());
            assert!(results[0].is_ok() && results[1].is_err(), "read_chunks");
            // The real chunk is still there, from the caches.
            let again = src
                .read_chunk(&blob(), &chunks[0], &Deadline::none())
                .expect("the real chunk again");
            assert_eq!(again, real);
        }
    }

    #[test]
    fn threads_fetch_a_chunk_once_and_the_disk_cache_serves_it_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, chunks) = image(3, 4096);
        let (src, faulty) = source(b, Some(dir.path()));
        // Slow replies, so that the threads overlap.
        faulty.push([Fault::Stall(Duration::from_millis(50)); 3]);
        let src = Arc::new(src);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (s, c) = (src.clone(), chunks[i % 3]);
                std::thread::spawn(move || {
                    s.read_chunk(&blob(), &c, &Deadline::none())
                        .map(|d| d.len())
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread").expect("read"), 4096);
        }
        assert_eq!(faulty.requests(), 3);
        // A second source (another process) over the same directory fetches nothing.
        let (b, _) = image(3, 4096);
        let (src2, faulty2) = source(b, Some(dir.path()));
        for c in &chunks {
            src2.read_chunk(&blob(), c, &Deadline::none())
                .expect("from disk");
        }
        assert_eq!(faulty2.requests(), 0);
        assert_eq!(src2.metrics().disk_hits.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn fetch_ahead_fetches_in_the_background_and_reads_find_the_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, chunks) = image(6, 1000);
        let (src, faulty) = source(b, Some(dir.path()));
        let src = Arc::new(src);
        // Not started: a hint does nothing.
        src.fetch_ahead(&blob(), &chunks[1..]);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(faulty.requests(), 0);
        assert!(!src.fetches_ahead());
        src.start_fetch_ahead(2);
        assert!(src.fetches_ahead());
        src.read_chunk(&blob(), &chunks[0], &Deadline::none())
            .expect("first chunk");
        src.fetch_ahead(&blob(), &chunks[1..]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !chunks[1..].iter().all(|c| src.is_cached(c)) {
            assert!(
                std::time::Instant::now() < deadline,
                "fetch-ahead never finished"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The five adjacent chunks came in one request, and reads need no more.
        assert_eq!(faulty.requests(), 2);
        for c in &chunks {
            let d = src
                .read_chunk(&blob(), c, &Deadline::none())
                .expect("cached chunk");
            assert_eq!(blake3::hash(&d).as_bytes(), &c.digest);
        }
        assert_eq!(faulty.requests(), 2);
        // Cached chunks are not queued again.
        src.fetch_ahead(&blob(), &chunks);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(faulty.requests(), 2);
        // The workers hold no strong reference: the source can go away.
        let weak = Arc::downgrade(&src);
        drop(src);
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn adjacent_chunks_are_fetched_with_one_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, chunks) = image(10, 1000);
        let (src, faulty) = source(b, Some(dir.path()));
        let (bytes, errors) = src.fetch_chunks(&blob(), &chunks, false, &Deadline::none());
        assert!(errors.is_empty());
        assert_eq!(bytes, 10_000);
        assert_eq!(faulty.requests(), 1);
        // A bit flip in a merged reply costs one more request, for the chunk it hit.
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, chunks) = image(10, 1000);
        let (src, faulty) = source(b, Some(dir.path()));
        faulty.push([Fault::BitFlip]);
        let results = src.read_chunks(&blob(), &chunks, &Deadline::none());
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(faulty.requests(), 2);
        assert_eq!(src.metrics().verify_failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_chunk_read_once_is_verified_but_not_kept_in_memory() {
        let (b, chunks) = image(2, 1000);
        let (src, faulty) = source(b, None);
        let d = src
            .read_chunk_once(&blob(), &chunks[0], &Deadline::none())
            .expect("read");
        assert_eq!(blake3::hash(&d).as_bytes(), &chunks[0].digest);
        // Not in the memory cache: asked again, it is fetched again.
        src.read_chunk_once(&blob(), &chunks[0], &Deadline::none())
            .expect("read");
        assert_eq!(faulty.requests(), 2);
        // A chunk read piecewise is kept, and a later whole read finds it in memory.
        src.read_chunk(&blob(), &chunks[1], &Deadline::none())
            .expect("read");
        src.read_chunk_once(&blob(), &chunks[1], &Deadline::none())
            .expect("read");
        assert_eq!(faulty.requests(), 3);
        // Wrong bytes are never served this way either.
        faulty.push([Fault::BitFlip; 10]);
        assert!(matches!(
            src.read_chunk_once(&blob(), &chunks[0], &Deadline::none()),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_chunk_failing_in_a_spanning_read_is_not_fetched_twice() {
        let (b, chunks) = image(3, 1000);
        let (src, faulty) = source(b, None);
        // Every reply gets a bit flipped in its middle: in the merged reply that is chunk 1.
        faulty.push([Fault::BitFlip; 10]);
        let results = src.read_chunks(&blob(), &chunks, &Deadline::none());
        assert!(results[0].is_ok() && results[2].is_ok());
        assert!(matches!(results[1], Err(StorageError::Corrupt { .. })));
        assert_eq!(faulty.requests(), 1 + REFETCH_ATTEMPTS as u64);
    }

    #[test]
    fn a_read_does_not_wait_for_a_stalled_fetch_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, chunks) = image(2, 1000);
        let (src, faulty) = source(b, Some(dir.path()));
        let src = Arc::new(src);
        src.start_fetch_ahead(1);
        // The fetch-ahead's request stalls; the reader's own request, after it, does not.
        faulty.push([Fault::Stall(Duration::from_secs(8))]);
        src.fetch_ahead(&blob(), &chunks);
        while faulty.requests() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = std::time::Instant::now();
        let d = src
            .read_chunk(
                &blob(),
                &chunks[1],
                &Deadline::after(Duration::from_secs(30)),
            )
            .expect("read taken over from the stalled fetch-ahead");
        let took = t.elapsed();
        assert_eq!(blake3::hash(&d).as_bytes(), &chunks[1].digest);
        assert!(
            took >= TAKEOVER_AFTER / 2 && took < TAKEOVER_AFTER * 2,
            "the read took {took:?}"
        );
    }

    #[test]
    fn a_read_fails_when_its_deadline_passes_instead_of_hanging() {
        let (b, chunks) = image(1, 1000);
        let (src, faulty) = source(b, None);
        faulty.stall_at(0, Duration::from_secs(10));
        let t = std::time::Instant::now();
        let r = src.read_chunk(
            &blob(),
            &chunks[0],
            &Deadline::after(Duration::from_millis(200)),
        );
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // A second reader waiting on the first one's claim is bounded the same way.
        let src = Arc::new(src);
        let s2 = src.clone();
        let c = chunks[0];
        let first = std::thread::spawn(move || {
            s2.read_chunk(&blob(), &c, &Deadline::after(Duration::from_millis(600)))
                .is_err()
        });
        std::thread::sleep(Duration::from_millis(50));
        let t = std::time::Instant::now();
        let second = src.read_chunk(
            &blob(),
            &chunks[0],
            &Deadline::after(Duration::from_millis(200)),
        );
        assert!(
            matches!(second, Err(StorageError::DeadlineExceeded { .. })),
            "{second:?}"
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(first.join().expect("first reader"));
    }

    /// What a [`Streams`] backend was asked for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Asked {
        Stream(u64, usize),
        Range(u64, usize),
    }

    /// A blob that streams its ranges in pieces of `piece` bytes, and on request: waits for
    /// `go` before the piece that starts at `pause_at`; flips the byte at `flip` in the
    /// streams (and in single range reads too with `flip_ranges`); breaks its first stream
    /// after `break_after` bytes. It notes every request.
    struct Streams {
        data: Vec<u8>,
        piece: usize,
        pause_at: Option<u64>,
        go: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        /// Set while the stream waits for `go`.
        paused: std::sync::atomic::AtomicBool,
        flip: Option<usize>,
        flip_ranges: bool,
        break_after: Option<usize>,
        asked: Mutex<Vec<Asked>>,
    }

    impl Streams {
        fn new(data: Vec<u8>, piece: usize) -> Self {
            Self {
                data,
                piece,
                pause_at: None,
                go: Mutex::new(None),
                paused: std::sync::atomic::AtomicBool::new(false),
                flip: None,
                flip_ranges: false,
                break_after: None,
                asked: Mutex::new(Vec::new()),
            }
        }

        fn asked(&self) -> Vec<Asked> {
            crate::util::sync::lock(&self.asked).clone()
        }

        /// Hands `data[from..to]` to `sink`, the flipped byte flipped.
        fn hand(&self, from: usize, to: usize, sink: &mut dyn FnMut(&[u8])) {
            match self.flip.filter(|f| (from..to).contains(f)) {
                Some(f) => {
                    let mut piece = self.data[from..to].to_vec();
                    piece[f - from] ^= 1;
                    sink(&piece);
                }
                // Straight from the blob: the memory test counts no copy of ours.
                None => sink(&self.data[from..to]),
            }
        }
    }

    impl BlobBackend for Streams {
        fn read_range(
            &self,
            _: &[u8; 32],
            o: u64,
            l: usize,
            _: &Deadline,
        ) -> Result<Vec<u8>, BackendError> {
            crate::util::sync::lock(&self.asked).push(Asked::Range(o, l));
            let (from, to) = (o as usize, o as usize + l);
            let mut bytes = self.data[from..to].to_vec();
            if let Some(f) = self
                .flip
                .filter(|f| self.flip_ranges && (from..to).contains(f))
            {
                bytes[f - from] ^= 1;
            }
            Ok(bytes)
        }

        fn read_range_streaming(
            &self,
            _: &[u8; 32],
            o: u64,
            l: usize,
            _: &Deadline,
            sink: &mut dyn FnMut(&[u8]),
        ) -> Result<(), BackendError> {
            let first = {
                let mut asked = crate::util::sync::lock(&self.asked);
                asked.push(Asked::Stream(o, l));
                !asked[..asked.len() - 1]
                    .iter()
                    .any(|a| matches!(a, Asked::Stream(..)))
            };
            let (start, end) = (o as usize, o as usize + l);
            let stop = match self.break_after.filter(|_| first) {
                Some(n) => start + n,
                None => end,
            };
            let mut pos = start;
            while pos < stop {
                if self.pause_at == Some(pos as u64) {
                    let go = crate::util::sync::lock(&self.go).take();
                    if let Some(go) = go {
                        self.paused.store(true, Ordering::SeqCst);
                        let _ = go.recv();
                        self.paused.store(false, Ordering::SeqCst);
                    }
                }
                let n = self.piece.min(stop - pos);
                self.hand(pos, pos + n, sink);
                pos += n;
            }
            if stop < end {
                return Err(BackendError::Injected("connection reset mid-body"));
            }
            Ok(())
        }

        fn name(&self) -> &'static str {
            "streams"
        }
    }

    fn streamed(
        backend: Streams,
        disk: Option<&std::path::Path>,
    ) -> CachedChunkSource<RetryingBackend<Streams>> {
        let m = Arc::new(Metrics::default());
        let policy = RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_in_flight: 4,
        };
        let disk = disk.map(|d| ChunkDiskCache::open(d, 0, m.clone()).expect("cache"));
        CachedChunkSource::new(
            RetryingBackend::new(backend, policy, m.clone()),
            1 << 20,
            disk,
            m,
        )
    }

    fn streams_of(src: &CachedChunkSource<RetryingBackend<Streams>>) -> &Streams {
        src.backend().inner()
    }

    /// A merged fetch hands each chunk over as soon as its bytes are in: readers of the first
    /// chunks of a run get them, from the run's request and no request of their own, while the
    /// stream is still held before the third chunk.
    #[test]
    fn streamed_runs_hand_chunks_over_as_they_arrive() {
        let (b, chunks) = image(4, 1000);
        let (go, rx) = std::sync::mpsc::channel();
        let mut backend = Streams::new(b.0, 1000);
        backend.pause_at = Some(2000);
        backend.go = Mutex::new(Some(rx));
        let src = Arc::new(streamed(backend, None));
        let bg = {
            let (src, chunks) = (src.clone(), chunks.clone());
            std::thread::spawn(move || {
                src.fetch_chunks(&blob(), &chunks, true, &Deadline::none().background())
            })
        };
        while !streams_of(&src).paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        for c in &chunks[..2] {
            let d = src
                .read_chunk(&blob(), c, &Deadline::after(Duration::from_secs(30)))
                .expect("a chunk already streamed");
            assert_eq!(blake3::hash(&d).as_bytes(), &c.digest);
        }
        assert!(
            streams_of(&src).paused.load(Ordering::SeqCst),
            "the stream went on before the readers were served"
        );
        assert_eq!(streams_of(&src).asked(), vec![Asked::Stream(0, 4000)]);
        go.send(()).expect("go");
        let (fetched, errors) = bg.join().expect("fetch");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fetched, 4000);
        for c in &chunks {
            let d = src.read_chunk(&blob(), c, &Deadline::none()).expect("read");
            assert_eq!(blake3::hash(&d).as_bytes(), &c.digest);
        }
        assert_eq!(
            streams_of(&src).asked(),
            vec![Asked::Stream(0, 4000)],
            "one request in all"
        );
    }

    /// A stream that breaks in the middle of a chunk is resumed where it broke: the chunk cut
    /// in two is put together from both requests and verified, and no byte is fetched twice.
    /// Background work makes one attempt: the chunks delivered before the break are kept, and
    /// the rest (the cut one whole) are fetched each on its own.
    #[test]
    fn a_broken_stream_is_resumed_and_the_chunk_it_cut_is_served_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, chunks) = image(4, 1000);
        // Pieces that do not fall on chunk boundaries, a break inside chunk 2.
        let mut backend = Streams::new(b.0.clone(), 300);
        backend.break_after = Some(2500);
        let src = streamed(backend, Some(dir.path()));
        let (fetched, errors) = src.fetch_chunks(&blob(), &chunks, true, &Deadline::none());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fetched, 4000);
        assert_eq!(
            streams_of(&src).asked(),
            vec![Asked::Stream(0, 4000), Asked::Stream(2500, 1500)]
        );
        let m = src.metrics();
        assert_eq!(m.backend_bytes.load(Ordering::Relaxed), 4000);
        assert_eq!(m.backend_retries.load(Ordering::Relaxed), 1);
        assert_eq!(m.verify_failures.load(Ordering::Relaxed), 0);
        for c in &chunks {
            let d = src.read_chunk(&blob(), c, &Deadline::none()).expect("read");
            assert_eq!(blake3::hash(&d).as_bytes(), &c.digest);
            let disk = src.disk().expect("disk").get(&c.chunk_digest(), 1000);
            assert_eq!(disk.as_deref(), Some(&d[..]), "the disk cache's copy");
        }
        assert_eq!(streams_of(&src).asked().len(), 2, "served from the caches");

        let dir = tempfile::tempdir().expect("tempdir");
        let mut backend = Streams::new(b.0, 300);
        backend.break_after = Some(2500);
        let src = streamed(backend, Some(dir.path()));
        let (fetched, errors) =
            src.fetch_chunks(&blob(), &chunks, false, &Deadline::none().background());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fetched, 4000);
        assert_eq!(
            streams_of(&src).asked(),
            vec![
                Asked::Stream(0, 4000),
                Asked::Range(2000, 1000),
                Asked::Range(3000, 1000)
            ]
        );
        for c in &chunks {
            let d = src.read_chunk(&blob(), c, &Deadline::none()).expect("read");
            assert_eq!(blake3::hash(&d).as_bytes(), &c.digest);
        }
        assert_eq!(
            streams_of(&src).asked().len(),
            3,
            "served from the disk cache"
        );
    }

    /// A chunk that fails verification in the middle of a streamed run is fetched again on its
    /// own, after the run (whose later chunks are not fetched again); when it never verifies,
    /// that chunk alone fails, and its bad bytes reach neither a reader nor a cache.
    #[test]
    fn a_corrupt_chunk_in_a_run_is_fetched_again_alone_and_never_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, chunks) = image(5, 1000);
        let mut backend = Streams::new(b.0.clone(), 700);
        backend.flip = Some(2500);
        let src = streamed(backend, Some(dir.path()));
        let (fetched, errors) = src.fetch_chunks(&blob(), &chunks, true, &Deadline::none());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fetched, 5000);
        assert_eq!(
            streams_of(&src).asked(),
            vec![Asked::Stream(0, 5000), Asked::Range(2000, 1000)]
        );
        assert_eq!(src.metrics().verify_failures.load(Ordering::Relaxed), 1);
        for c in &chunks {
            let d = src.read_chunk(&blob(), c, &Deadline::none()).expect("read");
            assert_eq!(blake3::hash(&d).as_bytes(), &c.digest);
            let disk = src.disk().expect("disk").get(&c.chunk_digest(), 1000);
            assert_eq!(disk.as_deref(), Some(&d[..]), "the disk cache's copy");
        }

        // Corrupt however it is fetched.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut backend = Streams::new(b.0, 700);
        backend.flip = Some(2500);
        backend.flip_ranges = true;
        let src = streamed(backend, Some(dir.path()));
        let (fetched, errors) = src.fetch_chunks(&blob(), &chunks, true, &Deadline::none());
        assert_eq!(fetched, 4000);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, chunks[2].chunk_digest());
        assert!(
            matches!(errors[0].1, StorageError::Corrupt { .. }),
            "{errors:?}"
        );
        let mut want = vec![Asked::Stream(0, 5000)];
        want.extend([Asked::Range(2000, 1000); REFETCH_ATTEMPTS]);
        assert_eq!(streams_of(&src).asked(), want);
        let disk = src.disk().expect("disk");
        assert!(
            !disk.contains(&chunks[2].chunk_digest()),
            "bad bytes stored"
        );
        assert!(matches!(
            src.read_chunk(&blob(), &chunks[2], &Deadline::none()),
            Err(StorageError::Corrupt { .. })
        ));
        for i in [0, 1, 3, 4] {
            let d = src
                .read_chunk(&blob(), &chunks[i], &Deadline::none())
                .expect("read");
            assert_eq!(blake3::hash(&d).as_bytes(), &chunks[i].digest);
            assert!(disk.contains(&chunks[i].chunk_digest()));
        }
    }

    /// A streamed run of 4 MiB holds one chunk's bytes at a time: the heap this thread uses
    /// while it is fetched stays under three chunks (the chunk being put together, its
    /// decoded copy, and change), where reading the run whole takes all of it.
    #[test]
    fn a_streamed_run_holds_one_chunk_at_a_time() {
        const CHUNK: usize = 64 << 10;
        let (b, chunks) = image(64, CHUNK);
        let run = 64 * CHUNK;
        // Pieces across chunk boundaries.
        let src = CachedChunkSource::new(
            Streams::new(b.0, 48 << 10),
            1 << 20,
            None,
            Arc::new(Metrics::default()),
        );
        let ((fetched, errors), peak) = crate::util::heap_meter::peak_during(|| {
            src.fetch_chunks(&blob(), &chunks, false, &Deadline::none())
        });
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fetched, run as u64);
        assert_eq!(src.backend().asked(), vec![Asked::Stream(0, run)]);
        assert!(
            peak < 3 * CHUNK,
            "{peak} bytes of heap for a streamed run of {run}"
        );
        // The meter sees a whole run held.
        let (bytes, peak) = crate::util::heap_meter::peak_during(|| {
            src.backend()
                .read_range(&[0; 32], 0, run, &Deadline::none())
                .map(|b| b.len())
        });
        assert_eq!(bytes.expect("read"), run);
        assert!(peak >= run, "the meter counted {peak} bytes for {run}");
    }
}
