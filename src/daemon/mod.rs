//! The filesystem trees Skiff's nydusd-compatible daemons serve, and their mount tables:
//!
//! * Kata's sandbox daemon (`skiff virtiofs`): a pseudo root in which the host's shared
//!   directory (a writable passthrough, at `/containers`) and any number of RAFS images (at
//!   `/rafs/<cid>/lowerdir`) are mounted and unmounted while the guest runs;
//! * nydus-snapshotter's host daemon (`skiff fuse`): RAFS images at `/` (dedicated: one image)
//!   or at `/<snapshot id>` (shared: one daemon, many images), served over `/dev/fuse`.
//!
//! [`DaemonFs`] enforces the layout, keeps the table of what is mounted where (with each
//! mount's storage: metrics, credentials, prefetch), and owns the fuse-backend-rs [`Vfs`] the
//! transport serves (the Vfs implements `FileSystem`, so the transports need nothing new).
//! [`Daemon`] adds the daemon's identity and its life cycle (state, failover hand-over).
//!
//! Nothing here speaks HTTP: [`crate::api`] turns requests into these calls.

#![warn(missing_docs)]

pub mod host;
mod layout;
mod metrics;
pub mod rafs;
pub mod spec;
pub mod upgrade;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::api::{BackFileSystem, Vfs, VfsIndex, VfsOptions};
use fuse_backend_rs::passthrough::{self, PassthroughFs};

use crate::format::FormatError;
use crate::fs::RafsFsOptions;
use crate::oci::auth::Credentials;
use crate::oci::RegistryClient;
use crate::storage::config::StorageStack;
use crate::storage::MetricsSnapshot;

pub use layout::{check_rafs_mountpoint, Layout, PASSTHROUGH_MOUNTPOINT};
pub use metrics::{Counters, Sample, SampleKind};
pub use rafs::SKIFF_CACHE_SUBDIR;
pub use spec::{BlobLocation, RafsSpec};

