//! Nydus RAFS v6 images, built by nydus-image 2.2 itself, served by Skiff unchanged.
//!
//! The special tree (every entry kind and odd case: a 5,000-entry directory, names that sort
//! before ".", a 4095-byte symlink stored out of line, xattrs of the user, trusted and security
//! prefixes, devices, fifo, socket, hard links, a sparse file) is built with every compressor
//! (lz4_block, zstd, none), both digesters (blake3, sha256) and both chunk sizes (1 MiB and
//! 64 KiB), one nydus-image run each, and mounted with `skiff mount`: the mount equals the
//! source on every field nydus-image preserves and every byte, and `skiff check --source`
//! passes.
//!
//! What nydus-image does not preserve, and so is not compared (each asserted for what it is):
//! - the root directory's mtime: nydus-image stores 0, and Skiff (as nydusd) reports the time
//!   the image was loaded;
//! - directories' st_size: an EROFS directory's size is that of its dirent blocks, not the
//!   source filesystem's;
//! - the POSIX ACL xattrs (system.posix_acl_*): nydus-image 2.2.0 refuses to build a tree that
//!   has them ("invalid xattr key"), so the tree has none; the reader's handling of their
//!   prefixes is covered by the unit tests of `format::v6`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use common::nydus::*;
use common::*;
use skiff::format::{Bootstrap, Compression, DigestAlgo, SourceFormat};

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every build of the matrix: 3 compressors × 2 digesters × 2 chunk sizes.
fn matrix() -> Vec<BuildOpts> {
    let mut v = Vec::new();
    for compressor in ["lz4_block", "zstd", "none"] {
        for digester in ["blake3", "sha256"] {
            for chunk_size in ["0x100000", "0x10000"] {
                v.push(BuildOpts {
                    compressor,
                    digester,
                    chunk_size,
                });
            }
        }
    }
    v
}

/// The loaded image is what was asked for: v6, the chunk size, every chunk with the digester,
/// compressed chunks with the compressor (the text file compresses, random data does not).
fn assert_image_is(bootstrap: &Path, o: BuildOpts) {
    let b = Bootstrap::load(bootstrap).expect("the v6 bootstrap loads");
    assert_eq!(b.source_format(), SourceFormat::NydusRafsV6);
    let want_cs = u32::from_str_radix(o.chunk_size.trim_start_matches("0x"), 16).expect("hex");
    assert_eq!(b.chunk_size(), want_cs, "{}", o.name());
    let algo = match o.digester {
        "sha256" => DigestAlgo::Sha256,
        _ => DigestAlgo::Blake3,
    };
    let want = match o.compressor {
        "lz4_block" => Compression::Lz4Block,
        "zstd" => Compression::Zstd,
        _ => Compression::None,
    };
    let chunks = b.tables().chunks;
    assert!(!chunks.is_empty());
    let mut kinds = BTreeMap::new();
    for c in chunks {
        assert_eq!(c.digest_algo(), algo, "{}: digest algorithm", o.name());
        let comp = c.compression();
        assert!(
            comp == want || comp == Compression::None,
            "{}: a {comp:?} chunk",
            o.name()
        );
        *kinds.entry(format!("{comp:?}")).or_insert(0u32) += 1;
    }
    if want != Compression::None {
        assert!(
            kinds.contains_key(&format!("{want:?}")),
            "{}: no {want:?} chunk at all: {kinds:?}",
            o.name()
        );
        // Random data does not compress: nydus-image stores it raw, flagged uncompressed.
        assert!(
            kinds.contains_key("None"),
            "{}: no raw chunk: {kinds:?}",
            o.name()
        );
    }
    assert_eq!(b.blobs().len(), 1);
    assert_eq!(b.blobs()[0].id_algo(), DigestAlgo::Sha256);
}

/// What nydus-image does not preserve, checked for what it is and then set to the source's, so
/// that the rest is compared exactly: the root's mtime is the load time (between `loaded_from`
/// and now), directory sizes are EROFS's.
fn normalise(
    got: &mut BTreeMap<Vec<u8>, Facts>,
    want: &BTreeMap<Vec<u8>, Facts>,
    loaded_from: i64,
) {
    let root = got.get_mut(b"/".as_slice()).expect("root");
    assert!(
        root.mtime.0 >= loaded_from && root.mtime.0 <= now_secs(),
        "the root's mtime {:?} is not the load time (>= {loaded_from})",
        root.mtime
    );
    root.mtime = want[&b"/".to_vec()].mtime;
    for (path, f) in got.iter_mut() {
        if f.kind == "dir" {
            // An EROFS directory is at least its "." and ".." entries (12 bytes each, names).
            assert!(f.size >= 27, "{path:?}: directory size {}", f.size);
            if let Some(w) = want.get(path) {
                f.size = w.size;
            }
        }
    }
}

