//! Building from OCI layer tarballs: each layer (plain, gzip or zstd tar) is applied in order
//! onto one [`Tree`], with OCI whiteouts.
//!
//! Semantics, as the OCI image-layer spec defines them:
//!
//! - an entry for a path that exists replaces it, except that a directory over a directory
//!   merges: the children stay, the metadata and xattrs are the new entry's;
//! - `.wh.NAME` hides NAME as it was in lower layers; `.wh..wh..opq` hides everything lower
//!   layers put in its directory. What the same layer puts there stays, whichever comes first
//!   in the stream. Whiteouts never appear in the image;
//! - a hard link names the node its target names at that point, so the names share an inode
//!   (the link entry's own metadata is not used); replacing or whiting out one name later
//!   leaves the others on the old node;
//! - parents missing from a tar are created as root-owned 0755 directories.
//!
//! Layers are hostile input: paths are normalised, `..` refused rather than resolved, symlinks
//! never followed (a path through one is refused, where containerd would resolve it inside the
//! root), sizes never trusted for allocation. Nothing touches the host filesystem but the layer
//! files (read) and the chunker (write).

mod tarstream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;

use self::tarstream::{show, Entry, Kind, TarStream};
use super::chunker::Chunker;
use super::tree::{ChunkLoc, Meta, Node, NodeId, NodeKind, Tree};
use super::{BuildError, Progress};
use crate::format::{DigestAlgo, CHUNK_FLAG_SHA256, MAX_NAME_LEN, MAX_SYMLINK_LEN};

/// Prefix of a whiteout name.
const WHITEOUT: &[u8] = b".wh.";
/// Prefix of names reserved for whiteout metadata (AUFS kept hard-link data there).
const WHITEOUT_META: &[u8] = b".wh..wh.";
/// The opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Size reported for directories: what most filesystems show, and stable across builds.
const DIR_SIZE: u64 = 4096;
/// Buffer between the decompressor and the tar reader.
const READ_BUFFER: usize = 256 << 10;

/// One layer to apply: a name for messages, and its bytes (plain, gzip or zstd tar) as a stream.
pub trait LayerInput {
    /// What to call the layer in messages (a file, a digest).
    fn name(&self) -> String;
    /// Opens the layer's (possibly compressed) bytes. A reader that checks a digest reports a
    /// mismatch as an error at its end: the applier reads every layer to its end.
    fn open(&self) -> Result<Box<dyn Read + '_>, BuildError>;
}

impl LayerInput for PathBuf {
    fn name(&self) -> String {
        self.display().to_string()
    }

    fn open(&self) -> Result<Box<dyn Read + '_>, BuildError> {
        Ok(Box::new(
            File::open(self).map_err(|e| BuildError::io("opening", self, e))?,
        ))
    }
}

/// Where the content of files goes as layers are applied: cut into chunks of
/// [`ContentSink::chunk_size`] and pushed in file order.
pub trait ContentSink {
    /// The chunk size.
    fn chunk_size(&self) -> u32;
    /// Takes one chunk of `node`'s content; chunks of a node come in file order.
    fn push(&mut self, tree: &mut Tree, node: NodeId, data: Vec<u8>) -> Result<(), BuildError>;
}

impl ContentSink for Chunker {
    fn chunk_size(&self) -> u32 {
        Chunker::chunk_size(self)
    }

    fn push(&mut self, tree: &mut Tree, node: NodeId, data: Vec<u8>) -> Result<(), BuildError> {
        Chunker::push(self, tree, node, data)
    }
}

/// A sink that stores nothing: each chunk becomes its digest and size in the tree, so that a
/// source can be compared with an image chunk by chunk without writing a byte (`skiff check`).
pub struct DigestSink {
    chunk_size: u32,
    digester: DigestAlgo,
}

impl DigestSink {
    /// Chunks of `chunk_size` bytes, named by `digester`.
    pub fn new(chunk_size: u32, digester: DigestAlgo) -> Self {
        Self {
            chunk_size,
            digester,
        }
    }
}

