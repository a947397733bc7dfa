//! `skiff fuse`, nydus-snapshotter's host daemon, and Skiff under the name `nydusd`: the
//! command lines nydus-snapshotter and Kata build for nydusd, each option honoured or refused
//! at start with its reason.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clap::{Args, ValueEnum};

use super::commands::CmdResult;
use crate::daemon::host::{FailoverPolicy, HostOptions};
use crate::daemon::spec::{BackendSpec, BlobLocation, PrefetchSpec, RafsSpec};
use crate::daemon::RafsRequest;

/// nydusd's `--failover-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailoverArg {
    /// Requests a crashed daemon read but never answered are lost (their readers hang).
    None,
    /// The successor asks the kernel to send them again (FUSE_NOTIFY_RESEND).
    Resend,
    /// nydusd's sysfs `flush`: refused (no such file in mainline Linux).
    Flush,
}

/// Arguments of `skiff fuse`, with nydusd's spellings (nydus-snapshotter's command builder).
#[derive(Args, Debug)]
pub struct FuseArgs {
    /// Where to mount the FUSE filesystem.
    #[arg(long, short = 'M')]
    pub mountpoint: PathBuf,
    /// The API socket (HTTP/1.1) to create.
    #[arg(long, short = 'A')]
    pub apisock: PathBuf,
    /// nydusd's JSON configuration (version 1 or 2) of the image given by --bootstrap.
    #[arg(long, short = 'C')]
    pub config: Option<PathBuf>,
    /// A dedicated daemon's image, mounted at --virtual-mountpoint. Without it the daemon is
    /// shared: images are mounted over the API.
    #[arg(long, short = 'B')]
    pub bootstrap: Option<PathBuf>,
    /// Where in the FUSE filesystem the --bootstrap image goes.
    #[arg(long, short = 'm', default_value = "/")]
    pub virtual_mountpoint: String,
    /// A directory of blobs (the localfs backend), instead of --config.
    #[arg(long, short = 'D', conflicts_with = "config")]
    pub localfs_dir: Option<PathBuf>,
    /// A file listing image paths (one per line) of the --bootstrap image to prefetch first.
    #[arg(long, requires = "bootstrap")]
    pub prefetch_files: Option<PathBuf>,
    /// Most FUSE worker threads answering reads that may wait (1 to 1024), started on demand;
    /// one thread reads the requests and answers those it can from memory.
    #[arg(long = "thread-num", alias = "fuse-threads", default_value_t = crate::runtime::DEFAULT_WORKERS)]
    pub thread_num: usize,
    /// The daemon's identifier (needed with --supervisor).
    #[arg(long, requires = "supervisor")]
    pub id: Option<String>,
    /// The supervisor's socket, for failover and hot upgrade.
    #[arg(long, requires = "id")]
    pub supervisor: Option<PathBuf>,
    /// Start waiting for a takeover from the supervisor instead of mounting.
    #[arg(long)]
    pub upgrade: bool,
    /// What a successor does with requests a crashed daemon left unanswered.
    #[arg(long, value_enum, default_value_t = FailoverArg::Resend)]
    pub failover_policy: FailoverArg,
    /// Log to this file instead of stderr (`.log` is added if the name has no extension).
    #[arg(long, short = 'L')]
    pub log_file: Option<PathBuf>,
    /// Sharing bootstraps with the node's other daemons.
    #[command(flatten)]
    pub share: super::commands::ShareArgs,
    /// Rotate the log file at this many MiB (0: never).
    #[arg(long, default_value_t = 0)]
    pub log_rotation_size: u64,
    /// Raise the open files limit to this (0 leaves it unchanged; default unchanged).
    #[arg(long)]
    pub rlimit_nofile: Option<u64>,
    /// Refused: the snapshotter's experimental backend source.
    #[arg(long, hide = true)]
    pub backend_source: Option<String>,
    /// Refused: fscache is the singleton daemon's mode.
    #[arg(long, short = 'F', hide = true)]
    pub fscache: Option<String>,
    /// Refused with --fscache.
    #[arg(long, hide = true)]
    pub fscache_threads: Option<String>,
    /// Refused: images are read-only.
    #[arg(long, hide = true)]
    pub writable: bool,
    /// Refused: a passthrough is served by `skiff virtiofs`.
    #[arg(long, short = 's', hide = true)]
    pub shared_dir: Option<PathBuf>,
}

