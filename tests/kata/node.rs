//! The node's half of a Kata container on a containerd + nydus-snapshotter node: Debian
//! minbase in Debian's docker-registry (htpasswd), as `skiff convert` makes it (the node
//! layout) and as nydus-snapshotter's converter makes it (Nydus RAFS v6: `nydus-image create
//! --type tar-rafs`, `merge`, pushed as nydusify lays it out). The snapshotter's host daemon
//! (`skiff fuse` run as `nydusd`, shared mode, the stock config with the credentials only in
//! `auth`) mounts both and the host reads them whole, so that the node's shared cache
//! (`work_dir`) holds every chunk before Kata's sandbox daemon is asked for the same images.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::listing::{
    assert_same_listing, host_listing, without_dir_sizes, without_unpreserved_v6_tar_fields,
};
use crate::common::nydus::{create_layer_blob, layer_blob, merge, nydusify_layout};
use crate::common::oci::{skopeo_push, write_layout};
use crate::common::registry::Registry;
use crate::common::snapshotter::*;
use crate::common::unix_http::http;
use crate::common::{output_text, skiff_ok};

const USER: &str = "kata";
const PASS: &str = "n0de-pw";

/// The registry credentials, `user:pass`.
pub fn creds() -> String {
    format!("{USER}:{PASS}")
}

/// `base64(user:pass)`, as the config's `auth` and `registry_auth` carry it.
pub fn auth_of(user_pass: &str) -> String {
    auth(user_pass)
}

/// One image as the snapshotter hands it to Kata: the bootstrap it unpacked and the config.
pub struct NodeImage {
    /// The container id in the sandbox (`/rafs/<cid>/lowerdir`).
    pub cid: &'static str,
    /// The snapshot id on the node (the config's `device.id` is `/<sid>`).
    pub sid: &'static str,
    /// `snapshots/<sid>/fs/image/image.boot`.
    pub bootstrap: PathBuf,
    /// The nydusd config, as the host daemon got it.
    pub config: String,
    /// A Nydus RAFS v6 image (else Skiff's node layout).
    pub v6: bool,
}

/// The registry, the host daemon and the images it mounted.
pub struct NodeSide {
    /// The registry (its access log is the bytes fetched).
    pub reg: Registry,
    /// The snapshotter's host daemon, still serving.
    pub host: HostDaemon,
    /// The images.
    pub images: Vec<NodeImage>,
    /// The registry's blob bytes of the host phase.
    pub host_bytes: u64,
    /// Its blob GETs.
    pub host_gets: usize,
}

/// The rootfs as a Debian image's layer: GNU tar (pax, numeric owners, xattrs), uncompressed.
fn rootfs_tar(rootfs: &Path, out: &Path) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar --format=posix --numeric-owner --xattrs --xattrs-include='*' -C '{}' -cf '{}' .",
            rootfs.display(),
            out.display()
        ))
        .output()
        .expect("tar");
    assert!(o.status.success(), "tar: {}", output_text(&o));
}

