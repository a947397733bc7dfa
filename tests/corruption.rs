//! Damaged blobs: one flipped byte inside one file's chunk, and a truncated blob. Through the
//! mount exactly the files whose chunks are damaged fail with EIO and every other file reads
//! back byte for byte; `skiff check` fails and names exactly those files.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use common::*;

const CHUNK: u64 = 64 * 1024;

/// A stored chunk of a file, as `skiff inspect --json PATH` lists it.
#[derive(Clone, Debug)]
struct StoredChunk {
    file: String,
    index: usize,
    blob: String,
    offset: u64,
    stored_size: u64,
    lz4: bool,
}

/// Several files that share no chunk: random ones (stored raw), text (lz4), an empty one and a
/// zero one (stored nowhere), of sizes from a few bytes to several chunks.
fn make_tree(src: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut files = BTreeMap::new();
    let mut random = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    files.insert("a_random".to_string(), random(3 * CHUNK as usize + 1000));
    files.insert(
        "b_text".to_string(),
        (0..40_000)
            .map(|i| format!("b line {i}\n"))
            .collect::<String>()
            .into_bytes(),
    );
    files.insert("c_small".to_string(), random(1000));
    files.insert("dir/d_random".to_string(), random(5 * CHUNK as usize));
    files.insert(
        "dir/e_text".to_string(),
        (0..30_000)
            .map(|i| format!("{i} e-text\n"))
            .collect::<String>()
            .into_bytes(),
    );
    files.insert("f_random".to_string(), random(2 * CHUNK as usize - 5));
    files.insert("g_empty".to_string(), Vec::new());
    files.insert("h_zeros".to_string(), vec![0; 2 * CHUNK as usize]);
    files.insert("dir/i_random".to_string(), random(CHUNK as usize + 1));
    for (name, data) in &files {
        let p = src.join(name);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, data).expect("write");
    }
    files
}

