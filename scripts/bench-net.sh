#!/usr/bin/env bash
# Sections 4 and 5 of scripts/bench.sh, which sources this file (it uses bench.sh's variables and
# helpers: repo, work, runs, quick, sections, skiff, nydusd, nydus_image, emit, log, median,
# ratio, mib, drop_caches):
#   4. cold start over a network: a registry behind a throttled veth (~100 MB/s, ~3 ms RTT);
#      time until `chroot MNT /usr/bin/python3 -c 'print(1)'` has printed 1 and the bytes that
#      crossed the link, for Skiff (`skiff mount --image`), nydusd (registry backend, counting
#      the bootstrap fetch) and a full pull + unpack (skopeo + umoci);
#   5. sharing: 4 `skiff mount --image` processes on one cache directory, started together.
# Data: B (scripts/make-rootfs.sh devel). The network: a namespace of its own ($net_ns) joined to
# the host by a veth pair with a tbf qdisc (800 Mbit/s) on both ends; in the namespace, Debian's
# docker-registry (htpasswd auth, scripts/registry.sh --netns) on its loopback behind
# scripts/delay-proxy.py, which adds 1.5 ms each way (this kernel has no netem qdisc). Everything
# is torn down on exit.
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
net_delay_ms=1.5
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
# (a) B as a plain OCI image layout: one gzip layer of the rootfs (numeric owners, xattrs).
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

