//! The walk that turns a checked v6 tree into Skiff's tables: breadth-first from the root nid,
//! so that every directory gets a smaller index than its children (as the Skiff model
//! requires), each nid given one inode index (hard links share it), every attribute, name,
//! xattr, target and chunk carried over.

use std::collections::{HashMap, VecDeque};

use zerocopy::little_endian::{I64, U32, U64};

use super::chunks::ChunkTable;
use super::inode::{file_type_of, Inode};
use super::superblock::Meta;
use super::V6Error;
use crate::format::{
    BlobRecord, BootstrapWriter, InodeKind, InodeRecord, BLOB_FLAG_SHA256_ID, MAX_SYMLINK_LEN,
};

/// What nydusd reports where the v6 inode has no field: the loading process's owner (for
/// images built without EXPLICIT_UID_GID) and the load time (for an mtime of 0, which the root
/// always has, and for compact inodes, which have no mtime).
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    /// uid reported when the image carries none.
    pub uid: u32,
    /// gid reported when the image carries none.
    pub gid: u32,
    /// Seconds reported as mtime and ctime when the image has an mtime of 0 or none.
    pub now: i64,
}

impl Defaults {
    /// nydusd's: the effective uid and gid of this process, and the current time.
    pub fn of_this_process() -> Self {
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Self { uid, gid, now }
    }
}

