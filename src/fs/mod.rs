//! The read-only RAFS filesystem: FUSE semantics over a loaded bootstrap and a chunk source.
//!
//! [`RafsFs`] implements fuse-backend-rs's `FileSystem`, so the same code answers requests from
//! `/dev/fuse` (`crate::fuse`) and from virtio queues (`crate::vhost`). It holds no per-open
//! state: the image is immutable, so an inode number (table index + 1) is all a request needs.

mod attr;
pub mod record;

pub use record::{AccessRecorder, RecordError, RecordedList};

use std::any::Any;
use std::collections::VecDeque;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::api::BackendFileSystem;

use crate::format::{BlobRecord, Bootstrap, ChunkRecord, InodeKind, InodeRecord};
use crate::runtime::threads::{self, ThreadKind};
use crate::storage::{ChunkSource, Deadline, DEFAULT_REQUEST_TIMEOUT};

/// How long the kernel may cache entries and attributes. The image never changes under a
/// mount, so this is as long as the kernel allows to matter.
pub const DEFAULT_CACHE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Zeroes for holes and zero chunks, written in slices of this buffer.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Options of a [`RafsFs`].
#[derive(Clone, Debug)]
pub struct RafsFsOptions {
    /// Entry and attribute cache timeout handed to the kernel.
    pub cache_timeout: Duration,
    /// Ask the kernel to skip OPEN/RELEASE (and OPENDIR/RELEASEDIR) round trips. The kernel
    /// then caches as if every open said `FOPEN_KEEP_CACHE`, which is what this filesystem
    /// answers anyway. Only for a connection this filesystem has to itself: the setting is
    /// per connection, so a filesystem mounted beside others (a Vfs) must leave it off.
    /// The same goes for FLUSH: with this set, `flush` answers ENOSYS, which makes the kernel
    /// stop sending it on close.
    pub zero_message_open: bool,
    /// Fetch and verify the next chunk of a file in the background while it is read in order.
    pub readahead: bool,
    /// Where to count the distinct chunks file reads ask for (the workload's own chunks, as
    /// opposed to read-ahead and prefetch), if anywhere.
    pub demand: Option<Arc<crate::storage::Metrics>>,
    /// Where to record the files reads touch, in first-read order (`--record`), if anywhere.
    pub record: Option<Arc<AccessRecorder>>,
    /// Chunks of a file past the last one a read touched that are given to
    /// [`ChunkSource::fetch_ahead`] (0: none). nydusd's `amplify_io` sets it.
    pub fetch_ahead_chunks: u64,
    /// Where to count reads and the bytes they return (`fs_reads`, `fs_read_bytes`), if
    /// anywhere: two relaxed atomic additions per read.
    pub reads: Option<Arc<crate::storage::Metrics>>,
    /// How long one READ may take, waits for the network and retries included: then it fails
    /// with EIO (and a log line) instead of hanging the guest's reader.
    pub request_timeout: Duration,
}

