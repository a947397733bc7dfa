//! Failover and hot upgrade of a FUSE host daemon, as nydus-snapshotter drives them: the
//! daemon sends its state and its `/dev/fuse` descriptor to the supervisor's Unix socket
//! (`sendfd`), and a successor receives both from the same socket (`takeover`).
//!
//! The supervisor (the snapshotter) listens on the socket whenever it wants to take or give
//! state; the daemon connects. Going out, the first message carries the descriptor
//! (`SCM_RIGHTS`) and the state follows, then the daemon closes its end; coming in, the daemon
//! reads until the supervisor closes. The supervisor keeps the state as opaque bytes: their
//! format is the daemon's own ([`SavedState`], JSON).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SavedMount;

/// Largest state accepted from a supervisor.
pub const MAX_STATE_BYTES: usize = 16 << 20;
/// Descriptors one message may carry; more are closed.
const MAX_FDS: usize = 16;
/// How long a supervisor may take to send or take the state.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// What [`SavedState::format`] says.
pub const STATE_FORMAT: &str = "skiff-fuse-state";
/// The state format version this code writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The supervisor socket could not be reached or used.
    #[error("supervisor socket {path}: {what}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The supervisor sent no descriptor.
    #[error("the supervisor sent {0} bytes of state but no /dev/fuse descriptor")]
    NoFd(usize),
    /// The supervisor sent more than [`MAX_STATE_BYTES`].
    #[error("the supervisor sent more than {MAX_STATE_BYTES} bytes of state")]
    TooLarge,
    /// The state does not parse, or is not this daemon's.
    #[error("the state the supervisor holds is not a Skiff FUSE daemon's: {0}")]
    BadState(String),
}

/// What a daemon hands its successor, besides the descriptor.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    /// [`STATE_FORMAT`].
    pub format: String,
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The daemon's `--id`.
    pub id: Option<String>,
    /// The FUSE mountpoint.
    pub mountpoint: PathBuf,
    /// fuse-backend-rs's Vfs state (options negotiated with the kernel, the pseudo
    /// directories' inodes), base64.
    pub vfs: String,
    /// The RAFS mounts.
    pub mounts: Vec<SavedMount>,
}

impl SavedState {
    /// Parses state bytes received from a supervisor, checking they are this format.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UpgradeError> {
        let s: SavedState =
            serde_json::from_slice(bytes).map_err(|e| UpgradeError::BadState(e.to_string()))?;
        if s.format != STATE_FORMAT {
            return Err(UpgradeError::BadState(format!("format {:?}", s.format)));
        }
        if s.version != STATE_VERSION {
            return Err(UpgradeError::BadState(format!(
                "version {} (this daemon reads {STATE_VERSION})",
                s.version
            )));
        }
        Ok(s)
    }

    /// The state as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn socket_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(io::Error) -> UpgradeError + 'a {
    move |source| UpgradeError::Socket {
        path: path.to_owned(),
        what,
        source,
    }
}

