//! `Bootstrap::from_bytes` against damaged Nydus RAFS v6 bootstraps, at the scale of
//! tests/bootstrap_fuzz.rs: a real v6 bootstrap (nydus-image 2.2, a small tree of every entry
//! kind: multi-chunk and empty files, hard links, inline and out-of-line symlinks, devices,
//! fifo, socket, xattrs, a multi-block directory, names before ".", lz4_block chunks with sha256
//! digests, 4 KiB chunks) is mutated by bit flips, truncations and random overwrites.
//!
//! A v6 bootstrap has no whole-file digest, so many mutations are legitimately accepted (an
//! mtime, a mode, a padding byte). What must hold for every mutant:
//! - loading never panics or hangs; a refusal is an error;
//! - an accepted mutant walks through the public API without panicking;
//! - every file of it (unless it transcodes to exactly the base's tables, which were read and
//!   checked once), read whole through the filesystem layer (`RafsFs::read` over a
//!   `CachedChunkSource` on the real blob), gives either EIO or, for every
//!   chunk, exactly the bytes the original image has under that chunk's digest: no chunk is
//!   ever served under a digest it does not have.

mod common;

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::file_traits::FileReadWriteVolatile;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use skiff::format::{BlobRecord, Bootstrap, ChunkDigest, ChunkRecord, InodeKind};
use skiff::fs::{RafsFs, RafsFsOptions};
use skiff::storage::{
    CachedChunkSource, ChunkData, ChunkSource, Deadline, LocalFsBackend, StorageError,
};
use zerocopy::IntoBytes;

use common::nydus::*;
use common::*;

/// A writer collecting what a read returns.
struct Collect(Vec<u8>);

