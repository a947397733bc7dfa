//! A small HTTP/1.1 server for the daemons' APIs (the nydusd API on its Unix socket, `skiff
//! accel`'s webhooks on TCP): a thread accepts, a thread per connection (up to a bound) reads
//! requests in turn and answers each before it reads the next, so that pipelined requests are
//! answered in order.
//!
//! The request head is parsed by `httparse`; the framing is here, and every part of it is
//! bounded before anything is allocated: the head ([`Limits::max_head`]), the body (a
//! `Content-Length`, or chunks, up to [`Limits::max_body`]), the time between reads
//! ([`Limits::idle`]) and the connections at once. A request that cannot be framed gets its
//! 4xx in turn and the connection is closed. It replaces tiny_http 0.12, in which a request
//! naming HTTP/2.0 deadlocked its connection, a failed expectation was answered out of turn, and
//! a refused request with a huge `Content-Length` aborted the process when it was dropped
//! (docs/fuzzing.md).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::threads::{self, ThreadKind};

/// Bounds on what one connection may send.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request head (request line and headers), in bytes.
    pub max_head: usize,
    /// Largest request body, in bytes.
    pub max_body: u64,
    /// Longest wait for the next bytes of a request, or for the next request.
    pub idle: Duration,
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

/// Headers a request may have.
const MAX_HEADERS: usize = 64;

/// Why a request was refused before it reached the routes. Each is answered with
/// [`HttpError::status`] and the connection is then closed (its framing is lost).
#[derive(Clone, Debug, thiserror::Error)]
pub enum HttpError {
    /// The request line or a header is not HTTP/1.x.
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
    /// The request line names a version other than HTTP/1.0 and HTTP/1.1.
    #[error("only HTTP/1.0 and HTTP/1.1 are served")]
    Version,
    /// The request head is larger than the limit.
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// More headers than [`MAX_HEADERS`].
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// A `Content-Length` that is not one decimal number, or several that differ.
    #[error("invalid Content-Length {0:?}")]
    BadContentLength(String),
    /// Both `Content-Length` and `Transfer-Encoding`: the framing is ambiguous.
    #[error("both Content-Length and Transfer-Encoding")]
    AmbiguousLength,
    /// A transfer coding other than `chunked`.
    #[error("unsupported Transfer-Encoding {0:?}: only chunked")]
    TransferEncoding(String),
    /// A malformed chunk of a chunked body.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    /// The body is larger than the limit.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// An `Expect` other than `100-continue`.
    #[error("unsupported expectation {0:?}")]
    Expectation(String),
    /// The client sent nothing more for [`Limits::idle`] in the middle of a request.
    #[error("the request was not sent in time")]
    Timeout,
    /// The connection ended in the middle of a request.
    #[error("the connection ended in the middle of a request")]
    Truncated,
    /// More connections than the bound at once.
    #[error("too many connections at once")]
    TooManyConnections,
}

impl HttpError {
    /// The status the request is answered with: 4xx, the request's fault (a version or a
    /// transfer coding not served too: 400 rather than 505 or 501, so that a 5xx always means
    /// the server's own trouble); 503 for a connection over the bound.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_)
            | HttpError::Version
            | HttpError::BadContentLength(_)
            | HttpError::AmbiguousLength
            | HttpError::BadChunk(_)
            | HttpError::TransferEncoding(_)
            | HttpError::Truncated => 400,
            HttpError::Timeout => 408,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::Expectation(_) => 417,
            HttpError::HeadTooLarge(_) | HttpError::TooManyHeaders => 431,
            HttpError::TooManyConnections => 503,
        }
    }
}

/// A request, read whole.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target: path and query, as sent.
    pub target: String,
    /// The headers, in order (values decoded lossily as UTF-8).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type (empty for none) and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, or empty for no such header.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

/// What answers requests: a request read whole, or why one could not be (answered, then the
/// connection is closed).
pub type Handler = dyn Fn(Result<Request, &HttpError>) -> Response + Send + Sync;

/// A listening socket the server accepts connections on.
pub trait Listen: AsRawFd + Send + Sync + 'static {
    /// A connection.
    type Conn: Conn;
    /// Waits for the next connection.
    fn accept_conn(&self) -> io::Result<Self::Conn>;
}

