#!/usr/bin/env bash
# Sections 4 and 5 of scripts/bench.sh, which sources this file (it uses bench.sh's variables and
# helpers: repo, work, runs, quick, sections, skiff, nydusd, nydus_image, emit, log, median,
# ratio, mib, drop_caches):
#   4. cold start over a network: a registry behind a throttled veth (~100 MB/s, ~2 ms added
#      round trip, as the independent baseline in ../shared/reference/measurements.md); time
#      until `chroot MNT /usr/bin/python3 -c 'print(1)'` has printed 1 and the bytes that
#      crossed the link, for Skiff (`skiff mount --image`) on its own image and on the Nydus v6
#      image, nydusd on that same v6 image (the snapshotter's stock config; it fetches its
#      bootstrap layer, counted), and a full pull + unpack (skopeo + umoci); each daemon without
#      a prefetch list, with the list `skiff record` wrote (in the image: `skiff convert
#      --prefetch-list`, `nydus-image --prefetch-policy fs`), and with it at run time
#      (`--prefetch-files`, for both);
#   5. sharing: 4 `skiff mount --image` processes on one cache directory, started together,
#      without and with the recorded list.
# Data: B (scripts/make-rootfs.sh devel). The network: a namespace of its own ($net_ns) joined to
# the host by a veth pair with a tbf qdisc (800 Mbit/s) on both ends; in the namespace, Debian's
# docker-registry (htpasswd auth, scripts/registry.sh --netns) on its loopback behind
# scripts/delay-proxy.py, which adds $SKIFF_BENCH_DELAY_MS (default 1.0) ms each way (this kernel
# has no netem qdisc). Everything is torn down on exit.
# The plot (docs/benchmarks-cold-start.png) is drawn by scripts/bench-plot.py with matplotlib
# from PyPI in a venv under $cache (never in the repository).
# shellcheck shell=bash disable=SC2154

net_ns=skiffbench
net_host_if=sb-host
net_ns_if=sb-ns
net_host_ip=10.203.0.1
net_ns_ip=10.203.0.2
net_user=bench
net_pass=bench-secret
net=$work/net
net_reg=$net_ns_ip:5000
net_delay_ms=${SKIFF_BENCH_DELAY_MS:-1.0}
net_pids=()
net_proxy_pid=""
mkdir -p "$net"

net_install_deps() {
    local p missing=()
    for p in umoci skopeo iproute2 python3-venv; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
        { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }
}

net_cleanup() {
    local p m
    for p in "${net_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${net_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    net_pids=()
    if [[ -n $net_proxy_pid ]]; then
        kill -TERM "$net_proxy_pid" 2>/dev/null || true
        wait "$net_proxy_pid" 2>/dev/null || true
        net_proxy_pid=""
    fi
    for m in "$net"/mnt*; do
        [[ -d $m ]] && mountpoint -q "$m" && umount -l "$m"
    done
    SKIFF_REGISTRY_RUN="$net/registry-run" "$repo/scripts/registry.sh" stop --name net >/dev/null 2>&1 || true
    ip netns del "$net_ns" 2>/dev/null || true
    ip link del "$net_host_if" 2>/dev/null || true
}

# The namespace, the veth pair and the shaping: tbf at 800 Mbit/s on both ends (a burst above
# the 64 KiB GSO packets of a veth), and the delay proxy in front of the registry.
net_setup() {
    net_cleanup
    ip netns add "$net_ns"
    ip link add "$net_host_if" type veth peer name "$net_ns_if"
    ip link set "$net_ns_if" netns "$net_ns"
    ip addr add "$net_host_ip/24" dev "$net_host_if"
    ip link set "$net_host_if" up
    ip -n "$net_ns" addr add "$net_ns_ip/24" dev "$net_ns_if"
    ip -n "$net_ns" link set "$net_ns_if" up
    ip -n "$net_ns" link set lo up
    tc qdisc add dev "$net_host_if" root tbf rate 800mbit burst 256kb latency 100ms
    ip netns exec "$net_ns" tc qdisc add dev "$net_ns_if" root tbf rate 800mbit burst 256kb latency 100ms
    SKIFF_REGISTRY_RUN="$net/registry-run" "$repo/scripts/registry.sh" start --name net \
        --netns "$net_ns" --addr 127.0.0.1 --port 5001 --htpasswd "$net_user:$net_pass" >/dev/null
    ip netns exec "$net_ns" /usr/bin/python3 "$repo/scripts/delay-proxy.py" "$net_reg" \
        127.0.0.1:5001 "$net_delay_ms" 2>"$net/proxy.log" &
    net_proxy_pid=$!
    # The proxy and the registry stand for a network and a remote server: keep the CPU load of
    # whatever else runs on this machine out of their latency as far as priorities can.
    renice -n -10 -p "$net_proxy_pid" "$(cat "$net/registry-run/net/pid")" >/dev/null || true
    local i
    for i in $(seq 100); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$net_reg/v2/") == 401 ]] && return 0
        sleep 0.1
    done
    log "the delay proxy does not answer"; cat "$net/proxy.log" >&2; return 1
}

