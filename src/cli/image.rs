//! Opening an image for `mount` and `serve` (backend, caches, prefetch, metrics), and the
//! `skiff cache` commands.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};

use super::commands::{CmdResult, ImageArgs};
use crate::format::{digest_hex, Bootstrap};
use crate::fs::{AccessRecorder, RafsFs, RafsFsOptions, RecordedList};
use crate::storage::config::{BackendConfig, ByteSize, StorageConfig, StorageStack};
use crate::storage::{cache, S3Config, DEFAULT_CACHE_DIR};
use crate::util::parse_size;

/// Which backend `--backend` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A local directory of blobs (`--blob-dir`).
    Localfs,
    /// S3-compatible object storage (`--s3-*`).
    S3,
}

/// Storage options of `mount` and `serve`; they override the `--config` file.
#[derive(Args, Debug, Default)]
pub struct StorageArgs {
    /// JSON config file (see configs/skiff.json): backend, cache, prefetch, retry.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The backend (default: localfs with --blob-dir, else the config file's).
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// S3 endpoint URL, e.g. http://127.0.0.1:9000.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// S3 region for signing.
    #[arg(long)]
    pub s3_region: Option<String>,
    /// S3 bucket.
    #[arg(long)]
    pub s3_bucket: Option<String>,
    /// Object key prefix; the key is the prefix plus the hex blob id.
    #[arg(long)]
    pub s3_prefix: Option<String>,
    /// Virtual-host style URLs (bucket.endpoint/key) instead of path style.
    #[arg(long)]
    pub s3_virtual_host: bool,
    /// Shared on-disk chunk cache (default /var/cache/skiff/chunks for remote backends).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// No on-disk chunk cache.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Byte limit of the on-disk cache (e.g. 10G); least recently used chunks are evicted.
    #[arg(long, value_parser = parse_size)]
    pub cache_limit: Option<u64>,
    /// Image paths (one per line) to fetch in the background first.
    #[arg(long)]
    pub prefetch_files: Option<PathBuf>,
    /// Fetch the whole image in the background.
    #[arg(long)]
    pub prefetch_all: bool,
    /// Bandwidth cap of background prefetch, bytes per second (e.g. 20M).
    #[arg(long, value_parser = parse_size)]
    pub prefetch_bandwidth: Option<u64>,
    /// Do not prefetch the files listed in the image's prefetch table.
    #[arg(long)]
    pub no_image_prefetch: bool,
    /// Write storage metrics as JSON to this file (every second and at exit).
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
    /// Do not decode and verify the chunks that follow a read ahead of need (see
    /// docs/cache.md, decode-ahead).
    #[arg(long)]
    pub no_decode_ahead: bool,
}

impl StorageArgs {
    /// The configuration: the `--config` file, overridden by flags.
    pub fn config(
        &self,
        blob_dir: Option<&PathBuf>,
    ) -> Result<StorageConfig, Box<dyn std::error::Error>> {
        let mut c = match &self.config {
            Some(p) => StorageConfig::load(p)?,
            None => StorageConfig::default(),
        };
        let s3_flags = self.s3_endpoint.is_some()
            || self.s3_bucket.is_some()
            || self.s3_region.is_some()
            || self.s3_prefix.is_some()
            || self.s3_virtual_host;
        let kind = self.backend.or(if s3_flags {
            Some(BackendKind::S3)
        } else if blob_dir.is_some() {
            Some(BackendKind::Localfs)
        } else {
            None
        });
        match kind {
            Some(BackendKind::Localfs) => {
                let dir = blob_dir.ok_or("--backend localfs needs --blob-dir")?;
                if s3_flags {
                    return Err("--s3-* options need --backend s3".into());
                }
                c.backend = Some(BackendConfig::Localfs { dir: dir.clone() });
            }
            Some(BackendKind::S3) => {
                if blob_dir.is_some() {
                    return Err("--blob-dir is for the localfs backend, not s3".into());
                }
                let mut s3 = match c.backend.take() {
                    Some(BackendConfig::S3(s)) => s,
                    _ => S3Config {
                        endpoint: String::new(),
                        region: "us-east-1".into(),
                        bucket: String::new(),
                        prefix: String::new(),
                        path_style: true,
                        access_key_id: None,
                        secret_access_key: None,
                        session_token: None,
                        timeout_secs: None,
                        connect_timeout_secs: None,
                        skip_verify: false,
                    },
                };
                if let Some(e) = &self.s3_endpoint {
                    s3.endpoint = e.clone();
                }
                if let Some(r) = &self.s3_region {
                    s3.region = r.clone();
                }
                if let Some(b) = &self.s3_bucket {
                    s3.bucket = b.clone();
                }
                if let Some(p) = &self.s3_prefix {
                    s3.prefix = p.clone();
                }
                if self.s3_virtual_host {
                    s3.path_style = false;
                }
                if s3.endpoint.is_empty() || s3.bucket.is_empty() {
                    return Err("the s3 backend needs --s3-endpoint and --s3-bucket".into());
                }
                c.backend = Some(BackendConfig::S3(s3));
            }
            None => {}
        }
        if let Some(d) = &self.cache_dir {
            c.cache.dir = Some(d.clone());
            c.cache.enabled = Some(true);
        }
        if self.no_cache {
            c.cache.enabled = Some(false);
        }
        if let Some(l) = self.cache_limit {
            c.cache.limit = Some(ByteSize::Bytes(l));
        }
        if let Some(f) = &self.prefetch_files {
            c.prefetch.files = Some(f.clone());
        }
        if self.prefetch_all {
            c.prefetch.all = true;
        }
        if let Some(b) = self.prefetch_bandwidth {
            c.prefetch.bandwidth = Some(ByteSize::Bytes(b));
        }
        if self.no_image_prefetch {
            c.prefetch.use_image_list = Some(false);
        }
        if let Some(m) = &self.metrics_file {
            c.metrics_file = Some(m.clone());
        }
        if self.no_decode_ahead {
            c.decode_ahead = Some(false);
        }
        Ok(c)
    }
}

