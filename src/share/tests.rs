//! Sharing between two "daemons" (two shares of one process over one directory), and what a
//! hostile or broken holder can hand over: each refused, the loader falling back to its own
//! copy with the same tables.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::build::{build, BuildOptions, BuildSource, Compressor};
use crate::format::sealed::REQUIRED_SEALS;
use crate::format::SharedError;

/// Builds a small image of `files` in `dir`; returns its bootstrap's path.
fn image(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for (name, data) in files {
        std::fs::write(src.join(name), data).expect("write");
    }
    let opts = BuildOptions {
        bootstrap: dir.join("boot"),
        blob_dir: dir.join("blobs"),
        chunk_size: 4096,
        compressor: Compressor::None,
        chunk_dicts: Vec::new(),
        progress: false,
        io_threads: 0,
        blob_id_sha256: false,
        node_compat: false,
    };
    build(&BuildSource::Dir(src), &opts).expect("build");
    opts.bootstrap
}

fn inode_of(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    let f = std::fs::File::from(fd.try_clone_to_owned().expect("dup"));
    std::os::unix::fs::MetadataExt::ino(&f.metadata().expect("fstat"))
}

fn sockets(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The same tables, field by field (they are views of the bytes).
fn same_tables(a: &Bootstrap, b: &Bootstrap) {
    let (ta, tb) = (a.tables(), b.tables());
    assert_eq!(a.file_digest(), b.file_digest());
    assert_eq!(a.root_digest(), b.root_digest());
    assert_eq!(a.byte_len(), b.byte_len());
    assert_eq!(
        zerocopy::IntoBytes::as_bytes(ta.inodes),
        zerocopy::IntoBytes::as_bytes(tb.inodes)
    );
    assert_eq!(ta.strings, tb.strings);
}

#[test]
fn a_second_daemon_maps_the_first_ones_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = image(dir.path(), &[("a", b"alpha"), ("b", b"beta")]);
    let share_dir = dir.path().join("share");
    let first = BootstrapShare::open(&share_dir).expect("share");
    let second = BootstrapShare::open(&share_dir).expect("share");
    let private = Bootstrap::load(&boot).expect("private");
    assert!(private.sealed_fd().is_none());

    let b1 = load_file(&boot, Some(&first)).expect("first");
    let fd1 = b1.sealed_fd().expect("the first daemon's copy is sealed");
    let key = ShareKey::of_skiff_prefix(&std::fs::read(&boot).expect("read")).expect("key");
    let offered = sockets(&share_dir);
    assert_eq!(offered.len(), 1, "{offered:?}");
    assert!(offered[0].starts_with(&key.name()), "{offered:?}");

    let b2 = load_file(&boot, Some(&second)).expect("second");
    let fd2 = b2.sealed_fd().expect("sealed");
    assert_eq!(
        inode_of(fd1),
        inode_of(fd2),
        "the second maps the first one's memfd"
    );
    same_tables(&b1, &private);
    same_tables(&b2, &private);
    assert_eq!(b2.lookup(0, b"a"), private.lookup(0, b"a"));
    // Both offer it now, so it outlives the first.
    assert_eq!(sockets(&share_dir).len(), 2);
    drop(first);
    assert_eq!(
        sockets(&share_dir).len(),
        1,
        "the first one's offer is withdrawn"
    );
    let third = BootstrapShare::open(&share_dir).expect("share");
    let b3 = load_file(&boot, Some(&third)).expect("third");
    assert_eq!(inode_of(b3.sealed_fd().expect("sealed")), inode_of(fd2));
    drop((b1, b2, b3, second, third));
    assert!(sockets(&share_dir).is_empty(), "{:?}", sockets(&share_dir));
}

#[test]
fn an_offer_is_withdrawn_when_its_image_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = image(dir.path(), &[("a", b"alpha")]);
    let other = image(&dir.path().join("o"), &[("z", b"zeta")]);
    let share_dir = dir.path().join("share");
    let share = BootstrapShare::open(&share_dir).expect("share");
    let b = load_file(&boot, Some(&share)).expect("load");
    drop(b);
    // The offering thread looks at its offers whenever the list changes.
    let _o = load_file(&other, Some(&share)).expect("load");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sockets(&share_dir).len() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(sockets(&share_dir).len(), 1, "{:?}", sockets(&share_dir));
    // And a daemon asking for the dropped image loads its own.
    let asker = BootstrapShare::open(&share_dir).expect("share");
    let again = load_file(&boot, Some(&asker)).expect("load");
    assert!(again.sealed_fd().is_some());
}

