//! The `skiff mount` transport and decode-ahead, functionally (no timings):
//! - reads stalled on a slow disk (more of them than the old two channel threads) hold up no
//!   other request: lookups, a listing, and a read of a chunk held in memory, answered while
//!   the stalled reads are still waiting; then the stalled reads finish with the right bytes;
//! - decode-ahead decodes the chunks that follow a sequential read (its metrics say so, and
//!   the reads found them), and with a flipped byte in one file's chunk exactly that file fails
//!   with EIO while every other file reads back byte for byte.

mod common;
#[allow(dead_code)]
#[path = "kata/stallfs.rs"]
mod stallfs;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::oci::noise;
use common::*;
use stallfs::{Stall, StallMount};

/// How long the slow disk holds a read: long enough that the other requests are surely
/// answered while it waits (they take milliseconds), short of the 30 s request timeout.
const STALL: Duration = Duration::from_secs(8);

/// Where `path`'s chunks are stored: (blob file name, offset, stored size) of each.
fn stored_chunks(bootstrap: &Path, path: &str) -> Vec<(String, u64, u64)> {
    let out = skiff_ok([
        OsStr::new("inspect"),
        OsStr::new("--bootstrap"),
        bootstrap.as_os_str(),
        OsStr::new("--json"),
        OsStr::new(path),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    v["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .filter(|c| !c["zero"].as_bool().unwrap_or(false))
        .map(|c| {
            (
                c["blob"].as_str().expect("blob").to_string(),
                c["offset"].as_u64().expect("offset"),
                c["stored_size"].as_u64().expect("stored_size"),
            )
        })
        .collect()
}

/// The JSON metrics file `skiff mount --metrics-file` writes (every second and at exit).
fn metrics(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("metrics JSON")
}

#[test]
fn stalled_reads_hold_up_no_other_request() {
    if !require_fuse() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("src");
    // `hot`: one 1 MiB chunk, read in pieces (so kept in memory); `slow_*`: one chunk each,
    // stored after it and next to each other (pre-order), all on the stalled range.
    let mut files = BTreeMap::new();
    files.insert("hot", noise(1 << 20, 1));
    for (i, name) in ["slow_a", "slow_b", "slow_c"].into_iter().enumerate() {
        files.insert(name, noise(100_000, 2 + i as u64));
    }
    for (name, data) in &files {
        fs::write(src.join(name), data).expect("write");
    }
    let (bootstrap, blobs) = (tmp.path().join("bootstrap"), tmp.path().join("blobs"));
    build_image(&src, &bootstrap, &blobs, &[]);
    let slow: Vec<(String, u64, u64)> = ["/slow_a", "/slow_b", "/slow_c"]
        .iter()
        .flat_map(|p| stored_chunks(&bootstrap, p))
        .collect();
    let blob = slow[0].0.clone();
    assert!(slow.iter().all(|c| c.0 == blob), "{slow:?}");
    let start = slow.iter().map(|c| c.1).min().expect("chunks");
    let end = slow.iter().map(|c| c.1 + c.2).max().expect("chunks");
    let disk = StallMount::start(
        &blobs,
        &tmp.path().join("slow-disk"),
        Stall {
            file: blob,
            range: start..end,
            pause: STALL,
        },
    );
    let mnt_dir = tmp.path().join("mnt");
    let mnt = Mount::new(&bootstrap, &disk.mountpoint, &mnt_dir);

    // `hot` read whole: its chunk is in memory now (read in pieces of the kernel's size).
    assert_eq!(fs::read(mnt_dir.join("hot")).expect("hot"), files["hot"]);

    // Three reads that stall, one per file: one more than the two threads that used to read
    // /dev/fuse, so that before, every thread would have been waiting.
    let readers: Vec<_> = ["slow_a", "slow_b", "slow_c"]
        .into_iter()
        .map(|name| {
            let path = mnt_dir.join(name);
            std::thread::spawn(move || (name, fs::read(&path)))
        })
        .collect();
    let waited = Instant::now();
    while disk.stalled.load(Ordering::SeqCst) < 3 {
        assert!(
            waited.elapsed() < STALL / 2,
            "the slow reads did not all reach the slow disk ({} did)",
            disk.stalled.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Meanwhile: lookups, a listing, and `hot` again, its page cache dropped so that the read
    // reaches the daemon, which has the chunk in memory.
    for (name, data) in &files {
        let m = fs::metadata(mnt_dir.join(name)).expect("stat");
        assert_eq!(m.len(), data.len() as u64, "{name}");
    }
    let mut names: Vec<String> = fs::read_dir(&mnt_dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["hot", "slow_a", "slow_b", "slow_c"]);
    let hot = File::open(mnt_dir.join("hot")).expect("open hot");
    // SAFETY: posix_fadvise on a descriptor this test owns, with no pointers.
    let rc = unsafe { libc::posix_fadvise(hot.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
    let mut buf = vec![0u8; 1 << 20];
    hot.read_exact_at(&mut buf, 0).expect("hot again");
    assert!(buf == files["hot"], "hot read back wrong while reads stall");
    let pending = readers.iter().filter(|r| !r.is_finished()).count();
    assert_eq!(
        pending, 3,
        "the other requests were answered only after a stalled read ended"
    );

    // The stalled reads end with the right bytes.
    for r in readers {
        let (name, got) = r.join().expect("reader thread");
        assert!(got.expect(name) == files[name], "{name} read back wrong");
    }
    mnt.unmount();
}

#[test]
fn decode_ahead_serves_verified_chunks_only() {
    if !require_fuse() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("src");
    // Many small files of text (lz4 chunks, one per file, stored in read order), read one
    // after another as tar does.
    let mut files = BTreeMap::new();
    for i in 0..200 {
        let text: Vec<u8> = (0..(2000 + i * 37))
            .flat_map(|l| format!("file {i} line {l}\n").into_bytes())
            .collect();
        files.insert(format!("f{i:03}"), text);
    }
    for (name, data) in &files {
        fs::write(src.join(name), data).expect("write");
    }
    let (bootstrap, blobs) = (tmp.path().join("bootstrap"), tmp.path().join("blobs"));
    build_image(&src, &bootstrap, &blobs, &[]);

    let read_all = |label: &str| -> (BTreeMap<String, String>, serde_json::Value) {
        let mnt_dir = tmp.path().join(format!("mnt-{label}"));
        let metrics_file = tmp.path().join(format!("metrics-{label}.json"));
        let mnt = Mount::with_args(
            &[
                OsStr::new("--bootstrap"),
                bootstrap.as_os_str(),
                OsStr::new("--blob-dir"),
                blobs.as_os_str(),
                OsStr::new("--metrics-file"),
                metrics_file.as_os_str(),
            ],
            &mnt_dir,
        );
        let mut failed = BTreeMap::new();
        for (name, data) in &files {
            match fs::read(mnt_dir.join(name)) {
                Ok(got) => assert!(&got == data, "{label}: {name} read back wrong"),
                Err(e) => {
                    failed.insert(name.clone(), e.to_string());
                }
            }
        }
        mnt.unmount();
        (failed, metrics(&metrics_file))
    };

    let (failed, m) = read_all("clean");
    assert!(failed.is_empty(), "{failed:?}");
    let (decoded, hits) = (
        m["ahead_decoded"].as_u64().expect("ahead_decoded"),
        m["ahead_hits"].as_u64().expect("ahead_hits"),
    );
    assert!(
        decoded >= 50 && hits >= 50,
        "a sequential read of 200 files: decode-ahead decoded {decoded}, reads found {hits}\n{m:#}"
    );

    // One byte flipped in the chunk of a file in the middle: decode-ahead reaches it before
    // the read does, and must not serve it.
    let victim = "f100";
    let chunks = stored_chunks(&bootstrap, &format!("/{victim}"));
    let (blob, offset, size) = chunks.first().expect("victim chunk").clone();
    let blob_path = blobs.join(&blob);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&blob_path)
        .expect("blob");
    let at = offset + size / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).expect("flip byte");
    drop(f);
    let (failed, m) = read_all("tampered");
    assert_eq!(
        failed.keys().collect::<Vec<_>>(),
        [victim],
        "exactly the damaged file fails: {failed:?}"
    );
    assert!(failed[victim].contains("Input/output error"), "{failed:?}");
    assert!(m["ahead_decoded"].as_u64().unwrap_or(0) >= 50, "{m:#}");
    assert!(m["verify_failures"].as_u64().unwrap_or(0) >= 1, "{m:#}");
}
