//! `skiff check`: verify an image end to end, and compare it with its source, without mounting.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::format::{digest_hex, Bootstrap, InodeKind};
use crate::storage::{CachedChunkSource, ChunkSource, LocalFsBackend};

/// One problem found, named by the path it concerns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Problem {
    /// Path in the image ("/" for the image as a whole).
    pub path: String,
    /// What is wrong.
    pub what: String,
}

fn problem(path: &[u8], what: impl Into<String>) -> Problem {
    Problem {
        path: String::from_utf8_lossy(path).into_owned(),
        what: what.into(),
    }
}

/// Checks every blob (present, right size, right digest) and every chunk (decompresses and
/// matches its digest) of `b`, with blobs in `blob_dir`.
pub fn verify_chunks(b: &Bootstrap, blob_dir: &Path) -> Vec<Problem> {
    let backend = LocalFsBackend::new(blob_dir);
    let mut problems = Vec::new();
    for blob in b.blobs() {
        let path = backend.blob_path(&blob.id);
        match blob_digest(&path, blob.id_is_sha256()) {
            Ok((size, digest)) => {
                if size != blob.size.get() {
                    problems.push(problem(
                        b"/",
                        format!(
                            "blob {} is {size} bytes, expected {}",
                            path.display(),
                            blob.size.get()
                        ),
                    ));
                } else if digest != blob.id {
                    problems.push(problem(
                        b"/",
                        format!("blob {} does not match its digest", path.display()),
                    ));
                }
            }
            Err(e) => problems.push(problem(b"/", format!("blob {}: {e}", path.display()))),
        }
    }
    // Memory cache off: every chunk is read and verified from the blob.
    let source = CachedChunkSource::in_memory(backend, 0);
    let paths = b.paths();
    let t = b.tables();
    let files: Vec<usize> = (0..t.inodes.len())
        .filter(|&i| t.inodes[i].kind() == Some(InodeKind::Regular))
        .collect();
    let mut bad: Vec<Problem> = files
        .par_iter()
        .flat_map_iter(|&i| {
            let chunks = b.file_chunks(i as u32);
            let mut out = Vec::new();
            for (ci, c) in chunks.iter().enumerate().filter(|(_, c)| !c.is_zero()) {
                let Some(blob) = t.blobs.get(c.blob_index.get() as usize) else {
                    continue;
                };
                if let Err(e) = source.read_chunk(blob, c) {
                    out.push(problem(
                        paths.get(i).map(Vec::as_slice).unwrap_or(b"?"),
                        format!("chunk {ci}: {}", crate::cli::error_chain(&e)),
                    ));
                }
            }
            out
        })
        .collect();
    problems.append(&mut bad);
    problems
}

fn blob_digest(path: &Path, sha256: bool) -> std::io::Result<(u64, [u8; 32])> {
    use sha2::Digest;
    let mut f = File::open(path)?;
    let mut b3 = blake3::Hasher::new();
    let mut s2 = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if sha256 {
            s2.update(&buf[..n]);
        } else {
            b3.update(&buf[..n]);
        }
    }
    let digest = if sha256 {
        s2.finalize().into()
    } else {
        *b3.finalize().as_bytes()
    };
    Ok((size, digest))
}

/// Everything compared about one entry.
#[derive(Debug, PartialEq, Eq)]
struct Facts {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, u32),
    rdev: u64,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn kind_name(mode: u32) -> &'static str {
    match InodeKind::from_mode(mode) {
        Some(InodeKind::Directory) => "directory",
        Some(InodeKind::Regular) => "file",
        Some(InodeKind::Symlink) => "symlink",
        Some(InodeKind::CharDevice) => "char device",
        Some(InodeKind::BlockDevice) => "block device",
        Some(InodeKind::Fifo) => "fifo",
        Some(InodeKind::Socket) => "socket",
        None => "unknown",
    }
}

