//! One function per subcommand: parse nothing, decide nothing, call the library.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::build::{self, BuildOptions, BuildSource, Compressor};
use crate::check;
use crate::format::{digest_hex, Bootstrap, InodeKind, DEFAULT_CHUNK_SIZE};
use crate::util::{parse_duration, parse_size, write_atomically};

/// A command's outcome: an exit code, or an error printed as one line.
pub type CmdResult = Result<i32, Box<dyn std::error::Error>>;

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("chunk size {s:?} too large"))
}

/// Arguments of `skiff build`.
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// One directory, or one or more OCI layer tarballs (.tar, .tar.gz, .tar.zst) applied in order.
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Where to write the bootstrap.
    #[arg(long)]
    pub bootstrap: PathBuf,
    /// Directory for blobs (created if missing).
    #[arg(long)]
    pub blob_dir: PathBuf,
    /// Chunk size: a power of two from 4K to 16M.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_chunk_size)]
    pub chunk_size: u32,
    /// Chunk compression.
    #[arg(long, value_enum, default_value_t = Compressor::Lz4)]
    pub compressor: Compressor,
    /// Reuse chunks stored by an earlier image (its bootstrap; its blobs in --blob-dir).
    #[arg(long = "chunk-dict")]
    pub chunk_dicts: Vec<PathBuf>,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Image paths, one per line in access order (as `skiff record` writes them), whose
    /// chunks a daemon fetches first: the bootstrap's prefetch table. Their chunks are also
    /// stored in a blob of their own, in that order, so that they come in one or two requests.
    #[arg(long)]
    pub prefetch_list: Option<PathBuf>,
    /// With --prefetch-list: keep the listed files' chunks only where they are (no prefetch
    /// blob).
    #[arg(long, requires = "prefetch_list")]
    pub no_prefetch_blob: bool,
    /// Threads reading a source directory (and walking it). Reads of many files at once keep
    /// a cold disk busy; the image is the same for any number. 0 picks the default.
    #[arg(long, default_value_t = build::dir::DEFAULT_IO_THREADS)]
    pub io_threads: usize,
}

/// `skiff build`.
pub fn cmd_build(a: BuildArgs) -> CmdResult {
    let source = BuildSource::from_paths(&a.sources)?;
    let opts = BuildOptions {
        bootstrap: a.bootstrap,
        blob_dir: a.blob_dir,
        chunk_size: a.chunk_size,
        compressor: a.compressor,
        chunk_dicts: a.chunk_dicts,
        progress: true,
        io_threads: a.io_threads,
        blob_id_sha256: false,
        node_compat: false,
    };
    let prefetch = build::PrefetchLayout {
        paths: match &a.prefetch_list {
            Some(p) => super::image::read_path_list(p)?,
            None => Vec::new(),
        },
        own_blob: !a.no_prefetch_blob,
    };
    let summary = build::build_with_prefetch(&source, &opts, &prefetch)?;
    println!("{summary}");
    if let Some(j) = a.json {
        let text = serde_json::to_string_pretty(&summary)?;
        write_atomically(&j, text.as_bytes())?;
    }
    Ok(0)
}

/// Arguments of `skiff inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The bootstrap to inspect.
    #[arg(long)]
    pub bootstrap: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Show this entry (a path in the image) and its chunks instead of image statistics.
    pub path: Option<String>,
}