/// A connection: a stream with read timeouts.
pub trait Conn: Read + Write + Send + 'static {
    /// Bounds each read.
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    /// Bounds each write.
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    /// Ends the writing half (what is written is still delivered).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Listen for UnixListener {
    type Conn = UnixStream;
    fn accept_conn(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Conn for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, d)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl Listen for TcpListener {
    type Conn = TcpStream;
    fn accept_conn(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Conn for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, d)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// A running server: the accepting thread, until [`Server::stop`] or drop. Connections being
/// served finish their current request and end when their client closes or goes idle.
pub struct Server {
    stopping: Arc<AtomicBool>,
    listener_fd: std::os::fd::RawFd,
    // Keeps the listening socket open as long as `listener_fd` may be used.
    _listener: Arc<dyn Send + Sync>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts accepting on `listener`, answering with `handler`. Connection threads are
    /// started as threads of `kind` (their system call filter in a sandbox), or plain threads
    /// for `None`.
    pub fn start<L: Listen>(
        listener: L,
        name: &str,
        kind: Option<ThreadKind>,
        limits: Limits,
        handler: Arc<Handler>,
    ) -> io::Result<Server> {
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let listener_fd = listener.as_raw_fd();
        let thread = {
            let (listener, stopping, name) = (listener.clone(), stopping.clone(), name.to_owned());
            spawn(kind, format!("{name}-in"), move || {
                accept_loop(&*listener, &name, kind, limits, &handler, &stopping)
            })?
        };
        Ok(Server {
            stopping,
            listener_fd,
            _listener: listener,
            thread: Some(thread),
        })
    }

    /// Stops accepting and waits for the accepting thread.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // SAFETY: the descriptor is the listening socket's, open while `_listener` is held;
        // shutdown(2) on a listening socket only wakes a blocked accept(2) (with EINVAL).
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("an HTTP accepting thread panicked");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn<F>(kind: Option<ThreadKind>, name: String, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    match kind {
        Some(kind) => threads::spawn(kind, name, f),
        None => std::thread::Builder::new().name(name).spawn(f),
    }
}

fn accept_loop<L: Listen>(
    listener: &L,
    name: &str,
    kind: Option<ThreadKind>,
    limits: Limits,
    handler: &Arc<Handler>,
    stopping: &AtomicBool,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match listener.accept_conn() {
            Ok(c) => c,
            Err(_) if stopping.load(Ordering::Acquire) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                // Out of descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stopping.load(Ordering::Acquire) {
            return;
        }
        let _ = conn.set_write_timeout(Some(limits.idle));
        if open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            refuse(conn, &limits, &**handler, &HttpError::TooManyConnections);
            continue;
        }
        let (open2, handler) = (open.clone(), handler.clone());
        let spawned = spawn(kind, format!("{name}-conn"), move || {
            serve_connection(conn, &limits, &*handler);
            open2.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(error = %e, "cannot start an HTTP connection thread");
        }
    }
}

/// Answers a connection that is not served with `why`, and closes it.
fn refuse<C: Conn>(mut conn: C, limits: &Limits, handler: &Handler, why: &HttpError) {
    let response = handler(Err(why));
    if write_response(&mut conn, &response, false).is_ok() {
        linger_close(conn, limits);
    }
}

/// Serves requests on `conn` until the client closes it, goes idle, or sends a request that
/// cannot be framed.
pub fn serve_connection<C: Conn>(mut conn: C, limits: &Limits, handler: &Handler) {
    let _ = conn.set_read_timeout(Some(limits.idle));
    let mut reader = Buffered::default();
    loop {
        match read_request(&mut conn, &mut reader, limits) {
            Ok(None) => return,
            Ok(Some((request, keep_alive))) => {
                let response = handler(Ok(request));
                if write_response(&mut conn, &response, keep_alive).is_err() {
                    return;
                }
                if !keep_alive {
                    linger_close(conn, limits);
                    return;
                }
            }
            Err(ReadError::Gone) => return,
            Err(ReadError::Http(e)) => {
                tracing::debug!(error = %e, "HTTP request refused");
                let response = handler(Err(&e));
                if write_response(&mut conn, &response, false).is_ok() {
                    linger_close(conn, limits);
                }
                return;
            }
        }
    }
}

/// Most that is read and dropped after a refusal, and for how long.
const LINGER_BYTES: usize = 16 << 20;
const LINGER_TIME: Duration = Duration::from_secs(5);

/// Ends the writing half, then reads (and drops) what the client still sends, for a bounded
/// time and number of bytes, so that closing with unread bytes does not reset the connection
/// while the client is still sending a refused body, before it has read the answer.
fn linger_close<C: Conn>(mut conn: C, limits: &Limits) {
    let _ = conn.shutdown_write();
    let _ = conn.set_read_timeout(Some(limits.idle.min(Duration::from_secs(1))));
    let start = std::time::Instant::now();
    let mut sink = [0u8; 8192];
    let mut left = LINGER_BYTES;
    while left > 0 && start.elapsed() < LINGER_TIME {
        match conn.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

enum ReadError {
    /// The client closed or failed; nothing can be answered.
    Gone,
    /// A request that is refused: answer, then close.
    Http(HttpError),
}

/// Bytes read from the connection and not consumed yet.
#[derive(Default)]
struct Buffered {
    buf: Vec<u8>,
}

impl Buffered {
    /// Reads more from `conn` into the buffer: the number of bytes added (0 at the end).
    fn fill<C: Conn>(&mut self, conn: &mut C) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        loop {
            match conn.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes exactly `n` bytes (reading as needed).
    fn take<C: Conn>(&mut self, conn: &mut C, n: usize) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < n {
            self.fill_in_request(conn)?;
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    /// Takes one line ending in CRLF, without it, of at most `max` bytes.
    fn line<C: Conn>(&mut self, conn: &mut C, max: usize) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                if at > max {
                    break;
                }
                let mut line = self.take(conn, at + 2)?;
                line.truncate(at);
                return Ok(line);
            }
            if self.buf.len() > max + 2 {
                break;
            }
            self.fill_in_request(conn)?;
        }
        Err(ReadError::Http(HttpError::BadChunk("a line too long")))
    }

    /// [`Self::fill`] in the middle of a request: the end or a timeout is the request's fault.
    fn fill_in_request<C: Conn>(&mut self, conn: &mut C) -> Result<(), ReadError> {
        match self.fill(conn) {
            Ok(0) => Err(ReadError::Http(HttpError::Truncated)),
            Ok(_) => Ok(()),
            Err(e) if is_timeout(&e) => Err(ReadError::Http(HttpError::Timeout)),
            Err(_) => Err(ReadError::Gone),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// How the body of a request is framed.
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Reads the next request: `None` when the client closed (or went idle) between requests;
/// the request and whether the connection stays open after its answer.
fn read_request<C: Conn>(
    conn: &mut C,
    reader: &mut Buffered,
    limits: &Limits,
) -> Result<Option<(Request, bool)>, ReadError> {
    // The head, read until it parses whole.
    let (head_len, method, target, headers, http10) = loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut slots);
        match parsed.parse(&reader.buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).trim().to_owned(),
                        )
                    })
                    .collect();
                break (
                    n,
                    parsed.method.unwrap_or_default().to_owned(),
                    parsed.path.unwrap_or_default().to_owned(),
                    headers,
                    parsed.version == Some(0),
                );
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::Version) => return Err(ReadError::Http(HttpError::Version)),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ReadError::Http(HttpError::TooManyHeaders))
            }
            Err(e) => return Err(ReadError::Http(HttpError::Malformed(e))),
        }
        if reader.buf.len() >= limits.max_head {
            return Err(ReadError::Http(HttpError::HeadTooLarge(limits.max_head)));
        }
        match reader.fill(conn) {
            Ok(0) if reader.buf.is_empty() => return Ok(None),
            Ok(0) => return Err(ReadError::Http(HttpError::Truncated)),
            Ok(_) => {}
            Err(e) if is_timeout(&e) && reader.buf.is_empty() => return Ok(None),
            Err(e) if is_timeout(&e) => return Err(ReadError::Http(HttpError::Timeout)),
            Err(_) => return Err(ReadError::Gone),
        }
    };
    if head_len > limits.max_head {
        return Err(ReadError::Http(HttpError::HeadTooLarge(limits.max_head)));
    }
    reader.buf.drain(..head_len);
    let header = |name: &'static str| values(&headers, name);

    let framing =
        framing(header("content-length"), header("transfer-encoding")).map_err(ReadError::Http)?;
    if let Framing::Length(n) = framing {
        if n > limits.max_body {
            return Err(ReadError::Http(HttpError::BodyTooLarge(limits.max_body)));
        }
    }
    // The connection's fate: HTTP/1.1 stays open unless told to close, HTTP/1.0 closes unless
    // told to stay.
    let tokens = |v: &str| {
        v.split(',')
            .map(|t| t.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let connection: Vec<String> = header("connection").flat_map(tokens).collect();
    let keep_alive = if http10 {
        connection.iter().any(|t| t == "keep-alive")
    } else {
        !connection.iter().any(|t| t == "close")
    };
    let mut continue_ok = false;
    for expect in header("expect") {
        if expect.eq_ignore_ascii_case("100-continue") {
            continue_ok = true;
        } else {
            return Err(ReadError::Http(HttpError::Expectation(expect.to_owned())));
        }
    }
    let has_body = !matches!(framing, Framing::None | Framing::Length(0));
    if continue_ok && has_body && !http10 && reader.buf.is_empty() {
        // The client waits for this before it sends the body.
        if conn
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|_| conn.flush())
            .is_err()
        {
            return Err(ReadError::Gone);
        }
    }
    let body = match framing {
        Framing::None => Vec::new(),
        Framing::Length(n) => {
            // Bounded by `max_body` above, which fits in memory.
            let n = usize::try_from(n)
                .map_err(|_| ReadError::Http(HttpError::BodyTooLarge(limits.max_body)))?;
            reader.take(conn, n)?
        }
        Framing::Chunked => read_chunked(conn, reader, limits)?,
    };
    Ok(Some((
        Request {
            method,
            target,
            headers,
            body,
        },
        keep_alive,
    )))
}

