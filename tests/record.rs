//! `skiff record` and `--record`: the files a workload reads, in first-read order, as a
//! prefetch list; and that list fed back into an image.
//!
//! Prerequisites (root, /dev/fuse) go through `require`: with `CI=true` a missing one fails
//! the test.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A small tree whose files are read in a known order by the tests: returns the source dir.
fn tree(root: &Path) -> std::path::PathBuf {
    let src = root.join("src");
    for d in ["d/e", "other"] {
        fs::create_dir_all(src.join(d)).expect("mkdir");
    }
    let put = |p: &str, data: Vec<u8>| fs::write(src.join(p), data).expect("write");
    put("a", oci::noise(5000, 1));
    put("d/b", oci::noise(70_000, 2));
    put("d/e/c", b"c\n".to_vec());
    put("empty", Vec::new());
    put("statonly", oci::noise(100, 3));
    put("other/x", oci::noise(3000, 4));
    // Three chunks at 1 MiB: the workload reads only the middle one.
    put("big", oci::noise(3 << 20, 5));
    fs::hard_link(src.join("d/b"), src.join("hl")).expect("hard link");
    std::os::unix::fs::symlink("d/e/c", src.join("ln")).expect("symlink");
    src
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn record_lists_the_files_read_in_first_read_order() {
    if !require_fuse() {
        return;
    }
    let t = scratch();
    let src = tree(t.path());
    let boot = t.path().join("boot");
    let blobs = t.path().join("blobs");
    build_image(&src, &boot, &blobs, &[]);
    let list = t.path().join("list.txt");
    // Reads through a symlink and a hard link, a stat without a read, an empty file, a read
    // in the middle of a big file, and files read twice.
    let script = "set -e; m=$SKIFF_RECORD_MOUNT; cat \"$m/d/e/c\" >/dev/null; \
                  stat \"$m/statonly\" >/dev/null; cat {}/a >/dev/null; cat \"$m/ln\" >/dev/null; \
                  cat \"$m/empty\"; cat \"$m/hl\" >/dev/null; \
                  dd if=\"$m/big\" of=/dev/null bs=4096 skip=300 count=2 status=none; \
                  cat \"$m/a\" \"$m/d/e/c\" >/dev/null; ls -R \"$m\" >/dev/null";
    let out = skiff_ok([
        OsStr::new("record"),
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
        OsStr::new("--output"),
        list.as_os_str(),
        OsStr::new("--"),
        OsStr::new("sh"),
        OsStr::new("-c"),
        OsStr::new(script),
    ]);
    let got = lines(&list);
    // The hard-linked file is listed under one of its names (the first the image gives).
    assert_eq!(got.len(), 4, "{got:?}\n{}", output_text(&out));
    assert_eq!(&got[..2], ["/d/e/c", "/a"], "{got:?}");
    assert!(got[2] == "/d/b" || got[2] == "/hl", "{got:?}");
    assert_eq!(got[3], "/big", "{got:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("recorded 4 files"));

    // The list goes back into an image as its prefetch table, in that order.
    let boot2 = t.path().join("boot2");
    build_image(
        &src,
        &boot2,
        &blobs,
        &[OsStr::new("--prefetch-list"), list.as_os_str()],
    );
    let out = skiff_ok([
        OsStr::new("inspect"),
        OsStr::new("--bootstrap"),
        boot2.as_os_str(),
        OsStr::new("--json"),
    ]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    assert_eq!(stats["prefetch"], 4, "{stats:#}");

    // A command that fails still leaves the list, and the exit status says so.
    let out = run_skiff([
        OsStr::new("record"),
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
        OsStr::new("-o"),
        list.as_os_str(),
        OsStr::new("--"),
        OsStr::new("sh"),
        OsStr::new("-c"),
        OsStr::new("cat {}/other/x >/dev/null; exit 3"),
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the list was written"),
        "{}",
        output_text(&out)
    );
    assert_eq!(lines(&list), ["/other/x"]);

    // A list that cannot be written fails before anything runs.
    let marker = t.path().join("ran");
    let out = run_skiff([
        OsStr::new("record"),
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
        OsStr::new("-o"),
        src.join("a/list").as_os_str(),
        OsStr::new("--"),
        OsStr::new("touch"),
        marker.as_os_str(),
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        !marker.exists(),
        "the command ran although the list cannot be written"
    );
}

#[test]
fn mount_record_writes_the_list_while_running_and_at_exit() {
    if !require_fuse() {
        return;
    }
    let t = scratch();
    let src = tree(t.path());
    let boot = t.path().join("boot");
    let blobs = t.path().join("blobs");
    build_image(&src, &boot, &blobs, &[]);
    let list = t.path().join("list.txt");
    let mnt = t.path().join("mnt");
    let m = Mount::with_args(
        &[
            OsStr::new("--bootstrap"),
            boot.as_os_str(),
            OsStr::new("--blob-dir"),
            blobs.as_os_str(),
            OsStr::new("--record"),
            list.as_os_str(),
        ],
        &mnt,
    );
    // Written at start: empty.
    assert_eq!(lines(&list), Vec::<String>::new());
    for p in ["other/x", "statonly", "a"] {
        assert_eq!(
            fs::read(mnt.join(p)).expect("read"),
            fs::read(src.join(p)).expect("read source"),
            "{p}"
        );
    }
    // Rewritten while the mount runs (every second while it grows).
    let start = Instant::now();
    while lines(&list).len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the list was not rewritten while mounted: {:?}\n{}",
            lines(&list),
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lines(&list), ["/other/x", "/statonly", "/a"]);
    fs::read(mnt.join("d/e/c")).expect("read");
    m.unmount();
    assert_eq!(lines(&list), ["/other/x", "/statonly", "/a", "/d/e/c"]);
}
