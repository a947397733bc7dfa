//! The service's configuration: a JSON file (`skiff accel --config FILE`), every key known
//! (an unknown one is an error, never ignored). See docs/accel.md for a commented example.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::AccelError;
use crate::build::Compressor;
use crate::format::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::oci::auth::Credentials;

/// The default tag suffix of converted images.
pub const DEFAULT_TAG_SUFFIX: &str = "-skiff";
/// Attempts at one task (a restart of the service during a conversion costs one).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccelConfig {
    /// `host:port` the HTTP API listens on.
    pub listen: String,
    /// Where the task list and conversion scratch directories live.
    pub work_dir: PathBuf,
    /// Conversions run at once.
    #[serde(default = "one")]
    pub workers: usize,
    /// Attempts at one task before it is failed (interrupted attempts count).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// The registries images are converted from (and pushed back to), by `host[:port]`.
    /// Events naming another registry are refused.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Docker distribution's notifications endpoint (`POST /api/v1/notifications`).
    #[serde(default)]
    pub notifications: Option<NotificationsConfig>,
    /// How target references are made from source references.
    #[serde(default)]
    pub rules: RulesConfig,
    /// How images are converted.
    #[serde(default)]
    pub convert: ConvertConfig,
}

fn one() -> usize {
    1
}

fn default_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

/// One registry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base64 of `user:password`, as Harbor's robot accounts are given (else the Docker config
    /// file, else anonymous).
    #[serde(default)]
    pub auth: Option<String>,
    /// Plain HTTP (always for localhost and 127.0.0.0/8).
    #[serde(default)]
    pub insecure: bool,
    /// The `Authorization` header Harbor's webhook must send for this registry's events; when
    /// unset, Harbor's webhook is refused for this registry.
    #[serde(default)]
    pub webhook_auth_header: Option<String>,
}

impl RegistryConfig {
    /// The credentials `auth` holds.
    pub fn credentials(&self) -> Result<Option<Credentials>, AccelError> {
        use base64::Engine;
        let Some(a) = &self.auth else {
            return Ok(None);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| AccelError::Config(format!("registries.*.auth: not base64: {e}")))?;
        let s = String::from_utf8(raw)
            .map_err(|_| AccelError::Config("registries.*.auth: not UTF-8".into()))?;
        Credentials::parse(&s)
            .map(Some)
            .map_err(|e| AccelError::Config(format!("registries.*.auth: {e}")))
    }
}

/// Docker distribution's notifications.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// The `Authorization` header the registry's endpoint config sends (`headers:`); required
    /// on every request when set.
    #[serde(default)]
    pub auth_header: Option<String>,
    /// The registry the events come from, as configured under `registries` (default: the
    /// event's `request.host`, which must be configured).
    #[serde(default)]
    pub registry: Option<String>,
}

/// Target references.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Appended to the source tag (default `-skiff`); images whose tag ends with it are not
    /// converted.
    #[serde(default)]
    pub tag_suffix: Option<String>,
    /// Instead of a suffix: the repository converted images go to (same registry, same tag);
    /// images of that repository are not converted.
    #[serde(default)]
    pub target_repository: Option<String>,
}

/// Conversion settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertConfig {
    /// Chunk size (`1M`, `64K`, …).
    #[serde(default)]
    pub chunk_size: Option<String>,
    /// `lz4` (default), `zstd` or `none`.
    #[serde(default)]
    pub compressor: Option<String>,
    /// Convert every platform of an index (default); `false`: linux/amd64 only.
    #[serde(default = "yes")]
    pub all_platforms: bool,
}

fn yes() -> bool {
    true
}

impl Default for ConvertConfig {
    fn default() -> Self {
        Self {
            chunk_size: None,
            compressor: None,
            all_platforms: true,
        }
    }
}

