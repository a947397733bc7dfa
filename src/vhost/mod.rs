//! The vhost-user-fs transport: serves any FUSE [`FileSystem`] to a VMM (QEMU, Cloud
//! Hypervisor, ... as driven by Kata) over a vhost-user Unix socket, as a virtio-fs device.
//!
//! The module is split by concern, in the style of the rust-vmm crates:
//!
//! * [`device`](VirtioFsDevice): the virtio-fs device model, implementing
//!   `vhost_user_backend::VhostUserBackend` (features, queues, config space with the tag);
//! * `queue`: processing one virtqueue: the queue thread pops descriptor chains, a worker
//!   turns each into a FUSE request and its reply and returns it to the guest;
//! * `pool`: the worker threads, started on demand up to [`ServeOptions::workers`], so that
//!   a request waiting on the network never holds up one whose data is cached or local;
//! * `daemon`: the socket lifecycle ([`serve`], [`serve_until`], [`VhostListener`]): accepting
//!   a VMM, serving it until it disconnects, accepting the next one, and a clean shutdown when
//!   the daemon's exit event is set (SIGTERM/SIGINT, or a fatal error).
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

pub use crate::runtime::{DEFAULT_WORKERS, MAX_WORKERS};
pub use daemon::{serve, serve_until, ServeOptions, VhostListener};
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
    /// The number of request queues (queue threads) is out of range.
    #[error("invalid number of request queues {0}: must be 1 to {MAX_REQUEST_QUEUES}")]
    InvalidThreads(usize),
    /// The worker pool size is out of range.
    #[error("invalid number of worker threads {0}: must be 1 to {MAX_WORKERS}")]
    InvalidWorkers(usize),
    /// The queue size is not a power of two in range.
    #[error("invalid queue size {0}: must be a power of two from 2 to {MAX_QUEUE_SIZE}")]
    InvalidQueueSize(u16),
    /// The vhost-user socket could not be set up.
    #[error("the vhost-user socket")]
    Socket(#[from] crate::runtime::SocketError),
    /// Waiting for a VMM connection, or for it to end, failed.
    #[error("waiting for a VMM connection")]
    Poll(#[source] io::Error),
    /// The exit event could not be created.
    #[error("creating the exit event")]
    ExitEvent(#[source] io::Error),
    /// The SIGTERM/SIGINT handlers could not be installed.
    #[error("installing signal handlers")]
    Signal(#[source] io::Error),
    /// The vhost-user daemon (its worker threads) could not be created.
    #[error("creating the vhost-user daemon")]
    CreateDaemon(#[source] BoxedError),
    /// A thread could not be spawned.
    #[error("spawning a thread")]
    SpawnThread(#[source] io::Error),
    /// The daemon stopped because something it cannot go on without failed (a thread
    /// panicked).
    #[error("the daemon stopped on a fatal error: {0}")]
    Fatal(String),
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
