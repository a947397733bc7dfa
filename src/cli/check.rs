//! `skiff check`: a local image (bootstrap and blob directory, optionally against a directory),
//! or a converted image in a registry against its OCI source.

use std::path::PathBuf;

use clap::Args;

use super::commands::{tempdir_in_var_tmp, CmdResult, RegistryArgs, RemoveOnDrop};
use crate::check::{self, ImageCheckOptions, Problem};
use crate::format::{digest_hex, Bootstrap};

/// Exit code: the image is as it should be.
pub const CHECK_CLEAN: i32 = 0;
/// Exit code: problems were found.
pub const CHECK_PROBLEMS: i32 = 1;
/// Exit code: the check could not run.
pub const CHECK_CANNOT_RUN: i32 = 2;

/// Arguments of `skiff check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// A local image: the bootstrap to check (with --blob-dir).
    #[arg(long, conflicts_with = "target", requires = "blob_dir")]
    pub bootstrap: Option<PathBuf>,
    /// Directory holding the local image's blobs.
    #[arg(long, requires = "bootstrap")]
    pub blob_dir: Option<PathBuf>,
    /// What the image was made from: with --bootstrap, a directory; with --target, an OCI image
    /// (a reference, an OCI image layout directory or a `docker save` tarball).
    #[arg(
        long,
        value_name = "REF|DIR|TAR",
        required_unless_present = "bootstrap"
    )]
    pub source: Option<String>,
    /// A converted image in a registry, checked against --source.
    #[arg(long, value_name = "REF", requires = "source")]
    pub target: Option<String>,
    /// Skip the data rule: no blob is fetched (the manifest, bootstrap and filesystem rules
    /// still run; the filesystem rule compares the bootstrap's chunk digests).
    #[arg(long, requires = "target")]
    pub no_data: bool,
    /// Also write the report as JSON to this file (`-`: standard output, instead of text).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Speak plain HTTP to the source registry.
    #[arg(long, requires = "target")]
    pub source_insecure: bool,
    /// Speak plain HTTP to the target registry.
    #[arg(long, requires = "target")]
    pub target_insecure: bool,
    /// Registry settings (credentials are looked up for each reference's host).
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Scratch directory (a `docker save` source's layers are copied there).
    #[arg(long, requires = "target")]
    pub work_dir: Option<PathBuf>,
}

/// `skiff check`: exit 0 when clean, 1 on problems, 2 when the check cannot run.
pub fn cmd_check(a: CheckArgs) -> CmdResult {
    let r = match &a.target {
        Some(t) => check_registry(&a, t),
        None => check_local(&a),
    };
    match r {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!(
                "skiff: check cannot run: {}",
                crate::util::error_chain(e.as_ref())
            );
            Ok(CHECK_CANNOT_RUN)
        }
    }
}

