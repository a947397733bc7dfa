#!/usr/bin/env bash
# Install the Debian packages needed to build and boot the Skiff test microVM.
#
# Idempotent and quick: only runs apt-get (update + install) when at least one
# package is missing.
set -euo pipefail

PACKAGES=(
    fuse3
    busybox-static
    debootstrap
    qemu-system-x86
    linux-image-amd64
    attr
    cpio
    xz-utils
    zstd
    kmod
    # registry tests (tests/registry.rs, scripts/registry.sh)
    docker-registry
    apache2-utils
    skopeo
    curl
)

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--check] [--help]

Installs (if missing): ${PACKAGES[*]}

  --check   only report missing packages; exit 1 if any are missing
USAGE
}

check_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check) check_only=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all packages present"
    exit 0
fi

echo "install-deps: missing: ${missing[*]}"
if [[ $check_only -eq 1 ]]; then
    exit 1
fi

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo)
    else
        echo "install-deps: must run as root (or have sudo)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"

still=()
for p in "${missing[@]}"; do
    installed "$p" || still+=("$p")
done
if [[ ${#still[@]} -gt 0 ]]; then
    echo "install-deps: failed to install: ${still[*]}" >&2
    exit 1
fi
echo "install-deps: installed: ${missing[*]}"