impl ImageArgs {
    /// Loads the image (through `share`, when given) and sets up its storage: a filesystem
    /// ready to serve, and the running storage stack (metrics, prefetch) to
    /// [`StorageStack::finish`] when serving ends.
    pub fn open_with_storage(
        &self,
        share: Option<&crate::share::BootstrapShare>,
    ) -> Result<(RafsFs, StorageStack), Box<dyn std::error::Error>> {
        self.open_inner(false, share)
    }

    /// Like [`Self::open_with_storage`]; with `record`, the filesystem records the files read
    /// (see [`RafsFs::recorder`]).
    pub fn open_for(
        &self,
        record: bool,
        share: Option<&crate::share::BootstrapShare>,
    ) -> Result<(RafsFs, StorageStack), Box<dyn std::error::Error>> {
        self.open_inner(record, share)
    }

    fn open_inner(
        &self,
        record: bool,
        share: Option<&crate::share::BootstrapShare>,
    ) -> Result<(RafsFs, StorageStack), Box<dyn std::error::Error>> {
        let recorder =
            |b: &Bootstrap| record.then(|| Arc::new(AccessRecorder::new(b.inode_count())));
        let fs_opts = RafsFsOptions {
            // `mount` and `serve` give the image a connection of its own.
            zero_message_open: true,
            request_timeout: self.request_timeout,
            ..RafsFsOptions::default()
        };
        let config = self.storage.config(self.blob_dir.as_ref())?;
        if let Some(r) = &self.image {
            if config.backend.is_some() {
                return Err(
                    "--image brings its own backend (the registry); drop --blob-dir, \
                            --backend and the config file's backend"
                        .into(),
                );
            }
            let reference = crate::oci::Reference::parse(r)?;
            let opts = self.registry.options(&reference.registry, false)?;
            let client = crate::oci::RegistryClient::new(&reference, &opts)?;
            let boot_cache = match config.cache_dir(true) {
                Some(d) => Some(cache::BootstrapCache::open(&d)?),
                None => None,
            };
            let img = crate::oci::open_image(client, boot_cache.as_ref(), share)?;
            let b = img.bootstrap;
            tracing::info!(image = %r, format = b.source_format().name(), root = %digest_hex(b.root_digest()), inodes = b.inode_count(), "image fetched and verified");
            let stack = config.open_with_backend(&b, Box::new(img.backend), true)?;
            let fs_opts = RafsFsOptions {
                demand: Some(stack.metrics.clone()),
                record: recorder(&b),
                ..fs_opts
            };
            let fs = RafsFs::new(b, stack.source.clone(), fs_opts);
            return Ok((fs, stack));
        }
        let bootstrap = self
            .bootstrap
            .as_ref()
            .ok_or("give --bootstrap (with --blob-dir or another backend), or --image")?;
        let start = std::time::Instant::now();
        let b = crate::share::load_file(bootstrap, share)?;
        tracing::info!(
            bootstrap = %bootstrap.display(),
            format = b.source_format().name(),
            root = %digest_hex(b.root_digest()),
            inodes = b.inode_count(),
            load_ms = format_args!("{:.1}", start.elapsed().as_secs_f64() * 1000.0),
            "image loaded and verified"
        );
        let stack = config.open(&b)?;
        let fs_opts = RafsFsOptions {
            // The set of chunks read costs a lock and memory on every read: worth it where
            // bytes are fetched over a network, and only there.
            demand: stack.remote.then(|| stack.metrics.clone()),
            record: recorder(&b),
            ..fs_opts
        };
        let fs = RafsFs::new(b, stack.source.clone(), fs_opts);
        Ok((fs, stack))
    }
}

