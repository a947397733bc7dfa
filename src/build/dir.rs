//! Building from a directory on the host.
//!
//! Cold source trees are bound by disk latency, not by CPU: one read after another leaves the
//! disk idle between requests. So the work is spread over threads that keep many requests in
//! flight, while the image stays exactly what a one-file-at-a-time walk would make:
//! - walker threads list directories (readdir, lstat, xattrs, readlink) ahead of need;
//! - one assembler thread builds the tree from those listings in the fixed walk order (sorted
//!   names, pre-order, as `tar` reads a tree) and queues each regular file's content as read
//!   jobs in that order;
//! - reader threads take jobs in queue order, read and encode (hash, compress) them;
//! - the calling thread stores the encoded chunks strictly in queue order.
//!
//! Jobs are handed out in queue order against a budget of bytes read but not yet stored, which
//! bounds memory and cannot deadlock: the oldest job not yet stored always got its budget first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::chunker::{Chunker, Compressor, EncodedChunk};
use super::tree::{ChunkLoc, Meta, Node, NodeId, NodeKind, Tree};
use super::{BuildError, Progress};
use crate::format::{MAX_SYMLINK_LEN, MAX_XATTR_VALUE_LEN};

type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// Metadata of a host file in tree form.
pub fn meta_of(m: &Metadata) -> Meta {
    let is_dev = matches!(m.mode() & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK);
    Meta {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        rdev: if is_dev { m.rdev() } else { 0 },
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec() as u32,
        dir_size: if m.is_dir() { m.size() } else { 0 },
    }
}

/// The xattrs of `path` (not following symlinks).
fn xattrs_of(path: &Path) -> Result<Xattrs, BuildError> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        // Filesystems without xattr support simply have none.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(BuildError::io("listing xattrs of", path, e)),
    };
    for name in names {
        let value = xattr::get(path, &name)
            .map_err(|e| BuildError::io("reading xattrs of", path, e))?
            .unwrap_or_default();
        if value.len() > MAX_XATTR_VALUE_LEN {
            return Err(BuildError::Invalid(format!(
                "{}: xattr value too large",
                path.display()
            )));
        }
        out.insert(name.as_bytes().to_vec(), value);
    }
    Ok(out)
}

/// Default number of threads reading the source: enough requests in flight to keep a disk (or
/// a virtual disk) busy, few enough to stay cheap on a small machine.
pub const DEFAULT_IO_THREADS: usize = 16;

/// Bytes read but not yet stored, at most (a larger file segment is let through alone).
const READ_AHEAD_BYTES: u64 = 16 << 20;

/// Large files are read as several jobs of about this size, so that one big file is read and
/// compressed by several threads at once.
const SEGMENT_BYTES: u64 = 4 << 20;

/// Reads the tree under `root` into a [`Tree`], chunking file content through `chunker`, with
/// `io_threads` threads reading the source (0: [`DEFAULT_IO_THREADS`]). The result does not
/// depend on the number of threads.
pub fn scan(
    root: &Path,
    chunker: &mut Chunker,
    progress: &Progress,
    io_threads: usize,
) -> Result<Tree, BuildError> {
    scan_with(root, chunker, progress, io_threads, READ_AHEAD_BYTES)
}

