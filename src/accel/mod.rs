//! `skiff accel`: convert images as they are pushed, as Harbor's acceleration service does.
//!
//! - [`server`]: the HTTP API: Harbor's webhook (`POST /api/v1/conversions`), Docker
//!   distribution's notifications (`POST /api/v1/notifications`), the task list
//!   (`GET /api/v1/conversions`), `/metrics` and `/api/v1/health`;
//! - [`events`]: the payloads, and the rules mapping a pushed image to its target (a tag suffix
//!   or a target repository; the service's own output is never converted again);
//! - [`tasks`]: the persisted task list and queue (duplicates of one digest make one task; a
//!   restart resumes what was queued or running);
//! - workers (here): N threads converting with [`crate::oci::convert`], which pushes the target
//!   manifest last, so that a crash never leaves a half image under the tag.

pub mod config;
pub mod events;
pub mod metrics;
pub mod server;
pub mod tasks;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::config::AccelConfig;
use self::metrics::Metrics;
use self::tasks::{Status, Task, TaskStore};
use crate::oci::manifest::{
    Fetched, ImageManifest, ANN_NYDUS_BOOTSTRAP, ANN_SOURCE, SKIFF_BOOTSTRAP, SKIFF_BOOTSTRAP_ZSTD,
};
use crate::oci::{OciError, Platforms, Reference, RegistryClient, RegistryOptions};

/// Timeout of one registry request of a conversion (an upload's body is one request).
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(600);

/// Why the service could not start or a request could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A local I/O error.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP listener could not start.
    #[error("listening on {addr}: {why}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
    /// A registry operation failed.
    #[error("registry")]
    Registry(#[from] OciError),
}

/// The running service's shared state.
pub struct Service {
    /// The configuration.
    pub config: AccelConfig,
    /// The task list.
    pub tasks: TaskStore,
    /// The counters.
    pub metrics: Metrics,
    stop: AtomicBool,
}

