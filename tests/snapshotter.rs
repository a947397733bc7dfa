//! nydus-snapshotter's host daemon, replayed against `skiff fuse` under the name `nydusd`, with
//! Debian's docker-registry (htpasswd, or behind a bearer-token gate): the fusedev flow as the
//! snapshotter drives it (its exact command line, its stock config JSON with credentials only
//! in `auth`, the shared cache `work_dir`, polling RUNNING, the liveness connection, sendfd to
//! the supervisor), dedicated and shared; credential renewal over `PUT /api/v1/config`;
//! failover after `kill -9` and hot upgrade while a reader streams a large file; bad input.
//!
//! Every mounted tree is compared with the same layer built locally, field by field and byte
//! by byte.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::middlebox::{Action, Middlebox};
use common::nydus::require_nydus_image;
use common::oci::{have, layer, noise, skopeo_push, write_layout, Ent};
use common::registry::Registry;
use common::snapshotter::*;
use common::token_gate::TokenGate;
use common::unix_http::http;
use common::*;

const USER: &str = "snap";
const PASS: &str = "s3cret-pw";

fn creds() -> String {
    format!("{USER}:{PASS}")
}

/// An image converted into a registry, and the same layer built locally and snapshotted.
struct NodeImage {
    reference: String,
    repo: String,
    want: std::collections::BTreeMap<Vec<u8>, Facts>,
    files: Vec<(String, Vec<u8>)>,
}

/// `n` files of 40 kB to 700 kB in three directories, plus `big` bytes in `big.bin`.
fn files(n: usize, seed: u64, big: usize) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let len = 40_000 + (i * 97_531) % 660_000;
            (format!("d{}/f{i:03}", i % 3), noise(len, seed + i as u64))
        })
        .collect();
    if big > 0 {
        v.push(("big.bin".into(), noise(big, seed + 999)));
    }
    v
}

fn node_image(t: &Path, registry: &str, repo: &str, files: Vec<(String, Vec<u8>)>) -> NodeImage {
    let ents = tree(&files);
    let tar = layer(&ents, 1_700_000_000).expect("layer");
    let dir = t.join(repo.replace('/', "_"));
    let layout = dir.join("layout");
    write_layout(
        &layout,
        &[(tar.clone(), "application/vnd.oci.image.layer.v1.tar")],
    )
    .expect("layout");
    let reference = format!("{registry}/{repo}:v1");
    skiff_ok([
        "convert",
        "--source",
        layout.to_str().expect("utf-8"),
        "--target",
        &reference,
        "--registry-auth",
        &creds(),
    ]);
    let tar_path = dir.join("layer.tar");
    fs::write(&tar_path, &tar).expect("layer.tar");
    let want = local_snapshot(&dir, &tar_path);
    NodeImage {
        reference,
        repo: repo.to_string(),
        want,
        files,
    }
}

/// The same tree as a Nydus RAFS v6 image made the way nydus-snapshotter's converter makes it
/// (`nydus-image create --type tar-rafs`, `merge`) and pushed as nydusify lays it out; `want`
/// is Skiff's build of the tar with the directory sizes the v6 image has (EROFS's), read from
/// its own local mount.
fn nydus_v6_image(
    t: &Path,
    registry: &str,
    repo: &str,
    files: Vec<(String, Vec<u8>)>,
) -> NodeImage {
    use common::nydus::{create_layer_blob, layer_blob, merge, nydusify_layout};
    let ents = tree(&files);
    let tar = layer(&ents, 1_700_000_000).expect("layer");
    let dir = t.join(repo.replace('/', "_"));
    fs::create_dir_all(&dir).expect("image dir");
    let tar_path = dir.join("layer.tar");
    fs::write(&tar_path, &tar).expect("layer.tar");
    let blob = dir.join("layer.blob");
    create_layer_blob(&tar_path, &blob, None, None);
    let lb = layer_blob(&blob, &dir);
    let merged = dir.join("merged.boot");
    merge(std::slice::from_ref(&lb), &merged);
    let boot = fs::read(&merged).expect("merged bootstrap");
    assert_eq!(detect_fs_version(&boot), Ok("v6"));
    let layout = dir.join("layout");
    nydusify_layout(&layout, std::slice::from_ref(&lb), &boot);
    let reference = format!("{registry}/{repo}:v1");
    skopeo_push(&layout, &reference, &creds(), false).expect("skopeo push");
    let mut want = local_snapshot(&dir, &tar_path);
    // What the v6 image serves for these, read from the image itself (a local mount).
    let blobs = dir.join("v6-blobs");
    fs::create_dir_all(&blobs).expect("blob dir");
    fs::copy(&blob, blobs.join(lb.digest.trim_start_matches("sha256:"))).expect("blob copy");
    let v6 = Mount::new(&merged, &blobs, &dir.join("v6-mnt"));
    let got = snapshot(&v6.dir);
    v6.unmount();
    for (path, f) in want.iter_mut() {
        if f.kind == "dir" {
            f.size = got[path].size;
        }
    }
    NodeImage {
        reference,
        repo: repo.to_string(),
        want,
        files,
    }
}

