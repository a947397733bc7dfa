//! The source of a conversion or a check: an OCI image in a registry, an OCI image layout
//! directory or a `docker save` tarball, opened per platform.
//!
//! Registry layers are not fetched here: a [`SourceLayer`] is a [`LayerInput`] that streams the
//! layer (checked against its sha256 digest at its end) or, after [`SourceLayer::download`],
//! reads a verified local copy. `skiff convert` downloads; `skiff check` streams, storing nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest;

use super::manifest::{self, Descriptor, Fetched, ImageManifest, Platform, MAX_MANIFEST_BYTES};
use super::{OciError, Reference, RegistryClient, RegistryOptions};
use crate::build::layers::LayerInput;
use crate::build::BuildError;

/// Largest `manifest.json` of a `docker save` archive.
const MAX_ARCHIVE_MANIFEST: u64 = 1 << 20;

/// Which platforms of an index to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platforms {
    /// linux/amd64 (or an index's only, platform-less manifest).
    Default,
    /// Every platform the index lists (attestation manifests, of platform `unknown/unknown`,
    /// are not images and are left out).
    All,
}

/// Where a layer's bytes are.
#[derive(Clone)]
enum LayerLoc {
    /// A local file, already checked against the digest (layouts, downloads) or without one
    /// (`docker save` archives, whose manifest names files).
    File(PathBuf),
    /// In a registry, streamed on open.
    Registry(Arc<RegistryClient>),
}

/// One layer of a source image.
#[derive(Clone)]
pub struct SourceLayer {
    /// `sha256:…` (empty for an archive's layer, which the archive names by file).
    pub digest: String,
    /// Size in bytes (0 when unknown: archives).
    pub size: u64,
    /// The media type (a tar layer's, checked when opened).
    pub media_type: String,
    loc: LayerLoc,
}

impl SourceLayer {
    /// Downloads a registry layer to `dir` (checked against its digest), so that opening it
    /// reads the local copy; `progress` is told of each piece received.
    pub fn download(&mut self, dir: &Path, progress: &dyn Fn(u64)) -> Result<(), OciError> {
        let LayerLoc::Registry(client) = &self.loc else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| OciError::io("creating", dir, e))?;
        let path = dir.join(self.digest.replace(':', "-"));
        client.get_blob_to_file(&self.digest, self.size, &path, progress)?;
        self.loc = LayerLoc::File(path);
        Ok(())
    }

    /// The local file, once there is one.
    pub fn path(&self) -> Option<&Path> {
        match &self.loc {
            LayerLoc::File(p) => Some(p),
            LayerLoc::Registry(_) => None,
        }
    }
}

impl LayerInput for SourceLayer {
    fn name(&self) -> String {
        match &self.loc {
            LayerLoc::Registry(_) => self.digest.clone(),
            LayerLoc::File(p) if self.digest.is_empty() => p.display().to_string(),
            LayerLoc::File(p) => format!("{} ({})", self.digest, p.display()),
        }
    }

    fn open(&self) -> Result<Box<dyn Read + '_>, BuildError> {
        match &self.loc {
            LayerLoc::File(p) => Ok(Box::new(
                File::open(p).map_err(|e| BuildError::io("opening", p, e))?,
            )),
            LayerLoc::Registry(client) => {
                let r = client
                    .get_blob_reader(&self.digest, self.size)
                    .map_err(|e| BuildError::Layer {
                        layer: self.digest.clone(),
                        what: crate::util::error_chain(&e),
                    })?;
                Ok(Box::new(r))
            }
        }
    }
}

/// One image of a source: a platform's manifest, its config and its layers.
#[derive(Clone)]
pub struct SourceImage {
    /// The platform: the index entry's, else the config's architecture and os.
    pub platform: Option<Platform>,
    /// The manifest (`None` for a `docker save` archive, which has none).
    pub manifest: Option<ImageManifest>,
    /// The manifest's digest, when there is a manifest.
    pub manifest_digest: Option<String>,
    /// The config blob's bytes (verified).
    pub config: Vec<u8>,
    /// The layers, lowest first.
    pub layers: Vec<SourceLayer>,
}

/// A source opened: one image, or the chosen images of an index.
pub struct Source {
    /// Whether the source is an index (or an OCI layout whose index names an index).
    pub is_index: bool,
    /// The images, in the index's order.
    pub images: Vec<SourceImage>,
}

/// Opens `source` (a reference, an OCI layout directory or a `docker save` tarball): manifests
/// and configs are fetched and verified, layers only located. `work` is where an archive's
/// layers are copied out.
pub fn open_source(
    source: &str,
    registry: &RegistryOptions,
    work: &Path,
    platforms: Platforms,
) -> Result<Source, OciError> {
    let p = Path::new(source);
    if p.is_dir() {
        return from_oci_layout(p, platforms);
    }
    if p.is_file() {
        return from_docker_archive(p, work);
    }
    let reference = Reference::parse(source)?;
    let client = Arc::new(RegistryClient::new(&reference, registry)?);
    from_registry(&client, platforms)
}