/// The values of every header named `name` (case-insensitive).
fn values<'a>(headers: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The framing the headers give the body (RFC 9112 §6.3): `Transfer-Encoding: chunked`, one
/// `Content-Length` (repeated values must agree), or none.
fn framing<'a>(
    lengths: impl Iterator<Item = &'a str>,
    mut codings: impl Iterator<Item = &'a str>,
) -> Result<Framing, HttpError> {
    let mut length: Option<u64> = None;
    for value in lengths {
        for v in value.split(',').map(str::trim) {
            let n = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                v.parse::<u64>().ok()
            } else {
                None
            };
            // A number too large for u64 is still a number: larger than any limit.
            let n = match n {
                Some(n) => n,
                None if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => u64::MAX,
                None => return Err(HttpError::BadContentLength(value.to_owned())),
            };
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::BadContentLength(value.to_owned()));
            }
            length = Some(n);
        }
    }
    if let Some(coding) = codings.next() {
        if length.is_some() {
            return Err(HttpError::AmbiguousLength);
        }
        let all: Vec<String> = std::iter::once(coding)
            .chain(codings)
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        return match all.as_slice() {
            [only] if only == "chunked" => Ok(Framing::Chunked),
            _ => Err(HttpError::TransferEncoding(all.join(", "))),
        };
    }
    Ok(length.map_or(Framing::None, Framing::Length))
}