/// The entries of a test image: three directories, `files`, a symlink and a hard link.
fn tree(files: &[(String, Vec<u8>)]) -> Vec<Ent<'_>> {
    let mut ents = vec![
        Ent::Dir("d0", 0o755),
        Ent::Dir("d1", 0o755),
        Ent::Dir("d2", 0o750),
    ];
    ents.extend(files.iter().map(|(p, d)| Ent::File(p, 0o644, d.clone())));
    ents.push(Ent::Symlink("d0/link", "../big.bin"));
    if let Some((p, _)) = files.first() {
        ents.push(Ent::Link("hardlink", p));
    }
    ents
}

/// `skiff build` of `tar` into `dir`, mounted and snapshotted: the tree every image of these
/// tests is compared with.
fn local_snapshot(dir: &Path, tar: &Path) -> std::collections::BTreeMap<Vec<u8>, Facts> {
    let (boot, blobs) = (dir.join("local.boot"), dir.join("local-blobs"));
    skiff_ok([
        OsStr::new("build"),
        tar.as_os_str(),
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
    ]);
    let local = Mount::new(&boot, &blobs, &dir.join("local-mnt"));
    let want = snapshot(&local.dir);
    local.unmount();
    want
}

/// The snapshotter's layout of one daemon under `root`.
struct Node {
    /// Holds `root`: a short directory under /tmp, because the API and supervisor sockets
    /// under it must fit a socket address (108 bytes) whatever the checkout's path.
    _short: tempfile::TempDir,
    root: PathBuf,
    work_dir: PathBuf,
    nydusd: PathBuf,
}

impl Node {
    fn new(t: &Path) -> Node {
        let short = tempfile::Builder::new()
            .prefix("skn")
            .tempdir_in("/tmp")
            .expect("a directory under /tmp");
        let root = short.path().join("io.containerd.snapshotter.v1.nydus");
        let work_dir = root.join("cache");
        fs::create_dir_all(&work_dir).expect("cache dir");
        Node {
            nydusd: nydusd_link(t),
            _short: short,
            root,
            work_dir,
        }
    }

    /// The command of a daemon with id `id`, as `BuildDaemonCommand` makes it.
    fn command(
        &self,
        id: &str,
        config: Option<&Path>,
        bootstrap: Option<&Path>,
        mountpoint: &Path,
    ) -> DaemonCommand {
        let sock = self.root.join("socket").join(id);
        let logs = self.root.join("logs").join(id);
        fs::create_dir_all(&sock).expect("socket dir");
        fs::create_dir_all(&logs).expect("log dir");
        fs::create_dir_all(self.root.join("supervisor")).expect("supervisor dir");
        DaemonCommand {
            thread_num: Some(4),
            id: Some(id.to_string()),
            config: config.map(Path::to_owned),
            bootstrap: bootstrap.map(Path::to_owned),
            mountpoint: mountpoint.to_owned(),
            apisock: sock.join("api.sock"),
            log_level: "info".into(),
            log_rotation_size: 100,
            supervisor: Some(self.root.join("supervisor").join(format!("{id}.sock"))),
            log_file: Some(logs.join("nydusd.log")),
            failover_policy: "resend".into(),
            ..Default::default()
        }
    }

    fn write_config(&self, id: &str, text: &str) -> PathBuf {
        let dir = self.root.join("config").join(id);
        fs::create_dir_all(&dir).expect("config dir");
        let p = dir.join("config.json");
        fs::write(&p, text).expect("config");
        p
    }
}

/// Reads each file under `mnt` and returns those whose bytes differ, and those that failed.
fn read_files(mnt: &Path, files: &[(String, Vec<u8>)]) -> (Vec<String>, Vec<String>) {
    let (mut wrong, mut failed) = (Vec::new(), Vec::new());
    for (p, want) in files {
        match fs::read(mnt.join(p)) {
            Ok(got) if &got == want => {}
            Ok(_) => wrong.push(p.clone()),
            Err(e) => failed.push(format!("{p}: {e}")),
        }
    }
    (wrong, failed)
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_default()
}

fn host_ready() -> bool {
    require_fuse()
}

/// The Git Commit line of `nydusd --version`, which the snapshotter compares with the running
/// daemon's `git_commit` before it decides to upgrade it.
fn nydusd_git_commit(nydusd: &Path) -> String {
    let out = std::process::Command::new(nydusd)
        .arg("--version")
        .output()
        .expect("nydusd --version");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Git Commit:"))
        .map(|s| s.trim().to_string())
        .expect("a Git Commit line")
}