impl ContentSink for DigestSink {
    fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    fn push(&mut self, tree: &mut Tree, node: NodeId, data: Vec<u8>) -> Result<(), BuildError> {
        let loc = ChunkLoc {
            digest: self.digester.digest(&data),
            size: data.len() as u32,
            flags: if self.digester == DigestAlgo::Sha256 {
                CHUNK_FLAG_SHA256
            } else {
                0
            },
            blob: 0,
            offset: 0,
            stored_size: 0,
        };
        if let Some(NodeKind::File { chunks, .. }) = tree.nodes.get_mut(node).map(|n| &mut n.kind) {
            chunks.push(loc);
        }
        Ok(())
    }
}

/// Applies `layers` in order into a new tree, chunking file content through `chunker`.
///
/// Each layer is a tar file, plain or compressed with gzip or zstd (told apart by their magic
/// bytes, not the file name), read as a stream: memory use does not depend on layer or file
/// sizes. Any malformed or hostile entry fails the build with a [`BuildError::Layer`] naming
/// the layer and the entry.
pub fn apply(
    layers: &[PathBuf],
    chunker: &mut Chunker,
    progress: &Progress,
) -> Result<Tree, BuildError> {
    apply_with(layers, chunker, progress, |_, _, _| Ok(()))
}

/// [`apply`] from any [`LayerInput`] into any [`ContentSink`], calling
/// `after_layer(layer index, sink, tree)` once each layer is applied (`skiff convert` seals a
/// blob per layer there).
pub fn apply_with<L: LayerInput, S: ContentSink>(
    layers: &[L],
    sink: &mut S,
    progress: &Progress,
    mut after_layer: impl FnMut(usize, &mut S, &mut Tree) -> Result<(), BuildError>,
) -> Result<Tree, BuildError> {
    if layers.is_empty() {
        return Err(BuildError::Invalid("no layers given".into()));
    }
    let mut a = Applier {
        tree: Tree::new(implicit_dir_meta()),
        sink,
        progress,
        touched: HashMap::new(),
    };
    for (i, layer) in layers.iter().enumerate() {
        a.touched.clear();
        a.apply_layer(layer)?;
        after_layer(i, a.sink, &mut a.tree)?;
    }
    Ok(a.tree)
}

/// Metadata of the root before any layer sets it, and of parents a tar leaves out.
fn implicit_dir_meta() -> Meta {
    Meta {
        mode: libc::S_IFDIR | 0o755,
        dir_size: DIR_SIZE,
        ..Meta::default()
    }
}

/// Opens a layer and returns its decompressed bytes.
fn open_layer<'a, L: LayerInput>(layer: &'a L) -> Result<Box<dyn Read + 'a>, BuildError> {
    let name = layer.name();
    let mut f = layer.open()?;
    let mut magic = Vec::with_capacity(6);
    (&mut f)
        .take(6)
        .read_to_end(&mut magic)
        .map_err(|e| BuildError::Layer {
            layer: name.clone(),
            what: format!("reading: {e}"),
        })?;
    let layer_err = |what: &str| BuildError::Layer {
        layer: name.clone(),
        what: what.into(),
    };
    // The bytes used for detection are put back in front of the rest of the file.
    let raw = BufReader::with_capacity(READ_BUFFER, std::io::Cursor::new(magic.clone()).chain(f));
    let decoded: Box<dyn Read + 'a> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(raw))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        // The decoder's default window limit (128 MiB) bounds its memory whatever the frame
        // header claims.
        let d = zstd::stream::read::Decoder::with_buffer(raw)
            .map_err(|e| layer_err(&format!("starting zstd decoder: {e}")))?;
        Box::new(d)
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(layer_err(
            "xz-compressed layers are not supported (use gzip, zstd or plain tar)",
        ));
    } else if magic.starts_with(b"BZh") {
        return Err(layer_err(
            "bzip2-compressed layers are not supported (use gzip, zstd or plain tar)",
        ));
    } else {
        return Ok(Box::new(raw));
    };
    Ok(Box::new(BufReader::with_capacity(READ_BUFFER, decoded)))
}

