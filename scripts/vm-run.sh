#!/usr/bin/env bash
# Boot the Skiff test microVM against a vhost-user-fs socket and run a test
# script inside it. Exits with the guest test's exit status.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
    cat <<USAGE
Usage: $(basename "$0") --socket SOCK [options]

Boots a QEMU microVM (q35, TCG, 1 vCPU) with a vhost-user-fs-pci device
connected to SOCK, mounts it in the guest (virtiofs) and runs the test
script there. The exit status is the guest test's exit status (from the
'SKIFF-TEST-END rc=N' serial marker). If that marker is missing, the tail
of the serial log is printed and the exit status is 124 (timeout) or 125
(mount failure, kernel panic, QEMU error, ...); 2 means bad usage.

Options:
  --socket SOCK          vhost-user socket of the daemon (required)
  --tag TAG              virtio-fs tag (default: skiff)
  --test-script FILE     shell script run in the guest as /test.sh
                         (busybox sh; \$SKIFF_MNT, \$SKIFF_TAG are set)
  --cmd 'CMD'            run CMD in the guest instead of a test script
  --guest-file SRC[:DST] copy a host file into the guest initramfs (DST
                         defaults to /SRC-basename); repeatable
  --serial-log FILE      keep the serial console log here (default: a
                         temporary file, removed on success)
  --timeout SECONDS      kill QEMU after this long (default: 120)
  --mem SIZE             guest memory (default: 512M)
  --append 'ARGS'        extra kernel command line arguments
                         (e.g. 'skiff.mntopts=ro', 'skiff.shell=1')
  --accel ACCEL          QEMU accelerator (default: \$SKIFF_VM_ACCEL or tcg)
  --kernel FILE          kernel image (default: cached vmlinux, or bzImage)
  --guest-dir DIR        guest build cache (default:
                         \${SKIFF_CACHE:-/var/cache/skiff}/guest)
  --qemu-arg ARG         extra QEMU argument; repeatable
  (environment) SKIFF_QEMU  the QEMU binary (default: qemu-system-x86_64
                         on PATH; scripts/install-qemu10.sh prints QEMU 10's)
  --interactive          serial console on the terminal (implies
                         skiff.shell=1 and no timeout)
  -q, --quiet            don't echo the serial console to stdout
  -h, --help             this help

Summary on stderr at the end:
  vm-run: rc=N boot_to_mount_ms=M total_ms=T guest_mount_uptime=S
USAGE
}

die() { echo "vm-run: error: $*" >&2; exit 2; }

socket=""
tag="skiff"
test_script=""
cmd=""
serial_log=""
timeout_s=120
mem="512M"
append_extra=""
accel="${SKIFF_VM_ACCEL:-tcg}"
kernel=""
guest_dir="${SKIFF_CACHE:-/var/cache/skiff}/guest"
quiet=0
interactive=0
guest_files=()
qemu_extra=()

need() { [[ $# -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --socket) need "$@"; socket="$2"; shift ;;
        --tag) need "$@"; tag="$2"; shift ;;
        --test-script) need "$@"; test_script="$2"; shift ;;
        --cmd) need "$@"; cmd="$2"; shift ;;
        --guest-file) need "$@"; guest_files+=("$2"); shift ;;
        --serial-log) need "$@"; serial_log="$2"; shift ;;
        --timeout) need "$@"; timeout_s="$2"; shift ;;
        --mem) need "$@"; mem="$2"; shift ;;
        --append) need "$@"; append_extra="$append_extra $2"; shift ;;
        --accel) need "$@"; accel="$2"; shift ;;
        --kernel) need "$@"; kernel="$2"; shift ;;
        --guest-dir) need "$@"; guest_dir="$2"; shift ;;
        --qemu-arg) need "$@"; qemu_extra+=("$2"); shift ;;
        --interactive) interactive=1 ;;
        -q|--quiet) quiet=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "vm-run: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[[ -n "$socket" ]] || { usage >&2; die "--socket is required"; }
[[ -S "$socket" ]] || die "socket $socket does not exist (is the daemon running?)"
[[ -z "$test_script" || -r "$test_script" ]] || die "test script $test_script not readable"
[[ -z "$test_script" || -z "$cmd" ]] || die "--test-script and --cmd are exclusive"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
case "$tag" in *[[:space:]]*|"") die "invalid tag '$tag'" ;; esac
# The VMM: the system's QEMU, or another one named by SKIFF_QEMU (scripts/install-qemu10.sh
# prints the path of QEMU 10 from bookworm-backports).
qemu_bin="${SKIFF_QEMU:-qemu-system-x86_64}"
command -v "$qemu_bin" >/dev/null 2>&1 \
    || die "$qemu_bin not found (run scripts/install-deps.sh, or scripts/install-qemu10.sh for SKIFF_QEMU)"