/// Linux `new_encode_dev` (what nydus stores in `i_u`) back to a glibc `dev_t`.
fn decode_rdev(v: u32) -> u64 {
    let major = (v >> 8) & 0xfff;
    let minor = (v & 0xff) | ((v >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// A directory waiting for its entries.
struct PendingDir {
    nid: u64,
    parent_nid: u64,
    index: u32,
    inode: Inode,
    path: Vec<u8>,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.len() > 1 {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// The walk's state.
struct Walk<'a> {
    data: &'a [u8],
    meta: &'a Meta,
    chunks: &'a ChunkTable,
    defaults: Defaults,
    w: BootstrapWriter,
    /// nid → inode index, for hard links and the prefetch table.
    index_of: HashMap<u64, u32>,
    /// Directory references (besides "." and "..") per inode index.
    refs: Vec<u32>,
    /// Subdirectories per inode index.
    subdirs: Vec<u32>,
    /// Byte ranges of every inode read, for the overlap check.
    extents: Vec<(u64, u64, u64)>,
    queue: VecDeque<PendingDir>,
    /// Inodes whose stored link count differs from the tree's.
    nlink_differs: u64,
}

impl<'a> Walk<'a> {
    fn inode_err(nid: u64, path: &[u8], what: String) -> V6Error {
        V6Error::Inode {
            nid,
            path: show(path),
            what,
        }
    }

    /// Makes the Skiff record of `ino` (named `path`) with its xattrs and content, and returns
    /// its index.
    fn add_inode(&mut self, ino: &Inode, path: &[u8], parent: u32) -> Result<u32, V6Error> {
        let err = |what: String| Self::inode_err(ino.nid, path, what);
        let index =
            u32::try_from(self.w.inodes.len()).map_err(|_| err("more than 2^32 inodes".into()))?;
        let mut r = InodeRecord::zeroed();
        r.mode = U32::new(ino.mode);
        let (uid, gid) = if self.meta.explicit_uid_gid() {
            (ino.uid, ino.gid)
        } else {
            (self.defaults.uid, self.defaults.gid)
        };
        r.uid = U32::new(uid);
        r.gid = U32::new(gid);
        match ino.mtime {
            Some((s, ns)) if s != 0 => {
                r.mtime = I64::new(s);
                r.mtime_nsec = U32::new(ns);
            }
            // As nydusd: no mtime (or 0) is reported as the load time, ctime too.
            other => {
                r.mtime = I64::new(self.defaults.now);
                r.mtime_nsec = U32::new(other.map_or(0, |(_, ns)| ns));
                r.ctime = I64::new(self.defaults.now);
            }
        }
        r.size = U64::new(ino.size);
        let mut extent_chunks = 0u64;
        match ino.kind {
            InodeKind::Directory => {
                r.parent = U32::new(parent);
            }
            InodeKind::Regular => {
                let addrs = ino
                    .chunk_addrs(self.data, self.meta.chunk_size)
                    .map_err(err)?;
                extent_chunks = addrs.len() as u64;
                r.data_index = U64::new(self.w.chunks.len() as u64);
                r.data_count = U32::new(
                    u32::try_from(addrs.len()).map_err(|_| err("too many chunks".into()))?,
                );
                let cs = u64::from(self.meta.chunk_size);
                for (i, a) in addrs.iter().enumerate() {
                    let device = a.device();
                    if device == 0 {
                        return Err(err(format!(
                            "chunk {i} is in device 0, the bootstrap itself (not RAFS v6 data)"
                        )));
                    }
                    let key = (device - 1, a.ci_index(), a.c_blk_addr.get());
                    let c = self.chunks.get(&key).ok_or_else(|| {
                        err(format!(
                            "chunk {i} (blob {}, CI index {}, block {}) is not in the \
                             bootstrap's chunk table",
                            key.0, key.1, key.2
                        ))
                    })?;
                    let want = (ino.size - i as u64 * cs).min(cs);
                    if u64::from(c.uncompressed_size.get()) != want {
                        return Err(err(format!(
                            "chunk {i} holds {} bytes, the file needs {want} there",
                            c.uncompressed_size.get()
                        )));
                    }
                    self.w.chunks.push(*c);
                }
            }
            InodeKind::Symlink => {
                let target = ino.symlink_target(self.data).map_err(err)?;
                if target.len() > MAX_SYMLINK_LEN || target.contains(&0) {
                    return Err(err("invalid symlink target".into()));
                }
                r.data_index = U64::new(self.w.add_string(target));
                r.data_count = U32::new(target.len() as u32);
            }
            InodeKind::CharDevice | InodeKind::BlockDevice => {
                if ino.size != 0 {
                    return Err(err("device with a size".into()));
                }
                r.rdev = U64::new(decode_rdev(ino.i_u));
            }
            InodeKind::Fifo | InodeKind::Socket => {
                if ino.size != 0 {
                    return Err(err("fifo or socket with a size".into()));
                }
            }
        }
        let mut xattrs = ino.xattrs(self.data).map_err(err)?;
        xattrs.sort_by(|a, b| a.0.cmp(&b.0));
        if xattrs.windows(2).any(|p| p[0].0 == p[1].0) {
            return Err(err("the same xattr twice".into()));
        }
        r.xattr_index = U32::new(self.w.xattrs.len() as u32);
        r.xattr_count = U32::new(xattrs.len() as u32);
        for (name, value) in &xattrs {
            self.w.add_xattr(name, value);
        }
        self.w.inodes.push(r);
        self.refs.push(0);
        self.subdirs.push(0);
        self.index_of.insert(ino.nid, index);
        self.extents
            .push((ino.offset, ino.extent_end(extent_chunks), ino.nid));
        if ino.nlink == 0 {
            return Err(err("link count 0".into()));
        }
        Ok(index)
    }

    /// Adds the entries of directory `d`, queueing its subdirectories.
    fn walk_dir(&mut self, d: PendingDir) -> Result<(), V6Error> {
        let err = |what: String| Self::inode_err(d.nid, &d.path, what);
        let entries = d.inode.dir_entries(self.data).map_err(err)?;
        let first_dirent = self.w.dirents.len() as u64;
        let mut prev: Option<&[u8]> = None;
        let (mut dot, mut dotdot) = (false, false);
        let mut count = 0u32;
        for e in &entries {
            if prev.is_some_and(|p| p >= e.name) {
                return Err(err(format!(
                    "entries not sorted by name or repeated at {:?}",
                    show(e.name)
                )));
            }
            prev = Some(e.name);
            match e.name {
                b"." => {
                    if e.nid != d.nid {
                        return Err(err(format!("\".\" names nid {}", e.nid)));
                    }
                    dot = true;
                    continue;
                }
                b".." => {
                    if e.nid != d.parent_nid {
                        return Err(err(format!(
                            "\"..\" names nid {}, but the directory is in nid {}",
                            e.nid, d.parent_nid
                        )));
                    }
                    dotdot = true;
                    continue;
                }
                _ => {}
            }
            let path = join(&d.path, e.name);
            let index = match self.index_of.get(&e.nid) {
                Some(&i) => {
                    let kind = self.w.inodes.get(i as usize).and_then(InodeRecord::kind);
                    if kind == Some(InodeKind::Directory) {
                        return Err(Self::inode_err(
                            e.nid,
                            &path,
                            "a directory reached a second time (a cycle or a directory hard link)"
                                .into(),
                        ));
                    }
                    if kind.map(file_type_of) != Some(e.file_type) {
                        return Err(Self::inode_err(
                            e.nid,
                            &path,
                            format!("entry file type {} differs from the inode's", e.file_type),
                        ));
                    }
                    i
                }
                None => {
                    let ino = Inode::read(self.data, self.meta, e.nid)
                        .map_err(|w| Self::inode_err(e.nid, &path, w))?;
                    if file_type_of(ino.kind) != e.file_type {
                        return Err(Self::inode_err(
                            e.nid,
                            &path,
                            format!("entry file type {} differs from the inode's", e.file_type),
                        ));
                    }
                    let i = self.add_inode(&ino, &path, d.index)?;
                    if ino.kind == InodeKind::Directory {
                        if let Some(s) = self.subdirs.get_mut(d.index as usize) {
                            *s += 1;
                        }
                        self.queue.push_back(PendingDir {
                            nid: e.nid,
                            parent_nid: d.nid,
                            index: i,
                            inode: ino,
                            path,
                        });
                    }
                    i
                }
            };
            if let Some(r) = self.refs.get_mut(index as usize) {
                *r = r.saturating_add(1);
            }
            self.w.add_dirent(e.name, index);
            count += 1;
        }
        if !dot || !dotdot {
            return Err(err("no \".\" or no \"..\" entry".into()));
        }
        let rec = self
            .w
            .inodes
            .get_mut(d.index as usize)
            .ok_or_else(|| err("lost its record".into()))?;
        rec.data_index = U64::new(first_dirent);
        rec.data_count = U32::new(count);
        Ok(())
    }

    /// Link counts from the tree (what the Skiff model requires), and the overlap check.
    fn finish(mut self) -> Result<BootstrapWriter, V6Error> {
        for (i, r) in self.w.inodes.iter_mut().enumerate() {
            let nlink = if r.kind() == Some(InodeKind::Directory) {
                2 + self.subdirs.get(i).copied().unwrap_or(0)
            } else {
                self.refs.get(i).copied().unwrap_or(0)
            };
            if r.nlink.get() != 0 && r.nlink.get() != nlink {
                self.nlink_differs += 1;
            }
            r.nlink = U32::new(nlink);
        }
        self.extents.sort_unstable();
        for pair in self.extents.windows(2) {
            let ((_, a_end, a), (b_start, _, b)) = (pair[0], pair[1]);
            if b_start < a_end {
                return Err(V6Error::Inode {
                    nid: b,
                    path: String::new(),
                    what: format!("overlaps inode nid {a} (a nid into the middle of an inode)"),
                });
            }
        }
        for &(start, end, nid) in &self.extents {
            if self
                .meta
                .fixed
                .iter()
                .any(|f| start < f.end && f.start < end)
            {
                return Err(V6Error::Inode {
                    nid,
                    path: String::new(),
                    what: "overlaps the superblock, the blob table, the prefetch table or the \
                           chunk table"
                        .into(),
                });
            }
        }
        if self.nlink_differs > 0 {
            tracing::debug!(
                inodes = self.nlink_differs,
                "v6 link counts differ from the tree's; the tree's are served"
            );
        }
        Ok(self.w)
    }
}

/// Walks the tree of `data` (its fixed part `meta`, its chunks `chunks`) into a Skiff writer.
pub fn walk(
    data: &[u8],
    meta: &Meta,
    chunks: &ChunkTable,
    defaults: Defaults,
) -> Result<BootstrapWriter, V6Error> {
    let blobs = meta
        .blobs
        .iter()
        .map(|b| {
            let mut r = <BlobRecord as zerocopy::FromZeros>::new_zeroed();
            r.id = b.id;
            r.size = U64::new(b.compressed_size);
            r.flags = U32::new(BLOB_FLAG_SHA256_ID);
            r
        })
        .collect();
    let w = BootstrapWriter {
        blobs,
        ..BootstrapWriter::default()
    };
    let mut walk = Walk {
        data,
        meta,
        chunks,
        defaults,
        w,
        index_of: HashMap::new(),
        refs: Vec::new(),
        subdirs: Vec::new(),
        extents: Vec::new(),
        queue: VecDeque::new(),
        nlink_differs: 0,
    };
    let root_nid = meta.root_nid;
    let root = Inode::read(data, meta, root_nid).map_err(|w| Walk::inode_err(root_nid, b"/", w))?;
    if root.kind != InodeKind::Directory {
        return Err(Walk::inode_err(
            root_nid,
            b"/",
            "the root is not a directory".into(),
        ));
    }
    let index = walk.add_inode(&root, b"/", 0)?;
    walk.queue.push_back(PendingDir {
        nid: root_nid,
        parent_nid: root_nid,
        index,
        inode: root,
        path: b"/".to_vec(),
    });
    while let Some(d) = walk.queue.pop_front() {
        walk.walk_dir(d)?;
    }
    let mut prefetch = Vec::with_capacity(meta.prefetch.len());
    for &nid in &meta.prefetch {
        let i = walk
            .index_of
            .get(&nid)
            .ok_or_else(|| V6Error::Prefetch(format!("nid {nid} is not an inode of the tree")))?;
        prefetch.push(U32::new(*i));
    }
    walk.w.prefetch = prefetch;
    walk.finish()
}
