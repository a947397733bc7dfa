//! Images in a registry: a multi-layer OCI image pushed to a real registry (Debian's
//! docker-registry, with htpasswd auth), converted with `skiff convert`, mounted with
//! `skiff mount --image`, and compared on every field and byte with the same layers built
//! locally; and a large image of which reading one small file fetches only a few chunks.
//!
//! Prerequisites (root, /dev/fuse, docker-registry, skopeo) go through `require`: with
//! `CI=true` a missing one fails the test.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use common::oci::*;
use common::registry::Registry;
use common::*;

const USER: &str = "skiff";
const PASS: &str = "s3cret:pass";

/// Bytes the registry sent for blob GETs from byte `from` of its log: (total bytes, number of
/// requests).
fn blob_bytes_served(reg: &Registry, from: usize) -> (u64, usize) {
    let gets = reg.blob_gets(from);
    (gets.iter().map(|g| g.bytes).sum(), gets.len())
}

fn convert(source: &str, target: &str, json: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "convert",
        "--source",
        source,
        "--target",
        target,
        "--registry-auth",
        &format!("{USER}:{PASS}"),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(["--json".to_string(), json.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = skiff_ok(&args);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let text = fs::read_to_string(json).expect("convert summary");
    serde_json::from_str(&text).expect("convert summary JSON")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn multilayer_image_through_a_registry() -> Res {
    if !require_fuse() {
        return Ok(());
    }
    if require("skopeo", have("skopeo")).is_none() {
        return Ok(());
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("multilayer", &["--htpasswd", &format!("{USER}:{PASS}")]),
    ) else {
        return Ok(());
    };
    let tmp = scratch();
    let t = tmp.path();
    let big = noise(3 << 20, 1);
    let l1 = layer(
        &[
            Ent::Dir("etc", 0o755),
            Ent::File("etc/conf", 0o644, b"old config\n".to_vec()),
            Ent::Dir("usr", 0o755),
            Ent::Dir("usr/bin", 0o755),
            Ent::File("usr/bin/tool", 0o755, big.clone()),
            Ent::Link("usr/bin/tool-link", "usr/bin/tool"),
            Ent::Dir("data", 0o750),
            Ent::File("data/a", 0o600, b"a".to_vec()),
            Ent::File("data/b", 0o600, noise(70_000, 2)),
            Ent::Dir("opq", 0o755),
            Ent::File("opq/x", 0o644, b"x".to_vec()),
            Ent::Dir("opq/sub", 0o755),
            Ent::File("opq/sub/y", 0o644, b"y".to_vec()),
            Ent::Dir("del", 0o755),
            Ent::File("del/me", 0o644, b"delete me".to_vec()),
            Ent::File("del/keep", 0o644, b"keep me".to_vec()),
            Ent::Symlink("conf-link", "etc/conf"),
        ],
        1_700_000_000,
    )?;
    let l2 = layer(
        &[
            Ent::Dir("del", 0o755),
            Ent::File("del/.wh.me", 0o644, Vec::new()),
            Ent::Dir("etc", 0o755),
            Ent::File("etc/conf", 0o640, b"new config\n".to_vec()),
            Ent::Dir("opq", 0o700),
            Ent::File("opq/.wh..wh..opq", 0o644, Vec::new()),
            Ent::File("opq/new", 0o644, noise(5000, 3)),
            Ent::Dir("data", 0o755),
            Ent::File("data/.wh.a", 0o644, Vec::new()),
            // The same content as a lower layer's file: referenced in that layer's blob.
            Ent::File("usr/bin/tool-copy", 0o755, big.clone()),
        ],
        1_700_000_100,
    )?;
    // Only whiteouts and metadata: no new blob.
    let l3 = layer(
        &[
            Ent::Dir("data", 0o711),
            Ent::File("data/.wh.b", 0o644, Vec::new()),
        ],
        1_700_000_200,
    )?;
    let layout = t.join("layout");
    write_layout(
        &layout,
        &[
            (gzip(&l1)?, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (
                zstd::encode_all(l2.as_slice(), 3)?,
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            (l3.clone(), "application/vnd.oci.image.layer.v1.tar"),
        ],
    )?;
    // Push the source image with an independent client.
    let src_ref = format!("{}/test/source:v1", reg.addr);
    let out = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{USER}:{PASS}"))
        .arg(format!("oci:{}", layout.display()))
        .arg(format!("docker://{src_ref}"))
        .output()?;
    assert!(out.status.success(), "skopeo copy: {}", output_text(&out));

    let dst_ref = format!("{}/test/skiff:v1", reg.addr);
    let s = convert(&src_ref, &dst_ref, &t.join("convert.json"), &[]);
    let blobs = s["blobs"].as_array().expect("blobs");
    let layers: Vec<u64> = blobs.iter().filter_map(|b| b["layer"].as_u64()).collect();
    assert_eq!(
        layers,
        vec![0, 1],
        "one blob per layer that stores content: {s:#}"
    );
    assert!(
        s["build"]["dedup_chunks"].as_u64().unwrap_or(0) >= 3,
        "tool-copy's chunks are referenced, not stored again: {s:#}"
    );
    // Layer 2's blob holds only its new content, not the 3 MiB copy.
    assert!(
        blobs[1]["size"].as_u64().unwrap_or(u64::MAX) < 100_000,
        "{s:#}"
    );

    // The same image from a `docker save` archive, and from the OCI layout directly: the
    // same tree (root digest).
    // That one with zstd: the same tree too (where and how chunks are stored is not part of
    // the root digest), every chunk checked against the source below. These layers are mostly
    // noise, which no compressor shrinks: the blobs are no bigger than lz4's (special_tree
    // shows zstd's smaller blobs on text).
    let archive = t.join("saved.tar");
    write_docker_archive(&archive, &[&gzip(&l1)?, &l2, &l3])?;
    let zstd_ref = format!("{}/test/skiff:from-archive", reg.addr);
    let s2 = convert(
        &archive.display().to_string(),
        &zstd_ref,
        &t.join("convert2.json"),
        &["--compressor", "zstd"],
    );
    assert_eq!(s2["build"]["compressor"], "zstd", "{s2:#}");
    let blob_sizes = |s: &serde_json::Value| -> u64 {
        s["blobs"]
            .as_array()
            .map_or(0, |b| b.iter().filter_map(|b| b["size"].as_u64()).sum())
    };
    assert!(
        blob_sizes(&s2) <= blob_sizes(&s),
        "zstd blobs {} bytes, lz4 {}",
        blob_sizes(&s2),
        blob_sizes(&s)
    );
    let s3 = convert(
        &layout.display().to_string(),
        &format!("{}/test/skiff:from-layout", reg.addr),
        &t.join("convert3.json"),
        &[],
    );
    assert_eq!(s2["build"]["root_digest"], s["build"]["root_digest"]);
    // A multi-platform index in the registry: linux/amd64 is picked.
    let multi = t.join("multiarch");
    write_multiarch_layout(
        &multi,
        &[
            (gzip(&l1)?, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (l2.clone(), "application/vnd.oci.image.layer.v1.tar"),
            (l3.clone(), "application/vnd.oci.image.layer.v1.tar"),
        ],
        &[(l3.clone(), "application/vnd.oci.image.layer.v1.tar")],
    )?;
    let multi_ref = format!("{}/test/multi:v1", reg.addr);
    let out = Command::new("skopeo")
        .args(["copy", "--all", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("{USER}:{PASS}"))
        .arg(format!("oci:{}", multi.display()))
        .arg(format!("docker://{multi_ref}"))
        .output()?;
    assert!(
        out.status.success(),
        "skopeo copy --all: {}",
        output_text(&out)
    );
    let s4 = convert(
        &multi_ref,
        &format!("{}/test/skiff:from-index", reg.addr),
        &t.join("convert4.json"),
        &[],
    );
    assert_eq!(s4["build"]["root_digest"], s["build"]["root_digest"]);
    assert_eq!(s3["build"]["root_digest"], s["build"]["root_digest"]);

    // The same layers built locally, mounted from a blob directory.
    let mut files = Vec::new();
    for (i, l) in [&l1, &l2, &l3].iter().enumerate() {
        let p = t.join(format!("layer{i}.tar"));
        fs::write(&p, l)?;
        files.push(p);
    }
    let boot = t.join("local.boot");
    let blob_dir = t.join("local-blobs");
    let mut args: Vec<&OsStr> = vec![OsStr::new("build")];
    args.extend(files.iter().map(|f| f.as_os_str()));
    args.extend([
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blob_dir.as_os_str(),
    ]);
    skiff_ok(&args);
    let local = Mount::new(&boot, &blob_dir, &t.join("local-mnt"));
    let want = snapshot(&local.dir);

    // Credentials from a Docker config file this time.
    let docker_cfg = t.join("docker");
    fs::create_dir_all(&docker_cfg)?;
    let auth = base64_encode(format!("{USER}:{PASS}").as_bytes());
    fs::write(
        docker_cfg.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
    )?;
    std::env::set_var("DOCKER_CONFIG", &docker_cfg);
    // A dead mirror first: pulls fall back to the origin.
    // A private cache: the host-wide default must not answer for the registry.
    let remote_cache = t.join("remote-cache");
    let remote = Mount::with_args(
        &[
            OsStr::new("--image"),
            OsStr::new(&dst_ref),
            OsStr::new("--mirror"),
            OsStr::new("127.0.0.1:9"),
            OsStr::new("--cache-dir"),
            remote_cache.as_os_str(),
        ],
        &t.join("remote-mnt"),
    );
    std::env::remove_var("DOCKER_CONFIG");
    let got = snapshot(&remote.dir);
    assert!(
        remote.log_text().contains("mirror failed"),
        "the mirror was tried first\n{}",
        remote.log_text()
    );
    assert_no_diff("registry image vs local build", &want, &got);

    // The layer semantics, spelt out.
    let r = &remote.dir;
    assert!(!r.join("del/me").exists() && r.join("del/keep").exists());
    assert_eq!(fs::read(r.join("etc/conf"))?, b"new config\n");
    assert!(!r.join("opq/x").exists() && !r.join("opq/sub").exists());
    assert!(r.join("opq/new").exists());
    assert!(!r.join("data/a").exists() && !r.join("data/b").exists());
    assert_eq!(fs::read(r.join("usr/bin/tool-copy"))?, big);
    assert_eq!(fs::read(r.join("conf-link"))?, b"new config\n");
    remote.unmount();
    local.unmount();

    // `serve --image` opens the same image and listens for a VMM.
    let sock = t.join("vhost.sock");
    let mut serve = Command::new(skiff())
        .args([
            "serve",
            "--image",
            &dst_ref,
            "--registry-auth",
            &format!("{USER}:{PASS}"),
        ])
        .arg("--cache-dir")
        .arg(t.join("serve-cache"))
        .arg("--socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(20) {
        if serve.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let listening = sock.exists();
    let _ = serve.kill();
    let out = serve.wait_with_output()?;
    assert!(
        listening,
        "skiff serve --image did not create its socket\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The zstd conversion against its source: manifest, bootstrap, every chunk decoded and
    // verified, and the tree field by field.
    let out = run_skiff([
        "check",
        "--source",
        &archive.display().to_string(),
        "--target",
        &zstd_ref,
        "--registry-auth",
        &format!("{USER}:{PASS}"),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));

    // Without credentials the registry refuses, and skiff says so.
    let empty_cfg = t.join("no-docker");
    fs::create_dir_all(&empty_cfg)?;
    let out = Command::new(skiff())
        .args(["mount", "--image", &dst_ref])
        .arg(t.join("never"))
        .env("DOCKER_CONFIG", &empty_cfg)
        .env_remove("SKIFF_REGISTRY_AUTH")
        .output()?;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("401"), "{text}");

    // The proxy setting is honoured: through a proxy that is not there, nothing is reached.
    let out = Command::new(skiff())
        .args([
            "mount",
            "--image",
            &dst_ref,
            "--registry-auth",
            &format!("{USER}:{PASS}"),
        ])
        .args(["--proxy", "http://127.0.0.1:9"])
        .arg(t.join("never"))
        .output()?;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    Ok(())
}

#[test]
fn reading_one_file_fetches_a_few_chunks() -> Res {
    if !require_fuse() {
        return Ok(());
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("lazy", &["--htpasswd", &format!("{USER}:{PASS}")]),
    ) else {
        return Ok(());
    };
    let tmp = scratch();
    let t = tmp.path();
    // 200 MiB of random data in 100 files, and one small file in the middle.
    let mut ents = vec![Ent::Dir("big", 0o755)];
    let names: Vec<String> = (0..100).map(|i| format!("big/f{i:03}")).collect();
    for (i, n) in names.iter().enumerate() {
        ents.push(Ent::File(n, 0o644, noise(2 << 20, 100 + i as u64)));
        if i == 50 {
            ents.push(Ent::File("big/small", 0o644, noise(10_000, 7)));
        }
    }
    let l = layer(&ents, 1_700_000_000)?;
    drop(ents);
    let image_bytes = l.len() as u64;
    let layout = t.join("layout");
    write_layout(&layout, &[(l, "application/vnd.oci.image.layer.v1.tar")])?;
    let dst_ref = format!("{}/test/big:v1", reg.addr);
    let started = std::time::Instant::now();
    let s = convert(
        &layout.display().to_string(),
        &dst_ref,
        &t.join("convert.json"),
        &[],
    );
    eprintln!("convert of {image_bytes} bytes: {:?}", started.elapsed());
    let boot_bytes = s["bootstrap_bytes"].as_u64().expect("bootstrap_bytes");

    let log_start = fs::metadata(reg.log())?.len() as usize;
    let auth = format!("{USER}:{PASS}");
    // A private cache: the default one is shared host-wide and may already hold these chunks
    // (the same seeds make the same chunks on every run), and then nothing is fetched.
    let cache = t.join("cache");
    let mount = || {
        Mount::with_args(
            &[
                OsStr::new("--image"),
                OsStr::new(&dst_ref),
                OsStr::new("--cache-dir"),
                cache.as_os_str(),
                OsStr::new("--registry-auth"),
                OsStr::new(&auth),
                OsStr::new("--log-level"),
                OsStr::new("skiff=debug"),
            ],
            &t.join("mnt"),
        )
    };
    let m = mount();
    let small = fs::read(m.dir.join("big/small"))?;
    assert_eq!(small, noise(10_000, 7));
    let skiff_log = fs::read_to_string(&m.log)?;
    m.unmount();
    let (served, requests) = blob_bytes_served(&reg, log_start);
    let ranged: u64 = skiff_log
        .lines()
        .filter(|l| l.contains("registry range read"))
        .filter_map(|l| {
            l.split("len=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    eprintln!(
        "image {image_bytes} bytes; reading one 10 kB file fetched {served} blob bytes in \
         {requests} requests (bootstrap {boot_bytes}, chunk ranges {ranged} per skiff's log)"
    );
    assert!(served >= boot_bytes, "the bootstrap is fetched: {served}");
    assert!(
        served <= boot_bytes + 2 * (1 << 20),
        "at most the bootstrap and two chunks: {served} bytes"
    );
    assert!(
        ranged > 0 && ranged <= 2 * (1 << 20),
        "range reads: {ranged}"
    );
    assert!(served < image_bytes / 50);

    // A second mount over the same cache: the bootstrap comes from the cache, and the first
    // read of a two-chunk file has its second chunk fetched alongside (fetch-ahead).
    let log_start = fs::metadata(reg.log())?.len() as usize;
    let m = mount();
    assert_eq!(fs::read(m.dir.join("big/small"))?, noise(10_000, 7));
    let want = noise(2 << 20, 110);
    let mut f = fs::File::open(m.dir.join("big/f010"))?;
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(&mut f, &mut head)?;
    assert_eq!(head, want[..4096]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while blob_bytes_served(&reg, log_start).1 < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second chunk of big/f010 was never fetched ahead"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut rest)?;
    assert!(rest == want[4096..], "big/f010 differs from its source");
    drop(f);
    m.unmount();
    let (served, requests) = blob_bytes_served(&reg, log_start);
    eprintln!("second mount: {served} blob bytes in {requests} requests");
    assert_eq!(
        requests, 2,
        "two chunk ranges, and no bootstrap (it is in the cache)"
    );
    assert_eq!(served, 2 << 20, "the two chunks of big/f010, stored raw");
    Ok(())
}

#[test]
fn tampered_registry_blobs_are_refused() -> Res {
    if !require_fuse() {
        return Ok(());
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("tamper", &["--htpasswd", &format!("{USER}:{PASS}")]),
    ) else {
        return Ok(());
    };
    let tmp = scratch();
    let t = tmp.path();
    // "bad" is stored first: its chunk is at offset 0 of the blob.
    let l = layer(
        &[
            Ent::File("bad", 0o644, noise(5000, 1)),
            Ent::File("good", 0o644, noise(5000, 2)),
        ],
        1_700_000_000,
    )?;
    let layout = t.join("layout");
    write_layout(&layout, &[(l, "application/vnd.oci.image.layer.v1.tar")])?;
    let dst_ref = format!("{}/test/tamper:v1", reg.addr);
    let s = convert(
        &layout.display().to_string(),
        &dst_ref,
        &t.join("convert.json"),
        &["--compressor", "none"],
    );
    let blob = s["blobs"][0]["digest"].as_str().expect("blob digest");
    flip_byte(&stored_blob(&reg, blob), 10)?;
    let auth = format!("{USER}:{PASS}");
    let cache = t.join("cache");
    let args = [
        OsStr::new("--image"),
        OsStr::new(&dst_ref),
        OsStr::new("--registry-auth"),
        OsStr::new(&auth),
        OsStr::new("--cache-dir"),
        cache.as_os_str(),
    ];
    let m = Mount::with_args(&args, &t.join("mnt"));
    assert_eq!(fs::read(m.dir.join("good"))?, noise(5000, 2));
    let err = fs::read(m.dir.join("bad")).expect_err("a corrupted chunk is not served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = m.log_text();
    m.unmount();
    assert!(log.contains("failed verification"), "{log}");

    // A corrupted bootstrap is refused before anything is mounted.
    let boot = s["bootstrap_digest"].as_str().expect("bootstrap digest");
    flip_byte(&stored_blob(&reg, boot), 100)?;
    let out = Command::new(skiff())
        .args(["mount", "--image", &dst_ref, "--registry-auth", &auth])
        .arg(t.join("never"))
        .output()?;
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("digest"), "{text}");
    Ok(())
}