impl Default for RafsFsOptions {
    fn default() -> Self {
        Self {
            cache_timeout: DEFAULT_CACHE_TIMEOUT,
            zero_message_open: false,
            readahead: true,
            demand: None,
            record: None,
            fetch_ahead_chunks: FETCH_AHEAD_CHUNKS,
            reads: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// A read-only filesystem serving one RAFS image.
pub struct RafsFs {
    bootstrap: Arc<Bootstrap>,
    source: Arc<dyn ChunkSource>,
    opts: RafsFsOptions,
    /// Whether the kernel agreed to [`RafsFsOptions::zero_message_open`].
    no_open: AtomicBool,
    /// Hints for the read-ahead worker: the next chunk of a file being read in order.
    readahead: Option<SyncSender<(BlobRecord, ChunkRecord)>>,
    /// The last chunk hinted, as `inode index << 32 | chunk index`, so that the many reads
    /// within one chunk send one hint.
    last_hint: AtomicU64,
    /// Recently read files and the chunk index up to which their chunks were given to
    /// [`ChunkSource::fetch_ahead`], so that each chunk is asked for once.
    ahead_marks: Mutex<VecDeque<(u32, u64)>>,
    /// The generation of every inode of this filesystem, unique to this instance
    /// ([`next_generation`]).
    generation: u64,
}

/// Generations already given to a [`RafsFs`].
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// A generation no other filesystem of this process has had. Inode numbers repeat between
/// images (each image's root is 1, its files follow), and a Kata daemon's Vfs gives the
/// 8-bit index of an unmounted image to a later one: after 255 mounts, an image's files come
/// back under node ids the guest saw for an earlier image's. With the same generation the
/// guest's kernel takes them for the old inodes and serves their cached pages and attributes
/// (nydusd's stale files, nydus#1694); a new generation makes it drop the old inode.
fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, Ordering::Relaxed) + 1
}

/// Chunks past the last one a read touched that are given to [`ChunkSource::fetch_ahead`]. A
/// program reads its binary and libraries by page faults all over them: with 8 chunks (8 MiB
/// at the default chunk size), a typical executable is on its way after its first read.
pub const FETCH_AHEAD_CHUNKS: u64 = 8;

/// Files remembered in [`RafsFs::ahead_marks`].
const AHEAD_MARKS: usize = 64;

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn erofs<T>() -> io::Result<T> {
    Err(err(libc::EROFS))
}

/// Starts the read-ahead worker: it reads the hinted chunks through `source`, which verifies
/// them and keeps them in its memory cache. It ends when the filesystem (the sender) is gone.
fn spawn_readahead(
    source: Arc<dyn ChunkSource>,
    timeout: Duration,
) -> Option<SyncSender<(BlobRecord, ChunkRecord)>> {
    let (tx, rx) = sync_channel::<(BlobRecord, ChunkRecord)>(4);
    let spawned = threads::spawn(ThreadKind::Fetcher, "skiff-readahead", move || {
        while let Ok((blob, chunk)) = rx.recv() {
            // A failure is reported by the read that needs the chunk, not here.
            let deadline = Deadline::after(timeout).background();
            let _ = source.read_chunk(&blob, &chunk, &deadline);
        }
    });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "no read-ahead worker");
            None
        }
    }
}

impl RafsFs {
    /// A filesystem over `bootstrap`, reading chunks from `source`.
    pub fn new(
        bootstrap: Arc<Bootstrap>,
        source: Arc<dyn ChunkSource>,
        opts: RafsFsOptions,
    ) -> Self {
        // A source that decodes ahead by itself needs no hints (and no thread) for it.
        let readahead = (opts.readahead && !source.decodes_ahead())
            .then(|| spawn_readahead(source.clone(), opts.request_timeout))
            .flatten();
        Self {
            bootstrap,
            source,
            opts,
            no_open: AtomicBool::new(false),
            readahead,
            last_hint: AtomicU64::new(u64::MAX),
            ahead_marks: Mutex::new(VecDeque::with_capacity(AHEAD_MARKS)),
            generation: next_generation(),
        }
    }

    /// The image being served.
    pub fn bootstrap(&self) -> &Arc<Bootstrap> {
        &self.bootstrap
    }

    /// What records the files read, if anything does ([`RafsFsOptions::record`]).
    pub fn recorder(&self) -> Option<&Arc<AccessRecorder>> {
        self.opts.record.as_ref()
    }

