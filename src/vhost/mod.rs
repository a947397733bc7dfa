//! The vhost-user-fs transport: serves any FUSE [`FileSystem`] to a VMM (QEMU, Cloud
//! Hypervisor, ... as driven by Kata) over a vhost-user Unix socket, as a virtio-fs device.
//!
//! The module is split by concern, in the style of the rust-vmm crates:
//!
//! * [`device`](VirtioFsDevice): the virtio-fs device model, implementing
//!   `vhost_user_backend::VhostUserBackend` (features, queues, config space with the tag);
//! * `queue`: processing one virtqueue, turning descriptor chains into FUSE requests and
//!   replies;
//! * `daemon`: the socket lifecycle ([`serve`], [`serve_until`]): stale socket removal,
//!   accepting a VMM, serving it until it disconnects, accepting the next one, and a clean
//!   shutdown on SIGTERM/SIGINT.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn fs() -> Arc<fuse_backend_rs::passthrough::PassthroughFs> { unimplemented!() }
//! use skiff::vhost::{serve, ServeOptions};
//!
//! let opts = ServeOptions::new("/run/skiff/vfs.sock", "rootfs");
//! serve(fs(), &opts)?;
//! # Ok::<(), skiff::vhost::VhostError>(())
//! ```
//!
//! [`FileSystem`]: fuse_backend_rs::api::filesystem::FileSystem

#![warn(missing_docs)]

mod daemon;
mod device;
mod queue;

use std::io;
use std::path::PathBuf;

pub use daemon::{serve, serve_until, ServeOptions};
pub use device::{
    VirtioFsDevice, DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE, MAX_REQUEST_QUEUES, NUM_HIPRIO_QUEUES,
    VIRTIO_FS_CONFIG_SIZE, VIRTIO_FS_TAG_LEN,
};

/// A boxed error from the vhost-user libraries, whose own error types do not all implement
/// [`std::error::Error`].
pub type BoxedError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the vhost-user-fs daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// The tag is empty or does not fit the virtio-fs config space.
    #[error("invalid virtio-fs tag {tag:?}: must be 1 to {VIRTIO_FS_TAG_LEN} bytes")]
    InvalidTag {
        /// The rejected tag.
        tag: String,
    },
    /// The number of request queues (worker threads) is out of range.
    #[error("invalid number of request queues {0}: must be 1 to {MAX_REQUEST_QUEUES}")]
    InvalidThreads(usize),
    /// The queue size is not a power of two in range.
    #[error("invalid queue size {0}: must be a power of two from 2 to {MAX_QUEUE_SIZE}")]
    InvalidQueueSize(u16),
    /// Something that is not a socket already exists at the socket path.
    #[error("refusing to replace {path}: it exists and is not a socket")]
    SocketPathInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A stale socket file could not be removed.
    #[error("removing stale socket {path}")]
    RemoveStaleSocket {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The listening socket could not be created.
    #[error("listening on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Waiting for a VMM connection failed.
    #[error("waiting for a VMM connection")]
    Poll(#[source] io::Error),
    /// The SIGTERM/SIGINT handlers could not be installed.
    #[error("installing signal handlers")]
    Signal(#[source] io::Error),
    /// The vhost-user daemon (its worker threads) could not be created.
    #[error("creating the vhost-user daemon")]
    CreateDaemon(#[source] BoxedError),
    /// A thread could not be spawned.
    #[error("spawning a thread")]
    SpawnThread(#[source] io::Error),
}

/// Converts the vhost-user-backend daemon error (which does not implement
/// [`std::error::Error`]) into its underlying cause.
fn backend_error(e: vhost_user_backend::Error) -> BoxedError {
    use vhost_user_backend::Error as E;
    match e {
        E::NewVhostUserHandler(e) => Box::new(e),
        E::CreateBackendListener(e)
        | E::CreateBackendReqHandler(e)
        | E::CreateVhostUserListener(e)
        | E::HandleRequest(e) => Box::new(e),
        E::StartDaemon(e) => Box::new(e),
        E::WaitDaemon(_) => "the vhost-user request thread panicked".into(),
    }
}
