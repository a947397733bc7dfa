//! Cutting file content into chunks: hashing and compressing in parallel, then deduplicating
//! and appending to the new blob in a fixed order, so the same input gives the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use zerocopy::little_endian::U64;
use zerocopy::FromZeros;

use super::tree::{ChunkLoc, NodeId, NodeKind, Tree};
use super::BuildError;
use crate::format::{
    digest_hex, BlobRecord, Bootstrap, CHUNK_FLAG_LZ4, CHUNK_FLAG_ZERO, CHUNK_FLAG_ZSTD, DIGEST_LEN,
};

/// How chunks are compressed. Either way a chunk is stored compressed only where that saves
/// space, and its record says which (see [`crate::format::CHUNK_FLAG_LZ4`],
/// [`crate::format::CHUNK_FLAG_ZSTD`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compressor {
    /// lz4 block compression (lz4_flex): fast to build and to read.
    Lz4,
    /// One zstd frame per chunk, at zstd's default level (3, as nydus-image's `zstd`): smaller
    /// blobs (about 0.7 of lz4's on a Debian tree), slower to build, a little slower to read.
    Zstd,
    /// Stored as is.
    None,
}

impl Compressor {
    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Compressor::Lz4 => "lz4",
            Compressor::Zstd => "zstd",
            Compressor::None => "none",
        }
    }

    /// Parses [`Self::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        [Compressor::Lz4, Compressor::Zstd, Compressor::None]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// zstd's default compression level, the one nydus-image uses.
const ZSTD_LEVEL: i32 = zstd::DEFAULT_COMPRESSION_LEVEL;

thread_local! {
    /// One zstd compression context per encoding thread, reused: a new context per chunk
    /// would allocate and set up its tables for every small file.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` as one zstd frame, or `None` if zstd fails (the chunk is then stored as is).
fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    ZSTD.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        slot.as_mut()?.compress(data).ok()
    })
}

/// Counters a build reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ChunkStats {
    /// Bytes of file content read.
    pub bytes_in: u64,
    /// Chunks in all files.
    pub chunks: u64,
    /// Chunks that are all zeroes (stored nowhere).
    pub zero_chunks: u64,
    /// Chunks already stored earlier in this build.
    pub dedup_chunks: u64,
    /// Chunks found in a chunk dictionary (stored in an earlier image's blob).
    pub dict_chunks: u64,
    /// Chunks written to the new blob.
    pub stored_chunks: u64,
    /// Uncompressed bytes not written thanks to zero detection, dedup and dictionaries.
    pub saved_bytes: u64,
    /// Bytes written to the new blob.
    pub blob_bytes: u64,
}

/// A blob the image refers to: the one this build writes, or one from a dictionary.
#[derive(Clone, Copy, Debug)]
enum BlobEntry {
    New,
    Existing(BlobRecord),
}

struct Pending {
    node: NodeId,
    data: Vec<u8>,
}

/// One chunk hashed and encoded, ready to be stored by [`Chunker::store_encoded`].
pub struct EncodedChunk {
    digest: [u8; DIGEST_LEN],
    /// Uncompressed length.
    size: u32,
    zero: bool,
    /// The compression flag of the stored bytes (`CHUNK_FLAG_LZ4`, `CHUNK_FLAG_ZSTD` or 0).
    compression: u32,
    /// What goes into the blob: the compressed bytes when compression paid, else the raw
    /// bytes; empty for an all-zero chunk, which is stored nowhere.
    bytes: Vec<u8>,
}

impl EncodedChunk {
    /// Hashes `data` and compresses it with `compressor`. Pure CPU work, done on any thread;
    /// the result depends on `data` alone, so the image does not depend on who encoded what.
    pub fn encode(compressor: Compressor, data: Vec<u8>) -> Self {
        let digest = *blake3::hash(&data).as_bytes();
        let size = data.len() as u32;
        if data.iter().all(|&b| b == 0) {
            return Self {
                digest,
                size,
                zero: true,
                compression: 0,
                bytes: Vec::new(),
            };
        }
        let compressed = match compressor {
            Compressor::Lz4 => Some((CHUNK_FLAG_LZ4, lz4_flex::block::compress(&data))),
            Compressor::Zstd => zstd_compress(&data).map(|c| (CHUNK_FLAG_ZSTD, c)),
            Compressor::None => None,
        };
        match compressed {
            // The raw bytes are dropped here, so only the smaller copy waits to be stored.
            Some((compression, c)) if c.len() < data.len() => Self {
                digest,
                size,
                zero: false,
                compression,
                bytes: c,
            },
            _ => Self {
                digest,
                size,
                zero: false,
                compression: 0,
                bytes: data,
            },
        }
    }

    /// Uncompressed length.
    pub fn size(&self) -> u32 {
        self.size
    }
}