/// Why a mount or unmount was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint does not fit the daemon's layout or the filesystem type.
    #[error("invalid mountpoint {mountpoint:?}: {reason}")]
    InvalidMountpoint {
        /// The rejected mountpoint.
        mountpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Something is already mounted there.
    #[error("mountpoint {0:?} is busy: unmount it first")]
    Busy(String),
    /// Nothing is mounted there.
    #[error("nothing is mounted at {0:?}")]
    NotMounted(String),
    /// The shared directory of a passthrough mount is missing or not a directory.
    #[error("shared directory {path}: {reason}")]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The passthrough filesystem could not be set up.
    #[error("setting up the passthrough of {path}")]
    Passthrough {
        /// The shared directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The bootstrap does not exist (or is not an absolute path).
    #[error("bootstrap {0} does not exist (an absolute path is needed)")]
    BootstrapMissing(PathBuf),
    /// The bootstrap could not be loaded or is invalid.
    #[error("loading bootstrap {path}")]
    Bootstrap {
        /// The bootstrap.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: FormatError,
    },
    /// A blob the image refers to is not where the configuration says blobs are.
    #[error("blob {blob} of image {bootstrap} is not in {dir}")]
    BlobMissing {
        /// The image.
        bootstrap: PathBuf,
        /// The blob id (hex).
        blob: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A single blob file was named, but it is not the image's one blob.
    #[error("blob file {file} does not match image {bootstrap}: {reason}")]
    BlobFileMismatch {
        /// The blob file.
        file: PathBuf,
        /// The image.
        bootstrap: PathBuf,
        /// Why.
        reason: String,
    },
    /// The backend the configuration names cannot serve this image.
    #[error("backend of image {bootstrap}: {what}")]
    Backend {
        /// The image.
        bootstrap: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The storage stack could not be set up (cache directory, prefetch list).
    #[error("storage of image {bootstrap}")]
    Storage {
        /// The image.
        bootstrap: PathBuf,
        /// The cause.
        #[source]
        source: crate::storage::config::ConfigError,
    },
    /// The prefetch request cannot be honoured.
    #[error("prefetch: {0}")]
    Prefetch(String),
    /// The path is not reachable inside the daemon's sandbox.
    #[error("not reachable in the daemon's sandbox")]
    OutsideSandbox(#[source] crate::sandbox::SandboxError),
    /// The Vfs refused the mount or unmount.
    #[error("virtual filesystem: {0}")]
    Vfs(String),
}

impl MountError {
    /// Whether the error is the request's fault (a 4xx), not the daemon's.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, MountError::Passthrough { .. } | MountError::Vfs(_))
    }
}

/// What is mounted at a mountpoint, as `GET /api/v1/daemon` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "fs_type", rename_all = "snake_case")]
pub enum MountedFs {
    /// A writable passthrough of a host directory.
    PassthroughFs {
        /// The host directory.
        source: PathBuf,
    },
    /// A read-only RAFS image.
    Rafs {
        /// The image's bootstrap.
        source: PathBuf,
        /// The configuration's id (`device.id`), if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// `localfs`, `registry` or `s3`.
        backend: &'static str,
        /// Its blob directory (localfs).
        #[serde(skip_serializing_if = "Option::is_none")]
        blob_dir: Option<PathBuf>,
        /// Skiff's cache directory (remote backends).
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_dir: Option<PathBuf>,
        /// The image's Merkle root (hex).
        root_digest: String,
    },
}

/// A RAFS mount request: the bootstrap, the configuration as given (kept for hand-over to a
/// new daemon) and what it means.
#[derive(Clone, Debug)]
pub struct RafsRequest {
    /// The bootstrap's path.
    pub source: PathBuf,
    /// nydusd's JSON configuration, as given.
    pub config: String,
    /// What it means.
    pub spec: RafsSpec,
    /// Image paths to prefetch first.
    pub prefetch_files: Vec<String>,
}

/// A mounted RAFS image's running parts.
struct RafsRuntime {
    request: RafsRequest,
    stack: Option<StorageStack>,
    client: Option<Arc<RegistryClient>>,
    vfs_index: VfsIndex,
}

struct Entry {
    info: MountedFs,
    rafs: Option<RafsRuntime>,
}

/// One RAFS mount, as handed to a new daemon in a takeover.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedMount {
    /// Where it is mounted.
    pub mountpoint: String,
    /// Its index in the Vfs (inode numbers depend on it).
    pub vfs_index: VfsIndex,
    /// The bootstrap.
    pub source: PathBuf,
    /// nydusd's configuration, as given.
    pub config: String,
    /// Image paths prefetched first.
    pub prefetch_files: Vec<String>,
}

/// The daemon's life cycle, with nydusd's names (the snapshotter and Kata wait for `RUNNING`,
/// a takeover for `INIT` then `READY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonState {
    /// Starting, or waiting for a takeover.
    Init,
    /// Filesystems ready (mounted or taken over), not serving yet.
    Ready,
    /// Serving.
    Running,
    /// Stopped serving: exiting.
    Stopped,
}

impl DaemonState {
    /// The name nydusd uses for this state.
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Init => "INIT",
            DaemonState::Ready => "READY",
            DaemonState::Running => "RUNNING",
            DaemonState::Stopped => "STOPPED",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => DaemonState::Ready,
            2 => DaemonState::Running,
            3 => DaemonState::Stopped,
            _ => DaemonState::Init,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            DaemonState::Init => 0,
            DaemonState::Ready => 1,
            DaemonState::Running => 2,
            DaemonState::Stopped => 3,
        }
    }
}

/// A daemon's filesystem tree, its mount table, state and counters.
pub struct DaemonFs {
    layout: Layout,
    vfs: Arc<Vfs>,
    mounts: Mutex<BTreeMap<String, Entry>>,
    state: AtomicU8,
    counters: Counters,
    /// Filesystem options of RAFS mounts.
    fs_opts: RafsFsOptions,
    /// Where RAFS mounts share their bootstraps with the node's other daemons.
    share: Option<Arc<crate::share::BootstrapShare>>,
}

/// Kata's sandbox tree (the name it had before the host daemon existed).
pub type SandboxFs = DaemonFs;

