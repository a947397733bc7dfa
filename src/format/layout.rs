//! The on-disk records of a bootstrap, exactly as `docs/format.md` lays them out.
//!
//! Every record is little-endian and byte-aligned (`Unaligned`), so a table can be viewed in
//! place from any byte buffer with `zerocopy`, without copies and without `unsafe`.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The eight bytes every bootstrap starts with.
pub const MAGIC: [u8; 8] = *b"SKIFFRAF";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of a digest (blake3 or sha256: both 32 bytes).
pub const DIGEST_LEN: usize = 32;

/// Smallest chunk size a bootstrap may declare (4 KiB).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size a bootstrap may declare (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default chunk size (1 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Longest name of a directory entry, as on Linux.
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target, as on Linux (PATH_MAX - 1).
pub const MAX_SYMLINK_LEN: usize = 4095;
/// Longest xattr name, as on Linux.
pub const MAX_XATTR_NAME_LEN: usize = 255;
/// Largest xattr value, as on Linux.
pub const MAX_XATTR_VALUE_LEN: usize = 65536;

/// Chunk flag: the stored bytes are an lz4 block (lz4_flex, no size prefix).
pub const CHUNK_FLAG_LZ4: u32 = 1;
/// Chunk flag: the chunk is all zeroes and stored nowhere.
pub const CHUNK_FLAG_ZERO: u32 = 2;
/// Chunk flag: the stored bytes are one zstd frame.
pub const CHUNK_FLAG_ZSTD: u32 = 4;
/// Chunk flag: the digest is the sha256 of the uncompressed bytes (blake3 without it).
pub const CHUNK_FLAG_SHA256: u32 = 8;
/// All chunk flags this version knows.
pub const CHUNK_FLAGS_KNOWN: u32 =
    CHUNK_FLAG_LZ4 | CHUNK_FLAG_ZERO | CHUNK_FLAG_ZSTD | CHUNK_FLAG_SHA256;

/// Blob flag: the blob id is the sha256 of the blob file (blake3 without it). Nydus blobs are
/// named this way, which is also their registry layer digest.
pub const BLOB_FLAG_SHA256_ID: u32 = 1;
/// All blob flags this version knows.
pub const BLOB_FLAGS_KNOWN: u32 = BLOB_FLAG_SHA256_ID;

/// Superblock flag: the bootstrap carries the node compatibility header, so that
/// nydus-snapshotter's checks of a bootstrap's first bytes accept it (see
/// [`COMPAT_HEADER_SIZE`] and docs/format.md, "The node compatibility header").
pub const SB_FLAG_NODE_COMPAT: u32 = 1;
/// All superblock flags this version knows.
pub const SB_FLAGS_KNOWN: u32 = SB_FLAG_NODE_COMPAT;
/// With [`SB_FLAG_NODE_COMPAT`], tables start here, after the superblock and a zero area that
/// holds only [`COMPAT_EROFS_MAGIC`] at [`COMPAT_MAGIC_OFFSET`] and
/// [`COMPAT_BLOCK_BITS`] at [`COMPAT_BLOCK_BITS_OFFSET`]; the file is zero-padded to a
/// multiple of this size.
pub const COMPAT_HEADER_SIZE: usize = 4096;
/// Where nydus-snapshotter (`pkg/layout` `DetectFsVersion`) looks for the EROFS magic.
pub const COMPAT_MAGIC_OFFSET: usize = 1024;
/// The EROFS superblock magic, little-endian at [`COMPAT_MAGIC_OFFSET`].
pub const COMPAT_EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// Where nydus-snapshotter reads the block size bits of a v6 bootstrap (whose size must be a
/// multiple of the block size).
pub const COMPAT_BLOCK_BITS_OFFSET: usize = 1024 + 12;
/// The block size bits written there: 4096-byte blocks.
pub const COMPAT_BLOCK_BITS: u8 = 12;