/// Written blob bytes after which writeback to disk is started, so that the final `fsync`
/// finds little left to write.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// The digest naming the blob being written.
pub(super) enum BlobHasher {
    Blake3(Box<blake3::Hasher>),
    Sha256(sha2::Sha256),
}

impl BlobHasher {
    /// A hasher for a blob named by sha256 (`sha256`) or by blake3.
    pub(super) fn new(sha256: bool) -> Self {
        if sha256 {
            BlobHasher::Sha256(<sha2::Sha256 as sha2::Digest>::new())
        } else {
            BlobHasher::Blake3(Box::default())
        }
    }

    fn is_sha256(&self) -> bool {
        matches!(self, BlobHasher::Sha256(_))
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        match self {
            BlobHasher::Blake3(h) => {
                h.update(bytes);
            }
            BlobHasher::Sha256(h) => sha2::Digest::update(h, bytes),
        }
    }

    pub(super) fn finalize(self) -> [u8; DIGEST_LEN] {
        match self {
            BlobHasher::Blake3(h) => *h.finalize().as_bytes(),
            BlobHasher::Sha256(h) => sha2::Digest::finalize(h).into(),
        }
    }
}

/// Batch size: enough to keep both cores busy, small enough to bound memory.
const BATCH_BYTES: usize = 64 << 20;

/// Chunks, deduplicates and stores file content for one build.
pub struct Chunker {
    chunk_size: u32,
    compressor: Compressor,
    blob_dir: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    hasher: BlobHasher,
    offset: u64,
    /// `offset` when writeback was last started.
    writeback_at: u64,
    blobs: Vec<BlobEntry>,
    blob_index_of: HashMap<[u8; DIGEST_LEN], u32>,
    new_index: Option<u32>,
    seen: HashMap<[u8; DIGEST_LEN], ChunkLoc>,
    dict: HashMap<[u8; DIGEST_LEN], (BlobRecord, ChunkLoc)>,
    pending: Vec<Pending>,
    pending_bytes: usize,
    /// What the build did.
    pub stats: ChunkStats,
}

