//! The special tree (every kind of entry and the odd cases, see `common::make_special_tree`)
//! built with 64 KiB chunks: `skiff check --source` passes and catches a changed mtime, the
//! FUSE mount equals the source field by field and byte by byte, reads at odd offsets and past
//! EOF match the source, and every kind of write fails with EROFS. The same with
//! `--compressor zstd`.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::*;

fn expect_erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what}: expected EROFS, got {other:?}"),
    }
}

fn libc_rc(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Every way of changing the mount fails with EROFS.
fn check_read_only(mnt: &Path) {
    let p = |n: &str| mnt.join(n);
    expect_erofs("create a file", File::create(p("new_file")));
    expect_erofs(
        "create_new a file",
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p("new_file2")),
    );
    expect_erofs(
        "open an existing file for writing",
        OpenOptions::new().write(true).open(p("one_byte")),
    );
    expect_erofs(
        "open an existing file for appending",
        OpenOptions::new().append(true).open(p("random_1m")),
    );
    expect_erofs(
        "open an existing file read-write",
        OpenOptions::new().read(true).write(true).open(p("text")),
    );
    expect_erofs(
        "truncate on open",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(p("empty")),
    );
    expect_erofs("mkdir", fs::create_dir(p("new_dir")));
    expect_erofs("unlink", fs::remove_file(p("one_byte")));
    expect_erofs("unlink a symlink", fs::remove_file(p("link_rel")));
    expect_erofs(
        "rmdir an empty directory",
        fs::remove_dir(p("high_ids_dir")),
    );
    expect_erofs("rename", fs::rename(p("one_byte"), p("renamed")));
    expect_erofs("symlink", std::os::unix::fs::symlink("x", p("new_link")));
    expect_erofs(
        "hard link",
        fs::hard_link(p("one_byte"), p("new_hard_link")),
    );
    expect_erofs(
        "chmod",
        fs::set_permissions(
            p("one_byte"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        ),
    );
    expect_erofs("setxattr new", xattr::set(p("xattrs"), "user.new", b"v"));
    expect_erofs(
        "setxattr existing",
        xattr::set(p("xattrs"), "user.binary", b"v"),
    );
    expect_erofs("removexattr", xattr::remove(p("xattrs"), "user.empty"));
    let c = |n: &str| std::ffi::CString::new(p(n).as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid NUL-terminated paths that outlive each call.
    expect_erofs(
        "truncate(2)",
        libc_rc(unsafe { libc::truncate(c("random_1m").as_ptr(), 10) }),
    );
    // SAFETY: as above.
    expect_erofs(
        "chown(2)",
        libc_rc(unsafe { libc::lchown(c("one_byte").as_ptr(), 1, 1) }),
    );
    // SAFETY: as above; a null `times` means "now".
    expect_erofs(
        "utimensat(2)",
        libc_rc(unsafe {
            libc::utimensat(libc::AT_FDCWD, c("one_byte").as_ptr(), std::ptr::null(), 0)
        }),
    );
    // SAFETY: as above.
    expect_erofs(
        "mknod(2)",
        libc_rc(unsafe { libc::mkfifo(c("new_fifo").as_ptr(), 0o600) }),
    );
    for n in [
        "new_file",
        "new_file2",
        "new_dir",
        "renamed",
        "new_link",
        "new_hard_link",
        "new_fifo",
    ] {
        assert!(
            fs::symlink_metadata(p(n)).is_err(),
            "{n} exists after a refused write"
        );
    }
}

fn count_kinds(snap: &BTreeMap<Vec<u8>, Facts>) -> BTreeMap<&'static str, usize> {
    let mut k = BTreeMap::new();
    for f in snap.values() {
        *k.entry(f.kind).or_insert(0) += 1;
    }
    k
}

#[test]
fn special_tree_image_matches_source() {
    if !require_fuse() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_special_tree(&src);
    let src_snap = snapshot(&src);

    // The tree is what it claims to be: without this, an empty diff would prove little.
    let kinds = count_kinds(&src_snap);
    for (kind, min) in [
        ("dir", 50),
        ("file", 5029),
        ("symlink", 5),
        ("chr", 2),
        ("blk", 1),
        ("fifo", 1),
        ("socket", 1),
    ] {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) >= min,
            "special tree has {kinds:?}, want >= {min} {kind}"
        );
    }
    let h1 = &src_snap[&b"/dir_a/h1".to_vec()];
    assert_eq!(
        h1.links.len(),
        3,
        "hard-link group of dir_a/h1: {:?}",
        h1.links
    );
    let cap = &src_snap[&b"/capable".to_vec()];
    assert_eq!(
        cap.xattrs.get(b"security.capability".as_slice()),
        Some(&capability_v2())
    );
    assert_eq!(src_snap[&b"/xattrs".to_vec()].xattrs.len(), 4);
    assert!(
        src_snap.contains_key(b"/\xff\xfe".as_slice())
            && src_snap.contains_key(b"/new\nline".as_slice())
    );

    let img = tmp.path().join("img");
    let bootstrap = img.join("bootstrap");
    let blobs = img.join("blobs");
    let summary = build_image(
        &src,
        &bootstrap,
        &blobs,
        &[OsStr::new("--chunk-size"), OsStr::new("64K")],
    );
    eprintln!("special tree build summary: {summary}");
    assert_eq!(summary_u64(&summary, "chunk_size"), SPECIAL_CHUNK as u64);
    assert!(
        summary_u64(&summary, "zero_chunks") >= 9 * 16 + 3,
        "sparse hole and zeros file give zero chunks"
    );
    assert!(
        summary_u64(&summary, "dedup_chunks") >= 2,
        "dup_a and dup_b share their chunks"
    );
    assert_eq!(
        summary_u64(&summary, "inodes") as usize,
        src_snap.len() - 2,
        "inodes: one per path, less 2 hard links"
    );

    // skiff check against the source passes.
    let (code, out) = check_image(&bootstrap, &blobs, Some(&src));
    assert_eq!(
        code, 0,
        "skiff check --source failed on an unmodified source\n{out}"
    );
    assert!(
        out.contains("identical") && out.lines().any(|l| l.trim() == "ok"),
        "{out}"
    );

    let mnt_dir = tmp.path().join("mnt");
    let mnt = Mount::new(&bootstrap, &blobs, &mnt_dir);
    // Cold reads first, before the snapshot fills the page cache.
    let reads = check_odd_reads(&src, &mnt_dir, SPECIAL_READ_FILES);
    eprintln!("{reads} reads at odd offsets matched the source");
    check_read_only(&mnt_dir);
    let mnt_snap = snapshot(&mnt_dir);
    assert_no_diff("source vs mounted image", &src_snap, &mnt_snap);
    // And the source itself is unchanged by building and checking.
    assert_no_diff("source before vs after", &src_snap, &snapshot(&src));
    mnt.unmount();
    assert!(!is_mounted(&mnt_dir));

    // Negative control: one changed mtime in the source is found by check and by our diff.
    set_mtime(&src.join("one_byte"), 1_234_567_890, 42);
    let (code, out) = check_image(&bootstrap, &blobs, Some(&src));
    assert_ne!(
        code, 0,
        "skiff check passed although /one_byte's mtime changed\n{out}"
    );
    assert_eq!(
        problem_paths(&out).into_iter().collect::<Vec<_>>(),
        vec!["/one_byte".to_string()],
        "check must name exactly the changed path\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("PROBLEM /one_byte: mtime")),
        "{out}"
    );
    let d = diff(&snapshot(&src), &mnt_snap);
    assert_eq!(d.len(), 1, "diff after changing one mtime: {d:#?}");
    assert!(
        d[0].starts_with("\"/one_byte\": mtime: 1234567890.000000042 != "),
        "{d:?}"
    );
}

