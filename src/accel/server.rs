//! The HTTP API ([`crate::runtime::http`], as `api/` uses), one thread per connection up to a
//! bound:
//!
//! | request | what |
//! |---|---|
//! | `POST /api/v1/conversions[?sync=true]` | Harbor's webhook payload (`PUSH_ARTIFACT`); the registry's `webhook_auth_header` must be the `Authorization` header |
//! | `POST /api/v1/notifications` | Docker distribution's events envelope; `notifications.auth_header` must be the `Authorization` header when set |
//! | `GET /api/v1/conversions` | the task list, newest first (JSON) |
//! | `GET /metrics` | Prometheus counters and conversion durations |
//! | `GET /api/v1/health` | 200 while the service runs |
//!
//! Errors are `{"code": …, "message": …}` with a 4xx status naming the cause.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::events::{self, Decision, Origin, Pushed, DISTRIBUTION_EVENTS};
use super::tasks::{Created, Task};
use super::{AccelError, Service};
use crate::runtime::http::{self, HttpError, Limits};

/// Largest request body read (a webhook payload or an events envelope is a few KiB).
pub const MAX_BODY_BYTES: u64 = 1 << 20;
/// How long `?sync=true` waits for its conversions.
const SYNC_WAIT: Duration = Duration::from_secs(3600);
/// The bounds of a connection: a head of 64 KiB, a body of [`MAX_BODY_BYTES`], a minute
/// between reads, 32 connections (and so requests) at once; more get 503.
const LIMITS: Limits = Limits {
    max_head: 64 << 10,
    max_body: MAX_BODY_BYTES,
    idle: Duration::from_secs(60),
    max_connections: 32,
};

/// The listening server.
pub struct HttpServer {
    server: http::Server,
    addr: String,
}

impl HttpServer {
    /// Listens on the service's `listen` address and answers until [`HttpServer::shutdown`].
    pub fn start(service: Arc<Service>) -> Result<Self, AccelError> {
        let listen = service.config.listen.clone();
        let listen_err = |e: std::io::Error| AccelError::Listen {
            addr: listen.clone(),
            why: e.to_string(),
        };
        let listener = TcpListener::bind(&listen).map_err(listen_err)?;
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| listen.clone());
        let handler = move |request: Result<http::Request, &HttpError>| {
            let reply = match request {
                Ok(request) => handle(request, &service),
                Err(e) => refused(e),
            };
            http::Response {
                status: reply.status,
                content_type: reply.content_type.to_owned(),
                body: reply.body.into_bytes(),
            }
        };
        let server = http::Server::start(listener, "accel-http", None, LIMITS, Arc::new(handler))
            .map_err(|e| AccelError::Io {
            op: "starting the HTTP thread",
            path: "-".into(),
            source: e,
        })?;
        Ok(Self { server, addr })
    }

    /// The address listened on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops accepting requests.
    pub fn shutdown(mut self) {
        self.server.stop();
    }
}

/// The answer to a request that could not be read.
fn refused(e: &HttpError) -> Reply {
    let code = match e {
        HttpError::BodyTooLarge(_) => "TOO_LARGE",
        HttpError::TooManyConnections => "BUSY",
        _ => "BAD_REQUEST",
    };
    tracing::info!(error = %e, "HTTP request refused");
    err(e.status(), code, e.to_string())
}

/// A response: status and JSON (or text) body.
struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
}

fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"code": code, "message": message}).to_string()
}

fn err(status: u16, code: &str, message: impl Into<String>) -> Reply {
    Reply {
        status,
        body: error_body(code, &message.into()),
        content_type: "application/json",
    }
}

fn ok_json(v: &impl serde::Serialize) -> Reply {
    Reply {
        status: 200,
        body: serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into()),
        content_type: "application/json",
    }
}

fn header(req: &http::Request, name: &str) -> Option<String> {
    req.header(name).map(str::to_owned)
}

fn handle(req: http::Request, service: &Service) -> Reply {
    if service.stopping() {
        return err(503, "STOPPING", "the service is stopping");
    }
    let url = req.target.clone();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let method = req.method.as_str();
    let endpoint = match path {
        "/api/v1/conversions" => "conversions",
        "/api/v1/notifications" => "notifications",
        "/metrics" => "metrics",
        "/api/v1/health" => "health",
        _ => "other",
    };
    let reply = match (method, path) {
        ("POST", "/api/v1/conversions") => harbor(service, &req, &req.body, query),
        ("POST", "/api/v1/notifications") => notifications(service, &req, &req.body),
        ("GET", "/api/v1/conversions") => ok_json(&service.tasks.list()),
        ("GET", "/metrics") => Reply {
            status: 200,
            body: service.metrics.render(&service.tasks.counts()),
            content_type: "text/plain; version=0.0.4",
        },
        ("GET", "/api/v1/health") => ok_json(&serde_json::json!({"status": "ok"})),
        (_, "/api/v1/conversions" | "/api/v1/notifications" | "/metrics" | "/api/v1/health") => {
            err(
                405,
                "METHOD_NOT_ALLOWED",
                format!("{method} is not allowed on {path}"),
            )
        }
        _ => err(404, "NOT_FOUND", format!("no endpoint {path}")),
    };
    if endpoint == "conversions" || endpoint == "notifications" {
        service.metrics.request(endpoint, reply.status);
    }
    if reply.status >= 400 {
        tracing::info!(method = %method, path, status = reply.status, body = %reply.body, "request refused");
    }
    reply
}