/// A path split into checked components.
struct CleanPath<'p> {
    parents: Vec<&'p [u8]>,
    /// `None` for the root itself (`/`, `./`).
    name: Option<&'p [u8]>,
}

/// Normalises a path from a tar: leading `/` and `./`, `.` and empty components go; `..` is
/// refused rather than resolved (nothing legitimate needs it, and resolving it invites escapes);
/// components must be valid names.
fn clean_path(raw: &[u8]) -> Result<CleanPath<'_>, String> {
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path has a \"..\" component".into()),
            _ if c.len() > MAX_NAME_LEN => {
                return Err(format!(
                    "name {} is longer than {MAX_NAME_LEN} bytes",
                    show(c)
                ));
            }
            _ if c.contains(&0) => return Err("name contains a NUL byte".into()),
            _ => comps.push(c),
        }
    }
    let name = comps.pop();
    Ok(CleanPath {
        parents: comps,
        name,
    })
}

/// Why an entry could not be applied.
enum EntryError {
    /// The entry is malformed or hostile (the message does not name it).
    Bad(String),
    /// Storing content failed.
    Build(BuildError),
}

impl From<String> for EntryError {
    fn from(s: String) -> Self {
        Self::Bad(s)
    }
}

impl From<&str> for EntryError {
    fn from(s: &str) -> Self {
        Self::Bad(s.into())
    }
}

/// The state of one build: the merged tree, and what the current layer has put in it.
struct Applier<'a, S> {
    tree: Tree,
    sink: &'a mut S,
    progress: &'a Progress,
    /// For the current layer, per directory, the names it has created, replaced or put entries
    /// under. Whiteouts hide everything else: this is what makes "hide lower layers only" work
    /// whichever order the layer lists its entries in.
    touched: HashMap<NodeId, HashSet<Vec<u8>>>,
}