/// [`scan`] with `budget` bytes of read-ahead.
fn scan_with(
    root: &Path,
    chunker: &mut Chunker,
    progress: &Progress,
    io_threads: usize,
    budget: u64,
) -> Result<Tree, BuildError> {
    let m = std::fs::symlink_metadata(root).map_err(|e| BuildError::io("reading", root, e))?;
    if !m.is_dir() {
        return Err(BuildError::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut tree = Tree::new(meta_of(&m));
    tree.nodes[0].xattrs = xattrs_of(root)?;
    let threads = if io_threads == 0 {
        DEFAULT_IO_THREADS
    } else {
        io_threads
    };
    let chunk_size = u64::from(chunker.chunk_size());
    let segment = chunk_size * (SEGMENT_BYTES / chunk_size).max(1);
    let compressor = chunker.compressor();
    let walk = Walk::new(root.to_path_buf());
    let jobs = Jobs::new(budget);
    let (tx, rx) = mpsc::channel::<Done>();

    let (assembled, stored) = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| walker(&walk));
        }
        for _ in 0..threads {
            let tx = tx.clone();
            let jobs = &jobs;
            s.spawn(move || reader(jobs, tx, chunk_size, compressor, progress));
        }
        drop(tx);
        let (walk, jobs) = (&walk, &jobs);
        let assembler = s.spawn(move || {
            let r = assemble(root, tree, walk, jobs, progress, segment);
            // Whatever happened, no more jobs come; on failure everyone stops.
            if r.is_err() {
                walk.abort();
            }
            jobs.close(r.is_err());
            r
        });
        let stored = store_in_order(rx, jobs, chunker);
        if stored.is_err() {
            walk.abort();
            jobs.close(true);
        }
        let assembled = assembler
            .join()
            .unwrap_or_else(|_| Err(BuildError::Internal("tree assembler panicked".into())));
        (assembled, stored)
    });
    // A storing failure comes first: the assembler then only saw the abort it caused.
    let (done, locs) = stored?;
    let (mut tree, job_count) = assembled?;
    if done != job_count {
        return Err(BuildError::Internal(format!(
            "{done} of {job_count} read jobs stored"
        )));
    }
    for (node, loc) in locs {
        if let Some(NodeKind::File { chunks, .. }) = tree.nodes.get_mut(node).map(|n| &mut n.kind) {
            chunks.push(loc);
        }
    }
    Ok(tree)
}

/// One directory entry as a walker read it.
struct Entry {
    name: OsString,
    meta: Metadata,
    xattrs: Xattrs,
    /// The target, for a symlink.
    target: Option<Vec<u8>>,
}

/// A directory's entries in name order, or why it could not be listed. An entry that could
/// not be read is an error in its place, raised when the walk reaches it.
type Listing = Result<Vec<Result<Entry, BuildError>>, BuildError>;

fn list_dir(dir: &Path) -> Listing {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)
        .map_err(|e| BuildError::io("listing", dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| BuildError::io("listing", dir, e))?;
    // Sorted so that content is chunked in the same order every time.
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| BuildError::io("reading", &path, e))?;
            let xattrs = xattrs_of(&path)?;
            let target = if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&path)
                    .map_err(|e| BuildError::io("reading link", &path, e))?;
                Some(t.as_os_str().as_bytes().to_vec())
            } else {
                None
            };
            Ok(Entry {
                name,
                meta,
                xattrs,
                target,
            })
        })
        .collect())
}

/// Directories to list and their listings, shared by the walkers and the assembler.
///
/// Walkers and the assembler wait on separate condition variables, and walkers are woken only
/// when there is new work (or none will come): with dozens of threads on two cores, waking
/// every thread on every change costs more CPU than the work itself.
struct Walk {
    state: Mutex<WalkState>,
    /// Walkers wait here for directories to list.
    work: Condvar,
    /// The assembler waits here for a listing.
    listed: Condvar,
}

struct WalkState {
    /// Directories to list, the next the assembler visits last (it is popped first).
    todo: Vec<PathBuf>,
    /// Directories being listed.
    busy: usize,
    /// Listings not yet taken by the assembler.
    done: HashMap<PathBuf, Listing>,
    abort: bool,
}

