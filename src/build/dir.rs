//! Building from a directory on the host.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::chunker::Chunker;
use super::tree::{Meta, Node, NodeId, NodeKind, Tree};
use super::{BuildError, Progress};
use crate::format::{MAX_SYMLINK_LEN, MAX_XATTR_VALUE_LEN};

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
fn xattrs_of(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, BuildError> {
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

/// Reads the tree under `root` into a [`Tree`], chunking file content through `chunker`.
pub fn scan(root: &Path, chunker: &mut Chunker, progress: &Progress) -> Result<Tree, BuildError> {
    let m = std::fs::symlink_metadata(root).map_err(|e| BuildError::io("reading", root, e))?;
    if !m.is_dir() {
        return Err(BuildError::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut tree = Tree::new(meta_of(&m));
    tree.nodes[0].xattrs = xattrs_of(root)?;
    // Hard links: the first path found for a (device, inode) owns the node.
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    let chunk_size = chunker.chunk_size() as usize;
    while let Some((dir, dir_id)) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| BuildError::io("listing", &dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::io("listing", &dir, e))?;
        // Sorted so that content is chunked in the same order every time.
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            let m = std::fs::symlink_metadata(&path)
                .map_err(|e| BuildError::io("reading", &path, e))?;
            progress.entry();
            let key = (m.dev(), m.ino());
            if !m.is_dir() && m.nlink() > 1 {
                if let Some(&id) = links.get(&key) {
                    link(&mut tree, dir_id, &name, id)?;
                    continue;
                }
            }
            let xattrs = xattrs_of(&path)?;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                NodeKind::Dir(BTreeMap::new())
            } else if ft.is_file() {
                NodeKind::File {
                    size: m.len(),
                    chunks: Vec::new(),
                }
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)
                    .map_err(|e| BuildError::io("reading link", &path, e))?;
                let target = target.as_os_str().as_bytes().to_vec();
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
                stack.push((path, id));
            } else if ft.is_file() {
                read_file(&path, m.len(), id, chunk_size, &mut tree, chunker, progress)?;
            }
        }
    }
    Ok(tree)
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

fn read_file(
    path: &Path,
    size: u64,
    id: NodeId,
    chunk_size: usize,
    tree: &mut Tree,
    chunker: &mut Chunker,
    progress: &Progress,
) -> Result<(), BuildError> {
    let mut f = File::open(path).map_err(|e| BuildError::io("opening", path, e))?;
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk_size as u64) as usize;
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf)
            .map_err(|e| BuildError::io("reading", path, e))?;
        left -= n as u64;
        progress.bytes(n as u64);
        chunker.push(tree, id, buf)?;
    }
    // A file that grew while being read would make the image differ from its metadata.
    let mut probe = [0u8; 1];
    if f.read(&mut probe)
        .map_err(|e| BuildError::io("reading", path, e))?
        != 0
    {
        return Err(BuildError::Invalid(format!(
            "{} changed while being read",
            path.display()
        )));
    }
    Ok(())
}