/// `--compressor zstd`: the same tree (root digest) as lz4, chunks stored as zstd frames where
/// that saves space, `skiff check --source` clean, and the mount equal to the source.
#[test]
fn special_tree_zstd_image_matches_source() {
    if !require_fuse() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    make_special_tree(&src);
    let src_snap = snapshot(&src);
    let mut images = Vec::new();
    for comp in ["lz4", "zstd"] {
        let img = tmp.path().join(comp);
        let (bootstrap, blobs) = (img.join("bootstrap"), img.join("blobs"));
        let summary = build_image(
            &src,
            &bootstrap,
            &blobs,
            &[
                OsStr::new("--chunk-size"),
                OsStr::new("64K"),
                OsStr::new("--compressor"),
                OsStr::new(comp),
            ],
        );
        assert_eq!(summary["compressor"], comp, "{summary:#}");
        images.push((summary, bootstrap, blobs));
    }
    let (lz4, (zstd, bootstrap, blobs)) = (&images[0].0, &images[1]);
    assert_eq!(zstd["root_digest"], lz4["root_digest"]);
    assert!(
        summary_u64(zstd, "blob_bytes") < summary_u64(lz4, "blob_bytes"),
        "zstd {zstd:#} lz4 {lz4:#}"
    );
    // The text compresses (one zstd frame per chunk); random bytes are stored as they are.
    let chunks_of = |path: &str| -> Vec<String> {
        let out = skiff_ok([
            OsStr::new("inspect"),
            OsStr::new("--bootstrap"),
            bootstrap.as_os_str(),
            OsStr::new("--json"),
            OsStr::new(path),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
        v["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| c["compression"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    let text = chunks_of("/text");
    assert!(
        !text.is_empty() && text.iter().all(|c| c == "zstd"),
        "{text:?}"
    );
    let random = chunks_of("/random_1m");
    assert!(random.iter().all(|c| c == "none"), "{random:?}");

    let (code, out) = check_image(bootstrap, blobs, Some(&src));
    assert_eq!(code, 0, "skiff check --source of the zstd image\n{out}");
    let mnt_dir = tmp.path().join("mnt");
    let mnt = Mount::new(bootstrap, blobs, &mnt_dir);
    check_odd_reads(&src, &mnt_dir, SPECIAL_READ_FILES);
    assert_no_diff(
        "source vs mounted zstd image",
        &src_snap,
        &snapshot(&mnt_dir),
    );
    mnt.unmount();
}

/// The harness's diff reports every kind of difference (so an empty diff means something).
#[test]
fn diff_reports_every_difference() {
    let tmp = scratch();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for root in [&a, &b] {
        fs::create_dir(root).expect("mkdir");
        fs::write(root.join("content"), b"same").expect("write");
        fs::write(root.join("mode"), b"m").expect("write");
        fs::write(root.join("xattr"), b"x").expect("write");
        fs::write(root.join("l1"), b"link").expect("write");
        fs::hard_link(root.join("l1"), root.join("l2")).expect("link");
        std::os::unix::fs::symlink("t1", root.join("sym")).expect("symlink");
        xattr::set(root.join("xattr"), "user.v", b"1").expect("setxattr");
    }
    fs::write(b.join("content"), b"diff").expect("write");
    fs::set_permissions(
        b.join("mode"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    xattr::set(b.join("xattr"), "user.v", b"2").expect("setxattr");
    xattr::set(b.join("xattr"), "user.extra", b"").expect("setxattr");
    fs::remove_file(b.join("l2")).expect("unlink");
    fs::write(b.join("l2"), b"link").expect("write");
    fs::remove_file(b.join("sym")).expect("unlink");
    std::os::unix::fs::symlink("t2", b.join("sym")).expect("symlink");
    fs::write(b.join("extra"), b"").expect("write");
    fs::write(a.join("missing"), b"").expect("write");
    for root in [&a, &b] {
        for n in ["content", "mode", "xattr", "l1", "l2", "extra", "missing"] {
            if root.join(n).exists() {
                set_mtime(&root.join(n), 1_000_000_000, 5);
            }
        }
        set_mtime(&root.join("sym"), 1_000_000_000, 5);
        set_mtime(root, 1_000_000_000, 5);
    }
    set_mtime(&b.join("mode"), 1_000_000_000, 6);
    let d = diff(&snapshot(&a), &snapshot(&b));
    let text = d.join("\n");
    for want in [
        "\"/content\": content:",
        "\"/mode\": mode: 100644 != 100600",
        "\"/mode\": mtime: 1000000000.000000005 != 1000000000.000000006",
        "\"/xattr\": xattr \"user.v\": 31 != 32",
        "\"/xattr\": xattr \"user.extra\" only in the second tree",
        "\"/l1\": nlink: 2 != 1",
        "\"/l1\": hard-link group:",
        "\"/l2\": hard-link group:",
        "\"/sym\": symlink target:",
        "\"/extra\": only in the second tree",
        "\"/missing\": only in the first tree",
    ] {
        assert!(text.contains(want), "diff lacks {want:?}:\n{text}");
    }
    assert!(diff(&snapshot(&a), &snapshot(&a)).is_empty());
}

/// Hard links to files other than regular files (fifo, symlink, device, socket) keep their
/// link group and link count in the image, as `link(2)` made them.
#[test]
fn hard_linked_special_files_keep_their_link_group() {
    if !require_fuse() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a")).expect("mkdir");
    fs::create_dir_all(src.join("b")).expect("mkdir");
    mkfifo(&src.join("a/fifo"), 0o644);
    fs::hard_link(src.join("a/fifo"), src.join("b/fifo2")).expect("link fifo");
    std::os::unix::fs::symlink("target", src.join("a/sym")).expect("symlink");
    fs::hard_link(src.join("a/sym"), src.join("b/sym2")).expect("link symlink");
    mknod(&src.join("a/null"), libc::S_IFCHR | 0o666, 1, 3);
    fs::hard_link(src.join("a/null"), src.join("b/null2")).expect("link chr");
    fs::write(src.join("a/file"), b"regular, for comparison").expect("write");
    fs::hard_link(src.join("a/file"), src.join("b/file2")).expect("link file");
    for p in ["a/fifo", "a/sym", "a/null", "a/file", "a", "b", ""] {
        set_mtime(&src.join(p), 1_500_000_000, 7);
    }
    let src_snap = snapshot(&src);
    assert_eq!(
        src_snap[&b"/a/sym".to_vec()].nlink,
        2,
        "link(2) on a symlink links the symlink"
    );

    let bootstrap = tmp.path().join("bootstrap");
    let blobs = tmp.path().join("blobs");
    build_image(&src, &bootstrap, &blobs, &[]);
    let mnt_dir = tmp.path().join("mnt");
    let mnt = Mount::new(&bootstrap, &blobs, &mnt_dir);
    let d = diff(&src_snap, &snapshot(&mnt_dir));
    mnt.unmount();
    let (code, out) = check_image(&bootstrap, &blobs, Some(&src));
    assert!(
        d.is_empty(),
        "mounted image differs from the source:\n  {}\n(skiff check exit {code})",
        d.join("\n  ")
    );
    assert_eq!(code, 0, "{out}");
}
