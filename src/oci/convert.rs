//! `skiff convert`: an OCI image (from a registry, an OCI image layout directory or a
//! `docker save` archive) becomes a Skiff image in a registry: one Skiff blob per source layer,
//! a merged bootstrap, a config and a manifest (conventions in docs/format.md).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::Digest;

use super::manifest::{
    self, Descriptor, Fetched, ImageManifest, ANN_BLOB_ID, ANN_NYDUS_BLOB, ANN_NYDUS_BOOTSTRAP,
    ANN_ROOT_DIGEST, ANN_SOURCE, MAX_MANIFEST_BYTES, OCI_CONFIG, OCI_MANIFEST, SKIFF_BLOB,
    SKIFF_BOOTSTRAP_ZSTD,
};
use super::{OciError, Reference, RegistryClient, RegistryOptions};
use crate::build::{self, BuildOptions, BuildSummary, Compressor};
use crate::format::digest_hex;

/// Largest `manifest.json` of a `docker save` archive.
const MAX_ARCHIVE_MANIFEST: u64 = 1 << 20;

/// zstd level of the bootstrap layer: level 3 compresses a bootstrap about as well as level 19
/// (digests dominate and do not compress) at a fraction of the time.
const BOOTSTRAP_ZSTD_LEVEL: i32 = 3;

/// What to convert, and how.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The source: an image reference, an OCI layout directory or a `docker save` tarball.
    pub source: String,
    /// Registry settings for a registry source.
    pub source_registry: RegistryOptions,
    /// Where to push.
    pub target: Reference,
    /// Registry settings for the target.
    pub target_registry: RegistryOptions,
    /// Scratch directory (layers, blobs, bootstrap); a temporary one is used if `None`.
    pub work_dir: PathBuf,
    /// Chunk size.
    pub chunk_size: u32,
    /// Chunk compression.
    pub compressor: Compressor,
    /// Show progress bars (on a terminal).
    pub progress: bool,
}

/// One pushed Skiff blob.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PushedBlob {
    /// Index of the source layer it holds the new chunks of.
    pub layer: usize,
    /// Skiff blob id (blake3 hex).
    pub blob_id: String,
    /// Registry digest.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// What a conversion did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertSummary {
    /// The pushed manifest's digest.
    pub manifest_digest: String,
    /// The target reference.
    pub target: String,
    /// Source layers.
    pub source_layers: usize,
    /// Blobs pushed, in layer order.
    pub blobs: Vec<PushedBlob>,
    /// The bootstrap layer's digest.
    pub bootstrap_digest: String,
    /// The bootstrap layer's size (zstd-compressed): what a daemon fetches to start the image.
    pub bootstrap_bytes: u64,
    /// The bootstrap's own size.
    pub bootstrap_uncompressed_bytes: u64,
    /// The build.
    pub build: BuildSummary,
}

/// A source image fetched into the work directory.
struct SourceImage {
    layers: Vec<PathBuf>,
    config: Vec<u8>,
}

