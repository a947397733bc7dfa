#!/usr/bin/env bash
# Debootstrap a Debian bookworm root filesystem for the Skiff tests, into a cache outside the
# repository, once: later runs print the cached path at once.
#
# Usage: make-rootfs.sh VARIANT
#   minbase   debootstrap --variant=minbase
#   bigger    minbase plus a modest set of packages (python3, curl), so that it shares most of
#             its files with minbase: the chunk-dictionary test builds one against the other.
#   devel     minbase plus python3, python3-pip, gcc, g++, make, git and curl: image B of the
#             benchmarks (scripts/bench.sh).
#
# Prints the rootfs path as the only line on stdout; everything else goes to stderr.
# Cache: ${SKIFF_CACHE:-/var/cache/skiff}/rootfs/VARIANT, with the marker
# rootfs/.VARIANT.done written only after a complete, cleaned-up run. A directory without its
# marker (a run that failed or was killed) is deleted and done again. An flock serialises runs,
# so that two tests never debootstrap at the same time.
# The mirror is the one apt uses here (/etc/apt/sources.list or sources.list.d), so that the
# packages come from the registry this machine is set up for; SKIFF_DEBIAN_MIRROR overrides.
set -euo pipefail

usage() {
    echo "usage: $(basename "$0") minbase|bigger|devel" >&2
}

[[ $# -eq 1 ]] || { usage; exit 2; }
variant=$1
include=()
case "$variant" in
    minbase) ;;
    bigger) include=(--include=python3,curl) ;;
    devel) include=(--include=python3,python3-pip,gcc,g++,make,git,curl) ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 2 ;;
esac

[[ $(id -u) -eq 0 ]] || { echo "make-rootfs: must run as root (debootstrap)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "make-rootfs: debootstrap is not installed" >&2; exit 1; }

suite=bookworm
cache=${SKIFF_CACHE:-/var/cache/skiff}/rootfs
dest=$cache/$variant
marker=$cache/.$variant.done
work=$cache/.$variant.partial

# The Debian mirror apt is configured with, for the main archive (not security).
find_mirror() {
    local f uri
    # One-line format: "deb [opts] URI SUITE COMPONENTS".
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        uri=$(awk -v s="$suite" '$1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == s) { print $i; exit }
            }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    # deb822 format: a stanza with "Suites:" naming the suite, and its "URIs:".
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        uri=$(awk -v s="$suite" '
            /^[[:space:]]*$/ { if (ok && u != "") { print u; exit } ok = 0; u = ""; next }
            /^URIs:/ { u = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
            END { if (ok && u != "") print u }' "$f" | head -n1)
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    echo "http://deb.debian.org/debian"
}

# Unmounts anything debootstrap left mounted under $1 (proc, sys, ... after a killed run), so
# that deleting the directory never reaches into a live filesystem.
unmount_under() {
    local root m
    root=$(readlink -f "$1")
    # Deepest first.
    awk '{ print $2 }' /proc/mounts | { grep -E "^${root}(/|$)" || true; } | sort -r | while read -r m; do
        echo "make-rootfs: unmounting leftover $m" >&2
        umount -l "$m" || true
    done
}

remove_tree() {
    [[ -e $1 ]] || return 0
    unmount_under "$1"
    rm -rf --one-file-system "$1"
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if [[ -f $marker && -d $dest ]]; then
    echo "$dest"
    exit 0
fi

echo "make-rootfs: building $variant into $dest" >&2
rm -f "$marker"
remove_tree "$dest"
remove_tree "$work"

mirror=${SKIFF_DEBIAN_MIRROR:-$(find_mirror)}
echo "make-rootfs: debootstrap --variant=minbase ${include[*]} $suite from $mirror" >&2
log=$cache/.$variant.log
if ! debootstrap --variant=minbase "${include[@]}" "$suite" "$work" "$mirror" >"$log" 2>&1; then
    echo "make-rootfs: debootstrap failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    remove_tree "$work"
    exit 1
fi
unmount_under "$work"

# Bits that only make the image bigger or vary between runs, and that no test needs: the
# downloaded packages, apt's lists, and logs.
rm -rf --one-file-system "$work"/var/cache/apt/archives/*.deb \
    "$work"/var/cache/apt/*.bin \
    "$work"/var/lib/apt/lists/* \
    "$work"/var/log/* \
    "$work"/debootstrap
mkdir -p "$work"/var/lib/apt/lists/partial
# Nothing may stay mounted in the tree; fail loudly rather than cache something odd.
if grep -qE "^[^ ]+ $(readlink -f "$work")(/| )" /proc/mounts; then
    echo "make-rootfs: something is still mounted under $work" >&2
    exit 1
fi

mv "$work" "$dest"
sync
touch "$marker"
echo "make-rootfs: done: $(du -sh --one-file-system "$dest" | cut -f1) in $dest" >&2
echo "$dest"
