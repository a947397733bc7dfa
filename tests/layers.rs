//! Building images from OCI layer tarballs with the real `skiff build`: whiteouts, opaque
//! directories, replacements, hard links, metadata from tar and pax headers, compression,
//! hostile layers and determinism. Results are read back from the bootstrap and the blobs, and
//! compared with hand-written expectations and with an independent reference applier.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use skiff::format::{Bootstrap, InodeKind};
use skiff::storage::{CachedChunkSource, ChunkSource, LocalFsBackend};

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

const CHUNK: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Writing layers

/// What an entry is.
#[derive(Clone, Debug)]
enum Ty {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    Link(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    /// A type flag written as is (old-style '\0', unknown types).
    Raw(u8, Vec<u8>),
}

/// One tar entry, written by hand so that hostile ones can be written too.
#[derive(Clone, Debug)]
struct E {
    path: Vec<u8>,
    ty: Ty,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// A size field that differs from the content written.
    declared_size: Option<u64>,
    /// Write the path (and link target) as GNU long name (and long link) records instead of in
    /// the header or a pax record.
    gnu_long_name: bool,
}

/// A layer: entries in stream order.
#[derive(Clone, Debug, Default)]
struct Layer(Vec<E>);

impl Layer {
    fn new() -> Self {
        Self::default()
    }

    fn push(mut self, path: impl AsRef<[u8]>, ty: Ty, mode: u32) -> Self {
        self.0.push(E {
            path: path.as_ref().to_vec(),
            ty,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            pax: Vec::new(),
            declared_size: None,
            gnu_long_name: false,
        });
        self
    }

    fn dir(self, path: impl AsRef<[u8]>, mode: u32) -> Self {
        self.push(path, Ty::Dir, mode)
    }

    fn file(self, path: impl AsRef<[u8]>, mode: u32, content: impl AsRef<[u8]>) -> Self {
        self.push(path, Ty::File(content.as_ref().to_vec()), mode)
    }

    fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        self.push(path, Ty::Symlink(target.as_ref().to_vec()), 0o777)
    }

    fn link(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        self.push(path, Ty::Link(target.as_ref().to_vec()), 0o644)
    }

    /// `.wh.NAME` next to `path`.
    fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rfind('/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => ("", path),
        };
        self.file(format!("{dir}.wh.{name}"), 0o644, b"")
    }

    /// The opaque marker in directory `dir` ("" for the root).
    fn opaque(self, dir: &str) -> Self {
        let p = if dir.is_empty() {
            ".wh..wh..opq".to_string()
        } else {
            format!("{dir}/.wh..wh..opq")
        };
        self.file(p, 0o644, b"")
    }

    /// Changes the last entry.
    fn with(mut self, f: impl FnOnce(&mut E)) -> Self {
        if let Some(e) = self.0.last_mut() {
            f(e);
        }
        self
    }

    fn pax(self, key: &str, value: impl AsRef<[u8]>) -> Self {
        let v = value.as_ref().to_vec();
        self.with(|e| e.pax.push((key.as_bytes().to_vec(), v)))
    }

    fn xattr(self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.pax(&format!("SCHILY.xattr.{name}"), value)
    }

    fn owner(self, uid: u64, gid: u64) -> Self {
        self.with(|e| {
            e.uid = uid;
            e.gid = gid;
        })
    }

    fn mtime(self, secs: u64) -> Self {
        self.with(|e| e.mtime = secs)
    }

    /// The layer as an uncompressed tar.
    fn tar(&self) -> Res<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for e in &self.0 {
            write_entry(&mut b, e)?;
        }
        Ok(b.into_inner()?)
    }
}

/// One pax record: its length prefix counts itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 2;
    let mut len = body + 1;
    while len.to_string().len() + 1 + body != len {
        len += 1;
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn put(field: &mut [u8], bytes: &[u8]) {
    field.iter_mut().for_each(|b| *b = 0);
    field[..bytes.len()].copy_from_slice(bytes);
}

fn write_entry(b: &mut tar::Builder<Vec<u8>>, e: &E) -> Res {
    let mut pax = e.pax.clone();
    let mut h = tar::Header::new_ustar();
    if e.gnu_long_name {
        let mut l = tar::Header::new_gnu();
        put(&mut l.as_old_mut().name, b"././@LongLink");
        l.set_entry_type(tar::EntryType::GNULongName);
        let mut name = e.path.clone();
        name.push(0);
        l.set_size(name.len() as u64);
        l.set_mode(0o644);
        l.set_cksum();
        b.append(&l, name.as_slice())?;
        put(&mut h.as_old_mut().name, &e.path[..100.min(e.path.len())]);
    } else if e.path.len() <= 100 {
        put(&mut h.as_old_mut().name, &e.path);
    } else {
        pax.push((b"path".to_vec(), e.path.clone()));
        put(&mut h.as_old_mut().name, b"long-name-in-pax");
    }
    let link = match &e.ty {
        Ty::Symlink(t) | Ty::Link(t) => Some(t),
        _ => None,
    };
    if let Some(t) = link {
        if e.gnu_long_name {
            let mut k = tar::Header::new_gnu();
            put(&mut k.as_old_mut().name, b"././@LongLink");
            k.set_entry_type(tar::EntryType::GNULongLink);
            k.set_size(t.len() as u64 + 1);
            k.set_mode(0o644);
            k.set_cksum();
            b.append(&k, [t.as_slice(), b"\0"].concat().as_slice())?;
            put(&mut h.as_old_mut().linkname, &t[..100.min(t.len())]);
        } else if t.len() <= 100 {
            put(&mut h.as_old_mut().linkname, t);
        } else {
            pax.push((b"linkpath".to_vec(), t.clone()));
            put(&mut h.as_old_mut().linkname, b"long-target-in-pax");
        }
    }
    let (flag, data): (u8, &[u8]) = match &e.ty {
        Ty::File(c) => (b'0', c),
        Ty::Dir => (b'5', b""),
        Ty::Symlink(_) => (b'2', b""),
        Ty::Link(_) => (b'1', b""),
        Ty::Char(..) => (b'3', b""),
        Ty::Block(..) => (b'4', b""),
        Ty::Fifo => (b'6', b""),
        Ty::Raw(f, c) => (*f, c),
    };
    h.as_old_mut().linkflag = [flag];
    if let Ty::Char(ma, mi) | Ty::Block(ma, mi) = e.ty {
        h.set_device_major(ma)?;
        h.set_device_minor(mi)?;
    }
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(e.mtime);
    h.set_size(e.declared_size.unwrap_or(data.len() as u64));
    if !pax.is_empty() {
        let records: Vec<u8> = pax.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        let mut x = tar::Header::new_ustar();
        put(&mut x.as_old_mut().name, b"PaxHeaders/entry");
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_mode(0o644);
        x.set_size(records.len() as u64);
        x.set_cksum();
        b.append(&x, records.as_slice())?;
    }
    h.set_cksum();
    b.append(&h, data)?;
    Ok(())
}

fn gzip(data: &[u8]) -> Res<Vec<u8>> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(data)?;
    Ok(g.finish()?)
}

