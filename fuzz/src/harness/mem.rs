//! Blobs held in memory, served as a [`BlobBackend`]: the backend of every target that reads
//! chunks, so that a fuzz iteration costs no file system call.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use skiff::format::{digest_hex, DIGEST_LEN};
use skiff::storage::{BackendError, BlobBackend, Deadline};

/// Blobs by id.
#[derive(Default)]
pub struct MemBlobs {
    blobs: HashMap<[u8; DIGEST_LEN], Arc<Vec<u8>>>,
}

impl MemBlobs {
    /// The blob files of `dir`, each named by the hex of its id (as `--blob-dir` holds them).
    /// Files with other names are skipped.
    pub fn load_dir(dir: &Path) -> io::Result<Self> {
        let mut blobs = Self::default();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let mut id = [0u8; DIGEST_LEN];
            if hex_decode(name, &mut id) {
                blobs.insert(id, std::fs::read(&path)?);
            }
        }
        Ok(blobs)
    }

    /// Adds (or replaces) blob `id`.
    pub fn insert(&mut self, id: [u8; DIGEST_LEN], bytes: Vec<u8>) {
        self.blobs.insert(id, Arc::new(bytes));
    }

    /// How many blobs there are.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }
}

fn hex_decode(s: &str, out: &mut [u8; DIGEST_LEN]) -> bool {
    if s.len() != 2 * DIGEST_LEN {
        return false;
    }
    for (i, o) in out.iter_mut().enumerate() {
        match u8::from_str_radix(s.get(2 * i..2 * i + 2).unwrap_or("zz"), 16) {
            Ok(b) => *o = b,
            Err(_) => return false,
        }
    }
    true
}

impl BlobBackend for MemBlobs {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        _deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        let path = digest_hex(id);
        let blob = self.blobs.get(id).ok_or_else(|| BackendError::Io {
            op: "opening",
            path: path.clone(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        let end = offset.saturating_add(len as u64);
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?));
        range
            .and_then(|r| blob.get(r))
            .map(<[u8]>::to_vec)
            .ok_or(BackendError::ShortBlob { path, end })
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
