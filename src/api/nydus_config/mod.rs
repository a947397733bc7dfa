//! nydusd's JSON configuration, as nydus-snapshotter writes it (and hands it to Kata), read
//! into what it means for Skiff: a [`RafsSpec`].
//!
//! Both of nydusd's layouts are read: version 1 (`device.backend`, `device.cache`,
//! `digest_validate`, `mode`, `fs_prefetch`, `amplify_io`, ...) and version 2 (`"version": 2`,
//! `backend`, `cache`, `rafs`). Every key is in the table of [`keys`], which says whether Skiff
//! honours it, does what it asks anyway, or refuses it (and why); anything else is refused.
//! Nothing is silently ignored.
//!
//! [`parse`] touches no file and never panics, whatever the input: it is the fuzzing target for
//! this format.

pub mod keys;

use std::path::PathBuf;

use base64::Engine;
use serde_json::{Map, Value};

use crate::daemon::spec::{
    BackendSpec, BlobLocation, MirrorSpec, PrefetchSpec, RafsSpec, RegistrySpec, S3Spec, Scheme,
};
use crate::oci::auth::Credentials;

/// Largest configuration accepted (the snapshotter's is under 2 KiB).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// nydusd's default number of prefetch threads, and its limit.
const MAX_PREFETCH_THREADS: u64 = 1024;
/// nydusd's limit on merge and batch sizes (256 MiB).
const MAX_BATCH_SIZE: u64 = 0x1000_0000;
/// nydusd's default prefetch threads.
const DEFAULT_PREFETCH_THREADS: usize = 8;
/// nydusd's default health-check interval of proxies and mirrors, seconds.
const DEFAULT_CHECK_INTERVAL: u64 = 5;
/// nydusd's default failure limit of mirrors.
const DEFAULT_FAILURE_LIMIT: u32 = 5;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The string is not JSON.
    #[error("the nydusd config is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// A required key is missing, or a value has the wrong type or form.
    #[error("the nydusd config is invalid: {0}")]
    Invalid(String),
    /// A valid setting Skiff does not honour.
    #[error("the nydusd config key {key} is not supported: {reason}")]
    Unsupported {
        /// The key's path (`device.cache.type`).
        key: String,
        /// Why, and what to do instead.
        reason: String,
    },
}

/// A configuration read: what it asks for, and notes on keys whose effect is Skiff's own
/// behaviour anyway (to be logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NydusConfig {
    /// What the configuration asks for.
    pub spec: RafsSpec,
    /// One line per key accepted because Skiff already does what it asks.
    pub notes: Vec<String>,
}

impl NydusConfig {
    /// Logs the notes.
    pub fn log_notes(&self) {
        for n in &self.notes {
            tracing::info!("nydusd config: {n}");
        }
    }
}

/// Reads `config`: nydusd's JSON configuration, version 1 or 2.
pub fn parse(config: &str) -> Result<NydusConfig, ConfigError> {
    if config.trim().is_empty() {
        return Err(ConfigError::Invalid(
            "a rafs mount needs a config naming its backend".into(),
        ));
    }
    if config.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::Invalid(format!(
            "the config is larger than {MAX_CONFIG_BYTES} bytes"
        )));
    }
    let value: Value = serde_json::from_str(config).map_err(ConfigError::Json)?;
    let root = value
        .as_object()
        .ok_or_else(|| ConfigError::Invalid("expected a JSON object".into()))?;
    match root.get("version") {
        None | Some(Value::Null) => parse_v1(root),
        Some(v) if v.as_u64() == Some(1) => parse_v1(root),
        Some(v) if v.as_u64() == Some(2) => parse_v2(root),
        Some(v) => Err(ConfigError::Unsupported {
            key: "version".into(),
            reason: format!("config version {v}: Skiff reads versions 1 and 2"),
        }),
    }
}

// ------------------------------------------------------------------------------------------
// Typed access to values the walk has already type-checked.

fn missing(key: &str) -> ConfigError {
    ConfigError::Invalid(format!("{key} is missing"))
}

fn obj<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Map<String, Value>> {
    m.get(k).and_then(Value::as_object)
}

