//! The `skiff` command line: thin front ends over the library.

mod accel;
mod check;
mod commands;
mod image;
mod nydusd;
mod record;
mod sandbox;

use clap::{Parser, Subcommand};

pub use accel::*;
pub use check::*;
pub use commands::*;
pub use image::*;
pub use nydusd::{build_identity, nydusd_argv, nydusd_version, FuseArgs, RotatingLog};
pub use record::*;
pub use sandbox::*;

/// Skiff: lazily loaded, verified, shared container images for VM-based containers.
#[derive(Parser, Debug)]
#[command(name = "skiff", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build a RAFS image from a directory or OCI layer tarballs.
    Build(BuildArgs),
    /// Verify an image (bootstrap, Merkle tree, every chunk), optionally against its source.
    Check(CheckArgs),
    /// Show image statistics, or one entry with its chunks.
    Inspect(InspectArgs),
    /// Serve an image read-only over /dev/fuse until SIGINT/SIGTERM.
    Mount(MountArgs),
    /// Mount an image, run a workload on it, and write the files it read (in first-read
    /// order) as a prefetch list for `build`/`convert --prefetch-list` and `--prefetch-files`.
    Record(RecordArgs),
    /// Serve an image as a vhost-user-fs device for a VMM (QEMU, Cloud Hypervisor).
    Serve(ServeArgs),
    /// Run as Kata Containers' virtio-fs daemon (a drop-in for nydusd): a vhost-user-fs
    /// device whose mounts (the shared directory, container images) are driven over an API.
    Virtiofs(VirtiofsArgs),
    /// Run as nydus-snapshotter's host daemon (a drop-in for `nydusd fuse`): images served
    /// over /dev/fuse, one (--bootstrap) or many (mounted over the API), with failover and
    /// hot upgrade through the supervisor.
    Fuse(nydusd::FuseArgs),
    /// Convert an OCI image into a Skiff image in a registry (one blob per layer).
    Convert(ConvertArgs),
    /// Look after the shared on-disk chunk cache.
    Cache(CacheArgs),
    /// Convert images as they are pushed (Harbor's webhook, Docker distribution's
    /// notifications), or manage a running service's tasks.
    Accel(AccelArgs),
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Whether the program was started under the name `nydusd` (a symlink to skiff).
fn invoked_as_nydusd() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_owned()))
        .is_some_and(|n| n == "nydusd")
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = if invoked_as_nydusd() {
        match nydusd::nydusd_argv(std::env::args_os().collect()) {
            Ok(args) => Cli::parse_from(args),
            Err((text, code)) => {
                if code == 0 {
                    print!("{text}");
                } else {
                    eprint!("nydusd (skiff): {text}");
                }
                return code;
            }
        }
    } else {
        Cli::parse()
    };
    // With --log-file the operator reads the log, not stderr: the final error goes to both.
    // Otherwise the log already is stderr, and the one line below is the whole report.
    let logs_to_file = matches!(&cli.command, Command::Fuse(a) if a.log_file.is_some());
    match &cli.command {
        Command::Fuse(a) if a.log_file.is_some() => {
            let file = a.log_file.clone().unwrap_or_default();
            if let Err(e) = nydusd::init_file_logging(&cli.log_level, &file, a.log_rotation_size) {
                eprintln!("skiff: {e}");
                return 1;
            }
        }
        _ => init_logging(&cli.log_level),
    }
    let result = match cli.command {
        Command::Build(a) => cmd_build(a),
        Command::Check(a) => cmd_check(a),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Mount(a) => cmd_mount(a),
        Command::Record(a) => cmd_record(a),
        Command::Serve(a) => cmd_serve(a),
        Command::Virtiofs(a) => cmd_virtiofs(a),
        Command::Fuse(a) => nydusd::cmd_fuse(a),
        Command::Convert(a) => cmd_convert(a),
        Command::Cache(a) => cmd_cache(a),
        Command::Accel(a) => cmd_accel(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let msg = crate::util::error_chain(e.as_ref());
            if logs_to_file {
                tracing::error!("{msg}");
            }
            eprintln!("skiff: {msg}");
            1
        }
    }
}
