//! One copy of a bootstrap for all the daemons of a node.
//!
//! Every daemon holds its image's validated bootstrap for as long as it serves it: on a Kata
//! node, the host daemon and each sandbox's daemon hold the same one. Here the first daemon to
//! load a bootstrap moves its tables into a sealed memfd ([`crate::format::sealed`]), and offers
//! the descriptor on a Unix socket in the node's share directory; a daemon loading the same
//! bootstrap later asks for it there, checks it, and maps the same pages instead of loading a
//! copy of its own. Every daemon holding a copy offers it too, so the copy outlives the daemon
//! that made it.
//!
//! A daemon never trusts what it is handed (see `Bootstrap::from_shared`): the descriptor must
//! be a memfd sealed against every change, and the tables in it must validate and be the
//! tables of the daemon's own bootstrap (by digest). Anything else is refused with a log line,
//! and the daemon loads its own copy as it would without sharing. So a process that can reach
//! the share directory can deny sharing (at worst one private copy per daemon, as before), but
//! cannot make a daemon serve anything its own bootstrap does not say. The directory is made
//! private to the daemons' user (mode 0700), and both ends check that the peer runs as the same
//! user or as root.
//!
//! Names in the directory: `<key>.<pid>-<n>.sock`, one per bootstrap a process offers, where
//! the key is [`ShareKey::name`] (and `n` tells a process's shares apart, for tests). A socket nobody answers on (a daemon killed) is removed by the
//! next daemon that finds it.

mod wire;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use crate::format::sealed::SealedBytes;
use crate::format::{v6, Bootstrap, FormatError, ShareKey, MAX_BOOTSTRAP_SIZE, SHARE_HEADER_LEN};
use crate::runtime::threads::{self, ThreadKind};
use crate::util::sync::lock;

/// The share directory of a node's daemons when none is configured: `/run/skiff/bootstraps`
/// for root, `$XDG_RUNTIME_DIR/skiff/bootstraps` for other users (none without one). A runtime
/// directory, so that every daemon of the node agrees on it whatever its cache configuration.
pub fn default_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/run/skiff/bootstraps"));
    }
    let run = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty())?;
    Some(PathBuf::from(run).join("skiff/bootstraps"))
}

/// Shares opened by this process so far: each names its sockets apart.
static SHARES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Why the share directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// Creating or examining the directory failed.
    #[error("share directory {dir}: {op}")]
    Io {
        /// The directory.
        dir: String,
        /// What failed.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The directory is not private to this user.
    #[error(
        "share directory {dir} is owned by uid {owner} with mode {mode:o}: it must be this \
         user's (uid {euid}) and not writable by group or others"
    )]
    NotPrivate {
        /// The directory.
        dir: String,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
        /// This process's effective uid.
        euid: u32,
    },
}

/// A bootstrap this process offers.
struct Offer {
    key: ShareKey,
    listener: UnixListener,
    path: PathBuf,
    image: Weak<Bootstrap>,
}

#[derive(Default)]
struct Offers {
    list: Vec<Offer>,
    closing: bool,
}

struct Inner {
    dir: PathBuf,
    /// Names this share's sockets: the process id, and which share of the process.
    owner: String,
    offers: Mutex<Offers>,
    /// Wakes the offering thread when the list changes or the share closes.
    wake: vmm_sys_util::eventfd::EventFd,
}

