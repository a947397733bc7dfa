//! What Kata Containers does to its virtio-fs daemon, replayed: the command lines of the Go
//! runtime and of runtime-rs, the readiness polling, and the API calls over HTTP/1.1 on the
//! Unix socket, with the bodies Kata sends.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::skiff;

pub mod node;
pub mod stallfs;

/// Kata's readiness polling: `GET /api/v1/daemon` up to 20 times, 20 ms apart.
pub const READY_TRIES: u32 = 20;
/// The pause between two readiness polls.
pub const READY_INTERVAL: Duration = Duration::from_millis(20);

/// How Kata starts the daemon.
#[derive(Clone, Copy, Debug)]
pub enum Runtime {
    /// The Go runtime: absolute socket paths and virtiofsd's default extra args.
    Go,
    /// runtime-rs: `--hybrid-mode` and socket paths relative to the working directory.
    Rust,
}

/// A `skiff virtiofs` child started as Kata starts it. SIGTERMed (by PID) on drop.
pub struct KataDaemon {
    child: Option<Child>,
    /// Working directory of the daemon.
    pub cwd: PathBuf,
    /// API socket, absolute.
    pub api: PathBuf,
    /// vhost-user socket, absolute.
    pub vhost: PathBuf,
    /// The daemon's stderr.
    pub log: PathBuf,
    /// When it was spawned.
    pub started: Instant,
}

impl KataDaemon {
    /// Starts `skiff virtiofs` in `cwd` as `runtime` does.
    pub fn start(runtime: Runtime, cwd: &Path) -> KataDaemon {
        fs::create_dir_all(cwd).expect("daemon cwd");
        let log = cwd.join("skiff-virtiofs.log");
        // The Go runtime names the sockets nydusd-api.sock and vhost-fs.sock and passes them
        // absolute; runtime-rs names the device socket virtiofsd.sock, passes --hybrid-mode
        // first, and (here) gives the paths relative to the daemon's working directory.
        let (api_name, vhost_name) = match runtime {
            Runtime::Go => ("nydusd-api.sock", "vhost-fs.sock"),
            Runtime::Rust => ("nydusd-api.sock", "virtiofsd.sock"),
        };
        let mut cmd = Command::new(skiff());
        cmd.arg("virtiofs");
        match runtime {
            Runtime::Go => {
                cmd.args(["--log-level", "info", "--apisock"])
                    .arg(cwd.join(api_name))
                    .arg("--sock")
                    .arg(cwd.join(vhost_name));
            }
            Runtime::Rust => {
                cmd.args([
                    "--hybrid-mode",
                    "--log-level",
                    "info",
                    "--apisock",
                    api_name,
                ])
                .args(["--sock", vhost_name]);
            }
        }
        // Kata's default virtio_fs_extra_args, and the sandbox's reach: the test's scratch
        // directory holds the shared directory, the bootstraps and the blobs, as
        // /run/kata-containers/shared/sandboxes and /var/lib/containerd-nydus do on a node
        // (an operator adds --sandbox-path to virtio_fs_extra_args the same way).
        cmd.args(["--thread-pool-size=1", "--announce-submounts"]);
        cmd.arg("--sandbox-path").arg(cwd.parent().unwrap_or(cwd));
        let started = Instant::now();
        let child = cmd
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("daemon log"))
            .spawn()
            .expect("starting skiff virtiofs");
        KataDaemon {
            child: Some(child),
            cwd: cwd.to_owned(),
            api: cwd.join(api_name),
            vhost: cwd.join(vhost_name),
            log,
            started,
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kata's readiness check: up to 20 polls 20 ms apart until `"state": "RUNNING"`.
    /// Returns the time from spawn to the answer saying RUNNING.
    pub fn wait_running(&self) -> Duration {
        for _ in 0..READY_TRIES {
            if let Ok((200, body)) = http(&self.api, "GET", "/api/v1/daemon", None) {
                let info: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if info["state"] == "RUNNING" {
                    return self.started.elapsed();
                }
            }
            std::thread::sleep(READY_INTERVAL);
        }
        panic!(
            "not RUNNING after {READY_TRIES} polls {READY_INTERVAL:?} apart\n{}",
            self.log_text()
        );
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, as Kata stops the daemon; asserts a clean exit with both sockets removed.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill has no memory-safety preconditions; the PID is our unreaped child's.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let status = child.wait().expect("waiting for skiff virtiofs");
        let log = self.log_text();
        assert!(status.success(), "exit status {status}\n{log}");
        assert!(!self.api.exists(), "API socket left behind\n{log}");
        assert!(!self.vhost.exists(), "vhost socket left behind\n{log}");
        log
    }
}

impl Drop for KataDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                // SAFETY: as in `stop`.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let _ = child.wait();
            }
        }
    }
}

