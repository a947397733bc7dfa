//! Kata hands every RAFS mount nydusd's JSON configuration, as a string. This maps it onto
//! what Skiff does: where the blobs are. Keys Skiff honours are used, keys that change nothing
//! observable are logged, and anything Skiff cannot honour yet is refused with the reason:
//! nothing is silently ignored.
//!
//! Both of nydusd's layouts are read: version 1 (`device.backend`, `device.cache`,
//! `digest_validate`, `mode`, `fs_prefetch`, ...) and version 2 (`"version": 2`, `backend`,
//! `cache`, `rafs`).

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::daemon::BlobLocation;

/// Why a nydusd configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The string is not a JSON object.
    #[error("the rafs config is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A required key is missing or has the wrong type.
    #[error("the rafs config is invalid: {0}")]
    Invalid(String),
    /// A valid setting Skiff cannot honour (yet).
    #[error("the rafs config asks for something Skiff does not support: {0}")]
    Unsupported(String),
}

/// What a nydusd configuration means for Skiff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RafsMountConfig {
    /// Where the image's blobs are.
    pub blobs: BlobLocation,
}

/// Parses `config` (the `config` string of a mount request) into a [`RafsMountConfig`].
pub fn parse(config: &str) -> Result<RafsMountConfig, ConfigError> {
    if config.trim().is_empty() {
        return Err(ConfigError::Invalid(
            "a rafs mount needs a config naming its blobs (device.backend of type localfs)".into(),
        ));
    }
    let value: Value = serde_json::from_str(config).map_err(ConfigError::Json)?;
    let root = value
        .as_object()
        .ok_or_else(|| ConfigError::Invalid("expected a JSON object".into()))?;
    match root.get("version") {
        None => parse_v1(root),
        Some(v) if v.as_u64() == Some(1) => parse_v1(root),
        Some(v) if v.as_u64() == Some(2) => parse_v2(root),
        Some(v) => Err(ConfigError::Unsupported(format!(
            "config version {v} (Skiff reads versions 1 and 2)"
        ))),
    }
}

fn parse_v1(root: &Map<String, Value>) -> Result<RafsMountConfig, ConfigError> {
    let device = object(root, "device")?.ok_or_else(|| missing("device"))?;
    let backend = object(device, "backend")?.ok_or_else(|| missing("device.backend"))?;
    let kind = string(backend, "type")?.ok_or_else(|| missing("device.backend.type"))?;
    let backend_cfg = object(backend, "config")?;
    let blobs = backend_location(kind, backend_cfg, "device.backend.config")?;
    if let Some(cache) = object(device, "cache")? {
        check_cache(cache, "device.cache")?;
    }
    check_validate(root.get("digest_validate"), "digest_validate")?;
    check_mode(root.get("mode"), "mode")?;
    if let Some(prefetch) = object(root, "fs_prefetch")? {
        check_prefetch(prefetch, "fs_prefetch")?;
    }
    log_unhandled(
        root,
        &[
            "device",
            "digest_validate",
            "mode",
            "fs_prefetch",
            "version",
            "iostats_files",
            "enable_xattr",
            "access_pattern",
            "latest_read_files",
            "amplify_io",
        ],
    );
    check_xattr(root.get("enable_xattr"))?;
    Ok(RafsMountConfig { blobs })
}

fn parse_v2(root: &Map<String, Value>) -> Result<RafsMountConfig, ConfigError> {
    let backend = object(root, "backend")?.ok_or_else(|| missing("backend"))?;
    let kind = string(backend, "type")?.ok_or_else(|| missing("backend.type"))?;
    // Version 2 keeps each backend's settings under its own name: backend.localfs.dir.
    let backend_cfg = object(backend, kind)?;
    let blobs = backend_location(kind, backend_cfg, &format!("backend.{kind}"))?;
    if let Some(cache) = object(root, "cache")? {
        check_cache(cache, "cache")?;
    }
    if let Some(rafs) = object(root, "rafs")? {
        check_validate(rafs.get("validate"), "rafs.validate")?;
        check_mode(rafs.get("mode"), "rafs.mode")?;
        if let Some(prefetch) = object(rafs, "prefetch")? {
            check_prefetch(prefetch, "rafs.prefetch")?;
        }
        check_xattr(rafs.get("enable_xattr"))?;
    }
    log_unhandled(root, &["version", "id", "backend", "cache", "rafs"]);
    Ok(RafsMountConfig { blobs })
}

fn missing(key: &str) -> ConfigError {
    ConfigError::Invalid(format!("{key} is missing"))
}

fn object<'a>(
    map: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(ConfigError::Invalid(format!("{key} must be an object"))),
    }
}

fn string<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ConfigError::Invalid(format!("{key} must be a string"))),
    }
}

fn flag(value: Option<&Value>, key: &str) -> Result<Option<bool>, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ConfigError::Invalid(format!("{key} must be true or false"))),
    }
}