#[test]
fn special_tree_every_compressor_digester_and_chunk_size() {
    if !require_fuse() || require_nydus_image().is_none() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_special_tree(&src);
    let want = snapshot(&src);
    let mut reads = 0;
    for o in matrix() {
        let out = tmp.path().join(o.name());
        let bootstrap = create_dir_rafs(&src, &out, o);
        let blobs = out.join("blobs");
        assert_image_is(&bootstrap, o);
        let (code, text) = check_image(&bootstrap, &blobs, Some(&src));
        assert_eq!(
            code,
            0,
            "{}: skiff check --source failed:\n{text}",
            o.name()
        );
        assert!(text.contains("nydus-rafs-v6"), "{text}");
        let loaded_from = now_secs();
        let m = Mount::new(&bootstrap, &blobs, &out.join("mnt"));
        let mut got = snapshot(&m.dir);
        normalise(&mut got, &want, loaded_from);
        assert_no_diff(&format!("nydus-image {}", o.name()), &want, &got);
        reads += check_odd_reads(&src, &m.dir, SPECIAL_READ_FILES);
        m.unmount();
    }
    eprintln!("12 nydus-image builds mounted and compared, {reads} odd reads");
}

#[test]
fn debian_minbase_built_by_nydus_image() {
    if !require_fuse() || require_nydus_image().is_none() {
        return;
    }
    let Some(rootfs) = require(
        "Debian minbase rootfs (scripts/make-rootfs.sh)",
        debian_rootfs("minbase"),
    ) else {
        return;
    };
    let tmp = scratch();
    // nydus-image's defaults, as nydusify uses them: zstd, blake3, 1 MiB chunks.
    let o = BuildOpts {
        compressor: "zstd",
        digester: "blake3",
        chunk_size: "0x100000",
    };
    let t = std::time::Instant::now();
    let bootstrap = create_dir_rafs(&rootfs, tmp.path(), o);
    let build = t.elapsed();
    let blobs = tmp.path().join("blobs");
    let t = std::time::Instant::now();
    let (code, text) = check_image(&bootstrap, &blobs, Some(&rootfs));
    assert_eq!(code, 0, "skiff check --source failed:\n{text}");
    let check = t.elapsed();
    let want = snapshot(&rootfs);
    assert!(want.len() > 1000, "only {} entries in minbase", want.len());
    let loaded_from = now_secs();
    let m = Mount::new(&bootstrap, &blobs, &tmp.path().join("mnt"));
    let mut got = snapshot(&m.dir);
    m.unmount();
    normalise(&mut got, &want, loaded_from);
    assert_no_diff("Debian minbase built by nydus-image", &want, &got);
    eprintln!(
        "[numbers] minbase v6: nydus-image build {:.1} s, skiff check --source {:.1} s, {} entries, bootstrap {} bytes",
        build.as_secs_f64(),
        check.as_secs_f64(),
        want.len(),
        std::fs::metadata(&bootstrap).map_or(0, |m| m.len())
    );
}