#[test]
fn dedicated_daemon_serves_the_image_as_the_snapshotter_drives_it() {
    if !host_ready() {
        return;
    }
    let started = Instant::now();
    let Some(reg) = require(
        "a local registry",
        Registry::start("snap-dedicated", &["--htpasswd", &creds()]),
    ) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let img = node_image(t, &reg.addr, "test/app", files(20, 7, 3 << 20));
    let node = Node::new(t);
    // Something of the snapshotter's own in the shared cache: Skiff must not touch it.
    let foreign = node.work_dir.join("0123abcd.blob.data");
    fs::write(&foreign, b"not Skiff's").expect("foreign file");

    let boot = pull_bootstrap(&img.reference, &creds(), &node.root, "42");
    let config = node.write_config(
        "d42",
        &stock_config("42", &reg.addr, &img.repo, &auth(&creds()), &node.work_dir),
    );
    let mnt = node.root.join("snapshots/42/mnt");
    let cmd = node.command("d42", Some(&config), Some(&boot), &mnt);
    let log_from = reg.log_len();
    let mut d = HostDaemon::spawn(&node.nydusd, &cmd, &t.join("home"));
    d.wait_state("RUNNING");
    let ready = d.started.elapsed();
    let _liveness = liveness_connection(&d.api);
    // After RUNNING the snapshotter has the daemon send its states to the supervisor.
    let mut sup = Supervisor::new(cmd.supervisor.as_deref().expect("supervisor"));
    let (s, b) = sup.fetch_states(|| put(&d.api, "/api/v1/daemon/fuse/sendfd"));
    assert_eq!(s, 204, "{b}\n{}", d.log_text());
    assert!(!sup.data.is_empty() && sup.fd.is_some());

    let info = json(&http(&d.api, "GET", "/api/v1/daemon", None).expect("info").1);
    assert_eq!(info["state"], "RUNNING");
    assert_eq!(info["id"], "d42");
    assert_eq!(
        info["version"]["git_commit"].as_str(),
        Some(nydusd_git_commit(&node.nydusd).as_str()),
        "the same binary: no upgrade when the snapshotter restarts"
    );

    assert_no_diff("the host mount", &img.want, &snapshot(&mnt));
    let (s, m) = http(&d.api, "GET", "/api/v1/metrics?id=%2F42", None).expect("metrics");
    assert_eq!(s, 200);
    let m = json(&m);
    assert!(m["data_read"].as_u64().unwrap_or(0) > 0, "{m}");
    let (s, c) = http(&d.api, "GET", "/api/v1/metrics/blobcache?id=%2F42", None).expect("cache");
    assert_eq!(s, 200);
    let c = json(&c);
    assert_eq!(
        c["store_path"].as_str().map(PathBuf::from),
        Some(node.work_dir.join("skiff")),
        "{c}"
    );
    let gets = reg.blob_gets(log_from);
    let bytes: u64 = gets.iter().map(|g| g.bytes).sum();
    assert!(
        !gets.is_empty() && gets.iter().all(|g| g.status == 206),
        "only range reads of blobs (no 401: the credentials from auth went with them): {:?}",
        gets.iter().map(|g| g.status).collect::<Vec<_>>()
    );
    // The node's cache: the snapshotter's file is untouched, Skiff's files are under skiff/.
    assert_eq!(
        fs::read(&foreign).ok().as_deref(),
        Some(&b"not Skiff's"[..])
    );
    let top: Vec<String> = fs::read_dir(&node.work_dir)
        .expect("work dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let mut top = top;
    top.sort();
    assert_eq!(top, ["0123abcd.blob.data", "skiff"]);
    let log = d.log_text();
    let st = d.terminate();
    assert!(st.success(), "{st}\n{log}");
    assert!(!is_mounted(&mnt), "SIGTERM unmounts");
    eprintln!(
        "dedicated: RUNNING after {ready:?}; {} range GETs, {bytes} bytes from the registry; {:?} in all",
        gets.len(),
        started.elapsed()
    );
}

#[test]
fn shared_daemon_mounts_two_images_over_the_api() {
    if !host_ready() {
        return;
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("snap-shared", &["--htpasswd", &creds()]),
    ) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let a = node_image(t, &reg.addr, "test/one", files(8, 100, 0));
    // The second, a Nydus RAFS v6 image as nydusify pushes it.
    if require("skopeo", have("skopeo")).is_none() || require_nydus_image().is_none() {
        return;
    }
    let b = nydus_v6_image(t, &reg.addr, "team/two", files(9, 200, 1 << 20));
    let node = Node::new(t);
    let mnt = node.root.join("mnt");
    let cmd = node.command("shared_daemon", None, None, &mnt);
    let mut d = HostDaemon::spawn(&node.nydusd, &cmd, &t.join("home"));
    d.wait_state("RUNNING");
    for (sid, img) in [("11", &a), ("12", &b)] {
        let boot = pull_bootstrap(&img.reference, &creds(), &node.root, sid);
        let cfg = stock_config(sid, &reg.addr, &img.repo, &auth(&creds()), &node.work_dir);
        node.write_config(sid, &cfg);
        // types.NewMountRequest, as json.Marshal writes it; the query as url.Values encodes it.
        let body = serde_json::json!({"fs_type": "rafs", "source": boot, "config": cfg});
        let (s, r) = http(
            &d.api,
            "POST",
            &format!("/api/v1/mount?mountpoint=%2F{sid}"),
            Some(body.to_string().as_bytes()),
        )
        .expect("mount");
        assert_eq!(s, 204, "{}\n{}", String::from_utf8_lossy(&r), d.log_text());
    }
    assert_no_diff("the first image", &a.want, &snapshot(&mnt.join("11")));
    let mut got = snapshot(&mnt.join("12"));
    // nydus-image writes the root's mtime as 0, which is served as the load time.
    got.get_mut(b"/".as_slice()).expect("root").mtime = b.want[&b"/".to_vec()].mtime;
    assert_no_diff("the second image (Nydus v6)", &b.want, &got);
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("rafs mounted") && l.contains("nydus-rafs-v6")),
        "the daemon served the second image as v6:\n{log}"
    );
    let info = json(&http(&d.api, "GET", "/api/v1/daemon", None).expect("info").1);
    let mps: Vec<&String> = info["mounts"].as_object().expect("mounts").keys().collect();
    assert_eq!(mps, ["/11", "/12"]);
    // The first image goes away; the second keeps working.
    let (s, _) = http(&d.api, "DELETE", "/api/v1/mount?mountpoint=%2F11", None).expect("umount");
    assert_eq!(s, 204);
    assert!(
        !mnt.join("11").exists(),
        "the unmounted image's directory is gone"
    );
    let (wrong, failed) = read_files(&mnt.join("12"), &b.files);
    assert!(
        wrong.is_empty() && failed.is_empty(),
        "{wrong:?} {failed:?}"
    );
    let st = d.terminate();
    assert!(st.success());
}

