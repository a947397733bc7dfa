//! A FUSE session, its reader threads and its worker pool, which can be started and stopped
//! separately from the mount: the host daemon hands the `/dev/fuse` connection to a successor
//! without unmounting, and a successor serves a connection it did not mount.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseSession, FuseSessionExt};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::channel::{ChannelReader, ReaderEnd};
use super::FuseError;
use crate::fs::ReadReadiness;
use crate::runtime::pool::WorkerPool;
use crate::runtime::threads::{self as rt_threads, ThreadKind};
use crate::runtime::{ExitEvent, ExitReason};
use crate::util::sync::lock;

/// How long [`FuseService::stop`] waits for the reads workers are answering (each has a
/// deadline of its own, 30 s by default): then it goes on, and a reply that comes later is
/// still written to the connection.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The threads of a FUSE service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuseThreads {
    /// Threads reading requests from `/dev/fuse` (1 is enough: see `channel`).
    pub readers: usize,
    /// Most workers answering reads that may wait, started on demand (see `runtime::pool`).
    pub workers: usize,
}

impl Default for FuseThreads {
    fn default() -> Self {
        Self {
            readers: 1,
            workers: crate::runtime::DEFAULT_WORKERS,
        }
    }
}

/// A failed notification, in the shape `try_with_writer` wants.
struct ResendError(String);

impl From<fuse_backend_rs::transport::Error> for ResendError {
    fn from(e: fuse_backend_rs::transport::Error) -> Self {
        ResendError(e.to_string())
    }
}

/// A FUSE connection served by reader threads and a pool of workers.
pub struct FuseService<F: FileSystem + Send + Sync + 'static> {
    mountpoint: PathBuf,
    session: Mutex<Option<FuseSession>>,
    /// A handle to the filesystem the server serves, asked whether reads are ready.
    fs: F,
    server: Arc<Server<F>>,
    threads: FuseThreads,
    /// The reader threads.
    readers: Mutex<Vec<JoinHandle<()>>>,
    /// The running readers' stop event and worker pool.
    running: Mutex<Option<(Arc<EventFd>, Arc<WorkerPool>)>>,
    /// Set when a reader ends by itself: the filesystem was unmounted from outside, or the
    /// connection failed.
    ended: Arc<AtomicBool>,
    /// Set while [`Self::stop`] stops the readers (their ending is then no news).
    stopping: Arc<AtomicBool>,
    /// Told when a reader ends by itself: the daemon has nothing left to serve.
    exit: Option<ExitEvent>,
}

