//! The API's routes: nydusd's, as nydus-snapshotter and Kata call them. Plain functions from a
//! request to a response, so they are tested without a socket.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /api/v1/daemon` | 200, `{"id", "version": {...}, "supervisor", "state", "mounts": {...}}` |
//! | `POST /api/v1/mount?mountpoint=MP` + `{"fs_type","source","config","prefetch_files"}` | 204 |
//! | `DELETE /api/v1/mount?mountpoint=MP` | 204 |
//! | `GET /api/v1/metrics` | 200, the daemon's counters |
//! | `GET /api/v1/metrics?id=ID` | 200, the mount's filesystem metrics (nydusd's `FsMetrics`) |
//! | `GET /api/v1/metrics/blobcache?id=ID` | 200, its cache metrics (nydusd's `CacheMetrics`) |
//! | `GET /api/v1/metrics/backend?id=ID` | 200, its backend metrics |
//! | `PUT /api/v1/config?id=ID` + `{"registry_auth": "<base64 user:pass>"}` | 204 |
//! | `PUT /api/v1/daemon/fuse/sendfd`, `.../takeover`, `/api/v1/daemon/start`, `/exit` | 204 |
//! | `GET /metrics` | 200, the counters in the Prometheus text format |
//!
//! Errors are 4xx (the request's fault) or 5xx with `{"code": "...", "message": "..."}`.

use serde::Deserialize;

use super::{nydus_config, ApiError};
use crate::daemon::{Daemon, MountError, RafsRequest, SampleKind};
use crate::storage::MetricsSnapshot;

/// An HTTP request, reduced to what the routes look at.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query, as sent (`/api/v1/mount?mountpoint=/containers`).
    pub url: String,
    /// The body.
    pub body: Vec<u8>,
}

/// An HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// Status code.
    pub status: u16,
    /// Content type of the body (empty when there is no body).
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl ApiResponse {
    fn no_content() -> Self {
        ApiResponse {
            status: 204,
            content_type: "",
            body: Vec::new(),
        }
    }

    fn json(status: u16, value: &serde_json::Value) -> Self {
        ApiResponse {
            status,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }

    /// The response for an error: its status and `{"code", "message"}`.
    pub fn error(e: &ApiError) -> Self {
        Self::json(
            e.status(),
            &serde_json::json!({
                "code": e.code(),
                "message": crate::util::error_chain(e),
            }),
        )
    }
}

/// The body of a mount request (nydusd's `ApiMountCmd`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountRequest {
    #[serde(default)]
    fs_type: String,
    source: String,
    #[serde(default)]
    config: String,
    #[serde(default)]
    prefetch_files: Option<Vec<String>>,
}

/// The paths the routes know, for 405 answers.
const PATHS: &[&str] = &[
    "/api/v1/daemon",
    "/api/v1/mount",
    "/api/v1/metrics",
    "/api/v1/metrics/blobcache",
    "/api/v1/metrics/backend",
    "/api/v1/config",
    "/api/v1/daemon/fuse/sendfd",
    "/api/v1/daemon/fuse/takeover",
    "/api/v1/daemon/start",
    "/api/v1/daemon/exit",
    "/metrics",
];

/// Answers `req` against `d`. Never panics on any input.
pub fn handle(d: &Daemon, req: &ApiRequest) -> ApiResponse {
    let response = match route(d, req) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(method = %req.method, url = %req.url, error = %crate::util::error_chain(&e), "API request refused");
            ApiResponse::error(&e)
        }
    };
    d.fs.counters().api_request(response.status >= 400);
    response
}

