//! Reading a whole image through the filesystem layer (`skiff::fs::RafsFs`, the code that answers
//! the guest), checking the invariants every image must keep, whatever its bootstrap says:
//!
//! - every byte a read returns is part of a chunk whose bytes have the digest the image gives
//!   that chunk (read whole chunks, hash them); a chunk that cannot be had is EIO, never other
//!   bytes, and never a short read inside the file;
//! - a read across chunks returns what the reads of each chunk returned;
//! - readdir and readdirplus list the same entries, each of which lookup finds with the same
//!   inode and attributes as getattr;
//! - readlink gives the symlink target, and the xattr calls agree with each other.
//!
//! What was served is returned, so that a target can also compare it with what the image was
//! made from.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::{
    Context, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyWriter,
};
use fuse_backend_rs::file_traits::FileReadWriteVolatile;
use skiff::format::{Bootstrap, InodeKind};
use skiff::fs::{RafsFs, RafsFsOptions};
use skiff::storage::{BlobBackend, CachedChunkSource};

/// The root's FUSE inode number.
const ROOT: u64 = 1;
/// The reply buffer of each readdir.
const READDIR_BUFFER: usize = 512;
/// The largest read the Linux virtio-fs driver sends.
const MAX_READ: u64 = 128 << 10;

/// How much of an image one iteration reads, so that a bootstrap claiming huge files or trees
/// costs bounded time.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Entries visited.
    pub nodes: usize,
    /// Bytes read.
    pub bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            nodes: 4096,
            bytes: 8 << 20,
        }
    }
}

/// The content of a regular file as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Every byte, read.
    Read(Vec<u8>),
    /// A read failed with this errno (EIO for a chunk that could not be had).
    Failed(i32),
    /// Not read in full: over [`Limits::bytes`].
    Skipped,
}

/// One entry as the filesystem serves it.
#[derive(Clone, Debug)]
pub struct Served {
    /// FUSE inode number.
    pub ino: u64,
    /// Attributes (getattr).
    pub attr: stat64,
    /// Symlink target (readlink).
    pub target: Option<Vec<u8>>,
    /// Extended attributes (listxattr, getxattr).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Content of a regular file.
    pub content: Option<Content>,
}

/// The whole tree served: path (`/`-joined, the root is `/`) to entry.
pub type Tree = BTreeMap<Vec<u8>, Served>;

/// A [`ZeroCopyWriter`] that collects what the filesystem writes, up to a capacity (the
/// guest's buffer).
struct VecWriter {
    buf: Vec<u8>,
    cap: usize,
}

impl io::Write for VecWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.cap - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for VecWriter {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _count: usize,
        _off: u64,
    ) -> io::Result<usize> {
        // RafsFs writes from memory only; a file-to-buffer copy would be a change to notice.
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "RafsFs is not expected to copy from a file",
        ))
    }

    fn available_bytes(&self) -> usize {
        self.cap - self.buf.len()
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// The filesystem over `bootstrap` and `backend`, as the daemons build it (a verifying,
/// caching chunk source), without the read-ahead thread: one iteration, one thread.
pub fn filesystem<B: BlobBackend + 'static>(bootstrap: Arc<Bootstrap>, backend: B) -> RafsFs {
    let source = CachedChunkSource::in_memory(backend, 1 << 20);
    let opts = RafsFsOptions {
        readahead: false,
        ..RafsFsOptions::default()
    };
    RafsFs::new(bootstrap, Arc::new(source), opts)
}