/// nydusd's `prefetch_files` in the mount body (the snapshotter's prefetch list) is honoured:
/// with `prefetch_all` off, the daemon fetches the listed file and nothing else before any
/// read, and serves it from its cache once the registry is gone.
#[test]
fn prefetch_files_in_the_mount_body_are_fetched_before_any_read() {
    if !host_ready() {
        return;
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("snap-prefetch", &["--htpasswd", &creds()]),
    ) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let img = node_image(t, &reg.addr, "test/pf", files(8, 300, 0));
    let (listed, data) = img
        .files
        .iter()
        .find(|(p, _)| p == "d1/f004")
        .expect("d1/f004")
        .clone();
    let smallest_other = img
        .files
        .iter()
        .filter(|(p, _)| *p != listed)
        .map(|(_, d)| d.len() as u64)
        .min()
        .expect("other files");
    let node = Node::new(t);
    let mnt = node.root.join("mnt");
    let cmd = node.command("pf", None, None, &mnt);
    let mut d = HostDaemon::spawn(&node.nydusd, &cmd, &t.join("home"));
    d.wait_state("RUNNING");
    let boot = pull_bootstrap(&img.reference, &creds(), &node.root, "21");
    let cfg = stock_config("21", &reg.addr, &img.repo, &auth(&creds()), &node.work_dir)
        .replace(r#""prefetch_all":true"#, r#""prefetch_all":false"#);
    node.write_config("21", &cfg);
    let mark = reg.log_len();
    let body = serde_json::json!({"fs_type": "rafs", "source": boot, "config": cfg,
        "prefetch_files": [format!("/{listed}")]});
    let (s, r) = http(
        &d.api,
        "POST",
        "/api/v1/mount?mountpoint=%2F21",
        Some(body.to_string().as_bytes()),
    )
    .expect("mount");
    assert_eq!(s, 204, "{}\n{}", String::from_utf8_lossy(&r), d.log_text());
    // The registry logs a request after its last byte: wait (bounded) for the listed bytes.
    let ranged = |gets: &[common::registry::BlobGet]| -> u64 {
        gets.iter()
            .filter(|g| g.status == 206)
            .map(|g| g.bytes)
            .sum()
    };
    let start = std::time::Instant::now();
    while ranged(&reg.blob_gets(mark)) < data.len() as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the listed file was not prefetched: {} range bytes\n{}",
            ranged(&reg.blob_gets(mark)),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Only the listed file: less than it and the smallest other file together.
    let fetched = ranged(&reg.blob_gets(mark));
    assert!(
        fetched < data.len() as u64 + smallest_other,
        "{fetched} range bytes for a listed file of {}",
        data.len()
    );
    reg.stop();
    assert_eq!(
        fs::read(mnt.join("21").join(&listed)).expect("the listed file, from the cache"),
        data
    );
    let st = d.terminate();
    assert!(st.success());
}

/// Behind a bearer-token gate whose tokens live 2 s: reads go on across expiries; after the
/// password changes, cold reads fail with EIO (never hang) and the log says why, until
/// `PUT /api/v1/config?id=` brings the new password; then they work again, with no remount.
#[test]
fn registry_auth_is_renewed_over_the_api_without_a_remount() {
    if !host_ready() {
        return;
    }
    let started = Instant::now();
    let Some(reg) = require("a local registry", Registry::start("snap-renew", &[])) else {
        return;
    };
    const LIFETIME: Duration = Duration::from_secs(2);
    let gate = TokenGate::start(reg.port, LIFETIME, Some(&creds()));
    let tmp = scratch();
    let t = tmp.path();
    // Pushed straight to the registry; read through the gate.
    let img = node_image(t, &reg.addr, "test/renew", files(18, 300, 0));
    let node = Node::new(t);
    let mnt = node.root.join("mnt");
    let cmd = node.command("shared_daemon", None, None, &mnt);
    let mut d = HostDaemon::spawn(&node.nydusd, &cmd, &t.join("home"));
    d.wait_state("RUNNING");
    let boot = pull_bootstrap(&img.reference, &creds(), &node.root, "21");
    // No prefetch here: every file read below must be a cold read from the registry.
    let cfg = stock_config(
        "21",
        &gate.gate.addr(),
        &img.repo,
        &auth(&creds()),
        &node.work_dir,
    )
    .replace(
        r#""fs_prefetch":{"enable":true,"#,
        r#""fs_prefetch":{"enable":false,"#,
    );
    let body = serde_json::json!({"fs_type": "rafs", "source": boot, "config": cfg});
    let (s, r) = http(
        &d.api,
        "POST",
        "/api/v1/mount?mountpoint=%2F21",
        Some(body.to_string().as_bytes()),
    )
    .expect("mount");
    assert_eq!(s, 204, "{}", String::from_utf8_lossy(&r));
    let dir = mnt.join("21");
    let mut parts = img.files.chunks(3);
    let mut next = || parts.next().expect("files left");
    let (wrong, failed) = read_files(&dir, next());
    assert!(
        wrong.is_empty() && failed.is_empty(),
        "{wrong:?} {failed:?}\n{}",
        d.log_text()
    );
    // Across two token expiries.
    for _ in 0..2 {
        std::thread::sleep(LIFETIME + Duration::from_millis(300));
        let (wrong, failed) = read_files(&dir, next());
        assert!(
            wrong.is_empty() && failed.is_empty(),
            "after expiry: {wrong:?} {failed:?}\n{}",
            d.log_text()
        );
    }
    let tokens_before = gate.tokens_issued();
    assert!(
        tokens_before >= 2,
        "new tokens were fetched: {tokens_before}"
    );

    // The password changes; the old tokens expire.
    const NEW: &str = "n3w-pw";
    gate.set_password(USER, NEW);
    std::thread::sleep(LIFETIME + Duration::from_millis(300));
    let cold = next();
    let t0 = Instant::now();
    let r = fs::read(dir.join(&cold[0].0));
    let took = t0.elapsed();
    let err = r.expect_err("a cold read with refused credentials fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took < Duration::from_secs(30),
        "it fails, it does not hang: {took:?}"
    );
    let log = d.log_text();
    assert!(
        log.contains("credentials were refused"),
        "the log says why:\n{log}"
    );
    // The snapshotter's UpdateAuthConfig: the new password, for the mount's id.
    let (s, r) = http(
        &d.api,
        "PUT",
        "/api/v1/config?id=%2F21",
        Some(
            format!(
                r#"{{"registry_auth":"{}"}}"#,
                auth(&format!("{USER}:{NEW}"))
            )
            .as_bytes(),
        ),
    )
    .expect("config");
    assert_eq!(s, 204, "{}", String::from_utf8_lossy(&r));
    let (wrong, failed) = read_files(&dir, cold);
    assert!(
        wrong.is_empty() && failed.is_empty(),
        "renewed: {wrong:?} {failed:?}\n{}",
        d.log_text()
    );
    let (wrong, failed) = read_files(&dir, next());
    assert!(
        wrong.is_empty() && failed.is_empty(),
        "{wrong:?} {failed:?}"
    );
    let info = json(&http(&d.api, "GET", "/api/v1/daemon", None).expect("info").1);
    assert_eq!(
        info["mounts"].as_object().map(|m| m.len()),
        Some(1),
        "no remount: {info}"
    );
    let (s, _) = http(
        &d.api,
        "PUT",
        "/api/v1/config?id=%2Fnope",
        Some(b"{\"registry_auth\":\"dTpw\"}"),
    )
    .expect("config");
    assert_eq!(s, 404, "an id that names no mount");
    let st = d.terminate();
    assert!(st.success());
    eprintln!(
        "renewal: tokens issued {}, refused credentials {}, gate refusals {} ({} expired); EIO after {took:?}; {:?} in all",
        gate.tokens_issued(),
        gate.refused_credentials.load(Ordering::Relaxed),
        gate.refused.load(Ordering::Relaxed),
        gate.expired.load(Ordering::Relaxed),
        started.elapsed()
    );
}

/// A reader streaming `file` through the mount: `sha256sum`, in a process of its own, since a
/// file of the mount open in this process would be closed (flushed) in every child it forks,
/// the new daemons included, which would then wait on the daemon they are to replace.
struct Reader {
    child: std::process::Child,
    file: PathBuf,
}

impl Reader {
    fn start(file: PathBuf) -> Reader {
        let child = std::process::Command::new("sha256sum")
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        Reader { child, file }
    }

    /// How far it has read (its file position, from /proc: nothing there touches the mount).
    fn position(&self) -> u64 {
        let pid = self.child.id();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return 0;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).ok().as_deref() == Some(self.file.as_path()) {
                let info = fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .unwrap_or_default();
                return info
                    .lines()
                    .find_map(|l| l.strip_prefix("pos:"))
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(0);
            }
        }
        0
    }

    fn finished(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The sha256 it read, or what went wrong.
    fn result(self) -> Result<String, String> {
        let out = self.child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string())
    }
}

