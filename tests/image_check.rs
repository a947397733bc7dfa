//! `skiff check --source REF --target REF` against Debian's docker-registry (htpasswd), with
//! images pushed by skopeo: a clean conversion of a 3-layer image (whiteouts, an opaque
//! directory, hard links) and of a multi-platform index passes; each tamper is caught and named
//! (a file changed in a rebuild pushed under the same tag, a flipped chunk in the registry's
//! storage, the config's env, a blob layer missing from the manifest, a wrong blob-id
//! annotation, a platform missing from an index); `--no-data` fetches no blob; a target that is
//! not there exits 2. A conversion of Debian checks clean (with the figures of check next to
//! convert in the test's output), and so does a Nydus RAFS v6 target built by nydus-image and
//! packaged as nydus-snapshotter does, until a modified file is pushed under its tag.
//!
//! Prerequisites (docker-registry, skopeo, a Debian rootfs, nydus-image) go through `require`:
//! with `CI=true` a missing one fails the test. No mount or FUSE is needed.

mod common;

use std::path::Path;
use std::process::Output;

use common::nydus::*;
use common::oci::*;
use common::registry::Registry;
use common::*;
use skiff::oci::auth::Credentials;
use skiff::oci::manifest::{Fetched, ImageManifest, ANN_BLOB_ID, OCI_INDEX, OCI_MANIFEST};
use skiff::oci::{Reference, RegistryClient, RegistryOptions};

const USER: &str = "checker";
const PASS: &str = "pa:ss";

fn creds() -> String {
    format!("{USER}:{PASS}")
}

/// The blob id a blob layer of either layout carries: the blob-id annotation (Skiff layout)
/// or the digest (node layout, blobs named by sha256).
fn blob_id(l: &skiff::oci::manifest::Descriptor) -> String {
    l.annotations.get(ANN_BLOB_ID).cloned().unwrap_or_else(|| {
        l.digest
            .strip_prefix("sha256:")
            .unwrap_or(&l.digest)
            .to_string()
    })
}

/// A library client for `reference`, for tampering with what convert pushed.
fn client(reference: &str) -> RegistryClient {
    let r = Reference::parse(reference).expect("reference");
    RegistryClient::new(
        &r,
        &RegistryOptions {
            credentials: Some(Credentials {
                username: USER.into(),
                password: PASS.into(),
            }),
            ..RegistryOptions::default()
        },
    )
    .expect("client")
}

fn convert(source: &str, target: &str, extra: &[&str]) -> Output {
    let auth = creds();
    let mut args = vec![
        "convert",
        "--source",
        source,
        "--target",
        target,
        "--registry-auth",
        &auth,
    ];
    args.extend(extra);
    skiff_ok(args)
}

/// Runs `skiff check`; returns the exit code, the output and the JSON report.
fn check(source: &str, target: &str, t: &Path, extra: &[&str]) -> (i32, String, serde_json::Value) {
    let json = t.join("check.json");
    let _ = std::fs::remove_file(&json);
    let auth = creds();
    let mut args = vec![
        "check".to_string(),
        "--source".into(),
        source.into(),
        "--target".into(),
        target.into(),
        "--registry-auth".into(),
        auth,
        "--json".into(),
        json.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_skiff(&args);
    let text = output_text(&out);
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), text, report)
}

/// The `PROBLEM` lines of a check's output.
fn problems(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("PROBLEM ")).collect()
}

fn assert_clean(what: &str, (code, text, report): &(i32, String, serde_json::Value)) {
    assert_eq!(*code, 0, "{what}: check should pass\n{text}");
    assert!(problems(text).is_empty(), "{what}\n{text}");
    for rule in ["manifest", "bootstrap", "data", "filesystem"] {
        assert_eq!(report["rules"][rule], "passed", "{what}: {rule}\n{text}");
    }
}

/// Asserts the check failed with exit 1 and a problem line containing every one of `needles`.
fn assert_caught(what: &str, (code, text, _): &(i32, String, serde_json::Value), needles: &[&str]) {
    assert_eq!(*code, 1, "{what}: check should find problems\n{text}");
    assert!(
        problems(text)
            .iter()
            .any(|l| needles.iter().all(|n| l.contains(n))),
        "{what}: no problem line with {needles:?}\n{text}"
    );
}