/// Reads everything of `fs` (within `limits`), checking the invariants of this module's doc.
/// Panics when one is broken.
pub fn serve_all(fs: &RafsFs, limits: Limits) -> Tree {
    let mut walk = Walk {
        fs,
        ctx: Context::default(),
        limits,
        bytes: 0,
        tree: BTreeMap::new(),
    };
    let _ = fs.statfs(&walk.ctx, ROOT);
    let root = fs
        .getattr(&walk.ctx, ROOT, None)
        .map(|(a, _)| a)
        .unwrap_or_else(|e| panic!("getattr of the root of a loaded image: {e}"));
    let mut stack = vec![(b"/".to_vec(), ROOT, root)];
    while let Some((path, ino, attr)) = stack.pop() {
        if walk.tree.len() >= limits.nodes {
            break;
        }
        let served = walk.entry(&path, ino, attr);
        if attr.st_mode & libc::S_IFMT == libc::S_IFDIR {
            for (name, child, child_attr) in walk.dir(&path, ino) {
                let mut p = path.clone();
                if p.len() > 1 {
                    p.push(b'/');
                }
                p.extend_from_slice(&name);
                stack.push((p, child, child_attr));
            }
        }
        walk.tree.insert(path, served);
    }
    walk.tree
}

struct Walk<'a> {
    fs: &'a RafsFs,
    ctx: Context,
    limits: Limits,
    bytes: u64,
    tree: Tree,
}