impl DaemonFs {
    /// An empty tree with `layout`, in state [`DaemonState::Init`].
    pub fn new(layout: Layout) -> Self {
        let opts = match layout {
            // The Vfs negotiates one set of options for every mount, and ignores what each
            // filesystem's init returns. Without a writeback cache the guest's writes reach
            // the daemon synchronously: a write to a RAFS file fails with EROFS at write(2),
            // instead of landing in the guest's page cache and failing only at writeback.
            // (virtiofsd's default too; the passthrough share stays correct either way.)
            Layout::Kata => VfsOptions {
                no_writeback: true,
                ..VfsOptions::default()
            },
            // The images are read-only, and a write must fail at write(2).
            Layout::Host => VfsOptions {
                no_writeback: true,
                ..VfsOptions::default()
            },
        };
        let mut vfs = Vfs::new(opts);
        // After an unmount the mountpoint disappears from the guest's (or host's) view,
        // instead of staying behind as an empty directory.
        vfs.set_remove_pseudo_root();
        DaemonFs {
            layout,
            vfs: Arc::new(vfs),
            mounts: Mutex::new(BTreeMap::new()),
            state: AtomicU8::new(DaemonState::Init.to_u8()),
            counters: Counters::default(),
            fs_opts: RafsFsOptions::default(),
            share: None,
        }
    }

    /// Kata's sandbox tree.
    pub fn kata() -> Self {
        Self::new(Layout::Kata)
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Gives each READ of the RAFS images mounted from now on at most `timeout`: then it
    /// fails with EIO instead of hanging the reader.
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.fs_opts.request_timeout = timeout;
        self
    }

    /// Loads the bootstraps of RAFS mounts made from now on through `share`: one copy in
    /// memory for the daemons of the node (see [`crate::share`]).
    pub fn with_bootstrap_share(
        mut self,
        share: Option<Arc<crate::share::BootstrapShare>>,
    ) -> Self {
        self.share = share;
        self
    }

    /// The filesystem to hand to the transport.
    pub fn vfs(&self) -> Arc<Vfs> {
        self.vfs.clone()
    }