impl ConvertConfig {
    /// The chunk size.
    pub fn chunk_size(&self) -> Result<u32, AccelError> {
        let Some(s) = &self.chunk_size else {
            return Ok(DEFAULT_CHUNK_SIZE);
        };
        let n = crate::util::parse_size(s)
            .map_err(|e| AccelError::Config(format!("convert.chunk_size: {e}")))?;
        match u32::try_from(n) {
            Ok(n) if n.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&n) => Ok(n),
            _ => Err(AccelError::Config(format!(
                "convert.chunk_size {s:?} is not a power of two from 4K to 16M"
            ))),
        }
    }

    /// The compressor.
    pub fn compressor(&self) -> Result<Compressor, AccelError> {
        match self.compressor.as_deref() {
            None => Ok(Compressor::Lz4),
            Some(name) => Compressor::from_name(name).ok_or_else(|| {
                AccelError::Config(format!(
                    "convert.compressor {name:?}: use \"lz4\", \"zstd\" or \"none\""
                ))
            }),
        }
    }
}

impl AccelConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, AccelError> {
        let text = std::fs::read_to_string(path).map_err(|e| AccelError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source: e,
        })?;
        let c: Self = serde_json::from_str(&text)
            .map_err(|e| AccelError::Config(format!("{}: {e}", path.display())))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks what the types alone do not.
    pub fn validate(&self) -> Result<(), AccelError> {
        let bad = |s: String| Err(AccelError::Config(s));
        if self.workers == 0 || self.workers > 64 {
            return bad(format!("workers {} is not from 1 to 64", self.workers));
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".into());
        }
        if self.registries.is_empty() {
            return bad("registries: name at least one registry".into());
        }
        for r in self.registries.values() {
            r.credentials()?;
        }
        if let Some(n) = &self.notifications {
            if let Some(r) = &n.registry {
                if !self.registries.contains_key(r) {
                    return bad(format!(
                        "notifications.registry {r:?} is not one of the registries"
                    ));
                }
            }
        }
        match (&self.rules.tag_suffix, &self.rules.target_repository) {
            (Some(_), Some(_)) => {
                return bad("rules: give tag_suffix or target_repository, not both".into())
            }
            (Some(s), None) if s.is_empty() || !valid_tag_part(s) => {
                return bad(format!("rules.tag_suffix {s:?} is not valid in a tag"))
            }
            (None, Some(r)) => {
                crate::oci::Reference::parse(&format!("localhost/{r}:x")).map_err(|e| {
                    AccelError::Config(format!("rules.target_repository {r:?}: {e}"))
                })?;
            }
            _ => {}
        }
        self.convert.chunk_size()?;
        self.convert.compressor()?;
        Ok(())
    }

    /// The tag suffix in force (when no target repository is set).
    pub fn tag_suffix(&self) -> &str {
        self.rules
            .tag_suffix
            .as_deref()
            .unwrap_or(DEFAULT_TAG_SUFFIX)
    }
}

fn valid_tag_part(s: &str) -> bool {
    s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AccelConfig, AccelError> {
        let c: AccelConfig =
            serde_json::from_str(s).map_err(|e| AccelError::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_refusals() {
        let c =
            parse(r#"{"listen":"127.0.0.1:2077","work_dir":"/tmp/a","registries":{"r:5000":{}}}"#)
                .expect("minimal config");
        assert_eq!(c.workers, 1);
        assert_eq!(c.tag_suffix(), "-skiff");
        assert!(c.convert.all_platforms);
        // Unknown keys, wrong values and contradictions are refused, not ignored.
        for bad in [
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{}},"colour":1}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{"webhook":"x"}}}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{}}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{}},"workers":0}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{"auth":"!!"}}}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{}},"rules":{"tag_suffix":"-a","target_repository":"b"}}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{}},"rules":{"tag_suffix":"/x"}}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{}},"convert":{"chunk_size":"3K"}}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{}},"convert":{"compressor":"lz4_block"}}"#,
            r#"{"listen":"x","work_dir":"/a","registries":{"r":{}},"notifications":{"registry":"other"}}"#,
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad}");
        }
    }
}
