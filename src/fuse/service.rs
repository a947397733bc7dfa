//! A FUSE session and its worker threads, which can be started and stopped separately from the
//! mount: the host daemon hands the `/dev/fuse` connection to a successor without unmounting,
//! and a successor serves a connection it did not mount.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseSession, FuseSessionExt};

use super::FuseError;
use crate::runtime::threads::{self as rt_threads, ThreadKind};
use crate::runtime::{ExitEvent, ExitReason};
use crate::util::sync::lock;

/// A failed notification, in the shape `try_with_writer` wants.
struct ResendError(String);

impl From<fuse_backend_rs::transport::Error> for ResendError {
    fn from(e: fuse_backend_rs::transport::Error) -> Self {
        ResendError(e.to_string())
    }
}

/// A FUSE connection served by a pool of workers.
pub struct FuseService<F: FileSystem + Send + Sync + 'static> {
    mountpoint: PathBuf,
    session: Mutex<Option<FuseSession>>,
    server: Arc<Server<F>>,
    threads: usize,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Set when a worker ends by itself: the filesystem was unmounted from outside, or the
    /// connection failed.
    ended: Arc<AtomicBool>,
    /// Set while [`Self::stop`] wakes the workers (their ending is then no news).
    stopping: Arc<AtomicBool>,
    /// Told when a worker ends by itself: the daemon has nothing left to serve.
    exit: Option<ExitEvent>,
}

impl<F: FileSystem + Send + Sync + 'static> FuseService<F> {
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
        threads: usize,
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
        threads: usize,
        exit: Option<ExitEvent>,
    ) -> Result<Self, FuseError> {
        // The descriptor shares its open file description with the predecessor's, which the
        // session opened non-blocking; make sure, since the channels' polling relies on it.
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
        threads: usize,
        exit: Option<ExitEvent>,
    ) -> Self {
        Self {
            mountpoint: mountpoint.to_owned(),
            session: Mutex::new(Some(session)),
            server: Arc::new(Server::new(fs)),
            threads: threads.max(1),
            workers: Mutex::new(Vec::new()),
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

    /// Starts the workers.
    pub fn start(&self) -> Result<(), FuseError> {
        let session = lock(&self.session);
        let session = session
            .as_ref()
            .ok_or_else(|| Self::session_err(&self.mountpoint, "no session".into()))?;
        let mut workers = lock(&self.workers);
        if !workers.is_empty() {
            return Ok(());
        }
        self.ended.store(false, Ordering::SeqCst);
        self.stopping.store(false, Ordering::SeqCst);
        for i in 0..self.threads {
            let channel = session
                .new_channel()
                .map_err(|e| Self::session_err(&self.mountpoint, format!("channel: {e}")))?;
            let (server, ended, stopping, exit) = (
                self.server.clone(),
                self.ended.clone(),
                self.stopping.clone(),
                self.exit.clone(),
            );
            let h = rt_threads::spawn(ThreadKind::Fuse, format!("skiff-fuse-{i}"), move || {
                super::worker(channel, &server);
                if !stopping.load(Ordering::SeqCst) {
                    // Unmounted from outside, or the connection failed.
                    ended.store(true, Ordering::SeqCst);
                    if let Some(e) = &exit {
                        e.notify(ExitReason::Requested);
                    }
                }
            })
            .map_err(FuseError::Thread)?;
            workers.push(h);
        }
        tracing::info!(mountpoint = %self.mountpoint.display(), threads = self.threads, "serving");
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

    /// Whether a worker ended by itself (unmounted from outside, connection failed).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Stops the workers, each after the request it is handling is answered, and waits for
    /// them. The mount stays; requests that arrive meanwhile wait in the kernel.
    pub fn stop(&self) {
        let handles: Vec<JoinHandle<()>> = lock(&self.workers).drain(..).collect();
        if handles.is_empty() {
            return;
        }
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(s) = lock(&self.session).as_ref() {
            let _ = s.wake();
        }
        for h in handles {
            if h.join().is_err() {
                tracing::error!("a FUSE worker panicked");
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
            Some(s) => {
                let r = s.umount();
                let _ = s.wake();
                r
            }
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
