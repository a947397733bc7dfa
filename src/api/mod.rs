//! The nydusd API transport, for Skiff's nydusd-compatible daemons:
//!
//! * Kata Containers' sandbox daemon (`shared_fs = "virtio-fs-nydus"`): Kata starts
//!   `skiff virtiofs --apisock A --sock S ...`, waits for `GET /api/v1/daemon` to say
//!   `RUNNING`, mounts the host's shared directory at `/containers` and each container's image
//!   at `/rafs/<cid>/lowerdir` over the API on socket `A`, and boots the VM against the
//!   vhost-user-fs socket `S`, whose one device serves all of it ([`run_virtiofs`]);
//! * nydus-snapshotter's host daemon: `skiff fuse --mountpoint M --apisock A ...` serves images
//!   over `/dev/fuse` at `M`, one (`--bootstrap`) or many (mounted over the API), and hands
//!   its connection over to a successor for failover and hot upgrade ([`run_fuse`]).
//!
//! * `server`: HTTP/1.1 on the Unix socket ([`ApiServer`]);
//! * `routes`: the endpoints and their answers ([`routes::handle`]);
//! * `nydus_config`: what nydusd's JSON configuration means for Skiff.

#![warn(missing_docs)]

pub mod nydus_config;
pub mod routes;
mod server;

mod fuse_daemon;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

pub use fuse_daemon::{parse_spec, run_fuse, FuseDaemonOptions};
pub use nydus_config::ConfigError;
pub use server::{ApiServer, MAX_BODY_BYTES};

use crate::daemon::{
    upgrade::UpgradeError, Daemon, DaemonFs, DaemonState, Lifecycle, LifecycleError, MountError,
    RenewError,
};
use crate::runtime::http::HttpError;
use crate::runtime::threads::{self, ThreadKind};
use crate::runtime::{ExitEvent, ExitReason, SignalGuard, SocketError};
use crate::vhost::{ServeOptions, VhostError, VhostListener};

