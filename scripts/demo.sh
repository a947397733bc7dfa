#!/usr/bin/env bash
# The Skiff demo, from a fresh machine: a container image lazily loaded into a Kata microVM, on
# the path Kata Containers takes. A local registry (Debian's docker-registry, htpasswd) gets a
# Debian image; `skiff convert` converts it into a Skiff image in the same registry; the sandbox
# daemon (`skiff virtiofs`) is started and driven over its API as Kata's runtime does; a microVM
# boots and its guest does what the Kata agent does, then runs commands from the image, whose
# chunks are fetched from the registry as they are read. At the end: image sizes, bytes fetched
# and the time to the container's first output, next to a full pull of the same image.
#
# Usage: scripts/demo.sh      (as root; work files stay in ${SKIFF_CACHE:-/var/cache/skiff}/demo)
#        SKIFF_DEMO_PORT=N    the registry's port (default: the first free one from 5100)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
[[ $(id -u) -eq 0 ]] || { echo "demo: run as root (it installs packages and boots a microVM)" >&2; exit 1; }
cache=${SKIFF_CACHE:-/var/cache/skiff}
work="$cache/demo"
user=demo
pass=demo-pw-$RANDOM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f s", b - a }'; }
msecs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f ms", (b - a) * 1000 }'; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

step "Installing prerequisites (idempotent)"
"$repo/scripts/install-deps.sh"
cargo build --locked --release --manifest-path "$repo/Cargo.toml"
skiff="$repo/target/release/skiff"

step "A Debian bookworm minbase root filesystem (debootstrap, cached)"
rootfs=$("$repo/scripts/make-rootfs.sh" minbase)
echo "$rootfs: $(du -sh "$rootfs" | cut -f1), $(find "$rootfs" | wc -l) entries"

rm -rf "$work"
mkdir -p "$work"
daemon_pid=
watcher=
cleanup() {
    [[ -n $daemon_pid ]] && kill -TERM "$daemon_pid" 2>/dev/null || true
    [[ -n $watcher ]] && kill "$watcher" 2>/dev/null || true
    SKIFF_REGISTRY_RUN="$work/registry" "$repo/scripts/registry.sh" stop --name skiff-demo \
        >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "A local registry: Debian's docker-registry with htpasswd (scripts/registry.sh)"
port=${SKIFF_DEMO_PORT:-}
if [[ -z $port ]]; then
    for p in $(seq 5100 5199); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
    done
fi
[[ -n $port ]] || { echo "demo: no free port in 5100-5199; set SKIFF_DEMO_PORT" >&2; exit 1; }
export SKIFF_REGISTRY_RUN="$work/registry"
addr=$("$repo/scripts/registry.sh" start --name skiff-demo --port "$port" --htpasswd "$user:$pass")
reglog="$SKIFF_REGISTRY_RUN/skiff-demo/registry.log"
echo "registry at $addr (user $user), access log $reglog"
# Bytes the registry sent in blob GETs after byte $1 of its access log.
blob_bytes() {
    tail -c +"$(( $1 + 1 ))" "$reglog" | awk '
        /"GET \/v2\/[^"]*\/blobs\// { split($0, a, "\" "); split(a[2], f, " "); s += f[2] }
        END { print s + 0 }'
}
logpos() { stat -c %s "$reglog"; }

step "The source image: the rootfs as an ordinary OCI image (one gzip layer), pushed with skopeo"
src="$work/source"
mkdir -p "$src/blobs/sha256"
tar --format=posix --numeric-owner --xattrs --xattrs-include='*' -C "$rootfs" -cf "$work/layer.tar" . 2>/dev/null
diff_id=$(sha "$work/layer.tar")
gzip -c "$work/layer.tar" >"$work/layer.tar.gz"
rm -f "$work/layer.tar"
layer=$(sha "$work/layer.tar.gz")
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$src/blobs/sha256/$layer"
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/bash"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$diff_id" >"$work/config.json"
config=$(sha "$work/config.json")
config_size=$(stat -c %s "$work/config.json")
mv "$work/config.json" "$src/blobs/sha256/$config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
manifest=$(sha "$work/manifest.json")
manifest_size=$(stat -c %s "$work/manifest.json")
mv "$work/manifest.json" "$src/blobs/sha256/$manifest"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"12"}}]}' \
    "$manifest" "$manifest_size" >"$src/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$src/oci-layout"
skopeo copy --quiet --dest-creds "$user:$pass" --dest-tls-verify=false \
    "oci:$src:12" "docker://$addr/demo/debian:12"
echo "pushed $addr/demo/debian:12: one layer of $(mib "$layer_size")"

step "skiff convert: the image into a Skiff image in the same registry"
"$skiff" convert --source "$addr/demo/debian:12" --target "$addr/demo/debian:12-skiff" \
    --registry-auth "$user:$pass"
