//! The RAFS on-disk formats: Skiff's bootstrap records, loading with validation, and writing;
//! and Nydus RAFS v6 bootstraps, read by transcoding them into the same model.
//!
//! `docs/format.md` is the specification; this module is its only implementation.

mod bootstrap;
mod layout;
pub mod sealed;
mod tables;
pub mod v6;
mod writer;

#[cfg(test)]
mod tests;

pub use bootstrap::{Bootstrap, ShareKey, SharedError, MAX_BOOTSTRAP_SIZE, SHARE_HEADER_LEN};
pub use layout::*;
pub use tables::Tables;
pub use writer::BootstrapWriter;

/// The on-disk format a [`Bootstrap`] was loaded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SourceFormat {
    /// Skiff's own format (`docs/format.md`).
    Skiff,
    /// A Nydus RAFS v6 bootstrap, transcoded at load.
    NydusRafsV6,
}

impl SourceFormat {
    /// Its name in messages and `skiff inspect`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Skiff => "skiff",
            Self::NydusRafsV6 => "nydus-rafs-v6",
        }
    }
}

/// Which attributes of the source an image holds, so that a comparison with the source
/// (`skiff check --source`) compares those and no others. Skiff's format holds everything;
/// a Nydus v6 image lacks a few (docs/format.md, "Reading Nydus RAFS v6").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Preserved {
    /// Directories' `st_size` (EROFS directories have the size of their dirent blocks).
    pub directory_sizes: bool,
    /// The root directory's mtime (nydus-image stores 0 there).
    pub root_mtime: bool,
    /// Owners (v6 images built with `--repeatable` carry none).
    pub owners: bool,
}

impl Preserved {
    /// Everything.
    pub const ALL: Self = Self {
        directory_sizes: true,
        root_mtime: true,
        owners: true,
    };
}

/// Why a bootstrap was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be read.
    #[error("reading bootstrap {path}")]
    Io {
        /// The bootstrap's path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any bootstrap this code loads.
    #[error("bootstrap of {0} bytes is larger than the {MAX_BOOTSTRAP_SIZE}-byte limit")]
    TooLarge(u64),
    /// The file is shorter than a superblock.
    #[error("bootstrap truncated: {len} bytes is shorter than the superblock")]
    Truncated {
        /// Length of the file.
        len: u64,
    },
    /// The file has none of the magics this code reads.
    #[error(
        "not a bootstrap: neither a Skiff magic at offset 0 nor a Nydus RAFS v6 (EROFS) magic at \
         offset 1024"
    )]
    BadMagic,
    /// A Nydus RAFS v5 bootstrap.
    #[error(
        "a Nydus RAFS v5 bootstrap (magic 0x52414653): Skiff reads RAFS v6 only; rebuild the image \
         with `nydus-image create --fs-version 6` or `nydusify convert --fs-version 6` (the \
         default since nydus 2.0)"
    )]
    RafsV5,
    /// A Nydus RAFS v6 bootstrap that is invalid or uses something unsupported.
    #[error("Nydus RAFS v6 bootstrap refused")]
    V6(#[source] v6::V6Error),
    /// The version is not one this code reads.
    #[error("unsupported bootstrap version {0}")]
    UnsupportedVersion(u32),
    /// The digest over the whole file does not match: the file is damaged.
    #[error("bootstrap damaged: file digest mismatch (truncated or modified)")]
    FileDigestMismatch,
    /// The chunk size is not a power of two in range.
    #[error("invalid chunk size {0}")]
    BadChunkSize(u32),
    /// A table lies outside the file.
    #[error(
        "table {table} (offset {offset}, {count} records) lies outside the {file_len}-byte file"
    )]
    TableOutOfBounds {
        /// Table name.
        table: &'static str,
        /// Declared offset.
        offset: u64,
        /// Declared record count.
        count: u64,
        /// File length.
        file_len: u64,
    },
    /// An inode record is invalid.
    #[error("inode {index}: {what}")]
    BadInode {
        /// Inode index.
        index: u64,
        /// What is wrong.
        what: String,
    },
    /// An inode's stored Merkle digest does not match its content.
    #[error("inode {index}: Merkle digest mismatch")]
    DigestMismatch {
        /// Inode index.
        index: u64,
    },
    /// Any other structural problem.
    #[error("invalid bootstrap: {0}")]
    Invalid(String),
}
