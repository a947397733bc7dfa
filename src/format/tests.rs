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
