//! nydus-snapshotter's host daemon (`skiff fuse`): RAFS images served over `/dev/fuse`, and
//! the failover and hot-upgrade hand-over its supervisor drives.
//!
//! States, as nydusd names them: a daemon that mounts starts `RUNNING`. A daemon started with
//! `--upgrade`, or that finds its mountpoint still mounted by a predecessor that died, stays
//! `INIT` until `takeover` (state and `/dev/fuse` descriptor from the supervisor: `READY`)
//! and `start` (serving again: `RUNNING`). `exit` stops serving and leaves the mount to the
//! successor; SIGTERM unmounts.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::runtime::{ExitEvent, ExitReason};

use base64::Engine;
use fuse_backend_rs::api::Vfs;

use super::upgrade::{self, SavedState, UpgradeError, STATE_FORMAT, STATE_VERSION};
use super::{DaemonFs, DaemonState, Lifecycle, LifecycleError, RafsRequest, RafsSpec};
use crate::fuse::FuseService;
use crate::util::sync::lock;

/// The FUSE source name of the mount, as nydusd's (`rafs`).
pub const FSNAME: &str = "rafs";

/// What to do with requests a crashed predecessor read but never answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverPolicy {
    /// Nothing: they wait forever (the reader hangs).
    None,
    /// Ask the kernel to send them again (FUSE_NOTIFY_RESEND).
    Resend,
}

/// Reads a RAFS mount's configuration (nydusd's JSON) into what it means.
pub type ConfigParser = fn(&str) -> Result<RafsSpec, String>;

/// How the host daemon runs.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// The FUSE mountpoint.
    pub mountpoint: PathBuf,
    /// FUSE worker threads (`--thread-num`): the most reads that may wait at once (see
    /// [`crate::fuse::FuseThreads`]); one thread reads the requests.
    pub threads: usize,
    /// See [`FailoverPolicy`].
    pub failover_policy: FailoverPolicy,
    /// The supervisor socket (`--supervisor`).
    pub supervisor: Option<PathBuf>,
    /// `--id`.
    pub id: Option<String>,
    /// The image of a dedicated daemon (`--bootstrap`, `--config`).
    pub dedicated: Option<RafsRequest>,
    /// Where in the FUSE filesystem the dedicated image goes (`--virtual-mountpoint`, `/`).
    pub dedicated_at: String,
    /// The configuration file of a dedicated daemon, read again at a takeover: the
    /// snapshotter rewrites it when it renews credentials.
    pub config_file: Option<PathBuf>,
    /// Reads configurations of mounts taken over.
    pub parse_config: ConfigParser,
}

/// The host daemon's FUSE side and life cycle.
pub struct HostDaemon {
    fs: Arc<DaemonFs>,
    opts: HostOptions,
    service: Mutex<Option<FuseService<Arc<Vfs>>>>,
    /// Set by `exit`: end without unmounting.
    exiting: AtomicBool,
    /// The daemon's exit event: `exit`, and the mount going away, set it.
    exit: ExitEvent,
}

/// Whether the mountpoint is still mounted (by /proc/self/mounts: a stat could wait on a
/// FUSE daemon that is gone) while the API socket exists but nobody answers on it: a
/// predecessor died, and its connection waits for a successor.
pub fn predecessor_crashed(mountpoint: &Path, api_socket: &Path) -> bool {
    if !is_mounted(mountpoint) {
        return false;
    }
    std::fs::symlink_metadata(api_socket).is_ok() && UnixStream::connect(api_socket).is_err()
}

/// Whether something is mounted at `path`, by /proc/self/mounts.
pub fn is_mounted(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let want = path
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .map(|p| p.join(path.file_name().unwrap_or_default()))
        .unwrap_or_else(|| path.to_path_buf());
    let mounts = std::fs::read("/proc/self/mounts").unwrap_or_default();
    String::from_utf8_lossy(&mounts)
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|m| unescape_mount_path(m) == want.as_os_str().as_bytes())
}