fn zstd(data: &[u8]) -> Res<Vec<u8>> {
    Ok(zstd::encode_all(data, 3)?)
}

/// Pseudo-random bytes (deterministic), so content spans chunks and does not compress away.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Building

/// A scratch area: layers are written in `src`, the build runs with `cwd` as its working
/// directory and writes into `cwd/out`.
struct Scratch {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    cwd: PathBuf,
    n: usize,
}

impl Scratch {
    fn new() -> Res<Self> {
        let tmp = tempfile::tempdir()?;
        let src = tmp.path().join("src");
        let cwd = tmp.path().join("cwd");
        std::fs::create_dir(&src)?;
        std::fs::create_dir(&cwd)?;
        Ok(Self {
            _tmp: tmp,
            src,
            cwd,
            n: 0,
        })
    }

    /// Writes layer bytes to a file (named `.tar` whatever the compression: detection must
    /// not rely on names).
    fn write(&mut self, bytes: &[u8]) -> Res<PathBuf> {
        self.n += 1;
        let p = self.src.join(format!("layer{}.tar", self.n));
        std::fs::write(&p, bytes)?;
        Ok(p)
    }

    fn out(&self, name: &str) -> Image {
        let dir = self.cwd.join(name);
        Image {
            bootstrap: dir.join("image.boot"),
            blobs: dir.join("blobs"),
        }
    }

    /// Runs `skiff build` on `layers` into `cwd/NAME`.
    fn run(&self, layers: &[PathBuf], name: &str) -> Res<(Output, Image)> {
        let img = self.out(name);
        let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .current_dir(&self.cwd)
            .arg("build")
            .args(layers)
            .arg("--bootstrap")
            .arg(&img.bootstrap)
            .arg("--blob-dir")
            .arg(&img.blobs)
            .arg("--chunk-size")
            .arg(CHUNK.to_string())
            .output()?;
        Ok((out, img))
    }

    /// Builds `layers` (uncompressed tars) and expects success.
    fn build(&mut self, layers: &[Vec<u8>], name: &str) -> Res<Image> {
        let paths = layers
            .iter()
            .map(|l| self.write(l))
            .collect::<Res<Vec<_>>>()?;
        self.build_files(&paths, name)
    }

    fn build_files(&self, paths: &[PathBuf], name: &str) -> Res<Image> {
        let (out, img) = self.run(paths, name)?;
        if !out.status.success() {
            return Err(format!(
                "skiff build failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(img)
    }
}

struct Image {
    bootstrap: PathBuf,
    blobs: PathBuf,
}

fn tars(layers: &[Layer]) -> Res<Vec<Vec<u8>>> {
    layers.iter().map(Layer::tar).collect()
}

// ---------------------------------------------------------------------------------------------
// Reading images

/// Everything compared about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u32,
    mtime: (i64, u32),
    ctime: (i64, u32),
    rdev: u64,
    target: Option<Vec<u8>>,
    content: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The smallest path naming the same inode: equal for hard links.
    inode_of: String,
}

fn kind_name(mode: u32) -> &'static str {
    match InodeKind::from_mode(mode) {
        Some(InodeKind::Directory) => "dir",
        Some(InodeKind::Regular) => "file",
        Some(InodeKind::Symlink) => "symlink",
        Some(InodeKind::CharDevice) => "char",
        Some(InodeKind::BlockDevice) => "block",
        Some(InodeKind::Fifo) => "fifo",
        Some(InodeKind::Socket) => "socket",
        None => "?",
    }
}

type Listing = BTreeMap<String, Facts>;

/// Every path of the image ("" is the root) with its facts, file content read through the
/// verified chunk source.
fn listing(img: &Image) -> Res<Listing> {
    let b = Bootstrap::load(&img.bootstrap)?;
    let source = CachedChunkSource::in_memory(LocalFsBackend::new(&img.blobs), 0);
    let mut paths: Vec<(String, u32)> = vec![(String::new(), 0)];
    let mut stack = vec![(String::new(), 0u32)];
    while let Some((dir, ino)) = stack.pop() {
        for d in b.dir_entries(ino) {
            let name = String::from_utf8_lossy(b.entry_name(d)).into_owned();
            let p = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let child = d.inode.get();
            paths.push((p.clone(), child));
            if b.inode(child).and_then(|i| i.kind()) == Some(InodeKind::Directory) {
                stack.push((p, child));
            }
        }
    }
    let mut first: HashMap<u32, String> = HashMap::new();
    for (p, ino) in &paths {
        let e = first.entry(*ino).or_insert_with(|| p.clone());
        if p < e {
            *e = p.clone();
        }
    }
    let mut out = Listing::new();
    for (p, ino) in paths {
        let r = b.inode(ino).ok_or("inode out of range")?;
        let kind = kind_name(r.mode.get());
        let content = if kind == "file" {
            let mut data = Vec::new();
            for c in b.file_chunks(ino) {
                if c.is_zero() {
                    data.resize(data.len() + c.uncompressed_size.get() as usize, 0);
                } else {
                    let blob = b
                        .blobs()
                        .get(c.blob_index.get() as usize)
                        .ok_or("blob index out of range")?;
                    data.extend_from_slice(&source.read_chunk(
                        blob,
                        c,
                        &skiff::storage::Deadline::none(),
                    )?);
                }
            }
            Some(data)
        } else {
            None
        };
        let facts = Facts {
            kind,
            mode: r.mode.get(),
            uid: r.uid.get(),
            gid: r.gid.get(),
            size: r.size.get(),
            nlink: r.nlink.get(),
            mtime: (r.mtime.get(), r.mtime_nsec.get()),
            ctime: (r.ctime.get(), r.ctime_nsec.get()),
            rdev: r.rdev.get(),
            target: b.symlink_target(ino).map(<[u8]>::to_vec),
            content,
            xattrs: b
                .xattrs(ino)
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect(),
            inode_of: first.get(&ino).cloned().unwrap_or_default(),
        };
        out.insert(p, facts);
    }
    Ok(out)
}

fn names(l: &Listing) -> BTreeSet<&str> {
    l.keys().map(String::as_str).collect()
}

fn set<'a>(paths: &[&'a str]) -> BTreeSet<&'a str> {
    paths.iter().copied().collect()
}