    /// The counters, for the metrics endpoints.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The current state.
    pub fn state(&self) -> DaemonState {
        DaemonState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Moves to `state`.
    pub fn set_state(&self, state: DaemonState) {
        self.state.store(state.to_u8(), Ordering::Release);
    }

    /// What is mounted where, by mountpoint.
    pub fn mounts(&self) -> Result<BTreeMap<String, MountedFs>, MountError> {
        Ok(self
            .table()
            .iter()
            .map(|(k, e)| (k.clone(), e.info.clone()))
            .collect())
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        crate::util::sync::lock(&self.mounts)
    }

    /// Mounts a writable passthrough of the host directory `dir` at `mountpoint`.
    pub fn mount_passthrough(&self, mountpoint: &str, dir: &Path) -> Result<(), MountError> {
        self.layout.check_passthrough(mountpoint)?;
        let mut table = self.table();
        if table.contains_key(mountpoint) {
            return Err(MountError::Busy(mountpoint.to_owned()));
        }
        crate::sandbox::check_reachable(dir).map_err(MountError::OutsideSandbox)?;
        check_shared_dir(dir)?;
        let fs = passthrough_fs(dir)?;
        self.vfs_mount(Box::new(fs), mountpoint)?;
        table.insert(
            mountpoint.to_owned(),
            Entry {
                info: MountedFs::PassthroughFs {
                    source: dir.to_owned(),
                },
                rafs: None,
            },
        );
        self.counters.mounted();
        tracing::info!(mountpoint, source = %dir.display(), "passthrough_fs mounted");
        Ok(())
    }

    /// Mounts the RAFS image `req` describes, read-only, at `mountpoint`.
    pub fn mount_rafs(&self, mountpoint: &str, req: RafsRequest) -> Result<(), MountError> {
        self.mount_rafs_at(mountpoint, req, None)
    }

    /// Mounts a RAFS image again at the Vfs index it had in the daemon it is taken over from,
    /// so that the inode numbers the kernel holds stay valid.
    pub fn restore_rafs(&self, saved: &SavedMount, req: RafsRequest) -> Result<(), MountError> {
        self.mount_rafs_at(&saved.mountpoint, req, Some(saved.vfs_index))
    }

    fn mount_rafs_at(
        &self,
        mountpoint: &str,
        req: RafsRequest,
        index: Option<VfsIndex>,
    ) -> Result<(), MountError> {
        self.layout.check_rafs(mountpoint)?;
        let mut table = self.table();
        if table.contains_key(mountpoint) {
            return Err(MountError::Busy(mountpoint.to_owned()));
        }
        let opened = rafs::open(
            &req.source,
            &req.spec,
            &req.prefetch_files,
            self.fs_opts.clone(),
            self.share.as_deref(),
        )?;
        let vfs_index = match index {
            None => self
                .vfs
                .mount(Box::new(opened.fs), mountpoint)
                .map_err(|e| MountError::Vfs(format!("{e:?}")))?,
            Some(i) => {
                self.vfs
                    .restore_mount(Box::new(opened.fs), i, mountpoint)
                    .map_err(|e| MountError::Vfs(format!("restoring at index {i}: {e}")))?;
                i
            }
        };
        tracing::info!(
            mountpoint,
            bootstrap = %req.source.display(),
            backend = req.spec.backend.kind(),
            id = req.spec.id.as_deref().unwrap_or(""),
            format = opened.format,
            root = %opened.root_digest,
            cache = %opened.cache_dir.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            "rafs mounted"
        );
        let info = MountedFs::Rafs {
            source: req.source.clone(),
            id: req.spec.id.clone(),
            backend: req.spec.backend.kind(),
            blob_dir: opened.blob_dir,
            cache_dir: opened.cache_dir,
            root_digest: opened.root_digest,
        };
        table.insert(
            mountpoint.to_owned(),
            Entry {
                info,
                rafs: Some(RafsRuntime {
                    request: req,
                    stack: Some(opened.stack),
                    client: opened.client,
                    vfs_index,
                }),
            },
        );
        self.counters.mounted();
        Ok(())
    }

    /// Unmounts whatever is mounted at `mountpoint`. Returns what was there and the inode
    /// number of the directory that held it (for the kernel to forget the entry).
    pub fn umount(&self, mountpoint: &str) -> Result<(MountedFs, u64), MountError> {
        let mut table = self.table();
        if !table.contains_key(mountpoint) {
            return Err(MountError::NotMounted(mountpoint.to_owned()));
        }
        let (_, parent) = self
            .vfs
            .umount(mountpoint)
            .map_err(|e| MountError::Vfs(format!("{e:?}")))?;
        let Some(mut entry) = table.remove(mountpoint) else {
            return Err(MountError::NotMounted(mountpoint.to_owned()));
        };
        drop(table);
        if let Some(stack) = entry.rafs.as_mut().and_then(|r| r.stack.take()) {
            stack.finish();
        }
        self.counters.unmounted();
        tracing::info!(mountpoint, "unmounted");
        Ok((entry.info, parent))
    }

    /// The mountpoints `id` selects: the mount at `id`, and every RAFS mount whose
    /// configuration's id is `id` (nydus-snapshotter's `/<snapshot id>`, which is also a
    /// shared host daemon's mountpoint).
    fn selected<'a>(table: &'a BTreeMap<String, Entry>, id: &str) -> Vec<(&'a String, &'a Entry)> {
        table
            .iter()
            .filter(|(mp, e)| {
                mp.as_str() == id
                    || matches!(&e.info, MountedFs::Rafs { id: Some(i), .. } if i == id)
            })
            .collect()
    }

    /// Replaces the registry credentials of every RAFS mount `id` selects, without a
    /// remount: reads that need the registry from now on use them. Returns the mountpoints
    /// renewed; an `id` that selects no registry mount is an error.
    pub fn renew_credentials(
        &self,
        id: &str,
        credentials: &Credentials,
    ) -> Result<Vec<String>, RenewError> {
        let mut table = self.table();
        let mut renewed = Vec::new();
        let mut found = false;
        let mps: Vec<String> = Self::selected(&table, id)
            .into_iter()
            .map(|(mp, _)| mp.clone())
            .collect();
        for mp in mps {
            found = true;
            let Some(r) = table.get_mut(&mp).and_then(|e| e.rafs.as_mut()) else {
                continue;
            };
            let Some(client) = &r.client else { continue };
            client.set_credentials(Some(credentials.clone()));
            // A hand-over to a new daemon carries the new credentials too.
            r.request.spec = with_credentials(&r.request.spec, credentials);
            r.request.config = config_with_auth(&r.request.config, credentials);
            renewed.push(mp);
        }
        if !found {
            return Err(RenewError::NoSuchId(id.to_owned()));
        }
        if renewed.is_empty() {
            return Err(RenewError::NotRegistry(id.to_owned()));
        }
        tracing::info!(id, mounts = ?renewed, user = %credentials.username, "registry credentials renewed");
        Ok(renewed)
    }

