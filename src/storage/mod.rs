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