fn get<'a>(l: &'a Listing, p: &str) -> Res<&'a Facts> {
    l.get(p)
        .ok_or_else(|| format!("{p:?} missing from the image").into())
}

// ---------------------------------------------------------------------------------------------
// A reference applier, independent of skiff's: it reads tars with `tar::Archive` (not skiff's
// reader) and keeps a map from path to entry (not a node arena). Hard links are copies sharing
// an inode number. Whiteout semantics follow containerd's applier: an opaque marker removes
// every path under its directory that this layer has not unpacked (nor created as a parent);
// `.wh.NAME` does the same for NAME and its subtree, keeping only what this layer put there.

#[derive(Clone, Debug)]
struct RefNode {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    ctime: (i64, u32),
    rdev: u64,
    target: Option<Vec<u8>>,
    content: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    ino: usize,
}

fn ref_dir(ino: usize) -> RefNode {
    RefNode {
        kind: "dir",
        mode: libc::S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        ctime: (0, 0),
        rdev: 0,
        target: None,
        content: None,
        xattrs: BTreeMap::new(),
        ino,
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn under<'a>(
    tree: &'a BTreeMap<String, RefNode>,
    dir: &'a str,
) -> impl Iterator<Item = &'a String> + 'a {
    tree.keys()
        .filter(move |k| !k.is_empty() && (dir.is_empty() || k.starts_with(&format!("{dir}/"))))
}

fn ref_time(v: &str) -> (i64, u32) {
    match v.split_once('.') {
        Some((s, f)) => (
            s.parse().unwrap_or(0),
            format!("{f:0<9}")[..9].parse().unwrap_or(0),
        ),
        None => (v.parse().unwrap_or(0), 0),
    }
}

fn reference_apply(layers: &[Vec<u8>]) -> Result<Listing, String> {
    let mut tree: BTreeMap<String, RefNode> = BTreeMap::new();
    tree.insert(String::new(), ref_dir(0));
    let mut next_ino = 1;
    for layer in layers {
        let mut unpacked: HashSet<String> = HashSet::new();
        let mut ar = tar::Archive::new(layer.as_slice());
        for entry in ar.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let comps: Vec<&str> = raw
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            let h = entry.header().clone();
            let mut xattrs = BTreeMap::new();
            let (mut mtime, mut ctime) = ((h.mtime().map_err(|e| e.to_string())? as i64, 0), None);
            if let Some(pax) = entry.pax_extensions().map_err(|e| e.to_string())? {
                for r in pax {
                    let r = r.map_err(|e| e.to_string())?;
                    let k = r.key_bytes();
                    if let Some(n) = k.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.insert(n.to_vec(), r.value_bytes().to_vec());
                    } else if k == b"mtime" {
                        mtime = ref_time(r.value().map_err(|e| e.to_string())?);
                    } else if k == b"ctime" {
                        ctime = Some(ref_time(r.value().map_err(|e| e.to_string())?));
                    }
                }
            }
            let perm = h.mode().map_err(|e| e.to_string())? & 0o7777;
            let (kind, ftype) = match h.entry_type() {
                tar::EntryType::Directory => ("dir", libc::S_IFDIR),
                tar::EntryType::Regular => ("file", libc::S_IFREG),
                tar::EntryType::Symlink => ("symlink", libc::S_IFLNK),
                tar::EntryType::Link => ("link", 0),
                tar::EntryType::Char => ("char", libc::S_IFCHR),
                tar::EntryType::Block => ("block", libc::S_IFBLK),
                tar::EntryType::Fifo => ("fifo", libc::S_IFIFO),
                t => return Err(format!("reference: unexpected type {t:?}")),
            };
            let mut node = RefNode {
                kind,
                mode: ftype | perm,
                uid: h.uid().map_err(|e| e.to_string())? as u32,
                gid: h.gid().map_err(|e| e.to_string())? as u32,
                mtime,
                ctime: ctime.unwrap_or(mtime),
                rdev: 0,
                target: None,
                content: None,
                xattrs,
                ino: 0,
            };
            if kind == "char" || kind == "block" {
                let ma = h.device_major().ok().flatten().unwrap_or(0);
                let mi = h.device_minor().ok().flatten().unwrap_or(0);
                node.rdev = libc::makedev(ma, mi);
            }
            if kind == "symlink" {
                node.target = entry.link_name_bytes().map(|t| t.into_owned());
            }
            if kind == "file" {
                let mut c = Vec::new();
                entry.read_to_end(&mut c).map_err(|e| e.to_string())?;
                node.content = Some(c);
            }
            let Some((&base, parents)) = comps.split_last() else {
                let root = tree.get_mut("").ok_or("no root")?;
                *root = RefNode { ino: 0, ..node };
                continue;
            };
            let parent = parents.join("/");
            // The parent must be a directory all the way up; create what is missing.
            let ensure_parents = |tree: &mut BTreeMap<String, RefNode>,
                                  unpacked: &mut HashSet<String>,
                                  next_ino: &mut usize,
                                  create: bool|
             -> Result<bool, String> {
                let mut cur = String::new();
                for c in parents {
                    cur = join(&cur, c);
                    match tree.get(&cur) {
                        Some(n) if n.kind == "dir" => {}
                        Some(_) => return Err(format!("{cur} is not a directory")),
                        None if create => {
                            tree.insert(cur.clone(), ref_dir(*next_ino));
                            *next_ino += 1;
                        }
                        None => return Ok(false),
                    }
                    if create {
                        unpacked.insert(cur.clone());
                    }
                }
                Ok(true)
            };
            if base == ".wh..wh..opq" {
                ensure_parents(&mut tree, &mut unpacked, &mut next_ino, true)?;
                let gone: Vec<String> = under(&tree, &parent)
                    .filter(|k| !unpacked.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    tree.remove(&k);
                }
                continue;
            }
            if let Some(hidden) = base.strip_prefix(".wh.") {
                if !ensure_parents(&mut tree, &mut unpacked, &mut next_ino, false)? {
                    continue;
                }
                let t = join(&parent, hidden);
                let mut gone: Vec<String> = under(&tree, &t)
                    .filter(|k| !unpacked.contains(*k))
                    .cloned()
                    .collect();
                if tree.contains_key(&t) && !unpacked.contains(&t) {
                    gone.push(t);
                }
                for k in gone {
                    tree.remove(&k);
                }
                continue;
            }
            ensure_parents(&mut tree, &mut unpacked, &mut next_ino, true)?;
            let path = join(&parent, base);
            if kind == "link" {
                let target =
                    String::from_utf8_lossy(&entry.link_name_bytes().ok_or("no link target")?)
                        .into_owned();
                let target = target
                    .split('/')
                    .filter(|c| !c.is_empty() && *c != ".")
                    .collect::<Vec<_>>()
                    .join("/");
                match tree.get(&target) {
                    Some(n) if n.kind != "dir" => node = n.clone(),
                    _ => return Err(format!("bad link target {target}")),
                }
            } else {
                node.ino = next_ino;
                next_ino += 1;
            }
            match tree.get_mut(&path) {
                Some(old) if old.kind == "dir" && node.kind == "dir" => {
                    *old = RefNode {
                        ino: old.ino,
                        ..node
                    };
                }
                _ => {
                    let gone: Vec<String> = under(&tree, &path).cloned().collect();
                    for k in gone {
                        tree.remove(&k);
                    }
                    tree.insert(path.clone(), node);
                }
            }
            unpacked.insert(path);
        }
    }
    // Facts as the image would show them.
    let mut first: HashMap<usize, String> = HashMap::new();
    let mut refs: HashMap<usize, u32> = HashMap::new();
    for (p, n) in &tree {
        first.entry(n.ino).or_insert_with(|| p.clone());
        *refs.entry(n.ino).or_default() += 1;
    }
    let mut out = Listing::new();
    for (p, n) in &tree {
        let subdirs = tree
            .iter()
            .filter(|(k, c)| {
                c.kind == "dir" && !k.is_empty() && k.rsplit_once('/').map_or("", |s| s.0) == p
            })
            .count() as u32;
        let size = match n.kind {
            "dir" => 4096,
            "file" => n.content.as_ref().map_or(0, |c| c.len() as u64),
            "symlink" => n.target.as_ref().map_or(0, |t| t.len() as u64),
            _ => 0,
        };
        out.insert(
            p.clone(),
            Facts {
                kind: n.kind,
                mode: n.mode,
                uid: n.uid,
                gid: n.gid,
                size,
                nlink: if n.kind == "dir" {
                    2 + subdirs
                } else {
                    refs[&n.ino]
                },
                mtime: n.mtime,
                ctime: n.ctime,
                rdev: n.rdev,
                target: n.target.clone(),
                content: n.content.clone(),
                xattrs: n.xattrs.clone(),
                inode_of: first[&n.ino].clone(),
            },
        );
    }
    Ok(out)
}

