//! Round trips and crafted bootstraps: the writer's output loads, and each rule of the spec is
//! enforced even when the file digest has been recomputed by an attacker.

use zerocopy::little_endian::{U32, U64};
use zerocopy::FromBytes;

use super::*;

const DIR: u32 = libc::S_IFDIR | 0o755;
const REG: u32 = libc::S_IFREG | 0o644;

fn inode(mode: u32) -> InodeRecord {
    let mut r = InodeRecord::zeroed();
    r.mode = U32::new(mode);
    r
}

/// A root with a subdirectory "d" holding a symlink "l", and an empty file "f" linked twice.
fn sample() -> BootstrapWriter {
    let mut w = BootstrapWriter::default();
    let mut root = inode(DIR);
    root.nlink = U32::new(3);
    root.data_index = U64::new(0);
    root.data_count = U32::new(3);
    w.add_dirent(b"d", 1);
    w.add_dirent(b"f", 2);
    w.add_dirent(b"g", 2);
    let mut d = inode(DIR);
    d.nlink = U32::new(2);
    d.data_index = U64::new(3);
    d.data_count = U32::new(1);
    w.add_dirent(b"l", 3);
    let mut f = inode(REG);
    f.nlink = U32::new(2);
    let mut l = inode(libc::S_IFLNK | 0o777);
    l.nlink = U32::new(1);
    l.data_index = U64::new(w.add_string(b"../f"));
    l.data_count = U32::new(4);
    l.size = U64::new(4);
    l.xattr_index = U32::new(0);
    l.xattr_count = U32::new(1);
    w.add_xattr(b"user.a", b"");
    w.inodes = vec![root, d, f, l];
    w
}

/// Recomputes the file digest, as someone crafting a hostile bootstrap would.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes[168..200].fill(0);
    let d = blake3::hash(&bytes);
    bytes[168..200].copy_from_slice(d.as_bytes());
    bytes
}

#[test]
fn round_trip() {
    let bytes = sample().finish(DEFAULT_CHUNK_SIZE).expect("writes");
    let b = Bootstrap::from_bytes(bytes).expect("loads");
    assert_eq!(b.inode_count(), 4);
    assert_eq!(b.lookup(0, b"d"), Some(1));
    assert_eq!(b.lookup(0, b"g"), Some(2));
    assert_eq!(b.lookup(0, b"zz"), None);
    assert_eq!(b.symlink_target(3), Some(&b"../f"[..]));
    assert_eq!(b.xattr(3, b"user.a"), Some(&b""[..]));
    assert_eq!(b.paths()[3], b"/d/l".to_vec());
}

#[test]
fn same_input_same_bytes() {
    let a = sample().finish(DEFAULT_CHUNK_SIZE).expect("writes");
    let b = sample().finish(DEFAULT_CHUNK_SIZE).expect("writes");
    assert_eq!(a, b);
}

fn rejects(mutate: impl FnOnce(&mut BootstrapWriter), what: &str) {
    let mut w = sample();
    mutate(&mut w);
    // The writer computes honest digests over the broken tables, so only structure is wrong;
    // where the tables cannot even be hashed, the writer refuses them itself.
    let Ok(bytes) = w.finish(DEFAULT_CHUNK_SIZE) else {
        return;
    };
    let err = Bootstrap::from_bytes(bytes).expect_err(what);
    assert!(!err.to_string().is_empty());
}