fn backend_location(
    kind: &str,
    cfg: Option<&Map<String, Value>>,
    at: &str,
) -> Result<BlobLocation, ConfigError> {
    match kind {
        "localfs" => {
            let cfg = cfg.ok_or_else(|| missing(at))?;
            let dir = string(cfg, "dir")?.filter(|s| !s.is_empty());
            let file = string(cfg, "blob_file")?.filter(|s| !s.is_empty());
            if flag(cfg.get("readahead"), "readahead")? == Some(true) {
                tracing::info!(
                    "{at}.readahead: not needed, Skiff reads local blobs one chunk at a time"
                );
            }
            let absolute = |p: &str, key: &str| {
                let p = PathBuf::from(p);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(ConfigError::Invalid(format!(
                        "{at}.{key} must be an absolute path"
                    )))
                }
            };
            match (dir, file) {
                (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
                    "{at}: give dir or blob_file, not both"
                ))),
                (Some(d), None) => Ok(BlobLocation::Dir(absolute(d, "dir")?)),
                (None, Some(f)) => Ok(BlobLocation::File(absolute(f, "blob_file")?)),
                (None, None) => Err(missing(&format!("{at}.dir"))),
            }
        }
        "registry" | "oss" | "s3" | "http-proxy" => Err(ConfigError::Unsupported(format!(
            "backend type {kind:?}: Skiff reads blobs from a local directory only until its \
             remote backends land; use type \"localfs\" with config.dir"
        ))),
        other => Err(ConfigError::Unsupported(format!(
            "unknown backend type {other:?}; Skiff supports \"localfs\""
        ))),
    }
}

fn check_cache(cache: &Map<String, Value>, at: &str) -> Result<(), ConfigError> {
    match string(cache, "type")?.unwrap_or("") {
        "" | "dummycache" | "dummy" | "none" => Ok(()),
        kind @ ("blobcache" | "filecache") => {
            // Blobs are local already: a cache of them on the same host changes nothing but
            // disk use. Skiff keeps verified chunks in memory instead.
            tracing::info!(
                "{at}.type {kind:?}: not used, blobs are local and Skiff caches verified \
                 chunks in memory"
            );
            Ok(())
        }
        other => Err(ConfigError::Unsupported(format!(
            "{at}.type {other:?}: Skiff serves over virtio-fs and has no {other} mode"
        ))),
    }
}

fn check_validate(value: Option<&Value>, at: &str) -> Result<(), ConfigError> {
    if flag(value, at)? == Some(false) {
        tracing::info!("{at}=false: Skiff always verifies every chunk against its digest");
    }
    Ok(())
}

fn check_mode(value: Option<&Value>, at: &str) -> Result<(), ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == "direct" || m == "cached" => Ok(()),
        Some(Value::String(m)) => Err(ConfigError::Invalid(format!(
            "{at} {m:?}: expected \"direct\" or \"cached\""
        ))),
        Some(_) => Err(ConfigError::Invalid(format!("{at} must be a string"))),
    }
}

fn check_prefetch(prefetch: &Map<String, Value>, at: &str) -> Result<(), ConfigError> {
    if flag(prefetch.get("enable"), &format!("{at}.enable"))? == Some(true) {
        return Err(ConfigError::Unsupported(format!(
            "{at}.enable=true: Skiff does not prefetch yet; set it to false"
        )));
    }
    Ok(())
}

fn check_xattr(value: Option<&Value>) -> Result<(), ConfigError> {
    if flag(value, "enable_xattr")? == Some(false) {
        return Err(ConfigError::Unsupported(
            "enable_xattr=false: Skiff always serves the image's xattrs".into(),
        ));
    }
    Ok(())
}

/// Logs top-level keys this mapping does not read, so none goes unnoticed.
fn log_unhandled(root: &Map<String, Value>, known: &[&str]) {
    for key in root.keys().filter(|k| !known.contains(&k.as_str())) {
        tracing::warn!(key = %key, "rafs config: unknown key not used by Skiff");
    }
    for key in ["iostats_files", "access_pattern", "latest_read_files"] {
        if root.get(key).and_then(Value::as_bool) == Some(true) {
            tracing::info!(
                key,
                "rafs config: nydusd statistics option; Skiff does not collect it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kata_localfs_dir_maps_to_blob_dir() {
        let cfg = r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/var/lib/blobs"}},
            "cache":{"type":"blobcache","config":{"work_dir":"/var/cache"}}},
            "mode":"direct","digest_validate":false,"iostats_files":false,
            "fs_prefetch":{"enable":false,"threads_count":4}}"#;
        assert_eq!(
            parse(cfg).ok(),
            Some(RafsMountConfig {
                blobs: BlobLocation::Dir("/var/lib/blobs".into())
            })
        );
    }

    #[test]
    fn version_2_is_read() {
        let cfg = r#"{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/b"}},
            "rafs":{"mode":"direct","validate":true}}"#;
        assert_eq!(
            parse(cfg).ok().map(|c| c.blobs),
            Some(BlobLocation::Dir("/b".into()))
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused() {
        for (cfg, want) in [
            (
                r#"{"device":{"backend":{"type":"registry","config":{"host":"h"}}}}"#,
                "registry",
            ),
            (
                r#"{"device":{"backend":{"type":"oss","config":{}}}}"#,
                "oss",
            ),
            (
                r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},
                   "fs_prefetch":{"enable":true}}"#,
                "prefetch",
            ),
            (
                r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}},
                   "cache":{"type":"fscache"}}}"#,
                "fscache",
            ),
        ] {
            match parse(cfg) {
                Err(e @ ConfigError::Unsupported(_)) => {
                    assert!(e.to_string().contains(want), "{e}")
                }
                other => panic!("{cfg}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_configs_are_invalid() {
        for cfg in [
            "",
            "{",
            "[]",
            r#"{"device":{}}"#,
            r#"{"device":{"backend":{"type":"localfs"}}}"#,
            r#"{"device":{"backend":{"type":"localfs","config":{"dir":"rel"}}}}"#,
            r#"{"device":{"backend":{"type":7}}}"#,
            r#"{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"mode":"fast"}"#,
        ] {
            assert!(
                matches!(
                    parse(cfg),
                    Err(ConfigError::Invalid(_) | ConfigError::Json(_))
                ),
                "{cfg}: {:?}",
                parse(cfg)
            );
        }
    }
}
