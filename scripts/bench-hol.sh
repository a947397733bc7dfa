#!/usr/bin/env bash
# Head-of-line blocking in the microVM (TCG), in one run: a registry behind
# scripts/delay-proxy.py, which adds 1.5 s each way; in the guest a cold read of a 1 MiB file
# and, 1 s later, on the device's one request queue, a read of a 1 MiB file whose chunks are
# already in the host's cache (docs/serve.md, "Requests off the queue thread"). Compared, on the
# same image and registry:
#   - skiff serve --image with its worker pool (the default --thread-num);
#   - skiff serve --image with --thread-num 1: one worker, which is what answering requests on
#     the queue thread was (the 2.25 s of /work/shared/reference/measurements.md);
#   - nydusd virtiofs (registry backend, blobcache), the same files as a RAFS v6 image.
# Then, in the same boot, 8 cold reads of 1 MiB at once: with the pool they wait on the
# network together. Also the daemon's peak RSS (without the guest's RAM) over each run, which
# is what the pool costs in memory per VM. Medians of --runs runs.
#
# Usage: scripts/bench-hol.sh [--runs N] [--out FILE]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=3
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
cache=${SKIFF_CACHE:-/var/cache/skiff}
work="$cache/bench-hol"
mkdir -p "$work"
log() { echo "bench-hol: $*" >&2; }

"$repo/scripts/install-deps.sh" >&2
tools=$("$repo/scripts/install-nydus.sh" | tail -n 1)
nydusd="$tools/nydusd"
nydus_image="$tools/nydus-image"
cargo build --locked --release --quiet --manifest-path "$repo/Cargo.toml"
skiff="$repo/target/release/skiff"

delay_ms=1500
port=$((20000 + RANDOM % 20000))
proxy_port=$((port + 1))
reg="127.0.0.1:$port"
slow="127.0.0.1:$proxy_port"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    mountpoint -q "$work/mnt" && umount -l "$work/mnt"
    SKIFF_REGISTRY_RUN="$work/registry-run" "$repo/scripts/registry.sh" stop --name hol >/dev/null 2>&1 || true
}
trap cleanup EXIT

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "n/a"}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f×", b / a; else print "n/a" }'; }
# peak_rss PID FILE: the daemon's own memory (RssAnon + RssFile: not RssShmem, the guest's RAM
# mapped for vhost-user), sampled into FILE until PID exits.
peak_rss() {
    local peak=0 now
    while kill -0 "$1" 2>/dev/null; do
        now=$(awk '/RssAnon|RssFile/ {s += $2} END {print s + 0}' "/proc/$1/status" 2>/dev/null || echo 0)
        if ((now > peak)); then peak=$now; echo "$peak" >"$2"; fi
        sleep 0.1
    done
}

# --- The image: cold.bin, cached.bin and par-0..7.bin, 1 MiB of random bytes each -----------
tree="$work/tree"
if [[ ! -f $work/.tree2.done ]]; then
    rm -rf "$tree"; mkdir -p "$tree"
    for f in cold cached par-0 par-1 par-2 par-3 par-4 par-5 par-6 par-7; do
        head -c $((1 << 20)) /dev/urandom >"$tree/$f.bin"
    done
    touch "$work/.tree2.done"
fi

# An OCI image layout of one uncompressed layer of the tree, for skiff convert.
layout="$work/layout"
rm -rf "$layout"; mkdir -p "$layout/blobs/sha256"
tar --numeric-owner --sort=name -C "$tree" -cf "$layout/layer.tar" .
layer=$(sha256sum "$layout/layer.tar" | cut -d' ' -f1); lsize=$(stat -c %s "$layout/layer.tar")
mv "$layout/layer.tar" "$layout/blobs/sha256/$layer"
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$layer" >"$layout/config.json"
config=$(sha256sum "$layout/config.json" | cut -d' ' -f1); csize=$(stat -c %s "$layout/config.json")
mv "$layout/config.json" "$layout/blobs/sha256/$config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config" "$csize" "$layer" "$lsize" >"$layout/manifest.json"
manifest=$(sha256sum "$layout/manifest.json" | cut -d' ' -f1); msize=$(stat -c %s "$layout/manifest.json")
mv "$layout/manifest.json" "$layout/blobs/sha256/$manifest"
echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s}]}' \
    "$manifest" "$msize" >"$layout/index.json"

