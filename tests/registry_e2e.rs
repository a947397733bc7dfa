//! End-to-end tests of `skiff mount --image` against Debian's docker-registry with things
//! between Skiff and the registry: a pull-through-cache mirror that goes away mid-way, a bearer
//! token service with short-lived tokens, and a fault-injecting proxy (500s, resets, truncated
//! and bit-flipped bodies, stalls). Every test compares the mounted tree with the same layer
//! built locally.
//!
//! Prerequisites (root, /dev/fuse, docker-registry) go through `require`: with `CI=true` a
//! missing one fails the test.

mod common;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::middlebox::*;
use common::registry::Registry;
use common::*;
use rand::{RngCore, SeedableRng};

/// Blob GETs in a registry's access log from byte `from`: (bytes of 206 answers, number of
/// 206 answers, number of all blob GETs).
fn blob_ranges_served(reg: &Registry, from: usize) -> (u64, usize, usize) {
    let gets = reg.blob_gets(from);
    let ranges = gets.iter().filter(|g| g.status == 206);
    (
        ranges.clone().map(|g| g.bytes).sum(),
        ranges.count(),
        gets.len(),
    )
}

// ---------------------------------------------------------------------------------------------
// An image: one layer of random files, converted into a registry and built locally

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Names and contents of the image's files: `n` files of 40 kB to 700 kB in three directories.
fn files(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let len = 40_000 + (i * 97_531) % 660_000;
            (format!("d{}/f{i:03}", i % 3), noise(len, 1000 + i as u64))
        })
        .collect()
}

fn layer_tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in ["d0", "d1", "d2"] {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, d, &[][..]).expect("tar dir");
    }
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data.as_slice()).expect("tar file");
    }
    b.into_inner().expect("tar")
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("blobs dir");
    let d = sha256(bytes);
    fs::write(blobs.join(&d[7..]), bytes).expect("blob");
    d
}

/// An OCI image layout at `dir` holding one image of one uncompressed layer.
fn write_layout(dir: &Path, layer: &[u8]) {
    let ld = put_blob(dir, layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [ld]},
    }))
    .expect("json");
    let cd = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    }))
    .expect("json");
    let md = put_blob(dir, &manifest);
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
             "size": manifest.len()}]}))
        .expect("json"),
    )
    .expect("index.json");
}

struct Image {
    /// The same layer built locally and mounted: the reference tree.
    want: std::collections::BTreeMap<Vec<u8>, Facts>,
    files: Vec<(String, Vec<u8>)>,
    /// `skiff convert`'s summary.
    summary: serde_json::Value,
}

/// Makes an image of `n` files, converts it into `target` (with `auth` if given) and builds the
/// same layer locally for the reference snapshot.
fn image(t: &Path, n: usize, target: &str, auth: Option<&str>) -> Image {
    let files = files(n);
    let tar = layer_tar(&files);
    let layout = t.join("layout");
    write_layout(&layout, &tar);
    let json = t.join("convert.json");
    let mut args: Vec<String> = vec![
        "convert".into(),
        "--source".into(),
        layout.display().to_string(),
        "--target".into(),
        target.into(),
        "--json".into(),
        json.display().to_string(),
    ];
    if let Some(a) = auth {
        args.extend(["--registry-auth".into(), a.into()]);
    }
    skiff_ok(&args);
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json).expect("summary")).expect("summary JSON");

    let tar_path = t.join("layer.tar");
    fs::write(&tar_path, &tar).expect("layer.tar");
    let boot = t.join("local.boot");
    let blobs = t.join("local-blobs");
    skiff_ok([
        OsStr::new("build"),
        tar_path.as_os_str(),
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
    ]);
    let local = Mount::new(&boot, &blobs, &t.join("local-mnt"));
    let want = snapshot(&local.dir);
    local.unmount();
    Image {
        want,
        files,
        summary,
    }
}

/// `skiff mount --image REF` arguments with a private cache dir and a metrics file.
fn image_args(reference: &str, cache: &Path, metrics: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--image".into(),
        reference.into(),
        "--cache-dir".into(),
        cache.into(),
        "--metrics-file".into(),
        metrics.into(),
        "--no-image-prefetch".into(),
    ];
    a.extend(extra.iter().map(OsString::from));
    a
}

fn metric(path: &Path, field: &str) -> u64 {
    let v: serde_json::Value = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    v[field].as_u64().unwrap_or(0)
}

