//! Target `tar`: the streaming tar reader and whiteout applier (`build::layers`), end to end.
//!
//! The input is one or more layers (plain, gzip or zstd tar, told apart by magic as for real
//! layers) joined by [`LAYER_SEPARATOR`]; the seeds are archives written by GNU tar in each of
//! its formats. They are applied in order, as `skiff build LAYER...` and `skiff convert` apply
//! them, into a sink that keeps the content in memory. Header checksums are recomputed first
//! ([`seal`]). A rejected input must give an error that
//! renders. An accepted one must make an image: the tree is emitted as a bootstrap, which must
//! load, and read back through the filesystem layer it must be exactly the tree that the layers
//! made: the same paths, kinds, modes, owners, times, device numbers, sizes, xattrs, symlink
//! targets, file bytes and hard-link groups.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use skiff::build::emit::emit;
use skiff::build::layers::{apply_with, ContentSink, LayerInput};
use skiff::build::tree::{ChunkLoc, NodeId, NodeKind, Tree};
use skiff::build::{BuildError, Progress};
use skiff::format::{BlobRecord, Bootstrap};
use zerocopy::FromZeros;

use super::mem::MemBlobs;
use super::serve::{self, Content, Limits};
use super::Outcome;

/// Separates layers in an input. Not a byte sequence tar headers or compressed streams are
/// likely to hold by chance.
pub const LAYER_SEPARATOR: &[u8] = b"\n--skiff-fuzz-next-layer--\n";

/// Layers taken from one input; any further separators are part of the last layer.
const MAX_LAYERS: usize = 4;

/// Chunk size of the image made: small, so that files of a few KiB have several chunks.
const CHUNK_SIZE: u32 = 4096;

/// Content kept per iteration. A compressed layer can expand a thousandfold; past this the sink
/// refuses, which the applier must report as an error like any other.
const MAX_CONTENT: usize = 16 << 20;

/// One layer of the input.
struct MemLayer<'a> {
    index: usize,
    bytes: &'a [u8],
}

impl LayerInput for MemLayer<'_> {
    fn name(&self) -> String {
        format!("fuzz layer {}", self.index)
    }

    fn open(&self) -> Result<Box<dyn Read + '_>, BuildError> {
        Ok(Box::new(self.bytes))
    }
}

/// Stores chunks uncompressed in one in-memory blob, and remembers each node's content.
#[derive(Default)]
struct MemSink {
    blob: Vec<u8>,
    content: HashMap<NodeId, Vec<u8>>,
}

impl ContentSink for MemSink {
    fn chunk_size(&self) -> u32 {
        CHUNK_SIZE
    }

    fn push(&mut self, tree: &mut Tree, node: NodeId, data: Vec<u8>) -> Result<(), BuildError> {
        if self.blob.len() + data.len() > MAX_CONTENT {
            return Err(BuildError::Invalid(format!(
                "fuzz harness: more than {MAX_CONTENT} bytes of content"
            )));
        }
        let loc = ChunkLoc {
            digest: *blake3::hash(&data).as_bytes(),
            size: data.len() as u32,
            flags: 0,
            blob: 0,
            offset: self.blob.len() as u64,
            stored_size: data.len() as u32,
        };
        self.blob.extend_from_slice(&data);
        self.content
            .entry(node)
            .or_default()
            .extend_from_slice(&data);
        match tree.nodes.get_mut(node).map(|n| &mut n.kind) {
            Some(NodeKind::File { chunks, .. }) => chunks.push(loc),
            _ => panic!("content pushed for node {node}, which is not a file"),
        }
        Ok(())
    }
}

