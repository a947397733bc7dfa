//! The S3 backend, the shared disk cache, retries and prefetch, end to end: images uploaded to
//! a local S3 server (moto, started by `scripts/s3.sh` on 127.0.0.1), mounted over FUSE with
//! `skiff mount --backend s3`, and compared with their source on every field and byte.
//!
//! Faults come from a small HTTP proxy in this file, in front of the S3 server: 500s, resets,
//! truncated and bit-flipped bodies, stalls.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::middlebox::*;
use common::*;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use skiff::format::Bootstrap;
use skiff::storage::{BlobBackend, S3Backend, S3Config};

const BUCKET: &str = "skiff-test";
const PREFIX: &str = "blobs/";

/// A moto server on 127.0.0.1, stopped on drop.
struct S3Server {
    port: u16,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl S3Server {
    fn start() -> Option<S3Server> {
        let out = Command::new(repo().join("scripts/s3.sh"))
            .arg("start")
            .output()
            .map_err(|e| e.to_string())
            .and_then(|o| {
                if o.status.success() {
                    Ok(o)
                } else {
                    Err(format!(
                        "scripts/s3.sh start failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    ))
                }
            });
        let out = require("a local S3 server (moto)", out)?;
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let port = url.rsplit(':').next()?.parse().ok()?;
        Some(S3Server { port })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&self) {
        let _ = Command::new(repo().join("scripts/s3.sh"))
            .arg("stop")
            .arg(self.port.to_string())
            .status();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn s3_config(endpoint: &str) -> S3Config {
    S3Config {
        endpoint: endpoint.to_string(),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: PREFIX.into(),
        path_style: true,
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        session_token: None,
        timeout_secs: Some(2),
        connect_timeout_secs: None,
        skip_verify: false,
    }
}

/// Uploads every blob of `bootstrap` from `blob_dir`; returns their total size.
fn upload(server: &S3Server, bootstrap: &Path, blob_dir: &Path) -> u64 {
    let s3 = S3Backend::new(&s3_config(&server.endpoint())).expect("s3 backend");
    s3.create_bucket().expect("create bucket");
    let b = Bootstrap::load(bootstrap).expect("bootstrap");
    let mut total = 0;
    for blob in b.blobs() {
        let bytes = fs::read(blob_dir.join(hex::encode(blob.id))).expect("blob");
        total += bytes.len() as u64;
        s3.put_blob(&blob.id, bytes).expect("upload");
        // Read it back through the backend: a ranged GET.
        let r = s3
            .read_range(&blob.id, 1, 3, &skiff::storage::Deadline::none())
            .expect("ranged get");
        assert_eq!(r.len(), 3);
    }
    total
}

/// Writes the storage config for `endpoint` and returns `skiff mount` arguments using it.
fn mount_args(
    scratch: &Path,
    bootstrap: &Path,
    endpoint: &str,
    cache: &Path,
    metrics: &Path,
    extra: &[&str],
) -> Vec<OsString> {
    let cfg = serde_json::json!({
        "backend": {
            "type": "s3", "endpoint": endpoint, "bucket": BUCKET, "prefix": PREFIX,
            "access_key_id": "testing", "secret_access_key": "testing", "timeout_secs": 2,
        },
        "retry": {"attempts": 8, "base_delay_ms": 10, "max_delay_ms": 200},
    });
    let cfg_path = scratch.join(format!(
        "config-{}.json",
        metrics.display().to_string().len() + extra.len()
    ));
    let cfg_path = {
        let mut p = cfg_path;
        let mut n = 0;
        while p.exists() {
            n += 1;
            p = scratch.join(format!("config-{n}.json"));
        }
        p
    };
    fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).expect("json")).expect("config");
    let mut args: Vec<OsString> = vec![
        "--bootstrap".into(),
        bootstrap.into(),
        "--config".into(),
        cfg_path.into(),
        "--cache-dir".into(),
        cache.into(),
        "--metrics-file".into(),
        metrics.into(),
        "--thread-num".into(),
        "4".into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

fn metrics(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("metrics json")
}

fn metric(path: &Path, field: &str) -> u64 {
    metrics(path)
        .get(field)
        .and_then(|v| v.as_u64().or_else(|| v.as_bool().map(u64::from)))
        .unwrap_or_else(|| panic!("no {field} in {}", path.display()))
}

/// A tree of random files (some sharing content) totalling about `mib` MiB.
fn make_data_tree(root: &Path, mib: usize) {
    let mut rng = StdRng::seed_from_u64(42);
    fs::create_dir_all(root.join("a/b")).expect("mkdir");
    let mut left = mib << 20;
    let mut i = 0;
    while left > 0 {
        let n = (rng.next_u32() as usize % (700 << 10)).min(left) + 1;
        let mut data = vec![0u8; n];
        rng.fill_bytes(&mut data);
        let dir = if i % 3 == 0 { "a/b" } else { "a" };
        fs::write(root.join(dir).join(format!("f{i}")), &data).expect("write");
        if i % 5 == 0 {
            fs::write(root.join(format!("copy{i}")), &data).expect("write");
        }
        left = left.saturating_sub(n);
        i += 1;
    }
}

struct Image {
    _scratch: tempfile::TempDir,
    dir: PathBuf,
    src: PathBuf,
    bootstrap: PathBuf,
    blobs: PathBuf,
}

fn data_image(mib: usize) -> Image {
    let scratch = common::scratch();
    let dir = scratch.path().to_path_buf();
    let src = dir.join("src");
    make_data_tree(&src, mib);
    let bootstrap = dir.join("image.boot");
    let blobs = dir.join("blobs");
    build_image(
        &src,
        &bootstrap,
        &blobs,
        &[
            std::ffi::OsStr::new("--chunk-size"),
            std::ffi::OsStr::new("64K"),
        ],
    );
    Image {
        _scratch: scratch,
        dir,
        src,
        bootstrap,
        blobs,
    }
}

/// A tree's listing, as `snapshot` gives it.
type Snapshot = BTreeMap<Vec<u8>, Facts>;

/// The start every data test shares: FUSE and an S3 server (or `None`: the test skips, which CI
/// turns into a failure), a data image of `mib` MiB uploaded to it, the source's snapshot, and
/// the blob bytes uploaded.
fn served_data_image(mib: usize) -> Option<(S3Server, Image, Snapshot, u64)> {
    if !require_fuse() {
        return None;
    }
    let server = S3Server::start()?;
    let img = data_image(mib);
    let blob_bytes = upload(&server, &img.bootstrap, &img.blobs);
    let want = snapshot(&img.src);
    Some((server, img, want, blob_bytes))
}

#[test]
fn s3_mount_serves_the_special_tree_exactly() {
    if !require_fuse() {
        return;
    }
    let Some(server) = S3Server::start() else {
        return;
    };
    let scratch = common::scratch();
    let d = scratch.path();
    let src = d.join("src");
    make_special_tree(&src);
    let bootstrap = d.join("image.boot");
    let blobs = d.join("blobs");
    build_image(
        &src,
        &bootstrap,
        &blobs,
        &[
            std::ffi::OsStr::new("--chunk-size"),
            std::ffi::OsStr::new("64K"),
        ],
    );
    upload(&server, &bootstrap, &blobs);
    let cache = d.join("cache");
    let m = d.join("metrics.json");
    let args = mount_args(d, &bootstrap, &server.endpoint(), &cache, &m, &[]);
    let mnt = Mount::with_args(&args, &d.join("mnt"));
    assert_no_diff("s3 mount vs source", &snapshot(&src), &snapshot(&mnt.dir));
    mnt.unmount();
    eprintln!("{}", metrics(&m));
    assert!(metric(&m, "backend_requests") > 0);
    assert!(metric(&m, "disk_stores") > 0);
    assert_eq!(metric(&m, "verify_failures"), 0);
}

#[test]
fn two_mounts_share_one_cache_and_fetch_each_chunk_once() {
    let Some((server, img, want, blob_bytes)) = served_data_image(12) else {
        return;
    };

    // One process alone, its own cache: the baseline.
    let m0 = img.dir.join("alone.json");
    let args = mount_args(
        &img.dir,
        &img.bootstrap,
        &server.endpoint(),
        &img.dir.join("cache0"),
        &m0,
        &[],
    );
    let mnt = Mount::with_args(&args, &img.dir.join("mnt0"));
    assert_no_diff("alone", &want, &snapshot(&mnt.dir));
    mnt.unmount();
    let alone = metric(&m0, "backend_bytes");
    assert!(
        alone <= blob_bytes,
        "one process fetched {alone} of {blob_bytes} blob bytes"
    );

    // Two processes, one cache, reading everything at once.
    let cache = img.dir.join("cache");
    let (m1, m2) = (img.dir.join("m1.json"), img.dir.join("m2.json"));
    let a1 = mount_args(
        &img.dir,
        &img.bootstrap,
        &server.endpoint(),
        &cache,
        &m1,
        &[],
    );
    let a2 = mount_args(
        &img.dir,
        &img.bootstrap,
        &server.endpoint(),
        &cache,
        &m2,
        &[],
    );
    let mnt1 = Mount::with_args(&a1, &img.dir.join("mnt1"));
    let mnt2 = Mount::with_args(&a2, &img.dir.join("mnt2"));
    let (d1, d2) = (mnt1.dir.clone(), mnt2.dir.clone());
    let t1 = std::thread::spawn(move || snapshot(&d1));
    let t2 = std::thread::spawn(move || snapshot(&d2));
    let (s1, s2) = (t1.join().expect("reader 1"), t2.join().expect("reader 2"));
    assert_no_diff("sharer 1", &want, &s1);
    assert_no_diff("sharer 2", &want, &s2);
    mnt1.unmount();
    mnt2.unmount();
    let shared = metric(&m1, "backend_bytes") + metric(&m2, "backend_bytes");
    eprintln!(
        "backend bytes: blobs {blob_bytes}, one process {alone}, two sharing {shared} ({} + {})",
        metric(&m1, "backend_bytes"),
        metric(&m2, "backend_bytes")
    );
    assert_eq!(
        shared, alone,
        "two processes sharing a cache fetched {shared} bytes, one alone {alone}"
    );

    // A corrupted cache file is found, deleted and fetched again.
    let stat = skiff_ok([
        "cache",
        "stat",
        "--json",
        "--cache-dir",
        cache.to_str().expect("utf8"),
    ]);
    let st: serde_json::Value = serde_json::from_slice(&stat.stdout).expect("stat json");
    assert!(st["chunks"].as_u64().unwrap_or(0) > 10, "{st}");
    let victim = fs::read_dir(cache.join("chunks"))
        .expect("chunks")
        .flatten()
        .flat_map(|s| fs::read_dir(s.path()).expect("shard").flatten())
        .map(|e| e.path())
        .next()
        .expect("a cached chunk");
    let mut bytes = fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&victim, &bytes).expect("corrupt");
    let m3 = img.dir.join("m3.json");
    let a3 = mount_args(
        &img.dir,
        &img.bootstrap,
        &server.endpoint(),
        &cache,
        &m3,
        &[],
    );
    let mnt3 = Mount::with_args(&a3, &img.dir.join("mnt3"));
    assert_no_diff("after corrupting the cache", &want, &snapshot(&mnt3.dir));
    mnt3.unmount();
    assert_eq!(metric(&m3, "disk_corrupt"), 1);
    assert!(metric(&m3, "chunks_fetched") >= 1);
    assert!(metric(&m3, "backend_bytes") < alone / 4);
}

#[test]
fn kill_9_mid_read_then_restart_reads_correctly_and_limit_holds() {
    let Some((server, img, want, _)) = served_data_image(12) else {
        return;
    };
    let cache = img.dir.join("cache");
    let m = img.dir.join("m.json");
    let args = mount_args(
        &img.dir,
        &img.bootstrap,
        &server.endpoint(),
        &cache,
        &m,
        &[],
    );
    let mnt = Mount::with_args(&args, &img.dir.join("mnt"));
    let dir = mnt.dir.clone();
    let reader = std::thread::spawn(move || {
        // Reads until the mount goes away under it.
        let _ = std::panic::catch_unwind(|| snapshot(&dir));
    });
    std::thread::sleep(Duration::from_millis(300));
    mnt.kill9();
    let _ = reader.join();
    let mnt = Mount::with_args(&args, &img.dir.join("mnt"));
    assert_no_diff("after kill -9 and restart", &want, &snapshot(&mnt.dir));
    mnt.unmount();
    let out = skiff_ok([
        "cache",
        "stat",
        "--json",
        "--cache-dir",
        cache.to_str().expect("utf8"),
    ]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["tmp_files"].as_u64(), Some(0), "{st}");

    // A limit smaller than the image holds while the whole image is read.
    let limited = img.dir.join("limited");
    let limit: u64 = 4 << 20;
    let ml = img.dir.join("ml.json");
    let limit_s = limit.to_string();
    let args = mount_args(
        &img.dir,
        &img.bootstrap,
        &server.endpoint(),
        &limited,
        &ml,
        &["--cache-limit", &limit_s],
    );
    let mnt = Mount::with_args(&args, &img.dir.join("mntl"));
    assert_no_diff("with a cache limit", &want, &snapshot(&mnt.dir));
    let out = skiff_ok([
        "cache",
        "stat",
        "--json",
        "--cache-dir",
        limited.to_str().expect("utf8"),
    ]);
    mnt.unmount();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let bytes = st["bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(bytes <= limit, "cache holds {bytes} bytes, limit {limit}");
    assert!(metric(&ml, "disk_evictions") > 0);
    // gc brings it lower still.
    let out = skiff_ok([
        "cache",
        "gc",
        "--json",
        "--limit",
        "1M",
        "--cache-dir",
        limited.to_str().expect("utf8"),
    ]);
    let gc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        gc["bytes_left"].as_u64().unwrap_or(u64::MAX) <= 1 << 20,
        "{gc}"
    );
}

#[test]
fn prefetch_all_then_the_server_goes_away() {
    let Some((server, img, want, _)) = served_data_image(8) else {
        return;
    };
    let cache = img.dir.join("cache");
    let m = img.dir.join("m.json");
    let args = mount_args(
        &img.dir,
        &img.bootstrap,
        &server.endpoint(),
        &cache,
        &m,
        &["--prefetch-all", "--prefetch-bandwidth", "64M"],
    );
    let mnt = Mount::with_args(&args, &img.dir.join("mnt"));
    let start = Instant::now();
    while !m.exists() || metric(&m, "prefetch_complete") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prefetch did not finish\n{}",
            mnt.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(&m, "prefetch_errors"), 0);
    let requests = metric(&m, "backend_requests");
    let chunks = metric(&m, "prefetch_chunks_total");
    eprintln!("prefetch: {chunks} chunks in {requests} requests");
    assert!(
        requests < chunks,
        "adjacent chunks were not merged: {requests} requests for {chunks} chunks"
    );
    server.stop();
    assert_no_diff("offline after prefetch", &want, &snapshot(&mnt.dir));
    mnt.unmount();
}

#[test]
fn build_prefetch_list_is_fetched_first_in_the_background() {
    if !require_fuse() {
        return;
    }
    let Some(server) = S3Server::start() else {
        return;
    };
    let scratch = common::scratch();
    let d = scratch.path();
    let src = d.join("src");
    make_data_tree(&src, 4);
    let list = d.join("prefetch.txt");
    fs::write(&list, "# startup files\n/a/b\ncopy0\n").expect("list");
    let bootstrap = d.join("image.boot");
    let blobs = d.join("blobs");
    build_image(
        &src,
        &bootstrap,
        &blobs,
        &[
            std::ffi::OsStr::new("--chunk-size"),
            std::ffi::OsStr::new("64K"),
            std::ffi::OsStr::new("--prefetch-list"),
            list.as_os_str(),
        ],
    );
    let b = Bootstrap::load(&bootstrap).expect("bootstrap");
    let listed: Vec<u32> = b.prefetch().collect();
    let under_ab = fs::read_dir(src.join("a/b")).expect("a/b").count();
    assert_eq!(listed.len(), under_ab + 1, "prefetch table {listed:?}");
    let want_chunks: std::collections::HashSet<[u8; 32]> = listed
        .iter()
        .flat_map(|&i| b.file_chunks(i).iter().map(|c| c.digest))
        .collect();
    // A path not in the image is refused.
    fs::write(&list, "/no/such/file\n").expect("list");
    let out = run_skiff([
        std::ffi::OsStr::new("build"),
        src.as_os_str(),
        std::ffi::OsStr::new("--bootstrap"),
        d.join("other.boot").as_os_str(),
        std::ffi::OsStr::new("--blob-dir"),
        blobs.as_os_str(),
        std::ffi::OsStr::new("--prefetch-list"),
        list.as_os_str(),
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));

    upload(&server, &bootstrap, &blobs);
    let m = d.join("m.json");
    let args = mount_args(d, &bootstrap, &server.endpoint(), &d.join("cache"), &m, &[]);
    let mnt = Mount::with_args(&args, &d.join("mnt"));
    let start = Instant::now();
    while !m.exists() || metric(&m, "prefetch_complete") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prefetch did not finish\n{}",
            mnt.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric(&m, "prefetch_chunks_total"),
        want_chunks.len() as u64
    );
    assert_no_diff("after list prefetch", &snapshot(&src), &snapshot(&mnt.dir));
    mnt.unmount();
}

// ---------------------------------------------------------------------------------------------
// Faults between Skiff and S3, injected by the shared middlebox (tests/common/middlebox.rs)

/// What the proxy does to the n-th request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ProxyFault {
    Pass,
    Status500,
    Reset,
    Truncate,
    BitFlip,
    Stall,
}

fn schedule(n: u64) -> ProxyFault {
    match n % 11 {
        1 => ProxyFault::Status500,
        3 => ProxyFault::Reset,
        5 => ProxyFault::Truncate,
        7 => ProxyFault::BitFlip,
        9 if n % 33 == 9 => ProxyFault::Stall,
        _ => ProxyFault::Pass,
    }
}

/// A fault proxy to 127.0.0.1:`upstream` on [`schedule`]; `always` overrides the schedule.
fn fault_proxy(upstream: u16, always: Option<ProxyFault>) -> Middlebox {
    Middlebox::start(
        upstream,
        Arc::new(
            move |n, _head: &str| match always.unwrap_or_else(|| schedule(n)) {
                ProxyFault::Pass => Action::Pass,
                ProxyFault::Status500 => {
                    Action::Respond(http_response("500 Internal Server Error", &[], b""))
                }
                ProxyFault::Reset => Action::Reset,
                ProxyFault::Truncate => Action::Truncate,
                ProxyFault::BitFlip => Action::BitFlip,
                ProxyFault::Stall => Action::Stall(Duration::from_secs(3)),
            },
        ),
    )
}

#[test]
fn faults_are_retried_and_never_served() {
    let Some((server, img, want, _)) = served_data_image(6) else {
        return;
    };

    let proxy = fault_proxy(server.port, None);
    let m = img.dir.join("m.json");
    let args = mount_args(
        &img.dir,
        &img.bootstrap,
        &format!("http://{}", proxy.addr()),
        &img.dir.join("cache"),
        &m,
        &[],
    );
    let mnt = Mount::with_args(&args, &img.dir.join("mnt"));
    assert_no_diff("through the faulty proxy", &want, &snapshot(&mnt.dir));
    mnt.unmount();
    eprintln!(
        "proxy served {} requests; retries {}, verification failures {}",
        proxy.requests.load(Ordering::Relaxed),
        metric(&m, "backend_retries"),
        metric(&m, "verify_failures")
    );
    assert!(metric(&m, "backend_retries") > 0);
    assert!(metric(&m, "verify_failures") > 0);

    // A server that always flips a bit: reads fail with EIO, never wrong bytes.
    let bad = fault_proxy(server.port, Some(ProxyFault::BitFlip));
    let m2 = img.dir.join("m2.json");
    let args = mount_args(
        &img.dir,
        &img.bootstrap,
        &format!("http://{}", bad.addr()),
        &img.dir.join("cache2"),
        &m2,
        &[],
    );
    let mnt = Mount::with_args(&args, &img.dir.join("mnt2"));
    let file = fs::read_dir(mnt.dir.join("a"))
        .expect("readdir")
        .flatten()
        .find(|e| e.path().is_file())
        .expect("a file")
        .path();
    let err = fs::read(&file).expect_err("corrupt bytes must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    mnt.unmount();
}
