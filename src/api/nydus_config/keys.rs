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
    /// Read and honoured: what Skiff does with it.
    Honoured(&'static str),
    /// Any value is accepted: what the key asks for is what Skiff does anyway (the note says
    /// why; it is logged when the key is present).
    Equivalent(&'static str),
    /// Accepted only with the values allowed; refused with the reason otherwise.
    Only(Allowed, &'static str),
}

/// The values a [`Treatment::Only`] key is accepted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// `false`.
    False,
    /// `true`.
    True,
    /// `0`.
    Zero,
    /// An empty string, array or object.
    Empty,
    /// `"direct"` or `"cached"`.
    RafsMode,
    /// `""`, `"http"` or `"https"`.
    Scheme,
    /// A proxy object without a `url`.
    NoProxyUrl,
}

impl Allowed {
    /// Whether `v` is allowed.
    pub fn ok(self, v: &Value) -> bool {
        match self {
            Self::False => v.as_bool() == Some(false),
            Self::True => v.as_bool() == Some(true),
            Self::Zero => v.as_u64() == Some(0),
            Self::Empty => match v {
                Value::String(s) => s.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            },
            Self::RafsMode => matches!(v.as_str(), Some("direct" | "cached")),
            Self::Scheme => matches!(v.as_str(), Some("" | "http" | "https")),
            Self::NoProxyUrl => v
                .get("url")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty),
        }
    }

    /// The allowed values, for the documentation.
    pub fn describe(self) -> &'static str {
        match self {
            Self::False => "`false`",
            Self::True => "`true`",
            Self::Zero => "`0`",
            Self::Empty => "empty",
            Self::RafsMode => "`\"direct\"` or `\"cached\"`",
            Self::Scheme => "`\"http\"`, `\"https\"` or empty",
            Self::NoProxyUrl => "without `url`",
        }
    }
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

const fn key(name: &'static str, ty: Ty, does: &'static str) -> Key {
    Key {
        name,
        ty,
        treatment: Treatment::Honoured(does),
    }
}

const fn same(name: &'static str, ty: Ty, note: &'static str) -> Key {
    Key {
        name,
        ty,
        treatment: Treatment::Equivalent(note),
    }
}

const fn only(name: &'static str, ty: Ty, allowed: Allowed, why: &'static str) -> Key {
    Key {
        name,
        ty,
        treatment: Treatment::Only(allowed, why),
    }
}

/// `proxy` of a registry, oss or s3 backend.
pub const PROXY: &[Key] = &[
    key(
        "url",
        Ty::Str,
        "a proxy in front of the registry (Dragonfly's dfdaemon, say), tried before it; `http://` or `use_http` for plain HTTP",
    ),
    key(
        "ping_url",
        Ty::Str,
        "polled to bring a failed proxy back",
    ),
    key(
        "fallback",
        Ty::Bool,
        "after a proxy failure, read from the registry itself (default true)",
    ),
    key(
        "check_interval",
        Ty::Uint,
        "seconds between pings of a failed proxy (default 5)",
    ),
    key(
        "use_http",
        Ty::Bool,
        "reach the proxy over plain HTTP",
    ),
];

/// One entry of `mirrors`.
pub const MIRROR: &[Key] = &[
    key(
        "host",
        Ty::Str,
        "a mirror (`[scheme://]host[:port]`), tried in order before the registry",
    ),
    key("ping_url", Ty::Str, "polled to bring a failed mirror back"),
    key(
        "headers",
        Ty::StrMap,
        "sent with every request to the mirror",
    ),
    key(
        "auth_through",
        Ty::Bool,
        "send the registry credentials to the mirror too (default false)",
    ),
    key(
        "health_check_interval",
        Ty::Uint,
        "seconds between pings of a failed mirror (default 5)",
    ),
    key(
        "failure_limit",
        Ty::Uint,
        "failures after which the mirror is skipped until a ping answers (default 5)",
    ),
];

const READAHEAD_NOT_LOCAL: &str =
    "readahead is a setting of the localfs backend: remote backends read ahead by themselves";