/// Sends `state` and the descriptor `fd` to the supervisor listening at `path`.
pub fn send(path: &Path, state: &[u8], fd: RawFd) -> Result<(), UpgradeError> {
    let mut s = UnixStream::connect(path).map_err(socket_err(path, "connecting"))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(socket_err(path, "setting a timeout"))?;
    let first = state.len().min(64 << 10);
    let sent = send_with_fd(&s, &state[..first], fd)
        .map_err(socket_err(path, "sending the descriptor"))?;
    s.write_all(&state[sent..])
        .map_err(socket_err(path, "sending the state"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(socket_err(path, "closing"))?;
    tracing::info!(supervisor = %path.display(), bytes = state.len(), "state and /dev/fuse descriptor sent");
    Ok(())
}

/// Receives the state and the descriptor from the supervisor listening at `path`.
pub fn receive(path: &Path) -> Result<(Vec<u8>, File), UpgradeError> {
    let s = UnixStream::connect(path).map_err(socket_err(path, "connecting"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(socket_err(path, "setting a timeout"))?;
    let mut data = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = recv_with_fds(&s, &mut buf, &mut fds).map_err(socket_err(path, "receiving"))?;
        if n == 0 {
            break;
        }
        if data.len() + n > MAX_STATE_BYTES {
            return Err(UpgradeError::TooLarge);
        }
        data.extend_from_slice(&buf[..n]);
    }
    let mut fds = fds.into_iter();
    let Some(fd) = fds.next() else {
        return Err(UpgradeError::NoFd(data.len()));
    };
    // Any other descriptor is closed as `fds` drops.
    tracing::info!(supervisor = %path.display(), bytes = data.len(), "state and /dev/fuse descriptor received");
    Ok((data, File::from(fd)))
}

/// `sendmsg` of `data` with `fd` as `SCM_RIGHTS`; returns the bytes of `data` sent.
fn send_with_fd(s: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<usize> {
    // A control buffer for one descriptor, aligned as cmsghdr wants.
    let mut cmsg = [0u64; 8];
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    if space > std::mem::size_of_val(&cmsg) {
        return Err(io::Error::other("control buffer too small"));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `cmsg`, which is large enough (checked above) and aligned for
    // cmsghdr (u64 elements), so CMSG_FIRSTHDR returns a pointer inside it.
    let hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if hdr.is_null() {
        return Err(io::Error::other("no room for the control message"));
    }
    // SAFETY: `hdr` points at the start of `cmsg`, inside the buffer and aligned; the
    // descriptor is written at CMSG_DATA(hdr), which lies within CMSG_SPACE of it.
    unsafe {
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(hdr) as *mut RawFd, fd);
    }
    loop {
        // SAFETY: `msg` and the buffers it points at (`iov`/`data`, `cmsg`) outlive the call;
        // the socket is open.
        let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recvmsg` into `buf`, appending the descriptors received to `fds` (at most [`MAX_FDS`];
/// any beyond are closed). Returns the bytes received (0 at end of stream).
fn recv_with_fds(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    let n = loop {
        // SAFETY: `msg` points at `buf` and `cmsg`, both valid for writing for the lengths
        // given and outliving the call; MSG_CMSG_CLOEXEC marks received descriptors
        // close-on-exec.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: after recvmsg, msg_control/msg_controllen describe the control data the kernel
    // wrote into `cmsg`; CMSG_FIRSTHDR/CMSG_NXTHDR only walk within it.
    let mut hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !hdr.is_null() {
        // SAFETY: `hdr` is a control header inside `cmsg` (see above).
        let (level, kind, len) = unsafe {
            (
                (*hdr).cmsg_level,
                (*hdr).cmsg_type,
                (*hdr).cmsg_len as usize,
            )
        };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is arithmetic.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(head) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` descriptors at CMSG_DATA(hdr), inside the
                // header's length; each is read unaligned and now owned by this process.
                let fd = unsafe {
                    std::ptr::read_unaligned((libc::CMSG_DATA(hdr) as *const RawFd).add(i))
                };
                if fd >= 0 {
                    // SAFETY: a descriptor just received is open and owned by nobody else.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if fds.len() < MAX_FDS {
                        fds.push(owned);
                    }
                }
            }
        }
        // SAFETY: `hdr` is inside the control data `msg` describes.
        hdr = unsafe { libc::CMSG_NXTHDR(&msg, hdr) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        tracing::warn!("the supervisor sent more descriptors than expected; extras were dropped");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn state_and_descriptor_round_trip_through_a_supervisor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("supervisor.sock");
        let state: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let file = tempfile::tempfile().expect("tempfile");
        // The supervisor: takes state and descriptor, then gives them to the next daemon.
        let listener = UnixListener::bind(&sock).expect("bind");
        let s2 = state.clone();
        let sup = std::thread::spawn(move || {
            let (c, _) = listener.accept().expect("accept");
            let mut data = Vec::new();
            let mut fds = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = recv_with_fds(&c, &mut buf, &mut fds).expect("recv");
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            assert_eq!(data, s2);
            assert_eq!(fds.len(), 1);
            let (mut c, _) = listener.accept().expect("accept 2");
            let fd = fds.remove(0);
            let n = send_with_fd(&c, &data[..1000], fd.as_raw_fd()).expect("send");
            c.write_all(&data[n..]).expect("rest");
        });
        send(&sock, &state, file.as_raw_fd()).expect("send");
        let (got, f) = receive(&sock).expect("receive");
        sup.join().expect("supervisor");
        assert_eq!(got, state);
        // The descriptor received is the same open file.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            f.metadata().expect("meta").ino(),
            file.metadata().expect("meta").ino()
        );
    }

    #[test]
    fn no_descriptor_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let t = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            c.write_all(b"{}").expect("write");
        });
        assert!(matches!(receive(&sock), Err(UpgradeError::NoFd(2))));
        t.join().expect("thread");
        assert!(SavedState::from_bytes(b"{}").is_err());
        assert!(SavedState::from_bytes(b"nonsense").is_err());
    }
}
