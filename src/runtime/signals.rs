//! SIGTERM and SIGINT, for every daemon: the first one sets the daemon's [`ExitEvent`] (a
//! clean shutdown), a second one while it shuts down terminates the process at once.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::SigId;

use super::ExitEvent;

/// The installed handlers; dropping the guard removes them, after which SIGTERM and SIGINT
/// terminate the process again as usual.
pub struct SignalGuard {
    /// Set by the first signal (and on drop): from then on the default action runs.
    terminating: Arc<AtomicBool>,
    handlers: Vec<SigId>,
}

impl SignalGuard {
    /// Makes SIGTERM and SIGINT set `exit`.
    pub fn install(exit: &ExitEvent) -> io::Result<Self> {
        let mut guard = SignalGuard {
            terminating: Arc::new(AtomicBool::new(false)),
            handlers: Vec::new(),
        };
        for signal in [SIGTERM, SIGINT] {
            // Registered first, so that it sees the flag as it was before this signal: only a
            // later signal terminates at once. (It stays registered after the guard is gone,
            // with the flag set: signal-hook cannot restore the default disposition, and this
            // handler performs it.)
            signal_hook::flag::register_conditional_default(signal, guard.terminating.clone())?;
            guard.handlers.push(signal_hook::flag::register(
                signal,
                guard.terminating.clone(),
            )?);
            let exit = exit.clone();
            // SAFETY: the action is async-signal-safe: `notify_signal` does one atomic store
            // and one write(2) to an eventfd, and allocates nothing.
            let id = unsafe {
                signal_hook::low_level::register(signal, move || exit.notify_signal(signal))
            }?;
            guard.handlers.push(id);
        }
        Ok(guard)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        self.terminating.store(true, Ordering::Release);
        for id in self.handlers.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
