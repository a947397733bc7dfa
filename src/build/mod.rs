//! Building RAFS images from a directory or from OCI layer tarballs.
//!
//! Sources fill in a [`tree::Tree`] while a [`chunker::Chunker`] stores file content; then
//! [`emit::emit`] lays the tree out and `format::BootstrapWriter` seals it.

pub mod chunker;
pub mod dir;
pub mod emit;
pub mod layers;
pub mod prefetch_blob;
pub mod tree;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub use chunker::{ChunkStats, Compressor};

use crate::format::{digest_hex, Bootstrap, FormatError, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An I/O error on a named file.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The source is not something an image can be built from.
    #[error("{0}")]
    Invalid(String),
    /// A tar layer is malformed or hostile.
    #[error("layer {layer}: {what}")]
    Layer {
        /// The layer file.
        layer: String,
        /// What is wrong.
        what: String,
    },
    /// The chunk size is not allowed.
    #[error("chunk size {0} is not a power of two from 4 KiB to 16 MiB")]
    ChunkSize(u32),
    /// A chunk dictionary with another chunk size cannot be reused.
    #[error("chunk dictionary has chunk size {dict}, this build uses {build}")]
    DictChunkSize {
        /// The dictionary's.
        dict: u32,
        /// The build's.
        build: u32,
    },
    /// A chunk dictionary failed to load.
    #[error("chunk dictionary {path}")]
    Dict {
        /// The dictionary.
        path: String,
        /// The cause.
        #[source]
        source: FormatError,
    },
    /// The bootstrap produced does not load back (a bug, reported rather than written).
    #[error("the built bootstrap does not validate")]
    Format(#[from] FormatError),
    /// The bootstrap could not be written.
    #[error(transparent)]
    Write(#[from] crate::util::WriteError),
    /// An internal invariant failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BuildError {
    /// An I/O error while doing `op` on `path`.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}

/// What to build from.
#[derive(Clone, Debug)]
pub enum BuildSource {
    /// A directory on the host.
    Dir(PathBuf),
    /// OCI layer tarballs (plain, gzip or zstd), applied in order with whiteouts.
    Layers(Vec<PathBuf>),
}

impl BuildSource {
    /// One directory, or one or more files taken as layers.
    pub fn from_paths(paths: &[PathBuf]) -> Result<Self, BuildError> {
        match paths {
            [] => Err(BuildError::Invalid("no source given".into())),
            [p] if p.is_dir() => Ok(Self::Dir(p.clone())),
            ps => {
                if let Some(d) = ps.iter().find(|p| p.is_dir()) {
                    return Err(BuildError::Invalid(format!(
                        "{} is a directory: give one directory, or layer tarballs only",
                        d.display()
                    )));
                }
                Ok(Self::Layers(ps.to_vec()))
            }
        }
    }
}

/// Options of a build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Where the bootstrap goes.
    pub bootstrap: PathBuf,
    /// Where the blob goes.
    pub blob_dir: PathBuf,
    /// Chunk size.
    pub chunk_size: u32,
    /// Compression.
    pub compressor: Compressor,
    /// Bootstraps whose chunks may be reused.
    pub chunk_dicts: Vec<PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Threads reading a source directory (0: [`dir::DEFAULT_IO_THREADS`]). More keep more
    /// reads in flight on a cold disk; the image does not depend on it.
    pub io_threads: usize,
    /// Name new blobs by their sha256 instead of their blake3
    /// ([`crate::format::BLOB_FLAG_SHA256_ID`]), as images for registries do.
    pub blob_id_sha256: bool,
    /// Write the node compatibility header ([`crate::format::SB_FLAG_NODE_COMPAT`]) that
    /// nydus-snapshotter's checks of a bootstrap accept.
    pub node_compat: bool,
}

/// What a build did, shown at the end and written with `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BuildSummary {
    /// Inodes in the image.
    pub inodes: u64,
    /// Entries scanned in the source (names, hard links included).
    pub entries: u64,
    /// Chunk counters.
    #[serde(flatten)]
    pub chunks: ChunkStats,
    /// The new blob's id, if any content was stored.
    pub blob_id: Option<String>,
    /// Number of blobs the image refers to.
    pub blobs: usize,
    /// Bootstrap size in bytes.
    pub bootstrap_bytes: u64,
    /// Root Merkle digest.
    pub root_digest: String,
    /// Chunk size.
    pub chunk_size: u32,
    /// Compressor.
    pub compressor: Compressor,
    /// The prefetch blob's id (hex), if the build stored the prefetch list's chunks in a blob
    /// of their own (see [`prefetch_blob`]).
    pub prefetch_blob: Option<String>,
    /// Bytes of the prefetch blob (0 without one).
    pub prefetch_blob_bytes: u64,
    /// Chunks in the prefetch blob.
    pub prefetch_blob_chunks: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl std::fmt::Display for BuildSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.chunks;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(f, "image       root {}", self.root_digest)?;
        writeln!(
            f,
            "entries     {} names, {} inodes",
            self.entries, self.inodes
        )?;
        writeln!(
            f,
            "content     {:.1} MiB in {} chunks of {} KiB",
            mib(c.bytes_in),
            c.chunks,
            self.chunk_size / 1024
        )?;
        writeln!(
            f,
            "dedup       {} zero, {} repeated, {} from dictionaries: {:.1} MiB not stored",
            c.zero_chunks,
            c.dedup_chunks,
            c.dict_chunks,
            mib(c.saved_bytes)
        )?;
        writeln!(
            f,
            "blob        {} chunks, {:.1} MiB ({:?}) {}",
            c.stored_chunks,
            mib(c.blob_bytes),
            self.compressor,
            self.blob_id.as_deref().unwrap_or("(nothing new stored)")
        )?;
        if let Some(id) = &self.prefetch_blob {
            writeln!(
                f,
                "prefetch    {} chunks, {:.1} MiB in blob {id}",
                self.prefetch_blob_chunks,
                mib(self.prefetch_blob_bytes)
            )?;
        }
        writeln!(
            f,
            "bootstrap   {:.1} KiB, {} blob(s) referenced",
            self.bootstrap_bytes as f64 / 1024.0,
            self.blobs
        )?;
        write!(f, "time        {:.2} s", self.seconds)
    }
}

