//! The daemon's mount namespace: the host's root replaced by an empty tmpfs that holds only
//! what the daemon must reach, bind-mounted at the same paths as on the host, so that the
//! paths it is given (Kata's API calls, the command line) keep their meaning.
//!
//! Built as virtiofsd builds its own, with one difference: virtiofsd's new root is the shared
//! directory itself, known when it starts. Kata gives Skiff's daemon the shared directory and
//! every image over the API *after* it started, so the root here is a tmpfs into which the
//! directories that will hold them are bound up front ([`Reach`]: the command line's paths,
//! `--sandbox-path`, Kata's and nydus-snapshotter's default directories). The passthrough is
//! still rooted at the shared directory; the namespace bounds what a compromised daemon
//! could touch beyond it.
//!
//! The steps, each checked: `unshare(CLONE_NEWNS)`; every mount made a slave (mounts the host
//! makes later under a shared directory still appear inside, nothing made inside leaks out);
//! a tmpfs at [`SANDBOX_ROOT`]; each reachable path bound there (recursively, `nosuid`,
//! `nodev`, `noexec`, read-only unless it must be written); a `proc` with
//! `hidepid=invisible,subset=pid` (the passthrough reopens files through `/proc/self/fd`);
//! `/dev/null`; `pivot_root(".", ".")` and the old root detached; the tmpfs made read-only.

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::SandboxError;

/// Where the new root is built (an empty directory on the host, created once and shared by
/// every daemon: each mounts its own tmpfs over it, in its own namespace).
pub const SANDBOX_ROOT: &str = "/run/skiff/sandbox";

/// A path the daemon must reach inside its sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    /// The path, absolute and normalised; bound at the same path inside.
    pub path: PathBuf,
    /// Whether the daemon writes there (else it is bound read-only).
    pub writable: bool,
    /// Whether a missing path is skipped (a default) or an error (asked for).
    pub optional: bool,
}

impl Reach {
    /// `path`, read-only.
    pub fn read(path: impl Into<PathBuf>) -> Self {
        Reach {
            path: path.into(),
            writable: false,
            optional: false,
        }
    }

    /// `path`, read-write.
    pub fn write(path: impl Into<PathBuf>) -> Self {
        Reach {
            writable: true,
            ..Reach::read(path)
        }
    }

    /// The same, skipped if it does not exist.
    pub fn if_exists(self) -> Self {
        Reach {
            optional: true,
            ..self
        }
    }

    /// What name resolution reads (for a registry or S3 named by host), read-only.
    pub fn name_resolution() -> Vec<Reach> {
        [
            "/etc/resolv.conf",
            "/etc/hosts",
            "/etc/nsswitch.conf",
            "/etc/host.conf",
            "/etc/gai.conf",
        ]
        .into_iter()
        .map(|p| Reach::read(p).if_exists())
        .collect()
    }
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.path.display(),
            if self.writable { "rw" } else { "ro" }
        )
    }
}

/// A step of building the namespace that failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct NamespaceError {
    step: String,
    #[source]
    source: io::Error,
}

fn step(step: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let step = step.into();
    move |source| SandboxError::Namespace(NamespaceError { step, source })
}

/// Builds the namespace and pivots into it; returns the paths bound (those that existed).
pub(super) fn enter(wanted: &[Reach]) -> Result<Vec<Reach>, SandboxError> {
    let cwd = std::env::current_dir().ok();
    let reach = resolve(wanted)?;
    // SAFETY: unshare takes flags only; the process is single-threaded (checked by the
    // caller), so the whole process moves into the new namespace.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(step("unshare(CLONE_NEWNS)"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_SLAVE | libc::MS_REC,
        None,
    )
    .map_err(step("making every mount a slave"))?;
    let root = Path::new(SANDBOX_ROOT);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(step(format!("creating {SANDBOX_ROOT}")))?;
    let hardening = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        hardening,
        Some("size=1m,nr_inodes=4096,mode=0755"),
    )
    .map_err(step(format!("mounting a tmpfs on {SANDBOX_ROOT}")))?;
    for r in &reach {
        bind(root, &r.path, r.writable)?;
    }
    let proc_dir = root.join("proc");
    fs::create_dir(&proc_dir).map_err(step("creating /proc"))?;
    // Only processes the daemon may ptrace are shown (hidepid), and nothing but them
    // (subset=pid: no /proc/sys, no /proc/kcore). Kernels before 5.8 know neither option
    // by name: then hidepid=2 alone.
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        hardening,
        Some("hidepid=invisible,subset=pid"),
    )
    .or_else(|_| {
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            hardening,
            Some("hidepid=2"),
        )
    })
    .map_err(step("mounting /proc"))?;
    bind(root, Path::new("/dev/null"), true)?;
    pivot(root)?;
    // The tmpfs itself is never written after this.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | hardening,
        None,
    )
    .map_err(step("making the new root read-only"))?;
    let back = cwd.filter(|c| reach.iter().any(|r| c.starts_with(&r.path)));
    std::env::set_current_dir(back.as_deref().unwrap_or(Path::new("/")))
        .map_err(step("changing directory inside"))?;
    Ok(reach)
}

