//! Serving a filesystem over `/dev/fuse` on the host (`skiff mount`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::FuseChannel;

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
/// unmounted from outside), then unmounts.
pub fn mount_and_serve<F>(fs: F, opts: &MountOptions) -> Result<(), FuseError>
where
    F: FileSystem<Inode = u64, Handle = u64> + Send + Sync + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(FuseError::Signal)?;
    }
    serve_until(fs, opts, stop)
}

/// Like [`mount_and_serve`], stopping when `stop` becomes true.
pub fn serve_until<F>(fs: F, opts: &MountOptions, stop: Arc<AtomicBool>) -> Result<(), FuseError>
where
    F: FileSystem<Inode = u64, Handle = u64> + Send + Sync + 'static,
{
    let service = FuseService::mount(&opts.mountpoint, "skiff", fs, opts.threads, true)?;
    service.start()?;
    // Wait for a signal, or for a worker to see the mount go away (umount from outside).
    while !stop.load(Ordering::SeqCst) && !service.ended() {
        thread::sleep(Duration::from_millis(50));
    }
    service.umount()
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