/// Where a table lives in the bootstrap: its byte offset and its number of records
/// (bytes, for the string heap).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TableDesc {
    /// Byte offset from the start of the file.
    pub offset: U64,
    /// Number of records (bytes for the string heap).
    pub count: U64,
}

/// The fixed 256-byte header of a bootstrap.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Superblock {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION`].
    pub version: U32,
    /// Reserved, zero.
    pub flags: U32,
    /// Chunk size in bytes: a power of two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`].
    pub chunk_size: U32,
    /// Reserved, zero.
    pub reserved0: U32,
    /// [`InodeRecord`]s; index 0 is the root directory.
    pub inodes: TableDesc,
    /// [`DirentRecord`]s, grouped per directory and sorted by name within a group.
    pub dirents: TableDesc,
    /// [`ChunkRecord`]s, grouped per file in file order.
    pub chunks: TableDesc,
    /// [`XattrRecord`]s, grouped per inode and sorted by name within a group.
    pub xattrs: TableDesc,
    /// [`BlobRecord`]s.
    pub blobs: TableDesc,
    /// The string heap: names, symlink targets, xattr names and values.
    pub strings: TableDesc,
    /// Inode indices (little-endian u32) to prefetch, in order.
    pub prefetch: TableDesc,
    /// Merkle digest of the root directory (equal to inode 0's digest).
    pub root_digest: [u8; DIGEST_LEN],
    /// blake3 of the whole file with this field set to zeroes.
    pub file_digest: [u8; DIGEST_LEN],
    /// Reserved, zero.
    pub reserved: [u8; 56],
}

/// One inode: a file, directory, symlink, device, fifo or socket. Hard links share one.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InodeRecord {
    /// Merkle digest of this inode (see `docs/format.md`).
    pub digest: [u8; DIGEST_LEN],
    /// `st_mode`: file type and permission bits.
    pub mode: U32,
    /// Owner.
    pub uid: U32,
    /// Group.
    pub gid: U32,
    /// Link count: references for non-directories, 2 + subdirectories for directories.
    pub nlink: U32,
    /// Size in bytes (target length for symlinks).
    pub size: U64,
    /// Device number (Linux `dev_t` encoding) for character and block devices.
    pub rdev: U64,
    /// Modification time, seconds.
    pub mtime: I64,
    /// Change time, seconds.
    pub ctime: I64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: U32,
    /// Change time, nanoseconds.
    pub ctime_nsec: U32,
    /// Parent directory's inode index (directories only; 0 for the root and for others).
    pub parent: U32,
    /// Reserved, zero.
    pub flags: U32,
    /// Directories: first dirent. Regular files: first chunk. Symlinks: string offset.
    pub data_index: U64,
    /// Directories: entry count. Regular files: chunk count. Symlinks: target length.
    pub data_count: U32,
    /// First xattr record.
    pub xattr_index: U32,
    /// Number of xattr records.
    pub xattr_count: U32,
    /// Reserved, zero.
    pub reserved: [u8; 12],
}

/// One name in a directory.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DirentRecord {
    /// Offset of the name in the string heap.
    pub name_offset: U64,
    /// Name length: 1 to 255 bytes.
    pub name_len: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// The inode index the name refers to.
    pub inode: U32,
}

/// One chunk of a regular file.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkRecord {
    /// blake3 of the uncompressed bytes.
    pub digest: [u8; DIGEST_LEN],
    /// Index into the blob table (unused for zero chunks).
    pub blob_index: U32,
    /// `CHUNK_FLAG_*`.
    pub flags: U32,
    /// Offset of the stored bytes in the blob.
    pub compressed_offset: U64,
    /// Length of the stored bytes in the blob.
    pub compressed_size: U32,
    /// Length of the chunk once decompressed.
    pub uncompressed_size: U32,
    /// Reserved, zero.
    pub reserved: [u8; 8],
}

