//! The transport: HTTP/1.1 on a Unix socket (mode 0600), served by [`crate::runtime::http`]
//! (the head, framing and body of each request bounded; a request that cannot be read gets its
//! 4xx). Requests are answered by [`super::routes::handle`] one at a time, in the order they
//! arrive, on one thread of kind [`ThreadKind::Api`]; the accepting and connection threads are
//! of that kind too.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::routes::{self, ApiRequest, ApiResponse};
use super::ApiError;
use crate::daemon::Daemon;
use crate::runtime::http::{self, Limits};
use crate::runtime::threads::{self, ThreadKind};
use crate::runtime::UnixSocketFile;

/// Largest request body accepted (a mount request with its nydusd config is a few KiB).
pub const MAX_BODY_BYTES: u64 = 1 << 20;

/// The bounds of one API connection: a request head of 64 KiB (a mountpoint in the query),
/// a body of [`MAX_BODY_BYTES`], 5 minutes idle (a client keeps its connection between calls),
/// 64 connections at once.
const LIMITS: Limits = Limits {
    max_head: 64 << 10,
    max_body: MAX_BODY_BYTES,
    idle: Duration::from_secs(300),
    max_connections: 64,
};

/// A request for the serving thread, with where its answer goes; `None` stops it.
type Job = Option<(Result<ApiRequest, ApiError>, SyncSender<ApiResponse>)>;

/// The API server: a thread answering requests on a Unix socket until [`ApiServer::shutdown`]
/// or drop, which also remove the socket file.
pub struct ApiServer {
    http: Option<http::Server>,
    jobs: Sender<Job>,
    thread: Option<JoinHandle<()>>,
    /// Declared last: dropped after the server, it removes the socket file.
    socket: UnixSocketFile,
}

impl ApiServer {
    /// Creates the socket at `path` (replacing a stale socket, refusing a live one or any
    /// other file), restricts it to its owner and starts answering requests for `daemon`.
    pub fn start(path: &Path, daemon: Arc<Daemon>) -> Result<ApiServer, ApiError> {
        let mut socket = UnixSocketFile::bind(path, Some(0o600))?;
        let listen_err = |e: std::io::Error| ApiError::Listen {
            path: path.to_owned(),
            source: e,
        };
        let listener = socket
            .take_listener()
            .ok_or_else(|| listen_err(std::io::Error::other("the socket has no listener")))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = threads::spawn(ThreadKind::Api, "skiff-api", move || serve(&queue, &daemon))
            .map_err(ApiError::SpawnThread)?;
        let to_serve = jobs.clone();
        let handler = move |request: Result<http::Request, &http::HttpError>| {
            let request = match request {
                Ok(r) => Ok(ApiRequest {
                    method: r.method,
                    url: r.target,
                    body: r.body,
                }),
                Err(e) => Err(ApiError::Http(e.clone())),
            };
            let (reply, answer) = mpsc::sync_channel(1);
            let unavailable =
                || ApiResponse::error(&ApiError::Http(http::HttpError::TooManyConnections));
            let response = if to_serve.send(Some((request, reply))).is_ok() {
                answer.recv().unwrap_or_else(|_| unavailable())
            } else {
                unavailable()
            };
            http::Response {
                status: response.status,
                content_type: response.content_type.to_owned(),
                body: response.body,
            }
        };
        let http = http::Server::start(
            listener,
            "skiff-api",
            Some(ThreadKind::Api),
            LIMITS,
            Arc::new(handler),
        )
        .map_err(listen_err)?;
        tracing::info!(socket = %path.display(), "API listening");
        Ok(ApiServer {
            http: Some(http),
            jobs,
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
        if let Some(mut http) = self.http.take() {
            http.stop();
        }
        let _ = self.jobs.send(None);
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

/// Answers requests, one at a time, until [`ApiServer::shutdown`].
fn serve(queue: &Receiver<Job>, daemon: &Daemon) {
    while let Ok(Some((request, reply))) = queue.recv() {
        let response = match request {
            Ok(request) => {
                let response = routes::handle(daemon, &request);
                tracing::debug!(method = %request.method, url = %request.url, status = response.status, "API request");
                response
            }
            Err(e) => {
                daemon.fs.counters().api_request(true);
                tracing::warn!(error = %crate::util::error_chain(&e), "API request refused");
                ApiResponse::error(&e)
            }
        };
        let _ = reply.send(response);
    }
}