pub use crate::common::unix_http::http;

/// Kata's mount request body.
pub fn mount_body(fs_type: &str, source: &Path, config: &str) -> Vec<u8> {
    serde_json::json!({
        "fs_type": fs_type,
        "source": source.to_str().expect("utf-8 path"),
        "config": config,
    })
    .to_string()
    .into_bytes()
}

/// The nydusd configuration nydus-snapshotter hands Kata for an image whose blobs are in
/// `blob_dir` (localfs backend), as a string.
pub fn nydusd_config(blob_dir: &Path) -> String {
    serde_json::json!({
        "device": {
            "backend": {"type": "localfs", "config": {"dir": blob_dir.to_str().expect("utf-8")}},
            "cache": {"type": "blobcache", "config": {"work_dir": "/var/lib/nydus/cache"}},
        },
        "mode": "direct",
        "digest_validate": false,
        "iostats_files": false,
        "enable_xattr": true,
        "fs_prefetch": {"enable": false, "threads_count": 4, "merging_size": 0, "bandwidth_rate": 0},
    })
    .to_string()
}

/// Kata's `POST /api/v1/mount?mountpoint=MP`; returns the status and body.
pub fn mount(api: &Path, mountpoint: &str, body: &[u8]) -> (u16, String) {
    let (status, body) = http(
        api,
        "POST",
        &format!("/api/v1/mount?mountpoint={mountpoint}"),
        Some(body),
    )
    .unwrap_or_else(|e| panic!("POST mount {mountpoint}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Kata's `DELETE /api/v1/mount?mountpoint=MP`; returns the status and body.
pub fn umount(api: &Path, mountpoint: &str) -> (u16, String) {
    let (status, body) = http(
        api,
        "DELETE",
        &format!("/api/v1/mount?mountpoint={mountpoint}"),
        None,
    )
    .unwrap_or_else(|e| panic!("DELETE mount {mountpoint}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `GET /api/v1/daemon`, parsed.
pub fn daemon_info(api: &Path) -> serde_json::Value {
    let (status, body) =
        http(api, "GET", "/api/v1/daemon", None).unwrap_or_else(|e| panic!("GET daemon: {e}"));
    assert_eq!(status, 200);
    serde_json::from_slice(&body).expect("daemon info JSON")
}

/// The rafs mountpoint of container `cid`.
pub fn rafs_mountpoint(cid: &str) -> String {
    format!("/rafs/{cid}/lowerdir")
}

/// One thread of a process, as `/proc/<pid>/task/<tid>/status` shows it.
#[derive(Debug)]
pub struct ThreadStatus {
    /// The thread's name (`comm`).
    pub name: String,
    /// `NoNewPrivs`.
    pub no_new_privs: String,
    /// `Seccomp` (2: filter mode).
    pub seccomp: String,
    /// `CapEff`, as a mask.
    pub cap_eff: u64,
}

/// Every thread of process `pid`.
pub fn threads_of(pid: u32) -> Vec<ThreadStatus> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task") {
        let t = t.expect("task entry").path();
        let Ok(status) = fs::read_to_string(t.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push(ThreadStatus {
            name: field("Name:"),
            no_new_privs: field("NoNewPrivs:"),
            seccomp: field("Seccomp:"),
            cap_eff: u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff"),
        });
    }
    out
}

/// The capabilities `skiff virtiofs` keeps (docs/kata.md#the-sandbox): chown, dac_override,
/// fowner, fsetid, setgid, setuid, mknod, sys_admin, setfcap.
pub const VIRTIOFS_CAPS: u64 = 0x8820_00db;

/// Asserts that every thread of `pid` runs with no_new_privs, a seccomp filter and exactly
/// `caps`, and that threads whose names start with each of `kinds` are among them; returns
/// the names.
pub fn assert_confined(pid: u32, caps: u64, kinds: &[&str]) -> Vec<String> {
    let threads = threads_of(pid);
    for t in &threads {
        assert_eq!(t.no_new_privs, "1", "thread {t:?} of {pid}");
        assert_eq!(t.seccomp, "2", "thread {t:?} of {pid}");
        assert_eq!(
            t.cap_eff, caps,
            "thread {t:?} of {pid}: CapEff {:#x}",
            t.cap_eff
        );
    }
    let names: Vec<String> = threads.iter().map(|t| t.name.clone()).collect();
    for k in kinds {
        assert!(
            names.iter().any(|n| n.starts_with(k)),
            "no {k}* thread among {names:?}"
        );
    }
    names
}