impl<S: ContentSink> Applier<'_, S> {
    fn apply_layer<L: LayerInput>(&mut self, layer: &L) -> Result<(), BuildError> {
        let name = layer.name();
        let err = |what: String| BuildError::Layer {
            layer: name.clone(),
            what,
        };
        let mut stream = TarStream::new(open_layer(layer)?);
        while let Some(entry) = stream.next_entry().map_err(err)? {
            self.progress.entry();
            self.apply_entry(&entry, &mut stream).map_err(|e| match e {
                EntryError::Bad(what) => err(format!("entry {}: {what}", show(&entry.path))),
                EntryError::Build(b) => b,
            })?;
        }
        // To the end of the stream, so that a digest checked at its end is checked.
        stream
            .drain()
            .map_err(|e| err(format!("after the end of the archive: {e}")))?;
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        e: &Entry,
        stream: &mut TarStream<R>,
    ) -> Result<(), EntryError> {
        let path = clean_path(&e.path)?;
        // A whiteout name is never a directory; AUFS metadata directories are not content.
        for p in &path.parents {
            if p.starts_with(WHITEOUT_META) {
                return Ok(());
            }
            if p.starts_with(WHITEOUT) {
                return Err(format!("whiteout name {} used as a directory", show(p)).into());
            }
        }
        let Some(name) = path.name else {
            // The root's own entry ("./"): only its metadata can change.
            if e.kind != Kind::Dir {
                return Err("the root must be a directory".into());
            }
            let root = &mut self.tree.nodes[0];
            root.meta = meta_of(e);
            root.xattrs = e.xattrs.clone();
            return Ok(());
        };
        if name == OPAQUE {
            // The marker says its directory is one of this layer's: create it if missing.
            if let Some(dir) = self.walk(&path.parents, true)? {
                self.hide_lower_children(dir);
            }
            return Ok(());
        }
        if name.starts_with(WHITEOUT_META) {
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err("whiteout of an invalid name".into());
            }
            // Nothing to hide under a directory lower layers do not have.
            if let Some(dir) = self.walk(&path.parents, false)? {
                self.hide_lower(dir, hidden);
            }
            return Ok(());
        }
        let dir = self
            .walk(&path.parents, true)?
            .ok_or("internal: parent not created")?;
        let id = match &e.kind {
            Kind::Dir => {
                let existing = self.tree.children(dir).and_then(|c| c.get(name)).copied();
                match existing {
                    Some(id) if self.tree.is_dir(id) => {
                        let node = &mut self.tree.nodes[id];
                        node.meta = meta_of(e);
                        node.xattrs = e.xattrs.clone();
                        self.touch(dir, name);
                        return Ok(());
                    }
                    _ => self.add(e, NodeKind::Dir(BTreeMap::new())),
                }
            }
            Kind::File => {
                let id = self.add(
                    e,
                    NodeKind::File {
                        size: e.size,
                        chunks: Vec::new(),
                    },
                );
                self.read_content(id, e.size, stream)?;
                id
            }
            Kind::Symlink(target) => {
                if target.len() > MAX_SYMLINK_LEN {
                    return Err(format!(
                        "symlink target of {} bytes is longer than {MAX_SYMLINK_LEN}",
                        target.len()
                    )
                    .into());
                }
                if target.contains(&0) {
                    return Err("symlink target contains a NUL byte".into());
                }
                self.add(e, NodeKind::Symlink(target.clone()))
            }
            // The same node, not a copy: that is what makes it a hard link.
            Kind::HardLink(target) => self.link_target(target)?,
            Kind::Char | Kind::Block | Kind::Fifo => self.add(e, NodeKind::Special),
        };
        self.tree
            .children_mut(dir)
            .ok_or("internal: parent is not a directory")?
            .insert(name.to_vec(), id);
        self.touch(dir, name);
        Ok(())
    }

    /// Adds a node for entry `e` (not yet named by any directory).
    fn add(&mut self, e: &Entry, kind: NodeKind) -> NodeId {
        self.tree.add(Node {
            meta: meta_of(e),
            xattrs: e.xattrs.clone(),
            kind,
        })
    }

    fn touch(&mut self, dir: NodeId, name: &[u8]) {
        self.touched.entry(dir).or_default().insert(name.to_vec());
    }

    fn is_touched(&self, dir: NodeId, name: &[u8]) -> bool {
        self.touched.get(&dir).is_some_and(|s| s.contains(name))
    }

    /// Walks from the root through `comps`, which must all be directories (symlinks are never
    /// followed). Missing ones are created when `create`, else the walk gives `None`.
    fn walk(&mut self, comps: &[&[u8]], create: bool) -> Result<Option<NodeId>, String> {
        let mut cur = 0;
        for (i, &c) in comps.iter().enumerate() {
            let parent = cur;
            let next = self.tree.children(parent).and_then(|ch| ch.get(c)).copied();
            cur = match next {
                Some(id) if self.tree.is_dir(id) => id,
                Some(_) => {
                    return Err(format!(
                        "{} is not a directory",
                        show(&comps[..=i].join(&b'/'))
                    ));
                }
                None if create => {
                    let id = self.tree.add(Node {
                        meta: implicit_dir_meta(),
                        xattrs: BTreeMap::new(),
                        kind: NodeKind::Dir(BTreeMap::new()),
                    });
                    self.tree
                        .children_mut(parent)
                        .ok_or("internal: parent is not a directory")?
                        .insert(c.to_vec(), id);
                    id
                }
                None => return Ok(None),
            };
            if create {
                // This layer puts something under `c`: an opaque marker in an ancestor must
                // not hide it.
                self.touch(parent, c);
            }
        }
        Ok(Some(cur))
    }

    /// Resolves a hard link's target to the node it names now.
    fn link_target(&mut self, target: &[u8]) -> Result<NodeId, String> {
        let t = clean_path(target).map_err(|e| format!("link target {}: {e}", show(target)))?;
        let missing = || format!("link target {} does not exist", show(target));
        let name = t.name.ok_or("link to the root directory")?;
        let dir = self
            .walk(&t.parents, false)
            .map_err(|e| format!("link target {}: {e}", show(target)))?;
        let id = dir
            .and_then(|d| self.tree.children(d))
            .and_then(|c| c.get(name))
            .copied()
            .ok_or_else(missing)?;
        if self.tree.is_dir(id) {
            return Err(format!("link target {} is a directory", show(target)));
        }
        Ok(id)
    }

    /// Reads a file's content from the stream in chunk-size pieces into the chunker.
    fn read_content<R: Read>(
        &mut self,
        id: NodeId,
        size: u64,
        stream: &mut TarStream<R>,
    ) -> Result<(), EntryError> {
        let chunk = u64::from(self.sink.chunk_size());
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk);
            // At most one chunk (16 MiB) is allocated, whatever size the header claims.
            let mut buf = vec![0u8; n as usize];
            stream.read_content(&mut buf).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    format!("content truncated: the header declares {size} bytes, the archive ends before")
                } else {
                    format!("reading content: {e}")
                }
            })?;
            left -= n;
            self.progress.bytes(n);
            self.sink
                .push(&mut self.tree, id, buf)
                .map_err(EntryError::Build)?;
        }
        Ok(())
    }

    /// Hides `name` in `dir` as lower layers left it: removed if this layer did not touch it;
    /// if it did and it is a directory, its lower-layer content goes.
    fn hide_lower(&mut self, dir: NodeId, name: &[u8]) {
        let Some(id) = self.tree.children(dir).and_then(|c| c.get(name)).copied() else {
            return;
        };
        if !self.is_touched(dir, name) {
            if let Some(c) = self.tree.children_mut(dir) {
                c.remove(name);
            }
        } else if self.tree.is_dir(id) {
            self.hide_lower_children(id);
        }
    }

    /// Makes `dir` opaque: everything in its subtree this layer did not put there goes.
    fn hide_lower_children(&mut self, dir: NodeId) {
        // Iterative: a hostile layer can make the tree as deep as its path lengths allow.
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Some(children) = self.tree.children(d) else {
                continue;
            };
            let mut gone = Vec::new();
            for (name, &c) in children {
                if !self.is_touched(d, name) {
                    gone.push(name.clone());
                } else if self.tree.is_dir(c) {
                    stack.push(c);
                }
            }
            if let Some(children) = self.tree.children_mut(d) {
                for name in gone {
                    children.remove(&name);
                }
            }
        }
    }
}

