//! Making sure a missing chunk is fetched once: [`SingleFlight`] among the threads of one
//! process, [`ChunkFileLock`] (an `flock` on a per-chunk lock file) among processes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::format::ChunkDigest;
use crate::storage::Deadline;
use crate::util::sync::{lock, wait, wait_timeout};

/// The chunks some thread of this process is fetching, and who holds each.
///
/// A foreground claimant waits for a foreground holder (it is fetching what both need) until
/// its deadline, but for a background holder (fetch-ahead, prefetch) only
/// [`TAKEOVER_AFTER`]: then it takes the claim over and fetches the chunk itself, so that a
/// reader never waits long behind work nobody was waiting for.
#[derive(Default)]
pub struct SingleFlight {
    in_flight: Mutex<Holders>,
    done: Condvar,
}

#[derive(Default)]
struct Holders {
    by_chunk: HashMap<ChunkDigest, Holder>,
    next_generation: u64,
    /// Threads waiting in [`SingleFlight::claim`]: a released claim wakes them only if there
    /// are any, so that the common case (nobody else wants the chunk) costs no system call.
    waiters: usize,
}

#[derive(Clone, Copy)]
struct Holder {
    /// Which claim holds the chunk: a claim taken over is released by its new holder only.
    generation: u64,
    background: bool,
}

impl Holders {
    fn hold(&mut self, digest: ChunkDigest, background: bool) -> u64 {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.by_chunk.insert(
            digest,
            Holder {
                generation,
                background,
            },
        );
        generation
    }
}

/// How long a foreground read waits for background work (fetch-ahead, prefetch) fetching the
/// chunk it needs, before it fetches the chunk itself. A background fetch is one attempt of
/// at most 8 MiB; two seconds leave a slow link time to finish it (a second fetch of the same
/// bytes is waste), and bound what a stalled one costs a reader.
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(2);

/// The right to fetch one chunk in this process, given up on drop.
pub struct Claim<'a> {
    flights: &'a SingleFlight,
    digest: ChunkDigest,
    generation: u64,
    took_over: bool,
}

impl Claim<'_> {
    /// Whether this claim was taken over from background work still fetching the chunk
    /// (which may also hold the host's lock on it).
    pub fn took_over(&self) -> bool {
        self.took_over
    }
}

/// Why a claim could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// The deadline passed while another reader was fetching the chunk.
    DeadlinePassed,
}

