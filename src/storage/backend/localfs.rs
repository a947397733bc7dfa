//! The local backend: a directory holding blob files named by their hex digest.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::{BackendError, BlobBackend};
use crate::format::{digest_hex, DIGEST_LEN};

/// Blobs in a local directory, opened on first use and kept open.
pub struct LocalFsBackend {
    dir: PathBuf,
    files: RwLock<HashMap<[u8; DIGEST_LEN], Arc<File>>>,
}

impl LocalFsBackend {
    /// A backend over the blob directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: RwLock::new(HashMap::new()),
        }
    }

    /// The path of blob `id`.
    pub fn blob_path(&self, id: &[u8; DIGEST_LEN]) -> PathBuf {
        self.dir.join(digest_hex(id))
    }

    fn open(&self, id: &[u8; DIGEST_LEN]) -> Result<Arc<File>, BackendError> {
        if let Some(f) = self.files.read().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(f);
        }
        let path = self.blob_path(id);
        let f = Arc::new(File::open(&path).map_err(|source| BackendError::Io {
            op: "opening blob",
            path: path.display().to_string(),
            source,
        })?);
        if let Ok(mut m) = self.files.write() {
            m.insert(*id, f.clone());
        }
        Ok(f)
    }
}

impl BlobBackend for LocalFsBackend {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        let f = self.open(id)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).map_err(|source| {
            let path = self.blob_path(id).display().to_string();
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                BackendError::ShortBlob {
                    path,
                    end: offset.saturating_add(len as u64),
                }
            } else {
                BackendError::Io {
                    op: "reading blob",
                    path,
                    source,
                }
            }
        })?;
        Ok(buf)
    }

    fn name(&self) -> &'static str {
        "localfs"
    }
}