net_rx() { cat "/sys/class/net/$net_host_if/statistics/rx_bytes"; }
net_reg_log=$net/registry-run/net/registry.log
reg_mark() { wc -l <"$net_reg_log"; }
# reg_stats MARK REPO: "requests mean_ms" of the blob GETs for REPO logged since MARK, from the
# registry's own "response completed" lines (its time from request to last byte written).
reg_stats() {
    tail -n "+$(($1 + 1))" "$net_reg_log" | grep 'response completed' |
        grep "http.request.method=GET" | grep "uri=\"/v2/$2/blobs/" |
        sed -n 's/.*http\.response\.duration=\([0-9.]*\)\([a-zµ]*\).*/\1 \2/p' |
        awk '{ v = $1; if ($2 == "s") v *= 1000; else if ($2 == "µs" || $2 == "us") v /= 1000;
               else if ($2 == "ns") v /= 1e6; n++; sum += v }
             END { printf "%d %.1f\n", n, n ? sum / n : 0 }'
}
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.3f", e - s }'; }
reg_curl() { curl -sf -u "$net_user:$net_pass" "$@"; }
wait_mounted() { # DIR PID
    local i
    for i in $(seq 3000); do
        mountpoint -q "$1" && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.01
    done
    return 1
}
# run_to_print1 PID MNT LOG: waits for PID to mount MNT, runs the workload, stops PID. Sets the
# caller's tm (mounted), t1 (printed) and r1 (link bytes then).
run_to_print1() {
    wait_mounted "$2" "$1" || { cat "$3" >&2; return 1; }
    tm=$(now)
    print1 "$2"
    t1=$(now); r1=$(net_rx)
    kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true
    mountpoint -q "$2" && umount -l "$2"
    net_pids=()
}
print1() { [[ $(chroot "$1" /usr/bin/python3 -c 'print(1)' 2>"$net/py.err") == 1 ]] || { cat "$net/py.err" >&2; return 1; }; }

# --- Images -----------------------------------------------------------------------------------
# B as a plain OCI image layout: one gzip layer of the rootfs (numeric owners, xattrs).
net_oci_layout() {
    local dir=$net/oci-b src=$1
    if [[ -f $dir/index.json && $dir/index.json -nt $src ]]; then return 0; fi
    log "building the OCI image of B"
    rm -rf "$dir"; mkdir -p "$dir/blobs/sha256"
    tar --numeric-owner --xattrs --xattrs-include='*' --sort=name --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$src" -cf - . |
        tee >(sha256sum | cut -d' ' -f1 >"$net/diffid") | gzip -6 >"$dir/layer.gz"
    sync "$net/diffid"
    local layer lsize diffid config csize manifest msize
    layer=$(sha256sum "$dir/layer.gz" | cut -d' ' -f1); lsize=$(stat -c %s "$dir/layer.gz")
    mv "$dir/layer.gz" "$dir/blobs/sha256/$layer"
    diffid=$(cat "$net/diffid")
    printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/usr/bin/python3"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$diffid" >"$dir/config.json"
    config=$(sha256sum "$dir/config.json" | cut -d' ' -f1); csize=$(stat -c %s "$dir/config.json")
    mv "$dir/config.json" "$dir/blobs/sha256/$config"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
        "$config" "$csize" "$layer" "$lsize" >"$dir/manifest.json"
    manifest=$(sha256sum "$dir/manifest.json" | cut -d' ' -f1); msize=$(stat -c %s "$dir/manifest.json")
    mv "$dir/manifest.json" "$dir/blobs/sha256/$manifest"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"b"}}]}' \
        "$manifest" "$msize" >"$dir/index.json"
}

# B as a Nydus RAFS v6 image (lz4_block, as section 1's), into DIR; with LIST, built with
# `--prefetch-policy fs` and LIST on stdin (the v6 prefetch table; nydus-image lays the listed
# files out first in the blob).
net_nydus_image() { # SRC DIR [LIST]
    local src=$1 dir=$2 list=${3:-}
    if [[ -f $dir/boot && $dir/boot -nt $src && ( -z $list || $dir/boot -nt $list ) ]]; then return 0; fi
    log "building the nydus image $(basename "$dir") of B"
    rm -rf "$dir"; mkdir -p "$dir/blobs"
    if [[ -n $list ]]; then
        "$nydus_image" create --fs-version 6 --compressor lz4_block --blob-dir "$dir/blobs" \
            --bootstrap "$dir/boot" --log-level warn --prefetch-policy fs "$src" <"$list" >&2
    else
        "$nydus_image" create --fs-version 6 --compressor lz4_block --blob-dir "$dir/blobs" \
            --bootstrap "$dir/boot" --log-level warn "$src" >&2
    fi
}

