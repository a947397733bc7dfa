//! Opening one RAFS mount of a daemon: its bootstrap, the backend its configuration names, and
//! the storage stack around it (the node's shared cache, retries, fetch-ahead, prefetch), as
//! `skiff mount` and `skiff serve` build it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::spec::{BackendSpec, BlobLocation, RafsSpec, RegistrySpec, S3Spec, Scheme};
use super::MountError;
use crate::format::{digest_hex, Bootstrap};
use crate::fs::{RafsFs, RafsFsOptions, FETCH_AHEAD_CHUNKS};
use crate::oci::registry::{self as reg, Mirror, RegistryOptions};
use crate::oci::{Reference, RegistryBackend, RegistryClient};
use crate::storage::config::{ByteSize, StorageConfig, StorageStack};
use crate::storage::{BlobBackend, LocalFsBackend, S3Backend, S3Config};

/// The directory Skiff keeps its own cache layout in, under a configuration's `work_dir` (the
/// node's cache, shared with nydusd-compatible tools): Skiff writes nothing outside it there,
/// and deletes nothing it did not write.
pub const SKIFF_CACHE_SUBDIR: &str = "skiff";

/// Largest fetch-ahead an `amplify_io` may ask for, in chunks.
const MAX_FETCH_AHEAD_CHUNKS: u64 = 256;

/// Default timeout of one registry request when the configuration gives none.
const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(60);

/// A RAFS image ready to be mounted: its filesystem and what keeps it running.
pub struct OpenedRafs {
    /// The filesystem.
    pub fs: RafsFs,
    /// Its storage (metrics, prefetch), finished at unmount.
    pub stack: StorageStack,
    /// The registry client, whose credentials `PUT /api/v1/config` renews.
    pub client: Option<Arc<RegistryClient>>,
    /// The image's Merkle root (hex).
    pub root_digest: String,
    /// The image's on-disk format, for the logs.
    pub format: &'static str,
    /// The blob directory of a localfs image.
    pub blob_dir: Option<PathBuf>,
    /// Skiff's cache directory, if any.
    pub cache_dir: Option<PathBuf>,
}

/// Loads `bootstrap` (through `share`: see [`crate::share`]) and sets up what `spec` asks
/// for; `prefetch_files` (image paths) are fetched first when prefetch is on. `fs_opts` are the
/// filesystem options of the caller (the transport decides, e.g., zero-message open).
pub fn open(
    bootstrap: &Path,
    spec: &RafsSpec,
    prefetch_files: &[String],
    fs_opts: RafsFsOptions,
    share: Option<&crate::share::BootstrapShare>,
) -> Result<OpenedRafs, MountError> {
    if !prefetch_files.is_empty() && !spec.prefetch.enable {
        return Err(MountError::Prefetch(
            "prefetch_files given, but the configuration turns prefetch off \
             (fs_prefetch.enable is false)"
                .into(),
        ));
    }
    if !bootstrap.is_absolute() {
        return Err(MountError::BootstrapMissing(bootstrap.to_owned()));
    }
    // Inside the sandbox only the reachable directories exist: say so, not "missing".
    let reachable =
        |p: &Path| crate::sandbox::check_reachable(p).map_err(MountError::OutsideSandbox);
    reachable(bootstrap)?;
    if let BackendSpec::Localfs(BlobLocation::Dir(p) | BlobLocation::File(p)) = &spec.backend {
        reachable(p)?;
    }
    if let Some(w) = &spec.work_dir {
        reachable(w)?;
    }
    if !bootstrap.exists() {
        return Err(MountError::BootstrapMissing(bootstrap.to_owned()));
    }
    let image =
        crate::share::load_file(bootstrap, share).map_err(|source| MountError::Bootstrap {
            path: bootstrap.to_owned(),
            source,
        })?;
    let root_digest = digest_hex(image.root_digest());
    let format = image.source_format().name();
    let backend_err = |what: String| MountError::Backend {
        bootstrap: bootstrap.to_owned(),
        what,
    };
    let mut client = None;
    let mut blob_dir = None;
    let (backend, remote): (Box<dyn BlobBackend>, bool) = match &spec.backend {
        BackendSpec::Localfs(loc) => {
            let dir = blob_dir_for(&image, bootstrap, loc)?;
            blob_dir = Some(dir.clone());
            (Box::new(LocalFsBackend::new(&dir)), false)
        }
        BackendSpec::Registry(r) => {
            let c = Arc::new(registry_client(r).map_err(backend_err)?);
            let b = RegistryBackend::for_bootstrap(c.clone(), &image)
                .map_err(|e| backend_err(crate::util::error_chain(&e)))?;
            client = Some(c);
            (Box::new(b), true)
        }
        BackendSpec::S3(s) => (
            Box::new(
                S3Backend::new(&s3_config(s))
                    .map_err(|e| backend_err(crate::util::error_chain(&e)))?,
            ),
            true,
        ),
    };
    let config = storage_config(spec, prefetch_files, remote);
    let cache_dir = config.cache_dir(remote);
    let stack = config
        .open_with_backend(&image, backend, remote)
        .map_err(|source| MountError::Storage {
            bootstrap: bootstrap.to_owned(),
            source,
        })?;
    let chunk = u64::from(image.chunk_size()).max(1);
    let fetch_ahead_chunks = match spec.amplify_io {
        Some(0) => 0,
        Some(n) => n
            .div_ceil(chunk)
            .clamp(FETCH_AHEAD_CHUNKS, MAX_FETCH_AHEAD_CHUNKS),
        None => fs_opts.fetch_ahead_chunks,
    };
    let fs_opts = RafsFsOptions {
        demand: remote.then(|| stack.metrics.clone()),
        reads: Some(stack.metrics.clone()),
        fetch_ahead_chunks,
        ..fs_opts
    };
    let fs = RafsFs::new(image, stack.source.clone(), fs_opts);
    Ok(OpenedRafs {
        fs,
        stack,
        client,
        root_digest,
        format,
        blob_dir,
        cache_dir,
    })
}

