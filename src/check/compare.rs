//! The filesystem comparison: a source tree against an image, on every field (type, mode, uid,
//! gid, size, mtime, rdev, symlink target, xattrs), hard-link groups and content.
//!
//! One comparison, two kinds of source behind [`SourceTree`]: a directory on the host
//! ([`HostDir`], `skiff check --bootstrap --source DIR`) and OCI layers applied in memory
//! ([`LayerTree`], `skiff check --source REF --target REF`). A host file's content is read and
//! hashed chunk by chunk; a layer tree's files already carry the digests of their chunks, cut
//! with the image's chunk size and digester, so its content costs nothing more here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{Problem, Rule};
use crate::build::tree::{ChunkLoc, NodeId, NodeKind, Tree};
use crate::format::{Bootstrap, InodeKind};

/// Everything compared about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// "file", "directory", …
    pub kind: &'static str,
    /// `st_mode`.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size; `None` where the source has none to compare (a directory from a tar layer).
    pub size: Option<u64>,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Device number (devices only, else 0).
    pub rdev: u64,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Where a source file's content is, to compare with the image's chunks.
pub enum Content<'a> {
    /// Not a regular file.
    None,
    /// A host file, read and hashed with the image's chunk size.
    Host(PathBuf),
    /// Chunk digests and sizes, cut as the image cuts.
    Chunks(&'a [ChunkLoc]),
}

/// One source entry as the comparison sees it.
pub struct SourceEntry<'a, N> {
    /// Its metadata.
    pub facts: Facts,
    /// Equal for the names of one inode (hard links), distinct otherwise.
    pub identity: (u64, u64),
    /// A directory's entries by name.
    pub children: Option<BTreeMap<Vec<u8>, N>>,
    /// A regular file's content.
    pub content: Content<'a>,
}

/// A tree to compare an image with.
pub trait SourceTree: Sync {
    /// A handle on one entry.
    type Node: Clone + Send + Sync;
    /// The root directory.
    fn root(&self) -> Self::Node;
    /// The entry `n` (an error message if it cannot be read).
    fn entry(&self, n: &Self::Node) -> Result<SourceEntry<'_, Self::Node>, String>;
}

/// The name of a mode's file type.
pub fn kind_name(mode: u32) -> &'static str {
    match InodeKind::from_mode(mode) {
        Some(InodeKind::Directory) => "directory",
        Some(InodeKind::Regular) => "file",
        Some(InodeKind::Symlink) => "symlink",
        Some(InodeKind::CharDevice) => "char device",
        Some(InodeKind::BlockDevice) => "block device",
        Some(InodeKind::Fifo) => "fifo",
        Some(InodeKind::Socket) => "socket",
        None => "unknown",
    }
}

fn problem(path: &[u8], what: impl Into<String>) -> Problem {
    Problem::new(Rule::Filesystem, path, what)
}

/// A directory on the host.
pub struct HostDir {
    root: PathBuf,
}

impl HostDir {
    /// The tree under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
}

impl SourceTree for HostDir {
    type Node = PathBuf;

    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    fn entry(&self, host: &PathBuf) -> Result<SourceEntry<'_, PathBuf>, String> {
        host_entry(host)
    }
}

fn host_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(names) = xattr::list(path) {
        for n in names {
            if let Ok(Some(v)) = xattr::get(path, &n) {
                out.insert(n.as_bytes().to_vec(), v);
            }
        }
    }
    out
}

/// A host path's entry.
fn host_entry<'a>(host: &Path) -> Result<SourceEntry<'a, PathBuf>, String> {
    let m = std::fs::symlink_metadata(host).map_err(|e| format!("source unreadable: {e}"))?;
    let facts = Facts {
        kind: kind_name(m.mode()),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: Some(m.size()),
        mtime: (m.mtime(), m.mtime_nsec() as u32),
        rdev: if m.file_type().is_char_device() || m.file_type().is_block_device() {
            m.rdev()
        } else {
            0
        },
        target: std::fs::read_link(host)
            .ok()
            .map(|t| t.as_os_str().as_bytes().to_vec()),
        xattrs: host_xattrs(host),
    };
    let children = if m.is_dir() {
        let mut c = BTreeMap::new();
        let rd =
            std::fs::read_dir(host).map_err(|e| format!("source directory unreadable: {e}"))?;
        for e in rd.flatten() {
            let name = e.file_name().as_bytes().to_vec();
            c.insert(name, e.path());
        }
        Some(c)
    } else {
        None
    };
    Ok(SourceEntry {
        facts,
        identity: (m.dev(), m.ino()),
        children,
        content: if m.is_file() {
            Content::Host(host.to_path_buf())
        } else {
            Content::None
        },
    })
}

/// A tree of OCI layers applied in memory (by [`crate::build::layers::apply_with`] with a
/// [`crate::build::layers::DigestSink`]).
pub struct LayerTree<'t> {
    tree: &'t Tree,
}

impl<'t> LayerTree<'t> {
    /// The tree `tree`, whose files carry chunk digests.
    pub fn new(tree: &'t Tree) -> Self {
        Self { tree }
    }
}

