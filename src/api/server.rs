//! The transport: HTTP/1.1 on a Unix socket (mode 0600), served by `tiny_http`. Requests are
//! read here (with a size limit) and answered by [`super::routes::handle`], on one thread of
//! kind [`ThreadKind::Api`] (tiny_http's own accept and connection threads start from it).

use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::routes::{self, ApiRequest, ApiResponse};
use super::ApiError;
use crate::daemon::Daemon;
use crate::runtime::threads::{self, ThreadKind};
use crate::runtime::UnixSocketFile;

/// Largest request body accepted (a mount request with its nydusd config is a few KiB).
pub const MAX_BODY_BYTES: u64 = 1 << 20;

/// The API server: a thread answering requests on a Unix socket until [`ApiServer::shutdown`]
/// or drop, which also remove the socket file.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Declared last: dropped after the server, it wakes tiny_http's accept thread and
    /// removes the socket file.
    socket: UnixSocketFile,
}

impl ApiServer {
    /// Creates the socket at `path` (replacing a stale socket, refusing a live one or any
    /// other file), restricts it to its owner and starts answering requests for `daemon`.
    pub fn start(path: &Path, daemon: Arc<Daemon>) -> Result<ApiServer, ApiError> {
        let mut socket = UnixSocketFile::bind(path, Some(0o600))?;
        let listen_err = |e: String| ApiError::Listen {
            path: path.to_owned(),
            source: io::Error::other(e),
        };
        let listener = socket
            .take_listener()
            .ok_or_else(|| listen_err("the socket has no listener".into()))?;
        let stopping = Arc::new(AtomicBool::new(false));
        // The server is made on the API thread, so that the threads tiny_http starts
        // (accepting, reading connections) are born from a thread of kind Api and carry its
        // system call filter in a sandbox.
        let (made, server) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let stopping = stopping.clone();
            threads::spawn(ThreadKind::Api, "skiff-api", move || {
                let server = match tiny_http::Server::from_listener(listener, None) {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        let _ = made.send(Err(e.to_string()));
                        return;
                    }
                };
                if made.send(Ok(server.clone())).is_err() {
                    return;
                }
                serve(&server, &daemon, &stopping)
            })
            .map_err(ApiError::SpawnThread)?
        };
        let server = match server.recv() {
            Ok(Ok(server)) => server,
            Ok(Err(e)) => return Err(listen_err(e)),
            Err(_) => return Err(listen_err("the API thread ended before serving".into())),
        };
        tracing::info!(socket = %path.display(), "API listening");
        Ok(ApiServer {
            server,
            stopping,
            thread: Some(thread),
            socket,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Stops answering, waits for the serving thread and removes the socket.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the API thread panicked");
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Answers requests until [`ApiServer::shutdown`] unblocks it.
fn serve(server: &tiny_http::Server, daemon: &Daemon, stopping: &AtomicBool) {
    loop {
        let mut request = match server.recv() {
            Ok(r) => r,
            Err(_) if stopping.load(Ordering::Acquire) => return,
            Err(e) => {
                tracing::warn!(error = %e, "API connection failed");
                continue;
            }
        };
        let response = match read_body(&mut request) {
            Ok(body) => routes::handle(
                daemon,
                &ApiRequest {
                    method: request.method().as_str().to_owned(),
                    url: request.url().to_owned(),
                    body,
                },
            ),
            Err(e) => {
                daemon.fs.counters().api_request(true);
                ApiResponse::error(&e)
            }
        };
        tracing::debug!(method = %request.method(), url = %request.url(), status = response.status, "API request");
        if let Err(e) = respond(request, response) {
            tracing::warn!(error = %e, "writing an API response failed");
        }
    }
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, ApiError> {
    if request
        .body_length()
        .is_some_and(|n| n as u64 > MAX_BODY_BYTES)
    {
        return Err(ApiError::BodyTooLarge(MAX_BODY_BYTES));
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(ApiError::ReadBody)?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(ApiError::BodyTooLarge(MAX_BODY_BYTES));
    }
    Ok(body)
}

fn respond(request: tiny_http::Request, response: ApiResponse) -> io::Result<()> {
    if response.body.is_empty() {
        return request.respond(tiny_http::Response::empty(response.status));
    }
    let mut r = tiny_http::Response::from_data(response.body).with_status_code(response.status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], response.content_type) {
        r = r.with_header(h);
    }
    request.respond(r)
}
