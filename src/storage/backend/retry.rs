//! A backend wrapper that retries retryable failures with exponential backoff and jitter, bounds
//! the number of requests in flight, and counts traffic into [`Metrics`].
//!
//! Timeouts belong to the wrapped backend (an HTTP client's read timeout, say); this wrapper
//! decides only whether and when to ask again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{BackendError, BlobBackend};
use crate::format::DIGEST_LEN;
use crate::storage::metrics::{add, inc, Metrics};
use crate::storage::Deadline;
use crate::util::sync::{lock, wait, wait_timeout};

/// How [`RetryingBackend`] retries and how many requests it lets run at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (at least 1).
    pub attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub base_delay: Duration,
    /// Longest delay between two attempts.
    pub max_delay: Duration,
    /// Requests in flight at once, over all threads.
    pub max_in_flight: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            max_in_flight: 16,
        }
    }
}

/// A counting semaphore over a mutex and a condition variable, with permits kept for
/// foreground requests: background work (fetch-ahead, prefetch) never takes the last
/// [`Semaphore::reserved`] ones, so a reader always finds a slot free of it.
pub struct Semaphore {
    state: Mutex<Permits>,
    cv: Condvar,
    reserved: usize,
}

struct Permits {
    free: usize,
    /// Threads waiting for a permit: a permit given back wakes them only if there are any, so
    /// that a request that found a free permit costs no system call.
    waiters: usize,
}

/// A permit of a [`Semaphore`], given back on drop.
pub struct Permit<'a>(&'a Semaphore);

impl Semaphore {
    /// A semaphore with `n` permits (at least one), a quarter of them (at least one, when
    /// there are two or more) kept for the foreground.
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        Self {
            state: Mutex::new(Permits {
                free: n,
                waiters: 0,
            }),
            cv: Condvar::new(),
            reserved: if n >= 2 { (n / 4).max(1) } else { 0 },
        }
    }

    /// Permits background work may not take.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Waits for a permit until `deadline`; `None` if it passed first.
    pub fn acquire(&self, deadline: &Deadline) -> Option<Permit<'_>> {
        let keep = if deadline.is_background() {
            self.reserved
        } else {
            0
        };
        let mut g = lock(&self.state);
        while g.free <= keep {
            let left = deadline.remaining();
            if left.is_some_and(|l| l.is_zero()) {
                return None;
            }
            g.waiters += 1;
            g = match left {
                None => wait(&self.cv, g),
                Some(left) => wait_timeout(&self.cv, g, left).0,
            };
            g.waiters -= 1;
        }
        g.free -= 1;
        Some(Permit(self))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.0.state);
        g.free += 1;
        // All: a background waiter woken alone could not take a reserved permit, and the
        // foreground waiter that could would sleep on.
        if g.waiters > 0 {
            self.0.cv.notify_all();
        }
    }
}

/// Wraps a backend with retries, a bound on requests in flight and traffic metrics.
pub struct RetryingBackend<B> {
    inner: B,
    policy: RetryPolicy,
    in_flight: Semaphore,
    metrics: Arc<Metrics>,
    jitter_state: AtomicU64,
}

impl<B: BlobBackend> RetryingBackend<B> {
    /// Wraps `inner`, counting into `metrics`.
    pub fn new(inner: B, policy: RetryPolicy, metrics: Arc<Metrics>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(std::process::id());
        Self {
            in_flight: Semaphore::new(policy.max_in_flight),
            inner,
            policy,
            metrics,
            jitter_state: AtomicU64::new(seed | 1),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// A random number for jitter (xorshift; quality does not matter here).
    fn random(&self) -> u64 {
        let mut x = self.jitter_state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_state.store(x, Ordering::Relaxed);
        x
    }

    /// The delay before retry number `retry` (1-based): full jitter over an exponential bound.
    fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .policy
            .base_delay
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let bound = exp.min(self.policy.max_delay).as_micros().max(1) as u64;
        // Half fixed, half random: never zero, never the same for every client.
        Duration::from_micros(bound / 2 + self.random() % (bound / 2 + 1))
    }
}

impl<B: BlobBackend> BlobBackend for RetryingBackend<B> {
    /// Tries the request until it succeeds, fails for good, runs out of attempts or of time.
    /// Background requests get one attempt: a failed fetch-ahead costs a reader nothing but
    /// its own fetch, and its claims are given back at once.
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        let what = || {
            format!(
                "{} blob {} bytes {offset}+{len}",
                self.inner.name(),
                crate::format::digest_hex(id)
            )
        };
        let attempts = if deadline.is_background() {
            1
        } else {
            self.policy.attempts.max(1)
        };
        let mut attempt = 1;
        loop {
            let result = {
                let Some(_permit) = self.in_flight.acquire(deadline) else {
                    return Err(BackendError::DeadlineExceeded {
                        what: what(),
                        waiting: "waiting for a free backend request slot",
                    });
                };
                inc(&self.metrics.backend_requests);
                let start = Instant::now();
                let r = self.inner.read_range(id, offset, len, deadline);
                self.metrics.observe_latency(start.elapsed());
                r
            };
            let e = match result {
                Ok(bytes) => {
                    add(&self.metrics.backend_bytes, bytes.len() as u64);
                    return Ok(bytes);
                }
                Err(e) => e,
            };
            inc(&self.metrics.backend_errors);
            if !e.is_retryable() || attempt >= attempts {
                return Err(e);
            }
            let d = self.delay(attempt);
            // Sleeping through the rest of the deadline only to give up after it helps
            // nobody: the read fails now, with the error that ended it.
            if deadline.remaining().is_some_and(|left| left <= d) {
                tracing::warn!(
                    backend = self.inner.name(),
                    blob = %crate::format::digest_hex(id),
                    offset, len, attempt,
                    error = %crate::util::error_chain(&e),
                    "backend request failed; no time left before the request deadline to retry"
                );
                return Err(e);
            }
            tracing::warn!(
                backend = self.inner.name(),
                blob = %crate::format::digest_hex(id),
                offset, len, attempt,
                retry_in_ms = d.as_millis() as u64,
                error = %crate::util::error_chain(&e),
                "backend request failed; retrying"
            );
            inc(&self.metrics.backend_retries);
            std::thread::sleep(d);
            attempt += 1;
        }
    }

