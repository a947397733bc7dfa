//! Target `bootstrap`: both bootstrap parsers through `format::Bootstrap::from_bytes`.
//!
//! The input is a bootstrap file: Skiff's format, or Nydus RAFS v6 (the seeds are images built
//! by `skiff build` and by `nydus-image create`). An input with Skiff's magic is first
//! *sealed* as a crafted image's author would: every inode's Merkle digest, the root digest and
//! the file digest are recomputed over the mutated tables, so that the mutation meets the
//! structural validation instead of stopping at the first digest (an attacker who writes a
//! bootstrap can compute its digests; accidental damage is what the digests are for, and
//! `tests/bootstrap_fuzz.rs` covers that). v6 bootstraps carry no digests over their metadata.
//!
//! A rejected input must give an error that renders; an accepted one is walked through the
//! whole public model (`Bootstrap`'s accessors, `check::image_stats`) and then read through the
//! filesystem layer over the seeds' blobs (`serve::serve_all`): no panic, and no byte served
//! under a wrong digest, whatever the bootstrap's chunk records point at.

use std::sync::Arc;

use skiff::format::v6::Defaults;
use skiff::format::{
    BlobRecord, Bootstrap, ChunkRecord, DirentRecord, InodeKind, InodeRecord, Superblock,
    TableDesc, Tables, XattrRecord, MAGIC, SUPERBLOCK_SIZE,
};
use zerocopy::{FromBytes, IntoBytes};

use super::mem::MemBlobs;
use super::serve::{self, Limits};
use super::Outcome;

/// What every iteration shares: the blobs of the seed images.
pub struct Fixture {
    blobs: Arc<MemBlobs>,
}

impl Fixture {
    /// Loads the seed images' blobs (`fuzz/seeds/blobs`).
    pub fn load() -> Self {
        let dir = super::seeds_dir().join("blobs");
        let blobs = MemBlobs::load_dir(&dir)
            .unwrap_or_else(|e| panic!("loading the seed blobs from {}: {e}", dir.display()));
        assert!(!blobs.is_empty(), "no seed blobs in {}", dir.display());
        Self {
            blobs: Arc::new(blobs),
        }
    }
}

/// The stand-ins for what a v6 image lacks, fixed so that every run gives the same outcome.
const DEFAULTS: Defaults = Defaults {
    uid: 0,
    gid: 0,
    now: 1_700_000_000,
};

/// One iteration: see the module doc.
pub fn run(fixture: &Fixture, data: &[u8]) -> Outcome {
    let mut bytes = data.to_vec();
    if bytes.starts_with(&MAGIC) {
        seal(&mut bytes);
    }
    let b = match Bootstrap::from_bytes_with(bytes, DEFAULTS) {
        Ok(b) => b,
        Err(e) => {
            let _ = super::render(&e);
            return Outcome::Rejected;
        }
    };
    walk_model(&b);
    let fs = serve::filesystem(Arc::new(b), fixture.blobs.clone());
    Outcome::Served(super::served_bytes(&serve::serve_all(
        &fs,
        Limits::default(),
    )))
}

/// Whether `data` loads, once sealed: for the smoke test's check that the seeds still load.
pub fn loads(data: &[u8]) -> Result<(), String> {
    let mut bytes = data.to_vec();
    if bytes.starts_with(&MAGIC) {
        seal(&mut bytes);
    }
    Bootstrap::from_bytes_with(bytes, DEFAULTS)
        .map(drop)
        .map_err(|e| super::render(&e))
}

/// Every accessor of the model, over every index the tables have (and some they do not).
fn walk_model(b: &Bootstrap) {
    let n = b.inode_count() as u32;
    for i in 0..n.saturating_add(2) {
        let _ = b.inode(i);
        for d in b.dir_entries(i) {
            let name = b.entry_name(d);
            assert_eq!(
                b.lookup(i, name),
                Some(d.inode.get()),
                "lookup of a listed name of directory {i}"
            );
        }
        let _ = b.file_chunks(i);
        let _ = b.symlink_target(i);
        for (name, value) in b.xattrs(i) {
            assert_eq!(b.xattr(i, name), Some(value), "xattr lookup of inode {i}");
        }
    }
    let paths = b.paths();
    assert_eq!(paths.len(), b.inode_count(), "one path per inode");
    let _ = b.blobs();
    assert!(
        b.prefetch().all(|p| p < n),
        "prefetch entry beyond the table"
    );
    let _ = skiff::check::image_stats(b);
    let _ = (
        b.source_format(),
        b.preserved(),
        b.chunk_size(),
        b.byte_len(),
    );
}

/// A table of `T` at `desc`, copied out of `data`, when it lies inside.
fn table<T: FromBytes + zerocopy::Immutable + zerocopy::KnownLayout + Copy>(
    data: &[u8],
    desc: &TableDesc,
) -> Option<Vec<T>> {
    let start = usize::try_from(desc.offset.get()).ok()?;
    let len = usize::try_from(desc.count.get())
        .ok()?
        .checked_mul(size_of::<T>())?;
    let bytes = data.get(start..start.checked_add(len)?)?;
    Some(<[T]>::ref_from_bytes(bytes).ok()?.to_vec())
}

/// Recomputes the Merkle digests (every non-directory, then directories from the last, so that
/// each directory sees its children's new digests), the root digest and the file digest of a
/// Skiff bootstrap, as far as its tables can be found.
pub fn seal(data: &mut [u8]) {
    let Ok((mut sb, _)) = Superblock::read_from_prefix(data) else {
        return;
    };
    let tables = (
        table::<InodeRecord>(data, &sb.inodes),
        table::<DirentRecord>(data, &sb.dirents),
        table::<ChunkRecord>(data, &sb.chunks),
        table::<XattrRecord>(data, &sb.xattrs),
        table::<BlobRecord>(data, &sb.blobs),
        table::<u8>(data, &sb.strings),
        table::<zerocopy::little_endian::U32>(data, &sb.prefetch),
    );
    if let (
        Some(mut inodes),
        Some(dirents),
        Some(chunks),
        Some(xattrs),
        Some(blobs),
        Some(strings),
        Some(prefetch),
    ) = tables
    {
        let is_dir = |r: &InodeRecord| r.kind() == Some(InodeKind::Directory);
        let order: Vec<usize> = (0..inodes.len())
            .filter(|&i| !is_dir(&inodes[i]))
            .chain((0..inodes.len()).rev().filter(|&i| is_dir(&inodes[i])))
            .collect();
        for i in order {
            let t = Tables {
                inodes: &inodes,
                dirents: &dirents,
                chunks: &chunks,
                xattrs: &xattrs,
                blobs: &blobs,
                strings: &strings,
                prefetch: &prefetch,
            };
            if let Some(d) = t.inode_digest(i) {
                inodes[i].digest = d;
            }
        }
        let start = sb.inodes.offset.get() as usize;
        let raw = inodes.as_bytes();
        data[start..start + raw.len()].copy_from_slice(raw);
        if let Some(root) = inodes.first() {
            sb.root_digest = root.digest;
        }
    }
    sb.file_digest = [0; 32];
    let mut h = blake3::Hasher::new();
    h.update(sb.as_bytes());
    h.update(&data[SUPERBLOCK_SIZE..]);
    sb.file_digest = *h.finalize().as_bytes();
    data[..SUPERBLOCK_SIZE].copy_from_slice(sb.as_bytes());
}
