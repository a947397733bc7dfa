#!/usr/bin/env bash
# Build the Skiff test-guest kernel and initramfs.
#
# Outputs (in OUT_DIR):
#   vmlinux             uncompressed ELF kernel with a PVH entry note, booted
#                       directly by 'qemu -kernel' (absent if extraction or the
#                       PVH check failed; then use bzImage)
#   bzImage             the distribution kernel image, as a fallback
#   initramfs.cpio.gz   busybox + virtio-fs modules + guest/init
#   kernel-version      the kernel release the guest was built from
#   modules.list        the modules loaded by init, in load order
#
# Rebuilds only when an input changed (kernel, modules, busybox, guest/init
# or this script). Safe to run concurrently (serialised with flock).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GUEST_DIR="$SCRIPT_DIR"

# Modules init loads (dependencies are added automatically from modules.dep).
WANT_MODULES=(
    virtio
    virtio_ring
    virtio_pci_modern_dev
    virtio_pci_legacy_dev
    virtio_pci
    fuse
    virtiofs
    overlay
)

usage() {
    cat <<USAGE
Usage: $(basename "$0") [options] [OUT_DIR]

Builds vmlinux + initramfs.cpio.gz for the Skiff test microVM into OUT_DIR
(default: \${SKIFF_CACHE:-/var/cache/skiff}/guest).

Options:
  --kernel-version VER  kernel release to use (default: \$SKIFF_GUEST_KVER, or
                        the newest /boot/vmlinuz-* that has /lib/modules/VER)
  --force               rebuild even if the cache is up to date
  -q, --quiet           only print errors
  -h, --help            this help

Environment: SKIFF_CACHE, SKIFF_GUEST_KVER, BUSYBOX (path to a static busybox).
USAGE
}

log() { [[ $quiet -eq 1 ]] || echo "build-initramfs: $*" >&2; }
die() { echo "build-initramfs: error: $*" >&2; exit 1; }

force=0
quiet=0
kver="${SKIFF_GUEST_KVER:-}"
out_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --kernel-version) [[ $# -ge 2 ]] || die "--kernel-version needs a value"; kver="$2"; shift ;;
        --kernel-version=*) kver="${1#*=}" ;;
        --force) force=1 ;;
        -q|--quiet) quiet=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) [[ -z "$out_dir" ]] || die "only one OUT_DIR allowed"; out_dir="$1" ;;
    esac
    shift
done
out_dir="${out_dir:-${SKIFF_CACHE:-/var/cache/skiff}/guest}"

# ---------------------------------------------------------------- inputs --

pick_kernel() {
    local f v best=""
    for f in /boot/vmlinuz-*; do
        [[ -e "$f" ]] || continue
        v="${f#/boot/vmlinuz-}"
        [[ -d "/lib/modules/$v" ]] || continue
        best="$(printf '%s\n%s\n' "$best" "$v" | sed '/^$/d' | sort -V | tail -n1)"
    done
    printf '%s' "$best"
}

if [[ -z "$kver" ]]; then
    kver="$(pick_kernel)"
    [[ -n "$kver" ]] || die "no /boot/vmlinuz-* with matching /lib/modules found (run scripts/install-deps.sh)"
fi
vmlinuz="/boot/vmlinuz-$kver"
moddir="/lib/modules/$kver"
[[ -r "$vmlinuz" ]] || die "kernel image $vmlinuz not found"
[[ -r "$moddir/modules.dep" ]] || die "$moddir/modules.dep not found"

busybox="${BUSYBOX:-}"
if [[ -z "$busybox" ]]; then
    for c in /bin/busybox /usr/bin/busybox; do
        if [[ -x "$c" ]]; then busybox="$c"; break; fi
    done
fi
[[ -n "$busybox" && -x "$busybox" ]] || die "busybox not found (install busybox-static)"
if command -v file >/dev/null 2>&1 && file -L "$busybox" | grep -q 'dynamically linked'; then
    die "$busybox is dynamically linked; install busybox-static"
