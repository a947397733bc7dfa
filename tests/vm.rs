//! `skiff serve` to a booted microVM: the guest mounts the tag with `mount -t virtiofs` and
//! what it sees is compared with the source on the host.
//!
//! Each test starts a real `skiff serve`, boots QEMU (TCG) with `scripts/vm-run.sh`, and reads
//! the guest's results from the serial log between markers. The listing on both sides comes from
//! the same static program (`guest/lister`), run over the source on the host and over the
//! virtio-fs mount in the guest.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::listing::*;
use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether QEMU, the guest kernel and the lister can be had; under CI their absence fails.
fn vm_ready() -> Result<PathBuf, String> {
    if !is_root() {
        return Err("not running as root".into());
    }
    for tool in ["qemu-system-x86_64", "busybox"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Err(format!("{tool} not installed (scripts/install-deps.sh)"));
        }
    }
    common::listing::lister()
}

/// A running `skiff serve`; stopped with SIGTERM on drop, after which its socket must be gone.
struct Serve {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Serve {
    fn start(bootstrap: &Path, blob_dir: &Path, dir: &Path, tag: &str) -> Serve {
        let socket = dir.join("vfs.sock");
        let log = dir.join("serve.log");
        let child = Command::new(skiff())
            .arg("serve")
            .arg("--bootstrap")
            .arg(bootstrap)
            .arg("--blob-dir")
            .arg(blob_dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--tag")
            .arg(tag)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("serve log"))
            .spawn()
            .expect("starting skiff serve");
        let mut s = Serve { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.socket.exists() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("skiff serve exited ({status}):\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 10 s:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and checks that it exits cleanly and removes its socket.
    fn stop(mut self) -> String {
        // SAFETY: kill has no memory-safety preconditions; the PID is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("waiting for skiff serve");
        let log = self.log_text();
        assert!(status.success(), "skiff serve exited with {status}:\n{log}");
        assert!(!self.socket.exists(), "socket left behind after SIGTERM");
        log
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// Boots the microVM against `socket`, runs `script` in the guest and returns the serial log.
/// Panics with the log's tail when the guest test fails.
fn boot(socket: &Path, tag: &str, script: &str, files: &[(&Path, &str)], dir: &Path) -> String {
    boot_with(socket, tag, script, files, dir, &[])
}

/// QEMU arguments of a second vhost-user-fs device on `socket` with `tag` (the guest mounts it
/// itself): two images in one boot.
fn second_device(socket: &Path, tag: &str) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=char1,path={}", socket.display()),
        "-device".into(),
        format!("vhost-user-fs-pci,queue-size=1024,chardev=char1,tag={tag}"),
    ]
}

/// [`boot`] with extra QEMU arguments.
fn boot_with(
    socket: &Path,
    tag: &str,
    script: &str,
    files: &[(&Path, &str)],
    dir: &Path,
    qemu_args: &[String],
) -> String {
    let test = dir.join(format!("test-{}.sh", std::process::id()));
    fs::write(&test, script).expect("test script");
    let serial = dir.join("serial.log");
    let mut cmd = Command::new(repo().join("scripts/vm-run.sh"));
    cmd.arg("--socket")
        .arg(socket)
        .arg("--tag")
        .arg(tag)
        .arg("--test-script")
        .arg(&test)
        .arg("--serial-log")
        .arg(&serial)
        .arg("--timeout")
        .arg("400")
        .arg("-q");
    for (src, dst) in files {
        let mut spec = src.as_os_str().to_owned();
        spec.push(":");
        spec.push(dst);
        cmd.arg("--guest-file").arg(spec);
    }
    for a in qemu_args {
        cmd.arg("--qemu-arg").arg(a);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("running vm-run.sh");
    let log = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).replace('\r', "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}", stderr.lines().last().unwrap_or(""));
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!(
            "guest test failed ({}):\n{stderr}\n--- serial tail ---\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    log
}

/// The lines the guest printed between `BEGIN-<name>` and `END-<name>`.
fn section(log: &str, name: &str) -> Vec<String> {
    let begin = format!("BEGIN-{name}");
    let end = format!("END-{name}");
    log.lines()
        .skip_while(|l| l.trim() != begin)
        .skip(1)
        .take_while(|l| l.trim() != end)
        .map(str::to_owned)
        .collect()
}

const TAG: &str = "skiff";

#[test]
fn special_tree_in_the_guest_matches_the_source_and_survives_a_reboot() {
    let Some(lister) = require("QEMU microVM", vm_ready()) else {
        return;
    };
    let dir = scratch();
    let src = dir.path().join("src");
    make_special_tree(&src);
    let bootstrap = dir.path().join("image.boot");
    let blobs = dir.path().join("blobs");
    build_image(
        &src,
        &bootstrap,
        &blobs,
        &[OsStr::new("--chunk-size"), OsStr::new("64K")],
    );
    let serve = Serve::start(&bootstrap, &blobs, dir.path(), TAG);

    let script = r#"
echo BEGIN-LISTING
/lister "$SKIFF_MNT"
echo END-LISTING
echo BEGIN-WRITES
for op in 'echo x > "$SKIFF_MNT/new"' 'echo x >> "$SKIFF_MNT/one_byte"' 'mkdir "$SKIFF_MNT/d"' \
          'rm "$SKIFF_MNT/one_byte"' 'touch "$SKIFF_MNT/one_byte"' 'ln -s a "$SKIFF_MNT/s"'; do
    if err=$(eval "$op" 2>&1); then echo "WRITE-SUCCEEDED: $op"; else echo "refused: $err"; fi
done
echo END-WRITES
"#;
    let log = boot(
        &serve.socket,
        TAG,
        script,
        &[(&lister, "/lister")],
        dir.path(),
    );
    assert_same_listing(&host_listing(&lister, &src), &section(&log, "LISTING"));
    let writes = section(&log, "WRITES");
    assert_eq!(writes.len(), 6, "write attempts: {writes:?}");
    for w in &writes {
        assert!(
            w.contains("Read-only file system"),
            "a write was not refused with EROFS: {w}"
        );
    }

    // A second VM (a reboot) against the same daemon.
    let log = boot(
        &serve.socket,
        TAG,
        "echo BEGIN-SUM; sha256sum \"$SKIFF_MNT/random_1m\" | cut -d' ' -f1; echo END-SUM\n",
        &[],
        dir.path(),
    );
    let want = host_listing(&lister, &src)
        .into_iter()
        .find(|l| l.starts_with("/random_1m\t"))
        .and_then(|l| l.split('\t').nth(11).map(str::to_owned))
        .expect("random_1m in the host listing");
    assert_eq!(section(&log, "SUM"), vec![want]);
    let log = serve.stop();
    assert_eq!(
        log.matches("VMM connected").count(),
        2,
        "two VMM connections:\n{log}"
    );
}

#[test]
fn corrupted_chunk_gives_eio_for_that_file_only() {
    let Some(lister) = require("QEMU microVM", vm_ready()) else {
        return;
    };
    let dir = scratch();
    let src = dir.path().join("src");
    fs::create_dir(&src).expect("mkdir src");
    let pattern = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    };
    fs::write(src.join("victim"), pattern(1, 300_000)).expect("victim");
    fs::write(src.join("bystander"), pattern(2, 300_000)).expect("bystander");
    fs::write(src.join("small"), b"small and fine\n").expect("small");
    let bootstrap = dir.path().join("image.boot");
    let blobs = dir.path().join("blobs");
    build_image(
        &src,
        &bootstrap,
        &blobs,
        &[OsStr::new("--chunk-size"), OsStr::new("64K")],
    );

    // Flip a byte inside the victim's second chunk, where `skiff inspect` says it is stored.
    let out = skiff_ok([
        OsStr::new("inspect"),
        OsStr::new("--bootstrap"),
        bootstrap.as_os_str(),
        OsStr::new("--json"),
        OsStr::new("victim"),
    ]);
    let entry: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    let chunk = &entry["chunks"][1];
    let blob = blobs.join(chunk["blob"].as_str().expect("blob id"));
    let at = chunk["offset"].as_u64().expect("offset")
        + chunk["stored_size"].as_u64().expect("size") / 2;
    let mut bytes = fs::read(&blob).expect("blob");
    bytes[at as usize] ^= 0x40;
    fs::write(&blob, bytes).expect("corrupt blob");

    let serve = Serve::start(&bootstrap, &blobs, dir.path(), TAG);
    let script = r#"
echo BEGIN-READS
for f in victim bystander small victim; do
    if err=$(cat "$SKIFF_MNT/$f" 2>&1 >/dev/null); then
        echo "$f ok $(sha256sum "$SKIFF_MNT/$f" | cut -d' ' -f1)"
    else
        echo "$f failed: $err"
    fi
done
echo END-READS
"#;
    let log = boot(&serve.socket, TAG, script, &[], dir.path());
    let reads = section(&log, "READS");
    let host = host_listing(&lister, &src);
    let sum = |name: &str| {
        host.iter()
            .find(|l| l.starts_with(&format!("/{name}\t")))
            .and_then(|l| l.split('\t').nth(11))
            .expect("host listing")
            .to_owned()
    };
    assert_eq!(reads.len(), 4, "{reads:?}");
    assert!(
        reads[0].starts_with("victim failed:") && reads[0].contains("Input/output error"),
        "{reads:?}"
    );
    assert_eq!(reads[1], format!("bystander ok {}", sum("bystander")));
    assert_eq!(reads[2], format!("small ok {}", sum("small")));
    assert!(
        reads[3].starts_with("victim failed:"),
        "the failure persists: {reads:?}"
    );
    let log = serve.stop();
    assert!(
        log.contains("failed verification"),
        "the daemon logs the bad chunk:\n{log}"
    );
}

/// The guest's part of the Debian test for the image mounted at `$1`, its sections suffixed
/// with `$2`.
const DEBIAN_GUEST: &str = r#"
debian_checks() {
    echo "BEGIN-DPKG$2"
    chroot "$1" /usr/bin/dpkg-query -W
    echo "END-DPKG$2"
    echo "BEGIN-BASH$2"
    chroot "$1" /bin/bash -c 'echo ok'
    echo "END-BASH$2"
    echo "BEGIN-LISTING$2"
    /lister "$1"
    echo "END-LISTING$2"
}
"#;

/// Debian minbase as a Skiff image and, in the same boot on a second virtio-fs device, as the
/// Nydus RAFS v6 image nydus-image builds of it: dpkg-query and bash run from both, and both
/// listings equal the host's.
#[test]
fn debian_userland_runs_from_a_skiff_image() {
    let Some(lister) = require("QEMU microVM", vm_ready()) else {
        return;
    };
    let Some(rootfs) = require("Debian minbase rootfs", debian_rootfs("minbase")) else {
        return;
    };
    let dir = scratch();
    let bootstrap = dir.path().join("debian.boot");
    let blobs = dir.path().join("blobs");
    build_image(&rootfs, &bootstrap, &blobs, &[]);
    let serve = Serve::start(&bootstrap, &blobs, dir.path(), TAG);
    // The same rootfs built by nydus-image 2.2 (its defaults: zstd, blake3, 1 MiB chunks).
    let v6 = common::nydus::require_nydus_image().map(|_| {
        let out = dir.path().join("v6");
        let boot = common::nydus::create_dir_rafs(
            &rootfs,
            &out,
            common::nydus::BuildOpts {
                compressor: "zstd",
                digester: "blake3",
                chunk_size: "0x100000",
            },
        );
        fs::create_dir_all(out.join("serve")).expect("v6 serve dir");
        Serve::start(&boot, &out.join("blobs"), &out.join("serve"), "nydus")
    });
    let mut script = DEBIAN_GUEST.to_string();
    script.push_str("debian_checks \"$SKIFF_MNT\" \"\"\n");
    if v6.is_some() {
        script.push_str(
            "mkdir -p /mnt-v6 && mount -t virtiofs nydus /mnt-v6 && debian_checks /mnt-v6 -V6\n",
        );
    }
    let qemu_args = v6
        .as_ref()
        .map(|s| second_device(&s.socket, "nydus"))
        .unwrap_or_default();
    let log = boot_with(
        &serve.socket,
        TAG,
        &script,
        &[(&lister, "/lister")],
        dir.path(),
        &qemu_args,
    );
    let host = Command::new("dpkg-query")
        .arg(format!("--admindir={}/var/lib/dpkg", rootfs.display()))
        .arg("-W")
        .output()
        .expect("dpkg-query on the host");
    let host: Vec<String> = String::from_utf8_lossy(&host.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        host.len() > 50,
        "host package list looks wrong: {} packages",
        host.len()
    );
    let host_list = host_listing(&lister, &rootfs);
    assert_eq!(section(&log, "DPKG"), host, "package lists differ");
    assert_eq!(section(&log, "BASH"), vec!["ok".to_string()]);
    assert_same_listing(&host_list, &section(&log, "LISTING"));
    serve.stop();
    if let Some(v6) = v6 {
        assert_eq!(section(&log, "DPKG-V6"), host, "v6: package lists differ");
        assert_eq!(section(&log, "BASH-V6"), vec!["ok".to_string()]);
        // nydus-image stores no mtime for the root (Skiff reports the load time, as nydusd
        // does) and EROFS directory sizes: those two columns of the root's line and of
        // directories' lines are what the v6 listing may not share with the host's.
        let v6_listing = without_unpreserved_v6_fields(&section(&log, "LISTING-V6"));
        assert_same_listing(&without_unpreserved_v6_fields(&host_list), &v6_listing);
        v6.stop();
    }
}
