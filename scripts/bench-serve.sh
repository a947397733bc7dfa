#!/usr/bin/env bash
# Benchmark of `skiff serve` against virtiofsd (crates.io) serving the same files to the same
# microVM, in one run: time from QEMU start to mount, guest read throughput of a 256 MiB file,
# `find` over a Debian rootfs, and the daemon's peak RSS (its own memory, without the guest's). Medians of --runs runs (default 3).
#
# Usage: scripts/bench-serve.sh [--runs N] [--out FILE]
# The guest runs under TCG (see docs/serve.md), so absolute numbers are slow; compare ratios.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=3
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
cache=${SKIFF_CACHE:-/var/cache/skiff}
work="$cache/bench-serve"
mkdir -p "$work"

"$repo/scripts/install-deps.sh" >&2
virtiofsd=$("$repo/scripts/install-virtiofsd.sh" | tail -n 1)
cargo build --locked --release --quiet --manifest-path "$repo/Cargo.toml"
skiff="$repo/target/release/skiff"
rootfs=$("$repo/scripts/make-rootfs.sh" minbase)

# The served tree: the Debian rootfs plus one 256 MiB file of random bytes.
tree="$work/tree"
if [[ ! -f "$work/.tree.done" ]]; then
    rm -rf "$tree"
    cp -a "$rootfs" "$tree"
    head -c $((256 << 20)) /dev/urandom >"$tree/big256"
    touch "$work/.tree.done"
fi
if [[ ! -f "$work/.image.done" ]]; then
    rm -rf "$work/blobs"
    "$skiff" build "$tree" --bootstrap "$work/tree.boot" --blob-dir "$work/blobs" >&2
    touch "$work/.image.done"
fi

cat >"$work/guest.sh" <<'EOF'
up() { read -r u _ </proc/uptime; echo "$u"; }
t0=$(up); cat "$SKIFF_MNT/big256" >/dev/null; t1=$(up)
n=$(find "$SKIFF_MNT" | wc -l); t2=$(up)
echo "BENCH read_s=$(echo "$t0 $t1" | awk '{print $2-$1}') find_s=$(echo "$t1 $t2" | awk '{print $2-$1}') entries=$n"
EOF

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# run_one DAEMON -> prints "boot_ms read_s find_s rss_kib"
run_one() {
    local daemon=$1 sock="$work/$1.sock" pid log="$work/$1.log"
    rm -f "$sock" "$work/$daemon.hwm"
    drop_caches
    case "$daemon" in
        skiff) "$skiff" serve --bootstrap "$work/tree.boot" --blob-dir "$work/blobs" \
                   --socket "$sock" --tag bench 2>"$log" & ;;
        virtiofsd) "$virtiofsd" --socket-path="$sock" --shared-dir="$tree" --sandbox=none \
                   --cache=always 2>"$log" & ;;
    esac
    pid=$!
    for _ in $(seq 200); do [[ -S $sock ]] && break; sleep 0.05; done
    # The daemon's own memory: RssAnon + RssFile, leaving out RssShmem, which is the guest's RAM
    # mapped for vhost-user (counted once, for the VM). Sampled while the VM runs, since
    # virtiofsd exits when its VMM disconnects.
    (peak=0
    while kill -0 "$pid" 2>/dev/null; do
        now=$(awk '/RssAnon|RssFile/ {s += $2} END {print s + 0}' "/proc/$pid/status" 2>/dev/null || echo 0)
        if ((now > peak)); then peak=$now; echo "$peak" >"$work/$daemon.hwm"; fi
        sleep 0.1
    done) &
    local sampler=$!
    local res
    res=$("$repo/scripts/vm-run.sh" -q --socket "$sock" --tag bench --test-script "$work/guest.sh" \
        --serial-log "$work/$daemon.serial" --timeout 600 2>&1 | tail -n 5)
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    local rss
    rss=$(cat "$work/$daemon.hwm" 2>/dev/null || echo 0)
    local boot read find
    boot=$(sed -n 's/.*boot_to_mount_ms=\([0-9]*\).*/\1/p' <<<"$res")
    read=$(sed -n 's/.*BENCH read_s=\([0-9.]*\).*/\1/p' "$work/$daemon.serial" | tr -d '\r')
    find=$(sed -n 's/.*find_s=\([0-9.]*\).*/\1/p' "$work/$daemon.serial" | tr -d '\r')
    echo "$boot $read $find $rss"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A results
for daemon in skiff virtiofsd; do
    : >"$work/$daemon.runs"
    for _ in $(seq "$runs"); do
        run_one "$daemon" | tee -a "$work/$daemon.runs" >&2
    done
    for col in 1 2 3 4; do
        results[$daemon,$col]=$(awk -v c="$col" '{print $c}' "$work/$daemon.runs" | median)
    done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "n/a" }'; }
mib=256
{
    echo "| (median of $runs, TCG guest) | skiff serve | virtiofsd | skiff vs virtiofsd |"
    echo "|---|---|---|---|"
    echo "| QEMU start to mounted (ms) | ${results[skiff,1]} | ${results[virtiofsd,1]} | $(ratio "${results[skiff,1]}" "${results[virtiofsd,1]}")× faster |"
    echo "| read 256 MiB file (s) | ${results[skiff,2]} ($(awk -v s="${results[skiff,2]}" -v m=$mib 'BEGIN{printf "%.0f", m/s}') MiB/s) | ${results[virtiofsd,2]} ($(awk -v s="${results[virtiofsd,2]}" -v m=$mib 'BEGIN{printf "%.0f", m/s}') MiB/s) | $(ratio "${results[skiff,2]}" "${results[virtiofsd,2]}")× throughput |"
    echo "| find over Debian minbase (s) | ${results[skiff,3]} | ${results[virtiofsd,3]} | $(ratio "${results[skiff,3]}" "${results[virtiofsd,3]}")× faster |"
    echo "| daemon peak RSS without guest RAM (MiB) | $(awk -v k="${results[skiff,4]}" 'BEGIN{printf "%.1f", k/1024}') | $(awk -v k="${results[virtiofsd,4]}" 'BEGIN{printf "%.1f", k/1024}') | $(ratio "${results[skiff,4]}" "${results[virtiofsd,4]}")× smaller |"
} | tee "${out:-/dev/null}"
