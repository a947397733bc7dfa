//! The in-memory tree an image is built from: sources (a directory, tar layers) fill it in,
//! [`super::emit`] turns it into bootstrap tables.

use std::collections::BTreeMap;

use crate::format::DIGEST_LEN;

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;

/// Metadata of one node, as the source gave it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// `st_mode`, with file-type bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (devices only).
    pub rdev: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Change time, seconds.
    pub ctime: i64,
    /// Change time, nanoseconds.
    pub ctime_nsec: u32,
    /// Size reported for a directory (ignored for other kinds, whose size is their content).
    pub dir_size: u64,
}

/// Where a stored chunk is: which blob, where in it, how it is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// blake3 of the uncompressed bytes.
    pub digest: [u8; DIGEST_LEN],
    /// Uncompressed length.
    pub size: u32,
    /// `CHUNK_FLAG_*`.
    pub flags: u32,
    /// Index into the build's blob list ([`super::chunker::BlobSet`]); unused for zero chunks.
    pub blob: u32,
    /// Offset in the blob.
    pub offset: u64,
    /// Stored length.
    pub stored_size: u32,
}

/// What a node is.
#[derive(Clone, Debug)]
pub enum NodeKind {
    /// A directory and its entries, sorted by name bytes.
    Dir(BTreeMap<Vec<u8>, NodeId>),
    /// A regular file: its size and its chunks in order.
    File {
        /// Size in bytes.
        size: u64,
        /// Chunks, in file order.
        chunks: Vec<ChunkLoc>,
    },
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A device, fifo or socket: everything is in the metadata.
    Special,
}

/// One node of the tree.
#[derive(Clone, Debug)]
pub struct Node {
    /// Metadata.
    pub meta: Meta,
    /// Extended attributes, sorted by name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Kind and content.
    pub kind: NodeKind,
}

/// An arena of nodes; node 0 is the root directory. Hard links are several entries naming one
/// node; nodes no entry names any more (whited out, replaced) are simply not emitted.
#[derive(Clone, Debug)]
pub struct Tree {
    /// The nodes.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// A tree holding only a root directory with `meta`.
    pub fn new(meta: Meta) -> Self {
        Self {
            nodes: vec![Node {
                meta,
                xattrs: BTreeMap::new(),
                kind: NodeKind::Dir(BTreeMap::new()),
            }],
        }
    }

    /// Adds a node and returns its id (not yet linked into any directory).
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The entries of directory `id`, if it is one.
    pub fn children(&self, id: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        match self.nodes.get(id).map(|n| &n.kind) {
            Some(NodeKind::Dir(c)) => Some(c),
            _ => None,
        }
    }

    /// The entries of directory `id`, mutably.
    pub fn children_mut(&mut self, id: NodeId) -> Option<&mut BTreeMap<Vec<u8>, NodeId>> {
        match self.nodes.get_mut(id).map(|n| &mut n.kind) {
            Some(NodeKind::Dir(c)) => Some(c),
            _ => None,
        }
    }

    /// Whether node `id` is a directory.
    pub fn is_dir(&self, id: NodeId) -> bool {
        self.children(id).is_some()
    }
}