#[test]
fn stale_sockets_are_removed_and_a_private_copy_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = image(dir.path(), &[("a", b"alpha")]);
    let share_dir = dir.path().join("share");
    let share = BootstrapShare::open(&share_dir).expect("share");
    let key = ShareKey::of_skiff_prefix(&std::fs::read(&boot).expect("read")).expect("key");
    // A daemon killed: its socket is there, nobody listens.
    let stale = share_dir.join(format!("{}.999999-0.sock", key.name()));
    drop(UnixListener::bind(&stale).expect("bind"));
    let b = load_file(&boot, Some(&share)).expect("load");
    same_tables(&b, &Bootstrap::load(&boot).expect("private"));
    assert!(!stale.exists(), "stale socket removed");
}

#[test]
fn a_share_directory_others_can_write_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let share_dir = dir.path().join("share");
    std::fs::create_dir(&share_dir).expect("mkdir");
    std::fs::set_permissions(&share_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = BootstrapShare::open(&share_dir).expect_err("world-writable");
    assert!(matches!(e, ShareError::NotPrivate { .. }), "{e}");
    std::fs::set_permissions(&share_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    BootstrapShare::open(&share_dir).expect("private now");
    let made = dir.path().join("new/share");
    BootstrapShare::open(&made).expect("created");
    let mode = std::fs::metadata(&made).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

/// A memfd holding `bytes`, with `seals`.
fn memfd(bytes: &[u8], seals: libc::c_int) -> std::os::fd::OwnedFd {
    use std::os::unix::fs::FileExt;
    let name = std::ffi::CString::new("skiff-hostile").expect("name");
    // SAFETY: memfd_create reads the name and returns a descriptor or -1.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    // SAFETY: a new descriptor nobody else owns.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    f.write_all_at(bytes, 0).expect("write");
    if seals != 0 {
        // SAFETY: F_ADD_SEALS takes an integer.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(r, 0);
    }
    f.into()
}

/// A hostile holder offering `fd` under `key` in `dir`, to every asker, until dropped.
struct Hostile {
    path: PathBuf,
}

impl Hostile {
    fn offer(dir: &Path, key: &ShareKey, fd: std::os::fd::OwnedFd) -> Self {
        let path = dir.join(format!("{}.999998-0.sock", key.name()));
        let l = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let _ = c.send_with_fd(&b"S"[..], fd.as_raw_fd());
            }
        });
        Self { path }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The sealed region an honest daemon makes for `b` under `key`, as bytes.
fn honest_region(b: Bootstrap, key: &ShareKey) -> Vec<u8> {
    let sealed = b.into_shared(key, None).map_err(|f| f.1).expect("seal");
    let fd = sealed.sealed_fd().expect("fd");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::fs::File::from(fd.try_clone_to_owned().expect("dup")),
        &mut bytes,
    )
    .expect("read");
    bytes
}