impl io::Write for Collect {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Collect {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _count: usize,
        _off: u64,
    ) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

/// The small tree: every kind of entry, a few KiB to 40 KiB per file, 4 KiB chunks.
fn make_tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut rng = StdRng::seed_from_u64(0xf0_22);
    let mut random = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    std::fs::create_dir_all(root.join("d/e/f")).expect("mkdir");
    std::fs::create_dir_all(root.join("wide")).expect("mkdir");
    std::fs::write(root.join("random"), random(40_000)).expect("write");
    let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(root.join("d/text"), text).expect("write");
    std::fs::write(root.join("empty"), b"").expect("write");
    std::fs::write(root.join("#first"), b"before the dot").expect("write");
    std::fs::write(root.join("d/e/f/deep"), random(5000)).expect("write");
    std::fs::hard_link(root.join("random"), root.join("d/e/hard")).expect("link");
    std::os::unix::fs::symlink("d/text", root.join("sym")).expect("symlink");
    std::os::unix::fs::symlink("l/".repeat(2000), root.join("long_sym")).expect("symlink");
    for i in 0..250 {
        std::fs::write(
            root.join(format!("wide/name-{i:04}")),
            format!("{i}\n").repeat(i % 7),
        )
        .expect("write");
    }
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: valid NUL-terminated paths that outlive the calls.
    unsafe {
        libc::mknod(
            c(&root.join("chr")).as_ptr(),
            libc::S_IFCHR | 0o644,
            libc::makedev(4, 70_000),
        );
        libc::mknod(c(&root.join("fifo")).as_ptr(), libc::S_IFIFO | 0o600, 0);
    }
    let sock = root.join("sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("socket"));
    xattr::set(root.join("d/text"), "user.a", b"xattr value").expect("xattr");
    xattr::set(root.join("d"), "trusted.b", b"").expect("xattr");
    xattr::set(root.join("random"), "security.capability", &capability_v2()).expect("xattr");
    std::fs::set_permissions(root.join("d/e"), std::fs::Permissions::from_mode(0o2751))
        .expect("chmod");
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: Vec<u8>,
    /// The original bytes of every chunk, by digest.
    chunks: HashMap<ChunkDigest, Vec<u8>>,
    /// The original's inode count, to bound walks.
    inodes: usize,
    /// The verifying source every mutant is read through.
    source: Arc<Memo>,
    /// The base's transcoded tables.
    tables: Vec<u8>,
}

/// The stand-ins for what v6 lacks, fixed so that the same input gives the same tables.
const DEFAULTS: skiff::format::v6::Defaults = skiff::format::v6::Defaults {
    uid: 0,
    gid: 0,
    now: 1_800_000_000,
};

/// Every table of a loaded bootstrap, as bytes: equal for two loads of the same image.
fn tables_bytes(b: &Bootstrap) -> Vec<u8> {
    let t = b.tables();
    [
        t.inodes.as_bytes(),
        t.dirents.as_bytes(),
        t.chunks.as_bytes(),
        t.xattrs.as_bytes(),
        t.blobs.as_bytes(),
        t.strings,
        t.prefetch.as_bytes(),
    ]
    .concat()
}

fn fixture() -> Option<Fixture> {
    require(
        "root (to make the tree)",
        if is_root() {
            Ok(())
        } else {
            Err("not root".to_string())
        },
    )?;
    require_nydus_image()?;
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_tree(&src);
    let out = tmp.path().join("out");
    let bootstrap = create_dir_rafs(
        &src,
        &out,
        BuildOpts {
            compressor: "lz4_block",
            digester: "sha256",
            chunk_size: "0x1000",
        },
    );
    let base = std::fs::read(&bootstrap).expect("bootstrap");
    let blobs = out.join("blobs");
    let b = Bootstrap::from_bytes_with(base.clone(), DEFAULTS).expect("the base loads");
    let source = CachedChunkSource::in_memory(LocalFsBackend::new(&blobs), 0);
    let mut chunks = HashMap::new();
    let t = b.tables();
    for c in t.chunks {
        let blob = &t.blobs[c.blob_index.get() as usize];
        let data = source
            .read_chunk(blob, c, &Deadline::none())
            .expect("every chunk of the base verifies");
        chunks.insert(c.chunk_digest(), data.to_vec());
    }
    // The tree has what the mutations should hit.
    assert!(t.chunks.iter().any(|c| c.is_lz4()) && t.chunks.iter().any(|c| !c.is_lz4()));
    assert!(t.inodes.len() > 250 && !t.xattrs.is_empty());
    eprintln!(
        "base v6 bootstrap: {} bytes, {} inodes, {} chunks ({} distinct)",
        base.len(),
        t.inodes.len(),
        t.chunks.len(),
        chunks.len()
    );
    let source = Arc::new(Memo {
        inner: CachedChunkSource::in_memory(LocalFsBackend::new(&blobs), 0),
        done: std::sync::Mutex::new(HashMap::new()),
    });
    let tables = tables_bytes(&b);
    let fixture = Fixture {
        _tmp: tmp,
        tables,
        source,
        inodes: t.inodes.len(),
        base,
        chunks,
    };
    // The base itself reads back exactly.
    let mut t = Tally::default();
    let base = Bootstrap::from_bytes_with(fixture.base.clone(), DEFAULTS).expect("loads");
    read_all(base, &fixture, "the base", &mut t);
    assert!(
        t.failures.is_empty() && t.files_eio == 0,
        "{:?}",
        t.failures
    );
    Some(fixture)
}

#[derive(Default)]
struct Tally {
    tried: u64,
    rejected: u64,
    accepted: u64,
    /// Accepted, and transcoded to exactly the base's tables.
    same_as_base: u64,
    files_read: u64,
    files_eio: u64,
    failures: Vec<String>,
    slowest: Duration,
    errors: std::collections::BTreeMap<String, u64>,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

/// The real verifying source over the blob, with its results remembered by the *whole* chunk
/// record and blob record: decoding is a function of those and the blob's bytes, so a mutant
/// whose record is byte for byte one already decoded gets the same answer without decoding
/// again. A record changed in any byte (digest, offset, size, flags) is decoded and verified
/// afresh. This keeps reading every file of every mutant affordable.
struct Memo {
    inner: CachedChunkSource<LocalFsBackend>,
    done: std::sync::Mutex<HashMap<Vec<u8>, Option<ChunkData>>>,
}

impl ChunkSource for Memo {
    fn read_chunk(
        &self,
        blob: &BlobRecord,
        chunk: &ChunkRecord,
        deadline: &Deadline,
    ) -> Result<ChunkData, StorageError> {
        let key = [blob.as_bytes(), chunk.as_bytes()].concat();
        if let Some(r) = self.done.lock().expect("memo").get(&key) {
            return r.clone().ok_or(StorageError::Corrupt {
                blob: String::new(),
                chunk: chunk.chunk_digest().to_string(),
                offset: chunk.compressed_offset.get(),
                source: skiff::storage::VerifyError::Length { got: 0, want: 0 },
            });
        }
        let r = self.inner.read_chunk(blob, chunk, deadline);
        self.done
            .lock()
            .expect("memo")
            .insert(key, r.as_ref().ok().cloned());
        r
    }
}

/// Reads every file of `b` through the filesystem and checks each chunk's bytes.
fn read_all(b: Bootstrap, fx: &Fixture, what: &str, t: &mut Tally) {
    let b = Arc::new(b);
    let fs = RafsFs::new(
        b.clone(),
        fx.source.clone(),
        RafsFsOptions {
            readahead: false,
            ..RafsFsOptions::default()
        },
    );
    let ctx = Context::default();
    let cs = u64::from(b.chunk_size());
    for index in 0..b.inode_count() as u32 {
        let ino = u64::from(index) + 1;
        if let Err(e) = fs.getattr(&ctx, ino, None) {
            t.failures
                .push(format!("{what}: getattr of inode {ino}: {e}"));
        }
        let Some(rec) = b.inode(index) else { continue };
        if rec.kind() != Some(InodeKind::Regular) {
            continue;
        }
        t.files_read += 1;
        let size = rec.size.get();
        let mut w = Collect(Vec::with_capacity(size as usize));
        let mut result = Ok(());
        while (w.0.len() as u64) < size {
            let off = w.0.len() as u64;
            match fs.read(&ctx, ino, 0, &mut w, 128 << 10, off, None, 0) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => t.files_eio += 1,
            Err(e) => t.failures.push(format!(
                "{what}: inode {ino}: read failed with {e}, not EIO"
            )),
            Ok(()) => {
                if w.0.len() as u64 != size {
                    t.failures.push(format!(
                        "{what}: inode {ino}: {} bytes read of {size}",
                        w.0.len()
                    ));
                    continue;
                }
                for (i, c) in b.file_chunks(index).iter().enumerate() {
                    let start = i as u64 * cs;
                    let end = (start + cs).min(size);
                    let served = &w.0[start as usize..end as usize];
                    match fx.chunks.get(&c.chunk_digest()) {
                        Some(orig) if orig.as_slice() == served => {}
                        Some(_) => t.failures.push(format!(
                            "{what}: inode {ino} chunk {i}: bytes served are not the original's \
                             for digest {}",
                            c.chunk_digest()
                        )),
                        None => t.failures.push(format!(
                            "{what}: inode {ino} chunk {i}: served under digest {}, which no \
                             original chunk has",
                            c.chunk_digest()
                        )),
                    }
                }
            }
        }
    }
}

/// Walks the tree through the public API; bounded against cycles.
fn walk(b: &Bootstrap, limit: usize) {
    let mut stack = vec![0u32];
    let mut visited = 0;
    while let Some(ino) = stack.pop() {
        visited += 1;
        assert!(visited <= limit, "walk does not terminate");
        let _ = b.xattrs(ino).count();
        let _ = b.symlink_target(ino);
        let _ = b.file_chunks(ino);
        for d in b.dir_entries(ino) {
            let name = b.entry_name(d);
            assert_eq!(b.lookup(ino, name), Some(d.inode.get()));
            if b.inode(d.inode.get()).and_then(|r| r.kind()) == Some(InodeKind::Directory) {
                stack.push(d.inode.get());
            }
        }
    }
    let _ = b.paths();
    let _ = skiff::check::image_stats(b);
}

fn try_one(data: Vec<u8>, what: &str, fx: &Fixture, t: &mut Tally) {
    t.tried += 1;
    let start = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(|| {
        Bootstrap::from_bytes_with(data, DEFAULTS)
    }));
    t.slowest = t.slowest.max(start.elapsed());
    let b = match r {
        Err(p) => {
            t.failures.push(format!(
                "from_bytes panicked on {what}: {}",
                panic_text(&*p)
            ));
            return;
        }
        Ok(Err(e)) => {
            t.rejected += 1;
            let kind = skiff::util::error_chain(&e);
            let kind: String = kind.split(": ").take(3).collect::<Vec<_>>().join(": ");
            let kind: String = kind.chars().filter(|c| !c.is_ascii_digit()).collect();
            *t.errors.entry(kind).or_insert(0) += 1;
            return;
        }
        Ok(Ok(b)) => b,
    };
    t.accepted += 1;
    if tables_bytes(&b) == fx.tables {
        // The same image as the base, to the byte: read (and checked) once, with the base.
        t.same_as_base += 1;
        return;
    }
    let limit = fx.inodes * 4 + 16;
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| walk(&b, limit))) {
        t.failures.push(format!(
            "walking an accepted mutant panicked on {what}: {}",
            panic_text(&*p)
        ));
        return;
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| read_all(b, fx, what, t))) {
        t.failures.push(format!(
            "reading an accepted mutant panicked on {what}: {}",
            panic_text(&*p)
        ));
    }
}

