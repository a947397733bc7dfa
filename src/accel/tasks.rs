//! The task list: every conversion asked for, its status, timings and error, persisted to
//! `<work_dir>/tasks.json` (written whole, atomically, on every change) so that a restart
//! resumes what was queued and retries what was running; and the queue the workers take from.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::events::Origin;
use super::AccelError;

/// Finished tasks kept in the list (the oldest go first).
const KEEP_FINISHED: usize = 1000;

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Queued.
    Pending,
    /// A worker is converting it.
    Processing,
    /// Converted and pushed.
    Completed,
    /// Failed; `reason` says why.
    Failed,
    /// Not converted (already a Skiff or Nydus image); `reason` says why.
    Skipped,
}

impl Status {
    /// Whether the task is done with.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Skipped)
    }

    /// The lower-case name, for metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// One conversion: Harbor's task fields (`id`, `created`, `finished`, `source`, `source_size`,
/// `target_size`, `status`, `reason`) and Skiff's own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    /// Unique, in creation order.
    pub id: String,
    /// Who asked.
    pub origin: Origin,
    /// The source image, by tag.
    pub source: String,
    /// The source manifest's digest, when known (duplicates are told apart by it).
    pub source_digest: Option<String>,
    /// The target image.
    pub target: String,
    /// Where it is.
    pub status: Status,
    /// Why it failed or was skipped.
    pub reason: String,
    /// Attempts started (a restart during one counts).
    pub attempts: u32,
    /// When it was queued (RFC 3339, UTC).
    pub created: String,
    /// When its last attempt started.
    pub started: Option<String>,
    /// When it finished.
    pub finished: Option<String>,
    /// Seconds its last attempt took.
    pub seconds: Option<f64>,
    /// Bytes of source layers.
    pub source_size: u64,
    /// Bytes of the converted image's layers.
    pub target_size: u64,
    /// The pushed manifest or index digest.
    pub target_digest: Option<String>,
}

/// What [`TaskStore::create`] did.
pub enum Created {
    /// A new task, queued.
    New(Task),
    /// A task for the same image is queued, running or done: no new one.
    Duplicate(Task),
}

struct Inner {
    tasks: Vec<Task>,
    queue: VecDeque<String>,
    next_id: u64,
}

/// The persisted task list and the work queue.
pub struct TaskStore {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Signalled when a task is queued or finishes.
    changed: Condvar,
}

/// Now as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(secs)
}

/// `secs` since the epoch as RFC 3339 (UTC).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

