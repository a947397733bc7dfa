//! A Nydus image in Debian's docker-registry (htpasswd), laid out as nydusify lays it out and
//! made the way nydus-snapshotter's converter makes it: each layer tar through `nydus-image
//! create --type tar-rafs --blob-inline-meta --features blob-toc`, the layers' bootstraps
//! (found by each blob's ToC) through `nydus-image merge --blob-digests --blob-sizes
//! --blob-toc-digests --blob-toc-sizes`, pushed as blob layers
//! (`application/vnd.oci.image.layer.nydus.blob.v1`) and a gzip tar bootstrap layer holding
//! `image/image.boot`. No Skiff annotation anywhere.
//!
//! `skiff mount --image` of it equals the merged layers; reading one small file fetches a few
//! KiB of chunk data (the figure is printed, from the registry's access log); two processes
//! over one cache fetch the bootstrap layer once and every chunk once.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::nydus::*;
use common::oci::*;
use common::registry::Registry;
use common::*;
use skiff::format::Bootstrap;

const USER: &str = "nydus";
const PASS: &str = "s3cret-v6";
const MTIME: u64 = 1_700_000_000;

/// The first layer: a small tree with big and small files, a hard link, a symlink.
fn layer1() -> Vec<Ent<'static>> {
    vec![
        Ent::Dir("bin", 0o755),
        Ent::File("bin/tool", 0o755, noise(300_000, 1)),
        Ent::Dir("etc", 0o755),
        Ent::File("etc/conf", 0o644, b"version = 1\n".to_vec()),
        Ent::File("etc/small", 0o600, b"a small file, read alone\n".to_vec()),
        Ent::Dir("usr", 0o755),
        Ent::Dir("usr/lib", 0o755),
        Ent::File("usr/lib/libx.so.1", 0o644, noise(3 * (1 << 20) + 1234, 2)),
        Ent::Symlink("usr/lib/libx.so", "libx.so.1"),
        Ent::Dir("data", 0o750),
        Ent::File(
            "data/text",
            0o644,
            (0..60_000)
                .map(|i| format!("line {i} of the text\n"))
                .collect::<String>()
                .into_bytes(),
        ),
        Ent::File("data/empty", 0o644, Vec::new()),
        // (A hard link's tar header carries 0644 here, as its target's does: nydus-image's
        // tar-rafs takes the inode's mode from the link entry's header.)
        Ent::Link("data/text-link", "data/text"),
    ]
}

/// The second layer: replaces one file, adds a directory and files.
fn layer2() -> Vec<Ent<'static>> {
    vec![
        Ent::Dir("etc", 0o755),
        Ent::File(
            "etc/conf",
            0o644,
            b"version = 2, from the upper layer\n".to_vec(),
        ),
        Ent::Dir("opt", 0o755),
        Ent::Dir("opt/app", 0o755),
        Ent::File("opt/app/run", 0o755, noise(1_500_000, 3)),
        Ent::File("opt/app/README", 0o644, b"the second layer\n".to_vec()),
    ]
}