/// Tree metadata of an entry: permissions from the header, file type from the entry type.
fn meta_of(e: &Entry) -> Meta {
    let ftype = match e.kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink(_) => libc::S_IFLNK,
        Kind::Char => libc::S_IFCHR,
        Kind::Block => libc::S_IFBLK,
        Kind::Fifo => libc::S_IFIFO,
        // Hard links take the target's node and metadata; this is never stored.
        Kind::HardLink(_) => libc::S_IFREG,
    };
    Meta {
        mode: ftype | (e.perm & 0o7777),
        uid: e.uid,
        gid: e.gid,
        rdev: e.rdev,
        mtime: e.mtime.0,
        mtime_nsec: e.mtime.1,
        ctime: e.ctime.0,
        ctime_nsec: e.ctime.1,
        dir_size: if e.kind == Kind::Dir { DIR_SIZE } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parent components and name.
    type Split = (Vec<Vec<u8>>, Option<Vec<u8>>);

    fn comps(p: &[u8]) -> Result<Split, String> {
        let c = clean_path(p)?;
        Ok((
            c.parents.iter().map(|c| c.to_vec()).collect(),
            c.name.map(<[u8]>::to_vec),
        ))
    }

    #[test]
    fn paths_are_normalised() {
        let abc = Ok((vec![b"a".to_vec(), b"b".to_vec()], Some(b"c".to_vec())));
        assert_eq!(comps(b"a/b/c"), abc);
        assert_eq!(comps(b"/a//b/./c/"), abc);
        assert_eq!(comps(b"./a/b/c"), abc);
        assert_eq!(comps(b"./"), Ok((vec![], None)));
        assert_eq!(comps(b"/"), Ok((vec![], None)));
        assert!(comps(b"../x").is_err());
        assert!(comps(b"a/../../x").is_err());
        assert!(comps(b"a/..").is_err());
        assert!(comps(&[b'x'; 256]).is_err());
        assert!(comps(&[b'x'; 255]).is_ok());
    }
}
