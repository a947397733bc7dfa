//! Kata's whole path in a booted microVM: `skiff virtiofs` started as Kata's Go runtime
//! starts it, the API calls Kata makes, then in the guest what the Kata agent does: mount tag
//! `kataShared` at /run/kata-containers/shared and build each container's rootfs as overlayfs
//! (lower: the RAFS image, upper and work: the passthrough share, `index=off`). Commands run
//! from both containers; one container is removed (`DELETE`) while the VM runs.
//!
//! Two more containers come from a containerd + nydus-snapshotter node (tests/kata/node.rs):
//! Debian minbase in a registry as Skiff's node layout and as Nydus RAFS v6, which the
//! snapshotter's host daemon (`skiff fuse` as `nydusd`) has mounted and read whole on the host.
//! The sandbox daemon gets the same config in `POST /api/v1/mount`; in the guest, `dpkg-query
//! -W` and the listing of each equal the host's, a write lands in the upper dir, and the
//! registry's access log shows that the sandbox daemon fetched 0 bytes: the host daemon's
//! chunks in the node's shared cache served it all.
//!
//! One image's blobs sit on a slow disk (tests/kata/stallfs.rs) that stalls one chunk of its
//! file `cold.bin` for 5 s: a passthrough write and a cached read beside that cold read, on the
//! device's one request queue, finish well before the stall ends.

mod common;
mod kata;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::confined::{assert_confined, VIRTIOFS_CAPS};
use common::*;
use kata::stallfs::{Stall, StallMount};
use kata::*;

/// How long the slow disk stalls the one chunk.
const STALL: Duration = Duration::from_secs(5);

/// `len` bytes that do not repeat (a xorshift stream from `seed`): no two chunks dedup.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The content of `cold.bin`: 512 KiB that do not repeat.
fn cold_content() -> Vec<u8> {
    noise(0x9e37_79b9_7f4a_7c15, 512 * 1024)
}

/// The content of `c-filler`: 1 MiB (16 of the image's 64 KiB chunks) that do not repeat.
fn filler_content() -> Vec<u8> {
    noise(0x2545_f491_4f6c_dd1d, 1 << 20)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// QEMU and a static busybox (copied into the images) can be had; under CI their absence fails.
fn vm_ready() -> Result<PathBuf, String> {
    if !is_root() {
        return Err("not running as root".into());
    }
    let found = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Err("qemu-system-x86_64 not installed (scripts/install-deps.sh)".into());
    }
    let busybox = PathBuf::from("/bin/busybox");
    let elf = fs::read(&busybox)
        .map_err(|e| format!("{}: {e} (install busybox-static)", busybox.display()))?;
    if !is_static_elf(&elf) {
        return Err("/bin/busybox is not a static ELF executable (install busybox-static)".into());
    }
    Ok(busybox)
}

/// Whether `elf` is a 64-bit little-endian ELF without a program interpreter (`PT_INTERP`).
fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from_le_bytes(b) as usize)
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

