//! The prefetch blob: the chunks of the files in the prefetch list, stored once more, one after
//! another in list order, in a blob of their own.
//!
//! A container's startup files are small and scattered over the image's blobs (python3's are
//! spread over 200 MB of a Debian image), so fetching them costs a round trip each however they
//! are ordered. Laid out contiguously in the order they are first read, they come in one or two
//! range requests, the first of them holding what the workload reads first. Every reference to
//! a moved chunk (in any file) is pointed at its copy in the prefetch blob; the copies left in
//! the layer blobs are no longer read. That costs the registry the bytes of the set once more
//! (a few MB for a typical startup set) and saves the round trips.
//!
//! The chunks keep their encoding and their digests, so the image's content (and its root
//! digest) does not change: only where its chunks live.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use zerocopy::little_endian::U64;
use zerocopy::FromZeros;

use super::tree::{ChunkLoc, NodeId, NodeKind, Tree};
use super::BuildError;
use crate::format::{digest_hex, BlobRecord, DIGEST_LEN};

/// What [`write`] stored.
#[derive(Clone, Debug)]
pub struct PrefetchBlob {
    /// The new blob's record (its id and size), last in the blob table.
    pub record: BlobRecord,
    /// Chunks stored in it.
    pub chunks: u64,
}

/// Copies the chunks of `files` (in order, each distinct chunk once) from their blobs in
/// `blob_dir` into a new blob there (named by its sha256 with `sha256_id`, else by its
/// blake3, as the build names its other blobs), appends it to `blobs`, and points every chunk
/// reference in `tree` with a moved digest at the copy. Returns `None` (and changes nothing)
/// when the files hold no stored chunk.
pub fn write(
    tree: &mut Tree,
    blobs: &mut Vec<BlobRecord>,
    files: &[NodeId],
    blob_dir: &Path,
    sha256_id: bool,
) -> Result<Option<PrefetchBlob>, BuildError> {
    let new_index =
        u32::try_from(blobs.len()).map_err(|_| BuildError::Invalid("too many blobs".into()))?;
    // The chunks to move, in order.
    let mut order: Vec<ChunkLoc> = Vec::new();
    let mut moved: HashMap<[u8; DIGEST_LEN], ChunkLoc> = HashMap::new();
    for &id in files {
        let Some(NodeKind::File { chunks, .. }) = tree.nodes.get(id).map(|n| &n.kind) else {
            continue;
        };
        for c in chunks {
            if c.stored_size == 0 || moved.contains_key(&c.digest) {
                continue;
            }
            moved.insert(c.digest, *c);
            order.push(*c);
        }
    }
    if order.is_empty() {
        return Ok(None);
    }

    let tmp = blob_dir.join(format!(".skiff-prefetch-blob-{}.tmp", std::process::id()));
    let result = copy_chunks(&order, blobs, blob_dir, &tmp, new_index, sha256_id);
    let (id, size, new_locs) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let dest = blob_dir.join(digest_hex(&id));
    std::fs::rename(&tmp, &dest).map_err(|e| BuildError::io("renaming", &dest, e))?;
    let mut record = BlobRecord::new_zeroed();
    record.id = id;
    record.size = U64::new(size);
    if sha256_id {
        record.flags = crate::format::BLOB_FLAG_SHA256_ID.into();
    }
    // The same bytes as a blob the image has already (a list covering a whole blob in its
    // order): that blob is the prefetch blob, with the same offsets.
    let existing = blobs.iter().position(|b| b.id == id);
    let index = match existing {
        Some(i) => i as u32,
        None => {
            blobs.push(record);
            new_index
        }
    };

    for (old, new) in order.iter().zip(&new_locs) {
        moved.insert(
            old.digest,
            ChunkLoc {
                blob: index,
                ..*new
            },
        );
    }
    for node in &mut tree.nodes {
        if let NodeKind::File { chunks, .. } = &mut node.kind {
            for c in chunks.iter_mut() {
                if let Some(n) = moved.get(&c.digest).filter(|_| c.stored_size != 0) {
                    *c = *n;
                }
            }
        }
    }
    if existing.is_some() {
        return Ok(None);
    }
    Ok(Some(PrefetchBlob {
        record,
        chunks: order.len() as u64,
    }))
}

/// Writes the stored bytes of `order` to `tmp`; returns the blob's id, its size and each
/// chunk's new location.
fn copy_chunks(
    order: &[ChunkLoc],
    blobs: &[BlobRecord],
    blob_dir: &Path,
    tmp: &Path,
    new_index: u32,
    sha256_id: bool,
) -> Result<([u8; DIGEST_LEN], u64, Vec<ChunkLoc>), BuildError> {
    let f = File::create(tmp).map_err(|e| BuildError::io("creating", tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, f);
    let mut hasher = super::chunker::BlobHasher::new(sha256_id);
    let mut sources: HashMap<u32, File> = HashMap::new();
    let mut offset = 0u64;
    let mut locs = Vec::with_capacity(order.len());
    let mut buf = Vec::new();
    for c in order {
        let blob = blobs
            .get(c.blob as usize)
            .ok_or_else(|| BuildError::Internal(format!("chunk in unknown blob {}", c.blob)))?;
        let path = blob_dir.join(digest_hex(&blob.id));
        let src = match sources.entry(c.blob) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(File::open(&path).map_err(|err| BuildError::io("opening", &path, err))?)
            }
        };
        buf.resize(c.stored_size as usize, 0);
        src.read_exact_at(&mut buf, c.offset)
            .map_err(|e| BuildError::io("reading", &path, e))?;
        out.write_all(&buf)
            .map_err(|e| BuildError::io("writing", tmp, e))?;
        hasher.update(&buf);
        locs.push(ChunkLoc {
            blob: new_index,
            offset,
            ..*c
        });
        offset += u64::from(c.stored_size);
    }
    let f = out
        .into_inner()
        .map_err(|e| BuildError::io("writing", tmp, e.into_error()))?;
    f.sync_all()
        .map_err(|e| BuildError::io("syncing", tmp, e))?;
    Ok((hasher.finalize(), offset, locs))
}
