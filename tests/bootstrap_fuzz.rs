//! `Bootstrap::from_bytes` against damaged and crafted bootstraps.
//!
//! A real bootstrap (a small special tree: every kind of inode, xattrs, hard links, zero, raw
//! and lz4 chunks) is mutated by bit flips, truncations and random overwrites:
//! - as is, the whole-file digest must reject every mutation, and nothing may panic;
//! - "crafted": after the mutation the file digest is recomputed (re-sealed), so only the
//!   structural validation stands in the way. Each such mutation must be rejected, or give a
//!   bootstrap that walks through the public API without panicking and whose Merkle-covered
//!   content (every path, inode field, xattr, symlink target, chunk digest and size, hard-link
//!   grouping, root digest) is exactly the original's. Accepted mutations are reported by the
//!   field they hit; one that changes Merkle-covered content fails the test.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use skiff::format::{digest_hex, Bootstrap, InodeKind, SUPERBLOCK_SIZE};

use common::*;

/// Where the file digest lives in the superblock.
const FILE_DIGEST: std::ops::Range<usize> = 168..200;

/// Recomputes the file digest: blake3 of the whole file with the digest field zeroed.
fn reseal(buf: &mut [u8]) {
    if buf.len() < SUPERBLOCK_SIZE {
        return;
    }
    buf[FILE_DIGEST].fill(0);
    let d = blake3::hash(buf);
    buf[FILE_DIGEST].copy_from_slice(d.as_bytes());
}

/// The base bootstrap: the special tree at a small size, 64 KiB chunks.
fn base_bootstrap() -> Option<Vec<u8>> {
    // mknod, lchown and trusted.* xattrs need root.
    require(
        "root (to make the special tree)",
        if is_root() {
            Ok(())
        } else {
            Err("not root".to_string())
        },
    )?;
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_special_tree_sized(&src, 12, 4);
    let bootstrap = tmp.path().join("bootstrap");
    build_image(
        &src,
        &bootstrap,
        &tmp.path().join("blobs"),
        &[OsStr::new("--chunk-size"), OsStr::new("64K")],
    );
    Some(std::fs::read(&bootstrap).expect("reading the bootstrap"))
}

// ---------------------------------------------------------------------------------------------
// What a bootstrap says, through the public API
// ---------------------------------------------------------------------------------------------

/// The Merkle-covered content of one path.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Entry {
    digest: String,
    fields: [i128; 11],
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    target: Option<Vec<u8>>,
    chunks: Vec<(String, u32)>,
    /// The first path (in walk order) naming the same inode: hard-link grouping.
    link_of: Vec<u8>,
}

/// Per file: (path, per chunk (blob id or "zero", flags, offset, stored size)).
type ChunkLocations = Vec<(Vec<u8>, Vec<(String, u32, u64, u32)>)>;

/// A table of the bootstrap: (record name, offset, count, record size, field layout).
type TableMap = (
    &'static str,
    usize,
    usize,
    usize,
    &'static [(usize, usize, &'static str)],
);

/// Where content is stored and other things outside the Merkle tree.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Layout {
    chunks: ChunkLocations,
    blobs: Vec<(String, u64)>,
    prefetch: Vec<u32>,
    parents: Vec<(Vec<u8>, u32)>,
    inode_of: Vec<(Vec<u8>, u32)>,
    chunk_size: u32,
}

#[derive(Debug, PartialEq, Eq, Clone)]
struct View {
    root_digest: String,
    entries: BTreeMap<Vec<u8>, Entry>,
    layout: Layout,
}