    /// As [`Self::read_range`] does, with each retry asking only for what the failed attempt
    /// did not deliver: bytes handed to `sink` are never handed over twice.
    fn read_range_streaming(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), BackendError> {
        let what = || {
            format!(
                "{} blob {} bytes {offset}+{len}",
                self.inner.name(),
                crate::format::digest_hex(id)
            )
        };
        let attempts = if deadline.is_background() {
            1
        } else {
            self.policy.attempts.max(1)
        };
        let mut got = 0usize;
        let mut attempt = 1;
        loop {
            let result = {
                let Some(_permit) = self.in_flight.acquire(deadline) else {
                    return Err(BackendError::DeadlineExceeded {
                        what: what(),
                        waiting: "waiting for a free backend request slot",
                    });
                };
                inc(&self.metrics.backend_requests);
                let start = Instant::now();
                let before = got;
                let r = self.inner.read_range_streaming(
                    id,
                    offset + got as u64,
                    len.saturating_sub(got),
                    deadline,
                    &mut |b: &[u8]| {
                        got += b.len();
                        sink(b);
                    },
                );
                add(&self.metrics.backend_bytes, (got - before) as u64);
                self.metrics.observe_latency(start.elapsed());
                r
            };
            let e = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            inc(&self.metrics.backend_errors);
            if !e.is_retryable() || attempt >= attempts || got >= len {
                return Err(e);
            }
            let d = self.delay(attempt);
            if deadline.remaining().is_some_and(|left| left <= d) {
                tracing::warn!(
                    backend = self.inner.name(),
                    blob = %crate::format::digest_hex(id),
                    offset, len, got, attempt,
                    error = %crate::util::error_chain(&e),
                    "streamed backend request failed; no time left before the request deadline to retry"
                );
                return Err(e);
            }
            tracing::warn!(
                backend = self.inner.name(),
                blob = %crate::format::digest_hex(id),
                offset, len, got, attempt,
                retry_in_ms = d.as_millis() as u64,
                error = %crate::util::error_chain(&e),
                "streamed backend request failed; retrying the rest"
            );
            inc(&self.metrics.backend_retries);
            std::thread::sleep(d);
            attempt += 1;
        }
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::backend::fault::{Fault, FaultyBackend};

    struct Bytes(Vec<u8>);
    impl BlobBackend for Bytes {
        fn read_range(
            &self,
            _: &[u8; 32],
            o: u64,
            l: usize,
            _: &Deadline,
        ) -> Result<Vec<u8>, BackendError> {
            let o = o as usize;
            self.0
                .get(o..o + l)
                .map(<[u8]>::to_vec)
                .ok_or(BackendError::Config("range".into()))
        }
        fn name(&self) -> &'static str {
            "bytes"
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_in_flight: 2,
        }
    }

    #[test]
    fn retries_retryable_errors_then_gives_up() {
        let m = Arc::new(Metrics::default());
        let f = FaultyBackend::new(Bytes(vec![7; 100]));
        f.push([Fault::Error, Fault::Error]);
        let r = RetryingBackend::new(f, fast(), m.clone());
        assert_eq!(
            r.read_range(&[0; 32], 10, 5, &Deadline::none())
                .expect("read"),
            vec![7; 5]
        );
        assert_eq!(m.backend_retries.load(Ordering::Relaxed), 2);
        r.inner().push([Fault::Error; 4]);
        assert!(r.read_range(&[0; 32], 10, 5, &Deadline::none()).is_err());
        // A final error is not retried.
        let before = m.backend_requests.load(Ordering::Relaxed);
        assert!(r.read_range(&[0; 32], 99, 5, &Deadline::none()).is_err());
        assert_eq!(m.backend_requests.load(Ordering::Relaxed), before + 1);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let r = RetryingBackend::new(Bytes(vec![]), RetryPolicy::default(), Arc::default());
        for retry in 1..20 {
            let d = r.delay(retry);
            assert!(d <= Duration::from_secs(2), "{d:?}");
            assert!(d >= Duration::from_millis(25).min(r.policy.max_delay / 2));
        }
    }