fn string<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// A string that is present and not empty.
fn nonempty<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    string(m, k).filter(|s| !s.is_empty())
}

fn flag(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k).and_then(Value::as_bool)
}

fn uint(m: &Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k).and_then(Value::as_u64)
}

fn strings(m: &Map<String, Value>, k: &str) -> Vec<String> {
    m.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn absolute(p: &str, key: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(ConfigError::Invalid(format!(
            "{key} {p:?} must be an absolute path"
        )));
    }
    if p.contains('\0') {
        return Err(ConfigError::Invalid(format!("{key} contains a NUL byte")));
    }
    Ok(path)
}

fn scheme_of(v: Option<&str>) -> Option<Scheme> {
    match v {
        Some("http") => Some(Scheme::Http),
        Some("https") => Some(Scheme::Https),
        _ => None,
    }
}

/// Seconds, where nydusd's 0 means "its default": Skiff's default then, never "no timeout".
fn seconds(m: &Map<String, Value>, k: &str) -> Option<u64> {
    uint(m, k).filter(|&s| s > 0)
}

// ------------------------------------------------------------------------------------------
// Version 1

fn parse_v1(root: &Map<String, Value>) -> Result<NydusConfig, ConfigError> {
    let mut notes = Vec::new();
    keys::walk(root, "", keys::V1_ROOT, &mut check_backend_v1, &mut notes)?;
    let device = obj(root, "device").ok_or_else(|| missing("device"))?;
    let backend = obj(device, "backend").ok_or_else(|| missing("device.backend"))?;
    let kind = nonempty(backend, "type").ok_or_else(|| missing("device.backend.type"))?;
    let empty = Map::new();
    let cfg = obj(backend, "config").unwrap_or(&empty);
    let backend = backend_spec(kind, cfg, "device.backend.config")?;

    let work_dir = match obj(device, "cache") {
        Some(cache) => cache_dir(
            string(cache, "type").unwrap_or(""),
            obj(cache, "config"),
            "device.cache",
            &backend,
            &mut notes,
        )?,
        None => None,
    };
    // nydusd v1: prefetch_all defaults to true, threads to 8.
    let prefetch = match obj(root, "fs_prefetch") {
        Some(p) => prefetch_spec(
            p,
            "fs_prefetch",
            PrefetchKeys {
                threads: &["threads_count"],
                merge: "merging_size",
                bandwidth: "bandwidth_rate",
                all_default: true,
            },
        )?,
        None => PrefetchSpec::default(),
    };
    let amplify_io = uint(root, "amplify_io");
    check_batch("amplify_io", amplify_io)?;
    finish(
        RafsSpec {
            id: nonempty(device, "id").map(str::to_owned),
            backend,
            work_dir,
            prefetch,
            amplify_io,
        },
        notes,
    )
}

/// v1 `device.backend`: `type` and `config`, the latter checked against the table of the type.
fn check_backend_v1(backend: &Map<String, Value>, at: &str) -> Result<(), ConfigError> {
    for name in backend.keys() {
        if name != "type" && name != "config" {
            return Err(ConfigError::Unsupported {
                key: keys::join(at, name),
                reason: "device.backend holds only type and config".into(),
            });
        }
    }
    let kind = match backend.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Null) | None => return Err(missing(&keys::join(at, "type"))),
        Some(_) => return Err(ConfigError::Invalid(format!("{at}.type must be a string"))),
    };
    let table = keys::backend_table(kind, at)?;
    match backend.get("config") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(cfg)) => keys::walk(
            cfg,
            &keys::join(at, "config"),
            table,
            &mut |_, at| Err(ConfigError::Invalid(format!("{at}: unexpected backend"))),
            &mut Vec::new(),
        ),
        Some(_) => Err(ConfigError::Invalid(format!(
            "{at}.config must be an object"
        ))),
    }
}

// ------------------------------------------------------------------------------------------
// Version 2