impl Walk<'_> {
    fn show(path: &[u8]) -> String {
        String::from_utf8_lossy(path).into_owned()
    }

    /// The entries of directory `ino`, checked against each other; (name, inode, attributes).
    fn dir(&mut self, path: &[u8], ino: u64) -> Vec<(Vec<u8>, u64, stat64)> {
        let fs = self.fs;
        let ctx = &{ self.ctx };
        let p = Self::show(path);
        let handle = match fs.opendir(ctx, ino, libc::O_RDONLY as u32) {
            Ok((h, _)) => h.unwrap_or(0),
            Err(e) => panic!("opendir of directory {p}: {e}"),
        };
        // Small buffers, so that listing resumes from offsets the filesystem handed out.
        let mut plain: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut offset = 0;
        loop {
            let mut got = 0;
            let mut last = offset;
            // As the server does: each entry takes its dirent's size of the reply buffer, and
            // one that does not fit is refused (0), which ends this call. The buffer is small,
            // so that listings resume, but holds the longest entry (24 + 255 bytes).
            let mut room = READDIR_BUFFER;
            fs.readdir(ctx, ino, handle, READDIR_BUFFER as u32, offset, &mut |d| {
                let need = (24 + d.name.len()).next_multiple_of(8);
                if need > room {
                    return Ok(0);
                }
                room -= need;
                plain.push((d.name.to_vec(), d.ino));
                got += 1;
                last = d.offset;
                Ok(need)
            })
            .unwrap_or_else(|e| panic!("readdir of {p} at {offset}: {e}"));
            if got == 0 || plain.len() > self.limits.nodes {
                break;
            }
            assert!(last > offset, "readdir of {p}: offsets do not advance");
            offset = last;
        }
        let mut plus: Vec<(Vec<u8>, u64, stat64)> = Vec::new();
        fs.readdirplus(ctx, ino, handle, 1 << 20, 0, &mut |d, e| {
            assert_eq!(
                d.ino, e.inode,
                "readdirplus of {p}: dirent and entry inodes"
            );
            plus.push((d.name.to_vec(), e.inode, e.attr));
            Ok(1)
        })
        .unwrap_or_else(|e| panic!("readdirplus of {p}: {e}"));
        let _ = fs.releasedir(ctx, ino, 0, handle);
        let dots = |n: &[u8]| n == b"." || n == b"..";
        plain.retain(|(n, _)| !dots(n));
        plus.retain(|(n, _, _)| !dots(n));
        if plain.len() <= self.limits.nodes {
            let names: Vec<(&[u8], u64)> = plain.iter().map(|(n, i)| (n.as_slice(), *i)).collect();
            let plus_names: Vec<(&[u8], u64)> =
                plus.iter().map(|(n, i, _)| (n.as_slice(), *i)).collect();
            assert_eq!(names, plus_names, "readdir and readdirplus of {p} differ");
        }
        for (name, child, attr) in &plus {
            let c = CString::new(name.clone())
                .unwrap_or_else(|_| panic!("entry of {p} with a NUL in its name"));
            let e = fs
                .lookup(ctx, ino, &c)
                .unwrap_or_else(|e| panic!("lookup of listed {p}/{}: {e}", Self::show(name)));
            assert_eq!(e.inode, *child, "lookup of {p}/{}: inode", Self::show(name));
            assert!(
                same_attr(&e.attr, attr),
                "lookup and readdirplus of {p}/{} give other attributes",
                Self::show(name)
            );
        }
        plus
    }

    /// Everything about one entry but its directory listing.
    fn entry(&mut self, path: &[u8], ino: u64, listed: stat64) -> Served {
        let fs = self.fs;
        let ctx = &{ self.ctx };
        let p = Self::show(path);
        let attr = fs
            .getattr(ctx, ino, None)
            .map(|(a, _)| a)
            .unwrap_or_else(|e| panic!("getattr of listed {p}: {e}"));
        assert!(
            same_attr(&attr, &listed),
            "getattr of {p} differs from its entry"
        );
        assert_eq!(attr.st_ino, ino, "st_ino of {p}");
        let kind = attr.st_mode & libc::S_IFMT;
        let target = match fs.readlink(ctx, ino) {
            Ok(t) => {
                assert_eq!(kind, libc::S_IFLNK, "readlink of non-symlink {p} succeeded");
                assert_eq!(t.len() as i64, attr.st_size, "symlink {p}: size and target");
                Some(t)
            }
            Err(e) => {
                assert_ne!(kind, libc::S_IFLNK, "readlink of symlink {p}: {e}");
                None
            }
        };
        let xattrs = self.xattrs(&p, ino);
        let content = (kind == libc::S_IFREG).then(|| self.content(&p, ino, &attr));
        if kind != libc::S_IFREG {
            let mut w = VecWriter {
                buf: Vec::new(),
                cap: 4096,
            };
            assert!(
                fs.read(ctx, ino, 0, &mut w, 4096, 0, None, 0).is_err(),
                "read of non-file {p} succeeded"
            );
        }
        Served {
            ino,
            attr,
            target,
            xattrs,
            content,
        }
    }

    fn xattrs(&mut self, p: &str, ino: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let fs = self.fs;
        let ctx = &{ self.ctx };
        let mut out = BTreeMap::new();
        let want = match fs.listxattr(ctx, ino, 0) {
            Ok(ListxattrReply::Count(n)) => n,
            Ok(ListxattrReply::Names(_)) => panic!("listxattr of {p} with size 0 gave names"),
            // No xattrs (or not supported): nothing more to check.
            Err(_) => return out,
        };
        if want == 0 {
            return out;
        }
        let names = match fs.listxattr(ctx, ino, want) {
            Ok(ListxattrReply::Names(n)) => n,
            Ok(ListxattrReply::Count(_)) => panic!("listxattr of {p} with a size gave a count"),
            Err(e) => panic!("listxattr of {p} with the size it asked for: {e}"),
        };
        assert_eq!(names.len(), want as usize, "listxattr of {p}: size");
        assert!(
            fs.listxattr(ctx, ino, want - 1).is_err() || want == 1,
            "listxattr of {p} into too small a buffer succeeded"
        );
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let shown = String::from_utf8_lossy(name);
            let c = CString::new(name).unwrap_or_else(|_| panic!("xattr name of {p}"));
            let size = match fs.getxattr(ctx, ino, &c, 0) {
                Ok(GetxattrReply::Count(n)) => n,
                Ok(GetxattrReply::Value(_)) => panic!("getxattr {shown} of {p}: value for size 0"),
                Err(e) => panic!("getxattr {shown} of {p}, listed: {e}"),
            };
            let value = match fs.getxattr(ctx, ino, &c, size.max(1)) {
                Ok(GetxattrReply::Value(v)) => v,
                Ok(GetxattrReply::Count(_)) => panic!("getxattr {shown} of {p}: count for a size"),
                Err(e) => panic!("getxattr {shown} of {p} with its size: {e}"),
            };
            assert_eq!(value.len(), size as usize, "getxattr {shown} of {p}: size");
            out.insert(name.to_vec(), value);
        }
        out
    }

    /// Reads a regular file chunk by chunk, checking each chunk's bytes against its digest.
    fn content(&mut self, p: &str, ino: u64, attr: &stat64) -> Content {
        let fs = self.fs;
        let ctx = &{ self.ctx };
        let size = attr.st_size as u64;
        if let Err(e) = fs.open(ctx, ino, libc::O_RDONLY as u32, 0) {
            panic!("open of file {p}: {e}");
        }
        let b = fs.bootstrap();
        let index = (ino - 1) as u32;
        let chunks = b.file_chunks(index);
        let chunk_size = u64::from(b.chunk_size());
        let mut data = Vec::new();
        let mut failed = None;
        for (ci, chunk) in chunks.iter().enumerate() {
            let start = ci as u64 * chunk_size;
            let len = chunk_size.min(size.saturating_sub(start));
            if self.bytes.saturating_add(len) > self.limits.bytes {
                return Content::Skipped;
            }
            self.bytes += len;
            match read_range(fs, ctx, ino, start, len) {
                Ok(bytes) => {
                    assert_eq!(
                        bytes.len() as u64,
                        len,
                        "read of {p} chunk {ci}: short read inside the file"
                    );
                    assert!(
                        chunk.chunk_digest().matches(&bytes),
                        "read of {p} chunk {ci}: bytes served under a digest they do not have"
                    );
                    if chunk.is_zero() {
                        assert!(bytes.iter().all(|&b| b == 0), "zero chunk {ci} of {p}");
                    }
                    data.extend_from_slice(&bytes);
                }
                Err(e) => {
                    assert_eq!(e, libc::EIO, "read of {p} chunk {ci} failed with errno {e}");
                    failed.get_or_insert(e);
                }
            }
        }
        // Past the end: nothing.
        match read_range(fs, ctx, ino, size, 4096) {
            Ok(b) => assert!(b.is_empty(), "read past the end of {p} gave bytes"),
            Err(e) => panic!("read past the end of {p}: errno {e}"),
        }
        if let Some(e) = failed {
            return Content::Failed(e);
        }
        assert_eq!(data.len() as u64, size, "file {p}: chunks and size");
        // A read across a chunk boundary serves what the reads of each chunk served.
        if chunks.len() > 1 {
            let from = chunk_size - 100.min(chunk_size / 2);
            let len = (size - from).min(chunk_size);
            let across = read_range(fs, ctx, ino, from, len)
                .unwrap_or_else(|e| panic!("read of {p} across chunks: errno {e}"));
            assert_eq!(
                across,
                data[from as usize..(from + len) as usize],
                "read of {p} across chunks differs from the reads of each"
            );
        }
        Content::Read(data)
    }
}

