//! Decode-ahead: decompressing and verifying the chunks that follow a read in its blob, on
//! another core, before the reads ask for them.
//!
//! A blob stores chunks in the order the image was built (sorted names, pre-order), which is
//! the order a full read (`tar`, `cp -a`, a container's first scan of its tree) walks the files;
//! and the chunks of one big file lie one after another. So a read of chunk `p` of a blob is
//! very likely followed by reads of `p + 1`, `p + 2`, ...: of the next small files, or of the
//! rest of the big one. A reader that sends one request at a time (tar) otherwise pays for
//! every chunk's decompression and digest on its critical path; with decode-ahead it finds the
//! chunk decoded and verified in the memory cache, and the work ran on the other core.
//!
//! - **Streams.** Reads are matched to a few *streams* (a blob and a position in it that moves
//!   forward). A stream is decoded ahead once two reads have moved it forward, or at once by
//!   one chunk when a read takes a chunk piecewise (a big file read in pieces goes on into the
//!   next chunk). Random reads (a program paging in its binary) start streams that never
//!   move, and so cost nothing.
//! - **Bounded.** What is decoded ahead goes to the memory cache and counts against its share
//!   there: at most half the cache (2 MiB at the default 1 MiB chunk size), and at most
//!   [`MAX_AHEAD_CHUNKS`] chunks ahead of a stream's last read. One run being decoded holds at
//!   most [`RUN_STORED_BYTES`] of stored bytes and one chunk. So memory does not depend on the
//!   image: a hostile bootstrap (overlapping chunks, absurd orders) costs at most wasted work
//!   within those bounds, and a chunk that fails verification is simply not kept (the read
//!   that wants it fetches it again and reports the failure).
//! - **Verified only.** Chunks are decoded with the same [`super::decode_chunk`] as any read
//!   and enter the cache only when their digest matches.
//! - **No network.** For a remote backend only chunks already in the disk cache are read ahead
//!   (their digest checked as on any read from disk); fetching belongs to fetch-ahead and
//!   prefetch, which account for bytes.
//! - **Cheap for the reader.** A read updates its stream under one uncontended lock, and wakes
//!   the worker only when the window has half emptied, so that the worker refills it in runs
//!   (one `pread` for a run of adjacent chunks) instead of waking for every read.

use std::sync::{Arc, Condvar, Mutex};

use crate::format::{BlobRecord, Bootstrap, ChunkRecord};
use crate::util::sync::{lock, wait};

/// Streams followed at once (readers reading different places in parallel).
pub const MAX_STREAMS: usize = 4;

/// Chunks decoded ahead of a stream's last read, at most.
pub const MAX_AHEAD_CHUNKS: usize = 64;

/// Stored bytes read with one request for a run of adjacent chunks, at most (what nydusd's
/// `amplify_io` reads at once by default).
pub const RUN_STORED_BYTES: u64 = 1 << 20;

/// A read this many positions past a stream's window still moves that stream forward (files
/// whose chunks were stored earlier, empty files, a reader that skipped a few files).
const STREAM_GAP: usize = 8;

/// One position in a blob's stored order that reads move forward.
#[derive(Clone, Copy, Debug)]
struct Stream {
    blob: u32,
    /// Position of the last chunk read.
    last: usize,
    /// Next position to decode.
    next: usize,
    /// Chunks it may have decoded ahead of `last`.
    window: usize,
    /// When it was last read (for replacing the least recently read).
    tick: u64,
}

struct State {
    streams: Vec<Stream>,
    tick: u64,
    /// The worker is waiting for work.
    idle: bool,
    closing: bool,
}

/// The blobs' chunks in stored order, and the streams reading them.
pub struct DecodeAhead {
    bootstrap: Arc<Bootstrap>,
    /// Per blob index: indices into the chunk table, sorted by stored offset, one per offset,
    /// zero chunks left out.
    order: Vec<Vec<u32>>,
    /// Bytes decoded ahead and not used yet, at most.
    limit: usize,
    state: Mutex<State>,
    work: Condvar,
}

/// A run of adjacent chunks of one blob to decode.
pub struct Run {
    /// The blob.
    pub blob: BlobRecord,
    /// The chunks, adjacent in the blob, in stored order.
    pub chunks: Vec<ChunkRecord>,
}

impl DecodeAhead {
    /// The stored order of `bootstrap`'s blobs; at most `limit` bytes decoded ahead.
    pub fn new(bootstrap: Arc<Bootstrap>, limit: usize) -> Self {
        let chunks = bootstrap.tables().chunks;
        let mut order: Vec<Vec<u32>> = vec![Vec::new(); bootstrap.blobs().len()];
        for (i, c) in chunks.iter().enumerate() {
            if c.is_zero() {
                continue;
            }
            if let (Some(list), Ok(i)) =
                (order.get_mut(c.blob_index.get() as usize), u32::try_from(i))
            {
                list.push(i);
            }
        }
        let offset = |i: &u32| {
            chunks
                .get(*i as usize)
                .map_or(0, |c| c.compressed_offset.get())
        };
        for list in &mut order {
            list.sort_by_key(offset);
            // Chunks deduplicated between files are the same bytes: one position each.
            list.dedup_by_key(|i| offset(i));
            list.shrink_to_fit();
        }
        Self {
            bootstrap,
            order,
            limit,
            state: Mutex::new(State {
                streams: Vec::with_capacity(MAX_STREAMS),
                tick: 0,
                idle: false,
                closing: false,
            }),
            work: Condvar::new(),
        }
    }