/// `skiff inspect`.
pub fn cmd_inspect(a: InspectArgs) -> CmdResult {
    let b = Bootstrap::load(&a.bootstrap)?;
    let Some(path) = a.path else {
        let stats = check::image_stats(&b);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&stats)?);
        } else {
            println!("format        {}", stats.format);
            println!("root digest   {}", stats.root_digest);
            println!("chunk size    {}", stats.chunk_size);
            println!("bootstrap     {} bytes", stats.bootstrap_bytes);
            for (k, n) in &stats.inodes {
                println!("inodes        {n} {k}");
            }
            println!("entries       {}", stats.entries);
            println!("content       {} bytes", stats.content_bytes);
            println!(
                "chunks        {} ({} unique, {} zero)",
                stats.chunks, stats.unique_chunks, stats.zero_chunks
            );
            for (id, size) in &stats.blobs {
                println!("blob          {id} {size} bytes");
            }
            println!("prefetch      {} files", stats.prefetch);
        }
        return Ok(0);
    };
    let mut ino = 0u32;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = b
            .lookup(ino, part.as_bytes())
            .ok_or_else(|| format!("{path}: no such entry in the image"))?;
    }
    let rec = b.inode(ino).ok_or("inode out of range")?;
    let chunks: Vec<serde_json::Value> = b
        .file_chunks(ino)
        .iter()
        .map(|c| {
            serde_json::json!({
                "digest": c.chunk_digest().to_string(),
                "size": c.uncompressed_size.get(),
                "zero": c.is_zero(),
                "lz4": c.is_lz4(),
                "compression": format!("{:?}", c.compression()).to_lowercase(),
                "blob": b.blobs().get(c.blob_index.get() as usize).filter(|_| !c.is_zero()).map(|r| digest_hex(&r.id)),
                "offset": c.compressed_offset.get(),
                "stored_size": c.compressed_size.get(),
            })
        })
        .collect();
    let entry = serde_json::json!({
        "path": path,
        "inode": ino + 1,
        "kind": format!("{:?}", rec.kind().unwrap_or(InodeKind::Regular)),
        "mode": format!("{:o}", rec.mode.get()),
        "uid": rec.uid.get(),
        "gid": rec.gid.get(),
        "nlink": rec.nlink.get(),
        "size": rec.size.get(),
        "rdev": rec.rdev.get(),
        "mtime": format!("{}.{:09}", rec.mtime.get(), rec.mtime_nsec.get()),
        "digest": digest_hex(&rec.digest),
        "symlink_target": b.symlink_target(ino).map(|t| String::from_utf8_lossy(t).into_owned()),
        "xattrs": b.xattrs(ino).map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), hex::encode(v))).collect::<std::collections::BTreeMap<_, _>>(),
        "entries": b.dir_entries(ino).len(),
        "chunks": chunks,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&entry)?);
    } else if let Some(obj) = entry.as_object() {
        for (k, v) in obj {
            if k != "chunks" {
                println!("{k:<15} {v}");
            }
        }
        for (i, c) in chunks.iter().enumerate() {
            println!("chunk {i:<9} {c}");
        }
    }
    Ok(0)
}

/// How to reach a registry (`mount --image`, `serve --image`).
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Speak plain HTTP to the registry (always done for localhost and 127.0.0.0/8).
    #[arg(long)]
    pub insecure: bool,
    /// Registry credentials as user:password (else $SKIFF_REGISTRY_AUTH, else the Docker
    /// config file, else anonymous).
    #[arg(long, value_name = "USER:PASS")]
    pub registry_auth: Option<String>,
    /// A mirror host[:port] tried before the image's registry for pulls; repeatable.
    #[arg(long = "mirror", value_name = "HOST")]
    pub mirrors: Vec<String>,
    /// An HTTP proxy URL for registry requests.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
}

impl RegistryArgs {
    /// Registry options for `registry` (credentials looked up for that host).
    pub fn options(
        &self,
        registry: &str,
        insecure: bool,
    ) -> Result<crate::oci::RegistryOptions, crate::oci::OciError> {
        Ok(crate::oci::RegistryOptions {
            insecure: insecure || self.insecure,
            mirrors: self
                .mirrors
                .iter()
                .map(|m| crate::oci::registry::Mirror::plain(m))
                .collect(),
            proxy: self.proxy.clone(),
            credentials: crate::oci::auth::find_credentials(
                self.registry_auth.as_deref(),
                registry,
            )?,
            timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        })
    }
}

