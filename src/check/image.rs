//! `skiff check --source REF|DIR|TAR --target REF`: a converted image in a registry against
//! its OCI source, by the rules `nydusify check` has, without Docker, a mount or root:
//!
//! - **manifest**: the target manifest is well formed (media types, annotations, a config whose
//!   `rootfs` names its layers); its config equals the source's apart from `rootfs` and
//!   `history`; for an index, every source platform has a converted manifest;
//! - **bootstrap**: the bootstrap layer loads and validates, and refers to exactly the blobs the
//!   manifest carries, with their sizes;
//! - **data** (unless `--no-data`): every blob is read once, whole, its sha256 and blake3 checked
//!   against its layer digest and blob id, and every chunk in it decompressed and verified;
//! - **filesystem**: the source layers are streamed (nothing stored), applied in memory with
//!   whiteouts and cut into chunks as the image cuts them; the tree is compared with the image
//!   on every field and every chunk digest (which the data rule ties to the blobs' bytes).
//!
//! A rule's findings are [`Problem`]s; what stops the check from running at all (a source that
//! cannot be read, a target that is not there) is an [`CheckError`].

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::{Problem, Rule};
use crate::build::layers::{self, DigestSink};
use crate::build::Progress;
use crate::format::{digest_hex, Bootstrap, ChunkRecord, DigestAlgo, SourceFormat, DIGEST_LEN};
use crate::oci::manifest::{
    self, Descriptor, Fetched, ImageManifest, Platform, ANN_BLOB_ID, ANN_NYDUS_BLOB,
    ANN_NYDUS_BOOTSTRAP, ANN_ROOT_DIGEST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_CONFIG,
    OCI_MANIFEST, SKIFF_BLOB, SKIFF_BOOTSTRAP, SKIFF_BOOTSTRAP_ZSTD,
};
use crate::oci::registry_backend::{
    decompress_bootstrap, extract_nydus_bootstrap, MAX_BOOTSTRAP_BYTES,
};
use crate::oci::source::{self, platform_name, Platforms, SourceImage};
use crate::oci::{OciError, Reference, RegistryClient, RegistryOptions};
use sha2::Digest;

/// Docker's image config media type (a Docker schema 2 manifest's config).
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Nydus's data-blob layer media type.
const NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// Nydus's annotation of the bootstrap layer's RAFS version.
const ANN_NYDUS_FS_VERSION: &str = "containerd.io/snapshot/nydus-fs-version";
/// Bytes read from a blob stream at a time.
const READ_PIECE: usize = 1 << 20;

/// Why a check could not run (exit code 2), as opposed to the problems it found.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The source image could not be opened.
    #[error("source {source_ref}")]
    Source {
        /// The source as given.
        source_ref: String,
        /// The cause.
        #[source]
        source: OciError,
    },
    /// The target image could not be fetched.
    #[error("target {target}")]
    Target {
        /// The target reference.
        target: String,
        /// The cause.
        #[source]
        source: OciError,
    },
    /// A source layer could not be read or applied.
    #[error("applying the source layers")]
    Layers(#[source] crate::build::BuildError),
    /// The target is in a format this check does not read.
    #[error("{0}")]
    Unsupported(String),
}

/// What to check.
#[derive(Clone, Debug)]
pub struct ImageCheckOptions {
    /// The source: an image reference, an OCI layout directory or a `docker save` tarball.
    pub source: String,
    /// Registry settings for a registry source.
    pub source_registry: RegistryOptions,
    /// The converted image.
    pub target: Reference,
    /// Registry settings for the target.
    pub target_registry: RegistryOptions,
    /// Run the data rule (every chunk fetched and verified).
    pub data: bool,
    /// Scratch directory (a `docker save` source's layers are copied out there).
    pub work_dir: PathBuf,
}

/// What one image (one platform) of the target is.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CheckedImage {
    /// Its platform, if known.
    pub platform: Option<String>,
    /// Its manifest's digest.
    pub manifest_digest: String,
    /// Its format (`skiff`).
    pub format: String,
    /// The bootstrap's root Merkle digest, when it loaded.
    pub root_digest: Option<String>,
    /// Inodes in the bootstrap.
    pub inodes: u64,
    /// Blobs the bootstrap refers to.
    pub blobs: u64,
    /// Distinct chunks verified by the data rule.
    pub chunks_verified: u64,
    /// Entries the filesystem rule compared (names, in the source).
    pub entries_compared: u64,
}