/// Compares image `b` with directory `source`, field by field and byte by byte, and returns
/// every difference, named by path.
pub fn compare_with_source(b: &Bootstrap, source: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    // Hard-link groups: path -> group key, on each side.
    let mut src_groups: BTreeMap<Vec<u8>, (u64, u64)> = BTreeMap::new();
    let mut img_groups: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut files: Vec<(Vec<u8>, PathBuf, u32)> = Vec::new();
    let mut stack: Vec<(Vec<u8>, PathBuf, u32)> = vec![(b"/".to_vec(), source.to_path_buf(), 0)];
    while let Some((rel, host, ino)) = stack.pop() {
        let m = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) => {
                problems.push(problem(&rel, format!("source unreadable: {e}")));
                continue;
            }
        };
        let Some(rec) = b.inode(ino) else {
            problems.push(problem(&rel, "inode missing from image"));
            continue;
        };
        let src = Facts {
            kind: kind_name(m.mode()),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec() as u32),
            rdev: if m.file_type().is_char_device() || m.file_type().is_block_device() {
                m.rdev()
            } else {
                0
            },
            target: std::fs::read_link(&host)
                .ok()
                .map(|t| t.as_os_str().as_bytes().to_vec()),
            xattrs: host_xattrs(&host),
        };
        let img = Facts {
            kind: kind_name(rec.mode.get()),
            mode: rec.mode.get(),
            uid: rec.uid.get(),
            gid: rec.gid.get(),
            size: rec.size.get(),
            mtime: (rec.mtime.get(), rec.mtime_nsec.get()),
            rdev: rec.rdev.get(),
            target: b.symlink_target(ino).map(<[u8]>::to_vec),
            xattrs: b
                .xattrs(ino)
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect(),
        };
        diff_facts(&rel, &src, &img, &mut problems);
        if src.kind != img.kind {
            continue;
        }
        if !m.is_dir() {
            src_groups.insert(rel.clone(), (m.dev(), m.ino()));
            img_groups.insert(rel.clone(), ino);
        }
        if m.is_file() {
            files.push((rel.clone(), host.clone(), ino));
        }
        if m.is_dir() {
            let mut src_names = BTreeSet::new();
            match std::fs::read_dir(&host) {
                Ok(rd) => {
                    for e in rd.flatten() {
                        src_names.insert(e.file_name().as_bytes().to_vec());
                    }
                }
                Err(e) => problems.push(problem(&rel, format!("source directory unreadable: {e}"))),
            }
            let img_names: BTreeSet<Vec<u8>> = b
                .dir_entries(ino)
                .iter()
                .map(|d| b.entry_name(d).to_vec())
                .collect();
            for n in src_names.difference(&img_names) {
                problems.push(problem(&join(&rel, n), "missing from the image"));
            }
            for n in img_names.difference(&src_names) {
                problems.push(problem(
                    &join(&rel, n),
                    "in the image but not in the source",
                ));
            }
            for n in src_names.intersection(&img_names) {
                if let Some(child) = b.lookup(ino, n) {
                    stack.push((
                        join(&rel, n),
                        host.join(std::ffi::OsStr::from_bytes(n)),
                        child,
                    ));
                }
            }
        }
    }
    problems.extend(diff_link_groups(&src_groups, &img_groups));
    let chunk_size = b.chunk_size() as usize;
    let mut content: Vec<Problem> = files
        .par_iter()
        .filter_map(|(rel, host, ino)| {
            compare_content(b, *ino, host, chunk_size)
                .err()
                .map(|w| problem(rel, w))
        })
        .collect();
    problems.append(&mut content);
    problems.sort();
    problems
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.len() > 1 {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn host_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(names) = xattr::list(path) {
        for n in names {
            if let Ok(Some(v)) = xattr::get(path, &n) {
                out.insert(n.as_bytes().to_vec(), v);
            }
        }
    }
    out
}

fn diff_facts(rel: &[u8], src: &Facts, img: &Facts, out: &mut Vec<Problem>) {
    if src.kind != img.kind {
        out.push(problem(
            rel,
            format!("type: source {}, image {}", src.kind, img.kind),
        ));
        return;
    }
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(problem(rel, format!("{name}: source {a}, image {b}")));
        }
    };
    field("mode", format!("{:o}", src.mode), format!("{:o}", img.mode));
    field("uid", src.uid.to_string(), img.uid.to_string());
    field("gid", src.gid.to_string(), img.gid.to_string());
    field("size", src.size.to_string(), img.size.to_string());
    field(
        "mtime",
        format!("{}.{:09}", src.mtime.0, src.mtime.1),
        format!("{}.{:09}", img.mtime.0, img.mtime.1),
    );
    field("rdev", src.rdev.to_string(), img.rdev.to_string());
    let lossy = |t: &Option<Vec<u8>>| {
        t.as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default()
    };
    field("symlink target", lossy(&src.target), lossy(&img.target));
    if src.xattrs != img.xattrs {
        let names = |x: &BTreeMap<Vec<u8>, Vec<u8>>| {
            x.iter()
                .map(|(n, v)| format!("{}={}", String::from_utf8_lossy(n), hex::encode(v)))
                .collect::<Vec<_>>()
                .join(",")
        };
        field("xattrs", names(&src.xattrs), names(&img.xattrs));
    }
}