/// Watches /proc/self/mounts for `mnt` every 5 ms until stopped; returns whether it was ever
/// missing.
fn watch_mount(mnt: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut missing = false;
        while !stop.load(Ordering::Relaxed) {
            missing |= !is_mounted(&mnt);
            std::thread::sleep(Duration::from_millis(5));
        }
        missing
    })
}

/// What the failover and hot-upgrade tests share: an image with a 48 MiB file behind a
/// registry whose blob reads each take 30 ms (so that a reader always has a request in the
/// daemon), a dedicated daemon without prefetch, RUNNING, its states with the supervisor, and
/// a reader streaming the big file.
struct Streaming {
    _tmp: tempfile::TempDir,
    _reg: Registry,
    _slow: Middlebox,
    node: Node,
    cmd: DaemonCommand,
    daemon: HostDaemon,
    sup: Supervisor,
    want: String,
    reader: Reader,
    watch_stop: Arc<AtomicBool>,
    watcher: std::thread::JoinHandle<bool>,
}

const BIG: usize = 48 << 20;

fn start_streaming(name: &str) -> Option<Streaming> {
    if !host_ready() {
        return None;
    }
    let reg = require(
        "a local registry",
        Registry::start(name, &["--htpasswd", &creds()]),
    )?;
    let slow = Middlebox::start(
        reg.port,
        Arc::new(|_, head: &str| {
            if head.contains("/blobs/") {
                Action::Stall(Duration::from_millis(30))
            } else {
                Action::Pass
            }
        }),
    );
    let tmp = scratch();
    let t = tmp.path().to_owned();
    let img = node_image(&t, &reg.addr, "test/big", files(2, 500, BIG));
    let (name, data) = img.files.last().expect("big");
    assert_eq!(name, "big.bin");
    assert_eq!(
        img.want[&b"/big.bin"[..]].content.as_deref(),
        Some(blake3::hash(data).to_hex().as_str()),
        "the local build has these bytes"
    );
    // What sha256sum prints for them.
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(data))
    };
    let node = Node::new(&t);
    let boot = pull_bootstrap(&img.reference, &creds(), &node.root, "31");
    let cfg = stock_config(
        "31",
        &slow.addr(),
        &img.repo,
        &auth(&creds()),
        &node.work_dir,
    )
    .replace(
        r#""fs_prefetch":{"enable":true,"#,
        r#""fs_prefetch":{"enable":false,"#,
    );
    let config = node.write_config("d31", &cfg);
    let mnt = node.root.join("snapshots/31/mnt");
    let cmd = node.command("d31", Some(&config), Some(&boot), &mnt);
    let mut daemon = HostDaemon::spawn(&node.nydusd, &cmd, &t.join("home"));
    daemon.wait_state("RUNNING");
    let mut sup = Supervisor::new(cmd.supervisor.as_deref().expect("supervisor"));
    let (s, b) = sup.fetch_states(|| put(&daemon.api, "/api/v1/daemon/fuse/sendfd"));
    assert_eq!(s, 204, "{b}");
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_mount(mnt.clone(), watch_stop.clone());
    let reader = Reader::start(mnt.join("big.bin"));
    // Into the stream, so that the hand-over happens with reads in flight.
    let t0 = Instant::now();
    while reader.position() < (BIG / 4) as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the reader does not progress\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(Streaming {
        _tmp: tmp,
        _reg: reg,
        _slow: slow,
        node,
        cmd,
        daemon,
        sup,
        want,
        reader,
        watch_stop,
        watcher,
    })
}