have_manifest() { # REPO
    [[ $(curl -s -o /dev/null -w '%{http_code}' -u "$net_user:$net_pass" \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://$net_reg/v2/$1/manifests/latest") == 200 ]]
}
have_blob() { # REPO DIGEST
    [[ $(curl -s -o /dev/null -w '%{http_code}' -I -u "$net_user:$net_pass" \
        "http://$net_reg/v2/$1/blobs/sha256:$2") == 200 ]]
}
# A monolithic blob upload: POST for an upload URL, then PUT the whole file with its digest.
push_blob() { # REPO FILE -> digest hex
    local digest loc
    digest=$(sha256sum "$2" | cut -d' ' -f1)
    if ! have_blob "$1" "$digest"; then
        loc=$(curl -sf -u "$net_user:$net_pass" -X POST -D - -o /dev/null \
            "http://$net_reg/v2/$1/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
        [[ $loc == http* ]] || loc="http://$net_reg$loc"
        [[ $loc == *\?* ]] && loc="$loc&digest=sha256:$digest" || loc="$loc?digest=sha256:$digest"
        curl -sf -u "$net_user:$net_pass" -X PUT -H 'Content-Type: application/octet-stream' \
            --data-binary "@$2" "$loc" >/dev/null
    fi
    echo "$digest"
}

# Pushes the Nydus image in DIR to REPO:latest as nydusify lays it out: each blob a layer of
# type nydus.blob (its digest its id), then the bootstrap as image/image.boot in a gzip tar
# layer annotated as Nydus's bootstrap. Sets nydus_boot_layer[REPO] to that layer's digest.
declare -A nydus_boot_layer
push_nydus() { # REPO DIR
    local repo_=$1 dir=$2 b layers=() tmp=$2/push
    rm -rf "$tmp"; mkdir -p "$tmp/layer/image"
    for b in "$dir"/blobs/*; do
        [[ $(push_blob "$repo_" "$b") == "$(basename "$b")" ]] ||
            { log "the nydus blob id is not its sha256: $b"; return 1; }
        layers+=("$(basename "$b") $(stat -c %s "$b")")
    done
    cp "$dir/boot" "$tmp/layer/image/image.boot"
    tar --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$tmp/layer" -cf "$tmp/boot.tar" image
    gzip -n -c "$tmp/boot.tar" >"$tmp/boot.tar.gz"
    local bl bd
    bl=$(push_blob "$repo_" "$tmp/boot.tar.gz")
    bd=$(sha256sum "$tmp/boot.tar" | cut -d' ' -f1)
    nydus_boot_layer[$repo_]=$bl
    python3 - "$tmp" "$bl" "$(stat -c %s "$tmp/boot.tar.gz")" "$bd" "${layers[@]}" <<'PY'
import json, sys, hashlib
tmp, bl, bsize, bdiff = sys.argv[1:5]
blobs = [l.split() for l in sys.argv[5:]]
layers = [{"mediaType": "application/vnd.oci.image.layer.nydus.blob.v1",
           "digest": "sha256:" + d, "size": int(n),
           "annotations": {"containerd.io/snapshot/nydus-blob": "true"}} for d, n in blobs]
layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
               "digest": "sha256:" + bl, "size": int(bsize),
               "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                               "containerd.io/snapshot/nydus-fs-version": "6"}})
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                     "rootfs": {"type": "layers",
                                "diff_ids": ["sha256:" + d for d, _ in blobs] + ["sha256:" + bdiff]}},
                    separators=(",", ":")).encode()
open(tmp + "/config.json", "wb").write(config)
json.dump({"layers": layers, "config_size": len(config)}, open(tmp + "/layers.json", "w"))
PY
    local cd
    cd=$(push_blob "$repo_" "$tmp/config.json")
    python3 - "$tmp" "$cd" <<'PY' >"$tmp/manifest.json"
import json, sys
tmp, cd = sys.argv[1:3]
l = json.load(open(tmp + "/layers.json"))
print(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                             "digest": "sha256:" + cd, "size": l["config_size"]},
                  "layers": l["layers"]}, separators=(",", ":")))
PY
    curl -sf -u "$net_user:$net_pass" -X PUT \
        -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
        --data-binary "@$tmp/manifest.json" "http://$net_reg/v2/$repo_/manifests/latest" >/dev/null
}

skiff_convert() { # REPO [convert options...]
    local repo_=$1; shift
    log "skiff convert of the OCI image into $repo_ $*"
    "$skiff" convert --source "$net/oci-b" --target "$net_reg/$repo_:latest" --insecure \
        --registry-auth "$net_user:$net_pass" --log-level warn --json "$net/convert-${repo_##*/}.json" "$@" >&2
}

net_push_images() {
    if ! have_manifest bench/b-oci; then
        log "pushing the OCI image"
        skopeo copy -q --dest-creds "$net_user:$net_pass" --dest-tls-verify=false \
            "oci:$net/oci-b:b" "docker://$net_reg/bench/b-oci:latest" >&2
    fi
    # Always: the image must be what this build of skiff makes (blobs already there are not
    # pushed again).
    skiff_convert bench/b-skiff
    push_nydus bench/b-nydus "$net/nydus-b"
}

# The startup list, recorded by `skiff record` over the same link (the workload run once on a
# lazily mounted image, with its own empty cache), then the images that carry it.
net_record_and_push() {
    local t0 t1
    rm -rf "$net/rec-cache" "$net/python.list.new"
    t0=$(now)
    "$skiff" record --image "$net_reg/bench/b-skiff:latest" --insecure \
        --registry-auth "$net_user:$net_pass" --cache-dir "$net/rec-cache" --log-level warn \
        -o "$net/python.list.new" -- chroot {} /usr/bin/python3 -c 'print(1)' >"$net/record.out" 2>&1 ||
        { cat "$net/record.out" >&2; return 1; }
    t1=$(now)
    rec_seconds=$(elapsed "$t0" "$t1")
    # Keep the old file (and the images built from it) when the list did not change.
    if cmp -s "$net/python.list.new" "$net/python.list"; then
        rm "$net/python.list.new"
    else
        mv "$net/python.list.new" "$net/python.list"
    fi
    rec_files=$(wc -l <"$net/python.list")
    rec_bytes=$(cd "$net_b" && tr '\n' '\0' <"$net/python.list" | sed -z 's|^/||' | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
    log "recorded $rec_files files ($(mib "$rec_bytes") MiB) in $rec_seconds s"
    skiff_convert bench/b-skiff-pf --prefetch-list "$net/python.list"
    net_nydus_image "$net_b" "$net/nydus-b-pf" "$net/python.list"
    push_nydus bench/b-nydus-pf "$net/nydus-b-pf"
}

# --- Measurements -----------------------------------------------------------------------------
# nydusd's config as nydus-snapshotter writes it (misc/snapshotter/nydusd-config.fusedev.json,
# with host, repo, auth and work_dir filled in): registry backend, blobcache, no digest
# validation, amplify_io 1 MiB, fs_prefetch on with prefetch_all and 8 threads.
nydusd_config() { # REPO
    local auth
    auth=$(printf '%s' "$net_user:$net_pass" | base64 -w0)
    cat <<EOC
{"device":{"backend":{"type":"registry","config":{"readahead":false,"host":"$net_reg",
  "repo":"$1","auth":"$auth","scheme":"http","skip_verify":false,"proxy":{"fallback":false},
  "timeout":5,"connect_timeout":5,"retry_limit":2}},
 "cache":{"type":"blobcache","config":{"work_dir":"$net/nydus-cache","disable_indexed_map":false}}},
 "mode":"direct","digest_validate":false,"iostats_files":false,"enable_xattr":true,
 "amplify_io":1048576,
 "fs_prefetch":{"enable":true,"prefetch_all":true,"threads_count":8,"merging_size":1048576}}
EOC
}

# The registry stands for a remote server, whose disk is not this machine's: after the page cache
# is dropped (for the client's sake), its storage is read back in, so that every tool meets a
# registry serving from memory.
warm_registry() { find "$net/registry-run/net/storage" -type f -exec cat {} + >/dev/null; }

# Each cold_* prints "seconds_to_print1 bytes_over_the_link seconds_to_mounted [extra...]"
# and appends the registry's "blob_GETs mean_ms" to $net/reg-TAG.
cold_full() { # TAG
    rm -rf "$net/pull" "$net/bundle"
    drop_caches; warm_registry
    local r0 t0 tp t1 r1 mark
    mark=$(reg_mark)
    r0=$(net_rx); t0=$(now)
    skopeo copy -q --src-creds "$net_user:$net_pass" --src-tls-verify=false \
        "docker://$net_reg/bench/b-oci:latest" "oci:$net/pull:b" >&2
    tp=$(now)
    umoci unpack --image "$net/pull:b" "$net/bundle" >/dev/null 2>"$net/umoci.err" ||
        { cat "$net/umoci.err" >&2; return 1; }
    print1 "$net/bundle/rootfs"
    t1=$(now); r1=$(net_rx)
    echo "$(elapsed "$t0" "$t1") $((r1 - r0)) $(elapsed "$t0" "$tp")"
    reg_stats "$mark" bench/b-oci >>"$net/reg-$1"
    rm -rf "$net/pull" "$net/bundle"
}

# nydusd as the snapshotter runs it, with the bootstrap fetched the way containerd does: the
# manifest, then the bootstrap layer, unpacked to image/image.boot. Extra fields: none.
cold_nydusd() { # TAG REPO [nydusd options...]
    local tag=$1 repo_=$2 mnt=$net/mnt0 r0 t0 tm t1 r1 pid mark
    shift 2
    rm -rf "$net/nydus-cache" "$net/nydus-boot"; mkdir -p "$net/nydus-cache" "$net/nydus-boot" "$mnt"
    nydusd_config "$repo_" >"$net/nydusd.json"
    drop_caches; warm_registry
    mark=$(reg_mark)
    r0=$(net_rx); t0=$(now)
    reg_curl -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://$net_reg/v2/$repo_/manifests/latest"
    reg_curl "http://$net_reg/v2/$repo_/blobs/sha256:${nydus_boot_layer[$repo_]}" |
        tar -xzf - -C "$net/nydus-boot" image/image.boot
    "$nydusd" --config "$net/nydusd.json" --mountpoint "$mnt" \
        --bootstrap "$net/nydus-boot/image/image.boot" --log-level warn --rlimit-nofile 0 "$@" \
        2>"$net/nydusd.log" &
    pid=$!; net_pids+=("$pid")
    run_to_print1 "$pid" "$mnt" "$net/nydusd.log"
    echo "$(elapsed "$t0" "$t1") $((r1 - r0)) $(elapsed "$t0" "$tm")"
    reg_stats "$mark" "$repo_" >>"$net/reg-$tag"
}

skiff_mount_bg() { # MNT CACHE_DIR TAG REPO [mount options...] -> pid in $!
    local mnt=$1 cache_=$2 tag=$3 repo_=$4
    shift 4
    "$skiff" mount --image "$net_reg/$repo_:latest" --insecure \
        --registry-auth "$net_user:$net_pass" --cache-dir "$cache_" \
        --metrics-file "$net/metrics-$tag.json" "$@" "$mnt" 2>"$net/skiff-$tag.log" &
}
metric() { python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))[sys.argv[2]]))' "$1" "$2"; }

# Extra fields: backend requests, backend bytes, demand chunks, demand stored bytes, fetch
# seconds (sum over requests), prefetch bytes.
cold_skiff() { # TAG REPO [mount options...]
    local tag=$1 repo_=$2 mnt=$net/mnt0 r0 t0 tm t1 r1 pid m mark
    shift 2
    rm -rf "$net/skiff-cache"; mkdir -p "$net/skiff-cache" "$mnt"
    drop_caches; warm_registry
    mark=$(reg_mark)
    r0=$(net_rx); t0=$(now)
    skiff_mount_bg "$mnt" "$net/skiff-cache" "$tag" "$repo_" "$@"
    pid=$!; net_pids+=("$pid")
    run_to_print1 "$pid" "$mnt" "$net/skiff-$tag.log"
    m=$net/metrics-$tag.json
    echo "$(elapsed "$t0" "$t1") $((r1 - r0)) $(elapsed "$t0" "$tm") $(metric "$m" backend_requests)" \
        "$(metric "$m" backend_bytes) $(metric "$m" demand_chunks) $(metric "$m" demand_stored_bytes)" \
        "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fetch_latency_sum_seconds"])' "$m")" \
        "$(metric "$m" prefetch_bytes)"
    reg_stats "$mark" "$repo_" >>"$net/reg-$tag"
}