/// The wanted paths that exist, each once, parents before children; a missing path that
/// was asked for is an error.
fn resolve(wanted: &[Reach]) -> Result<Vec<Reach>, SandboxError> {
    let mut out: Vec<Reach> = Vec::new();
    for w in wanted {
        let path = super::normalize(&w.path).ok_or_else(|| SandboxError::Path {
            path: w.path.clone(),
            reason: "a sandbox path must be absolute".into(),
        })?;
        if fs::symlink_metadata(&path).is_err() {
            if w.optional {
                continue;
            }
            return Err(SandboxError::Path {
                path,
                reason: "does not exist (the sandbox binds it in)".into(),
            });
        }
        // The same path twice: writable wins.
        if let Some(o) = out.iter_mut().find(|o| o.path == path) {
            o.writable |= w.writable;
            continue;
        }
        out.push(Reach {
            path,
            writable: w.writable,
            optional: w.optional,
        });
    }
    // A path inside another one with the same access is already there.
    let all = out.clone();
    out.retain(|r| {
        !all.iter()
            .any(|o| o.path != r.path && r.path.starts_with(&o.path) && o.writable == r.writable)
    });
    out.sort_by_key(|r| r.path.components().count());
    Ok(out)
}

/// Binds host `path` at the same path under `root`, recursively (read-only unless
/// `writable`). A symbolic link is followed: its target is bound at the link's path.
fn bind(root: &Path, path: &Path, writable: bool) -> Result<(), SandboxError> {
    let inside = root.join(path.strip_prefix("/").unwrap_or(path));
    let meta = fs::metadata(path).map_err(step(format!("{}", path.display())))?;
    if meta.is_dir() {
        fs::create_dir_all(&inside)
    } else {
        if let Some(parent) = inside.parent() {
            fs::create_dir_all(parent).map_err(step(format!("{}", parent.display())))?;
        }
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&inside)
            .map(drop)
    }
    .map_err(step(format!(
        "creating the mount point of {}",
        path.display()
    )))?;
    let what = format!("binding {}", path.display());
    mount(
        Some(path_str(path)?),
        &inside,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .map_err(step(what.clone()))?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NOEXEC;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    // /dev/null is a device: nodev everywhere else.
    if path != Path::new("/dev/null") {
        flags |= libc::MS_NODEV;
    }
    mount(None, &inside, None, flags, None).map_err(step(format!("{what} (remount)")))
}

fn path_str(path: &Path) -> Result<&str, SandboxError> {
    path.to_str().ok_or_else(|| SandboxError::Path {
        path: path.to_owned(),
        reason: "not valid UTF-8".into(),
    })
}

/// `pivot_root(".", ".")` in `root`, then the old root (stacked on top) detached.
fn pivot(root: &Path) -> Result<(), SandboxError> {
    std::env::set_current_dir(root).map_err(step("entering the new root"))?;
    let dot = CString::new(".").map_err(|e| step("pivot_root")(io::Error::other(e)))?;
    // SAFETY: both arguments are valid NUL-terminated strings that outlive the call.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as i32)
        .map_err(step("pivot_root"))?;
    // SAFETY: as above; MNT_DETACH unmounts the old root lazily, once nothing uses it.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
        .map_err(step("detaching the old root"))?;
    std::env::set_current_dir("/").map_err(step("entering /"))
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let source = source.map(c).transpose()?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let target = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data) as *const libc::c_void,
        )
    })
}

fn check(r: i32) -> io::Result<()> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_merges_nested_and_duplicate_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("b")).expect("mkdir");
        let got = resolve(&[
            Reach::read(a.join("b")),
            Reach::read(&a),
            Reach::write(a.join("b")),
            Reach::read(dir.path().join("missing")).if_exists(),
        ])
        .expect("resolve");
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].path, a);
        assert!(!got[0].writable);
        assert_eq!(got[1].path, a.join("b"));
        assert!(
            got[1].writable,
            "a writable child of a read-only parent stays"
        );
        let missing = resolve(&[Reach::read(dir.path().join("missing"))]);
        assert!(matches!(missing, Err(SandboxError::Path { .. })));
    }
}
