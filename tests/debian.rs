//! Real root filesystems: Debian bookworm minbase (and a bigger variant built against it as a
//! chunk dictionary) built with the default 1 MiB chunks, checked against the source, mounted
//! and compared field by field and byte by byte. Prints build and read numbers for reports
//! (never asserted on: timing depends on the machine).

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Reads every regular file under `root` (not following symlinks): (files, bytes, time).
fn read_tree(root: &Path) -> (u64, u64, Duration) {
    let start = Instant::now();
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let e = e.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
            let ft = e
                .file_type()
                .unwrap_or_else(|err| panic!("file type of {}: {err}", e.path().display()));
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let mut f = File::open(e.path())
                    .unwrap_or_else(|err| panic!("open {}: {err}", e.path().display()));
                loop {
                    let n = f
                        .read(&mut buf)
                        .unwrap_or_else(|err| panic!("read {}: {err}", e.path().display()));
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
                files += 1;
            }
        }
    }
    (files, bytes, start.elapsed())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn rate(bytes: u64, d: Duration) -> f64 {
    mib(bytes) / d.as_secs_f64().max(1e-9)
}

fn report_build(name: &str, s: &serde_json::Value, wall: Duration) {
    eprintln!(
        "[numbers] {name}: build {:.2} s (skiff's own {:.2} s), {} inodes, {:.1} MiB content in {} chunks; \
         bootstrap {} bytes; blob {} bytes ({:.1} MiB, {} chunks stored); zero {} / repeated {} / dict {} chunks, \
         {:.1} MiB not stored; {} blob(s)",
        wall.as_secs_f64(),
        s["seconds"].as_f64().unwrap_or(-1.0),
        summary_u64(s, "inodes"),
        mib(summary_u64(s, "bytes_in")),
        summary_u64(s, "chunks"),
        summary_u64(s, "bootstrap_bytes"),
        summary_u64(s, "blob_bytes"),
        mib(summary_u64(s, "blob_bytes")),
        summary_u64(s, "stored_chunks"),
        summary_u64(s, "zero_chunks"),
        summary_u64(s, "dedup_chunks"),
        summary_u64(s, "dict_chunks"),
        mib(summary_u64(s, "saved_bytes")),
        summary_u64(s, "blobs"),
    );
}

/// Builds, checks, mounts and compares one image; returns the summary.
fn build_and_verify(
    name: &str,
    src: &Path,
    bootstrap: &Path,
    blobs: &Path,
    extra: &[&OsStr],
    mnt: &Path,
) -> serde_json::Value {
    let t = Instant::now();
    let summary = build_image(src, bootstrap, blobs, extra);
    report_build(name, &summary, t.elapsed());
    assert_eq!(
        summary_u64(&summary, "chunk_size"),
        1 << 20,
        "default chunk size"
    );

    let t = Instant::now();
    let (code, out) = check_image(bootstrap, blobs, Some(src));
    assert_eq!(code, 0, "{name}: skiff check --source failed\n{out}");
    eprintln!(
        "[numbers] {name}: skiff check --source {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let src_snap = snapshot(src);
    assert!(
        src_snap.len() > 1000,
        "{name}: only {} entries in the rootfs",
        src_snap.len()
    );
    let (src_files, src_bytes, src_time) = read_tree(src);

    let m = Mount::new(bootstrap, blobs, mnt);
    // First read of everything through a fresh mount, then the full comparison.
    let (files, bytes, fuse_time) = read_tree(mnt);
    assert_eq!(
        (files, bytes),
        (src_files, src_bytes),
        "{name}: files and bytes read through the mount"
    );
    let mnt_snap = snapshot(mnt);
    m.unmount();
    eprintln!(
        "[numbers] {name}: full-tree read of {files} files, {:.1} MiB: FUSE (fresh mount) {:.2} s = {:.0} MiB/s; \
         source directory (page cache warm) {:.2} s = {:.0} MiB/s",
        mib(bytes),
        fuse_time.as_secs_f64(),
        rate(bytes, fuse_time),
        src_time.as_secs_f64(),
        rate(src_bytes, src_time),
    );
    assert_no_diff(
        &format!("{name}: source vs mounted image"),
        &src_snap,
        &mnt_snap,
    );
    summary
}

#[test]
fn debian_minbase_and_chunk_dict() {
    if !require_fuse() {
        return;
    }
    let Some(minbase) = require(
        "Debian minbase rootfs (scripts/make-rootfs.sh)",
        debian_rootfs("minbase"),
    ) else {
        return;
    };
    let Some(bigger) = require(
        "Debian bigger rootfs (scripts/make-rootfs.sh)",
        debian_rootfs("bigger"),
    ) else {
        return;
    };
    let tmp = scratch();
    let w = tmp.path();

    // minbase on its own.
    let shared_blobs = w.join("blobs");
    let minbase_boot = w.join("minbase.bootstrap");
    let s_min = build_and_verify(
        "minbase",
        &minbase,
        &minbase_boot,
        &shared_blobs,
        &[],
        &w.join("mnt-minbase"),
    );
    assert_eq!(summary_u64(&s_min, "dict_chunks"), 0);

    // bigger on its own, in a blob directory of its own.
    let alone_blobs = w.join("alone-blobs");
    let s_alone = build_and_verify(
        "bigger alone",
        &bigger,
        &w.join("bigger-alone.bootstrap"),
        &alone_blobs,
        &[],
        &w.join("mnt-alone"),
    );

    // bigger with minbase as chunk dictionary, into minbase's blob directory.
    let dict_boot = w.join("bigger-dict.bootstrap");
    let s_dict = build_and_verify(
        "bigger with --chunk-dict minbase",
        &bigger,
        &dict_boot,
        &shared_blobs,
        &[OsStr::new("--chunk-dict"), minbase_boot.as_os_str()],
        &w.join("mnt-dict"),
    );

    let alone = summary_u64(&s_alone, "blob_bytes");
    let dict = summary_u64(&s_dict, "blob_bytes");
    let dict_chunks = summary_u64(&s_dict, "dict_chunks");
    eprintln!(
        "[numbers] chunk dictionary: bigger's new blob {alone} bytes alone vs {dict} bytes with minbase as dictionary: \
         {} bytes ({:.1} MiB, {:.1}%) not stored again; {dict_chunks} chunks taken from the dictionary",
        alone.saturating_sub(dict),
        mib(alone.saturating_sub(dict)),
        100.0 * alone.saturating_sub(dict) as f64 / alone.max(1) as f64
    );
    assert!(
        dict_chunks > 0,
        "no chunk taken from the dictionary: {s_dict}"
    );
    assert!(
        dict < alone,
        "the dictionary build stored {dict} bytes, not fewer than {alone} alone"
    );
    assert_eq!(
        summary_u64(&s_dict, "blobs"),
        2,
        "the dictionary image refers to minbase's blob and its own"
    );
    assert_eq!(
        s_dict["root_digest"], s_alone["root_digest"],
        "same tree, same Merkle root, wherever chunks live"
    );
    // Both images' blobs are in the shared directory, and the dictionary image needs minbase's.
    let min_blob = s_min["blob_id"]
        .as_str()
        .expect("minbase stored a blob")
        .to_string();
    let hidden = w.join("hidden-blob");
    fs::rename(shared_blobs.join(&min_blob), &hidden).expect("moving minbase's blob away");
    let (code, out) = check_image(&dict_boot, &shared_blobs, None);
    fs::rename(&hidden, shared_blobs.join(&min_blob)).expect("moving minbase's blob back");
    assert_ne!(code, 0, "check passed without the dictionary's blob\n{out}");
}