/// Reads every file of the image through `dir`, returning the ones whose bytes differed and
/// the ones that failed (with their errors).
fn read_all(dir: &Path, files: &[(String, Vec<u8>)]) -> (Vec<String>, Vec<String>) {
    let (mut wrong, mut failed) = (Vec::new(), Vec::new());
    for (p, data) in files {
        match fs::read(dir.join(p)) {
            Ok(b) if &b == data => {}
            Ok(_) => wrong.push(p.clone()),
            Err(e) => failed.push(format!("{p}: {e}")),
        }
    }
    (wrong, failed)
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A pull-through-cache mirror of the origin serves the blob range reads; when it goes away
/// mid-way, reads fall back to the origin with no error reaching the reader.
#[test]
fn mirror_serves_ranges_then_falls_back_to_the_origin() {
    if !require_fuse() {
        return;
    }
    let started = Instant::now();
    // The origin has no htpasswd: Debian's docker-registry 2.8 as a pull-through cache sends
    // its `proxy.username/password` only to a Bearer-token origin, never as Basic auth
    // (distribution/distribution#3153): an htpasswd origin logs "invalid authorization
    // credential" and the mirror answers 404 MANIFEST_UNKNOWN.
    let Some(origin) = require("a local registry", Registry::start("e2e-origin", &[])) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let origin_ref = format!("{}/test/mirrored:v1", origin.addr);
    let img = image(t, 30, &origin_ref, None);
    let Some(mirror) = require(
        "a pull-through-cache registry",
        Registry::start(
            "e2e-mirror",
            &["--proxy-remote", &format!("http://{}", origin.addr)],
        ),
    ) else {
        return;
    };

    // Warm the mirror: a cold pull-through cache (registry 2.8) ignores Range for a blob it
    // does not hold yet and streams the whole blob with 200, which Skiff refuses (it wants
    // 206), marking the mirror failed. Once the mirror holds the blob it answers ranges.
    for b in img.summary["blobs"].as_array().expect("blobs") {
        let d = b["digest"].as_str().expect("digest");
        let out = Command::new("curl")
            .args(["-sf", "-o", "/dev/null"])
            .arg(format!("http://{}/v2/test/mirrored/blobs/{d}", mirror.addr))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "warming the mirror: {}",
            output_text(&out)
        );
    }
    // The proxy stores the blob as it streams it; wait until it answers a range.
    let d = img.summary["blobs"][0]["digest"].as_str().expect("digest");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-r", "0-9"])
            .arg(format!("http://{}/v2/test/mirrored/blobs/{d}", mirror.addr))
            .output()
            .expect("curl");
        if out.stdout == b"206" || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mlog, olog) = (mirror.log_len(), origin.log_len());
    let m = t.join("m.json");
    let args = image_args(
        &origin_ref,
        &t.join("cache"),
        &m,
        &["--mirror", &mirror.addr],
    );
    let mnt = Mount::with_args(&args, &t.join("mnt"));
    let (first, rest) = img.files.split_at(img.files.len() / 2);
    let (wrong, failed) = read_all(&mnt.dir, first);
    assert!(
        wrong.is_empty() && failed.is_empty(),
        "through the mirror: wrong {wrong:?}, failed {failed:?}\n{}",
        mnt.log_text()
    );
    let (m_bytes, m_ranges, m_all) = blob_ranges_served(&mirror, mlog);
    let (o_bytes1, o_ranges1, _) = blob_ranges_served(&origin, olog);
    eprintln!(
        "first half: mirror answered {m_ranges} range reads ({m_bytes} bytes, {m_all} blob GETs); \
         origin {o_ranges1} range reads ({o_bytes1} bytes)"
    );
    assert!(
        m_ranges > 0 && m_bytes > 0,
        "blob range reads went through the mirror\n{}",
        mnt.log_text()
    );

    // The mirror goes away; the rest of the tree comes from the origin.
    mirror.stop();
    let olog2 = origin.log_len();
    let (wrong, failed) = read_all(&mnt.dir, rest);
    assert!(
        wrong.is_empty() && failed.is_empty(),
        "after the mirror stopped: wrong {wrong:?}, failed {failed:?}\n{}",
        mnt.log_text()
    );
    assert_no_diff("mirror, then origin", &img.want, &snapshot(&mnt.dir));
    let (o_bytes, o_ranges, _) = blob_ranges_served(&origin, olog2);
    let log = mnt.log_text();
    mnt.unmount();
    eprintln!(
        "second half: origin answered {o_ranges} range reads ({o_bytes} bytes); \
         retries {}, {:?} in all",
        metric(&m, "backend_retries"),
        started.elapsed()
    );
    assert!(o_ranges > 0, "the origin served the rest\n{log}");
    assert!(log.contains("mirror failed"), "{log}");
}

