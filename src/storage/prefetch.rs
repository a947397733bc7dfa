//! Background prefetch: fetches the chunks of chosen files (the bootstrap's prefetch table, or a
//! runtime list) into the disk cache first, then, if asked, every chunk of the image, so that
//! the container stops needing the network.
//!
//! By default one worker thread makes one backend request at a time (merged runs of adjacent
//! chunks), so it holds at most one of the backend's request slots: foreground reads never
//! queue behind it. More workers (nydusd's `threads_count`) each hold one. An optional
//! bandwidth cap, shared by the workers, spaces the requests out. Chunks go to the disk cache
//! only, not the memory cache, so prefetch does not push out what readers are using.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Bytes per second the workers may fetch together (None: no cap).
    pub bandwidth: Option<u64>,
    /// Worker threads (0 is taken as 1).
    pub threads: usize,
    /// Largest merged request in bytes (0: [`MAX_MERGED_BYTES`]).
    pub merge_bytes: u64,
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

/// Orders the work: the chunks of `opts.first` files, then with `opts.all` every other chunk by
/// blob and offset; each chunk once, zero chunks never, cut into batches of adjacent chunks of
/// at most `opts.merge_bytes` ([`MAX_MERGED_BYTES`] by default).
///
/// The listed files' chunks are merged by where they lie in the blob, not by the order of the
/// list: an image that stores them together (nydus-image's `--prefetch-policy fs` lays them out
/// by path, Skiff's prefetch blob in list order) is fetched in as few requests as its layout
/// allows, whatever the order of the list. The batches go in the order of their first listed
/// file, so the files read first still come first.
pub fn plan(bootstrap: &Bootstrap, opts: &PrefetchOptions) -> Vec<Batch> {
    let max_merge = match opts.merge_bytes {
        0 => MAX_MERGED_BYTES,
        n => n,
    };
    let mut seen = HashSet::new();
    // Appends `c` to `batches`' last batch when it follows it in the same blob, else starts one.
    let push = |c: &ChunkRecord, batches: &mut Vec<Batch>| {
        let blob = c.blob_index.get();
        if let Some((b, last)) = batches.last_mut() {
            let end = last
                .last()
                .map(|l| l.compressed_offset.get() + u64::from(l.compressed_size.get()));
            let first = last.first().map_or(0, |f| f.compressed_offset.get());
            if *b == blob
                && end == Some(c.compressed_offset.get())
                && end.unwrap_or(0) + u64::from(c.compressed_size.get()) - first <= max_merge
            {
                last.push(*c);
                return;
            }
        }
        batches.push((blob, vec![*c]));
    };
    // The listed chunks, each with the rank of the first file that needs it.
    let mut listed: Vec<(usize, ChunkRecord)> = Vec::new();
    for (rank, &ino) in opts.first.iter().enumerate() {
        for c in bootstrap.file_chunks(ino) {
            if !c.is_zero() && seen.insert(c.chunk_digest()) {
                listed.push((rank, *c));
            }
        }
    }
    listed.sort_by_key(|(_, c)| (c.blob_index.get(), c.compressed_offset.get()));
    let mut runs: Vec<Batch> = Vec::new();
    let mut ranks: Vec<usize> = Vec::new();
    for (rank, c) in &listed {
        let before = runs.len();
        push(c, &mut runs);
        if runs.len() > before {
            ranks.push(*rank);
        } else if let Some(r) = ranks.last_mut() {
            *r = (*r).min(*rank);
        }
    }
    let mut order: Vec<usize> = (0..runs.len()).collect();
    // Stable: runs needed by the same file keep their blob order.
    order.sort_by_key(|&i| ranks[i]);
    let mut slots: Vec<Option<Batch>> = runs.into_iter().map(Some).collect();
    let mut batches: Vec<Batch> = order.into_iter().filter_map(|i| slots[i].take()).collect();
    if opts.all {
        let mut rest: Vec<ChunkRecord> = bootstrap.tables().chunks.to_vec();
        rest.sort_by_key(|c| (c.blob_index.get(), c.compressed_offset.get()));
        for c in &rest {
            if !c.is_zero() && seen.insert(c.chunk_digest()) {
                push(c, &mut batches);
            }
        }
    }
    batches
}

