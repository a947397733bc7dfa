//! The socket lifecycle: listen, serve one VMM at a time, go back to listening when it
//! disconnects, and shut down cleanly on request.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileSystem;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::SigId;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::device::{VirtioFsDevice, DEFAULT_QUEUE_SIZE};
use super::{backend_error, VhostError};

/// How often the stop flag is checked while waiting for, or serving, a VMM.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Name of the thread handling vhost-user messages from the VMM.
const DAEMON_THREAD_NAME: &str = "skiff-vhost-user";

/// What to serve, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// Path of the vhost-user Unix socket the VMM connects to. A stale socket left at this
    /// path is replaced; anything else there is an error.
    pub socket: PathBuf,
    /// The virtio-fs tag the guest mounts (1 to 36 bytes), exposed in the config space.
    pub tag: String,
    /// Number of request queues, each served by its own worker thread (at least 1).
    pub threads: usize,
    /// Largest queue size offered to the VMM: a power of two, at most 1024.
    pub queue_size: u16,
    /// Offer the config space (the tag) to the VMM; see [`VirtioFsDevice::with_config_space`].
    pub advertise_config: bool,
}

impl ServeOptions {
    /// Options for `socket` and `tag`, with one request queue of the default size.
    pub fn new(socket: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        ServeOptions {
            socket: socket.into(),
            tag: tag.into(),
            threads: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            advertise_config: false,
        }
    }
}

/// Serves `fs` on `opts.socket` until SIGTERM or SIGINT, then removes the socket and returns.
///
/// VMMs are served one at a time; after one disconnects (a VM shut down or rebooted) the
/// next connection is accepted, without restarting. A second SIGTERM/SIGINT while shutting
/// down terminates the process at once, and so do these signals after `serve` returned.
pub fn serve<F>(fs: Arc<F>, opts: &ServeOptions) -> Result<(), VhostError>
where
    F: FileSystem + Send + Sync + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let _signals = SignalGuard::install(&stop)?;
    serve_until(fs, opts, stop)
}

/// Serves `fs` on `opts.socket` until `stop` becomes true, then removes the socket and
/// returns. The flag is checked every 100 ms.
///
/// If `stop` is set while a VMM is connected, the device's workers are stopped and the
/// function returns without waiting for the VMM: the thread reading its vhost-user messages
/// ends when the VMM closes the connection. Disconnect the VMM first for a quiet stop.
pub fn serve_until<F>(
    fs: Arc<F>,
    opts: &ServeOptions,
    stop: Arc<AtomicBool>,
) -> Result<(), VhostError>
where
    F: FileSystem + Send + Sync + 'static,
{
    // Reject bad options before touching the socket path.
    VirtioFsDevice::new(fs.clone(), &opts.tag, opts.threads, opts.queue_size)?;

    let mut socket = SocketFile::bind(&opts.socket)?;
    let epoll = Epoll::new().map_err(VhostError::Poll)?;
    epoll
        .ctl(
            ControlOperation::Add,
            socket.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .map_err(VhostError::Poll)?;
    tracing::info!(
        socket = %opts.socket.display(),
        tag = %opts.tag,
        queues = opts.threads,
        queue_size = opts.queue_size,
        "vhost-user-fs listening"
    );

    let mut connection = 0u64;
    while !stop.load(Ordering::Acquire) {
        if !wait_readable(&epoll)? {
            continue;
        }
        connection += 1;
        serve_connection(&fs, opts, &mut socket.listener, &stop, connection)?;
    }
    tracing::info!(socket = %opts.socket.display(), "vhost-user-fs shutting down");
    Ok(())
}

/// Waits up to [`POLL_INTERVAL`] for a pending connection.
fn wait_readable(epoll: &Epoll) -> Result<bool, VhostError> {
    let mut events = [EpollEvent::default(); 1];
    let timeout = i32::try_from(POLL_INTERVAL.as_millis()).unwrap_or(i32::MAX);
    match epoll.wait(timeout, &mut events) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(VhostError::Poll(e)),
    }
}

/// Accepts the pending connection and serves it until the VMM disconnects or `stop` is set.
fn serve_connection<F>(
    fs: &Arc<F>,
    opts: &ServeOptions,
    listener: &mut Listener,
    stop: &AtomicBool,
    connection: u64,
) -> Result<(), VhostError>
where
    F: FileSystem + Send + Sync + 'static,
{
    // A fresh device per connection: a new VM starts from a clean negotiation state.
    let device = Arc::new(
        VirtioFsDevice::new(fs.clone(), &opts.tag, opts.threads, opts.queue_size)?
            .with_config_space(opts.advertise_config),
    );
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(DAEMON_THREAD_NAME.to_owned(), device, mem)
        .map_err(|e| VhostError::CreateDaemon(backend_error(e)))?;
    let workers = daemon.get_epoll_handlers();

    if let Err(e) = daemon.start(listener) {
        stop_workers(&workers);
        tracing::warn!(error = %backend_error(e), "accepting a VMM connection failed");
        // Do not spin on a persistent failure (e.g. out of file descriptors).
        thread::sleep(POLL_INTERVAL);
        return Ok(());
    }
    tracing::info!(connection, socket = %opts.socket.display(), "VMM connected");

    let (done_tx, done_rx) = mpsc::channel();
    thread::Builder::new()
        .name("skiff-vhost-wait".to_owned())
        .spawn(move || {
            let result = daemon.wait();
            let _ = done_tx.send(result);
        })
        .map_err(|e| {
            stop_workers(&workers);
            VhostError::SpawnThread(e)
        })?;

    loop {
        match done_rx.recv_timeout(POLL_INTERVAL) {
            Ok(result) => {
                stop_workers(&workers);
                log_disconnect(connection, result);
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Acquire) {
                    stop_workers(&workers);
                    tracing::info!(connection, "stop requested while the VMM is connected");
                    return Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                stop_workers(&workers);
                tracing::warn!(
                    connection,
                    "vhost-user request thread ended without a result"
                );
                return Ok(());
            }
        }
    }
}

