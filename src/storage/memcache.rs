//! A small in-memory cache of decompressed chunks, so that the many small reads the kernel
//! makes inside one chunk decompress and verify it once, and so that chunks decoded ahead of
//! the reads (`super::ahead`) wait there for the read that wants them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::ChunkData;
use crate::format::ChunkDigest;
use crate::util::sync::lock;

/// Least-recently-used cache of verified chunks keyed by digest, bounded in bytes.
///
/// Entries put there by decode-ahead ([`Self::insert_ahead`]) are counted apart until a read
/// uses them, so that decode-ahead can keep its share of the cache bounded
/// ([`Self::ahead_bytes`]): it never holds more than half the cache, and the chunks being read
/// piecewise keep the rest.
pub struct ChunkMemCache {
    limit: usize,
    inner: Mutex<Inner>,
    /// `Inner::ahead_bytes`, readable without the lock (every read asks).
    ahead_bytes: AtomicUsize,
}

struct Entry {
    tick: u64,
    data: ChunkData,
    /// Decoded ahead and not used by a read yet.
    ahead: bool,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    bytes: usize,
    /// Bytes of entries with `ahead` set.
    ahead_bytes: usize,
    map: HashMap<ChunkDigest, Entry>,
}

impl Inner {
    fn remove(&mut self, digest: &ChunkDigest) -> Option<Entry> {
        let e = self.map.remove(digest)?;
        self.bytes -= e.data.len();
        if e.ahead {
            self.ahead_bytes -= e.data.len();
        }
        Some(e)
    }

    /// Evicts entries until the cache fits in `limit`; returns how many of them were decoded
    /// ahead and never used.
    ///
    /// Stale entries decoded ahead go first (a reader skipped them), then the least recently
    /// used of the others (chunks served already), and chunks decoded ahead for a reader still
    /// coming last: decode-ahead's share is bounded by [`ChunkMemCache::insert_ahead`], so the
    /// chunks being read piecewise keep at least the other half.
    fn evict_to(&mut self, limit: usize) -> u64 {
        let mut wasted = 0;
        let stale_before = self.tick.saturating_sub(AHEAD_STALE_TICKS);
        // The map holds a handful of big entries or a few hundred small ones (limit / chunk
        // size), so a scan per eviction is cheap next to the decoding that filled it.
        while self.bytes > limit {
            let rank = |e: &Entry| match (e.ahead, e.tick < stale_before) {
                (true, true) => 0,
                (false, _) => 1,
                (true, false) => 2,
            };
            let Some((&victim, _)) = self.map.iter().min_by_key(|(_, e)| (rank(e), e.tick)) else {
                break;
            };
            if self.remove(&victim).is_some_and(|e| e.ahead) {
                wasted += 1;
            }
        }
        wasted
    }

    /// Drops the entries decoded ahead that no read took within [`AHEAD_STALE_TICKS`] cache
    /// operations: the reader went elsewhere. Returns how many.
    fn drop_stale_ahead(&mut self) -> u64 {
        let stale_before = self.tick.saturating_sub(AHEAD_STALE_TICKS);
        let stale: Vec<ChunkDigest> = self
            .map
            .iter()
            .filter(|(_, e)| e.ahead && e.tick < stale_before)
            .map(|(d, _)| *d)
            .collect();
        for d in &stale {
            self.remove(d);
        }
        stale.len() as u64
    }
}

/// Cache operations after which an entry decoded ahead that no read took counts as stale.
/// A reader that follows its stream takes each within a few operations per chunk of the window
/// (`ahead::MAX_AHEAD_CHUNKS` chunks); one that skipped it, or went elsewhere, never will.
const AHEAD_STALE_TICKS: u64 = 1024;