/// The image options shared by `mount` and `serve`: a local image, or one in a registry.
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// The image's bootstrap.
    #[arg(long, required_unless_present = "image")]
    pub bootstrap: Option<PathBuf>,
    /// Directory holding the image's blobs (the localfs backend).
    #[arg(long)]
    pub blob_dir: Option<PathBuf>,
    /// A Skiff image in a registry (made by `skiff convert`): its bootstrap is fetched and
    /// verified at start, its chunks fetched by range on first read.
    #[arg(long, conflicts_with_all = ["bootstrap", "blob_dir"], value_name = "REF")]
    pub image: Option<String>,
    /// Registry settings for --image.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Backend, cache, prefetch and metrics options (src/cli/image.rs).
    #[command(flatten)]
    pub storage: super::image::StorageArgs,
    /// Sharing the bootstrap with the node's other daemons.
    #[command(flatten)]
    pub share: ShareArgs,
    /// How long one read may take, network retries included (e.g. 30s, 500ms): then it
    /// fails with EIO and a log line instead of hanging the reader.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub request_timeout: std::time::Duration,
}

/// Sharing validated bootstraps with the other daemons of the node (`crate::share`), for
/// `mount`, `serve`, `virtiofs` and `fuse`.
#[derive(Args, Debug, Clone, Default)]
pub struct ShareArgs {
    /// Directory where the node's daemons share validated bootstraps, one copy in memory for
    /// all (default /run/skiff/bootstraps as root, $XDG_RUNTIME_DIR/skiff/bootstraps
    /// otherwise).
    #[arg(long, value_name = "DIR")]
    pub bootstrap_share_dir: Option<PathBuf>,
    /// Keep a private copy of each bootstrap: take none from other daemons, offer none.
    #[arg(long, conflicts_with = "bootstrap_share_dir")]
    pub no_bootstrap_share: bool,
}

impl ShareArgs {
    /// The share these options ask for: none with `--no-bootstrap-share`; a directory given
    /// that cannot be used is an error; the default one is skipped with a warning.
    pub fn open(
        &self,
    ) -> Result<Option<Arc<crate::share::BootstrapShare>>, Box<dyn std::error::Error>> {
        if self.no_bootstrap_share {
            return Ok(None);
        }
        if let Some(d) = &self.bootstrap_share_dir {
            return Ok(Some(Arc::new(crate::share::BootstrapShare::open(d)?)));
        }
        let Some(d) = crate::share::default_dir() else {
            tracing::info!("no runtime directory (XDG_RUNTIME_DIR) for sharing bootstraps; each is loaded privately");
            return Ok(None);
        };
        match crate::share::BootstrapShare::open(&d) {
            Ok(s) => Ok(Some(Arc::new(s))),
            Err(e) => {
                tracing::warn!(error = %crate::util::error_chain(&e), "bootstraps are not shared with other daemons");
                Ok(None)
            }
        }
    }
}

/// Arguments of `skiff convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The OCI image to convert: a reference, an OCI image layout directory, or a
    /// `docker save` tarball.
    #[arg(long, value_name = "REF|DIR|TAR")]
    pub source: String,
    /// Where to push the Skiff image (a reference).
    #[arg(long, value_name = "REF")]
    pub target: String,
    /// Speak plain HTTP to the source registry.
    #[arg(long)]
    pub source_insecure: bool,
    /// Speak plain HTTP to the target registry.
    #[arg(long)]
    pub target_insecure: bool,
    /// Registry settings (credentials apply to both registries).
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Scratch directory for layers and blobs (default: a temporary directory, removed).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Chunk size: a power of two from 4K to 16M.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_chunk_size)]
    pub chunk_size: u32,
    /// Chunk compression.
    #[arg(long, value_enum, default_value_t = Compressor::Lz4)]
    pub compressor: Compressor,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Convert every platform of an index source and push an index of the converted
    /// manifests (default: linux/amd64 only, pushed as one manifest).
    #[arg(long)]
    pub all_platforms: bool,
    /// Image paths, one per line in access order (as `skiff record` writes them): stored as
    /// the image's prefetch table, and their chunks once more in a prefetch blob of their own
    /// (a layer after the others), in that order, so that a daemon fetches them in one or two
    /// range requests.
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<PathBuf>,
    /// With --prefetch-list: no prefetch blob (the table only).
    #[arg(long, requires = "prefetch_list")]
    pub no_prefetch_blob: bool,
    /// How the image is laid out in the registry: `node` (what containerd with
    /// nydus-snapshotter pulls: blobs named by sha256, the bootstrap in a gzip tar layer) or
    /// `skiff` (the earlier layout, blobs named by blake3).
    #[arg(long, value_enum, default_value_t = crate::oci::ImageLayout::Node)]
    pub layout: crate::oci::ImageLayout,
}

