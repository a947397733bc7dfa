//! Turning stored chunk bytes into verified, decompressed bytes.

use crate::format::ChunkRecord;

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
    /// The lz4 block is malformed.
    #[error("lz4 decompression failed: {0}")]
    Decompress(String),
    /// Decompression gave the wrong number of bytes.
    #[error("decompressed to {got} bytes, expected {want}")]
    DecompressedLength {
        /// Bytes produced.
        got: usize,
        /// Bytes the record declares.
        want: usize,
    },
    /// The blake3 digest of the bytes differs from the record's.
    #[error("digest mismatch: got {got}")]
    Digest {
        /// Digest of what was received (hex).
        got: String,
    },
}

/// Decompresses `stored` as described by `chunk` and checks its digest.
pub fn decode_chunk(stored: &[u8], chunk: &ChunkRecord) -> Result<Vec<u8>, VerifyError> {
    let want_stored = chunk.compressed_size.get() as usize;
    if stored.len() != want_stored {
        return Err(VerifyError::Length {
            got: stored.len(),
            want: want_stored,
        });
    }
    let size = chunk.uncompressed_size.get() as usize;
    let data = if chunk.is_lz4() {
        let mut out = vec![0u8; size];
        let n = lz4_flex::block::decompress_into(stored, &mut out)
            .map_err(|e| VerifyError::Decompress(e.to_string()))?;
        if n != size {
            return Err(VerifyError::DecompressedLength { got: n, want: size });
        }
        out
    } else {
        stored.to_vec()
    };
    let digest = blake3::hash(&data);
    if digest.as_bytes() != &chunk.digest {
        return Err(VerifyError::Digest {
            got: digest.to_hex().to_string(),
        });
    }
    Ok(data)
}
