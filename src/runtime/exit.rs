//! The exit event: one eventfd per daemon that every event loop waits on beside its own
//! descriptors, instead of polling a flag.
//!
//! Once notified the eventfd stays readable (it is never read), so any number of loops, in any
//! number of threads, see it whenever they wait, including loops that start waiting later.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::util::sync::lock;

/// Why a daemon stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// A signal (SIGTERM, SIGINT) asked it to.
    Signal(i32),
    /// Its owner asked it to (an API call, a test, the end of a session).
    Requested,
    /// Something it cannot go on without failed: a thread panicked, or a serving thread
    /// ended on an error. The daemon exits with an error and this report.
    Fatal(String),
}

impl ExitReason {
    /// Whether the daemon must exit with an error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ExitReason::Fatal(_))
    }
}

struct Inner {
    fd: EventFd,
    reason: Mutex<Option<ExitReason>>,
    /// Set from the signal handler, which may not take locks.
    signal: AtomicI32,
}

/// A daemon's exit event. Cloning gives another handle on the same event.
#[derive(Clone)]
pub struct ExitEvent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ExitEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitEvent")
            .field("fd", &self.as_raw_fd())
            .field("reason", &self.reason())
            .finish()
    }
}

impl ExitEvent {
    /// A new, unset event.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                fd: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
                reason: Mutex::new(None),
                signal: AtomicI32::new(0),
            }),
        })
    }

    /// Sets the event. The first reason is kept, except that a fatal one replaces any other:
    /// a panic during a requested shutdown still makes the exit an error.
    pub fn notify(&self, reason: ExitReason) {
        {
            let mut r = lock(&self.inner.reason);
            if r.as_ref()
                .is_none_or(|old| !old.is_fatal() && reason.is_fatal())
            {
                *r = Some(reason);
            }
        }
        self.wake();
    }

    /// Sets the event for signal `signo`. Only async-signal-safe calls: an atomic store and
    /// one write(2).
    pub(crate) fn notify_signal(&self, signo: i32) {
        self.inner.signal.store(signo, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        // Fails only when the counter would overflow, which cannot happen adding 1 each time
        // far below u64::MAX; the event is set either way.
        let _ = self.inner.fd.write(1);
    }

    /// Why the event was set, if it was.
    pub fn reason(&self) -> Option<ExitReason> {
        if let Some(r) = lock(&self.inner.reason).clone() {
            return Some(r);
        }
        match self.inner.signal.load(Ordering::Acquire) {
            0 => None,
            signo => Some(ExitReason::Signal(signo)),
        }
    }

    /// Whether the event was set.
    pub fn is_set(&self) -> bool {
        self.reason().is_some()
    }

    /// Waits until the event is set or `timeout` passes (for ever with `None`); returns
    /// whether it is set.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // A timeout too large for the clock waits for ever.
        let until = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        loop {
            let ms = until.map_or(-1, |u| {
                let left = u.saturating_duration_since(std::time::Instant::now());
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
            });
            // SAFETY: `fds` is a valid array of one pollfd for the duration of the call, and
            // its length is passed with it.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
        self.is_set()
    }
}

impl AsRawFd for ExitEvent {
    /// The eventfd: readable once the event is set. Add it to an epoll set beside the loop's
    /// own descriptors; never read it.
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notified_once_seen_by_every_waiter_with_the_fatal_reason_winning() {
        let e = ExitEvent::new().expect("eventfd");
        assert!(!e.wait(Some(Duration::from_millis(10))));
        let e2 = e.clone();
        let waiter = std::thread::spawn(move || e2.wait(None));
        e.notify(ExitReason::Requested);
        assert!(waiter.join().expect("waiter"));
        assert!(e.wait(Some(Duration::ZERO)), "stays set");
        assert_eq!(e.reason(), Some(ExitReason::Requested));
        e.notify(ExitReason::Signal(15));
        assert_eq!(
            e.reason(),
            Some(ExitReason::Requested),
            "the first reason stays"
        );
        e.notify(ExitReason::Fatal("a worker panicked".into()));
        assert!(e.reason().is_some_and(|r| r.is_fatal()));
        e.notify(ExitReason::Requested);
        assert!(e.reason().is_some_and(|r| r.is_fatal()), "fatal stays");
    }

    #[test]
    fn a_signal_sets_it_without_locks() {
        let e = ExitEvent::new().expect("eventfd");
        e.notify_signal(libc::SIGTERM);
        assert!(e.wait(Some(Duration::ZERO)));
        assert_eq!(e.reason(), Some(ExitReason::Signal(libc::SIGTERM)));
    }
}