# Section 5: 4 processes, one cache, started together; each prints 1 as soon as it is mounted.
# Prints "seconds_until_all_done bytes_over_the_link backend_requests_sum backend_bytes_sum".
shared_skiff() { # TAG REPO
    local tag=$1 repo_=$2 n=4 i r0 t0 t1 r1 pids=() waiters=() req=0 bytes=0
    rm -rf "$net/skiff-cache"; mkdir -p "$net/skiff-cache"
    drop_caches; warm_registry
    r0=$(net_rx); t0=$(now)
    for i in $(seq "$n"); do
        mkdir -p "$net/mnt$i"
        skiff_mount_bg "$net/mnt$i" "$net/skiff-cache" "$tag-shared$i" "$repo_"
        pids+=("$!"); net_pids+=("$!")
    done
    for i in $(seq "$n"); do
        (wait_mounted "$net/mnt$i" "${pids[$((i - 1))]}" && print1 "$net/mnt$i") &
        waiters+=("$!")
    done
    for i in "${waiters[@]}"; do wait "$i" || { log "a shared mount failed"; cat "$net"/skiff-"$tag"-shared*.log >&2; return 1; }; done
    t1=$(now); r1=$(net_rx)
    for i in "${pids[@]}"; do kill -TERM "$i" 2>/dev/null || true; done
    for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
    for i in $(seq "$n"); do
        mountpoint -q "$net/mnt$i" && umount -l "$net/mnt$i"
        req=$((req + $(metric "$net/metrics-$tag-shared$i.json" backend_requests)))
        bytes=$((bytes + $(metric "$net/metrics-$tag-shared$i.json" backend_bytes)))
    done
    net_pids=()
    echo "$(elapsed "$t0" "$t1") $((r1 - r0)) $req $bytes"
}

