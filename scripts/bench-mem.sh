#!/usr/bin/env bash
# Memory per daemon, in one run, on one Nydus RAFS v6 image (nydus-image, lz4_block) of the
# data, every daemon on the same image:
#   1. FUSE: skiff mount, skiff fuse (nydusd's drop-in; nydusd-lean's config: Skiff refuses
#      fs_prefetch over local blobs, which it reads in place),
#      nydusd (same config) and nydusd-lean (no prefetch, no amplify_io: the least nydusd runs
#      with) over a cold full `tar` of the mount: peak RSS (VmHWM, the figure
#      the target compares), RSS and PSS at the end, split anon / file / shmem, threads;
#   2. idle: the same daemons right after mounting (nothing read), and where it goes
#      (/proc/PID/smaps per mapping: the binary, libc, heap, stacks, the sealed bootstrap);
#   3. N daemons on one image: N skiff mounts with the shared bootstrap (src/share) and
#      without (--no-bootstrap-share), and N nydusd-lean, after a `find -printf` over each mount:
#      the sum of PSS (what the node pays) and each daemon's RSS.
# Data: A = Debian bookworm minbase (scripts/make-rootfs.sh), B = A + python3, gcc, git ...
# Medians of --runs runs (default 3). Cold = page cache dropped, fresh daemon, empty caches.
#
# Usage: scripts/bench-mem.sh [--runs N] [--data A|B] [--daemons N] [--sections 1,2,3]
#                             [--report FILE]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=3 dataset=A ndaemons=4 sections=1,2,3 report=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs=$2; shift ;;
        --data) dataset=$2; shift ;;
        --daemons) ndaemons=$2; shift ;;
        --sections) sections=$2; shift ;;
        --report) report=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
cache=${SKIFF_CACHE:-/var/cache/skiff}
work="$cache/bench-mem"
mkdir -p "$work"
out="$work/report.md"
: >"$out"
log() { echo "bench-mem: $*" >&2; }
emit() { echo "$*" | tee -a "$out"; }

"$repo/scripts/install-deps.sh" >&2
tools=$("$repo/scripts/install-nydus.sh" | tail -n 1)
nydus_image="$tools/nydus-image"
nydusd="$tools/nydusd"
if [[ -z ${SKIFF_BIN:-} ]]; then
    cargo build --locked --release --quiet --manifest-path "$repo/Cargo.toml"
fi
skiff=${SKIFF_BIN:-$repo/target/release/skiff}

case "$dataset" in
    A) src=$("$repo/scripts/make-rootfs.sh" minbase) ;;
    B) src=$("$repo/scripts/make-rootfs.sh" devel) ;;
    *) echo "--data A or B" >&2; exit 2 ;;
esac
img="$work/v6-$dataset"
if [[ ! -s $img/boot ]]; then
    log "building the v6 image of $dataset"
    rm -rf "$img"; mkdir -p "$img/blobs"
    "$nydus_image" create --fs-version 6 --compressor lz4_block --blob-dir "$img/blobs" \
        --bootstrap "$img/boot" --log-level warn "$src" >/dev/null
fi

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "n/a"}'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; } # KiB -> MiB
# ratio SKIFF PEER: how many times smaller SKIFF is.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f×", b / a; else print "n/a" }'; }
# mem PID: "hwm rss pss anon file shmem threads sealed_size sealed_pss" in KiB (threads a
# count). sealed_*: the mapping of the shared bootstrap's memfd, whose pages all exist (they
# were written) but count in a daemon's RSS and PSS only once it touched them.
mem() {
    local s=/proc/$1/status r=/proc/$1/smaps_rollup
    printf '%s %s %s %s %s %s %s %s\n' \
        "$(awk '/^VmHWM:/ {print $2}' "$s")" "$(awk '/^VmRSS:/ {print $2}' "$s")" \
        "$(awk '/^Pss:/ {print $2}' "$r")" "$(awk '/^RssAnon:/ {print $2}' "$s")" \
        "$(awk '/^RssFile:/ {print $2}' "$s")" "$(awk '/^RssShmem:/ {print $2}' "$s")" \
        "$(awk '/^Threads:/ {print $2}' "$s")" \
        "$(awk '/memfd:skiff-bootstrap/ {m=1; next} /^[0-9a-f]+-[0-9a-f]+ / {m=0}
                m && /^Size:/ {z+=$2} m && /^Pss:/ {p+=$2} END {print z+0, p+0}' "/proc/$1/smaps")"
}
# where PID: RSS by mapping group, "group rss_kib pss_kib", from smaps.
where() {
    python3 - "$1" <<'EOF'
import sys, re, collections
pid = sys.argv[1]
rss = collections.Counter(); pss = collections.Counter(); name = None
for line in open(f"/proc/{pid}/smaps"):
    f = line.split()
    if re.match(r"^[0-9a-f]+-[0-9a-f]+$", f[0]):
        path = f[5] if len(f) > 5 else ""
        if path.startswith("/memfd:skiff-bootstrap"): name = "sealed bootstrap (shmem)"
        elif path.endswith("/skiff") or path.endswith("/nydusd"): name = "the binary"
        elif ".so" in path: name = "shared libraries"
        elif path == "[heap]": name = "heap (brk)"
        elif path.startswith("[stack"): name = "main stack"
        elif path in ("[vdso]", "[vvar]", "[vsyscall]", "[vvar_vclock]"): name = "vdso"
        elif path == "": name = "anon mmap (malloc arenas, thread stacks, big buffers)"
        else: name = "other files: " + path
    elif f[0] == "Rss:": rss[name] += int(f[1])
    elif f[0] == "Pss:": pss[name] += int(f[1])
for k, v in sorted(rss.items(), key=lambda kv: -kv[1]):
    if v: print(f"{k}\t{v}\t{pss[k]}")
EOF
}

