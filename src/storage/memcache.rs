//! A small in-memory cache of decompressed chunks, so that the many small reads the kernel
//! makes inside one chunk decompress and verify it once.

use std::collections::HashMap;
use std::sync::Mutex;

use super::ChunkData;
use crate::format::ChunkDigest;
use crate::util::sync::lock;

/// Least-recently-used cache of verified chunks keyed by digest, bounded in bytes.
pub struct ChunkMemCache {
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    bytes: usize,
    map: HashMap<ChunkDigest, (u64, ChunkData)>,
}

impl ChunkMemCache {
    /// A cache that holds at most `limit` bytes of chunk data.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The chunk with `digest` and `len` bytes, if cached.
    ///
    /// The length is part of what a chunk record says: a record giving a cached chunk's digest
    /// with another size names no chunk that exists (a crafted bootstrap can), and serving the
    /// cached bytes for it would serve bytes under a digest and size they do not have. Such a
    /// lookup misses, and the fetch that follows fails verification.
    pub fn get(&self, digest: &ChunkDigest, len: usize) -> Option<ChunkData> {
        let mut g = lock(&self.inner);
        g.tick += 1;
        let tick = g.tick;
        let e = g.map.get_mut(digest)?;
        if e.1.len() != len {
            return None;
        }
        e.0 = tick;
        Some(e.1.clone())
    }

    /// Caches `data` under `digest`, evicting the least recently used chunks beyond the limit.
    pub fn insert(&self, digest: ChunkDigest, data: ChunkData) {
        if data.len() > self.limit {
            return;
        }
        let mut g = lock(&self.inner);
        g.tick += 1;
        let tick = g.tick;
        let len = data.len();
        if let Some(old) = g.map.insert(digest, (tick, data)) {
            g.bytes -= old.1.len();
        }
        g.bytes += len;
        // The map holds a handful of entries (limit / chunk size), so a scan is cheap.
        while g.bytes > self.limit {
            let Some((&victim, _)) = g.map.iter().min_by_key(|(_, (t, _))| *t) else {
                break;
            };
            if let Some((_, d)) = g.map.remove(&victim) {
                g.bytes -= d.len();
            }
        }
    }
}
