//! Nydus 2.2's own tools for the tests that read Nydus RAFS v6 images: nydus-image builds the
//! images (the peer writes them, Skiff reads them), nydusd serves them for comparisons.
//!
//! `scripts/install-nydus.sh` installs them into `/var/cache/skiff/tools/bin` (scripts/test.sh
//! runs it; `SKIFF_TOOLS` and `SKIFF_CACHE` move it, as for the script); `SKIFF_NYDUS_BIN`
//! overrides the directory. A missing tool goes through [`super::require`]: a failure under CI.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the Nydus tools are installed.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SKIFF_NYDUS_BIN") {
        return PathBuf::from(d);
    }
    // Where scripts/install-nydus.sh puts them: $SKIFF_TOOLS, else $SKIFF_CACHE/tools.
    let tools = std::env::var_os("SKIFF_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("SKIFF_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/skiff"))
                .join("tools")
        });
    tools.join("bin")
}

/// The nydus-image binary, or why there is none.
pub fn nydus_image() -> Result<PathBuf, String> {
    tool("nydus-image")
}

/// The nydusd binary, or why there is none.
pub fn nydusd() -> Result<PathBuf, String> {
    tool("nydusd")
}

fn tool(name: &str) -> Result<PathBuf, String> {
    let p = bin_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not installed (scripts/install-nydus.sh installs it)",
            p.display()
        ))
    }
}

/// [`super::require`] for nydus-image: its path, or `None` to skip (outside CI).
pub fn require_nydus_image() -> Option<PathBuf> {
    super::require("nydus-image 2.2", nydus_image())
}

/// Runs `nydus-image ARGS`, failing the test with its output unless it exits 0.
pub fn run_nydus_image<S: AsRef<OsStr>>(args: &[S]) -> String {
    run_nydus_image_with_input(args, b"")
}

/// [`run_nydus_image`] with `input` on its stdin (prefetch patterns).
pub fn run_nydus_image_with_input<S: AsRef<OsStr>>(args: &[S], input: &[u8]) -> String {
    let bin = nydus_image().expect("nydus-image");
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, input).expect("stdin");
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "nydus-image {:?} failed ({}):\n{text}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        out.status
    );
    text
}

/// How [`create_dir_rafs`] builds.
#[derive(Clone, Copy, Debug)]
pub struct BuildOpts {
    /// `--compressor`: none, lz4_block, zstd.
    pub compressor: &'static str,
    /// `--digester`: blake3, sha256.
    pub digester: &'static str,
    /// `--chunk-size`, which nydus-image reads as hex ("0x100000", "0x10000").
    pub chunk_size: &'static str,
}

impl BuildOpts {
    /// A short name for directories and messages.
    pub fn name(&self) -> String {
        format!("{}-{}-{}", self.compressor, self.digester, self.chunk_size)
    }
}

/// Builds directory `src` with `nydus-image create --type dir-rafs` into `out`: the bootstrap
/// at `out/bootstrap`, the blob in `out/blobs` named by its sha256. Returns the bootstrap.
pub fn create_dir_rafs(src: &Path, out: &Path, o: BuildOpts) -> PathBuf {
    let blobs = out.join("blobs");
    std::fs::create_dir_all(&blobs).expect("blob dir");
    let bootstrap = out.join("bootstrap");
    run_nydus_image(&[
        OsStr::new("create"),
        OsStr::new("--log-level"),
        OsStr::new("warn"),
        OsStr::new("--type"),
        OsStr::new("dir-rafs"),
        OsStr::new("--fs-version"),
        OsStr::new("6"),
        OsStr::new("--compressor"),
        OsStr::new(o.compressor),
        OsStr::new("--digester"),
        OsStr::new(o.digester),
        OsStr::new("--chunk-size"),
        OsStr::new(o.chunk_size),
        OsStr::new("--bootstrap"),
        bootstrap.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
        src.as_os_str(),
    ]);
    bootstrap
}

