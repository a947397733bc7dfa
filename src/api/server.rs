//! The transport: HTTP/1.1 on a Unix socket (mode 0600), served by `tiny_http` on one thread.
//! Requests are read here (with a size limit) and answered by [`super::routes::handle`].

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::routes::{self, ApiRequest, ApiResponse};
use super::ApiError;
use crate::daemon::Daemon;

/// Largest request body accepted (a mount request with its nydusd config is a few KiB).
pub const MAX_BODY_BYTES: u64 = 1 << 20;

/// How often the serving thread checks whether it should stop.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The API server: a thread answering requests on a Unix socket until [`ApiServer::shutdown`]
/// or drop, which also remove the socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Creates the socket at `path` (replacing a stale socket, refusing any other file),
    /// restricts it to its owner and starts answering requests for `daemon`.
    pub fn start(path: &Path, daemon: Arc<Daemon>) -> Result<ApiServer, ApiError> {
        let listener = bind(path)?;
        let server =
            tiny_http::Server::from_listener(listener, None).map_err(|e| ApiError::Listen {
                path: path.to_owned(),
                source: io::Error::other(e.to_string()),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("skiff-api".to_owned())
                .spawn(move || serve(&server, &daemon, &stop))
                .map_err(ApiError::SpawnThread)?
        };
        tracing::info!(socket = %path.display(), "API listening");
        Ok(ApiServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops answering, waits for the serving thread and removes the socket.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the API thread panicked");
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Dropping tiny_http's server (in the thread) removes the socket file.
        self.stop_and_join();
    }
}

fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            tracing::info!(socket = %path.display(), "removing stale API socket");
            fs::remove_file(path).map_err(|source| ApiError::Listen {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(ApiError::SocketPathInUse(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Listen {
        path: path.to_owned(),
        source,
    })?;
    // Connecting needs write permission: with the usual umask nobody else has it already;
    // 0600 makes it so whatever the umask.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Listen {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

fn serve(server: &tiny_http::Server, daemon: &Daemon, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let mut request = match server.recv_timeout(POLL_INTERVAL) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
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