impl Streaming {
    /// The reader's result, and whether the mount ever went missing. A reader that has not
    /// finished within two minutes hangs: the connection is aborted so that it fails.
    fn finish(mut self, new: &mut HostDaemon) -> (Result<String, String>, bool, String) {
        let t0 = Instant::now();
        while !self.reader.finished() && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.reader.finished() {
            abort_fuse(&self.cmd.mountpoint);
        }
        let got = self.reader.result();
        self.watch_stop.store(true, Ordering::Relaxed);
        let missing = self.watcher.join().expect("watcher");
        let log = new.log_text();
        (got, missing, log)
    }
}

#[test]
fn failover_after_kill_9_keeps_a_streaming_reader_going() {
    let Some(mut s) = start_streaming("snap-failover") else {
        return;
    };
    let at = s.reader.position();
    s.daemon.kill9();
    let killed = Instant::now();
    // doDaemonFailover: the supervisor offers the states, the same command starts a new
    // daemon, which finds its predecessor dead and waits in INIT; takeover, start.
    let sender = s.sup.send_states();
    let mut new = HostDaemon::spawn(&s.node.nydusd, &s.cmd, &s.node.root.join("home2"));
    new.wait_state("INIT");
    let (st, b) = put(&new.api, "/api/v1/daemon/fuse/takeover");
    assert_eq!(st, 204, "takeover: {b}\n{}", new.log_text());
    sender.join().expect("sender").expect("states sent");
    let (st, b) = put(&new.api, "/api/v1/daemon/start");
    assert_eq!(st, 204, "start: {b}\n{}", new.log_text());
    new.wait_state("RUNNING");
    let serving_again = killed.elapsed();
    let want = s.want.clone();
    let (got, missing, log) = s.finish(&mut new);
    assert_eq!(
        got.as_deref(),
        Ok(want.as_str()),
        "the reader's bytes\n{log}"
    );
    assert!(!missing, "the mount disappeared during the failover");
    assert!(log.contains("resend"), "{log}");
    let st = new.terminate();
    assert!(st.success(), "{log}");
    eprintln!("failover: killed at {at} bytes read; serving again after {serving_again:?}");
}

