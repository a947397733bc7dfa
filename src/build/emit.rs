//! Turning a [`Tree`] into bootstrap tables.

use std::collections::{HashMap, VecDeque};

use zerocopy::little_endian::{I64, U32, U64};
use zerocopy::FromZeros;

use super::tree::{NodeId, NodeKind, Tree};
use super::BuildError;
use crate::format::{BlobRecord, BootstrapWriter, ChunkRecord, InodeRecord};

/// Lays out `tree` as bootstrap tables referring to `blobs`; `prefetch` lists nodes to prefetch.
pub fn emit(
    tree: &Tree,
    blobs: Vec<BlobRecord>,
    prefetch: &[NodeId],
) -> Result<BootstrapWriter, BuildError> {
    // Inode numbers in breadth-first order: every directory comes after its parent, which the
    // format requires; a node named twice (a hard link) keeps its first number.
    let mut index_of: HashMap<NodeId, u32> = HashMap::new();
    let mut order: Vec<NodeId> = vec![0];
    let mut parent_of: Vec<u32> = vec![0];
    let mut refs: Vec<u32> = vec![0];
    index_of.insert(0, 0);
    let mut queue = VecDeque::from([0usize]);
    while let Some(dir) = queue.pop_front() {
        let dir_index = index_of.get(&dir).copied().unwrap_or(0);
        for &child in tree.children(dir).into_iter().flat_map(|c| c.values()) {
            match index_of.get(&child) {
                Some(&i) => {
                    if tree.is_dir(child) {
                        return Err(BuildError::Invalid("a directory is linked twice".into()));
                    }
                    refs[i as usize] += 1;
                }
                None => {
                    let i = u32::try_from(order.len())
                        .map_err(|_| BuildError::Invalid("too many inodes".into()))?;
                    index_of.insert(child, i);
                    order.push(child);
                    parent_of.push(if tree.is_dir(child) { dir_index } else { 0 });
                    refs.push(1);
                    if tree.is_dir(child) {
                        queue.push_back(child);
                    }
                }
            }
        }
    }

    let mut w = BootstrapWriter {
        blobs,
        ..Default::default()
    };
    for (i, &id) in order.iter().enumerate() {
        let node = &tree.nodes[id];
        let mut r = InodeRecord::zeroed();
        let m = &node.meta;
        r.mode = U32::new(m.mode);
        r.uid = U32::new(m.uid);
        r.gid = U32::new(m.gid);
        r.rdev = U64::new(m.rdev);
        r.mtime = I64::new(m.mtime);
        r.mtime_nsec = U32::new(m.mtime_nsec);
        r.ctime = I64::new(m.ctime);
        r.ctime_nsec = U32::new(m.ctime_nsec);
        r.xattr_index = U32::new(w.xattrs.len() as u32);
        r.xattr_count = U32::new(node.xattrs.len() as u32);
        for (name, value) in &node.xattrs {
            w.add_xattr(name, value);
        }
        match &node.kind {
            NodeKind::Dir(children) => {
                r.parent = U32::new(parent_of[i]);
                r.nlink =
                    U32::new(2 + children.values().filter(|&&c| tree.is_dir(c)).count() as u32);
                r.data_index = U64::new(w.dirents.len() as u64);
                r.data_count = U32::new(children.len() as u32);
                r.size = U64::new(m.dir_size);
                for (name, child) in children {
                    let ci = index_of
                        .get(child)
                        .copied()
                        .ok_or_else(|| BuildError::Internal("unnumbered child".into()))?;
                    w.add_dirent(name, ci);
                }
            }
            NodeKind::File { size, chunks } => {
                r.nlink = U32::new(refs[i]);
                r.size = U64::new(*size);
                r.data_index = U64::new(w.chunks.len() as u64);
                r.data_count = U32::new(chunks.len() as u32);
                for c in chunks {
                    let mut cr = ChunkRecord::new_zeroed();
                    cr.digest = c.digest;
                    cr.blob_index = U32::new(c.blob);
                    cr.flags = U32::new(c.flags);
                    cr.compressed_offset = U64::new(c.offset);
                    cr.compressed_size = U32::new(c.stored_size);
                    cr.uncompressed_size = U32::new(c.size);
                    w.chunks.push(cr);
                }
            }
            NodeKind::Symlink(target) => {
                r.nlink = U32::new(refs[i]);
                r.size = U64::new(target.len() as u64);
                r.data_index = U64::new(w.add_string(target));
                r.data_count = U32::new(target.len() as u32);
            }
            NodeKind::Special => {
                r.nlink = U32::new(refs[i]);
            }
        }
        w.inodes.push(r);
    }
    for id in prefetch {
        if let Some(&i) = index_of.get(id) {
            w.prefetch.push(U32::new(i));
        }
    }
    Ok(w)
}