/// Reads `len` bytes of `ino` from `offset` in reads of at most [`MAX_READ`], as the guest does.
fn read_range(fs: &RafsFs, ctx: &Context, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, i32> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let n = (end - pos).min(MAX_READ) as u32;
        let mut w = VecWriter {
            buf: Vec::new(),
            cap: n as usize,
        };
        let got = fs
            .read(ctx, ino, 0, &mut w, n, pos, None, 0)
            .map_err(|e| errno(&e))?;
        assert_eq!(
            got,
            w.buf.len(),
            "read returned a count other than it wrote"
        );
        out.extend_from_slice(&w.buf);
        if got == 0 {
            break;
        }
        pos += got as u64;
    }
    Ok(out)
}

/// The attributes the kernel caches, compared.
fn same_attr(a: &stat64, b: &stat64) -> bool {
    (
        a.st_ino,
        a.st_mode,
        a.st_nlink,
        a.st_uid,
        a.st_gid,
        a.st_rdev,
        a.st_size,
        a.st_blocks,
    ) == (
        b.st_ino,
        b.st_mode,
        b.st_nlink,
        b.st_uid,
        b.st_gid,
        b.st_rdev,
        b.st_size,
        b.st_blocks,
    ) && (a.st_mtime, a.st_mtime_nsec, a.st_ctime, a.st_ctime_nsec)
        == (b.st_mtime, b.st_mtime_nsec, b.st_ctime, b.st_ctime_nsec)
}

/// The kind of a mode, as the image model names it.
pub fn kind_of(mode: u32) -> Option<InodeKind> {
    InodeKind::from_mode(mode)
}