/// A chunked body: chunks of a hexadecimal size (extensions ignored), a last chunk of size 0,
/// trailers (ignored), all within the limits.
fn read_chunked<C: Conn>(
    conn: &mut C,
    reader: &mut Buffered,
    limits: &Limits,
) -> Result<Vec<u8>, ReadError> {
    let bad = |why| ReadError::Http(HttpError::BadChunk(why));
    let mut body = Vec::new();
    loop {
        let line = reader.line(conn, 1024)?;
        let size = line.split(|b| *b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size).map_err(|_| bad("a size that is not hexadecimal"))?;
        let size = size.trim();
        if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("a size that is not hexadecimal"));
        }
        let size = u64::from_str_radix(size, 16).map_err(|_| bad("a size out of range"))?;
        if size == 0 {
            break;
        }
        if (body.len() as u64).saturating_add(size) > limits.max_body {
            return Err(ReadError::Http(HttpError::BodyTooLarge(limits.max_body)));
        }
        // At most `max_body` here.
        let size = usize::try_from(size).map_err(|_| bad("a size out of range"))?;
        body.extend(reader.take(conn, size)?);
        if !reader.take(conn, 2)?.eq(b"\r\n") {
            return Err(bad("a chunk not ended by CRLF"));
        }
    }
    // Trailers, up to the empty line; bounded like the head.
    let mut trailers = 0usize;
    loop {
        let line = reader.line(conn, limits.max_head)?;
        if line.is_empty() {
            return Ok(body);
        }
        trailers += line.len() + 2;
        if trailers > limits.max_head {
            return Err(ReadError::Http(HttpError::HeadTooLarge(limits.max_head)));
        }
    }
}

