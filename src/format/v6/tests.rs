//! Unit tests of the v6 reader over bootstraps written here, byte by byte, by a small writer of
//! the layout in `layout.rs`: what nydus-image 2.2 cannot write (compact inodes, POSIX ACL
//! xattrs), and hostile bootstraps (cycles, a directory reached twice, nids into the middle of
//! an inode, refused features) that must be refused with a clear error.
//!
//! The integration tests (tests/nydus_v6.rs, tests/nydus_v6_fuzz.rs) read what nydus-image
//! itself writes.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::layout::*;
use super::{transcode, Defaults, V6Error};
use crate::format::{Bootstrap, DigestAlgo, FormatError, InodeKind, SourceFormat};

const CHUNK: u32 = 4096;
const META_BLKADDR: u32 = 2;
const DEFAULTS: Defaults = Defaults {
    uid: 4242,
    gid: 4343,
    now: 1_800_000_000,
};

/// One entry of a test tree.
#[derive(Clone)]
enum Kind {
    Dir(Vec<(Vec<u8>, usize)>),
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Chr(u32),
    Fifo,
}

#[derive(Clone)]
struct Node {
    kind: Kind,
    mode: u16,
    compact: bool,
    xattrs: Vec<(u8, Vec<u8>, Vec<u8>)>,
    mtime: u64,
    mtime_nsec: u32,
}

fn node(kind: Kind, perm: u16) -> Node {
    let t = match kind {
        Kind::Dir(_) => libc::S_IFDIR,
        Kind::File(_) => libc::S_IFREG,
        Kind::Symlink(_) => libc::S_IFLNK,
        Kind::Chr(_) => libc::S_IFCHR,
        Kind::Fifo => libc::S_IFIFO,
    } as u16;
    Node {
        kind,
        mode: t | perm,
        compact: false,
        xattrs: Vec::new(),
        mtime: 1_600_000_000,
        mtime_nsec: 5,
    }
}

/// A tree (node 0 the root) and how to lay it out.
#[derive(Clone)]
struct Tree {
    nodes: Vec<Node>,
    flags: u64,
}

/// A written image: the bootstrap, the blob, and each node's nid.
struct Image {
    boot: Vec<u8>,
    blob: Vec<u8>,
    nids: Vec<u64>,
    /// Byte offset of each node's inode.
    offsets: Vec<usize>,
}

const BLOB_ID: [u8; 64] = *b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn ftype(k: &Kind) -> u8 {
    match k {
        Kind::Dir(_) => 2,
        Kind::File(_) => 1,
        Kind::Symlink(_) => 7,
        Kind::Chr(_) => 3,
        Kind::Fifo => 5,
    }
}

/// Directory blocks of (name, nid, type) sorted by name: dirents then names, 4 KiB each.
fn dir_blocks(entries: &[(Vec<u8>, u64, u8)]) -> Vec<Vec<u8>> {
    let mut blocks = Vec::new();
    let mut cur: Vec<&(Vec<u8>, u64, u8)> = Vec::new();
    let flush = |cur: &mut Vec<&(Vec<u8>, u64, u8)>, blocks: &mut Vec<Vec<u8>>| {
        let mut b = Vec::new();
        let mut nameoff = cur.len() * 12;
        for (name, nid, t) in cur.iter() {
            let mut d = Dirent::new_zeroed();
            d.e_nid = U64::new(*nid);
            d.e_nameoff = U16::new(nameoff as u16);
            d.e_file_type = *t;
            b.extend_from_slice(d.as_bytes());
            nameoff += name.len();
        }
        for (name, _, _) in cur.iter() {
            b.extend_from_slice(name);
        }
        blocks.push(b);
        cur.clear();
    };
    let mut used = 0;
    for e in entries {
        if used + 12 + e.0.len() > 4096 {
            flush(&mut cur, &mut blocks);
            used = 0;
        }
        used += 12 + e.0.len();
        cur.push(e);
    }
    flush(&mut cur, &mut blocks);
    blocks
}