    #[test]
    fn the_deadline_bounds_retries_and_their_backoff() {
        let f = FaultyBackend::new(Bytes(vec![7; 100]));
        f.push([Fault::Error; 100]);
        let slow = RetryPolicy {
            attempts: 100,
            base_delay: Duration::from_millis(40),
            max_delay: Duration::from_millis(40),
            max_in_flight: 2,
        };
        let r = RetryingBackend::new(f, slow, Arc::default());
        let t = Instant::now();
        let e = r
            .read_range(&[0; 32], 0, 5, &Deadline::after(Duration::from_millis(150)))
            .expect_err("always failing");
        // The injected error itself, not a hang: given up once a retry no longer fits.
        assert!(matches!(e, BackendError::Injected(_)), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        assert!(r.inner().requests() < 10);
    }

    #[test]
    fn background_requests_make_one_attempt() {
        let m = Arc::new(Metrics::default());
        let f = FaultyBackend::new(Bytes(vec![7; 100]));
        f.push([Fault::Error]);
        let r = RetryingBackend::new(f, fast(), m.clone());
        let bg = Deadline::none().background();
        assert!(r.read_range(&[0; 32], 0, 5, &bg).is_err());
        assert_eq!(r.inner().requests(), 1);
        assert_eq!(m.backend_retries.load(Ordering::Relaxed), 0);
        assert!(r.read_range(&[0; 32], 0, 5, &bg).is_ok());
    }

    #[test]
    fn background_work_leaves_slots_for_readers() {
        let sem = Semaphore::new(4);
        assert_eq!(sem.reserved(), 1);
        let bg = Deadline::after(Duration::from_millis(30)).background();
        let held: Vec<_> = (0..3)
            .map(|_| sem.acquire(&bg).expect("free slot"))
            .collect();
        // The last slot is the foreground's: background work times out waiting for it...
        assert!(sem.acquire(&bg).is_none());
        // ...and a reader gets it at once.
        let fg = sem.acquire(&Deadline::after(Duration::from_millis(30)));
        assert!(fg.is_some());
        assert!(sem
            .acquire(&Deadline::after(Duration::from_millis(10)))
            .is_none());
        drop(held);
        assert!(
            Semaphore::new(1).acquire(&bg).is_some(),
            "one slot is never reserved"
        );
    }

    /// Streams its bytes, failing once after `fail_after` bytes of the first request.
    struct Breaks {
        data: Vec<u8>,
        fail_after: usize,
        asked: Mutex<Vec<(u64, usize)>>,
    }
    impl BlobBackend for Breaks {
        fn read_range(
            &self,
            _: &[u8; 32],
            _: u64,
            _: usize,
            _: &Deadline,
        ) -> Result<Vec<u8>, BackendError> {
            Err(BackendError::Config("streaming only".into()))
        }
        fn read_range_streaming(
            &self,
            _: &[u8; 32],
            o: u64,
            l: usize,
            _: &Deadline,
            sink: &mut dyn FnMut(&[u8]),
        ) -> Result<(), BackendError> {
            let first = {
                let mut a = crate::util::sync::lock(&self.asked);
                a.push((o, l));
                a.len() == 1
            };
            let o = o as usize;
            if first {
                sink(&self.data[o..o + self.fail_after]);
                return Err(BackendError::Injected("reset mid-body"));
            }
            sink(&self.data[o..o + l]);
            Ok(())
        }
        fn name(&self) -> &'static str {
            "breaks"
        }
    }

    #[test]
    fn a_broken_stream_is_resumed_where_it_stopped() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let b = RetryingBackend::new(
            Breaks {
                data: data.clone(),
                fail_after: 3000,
                asked: Default::default(),
            },
            fast(),
            Arc::new(Metrics::default()),
        );
        let mut got = Vec::new();
        b.read_range_streaming(&[0; 32], 1000, 8000, &Deadline::none(), &mut |p| {
            got.extend_from_slice(p)
        })
        .expect("resumed");
        assert_eq!(got, data[1000..9000]);
        assert_eq!(
            *crate::util::sync::lock(&b.inner().asked),
            vec![(1000, 8000), (4000, 5000)]
        );
        // Background work makes one attempt: the first part only.
        let b = RetryingBackend::new(
            Breaks {
                data: data.clone(),
                fail_after: 3000,
                asked: Default::default(),
            },
            fast(),
            Arc::new(Metrics::default()),
        );
        let mut got = Vec::new();
        assert!(b
            .read_range_streaming(
                &[0; 32],
                0,
                8000,
                &Deadline::none().background(),
                &mut |p| { got.extend_from_slice(p) }
            )
            .is_err());
        assert_eq!(got, data[..3000]);
    }
}
