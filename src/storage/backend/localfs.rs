//! The local backend: a directory holding blob files named by their hex digest.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::{BackendError, BlobBackend};
use crate::format::{digest_hex, DIGEST_LEN};
use crate::storage::Deadline;
use crate::util::sync::{lock, read, write};

/// How far ahead of the reads of a blob its bytes are asked into the page cache.
///
/// A blob stores chunks in the order the image was built, which is close to the order a full
/// read (tar, a container's start) walks the tree: reads of one blob mostly move forward in
/// small steps, with jumps back and forth. The kernel's own readahead serves such reads badly
/// (it gives up on a jumpy pattern, and each small pread then waits on the disk), so the
/// backend keeps this much of the blob ahead of the furthest read on its way into the page
/// cache. Measured on a Debian minbase image (64 MiB blob), a full tar over `skiff mount`
/// waited on the disk for about half a second with no window and still noticeably with a
/// 4 MiB one; the whole blob read sequentially takes 0.06 s. The page cache is reclaimable,
/// and for a local blob the bytes are on this host anyway.
pub const READAHEAD_WINDOW: u64 = 32 << 20;

/// A blob up to this size is asked into the page cache whole, in the background, after its
/// first read (from the end of that read on, then what lies before it, so that the pages read
/// next are queued first); the windows above then have nothing left to do.
///
/// On the same image, a full tar took about 1.0 s, against 1.0 to 1.6 s with 32 MiB windows
/// (the reads jump between regions of the blob, and each jump waits for its new window's first
/// pages): reading 64 MiB sequentially costs the disk 0.06 s. The cap keeps a huge blob from
/// being read in full for a container that touches little of it.
pub const WHOLE_BLOB_READAHEAD_MAX: u64 = 256 << 20;

/// One open blob and the range last handed to the kernel's readahead.
struct BlobFile {
    file: File,
    /// The blob is small enough to be read ahead whole ([`WHOLE_BLOB_READAHEAD_MAX`]).
    whole: bool,
    /// Nobody has started reading it ahead whole yet.
    whole_pending: AtomicBool,
    /// `(start, end)` of the window last advised.
    advised: Mutex<(u64, u64)>,
}

impl BlobFile {
    /// Asks the kernel to start reading the window ahead of a read of `offset..end`, unless
    /// the window advised last covers the read and most of a window after it. A read outside
    /// that window (a jump back or forward) starts a new one from where it reads. Only advice:
    /// errors are ignored.
    fn read_ahead(&self, offset: u64, end: u64) {
        if self.whole {
            return;
        }
        let mut advised = lock(&self.advised);
        let (start, stop) = *advised;
        let inside = start <= offset && offset < stop;
        if inside && end.saturating_add(READAHEAD_WINDOW / 2) <= stop {
            return;
        }
        // Within the window only its end moves (what lies before it is on its way already).
        let from = if inside { stop } else { offset };
        let to = end.saturating_add(READAHEAD_WINDOW);
        *advised = (if inside { start } else { offset }, to);
        drop(advised);
        let (Ok(off), Ok(len)) = (
            libc::off_t::try_from(from),
            libc::off_t::try_from(to.saturating_sub(from)),
        ) else {
            return;
        };
        self.advise(off, len);
    }

    /// After a read of `offset..end`: the first one starts reading the blob ahead whole, in
    /// the background (the advice queues the whole read before it returns).
    fn start_whole(self: &Arc<Self>, offset: u64, end: u64) {
        if !self.whole || !self.whole_pending.swap(false, Ordering::Relaxed) {
            return;
        }
        let (Ok(offset), Ok(end)) = (libc::off_t::try_from(offset), libc::off_t::try_from(end))
        else {
            return;
        };
        let me = self.clone();
        let run = move || {
            me.advise(end, 0);
            me.advise(0, offset);
        };
        if let Err(e) = crate::runtime::threads::spawn(
            crate::runtime::ThreadKind::Fetcher,
            "skiff-blob-ra",
            run,
        ) {
            tracing::debug!(error = %e, "no blob read-ahead thread");
        }
    }

    /// `posix_fadvise(WILLNEED)` over `len` bytes from `off` (0: to the end).
    fn advise(&self, off: libc::off_t, len: libc::off_t) {
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open for
        // as long as `self.file` lives.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED);
        }
    }
}

/// Blobs in a local directory, opened on first use and kept open.
pub struct LocalFsBackend {
    dir: PathBuf,
    files: RwLock<HashMap<[u8; DIGEST_LEN], Arc<BlobFile>>>,
}

