//! Loading a bootstrap: one read, then validation of every offset, count, index and digest, so
//! that everything above this module can trust what it is handed.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use zerocopy::FromBytes;

use super::layout::*;
use super::sealed::SealedBytes;
use super::tables::Tables;
use super::{v6, FormatError, Preserved, SourceFormat};

mod shared;

pub use shared::{ShareKey, SharedError, SHARE_HEADER_LEN};

/// Largest bootstrap this code loads (4 GiB): a bound on what a hostile file can make us read.
pub const MAX_BOOTSTRAP_SIZE: u64 = 4 << 30;

/// Where a bootstrap's validated bytes live.
enum Bytes {
    /// In this process's memory.
    Owned(Vec<u8>),
    /// In a sealed memfd, after its share header: memory other daemons of the node may map
    /// too, and that nobody can change ([`Bootstrap::into_shared`], [`Bootstrap::from_shared`]).
    Sealed(SealedBytes),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            // A sealed region is at least a header long (checked where it is taken).
            Bytes::Sealed(s) => s.bytes().get(SHARE_HEADER_LEN..).unwrap_or(&[]),
        }
    }
}

/// A loaded and fully validated bootstrap. Holds the file's bytes once; every accessor is a
/// view into them.
pub struct Bootstrap {
    data: Bytes,
    format: SourceFormat,
    node_compat: bool,
    preserved: Preserved,
    chunk_size: u32,
    root_digest: [u8; DIGEST_LEN],
    file_digest: [u8; DIGEST_LEN],
    inodes: Range<usize>,
    dirents: Range<usize>,
    chunks: Range<usize>,
    xattrs: Range<usize>,
    blobs: Range<usize>,
    strings: Range<usize>,
    prefetch: Range<usize>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("bytes", &self.data.len())
            .field("sealed", &matches!(self.data, Bytes::Sealed(_)))
            .field("format", &self.format)
            .field("chunk_size", &self.chunk_size)
            .field("root_digest", &digest_hex(&self.root_digest))
            .finish()
    }
}

fn table_range(
    name: &'static str,
    desc: &TableDesc,
    record_size: usize,
    file_len: usize,
) -> Result<Range<usize>, FormatError> {
    let bad = || FormatError::TableOutOfBounds {
        table: name,
        offset: desc.offset.get(),
        count: desc.count.get(),
        file_len: file_len as u64,
    };
    let offset = usize::try_from(desc.offset.get()).map_err(|_| bad())?;
    let count = usize::try_from(desc.count.get()).map_err(|_| bad())?;
    let len = count.checked_mul(record_size).ok_or_else(bad)?;
    let end = offset.checked_add(len).ok_or_else(bad)?;
    if offset < SUPERBLOCK_SIZE && len > 0 || end > file_len {
        return Err(bad());
    }
    Ok(offset..end)
}

fn view<'a, T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable + zerocopy::Unaligned>(
    data: &'a [u8],
    range: &Range<usize>,
) -> &'a [T] {
    // Ranges were checked against the file length and are whole records, and `T` is
    // `Unaligned`, so neither lookup fails; an empty slice is a safe fallback regardless.
    data.get(range.clone())
        .and_then(|b| <[T]>::ref_from_bytes(b).ok())
        .unwrap_or(&[])
}

impl Bootstrap {
    /// Reads and validates the bootstrap at `path`.
    pub fn load(path: &Path) -> Result<Self, FormatError> {
        let io_err = |source| FormatError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.len() > MAX_BOOTSTRAP_SIZE {
            return Err(FormatError::TooLarge(meta.len()));
        }
        let data = std::fs::read(path).map_err(io_err)?;
        Self::from_bytes(data)
    }

