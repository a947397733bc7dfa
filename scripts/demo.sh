#!/usr/bin/env bash
# The Skiff demo, from a fresh machine: install what is needed, build an image of a Debian root
# filesystem, check it, mount it on the host over FUSE, then serve it to a booted microVM that
# runs the container userland straight from the image.
#
# Usage: scripts/demo.sh      (the image stays in ${SKIFF_CACHE:-/var/cache/skiff}/demo)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cache=${SKIFF_CACHE:-/var/cache/skiff}
work="$cache/demo"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Installing prerequisites (idempotent)"
"$repo/scripts/install-deps.sh"
cargo build --locked --release --manifest-path "$repo/Cargo.toml"
skiff="$repo/target/release/skiff"

step "A Debian bookworm minbase root filesystem (debootstrap, cached)"
rootfs=$("$repo/scripts/make-rootfs.sh" minbase)
echo "$rootfs: $(du -sh "$rootfs" | cut -f1), $(find "$rootfs" | wc -l) entries"

step "skiff build: the directory becomes a bootstrap (metadata, Merkle tree) and a blob (chunks)"
rm -rf "$work"
mkdir -p "$work"
"$skiff" build "$rootfs" --bootstrap "$work/debian.boot" --blob-dir "$work/blobs"

step "skiff check: every chunk verified, and the image compared with its source"
"$skiff" check --bootstrap "$work/debian.boot" --blob-dir "$work/blobs" --source "$rootfs"

step "skiff mount: the image on the host over /dev/fuse"
mkdir -p "$work/mnt"
"$skiff" mount --bootstrap "$work/debian.boot" --blob-dir "$work/blobs" "$work/mnt" \
    2>"$work/mount.log" &
mount_pid=$!
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
mountpoint -q "$work/mnt" || { cat "$work/mount.log"; exit 1; }
ls -l "$work/mnt"
echo "os-release: $(grep PRETTY_NAME "$work/mnt/etc/os-release")"
echo "a write:    $(touch "$work/mnt/new" 2>&1 || true)"
kill -TERM "$mount_pid"
wait "$mount_pid"

step "skiff serve: a vhost-user-fs device; QEMU boots a microVM that mounts it with virtiofs"
sock="$work/vfs.sock"
"$skiff" serve --bootstrap "$work/debian.boot" --blob-dir "$work/blobs" --socket "$sock" \
    --tag skiff 2>"$work/serve.log" &
serve_pid=$!
trap 'kill -TERM "$serve_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
cat >"$work/guest-test.sh" <<'EOF'
echo "--- in the guest: $(uname -sr), rootfs from Skiff over virtio-fs at $SKIFF_MNT"
mount | grep virtiofs
chroot "$SKIFF_MNT" /bin/bash -c 'echo "bash $BASH_VERSION says hello from $(. /etc/os-release; echo $PRETTY_NAME)"'
echo "packages: $(chroot "$SKIFF_MNT" /usr/bin/dpkg-query -W | wc -l)"
chroot "$SKIFF_MNT" /bin/ls --color=never /usr/bin | head -5
EOF
"$repo/scripts/vm-run.sh" --socket "$sock" --tag skiff --test-script "$work/guest-test.sh" \
    --timeout 300
kill -TERM "$serve_pid"
wait "$serve_pid" || true
trap - EXIT
echo
grep -E "VMM (connected|disconnected)" "$work/serve.log" || true
step "Done. The image is in $work"
