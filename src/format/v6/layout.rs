//! The on-disk records of a Nydus RAFS v6 bootstrap (an EROFS image with Nydus's extensions),
//! as nydus-image 2.2 writes them. Little-endian and byte-aligned, viewed in place with
//! `zerocopy` like Skiff's own records.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// EROFS block size; RAFS v6 supports no other.
pub const BLOCK_SIZE: u64 = 4096;
/// log2 of [`BLOCK_SIZE`].
pub const BLOCK_BITS: u8 = 12;
/// Inodes are addressed in slots of this size: `offset = meta_blkaddr * 4096 + nid * 32`.
pub const INODE_SLOT_SIZE: u64 = 32;

/// Where the EROFS superblock starts.
pub const SUPER_OFFSET: usize = 1024;
/// `s_magic`: EROFS_SUPER_MAGIC_V1.
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// The magic of a RAFS v5 bootstrap, at offset 0.
pub const RAFS_V5_MAGIC: u32 = 0x5241_4653;

/// `s_feature_compat` bit every RAFS v6 image carries.
pub const FEATURE_COMPAT_RAFS_V6: u32 = 0x4000_0000;
/// `s_feature_incompat`: chunk-based files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `s_feature_incompat`: a device table (one slot per blob).
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// `s_devt_slotoff` nydus writes: the device table at 1408 = 11 × 128.
pub const DEVT_SLOT_OFFSET: u16 = 11;

/// RafsSuperFlags of the extended superblock.
pub mod sb_flags {
    /// Chunks are stored uncompressed.
    pub const COMPRESSION_NONE: u64 = 0x1;
    /// Chunks are lz4 blocks.
    pub const COMPRESSION_LZ4: u64 = 0x2;
    /// Chunk digests are blake3.
    pub const HASH_BLAKE3: u64 = 0x4;
    /// Chunk digests are sha256.
    pub const HASH_SHA256: u64 = 0x8;
    /// Inodes carry their uid and gid.
    pub const EXPLICIT_UID_GID: u64 = 0x10;
    /// Some inode has xattrs.
    pub const HAS_XATTR: u64 = 0x20;
    /// Chunks are gzip streams (OCI-ref images).
    pub const COMPRESSION_GZIP: u64 = 0x40;
    /// Chunks are zstd frames.
    pub const COMPRESSION_ZSTD: u64 = 0x80;
    /// Every blob carries its chunk digests.
    pub const INLINED_CHUNK_DIGEST: u64 = 0x100;
    /// Every flag nydus-image 2.2 writes.
    pub const KNOWN: u64 = 0x1ff;
}

/// BlobFeatures of a blob table entry.
pub mod blob_features {
    /// Uncompressed offsets are 4 KiB aligned (required for v6).
    pub const ALIGNED: u32 = 0x1;
    /// The blob carries the bootstrap (`--blob-inline-meta`).
    pub const INLINED_FS_META: u32 = 0x2;
    /// Version 2 chunk info (OCI-ref images).
    pub const CHUNK_INFO_V2: u32 = 0x4;
    /// Random access into gzip streams (OCI-ref images: `targz-ref`).
    pub const ZRAN: u32 = 0x8;
    /// Chunk data and blob metadata in separate blobs (OCI-ref images).
    pub const SEPARATE: u32 = 0x10;
    /// The blob carries its chunk digests (`blob.digest`).
    pub const INLINED_CHUNK_DIGEST: u32 = 0x20;
    /// Blob sections are wrapped in tar headers.
    pub const HAS_TAR_HEADER: u32 = 0x1000_0000;
    /// The blob ends with a table of contents.
    pub const HAS_TOC: u32 = 0x2000_0000;
    /// Built by nydus-image 2.2 or later.
    pub const CAP_TAR_TOC: u32 = 0x4000_0000;
    /// Added in 2.3: tarfs blobs.
    pub const TARFS: u32 = 0x40;
    /// Added in 2.3: batch chunks.
    pub const BATCH: u32 = 0x80;
    /// Added in 2.3: encrypted chunks.
    pub const ENCRYPTED: u32 = 0x100;
    /// Added in 2.3: a generated chunk dictionary.
    pub const IS_CHUNKDICT_GENERATED: u32 = 0x200;
}

/// `i_format` bit 0: 1 for the 64-byte extended inode.
pub const INODE_EXTENDED: u16 = 1;
/// Data layout (`i_format` bits 1..3): blocks at `i_u`.
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
/// Data layout: full blocks at `i_u`, the tail right after the inode and its xattrs.
pub const LAYOUT_FLAT_INLINE: u16 = 2;
/// Data layout: an array of chunk addresses after the inode and its xattrs.
pub const LAYOUT_CHUNK_BASED: u16 = 4;
/// `i_format` bits a valid inode may have.
pub const INODE_FORMAT_BITS: u16 = 0xf;
/// Chunk-based `i_u`: 8-byte chunk addresses (EROFS_CHUNK_FORMAT_INDEXES).
pub const CHUNK_FORMAT_INDEXES: u32 = 0x20;
/// Chunk-based `i_u`: log2(chunk size) − 12 in the low bits.
pub const CHUNK_FORMAT_BLKBITS_MASK: u32 = 0x1f;

