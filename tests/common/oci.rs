//! OCI images for tests: tar layers, OCI image layouts (one platform or an index), `docker
//! save` archives, pushing with skopeo, and the registry's stored blob files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{RngCore, SeedableRng};

use super::registry::Registry;

/// A test result.
pub type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

pub enum Ent<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, Vec<u8>),
    Symlink(&'a str, &'a str),
    Link(&'a str, &'a str),
}

pub fn layer(entries: &[Ent], mtime: u64) -> Res<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(mtime);
        h.set_uid(1000);
        h.set_gid(100);
        match e {
            Ent::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..])?;
            }
            Ent::File(p, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, data.as_slice())?;
            }
            Ent::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target)?;
            }
            Ent::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Writes an OCI image layout at `dir` holding one image of `layers` (bytes, media type).
pub fn write_layout(dir: &Path, layers: &[(Vec<u8>, &str)]) -> Res {
    let (md, size) = put_image(dir, layers)?;
    write_index_json(
        dir,
        &serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": size, "platform": {"architecture": "amd64", "os": "linux"}}),
    )
}

/// Writes an OCI image layout at `dir` whose `index.json` names an image index of two
/// platforms: linux/arm64 (listed first) and linux/amd64.
pub fn write_multiarch_layout(
    dir: &Path,
    amd64: &[(Vec<u8>, &str)],
    arm64: &[(Vec<u8>, &str)],
) -> Res {
    let (a, asize) = put_image(dir, amd64)?;
    let (r, rsize) = put_image(dir, arm64)?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": r, "size": rsize,
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": a, "size": asize,
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))?;
    let d = put_blob(dir, &index)?;
    write_index_json(
        dir,
        &serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": d, "size": index.len()}),
    )
}

pub fn put_blob(dir: &Path, bytes: &[u8]) -> Res<String> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let d = sha256(bytes);
    fs::write(blobs.join(&d[7..]), bytes)?;
    Ok(d)
}

pub fn write_index_json(dir: &Path, entry: &serde_json::Value) -> Res {
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [entry]}))?,
    )?;
    Ok(())
}

/// Stores the layers, a config and a manifest of one image; returns the manifest's digest and
/// size.
pub fn put_image(dir: &Path, layers: &[(Vec<u8>, &str)]) -> Res<(String, usize)> {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (bytes, mt) in layers {
        let d = put_blob(dir, bytes)?;
        descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": bytes.len()}));
        diff_ids.push(d);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/usr/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let cd = put_blob(dir, &config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))?;
    Ok((put_blob(dir, &manifest)?, manifest.len()))
}

pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn gzip(data: &[u8]) -> Res<Vec<u8>> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(data)?;
    Ok(g.finish()?)
}

pub fn have(cmd: &str) -> Result<(), String> {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(drop)
        .ok_or_else(|| format!("{cmd} is not installed (scripts/install-deps.sh installs it)"))
}

/// Writes a `docker save` style archive of `layers`.
pub fn write_docker_archive(path: &Path, layers: &[&[u8]]) -> Res {
    let mut b = tar::Builder::new(fs::File::create(path)?);
    let mut add = |name: &str, data: &[u8]| -> Res {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data)?;
        Ok(())
    };
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("{i:064x}/layer.tar");
        add(&name, l)?;
        names.push(name);
    }
    let config = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    add("cfg.json", config)?;
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": "cfg.json", "RepoTags": ["test:v1"], "Layers": names}
    ]))?;
    add("manifest.json", &manifest)?;
    b.finish()?;
    Ok(())
}

pub fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The registry's stored file of blob `digest`.
pub fn stored_blob(reg: &Registry, digest: &str) -> PathBuf {
    let hex = &digest["sha256:".len()..];
    reg.run_dir()
        .join("storage/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

pub fn flip_byte(path: &Path, offset: usize) -> Res {
    let mut b = fs::read(path)?;
    b[offset] ^= 0x55;
    fs::write(path, b)?;
    Ok(())
}

/// Pushes the OCI layout `layout` to `reference` with skopeo (every platform with `all`).
pub fn skopeo_push(layout: &Path, reference: &str, creds: &str, all: bool) -> Res {
    let mut c = Command::new("skopeo");
    c.arg("copy");
    if all {
        c.arg("--all");
    }
    let out = c
        .args(["--dest-tls-verify=false", "--dest-creds", creds])
        .arg(format!("oci:{}", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "skopeo copy to {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}