fn unescape_mount_path(s: &str) -> Vec<u8> {
    // /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

impl HostDaemon {
    /// A host daemon over `fs` (a [`super::Layout::Host`] tree), not mounted yet, of the
    /// daemon whose exit event is `exit`.
    pub fn new(fs: Arc<DaemonFs>, opts: HostOptions, exit: ExitEvent) -> Arc<Self> {
        Arc::new(Self {
            fs,
            opts,
            service: Mutex::new(None),
            exiting: AtomicBool::new(false),
            exit,
        })
    }

    /// Mounts the dedicated image (if any), then the FUSE filesystem, and serves: `RUNNING`.
    pub fn mount_and_serve(&self) -> Result<(), LifecycleError> {
        if let Some(req) = &self.opts.dedicated {
            let at = &self.opts.dedicated_at;
            self.fs
                .mount_rafs(at, req.clone())
                .map_err(|e| LifecycleError::Restore {
                    mountpoint: at.clone(),
                    source: Box::new(e),
                })?;
        }
        let service = FuseService::mount(
            &self.opts.mountpoint,
            FSNAME,
            self.fs.vfs(),
            crate::fuse::FuseThreads {
                readers: 1,
                workers: self.opts.threads,
            },
            true,
            Some(self.exit.clone()),
        )
        .map_err(LifecycleError::Fuse)?;
        service.start().map_err(LifecycleError::Fuse)?;
        *self.service_lock() = Some(service);
        self.fs.set_state(DaemonState::Running);
        Ok(())
    }

    fn service_lock(&self) -> std::sync::MutexGuard<'_, Option<FuseService<Arc<Vfs>>>> {
        lock(&self.service)
    }

    /// Ends the daemon: after `exit`, leaving the mount (the successor has the connection);
    /// before any mount (waiting for a takeover), touching nothing; else unmounting.
    pub fn shut_down(&self) {
        let service = self.service_lock().take();
        if let Some(service) = service {
            if self.exiting.load(Ordering::SeqCst) {
                service.leave_mounted();
                tracing::info!("exited, leaving the mount to the successor");
            } else if let Err(e) = service.umount() {
                tracing::error!(error = %crate::util::error_chain(&e), "unmounting failed");
            }
        }
        self.fs.set_state(DaemonState::Stopped);
    }

    fn supervisor(&self) -> Result<&Path, LifecycleError> {
        self.opts
            .supervisor
            .as_deref()
            .ok_or(LifecycleError::NoSupervisor)
    }

    fn state_name(&self) -> &'static str {
        self.fs.state().as_str()
    }
}