#[test]
fn unsealed_tampered_and_foreign_copies_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = image(dir.path(), &[("a", b"alpha"), ("b", b"beta")]);
    let other = image(&dir.path().join("o"), &[("a", b"ALPHA"), ("b", b"beta")]);
    let key = ShareKey::of_skiff_prefix(&std::fs::read(&boot).expect("read")).expect("key");
    let private = Bootstrap::load(&boot).expect("private");
    let region = honest_region(Bootstrap::load(&boot).expect("load"), &key);
    let take = |bytes: &[u8], seals| {
        let s = SealedBytes::from_fd(memfd(bytes, seals), 1 << 30).map_err(SharedError::Seal)?;
        Bootstrap::from_shared(s, &key, None)
    };
    // The honest region, sealed: taken.
    same_tables(&take(&region, REQUIRED_SEALS).expect("honest"), &private);
    // Not sealed, or writable: refused before anything is read.
    assert!(matches!(take(&region, 0), Err(SharedError::Seal(_))));
    let writable = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    assert!(matches!(take(&region, writable), Err(SharedError::Seal(_))));
    // One byte of the tables changed: the digest over them no longer matches.
    let mut tampered = region.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(
        matches!(
            take(&tampered, REQUIRED_SEALS),
            Err(SharedError::Invalid(_))
        ),
        "tampered tables"
    );
    // A byte of the header's padding.
    let mut tampered = region.clone();
    tampered[SHARE_HEADER_LEN - 1] = 1;
    assert!(matches!(
        take(&tampered, REQUIRED_SEALS),
        Err(SharedError::Header(_))
    ));
    // Another image's tables, honestly sealed for its own key: the header names it.
    let other_key = ShareKey::of_skiff_prefix(&std::fs::read(&other).expect("read")).expect("key");
    let foreign = honest_region(Bootstrap::load(&other).expect("load"), &other_key);
    assert!(matches!(
        take(&foreign, REQUIRED_SEALS),
        Err(SharedError::OtherImage)
    ));
    // Another image's valid tables behind a header claiming this key: refused too (its
    // tables' digest is not the one the key names).
    let mut lying = foreign.clone();
    lying[..SHARE_HEADER_LEN].copy_from_slice(&region[..SHARE_HEADER_LEN]);
    let r = take(&lying, REQUIRED_SEALS);
    assert!(
        matches!(r, Err(SharedError::Invalid(_) | SharedError::Differs)),
        "{:?}",
        r.err()
    );
    // ... and the header's own digest fixed up to the foreign tables': the key still decides.
    let foreign_digest = *Bootstrap::load(&other).expect("load").file_digest();
    lying[56..88].copy_from_slice(&foreign_digest);
    assert!(matches!(
        take(&lying, REQUIRED_SEALS),
        Err(SharedError::Differs)
    ));
    // Shorter than a header.
    assert!(matches!(
        take(&region[..100], REQUIRED_SEALS),
        Err(SharedError::Header(_))
    ));

    // Through the directory: a hostile holder offering each of those, and the loader falling
    // back to its own copy, with the right tables, every time.
    let share_dir = dir.path().join("share");
    for (what, bytes, seals) in [
        ("unsealed", region.clone(), 0),
        ("tampered", tampered_tail(&region), REQUIRED_SEALS),
        ("lying", lying.clone(), REQUIRED_SEALS),
    ] {
        let share = BootstrapShare::open(&share_dir).expect("share");
        let hostile_fd = memfd(&bytes, seals);
        let hostile_ino = {
            let f = std::fs::File::from(hostile_fd.try_clone().expect("dup"));
            std::os::unix::fs::MetadataExt::ino(&f.metadata().expect("fstat"))
        };
        let _h = Hostile::offer(&share_dir, &key, hostile_fd);
        let b = load_file(&boot, Some(&share)).expect(what);
        same_tables(&b, &private);
        let fd = b.sealed_fd().expect("its own copy, sealed and offered");
        assert_ne!(
            inode_of(fd),
            hostile_ino,
            "{what}: the hostile copy was taken"
        );
    }
}

fn tampered_tail(region: &[u8]) -> Vec<u8> {
    let mut t = region.to_vec();
    let last = t.len() - 1;
    t[last] ^= 1;
    t
}

#[test]
fn without_a_share_the_loader_is_the_plain_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = image(dir.path(), &[("a", b"alpha")]);
    let b = load_file(&boot, None).expect("load");
    assert!(b.sealed_fd().is_none());
    let e = load_bytes(b"not a bootstrap at all".to_vec(), None).expect_err("refused");
    assert!(
        matches!(e, FormatError::Truncated { .. } | FormatError::BadMagic),
        "{e}"
    );
    let share = BootstrapShare::open(&dir.path().join("share")).expect("share");
    let e = load_bytes(vec![0u8; 8192], Some(&share)).expect_err("refused");
    assert!(matches!(e, FormatError::BadMagic), "{e}");
}

#[test]
fn a_damaged_file_is_refused_even_when_another_daemon_has_its_intact_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = image(dir.path(), &[("a", b"alpha"), ("b", b"beta")]);
    let share_dir = dir.path().join("share");
    let holder = BootstrapShare::open(&share_dir).expect("share");
    let _held = load_file(&boot, Some(&holder)).expect("intact");
    // The superblock (and so the key it names) stays; a byte of the tables changes.
    let mut bytes = std::fs::read(&boot).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let damaged = dir.path().join("damaged");
    std::fs::write(&damaged, &bytes).expect("write");
    let asker = BootstrapShare::open(&share_dir).expect("share");
    let e = load_file(&damaged, Some(&asker)).expect_err("damaged");
    assert!(matches!(e, FormatError::FileDigestMismatch), "{e}");
}