impl Walk {
    fn new(root: PathBuf) -> Self {
        Self {
            state: Mutex::new(WalkState {
                todo: vec![root],
                busy: 0,
                done: HashMap::new(),
                abort: false,
            }),
            work: Condvar::new(),
            listed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WalkState> {
        // A poisoned lock means a thread panicked, which the scope reports; the state itself
        // is still consistent (every update is a few assignments).
        crate::util::sync::lock(&self.state)
    }

    fn abort(&self) {
        self.lock().abort = true;
        self.work.notify_all();
        self.listed.notify_all();
    }

    /// The listing of `dir`, once a walker has made it.
    fn take(&self, dir: &Path) -> Result<Vec<Result<Entry, BuildError>>, BuildError> {
        let mut g = self.lock();
        loop {
            if let Some(l) = g.done.remove(dir) {
                return l;
            }
            if g.abort {
                return Err(BuildError::Internal("walk aborted".into()));
            }
            if g.todo.is_empty() && g.busy == 0 {
                return Err(BuildError::Internal(format!(
                    "{} was never listed",
                    dir.display()
                )));
            }
            g = crate::util::sync::wait(&self.listed, g);
        }
    }
}

fn walker(walk: &Walk) {
    loop {
        let dir = {
            let mut g = walk.lock();
            loop {
                if g.abort {
                    return;
                }
                if let Some(d) = g.todo.pop() {
                    g.busy += 1;
                    break d;
                }
                if g.busy == 0 {
                    return;
                }
                g = crate::util::sync::wait(&walk.work, g);
            }
        };
        let listing = list_dir(&dir);
        let subdirs: Vec<PathBuf> = match &listing {
            Ok(entries) => entries
                .iter()
                .filter_map(|e| e.as_ref().ok())
                .filter(|e| e.meta.is_dir())
                .map(|e| dir.join(&e.name))
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut g = walk.lock();
        let more = !subdirs.is_empty();
        // Last first: the assembler takes the first subdirectory next.
        g.todo.extend(subdirs.into_iter().rev());
        g.done.insert(dir, listing);
        g.busy -= 1;
        let finished = g.todo.is_empty() && g.busy == 0;
        drop(g);
        walk.listed.notify_all();
        // New directories to list, or the end of the walk: otherwise waiting walkers have
        // nothing to wake up for.
        if more || finished {
            walk.work.notify_all();
        }
    }
}

/// A part of a regular file to read.
#[derive(Clone)]
struct Job {
    node: NodeId,
    path: Arc<PathBuf>,
    offset: u64,
    len: u64,
    /// The file's last part: check that nothing follows it.
    last: bool,
}

/// The read jobs in walk order, handed out in that order against the read-ahead budget.
struct Jobs {
    state: Mutex<JobState>,
    cv: Condvar,
    budget: u64,
}

struct JobState {
    queue: VecDeque<Job>,
    /// Index of the job at the front of `queue`.
    next: usize,
    /// Jobs queued so far.
    total: usize,
    /// Bytes handed out and not yet stored.
    in_flight: u64,
    /// A reader waits for budget to come back.
    starved: bool,
    closed: bool,
    abort: bool,
}

impl Jobs {
    fn new(budget: u64) -> Self {
        Self {
            state: Mutex::new(JobState {
                queue: VecDeque::new(),
                next: 0,
                total: 0,
                in_flight: 0,
                starved: false,
                closed: false,
                abort: false,
            }),
            cv: Condvar::new(),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        crate::util::sync::lock(&self.state)
    }

    fn add(&self, batch: Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let mut g = self.lock();
        g.total += batch.len();
        g.queue.extend(batch);
        drop(g);
        self.cv.notify_all();
    }

    /// No more jobs will be added; with `abort`, the queued ones are dropped too.
    fn close(&self, abort: bool) {
        let mut g = self.lock();
        g.closed = true;
        g.abort |= abort;
        drop(g);
        self.cv.notify_all();
    }

    /// The next job and its index, or `None` when there is no more work.
    fn next(&self) -> Option<(usize, Job)> {
        let mut g = self.lock();
        loop {
            if g.abort {
                return None;
            }
            match g.queue.front() {
                Some(j) if g.in_flight == 0 || g.in_flight + j.len <= self.budget => {
                    let len = j.len;
                    let job = g.queue.pop_front()?;
                    g.in_flight += len;
                    let index = g.next;
                    g.next += 1;
                    return Some((index, job));
                }
                Some(_) => g.starved = true,
                None if g.closed => return None,
                None => {}
            }
            g = crate::util::sync::wait(&self.cv, g);
        }
    }

    /// `len` bytes handed out earlier are stored.
    fn release(&self, len: u64) {
        let mut g = self.lock();
        g.in_flight = g.in_flight.saturating_sub(len);
        // Wake the readers only once the front job fits: waking them for less sends them all
        // straight back to sleep. They all wake, so each one that still does not fit says so
        // again.
        let wake = g.starved
            && g.queue
                .front()
                .is_some_and(|j| g.in_flight == 0 || g.in_flight + j.len <= self.budget);
        if wake {
            g.starved = false;
        }
        drop(g);
        if wake {
            self.cv.notify_all();
        }
    }

    fn total(&self) -> usize {
        self.lock().total
    }
}

/// Builds the tree from the walkers' listings in walk order, queueing file content as jobs.
/// Returns the tree and the number of jobs queued.
///
/// The walk is in pre-order with names sorted: a directory's entries in name order, each
/// subdirectory's whole subtree where its name comes. That is the order `tar`, `cp -a` and
/// `find` read a tree in, so a full read of the image reads its blob front to back, and the
/// chunks that follow a read in the blob are the ones read next (what decode-ahead and
/// read-ahead of the blob count on; see `storage::ahead`).
fn assemble(
    root: &Path,
    mut tree: Tree,
    walk: &Walk,
    jobs: &Jobs,
    progress: &Progress,
    segment: u64,
) -> Result<(Tree, usize), BuildError> {
    /// A directory being visited and the entries of it not visited yet.
    struct Frame {
        dir: PathBuf,
        id: NodeId,
        entries: std::vec::IntoIter<Result<Entry, BuildError>>,
    }
    // Hard links: the first path found for a (device, inode) owns the node.
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut stack = vec![Frame {
        dir: root.to_path_buf(),
        id: 0,
        entries: walk.take(root)?.into_iter(),
    }];
    let mut batch = Vec::new();
    while let Some(frame) = stack.last_mut() {
        let Some(entry) = frame.entries.next() else {
            stack.pop();
            continue;
        };
        let Entry {
            name,
            meta: m,
            xattrs,
            target,
        } = entry?;
        let (dir_id, path) = (frame.id, frame.dir.join(&name));
        progress.entry();
        let key = (m.dev(), m.ino());
        if !m.is_dir() && m.nlink() > 1 {
            if let Some(&id) = links.get(&key) {
                link(&mut tree, dir_id, &name, id)?;
                continue;
            }
        }
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            NodeKind::Dir(BTreeMap::new())
        } else if ft.is_file() {
            NodeKind::File {
                size: m.len(),
                chunks: Vec::new(),
            }
        } else if ft.is_symlink() {
            let target = target.unwrap_or_default();
            if target.is_empty() || target.len() > MAX_SYMLINK_LEN {
                return Err(BuildError::Invalid(format!(
                    "{}: bad symlink target length",
                    path.display()
                )));
            }
            NodeKind::Symlink(target)
        } else {
            NodeKind::Special
        };
        let id = tree.add(Node {
            meta: meta_of(&m),
            xattrs,
            kind,
        });
        link(&mut tree, dir_id, &name, id)?;
        // Any non-directory can be hard linked: fifos, devices and symlinks too.
        if !ft.is_dir() && m.nlink() > 1 {
            links.insert(key, id);
        }
        if ft.is_dir() {
            // The files met so far go first; one hand-over per run of files keeps the lock
            // cold (listings are in memory already, so this delays no read by much).
            jobs.add(std::mem::take(&mut batch));
            let entries = walk.take(&path)?.into_iter();
            stack.push(Frame {
                dir: path,
                id,
                entries,
            });
        } else if ft.is_file() {
            file_jobs(id, path, m.len(), segment, &mut batch);
        }
    }
    jobs.add(batch);
    Ok((tree, jobs.total()))
}

/// The jobs reading a file of `size` bytes: segments of `segment` bytes (a multiple of the
/// chunk size, so chunks are cut where a whole-file read would cut them). An empty file still
/// gets one, which checks that it can be opened and is still empty.
fn file_jobs(node: NodeId, path: PathBuf, size: u64, segment: u64, out: &mut Vec<Job>) {
    let path = Arc::new(path);
    let mut offset = 0;
    loop {
        let len = (size - offset).min(segment);
        let last = offset + len >= size;
        out.push(Job {
            node,
            path: path.clone(),
            offset,
            len,
            last,
        });
        offset += len;
        if last {
            break;
        }
    }
}

/// A job read and encoded (or why not).
struct Done {
    index: usize,
    node: NodeId,
    len: u64,
    result: Result<Vec<EncodedChunk>, BuildError>,
}

fn reader(
    jobs: &Jobs,
    tx: mpsc::Sender<Done>,
    chunk_size: u64,
    compressor: Compressor,
    progress: &Progress,
) {
    while let Some((index, job)) = jobs.next() {
        // A panic must not lose the job: the storing thread waits for every job in order,
        // and the budget it holds would never come back.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_job(&job, chunk_size, compressor, progress)
        }))
        .unwrap_or_else(|_| {
            Err(BuildError::Internal(format!(
                "reading {} panicked",
                job.path.display()
            )))
        });
        let done = Done {
            index,
            node: job.node,
            len: job.len,
            result,
        };
        if tx.send(done).is_err() {
            // The storing side gave up.
            return;
        }
    }
}

