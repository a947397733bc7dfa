//! Kata Containers' conversation with its virtio-fs daemon, replayed against `skiff virtiofs`
//! without a VM: both runtimes' command lines, the readiness polling, the mounts of the
//! shared directory and of two containers' images (one a Nydus RAFS v6 image built by
//! nydus-image), an unmount, bad input, and SIGTERM.

mod common;
mod kata;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kata::*;

/// Two small images: (bootstrap, blob dir) each. "a" is built with `skiff build`; "b" is the
/// Nydus RAFS v6 image nydus-image 2.2 builds, as nydus-snapshotter hands Kata (where
/// nydus-image is missing outside CI, `skiff build` too, said loudly).
fn two_images(dir: &Path) -> [(PathBuf, PathBuf); 2] {
    let nydus = common::nydus::require_nydus_image().is_some();
    ["a", "b"].map(|name| {
        let src = dir.join(format!("src-{name}"));
        fs::create_dir_all(src.join("etc")).expect("mkdir");
        fs::write(src.join("etc/image"), format!("image {name}\n")).expect("write");
        fs::write(src.join(format!("only-in-{name}")), name.repeat(5000)).expect("write");
        if name == "b" && nydus {
            let out = dir.join("nydus-b");
            let bootstrap = common::nydus::create_dir_rafs(
                &src,
                &out,
                common::nydus::BuildOpts {
                    compressor: "zstd",
                    digester: "blake3",
                    chunk_size: "0x10000",
                },
            );
            return (bootstrap, out.join("blobs"));
        }
        let bootstrap = dir.join(format!("{name}.boot"));
        let blobs = dir.join(format!("blobs-{name}"));
        build_image(
            &src,
            &bootstrap,
            &blobs,
            &[OsStr::new("--chunk-size"), OsStr::new("64K")],
        );
        (bootstrap, blobs)
    })
}

fn assert_running(d: &mut KataDaemon) {
    assert!(d.alive(), "the daemon died\n{}", d.log_text());
    assert_eq!(daemon_info(&d.api)["state"], "RUNNING", "{}", d.log_text());
}

fn mountpoints(api: &Path) -> Vec<String> {
    let info = daemon_info(api);
    let mut v: Vec<String> = info["mounts"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Kata's sequence for a sandbox with two containers, then the removal of the first.
fn kata_sequence(d: &mut KataDaemon, images: &[(PathBuf, PathBuf); 2], shared: &Path) {
    let ready = d.wait_running();
    eprintln!("time to RUNNING: {ready:?}");
    assert!(
        ready < Duration::from_millis(400),
        "RUNNING after {ready:?}"
    );
    let api_mode = fs::metadata(&d.api).expect("api socket");
    assert!(api_mode.file_type().is_socket());
    assert_eq!(
        api_mode.permissions().mode() & 0o777,
        0o600,
        "API socket mode"
    );
    assert!(fs::metadata(&d.vhost).is_ok_and(|m| m.file_type().is_socket()));

    // The sandbox's shared directory.
    let (s, b) = mount(
        &d.api,
        "/containers",
        &mount_body("passthrough_fs", shared, ""),
    );
    assert_eq!(s, 204, "{b}\n{}", d.log_text());
    // Two containers, two images.
    for (cid, (bootstrap, blobs)) in ["c0ffee01", "c0ffee02"].iter().zip(images) {
        let body = mount_body("rafs", bootstrap, &nydusd_config(blobs));
        let (s, b) = mount(&d.api, &rafs_mountpoint(cid), &body);
        assert_eq!(s, 204, "{cid}: {b}\n{}", d.log_text());
    }
    assert_eq!(
        mountpoints(&d.api),
        [
            "/containers",
            "/rafs/c0ffee01/lowerdir",
            "/rafs/c0ffee02/lowerdir"
        ]
    );
    // The first container goes away.
    let (s, b) = umount(&d.api, &rafs_mountpoint("c0ffee01"));
    assert_eq!(s, 204, "{b}");
    assert_eq!(
        mountpoints(&d.api),
        ["/containers", "/rafs/c0ffee02/lowerdir"]
    );
    // Its id can be used again.
    let body = mount_body("rafs", &images[1].0, &nydusd_config(&images[1].1));
    assert_eq!(mount(&d.api, &rafs_mountpoint("c0ffee01"), &body).0, 204);
    assert_eq!(umount(&d.api, &rafs_mountpoint("c0ffee01")).0, 204);
    assert_running(d);

    let (s, metrics) = http(&d.api, "GET", "/api/v1/metrics", None).expect("metrics");
    assert_eq!(s, 200);
    let m: serde_json::Value = serde_json::from_slice(&metrics).expect("metrics JSON");
    assert_eq!(m["mounts_total"], 4, "{m}");
    assert_eq!(m["umounts_total"], 2, "{m}");
    assert_eq!(m["mounts_active"], 2, "{m}");
    let (s, text) = http(&d.api, "GET", "/metrics", None).expect("prometheus");
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("# TYPE skiff_mounts_active gauge\nskiff_mounts_active 2\n"),
        "{text}"
    );
}

#[test]
fn go_runtime_sequence_two_containers_then_one_removed() {
    let dir = scratch();
    let images = two_images(dir.path());
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).expect("shared dir");
    let mut d = KataDaemon::start(Runtime::Go, &dir.path().join("sandbox"));
    kata_sequence(&mut d, &images, &shared);
    let log = d.stop();
    assert!(
        log.contains("--thread-pool-size is virtiofsd's; ignored"),
        "{log}"
    );
    assert!(
        log.contains("--announce-submounts is virtiofsd's; ignored"),
        "{log}"
    );
}