/// Why an API request was refused, or the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body is not the JSON expected.
    #[error("malformed request body")]
    BadJson(#[source] serde_json::Error),
    /// A parameter is missing or malformed.
    #[error("{0}")]
    BadRequest(String),
    /// No such endpoint.
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    /// The endpoint exists, not with this method.
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
    },
    /// The request could not be read as HTTP/1.x within the limits (its head, its framing,
    /// a body larger than [`MAX_BODY_BYTES`]).
    #[error("refused HTTP request")]
    Http(#[source] HttpError),
    /// A mount request for a filesystem type other than `passthrough_fs` and `rafs`.
    #[error("unsupported fs_type {0:?}: Skiff mounts \"passthrough_fs\" and \"rafs\"")]
    UnsupportedFsType(String),
    /// The nydusd configuration of a RAFS mount was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A mount or unmount was refused or failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// Credentials could not be renewed.
    #[error(transparent)]
    Renew(RenewError),
    /// A life-cycle request (sendfd, takeover, start, exit) was refused or failed.
    #[error(transparent)]
    Lifecycle(LifecycleError),
    /// The API socket could not be set up.
    #[error("the API socket")]
    Socket(#[from] SocketError),
    /// The HTTP server could not be started on the API socket.
    #[error("listening on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("spawning a thread")]
    SpawnThread(#[source] io::Error),
    /// The SIGTERM/SIGINT handlers could not be installed.
    #[error("installing signal handlers")]
    Signal(#[source] io::Error),
    /// The exit event could not be created.
    #[error("creating the exit event")]
    ExitEvent(#[source] io::Error),
    /// The sandbox could not be set up.
    #[error("setting up the sandbox")]
    Sandbox(#[source] crate::sandbox::SandboxError),
    /// The vhost-user-fs device failed.
    #[error("vhost-user-fs device")]
    Vhost(#[from] VhostError),
    /// The daemon stopped because something it cannot go on without failed (a thread
    /// panicked).
    #[error("the daemon stopped on a fatal error: {0}")]
    Fatal(String),
    /// The FUSE host daemon could not start.
    #[error("the FUSE daemon")]
    FuseDaemon(#[source] LifecycleError),
}

impl ApiError {
    /// The HTTP status this error is answered with: 4xx when the request is at fault (every
    /// refused key, path, body or state), 5xx when the daemon is.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadJson(_)
            | ApiError::BadRequest(_)
            | ApiError::UnsupportedFsType(_)
            | ApiError::Config(_) => 400,
            ApiError::NoRoute(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Http(e) => e.status(),
            ApiError::Mount(e) => match e {
                MountError::NotMounted(_) => 404,
                MountError::Busy(_) => 409,
                e if e.is_client_error() => 400,
                _ => 500,
            },
            ApiError::Renew(e) => match e {
                RenewError::NoSuchId(_) => 404,
                RenewError::NotRegistry(_) => 400,
            },
            ApiError::Lifecycle(e) => match e {
                LifecycleError::NotSupported(_) | LifecycleError::NoSupervisor => 400,
                LifecycleError::WrongState { .. } => 409,
                LifecycleError::Upgrade(UpgradeError::Socket { .. }) => 503,
                LifecycleError::Upgrade(_) => 400,
                LifecycleError::Fuse(_) | LifecycleError::Restore { .. } => 500,
            },
            _ => 500,
        }
    }

    /// The machine-readable `code` of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadJson(_) => "INVALID_JSON",
            ApiError::BadRequest(_) => "INVALID_ARGUMENT",
            ApiError::NoRoute(_) => "NOT_FOUND",
            ApiError::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            ApiError::Http(e) => match e {
                HttpError::BodyTooLarge(_) => "PAYLOAD_TOO_LARGE",
                HttpError::HeadTooLarge(_) | HttpError::TooManyHeaders => "HEADERS_TOO_LARGE",
                HttpError::Expectation(_) => "EXPECTATION_FAILED",
                HttpError::Timeout => "REQUEST_TIMEOUT",
                HttpError::TooManyConnections => "UNAVAILABLE",
                _ => "INVALID_REQUEST",
            },
            ApiError::UnsupportedFsType(_) => "UNSUPPORTED_FS_TYPE",
            ApiError::Config(ConfigError::Unsupported { .. }) => "UNSUPPORTED_CONFIG",
            ApiError::Config(_) => "INVALID_CONFIG",
            ApiError::Mount(e) => match e {
                MountError::InvalidMountpoint { .. } => "INVALID_MOUNTPOINT",
                MountError::SharedDir { .. }
                | MountError::BootstrapMissing(_)
                | MountError::OutsideSandbox(_) => "INVALID_SOURCE",
                MountError::Bootstrap { .. } => "INVALID_IMAGE",
                MountError::BlobMissing { .. } | MountError::BlobFileMismatch { .. } => {
                    "BLOB_NOT_FOUND"
                }
                MountError::Backend { .. } => "INVALID_BACKEND",
                MountError::Storage { .. } | MountError::Prefetch(_) => "INVALID_STORAGE",
                MountError::NotMounted(_) => "NOT_MOUNTED",
                MountError::Busy(_) => "MOUNTPOINT_BUSY",
                MountError::Passthrough { .. } | MountError::Vfs(_) => "MOUNT_FAILED",
            },
            ApiError::Renew(e) => match e {
                RenewError::NoSuchId(_) => "NOT_MOUNTED",
                RenewError::NotRegistry(_) => "NOT_REGISTRY",
            },
            ApiError::Lifecycle(e) => match e {
                LifecycleError::NotSupported(_) => "NOT_SUPPORTED",
                LifecycleError::NoSupervisor => "NO_SUPERVISOR",
                LifecycleError::WrongState { .. } => "WRONG_STATE",
                LifecycleError::Upgrade(UpgradeError::Socket { .. }) => "SUPERVISOR_UNAVAILABLE",
                LifecycleError::Upgrade(_) => "INVALID_STATE",
                LifecycleError::Fuse(_) => "FUSE_FAILED",
                LifecycleError::Restore { .. } => "RESTORE_FAILED",
            },
            _ => "INTERNAL",
        }
    }
}

/// What `skiff virtiofs` serves, and where.
#[derive(Clone, Debug)]
pub struct VirtiofsOptions {
    /// The API socket (`--apisock`).
    pub api_socket: PathBuf,
    /// The vhost-user-fs device (`--sock`, the tag, queues, workers).
    pub device: ServeOptions,
    /// How long one READ of a RAFS mount may take (`--request-timeout`).
    pub request_timeout: std::time::Duration,
    /// Where the images' bootstraps are shared with the node's other daemons.
    pub share: Option<Arc<crate::share::BootstrapShare>>,
    /// The daemon's confinement (`--sandbox`).
    pub sandbox: crate::sandbox::SandboxOptions,
}

/// The life cycle of Kata's sandbox daemon: `exit` ends it (as SIGTERM does); a virtio-fs
/// daemon has no `/dev/fuse` connection to hand over (nydusd neither).
pub struct VirtiofsLifecycle {
    exit: ExitEvent,
}

impl VirtiofsLifecycle {
    /// The life cycle of the daemon whose exit event is `exit`.
    pub fn new(exit: ExitEvent) -> Self {
        Self { exit }
    }
}

const NO_HANDOVER: &str = "a virtio-fs daemon has no /dev/fuse connection to hand over (nor has \
                           nydusd's): a new VM gets a new daemon";

impl Lifecycle for VirtiofsLifecycle {
    fn send_fd(&self) -> Result<(), LifecycleError> {
        Err(LifecycleError::NotSupported(NO_HANDOVER))
    }

    fn takeover(&self) -> Result<(), LifecycleError> {
        Err(LifecycleError::NotSupported(NO_HANDOVER))
    }

    fn start(&self) -> Result<(), LifecycleError> {
        Err(LifecycleError::NotSupported(NO_HANDOVER))
    }

    fn exit(&self) -> Result<(), LifecycleError> {
        tracing::info!("exit requested over the API");
        self.exit.notify(ExitReason::Requested);
        Ok(())
    }
}

/// Runs Kata's sandbox daemon until SIGTERM, SIGINT or `PUT /api/v1/daemon/exit`: the
/// vhost-user-fs device on `opts.device.socket` serving an (initially empty) sandbox tree, and
/// the API on `opts.api_socket`. Both sockets are removed on the way out. A panic in any of
/// its threads stops the daemon with [`ApiError::Fatal`].
pub fn run_virtiofs(opts: &VirtiofsOptions) -> Result<(), ApiError> {
    let exit = crate::runtime::start_daemon().map_err(ApiError::ExitEvent)?;
    // Before any thread or socket: everything from here on happens inside.
    crate::sandbox::enter(&opts.sandbox).map_err(ApiError::Sandbox)?;
    let _signals = SignalGuard::install(&exit).map_err(ApiError::Signal)?;
    run_until(opts, &exit)
}

/// [`run_virtiofs`], under its earlier name.
pub fn run(opts: &VirtiofsOptions) -> Result<(), ApiError> {
    run_virtiofs(opts)
}

/// Runs Kata's sandbox daemon until `exit` is set; see [`run_virtiofs`].
pub fn run_until(opts: &VirtiofsOptions, exit: &ExitEvent) -> Result<(), ApiError> {
    let started = Instant::now();
    let fs = Arc::new(
        DaemonFs::kata()
            .with_request_timeout(opts.request_timeout)
            .with_bootstrap_share(opts.share.clone()),
    );
    let daemon = Arc::new(Daemon {
        fs: fs.clone(),
        id: None,
        supervisor: None,
        lifecycle: Arc::new(VirtiofsLifecycle::new(exit.clone())),
    });
    // Kata boots the VM as soon as the daemon says RUNNING: the device socket listens first.
    let vhost = VhostListener::bind(&opts.device)?;
    let device = {
        let (vfs, exit) = (fs.vfs(), exit.clone());
        threads::spawn(ThreadKind::Vhost, "skiff-vhost", move || {
            let served = vhost.serve(vfs, &exit);
            if let Err(e) = &served {
                // The device is the daemon's reason to be: without it, stop.
                exit.notify(ExitReason::Fatal(format!(
                    "the vhost-user-fs device stopped: {}",
                    crate::util::error_chain(e)
                )));
            }
            served
        })
        .map_err(ApiError::SpawnThread)?
    };
    let api = match ApiServer::start(&opts.api_socket, daemon) {
        Ok(api) => api,
        Err(e) => {
            exit.notify(ExitReason::Requested);
            let _ = join_device(device);
            return Err(e);
        }
    };
    fs.set_state(DaemonState::Running);
    tracing::info!(
        api = %opts.api_socket.display(),
        socket = %opts.device.socket.display(),
        ms = started.elapsed().as_millis() as u64,
        "RUNNING"
    );

    exit.wait(None);
    fs.set_state(DaemonState::Stopped);
    tracing::info!(reason = ?exit.reason(), "shutting down");
    api.shutdown();
    let device = join_device(device);
    fs.finish();
    match exit.reason() {
        Some(ExitReason::Fatal(report)) if device.is_ok() => Err(ApiError::Fatal(report)),
        _ => device,
    }
}

fn join_device(device: thread::JoinHandle<Result<(), VhostError>>) -> Result<(), ApiError> {
    match device.join() {
        Ok(r) => r.map_err(ApiError::Vhost),
        // Reported by the panic hook, which also set the exit event.
        Err(_) => Err(ApiError::Fatal("the vhost-user-fs thread panicked".into())),
    }
}