    /// Maps a FUSE inode number to a table index and its record, refusing numbers the image
    /// does not have (the guest may send anything).
    fn inode(&self, ino: u64) -> io::Result<(u32, &InodeRecord)> {
        let index = ino
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| err(libc::EINVAL))?;
        let rec = self
            .bootstrap
            .inode(index)
            .ok_or_else(|| err(libc::EINVAL))?;
        Ok((index, rec))
    }

    fn entry(&self, index: u32, rec: &InodeRecord) -> Entry {
        Entry {
            inode: u64::from(index) + 1,
            generation: self.generation,
            attr: attr::stat_of(u64::from(index) + 1, rec),
            attr_flags: 0,
            attr_timeout: self.opts.cache_timeout,
            entry_timeout: self.opts.cache_timeout,
        }
    }

    fn dir(&self, ino: u64) -> io::Result<u32> {
        let (index, rec) = self.inode(ino)?;
        if rec.kind() != Some(InodeKind::Directory) {
            return Err(err(libc::ENOTDIR));
        }
        Ok(index)
    }

    /// The path of inode `index`, for log messages only (a linear scan, taken on errors).
    fn path_of(&self, index: u32) -> String {
        self.bootstrap
            .paths()
            .get(index as usize)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    }

    /// For a read spanning chunks `first..=last` stored in one blob, asks the source for them
    /// together (a remote source fetches adjacent missing chunks with one request). Returns
    /// the results by chunk index; empty for a read within one chunk.
    fn read_spanned_chunks(
        &self,
        chunks: &[crate::format::ChunkRecord],
        blobs: &[crate::format::BlobRecord],
        first: u64,
        last: u64,
        deadline: &Deadline,
    ) -> std::collections::HashMap<
        u64,
        Result<crate::storage::ChunkData, crate::storage::StorageError>,
    > {
        let mut out = std::collections::HashMap::new();
        if last <= first {
            return out;
        }
        let Some(span) = chunks.get(first as usize..=last as usize) else {
            return out;
        };
        let stored: Vec<(u64, crate::format::ChunkRecord)> = (first..)
            .zip(span.iter().copied())
            .filter(|(_, c)| !c.is_zero())
            .collect();
        let Some((_, c0)) = stored.first() else {
            return out;
        };
        let blob_index = c0.blob_index.get();
        if stored.len() < 2 || stored.iter().any(|(_, c)| c.blob_index.get() != blob_index) {
            return out;
        }
        let Some(blob) = blobs.get(blob_index as usize) else {
            return out;
        };
        let records: Vec<crate::format::ChunkRecord> = stored.iter().map(|(_, c)| *c).collect();
        for ((i, _), r) in stored
            .iter()
            .zip(self.source.read_chunks(blob, &records, deadline))
        {
            out.insert(*i, r);
        }
        out
    }

    /// Writes `size` bytes of file `index` from `offset` to `w`, every byte verified.
    fn read_file(
        &self,
        index: u32,
        rec: &InodeRecord,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let file_size = rec.size.get();
        if offset >= file_size || size == 0 {
            return Ok(0);
        }
        let deadline = Deadline::after(self.opts.request_timeout);
        let started = std::time::Instant::now();
        let end = file_size.min(offset.saturating_add(u64::from(size)));
        let chunk_size = u64::from(self.bootstrap.chunk_size());
        let chunks = self.bootstrap.file_chunks(index);
        let blobs = self.bootstrap.blobs();
        // Before this read's own fetch, so that both are in flight together.
        self.fetch_ahead(index, chunks, blobs, (end - 1) / chunk_size);
        let mut spanned = self.read_spanned_chunks(
            chunks,
            blobs,
            offset / chunk_size,
            (end - 1) / chunk_size,
            &deadline,
        );
        let mut pos = offset;
        let mut written = 0usize;
        while pos < end {
            let ci = pos / chunk_size;
            let chunk = chunks.get(ci as usize).ok_or_else(|| err(libc::EIO))?;
            let within = (pos - ci * chunk_size) as usize;
            let take = ((ci + 1) * chunk_size).min(end) - pos;
            let take = take as usize;
            if chunk.is_zero() {
                let mut left = take;
                while left > 0 {
                    let n = left.min(ZEROES.len());
                    w.write_all(&ZEROES[..n])?;
                    left -= n;
                }
            } else {
                let blob = blobs
                    .get(chunk.blob_index.get() as usize)
                    .ok_or_else(|| err(libc::EIO))?;
                if let Some(m) = &self.opts.demand {
                    m.note_demand(&chunk.chunk_digest(), chunk.compressed_size.get());
                }
                let whole = within == 0 && take == chunk.uncompressed_size.get() as usize;
                let data = match spanned.remove(&ci) {
                    Some(r) => r,
                    // The read takes all of the chunk (a small file, the tail of a file read
                    // in one go): nothing will ask for it again, the page cache keeps it.
                    None if whole => self.source.read_chunk_once(blob, chunk, &deadline),
                    None => self.source.read_chunk(blob, chunk, &deadline),
                };
                let data = data.map_err(|e| {
                    tracing::error!(
                        file = %self.path_of(index),
                        chunk = ci,
                        offset,
                        ms = started.elapsed().as_millis() as u64,
                        deadline_passed = deadline.expired(),
                        error = %crate::util::error_chain(&e),
                        "read failed; returning EIO"
                    );
                    err(libc::EIO)
                })?;
                let bytes = data
                    .get(within..within + take)
                    .ok_or_else(|| err(libc::EIO))?;
                w.write_all(bytes)?;
            }
            pos += take as u64;
            written += take;
        }
        self.hint_next_chunk(index, chunks, blobs, end, chunk_size);
        Ok(written)
    }

    /// Gives the source the chunks of file `index` after chunk `last` (up to
    /// [`RafsFsOptions::fetch_ahead_chunks`]) that it was not given yet.
    fn fetch_ahead(&self, index: u32, chunks: &[ChunkRecord], blobs: &[BlobRecord], last: u64) {
        if self.opts.fetch_ahead_chunks == 0 || !self.source.fetches_ahead() {
            return;
        }
        let n = chunks.len() as u64;
        let end = last.saturating_add(1 + self.opts.fetch_ahead_chunks).min(n);
        let mut start = last + 1;
        if start >= end {
            return;
        }
        {
            let mut marks = crate::util::sync::lock(&self.ahead_marks);
            match marks.iter_mut().find(|(i, _)| *i == index) {
                Some((_, upto)) if *upto >= end => return,
                Some((_, upto)) => {
                    start = start.max(*upto);
                    *upto = end;
                }
                None => {
                    if marks.len() == AHEAD_MARKS {
                        marks.pop_front();
                    }
                    marks.push_back((index, end));
                }
            }
        }
        let Some(span) = chunks.get(start as usize..end as usize) else {
            return;
        };
        // One call per run of chunks in the same blob (a file may span blobs after dedup).
        for run in span
            .chunk_by(|a, b| a.blob_index.get() == b.blob_index.get())
            .filter(|run| run.iter().any(|c| !c.is_zero()))
        {
            if let Some(blob) = blobs.get(run[0].blob_index.get() as usize) {
                self.source.fetch_ahead(blob, run);
            }
        }
    }

    /// A read that reached the second half of a chunk is likely followed by one of the next
    /// chunk: have the worker fetch and verify it now, so that it is ready in memory by then.
    fn hint_next_chunk(
        &self,
        index: u32,
        chunks: &[ChunkRecord],
        blobs: &[BlobRecord],
        end: u64,
        chunk_size: u64,
    ) {
        let Some(tx) = &self.readahead else { return };
        let last = (end - 1) / chunk_size;
        if end - last * chunk_size < chunk_size / 2 {
            return;
        }
        let next = last + 1;
        let Some(chunk) = chunks.get(next as usize).filter(|c| !c.is_zero()) else {
            return;
        };
        let Some(blob) = blobs.get(chunk.blob_index.get() as usize) else {
            return;
        };
        let key = (u64::from(index) << 32) | (next & 0xffff_ffff);
        if self.last_hint.swap(key, Ordering::Relaxed) != key {
            // A full queue means the worker is behind: dropping the hint costs nothing.
            let _ = tx.try_send((*blob, *chunk));
        }
    }

    fn list_dir(
        &self,
        ino: u64,
        size: u32,
        offset: u64,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
        plus: bool,
    ) -> io::Result<()> {
        let index = self.dir(ino)?;
        if size == 0 {
            return Ok(());
        }
        let rec = self
            .bootstrap
            .inode(index)
            .ok_or_else(|| err(libc::EINVAL))?;
        let parent = rec.parent.get();
        let entries = self.bootstrap.dir_entries(index);
        // Offsets: 1 and 2 follow "." and "..", 3 + i follows entry i.
        let total = entries.len() as u64 + 2;
        let mut next = offset;
        while next < total {
            let (name, child): (&[u8], u32) = match next {
                0 => (b".", index),
                1 => (b"..", parent),
                n => {
                    let d = entries
                        .get((n - 2) as usize)
                        .ok_or_else(|| err(libc::EIO))?;
                    (self.bootstrap.entry_name(d), d.inode.get())
                }
            };
            let crec = self.bootstrap.inode(child).ok_or_else(|| err(libc::EIO))?;
            let kind = crec.kind().ok_or_else(|| err(libc::EIO))?;
            let de = DirEntry {
                ino: u64::from(child) + 1,
                offset: next + 1,
                type_: kind.dirent_type(),
                name,
            };
            let e = plus.then(|| self.entry(child, crec));
            if add(de, e)? == 0 {
                break;
            }
            next += 1;
        }
        Ok(())
    }
}

