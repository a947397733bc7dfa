//! `skiff inspect`'s statistics of an image.

use std::collections::{BTreeMap, BTreeSet};

use super::compare::kind_name;
use crate::format::{digest_hex, Bootstrap, InodeKind};

/// Summary statistics of an image, for `skiff inspect`.
#[derive(Debug, serde::Serialize)]
pub struct ImageStats {
    /// The on-disk format the bootstrap was read from ("skiff", "nydus-rafs-v6").
    pub format: &'static str,
    /// Root Merkle digest.
    pub root_digest: String,
    /// Chunk size.
    pub chunk_size: u32,
    /// Bootstrap size.
    pub bootstrap_bytes: usize,
    /// Inodes by kind.
    pub inodes: BTreeMap<&'static str, u64>,
    /// Directory entries.
    pub entries: u64,
    /// Total file content bytes.
    pub content_bytes: u64,
    /// Chunk references.
    pub chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// Zero chunks.
    pub zero_chunks: u64,
    /// Blobs, with their sizes.
    pub blobs: Vec<(String, u64)>,
    /// Inodes in the prefetch list.
    pub prefetch: u64,
}

/// Computes [`ImageStats`] of `b`.
pub fn image_stats(b: &Bootstrap) -> ImageStats {
    let t = b.tables();
    let mut inodes = BTreeMap::new();
    let mut content_bytes = 0;
    for r in t.inodes {
        *inodes.entry(kind_name(r.mode.get())).or_insert(0) += 1;
        if r.kind() == Some(InodeKind::Regular) {
            content_bytes += r.size.get();
        }
    }
    let unique: BTreeSet<crate::format::ChunkDigest> = t
        .chunks
        .iter()
        .filter(|c| !c.is_zero())
        .map(|c| c.chunk_digest())
        .collect();
    ImageStats {
        format: b.source_format().name(),
        root_digest: digest_hex(b.root_digest()),
        chunk_size: b.chunk_size(),
        bootstrap_bytes: b.byte_len(),
        inodes,
        entries: t.dirents.len() as u64,
        content_bytes,
        chunks: t.chunks.len() as u64,
        unique_chunks: unique.len() as u64,
        zero_chunks: t.chunks.iter().filter(|c| c.is_zero()).count() as u64,
        blobs: t
            .blobs
            .iter()
            .map(|r| (digest_hex(&r.id), r.size.get()))
            .collect(),
        prefetch: t.prefetch.len() as u64,
    }
}
