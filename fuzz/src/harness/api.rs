//! Target `api`: nydusd's HTTP API as the Kata and snapshotter daemons serve it
//! (`api::ApiServer`: HTTP/1.1 on a Unix socket through `runtime::http`, then `api::routes`).
//!
//! The input is raw bytes written to a fresh connection: request lines, headers, paths, query
//! strings and bodies, one request or several. The seeds are the requests nydus-snapshotter
//! and Kata make (mounts of a Skiff and a v6 image and of a passthrough share, unmounts,
//! daemon info, every metrics route, credential renewal, the failover calls) and some refused
//! ones. [`PLACEHOLDER`] in an input stands for the fixture's directory (same length, so that
//! `Content-Length` stays right): the seeds' mounts then find real images.
//!
//! The daemon's tree is the Kata layout; its life cycle is a stand-in that changes nothing,
//! so that an `exit` leaves the next input the same daemon. After each input every mount is
//! removed. The API thread, and every thread a mount starts (prefetch, fetchers), runs in a
//! network namespace of its own with no interface up: a configuration naming a registry
//! reaches nothing, on this machine or beyond. Every `work_dir` an input names is pointed into
//! the fixture's directory before it is sent, so that no mount creates a cache anywhere else.
//!
//! What must hold: the daemon never panics or stops answering; every answer comes within the
//! deadline and is an HTTP/1.1 response; an error response carries `{"code", "message"}`; a
//! 5xx is a fault of the daemon's, never the answer to a malformed request.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skiff::api::ApiServer;
use skiff::daemon::{Daemon, DaemonFs, Lifecycle, LifecycleError};

use super::Outcome;

/// Stands for the fixture's directory in inputs: as long as its path.
pub const PLACEHOLDER: &[u8] = b"@@SKIFF-FUZZ-DIR@@@@";
/// How long one input's answers may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A life cycle that records nothing and changes nothing.
struct StandIn;

impl Lifecycle for StandIn {
    fn send_fd(&self) -> Result<(), LifecycleError> {
        Err(LifecycleError::NoSupervisor)
    }
    fn takeover(&self) -> Result<(), LifecycleError> {
        Err(LifecycleError::NoSupervisor)
    }
    fn start(&self) -> Result<(), LifecycleError> {
        Ok(())
    }
    fn exit(&self) -> Result<(), LifecycleError> {
        Ok(())
    }
}

/// The daemon and its API server, shared by every iteration.
pub struct Fixture {
    daemon: Arc<Daemon>,
    socket: PathBuf,
    dir: tempfile::TempDir,
    _server: ApiServer,
}

impl Fixture {
    /// Copies the seed images into a directory whose path is as long as [`PLACEHOLDER`], and
    /// starts the API server in a network namespace of its own. Needs root (the namespace).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-fuzz-")
            .rand_bytes(PLACEHOLDER.len() - "/tmp/skiff-fuzz-".len())
            .tempdir_in("/tmp")
            .expect("the fixture's directory");
        assert_eq!(
            dir.path().as_os_str().len(),
            PLACEHOLDER.len(),
            "the fixture's directory has the placeholder's length"
        );
        let seeds = super::seeds_dir();
        let copy = |from: &std::path::Path, to: &std::path::Path| {
            std::fs::create_dir_all(to).expect("mkdir");
            for e in std::fs::read_dir(from).expect("seed dir").flatten() {
                std::fs::copy(e.path(), to.join(e.file_name())).expect("copy a seed");
            }
        };
        copy(&seeds.join("bootstrap"), &dir.path().join("images"));
        copy(&seeds.join("blobs"), &dir.path().join("blobs"));
        std::fs::create_dir_all(dir.path().join("shared")).expect("mkdir shared");
        std::fs::write(dir.path().join("shared/file"), b"shared\n").expect("shared file");

        let daemon = Arc::new(Daemon {
            fs: Arc::new(DaemonFs::kata()),
            id: Some("skiff-fuzz".into()),
            supervisor: None,
            lifecycle: Arc::new(StandIn),
        });
        let socket = dir.path().join("api.sock");
        let (d, s) = (daemon.clone(), socket.clone());
        // The server's threads, and those its mounts start, inherit this thread's namespace.
        let server = std::thread::spawn(move || {
            // SAFETY: unshare has no memory-safety preconditions; it moves this thread only
            // (not the process) into a new network namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET) for the API target (needs root): {}",
                std::io::Error::last_os_error()
            );
            ApiServer::start(&s, d).expect("the API server starts")
        })
        .join()
        .unwrap_or_else(|_| panic!("starting the API server failed"));
        Self {
            daemon,
            socket,
            dir,
            _server: server,
        }
    }
}