fn parse_v2(root: &Map<String, Value>) -> Result<NydusConfig, ConfigError> {
    let mut notes = Vec::new();
    keys::walk(root, "", keys::V2_ROOT, &mut check_backend_v2, &mut notes)?;
    let backend = obj(root, "backend").ok_or_else(|| missing("backend"))?;
    let kind = nonempty(backend, "type").ok_or_else(|| missing("backend.type"))?;
    let empty = Map::new();
    // Version 2 keeps each backend's settings under its own name: backend.localfs.dir.
    let cfg = obj(backend, kind).unwrap_or(&empty);
    let backend = backend_spec(kind, cfg, &format!("backend.{kind}"))?;

    let cache = obj(root, "cache");
    let work_dir = match cache {
        Some(c) => cache_dir(
            string(c, "type").unwrap_or(""),
            obj(c, "filecache"),
            "cache",
            &backend,
            &mut notes,
        )?,
        None => None,
    };
    let rafs = obj(root, "rafs");
    // nydusd v2: the cache's prefetch if enabled, else the filesystem's; prefetch_all defaults
    // to false there.
    let v2_keys = PrefetchKeys {
        threads: &["threads", "threads_count"],
        merge: "batch_size",
        bandwidth: "bandwidth_limit",
        all_default: false,
    };
    let cache_prefetch = cache.and_then(|c| obj(c, "prefetch"));
    let rafs_prefetch = rafs.and_then(|r| obj(r, "prefetch"));
    let prefetch = match (cache_prefetch, rafs_prefetch) {
        (Some(p), _) if flag(p, "enable") == Some(true) => {
            prefetch_spec(p, "cache.prefetch", v2_keys)?
        }
        (_, Some(p)) => prefetch_spec(p, "rafs.prefetch", v2_keys)?,
        _ => PrefetchSpec::default(),
    };
    let amplify_io = rafs.and_then(|r| uint(r, "batch_size"));
    check_batch("rafs.batch_size", amplify_io)?;
    finish(
        RafsSpec {
            id: nonempty(root, "id").map(str::to_owned),
            backend,
            work_dir,
            prefetch,
            amplify_io,
        },
        notes,
    )
}

/// v2 `backend`: `type` and the object named by it (others refused: they would be unused).
fn check_backend_v2(backend: &Map<String, Value>, at: &str) -> Result<(), ConfigError> {
    let kind = match backend.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Null) | None => return Err(missing(&keys::join(at, "type"))),
        Some(_) => return Err(ConfigError::Invalid(format!("{at}.type must be a string"))),
    };
    let table = keys::backend_table(kind, at)?;
    for (name, value) in backend {
        if name == "type" || value.is_null() {
            continue;
        }
        let path = keys::join(at, name);
        if name != kind {
            return Err(ConfigError::Unsupported {
                key: path,
                reason: format!(
                    "the backend type is {kind:?}: settings of another backend would be unused"
                ),
            });
        }
        let cfg = value
            .as_object()
            .ok_or_else(|| ConfigError::Invalid(format!("{path} must be an object")))?;
        keys::walk(
            cfg,
            &path,
            table,
            &mut |_, at| Err(ConfigError::Invalid(format!("{at}: unexpected backend"))),
            &mut Vec::new(),
        )?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Shared by both versions

fn finish(spec: RafsSpec, notes: Vec<String>) -> Result<NydusConfig, ConfigError> {
    if spec.prefetch.enable && spec.work_dir.is_none() && spec.backend.is_remote() {
        return Err(ConfigError::Unsupported {
            key: "fs_prefetch.enable".into(),
            reason: "prefetch fetches into the node's cache, and this config has none: set a \
                     blobcache with a work_dir, or turn prefetch off"
                .into(),
        });
    }
    Ok(NydusConfig { spec, notes })
}

fn check_batch(key: &str, v: Option<u64>) -> Result<(), ConfigError> {
    match v {
        Some(n) if n > MAX_BATCH_SIZE => Err(ConfigError::Invalid(format!(
            "{key} {n} is larger than {MAX_BATCH_SIZE}"
        ))),
        _ => Ok(()),
    }
}

fn backend_spec(
    kind: &str,
    cfg: &Map<String, Value>,
    at: &str,
) -> Result<BackendSpec, ConfigError> {
    match kind {
        "localfs" => localfs_spec(cfg, at).map(BackendSpec::Localfs),
        "registry" => registry_spec(cfg, at).map(BackendSpec::Registry),
        "s3" => s3_spec(cfg, at, false).map(BackendSpec::S3),
        "oss" => s3_spec(cfg, at, true).map(BackendSpec::S3),
        other => Err(keys::backend_table(other, at)
            .err()
            .unwrap_or_else(|| ConfigError::Invalid(format!("{at}: backend {other:?}")))),
    }
}

fn localfs_spec(cfg: &Map<String, Value>, at: &str) -> Result<BlobLocation, ConfigError> {
    let dir = nonempty(cfg, "dir");
    let file = nonempty(cfg, "blob_file");
    match (dir, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "{at}: give dir or blob_file, not both"
        ))),
        (Some(d), None) => Ok(BlobLocation::Dir(absolute(d, &format!("{at}.dir"))?)),
        (None, Some(f)) => Ok(BlobLocation::File(absolute(f, &format!("{at}.blob_file"))?)),
        (None, None) => Err(missing(&format!("{at}.dir"))),
    }
}