/// A refusal at start: the option and why.
fn refuse(option: &str, why: &str) -> Box<dyn std::error::Error> {
    format!("{option} is not supported: {why}").into()
}

/// Checks what `skiff fuse` refuses, before anything starts.
fn check_refused(a: &FuseArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.backend_source.is_some() {
        return Err(refuse(
            "--backend-source",
            "Skiff reads the backend from --config; turn the snapshotter's experimental \
             enable_backend_source off so that it writes the backend into the config",
        ));
    }
    if a.fscache.is_some() || a.fscache_threads.is_some() {
        return Err(refuse(
            "--fscache",
            "fscache (EROFS over the kernel's fscache) is nydusd's singleton mode; use \
             fs_driver = \"fusedev\"",
        ));
    }
    if a.writable {
        return Err(refuse("--writable", "images are served read-only"));
    }
    if a.shared_dir.is_some() {
        return Err(refuse(
            "--shared-dir",
            "a FUSE host daemon serves RAFS images; a shared directory is `skiff virtiofs`'s",
        ));
    }
    if a.failover_policy == FailoverArg::Flush {
        return Err(refuse(
            "--failover-policy flush",
            "it writes a fusectl \"flush\" file that mainline Linux does not have; use \
             resend (FUSE_NOTIFY_RESEND, Linux 6.9 and later) or none",
        ));
    }
    if !(1..=1024).contains(&a.thread_num) {
        return Err(format!("--thread-num {}: 1 to 1024", a.thread_num).into());
    }
    if a.bootstrap.is_none() && (a.config.is_some() || a.localfs_dir.is_some()) {
        // nydusd takes --config without --bootstrap as the shared daemon's default, but
        // every API mount brings its own config: the file would change nothing.
        if a.localfs_dir.is_some() {
            return Err(refuse(
                "--localfs-dir without --bootstrap",
                "a shared daemon's mounts each bring their config",
            ));
        }
        tracing::info!("--config without --bootstrap: a shared daemon's mounts each bring their own config; the file is read and checked only");
    }
    if a.bootstrap.is_some() && a.config.is_none() && a.localfs_dir.is_none() {
        return Err(
            "--bootstrap needs --config (or --localfs-dir) to say where its blobs are".into(),
        );
    }
    Ok(())
}

/// The dedicated image's mount request.
fn dedicated(a: &FuseArgs) -> Result<Option<RafsRequest>, Box<dyn std::error::Error>> {
    let Some(bootstrap) = &a.bootstrap else {
        if let Some(c) = &a.config {
            // Checked, so that a bad file is reported at start.
            let text = read_config(c)?;
            crate::api::nydus_config::parse(&text)
                .map_err(|e| format!("{}: {}", c.display(), crate::util::error_chain(&e)))?;
        }
        return Ok(None);
    };
    let source = absolute(bootstrap)?;
    let (config, spec) = match (&a.config, &a.localfs_dir) {
        (Some(c), _) => {
            let text = read_config(c)?;
            let parsed = crate::api::nydus_config::parse(&text)
                .map_err(|e| format!("{}: {}", c.display(), crate::util::error_chain(&e)))?;
            parsed.log_notes();
            (text, parsed.spec)
        }
        (None, Some(dir)) => {
            let dir = absolute(dir)?;
            let config = serde_json::json!({
                "device": {"backend": {"type": "localfs", "config": {"dir": dir}}},
                "mode": "direct",
            })
            .to_string();
            (
                config,
                RafsSpec {
                    id: None,
                    backend: BackendSpec::Localfs(BlobLocation::Dir(dir)),
                    work_dir: None,
                    prefetch: PrefetchSpec::default(),
                    amplify_io: None,
                },
            )
        }
        (None, None) => return Err("--bootstrap needs --config or --localfs-dir".into()),
    };
    let prefetch_files = match &a.prefetch_files {
        Some(f) => super::image::read_path_list(f)?,
        None => Vec::new(),
    };
    Ok(Some(RafsRequest {
        source,
        config,
        spec,
        prefetch_files,
    }))
}