/// Whether a READ can be answered at once, from memory: a transport answers such reads on
/// the thread that read them (no hand-over, no wake-up of another thread) and hands the others
/// to workers, so that a read waiting on a disk or the network holds up no other request.
/// Every other request of a read-only image is answered from the bootstrap in memory.
pub trait ReadReadiness {
    /// Whether a read of `size` bytes of inode `ino` from `offset` needs no wait now (a hint:
    /// the answer may have changed by the time the read runs, which only costs that read the
    /// wait it would have had anyway). A read that will fail at once counts as ready.
    fn read_ready(&self, ino: u64, offset: u64, size: u32) -> bool;
}

impl<T: ReadReadiness + ?Sized> ReadReadiness for Arc<T> {
    fn read_ready(&self, ino: u64, offset: u64, size: u32) -> bool {
        (**self).read_ready(ino, offset, size)
    }
}

/// A `Vfs` (the daemons' mounts under one root) does not say which of its filesystems an
/// inode belongs to: its reads always go to a worker.
impl ReadReadiness for fuse_backend_rs::api::Vfs {
    fn read_ready(&self, _ino: u64, _offset: u64, _size: u32) -> bool {
        false
    }
}

impl ReadReadiness for RafsFs {
    fn read_ready(&self, ino: u64, offset: u64, size: u32) -> bool {
        let Ok((index, rec)) = self.inode(ino) else {
            return true;
        };
        let file_size = rec.size.get();
        if rec.kind() != Some(InodeKind::Regular) || offset >= file_size || size == 0 {
            return true;
        }
        let end = file_size.min(offset.saturating_add(u64::from(size)));
        let chunk_size = u64::from(self.bootstrap.chunk_size()).max(1);
        let chunks = self.bootstrap.file_chunks(index);
        (offset / chunk_size..=(end - 1) / chunk_size).all(|ci| {
            chunks
                .get(ci as usize)
                .is_none_or(|c| c.is_zero() || self.source.is_ready(c))
        })
    }
}

