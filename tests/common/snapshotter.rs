//! What nydus-snapshotter does to its nydusd, replayed: the stock config JSON as it
//! supplements it, the command line its builder emits, the `nydusd` it runs (here a symlink
//! to skiff), the readiness polling, the liveness connection it holds, the supervisor socket of
//! failover and hot upgrade, and the unpacking of an image's bootstrap layer.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;

use super::unix_http::http;

/// `base64(user:pass)`, the config's `auth`.
pub fn auth(user_pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(user_pass)
}

/// misc/snapshotter/nydusd-config.fusedev.json as `SupplementDaemonConfig` fills it in and
/// `DumpString` writes it (Go's field order and the fields its structs always emit).
pub fn stock_config(
    snapshot_id: &str,
    host: &str,
    repo: &str,
    auth: &str,
    work_dir: &Path,
) -> String {
    format!(
        r#"{{"device":{{"id":"/{snapshot_id}","backend":{{"type":"registry","config":{{"readahead":false,"host":"{host}","repo":"{repo}","auth":"{auth}","proxy":{{"fallback":false}},"timeout":5,"connect_timeout":5,"retry_limit":2}}}},"cache":{{"type":"blobcache","config":{{"work_dir":"{}","disable_indexed_map":false}}}}}},"mode":"direct","digest_validate":false,"enable_xattr":true,"amplify_io":1048576,"fs_prefetch":{{"enable":true,"prefetch_all":true,"threads_count":8,"merging_size":1048576}}}}"#,
        work_dir.display()
    )
}

/// `nydusd` as the snapshotter's `nydusd_path` names it: a symlink to skiff in `dir`.
pub fn nydusd_link(dir: &Path) -> PathBuf {
    let link = dir.join("nydusd");
    if !link.exists() {
        std::os::unix::fs::symlink(super::skiff(), &link).expect("nydusd symlink");
    }
    link
}

/// The options of the snapshotter's `DaemonCommand`, in its field order.
#[derive(Clone, Debug, Default)]
pub struct DaemonCommand {
    pub upgrade: bool,
    pub thread_num: Option<u32>,
    pub id: Option<String>,
    pub config: Option<PathBuf>,
    pub bootstrap: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub apisock: PathBuf,
    pub log_level: String,
    pub log_rotation_size: u32,
    pub supervisor: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub prefetch_files: Option<PathBuf>,
    pub failover_policy: String,
}

impl DaemonCommand {
    /// `BuildCommand`: `fuse`, then each non-zero param and each true flag in field order.
    pub fn argv(&self) -> Vec<String> {
        let mut a = vec!["fuse".to_string()];
        let mut param = |name: &str, v: Option<String>| {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                a.push(format!("--{name}"));
                a.push(v);
            }
        };
        let p = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        param("thread-num", self.thread_num.map(|n| n.to_string()));
        param("id", self.id.clone());
        param("config", p(&self.config));
        param("bootstrap", p(&self.bootstrap));
        param("mountpoint", Some(self.mountpoint.display().to_string()));
        param("apisock", Some(self.apisock.display().to_string()));
        param("log-level", Some(self.log_level.clone()));
        param(
            "log-rotation-size",
            (self.log_rotation_size > 0).then(|| self.log_rotation_size.to_string()),
        );
        param("supervisor", p(&self.supervisor));
        param("log-file", p(&self.log_file));
        param("prefetch-files", p(&self.prefetch_files));
        param("failover-policy", Some(self.failover_policy.clone()));
        // `--upgrade` is a flag: BuildCommand appends it bare, after the subcommand.
        if self.upgrade {
            a.insert(1, "--upgrade".into());
        }
        a
    }
}

/// A running host daemon, started as the snapshotter starts it.
pub struct HostDaemon {
    child: Option<Child>,
    pub api: PathBuf,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
    pub stderr: PathBuf,
    pub started: Instant,
}