#[test]
fn structural_rules() {
    rejects(|w| w.inodes[2].nlink = U32::new(1), "wrong nlink");
    rejects(|w| w.inodes[0].nlink = U32::new(2), "wrong directory nlink");
    rejects(|w| w.dirents.swap(1, 2), "unsorted entries");
    rejects(
        |w| w.dirents[3].inode = U32::new(0),
        "entry naming the root",
    );
    rejects(
        |w| w.dirents[3].inode = U32::new(9),
        "entry beyond the table",
    );
    rejects(|w| w.inodes[1].parent = U32::new(1), "wrong parent");
    rejects(
        |w| w.inodes[3].data_count = U32::new(4000),
        "target out of bounds",
    );
    rejects(|w| w.inodes[3].size = U64::new(3), "symlink size");
    rejects(|w| w.inodes[2].size = U64::new(1), "file without chunks");
    rejects(|w| w.inodes[2].mode = U32::new(0o644), "no file type");
    rejects(
        |w| w.inodes[2].mtime_nsec = U32::new(1_000_000_000),
        "nanoseconds",
    );
    rejects(|w| w.inodes[2].rdev = U64::new(5), "rdev on a file");
    rejects(|w| w.inodes[0].mode = U32::new(REG), "root not a directory");
    rejects(|w| w.xattrs[0].name_len = 0.into(), "empty xattr name");
    rejects(
        |w| {
            // A cycle: "d" contains itself.
            w.dirents[3].inode = U32::new(1);
        },
        "directory containing itself",
    );
}

#[test]
fn merkle_mismatch_is_found() {
    let bytes = sample().finish(DEFAULT_CHUNK_SIZE).expect("writes");
    let (sb, _) = Superblock::read_from_prefix(&bytes).expect("superblock");
    let off = sb.inodes.offset.get() as usize + 2 * 128 + 36; // uid of inode 2
    let mut bad = bytes.clone();
    bad[off] ^= 1;
    assert!(matches!(
        Bootstrap::from_bytes(bad.clone()),
        Err(FormatError::FileDigestMismatch)
    ));
    assert!(matches!(
        Bootstrap::from_bytes(reseal(bad)),
        Err(FormatError::DigestMismatch { index: 2 })
    ));
}

#[test]
fn truncation_is_refused() {
    let bytes = sample().finish(DEFAULT_CHUNK_SIZE).expect("writes");
    for len in [0, 8, 255, 256, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            Bootstrap::from_bytes(bytes[..len].to_vec()).is_err(),
            "length {len}"
        );
        if len >= SUPERBLOCK_SIZE {
            assert!(
                Bootstrap::from_bytes(reseal(bytes[..len].to_vec())).is_err(),
                "resealed {len}"
            );
        }
    }
}

/// The sample with a file "f" of one chunk in one blob, stored with `flags`.
fn with_chunk(flags: u32, stored: &[u8], data: &[u8], blob_flags: u32) -> BootstrapWriter {
    let mut w = sample();
    w.inodes[2].size = U64::new(data.len() as u64);
    w.inodes[2].data_index = U64::new(0);
    w.inodes[2].data_count = U32::new(1);
    let mut c = <ChunkRecord as zerocopy::FromZeros>::new_zeroed();
    c.flags = U32::new(flags);
    c.digest = c.digest_algo().digest(data);
    c.compressed_size = U32::new(stored.len() as u32);
    c.uncompressed_size = U32::new(data.len() as u32);
    w.chunks.push(c);
    let mut b = <BlobRecord as zerocopy::FromZeros>::new_zeroed();
    b.size = U64::new(stored.len() as u64);
    b.flags = U32::new(blob_flags);
    w.blobs.push(b);
    w
}

#[test]
fn zstd_and_sha256_chunks_and_sha256_blob_ids_load() {
    let data = vec![3u8; 5000];
    let z = zstd::bulk::compress(&data, 3).expect("zstd");
    for flags in [
        CHUNK_FLAG_ZSTD,
        CHUNK_FLAG_ZSTD | CHUNK_FLAG_SHA256,
        CHUNK_FLAG_SHA256,
    ] {
        let stored = if flags & CHUNK_FLAG_ZSTD != 0 {
            &z[..]
        } else {
            &data[..]
        };
        let bytes = with_chunk(flags, stored, &data, BLOB_FLAG_SHA256_ID)
            .finish(DEFAULT_CHUNK_SIZE)
            .expect("writes");
        let b = Bootstrap::from_bytes(bytes).expect("loads");
        assert_eq!(b.source_format(), SourceFormat::Skiff);
        let c = b.file_chunks(2)[0];
        assert_eq!(c.flags.get(), flags);
        assert_eq!(b.blobs()[0].id_algo(), DigestAlgo::Sha256);
    }
    // Both compressions at once, unknown chunk or blob flags, a zstd "frame" bigger than zstd
    // can ever make for the size: refused.
    for (flags, blob_flags, stored) in [
        (CHUNK_FLAG_ZSTD | CHUNK_FLAG_LZ4, 0, &z[..]),
        (0x40, 0, &data[..]),
        (CHUNK_FLAG_ZSTD, 2, &z[..]),
        (CHUNK_FLAG_ZSTD, 0, &[0u8; 6000][..]),
    ] {
        let bytes = with_chunk(flags, stored, &data, blob_flags)
            .finish(DEFAULT_CHUNK_SIZE)
            .expect("writes");
        assert!(
            Bootstrap::from_bytes(bytes).is_err(),
            "flags {flags:#x} blob flags {blob_flags:#x}"
        );
    }
}

