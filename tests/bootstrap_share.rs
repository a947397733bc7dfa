//! Daemons of one node sharing one copy of a bootstrap (src/share): two `skiff mount`s of one
//! image map the same sealed memfd (same inode in /proc/PID/maps, its pages counted half to
//! each in PSS), both serve the tree identical to the source, the second keeps serving after
//! the first is gone, and a daemon with `--no-bootstrap-share` keeps a private copy.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

/// The sealed bootstrap mapping of process `pid`: its inode, and its Rss and Pss in KiB
/// (from /proc/PID/smaps), if it maps one.
fn sealed_mapping(pid: u32) -> Option<(u64, u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut found: Option<(u64, u64, u64)> = None;
    let mut in_it = false;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A mapping's header: "start-end perms offset dev inode path".
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            in_it = fields
                .get(5)
                .is_some_and(|p| p.starts_with("/memfd:skiff-bootstrap-"));
            if in_it {
                assert!(found.is_none(), "one sealed bootstrap mapping\n{smaps}");
                let ino = fields[4].parse().expect("inode");
                found = Some((ino, 0, 0));
            }
            continue;
        }
        if !in_it {
            continue;
        }
        let kib = || {
            fields
                .get(1)
                .and_then(|v| v.parse::<u64>().ok())
                .expect("kB")
        };
        match fields.first() {
            Some(&"Rss:") => found.as_mut().expect("mapping").1 = kib(),
            Some(&"Pss:") => found.as_mut().expect("mapping").2 = kib(),
            _ => {}
        }
    }
    found
}

fn mount(boot: &Path, blobs: &Path, dir: &Path, share: &[&OsStr]) -> Mount {
    let mut args = vec![
        OsStr::new("--bootstrap"),
        boot.as_os_str(),
        OsStr::new("--blob-dir"),
        blobs.as_os_str(),
    ];
    args.extend_from_slice(share);
    Mount::with_args(&args, dir)
}

#[test]
fn two_mounts_of_one_image_share_one_sealed_bootstrap() {
    if !require_fuse() {
        return;
    }
    let tmp = scratch();
    let src = tmp.path().join("src");
    // Enough entries for a bootstrap of several pages.
    make_special_tree_sized(&src, 400, 4);
    let boot = tmp.path().join("image.boot");
    let blobs = tmp.path().join("blobs");
    build_image(&src, &boot, &blobs, &[]);
    let share = tmp.path().join("share");
    let share_args = [OsStr::new("--bootstrap-share-dir"), share.as_os_str()];

    let first = mount(&boot, &blobs, &tmp.path().join("m1"), &share_args);
    let second = mount(&boot, &blobs, &tmp.path().join("m2"), &share_args);
    let private = mount(
        &boot,
        &blobs,
        &tmp.path().join("m3"),
        &[OsStr::new("--no-bootstrap-share")],
    );
    let want = snapshot(&src);
    for m in [&first, &second, &private] {
        assert_no_diff(&m.dir.display().to_string(), &want, &snapshot(&m.dir));
    }
    let (ino1, rss1, _) = sealed_mapping(first.pid().expect("pid")).unwrap_or_else(|| {
        panic!(
            "the first daemon maps no sealed bootstrap\n{}",
            first.log_text()
        )
    });
    let (ino2, rss2, pss2) = sealed_mapping(second.pid().expect("pid")).unwrap_or_else(|| {
        panic!(
            "the second daemon maps no sealed bootstrap\n{}",
            second.log_text()
        )
    });
    eprintln!("sealed bootstrap: RSS {rss1} and {rss2} KiB, PSS of the second {pss2} KiB");
    assert_eq!(ino1, ino2, "both daemons map the same memfd");
    assert!(
        second
            .log_text()
            .contains("bootstrap shared with another daemon"),
        "{}",
        second.log_text()
    );
    // Validated in place, so every page is resident in both; each pays half in PSS.
    assert!(rss1 > 4 && rss2 > 4, "resident: {rss1} and {rss2} KiB");
    assert!(
        pss2 * 2 <= rss2 + 4,
        "PSS {pss2} KiB is not half of RSS {rss2} KiB: the pages are not shared"
    );
    assert!(
        sealed_mapping(private.pid().expect("pid")).is_none(),
        "--no-bootstrap-share maps a shared copy"
    );
    // The copy outlives the daemon that made it.
    first.unmount();
    assert_no_diff("after the first is gone", &want, &snapshot(&second.dir));
    let third = mount(&boot, &blobs, &tmp.path().join("m4"), &share_args);
    let (ino3, _, _) = sealed_mapping(third.pid().expect("pid")).expect("the third maps it");
    assert_eq!(ino3, ino2, "the third takes the copy from the second");
    third.unmount();
    second.unmount();
    private.unmount();
}