/// Pushes both images, starts the host daemon, mounts them over its API and checks every
/// file of each against `rootfs` with the lister (which reads every byte); then waits for
/// the daemon's prefetch to be done, so that nothing more is fetched for these images.
pub fn start(t: &Path, rootfs: &Path, lister: &Path) -> NodeSide {
    let reg = Registry::start("kata-node", &["--htpasswd", &creds()])
        .unwrap_or_else(|e| panic!("a local registry: {e}"));
    let started = Instant::now();
    fs::create_dir_all(t).expect("node dir");
    let tar = t.join("debian.tar");
    rootfs_tar(rootfs, &tar);

    // Skiff's node layout, by `skiff convert` from an OCI layout of the layer.
    let layout = t.join("debian-layout");
    write_layout(
        &layout,
        &[(
            fs::read(&tar).expect("layer"),
            "application/vnd.oci.image.layer.v1.tar",
        )],
    )
    .expect("layout");
    let node_ref = format!("{}/debian/minbase:skiff", reg.addr);
    skiff_ok([
        "convert",
        "--source",
        layout.to_str().expect("utf-8"),
        "--target",
        &node_ref,
        "--registry-auth",
        &creds(),
    ]);
    // Nydus RAFS v6, as nydus-snapshotter's converter makes it.
    let v6_dir = t.join("debian-v6");
    fs::create_dir_all(&v6_dir).expect("v6 dir");
    let blob = v6_dir.join("layer.blob");
    create_layer_blob(&tar, &blob, None, None);
    let lb = layer_blob(&blob, &v6_dir);
    let merged = v6_dir.join("merged.boot");
    merge(std::slice::from_ref(&lb), &merged);
    let v6_layout = v6_dir.join("layout");
    nydusify_layout(
        &v6_layout,
        std::slice::from_ref(&lb),
        &fs::read(&merged).expect("merged bootstrap"),
    );
    let v6_ref = format!("{}/debian/minbase:nydus", reg.addr);
    skopeo_push(&v6_layout, &v6_ref, &creds(), false).expect("skopeo push");
    let _ = fs::remove_file(&tar);
    eprintln!("node: both images pushed in {:?}", started.elapsed());

    // The snapshotter's host daemon, shared mode.
    // (A short root: the socket paths must fit in sun_path.)
    let root = t.join("snap");
    let work_dir = root.join("cache");
    for d in ["socket/shared", "logs/shared", "supervisor"] {
        fs::create_dir_all(root.join(d)).expect("snapshotter dirs");
    }
    fs::create_dir_all(&work_dir).expect("cache dir");
    let cmd = DaemonCommand {
        thread_num: Some(4),
        id: Some("shared_daemon".into()),
        mountpoint: root.join("mnt"),
        apisock: root.join("socket/shared/api.sock"),
        log_level: "info".into(),
        log_rotation_size: 100,
        supervisor: Some(root.join("supervisor/shared.sock")),
        log_file: Some(root.join("logs/shared/nydusd.log")),
        failover_policy: "resend".into(),
        ..Default::default()
    };
    let mut host = HostDaemon::spawn(&nydusd_link(t), &cmd, &t.join("home"));
    host.wait_state("RUNNING");
    let log_from = reg.log_len();
    let want = host_listing(lister, rootfs);
    let mut images = Vec::new();
    for (cid, sid, reference, v6) in [("cd", "51", &node_ref, false), ("ce", "52", &v6_ref, true)] {
        let repo = reference
            .split_once('/')
            .and_then(|(_, r)| r.split_once(':'))
            .map(|(r, _)| r)
            .expect("repo");
        let bootstrap = pull_bootstrap(reference, &creds(), &root, sid);
        let config = stock_config(sid, &reg.addr, repo, &auth(&creds()), &work_dir);
        let body = serde_json::json!({"fs_type": "rafs", "source": bootstrap, "config": config});
        let (s, r) = http(
            &host.api,
            "POST",
            &format!("/api/v1/mount?mountpoint=%2F{sid}"),
            Some(body.to_string().as_bytes()),
        )
        .expect("mount");
        assert_eq!(
            s,
            204,
            "{}\n{}",
            String::from_utf8_lossy(&r),
            host.log_text()
        );
        let read = Instant::now();
        let got = host_listing(lister, &cmd.mountpoint.join(sid));
        eprintln!(
            "node: the host daemon's mount of {reference} read whole in {:?}",
            read.elapsed()
        );
        if v6 {
            assert_same_listing(
                &without_unpreserved_v6_tar_fields(&want),
                &without_unpreserved_v6_tar_fields(&got),
            );
        } else {
            assert_same_listing(&without_dir_sizes(&want), &without_dir_sizes(&got));
        }
        images.push(NodeImage {
            cid,
            sid,
            bootstrap,
            config,
            v6,
        });
    }
    for img in &images {
        wait_prefetch_done(&host, img.sid);
    }
    let gets = reg.blob_gets(log_from);
    NodeSide {
        host_bytes: gets.iter().map(|g| g.bytes).sum(),
        host_gets: gets.len(),
        reg,
        host,
        images,
    }
}

/// Polls `GET /api/v1/metrics/blobcache?id=/<sid>` until `data_all_ready`.
fn wait_prefetch_done(host: &HostDaemon, sid: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, b) = http(
            &host.api,
            "GET",
            &format!("/api/v1/metrics/blobcache?id=%2F{sid}"),
            None,
        )
        .expect("blobcache metrics");
        let m: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        assert_eq!(s, 200, "{m}");
        if m["data_all_ready"] == true {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "prefetch of /{sid} not done after 120 s: {m}\n{}",
            host.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