/// The blob files of `blob_dir` (built by [`create_dir_rafs`]).
pub fn blobs_in(blob_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(blob_dir)
        .expect("blob dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// A blob's table of contents (`--features blob-toc`): its last 512 bytes are a tar header
/// named `rafs.blob.toc` whose size field gives the length of the ToC before it.
pub struct Toc {
    /// The ToC's bytes with their tar header: what `--blob-toc-digests` hashes.
    pub bytes: Vec<u8>,
    /// (name, flags, compressed offset, compressed size, uncompressed size) of each entry.
    pub entries: Vec<(String, u32, u64, u64, u64)>,
}

fn tar_header_size(h: &[u8]) -> u64 {
    let field = &h[124..136];
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    u64::from_str_radix(text.trim(), 8).expect("tar size field")
}

/// Reads the ToC of a blob built with `--blob-inline-meta --features blob-toc`.
pub fn toc(blob: &[u8]) -> Toc {
    let hdr = &blob[blob.len() - 512..];
    let name: String = hdr[..100]
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    assert_eq!(name, "rafs.blob.toc", "the blob ends with its ToC");
    let size = tar_header_size(hdr) as usize;
    let start = blob.len() - 512 - size;
    let data = &blob[start..blob.len() - 512];
    assert_eq!(size % 128, 0, "ToC entries are 128 bytes");
    let u64_at = |e: &[u8], o: usize| u64::from_le_bytes(e[o..o + 8].try_into().expect("u64"));
    let entries = data
        .chunks(128)
        .map(|e| {
            let name: String = e[8..24]
                .iter()
                .take_while(|&&b| b != 0)
                .map(|&b| b as char)
                .collect();
            let flags = u32::from_le_bytes(e[0..4].try_into().expect("u32"));
            (name, flags, u64_at(e, 56), u64_at(e, 64), u64_at(e, 72))
        })
        .collect();
    Toc {
        bytes: blob[start..].to_vec(),
        entries,
    }
}

/// The bootstrap a `--blob-inline-meta --features blob-toc` blob carries (`image.boot`, found
/// by its ToC entry and decompressed), as nydus-snapshotter's converter extracts it to merge.
pub fn inline_bootstrap(blob: &[u8]) -> Vec<u8> {
    let t = toc(blob);
    let (_, flags, off, size, usize_) = t
        .entries
        .iter()
        .find(|e| e.0 == "image.boot")
        .expect("an image.boot ToC entry")
        .clone();
    let stored = &blob[off as usize..(off + size) as usize];
    match flags {
        0x1 => stored.to_vec(),
        0x2 => zstd::bulk::decompress(stored, usize_ as usize).expect("zstd image.boot"),
        f => panic!("image.boot compressed with flags {f:#x}"),
    }
}

/// `nydus-image create` of one layer tar into `blob`, exactly as nydus-snapshotter's converter
/// (v0.6, nydus-image >= 2.2) runs it, with `--compressor` and `--digester` when given.
pub fn create_layer_blob(
    tar: &Path,
    blob: &Path,
    compressor: Option<&str>,
    digester: Option<&str>,
) {
    let mut args: Vec<&OsStr> = [
        "create",
        "--log-level",
        "warn",
        "--prefetch-policy",
        "fs",
        "--whiteout-spec",
        "none",
        "--fs-version",
        "6",
        "--type",
        "tar-rafs",
        "--blob-inline-meta",
        "--features",
        "blob-toc",
    ]
    .iter()
    .map(OsStr::new)
    .collect();
    if let Some(c) = compressor {
        args.push(OsStr::new("--compressor"));
        args.push(OsStr::new(c));
    }
    if let Some(d) = digester {
        args.push(OsStr::new("--digester"));
        args.push(OsStr::new(d));
    }
    args.push(OsStr::new("--blob"));
    args.push(blob.as_os_str());
    args.push(tar.as_os_str());
    run_nydus_image(&args);
}

/// One layer's blob as the merge needs it: its digest (the layer digest, `sha256:…`), size,
/// ToC digest and size, and its bootstrap extracted to a file named by the digest's hex.
pub struct LayerBlob {
    /// `sha256:<hex>` of the blob file.
    pub digest: String,
    /// The blob file's size.
    pub size: u64,
    /// The blob file.
    pub path: PathBuf,
    /// Its extracted bootstrap.
    pub bootstrap: PathBuf,
    toc_digest: String,
    toc_size: u64,
}

/// Reads what the merge needs of `blob`; writes its bootstrap into `work`.
pub fn layer_blob(blob: &Path, work: &Path) -> LayerBlob {
    use sha2::Digest;
    let bytes = std::fs::read(blob).expect("blob");
    let hex = hex::encode(sha2::Sha256::digest(&bytes));
    let t = toc(&bytes);
    let bootstrap = work.join(&hex);
    std::fs::write(&bootstrap, inline_bootstrap(&bytes)).expect("bootstrap");
    LayerBlob {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
        path: blob.to_path_buf(),
        bootstrap,
        toc_digest: hex::encode(sha2::Sha256::digest(&t.bytes)),
        toc_size: t.bytes.len() as u64,
    }
}

/// `nydus-image merge` of the layers' bootstraps into `out`, with the blob digests, sizes and
/// ToC digests and sizes, as the converter's merge passes them.
pub fn merge(layers: &[LayerBlob], out: &Path) {
    let join =
        |f: &dyn Fn(&LayerBlob) -> String| layers.iter().map(f).collect::<Vec<_>>().join(",");
    let digests = join(&|l| l.digest.trim_start_matches("sha256:").to_string());
    let sizes = join(&|l| l.size.to_string());
    let toc_digests = join(&|l| l.toc_digest.clone());
    let toc_sizes = join(&|l| l.toc_size.to_string());
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("merge"),
        OsStr::new("--log-level"),
        OsStr::new("warn"),
        OsStr::new("--bootstrap"),
        out.as_os_str(),
        OsStr::new("--blob-digests"),
        OsStr::new(&digests),
        OsStr::new("--blob-sizes"),
        OsStr::new(&sizes),
        OsStr::new("--blob-toc-digests"),
        OsStr::new(&toc_digests),
        OsStr::new("--blob-toc-sizes"),
        OsStr::new(&toc_sizes),
    ];
    for l in layers {
        args.push(l.bootstrap.as_os_str());
    }
    run_nydus_image(&args);
}

/// The bootstrap layer nydusify pushes: a gzip tar of `image/` (0755) and `image/image.boot`
/// (0444, the raw bootstrap). Returns (layer bytes, sha256 of the uncompressed tar).
pub fn bootstrap_layer(bootstrap: &[u8]) -> (Vec<u8>, String) {
    use sha2::Digest;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "image", &[][..]).expect("tar dir");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o444);
    h.set_size(bootstrap.len() as u64);
    b.append_data(&mut h, "image/image.boot", bootstrap)
        .expect("tar file");
    let tar = b.into_inner().expect("tar");
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).expect("gzip");
    (gz.finish().expect("gzip"), diff_id)
}