/// `skiff convert`.
pub fn cmd_convert(a: ConvertArgs) -> CmdResult {
    let target = crate::oci::Reference::parse(&a.target)?;
    let source_registry = match crate::oci::Reference::parse(&a.source) {
        Ok(r) if !std::path::Path::new(&a.source).exists() => {
            a.registry.options(&r.registry, a.source_insecure)?
        }
        _ => crate::oci::RegistryOptions::default(),
    };
    let mut target_registry = a.registry.options(&target.registry, a.target_insecure)?;
    // An upload's body is sent within one request's timeout: allow for slow links.
    target_registry.timeout = Some(std::time::Duration::from_secs(600));
    let (work_dir, _tmp) = match &a.work_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempdir_in_var_tmp()?;
            (t.clone(), Some(RemoveOnDrop(t)))
        }
    };
    let report = crate::oci::convert(&crate::oci::ConvertOptions {
        source: a.source,
        source_registry,
        target,
        target_registry,
        work_dir,
        chunk_size: a.chunk_size,
        compressor: a.compressor,
        progress: true,
        prefetch: crate::build::PrefetchLayout {
            paths: match &a.prefetch_list {
                Some(p) => super::image::read_path_list(p)?,
                None => Vec::new(),
            },
            own_blob: !a.no_prefetch_blob,
        },
        platforms: if a.all_platforms {
            crate::oci::Platforms::All
        } else {
            crate::oci::Platforms::Default
        },
        layout: a.layout,
    })?;
    for summary in report.images() {
        if let Some(p) = &summary.platform {
            println!("platform    {p}");
        }
        // The build summary's "blob" line describes one new blob; here there is one per layer.
        for line in summary.build.to_string().lines() {
            if !line.starts_with("blob ") {
                println!("{line}");
            }
        }
        for b in &summary.blobs {
            let what = if b.prefetch {
                "prefetch   ".to_string()
            } else {
                format!("layer {:<5}", b.layer)
            };
            println!(
                "{what} blob {} as {} ({} bytes)",
                b.blob_id, b.digest, b.size
            );
        }
        let packed = match a.layout {
            crate::oci::ImageLayout::Node => "gzip tar",
            crate::oci::ImageLayout::Skiff => "zstd",
        };
        println!(
            "bootstrap   {} ({} bytes {packed}, {} bytes)",
            summary.bootstrap_digest, summary.bootstrap_bytes, summary.bootstrap_uncompressed_bytes
        );
        println!("manifest    {}", summary.manifest_digest);
    }
    let target = match &report {
        crate::oci::ConvertReport::Image(s) => &s.target,
        crate::oci::ConvertReport::Index { target, .. } => target,
    };
    println!("pushed      {target}@{}", report.digest());
    if let Some(j) = a.json {
        let text = serde_json::to_string_pretty(&report)?;
        write_atomically(&j, text.as_bytes())?;
    }
    Ok(0)
}

/// A scratch directory removed when dropped.
pub(super) struct RemoveOnDrop(pub(super) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new private directory under `$TMPDIR` (or /var/tmp, which is on disk, for large layers).
pub(super) fn tempdir_in_var_tmp() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let base = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    for i in 0..100u32 {
        let d = base.join(format!("skiff-convert-{}-{i}", std::process::id()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("creating {}: {e}", d.display()).into()),
        }
    }
    Err("no free scratch directory name".into())
}