fn route(d: &Daemon, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let (path, query) = match req.url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.url.as_str(), None),
    };
    let no_body = || -> Result<(), ApiError> {
        if req.body.iter().all(u8::is_ascii_whitespace) {
            Ok(())
        } else {
            Err(ApiError::BadRequest(format!("{path} takes no body")))
        }
    };
    let lifecycle = |r: Result<(), crate::daemon::LifecycleError>| {
        r.map(|()| ApiResponse::no_content())
            .map_err(ApiError::Lifecycle)
    };
    match (req.method.as_str(), path) {
        ("GET", "/api/v1/daemon") => Ok(daemon_info(d)),
        ("POST", "/api/v1/mount") => mount(d, &required(query, "mountpoint")?, &req.body),
        ("DELETE", "/api/v1/mount") => {
            let mp = required(query, "mountpoint")?;
            let (_, parent) = d.fs.umount(&mp)?;
            if let Some(name) = mp.rsplit('/').next().filter(|n| !n.is_empty()) {
                d.lifecycle.unmounted(parent, name);
            }
            Ok(ApiResponse::no_content())
        }
        ("GET", "/api/v1/metrics") => match param(query, "id")? {
            None => Ok(counters_json(d)),
            Some(id) => fs_metrics(d, &id),
        },
        ("GET", "/api/v1/metrics/blobcache") => cache_metrics(d, param(query, "id")?.as_deref()),
        ("GET", "/api/v1/metrics/backend") => backend_metrics(d, param(query, "id")?.as_deref()),
        ("PUT", "/api/v1/config") => update_config(d, &required(query, "id")?, &req.body),
        ("PUT", "/api/v1/daemon/fuse/sendfd") => {
            no_body()?;
            lifecycle(d.lifecycle.send_fd())
        }
        ("PUT", "/api/v1/daemon/fuse/takeover") => {
            no_body()?;
            lifecycle(d.lifecycle.takeover())
        }
        ("PUT", "/api/v1/daemon/start") => {
            no_body()?;
            lifecycle(d.lifecycle.start())
        }
        ("PUT", "/api/v1/daemon/exit") => {
            no_body()?;
            lifecycle(d.lifecycle.exit())
        }
        ("GET", "/metrics") => Ok(metrics_prometheus(d)),
        ("PUT", "/api/v1/mount") => Err(ApiError::BadRequest(
            "remounting (PUT /api/v1/mount) is not supported: DELETE the mount and POST it again"
                .into(),
        )),
        (_, p) if PATHS.contains(&p) => Err(ApiError::MethodNotAllowed {
            method: req.method.clone(),
            path: path.to_owned(),
        }),
        _ => Err(ApiError::NoRoute(path.to_owned())),
    }
}

/// This build's identity, computed once (see [`crate::cli::build_identity`]).
fn build_identity() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(crate::cli::build_identity)
}

fn version() -> serde_json::Value {
    serde_json::json!({
        "package_ver": env!("CARGO_PKG_VERSION"),
        "git_commit": build_identity(),
        "build_time": "",
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "rustc": "",
    })
}

fn daemon_info(d: &Daemon) -> ApiResponse {
    let mounts = d.fs.mounts().unwrap_or_default();
    ApiResponse::json(
        200,
        &serde_json::json!({
            "id": d.id.as_deref().unwrap_or("skiff"),
            "version": version(),
            "supervisor": d.supervisor.as_ref().map(|p| p.display().to_string()),
            "state": d.fs.state().as_str(),
            "mounts": mounts,
        }),
    )
}

fn mount(d: &Daemon, mountpoint: &str, body: &[u8]) -> Result<ApiResponse, ApiError> {
    let req: MountRequest = serde_json::from_slice(body).map_err(ApiError::BadJson)?;
    match req.fs_type.as_str() {
        "passthrough_fs" => {
            if !req.config.trim().is_empty() {
                return Err(ApiError::Config(nydus_config::ConfigError::Unsupported {
                    key: "config".into(),
                    reason: "passthrough_fs takes no config: Skiff's passthrough has no options"
                        .into(),
                }));
            }
            if req.prefetch_files.as_ref().is_some_and(|p| !p.is_empty()) {
                return Err(ApiError::BadRequest(
                    "prefetch_files is for rafs mounts, not passthrough_fs".into(),
                ));
            }
            d.fs.mount_passthrough(mountpoint, std::path::Path::new(&req.source))?
        }
        // nydusd takes an empty fs_type as rafs.
        "rafs" | "" => {
            // Check the mountpoint before the config, so a bad path is named as such.
            d.fs.layout().check_rafs(mountpoint)?;
            let cfg = nydus_config::parse(&req.config)?;
            cfg.log_notes();
            let source = std::path::PathBuf::from(&req.source);
            if !source.is_absolute() {
                return Err(ApiError::BadRequest(format!(
                    "source {:?} must be an absolute path to a bootstrap",
                    req.source
                )));
            }
            let prefetch_files = req.prefetch_files.unwrap_or_default();
            if prefetch_files.len() > 1 << 20 {
                return Err(ApiError::BadRequest("too many prefetch_files".into()));
            }
            d.fs.mount_rafs(
                mountpoint,
                RafsRequest {
                    source,
                    config: req.config,
                    spec: cfg.spec,
                    prefetch_files,
                },
            )?;
        }
        other => return Err(ApiError::UnsupportedFsType(other.to_owned())),
    }
    Ok(ApiResponse::no_content())
}

