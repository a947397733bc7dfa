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

/// A counting semaphore over a mutex and a condition variable.
pub struct Semaphore {
    free: Mutex<usize>,
    cv: Condvar,
}

/// A permit of a [`Semaphore`], given back on drop.
pub struct Permit<'a>(&'a Semaphore);

impl Semaphore {
    /// A semaphore with `n` permits (at least one).
    pub fn new(n: usize) -> Self {
        Self {
            free: Mutex::new(n.max(1)),
            cv: Condvar::new(),
        }
    }

    /// Waits for a permit.
    pub fn acquire(&self) -> Permit<'_> {
        let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *g == 0 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        *g -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut g = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        self.0.cv.notify_one();
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
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, BackendError> {
        let mut attempt = 1;
        loop {
            let result = {
                let _permit = self.in_flight.acquire();
                inc(&self.metrics.backend_requests);
                let start = Instant::now();
                let r = self.inner.read_range(id, offset, len);
                self.metrics.observe_latency(start.elapsed());
                r
            };
            match result {
                Ok(bytes) => {
                    add(&self.metrics.backend_bytes, bytes.len() as u64);
                    return Ok(bytes);
                }
                Err(e) => {
                    inc(&self.metrics.backend_errors);
                    if !e.is_retryable() || attempt >= self.policy.attempts {
                        return Err(e);
                    }
                    let d = self.delay(attempt);
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
        }
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::backend::fault::{Fault, FaultyBackend};

    struct Bytes(Vec<u8>);
    impl BlobBackend for Bytes {
        fn read_range(&self, _: &[u8; 32], o: u64, l: usize) -> Result<Vec<u8>, BackendError> {
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
        assert_eq!(r.read_range(&[0; 32], 10, 5).expect("read"), vec![7; 5]);
        assert_eq!(m.backend_retries.load(Ordering::Relaxed), 2);
        r.inner().push([Fault::Error; 4]);
        assert!(r.read_range(&[0; 32], 10, 5).is_err());
        // A final error is not retried.
        let before = m.backend_requests.load(Ordering::Relaxed);
        assert!(r.read_range(&[0; 32], 99, 5).is_err());
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
}
