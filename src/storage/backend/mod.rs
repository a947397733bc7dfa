//! Blob backends: read a byte range of a blob, wherever it lives.

pub mod localfs;

use crate::format::DIGEST_LEN;

/// Reads byte ranges of blobs. Implementations return exactly the bytes stored, unverified;
/// verification is the caller's job.
pub trait BlobBackend: Send + Sync {
    /// Reads `len` bytes of blob `id` from `offset`.
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, BackendError>;

    /// A short name for logs and metrics ("localfs", "registry", ...).
    fn name(&self) -> &'static str;
}

/// Why a backend read failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A local I/O error.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The blob is shorter than the range asked for.
    #[error("blob {path} ends before offset {end}")]
    ShortBlob {
        /// The file.
        path: String,
        /// End of the requested range.
        end: u64,
    },
}
