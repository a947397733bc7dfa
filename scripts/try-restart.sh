#!/usr/bin/env bash
# Does a guest survive a restart of `skiff serve` under QEMU's chardev reconnection? Kills the
# daemon with SIGKILL while the guest reads (one file every 0.5 s, each checked against its
# md5), starts it again on the same socket 2 s later, and reports whether the guest's reads
# carry on (docs/serve.md, "A daemon restart"). Two setups on QEMU 10
# (scripts/install-qemu10.sh), each on a chardev with reconnect-ms=500:
#   device   the vhost-user-fs device on the QEMU command line, as Kata starts it;
#   hotplug  the device added over QMP once its chardev is connected (a pcie-root-port).
# Prints one line per setup (`try-restart: SETUP: ...`) and keeps the logs in --keep DIR.
# Exits 0 when the experiment ran, whatever its outcome; 1 when it could not run.
#
# Usage: scripts/try-restart.sh [--keep DIR] [--timeout SECONDS]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keep=""
timeout_s=90
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) keep=$2; shift ;;
        --timeout) timeout_s=$2; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "try-restart: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
log() { echo "try-restart: $*" >&2; }

qemu=$("$repo/scripts/install-qemu10.sh" | tail -n 1)
cargo build --locked --quiet --manifest-path "$repo/Cargo.toml"
skiff="$repo/target/debug/skiff"
work=$(mktemp -d "${TMPDIR:-/tmp}/skiff-restart.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -n "$keep" ]]; then
        mkdir -p "$keep" && cp -r "$work"/. "$keep"/ && log "logs in $keep"
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# 80 files of 256 KiB of random bytes and their md5s, in one image.
mkdir -p "$work/src"
for i in $(seq 1 80); do head -c 262144 /dev/urandom > "$work/src/f$i"; done
(cd "$work/src" && md5sum f* > ../sums && mv ../sums sums)
"$skiff" build --bootstrap "$work/img/bootstrap" --blob-dir "$work/img/blobs" "$work/src" \
    > "$work/build.log" 2>&1

# The guest: mounts TAG (itself: the hot-plugged device comes late), then reads.
cat > "$work/guest.sh" <<'GUEST'
#!/bin/sh
tag=$(sed -n 's/.*try.tag=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /rx
echo "WAITING-FOR-DEVICE"
n=0
until mount -t virtiofs "$tag" /rx 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 600 ] && { echo "NO-DEVICE"; exit 3; }
    sleep 0.1
done
cd /rx
i=1; ok=0
while [ $i -le 80 ]; do
    s=$(md5sum f$i | cut -d' ' -f1)
    want=$(grep " f$i\$" sums | cut -d' ' -f1)
    r=BAD; [ "$s" = "$want" ] && { r=ok; ok=$((ok + 1)); }
    read -r up _ < /proc/uptime
    echo "READ $i $r uptime=$up"
    i=$((i + 1))
    sleep 0.5
done
echo "DONE ok=$ok"
[ $ok -eq 80 ]
GUEST

serve() { # SOCKET TAG LOG: starts skiff serve, its PID in $served
    "$skiff" serve --bootstrap "$work/img/bootstrap" --blob-dir "$work/img/blobs" \
        --socket "$1" --tag "$2" < /dev/null > /dev/null 2> "$3" &
    served=$!
    pids+=("$served")
}
wait_for() { # FILE PATTERN PID: until PATTERN is in FILE, or PID ended (status 1)
    until grep -aq "$2" "$1" 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.2
    done
}
qmp() { # SOCKET COMMAND-JSON: one QMP command, its reply on stdout
    python3 - "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
for c in ({"execute": "qmp_capabilities"}, json.loads(sys.argv[2])):
    f.write(json.dumps(c) + "\n")
    f.flush()
    while "event" in (r := json.loads(f.readline())):
        pass
print(json.dumps(r))
PY
}

run() { # SETUP
    local setup=$1 d="$work/$1" main_pid vm tag=rx
    mkdir -p "$d"
    # The first device (vm-run.sh's, never restarted) keeps the guest's init content; the
    # restarted daemon serves the second one, on a reconnecting chardev.
    serve "$d/main.sock" skiff "$d/serve-main.log"; main_pid=$served
    serve "$d/rx.sock" "$tag" "$d/serve-1.log"; local first=$served
    while [[ ! -S "$d/main.sock" || ! -S "$d/rx.sock" ]]; do sleep 0.1; done
    local chardev="socket,id=rxc,path=$d/rx.sock,reconnect-ms=500"
    local device="vhost-user-fs-pci,id=rxfs,chardev=rxc,tag=$tag,queue-size=1024"
    local args=(--qemu-arg -chardev --qemu-arg "$chardev"
        --qemu-arg -qmp --qemu-arg "unix:$d/qmp.sock,server=on,wait=off")
    if [[ $setup == device ]]; then
        args+=(--qemu-arg -device --qemu-arg "$device")
    else
        args+=(--qemu-arg -device --qemu-arg pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1)
    fi
    SKIFF_QEMU=$qemu "$repo/scripts/vm-run.sh" --socket "$d/main.sock" \
        --test-script "$work/guest.sh" --append "try.tag=$tag" --serial-log "$d/serial.log" \
        --timeout "$timeout_s" -q "${args[@]}" > "$d/vm-run.log" 2>&1 &
    vm=$!
    pids+=("$vm")
    if ! wait_for "$d/serial.log" WAITING-FOR-DEVICE "$vm"; then
        echo "try-restart: $setup: QEMU did not start: $(grep -a qemu-system "$d/serial.log" \
            | head -n 2 | tr '\n' ' ')"
        return 0
    fi
    if [[ $setup == hotplug ]]; then
        sleep 1
        qmp "$d/qmp.sock" "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"vhost-user-fs-pci\",\"id\":\"rxfs\",\"bus\":\"rp1\",\"chardev\":\"rxc\",\"tag\":\"$tag\",\"queue-size\":1024}}" \
            > "$d/qmp.log"
    fi
    if ! wait_for "$d/serial.log" "READ 10 " "$vm"; then
        echo "try-restart: $setup: the guest never read 10 files: $(grep -a 'qemu-system\|NO-DEVICE' \
            "$d/serial.log" | head -n 2 | tr '\n' ' ')"
        return 0
    fi
    kill -KILL "$first"
    wait "$first" 2>/dev/null || true
    sleep 2
    serve "$d/rx.sock" "$tag" "$d/serve-2.log"
    local restarted=$served
    wait "$vm" && rc=0 || rc=$?
    kill "$restarted" "$main_pid" 2>/dev/null || true
    wait "$restarted" "$main_pid" 2>/dev/null || true
    local last reconnected=no
    last=$(grep -ao 'READ [0-9]*' "$d/serial.log" | tail -n 1 | cut -d' ' -f2)
    grep -q 'VMM connected' "$d/serve-2.log" && reconnected=yes
    if [[ $rc -eq 0 ]]; then
        echo "try-restart: $setup: the guest carried on: all 80 reads right (QEMU reconnected: $reconnected)"
    else
        echo "try-restart: $setup: the guest stopped at read ${last:-0} of 80 (vm-run rc=$rc; QEMU reconnected: $reconnected; the restarted daemon got: $(grep -ao 'VMM connection ended.*\|VMM connected.*' "$d/serve-2.log" | cut -c1-80 | tr '\n' ';'))"
    fi
}

log "QEMU: $("$qemu" --version | head -n 1)"
run device
run hotplug
