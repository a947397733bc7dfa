//! Every thread a daemon starts, by kind.
//!
//! Each kind of thread is started in one place, through [`spawn`], with a name that says what
//! it does (`skiff-worker-3`, `skiff-ahead-0`, ...), and takes on its kind with [`enter`]
//! before it runs anything else. `enter` is the one hook a sandbox needs: the system call
//! filter of a kind is applied there, once per thread, by one call. Threads that libraries
//! start for Skiff (the vhost-user queue threads) call [`enter`] themselves on their first
//! event.
//!
//! A thread also inherits its spawner's [`ExitEvent`], so that a panic anywhere is reported to
//! the daemon it belongs to ([`super::panic`]).

use std::cell::RefCell;
use std::io;
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread::JoinHandle;

use super::ExitEvent;

/// What a thread does, which decides what it may do (its system calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The process's first thread: setup, then waiting for the exit event.
    Main,
    /// Accepts a VMM on the vhost-user socket and answers its vhost-user messages (maps guest
    /// memory); the library thread reading those messages starts from it.
    Vhost,
    /// Owns a virtqueue: pops descriptor chains and hands them to the workers.
    Queue,
    /// Answers FUSE requests: the filesystem work, reading chunks (from the caches, local
    /// blobs, or the network), completing chains.
    Worker,
    /// Background fetching: fetch-ahead, read-ahead, prefetch, local blob read-ahead.
    Fetcher,
    /// Answers the HTTP API on its Unix socket.
    Api,
    /// Reads and answers requests from `/dev/fuse` (`skiff mount`).
    Fuse,
    /// Periodic bookkeeping: the metrics file.
    Housekeeping,
    /// Hands this daemon's sealed bootstraps to the node's other daemons (`crate::share`).
    Share,
}

impl ThreadKind {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vhost => "vhost",
            ThreadKind::Queue => "queue",
            ThreadKind::Worker => "worker",
            ThreadKind::Fetcher => "fetcher",
            ThreadKind::Api => "api",
            ThreadKind::Fuse => "fuse",
            ThreadKind::Housekeeping => "housekeeping",
            ThreadKind::Share => "share",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone)]
struct Context {
    kind: ThreadKind,
    exit: Option<ExitEvent>,
}

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Makes the calling thread a thread of `kind`, belonging to the daemon whose exit event is
/// `exit` (`None`: keep the one it has, if any). Called first thing by every thread
/// [`spawn`] starts; call it on threads other code starts. Entering the kind the thread
/// already has does nothing, so it is cheap to call on every event.
pub fn enter(kind: ThreadKind, exit: Option<&ExitEvent>) {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        // Already a thread of this kind, of a daemon: nothing to do (the common case of a
        // queue thread entering on every event).
        if c.as_ref()
            .is_some_and(|ctx| ctx.kind == kind && (exit.is_none() || ctx.exit.is_some()))
        {
            return;
        }
        let changed = c.as_ref().map(|ctx| ctx.kind) != Some(kind);
        let exit = exit
            .cloned()
            .or_else(|| c.as_ref().and_then(|ctx| ctx.exit.clone()));
        *c = Some(Context { kind, exit });
        // A sandbox's per-kind filter: applied here, once per thread and kind.
        if changed {
            if let Some(confine) = CONFINE.get() {
                confine(kind);
            }
        }
    });
}

/// Whether a sandbox confines the threads (each kind under its own seccomp list): code must
/// then run only on threads of the kind it was written for.
pub fn confined() -> bool {
    CONFINE.get().is_some()
}

/// What a sandbox does to a thread taking on a kind ([`set_confinement`]).
pub type Confinement = fn(ThreadKind);

static CONFINE: OnceLock<Confinement> = OnceLock::new();

/// Makes every thread call `confine` when it enters a kind (once per thread and kind). Set
/// once, by the sandbox; later calls are ignored.
pub fn set_confinement(confine: Confinement) {
    let _ = CONFINE.set(confine);
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// The spawner's queue, once [`start_spawner`] ran.
static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();

thread_local! {
    static IS_SPAWNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Starts the thread that starts every thread [`spawn`] is asked for from then on. A thread
/// inherits its starter's seccomp filters and can only add to them: started by this one,
/// which carries only the filter the main thread had, each thread then adds exactly its own
/// kind's filter, whoever asked for it (a worker asked for by a queue thread is not limited
/// to what a queue thread may do).
pub fn start_spawner() -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<SpawnJob>();
    let exit = current_exit();
    std::thread::Builder::new()
        .name("skiff-spawner".into())
        .spawn(move || {
            IS_SPAWNER.with(|s| s.set(true));
            enter(ThreadKind::Main, exit.as_ref());
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
    let _ = SPAWNER.set(Mutex::new(tx));
    Ok(())
}

/// The calling thread's kind, if it entered one.
pub fn current() -> Option<ThreadKind> {
    CONTEXT.with(|c| c.borrow().as_ref().map(|ctx| ctx.kind))
}

/// The exit event of the daemon the calling thread belongs to.
pub fn current_exit() -> Option<ExitEvent> {
    CONTEXT.with(|c| c.borrow().as_ref().and_then(|ctx| ctx.exit.clone()))
}

/// Starts a thread named `name` that enters `kind` and runs `f`. It belongs to the same
/// daemon as the calling thread.
pub fn spawn<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let exit = current_exit();
    let builder = std::thread::Builder::new().name(name.into());
    let body = move || {
        enter(kind, exit.as_ref());
        f()
    };
    let Some(spawner) = SPAWNER.get().filter(|_| !IS_SPAWNER.with(|s| s.get())) else {
        return builder.spawn(body);
    };
    let (reply, handle) = mpsc::sync_channel(1);
    let job: SpawnJob = Box::new(move || {
        let _ = reply.send(builder.spawn(body));
    });
    if crate::util::sync::lock(spawner).send(job).is_err() {
        return Err(io::Error::other("the spawner thread is gone"));
    }
    handle
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_take_their_kind_and_inherit_the_daemon() {
        let exit = ExitEvent::new().expect("eventfd");
        let e2 = exit.clone();
        let h = std::thread::spawn(move || {
            enter(ThreadKind::Main, Some(&e2));
            let inner = spawn(ThreadKind::Fetcher, "skiff-test-fetcher", || {
                let name = std::thread::current().name().map(str::to_owned);
                (current(), current_exit().is_some(), name)
            })
            .expect("spawn");
            inner.join().expect("join")
        });
        let (kind, has_exit, name) = h.join().expect("join");
        assert_eq!(kind, Some(ThreadKind::Fetcher));
        assert!(has_exit);
        assert_eq!(name.as_deref(), Some("skiff-test-fetcher"));
        assert_eq!(current(), None, "the test thread entered nothing");
    }
}