/// Arguments of `skiff cache`.
#[derive(Args, Debug)]
pub struct CacheArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CacheCommand,
}

/// The `skiff cache` subcommands.
#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Show what the chunk cache holds.
    Stat {
        /// The cache directory.
        #[arg(long, default_value = DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove stale temporary and lock files and, with --limit, evict least recently used
    /// chunks down to the limit.
    Gc {
        /// The cache directory.
        #[arg(long, default_value = DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Keep at most this many bytes of chunks (e.g. 10G).
        #[arg(long, value_parser = parse_size)]
        limit: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `skiff cache`.
pub fn cmd_cache(a: CacheArgs) -> CmdResult {
    match a.command {
        CacheCommand::Stat { cache_dir, json } => {
            if !cache_dir.is_dir() {
                return Err(format!("{}: no such cache directory", cache_dir.display()).into());
            }
            let s = cache::stat(&cache_dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("dir           {}", s.dir);
                println!("chunks        {}", s.chunks);
                println!("bytes         {}", s.bytes);
                println!("tmp files     {}", s.tmp_files);
                println!("lock files    {}", s.lock_files);
                if let Some(age) = s.oldest_access_age_secs {
                    println!("oldest use    {age} s ago");
                }
            }
        }
        CacheCommand::Gc {
            cache_dir,
            limit,
            json,
        } => {
            if !cache_dir.is_dir() {
                return Err(format!("{}: no such cache directory", cache_dir.display()).into());
            }
            let r = cache::gc(&cache_dir, limit);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "removed {} temporary and {} lock files; evicted {} chunks ({} bytes); {} bytes left",
                    r.tmp_removed, r.locks_removed, r.chunks_evicted, r.bytes_evicted, r.bytes_left
                );
            }
        }
    }
    Ok(0)
}

/// Reads a list of image paths: one per line, blank lines and `#` comments skipped.
pub fn read_path_list(path: &std::path::Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading prefetch list {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

impl ImageArgs {
    /// Loads the image into a filesystem ready to serve, with a private bootstrap; background
    /// work (prefetch, metrics file) runs on detached. Prefer [`ImageArgs::open_with_storage`].
    pub fn open(&self) -> Result<RafsFs, Box<dyn std::error::Error>> {
        Ok(self.open_with_storage(None)?.0)
    }
}

/// A `--record FILE` in progress: the list is written when recording starts (so that a path
/// that cannot be written fails at once, not after the workload), again every second while it
/// grows (an operator can read it at any time, and a daemon killed outright leaves what it saw
/// so far), and a last time by [`Recording::finish`].
pub struct Recording {
    recorder: Arc<AccessRecorder>,
    bootstrap: Arc<Bootstrap>,
    path: PathBuf,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recording {
    /// Starts writing what `fs` records to `path`; `None` if `fs` records nothing.
    pub fn start(fs: &RafsFs, path: PathBuf) -> Result<Option<Self>, Box<dyn std::error::Error>> {
        let Some(recorder) = fs.recorder().cloned() else {
            return Ok(None);
        };
        let bootstrap = fs.bootstrap().clone();
        recorder.write(&bootstrap, &path)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (r, b, p) = (recorder.clone(), bootstrap.clone(), path.clone());
        let thread = crate::runtime::threads::spawn(
            crate::runtime::ThreadKind::Housekeeping,
            "skiff-record",
            move || {
                let mut written = 0usize;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(std::time::Duration::from_secs(1))
                {
                    let n = r.len();
                    if n != written {
                        if let Err(e) = r.write(&b, &p) {
                            tracing::warn!(error = %crate::util::error_chain(&e), "cannot write the access list");
                        }
                        written = n;
                    }
                }
            },
        )
        .map_err(|e| tracing::warn!(error = %e, "no periodic writer of the access list"))
        .ok();
        Ok(Some(Self {
            recorder,
            bootstrap,
            path,
            stop: Some(stop),
            thread,
        }))
    }

    /// Stops the periodic writer and writes the list a last time.
    pub fn finish(mut self) -> Result<RecordedList, Box<dyn std::error::Error>> {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Ok(self.recorder.write(&self.bootstrap, &self.path)?)
    }
}