/// Arguments of `skiff mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// The image.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Threads reading requests from /dev/fuse; one is enough (they answer from memory, and
    /// hand reads that may wait to the workers).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Record the files read, in first-read order, into this prefetch list (written at
    /// start, every second while it grows, and at exit; see `skiff record`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Most worker threads answering reads that may wait (on a disk, the network): how many
    /// may be in flight at once before another waits for a worker. Started on demand.
    #[arg(long, default_value_t = crate::runtime::DEFAULT_WORKERS)]
    pub thread_num: usize,
}

/// Threshold above which glibc serves an allocation with its own mmap (and returns it to the
/// kernel on free). 128 KiB is glibc's default starting value; setting it fixes it there.
const MMAP_THRESHOLD: i32 = 128 << 10;

/// Sets glibc's allocator up for a long-running daemon whose large allocations are transient
/// chunk buffers (a stored chunk, a decompressed 1 MiB chunk), so that its memory follows what
/// it holds rather than what it once held:
///
/// - A fixed mmap threshold. By default glibc raises the threshold to the size of each large
///   block freed, so after the first chunk every chunk buffer comes from the heap, and the
///   freed buffers stay in the process (fragmented, mostly untrimmed). Fixed, each buffer is
///   its own mapping, unmapped on free: a few system calls and page faults per chunk, small
///   next to decompressing and hashing it.
/// - At most two arenas. glibc gives threads up to 8 per core, each keeping its own freed
///   memory; the daemon's threads allocate little besides the chunk buffers above.
pub(crate) fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it is called before the daemon starts
    // its threads, and a refused setting (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `skiff mount`.
pub fn cmd_mount(a: MountArgs) -> CmdResult {
    tune_allocator();
    // Before the storage starts its threads, so that they belong to the daemon.
    if !(1..=crate::runtime::MAX_WORKERS).contains(&a.threads)
        || !(1..=crate::runtime::MAX_WORKERS).contains(&a.thread_num)
    {
        return Err(format!(
            "--threads {} and --thread-num {}: each 1 to {}",
            a.threads,
            a.thread_num,
            crate::runtime::MAX_WORKERS
        )
        .into());
    }
    let exit = crate::runtime::start_daemon()?;
    let share = a.image.share.open()?;
    let (fs, storage) = a.image.open_for(a.record.is_some(), share.as_deref())?;
    let recording = match a.record {
        Some(p) => super::image::Recording::start(&fs, p)?,
        None => None,
    };
    let _signals = crate::runtime::SignalGuard::install(&exit)?;
    let served = crate::fuse::serve_until(
        Arc::new(fs),
        &crate::fuse::MountOptions {
            mountpoint: a.mountpoint,
            threads: crate::fuse::FuseThreads {
                readers: a.threads,
                workers: a.thread_num,
            },
        },
        &exit,
    );
    storage.finish();
    let recorded = recording.map(super::image::Recording::finish).transpose();
    served?;
    recorded?;
    Ok(0)
}

/// Arguments of `skiff serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The image.
    #[command(flatten)]
    pub image: ImageArgs,
    /// The vhost-user socket to create and listen on.
    #[arg(long)]
    pub socket: PathBuf,
    /// The virtio-fs tag the guest mounts.
    #[arg(long, default_value = "skiff")]
    pub tag: String,
    /// Request queues offered to the VMM, each with its own queue thread.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Most worker threads answering requests: how many may be in flight at once (e.g.
    /// waiting on the network) before another waits for a worker. Started on demand.
    #[arg(long, default_value_t = crate::vhost::DEFAULT_WORKERS)]
    pub thread_num: usize,
    /// Offer the virtio config space (the tag) to the VMM. Off by default: QEMU 7.1 to 8.0
    /// abort when a vhost-user-fs device offers it.
    #[arg(long)]
    pub advertise_config: bool,
    /// Record the files the guest reads, in first-read order, into this prefetch list
    /// (written at start, every second while it grows, and at exit; see `skiff record`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Confinement (see docs/serve.md#the-sandbox).
    #[command(flatten)]
    pub sandbox: super::SandboxArgs,
}

