//! Where chunk bytes come from: blob backends, verification, and the in-memory chunk cache.
//!
//! A [`BlobBackend`] reads byte ranges of blobs (local files, a registry, S3).
//! [`CachedChunkSource`] turns those bytes into decompressed chunks whose blake3 digest has
//! been checked, which is the only form the filesystem layer ever sees, through [`ChunkSource`];
//! it keeps them in memory and, for remote backends, in the shared disk cache.

pub mod ahead;
pub mod backend;
pub mod cache;
mod cached;
pub mod config;
mod deadline;
mod memcache;
pub mod metrics;
pub mod prefetch;
mod verify;

use std::sync::Arc;

pub use backend::localfs::LocalFsBackend;
pub use backend::retry::{RetryPolicy, RetryingBackend};
pub use backend::s3::{S3Backend, S3Config};
pub use backend::{BackendError, BlobBackend};
pub use cache::{ChunkDiskCache, DEFAULT_CACHE_DIR};
pub use cached::{CachedChunkSource, MAX_MERGED_BYTES, TAKEOVER_AFTER};
pub use deadline::{Deadline, Priority, DEFAULT_REQUEST_TIMEOUT};
pub use memcache::ChunkMemCache;
pub use metrics::{Metrics, MetricsSnapshot};
pub use verify::{decode_chunk, VerifyError};

use crate::format::{BlobRecord, ChunkRecord};

/// Decompressed bytes of one chunk, shared between readers.
pub type ChunkData = Arc<Vec<u8>>;

/// Chunks the memory cache holds by default.
pub const DEFAULT_MEMORY_CACHE_CHUNKS: usize = 4;

/// The default size of the memory cache for an image of `chunk_size` chunks: room for
/// [`DEFAULT_MEMORY_CACHE_CHUNKS`] (4 MiB at the default 1 MiB chunk size).
///
/// It only has to hold the chunks being read piecewise: the kernel asks for a big file in
/// reads of 128 KiB, and each chunk should be decompressed and verified once, not once per
/// read. Data already served is cached by the kernel's page cache (and remote chunks by the
/// disk cache), so a larger cache mostly holds copies; reads that take a whole chunk at once
/// (small files) skip it (see [`ChunkSource::read_chunk_once`]).
pub fn default_memory_cache(chunk_size: u32) -> usize {
    DEFAULT_MEMORY_CACHE_CHUNKS.saturating_mul(chunk_size as usize)
}

/// Gives verified, decompressed chunks. Implementations never return bytes whose digest has not
/// been checked against the chunk record.
///
/// Every read takes a [`Deadline`]: the source gives up (an error, never a hang) when it
/// passes, and treats background reads as background work.
pub trait ChunkSource: Send + Sync {
    /// Returns the verified bytes of `chunk`, stored in `blob`.
    fn read_chunk(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError>;

    /// Like [`Self::read_chunk`], for a caller that uses the whole chunk now and will not ask
    /// for it again soon (a read covering a small file: the kernel's page cache keeps what it
    /// served). Caching sources may skip their memory cache, so that a walk over thousands of
    /// small files does not fill it and push out the big chunks read piecewise.
    fn read_chunk_once(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        self.read_chunk(blob, chunk, deadline)
    }

    /// Returns the verified bytes of several chunks of `blob` (a read spanning chunks).
    /// Sources with a remote backend fetch adjacent missing chunks with one request.
    fn read_chunks(
        &self,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
        deadline: &Deadline,
    ) -> Vec<Result<ChunkData, StorageError>> {
        chunks
            .iter()
            .map(|c| self.read_chunk(blob, c, deadline))
            .collect()
    }

    /// Chunks of `blob` likely to be read soon (the rest of a file being read). A source with a
    /// remote backend may fetch the missing ones in the background, so that those reads find
    /// them cached instead of waiting for a round trip each; returns at once. Sources reading
    /// local files ignore it.
    fn fetch_ahead(&self, _blob: &BlobRecord, _chunks: &[ChunkRecord]) {}

    /// Whether [`Self::fetch_ahead`] does anything, so that callers can skip choosing chunks
    /// for it on every read.
    fn fetches_ahead(&self) -> bool {
        false
    }

    /// Whether the source decodes the chunks that follow a read ahead of need by itself
    /// (see [`ahead`]), so that callers need not read ahead for it.
    fn decodes_ahead(&self) -> bool {
        false
    }

    /// Whether a read of `chunk` would be answered from memory now, without waiting on a disk
    /// or the network (a hint: the chunk may be gone by the time it is read).
    fn is_ready(&self, _chunk: &ChunkRecord) -> bool {
        false
    }
}

impl<T: ChunkSource + ?Sized> ChunkSource for Arc<T> {
    fn read_chunk(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        (**self).read_chunk(blob, chunk, deadline)
    }

    fn read_chunk_once(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        (**self).read_chunk_once(blob, chunk, deadline)
    }

    fn read_chunks(
        &self,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
        deadline: &Deadline,
    ) -> Vec<Result<ChunkData, StorageError>> {
        (**self).read_chunks(blob, chunks, deadline)
    }

    fn fetch_ahead(&self, blob: &BlobRecord, chunks: &[ChunkRecord]) {
        (**self).fetch_ahead(blob, chunks)
    }

    fn fetches_ahead(&self) -> bool {
        (**self).fetches_ahead()
    }

    fn decodes_ahead(&self) -> bool {
        (**self).decodes_ahead()
    }

    fn is_ready(&self, chunk: &ChunkRecord) -> bool {
        (**self).is_ready(chunk)
    }
}

/// Why a chunk could not be served.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend could not deliver the stored bytes.
    #[error("blob {blob}: reading chunk {chunk} at offset {offset}")]
    Backend {
        /// Blob id (hex).
        blob: String,
        /// Chunk digest (hex).
        chunk: String,
        /// Offset of the chunk in the blob.
        offset: u64,
        /// The cause.
        #[source]
        source: BackendError,
    },
    /// The read's deadline passed while it waited for another reader's fetch of the chunk.
    #[error("blob {blob}: chunk {chunk} at offset {offset}: the request deadline passed while waiting for {waiting}")]
    DeadlineExceeded {
        /// Blob id (hex).
        blob: String,
        /// Chunk digest (hex).
        chunk: String,
        /// Offset of the chunk in the blob.
        offset: u64,
        /// Whose fetch it waited for.
        waiting: &'static str,
    },
    /// The bytes were delivered but failed verification, even after fetching them again.
    #[error("blob {blob}: chunk {chunk} at offset {offset} failed verification")]
    Corrupt {
        /// Blob id (hex).
        blob: String,
        /// Chunk digest (hex).
        chunk: String,
        /// Offset of the chunk in the blob.
        offset: u64,
        /// What was wrong.
        #[source]
        source: VerifyError,
    },
}