impl TaskStore {
    /// Opens the list in `work_dir`. Tasks that were queued are queued again; tasks that were
    /// running when the service stopped are queued again too, or failed once they have had
    /// `max_attempts`.
    pub fn open(work_dir: &Path, max_attempts: u32) -> Result<Self, AccelError> {
        std::fs::create_dir_all(work_dir).map_err(|e| AccelError::Io {
            op: "creating",
            path: work_dir.to_path_buf(),
            source: e,
        })?;
        let path = work_dir.join("tasks.json");
        let mut tasks: Vec<Task> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| AccelError::Config(format!("task list {}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(AccelError::Io {
                    op: "reading",
                    path,
                    source: e,
                })
            }
        };
        let mut queue = VecDeque::new();
        for t in &mut tasks {
            match t.status {
                Status::Pending => queue.push_back(t.id.clone()),
                Status::Processing if t.attempts >= max_attempts => {
                    t.status = Status::Failed;
                    t.reason = format!(
                        "interrupted {} times (the service stopped during the conversion)",
                        t.attempts
                    );
                    t.finished = Some(now_rfc3339());
                }
                Status::Processing => {
                    tracing::info!(task = %t.id, source = %t.source, attempts = t.attempts, "resuming a task the service was running when it stopped");
                    t.status = Status::Pending;
                    queue.push_back(t.id.clone());
                }
                _ => {}
            }
        }
        let next_id = tasks
            .iter()
            .filter_map(|t| t.id.parse::<u64>().ok())
            .max()
            .map_or(1, |n| n + 1);
        let store = Self {
            path,
            inner: Mutex::new(Inner {
                tasks,
                queue,
                next_id,
            }),
            changed: Condvar::new(),
        };
        let guard = store.lock();
        store.persist(&guard)?;
        drop(guard);
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A worker that panicked left consistent data behind (every change is one assignment).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, inner: &Inner) -> Result<(), AccelError> {
        let bytes = serde_json::to_vec_pretty(&inner.tasks)
            .map_err(|e| AccelError::Config(format!("serialising the task list: {e}")))?;
        crate::util::write_atomically(&self.path, &bytes).map_err(|e| AccelError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        })
    }

    /// Queues a conversion of `source` into `target`, unless one for the same image (the same
    /// repository and digest; or, without a digest, the same source) is queued, running or
    /// done.
    pub fn create(
        &self,
        origin: Origin,
        source: &str,
        source_digest: Option<&str>,
        target: &str,
    ) -> Result<Created, AccelError> {
        let mut inner = self.lock();
        let same = |t: &Task| {
            t.target == target
                && match (source_digest, &t.source_digest) {
                    (Some(d), Some(e)) => d == e,
                    _ => t.source == source && !t.status.is_final(),
                }
        };
        if let Some(t) = inner
            .tasks
            .iter()
            .rev()
            .find(|t| same(t) && t.status != Status::Failed)
        {
            return Ok(Created::Duplicate(t.clone()));
        }
        let id = format!("{}", inner.next_id);
        inner.next_id += 1;
        let task = Task {
            id: id.clone(),
            origin,
            source: source.to_string(),
            source_digest: source_digest.map(str::to_string),
            target: target.to_string(),
            status: Status::Pending,
            reason: String::new(),
            attempts: 0,
            created: now_rfc3339(),
            started: None,
            finished: None,
            seconds: None,
            source_size: 0,
            target_size: 0,
            target_digest: None,
        };
        inner.tasks.push(task.clone());
        inner.queue.push_back(id);
        let finished: Vec<usize> = (0..inner.tasks.len())
            .filter(|&i| inner.tasks[i].status.is_final())
            .collect();
        if finished.len() > KEEP_FINISHED {
            let drop_n = finished.len() - KEEP_FINISHED;
            let gone: std::collections::HashSet<usize> =
                finished.into_iter().take(drop_n).collect();
            let mut i = 0;
            inner.tasks.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
        }
        self.persist(&inner)?;
        drop(inner);
        self.changed.notify_all();
        Ok(Created::New(task))
    }

    /// Waits for a queued task and marks it running (one more attempt). `None` once `stop`
    /// says so.
    pub fn take(&self, stop: &dyn Fn() -> bool) -> Option<Task> {
        let mut inner = self.lock();
        loop {
            if stop() {
                return None;
            }
            if let Some(id) = inner.queue.pop_front() {
                let Some(t) = inner.tasks.iter_mut().find(|t| t.id == id) else {
                    continue;
                };
                t.status = Status::Processing;
                t.attempts += 1;
                t.started = Some(now_rfc3339());
                let t = t.clone();
                if let Err(e) = self.persist(&inner) {
                    tracing::error!(error = %crate::util::error_chain(&e), "cannot save the task list");
                }
                return Some(t);
            }
            inner = self
                .changed
                .wait_timeout(inner, std::time::Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Records how task `id` ended.
    pub fn finish(&self, id: &str, update: impl FnOnce(&mut Task)) {
        let mut inner = self.lock();
        if let Some(t) = inner.tasks.iter_mut().find(|t| t.id == id) {
            update(t);
            t.finished = Some(now_rfc3339());
        }
        if let Err(e) = self.persist(&inner) {
            tracing::error!(error = %crate::util::error_chain(&e), "cannot save the task list");
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// Every task, newest first.
    pub fn list(&self) -> Vec<Task> {
        let inner = self.lock();
        inner.tasks.iter().rev().cloned().collect()
    }

    /// Waits until task `id` is final (or `timeout` passes); returns it as it is then.
    pub fn wait(&self, id: &str, timeout: std::time::Duration) -> Option<Task> {
        let deadline = std::time::Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            let t = inner.tasks.iter().find(|t| t.id == id)?.clone();
            let now = std::time::Instant::now();
            if t.status.is_final() || now >= deadline {
                return Some(t);
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Tasks by status, for the metrics.
    pub fn counts(&self) -> Vec<(Status, u64)> {
        let inner = self.lock();
        [
            Status::Pending,
            Status::Processing,
            Status::Completed,
            Status::Failed,
            Status::Skipped,
        ]
        .into_iter()
        .map(|s| {
            (
                s,
                inner.tasks.iter().filter(|t| t.status == s).count() as u64,
            )
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn duplicates_restarts_and_attempts() -> Result<(), AccelError> {
        let dir = tempfile::tempdir().map_err(|e| AccelError::Config(e.to_string()))?;
        let d = "sha256:00";
        let s = TaskStore::open(dir.path(), 2)?;
        let Created::New(a) = s.create(Origin::Distribution, "r/a:1", Some(d), "r/a:1-skiff")?
        else {
            panic!("first is new");
        };
        assert!(matches!(
            s.create(Origin::Harbor, "r/a:1", Some(d), "r/a:1-skiff")?,
            Created::Duplicate(_)
        ));
        let t = s.take(&|| false).expect("queued");
        assert_eq!((t.id.as_str(), t.attempts), (a.id.as_str(), 1));
        // The service stops mid-way: reopened, the task is queued again, then failed after
        // its last attempt.
        drop(s);
        let s = TaskStore::open(dir.path(), 2)?;
        assert_eq!(s.list()[0].status, Status::Pending);
        assert_eq!(s.take(&|| false).map(|t| t.attempts), Some(2));
        drop(s);
        let s = TaskStore::open(dir.path(), 2)?;
        assert_eq!(s.list()[0].status, Status::Failed);
        // A failed task does not block a new one for the same image.
        assert!(matches!(
            s.create(Origin::Harbor, "r/a:1", Some(d), "r/a:1-skiff")?,
            Created::New(_)
        ));
        Ok(())
    }
}