fn xattr_area(x: &[(u8, Vec<u8>, Vec<u8>)]) -> (u16, Vec<u8>) {
    if x.is_empty() {
        return (0, Vec::new());
    }
    let mut a = vec![0u8; 12];
    for (index, suffix, value) in x {
        let mut e = XattrEntry::new_zeroed();
        e.e_name_len = suffix.len() as u8;
        e.e_name_index = *index;
        e.e_value_size = U16::new(value.len() as u16);
        a.extend_from_slice(e.as_bytes());
        a.extend_from_slice(suffix);
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
    }
    (((a.len() - 12) / 4 + 1) as u16, a)
}

impl Tree {
    fn new() -> Self {
        Self {
            nodes: vec![node(Kind::Dir(Vec::new()), 0o755)],
            flags: sb_flags::COMPRESSION_NONE
                | sb_flags::HASH_BLAKE3
                | sb_flags::EXPLICIT_UID_GID
                | sb_flags::HAS_XATTR,
        }
    }

    /// Adds `n` under directory `parent` as `name`; returns its index.
    fn add(&mut self, parent: usize, name: &[u8], n: Node) -> usize {
        let i = self.nodes.len();
        self.nodes.push(n);
        self.link(parent, name, i);
        i
    }

    /// Another name for node `i` in `parent`.
    fn link(&mut self, parent: usize, name: &[u8], i: usize) {
        if let Kind::Dir(e) = &mut self.nodes[parent].kind {
            e.push((name.to_vec(), i));
        }
    }

    /// The parent of each directory (the first directory naming it), the root its own.
    fn parents(&self) -> Vec<usize> {
        let mut p = vec![0; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if let Kind::Dir(e) = &n.kind {
                for (_, c) in e {
                    if matches!(self.nodes[*c].kind, Kind::Dir(_)) && p[*c] == 0 && *c != 0 {
                        p[*c] = i;
                    }
                }
            }
        }
        p
    }