fn read_config(p: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let meta = std::fs::metadata(p).map_err(|e| format!("config {}: {e}", p.display()))?;
    if meta.len() > crate::api::nydus_config::MAX_CONFIG_BYTES as u64 {
        return Err(format!("config {}: larger than 1 MiB", p.display()).into());
    }
    Ok(std::fs::read_to_string(p).map_err(|e| format!("config {}: {e}", p.display()))?)
}

fn absolute(p: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// Raises `RLIMIT_NOFILE` to `n` (soft and hard).
fn set_nofile(n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let lim = libc::rlimit {
        rlim_cur: n as libc::rlim_t,
        rlim_max: n as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(format!("--rlimit-nofile {n}: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// `skiff fuse`.
pub fn cmd_fuse(a: FuseArgs) -> CmdResult {
    check_refused(&a)?;
    if let Some(n) = a.rlimit_nofile.filter(|&n| n > 0) {
        set_nofile(n)?;
    }
    let dedicated = dedicated(&a)?;
    if a.virtual_mountpoint != "/" && dedicated.is_some() {
        crate::daemon::Layout::Host
            .check_rafs(&a.virtual_mountpoint)
            .map_err(|e| format!("--virtual-mountpoint: {e}"))?;
    }
    let mountpoint = absolute(&a.mountpoint)?;
    let opts = crate::api::FuseDaemonOptions {
        api_socket: absolute(&a.apisock)?,
        upgrade: a.upgrade,
        share: a.share.open()?,
        host: HostOptions {
            mountpoint,
            threads: a.thread_num,
            failover_policy: match a.failover_policy {
                FailoverArg::None => FailoverPolicy::None,
                _ => FailoverPolicy::Resend,
            },
            supervisor: a.supervisor.as_deref().map(absolute).transpose()?,
            id: a.id.clone(),
            dedicated,
            dedicated_at: a.virtual_mountpoint.clone(),
            config_file: a.config.as_deref().map(absolute).transpose()?,
            parse_config: crate::api::parse_spec,
        },
    };
    super::commands::tune_allocator();
    crate::api::run_fuse(opts)?;
    Ok(0)
}

/// The log file a `--log-file` names (nydusd adds `.log` to a name without extension).
pub fn log_file_path(p: &Path) -> PathBuf {
    if p.extension().is_some() {
        p.to_owned()
    } else {
        p.with_extension("log")
    }
}

/// Backups kept by [`RotatingLog`] (`file.1` … `file.5`).
const LOG_BACKUPS: u32 = 5;

/// A log file rotated when it grows past a size: `file` becomes `file.1`, `file.1` becomes
/// `file.2`, … and the oldest backup is dropped.
pub struct RotatingLog {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    limit: u64,
}

impl RotatingLog {
    /// Opens (appends to) `path`, rotating at `limit` bytes (0: never).
    pub fn open(path: &Path, limit: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_owned(),
            file,
            written,
            limit,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |i: u32| {
            let mut s: OsString = self.path.clone().into_os_string();
            s.push(format!(".{i}"));
            PathBuf::from(s)
        };
        for i in (1..LOG_BACKUPS).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        std::fs::rename(&self.path, name(1))?;
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.limit > 0 && self.written + buf.len() as u64 > self.limit && self.written > 0 {
            // A failed rotation keeps logging to the current file.
            let _ = self.rotate();
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Sets up logging to `--log-file` (rotated at `--log-rotation-size` MiB).
pub fn init_file_logging(
    level: &str,
    file: &Path,
    rotation_mib: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = log_file_path(file);
    let log = RotatingLog::open(&path, rotation_mib.saturating_mul(1 << 20))
        .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Mutex::new(log))
        .with_ansi(false)
        .try_init();
    Ok(())
}

/// An identity of this build, reported as nydusd's `git_commit` and printed by `nydusd
/// --version` ("Git Commit: ..."): the package version with the size and change time of the
/// executable. nydus-snapshotter compares the two to decide whether a running daemon is older
/// than the binary on disk (and hot-upgrades it), so they must agree for the same binary and
/// differ once it is replaced. A running daemon's is computed from its own executable, which
/// stays the old file after a replacement.
pub fn build_identity() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/exe") {
        Ok(m) => format!(
            "skiff-{}-{:x}-{:x}",
            env!("CARGO_PKG_VERSION"),
            m.len(),
            m.ctime()
        ),
        Err(_) => format!("skiff-{}", env!("CARGO_PKG_VERSION")),
    }
}

/// What `nydusd --version` prints (nydus-snapshotter reads the `Git Commit:` line).
pub fn nydusd_version() -> String {
    format!(
        "Version: \tskiff {}\nGit Commit: \t{}\nBuild Time: \t\nProfile: \t{}\nRustc: \t\n",
        env!("CARGO_PKG_VERSION"),
        build_identity(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )
}

/// The command line of `skiff` invoked as `nydusd` (a symlink named nydusd, as nydus-snapshotter's
/// `nydusd_path` or Kata's `virtio_fs_daemon` name it), as `skiff`'s: `nydusd fuse ...` and
/// `nydusd ...` (nydusd's default subcommand is fuse) become `skiff fuse ...`, `nydusd
/// virtiofs ...` becomes `skiff virtiofs ...`. `Err` carries what to print and the exit code
/// for `--version` and for what is refused.
pub fn nydusd_argv(args: Vec<OsString>) -> Result<Vec<OsString>, (String, i32)> {
    let mut it = args.into_iter();
    let _argv0 = it.next();
    let rest: Vec<OsString> = it.collect();
    let first = rest.first().and_then(|a| a.to_str()).unwrap_or("");
    let skiff = OsString::from("skiff");
    match first {
        "--version" | "-V" => Err((nydusd_version(), 0)),
        "fuse" | "virtiofs" => Ok(std::iter::once(skiff).chain(rest).collect()),
        "singleton" => Err((
            "nydusd singleton is not supported: it serves fscache (EROFS over the kernel's \
             fscache), and Skiff serves FUSE (skiff fuse) and virtio-fs (skiff virtiofs); use \
             fs_driver = \"fusedev\"\n"
                .into(),
            2,
        )),
        "help" | "--help" | "-h" => Ok(vec![skiff, "fuse".into(), "--help".into()]),
        _ => Ok([skiff, "fuse".into()].into_iter().chain(rest).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn nydusd_command_lines_become_skiffs() {
        assert_eq!(
            nydusd_argv(v(&["/usr/bin/nydusd", "fuse", "--mountpoint", "/m"])).ok(),
            Some(v(&["skiff", "fuse", "--mountpoint", "/m"]))
        );
        assert_eq!(
            nydusd_argv(v(&["nydusd", "--config", "c", "--mountpoint", "/m"])).ok(),
            Some(v(&["skiff", "fuse", "--config", "c", "--mountpoint", "/m"]))
        );
        assert_eq!(
            nydusd_argv(v(&["nydusd", "virtiofs", "--sock", "s"])).ok(),
            Some(v(&["skiff", "virtiofs", "--sock", "s"]))
        );
        let (text, code) = nydusd_argv(v(&["nydusd", "--version"])).expect_err("version");
        assert_eq!(code, 0);
        assert!(text.contains("Git Commit: \tskiff-"), "{text}");
        assert_eq!(
            nydusd_argv(v(&["nydusd", "singleton"])).err().map(|e| e.1),
            Some(2)
        );
    }

    #[test]
    fn the_log_rotates_at_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("nydusd.log");
        let mut log = RotatingLog::open(&p, 100).expect("open");
        for i in 0..30 {
            log.write_all(format!("line {i:03} of the log\n").as_bytes())
                .expect("write");
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&p) <= 100, "{}", size(&p));
        let mut b1 = p.clone().into_os_string();
        b1.push(".1");
        assert!(size(Path::new(&b1)) > 0);
        let mut b6 = p.clone().into_os_string();
        b6.push(".6");
        assert!(!Path::new(&b6).exists(), "at most 5 backups");
        assert_eq!(
            log_file_path(Path::new("/x/nydusd")),
            PathBuf::from("/x/nydusd.log")
        );
    }
}