/// Asserts two listings are equal, showing the first differing path.
fn assert_same(got: &Listing, want: &Listing) {
    let all: BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    for p in all {
        assert_eq!(
            got.get(p),
            want.get(p),
            "path {p:?}: image (left) vs reference (right)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (1) Whiteouts and replacements

#[test]
fn whiteouts_delete_and_entries_replace() -> Res {
    let base = Layer::new()
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, "root:x:0:0\n")
        .file("etc/old", 0o644, "old")
        .dir("opt", 0o755)
        .dir("opt/app", 0o755)
        .dir("opt/app/lib", 0o755)
        .file("opt/app/lib/x.so", 0o755, noise(10_000, 1))
        .dir("bin", 0o755)
        .file("bin/tool", 0o755, "#!/bin/sh\n")
        .dir("var", 0o755)
        .dir("var/cache", 0o700)
        .file("var/cache/a", 0o600, "a")
        .symlink("var/link", "cache/a");
    let upper = Layer::new()
        .whiteout("etc/old")
        .whiteout("opt/app")
        // A file becomes a directory, a directory becomes a file, a symlink becomes a file.
        .dir("bin/tool", 0o750)
        .file("bin/tool/inner", 0o644, "inner")
        .file("var/cache", 0o640, "now a file")
        .file("var/link", 0o644, "was a symlink")
        // Whiting out what does not exist (even under a missing directory) is harmless.
        .whiteout("etc/never")
        .whiteout("nodir/never");
    let mut s = Scratch::new()?;
    let img = s.build(&tars(&[base, upper])?, "out")?;
    let l = listing(&img)?;
    assert_eq!(
        names(&l),
        set(&[
            "",
            "bin",
            "bin/tool",
            "bin/tool/inner",
            "etc",
            "etc/passwd",
            "opt",
            "var",
            "var/cache",
            "var/link"
        ])
    );
    assert_eq!(get(&l, "bin/tool")?.kind, "dir");
    assert_eq!(get(&l, "bin/tool")?.mode, libc::S_IFDIR | 0o750);
    assert_eq!(get(&l, "var/cache")?.kind, "file");
    assert_eq!(
        get(&l, "var/cache")?.content.as_deref(),
        Some(&b"now a file"[..])
    );
    assert_eq!(get(&l, "var/link")?.kind, "file");
    assert_eq!(
        get(&l, "etc/passwd")?.content.as_deref(),
        Some(&b"root:x:0:0\n"[..])
    );
    // opt stays (only its child was whited out), with nlink 2: no subdirectories left.
    assert_eq!(get(&l, "opt")?.nlink, 2);
    assert!(l.keys().all(|k| !k.contains(".wh.")));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (2) Opaque directories

fn opaque_layers(opq_first: bool) -> Vec<Layer> {
    let base = Layer::new()
        .dir("d", 0o755)
        .file("d/a", 0o644, "lower a")
        .dir("d/sub", 0o755)
        .file("d/sub/deep", 0o644, "lower deep")
        .file("d/keep", 0o644, "lower keep")
        .file("outside", 0o644, "outside");
    let mut upper = Layer::new().dir("d", 0o711);
    if opq_first {
        upper = upper.opaque("d");
    }
    upper = upper
        .file("d/new", 0o644, "upper new")
        // Re-listing a lower directory keeps it, but not what lower layers put inside.
        .dir("d/sub", 0o755)
        .file("d/sub/mine", 0o644, "upper mine")
        .file("d/keep", 0o644, "upper keep");
    if !opq_first {
        upper = upper.opaque("d");
    }
    upper = upper.file("d/after", 0o644, "after");
    vec![base, upper]
}

#[test]
fn opaque_directories_hide_lower_layers_only() -> Res {
    let mut s = Scratch::new()?;
    let mut results = Vec::new();
    for opq_first in [true, false] {
        let name = format!("out-{opq_first}");
        let img = s.build(&tars(&opaque_layers(opq_first))?, &name)?;
        let l = listing(&img)?;
        assert_eq!(
            names(&l),
            set(&[
                "",
                "d",
                "d/after",
                "d/keep",
                "d/new",
                "d/sub",
                "d/sub/mine",
                "outside"
            ]),
            "opaque marker first: {opq_first}"
        );
        assert_eq!(
            get(&l, "d/keep")?.content.as_deref(),
            Some(&b"upper keep"[..])
        );
        assert_eq!(get(&l, "d")?.mode, libc::S_IFDIR | 0o711);
        results.push(std::fs::read(&img.bootstrap)?);
    }
    assert_eq!(results[0], results[1], "marker position changes the image");

    // An opaque root, a marker in a directory the tar does not list, and in a directory lower
    // layers do not have.
    let base = Layer::new()
        .file("x", 0o644, "x")
        .dir("e", 0o755)
        .file("e/y", 0o644, "y");
    let upper = Layer::new()
        .file("z", 0o644, "z")
        .opaque("")
        .opaque("e")
        .opaque("fresh");
    let img = s.build(&tars(&[base, upper])?, "out-root")?;
    let l = listing(&img)?;
    // The root's marker removes x and e; e's marker says e is a directory of this layer (empty).
    assert_eq!(names(&l), set(&["", "e", "fresh", "z"]));
    assert_eq!(get(&l, "e")?.kind, "dir");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (3) Against an independent applier

fn rich_layers() -> Vec<Layer> {
    // No '\n' in this value: the reference reads pax records with the tar crate, which splits
    // them on newlines (`header_encodings` checks binary values with newlines).
    let cap = [
        0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let l1 = Layer::new()
        .dir("./", 0o755)
        .mtime(1_500_000_000)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/big", 0o755, noise(3 * CHUNK + 123, 7))
        .pax("mtime", "1700000000.123456789")
        .pax("ctime", "1700000001.5")
        .file("usr/bin/zeros", 0o644, vec![0u8; 2 * CHUNK + 5])
        .file("usr/bin/empty", 0o644, b"")
        .file("usr/bin/ping", 0o4755, b"ping")
        .xattr("security.capability", cap)
        .link("usr/bin/ping-link", "usr/bin/ping")
        .file("usr/bin/dup", 0o644, noise(3 * CHUNK + 123, 7))
        .dir("tmp", 0o1777)
        .dir("srv", 0o2775)
        .owner(1000, 1000)
        .xattr("user.comment", "hello")
        .xattr("trusted.empty", b"")
        .symlink("usr/lib", "../lib")
        .file("implicit/parent/file", 0o600, "parents not listed")
        .owner(3_000_000_000, 4_000_000_000)
        .push("dev/null", Ty::Char(1, 3), 0o666)
        .push("dev/sda", Ty::Block(8, 0), 0o660)
        .owner(0, 6)
        .push("run/fifo", Ty::Fifo, 0o600)
        .file("a", 0o644, "a-v1")
        .link("b", "a")
        .link("c", "a")
        .file("wh", 0o644, "will be whited out")
        .link("wh-link", "wh")
        .dir("opq", 0o755)
        .file("opq/lower", 0o644, "lower")
        .dir("opq/sub", 0o755)
        .file("opq/sub/lower", 0o644, "lower")
        .dir("gone", 0o755)
        .file("gone/x", 0o644, "x");
    let l2 = Layer::new()
        // Explicit entry after the implicit parent sets its metadata.
        .dir("implicit", 0o750)
        .owner(5, 5)
        .mtime(1_234_567_890)
        .xattr("user.dir", "x")
        // Replaced: the other names keep the old node.
        .file("a", 0o600, "a-v2")
        .whiteout("wh")
        .link("d", "b")
        .dir("opq/sub", 0o700)
        .file("opq/sub/upper", 0o644, "upper")
        .opaque("opq")
        .file("opq/after", 0o644, "after")
        .dir("usr/bin", 0o755)
        .mtime(1_111_111_111)
        // A hard link to a path of this layer.
        .file("new", 0o644, noise(CHUNK, 9))
        .link("new-link", "new")
        .dir("tmp", 0o1777)
        .xattr("user.more", "y")
        // A whiteout hides lower layers only: this layer's own file stays.
        .file("same", 0o644, "same layer")
        .whiteout("same");
    let l3 = Layer::new()
        .whiteout("usr/bin/ping")
        .whiteout("opq/after")
        .whiteout("gone")
        .file("gone", 0o644, "now a file")
        .link("e", "c")
        .symlink("usr/lib", "/usr/lib64")
        .whiteout("b");
    vec![l1, l2, l3]
}

#[test]
fn matches_reference_applier() -> Res {
    let layers = tars(&rich_layers())?;
    let want = reference_apply(&layers)?;
    let mut s = Scratch::new()?;
    let img = s.build(&layers, "out")?;
    let got = listing(&img)?;
    assert_same(&got, &want);

    // Spot checks, so that the reference is not the only judge.
    let big = get(&got, "usr/bin/big")?;
    assert_eq!(big.mtime, (1_700_000_000, 123_456_789));
    assert_eq!(big.ctime, (1_700_000_001, 500_000_000));
    assert_eq!(
        big.content.as_deref(),
        Some(noise(3 * CHUNK + 123, 7).as_slice())
    );
    assert_eq!(get(&got, "")?.mtime, (1_500_000_000, 0));
    assert_eq!(
        get(&got, "usr/bin/ping-link")?
            .xattrs
            .get(&b"security.capability"[..])
            .map(Vec::len),
        Some(20)
    );
    assert_eq!(get(&got, "usr/bin/ping-link")?.mode, libc::S_IFREG | 0o4755);
    assert_eq!(get(&got, "usr/bin/ping-link")?.nlink, 1);
    assert_eq!(get(&got, "tmp")?.mode, libc::S_IFDIR | 0o1777);
    assert_eq!(get(&got, "srv")?.mode, libc::S_IFDIR | 0o2775);
    assert_eq!(get(&got, "srv")?.size, 4096);
    let f = get(&got, "implicit/parent/file")?;
    assert_eq!((f.uid, f.gid), (3_000_000_000, 4_000_000_000));
    let imp = get(&got, "implicit")?;
    assert_eq!(
        (imp.mode, imp.uid, imp.mtime.0),
        (libc::S_IFDIR | 0o750, 5, 1_234_567_890)
    );
    let par = get(&got, "implicit/parent")?;
    assert_eq!(
        (par.mode, par.uid, par.mtime),
        (libc::S_IFDIR | 0o755, 0, (0, 0))
    );
    assert_eq!(get(&got, "dev/null")?.rdev, libc::makedev(1, 3));
    assert_eq!(get(&got, "dev/sda")?.kind, "block");
    assert_eq!(get(&got, "run/fifo")?.kind, "fifo");
    // a was replaced; c, d, e still share the first a.
    assert_eq!(get(&got, "a")?.content.as_deref(), Some(&b"a-v2"[..]));
    for p in ["c", "d", "e"] {
        let x = get(&got, p)?;
        assert_eq!((x.inode_of.as_str(), x.nlink), ("c", 3), "{p}");
        assert_eq!(x.content.as_deref(), Some(&b"a-v1"[..]));
    }
    assert!(!got.contains_key("b") && !got.contains_key("wh"));
    assert_eq!(get(&got, "wh-link")?.nlink, 1);
    assert_eq!(get(&got, "new-link")?.inode_of, "new");
    assert_eq!(get(&got, "gone")?.kind, "file");
    let opq: Vec<&str> = got
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with("opq"))
        .collect();
    assert_eq!(opq, ["opq", "opq/sub", "opq/sub/upper"]);
    assert_eq!(get(&got, "opq/sub")?.mode, libc::S_IFDIR | 0o700);
    assert_eq!(
        get(&got, "same")?.content.as_deref(),
        Some(&b"same layer"[..])
    );
    assert_eq!(
        get(&got, "usr/lib")?.target.as_deref(),
        Some(&b"/usr/lib64"[..])
    );
    assert_eq!(
        get(&got, "tmp")?.xattrs.keys().cloned().collect::<Vec<_>>(),
        vec![b"user.more".to_vec()]
    );

    // The image verifies end to end.
    let check = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("check")
        .arg("--bootstrap")
        .arg(&img.bootstrap)
        .arg("--blob-dir")
        .arg(&img.blobs)
        .output()?;
    assert!(
        check.status.success(),
        "skiff check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}

#[test]
fn opaque_and_whiteouts_match_reference_in_layer_order() -> Res {
    // The opaque-directory layers in both marker positions, against the reference.
    let mut s = Scratch::new()?;
    for opq_first in [true, false] {
        let layers = tars(&opaque_layers(opq_first))?;
        let img = s.build(&layers, &format!("out-{opq_first}"))?;
        assert_same(&listing(&img)?, &reference_apply(&layers)?);
    }
    Ok(())
}

#[test]
fn header_encodings() -> Res {
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "n".repeat(200));
    let non_utf8: &[u8] = b"caf\xe9";
    let mut binary_value = vec![0u8, b'\n', 0xff, b'=', b' '];
    binary_value.extend(noise(1000, 3));
    let layer = Layer::new()
        .file(&long_name, 0o644, "pax path")
        .file(
            format!("{long_dir}/gnu-{}", "g".repeat(150)),
            0o644,
            "GNU long name",
        )
        .with(|e| e.gnu_long_name = true)
        .symlink("long-target", format!("/{}", "t/".repeat(1000)))
        .symlink("gnu-long-target", format!("/{}", "k/".repeat(1000)))
        .with(|e| e.gnu_long_name = true)
        .link("long-link", &long_name)
        .file(non_utf8, 0o644, "latin-1 name")
        .file("base256", 0o644, "uid in base-256")
        .owner(3_000_000, 77)
        .file("binary-xattr", 0o644, "x")
        .xattr("user.bin", &binary_value)
        .xattr("user.\u{e9}", "utf-8 xattr name")
        .file("negative", 0o644, "before 1970")
        .pax("mtime", "-1.25")
        .push("old-style-dir/", Ty::Raw(0, Vec::new()), 0o755)
        .push("contiguous", Ty::Raw(b'7', b"contiguous".to_vec()), 0o644)
        // Pax uid/gid beyond the octal field.
        .file("pax-owner", 0o644, "owner")
        .pax("uid", "4294967295")
        .pax("gid", "123456789")
        // Directories, links and devices carry no data even if their size field says so.
        .dir("sized-dir", 0o755)
        .with(|e| e.declared_size = Some(4096))
        .file("after-sized-dir", 0o644, "still in sync");
    let mut s = Scratch::new()?;
    let img = s.build(&[layer.tar()?], "out")?;
    let l = listing(&img)?;
    assert_eq!(
        get(&l, &long_name)?.content.as_deref(),
        Some(&b"pax path"[..])
    );
    assert_eq!(get(&l, "long-link")?.inode_of, long_name);
    let gnu = format!("{long_dir}/gnu-{}", "g".repeat(150));
    assert_eq!(
        get(&l, &gnu)?.content.as_deref(),
        Some(&b"GNU long name"[..])
    );
    assert_eq!(
        get(&l, "long-target")?.target.as_ref().map(Vec::len),
        Some(2001)
    );
    let gnu_target = format!("/{}", "k/".repeat(1000));
    assert_eq!(
        get(&l, "gnu-long-target")?.target.as_deref(),
        Some(gnu_target.as_bytes())
    );
    let b = Bootstrap::load(&img.bootstrap)?;
    assert!(b.lookup(0, non_utf8).is_some(), "non-UTF-8 name lost");
    assert_eq!(get(&l, "base256")?.uid, 3_000_000);
    assert_eq!(get(&l, "base256")?.gid, 77);
    let bx = get(&l, "binary-xattr")?;
    assert_eq!(bx.xattrs.get(&b"user.bin"[..]), Some(&binary_value));
    assert!(bx.xattrs.contains_key("user.\u{e9}".as_bytes()));
    assert_eq!(get(&l, "negative")?.mtime, (-2, 750_000_000));
    assert_eq!(get(&l, "old-style-dir")?.kind, "dir");
    assert_eq!(
        get(&l, "contiguous")?.content.as_deref(),
        Some(&b"contiguous"[..])
    );
    let po = get(&l, "pax-owner")?;
    assert_eq!((po.uid, po.gid), (u32::MAX, 123_456_789));
    assert_eq!(get(&l, "sized-dir")?.kind, "dir");
    assert_eq!(
        get(&l, "after-sized-dir")?.content.as_deref(),
        Some(&b"still in sync"[..])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (4) Compression

#[test]
fn gzip_and_zstd_layers() -> Res {
    let layers = tars(&rich_layers())?;
    let mut s = Scratch::new()?;
    let plain = s.build(&layers, "plain")?;
    let gz: Vec<Vec<u8>> = layers.iter().map(|l| gzip(l)).collect::<Res<_>>()?;
    let zs: Vec<Vec<u8>> = layers.iter().map(|l| zstd(l)).collect::<Res<_>>()?;
    let mixed = vec![gz[0].clone(), zs[1].clone(), layers[2].clone()];
    let want = std::fs::read(&plain.bootstrap)?;
    for (name, ls) in [("gzip", gz), ("zstd", zs), ("mixed", mixed)] {
        let img = s.build(&ls, name)?;
        assert_eq!(
            std::fs::read(&img.bootstrap)?,
            want,
            "{name} layers give another image"
        );
    }
    // A multi-member gzip stream (as from concatenated gzip files) is one layer.
    let tar = layers[0].clone();
    let (head, tail) = tar.split_at(tar.len() / 2);
    let mut multi = gzip(head)?;
    multi.extend(gzip(tail)?);
    let one = s.build(&[tar], "single")?;
    let two = s.build(&[multi], "multi")?;
    assert_eq!(
        std::fs::read(&one.bootstrap)?,
        std::fs::read(&two.bootstrap)?
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (5) Hostile layers

/// Everything under `dir`, relative.
fn files_under(dir: &Path) -> Res<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            out.insert(p.strip_prefix(dir)?.to_path_buf());
            if e.file_type()?.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(out)
}

/// Builds `layers`, expects failure with one line on stderr containing `cause`, and checks
/// that nothing was written but the (empty) output directory.
fn expect_refused(layers: &[Vec<u8>], cause: &str) -> Res {
    let mut s = Scratch::new()?;
    let paths = layers.iter().map(|l| s.write(l)).collect::<Res<Vec<_>>>()?;
    let src_before = files_under(&s.src)?;
    let (out, img) = s.run(&paths, "out")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted; expected {cause:?}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("skiff: layer "), "{stderr}");
    assert!(
        stderr.contains(cause),
        "{stderr:?} does not contain {cause:?}"
    );
    assert!(!img.bootstrap.exists());
    // Only the output directories exist, and the blob directory holds no (temporary) blob.
    let written = files_under(&s.cwd)?;
    let allowed: BTreeSet<PathBuf> = [PathBuf::from("out"), PathBuf::from("out/blobs")].into();
    assert!(written.is_subset(&allowed), "written: {written:?}");
    assert_eq!(files_under(&s.src)?, src_before);
    Ok(())
}

#[test]
fn hostile_layers_are_refused() -> Res {
    let tag = format!("skiff-escape-{}", std::process::id());
    let esc = |p: &str| p.replace("X", &tag);
    let mut cases: Vec<(Layer, &str)> = vec![
        (
            Layer::new().file(esc("../X"), 0o644, "x"),
            "entry \"../skiff-escape",
        ),
        (
            Layer::new()
                .dir("a", 0o755)
                .file(esc("a/../../X"), 0o644, "x"),
            "\"..\" component",
        ),
        (
            Layer::new().file("/a/./../X", 0o644, "x"),
            "\"..\" component",
        ),
        (
            Layer::new().link("l", "missing"),
            "link target \"missing\" does not exist",
        ),
        (
            Layer::new().dir("d", 0o755).link("l", "d"),
            "is a directory",
        ),
        (
            Layer::new().file("f", 0o644, "f").link("l", "f/x"),
            "\"f\" is not a directory",
        ),
        (Layer::new().link("l", "../etc/passwd"), "\"..\" component"),
        (
            Layer::new()
                .symlink("s", "/etc")
                .file("s/passwd", 0o644, "owned"),
            "\"s\" is not a directory",
        ),
        (
            Layer::new().symlink("s", "/").dir("s/x", 0o755),
            "\"s\" is not a directory",
        ),
        (
            Layer::new().symlink("s", ".").whiteout("s/x"),
            "\"s\" is not a directory",
        ),
        (
            Layer::new().file("f", 0o644, "x").opaque("f"),
            "\"f\" is not a directory",
        ),
        (
            Layer::new().file("x".repeat(256), 0o644, "x"),
            "longer than 255 bytes",
        ),
        (
            Layer::new().symlink("s", "t".repeat(4096)),
            "longer than 4095",
        ),
        (Layer::new().symlink("s", ""), "link without a target"),
        (Layer::new().file(".wh.d/x", 0o644, "x"), "whiteout name"),
        (
            Layer::new().file("d/.wh.", 0o644, ""),
            "whiteout of an invalid name",
        ),
        (
            Layer::new()
                .file("x", 0o644, "x")
                .xattr("user.big", vec![1u8; 65537]),
            "too large",
        ),
        (
            Layer::new().file("x", 0o644, "x").xattr("", "v"),
            "invalid xattr name",
        ),
        (
            Layer::new().file("x", 0o644, "x").pax("mtime", "1.2.3"),
            "bad pax",
        ),
        (
            Layer::new().file("x", 0o644, "x").pax("uid", "4294967296"),
            "does not fit in 32 bits",
        ),
        (
            Layer::new()
                .file("x", 0o644, "x")
                .pax("GNU.sparse.major", "1"),
            "sparse",
        ),
        (
            Layer::new().push("x", Ty::Raw(b'S', Vec::new()), 0o644),
            "sparse",
        ),
        (
            Layer::new().push("x", Ty::Raw(b'Z', Vec::new()), 0o644),
            "unsupported entry type 'Z'",
        ),
        (
            Layer::new().file("", 0o644, "x"),
            "the root must be a directory",
        ),
        (
            Layer::new()
                .file("huge", 0o644, noise(1000, 5))
                .with(|e| e.declared_size = Some(1 << 40)),
            "content truncated: the header declares 1099511627776 bytes",
        ),
        (
            Layer::new()
                .file("huge", 0o644, b"")
                .pax("size", "18446744073709551615"),
            "content truncated",
        ),
    ];
    // Content nobody reads (a whiteout's) is skipped, however large it claims to be.
    let skipped = Layer::new()
        .whiteout("x")
        .pax("size", "18446744073709551615");
    cases.push((
        skipped,
        "entry \".wh.x\": skipping content: archive truncated",
    ));
    for (layer, cause) in cases {
        expect_refused(&[layer.tar()?], cause).map_err(|e| format!("case {cause:?}: {e}"))?;
    }
    // The escape names exist nowhere on the host.
    for dir in [
        std::env::temp_dir(),
        PathBuf::from("/"),
        PathBuf::from("/etc"),
    ] {
        assert!(
            !dir.join(&tag).exists(),
            "{} written",
            dir.join(&tag).display()
        );
    }
    Ok(())
}

#[test]
fn hostile_streams_are_refused() -> Res {
    let good = Layer::new().file("f", 0o644, noise(20_000, 11)).tar()?;
    // Not a tar at all; a tar cut in the middle of a file; a gzip stream cut short; a header
    // with a wrong checksum; xz; a pax header larger than any real one.
    expect_refused(
        &[b"this is not a tar archive, just some text that is long enough".repeat(20)],
        "checksum",
    )?;
    expect_refused(&[good[..5000].to_vec()], "content truncated")?;
    let gz = gzip(&good)?;
    expect_refused(&[gz[..gz.len() / 2].to_vec()], "entry \"f\"")?;
    let mut bad = good.clone();
    bad[0] ^= 1;
    expect_refused(&[bad], "checksum mismatch")?;
    expect_refused(&[vec![0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0]], "xz")?;
    let mut big = tar::Header::new_ustar();
    big.set_entry_type(tar::EntryType::XHeader);
    big.set_size(1 << 40);
    big.set_cksum();
    let mut t = big.as_bytes().to_vec();
    t.extend(vec![0u8; 4096]);
    expect_refused(&[t], "larger than the 1048576-byte limit")?;
    // A hostile layer after a good one fails the whole build.
    expect_refused(
        &[good, Layer::new().file("../x", 0o644, "").tar()?],
        "\"..\" component",
    )?;
    Ok(())
}

#[test]
fn absolute_paths_stay_in_the_image() -> Res {
    let tag = format!("skiff-abs-{}", std::process::id());
    let layer = Layer::new()
        .file(format!("/etc/{tag}"), 0o644, "inside")
        .file(format!("///./tmp//./{tag}"), 0o644, "inside too")
        .link(format!("/tmp/{tag}-link"), format!("/etc/{tag}"));
    let mut s = Scratch::new()?;
    let img = s.build(&[layer.tar()?], "out")?;
    let l = listing(&img)?;
    assert_eq!(
        get(&l, &format!("etc/{tag}"))?.content.as_deref(),
        Some(&b"inside"[..])
    );
    assert_eq!(
        get(&l, &format!("tmp/{tag}"))?.content.as_deref(),
        Some(&b"inside too"[..])
    );
    assert_eq!(
        get(&l, &format!("tmp/{tag}-link"))?.inode_of,
        format!("etc/{tag}")
    );
    assert!(!Path::new("/etc").join(&tag).exists());
    assert!(!Path::new("/tmp").join(&tag).exists());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (6) Determinism

#[test]
fn same_layers_give_identical_images() -> Res {
    let layers = tars(&rich_layers())?;
    let mut s = Scratch::new()?;
    let paths = layers.iter().map(|l| s.write(l)).collect::<Res<Vec<_>>>()?;
    let one = s.build_files(&paths, "one")?;
    let two = s.build_files(&paths, "two")?;
    assert_eq!(
        std::fs::read(&one.bootstrap)?,
        std::fs::read(&two.bootstrap)?
    );
    let blobs = |img: &Image| -> Res<BTreeMap<PathBuf, Vec<u8>>> {
        files_under(&img.blobs)?
            .into_iter()
            .map(|p| Ok((p.clone(), std::fs::read(img.blobs.join(&p))?)))
            .collect()
    };
    let (b1, b2) = (blobs(&one)?, blobs(&two)?);
    assert!(!b1.is_empty());
    assert_eq!(b1, b2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Random layers against the reference

mod random {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Dir(String),
        File(String, u8),
        Symlink(String),
        /// A hard link to the n-th file written so far (modulo their count).
        Link(String, usize),
        Whiteout(String),
        Opaque(String),
    }

    /// A directory-ish path: names that are mostly directories.
    fn dir_path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=2)
            .prop_map(|v| v.join("/"))
    }

    /// A path whose last name is mostly a file's (but may clash with a directory's).
    fn leaf_path() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..=2),
            prop::sample::select(vec!["x", "y", "x", "y", "a"]),
        )
            .prop_map(|(mut v, leaf)| {
                v.push(leaf);
                v.join("/")
            })
    }

    fn any_path() -> impl Strategy<Value = String> {
        prop_oneof![dir_path(), leaf_path()]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => dir_path().prop_map(Op::Dir),
            4 => (leaf_path(), 0u8..4).prop_map(|(p, c)| Op::File(p, c)),
            1 => leaf_path().prop_map(Op::Symlink),
            2 => (leaf_path(), 0usize..100).prop_map(|(p, t)| Op::Link(p, t)),
            2 => any_path().prop_map(Op::Whiteout),
            1 => prop_oneof![Just(String::new()), dir_path()].prop_map(Op::Opaque),
        ]
    }

    /// The layer for `ops`; `files` are the files written by earlier ops, for link targets.
    fn layer(ops: &[Op], n: u64, files: &mut Vec<String>) -> Layer {
        let mut l = Layer::new();
        for (i, op) in ops.iter().enumerate() {
            l = match op {
                Op::Dir(p) => l.dir(p, 0o700 + (i as u32 % 8) * 0o10),
                Op::File(p, c) => {
                    let content = match c {
                        0 => Vec::new(),
                        1 => b"one".to_vec(),
                        2 => noise(CHUNK + 10, n),
                        _ => noise(3, i as u64),
                    };
                    files.push(p.clone());
                    l.file(p, 0o644, content)
                }
                Op::Symlink(p) => l.symlink(p, "target"),
                Op::Link(p, t) => match files.get(t % files.len().max(1)) {
                    Some(t) => l.link(p, t),
                    None => l.link(p, "never-written"),
                },
                Op::Whiteout(p) => l.whiteout(p),
                Op::Opaque(d) => l.opaque(d),
            }
            .mtime(1000 * n + i as u64);
        }
        l
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_layers_match_reference(ops in prop::collection::vec(prop::collection::vec(op(), 1..8), 1..4)) {
            let mut files = Vec::new();
            let layers: Vec<Layer> =
                ops.iter().enumerate().map(|(n, o)| layer(o, n as u64 + 1, &mut files)).collect();
            let run = || -> Res<(Option<Listing>, Result<Listing, String>)> {
                let tars = tars(&layers)?;
                let want = reference_apply(&tars);
                let mut s = Scratch::new()?;
                let paths = tars.iter().map(|l| s.write(l)).collect::<Res<Vec<_>>>()?;
                let (out, img) = s.run(&paths, "out")?;
                let got = if out.status.success() { Some(listing(&img)?) } else { None };
                Ok((got, want))
            };
            let (got, want) = run().map_err(|e| TestCaseError::fail(e.to_string()))?;
            match (got, want) {
                (Some(got), Ok(want)) => {
                    let all: BTreeSet<&String> = got.keys().chain(want.keys()).collect();
                    for p in all {
                        prop_assert_eq!(got.get(p), want.get(p), "path {:?}", p);
                    }
                }
                (None, Err(_)) => {}
                (got, want) => {
                    return Err(TestCaseError::fail(format!(
                        "skiff {}, reference {want:?}",
                        if got.is_some() { "accepted" } else { "refused" }
                    )));
                }
            }
        }
    }
}
