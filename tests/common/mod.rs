//! Shared harness of the integration tests: running the `skiff` binary, building odd source
//! trees, snapshotting trees field by field, comparing snapshots, and FUSE mounts that are
//! always cleaned up.
//!
//! Prerequisites (root, /dev/fuse, debootstrap) go through [`require`]: with `CI=true` a missing
//! one fails the test with a clear message; elsewhere the test is skipped, loudly.

#![allow(dead_code)]

pub mod listing;
pub mod middlebox;
pub mod nydus;
pub mod oci;
pub mod registry;
pub mod snapshotter;
pub mod token_gate;
pub mod unix_http;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

// ---------------------------------------------------------------------------------------------
// Running skiff
// ---------------------------------------------------------------------------------------------

/// The `skiff` binary built for these tests.
pub fn skiff() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skiff"))
}

/// Runs `skiff ARGS` and returns its output, whatever the exit status.
pub fn run_skiff<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    Command::new(skiff())
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running skiff {args:?}: {e}"))
}

/// Stdout and stderr of `out`, for messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `skiff ARGS`, failing the test (with its output) unless it exits 0.
pub fn skiff_ok<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let out = run_skiff(&args);
    assert!(
        out.status.success(),
        "skiff {args:?} failed\n{}",
        output_text(&out)
    );
    out
}

/// Builds `src` into `bootstrap` and `blob_dir` with `extra` options and returns the `--json`
/// build summary.
pub fn build_image(
    src: &Path,
    bootstrap: &Path,
    blob_dir: &Path,
    extra: &[&OsStr],
) -> serde_json::Value {
    let json = bootstrap.with_extension("summary.json");
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("build"),
        src.as_os_str(),
        OsStr::new("--bootstrap"),
        bootstrap.as_os_str(),
        OsStr::new("--blob-dir"),
        blob_dir.as_os_str(),
        OsStr::new("--json"),
        json.as_os_str(),
    ];
    args.extend_from_slice(extra);
    skiff_ok(&args);
    let text =
        fs::read_to_string(&json).unwrap_or_else(|e| panic!("reading {}: {e}", json.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}\n{text}", json.display()))
}

/// A `u64` field of a build summary.
pub fn summary_u64(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("build summary has no integer {field:?}: {summary:#}"))
}

/// `skiff check` of an image, optionally against a source directory: (exit code, stdout+stderr).
pub fn check_image(bootstrap: &Path, blob_dir: &Path, source: Option<&Path>) -> (i32, String) {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("check"),
        OsStr::new("--bootstrap"),
        bootstrap.as_os_str(),
        OsStr::new("--blob-dir"),
        blob_dir.as_os_str(),
    ];
    if let Some(s) = source {
        args.push(OsStr::new("--source"));
        args.push(s.as_os_str());
    }
    let out = run_skiff(&args);
    (out.status.code().unwrap_or(-1), output_text(&out))
}

/// The paths `skiff check` output names in its `PROBLEM <path>: ...` lines.
pub fn problem_paths(check_output: &str) -> std::collections::BTreeSet<String> {
    check_output
        .lines()
        .filter_map(|l| l.strip_prefix("PROBLEM "))
        .filter_map(|l| l.split_once(": ").map(|(p, _)| p.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------------------------

/// Whether the tests run under CI (`CI=true`), where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `Some(value)` when the prerequisite `what` is met. When it is not: under CI the test fails
/// with the reason; elsewhere a loud message is printed and `None` tells the test to stop.
pub fn require<T>(what: &str, r: Result<T, String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if in_ci() => {
            panic!("prerequisite missing: {what}: {e} (CI=true: this is a failure, not a skip)")
        }
        Err(e) => {
            eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
            eprintln!("!!! SKIPPING TEST: prerequisite missing: {what}: {e}");
            eprintln!("!!! (with CI=true this would fail)");
            eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
            None
        }
    }
}

/// QEMU 10 (from bookworm-backports, by scripts/install-qemu10.sh, which scripts/test.sh runs
/// and which prints the path also given as `$SKIFF_QEMU10`): the second VMM version the
/// microVM tests run on, beside the system's QEMU 7.2. Pass it to vm-run.sh as `SKIFF_QEMU`.
pub fn qemu10() -> Result<PathBuf, String> {
    let path = std::env::var_os("SKIFF_QEMU10")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/skiff/tools/qemu10/qemu-system-x86_64"));
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e} (run scripts/install-qemu10.sh)", path.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !version.contains("version 10.") {
        return Err(format!("{} is not QEMU 10: {version}", path.display()));
    }
    Ok(path)
}