/// Tokens the token service issued: value → when.
type Issued = Arc<Mutex<HashMap<String, Instant>>>;

/// A registry behind a bearer-token gate with 2 s tokens: reads go on working past the
/// tokens' lifetime, the client fetching new ones.
#[test]
fn short_lived_bearer_tokens_are_refreshed() {
    if !require_fuse() {
        return;
    }
    let started = Instant::now();
    let Some(reg) = require("a local registry", Registry::start("e2e-token", &[])) else {
        return;
    };
    const LIFETIME: Duration = Duration::from_secs(2);
    let issued: Issued = Arc::default();
    let token_requests = Arc::new(AtomicU64::new(0));
    let (iss, tr) = (issued.clone(), token_requests.clone());
    let token_server = Middlebox::start(
        0,
        Arc::new(move |n, head: &str| {
            tr.fetch_add(1, Ordering::Relaxed);
            let path = head.split(' ').nth(1).unwrap_or("");
            if !path.starts_with("/token?") || !path.contains("scope=repository") {
                return Action::Respond(http_response("400 Bad Request", &[], b""));
            }
            let tok = format!("tok{n}");
            iss.lock()
                .expect("lock")
                .insert(tok.clone(), Instant::now());
            let body = format!(r#"{{"token":"{tok}","expires_in":{}}}"#, LIFETIME.as_secs());
            Action::Respond(http_response(
                "200 OK",
                &[("Content-Type", "application/json".into())],
                body.as_bytes(),
            ))
        }),
    );
    let realm = format!("http://{}/token", token_server.addr());
    let refused = Arc::new(AtomicU64::new(0));
    let expired = Arc::new(AtomicU64::new(0));
    let (iss, rf, ex) = (issued.clone(), refused.clone(), expired.clone());
    let gate = Middlebox::start(
        reg.port,
        Arc::new(move |_, head: &str| {
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let repo = path
                .strip_prefix("/v2/")
                .and_then(|p| p.split("/blobs/").next())
                .and_then(|p| p.split("/manifests/").next())
                .unwrap_or("")
                .to_string();
            let tok = header(head, "authorization").and_then(|a| a.strip_prefix("Bearer "));
            let valid = tok.and_then(|t| iss.lock().expect("lock").get(t).copied());
            match valid {
                Some(at) if at.elapsed() < LIFETIME => return Action::Pass,
                Some(_) => {
                    ex.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            rf.fetch_add(1, Ordering::Relaxed);
            let scope = if repo.is_empty() {
                String::new()
            } else {
                format!(",scope=\"repository:{repo}:pull\"")
            };
            Action::Respond(http_response(
                "401 Unauthorized",
                &[(
                    "WWW-Authenticate",
                    format!("Bearer realm=\"{realm}\",service=\"skiff-test\"{scope}"),
                )],
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
            ))
        }),
    );
    let tmp = scratch();
    let t = tmp.path();
    // Pushed straight to the registry; pulled through the gate.
    let img = image(t, 12, &format!("{}/test/tokens:v1", reg.addr), None);
    let gated_ref = format!("{}/test/tokens:v1", gate.addr());
    let m = t.join("m.json");
    let mnt = Mount::with_args(
        &image_args(&gated_ref, &t.join("cache"), &m, &[]),
        &t.join("mnt"),
    );
    let (first, rest) = img.files.split_at(3);
    let (wrong, failed) = read_all(&mnt.dir, first);
    assert!(
        wrong.is_empty() && failed.is_empty(),
        "{wrong:?} {failed:?}"
    );
    let tokens_before = issued.lock().expect("lock").len();
    // Past the tokens' lifetime, twice.
    let mut left = rest.chunks(rest.len().div_ceil(2));
    for _ in 0..2 {
        std::thread::sleep(LIFETIME + Duration::from_millis(500));
        let part = left.next().unwrap_or_default();
        let (wrong, failed) = read_all(&mnt.dir, part);
        assert!(
            wrong.is_empty() && failed.is_empty(),
            "after the token expired: wrong {wrong:?}, failed {failed:?}\n{}",
            mnt.log_text()
        );
    }
    assert_no_diff("through the token gate", &img.want, &snapshot(&mnt.dir));
    let log = mnt.log_text();
    mnt.unmount();
    let tokens = issued.lock().expect("lock").len();
    eprintln!(
        "token requests {} ({tokens_before} before the first expiry, {tokens} in all); gate \
         requests {}, refused {} (with an expired token {}); {:?}",
        token_requests.load(Ordering::Relaxed),
        gate.requests.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        expired.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(
        tokens > tokens_before && tokens >= 2,
        "new tokens were fetched: {tokens}\n{log}"
    );
    assert!(!log.contains(" ERROR "), "{log}");
}

/// A fault-injecting proxy between Skiff and the registry: every read is right or EIO, never
/// wrong bytes; with a proxy that always flips a bit, reads fail with EIO.
#[test]
fn registry_faults_are_retried_and_never_served() {
    if !require_fuse() {
        return;
    }
    let started = Instant::now();
    let Some(reg) = require("a local registry", Registry::start("e2e-faults", &[])) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let img = image(t, 24, &format!("{}/test/faults:v1", reg.addr), None);
    // Faults on blob range reads only (the manifest and the bootstrap are fetched whole and
    // must be right for the mount to start at all).
    let faults = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let f = faults.clone();
    let ranges = Arc::new(AtomicU64::new(0));
    let r = ranges.clone();
    let proxy = Middlebox::start(
        reg.port,
        Arc::new(move |_, head: &str| {
            if header(head, "range").is_none() {
                return Action::Pass;
            }
            let n = r.fetch_add(1, Ordering::Relaxed);
            let a = match n % 11 {
                1 => Action::Respond(http_response("500 Internal Server Error", &[], b"")),
                3 => Action::Reset,
                5 => Action::Truncate,
                7 => Action::BitFlip,
                9 if n % 33 == 9 => Action::Stall(Duration::from_secs(2)),
                _ => Action::Pass,
            };
            let name = match &a {
                Action::Respond(_) => "500",
                Action::Stall(_) => "stall",
                other => match other {
                    Action::Reset => "reset",
                    Action::Truncate => "truncate",
                    Action::BitFlip => "bitflip",
                    _ => "pass",
                },
            };
            *f.lock().expect("lock").entry(name.to_string()).or_default() += 1;
            a
        }),
    );
    let proxied = format!("{}/test/faults:v1", proxy.addr());
    let cache = t.join("cache");
    let m = t.join("m.json");
    let mnt = Mount::with_args(&image_args(&proxied, &cache, &m, &[]), &t.join("mnt"));
    let (wrong, failed) = read_all(&mnt.dir, &img.files);
    assert!(wrong.is_empty(), "wrong bytes served: {wrong:?}");
    for f in &failed {
        assert!(f.contains("os error 5"), "not EIO: {f}");
    }
    assert_no_diff("through the faulty proxy", &img.want, &snapshot(&mnt.dir));
    mnt.unmount();
    let (retries, verify) = (metric(&m, "backend_retries"), metric(&m, "verify_failures"));
    eprintln!(
        "faults {:?} over {} range reads; retries {retries}, verification failures {verify}, \
         reads that failed (EIO) {}",
        faults.lock().expect("lock"),
        ranges.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(retries > 0, "faults were retried");
    assert!(verify > 0, "bit flips were caught by verification");

    // A clean remount from the same cache, through a proxy that fails every range read: the
    // whole tree comes from the cache, and it is right.
    let dead = Middlebox::start(
        reg.port,
        Arc::new(|_, head: &str| {
            if header(head, "range").is_some() {
                Action::Respond(http_response("500 Internal Server Error", &[], b""))
            } else {
                Action::Pass
            }
        }),
    );
    let m2 = t.join("m2.json");
    let mnt = Mount::with_args(
        &image_args(&format!("{}/test/faults:v1", dead.addr()), &cache, &m2, &[]),
        &t.join("mnt2"),
    );
    assert_no_diff("from the cache", &img.want, &snapshot(&mnt.dir));
    mnt.unmount();

    // A proxy that always flips a bit: EIO, never wrong bytes.
    let bad = Middlebox::start(
        reg.port,
        Arc::new(|_, head: &str| {
            if header(head, "range").is_some() {
                Action::BitFlip
            } else {
                Action::Pass
            }
        }),
    );
    let mnt = Mount::with_args(
        &image_args(
            &format!("{}/test/faults:v1", bad.addr()),
            &t.join("cache3"),
            &t.join("m3.json"),
            &[],
        ),
        &t.join("mnt3"),
    );
    let (wrong, failed) = read_all(&mnt.dir, &img.files[..4]);
    assert!(wrong.is_empty(), "wrong bytes served: {wrong:?}");
    assert_eq!(failed.len(), 4, "every read fails: {failed:?}");
    for f in &failed {
        assert!(f.contains("os error 5"), "not EIO: {f}");
    }
    mnt.unmount();
    eprintln!("{:?} in all", started.elapsed());
}

/// Error classes and the request deadline, against a proxy that stops answering range reads,
/// then answers them 404, then 503, then passes them: a read the registry never answers gets
/// EIO within the deadline (and a log line), the mount serves on, a 404 is not retried, a 503
/// is retried within the deadline, and once the registry answers the same reads succeed.
#[test]
fn a_registry_that_never_answers_gives_eio_within_the_deadline() {
    if !require_fuse() {
        return;
    }
    let started = Instant::now();
    let Some(reg) = require("a local registry", Registry::start("e2e-deadline", &[])) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let img = image(t, 6, &format!("{}/test/deadline:v1", reg.addr), None);
    // 0: never answer, 1: 404, 2: 503, 3: pass. Only range reads: the manifest and the
    // bootstrap must come for the mount to start.
    let mode = Arc::new(AtomicU64::new(0));
    let m = mode.clone();
    let proxy = Middlebox::start(
        reg.port,
        Arc::new(move |_, head: &str| {
            if header(head, "range").is_none() {
                return Action::Pass;
            }
            match m.load(Ordering::Relaxed) {
                0 => Action::Stall(Duration::from_secs(600)),
                1 => Action::Respond(http_response("404 Not Found", &[], b"")),
                2 => Action::Respond(http_response("503 Service Unavailable", &[], b"")),
                _ => Action::Pass,
            }
        }),
    );
    let deadline = Duration::from_secs(3);
    let mnt = Mount::with_args(
        &image_args(
            &format!("{}/test/deadline:v1", proxy.addr()),
            &t.join("cache"),
            &t.join("m.json"),
            &["--request-timeout", "3s"],
        ),
        &t.join("mnt"),
    );
    let read = |i: usize| -> (Result<Vec<u8>, std::io::Error>, Duration) {
        let t = Instant::now();
        (fs::read(mnt.dir.join(&img.files[i].0)), t.elapsed())
    };
    let eio = |r: &Result<Vec<u8>, std::io::Error>| {
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EIO)
    };

    // Never answered: EIO once the deadline passes, not a hang. (The kernel may ask twice,
    // readahead then the page itself, each request within its own deadline.)
    let (r, took) = read(0);
    assert!(eio(&r), "{r:?}\n{}", mnt.log_text());
    assert!(
        took >= deadline && took < deadline * 3,
        "EIO after {took:?}, the deadline being {deadline:?}"
    );
    // The mount serves on meanwhile: the tree is there.
    let listed = fs::read_dir(mnt.dir.join("d0")).expect("readdir").count();
    assert_eq!(
        listed,
        img.files
            .iter()
            .filter(|(p, _)| p.starts_with("d0/"))
            .count()
    );

    // 404 is final: EIO at once, without a retry.
    mode.store(1, Ordering::Relaxed);
    let (r, took) = read(1);
    assert!(eio(&r), "{r:?}");
    assert!(took < deadline / 2, "a 404 took {took:?}");
    // 503 is retried, within the deadline.
    mode.store(2, Ordering::Relaxed);
    let (r, took) = read(2);
    assert!(eio(&r), "{r:?}");
    assert!(took < deadline * 2, "a 503 took {took:?}");

    // The registry answers again: the same files read right.
    mode.store(3, Ordering::Relaxed);
    for i in 0..3 {
        let (r, _) = read(i);
        assert!(
            r.as_ref().is_ok_and(|b| *b == img.files[i].1),
            "{}: {:?}",
            img.files[i].0,
            r.err()
        );
    }
    let log = mnt.log_text();
    mnt.unmount();
    // Each failed request was answered within its deadline, and said so.
    let late: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("read failed; returning EIO") && l.contains("deadline_passed=true"))
        .filter_map(|l| l.split(" ms=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(!late.is_empty(), "no EIO line names the deadline:\n{log}");
    for ms in &late {
        assert!(
            *ms < deadline.as_millis() as u64 + 1000,
            "a request answered after {ms} ms"
        );
    }
    let retried = |status: &str| {
        log.lines()
            .any(|l| l.contains("retrying") && l.contains(&format!("HTTP {status}")))
    };
    assert!(!retried("404"), "a 404 was retried:\n{log}");
    assert!(retried("503"), "a 503 was not retried:\n{log}");
    eprintln!("{:?} in all", started.elapsed());
}