/// Converts `opts.source` and pushes the result to `opts.target`.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertSummary, OciError> {
    let work = &opts.work_dir;
    std::fs::create_dir_all(work).map_err(|e| OciError::io("creating", work, e))?;
    let bars = MultiProgress::with_draw_target(
        if opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    let src = fetch_source(opts, &bars)?;
    tracing::info!(source = %opts.source, layers = src.layers.len(), "source image fetched");

    let blob_dir = work.join("blobs");
    let bootstrap_path = work.join("bootstrap");
    let build_opts = BuildOptions {
        bootstrap: bootstrap_path.clone(),
        blob_dir: blob_dir.clone(),
        chunk_size: opts.chunk_size,
        compressor: opts.compressor,
        chunk_dicts: Vec::new(),
        progress: opts.progress,
        io_threads: 0,
        blob_id_sha256: false,
    };
    let (summary, per_layer) = build::build_blob_per_layer(&src.layers, &build_opts)?;

    let target = RegistryClient::new(&opts.target, &opts.target_registry)?;
    let mut layers = Vec::new();
    let mut pushed = Vec::new();
    for (i, rec) in per_layer.iter().enumerate() {
        let Some(rec) = rec else { continue };
        let hexid = digest_hex(&rec.id);
        let path = blob_dir.join(&hexid);
        let size = rec.size.get();
        let digest = sha256_file(&path)?;
        let bar = bar(&bars, size, format!("push blob {}", i + 1));
        target.push_blob_file(&path, &digest, size, &|n| bar.inc(n))?;
        bar.finish();
        layers.push(Descriptor {
            media_type: SKIFF_BLOB.to_string(),
            digest: digest.clone(),
            size,
            annotations: BTreeMap::from([
                (ANN_BLOB_ID.to_string(), hexid.clone()),
                (ANN_NYDUS_BLOB.to_string(), "true".to_string()),
            ]),
            platform: None,
        });
        pushed.push(PushedBlob {
            layer: i,
            blob_id: hexid,
            digest,
            size,
        });
    }
    let boot =
        std::fs::read(&bootstrap_path).map_err(|e| OciError::io("reading", &bootstrap_path, e))?;
    let boot_diff_id = manifest::sha256_digest(&boot);
    let boot_zstd = zstd::bulk::compress(&boot, BOOTSTRAP_ZSTD_LEVEL)
        .map_err(|e| OciError::io("compressing", &bootstrap_path, e))?;
    let boot_digest = target.push_blob_bytes(&boot_zstd, work)?;
    let mut diff_ids: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    diff_ids.push(boot_diff_id);
    layers.push(Descriptor {
        media_type: SKIFF_BOOTSTRAP_ZSTD.to_string(),
        digest: boot_digest.clone(),
        size: boot_zstd.len() as u64,
        annotations: BTreeMap::from([
            (ANN_NYDUS_BOOTSTRAP.to_string(), "true".to_string()),
            (ANN_ROOT_DIGEST.to_string(), summary.root_digest.clone()),
        ]),
        platform: None,
    });

    let config = rewrite_config(&src.config, &diff_ids)?;
    let config_digest = target.push_blob_bytes(&config, work)?;
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_string()),
        config: Descriptor {
            media_type: OCI_CONFIG.to_string(),
            digest: config_digest,
            size: config.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
        },
        layers,
        annotations: BTreeMap::from([(ANN_SOURCE.to_string(), opts.source.clone())]),
    };
    let mbytes = serde_json::to_vec_pretty(&m)
        .map_err(|e| OciError::Invalid(format!("serialising the manifest: {e}")))?;
    let tag = opts.target.manifest_ref().to_string();
    target.push_manifest(&tag, &mbytes, OCI_MANIFEST)?;
    let manifest_digest = manifest::sha256_digest(&mbytes);
    tracing::info!(target = %opts.target, manifest = %manifest_digest, "pushed");
    Ok(ConvertSummary {
        manifest_digest,
        target: opts.target.to_string(),
        source_layers: src.layers.len(),
        blobs: pushed,
        bootstrap_digest: boot_digest,
        bootstrap_bytes: boot_zstd.len() as u64,
        bootstrap_uncompressed_bytes: boot.len() as u64,
        build: summary,
    })
}