impl SourceTree for LayerTree<'_> {
    type Node = NodeId;

    fn root(&self) -> NodeId {
        0
    }

    fn entry(&self, n: &NodeId) -> Result<SourceEntry<'_, NodeId>, String> {
        let n = *n;
        let node = self.tree.nodes.get(n).ok_or("internal: no such node")?;
        let m = &node.meta;
        let (size, target, children, content) = match &node.kind {
            NodeKind::Dir(c) => (None, None, Some(c.clone()), Content::None),
            NodeKind::File { size, chunks } => {
                (Some(*size), None, None, Content::Chunks(chunks.as_slice()))
            }
            NodeKind::Symlink(t) => (Some(t.len() as u64), Some(t.clone()), None, Content::None),
            NodeKind::Special => (Some(0), None, None, Content::None),
        };
        let is_dev = matches!(
            InodeKind::from_mode(m.mode),
            Some(InodeKind::CharDevice | InodeKind::BlockDevice)
        );
        Ok(SourceEntry {
            facts: Facts {
                kind: kind_name(m.mode),
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                size,
                mtime: (m.mtime, m.mtime_nsec),
                rdev: if is_dev { m.rdev } else { 0 },
                target,
                xattrs: node.xattrs.clone(),
            },
            identity: (0, n as u64),
            children,
            content,
        })
    }
}

/// The image's facts of inode `ino`.
fn image_facts(b: &Bootstrap, ino: u32, source_has_size: bool) -> Option<Facts> {
    let rec = b.inode(ino)?;
    Some(Facts {
        kind: kind_name(rec.mode.get()),
        mode: rec.mode.get(),
        uid: rec.uid.get(),
        gid: rec.gid.get(),
        size: source_has_size.then(|| rec.size.get()),
        mtime: (rec.mtime.get(), rec.mtime_nsec.get()),
        rdev: rec.rdev.get(),
        target: b.symlink_target(ino).map(<[u8]>::to_vec),
        xattrs: b
            .xattrs(ino)
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
    })
}

/// Compares image `b` with directory `source`, field by field and byte by byte.
pub fn compare_host_dir(b: &Bootstrap, source: &Path) -> Vec<Problem> {
    compare(b, &HostDir::new(source))
}

/// Compares image `b` with the layer tree `tree` (whose chunk digests were cut with the
/// image's chunk size and digester).
pub fn compare_tree(b: &Bootstrap, tree: &Tree) -> Vec<Problem> {
    compare(b, &LayerTree::new(tree))
}