/// A container image tree: a static busybox and a file naming the image.
fn image(dir: &Path, name: &str, busybox: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join(format!("src-{name}"));
    fs::create_dir_all(src.join("bin")).expect("mkdir bin");
    fs::create_dir_all(src.join("etc")).expect("mkdir etc");
    fs::copy(busybox, src.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", src.join("bin/sh")).expect("symlink sh");
    fs::write(src.join("etc/image"), format!("image {name}\n")).expect("etc/image");
    fs::write(src.join(format!("never-read-{name}")), format!("{name}\n")).expect("never-read");
    fs::write(src.join("cold.bin"), cold_content()).expect("cold.bin");
    // Stored between bin/ and cold.bin (names sort "bin" < "c-filler" < "cold.bin") and never
    // read: decode-ahead after the guest's sequential reads of bin/busybox decodes at most a few
    // chunks past them, so without this gap it would read cold.bin's stalled first chunk in the
    // background, long before the head-of-line check asks for it in the foreground.
    fs::write(src.join("c-filler"), filler_content()).expect("c-filler");
    let bootstrap = dir.join(format!("{name}.boot"));
    let blobs = dir.join(format!("blobs-{name}"));
    build_image(
        &src,
        &bootstrap,
        &blobs,
        &[OsStr::new("--chunk-size"), OsStr::new("64K")],
    );
    (bootstrap, blobs)
}

/// The guest side: what the Kata agent does for two containers, then waiting for the host to
/// remove the first one.
const GUEST: &str = r#"
S=/run/kata-containers/shared
mkdir -p $S
mounted=no
for i in 1 2 3 4 5 6 7 8 9 10; do
    if mount -t virtiofs kataShared $S; then mounted=yes; break; fi
    sleep 0.2
done
[ $mounted = yes ] || { echo "virtiofs mount failed"; exit 1; }
echo BEGIN-TOP
ls -1 $S
echo END-TOP
# A hostile guest's ways out of the shared directory: each must come back empty-handed.
C=$S/containers
echo BEGIN-ESCAPE
cat $C/../../outside-secret $C/../outside-secret $C/../../../outside-secret 2>&1
for l in abs-link abs-link-reachable rel-link; do cat $C/$l 2>&1; done
ls -1a $C/.. $C/../.. 2>&1
ln $C/../../outside-secret $C/hard-up 2>&1 && cat $C/hard-up 2>&1
ln $C/abs-link $C/hard-abs 2>&1 && cat $C/hard-abs 2>&1
ln -s $C/../../outside-secret $C/guest-link 2>&1; cat $C/guest-link 2>&1
/lister --handles $C/handle-probe 2>&1
echo END-ESCAPE
for cid in ca cb; do
    R=/run/kata-containers/$cid/rootfs
    mkdir -p $R
    mount -t overlay overlay \
        -o lowerdir=$S/rafs/$cid/lowerdir,upperdir=$S/containers/$cid/snapshotdir/fs,workdir=$S/containers/$cid/snapshotdir/work,index=off \
        $R || { echo "overlay $cid failed"; dmesg | tail -n 5; exit 1; }
    echo BEGIN-RUN-$cid
    chroot $R /bin/busybox sh -c '/bin/busybox cat /etc/image; echo "written by '$cid'" > /out; echo changed > /etc/image; /bin/busybox cat /etc/image'
    echo END-RUN-$cid
    echo BEGIN-LOWER-$cid
    /bin/busybox cat $S/rafs/$cid/lowerdir/etc/image
    if echo x 2>/dev/null > $S/rafs/$cid/lowerdir/new; then echo "lower writable"; else echo "lower read-only"; fi
    if echo x 2>/dev/null >> $S/rafs/$cid/lowerdir/etc/image; then echo "lower file writable"; else echo "lower file read-only"; fi
    /bin/busybox cat $S/rafs/$cid/lowerdir/etc/image
    echo END-LOWER-$cid
done
# The node's Debian containers: the image's userland runs, the lower layer lists as the
# host's rootfs, a write goes to the upper dir.
debian() {
    R=/run/kata-containers/$1/rootfs
    mkdir -p $R
    mount -t overlay overlay \
        -o lowerdir=$S/rafs/$1/lowerdir,upperdir=$S/containers/$1/snapshotdir/fs,workdir=$S/containers/$1/snapshotdir/work,index=off \
        $R || { echo "overlay $1 failed"; dmesg | tail -n 5; exit 1; }
    echo BEGIN-DPKG-$1
    chroot $R /usr/bin/dpkg-query -W
    echo END-DPKG-$1
    chroot $R /bin/bash -c "echo written by $1 > /root/from-the-container"
    echo BEGIN-LISTING-$1
    /lister $S/rafs/$1/lowerdir
    echo END-LISTING-$1
    umount $R
}
#DEBIAN#
# Head-of-line blocking: a cold read whose chunk the host's disk stalls, and beside it, on the
# same request queue, a write to the passthrough share and a read the daemon has cached.
up() { cut -d' ' -f1 /proc/uptime; }
cat $S/rafs/cb/lowerdir/etc/image > /dev/null
echo 3 > /proc/sys/vm/drop_caches
t0=$(up)
( cat $S/rafs/ca/lowerdir/cold.bin > /tmp/cold; echo "cold $t0 $(up)" > /tmp/cold.time ) &
sleep 1
t1=$(up)
echo written > $S/containers/hol-write
cat $S/rafs/cb/lowerdir/etc/image > /tmp/warm
t2=$(up)
wait
echo BEGIN-HOL
echo "others $t1 $t2"
cat /tmp/cold.time
sha256sum /tmp/cold
cat /tmp/warm
echo END-HOL
# The agent tears the first container down, then the runtime DELETEs its image.
umount /run/kata-containers/ca/rootfs
echo done > $S/containers/ca-removed
n=0
while [ ! -e $S/containers/delete-done ]; do
    n=$((n + 1))
    [ $n -gt 1200 ] && { echo "no delete-done marker"; exit 1; }
    sleep 0.1
done
echo BEGIN-AFTER
ls -1 $S/rafs/ca
cat $S/rafs/ca/lowerdir/never-read-ca 2>&1 || echo "ca gone"
chroot /run/kata-containers/cb/rootfs /bin/busybox sh -c '/bin/busybox cat /never-read-cb /out'
echo END-AFTER
umount /run/kata-containers/cb/rootfs
umount $S
"#;

/// The lines of a section as printed (a lister line may end in a tab).
fn raw_section(log: &str, name: &str) -> Vec<String> {
    let begin = format!("BEGIN-{name}");
    let end = format!("END-{name}");
    log.lines()
        .skip_while(|l| l.trim() != begin)
        .skip(1)
        .take_while(|l| l.trim() != end)
        .map(str::to_owned)
        .collect()
}

/// What the node side needs besides the lister (a Debian rootfs, nydus-image, skopeo): the
/// rootfs, or `None` (a failure under CI) with the reason printed.
fn node_ready() -> Option<PathBuf> {
    require("skopeo", common::oci::have("skopeo"))?;
    common::nydus::require_nydus_image()?;
    require("Debian minbase rootfs", debian_rootfs("minbase"))
}

fn section(log: &str, name: &str) -> Vec<String> {
    let begin = format!("BEGIN-{name}");
    let end = format!("END-{name}");
    log.lines()
        .skip_while(|l| l.trim() != begin)
        .skip(1)
        .take_while(|l| l.trim() != end)
        .map(|l| l.trim_end().to_owned())
        .collect()
}

#[test]
fn kata_agent_builds_overlay_rootfs_on_skiff_and_survives_a_container_removal() {
    let Some(busybox) = require("QEMU microVM and busybox-static", vm_ready()) else {
        return;
    };
    // The slow disk under image ca's blobs is a FUSE mount.
    if !require_fuse() {
        return;
    }
    let dir = scratch();
    let images = [
        image(dir.path(), "ca", &busybox),
        image(dir.path(), "cb", &busybox),
    ];
    // Image ca's blobs go on the slow disk, which stalls the first chunk of cold.bin.
    let (stall, ca_blobs) = {
        let boot = skiff::format::Bootstrap::load(&images[0].0).expect("load ca");
        let ino = skiff::storage::prefetch::resolve(&boot, "cold.bin").expect("cold.bin");
        let first = boot.file_chunks(ino)[0];
        let offset = first.compressed_offset.get();
        let blob = boot.blobs()[first.blob_index.get() as usize];
        let stall = Stall {
            file: skiff::format::digest_hex(&blob.id),
            range: offset..offset + u64::from(first.compressed_size.get()),
            pause: STALL,
        };
        let slow = StallMount::start(&images[0].1, &dir.path().join("slow-blobs-ca"), stall);
        let path = slow.mountpoint.clone();
        (slow, path)
    };
    // The sandbox's shared directory, with the snapshotter's upper and work dirs.
    let shared = dir.path().join("shared");
    for cid in ["ca", "cb"] {
        for sub in ["fs", "work"] {
            fs::create_dir_all(shared.join(cid).join("snapshotdir").join(sub))
                .expect("snapshotdir");
        }
    }

    // Secrets outside the shared directory: one the daemon's sandbox reaches (the test's
    // scratch directory is bound in), one it does not. No way the guest has may show either.
    let secret = format!("SKIFF-OUTSIDE-SECRET-{}", std::process::id());
    fs::write(dir.path().join("outside-secret"), &secret).expect("secret");
    let far = tempfile::tempdir().expect("tempdir outside the sandbox");
    fs::write(far.path().join("outside-secret"), &secret).expect("far secret");
    std::os::unix::fs::symlink(far.path().join("outside-secret"), shared.join("abs-link"))
        .expect("abs-link");
    std::os::unix::fs::symlink(
        dir.path().join("outside-secret"),
        shared.join("abs-link-reachable"),
    )
    .expect("abs-link-reachable");
    std::os::unix::fs::symlink("../outside-secret", shared.join("rel-link")).expect("rel-link");
    fs::write(shared.join("handle-probe"), "inside the share\n").expect("handle-probe");
    // The escape probes run from it: never optional, unlike the node side.
    let lister = common::listing::lister().expect("the tree lister (guest/build-lister.sh)");

    // The node: Debian in a registry, mounted and read whole by the host daemon.
    let node = node_ready().map(|rootfs| {
        let side = kata::node::start(&dir.path().join("n"), &rootfs, &lister);
        for img in &side.images {
            for sub in ["fs", "work"] {
                fs::create_dir_all(shared.join(img.cid).join("snapshotdir").join(sub))
                    .expect("snapshotdir");
            }
        }
        (side, rootfs)
    });
    let sandbox_from = node.as_ref().map(|(n, _)| n.reg.log_len());

    let d = KataDaemon::start(Runtime::Go, &dir.path().join("sandbox"));
    let ready = d.wait_running();
    eprintln!("time to RUNNING: {ready:?}");
    let (s, b) = mount(
        &d.api,
        "/containers",
        &mount_body("passthrough_fs", &shared, ""),
    );
    assert_eq!(s, 204, "{b}");
    for (cid, (bootstrap, blobs)) in ["ca", "cb"].iter().zip(&images) {
        let blobs = if *cid == "ca" { &ca_blobs } else { blobs };
        let (s, b) = mount(
            &d.api,
            &rafs_mountpoint(cid),
            &mount_body("rafs", bootstrap, &nydusd_config(blobs)),
        );
        assert_eq!(s, 204, "{cid}: {b}");
    }
    // The node's images: the bootstrap the snapshotter unpacked and the config it wrote.
    for img in node.iter().flat_map(|(n, _)| &n.images) {
        let (s, b) = mount(
            &d.api,
            &rafs_mountpoint(img.cid),
            &mount_body("rafs", &img.bootstrap, &img.config),
        );
        assert_eq!(s, 204, "{}: {b}\n{}", img.cid, d.log_text());
    }

    // Boot the VM in the background; the host plays the runtime meanwhile.
    let script = dir.path().join("guest.sh");
    let debian_calls: String = node
        .iter()
        .flat_map(|(n, _)| &n.images)
        .map(|img| format!("debian {}\n", img.cid))
        .collect();
    fs::write(&script, GUEST.replace("#DEBIAN#\n", &debian_calls)).expect("guest script");
    let serial = dir.path().join("serial.log");
    let mut vm = Command::new(repo().join("scripts/vm-run.sh"))
        .arg("--socket")
        .arg(&d.vhost)
        .args([
            "--tag",
            "kataShared",
            "--append",
            "skiff.mount=0",
            "--timeout",
            "400",
            "-q",
        ])
        .arg("--test-script")
        .arg(&script)
        .arg("--serial-log")
        .arg(&serial)
        .arg("--guest-file")
        .arg(format!("{}:/lister", lister.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting vm-run.sh");
    let serial_text =
        || String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).replace('\r', "");

    let marker = shared.join("ca-removed");
    let deadline = Instant::now() + Duration::from_secs(400);
    let mut deleted = false;
    while Instant::now() < deadline {
        if marker.exists() {
            let (s, b) = umount(&d.api, &rafs_mountpoint("ca"));
            assert_eq!(s, 204, "DELETE while the VM runs: {b}");
            fs::write(shared.join("delete-done"), b"").expect("delete-done marker");
            deleted = true;
            break;
        }
        if matches!(vm.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The daemon ran the whole guest confined: each of its threads, of every kind.
    let pid = d.pid().expect("daemon pid");
    let names = assert_confined(
        pid,
        VIRTIOFS_CAPS,
        &[
            "skiff-vhost",
            "skiff-api",
            "skiff-worker",
            "skiff-spawner",
            "vring_worker",
        ],
    );
    eprintln!("confined threads of skiff virtiofs: {names:?}");
    let out = vm.wait_with_output().expect("vm-run.sh");
    let log = serial_text();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}", stderr.lines().last().unwrap_or(""));
    assert!(
        out.status.success() && deleted,
        "guest failed ({}, deleted={deleted}):\n{stderr}\n--- serial ---\n{}\n--- daemon ---\n{}",
        out.status,
        log.lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        d.log_text()
    );

    assert_eq!(section(&log, "TOP"), ["containers", "rafs"]);
    let escape = section(&log, "ESCAPE");
    eprintln!("escape attempts from the guest: {escape:?}");
    assert!(
        !escape.iter().any(|l| l.contains(&secret)),
        "the guest reached a file outside the shared directory: {escape:?}"
    );
    assert!(
        escape.iter().any(|l| l.starts_with("HANDLE ")),
        "the handle probe did not run: {escape:?}"
    );
    // What a forged handle opened, if anything, is a file of the share.
    for l in escape
        .iter()
        .filter(|l| l.starts_with("HANDLE forged ") && l.contains("opened:"))
    {
        let what = l.split("opened: ").nth(1).unwrap_or_default();
        assert!(!what.contains("SKIFF-OUTSIDE"), "{l}");
    }
    // The share itself is untouched by the attempts but for what the guest may create.
    assert!(!shared.join("hard-up").exists(), "{escape:?}");
    for cid in ["ca", "cb"] {
        assert_eq!(
            section(&log, &format!("RUN-{cid}")),
            [format!("image {cid}"), "changed".to_string()],
            "container {cid} runs from its image and writes through the overlay"
        );
        assert_eq!(
            section(&log, &format!("LOWER-{cid}")),
            [
                format!("image {cid}"),
                "lower read-only".to_string(),
                "lower file read-only".to_string(),
                format!("image {cid}"),
            ],
            "the RAFS lower layer of {cid} is unchanged and read-only"
        );
        // What the container wrote is on the host, in the upper layer.
        let upper = shared.join(cid).join("snapshotdir/fs");
        assert_eq!(
            fs::read_to_string(upper.join("out")).ok().as_deref(),
            Some(format!("written by {cid}\n").as_str())
        );
        assert_eq!(
            fs::read_to_string(upper.join("etc/image")).ok().as_deref(),
            Some("changed\n")
        );
    }
    // No head-of-line blocking: the write and the cached read, started 1 s into the cold
    // read, were done well before its stall ended; the cold read took the whole stall, and
    // every byte is right.
    let hol = section(&log, "HOL");
    eprintln!("head-of-line check in the guest: {hol:?}");
    let times = |prefix: &str| -> (f64, f64) {
        let line = hol
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {hol:?}"));
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|t| t.parse().expect("uptime"))
            .collect();
        (v[0], v[1])
    };
    let (cold_start, cold_end) = times("cold ");
    let (others_start, others_end) = times("others ");
    assert!(
        cold_end - cold_start >= STALL.as_secs_f64() * 0.9,
        "the cold read did not wait for the stall: {hol:?}"
    );
    assert!(
        others_end - others_start < STALL.as_secs_f64() / 2.5,
        "the write and the cached read waited behind the cold read: {hol:?}"
    );
    assert!(others_end < cold_end, "{hol:?}");
    let cold_sum = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(cold_content()))
    };
    assert!(
        hol.iter().any(|l| l.starts_with(&cold_sum)),
        "cold.bin read in the guest differs from its source: {hol:?}"
    );
    assert!(hol.iter().any(|l| l == "image cb"), "{hol:?}");
    assert_eq!(
        fs::read_to_string(shared.join("hol-write")).ok().as_deref(),
        Some("written\n")
    );
    assert!(
        stall.stalled.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the slow disk never stalled"
    );

    let after = section(&log, "AFTER");
    eprintln!("after DELETE, the guest saw: {after:?}");
    assert!(
        !after.iter().any(|l| l == "lowerdir"),
        "ca's lowerdir still listed after DELETE: {after:?}"
    );
    assert!(
        after.iter().any(|l| l == "ca gone"),
        "ca still readable after DELETE: {after:?}"
    );
    assert!(
        after.ends_with(&["cb".to_string(), "written by cb".to_string()]),
        "cb stopped working after ca was removed: {after:?}"
    );
    if let Some((side, rootfs)) = node {
        check_node_containers(&log, side, &rootfs, &lister, &shared, sandbox_from, &d);
    }
    assert_running_and_stop(d);
}