/// Opens the image `client` names in its registry.
pub fn from_registry(
    client: &Arc<RegistryClient>,
    platforms: Platforms,
) -> Result<Source, OciError> {
    let wanted = client.reference().manifest_ref().to_string();
    let (fetched, _, digest) = client.get_manifest_ref(&wanted)?;
    let open_one = |m: ImageManifest,
                    digest: String,
                    platform: Option<Platform>|
     -> Result<SourceImage, OciError> {
        let config =
            client.get_blob_bytes(&m.config.digest, m.config.size, MAX_MANIFEST_BYTES as u64)?;
        let mut layers = Vec::new();
        for l in &m.layers {
            check_tar_layer(l)?;
            layers.push(SourceLayer {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
                loc: LayerLoc::Registry(client.clone()),
            });
        }
        Ok(SourceImage {
            platform: platform.or_else(|| config_platform(&config)),
            manifest: Some(m),
            manifest_digest: Some(digest),
            config,
            layers,
        })
    };
    match fetched {
        Fetched::Manifest(m) => Ok(Source {
            is_index: false,
            images: vec![open_one(m, digest, None)?],
        }),
        Fetched::Index(i) => {
            let mut images = Vec::new();
            for d in select(&i, platforms)? {
                match client.get_manifest_ref(&d.digest)? {
                    (Fetched::Manifest(m), _, md) => {
                        images.push(open_one(m, md, d.platform.clone())?)
                    }
                    (Fetched::Index(_), _, _) => {
                        return Err(OciError::Invalid(format!(
                            "{}: an index points to another index",
                            client.reference()
                        )))
                    }
                }
            }
            Ok(Source {
                is_index: true,
                images,
            })
        }
    }
}

/// The entries of `index` to open.
pub fn select(
    index: &manifest::ImageIndex,
    platforms: Platforms,
) -> Result<Vec<Descriptor>, OciError> {
    match platforms {
        Platforms::Default => Ok(vec![manifest::pick_platform(index)?.clone()]),
        Platforms::All => {
            let all: Vec<Descriptor> = index
                .manifests
                .iter()
                .filter(|d| {
                    !d.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "unknown" || p.architecture == "unknown")
                })
                .cloned()
                .collect();
            if all.is_empty() {
                return Err(OciError::Invalid("the index lists no image".into()));
            }
            Ok(all)
        }
    }
}

/// `os/architecture[/variant]`, for messages.
pub fn platform_name(p: Option<&Platform>) -> String {
    match p {
        None => "(no platform)".into(),
        Some(p) => match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        },
    }
}

/// The platform an image config declares.
fn config_platform(config: &[u8]) -> Option<Platform> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    Some(Platform {
        architecture: v.get("architecture")?.as_str()?.to_string(),
        os: v.get("os")?.as_str()?.to_string(),
        variant: v
            .get("variant")
            .and_then(|x| x.as_str())
            .map(str::to_string),
    })
}

/// Whether a layer media type is a tar layer Skiff can apply (compression is told by content).
pub fn is_tar_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.v1.tar")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar")
}

fn check_tar_layer(l: &Descriptor) -> Result<(), OciError> {
    if !is_tar_layer(&l.media_type) {
        return Err(OciError::Invalid(format!(
            "layer {} has media type {}, not a tar layer",
            l.digest, l.media_type
        )));
    }
    Ok(())
}

/// `sha256:…` of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, OciError> {
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

/// An OCI image layout: `index.json` → (index →) manifests → configs and layers.
fn from_oci_layout(dir: &Path, platforms: Platforms) -> Result<Source, OciError> {
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
    let top = match manifest::parse_manifest(&bytes, Some(manifest::OCI_INDEX))? {
        Fetched::Index(i) => i,
        Fetched::Manifest(_) => {
            return Err(OciError::Invalid(format!(
                "{}: index.json is not an index",
                dir.display()
            )))
        }
    };
    // index.json names the image: one manifest, or one index of platforms.
    let (entries, is_index) = match top.manifests.as_slice() {
        [only]
            if only.media_type == manifest::OCI_INDEX
                || only.media_type == manifest::DOCKER_MANIFEST_LIST =>
        {
            let b = layout_blob(dir, only, MAX_MANIFEST_BYTES as u64)?;
            match manifest::parse_manifest(&b, Some(&only.media_type))? {
                Fetched::Index(i) => (select(&i, platforms)?, true),
                Fetched::Manifest(_) => {
                    return Err(OciError::Invalid(format!(
                        "{}: an index entry is a manifest",
                        dir.display()
                    )))
                }
            }
        }
        _ => (select(&top, Platforms::Default)?, false),
    };
    let mut images = Vec::new();
    for d in entries {
        let b = layout_blob(dir, &d, MAX_MANIFEST_BYTES as u64)?;
        let m = match manifest::parse_manifest(&b, Some(&d.media_type))? {
            Fetched::Manifest(m) => m,
            Fetched::Index(_) => {
                return Err(OciError::Invalid(
                    "OCI layout: indexes nested too deep".into(),
                ))
            }
        };
        let config = layout_blob(dir, &m.config, MAX_MANIFEST_BYTES as u64)?;
        let mut layers = Vec::new();
        for l in &m.layers {
            l.validate()?;
            check_tar_layer(l)?;
            let path = layout_blob_path(dir, &l.digest);
            let got = sha256_file(&path)?;
            if got != l.digest {
                return Err(OciError::Digest {
                    what: path.display().to_string(),
                    got,
                    want: l.digest.clone(),
                });
            }
            layers.push(SourceLayer {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
                loc: LayerLoc::File(path),
            });
        }
        images.push(SourceImage {
            platform: d.platform.clone().or_else(|| config_platform(&config)),
            manifest: Some(m),
            manifest_digest: Some(d.digest.clone()),
            config,
            layers,
        });
    }
    Ok(Source { is_index, images })
}

/// A `docker save` tarball: `manifest.json` names the config and the layer files.
fn from_docker_archive(path: &Path, work: &Path) -> Result<Source, OciError> {
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
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        layers.push(SourceLayer {
            digest: String::new(),
            size,
            media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
            loc: LayerLoc::File(p),
        });
    }
    Ok(Source {
        is_index: false,
        images: vec![SourceImage {
            platform: config_platform(&config),
            manifest: None,
            manifest_digest: None,
            config,
            layers,
        }],
    })
}