/// The tree the two layers make, written to `root` with the layers' metadata (owner
/// 1000:100, every mtime `MTIME`).
fn materialise(root: &Path) {
    fs::create_dir_all(root).expect("root");
    let mut all = layer1();
    all.extend(layer2());
    for e in &all {
        match e {
            Ent::Dir(p, mode) => {
                let d = root.join(p);
                fs::create_dir_all(&d).expect("mkdir");
                fs::set_permissions(&d, fs::Permissions::from_mode(*mode)).expect("chmod");
            }
            Ent::File(p, mode, data) => {
                let f = root.join(p);
                let _ = fs::remove_file(&f);
                fs::write(&f, data).expect("write");
                fs::set_permissions(&f, fs::Permissions::from_mode(*mode)).expect("chmod");
            }
            Ent::Symlink(p, t) => std::os::unix::fs::symlink(t, root.join(p)).expect("symlink"),
            Ent::Link(p, t) => fs::hard_link(root.join(t), root.join(p)).expect("link"),
        }
    }
    let mut stack = vec![root.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("readdir") {
            let p = e.expect("entry").path();
            if fs::symlink_metadata(&p).expect("lstat").is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    for p in &paths {
        lchown(p, 1000, 100);
        set_mtime(p, MTIME as i64, 0);
    }
}

struct Pushed {
    reference: String,
    bootstrap_layer_size: u64,
    /// The stored bytes of every distinct chunk: what fetching everything once costs.
    chunk_bytes: u64,
    blob_bytes: u64,
}

/// Converts the two layers as nydusify does and pushes the image.
fn push_nydus_image(reg: &Registry, work: &Path) -> Pushed {
    let mut blobs = Vec::new();
    for (i, ents) in [layer1(), layer2()].iter().enumerate() {
        let tar = work.join(format!("layer{i}.tar"));
        fs::write(&tar, layer(ents, MTIME).expect("tar")).expect("write tar");
        let blob = work.join(format!("layer{i}.blob"));
        // nydus-image's defaults for the first layer (zstd, blake3); lz4_block and sha256 for
        // the second: one image whose blobs differ in both, and sha256 chunks in the cache.
        let (compressor, digester) = match i {
            0 => (None, None),
            _ => (Some("lz4_block"), Some("sha256")),
        };
        create_layer_blob(&tar, &blob, compressor, digester);
        blobs.push(layer_blob(&blob, work));
    }
    let merged = work.join("merged.boot");
    merge(&blobs, &merged);
    let boot = fs::read(&merged).expect("merged bootstrap");
    // What the image costs to read whole: the distinct stored chunks.
    let b = Bootstrap::from_bytes(boot.clone()).expect("the merged bootstrap loads");
    let mut seen = std::collections::BTreeSet::new();
    let chunk_bytes: u64 = b
        .tables()
        .chunks
        .iter()
        .filter(|c| seen.insert((c.blob_index.get(), c.compressed_offset.get())))
        .map(|c| u64::from(c.compressed_size.get()))
        .sum();
    assert_eq!(b.blobs().len(), 2);
    let algos: std::collections::BTreeSet<_> =
        b.tables().chunks.iter().map(|c| c.digest_algo()).collect();
    assert_eq!(algos.len(), 2, "blake3 and sha256 chunks: {algos:?}");
    for (rec, l) in b.blobs().iter().zip(&blobs) {
        assert_eq!(format!("sha256:{}", hex::encode(rec.id)), l.digest);
        assert_eq!(rec.size.get(), l.size, "merge recorded the blob's size");
    }
    let layout = work.join("layout");
    let bootstrap_layer_size = nydusify_layout(&layout, &blobs, &boot);
    let reference = format!("{}/nydus/app:v1", reg.addr);
    skopeo_push(&layout, &reference, &format!("{USER}:{PASS}"), false).expect("skopeo push");
    Pushed {
        reference,
        bootstrap_layer_size,
        chunk_bytes,
        blob_bytes: blobs.iter().map(|l| l.size).sum(),
    }
}

fn mount_image(p: &Pushed, cache: &Path, mnt: &Path) -> Mount {
    let auth = format!("{USER}:{PASS}");
    Mount::with_args(
        &[
            OsStr::new("--image"),
            OsStr::new(&p.reference),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
            OsStr::new("--registry-auth"),
            OsStr::new(&auth),
        ],
        mnt,
    )
}

#[test]
fn nydus_image_from_a_registry() {
    if !require_fuse() || require_nydus_image().is_none() {
        return;
    }
    if require("skopeo", have("skopeo")).is_none() {
        return;
    }
    let Some(reg) = require(
        "a local registry",
        Registry::start("nydus", &["--htpasswd", &format!("{USER}:{PASS}")]),
    ) else {
        return;
    };
    let tmp = scratch();
    let t = tmp.path();
    let pushed = push_nydus_image(&reg, t);
    let want_dir = t.join("want");
    materialise(&want_dir);
    let want = snapshot(&want_dir);

    // The whole image, through a mount of its own.
    let m = mount_image(&pushed, &t.join("cache-full"), &t.join("mnt-full"));
    let mut got = snapshot(&m.dir);
    m.unmount();
    // Not preserved by nydus-image: the root's mtime (0, served as the load time) and
    // directories' sizes (EROFS's).
    for (path, f) in got.iter_mut() {
        if f.kind == "dir" {
            f.size = want[path].size;
        }
    }
    let root = got.get_mut(b"/".as_slice()).expect("root");
    root.mtime = want[&b"/".to_vec()].mtime;
    assert_no_diff("Nydus image from the registry", &want, &got);

    // One small file, from a fresh cache: the bootstrap layer and a few KiB of chunks.
    let from = reg.log_len();
    let m = mount_image(&pushed, &t.join("cache-small"), &t.join("mnt-small"));
    assert_eq!(
        fs::read(m.dir.join("etc/small")).expect("read etc/small"),
        b"a small file, read alone\n"
    );
    m.unmount();
    let gets = reg.blob_gets(from);
    let served: u64 = gets.iter().map(|g| g.bytes).sum();
    let chunk_part = served.saturating_sub(pushed.bootstrap_layer_size);
    eprintln!(
        "[numbers] Nydus image ({} blob bytes, {} of distinct chunks): reading etc/small fetched \
         {served} bytes in {} requests: the bootstrap layer ({} bytes) and {chunk_part} bytes of chunks",
        pushed.blob_bytes,
        pushed.chunk_bytes,
        gets.len(),
        pushed.bootstrap_layer_size
    );
    assert!(
        served >= pushed.bootstrap_layer_size,
        "the bootstrap layer is fetched"
    );
    assert!(
        chunk_part > 0 && chunk_part <= 64 * 1024,
        "one small file needs a few KiB of chunks, not {chunk_part} bytes"
    );

    // Two processes over one cache, reading everything at once: the bootstrap layer once and
    // every chunk once.
    let from = reg.log_len();
    let cache = t.join("cache-shared");
    let m1 = mount_image(&pushed, &cache, &t.join("mnt1"));
    let m2 = mount_image(&pushed, &cache, &t.join("mnt2"));
    let (d1, d2) = (m1.dir.clone(), m2.dir.clone());
    let r1 = std::thread::spawn(move || snapshot(&d1));
    let r2 = std::thread::spawn(move || snapshot(&d2));
    let (s1, s2) = (r1.join().expect("reader 1"), r2.join().expect("reader 2"));
    m1.unmount();
    m2.unmount();
    for s in [&s1, &s2] {
        for (path, f) in s {
            assert_eq!(f.content, want[path].content, "{path:?}");
        }
    }
    let served: u64 = reg.blob_gets(from).iter().map(|g| g.bytes).sum();
    eprintln!(
        "[numbers] two processes, one cache, everything read by both: {served} bytes fetched \
         (bootstrap layer {} + distinct chunks {})",
        pushed.bootstrap_layer_size, pushed.chunk_bytes
    );
    assert_eq!(
        served,
        pushed.bootstrap_layer_size + pushed.chunk_bytes,
        "the bootstrap layer once and each chunk once"
    );
    // The second layer's sha256 chunks went to their own place in the shared cache.
    let stat = skiff_ok([
        OsStr::new("cache"),
        OsStr::new("stat"),
        OsStr::new("--json"),
        OsStr::new("--cache-dir"),
        cache.as_os_str(),
    ]);
    let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).expect("stat JSON");
    let sha256_files = walk_files(&cache.join("chunks-sha256"));
    assert!(sha256_files > 0, "no sha256 chunk in the cache");
    assert_eq!(
        stat["chunks"].as_u64(),
        Some((walk_files(&cache.join("chunks")) + sha256_files) as u64),
        "cache stat counts both kinds: {stat}"
    );
}

/// Regular files under `dir`, recursively (0 when it does not exist).
fn walk_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_files(&p)
            } else {
                usize::from(p.is_file())
            }
        })
        .sum()
}
