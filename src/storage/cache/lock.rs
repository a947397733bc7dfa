//! Making sure a missing chunk is fetched once: [`SingleFlight`] among the threads of one
//! process, [`ChunkFileLock`] (an `flock` on a per-chunk lock file) among processes.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

use crate::format::ChunkDigest;

/// The set of chunks some thread of this process is fetching.
#[derive(Default)]
pub struct SingleFlight {
    in_flight: Mutex<HashSet<ChunkDigest>>,
    done: Condvar,
}

/// The right to fetch one chunk in this process, given up on drop.
pub struct Claim<'a> {
    flights: &'a SingleFlight,
    digest: ChunkDigest,
}

impl SingleFlight {
    /// Claims `digest`, waiting while another thread holds it.
    pub fn claim(&self, digest: ChunkDigest) -> Claim<'_> {
        let mut g = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while g.contains(&digest) {
            g = self.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.insert(digest);
        Claim {
            flights: self,
            digest,
        }
    }

    /// Claims `digest` if no other thread holds it.
    pub fn try_claim(&self, digest: ChunkDigest) -> Option<Claim<'_>> {
        let mut g = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        // Not `then_some`: it would build (and so drop) a Claim even when another thread holds
        // the chunk, and that drop takes this same lock and removes the other thread's claim.
        if g.insert(digest) {
            Some(Claim {
                flights: self,
                digest,
            })
        } else {
            None
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut g = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        g.remove(&self.digest);
        self.flights.done.notify_all();
    }
}

/// An exclusive `flock` on a chunk's lock file, held while the chunk is fetched and stored.
///
/// The lock goes with the file descriptor, so a process killed with `-9` drops it. Whoever gets
/// the lock must look in the cache again before fetching: the previous holder may have stored
/// the chunk. After a successful store the holder unlinks the lock file ([`ChunkFileLock::done`]);
/// a waiter that opened the old file then finds the chunk cached, and a newcomer creates a
/// fresh lock file and finds it too. After a failure the file stays, so that waiters keep
/// queueing on the same lock.
pub struct ChunkFileLock {
    file: File,
    path: PathBuf,
}

impl ChunkFileLock {
    fn open(path: PathBuf) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
    }

    fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
        loop {
            // SAFETY: flock on a descriptor this function borrows for the call; no memory is
            // passed to the kernel.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Takes the lock at `path`, waiting for another holder.
    pub fn lock(path: PathBuf) -> std::io::Result<Self> {
        let file = Self::open(path.clone())?;
        Self::flock(&file, libc::LOCK_EX)?;
        Ok(Self { file, path })
    }

    /// Takes the lock at `path` if nobody holds it.
    pub fn try_lock(path: PathBuf) -> std::io::Result<Option<Self>> {
        let file = Self::open(path.clone())?;
        match Self::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(Self { file, path })),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The chunk is stored: removes the lock file, then releases the lock.
    pub fn done(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_claim_survives_a_failed_try_claim() {
        let flights = SingleFlight::default();
        let d = ChunkDigest::blake3([7; 32]);
        let first = flights.try_claim(d).expect("first claim");
        // Used to deadlock (and, without the deadlock, drop the first claim's entry).
        assert!(flights.try_claim(d).is_none());
        assert!(flights.try_claim(d).is_none());
        // The same bytes as a sha256 digest are another chunk.
        let sha = ChunkDigest {
            algo: crate::format::DigestAlgo::Sha256,
            bytes: [7; 32],
        };
        let other = flights
            .try_claim(sha)
            .expect("another algorithm, another chunk");
        drop(first);
        assert!(flights.try_claim(d).is_some());
        drop(other);
    }
}
