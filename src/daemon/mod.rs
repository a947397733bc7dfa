//! The filesystem tree one virtio-fs device serves to a Kata sandbox: a pseudo root in which
//! the host's shared directory (a writable passthrough) and any number of RAFS images are
//! mounted and unmounted while the guest runs.
//!
//! Kata's layout is fixed: the passthrough tree sits at `/containers` and the image of
//! container `<cid>` at `/rafs/<cid>/lowerdir`. [`SandboxFs`] enforces it, keeps the table of
//! what is mounted where, and owns the fuse-backend-rs [`Vfs`] that the vhost-user device
//! serves (the Vfs implements `FileSystem`, so [`crate::vhost`] needs nothing new).
//!
//! Nothing here speaks HTTP: [`crate::api`] turns Kata's requests into these calls.

#![warn(missing_docs)]

mod metrics;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::api::{BackFileSystem, Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{self, PassthroughFs};

use crate::format::{digest_hex, Bootstrap, FormatError};
use crate::fs::{RafsFs, RafsFsOptions};
use crate::storage::{CachedChunkSource, LocalFsBackend};

pub use metrics::{Counters, Sample, SampleKind};

/// Where Kata mounts the host's shared directory.
pub const PASSTHROUGH_MOUNTPOINT: &str = "/containers";

/// Longest container id accepted in a RAFS mountpoint (a name component).
const MAX_CONTAINER_ID_LEN: usize = 255;

/// Why a mount or unmount was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint is not one of Kata's two forms, or does not fit the filesystem type.
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
    /// The bootstrap does not exist.
    #[error("bootstrap {0} does not exist")]
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
    /// The Vfs refused the mount or unmount.
    #[error("virtual filesystem: {0}")]
    Vfs(String),
}

/// Where the blobs of a RAFS image are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobLocation {
    /// A directory holding blobs named by their id (Skiff's `--blob-dir`).
    Dir(PathBuf),
    /// One blob file: the image must have exactly this one blob, named by its id.
    File(PathBuf),
}

/// What is mounted at a mountpoint.
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
        /// Its blob directory.
        blob_dir: PathBuf,
        /// The image's Merkle root (hex).
        root_digest: String,
    },
}

/// The daemon's life cycle, as reported to Kata (`GET /api/v1/daemon`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonState {
    /// Starting: the sockets are not all listening yet.
    Init,
    /// Serving: both sockets listen; mounts are accepted.
    Running,
    /// Shutting down after SIGTERM.
    Stopping,
}

impl DaemonState {
    /// The name nydusd uses for this state; Kata waits for `RUNNING`.
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Init => "INIT",
            DaemonState::Running => "RUNNING",
            DaemonState::Stopping => "STOPPING",
        }
    }
}

/// The pseudo-root tree of one sandbox, its mount table, state and counters.
pub struct SandboxFs {
    vfs: Arc<Vfs>,
    mounts: Mutex<BTreeMap<String, MountedFs>>,
    state: AtomicU8,
    counters: Counters,
    /// How long a READ of a RAFS mount may take ([`RafsFsOptions::request_timeout`]).
    request_timeout: std::time::Duration,
}

impl Default for SandboxFs {
    fn default() -> Self {
        Self::new()
    }
}