# ------------------------------------------------------------- guest --
"$REPO_ROOT/guest/build-initramfs.sh" --quiet "$guest_dir"
guest_dir="$(cd "$guest_dir" && pwd)"
if [[ -z "$kernel" ]]; then
    if [[ -s "$guest_dir/vmlinux" ]]; then
        kernel="$guest_dir/vmlinux"
    else
        kernel="$guest_dir/bzImage"
    fi
fi
[[ -r "$kernel" ]] || die "kernel $kernel not found"

work="$(mktemp -d "${TMPDIR:-/tmp}/skiff-vm.XXXXXX")"
keep_log=0
if [[ -z "$serial_log" ]]; then
    serial_log="$work/serial.log"
else
    keep_log=1
    mkdir -p "$(dirname "$serial_log")"
fi
# shellcheck disable=SC2317 # invoked via trap
cleanup() {
    if [[ $keep_log -eq 1 && "$serial_log" == "$work/serial.log" ]]; then
        # Keep only the log (its path was printed).
        find "$work" -mindepth 1 -maxdepth 1 ! -name serial.log -exec rm -rf {} +
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Extra cpio appended to the base initramfs: /test.sh and --guest-file's.
# The kernel unpacks concatenated (individually compressed) archives in order.
extra="$work/extra"
mkdir -p "$extra"
if [[ -n "$test_script" ]]; then
    install -m 0755 "$test_script" "$extra/test.sh"
fi
for spec in "${guest_files[@]}"; do
    src="${spec%%:*}"
    if [[ "$spec" == *:* ]]; then dst="${spec#*:}"; else dst="/$(basename "$src")"; fi
    [[ -r "$src" ]] || die "guest file $src not readable"
    [[ "$dst" == /* ]] || dst="/$dst"
    mkdir -p "$extra$(dirname "$dst")"
    cp -L --preserve=mode "$src" "$extra$dst"
done
initrd="$guest_dir/initramfs.cpio.gz"
if [[ -n "$(ls -A "$extra")" ]]; then
    (cd "$extra" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0) | gzip -1n > "$work/extra.cpio.gz"
    cat "$initrd" "$work/extra.cpio.gz" > "$work/initrd"
    initrd="$work/initrd"
fi

# ------------------------------------------------------------- cmdline --
cmdline="console=ttyS0 quiet panic=-1 reboot=t"
# Trim boot time under TCG: skip probes the test guest doesn't need.
# (Each was measured under TCG; see guest/README.md.)
cmdline+=" no_timer_check tsc=reliable i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
cmdline+=" mitigations=off random.trust_cpu=on nowatchdog 8250.nr_uarts=1"
cmdline+=" cryptomgr.notests"
cmdline+=" initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list,init_encrypted"
cmdline+=" skiff.tag=$tag"
if [[ -n "$cmd" ]]; then
    case "$cmd" in *'"'*) die "--cmd must not contain double quotes (use --test-script)" ;; esac
    cmdline+=" skiff.cmd=\"$cmd\""
fi
[[ $interactive -eq 0 ]] || cmdline+=" skiff.shell=1"
cmdline+="$append_extra"

cpu="${SKIFF_VM_CPU:-}"
if [[ -z "$cpu" ]]; then
    if [[ "$accel" == tcg ]]; then cpu=qemu64; else cpu=host; fi
fi

# shellcheck disable=SC2054 # commas are QEMU option syntax
qemu=(
    "$qemu_bin"
    -M q35,sata=off,smbus=off,vmport=off -accel "$accel" -cpu "$cpu" -smp 1 -m "$mem"
    -object "memory-backend-memfd,id=mem,size=$mem,share=on"
    -numa node,memdev=mem
    -chardev "socket,id=char0,path=$socket"
    -device "vhost-user-fs-pci,queue-size=1024,chardev=char0,tag=$tag"
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline"
    -nodefaults -no-user-config -display none -vga none -no-reboot
    -pidfile "$work/qemu.pid"
)

if [[ $interactive -eq 1 ]]; then
    exec "${qemu[@]}" -serial mon:stdio "${qemu_extra[@]}"
fi

# Serial console -> our stdout pipe (and the log). A reader timestamps the
# SKIFF-MOUNTED line against QEMU's start time.
qemu+=(-chardev "stdio,id=ser0,signal=off" -serial chardev:ser0 "${qemu_extra[@]}")

# Kill QEMU (by the pid it wrote) if it is still running after $2 seconds.
reap_qemu() {
    local pidfile="$1" grace="$2" pid
    sleep "$grace"
    [[ -s "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ -r "/proc/$pid/cmdline" ]] && grep -aq qemu-system "/proc/$pid/cmdline"; then
        echo "vm-run: guest did not power off ${grace}s after the test ended; killing qemu" >&2
        kill "$pid" 2>/dev/null || true
    fi
}

start="${EPOCHREALTIME/./}"
: > "$serial_log"
mount_us=""
set +e
{
    timeout -k 5 "$timeout_s" "${qemu[@]}" < /dev/null 2>&1
    echo "__SKIFF_QEMU_EXIT__ $?"
} | {
    qemu_rc=""
    mounted=""
    reaper=""
    while IFS= read -r line; do
        line="${line%$'\r'}"
        case "$line" in
            __SKIFF_QEMU_EXIT__\ *) qemu_rc="${line#* }"; continue ;;
            *SKIFF-MOUNTED*)
                [[ -n "$mounted" ]] || mounted="$(( ${EPOCHREALTIME/./} - start ))" ;;
            *SKIFF-TEST-END*|*SKIFF-MOUNT-FAILED*)
                # The guest is done: if it fails to power off (e.g. hangs
                # in umount or halts), don't wait for the full timeout.
                if [[ -z "$reaper" ]]; then
                    # Detached from our stdout/stderr so a caller reading
                    # them is never held up by it.
                    reap_qemu "$work/qemu.pid" 15 \
                        </dev/null >/dev/null 2>>"$work/reaper.log" &
                    reaper=$!
                fi ;;
        esac
        printf '%s\n' "$line" >> "$serial_log"
        [[ $quiet -eq 1 ]] || printf '%s\n' "$line"
    done
    [[ -z "$reaper" ]] || kill "$reaper" 2>/dev/null || true
    printf '%s %s\n' "${qemu_rc:-255}" "${mounted:--}" > "$work/result"
}
set -e
end="${EPOCHREALTIME/./}"

read -r qemu_rc mount_us < "$work/result"
[[ ! -s "$work/reaper.log" ]] || cat "$work/reaper.log" >&2
total_ms=$(( (end - start) / 1000 ))
boot_to_mount_ms="-"
[[ "$mount_us" == "-" ]] || boot_to_mount_ms=$(( mount_us / 1000 ))
guest_up="$(grep -a -o 'SKIFF-MOUNTED uptime=[0-9.]*' "$serial_log" | head -n1 | cut -d= -f2 || true)"

end_line="$(grep -a -o 'SKIFF-TEST-END rc=[0-9]*' "$serial_log" | tail -n1 || true)"
if [[ -n "$end_line" ]]; then
    rc="${end_line##*=}"
    if [[ "$qemu_rc" != 0 ]]; then
        echo "vm-run: warning: qemu exited with status $qemu_rc after the test ended" >&2
    fi
else
    rc=125
    if [[ "$qemu_rc" == 124 || "$qemu_rc" == 137 ]]; then
        rc=124
        reason="timeout after ${timeout_s}s"
    elif grep -aq 'SKIFF-MOUNT-FAILED' "$serial_log"; then
        reason="mount failed: $(grep -a 'SKIFF-MOUNT-FAILED' "$serial_log" | head -n1)"
    elif grep -aq 'Kernel panic' "$serial_log"; then
        reason="kernel panic"
    else
        reason="no SKIFF-TEST-END marker (qemu exit status $qemu_rc)"
    fi
    {
        echo "vm-run: FAILED: $reason"
        echo "vm-run: ---- last 40 lines of serial log ($serial_log) ----"
        tail -n 40 "$serial_log"
        echo "vm-run: ----"
    } >&2
    keep_log=1
fi
echo "vm-run: rc=$rc boot_to_mount_ms=$boot_to_mount_ms total_ms=$total_ms guest_mount_uptime=${guest_up:--}" >&2
exit "$rc"