    /// The storage metrics of the RAFS mount `id` selects (the first one, if several), or of
    /// every RAFS mount added up when `id` is `None`.
    pub fn storage_metrics(
        &self,
        id: Option<&str>,
    ) -> Result<Vec<(String, MetricsSnapshot, MountedFs)>, MountError> {
        let table = self.table();
        let pick: Vec<(&String, &Entry)> = match id {
            Some(id) => Self::selected(&table, id),
            None => table.iter().collect(),
        };
        Ok(pick
            .into_iter()
            .filter_map(|(mp, e)| {
                let stack = e.rafs.as_ref()?.stack.as_ref()?;
                Some((mp.clone(), stack.snapshot(), e.info.clone()))
            })
            .collect())
    }

    /// What a new daemon needs to mount the same images at the same Vfs indices.
    pub fn saved_mounts(&self) -> Result<Vec<SavedMount>, MountError> {
        let table = self.table();
        Ok(table
            .iter()
            .filter_map(|(mp, e)| {
                let r = e.rafs.as_ref()?;
                Some(SavedMount {
                    mountpoint: mp.clone(),
                    vfs_index: r.vfs_index,
                    source: r.request.source.clone(),
                    config: r.request.config.clone(),
                    prefetch_files: r.request.prefetch_files.clone(),
                })
            })
            .collect())
    }

    /// Stops every mount's background work and writes its storage totals to the log.
    pub fn finish(&self) {
        let stacks: Vec<StorageStack> = self
            .table()
            .values_mut()
            .filter_map(|e| e.rafs.as_mut().and_then(|r| r.stack.take()))
            .collect();
        for stack in stacks {
            stack.finish();
        }
    }

    fn vfs_mount(&self, fs: BackFileSystem, mountpoint: &str) -> Result<(), MountError> {
        self.vfs
            .mount(fs, mountpoint)
            .map(drop)
            .map_err(|e| MountError::Vfs(format!("{e:?}")))
    }
}

/// Why credentials could not be renewed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// No mount has this id or mountpoint.
    #[error("no mount has id or mountpoint {0:?}")]
    NoSuchId(String),
    /// The mounts `id` selects read no registry.
    #[error("the mounts of {0:?} read no registry: they have no registry credentials")]
    NotRegistry(String),
}

fn with_credentials(spec: &RafsSpec, c: &Credentials) -> RafsSpec {
    let mut s = spec.clone();
    if let spec::BackendSpec::Registry(r) = &mut s.backend {
        r.credentials = Some(c.clone());
    }
    s
}

/// `config` (nydusd's JSON) with its registry `auth` replaced by `c`'s.
fn config_with_auth(config: &str, c: &Credentials) -> String {
    use base64::Engine;
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(config) else {
        return config.to_owned();
    };
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    let slot = if v.get("version").and_then(serde_json::Value::as_u64) == Some(2) {
        v.pointer_mut("/backend/registry")
    } else {
        v.pointer_mut("/device/backend/config")
    };
    if let Some(serde_json::Value::Object(o)) = slot {
        o.insert("auth".into(), auth.into());
    }
    v.to_string()
}