/// `host[:port]` or `scheme://host[:port][/]`, as nydusd's mirror and proxy settings take it.
fn host_of(v: &str, key: &str) -> Result<(Option<Scheme>, String), ConfigError> {
    let (scheme, rest) = match v.split_once("://") {
        Some(("http", r)) => (Some(Scheme::Http), r),
        Some(("https", r)) => (Some(Scheme::Https), r),
        Some((s, _)) => {
            return Err(ConfigError::Invalid(format!(
                "{key} {v:?}: scheme {s:?} is not http or https"
            )))
        }
        None => (None, v),
    };
    let host = rest.trim_end_matches('/');
    if !crate::oci::reference::valid_host(host) {
        return Err(ConfigError::Invalid(format!(
            "{key} {v:?} is not a host[:port] (a path is not supported)"
        )));
    }
    Ok((scheme, host.to_owned()))
}

fn registry_spec(cfg: &Map<String, Value>, at: &str) -> Result<RegistrySpec, ConfigError> {
    let k = |name: &str| keys::join(at, name);
    let host = nonempty(cfg, "host").ok_or_else(|| missing(&k("host")))?;
    if !crate::oci::reference::valid_host(host) {
        return Err(ConfigError::Invalid(format!(
            "{} {host:?} is not a host[:port]",
            k("host")
        )));
    }
    let repo = nonempty(cfg, "repo").ok_or_else(|| missing(&k("repo")))?;
    crate::oci::reference::check_repository(repo)
        .map_err(|why| ConfigError::Invalid(format!("{} {repo:?}: {why}", k("repo"))))?;
    let credentials = match nonempty(cfg, "auth") {
        Some(a) => Some(
            decode_auth(a).map_err(|why| ConfigError::Invalid(format!("{}: {why}", k("auth"))))?,
        ),
        None => None,
    };
    let registry_token = nonempty(cfg, "registry_token").map(str::to_owned);
    if let Some(t) = &registry_token {
        if t.len() > 64 << 10 || t.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(ConfigError::Invalid(format!(
                "{} is not a bearer token",
                k("registry_token")
            )));
        }
    }
    let mut ca_cert_files = Vec::new();
    for f in strings(cfg, "ca_cert_files") {
        ca_cert_files.push(absolute(&f, &k("ca_cert_files"))?);
    }
    let mut mirrors = Vec::new();
    let mut fallback_to_origin = true;
    if let Some(proxy) = obj(cfg, "proxy") {
        if let Some(url) = nonempty(proxy, "url") {
            let at = k("proxy");
            let (scheme, host) = host_of(url, &format!("{at}.url"))?;
            let scheme = if flag(proxy, "use_http") == Some(true) {
                Scheme::Http
            } else {
                scheme.unwrap_or(Scheme::Https)
            };
            mirrors.push(MirrorSpec {
                host,
                scheme,
                ping_url: nonempty(proxy, "ping_url").map(str::to_owned),
                check_interval_secs: uint(proxy, "check_interval")
                    .unwrap_or(DEFAULT_CHECK_INTERVAL),
                // nydusd leaves a proxy alone after its first failure, until it pings again.
                failure_limit: 1,
                headers: Vec::new(),
                auth_through: true,
            });
            // nydusd's default is to fall back to the registry.
            fallback_to_origin = flag(proxy, "fallback").unwrap_or(true);
        } else if nonempty(proxy, "ping_url").is_some() {
            return Err(ConfigError::Invalid(format!(
                "{}: ping_url without url",
                k("proxy")
            )));
        }
    }
    if let Some(list) = cfg.get("mirrors").and_then(Value::as_array) {
        for (i, m) in list.iter().enumerate() {
            let Some(m) = m.as_object() else { continue };
            let at = format!("{}[{i}]", k("mirrors"));
            let host = nonempty(m, "host").ok_or_else(|| missing(&format!("{at}.host")))?;
            let (scheme, host) = host_of(host, &format!("{at}.host"))?;
            let headers = obj(m, "headers")
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            for (name, value) in &headers {
                if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(value).is_err()
                {
                    return Err(ConfigError::Invalid(format!(
                        "{at}.headers: {name:?} is not a valid HTTP header"
                    )));
                }
            }
            let failure_limit = uint(m, "failure_limit").unwrap_or(DEFAULT_FAILURE_LIMIT as u64);
            mirrors.push(MirrorSpec {
                host,
                scheme: scheme.unwrap_or(Scheme::Https),
                ping_url: nonempty(m, "ping_url").map(str::to_owned),
                check_interval_secs: uint(m, "health_check_interval")
                    .unwrap_or(DEFAULT_CHECK_INTERVAL),
                failure_limit: u32::try_from(failure_limit.max(1)).unwrap_or(u32::MAX),
                headers,
                auth_through: flag(m, "auth_through").unwrap_or(false),
            });
        }
    }
    let blob_redirected_host = match nonempty(cfg, "blob_redirected_host") {
        Some(h) if crate::oci::reference::valid_host(h) => Some(h.to_owned()),
        Some(h) => {
            return Err(ConfigError::Invalid(format!(
                "{} {h:?} is not a host[:port]",
                k("blob_redirected_host")
            )))
        }
        None => None,
    };
    let retry_limit = uint(cfg, "retry_limit").map(|n| u32::try_from(n.min(255)).unwrap_or(255));
    Ok(RegistrySpec {
        scheme: scheme_of(nonempty(cfg, "scheme")),
        host: host.to_owned(),
        repo: repo.to_owned(),
        credentials,
        registry_token,
        skip_verify: flag(cfg, "skip_verify").unwrap_or(false),
        ca_cert_files,
        timeout_secs: seconds(cfg, "timeout"),
        connect_timeout_secs: seconds(cfg, "connect_timeout"),
        retry_limit,
        mirrors,
        fallback_to_origin,
        blob_redirected_host,
        blob_url_scheme: scheme_of(nonempty(cfg, "blob_url_scheme")),
    })
}