impl Chunker {
    /// A chunker writing its new blob into `blob_dir`, naming blobs by their blake3 (or their
    /// sha256 with `sha256_ids`, see [`crate::format::BLOB_FLAG_SHA256_ID`]).
    pub fn new(
        chunk_size: u32,
        compressor: Compressor,
        blob_dir: &Path,
        sha256_ids: bool,
    ) -> Result<Self, BuildError> {
        std::fs::create_dir_all(blob_dir).map_err(|e| BuildError::io("creating", blob_dir, e))?;
        let tmp_path = blob_dir.join(format!(".skiff-blob-{}.tmp", std::process::id()));
        Ok(Self {
            chunk_size,
            compressor,
            blob_dir: blob_dir.to_path_buf(),
            tmp_path,
            out: None,
            hasher: BlobHasher::new(sha256_ids),
            offset: 0,
            writeback_at: 0,
            blobs: Vec::new(),
            blob_index_of: HashMap::new(),
            new_index: None,
            seen: HashMap::new(),
            dict: HashMap::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            stats: ChunkStats::default(),
        })
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The compressor.
    pub fn compressor(&self) -> Compressor {
        self.compressor
    }

    /// Makes the chunks of `dict` available for reuse. Its chunk size must match.
    pub fn add_dict(&mut self, dict: &Bootstrap) -> Result<(), BuildError> {
        if dict.chunk_size() != self.chunk_size {
            return Err(BuildError::DictChunkSize {
                dict: dict.chunk_size(),
                build: self.chunk_size,
            });
        }
        let t = dict.tables();
        // This builder names chunks by blake3: a dictionary's sha256 chunks (a Nydus image
        // built with `--digester sha256`) can never match one, so they are not offered.
        for c in t
            .chunks
            .iter()
            .filter(|c| !c.is_zero() && c.digest_algo() == crate::format::DigestAlgo::Blake3)
        {
            let Some(blob) = t.blobs.get(c.blob_index.get() as usize) else {
                continue;
            };
            self.dict.entry(c.digest).or_insert((
                *blob,
                ChunkLoc {
                    digest: c.digest,
                    size: c.uncompressed_size.get(),
                    flags: c.flags.get(),
                    blob: 0,
                    offset: c.compressed_offset.get(),
                    stored_size: c.compressed_size.get(),
                },
            ));
        }
        Ok(())
    }

    /// Queues one chunk of `node`'s content; chunks of a node must be pushed in file order.
    pub fn push(&mut self, tree: &mut Tree, node: NodeId, data: Vec<u8>) -> Result<(), BuildError> {
        self.pending_bytes += data.len();
        self.pending.push(Pending { node, data });
        if self.pending_bytes >= BATCH_BYTES {
            self.flush(tree)?;
        }
        Ok(())
    }

    /// Encodes the queued chunks in parallel, then stores them in queue order.
    pub fn flush(&mut self, tree: &mut Tree) -> Result<(), BuildError> {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let compressor = self.compressor;
        let encoded: Vec<(NodeId, EncodedChunk)> = pending
            .into_par_iter()
            .map(|p| (p.node, EncodedChunk::encode(compressor, p.data)))
            .collect();
        for (node, e) in encoded {
            let loc = self.store_encoded(e)?;
            if let Some(NodeKind::File { chunks, .. }) =
                tree.nodes.get_mut(node).map(|n| &mut n.kind)
            {
                chunks.push(loc);
            }
        }
        Ok(())
    }

    /// Stores one encoded chunk (or finds it already stored) and says where it is. Chunks are
    /// laid out in the blob in the order they are stored, so callers store them in a fixed
    /// order.
    pub fn store_encoded(&mut self, e: EncodedChunk) -> Result<ChunkLoc, BuildError> {
        let size = e.size;
        self.stats.bytes_in += u64::from(size);
        self.stats.chunks += 1;
        if e.zero {
            self.stats.zero_chunks += 1;
            self.stats.saved_bytes += u64::from(size);
            return Ok(ChunkLoc {
                digest: e.digest,
                size,
                flags: CHUNK_FLAG_ZERO,
                blob: 0,
                offset: 0,
                stored_size: 0,
            });
        }
        if let Some(loc) = self.seen.get(&e.digest) {
            self.stats.dedup_chunks += 1;
            self.stats.saved_bytes += u64::from(size);
            return Ok(*loc);
        }
        if let Some((blob, dloc)) = self.dict.get(&e.digest).copied() {
            let index = match self.blob_index_of.get(&blob.id) {
                Some(&i) => i,
                None => {
                    let i = self.blobs.len() as u32;
                    self.blobs.push(BlobEntry::Existing(blob));
                    self.blob_index_of.insert(blob.id, i);
                    i
                }
            };
            let loc = ChunkLoc {
                blob: index,
                ..dloc
            };
            self.stats.dict_chunks += 1;
            self.stats.saved_bytes += u64::from(size);
            self.seen.insert(e.digest, loc);
            return Ok(loc);
        }
        let bytes = e.bytes.as_slice();
        let flags = e.compression;
        let index = match self.new_index {
            Some(i) => i,
            None => {
                let f = File::create(&self.tmp_path)
                    .map_err(|err| BuildError::io("creating", &self.tmp_path, err))?;
                self.out = Some(BufWriter::with_capacity(1 << 20, f));
                let i = self.blobs.len() as u32;
                self.blobs.push(BlobEntry::New);
                self.new_index = Some(i);
                i
            }
        };
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| BuildError::Internal("blob writer missing".into()))?;
        out.write_all(bytes)
            .map_err(|err| BuildError::io("writing", &self.tmp_path, err))?;
        self.hasher.update(bytes);
        let loc = ChunkLoc {
            digest: e.digest,
            size,
            flags,
            blob: index,
            offset: self.offset,
            stored_size: bytes.len() as u32,
        };
        self.offset += bytes.len() as u64;
        if self.offset - self.writeback_at >= WRITEBACK_BYTES {
            self.writeback_at = self.offset;
            start_writeback(out.get_ref());
        }
        self.stats.stored_chunks += 1;
        self.stats.blob_bytes += bytes.len() as u64;
        self.seen.insert(e.digest, loc);
        Ok(loc)
    }

    /// Stores what is queued and closes the blob being written, naming it by its digest: later
    /// chunks go to a new blob, while chunks already stored stay where they are and are still
    /// found for deduplication. Returns the sealed blob's record, or `None` if nothing was
    /// stored since the last seal. `skiff convert` seals at each layer boundary, so that each
    /// layer gets its own blob.
    pub fn seal_blob(&mut self, tree: &mut Tree) -> Result<Option<BlobRecord>, BuildError> {
        self.flush(tree)?;
        let (Some(out), Some(index)) = (self.out.take(), self.new_index.take()) else {
            return Ok(None);
        };
        let f = out
            .into_inner()
            .map_err(|e| BuildError::io("writing", &self.tmp_path, e.into_error()))?;
        f.sync_all()
            .map_err(|e| BuildError::io("syncing", &self.tmp_path, e))?;
        let sha256 = self.hasher.is_sha256();
        let hasher = std::mem::replace(&mut self.hasher, BlobHasher::new(sha256));
        let id = hasher.finalize();
        let dest = self.blob_dir.join(digest_hex(&id));
        std::fs::rename(&self.tmp_path, &dest).map_err(|e| BuildError::io("renaming", &dest, e))?;
        let mut r = BlobRecord::new_zeroed();
        r.id = id;
        r.size = U64::new(self.offset);
        if sha256 {
            r.flags = crate::format::BLOB_FLAG_SHA256_ID.into();
        }
        self.offset = 0;
        self.writeback_at = 0;
        let slot = self
            .blobs
            .get_mut(index as usize)
            .ok_or_else(|| BuildError::Internal("sealed blob missing".into()))?;
        *slot = BlobEntry::Existing(r);
        self.blob_index_of.insert(id, index);
        Ok(Some(r))
    }