/// Replaces [`PLACEHOLDER`] by `dir`, and the value of every `work_dir` by a directory inside
/// `dir`: same lengths, so that the request's framing is unchanged.
fn prepare(data: &[u8], dir: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut i = 0;
    while let Some(at) = find(&out[i..], PLACEHOLDER) {
        out[i + at..i + at + PLACEHOLDER.len()].copy_from_slice(dir);
        i += at + PLACEHOLDER.len();
    }
    // `work_dir` then `:` then a string, quoted plainly or escaped inside a JSON string: its
    // characters (up to the closing quote) become the fixture's directory, then `/www...`.
    let key = b"work_dir";
    let mut i = 0;
    while let Some(at) = find(&out[i..], key) {
        let mut p = i + at + key.len();
        i = p;
        // Skip the closing quote of the key, the colon, spaces and the opening quote.
        while p < out.len() && matches!(out[p], b'"' | b'\\' | b':' | b' ' | b'\t' | b'\n' | b'\r')
        {
            p += 1;
        }
        let start = p;
        while p < out.len() && !matches!(out[p], b'"' | b'\\') {
            p += 1;
        }
        let value = &mut out[start..p];
        if value.len() >= dir.len() {
            value[..dir.len()].copy_from_slice(dir);
            for b in &mut value[dir.len()..] {
                *b = b'w';
            }
            if value.len() > dir.len() {
                value[dir.len()] = b'/';
            }
        } else {
            // Too short to hold the directory: control characters, which JSON refuses in a
            // string, so that the configuration is refused rather than a relative (or short
            // absolute) directory created.
            for b in value.iter_mut() {
                *b = 1;
            }
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One iteration: see the module doc.
pub fn run(fixture: &Fixture, data: &[u8]) -> Outcome {
    let statuses = exchange(fixture, data);
    if statuses.is_empty() {
        Outcome::Rejected
    } else {
        Outcome::Served(statuses.len() as u64)
    }
}

/// Sends `data`, checks the answers, removes every mount; the answers' status codes.
pub fn exchange(fixture: &Fixture, data: &[u8]) -> Vec<u16> {
    let dir = fixture.dir.path().as_os_str().as_encoded_bytes().to_vec();
    let request = prepare(data, &dir);
    let mut conn = UnixStream::connect(&fixture.socket).expect("the API socket accepts");
    conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    conn.set_write_timeout(Some(TIMEOUT)).expect("timeout");
    // The server may answer (and close) before it has read everything sent: a refused
    // write is not a failure.
    let _ = conn.write_all(&request);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let read = conn.read_to_end(&mut answer);
    if let Err(e) = &read {
        assert!(
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
            "no answer within {TIMEOUT:?}: a hang ({} bytes so far)",
            answer.len()
        );
    }
    let statuses = responses(&answer);
    // The next input starts with no mount.
    if let Ok(mounts) = fixture.daemon.fs.mounts() {
        for mp in mounts.keys() {
            let _ = fixture.daemon.fs.umount(mp);
        }
    }
    statuses
}

/// The responses in `answer`, checked: each an HTTP/1.1 status line, headers, and a body of
/// its `Content-Length`; an error's body `{"code", "message"}`; no 5xx but for the daemon's own
/// faults. Returns their status codes.
fn responses(mut answer: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    while !answer.is_empty() {
        let head_end = find(answer, b"\r\n\r\n")
            .unwrap_or_else(|| panic!("a response without the end of its head: {}", show(answer)));
        let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
        let length: usize = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let body_start = head_end + 4;
        let body = answer
            .get(body_start..body_start + length)
            .unwrap_or_else(|| panic!("a response shorter than its Content-Length: {head:?}"));
        if status >= 400 && !body.is_empty() {
            let v: serde_json::Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {}", show(body)));
            assert!(
                v.get("code").is_some_and(|c| c.is_string())
                    && v.get("message").is_some_and(|m| m.is_string()),
                "error body without code and message: {v}"
            );
            if status >= 500 {
                let code = v["code"].as_str().unwrap_or("");
                assert!(
                    DAEMON_FAULTS.contains(&code),
                    "status {status} ({code}) for a request: {v}"
                );
            }
        }
        out.push(status);
        answer = &answer[body_start + length..];
    }
    out
}

/// Error codes of a 5xx that are the daemon's own faults (or its host's), not the request's.
const DAEMON_FAULTS: &[&str] = &["INTERNAL"];

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}
