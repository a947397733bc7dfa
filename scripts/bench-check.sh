#!/usr/bin/env bash
# `skiff check --source --target` next to `skiff convert` on the same image in one run: Debian
# minbase as a one-layer OCI image (GNU tar, pax with xattrs, gzip -1) in a local
# docker-registry with htpasswd, pushed by skopeo. Per run: a cold convert (to a new repository,
# so no blob is there yet), a full check, and a check --no-data; wall time, peak RSS and bytes
# fetched from each side. Medians of --runs runs (default 3).
#
# Usage: scripts/bench-check.sh [--runs N]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=3
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs=$2; shift ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
"$repo/scripts/install-deps.sh" >&2
cargo build --locked --release --quiet --manifest-path "$repo/Cargo.toml"
skiff="$repo/target/release/skiff"
rootfs=$("$repo/scripts/make-rootfs.sh" minbase | tail -n 1)
work=$(mktemp -d /var/tmp/skiff-bench-check.XXXXXX)
export SKIFF_REGISTRY_RUN="$work/registry"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
addr=$("$repo/scripts/registry.sh" start --name bench-check --port "$port" --htpasswd bench:bench)
trap '"$repo/scripts/registry.sh" stop --name bench-check; rm -rf "$work"' EXIT

tar --format=posix --numeric-owner --xattrs --xattrs-include='*' -C "$rootfs" -cf - . 2>/dev/null |
    gzip -1 > "$work/layer.tar.gz"
python3 - "$work" <<'PY'
import gzip, hashlib, json, os, sys
work = sys.argv[1]
layout = os.path.join(work, "layout")
blobs = os.path.join(layout, "blobs", "sha256")
os.makedirs(blobs)
def put(data):
    h = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, h), "wb") as f:
        f.write(data)
    return "sha256:" + h
layer = open(os.path.join(work, "layer.tar.gz"), "rb").read()
diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
config = json.dumps({"architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(layer), "size": len(layer)}]}).encode()
with open(os.path.join(layout, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion":"1.0.0"}')
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest), "size": len(manifest)}]}, f)
PY
src="$addr/debian/minbase:12"
skopeo copy -q --dest-tls-verify=false --dest-creds bench:bench "oci:$work/layout" "docker://$src"

# One timed command: prints "seconds max_rss_kib".
timed() {
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/out" 2>&1 || { cat "$work/out" >&2; exit 1; }
    cat "$work/time"
}
rows=()
for i in $(seq "$runs"); do
    tgt="$addr/debian/run$i:12-skiff"
    c=$(timed "$skiff" --log-level warn convert --source "$src" --target "$tgt" --registry-auth bench:bench)
    f=$(timed "$skiff" --log-level warn check --source "$src" --target "$tgt" --registry-auth bench:bench --json "$work/full.json")
    n=$(timed "$skiff" --log-level warn check --no-data --source "$src" --target "$tgt" --registry-auth bench:bench --json "$work/fast.json")
    bytes=$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); print(a["source_bytes_fetched"], a["target_bytes_fetched"], b["target_bytes_fetched"])' "$work/full.json" "$work/fast.json")
    rows+=("$c $f $n $bytes")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
med = lambda i: statistics.median(r[i] for r in rows)
mib = lambda b: b / (1 << 20)
print(f"Debian minbase, {len(rows)} runs (medians):")
print(f"  convert           {med(0):6.2f} s  peak RSS {med(1)/1024:6.1f} MiB")
print(f"  check             {med(2):6.2f} s  peak RSS {med(3)/1024:6.1f} MiB  fetched {mib(med(6)):.1f} MiB source + {mib(med(7)):.1f} MiB target  ({med(2)/med(0):.2f} x convert)")
print(f"  check --no-data   {med(4):6.2f} s  peak RSS {med(5)/1024:6.1f} MiB  fetched {mib(med(6)):.1f} MiB source + {mib(med(8)):.2f} MiB target  ({med(4)/med(0):.2f} x convert)")
'
