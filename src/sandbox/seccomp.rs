//! The system calls each kind of thread may make, as allow-lists compiled with rust-vmm's
//! `seccompiler` once, when the sandbox is entered, and installed by each thread as it takes
//! on its kind ([`crate::runtime::threads::enter`]).
//!
//! How the filters stack. A filter is inherited by the threads a thread starts, and a thread
//! may only add filters (the kernel applies all: a call must pass each). So:
//!
//! * the main thread installs the union of every list (plus what setup needs) when the
//!   sandbox is entered: every thread of the process, whoever starts it (the vhost-user
//!   library, reqwest's runtime), is under it from birth;
//! * the threads Skiff starts are started by one thread that carries only that union (the
//!   spawner, [`crate::runtime::threads::start_spawner`]), so each then adds exactly its own
//!   kind's list: a worker started on behalf of a queue thread is not limited to the queue's
//!   list, and a queue thread is not widened to a worker's;
//! * threads a library starts from a thread of some kind carry that kind's list: the
//!   vhost-user message and queue threads (from the vhost thread; queue threads add the
//!   queue list on their first event).
//!
//! A call outside the list raises SIGSYS: the handler writes the call's number and the
//! thread's kind to stderr and ends the process with status 159 (as a kill would, but saying
//! why). Nothing on any list starts a program, changes mounts or namespaces, traces another
//! process, loads kernel code or opens a file by handle.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::runtime::threads::{self, ThreadKind};

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused to build a filter.
    #[error("building the filter of {kind} threads")]
    Build {
        /// The kind.
        kind: &'static str,
        /// The error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("installing the filter of {kind} threads")]
    Install {
        /// The kind.
        kind: &'static str,
        /// The error.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// Every thread, whatever its kind: memory, locks, time, signals on the way out, logging to
/// stderr, ending.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A panic's report and backtrace name files relative to the working directory.
    libc::SYS_getcwd,
];

/// Waiting on several descriptors (epoll, eventfds).
const EVENTS: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Starting threads (a library's, below a thread of this kind), which then install their own
/// filter (`seccomp`).
const THREADS: &[i64] = &[
    libc::SYS_seccomp,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
];

/// Reading files: bootstraps, blobs, cache files, the passthrough's lookups.
const FILE_READ: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_fadvise64,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Writing files: the chunk cache (with its lock files), the metrics file.
const FILE_WRITE: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
    libc::SYS_utimensat,
];

/// The writable passthrough of the shared directory, beyond reading and writing files: what
/// the guest may do to its tree, each on behalf of the guest's caller (setresuid/setresgid
/// around the call, as virtiofsd does).
const PASSTHROUGH: &[i64] = &[
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_fchownat,
    libc::SYS_fchown,
    libc::SYS_fchmodat,
    libc::SYS_copy_file_range,
    libc::SYS_fsetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_setxattr,
    libc::SYS_getxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lsetxattr,
    libc::SYS_lgetxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_umask,
    libc::SYS_syncfs,
    libc::SYS_sync_file_range,
    libc::SYS_lseek,
];

/// Unix and TCP sockets: the vhost-user and API sockets, registries and S3.
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_socketpair,
];

/// The vhost-user message thread: guest memory and the inflight region arrive as file
/// descriptors to map; the socket file is removed on the way out.
const VHOST: &[i64] = &[
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_unlinkat,
    libc::SYS_openat,
];

/// The x86_64 calls glibc still makes under their old names (`unlink(3)` is `unlink(2)`
/// there, not `unlinkat`); aarch64 and riscv64 have only the `*at` forms.
#[cfg(target_arch = "x86_64")]
const LEGACY_FILES: &[i64] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_chmod,
    libc::SYS_getdents,
];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY_FILES: &[i64] = &[];

/// Sharing bootstraps (`crate::share`): sealing a validated bootstrap into a memfd, and the
/// share directory's sockets (made under a temporary name, renamed into place, removed), and
/// the peer's uid against ours.
const SHARE: &[i64] = &[
    libc::SYS_geteuid,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_pwrite64,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
];