#[test]
fn the_magic_chooses_the_format_and_rafs_v5_is_named() {
    let mut v5 = vec![0u8; 8192];
    v5[..4].copy_from_slice(&0x5241_4653u32.to_le_bytes());
    let e = Bootstrap::from_bytes(v5).expect_err("v5");
    assert!(matches!(e, FormatError::RafsV5), "{e}");
    assert!(e.to_string().contains("RAFS v5"));
    assert!(matches!(
        Bootstrap::from_bytes(vec![7u8; 8192]),
        Err(FormatError::BadMagic)
    ));
    // The EROFS magic alone leads to the v6 reader, which refuses the rest with its reason.
    let mut v6 = vec![0u8; 8192];
    v6[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
    let e = Bootstrap::from_bytes(v6).expect_err("not a whole v6 image");
    assert!(matches!(e, FormatError::V6(_)), "{e}");
}

/// nydus-snapshotter's checks of a bootstrap's head (`pkg/layout` `DetectFsVersion` and the
/// readiness check of `pkg/filesystem/bootstrap.go`), restated: RAFS v5 magic and version at
/// 0, or the EROFS magic at 1024 with block size bits 9 or 12 at 1036 and a size that is a
/// multiple of the block size.
fn snapshotter_accepts(file: &[u8]) -> bool {
    let head = &file[..file.len().min(8192)];
    let le32 = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    if head.len() >= 8 && le32(0) == 0x5241_4653 && le32(4) == 0x500 {
        return true;
    }
    if head.len() < 1024 + 128 + 256 || le32(1024) != 0xE0F5_E1E2 {
        return false;
    }
    let block = match head[1024 + 12] {
        9 => 512,
        12 => 4096,
        _ => return false,
    };
    file.len().is_multiple_of(block)
}

#[test]
fn the_node_compatibility_header_passes_the_snapshotters_checks_and_changes_nothing_else() {
    let plain = sample().finish(DEFAULT_CHUNK_SIZE).expect("writes");
    let compat = sample()
        .finish_with(DEFAULT_CHUNK_SIZE, true)
        .expect("writes");
    assert!(!snapshotter_accepts(&plain));
    assert!(snapshotter_accepts(&compat));
    assert_eq!(compat.len() % COMPAT_HEADER_SIZE, 0);
    let (a, b) = (
        Bootstrap::from_bytes(plain).expect("plain"),
        Bootstrap::from_bytes(compat.clone()).expect("compat"),
    );
    assert!(!a.node_compat() && b.node_compat());
    assert_eq!(a.root_digest(), b.root_digest(), "same tree, same identity");
    assert_eq!(b.lookup(0, b"d"), Some(1));
    // No byte of the header or the padding is free: each change is refused.
    for at in [
        300,
        COMPAT_MAGIC_OFFSET,
        COMPAT_BLOCK_BITS_OFFSET,
        2000,
        compat.len() - 1,
    ] {
        let mut m = compat.clone();
        m[at] ^= 0x40;
        assert!(Bootstrap::from_bytes(reseal(m)).is_err(), "byte {at}");
    }
    let mut short = compat.clone();
    short.truncate(compat.len() - 8);
    assert!(Bootstrap::from_bytes(reseal(short)).is_err());
    let mut long = compat;
    long.extend_from_slice(&[0; COMPAT_HEADER_SIZE]);
    assert!(Bootstrap::from_bytes(reseal(long)).is_err());
}