/// Splits an input into its layers.
pub fn layers(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < MAX_LAYERS {
        match find(rest, LAYER_SEPARATOR) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + LAYER_SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Recomputes the checksum of every header of a plain tar layer, walking it as a reader does
/// (header, content rounded up to blocks), as far as the sizes allow: as a crafted layer's
/// author would, so that mutations meet the parser instead of stopping at the checksum
/// (a wrong checksum is refused, see tests/layers.rs).
pub fn seal(layer: &mut [u8]) {
    let mut at = 0usize;
    while let Some(block) = layer.get_mut(at..at + 512) {
        if block.iter().all(|&b| b == 0) {
            return;
        }
        let mut h = ::tar::Header::new_old();
        h.as_mut_bytes().copy_from_slice(block);
        h.set_cksum();
        block.copy_from_slice(h.as_bytes());
        let Some(next) = h
            .entry_size()
            .ok()
            .and_then(|s| usize::try_from(s.checked_add(511)? / 512 * 512).ok())
            .and_then(|s| s.checked_add(at + 512))
        else {
            return;
        };
        at = next;
    }
}

fn sealed_layers(data: &[u8]) -> Vec<Vec<u8>> {
    layers(data)
        .into_iter()
        .map(|l| {
            let mut l = l.to_vec();
            seal(&mut l);
            l
        })
        .collect()
}

/// One iteration: see the module doc.
pub fn run(data: &[u8]) -> Outcome {
    let sealed = sealed_layers(data);
    let inputs: Vec<MemLayer<'_>> = sealed
        .iter()
        .enumerate()
        .map(|(index, bytes)| MemLayer { index, bytes })
        .collect();
    let mut sink = MemSink::default();
    let progress = Progress::new(false);
    let tree = match apply_with(&inputs, &mut sink, &progress, |_, _, _| Ok(())) {
        Ok(t) => t,
        Err(e) => {
            let _ = super::render(&e);
            return Outcome::Rejected;
        }
    };
    // What the layers made must be an image.
    let mut blob_record = BlobRecord::new_zeroed();
    blob_record.id = *blake3::hash(&sink.blob).as_bytes();
    blob_record.size = (sink.blob.len() as u64).into();
    let writer = emit(&tree, vec![blob_record], &[])
        .unwrap_or_else(|e| panic!("emit of an applied tree: {}", super::render(&e)));
    let bytes = writer.finish(CHUNK_SIZE).unwrap_or_else(|e| {
        panic!(
            "writing the bootstrap of an applied tree: {}",
            super::render(&e)
        )
    });
    let bootstrap = Bootstrap::from_bytes(bytes).unwrap_or_else(|e| {
        panic!(
            "the bootstrap of an applied tree does not load: {}",
            super::render(&e)
        )
    });
    let mut blobs = MemBlobs::default();
    blobs.insert(blob_record.id, std::mem::take(&mut sink.blob));
    let fs = serve::filesystem(std::sync::Arc::new(bootstrap), blobs);
    let limits = Limits {
        nodes: usize::MAX,
        bytes: u64::MAX,
    };
    let served = serve::serve_all(&fs, limits);
    compare(&tree, &sink.content, &served);
    Outcome::Served(super::served_bytes(&served))
}

/// Whether `data`'s layers apply: for the smoke test's check that the seeds still do.
pub fn applies(data: &[u8]) -> Result<(), String> {
    let sealed = sealed_layers(data);
    let inputs: Vec<MemLayer<'_>> = sealed
        .iter()
        .enumerate()
        .map(|(index, bytes)| MemLayer { index, bytes })
        .collect();
    apply_with(
        &inputs,
        &mut MemSink::default(),
        &Progress::new(false),
        |_, _, _| Ok(()),
    )
    .map(drop)
    .map_err(|e| super::render(&e))
}

/// Checks that `served` is exactly `tree`.
fn compare(tree: &Tree, content: &HashMap<NodeId, Vec<u8>>, served: &serve::Tree) {
    let expected = paths(tree);
    let want: Vec<&Vec<u8>> = expected.keys().collect();
    let got: Vec<&Vec<u8>> = served.keys().collect();
    assert_eq!(want, got, "the image's paths differ from the layers'");
    // Hard links: paths share a served inode exactly when they share a node.
    let mut ino_of_node: HashMap<NodeId, u64> = HashMap::new();
    let mut node_of_ino: HashMap<u64, NodeId> = HashMap::new();
    for (path, &id) in &expected {
        let s = &served[path];
        let p = String::from_utf8_lossy(path);
        assert_eq!(
            *ino_of_node.entry(id).or_insert(s.ino),
            s.ino,
            "{p}: hard links split"
        );
        assert_eq!(
            *node_of_ino.entry(s.ino).or_insert(id),
            id,
            "{p}: hard links joined"
        );
        let node = &tree.nodes[id];
        let m = &node.meta;
        let a = &s.attr;
        assert_eq!(a.st_mode, m.mode, "{p}: mode");
        assert_eq!((a.st_uid, a.st_gid), (m.uid, m.gid), "{p}: owner");
        assert_eq!(
            (a.st_mtime, a.st_mtime_nsec),
            (m.mtime, i64::from(m.mtime_nsec)),
            "{p}: mtime"
        );
        assert_eq!(
            (a.st_ctime, a.st_ctime_nsec),
            (m.ctime, i64::from(m.ctime_nsec)),
            "{p}: ctime"
        );
        assert_eq!(a.st_rdev, m.rdev, "{p}: rdev");
        assert_eq!(s.xattrs, node.xattrs, "{p}: xattrs");
        match &node.kind {
            NodeKind::Dir(_) => assert_eq!(a.st_size as u64, m.dir_size, "{p}: directory size"),
            NodeKind::File { size, .. } => {
                assert_eq!(a.st_size as u64, *size, "{p}: size");
                let empty = Vec::new();
                let want = content.get(&id).unwrap_or(&empty);
                match &s.content {
                    Some(Content::Read(bytes)) => assert!(bytes == want, "{p}: content differs"),
                    other => panic!("{p}: content not served: {other:?}"),
                }
            }
            NodeKind::Symlink(target) => {
                assert_eq!(s.target.as_ref(), Some(target), "{p}: symlink target")
            }
            NodeKind::Special => assert_eq!(a.st_size, 0, "{p}: size of a special file"),
        }
    }
}

/// Every path of `tree` and the node it names, as [`serve::serve_all`] names them.
fn paths(tree: &Tree) -> BTreeMap<Vec<u8>, NodeId> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(b"/".to_vec(), 0usize)];
    while let Some((path, id)) = stack.pop() {
        if let Some(children) = tree.children(id) {
            for (name, &child) in children {
                let mut p = path.clone();
                if p.len() > 1 {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                stack.push((p, child));
            }
        }
        out.insert(path, id);
    }
    out
}
