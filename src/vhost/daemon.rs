//! The socket lifecycle: listen, serve one VMM at a time, go back to listening when it
//! disconnects, and stop when the daemon's exit event is set.
//!
//! The loop waits on two descriptors and nothing else: the listening socket (or, while a VMM
//! is connected, an eventfd the connection's waiter sets when the VMM goes away) and the exit
//! event. No polling, no timeouts.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::device::{VirtioFsDevice, DEFAULT_QUEUE_SIZE};
use super::{backend_error, VhostError};
use crate::runtime::pool::{WorkerPool, DEFAULT_WORKERS, MAX_WORKERS};
use crate::runtime::threads::{self, ThreadKind};
use crate::runtime::{ExitEvent, ExitReason, SignalGuard, UnixSocketFile};

/// Name of the thread handling vhost-user messages from the VMM.
const DAEMON_THREAD_NAME: &str = "skiff-vhost-user";

/// Epoll tokens.
const TOKEN_EXIT: u64 = 0;
const TOKEN_LISTENER: u64 = 1;
const TOKEN_DISCONNECTED: u64 = 2;

/// What to serve, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// Path of the vhost-user Unix socket the VMM connects to. A stale socket left at this
    /// path is replaced; a live one, or anything else there, is an error.
    pub socket: PathBuf,
    /// The virtio-fs tag the guest mounts (1 to 36 bytes), exposed in the config space.
    pub tag: String,
    /// Number of request queues, each with its own queue thread (at least 1).
    pub threads: usize,
    /// Most worker threads answering requests (1 to 1024): requests in flight at once.
    pub workers: usize,
    /// Largest queue size offered to the VMM: a power of two, at most 1024.
    pub queue_size: u16,
    /// Offer the config space (the tag) to the VMM; see [`VirtioFsDevice::with_config_space`].
    pub advertise_config: bool,
}

impl ServeOptions {
    /// Options for `socket` and `tag`, with one request queue of the default size and the
    /// default worker pool.
    pub fn new(socket: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        ServeOptions {
            socket: socket.into(),
            tag: tag.into(),
            threads: 1,
            workers: DEFAULT_WORKERS,
            queue_size: DEFAULT_QUEUE_SIZE,
            advertise_config: false,
        }
    }

    fn check(&self) -> Result<(), VhostError> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(VhostError::InvalidWorkers(self.workers));
        }
        Ok(())
    }
}

/// Serves `fs` on `opts.socket` until SIGTERM or SIGINT, then removes the socket and returns.
///
/// VMMs are served one at a time; after one disconnects (a VM shut down or rebooted) the
/// next connection is accepted, without restarting. A second SIGTERM/SIGINT while shutting
/// down terminates the process at once, and so do these signals after `serve` returned. A
/// panic in any of the daemon's threads stops it with [`VhostError::Fatal`].
pub fn serve<F>(fs: Arc<F>, opts: &ServeOptions) -> Result<(), VhostError>
where
    F: FileSystem + Send + Sync + 'static,
{
    let exit = crate::runtime::start_daemon().map_err(VhostError::ExitEvent)?;
    let _signals = SignalGuard::install(&exit).map_err(VhostError::Signal)?;
    serve_until(fs, opts, &exit)
}

/// Serves `fs` on `opts.socket` until `exit` is set, then removes the socket and returns: `Ok`
/// for a requested stop or a signal, [`VhostError::Fatal`] when the exit was fatal (a thread
/// panicked).
///
/// If `exit` is set while a VMM is connected, the device's queue threads are stopped and the
/// function returns without waiting for the VMM: the thread reading its vhost-user messages
/// ends when the VMM closes the connection. Disconnect the VMM first for a quiet stop.
pub fn serve_until<F>(fs: Arc<F>, opts: &ServeOptions, exit: &ExitEvent) -> Result<(), VhostError>
where
    F: FileSystem + Send + Sync + 'static,
{
    let listener = VhostListener::bind(opts)?;
    // The VMM-facing loop runs on a thread of kind Vhost, as in the Kata daemon: the thread
    // the vhost-user library starts for the VMM's messages inherits what that thread may do.
    let exit = exit.clone();
    threads::spawn(ThreadKind::Vhost, "skiff-vhost", move || {
        listener.serve(fs, &exit)
    })
    .map_err(VhostError::SpawnThread)?
    .join()
    .unwrap_or_else(|_| {
        Err(VhostError::Fatal(
            "the vhost-user-fs thread panicked".into(),
        ))
    })
}

/// The vhost-user socket, bound and listening: a VMM may connect as soon as this exists (the
/// Kata daemon says RUNNING only then), and is served once [`VhostListener::serve`] runs.
pub struct VhostListener {
    socket: UnixSocketFile,
    opts: ServeOptions,
}

