//! Serving a filesystem over `/dev/fuse` on the host (`skiff mount`).

use std::path::{Path, PathBuf};

use fuse_backend_rs::api::filesystem::FileSystem;

use crate::fs::ReadReadiness;
use crate::runtime::{ExitEvent, ExitReason, SignalGuard};

mod channel;
mod service;

pub use service::{FuseService, FuseThreads};

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
    /// A reader thread could not be started.
    #[error("starting FUSE reader")]
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
    /// Threads reading `/dev/fuse`, and workers answering the reads that may wait.
    pub threads: FuseThreads,
}

/// Mounts `fs` read-only at the mountpoint and serves it until SIGINT or SIGTERM (or until it is
/// unmounted from outside), then unmounts. A panic in any of its threads stops it with
/// [`FuseError::Fatal`].
pub fn mount_and_serve<F>(fs: F, opts: &MountOptions) -> Result<(), FuseError>
where
    F: FileSystem<Inode = u64, Handle = u64> + ReadReadiness + Clone + Send + Sync + 'static,
{
    let exit = crate::runtime::start_daemon().map_err(FuseError::ExitEvent)?;
    let _signals = SignalGuard::install(&exit).map_err(FuseError::Signal)?;
    serve_until(fs, opts, &exit)
}

/// Like [`mount_and_serve`], stopping when `exit` is set.
pub fn serve_until<F>(fs: F, opts: &MountOptions, exit: &ExitEvent) -> Result<(), FuseError>
where
    F: FileSystem<Inode = u64, Handle = u64> + ReadReadiness + Clone + Send + Sync + 'static,
{
    let service = FuseService::mount(
        &opts.mountpoint,
        "skiff",
        fs,
        opts.threads,
        true,
        Some(exit.clone()),
    )?;
    service.start()?;
    // A signal, an unmount from outside (a reader sees the mount go away), or a panic.
    exit.wait(None);
    tracing::debug!(reason = ?exit.reason(), "stopping");
    let umount = service.umount();
    if let Some(ExitReason::Fatal(report)) = exit.reason() {
        return Err(FuseError::Fatal(report));
    }
    umount
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
