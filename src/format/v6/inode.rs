//! One inode of a v6 bootstrap, read at its nid and checked: attributes, inline xattrs,
//! directory blocks, symlink targets and chunk addresses. Every offset is checked against the
//! file; a problem is a message the caller names the inode in.

use super::layout::*;
use super::superblock::{record, records, Meta};
use crate::format::{InodeKind, MAX_NAME_LEN};

/// One inode's fields, in Skiff's terms.
#[derive(Clone, Debug)]
pub struct Inode {
    /// Its nid.
    pub nid: u64,
    /// Byte offset of the inode.
    pub offset: u64,
    /// 64-byte extended (else 32-byte compact).
    pub extended: bool,
    /// Data layout (`LAYOUT_*`).
    pub layout: u16,
    /// Inline xattr count.
    pub xattr_icount: u16,
    /// st_mode.
    pub mode: u32,
    /// Its kind.
    pub kind: InodeKind,
    /// Link count as stored.
    pub nlink: u32,
    /// Size.
    pub size: u64,
    /// `i_u`: block address, chunk format or rdev.
    pub i_u: u32,
    /// Owner as stored.
    pub uid: u32,
    /// Group as stored.
    pub gid: u32,
    /// Modification time; `None` for a compact inode, which has none.
    pub mtime: Option<(i64, u32)>,
}

/// One xattr: full name and value.
pub type Xattr<'a> = (Vec<u8>, &'a [u8]);

/// A name in a directory block, borrowed from the bootstrap.
pub struct Entry<'a> {
    /// The name's bytes.
    pub name: &'a [u8],
    /// The inode it names.
    pub nid: u64,
    /// The EROFS file type recorded in the entry.
    pub file_type: u8,
}

/// The EROFS file type of `kind`.
pub fn file_type_of(kind: InodeKind) -> u8 {
    match kind {
        InodeKind::Regular => 1,
        InodeKind::Directory => 2,
        InodeKind::CharDevice => 3,
        InodeKind::BlockDevice => 4,
        InodeKind::Fifo => 5,
        InodeKind::Socket => 6,
        InodeKind::Symlink => 7,
    }
}

/// The xattr name prefix of EROFS prefix index `i`.
fn xattr_prefix(i: u8) -> Option<&'static [u8]> {
    Some(match i {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        6 => b"security.",
        _ => return None,
    })
}

impl Inode {
    /// Reads the inode at `nid`.
    pub fn read(data: &[u8], meta: &Meta, nid: u64) -> Result<Self, String> {
        let offset = nid
            .checked_mul(INODE_SLOT_SIZE)
            .and_then(|o| o.checked_add(meta.meta_base))
            .filter(|&o| o < data.len() as u64)
            .ok_or_else(|| format!("nid {nid} lies beyond the {}-byte file", data.len()))?;
        let compact: &InodeCompact = record(data, offset)
            .ok_or_else(|| format!("inode at {offset:#x} is cut off by the end of the file"))?;
        let format = compact.i_format.get();
        if format & !INODE_FORMAT_BITS != 0 {
            return Err(format!("unknown inode format {format:#x}"));
        }
        let extended = format & INODE_EXTENDED != 0;
        let layout = format >> 1;
        let mode16 = compact.i_mode.get();
        let mode = u32::from(mode16);
        let kind = InodeKind::from_mode(mode)
            .ok_or_else(|| format!("unknown file type in mode {mode:o}"))?;
        let ino = if extended {
            let e: &InodeExtended = record(data, offset).ok_or_else(|| {
                format!("extended inode at {offset:#x} is cut off by the end of the file")
            })?;
            let nsec = e.i_mtime_nsec.get();
            if nsec >= 1_000_000_000 {
                return Err(format!("mtime nanoseconds {nsec} out of range"));
            }
            Self {
                nid,
                offset,
                extended,
                layout,
                xattr_icount: e.i_xattr_icount.get(),
                mode,
                kind,
                nlink: e.i_nlink.get(),
                size: e.i_size.get(),
                i_u: e.i_u.get(),
                uid: e.i_uid.get(),
                gid: e.i_gid.get(),
                // EROFS stores seconds as u64; nydus writes an i64 there, so times before 1970
                // come back negative.
                mtime: Some((e.i_mtime.get() as i64, nsec)),
            }
        } else {
            Self {
                nid,
                offset,
                extended,
                layout,
                xattr_icount: compact.i_xattr_icount.get(),
                mode,
                kind,
                nlink: u32::from(compact.i_nlink.get()),
                size: u64::from(compact.i_size.get()),
                i_u: compact.i_u.get(),
                uid: u32::from(compact.i_uid.get()),
                gid: u32::from(compact.i_gid.get()),
                mtime: None,
            }
        };
        if !matches!(
            ino.layout,
            LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE | LAYOUT_CHUNK_BASED
        ) {
            return Err(format!(
                "data layout {} (compressed or unknown EROFS layouts are not RAFS v6)",
                ino.layout
            ));
        }
        // The inode and its xattrs must be in the file.
        let end = ino.body_end();
        if end > data.len() as u64 {
            return Err(format!(
                "inode and xattrs end at {end:#x}, beyond the {}-byte file",
                data.len()
            ));
        }
        Ok(ino)
    }