/// Tells every queue worker thread of a connection to exit.
fn stop_workers<T: vhost_user_backend::VhostUserBackend>(workers: &[Arc<VringEpollHandler<T>>]) {
    for worker in workers {
        worker.send_exit_event();
    }
}

fn log_disconnect(connection: u64, result: Result<(), vhost_user_backend::Error>) {
    use vhost_user_backend::Error as E;
    match result {
        Ok(())
        | Err(E::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => tracing::info!(connection, "VMM disconnected"),
        Err(e) => tracing::warn!(
            connection,
            error = %backend_error(e),
            "VMM connection ended with an error"
        ),
    }
}

/// The listening socket, whose file is removed when it is dropped.
struct SocketFile {
    listener: Listener,
    path: PathBuf,
    /// Device and inode of the socket file, so that only our own file is removed.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn bind(path: &Path) -> Result<Self, VhostError> {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|source| VhostError::Listen {
            path: path.to_owned(),
            source,
        })?;
        let id = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Ok(SocketFile {
            // Built from a std listener, the vhost listener leaves the file to us.
            listener: Listener::from(listener),
            path: path.to_owned(),
            id,
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let current = fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.id {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove socket");
            }
        }
    }
}

/// Removes a socket file left behind at `path` by an earlier run.
fn remove_stale_socket(path: &Path) -> Result<(), VhostError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VhostError::RemoveStaleSocket {
            path: path.to_owned(),
            source,
        }),
        Ok(meta) if meta.file_type().is_socket() => {
            tracing::info!(socket = %path.display(), "removing stale socket");
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(VhostError::RemoveStaleSocket {
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        Ok(_) => Err(VhostError::SocketPathInUse {
            path: path.to_owned(),
        }),
    }
}

/// SIGTERM/SIGINT handlers that set a stop flag.
///
/// Each signal also gets a handler that performs the default action (terminate) once the
/// flag is set: a second signal during shutdown ends the process at once. When the guard is
/// dropped the flag is set and the flag setters removed, so that the signals terminate the
/// process again as usual after [`serve`] returned. (Removing every handler would leave the
/// signals ignored: signal-hook does not restore the default disposition.)
struct SignalGuard {
    stop: Arc<AtomicBool>,
    setters: Vec<SigId>,
}

impl SignalGuard {
    fn install(stop: &Arc<AtomicBool>) -> Result<Self, VhostError> {
        let mut guard = SignalGuard {
            stop: stop.clone(),
            setters: Vec::new(),
        };
        for signal in [SIGTERM, SIGINT] {
            // Registered first, so it sees the flag as it was before this signal: only a
            // later signal terminates at once.
            signal_hook::flag::register_conditional_default(signal, stop.clone())
                .map_err(VhostError::Signal)?;
            let id =
                signal_hook::flag::register(signal, stop.clone()).map_err(VhostError::Signal)?;
            guard.setters.push(id);
        }
        Ok(guard)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for id in self.setters.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_but_other_files_are_not() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let sock = dir.path().join("s.sock");
        let first = UnixListener::bind(&sock);
        assert!(first.is_ok());
        drop(first);
        assert!(
            sock.exists(),
            "a dropped std listener leaves its file behind"
        );
        assert!(remove_stale_socket(&sock).is_ok());
        assert!(!sock.exists());
        assert!(
            remove_stale_socket(&sock).is_ok(),
            "nothing to remove is fine"
        );

        let file = dir.path().join("regular");
        assert!(fs::write(&file, b"keep me").is_ok());
        assert!(matches!(
            remove_stale_socket(&file),
            Err(VhostError::SocketPathInUse { .. })
        ));
        assert!(file.exists());
    }

    #[test]
    fn socket_file_is_removed_on_drop_only_if_ours() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let sock = dir.path().join("s.sock");
        let bound = SocketFile::bind(&sock);
        assert!(bound.is_ok());
        assert!(sock.exists());
        drop(bound);
        assert!(!sock.exists());

        // Someone replaced the socket while we were serving: leave theirs alone.
        let bound = SocketFile::bind(&sock);
        assert!(bound.is_ok());
        assert!(fs::remove_file(&sock).is_ok());
        let theirs = UnixListener::bind(&sock);
        assert!(theirs.is_ok());
        drop(bound);
        assert!(sock.exists());
    }
}
