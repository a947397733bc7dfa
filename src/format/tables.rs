//! A borrowed view of the tables of a bootstrap, and the Merkle digest computed over them.
//!
//! The writer and the loader both compute digests through [`Tables::inode_digest`], so the
//! definition in `docs/format.md` lives in exactly one place.

use zerocopy::little_endian::U32;

use super::layout::{
    BlobRecord, ChunkRecord, DirentRecord, InodeKind, InodeRecord, XattrRecord, DIGEST_LEN,
};

/// Domain-separation context of inode digests.
const INODE_DIGEST_CONTEXT: &str = "skiff 2026-11 RAFS inode digest v1";

/// A hasher already keyed with the context: deriving the key costs a hash of its own, which
/// would otherwise be paid once per inode on every load.
static INODE_HASHER: std::sync::LazyLock<blake3::Hasher> =
    std::sync::LazyLock::new(|| blake3::Hasher::new_derive_key(INODE_DIGEST_CONTEXT));

/// The tables of a bootstrap, borrowed from a loaded file or from a writer's vectors.
#[derive(Clone, Copy)]
pub struct Tables<'a> {
    /// Inode records.
    pub inodes: &'a [InodeRecord],
    /// Directory entries.
    pub dirents: &'a [DirentRecord],
    /// Chunk records.
    pub chunks: &'a [ChunkRecord],
    /// Xattr records.
    pub xattrs: &'a [XattrRecord],
    /// Blob records.
    pub blobs: &'a [BlobRecord],
    /// The string heap.
    pub strings: &'a [u8],
    /// Prefetch list.
    pub prefetch: &'a [U32],
}

impl<'a> Tables<'a> {
    /// Bytes `[offset, offset + len)` of the string heap, or `None` when out of bounds.
    pub fn string(&self, offset: u64, len: usize) -> Option<&'a [u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        self.strings.get(start..end)
    }

    /// `count` records of `table` from `index`, or `None` when out of bounds.
    pub fn range<T>(table: &'a [T], index: u64, count: u64) -> Option<&'a [T]> {
        let start = usize::try_from(index).ok()?;
        let end = start.checked_add(usize::try_from(count).ok()?)?;
        table.get(start..end)
    }

    /// The directory entries of inode `ino` (empty for non-directories or bad ranges).
    pub fn dirents_of(&self, ino: &InodeRecord) -> Option<&'a [DirentRecord]> {
        Self::range(
            self.dirents,
            ino.data_index.get(),
            u64::from(ino.data_count.get()),
        )
    }

    /// The chunks of regular file `ino`.
    pub fn chunks_of(&self, ino: &InodeRecord) -> Option<&'a [ChunkRecord]> {
        Self::range(
            self.chunks,
            ino.data_index.get(),
            u64::from(ino.data_count.get()),
        )
    }

    /// The xattrs of `ino`.
    pub fn xattrs_of(&self, ino: &InodeRecord) -> Option<&'a [XattrRecord]> {
        Self::range(
            self.xattrs,
            u64::from(ino.xattr_index.get()),
            u64::from(ino.xattr_count.get()),
        )
    }

    /// The name of a directory entry.
    pub fn dirent_name(&self, d: &DirentRecord) -> Option<&'a [u8]> {
        self.string(d.name_offset.get(), usize::from(d.name_len.get()))
    }

    /// The name and value of an xattr.
    pub fn xattr_pair(&self, x: &XattrRecord) -> Option<(&'a [u8], &'a [u8])> {
        let name = self.string(x.name_offset.get(), usize::from(x.name_len.get()))?;
        let value = self.string(
            x.value_offset.get(),
            usize::try_from(x.value_len.get()).ok()?,
        )?;
        Some((name, value))
    }

    /// The target of symlink `ino`.
    pub fn symlink_target(&self, ino: &InodeRecord) -> Option<&'a [u8]> {
        self.string(
            ino.data_index.get(),
            usize::try_from(ino.data_count.get()).ok()?,
        )
    }

    /// Computes the Merkle digest of inode `index` from its metadata, its xattrs and its content
    /// (chunk digests, symlink target, or each entry's name and the *stored* digest of the
    /// inode it names). `None` when a range is out of bounds.
    pub fn inode_digest(&self, index: usize) -> Option<[u8; DIGEST_LEN]> {
        let ino = self.inodes.get(index)?;
        // The message is gathered first and hashed in one call: many tiny updates cost more
        // than the hashing itself.
        let mut h = Vec::with_capacity(256);
        h.extend_from_slice(&ino.mode.get().to_le_bytes());
        h.extend_from_slice(&ino.uid.get().to_le_bytes());
        h.extend_from_slice(&ino.gid.get().to_le_bytes());
        h.extend_from_slice(&ino.nlink.get().to_le_bytes());
        h.extend_from_slice(&ino.size.get().to_le_bytes());
        h.extend_from_slice(&ino.rdev.get().to_le_bytes());
        h.extend_from_slice(&ino.mtime.get().to_le_bytes());
        h.extend_from_slice(&ino.mtime_nsec.get().to_le_bytes());
        h.extend_from_slice(&ino.ctime.get().to_le_bytes());
        h.extend_from_slice(&ino.ctime_nsec.get().to_le_bytes());
        h.extend_from_slice(&ino.flags.get().to_le_bytes());
        let xattrs = self.xattrs_of(ino)?;
        h.extend_from_slice(&(xattrs.len() as u64).to_le_bytes());
        for x in xattrs {
            let (name, value) = self.xattr_pair(x)?;
            h.extend_from_slice(&(name.len() as u64).to_le_bytes());
            h.extend_from_slice(name);
            h.extend_from_slice(&(value.len() as u64).to_le_bytes());
            h.extend_from_slice(value);
        }
        match ino.kind() {
            Some(InodeKind::Directory) => {
                let entries = self.dirents_of(ino)?;
                h.extend_from_slice(&(entries.len() as u64).to_le_bytes());
                for d in entries {
                    let name = self.dirent_name(d)?;
                    let child = self.inodes.get(usize::try_from(d.inode.get()).ok()?)?;
                    h.extend_from_slice(&(name.len() as u64).to_le_bytes());
                    h.extend_from_slice(name);
                    h.extend_from_slice(&child.digest);
                }
            }
            Some(InodeKind::Regular) => {
                let chunks = self.chunks_of(ino)?;
                h.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
                for c in chunks {
                    h.extend_from_slice(&c.digest);
                    h.extend_from_slice(&c.uncompressed_size.get().to_le_bytes());
                }
            }
            Some(InodeKind::Symlink) => {
                let target = self.symlink_target(ino)?;
                h.extend_from_slice(&(target.len() as u64).to_le_bytes());
                h.extend_from_slice(target);
            }
            Some(_) => {}
            None => return None,
        }
        let mut hasher = INODE_HASHER.clone();
        hasher.update(&h);
        Some(*hasher.finalize().as_bytes())
    }
}