    /// Lays the tree out: every inode on a 32-byte slot, an inline tail never crossing a
    /// block, the chunk table at the end.
    fn write(&self) -> Image {
        let n = self.nodes.len();
        let parents = self.parents();
        // Sizes first (names and contents only), then nids, then bytes.
        let mut chunks: Vec<ChunkInfo> = Vec::new();
        let mut blob = Vec::new();
        let mut file_chunks: Vec<Vec<ChunkAddr>> = vec![Vec::new(); n];
        for (i, nd) in self.nodes.iter().enumerate() {
            if let Kind::File(data) = &nd.kind {
                for piece in data.chunks(CHUNK as usize) {
                    let index = chunks.len() as u32;
                    let mut c = ChunkInfo::new_zeroed();
                    c.block_id = *blake3::hash(piece).as_bytes();
                    c.compressed_offset = U64::new(blob.len() as u64);
                    c.compressed_size = U32::new(piece.len() as u32);
                    c.uncompressed_size = U32::new(piece.len() as u32);
                    c.uncompressed_offset = U64::new(u64::from(index) * 4096);
                    c.index = U32::new(index);
                    blob.extend_from_slice(piece);
                    let mut a = ChunkAddr::new_zeroed();
                    a.c_blob_addr_lo = U16::new(index as u16);
                    a.c_blob_addr_hi = U16::new(1 | ((index >> 16) << 8) as u16);
                    a.c_blk_addr = U32::new(index);
                    file_chunks[i].push(a);
                    chunks.push(c);
                }
            }
        }
        let isize_of = |nd: &Node| if nd.compact { 32 } else { 64 };
        // Body size (inode + xattrs + inline tail or chunk addresses), with the data blocks a
        // directory or symlink needs elsewhere.
        let mut offsets = vec![0usize; n];
        let mut pos = META_BLKADDR as usize * 4096 + 4096; // room: the root at nid 128
        let mut data_blocks: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut bodies: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut layouts = vec![LAYOUT_FLAT_PLAIN; n];
        let mut sizes = vec![0u64; n];
        // Placeholders: a directory's blocks depend on nids; their count does not.
        let name_sets: Vec<Vec<(Vec<u8>, usize, u8)>> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, nd)| match &nd.kind {
                Kind::Dir(e) => {
                    let mut v: Vec<(Vec<u8>, usize, u8)> = e
                        .iter()
                        .map(|(nm, c)| (nm.clone(), *c, ftype(&self.nodes[*c].kind)))
                        .collect();
                    v.push((b".".to_vec(), i, 2));
                    v.push((b"..".to_vec(), parents[i], 2));
                    v.sort();
                    v
                }
                _ => Vec::new(),
            })
            .collect();
        for (i, nd) in self.nodes.iter().enumerate() {
            let (_, xa) = xattr_area(&nd.xattrs);
            let head = isize_of(nd) + xa.len();
            let tail_len = match &nd.kind {
                Kind::Dir(_) => {
                    let probe: Vec<(Vec<u8>, u64, u8)> = name_sets[i]
                        .iter()
                        .map(|(nm, _, t)| (nm.clone(), 0, *t))
                        .collect();
                    let blocks = dir_blocks(&probe);
                    sizes[i] = (blocks.len() as u64 - 1) * 4096
                        + blocks.last().map_or(0, |b| b.len() as u64);
                    blocks.last().map_or(0, Vec::len)
                }
                Kind::Symlink(t) => {
                    sizes[i] = t.len() as u64;
                    t.len()
                }
                Kind::File(d) => {
                    sizes[i] = d.len() as u64;
                    0
                }
                _ => 0,
            };
            let body = if let Kind::File(_) = nd.kind {
                head.next_multiple_of(8) + file_chunks[i].len() * 8
            } else {
                head + tail_len
            };
            // Inline when the tail fits in the inode's block.
            if body > 4096 {
                layouts[i] = LAYOUT_FLAT_PLAIN;
            } else {
                layouts[i] = if matches!(nd.kind, Kind::File(_)) {
                    LAYOUT_CHUNK_BASED
                } else if tail_len > 0 {
                    LAYOUT_FLAT_INLINE
                } else {
                    LAYOUT_FLAT_PLAIN
                };
            }
            let body = if layouts[i] == LAYOUT_FLAT_PLAIN && !matches!(nd.kind, Kind::File(_)) {
                head
            } else {
                body
            };
            pos = pos.next_multiple_of(32);
            if pos / 4096 != (pos + body - 1) / 4096 {
                pos = pos.next_multiple_of(4096);
            }
            offsets[i] = pos;
            bodies[i] = vec![0u8; body];
            pos += body;
        }
        let meta_base = META_BLKADDR as usize * 4096;
        let nids: Vec<u64> = offsets
            .iter()
            .map(|o| ((o - meta_base) / 32) as u64)
            .collect();
        pos = pos.next_multiple_of(4096);
        for (i, nd) in self.nodes.iter().enumerate() {
            let (icount, xa) = xattr_area(&nd.xattrs);
            let hsize = isize_of(nd);
            let mut tail: Vec<u8> = Vec::new();
            let mut i_u = 0u32;
            match &nd.kind {
                Kind::Dir(_) => {
                    let entries: Vec<(Vec<u8>, u64, u8)> = name_sets[i]
                        .iter()
                        .map(|(nm, c, t)| (nm.clone(), nids[*c], *t))
                        .collect();
                    let mut blocks = dir_blocks(&entries);
                    let inline = layouts[i] == LAYOUT_FLAT_INLINE;
                    let last = if inline { blocks.pop() } else { None };
                    i_u = (pos / 4096) as u32;
                    for mut b in blocks {
                        b.resize(4096, 0);
                        data_blocks.push((pos, b));
                        pos += 4096;
                    }
                    if let Some(l) = last {
                        tail = l;
                    }
                }
                Kind::Symlink(t) => {
                    if layouts[i] == LAYOUT_FLAT_INLINE {
                        tail = t.clone();
                    } else {
                        i_u = (pos / 4096) as u32;
                        let mut b = t.clone();
                        b.resize(4096, 0);
                        data_blocks.push((pos, b));
                        pos += 4096;
                    }
                }
                Kind::File(_) => i_u = CHUNK_FORMAT_INDEXES,
                Kind::Chr(rdev) => i_u = *rdev,
                Kind::Fifo => {}
            }
            let format = (layouts[i] << 1) | u16::from(!nd.compact);
            let body = &mut bodies[i];
            if nd.compact {
                let mut c = InodeCompact::new_zeroed();
                c.i_format = U16::new(format);
                c.i_xattr_icount = U16::new(icount);
                c.i_mode = U16::new(nd.mode);
                c.i_nlink = U16::new(1);
                c.i_size = U32::new(sizes[i] as u32);
                c.i_u = U32::new(i_u);
                c.i_uid = U16::new(7);
                c.i_gid = U16::new(8);
                body[..32].copy_from_slice(c.as_bytes());
            } else {
                let mut e = InodeExtended::new_zeroed();
                e.i_format = U16::new(format);
                e.i_xattr_icount = U16::new(icount);
                e.i_mode = U16::new(nd.mode);
                e.i_size = U64::new(sizes[i]);
                e.i_u = U32::new(i_u);
                e.i_uid = U32::new(1000);
                e.i_gid = U32::new(100);
                e.i_mtime = U64::new(if i == 0 { 0 } else { nd.mtime });
                e.i_mtime_nsec = U32::new(nd.mtime_nsec);
                e.i_nlink = U32::new(1);
                body[..64].copy_from_slice(e.as_bytes());
            }
            body[hsize..hsize + xa.len()].copy_from_slice(&xa);
            let after = hsize + xa.len();
            if let Kind::File(_) = nd.kind {
                let at = after.next_multiple_of(8);
                body[at..at + file_chunks[i].len() * 8].copy_from_slice(file_chunks[i].as_bytes());
            } else if !tail.is_empty() {
                body[after..after + tail.len()].copy_from_slice(&tail);
            }
        }
        let ct_off = pos.next_multiple_of(4096);
        let ct = chunks.as_bytes();
        let total = (ct_off + ct.len()).next_multiple_of(4096);
        let mut boot = vec![0u8; total];
        for (i, b) in bodies.iter().enumerate() {
            boot[offsets[i]..offsets[i] + b.len()].copy_from_slice(b);
        }
        for (o, b) in &data_blocks {
            boot[*o..*o + b.len()].copy_from_slice(b);
        }
        boot[ct_off..ct_off + ct.len()].copy_from_slice(ct);
        // Superblocks, device slot, blob table.
        let mut sb = SuperBlock::new_zeroed();
        sb.s_magic = U32::new(EROFS_MAGIC);
        sb.s_feature_compat = U32::new(FEATURE_COMPAT_RAFS_V6);
        sb.s_blkszbits = BLOCK_BITS;
        sb.s_root_nid = U16::new(nids[0] as u16);
        sb.s_inos = U64::new(n as u64);
        sb.s_meta_blkaddr = U32::new(META_BLKADDR);
        sb.s_feature_incompat =
            U32::new(FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE);
        sb.s_extra_devices = U16::new(1);
        sb.s_devt_slotoff = U16::new(DEVT_SLOT_OFFSET);
        boot[1024..1152].copy_from_slice(sb.as_bytes());
        let mut ext = SuperBlockExt::new_zeroed();
        ext.s_flags = U64::new(self.flags);
        ext.s_blob_table_offset = U64::new(4096);
        ext.s_blob_table_size = U32::new(256);
        ext.s_chunk_size = U32::new(CHUNK);
        ext.s_chunk_table_offset = U64::new(ct_off as u64);
        ext.s_chunk_table_size = U64::new(ct.len() as u64);
        boot[1152..1408].copy_from_slice(ext.as_bytes());
        let mut dev = Device::new_zeroed();
        dev.blob_id = BLOB_ID;
        dev.blocks = U32::new(chunks.len() as u32);
        boot[1408..1536].copy_from_slice(dev.as_bytes());
        let mut b = Blob::new_zeroed();
        b.blob_id = BLOB_ID;
        b.chunk_size = U32::new(CHUNK);
        b.chunk_count = U32::new(chunks.len() as u32);
        b.features = U32::new(blob_features::ALIGNED | blob_features::CAP_TAR_TOC);
        b.compressed_size = U64::new(blob.len() as u64);
        b.uncompressed_size = U64::new(chunks.len() as u64 * 4096);
        b.ci_uncompressed_size = U64::new(chunks.len() as u64 * 16);
        boot[4096..4352].copy_from_slice(b.as_bytes());
        Image {
            boot,
            blob,
            nids,
            offsets,
        }
    }
}

