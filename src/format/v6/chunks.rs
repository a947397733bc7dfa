//! The bootstrap's chunk table: one 80-byte record per distinct chunk (digest, blob, stored
//! range, sizes), looked up the way nydusd looks it up, by (blob, CI index, block address).

use std::collections::HashMap;

use zerocopy::little_endian::{U32, U64};
use zerocopy::FromZeros;

use super::layout::{ChunkInfo, BLOCK_SIZE, CHUNK_COMPRESSED};
use super::superblock::{records, Meta};
use super::V6Error;
use crate::format::{
    ChunkRecord, Compression, DigestAlgo, CHUNK_FLAG_LZ4, CHUNK_FLAG_SHA256, CHUNK_FLAG_ZSTD,
};

/// What a chunk address names: blob index, CI index, uncompressed block address.
pub type ChunkKey = (u32, u32, u32);

/// The chunk table, as Skiff chunk records by [`ChunkKey`].
pub struct ChunkTable {
    by_key: HashMap<ChunkKey, ChunkRecord>,
}

/// The largest stored size a chunk of `usize` bytes can have under `c`.
fn max_stored(c: Compression, usize_: usize) -> usize {
    match c {
        Compression::Lz4Block => lz4_flex::block::get_maximum_output_size(usize_),
        Compression::Zstd => zstd::zstd_safe::compress_bound(usize_),
        Compression::None => usize_,
    }
}

impl ChunkTable {
    /// Reads and checks every entry of the chunk table of `data`.
    pub fn parse(data: &[u8], meta: &Meta) -> Result<Self, V6Error> {
        let r = &meta.chunk_table;
        let n = (r.end - r.start) / size_of::<ChunkInfo>();
        let entries: &[ChunkInfo] = records(data, r.start as u64, n as u64)
            .ok_or_else(|| V6Error::Superblock("chunk table beyond the file".into()))?;
        let mut by_key = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let bad = |what: String| V6Error::ChunkTable { index: i, what };
            let blob_index = e.blob_index.get();
            let blob = meta
                .blobs
                .get(blob_index as usize)
                .ok_or_else(|| bad(format!("blob index {blob_index} beyond the blob table")))?;
            let flags = e.flags.get();
            if flags & !CHUNK_COMPRESSED != 0 {
                return Err(V6Error::Unsupported(format!(
                    "chunk table entry {i}: chunk flags {flags:#x} (only COMPRESSED is known)"
                )));
            }
            let usize_ = e.uncompressed_size.get();
            if usize_ == 0 || usize_ > meta.chunk_size {
                return Err(bad(format!("uncompressed size {usize_}")));
            }
            let uoff = e.uncompressed_offset.get();
            if !uoff.is_multiple_of(BLOCK_SIZE)
                || uoff
                    .checked_add(u64::from(usize_))
                    .is_none_or(|end| end > blob.uncompressed_size)
                || uoff / BLOCK_SIZE > u64::from(u32::MAX)
            {
                return Err(bad(format!(
                    "uncompressed offset {uoff:#x} outside blob {blob_index}'s {} bytes or unaligned",
                    blob.uncompressed_size
                )));
            }
            let index = e.index.get();
            if index >= blob.chunk_count {
                return Err(bad(format!(
                    "CI index {index} beyond blob {blob_index}'s {} chunks",
                    blob.chunk_count
                )));
            }
            let compression = if flags & CHUNK_COMPRESSED != 0 {
                if blob.compression == Compression::None {
                    return Err(bad("compressed chunk in an uncompressed blob".into()));
                }
                blob.compression
            } else {
                Compression::None
            };
            let csize = e.compressed_size.get();
            if csize == 0 || csize as usize > max_stored(compression, usize_ as usize) {
                return Err(bad(format!(
                    "stored size {csize} impossible for {usize_} bytes ({compression:?})"
                )));
            }
            if compression == Compression::None && csize != usize_ {
                return Err(bad(format!(
                    "uncompressed chunk stored in {csize} bytes, not {usize_}"
                )));
            }
            let coff = e.compressed_offset.get();
            if coff
                .checked_add(u64::from(csize))
                .is_none_or(|end| end > blob.compressed_size)
            {
                return Err(bad(format!(
                    "stored range at {coff:#x} ends beyond blob {blob_index}'s {} bytes",
                    blob.compressed_size
                )));
            }
            let mut c = ChunkRecord::new_zeroed();
            c.digest = e.block_id;
            c.blob_index = U32::new(blob_index);
            let mut f = match compression {
                Compression::Lz4Block => CHUNK_FLAG_LZ4,
                Compression::Zstd => CHUNK_FLAG_ZSTD,
                Compression::None => 0,
            };
            if blob.digest == DigestAlgo::Sha256 {
                f |= CHUNK_FLAG_SHA256;
            }
            c.flags = U32::new(f);
            c.compressed_offset = U64::new(coff);
            c.compressed_size = U32::new(csize);
            c.uncompressed_size = U32::new(usize_);
            let key = (blob_index, index, (uoff / BLOCK_SIZE) as u32);
            if let Some(old) = by_key.insert(key, c) {
                if zerocopy::IntoBytes::as_bytes(&old) != zerocopy::IntoBytes::as_bytes(&c) {
                    return Err(bad(format!(
                        "a second, different chunk for blob {blob_index}, CI index {index}"
                    )));
                }
            }
        }
        Ok(Self { by_key })
    }

    /// The chunk named by `key`.
    pub fn get(&self, key: &ChunkKey) -> Option<&ChunkRecord> {
        self.by_key.get(key)
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}
