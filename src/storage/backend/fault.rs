//! A fault-injecting backend wrapper for tests: errors, short replies, flipped bits and stalls,
//! taken from a queue in order (one per request) and then, optionally, at random.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{BackendError, BlobBackend};
use crate::format::DIGEST_LEN;
use crate::storage::Deadline;
use crate::util::sync::lock;

/// What to do to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Fail with a retryable error.
    Error,
    /// Return all but the last byte (or nothing for a one-byte range).
    Short,
    /// Flip one bit in the middle of the reply.
    BitFlip,
    /// Wait this long, then answer normally.
    Stall(Duration),
}

/// Wraps a backend and applies [`Fault`]s to its replies.
pub struct FaultyBackend<B> {
    inner: B,
    queue: Mutex<VecDeque<Fault>>,
    /// Offsets whose reads always stall, and for how long.
    stalls: Mutex<Vec<(u64, Duration)>>,
    /// Per mille of requests, after the queue is empty, that get a random fault.
    random_per_mille: AtomicU64,
    rng: AtomicU64,
    requests: AtomicU64,
}

impl<B: BlobBackend> FaultyBackend<B> {
    /// Wraps `inner` with no faults queued.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            queue: Mutex::new(VecDeque::new()),
            stalls: Mutex::new(Vec::new()),
            random_per_mille: AtomicU64::new(0),
            rng: AtomicU64::new(0x2545_f491_4f6c_dd1d),
            requests: AtomicU64::new(0),
        }
    }

    /// Queues faults for the next requests, in order.
    pub fn push(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.queue).extend(faults);
    }

    /// Makes every read whose range covers byte `offset` of a blob stall for `d` (a slow
    /// chunk behind a slow network), beside the queued faults.
    pub fn stall_at(&self, offset: u64, d: Duration) {
        lock(&self.stalls).push((offset, d));
    }

    /// Gives a random fault (error, short, bit flip) to `per_mille` of the requests made once the
    /// queue is empty.
    pub fn set_random(&self, per_mille: u64) {
        self.random_per_mille.store(per_mille, Ordering::Relaxed);
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn next_fault(&self) -> Fault {
        if let Some(f) = lock(&self.queue).pop_front() {
            return f;
        }
        let p = self.random_per_mille.load(Ordering::Relaxed);
        if p == 0 {
            return Fault::None;
        }
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        if x % 1000 >= p {
            return Fault::None;
        }
        match (x >> 20) % 3 {
            0 => Fault::Error,
            1 => Fault::Short,
            _ => Fault::BitFlip,
        }
    }
}

impl<B: BlobBackend> BlobBackend for FaultyBackend<B> {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let end = offset.saturating_add(len as u64);
        let stall = lock(&self.stalls)
            .iter()
            .find(|(at, _)| (offset..end).contains(at))
            .map(|(_, d)| *d);
        let fault = match stall {
            Some(d) => Fault::Stall(d),
            None => self.next_fault(),
        };
        match fault {
            Fault::Error => return Err(BackendError::Injected("error")),
            // As a remote backend's timeout would, the deadline cuts a stall short.
            Fault::Stall(d) if deadline.cap(d) < d => {
                std::thread::sleep(deadline.cap(d));
                return Err(BackendError::Injected("stall cut short by the deadline"));
            }
            Fault::Stall(d) => std::thread::sleep(d),
            _ => {}
        }
        let mut bytes = self.inner.read_range(id, offset, len, deadline)?;
        match fault {
            Fault::Short => {
                bytes.pop();
            }
            Fault::BitFlip => {
                let mid = bytes.len() / 2;
                if let Some(b) = bytes.get_mut(mid) {
                    *b ^= 0x10;
                }
            }
            _ => {}
        }
        Ok(bytes)
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }
}