mnt="$work/mnt"
apisock="$work/api.sock"
mkdir -p "$mnt"
# The snapshotter's stock nydusd config (reference/nydus-node.md), localfs instead of registry.
nydus_config() { # CACHEDIR
    cat <<EOF
{"device":{"backend":{"type":"localfs","config":{"dir":"$img/blobs"}},
 "cache":{"type":"blobcache","config":{"work_dir":"$1","disable_indexed_map":false}}},
 "mode":"direct","digest_validate":false,"enable_xattr":true,"amplify_io":1048576,
 "fs_prefetch":{"enable":true,"prefetch_all":true,"threads_count":8,"merging_size":1048576}}
EOF
}
# nydusd with the least it can run with (no prefetch, no amplification; scripts/bench.sh's).
nydus_lean_config() { # CACHEDIR
    cat <<EOF
{"device":{"backend":{"type":"localfs","config":{"dir":"$img/blobs"}},
 "cache":{"type":"blobcache","config":{"work_dir":"$1"}}},
 "mode":"direct","digest_validate":false,"iostats_files":false,"enable_xattr":true}
EOF
}
# start TOOL MOUNTPOINT N [EXTRA...]: starts one daemon, waits for the mount; sets pid.
start() {
    local tool=$1 m=$2 n=$3; shift 3
    local c="$work/cache-$n"
    rm -rf "$c"; mkdir -p "$c" "$m"
    nydus_config "$c" >"$work/nydusd-$n.json"
    nydus_lean_config "$c" >"$work/nydusd-lean-$n.json"
    case "$tool" in
        skiff-mount)
            "$skiff" mount --bootstrap "$img/boot" --blob-dir "$img/blobs" --cache-dir "$c" \
                "${share[@]}" "$@" "$m" 2>"$work/daemon-$n.log" & ;;
        skiff-fuse)
            # The stock config's fs_prefetch over a localfs backend is refused by Skiff
            # (local blobs are read in place: there is no cache to prefetch into): the lean one.
            "$skiff" fuse --config "$work/nydusd-lean-$n.json" --mountpoint "$m" \
                --bootstrap "$img/boot" --apisock "$work/api-$n.sock" \
                "${share[@]}" "$@" 2>"$work/daemon-$n.log" & ;;
        nydusd|nydusd-lean)
            "$nydusd" --config "$work/$tool-$n.json" --mountpoint "$m" \
                --bootstrap "$img/boot" --apisock "$work/api-$n.sock" --log-level warn \
                --rlimit-nofile 0 "$@" 2>"$work/daemon-$n.log" & ;;
    esac
    pid=$!
    for _ in $(seq 400); do mountpoint -q "$m" && break; sleep 0.05; done
    mountpoint -q "$m" || { cat "$work/daemon-$n.log" >&2; return 1; }
}
stop() { # PID MOUNTPOINT
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    mountpoint -q "$2" && umount -l "$2"
    return 0
}
rm -rf "$work/share"
share=(--bootstrap-share-dir "$work/share")

emit "# Memory per daemon (scripts/bench-mem.sh)"
emit
emit "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(uname -r);"
emit "data $dataset as a Nydus RAFS v6 image (nydus-image, lz4_block): bootstrap"
emit "$(( $(stat -c %s "$img/boot") / 1024 )) KiB, blobs $(( $(du -sk "$img/blobs" | cut -f1) / 1024 )) MiB; skiff $(git -C "$repo" rev-parse --short HEAD), medians of $runs."
emit