fi

init_src="$GUEST_DIR/init"
[[ -r "$init_src" ]] || die "$init_src not found"

# ---------------------------------------------------------------- cache --

hash_inputs() {
    {
        echo "kver=$kver"
        # The modules themselves change only together with modules.dep.
        stat -L -c '%n %s %Y' "$vmlinuz" "$busybox" "$moddir/modules.dep"
        echo "modules=${WANT_MODULES[*]}"
        sha256sum "$init_src" "${BASH_SOURCE[0]}"
    } | sha256sum | cut -d' ' -f1
}

mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
exec 9>"$out_dir/.lock"
flock 9

stamp="$(hash_inputs)"
if [[ $force -eq 0 && -f "$out_dir/.stamp" && "$(cat "$out_dir/.stamp")" == "$stamp" \
      && -s "$out_dir/initramfs.cpio.gz" && -s "$out_dir/bzImage" ]]; then
    log "up to date ($out_dir)"
    exit 0
fi

# ------------------------------------------------------ module resolution --

# modules.dep lines: "kernel/a/b.ko[.xz]: dep1.ko dep2.ko ..." where the
# dependency list is already transitive. Builtin modules are listed in
# modules.builtin and need no loading.
declare -A MOD_PATH=()
declare -A MOD_DEPS=()
while IFS= read -r line; do
    path="${line%%:*}"
    deps="${line#*:}"
    base="${path##*/}"
    name="${base%%.ko*}"
    name="${name//-/_}"
    MOD_PATH[$name]="$path"
    MOD_DEPS[$name]="$deps"
done < "$moddir/modules.dep"