# The same tree as a nydus RAFS v6 image, its blob pushed to the registry by its sha256.
rm -rf "$work/nydus"; mkdir -p "$work/nydus/blobs"
"$nydus_image" create --fs-version 6 --compressor lz4_block --blob-dir "$work/nydus/blobs" \
    --bootstrap "$work/nydus/boot" --log-level warn "$tree" >&2

# --- The registry, and the slow link in front of it -------------------------------------------
SKIFF_REGISTRY_RUN="$work/registry-run" "$repo/scripts/registry.sh" start --name hol --port "$port" >/dev/null
python3 "$repo/scripts/delay-proxy.py" "$slow" "$reg" "$delay_ms" 2>"$work/proxy.log" &
pids+=($!)
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$proxy_port") 2>/dev/null && break; sleep 0.05; done
"$skiff" convert --source "$layout" --target "$reg/bench/hol:latest" --insecure --log-level warn >&2
push_blob() { # REPO FILE
    local digest loc
    digest=$(sha256sum "$2" | cut -d' ' -f1)
    loc=$(curl -sf -X POST -D - -o /dev/null "http://$reg/v2/$1/blobs/uploads/" |
        tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
    [[ $loc == http* ]] || loc="http://$reg$loc"
    [[ $loc == *\?* ]] && loc="$loc&digest=sha256:$digest" || loc="$loc?digest=sha256:$digest"
    curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$2" "$loc" >/dev/null
}
for b in "$work"/nydus/blobs/*; do push_blob bench/hol-nydus "$b"; done
nydusd_config() { # WORK_DIR
    cat <<EOF
{"device":{"backend":{"type":"registry","config":{"scheme":"http","host":"$slow",
  "repo":"bench/hol-nydus","timeout":30,"connect_timeout":10,"retry_limit":2}},
 "cache":{"type":"blobcache","config":{"work_dir":"$1"}}},
 "mode":"direct","digest_validate":false,"iostats_files":false,"enable_xattr":true}
EOF
}

# --- The host's cache holds cached.bin (and the bootstrap), not cold.bin ----------------------
mkdir -p "$work/mnt"
warm() { # TOOL: reads cached.bin once through a FUSE mount, leaving the cache in $work/warm-TOOL
    local pid
    rm -rf "$work/warm-$1"; mkdir -p "$work/warm-$1"
    case "$1" in
        skiff) "$skiff" mount --image "$slow/bench/hol:latest" --insecure --cache-dir "$work/warm-skiff" \
                   --no-image-prefetch "$work/mnt" 2>"$work/warm.log" & ;;
        nydusd) nydusd_config "$work/warm-nydusd" >"$work/nydusd-warm.json"
                "$nydusd" --config "$work/nydusd-warm.json" --mountpoint "$work/mnt" \
                    --bootstrap "$work/nydus/boot" --log-level warn --rlimit-nofile 0 2>"$work/warm.log" & ;;
    esac
    pid=$!
    for _ in $(seq 1200); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
    mountpoint -q "$work/mnt" || { cat "$work/warm.log" >&2; return 1; }
    cat "$work/mnt/cached.bin" >/dev/null
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    mountpoint -q "$work/mnt" && umount -l "$work/mnt"
    return 0
}
log "warming the host's caches with cached.bin"
warm skiff
warm nydusd

cat >"$work/guest.sh" <<'EOF'
up() { read -r u _ </proc/uptime; echo "$u"; }
t0=$(up)
(cat "$SKIFF_MNT/cold.bin" >/dev/null; t1=$(up); echo "$t0 $t1" >/tmp/cold) &
sleep 1
t2=$(up); cat "$SKIFF_MNT/cached.bin" >/dev/null; t3=$(up)
wait
read -r c0 c1 </tmp/cold
t4=$(up)
for i in 0 1 2 3 4 5 6 7; do cat "$SKIFF_MNT/par-$i.bin" >/dev/null & done
wait
t5=$(up)
echo "BENCH-HOL cold_s=$(echo "$c0 $c1" | awk '{print $2-$1}') cached_s=$(echo "$t2 $t3" | awk '{print $2-$1}') par_s=$(echo "$t4 $t5" | awk '{print $2-$1}')"
EOF

# run_one TOOL -> prints "cold_s cached_s rss_kib par_s"
run_one() {
    local tool=$1 sock="$work/vm.sock" pid sampler line
    rm -rf "$work/cache"; cp -a "$work/warm-${tool%%-*}" "$work/cache"
    rm -f "$sock" "$work/vm.hwm"
    drop_caches
    case "$tool" in
        skiff-*) "$skiff" serve --image "$slow/bench/hol:latest" --insecure --cache-dir "$work/cache" \
                     --no-image-prefetch --socket "$sock" --tag bench --thread-num "${tool#skiff-}" \
                     2>"$work/daemon.log" & ;;
        nydusd) nydusd_config "$work/cache" >"$work/nydusd.json"
                "$nydusd" virtiofs --config "$work/nydusd.json" --sock "$sock" \
                    --bootstrap "$work/nydus/boot" --log-level warn --rlimit-nofile 0 2>"$work/daemon.log" & ;;
    esac
    pid=$!
    for _ in $(seq 1200); do [[ -S $sock ]] && break; sleep 0.05; done
    [[ -S $sock ]] || { cat "$work/daemon.log" >&2; return 1; }
    peak_rss "$pid" "$work/vm.hwm" &
    sampler=$!
    "$repo/scripts/vm-run.sh" -q --socket "$sock" --tag bench --test-script "$work/guest.sh" \
        --serial-log "$work/vm.serial" --timeout 600 >/dev/null 2>&1 || true
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    line=$(tr -d '\r' <"$work/vm.serial" | grep -a 'BENCH-HOL' | tail -n 1)
    [[ -n $line ]] || { log "no result from the guest ($tool)"; tail -n 20 "$work/vm.serial" >&2; return 1; }
    echo "$(sed -n 's/.*cold_s=\([0-9.]*\).*/\1/p' <<<"$line") $(sed -n 's/.*cached_s=\([0-9.]*\).*/\1/p' <<<"$line") $(cat "$work/vm.hwm" 2>/dev/null || echo 0) $(sed -n 's/.*par_s=\([0-9.]*\).*/\1/p' <<<"$line")"
}

