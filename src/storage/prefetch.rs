//! Background prefetch: fetches the chunks of chosen files (the bootstrap's prefetch table, or a
//! runtime list) into the disk cache first, then, if asked, every chunk of the image, so that
//! the container stops needing the network.
//!
//! The worker is one thread making one backend request at a time (merged runs of adjacent
//! chunks), so it holds at most one of the backend's request slots: foreground reads never
//! queue behind it. An optional bandwidth cap spaces its requests out. Chunks go to the disk
//! cache only, not the memory cache, so prefetch does not push out what readers are using.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::metrics::{add, inc};
use super::{BlobBackend, CachedChunkSource, Deadline, DEFAULT_REQUEST_TIMEOUT, MAX_MERGED_BYTES};
use crate::format::{Bootstrap, ChunkRecord, InodeKind};
use crate::runtime::threads::{self, ThreadKind};

/// What to prefetch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefetchOptions {
    /// Inode indices whose chunks come first, in order.
    pub first: Vec<u32>,
    /// Then every chunk of the image.
    pub all: bool,
    /// Bytes per second the worker may fetch (None: no cap).
    pub bandwidth: Option<u64>,
}

/// One backend request's worth of chunks: a blob index and chunks of it.
pub type Batch = (u32, Vec<ChunkRecord>);

/// Resolves a path in the image (absolute or relative to the root) to its inode index.
pub fn resolve(bootstrap: &Bootstrap, path: &str) -> Option<u32> {
    let mut ino = 0u32;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        ino = bootstrap.lookup(ino, part.as_bytes())?;
    }
    Some(ino)
}

/// The regular files at or under inode `ino`, depth first, in name order.
pub fn files_under(bootstrap: &Bootstrap, ino: u32, out: &mut Vec<u32>) {
    match bootstrap.inode(ino).and_then(|r| r.kind()) {
        Some(InodeKind::Regular) => out.push(ino),
        Some(InodeKind::Directory) => {
            for d in bootstrap.dir_entries(ino) {
                let child = d.inode.get();
                // Directory indices only grow downwards (the format requires it), which keeps
                // this walk finite even on a hostile bootstrap.
                if child > ino {
                    files_under(bootstrap, child, out);
                }
            }
        }
        _ => {}
    }
}

/// Orders the work: the chunks of `opts.first` files in order, then with `opts.all` every other
/// chunk by blob and offset; each chunk once, zero chunks never, cut into batches of adjacent
/// chunks of at most [`MAX_MERGED_BYTES`].
pub fn plan(bootstrap: &Bootstrap, opts: &PrefetchOptions) -> Vec<Batch> {
    let mut seen = HashSet::new();
    let mut batches: Vec<Batch> = Vec::new();
    let mut push = |c: &ChunkRecord, batches: &mut Vec<Batch>| {
        if c.is_zero() || !seen.insert(c.chunk_digest()) {
            return;
        }
        let blob = c.blob_index.get();
        if let Some((b, last)) = batches.last_mut() {
            let end = last
                .last()
                .map(|l| l.compressed_offset.get() + u64::from(l.compressed_size.get()));
            let first = last.first().map_or(0, |f| f.compressed_offset.get());
            if *b == blob
                && end == Some(c.compressed_offset.get())
                && end.unwrap_or(0) + u64::from(c.compressed_size.get()) - first <= MAX_MERGED_BYTES
            {
                last.push(*c);
                return;
            }
        }
        batches.push((blob, vec![*c]));
    };
    for &ino in &opts.first {
        for c in bootstrap.file_chunks(ino) {
            push(c, &mut batches);
        }
    }
    if opts.all {
        let mut rest: Vec<ChunkRecord> = bootstrap.tables().chunks.to_vec();
        rest.sort_by_key(|c| (c.blob_index.get(), c.compressed_offset.get()));
        for c in &rest {
            push(c, &mut batches);
        }
    }
    batches
}

/// A running prefetch worker.
pub struct PrefetchHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PrefetchHandle {
    /// Asks the worker to stop after its current request and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Waits for the worker to finish its list.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the worker over `source`, which must have a disk cache to be useful (without one, the
/// chunks would only pass through the memory cache).
pub fn spawn<B: BlobBackend + 'static>(
    bootstrap: Arc<Bootstrap>,
    source: Arc<CachedChunkSource<B>>,
    opts: PrefetchOptions,
) -> PrefetchHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = threads::spawn(ThreadKind::Fetcher, "skiff-prefetch", move || {
        run(&bootstrap, &source, &opts, &stop2)
    })
    .map_err(|e| tracing::error!(error = %e, "cannot start the prefetch thread"))
    .ok();
    PrefetchHandle { stop, thread }
}

/// The worker's loop (public so tests can run it in the foreground).
pub fn run<B: BlobBackend>(
    bootstrap: &Bootstrap,
    source: &CachedChunkSource<B>,
    opts: &PrefetchOptions,
    stop: &AtomicBool,
) {
    let m = source.metrics().clone();
    let batches = plan(bootstrap, opts);
    let total: u64 = batches.iter().map(|(_, b)| b.len() as u64).sum();
    add(&m.prefetch_chunks_total, total);
    tracing::info!(chunks = total, requests = batches.len(), bandwidth = ?opts.bandwidth, "prefetch started");
    let start = Instant::now();
    let mut bytes = 0u64;
    for (blob_index, chunks) in &batches {
        if stop.load(Ordering::Relaxed) {
            tracing::info!("prefetch stopped");
            return;
        }
        let Some(blob) = bootstrap.blobs().get(*blob_index as usize) else {
            add(&m.prefetch_errors, chunks.len() as u64);
            continue;
        };
        let deadline = Deadline::after(DEFAULT_REQUEST_TIMEOUT).background();
        let (fetched, errors) = source.fetch_chunks(blob, chunks, false, &deadline);
        for (_, e) in &errors {
            tracing::warn!(error = %crate::util::error_chain(e), "prefetch could not fetch a chunk");
        }
        add(&m.prefetch_errors, errors.len() as u64);
        add(&m.prefetch_bytes, fetched);
        add(&m.prefetch_chunks_done, chunks.len() as u64);
        bytes += fetched;
        if let Some(bw) = opts.bandwidth.filter(|b| *b > 0) {
            let due = Duration::from_secs_f64(bytes as f64 / bw as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
    inc(&m.prefetch_complete);
    tracing::info!(
        bytes,
        seconds = start.elapsed().as_secs_f64(),
        errors = m.prefetch_errors.load(Ordering::Relaxed),
        "prefetch finished"
    );
}
