//! A Debian docker-registry for one test, started and stopped by `scripts/registry.sh`
//! (which installs it). Stopped on drop.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running registry on 127.0.0.1.
pub struct Registry {
    name: String,
    run: PathBuf,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its port.
    pub port: u16,
}

/// One blob GET in a registry's access log.
pub struct BlobGet {
    /// The request's path (`/v2/<repo>/blobs/sha256:…`).
    pub path: String,
    /// HTTP status.
    pub status: u16,
    /// Bytes sent.
    pub bytes: u64,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/registry.sh")
}

/// A port nothing listens on now.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

impl Registry {
    /// Starts a registry (`extra`: registry.sh options), or says why it could not.
    pub fn start(name: &str, extra: &[&str]) -> Result<Registry, String> {
        let port = free_port()?;
        let run = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("registries");
        let name = format!("{name}-{}", std::process::id());
        let out = Command::new("bash")
            .arg(script())
            .args(["start", "--name", &name, "--port", &port.to_string()])
            .args(extra)
            .env("SKIFF_REGISTRY_RUN", &run)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running registry.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "registry.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Registry {
            run: run.join(&name),
            name,
            addr,
            port,
        })
    }

    /// Its run directory: config, storage, pid and log.
    pub fn run_dir(&self) -> &Path {
        &self.run
    }

    /// Its access and error log.
    pub fn log(&self) -> PathBuf {
        self.run.join("registry.log")
    }

    /// The log's length now, to read what comes after.
    pub fn log_len(&self) -> usize {
        fs::metadata(self.log())
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// The blob GETs its access log shows from byte `from` on (see [`Self::log_len`]).
    pub fn blob_gets(&self, from: usize) -> Vec<BlobGet> {
        let text = fs::read(self.log()).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
        let mut gets = Vec::new();
        for line in text.lines() {
            // 127.0.0.1 - - [date] "GET /v2/r/blobs/sha256:… HTTP/1.1" 206 12345 "" "skiff/0.1.0"
            let Some((req, rest)) = line.split_once("\" ") else {
                continue;
            };
            if !req.contains("\"GET /v2/") || !req.contains("/blobs/") {
                continue;
            }
            let mut f = rest.split(' ');
            let (Some(status), Some(bytes)) = (f.next(), f.next()) else {
                continue;
            };
            let path = req
                .split_once("\"GET ")
                .and_then(|(_, r)| r.split(' ').next())
                .unwrap_or_default()
                .to_string();
            gets.push(BlobGet {
                path,
                status: status.parse().unwrap_or(0),
                bytes: bytes.parse().unwrap_or(0),
            });
        }
        gets
    }

    /// Stops the registry (registry.sh kills the PID it recorded when it started it).
    pub fn stop(&self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", "--name", &self.name])
            .env(
                "SKIFF_REGISTRY_RUN",
                self.run.parent().unwrap_or(Path::new("/")),
            )
            .status();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
