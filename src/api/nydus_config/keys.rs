//! The table of every key of nydusd's configuration (versions 1 and 2, as nydusd 2.2 and
//! nydus-snapshotter write them) and what Skiff does with each, and the walk that checks a
//! configuration against it. Every key present is in the table or refused; every value has the
//! type the table says or is refused; a key Skiff cannot honour with the value given is refused
//! with the table's reason. So refusals read the same everywhere, and nothing is ignored.

use serde_json::{Map, Value};

use super::ConfigError;

/// The JSON type a key's value must have (`null` counts as absent).
#[derive(Clone, Copy)]
pub enum Ty {
    /// A string.
    Str,
    /// `true` or `false`.
    Bool,
    /// A non-negative integer.
    Uint,
    /// An array of strings.
    StrList,
    /// An array of non-negative integers.
    UintList,
    /// An object of string values.
    StrMap,
    /// An object whose keys are in this table.
    Object(&'static [Key]),
    /// An array of such objects.
    ObjectList(&'static [Key]),
    /// The backend object, whose sub-table depends on its `type` (handled by the caller).
    Backend,
}

/// What Skiff does with a key.
#[derive(Clone, Copy)]
pub enum Treatment {
    /// Read and honoured.
    Honoured,
    /// Any value is accepted: what the key asks for is what Skiff does anyway (the note says
    /// why; it is logged when the key is present).
    Equivalent(&'static str),
    /// Accepted only when the check holds; refused with the reason otherwise.
    Only(fn(&Value) -> bool, &'static str),
}

/// One key of a configuration object.
#[derive(Clone, Copy)]
pub struct Key {
    /// The key's name within its object.
    pub name: &'static str,
    /// The type its value must have.
    pub ty: Ty,
    /// What Skiff does with it.
    pub treatment: Treatment,
}

const fn key(name: &'static str, ty: Ty) -> Key {
    Key {
        name,
        ty,
        treatment: Treatment::Honoured,
    }
}

const fn same(name: &'static str, ty: Ty, note: &'static str) -> Key {
    Key {
        name,
        ty,
        treatment: Treatment::Equivalent(note),
    }
}

const fn only(name: &'static str, ty: Ty, check: fn(&Value) -> bool, why: &'static str) -> Key {
    Key {
        name,
        ty,
        treatment: Treatment::Only(check, why),
    }
}

fn is_false(v: &Value) -> bool {
    v.as_bool() == Some(false)
}

fn is_true(v: &Value) -> bool {
    v.as_bool() == Some(true)
}

fn is_zero(v: &Value) -> bool {
    v.as_u64() == Some(0)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn is_rafs_mode(v: &Value) -> bool {
    matches!(v.as_str(), Some("direct" | "cached"))
}

fn is_scheme(v: &Value) -> bool {
    matches!(v.as_str(), Some("" | "http" | "https"))
}

/// `proxy` of a registry, oss or s3 backend.
pub const PROXY: &[Key] = &[
    key("url", Ty::Str),
    key("ping_url", Ty::Str),
    key("fallback", Ty::Bool),
    key("check_interval", Ty::Uint),
    key("use_http", Ty::Bool),
];

/// One entry of `mirrors`.
pub const MIRROR: &[Key] = &[
    key("host", Ty::Str),
    key("ping_url", Ty::Str),
    key("headers", Ty::StrMap),
    key("auth_through", Ty::Bool),
    key("health_check_interval", Ty::Uint),
    key("failure_limit", Ty::Uint),
];

const READAHEAD_NOT_LOCAL: &str =
    "readahead is a setting of the localfs backend: remote backends read ahead by themselves";

/// The `registry` backend.
pub const REGISTRY: &[Key] = &[
    only(
        "scheme",
        Ty::Str,
        is_scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    key("host", Ty::Str),
    key("repo", Ty::Str),
    key("auth", Ty::Str),
    key("registry_token", Ty::Str),
    key("skip_verify", Ty::Bool),
    key("ca_cert_files", Ty::StrList),
    key("timeout", Ty::Uint),
    key("connect_timeout", Ty::Uint),
    key("retry_limit", Ty::Uint),
    key("proxy", Ty::Object(PROXY)),
    key("mirrors", Ty::ObjectList(MIRROR)),
    key("blob_redirected_host", Ty::Str),
    only(
        "blob_url_scheme",
        Ty::Str,
        is_scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    only("readahead", Ty::Bool, is_false, READAHEAD_NOT_LOCAL),
    only("readahead_sec", Ty::Uint, is_zero, READAHEAD_NOT_LOCAL),
];

/// The `localfs` backend.
pub const LOCALFS: &[Key] = &[
    key("dir", Ty::Str),
    key("blob_file", Ty::Str),
    only(
        "alt_dirs",
        Ty::StrList,
        is_empty,
        "Skiff reads the blobs of an image from one directory: put them all in dir",
    ),
    same(
        "readahead",
        Ty::Bool,
        "Skiff reads local blobs ahead in the background whatever the setting",
    ),
    same(
        "readahead_sec",
        Ty::Uint,
        "Skiff reads local blobs ahead in the background whatever the setting",
    ),
];

const S3_NO_PROXY: &str =
    "Skiff's S3 backend has no proxy or mirrors: name the endpoint to read from";

/// The `s3` backend.
pub const S3: &[Key] = &[
    only(
        "scheme",
        Ty::Str,
        is_scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    key("endpoint", Ty::Str),
    key("region", Ty::Str),
    key("bucket_name", Ty::Str),
    key("object_prefix", Ty::Str),
    key("access_key_id", Ty::Str),
    key("access_key_secret", Ty::Str),
    key("skip_verify", Ty::Bool),
    key("timeout", Ty::Uint),
    key("connect_timeout", Ty::Uint),
    key("retry_limit", Ty::Uint),
    only("proxy", Ty::Object(PROXY), proxy_unused, S3_NO_PROXY),
    only("mirrors", Ty::ObjectList(MIRROR), is_empty, S3_NO_PROXY),
    only("readahead", Ty::Bool, is_false, READAHEAD_NOT_LOCAL),
    only("readahead_sec", Ty::Uint, is_zero, READAHEAD_NOT_LOCAL),
];

/// The `oss` backend: Aliyun OSS through its S3-compatible API.
pub const OSS: &[Key] = &[
    only(
        "scheme",
        Ty::Str,
        is_scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    key("endpoint", Ty::Str),
    key("bucket_name", Ty::Str),
    key("object_prefix", Ty::Str),
    key("access_key_id", Ty::Str),
    key("access_key_secret", Ty::Str),
    key("skip_verify", Ty::Bool),
    key("timeout", Ty::Uint),
    key("connect_timeout", Ty::Uint),
    key("retry_limit", Ty::Uint),
    only("proxy", Ty::Object(PROXY), proxy_unused, S3_NO_PROXY),
    only("mirrors", Ty::ObjectList(MIRROR), is_empty, S3_NO_PROXY),
    only("readahead", Ty::Bool, is_false, READAHEAD_NOT_LOCAL),
    only("readahead_sec", Ty::Uint, is_zero, READAHEAD_NOT_LOCAL),
];

/// A proxy object that names no proxy (the snapshotter writes `"proxy":{"fallback":false}`
/// whatever the backend).
fn proxy_unused(v: &Value) -> bool {
    v.get("url")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
}

const CACHE_LAYOUT: &str = "Skiff keeps its own cache layout under work_dir: each verified chunk \
                            once, found by its digest, shared by every daemon of the node";
const NO_ENCRYPTION: &str = "Skiff does not encrypt its cache; turn cache encryption off";

/// v1 `device.cache.config` (blobcache, filecache).
pub const V1_CACHE_CONFIG: &[Key] = &[
    key("work_dir", Ty::Str),
    same("disable_indexed_map", Ty::Bool, CACHE_LAYOUT),
    only("enable_encryption", Ty::Bool, is_false, NO_ENCRYPTION),
    only(
        "enable_convergent_encryption",
        Ty::Bool,
        is_false,
        NO_ENCRYPTION,
    ),
    only("encryption_key", Ty::Str, is_empty, NO_ENCRYPTION),
];

/// v1 `device.cache`.
pub const V1_CACHE: &[Key] = &[
    key("type", Ty::Str),
    same("compressed", Ty::Bool, CACHE_LAYOUT),
    key("config", Ty::Object(V1_CACHE_CONFIG)),
];

/// v1 `device`.
pub const V1_DEVICE: &[Key] = &[
    key("id", Ty::Str),
    key("backend", Ty::Backend),
    key("cache", Ty::Object(V1_CACHE)),
];

/// v1 `fs_prefetch`.
pub const V1_PREFETCH: &[Key] = &[
    key("enable", Ty::Bool),
    key("prefetch_all", Ty::Bool),
    key("threads_count", Ty::Uint),
    key("merging_size", Ty::Uint),
    key("bandwidth_rate", Ty::Uint),
    only(
        "stream_prefetch",
        Ty::Bool,
        is_false,
        "stream prefetch (nydusd 2.3) is not implemented: Skiff prefetches by merged range requests",
    ),
];

const ALWAYS_VERIFIES: &str = "Skiff verifies every chunk against its digest before serving it, \
                               whatever the setting";
const NO_FILE_STATS: &str = "Skiff does not record per-file statistics or access patterns; \
                             its storage metrics are at /api/v1/metrics";
const ALWAYS_XATTRS: &str = "Skiff always serves the image's extended attributes";

/// The top level of a version 1 configuration.
pub const V1_ROOT: &[Key] = &[
    key("version", Ty::Uint),
    key("device", Ty::Object(V1_DEVICE)),
    only(
        "mode",
        Ty::Str,
        is_rafs_mode,
        "mode must be \"direct\" or \"cached\" (both serve the immutable image the same way)",
    ),
    same("digest_validate", Ty::Bool, ALWAYS_VERIFIES),
    only("iostats_files", Ty::Bool, is_false, NO_FILE_STATS),
    only("enable_xattr", Ty::Bool, is_true, ALWAYS_XATTRS),
    only("access_pattern", Ty::Bool, is_false, NO_FILE_STATS),
    only("latest_read_files", Ty::Bool, is_false, NO_FILE_STATS),
    key("amplify_io", Ty::Uint),
    key("fs_prefetch", Ty::Object(V1_PREFETCH)),
    only(
        "warmup",
        Ty::Uint,
        is_zero,
        "warmup (experimental in the snapshotter) is not implemented: use fs_prefetch",
    ),
    only(
        "id_mapping",
        Ty::UintList,
        is_empty,
        "id mapping (user namespaces) is not implemented: Skiff serves the image's owners as stored",
    ),
];

/// v2 `cache.filecache`.
pub const V2_FILECACHE: &[Key] = V1_CACHE_CONFIG;

/// v2 `cache.prefetch` and `rafs.prefetch`.
pub const V2_PREFETCH: &[Key] = &[
    key("enable", Ty::Bool),
    key("threads", Ty::Uint),
    key("threads_count", Ty::Uint),
    key("batch_size", Ty::Uint),
    key("bandwidth_limit", Ty::Uint),
    key("prefetch_all", Ty::Bool),
];

/// v2 `cache`.
pub const V2_CACHE: &[Key] = &[
    key("type", Ty::Str),
    same("compressed", Ty::Bool, CACHE_LAYOUT),
    same("validate", Ty::Bool, ALWAYS_VERIFIES),
    key("prefetch", Ty::Object(V2_PREFETCH)),
    key("filecache", Ty::Object(V2_FILECACHE)),
    only(
        "fscache",
        Ty::Object(&[]),
        is_empty,
        "fscache is the kernel's EROFS-over-fscache mode, which a FUSE or virtio-fs daemon does not use",
    ),
];

/// v2 `rafs`.
pub const V2_RAFS: &[Key] = &[
    only(
        "mode",
        Ty::Str,
        is_rafs_mode,
        "mode must be \"direct\" or \"cached\" (both serve the immutable image the same way)",
    ),
    key("batch_size", Ty::Uint),
    same("validate", Ty::Bool, ALWAYS_VERIFIES),
    only("enable_xattr", Ty::Bool, is_true, ALWAYS_XATTRS),
    only("iostats_files", Ty::Bool, is_false, NO_FILE_STATS),
    only("access_pattern", Ty::Bool, is_false, NO_FILE_STATS),
    only("latest_read_files", Ty::Bool, is_false, NO_FILE_STATS),
    key("prefetch", Ty::Object(V2_PREFETCH)),
];

/// The top level of a version 2 configuration.
pub const V2_ROOT: &[Key] = &[
    key("version", Ty::Uint),
    key("id", Ty::Str),
    key("backend", Ty::Backend),
    key("cache", Ty::Object(V2_CACHE)),
    key("rafs", Ty::Object(V2_RAFS)),
];

/// The backend types and the table of each one's settings.
pub const BACKENDS: &[(&str, &[Key])] = &[
    ("registry", REGISTRY),
    ("localfs", LOCALFS),
    ("s3", S3),
    ("oss", OSS),
];

/// Backend types nydusd knows that Skiff refuses, and why.
pub const REFUSED_BACKENDS: &[(&str, &str)] = &[
    (
        "localdisk",
        "a localdisk backend reads blobs from a block device partition table; Skiff reads \
         blob files (localfs), registries and S3",
    ),
    (
        "http-proxy",
        "an http-proxy backend fetches blobs through a custom HTTP proxy API; use the registry \
         backend with proxy.url, or localfs",
    ),
];

/// The table of backend type `kind`, or why it is refused.
pub fn backend_table(kind: &str, at: &str) -> Result<&'static [Key], ConfigError> {
    if let Some((_, t)) = BACKENDS.iter().find(|(k, _)| *k == kind) {
        return Ok(t);
    }
    if let Some((_, why)) = REFUSED_BACKENDS.iter().find(|(k, _)| *k == kind) {
        return Err(ConfigError::Unsupported {
            key: format!("{at}.type"),
            reason: format!("backend type {kind:?}: {why}"),
        });
    }
    Err(ConfigError::Unsupported {
        key: format!("{at}.type"),
        reason: format!(
            "unknown backend type {kind:?}: Skiff reads \"registry\", \"localfs\", \"s3\" and \"oss\""
        ),
    })
}

/// Checks a backend object found at the given path (its sub-table depends on its type).
pub type BackendCheck<'a> = dyn FnMut(&Map<String, Value>, &str) -> Result<(), ConfigError> + 'a;

/// Checks every key of `obj` (found at `at`) against `table`, recursively, and returns the
/// notes of the [`Treatment::Equivalent`] keys present. Backend objects are checked by
/// `backend`, which is given their location.
pub fn walk(
    obj: &Map<String, Value>,
    at: &str,
    table: &[Key],
    backend: &mut BackendCheck<'_>,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    for (name, value) in obj {
        let path = join(at, name);
        let Some(k) = table.iter().find(|k| k.name == name) else {
            return Err(ConfigError::Unsupported {
                key: path,
                reason: "not a key of nydusd's configuration that Skiff knows; refused rather \
                         than ignored (a misspelt key would otherwise change nothing)"
                    .into(),
            });
        };
        if value.is_null() {
            continue;
        }
        // An object refused as a whole is refused before its keys are looked at; a scalar's
        // type is checked before its value.
        let container = matches!(k.ty, Ty::Object(_) | Ty::ObjectList(_));
        if !container {
            check_type(value, &path, k.ty, backend, notes)?;
        }
        match k.treatment {
            Treatment::Honoured => {}
            Treatment::Equivalent(note) => notes.push(format!("{path}: {note}")),
            Treatment::Only(ok, why) => {
                if !ok(value) {
                    return Err(ConfigError::Unsupported {
                        key: path,
                        reason: format!("{value} refused: {why}"),
                    });
                }
            }
        }
        if container {
            check_type(value, &path, k.ty, backend, notes)?;
        }
    }
    Ok(())
}

fn check_type(
    value: &Value,
    path: &str,
    ty: Ty,
    backend: &mut BackendCheck<'_>,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let wrong = |want: &str| ConfigError::Invalid(format!("{path} must be {want}"));
    match ty {
        Ty::Str if value.is_string() => Ok(()),
        Ty::Str => Err(wrong("a string")),
        Ty::Bool if value.is_boolean() => Ok(()),
        Ty::Bool => Err(wrong("true or false")),
        Ty::Uint if value.is_u64() => Ok(()),
        Ty::Uint => Err(wrong("a non-negative integer")),
        Ty::StrList => match value.as_array() {
            Some(a) if a.iter().all(Value::is_string) => Ok(()),
            _ => Err(wrong("an array of strings")),
        },
        Ty::UintList => match value.as_array() {
            Some(a) if a.iter().all(Value::is_u64) => Ok(()),
            _ => Err(wrong("an array of non-negative integers")),
        },
        Ty::StrMap => match value.as_object() {
            Some(o) if o.values().all(Value::is_string) => Ok(()),
            _ => Err(wrong("an object of strings")),
        },
        Ty::Object(table) => match value.as_object() {
            Some(o) => walk(o, path, table, backend, notes),
            None => Err(wrong("an object")),
        },
        Ty::ObjectList(table) => match value.as_array() {
            Some(a) => {
                for (i, item) in a.iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    match item.as_object() {
                        Some(o) => walk(o, &at, table, backend, notes)?,
                        None => {
                            return Err(ConfigError::Invalid(format!("{at} must be an object")))
                        }
                    }
                }
                Ok(())
            }
            None => Err(wrong("an array of objects")),
        },
        Ty::Backend => match value.as_object() {
            Some(o) => backend(o, path),
            None => Err(wrong("an object")),
        },
    }
}

/// `at.name`, or `name` at the top.
pub fn join(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_owned()
    } else {
        format!("{at}.{name}")
    }
}

/// Every key path of the tables, for documentation checks: `device.backend.config.host` style
/// for version 1 (backend keys under `device.backend.config`), `backend.<type>.<key>` for 2.
pub fn all_key_names() -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut add = |t: &[Key]| {
        for k in t {
            if !out.contains(&k.name) {
                out.push(k.name);
            }
        }
    };
    for t in [
        V1_ROOT,
        V1_DEVICE,
        V1_CACHE,
        V1_CACHE_CONFIG,
        V1_PREFETCH,
        V2_ROOT,
        V2_CACHE,
        V2_RAFS,
        V2_PREFETCH,
        PROXY,
        MIRROR,
        REGISTRY,
        LOCALFS,
        S3,
        OSS,
    ] {
        add(t);
    }
    out
}
