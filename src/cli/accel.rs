//! `skiff accel`: the convert-on-push service, and `task create` / `task list` against a
//! running one (as Harbor's `accelctl` has).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::commands::CmdResult;
use crate::accel::config::AccelConfig;
use crate::accel::tasks::Task;

/// The service's default address.
const DEFAULT_ADDR: &str = "127.0.0.1:2077";
/// Where `--auth-header` may come from instead.
const AUTH_ENV: &str = "SKIFF_ACCEL_AUTH";

/// Arguments of `skiff accel`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AccelArgs {
    /// Run the service with this configuration (JSON; see docs/accel.md).
    #[arg(long, required = false)]
    pub config: Option<PathBuf>,
    /// Talk to a running service.
    #[command(subcommand)]
    pub command: Option<AccelCommand>,
}

/// `skiff accel` subcommands.
#[derive(Subcommand, Debug)]
pub enum AccelCommand {
    /// Manage the service's conversion tasks.
    Task {
        /// What to do.
        #[command(subcommand)]
        command: TaskCommand,
    },
}

/// `skiff accel task` subcommands.
#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Queue the conversion of an image (a reference with a tag), as a Harbor webhook would.
    Create {
        /// The image.
        #[arg(value_name = "REF")]
        source: String,
        /// The service's address.
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
        /// The `Authorization` header the service expects for the image's registry (its
        /// `webhook_auth_header`; else $SKIFF_ACCEL_AUTH).
        #[arg(long)]
        auth_header: Option<String>,
        /// Wait until the conversion is done, and exit 1 if it failed.
        #[arg(long)]
        sync: bool,
    },
    /// List the tasks, newest first.
    List {
        /// The service's address.
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
        /// Print the service's JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `skiff accel`.
pub fn cmd_accel(a: AccelArgs) -> CmdResult {
    match (a.config, a.command) {
        (Some(c), None) => {
            let config = AccelConfig::load(&c)?;
            crate::accel::run(config)?;
            Ok(0)
        }
        (None, Some(AccelCommand::Task { command })) => task(command),
        _ => Err("give --config FILE to run the service, or a task subcommand".into()),
    }
}

fn http() -> Result<reqwest::blocking::Client, Box<dyn std::error::Error>> {
    Ok(reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(None)
        .build()?)
}

fn task(command: TaskCommand) -> CmdResult {
    match command {
        TaskCommand::Create {
            source,
            addr,
            auth_header,
            sync,
        } => {
            let reference = crate::oci::Reference::parse(&source)?;
            let payload = serde_json::json!({
                "type": crate::accel::events::HARBOR_PUSH_ARTIFACT,
                "event_data": {"resources": [{
                    "resource_url": reference.to_string(),
                    "tag": reference.tag,
                    "digest": reference.digest,
                }]},
            });
            let mut req = http()?
                .post(format!("http://{addr}/api/v1/conversions?sync={sync}"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&payload)?);
            if let Some(h) = auth_header.or_else(|| std::env::var(AUTH_ENV).ok()) {
                req = req.header(reqwest::header::AUTHORIZATION, h);
            }
            let resp = req.send()?;
            let status = resp.status();
            let body: serde_json::Value =
                serde_json::from_slice(&resp.bytes()?).unwrap_or(serde_json::Value::Null);
            if !status.is_success() {
                return Err(format!(
                    "the service answered {status}: {}",
                    body["message"].as_str().unwrap_or("")
                )
                .into());
            }
            for q in body["queued"].as_array().into_iter().flatten() {
                let id = q["task"]["id"].as_str().unwrap_or("-");
                println!(
                    "{} {} task {id} {}",
                    q["source"].as_str().unwrap_or(""),
                    q["result"].as_str().unwrap_or(""),
                    q["reason"].as_str().unwrap_or("")
                );
            }
            let mut failed = false;
            for t in body["tasks"].as_array().into_iter().flatten() {
                let status = t["status"].as_str().unwrap_or("");
                println!(
                    "task {} {status} {}",
                    t["id"].as_str().unwrap_or("-"),
                    t["reason"].as_str().unwrap_or("")
                );
                failed |= status == "FAILED";
            }
            Ok(if failed { 1 } else { 0 })
        }
        TaskCommand::List { addr, json } => {
            let resp = http()?
                .get(format!("http://{addr}/api/v1/conversions"))
                .send()?;
            if !resp.status().is_success() {
                return Err(format!("the service answered {}", resp.status()).into());
            }
            let text = resp.text()?;
            if json {
                println!("{text}");
                return Ok(0);
            }
            let tasks: Vec<Task> = serde_json::from_str(&text)?;
            println!(
                "{:<6} {:<20} {:<10} {:>8} {:<50} REASON",
                "ID", "CREATED", "STATUS", "SECONDS", "SOURCE"
            );
            for t in tasks {
                println!(
                    "{:<6} {:<20} {:<10} {:>8} {:<50} {}",
                    t.id,
                    t.created,
                    t.status.label().to_uppercase(),
                    t.seconds.map(|s| format!("{s:.1}")).unwrap_or_default(),
                    t.source,
                    t.reason
                );
            }
            Ok(0)
        }
    }
}
