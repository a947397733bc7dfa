//! The HTTP API (tiny_http, as `api/` uses), one thread per request up to a bound:
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

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::events::{self, Decision, Origin, Pushed, DISTRIBUTION_EVENTS};
use super::tasks::{Created, Task};
use super::{AccelError, Service};

/// Largest request body read (a webhook payload or an events envelope is a few KiB).
pub const MAX_BODY_BYTES: u64 = 1 << 20;
/// Requests handled at once; more get 503.
const MAX_IN_FLIGHT: usize = 32;
/// How long `?sync=true` waits for its conversions.
const SYNC_WAIT: Duration = Duration::from_secs(3600);

/// The listening server.
pub struct HttpServer {
    server: Arc<tiny_http::Server>,
    addr: String,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on the service's `listen` address and answers until [`HttpServer::shutdown`].
    pub fn start(service: Arc<Service>) -> Result<Self, AccelError> {
        let listen = service.config.listen.clone();
        let server =
            Arc::new(
                tiny_http::Server::http(&listen).map_err(|e| AccelError::Listen {
                    addr: listen.clone(),
                    why: e.to_string(),
                })?,
            );
        let addr = server
            .server_addr()
            .to_ip()
            .map(|a| a.to_string())
            .unwrap_or(listen);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("accel-http".into())
            .spawn(move || accept(&s, &service))
            .map_err(|e| AccelError::Io {
                op: "starting the HTTP thread",
                path: "-".into(),
                source: e,
            })?;
        Ok(Self {
            server,
            addr,
            thread: Some(thread),
        })
    }

    /// The address listened on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops accepting requests.
    pub fn shutdown(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept(server: &tiny_http::Server, service: &Arc<Service>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    for request in server.incoming_requests() {
        if service.stopping() {
            let _ = request.respond(json_response(
                503,
                &error_body("STOPPING", "the service is stopping"),
            ));
            break;
        }
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let _ = request.respond(json_response(
                503,
                &error_body("BUSY", "too many requests at once"),
            ));
            continue;
        }
        let (s, n) = (service.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new()
            .name("accel-request".into())
            .spawn(move || {
                handle(request, &s);
                n.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(error = %e, "cannot start a request thread");
        }
    }
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

fn json_response(status: u16, body: &str) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    response(status, body, "application/json")
}

fn response(
    status: u16,
    body: &str,
    content_type: &str,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let mut r = tiny_http::Response::from_string(body).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()) {
        r = r.with_header(h);
    }
    r
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

fn header(req: &tiny_http::Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

fn handle(mut req: tiny_http::Request, service: &Service) {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let method = req.method().clone();
    let endpoint = match path {
        "/api/v1/conversions" => "conversions",
        "/api/v1/notifications" => "notifications",
        "/metrics" => "metrics",
        "/api/v1/health" => "health",
        _ => "other",
    };
    let reply = match (&method, path) {
        (tiny_http::Method::Post, "/api/v1/conversions") => match read_body(&mut req) {
            Ok(body) => harbor(service, &req, &body, query),
            Err(r) => r,
        },
        (tiny_http::Method::Post, "/api/v1/notifications") => match read_body(&mut req) {
            Ok(body) => notifications(service, &req, &body),
            Err(r) => r,
        },
        (tiny_http::Method::Get, "/api/v1/conversions") => ok_json(&service.tasks.list()),
        (tiny_http::Method::Get, "/metrics") => Reply {
            status: 200,
            body: service.metrics.render(&service.tasks.counts()),
            content_type: "text/plain; version=0.0.4",
        },
        (tiny_http::Method::Get, "/api/v1/health") => ok_json(&serde_json::json!({"status": "ok"})),
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
    let _ = req.respond(response(reply.status, &reply.body, reply.content_type));
}

fn read_body(req: &mut tiny_http::Request) -> Result<Vec<u8>, Reply> {
    if req.body_length().is_some_and(|n| n as u64 > MAX_BODY_BYTES) {
        return Err(err(
            413,
            "TOO_LARGE",
            format!("bodies are at most {MAX_BODY_BYTES} bytes"),
        ));
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| err(400, "BAD_REQUEST", format!("reading the body: {e}")))?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(err(
            413,
            "TOO_LARGE",
            format!("bodies are at most {MAX_BODY_BYTES} bytes"),
        ));
    }
    Ok(body)
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

fn harbor(service: &Service, req: &tiny_http::Request, body: &[u8], query: &str) -> Reply {
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

fn notifications(service: &Service, req: &tiny_http::Request, body: &[u8]) -> Reply {
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
