//! The share directory's sockets: offering a sealed bootstrap's descriptor, and asking for one.
//!
//! The exchange is one message: a daemon connects to `<key>.<pid>-<n>.sock` and reads one byte,
//! `S` with the memfd attached (`SCM_RIGHTS`), or `N` when the offer is gone. Both ends check
//! the other's credentials (`SO_PEERCRED`): the same user, or root. Every wait is bounded, so a
//! daemon that stopped answering costs an asker [`ASK_TIMEOUT`] at most.

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Weak;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{Inner, Offer};
use crate::format::Bootstrap;
use crate::util::sync::lock;

/// Longest wait for one offering daemon: connecting, then its reply.
pub(super) const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Why asking a socket gave no descriptor.
#[derive(Debug, thiserror::Error)]
pub(super) enum AskError {
    /// Nobody listens there any more (its daemon is gone).
    #[error("nobody answers")]
    Stale,
    /// The offering daemon no longer has the bootstrap.
    #[error("the offer is withdrawn")]
    Withdrawn,
    /// The peer runs as another user.
    #[error("the offering process runs as uid {0}, neither this user nor root")]
    Peer(u32),
    /// The reply is not one this code sends.
    #[error("unexpected reply")]
    Protocol,
    /// A system call failed.
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &impl AsRawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes, the size of the ucred we pass.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Sets or clears `O_NONBLOCK` with `fcntl` (std and socket2 use `ioctl(FIONBIO)`, which no
/// seccomp list of the sharing threads allows).
fn set_nonblocking(s: &impl AsRawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and touches no memory.
    let flags = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL takes an integer argument and touches no memory.
    if unsafe { libc::fcntl(s.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn trusted(uid: u32) -> bool {
    uid == euid() || uid == 0
}

/// Asks the daemon listening at `path` for its sealed bootstrap.
pub(super) fn ask(path: &Path) -> Result<OwnedFd, AskError> {
    let addr = socket2::SockAddr::unix(path).map_err(|e| AskError::Io("socket address", e))?;
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(|e| AskError::Io("socket", e))?;
    sock.set_read_timeout(Some(ASK_TIMEOUT))
        .map_err(|e| AskError::Io("setting a timeout", e))?;
    // A Unix socket connects at once, or fails with EAGAIN when the listener's backlog is
    // full (a daemon not answering): non-blocking, so that such a holder cannot stall us.
    set_nonblocking(&sock, true).map_err(|e| AskError::Io("connecting", e))?;
    if let Err(e) = sock.connect(&addr) {
        return Err(match e.kind() {
            ErrorKind::ConnectionRefused | ErrorKind::NotFound => AskError::Stale,
            _ => AskError::Io("connecting", e),
        });
    }
    set_nonblocking(&sock, false).map_err(|e| AskError::Io("connecting", e))?;
    let stream = UnixStream::from(OwnedFd::from(sock));
    let uid = peer_uid(&stream).map_err(|e| AskError::Io("SO_PEERCRED", e))?;
    if !trusted(uid) {
        return Err(AskError::Peer(uid));
    }
    let mut reply = [0u8; 1];
    let (n, file) = stream
        .recv_with_fd(&mut reply)
        .map_err(|e| AskError::Io("receiving", io::Error::from_raw_os_error(e.errno())))?;
    match (n, reply[0], file) {
        (1, b'S', Some(f)) => {
            let fd = OwnedFd::from(f);
            // Received without MSG_CMSG_CLOEXEC: close it across exec from now on.
            // SAFETY: F_SETFD with an integer flag touches no memory.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok(fd)
        }
        (1, b'N', None) => Err(AskError::Withdrawn),
        _ => Err(AskError::Protocol),
    }
}

/// A listening socket at `path` in `dir`, made under a temporary name and renamed into place
/// once it listens, so that an asker never finds it bound and not listening (which would look
/// stale to it).
pub(super) fn listen(dir: &Path, path: &Path) -> io::Result<UnixListener> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from(ErrorKind::InvalidInput))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    set_nonblocking(&l, true)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// Removes an offer's socket.
pub(super) fn withdraw(o: &Offer) {
    let _ = std::fs::remove_file(&o.path);
    tracing::debug!(socket = %o.path.display(), key = %o.key.name(), "bootstrap offer withdrawn");
}

/// The offering thread: answers every asker of every offer until the share closes.
pub(super) fn serve(inner: &Inner) {
    loop {
        let mut fds = vec![libc::pollfd {
            fd: inner.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        {
            let mut g = lock(&inner.offers);
            if g.closing {
                return;
            }
            // Offers whose image is gone (unmounted) are withdrawn.
            g.list.retain(|o| {
                let live = o.image.strong_count() > 0;
                if !live {
                    withdraw(o);
                }
                live
            });
            fds.extend(g.list.iter().map(|o| libc::pollfd {
                fd: o.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(error = %e, "share: poll failed; bootstraps no longer offered");
            return;
        }
        if fds[0].revents != 0 {
            let _ = inner.wake.read();
        }
        let ready: Vec<i32> = fds[1..]
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| p.fd)
            .collect();
        let mut conns: Vec<(UnixStream, Weak<Bootstrap>)> = Vec::new();
        {
            let g = lock(&inner.offers);
            for o in g
                .list
                .iter()
                .filter(|o| ready.contains(&o.listener.as_raw_fd()))
            {
                while let Ok((c, _)) = o.listener.accept() {
                    conns.push((c, o.image.clone()));
                }
            }
        }
        for (c, image) in conns {
            answer(c, &image);
        }
    }
}

/// Answers one asker: the descriptor, if the asker runs as this user or root and the image is
/// still there.
fn answer(c: UnixStream, image: &Weak<Bootstrap>) {
    let _ = set_nonblocking(&c, false);
    let _ = c.set_write_timeout(Some(ASK_TIMEOUT));
    match peer_uid(&c) {
        Ok(uid) if trusted(uid) => {}
        Ok(uid) => {
            tracing::warn!(
                uid,
                "share: refusing a bootstrap to a process of another user"
            );
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "share: no peer credentials");
            return;
        }
    }
    let image = image.upgrade();
    let sent = match image.as_ref().and_then(|b| b.sealed_fd()) {
        Some(fd) => c
            .send_with_fd(&b"S"[..], fd.as_raw_fd())
            .map(drop)
            .map_err(|e| io::Error::from_raw_os_error(e.errno())),
        None => io::Write::write_all(&mut &c, b"N"),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "share: could not answer an asker");
    }
}
