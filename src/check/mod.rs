//! `skiff check`: verify an image end to end, and compare it with its source, without mounting.
//!
//! - [`verify_chunks`]: a local image's blobs and chunks;
//! - [`compare`]: the filesystem comparison of a source tree (a host directory, or OCI layers
//!   applied in memory) with an image;
//! - [`image`]: an image in a registry against its OCI source, as `nydusify check` does: the
//!   manifest, bootstrap, data and filesystem rules;
//! - [`stats`]: `skiff inspect`'s statistics.

pub mod compare;
pub mod image;
pub mod stats;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rayon::prelude::*;

pub use compare::{compare_host_dir as compare_with_source, compare_tree};
pub use image::{check_image, ImageCheckOptions, ImageCheckReport};
pub use stats::{image_stats, ImageStats};

use crate::format::{Bootstrap, DigestAlgo, InodeKind};
use crate::storage::{CachedChunkSource, ChunkSource, LocalFsBackend};

/// Which rule found a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// The target manifest, its config, the index.
    Manifest,
    /// The bootstrap, and the blobs it refers to.
    Bootstrap,
    /// The blobs' bytes and every chunk.
    Data,
    /// The tree against the source's.
    Filesystem,
}

impl Rule {
    /// Its name in output and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::Bootstrap => "bootstrap",
            Self::Data => "data",
            Self::Filesystem => "filesystem",
        }
    }
}

/// One problem found, named by what it concerns: a path in the image, or `manifest`, `config`,
/// `index`, `bootstrap`, `blob …` for the image's parts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Problem {
    /// The rule that found it.
    pub rule: Rule,
    /// Path in the image ("/" for the image as a whole), or the part of the image.
    pub path: String,
    /// What is wrong.
    pub what: String,
}

impl Problem {
    /// A problem `rule` found about `path`.
    pub fn new(rule: Rule, path: &[u8], what: impl Into<String>) -> Self {
        Self {
            rule,
            path: String::from_utf8_lossy(path).into_owned(),
            what: what.into(),
        }
    }
}

fn problem(path: &[u8], what: impl Into<String>) -> Problem {
    Problem::new(Rule::Data, path, what)
}

/// Checks every blob (present, right size, right digest) and every chunk (decompresses and
/// matches its digest) of `b`, with blobs in `blob_dir`.
pub fn verify_chunks(b: &Bootstrap, blob_dir: &Path) -> Vec<Problem> {
    let backend = LocalFsBackend::new(blob_dir);
    let mut problems = Vec::new();
    for blob in b.blobs() {
        let path = backend.blob_path(&blob.id);
        match blob_digest(&path, blob.id_algo()) {
            Ok((size, digest)) => {
                if size != blob.size.get() {
                    problems.push(problem(
                        b"/",
                        format!(
                            "blob {} is {size} bytes, expected {}",
                            path.display(),
                            blob.size.get()
                        ),
                    ));
                } else if digest != blob.id {
                    // nydus-image 2.2 names a `--features blob-toc` blob built without
                    // `--blob-inline-meta` by a hash that leaves out its blob.digest section:
                    // say so, since its chunks still verify one by one.
                    let hint = if b.source_format() == crate::format::SourceFormat::NydusRafsV6 {
                        " (if it was built with `--features blob-toc` and without \
                         `--blob-inline-meta`, this is nydus-image 2.2 naming it by a hash that is \
                         not its sha256: its chunks are still verified one by one, but a registry \
                         would not serve it by that id)"
                    } else {
                        ""
                    };
                    problems.push(problem(
                        b"/",
                        format!(
                            "blob {} does not match its {} digest{hint}",
                            path.display(),
                            blob.id_algo().name()
                        ),
                    ));
                }
            }
            Err(e) => problems.push(problem(b"/", format!("blob {}: {e}", path.display()))),
        }
    }
    // Memory cache off: every chunk is read and verified from the blob.
    let source = CachedChunkSource::in_memory(backend, 0);
    let paths = b.paths();
    let t = b.tables();
    let files: Vec<usize> = (0..t.inodes.len())
        .filter(|&i| t.inodes[i].kind() == Some(InodeKind::Regular))
        .collect();
    let mut bad: Vec<Problem> = files
        .par_iter()
        .flat_map_iter(|&i| {
            let chunks = b.file_chunks(i as u32);
            let mut out = Vec::new();
            for (ci, c) in chunks.iter().enumerate().filter(|(_, c)| !c.is_zero()) {
                let Some(blob) = t.blobs.get(c.blob_index.get() as usize) else {
                    continue;
                };
                if let Err(e) = source.read_chunk(blob, c, &crate::storage::Deadline::none()) {
                    out.push(problem(
                        paths.get(i).map(Vec::as_slice).unwrap_or(b"?"),
                        format!("chunk {ci}: {}", crate::util::error_chain(&e)),
                    ));
                }
            }
            out
        })
        .collect();
    problems.append(&mut bad);
    problems
}

fn blob_digest(path: &Path, algo: DigestAlgo) -> std::io::Result<(u64, [u8; 32])> {
    let mut f = File::open(path)?;
    let mut h = algo.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, h.finalize()))
}
