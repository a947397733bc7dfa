//! `skiff convert`: an OCI image (from a registry, an OCI image layout directory or a
//! `docker save` archive) becomes a Skiff image in a registry: one Skiff blob per source layer,
//! a merged bootstrap, a config and a manifest (conventions in docs/format.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::manifest::{
    self, Descriptor, ImageManifest, ANN_BLOB_ID, ANN_BOOTSTRAP_FORMAT, ANN_NYDUS_BLOB,
    ANN_NYDUS_BOOTSTRAP, ANN_PREFETCH_BLOB, ANN_ROOT_DIGEST, ANN_SOURCE, NODE_BOOTSTRAP_PATH,
    NYDUS_BLOB, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, SKIFF_BLOB,
    SKIFF_BOOTSTRAP_ZSTD,
};
use super::source::{self, sha256_file, Platforms, SourceImage};
use super::{OciError, Reference, RegistryClient, RegistryOptions};
use crate::build::{self, BuildOptions, BuildSummary, Compressor};
use crate::format::digest_hex;

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
    /// The prefetch list and its layout (every platform gets the same list).
    pub prefetch: crate::build::PrefetchLayout,
    /// Which platforms of an index source to convert: linux/amd64 into one manifest, or every
    /// platform into an index of converted manifests.
    pub platforms: Platforms,
    /// How the image is laid out in the registry.
    pub layout: ImageLayout,
}

/// How a converted image is laid out in the registry (docs/format.md, "Images in OCI
/// registries").
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageLayout {
    /// What a node with containerd and nydus-snapshotter pulls (the default): blobs named by
    /// their sha256 in layers of Nydus's blob media type, the bootstrap (with the node
    /// compatibility header) as `image/image.boot` in a gzip tar layer annotated
    /// `containerd.io/snapshot/nydus-bootstrap`. A daemon finds every blob from the registry
    /// host, the repository and the bootstrap alone.
    Node,
    /// Skiff's earlier layout: blobs named by their blake3 in layers of Skiff's media type,
    /// mapped by annotations; the bootstrap zstd-compressed in a layer of its own type.
    Skiff,
}

/// One pushed Skiff blob.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PushedBlob {
    /// Index of the source layer it holds the new chunks of (the number of source layers for
    /// the prefetch blob).
    pub layer: usize,
    /// Whether it is the prefetch blob.
    pub prefetch: bool,
    /// Skiff blob id (hex: the sha256 in the node layout, the blake3 in Skiff's).
    pub blob_id: String,
    /// Registry digest.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// What the conversion of one image did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertSummary {
    /// The pushed manifest's digest.
    pub manifest_digest: String,
    /// The target reference.
    pub target: String,
    /// The image's platform (`os/arch[/variant]`), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Source layers.
    pub source_layers: usize,
    /// Bytes of source layers (compressed, as the source stores them).
    pub source_bytes: u64,
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
    /// The pushed manifest's size.
    pub manifest_bytes: u64,
}

impl ConvertSummary {
    fn manifest_bytes_len(&self) -> u64 {
        self.manifest_bytes
    }

    /// Bytes of the converted image: blobs and bootstrap layer.
    pub fn target_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum::<u64>() + self.bootstrap_bytes
    }
}

/// What a conversion did: one image, or an index of converted images.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(untagged)]
pub enum ConvertReport {
    /// One manifest pushed under the target tag.
    Image(Box<ConvertSummary>),
    /// A manifest per platform, then an index of them under the target tag.
    Index {
        /// The pushed index's digest.
        index_digest: String,
        /// The target reference.
        target: String,
        /// Each platform's conversion, in the source index's order.
        images: Vec<ConvertSummary>,
    },
}

impl ConvertReport {
    /// The digest of what was pushed under the tag.
    pub fn digest(&self) -> &str {
        match self {
            Self::Image(s) => &s.manifest_digest,
            Self::Index { index_digest, .. } => index_digest,
        }
    }