/// How each rule went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleStatus {
    /// Ran and found nothing.
    Passed,
    /// Ran and found problems.
    Failed,
    /// Not run (`--no-data`, or an earlier rule left nothing to run on).
    Skipped,
}

/// What a check found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageCheckReport {
    /// The source as given.
    pub source: String,
    /// The target reference.
    pub target: String,
    /// The target's manifest or index digest.
    pub target_digest: String,
    /// The images checked.
    pub images: Vec<CheckedImage>,
    /// Each rule's outcome.
    pub rules: BTreeMap<String, RuleStatus>,
    /// Every problem, sorted by rule and path.
    pub problems: Vec<Problem>,
    /// Bytes fetched from the source registry (manifests, configs, layers).
    pub source_bytes_fetched: u64,
    /// Bytes fetched from the target registry (manifests, configs, bootstraps, blobs).
    pub target_bytes_fetched: u64,
    /// Wall time.
    pub seconds: f64,
}

/// A problem of `rule` about `path`, under `prefix` (the platform, in an index).
fn p(rule: Rule, prefix: &str, path: &str, what: impl Into<String>) -> Problem {
    Problem::new(rule, format!("{prefix}{path}").as_bytes(), what)
}

/// Runs every rule on `opts.target` against `opts.source`.
pub fn check_image(opts: &ImageCheckOptions) -> Result<ImageCheckReport, CheckError> {
    let start = Instant::now();
    let target_err = |source| CheckError::Target {
        target: opts.target.to_string(),
        source,
    };
    let client =
        Arc::new(RegistryClient::new(&opts.target, &opts.target_registry).map_err(target_err)?);
    let (top, top_bytes, top_digest) = client
        .get_manifest_ref(opts.target.manifest_ref())
        .map_err(target_err)?;
    let mut fetched = Fetched64::default();
    fetched.target += top_bytes.len() as u64;
    let platforms = match top {
        Fetched::Index(_) => Platforms::All,
        Fetched::Manifest(_) => Platforms::Default,
    };
    std::fs::create_dir_all(&opts.work_dir).map_err(|e| CheckError::Source {
        source_ref: opts.source.clone(),
        source: OciError::io("creating", &opts.work_dir, e),
    })?;
    let src = source::open_source(
        &opts.source,
        &opts.source_registry,
        &opts.work_dir,
        platforms,
    )
    .map_err(|source| CheckError::Source {
        source_ref: opts.source.clone(),
        source,
    })?;
    fetched.source += src
        .images
        .iter()
        .map(|i| i.config.len() as u64)
        .sum::<u64>();
    let mut rules = RuleOutcomes::default();
    let mut problems = Vec::new();
    let mut images = Vec::new();
    match top {
        Fetched::Manifest(m) => {
            let image = src
                .images
                .first()
                .ok_or_else(|| CheckError::Unsupported("the source has no image".into()))?;
            images.push(check_pair(
                opts,
                &client,
                image,
                m,
                top_digest.clone(),
                "",
                &mut fetched,
                &mut rules,
                &mut problems,
            )?);
        }
        Fetched::Index(index) => {
            let mut unmatched: Vec<&Descriptor> = index.manifests.iter().collect();
            for image in &src.images {
                let name = platform_name(image.platform.as_ref());
                let pos = unmatched
                    .iter()
                    .position(|d| same_platform(d.platform.as_ref(), image.platform.as_ref()));
                let Some(d) = pos.map(|i| unmatched.remove(i)) else {
                    problems.push(p(
                        Rule::Manifest,
                        "",
                        "index",
                        format!("platform {name} of the source has no converted manifest"),
                    ));
                    rules.set(Rule::Manifest, RuleStatus::Failed);
                    continue;
                };
                let (m, bytes, digest) = match client.get_manifest_ref(&d.digest) {
                    Ok((Fetched::Manifest(m), b, dg)) => (m, b, dg),
                    Ok((Fetched::Index(_), _, _)) => {
                        problems.push(p(
                            Rule::Manifest,
                            "",
                            "index",
                            format!("the entry of {name} is an index, not a manifest"),
                        ));
                        continue;
                    }
                    Err(e) => {
                        problems.push(p(
                            Rule::Manifest,
                            "",
                            "index",
                            format!("the manifest of {name}: {}", crate::util::error_chain(&e)),
                        ));
                        continue;
                    }
                };
                fetched.target += bytes.len() as u64;
                let prefix = format!("{name}:");
                images.push(check_pair(
                    opts,
                    &client,
                    image,
                    m,
                    digest,
                    &prefix,
                    &mut fetched,
                    &mut rules,
                    &mut problems,
                )?);
            }
            for d in unmatched {
                problems.push(p(
                    Rule::Manifest,
                    "",
                    "index",
                    format!(
                        "platform {} is not in the source",
                        platform_name(d.platform.as_ref())
                    ),
                ));
            }
        }
    }
    for q in &problems {
        rules.set(q.rule, RuleStatus::Failed);
    }
    problems.sort();
    Ok(ImageCheckReport {
        source: opts.source.clone(),
        target: opts.target.to_string(),
        target_digest: top_digest,
        images,
        rules: rules.finish(),
        problems,
        source_bytes_fetched: fetched.source,
        target_bytes_fetched: fetched.target,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Bytes fetched so far, per side.
#[derive(Default)]
struct Fetched64 {
    source: u64,
    target: u64,
}

/// Each rule's status so far: a rule that ran for any image and found nothing has passed.
#[derive(Default)]
struct RuleOutcomes(BTreeMap<Rule, RuleStatus>);

impl RuleOutcomes {
    fn set(&mut self, rule: Rule, status: RuleStatus) {
        let slot = self.0.entry(rule).or_insert(status);
        if status == RuleStatus::Failed || *slot == RuleStatus::Skipped {
            *slot = status;
        }
    }

    /// Rules that never ran (`--no-data`, or nothing left to run on) are skipped.
    fn finish(mut self) -> BTreeMap<String, RuleStatus> {
        for r in [
            Rule::Manifest,
            Rule::Bootstrap,
            Rule::Data,
            Rule::Filesystem,
        ] {
            self.0.entry(r).or_insert(RuleStatus::Skipped);
        }
        self.0
            .into_iter()
            .map(|(r, s)| (r.name().to_string(), s))
            .collect()
    }
}

fn same_platform(a: Option<&Platform>, b: Option<&Platform>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a.os == b.os
                && a.architecture == b.architecture
                && a.variant.as_deref().unwrap_or("") == b.variant.as_deref().unwrap_or("")
        }
        (None, None) => true,
        _ => false,
    }
}

/// Checks one converted manifest `m` against one source image.
#[allow(clippy::too_many_arguments)]
fn check_pair(
    opts: &ImageCheckOptions,
    client: &Arc<RegistryClient>,
    src: &SourceImage,
    m: ImageManifest,
    manifest_digest: String,
    prefix: &str,
    fetched: &mut Fetched64,
    rules: &mut RuleOutcomes,
    problems: &mut Vec<Problem>,
) -> Result<CheckedImage, CheckError> {
    // Which format: Skiff's bootstrap layer, or Nydus's (a tar holding image/image.boot).
    let format = match m.layers.last() {
        Some(l)
            if l.media_type != SKIFF_BOOTSTRAP
                && l.media_type != SKIFF_BOOTSTRAP_ZSTD
                && l.annotations
                    .get(ANN_NYDUS_BOOTSTRAP)
                    .is_some_and(|v| v == "true") =>
        {
            // `skiff convert`'s node layout has Nydus's shape around a Skiff bootstrap.
            if l.annotations
                .get(crate::oci::manifest::ANN_BOOTSTRAP_FORMAT)
                .is_some_and(|v| v == "skiff-v1")
            {
                TargetFormat::SkiffNode
            } else {
                TargetFormat::Nydus
            }
        }
        _ => TargetFormat::Skiff,
    };
    let mut out = CheckedImage {
        platform: src.platform.as_ref().map(|p| platform_name(Some(p))),
        manifest_digest,
        format: format.name().into(),
        ..CheckedImage::default()
    };

    // The manifest rule.
    rules.set(Rule::Manifest, RuleStatus::Passed);
    let mp = |what: String| p(Rule::Manifest, prefix, "manifest", what);
    match m.media_type.as_deref() {
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => {}
        other => problems.push(mp(format!(
            "media type {other:?}, expected {OCI_MANIFEST:?}"
        ))),
    }
    if m.config.media_type != OCI_CONFIG && m.config.media_type != DOCKER_CONFIG {
        problems.push(mp(format!(
            "config media type {:?}, expected {OCI_CONFIG:?}",
            m.config.media_type
        )));
    }
    let boot_layer = match m.layers.split_last() {
        None => {
            problems.push(mp("no layers: no bootstrap".into()));
            None
        }
        Some((boot, blobs)) => {
            let ok = check_bootstrap_layer(format, boot, &mp, problems);
            for (i, l) in blobs.iter().enumerate() {
                check_blob_layer(format, i, l, &mp, problems);
            }
            ok.then_some(boot)
        }
    };
    let target_config =
        match client.get_blob_bytes(&m.config.digest, m.config.size, MAX_MANIFEST_BYTES as u64) {
            Ok(c) => {
                fetched.target += c.len() as u64;
                Some(c)
            }
            Err(e) => {
                problems.push(p(
                    Rule::Manifest,
                    prefix,
                    "config",
                    format!("cannot be fetched: {}", crate::util::error_chain(&e)),
                ));
                None
            }
        };
    let diff_ids = match &target_config {
        Some(c) => compare_configs(&src.config, c, prefix, problems),
        None => None,
    };
    if let Some(ids) = &diff_ids {
        if ids.len() != m.layers.len() {
            problems.push(p(
                Rule::Manifest,
                prefix,
                "config",
                format!(
                    "rootfs.diff_ids has {} entries, the manifest {} layers",
                    ids.len(),
                    m.layers.len()
                ),
            ));
        } else {
            for (i, (id, l)) in ids.iter().zip(&m.layers).enumerate() {
                if (l.media_type == SKIFF_BLOB || l.media_type == NYDUS_BLOB) && id != &l.digest {
                    problems.push(p(
                        Rule::Manifest,
                        prefix,
                        "config",
                        format!(
                            "rootfs.diff_ids[{i}] is {id}, layer {i} is {} (stored uncompressed)",
                            l.digest
                        ),
                    ));
                }
            }
        }
    }

    // The bootstrap rule.
    let Some(boot_layer) = boot_layer else {
        return Ok(out);
    };
    rules.set(Rule::Bootstrap, RuleStatus::Passed);
    let bp = |what: String| p(Rule::Bootstrap, prefix, "bootstrap", what);
    let raw = match client.get_blob_bytes(&boot_layer.digest, boot_layer.size, MAX_BOOTSTRAP_BYTES)
    {
        Ok(b) => b,
        Err(e) => {
            problems.push(bp(format!(
                "layer {} cannot be fetched: {}",
                boot_layer.digest,
                crate::util::error_chain(&e)
            )));
            return Ok(out);
        }
    };
    fetched.target += raw.len() as u64;
    // The diff id of a Nydus layer (its uncompressed tar's sha256), and the bootstrap.
    let (nydus_diff_id, bytes) = match format {
        TargetFormat::Skiff if boot_layer.media_type == SKIFF_BOOTSTRAP_ZSTD => {
            match decompress_bootstrap(&raw, MAX_BOOTSTRAP_BYTES) {
                Ok(b) => (None, b),
                Err(e) => {
                    problems.push(bp(crate::util::error_chain(&e)));
                    return Ok(out);
                }
            }
        }
        TargetFormat::Skiff => (None, raw),
        TargetFormat::Nydus | TargetFormat::SkiffNode => match nydus_bootstrap(&raw) {
            Ok((diff_id, boot)) => (Some(diff_id), boot),
            Err(e) => {
                problems.push(bp(format!("layer {}: {e}", boot_layer.digest)));
                return Ok(out);
            }
        },
    };
    if let Some(last_id) = diff_ids.as_ref().and_then(|ids| ids.last()) {
        let got = nydus_diff_id
            .clone()
            .unwrap_or_else(|| manifest::sha256_digest(&bytes));
        if &got != last_id {
            problems.push(p(
                Rule::Manifest,
                prefix,
                "config",
                format!("rootfs.diff_ids names the bootstrap layer {last_id}, it is {got}"),
            ));
        }
    }
    let b = match Bootstrap::from_bytes(bytes) {
        Ok(b) => b,
        Err(e) => {
            problems.push(bp(format!(
                "does not load: {}",
                crate::util::error_chain(&e)
            )));
            return Ok(out);
        }
    };
    let loaded = b.source_format();
    let expected = match format {
        TargetFormat::Skiff | TargetFormat::SkiffNode => SourceFormat::Skiff,
        TargetFormat::Nydus => SourceFormat::NydusRafsV6,
    };
    if loaded != expected {
        problems.push(bp(format!(
            "a {} bootstrap in a {} image's layer",
            loaded.name(),
            format.name()
        )));
    }
    if format == TargetFormat::SkiffNode && !b.node_compat() {
        problems.push(bp(
            "the bootstrap lacks the node compatibility header: nydus-snapshotter refuses it \
             (\"unknown file system header\")"
                .to_string(),
        ));
    }
    out.root_digest = Some(digest_hex(b.root_digest()));
    out.inodes = b.inode_count() as u64;
    out.blobs = b.blobs().len() as u64;
    if let Some(want) = boot_layer.annotations.get(ANN_ROOT_DIGEST) {
        let got = digest_hex(b.root_digest());
        if &got != want {
            problems.push(bp(format!(
                "root digest {got}, the layer's {ANN_ROOT_DIGEST} annotation says {want}"
            )));
        }
    }
    let layers = blob_layers(format, &b, &m, prefix, problems);

    // The data rule.
    if opts.data {
        rules.set(Rule::Data, RuleStatus::Passed);
        let (verified, bytes) = verify_blobs(client, &b, &layers, prefix, problems);
        out.chunks_verified = verified;
        fetched.target += bytes;
    }

    // The filesystem rule.
    rules.set(Rule::Filesystem, RuleStatus::Passed);
    let progress = Progress::new(false);
    // Cut and named as the image cuts and names its chunks.
    let digester = b
        .tables()
        .chunks
        .iter()
        .find(|c| !c.is_zero())
        .map_or(DigestAlgo::Blake3, |c| c.digest_algo());
    let mut sink = DigestSink::new(b.chunk_size(), digester);
    let tree = layers::apply_with(&src.layers, &mut sink, &progress, |_, _, _| Ok(()))
        .map_err(CheckError::Layers)?;
    fetched.source += src
        .layers
        .iter()
        .filter(|l| l.path().is_none())
        .map(|l| l.size)
        .sum::<u64>();
    out.entries_compared = progress.entries();
    for mut q in super::compare_tree(&b, &tree) {
        q.path = format!("{prefix}{}", q.path);
        problems.push(q);
    }
    Ok(out)
}

/// Checks the bootstrap layer's media type and annotations; whether it can be read as one.
fn check_bootstrap_layer(
    format: TargetFormat,
    l: &Descriptor,
    mp: &dyn Fn(String) -> Problem,
    problems: &mut Vec<Problem>,
) -> bool {
    if l.annotations.get(ANN_NYDUS_BOOTSTRAP).map(String::as_str) != Some("true") {
        problems.push(mp(format!(
            "the bootstrap layer {} lacks the {ANN_NYDUS_BOOTSTRAP}=true annotation",
            l.digest
        )));
    }
    match format {
        TargetFormat::Nydus | TargetFormat::SkiffNode => {
            if !crate::oci::source::is_tar_layer(&l.media_type) {
                problems.push(mp(format!(
                    "the Nydus bootstrap layer {} has media type {:?}, not a tar layer",
                    l.digest, l.media_type
                )));
                return false;
            }
            if let Some(v) = l.annotations.get(ANN_NYDUS_FS_VERSION) {
                if v != "6" {
                    problems.push(mp(format!(
                        "the bootstrap layer says {ANN_NYDUS_FS_VERSION}={v:?}; only RAFS v6 is read"
                    )));
                    return false;
                }
            }
            true
        }
        TargetFormat::Skiff => {
            if l.media_type != SKIFF_BOOTSTRAP && l.media_type != SKIFF_BOOTSTRAP_ZSTD {
                problems.push(mp(format!(
                    "the last layer {} has media type {:?}, not a Skiff bootstrap ({SKIFF_BOOTSTRAP_ZSTD:?})",
                    l.digest, l.media_type
                )));
                return false;
            }
            match l.annotations.get(ANN_ROOT_DIGEST) {
                Some(d) if is_hex_digest(d) => {}
                Some(d) => problems.push(mp(format!(
                    "the bootstrap layer's {ANN_ROOT_DIGEST} {d:?} is not 64 hex digits"
                ))),
                None => problems.push(mp(format!(
                    "the bootstrap layer {} lacks the {ANN_ROOT_DIGEST} annotation",
                    l.digest
                ))),
            }
            true
        }
    }
}

fn check_blob_layer(
    format: TargetFormat,
    i: usize,
    l: &Descriptor,
    mp: &dyn Fn(String) -> Problem,
    problems: &mut Vec<Problem>,
) {
    let want = match format {
        TargetFormat::Skiff => SKIFF_BLOB,
        TargetFormat::Nydus | TargetFormat::SkiffNode => NYDUS_BLOB,
    };
    if l.media_type != want {
        problems.push(mp(format!(
            "layer {i} ({}) has media type {:?}, expected {want:?}",
            l.digest, l.media_type
        )));
        return;
    }
    if l.annotations.get(ANN_NYDUS_BLOB).map(String::as_str) != Some("true") {
        problems.push(mp(format!(
            "layer {i} ({}) lacks the {ANN_NYDUS_BLOB}=true annotation",
            l.digest
        )));
    }
    if format != TargetFormat::Skiff {
        // A Nydus blob (and one of the node layout) is named by its sha256: the layer digest
        // is the blob id.
        return;
    }
    match l.annotations.get(ANN_BLOB_ID) {
        Some(id) if is_hex_digest(id) => {}
        Some(id) => problems.push(mp(format!(
            "layer {i} ({}): blob id {id:?} is not 64 lower-case hex digits",
            l.digest
        ))),
        None => problems.push(mp(format!(
            "layer {i} ({}) lacks the {ANN_BLOB_ID} annotation",
            l.digest
        ))),
    }
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 2 * DIGEST_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Compares the two configs apart from `rootfs` and `history` (each difference a problem) and
/// returns the target's `rootfs.diff_ids`.
fn compare_configs(
    source: &[u8],
    target: &[u8],
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> Option<Vec<String>> {
    let cp = |what: String| p(Rule::Manifest, prefix, "config", what);
    let parse =
        |b: &[u8], side: &str| -> Result<serde_json::Map<String, serde_json::Value>, String> {
            match serde_json::from_slice::<serde_json::Value>(b) {
                Ok(serde_json::Value::Object(o)) => Ok(o),
                Ok(_) => Err(format!("the {side} config is not a JSON object")),
                Err(e) => Err(format!("the {side} config is not JSON: {e}")),
            }
        };
    let (s, t) = match (parse(source, "source"), parse(target, "target")) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => {
            problems.push(cp(e));
            return None;
        }
    };
    let show = |v: Option<&serde_json::Value>| match v {
        None => "(none)".to_string(),
        Some(v) => v.to_string(),
    };
    let mut keys: Vec<&String> = s.keys().chain(t.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        if k == "rootfs" || k == "history" {
            continue;
        }
        let (a, b) = (s.get(k), t.get(k));
        if a == b {
            continue;
        }
        // The runtime config field by field, for messages that say which.
        if let (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) = (a, b) {
            let mut sub: Vec<&String> = a.keys().chain(b.keys()).collect();
            sub.sort();
            sub.dedup();
            for f in sub {
                if a.get(f) != b.get(f) {
                    problems.push(cp(format!(
                        "{k}.{f}: source {}, target {}",
                        show(a.get(f)),
                        show(b.get(f))
                    )));
                }
            }
        } else {
            problems.push(cp(format!("{k}: source {}, target {}", show(a), show(b))));
        }
    }
    let rootfs = t.get("rootfs");
    let ids = rootfs
        .and_then(|r| r.get("diff_ids"))
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        });
    if ids.is_none()
        || rootfs.and_then(|r| r.get("type")).and_then(|t| t.as_str()) != Some("layers")
    {
        problems.push(cp(
            "rootfs is not {\"type\": \"layers\", \"diff_ids\": [...]}".into(),
        ));
    }
    ids
}