/// Lets a [`RafsFs`] be mounted in fuse-backend-rs's `Vfs`, next to other filesystems under
/// one pseudo root (the Kata daemon, `crate::api`). The Vfs maps this filesystem's inode
/// numbers into its own space (mount index in the top byte), so they must stay below
/// `VFS_MAX_INO` (2^56): an image has at most 2^32 inodes.
impl BackendFileSystem for RafsFs {
    fn mount(&self) -> io::Result<(Entry, u64)> {
        let root = self.bootstrap.inode(0).ok_or_else(|| err(libc::EIO))?;
        let max_ino = self.bootstrap.inode_count() as u64;
        Ok((self.entry(0, root), max_ino))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl FileSystem for RafsFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut wanted = FsOptions::ASYNC_READ
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::MAX_PAGES
            | FsOptions::BIG_WRITES;
        if self.opts.zero_message_open {
            wanted |= FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR;
        }
        let agreed = capable & wanted;
        self.no_open.store(
            agreed.contains(FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR),
            Ordering::Relaxed,
        );
        Ok(agreed)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let dir = self.dir(parent)?;
        let bytes = name.to_bytes();
        let child = match bytes {
            b"." => dir,
            b".." => self
                .bootstrap
                .inode(dir)
                .map(|r| r.parent.get())
                .unwrap_or(0),
            _ => self
                .bootstrap
                .lookup(dir, bytes)
                .ok_or_else(|| err(libc::ENOENT))?,
        };
        let rec = self.bootstrap.inode(child).ok_or_else(|| err(libc::EIO))?;
        Ok(self.entry(child, rec))
    }

