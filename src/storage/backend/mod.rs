//! Blob backends: read a byte range of a blob, wherever it lives.

pub mod fault;
pub mod localfs;
pub mod retry;
pub mod s3;

use crate::format::DIGEST_LEN;
use crate::storage::Deadline;

/// Reads byte ranges of blobs. Implementations return exactly the bytes stored, unverified;
/// verification is the caller's job.
pub trait BlobBackend: Send + Sync {
    /// Reads `len` bytes of blob `id` from `offset`. A remote backend caps its request's
    /// timeout by what is left of `deadline`; retries are [`retry::RetryingBackend`]'s.
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError>;

    /// Like [`Self::read_range`], handing the bytes to `sink` in order as they arrive, in
    /// pieces of any size, so that a caller can use the first ones (verify and serve a chunk)
    /// before the last have come. Exactly `len` bytes in all on success; on an error the bytes
    /// handed over stay handed over, and the caller decides about the rest. The default reads
    /// the whole range, then hands it over.
    fn read_range_streaming(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), BackendError> {
        let bytes = self.read_range(id, offset, len, deadline)?;
        sink(&bytes);
        Ok(())
    }

    /// A short name for logs and metrics ("localfs", "registry", ...).
    fn name(&self) -> &'static str;

    /// Whether reading costs no network traffic (a local directory): such a backend may be
    /// read ahead of need (decode-ahead), where a remote one is only read for what is asked.
    fn is_local(&self) -> bool {
        false
    }
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
    /// A remote server answered with an unexpected HTTP status.
    #[error("{what}: HTTP status {status}")]
    Http {
        /// The request (backend, blob, range).
        what: String,
        /// The status code.
        status: u16,
    },
    /// A remote request failed in transport: connection, reset, timeout, body. Retried.
    #[error("{what}")]
    Network {
        /// The request (backend, blob, range).
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A remote reply had a different length than the range asked for.
    #[error("{what}: got {got} bytes, asked for {want}")]
    ShortRead {
        /// The request (backend, blob, range).
        what: String,
        /// Bytes received.
        got: u64,
        /// Bytes asked for.
        want: u64,
    },
    /// A remote reply broke the protocol (a wrong `Content-Range`, say): retried, since a
    /// proxy or a flaky server may answer right the next time.
    #[error("{0}")]
    BadReply(String),
    /// Authentication failed: credentials refused after one refresh, or no token could be
    /// had. Final.
    #[error("{0}")]
    Auth(String),
    /// The read's deadline passed (or left no time for another attempt). Final.
    #[error("{what}: the request deadline passed while {waiting}")]
    DeadlineExceeded {
        /// The request (backend, blob, range).
        what: String,
        /// What it was doing when time ran out.
        waiting: &'static str,
    },
    /// A backend that cannot be used as configured. Final.
    #[error("{0}")]
    Config(String),
    /// A fault injected by a test backend.
    #[error("injected fault: {0}")]
    Injected(&'static str),
}

impl BackendError {
    /// Whether trying the same request again may succeed.
    ///
    /// Retried: transport failures (resets, timeouts), short or malformed replies, server
    /// errors (5xx), throttling (429) and request timeouts (408). Final: any other 4xx (400
    /// bad request, 401 after the one token refresh the client makes, 403 denied, 404
    /// missing), failed authentication, a passed deadline, missing blobs and bad
    /// configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            BackendError::ShortBlob { .. }
            | BackendError::Config(_)
            | BackendError::Auth(_)
            | BackendError::DeadlineExceeded { .. } => false,
            BackendError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            BackendError::Network { .. }
            | BackendError::ShortRead { .. }
            | BackendError::BadReply(_)
            | BackendError::Injected(_) => true,
        }
    }

    /// Classifies a failed HTTP request: a request that could not even be built, or a redirect
    /// loop, is a configuration error (final); anything else happened on the way (connect,
    /// reset, timeout, body) and is retried.
    pub fn from_reqwest(what: String, e: reqwest::Error) -> Self {
        if e.is_builder() || e.is_redirect() {
            BackendError::Config(format!("{what}: {e}"))
        } else {
            BackendError::Network {
                what,
                source: Box::new(e),
            }
        }
    }
}

impl<T: BlobBackend + ?Sized> BlobBackend for Box<T> {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        (**self).read_range(id, offset, len, deadline)
    }

    fn read_range_streaming(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), BackendError> {
        (**self).read_range_streaming(id, offset, len, deadline, sink)
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn is_local(&self) -> bool {
        (**self).is_local()
    }
}

impl<T: BlobBackend + ?Sized> BlobBackend for std::sync::Arc<T> {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        (**self).read_range(id, offset, len, deadline)
    }

    fn read_range_streaming(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), BackendError> {
        (**self).read_range_streaming(id, offset, len, deadline, sink)
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn is_local(&self) -> bool {
        (**self).is_local()
    }
}
