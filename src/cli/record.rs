//! `skiff record`: mounts an image, lets a workload run on it, and writes the files it read,
//! in first-read order, as a prefetch list.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use clap::Args;

use super::commands::{CmdResult, ImageArgs};
use super::image::Recording;
use crate::runtime::{ExitEvent, ExitReason};
use crate::util::parse_duration;

/// What `{}` in the command's arguments stands for.
const MOUNT_PLACEHOLDER: &str = "{}";

/// The environment variable naming the mountpoint for the command.
const MOUNT_ENV: &str = "SKIFF_RECORD_MOUNT";

/// How long the command gets to end after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Arguments of `skiff record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The image.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Where to write the list: image paths, one per line, in first-read order.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Mount the image here (default: a new directory under $TMPDIR or /tmp, removed after).
    #[arg(long, value_name = "DIR")]
    pub mountpoint: Option<PathBuf>,
    /// Stop recording after this long (e.g. 30s, 2m): on its own, the time to run a workload
    /// by hand on --mountpoint; with a command, the longest it may run (then it gets SIGTERM).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub until: Option<Duration>,
    /// Most FUSE worker threads answering reads that may wait, started on demand (one thread
    /// reads the requests and answers those it can from memory).
    #[arg(long, default_value_t = crate::runtime::DEFAULT_WORKERS)]
    pub threads: usize,
    /// The workload, after `--`: run once the image is mounted, with `{}` in its arguments
    /// replaced by the mountpoint and $SKIFF_RECORD_MOUNT set to it; recording ends when it
    /// exits. Without a command, recording ends after --until, or on SIGINT/SIGTERM.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// A mountpoint this command made, removed when dropped.
struct OwnMountpoint(PathBuf);

impl Drop for OwnMountpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn new_mountpoint() -> Result<OwnMountpoint, Box<dyn std::error::Error>> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let d = base.join(format!("skiff-record-{}-{i}", std::process::id()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(OwnMountpoint(d)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("creating {}: {e}", d.display()).into()),
        }
    }
    Err("no free mountpoint name".into())
}

/// Waits until `dir` is a mountpoint, the serving thread ends, or 30 s pass.
fn wait_mounted(dir: &Path, serving: &std::thread::JoinHandle<()>) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(30);
    while !crate::fuse::is_mounted(dir) {
        if serving.is_finished() {
            return Err(format!("mounting {} failed", dir.display()));
        }
        if Instant::now() > until {
            return Err(format!("{} was not mounted within 30 s", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn spawn_command(cmd: &[String], mnt: &Path) -> Result<Child, Box<dyn std::error::Error>> {
    let m = mnt.to_string_lossy();
    let args: Vec<String> = cmd
        .iter()
        .map(|a| a.replace(MOUNT_PLACEHOLDER, &m))
        .collect();
    let (prog, rest) = args.split_first().ok_or("an empty command")?;
    Command::new(prog)
        .args(rest)
        .env(MOUNT_ENV, mnt)
        .spawn()
        .map_err(|e| format!("starting {prog}: {e}").into())
}

/// Ends `child` if it still runs: SIGTERM, then SIGKILL after [`TERM_GRACE`].
fn stop_child(child: &mut Child) -> std::io::Result<ExitStatus> {
    if let Some(s) = child.try_wait()? {
        return Ok(s);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) takes plain integers; the child is not reaped yet (try_wait said
        // so and nobody else waits for it), so the pid is still the child's.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let until = Instant::now() + TERM_GRACE;
    while Instant::now() < until {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()
}

/// Runs the workload (or waits) until recording should end; returns the command's status.
fn run_workload(
    a: &RecordArgs,
    mnt: &Path,
    exit: &ExitEvent,
) -> Result<Option<ExitStatus>, Box<dyn std::error::Error>> {
    let deadline = a.until.and_then(|d| Instant::now().checked_add(d));
    if a.command.is_empty() {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_none() {
            tracing::info!(mountpoint = %mnt.display(), "recording until SIGINT or SIGTERM");
        }
        exit.wait(left);
        return Ok(None);
    }
    let mut child = spawn_command(&a.command, mnt)?;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if exit.wait(Some(Duration::from_millis(20))) {
            tracing::info!(reason = ?exit.reason(), "stopping the command");
            return Ok(Some(stop_child(&mut child)?));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::info!("--until passed; stopping the command");
            return Ok(Some(stop_child(&mut child)?));
        }
    }
}

/// `skiff record`.
pub fn cmd_record(a: RecordArgs) -> CmdResult {
    if a.command.is_empty() && a.mountpoint.is_none() && a.until.is_none() {
        return Err(
            "give a command to run (after --), or --mountpoint to run a workload \
                    on by hand (with --until, or until SIGINT)"
                .into(),
        );
    }
    if !(1..=crate::runtime::MAX_WORKERS).contains(&a.threads) {
        return Err(format!(
            "--threads {}: 1 to {}",
            a.threads,
            crate::runtime::MAX_WORKERS
        )
        .into());
    }
    super::commands::tune_allocator();
    let exit = crate::runtime::start_daemon()?;
    let (own, mnt) = match &a.mountpoint {
        Some(m) => (None, m.clone()),
        None => {
            let o = new_mountpoint()?;
            let m = o.0.clone();
            (Some(o), m)
        }
    };
    let (fs, storage) = a.image.open_for(true, None)?;
    let recording = Recording::start(&fs, a.output.clone())?.ok_or("internal: no recorder")?;
    let _signals = crate::runtime::SignalGuard::install(&exit)?;
    let opts = crate::fuse::MountOptions {
        mountpoint: mnt.clone(),
        threads: crate::fuse::FuseThreads {
            readers: 1,
            workers: a.threads,
        },
    };
    let served = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (exit2, served2) = (exit.clone(), served.clone());
    let serving = crate::runtime::threads::spawn(
        crate::runtime::ThreadKind::Fuse,
        "skiff-record-fuse",
        move || {
            let r = crate::fuse::serve_until(std::sync::Arc::new(fs), &opts, &exit2);
            // A mount that fails (or ends) ends the recording.
            exit2.notify(ExitReason::Requested);
            *crate::util::sync::lock(&served2) = Some(r);
        },
    )?;
    let status = match wait_mounted(&mnt, &serving) {
        Ok(()) => run_workload(&a, &mnt, &exit),
        Err(e) => Err(e.into()),
    };
    exit.notify(ExitReason::Requested);
    let _ = serving.join();
    storage.finish();
    let list = recording.finish()?;
    drop(own);
    if let Some(Err(e)) = crate::util::sync::lock(&served).take() {
        return Err(e.into());
    }
    let status = status?;
    println!("recorded {} files into {}", list.files, a.output.display());
    match status {
        Some(s) if !s.success() => {
            Err(format!("the command ended with {s} (the list was written)").into())
        }
        _ => Ok(0),
    }
}