/// `PUT /api/v1/config?id=`: nydusd's runtime configuration keys. `registry_auth` renews the
/// registry credentials of the mounts `id` selects; anything else is refused.
fn update_config(d: &Daemon, id: &str, body: &[u8]) -> Result<ApiResponse, ApiError> {
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(body).map_err(ApiError::BadJson)?;
    if map.is_empty() {
        return Err(ApiError::BadRequest("no configuration key given".into()));
    }
    for key in map.keys() {
        if key != "registry_auth" {
            return Err(ApiError::Config(nydus_config::ConfigError::Unsupported {
                key: key.clone(),
                reason: "the only runtime configuration key Skiff takes is registry_auth".into(),
            }));
        }
    }
    if let Some(auth) = map.get("registry_auth") {
        let creds = nydus_config::decode_auth(auth).map_err(|why| {
            ApiError::Config(nydus_config::ConfigError::Invalid(format!(
                "registry_auth: {why}"
            )))
        })?;
        d.fs.renew_credentials(id, &creds)
            .map_err(ApiError::Renew)?;
    }
    Ok(ApiResponse::no_content())
}

fn selected(d: &Daemon, id: Option<&str>) -> Result<Vec<(String, MetricsSnapshot)>, ApiError> {
    let v = d.fs.storage_metrics(id)?;
    if let (Some(id), true) = (id, v.is_empty()) {
        return Err(ApiError::Mount(MountError::NotMounted(id.to_owned())));
    }
    Ok(v.into_iter().map(|(mp, s, _)| (mp, s)).collect())
}

/// Sums the counters of several mounts (for a request without an id).
fn total(v: &[(String, MetricsSnapshot)]) -> MetricsSnapshot {
    let mut it = v.iter().map(|(_, s)| s.clone());
    let Some(mut t) = it.next() else {
        return crate::storage::Metrics::default().snapshot("none");
    };
    for s in it {
        t.backend_requests += s.backend_requests;
        t.backend_bytes += s.backend_bytes;
        t.backend_errors += s.backend_errors;
        t.backend_retries += s.backend_retries;
        t.mem_hits += s.mem_hits;
        t.mem_misses += s.mem_misses;
        t.disk_hits += s.disk_hits;
        t.disk_misses += s.disk_misses;
        t.chunks_fetched += s.chunks_fetched;
        t.verify_failures += s.verify_failures;
        t.read_errors += s.read_errors;
        t.prefetch_chunks_total += s.prefetch_chunks_total;
        t.prefetch_chunks_done += s.prefetch_chunks_done;
        t.prefetch_bytes += s.prefetch_bytes;
        t.prefetch_errors += s.prefetch_errors;
        t.prefetch_complete &= s.prefetch_complete;
        t.fs_reads += s.fs_reads;
        t.fs_read_bytes += s.fs_read_bytes;
        t.ahead_decoded += s.ahead_decoded;
        t.ahead_hits += s.ahead_hits;
        t.ahead_wasted += s.ahead_wasted;
        t.fetch_latency_sum_seconds += s.fetch_latency_sum_seconds;
    }
    t
}