fn load(boot: &[u8]) -> Result<Bootstrap, FormatError> {
    Bootstrap::from_bytes_with(boot.to_vec(), DEFAULTS)
}

/// The reason a bootstrap was refused, as an operator reads it.
fn refusal(boot: &[u8]) -> String {
    match load(boot) {
        Ok(_) => panic!("accepted"),
        Err(e) => crate::util::error_chain(&e),
    }
}

/// A tree of every kind: a file of three chunks, a hard link, a symlink, a device, a fifo, a
/// subdirectory.
fn sample() -> Tree {
    let mut t = Tree::new();
    let data: Vec<u8> = (0..3 * CHUNK + 100).map(|i| (i * 7 % 251) as u8).collect();
    let f = t.add(0, b"file", node(Kind::File(data), 0o644));
    t.link(0, b"hardlink", f);
    let d = t.add(0, b"dir", node(Kind::Dir(Vec::new()), 0o750));
    t.link(d, b"link-in-dir", f);
    t.add(d, b"sym", node(Kind::Symlink(b"../file".to_vec()), 0o777));
    t.add(0, b"null", node(Kind::Chr(0x103), 0o666));
    t.add(0, b"fifo", node(Kind::Fifo, 0o600));
    t.add(0, b"empty", node(Kind::File(Vec::new()), 0o644));
    t
}