/// One flipped byte in a Nydus blob, inside a chunk two files share (nydus-image stores it once):
/// exactly those two files fail with EIO, every other file reads back byte for byte, and
/// `skiff check` fails naming those two files.
#[test]
fn a_flipped_byte_in_a_nydus_blob_fails_exactly_the_files_using_that_chunk() {
    use rand::{RngCore, SeedableRng};
    if !require_fuse() || require_nydus_image().is_none() {
        return;
    }
    const CHUNK: usize = 64 * 1024;
    let tmp = scratch();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("dir")).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let mut random = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    let shared = random(CHUNK);
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // The victim's third chunk is the sharer's first.
    files.insert(
        "victim".into(),
        [random(2 * CHUNK), shared.clone(), random(CHUNK + 17)].concat(),
    );
    files.insert("dir/sharer".into(), [shared, random(500)].concat());
    files.insert("bystander_random".into(), random(3 * CHUNK + 5));
    files.insert(
        "dir/bystander_text".into(),
        (0..30_000)
            .map(|i| format!("text line {i}\n"))
            .collect::<String>()
            .into_bytes(),
    );
    files.insert("small".into(), b"small and fine\n".to_vec());
    for (name, data) in &files {
        std::fs::write(src.join(name), data).expect("write");
    }
    let o = BuildOpts {
        compressor: "zstd",
        digester: "sha256",
        chunk_size: "0x10000",
    };
    let bootstrap = create_dir_rafs(&src, tmp.path(), o);
    let blobs = tmp.path().join("blobs");
    let (code, text) = check_image(&bootstrap, &blobs, Some(&src));
    assert_eq!(code, 0, "the intact image fails check:\n{text}");

    // Where the shared chunk is stored: the victim's chunk 2 and the sharer's chunk 0 are the
    // same record.
    let b = Bootstrap::load(&bootstrap).expect("load");
    let lookup = |path: &str| {
        path.split('/')
            .try_fold(0u32, |ino, name| b.lookup(ino, name.as_bytes()))
            .expect("path in the image")
    };
    let hit = b.file_chunks(lookup("victim"))[2];
    let sharer = b.file_chunks(lookup("dir/sharer"))[0];
    assert_eq!(
        (hit.compressed_offset.get(), hit.digest),
        (sharer.compressed_offset.get(), sharer.digest),
        "nydus-image stored the shared chunk once"
    );
    let blob = blobs_in(&blobs).pop().expect("one blob");
    let mut bytes = std::fs::read(&blob).expect("blob");
    let at = hit.compressed_offset.get() as usize + hit.compressed_size.get() as usize / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&blob, bytes).expect("damage the blob");

    let bad: std::collections::BTreeSet<&str> = ["victim", "dir/sharer"].into();
    let m = Mount::new(&bootstrap, &blobs, &tmp.path().join("mnt"));
    let mut problems = Vec::new();
    for (name, data) in &files {
        match (std::fs::read(m.dir.join(name)), bad.contains(name.as_str())) {
            (Ok(got), false) if &got == data => {}
            (Err(e), true) if e.raw_os_error() == Some(libc::EIO) => {}
            (r, damaged) => problems.push(format!(
                "{name} (damaged: {damaged}): {:?}",
                r.map(|g| g.len())
            )),
        }
    }
    // The victim's chunks before and after the damaged one still read.
    let f = std::fs::File::open(m.dir.join("victim")).expect("open victim");
    for (off, len) in [(0, 2 * CHUNK), (3 * CHUNK, CHUNK + 17)] {
        let got = read_full_at(&f, off as u64, len).expect("an intact chunk of the victim");
        assert_eq!(got, files["victim"][off..off + len], "victim @{off}");
    }
    drop(f);
    let log = m.log_text();
    m.unmount();
    assert!(problems.is_empty(), "{}\n{log}", problems.join("\n"));
    assert!(log.contains("failed verification"), "not logged:\n{log}");

    let (code, out) = check_image(&bootstrap, &blobs, Some(&src));
    assert_ne!(code, 0, "skiff check passed a damaged blob:\n{out}");
    let named: std::collections::BTreeSet<String> = problem_paths(&out)
        .into_iter()
        .filter(|p| p != "/")
        .collect();
    assert_eq!(
        named,
        ["/dir/sharer".to_string(), "/victim".to_string()].into(),
        "{out}"
    );
}

/// The v6 prefetch table (nids, from `--prefetch-policy fs` patterns) becomes the image's
/// prefetch list of inode indices, in order.
#[test]
fn the_v6_prefetch_table_names_the_same_files() {
    if require_nydus_image().is_none() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d/e")).expect("mkdir");
    for (p, n) in [
        ("big", 300_000usize),
        ("d/one", 10),
        ("d/e/two", 20),
        ("other", 5),
    ] {
        std::fs::write(src.join(p), vec![7u8; n]).expect("write");
    }
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let bootstrap = tmp.path().join("bootstrap");
    run_nydus_image_with_input(
        &[
            std::ffi::OsStr::new("create"),
            "--log-level".as_ref(),
            "warn".as_ref(),
            "--prefetch-policy".as_ref(),
            "fs".as_ref(),
            "--bootstrap".as_ref(),
            bootstrap.as_os_str(),
            "--blob-dir".as_ref(),
            blobs.as_os_str(),
            src.as_os_str(),
        ],
        b"/big\n/d\n",
    );
    let b = Bootstrap::load(&bootstrap).expect("load");
    let paths = b.paths();
    let listed: Vec<String> = b
        .prefetch()
        .map(|i| String::from_utf8_lossy(&paths[i as usize]).into_owned())
        .collect();
    assert_eq!(listed, ["/big", "/d"]);
}

