//! The superblock, the extended superblock, the device slots, the blob table and the prefetch
//! table: everything at fixed places, read and checked before any inode.

use std::ops::Range;

use zerocopy::FromBytes;

use super::layout::*;
use super::V6Error;
use crate::format::{Compression, DigestAlgo, DIGEST_LEN};

/// Most chunks one blob may have (nydus's limit: CI indices are 24 bits).
const MAX_CHUNKS_PER_BLOB: u32 = 1 << 24;

/// One blob of the image, checked.
#[derive(Clone, Debug)]
pub struct BlobInfo {
    /// The sha256 of the blob file.
    pub id: [u8; DIGEST_LEN],
    /// Size of the blob file: every chunk lies inside.
    pub compressed_size: u64,
    /// Size of the blob's uncompressed address space.
    pub uncompressed_size: u64,
    /// Chunks in the blob.
    pub chunk_count: u32,
    /// How its compressed chunks are compressed.
    pub compression: Compression,
    /// How its chunk digests are computed.
    pub digest: DigestAlgo,
}

/// What the fixed part of a v6 bootstrap says.
#[derive(Debug)]
pub struct Meta {
    /// RafsSuperFlags.
    pub flags: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// Byte offset of inode slot 0.
    pub meta_base: u64,
    /// The root's nid.
    pub root_nid: u64,
    /// The blobs, in table order.
    pub blobs: Vec<BlobInfo>,
    /// The chunk table's bytes in the file.
    pub chunk_table: Range<usize>,
    /// The prefetch table's nids.
    pub prefetch: Vec<u64>,
    /// Byte ranges no inode may overlap: superblocks and device slots, blob, prefetch and
    /// chunk tables.
    pub fixed: Vec<Range<u64>>,
}

impl Meta {
    /// Whether inodes carry uid and gid.
    pub fn explicit_uid_gid(&self) -> bool {
        self.flags & sb_flags::EXPLICIT_UID_GID != 0
    }
}

/// `count` records of `T` at `offset`, or `None` when out of bounds.
pub fn records<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable + zerocopy::Unaligned>(
    data: &[u8],
    offset: u64,
    count: u64,
) -> Option<&[T]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(count).ok()?.checked_mul(size_of::<T>())?;
    let bytes = data.get(start..start.checked_add(len)?)?;
    <[T]>::ref_from_bytes(bytes).ok()
}

/// One record of `T` at `offset`, or `None` when out of bounds.
pub fn record<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable + zerocopy::Unaligned>(
    data: &[u8],
    offset: u64,
) -> Option<&T> {
    records::<T>(data, offset, 1).and_then(|r| r.first())
}