/// The node's share directory, as one daemon uses it: asking for bootstraps and offering its
/// own. Dropping it withdraws every offer (the mappings taken stay valid).
pub struct BootstrapShare {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BootstrapShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapShare")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl BootstrapShare {
    /// Uses `dir`, creating it (mode 0700) if needed. It must belong to this user and be
    /// writable by nobody else.
    pub fn open(dir: &Path) -> Result<Self, ShareError> {
        let io = |op| {
            move |source| ShareError::Io {
                dir: dir.display().to_string(),
                op,
                source,
            }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("creating"))?;
        let meta = std::fs::symlink_metadata(dir).map_err(io("examining"))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
            return Err(ShareError::NotPrivate {
                dir: dir.display().to_string(),
                owner: meta.uid(),
                mode: meta.mode() & 0o7777,
                euid,
            });
        }
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(io("creating an eventfd"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                owner: format!(
                    "{}-{}",
                    std::process::id(),
                    SHARES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ),
                offers: Mutex::new(Offers::default()),
                wake,
            }),
            thread: Mutex::new(None),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Asks the daemons offering `key` for their copy, one after the other, and gives each
    /// copy received to `take` until one is taken. Sockets nobody answers on are removed.
    fn find<T>(
        &self,
        key: &ShareKey,
        mut take: impl FnMut(SealedBytes) -> Result<T, crate::format::SharedError>,
    ) -> Option<T> {
        let prefix = format!("{}.", key.name());
        let entries = std::fs::read_dir(&self.inner.dir).ok()?;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            // This process's own offers too: an image mounted twice maps the same pages.
            if !name.starts_with(&prefix) || !name.ends_with(".sock") {
                continue;
            }
            let path = e.path();
            let fd = match wire::ask(&path) {
                Ok(fd) => fd,
                Err(wire::AskError::Stale) => {
                    tracing::debug!(socket = %path.display(), "removing a share socket nobody answers on");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(socket = %path.display(), error = %crate::util::error_chain(&e), "shared bootstrap not received");
                    continue;
                }
            };
            let max = MAX_BOOTSTRAP_SIZE + SHARE_HEADER_LEN as u64;
            let taken = SealedBytes::from_fd(fd, max)
                .map_err(crate::format::SharedError::Seal)
                .and_then(&mut take);
            match taken {
                Ok(t) => {
                    tracing::debug!(socket = %path.display(), "shared bootstrap taken");
                    return Some(t);
                }
                Err(e) => tracing::warn!(
                    socket = %path.display(),
                    error = %crate::util::error_chain(&e),
                    "shared bootstrap refused; this daemon loads its own copy"
                ),
            }
        }
        None
    }

    /// Offers `image` (whose tables are sealed, see [`Bootstrap::into_shared`]) under `key`
    /// until it is dropped or the share closes. Failures are logged: the daemon serves on,
    /// unshared.
    fn offer(&self, key: ShareKey, image: &Arc<Bootstrap>) {
        if image.sealed_fd().is_none() {
            return;
        }
        let path = self
            .inner
            .dir
            .join(format!("{}.{}.sock", key.name(), self.inner.owner));
        let listener = match wire::listen(&self.inner.dir, &path) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot offer the bootstrap to other daemons");
                return;
            }
        };
        {
            let mut g = lock(&self.inner.offers);
            // An older offer of the same key by this process (an image mounted twice) gives
            // way: its socket path is the one just bound.
            g.list.retain(|o| o.path != path);
            g.list.push(Offer {
                key,
                listener,
                path: path.clone(),
                image: Arc::downgrade(image),
            });
        }
        let mut t = lock(&self.thread);
        if t.is_none() {
            let inner = self.inner.clone();
            match threads::spawn(ThreadKind::Share, "skiff-share", move || {
                wire::serve(&inner)
            }) {
                Ok(h) => *t = Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "no thread to offer bootstraps; not shared");
                    let mut g = lock(&self.inner.offers);
                    g.list.retain(|o| o.path != path);
                    let _ = std::fs::remove_file(&path);
                    return;
                }
            }
        }
        let _ = self.inner.wake.write(1);
        tracing::debug!(socket = %path.display(), "bootstrap offered to the node's other daemons");
    }
}

impl Drop for BootstrapShare {
    fn drop(&mut self) {
        lock(&self.inner.offers).closing = true;
        let _ = self.inner.wake.write(1);
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
        for o in lock(&self.inner.offers).list.drain(..) {
            wire::withdraw(&o);
        }
    }
}

/// Loads the bootstrap at `path`, through `share` when there is one: a copy another daemon
/// offers, if it checks out, or else a copy of its own, which it then offers.
pub fn load_file(
    path: &Path,
    share: Option<&BootstrapShare>,
) -> Result<Arc<Bootstrap>, FormatError> {
    let Some(share) = share else {
        return Bootstrap::load(path).map(Arc::new);
    };
    // A Skiff bootstrap names its tables in its superblock: once the file is seen to hold
    // those bytes (hashed through, not kept), a shared copy of them is as good as the file.
    if let Some(key) = ShareKey::of_skiff_file(path) {
        if let Some(b) = share.find(&key, |s| Bootstrap::from_shared(s, &key, None)) {
            let b = Arc::new(b);
            log_taken(&b, &key);
            share.offer(key, &b);
            return Ok(b);
        }
    }
    let io_err = |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.len() > MAX_BOOTSTRAP_SIZE {
        return Err(FormatError::TooLarge(meta.len()));
    }
    let data = std::fs::read(path).map_err(io_err)?;
    load_bytes(data, Some(share))
}

/// Loads the bootstrap `data` (fetched from a registry, say) through `share`, as
/// [`load_file`] does.
pub fn load_bytes(
    data: Vec<u8>,
    share: Option<&BootstrapShare>,
) -> Result<Arc<Bootstrap>, FormatError> {
    let Some(share) = share else {
        return Bootstrap::from_bytes(data).map(Arc::new);
    };
    let Some(key) = ShareKey::of_bytes(&data) else {
        // Not a bootstrap: the loader says why.
        return Bootstrap::from_bytes(data).map(Arc::new);
    };
    let v6 = matches!(key, ShareKey::V6 { .. });
    let taken = share.find(&key, |s| {
        Bootstrap::from_shared(s, &key, v6.then_some(data.as_slice()))
    });
    if let Some(b) = taken {
        drop(data);
        let b = Arc::new(b);
        log_taken(&b, &key);
        share.offer(key, &b);
        return Ok(b);
    }
    let defaults = v6::Defaults::of_this_process();
    let own = Bootstrap::from_bytes_with(data, defaults)?;
    let own = match own.into_shared(&key, v6.then_some(defaults)) {
        Ok(b) => Arc::new(b),
        Err(failed) => {
            let (b, e) = *failed;
            tracing::warn!(error = %crate::util::error_chain(&e), "cannot seal the bootstrap; it is not shared");
            return Ok(Arc::new(b));
        }
    };
    share.offer(key, &own);
    Ok(own)
}

fn log_taken(b: &Bootstrap, key: &ShareKey) {
    tracing::info!(
        key = %key.name(),
        bytes = b.byte_len(),
        fd = b.sealed_fd().map(|f| f.as_raw_fd()).unwrap_or(-1),
        "bootstrap shared with another daemon of the node (validated in place)"
    );
}

#[cfg(test)]
mod tests;