impl HostDaemon {
    /// Runs `nydusd` (the link) with `cmd.argv()`, with no credentials in its environment:
    /// whatever it needs must come from the config.
    pub fn spawn(nydusd: &Path, cmd: &DaemonCommand, home: &Path) -> HostDaemon {
        fs::create_dir_all(home).expect("home");
        // A mountpoint still mounted by a dead daemon is not touched: a stat could wait on it.
        if !super::is_mounted(&cmd.mountpoint) {
            fs::create_dir_all(&cmd.mountpoint).expect("mountpoint");
        }
        let stderr = cmd.apisock.with_extension("stderr");
        let child = Command::new(nydusd)
            .args(cmd.argv())
            .env_remove("SKIFF_REGISTRY_AUTH")
            .env("HOME", home)
            .env("DOCKER_CONFIG", home.join(".docker"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("stderr"))
            .spawn()
            .expect("starting nydusd");
        HostDaemon {
            child: Some(child),
            api: cmd.apisock.clone(),
            mountpoint: cmd.mountpoint.clone(),
            log: cmd
                .log_file
                .clone()
                .unwrap_or_else(|| cmd.apisock.with_extension("stderr")),
            stderr,
            started: Instant::now(),
        }
    }

    /// The daemon's log (its --log-file) and stderr so far.
    pub fn log_text(&self) -> String {
        format!(
            "--- log ---\n{}\n--- stderr ---\n{}",
            fs::read_to_string(&self.log).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// `GET /api/v1/daemon`'s state, if it answers.
    pub fn state(&self) -> Option<String> {
        daemon_state(&self.api)
    }

    /// The snapshotter's wait: the socket (100 × 100 ms), then the state (20 × 100 ms).
    pub fn wait_state(&mut self, want: &str) {
        for _ in 0..100 {
            if self.api.exists() {
                break;
            }
            self.assert_alive();
            std::thread::sleep(Duration::from_millis(100));
        }
        for _ in 0..20 {
            if self.state().as_deref() == Some(want) {
                return;
            }
            self.assert_alive();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "never {want} (now {:?})\n{}\n--- where its threads wait ---\n{}",
            self.state(),
            self.log_text(),
            threads_waiting(self.pid())
        );
    }

    fn assert_alive(&mut self) {
        if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!("the daemon exited ({st})\n{}", self.log_text());
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (after `exit`), returning its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        let mut c = self.child.take().expect("running");
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            assert!(
                start.elapsed() < within,
                "still running after {within:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as the snapshotter's Terminate; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child's.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                // SAFETY: as in `terminate`.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if super::is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Where each thread of process `pid` waits in the kernel (for a daemon that does not answer).
pub fn threads_waiting(pid: i32) -> String {
    let mut out = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
        out.push_str(&format!(
            "{} {}: {} | {}\n{}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("syscall").trim(),
            read("stack")
        ));
    }
    out
}

/// The state `GET /api/v1/daemon` reports.
pub fn daemon_state(api: &Path) -> Option<String> {
    let (s, b) = http(api, "GET", "/api/v1/daemon", None).ok()?;
    if s != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    v["state"].as_str().map(str::to_owned)
}

/// The liveness monitor's connection: held open, idle, to learn of the daemon's death.
pub fn liveness_connection(api: &Path) -> UnixStream {
    UnixStream::connect(api).expect("liveness connection")
}

/// A `PUT` of a life-cycle endpoint; returns status and body.
pub fn put(api: &Path, url: &str) -> (u16, String) {
    let (s, b) = http(api, "PUT", url, None).unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    (s, String::from_utf8_lossy(&b).into_owned())
}

// ------------------------------------------------------------------------------------------
// The supervisor socket (pkg/supervisor)

/// The snapshotter's supervisor of one daemon: holds its state and its `/dev/fuse` descriptor.
pub struct Supervisor {
    pub path: PathBuf,
    pub data: Vec<u8>,
    pub fd: Option<OwnedFd>,
}

impl Supervisor {
    pub fn new(path: &Path) -> Self {
        Supervisor {
            path: path.to_owned(),
            data: Vec::new(),
            fd: None,
        }
    }

    fn listen(&self) -> UnixListener {
        let _ = fs::remove_file(&self.path);
        UnixListener::bind(&self.path).expect("supervisor socket")
    }

    /// `FetchDaemonStates`: listens, runs `trigger` (the daemon's `sendfd`), and keeps what
    /// the daemon sends. Returns what `trigger` returned.
    pub fn fetch_states<T>(&mut self, trigger: impl FnOnce() -> T) -> T {
        let listener = self.listen();
        let receiver = std::thread::spawn(move || -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
            let (c, _) = listener.accept()?;
            let mut data = Vec::new();
            let mut fds = Vec::new();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = recv_with_fds(&c, &mut buf, &mut fds)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            Ok((data, fds))
        });
        let r = trigger();
        let (data, mut fds) = receiver
            .join()
            .expect("supervisor receiver")
            .expect("receiving states");
        assert!(!fds.is_empty(), "the daemon sent no descriptor");
        self.data = data;
        self.fd = Some(fds.remove(0));
        r
    }

    /// `SendStatesTimeout`: listens, and sends the state and descriptor to the first daemon
    /// that connects.
    pub fn send_states(&self) -> JoinHandle<io::Result<()>> {
        let listener = self.listen();
        let data = self.data.clone();
        let fd = self
            .fd
            .as_ref()
            .expect("states held")
            .try_clone()
            .expect("dup");
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept()?;
            let n = send_with_fd(&c, &data[..data.len().min(4096)], fd.as_raw_fd())?;
            c.write_all(&data[n..])?;
            Ok(())
        })
    }
}

fn send_with_fd(s: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<usize> {
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE is arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
    // SAFETY: `msg` points at `cmsg`, large and aligned enough for one header and descriptor.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(hdr) as *mut RawFd, fd);
    }
    // SAFETY: `msg` and what it points at outlive the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn recv_with_fds(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: `msg` points at `buf` and `cmsg`, valid for writing, outliving the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote the control data `msg` describes into `cmsg`; the walk stays
    // within it, and each descriptor it carries is new and owned by this process.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*hdr).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    let fd =
                        std::ptr::read_unaligned((libc::CMSG_DATA(hdr) as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    Ok(n as usize)
}

// ------------------------------------------------------------------------------------------
// Pulling an image as containerd and the snapshotter do

/// nydus-snapshotter's `DetectFsVersion` and its readiness check of a bootstrap, restated:
/// `Ok("v5" | "v6")` for what it accepts, the reason otherwise.
pub fn detect_fs_version(file: &[u8]) -> Result<&'static str, String> {
    let head = &file[..file.len().min(8 << 10)];
    if head.len() < 8 {
        return Err("header buffer to DetectFsVersion is too small".into());
    }
    let le32 = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    if le32(0) == 0x5241_4653 && le32(4) == 0x500 {
        return Ok("v5");
    }
    if head.len() >= 1024 + 128 + 256 && le32(1024) == 0xE0F5_E1E2 {
        let block = match head[1024 + 12] {
            9 => 512,
            12 => 4096,
            b => return Err(format!("unknown v6 block bits {b}")),
        };
        if !file.len().is_multiple_of(block) {
            return Err(format!(
                "v6 bootstrap size {} is not aligned to {block}",
                file.len()
            ));
        }
        return Ok("v6");
    }
    Err("unknown file system header".into())
}

/// What containerd and the snapshotter do with an image's layers: the data-blob layers
/// (`containerd.io/snapshot/nydus-blob`) are skipped, the bootstrap layer
/// (`containerd.io/snapshot/nydus-bootstrap`) is unpacked into `<root>/snapshots/<id>/fs`, and
/// the snapshotter checks `image/image.boot` there. Returns the bootstrap's path.
pub fn pull_bootstrap(reference: &str, user_pass: &str, root: &Path, snapshot_id: &str) -> PathBuf {
    let r = skiff::oci::Reference::parse(reference).expect("reference");
    let opts = skiff::oci::RegistryOptions {
        credentials: Some(skiff::oci::auth::Credentials::parse(user_pass).expect("creds")),
        ..Default::default()
    };
    let client = skiff::oci::RegistryClient::new(&r, &opts).expect("client");
    let (m, _, _) = client.get_manifest().expect("manifest");
    let (boot, data) = m.layers.split_last().expect("layers");
    for l in data {
        assert!(
            l.media_type.starts_with("application/vnd.oci.image.layer."),
            "containerd takes {} for a layer only with an OCI layer media type",
            l.media_type
        );
        assert_eq!(
            l.annotations
                .get("containerd.io/snapshot/nydus-blob")
                .map(String::as_str),
            Some("true"),
            "a data layer the snapshotter does not skip would be pulled whole"
        );
    }
    assert_eq!(
        boot.annotations
            .get("containerd.io/snapshot/nydus-bootstrap")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        boot.media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let bytes = client
        .get_blob_bytes(&boot.digest, boot.size, 1 << 30)
        .expect("bootstrap layer");
    let fs_dir = root.join("snapshots").join(snapshot_id).join("fs");
    fs::create_dir_all(&fs_dir).expect("snapshot dir");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    archive
        .unpack(&fs_dir)
        .expect("unpacking the bootstrap layer");
    let path = fs_dir.join("image/image.boot");
    let mut boot = Vec::new();
    fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut boot))
        .expect("image/image.boot");
    detect_fs_version(&boot).unwrap_or_else(|e| panic!("the snapshotter refuses it: {e}"));
    path
}