impl VhostListener {
    /// Checks `opts` (before touching the socket path) and binds the socket.
    pub fn bind(opts: &ServeOptions) -> Result<Self, VhostError> {
        opts.check()?;
        // Builds a throwaway device to check the tag, queue count and size.
        VirtioFsDevice::new(Arc::new(NoFs), &opts.tag, opts.threads, opts.queue_size)?;
        let socket = UnixSocketFile::bind(&opts.socket, None)?;
        Ok(Self {
            socket,
            opts: opts.clone(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Serves `fs` until `exit` is set; see [`serve_until`].
    pub fn serve<F>(mut self, fs: Arc<F>, exit: &ExitEvent) -> Result<(), VhostError>
    where
        F: FileSystem + Send + Sync + 'static,
    {
        let opts = &self.opts;
        let std_listener = self
            .socket
            .take_listener()
            .ok_or_else(|| VhostError::Poll(io::Error::other("the socket has no listener")))?;
        // Built from a std listener, the vhost listener leaves the file to `self.socket`.
        let mut listener = Listener::from(std_listener);
        let epoll = Epoll::new().map_err(VhostError::Poll)?;
        add(&epoll, exit.as_raw_fd(), TOKEN_EXIT)?;
        add(&epoll, listener.as_raw_fd(), TOKEN_LISTENER)?;
        tracing::info!(
            socket = %opts.socket.display(),
            tag = %opts.tag,
            queues = opts.threads,
            workers = opts.workers,
            queue_size = opts.queue_size,
            "vhost-user-fs listening"
        );
        // One pool for the daemon's life: a VMM that reconnects finds the same workers.
        // Threads started from here (the first worker) belong to this daemon, whoever
        // started this thread.
        threads::enter(ThreadKind::Vhost, Some(exit));
        let pool = Arc::new(WorkerPool::new(opts.workers));
        pool.start_first().map_err(VhostError::SpawnThread)?;
        let mut connection = 0u64;
        while wait(&epoll)? == TOKEN_LISTENER {
            connection += 1;
            let device = VirtioFsDevice::new(fs.clone(), &opts.tag, opts.threads, opts.queue_size)?
                .with_config_space(opts.advertise_config)
                .with_runtime(pool.clone(), exit.clone());
            serve_connection(device, opts, &mut listener, &epoll, exit, connection)?;
        }
        tracing::info!(socket = %opts.socket.display(), "vhost-user-fs shutting down");
        match exit.reason() {
            Some(ExitReason::Fatal(report)) => Err(VhostError::Fatal(report)),
            _ => Ok(()),
        }
    }
}

/// A filesystem that answers nothing, for checking options before there is a real one.
struct NoFs;

impl FileSystem for NoFs {
    type Inode = u64;
    type Handle = u64;
}

fn add(epoll: &Epoll, fd: i32, token: u64) -> Result<(), VhostError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(VhostError::Poll)
}

/// Waits for the next event; the exit event comes first when both are ready.
fn wait(epoll: &Epoll) -> Result<u64, VhostError> {
    let mut events = [EpollEvent::default(); 3];
    loop {
        match epoll.wait(-1, &mut events) {
            Ok(n) => {
                let tokens = || events[..n].iter().map(|e| e.data());
                if tokens().any(|t| t == TOKEN_EXIT) {
                    return Ok(TOKEN_EXIT);
                }
                if let Some(t) = tokens().next() {
                    return Ok(t);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(VhostError::Poll(e)),
        }
    }
}

/// Accepts the pending connection and serves it until the VMM disconnects or `exit` is set.
fn serve_connection<F>(
    device: VirtioFsDevice<F>,
    opts: &ServeOptions,
    listener: &mut Listener,
    epoll: &Epoll,
    exit: &ExitEvent,
    connection: u64,
) -> Result<(), VhostError>
where
    F: FileSystem + Send + Sync + 'static,
{
    // A fresh device per connection: a new VM starts from a clean negotiation state.
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(DAEMON_THREAD_NAME.to_owned(), Arc::new(device), mem)
        .map_err(|e| VhostError::CreateDaemon(backend_error(e)))?;
    let queues = daemon.get_epoll_handlers();

    if let Err(e) = daemon.start(listener) {
        stop_queues(&queues);
        tracing::warn!(error = %backend_error(e), "accepting a VMM connection failed");
        return Ok(());
    }
    tracing::info!(connection, socket = %opts.socket.display(), "VMM connected");

    let disconnected = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(VhostError::Poll)?;
    let notify = disconnected.try_clone().map_err(VhostError::Poll)?;
    let fatal = exit.clone();
    threads::spawn(ThreadKind::Vhost, "skiff-vhost-wait", move || {
        let result = daemon.wait();
        if let Err(vhost_user_backend::Error::WaitDaemon(_)) = &result {
            // Reported by the panic hook; the daemon cannot go on without the thread.
            fatal.notify(ExitReason::Fatal(
                "the vhost-user request thread panicked".to_owned(),
            ));
        }
        log_disconnect(connection, result);
        let _ = notify.write(1);
    })
    .map_err(|e| {
        stop_queues(&queues);
        VhostError::SpawnThread(e)
    })?;
    // One VMM at a time: the next one waits in the backlog until this one is gone.
    let watch = |op, fd, token| {
        epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, token))
            .map_err(VhostError::Poll)
    };
    watch(
        ControlOperation::Delete,
        listener.as_raw_fd(),
        TOKEN_LISTENER,
    )?;
    watch(
        ControlOperation::Add,
        disconnected.as_raw_fd(),
        TOKEN_DISCONNECTED,
    )?;
    let event = wait(epoll);
    watch(
        ControlOperation::Delete,
        disconnected.as_raw_fd(),
        TOKEN_DISCONNECTED,
    )?;
    watch(ControlOperation::Add, listener.as_raw_fd(), TOKEN_LISTENER)?;
    stop_queues(&queues);
    if event? == TOKEN_EXIT {
        tracing::info!(connection, "stopping while the VMM is connected");
    }
    Ok(())
}

/// Tells every queue thread of a connection to exit.
fn stop_queues<T: vhost_user_backend::VhostUserBackend>(queues: &[Arc<VringEpollHandler<T>>]) {
    for queue in queues {
        queue.send_exit_event();
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