impl LocalFsBackend {
    /// A backend over the blob directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: RwLock::new(HashMap::new()),
        }
    }

    /// The path of blob `id`.
    pub fn blob_path(&self, id: &[u8; DIGEST_LEN]) -> PathBuf {
        self.dir.join(digest_hex(id))
    }

    fn open(&self, id: &[u8; DIGEST_LEN]) -> Result<Arc<BlobFile>, BackendError> {
        if let Some(f) = read(&self.files).get(id).cloned() {
            return Ok(f);
        }
        let path = self.blob_path(id);
        let file = File::open(&path).map_err(|source| BackendError::Io {
            op: "opening blob",
            path: path.display().to_string(),
            source,
        })?;
        let whole = file
            .metadata()
            .is_ok_and(|m| m.len() <= WHOLE_BLOB_READAHEAD_MAX);
        let f = Arc::new(BlobFile {
            file,
            whole,
            whole_pending: AtomicBool::new(true),
            advised: Mutex::new((0, 0)),
        });
        // Two threads may open the blob at once: both use the file kept first.
        Ok(write(&self.files).entry(*id).or_insert(f).clone())
    }
}

impl BlobBackend for LocalFsBackend {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        // A local read is not bounded: it takes what the disk takes.
        _deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        let f = self.open(id)?;
        f.read_ahead(offset, offset.saturating_add(len as u64));
        let mut buf = vec![0u8; len];
        f.file.read_exact_at(&mut buf, offset).map_err(|source| {
            let path = self.blob_path(id).display().to_string();
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                BackendError::ShortBlob {
                    path,
                    end: offset.saturating_add(len as u64),
                }
            } else {
                BackendError::Io {
                    op: "reading blob",
                    path,
                    source,
                }
            }
        })?;
        f.start_whole(offset, offset.saturating_add(len as u64));
        Ok(buf)
    }

    fn name(&self) -> &'static str {
        "localfs"
    }

    fn is_local(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readahead_window_follows_the_reads_and_reads_stay_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = [7u8; DIGEST_LEN];
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13) as u8).collect();
        std::fs::write(dir.path().join(digest_hex(&id)), &data).expect("blob");
        let backend = LocalFsBackend::new(dir.path());
        // A small blob is read ahead whole, and its reads leave the windows alone.
        assert_eq!(
            backend
                .read_range(&id, 10, 90, &Deadline::none())
                .expect("read"),
            &data[10..100]
        );
        {
            let files = backend.files.read().expect("lock");
            assert!(files[&id].whole);
            assert!(!files[&id].whole_pending.load(Ordering::Relaxed));
            assert_eq!(*files[&id].advised.lock().expect("lock"), (0, 0));
        }
        // Windows, as for a blob too big to read whole.
        let backend = LocalFsBackend::new(dir.path());
        let blob = Arc::new(BlobFile {
            file: File::open(dir.path().join(digest_hex(&id))).expect("open"),
            whole: false,
            whole_pending: AtomicBool::new(true),
            advised: Mutex::new((0, 0)),
        });
        backend.files.write().expect("lock").insert(id, blob);
        let advised = || {
            let files = backend.files.read().expect("lock");
            let w = *files[&id].advised.lock().expect("lock");
            w
        };
        const W: u64 = READAHEAD_WINDOW;
        assert_eq!(
            backend
                .read_range(&id, 10, 90, &Deadline::none())
                .expect("read"),
            &data[10..100]
        );
        assert_eq!(advised(), (10, 100 + W));
        // Inside the window, not near its end: no new advice.
        backend
            .read_range(&id, 50_000, 10, &Deadline::none())
            .expect("read");
        assert_eq!(advised(), (10, 100 + W));
        // Near its end: the end moves.
        let near = 100 + W / 2 + 1;
        assert!(backend.read_range(&id, near, 1, &Deadline::none()).is_err());
        assert_eq!(advised(), (10, near + 1 + W));
        // A jump back before the window, or forward past it, starts a new one there (the file
        // is short: advice and reads beyond its end fail harmlessly).
        backend
            .read_range(&id, 0, 5, &Deadline::none())
            .expect("read");
        assert_eq!(advised(), (0, 5 + W));
        let far = 3 * W;
        assert!(backend.read_range(&id, far, 1, &Deadline::none()).is_err());
        assert_eq!(advised(), (far, far + 1 + W));
    }
}