/// One extended attribute.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrRecord {
    /// Offset of the full name (with namespace prefix) in the string heap.
    pub name_offset: U64,
    /// Offset of the value in the string heap.
    pub value_offset: U64,
    /// Name length: 1 to 255.
    pub name_len: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// Value length: 0 to 65536.
    pub value_len: U32,
}

/// One blob the chunks live in, named by the digest of its bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlobRecord {
    /// Digest of the whole blob file (blake3, or sha256 with [`BLOB_FLAG_SHA256_ID`]): its
    /// name, in hex.
    pub id: [u8; DIGEST_LEN],
    /// Size of the blob file in bytes.
    pub size: U64,
    /// `BLOB_FLAG_*`.
    pub flags: U32,
    /// Reserved, zero.
    pub reserved: [u8; 4],
}

/// Size of the superblock on disk.
pub const SUPERBLOCK_SIZE: usize = core::mem::size_of::<Superblock>();

const _: () = assert!(core::mem::size_of::<Superblock>() == 256);
const _: () = assert!(core::mem::size_of::<InodeRecord>() == 128);
const _: () = assert!(core::mem::size_of::<DirentRecord>() == 16);
const _: () = assert!(core::mem::size_of::<ChunkRecord>() == 64);
const _: () = assert!(core::mem::size_of::<XattrRecord>() == 24);
const _: () = assert!(core::mem::size_of::<BlobRecord>() == 48);

/// The kind of an inode, from the file-type bits of its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InodeKind {
    /// A directory.
    Directory,
    /// A regular file.
    Regular,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl InodeKind {
    /// Decodes the file-type bits of `mode`, or `None` for an unknown type.
    pub fn from_mode(mode: u32) -> Option<Self> {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Some(Self::Directory),
            libc::S_IFREG => Some(Self::Regular),
            libc::S_IFLNK => Some(Self::Symlink),
            libc::S_IFCHR => Some(Self::CharDevice),
            libc::S_IFBLK => Some(Self::BlockDevice),
            libc::S_IFIFO => Some(Self::Fifo),
            libc::S_IFSOCK => Some(Self::Socket),
            _ => None,
        }
    }

    /// The `DT_*` constant readdir reports for this kind.
    pub fn dirent_type(self) -> u32 {
        u32::from(match self {
            Self::Directory => libc::DT_DIR,
            Self::Regular => libc::DT_REG,
            Self::Symlink => libc::DT_LNK,
            Self::CharDevice => libc::DT_CHR,
            Self::BlockDevice => libc::DT_BLK,
            Self::Fifo => libc::DT_FIFO,
            Self::Socket => libc::DT_SOCK,
        })
    }
}

impl InodeRecord {
    /// The inode's kind; `None` only for a record that failed validation.
    pub fn kind(&self) -> Option<InodeKind> {
        InodeKind::from_mode(self.mode.get())
    }

    /// An all-zero record, for builders to fill in.
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }
}

impl ChunkRecord {
    /// Whether the chunk is all zeroes and stored nowhere.
    pub fn is_zero(&self) -> bool {
        self.flags.get() & CHUNK_FLAG_ZERO != 0
    }

    /// Whether the stored bytes are lz4-compressed.
    pub fn is_lz4(&self) -> bool {
        self.flags.get() & CHUNK_FLAG_LZ4 != 0
    }

    /// Whether the stored bytes are a zstd frame.
    pub fn is_zstd(&self) -> bool {
        self.flags.get() & CHUNK_FLAG_ZSTD != 0
    }