fn report_and_check(name: &str, t: &Tally) {
    eprintln!(
        "== {name}: {} mutants, {} refused, {} accepted ({} the same image as the base; of \
         the others {} files read: {} EIO, the rest exactly the original chunks); slowest \
         load {:?}",
        t.tried, t.rejected, t.accepted, t.same_as_base, t.files_read, t.files_eio, t.slowest
    );
    let mut errs: Vec<(&String, &u64)> = t.errors.iter().collect();
    errs.sort_by(|a, b| b.1.cmp(a.1));
    for (e, n) in errs.iter().take(12) {
        eprintln!("   refused {n:6} x {e}");
    }
    assert!(t.tried > 0 && t.rejected > 0);
    assert!(
        t.failures.is_empty(),
        "{name}: {} failure(s):\n{}",
        t.failures.len(),
        t.failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The bits to flip: every bit of the superblocks, device slots and blob table (where one bit
/// decides everything), and one bit each of 2,000 bytes spread evenly over the rest of the
/// data (inodes, xattrs, dirent blocks, chunk addresses, the chunk table), the bit changing
/// with the offset, plus a few bytes of all-zero padding blocks.
fn flip_bits(base: &[u8]) -> Vec<(usize, u8)> {
    let mut bits: Vec<(usize, u8)> = (1024..1536)
        .chain(4096..4096 + 256)
        .flat_map(|o| (0..8).map(move |b| (o, b)))
        .collect();
    let data: Vec<usize> = (8192..base.len()).filter(|&o| base[o] != 0).collect();
    let step = (data.len() / 2000).max(1);
    bits.extend(
        data.iter()
            .step_by(step)
            .enumerate()
            .map(|(i, &o)| (o, (i % 8) as u8)),
    );
    for (k, block) in base.chunks(4096).enumerate().skip(2) {
        if block.iter().all(|&b| b == 0) {
            bits.push((k * 4096 + 7, (k % 8) as u8));
        }
    }
    bits
}

#[test]
fn v6_bit_flips() {
    let Some(fx) = fixture() else { return };
    let bits = flip_bits(&fx.base);
    let mut t = Tally::default();
    for &(off, bit) in &bits {
        let mut m = fx.base.clone();
        m[off] ^= 1 << bit;
        try_one(m, &format!("bit {bit} of byte {off:#x}"), &fx, &mut t);
    }
    eprintln!("{} bits flipped in {} bytes", bits.len(), fx.base.len());
    report_and_check("v6 bit flips", &t);
}

#[test]
fn v6_truncations_and_extensions() {
    let Some(fx) = fixture() else { return };
    let len = fx.base.len();
    let mut lens: Vec<usize> = (0..len).step_by(4096).collect();
    lens.extend((0..1500).map(|i| i * len / 1500));
    lens.extend([1024, 1028, 1152, 1408, 1536, 4096 + 255]);
    lens.retain(|&l| l < len);
    lens.sort_unstable();
    lens.dedup();
    let mut t = Tally::default();
    for &l in &lens {
        try_one(
            fx.base[..l].to_vec(),
            &format!("truncated to {l}"),
            &fx,
            &mut t,
        );
    }
    for extra in [1usize, 8, 4096, 8192] {
        let mut m = fx.base.clone();
        m.resize(len + extra, 0xa5);
        try_one(m, &format!("{extra} bytes appended"), &fx, &mut t);
    }
    report_and_check("v6 truncations and extensions", &t);
}

#[test]
fn v6_random_overwrites() {
    let Some(fx) = fixture() else { return };
    let len = fx.base.len();
    // Where the data is: the blocks that are not all zero.
    let live: Vec<usize> = fx
        .base
        .chunks(4096)
        .enumerate()
        .filter(|(_, b)| b.iter().any(|&x| x != 0))
        .map(|(k, _)| k)
        .collect();
    let mut rng = StdRng::seed_from_u64(0x005e_ed06);
    let mut t = Tally::default();
    for _ in 0..1500 {
        let start = if rng.gen_bool(0.2) {
            rng.gen_range(1024..1536)
        } else {
            let k = live[rng.gen_range(0..live.len())];
            (k * 4096 + rng.gen_range(0..4096)).min(len - 1)
        };
        let n = rng.gen_range(1..=32usize).min(len - start);
        let mut m = fx.base.clone();
        rng.fill_bytes(&mut m[start..start + n]);
        if rng.gen_bool(0.3) {
            // Small values are likelier to stay in range.
            m[start] = rng.gen_range(0..4);
        }
        if m == fx.base {
            continue;
        }
        try_one(m, &format!("{n} random bytes at {start:#x}"), &fx, &mut t);
    }
    report_and_check("v6 random overwrites", &t);
}