/// Pushes manifest `m` (changed by `edit`) of `from` under `to_tag` in the same repository.
fn push_edited(
    from: &str,
    to: &str,
    edit: impl FnOnce(&mut ImageManifest, &RegistryClient, &Path),
    tmp: &Path,
) {
    let c = client(from);
    let (m, _, _) = c.get_manifest().expect("manifest");
    let mut m = m;
    edit(&mut m, &c, tmp);
    let bytes = serde_json::to_vec(&m).expect("manifest JSON");
    let r = Reference::parse(to).expect("reference");
    client(to)
        .push_manifest(r.manifest_ref(), &bytes, OCI_MANIFEST)
        .expect("push manifest");
}

fn three_layers(conf: &[u8], big: &[u8]) -> Res<Vec<(Vec<u8>, &'static str)>> {
    let l1 = layer(
        &[
            Ent::Dir("etc", 0o755),
            Ent::File("etc/conf", 0o644, b"old config\n".to_vec()),
            Ent::Dir("usr", 0o755),
            Ent::Dir("usr/bin", 0o755),
            Ent::File("usr/bin/tool", 0o755, big.to_vec()),
            Ent::Link("usr/bin/tool-link", "usr/bin/tool"),
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
            Ent::File("etc/conf", 0o640, conf.to_vec()),
            Ent::Link("etc/conf-hard", "etc/conf"),
            Ent::Dir("opq", 0o700),
            Ent::File("opq/.wh..wh..opq", 0o644, Vec::new()),
            Ent::File("opq/new", 0o644, noise(5000, 3)),
        ],
        1_700_000_100,
    )?;
    let l3 = layer(
        &[
            Ent::Dir("usr/bin", 0o755),
            Ent::File("usr/bin/.wh.tool-link", 0o644, Vec::new()),
            Ent::File("usr/bin/extra", 0o755, noise(70_000, 4)),
        ],
        1_700_000_200,
    )?;
    Ok(vec![
        (gzip(&l1)?, "application/vnd.oci.image.layer.v1.tar+gzip"),
        (
            zstd::encode_all(l2.as_slice(), 3)?,
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (l3, "application/vnd.oci.image.layer.v1.tar"),
    ])
}

#[test]
fn check_passes_clean_conversions_and_names_each_tamper() -> Res {
    if require("skopeo", have("skopeo")).is_none() {
        return Ok(());
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("check", &["--htpasswd", &creds()]),
    ) else {
        return Ok(());
    };
    let tmp = scratch();
    let t = tmp.path();
    let big = noise(3 << 20, 1);
    let layout = t.join("layout");
    write_layout(&layout, &three_layers(b"new config\n", &big)?)?;
    let src = format!("{}/check/app:v1", reg.addr);
    skopeo_push(&layout, &src, &creds(), false)?;

    // Clean: passes, every rule ran.
    let tgt = format!("{}/check/app:v1-skiff", reg.addr);
    convert(&src, &tgt, &[]);
    let clean = check(&src, &tgt, t, &[]);
    assert_clean("clean conversion", &clean);
    let report = &clean.2;
    assert!(
        report["images"][0]["chunks_verified"].as_u64().unwrap_or(0) >= 4,
        "{report:#}"
    );
    assert!(
        report["target_bytes_fetched"].as_u64().unwrap_or(0) > 3 << 20,
        "{report:#}"
    );
    // The OCI layout as the source: the same verdict.
    assert_clean(
        "layout source",
        &check(&layout.display().to_string(), &tgt, t, &[]),
    );

    // A `docker save` archive as the source, converted and checked from the same file.
    let archive = t.join("saved.tar");
    let raw: Vec<Vec<u8>> = three_layers(b"new config\n", &big)?
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    write_docker_archive(&archive, &raw.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
    let from_archive = format!("{}/check/app:from-archive", reg.addr);
    let archive_src = archive.display().to_string();
    convert(&archive_src, &from_archive, &[]);
    assert_clean(
        "archive source",
        &check(&archive_src, &from_archive, t, &[]),
    );

    // A file changed in the target: a rebuild of a modified tree pushed under the same tag.
    let modified = t.join("modified");
    write_layout(&modified, &three_layers(b"NEW config\n", &big)?)?;
    let rebuilt = format!("{}/check/app:rebuilt", reg.addr);
    convert(&src, &rebuilt, &[]);
    convert(&modified.display().to_string(), &rebuilt, &[]);
    let r = check(&src, &rebuilt, t, &[]);
    assert_caught(
        "modified file",
        &r,
        &["PROBLEM /etc/conf:", "content differs"],
    );
    assert_eq!(r.2["rules"]["filesystem"], "failed", "{}", r.1);
    assert_eq!(r.2["rules"]["data"], "passed", "{}", r.1);

    // The config's env changed.
    let env = format!("{}/check/app:env", reg.addr);
    push_edited(
        &tgt,
        &env,
        |m, c, tmp| {
            let cfg = c
                .get_blob_bytes(&m.config.digest, m.config.size, 1 << 20)
                .expect("config");
            let mut v: serde_json::Value = serde_json::from_slice(&cfg).expect("config JSON");
            v["config"]["Env"] = serde_json::json!(["PATH=/usr/bin", "INJECTED=1"]);
            let bytes = serde_json::to_vec(&v).expect("JSON");
            m.config.digest = c.push_blob_bytes(&bytes, tmp).expect("push config");
            m.config.size = bytes.len() as u64;
        },
        t,
    );
    assert_caught(
        "config env",
        &check(&src, &env, t, &[]),
        &["PROBLEM config:", "config.Env", "INJECTED=1"],
    );

    // A blob layer missing from the manifest.
    let missing = format!("{}/check/app:missing", reg.addr);
    let mut dropped_id = String::new();
    push_edited(
        &tgt,
        &missing,
        |m, _, _| {
            // The node layout (convert's default) names a blob by its layer digest.
            let l = m.layers.remove(0);
            dropped_id = blob_id(&l);
        },
        t,
    );
    assert_caught(
        "missing blob layer",
        &check(&src, &missing, t, &[]),
        &[
            &format!("PROBLEM blob {dropped_id}:"),
            "no layer of the manifest carries it",
        ],
    );

    // The Skiff layout (blobs named by blake3 in an annotation) passes too; a wrong blob-id
    // annotation is caught.
    let skiff_layout = format!("{}/check/app:v1-skiff-layout", reg.addr);
    convert(&src, &skiff_layout, &["--layout", "skiff"]);
    assert_clean("skiff layout", &check(&src, &skiff_layout, t, &[]));
    let wrong = format!("{}/check/app:wrong-id", reg.addr);
    let bogus = "ab".repeat(32);
    push_edited(
        &skiff_layout,
        &wrong,
        |m, _, _| {
            m.layers[0]
                .annotations
                .insert(ANN_BLOB_ID.into(), bogus.clone());
        },
        t,
    );
    let r = check(&src, &wrong, t, &[]);
    assert_caught(
        "wrong blob id",
        &r,
        &[&format!("PROBLEM blob {bogus}:"), "does not have it"],
    );

    // A target that is not there: the check cannot run.
    let (code, text, _) = check(&src, &format!("{}/check/app:nothing", reg.addr), t, &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("cannot run"), "{text}");

    // A multi-platform index: converted whole, it passes; without a platform, caught.
    let multi = t.join("multi");
    let arm = vec![(
        layer(
            &[Ent::File("arm-only", 0o644, noise(9000, 9))],
            1_700_000_300,
        )?,
        "application/vnd.oci.image.layer.v1.tar",
    )];
    write_multiarch_layout(&multi, &three_layers(b"new config\n", &big)?, &arm)?;
    let msrc = format!("{}/check/multi:v1", reg.addr);
    skopeo_push(&multi, &msrc, &creds(), true)?;
    let mtgt = format!("{}/check/multi:v1-skiff", reg.addr);
    convert(&msrc, &mtgt, &["--all-platforms"]);
    let r = check(&msrc, &mtgt, t, &[]);
    assert_clean("multi-platform index", &r);
    assert_eq!(r.2["images"].as_array().map(Vec::len), Some(2), "{}", r.1);
    // The index without its arm64 entry.
    let mc = client(&mtgt);
    let index = match mc.get_manifest_ref("v1-skiff").expect("index") {
        (Fetched::Index(_), bytes, _) => bytes,
        _ => panic!("the target is not an index"),
    };
    let mut v: serde_json::Value = serde_json::from_slice(&index)?;
    let kept: Vec<serde_json::Value> = v["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d["platform"]["architecture"] != "arm64")
        .collect();
    v["manifests"] = serde_json::Value::Array(kept);
    mc.push_manifest("no-arm", &serde_json::to_vec(&v)?, OCI_INDEX)
        .expect("push index");
    let r = check(&msrc, &format!("{}/check/multi:no-arm", reg.addr), t, &[]);
    assert_caught(
        "platform missing from an index",
        &r,
        &["PROBLEM index:", "linux/arm64", "no converted manifest"],
    );
    // Last: the registry's storage is shared by every repository and tag holding the blob.
    // A flipped chunk in the registry's storage: the data rule names the file and the blob;
    // with --no-data nothing is fetched and that check passes.
    let flipped = format!("{}/check/app:flipped", reg.addr);
    convert(&src, &flipped, &["--compressor", "none"]);
    let c = client(&flipped);
    let (m, _, _) = c.get_manifest().expect("manifest");
    let first = &m.layers[0];
    let data = stored_blob(&reg, &first.digest);
    // Past etc/conf, inside usr/bin/tool's 3 MiB.
    flip_byte(&data, (first.size / 2) as usize)?;
    let r = check(&src, &flipped, t, &[]);
    assert_caught(
        "flipped chunk",
        &r,
        &["PROBLEM /usr/bin/tool", "digest mismatch"],
    );
    assert_caught(
        "flipped chunk, the blob",
        &r,
        &[&format!("PROBLEM blob {}", blob_id(first)), "digest"],
    );
    assert_eq!(r.2["rules"]["data"], "failed", "{}", r.1);
    let fast = check(&src, &flipped, t, &["--no-data"]);
    assert_eq!(fast.0, 0, "{}", fast.1);
    assert_eq!(fast.2["rules"]["data"], "skipped", "{}", fast.1);
    // Manifests, config and bootstrap only: no blob.
    let fetched = fast.2["target_bytes_fetched"].as_u64().unwrap_or(u64::MAX);
    assert!(
        fetched < 64 << 10,
        "--no-data fetched {fetched} bytes of the target"
    );

    Ok(())
}

/// Debian (debootstrap minbase) as a one-layer OCI image: converted, then checked, with and
/// without the data rule; the figures (check time and bytes fetched next to convert time) go
/// to the test's output.
#[test]
fn debian_conversion_checks_clean() -> Res {
    if require("skopeo", have("skopeo")).is_none() {
        return Ok(());
    }
    let Some(rootfs) = require("a Debian rootfs", debian_rootfs("minbase")) else {
        return Ok(());
    };
    let Some(reg) = require(
        "a local registry",
        Registry::start("check-debian", &["--htpasswd", &creds()]),
    ) else {
        return Ok(());
    };
    let tmp = scratch();
    let t = tmp.path();
    // The layer as a Debian image's: GNU tar (pax, with xattrs), gzip.
    let layer_path = t.join("layer.tar.gz");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar --format=posix --numeric-owner --xattrs --xattrs-include='*' -C '{}' -cf - . 2>/dev/null | gzip -1 > '{}'",
            rootfs.display(),
            layer_path.display()
        ))
        .output()?;
    assert!(out.status.success(), "tar: {}", output_text(&out));
    let layout = t.join("layout");
    write_layout(
        &layout,
        &[(
            std::fs::read(&layer_path)?,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
    )?;
    let src = format!("{}/debian/minbase:12", reg.addr);
    skopeo_push(&layout, &src, &creds(), false)?;
    let tgt = format!("{}/debian/minbase:12-skiff", reg.addr);
    let start = std::time::Instant::now();
    convert(&src, &tgt, &[]);
    let convert_s = start.elapsed().as_secs_f64();
    let full = check(&src, &tgt, t, &[]);
    assert_clean("Debian", &full);
    let fast = check(&src, &tgt, t, &["--no-data"]);
    assert_eq!(fast.0, 0, "{}", fast.1);
    let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    let layer_mib = std::fs::metadata(&layer_path)?.len() as f64 / (1 << 20) as f64;
    eprintln!(
        "FIGURES Debian minbase ({layer_mib:.1} MiB gzip layer): convert {convert_s:.2} s; \
         check {:.2} s, fetching {:.1} MiB source + {:.1} MiB target; \
         check --no-data {:.2} s, fetching {:.1} MiB source + {:.2} MiB target",
        full.2["seconds"].as_f64().unwrap_or(0.0),
        mib(&full.2["source_bytes_fetched"]),
        mib(&full.2["target_bytes_fetched"]),
        fast.2["seconds"].as_f64().unwrap_or(0.0),
        mib(&fast.2["source_bytes_fetched"]),
        mib(&fast.2["target_bytes_fetched"]),
    );
    assert!(
        full.2["images"][0]["entries_compared"]
            .as_u64()
            .unwrap_or(0)
            > 5000,
        "{}",
        full.1
    );
    Ok(())
}

/// A tree for the Nydus test: nested directories, a hard link, a symlink, an empty file, a
/// file of several chunks; all times whole seconds, as a tar carries them.
fn nydus_tree(root: &Path, conf: &[u8]) -> Res {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("etc/deep/er"))?;
    std::fs::create_dir_all(root.join("usr/bin"))?;
    std::fs::write(root.join("etc/conf"), conf)?;
    std::fs::write(root.join("etc/deep/er/empty"), b"")?;
    std::fs::write(root.join("usr/bin/tool"), noise(2_500_000, 5))?;
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-link"))?;
    std::os::unix::fs::symlink("../etc/conf", root.join("usr/conf-link"))?;
    for p in [
        "etc/conf",
        "etc/deep/er/empty",
        "usr/bin/tool",
        "etc/deep/er",
        "etc/deep",
        "etc",
        "usr/bin",
        "usr",
        "",
    ] {
        set_mtime(&root.join(p), 1_700_000_000, 0);
    }
    Ok(())
}

/// Pushes a Nydus RAFS v6 image of directory `dir` under `target`, packaged as
/// nydus-snapshotter does (a blob layer named by its sha256, a gzip tar layer holding
/// `image/image.boot`, the source's config with `rootfs` rewritten); built by nydus-image.
fn push_nydus(dir: &Path, opts: BuildOpts, source_config: &[u8], target: &str, t: &Path) -> Res {
    use skiff::oci::manifest::{Descriptor, OCI_CONFIG};
    let out_dir = t.join(format!("nydus-{}", opts.name()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let boot = create_dir_rafs(dir, &out_dir, opts);
    let blob = blobs_in(&out_dir.join("blobs"))
        .into_iter()
        .next()
        .ok_or("no blob")?;
    let blob_bytes = std::fs::read(&blob)?;
    let c = client(target);
    let blob_digest = c
        .push_blob_bytes(&blob_bytes, t)
        .map_err(|e| e.to_string())?;
    assert_eq!(
        blob_digest[7..],
        *blob.file_name().and_then(|n| n.to_str()).unwrap_or("")
    );
    let mut tb = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    tb.append_data(&mut h, "image/", &[][..])?;
    let boot_bytes = std::fs::read(&boot)?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o444);
    h.set_size(boot_bytes.len() as u64);
    tb.append_data(&mut h, "image/image.boot", boot_bytes.as_slice())?;
    let boot_tar = tb.into_inner()?;
    let boot_layer = gzip(&boot_tar)?;
    let boot_digest = c
        .push_blob_bytes(&boot_layer, t)
        .map_err(|e| e.to_string())?;
    let mut config: serde_json::Value = serde_json::from_slice(source_config)?;
    config["rootfs"] =
        serde_json::json!({"type": "layers", "diff_ids": [blob_digest, sha256(&boot_tar)]});
    if let Some(o) = config.as_object_mut() {
        o.remove("history");
    }
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = c
        .push_blob_bytes(&config_bytes, t)
        .map_err(|e| e.to_string())?;
    let desc = |media_type: &str, digest: &str, size: usize, ann: &[(&str, &str)]| Descriptor {
        media_type: media_type.into(),
        digest: digest.into(),
        size: size as u64,
        annotations: ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        platform: None,
    };
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        config: desc(OCI_CONFIG, &config_digest, config_bytes.len(), &[]),
        layers: vec![
            desc(
                "application/vnd.oci.image.layer.nydus.blob.v1",
                &blob_digest,
                blob_bytes.len(),
                &[("containerd.io/snapshot/nydus-blob", "true")],
            ),
            desc(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &boot_digest,
                boot_layer.len(),
                &[
                    ("containerd.io/snapshot/nydus-bootstrap", "true"),
                    ("containerd.io/snapshot/nydus-fs-version", "6"),
                ],
            ),
        ],
        annotations: Default::default(),
    };
    let r = Reference::parse(target)?;
    c.push_manifest(r.manifest_ref(), &serde_json::to_vec(&m)?, OCI_MANIFEST)
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn check_against_a_nydus_v6_target() -> Res {
    if require("skopeo", have("skopeo")).is_none() {
        return Ok(());
    }
    if require_nydus_image().is_none() {
        return Ok(());
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("check-nydus", &["--htpasswd", &creds()]),
    ) else {
        return Ok(());
    };
    let tmp = scratch();
    let t = tmp.path();
    // The source: one layer, the tar of the tree nydus-image builds from.
    let tree = t.join("tree");
    nydus_tree(&tree, b"config v1\n")?;
    let out = std::process::Command::new("tar")
        .args(["--format=posix", "--numeric-owner", "-C"])
        .arg(&tree)
        .args(["-cf", "-", "."])
        .output()?;
    assert!(out.status.success(), "tar");
    let layout = t.join("layout");
    write_layout(
        &layout,
        &[(out.stdout, "application/vnd.oci.image.layer.v1.tar")],
    )?;
    let src = format!("{}/nydus/app:v1", reg.addr);
    skopeo_push(&layout, &src, &creds(), false)?;
    let config = {
        let c = client(&src);
        let (m, _, _) = c.get_manifest().map_err(|e| e.to_string())?;
        c.get_blob_bytes(&m.config.digest, m.config.size, 1 << 20)
            .map_err(|e| e.to_string())?
    };
    // nydus-image's defaults (zstd, blake3, 1 MiB chunks), and sha256 digests with lz4 and
    // 64 KiB chunks: the source is cut and named as each image is.
    let tgt = format!("{}/nydus/app:v1-nydus", reg.addr);
    let defaults = BuildOpts {
        compressor: "zstd",
        digester: "blake3",
        chunk_size: "0x100000",
    };
    let sha = BuildOpts {
        compressor: "lz4_block",
        digester: "sha256",
        chunk_size: "0x10000",
    };
    for opts in [sha, defaults] {
        push_nydus(&tree, opts, &config, &tgt, t)?;
        let r = check(&src, &tgt, t, &[]);
        assert_clean(&format!("Nydus v6 target ({})", opts.name()), &r);
        assert_eq!(r.2["images"][0]["format"], "nydus-rafs-v6", "{}", r.1);
        assert!(
            r.2["images"][0]["chunks_verified"].as_u64().unwrap_or(0) >= 3,
            "{}",
            r.1
        );
    }

    // A modified file, rebuilt by nydus-image and pushed under the same tag: caught.
    let tree2 = t.join("tree2");
    nydus_tree(&tree2, b"config v2\n")?;
    push_nydus(&tree2, defaults, &config, &tgt, t)?;
    let r = check(&src, &tgt, t, &[]);
    assert_caught(
        "modified file in a Nydus target",
        &r,
        &["PROBLEM /etc/conf:", "content differs"],
    );
    Ok(())
}