/// `auth`: base64 of `user:password`.
pub fn decode_auth(a: &str) -> Result<Credentials, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(a.trim())
        .map_err(|_| "not base64".to_string())?;
    let s = String::from_utf8(raw).map_err(|_| "not UTF-8 once decoded".to_string())?;
    Credentials::parse(&s).map_err(|_| "not base64 of user:password".to_string())
}

fn s3_spec(cfg: &Map<String, Value>, at: &str, oss: bool) -> Result<S3Spec, ConfigError> {
    let k = |name: &str| keys::join(at, name);
    let scheme = nonempty(cfg, "scheme").unwrap_or("https");
    let endpoint = match nonempty(cfg, "endpoint") {
        Some(e) => e,
        // nydusd's default for s3.
        None if !oss => "s3.amazonaws.com",
        None => return Err(missing(&k("endpoint"))),
    };
    let (_, host) = host_of(endpoint, &k("endpoint"))?;
    let bucket = nonempty(cfg, "bucket_name").ok_or_else(|| missing(&k("bucket_name")))?;
    let region = if oss {
        // OSS's S3-compatible API signs with the region id, the first label of its endpoint
        // (oss-cn-hangzhou.aliyuncs.com).
        match host.split('.').next() {
            Some(r) if r.starts_with("oss-") => r.to_owned(),
            _ => {
                return Err(ConfigError::Unsupported {
                    key: k("endpoint"),
                    reason: format!(
                        "Skiff reads OSS through its S3-compatible API, which signs with the \
                         region named by the endpoint (oss-<region>.aliyuncs.com); {host:?} \
                         names none: use the s3 backend with region"
                    ),
                })
            }
        }
    } else {
        nonempty(cfg, "region")
            .ok_or_else(|| missing(&k("region")))?
            .to_owned()
    };
    let retry_limit = uint(cfg, "retry_limit").map(|n| u32::try_from(n.min(255)).unwrap_or(255));
    Ok(S3Spec {
        endpoint: format!("{scheme}://{host}"),
        region,
        bucket: bucket.to_owned(),
        prefix: string(cfg, "object_prefix").unwrap_or("").to_owned(),
        // nydusd addresses S3 path-style, OSS virtual-host style.
        path_style: !oss,
        access_key_id: nonempty(cfg, "access_key_id").map(str::to_owned),
        secret_access_key: nonempty(cfg, "access_key_secret").map(str::to_owned),
        skip_verify: flag(cfg, "skip_verify").unwrap_or(false),
        timeout_secs: seconds(cfg, "timeout"),
        connect_timeout_secs: seconds(cfg, "connect_timeout"),
        retry_limit,
    })
}