/// The EROFS superblock with Nydus's values, 128 bytes at offset 1024.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SuperBlock {
    /// [`EROFS_MAGIC`].
    pub s_magic: U32,
    /// Must be 0.
    pub s_checksum: U32,
    /// Must be exactly [`FEATURE_COMPAT_RAFS_V6`].
    pub s_feature_compat: U32,
    /// Must be 12.
    pub s_blkszbits: u8,
    /// Must be 0.
    pub s_extslots: u8,
    /// The root directory's nid.
    pub s_root_nid: U16,
    /// Number of inodes (informational).
    pub s_inos: U64,
    /// Build time (unused).
    pub s_build_time: U64,
    /// Build time nanoseconds (unused).
    pub s_build_time_nsec: U32,
    /// Blocks of all blobs (statfs only).
    pub s_blocks: U32,
    /// Block of the first inode slot.
    pub s_meta_blkaddr: U32,
    /// Shared xattr block; must be 0 (not supported by RAFS v6).
    pub s_xattr_blkaddr: U32,
    /// Volume UUID (unused).
    pub s_uuid: [u8; 16],
    /// Volume name (unused).
    pub s_volume_name: [u8; 16],
    /// Must be CHUNKED_FILE | DEVICE_TABLE.
    pub s_feature_incompat: U32,
    /// Must be 0.
    pub s_u: U16,
    /// Number of blobs (device slots).
    pub s_extra_devices: U16,
    /// Device table offset in 128-byte slots; must be [`DEVT_SLOT_OFFSET`].
    pub s_devt_slotoff: U16,
    /// Reserved.
    pub s_reserved: [u8; 38],
}

/// RAFS v6's extended superblock, 256 bytes at offset 1152.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SuperBlockExt {
    /// [`sb_flags`].
    pub s_flags: U64,
    /// Blob table offset (4 KiB aligned).
    pub s_blob_table_offset: U64,
    /// Blob table size in bytes (a multiple of 256).
    pub s_blob_table_size: U32,
    /// Chunk size: a power of two from 4 KiB to 16 MiB.
    pub s_chunk_size: U32,
    /// Chunk table offset (4 KiB aligned).
    pub s_chunk_table_offset: U64,
    /// Chunk table size in bytes (a multiple of 80).
    pub s_chunk_table_size: U64,
    /// Prefetch table offset (0: none).
    pub s_prefetch_table_offset: U64,
    /// Prefetch table size in bytes (4 per nid).
    pub s_prefetch_table_size: U32,
    /// Padding.
    pub s_padding: U32,
    /// Reserved.
    pub s_reserved: [u8; 200],
}

/// One device slot, 128 bytes from offset 1408, one per blob.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Device {
    /// The blob id, 64 hex digits.
    pub blob_id: [u8; 64],
    /// Uncompressed blocks of the blob.
    pub blocks: U32,
    /// Must be 0.
    pub mapped_blkaddr: U32,
    /// Reserved.
    pub reserved: [u8; 56],
}

/// One blob table entry (RafsV6Blob), 256 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Blob {
    /// The blob id: 64 hex digits of the sha256 of the blob.
    pub blob_id: [u8; 64],
    /// Must equal the entry's position.
    pub blob_index: U32,
    /// Must equal the superblock's chunk size.
    pub chunk_size: U32,
    /// Chunks in the blob (at most 2^24).
    pub chunk_count: U32,
    /// 0 none, 1 lz4_block, 2 gzip, 3 zstd.
    pub compression_algo: U32,
    /// 0 blake3, 1 sha256.
    pub digest_algo: U32,
    /// [`blob_features`].
    pub features: U32,
    /// Size of the blob file (of its chunk data and metadata).
    pub compressed_size: U64,
    /// Sum of the 4 KiB-rounded uncompressed chunk sizes.
    pub uncompressed_size: U64,
    /// Size of the ToC with its tar header.
    pub blob_toc_size: U32,
    /// Compression of the CI array.
    pub ci_compressor: U32,
    /// Offset of the CI array in the blob.
    pub ci_offset: U64,
    /// Stored size of the CI array.
    pub ci_compressed_size: U64,
    /// Size of the CI array once decompressed.
    pub ci_uncompressed_size: U64,
    /// sha256 of the ToC.
    pub blob_toc_digest: [u8; 32],
    /// sha256 of the metadata blob (OCI-ref only).
    pub blob_meta_digest: [u8; 32],
    /// Size of the metadata blob (OCI-ref only).
    pub blob_meta_size: U64,
    /// Reserved.
    pub reserved: [u8; 48],
}

/// The compact inode, 32 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InodeCompact {
    /// Version bit and data layout.
    pub i_format: U16,
    /// Inline xattr count (in 4-byte units after a 12-byte header).
    pub i_xattr_icount: U16,
    /// st_mode.
    pub i_mode: U16,
    /// Link count.
    pub i_nlink: U16,
    /// Size.
    pub i_size: U32,
    /// Reserved.
    pub i_reserved: U32,
    /// Block address, chunk format or rdev, by type.
    pub i_u: U32,
    /// The builder's inode number (unused).
    pub i_ino: U32,
    /// Owner.
    pub i_uid: U16,
    /// Group.
    pub i_gid: U16,
    /// Reserved.
    pub i_reserved2: [u8; 4],
}