skiff_manifest=$(curl -sf -u "$user:$pass" \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$addr/v2/demo/debian/manifests/12-skiff")
# The layers' sizes and digests, in order (the config's come first in the manifest).
sizes=($(grep -o '"size": *[0-9]*' <<<"$skiff_manifest" | tr -dc '0-9\n'))
digests=($(grep -o '"digest": *"sha256:[0-9a-f]*"' <<<"$skiff_manifest" | grep -o 'sha256:[0-9a-f]*'))
[[ ${#sizes[@]} -ge 3 && ${#digests[@]} -eq ${#sizes[@]} ]] || {
    echo "demo: unexpected manifest: $skiff_manifest" >&2; exit 1; }
boot_digest=${digests[-1]}
boot_size=${sizes[-1]}
blobs_size=0
for s in "${sizes[@]:1:${#sizes[@]}-2}"; do blobs_size=$((blobs_size + s)); done
echo "Skiff image: blobs $(mib "$blobs_size") + bootstrap layer $(mib "$boot_size")"

step "What nydus-snapshotter does for Kata: unpack the bootstrap layer, write the nydusd config"
snap="$work/snapshot"
mkdir -p "$snap/fs" "$work/node-cache"
pos=$(logpos)
curl -sf -u "$user:$pass" "http://$addr/v2/demo/debian/blobs/$boot_digest" | tar -xzf - -C "$snap/fs"
boot_fetched=$(blob_bytes "$pos")
bootstrap="$snap/fs/image/image.boot"
ls -l "$bootstrap"
auth=$(printf '%s' "$user:$pass" | base64 -w0)
# The snapshotter's stock fusedev config, filled in as it fills it in; prefetch off, so that the
# figures below are what the container itself reads.
nydusd_config=$(printf '{"device":{"id":"/1","backend":{"type":"registry","config":{"readahead":false,"host":"%s","repo":"demo/debian","auth":"%s","proxy":{"fallback":false},"timeout":5,"connect_timeout":5,"retry_limit":2}},"cache":{"type":"blobcache","config":{"work_dir":"%s","disable_indexed_map":false}}},"mode":"direct","digest_validate":false,"enable_xattr":true,"amplify_io":1048576,"fs_prefetch":{"enable":false}}' \
    "$addr" "$auth" "$work/node-cache")
echo "${nydusd_config//$auth/<base64 $user:***>}"

step "Kata's sandbox daemon: skiff virtiofs, started and driven as Kata's Go runtime does"
sandbox="$work/sandbox"
shared="$sandbox/shared"
mkdir -p "$shared/demo/snapshotdir/fs" "$shared/demo/snapshotdir/work"
api="$sandbox/nydusd-api.sock"
t0=$(now)
pos=$(logpos)
# The daemon runs in its sandbox (on by default), which reaches the snapshotter's default root
# (/var/lib/containerd-nydus) but not this demo's stand-in for it under $work: an operator
# whose snapshotter root or cache lives elsewhere names them with --sandbox-path, as here.
"$skiff" virtiofs --log-level info --apisock "$api" --sock "$sandbox/vhost-fs.sock" \
    --sandbox-path "$snap" --sandbox-path "$work/node-cache" \
    --thread-pool-size=1 --announce-submounts 2>"$sandbox/daemon.log" &
daemon_pid=$!
# Kata's API call: prints the answer and its status; any status but 2xx ends the demo.
call() {
    local out
    out=$(curl -sS --unix-socket "$api" -X "$1" "http://localhost$2" ${3:+-d "$3"} -w ' %{http_code}')
    echo "$out"
    [[ $out =~ \ 2[0-9][0-9]$ ]] || { echo "demo: $1 $2 was refused" >&2; cat "$sandbox/daemon.log" >&2; return 1; }
}
state=
for _ in $(seq 100); do
    state=$(curl -s --unix-socket "$api" http://localhost/api/v1/daemon 2>/dev/null | grep -o '"state":"[A-Z]*"' || true)
    [[ $state == '"state":"RUNNING"' ]] && break
    sleep 0.02
done
[[ $state == '"state":"RUNNING"' ]] || { cat "$sandbox/daemon.log"; exit 1; }
echo "GET /api/v1/daemon: $state $(msecs "$t0" "$(now)") after the start"
answer=$(call POST '/api/v1/mount?mountpoint=/containers' "{\"fs_type\":\"passthrough_fs\",\"source\":\"$shared\",\"config\":\"\"}")
echo "POST /api/v1/mount?mountpoint=/containers (passthrough_fs): $answer"
answer=$(call POST '/api/v1/mount?mountpoint=/rafs/demo/lowerdir' "{\"fs_type\":\"rafs\",\"source\":\"$bootstrap\",\"config\":\"${nydusd_config//\"/\\\"}\"}")
echo "POST /api/v1/mount?mountpoint=/rafs/demo/lowerdir (rafs, the snapshotter's config): $answer"

step "The microVM boots; its guest does what the Kata agent does, then runs the container's commands"
cat >"$work/guest.sh" <<'EOF'
S=/run/kata-containers/shared
R=/run/kata-containers/demo/rootfs
up() { cut -d' ' -f1 /proc/uptime; }
t0=$(up)
mkdir -p $S $R
mount -t virtiofs kataShared $S
mount -t overlay overlay -o lowerdir=$S/rafs/demo/lowerdir,upperdir=$S/containers/demo/snapshotdir/fs,workdir=$S/containers/demo/snapshotdir/work,index=off $R
out=$(chroot $R /bin/bash -c 'echo "hello from $(. /etc/os-release; echo $PRETTY_NAME), bash $BASH_VERSION"')
t1=$(up)
echo "DEMO $out"
echo "DEMO-TIME $t0 $t1"
echo "DEMO-MORE $(chroot $R /usr/bin/dpkg-query -W | wc -l) packages; $(chroot $R /usr/bin/perl -e 'print "perl $^V"')"
chroot $R /bin/bash -c 'echo "written in the container" > /root/hello'
umount $R
umount $S
EOF
serial="$work/serial.log"
: >"$serial"
(
    until grep -q '^DEMO ' "$serial" 2>/dev/null; do sleep 0.05; done
    echo "$(now) $(logpos)" >"$work/first-output"
) &
watcher=$!
vm_out=$("$repo/scripts/vm-run.sh" --socket "$sandbox/vhost-fs.sock" --tag kataShared \
    --append skiff.mount=0 --test-script "$work/guest.sh" --serial-log "$serial" --timeout 300 -q 2>&1) || {
    echo "$vm_out"; tail -n 40 "$serial"; exit 1; }
# The container's first output must be there: a guest that could not mount or run gives none.
grep -q '^DEMO hello from' <(tr -d '\r' <"$serial") || {
    echo "demo: the container printed nothing"; tail -n 40 "$serial"; exit 1; }
wait "$watcher" || true
watcher=
read -r _ pos_first <"$work/first-output"
tr -d '\r' <"$serial" | grep '^DEMO' | grep -v '^DEMO-TIME' | sed 's/^DEMO[-A-Z]* /  guest: /'
read -r g0 g1 < <(tr -d '\r' <"$serial" | grep '^DEMO-TIME' | cut -d' ' -f2-)
echo "  host: the container's write is in its upper dir: $(cat "$shared/demo/snapshotdir/fs/root/hello")"
echo "  $(grep '^vm-run:' <<<"$vm_out" | tail -n 1)"
lazy_first=$(tail -c +"$(( pos + 1 ))" "$reglog" | head -c "$(( pos_first - pos ))" | awk '
    /"GET \/v2\/[^"]*\/blobs\// { split($0, a, "\" "); split(a[2], f, " "); s += f[2] }
    END { print s + 0 }')
lazy_all=$(blob_bytes "$pos")
kill -TERM "$daemon_pid"
wait "$daemon_pid" || { cat "$sandbox/daemon.log"; exit 1; }
daemon_pid=

step "For comparison: a full pull of the same image (download and unpack, before any container can start)"
t1=$(now)
pos=$(logpos)
skopeo copy --quiet --src-creds "$user:$pass" --src-tls-verify=false \
    "docker://$addr/demo/debian:12" "oci:$work/pulled:12"
mkdir -p "$work/unpacked"
tar -xzf "$work/pulled/blobs/sha256/$layer" -C "$work/unpacked"
t2=$(now)
full_bytes=$(blob_bytes "$pos")
echo "pulled and unpacked in $(secs "$t1" "$t2"): $(find "$work/unpacked" | wc -l) entries"

step "Summary"
printf '  %-44s %s\n' \
    "source image (one gzip layer)" "$(mib "$layer_size")" \
    "Skiff image (blobs + bootstrap layer)" "$(mib $((blobs_size + boot_size)))" \
    "lazy: bootstrap layer (the snapshotter)" "$(mib "$boot_fetched")" \
    "lazy: chunks fetched to the first output" "$(mib "$lazy_first")" \
    "lazy: chunks fetched by all the commands" "$(mib "$lazy_all")" \
    "lazy: share mounted to first output" "$(secs "$g0" "$g1") (in the guest, at uptime $(secs 0 "$g1"))" \
    "full pull: bytes" "$(mib "$full_bytes")" \
    "full pull: download and unpack" "$(secs "$t1" "$t2") (no container started yet)"
echo
echo "The registry is on loopback and the VM runs under TCG emulation here: with a real network"
echo "between node and registry, the bytes are what changes: a full pull moves the whole image"
echo "before the container starts, lazy loading what the container reads."
echo "Work files (image, logs, serial console) are in $work"