impl SingleFlight {
    /// Claims `digest`, waiting while another thread holds it: until `deadline`, or, for a
    /// foreground claim behind background work, until [`TAKEOVER_AFTER`] has passed.
    pub fn claim(&self, digest: ChunkDigest, deadline: &Deadline) -> Result<Claim<'_>, ClaimError> {
        let background = deadline.is_background();
        let mut behind_background: Option<Instant> = None;
        let mut g = lock(&self.in_flight);
        loop {
            let holder = g.by_chunk.get(&digest).copied();
            let Some(holder) = holder else {
                let generation = g.hold(digest, background);
                return Ok(self.claim_of(digest, generation, false));
            };
            let mut wait_for = deadline.remaining();
            if holder.background && !background {
                let since = *behind_background.get_or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited >= TAKEOVER_AFTER {
                    let generation = g.hold(digest, false);
                    return Ok(self.claim_of(digest, generation, true));
                }
                let left = TAKEOVER_AFTER - waited;
                wait_for = Some(wait_for.map_or(left, |w| w.min(left)));
            } else {
                // Another holder (a new one, or a foreground one): the clock starts again.
                behind_background = None;
            }
            if wait_for.is_some_and(|w| w.is_zero()) {
                return Err(ClaimError::DeadlinePassed);
            }
            g.waiters += 1;
            g = match wait_for {
                None => wait(&self.done, g),
                Some(w) => wait_timeout(&self.done, g, w).0,
            };
            g.waiters -= 1;
        }
    }

    /// Claims `digest` if no other thread holds it.
    pub fn try_claim(&self, digest: ChunkDigest, deadline: &Deadline) -> Option<Claim<'_>> {
        let mut g = lock(&self.in_flight);
        // No Claim is built unless the entry is ours: dropping one removes its entry.
        if g.by_chunk.contains_key(&digest) {
            return None;
        }
        let generation = g.hold(digest, deadline.is_background());
        Some(self.claim_of(digest, generation, false))
    }

    fn claim_of(&self, digest: ChunkDigest, generation: u64, took_over: bool) -> Claim<'_> {
        Claim {
            flights: self,
            digest,
            generation,
            took_over,
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.flights.in_flight);
        // A claim taken over from this one belongs to its new holder now.
        if g.by_chunk
            .get(&self.digest)
            .is_some_and(|h| h.generation == self.generation)
        {
            g.by_chunk.remove(&self.digest);
        }
        if g.waiters > 0 {
            self.flights.done.notify_all();
        }
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

    /// Takes the lock at `path`, waiting for another holder until `until` (for ever with
    /// `None`); `Ok(None)` if it is still held then.
    ///
    /// A bounded wait polls (`flock` has no timeout), starting at 1 ms and backing off to
    /// 20 ms: a chunk fetch takes longer than that, so little is lost after it is stored.
    pub fn lock_until(path: PathBuf, until: Option<Instant>) -> std::io::Result<Option<Self>> {
        let file = Self::open(path.clone())?;
        let Some(until) = until else {
            Self::flock(&file, libc::LOCK_EX)?;
            return Ok(Some(Self { file, path }));
        };
        let mut pause = Duration::from_millis(1);
        loop {
            match Self::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => return Ok(Some(Self { file, path })),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
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
        let d = Deadline::none();
        let first = flights
            .try_claim(ChunkDigest::blake3([7; 32]), &d)
            .expect("first claim");
        // Used to deadlock (and, without the deadlock, drop the first claim's entry).
        assert!(flights
            .try_claim(ChunkDigest::blake3([7; 32]), &d)
            .is_none());
        assert!(flights
            .try_claim(ChunkDigest::blake3([7; 32]), &d)
            .is_none());
        // The same bytes as a sha256 digest are another chunk.
        let sha = ChunkDigest {
            algo: crate::format::DigestAlgo::Sha256,
            bytes: [7; 32],
        };
        let other = flights
            .try_claim(sha, &d)
            .expect("another algorithm, another chunk");
        drop(first);
        assert!(flights
            .try_claim(ChunkDigest::blake3([7; 32]), &d)
            .is_some());
        drop(other);
    }

    #[test]
    fn a_foreground_claim_waits_for_a_reader_until_its_deadline() {
        let flights = SingleFlight::default();
        let _held = flights
            .claim(ChunkDigest::blake3([1; 32]), &Deadline::none())
            .expect("claim");
        let t = Instant::now();
        let r = flights.claim(
            ChunkDigest::blake3([1; 32]),
            &Deadline::after(Duration::from_millis(50)),
        );
        assert!(matches!(r, Err(ClaimError::DeadlinePassed)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(
            t.elapsed() < TAKEOVER_AFTER,
            "no takeover from a foreground holder"
        );
    }

    #[test]
    fn a_foreground_claim_takes_over_from_stalled_background_work() {
        let flights = SingleFlight::default();
        let bg = Deadline::none().background();
        let held = flights
            .try_claim(ChunkDigest::blake3([2; 32]), &bg)
            .expect("background claim");
        let t = Instant::now();
        let mine = flights
            .claim(
                ChunkDigest::blake3([2; 32]),
                &Deadline::after(Duration::from_secs(30)),
            )
            .expect("taken over");
        let waited = t.elapsed();
        assert!(mine.took_over());
        assert!(
            waited >= TAKEOVER_AFTER && waited < TAKEOVER_AFTER * 2,
            "{waited:?}"
        );
        // The background job finishing does not release the reader's claim...
        drop(held);
        assert!(flights
            .try_claim(ChunkDigest::blake3([2; 32]), &bg)
            .is_none());
        // ...the reader's own release does.
        drop(mine);
        assert!(flights
            .try_claim(ChunkDigest::blake3([2; 32]), &bg)
            .is_some());
    }

    #[test]
    fn a_background_claim_released_early_lets_the_reader_in_at_once() {
        let flights = std::sync::Arc::new(SingleFlight::default());
        let f2 = flights.clone();
        let t = Instant::now();
        let waiter = std::thread::spawn(move || {
            // Wait until the background claim below is held.
            while f2
                .try_claim(ChunkDigest::blake3([3; 32]), &Deadline::none())
                .is_some()
            {
                std::thread::yield_now();
            }
            let c = f2
                .claim(
                    ChunkDigest::blake3([3; 32]),
                    &Deadline::after(Duration::from_secs(30)),
                )
                .expect("claim");
            c.took_over()
        });
        let held = flights
            .try_claim(ChunkDigest::blake3([3; 32]), &Deadline::none().background())
            .expect("claim");
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
        assert!(!waiter.join().expect("waiter"), "released, not taken over");
        assert!(t.elapsed() < TAKEOVER_AFTER);
    }

    #[test]
    fn a_bounded_host_lock_wait_gives_up_in_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("lock");
        let held = ChunkFileLock::lock_until(p.clone(), None)
            .expect("lock")
            .expect("held");
        let t = Instant::now();
        let until = Some(Instant::now() + Duration::from_millis(60));
        assert!(ChunkFileLock::lock_until(p.clone(), until)
            .expect("lock")
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(60));
        held.done();
        assert!(ChunkFileLock::lock_until(p, until).expect("lock").is_some());
    }
}