    /// Validates `data` as a bootstrap and takes ownership of it. The format is chosen by
    /// magic: Skiff's at offset 0, or a Nydus RAFS v6 (EROFS) magic at 1024, which is
    /// transcoded into Skiff's tables and then validated like a Skiff bootstrap. A RAFS v5
    /// bootstrap is refused by name.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self, FormatError> {
        Self::from_bytes_with(data, v6::Defaults::of_this_process())
    }

    /// [`Self::from_bytes`] with explicit stand-ins for what a v6 image lacks (owner, times):
    /// for tests that need the same bytes from every run.
    pub fn from_bytes_with(data: Vec<u8>, defaults: v6::Defaults) -> Result<Self, FormatError> {
        if data.len() as u64 > MAX_BOOTSTRAP_SIZE {
            return Err(FormatError::TooLarge(data.len() as u64));
        }
        if data.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            if v6::is_v6(&data) {
                let start = std::time::Instant::now();
                let v6_bytes = data.len();
                let (skiff, preserved) = v6::transcode(&data, defaults).map_err(FormatError::V6)?;
                drop(data);
                let transcoded = start.elapsed();
                let mut b = Self::from_skiff(skiff, SourceFormat::NydusRafsV6)
                    .map_err(|e| FormatError::V6(v6::V6Error::Transcode(Box::new(e))))?;
                b.preserved = preserved;
                // What the defence in depth costs: the Skiff validator over the transcoded
                // tables, beside the v6 checks and transcoding (scripts/bench.sh reports both).
                tracing::debug!(
                    v6_bytes,
                    skiff_bytes = b.byte_len(),
                    transcode_ms = format_args!("{:.1}", transcoded.as_secs_f64() * 1e3),
                    validate_ms =
                        format_args!("{:.1}", (start.elapsed() - transcoded).as_secs_f64() * 1e3),
                    "Nydus RAFS v6 bootstrap loaded"
                );
                return Ok(b);
            }
            if data.get(..4) == Some(&v6::layout::RAFS_V5_MAGIC.to_le_bytes()[..]) {
                return Err(FormatError::RafsV5);
            }
        }
        Self::from_skiff(data, SourceFormat::Skiff)
    }

    /// Validates `data` as a Skiff bootstrap.
    fn from_skiff(data: Vec<u8>, format: SourceFormat) -> Result<Self, FormatError> {
        Self::validated(Bytes::Owned(data), format)
    }

    /// Validates `data` as a Skiff bootstrap, wherever it lives.
    fn validated(data: Bytes, format: SourceFormat) -> Result<Self, FormatError> {
        let (sb, _) = Superblock::read_from_prefix(&data).map_err(|_| FormatError::Truncated {
            len: data.len() as u64,
        })?;
        if sb.magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if sb.version.get() != VERSION {
            return Err(FormatError::UnsupportedVersion(sb.version.get()));
        }
        // The file digest covers every byte, so any accidental damage is caught here with one
        // clear message; the structural checks below still guard against crafted files.
        let mut zeroed = sb;
        zeroed.file_digest = [0; DIGEST_LEN];
        let mut h = blake3::Hasher::new();
        h.update(zerocopy::IntoBytes::as_bytes(&zeroed));
        h.update(data.get(SUPERBLOCK_SIZE..).unwrap_or(&[]));
        if *h.finalize().as_bytes() != sb.file_digest {
            return Err(FormatError::FileDigestMismatch);
        }
        if sb.flags.get() & !SB_FLAGS_KNOWN != 0
            || sb.reserved0.get() != 0
            || sb.reserved != [0; 56]
        {
            return Err(FormatError::Invalid(
                "reserved superblock fields or unknown superblock flags are not zero".into(),
            ));
        }
        let chunk_size = sb.chunk_size.get();
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(FormatError::BadChunkSize(chunk_size));
        }
        let len = data.len();
        let b = Bootstrap {
            format,
            node_compat: sb.flags.get() & SB_FLAG_NODE_COMPAT != 0,
            preserved: Preserved::ALL,
            chunk_size,
            root_digest: sb.root_digest,
            file_digest: sb.file_digest,
            inodes: table_range("inodes", &sb.inodes, size_of::<InodeRecord>(), len)?,
            dirents: table_range("dirents", &sb.dirents, size_of::<DirentRecord>(), len)?,
            chunks: table_range("chunks", &sb.chunks, size_of::<ChunkRecord>(), len)?,
            xattrs: table_range("xattrs", &sb.xattrs, size_of::<XattrRecord>(), len)?,
            blobs: table_range("blobs", &sb.blobs, size_of::<BlobRecord>(), len)?,
            strings: table_range("strings", &sb.strings, 1, len)?,
            prefetch: table_range("prefetch", &sb.prefetch, 4, len)?,
            data,
        };
        b.validate_layout(&sb)?;
        b.validate()?;
        Ok(b)
    }

    /// The tables, borrowed.
    pub fn tables(&self) -> Tables<'_> {
        Tables {
            inodes: view(&self.data, &self.inodes),
            dirents: view(&self.data, &self.dirents),
            chunks: view(&self.data, &self.chunks),
            xattrs: view(&self.data, &self.xattrs),
            blobs: view(&self.data, &self.blobs),
            strings: self.data.get(self.strings.clone()).unwrap_or(&[]),
            prefetch: view(&self.data, &self.prefetch),
        }
    }

    /// The on-disk format the bootstrap was loaded from.
    pub fn source_format(&self) -> SourceFormat {
        self.format
    }

    /// Whether the bootstrap carries the node compatibility header ([`SB_FLAG_NODE_COMPAT`]).
    pub fn node_compat(&self) -> bool {
        self.node_compat
    }

    /// Which attributes of the source the image holds.
    pub fn preserved(&self) -> Preserved {
        self.preserved
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Merkle digest of the root directory: the identity of the image's content.
    pub fn root_digest(&self) -> &[u8; DIGEST_LEN] {
        &self.root_digest
    }

    /// The digest of the Skiff tables' bytes (the superblock's `file_digest`; for a v6
    /// bootstrap, of the tables it was transcoded into): the identity of the loaded tables.
    pub fn file_digest(&self) -> &[u8; DIGEST_LEN] {
        &self.file_digest
    }

    /// Size of the bootstrap file in bytes.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Number of inodes.
    pub fn inode_count(&self) -> usize {
        self.tables().inodes.len()
    }

    /// Inode `index`, or `None` when out of range.
    pub fn inode(&self, index: u32) -> Option<&InodeRecord> {
        self.tables().inodes.get(usize::try_from(index).ok()?)
    }

    /// The sorted entries of directory `index` (empty when it is not a directory).
    pub fn dir_entries(&self, index: u32) -> &[DirentRecord] {
        match self.inode(index) {
            Some(ino) if ino.kind() == Some(InodeKind::Directory) => {
                self.tables().dirents_of(ino).unwrap_or(&[])
            }
            _ => &[],
        }
    }

    /// The name of a directory entry.
    pub fn entry_name(&self, d: &DirentRecord) -> &[u8] {
        self.tables().dirent_name(d).unwrap_or(&[])
    }

    /// Looks `name` up in directory `dir` by binary search.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let entries = self.dir_entries(dir);
        let t = self.tables();
        entries
            .binary_search_by(|d| t.dirent_name(d).unwrap_or(&[]).cmp(name))
            .ok()
            .and_then(|i| entries.get(i))
            .map(|d| d.inode.get())
    }

    /// The chunks of regular file `index` (empty otherwise).
    pub fn file_chunks(&self, index: u32) -> &[ChunkRecord] {
        match self.inode(index) {
            Some(ino) if ino.kind() == Some(InodeKind::Regular) => {
                self.tables().chunks_of(ino).unwrap_or(&[])
            }
            _ => &[],
        }
    }

    /// The target of symlink `index`, or `None` when it is not a symlink.
    pub fn symlink_target(&self, index: u32) -> Option<&[u8]> {
        let ino = self.inode(index)?;
        if ino.kind() != Some(InodeKind::Symlink) {
            return None;
        }
        self.tables().symlink_target(ino)
    }

    /// The xattrs of inode `index`, sorted by name.
    pub fn xattrs(&self, index: u32) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let t = self.tables();
        self.inode(index)
            .and_then(|ino| t.xattrs_of(ino))
            .unwrap_or(&[])
            .iter()
            .filter_map(move |x| t.xattr_pair(x))
    }

    /// The value of xattr `name` of inode `index`.
    pub fn xattr(&self, index: u32, name: &[u8]) -> Option<&[u8]> {
        self.xattrs(index).find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The blob table.
    pub fn blobs(&self) -> &[BlobRecord] {
        self.tables().blobs
    }

    /// Inode indices to prefetch, in order.
    pub fn prefetch(&self) -> impl Iterator<Item = u32> + '_ {
        self.tables().prefetch.iter().map(|i| i.get())
    }

    /// The path of every inode reachable from the root, in table order; hard links give the
    /// first path found. Used by tools that name files in messages.
    pub fn paths(&self) -> Vec<Vec<u8>> {
        let t = self.tables();
        let mut paths: Vec<Option<Vec<u8>>> = vec![None; t.inodes.len()];
        if let Some(p) = paths.first_mut() {
            *p = Some(b"/".to_vec());
        }
        // Directories come before their children in table order (validated), so one pass in
        // index order sees each directory's path before its entries.
        for (i, ino) in t.inodes.iter().enumerate() {
            if ino.kind() != Some(InodeKind::Directory) {
                continue;
            }
            let Some(base) = paths.get(i).cloned().flatten() else {
                continue;
            };
            for d in t.dirents_of(ino).unwrap_or(&[]) {
                let child = d.inode.get() as usize;
                if let Some(slot @ None) = paths.get_mut(child) {
                    let mut p = base.clone();
                    if p.len() > 1 {
                        p.push(b'/');
                    }
                    p.extend_from_slice(t.dirent_name(d).unwrap_or(&[]));
                    *slot = Some(p);
                }
            }
        }
        paths.into_iter().map(Option::unwrap_or_default).collect()
    }

    /// The layout is canonical: tables in a fixed order, each at the first 8-byte boundary after
    /// the previous one, zero padding, nothing after the last. So no byte of a valid bootstrap
    /// is free to carry anything.
    fn validate_layout(&self, sb: &Superblock) -> Result<(), FormatError> {
        let order: [(&str, &TableDesc, &Range<usize>); 7] = [
            ("inodes", &sb.inodes, &self.inodes),
            ("dirents", &sb.dirents, &self.dirents),
            ("chunks", &sb.chunks, &self.chunks),
            ("xattrs", &sb.xattrs, &self.xattrs),
            ("blobs", &sb.blobs, &self.blobs),
            ("prefetch", &sb.prefetch, &self.prefetch),
            ("strings", &sb.strings, &self.strings),
        ];
        let compat = sb.flags.get() & SB_FLAG_NODE_COMPAT != 0;
        let mut end = SUPERBLOCK_SIZE;
        if compat {
            let area = self
                .data
                .get(SUPERBLOCK_SIZE..COMPAT_HEADER_SIZE)
                .ok_or_else(|| FormatError::Invalid("compatibility header truncated".into()))?;
            let at = |o: usize| o - SUPERBLOCK_SIZE;
            let ok = area.iter().enumerate().all(|(i, &b)| {
                let magic = &COMPAT_EROFS_MAGIC.to_le_bytes();
                match i {
                    i if (at(COMPAT_MAGIC_OFFSET)..at(COMPAT_MAGIC_OFFSET) + 4).contains(&i) => {
                        b == magic[i - at(COMPAT_MAGIC_OFFSET)]
                    }
                    i if i == at(COMPAT_BLOCK_BITS_OFFSET) => b == COMPAT_BLOCK_BITS,
                    _ => b == 0,
                }
            });
            if !ok {
                return Err(FormatError::Invalid(
                    "the compatibility header is not exactly the EROFS magic and block size \
                     bits on zeroes"
                        .into(),
                ));
            }
            end = COMPAT_HEADER_SIZE;
        }
        for (name, desc, range) in order {
            let start = end.next_multiple_of(8);
            if desc.offset.get() != start as u64 {
                return Err(FormatError::Invalid(format!(
                    "table {name} at offset {}, expected {start}",
                    desc.offset.get()
                )));
            }
            if self
                .data
                .get(end..start)
                .is_none_or(|pad| pad.iter().any(|&b| b != 0))
            {
                return Err(FormatError::Invalid(format!(
                    "padding before table {name} is not zero"
                )));
            }
            end = range.end;
        }
        let file_end = if compat {
            end.next_multiple_of(COMPAT_HEADER_SIZE)
        } else {
            end
        };
        if file_end != self.data.len()
            || self
                .data
                .get(end..file_end)
                .is_none_or(|pad| pad.iter().any(|&b| b != 0))
        {
            return Err(FormatError::Invalid(format!(
                "{} bytes after the last table, expected {} of zeroes",
                self.data.len().saturating_sub(end),
                file_end - end
            )));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), FormatError> {
        let t = self.tables();
        let n = t.inodes.len();
        if n == 0 {
            return Err(FormatError::Invalid("no inodes".into()));
        }
        if n > u32::MAX as usize {
            return Err(FormatError::Invalid("too many inodes".into()));
        }
        for blob in t.blobs {
            if blob.reserved != [0; 4] || blob.flags.get() & !BLOB_FLAGS_KNOWN != 0 {
                return Err(FormatError::Invalid(format!(
                    "blob {}: unknown flags {:#x} or reserved bytes",
                    digest_hex(&blob.id),
                    blob.flags.get()
                )));
            }
        }
        // References to each inode, counted from directory entries.
        let mut refs = vec![0u32; n];
        let mut subdirs = vec![0u32; n];
        let mut zero_digests: HashMap<(u32, DigestAlgo), [u8; DIGEST_LEN]> = HashMap::new();
        for (i, ino) in t.inodes.iter().enumerate() {
            let err = |what: String| FormatError::BadInode {
                index: i as u64,
                what,
            };
            let kind = ino
                .kind()
                .ok_or_else(|| err(format!("unknown file type in mode {:o}", ino.mode.get())))?;
            if ino.mode.get() & !(libc::S_IFMT | 0o7777) != 0 {
                return Err(err("unknown mode bits".into()));
            }
            if ino.flags.get() != 0 || ino.reserved != [0; 12] {
                return Err(err("reserved fields are not zero".into()));
            }
            if ino.mtime_nsec.get() >= 1_000_000_000 || ino.ctime_nsec.get() >= 1_000_000_000 {
                return Err(err("nanoseconds out of range".into()));
            }
            if i == 0 && (kind != InodeKind::Directory || ino.parent.get() != 0) {
                return Err(err("the root is not a directory with parent 0".into()));
            }
            if kind != InodeKind::Directory && ino.parent.get() != 0 {
                return Err(err("parent set on a non-directory".into()));
            }
            if !matches!(kind, InodeKind::CharDevice | InodeKind::BlockDevice)
                && ino.rdev.get() != 0
            {
                return Err(err("rdev set on a non-device".into()));
            }
            self.validate_xattrs(&t, ino).map_err(err)?;
            match kind {
                InodeKind::Directory => {
                    let entries = t
                        .dirents_of(ino)
                        .ok_or_else(|| err("entry range out of bounds".into()))?;
                    let mut prev: Option<&[u8]> = None;
                    for d in entries {
                        let name = t
                            .dirent_name(d)
                            .ok_or_else(|| err("entry name out of bounds".into()))?;
                        if d.reserved.get() != 0 {
                            return Err(err("reserved entry field is not zero".into()));
                        }
                        if name.is_empty()
                            || name.len() > MAX_NAME_LEN
                            || name == b"."
                            || name == b".."
                            || name.iter().any(|&c| c == b'/' || c == 0)
                        {
                            return Err(err(format!(
                                "invalid entry name {:?}",
                                String::from_utf8_lossy(name)
                            )));
                        }
                        if prev.is_some_and(|p| p >= name) {
                            return Err(err("entries not sorted or duplicated".into()));
                        }
                        prev = Some(name);
                        let child = d.inode.get() as usize;
                        let c = t.inodes.get(child).ok_or_else(|| {
                            err(format!("entry refers to inode {child}, beyond the table"))
                        })?;
                        if child == 0 {
                            return Err(err("entry refers to the root".into()));
                        }
                        if c.kind() == Some(InodeKind::Directory) {
                            // Children after parents rules out cycles and gives a build order.
                            if child <= i || c.parent.get() as usize != i {
                                return Err(err(format!(
                                    "subdirectory {child} misplaced or with wrong parent"
                                )));
                            }
                            if let Some(s) = subdirs.get_mut(i) {
                                *s += 1;
                            }
                        }
                        if let Some(r) = refs.get_mut(child) {
                            *r = r.saturating_add(1);
                        }
                    }
                }
                InodeKind::Regular => {
                    let chunks = t
                        .chunks_of(ino)
                        .ok_or_else(|| err("chunk range out of bounds".into()))?;
                    let size = ino.size.get();
                    let expect = size.div_ceil(u64::from(self.chunk_size));
                    if chunks.len() as u64 != expect {
                        return Err(err(format!(
                            "{} chunks for {size} bytes, expected {expect}",
                            chunks.len()
                        )));
                    }
                    for (ci, c) in chunks.iter().enumerate() {
                        let start = ci as u64 * u64::from(self.chunk_size);
                        let want = (size - start).min(u64::from(self.chunk_size));
                        self.validate_chunk(&t, c, want, &mut zero_digests)
                            .map_err(|w| err(format!("chunk {ci}: {w}")))?;
                    }
                }
                InodeKind::Symlink => {
                    let target = t
                        .symlink_target(ino)
                        .ok_or_else(|| err("symlink target out of bounds".into()))?;
                    if target.is_empty() || target.len() > MAX_SYMLINK_LEN || target.contains(&0) {
                        return Err(err("invalid symlink target".into()));
                    }
                    if ino.size.get() != target.len() as u64 {
                        return Err(err("symlink size differs from its target length".into()));
                    }
                }
                _ => {
                    if ino.data_index.get() != 0 || ino.data_count.get() != 0 || ino.size.get() != 0
                    {
                        return Err(err("special file with data".into()));
                    }
                }
            }
        }
        for (i, ino) in t.inodes.iter().enumerate() {
            let err = |what: String| FormatError::BadInode {
                index: i as u64,
                what,
            };
            let r = refs.get(i).copied().unwrap_or(0);
            if ino.kind() == Some(InodeKind::Directory) {
                if i != 0 && r != 1 {
                    return Err(err(format!("directory referenced {r} times")));
                }
                let want = 2 + subdirs.get(i).copied().unwrap_or(0);
                if ino.nlink.get() != want {
                    return Err(err(format!(
                        "nlink {} but {want} expected",
                        ino.nlink.get()
                    )));
                }
            } else if r == 0 || ino.nlink.get() != r {
                return Err(err(format!("nlink {} but {r} references", ino.nlink.get())));
            }
            let digest = t
                .inode_digest(i)
                .ok_or_else(|| err("unreadable while hashing".into()))?;
            if digest != ino.digest {
                return Err(FormatError::DigestMismatch { index: i as u64 });
            }
        }
        if t.inodes.first().map(|r| r.digest) != Some(self.root_digest) {
            return Err(FormatError::Invalid(
                "root digest differs from the superblock".into(),
            ));
        }
        for p in t.prefetch {
            if p.get() as usize >= n {
                return Err(FormatError::Invalid(format!(
                    "prefetch entry {} beyond the inode table",
                    p.get()
                )));
            }
        }
        Ok(())
    }

    fn validate_xattrs(&self, t: &Tables<'_>, ino: &InodeRecord) -> Result<(), String> {
        let xattrs = t.xattrs_of(ino).ok_or("xattr range out of bounds")?;
        let mut prev: Option<&[u8]> = None;
        for x in xattrs {
            let (name, value) = t.xattr_pair(x).ok_or("xattr out of bounds")?;
            if x.reserved.get() != 0 {
                return Err("reserved xattr field is not zero".into());
            }
            if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN || name.contains(&0) {
                return Err("invalid xattr name".into());
            }
            if value.len() > MAX_XATTR_VALUE_LEN {
                return Err("xattr value too large".into());
            }
            if prev.is_some_and(|p| p >= name) {
                return Err("xattrs not sorted or duplicated".into());
            }
            prev = Some(name);
        }
        Ok(())
    }

    fn validate_chunk(
        &self,
        t: &Tables<'_>,
        c: &ChunkRecord,
        want_len: u64,
        zero_digests: &mut HashMap<(u32, DigestAlgo), [u8; DIGEST_LEN]>,
    ) -> Result<(), String> {
        let flags = c.flags.get();
        if flags & !CHUNK_FLAGS_KNOWN != 0 || c.reserved != [0; 8] {
            return Err("unknown flags or reserved bytes".into());
        }
        if flags & CHUNK_FLAG_LZ4 != 0 && flags & CHUNK_FLAG_ZSTD != 0 {
            return Err("both lz4 and zstd".into());
        }
        let usize_ = c.uncompressed_size.get();
        if u64::from(usize_) != want_len || usize_ == 0 {
            return Err(format!("uncompressed size {usize_}, expected {want_len}"));
        }
        if c.is_zero() {
            if flags & !CHUNK_FLAG_SHA256 != CHUNK_FLAG_ZERO
                || c.blob_index.get() != 0
                || c.compressed_offset.get() != 0
                || c.compressed_size.get() != 0
            {
                return Err("zero chunk with a location".into());
            }
            let algo = c.digest_algo();
            let zero = *zero_digests
                .entry((usize_, algo))
                .or_insert_with(|| algo.digest(&vec![0u8; usize_ as usize]));
            if zero != c.digest {
                return Err("zero chunk whose digest is not that of zeroes".into());
            }
            return Ok(());
        }
        let blob = t
            .blobs
            .get(c.blob_index.get() as usize)
            .ok_or_else(|| format!("blob index {} beyond the blob table", c.blob_index.get()))?;
        let csize = c.compressed_size.get();
        let end = c
            .compressed_offset
            .get()
            .checked_add(u64::from(csize))
            .ok_or("offset overflow")?;
        if end > blob.size.get() {
            return Err(format!(
                "stored range ends at {end}, beyond blob {} of {} bytes",
                digest_hex(&blob.id),
                blob.size.get()
            ));
        }
        let bound = match c.compression() {
            Compression::Lz4Block => {
                Some(lz4_flex::block::get_maximum_output_size(usize_ as usize))
            }
            Compression::Zstd => Some(zstd::zstd_safe::compress_bound(usize_ as usize)),
            Compression::None => None,
        };
        if let Some(bound) = bound {
            if csize == 0 || csize as usize > bound {
                return Err(format!(
                    "compressed size {csize} impossible for {usize_} bytes"
                ));
            }
        } else if csize != usize_ {
            return Err(format!("stored size {csize} differs from size {usize_}"));
        }
        Ok(())
    }
}
