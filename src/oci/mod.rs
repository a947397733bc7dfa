//! Images in OCI registries: references, authentication, a registry client, a blob backend
//! that reads Skiff blobs from a registry by range, and `skiff convert`.
//!
//! The converter writes what `format` reads and pushes it as an OCI image whose conventions
//! are described in docs/format.md ("Images in OCI registries").

pub mod auth;
pub mod convert;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod registry_backend;
pub mod source;

pub use convert::{convert, ConvertOptions, ConvertReport, ConvertSummary, ImageLayout};
pub use reference::Reference;
pub use registry::{RegistryClient, RegistryOptions};
pub use registry_backend::{open_image, RegistryBackend, RemoteImage};
pub use source::Platforms;

/// Why an OCI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// An image reference does not parse.
    #[error("image reference {reference:?}: {why}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// Credentials are malformed or unreadable.
    #[error("registry credentials: {0}")]
    Credentials(String),
    /// Authentication with the registry failed.
    #[error("registry authentication: {0}")]
    Auth(String),
    /// A request could not be sent or its answer not read.
    #[error("{what}")]
    Http {
        /// The request.
        what: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("{what}: HTTP {status}{detail}")]
    Status {
        /// The request.
        what: String,
        /// The status.
        status: u16,
        /// The start of the error body, if any.
        detail: String,
    },
    /// The caller's deadline passed before the request could be sent.
    #[error("{0}: the request deadline passed")]
    DeadlinePassed(String),
    /// The registry (or a layout/archive) sent something that breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// Downloaded bytes do not have the digest they were asked for by.
    #[error("{what}: digest {got}, expected {want}")]
    Digest {
        /// What was downloaded.
        what: String,
        /// Its digest.
        got: String,
        /// The expected digest.
        want: String,
    },
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
    /// Building the RAFS image failed.
    #[error("building the image")]
    Build(#[from] crate::build::BuildError),
    /// The bootstrap fetched does not load.
    #[error("the image's bootstrap")]
    Format(#[from] crate::format::FormatError),
}

impl OciError {
    /// An I/O error while doing `op` on `path`.
    pub fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}