/// The storage configuration `spec` asks for.
fn storage_config(spec: &RafsSpec, prefetch_files: &[String], remote: bool) -> StorageConfig {
    let mut c = StorageConfig::default();
    match &spec.work_dir {
        Some(w) if remote => {
            c.cache.dir = Some(w.join(SKIFF_CACHE_SUBDIR));
            c.cache.enabled = Some(true);
        }
        // No cache named (nydusd's dummy cache), or local blobs read in place.
        _ => c.cache.enabled = Some(false),
    }
    let p = &spec.prefetch;
    c.prefetch.use_image_list = Some(p.enable);
    c.prefetch.all = p.enable && p.all;
    if p.enable {
        c.prefetch.paths = prefetch_files.to_vec();
    }
    c.prefetch.threads = p.threads;
    c.prefetch.merge = p.merging_size.map(ByteSize::Bytes);
    c.prefetch.bandwidth = p.bandwidth.map(ByteSize::Bytes);
    let retry_limit = match &spec.backend {
        BackendSpec::Registry(r) => r.retry_limit,
        BackendSpec::S3(s) => s.retry_limit,
        BackendSpec::Localfs(_) => None,
    };
    c.retry.attempts = retry_limit.map(|n| n.saturating_add(1));
    c
}

fn scheme(s: Scheme) -> reg::Scheme {
    match s {
        Scheme::Http => reg::Scheme::Http,
        Scheme::Https => reg::Scheme::Https,
    }
}

/// A registry client as `r` describes it (reading its CA certificate files).
pub fn registry_client(r: &RegistrySpec) -> Result<RegistryClient, String> {
    let reference = Reference::from_parts(&r.host, &r.repo).map_err(|e| e.to_string())?;
    let mut ca_certs = Vec::new();
    for f in &r.ca_cert_files {
        ca_certs.push(
            std::fs::read(f).map_err(|e| format!("reading CA certificate {}: {e}", f.display()))?,
        );
    }
    let opts = RegistryOptions {
        insecure: false,
        scheme: r.scheme.map(scheme),
        mirrors: r
            .mirrors
            .iter()
            .map(|m| Mirror {
                host: m.host.clone(),
                scheme: Some(scheme(m.scheme)),
                ping_url: m.ping_url.clone(),
                cooldown: Duration::from_secs(m.check_interval_secs),
                failure_limit: m.failure_limit,
                headers: m.headers.clone(),
                auth_through: m.auth_through,
            })
            .collect(),
        fallback_to_origin: r.fallback_to_origin,
        proxy: None,
        credentials: r.credentials.clone(),
        bearer_token: r.registry_token.clone(),
        timeout: Some(
            r.timeout_secs
                .map_or(DEFAULT_REGISTRY_TIMEOUT, Duration::from_secs),
        ),
        connect_timeout: r.connect_timeout_secs.map(Duration::from_secs),
        skip_verify: r.skip_verify,
        ca_certs,
        blob_redirected_host: r.blob_redirected_host.clone(),
        blob_url_scheme: r.blob_url_scheme.map(scheme),
    };
    if r.skip_verify {
        tracing::warn!(host = %r.host, "skip_verify: the registry's TLS certificate is not checked (chunks still are, by digest)");
    }
    RegistryClient::new(&reference, &opts).map_err(|e| crate::util::error_chain(&e))
}

fn s3_config(s: &S3Spec) -> S3Config {
    S3Config {
        endpoint: s.endpoint.clone(),
        region: s.region.clone(),
        bucket: s.bucket.clone(),
        prefix: s.prefix.clone(),
        path_style: s.path_style,
        access_key_id: s.access_key_id.clone(),
        secret_access_key: s.secret_access_key.clone(),
        session_token: None,
        timeout_secs: s.timeout_secs,
        connect_timeout_secs: s.connect_timeout_secs,
        skip_verify: s.skip_verify,
    }
}

/// The directory whose blobs `image` reads, after checking that every blob it names is there.
fn blob_dir_for(
    image: &Bootstrap,
    bootstrap: &Path,
    blobs: &BlobLocation,
) -> Result<PathBuf, MountError> {
    let dir = match blobs {
        BlobLocation::Dir(dir) => dir.clone(),
        BlobLocation::File(file) => {
            let mismatch = |reason: String| MountError::BlobFileMismatch {
                file: file.clone(),
                bootstrap: bootstrap.to_owned(),
                reason,
            };
            let [only] = image.blobs() else {
                return Err(mismatch(format!(
                    "the image has {} blobs; name a blob directory instead",
                    image.blobs().len()
                )));
            };
            let want = digest_hex(&only.id);
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != want {
                return Err(mismatch(format!(
                    "blobs are named by their id; expected a file named {want}"
                )));
            }
            file.parent().unwrap_or(Path::new("/")).to_owned()
        }
    };
    let backend = LocalFsBackend::new(&dir);
    for blob in image.blobs() {
        if !backend.blob_path(&blob.id).is_file() {
            return Err(MountError::BlobMissing {
                bootstrap: bootstrap.to_owned(),
                blob: digest_hex(&blob.id),
                dir,
            });
        }
    }
    Ok(dir)
}