# (c) B as a nydus RAFS v6 image (lz4_block), as in section 1.
net_nydus_image() {
    local dir=$net/nydus-b src=$1
    if [[ -f $dir/boot && $dir/boot -nt $src ]]; then return 0; fi
    log "building the nydus image of B"
    rm -rf "$dir"; mkdir -p "$dir/blobs"
    "$nydus_image" create --fs-version 6 --compressor lz4_block --blob-dir "$dir/blobs" \
        --bootstrap "$dir/boot" --log-level warn "$src" >&2
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

net_push_images() {
    if ! have_manifest bench/b-oci; then
        log "pushing the OCI image"
        skopeo copy -q --dest-creds "$net_user:$net_pass" --dest-tls-verify=false \
            "oci:$net/oci-b:b" "docker://$net_reg/bench/b-oci:latest" >&2
    fi
    # Always: the image must be what this build of skiff makes (blobs already there are not
    # pushed again).
    log "skiff convert of the OCI image"
    "$skiff" convert --source "$net/oci-b" --target "$net_reg/bench/b-skiff:latest" --insecure \
        --registry-auth "$net_user:$net_pass" --log-level warn >&2
    local b
    for b in "$net"/nydus-b/blobs/*; do
        [[ $(push_blob bench/b-nydus "$b") == "$(basename "$b")" ]] ||
            { log "the nydus blob id is not its sha256: $b"; return 1; }
    done
    nydus_boot_digest=$(push_blob bench/b-nydus "$net/nydus-b/boot")
}

# --- Measurements -----------------------------------------------------------------------------
nydusd_config() {
    local auth
    auth=$(printf '%s' "$net_user:$net_pass" | base64 -w0)
    cat <<EOF
{"device":{"backend":{"type":"registry","config":{"scheme":"http","host":"$net_reg",
  "repo":"bench/b-nydus","auth":"$auth","timeout":30,"connect_timeout":10,"retry_limit":2}},
 "cache":{"type":"blobcache","config":{"work_dir":"$net/nydus-cache"}}},
 "mode":"direct","digest_validate":false,"iostats_files":false,"enable_xattr":true}
EOF
}

# The registry stands for a remote server, whose disk is not this machine's: after the page cache
# is dropped (for the client's sake), its storage is read back in, so that every tool meets a
# registry serving from memory.
warm_registry() { find "$net/registry-run/net/storage" -type f -exec cat {} + >/dev/null; }

# Each cold_* prints "seconds_to_print1 bytes_over_the_link seconds_to_mounted [extra...]"
# (for the full pull, the extra is the seconds skopeo took).
cold_full() {
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
    echo "$(elapsed "$t0" "$t1") $((r1 - r0)) n/a $(elapsed "$t0" "$tp")"
    reg_stats "$mark" bench/b-oci >>"$net/reg-full"
    rm -rf "$net/pull" "$net/bundle"
}

cold_nydusd() {
    local mnt=$net/mnt0 r0 t0 tm t1 r1 pid mark
    rm -rf "$net/nydus-cache" "$net/nydus.boot"; mkdir -p "$net/nydus-cache" "$mnt"
    nydusd_config >"$net/nydusd.json"
    drop_caches; warm_registry
    mark=$(reg_mark)
    r0=$(net_rx); t0=$(now)
    reg_curl -o "$net/nydus.boot" "http://$net_reg/v2/bench/b-nydus/blobs/sha256:$nydus_boot_digest"
    "$nydusd" --config "$net/nydusd.json" --mountpoint "$mnt" --bootstrap "$net/nydus.boot" \
        --log-level warn --rlimit-nofile 0 2>"$net/nydusd.log" &
    pid=$!; net_pids+=("$pid")
    run_to_print1 "$pid" "$mnt" "$net/nydusd.log"
    echo "$(elapsed "$t0" "$t1") $((r1 - r0)) $(elapsed "$t0" "$tm")"
    reg_stats "$mark" bench/b-nydus >>"$net/reg-nydusd"
}

skiff_mount_bg() { # MNT CACHE_DIR TAG -> pid in $!
    "$skiff" mount --image "$net_reg/bench/b-skiff:latest" --insecure \
        --registry-auth "$net_user:$net_pass" --cache-dir "$2" \
        --metrics-file "$net/metrics-$3.json" "$1" 2>"$net/skiff-$3.log" &
}
metric() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# Extra fields: backend requests, backend bytes, demand chunks, demand stored bytes, fetch
# seconds (sum over requests).
cold_skiff() {
    local mnt=$net/mnt0 r0 t0 tm t1 r1 pid m mark
    rm -rf "$net/skiff-cache"; mkdir -p "$net/skiff-cache" "$mnt"
    drop_caches; warm_registry
    mark=$(reg_mark)
    r0=$(net_rx); t0=$(now)
    skiff_mount_bg "$mnt" "$net/skiff-cache" one
    pid=$!; net_pids+=("$pid")
    run_to_print1 "$pid" "$mnt" "$net/skiff-one.log"
    m=$net/metrics-one.json
    echo "$(elapsed "$t0" "$t1") $((r1 - r0)) $(elapsed "$t0" "$tm") $(metric "$m" backend_requests)" \
        "$(metric "$m" backend_bytes) $(metric "$m" demand_chunks) $(metric "$m" demand_stored_bytes)" \
        "$(metric "$m" fetch_latency_sum_seconds)"
    reg_stats "$mark" bench/b-skiff >>"$net/reg-skiff"
}

# Section 5: 4 processes, one cache, started together; each prints 1 as soon as it is mounted.
# Prints "seconds_until_all_done bytes_over_the_link backend_requests_sum backend_bytes_sum".
shared_skiff() {
    local n=4 i r0 t0 t1 r1 pids=() waiters=() req=0 bytes=0
    rm -rf "$net/skiff-cache"; mkdir -p "$net/skiff-cache"
    drop_caches; warm_registry
    r0=$(net_rx); t0=$(now)
    for i in $(seq "$n"); do
        mkdir -p "$net/mnt$i"
        skiff_mount_bg "$net/mnt$i" "$net/skiff-cache" "shared$i"
        pids+=("$!"); net_pids+=("$!")
    done
    for i in $(seq "$n"); do
        (wait_mounted "$net/mnt$i" "${pids[$((i - 1))]}" && print1 "$net/mnt$i") &
        waiters+=("$!")
    done
    for i in "${waiters[@]}"; do wait "$i" || { log "a shared mount failed"; cat "$net"/skiff-shared*.log >&2; return 1; }; done
    t1=$(now); r1=$(net_rx)
    for i in "${pids[@]}"; do kill -TERM "$i" 2>/dev/null || true; done
    for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
    for i in $(seq "$n"); do
        mountpoint -q "$net/mnt$i" && umount -l "$net/mnt$i"
        req=$((req + $(metric "$net/metrics-shared$i.json" backend_requests)))
        bytes=$((bytes + $(metric "$net/metrics-shared$i.json" backend_bytes)))
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
net_nydus_image "$net_b"
net_push_images

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
    python3 -c 'import json,sys; print([l["digest"] for l in json.load(sys.stdin)["layers"] if "bootstrap" not in l["mediaType"]][0])')
net_range_ms=$(req_ms -u "$net_user:$net_pass" -r 0-99 "http://$net_reg/v2/bench/b-skiff/blobs/$skiff_blob")
oci_layer=$(reg_curl -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$net_reg/v2/bench/b-oci/manifests/latest" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"])')
net_speed=$(reg_curl -o /dev/null -w '%{speed_download}' "http://$net_reg/v2/bench/b-oci/blobs/$oci_layer")
oci_layer_bytes=$(stat -c %s "$net/oci-b/blobs/sha256/${oci_layer#sha256:}")
skiff_manifest_bytes=$(reg_curl -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$net_reg/v2/bench/b-skiff/manifests/latest" | tee "$net/skiff-manifest.json" | wc -c)
skiff_boot_bytes=$(python3 -c 'import json,sys
m = json.load(open(sys.argv[1]))
print(sum(l["size"] for l in m["layers"] if "bootstrap" in l["mediaType"]))' "$net/skiff-manifest.json")
nydus_boot_bytes=$(stat -c %s "$net/nydus-b/boot")

if [[ ,$sections, == *,4,* || ,$sections, == *,5,* ]]; then
    : >"$net/runs-full"; : >"$net/runs-nydusd"; : >"$net/runs-skiff"
    : >"$net/reg-full"; : >"$net/reg-nydusd"; : >"$net/reg-skiff"
    for _ in $(seq "$runs"); do
        cold_full >>"$net/runs-full"
        cold_nydusd >>"$net/runs-nydusd"
        cold_skiff >>"$net/runs-skiff"
    done
    for t in full nydusd skiff; do
        declare "t_$t=$(col_median "$net/runs-$t" 1)" "b_$t=$(col_median "$net/runs-$t" 2)" \
            "m_$t=$(col_median "$net/runs-$t" 3)"
    done
    s_req=$(col_median "$net/runs-skiff" 4); s_bb=$(col_median "$net/runs-skiff" 5)
    s_dc=$(col_median "$net/runs-skiff" 6); s_db=$(col_median "$net/runs-skiff" 7)
    s_fs=$(col_median "$net/runs-skiff" 8)
fi

if [[ ,$sections, == *,4,* ]]; then
    emit "## 4. Cold start over a network"
    emit
    emit "Data B in Debian's docker-registry (htpasswd auth) in a network namespace behind a veth"
    emit "pair (tbf, 800 Mbit/s each way) and a proxy adding $net_delay_ms ms each way (no netem in this"
    emit "kernel). Measured: unauthenticated GET /v2/ round trip ${net_rtt} ms (${net_rtt_direct} ms in the namespace"
    emit "without the link and proxy); authenticated 100-byte"
    emit "range GET of a blob ${net_range_ms} ms to the first byte;"
    emit "download of the $(mib "$oci_layer_bytes") MiB OCI layer at $(awk -v s="$net_speed" 'BEGIN{printf "%.1f", s/1048576}') MiB/s."
    emit "Cold: page cache dropped (then the registry's storage read back in: it stands for a remote"
    emit "server), empty caches, fresh daemon. Time from start until"
    emit "\`chroot MNT /usr/bin/python3 -c 'print(1)'\` has printed 1; bytes = host-side veth rx."
    emit "Full pull = \`skopeo copy docker://… oci:…\` + \`umoci unpack\`; nydusd = curl of the"
    emit "bootstrap blob + nydusd (fusedev, registry backend, blobcache); Skiff = \`skiff mount --image\`."
    emit
    emit "| measure | full pull + unpack | nydusd | skiff | skiff vs full pull | skiff vs nydusd |"
    emit "|---|---|---|---|---|---|"
    emit "| time to print(1), s | $t_full | $t_nydusd | $t_skiff | $(ratio "$t_skiff" "$t_full") faster | $(ratio "$t_skiff" "$t_nydusd") faster |"
    emit "| of which until mounted (full pull: skopeo copy), s | $(col_median "$net/runs-full" 4) | $m_nydusd | $m_skiff | | |"
    emit "| bytes over the link, MiB | $(mib "$b_full") | $(mib "$b_nydusd") | $(mib "$b_skiff") | $(ratio "$b_skiff" "$b_full") fewer | $(ratio "$b_skiff" "$b_nydusd") fewer |"
    emit "| blob GETs (registry log; bootstrap blob included) | $(col_median "$net/reg-full" 1) | $(col_median "$net/reg-nydusd" 1) | $(col_median "$net/reg-skiff" 1) | | |"
    emit "| registry's own time per blob GET, ms (mean) | $(col_median "$net/reg-full" 2) | $(col_median "$net/reg-nydusd" 2) | $(col_median "$net/reg-skiff" 2) | | |"
    emit "| bytes over the link / workload's compressed bytes | $(times_x "$b_full" "$s_db") | $(times_x "$b_nydusd" "$s_db") | $(times_x "$b_skiff" "$s_db") | | |"
    emit
    emit "Workload's compressed bytes: the stored size of the $s_dc distinct chunks the reads asked"
    emit "for, $(mib "$s_db") MiB (Skiff's \`demand_stored_bytes\`; nydus's lz4_block chunks are about"
    emit "the same size). Skiff fetched them with $s_req range requests ($(mib "$s_bb") MiB of chunk"
    emit "data, $(awk -v s="$s_fs" -v n="$s_req" 'BEGIN { if (n > 0) printf "%.1f", 1000 * s / n; else print "n/a" }') ms per request on average) after the manifest ($skiff_manifest_bytes B) and"
    emit "bootstrap ($(mib "$skiff_boot_bytes") MiB; nydus's bootstrap: $(mib "$nydus_boot_bytes") MiB)."
    sp_full=$(ratio "$t_skiff" "$t_full"); sp_nyd=$(ratio "$t_skiff" "$t_nydusd")
    by=$(times_x "$b_skiff" "$s_db")
    emit "Targets: ≥ 40× faster than full pull: $sp_full, $(verdict "$sp_full" ">=" 40);"
    emit "≥ 1.3× faster than nydusd: $sp_nyd, $(verdict "$sp_nyd" ">=" 1.3);"
    emit "bytes ≤ 1.5× the workload's compressed bytes: $by, $(verdict "$by" "<=" 1.5)."
    emit
    printf 'tool\tseconds\tmib\nfull pull + unpack\t%s\t%s\nnydusd\t%s\t%s\nskiff\t%s\t%s\n' \
        "$t_full" "$(mib "$b_full")" "$t_nydusd" "$(mib "$b_nydusd")" "$t_skiff" "$(mib "$b_skiff")" \
        >"$net/cold-start.tsv"
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
    : >"$net/runs-shared"
    for _ in $(seq "$runs"); do shared_skiff >>"$net/runs-shared"; done
    t_sh=$(col_median "$net/runs-shared" 1); b_sh=$(col_median "$net/runs-shared" 2)
    r_sh=$(col_median "$net/runs-shared" 3); bb_sh=$(col_median "$net/runs-shared" 4)
    emit "## 5. Sharing"
    emit
    emit "4 \`skiff mount --image\` processes on one empty \`--cache-dir\`, started together, each"
    emit "running the python3 print(1) as soon as it is mounted; against one process (section 4)."
    emit
    emit "| measure | 1 process | 4 processes | 4 vs 1 |"
    emit "|---|---|---|---|"
    emit "| bytes over the link, MiB | $(mib "$b_skiff") | $(mib "$b_sh") | $(times_x "$b_sh" "$b_skiff") |"
    emit "| chunk bytes fetched (all processes), MiB | $(mib "$s_bb") | $(mib "$bb_sh") | $(times_x "$bb_sh" "$s_bb") |"
    emit "| other bytes over the link (manifests, bootstraps, HTTP), MiB | $(mib $((b_skiff - s_bb))) | $(mib $((b_sh - bb_sh))) | $(times_x $((b_sh - bb_sh)) $((b_skiff - s_bb))) |"
    emit "| range requests (all processes) | $s_req | $r_sh | $(times_x "$r_sh" "$s_req") |"
    emit "| time until all have printed 1, s | $t_skiff | $t_sh | $(times_x "$t_sh" "$t_skiff") |"
    emit
    sh=$(times_x "$b_sh" "$b_skiff")
    emit "Target: 4 processes fetch ≤ 1.05× the bytes of one: $sh, $(verdict "$sh" "<=" 1.05)"
    emit "(each process fetches the manifest; the first fetches the bootstrap and the others take it from the shared cache)."
    emit
fi

net_cleanup
trap - EXIT INT TERM