/// The shared cache directory a cache section names, if Skiff is to use one.
fn cache_dir(
    kind: &str,
    cfg: Option<&Map<String, Value>>,
    at: &str,
    backend: &BackendSpec,
    notes: &mut Vec<String>,
) -> Result<Option<PathBuf>, ConfigError> {
    match kind {
        // nydusd's dummy cache: every read goes to the backend.
        "" | "dummy" | "dummycache" => Ok(None),
        "blobcache" | "filecache" => {
            if !backend.is_remote() {
                notes.push(format!(
                    "{at}.type {kind:?}: the blobs are local files; Skiff reads them in place \
                     rather than copying them into a cache"
                ));
                return Ok(None);
            }
            let work_dir = cfg.and_then(|c| nonempty(c, "work_dir")).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "{at}: a {kind} needs a work_dir (the node's cache directory)"
                ))
            })?;
            Ok(Some(absolute(work_dir, &format!("{at}.work_dir"))?))
        }
        "fscache" => Err(ConfigError::Unsupported {
            key: format!("{at}.type"),
            reason: "fscache is the kernel's EROFS-over-fscache mode, which a FUSE or virtio-fs \
                     daemon does not use: use blobcache"
                .into(),
        }),
        other => Err(ConfigError::Unsupported {
            key: format!("{at}.type"),
            reason: format!(
                "unknown cache type {other:?}: Skiff reads \"blobcache\", \"filecache\" and \
                 \"dummycache\""
            ),
        }),
    }
}

/// Where a prefetch section keeps its settings (the names differ between versions).
#[derive(Clone, Copy)]
struct PrefetchKeys {
    threads: &'static [&'static str],
    merge: &'static str,
    bandwidth: &'static str,
    all_default: bool,
}

fn prefetch_spec(
    p: &Map<String, Value>,
    at: &str,
    names: PrefetchKeys,
) -> Result<PrefetchSpec, ConfigError> {
    let enable = flag(p, "enable").unwrap_or(false);
    if !enable {
        return Ok(PrefetchSpec::default());
    }
    let threads = names.threads.iter().find_map(|k| uint(p, k));
    if let Some(t) = threads {
        if t == 0 || t > MAX_PREFETCH_THREADS {
            return Err(ConfigError::Invalid(format!(
                "{at}: {t} prefetch threads; nydusd takes 1 to {MAX_PREFETCH_THREADS}"
            )));
        }
    }
    let merging_size = uint(p, names.merge).filter(|&m| m > 0);
    check_batch(&keys::join(at, names.merge), merging_size)?;
    Ok(PrefetchSpec {
        enable,
        all: flag(p, "prefetch_all").unwrap_or(names.all_default),
        threads: Some(threads.map_or(DEFAULT_PREFETCH_THREADS, |t| t as usize)),
        merging_size,
        bandwidth: uint(p, names.bandwidth).filter(|&b| b > 0),
    })
}

#[cfg(test)]
mod tests;
