//! The worker pool: the threads that answer FUSE requests, so that the thread reading them (a
//! virtqueue's, or one reading `/dev/fuse`) only moves requests and a request that waits (on the
//! network, on a slow disk) holds up no other.
//!
//! Workers start on demand: a job that finds no idle worker gets a new one, up to the pool's
//! size. So a request whose data is cached or local never queues behind requests waiting on a
//! registry, unless that many are waiting at once; and an idle daemon keeps one thread. A
//! worker idle for [`IDLE_EXIT`] ends (the last one stays).
//!
//! The queue of jobs needs no bound of its own: the guest cannot have more chains outstanding
//! than its queues have descriptors, and the kernel no more FUSE requests than its callers
//! and its background limit allow, so it holds at most that many.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::runtime::threads::{self, ThreadKind};
use crate::util::sync::{lock, wait_timeout};

/// Most worker threads by default: requests in flight at once before one has to wait for a
/// worker. Each idle worker costs a stack of which a few KiB are touched; a busy one also
/// holds the chunk buffers of its request (a 1 MiB chunk and its stored bytes, at most).
pub const DEFAULT_WORKERS: usize = 16;

/// Most workers allowed.
pub const MAX_WORKERS: usize = 1024;

/// How long a worker waits for a job before it ends (if it is not the last).
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

struct State {
    jobs: VecDeque<Job>,
    /// Jobs being run.
    running: usize,
    /// Workers running, idle or not.
    workers: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// Names the next worker.
    next_id: u64,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    /// Told when the last job running ends (for [`WorkerPool::wait_idle`]).
    idle: Condvar,
    max: usize,
    /// Test builds only: the first job panics (`SKIFF_INJECT_PANIC=worker`), so that tests
    /// can show what a worker panic does to the whole daemon.
    #[cfg(debug_assertions)]
    inject_panic: std::sync::atomic::AtomicBool,
}

/// A pool of at most `max` worker threads running submitted jobs in any order.
pub(crate) struct WorkerPool {
    shared: Arc<Shared>,
}

impl WorkerPool {
    /// A pool of at most `max` workers (at least 1); none is started before the first job.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    running: 0,
                    workers: 0,
                    idle: 0,
                    next_id: 0,
                    closing: false,
                }),
                work: Condvar::new(),
                idle: Condvar::new(),
                max: max.clamp(1, MAX_WORKERS),
                #[cfg(debug_assertions)]
                inject_panic: std::sync::atomic::AtomicBool::new(
                    std::env::var_os("SKIFF_INJECT_PANIC").is_some_and(|v| v == "worker"),
                ),
            }),
        }
    }

    /// Starts the first worker now, so that a daemon that cannot start one fails at start,
    /// not at the guest's first request: a started pool never has to answer on the calling
    /// thread (see [`Self::submit`]).
    pub(crate) fn start_first(&self) -> std::io::Result<()> {
        let mut g = lock(&self.shared.state);
        if g.workers > 0 {
            return Ok(());
        }
        self.spawn_worker(&mut g)
    }

    fn spawn_worker(&self, g: &mut State) -> std::io::Result<()> {
        let id = g.next_id;
        g.next_id += 1;
        g.workers += 1;
        let shared = self.shared.clone();
        let spawned = threads::spawn(
            ThreadKind::Worker,
            format!("skiff-worker-{id}"),
            move || run(&shared),
        );
        if spawned.is_err() {
            g.workers -= 1;
        }
        spawned.map(drop)
    }

    /// Runs `job` on a worker: an idle one, a new one while the pool is below its size, or
    /// the first to be done with its current job.
    ///
    /// If no worker runs and none can be started (the system is out of threads), the job
    /// runs on the calling thread, so that no request is left unanswered; but not in a
    /// sandbox, where the caller (a queue thread) is under a seccomp list without the
    /// filesystem's calls: there the job waits for a worker. A daemon starts its pool's
    /// first worker up front ([`Self::start_first`]), and the last worker never ends while
    /// the pool lives, so that waiting only happens after a worker panicked (which stops the
    /// daemon).
    pub(crate) fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut g = lock(&self.shared.state);
        if g.closing {
            return;
        }
        g.jobs.push_back(Box::new(job));
        // More jobs waiting than idle workers to take them: one more worker, if allowed.
        if g.jobs.len() > g.idle && g.workers < self.shared.max {
            if let Err(e) = self.spawn_worker(&mut g) {
                if g.workers == 0 && !threads::confined() {
                    tracing::error!(error = %e, "cannot start a worker; answering on this thread");
                    let job = g.jobs.pop_back();
                    drop(g);
                    if let Some(job) = job {
                        job();
                    }
                    return;
                }
                if g.workers == 0 {
                    tracing::error!(error = %e, "cannot start a worker; the request waits for one");
                } else {
                    tracing::warn!(error = %e, workers = g.workers, "cannot start another worker");
                }
            }
        }
        drop(g);
        self.shared.work.notify_one();
    }

    /// Waits until no job is queued or running, at most `timeout`; says whether it got there.
    /// (Jobs submitted meanwhile are waited for too.)
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        let until = std::time::Instant::now() + timeout;
        let mut g = lock(&self.shared.state);
        while !g.jobs.is_empty() || g.running > 0 {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            g = wait_timeout(&self.shared.idle, g, left).0;
        }
        true
    }

    /// Workers running now.
    #[cfg(test)]
    pub(crate) fn workers(&self) -> usize {
        lock(&self.shared.state).workers
    }
}