    fn inode_size(&self) -> u64 {
        if self.extended {
            size_of::<InodeExtended>() as u64
        } else {
            size_of::<InodeCompact>() as u64
        }
    }

    fn xattr_size(&self) -> u64 {
        match self.xattr_icount {
            0 => 0,
            n => size_of::<XattrIbodyHeader>() as u64 + (u64::from(n) - 1) * 4,
        }
    }

    /// Where the inode's xattrs end: inline data or chunk addresses start here.
    pub fn body_end(&self) -> u64 {
        self.offset + self.inode_size() + self.xattr_size()
    }

    /// The blocks of a flat (directory or symlink) inode of `size` bytes.
    fn block_count(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }

    /// The bytes of data block `k` (of [`Self::block_count`]) of a flat inode: full blocks at
    /// `i_u + k`, the last one shorter, and for FLAT_INLINE inside the inode's own block.
    pub fn block<'a>(&self, data: &'a [u8], k: u64) -> Result<&'a [u8], String> {
        let n = self.block_count();
        let len = if k + 1 == n && !self.size.is_multiple_of(BLOCK_SIZE) {
            self.size % BLOCK_SIZE
        } else {
            BLOCK_SIZE
        };
        let start = match self.layout {
            LAYOUT_FLAT_INLINE if k + 1 == n => {
                let s = self.body_end();
                // The tail shares the inode's block, as EROFS requires.
                if s / BLOCK_SIZE != (s + len - 1) / BLOCK_SIZE {
                    return Err(format!(
                        "inline tail of {len} bytes crosses a block boundary"
                    ));
                }
                s
            }
            LAYOUT_FLAT_INLINE | LAYOUT_FLAT_PLAIN => (u64::from(self.i_u) + k) * BLOCK_SIZE,
            _ => return Err("not a flat inode".into()),
        };
        usize::try_from(start)
            .ok()
            .and_then(|s| data.get(s..s.checked_add(len as usize)?))
            .ok_or_else(|| format!("data block {k} at {start:#x} lies beyond the file"))
    }

    /// Where the inode's data ends in the bootstrap, for the overlap check: the inode, its
    /// xattrs and its inline tail or chunk addresses.
    pub fn extent_end(&self, chunk_addrs: u64) -> u64 {
        let body = self.body_end();
        match self.layout {
            LAYOUT_CHUNK_BASED => body.next_multiple_of(8) + chunk_addrs * 8,
            LAYOUT_FLAT_INLINE if !self.size.is_multiple_of(BLOCK_SIZE) => {
                body + self.size % BLOCK_SIZE
            }
            _ => body,
        }
    }

    /// The inline xattrs, with full names, in stored order.
    pub fn xattrs<'a>(&self, data: &'a [u8]) -> Result<Vec<Xattr<'a>>, String> {
        let mut out = Vec::new();
        if self.xattr_icount == 0 {
            return Ok(out);
        }
        let head_off = self.offset + self.inode_size();
        let head: &XattrIbodyHeader =
            record(data, head_off).ok_or("xattr header beyond the file")?;
        if head.h_shared_count != 0 {
            return Err("shared xattrs (not supported by RAFS v6)".into());
        }
        let mut pos = head_off + size_of::<XattrIbodyHeader>() as u64;
        let end = self.body_end();
        while pos < end {
            let e: &XattrEntry = record(data, pos)
                .filter(|_| pos + 4 <= end)
                .ok_or_else(|| format!("xattr entry at {pos:#x} cut off"))?;
            let name_len = u64::from(e.e_name_len);
            let value_len = u64::from(e.e_value_size.get());
            let total = (4 + name_len + value_len).next_multiple_of(4);
            if pos + total > end {
                return Err(format!(
                    "xattr of {name_len}+{value_len} bytes overruns the xattr area"
                ));
            }
            let prefix = xattr_prefix(e.e_name_index).ok_or_else(|| {
                format!(
                    "xattr prefix index {} (not one nydus writes: user, trusted, security, \
                     posix ACLs)",
                    e.e_name_index
                )
            })?;
            let suffix: &[u8] =
                records(data, pos + 4, name_len).ok_or("xattr name beyond the file")?;
            let value: &[u8] = records(data, pos + 4 + name_len, value_len)
                .ok_or("xattr value beyond the file")?;
            let mut name = prefix.to_vec();
            name.extend_from_slice(suffix);
            out.push((name, value));
            pos += total;
        }
        Ok(out)
    }

    /// The chunk addresses of a regular file: `ceil(size / chunk_size)` of them, as nydus reads
    /// them (the chunk-size bits of `i_u` are a hint for the kernel, not the layout).
    pub fn chunk_addrs<'a>(
        &self,
        data: &'a [u8],
        chunk_size: u32,
    ) -> Result<&'a [ChunkAddr], String> {
        let n = self.size.div_ceil(u64::from(chunk_size));
        if self.layout != LAYOUT_CHUNK_BASED {
            if n == 0 {
                return Ok(&[]);
            }
            return Err(format!(
                "regular file with data layout {} (file data inside the bootstrap is not \
                 RAFS v6)",
                self.layout
            ));
        }
        if self.i_u & !(CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_BLKBITS_MASK) != 0
            || (n > 0 && self.i_u & CHUNK_FORMAT_INDEXES == 0)
        {
            return Err(format!(
                "chunk format {:#x}: not 8-byte chunk indexes",
                self.i_u
            ));
        }
        records(data, self.body_end().next_multiple_of(8), n).ok_or_else(|| {
            format!(
                "{n} chunk addresses of a {}-byte file lie beyond the bootstrap",
                self.size
            )
        })
    }

    /// The target of a symlink.
    pub fn symlink_target<'a>(&self, data: &'a [u8]) -> Result<&'a [u8], String> {
        if self.size == 0 || self.size >= BLOCK_SIZE {
            return Err(format!(
                "symlink target of {} bytes (1 to 4095 allowed)",
                self.size
            ));
        }
        self.block(data, 0)
    }

    /// The entries of a directory, in stored order, each name checked; the blocks' order is
    /// checked by the caller.
    pub fn dir_entries<'a>(&self, data: &'a [u8]) -> Result<Vec<Entry<'a>>, String> {
        if self.layout == LAYOUT_CHUNK_BASED {
            return Err("chunk-based directory".into());
        }
        if self.size == 0 {
            return Err("empty directory (no \".\" or \"..\")".into());
        }
        if self.size > data.len() as u64 {
            return Err(format!(
                "directory of {} bytes, larger than the bootstrap",
                self.size
            ));
        }
        let mut out = Vec::new();
        for k in 0..self.block_count() {
            let block = self.block(data, k)?;
            let bad = |what: String| format!("directory block {k}: {what}");
            let dirents: &[Dirent] = records(block, 0, 1).ok_or_else(|| bad("too short".into()))?;
            let first = usize::from(dirents[0].e_nameoff.get());
            if first == 0 || !first.is_multiple_of(size_of::<Dirent>()) || first >= block.len() {
                return Err(bad(format!("first name offset {first}")));
            }
            let count = first / size_of::<Dirent>();
            let dirents: &[Dirent] = records(block, 0, count as u64)
                .ok_or_else(|| bad(format!("{count} entries do not fit")))?;
            for (j, d) in dirents.iter().enumerate() {
                let start = usize::from(d.e_nameoff.get());
                let end = match dirents.get(j + 1) {
                    Some(next) => usize::from(next.e_nameoff.get()),
                    None => block.len(),
                };
                if start < first || end < start || end > block.len() {
                    return Err(bad(format!("entry {j}: name at {start}..{end}")));
                }
                let mut name = &block[start..end];
                if j + 1 == count {
                    // The last name runs to the end of the block or to the first NUL.
                    if let Some(nul) = name.iter().position(|&b| b == 0) {
                        name = &name[..nul];
                    }
                }
                if name.is_empty()
                    || name.len() > MAX_NAME_LEN
                    || name.iter().any(|&b| b == 0 || b == b'/')
                {
                    return Err(bad(format!(
                        "entry {j}: invalid name {:?}",
                        String::from_utf8_lossy(name)
                    )));
                }
                out.push(Entry {
                    name,
                    nid: d.e_nid.get(),
                    file_type: d.e_file_type,
                });
            }
        }
        Ok(out)
    }
}