/// What became of one pushed image.
#[derive(serde::Serialize)]
struct Queued {
    source: String,
    /// `created`, `duplicate` or `skipped`.
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<Task>,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
}

/// Creates the tasks of `pushed` (all authorised already).
fn enqueue(service: &Service, origin: Origin, pushed: Vec<Pushed>) -> Result<Vec<Queued>, Reply> {
    let mut out = Vec::new();
    for p in pushed {
        let source = p.reference.to_string();
        match events::decide(&service.config, &p.reference) {
            Decision::Skip(why) => {
                service
                    .metrics
                    .events_skipped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(source, why, "pushed image not converted");
                out.push(Queued {
                    source,
                    result: "skipped",
                    task: None,
                    reason: why,
                });
            }
            Decision::Convert(target) => {
                let created = service
                    .tasks
                    .create(origin, &source, p.digest.as_deref(), &target.to_string())
                    .map_err(|e| err(500, "INTERNAL", crate::util::error_chain(&e)))?;
                match created {
                    Created::New(t) => {
                        service
                            .metrics
                            .tasks_created
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(task = %t.id, source, target = %t.target, "task queued");
                        out.push(Queued {
                            source,
                            result: "created",
                            task: Some(t),
                            reason: String::new(),
                        });
                    }
                    Created::Duplicate(t) => {
                        service.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(task = %t.id, source, "already a task for this image");
                        out.push(Queued {
                            source,
                            result: "duplicate",
                            task: Some(t),
                            reason: String::new(),
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

fn harbor(service: &Service, req: &http::Request, body: &[u8], query: &str) -> Reply {
    let sync = match query.split('&').find_map(|kv| kv.strip_prefix("sync=")) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return err(400, "BAD_REQUEST", format!("sync={v}: use true or false")),
    };
    if let Some(other) = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .find(|kv| !kv.starts_with("sync="))
    {
        return err(
            400,
            "BAD_REQUEST",
            format!("unknown query parameter {other:?}"),
        );
    }
    let pushed = match events::parse_harbor(body) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return ok_json(&serde_json::json!({"result": "ignored: not a PUSH_ARTIFACT event"}))
        }
        Err(e) => return err(400, "BAD_REQUEST", e),
    };
    // Every resource's registry is checked before anything is queued.
    let auth = header(req, "Authorization");
    for p in &pushed {
        let host = &p.reference.registry;
        let Some(r) = service.config.registries.get(host) else {
            return err(
                403,
                "FORBIDDEN",
                format!("registry {host} is not configured"),
            );
        };
        let Some(want) = &r.webhook_auth_header else {
            return err(
                403,
                "FORBIDDEN",
                format!("registry {host} has no webhook_auth_header: webhooks are refused"),
            );
        };
        if auth.as_deref() != Some(want.as_str()) {
            service.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            return err(
                401,
                "UNAUTHORIZED",
                format!("wrong or missing Authorization header for {host}"),
            );
        }
    }
    let queued = match enqueue(service, Origin::Harbor, pushed) {
        Ok(q) => q,
        Err(r) => return r,
    };
    if sync {
        let mut done = Vec::new();
        for q in &queued {
            if let Some(t) = &q.task {
                done.extend(service.tasks.wait(&t.id, SYNC_WAIT));
            }
        }
        return ok_json(&serde_json::json!({"queued": queued, "tasks": done}));
    }
    ok_json(&serde_json::json!({"queued": queued}))
}

fn notifications(service: &Service, req: &http::Request, body: &[u8]) -> Reply {
    let Some(cfg) = &service.config.notifications else {
        return err(404, "NOT_FOUND", "notifications are not configured");
    };
    if let Some(want) = &cfg.auth_header {
        if header(req, "Authorization").as_deref() != Some(want.as_str()) {
            service.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            return err(401, "UNAUTHORIZED", "wrong or missing Authorization header");
        }
    }
    if let Some(ct) = header(req, "Content-Type") {
        let mt = ct.split(';').next().unwrap_or("").trim();
        if !DISTRIBUTION_EVENTS.contains(&mt) && mt != "application/json" {
            return err(
                415,
                "UNSUPPORTED_MEDIA_TYPE",
                format!("{mt}: expected {}", DISTRIBUTION_EVENTS[0]),
            );
        }
    }
    let pushed = match events::parse_distribution(body, cfg.registry.as_deref()) {
        Ok(p) => p,
        Err(e) => return err(400, "BAD_REQUEST", e),
    };
    // Events for a registry not configured are answered (the registry would send them again
    // forever) and not acted on.
    let (known, unknown): (Vec<Pushed>, Vec<Pushed>) = pushed.into_iter().partition(|p| {
        service
            .config
            .registries
            .contains_key(&p.reference.registry)
    });
    for p in &unknown {
        tracing::warn!(source = %p.reference, "event for a registry not configured: ignored (set notifications.registry)");
    }
    match enqueue(service, Origin::Distribution, known) {
        Ok(q) => ok_json(
            &serde_json::json!({"queued": q, "ignored": unknown.iter().map(|p| p.reference.to_string()).collect::<Vec<_>>()}),
        ),
        Err(r) => r,
    }
}
