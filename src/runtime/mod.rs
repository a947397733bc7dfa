//! The daemons' process plumbing, written once for `serve`, `virtiofs` and `mount`:
//!
//! * [`threads`]: every thread the daemon starts, by kind and name, from one place per kind;
//!   [`threads::enter`] is where a thread takes on its kind (and where a sandbox applies the
//!   kind's system call filter);
//! * [`exit`]: the one [`ExitEvent`] a daemon's event loops all wait on, with why it fired;
//! * [`http`]: the HTTP/1.1 server of the API socket and of `skiff accel`, every part of a
//!   request bounded;
//! * [`signals`]: SIGTERM/SIGINT turned into that event;
//! * [`socket`]: the Unix sockets a daemon listens on (stale ones replaced, live ones and
//!   other files refused, removed on the way out if still ours);
//! * [`panic`]: a panic in any daemon thread is reported and ends the daemon with an error,
//!   never leaving a queue silently dead;
//! * `pool`: the worker pool answering FUSE requests off the threads that read them (a
//!   virtqueue's, or `/dev/fuse`'s).

#![warn(missing_docs)]

pub mod exit;
pub mod http;
pub mod panic;
pub(crate) mod pool;
pub mod signals;
pub mod socket;
pub mod threads;

pub use exit::{ExitEvent, ExitReason};
pub use pool::{DEFAULT_WORKERS, MAX_WORKERS};
pub use signals::SignalGuard;
pub use socket::{SocketError, UnixSocketFile};
pub use threads::ThreadKind;

/// Makes the calling thread a daemon's main thread: a new exit event, the panic hook, and the
/// thread's kind. Threads started from here on (storage, workers, API) belong to this daemon:
/// a panic in any of them sets the event as fatal. Signals are the caller's
/// ([`SignalGuard::install`]), once it is ready to stop cleanly.
pub fn start_daemon() -> std::io::Result<ExitEvent> {
    let exit = ExitEvent::new()?;
    panic::install_hook();
    threads::enter(ThreadKind::Main, Some(&exit));
    Ok(exit)
}