    /// Bytes decoded ahead and not used yet, at most.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Where `chunk` is in its blob's stored order.
    fn position(&self, chunk: &ChunkRecord) -> Option<(u32, usize)> {
        let blob = chunk.blob_index.get();
        let list = self.order.get(blob as usize)?;
        let chunks = self.bootstrap.tables().chunks;
        let want = chunk.compressed_offset.get();
        let pos = list
            .binary_search_by_key(&want, |i| {
                chunks
                    .get(*i as usize)
                    .map_or(0, |c| c.compressed_offset.get())
            })
            .ok()?;
        Some((blob, pos))
    }

    /// Tells the streams that a reader read `chunk` (not a zero chunk), piecewise or whole;
    /// `ahead_bytes` is what the memory cache holds decoded ahead and unused. Wakes the worker
    /// if a stream's window has half emptied.
    pub fn note_read(&self, chunk: &ChunkRecord, piecewise: bool, ahead_bytes: usize) {
        let Some((blob, pos)) = self.position(chunk) else {
            return;
        };
        let mut g = lock(&self.state);
        g.tick += 1;
        let tick = g.tick;
        let found = g
            .streams
            .iter_mut()
            .find(|s| s.blob == blob && pos >= s.last && pos <= s.next + STREAM_GAP);
        let s = match found {
            Some(s) => {
                if pos > s.last {
                    // Moved forward twice: a sequential reader.
                    s.window = MAX_AHEAD_CHUNKS;
                    s.last = pos;
                }
                s.next = s.next.max(pos + 1);
                s.tick = tick;
                *s
            }
            None => {
                let s = Stream {
                    blob,
                    last: pos,
                    next: pos + 1,
                    // A chunk read piecewise is a big file being read: its next chunk is
                    // likely next. A whole chunk alone says nothing yet.
                    window: usize::from(piecewise),
                    tick,
                };
                if g.streams.len() < MAX_STREAMS {
                    g.streams.push(s);
                } else if let Some(lru) = g.streams.iter_mut().min_by_key(|s| s.tick) {
                    *lru = s;
                }
                s
            }
        };
        if !g.idle || s.window == 0 {
            return;
        }
        let ahead = s.next - s.last - 1;
        let room_chunks = ahead * 2 <= s.window;
        let room_bytes = ahead_bytes * 2 <= self.limit;
        if room_chunks && room_bytes && self.has_more(&s) {
            g.idle = false;
            drop(g);
            self.work.notify_one();
        }
    }

    /// Whether the blob has chunks after the stream's next position to decode.
    fn has_more(&self, s: &Stream) -> bool {
        self.order
            .get(s.blob as usize)
            .is_some_and(|l| s.next < l.len())
    }

    /// The next run to decode, waiting for one; `None` once [`Self::close`] was called.
    /// `ahead_bytes` reads what the memory cache holds decoded ahead and unused.
    pub fn next_run(&self, ahead_bytes: impl Fn() -> usize) -> Option<Run> {
        let mut g = lock(&self.state);
        loop {
            if g.closing {
                return None;
            }
            let budget = self.limit.saturating_sub(ahead_bytes());
            if let Some(run) = self.take_run(&mut g.streams, budget) {
                return Some(run);
            }
            g.idle = true;
            g = wait(&self.work, g);
        }
    }

    /// Cuts a run from the stream with the fewest chunks decoded ahead, within `budget` bytes
    /// decoded, and moves that stream's next position past it.
    fn take_run(&self, streams: &mut [Stream], budget: usize) -> Option<Run> {
        let chunks = self.bootstrap.tables().chunks;
        let s = streams
            .iter_mut()
            .filter(|s| s.window > 0 && s.next - s.last - 1 < s.window && self.has_more(s))
            .min_by_key(|s| s.next - s.last)?;
        let list = self.order.get(s.blob as usize)?;
        let blob = *self.bootstrap.blobs().get(s.blob as usize)?;
        let room = s.window - (s.next - s.last - 1);
        let mut run: Vec<ChunkRecord> = Vec::new();
        let (mut stored, mut decoded) = (0u64, 0usize);
        for i in list.get(s.next..)?.iter().take(room) {
            let Some(c) = chunks.get(*i as usize) else {
                break;
            };
            let size = c.uncompressed_size.get() as usize;
            let len = u64::from(c.compressed_size.get());
            let adjacent = run.last().is_none_or(|p| {
                p.compressed_offset.get() + u64::from(p.compressed_size.get())
                    == c.compressed_offset.get()
            });
            let fits =
                decoded + size <= budget && (run.is_empty() || stored + len <= RUN_STORED_BYTES);
            if !adjacent || !fits {
                break;
            }
            stored += len;
            decoded += size;
            run.push(*c);
        }
        if run.is_empty() {
            return None;
        }
        s.next += run.len();
        Some(Run { blob, chunks: run })
    }

    /// Stops the worker (it returns from [`Self::next_run`]).
    pub fn close(&self) {
        lock(&self.state).closing = true;
        self.work.notify_all();
    }
}