#[test]
fn runtime_rs_sequence_with_relative_sockets_and_hybrid_mode() {
    let dir = scratch();
    let images = two_images(dir.path());
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).expect("shared dir");
    let mut d = KataDaemon::start(Runtime::Rust, &dir.path().join("vm-dir"));
    kata_sequence(&mut d, &images, &shared);
    let log = d.stop();
    assert!(log.contains("--hybrid-mode"), "{log}");
}

#[test]
fn bad_requests_get_clear_errors_and_the_daemon_keeps_serving() {
    let dir = scratch();
    let images = two_images(dir.path());
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).expect("shared dir");
    let mut d = KataDaemon::start(Runtime::Go, &dir.path().join("sandbox"));
    d.wait_running();
    let (boot, blobs) = &images[0];
    let good = mount_body("rafs", boot, &nydusd_config(blobs));
    assert_eq!(
        mount(
            &d.api,
            "/containers",
            &mount_body("passthrough_fs", &shared, "")
        )
        .0,
        204
    );
    assert_eq!(mount(&d.api, &rafs_mountpoint("busy"), &good).0, 204);

    let code = |body: &str| -> String {
        serde_json::from_str::<serde_json::Value>(body).unwrap_or_default()["code"]
            .as_str()
            .unwrap_or("<no code>")
            .to_owned()
    };
    let missing = dir.path().join("no-such.boot");
    let registry = r#"{"device":{"backend":{"type":"registry","config":{"host":"example.invalid","repo":"r"}}}}"#;
    let localdisk = r#"{"device":{"backend":{"type":"localdisk","config":{}}}}"#;
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "outside the two forms",
            "/etc".into(),
            good.clone(),
            400,
            "INVALID_MOUNTPOINT",
        ),
        (
            "rafs not at lowerdir",
            "/rafs/x/upperdir".into(),
            good.clone(),
            400,
            "INVALID_MOUNTPOINT",
        ),
        (
            "dot-dot container id",
            "/rafs/../lowerdir".into(),
            good.clone(),
            400,
            "INVALID_MOUNTPOINT",
        ),
        (
            "nested container id",
            "/rafs/a/b/lowerdir".into(),
            good.clone(),
            400,
            "INVALID_MOUNTPOINT",
        ),
        (
            "passthrough elsewhere",
            "/rafs/x/lowerdir".into(),
            mount_body("passthrough_fs", &shared, ""),
            400,
            "INVALID_MOUNTPOINT",
        ),
        (
            "missing bootstrap",
            rafs_mountpoint("nobootstrap"),
            mount_body("rafs", &missing, &nydusd_config(blobs)),
            400,
            "INVALID_SOURCE",
        ),
        (
            "busy mountpoint",
            rafs_mountpoint("busy"),
            good.clone(),
            409,
            "MOUNTPOINT_BUSY",
        ),
        (
            "busy shared dir",
            "/containers".into(),
            mount_body("passthrough_fs", &shared, ""),
            409,
            "MOUNTPOINT_BUSY",
        ),
        (
            "malformed JSON",
            rafs_mountpoint("x"),
            b"{\"fs_type\": \"rafs\",".to_vec(),
            400,
            "INVALID_JSON",
        ),
        (
            "not an object",
            rafs_mountpoint("x"),
            b"[1,2]".to_vec(),
            400,
            "INVALID_JSON",
        ),
        (
            "unknown field",
            rafs_mountpoint("x"),
            br#"{"fs_type":"rafs","source":"/b","config":"","x":1}"#.to_vec(),
            400,
            "INVALID_JSON",
        ),
        (
            "malformed config",
            rafs_mountpoint("x"),
            mount_body("rafs", boot, "{not json"),
            400,
            "INVALID_CONFIG",
        ),
        (
            "registry backend for an image named by blake3 ids",
            rafs_mountpoint("x"),
            mount_body("rafs", boot, registry),
            400,
            "INVALID_BACKEND",
        ),
        (
            "a backend Skiff refuses",
            rafs_mountpoint("x"),
            mount_body("rafs", boot, localdisk),
            400,
            "UNSUPPORTED_CONFIG",
        ),
        (
            "passthrough with a config",
            "/containers".into(),
            mount_body("passthrough_fs", &shared, r#"{"cache":"always"}"#),
            400,
            "UNSUPPORTED_CONFIG",
        ),
        (
            "unknown fs type",
            rafs_mountpoint("x"),
            mount_body("ext4", boot, ""),
            400,
            "UNSUPPORTED_FS_TYPE",
        ),
        (
            "blobs elsewhere",
            rafs_mountpoint("x"),
            mount_body("rafs", boot, &nydusd_config(&images[1].1)),
            400,
            "BLOB_NOT_FOUND",
        ),
    ];
    for (what, mp, body, status, want) in cases {
        let (s, b) = mount(&d.api, &mp, &body);
        assert_eq!((s, code(&b).as_str()), (status, want), "{what}: {b}");
        let msg = serde_json::from_str::<serde_json::Value>(&b).unwrap_or_default();
        assert!(
            msg["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message: {b}"
        );
        assert_running(&mut d);
    }
    assert!(
        mount(
            &d.api,
            &rafs_mountpoint("x"),
            &mount_body("rafs", boot, registry)
        )
        .1
        .contains("blake3"),
        "the refusal says why"
    );
    // Unmounting what is not mounted, no mountpoint, unknown paths and methods.
    let (s, b) = umount(&d.api, &rafs_mountpoint("never"));
    assert_eq!((s, code(&b).as_str()), (404, "NOT_MOUNTED"));
    for (method, url, status, want) in [
        ("DELETE", "/api/v1/mount", 400, "INVALID_ARGUMENT"),
        ("GET", "/api/v1/nothing", 404, "NOT_FOUND"),
        ("PUT", "/api/v1/daemon", 405, "METHOD_NOT_ALLOWED"),
    ] {
        let (s, b) = http(&d.api, method, url, None).expect("request");
        assert_eq!(
            (s, code(&String::from_utf8_lossy(&b)).as_str()),
            (status, want),
            "{method} {url}"
        );
    }
    // Go's client keeps connections alive: two requests on one connection, both answered.
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&d.api).expect("connect");
        s.write_all(
            b"GET /api/v1/daemon HTTP/1.1\r\nHost: unix\r\n\r\n\
              GET /api/v1/metrics HTTP/1.1\r\nHost: unix\r\nConnection: close\r\n\r\n",
        )
        .expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
    }
    // A garbage request line and a huge body do not bring it down either.
    let _ = http(&d.api, "\u{1}\u{2}", "??", None);
    let (s, _) = http(
        &d.api,
        "POST",
        "/api/v1/mount?mountpoint=/containers",
        Some(&vec![b'x'; 2 << 20]),
    )
    .expect("big body");
    assert_eq!(s, 413);
    assert_running(&mut d);
    assert_eq!(mountpoints(&d.api), ["/containers", "/rafs/busy/lowerdir"]);
    d.stop();
}