fn read_job(
    job: &Job,
    chunk_size: u64,
    compressor: Compressor,
    progress: &Progress,
) -> Result<Vec<EncodedChunk>, BuildError> {
    let path = job.path.as_path();
    let f = File::open(path).map_err(|e| BuildError::io("opening", path, e))?;
    let end = job.offset + job.len;
    let mut out = Vec::with_capacity(job.len.div_ceil(chunk_size) as usize);
    let mut offset = job.offset;
    while offset < end {
        let n = (end - offset).min(chunk_size) as usize;
        let mut buf = vec![0u8; n];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| BuildError::io("reading", path, e))?;
        progress.bytes(n as u64);
        out.push(EncodedChunk::encode(compressor, buf));
        offset += n as u64;
    }
    if job.last {
        // A file that grew while being read would make the image differ from its metadata.
        let mut probe = [0u8; 1];
        if f.read_at(&mut probe, end)
            .map_err(|e| BuildError::io("reading", path, e))?
            != 0
        {
            return Err(BuildError::Invalid(format!(
                "{} changed while being read",
                path.display()
            )));
        }
    }
    Ok(out)
}

/// Stores what the readers send strictly in job order. Returns the number of jobs stored and
/// each chunk's location with its node, in order.
#[allow(clippy::type_complexity)]
fn store_in_order(
    rx: mpsc::Receiver<Done>,
    jobs: &Jobs,
    chunker: &mut Chunker,
) -> Result<(usize, Vec<(NodeId, ChunkLoc)>), BuildError> {
    let mut waiting: BTreeMap<usize, Done> = BTreeMap::new();
    let mut next = 0usize;
    let mut locs = Vec::new();
    for done in rx {
        waiting.insert(done.index, done);
        while let Some(d) = waiting.remove(&next) {
            next += 1;
            for c in d.result? {
                locs.push((d.node, chunker.store_encoded(c)?));
            }
            jobs.release(d.len);
        }
    }
    Ok((next, locs))
}