/// The source's config with `rootfs.diff_ids` naming the new layers (which are stored
/// uncompressed, so their digest is their diff id) and without `history`, whose entries
/// describe the source's layers.
fn rewrite_config(source: &[u8], diff_ids: &[String]) -> Result<Vec<u8>, OciError> {
    let mut v: serde_json::Value = serde_json::from_slice(source)
        .map_err(|e| OciError::Invalid(format!("image config: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| OciError::Invalid("image config is not an object".into()))?;
    obj.remove("history");
    obj.insert(
        "rootfs".into(),
        serde_json::json!({
            "type": "layers",
            "diff_ids": diff_ids,
        }),
    );
    serde_json::to_vec(&v).map_err(|e| OciError::Invalid(format!("image config: {e}")))
}

fn bar(bars: &MultiProgress, len: u64, msg: String) -> ProgressBar {
    let b = bars.add(ProgressBar::new(len));
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(msg);
    b
}

/// `sha256:…` of a file, streamed.
fn sha256_file(path: &Path) -> Result<String, OciError> {
    let mut f = File::open(path).map_err(|e| OciError::io("opening", path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| OciError::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Whether a layer media type is a tar layer Skiff can apply (compression is told by content).
fn is_tar_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.v1.tar")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar")
}

fn fetch_source(opts: &ConvertOptions, bars: &MultiProgress) -> Result<SourceImage, OciError> {
    let p = Path::new(&opts.source);
    if p.is_dir() {
        return from_oci_layout(p, &opts.work_dir);
    }
    if p.is_file() {
        return from_docker_archive(p, &opts.work_dir);
    }
    let reference = Reference::parse(&opts.source)?;
    let client = RegistryClient::new(&reference, &opts.source_registry)?;
    let (m, _, _) = client.get_manifest()?;
    let config =
        client.get_blob_bytes(&m.config.digest, m.config.size, MAX_MANIFEST_BYTES as u64)?;
    let dir = opts.work_dir.join("layers");
    std::fs::create_dir_all(&dir).map_err(|e| OciError::io("creating", &dir, e))?;
    let mut layers = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        if !is_tar_layer(&l.media_type) {
            return Err(OciError::Invalid(format!(
                "layer {} has media type {}, not a tar layer",
                l.digest, l.media_type
            )));
        }
        let path = dir.join(l.digest.replace(':', "-"));
        let b = bar(bars, l.size, format!("pull layer {}", i + 1));
        client.get_blob_to_file(&l.digest, l.size, &path, &|n| b.inc(n))?;
        b.finish();
        layers.push(path);
    }
    Ok(SourceImage { layers, config })
}

/// Reads a file of an OCI layout named by `digest`, bounded and verified.
fn layout_blob(dir: &Path, d: &Descriptor, max: u64) -> Result<Vec<u8>, OciError> {
    d.validate()?;
    if d.size > max {
        return Err(OciError::Invalid(format!("{}: too large", d.digest)));
    }
    let path = layout_blob_path(dir, &d.digest);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| OciError::io("reading", &path, e))?;
    if bytes.len() as u64 != d.size {
        return Err(OciError::Invalid(format!(
            "{}: {} bytes, the descriptor says {}",
            path.display(),
            bytes.len(),
            d.size
        )));
    }
    manifest::verify_digest(&path.display().to_string(), &bytes, &d.digest)?;
    Ok(bytes)
}

fn layout_blob_path(dir: &Path, digest: &str) -> PathBuf {
    // The digest was validated: "sha256:" and 64 hex digits, no path separators.
    dir.join("blobs/sha256").join(&digest[7..])
}

/// An OCI image layout: `index.json` → (index →) linux/amd64 manifest → config and layers.
fn from_oci_layout(dir: &Path, _work: &Path) -> Result<SourceImage, OciError> {
    let layout = dir.join("oci-layout");
    if !layout.is_file() {
        return Err(OciError::Invalid(format!(
            "{} is a directory but not an OCI image layout (no oci-layout file)",
            dir.display()
        )));
    }
    let index_path = dir.join("index.json");
    let mut bytes = Vec::new();
    File::open(&index_path)
        .and_then(|f| {
            f.take(MAX_MANIFEST_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(|e| OciError::io("reading", &index_path, e))?;
    let mut fetched = manifest::parse_manifest(&bytes, Some(manifest::OCI_INDEX))?;
    for _ in 0..3 {
        match fetched {
            Fetched::Manifest(m) => {
                let config = layout_blob(dir, &m.config, MAX_MANIFEST_BYTES as u64)?;
                let mut layers = Vec::new();
                for l in &m.layers {
                    l.validate()?;
                    if !is_tar_layer(&l.media_type) {
                        return Err(OciError::Invalid(format!(
                            "layer {} has media type {}, not a tar layer",
                            l.digest, l.media_type
                        )));
                    }
                    let path = layout_blob_path(dir, &l.digest);
                    let got = sha256_file(&path)?;
                    if got != l.digest {
                        return Err(OciError::Digest {
                            what: path.display().to_string(),
                            got,
                            want: l.digest.clone(),
                        });
                    }
                    layers.push(path);
                }
                return Ok(SourceImage { layers, config });
            }
            Fetched::Index(i) => {
                let d = manifest::pick_platform(&i)?.clone();
                let b = layout_blob(dir, &d, MAX_MANIFEST_BYTES as u64)?;
                fetched = manifest::parse_manifest(&b, Some(&d.media_type))?;
            }
        }
    }
    Err(OciError::Invalid(
        "OCI layout: indexes nested too deep".into(),
    ))
}

/// A `docker save` tarball: `manifest.json` names the config and the layer files.
fn from_docker_archive(path: &Path, work: &Path) -> Result<SourceImage, OciError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        layers: Vec<String>,
    }
    let open = || -> Result<tar::Archive<File>, OciError> {
        Ok(tar::Archive::new(
            File::open(path).map_err(|e| OciError::io("opening", path, e))?,
        ))
    };
    let bad = |what: String| OciError::Invalid(format!("{}: {what}", path.display()));
    let io = |e: std::io::Error| OciError::io("reading", path, e);
    // Pass 1: manifest.json.
    let mut manifest_json = None;
    let mut a = open()?;
    for e in a.entries().map_err(io)? {
        let e = e.map_err(io)?;
        if e.path_bytes().as_ref() == b"manifest.json" {
            let mut v = Vec::new();
            e.take(MAX_ARCHIVE_MANIFEST + 1)
                .read_to_end(&mut v)
                .map_err(io)?;
            if v.len() as u64 > MAX_ARCHIVE_MANIFEST {
                return Err(bad("manifest.json too large".into()));
            }
            manifest_json = Some(v);
            break;
        }
    }
    let mj =
        manifest_json.ok_or_else(|| bad("no manifest.json: not a docker save archive".into()))?;
    let entries: Vec<Entry> =
        serde_json::from_slice(&mj).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let [entry] = entries.as_slice() else {
        return Err(bad(format!(
            "manifest.json lists {} images; exactly one is supported",
            entries.len()
        )));
    };
    // Pass 2: the config and layers, copied out under names of our own.
    let dir = work.join("layers");
    std::fs::create_dir_all(&dir).map_err(|e| OciError::io("creating", &dir, e))?;
    let mut wanted: BTreeMap<&str, PathBuf> = BTreeMap::new();
    for (i, l) in entry.layers.iter().enumerate() {
        wanted.insert(l.as_str(), dir.join(format!("layer-{i}")));
    }
    let mut config = None;
    let mut a = open()?;
    for e in a.entries().map_err(io)? {
        let mut e = e.map_err(io)?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        if name == entry.config {
            let mut v = Vec::new();
            (&mut e)
                .take(MAX_MANIFEST_BYTES as u64 + 1)
                .read_to_end(&mut v)
                .map_err(io)?;
            if v.len() > MAX_MANIFEST_BYTES {
                return Err(bad("config too large".into()));
            }
            config = Some(v);
        } else if let Some(dest) = wanted.get(name.as_str()) {
            let mut f = File::create(dest).map_err(|e| OciError::io("creating", dest, e))?;
            std::io::copy(&mut e, &mut f).map_err(|e| OciError::io("writing", dest, e))?;
        }
    }
    let config = config.ok_or_else(|| bad(format!("config {} missing", entry.config)))?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let p = wanted
            .get(l.as_str())
            .cloned()
            .ok_or_else(|| bad(format!("layer {l} missing")))?;
        if !p.is_file() {
            return Err(bad(format!("layer {l} missing")));
        }
        layers.push(p);
    }
    Ok(SourceImage { layers, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rewrite() {
        let out = rewrite_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"]},"rootfs":{"type":"layers","diff_ids":["x"]},"history":[{}]}"#,
            &["sha256:00".to_string()],
        )
        .expect("rewrite");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["rootfs"]["diff_ids"][0], "sha256:00");
        assert!(v.get("history").is_none());
        assert_eq!(v["config"]["Env"][0], "A=1");
        assert!(rewrite_config(b"[]", &[]).is_err());
    }

    fn tar_layer(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data.as_slice())
                .expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn one_blob_per_layer_and_no_chunk_stored_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let noise = |seed: u8, n: usize| -> Vec<u8> {
            let mut v = vec![0u8; n];
            blake3::Hasher::new()
                .update(&[seed])
                .finalize_xof()
                .fill(&mut v);
            v
        };
        let a = noise(1, 20_000);
        let layers = [
            tar_layer(&[("a", a.clone()), ("b", noise(2, 9000))]),
            tar_layer(&[
                (".wh.b", Vec::new()),
                ("c", noise(3, 5000)),
                ("a2", a.clone()),
            ]),
            tar_layer(&[(".wh.c", Vec::new())]),
            tar_layer(&[("d", noise(4, 100))]),
        ];
        let mut paths = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let p = dir.path().join(format!("l{i}.tar"));
            std::fs::write(&p, l).expect("write");
            paths.push(p);
        }
        let opts = BuildOptions {
            bootstrap: dir.path().join("boot"),
            blob_dir: dir.path().join("blobs"),
            chunk_size: 4096,
            compressor: Compressor::None,
            chunk_dicts: Vec::new(),
            progress: false,
            io_threads: 0,
            blob_id_sha256: false,
        };
        let (summary, per_layer) = build::build_blob_per_layer(&paths, &opts).expect("build");
        let sizes: Vec<Option<u64>> = per_layer.iter().map(|r| r.map(|r| r.size.get())).collect();
        // Layer 1 stores only c (a2 is a's chunks); layer 2 stores nothing.
        assert_eq!(sizes, vec![Some(29_000), Some(5000), None, Some(100)]);
        assert_eq!(summary.chunks.dedup_chunks, 5);
        let b = crate::format::Bootstrap::load(&opts.bootstrap).expect("bootstrap");
        assert_eq!(b.blobs().len(), 3);
        for (rec, want) in b.blobs().iter().zip(per_layer.iter().flatten()) {
            assert_eq!(rec.id, want.id);
        }
        let problems = crate::check::verify_chunks(&b, &opts.blob_dir);
        assert!(
            problems.is_empty(),
            "{:?}",
            problems.iter().map(|p| &p.what).collect::<Vec<_>>()
        );
    }
}