/// The node's Debian containers in the guest: their package lists and listings equal the
/// host's rootfs, their writes are in the upper dirs, the sandbox daemon fetched nothing from
/// the registry, and it takes `PUT /api/v1/config` with new credentials for their id.
fn check_node_containers(
    log: &str,
    side: kata::node::NodeSide,
    rootfs: &Path,
    lister: &Path,
    shared: &Path,
    sandbox_from: Option<usize>,
    d: &KataDaemon,
) {
    let host = Command::new("dpkg-query")
        .arg(format!("--admindir={}/var/lib/dpkg", rootfs.display()))
        .arg("-W")
        .output()
        .expect("dpkg-query on the host");
    let host: Vec<String> = String::from_utf8_lossy(&host.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(host.len() > 50, "{} packages on the host", host.len());
    let host_list = common::listing::host_listing(lister, rootfs);
    for img in &side.images {
        assert_eq!(
            section(log, &format!("DPKG-{}", img.cid)),
            host,
            "{}: dpkg-query -W in the container",
            img.cid
        );
        let guest = raw_section(log, &format!("LISTING-{}", img.cid));
        if img.v6 {
            use common::listing::without_unpreserved_v6_tar_fields as v6;
            common::listing::assert_same_listing(&v6(&host_list), &v6(&guest));
        } else {
            // Converted from a tar layer, which carries no directory sizes.
            use common::listing::without_dir_sizes as tar;
            common::listing::assert_same_listing(&tar(&host_list), &tar(&guest));
        }
        let upper = shared.join(img.cid).join("snapshotdir/fs");
        assert_eq!(
            fs::read_to_string(upper.join("root/from-the-container"))
                .ok()
                .as_deref(),
            Some(format!("written by {}\n", img.cid).as_str()),
            "the container's write is in its upper dir"
        );
    }
    let gets = side.reg.blob_gets(sandbox_from.unwrap_or(0));
    let sandbox_bytes: u64 = gets.iter().map(|g| g.bytes).sum();
    eprintln!(
        "node: the host daemon fetched {} bytes in {} blob GETs; the sandbox daemon {sandbox_bytes} \
         bytes in {} GETs for the same two images",
        side.host_bytes,
        side.host_gets,
        gets.len()
    );
    assert!(side.host_bytes > 10 << 20, "{}", side.host_bytes);
    assert_eq!(
        sandbox_bytes,
        0,
        "chunks in the node's cache cost the sandbox daemon registry bytes\n{}",
        d.log_text()
    );
    // Credential renewal on the sandbox daemon: by the config's id, for each image.
    let renewed = serde_json::json!({"registry_auth": kata::node::auth_of("kata:rotated-pw")});
    for img in &side.images {
        let (s, b) = http(
            &d.api,
            "PUT",
            &format!("/api/v1/config?id=%2F{}", img.sid),
            Some(renewed.to_string().as_bytes()),
        )
        .expect("PUT config");
        assert_eq!(s, 204, "{}", String::from_utf8_lossy(&b));
    }
    let (s, b) = http(
        &d.api,
        "PUT",
        "/api/v1/config?id=%2Fnot-mounted",
        Some(renewed.to_string().as_bytes()),
    )
    .expect("PUT config");
    assert_eq!(s, 404, "{}", String::from_utf8_lossy(&b));
    let mut host = side.host;
    let log = host.log_text();
    let st = host.terminate();
    assert!(st.success(), "host daemon: {st}\n{log}");
}

fn assert_running_and_stop(d: KataDaemon) {
    assert_eq!(daemon_info(&d.api)["state"], "RUNNING");
    d.stop();
}

/// Mount and unmount cycles in one running guest, in rounds of this many containers.
const CYCLE_ROUND: usize = 10;
/// Rounds: 30 rounds of 10 are 300 cycles, past the 255 mounts after which a Vfs gives an
/// earlier image's index (and so its node ids) to a new one.
const CYCLE_ROUNDS: usize = 30;

/// The guest side of the long-lived sandbox: for each round the host announces (a file
/// naming its containers), read every container's files, write what was read, go on.
const CYCLES_GUEST: &str = r#"
S=/run/kata-containers/shared
mkdir -p $S
mounted=no
for i in 1 2 3 4 5 6 7 8 9 10; do
    if mount -t virtiofs kataShared $S; then mounted=yes; break; fi
    sleep 0.2
done
[ $mounted = yes ] || { echo "virtiofs mount failed"; exit 1; }
C=$S/containers
r=0
while :; do
    n=0
    while [ ! -e $C/round-$r ] && [ ! -e $C/finished ]; do
        n=$((n + 1))
        [ $n -gt 6000 ] && { echo "no round $r from the host"; exit 1; }
        usleep 20000
    done
    [ -e $C/round-$r ] || break
    for cid in $(cat $C/round-$r); do
        L=$S/rafs/$cid/lowerdir
        echo "$cid $(ls $L | tr '\n' ,) $(cat $L/id) $(tail -c 11 $L/data)"
    done > $C/seen-$r.tmp
    mv $C/seen-$r.tmp $C/seen-$r
    r=$((r + 1))
done
echo "rounds $r"
umount $S
"#;

#[test]
fn three_hundred_mount_cycles_of_different_images_in_one_guest_on_qemu_10_serve_the_right_files() {
    let Some(busybox) = require("QEMU microVM and busybox-static", vm_ready()) else {
        return;
    };
    let _ = busybox;
    // The long-lived guest runs on the second VMM version, QEMU 10 (the other test of this
    // file runs on the system's 7.2).
    let Some(qemu10) = require("QEMU 10 (scripts/install-qemu10.sh)", qemu10()) else {
        return;
    };
    let dir = scratch();
    let total = CYCLE_ROUND * CYCLE_ROUNDS;
    // 300 small images, each its own: a file naming it and a page of data naming it too. In
    // every image the files have the same inode numbers (root 1, then data and id), the same
    // sizes and the same mtime: nothing but the node id's generation tells the guest's kernel
    // that a file it cached from an earlier image is not this one.
    let blobs = dir.path().join("blobs");
    let images: Vec<PathBuf> = (0..total)
        .map(|i| {
            let src = dir.path().join(format!("src-{i}"));
            fs::create_dir_all(&src).expect("mkdir");
            let name = format!("image-{i:04}\n");
            fs::write(src.join("id"), &name).expect("id");
            fs::write(src.join("data"), name.repeat(4096 / name.len())).expect("data");
            for f in ["id", "data"] {
                let when = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
                fs::File::options()
                    .write(true)
                    .open(src.join(f))
                    .and_then(|file| file.set_modified(when))
                    .expect("mtime");
            }
            let bootstrap = dir.path().join(format!("image-{i}.boot"));
            skiff_ok([
                OsStr::new("build"),
                src.as_os_str(),
                OsStr::new("--bootstrap"),
                bootstrap.as_os_str(),
                OsStr::new("--blob-dir"),
                blobs.as_os_str(),
            ]);
            bootstrap
        })
        .collect();
    let shared = dir.path().join("shared");
    fs::create_dir_all(&shared).expect("shared");

    let d = KataDaemon::start(Runtime::Go, &dir.path().join("sandbox"));
    d.wait_running();
    let (s, b) = mount(
        &d.api,
        "/containers",
        &mount_body("passthrough_fs", &shared, ""),
    );
    assert_eq!(s, 204, "{b}");
    let script = dir.path().join("guest.sh");
    fs::write(&script, CYCLES_GUEST).expect("guest script");
    let serial = dir.path().join("serial.log");
    let mut vm = Command::new(repo().join("scripts/vm-run.sh"))
        .arg("--socket")
        .arg(&d.vhost)
        .env("SKIFF_QEMU", &qemu10)
        .args([
            "--tag",
            "kataShared",
            "--append",
            "skiff.mount=0",
            "--timeout",
            "600",
            "-q",
        ])
        .arg("--test-script")
        .arg(&script)
        .arg("--serial-log")
        .arg(&serial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting vm-run.sh");
    let serial_text =
        || String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).replace('\r', "");
    let config = nydusd_config(&blobs);
    let started = Instant::now();
    for round in 0..CYCLE_ROUNDS {
        let cids: Vec<String> = (0..CYCLE_ROUND)
            .map(|j| format!("c{}", round * CYCLE_ROUND + j))
            .collect();
        for (j, cid) in cids.iter().enumerate() {
            let image = &images[round * CYCLE_ROUND + j];
            let (s, b) = mount(
                &d.api,
                &rafs_mountpoint(cid),
                &mount_body("rafs", image, &config),
            );
            assert_eq!(s, 204, "mount {cid}: {b}");
        }
        let announce = shared.join(format!("round-{round}"));
        fs::write(announce.with_extension("tmp"), cids.join("\n")).expect("round");
        fs::rename(announce.with_extension("tmp"), &announce).expect("round");
        let seen = shared.join(format!("seen-{round}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !seen.exists() {
            assert!(
                Instant::now() < deadline && matches!(vm.try_wait(), Ok(None)),
                "the guest did not finish round {round}\n--- serial ---\n{}\n--- daemon ---\n{}",
                serial_text(),
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let lines: Vec<String> = fs::read_to_string(&seen)
            .expect("seen")
            .lines()
            .map(str::to_owned)
            .collect();
        let want: Vec<String> = cids
            .iter()
            .enumerate()
            .map(|(j, cid)| {
                let i = round * CYCLE_ROUND + j;
                format!("{cid} data,id, image-{i:04} image-{i:04}")
            })
            .collect();
        assert_eq!(
            lines, want,
            "round {round}: the guest read other files than mounted"
        );
        for cid in &cids {
            let (s, b) = umount(&d.api, &rafs_mountpoint(cid));
            assert_eq!(s, 204, "umount {cid}: {b}");
        }
    }
    fs::write(shared.join("finished"), b"").expect("finished");
    let out = vm.wait_with_output().expect("vm-run.sh");
    let log = serial_text();
    assert!(
        out.status.success() && log.contains(&format!("rounds {CYCLE_ROUNDS}")),
        "guest failed ({}):\n{}\n--- serial ---\n{log}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{total} mount/unmount cycles, each read from the guest, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let info = daemon_info(&d.api);
    assert_eq!(info["state"], "RUNNING");
    assert_eq!(
        info["mounts"].as_object().map(|m| m.len()),
        Some(1),
        "only the passthrough is left: {info}"
    );
    d.stop();
}