#[test]
fn a_written_tree_reads_back_in_every_field() {
    let img = sample().write();
    let b = load(&img.boot).expect("loads");
    assert_eq!(b.source_format(), SourceFormat::NydusRafsV6);
    assert!(!b.preserved().directory_sizes && !b.preserved().root_mtime);
    assert!(b.preserved().owners);
    let file = b.lookup(0, b"file").expect("file");
    assert_eq!(b.lookup(0, b"hardlink"), Some(file));
    let dir = b.lookup(0, b"dir").expect("dir");
    assert_eq!(b.lookup(dir, b"link-in-dir"), Some(file));
    let rec = b.inode(file).expect("record");
    assert_eq!(rec.nlink.get(), 3, "links counted in the tree");
    assert_eq!((rec.uid.get(), rec.gid.get()), (1000, 100));
    assert_eq!((rec.mtime.get(), rec.mtime_nsec.get()), (1_600_000_000, 5));
    assert_eq!(rec.ctime.get(), 0, "nydusd reports no ctime");
    assert_eq!(b.file_chunks(file).len(), 4);
    // The root's mtime of 0 is the load time, ctime too, as nydusd reports them.
    let root = b.inode(0).expect("root");
    assert_eq!(
        (root.mtime.get(), root.ctime.get()),
        (DEFAULTS.now, DEFAULTS.now)
    );
    assert_eq!(root.nlink.get(), 3);
    let sym = b.lookup(dir, b"sym").expect("sym");
    assert_eq!(b.symlink_target(sym), Some(&b"../file"[..]));
    let null = b.inode(b.lookup(0, b"null").expect("null")).expect("rec");
    assert_eq!(null.rdev.get(), libc::makedev(1, 3));
    assert_eq!(
        b.inode(b.lookup(0, b"fifo").expect("fifo"))
            .and_then(|r| r.kind()),
        Some(InodeKind::Fifo)
    );
    // Every chunk verifies against the blob with its digest.
    for c in b.file_chunks(file) {
        let o = c.compressed_offset.get() as usize;
        let stored = &img.blob[o..o + c.compressed_size.get() as usize];
        crate::storage::decode_chunk(stored, c).expect("chunk verifies");
        assert_eq!(c.digest_algo(), DigestAlgo::Blake3);
    }
    assert_eq!(b.blobs()[0].id_algo(), DigestAlgo::Sha256);
}

