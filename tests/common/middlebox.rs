//! A small HTTP middlebox for tests: a proxy on 127.0.0.1 that forwards each request, answers
//! it itself, or forwards it with a fault (reset, truncated or bit-flipped body, stall), as a
//! test's `decide` function says. Used between Skiff and a registry or an S3 server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the middlebox does with one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Forward upstream untouched.
    Pass,
    /// Answer with these bytes (a whole HTTP response) without forwarding.
    Respond(Vec<u8>),
    /// Close the connection after reading the request.
    Reset,
    /// Forward, then cut the body in half.
    Truncate,
    /// Forward, then flip one bit in the middle of the body.
    BitFlip,
    /// Wait this long, then forward.
    Stall(Duration),
}

pub type Decide = dyn Fn(u64, &str) -> Action + Send + Sync;

pub struct Middlebox {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Requests seen so far.
    pub requests: Arc<AtomicU64>,
}

impl Middlebox {
    /// Listens on 127.0.0.1; `decide(n, head)` picks the action for the n-th request.
    /// `upstream` is the port forwarded requests go to.
    pub fn start(upstream: u16, decide: Arc<Decide>) -> Middlebox {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match l.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let (c, d) = (c.clone(), decide.clone());
                        std::thread::spawn(move || serve_one(conn, upstream, &c, &*d));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Middlebox {
            port,
            stop,
            requests,
        }
    }

    /// `127.0.0.1:PORT` of the middlebox.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Middlebox {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads an HTTP head (up to the blank line) from `s`.
pub fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 || head.len() > 64 << 10 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

/// A header's value in an HTTP head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Rewrites an HTTP head to say `Connection: close`.
pub fn close_head(head: &[u8]) -> String {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect::<String>()
        + "Connection: close\r\n\r\n"
}

/// Serves the requests of one connection (keep-alive: each in turn, until the client closes).
fn serve_one(mut client: TcpStream, upstream: u16, count: &AtomicU64, decide: &Decide) {
    client.set_read_timeout(Some(Duration::from_secs(10))).ok();
    // Every forwarded reply says `Connection: close`, so one request per connection.
    let Some(head) = read_head(&mut client) else {
        return;
    };
    let n = count.fetch_add(1, Ordering::Relaxed);
    let text = String::from_utf8_lossy(&head).into_owned();
    let action = decide(n, &text);
    match &action {
        Action::Respond(bytes) => {
            let _ = client.write_all(bytes);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Action::Reset => {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Action::Stall(d) => std::thread::sleep(*d),
        _ => {}
    }
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    if up.write_all(close_head(&head).as_bytes()).is_err() {
        return;
    }
    // A request body (an upload) goes along as it is.
    let len: u64 = header(&text, "Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if len > 0 && std::io::copy(&mut (&mut client).take(len), &mut up).ok() != Some(len) {
        return;
    }
    let mut reply = Vec::new();
    let _ = up.read_to_end(&mut reply);
    let Some(split) = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
    else {
        return;
    };
    let (rhead, body) = reply.split_at(split);
    let mut body = body.to_vec();
    match action {
        Action::Truncate => body.truncate(body.len() / 2),
        Action::BitFlip => {
            let mid = body.len() / 2;
            if let Some(b) = body.get_mut(mid) {
                *b ^= 0x01;
            }
        }
        _ => {}
    }
    let _ = client.write_all(close_head(rhead).as_bytes());
    let _ = client.write_all(&body);
    let _ = client.shutdown(Shutdown::Both);
}

/// A whole HTTP response with a body, saying `Connection: close`.
pub fn http_response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("Connection: close\r\n\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}