col_median() { awk -v c="$2" '{print $c}' "$1" | median; }
times_x() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f×", a / b; else print "n/a" }'; }
verdict() { # VALUE OP TARGET
    awk -v v="${1%×}" -v t="$3" -v op="$2" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print ok ? "met" : "missed" }'
}

# --- Run ----------------------------------------------------------------------------------------
net_install_deps
net_b=$("$repo/scripts/make-rootfs.sh" devel)
trap 'net_cleanup' EXIT
trap 'net_cleanup; exit 130' INT TERM
net_setup
net_oci_layout "$net_b"
net_nydus_image "$net_b" "$net/nydus-b"
net_push_images
net_record_and_push

# The link as measured (medians of 10, each the second request on a connection): the round
# trip of an unauthenticated GET /v2/ (the link plus the least work the registry does), the
# time to first byte of an authenticated 100-byte range GET of the Skiff blob (what one small
# fetch costs), and throughput by downloading the OCI layer.
req_ms() { # CURL_ARGS... URL
    local i
    for i in $(seq 10); do
        curl -s -o /dev/null -o /dev/null -w '%{time_starttransfer} %{time_pretransfer}\n' \
            "$@" "${@: -1}" | tail -n 1
    done | awk '{ printf "%.2f\n", 1000 * ($1 - $2) }' | median
}
net_rtt=$(req_ms "http://$net_reg/v2/")
net_rtt_direct=$(ip netns exec "$net_ns" bash -c "$(declare -f req_ms median); req_ms http://127.0.0.1:5001/v2/")
skiff_blob=$(reg_curl -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$net_reg/v2/bench/b-skiff/manifests/latest" |
    python3 -c 'import json,sys; print([l["digest"] for l in json.load(sys.stdin)["layers"] if l.get("annotations", {}).get("containerd.io/snapshot/nydus-bootstrap") != "true"][0])')