/// nydusd's `FsMetrics` for the mount `id` selects, with Skiff's storage metrics beside.
fn fs_metrics(d: &Daemon, id: &str) -> Result<ApiResponse, ApiError> {
    let v = selected(d, Some(id))?;
    let s = total(&v);
    Ok(ApiResponse::json(
        200,
        &serde_json::json!({
            "id": id,
            "files_account_enabled": false,
            "access_pattern_enabled": false,
            "measure_latency": true,
            "data_read": s.fs_read_bytes,
            "block_count_read": [],
            "fop_hits": [],
            "fop_errors": [],
            "fop_cumulative_latency_total": [],
            "read_latency_dist": [],
            "nr_opens": 0,
            "skiff": s,
        }),
    ))
}

/// nydusd's `CacheMetrics`, from Skiff's cache counters.
fn cache_metrics(d: &Daemon, id: Option<&str>) -> Result<ApiResponse, ApiError> {
    let v = selected(d, id)?;
    let mounts = d.fs.storage_metrics(id)?;
    let store_path = mounts
        .iter()
        .find_map(|(_, _, info)| match info {
            crate::daemon::MountedFs::Rafs { cache_dir, .. } => cache_dir.clone(),
            _ => None,
        })
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let s = total(&v);
    Ok(ApiResponse::json(
        200,
        &serde_json::json!({
            "id": id.unwrap_or(""),
            "underlying_files": [],
            "store_path": store_path,
            "partial_hits": 0,
            "whole_hits": s.mem_hits + s.disk_hits,
            "total": s.mem_hits + s.mem_misses,
            "entries_count": s.disk_stores,
            "prefetch_data_amount": s.prefetch_bytes,
            "prefetch_requests_count": s.prefetch_chunks_done,
            "prefetch_workers": 0,
            "prefetch_unmerged_chunks": s.prefetch_chunks_total.saturating_sub(s.prefetch_chunks_done),
            "prefetch_cumulative_time_millis": 0,
            "prefetch_begin_time_secs": 0,
            "prefetch_begin_time_millis": 0,
            "prefetch_end_time_secs": 0,
            "prefetch_end_time_millis": 0,
            "buffered_backend_size": 0,
            "data_all_ready": s.prefetch_complete,
            "skiff": s,
        }),
    ))
}

/// nydusd's backend metrics, from Skiff's backend counters.
fn backend_metrics(d: &Daemon, id: Option<&str>) -> Result<ApiResponse, ApiError> {
    let v = selected(d, id)?;
    let s = total(&v);
    Ok(ApiResponse::json(
        200,
        &serde_json::json!({
            "id": id.unwrap_or(""),
            "backend_type": s.backend,
            "read_count": s.backend_requests,
            "read_errors": s.backend_errors,
            "read_amount_total": s.backend_bytes,
            "read_cumulative_latency_millis_total": (s.fetch_latency_sum_seconds * 1000.0) as u64,
            "skiff": s,
        }),
    ))
}

/// A query parameter, percent-decoded, if present.
fn param(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    let prefix = format!("{name}=");
    let Some(raw) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix(prefix.as_str()))
    else {
        return Ok(None);
    };
    percent_decode(raw).map(Some).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{name} {raw:?} is not valid UTF-8 or has a bad %-escape"
        ))
    })
}

fn required(query: Option<&str>, name: &str) -> Result<String, ApiError> {
    param(query, name)?
        .ok_or_else(|| ApiError::BadRequest(format!("the {name} query parameter is missing")))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    (!s.contains('\0')).then_some(s)
}

fn counters_json(d: &Daemon) -> ApiResponse {
    let map: serde_json::Map<String, serde_json::Value> =
        d.fs.counters()
            .samples()
            .into_iter()
            .map(|s| (s.name.to_owned(), s.value.into()))
            .collect();
    ApiResponse::json(200, &serde_json::Value::Object(map))
}

