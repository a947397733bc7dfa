//! The Unix sockets a daemon listens on (the vhost-user socket, the API socket), made and
//! removed the same way everywhere.
//!
//! * A socket file nobody listens on (left by a daemon that died) is replaced; one that a
//!   live process answers on is refused, and so is anything that is not a socket.
//! * The new socket is bound under a temporary name next to the path and renamed into place,
//!   so the path goes from the stale socket to the live one without a moment where it is
//!   missing or bound but not listening.
//! * On drop the file is removed only if it is still ours (same device and inode): a daemon
//!   started after us on the same path keeps its socket.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest path a Unix socket address holds (`sun_path`, without the final NUL).
const SUN_PATH_MAX: usize = 107;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something that is not a socket is at the path.
    #[error("refusing to replace {}: it exists and is not a socket", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A live process listens on the socket already.
    #[error("{} is in use: another process listens on it", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A file operation on the socket path failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A listening Unix socket whose file is removed on drop, if it is still ours.
#[derive(Debug)]
pub struct UnixSocketFile {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// Device and inode of our socket file.
    id: (u64, u64),
}

impl UnixSocketFile {
    /// Binds a listening socket at `path` (see the module documentation for what is
    /// replaced), with permissions `mode` if given (e.g. 0o600: connecting needs write
    /// permission, so only the owner may then connect, whatever the umask).
    pub fn bind(path: &Path, mode: Option<u32>) -> Result<Self, SocketError> {
        check_stale(path)?;
        let temp = temp_path(path);
        let bind_at = temp.as_deref().unwrap_or(path);
        if temp.is_none() {
            // No room for a temporary name: replace in two steps.
            remove_if_socket(path)?;
        } else {
            let _ = fs::remove_file(bind_at);
        }
        let listener = UnixListener::bind(bind_at).map_err(io_err("listening on", path))?;
        let cleanup = |e| {
            let _ = fs::remove_file(bind_at);
            e
        };
        if let Some(mode) = mode {
            fs::set_permissions(bind_at, fs::Permissions::from_mode(mode))
                .map_err(io_err("setting the permissions of", path))
                .map_err(cleanup)?;
        }
        if temp.is_some() {
            fs::rename(bind_at, path)
                .map_err(io_err("renaming the new socket into", path))
                .map_err(cleanup)?;
        }
        let meta = fs::symlink_metadata(path).map_err(io_err("checking", path))?;
        Ok(Self {
            listener: Some(listener),
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener, to accept on.
    pub fn listener(&self) -> Option<&UnixListener> {
        self.listener.as_ref()
    }

    /// Hands the listener to a server that takes ownership of it; this keeps removing the
    /// file on drop.
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }

    fn is_ours(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }
}

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        if !self.is_ours() {
            return;
        }
        if self.listener.is_none() {
            // A server that took the listener may be blocked in accept(): one connection
            // wakes it to see that it should stop.
            let _ = UnixStream::connect(&self.path);
        }
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove socket");
        }
    }
}

/// A temporary name beside `path` that fits a socket address, if there is room for one.
fn temp_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let temp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    (temp.as_os_str().len() <= SUN_PATH_MAX).then_some(temp)
}

/// Refuses `path` if it holds something other than a socket, or a socket a process answers.
fn check_stale(path: &Path) -> Result<(), SocketError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("checking", path)(e)),
        Ok(m) if !m.file_type().is_socket() => Err(SocketError::NotASocket {
            path: path.to_owned(),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(SocketError::InUse {
                path: path.to_owned(),
            }),
            Err(_) => {
                tracing::info!(socket = %path.display(), "replacing a stale socket");
                Ok(())
            }
        },
    }
}

fn remove_if_socket(path: &Path) -> Result<(), SocketError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing the stale socket", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        drop(UnixListener::bind(&path).expect("stale"));
        assert!(path.exists(), "a dropped std listener leaves its file");
        let first = UnixSocketFile::bind(&path, Some(0o600)).expect("replaces the stale one");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(UnixStream::connect(&path).is_ok(), "listening at the path");
        assert!(matches!(
            UnixSocketFile::bind(&path, None),
            Err(SocketError::InUse { .. })
        ));
        drop(first);
        assert!(!path.exists(), "removed on drop");
        assert_eq!(
            fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "no temporary left"
        );

        fs::write(&path, b"keep me").expect("file");
        assert!(matches!(
            UnixSocketFile::bind(&path, None),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&path).expect("kept"), b"keep me");
        let missing = dir.path().join("no/such/dir/s.sock");
        let e = UnixSocketFile::bind(&missing, None).expect_err("no directory");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn a_socket_replaced_by_someone_else_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let ours = UnixSocketFile::bind(&path, None).expect("bind");
        fs::remove_file(&path).expect("remove");
        let theirs = UnixListener::bind(&path).expect("theirs");
        drop(ours);
        assert!(path.exists());
        drop(theirs);
    }

    #[test]
    fn a_long_path_is_bound_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().as_os_str().len() + 1;
        let name = "x".repeat(SUN_PATH_MAX - base);
        let path = dir.path().join(name);
        assert!(temp_path(&path).is_none());
        let s = UnixSocketFile::bind(&path, None).expect("bind at the limit");
        assert!(UnixStream::connect(&path).is_ok());
        drop(s);
        assert!(!path.exists());
    }
}
