//! Recording what a workload reads: the files of an image in the order of their first read, the
//! list `skiff build --prefetch-list`, `skiff convert --prefetch-list`, `--prefetch-files` and
//! nydusd's `prefetch_files` take.
//!
//! The filesystem calls [`AccessRecorder::note`] on every read of a regular file. Only reads
//! count: metadata (lookups, stats, directory listings) is in the bootstrap, which a daemon has
//! before the first request, so a file that is only looked at needs nothing fetched. A file is
//! recorded once, at its first read; the kernel's page cache keeps later reads of it from the
//! daemon anyway. A read costs one relaxed load of a bit when the file is known, and the first
//! read of a file one atomic OR and a short lock.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::format::Bootstrap;

/// The files read through one mount, in first-read order.
pub struct AccessRecorder {
    /// One bit per inode: read at least once.
    seen: Vec<AtomicU64>,
    /// Inodes in the image.
    inodes: usize,
    /// Inode indices in the order of their first read.
    order: Mutex<Vec<u32>>,
}

/// Why a recorded list could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Writing the list failed.
    #[error("writing the access list {path}")]
    Write {
        /// The list file.
        path: String,
        /// The cause.
        #[source]
        source: crate::util::WriteError,
    },
}

/// A recorded list as text, and what could not go in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordedList {
    /// One absolute image path per line, in first-read order.
    pub text: String,
    /// Files in the list.
    pub files: usize,
    /// Files left out because no line of a list can name them: a path that is not UTF-8, that
    /// holds a line break, or that ends in white space (list readers trim lines).
    pub skipped: Vec<String>,
}

impl AccessRecorder {
    /// A recorder for an image of `inode_count` inodes.
    pub fn new(inode_count: usize) -> Self {
        Self {
            seen: (0..inode_count.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            inodes: inode_count,
            order: Mutex::new(Vec::new()),
        }
    }

    /// Notes a read of inode `index`; the first one puts the file on the list.
    #[inline]
    pub fn note(&self, index: u32) {
        if index as usize >= self.inodes {
            return;
        }
        let Some(word) = self.seen.get(index as usize / 64) else {
            return;
        };
        let bit = 1u64 << (index % 64);
        if word.load(Ordering::Relaxed) & bit != 0 {
            return;
        }
        // Of two first reads at once, exactly one sees the bit clear here.
        if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            crate::util::sync::lock(&self.order).push(index);
        }
    }

    /// The inode indices recorded so far, in first-read order.
    pub fn files(&self) -> Vec<u32> {
        crate::util::sync::lock(&self.order).clone()
    }

    /// How many files were recorded so far.
    pub fn len(&self) -> usize {
        crate::util::sync::lock(&self.order).len()
    }

    /// Whether nothing was read yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The list so far as text: each file's path in `bootstrap` (the first one of a hard-linked
    /// file), one per line.
    pub fn list(&self, bootstrap: &Bootstrap) -> RecordedList {
        let files = self.files();
        let paths = bootstrap.paths();
        let mut out = RecordedList::default();
        for index in files {
            let Some(p) = paths.get(index as usize).filter(|p| !p.is_empty()) else {
                continue;
            };
            match std::str::from_utf8(p) {
                Ok(s) if !s.contains(['\n', '\r']) && s.trim_end() == s && s.starts_with('/') => {
                    out.text.push_str(s);
                    out.text.push('\n');
                    out.files += 1;
                }
                _ => out.skipped.push(String::from_utf8_lossy(p).into_owned()),
            }
        }
        out
    }

    /// Writes the list so far to `path` (atomically: a reader sees the old list or the new
    /// one) and logs what it wrote.
    pub fn write(&self, bootstrap: &Bootstrap, path: &Path) -> Result<RecordedList, RecordError> {
        let list = self.list(bootstrap);
        crate::util::write_atomically(path, list.text.as_bytes()).map_err(|source| {
            RecordError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
        for s in &list.skipped {
            tracing::warn!(path = %s, "a recorded file has a name no list line can hold; left out");
        }
        tracing::info!(
            list = %path.display(),
            files = list.files,
            skipped = list.skipped.len(),
            "access list written"
        );
        Ok(list)
    }
}

impl std::fmt::Debug for AccessRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessRecorder")
            .field("files", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reads_in_order_each_once() {
        let r = AccessRecorder::new(200);
        for i in [5, 130, 5, 0, 199, 130, 64, 63] {
            r.note(i);
        }
        // Beyond the image: ignored, never a panic.
        r.note(200);
        r.note(u32::MAX);
        assert_eq!(r.files(), vec![5, 130, 0, 199, 64, 63]);
    }

    #[test]
    fn concurrent_first_reads_record_a_file_once() {
        let r = std::sync::Arc::new(AccessRecorder::new(1000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u32 {
                        r.note((i * 7 + t) % 1000);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let mut files = r.files();
        assert_eq!(files.len(), 1000);
        files.sort_unstable();
        files.dedup();
        assert_eq!(files.len(), 1000);
    }
}