#[test]
fn compact_inodes_acl_xattrs_and_owners_from_the_loader() {
    let mut t = Tree::new();
    t.flags &= !sb_flags::EXPLICIT_UID_GID;
    let mut f = node(Kind::File(b"compact".to_vec()), 0o640);
    f.compact = true;
    f.xattrs = vec![
        (1, b"user.a"[5..].to_vec(), b"1".to_vec()),
        (
            2,
            Vec::new(),
            vec![2, 0, 0, 0, 1, 0, 7, 0, 255, 255, 255, 255],
        ),
        (3, Vec::new(), vec![2, 0, 0, 0]),
        (4, b"t".to_vec(), b"trusted".to_vec()),
        (6, b"capability".to_vec(), vec![1, 2, 3]),
    ];
    let fi = t.add(0, b"f", f);
    let mut dev = node(Kind::Chr(0x103), 0o600);
    dev.compact = true;
    t.add(0, b"dev", dev);
    let img = t.write();
    let b = load(&img.boot).expect("loads");
    let f = b.lookup(0, b"f").expect("f");
    let names: Vec<Vec<u8>> = b.xattrs(f).map(|(n, _)| n.to_vec()).collect();
    assert_eq!(
        names,
        [
            &b"security.capability"[..],
            b"system.posix_acl_access",
            b"system.posix_acl_default",
            b"trusted.t",
            b"user.a",
        ]
    );
    let rec = b.inode(f).expect("rec");
    // Without EXPLICIT_UID_GID the loader's owner is reported, as nydusd does.
    assert_eq!((rec.uid.get(), rec.gid.get()), (DEFAULTS.uid, DEFAULTS.gid));
    assert!(!b.preserved().owners);
    // A compact inode has no mtime: the load time.
    assert_eq!(rec.mtime.get(), DEFAULTS.now);
    assert_eq!(rec.size.get(), 7);
    let d = b.inode(b.lookup(0, b"dev").expect("dev")).expect("rec");
    assert_eq!(d.rdev.get(), libc::makedev(1, 3));
    let _ = fi;
}

#[test]
fn out_of_line_symlinks_and_multi_block_directories() {
    let mut t = Tree::new();
    let target = vec![b'x'; 4095];
    t.add(0, b"long", node(Kind::Symlink(target.clone()), 0o777));
    let wide = t.add(0, b"wide", node(Kind::Dir(Vec::new()), 0o755));
    let mut names = Vec::new();
    for i in 0..700 {
        names.push(format!("entry-{i:04}-with-a-longer-name").into_bytes());
    }
    names.push(b"#before-dot".to_vec());
    names.push(b"-also".to_vec());
    for n in &names {
        t.add(wide, n, node(Kind::File(Vec::new()), 0o644));
    }
    let img = t.write();
    let b = load(&img.boot).expect("loads");
    let l = b.lookup(0, b"long").expect("long");
    assert_eq!(b.symlink_target(l), Some(&target[..]));
    let w = b.lookup(0, b"wide").expect("wide");
    assert_eq!(b.dir_entries(w).len(), names.len());
    for n in &names {
        assert!(b.lookup(w, n).is_some(), "{}", String::from_utf8_lossy(n));
    }
}

#[test]
fn deep_trees_load_without_recursion() {
    let mut t = Tree::new();
    let mut d = 0;
    for _ in 0..3000 {
        d = t.add(d, b"d", node(Kind::Dir(Vec::new()), 0o755));
    }
    let b = load(&t.write().boot).expect("a 3000-level tree loads");
    assert_eq!(b.inode_count(), 3001);
}

/// Overwrites the dirent named `name` in the directory of node `dir` so that it names `nid`.
fn repoint(img: &mut Image, t: &Tree, dir: usize, name: &[u8], nid: u64) {
    // The directory's entries are inline (small test directories) right after the inode.
    let off = img.offsets[dir] + 64 + xattr_area(&t.nodes[dir].xattrs).1.len();
    let first = u16::from_le_bytes([img.boot[off + 8], img.boot[off + 9]]) as usize;
    let count = first / 12;
    let offs: Vec<usize> = (0..count)
        .map(|j| {
            u16::from_le_bytes([img.boot[off + j * 12 + 8], img.boot[off + j * 12 + 9]]) as usize
        })
        .collect();
    for j in 0..count {
        let end = offs.get(j + 1).copied().unwrap_or(offs[j] + name.len());
        if &img.boot[off + offs[j]..off + end] == name {
            img.boot[off + j * 12..off + j * 12 + 8].copy_from_slice(&nid.to_le_bytes());
            return;
        }
    }
    panic!("no entry {}", String::from_utf8_lossy(name));
}