/// Writes `response`, with its length, and `Connection: close` unless `keep_alive`.
fn write_response<C: Conn>(conn: &mut C, response: &Response, keep_alive: bool) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    // A 204 has no body, and says nothing of its length (RFC 9110 §8.6).
    if response.status != 204 {
        head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    }
    if !response.content_type.is_empty() {
        head.push_str(&format!("Content-Type: {}\r\n", response.content_type));
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = head.into_bytes();
    out.extend_from_slice(&response.body);
    conn.write_all(&out)?;
    conn.flush()
}

/// The reason phrase of `status` (informative only).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_LIMITS: Limits = Limits {
        max_head: 4096,
        max_body: 64,
        idle: Duration::from_secs(5),
        max_connections: 4,
    };

    /// Answers with the method, target and body echoed, or the refusal's status.
    fn echo(request: Result<Request, &HttpError>) -> Response {
        match request {
            Ok(r) => Response {
                status: 200,
                content_type: "text/plain".into(),
                body: format!(
                    "{} {} {}",
                    r.method,
                    r.target,
                    String::from_utf8_lossy(&r.body)
                )
                .into_bytes(),
            },
            Err(e) => Response {
                status: e.status(),
                content_type: String::new(),
                body: e.to_string().into_bytes(),
            },
        }
    }

    /// Sends `input` on a fresh connection (then ends its writing half) and returns every
    /// byte answered, within the limits' idle time.
    fn exchange(input: &[u8]) -> String {
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        let t = std::thread::spawn(move || serve_connection(server, &TEST_LIMITS, &echo));
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = client.write_all(input);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        client
            .read_to_end(&mut out)
            .expect("an answer before the timeout");
        t.join().expect("the connection thread");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The status codes of the responses in `answer`, in order.
    fn statuses(answer: &str) -> Vec<u16> {
        answer
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| answer.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_and_kept_alive() {
        let answer = exchange(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /b?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz\
              GET /c HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(statuses(&answer), [200, 200, 200], "{answer}");
        let a = answer.find("GET /a ").expect("first");
        let b = answer
            .find("POST /b?q=1 xyz")
            .expect("second with its body");
        let c = answer.find("GET /c ").expect("third");
        assert!(a < b && b < c, "{answer}");
        assert!(answer.contains("Connection: keep-alive"), "{answer}");
    }

    #[test]
    fn a_version_other_than_1_0_and_1_1_is_a_400_in_turn() {
        for version in ["HTTP/2.0", "HTTP/1.2", "HTTP/3.0"] {
            let input =
                format!("GET /a HTTP/1.1\r\n\r\nGET /b {version}\r\n\r\nGET /c HTTP/1.1\r\n\r\n");
            let answer = exchange(input.as_bytes());
            assert_eq!(statuses(&answer), [200, 400], "{version}: {answer}");
            assert!(answer.contains("only HTTP/1.0 and HTTP/1.1"), "{answer}");
        }
    }

    #[test]
    fn a_failed_expectation_is_a_417_in_turn_and_closes() {
        let answer = exchange(
            b"GET /a HTTP/1.1\r\n\r\n\
              PUT /b HTTP/1.1\r\nExpect: 200-continue\r\nContent-Length: 2\r\n\r\n{}\
              GET /c HTTP/1.1\r\n\r\n",
        );
        assert_eq!(statuses(&answer), [200, 417], "{answer}");
        assert!(answer.find("GET /a").expect("first") < answer.find("417").expect("417"));
    }

    #[test]
    fn a_continue_is_sent_before_the_body_is_read() {
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        let t = std::thread::spawn(move || serve_connection(server, &TEST_LIMITS, &echo));
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        client
            .write_all(b"PUT /b HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .expect("head");
        let mut interim = [0u8; 25];
        client.read_exact(&mut interim).expect("100 Continue");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"{}").expect("body");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut out = String::new();
        client.read_to_string(&mut out).expect("answer");
        t.join().expect("the connection thread");
        assert_eq!(statuses(&out), [200], "{out}");
        assert!(out.ends_with("PUT /b {}"), "{out}");
    }

    #[test]
    fn a_body_over_the_limit_is_a_413_without_reading_it() {
        for length in [
            "65",
            "3260171443257271182",
            "0000000000000000003260171443257271182",
            "99999999999999999999999999",
        ] {
            let input = format!(
                "GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: {length}\r\n\r\nabc"
            );
            let answer = exchange(input.as_bytes());
            assert_eq!(statuses(&answer), [200, 413], "{length}: {answer}");
        }
        // Chunked, over the limit in its second chunk.
        let answer = exchange(
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n\
              aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\nffffffffffffffff\r\n",
        );
        assert_eq!(statuses(&answer), [413], "{answer}");
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let answer = exchange(
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
        );
        assert_eq!(statuses(&answer), [200, 200], "{answer}");
        assert!(answer.contains("POST /b abcde"), "{answer}");
    }

    #[test]
    fn ambiguous_or_malformed_framing_is_a_400() {
        for head in [
            "Content-Length: 2\r\nTransfer-Encoding: chunked",
            "Content-Length: 2\r\nContent-Length: 3",
            "Content-Length: -1",
            "Content-Length: 0x10",
            "Transfer-Encoding: gzip",
        ] {
            let input = format!("POST /b HTTP/1.1\r\n{head}\r\n\r\nab");
            let answer = exchange(input.as_bytes());
            assert_eq!(statuses(&answer), [400], "{head}: {answer}");
        }
        let answer = exchange(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert_eq!(statuses(&answer), [400], "{answer}");
        let answer = exchange(b"G\0T / HTTP/1.1\r\n\r\n");
        assert_eq!(statuses(&answer), [400], "{answer}");
    }

    #[test]
    fn a_head_over_the_limit_is_a_431() {
        let input = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(5000));
        assert_eq!(statuses(&exchange(input.as_bytes())), [431]);
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        let input = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(statuses(&exchange(input.as_bytes())), [431]);
    }

    #[test]
    fn a_truncated_request_is_a_400_and_http_1_0_closes() {
        let answer = exchange(b"POST /b HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
        assert_eq!(statuses(&answer), [400], "{answer}");
        let answer = exchange(b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n");
        assert_eq!(statuses(&answer), [200], "{answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
        let answer = exchange(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\nGET /c HTTP/1.1\r\n\r\n");
        assert_eq!(statuses(&answer), [200, 200], "{answer}");
    }

    #[test]
    fn the_server_refuses_connections_over_the_bound_and_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let mut server =
            Server::start(listener, "test-http", None, TEST_LIMITS, Arc::new(echo)).expect("start");
        // The bound's worth of idle connections, each answered once first so that it is
        // being served.
        let mut held = Vec::new();
        for _ in 0..TEST_LIMITS.max_connections {
            let mut c = UnixStream::connect(&path).expect("connect");
            c.write_all(b"GET /x HTTP/1.1\r\n\r\n").expect("write");
            let mut buf = [0u8; 12];
            c.read_exact(&mut buf).expect("answer");
            assert_eq!(&buf, b"HTTP/1.1 200");
            held.push(c);
        }
        let mut over = UnixStream::connect(&path).expect("connect");
        over.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut answer = String::new();
        over.read_to_string(&mut answer).expect("503 and close");
        assert_eq!(statuses(&answer), [503], "{answer}");
        drop(held);
        server.stop();
        assert!(
            UnixStream::connect(&path)
                .and_then(|mut c| {
                    c.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
                    let mut b = [0u8; 1];
                    c.read(&mut b)
                })
                .map_or(true, |n| n == 0),
            "nothing is answered once stopped"
        );
    }
}