/// A blob of the bootstrap and the layer holding it.
struct BlobLayer {
    index: usize,
    id: [u8; DIGEST_LEN],
    digest: String,
    size: u64,
}

/// Matches the bootstrap's blob table with the manifest's blob layers, both ways.
fn blob_layers(
    format: TargetFormat,
    b: &Bootstrap,
    m: &ImageManifest,
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> Vec<BlobLayer> {
    let mut by_id: HashMap<[u8; DIGEST_LEN], &Descriptor> = HashMap::new();
    let blob_type = match format {
        TargetFormat::Skiff => SKIFF_BLOB,
        TargetFormat::Nydus | TargetFormat::SkiffNode => NYDUS_BLOB,
    };
    for l in m.layers.iter().filter(|l| l.media_type == blob_type) {
        let hexid = match format {
            TargetFormat::Skiff => match l.annotations.get(ANN_BLOB_ID) {
                Some(h) => h.as_str(),
                None => continue,
            },
            TargetFormat::Nydus | TargetFormat::SkiffNode => {
                l.digest.strip_prefix("sha256:").unwrap_or_default()
            }
        };
        let mut id = [0u8; DIGEST_LEN];
        if hex::decode_to_slice(hexid, &mut id).is_err() {
            continue;
        }
        if by_id.insert(id, l).is_some() {
            problems.push(p(
                Rule::Bootstrap,
                prefix,
                &format!("blob {hexid}"),
                "carried by two layers",
            ));
        }
    }
    let mut out = Vec::new();
    let mut used = std::collections::HashSet::new();
    for (i, blob) in b.blobs().iter().enumerate() {
        let hexid = digest_hex(&blob.id);
        let bpath = format!("blob {hexid}");
        let Some(l) = by_id.get(&blob.id) else {
            problems.push(p(
                Rule::Bootstrap,
                prefix,
                &bpath,
                "the bootstrap refers to it; no layer of the manifest carries it",
            ));
            continue;
        };
        used.insert(blob.id);
        if l.size != blob.size.get() {
            problems.push(p(
                Rule::Bootstrap,
                prefix,
                &bpath,
                format!(
                    "layer {} is {} bytes, the bootstrap says {}",
                    l.digest,
                    l.size,
                    blob.size.get()
                ),
            ));
            continue;
        }
        out.push(BlobLayer {
            index: i,
            id: blob.id,
            digest: l.digest.clone(),
            size: l.size,
        });
    }
    for (id, l) in &by_id {
        if !used.contains(id) {
            problems.push(p(
                Rule::Bootstrap,
                prefix,
                &format!("blob {}", digest_hex(id)),
                format!(
                    "layer {} carries it, the bootstrap's blob table does not have it",
                    l.digest
                ),
            ));
        }
    }
    out
}

/// Where a chunk of a blob is used first: a path and the chunk's index in that file.
struct ChunkUse {
    record: ChunkRecord,
    path: usize,
    index: usize,
}

/// Reads each blob once, whole, checking its sha256 and blake3, and verifies every chunk in it
/// as it streams by. Returns the chunks verified and the bytes read.
fn verify_blobs(
    client: &RegistryClient,
    b: &Bootstrap,
    layers: &[BlobLayer],
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> (u64, u64) {
    let paths = b.paths();
    let t = b.tables();
    // Per blob, the distinct chunks by offset, with the first file using each.
    let mut per_blob: HashMap<u32, BTreeMap<(u64, u32), ChunkUse>> = HashMap::new();
    for (ino, rec) in t.inodes.iter().enumerate() {
        if rec.kind() != Some(crate::format::InodeKind::Regular) {
            continue;
        }
        for (ci, c) in b.file_chunks(ino as u32).iter().enumerate() {
            if c.is_zero() {
                continue;
            }
            per_blob
                .entry(c.blob_index.get())
                .or_default()
                .entry((c.compressed_offset.get(), c.compressed_size.get()))
                .or_insert(ChunkUse {
                    record: *c,
                    path: ino,
                    index: ci,
                });
        }
    }
    let mut verified = 0u64;
    let mut bytes = 0u64;
    for l in layers {
        let hexid = digest_hex(&l.id);
        let bpath = format!("blob {hexid}");
        let chunks = per_blob.remove(&(l.index as u32)).unwrap_or_default();
        let mut reader = match client.get_blob_reader(&l.digest, l.size) {
            Ok(r) => r,
            Err(e) => {
                problems.push(p(
                    Rule::Data,
                    prefix,
                    &bpath,
                    format!(
                        "layer {} cannot be read: {}",
                        l.digest,
                        crate::util::error_chain(&e)
                    ),
                ));
                continue;
            }
        };
        let algo = t
            .blobs
            .get(l.index)
            .map_or(crate::format::DigestAlgo::Blake3, |r| r.id_algo());
        let mut stream = BlobStream {
            reader: &mut reader,
            hasher: algo.hasher(),
            piece: vec![0u8; READ_PIECE],
            ended: false,
        };
        // The bytes from `buf_start` on that are still needed.
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_start = 0u64;
        let mut read_error = None;
        let keys: Vec<(u64, u32)> = chunks.keys().copied().collect();
        for (k, (off, len)) in keys.iter().enumerate() {
            let Some(u) = chunks.get(&(*off, *len)) else {
                continue;
            };
            let where_ = || {
                format!(
                    "{}{}",
                    prefix,
                    String::from_utf8_lossy(paths.get(u.path).map(Vec::as_slice).unwrap_or(b"?"))
                )
            };
            let end = off + u64::from(*len);
            if read_error.is_none() {
                if let Err(e) = stream.fill_to(end, &mut buf, buf_start) {
                    read_error = Some(e.to_string());
                }
            }
            if *off < buf_start || end > buf_start + buf.len() as u64 {
                problems.push(Problem::new(
                    Rule::Data,
                    where_().as_bytes(),
                    format!(
                        "chunk {} (blob {hexid}, offset {off}, {len} bytes) could not be read{}",
                        u.index,
                        read_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_else(|| ": beyond the blob's end".into())
                    ),
                ));
                continue;
            }
            let lo = (off - buf_start) as usize;
            let stored = &buf[lo..lo + *len as usize];
            match crate::storage::decode_chunk(stored, &u.record) {
                Ok(_) => verified += 1,
                Err(e) => problems.push(Problem::new(
                    Rule::Data,
                    where_().as_bytes(),
                    format!("chunk {} (blob {hexid}, offset {off}): {e}", u.index),
                )),
            }
            // Keep only what later chunks need.
            let next = keys.get(k + 1).map(|(o, _)| *o).unwrap_or(u64::MAX);
            let keep_from = next.min(buf_start + buf.len() as u64).max(buf_start);
            buf.drain(..(keep_from - buf_start) as usize);
            buf_start = keep_from;
        }
        // The rest of the blob, for its digests.
        if read_error.is_none() {
            if let Err(e) = stream.fill_to(u64::MAX, &mut Vec::new(), 0) {
                read_error = Some(e.to_string());
            }
        }
        let got = stream.hasher.finalize();
        bytes += reader.bytes_read();
        if let Some(e) = read_error {
            problems.push(p(Rule::Data, prefix, &bpath, e));
        } else if got != l.id {
            problems.push(p(
                Rule::Data,
                prefix,
                &bpath,
                format!(
                    "its bytes (layer {}) have {} {}, not the blob id",
                    l.digest,
                    algo.name(),
                    hex::encode(got)
                ),
            ));
        }
    }
    (verified, bytes)
}

/// A blob read front to back, hashed on the way.
struct BlobStream<'r> {
    reader: &'r mut crate::oci::registry::BlobReader,
    hasher: crate::format::Hasher,
    piece: Vec<u8>,
    ended: bool,
}

impl BlobStream<'_> {
    /// Reads until `buf`, which holds the bytes from `buf_start` on, reaches `end` (or the
    /// blob ends). With a throwaway `buf` and `end` at the maximum, reads to the end.
    fn fill_to(&mut self, end: u64, buf: &mut Vec<u8>, buf_start: u64) -> std::io::Result<()> {
        let discard = end == u64::MAX;
        while !self.ended && (discard || buf_start + (buf.len() as u64) < end) {
            let n = self.reader.read(&mut self.piece)?;
            if n == 0 {
                self.ended = true;
                break;
            }
            self.hasher.update(&self.piece[..n]);
            if !discard {
                buf.extend_from_slice(&self.piece[..n]);
            }
        }
        Ok(())
    }
}