    fn getattr(&self, _ctx: &Context, ino: u64, _h: Option<u64>) -> io::Result<(stat64, Duration)> {
        let (_, rec) = self.inode(ino)?;
        Ok((attr::stat_of(ino, rec), self.opts.cache_timeout))
    }

    fn readlink(&self, _ctx: &Context, ino: u64) -> io::Result<Vec<u8>> {
        let (index, _) = self.inode(ino)?;
        self.bootstrap
            .symlink_target(index)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| err(libc::EINVAL))
    }

    fn open(
        &self,
        _ctx: &Context,
        ino: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let (_, rec) = self.inode(ino)?;
        if self.no_open.load(Ordering::Relaxed) {
            // The kernel takes ENOSYS as "opens need no message" from now on; writes through
            // such opens still reach `write`/`setattr`, which refuse them.
            return Err(err(libc::ENOSYS));
        }
        let flags = flags as i32;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return erofs();
        }
        match rec.kind() {
            Some(InodeKind::Directory) => Err(err(libc::EISDIR)),
            _ => Ok((None, OpenOptions::KEEP_CACHE, None)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let (index, rec) = self.inode(ino)?;
        match rec.kind() {
            Some(InodeKind::Regular) => {
                if let Some(r) = &self.opts.record {
                    r.note(index);
                }
                let n = self.read_file(index, rec, w, size, offset)?;
                if let Some(m) = &self.opts.reads {
                    crate::storage::metrics::inc(&m.fs_reads);
                    crate::storage::metrics::add(&m.fs_read_bytes, n as u64);
                }
                Ok(n)
            }
            Some(InodeKind::Directory) => Err(err(libc::EISDIR)),
            _ => Err(err(libc::EINVAL)),
        }
    }

    fn release(
        &self,
        _ctx: &Context,
        _ino: u64,
        _flags: u32,
        _handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _ino: u64) -> io::Result<statvfs64> {
        Ok(attr::statfs_of(&self.bootstrap))
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        ino: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let (index, _) = self.inode(ino)?;
        let value = self
            .bootstrap
            .xattr(index, name.to_bytes())
            .ok_or_else(|| err(libc::ENODATA))?;
        if size == 0 {
            Ok(GetxattrReply::Count(value.len() as u32))
        } else if (size as usize) < value.len() {
            Err(err(libc::ERANGE))
        } else {
            Ok(GetxattrReply::Value(value.to_vec()))
        }
    }

    fn listxattr(&self, _ctx: &Context, ino: u64, size: u32) -> io::Result<ListxattrReply> {
        let (index, _) = self.inode(ino)?;
        let mut names = Vec::new();
        for (name, _) in self.bootstrap.xattrs(index) {
            names.extend_from_slice(name);
            names.push(0);
        }
        if size == 0 {
            Ok(ListxattrReply::Count(names.len() as u32))
        } else if (size as usize) < names.len() {
            Err(err(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(names))
        }
    }

    fn opendir(
        &self,
        _ctx: &Context,
        ino: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.dir(ino)?;
        if self.no_open.load(Ordering::Relaxed) {
            return Err(err(libc::ENOSYS));
        }
        if (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY {
            return erofs();
        }
        Ok((None, OpenOptions::KEEP_CACHE | OpenOptions::CACHE_DIR))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.list_dir(ino, size, offset, &mut |d, _| add_entry(d), false)
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        ino: u64,
        _handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.list_dir(
            ino,
            size,
            offset,
            &mut |d, e| match e {
                Some(e) => add_entry(d, e),
                None => Err(err(libc::EIO)),
            },
            true,
        )
    }

    fn releasedir(&self, _ctx: &Context, _ino: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn access(&self, _ctx: &Context, ino: u64, mask: u32) -> io::Result<()> {
        self.inode(ino)?;
        if mask as i32 & libc::W_OK != 0 {
            return erofs();
        }
        Ok(())
    }

    // Everything that would change the image is refused: it is read-only by construction.

    fn setattr(
        &self,
        _ctx: &Context,
        _ino: u64,
        _attr: stat64,
        _handle: Option<u64>,
        _valid: fuse_backend_rs::abi::fuse_abi::SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        erofs()
    }

    fn symlink(&self, _ctx: &Context, _l: &CStr, _p: u64, _n: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn mknod(
        &self,
        _ctx: &Context,
        _p: u64,
        _n: &CStr,
        _m: u32,
        _r: u32,
        _u: u32,
    ) -> io::Result<Entry> {
        erofs()
    }

    fn mkdir(&self, _ctx: &Context, _p: u64, _n: &CStr, _m: u32, _u: u32) -> io::Result<Entry> {
        erofs()
    }

    fn unlink(&self, _ctx: &Context, _p: u64, _n: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rmdir(&self, _ctx: &Context, _p: u64, _n: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rename(
        &self,
        _ctx: &Context,
        _o: u64,
        _on: &CStr,
        _n: u64,
        _nn: &CStr,
        _f: u32,
    ) -> io::Result<()> {
        erofs()
    }

    fn link(&self, _ctx: &Context, _i: u64, _p: u64, _n: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn create(
        &self,
        _ctx: &Context,
        _p: u64,
        _n: &CStr,
        _args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        erofs()
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _ctx: &Context,
        _ino: u64,
        _h: u64,
        _r: &mut dyn ZeroCopyReader,
        _size: u32,
        _off: u64,
        _lock_owner: Option<u64>,
        _delayed: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        erofs()
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        _i: u64,
        _h: u64,
        _m: u32,
        _o: u64,
        _l: u64,
    ) -> io::Result<()> {
        erofs()
    }

    fn setxattr(&self, _ctx: &Context, _i: u64, _n: &CStr, _v: &[u8], _f: u32) -> io::Result<()> {
        erofs()
    }

    fn removexattr(&self, _ctx: &Context, _i: u64, _n: &CStr) -> io::Result<()> {
        erofs()
    }

    fn flush(&self, _ctx: &Context, _i: u64, _h: u64, _lock_owner: u64) -> io::Result<()> {
        if self.opts.zero_message_open {
            // Nothing is ever written, so a flush has nothing to do. ENOSYS tells the kernel
            // to stop sending FLUSH on every close for the rest of the connection (each one is
            // a round trip; tar closes thousands of files), which is right only on a connection
            // this filesystem has to itself, like zero-message open.
            return Err(err(libc::ENOSYS));
        }
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, _i: u64, _datasync: bool, _h: u64) -> io::Result<()> {
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Context, _i: u64, _datasync: bool, _h: u64) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{build, BuildOptions, BuildSource, Compressor};
    use crate::storage::{ChunkData, StorageError};

    /// A source that serves nothing and records the fetch-ahead hints it gets, as the chunk
    /// offsets of each call.
    #[derive(Default)]
    struct Hints(Mutex<Vec<Vec<u64>>>);

    impl ChunkSource for Hints {
        fn read_chunk(
            &self,
            _: &BlobRecord,
            _: &ChunkRecord,
            _: &Deadline,
        ) -> Result<ChunkData, StorageError> {
            Err(StorageError::Corrupt {
                blob: String::new(),
                chunk: String::new(),
                offset: 0,
                source: crate::storage::VerifyError::Length { got: 0, want: 1 },
            })
        }

        fn fetches_ahead(&self) -> bool {
            true
        }

        fn fetch_ahead(&self, _: &BlobRecord, chunks: &[ChunkRecord]) {
            if let Ok(mut g) = self.0.lock() {
                g.push(chunks.iter().map(|c| c.compressed_offset.get()).collect());
            }
        }
    }

    /// An image of `files` (name, content) with 4 KiB chunks, stored raw; the directory
    /// holding it lives as long as the returned guard.
    fn image(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Arc<Bootstrap>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir(&src).expect("mkdir");
        for (name, data) in files {
            std::fs::write(src.join(name), data).expect("write");
        }
        let opts = BuildOptions {
            bootstrap: dir.path().join("boot"),
            blob_dir: dir.path().join("blobs"),
            chunk_size: 4096,
            compressor: Compressor::None,
            chunk_dicts: Vec::new(),
            progress: false,
            io_threads: 0,
            blob_id_sha256: false,
            node_compat: false,
        };
        build(&BuildSource::Dir(src), &opts).expect("build");
        let boot = Arc::new(Bootstrap::load(&opts.bootstrap).expect("load"));
        (dir, boot)
    }

    #[test]
    fn flush_is_switched_off_only_on_a_connection_of_its_own() {
        let (_dir, boot) = image(&[("f", b"x")]);
        let fs = |zero_message_open| {
            RafsFs::new(
                boot.clone(),
                Arc::new(Hints::default()),
                RafsFsOptions {
                    zero_message_open,
                    readahead: false,
                    ..RafsFsOptions::default()
                },
            )
        };
        let ctx = Context::default();
        // `mount` and `serve`: ENOSYS, so that the kernel stops sending FLUSH on every close.
        let e = fs(true).flush(&ctx, 2, 0, 0).expect_err("ENOSYS");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSYS));
        // Shared with other filesystems (the Kata daemon's Vfs): a plain success.
        fs(false).flush(&ctx, 2, 0, 0).expect("flush");
    }

    #[test]
    fn each_chunk_is_fetched_ahead_once_and_within_the_window() {
        // 12 chunks of 4 KiB, each different so none is deduplicated.
        let data: Vec<u8> = (0..12 * 4096u32)
            .map(|i| (i / 4096 * 37 + i * 13) as u8)
            .collect();
        let (_dir, boot) = image(&[("big", &data)]);
        let hints = Arc::new(Hints::default());
        let fs = RafsFs::new(
            boot.clone(),
            hints.clone(),
            RafsFsOptions {
                readahead: false,
                ..RafsFsOptions::default()
            },
        );
        let index = boot.lookup(0, b"big").expect("big");
        let chunks = boot.file_chunks(index);
        assert_eq!(chunks.len(), 12);
        let offsets = |r: std::ops::Range<usize>| -> Vec<u64> {
            chunks[r]
                .iter()
                .map(|c| c.compressed_offset.get())
                .collect()
        };
        let take = || std::mem::take(&mut *hints.0.lock().expect("lock"));
        // A read of chunk 0: chunks 1..=8 are on their way.
        fs.fetch_ahead(index, chunks, boot.blobs(), 0);
        assert_eq!(take(), vec![offsets(1..9)]);
        // Another read of chunk 0 asks for nothing new.
        fs.fetch_ahead(index, chunks, boot.blobs(), 0);
        assert!(take().is_empty());
        // The window slides with the reads: only what was not asked for yet.
        fs.fetch_ahead(index, chunks, boot.blobs(), 1);
        assert_eq!(take(), vec![offsets(9..10)]);
        // Up to the end of the file, and nothing past it.
        fs.fetch_ahead(index, chunks, boot.blobs(), 6);
        assert_eq!(take(), vec![offsets(10..12)]);
        fs.fetch_ahead(index, chunks, boot.blobs(), 11);
        assert!(take().is_empty());
    }
}