/// `skiff serve`.
pub fn cmd_serve(mut a: ServeArgs) -> CmdResult {
    tune_allocator();
    // Before the storage starts its threads, so that they belong to the daemon.
    let exit = crate::runtime::start_daemon()?;
    // Before anything is opened: inside, only what the image needs is there.
    let paths = serve_paths(&mut a)?;
    // Opened (and made) before: the sandbox keeps it reachable.
    let share = a.image.share.open()?;
    let mut sandbox = super::serve_options(&a.sandbox, &paths)?;
    if let Some(s) = &share {
        sandbox
            .reach
            .push(crate::sandbox::Reach::write(s.dir().to_owned()));
    }
    crate::sandbox::enter(&sandbox)?;
    let (fs, storage) = a.image.open_for(a.record.is_some(), share.as_deref())?;
    let recording = match a.record {
        Some(p) => super::image::Recording::start(&fs, p)?,
        None => None,
    };
    let mut opts = crate::vhost::ServeOptions::new(a.socket, a.tag);
    opts.threads = a.threads;
    opts.workers = a.thread_num;
    opts.advertise_config = a.advertise_config;
    let _signals = crate::runtime::SignalGuard::install(&exit)?;
    let served = crate::vhost::serve_until(Arc::new(fs), &opts, &exit);
    storage.finish();
    let recorded = recording.map(super::image::Recording::finish).transpose();
    served?;
    recorded?;
    Ok(0)
}

/// Makes `serve`'s paths absolute (the sandbox keeps the working directory only if it is
/// reachable) and lists what it reads and writes.
fn serve_paths(a: &mut ServeArgs) -> Result<super::ServePaths, Box<dyn std::error::Error>> {
    use crate::sandbox::absolute;
    let abs = |p: &mut Option<PathBuf>| -> std::io::Result<()> {
        if let Some(v) = p {
            *v = absolute(v)?;
        }
        Ok(())
    };
    a.socket = absolute(&a.socket)?;
    abs(&mut a.image.bootstrap)?;
    abs(&mut a.image.blob_dir)?;
    let st = &mut a.image.storage;
    abs(&mut st.config)?;
    abs(&mut st.cache_dir)?;
    abs(&mut st.prefetch_files)?;
    abs(&mut st.metrics_file)?;
    abs(&mut a.record)?;
    let config = a.image.storage.config(a.image.blob_dir.as_ref())?;
    let mut p = super::ServePaths {
        socket: a.socket.clone(),
        ..Default::default()
    };
    let remote = a.image.image.is_some()
        || matches!(
            config.backend,
            Some(crate::storage::config::BackendConfig::S3(_))
        );
    p.network = remote;
    p.files.extend(a.image.bootstrap.clone());
    p.files.extend(a.image.storage.config.clone());
    if let Some(f) = &config.prefetch.files {
        p.files.push(absolute(f)?);
    }
    if let Some(crate::storage::config::BackendConfig::Localfs { dir }) = &config.backend {
        p.read_dirs.push(absolute(dir)?);
    }
    if let Some(d) = config.cache_dir(remote) {
        let d = absolute(&d)?;
        // Bound in by the sandbox, so it must exist first.
        std::fs::create_dir_all(&d).map_err(|e| format!("cache directory {}: {e}", d.display()))?;
        p.write_dirs.push(d);
    }
    if let Some(m) = &config.metrics_file {
        let m = absolute(m)?;
        p.write_dirs.push(
            m.parent()
                .map_or_else(|| PathBuf::from("/"), |d| d.to_owned()),
        );
    }
    if let Some(r) = &a.record {
        // The list is replaced atomically (a temporary file beside it, renamed): its
        // directory is written, and is made now, since it cannot be made inside.
        let d = r
            .parent()
            .map_or_else(|| PathBuf::from("/"), |d| d.to_owned());
        std::fs::create_dir_all(&d)
            .map_err(|e| format!("--record directory {}: {e}", d.display()))?;
        p.write_dirs.push(d);
    }
    if a.image.image.is_some() {
        if let Some(docker) = crate::oci::auth::docker_config_path().filter(|d| d.exists()) {
            p.files.push(absolute(&docker)?);
        }
    }
    Ok(p)
}