/// A mutation: what it is, what it does, a word the refusal must contain.
type Case<'a, T> = (&'a str, Box<dyn Fn(&mut T) + 'a>, &'a str);

#[test]
fn hostile_trees_are_refused_by_name() {
    let t = sample();
    let base = t.write();
    let dir = 2; // "dir" in sample()
    let cases: Vec<Case<Image>> = vec![
        (
            "a directory naming its ancestor (a cycle)",
            Box::new(|i: &mut Image| {
                let root = i.nids[0];
                repoint(i, &t, dir, b"sym", root)
            }),
            "reached a second time",
        ),
        (
            "a directory hard link",
            Box::new(|i: &mut Image| {
                let d = i.nids[dir];
                repoint(i, &t, 0, b"fifo", d)
            }),
            "reached a second time",
        ),
        (
            "a nid into the middle of an inode",
            Box::new(|i: &mut Image| {
                let mid = i.nids[1] + 1;
                repoint(i, &t, 0, b"empty", mid)
            }),
            "nid",
        ),
        (
            "a nid beyond the file",
            Box::new(|i: &mut Image| repoint(i, &t, 0, b"empty", 1 << 40)),
            "beyond",
        ),
        (
            "\"..\" naming another directory",
            Box::new(|i: &mut Image| {
                let other = i.nids[dir];
                repoint(i, &t, dir, b"..", other)
            }),
            "\"..\"",
        ),
        (
            "an entry type that is not the inode's",
            Box::new(|i: &mut Image| {
                let null = i.nids[4];
                repoint(i, &t, 0, b"fifo", null)
            }),
            "file type",
        ),
    ];
    for (what, mutate, expect) in cases {
        let mut img = Image {
            boot: base.boot.clone(),
            blob: Vec::new(),
            nids: base.nids.clone(),
            offsets: base.offsets.clone(),
        };
        mutate(&mut img);
        let e = refusal(&img.boot);
        eprintln!("{what}: {e}");
        assert!(e.contains(expect), "{what}: {e}");
    }
}

/// Sets bits of a little-endian u32 at `off`.
fn or_u32(b: &mut [u8], off: usize, bits: u32) {
    let v = u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes")) | bits;
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn unsupported_features_are_refused_by_name() {
    let base = sample().write().boot;
    let blob_features_at = 4096 + 84;
    let cases: Vec<Case<Vec<u8>>> = vec![
        (
            "zran (targz-ref)",
            Box::new(move |b: &mut Vec<u8>| {
                or_u32(
                    b,
                    blob_features_at,
                    blob_features::ZRAN | blob_features::CHUNK_INFO_V2,
                )
            }),
            "zran/targz-ref",
        ),
        (
            "batch chunks",
            Box::new(move |b: &mut Vec<u8>| or_u32(b, blob_features_at, blob_features::BATCH)),
            "batch",
        ),
        (
            "encryption",
            Box::new(move |b: &mut Vec<u8>| or_u32(b, blob_features_at, blob_features::ENCRYPTED)),
            "encrypted",
        ),
        (
            "unknown blob features",
            Box::new(move |b: &mut Vec<u8>| or_u32(b, blob_features_at, 0x800)),
            "unknown blob feature",
        ),
        (
            "gzip chunks",
            Box::new(|b: &mut Vec<u8>| b[4096 + 76] = 2),
            "gzip",
        ),
        (
            "a placeholder blob id",
            Box::new(|b: &mut Vec<u8>| {
                b[4096..4096 + 64].fill(b'x');
                b[1408..1408 + 64].fill(b'x');
            }),
            "nydus-image merge",
        ),
        (
            "shared xattrs",
            Box::new(|b: &mut Vec<u8>| or_u32(b, 1024 + 44, 5)),
            "shared xattrs",
        ),
        (
            "unknown superblock flags",
            Box::new(|b: &mut Vec<u8>| or_u32(b, 1152, 0x200)),
            "unknown superblock flags",
        ),
        (
            "unknown incompatible features",
            Box::new(|b: &mut Vec<u8>| or_u32(b, 1024 + 80, 0x10)),
            "incompatible feature",
        ),
        (
            "a checksum",
            Box::new(|b: &mut Vec<u8>| or_u32(b, 1024 + 4, 1)),
            "checksum",
        ),
        (
            "an unaligned size",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 1)),
            "4096-byte blocks",
        ),
    ];
    for (what, mutate, expect) in cases {
        let mut b = base.clone();
        mutate(&mut b);
        let e = refusal(&b);
        eprintln!("{what}: {e}");
        assert!(e.contains(expect), "{what}: {e}");
        assert!(e.contains("Nydus RAFS v6"), "{what}: {e}");
    }
    // What it is about: nothing is wrong with the base.
    load(&base).expect("the base loads");
}

