//! A slow disk for tests: a read-only FUSE mount of one host directory's files in which reads
//! of a chosen byte range of a chosen file stall for a while, as a chunk behind a slow
//! network does. Served in-process by Skiff's own FUSE transport.
//!
//! Files are opened with direct I/O, so that every read reaches this filesystem (the host's
//! page cache never answers for it) and a stall is seen whenever the range is read.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{stat64, OpenOptions};
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem, FsOptions, ZeroCopyWriter};
use skiff::runtime::{ExitEvent, ExitReason};

/// Reads of `file` overlapping `range` stall for `pause`.
#[derive(Clone, Debug)]
pub struct Stall {
    pub file: String,
    pub range: std::ops::Range<u64>,
    pub pause: Duration,
}

struct StallFs {
    dir: PathBuf,
    /// Inode (2, 3, ...) to file name; 1 is the root.
    names: Vec<String>,
    by_name: HashMap<String, u64>,
    stall: Stall,
    stalled: Arc<AtomicU64>,
}

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(60);

impl StallFs {
    fn path(&self, ino: u64) -> io::Result<PathBuf> {
        let i = ino
            .checked_sub(2)
            .and_then(|i| self.names.get(i as usize))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        Ok(self.dir.join(i))
    }

    fn stat(&self, ino: u64) -> io::Result<stat64> {
        let meta = if ino == ROOT {
            fs::metadata(&self.dir)?
        } else {
            fs::metadata(self.path(ino)?)?
        };
        // SAFETY: stat64 is plain old data; all zeroes is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        st.st_ino = ino;
        st.st_mode = meta.mode();
        st.st_nlink = 1;
        st.st_size = meta.size() as i64;
        st.st_blksize = 4096;
        st.st_blocks = meta.blocks() as i64;
        st.st_mtime = meta.mtime();
        Ok(st)
    }
}

/// Every read may stall: each goes to a worker, none is answered on the reader thread.
impl skiff::fs::ReadReadiness for StallFs {
    fn read_ready(&self, _ino: u64, _offset: u64, _size: u32) -> bool {
        false
    }
}

impl FileSystem for StallFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, _: FsOptions) -> io::Result<FsOptions> {
        Ok(FsOptions::empty())
    }

    fn lookup(&self, _: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let ino = name
            .to_str()
            .ok()
            .filter(|_| parent == ROOT)
            .and_then(|n| self.by_name.get(n).copied())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        Ok(Entry {
            inode: ino,
            generation: 0,
            attr: self.stat(ino)?,
            attr_flags: 0,
            attr_timeout: TTL,
            entry_timeout: TTL,
        })
    }

    fn getattr(&self, _: &Context, ino: u64, _: Option<u64>) -> io::Result<(stat64, Duration)> {
        Ok((self.stat(ino)?, TTL))
    }

    fn open(
        &self,
        _: &Context,
        ino: u64,
        _: u32,
        _: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.path(ino)?;
        Ok((None, OpenOptions::DIRECT_IO, None))
    }

    fn release(
        &self,
        _: &Context,
        _: u64,
        _: u32,
        _: u64,
        _: bool,
        _: bool,
        _: Option<u64>,
    ) -> io::Result<()> {
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _: &Context,
        ino: u64,
        _: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _: Option<u64>,
        _: u32,
    ) -> io::Result<usize> {
        let path = self.path(ino)?;
        let end = offset + u64::from(size);
        let name = &self.names[(ino - 2) as usize];
        if *name == self.stall.file && offset < self.stall.range.end && self.stall.range.start < end
        {
            self.stalled.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.stall.pause);
        }
        let file = fs::File::open(path)?;
        let mut buf = vec![0u8; size as usize];
        let n = file.read_at(&mut buf, offset)?;
        w.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// A running slow-disk mount; unmounted on drop.
pub struct StallMount {
    pub mountpoint: PathBuf,
    /// Reads that stalled so far.
    pub stalled: Arc<AtomicU64>,
    exit: ExitEvent,
    thread: Option<JoinHandle<()>>,
}

impl StallMount {
    /// Serves the regular files of `dir` at `mountpoint` (created), stalling as `stall` says.
    pub fn start(dir: &Path, mountpoint: &Path, stall: Stall) -> StallMount {
        fs::create_dir_all(mountpoint).expect("stallfs mountpoint");
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("stallfs dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        let by_name = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u64 + 2))
            .collect();
        let stalled = Arc::new(AtomicU64::new(0));
        let fs = StallFs {
            dir: dir.to_owned(),
            names,
            by_name,
            stall,
            stalled: stalled.clone(),
        };
        let exit = ExitEvent::new().expect("exit event");
        let opts = skiff::fuse::MountOptions {
            mountpoint: mountpoint.to_owned(),
            // Reads of other ranges go on while one stalls.
            threads: skiff::fuse::FuseThreads {
                readers: 1,
                workers: 4,
            },
        };
        let e2 = exit.clone();
        let thread = std::thread::spawn(move || {
            if let Err(e) = skiff::fuse::serve_until(Arc::new(fs), &opts, &e2) {
                eprintln!("stallfs: {e}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::common::is_mounted(mountpoint) {
            assert!(Instant::now() < deadline, "stallfs did not mount");
            std::thread::sleep(Duration::from_millis(10));
        }
        StallMount {
            mountpoint: mountpoint.to_owned(),
            stalled,
            exit,
            thread: Some(thread),
        }
    }
}

impl Drop for StallMount {
    fn drop(&mut self) {
        self.exit.notify(ExitReason::Requested);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
