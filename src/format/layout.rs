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
/// Size of a blake3 digest.
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
/// All chunk flags this version knows.
pub const CHUNK_FLAGS_KNOWN: u32 = CHUNK_FLAG_LZ4 | CHUNK_FLAG_ZERO;

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

/// Blob flag: the id is the sha256 of the blob file (not its blake3). An image converted for
/// registries names its blobs so, because the registry names the layer holding the blob by
/// the same digest: `sha256:<hex id>` is where the blob is, without any manifest.
pub const BLOB_FLAG_ID_SHA256: u32 = 1;
/// All blob flags this version knows.
pub const BLOB_FLAGS_KNOWN: u32 = BLOB_FLAG_ID_SHA256;

/// One blob the chunks live in, named by the digest of its bytes (blake3, or sha256 with
/// [`BLOB_FLAG_ID_SHA256`]).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlobRecord {
    /// Digest of the whole blob file: its name, in hex.
    pub id: [u8; DIGEST_LEN],
    /// Size of the blob file in bytes.
    pub size: U64,
    /// `BLOB_FLAG_*`.
    pub flags: U32,
    /// Reserved, zero.
    pub reserved: [u8; 4],
}

impl BlobRecord {
    /// Whether the id is the sha256 of the blob (else its blake3).
    pub fn id_is_sha256(&self) -> bool {
        self.flags.get() & BLOB_FLAG_ID_SHA256 != 0
    }

    /// The registry digest of the layer holding this blob (`sha256:<hex id>`), when the id
    /// is one.
    pub fn layer_digest(&self) -> Option<String> {
        self.id_is_sha256()
            .then(|| format!("sha256:{}", digest_hex(&self.id)))
    }
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
}

/// Hex form of a digest, as used for blob file names.
pub fn digest_hex(digest: &[u8; DIGEST_LEN]) -> String {
    hex::encode(digest)
}