/// Writes the OCI layout nydusify pushes for `blobs` and their merged bootstrap `boot`: the
/// blob layers (`application/vnd.oci.image.layer.nydus.blob.v1`, annotated nydus-blob), the
/// gzip tar bootstrap layer last (annotated nydus-bootstrap, fs version 6), a config whose
/// diff_ids are the layers', and the manifest in an index with the `nydus.remoteimage.v1`
/// platform feature. Returns the bootstrap layer's size.
pub fn nydusify_layout(layout: &Path, blobs: &[LayerBlob], boot: &[u8]) -> u64 {
    use super::oci::{put_blob, write_index_json};
    let (boot_layer, boot_diff_id) = bootstrap_layer(boot);

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for l in blobs {
        let bytes = std::fs::read(&l.path).expect("blob");
        assert_eq!(put_blob(layout, &bytes).expect("put"), l.digest);
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.nydus.blob.v1",
            "digest": l.digest, "size": l.size,
            "annotations": {
                "containerd.io/snapshot/nydus-blob": "true",
                "containerd.io/uncompressed": l.digest,
            },
        }));
        diff_ids.push(l.digest.clone());
    }
    let bd = put_blob(layout, &boot_layer).expect("put bootstrap layer");
    layers.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": bd, "size": boot_layer.len(),
        "annotations": {
            "containerd.io/snapshot/nydus-bootstrap": "true",
            "containerd.io/snapshot/nydus-fs-version": "6",
            "containerd.io/uncompressed": boot_diff_id,
        },
    }));
    diff_ids.push(boot_diff_id);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("config");
    let cd = put_blob(layout, &config).expect("put config");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cd, "size": config.len()},
        "layers": layers,
    }))
    .expect("manifest");
    let md = put_blob(layout, &manifest).expect("put manifest");
    write_index_json(
        layout,
        &serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux",
                         "os.features": ["nydus.remoteimage.v1"]}}),
    )
    .expect("index");
    boot_layer.len() as u64
}