#[test]
fn hot_upgrade_keeps_a_streaming_reader_going() {
    let Some(mut s) = start_streaming("snap-upgrade") else {
        return;
    };
    // DoDaemonUpgrade: a new daemon on the next API socket, started with --upgrade.
    let mut next = s.cmd.clone();
    next.apisock = s.cmd.apisock.with_file_name("api1.sock");
    next.upgrade = true;
    let sender = s.sup.send_states();
    let t0 = Instant::now();
    let mut new = HostDaemon::spawn(&s.node.nydusd, &next, &s.node.root.join("home2"));
    new.wait_state("INIT");
    let (st, b) = put(&new.api, "/api/v1/daemon/fuse/takeover");
    assert_eq!(st, 204, "takeover: {b}\n{}", new.log_text());
    sender.join().expect("sender").expect("states sent");
    new.wait_state("READY");
    // The old daemon exits without unmounting; then the new one starts.
    let (st, b) = put(&s.daemon.api, "/api/v1/daemon/exit");
    assert_eq!(st, 204, "exit: {b}");
    let old = s.daemon.wait_exit(Duration::from_secs(30));
    assert!(
        old.success(),
        "the old daemon exits cleanly: {old}\n{}",
        s.daemon.log_text()
    );
    let (st, b) = put(&new.api, "/api/v1/daemon/start");
    assert_eq!(st, 204, "start: {b}\n{}", new.log_text());
    new.wait_state("RUNNING");
    let handover = t0.elapsed();
    let want = s.want.clone();
    let old_log = s.daemon.log_text();
    let (got, missing, log) = s.finish(&mut new);
    assert_eq!(
        got.as_deref(),
        Ok(want.as_str()),
        "the reader's bytes\n{log}\n{old_log}"
    );
    assert!(!missing, "the mount disappeared during the upgrade");
    assert!(old_log.contains("leaving the mount"), "{old_log}");
    let st = new.terminate();
    assert!(st.success());
    eprintln!("hot upgrade: hand-over took {handover:?}");
}