impl ChunkMemCache {
    /// A cache that holds at most `limit` bytes of chunk data.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            inner: Mutex::new(Inner::default()),
            ahead_bytes: AtomicUsize::new(0),
        }
    }

    /// The byte limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The chunk with `digest` and `len` bytes, if cached, and whether it had been decoded
    /// ahead. A chunk decoded ahead counts as used from now on; with `consume` (a read that
    /// uses the whole chunk once: the page cache keeps what it served) it is removed, leaving
    /// room for the next ones.
    ///
    /// The length is part of what a chunk record says: a record giving a cached chunk's digest
    /// with another size names no chunk that exists (a crafted bootstrap can), and serving the
    /// cached bytes for it would serve bytes under a digest and size they do not have. Such a
    /// lookup misses, and the fetch that follows fails verification.
    pub fn get(
        &self,
        digest: &ChunkDigest,
        len: usize,
        consume: bool,
    ) -> Option<(ChunkData, bool)> {
        let mut g = lock(&self.inner);
        g.tick += 1;
        let tick = g.tick;
        let e = g.map.get_mut(digest)?;
        if e.data.len() != len {
            return None;
        }
        if e.ahead && consume {
            let r = g.remove(digest).map(|e| (e.data, true));
            self.publish(&g);
            return r;
        }
        e.tick = tick;
        let was_ahead = std::mem::replace(&mut e.ahead, false);
        let data = e.data.clone();
        if was_ahead {
            g.ahead_bytes -= len;
            self.publish(&g);
        }
        Some((data, was_ahead))
    }

    /// Whether a chunk with `digest` and `len` bytes is cached (without touching it).
    pub fn contains(&self, digest: &ChunkDigest, len: usize) -> bool {
        lock(&self.inner)
            .map
            .get(digest)
            .is_some_and(|e| e.data.len() == len)
    }

    /// Caches `data` under `digest`, evicting the least recently used chunks beyond the limit;
    /// returns how many evicted chunks had been decoded ahead and never used.
    pub fn insert(&self, digest: ChunkDigest, data: ChunkData) -> u64 {
        if data.len() > self.limit {
            return 0;
        }
        let mut g = lock(&self.inner);
        g.tick += 1;
        let tick = g.tick;
        g.remove(&digest);
        g.bytes += data.len();
        g.map.insert(
            digest,
            Entry {
                tick,
                data,
                ahead: false,
            },
        );
        let wasted = g.evict_to(self.limit);
        self.publish(&g);
        wasted
    }

    /// Caches `data`, decoded ahead of the reads, if the entries decoded ahead and not used yet
    /// stay within `ahead_limit` bytes with it (`None` if not). Returns how many evicted chunks
    /// had been decoded ahead and never used. A chunk cached already is left as it is.
    pub fn insert_ahead(
        &self,
        digest: ChunkDigest,
        data: ChunkData,
        ahead_limit: usize,
    ) -> Option<u64> {
        let len = data.len();
        let mut g = lock(&self.inner);
        if g.map.contains_key(&digest) {
            return Some(0);
        }
        let limit = ahead_limit.min(self.limit);
        let mut wasted = 0;
        if g.ahead_bytes + len > limit {
            wasted = g.drop_stale_ahead();
            self.publish(&g);
        }
        if len > self.limit || g.ahead_bytes + len > limit {
            return None;
        }
        g.tick += 1;
        let tick = g.tick;
        g.bytes += len;
        g.ahead_bytes += len;
        g.map.insert(
            digest,
            Entry {
                tick,
                data,
                ahead: true,
            },
        );
        wasted += g.evict_to(self.limit);
        self.publish(&g);
        Some(wasted)
    }

    /// Bytes of chunks decoded ahead and not used by a read yet.
    pub fn ahead_bytes(&self) -> usize {
        self.ahead_bytes.load(Ordering::Relaxed)
    }

    /// Publishes `g.ahead_bytes` for [`Self::ahead_bytes`] (called before the lock goes).
    fn publish(&self, g: &Inner) {
        self.ahead_bytes.store(g.ahead_bytes, Ordering::Relaxed);
    }

    /// Bytes cached.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn d(i: u8) -> ChunkDigest {
        ChunkDigest::blake3([i; 32])
    }

    #[test]
    fn decoded_ahead_entries_stay_within_their_share_and_count_once_used() {
        let c = ChunkMemCache::new(1000);
        assert_eq!(c.insert_ahead(d(1), Arc::new(vec![1; 300]), 500), Some(0));
        // Over the share: refused, nothing evicted for it.
        assert_eq!(c.insert_ahead(d(2), Arc::new(vec![2; 300]), 500), None);
        assert_eq!(c.ahead_bytes(), 300);
        // A read uses it: no longer counted as ahead, and kept.
        let (data, was_ahead) = c.get(&d(1), 300, false).expect("cached");
        assert!(was_ahead && data.len() == 300);
        assert_eq!(c.ahead_bytes(), 0);
        assert!(!c.get(&d(1), 300, true).expect("still cached").1);
        assert!(c.contains(&d(1), 300));
        // Consumed: gone; a wrong size never matches.
        assert_eq!(c.insert_ahead(d(3), Arc::new(vec![3; 400]), 500), Some(0));
        assert!(c.get(&d(3), 399, true).is_none());
        assert_eq!(c.get(&d(3), 400, true).map(|(_, a)| a), Some(true));
        assert!(!c.contains(&d(3), 400));
        assert_eq!((c.ahead_bytes(), c.bytes()), (0, 300));
        // Evicted unused: counted as wasted; the bytes stay within the limit.
        for i in 10..20 {
            assert_eq!(c.insert(d(i), Arc::new(vec![i; 200])), 0);
            assert!(c.bytes() <= 1000);
        }
        assert_eq!(c.insert_ahead(d(30), Arc::new(vec![0; 400]), 500), Some(0));
        // A chunk decoded ahead for a reader still coming goes last: the served ones make room.
        let wasted: u64 = (20..30)
            .map(|i| c.insert(d(i), Arc::new(vec![i; 200])))
            .sum();
        assert_eq!(wasted, 0);
        assert!(c.contains(&d(30), 400) && c.ahead_bytes() == 400);
        // Once no read took it for long (the reader went elsewhere), it goes first, counted
        // as wasted.
        for _ in 0..AHEAD_STALE_TICKS {
            assert!(c.get(&d(99), 1, false).is_none());
        }
        assert_eq!(c.insert(d(40), Arc::new(vec![40; 200])), 1);
        assert!(!c.contains(&d(30), 400));
        assert_eq!(c.ahead_bytes(), 0);
        assert!(c.bytes() <= 1000);
    }
}
