//! The API's routes: nydusd's, as Kata calls them. Plain functions from a request to a
//! response, so they are tested without a socket.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /api/v1/daemon` | 200, `{"id", "version": {...}, "state": "RUNNING", "mounts": {...}}` |
//! | `POST /api/v1/mount?mountpoint=MP` + `{"fs_type","source","config"}` | 204 |
//! | `DELETE /api/v1/mount?mountpoint=MP` | 204 |
//! | `GET /api/v1/metrics` | 200, JSON object of counters |
//! | `GET /metrics` | 200, Prometheus text format |
//!
//! Errors are 4xx/5xx with `{"code": "...", "message": "..."}`.

use serde::Deserialize;

use super::{nydus_config, ApiError};
use crate::daemon::{SampleKind, SandboxFs};

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

/// The body of a mount request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountRequest {
    fs_type: String,
    source: String,
    #[serde(default)]
    config: String,
}

/// Answers `req` against `fs`. Never panics on any input.
pub fn handle(fs: &SandboxFs, req: &ApiRequest) -> ApiResponse {
    let response = match route(fs, req) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(method = %req.method, url = %req.url, error = %crate::util::error_chain(&e), "API request refused");
            ApiResponse::error(&e)
        }
    };
    fs.counters().api_request(response.status >= 400);
    response
}

fn route(fs: &SandboxFs, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let (path, query) = match req.url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.url.as_str(), None),
    };
    match (req.method.as_str(), path) {
        ("GET", "/api/v1/daemon") => Ok(daemon_info(fs)),
        ("POST", "/api/v1/mount") => mount(fs, &mountpoint(query)?, &req.body),
        ("DELETE", "/api/v1/mount") => {
            fs.umount(&mountpoint(query)?)?;
            Ok(ApiResponse::no_content())
        }
        ("GET", "/api/v1/metrics") => Ok(metrics_json(fs)),
        ("GET", "/metrics") => Ok(metrics_prometheus(fs)),
        (_, "/api/v1/daemon" | "/api/v1/mount" | "/api/v1/metrics" | "/metrics") => {
            Err(ApiError::MethodNotAllowed {
                method: req.method.clone(),
                path: path.to_owned(),
            })
        }
        _ => Err(ApiError::NoRoute(path.to_owned())),
    }
}

fn daemon_info(fs: &SandboxFs) -> ApiResponse {
    let mounts = fs.mounts().unwrap_or_default();
    ApiResponse::json(
        200,
        &serde_json::json!({
            "id": "skiff",
            "version": {
                "package_ver": env!("CARGO_PKG_VERSION"),
                "git_commit": "",
                "build_time": "",
                "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
                "rustc": "",
            },
            "state": fs.state().as_str(),
            "mounts": mounts,
        }),
    )
}

fn mount(fs: &SandboxFs, mountpoint: &str, body: &[u8]) -> Result<ApiResponse, ApiError> {
    let req: MountRequest = serde_json::from_slice(body).map_err(ApiError::BadJson)?;
    match req.fs_type.as_str() {
        "passthrough_fs" => {
            if !req.config.trim().is_empty() {
                return Err(ApiError::Config(nydus_config::ConfigError::Unsupported(
                    "passthrough_fs takes no config: Skiff's passthrough has no options".into(),
                )));
            }
            fs.mount_passthrough(mountpoint, std::path::Path::new(&req.source))?
        }
        "rafs" => {
            // Check the mountpoint before the config, so a bad path is named as such.
            crate::daemon::check_rafs_mountpoint(mountpoint)?;
            let cfg = nydus_config::parse(&req.config)?;
            let source = std::path::Path::new(&req.source);
            if !source.is_absolute() {
                return Err(ApiError::BadRequest(format!(
                    "source {:?} must be an absolute path to a bootstrap",
                    req.source
                )));
            }
            fs.mount_rafs(mountpoint, source, &cfg.blobs)?;
        }
        other => return Err(ApiError::UnsupportedFsType(other.to_owned())),
    }
    Ok(ApiResponse::no_content())
}

/// The `mountpoint` query parameter, percent-decoded.
fn mountpoint(query: Option<&str>) -> Result<String, ApiError> {
    let raw = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("mountpoint="))
        .ok_or_else(|| ApiError::BadRequest("the mountpoint query parameter is missing".into()))?;
    percent_decode(raw).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "mountpoint {raw:?} is not valid UTF-8 or has a bad %-escape"
        ))
    })
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

fn metrics_json(fs: &SandboxFs) -> ApiResponse {
    let map: serde_json::Map<String, serde_json::Value> = fs
        .counters()
        .samples()
        .into_iter()
        .map(|s| (s.name.to_owned(), s.value.into()))
        .collect();
    ApiResponse::json(200, &serde_json::Value::Object(map))
}

fn metrics_prometheus(fs: &SandboxFs) -> ApiResponse {
    let mut text = String::new();
    for s in fs.counters().samples() {
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

    #[test]
    fn bad_requests_get_clear_errors() {
        let fs = SandboxFs::new();
        let cases = [
            (req("GET", "/nope", ""), 404, "NOT_FOUND"),
            (req("PUT", "/api/v1/mount", ""), 405, "METHOD_NOT_ALLOWED"),
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
                req("DELETE", "/api/v1/mount?mountpoint=/rafs/a/lowerdir", ""),
                404,
                "NOT_MOUNTED",
            ),
            (
                req("DELETE", "/api/v1/mount?mountpoint=%zz", ""),
                400,
                "INVALID_ARGUMENT",
            ),
        ];
        for (r, status, want) in cases {
            let resp = handle(&fs, &r);
            assert_eq!((resp.status, code(&resp).as_str()), (status, want), "{r:?}");
        }
        let m = handle(&fs, &req("GET", "/api/v1/metrics", ""));
        let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
        assert_eq!(v["api_requests_total"], 8, "counted before this request");
        assert_eq!(v["api_errors_total"], 8);
        let p = handle(&fs, &req("GET", "/metrics", ""));
        assert!(String::from_utf8_lossy(&p.body).contains("skiff_api_requests_total 9\n"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("/rafs/a%2Bb/lowerdir").as_deref(),
            Some("/rafs/a+b/lowerdir")
        );
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%00"), None);
    }
}
