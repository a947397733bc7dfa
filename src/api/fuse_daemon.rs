//! `skiff fuse`: nydus-snapshotter's host daemon, run until SIGTERM (unmount), `exit` (leave
//! the mount to a successor), or its mount going away.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::{ApiError, ApiServer};
use crate::daemon::host::{self, HostDaemon, HostOptions};
use crate::daemon::{Daemon, DaemonFs, DaemonState, Layout};
use crate::runtime::{ExitReason, SignalGuard};

/// What `skiff fuse` serves, and where.
#[derive(Clone, Debug)]
pub struct FuseDaemonOptions {
    /// The API socket (`--apisock`).
    pub api_socket: PathBuf,
    /// Whether to wait for a takeover (`--upgrade`) instead of mounting.
    pub upgrade: bool,
    /// Where the images' bootstraps are shared with the node's other daemons.
    pub share: Option<Arc<crate::share::BootstrapShare>>,
    /// Everything else.
    pub host: HostOptions,
}

/// The configuration parser of mounts taken over.
pub fn parse_spec(config: &str) -> Result<crate::daemon::RafsSpec, String> {
    super::nydus_config::parse(config)
        .map(|c| c.spec)
        .map_err(|e| crate::util::error_chain(&e))
}

/// Runs the host daemon.
pub fn run_fuse(opts: FuseDaemonOptions) -> Result<(), ApiError> {
    let started = Instant::now();
    let exit = crate::runtime::start_daemon().map_err(ApiError::ExitEvent)?;
    let _signals = SignalGuard::install(&exit).map_err(ApiError::Signal)?;
    let fs = Arc::new(DaemonFs::new(Layout::Host).with_bootstrap_share(opts.share.clone()));
    let crashed =
        !opts.upgrade && host::predecessor_crashed(&opts.host.mountpoint, &opts.api_socket);
    let takeover = opts.upgrade || crashed;
    if crashed {
        tracing::warn!(
            mountpoint = %opts.host.mountpoint.display(),
            "a previous daemon died with the filesystem mounted: waiting for its state from the supervisor (failover)"
        );
        if opts.host.supervisor.is_none() {
            return Err(ApiError::BadRequest(format!(
                "{} is still mounted by a daemon that died, and without --supervisor its \
                 connection cannot be taken over: unmount it (umount -l) and start again",
                opts.host.mountpoint.display()
            )));
        }
    }
    let hostd = HostDaemon::new(fs.clone(), opts.host.clone(), exit.clone());
    let daemon = Arc::new(Daemon {
        fs: fs.clone(),
        id: opts.host.id.clone(),
        supervisor: opts.host.supervisor.clone(),
        lifecycle: hostd.clone(),
    });
    let api = ApiServer::start(&opts.api_socket, daemon)?;
    if takeover {
        fs.set_state(DaemonState::Init);
        tracing::info!(
            api = %opts.api_socket.display(),
            ms = started.elapsed().as_millis() as u64,
            "INIT: waiting for takeover"
        );
    } else if let Err(e) = hostd.mount_and_serve() {
        api.shutdown();
        fs.finish();
        return Err(ApiError::FuseDaemon(e));
    } else {
        tracing::info!(
            api = %opts.api_socket.display(),
            mountpoint = %opts.host.mountpoint.display(),
            ms = started.elapsed().as_millis() as u64,
            "RUNNING"
        );
    }
    // SIGTERM (unmount), `exit` (leave the mount to the successor), the mount going away, or
    // a panic.
    exit.wait(None);
    tracing::info!(reason = ?exit.reason(), "shutting down");
    api.shutdown();
    hostd.shut_down();
    fs.finish();
    match exit.reason() {
        Some(ExitReason::Fatal(report)) => Err(ApiError::Fatal(report)),
        _ => Ok(()),
    }
}