/// Mounting over the API: the passthrough is set up (its umask, the daemon's ids) and
/// bootstraps are opened; nothing is mounted in the kernel.
const MOUNTS: &[i64] = &[
    libc::SYS_umask,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

/// Setup on the main thread once confined: binding sockets, creating the cache directory,
/// the process limits; nothing the other kinds need.
const SETUP: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_getcwd,
    libc::SYS_chdir,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_prlimit64,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_pipe2,
    libc::SYS_wait4,
];

/// The list of `kind`: groups, each for a reason (docs/serve.md has the same table).
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let groups: &[&[i64]] = match kind {
        // Waits on its exit event; the union of every list below, as the spawner.
        ThreadKind::Main => &[
            BASE,
            EVENTS,
            THREADS,
            FILE_READ,
            FILE_WRITE,
            PASSTHROUGH,
            SOCKETS,
            VHOST,
            MOUNTS,
            SHARE,
            SETUP,
            LEGACY_FILES,
        ],
        // Accepts the VMM, maps guest memory, starts the queue and message threads.
        ThreadKind::Vhost => &[BASE, EVENTS, THREADS, SOCKETS, VHOST, LEGACY_FILES],
        // Pops chains and hands them to workers: eventfds and nothing else.
        ThreadKind::Queue => &[BASE, EVENTS],
        // The filesystem work: images, caches, the passthrough.
        ThreadKind::Worker => &[
            BASE,
            EVENTS,
            FILE_READ,
            FILE_WRITE,
            PASSTHROUGH,
            LEGACY_FILES,
        ],
        // Background reads of chunks into the caches, locally or over the network.
        ThreadKind::Fetcher => &[BASE, EVENTS, FILE_READ, FILE_WRITE, SOCKETS, LEGACY_FILES],
        // HTTP on the API socket; mounts open bootstraps and the shared directory.
        ThreadKind::Api => &[
            BASE,
            EVENTS,
            THREADS,
            SOCKETS,
            FILE_READ,
            MOUNTS,
            SHARE,
            LEGACY_FILES,
        ],
        // `skiff mount` reads /dev/fuse (not confined today; the list for when it is).
        ThreadKind::Fuse => &[BASE, EVENTS, FILE_READ, FILE_WRITE, LEGACY_FILES],
        // Writes the metrics file now and then.
        ThreadKind::Housekeeping => &[BASE, FILE_READ, FILE_WRITE, LEGACY_FILES],
        // Hands sealed bootstraps to the node's other daemons: accepts on the share
        // directory's sockets, checks the peer, sends a descriptor, removes withdrawn sockets.
        ThreadKind::Share => &[BASE, EVENTS, SOCKETS, SHARE, LEGACY_FILES],
    };
    let mut all: Vec<i64> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all
}

const KINDS: [ThreadKind; 9] = [
    ThreadKind::Main,
    ThreadKind::Vhost,
    ThreadKind::Queue,
    ThreadKind::Worker,
    ThreadKind::Fetcher,
    ThreadKind::Api,
    ThreadKind::Fuse,
    ThreadKind::Housekeeping,
    ThreadKind::Share,
];

/// The compiled filter of every kind.
pub struct Filters(BTreeMap<&'static str, BpfProgram>);

impl Filters {
    /// Compiles every list.
    pub fn compile() -> Result<Self, SeccompError> {
        let arch = target_arch();
        let mut out = BTreeMap::new();
        for kind in KINDS {
            let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
                .into_iter()
                .map(|nr| (nr, Vec::new()))
                .collect();
            let build = |source| SeccompError::Build {
                kind: kind.as_str(),
                source,
            };
            let filter = SeccompFilter::new(rules, mismatch_action(), SeccompAction::Allow, arch)
                .map_err(build)?;
            let program = BpfProgram::try_from(filter).map_err(build)?;
            out.insert(kind.as_str(), program);
        }
        Ok(Filters(out))
    }

    fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(program) = self.0.get(kind.as_str()) else {
            return Ok(());
        };
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            kind: kind.as_str(),
            source,
        })
    }
}

