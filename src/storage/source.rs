//! The verified chunk source: backend bytes in, checked chunks out.

use std::sync::Arc;

use super::{decode_chunk, BlobBackend, ChunkData, ChunkMemCache, ChunkSource, StorageError};
use crate::format::{digest_hex, BlobRecord, ChunkRecord};

/// How many times stored bytes that fail verification are fetched again before giving up.
const REFETCH_ATTEMPTS: usize = 2;

/// Reads chunks from a [`BlobBackend`], decompresses and verifies them, and keeps recently used
/// ones in memory.
pub struct VerifiedChunkSource<B> {
    backend: B,
    memcache: ChunkMemCache,
}

impl<B: BlobBackend> VerifiedChunkSource<B> {
    /// A source over `backend` with an in-memory cache of `memcache_bytes`.
    pub fn new(backend: B, memcache_bytes: usize) -> Self {
        Self {
            backend,
            memcache: ChunkMemCache::new(memcache_bytes),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<B: BlobBackend> ChunkSource for VerifiedChunkSource<B> {
    fn read_chunk(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
    ) -> Result<ChunkData, StorageError> {
        self.read(blob, chunk, true)
    }

    fn read_chunk_once(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
    ) -> Result<ChunkData, StorageError> {
        self.read(blob, chunk, false)
    }
}

impl<B: BlobBackend> VerifiedChunkSource<B> {
    /// Memory cache, else backend and verification; the result is cached if `keep`.
    fn read(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        keep: bool,
    ) -> Result<ChunkData, StorageError> {
        if let Some(d) = self.memcache.get(&chunk.digest) {
            return Ok(d);
        }
        let offset = chunk.compressed_offset.get();
        let len = chunk.compressed_size.get() as usize;
        let mut attempt = 0;
        loop {
            let stored = self
                .backend
                .read_range(&blob.id, offset, len)
                .map_err(|source| StorageError::Backend {
                    blob: digest_hex(&blob.id),
                    chunk: digest_hex(&chunk.digest),
                    offset,
                    source,
                })?;
            match decode_chunk(&stored, chunk) {
                Ok(data) => {
                    let data = Arc::new(data);
                    if keep {
                        self.memcache.insert(chunk.digest, data.clone());
                    }
                    return Ok(data);
                }
                Err(source) => {
                    attempt += 1;
                    tracing::warn!(
                        backend = self.backend.name(),
                        blob = %digest_hex(&blob.id),
                        chunk = %digest_hex(&chunk.digest),
                        offset,
                        attempt,
                        error = %source,
                        "chunk failed verification"
                    );
                    if attempt >= REFETCH_ATTEMPTS {
                        return Err(StorageError::Corrupt {
                            blob: digest_hex(&blob.id),
                            chunk: digest_hex(&chunk.digest),
                            offset,
                            source,
                        });
                    }
                }
            }
        }
    }
}