fn diff_link_groups(
    src: &BTreeMap<Vec<u8>, (u64, u64)>,
    img: &BTreeMap<Vec<u8>, u32>,
) -> Vec<Problem> {
    let mut src_by: HashMap<(u64, u64), BTreeSet<&Vec<u8>>> = HashMap::new();
    for (p, k) in src {
        src_by.entry(*k).or_default().insert(p);
    }
    let mut img_by: HashMap<u32, BTreeSet<&Vec<u8>>> = HashMap::new();
    for (p, k) in img {
        img_by.entry(*k).or_default().insert(p);
    }
    let mut out = Vec::new();
    for (p, k) in src {
        let (Some(a), Some(ik)) = (src_by.get(k), img.get(p)) else {
            continue;
        };
        let Some(bset) = img_by.get(ik) else { continue };
        if a != bset {
            let fmt = |s: &BTreeSet<&Vec<u8>>| {
                s.iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            out.push(problem(
                p,
                format!("hard links: source [{}], image [{}]", fmt(a), fmt(bset)),
            ));
        }
    }
    out
}

fn compare_content(b: &Bootstrap, ino: u32, host: &Path, chunk_size: usize) -> Result<(), String> {
    let chunks = b.file_chunks(ino);
    let mut f = File::open(host).map_err(|e| format!("source unreadable: {e}"))?;
    let mut buf = vec![0u8; chunk_size];
    for (i, c) in chunks.iter().enumerate() {
        let n = c.uncompressed_size.get() as usize;
        let part = buf.get_mut(..n).ok_or("chunk larger than the chunk size")?;
        f.read_exact(part)
            .map_err(|e| format!("source shorter than the image: {e}"))?;
        if blake3::hash(part).as_bytes() != &c.digest {
            return Err(format!(
                "content differs in chunk {i} (bytes {}..{})",
                i * chunk_size,
                i * chunk_size + n
            ));
        }
    }
    let mut probe = [0u8; 1];
    if f.read(&mut probe).map_err(|e| e.to_string())? != 0 {
        return Err("source longer than the image".into());
    }
    Ok(())
}

/// Summary statistics of an image, for `skiff inspect`.
#[derive(Debug, serde::Serialize)]
pub struct ImageStats {
    /// Root Merkle digest.
    pub root_digest: String,
    /// Chunk size.
    pub chunk_size: u32,
    /// Bootstrap size.
    pub bootstrap_bytes: usize,
    /// Inodes by kind.
    pub inodes: BTreeMap<&'static str, u64>,
    /// Directory entries.
    pub entries: u64,
    /// Total file content bytes.
    pub content_bytes: u64,
    /// Chunk references.
    pub chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// Zero chunks.
    pub zero_chunks: u64,
    /// Blobs, with their sizes.
    pub blobs: Vec<(String, u64)>,
    /// Inodes in the prefetch list.
    pub prefetch: u64,
}

/// Computes [`ImageStats`] of `b`.
pub fn image_stats(b: &Bootstrap) -> ImageStats {
    let t = b.tables();
    let mut inodes = BTreeMap::new();
    let mut content_bytes = 0;
    for r in t.inodes {
        *inodes.entry(kind_name(r.mode.get())).or_insert(0) += 1;
        if r.kind() == Some(InodeKind::Regular) {
            content_bytes += r.size.get();
        }
    }
    let unique: BTreeSet<&[u8; 32]> = t
        .chunks
        .iter()
        .filter(|c| !c.is_zero())
        .map(|c| &c.digest)
        .collect();
    ImageStats {
        root_digest: digest_hex(b.root_digest()),
        chunk_size: b.chunk_size(),
        bootstrap_bytes: b.byte_len(),
        inodes,
        entries: t.dirents.len() as u64,
        content_bytes,
        chunks: t.chunks.len() as u64,
        unique_chunks: unique.len() as u64,
        zero_chunks: t.chunks.iter().filter(|c| c.is_zero()).count() as u64,
        blobs: t
            .blobs
            .iter()
            .map(|r| (digest_hex(&r.id), r.size.get()))
            .collect(),
        prefetch: t.prefetch.len() as u64,
    }
}