net_range_ms=$(req_ms -u "$net_user:$net_pass" -r 0-99 "http://$net_reg/v2/bench/b-skiff/blobs/$skiff_blob")
oci_layer=$(reg_curl -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$net_reg/v2/bench/b-oci/manifests/latest" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"])')
net_speed=$(reg_curl -o /dev/null -w '%{speed_download}' "http://$net_reg/v2/bench/b-oci/blobs/$oci_layer")
oci_layer_bytes=$(stat -c %s "$net/oci-b/blobs/sha256/${oci_layer#sha256:}")
boot_layer_bytes() { # REPO: the bootstrap layer's size in the manifest
    reg_curl -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$net_reg/v2/$1/manifests/latest" |
        python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"] if l.get("annotations", {}).get("containerd.io/snapshot/nydus-bootstrap") == "true"))'
}
skiff_boot_bytes=$(boot_layer_bytes bench/b-skiff)
nydus_boot_bytes=$(boot_layer_bytes bench/b-nydus)
pblob_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["build"]["prefetch_blob_bytes"])' "$net/convert-b-skiff-pf.json")

# The configurations of section 4: TAG KIND REPO [options]. The runtime list is the same file
# for both daemons.
configs=(
    "full full"
    "s-none skiff bench/b-skiff"
    "s-image skiff bench/b-skiff-pf"
    "s-files skiff bench/b-skiff --prefetch-files $net/python.list"
    "sv6-none skiff bench/b-nydus"
    "sv6-image skiff bench/b-nydus-pf"
    "sv6-files skiff bench/b-nydus --prefetch-files $net/python.list"
    "n-none nydusd bench/b-nydus"
    "n-image nydusd bench/b-nydus-pf"
    "n-files nydusd bench/b-nydus --prefetch-files $net/python.list"
)
declare -A label=(
    [full]="full pull + unpack (skopeo + umoci)"
    [s-none]="skiff, Skiff image, no list"
    [s-image]="skiff, Skiff image converted with the list (prefetch blob)"
    [s-files]="skiff, Skiff image, list at run time (--prefetch-files)"
    [sv6-none]="skiff, Nydus v6 image, no list"
    [sv6-image]="skiff, Nydus v6 image built with the list (prefetch table)"
    [sv6-files]="skiff, Nydus v6 image, list at run time (--prefetch-files)"
    [n-none]="nydusd, Nydus v6 image, no list"
    [n-image]="nydusd, Nydus v6 image built with the list (prefetch table)"
    [n-files]="nydusd, Nydus v6 image, list at run time (--prefetch-files)"
)