impl SandboxFs {
    /// An empty pseudo root, in state [`DaemonState::Init`].
    pub fn new() -> Self {
        // The Vfs negotiates one set of options for every mount, and ignores what each
        // filesystem's init returns. Without a writeback cache the guest's writes reach the
        // daemon synchronously: a write to a RAFS file fails with EROFS at write(2), instead of
        // landing in the guest's page cache and failing only at writeback. (virtiofsd's default
        // too; the passthrough share stays correct either way.)
        let opts = VfsOptions {
            no_writeback: true,
            ..VfsOptions::default()
        };
        let mut vfs = Vfs::new(opts);
        // After an unmount the mountpoint disappears from the guest's view, instead of
        // staying behind as an empty directory.
        vfs.set_remove_pseudo_root();
        SandboxFs {
            vfs: Arc::new(vfs),
            mounts: Mutex::new(BTreeMap::new()),
            state: AtomicU8::new(DaemonState::Init as u8),
            counters: Counters::default(),
            request_timeout: crate::storage::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Gives each READ of the RAFS images mounted from now on at most `timeout`: then it
    /// fails with EIO instead of hanging the guest's reader.
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The filesystem to hand to the vhost-user device.
    pub fn vfs(&self) -> Arc<Vfs> {
        self.vfs.clone()
    }

    /// The counters, for the metrics endpoints.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The current state.
    pub fn state(&self) -> DaemonState {
        match self.state.load(Ordering::Acquire) {
            x if x == DaemonState::Running as u8 => DaemonState::Running,
            x if x == DaemonState::Stopping as u8 => DaemonState::Stopping,
            _ => DaemonState::Init,
        }
    }

    /// Moves to `state`.
    pub fn set_state(&self, state: DaemonState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// What is mounted where, by mountpoint.
    pub fn mounts(&self) -> Result<BTreeMap<String, MountedFs>, MountError> {
        Ok(self.table().clone())
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, MountedFs>> {
        crate::util::sync::lock(&self.mounts)
    }

    /// Mounts a writable passthrough of the host directory `dir` at `mountpoint`, which must
    /// be [`PASSTHROUGH_MOUNTPOINT`].
    pub fn mount_passthrough(&self, mountpoint: &str, dir: &Path) -> Result<(), MountError> {
        if mountpoint != PASSTHROUGH_MOUNTPOINT {
            return Err(MountError::InvalidMountpoint {
                mountpoint: mountpoint.to_owned(),
                reason: "a passthrough_fs mount goes at /containers",
            });
        }
        let mut table = self.table();
        if table.contains_key(mountpoint) {
            return Err(MountError::Busy(mountpoint.to_owned()));
        }
        check_shared_dir(dir)?;
        let fs = passthrough_fs(dir)?;
        self.vfs_mount(Box::new(fs), mountpoint)?;
        table.insert(
            mountpoint.to_owned(),
            MountedFs::PassthroughFs {
                source: dir.to_owned(),
            },
        );
        self.counters.mounted();
        tracing::info!(mountpoint, source = %dir.display(), "passthrough_fs mounted");
        Ok(())
    }

    /// Mounts the RAFS image `bootstrap`, blobs at `blobs`, read-only at `mountpoint`, which
    /// must be `/rafs/<container id>/lowerdir`.
    pub fn mount_rafs(
        &self,
        mountpoint: &str,
        bootstrap: &Path,
        blobs: &BlobLocation,
    ) -> Result<(), MountError> {
        check_rafs_mountpoint(mountpoint)?;
        let mut table = self.table();
        if table.contains_key(mountpoint) {
            return Err(MountError::Busy(mountpoint.to_owned()));
        }
        if !bootstrap.exists() {
            return Err(MountError::BootstrapMissing(bootstrap.to_owned()));
        }
        let image = Bootstrap::load(bootstrap).map_err(|source| MountError::Bootstrap {
            path: bootstrap.to_owned(),
            source,
        })?;
        let blob_dir = blob_dir_for(&image, bootstrap, blobs)?;
        let root_digest = digest_hex(image.root_digest());
        let format = image.source_format().name();
        let memcache = crate::storage::default_memory_cache(image.chunk_size());
        let source = CachedChunkSource::in_memory(LocalFsBackend::new(&blob_dir), memcache);
        let opts = RafsFsOptions {
            request_timeout: self.request_timeout,
            ..RafsFsOptions::default()
        };
        let fs = RafsFs::new(Arc::new(image), Arc::new(source), opts);
        self.vfs_mount(Box::new(fs), mountpoint)?;
        tracing::info!(
            mountpoint,
            bootstrap = %bootstrap.display(),
            blob_dir = %blob_dir.display(),
            format,
            root = %root_digest,
            "rafs mounted"
        );
        table.insert(
            mountpoint.to_owned(),
            MountedFs::Rafs {
                source: bootstrap.to_owned(),
                blob_dir,
                root_digest,
            },
        );
        self.counters.mounted();
        Ok(())
    }

    /// Unmounts whatever is mounted at `mountpoint`.
    pub fn umount(&self, mountpoint: &str) -> Result<MountedFs, MountError> {
        let mut table = self.table();
        let Some(fs) = table.get(mountpoint).cloned() else {
            return Err(MountError::NotMounted(mountpoint.to_owned()));
        };
        self.vfs
            .umount(mountpoint)
            .map_err(|e| MountError::Vfs(format!("{e:?}")))?;
        table.remove(mountpoint);
        self.counters.unmounted();
        tracing::info!(mountpoint, "unmounted");
        Ok(fs)
    }

    fn vfs_mount(&self, fs: BackFileSystem, mountpoint: &str) -> Result<(), MountError> {
        self.vfs
            .mount(fs, mountpoint)
            .map(drop)
            .map_err(|e| MountError::Vfs(format!("{e:?}")))
    }
}

/// Checks that `mountpoint` is exactly `/rafs/<cid>/lowerdir`, `<cid>` a name made of
/// letters, digits, `_`, `+`, `-` and `.` (as Kata checks it), other than `.` and `..`.
pub fn check_rafs_mountpoint(mountpoint: &str) -> Result<(), MountError> {
    let invalid = |reason| MountError::InvalidMountpoint {
        mountpoint: mountpoint.to_owned(),
        reason,
    };
    let cid = mountpoint
        .strip_prefix("/rafs/")
        .and_then(|rest| rest.strip_suffix("/lowerdir"))
        .ok_or_else(|| invalid("a rafs mount goes at /rafs/<container id>/lowerdir"))?;
    if cid.is_empty() || cid.len() > MAX_CONTAINER_ID_LEN || cid == "." || cid == ".." {
        return Err(invalid(
            "the container id must be 1 to 255 characters, not . or ..",
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.');
    if !cid.chars().all(allowed) {
        return Err(invalid(
            "the container id may only contain letters, digits, _ + - and .",
        ));
    }
    Ok(())
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

/// The directory whose blobs `image` reads, after checking that every blob it names is there.
fn blob_dir_for(
    image: &Bootstrap,
    bootstrap: &Path,
    blobs: &BlobLocation,
) -> Result<PathBuf, MountError> {
    let dir = match blobs {
        BlobLocation::Dir(dir) => dir.clone(),
        BlobLocation::File(file) => {
            let mismatch = |reason: String| MountError::BlobFileMismatch {
                file: file.clone(),
                bootstrap: bootstrap.to_owned(),
                reason,
            };
            let [only] = image.blobs() else {
                return Err(mismatch(format!(
                    "the image has {} blobs; name a blob directory instead",
                    image.blobs().len()
                )));
            };
            let want = digest_hex(&only.id);
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != want {
                return Err(mismatch(format!(
                    "Skiff blobs are named by their id; expected a file named {want}"
                )));
            }
            file.parent().unwrap_or(Path::new("/")).to_owned()
        }
    };
    let backend = LocalFsBackend::new(&dir);
    for blob in image.blobs() {
        if !backend.blob_path(&blob.id).is_file() {
            return Err(MountError::BlobMissing {
                bootstrap: bootstrap.to_owned(),
                blob: digest_hex(&blob.id),
                dir,
            });
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rafs_mountpoints_follow_kata_form() {
        for ok in [
            "/rafs/abc/lowerdir",
            "/rafs/a.b-c_d+e/lowerdir",
            "/rafs/0/lowerdir",
        ] {
            assert!(check_rafs_mountpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/rafs//lowerdir",
            "/rafs/../lowerdir",
            "/rafs/./lowerdir",
            "/rafs/a/b/lowerdir",
            "/rafs/a/lowerdir/",
            "/rafs/a/upperdir",
            "rafs/a/lowerdir",
            "/containers",
            "/",
            "/rafs/a b/lowerdir",
        ] {
            assert!(check_rafs_mountpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passthrough_only_at_containers() {
        let fs = SandboxFs::new();
        let r = fs.mount_passthrough("/other", Path::new("/tmp"));
        assert!(matches!(r, Err(MountError::InvalidMountpoint { .. })));
        let r = fs.mount_passthrough("/containers", Path::new("relative"));
        assert!(matches!(r, Err(MountError::SharedDir { .. })));
        assert!(matches!(
            fs.umount("/containers"),
            Err(MountError::NotMounted(_))
        ));
    }
}
