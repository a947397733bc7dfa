//! The sandbox options of `serve` and `virtiofs`, and what each command must reach inside.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::sandbox::{absolute, CapabilitySet, Reach, SandboxMode, SandboxOptions};

/// Kata's directory of per-sandbox shared directories (`<id>/shared` is the passthrough).
pub const KATA_SHARED_DIRS: &str = "/run/kata-containers/shared/sandboxes";
/// nydus-snapshotter's root: the bootstraps (`snapshots/<n>/fs/image/image.boot`) and the
/// blob cache (`cache/`) Kata's RAFS mounts name.
pub const SNAPSHOTTER_ROOT: &str = "/var/lib/containerd-nydus";
/// The other root nydus-snapshotter is deployed with (containerd's plugin directory naming).
pub const SNAPSHOTTER_ROOT_CONTAINERD: &str =
    "/var/lib/containerd/io.containerd.snapshotter.v1.nydus";
/// The cache directory under a snapshotter root: the config's `work_dir`, the node's shared
/// cache, which the sandbox daemon writes the chunks it fetches to (under `skiff/`).
pub const SNAPSHOTTER_CACHE: &str = "cache";

/// `--sandbox` and `--sandbox-path`.
#[derive(Args, Debug, Clone)]
pub struct SandboxArgs {
    /// Confinement: `namespace` (a mount namespace holding only what the daemon serves,
    /// capabilities dropped, no_new_privs, a seccomp allow-list per thread), or `none`.
    #[arg(long, value_enum, default_value_t = SandboxMode::Namespace)]
    pub sandbox: SandboxMode,
    /// A host directory to keep reachable (read-write) inside the sandbox, at the same path:
    /// where the shared directories, bootstraps or blobs that API mounts will name live, if
    /// not in Kata's and nydus-snapshotter's default directories. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub sandbox_path: Vec<PathBuf>,
}

impl SandboxArgs {
    fn options(
        &self,
        mut reach: Vec<Reach>,
        caps: CapabilitySet,
    ) -> std::io::Result<SandboxOptions> {
        for p in &self.sandbox_path {
            reach.push(Reach::write(absolute(p)?));
        }
        Ok(SandboxOptions {
            mode: self.sandbox,
            reach,
            caps,
        })
    }
}

/// The directory holding `file` (absolute).
fn parent(file: &Path) -> PathBuf {
    file.parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned)
}

/// `skiff virtiofs`: its two sockets' directories, Kata's and the snapshotter's directories
/// (if they exist; the snapshotter's cache writable), the default chunk cache, name resolution, `--sandbox-path`; the
/// passthrough's capabilities.
pub fn virtiofs_options(
    args: &SandboxArgs,
    api_socket: &Path,
    socket: &Path,
) -> std::io::Result<SandboxOptions> {
    // The default chunk cache of registry and S3 mounts without a work_dir: made now, since
    // it cannot be made inside.
    let cache = Path::new(crate::storage::cache::DEFAULT_CACHE_DIR);
    let mut reach = vec![
        Reach::write(parent(api_socket)),
        Reach::write(parent(socket)),
        Reach::write(KATA_SHARED_DIRS).if_exists(),
    ];
    for root in [SNAPSHOTTER_ROOT, SNAPSHOTTER_ROOT_CONTAINERD] {
        reach.push(Reach::read(root).if_exists());
        reach.push(Reach::write(Path::new(root).join(SNAPSHOTTER_CACHE)).if_exists());
    }
    if args.sandbox != SandboxMode::None && std::fs::create_dir_all(cache).is_ok() {
        reach.push(Reach::write(cache));
    }
    // RAFS mounts may name registries and S3 endpoints by host name.
    reach.extend(Reach::name_resolution());
    args.options(reach, CapabilitySet::passthrough())
}

/// What `skiff serve` reads and writes, all absolute.
#[derive(Debug, Default)]
pub struct ServePaths {
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Files read (bootstrap, prefetch list, config file, Docker credentials).
    pub files: Vec<PathBuf>,
    /// Directories read (blobs).
    pub read_dirs: Vec<PathBuf>,
    /// Directories written (the chunk and bootstrap cache, the metrics file's).
    pub write_dirs: Vec<PathBuf>,
    /// Whether a backend is reached by host name (registry, S3).
    pub network: bool,
}

/// `skiff serve`: the image's files, the caches, the socket; no capability.
pub fn serve_options(args: &SandboxArgs, p: &ServePaths) -> std::io::Result<SandboxOptions> {
    let mut reach = vec![Reach::write(parent(&p.socket))];
    reach.extend(p.files.iter().map(|f| Reach::read(f.clone())));
    reach.extend(p.read_dirs.iter().map(|d| Reach::read(d.clone())));
    reach.extend(p.write_dirs.iter().map(|d| Reach::write(d.clone())));
    if p.network {
        reach.extend(Reach::name_resolution());
    }
    args.options(reach, CapabilitySet::none())
}