/// The format of a target image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetFormat {
    /// `skiff convert`'s: a zstd bootstrap layer, Skiff blobs named by blake3.
    Skiff,
    /// nydusify's / nydus-snapshotter's: a tar layer holding `image/image.boot` (RAFS v6),
    /// Nydus blobs named by sha256.
    Nydus,
    /// `skiff convert`'s node layout: Nydus's shape, a Skiff bootstrap (with the node
    /// compatibility header) as `image/image.boot`, blobs named by sha256.
    SkiffNode,
}

impl TargetFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Skiff => "skiff",
            Self::Nydus => "nydus-rafs-v6",
            Self::SkiffNode => "skiff-node",
        }
    }
}

/// The sha256 of a Nydus bootstrap layer's tar (its diff id) and the bootstrap in it, read by
/// the reader `skiff mount --image` uses.
fn nydus_bootstrap(layer: &[u8]) -> Result<(String, Vec<u8>), String> {
    let gzip = layer.starts_with(&[0x1f, 0x8b]);
    let boot = extract_nydus_bootstrap(layer, gzip, MAX_BOOTSTRAP_BYTES)
        .map_err(|e| crate::util::error_chain(&e))?;
    let diff_id = if gzip {
        let mut h = sha2::Sha256::new();
        let mut d = flate2::read::MultiGzDecoder::new(layer);
        std::io::copy(&mut d, &mut Sha256Writer(&mut h)).map_err(|e| format!("gunzip: {e}"))?;
        format!("sha256:{}", hex::encode(h.finalize()))
    } else {
        manifest::sha256_digest(layer)
    };
    Ok((diff_id, boot))
}

/// Feeds what is written to a sha256.
struct Sha256Writer<'h>(&'h mut sha2::Sha256);

impl std::io::Write for Sha256Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
