//! Where chunk bytes come from: blob backends, verification, and the in-memory chunk cache.
//!
//! A [`BlobBackend`] reads byte ranges of blobs (local files today; a registry or S3 later).
//! [`VerifiedChunkSource`] turns those bytes into decompressed chunks whose blake3 digest has
//! been checked, which is the only form the filesystem layer ever sees, through [`ChunkSource`].

pub mod backend;
pub mod cache;
mod cached;
pub mod config;
mod memcache;
pub mod metrics;
pub mod prefetch;
mod source;
mod verify;

use std::sync::Arc;

pub use backend::localfs::LocalFsBackend;
pub use backend::retry::{RetryPolicy, RetryingBackend};
pub use backend::s3::{S3Backend, S3Config};
pub use backend::{BackendError, BlobBackend};
pub use cache::{ChunkDiskCache, DEFAULT_CACHE_DIR};
pub use cached::{CachedChunkSource, MAX_MERGED_BYTES};
pub use memcache::ChunkMemCache;
pub use metrics::{Metrics, MetricsSnapshot};
pub use source::VerifiedChunkSource;
pub use verify::{decode_chunk, VerifyError};

use crate::format::{BlobRecord, ChunkRecord};

/// Decompressed bytes of one chunk, shared between readers.
pub type ChunkData = Arc<Vec<u8>>;

/// Gives verified, decompressed chunks. Implementations never return bytes whose digest has not
/// been checked against the chunk record.
pub trait ChunkSource: Send + Sync {
    /// Returns the verified bytes of `chunk`, stored in `blob`.
    fn read_chunk(&self, blob: &BlobRecord, chunk: &ChunkRecord)
        -> Result<ChunkData, StorageError>;

    /// Returns the verified bytes of several chunks of `blob` (a read spanning chunks).
    /// Sources with a remote backend fetch adjacent missing chunks with one request.
    fn read_chunks(
        &self,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
    ) -> Vec<Result<ChunkData, StorageError>> {
        chunks.iter().map(|c| self.read_chunk(blob, c)).collect()
    }

    /// Chunks of `blob` likely to be read soon (the rest of a file being read). A source with a
    /// remote backend may fetch the missing ones in the background, so that those reads find
    /// them cached instead of waiting for a round trip each; returns at once. Sources reading
    /// local files ignore it.
    fn fetch_ahead(&self, _blob: &BlobRecord, _chunks: &[ChunkRecord]) {}
}

impl<T: ChunkSource + ?Sized> ChunkSource for Arc<T> {
    fn read_chunk(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
    ) -> Result<ChunkData, StorageError> {
        (**self).read_chunk(blob, chunk)
    }

    fn read_chunks(
        &self,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
    ) -> Vec<Result<ChunkData, StorageError>> {
        (**self).read_chunks(blob, chunks)
    }

    fn fetch_ahead(&self, blob: &BlobRecord, chunks: &[ChunkRecord]) {
        (**self).fetch_ahead(blob, chunks)
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
