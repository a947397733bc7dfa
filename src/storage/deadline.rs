//! When a chunk read must be answered by, and who waits for it.
//!
//! A FUSE read gets a [`Deadline`] when it arrives (`fs`), and every layer below bounds its
//! waits by it: another reader's claim on the chunk, the host's lock on the chunk, a request
//! slot of the backend, each attempt's network timeout, the backoff between attempts. When it
//! passes, the read fails (the guest gets EIO and the operator a log line) instead of hanging.
//!
//! Background work (fetch-ahead, prefetch, read-ahead) carries a deadline too, marked
//! [`Priority::Background`]: it makes one attempt per request, leaves request slots free for
//! readers, and a foreground read never waits long on a chunk that background work holds (see
//! [`crate::storage::CachedChunkSource`]).

use std::time::{Duration, Instant};

/// How long a FUSE read may take by default, network retries included.
///
/// Long enough for a few retries of a 1 MiB chunk over a slow link (each attempt's own timeout
/// is capped by what is left), short enough that a guest process blocked on an unreachable
/// registry gets EIO within half a minute instead of hanging in uninterruptible sleep.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is waiting for a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A reader (a guest process) waits for it.
    Foreground,
    /// Nobody waits: the bytes are fetched ahead of the reads that will want them.
    Background,
}

/// When a read must be done by, and for whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// `None`: no bound (callers outside a FUSE request, such as `skiff check`).
    at: Option<Instant>,
    priority: Priority,
}

impl Deadline {
    /// A foreground deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now().checked_add(timeout),
            priority: Priority::Foreground,
        }
    }

    /// A foreground read without a deadline: for callers that are not serving a request (a
    /// check of a local image) and tests.
    pub fn none() -> Self {
        Self {
            at: None,
            priority: Priority::Foreground,
        }
    }

    /// The same deadline, for background work.
    pub fn background(self) -> Self {
        Self {
            priority: Priority::Background,
            ..self
        }
    }

    /// Who waits for the read.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Whether this is background work.
    pub fn is_background(&self) -> bool {
        self.priority == Priority::Background
    }

    /// The instant it passes, if bounded.
    pub fn instant(&self) -> Option<Instant> {
        self.at
    }

    /// Time left: `None` when unbounded, zero once passed.
    pub fn remaining(&self) -> Option<Duration> {
        self.at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Whether it has passed.
    pub fn expired(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }

    /// `d`, or the time left if that is shorter: the longest a wait or a request may take.
    pub fn cap(&self, d: Duration) -> Duration {
        self.remaining().map_or(d, |r| r.min(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_priority() {
        let d = Deadline::after(Duration::from_secs(60));
        assert!(!d.expired() && !d.is_background());
        assert!(d.cap(Duration::from_secs(600)) <= Duration::from_secs(60));
        assert_eq!(d.cap(Duration::from_millis(5)), Duration::from_millis(5));
        let b = d.background();
        assert!(b.is_background() && b.instant() == d.instant());
        let past = Deadline::after(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
        assert!(past.expired());
        assert_eq!(past.cap(Duration::from_secs(1)), Duration::ZERO);
        let none = Deadline::none();
        assert!(!none.expired() && none.remaining().is_none());
        assert_eq!(none.cap(Duration::from_secs(3)), Duration::from_secs(3));
        // A timeout too large for the clock is no bound rather than a panic.
        assert!(!Deadline::after(Duration::MAX).expired());
    }
}