fn metrics_prometheus(d: &Daemon) -> ApiResponse {
    let mut text = String::new();
    for s in d.fs.counters().samples() {
        let kind = match s.kind {
            SampleKind::Counter => "counter",
            SampleKind::Gauge => "gauge",
        };
        text.push_str(&format!(
            "# HELP skiff_{name} {help}\n# TYPE skiff_{name} {kind}\nskiff_{name} {value}\n",
            name = s.name,
            help = s.help,
            value = s.value
        ));
    }
    ApiResponse {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        body: text.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn req(method: &str, url: &str, body: &str) -> ApiRequest {
        ApiRequest {
            method: method.into(),
            url: url.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn code(r: &ApiResponse) -> String {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        v["code"].as_str().unwrap_or("").to_owned()
    }

    fn kata() -> Daemon {
        Daemon {
            fs: Arc::new(crate::daemon::DaemonFs::kata()),
            id: None,
            supervisor: None,
            lifecycle: Arc::new(super::super::VirtiofsLifecycle::new(
                crate::runtime::ExitEvent::new().expect("exit event"),
            )),
        }
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let d = kata();
        let cases = [
            (req("GET", "/nope", ""), 404, "NOT_FOUND"),
            (req("PATCH", "/api/v1/mount", ""), 405, "METHOD_NOT_ALLOWED"),
            (
                req("PUT", "/api/v1/mount?mountpoint=/x", "{}"),
                400,
                "INVALID_ARGUMENT",
            ),
            (req("POST", "/api/v1/mount", "{}"), 400, "INVALID_ARGUMENT"),
            (
                req("POST", "/api/v1/mount?mountpoint=/containers", "{"),
                400,
                "INVALID_JSON",
            ),
            (
                req(
                    "POST",
                    "/api/v1/mount?mountpoint=/x",
                    r#"{"fs_type":"rafs","source":"/b","config":""}"#,
                ),
                400,
                "INVALID_MOUNTPOINT",
            ),
            (
                req(
                    "POST",
                    "/api/v1/mount?mountpoint=/containers",
                    r#"{"fs_type":"ext4","source":"/b","config":""}"#,
                ),
                400,
                "UNSUPPORTED_FS_TYPE",
            ),
            (
                req(
                    "POST",
                    "/api/v1/mount?mountpoint=/rafs/a/lowerdir",
                    r#"{"fs_type":"rafs","source":"/b","config":"{\"device\":{\"backend\":{\"type\":\"localdisk\"}}}"}"#,
                ),
                400,
                "UNSUPPORTED_CONFIG",
            ),
            (
                req("DELETE", "/api/v1/mount?mountpoint=/rafs/a/lowerdir", ""),
                404,
                "NOT_MOUNTED",
            ),
            (
                req("DELETE", "/api/v1/mount?mountpoint=%zz", ""),
                400,
                "INVALID_ARGUMENT",
            ),
            (req("PUT", "/api/v1/config", "{}"), 400, "INVALID_ARGUMENT"),
            (
                req("PUT", "/api/v1/config?id=/1", r#"{"log_level":"debug"}"#),
                400,
                "UNSUPPORTED_CONFIG",
            ),
            (
                req("PUT", "/api/v1/config?id=/1", r#"{"registry_auth":"!!"}"#),
                400,
                "INVALID_CONFIG",
            ),
            (
                req("PUT", "/api/v1/config?id=/1", r#"{"registry_auth":"dTpw"}"#),
                404,
                "NOT_MOUNTED",
            ),
            (req("GET", "/api/v1/metrics?id=/1", ""), 404, "NOT_MOUNTED"),
            (
                req("PUT", "/api/v1/daemon/fuse/sendfd", ""),
                400,
                "NOT_SUPPORTED",
            ),
            (
                req("PUT", "/api/v1/daemon/start", "x"),
                400,
                "INVALID_ARGUMENT",
            ),
        ];
        let n = cases.len();
        for (r, status, want) in cases {
            let resp = handle(&d, &r);
            assert_eq!((resp.status, code(&resp).as_str()), (status, want), "{r:?}");
        }
        let m = handle(&d, &req("GET", "/api/v1/metrics", ""));
        let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
        assert_eq!(v["api_requests_total"], n, "counted before this request");
        assert_eq!(v["api_errors_total"], n);
        let p = handle(&d, &req("GET", "/metrics", ""));
        assert!(String::from_utf8_lossy(&p.body)
            .contains(&format!("skiff_api_requests_total {}\n", n + 1)));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("/rafs/a%2Bb/lowerdir").as_deref(),
            Some("/rafs/a+b/lowerdir")
        );
        assert_eq!(percent_decode("%2F42").as_deref(), Some("/42"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%00"), None);
    }
}