declare -A BUILTIN=()
if [[ -r "$moddir/modules.builtin" ]]; then
    while IFS= read -r path; do
        base="${path##*/}"
        name="${base%%.ko*}"
        BUILTIN[${name//-/_}]=1
    done < "$moddir/modules.builtin"
fi

declare -A VISITING=()
declare -A RESOLVED=()
ORDER=()
visit() {
    local name="${1//-/_}" dep dname
    [[ -z "${RESOLVED[$name]:-}" ]] || return 0
    if [[ -n "${BUILTIN[$name]:-}" ]]; then
        RESOLVED[$name]=1
        return 0
    fi
    [[ -n "${MOD_PATH[$name]:-}" ]] || die "module $name not found in $moddir/modules.dep"
    [[ -z "${VISITING[$name]:-}" ]] || die "dependency cycle at module $name"
    VISITING[$name]=1
    for dep in ${MOD_DEPS[$name]}; do
        dname="${dep##*/}"
        dname="${dname%%.ko*}"
        visit "$dname"
    done
    unset "VISITING[$name]"
    RESOLVED[$name]=1
    ORDER+=("$name")
}
for m in "${WANT_MODULES[@]}"; do
    visit "$m"
done

log "building guest for kernel $kver into $out_dir"
work="$(mktemp -d "$out_dir/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# ------------------------------------------------------------- vmlinux --

# Find an embedded compressed payload in the bzImage and decompress it, the
# way the kernel's scripts/extract-vmlinux does: try every offset where a
# known magic occurs until the result is an ELF file.
is_elf() {
    [[ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" == "7f454c46" ]]
}

has_pvh_note() {
    # XEN_ELFNOTE_PHYS32_ENTRY (type 18) with name "Xen": namesz=4,
    # descsz=4|8, type=0x12, "Xen\0".
    if command -v readelf >/dev/null 2>&1; then
        readelf -n "$1" 2>/dev/null | grep -Eq 'Xen.*(0x00000012|PHYS32_ENTRY)' && return 0
    fi
    LC_ALL=C grep -qaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$1"
}

extract_vmlinux() {
    local img="$1" out="$2" magic cmd off
    local -a tries=(
        '\xfd7zXZ\x00|xz -dc --single-stream'
        '\x1f\x8b\x08|gzip -dc'
        '\x28\xb5\x2f\xfd|zstd -dcq'
        '\x02\x21\x4c\x18|lz4 -dc'
        '\x5d\x00\x00\x00|xz -dc --format=lzma'
        'BZh|bzip2 -dc'
        '\x89\x4c\x5a\x4f\x00\x0d\x0a\x1a\x0a|lzop -dc'
    )
    for t in "${tries[@]}"; do
        magic="${t%%|*}"
        cmd="${t#*|}"
        command -v "${cmd%% *}" >/dev/null 2>&1 || continue
        while IFS=: read -r off _; do
            [[ -n "$off" ]] || continue
            # shellcheck disable=SC2086 # $cmd is a command plus flags
            tail -c "+$((off + 1))" "$img" | $cmd > "$out" 2>/dev/null || true
            if [[ -s "$out" ]] && is_elf "$out"; then
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$magic" "$img" || true)
    done
    rm -f "$out"
    return 1
}

cp "$vmlinuz" "$work/bzImage"
have_vmlinux=0
if extract_vmlinux "$vmlinuz" "$work/vmlinux"; then
    if has_pvh_note "$work/vmlinux"; then
        have_vmlinux=1
        log "extracted vmlinux ($(stat -c %s "$work/vmlinux") bytes, PVH note present)"
    else
        log "warning: extracted vmlinux has no PVH entry note; falling back to bzImage"
        rm -f "$work/vmlinux"
    fi
else
    log "warning: could not extract vmlinux from $vmlinuz; falling back to bzImage"
fi

# ----------------------------------------------------------- initramfs --

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,etc,root,lib/modules/skiff}
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
# One symlink per applet, at its canonical location.
while IFS= read -r applet; do
    [[ -n "$applet" ]] || continue
    applet="${applet#/}"
    [[ "$applet" == "bin/busybox" ]] && continue
    [[ -e "$root/$applet" || -L "$root/$applet" ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)
[[ -e "$root/bin/sh" ]] || ln -s busybox "$root/bin/sh"

install -m 0755 "$init_src" "$root/init"

: > "$root/lib/modules/skiff/modules.list"
i=0
for m in "${ORDER[@]}"; do
    src="$moddir/${MOD_PATH[$m]}"
    i=$((i + 1))
    dst="$root/lib/modules/skiff/$(printf '%02d' "$i")-$m.ko"
    case "$src" in
        *.ko.xz)  xz -dc "$src" > "$dst" ;;
        *.ko.zst) zstd -dcq "$src" > "$dst" ;;
        *.ko.gz)  gzip -dc "$src" > "$dst" ;;
        *.ko)     cp "$src" "$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
    echo "${dst##*/}" >> "$root/lib/modules/skiff/modules.list"
done
log "modules (load order): ${ORDER[*]}"

echo "skiff-guest kernel=$kver" > "$root/etc/skiff-guest"
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"

# Device nodes are created by devtmpfs at boot; /dev/console is also in the
# kernel's built-in initramfs. Normalise ownership and timestamps so the
# archive is reproducible.
find "$root" -exec touch -h -d @0 {} +
(
    cd "$root"
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible
) | gzip -9n > "$work/initramfs.cpio.gz"

# ------------------------------------------------------------- publish --

cp "$root/lib/modules/skiff/modules.list" "$work/modules.list"
echo "$kver" > "$work/kernel-version"
for f in bzImage initramfs.cpio.gz modules.list kernel-version; do
    mv -f "$work/$f" "$out_dir/$f"
done
if [[ $have_vmlinux -eq 1 ]]; then
    mv -f "$work/vmlinux" "$out_dir/vmlinux"
else
    rm -f "$out_dir/vmlinux"
fi
echo "$stamp" > "$out_dir/.stamp"
log "done: $out_dir"
