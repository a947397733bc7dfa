//! Serving a filesystem over `/dev/fuse` on the host (`skiff mount`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};

use crate::runtime::threads::{self, ThreadKind};
use crate::runtime::{ExitEvent, ExitReason, SignalGuard};

mod service;

pub use service::FuseService;

/// Why a FUSE mount failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// Mounting or creating channels failed.
    #[error("FUSE session on {mountpoint}: {what}")]
    Session {
        /// The mountpoint.
        mountpoint: String,
        /// What failed.
        what: String,
    },
    /// A worker thread could not be started.
    #[error("starting FUSE worker")]
    Thread(#[source] std::io::Error),
    /// Installing the signal handlers failed.
    #[error("installing signal handlers")]
    Signal(#[source] std::io::Error),
    /// The exit event could not be created.
    #[error("creating the exit event")]
    ExitEvent(#[source] std::io::Error),
    /// Serving stopped because a thread panicked.
    #[error("the daemon stopped on a fatal error: {0}")]
    Fatal(String),
}

/// Options of a FUSE mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Worker threads reading `/dev/fuse`.
    pub threads: usize,
}

/// Mounts `fs` read-only at the mountpoint and serves it until SIGINT or SIGTERM (or until it is
/// unmounted from outside), then unmounts. A panic in any of its threads stops it with
/// [`FuseError::Fatal`].
pub fn mount_and_serve<F>(fs: F, opts: &MountOptions) -> Result<(), FuseError>
where
    F: FileSystem<Inode = u64, Handle = u64> + Send + Sync + 'static,
{
    let exit = crate::runtime::start_daemon().map_err(FuseError::ExitEvent)?;
    let _signals = SignalGuard::install(&exit).map_err(FuseError::Signal)?;
    serve_until(fs, opts, &exit)
}

/// Like [`mount_and_serve`], stopping when `exit` is set.
pub fn serve_until<F>(fs: F, opts: &MountOptions, exit: &ExitEvent) -> Result<(), FuseError>
where
    F: FileSystem<Inode = u64, Handle = u64> + Send + Sync + 'static,
{
    let session_err = |what: String| FuseError::Session {
        mountpoint: opts.mountpoint.display().to_string(),
        what,
    };
    let mut session = FuseSession::new(&opts.mountpoint, "skiff", "", true)
        .map_err(|e| session_err(e.to_string()))?;
    session.set_allow_other(true);
    session
        .mount()
        .map_err(|e| session_err(format!("mount: {e}")))?;
    tracing::info!(mountpoint = %opts.mountpoint.display(), "mounted");
    let server = Arc::new(Server::new(fs));
    let mut workers = Vec::new();
    for i in 0..opts.threads.max(1) {
        let channel = session
            .new_channel()
            .map_err(|e| session_err(format!("channel: {e}")))?;
        let (server, exit) = (server.clone(), exit.clone());
        let h = threads::spawn(ThreadKind::Fuse, format!("skiff-fuse-{i}"), move || {
            worker(channel, &server);
            // The channel closed: unmounted from outside (or the session is ending).
            exit.notify(ExitReason::Requested);
        })
        .map_err(FuseError::Thread)?;
        workers.push(h);
    }
    // A signal, an unmount from outside (a worker sees the mount go away), or a panic.
    exit.wait(None);
    tracing::info!(mountpoint = %opts.mountpoint.display(), reason = ?exit.reason(), "unmounting");
    let umount = session.umount();
    let _ = session.wake();
    for w in workers {
        let _ = w.join();
    }
    if let Some(ExitReason::Fatal(report)) = exit.reason() {
        return Err(FuseError::Fatal(report));
    }
    umount.map_err(|e| session_err(format!("umount: {e}")))
}

/// Serves requests from `channel` until it is woken to stop or the mount goes away.
pub(crate) fn worker<F>(mut channel: FuseChannel, server: &Server<F>)
where
    F: FileSystem + Send + Sync,
{
    loop {
        match channel.get_request() {
            Ok(Some((reader, writer))) => {
                if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
                    match e {
                        fuse_backend_rs::Error::EncodeMessage(ref io)
                            if io.raw_os_error() == Some(libc::EBADF)
                                || io.raw_os_error() == Some(libc::ENODEV) =>
                        {
                            break
                        }
                        _ => tracing::debug!(error = %e, "FUSE request failed"),
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "FUSE channel closed");
                break;
            }
        }
    }
}

/// Whether `path` is a mountpoint now (its device differs from its parent's).
pub fn is_mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}