impl Drop for WorkerPool {
    /// Drops the jobs not started and lets every worker end after its current job.
    fn drop(&mut self) {
        let mut g = lock(&self.shared.state);
        g.closing = true;
        g.jobs.clear();
        drop(g);
        self.shared.work.notify_all();
    }
}

/// A worker's loop: jobs until the pool closes, or until it has been idle for long (unless it
/// is the last worker).
fn run(shared: &Shared) {
    /// Counts the worker out however it ends: a job that panics unwinds through here (and the
    /// panic hook stops the daemon), and the pool's count stays right for whoever goes on.
    struct Leaving<'a>(&'a Shared);
    impl Drop for Leaving<'_> {
        fn drop(&mut self) {
            lock(&self.0.state).workers -= 1;
        }
    }
    let leaving = Leaving(shared);
    let mut g = lock(&shared.state);
    loop {
        if let Some(job) = g.jobs.pop_front() {
            g.running += 1;
            drop(g);
            #[cfg(debug_assertions)]
            if shared
                .inject_panic
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                panic!("injected worker panic (SKIFF_INJECT_PANIC=worker)");
            }
            /// Counts the job out however it ends (a panicking job unwinds through here).
            struct Running<'a>(&'a Shared);
            impl Drop for Running<'_> {
                fn drop(&mut self) {
                    let mut g = lock(&self.0.state);
                    g.running -= 1;
                    if g.running == 0 && g.jobs.is_empty() {
                        self.0.idle.notify_all();
                    }
                }
            }
            let running = Running(shared);
            job();
            drop(running);
            g = lock(&shared.state);
            continue;
        }
        if g.closing {
            return;
        }
        g.idle += 1;
        let (next, timeout) = wait_timeout(&shared.work, g, IDLE_EXIT);
        g = next;
        g.idle -= 1;
        if timeout.timed_out() && g.jobs.is_empty() && g.workers > 1 {
            // Counted out under the same lock as the test above: two idle workers timing out
            // together cannot both see the other one and leave none.
            g.workers -= 1;
            std::mem::forget(leaving);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn a_blocked_job_does_not_hold_up_the_next_one() {
        let pool = WorkerPool::new(4);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        pool.submit(move || {
            let _ = release_rx.recv_timeout(Duration::from_secs(10));
        });
        let t = Instant::now();
        pool.submit(move || {
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the second job ran while the first was blocked");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(pool.workers(), 2);
        drop(release_tx);
    }

    #[test]
    fn a_started_pool_has_its_first_worker_before_any_job() {
        let pool = WorkerPool::new(2);
        assert_eq!(pool.workers(), 0);
        pool.start_first().expect("first worker");
        pool.start_first().expect("again: nothing to do");
        assert_eq!(pool.workers(), 1);
        let t = Instant::now();
        while lock(&pool.shared.state).idle == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the first worker never waited"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel();
        pool.submit(move || {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).expect("job ran");
        assert_eq!(name.as_deref(), Some("skiff-worker-0"));
        assert_eq!(pool.workers(), 1, "the idle first worker took the job");
    }

    #[test]
    fn the_pool_never_grows_past_its_size_and_runs_every_job() {
        let pool = WorkerPool::new(3);
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..50 {
            let (ran, tx) = (ran.clone(), tx.clone());
            pool.submit(move || {
                std::thread::sleep(Duration::from_millis(2));
                ran.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(());
            });
            assert!(pool.workers() <= 3);
        }
        for _ in 0..50 {
            rx.recv_timeout(Duration::from_secs(10)).expect("job ran");
        }
        assert_eq!(ran.load(Ordering::SeqCst), 50);
    }
}