/// Counts entries and bytes, and drives a progress bar on a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
    entries: AtomicU64,
}

impl Progress {
    /// A progress reporter; the bar is shown only when `show` and stderr is a terminal.
    pub fn new(show: bool) -> Self {
        let bar = (show && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let b = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {msg} {bytes} read, {bytes_per_sec} [{elapsed}]",
            ) {
                b.set_style(style);
            }
            b
        });
        Self {
            bar,
            entries: AtomicU64::new(0),
        }
    }

    /// One more entry scanned.
    pub fn entry(&self) {
        let n = self.entries.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(b) = &self.bar {
            if n.is_multiple_of(256) {
                b.set_message(format!("{n} entries"));
            }
        }
    }

    /// `n` more bytes of content read.
    pub fn bytes(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Entries counted so far.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Builds an image from `source`, writing the bootstrap and the new blob.
pub fn build(source: &BuildSource, opts: &BuildOptions) -> Result<BuildSummary, BuildError> {
    build_inner(source, opts, None, &PrefetchLayout::default()).map(|(s, _)| s)
}

/// A build's prefetch list, and where its chunks go.
#[derive(Clone, Debug, Default)]
pub struct PrefetchLayout {
    /// Image paths in access order (absolute or relative to the root); a directory stands for
    /// every regular file under it. They fill the bootstrap's prefetch table. A path that is not
    /// in the image is an error.
    pub paths: Vec<String>,
    /// Also store the listed files' chunks in a blob of their own, in list order (see
    /// [`prefetch_blob`]), so that a daemon fetches them with one or two range requests.
    pub own_blob: bool,
}

/// Like [`build`], also filling the bootstrap's prefetch table (and, if asked, a prefetch blob)
/// from `prefetch`.
pub fn build_with_prefetch(
    source: &BuildSource,
    opts: &BuildOptions,
    prefetch: &PrefetchLayout,
) -> Result<BuildSummary, BuildError> {
    build_inner(source, opts, None, prefetch).map(|(s, _)| s)
}

/// Builds an image from OCI layer tarballs with one new blob per layer: chunks a layer shares
/// with an earlier one are referenced in the earlier layer's blob, not stored again. Returns
/// the summary and, per layer, the blob it produced (`None` if it stored nothing new).
pub fn build_blob_per_layer(
    layers: &[PathBuf],
    opts: &BuildOptions,
) -> Result<(BuildSummary, Vec<Option<crate::format::BlobRecord>>), BuildError> {
    build_blob_per_layer_with_prefetch(layers, opts, &PrefetchLayout::default())
        .map(|(s, l, _)| (s, l))
}

/// Like [`build_blob_per_layer`], with a prefetch list; also returns the prefetch blob, if one
/// was stored.
#[allow(clippy::type_complexity)]
pub fn build_blob_per_layer_with_prefetch(
    layers: &[PathBuf],
    opts: &BuildOptions,
    prefetch: &PrefetchLayout,
) -> Result<
    (
        BuildSummary,
        Vec<Option<crate::format::BlobRecord>>,
        Option<crate::format::BlobRecord>,
    ),
    BuildError,
> {
    let mut per_layer = vec![None; layers.len()];
    let (summary, pblob) = build_inner(
        &BuildSource::Layers(layers.to_vec()),
        opts,
        Some(&mut per_layer),
        prefetch,
    )?;
    Ok((summary, per_layer, pblob))
}

fn build_inner(
    source: &BuildSource,
    opts: &BuildOptions,
    per_layer: Option<&mut Vec<Option<crate::format::BlobRecord>>>,
    prefetch: &PrefetchLayout,
) -> Result<(BuildSummary, Option<crate::format::BlobRecord>), BuildError> {
    let start = Instant::now();
    let cs = opts.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(BuildError::ChunkSize(cs));
    }
    let mut chunker =
        chunker::Chunker::new(cs, opts.compressor, &opts.blob_dir, opts.blob_id_sha256)?;
    for d in &opts.chunk_dicts {
        let dict = Bootstrap::load(d).map_err(|source| BuildError::Dict {
            path: d.display().to_string(),
            source,
        })?;
        chunker.add_dict(&dict)?;
    }
    let progress = Progress::new(opts.progress);
    let mut tree = match source {
        BuildSource::Dir(d) => dir::scan(d, &mut chunker, &progress, opts.io_threads)?,
        BuildSource::Layers(ls) => match per_layer {
            None => layers::apply(ls, &mut chunker, &progress)?,
            Some(out) => layers::apply_with(ls, &mut chunker, &progress, |i, c, tree| {
                let sealed = c.seal_blob(tree)?;
                if let Some(slot) = out.get_mut(i) {
                    *slot = sealed;
                }
                Ok(())
            })?,
        },
    };
    let stats_entries = progress.entries();
    let (mut blobs, blob_id, stats) = chunker.finish(&mut tree)?;
    let prefetch_nodes = resolve_prefetch(&tree, &prefetch.paths)?;
    let pblob = if prefetch.own_blob {
        prefetch_blob::write(
            &mut tree,
            &mut blobs,
            &prefetch_nodes,
            &opts.blob_dir,
            opts.blob_id_sha256,
        )?
    } else {
        None
    };
    let nblobs = blobs.len();
    let writer = emit::emit(&tree, blobs, &prefetch_nodes)?;
    let bytes = writer.finish_with(cs, opts.node_compat)?;
    // Load what was written before anyone else can: a bootstrap that does not validate is a bug
    // here, and must not reach a user.
    let loaded = Bootstrap::from_bytes(bytes.clone())?;
    crate::util::write_atomically(&opts.bootstrap, &bytes)?;
    progress.finish();
    let summary = BuildSummary {
        inodes: loaded.inode_count() as u64,
        entries: stats_entries,
        chunks: stats,
        blob_id: blob_id.map(|id| digest_hex(&id)),
        blobs: nblobs,
        bootstrap_bytes: bytes.len() as u64,
        root_digest: digest_hex(loaded.root_digest()),
        chunk_size: cs,
        compressor: opts.compressor,
        prefetch_blob: pblob.as_ref().map(|p| digest_hex(&p.record.id)),
        prefetch_blob_bytes: pblob.as_ref().map_or(0, |p| p.record.size.get()),
        prefetch_blob_chunks: pblob.as_ref().map_or(0, |p| p.chunks),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((summary, pblob.map(|p| p.record)))
}

/// The regular files named by `paths` (directories expanded depth first), each once, in order.
fn resolve_prefetch(tree: &tree::Tree, paths: &[String]) -> Result<Vec<tree::NodeId>, BuildError> {
    fn files_under(
        tree: &tree::Tree,
        id: tree::NodeId,
        seen: &mut std::collections::HashSet<tree::NodeId>,
        out: &mut Vec<tree::NodeId>,
    ) {
        match tree.children(id) {
            Some(children) => {
                for &c in children.values() {
                    files_under(tree, c, seen, out);
                }
            }
            None => {
                if matches!(
                    tree.nodes.get(id).map(|n| &n.kind),
                    Some(tree::NodeKind::File { .. })
                ) && seen.insert(id)
                {
                    out.push(id);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in paths {
        let mut id: tree::NodeId = 0;
        for part in p.split('/').filter(|s| !s.is_empty() && *s != ".") {
            id = tree
                .children(id)
                .and_then(|c| c.get(part.as_bytes()))
                .copied()
                .ok_or_else(|| {
                    BuildError::Invalid(format!("prefetch list: {p}: not in the image"))
                })?;
        }
        files_under(tree, id, &mut seen, &mut out);
    }
    Ok(out)
}
