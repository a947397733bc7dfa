//! Serialising a bootstrap: the builder fills in records, the writer computes every Merkle
//! digest and lays the tables out.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::layout::*;
use super::tables::Tables;
use super::FormatError;

/// The tables of a bootstrap being written. Inode digests are filled in by [`Self::finish`].
#[derive(Default)]
pub struct BootstrapWriter {
    /// Inode records; index 0 must be the root directory, and every subdirectory must come after
    /// its parent.
    pub inodes: Vec<InodeRecord>,
    /// Directory entries, grouped per directory and sorted by name within each group.
    pub dirents: Vec<DirentRecord>,
    /// Chunk records.
    pub chunks: Vec<ChunkRecord>,
    /// Xattr records, grouped per inode and sorted by name.
    pub xattrs: Vec<XattrRecord>,
    /// Blob records.
    pub blobs: Vec<BlobRecord>,
    /// String heap.
    pub strings: Vec<u8>,
    /// Prefetch list.
    pub prefetch: Vec<U32>,
}

impl BootstrapWriter {
    /// Appends `bytes` to the string heap and returns their offset.
    pub fn add_string(&mut self, bytes: &[u8]) -> u64 {
        let off = self.strings.len() as u64;
        self.strings.extend_from_slice(bytes);
        off
    }

    /// Appends a directory entry.
    pub fn add_dirent(&mut self, name: &[u8], inode: u32) {
        let name_offset = self.add_string(name);
        let mut d = DirentRecord::new_zeroed();
        d.name_offset = U64::new(name_offset);
        d.name_len = (name.len() as u16).into();
        d.inode = U32::new(inode);
        self.dirents.push(d);
    }

    /// Appends an xattr record.
    pub fn add_xattr(&mut self, name: &[u8], value: &[u8]) {
        let mut x = XattrRecord::new_zeroed();
        x.name_offset = U64::new(self.add_string(name));
        x.name_len = (name.len() as u16).into();
        x.value_offset = U64::new(self.add_string(value));
        x.value_len = U32::new(value.len() as u32);
        self.xattrs.push(x);
    }

    /// Computes every digest and returns the bootstrap's bytes.
    pub fn finish(self, chunk_size: u32) -> Result<Vec<u8>, FormatError> {
        self.finish_with(chunk_size, false)
    }

    /// Like [`Self::finish`]; with `node_compat`, the bootstrap carries the node compatibility
    /// header ([`SB_FLAG_NODE_COMPAT`]).
    pub fn finish_with(
        mut self,
        chunk_size: u32,
        node_compat: bool,
    ) -> Result<Vec<u8>, FormatError> {
        // Non-directories first (they depend on nothing), then directories from the last to
        // the first, so that every child's digest is final before its parent is hashed.
        let order: Vec<usize> = (0..self.inodes.len())
            .filter(|&i| self.inodes[i].kind() != Some(InodeKind::Directory))
            .chain(
                (0..self.inodes.len())
                    .rev()
                    .filter(|&i| self.inodes[i].kind() == Some(InodeKind::Directory)),
            )
            .collect();
        for i in order {
            let digest = self.tables().inode_digest(i).ok_or(FormatError::BadInode {
                index: i as u64,
                what: "unhashable".into(),
            })?;
            self.inodes[i].digest = digest;
        }
        let root_digest = self
            .inodes
            .first()
            .map(|r| r.digest)
            .ok_or_else(|| FormatError::Invalid("no inodes".into()))?;

        let mut sb = Superblock::new_zeroed();
        sb.magic = MAGIC;
        sb.version = U32::new(VERSION);
        sb.chunk_size = U32::new(chunk_size);
        sb.root_digest = root_digest;
        // The exact size up front, and each table freed once copied: the peak is the tables
        // once plus the output, not the tables plus a doubling output (a v6 bootstrap is
        // transcoded through here on every load; docs/benchmarks.md, "Memory per daemon").
        let tables_len = self.inodes.as_bytes().len()
            + self.dirents.as_bytes().len()
            + self.chunks.as_bytes().len()
            + self.xattrs.as_bytes().len()
            + self.blobs.as_bytes().len()
            + self.prefetch.as_bytes().len()
            + self.strings.len();
        // Up to 7 bytes of alignment before each of the 7 tables, and the compat padding.
        let mut out = Vec::with_capacity(
            COMPAT_HEADER_SIZE.max(SUPERBLOCK_SIZE) + tables_len + 7 * 7 + COMPAT_HEADER_SIZE,
        );
        out.resize(SUPERBLOCK_SIZE, 0);
        if node_compat {
            sb.flags = U32::new(SB_FLAG_NODE_COMPAT);
            out.resize(COMPAT_HEADER_SIZE, 0);
            out[COMPAT_MAGIC_OFFSET..COMPAT_MAGIC_OFFSET + 4]
                .copy_from_slice(&COMPAT_EROFS_MAGIC.to_le_bytes());
            out[COMPAT_BLOCK_BITS_OFFSET] = COMPAT_BLOCK_BITS;
        }
        let put = |out: &mut Vec<u8>, bytes: &[u8], count: usize| {
            // Tables start 8-byte aligned (see docs/format.md: the layout is canonical).
            out.resize(out.len().next_multiple_of(8), 0);
            let desc = TableDesc {
                offset: U64::new(out.len() as u64),
                count: U64::new(count as u64),
            };
            out.extend_from_slice(bytes);
            desc
        };
        let n = self.inodes.len();
        sb.inodes = put(&mut out, std::mem::take(&mut self.inodes).as_bytes(), n);
        let n = self.dirents.len();
        sb.dirents = put(&mut out, std::mem::take(&mut self.dirents).as_bytes(), n);
        let n = self.chunks.len();
        sb.chunks = put(&mut out, std::mem::take(&mut self.chunks).as_bytes(), n);
        let n = self.xattrs.len();
        sb.xattrs = put(&mut out, std::mem::take(&mut self.xattrs).as_bytes(), n);
        let n = self.blobs.len();
        sb.blobs = put(&mut out, std::mem::take(&mut self.blobs).as_bytes(), n);
        let n = self.prefetch.len();
        sb.prefetch = put(&mut out, std::mem::take(&mut self.prefetch).as_bytes(), n);
        let n = self.strings.len();
        sb.strings = put(&mut out, &std::mem::take(&mut self.strings), n);
        if node_compat {
            out.resize(out.len().next_multiple_of(COMPAT_HEADER_SIZE), 0);
        }

        let mut h = blake3::Hasher::new();
        h.update(sb.as_bytes());
        h.update(&out[SUPERBLOCK_SIZE..]);
        sb.file_digest = *h.finalize().as_bytes();
        out[..SUPERBLOCK_SIZE].copy_from_slice(sb.as_bytes());
        Ok(out)
    }

    fn tables(&self) -> Tables<'_> {
        Tables {
            inodes: &self.inodes,
            dirents: &self.dirents,
            chunks: &self.chunks,
            xattrs: &self.xattrs,
            blobs: &self.blobs,
            strings: &self.strings,
            prefetch: &self.prefetch,
        }
    }
}