    /// How the stored bytes are compressed.
    pub fn compression(&self) -> Compression {
        if self.is_lz4() {
            Compression::Lz4Block
        } else if self.is_zstd() {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The algorithm of [`Self::digest`].
    pub fn digest_algo(&self) -> DigestAlgo {
        if self.flags.get() & CHUNK_FLAG_SHA256 != 0 {
            DigestAlgo::Sha256
        } else {
            DigestAlgo::Blake3
        }
    }

    /// The chunk's digest with its algorithm: what caches key chunks by.
    pub fn chunk_digest(&self) -> ChunkDigest {
        ChunkDigest {
            algo: self.digest_algo(),
            bytes: self.digest,
        }
    }
}

impl BlobRecord {
    /// The algorithm of [`Self::id`].
    pub fn id_algo(&self) -> DigestAlgo {
        if self.flags.get() & BLOB_FLAG_SHA256_ID != 0 {
            DigestAlgo::Sha256
        } else {
            DigestAlgo::Blake3
        }
    }

    /// The registry digest of the layer holding this blob (`sha256:<hex id>`), when its id is
    /// its sha256: a registry names the layer by the same digest, so no manifest is needed
    /// to find it.
    pub fn layer_digest(&self) -> Option<String> {
        (self.id_algo() == DigestAlgo::Sha256).then(|| format!("sha256:{}", digest_hex(&self.id)))
    }
}

/// How a chunk's stored bytes are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None,
    /// An lz4 block (no size prefix; lz4_flex's block format).
    Lz4Block,
    /// One zstd frame.
    Zstd,
}

/// A digest algorithm of chunks and blob ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgo {
    /// blake3 (Skiff's default).
    Blake3,
    /// sha256 (Nydus images built with `--digester sha256`; Nydus blob ids).
    Sha256,
}

impl DigestAlgo {
    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> [u8; DIGEST_LEN] {
        match self {
            Self::Blake3 => *blake3::hash(data).as_bytes(),
            Self::Sha256 => {
                sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(data)).into()
            }
        }
    }

    /// A hasher for data given in pieces.
    pub fn hasher(self) -> Hasher {
        match self {
            Self::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            Self::Sha256 => Hasher::Sha256(<sha2::Sha256 as sha2::Digest>::new()),
        }
    }

    /// Its name in messages ("blake3", "sha256").
    pub fn name(self) -> &'static str {
        match self {
            Self::Blake3 => "blake3",
            Self::Sha256 => "sha256",
        }
    }
}

/// An incremental hasher of either [`DigestAlgo`].
pub enum Hasher {
    /// blake3 (boxed: its state is large).
    Blake3(Box<blake3::Hasher>),
    /// sha256.
    Sha256(sha2::Sha256),
}

impl Hasher {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Blake3(h) => {
                h.update(data);
            }
            Self::Sha256(h) => sha2::Digest::update(h, data),
        }
    }

    /// The digest of everything added.
    pub fn finalize(self) -> [u8; DIGEST_LEN] {
        match self {
            Self::Blake3(h) => *h.finalize().as_bytes(),
            Self::Sha256(h) => sha2::Digest::finalize(h).into(),
        }
    }
}

/// A chunk digest qualified by its algorithm: the name of a chunk's content in every cache, so
/// that a blake3 and a sha256 digest never stand for each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest {
    /// The algorithm.
    pub algo: DigestAlgo,
    /// The digest bytes.
    pub bytes: [u8; DIGEST_LEN],
}

impl ChunkDigest {
    /// A blake3 digest.
    pub fn blake3(bytes: [u8; DIGEST_LEN]) -> Self {
        Self {
            algo: DigestAlgo::Blake3,
            bytes,
        }
    }

    /// Whether `data` has this digest.
    pub fn matches(&self, data: &[u8]) -> bool {
        self.algo.digest(data) == self.bytes
    }
}

impl std::fmt::Display for ChunkDigest {
    /// Hex for blake3 (as chunk digests have always been shown), `sha256:hex` for sha256.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.algo {
            DigestAlgo::Blake3 => write!(f, "{}", hex::encode(self.bytes)),
            DigestAlgo::Sha256 => write!(f, "sha256:{}", hex::encode(self.bytes)),
        }
    }
}

/// Hex form of a digest, as used for blob file names.
pub fn digest_hex(digest: &[u8; DIGEST_LEN]) -> String {
    hex::encode(digest)
}