/// Running prefetch workers.
pub struct PrefetchHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PrefetchHandle {
    /// Asks the workers to stop after their current request and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.join();
    }

    /// Waits for the workers to finish the list.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The work shared by the workers: the batches, the next one to take, the bytes fetched so far
/// (for the bandwidth cap) and when prefetch started.
struct Work {
    batches: Vec<Batch>,
    next: AtomicU64,
    bytes: AtomicU64,
    workers_left: AtomicU64,
    start: Instant,
}

/// Starts the workers over `source`, which must have a disk cache to be useful (without one,
/// the chunks would only pass through the memory cache).
pub fn spawn<B: BlobBackend + 'static>(
    bootstrap: Arc<Bootstrap>,
    source: Arc<CachedChunkSource<B>>,
    opts: PrefetchOptions,
) -> PrefetchHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(start_work(&bootstrap, &source, &opts));
    let n = opts.threads.max(1);
    let mut threads = Vec::with_capacity(n);
    for i in 0..n {
        let (b, s, o, st, w) = (
            bootstrap.clone(),
            source.clone(),
            opts.clone(),
            stop.clone(),
            work.clone(),
        );
        match threads::spawn(
            ThreadKind::Fetcher,
            format!("skiff-prefetch-{i}"),
            move || work_loop(&b, &s, &o, &st, &w),
        ) {
            Ok(t) => threads.push(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start a prefetch thread");
                work.workers_left.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
    PrefetchHandle { stop, threads }
}

fn start_work<B: BlobBackend>(
    bootstrap: &Bootstrap,
    source: &CachedChunkSource<B>,
    opts: &PrefetchOptions,
) -> Work {
    let batches = plan(bootstrap, opts);
    let total: u64 = batches.iter().map(|(_, b)| b.len() as u64).sum();
    add(&source.metrics().prefetch_chunks_total, total);
    tracing::info!(
        chunks = total,
        requests = batches.len(),
        threads = opts.threads.max(1),
        bandwidth = ?opts.bandwidth,
        "prefetch started"
    );
    Work {
        batches,
        next: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        workers_left: AtomicU64::new(opts.threads.max(1) as u64),
        start: Instant::now(),
    }
}

/// The workers' loop, run in the foreground by one thread (public for tests).
pub fn run<B: BlobBackend>(
    bootstrap: &Bootstrap,
    source: &CachedChunkSource<B>,
    opts: &PrefetchOptions,
    stop: &AtomicBool,
) {
    let one = PrefetchOptions {
        threads: 1,
        ..opts.clone()
    };
    let work = start_work(bootstrap, source, &one);
    work_loop(bootstrap, source, &one, stop, &work);
}

fn work_loop<B: BlobBackend>(
    bootstrap: &Bootstrap,
    source: &CachedChunkSource<B>,
    opts: &PrefetchOptions,
    stop: &AtomicBool,
    work: &Work,
) {
    let m = source.metrics().clone();
    loop {
        if stop.load(Ordering::Relaxed) {
            tracing::info!("prefetch stopped");
            return;
        }
        let i = work.next.fetch_add(1, Ordering::Relaxed);
        let Some((blob_index, chunks)) = usize::try_from(i).ok().and_then(|i| work.batches.get(i))
        else {
            break;
        };
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
        let bytes = work.bytes.fetch_add(fetched, Ordering::Relaxed) + fetched;
        if let Some(bw) = opts.bandwidth.filter(|b| *b > 0) {
            let due = Duration::from_secs_f64(bytes as f64 / bw as f64);
            let elapsed = work.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
    // The last worker to finish reports the end.
    if work.workers_left.fetch_sub(1, Ordering::AcqRel) == 1 {
        inc(&m.prefetch_complete);
        tracing::info!(
            bytes = work.bytes.load(Ordering::Relaxed),
            seconds = work.start.elapsed().as_secs_f64(),
            errors = m.prefetch_errors.load(Ordering::Relaxed),
            "prefetch finished"
        );
    }
}
