//! Reading Nydus RAFS v6 bootstraps, as nydus-image and nydusify 2.2 write them.
//!
//! A v6 bootstrap is an EROFS image with Nydus's extensions: a superblock at 1024, an extended
//! superblock, device slots and a blob table, inodes addressed by nid, directories of dirent
//! blocks, chunk-based files whose chunk addresses name entries of a chunk table at the end.
//! This module checks all of it as untrusted input and *transcodes* it into Skiff's own tables,
//! so that the rest of Skiff (filesystem, storage, cache, check) serves one image model and
//! never asks which format it came from. The transcoded bootstrap then goes through Skiff's
//! validator like any other (defence in depth).
//!
//! `docs/format.md` ("Reading Nydus RAFS v6") says what is supported, refused, and not
//! preserved.

mod chunks;
mod inode;
pub mod layout;
mod superblock;
mod transcode;

#[cfg(test)]
mod tests;

pub use transcode::Defaults;

use layout::{EROFS_MAGIC, SUPER_OFFSET};

/// Why a v6 bootstrap was refused.
#[derive(Debug, thiserror::Error)]
pub enum V6Error {
    /// The file size is not a positive multiple of 4096.
    #[error("bootstrap of {0} bytes is not a whole number of 4096-byte blocks")]
    Unaligned(u64),
    /// A superblock field is invalid.
    #[error("superblock: {0}")]
    Superblock(String),
    /// A feature this reader does not support.
    #[error("unsupported feature: {0}")]
    Unsupported(String),
    /// A blob table entry is invalid.
    #[error("blob {index}: {what}")]
    Blob {
        /// Position in the blob table.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// The bootstrap was cut out of a blob built with `--blob-inline-meta` and never merged.
    #[error(
        "blob {index} has the placeholder id \"xxx…x\": this bootstrap was taken from a blob \
         built with --blob-inline-meta and not merged; run `nydus-image merge` on it (as \
         nydus-snapshotter's converter does, with --blob-digests) or build with --blob-dir"
    )]
    PlaceholderBlobId {
        /// Position in the blob table.
        index: usize,
    },
    /// A chunk table entry is invalid.
    #[error("chunk table entry {index}: {what}")]
    ChunkTable {
        /// Position in the chunk table.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// An inode is invalid.
    #[error("inode nid {nid} {path:?}: {what}")]
    Inode {
        /// Its nid.
        nid: u64,
        /// Its path, where known.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The prefetch table is invalid.
    #[error("prefetch table: {0}")]
    Prefetch(String),
    /// The transcoded tables could not be written.
    #[error("transcoding")]
    Transcode(#[source] Box<super::FormatError>),
}

/// Whether `data` has the EROFS magic where a RAFS v6 bootstrap has it.
pub fn is_v6(data: &[u8]) -> bool {
    data.get(SUPER_OFFSET..SUPER_OFFSET + 4)
        .is_some_and(|m| m == EROFS_MAGIC.to_le_bytes())
}

/// Checks the v6 bootstrap `data` and returns the same image as a Skiff bootstrap's bytes
/// (not yet validated by the Skiff loader: [`super::Bootstrap::from_bytes`] does that), and
/// which source attributes it holds.
pub fn transcode(data: &[u8], defaults: Defaults) -> Result<(Vec<u8>, super::Preserved), V6Error> {
    let meta = superblock::parse(data)?;
    let chunks = chunks::ChunkTable::parse(data, &meta)?;
    let writer = transcode::walk(data, &meta, &chunks, defaults)?;
    tracing::debug!(
        inodes = writer.inodes.len(),
        chunks = chunks.len(),
        blobs = meta.blobs.len(),
        "RAFS v6 bootstrap transcoded"
    );
    let preserved = super::Preserved {
        directory_sizes: false,
        root_mtime: false,
        owners: meta.explicit_uid_gid(),
    };
    let bytes = writer
        .finish(meta.chunk_size)
        .map_err(|e| V6Error::Transcode(Box::new(e)))?;
    Ok((bytes, preserved))
}
