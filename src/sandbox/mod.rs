//! Confinement of the daemons that face a guest (`skiff serve`, `skiff virtiofs`), on by
//! default, as virtiofsd and Cloud Hypervisor confine theirs:
//!
//! * [`namespace`]: a mount namespace whose root is an empty, read-only tmpfs holding only
//!   what the daemon must reach (the shared directory, the images, the caches, the sockets),
//!   bind-mounted at their host paths, and a `/proc` that shows the daemon little more than
//!   itself; the host's root is `pivot_root`ed away;
//! * [`caps`]: every capability dropped but the few the passthrough needs (none for `serve`);
//! * `PR_SET_NO_NEW_PRIVS`;
//! * [`seccomp`]: a system call allow-list per kind of thread, compiled once, applied by each
//!   thread as it starts ([`crate::runtime::threads::enter`]).
//!
//! [`enter`] does all of it, once, on the main thread before any other thread exists, so that
//! every thread the daemon (or a library) starts afterwards is born inside. `--sandbox none`
//! skips it, with a warning in the log. docs/serve.md lists the capabilities and the system
//! calls, and says what `--sandbox none` gives up.

#![warn(missing_docs)]

pub mod caps;
pub mod namespace;
pub mod seccomp;

use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

pub use self::caps::CapabilitySet;
pub use self::namespace::Reach;

/// How a daemon is confined (`--sandbox`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum SandboxMode {
    /// A mount namespace, capabilities dropped, no_new_privs and seccomp (the default).
    #[default]
    Namespace,
    /// No confinement at all (logged as a warning).
    None,
}

/// Why the sandbox could not be set up. The daemon does not start without it: nothing is
/// served unconfined unless `--sandbox none` asked for it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Threads were started before the sandbox: they would stay outside it.
    #[error("the sandbox must be entered before any thread starts ({0} threads running)")]
    Threads(usize),
    /// The mount namespace could not be built.
    #[error("setting up the mount namespace (run as root, or pass --sandbox none)")]
    Namespace(#[source] namespace::NamespaceError),
    /// A path the daemon must reach is unusable.
    #[error("{path}: {reason}")]
    Path {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The capabilities could not be dropped.
    #[error("dropping capabilities")]
    Capabilities(#[source] ::caps::errors::CapsError),
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("setting no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    /// A seccomp filter could not be built or installed.
    #[error("seccomp")]
    Seccomp(#[source] seccomp::SeccompError),
    /// The thread that starts the daemon's threads could not be started.
    #[error("starting the spawner thread")]
    Spawner(#[source] io::Error),
}

/// What one daemon's sandbox is made of.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// Confine or not.
    pub mode: SandboxMode,
    /// What must stay reachable inside (see [`Reach`]).
    pub reach: Vec<Reach>,
    /// The capabilities kept.
    pub caps: CapabilitySet,
}

/// The sandbox a daemon is in, once [`enter`] returned.
#[derive(Debug)]
struct Active {
    reach: Vec<Reach>,
}

static ACTIVE: OnceLock<Active> = OnceLock::new();

/// Confines the calling process as `opts` says. Call it on the main thread, after the
/// arguments are read and before anything else: before any thread starts, any file is opened
/// or any socket is bound (all of which then happen inside).
///
/// Relative paths the daemon was given must be made absolute before (the working directory
/// is kept only if it is reachable).
pub fn enter(opts: &SandboxOptions) -> Result<(), SandboxError> {
    if opts.mode == SandboxMode::None {
        tracing::warn!(
            "--sandbox none: no mount namespace, all capabilities kept, no seccomp filter; \
             a compromised daemon can reach the whole host"
        );
        return Ok(());
    }
    let threads = thread_count();
    if threads != 1 {
        return Err(SandboxError::Threads(threads));
    }
    // Compiled first: nothing after the pivot needs to read the filters' sources.
    let filters = seccomp::Filters::compile().map_err(SandboxError::Seccomp)?;
    let reach = namespace::enter(&opts.reach)?;
    caps::drop_to(&opts.caps).map_err(SandboxError::Capabilities)?;
    set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    seccomp::install(filters).map_err(SandboxError::Seccomp)?;
    crate::runtime::threads::start_spawner().map_err(SandboxError::Spawner)?;
    tracing::info!(
        reach = %reach
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        caps = %opts.caps,
        "sandbox: mount namespace, capabilities dropped, no_new_privs, seccomp per thread kind"
    );
    let _ = ACTIVE.set(Active { reach });
    Ok(())
}

/// Whether this process is confined.
pub fn active() -> bool {
    ACTIVE.get().is_some()
}

/// Whether `path` (absolute) can be reached inside the sandbox: `Ok` outside a sandbox, or
/// when it lies under one of the reachable paths (taken lexically: `..` is resolved before,
/// so it cannot climb out of one).
pub fn check_reachable(path: &Path) -> Result<(), SandboxError> {
    let Some(active) = ACTIVE.get() else {
        return Ok(());
    };
    let normal = normalize(path).ok_or_else(|| SandboxError::Path {
        path: path.to_owned(),
        reason: "not an absolute path".into(),
    })?;
    if active.reach.iter().any(|r| normal.starts_with(&r.path)) {
        return Ok(());
    }
    Err(SandboxError::Path {
        path: path.to_owned(),
        reason: format!(
            "outside the daemon's sandbox, which reaches only {}; start the daemon with \
             --sandbox-path naming a directory that holds it",
            active
                .reach
                .iter()
                .map(|r| r.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// `path` with `.` and `..` resolved lexically; `None` if it is not absolute.
pub fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// `path` made absolute against the working directory, and normalised.
pub fn absolute(path: &Path) -> io::Result<PathBuf> {
    let joined = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()?.join(path)
    };
    normalize(&joined).ok_or_else(|| io::Error::other("not an absolute path"))
}

fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_dots_lexically() {
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")),
            Some(PathBuf::from("/a/c/d"))
        );
        assert_eq!(normalize(Path::new("/../../x")), Some(PathBuf::from("/x")));
        assert_eq!(normalize(Path::new("rel")), None);
    }
}