/// Walks the whole tree through the public API (lookup of every name, entries, chunks, xattrs,
/// symlink targets, paths, stats). Panics are the caller's to catch.
fn walk(b: &Bootstrap) -> View {
    let mut entries = BTreeMap::new();
    let mut layout = Layout {
        chunks: Vec::new(),
        blobs: b
            .blobs()
            .iter()
            .map(|r| (digest_hex(&r.id), r.size.get()))
            .collect(),
        prefetch: b.prefetch().collect(),
        parents: Vec::new(),
        inode_of: Vec::new(),
        chunk_size: b.chunk_size(),
    };
    let mut first_path: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut stack: Vec<(Vec<u8>, u32)> = vec![(b"/".to_vec(), 0)];
    let mut visited = 0usize;
    while let Some((path, ino)) = stack.pop() {
        visited += 1;
        assert!(
            visited <= b.inode_count() * 4 + 16,
            "walk does not terminate (cycle?)"
        );
        let rec = b.inode(ino).expect("entry names an inode beyond the table");
        let kind = rec.kind().expect("validated inode of unknown kind");
        let link_of = first_path
            .entry(ino)
            .or_insert_with(|| path.clone())
            .clone();
        let chunks = b.file_chunks(ino);
        let xattrs: Vec<(Vec<u8>, Vec<u8>)> = b
            .xattrs(ino)
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        for (n, v) in &xattrs {
            assert_eq!(b.xattr(ino, n), Some(v.as_slice()), "xattr lookup by name");
        }
        let e = Entry {
            digest: digest_hex(&rec.digest),
            fields: [
                rec.mode.get().into(),
                rec.uid.get().into(),
                rec.gid.get().into(),
                rec.nlink.get().into(),
                rec.size.get().into(),
                rec.rdev.get().into(),
                rec.mtime.get().into(),
                rec.mtime_nsec.get().into(),
                rec.ctime.get().into(),
                rec.ctime_nsec.get().into(),
                rec.flags.get().into(),
            ],
            xattrs,
            target: b.symlink_target(ino).map(<[u8]>::to_vec),
            chunks: chunks
                .iter()
                .map(|c| (digest_hex(&c.digest), c.uncompressed_size.get()))
                .collect(),
            link_of,
        };
        layout.inode_of.push((path.clone(), ino));
        if kind == InodeKind::Regular {
            let locs = chunks
                .iter()
                .map(|c| {
                    let blob = if c.is_zero() {
                        "zero".to_string()
                    } else {
                        b.blobs()
                            .get(c.blob_index.get() as usize)
                            .map(|r| digest_hex(&r.id))
                            .expect("blob index")
                    };
                    (
                        blob,
                        c.flags.get(),
                        c.compressed_offset.get(),
                        c.compressed_size.get(),
                    )
                })
                .collect();
            layout.chunks.push((path.clone(), locs));
        }
        if kind == InodeKind::Directory {
            layout.parents.push((path.clone(), rec.parent.get()));
            for d in b.dir_entries(ino) {
                let name = b.entry_name(d);
                assert_eq!(
                    b.lookup(ino, name),
                    Some(d.inode.get()),
                    "lookup of a listed name"
                );
                let mut child = path.clone();
                if child.len() > 1 {
                    child.push(b'/');
                }
                child.extend_from_slice(name);
                stack.push((child, d.inode.get()));
            }
            assert_eq!(b.lookup(ino, b"no such name, surely"), None);
        }
        entries.insert(path, e);
    }
    // Everything else the public API offers, for panics.
    let paths = b.paths();
    assert_eq!(paths.len(), b.inode_count());
    let _ = skiff::check::image_stats(b);
    let _ = b.inode(u32::MAX);
    View {
        root_digest: digest_hex(b.root_digest()),
        entries,
        layout,
    }
}

// ---------------------------------------------------------------------------------------------
// Naming the bytes of a bootstrap
// ---------------------------------------------------------------------------------------------

fn u64_at(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(buf[off..off + 8].try_into().expect("8 bytes"))
}