/// Every stored (non-zero) chunk of every file, from `skiff inspect --json`.
fn stored_chunks(bootstrap: &Path, files: &BTreeMap<String, Vec<u8>>) -> Vec<StoredChunk> {
    let mut out = Vec::new();
    for name in files.keys() {
        let o = skiff_ok([
            OsStr::new("inspect"),
            OsStr::new("--bootstrap"),
            bootstrap.as_os_str(),
            OsStr::new("--json"),
            OsStr::new(&format!("/{name}")),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect JSON");
        let chunks = v["chunks"]
            .as_array()
            .unwrap_or_else(|| panic!("no chunks in {v}"));
        assert_eq!(
            chunks.len() as u64,
            (files[name].len() as u64).div_ceil(CHUNK),
            "{name}: chunk count"
        );
        for (i, c) in chunks.iter().enumerate() {
            if c["zero"].as_bool().expect("zero flag") {
                continue;
            }
            out.push(StoredChunk {
                file: name.clone(),
                index: i,
                blob: c["blob"].as_str().expect("blob id").to_string(),
                offset: c["offset"].as_u64().expect("offset"),
                stored_size: c["stored_size"].as_u64().expect("stored_size"),
                lz4: c["lz4"].as_bool().expect("lz4 flag"),
            });
        }
    }
    out
}

/// Reads every file through a fresh mount: files in `bad` must fail with EIO, all others must
/// equal the source.
fn assert_reads(
    bootstrap: &Path,
    blobs: &Path,
    mnt: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    bad: &BTreeSet<String>,
) {
    let m = Mount::new(bootstrap, blobs, mnt);
    let mut problems = Vec::new();
    for (name, data) in files {
        match (fs::read(mnt.join(name)), bad.contains(name)) {
            (Ok(got), false) if &got == data => {}
            (Ok(got), false) => problems.push(format!(
                "{name}: {} bytes read, differing from the source",
                got.len()
            )),
            (Err(e), false) => problems.push(format!("{name}: intact, but reading failed: {e}")),
            (Err(e), true) if e.raw_os_error() == Some(libc::EIO) => {}
            (Err(e), true) => {
                problems.push(format!("{name}: damaged, failed with {e} instead of EIO"))
            }
            (Ok(_), true) => problems.push(format!("{name}: damaged, yet read without error")),
        }
    }
    // Listing and stat still work: metadata lives in the bootstrap.
    for name in files.keys() {
        if let Err(e) = fs::symlink_metadata(mnt.join(name)) {
            problems.push(format!("{name}: lstat failed: {e}"));
        }
    }
    let log = m.log_text();
    m.unmount();
    assert!(problems.is_empty(), "{}\n{log}", problems.join("\n"));
}

/// `skiff check` fails and names exactly `bad` (plus "/" for the blob as a whole).
fn assert_check_names(bootstrap: &Path, blobs: &Path, src: &Path, bad: &BTreeSet<String>) {
    for source in [None, Some(src)] {
        let (code, out) = check_image(bootstrap, blobs, source);
        assert_ne!(code, 0, "skiff check passed on a damaged blob\n{out}");
        let named: BTreeSet<String> = problem_paths(&out)
            .into_iter()
            .filter(|p| p != "/")
            .collect();
        let want: BTreeSet<String> = bad.iter().map(|n| format!("/{n}")).collect();
        assert_eq!(
            named, want,
            "files named by skiff check (source {source:?})\n{out}"
        );
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    src: PathBuf,
    bootstrap: PathBuf,
    blobs: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
    chunks: Vec<StoredChunk>,
    blob_path: PathBuf,
    blob_bytes: Vec<u8>,
}

fn fixture() -> Fixture {
    let tmp = scratch();
    let dir = tmp.path().to_path_buf();
    let src = dir.join("src");
    let files = make_tree(&src);
    let bootstrap = dir.join("bootstrap");
    let blobs = dir.join("blobs");
    build_image(
        &src,
        &bootstrap,
        &blobs,
        &[OsStr::new("--chunk-size"), OsStr::new("64K")],
    );
    let chunks = stored_chunks(&bootstrap, &files);
    let ids: BTreeSet<&str> = chunks.iter().map(|c| c.blob.as_str()).collect();
    assert_eq!(ids.len(), 1, "one blob expected: {ids:?}");
    let blob_path = blobs.join(chunks[0].blob.clone());
    let blob_bytes = fs::read(&blob_path).expect("reading the blob");
    // No two files share a chunk, and the chunks tile the blob.
    let mut ranges: Vec<(u64, u64)> = chunks
        .iter()
        .map(|c| (c.offset, c.offset + c.stored_size))
        .collect();
    ranges.sort();
    ranges.dedup();
    assert_eq!(ranges.len(), chunks.len(), "files share chunks: {chunks:?}");
    assert!(
        ranges.windows(2).all(|w| w[0].1 == w[1].0) && ranges[0].0 == 0,
        "chunks do not tile the blob"
    );
    assert_eq!(ranges.last().map(|r| r.1), Some(blob_bytes.len() as u64));
    let (code, out) = check_image(&bootstrap, &blobs, Some(&src));
    assert_eq!(code, 0, "the intact image fails check\n{out}");
    Fixture {
        _tmp: tmp,
        dir,
        src,
        bootstrap,
        blobs,
        files,
        chunks,
        blob_path,
        blob_bytes,
    }
}

/// Flips one byte in the middle of one stored chunk (the one nearest the middle of the blob
/// among those `lz4` says, with neighbours in its file on both sides) and checks that exactly
/// its file fails, and only in that chunk.
fn flipped_byte_fails_exactly_its_file(lz4: bool) {
    if !require_fuse() {
        return;
    }
    let fx = fixture();
    // Sanity: everything reads back before the damage.
    assert_reads(
        &fx.bootstrap,
        &fx.blobs,
        &fx.dir.join("mnt0"),
        &fx.files,
        &BTreeSet::new(),
    );

    // The chunk nearest the middle of the blob that has neighbours in its file on both sides,
    // so that the file's chunks before and after it can be read around the damage.
    let middle = fx.blob_bytes.len() as u64 / 2;
    let hit = fx
        .chunks
        .iter()
        .filter(|c| c.lz4 == lz4)
        .filter(|c| {
            c.index > 0
                && fx
                    .chunks
                    .iter()
                    .any(|o| o.file == c.file && o.index == c.index + 1)
        })
        .min_by_key(|c| (c.offset + c.stored_size / 2).abs_diff(middle))
        .expect("a file with three stored chunks")
        .clone();
    let at = hit.offset + hit.stored_size / 2;
    eprintln!(
        "flipping blob byte {at} (of {}), inside chunk {} of {} (lz4: {lz4})",
        fx.blob_bytes.len(),
        hit.index,
        hit.file
    );
    let mut damaged = fx.blob_bytes.clone();
    damaged[at as usize] ^= 0x5a;
    fs::write(&fx.blob_path, &damaged).expect("writing the damaged blob");

    let bad = BTreeSet::from([hit.file.clone()]);
    assert_reads(
        &fx.bootstrap,
        &fx.blobs,
        &fx.dir.join("mnt1"),
        &fx.files,
        &bad,
    );
    assert_check_names(&fx.bootstrap, &fx.blobs, &fx.src, &bad);

    // The damage is local to the chunk: the file's other chunks still read back.
    let m = Mount::new(&fx.bootstrap, &fx.blobs, &fx.dir.join("mnt2"));
    let f = fs::File::open(fx.dir.join("mnt2").join(&hit.file)).expect("open");
    let data = &fx.files[&hit.file];
    for ci in 0..(data.len() as u64).div_ceil(CHUNK) {
        let start = ci * CHUNK;
        let len = CHUNK.min(data.len() as u64 - start) as usize;
        let mut buf = vec![0u8; len];
        let r = f.read_exact_at(&mut buf, start);
        if ci as usize == hit.index {
            let e = r.expect_err("the damaged chunk read without error");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "damaged chunk {ci}: {e}");
        } else {
            r.unwrap_or_else(|e| panic!("intact chunk {ci} of {}: {e}", hit.file));
            assert!(
                buf == data[start as usize..start as usize + len],
                "chunk {ci} of {} differs",
                hit.file
            );
        }
    }
    drop(f);
    m.unmount();
}

#[test]
fn flipped_byte_in_a_raw_chunk_fails_exactly_its_file() {
    flipped_byte_fails_exactly_its_file(false);
}

#[test]
fn flipped_byte_in_an_lz4_chunk_fails_exactly_its_file() {
    flipped_byte_fails_exactly_its_file(true);
}

#[test]
fn truncated_blob_fails_exactly_the_files_past_the_cut() {
    if !require_fuse() {
        return;
    }
    let fx = fixture();
    // Cut inside a chunk at about 60% of the blob.
    let target = fx.blob_bytes.len() as u64 * 3 / 5;
    let cut_chunk = fx
        .chunks
        .iter()
        .find(|c| c.offset <= target && target < c.offset + c.stored_size)
        .expect("a chunk covers the cut")
        .clone();
    let cut = cut_chunk.offset + cut_chunk.stored_size / 2;
    let bad: BTreeSet<String> = fx
        .chunks
        .iter()
        .filter(|c| c.offset + c.stored_size > cut)
        .map(|c| c.file.clone())
        .collect();
    let good: Vec<&String> = fx.files.keys().filter(|n| !bad.contains(*n)).collect();
    eprintln!(
        "cutting the blob at {cut} of {}: damaged {bad:?}, intact {good:?}",
        fx.blob_bytes.len()
    );
    assert!(
        !bad.is_empty() && good.len() >= 3,
        "the cut must split the files"
    );

    fs::OpenOptions::new()
        .write(true)
        .open(&fx.blob_path)
        .and_then(|f| f.set_len(cut))
        .expect("truncating the blob");
    assert_reads(
        &fx.bootstrap,
        &fx.blobs,
        &fx.dir.join("mnt"),
        &fx.files,
        &bad,
    );
    assert_check_names(&fx.bootstrap, &fx.blobs, &fx.src, &bad);
}