    /// The images converted.
    pub fn images(&self) -> Vec<&ConvertSummary> {
        match self {
            Self::Image(s) => vec![s.as_ref()],
            Self::Index { images, .. } => images.iter().collect(),
        }
    }
}

/// Converts `opts.source` and pushes the result to `opts.target`. Everything is pushed before
/// the tag is: a conversion that stops half-way leaves no image under the tag.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport, OciError> {
    let work = &opts.work_dir;
    std::fs::create_dir_all(work).map_err(|e| OciError::io("creating", work, e))?;
    let src = source::open_source(&opts.source, &opts.source_registry, work, opts.platforms)?;
    tracing::info!(source = %opts.source, images = src.images.len(), index = src.is_index, "source image opened");
    let tag = opts.target.manifest_ref().to_string();
    if !src.is_index || opts.platforms == Platforms::Default {
        let image = src
            .images
            .into_iter()
            .next()
            .ok_or_else(|| OciError::Invalid("the source has no image".into()))?;
        return convert_image(opts, image, Some(&tag), work)
            .map(|s| ConvertReport::Image(Box::new(s)));
    }
    let mut images = Vec::new();
    let mut entries = Vec::new();
    for (i, image) in src.images.into_iter().enumerate() {
        let platform = image.platform.clone();
        let s = convert_image(opts, image, None, &work.join(format!("platform-{i}")))?;
        entries.push(serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": s.manifest_digest,
            "size": s.manifest_bytes_len(),
            "platform": platform,
        }));
        images.push(s);
    }
    let index = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
        "annotations": {ANN_SOURCE: opts.source},
    }))
    .map_err(|e| OciError::Invalid(format!("serialising the index: {e}")))?;
    let target = RegistryClient::new(&opts.target, &opts.target_registry)?;
    target.push_manifest(&tag, &index, OCI_INDEX)?;
    let index_digest = manifest::sha256_digest(&index);
    tracing::info!(target = %opts.target, index = %index_digest, "pushed");
    Ok(ConvertReport::Index {
        index_digest,
        target: opts.target.to_string(),
        images,
    })
}