/// Arguments of `skiff virtiofs`, as Kata passes them to its `virtio_fs_daemon`.
#[derive(Args, Debug)]
pub struct VirtiofsArgs {
    /// The API socket (HTTP/1.1) to create, through which mounts are made.
    #[arg(long = "apisock")]
    pub api_socket: PathBuf,
    /// The vhost-user socket to create, which the VMM connects to.
    #[arg(long = "sock")]
    pub socket: PathBuf,
    /// The virtio-fs tag (the VMM's tag is what the guest sees; this one is offered only with
    /// --advertise-config).
    #[arg(long, default_value = "kataShared")]
    pub tag: String,
    /// Request queues offered to the VMM, each with its own queue thread.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Most worker threads answering requests (see `skiff serve --help`).
    #[arg(long, default_value_t = crate::vhost::DEFAULT_WORKERS)]
    pub thread_num: usize,
    /// How long one read of a RAFS mount may take, network retries included: then it fails
    /// with EIO and a log line instead of hanging the guest's reader.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub request_timeout: std::time::Duration,
    /// Offer the virtio config space (the tag) to the VMM (see `skiff serve --help`).
    #[arg(long)]
    pub advertise_config: bool,
    /// Passed by Kata's runtime-rs. Accepted: Skiff always serves passthrough and RAFS
    /// mounts side by side.
    #[arg(long)]
    pub hybrid_mode: bool,
    /// virtiofsd's worker pool size, from Kata's default `virtio_fs_extra_args`. Accepted
    /// and not used: virtiofsd sizes its pool for local I/O, and Kata's default of 1 would put
    /// every request behind one waiting on the network; Skiff's pool is --thread-num.
    #[arg(long, value_name = "N")]
    pub thread_pool_size: Option<usize>,
    /// virtiofsd's option, from Kata's default `virtio_fs_extra_args`. Accepted and not
    /// used: Skiff does not announce submounts to the guest.
    #[arg(long)]
    pub announce_submounts: bool,
    /// Sharing bootstraps with the node's other daemons.
    #[command(flatten)]
    pub share: ShareArgs,
    /// Confinement (see docs/kata.md#the-sandbox).
    #[command(flatten)]
    pub sandbox: super::SandboxArgs,
}

/// `skiff virtiofs`.
pub fn cmd_virtiofs(mut a: VirtiofsArgs) -> CmdResult {
    tune_allocator();
    // runtime-rs passes the sockets relative to the working directory.
    a.api_socket = crate::sandbox::absolute(&a.api_socket)?;
    a.socket = crate::sandbox::absolute(&a.socket)?;
    if a.hybrid_mode {
        tracing::info!("--hybrid-mode: always on in Skiff (passthrough and RAFS mounts together)");
    }
    if let Some(n) = a.thread_pool_size {
        tracing::info!(
            n,
            workers = a.thread_num,
            "--thread-pool-size is virtiofsd's; ignored (Skiff's worker pool is --thread-num)"
        );
    }
    if a.announce_submounts {
        tracing::info!(
            "--announce-submounts is virtiofsd's; ignored (Skiff does not announce submounts)"
        );
    }
    let mut sandbox = super::virtiofs_options(&a.sandbox, &a.api_socket, &a.socket)?;
    // Opened (and made) before the sandbox, which keeps it reachable.
    let share = a.share.open()?;
    if let Some(s) = &share {
        sandbox
            .reach
            .push(crate::sandbox::Reach::write(s.dir().to_owned()));
    }
    let mut device = crate::vhost::ServeOptions::new(a.socket, a.tag);
    device.threads = a.threads;
    device.workers = a.thread_num;
    device.advertise_config = a.advertise_config;
    crate::api::run_virtiofs(&crate::api::VirtiofsOptions {
        sandbox,
        api_socket: a.api_socket,
        device,
        request_timeout: a.request_timeout,
        share,
    })?;
    Ok(0)
}