fn print_problems(problems: &[Problem]) {
    for p in problems {
        println!("PROBLEM {}: {}", p.path, p.what);
    }
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> CmdResult {
    let text = serde_json::to_string_pretty(value)?;
    if path.as_os_str() == "-" {
        println!("{text}");
    } else {
        crate::util::write_atomically(path, text.as_bytes())?;
    }
    Ok(0)
}

fn check_local(a: &CheckArgs) -> CmdResult {
    let (Some(bootstrap), Some(blob_dir)) = (&a.bootstrap, &a.blob_dir) else {
        return Err("give --bootstrap and --blob-dir, or --source and --target".into());
    };
    let source = a.source.as_ref().map(PathBuf::from);
    if let Some(s) = &source {
        if !s.is_dir() {
            return Err(format!(
                "--source {}: with --bootstrap the source is a directory",
                s.display()
            )
            .into());
        }
    }
    let b = Bootstrap::load(bootstrap)?;
    let text = a.json.as_deref().is_none_or(|j| j.as_os_str() != "-");
    if text {
        println!(
            "bootstrap {} ({}): valid, Merkle root {}",
            bootstrap.display(),
            b.source_format().name(),
            digest_hex(b.root_digest())
        );
    }
    let mut problems = check::verify_chunks(&b, blob_dir);
    let chunks = b.tables().chunks.iter().filter(|c| !c.is_zero()).count();
    if problems.is_empty() && text {
        println!("chunks: {chunks} verified in {} blob(s)", b.blobs().len());
    }
    if let Some(src) = &source {
        let diff = check::compare_with_source(&b, src);
        if diff.is_empty() && text {
            println!("source {}: identical", src.display());
        }
        problems.extend(diff);
    }
    if let Some(j) = &a.json {
        write_json(
            j,
            &serde_json::json!({
                "bootstrap": bootstrap,
                "root_digest": digest_hex(b.root_digest()),
                "chunks": chunks,
                "problems": problems,
            }),
        )?;
    }
    if text {
        print_problems(&problems);
    }
    if problems.is_empty() {
        if text {
            println!("ok");
        }
        Ok(CHECK_CLEAN)
    } else {
        eprintln!("skiff: check found {} problem(s)", problems.len());
        Ok(CHECK_PROBLEMS)
    }
}

fn check_registry(a: &CheckArgs, target: &str) -> CmdResult {
    let source = a.source.clone().ok_or("--target needs --source")?;
    let target = crate::oci::Reference::parse(target)?;
    let source_registry = match crate::oci::Reference::parse(&source) {
        Ok(r) if !std::path::Path::new(&source).exists() => {
            a.registry.options(&r.registry, a.source_insecure)?
        }
        _ => crate::oci::RegistryOptions::default(),
    };
    let mut target_registry = a.registry.options(&target.registry, a.target_insecure)?;
    // Blobs are read whole in one request each.
    target_registry.timeout = Some(std::time::Duration::from_secs(600));
    let (work_dir, _tmp) = match &a.work_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempdir_in_var_tmp()?;
            (t.clone(), Some(RemoveOnDrop(t)))
        }
    };
    let report = check::check_image(&ImageCheckOptions {
        source,
        source_registry,
        target,
        target_registry,
        data: !a.no_data,
        work_dir,
    })?;
    let text = a.json.as_deref().is_none_or(|j| j.as_os_str() != "-");
    if text {
        println!("source      {}", report.source);
        println!("target      {}@{}", report.target, report.target_digest);
        for i in &report.images {
            println!(
                "image       {} {} {} root {} ({} inodes, {} blobs, {} chunks verified, {} entries compared)",
                i.platform.as_deref().unwrap_or("-"),
                i.format,
                i.manifest_digest,
                i.root_digest.as_deref().unwrap_or("-"),
                i.inodes,
                i.blobs,
                i.chunks_verified,
                i.entries_compared
            );
        }
        for (rule, status) in &report.rules {
            println!(
                "rule        {rule:<11} {}",
                format!("{status:?}").to_lowercase()
            );
        }
        print_problems(&report.problems);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "fetched     {:.1} MiB from the source, {:.1} MiB from the target in {:.2} s",
            mib(report.source_bytes_fetched),
            mib(report.target_bytes_fetched),
            report.seconds
        );
    }
    if let Some(j) = &a.json {
        write_json(j, &report)?;
    }
    if report.problems.is_empty() {
        if text {
            println!("ok");
        }
        Ok(CHECK_CLEAN)
    } else {
        let mut by_rule = std::collections::BTreeMap::new();
        for p in &report.problems {
            *by_rule
                .entry(format!("{:?}", p.rule).to_lowercase())
                .or_insert(0) += 1;
        }
        let parts: Vec<String> = by_rule.iter().map(|(r, n)| format!("{r} {n}")).collect();
        eprintln!(
            "skiff: check found {} problem(s): {}",
            report.problems.len(),
            parts.join(", ")
        );
        Ok(CHECK_PROBLEMS)
    }
}
