//! Turning stored chunk bytes into verified, decompressed bytes.

use crate::format::{ChunkRecord, Compression};

/// Why stored bytes are not the chunk they claim to be.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Fewer or more bytes than the record says are stored.
    #[error("stored length {got}, expected {want}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes the record declares.
        want: usize,
    },
    /// The compressed bytes are malformed.
    #[error("{algo} decompression failed: {reason}")]
    Decompress {
        /// "lz4" or "zstd".
        algo: &'static str,
        /// The decompressor's message.
        reason: String,
    },
    /// Decompression gave the wrong number of bytes.
    #[error("decompressed to {got} bytes, expected {want}")]
    DecompressedLength {
        /// Bytes produced.
        got: usize,
        /// Bytes the record declares.
        want: usize,
    },
    /// The digest of the bytes differs from the record's.
    #[error("{algo} digest mismatch: got {got}")]
    Digest {
        /// The digest algorithm of the chunk.
        algo: &'static str,
        /// Digest of what was received (hex).
        got: String,
    },
}

thread_local! {
    /// One zstd decompression context per thread, reused: creating one per chunk costs an
    /// allocation of its window for every small file.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses the zstd frame `stored` into at most `capacity` bytes.
fn zstd_decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    ZSTD.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(std::io::Error::other)?;
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(stored, capacity),
            None => zstd::bulk::decompress(stored, capacity),
        }
    })
}

/// Decompresses `stored` as described by `chunk` (lz4 block, zstd frame or none) into exactly
/// its uncompressed size, and checks its digest with the chunk's algorithm (blake3 or sha256).
pub fn decode_chunk(stored: &[u8], chunk: &ChunkRecord) -> Result<Vec<u8>, VerifyError> {
    let want_stored = chunk.compressed_size.get() as usize;
    if stored.len() != want_stored {
        return Err(VerifyError::Length {
            got: stored.len(),
            want: want_stored,
        });
    }
    let size = chunk.uncompressed_size.get() as usize;
    let data = match chunk.compression() {
        Compression::Lz4Block => {
            let mut out = vec![0u8; size];
            let n = lz4_flex::block::decompress_into(stored, &mut out).map_err(|e| {
                VerifyError::Decompress {
                    algo: "lz4",
                    reason: e.to_string(),
                }
            })?;
            if n != size {
                return Err(VerifyError::DecompressedLength { got: n, want: size });
            }
            out
        }
        Compression::Zstd => {
            // The capacity is the bound: a frame that expands beyond the chunk is an error,
            // never a larger allocation.
            let out = zstd_decompress(stored, size).map_err(|e| VerifyError::Decompress {
                algo: "zstd",
                reason: e.to_string(),
            })?;
            if out.len() != size {
                return Err(VerifyError::DecompressedLength {
                    got: out.len(),
                    want: size,
                });
            }
            out
        }
        Compression::None => stored.to_vec(),
    };
    let algo = chunk.digest_algo();
    let digest = algo.digest(&data);
    if digest != chunk.digest {
        return Err(VerifyError::Digest {
            algo: algo.name(),
            got: hex::encode(digest),
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use zerocopy::little_endian::U32;
    use zerocopy::FromZeros;

    use super::*;
    use crate::format::{DigestAlgo, CHUNK_FLAG_LZ4, CHUNK_FLAG_SHA256, CHUNK_FLAG_ZSTD};

    fn record(data: &[u8], stored: &[u8], flags: u32) -> ChunkRecord {
        let mut c = ChunkRecord::new_zeroed();
        c.flags = U32::new(flags);
        c.digest = c.digest_algo().digest(data);
        c.compressed_size = U32::new(stored.len() as u32);
        c.uncompressed_size = U32::new(data.len() as u32);
        c
    }

    #[test]
    fn every_compression_and_digest_decodes_and_mismatches_fail() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 97) as u8).collect();
        let lz4 = lz4_flex::block::compress(&data);
        let zstd = zstd::bulk::compress(&data, 3).expect("zstd");
        for sha in [0, CHUNK_FLAG_SHA256] {
            for (stored, flags) in [
                (&data[..], 0),
                (&lz4[..], CHUNK_FLAG_LZ4),
                (&zstd[..], CHUNK_FLAG_ZSTD),
            ] {
                let c = record(&data, stored, flags | sha);
                assert_eq!(decode_chunk(stored, &c).expect("decodes"), data);
                // The other algorithm's digest of the same bytes does not pass.
                let mut other = c;
                other.flags = U32::new(flags | (sha ^ CHUNK_FLAG_SHA256));
                assert!(matches!(
                    decode_chunk(stored, &other),
                    Err(VerifyError::Digest { .. })
                ));
                // A flipped bit never gives bytes.
                let mut bad = stored.to_vec();
                let mid = bad.len() / 2;
                bad[mid] ^= 0x10;
                assert!(decode_chunk(&bad, &c).is_err());
            }
        }
        assert_eq!(
            record(&data, &data, CHUNK_FLAG_SHA256).digest_algo(),
            DigestAlgo::Sha256
        );
    }

    #[test]
    fn a_zstd_frame_larger_than_the_chunk_is_refused() {
        let data = vec![7u8; 10_000];
        let zstd = zstd::bulk::compress(&data, 3).expect("zstd");
        // The record claims fewer bytes than the frame holds: no bigger buffer, an error.
        let mut c = record(&data[..5000], &zstd, CHUNK_FLAG_ZSTD);
        c.compressed_size = U32::new(zstd.len() as u32);
        assert!(matches!(
            decode_chunk(&zstd, &c),
            Err(VerifyError::Decompress { .. })
        ));
        // More bytes than the frame holds: a length error.
        let c = record(&[data.clone(), data].concat(), &zstd, CHUNK_FLAG_ZSTD);
        assert!(decode_chunk(&zstd, &c).is_err());
    }
}