/// Whether this process is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Root and a usable /dev/fuse: what `skiff mount` needs.
pub fn fuse_ready() -> Result<(), String> {
    if !is_root() {
        return Err("not running as root".into());
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/fuse: {e}"))
}

/// [`require`] for FUSE mounts.
pub fn require_fuse() -> bool {
    require("root and /dev/fuse", fuse_ready()).is_some()
}

/// A scratch directory on the disk the target directory lives on (not tmpfs: user.* xattrs).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("skiff-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating a scratch directory")
}

// ---------------------------------------------------------------------------------------------
// Debian root filesystems
// ---------------------------------------------------------------------------------------------

/// A Debian bookworm rootfs made (once, cached outside the repository) by
/// `scripts/make-rootfs.sh VARIANT`: "minbase" or "bigger". `Err` says why it could not be made.
pub fn debian_rootfs(variant: &str) -> Result<PathBuf, String> {
    if !is_root() {
        return Err("debootstrap needs root".into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-rootfs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(variant)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {variant} failed ({})",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    if !path.join("usr/bin").is_dir() {
        return Err(format!(
            "{} printed {path:?}, which is not a rootfs",
            script.display()
        ));
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// The special tree
// ---------------------------------------------------------------------------------------------

/// The chunk size the special tree is built with (`--chunk-size 64K`).
pub const SPECIAL_CHUNK: usize = 64 * 1024;

/// Size of the sparse file's hole.
pub const SPARSE_HOLE: u64 = 9 << 20;

/// Regular files of the special tree worth reading at odd offsets.
pub const SPECIAL_READ_FILES: &[&str] = &[
    "one_byte",
    "one_chunk",
    "chunk_plus_one",
    "random_1m",
    "zeros",
    "sparse",
    "text",
    "dir_a/h1",
];

/// A valid version-2 file capability (`struct vfs_cap_data`): magic_etc = VFS_CAP_REVISION_2 |
/// VFS_CAP_FLAGS_EFFECTIVE, then {permitted, inheritable} for capabilities 0-31 and 32-63.
pub fn capability_v2() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&((1u32 << 10) | (1 << 13)).to_le_bytes()); // NET_BIND_SERVICE, NET_RAW
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(v.len(), 20);
    v
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check_rc(rc: libc::c_int, what: &str, p: &Path) {
    assert!(
        rc == 0,
        "{what} {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// lchown(2): changes the owner of `p` itself, symlinks included.
pub fn lchown(p: &Path, uid: u32, gid: u32) {
    // SAFETY: the path is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::lchown(cpath(p).as_ptr(), uid, gid) };
    check_rc(rc, "lchown", p);
}

/// mknod(2).
pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    let dev = libc::makedev(major, minor);
    // SAFETY: the path is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mknod(cpath(p).as_ptr(), mode, dev) };
    check_rc(rc, "mknod", p);
}

/// mkfifo(3).
pub fn mkfifo(p: &Path, mode: u32) {
    // SAFETY: the path is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mkfifo(cpath(p).as_ptr(), mode) };
    check_rc(rc, "mkfifo", p);
}

/// Sets the mtime (and atime) of `p` itself, without following a symlink.
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = [t, t];
    // SAFETY: the path is a valid NUL-terminated string and `times` two valid timespecs, both
    // outliving the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check_rc(rc, "utimensat", p);
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, p.display()));
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

fn mkdir(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

fn symlink(target: &[u8], p: &Path) {
    std::os::unix::fs::symlink(OsStr::from_bytes(target), p)
        .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
}

fn hard_link(from: &Path, to: &Path) {
    fs::hard_link(from, to)
        .unwrap_or_else(|e| panic!("link {} {}: {e}", from.display(), to.display()));
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    xattr::set(p, name, value)
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Makes the full special tree under `root` (which must not exist): every kind of entry and
/// the odd cases, a 5,000-entry directory and a 40-level chain. See [`make_special_tree_sized`].
pub fn make_special_tree(root: &Path) {
    make_special_tree_sized(root, 5000, 40);
}

/// Makes the special tree with a `wide`-entry directory and a `deep`-level directory chain:
/// - regular files: empty, 1 byte, exactly one 64 KiB chunk, one chunk + 1, 1 MiB random,
///   all-zero over several chunks, compressible text, sparse (data, 9 MiB hole, data), and the
///   same content under two names (not hard links);
/// - modes: setuid, setgid, sticky, all 12 bits, mode 000 (files); sticky, setgid, 000 (dirs);
/// - owners above 65535 on a file, a directory and a symlink (lchown);
/// - names: 255 bytes, non-UTF-8 (`\xff\xfe`), with a newline, with a space;
/// - names that sort before "." (`#hash`, `-dash`, and two in the wide directory);
/// - symlinks: relative, absolute, dangling, 1000-byte target, 4095-byte target (the maximum);
/// - a file hard-linked under three names in three directories;
/// - fifo, Unix socket, character devices (1,3 and one with a large minor), block device (7,0);
/// - xattrs: user.* empty, user.* binary, a 3000-byte user.* value, trusted.*,
///   security.capability (v2), on files, directories, the root and (trusted.*) a symlink;
/// - mtimes with nanoseconds on everything (files, directories, symlinks, specials), including
///   one before 1970 and one after 2038, set last, directories after their content.
pub fn make_special_tree_sized(root: &Path, wide: usize, deep: usize) {
    assert!(!root.exists(), "{} already exists", root.display());
    mkdir(root);
    let mut rng = StdRng::seed_from_u64(0x5eed_5c1f);
    let p = |rel: &[u8]| root.join(OsStr::from_bytes(rel));

    // Regular files of every interesting size.
    write(&p(b"empty"), b"");
    write(&p(b"one_byte"), b"x");
    write(&p(b"one_chunk"), &random_bytes(&mut rng, SPECIAL_CHUNK));
    write(
        &p(b"chunk_plus_one"),
        &random_bytes(&mut rng, SPECIAL_CHUNK + 1),
    );
    write(&p(b"random_1m"), &random_bytes(&mut rng, 1 << 20));
    write(&p(b"zeros"), &vec![0u8; 3 * SPECIAL_CHUNK + 100]);
    let text: String = (0..20_000)
        .map(|i| format!("line {i}: the quick brown fox\n"))
        .collect();
    write(&p(b"text"), text.as_bytes());
    {
        let mut f = File::create(p(b"sparse")).expect("creating sparse");
        f.write_all(&random_bytes(&mut rng, 1000))
            .expect("writing sparse");
        f.seek(SeekFrom::Start(1000 + SPARSE_HOLE))
            .expect("seeking sparse");
        f.write_all(&random_bytes(&mut rng, 5000))
            .expect("writing sparse");
    }
    let dup = random_bytes(&mut rng, 100_000);
    write(&p(b"dup_a"), &dup);
    write(&p(b"dup_b"), &dup);

    // Special mode bits.
    for (name, mode) in [
        (&b"setuid"[..], 0o4755),
        (b"setgid", 0o2755),
        (b"sticky_file", 0o1644),
        (b"all_bits", 0o7777),
        (b"mode000", 0o000),
    ] {
        write(&p(name), name);
        chmod(&p(name), mode);
    }
    for (name, mode) in [
        (&b"sticky_dir"[..], 0o1777),
        (b"setgid_dir", 0o2775),
        (b"dir000", 0o000),
    ] {
        mkdir(&p(name));
        write(&p(name).join("inside"), b"inside\n");
        chmod(&p(name), mode);
    }

    // Owners above 65535 (chown first: it clears setuid bits and capabilities).
    write(&p(b"high_ids"), b"owned by a high uid\n");
    lchown(&p(b"high_ids"), 100_000, 200_000);
    chmod(&p(b"high_ids"), 0o4751);
    mkdir(&p(b"high_ids_dir"));
    lchown(&p(b"high_ids_dir"), 70_000, 4_000_000_000);
    symlink(b"high_ids", &p(b"high_ids_link"));
    lchown(&p(b"high_ids_link"), 300_000, 400_000);

    // Odd names.
    write(&p(&[b'n'; 255]), b"a 255-byte name\n");
    write(&p(b"\xff\xfe"), b"a non-UTF-8 name\n");
    write(&p(b"new\nline"), b"a name with a newline\n");
    write(&p(b"with space"), b"a name with a space\n");

    // Hard links across directories: three names, one inode.
    mkdir(&p(b"dir_a"));
    mkdir(&p(b"dir_b"));
    mkdir(&p(b"dir_c/sub"));
    write(
        &p(b"dir_a/h1"),
        &random_bytes(&mut rng, 2 * SPECIAL_CHUNK + 77),
    );
    hard_link(&p(b"dir_a/h1"), &p(b"dir_b/h2"));
    hard_link(&p(b"dir_a/h1"), &p(b"dir_c/sub/h3"));

    // Symlinks.
    symlink(b"dir_a/h1", &p(b"link_rel"));
    symlink(b"/etc/passwd", &p(b"link_abs"));
    symlink(b"no/such/target", &p(b"link_dangling"));
    let mut long = b"x/".repeat(499);
    long.extend_from_slice(b"yy");
    assert_eq!(long.len(), 1000);
    symlink(&long, &p(b"link_long"));
    // The longest target Linux allows: too long to sit inline after an EROFS inode, so a Nydus
    // v6 image stores it in a block of its own.
    let mut max = b"m/".repeat(2047);
    max.push(b'z');
    assert_eq!(max.len(), 4095);
    symlink(&max, &p(b"link_max"));

    // Names that sort before "." (0x2e): in an EROFS directory "." and ".." are sorted with
    // the other names, so these come first, at the top level and in the multi-block "wide".
    write(&p(b"#hash"), b"sorts before the dot\n");
    write(&p(b"-dash"), b"sorts before the dot too\n");

    // Fifo, socket, devices.
    mkdir(&p(b"special"));
    mkfifo(&p(b"special/fifo"), 0o640);
    {
        let sock = p(b"special/socket");
        let l = std::os::unix::net::UnixListener::bind(&sock)
            .unwrap_or_else(|e| panic!("binding {}: {e}", sock.display()));
        drop(l);
        assert!(fs::symlink_metadata(&sock)
            .expect("socket stays")
            .file_type()
            .is_socket());
    }
    mknod(&p(b"special/chr_null"), libc::S_IFCHR | 0o666, 1, 3);
    mknod(&p(b"special/chr_big"), libc::S_IFCHR | 0o600, 511, 70_000);
    mknod(&p(b"special/blk_loop0"), libc::S_IFBLK | 0o660, 7, 0);

    // Extended attributes.
    write(&p(b"xattrs"), b"a file with xattrs\n");
    setxattr(&p(b"xattrs"), "user.empty", b"");
    setxattr(
        &p(b"xattrs"),
        "user.binary",
        &[0, 1, 2, 0xff, 0xfe, 0x80, 0, b'\n', 0x7f],
    );
    setxattr(&p(b"xattrs"), "user.big", &random_bytes(&mut rng, 3000));
    setxattr(&p(b"xattrs"), "trusted.skiff", b"trusted value");
    write(&p(b"capable"), b"#!/bin/sh\n");
    chmod(&p(b"capable"), 0o755);
    setxattr(&p(b"capable"), "security.capability", &capability_v2());
    mkdir(&p(b"xattr_dir"));
    setxattr(&p(b"xattr_dir"), "user.dir", b"on a directory");
    setxattr(&p(b"xattr_dir"), "trusted.dir", b"");
    setxattr(&p(b"link_rel"), "trusted.link", b"on a symlink");
    setxattr(root, "user.root", b"on the root");

    // A wide directory and a deep chain.
    mkdir(&p(b"wide"));
    write(&p(b"wide/#early"), b"before the dot\n");
    write(&p(b"wide/!earlier"), b"before the dot\n");
    for i in 0..wide {
        let name = format!("entry-{i:05}");
        // Mostly distinct tiny files, with a few empty ones and a few repeated contents.
        let content = match i % 50 {
            0 => String::new(),
            1 => "repeated\n".to_string(),
            _ => format!("{i}\n"),
        };
        write(&p(b"wide").join(name), content.as_bytes());
    }
    let mut d = p(b"deep");
    for level in 0..deep {
        d = d.join(format!("d{level}"));
    }
    mkdir(&d);
    write(&d.join("bottom"), b"forty levels down\n");

    // Mtimes last, children before their directory, the root at the very end.
    let mut k = 0i64;
    set_times_post_order(root, &mut k);
    set_mtime(&p(b"one_byte"), -123_456_789, 500_000_001);
    set_mtime(&p(b"text"), 4_102_444_800 + 86_400 * 365, 999_999_999);
    set_mtime(&p(b"wide"), 1_700_000_000, 1);
    set_mtime(root, 1_650_000_000, 123_456_789);
}

fn set_times_post_order(dir: &Path, k: &mut i64) {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let m = fs::symlink_metadata(&path).expect("lstat");
        if m.is_dir() {
            set_times_post_order(&path, k);
        }
        *k += 1;
        set_mtime(
            &path,
            1_600_000_000 + *k * 3_607,
            (*k * 7_919_113 + 17) % 1_000_000_000,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots and their differences
// ---------------------------------------------------------------------------------------------

/// Everything compared about one entry of a tree. What cannot match between a source and a
/// mount is left out: atime, ctime, st_dev, st_ino (hard-link *groups* are kept), st_blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// "dir", "file", "symlink", "chr", "blk", "fifo", "socket".
    pub kind: &'static str,
    /// Full st_mode.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// st_size (directories too).
    pub size: u64,
    /// Modification time.
    pub mtime: (i64, i64),
    /// Device number (devices only, else 0).
    pub rdev: u64,
    /// Link count.
    pub nlink: u64,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Every xattr, as read without following symlinks.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// blake3 of a regular file's content (hex), or the error reading it.
    pub content: Option<String>,
    /// Every path of the tree naming the same inode (non-directories; sorted; includes itself).
    pub links: Vec<Vec<u8>>,
}

fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "unknown"
    }
}

/// blake3 of the content of `path`, or the error.
pub fn content_digest(path: &Path) -> Result<String, std::io::Error> {
    let mut f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

fn join_rel(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.len() > 1 {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Walks `root` with lstat (never following symlinks) and records the [`Facts`] of every entry,
/// keyed by path relative to `root` ("/" for the root itself, "/a/b" below it). Panics on a
/// walk error (lstat or readdir), names the path; content read errors are recorded instead.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Facts> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let mut stack: Vec<(Vec<u8>, PathBuf)> = vec![(b"/".to_vec(), root.to_path_buf())];
    while let Some((rel, host)) = stack.pop() {
        let m =
            fs::symlink_metadata(&host).unwrap_or_else(|e| panic!("lstat {}: {e}", host.display()));
        let ft = m.file_type();
        let kind = kind_of(&ft);
        let mut xattrs = BTreeMap::new();
        let names =
            xattr::list(&host).unwrap_or_else(|e| panic!("listxattr {}: {e}", host.display()));
        for n in names {
            let v = xattr::get(&host, &n)
                .unwrap_or_else(|e| panic!("getxattr {:?} {}: {e}", n, host.display()))
                .unwrap_or_else(|| panic!("xattr {:?} of {} listed but absent", n, host.display()));
            xattrs.insert(n.into_vec(), v);
        }
        let facts = Facts {
            kind,
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            rdev: if ft.is_char_device() || ft.is_block_device() {
                m.rdev()
            } else {
                0
            },
            nlink: m.nlink(),
            target: ft.is_symlink().then(|| {
                fs::read_link(&host)
                    .unwrap_or_else(|e| panic!("readlink {}: {e}", host.display()))
                    .into_os_string()
                    .into_vec()
            }),
            xattrs,
            content: ft
                .is_file()
                .then(|| content_digest(&host).unwrap_or_else(|e| format!("read error: {e}"))),
            links: Vec::new(),
        };
        if !ft.is_dir() {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
        }
        if ft.is_dir() {
            let rd =
                fs::read_dir(&host).unwrap_or_else(|e| panic!("readdir {}: {e}", host.display()));
            for e in rd {
                let e = e.unwrap_or_else(|e| panic!("readdir {}: {e}", host.display()));
                let name = e.file_name().into_vec();
                stack.push((join_rel(&rel, &name), host.join(OsStr::from_bytes(&name))));
            }
        }
        out.insert(rel, facts);
    }
    for (_, mut paths) in inodes {
        paths.sort();
        for p in &paths {
            if let Some(f) = out.get_mut(p) {
                f.links = paths.clone();
            }
        }
    }
    out
}

fn show(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

/// Every difference between snapshots `a` and `b`, one line each, by path and field, including
/// paths present on one side only.
pub fn diff(a: &BTreeMap<Vec<u8>, Facts>, b: &BTreeMap<Vec<u8>, Facts>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, fa) in a {
        let Some(fb) = b.get(path) else {
            out.push(format!(
                "{}: only in the first tree ({})",
                show(path),
                fa.kind
            ));
            continue;
        };
        let mut field = |name: &str, x: String, y: String| {
            if x != y {
                out.push(format!("{}: {name}: {x} != {y}", show(path)));
            }
        };
        field("kind", fa.kind.into(), fb.kind.into());
        field("mode", format!("{:o}", fa.mode), format!("{:o}", fb.mode));
        field("uid", fa.uid.to_string(), fb.uid.to_string());
        field("gid", fa.gid.to_string(), fb.gid.to_string());
        field("size", fa.size.to_string(), fb.size.to_string());
        field(
            "mtime",
            format!("{}.{:09}", fa.mtime.0, fa.mtime.1),
            format!("{}.{:09}", fb.mtime.0, fb.mtime.1),
        );
        field("rdev", format!("{:#x}", fa.rdev), format!("{:#x}", fb.rdev));
        field("nlink", fa.nlink.to_string(), fb.nlink.to_string());
        field(
            "symlink target",
            format!("{:?}", fa.target.as_deref().map(show)),
            format!("{:?}", fb.target.as_deref().map(show)),
        );
        field(
            "content",
            format!("{:?}", fa.content),
            format!("{:?}", fb.content),
        );
        let links = |l: &[Vec<u8>]| l.iter().map(|p| show(p)).collect::<Vec<_>>().join(" ");
        field("hard-link group", links(&fa.links), links(&fb.links));
        for (n, va) in &fa.xattrs {
            match fb.xattrs.get(n) {
                None => out.push(format!(
                    "{}: xattr {} only in the first tree",
                    show(path),
                    show(n)
                )),
                Some(vb) if vb != va => out.push(format!(
                    "{}: xattr {}: {} != {}",
                    show(path),
                    show(n),
                    hex::encode(va),
                    hex::encode(vb)
                )),
                Some(_) => {}
            }
        }
        for n in fb.xattrs.keys().filter(|n| !fa.xattrs.contains_key(*n)) {
            out.push(format!(
                "{}: xattr {} only in the second tree",
                show(path),
                show(n)
            ));
        }
    }
    for (path, fb) in b {
        if !a.contains_key(path) {
            out.push(format!(
                "{}: only in the second tree ({})",
                show(path),
                fb.kind
            ));
        }
    }
    out
}

/// Asserts that `diff(a, b)` is empty, listing every difference (`what` names the comparison).
pub fn assert_no_diff(what: &str, a: &BTreeMap<Vec<u8>, Facts>, b: &BTreeMap<Vec<u8>, Facts>) {
    let d = diff(a, b);
    assert!(
        d.is_empty(),
        "{what}: {} difference(s) over {} / {} entries:\n  {}",
        d.len(),
        a.len(),
        b.len(),
        d.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// Reads at odd offsets
// ---------------------------------------------------------------------------------------------

/// Reads up to `len` bytes at `offset`, looping over short reads, stopping at EOF.
pub fn read_full_at(f: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], offset + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads of `files` at offsets around chunk boundaries, the hole and EOF, with odd lengths,
/// through the mount and from the source: the same bytes, and nothing past EOF. Returns the
/// number of reads compared.
pub fn check_odd_reads(src: &Path, mnt: &Path, files: &[&str]) -> usize {
    let c = SPECIAL_CHUNK as u64;
    let mut reads = 0;
    for name in files {
        let s = File::open(src.join(name)).unwrap_or_else(|e| panic!("open source {name}: {e}"));
        let m = File::open(mnt.join(name)).unwrap_or_else(|e| panic!("open mounted {name}: {e}"));
        // Less readahead, so that the kernel asks the daemon for the pages we touch.
        // SAFETY: fadvise only takes the descriptor and numbers; `m` is open.
        unsafe { libc::posix_fadvise(m.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let size = s.metadata().expect("source size").len();
        assert_eq!(
            m.metadata().expect("mounted size").len(),
            size,
            "{name}: size"
        );
        let mut offsets = vec![
            0,
            1,
            4095,
            4097,
            c - 1,
            c,
            c + 1,
            2 * c - 3,
            3 * c + 5,
            size / 2 + 1,
            size.saturating_sub(1),
            size.saturating_sub(7),
            size,
            size + 1,
            size + c,
        ];
        if *name == "sparse" {
            // Around the end of the first data and the start of the second, inside the hole.
            offsets.extend([
                999,
                1000,
                1001,
                1000 + SPARSE_HOLE / 2 + 3,
                1000 + SPARSE_HOLE - 1,
                1000 + SPARSE_HOLE + 1,
            ]);
        }
        for &off in &offsets {
            for len in [
                1usize,
                3,
                4096,
                5000,
                SPECIAL_CHUNK,
                SPECIAL_CHUNK + 3,
                3 * SPECIAL_CHUNK + 1,
            ] {
                let want = read_full_at(&s, off, len)
                    .unwrap_or_else(|e| panic!("source {name} @{off}+{len}: {e}"));
                let got = read_full_at(&m, off, len)
                    .unwrap_or_else(|e| panic!("mounted {name} @{off}+{len}: {e}"));
                let expect_len = size.saturating_sub(off).min(len as u64) as usize;
                assert_eq!(want.len(), expect_len, "source {name} @{off}+{len}: length");
                assert_eq!(
                    got.len(),
                    expect_len,
                    "mounted {name} @{off}+{len}: {} bytes, want {expect_len}",
                    got.len()
                );
                if got != want {
                    let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                    panic!("mounted {name} @{off}+{len}: bytes differ from the source, first at +{first}");
                }
                reads += 1;
            }
        }
        // A single read past EOF returns 0 bytes, not an error.
        let mut b = [0u8; 16];
        assert_eq!(
            m.read_at(&mut b, size).expect("read at EOF"),
            0,
            "{name}: read at EOF"
        );
        assert_eq!(
            m.read_at(&mut b, size + 12345).expect("read past EOF"),
            0,
            "{name}: read past EOF"
        );
    }
    reads
}

// ---------------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------------

/// How long a mount may take to appear, and the daemon to exit after SIGTERM (sanity bounds,
/// not timing assertions: a machine busy compiling can be slow).
const MOUNT_WAIT: Duration = Duration::from_secs(30);

fn unescape_mount_path(s: &str) -> Vec<u8> {
    // /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Whether something is mounted at `path`, by /proc/self/mounts (which, unlike stat, also sees
/// a mount whose daemon died).
pub fn is_mounted(path: &Path) -> bool {
    let want = fs::canonicalize(path.parent().unwrap_or(Path::new("/")))
        .map(|p| p.join(path.file_name().unwrap_or_default()))
        .unwrap_or_else(|_| path.to_path_buf());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|m| unescape_mount_path(m) == want.as_os_str().as_bytes())
}

/// Whether `path` is a mountpoint that answers: its st_dev differs from its parent's.
fn serves(path: &Path) -> bool {
    let parent = path.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

/// A `skiff mount` child serving an image at a directory. Dropping it (also when a test panics)
/// sends SIGTERM, waits for the child, and lazily unmounts if the mount is still there.
pub struct Mount {
    child: Option<Child>,
    /// The mountpoint.
    pub dir: PathBuf,
    /// The daemon's log (stdout and stderr).
    pub log: PathBuf,
}

impl Mount {
    /// Mounts `bootstrap` (blobs in `blob_dir`) at `dir` (created if missing), waiting until the
    /// mount answers. The daemon's output goes to `dir` + ".log".
    pub fn new(bootstrap: &Path, blob_dir: &Path, dir: &Path) -> Mount {
        Self::with_args(
            &[
                OsStr::new("--bootstrap"),
                bootstrap.as_os_str(),
                OsStr::new("--blob-dir"),
                blob_dir.as_os_str(),
            ],
            dir,
        )
    }

    /// Runs `skiff mount ARGS DIR` (e.g. `--image REF`), waiting until the mount answers.
    pub fn with_args<S: AsRef<OsStr>>(args: &[S], dir: &Path) -> Mount {
        mkdir(dir);
        let log = dir.with_extension("log");
        let logf = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let child = Command::new(skiff())
            .arg("mount")
            .args(args)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning skiff mount: {e}"));
        // From here on, Drop cleans up whatever happens.
        let mut m = Mount {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
        };
        let start = Instant::now();
        loop {
            if serves(&m.dir) {
                return m;
            }
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                m.child = None;
                panic!(
                    "skiff mount exited before mounting ({status})\n{}",
                    m.log_text()
                );
            }
            if start.elapsed() > MOUNT_WAIT {
                panic!(
                    "{} not mounted after {MOUNT_WAIT:?}\n{}",
                    m.dir.display(),
                    m.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        format!(
            "--- skiff mount log ---\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// SIGTERMs the daemon and returns its exit status, SIGKILLing it if it does not exit.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if start.elapsed() < MOUNT_WAIT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    eprintln!("skiff mount (pid {pid}) ignored SIGTERM; killing it");
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    fn force_unmount(&self) {
        if is_mounted(&self.dir) {
            eprintln!(
                "{} still mounted after the daemon exited: umount -l",
                self.dir.display()
            );
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }

    /// Kills the daemon with SIGKILL (no clean-up of its own) and removes the dead mount.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }

    /// Stops the daemon and asserts a clean end: exit status 0 and the mount gone.
    pub fn unmount(mut self) {
        let status = self.stop();
        let still = is_mounted(&self.dir);
        self.force_unmount();
        let log = self.log_text();
        assert!(
            !still,
            "{} still mounted after skiff mount exited\n{log}",
            self.dir.display()
        );
        assert!(
            status.is_some_and(|s| s.success()),
            "skiff mount exited with {status:?} after SIGTERM\n{log}"
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
        self.force_unmount();
    }
}

/// Aborts the FUSE connection mounted at `path` (through fusectl), so that whatever waits on a
/// daemon that is gone fails instead of hanging: the last resort of a test that failed.
pub fn abort_fuse(path: &Path) {
    let want = path.to_string_lossy().into_owned();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(minor) = info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want.as_str()))
            .then(|| {
                f.get(2)
                    .and_then(|d| d.split_once(':'))
                    .map(|(_, m)| m.to_string())
            })
            .flatten()
    }) else {
        return;
    };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if fs::read_dir(ctl)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(ctl)
            .status();
    }
    eprintln!("aborting the FUSE connection {minor} of {}", path.display());
    let _ = fs::write(ctl.join(&minor).join("abort"), b"1");
    let _ = Command::new("umount").arg("-l").arg(path).status();
}