/// What a call outside the list does: SIGSYS (reported, then the process ends), or with
/// `SKIFF_SECCOMP=log` in the environment, the call goes through and the kernel logs it (to
/// the audit log), for finding what a new deployment needs without stopping it.
fn mismatch_action() -> SeccompAction {
    match std::env::var("SKIFF_SECCOMP").as_deref() {
        Ok("log") => SeccompAction::Log,
        _ => SeccompAction::Trap,
    }
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// The kind whose filter this thread installed last, for the SIGSYS report.
    static FILTERED_AS: Cell<&'static str> = const { Cell::new("newly started (inherited filter)") };
}

/// Installs the SIGSYS handler and the union filter on the calling (main) thread, and makes
/// every thread install its kind's filter when it enters the kind.
pub(super) fn install(filters: Filters) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    filters.apply(ThreadKind::Main)?;
    FILTERED_AS.with(|k| k.set(ThreadKind::Main.as_str()));
    let _ = FILTERS.set(filters);
    threads::set_confinement(confine);
    Ok(())
}

/// The per-thread hook: the kind's filter on top of what the thread inherited. The main kind's
/// is the union every thread already carries.
fn confine(kind: ThreadKind) {
    if kind == ThreadKind::Main {
        return;
    }
    let Some(filters) = FILTERS.get() else {
        return;
    };
    match filters.apply(kind) {
        Ok(()) => FILTERED_AS.with(|k| k.set(kind.as_str())),
        // The thread keeps the union filter it was born with; say so loudly.
        Err(e) => tracing::error!(
            kind = kind.as_str(),
            error = %crate::util::error_chain(&e),
            "could not narrow this thread's seccomp filter"
        ),
    }
}

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
    #[cfg(target_arch = "riscv64")]
    {
        TargetArch::riscv64
    }
    #[cfg(not(any(target_arch = "aarch64", target_arch = "riscv64")))]
    {
        TargetArch::x86_64
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an
    // `extern "C"` function with the SA_SIGINFO signature, and only async-signal-safe calls
    // are made from it.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Writes `skiff: seccomp: system call N refused on a KIND thread` and ends the process.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills the `_sigsys` member of the union, whose `_syscall`
    // int sits 8 bytes into the union, which starts 16 bytes into siginfo_t on 64-bit Linux.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) };
    let kind = FILTERED_AS.with(|k| k.get());
    let mut buf = [0u8; 160];
    let mut len = 0;
    let mut put = |s: &[u8]| {
        let n = s.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&s[..n]);
        len += n;
    };
    put(b"skiff: seccomp: system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" refused on a ");
    put(kind.as_bytes());
    put(b" thread (see docs/serve.md#the-sandbox)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid for `len`.
    unsafe {
        libc::write(2, buf.as_ptr() as *const libc::c_void, len);
        libc::_exit(159);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_compile_and_never_allow_escapes() {
        Filters::compile().expect("every list compiles");
        let never = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_ptrace,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_bpf,
            libc::SYS_chroot,
            libc::SYS_capset,
        ];
        for kind in KINDS {
            let list = allowed(kind);
            for nr in never {
                assert!(!list.contains(&nr), "{kind} allows system call {nr}");
            }
        }
        // The queue thread only waits and signals.
        assert!(!allowed(ThreadKind::Queue).contains(&libc::SYS_openat));
        assert!(!allowed(ThreadKind::Queue).contains(&libc::SYS_socket));
        // Every kind's list is inside the union the main thread carries.
        let union = allowed(ThreadKind::Main);
        for kind in KINDS {
            assert!(allowed(kind).iter().all(|nr| union.contains(nr)), "{kind}");
        }
    }
}