/// The one comparison: walks `source` alongside the image and returns every difference,
/// named by path.
pub fn compare<T: SourceTree>(b: &Bootstrap, source: &T) -> Vec<Problem> {
    let mut problems = Vec::new();
    // Hard-link groups: path -> group key, on each side.
    let mut src_groups: BTreeMap<Vec<u8>, (u64, u64)> = BTreeMap::new();
    let mut img_groups: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut files: Vec<(Vec<u8>, Content<'_>, u32)> = Vec::new();
    let mut stack: Vec<(Vec<u8>, T::Node, u32)> = vec![(b"/".to_vec(), source.root(), 0)];
    while let Some((rel, node, ino)) = stack.pop() {
        let src = match source.entry(&node) {
            Ok(e) => e,
            Err(e) => {
                problems.push(problem(&rel, e));
                continue;
            }
        };
        let Some(mut img) = image_facts(b, ino, src.facts.size.is_some()) else {
            problems.push(problem(&rel, "inode missing from image"));
            continue;
        };
        // What the image's format does not hold is not compared (docs/format.md).
        let kept = b.preserved();
        if !kept.directory_sizes && src.children.is_some() {
            img.size = src.facts.size;
        }
        if !kept.root_mtime && ino == 0 {
            img.mtime = src.facts.mtime;
        }
        if !kept.owners {
            (img.uid, img.gid) = (src.facts.uid, src.facts.gid);
        }
        diff_facts(&rel, &src.facts, &img, &mut problems);
        if src.facts.kind != img.kind {
            continue;
        }
        if src.children.is_none() {
            src_groups.insert(rel.clone(), src.identity);
            img_groups.insert(rel.clone(), ino);
        }
        if let Some(children) = src.children {
            let img_names: BTreeSet<Vec<u8>> = b
                .dir_entries(ino)
                .iter()
                .map(|d| b.entry_name(d).to_vec())
                .collect();
            for n in children.keys().filter(|n| !img_names.contains(*n)) {
                problems.push(problem(&join(&rel, n), "missing from the image"));
            }
            for n in img_names.iter().filter(|n| !children.contains_key(*n)) {
                problems.push(problem(
                    &join(&rel, n),
                    "in the image but not in the source",
                ));
            }
            for (n, child) in children {
                if let Some(child_ino) = b.lookup(ino, &n) {
                    stack.push((join(&rel, &n), child, child_ino));
                }
            }
        } else if !matches!(src.content, Content::None) {
            files.push((rel, src.content, ino));
        }
    }
    problems.extend(diff_link_groups(&src_groups, &img_groups));
    let chunk_size = b.chunk_size() as usize;
    let mut content: Vec<Problem> = files
        .par_iter()
        .filter_map(|(rel, c, ino)| {
            let r = match c {
                Content::Host(p) => compare_host_content(b, *ino, p, chunk_size),
                Content::Chunks(chunks) => compare_chunks(b, *ino, chunks, chunk_size),
                Content::None => Ok(()),
            };
            r.err().map(|w| problem(rel, w))
        })
        .collect();
    problems.append(&mut content);
    problems.sort();
    problems
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.len() > 1 {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn diff_facts(rel: &[u8], src: &Facts, img: &Facts, out: &mut Vec<Problem>) {
    if src.kind != img.kind {
        out.push(problem(
            rel,
            format!("type: source {}, image {}", src.kind, img.kind),
        ));
        return;
    }
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(problem(rel, format!("{name}: source {a}, image {b}")));
        }
    };
    field("mode", format!("{:o}", src.mode), format!("{:o}", img.mode));
    field("uid", src.uid.to_string(), img.uid.to_string());
    field("gid", src.gid.to_string(), img.gid.to_string());
    if let (Some(a), Some(b)) = (src.size, img.size) {
        field("size", a.to_string(), b.to_string());
    }
    field(
        "mtime",
        format!("{}.{:09}", src.mtime.0, src.mtime.1),
        format!("{}.{:09}", img.mtime.0, img.mtime.1),
    );
    field("rdev", src.rdev.to_string(), img.rdev.to_string());
    let lossy = |t: &Option<Vec<u8>>| {
        t.as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default()
    };
    field("symlink target", lossy(&src.target), lossy(&img.target));
    if src.xattrs != img.xattrs {
        let names = |x: &BTreeMap<Vec<u8>, Vec<u8>>| {
            x.iter()
                .map(|(n, v)| format!("{}={}", String::from_utf8_lossy(n), hex::encode(v)))
                .collect::<Vec<_>>()
                .join(",")
        };
        field("xattrs", names(&src.xattrs), names(&img.xattrs));
    }
}

fn diff_link_groups(
    src: &BTreeMap<Vec<u8>, (u64, u64)>,
    img: &BTreeMap<Vec<u8>, u32>,
) -> Vec<Problem> {
    let mut src_by: HashMap<(u64, u64), BTreeSet<&Vec<u8>>> = HashMap::new();
    for (p, k) in src {
        src_by.entry(*k).or_default().insert(p);
    }
    let mut img_by: HashMap<u32, BTreeSet<&Vec<u8>>> = HashMap::new();
    for (p, k) in img {
        img_by.entry(*k).or_default().insert(p);
    }
    let mut out = Vec::new();
    for (p, k) in src {
        let (Some(a), Some(ik)) = (src_by.get(k), img.get(p)) else {
            continue;
        };
        let Some(bset) = img_by.get(ik) else { continue };
        if a != bset {
            let fmt = |s: &BTreeSet<&Vec<u8>>| {
                s.iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            out.push(problem(
                p,
                format!("hard links: source [{}], image [{}]", fmt(a), fmt(bset)),
            ));
        }
    }
    out
}

fn chunk_span(i: usize, chunk_size: usize, n: usize) -> String {
    format!(
        "content differs in chunk {i} (bytes {}..{})",
        i * chunk_size,
        i * chunk_size + n
    )
}

fn compare_host_content(
    b: &Bootstrap,
    ino: u32,
    host: &Path,
    chunk_size: usize,
) -> Result<(), String> {
    let chunks = b.file_chunks(ino);
    let mut f = File::open(host).map_err(|e| format!("source unreadable: {e}"))?;
    let mut buf = vec![0u8; chunk_size];
    for (i, c) in chunks.iter().enumerate() {
        let n = c.uncompressed_size.get() as usize;
        let part = buf.get_mut(..n).ok_or("chunk larger than the chunk size")?;
        f.read_exact(part)
            .map_err(|e| format!("source shorter than the image: {e}"))?;
        if !c.chunk_digest().matches(part) {
            return Err(chunk_span(i, chunk_size, n));
        }
    }
    let mut probe = [0u8; 1];
    if f.read(&mut probe).map_err(|e| e.to_string())? != 0 {
        return Err("source longer than the image".into());
    }
    Ok(())
}

fn compare_chunks(
    b: &Bootstrap,
    ino: u32,
    src: &[ChunkLoc],
    chunk_size: usize,
) -> Result<(), String> {
    let img = b.file_chunks(ino);
    for (i, (s, c)) in src.iter().zip(img).enumerate() {
        if s.size != c.uncompressed_size.get() || s.digest != c.digest {
            return Err(chunk_span(i, chunk_size, s.size as usize));
        }
    }
    if src.len() != img.len() {
        return Err(format!(
            "content differs: the source has {} chunks, the image {}",
            src.len(),
            img.len()
        ));
    }
    Ok(())
}
