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

/// An integer field of a `--metrics-file`.
fn metric(path: &Path, field: &str) -> u64 {
    let v: serde_json::Value = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    v[field]
        .as_u64()
        .or_else(|| v[field].as_bool().map(u64::from))
        .unwrap_or(0)
}

/// The files of a two-layer image: (path, bytes), all incompressible, each one chunk.
/// The registry logs a request after its last byte is sent, so a client can have the bytes
/// before the line is written: waits (at most 10 s) until the blob GETs logged since `mark`
/// satisfy `done`, and returns them (what is logged by then, if they never do).
fn logged_until(
    reg: &registry::Registry,
    mark: usize,
    done: impl Fn(&[registry::BlobGet]) -> bool,
) -> Vec<registry::BlobGet> {
    let start = Instant::now();
    loop {
        let gets = reg.blob_gets(mark);
        if done(&gets) || start.elapsed() > Duration::from_secs(10) {
            return gets;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn layer_files(layer: u64) -> Vec<(String, Vec<u8>)> {
    (0..24)
        .map(|i| {
            let len = 20_000 + (i * 37_717 + layer as usize * 5_003) % 300_000;
            (
                format!("l{layer}/f{i:02}"),
                oci::noise(len, 100 * layer + i as u64),
            )
        })
        .collect()
}

#[test]
fn convert_prefetch_list_is_stored_and_fetched_first_in_one_request() {
    if !require_fuse() {
        return;
    }
    let Some(reg) = require(
        "Debian's docker-registry",
        registry::Registry::start("record", &[]),
    ) else {
        return;
    };
    let t = scratch();
    let (f1, f2) = (layer_files(1), layer_files(2));
    let tar_of = |dir: &str, files: &[(String, Vec<u8>)]| {
        let mut ents = vec![oci::Ent::Dir(dir, 0o755)];
        ents.extend(
            files
                .iter()
                .map(|(p, d)| oci::Ent::File(p.as_str(), 0o644, d.clone())),
        );
        oci::layer(&ents, 1_700_000_000).expect("layer")
    };
    let layout = t.path().join("layout");
    oci::write_layout(
        &layout,
        &[
            (tar_of("l1", &f1), "application/vnd.oci.image.layer.v1.tar"),
            (tar_of("l2", &f2), "application/vnd.oci.image.layer.v1.tar"),
        ],
    )
    .expect("layout");
    // Startup files from both layers, out of their blob order.
    let listed = ["/l2/f05", "/l1/f17", "/l1/f02", "/l2/f20"];
    let list = t.path().join("list.txt");
    fs::write(&list, listed.join("\n") + "\n").expect("list");
    let target = format!("{}/record/app:latest", reg.addr);
    let out = skiff_ok([
        OsStr::new("convert"),
        OsStr::new("--source"),
        layout.as_os_str(),
        OsStr::new("--target"),
        OsStr::new(&target),
        OsStr::new("--prefetch-list"),
        list.as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("prefetch"), "{text}");
    let size_of = |p: &str| -> u64 {
        let p = p.trim_start_matches('/');
        f1.iter()
            .chain(&f2)
            .find(|(q, _)| q == p)
            .map(|(_, d)| d.len() as u64)
            .expect("listed file")
    };
    let want_bytes: u64 = listed.iter().map(|p| size_of(p)).sum();

    // The conversion is faithful with its prefetch blob (every rule, data included).
    skiff_ok([
        OsStr::new("check"),
        OsStr::new("--source"),
        layout.as_os_str(),
        OsStr::new("--target"),
        OsStr::new(&target),
    ]);

    let cache = t.path().join("cache");
    let metrics = t.path().join("metrics.json");
    let mark = reg.log_len();
    let mnt = t.path().join("mnt");
    let m = Mount::with_args(
        &[
            OsStr::new("--image"),
            OsStr::new(&target),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
            OsStr::new("--metrics-file"),
            metrics.as_os_str(),
        ],
        &mnt,
    );
    let start = Instant::now();
    while metric(&metrics, "prefetch_complete") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "prefetch did not finish\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&metrics, "prefetch_errors"), 0, "{}", m.log_text());
    assert_eq!(metric(&metrics, "prefetch_bytes"), want_bytes);
    // What went over the wire before any read: the bootstrap, then range requests of one
    // blob (the prefetch blob) adding up to exactly the listed files.
    let gets = logged_until(&reg, mark, |gets| {
        gets.iter()
            .filter(|g| g.status == 206)
            .map(|g| g.bytes)
            .sum::<u64>()
            >= want_bytes
    });
    let ranges: Vec<_> = gets.iter().filter(|g| g.status == 206).collect();
    assert!(!ranges.is_empty(), "no range request");
    assert!(
        ranges.len() <= 2,
        "{} range requests for 4 adjacent chunks",
        ranges.len()
    );
    assert!(
        ranges.iter().all(|g| g.path == ranges[0].path),
        "prefetch read more than one blob: {:?}",
        ranges.iter().map(|g| &g.path).collect::<Vec<_>>()
    );
    assert_eq!(ranges.iter().map(|g| g.bytes).sum::<u64>(), want_bytes);

    // The listed files are served from the cache, byte for byte, without another request.
    let before = reg.blob_gets(mark).len();
    for p in listed {
        let want = f1
            .iter()
            .chain(&f2)
            .find(|(q, _)| q == p.trim_start_matches('/'))
            .map(|(_, d)| d.clone())
            .expect("listed");
        assert_eq!(fs::read(mnt.join(&p[1..])).expect("read"), want, "{p}");
    }
    assert_eq!(
        reg.blob_gets(mark).len(),
        before,
        "a listed file was fetched again"
    );
    // Another file comes from its layer's blob, on demand.
    assert_eq!(fs::read(mnt.join("l1/f09")).expect("read"), f1[9].1);
    let after = logged_until(&reg, mark, |gets| gets.len() > before);
    assert_eq!(after.len(), before + 1);
    assert_ne!(after[before].path, ranges[0].path);
    m.unmount();
}