    /// Stores what is queued, names the last new blob by its digest, and returns the blob table,
    /// that blob's id (if anything was stored since the last seal) and the counters.
    #[allow(clippy::type_complexity)]
    pub fn finish(
        mut self,
        tree: &mut Tree,
    ) -> Result<(Vec<BlobRecord>, Option<[u8; DIGEST_LEN]>, ChunkStats), BuildError> {
        let new_id = self.seal_blob(tree)?.map(|r| r.id);
        let mut records = Vec::with_capacity(self.blobs.len());
        for b in &self.blobs {
            match b {
                BlobEntry::Existing(r) => records.push(*r),
                BlobEntry::New => return Err(BuildError::Internal("unsealed blob".into())),
            }
        }
        Ok((records, new_id, std::mem::take(&mut self.stats)))
    }
}

/// Asks the kernel to start writing `f`'s dirty pages to disk now, without waiting for it: the
/// blob is written while the source is still being read, instead of all at once in the final
/// `fsync`. Only a hint: a failure here shows up, if it matters, in that `fsync`.
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor belongs to `f`, which is open for the whole call; the call takes
    // plain integers and touches no memory of ours.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl Drop for Chunker {
    fn drop(&mut self) {
        // A build that failed half-way leaves no temporary blob behind.
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ChunkRecord;
    use crate::storage::decode_chunk;
    use zerocopy::little_endian::U32;

    /// The record the builder writes for `e`, as far as decoding needs it.
    fn record_of(e: &EncodedChunk) -> ChunkRecord {
        let mut c = ChunkRecord::new_zeroed();
        c.digest = e.digest;
        c.flags = U32::new(e.compression);
        c.compressed_size = U32::new(e.bytes.len() as u32);
        c.uncompressed_size = U32::new(e.size);
        c
    }

    #[test]
    fn each_compressor_keeps_its_output_only_where_it_saves_space() {
        let text: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("line {} of a text file\n", i % 1000).into_bytes())
            .take(1 << 20)
            .collect();
        // A byte sequence no compressor shrinks (an LCG's high bytes).
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        for (compressor, flag) in [
            (Compressor::Lz4, CHUNK_FLAG_LZ4),
            (Compressor::Zstd, CHUNK_FLAG_ZSTD),
            (Compressor::None, 0),
        ] {
            let e = EncodedChunk::encode(compressor, text.clone());
            assert_eq!(e.compression, flag, "{compressor:?} on text");
            if flag != 0 {
                assert!(e.bytes.len() < text.len() / 4, "{compressor:?} on text");
            }
            assert_eq!(
                decode_chunk(&e.bytes, &record_of(&e)).expect("decodes"),
                text
            );
            // Incompressible: stored as is, whatever the compressor.
            let e = EncodedChunk::encode(compressor, noise.clone());
            assert_eq!(
                (e.compression, &e.bytes),
                (0, &noise),
                "{compressor:?} on noise"
            );
            assert_eq!(
                decode_chunk(&e.bytes, &record_of(&e)).expect("decodes"),
                noise
            );
            // All zeroes: stored nowhere.
            let e = EncodedChunk::encode(compressor, vec![0; 4096]);
            assert!(e.zero && e.bytes.is_empty());
        }
        // zstd writes one frame per chunk, which the zstd crate reads back on its own too.
        let e = EncodedChunk::encode(Compressor::Zstd, text.clone());
        assert_eq!(
            zstd::bulk::decompress(&e.bytes, text.len()).expect("one frame"),
            text
        );
        // A context reused for the next chunk gives the same bytes as a fresh one.
        let again = EncodedChunk::encode(Compressor::Zstd, text.clone());
        assert_eq!(again.bytes, e.bytes);
        assert_eq!(
            again.bytes,
            zstd::bulk::compress(&text, ZSTD_LEVEL).expect("zstd")
        );
    }

    #[test]
    fn compressor_names_round_trip() {
        for c in [Compressor::Lz4, Compressor::Zstd, Compressor::None] {
            assert_eq!(Compressor::from_name(c.name()), Some(c));
        }
        assert_eq!(Compressor::from_name("lz4_block"), None);
    }
}