fn check_shared_dir(dir: &Path) -> Result<(), MountError> {
    let bad = |reason: String| MountError::SharedDir {
        path: dir.to_owned(),
        reason,
    };
    if !dir.is_absolute() {
        return Err(bad("must be an absolute path".into()));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(bad("not a directory".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn passthrough_fs(dir: &Path) -> Result<PassthroughFs, MountError> {
    let wrap = |source| MountError::Passthrough {
        path: dir.to_owned(),
        source,
    };
    let root_dir = dir
        .to_str()
        .ok_or_else(|| wrap(io::Error::other("the path is not valid UTF-8")))?;
    let cfg = passthrough::Config {
        root_dir: root_dir.to_owned(),
        // Under a Vfs the filesystem is imported here, not on FUSE_INIT.
        do_import: false,
        // The guest builds overlayfs upper layers here: overlay keeps its state in xattrs.
        xattr: true,
        ..Default::default()
    };
    let fs = PassthroughFs::<()>::new(cfg).map_err(wrap)?;
    fs.import().map_err(wrap)?;
    Ok(fs)
}

/// Why a life-cycle request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// This daemon does not do that (a virtio-fs daemon hands nothing over).
    #[error("{0}")]
    NotSupported(&'static str),
    /// The daemon is not in a state that allows it.
    #[error("the daemon is {state}: {what}")]
    WrongState {
        /// The current state.
        state: &'static str,
        /// What was asked.
        what: &'static str,
    },
    /// The daemon was started without `--supervisor`.
    #[error("no supervisor socket: the daemon was started without --supervisor and --id")]
    NoSupervisor,
    /// The hand-over failed.
    #[error("hand-over with the supervisor")]
    Upgrade(#[from] upgrade::UpgradeError),
    /// Serving could not be started or stopped.
    #[error("FUSE session")]
    Fuse(#[source] crate::fuse::FuseError),
    /// A mount could not be restored.
    #[error("restoring mount {mountpoint}")]
    Restore {
        /// The mountpoint.
        mountpoint: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The life-cycle requests of nydusd's API, which each kind of daemon answers its own way.
pub trait Lifecycle: Send + Sync {
    /// `PUT /api/v1/daemon/fuse/sendfd`: send state and the `/dev/fuse` fd to the supervisor.
    fn send_fd(&self) -> Result<(), LifecycleError>;
    /// `PUT /api/v1/daemon/fuse/takeover`: take state and fd over from the supervisor.
    fn takeover(&self) -> Result<(), LifecycleError>;
    /// `PUT /api/v1/daemon/start`: start serving what was taken over.
    fn start(&self) -> Result<(), LifecycleError>;
    /// `PUT /api/v1/daemon/exit`: stop serving and exit, leaving the mount for a successor.
    fn exit(&self) -> Result<(), LifecycleError>;
    /// After `DELETE /api/v1/mount`: the entry `name` of directory `parent` is gone; a
    /// transport that can tell the kernel (FUSE's notifications) does, so that the directory
    /// disappears at once instead of when the kernel's entry cache times out.
    fn unmounted(&self, _parent: u64, _name: &str) {}
}

/// A daemon: its tree, its identity, its life cycle.
pub struct Daemon {
    /// The tree and mount table.
    pub fs: Arc<DaemonFs>,
    /// `--id`.
    pub id: Option<String>,
    /// `--supervisor`.
    pub supervisor: Option<PathBuf>,
    /// The life-cycle requests.
    pub lifecycle: Arc<dyn Lifecycle>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_only_at_containers() {
        let fs = DaemonFs::kata();
        let r = fs.mount_passthrough("/other", Path::new("/tmp"));
        assert!(matches!(r, Err(MountError::InvalidMountpoint { .. })));
        let r = fs.mount_passthrough("/containers", Path::new("relative"));
        assert!(matches!(r, Err(MountError::SharedDir { .. })));
        assert!(matches!(
            fs.umount("/containers"),
            Err(MountError::NotMounted(_))
        ));
        let host = DaemonFs::new(Layout::Host);
        let r = host.mount_passthrough("/containers", Path::new("/tmp"));
        assert!(matches!(r, Err(MountError::InvalidMountpoint { .. })));
    }

    #[test]
    fn renewed_auth_goes_into_the_saved_config() {
        let c = Credentials::parse("new:secret").expect("creds");
        let v1 = r#"{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","auth":"old"}}}}"#;
        let out: serde_json::Value = serde_json::from_str(&config_with_auth(v1, &c)).expect("json");
        assert_eq!(
            out["device"]["backend"]["config"]["auth"],
            "bmV3OnNlY3JldA=="
        );
        let v2 =
            r#"{"version":2,"backend":{"type":"registry","registry":{"host":"h","repo":"r"}}}"#;
        let out: serde_json::Value = serde_json::from_str(&config_with_auth(v2, &c)).expect("json");
        assert_eq!(out["backend"]["registry"]["auth"], "bmV3OnNlY3JldA==");
    }
}