daemons=(skiff-mount skiff-fuse nydusd nydusd-lean)
if [[ ,$sections, == *,1,* || ,$sections, == *,2,* ]]; then
    declare -A idle=() end=()
    for tool in "${daemons[@]}"; do
        : >"$work/idle-$tool"; : >"$work/end-$tool"
        for _ in $(seq "$runs"); do
            drop_caches
            start "$tool" "$mnt" 0
            sleep 1
            mem "$pid" >>"$work/idle-$tool"
            [[ ,$sections, == *,2,* ]] && where "$pid" >"$work/where-$tool"
            if [[ ,$sections, == *,1,* ]]; then
                tar cf - -C "$mnt" . | wc -c >/dev/null
                mem "$pid" >>"$work/end-$tool"
            fi
            stop "$pid" "$mnt"
        done
    done
    col() { awk -v c="$2" '{print $c}' "$1" | median; } # FILE COLUMN
    if [[ ,$sections, == *,1,* ]]; then
        emit "## FUSE: peak RSS over a cold full \`tar\`"
        emit
        emit "Peak RSS is VmHWM (/proc/PID/status) after the read, the figure the target compares"
        emit "(and what nydusd's figures are); RSS, PSS and the split are at the end of the read."
        emit "Sealed bootstrap: the size of the memfd holding Skiff's validated tables (shared with"
        emit "the node's other daemons); its pages are in RSS and shmem only once touched."
        emit
        emit "| daemon | peak RSS MiB | RSS MiB | PSS MiB | anon MiB | file MiB | shmem MiB | sealed bootstrap MiB | threads | nydusd / it |"
        emit "|---|---|---|---|---|---|---|---|---|---|"
        hn=$(col "$work/end-nydusd" 1)
        for tool in "${daemons[@]}"; do
            f="$work/end-$tool"
            emit "| $tool | $(mib "$(col "$f" 1)") | $(mib "$(col "$f" 2)") | $(mib "$(col "$f" 3)") | $(mib "$(col "$f" 4)") | $(mib "$(col "$f" 5)") | $(mib "$(col "$f" 6)") | $(mib "$(col "$f" 8)") | $(col "$f" 7) | $(ratio "$(col "$f" 1)" "$hn") |"
        done
        emit
    fi
    if [[ ,$sections, == *,2,* ]]; then
        emit "## Idle: right after mounting, nothing read"
        emit
        emit "| daemon | peak RSS MiB | RSS MiB | PSS MiB | anon MiB | file MiB | shmem MiB | sealed bootstrap MiB | threads | nydusd / it (RSS) |"
        emit "|---|---|---|---|---|---|---|---|---|---|"
        rn=$(col "$work/idle-nydusd" 2)
        for tool in "${daemons[@]}"; do
            f="$work/idle-$tool"
            emit "| $tool | $(mib "$(col "$f" 1)") | $(mib "$(col "$f" 2)") | $(mib "$(col "$f" 3)") | $(mib "$(col "$f" 4)") | $(mib "$(col "$f" 5)") | $(mib "$(col "$f" 6)") | $(mib "$(col "$f" 8)") | $(col "$f" 7) | $(ratio "$(col "$f" 2)" "$rn") |"
        done
        emit
        for tool in "${daemons[@]}"; do
            emit "Where $tool's idle RSS is (last run, /proc/PID/smaps), KiB:"
            emit
            emit "| mapping | RSS | PSS |"
            emit "|---|---|---|"
            while IFS=$'\t' read -r k r p; do emit "| $k | $r | $p |"; done <"$work/where-$tool"
            emit
        done
    fi
fi

if [[ ,$sections, == *,3,* ]]; then
    emit "## $ndaemons daemons on one image"
    emit
    emit "Each daemon mounts the image at its own mountpoint; a \`find -printf '%s %m %T@'\` over"
    emit "every mount, then: what the node pays, the PSS summed over the daemons (pages shared by k"
    emit "daemons count 1/k in each) with the sealed bootstrap's memfd counted once in full"
    emit "(touched or not) in place of its PSS shares; and the median daemon's RSS (which counts"
    emit "shared pages in full)."
    emit
    emit "| daemons | bootstrap | node's memory (sum of PSS) MiB | median RSS MiB | node's memory / one daemon's |"
    emit "|---|---|---|---|---|"
    for setup in "skiff-mount shared" "skiff-mount private" "nydusd-lean own"; do
        read -r tool mode <<<"$setup"
        extra=() share=(--bootstrap-share-dir "$work/share")
        [[ $mode == private ]] && extra=(--no-bootstrap-share) share=()
        for n in 1 "$ndaemons"; do
            : >"$work/sum"
            for _ in $(seq "$runs"); do
                drop_caches
                pids=()
                for i in $(seq "$n"); do
                    start "$tool" "$mnt-$i" "$i" "${extra[@]}"
                    pids+=("$pid")
                done
                for i in $(seq "$n"); do find "$mnt-$i" -printf '%s %m %T@\n' >/dev/null; done
                # What the node pays: every daemon's PSS, the sealed memfd's pages counted in
                # full once (touched or not) instead of its PSS share.
                sum=0 sealed=0; rss=()
                for p in "${pids[@]}"; do
                    read -r _ r ps _ _ _ _ sz sp <<<"$(mem "$p")"
                    sum=$((sum + ps - sp)); rss+=("$r"); sealed=$sz
                done
                sum=$((sum + sealed))
                echo "$sum $(printf '%s\n' "${rss[@]}" | median)" >>"$work/sum"
                for i in $(seq "$n"); do stop "${pids[$((i - 1))]}" "$mnt-$i"; done
            done
            s=$(awk '{print $1}' "$work/sum" | median); r=$(awk '{print $2}' "$work/sum" | median)
            [[ $n == 1 ]] && one=$s
            emit "| $n × $tool | $mode | $(mib "$s") | $(mib "$r") | $(awk -v s="$s" -v o="$one" 'BEGIN{printf "%.2f", s/o}') |"
        done
    done
    emit
fi

[[ -n $report ]] && cp "$out" "$report"
log "report: $out"