fn link(
    tree: &mut Tree,
    dir: NodeId,
    name: &std::ffi::OsStr,
    id: NodeId,
) -> Result<(), BuildError> {
    let name = name.as_bytes().to_vec();
    if name.len() > crate::format::MAX_NAME_LEN {
        return Err(BuildError::Invalid(format!(
            "name longer than 255 bytes: {:?}",
            String::from_utf8_lossy(&name)
        )));
    }
    tree.children_mut(dir)
        .ok_or_else(|| BuildError::Internal("parent is not a directory".into()))?
        .insert(name, id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::emit;

    /// Deterministic bytes: a repeated pattern (compressible) with noise mixed in.
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    x as u8
                } else {
                    (i % 251) as u8
                }
            })
            .collect()
    }

    /// A tree with what the walk order and segmenting must get right: nested and sibling
    /// directories, files larger than a segment, empty and all-zero files, repeated content,
    /// hard links and symlinks.
    fn make_tree(root: &Path) {
        let w = |p: &str, data: &[u8]| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, data).expect("write");
        };
        let big = (SEGMENT_BYTES * 2 + 12_345) as usize;
        w("a/big", &bytes(1, big));
        w("a/b/c/small", &bytes(2, 5000));
        w("a/b/empty", b"");
        w("a/b/zeros", &vec![0u8; 300_000]);
        w("z/copy-of-small", &bytes(2, 5000));
        w("z/other", &bytes(3, 200_000));
        w("m/big-too", &bytes(4, (SEGMENT_BYTES + 1) as usize));
        for i in 0..40 {
            w(&format!("many/f{i:02}"), &bytes(100 + i, 1000 * i as usize));
        }
        std::fs::hard_link(root.join("z/other"), root.join("a/link-to-other")).expect("link");
        std::os::unix::fs::symlink("../z/other", root.join("a/sym")).expect("symlink");
    }

    /// Scans `root` and returns the bootstrap bytes and the blob's bytes.
    fn image(root: &Path, out: &Path, threads: usize, budget: u64) -> (Vec<u8>, Vec<u8>) {
        let cs = 64 * 1024;
        let mut chunker = Chunker::new(cs, Compressor::Lz4, out, false).expect("chunker");
        let progress = Progress::new(false);
        let mut tree = scan_with(root, &mut chunker, &progress, threads, budget).expect("scan");
        let (blobs, id, _) = chunker.finish(&mut tree).expect("finish");
        let boot = emit::emit(&tree, blobs, &[])
            .expect("emit")
            .finish(cs)
            .expect("bootstrap");
        let id = id.expect("a blob was written");
        let blob = std::fs::read(out.join(crate::format::digest_hex(&id))).expect("blob");
        (boot, blob)
    }

    #[test]
    fn the_image_does_not_depend_on_threads_or_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("src");
        make_tree(&root);
        let reference = image(&root, &dir.path().join("o1"), 1, u64::MAX);
        // A budget of one byte hands out one job at a time (each alone over budget).
        for (i, (threads, budget)) in [(1, 1), (8, 1), (8, 100_000), (16, READ_AHEAD_BYTES)]
            .into_iter()
            .enumerate()
        {
            let got = image(
                &root,
                &dir.path().join(format!("o{}", i + 2)),
                threads,
                budget,
            );
            assert!(
                got == reference,
                "{threads} threads, budget {budget}: the image differs"
            );
        }
        // And the image holds every inode.
        let loaded = crate::format::Bootstrap::from_bytes(reference.0).expect("valid bootstrap");
        // The root, 6 directories, 47 files (the hard link is one of them) and a symlink.
        assert_eq!(loaded.inode_count(), 1 + 6 + 47 + 1);
    }

    #[test]
    fn file_jobs_cut_at_segment_multiples() {
        let mut out = Vec::new();
        file_jobs(7, PathBuf::from("f"), 10, 4, &mut out);
        let parts: Vec<_> = out.iter().map(|j| (j.offset, j.len, j.last)).collect();
        assert_eq!(parts, vec![(0, 4, false), (4, 4, false), (8, 2, true)]);
        out.clear();
        file_jobs(7, PathBuf::from("f"), 0, 4, &mut out);
        let parts: Vec<_> = out.iter().map(|j| (j.offset, j.len, j.last)).collect();
        assert_eq!(parts, vec![(0, 0, true)]);
        out.clear();
        file_jobs(7, PathBuf::from("f"), 8, 4, &mut out);
        let parts: Vec<_> = out.iter().map(|j| (j.offset, j.len, j.last)).collect();
        assert_eq!(parts, vec![(0, 4, false), (4, 4, true)]);
    }

    #[test]
    fn jobs_go_out_in_order_within_the_budget() {
        let jobs = Jobs::new(10);
        let job = |len| Job {
            node: 0,
            path: Arc::new(PathBuf::from("f")),
            offset: 0,
            len,
            last: true,
        };
        jobs.add(vec![job(100), job(4), job(6), job(1)]);
        jobs.close(false);
        // Over budget, but alone: let through.
        let (i, j) = jobs.next().expect("first");
        assert_eq!((i, j.len), (0, 100));
        jobs.release(100);
        let (i, _) = jobs.next().expect("second");
        let (k, _) = jobs.next().expect("third");
        assert_eq!((i, k), (1, 2));
        // 4 + 6 in flight: the next byte must wait for a release.
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| jobs.next().map(|(i, _)| i));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!h.is_finished(), "handed out over budget");
            jobs.release(4);
            h.join().expect("join")
        });
        assert_eq!(waiter, Some(3));
        assert!(jobs.next().is_none(), "closed and empty");
    }
}