/// Converts one source image and pushes its manifest under `tag`, or by digest only.
fn convert_image(
    opts: &ConvertOptions,
    mut src: SourceImage,
    tag: Option<&str>,
    work: &Path,
) -> Result<ConvertSummary, OciError> {
    std::fs::create_dir_all(work).map_err(|e| OciError::io("creating", work, e))?;
    let bars = MultiProgress::with_draw_target(
        if opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    let layer_dir = work.join("layers");
    let mut layer_paths = Vec::new();
    for (i, l) in src.layers.iter_mut().enumerate() {
        let b = bar(&bars, l.size, format!("pull layer {}", i + 1));
        l.download(&layer_dir, &|n| b.inc(n))?;
        b.finish();
        layer_paths.push(
            l.path()
                .ok_or_else(|| OciError::Invalid("internal: layer not downloaded".into()))?
                .to_path_buf(),
        );
    }
    let source_bytes = src.layers.iter().map(|l| l.size).sum();
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
        blob_id_sha256: opts.layout == ImageLayout::Node,
        node_compat: opts.layout == ImageLayout::Node,
    };
    let (summary, mut per_layer, prefetch_blob) =
        build::build_blob_per_layer_with_prefetch(&layer_paths, &build_opts, &opts.prefetch)?;
    // The prefetch blob is pushed as a layer after the source's.
    let prefetch_layer = prefetch_blob.map(|_| per_layer.len());
    per_layer.push(prefetch_blob);

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
        let (media_type, mut annotations) = match opts.layout {
            ImageLayout::Node => {
                if digest != format!("sha256:{hexid}") {
                    return Err(OciError::Invalid(format!(
                        "internal: blob {hexid} is not named by its sha256 {digest}"
                    )));
                }
                (
                    NYDUS_BLOB,
                    BTreeMap::from([(ANN_NYDUS_BLOB.to_string(), "true".to_string())]),
                )
            }
            ImageLayout::Skiff => (
                SKIFF_BLOB,
                BTreeMap::from([
                    (ANN_BLOB_ID.to_string(), hexid.clone()),
                    (ANN_NYDUS_BLOB.to_string(), "true".to_string()),
                ]),
            ),
        };
        if prefetch_layer == Some(i) {
            annotations.insert(ANN_PREFETCH_BLOB.to_string(), "true".to_string());
        }
        layers.push(Descriptor {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size,
            annotations,
            platform: None,
        });
        pushed.push(PushedBlob {
            layer: i,
            prefetch: prefetch_layer == Some(i),
            blob_id: hexid,
            digest,
            size,
        });
    }
    let boot =
        std::fs::read(&bootstrap_path).map_err(|e| OciError::io("reading", &bootstrap_path, e))?;
    let (boot_layer, boot_diff_id, boot_type, mut boot_ann) = match opts.layout {
        ImageLayout::Node => {
            let tar =
                bootstrap_tar(&boot).map_err(|e| OciError::io("archiving", &bootstrap_path, e))?;
            let diff_id = manifest::sha256_digest(&tar);
            let gz = gzip(&tar).map_err(|e| OciError::io("compressing", &bootstrap_path, e))?;
            (
                gz,
                diff_id,
                OCI_LAYER_GZIP,
                BTreeMap::from([(ANN_BOOTSTRAP_FORMAT.to_string(), "skiff-v1".to_string())]),
            )
        }
        ImageLayout::Skiff => (
            zstd::bulk::compress(&boot, BOOTSTRAP_ZSTD_LEVEL)
                .map_err(|e| OciError::io("compressing", &bootstrap_path, e))?,
            manifest::sha256_digest(&boot),
            SKIFF_BOOTSTRAP_ZSTD,
            BTreeMap::new(),
        ),
    };
    let boot_digest = target.push_blob_bytes(&boot_layer, work)?;
    let mut diff_ids: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    diff_ids.push(boot_diff_id);
    boot_ann.insert(ANN_NYDUS_BOOTSTRAP.to_string(), "true".to_string());
    boot_ann.insert(ANN_ROOT_DIGEST.to_string(), summary.root_digest.clone());
    layers.push(Descriptor {
        media_type: boot_type.to_string(),
        digest: boot_digest.clone(),
        size: boot_layer.len() as u64,
        annotations: boot_ann,
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
    let manifest_digest = manifest::sha256_digest(&mbytes);
    target.push_manifest(tag.unwrap_or(&manifest_digest), &mbytes, OCI_MANIFEST)?;
    tracing::info!(target = %opts.target, manifest = %manifest_digest, "pushed");
    Ok(ConvertSummary {
        manifest_digest,
        target: opts.target.to_string(),
        platform: src
            .platform
            .as_ref()
            .map(|p| source::platform_name(Some(p))),
        source_layers: src.layers.len(),
        source_bytes,
        manifest_bytes: mbytes.len() as u64,
        blobs: pushed,
        bootstrap_digest: boot_digest,
        bootstrap_bytes: boot_layer.len() as u64,
        bootstrap_uncompressed_bytes: boot.len() as u64,
        build: summary,
    })
}

/// The node layout's bootstrap layer, uncompressed: a tar holding the directory `image` and
/// the bootstrap as `image/image.boot` (0444), owned by root, dated 0 (the same bytes for the same
/// bootstrap).
fn bootstrap_tar(boot: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(0);
    b.append_data(&mut dir, "image", &[][..])?;
    let mut f = tar::Header::new_ustar();
    f.set_entry_type(tar::EntryType::Regular);
    // Read-only, as nydusify writes it.
    f.set_mode(0o444);
    f.set_size(boot.len() as u64);
    f.set_mtime(0);
    b.append_data(&mut f, NODE_BOOTSTRAP_PATH, boot)?;
    b.into_inner()
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut g, data)?;
    g.finish()
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
            node_compat: false,
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