/// A byte range `[offset, offset + len)` inside a file of `file_len` bytes.
fn range_in(offset: u64, len: u64, file_len: u64) -> Option<Range<u64>> {
    let end = offset.checked_add(len)?;
    (end <= file_len).then_some(offset..end)
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Parses a 64-digit lowercase hex blob id into its 32 bytes.
fn parse_blob_id(raw: &[u8; 64], index: usize) -> Result<[u8; DIGEST_LEN], V6Error> {
    if raw.iter().all(|&b| b == b'x') {
        return Err(V6Error::PlaceholderBlobId { index });
    }
    let mut id = [0u8; DIGEST_LEN];
    let lower_hex = raw
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    if !lower_hex || hex::decode_to_slice(raw, &mut id).is_err() {
        return Err(V6Error::Blob {
            index,
            what: format!(
                "blob id {:?} is not 64 lowercase hex digits of a sha256 (custom --blob-id \
                 values are not supported: Skiff finds a blob by its digest)",
                String::from_utf8_lossy(raw.split(|&b| b == 0).next().unwrap_or(&[]))
            ),
        });
    }
    Ok(id)
}

/// Names the BlobFeatures bits this reader refuses, or `None` if all are supported.
fn refused_features(features: u32) -> Option<String> {
    use blob_features::*;
    let mut refused = Vec::new();
    if features & (ZRAN | CHUNK_INFO_V2 | SEPARATE) != 0 {
        refused.push(format!(
            "an OCI-ref blob (zran/targz-ref or another *-ref conversion: features {:#x}); \
             Skiff serves only blobs that hold their own chunks (convert with --type tar-rafs)",
            features & (ZRAN | CHUNK_INFO_V2 | SEPARATE)
        ));
    }
    if features & BATCH != 0 {
        refused.push("batch chunks (nydus 2.3 and later)".to_string());
    }
    if features & ENCRYPTED != 0 {
        refused.push("encrypted chunks (nydus 2.3 and later)".to_string());
    }
    if features & TARFS != 0 {
        refused.push("a tarfs blob (nydus 2.3 and later)".to_string());
    }
    if features & IS_CHUNKDICT_GENERATED != 0 {
        refused.push("a generated chunk dictionary (nydus 2.3 and later)".to_string());
    }
    let known = ALIGNED
        | INLINED_FS_META
        | CHUNK_INFO_V2
        | ZRAN
        | SEPARATE
        | INLINED_CHUNK_DIGEST
        | HAS_TAR_HEADER
        | HAS_TOC
        | CAP_TAR_TOC
        | TARFS
        | BATCH
        | ENCRYPTED
        | IS_CHUNKDICT_GENERATED;
    if features & !known != 0 {
        refused.push(format!(
            "unknown blob feature bits {:#x}",
            features & !known
        ));
    }
    (!refused.is_empty()).then(|| refused.join("; "))
}

fn parse_blob(b: &Blob, index: usize, chunk_size: u32) -> Result<BlobInfo, V6Error> {
    let bad = |what: String| V6Error::Blob { index, what };
    let id = parse_blob_id(&b.blob_id, index)?;
    if b.blob_index.get() as usize != index {
        return Err(bad(format!(
            "blob_index {} at position {index}",
            b.blob_index.get()
        )));
    }
    if b.chunk_size.get() != chunk_size {
        return Err(bad(format!(
            "chunk size {:#x} differs from the superblock's {chunk_size:#x}",
            b.chunk_size.get()
        )));
    }
    let features = b.features.get();
    if let Some(what) = refused_features(features) {
        return Err(V6Error::Unsupported(format!("blob {index}: {what}")));
    }
    if features & blob_features::ALIGNED == 0 {
        return Err(bad("no ALIGNED feature (required by RAFS v6)".into()));
    }
    let compression = match b.compression_algo.get() {
        0 => Compression::None,
        1 => Compression::Lz4Block,
        2 => {
            return Err(V6Error::Unsupported(format!(
                "blob {index}: gzip chunks (only OCI-ref conversions write them)"
            )))
        }
        3 => Compression::Zstd,
        n => return Err(bad(format!("unknown compression algorithm {n}"))),
    };
    let digest = match b.digest_algo.get() {
        0 => DigestAlgo::Blake3,
        1 => DigestAlgo::Sha256,
        n => return Err(bad(format!("unknown digest algorithm {n}"))),
    };
    let chunk_count = b.chunk_count.get();
    if chunk_count > MAX_CHUNKS_PER_BLOB {
        return Err(bad(format!("{chunk_count} chunks, more than 2^24")));
    }
    Ok(BlobInfo {
        id,
        compressed_size: b.compressed_size.get(),
        uncompressed_size: b.uncompressed_size.get(),
        chunk_count,
        compression,
        digest,
    })
}

/// Names what the superblock flags say that this reader does not support.
fn check_sb_flags(flags: u64) -> Result<(), V6Error> {
    use sb_flags::*;
    if flags & !KNOWN != 0 {
        return Err(V6Error::Unsupported(format!(
            "unknown superblock flags {:#x}",
            flags & !KNOWN
        )));
    }
    let comp = flags & (COMPRESSION_NONE | COMPRESSION_LZ4 | COMPRESSION_GZIP | COMPRESSION_ZSTD);
    if comp.count_ones() != 1 {
        return Err(V6Error::Superblock(format!(
            "compression flags {comp:#x}: not exactly one"
        )));
    }
    let hash = flags & (HASH_BLAKE3 | HASH_SHA256);
    if hash.count_ones() != 1 {
        return Err(V6Error::Superblock(format!(
            "digest flags {hash:#x}: not exactly one"
        )));
    }
    Ok(())
}

/// Reads and checks the fixed part of the bootstrap `data`.
pub fn parse(data: &[u8]) -> Result<Meta, V6Error> {
    let len = data.len() as u64;
    if len < BLOCK_SIZE || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(V6Error::Unaligned(len));
    }
    let sb: &SuperBlock = record(data, SUPER_OFFSET as u64).ok_or(V6Error::Unaligned(len))?;
    let ext: &SuperBlockExt = record(data, (SUPER_OFFSET + size_of::<SuperBlock>()) as u64)
        .ok_or(V6Error::Unaligned(len))?;
    let bad = |what: String| Err(V6Error::Superblock(what));
    if sb.s_magic.get() != EROFS_MAGIC {
        return bad(format!("magic {:#x}", sb.s_magic.get()));
    }
    if sb.s_checksum.get() != 0 {
        return Err(V6Error::Unsupported(
            "a superblock checksum (EROFS SB_CHKSUM; nydus-image never writes one)".into(),
        ));
    }
    if sb.s_feature_compat.get() != FEATURE_COMPAT_RAFS_V6 {
        return Err(V6Error::Unsupported(format!(
            "compatible feature bits {:#x} (a RAFS v6 image has exactly {FEATURE_COMPAT_RAFS_V6:#x}; \
             a plain EROFS image is not a Nydus image)",
            sb.s_feature_compat.get()
        )));
    }
    if sb.s_blkszbits != BLOCK_BITS {
        return Err(V6Error::Unsupported(format!(
            "block size 2^{} (RAFS v6 uses 4096)",
            sb.s_blkszbits
        )));
    }
    if sb.s_extslots != 0 || sb.s_u.get() != 0 {
        return bad("extended slots or s_u set".into());
    }
    if sb.s_xattr_blkaddr.get() != 0 {
        return Err(V6Error::Unsupported(
            "shared xattrs (s_xattr_blkaddr is set)".into(),
        ));
    }
    let incompat = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;
    if sb.s_feature_incompat.get() != incompat {
        return Err(V6Error::Unsupported(format!(
            "incompatible feature bits {:#x} (RAFS v6 has exactly {incompat:#x}: chunked files \
             and a device table)",
            sb.s_feature_incompat.get()
        )));
    }
    if sb.s_devt_slotoff.get() != DEVT_SLOT_OFFSET {
        return bad(format!(
            "device table at slot {}, expected {DEVT_SLOT_OFFSET}",
            sb.s_devt_slotoff.get()
        ));
    }
    let flags = ext.s_flags.get();
    check_sb_flags(flags)?;
    let chunk_size = ext.s_chunk_size.get();
    if !chunk_size.is_power_of_two() || !(0x1000..=0x100_0000).contains(&chunk_size) {
        return bad(format!("chunk size {chunk_size:#x}"));
    }
    let meta_base = u64::from(sb.s_meta_blkaddr.get()) * BLOCK_SIZE;
    if meta_base >= len {
        return bad(format!(
            "meta_blkaddr {} beyond the file",
            sb.s_meta_blkaddr.get()
        ));
    }

    // Blob table.
    let bt_off = ext.s_blob_table_offset.get();
    let bt_size = u64::from(ext.s_blob_table_size.get());
    if !bt_size.is_multiple_of(size_of::<Blob>() as u64)
        || (bt_size > 0 && (!bt_off.is_multiple_of(BLOCK_SIZE) || bt_off < BLOCK_SIZE))
    {
        return bad(format!("blob table at {bt_off:#x}, {bt_size} bytes"));
    }
    let nblobs = bt_size / size_of::<Blob>() as u64;
    let table: &[Blob] = records(data, bt_off, nblobs)
        .ok_or_else(|| V6Error::Superblock(format!("blob table at {bt_off:#x} beyond the file")))?;
    let blobs = table
        .iter()
        .enumerate()
        .map(|(i, b)| parse_blob(b, i, chunk_size))
        .collect::<Result<Vec<_>, _>>()?;

    // Device slots: one per blob, with the same ids.
    if u64::from(sb.s_extra_devices.get()) != nblobs {
        return bad(format!(
            "{} device slots for {nblobs} blobs",
            sb.s_extra_devices.get()
        ));
    }
    let devt_off = u64::from(DEVT_SLOT_OFFSET) * size_of::<Device>() as u64;
    let devices: &[Device] = records(data, devt_off, nblobs)
        .ok_or_else(|| V6Error::Superblock("device table beyond the file".into()))?;
    for (i, (d, b)) in devices.iter().zip(table).enumerate() {
        if d.blob_id != b.blob_id || d.mapped_blkaddr.get() != 0 {
            return Err(V6Error::Blob {
                index: i,
                what: "device slot does not match the blob table".into(),
            });
        }
    }

    let mut fixed: Vec<Range<u64>> = Vec::new();
    fixed.push(0..devt_off + nblobs * size_of::<Device>() as u64);
    fixed.push(bt_off..bt_off + bt_size);

    // Chunk table.
    let ct_off = ext.s_chunk_table_offset.get();
    let ct_size = ext.s_chunk_table_size.get();
    let chunk_table = if ct_size == 0 {
        0..0
    } else {
        if !ct_off.is_multiple_of(BLOCK_SIZE)
            || ct_off < BLOCK_SIZE
            || !ct_size.is_multiple_of(size_of::<ChunkInfo>() as u64)
        {
            return bad(format!("chunk table at {ct_off:#x}, {ct_size} bytes"));
        }
        let r = range_in(ct_off, ct_size, len)
            .ok_or_else(|| V6Error::Superblock("chunk table beyond the file".into()))?;
        if fixed.iter().any(|f| overlaps(f, &r)) {
            return bad("chunk table overlaps the blob table or the superblock".into());
        }
        fixed.push(r.clone());
        r.start as usize..r.end as usize
    };

    // Prefetch table: nids. nydus tolerates a size with a zero offset in empty images.
    let pt_off = ext.s_prefetch_table_offset.get();
    let pt_size = u64::from(ext.s_prefetch_table_size.get());
    let mut prefetch = Vec::new();
    if pt_size > 0 && pt_off != 0 {
        if !pt_size.is_multiple_of(4) || pt_off < BLOCK_SIZE {
            return Err(V6Error::Prefetch(format!(
                "at {pt_off:#x}, {pt_size} bytes"
            )));
        }
        let r = range_in(pt_off, pt_size, len)
            .ok_or_else(|| V6Error::Prefetch("beyond the file".into()))?;
        if fixed.iter().any(|f| overlaps(f, &r)) {
            return Err(V6Error::Prefetch("overlaps another table".into()));
        }
        let nids: &[zerocopy::little_endian::U32] = records(data, pt_off, pt_size / 4)
            .ok_or_else(|| V6Error::Prefetch("beyond the file".into()))?;
        prefetch = nids.iter().map(|n| u64::from(n.get())).collect();
        fixed.push(r);
    }
    Ok(Meta {
        flags,
        chunk_size,
        meta_base,
        root_nid: u64::from(sb.s_root_nid.get()),
        blobs,
        chunk_table,
        prefetch,
        fixed,
    })
}