/// The extended inode, 64 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InodeExtended {
    /// Version bit and data layout.
    pub i_format: U16,
    /// Inline xattr count.
    pub i_xattr_icount: U16,
    /// st_mode.
    pub i_mode: U16,
    /// Reserved.
    pub i_reserved: U16,
    /// Size.
    pub i_size: U64,
    /// Block address, chunk format or rdev, by type.
    pub i_u: U32,
    /// The builder's inode number (unused).
    pub i_ino: U32,
    /// Owner.
    pub i_uid: U32,
    /// Group.
    pub i_gid: U32,
    /// Modification time, seconds.
    pub i_mtime: U64,
    /// Modification time, nanoseconds.
    pub i_mtime_nsec: U32,
    /// Link count.
    pub i_nlink: U32,
    /// Reserved.
    pub i_reserved2: [u8; 16],
}

/// A directory entry, 12 bytes; names follow the entries of a block.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Dirent {
    /// The entry's inode.
    pub e_nid: U64,
    /// Offset of the name within the block.
    pub e_nameoff: U16,
    /// EROFS file type (1 reg, 2 dir, 3 chr, 4 blk, 5 fifo, 6 sock, 7 symlink).
    pub e_file_type: u8,
    /// Reserved.
    pub e_reserved: u8,
}

/// The 12-byte header of an inode's inline xattrs.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrIbodyHeader {
    /// EROFS name filter (unused by RAFS).
    pub h_reserved: U32,
    /// Shared xattrs; must be 0.
    pub h_shared_count: u8,
    /// Reserved.
    pub h_reserved2: [u8; 7],
}

/// The 4-byte head of one inline xattr, followed by the name suffix and the value.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrEntry {
    /// Length of the name suffix.
    pub e_name_len: u8,
    /// Prefix index (1 user., 2 system.posix_acl_access, 3 system.posix_acl_default,
    /// 4 trusted., 6 security.).
    pub e_name_index: u8,
    /// Length of the value.
    pub e_value_size: U16,
}

/// One chunk address of a chunk-based file, 8 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkAddr {
    /// Low 16 bits of the CI index.
    pub c_blob_addr_lo: U16,
    /// Device id (blob index + 1) in the low byte, bits 16..24 of the CI index in the high one.
    pub c_blob_addr_hi: U16,
    /// Uncompressed offset of the chunk in its blob, in blocks.
    pub c_blk_addr: U32,
}

impl ChunkAddr {
    /// The device id: blob index + 1 (device 0 is the bootstrap itself).
    pub fn device(&self) -> u32 {
        u32::from(self.c_blob_addr_hi.get() & 0xff)
    }

    /// The chunk's index in its blob's compression-context array (24 bits).
    pub fn ci_index(&self) -> u32 {
        (u32::from(self.c_blob_addr_hi.get() >> 8) << 16) | u32::from(self.c_blob_addr_lo.get())
    }
}

/// One entry of the bootstrap's chunk table (RafsV5ChunkInfo), 80 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkInfo {
    /// Digest of the uncompressed chunk.
    pub block_id: [u8; 32],
    /// Blob index (0-based).
    pub blob_index: U32,
    /// 0x1: compressed.
    pub flags: U32,
    /// Stored size.
    pub compressed_size: U32,
    /// Size once decompressed.
    pub uncompressed_size: U32,
    /// Offset of the stored bytes in the blob file.
    pub compressed_offset: U64,
    /// Offset in the blob's uncompressed address space (4 KiB aligned).
    pub uncompressed_offset: U64,
    /// Offset in one file using the chunk (informational).
    pub file_offset: U64,
    /// Index in the blob's CI array.
    pub index: U32,
    /// Reserved.
    pub reserved: U32,
}

/// Chunk table flag: the stored bytes are compressed.
pub const CHUNK_COMPRESSED: u32 = 0x1;

const _: () = assert!(core::mem::size_of::<SuperBlock>() == 128);
const _: () = assert!(core::mem::size_of::<SuperBlockExt>() == 256);
const _: () = assert!(core::mem::size_of::<Device>() == 128);
const _: () = assert!(core::mem::size_of::<Blob>() == 256);
const _: () = assert!(core::mem::size_of::<InodeCompact>() == 32);
const _: () = assert!(core::mem::size_of::<InodeExtended>() == 64);
const _: () = assert!(core::mem::size_of::<Dirent>() == 12);
const _: () = assert!(core::mem::size_of::<XattrIbodyHeader>() == 12);
const _: () = assert!(core::mem::size_of::<XattrEntry>() == 4);
const _: () = assert!(core::mem::size_of::<ChunkAddr>() == 8);
const _: () = assert!(core::mem::size_of::<ChunkInfo>() == 80);
