//! Memory that cannot change: a memfd sealed against writes, growth and shrinking, mapped
//! read-only. A validated bootstrap is moved into one so that other daemons of the node can map
//! the same pages (see `crate::share`) and still rely on what they validated: no process, not
//! even the one that made it, can change a byte of it afterwards, or cut it short under a
//! reader's mapping.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// The seals a sealed region must carry: no write (`write(2)`, writable shared mappings, hole
/// punching), no shrinking (which would turn a reader's mapping into SIGBUS) and no growing.
pub const REQUIRED_SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Why a descriptor was refused as sealed memory.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A system call on the descriptor failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Not a regular file (a memfd is one).
    #[error("not a regular file (mode {0:o})")]
    NotRegular(u32),
    /// The file does not carry the seals that make it immutable.
    #[error("not sealed against writes, shrinking and growing (seals {0:#x})")]
    NotSealed(libc::c_int),
    /// The size is zero or above the limit.
    #[error("{len} bytes, outside 1..={max}")]
    BadSize {
        /// The file's size.
        len: u64,
        /// The largest accepted.
        max: u64,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> SealError {
    move |source| SealError::Io { op, source }
}

/// A read-only mapping of a sealed memfd, and the descriptor (to hand to other processes).
pub struct SealedBytes {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and its contents can never change (the seals forbid every
// write, and the mapping lives as long as `self`), so sharing the pointer between threads is as
// safe as sharing a `&[u8]`.
unsafe impl Send for SealedBytes {}
// SAFETY: as above: only reads of immutable memory are possible through `&SealedBytes`.
unsafe impl Sync for SealedBytes {}

impl std::fmt::Debug for SealedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedBytes")
            .field("fd", &self.fd.as_raw_fd())
            .field("len", &self.len)
            .finish()
    }
}

impl SealedBytes {
    /// Writes `parts` one after the other into a new memfd named `name` (shown in
    /// `/proc/PID/maps` as `/memfd:NAME`), seals it, and maps it.
    pub fn create(name: &str, parts: &[&[u8]]) -> Result<Self, SealError> {
        let cname = std::ffi::CString::new(name).map_err(|_| SealError::Io {
            op: "memfd name",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io_err("memfd_create")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor just returned to us and owned by nobody else.
        let file = unsafe { File::from_raw_fd(raw) };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        file.set_len(len as u64)
            .map_err(io_err("sizing the memfd"))?;
        let mut at = 0u64;
        for p in parts {
            file.write_all_at(p, at)
                .map_err(io_err("writing the memfd"))?;
            at += p.len() as u64;
        }
        // Written with write(2), never mapped writable, so the write seal cannot fail on a
        // writable mapping; F_SEAL_SEAL keeps the set of seals as it is.
        // SAFETY: fcntl with F_ADD_SEALS takes an integer argument and touches no memory.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                REQUIRED_SEALS | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io_err("sealing the memfd")(io::Error::last_os_error()));
        }
        Self::from_fd(OwnedFd::from(file), len as u64)
    }

    /// Takes `fd` (received from another process, so untrusted) as sealed memory of at most
    /// `max_len` bytes: it must be a regular file carrying [`REQUIRED_SEALS`]; it is then
    /// mapped read-only. The seals cannot be removed, so what the caller validates in the
    /// mapping stays true for as long as it holds it.
    pub fn from_fd(fd: OwnedFd, max_len: u64) -> Result<Self, SealError> {
        // SAFETY: fcntl with F_GET_SEALS takes no pointer; a descriptor that is not a memfd
        // gives EINVAL.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(io_err("reading the seals")(io::Error::last_os_error()));
        }
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(SealError::NotSealed(seals));
        }
        let file = File::from(fd);
        let meta = file.metadata().map_err(io_err("fstat"))?;
        if !meta.file_type().is_file() {
            return Err(SealError::NotRegular(std::os::unix::fs::MetadataExt::mode(
                &meta,
            )));
        }
        // Sealed against shrinking and growing: this size is the size for good.
        let len64 = meta.len();
        if len64 == 0 || len64 > max_len {
            return Err(SealError::BadSize {
                len: len64,
                max: max_len,
            });
        }
        let len = usize::try_from(len64).map_err(|_| SealError::BadSize {
            len: len64,
            max: max_len,
        })?;
        // SAFETY: a new read-only shared mapping of `len` bytes of a file at least that long
        // (sealed against shrinking), at an address the kernel picks; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io_err("mapping")(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| SealError::Io {
            op: "mapping",
            source: io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        Ok(Self {
            fd: OwnedFd::from(file),
            ptr,
            len,
        })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives, and the seals
        // guarantee nobody changes them (so no `&mut` aliasing can exist anywhere).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The descriptor, to send to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SealedBytes {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `from_fd`, which nothing borrows any
        // more (borrows of `bytes()` cannot outlive `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(seals: libc::c_int, data: &[u8]) -> OwnedFd {
        let name = std::ffi::CString::new("skiff-test").expect("name");
        // SAFETY: as in `create`.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0);
        // SAFETY: a new descriptor we own.
        let f = unsafe { File::from_raw_fd(raw) };
        f.write_all_at(data, 0).expect("write");
        if seals != 0 {
            // SAFETY: as in `create`.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(r, 0);
        }
        OwnedFd::from(f)
    }

    #[test]
    fn created_bytes_read_back_and_cannot_be_written() {
        let s = SealedBytes::create("skiff-test", &[b"hello ", b"world"]).expect("create");
        assert_eq!(s.bytes(), b"hello world");
        // SAFETY: as in `from_fd`.
        let seals = unsafe { libc::fcntl(s.fd().as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & REQUIRED_SEALS, REQUIRED_SEALS);
        // Through another descriptor of the same file (what a peer would get): no write.
        let path = format!("/proc/self/fd/{}", s.fd().as_raw_fd());
        let f = std::fs::OpenOptions::new().write(true).open(&path);
        if let Ok(f) = f {
            assert!(
                f.write_all_at(b"X", 0).is_err(),
                "a sealed memfd took a write"
            );
            assert!(f.set_len(1).is_err(), "a sealed memfd was truncated");
        }
        assert_eq!(s.bytes(), b"hello world");
    }

    #[test]
    fn unsealed_or_partly_sealed_memfds_and_plain_files_are_refused() {
        let e = SealedBytes::from_fd(memfd(0, b"data"), 1 << 20).expect_err("unsealed");
        assert!(matches!(e, SealError::NotSealed(_)), "{e}");
        let e = SealedBytes::from_fd(
            memfd(libc::F_SEAL_SHRINK | libc::F_SEAL_GROW, b"data"),
            1 << 20,
        )
        .expect_err("writable");
        assert!(matches!(e, SealError::NotSealed(_)), "{e}");
        let tmp = tempfile::tempfile().expect("tempfile");
        let e = SealedBytes::from_fd(OwnedFd::from(tmp), 1 << 20).expect_err("plain file");
        assert!(matches!(e, SealError::Io { .. }), "{e}");
        let e = SealedBytes::from_fd(memfd(REQUIRED_SEALS, b"data"), 3).expect_err("too big");
        assert!(matches!(e, SealError::BadSize { len: 4, .. }), "{e}");
        let e = SealedBytes::from_fd(memfd(REQUIRED_SEALS, b""), 3).expect_err("empty");
        assert!(matches!(e, SealError::BadSize { len: 0, .. }), "{e}");
        let ok = SealedBytes::from_fd(memfd(REQUIRED_SEALS, b"data"), 4).expect("sealed");
        assert_eq!(ok.bytes(), b"data");
    }
}