impl Lifecycle for HostDaemon {
    fn send_fd(&self) -> Result<(), LifecycleError> {
        let supervisor = self.supervisor()?;
        let g = self.service_lock();
        let service = g.as_ref().ok_or(LifecycleError::WrongState {
            state: self.state_name(),
            what: "there is no FUSE connection to send yet",
        })?;
        let fd = service.fuse_fd().ok_or(LifecycleError::WrongState {
            state: self.state_name(),
            what: "the FUSE connection is gone",
        })?;
        let vfs = self.fs.vfs().save_to_bytes().map_err(|e| {
            LifecycleError::Upgrade(UpgradeError::BadState(format!("saving the Vfs: {e:?}")))
        })?;
        let state = SavedState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            id: self.opts.id.clone(),
            mountpoint: self.opts.mountpoint.clone(),
            vfs: base64::engine::general_purpose::STANDARD.encode(vfs),
            mounts: self
                .fs
                .saved_mounts()
                .map_err(|e| LifecycleError::Restore {
                    mountpoint: String::new(),
                    source: Box::new(e),
                })?,
        };
        upgrade::send(supervisor, &state.to_bytes(), fd)?;
        Ok(())
    }

    fn takeover(&self) -> Result<(), LifecycleError> {
        let supervisor = self.supervisor()?;
        if self.fs.state() != DaemonState::Init {
            return Err(LifecycleError::WrongState {
                state: self.state_name(),
                what: "only a daemon waiting in INIT takes over",
            });
        }
        let (bytes, file) = upgrade::receive(supervisor)?;
        let state = SavedState::from_bytes(&bytes)?;
        if state.mountpoint != self.opts.mountpoint {
            return Err(UpgradeError::BadState(format!(
                "the state is of mountpoint {}, this daemon serves {}",
                state.mountpoint.display(),
                self.opts.mountpoint.display()
            ))
            .into());
        }
        let mut vfs_bytes = base64::engine::general_purpose::STANDARD
            .decode(&state.vfs)
            .map_err(|e| UpgradeError::BadState(format!("vfs: {e}")))?;
        self.fs
            .vfs()
            .restore_from_bytes(&mut vfs_bytes)
            .map_err(|e| UpgradeError::BadState(format!("restoring the Vfs: {e:?}")))?;
        for saved in &state.mounts {
            // A dedicated daemon's configuration file is the snapshotter's current one (it
            // rewrites it when credentials are renewed); the state's copy may be older.
            let dedicated =
                self.opts.dedicated.is_some() && saved.mountpoint == self.opts.dedicated_at;
            let config = match &self.opts.config_file {
                Some(f) if dedicated => std::fs::read_to_string(f).unwrap_or_else(|e| {
                    tracing::warn!(file = %f.display(), error = %e, "cannot read the config again; using the one handed over");
                    saved.config.clone()
                }),
                _ => saved.config.clone(),
            };
            let spec = (self.opts.parse_config)(&config).map_err(|e| LifecycleError::Restore {
                mountpoint: saved.mountpoint.clone(),
                source: e.into(),
            })?;
            let req = RafsRequest {
                source: saved.source.clone(),
                config,
                spec,
                prefetch_files: saved.prefetch_files.clone(),
            };
            self.fs
                .restore_rafs(saved, req)
                .map_err(|e| LifecycleError::Restore {
                    mountpoint: saved.mountpoint.clone(),
                    source: Box::new(e),
                })?;
        }
        let service = FuseService::adopt(
            &self.opts.mountpoint,
            FSNAME,
            self.fs.vfs(),
            file,
            crate::fuse::FuseThreads {
                readers: 1,
                workers: self.opts.threads,
            },
            Some(self.exit.clone()),
        )
        .map_err(LifecycleError::Fuse)?;
        *self.service_lock() = Some(service);
        self.fs.set_state(DaemonState::Ready);
        tracing::info!(mounts = state.mounts.len(), "took over; READY");
        Ok(())
    }

    fn start(&self) -> Result<(), LifecycleError> {
        if self.fs.state() != DaemonState::Ready {
            return Err(LifecycleError::WrongState {
                state: self.state_name(),
                what: "start follows a takeover (READY)",
            });
        }
        let g = self.service_lock();
        let service = g.as_ref().ok_or(LifecycleError::WrongState {
            state: self.state_name(),
            what: "no FUSE connection taken over",
        })?;
        service.start().map_err(LifecycleError::Fuse)?;
        if self.opts.failover_policy == FailoverPolicy::Resend {
            // Requests a crashed predecessor read but never answered would wait forever.
            match service.notify_resend() {
                Ok(()) => tracing::info!("asked the kernel to resend requests left unanswered"),
                Err(e) => tracing::error!(
                    error = %crate::util::error_chain(&e),
                    "the kernel did not take FUSE_NOTIFY_RESEND (Linux 6.9 or later has it): \
                     requests a crashed predecessor read may never be answered"
                ),
            }
        }
        self.fs.set_state(DaemonState::Running);
        tracing::info!("RUNNING after takeover");
        Ok(())
    }

    fn unmounted(&self, parent: u64, name: &str) {
        if let Some(s) = self.service_lock().as_ref() {
            if let Err(e) = s.notify_inval_entry(parent, name) {
                tracing::debug!(error = %crate::util::error_chain(&e), name, "the kernel keeps the unmounted entry until it times out");
            }
        }
    }

    fn exit(&self) -> Result<(), LifecycleError> {
        // Every request read is answered before this returns: nothing is left half-done for
        // the successor, which only gets what the kernel still queues.
        if let Some(s) = self.service_lock().as_ref() {
            s.stop();
        }
        self.exiting.store(true, Ordering::SeqCst);
        self.fs.set_state(DaemonState::Stopped);
        self.exit.notify(ExitReason::Requested);
        tracing::info!("exit requested: stopped serving");
        Ok(())
    }
}