/// nydus-image's `--prefetch-policy fs` stores the listed files together at the start of the
/// blob, in path order: Skiff's prefetch plan fetches them with one request whatever the order
/// of the list (it used to follow the list and make a request per place the list jumped
/// back), and batches that do not touch still go in the order of their first listed file.
#[test]
fn the_v6_prefetch_files_are_one_request() {
    use skiff::storage::prefetch::{plan, PrefetchOptions};
    if require_nydus_image().is_none() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    // Distinct bytes in every 64 KiB chunk, so that no chunk is shared.
    for (i, (p, n)) in [
        ("z/late", 300_000usize),
        ("a/early", 200_000),
        ("m/other", 150_000),
        ("b/between", 100_000),
    ]
    .into_iter()
    .enumerate()
    {
        let f = src.join(p);
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(f, bytes).expect("write");
    }
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let bootstrap = tmp.path().join("bootstrap");
    run_nydus_image_with_input(
        &[
            std::ffi::OsStr::new("create"),
            "--log-level".as_ref(),
            "warn".as_ref(),
            "--chunk-size".as_ref(),
            "0x10000".as_ref(),
            "--prefetch-policy".as_ref(),
            "fs".as_ref(),
            "--bootstrap".as_ref(),
            bootstrap.as_os_str(),
            "--blob-dir".as_ref(),
            blobs.as_os_str(),
            src.as_os_str(),
        ],
        b"/z/late\n/a/early\n",
    );
    let b = Bootstrap::load(&bootstrap).expect("load");
    let ino = |p: &str| skiff::storage::prefetch::resolve(&b, p).expect(p);
    let listed: Vec<u32> = b.prefetch().collect();
    assert_eq!(listed, [ino("/z/late"), ino("/a/early")]);
    let digests = |inos: &[u32]| -> std::collections::BTreeSet<[u8; 32]> {
        inos.iter()
            .flat_map(|&i| b.file_chunks(i).iter().map(|c| c.digest))
            .collect()
    };
    let want = digests(&listed);
    assert!(want.len() >= 8, "{} chunks", want.len());
    let opts = PrefetchOptions {
        first: listed.clone(),
        ..PrefetchOptions::default()
    };
    let batches = plan(&b, &opts);
    assert_eq!(
        batches.len(),
        1,
        "{} requests for the listed files",
        batches.len()
    );
    let got: std::collections::BTreeSet<[u8; 32]> = batches[0].1.iter().map(|c| c.digest).collect();
    assert_eq!(got, want);
    // A listed file stored away from the others is its own request, first when listed first.
    let opts = PrefetchOptions {
        first: vec![ino("/m/other"), ino("/z/late")],
        ..PrefetchOptions::default()
    };
    let batches = plan(&b, &opts);
    assert_eq!(batches.len(), 2, "{batches:?}");
    let first: std::collections::BTreeSet<[u8; 32]> =
        batches[0].1.iter().map(|c| c.digest).collect();
    assert_eq!(first, digests(&[ino("/m/other")]));
    let second: std::collections::BTreeSet<[u8; 32]> =
        batches[1].1.iter().map(|c| c.digest).collect();
    assert_eq!(second, digests(&[ino("/z/late")]));
    // And with everything after: each chunk once.
    let opts = PrefetchOptions {
        first: listed,
        all: true,
        ..PrefetchOptions::default()
    };
    let all: Vec<[u8; 32]> = plan(&b, &opts)
        .iter()
        .flat_map(|(_, cs)| cs.iter().map(|c| c.digest))
        .collect();
    let unique: std::collections::BTreeSet<[u8; 32]> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "a chunk planned twice");
    assert_eq!(
        unique,
        b.tables()
            .chunks
            .iter()
            .filter(|c| !c.is_zero())
            .map(|c| c.digest)
            .collect()
    );
}