if [[ ,$sections, == *,4,* || ,$sections, == *,5,* ]]; then
    for c in "${configs[@]}"; do
        read -r tag _ <<<"$c"
        : >"$net/runs-$tag"; : >"$net/reg-$tag"
    done
    for _ in $(seq "$runs"); do
        # Interleaved: one run of every configuration, then the next round.
        for c in "${configs[@]}"; do
            read -r tag kind repo_ opts <<<"$c"
            # shellcheck disable=SC2086
            case $kind in
                full) cold_full "$tag" >>"$net/runs-$tag" ;;
                skiff) cold_skiff "$tag" "$repo_" $opts >>"$net/runs-$tag" ;;
                nydusd) cold_nydusd "$tag" "$repo_" $opts >>"$net/runs-$tag" ;;
            esac
        done
    done
    for c in "${configs[@]}"; do
        read -r tag _ <<<"$c"
        declare "t_${tag//-/_}=$(col_median "$net/runs-$tag" 1)" "b_${tag//-/_}=$(col_median "$net/runs-$tag" 2)" \
            "m_${tag//-/_}=$(col_median "$net/runs-$tag" 3)"
    done
fi

if [[ ,$sections, == *,4,* ]]; then
    emit "## 4. Cold start over a network"
    emit
    emit "Data B in Debian's docker-registry (htpasswd auth) in a network namespace behind a veth"
    emit "pair (tbf, 800 Mbit/s each way) and a proxy adding $net_delay_ms ms each way (no netem in this"
    emit "kernel). Measured: unauthenticated GET /v2/ round trip ${net_rtt} ms (${net_rtt_direct} ms in the namespace"
    emit "without the link and proxy); authenticated 100-byte range GET of a blob ${net_range_ms} ms to the"
    emit "first byte; download of the $(mib "$oci_layer_bytes") MiB OCI layer at $(awk -v s="$net_speed" 'BEGIN{printf "%.1f", s/1048576}') MiB/s."
    emit "Load average at the start of the runs: $(cut -d' ' -f1-3 /proc/loadavg)."
    emit
    emit "Cold: page cache dropped (then the registry's storage read back in: it stands for a remote"
    emit "server), empty caches, fresh daemon. Time from start until"
    emit "\`chroot MNT /usr/bin/python3 -c 'print(1)'\` has printed 1; bytes = host-side veth rx."
    emit "Each daemon fetches its bootstrap: Skiff in \`skiff mount --image\` (manifest, then the"
    emit "zstd bootstrap layer); nydusd after \`curl\` of the manifest and of the gzip tar bootstrap"
    emit "layer, unpacked (what containerd and the snapshotter do), then \`nydusd\` (fusedev, the"
    emit "snapshotter's stock config: registry backend, blobcache, \`digest_validate\` false,"
    emit "\`amplify_io\` 1 MiB, \`fs_prefetch\` with \`prefetch_all\` and 8 threads)."
    emit "The list: \`skiff record\` of the same print(1) on the Skiff image over the same link"
    emit "($rec_files files, $(mib "$rec_bytes") MiB of file content, recorded in $rec_seconds s); in the image by"
    emit "\`skiff convert --prefetch-list\` (prefetch blob of $(mib "$pblob_bytes") MiB) and \`nydus-image create"
    emit "--prefetch-policy fs\`; at run time by \`--prefetch-files\` (both daemons)."
    emit
    emit "| start | time to print(1), s | until mounted, s | bytes over the link, MiB | blob GETs | registry ms per GET | vs full pull |"
    emit "|---|---|---|---|---|---|---|"
    for c in "${configs[@]}"; do
        read -r tag _ <<<"$c"
        v=${tag//-/_}
        t=t_$v b=b_$v m=m_$v
        emit "| ${label[$tag]} | ${!t} | ${!m} | $(mib "${!b}") | $(col_median "$net/reg-$tag" 1) | $(col_median "$net/reg-$tag" 2) | $(ratio "${!t}" "$t_full") |"
    done
    emit
    emit "Skiff against nydusd on the same Nydus v6 image (time to print(1), bootstrap fetch counted):"
    emit
    emit "| list | skiff s | nydusd s | skiff faster by | skiff MiB | nydusd MiB |"
    emit "|---|---|---|---|---|---|"
    for l in none image files; do
        ts=t_sv6_$l tn=t_n_$l bs=b_sv6_$l bn=b_n_$l
        emit "| $l | ${!ts} | ${!tn} | $(ratio "${!ts}" "${!tn}") | $(mib "${!bs}") | $(mib "${!bn}") |"
    done
    emit
    s_db=$(col_median "$net/runs-s-none" 7); s_dc=$(col_median "$net/runs-s-none" 6)
    v_db=$(col_median "$net/runs-sv6-none" 7)
    emit "Workload's compressed bytes: the stored size of the $s_dc distinct chunks the reads asked"
    emit "for, $(mib "$s_db") MiB on the Skiff image and $(mib "$v_db") MiB on the v6 image (Skiff's \`demand_stored_bytes\`)."
    emit "Bootstrap layers: Skiff's $(mib "$skiff_boot_bytes") MiB (zstd), Nydus's $(mib "$nydus_boot_bytes") MiB (gzip tar)."
    emit
    emit "| start | backend requests | chunk bytes fetched, MiB | of which prefetch, MiB | bytes over the link / workload's |"
    emit "|---|---|---|---|---|"
    for tag in s-none s-image s-files sv6-none sv6-image sv6-files; do
        v=${tag//-/_}; b=b_$v
        wl=$s_db; [[ $tag == sv6-* ]] && wl=$v_db
        emit "| ${label[$tag]} | $(col_median "$net/runs-$tag" 4) | $(mib "$(col_median "$net/runs-$tag" 5)") | $(mib "$(col_median "$net/runs-$tag" 9)") | $(times_x "${!b}" "$wl") |"
    done
    emit
    # Best of each: Skiff's image with its list against the full pull; Skiff against nydusd on
    # the same v6 image with the same list in it.
    sp_full=$(ratio "$t_s_image" "$t_full"); sp_nyd=$(ratio "$t_sv6_image" "$t_n_image")
    sp_nyd0=$(ratio "$t_sv6_none" "$t_n_none")
    by=$(times_x "$b_s_image" "$s_db"); by0=$(times_x "$b_s_none" "$s_db")
    emit "Targets: ≥ 40× faster than full pull (Skiff image with the list): $sp_full, $(verdict "$sp_full" ">=" 40)"
    emit "(without a list: $(ratio "$t_s_none" "$t_full"));"
    emit "≥ 1.3× faster than nydusd on the same v6 image: with the list in it $sp_nyd, $(verdict "$sp_nyd" ">=" 1.3);"
    emit "without a list $sp_nyd0, $(verdict "$sp_nyd0" ">=" 1.3); at run time $(ratio "$t_sv6_files" "$t_n_files");"
    emit "bytes ≤ 1.5× the workload's compressed bytes: with the list $by, $(verdict "$by" "<=" 1.5); without $by0, $(verdict "$by0" "<=" 1.5)."
    emit
    printf 'tool\tseconds\tmib\nfull pull + unpack\t%s\t%s\nnydusd (v6, list)\t%s\t%s\nskiff (v6, list)\t%s\t%s\nskiff (own, list)\t%s\t%s\n' \
        "$t_full" "$(mib "$b_full")" "$t_n_image" "$(mib "$b_n_image")" "$t_sv6_image" "$(mib "$b_sv6_image")" \
        "$t_s_image" "$(mib "$b_s_image")" >"$net/cold-start.tsv"
    venv=$cache/plot-venv
    if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
        log "installing matplotlib into $venv"
        /usr/bin/python3 -m venv "$venv" >&2
        "$venv/bin/pip" install -q matplotlib >&2
    fi
    "$venv/bin/python" "$repo/scripts/bench-plot.py" "$net/cold-start.tsv" "$repo/docs/benchmarks-cold-start.png" \
        "runs: $runs; link: ${net_rtt} ms RTT, ${net_range_ms} ms per small range GET, $(awk -v s="$net_speed" 'BEGIN{printf "%.0f", s/1048576}') MiB/s" >&2 &&
        emit "Plot: docs/benchmarks-cold-start.png." && emit
fi

if [[ ,$sections, == *,5,* ]]; then
    emit "## 5. Sharing"
    emit
    emit "4 \`skiff mount --image\` processes on one empty \`--cache-dir\`, started together, each"
    emit "running the python3 print(1) as soon as it is mounted; against one process (section 4)."
    emit
    emit "| image | bytes over the link, 1 process MiB | 4 processes MiB | 4 vs 1 | range requests 1 / 4 | time until all have printed 1, s (1 process) |"
    emit "|---|---|---|---|---|---|"
    for tag in s-none s-image; do
        read -r _ _ repo_ _ <<<"$(printf '%s\n' "${configs[@]}" | grep "^$tag ")"
        : >"$net/runs-shared-$tag"
        for _ in $(seq "$runs"); do shared_skiff "$tag" "$repo_" >>"$net/runs-shared-$tag"; done
        v=${tag//-/_}; b1=b_$v t1_=t_$v
        t_sh=$(col_median "$net/runs-shared-$tag" 1); b_sh=$(col_median "$net/runs-shared-$tag" 2)
        r_sh=$(col_median "$net/runs-shared-$tag" 3)
        declare "sh_$v=$(times_x "$b_sh" "${!b1}")"
        emit "| ${label[$tag]#skiff, } | $(mib "${!b1}") | $(mib "$b_sh") | $(times_x "$b_sh" "${!b1}") | $(col_median "$net/runs-$tag" 4) / $r_sh | $t_sh (${!t1_}) |"
    done
    emit
    emit "Target: 4 processes fetch ≤ 1.05× the bytes of one: without a list $sh_s_none, $(verdict "$sh_s_none" "<=" 1.05);"
    emit "with the list $sh_s_image, $(verdict "$sh_s_image" "<=" 1.05)"
    emit "(each process fetches the manifest; the first fetches the bootstrap and the others take it from the shared cache)."
    emit
fi

net_cleanup
trap - EXIT INT TERM