/// The `registry` backend.
pub const REGISTRY: &[Key] = &[
    only(
        "scheme",
        Ty::Str,
        Allowed::Scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    key(
        "host",
        Ty::Str,
        "the registry, `host[:port]`; https, except plain http to a loopback address when `scheme` is absent",
    ),
    key(
        "repo",
        Ty::Str,
        "the repository: a blob is `GET /v2/<repo>/blobs/sha256:<blob id>`, in ranges",
    ),
    key(
        "auth",
        Ty::Str,
        "base64 of `user:password`: basic auth, or the bearer-token exchange; renewed by `PUT /api/v1/config`",
    ),
    key(
        "registry_token",
        Ty::Str,
        "a bearer token, sent as is",
    ),
    key(
        "skip_verify",
        Ty::Bool,
        "TLS without verifying the registry's certificate",
    ),
    key(
        "ca_cert_files",
        Ty::StrList,
        "more CA certificates (PEM files, absolute paths)",
    ),
    key(
        "timeout",
        Ty::Uint,
        "seconds one request may take (0: Skiff's default, 60)",
    ),
    key(
        "connect_timeout",
        Ty::Uint,
        "seconds to connect (0: as `timeout`)",
    ),
    key(
        "retry_limit",
        Ty::Uint,
        "retries of a failed fetch: `retry_limit + 1` attempts in all",
    ),
    key(
        "proxy",
        Ty::Object(PROXY),
        "see `proxy.*`",
    ),
    key(
        "mirrors",
        Ty::ObjectList(MIRROR),
        "see `mirrors[].*`",
    ),
    key(
        "blob_redirected_host",
        Ty::Str,
        "the host a blob redirect (to storage) is sent to instead",
    ),
    only(
        "blob_url_scheme",
        Ty::Str,
        Allowed::Scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    only("readahead", Ty::Bool, Allowed::False, READAHEAD_NOT_LOCAL),
    only("readahead_sec", Ty::Uint, Allowed::Zero, READAHEAD_NOT_LOCAL),
];

/// The `localfs` backend.
pub const LOCALFS: &[Key] = &[
    key(
        "dir",
        Ty::Str,
        "the directory of the image's blobs, each file named by its blob id",
    ),
    key(
        "blob_file",
        Ty::Str,
        "one blob file: the image must have exactly that one blob",
    ),
    only(
        "alt_dirs",
        Ty::StrList,
        Allowed::Empty,
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
        Allowed::Scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    key(
        "endpoint",
        Ty::Str,
        "`host[:port]` of the S3 service (default `s3.amazonaws.com`), path-style requests",
    ),
    key("region", Ty::Str, "the region requests are signed for"),
    key("bucket_name", Ty::Str, "the bucket"),
    key(
        "object_prefix",
        Ty::Str,
        "prefix of the object keys: a blob is `<object_prefix><blob id>`",
    ),
    key(
        "access_key_id",
        Ty::Str,
        "the access key (none: anonymous requests)",
    ),
    key("access_key_secret", Ty::Str, "its secret"),
    key(
        "skip_verify",
        Ty::Bool,
        "TLS without verifying the certificate",
    ),
    key(
        "timeout",
        Ty::Uint,
        "seconds one request may take (0: Skiff's default, 30)",
    ),
    key(
        "connect_timeout",
        Ty::Uint,
        "seconds to connect (0: Skiff's default, 5)",
    ),
    key(
        "retry_limit",
        Ty::Uint,
        "retries of a failed fetch: `retry_limit + 1` attempts in all",
    ),
    only("proxy", Ty::Object(PROXY), Allowed::NoProxyUrl, S3_NO_PROXY),
    only(
        "mirrors",
        Ty::ObjectList(MIRROR),
        Allowed::Empty,
        S3_NO_PROXY,
    ),
    only("readahead", Ty::Bool, Allowed::False, READAHEAD_NOT_LOCAL),
    only(
        "readahead_sec",
        Ty::Uint,
        Allowed::Zero,
        READAHEAD_NOT_LOCAL,
    ),
];

/// The `oss` backend: Aliyun OSS through its S3-compatible API.
pub const OSS: &[Key] = &[
    only(
        "scheme",
        Ty::Str,
        Allowed::Scheme,
        "the scheme must be \"http\" or \"https\"",
    ),
    key(
        "endpoint",
        Ty::Str,
        "`oss-<region>.aliyuncs.com`: Skiff reads OSS through its S3-compatible API, virtual-host style, signed for the region the endpoint names",
    ),
    key(
        "bucket_name",
        Ty::Str,
        "the bucket",
    ),
    key(
        "object_prefix",
        Ty::Str,
        "prefix of the object keys: a blob is `<object_prefix><blob id>`",
    ),
    key(
        "access_key_id",
        Ty::Str,
        "the access key (none: anonymous requests)",
    ),
    key(
        "access_key_secret",
        Ty::Str,
        "its secret",
    ),
    key(
        "skip_verify",
        Ty::Bool,
        "TLS without verifying the certificate",
    ),
    key(
        "timeout",
        Ty::Uint,
        "seconds one request may take (0: Skiff's default, 30)",
    ),
    key(
        "connect_timeout",
        Ty::Uint,
        "seconds to connect (0: Skiff's default, 5)",
    ),
    key(
        "retry_limit",
        Ty::Uint,
        "retries of a failed fetch: `retry_limit + 1` attempts in all",
    ),
    only("proxy", Ty::Object(PROXY), Allowed::NoProxyUrl, S3_NO_PROXY),
    only("mirrors", Ty::ObjectList(MIRROR), Allowed::Empty, S3_NO_PROXY),
    only("readahead", Ty::Bool, Allowed::False, READAHEAD_NOT_LOCAL),
    only("readahead_sec", Ty::Uint, Allowed::Zero, READAHEAD_NOT_LOCAL),
];

const CACHE_LAYOUT: &str = "Skiff keeps its own cache layout under work_dir: each verified chunk \
                            once, found by its digest, shared by every daemon of the node";
const NO_ENCRYPTION: &str = "Skiff does not encrypt its cache; turn cache encryption off";

/// v1 `device.cache.config` (blobcache, filecache).
pub const V1_CACHE_CONFIG: &[Key] = &[
    key(
        "work_dir",
        Ty::Str,
        "the node's shared cache (remote backends): Skiff keeps its files under `<work_dir>/skiff` and never touches any other file there",
    ),
    same("disable_indexed_map", Ty::Bool, CACHE_LAYOUT),
    only("enable_encryption", Ty::Bool, Allowed::False, NO_ENCRYPTION),
    only(
        "enable_convergent_encryption",
        Ty::Bool,
        Allowed::False,
        NO_ENCRYPTION,
    ),
    only("encryption_key", Ty::Str, Allowed::Empty, NO_ENCRYPTION),
];

/// v1 `device.cache`.
pub const V1_CACHE: &[Key] = &[
    key(
        "type",
        Ty::Str,
        "`blobcache` or `filecache`: verified chunks cached in `work_dir` (remote backends; local blobs are read in place); `dummycache` or empty: no cache; `fscache` refused",
    ),
    same("compressed", Ty::Bool, CACHE_LAYOUT),
    key(
        "config",
        Ty::Object(V1_CACHE_CONFIG),
        "see `config.*`",
    ),
];

/// v1 `device`.
pub const V1_DEVICE: &[Key] = &[
    key(
        "id",
        Ty::Str,
        "the mount's id, for `PUT /api/v1/config?id=` and the metrics (the snapshotter writes `/<snapshot id>`)",
    ),
    key(
        "backend",
        Ty::Backend,
        "`type` (`registry`, `localfs`, `s3`, `oss`) and `config`: see the backends below",
    ),
    key(
        "cache",
        Ty::Object(V1_CACHE),
        "see `device.cache.*`",
    ),
];

/// v1 `fs_prefetch`.
pub const V1_PREFETCH: &[Key] = &[
    key(
        "enable",
        Ty::Bool,
        "after the mount, fetch into the cache: the image's prefetch list, the mount's `prefetch_files`, then with `prefetch_all` every other chunk",
    ),
    key(
        "prefetch_all",
        Ty::Bool,
        "prefetch every chunk of the image (default true in version 1)",
    ),
    key(
        "threads_count",
        Ty::Uint,
        "prefetch threads, 1 to 1024 (default 8)",
    ),
    key(
        "merging_size",
        Ty::Uint,
        "adjacent chunks are fetched in one range request of up to this many bytes",
    ),
    key(
        "bandwidth_rate",
        Ty::Uint,
        "bytes per second prefetch may fetch (0: no limit)",
    ),
    only(
        "stream_prefetch",
        Ty::Bool,
        Allowed::False,
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
    key(
        "version",
        Ty::Uint,
        "1 (or absent), or 2 for the version 2 layout",
    ),
    key(
        "device",
        Ty::Object(V1_DEVICE),
        "see `device.*`",
    ),
    only(
        "mode",
        Ty::Str,
        Allowed::RafsMode,
        "mode must be \"direct\" or \"cached\" (both serve the immutable image the same way)",
    ),
    same("digest_validate", Ty::Bool, ALWAYS_VERIFIES),
    only("iostats_files", Ty::Bool, Allowed::False, NO_FILE_STATS),
    only("enable_xattr", Ty::Bool, Allowed::True, ALWAYS_XATTRS),
    only("access_pattern", Ty::Bool, Allowed::False, NO_FILE_STATS),
    only("latest_read_files", Ty::Bool, Allowed::False, NO_FILE_STATS),
    key(
        "amplify_io",
        Ty::Uint,
        "a cold read also fetches the following chunks of the file, up to this many bytes, in the same request",
    ),
    key(
        "fs_prefetch",
        Ty::Object(V1_PREFETCH),
        "see `fs_prefetch.*`",
    ),
    only(
        "warmup",
        Ty::Uint,
        Allowed::Zero,
        "warmup (experimental in the snapshotter) is not implemented: use fs_prefetch",
    ),
    only(
        "id_mapping",
        Ty::UintList,
        Allowed::Empty,
        "id mapping (user namespaces) is not implemented: Skiff serves the image's owners as stored",
    ),
];

/// v2 `cache.filecache`.
pub const V2_FILECACHE: &[Key] = V1_CACHE_CONFIG;

/// v2 `cache.prefetch` and `rafs.prefetch`.
pub const V2_PREFETCH: &[Key] = &[
    key(
        "enable",
        Ty::Bool,
        "as version 1's `fs_prefetch.enable` (the cache's section when enabled, else the filesystem's)",
    ),
    key(
        "threads",
        Ty::Uint,
        "prefetch threads, 1 to 1024 (default 8)",
    ),
    key(
        "threads_count",
        Ty::Uint,
        "the same, under its older name",
    ),
    key(
        "batch_size",
        Ty::Uint,
        "adjacent chunks are fetched in one range request of up to this many bytes",
    ),
    key(
        "bandwidth_limit",
        Ty::Uint,
        "bytes per second prefetch may fetch (0: no limit)",
    ),
    key(
        "prefetch_all",
        Ty::Bool,
        "prefetch every chunk of the image (default false in version 2)",
    ),
];

/// v2 `cache`.
pub const V2_CACHE: &[Key] = &[
    key(
        "type",
        Ty::Str,
        "as version 1's `device.cache.type`",
    ),
    same("compressed", Ty::Bool, CACHE_LAYOUT),
    same("validate", Ty::Bool, ALWAYS_VERIFIES),
    key(
        "prefetch",
        Ty::Object(V2_PREFETCH),
        "see `cache.prefetch.*`",
    ),
    key(
        "filecache",
        Ty::Object(V2_FILECACHE),
        "`work_dir` and the rest as version 1's `device.cache.config.*`",
    ),
    only(
        "fscache",
        Ty::Object(&[]),
        Allowed::Empty,
        "fscache is the kernel's EROFS-over-fscache mode, which a FUSE or virtio-fs daemon does not use",
    ),
];

/// v2 `rafs`.
pub const V2_RAFS: &[Key] = &[
    only(
        "mode",
        Ty::Str,
        Allowed::RafsMode,
        "mode must be \"direct\" or \"cached\" (both serve the immutable image the same way)",
    ),
    key("batch_size", Ty::Uint, "as version 1's `amplify_io`"),
    same("validate", Ty::Bool, ALWAYS_VERIFIES),
    only("enable_xattr", Ty::Bool, Allowed::True, ALWAYS_XATTRS),
    only("iostats_files", Ty::Bool, Allowed::False, NO_FILE_STATS),
    only("access_pattern", Ty::Bool, Allowed::False, NO_FILE_STATS),
    only("latest_read_files", Ty::Bool, Allowed::False, NO_FILE_STATS),
    key("prefetch", Ty::Object(V2_PREFETCH), "see `rafs.prefetch.*`"),
];

/// The top level of a version 2 configuration.
pub const V2_ROOT: &[Key] = &[
    key("version", Ty::Uint, "2"),
    key("id", Ty::Str, "as version 1's `device.id`"),
    key(
        "backend",
        Ty::Backend,
        "`type` and the object named by it (`backend.registry.*`, ...): see the backends below",
    ),
    key("cache", Ty::Object(V2_CACHE), "see `cache.*`"),
    key("rafs", Ty::Object(V2_RAFS), "see `rafs.*`"),
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
            Treatment::Honoured(_) => {}
            Treatment::Equivalent(note) => notes.push(format!("{path}: {note}")),
            Treatment::Only(allowed, why) => {
                if !allowed.ok(value) {
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

/// The tables as Markdown, for docs/kata.md (a test keeps the two the same): one row per key
/// path, its type and what Skiff does with it.
pub fn markdown() -> String {
    let mut out = String::new();
    let mut section = |title: &str, tables: &[(&str, &[Key])]| {
        out.push_str(&format!(
            "\n{title}\n\n| key | type | Skiff |\n|---|---|---|\n"
        ));
        for (at, table) in tables {
            rows(&mut out, at, table);
        }
    };
    section(
        "Version 1 (no `version`, or `\"version\": 1`):",
        &[("", V1_ROOT)],
    );
    section("Version 2 (`\"version\": 2`):", &[("", V2_ROOT)]);
    for (kind, table) in BACKENDS {
        section(
            &format!(
                "Backend `{kind}`: version 1 `device.backend.config.<key>` with \
                 `device.backend.type = \"{kind}\"`, version 2 `backend.{kind}.<key>`:"
            ),
            &[("", table)],
        );
    }
    out.push_str("\nBackend types refused:\n\n| type | why |\n|---|---|\n");
    for (kind, why) in REFUSED_BACKENDS {
        out.push_str(&format!("| `{kind}` | {why} |\n"));
    }
    out
}

fn rows(out: &mut String, at: &str, table: &[Key]) {
    for k in table {
        let path = join(at, k.name);
        let expand = match (k.ty, k.treatment) {
            (Ty::Object(t), Treatment::Honoured(_)) => Some((path.clone(), t)),
            (Ty::ObjectList(t), Treatment::Honoured(_)) => Some((format!("{path}[]"), t)),
            _ => None,
        };
        if let Some((sub, t)) = expand {
            rows(out, &sub, t);
            continue;
        }
        let ty = match k.ty {
            Ty::Str => "string",
            Ty::Bool => "bool",
            Ty::Uint => "integer",
            Ty::StrList => "[string]",
            Ty::UintList => "[integer]",
            Ty::StrMap => "{string: string}",
            Ty::Object(_) | Ty::Backend => "object",
            Ty::ObjectList(_) => "[object]",
        };
        let what = match k.treatment {
            Treatment::Honoured(d) => d.to_owned(),
            Treatment::Equivalent(n) => format!("any value: {n}"),
            Treatment::Only(allowed, why) => {
                format!("only {}; refused otherwise: {why}", allowed.describe())
            }
        };
        out.push_str(&format!("| `{path}` | {ty} | {what} |\n"));
    }
}