#[test]
fn transcoding_is_deterministic_for_given_stand_ins() {
    let img = sample().write();
    let a = transcode(&img.boot, DEFAULTS).expect("transcodes").0;
    let b = transcode(&img.boot, DEFAULTS).expect("transcodes").0;
    assert_eq!(a, b);
    assert!(matches!(
        transcode(&img.boot[..4096], DEFAULTS),
        Err(V6Error::Superblock(_) | V6Error::Blob { .. } | V6Error::Unaligned(_))
    ));
}

#[test]
fn a_nid_into_an_inode_that_parses_as_one_is_refused_by_the_overlap_check() {
    // The second slot of the file's extended inode holds its mtime and nanoseconds: chosen so
    // that, read as a compact inode, it is a valid fifo (format 0, mode S_IFIFO|0600, nlink 1,
    // size 0).
    let mut t = Tree::new();
    let mut f = node(Kind::File(b"data".to_vec()), 0o644);
    f.mtime = (1u64 << 48) | ((u64::from(libc::S_IFIFO) | 0o600) << 32);
    f.mtime_nsec = 0;
    let fi = t.add(0, b"file", f);
    t.add(0, b"fifo", node(Kind::Fifo, 0o600));
    let mut img = t.write();
    let half = img.nids[fi] + 1;
    repoint(&mut img, &t, 0, b"fifo", half);
    let e = refusal(&img.boot);
    assert!(e.contains("overlaps inode nid"), "{e}");
}

/// Two daemons loading one v6 bootstrap through a share: the second transcodes its own bytes
/// to check, then keeps the first one's sealed tables; another v6 bootstrap is not given them.
#[test]
fn a_v6_bootstrap_is_shared_after_the_taker_transcodes_its_own() {
    use std::os::unix::fs::MetadataExt;
    let ino = |b: &Bootstrap| {
        let fd = b
            .sealed_fd()
            .expect("sealed")
            .try_clone_to_owned()
            .expect("dup");
        std::fs::File::from(fd).metadata().expect("fstat").ino()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = sample().write().boot;
    let first = crate::share::BootstrapShare::open(dir.path()).expect("share");
    let second = crate::share::BootstrapShare::open(dir.path()).expect("share");
    let b1 = crate::share::load_bytes(boot.clone(), Some(&first)).expect("first");
    let b2 = crate::share::load_bytes(boot.clone(), Some(&second)).expect("second");
    assert_eq!(ino(&b1), ino(&b2), "the second maps the first one's tables");
    assert_eq!(b2.source_format(), SourceFormat::NydusRafsV6);
    assert_eq!(b2.preserved(), b1.preserved());
    assert_eq!(b2.file_digest(), b1.file_digest());
    let file = b2.lookup(0, b"file").expect("file");
    assert_eq!(b2.file_chunks(file).len(), 4);
    // Another tree: its own key, its own copy.
    let mut t = sample();
    t.add(0, b"more", node(Kind::File(b"x".to_vec()), 0o644));
    let b3 = crate::share::load_bytes(t.write().boot, Some(&second)).expect("other");
    assert_ne!(ino(&b3), ino(&b1));
    assert!(b3.lookup(0, b"more").is_some());
}