pool=$("$skiff" serve --help | awk '/--thread-num/ {f = 1} f && /default:/ {gsub(/[^0-9]/, ""); print; exit}')
pool=${pool:-16}
declare -A r
for tool in "skiff-$pool" skiff-1 nydusd; do
    : >"$work/runs-$tool"
    for _ in $(seq "$runs"); do
        log "$tool"
        run_one "$tool" | tee -a "$work/runs-$tool" >&2
    done
    for c in 1 2 3 4; do r[$tool,$c]=$(awk -v c="$c" '{print $c}' "$work/runs-$tool" | median); done
done

kib_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
{
    echo "Head-of-line blocking, \`scripts/bench-hol.sh --runs $runs\` ($(date -u +%Y-%m-%d), $(nproc) cores, TCG guest):"
    echo "registry behind ${delay_ms} ms each way; a read of a 1 MiB file already in the host's cache, started 1 s"
    echo "into a cold read of another 1 MiB file, on the device's one request queue. Medians of $runs."
    echo
    echo "| | skiff, pool of $pool (default) | skiff, pool of 1 (= on the queue thread) | nydusd virtiofs | pool vs 1 | skiff vs nydusd |"
    echo "|---|---|---|---|---|---|"
    echo "| cached read beside the cold one, s | ${r[skiff-$pool,2]} | ${r[skiff-1,2]} | ${r[nydusd,2]} | $(ratio "${r[skiff-$pool,2]}" "${r[skiff-1,2]}") faster | $(ratio "${r[skiff-$pool,2]}" "${r[nydusd,2]}") faster |"
    echo "| cold read, s | ${r[skiff-$pool,1]} | ${r[skiff-1,1]} | ${r[nydusd,1]} | | |"
    echo "| then 8 cold reads of 1 MiB at once, s | ${r[skiff-$pool,4]} | ${r[skiff-1,4]} | ${r[nydusd,4]} | $(ratio "${r[skiff-$pool,4]}" "${r[skiff-1,4]}") faster | $(ratio "${r[skiff-$pool,4]}" "${r[nydusd,4]}") faster |"
    echo "| daemon peak RSS without guest RAM, MiB | $(kib_mib "${r[skiff-$pool,3]}") | $(kib_mib "${r[skiff-1,3]}") | $(kib_mib "${r[nydusd,3]}") | | |"
} | if [[ -n $out ]]; then tee "$out"; else cat; fi