impl Service {
    /// Opens the task list of `config`.
    pub fn new(config: AccelConfig) -> Result<Arc<Self>, AccelError> {
        let tasks = TaskStore::open(&config.work_dir, config.max_attempts)?;
        // Scratch directories of conversions that were cut short and will not be resumed.
        let pending: std::collections::HashSet<String> = tasks
            .list()
            .into_iter()
            .filter(|t| !t.status.is_final())
            .map(|t| t.id)
            .collect();
        if let Ok(rd) = std::fs::read_dir(config.work_dir.join("work")) {
            for e in rd.flatten() {
                if !pending.contains(&*e.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(Arc::new(Self {
            config,
            tasks,
            metrics: Metrics::default(),
            stop: AtomicBool::new(false),
        }))
    }

    /// Asks the workers and the server to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether [`Service::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Registry options for `host`, which must be configured.
    pub fn registry_options(&self, host: &str) -> Result<RegistryOptions, AccelError> {
        let r = self.config.registries.get(host).ok_or_else(|| {
            AccelError::Config(format!("registry {host} is not in the configuration"))
        })?;
        let credentials = match r.credentials()? {
            Some(c) => Some(c),
            None => crate::oci::auth::find_credentials(None, host)?,
        };
        Ok(RegistryOptions {
            insecure: r.insecure,
            credentials,
            timeout: Some(REGISTRY_TIMEOUT),
            ..RegistryOptions::default()
        })
    }

    /// A worker: converts queued tasks until the service stops.
    fn work(self: &Arc<Self>, n: usize) {
        while let Some(task) = self.tasks.take(&|| self.stopping()) {
            tracing::info!(worker = n, task = %task.id, source = %task.source, target = %task.target, attempt = task.attempts, "converting");
            let start = Instant::now();
            let outcome = self.convert(&task);
            let seconds = start.elapsed().as_secs_f64();
            match outcome {
                Ok(Outcome::Converted(r)) => {
                    self.metrics.completed.fetch_add(1, Ordering::Relaxed);
                    self.metrics.conversion(seconds);
                    tracing::info!(task = %task.id, target = %task.target, digest = %r.digest, seconds, "converted");
                    self.tasks.finish(&task.id, |t| {
                        t.status = Status::Completed;
                        t.reason.clear();
                        t.seconds = Some(seconds);
                        t.source_size = r.source_bytes;
                        t.target_size = r.target_bytes;
                        t.target_digest = Some(r.digest);
                    });
                }
                Ok(Outcome::Skipped(why)) => {
                    self.metrics.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(task = %task.id, source = %task.source, why, "not converted");
                    self.tasks.finish(&task.id, |t| {
                        t.status = Status::Skipped;
                        t.reason = why;
                        t.seconds = Some(seconds);
                    });
                }
                Err(e) => {
                    let why = crate::util::error_chain(&e);
                    self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(task = %task.id, source = %task.source, error = %why, "conversion failed");
                    self.tasks.finish(&task.id, |t| {
                        t.status = Status::Failed;
                        t.reason = why;
                        t.seconds = Some(seconds);
                    });
                }
            }
        }
    }

    /// Converts one task's source into its target.
    fn convert(&self, task: &Task) -> Result<Outcome, AccelError> {
        let source = Reference::parse(&task.source)?;
        let target = Reference::parse(&task.target)?;
        let source_opts = self.registry_options(&source.registry)?;
        let target_opts = self.registry_options(&target.registry)?;
        let client = RegistryClient::new(&source, &source_opts)?;
        // Pinned to the digest the event named (or the tag's now): a push of the tag during
        // the conversion does not mix two images.
        let wanted = task
            .source_digest
            .clone()
            .unwrap_or_else(|| source.manifest_ref().to_string());
        let (fetched, _, digest) = client.get_manifest_ref(&wanted)?;
        if let Some(why) = accelerated(&client, &fetched)? {
            return Ok(Outcome::Skipped(why));
        }
        let pinned = format!("{}/{}@{digest}", source.registry, source.repository);
        let work = self.config.work_dir.join("work").join(&task.id);
        let _ = std::fs::remove_dir_all(&work);
        let c = &self.config.convert;
        let result = crate::oci::convert(&crate::oci::ConvertOptions {
            source: pinned,
            source_registry: source_opts,
            target,
            target_registry: target_opts,
            work_dir: work.clone(),
            chunk_size: c.chunk_size()?,
            compressor: c.compressor()?,
            progress: false,
            prefetch: Default::default(),
            platforms: if c.all_platforms {
                Platforms::All
            } else {
                Platforms::Default
            },
            layout: crate::oci::ImageLayout::Node,
        });
        let _ = std::fs::remove_dir_all(&work);
        let report = result?;
        let images = report.images();
        Ok(Outcome::Converted(Converted {
            digest: report.digest().to_string(),
            source_bytes: images.iter().map(|s| s.source_bytes).sum(),
            target_bytes: images.iter().map(|s| s.target_bytes()).sum(),
        }))
    }
}

/// How a conversion ended.
enum Outcome {
    Converted(Converted),
    Skipped(String),
}

struct Converted {
    digest: String,
    source_bytes: u64,
    target_bytes: u64,
}

/// Why `fetched` is already an accelerated image (Skiff's or Nydus's), if it is.
fn accelerated(client: &RegistryClient, fetched: &Fetched) -> Result<Option<String>, OciError> {
    let check = |m: &ImageManifest| -> Option<String> {
        if m.annotations.contains_key(ANN_SOURCE) {
            return Some("already a Skiff image (converted from another)".into());
        }
        let last = m.layers.last()?;
        if last.media_type == SKIFF_BOOTSTRAP || last.media_type == SKIFF_BOOTSTRAP_ZSTD {
            return Some("already a Skiff image".into());
        }
        if last
            .annotations
            .get(ANN_NYDUS_BOOTSTRAP)
            .is_some_and(|v| v == "true")
        {
            return Some("already a Nydus image".into());
        }
        None
    };
    match fetched {
        Fetched::Manifest(m) => Ok(check(m)),
        Fetched::Index(i) => {
            let Some(first) = crate::oci::source::select(i, Platforms::All)?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            match client.get_manifest_ref(&first.digest)? {
                (Fetched::Manifest(m), _, _) => Ok(check(&m)),
                _ => Ok(None),
            }
        }
    }
}

/// Runs the service until SIGINT or SIGTERM: the workers, then the HTTP API on
/// `config.listen`.
pub fn run(config: AccelConfig) -> Result<(), AccelError> {
    let workers = config.workers;
    let service = Service::new(config)?;
    let http = server::HttpServer::start(service.clone())?;
    let mut threads = Vec::new();
    for n in 0..workers {
        let s = service.clone();
        let t = std::thread::Builder::new()
            .name(format!("accel-worker-{n}"))
            .spawn(move || s.work(n))
            .map_err(|e| AccelError::Io {
                op: "starting a worker",
                path: PathBuf::from("-"),
                source: e,
            })?;
        threads.push(t);
    }
    // The daemons' one signal setup and exit event (crate::runtime): no polling.
    let exit = crate::runtime::ExitEvent::new().map_err(|e| AccelError::Io {
        op: "creating the exit event",
        path: PathBuf::from("-"),
        source: e,
    })?;
    let _signals = crate::runtime::SignalGuard::install(&exit).map_err(|e| AccelError::Io {
        op: "installing a signal handler",
        path: PathBuf::from("-"),
        source: e,
    })?;
    tracing::info!(listen = %http.addr(), workers, "accel service running");
    exit.wait(None);
    tracing::info!("stopping: running conversions finish first");
    service.stop();
    http.shutdown();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
