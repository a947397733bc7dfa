//! What a RAFS mount asks for, once its configuration (nydusd's JSON, see
//! [`crate::api::nydus_config`]) has been read: where the blobs are, how to reach them, the
//! node's shared cache, prefetch. Plain values: [`super::rafs`] turns them into a running
//! storage stack.

use std::path::PathBuf;

use crate::oci::auth::Credentials;

/// Where the blobs of a RAFS image are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobLocation {
    /// A directory holding blobs named by their id (Skiff's `--blob-dir`).
    Dir(PathBuf),
    /// One blob file: the image must have exactly this one blob, named by its id.
    File(PathBuf),
}

/// Where blobs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    /// Local files.
    Localfs(BlobLocation),
    /// An OCI registry: blobs are fetched as `/v2/<repo>/blobs/sha256:<blob id>`.
    Registry(RegistrySpec),
    /// S3-compatible object storage (nydusd's `s3` and `oss`).
    S3(S3Spec),
}

impl BackendSpec {
    /// Whether each read is a network round trip (the disk cache and fetch-ahead are then on).
    pub fn is_remote(&self) -> bool {
        !matches!(self, BackendSpec::Localfs(_))
    }

    /// A short name for logs and the API.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::Localfs(_) => "localfs",
            BackendSpec::Registry(_) => "registry",
            BackendSpec::S3(_) => "s3",
        }
    }
}

/// `http` or `https`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

/// A pull mirror or proxy tried before the registry (nydusd's `proxy` and `mirrors`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorSpec {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP to it.
    pub scheme: Scheme,
    /// Checked with a GET (2xx = healthy) before the mirror is used again after failures.
    pub ping_url: Option<String>,
    /// Seconds a failed mirror is left alone before it is tried (or pinged) again.
    pub check_interval_secs: u64,
    /// Consecutive failures after which the mirror is left alone for `check_interval_secs`.
    pub failure_limit: u32,
    /// Extra headers sent to it.
    pub headers: Vec<(String, String)>,
    /// Whether the registry credentials (and tokens) are sent to it.
    pub auth_through: bool,
}

/// How to reach a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrySpec {
    /// The scheme, when the config names one (else: https, plain HTTP for loopback).
    pub scheme: Option<Scheme>,
    /// `host[:port]`.
    pub host: String,
    /// The repository (`library/nginx`).
    pub repo: String,
    /// Credentials (`auth`, base64 of `user:pass`).
    pub credentials: Option<Credentials>,
    /// A bearer token sent as is (`registry_token`).
    pub registry_token: Option<String>,
    /// Do not verify the registry's TLS certificate.
    pub skip_verify: bool,
    /// PEM files of extra CA certificates.
    pub ca_cert_files: Vec<PathBuf>,
    /// Timeout of one request, seconds (None: Skiff's default).
    pub timeout_secs: Option<u64>,
    /// Connect timeout, seconds (None: Skiff's default).
    pub connect_timeout_secs: Option<u64>,
    /// Retries after a failed request (None: Skiff's default).
    pub retry_limit: Option<u32>,
    /// Mirrors and proxies, tried first in this order.
    pub mirrors: Vec<MirrorSpec>,
    /// Whether the registry itself is tried when every mirror failed.
    pub fallback_to_origin: bool,
    /// The host blob redirects are sent to instead of the one the registry named.
    pub blob_redirected_host: Option<String>,
    /// The scheme used for redirected blob URLs.
    pub blob_url_scheme: Option<Scheme>,
}

/// S3-compatible object storage: objects `prefix + hex blob id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Spec {
    /// `scheme://host[:port]`.
    pub endpoint: String,
    /// Signing region.
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Object key prefix.
    pub prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`) rather than virtual-host style.
    pub path_style: bool,
    /// Access key id (else the environment's).
    pub access_key_id: Option<String>,
    /// Secret key (else the environment's).
    pub secret_access_key: Option<String>,
    /// Do not verify the endpoint's TLS certificate.
    pub skip_verify: bool,
    /// Timeout of one request, seconds.
    pub timeout_secs: Option<u64>,
    /// Connect timeout, seconds.
    pub connect_timeout_secs: Option<u64>,
    /// Retries after a failed request.
    pub retry_limit: Option<u32>,
}

/// Background prefetch into the shared cache (nydusd's `fs_prefetch`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PrefetchSpec {
    /// Prefetch at all: the image's prefetch table and the mount's `prefetch_files`.
    pub enable: bool,
    /// Then every chunk of the image.
    pub all: bool,
    /// Worker threads (None: one).
    pub threads: Option<usize>,
    /// Largest merged request, bytes (None: Skiff's default).
    pub merging_size: Option<u64>,
    /// Bytes per second (None: no cap).
    pub bandwidth: Option<u64>,
}

/// Everything one RAFS mount's configuration says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RafsSpec {
    /// `device.id` (v1) or `id` (v2): the snapshotter's `/<snapshot id>`; selects the mount for
    /// `PUT /api/v1/config?id=` and the metrics endpoints.
    pub id: Option<String>,
    /// Where blobs come from.
    pub backend: BackendSpec,
    /// The node's shared cache directory (`blobcache`/`filecache` `work_dir`); Skiff keeps its
    /// own layout in [`crate::daemon::SKIFF_CACHE_SUBDIR`] under it.
    pub work_dir: Option<PathBuf>,
    /// Prefetch.
    pub prefetch: PrefetchSpec,
    /// Smallest amount a cold read fetches from the backend, bytes (`amplify_io`); `Some(0)`
    /// turns amplification (Skiff's fetch-ahead) off.
    pub amplify_io: Option<u64>,
}