impl<F> FuseService<F>
where
    F: FileSystem + ReadReadiness + Clone + Send + Sync + 'static,
{
    fn session_err(mountpoint: &Path, what: String) -> FuseError {
        FuseError::Session {
            mountpoint: mountpoint.display().to_string(),
            what,
        }
    }

    /// Mounts `fs` read-only at `mountpoint` (FUSE source name `fsname`), not serving yet.
    pub fn mount(
        mountpoint: &Path,
        fsname: &str,
        fs: F,
        threads: FuseThreads,
        allow_other: bool,
        exit: Option<ExitEvent>,
    ) -> Result<Self, FuseError> {
        let mut session = FuseSession::new(mountpoint, fsname, "", true)
            .map_err(|e| Self::session_err(mountpoint, e.to_string()))?;
        session.set_allow_other(allow_other);
        session
            .mount()
            .map_err(|e| Self::session_err(mountpoint, format!("mount: {e}")))?;
        tracing::info!(mountpoint = %mountpoint.display(), "mounted");
        Ok(Self::with_session(mountpoint, session, fs, threads, exit))
    }

    /// Takes over the FUSE connection `file` (a `/dev/fuse` descriptor another process
    /// mounted at `mountpoint`), not serving yet. The kernel has already negotiated the
    /// connection (FUSE_INIT): `fs` must be set up as its predecessor's was.
    pub fn adopt(
        mountpoint: &Path,
        fsname: &str,
        fs: F,
        file: File,
        threads: FuseThreads,
        exit: Option<ExitEvent>,
    ) -> Result<Self, FuseError> {
        // The descriptor shares its open file description with the predecessor's, which the
        // session opened non-blocking; make sure, since the readers' polling relies on it.
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this process owns (`file`), with no pointers.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above; O_NONBLOCK added to the flags just read.
        let set =
            flags >= 0 && unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } >= 0;
        if !set {
            return Err(Self::session_err(
                mountpoint,
                format!(
                    "setting the FUSE descriptor non-blocking: {}",
                    std::io::Error::last_os_error()
                ),
            ));
        }
        let mut session = FuseSession::new(mountpoint, fsname, "", true)
            .map_err(|e| Self::session_err(mountpoint, e.to_string()))?;
        session.set_fuse_file(file);
        Ok(Self::with_session(mountpoint, session, fs, threads, exit))
    }

    fn with_session(
        mountpoint: &Path,
        session: FuseSession,
        fs: F,
        threads: FuseThreads,
        exit: Option<ExitEvent>,
    ) -> Self {
        Self {
            mountpoint: mountpoint.to_owned(),
            session: Mutex::new(Some(session)),
            server: Arc::new(Server::new(fs.clone())),
            fs,
            threads: FuseThreads {
                readers: threads.readers.max(1),
                workers: threads.workers.max(1),
            },
            readers: Mutex::new(Vec::new()),
            running: Mutex::new(None),
            ended: Arc::new(AtomicBool::new(false)),
            stopping: Arc::new(AtomicBool::new(false)),
            exit,
        }
    }

    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The `/dev/fuse` descriptor (to send to a successor), while the session has one.
    pub fn fuse_fd(&self) -> Option<RawFd> {
        lock(&self.session)
            .as_ref()?
            .get_fuse_file()
            .map(|f| f.as_raw_fd())
    }

    /// Starts the readers (and the worker pool, whose workers start on demand).
    pub fn start(&self) -> Result<(), FuseError> {
        let session = lock(&self.session);
        let session = session
            .as_ref()
            .ok_or_else(|| Self::session_err(&self.mountpoint, "no session".into()))?;
        let mut readers = lock(&self.readers);
        if !readers.is_empty() {
            return Ok(());
        }
        self.ended.store(false, Ordering::SeqCst);
        self.stopping.store(false, Ordering::SeqCst);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| {
            Self::session_err(&self.mountpoint, format!("creating the stop event: {e}"))
        })?);
        let pool = Arc::new(WorkerPool::new(self.threads.workers));
        let file = session
            .get_fuse_file()
            .ok_or_else(|| Self::session_err(&self.mountpoint, "no /dev/fuse file".into()))?;
        for i in 0..self.threads.readers {
            // A descriptor of the same open file: replies must go where requests came from.
            let file =
                Arc::new(file.try_clone().map_err(|e| {
                    Self::session_err(&self.mountpoint, format!("dup /dev/fuse: {e}"))
                })?);
            let reader = ChannelReader {
                fs: self.fs.clone(),
                file,
                stop: stop.clone(),
                server: self.server.clone(),
                pool: pool.clone(),
                bufsize: session.bufsize(),
            };
            let (ended, stopping, exit) =
                (self.ended.clone(), self.stopping.clone(), self.exit.clone());
            let h = rt_threads::spawn(ThreadKind::Fuse, format!("skiff-fuse-{i}"), move || {
                let end = reader.run();
                if let ReaderEnd::Failed(why) = &end {
                    tracing::error!(error = %why, "FUSE reader stopped");
                }
                if end != ReaderEnd::Stopped && !stopping.load(Ordering::SeqCst) {
                    // Unmounted from outside, or the connection failed.
                    ended.store(true, Ordering::SeqCst);
                    if let Some(e) = &exit {
                        e.notify(ExitReason::Requested);
                    }
                }
            })
            .map_err(FuseError::Thread)?;
            readers.push(h);
        }
        *lock(&self.running) = Some((stop, pool));
        tracing::info!(
            mountpoint = %self.mountpoint.display(),
            readers = self.threads.readers,
            workers = self.threads.workers,
            "serving"
        );
        // The kernel learns the root's attributes (and keeps them as long as the filesystem
        // says) only when someone asks. Asked now, while this daemon serves, they are at hand
        // when a later stat of the mountpoint comes while no daemon serves: a successor's
        // setup after a crash, or a supervisor checking the mount. From a thread of its own,
        // so that nothing here waits on the answer.
        let mp = self.mountpoint.clone();
        let _ = rt_threads::spawn(ThreadKind::Housekeeping, "skiff-root-attr", move || {
            let _ = std::fs::metadata(&mp);
        });
        Ok(())
    }

    /// Whether a reader ended by itself (unmounted from outside, connection failed).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Stops the readers, and waits for the workers to answer the requests they have (at most
    /// [`DRAIN_TIMEOUT`]). The mount stays; requests that arrive meanwhile wait in the kernel.
    pub fn stop(&self) {
        let handles: Vec<JoinHandle<()>> = lock(&self.readers).drain(..).collect();
        let running = lock(&self.running).take();
        if handles.is_empty() && running.is_none() {
            return;
        }
        self.stopping.store(true, Ordering::SeqCst);
        if let Some((stop, _)) = &running {
            if let Err(e) = stop.write(1) {
                tracing::error!(error = %e, "cannot stop the FUSE readers");
            }
        }
        for h in handles {
            if h.join().is_err() {
                tracing::error!("a FUSE reader panicked");
            }
        }
        if let Some((_, pool)) = running {
            if !pool.wait_idle(DRAIN_TIMEOUT) {
                tracing::warn!(
                    "FUSE workers still busy after {DRAIN_TIMEOUT:?}; their replies go out when they are done"
                );
            }
        }
    }

    /// Asks the kernel to send again the requests a predecessor read but never answered
    /// (FUSE_NOTIFY_RESEND, Linux 6.9 and later): after a crash they would wait forever.
    pub fn notify_resend(&self) -> Result<(), FuseError> {
        let mut g = lock(&self.session);
        let session = g
            .as_mut()
            .ok_or_else(|| Self::session_err(&self.mountpoint, "no session".into()))?;
        let server = self.server.clone();
        session
            .try_with_writer(|w| {
                server
                    .notify_resend(w)
                    .map_err(|e| ResendError(e.to_string()))
            })
            .map_err(|e: ResendError| {
                Self::session_err(&self.mountpoint, format!("notify resend: {}", e.0))
            })
    }

    /// Tells the kernel to forget the entry `name` of directory inode `parent`
    /// (FUSE_NOTIFY_INVAL_ENTRY).
    pub fn notify_inval_entry(&self, parent: u64, name: &str) -> Result<(), FuseError> {
        let name = std::ffi::CString::new(name)
            .map_err(|_| Self::session_err(&self.mountpoint, "a name with NUL".into()))?;
        let mut g = lock(&self.session);
        let session = g
            .as_mut()
            .ok_or_else(|| Self::session_err(&self.mountpoint, "no session".into()))?;
        let server = self.server.clone();
        session
            .try_with_writer(|w| {
                server
                    .notify_inval_entry(w, parent, &name)
                    .map(drop)
                    .map_err(|e| ResendError(e.to_string()))
            })
            .map_err(|e: ResendError| {
                Self::session_err(&self.mountpoint, format!("notify inval entry: {}", e.0))
            })
    }

    /// Stops serving and unmounts.
    pub fn umount(&self) -> Result<(), FuseError> {
        self.stopping.store(true, Ordering::SeqCst);
        let mut g = lock(&self.session);
        tracing::info!(mountpoint = %self.mountpoint.display(), "unmounting");
        let r = match g.as_mut() {
            // The readers see the device go (ENODEV) and end.
            Some(s) => s.umount(),
            None => Ok(()),
        };
        drop(g);
        self.stop();
        r.map_err(|e| Self::session_err(&self.mountpoint, format!("umount: {e}")))
    }

    /// Stops serving and lets go of the connection without unmounting: the mount stays for
    /// whoever holds the descriptor now (a successor, or the supervisor that will give it
    /// to one).
    pub fn leave_mounted(&self) {
        self.stop();
        if let Some(s) = lock(&self.session).take() {
            // Dropping a session unmounts. Forgotten, it keeps its descriptor open until the
            // process exits, which it is about to; closing a descriptor does not unmount.
            std::mem::forget(s);
        }
    }
}