#[test]
fn bad_input_is_refused_and_the_daemon_keeps_serving() {
    if !host_ready() {
        return;
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("snap-bad", &["--htpasswd", &creds()]),
    ) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let img = node_image(t, &reg.addr, "test/bad", files(6, 600, 0));
    let node = Node::new(t);

    // Options Skiff refuses, at start, with one line that says why.
    for (extra, what) in [
        (vec!["--backend-source", "http://x"], "--backend-source"),
        (vec!["--fscache", "/tmp/x"], "--fscache"),
        (vec!["--failover-policy", "flush"], "flush"),
        (vec!["--writable"], "--writable"),
        (vec!["--thread-num", "0"], "--thread-num"),
    ] {
        let mut cmd = node.command("bad", None, None, &node.root.join("badmnt"));
        cmd.failover_policy = String::new();
        cmd.thread_num = None;
        let mut argv = cmd.argv();
        argv.extend(extra.iter().map(|s| s.to_string()));
        let out = std::process::Command::new(&node.nydusd)
            .args(&argv)
            .output()
            .expect("nydusd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} accepted");
        assert!(
            stderr.contains(what) && stderr.trim().lines().count() == 1,
            "{what}: {stderr}"
        );
    }
    let out = std::process::Command::new(&node.nydusd)
        .args(["singleton", "--fscache", "/x"])
        .output()
        .expect("nydusd singleton");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fscache"));

    let mnt = node.root.join("mnt");
    let cmd = node.command("shared_daemon", None, None, &mnt);
    let mut d = HostDaemon::spawn(&node.nydusd, &cmd, &t.join("home"));
    d.wait_state("RUNNING");
    let boot = pull_bootstrap(&img.reference, &creds(), &node.root, "51");
    let good = stock_config("51", &reg.addr, &img.repo, &auth(&creds()), &node.work_dir);
    let mount = |mp: &str, source: &Path, config: &str| {
        let body = serde_json::json!({"fs_type": "rafs", "source": source, "config": config});
        let (s, b) = http(
            &d.api,
            "POST",
            &format!("/api/v1/mount?mountpoint={mp}"),
            Some(body.to_string().as_bytes()),
        )
        .expect("mount");
        (s, json(&b))
    };
    let (s, _) = mount("/51", &boot, &good);
    assert_eq!(s, 204);
    let refused_keys = [
        (
            r#""enable_xattr":true"#,
            r#""enable_xattr":false"#,
            "enable_xattr",
        ),
        (r#""mode":"direct""#, r#""mode":"weird""#, "mode"),
        (
            r#""digest_validate":false"#,
            r#""digest_validate":false,"iostats_files":true"#,
            "iostats_files",
        ),
        (
            r#""digest_validate":false"#,
            r#""digest_validate":false,"access_pattern":true"#,
            "access_pattern",
        ),
        (
            r#""digest_validate":false"#,
            r#""digest_validate":false,"warmup":10"#,
            "warmup",
        ),
        (
            r#""digest_validate":false"#,
            r#""digest_validate":false,"nonsense":1"#,
            "nonsense",
        ),
        (
            r#""type":"blobcache""#,
            r#""type":"fscache""#,
            "device.cache.type",
        ),
        (
            r#""type":"registry""#,
            r#""type":"localdisk""#,
            "device.backend.type",
        ),
        (r#""readahead":false"#, r#""readahead":true"#, "readahead"),
        (
            r#""merging_size":1048576"#,
            r#""merging_size":1048576,"stream_prefetch":true"#,
            "stream_prefetch",
        ),
        (
            r#""disable_indexed_map":false"#,
            r#""disable_indexed_map":false,"enable_encryption":true"#,
            "enable_encryption",
        ),
    ];
    for (from, to, key) in refused_keys {
        assert!(good.contains(from), "{from}");
        let cfg = good.replace(from, to);
        let (s, b) = mount("/52", &boot, &cfg);
        assert_eq!(
            (s, b["code"].as_str()),
            (400, Some("UNSUPPORTED_CONFIG")),
            "{key}: {b}"
        );
        let msg = b["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(key) && msg.len() > key.len() + 30,
            "{key}: {msg}"
        );
    }
    let bad_requests: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("POST", "/api/v1/mount?mountpoint=/51", Some(serde_json::json!({"fs_type":"rafs","source":boot,"config":good}).to_string()), 409, "MOUNTPOINT_BUSY"),
        ("POST", "/api/v1/mount?mountpoint=/a/b", Some(serde_json::json!({"fs_type":"rafs","source":boot,"config":good}).to_string()), 400, "INVALID_MOUNTPOINT"),
        ("POST", "/api/v1/mount?mountpoint=/53", Some(serde_json::json!({"fs_type":"passthrough_fs","source":"/tmp","config":""}).to_string()), 400, "INVALID_MOUNTPOINT"),
        ("POST", "/api/v1/mount?mountpoint=/53", Some(serde_json::json!({"fs_type":"rafs","source":"/no/such.boot","config":good}).to_string()), 400, "INVALID_SOURCE"),
        ("POST", "/api/v1/mount?mountpoint=/53", Some(serde_json::json!({"fs_type":"rafs","source":boot,"config":"{"}).to_string()), 400, "INVALID_CONFIG"),
        ("POST", "/api/v1/mount?mountpoint=/53", Some(serde_json::json!({"fs_type":"rafs","source":boot,"config":good,"prefetch_files":["/not/in/the/image"]}).to_string()), 400, "INVALID_STORAGE"),
        ("POST", "/api/v1/mount?mountpoint=/53", Some("not json".into()), 400, "INVALID_JSON"),
        ("DELETE", "/api/v1/mount?mountpoint=/99", None, 404, "NOT_MOUNTED"),
        ("PUT", "/api/v1/config?id=%2F51", Some(r#"{"registry_auth":"***"}"#.into()), 400, "INVALID_CONFIG"),
        ("PUT", "/api/v1/config?id=%2F51", Some(r#"{"log_level":"debug"}"#.into()), 400, "UNSUPPORTED_CONFIG"),
        ("PUT", "/api/v1/daemon/fuse/takeover", None, 409, "WRONG_STATE"),
        ("PUT", "/api/v1/daemon/start", None, 409, "WRONG_STATE"),
        ("GET", "/api/v1/metrics?id=%2F99", None, 404, "NOT_MOUNTED"),
        ("GET", "/api/v1/nothing", None, 404, "NOT_FOUND"),
        ("PATCH", "/api/v1/daemon", None, 405, "METHOD_NOT_ALLOWED"),
    ];
    for (method, url, body, status, code) in bad_requests {
        let (s, b) =
            http(&d.api, method, url, body.as_deref().map(str::as_bytes)).expect("request");
        let b = json(&b);
        assert_eq!(
            (s, b["code"].as_str()),
            (status, Some(code)),
            "{method} {url}: {b}"
        );
        assert!(
            b["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{method} {url}: no message"
        );
        // It keeps serving its other mount.
        let (wrong, failed) = read_files(&mnt.join("51"), &img.files[..1]);
        assert!(
            wrong.is_empty() && failed.is_empty(),
            "{wrong:?} {failed:?}"
        );
    }
    assert_eq!(d.state().as_deref(), Some("RUNNING"));
    assert_no_diff(
        "after the bad requests",
        &img.want,
        &snapshot(&mnt.join("51")),
    );
    let st = d.terminate();
    assert!(st.success());
}