fn field_in(fields: &[(usize, usize, &'static str)], rel: usize) -> &'static str {
    fields
        .iter()
        .find(|(s, e, _)| (*s..*e).contains(&rel))
        .map(|f| f.2)
        .unwrap_or("?")
}

const SUPERBLOCK_FIELDS: &[(usize, usize, &str)] = &[
    (0, 8, "magic"),
    (8, 12, "version"),
    (12, 16, "flags"),
    (16, 20, "chunk_size"),
    (20, 24, "reserved0"),
    (24, 32, "inodes.offset"),
    (32, 40, "inodes.count"),
    (40, 48, "dirents.offset"),
    (48, 56, "dirents.count"),
    (56, 64, "chunks.offset"),
    (64, 72, "chunks.count"),
    (72, 80, "xattrs.offset"),
    (80, 88, "xattrs.count"),
    (88, 96, "blobs.offset"),
    (96, 104, "blobs.count"),
    (104, 112, "strings.offset"),
    (112, 120, "strings.count"),
    (120, 128, "prefetch.offset"),
    (128, 136, "prefetch.count"),
    (136, 168, "root_digest"),
    (168, 200, "file_digest"),
    (200, 256, "reserved"),
];
const INODE_FIELDS: &[(usize, usize, &str)] = &[
    (0, 32, "digest"),
    (32, 36, "mode"),
    (36, 40, "uid"),
    (40, 44, "gid"),
    (44, 48, "nlink"),
    (48, 56, "size"),
    (56, 64, "rdev"),
    (64, 72, "mtime"),
    (72, 80, "ctime"),
    (80, 84, "mtime_nsec"),
    (84, 88, "ctime_nsec"),
    (88, 92, "parent"),
    (92, 96, "flags"),
    (96, 104, "data_index"),
    (104, 108, "data_count"),
    (108, 112, "xattr_index"),
    (112, 116, "xattr_count"),
    (116, 128, "reserved"),
];
const DIRENT_FIELDS: &[(usize, usize, &str)] = &[
    (0, 8, "name_offset"),
    (8, 10, "name_len"),
    (10, 12, "reserved"),
    (12, 16, "inode"),
];
const CHUNK_FIELDS: &[(usize, usize, &str)] = &[
    (0, 32, "digest"),
    (32, 36, "blob_index"),
    (36, 40, "flags"),
    (40, 48, "compressed_offset"),
    (48, 52, "compressed_size"),
    (52, 56, "uncompressed_size"),
    (56, 64, "reserved"),
];
const XATTR_FIELDS: &[(usize, usize, &str)] = &[
    (0, 8, "name_offset"),
    (8, 16, "value_offset"),
    (16, 18, "name_len"),
    (18, 20, "reserved"),
    (20, 24, "value_len"),
];
const BLOB_FIELDS: &[(usize, usize, &str)] =
    &[(0, 32, "id"), (32, 40, "size"), (40, 48, "reserved")];

/// Names every byte of the original bootstrap: superblock field, table record and field, the
/// string-heap use, or padding.
struct FieldMap {
    tables: Vec<TableMap>,
    strings: (usize, usize),
    heap_use: Vec<Option<(&'static str, usize)>>,
}

impl FieldMap {
    fn new(buf: &[u8], b: &Bootstrap) -> Self {
        let desc = |i: usize| {
            (
                u64_at(buf, 24 + 16 * i) as usize,
                u64_at(buf, 32 + 16 * i) as usize,
            )
        };
        let mut tables = Vec::new();
        for (i, (name, size, fields)) in [
            ("inode", 128, INODE_FIELDS),
            ("dirent", 16, DIRENT_FIELDS),
            ("chunk", 64, CHUNK_FIELDS),
            ("xattr", 24, XATTR_FIELDS),
            ("blob", 48, BLOB_FIELDS),
        ]
        .into_iter()
        .enumerate()
        {
            let (off, count) = desc(i);
            tables.push((name, off, count, size, fields));
        }
        let (poff, pcount) = desc(6);
        tables.push(("prefetch", poff, pcount, 4, &[(0, 4, "inode index")]));
        let strings = desc(5);
        let mut heap_use = vec![None; strings.1];
        let t = b.tables();
        let mut mark = |off: u64, len: usize, what: &'static str, index: usize| {
            for k in off as usize..off as usize + len {
                if let Some(slot) = heap_use.get_mut(k) {
                    *slot = Some((what, index));
                }
            }
        };
        for (j, d) in t.dirents.iter().enumerate() {
            mark(
                d.name_offset.get(),
                d.name_len.get().into(),
                "name of dirent",
                j,
            );
        }
        for (j, x) in t.xattrs.iter().enumerate() {
            mark(
                x.name_offset.get(),
                x.name_len.get().into(),
                "name of xattr",
                j,
            );
            mark(
                x.value_offset.get(),
                x.value_len.get() as usize,
                "value of xattr",
                j,
            );
        }
        for (i, ino) in t.inodes.iter().enumerate() {
            if ino.kind() == Some(InodeKind::Symlink) {
                mark(
                    ino.data_index.get(),
                    ino.data_count.get() as usize,
                    "target of symlink inode",
                    i,
                );
            }
        }
        FieldMap {
            tables,
            strings,
            heap_use,
        }
    }

    /// (the byte's precise name, its kind for counting: the same without record numbers).
    fn describe(&self, off: usize) -> (String, String) {
        if off < SUPERBLOCK_SIZE {
            let f = format!("superblock.{}", field_in(SUPERBLOCK_FIELDS, off));
            return (f.clone(), f);
        }
        for &(name, start, count, size, fields) in &self.tables {
            if (start..start + count * size).contains(&off) {
                let rel = off - start;
                let f = field_in(fields, rel % size);
                return (format!("{name}[{}].{f}", rel / size), format!("{name}.{f}"));
            }
        }
        let (s, n) = self.strings;
        if (s..s + n).contains(&off) {
            return match &self.heap_use[off - s] {
                Some((w, i)) => (
                    format!("string heap ({w} {i})"),
                    format!("string heap ({w})"),
                ),
                None => (
                    "string heap (unreferenced)".into(),
                    "string heap (unreferenced)".into(),
                ),
            };
        }
        ("padding".into(), "padding".into())
    }

    fn name(&self, off: usize) -> String {
        self.describe(off).0
    }

    fn kind(&self, off: usize) -> String {
        self.describe(off).1
    }
}

// ---------------------------------------------------------------------------------------------
// Running mutations
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    tried: u64,
    rejected: u64,
    /// Accepted, and nothing observable through the API changed.
    accepted_same: BTreeMap<String, u64>,
    /// Accepted, Merkle-covered content unchanged, layout (where chunks live, blobs, prefetch,
    /// parents) changed.
    accepted_layout: BTreeMap<String, u64>,
    /// Accepted although Merkle-covered content changed: validation bugs.
    merkle_changes: Vec<String>,
    /// Panics in from_bytes or in the walk.
    panics: Vec<String>,
    /// Accepted without re-sealing: the file digest failed to catch the damage.
    unsealed_accepted: Vec<String>,
    /// Example rejection messages by field.
    errors: BTreeMap<String, String>,
    /// A few precise examples of accepted mutations, by field.
    examples: BTreeMap<String, Vec<String>>,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

/// Loads `data` (a mutation described by `what`, touching field kind `field`) and records the
/// outcome against the original `base` view.
fn try_one(data: Vec<u8>, resealed: bool, what: &str, field: &str, base: &View, t: &mut Tally) {
    t.tried += 1;
    let r = catch_unwind(AssertUnwindSafe(|| Bootstrap::from_bytes(data)));
    let b = match r {
        Err(p) => {
            t.panics.push(format!(
                "from_bytes panicked on {what}: {}",
                panic_text(&*p)
            ));
            return;
        }
        Ok(Err(e)) => {
            t.rejected += 1;
            t.errors
                .entry(field.to_string())
                .or_insert_with(|| e.to_string());
            return;
        }
        Ok(Ok(b)) => b,
    };
    if !resealed {
        t.unsealed_accepted.push(what.to_string());
    }
    let view = match catch_unwind(AssertUnwindSafe(|| walk(&b))) {
        Ok(v) => v,
        Err(p) => {
            t.panics.push(format!(
                "walking an accepted bootstrap panicked on {what}: {}",
                panic_text(&*p)
            ));
            return;
        }
    };
    if view.root_digest != base.root_digest || view.entries != base.entries {
        let mut d = Vec::new();
        if view.root_digest != base.root_digest {
            d.push("root digest".to_string());
        }
        for (p, e) in &base.entries {
            match view.entries.get(p) {
                None => d.push(format!("{} gone", String::from_utf8_lossy(p))),
                Some(v) if v != e => d.push(format!(
                    "{} changed: {e:?} -> {v:?}",
                    String::from_utf8_lossy(p)
                )),
                _ => {}
            }
        }
        for p in view
            .entries
            .keys()
            .filter(|p| !base.entries.contains_key(*p))
        {
            d.push(format!("{} appeared", String::from_utf8_lossy(p)));
        }
        t.merkle_changes.push(format!(
            "{what}: accepted with Merkle-covered changes: {}",
            d.join("; ")
        ));
    } else {
        let bucket = if view.layout != base.layout {
            &mut t.accepted_layout
        } else {
            &mut t.accepted_same
        };
        *bucket.entry(field.to_string()).or_insert(0) += 1;
        let ex = t.examples.entry(field.to_string()).or_default();
        if ex.len() < 3 {
            ex.push(what.to_string());
        }
    }
}

fn report(name: &str, t: &Tally) {
    eprintln!(
        "== {name}: {} mutations, {} rejected, {} accepted",
        t.tried,
        t.rejected,
        t.tried - t.rejected
    );
    let examples = |f: &String| t.examples.get(f).map(|e| e.join("; ")).unwrap_or_default();
    for (f, n) in &t.accepted_same {
        eprintln!(
            "   accepted, nothing observable changed: {n:6} x {f}   e.g. {}",
            examples(f)
        );
    }
    for (f, n) in &t.accepted_layout {
        eprintln!(
            "   accepted, layout only (outside the Merkle tree): {n:6} x {f}   e.g. {}",
            examples(f)
        );
    }
    for m in &t.merkle_changes {
        eprintln!("   VALIDATION BUG: {m}");
    }
    for p in &t.panics {
        eprintln!("   PANIC: {p}");
    }
    for u in &t.unsealed_accepted {
        eprintln!("   ACCEPTED WITHOUT RESEAL: {u}");
    }
}

fn assert_clean(name: &str, t: &Tally) {
    assert!(t.tried > 0);
    assert!(
        t.panics.is_empty(),
        "{name}: {} panic(s):\n{}",
        t.panics.len(),
        t.panics.join("\n")
    );
    assert!(
        t.unsealed_accepted.is_empty(),
        "{name}: the file digest let {} damaged file(s) through:\n{}",
        t.unsealed_accepted.len(),
        t.unsealed_accepted.join("\n")
    );
    assert!(
        t.merkle_changes.is_empty(),
        "{name}: {} re-sealed mutation(s) accepted with Merkle-covered changes:\n{}",
        t.merkle_changes.len(),
        t.merkle_changes.join("\n")
    );
}

/// Offsets to flip: every byte when the file is at most 64 KiB (the base bootstrap is);
/// otherwise every byte of the superblock and of the first record of each table, and 4000
/// offsets spread evenly over the rest.
fn flip_offsets(len: usize, map: &FieldMap) -> Vec<usize> {
    let mut offs: Vec<usize> = (0..SUPERBLOCK_SIZE.min(len)).collect();
    let rest = len - SUPERBLOCK_SIZE;
    let want = 4000usize;
    if len <= 64 << 10 {
        // Small enough to flip every bit of every byte.
        offs.extend(SUPERBLOCK_SIZE..len);
    } else if rest <= want {
        offs.extend(SUPERBLOCK_SIZE..len);
    } else {
        offs.extend((0..want).map(|i| SUPERBLOCK_SIZE + i * rest / want));
        for &(_, start, count, size, _) in &map.tables {
            if count > 0 {
                offs.extend(start..start + size);
            }
        }
    }
    offs.sort_unstable();
    offs.dedup();
    offs
}

struct Fixture {
    base: Vec<u8>,
    view: View,
    map: FieldMap,
}

fn fixture() -> Option<Fixture> {
    let base = base_bootstrap()?;
    let b = Bootstrap::from_bytes(base.clone()).expect("the built bootstrap loads");
    let view = walk(&b);
    let map = FieldMap::new(&base, &b);
    // Our own checks have teeth: the tree has what we mutate.
    let t = b.tables();
    assert!(t.inodes.len() > 40 && !t.xattrs.is_empty() && t.blobs.len() == 1);
    assert!(t.chunks.iter().any(|c| c.is_zero()) && t.chunks.iter().any(|c| c.is_lz4()));
    assert!(t.chunks.iter().any(|c| !c.is_zero() && !c.is_lz4()));
    eprintln!(
        "base bootstrap: {} bytes, {} inodes, {} dirents, {} chunks, {} xattrs, {} heap bytes",
        base.len(),
        t.inodes.len(),
        t.dirents.len(),
        t.chunks.len(),
        t.xattrs.len(),
        t.strings.len()
    );
    Some(Fixture { base, view, map })
}

#[test]
fn bit_flips() {
    let Some(fx) = fixture() else { return };
    let offs = flip_offsets(fx.base.len(), &fx.map);
    assert!(
        offs.len() >= 2000.min(fx.base.len()),
        "only {} offsets",
        offs.len()
    );
    let mut plain = Tally::default();
    let mut sealed = Tally::default();
    for &off in &offs {
        let field = fx.map.kind(off);
        for bit in 0..8 {
            let mut m = fx.base.clone();
            m[off] ^= 1 << bit;
            let what = format!("bit {bit} of byte {off} ({})", fx.map.name(off));
            try_one(m.clone(), false, &what, &field, &fx.view, &mut plain);
            if !FILE_DIGEST.contains(&off) {
                // (A flip inside the digest itself is undone by re-sealing.)
                reseal(&mut m);
                try_one(m, true, &what, &field, &fx.view, &mut sealed);
            }
        }
    }
    eprintln!(
        "{} offsets of {} bytes, 8 bits each",
        offs.len(),
        fx.base.len()
    );
    report("bit flips, as is", &plain);
    report("bit flips, re-sealed", &sealed);
    assert_eq!(
        plain.rejected, plain.tried,
        "every unsealed flip is rejected"
    );
    assert_clean("bit flips, as is", &plain);
    assert_clean("bit flips, re-sealed", &sealed);
}

#[test]
fn truncations_and_extensions() {
    let Some(fx) = fixture() else { return };
    let len = fx.base.len();
    let mut lens: Vec<usize> = (0..=SUPERBLOCK_SIZE + 64).collect();
    lens.extend((0..1500).map(|i| i * len / 1500));
    lens.extend(len.saturating_sub(64)..len);
    lens.retain(|&l| l < len);
    lens.sort_unstable();
    lens.dedup();
    let mut plain = Tally::default();
    let mut sealed = Tally::default();
    for &l in &lens {
        let what = format!("truncated to {l} of {len} bytes");
        let field = if l < SUPERBLOCK_SIZE {
            "truncated inside the superblock".to_string()
        } else {
            format!("truncated in {}", fx.map.kind(l))
        };
        let mut m = fx.base[..l].to_vec();
        try_one(m.clone(), false, &what, &field, &fx.view, &mut plain);
        reseal(&mut m);
        try_one(m, true, &what, &field, &fx.view, &mut sealed);
    }
    // Growing the file: trailing bytes, then re-sealed.
    for extra in [1usize, 7, 8, 64, 4096] {
        let mut m = fx.base.clone();
        m.resize(m.len() + extra, 0xa5);
        let what = format!("{extra} bytes appended");
        try_one(
            m.clone(),
            false,
            &what,
            "appended bytes",
            &fx.view,
            &mut plain,
        );
        reseal(&mut m);
        try_one(m, true, &what, "appended bytes", &fx.view, &mut sealed);
    }
    report("truncations/extensions, as is", &plain);
    report("truncations/extensions, re-sealed", &sealed);
    for (f, e) in &sealed.errors {
        eprintln!("   rejected {f}: e.g. {e}");
    }
    assert_eq!(plain.rejected, plain.tried);
    assert_clean("truncations, as is", &plain);
    assert_clean("truncations, re-sealed", &sealed);
}

#[test]
fn random_overwrites() {
    let Some(fx) = fixture() else { return };
    let len = fx.base.len();
    let mut rng = StdRng::seed_from_u64(0xb007_57a9);
    let mut plain = Tally::default();
    let mut sealed = Tally::default();
    for _ in 0..6000 {
        // A third of the ranges start in the superblock, the rest anywhere.
        let start = if rng.gen_bool(1.0 / 3.0) {
            rng.gen_range(0..SUPERBLOCK_SIZE)
        } else {
            rng.gen_range(0..len)
        };
        let n = rng.gen_range(1..=64usize).min(len - start);
        let mut m = fx.base.clone();
        rng.fill_bytes(&mut m[start..start + n]);
        if rng.gen_bool(0.25) {
            // Small values are likelier to stay in range: write a small integer instead.
            let v: u8 = rng.gen_range(0..4);
            m[start] = v;
        }
        if m == fx.base {
            continue;
        }
        let what = format!("{n} random bytes at {start} ({})", fx.map.name(start));
        let field = fx.map.kind(start);
        try_one(m.clone(), false, &what, &field, &fx.view, &mut plain);
        let untouched_but_digest = (start..start + n).all(|o| FILE_DIGEST.contains(&o));
        if !untouched_but_digest {
            reseal(&mut m);
            try_one(m, true, &what, &field, &fx.view, &mut sealed);
        }
    }
    report("random overwrites, as is", &plain);
    report("random overwrites, re-sealed", &sealed);
    assert_eq!(plain.rejected, plain.tried);
    assert_clean("random overwrites, as is", &plain);
    assert_clean("random overwrites, re-sealed", &sealed);
}

/// docs/format.md: an inode's parent is "0 for the root and non-directories", and loading
/// "refuses anything that breaks a rule above". A crafted bootstrap whose root names another
/// directory as its parent must be refused: the filesystem answers `..` of the root and the
/// root's `..` readdir entry from this field.
#[test]
fn crafted_root_parent_is_rejected() {
    let Some(fx) = fixture() else { return };
    let b = Bootstrap::from_bytes(fx.base.clone()).expect("base loads");
    let subdir = (1..b.inode_count() as u32)
        .find(|&i| b.inode(i).and_then(|r| r.kind()) == Some(InodeKind::Directory))
        .expect("a subdirectory");
    let inodes = u64_at(&fx.base, 24) as usize;
    let parent = inodes + 88;
    assert_eq!(fx.map.name(parent), "inode[0].parent");
    assert_eq!(fx.base[parent..parent + 4], [0; 4], "the builder writes 0");
    let mut m = fx.base.clone();
    m[parent..parent + 4].copy_from_slice(&subdir.to_le_bytes());
    reseal(&mut m);
    match Bootstrap::from_bytes(m) {
        Err(e) => eprintln!("rejected as it should be: {e}"),
        Ok(b) => panic!(
            "a bootstrap whose root has parent {} (a subdirectory) was accepted; the root's `..` now \
             resolves to inode {} in the filesystem",
            b.inode(0).map(|r| r.parent.get()).unwrap_or(0),
            subdir + 1
        ),
    }
}
